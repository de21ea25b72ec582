//! The viewer interface under faults: a viewer that logs in, saves annotations with
//! `expected_version`, loses connections and answers, resumes (or logs in again when its
//! session expired) and saves what it kept, talking to the server's real [`ViewerCore`]
//! (login with its password check, the session registry, the one edit path, change pushes)
//! against the real storage writer and store. Another user annotates the same embryos
//! meanwhile, through the writer.
//!
//! The core's environment is this world's [`Io`]: worker jobs (password checks) are held and
//! run later, or refused now and then (`busy`); storage completions are waited for as soon as
//! the core submits (so writes apply in a replayable order) and held back before the core sees
//! them. Dropped connections sometimes linger on the server until a timeout or until the
//! viewer's Resume supersedes them; sessions expire when the viewer stays away longer than
//! the resume window.
//!
//! Saves carry no idempotency key: what makes a resend safe is the version. A save whose
//! answer was lost is resent with the version the viewer had; if the first one was applied,
//! the resend is refused as a `conflict` carrying the current state, in which the viewer finds
//! its own annotation. Checked: every edit is applied exactly once, whatever was lost; change
//! notices arrive gapless and in order across resumes and new logins.
//!
//! The viewer also evaluates a model on the embryos (a versioned write like a save, whose
//! conflicts it answers by taking the current version) and reads models, results and activity
//! curves. Checked: the embryos' versions count every annotation and every evaluation the
//! audit trail records, and each embryo's stored result is the model applied to its
//! annotations as they are at the end (recomputed in every transaction that changed them).

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use crossbeam_channel::{Receiver, Sender};
use es_proto::fuzzing::Noise;
use es_proto::simulation::{run_seeds, Pipe, Totals, SEED_VARIABLE};
use es_proto::viewer::pb::{self, client_message::Request, server_message::Body};
use es_proto::viewer::{
    encode_frame, ErrorCode, FrameDecoder, ServerLimits, PROTOCOL_VERSION,
    RESPONSE_BYTES_MAX_DEFAULT,
};
use es_storage::{
    Actor, AnnotationInput, AnnotationSource, ClinicalEdit, DishRegistration, Enrolment,
    InstrumentHello, PatientRef, RegisterDish, Rights, Store, UserAdd, WellRegistration, Writer,
};
use parking_lot::Mutex;

use super::{TempStore, CLOCK_START_MS, STEP_MS};
use crate::viewer::auth::{Notice, Peer};
use crate::viewer::core::{Deliver, Io, Job, ViewerCore};
use crate::viewer::{Hub, ViewerMsg, ViewerService, ViewerSettings};

const FAULTY_STEPS_MAX: u64 = 1_500;
const CALM_STEPS_MAX: u64 = 1_500;
/// Random seeds per run besides the fixed ones (each world opens a database).
const RANDOM_SEEDS: usize = 192;
const DISH: &str = "D2026.01.05_S0001";
const USER: &str = "anna";
const PASSWORD: &str = "Embryo-2026!";
const COMPUTER: &str = "VIEWER-1";
/// The model the viewer evaluates: excluded (score 0) when the embryo's latest t2 is
/// `edit-0`, else scored by t2's hours, which the simulated annotations never have (not
/// available).
const SIM_MODEL: &str = r#"{"format": "esserver-model/1", "name": "sim",
  "exclusions": [{"name": "edit-0", "when": {"annotation": "t2", "equals": "edit-0"}, "score": 0}],
  "rule": {"additive": {"terms": [{"variable": "t2", "coefficient": 1}]}}}"#;
/// How long a dropped session may be resumed: 15 steps, so some reconnects come too late.
const SESSION_RESUME: Duration = Duration::from_millis(15 * STEP_MS as u64);

fn embryo_id(embryo: usize) -> String {
    format!("{DISH}_E{}", embryo + 1)
}

/// The password's hash with the cheapest argon2 parameters: a login verifies against the
/// parameters the hash names, and the world logs in hundreds of times.
fn cheap_password_hash() -> String {
    use argon2::password_hash::{PasswordHasher, SaltString};
    let params = argon2::Params::new(8, 1, 1, None).expect("valid argon2 parameters");
    let argon2 = argon2::Argon2::new(argon2::Algorithm::Argon2id, argon2::Version::V0x13, params);
    let salt = SaltString::encode_b64(b"simulation-salt!").expect("a salt");
    argon2
        .hash_password(PASSWORD.as_bytes(), &salt)
        .expect("hashing")
        .to_string()
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum EditState {
    /// Not sent, or sent on a connection that is gone (kept locally, as the viewer must).
    Kept,
    InFlight,
    Applied,
}

/// One annotation the user adds; `value` is unique, so the viewer recognises it.
#[derive(Debug)]
struct Edit {
    embryo: usize,
    value: String,
    state: EditState,
    /// Seen in the embryo's current state (a conflict's `current_json`) while a request of it
    /// was in flight: if that request's answer is lost, the edit is applied, not kept.
    seen_stored: bool,
    /// The version its first unanswered send carried: a resend carries it again, never a
    /// version learned since (viewer.md, "A save that got no answer").
    sent_version: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Login,
    Save(usize),
    Ping,
    /// An evaluation of the model on the embryo.
    Evaluate(usize),
    /// A read of models, results or a curve.
    Read,
}

/// What the environment keeps of one server-side connection.
#[derive(Debug, Default)]
struct ConnState {
    closing: bool,
    owed: u32,
    reading_paused: bool,
}

/// The server's side of a connection: the real core and its environment's state.
struct ServerSide {
    id: u64,
    core: ViewerCore,
    state: ConnState,
}

struct Connection {
    server: ServerSide,
    up: Pipe,
    down: Pipe,
    // The viewer's side.
    next_seq: u64,
    pending: BTreeMap<u64, Pending>,
    decoder: FrameDecoder,
    inflight_max: Option<u32>,
}

/// A connection the viewer dropped that the server still holds (no FIN arrived).
struct Lingering {
    server: ServerSide,
    closes_at: u64,
}

/// A worker job, held until `due`.
struct HeldJob {
    connection: u64,
    job: Job,
    due: u64,
}

/// A storage completion, held until `due`.
struct HeldAnswer {
    connection: u64,
    message: ViewerMsg,
    due: u64,
}

/// The server around the cores: real storage, the real viewer service (session registry,
/// wake-up hub), and what this world holds back.
struct Env {
    temp: TempStore,
    service: ViewerService,
    hub: Arc<Hub>,
    workers: crate::workers::Workers,
    complete: Sender<(u64, ViewerMsg)>,
    completed: Receiver<(u64, ViewerMsg)>,
    /// One clone per completion not yet called (see [`Env::settle`]).
    live_completions: Arc<()>,
    jobs: Vec<HeldJob>,
    answers: Vec<HeldAnswer>,
    notices: Arc<Mutex<Vec<(u64, Notice)>>>,
    clock: Instant,
}

/// The core's [`Io`] in this world, for one call.
struct SimIo<'a> {
    connection: u64,
    /// Where its bytes go; None: nobody reads them (a lingering connection).
    out: Option<&'a mut BytesMut>,
    state: &'a mut ConnState,
    jobs: &'a mut Vec<HeldJob>,
    noise: &'a mut Noise,
    calm: bool,
    step: u64,
    now: Instant,
    complete: &'a Sender<(u64, ViewerMsg)>,
    live_completions: &'a Arc<()>,
}

impl Io for SimIo<'_> {
    fn write(&mut self, bytes: &[u8]) {
        if let Some(out) = self.out.as_deref_mut() {
            out.extend_from_slice(bytes);
        }
    }
    fn close(&mut self, _reason: String) {
        self.state.closing = true;
    }
    fn is_closing(&self) -> bool {
        self.state.closing
    }
    fn is_stopping(&self) -> bool {
        false
    }
    fn owe(&mut self) {
        self.state.owed += 1;
    }
    fn answered(&mut self) {
        assert!(self.state.owed > 0, "answered more than was owed");
        self.state.owed -= 1;
    }
    fn owes(&self) -> bool {
        self.state.owed > 0
    }
    fn pending_output_bytes(&self) -> usize {
        self.out.as_ref().map_or(0, |out| out.len())
    }
    fn pause_reading(&mut self) {
        self.state.reading_paused = true;
    }
    fn resume_reading(&mut self) {
        self.state.reading_paused = false;
    }
    fn is_reading_paused(&self) -> bool {
        self.state.reading_paused
    }
    fn now(&self) -> Instant {
        self.now
    }
    fn now_ms(&self) -> i64 {
        CLOCK_START_MS + self.step as i64 * STEP_MS
    }
    fn run(&mut self, job: Job, _fallback: ViewerMsg) -> bool {
        if !self.calm && self.noise.below(25) == 0 {
            return false; // No worker free.
        }
        let delay = if self.calm {
            0
        } else {
            self.noise.below(20) as u64
        };
        self.jobs.push(HeldJob {
            connection: self.connection,
            job,
            due: self.step + delay,
        });
        true
    }
    fn deliver(&self) -> Deliver {
        let (complete, id) = (self.complete.clone(), self.connection);
        let live = self.live_completions.clone();
        Arc::new(move |message| {
            let _live = &live;
            let _ = complete.send((id, message));
        })
    }
}

impl Env {
    fn open(seed: u64, limits: ServerLimits) -> (Env, [u64; 2]) {
        let temp = TempStore::open(seed);
        let writer = temp.writer.clone();
        let at_ms = CLOCK_START_MS;
        let instrument = writer
            .write(InstrumentHello {
                serial: "ESP-0001".into(),
                model: "es-plus".into(),
                firmware: String::new(),
                presented_secret: None,
                new_secret: "s".repeat(48),
                issued_connection_open: false,
                enrolment: Enrolment::Open,
                number: 0,
                at_ms,
            })
            .expect("the instrument is recorded");
        writer
            .write(RegisterDish {
                instrument_id: instrument.instrument_id,
                dish: DishRegistration {
                    dish_id: DISH.into(),
                    slot: 1,
                    patient: PatientRef {
                        patient_id: "MRN-1".into(),
                        first_name: String::new(),
                        last_name: String::new(),
                        date_of_birth: String::new(),
                        patient_idx: String::new(),
                    },
                    treatment_name: "2026-0001".into(),
                    insemination_at_ms: at_ms - 3_600_000,
                    wells: (1..=2)
                        .map(|well| WellRegistration {
                            well,
                            embryo_id: embryo_id(well as usize - 1),
                            label: String::new(),
                        })
                        .collect(),
                    fertilization_method: String::new(),
                },
                at_ms,
            })
            .expect("the dish is registered");
        writer
            .write(UserAdd {
                actor: Actor {
                    user: "admin".into(),
                    computer: "simulation".into(),
                },
                name: USER.into(),
                password_hash: cheap_password_hash(),
                rights: Rights::Edit,
                at_ms,
            })
            .expect("the user is added");
        writer
            .write(es_storage::ModelImport {
                actor: Actor {
                    user: "admin".into(),
                    computer: "simulation".into(),
                },
                document: SIM_MODEL.into(),
                at_ms,
            })
            .expect("the model is imported");
        let versions = [0, 1].map(|embryo| {
            temp.store
                .read()
                .and_then(|reader| reader.embryo(&embryo_id(embryo)))
                .expect("the store reads")
                .expect("the embryo is registered")
                .version
        });
        let workers = crate::workers::Workers::start("sim-viewer", 1, 4).expect("a worker");
        let service = ViewerService::new(
            temp.store.clone(),
            writer,
            workers.clone(),
            Arc::new(crate::disk_guard::DiskState::default()),
            Arc::new(temp.licensing()),
            ViewerSettings {
                limits,
                login_failures_max: 5,
                lockout_ms: 60_000,
                session_resume: SESSION_RESUME,
                sessions_max: 64,
                activity_background: false,
            },
        );
        let hub = service.hub();
        let (complete, completed) = crossbeam_channel::unbounded();
        let env = Env {
            temp,
            service,
            hub,
            workers,
            complete,
            completed,
            live_completions: Arc::new(()),
            jobs: Vec::new(),
            answers: Vec::new(),
            notices: Arc::new(Mutex::new(Vec::new())),
            clock: Instant::now(),
        };
        (env, versions)
    }

    fn store(&self) -> &Store {
        &self.temp.store
    }

    fn writer(&self) -> &Writer {
        &self.temp.writer
    }

    fn server_side(&self, id: u64, noise: &mut Noise) -> ServerSide {
        let notices = self.notices.clone();
        let me = Peer::new(
            id,
            Arc::new(move |notice| {
                notices.lock().push((id, notice));
                true
            }),
        );
        let mut entropy = Noise::new(noise.next_u64());
        let core = self.service.core(
            me,
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 41_000 + id as u16),
            Box::new(move |buffer| {
                buffer.fill_with(|| entropy.next_u64() as u8);
                true
            }),
        );
        ServerSide {
            id,
            core,
            state: ConnState::default(),
        }
    }

    /// Calls the core with this world's [`Io`], then settles what it submitted.
    #[allow(clippy::too_many_arguments)]
    fn call(
        &mut self,
        server: &mut ServerSide,
        out: Option<&mut BytesMut>,
        noise: &mut Noise,
        step: u64,
        calm: bool,
        f: impl FnOnce(&mut ViewerCore, &mut dyn Io),
    ) {
        let mut io = SimIo {
            connection: server.id,
            out,
            state: &mut server.state,
            jobs: &mut self.jobs,
            noise,
            calm,
            step,
            now: self.clock + Duration::from_millis(step * STEP_MS as u64),
            complete: &self.complete,
            live_completions: &self.live_completions,
        };
        f(&mut server.core, &mut io);
        self.settle(noise, step, calm);
    }

    /// Waits until every storage completion handed out was called (in the writer's order, so
    /// a seed replays) and the commit's wake-ups were sent, holding each answer 0-29 steps
    /// (`calm`: none).
    fn settle(&mut self, noise: &mut Noise, step: u64, calm: bool) {
        let waited = Instant::now();
        loop {
            while let Ok((connection, message)) = self.completed.try_recv() {
                let delay = if calm { 0 } else { noise.below(30) as u64 };
                self.answers.push(HeldAnswer {
                    connection,
                    message,
                    due: step + delay,
                });
            }
            if Arc::strong_count(&self.live_completions) == 1 && self.completed.is_empty() {
                break;
            }
            assert!(
                waited.elapsed() < Duration::from_secs(60),
                "the storage writer completes every write"
            );
            std::thread::sleep(Duration::from_micros(50));
        }
        let last = self
            .store()
            .read()
            .and_then(|reader| reader.last_change_seq())
            .expect("the store reads");
        while self.hub.committed_seq() < last {
            assert!(
                waited.elapsed() < Duration::from_secs(60),
                "the commit listener runs"
            );
            std::thread::yield_now();
        }
    }
}

struct World {
    seed: u64,
    step: u64,
    trace: bool,
    noise: Noise,
    calm: bool,
    limits: ServerLimits,
    // The viewer.
    edits: Vec<Edit>,
    released: usize,
    /// The version of each embryo as the viewer last learned it from an answer.
    versions: [u64; 2],
    /// The versions the embryos had before anybody annotated them.
    first_versions: [u64; 2],
    token: Option<String>,
    last_change_seq: u64,
    reconnect_at: u64,
    // The link and the server.
    connection: Option<Connection>,
    lingering: Vec<Lingering>,
    next_connection: u64,
    env: Env,
    others: u64,
    totals: Totals,
}

macro_rules! check {
    ($world:expr, $condition:expr, $($format:tt)+) => {
        if !$condition {
            panic!("step {}: {}", $world.step, format!($($format)+));
        }
    };
}

impl World {
    fn new(seed: u64, trace: bool) -> World {
        let mut noise = Noise::new(seed);
        let edits = (0..5 + noise.below(30))
            .map(|k| Edit {
                embryo: noise.below(2),
                value: format!("edit-{k}"),
                state: EditState::Kept,
                seen_stored: false,
                sent_version: None,
            })
            .collect();
        let limits = ServerLimits {
            inflight_requests_max: 1 + noise.below(4) as u32,
            ..ServerLimits::default()
        };
        let (env, versions) = Env::open(seed, limits);
        World {
            seed,
            step: 0,
            trace,
            noise,
            calm: false,
            limits,
            edits,
            released: 0,
            versions,
            first_versions: versions,
            token: None,
            last_change_seq: 0,
            reconnect_at: 0,
            connection: None,
            lingering: Vec::new(),
            next_connection: 1,
            env,
            others: 0,
            totals: Totals::default(),
        }
    }

    fn log(&self, event: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("[seed {} step {}] {}", self.seed, self.step, event());
        }
    }

    fn last_committed(&self) -> u64 {
        self.env
            .store()
            .read()
            .and_then(|reader| reader.last_change_seq())
            .expect("the store reads")
    }

    fn done(&self) -> bool {
        self.released == self.edits.len()
            && self
                .edits
                .iter()
                .all(|edit| edit.state == EditState::Applied)
            && self.last_change_seq == self.last_committed()
    }

    fn run(mut self) -> Totals {
        while self.step < FAULTY_STEPS_MAX && !self.done() {
            self.tick();
        }
        self.calm = true;
        self.released = self.edits.len();
        let calm_until = self.step + CALM_STEPS_MAX;
        while !self.done() {
            check!(
                self,
                self.step < calm_until,
                "no progress in {CALM_STEPS_MAX} calm steps: edits {:?}, notices up to {} of {}",
                self.edits,
                self.last_change_seq,
                self.last_committed()
            );
            self.tick();
        }
        self.check_end();
        self.env.workers.shutdown();
        self.env.writer().shutdown();
        self.totals.steps = self.step;
        self.totals.acknowledged = self.edits.len() as u64;
        self.totals
    }

    fn tick(&mut self) {
        self.step += 1;
        if self.released < self.edits.len() && self.noise.below(4) == 0 {
            self.released += 1;
        }
        if self.connection.is_none() && self.step >= self.reconnect_at {
            self.connect();
        }
        let mut actions = [0u8, 1, 2, 3, 4, 5, 6];
        for i in (1..actions.len()).rev() {
            actions.swap(i, self.noise.below(i + 1));
        }
        for action in actions {
            if !self.calm && self.noise.below(4) == 0 {
                continue;
            }
            match action {
                0 => self.viewer_sends(),
                1 => self.deliver_up(),
                2 => self.server_reads(),
                3 => self.server_completes(),
                4 => self.other_user_writes(),
                5 => self.server_notices_and_ticks(),
                _ => self.viewer_reads(),
            }
        }
        if !self.calm && self.connection.is_some() && self.noise.below(120) == 0 {
            self.drop_connection();
        }
        self.check_step();
    }

    fn connect(&mut self) {
        let id = self.next_connection;
        self.next_connection += 1;
        let server = self.env.server_side(id, &mut self.noise);
        let mut connection = Connection {
            server,
            up: Pipe::new(&mut self.noise),
            down: Pipe::new(&mut self.noise),
            next_seq: 1,
            pending: BTreeMap::new(),
            decoder: FrameDecoder::new(RESPONSE_BYTES_MAX_DEFAULT),
            inflight_max: None,
        };
        let request = match &self.token {
            Some(token) => Request::Resume(pb::Resume {
                protocol_version: PROTOCOL_VERSION,
                session_token: token.clone(),
                changes_after: self.last_change_seq,
            }),
            None => Request::Login(pb::Login {
                protocol_version: PROTOCOL_VERSION,
                user: USER.into(),
                password: PASSWORD.into(),
                computer: COMPUTER.into(),
                changes_after: self.last_change_seq,
                ..Default::default()
            }),
        };
        self.log(|| format!("connection {id} opened: {request:?}"));
        send(&mut connection, Pending::Login, request);
        self.connection = Some(connection);
    }

    /// The viewer forgets the connection and keeps what it had in flight. The server learns
    /// of it at once, or holds the connection until a timeout (no FIN).
    fn drop_connection(&mut self) {
        let Some(connection) = self.connection.take() else {
            return;
        };
        self.totals.drops += 1;
        for edit in &mut self.edits {
            if edit.state == EditState::InFlight {
                // Its answer is lost. Stored already (seen in a current state): applied;
                // else kept, to be saved again.
                edit.state = if edit.seen_stored {
                    self.totals.duplicates += 1;
                    EditState::Applied
                } else {
                    EditState::Kept
                };
            }
        }
        let mut server = connection.server;
        if !server.state.closing && self.noise.below(3) == 0 {
            let closes_at = self.step + 1 + self.noise.below(40) as u64;
            self.log(|| {
                format!(
                    "connection {} dropped; lingers until {closes_at}",
                    server.id
                )
            });
            self.lingering.push(Lingering { server, closes_at });
        } else {
            self.log(|| format!("connection {} dropped", server.id));
            self.close_server(&mut server, "the peer closed");
        }
        self.reconnect_at = self.step + self.noise.below(20) as u64;
    }

    fn close_server(&mut self, server: &mut ServerSide, reason: &str) {
        let now = self.env.clock + Duration::from_millis(self.step * STEP_MS as u64);
        server.core.on_closed(reason, now);
    }

    /// The viewer saves kept edits, one at a time per embryo (each names the version the
    /// previous answer gave), within the server's window; now and then a Ping.
    fn viewer_sends(&mut self) {
        let Some(connection) = self.connection.as_mut() else {
            return;
        };
        let Some(inflight_max) = connection.inflight_max else {
            return;
        };
        loop {
            if connection.pending.len() >= inflight_max as usize {
                break;
            }
            if !self.calm && self.noise.below(30) == 0 {
                send(connection, Pending::Ping, Request::Ping(pb::Ping {}));
                continue;
            }
            if self.noise.below(6) == 0 {
                let embryo = self.noise.below(2);
                let request = Request::Evaluate(pb::Evaluate {
                    embryo_id: embryo_id(embryo),
                    expected_version: self.versions[embryo],
                    model: "sim".into(),
                    version: 0,
                });
                send(connection, Pending::Evaluate(embryo), request);
                continue;
            }
            if self.noise.below(6) == 0 {
                let embryo_id = embryo_id(self.noise.below(2));
                let request = match self.noise.below(4) {
                    0 => Request::ListModels(pb::ListModels {}),
                    1 => Request::GetModel(pb::GetModel {
                        name: "sim".into(),
                        version: 0,
                    }),
                    2 => Request::ListEvaluations(pb::ListEvaluations { embryo_id }),
                    _ => Request::GetActivity(pb::GetActivity { embryo_id }),
                };
                send(connection, Pending::Read, request);
                continue;
            }
            let busy = |embryo: usize| {
                self.edits
                    .iter()
                    .any(|edit| edit.embryo == embryo && edit.state == EditState::InFlight)
            };
            let next = (0..self.released).find(|index| {
                let edit = &self.edits[*index];
                edit.state == EditState::Kept && !busy(edit.embryo)
            });
            let Some(index) = next else {
                break;
            };
            let edit = &mut self.edits[index];
            edit.state = EditState::InFlight;
            let expected_version = *edit.sent_version.get_or_insert(self.versions[edit.embryo]);
            let request = Request::AddAnnotation(pb::AddAnnotation {
                embryo_id: embryo_id(edit.embryo),
                expected_version,
                annotation: Some(pb::AnnotationInput {
                    name: "t2".into(),
                    value: edit.value.clone(),
                    ..Default::default()
                }),
            });
            if self.trace {
                eprintln!(
                    "[seed {} step {}] connection {}: save {request:?}",
                    self.seed, self.step, connection.server.id
                );
            }
            send(connection, Pending::Save(index), request);
        }
    }

    fn deliver_up(&mut self) {
        if let Some(connection) = self.connection.as_mut() {
            if connection.up.deliver(&mut self.noise, self.step, self.calm) {
                self.totals.partial_pieces += 1;
            }
        }
    }

    /// The server's input callback: the core takes what it may.
    fn server_reads(&mut self) {
        let Some(mut connection) = self.connection.take() else {
            return;
        };
        if !connection.server.state.closing && !connection.up.inbox.is_empty() {
            let Connection {
                server, up, down, ..
            } = &mut connection;
            let input = &mut up.inbox;
            self.env.call(
                server,
                Some(&mut down.wire),
                &mut self.noise,
                self.step,
                self.calm,
                |core, io| core.on_input(input, io),
            );
        }
        self.connection = Some(connection);
    }

    /// Due worker jobs run and due storage answers arrive, in any order; what belongs to a
    /// connection that is gone is lost.
    fn server_completes(&mut self) {
        let budget = if self.calm {
            usize::MAX
        } else {
            1 + self.noise.below(4)
        };
        for _ in 0..budget {
            let due_jobs: Vec<usize> = (0..self.env.jobs.len())
                .filter(|index| self.env.jobs[*index].due <= self.step)
                .collect();
            let due_answers: Vec<usize> = (0..self.env.answers.len())
                .filter(|index| self.env.answers[*index].due <= self.step)
                .collect();
            let total = due_jobs.len() + due_answers.len();
            if total == 0 {
                break;
            }
            let pick = self.noise.below(total);
            let (connection, message) = if pick < due_jobs.len() {
                let held = self.env.jobs.swap_remove(due_jobs[pick]);
                (held.connection, (held.job)())
            } else {
                let held = self
                    .env
                    .answers
                    .swap_remove(due_answers[pick - due_jobs.len()]);
                (held.connection, held.message)
            };
            self.deliver_message(connection, message);
        }
    }

    /// Hands a message to connection `id`'s core, live or lingering; an answer for a
    /// connection that is gone is lost.
    fn deliver_message(&mut self, id: u64, message: ViewerMsg) {
        let (step, calm) = (self.step, self.calm);
        if let Some(connection) = self.connection.as_mut().filter(|c| c.server.id == id) {
            self.env.call(
                &mut connection.server,
                Some(&mut connection.down.wire),
                &mut self.noise,
                step,
                calm,
                |core, io| core.on_message(message, io),
            );
            return;
        }
        if let Some(lingering) = self.lingering.iter_mut().find(|l| l.server.id == id) {
            self.env.call(
                &mut lingering.server,
                None,
                &mut self.noise,
                step,
                calm,
                |core, io| core.on_message(message, io),
            );
            self.totals.lost_answers += 1;
            return;
        }
        self.totals.lost_answers += 1;
        self.log(|| format!("connection {id} gone: an answer is lost"));
    }

    /// The registries' notices reach their connections; the loop's tick and the lingering
    /// connections' timeouts come.
    fn server_notices_and_ticks(&mut self) {
        let notices: Vec<(u64, Notice)> = std::mem::take(&mut *self.env.notices.lock());
        for (id, notice) in notices {
            let message = match notice {
                Notice::ChangesCommitted => ViewerMsg::ChangesCommitted,
                Notice::Superseded => ViewerMsg::Superseded,
                Notice::AccountDisabled => ViewerMsg::AccountDisabled,
            };
            let live = self.connection.as_ref().is_some_and(|c| c.server.id == id);
            check!(
                self,
                !(live && notice == Notice::Superseded),
                "the live connection {id} was superseded"
            );
            let lingering = self.lingering.iter().any(|l| l.server.id == id);
            if live || lingering {
                self.deliver_message(id, message);
            }
        }
        let (step, calm) = (self.step, self.calm);
        if let Some(connection) = self.connection.as_mut() {
            self.env.call(
                &mut connection.server,
                Some(&mut connection.down.wire),
                &mut self.noise,
                step,
                calm,
                |core, io| core.on_tick(io),
            );
        }
        let mut index = 0;
        while index < self.lingering.len() {
            let gone = self.lingering[index].server.state.closing;
            if gone || self.lingering[index].closes_at <= step {
                let mut lingering = self.lingering.swap_remove(index);
                if !gone {
                    self.env.call(
                        &mut lingering.server,
                        None,
                        &mut self.noise,
                        step,
                        calm,
                        |core, io| core.on_timeout(es_net::TimeoutKind::Idle, io),
                    );
                }
                self.close_server(&mut lingering.server, "closed");
                self.log(|| format!("lingering connection {} closed", lingering.server.id));
            } else {
                index += 1;
            }
        }
    }

    /// Somebody else annotates an embryo: its version moves on under the viewer.
    fn other_user_writes(&mut self) {
        if self.calm || self.noise.below(25) != 0 {
            return;
        }
        let embryo = self.noise.below(2);
        let current = self
            .env
            .store()
            .read()
            .and_then(|reader| reader.embryo(&embryo_id(embryo)))
            .expect("the store reads")
            .expect("the embryo exists")
            .version;
        self.others += 1;
        let value = format!("other-{}", self.others);
        let result = self.env.writer().write(es_storage::Edit {
            actor: Actor {
                user: "bert".into(),
                computer: "VIEWER-2".into(),
            },
            edit: ClinicalEdit::AddAnnotation {
                embryo_id: embryo_id(embryo),
                expected_version: current,
                annotation: AnnotationInput {
                    name: "t2".into(),
                    value,
                    event_at_ms: None,
                    source: AnnotationSource::Manual,
                },
            },
            idempotency: None,
            at_ms: CLOCK_START_MS + self.step as i64 * STEP_MS,
        });
        check!(self, result.is_ok(), "the other user's write: {result:?}");
        self.env.settle(&mut self.noise, self.step, self.calm);
    }

    fn viewer_reads(&mut self) {
        let Some(mut connection) = self.connection.take() else {
            return;
        };
        if connection
            .down
            .deliver(&mut self.noise, self.step, self.calm)
        {
            self.totals.partial_pieces += 1;
        }
        loop {
            let message = match connection
                .decoder
                .decode::<pb::ServerMessage>(&mut connection.down.inbox)
            {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(error) => panic!("step {}: viewer cannot decode: {error}", self.step),
            };
            let body = message.body.expect("every server message has a body");
            if message.seq == 0 {
                let Body::Change(notice) = body else {
                    panic!("step {}: connection-level {body:?}", self.step);
                };
                check!(
                    self,
                    notice.change_seq == self.last_change_seq + 1,
                    "notice {} after {}: a gap or a repeat",
                    notice.change_seq,
                    self.last_change_seq
                );
                self.last_change_seq = notice.change_seq;
                continue;
            }
            let pending = connection
                .pending
                .remove(&message.seq)
                .unwrap_or_else(|| panic!("step {}: answer to unknown seq", self.step));
            self.log(|| {
                format!(
                    "connection {}: {pending:?} answered by {body:?}",
                    connection.server.id
                )
            });
            match (pending, body) {
                (Pending::Login, Body::LoginOk(ok)) => {
                    if self.last_change_seq == 0 {
                        self.last_change_seq = ok.last_change_seq;
                    }
                    self.token = Some(ok.session_token);
                    connection.inflight_max = Some(ok.inflight_requests_max);
                }
                (Pending::Login, Body::Error(error)) => {
                    let expired = error.code == ErrorCode::SessionExpired.code();
                    let busy = error.code == ErrorCode::Busy.code();
                    check!(self, expired || busy, "login refused: {error:?}");
                    check!(
                        self,
                        connection.server.state.closing,
                        "a refused login left the connection open"
                    );
                    if expired {
                        // Away longer than the resume window: log in again.
                        self.totals.refused_hellos += 1;
                        self.token = None;
                    }
                    self.connection = Some(connection);
                    self.drop_connection();
                    self.reconnect_at = self.step + u64::from(busy) * self.noise.below(10) as u64;
                    return;
                }
                (Pending::Ping, Body::Done(_)) => {}
                (Pending::Save(index), Body::Saved(saved)) => {
                    let edit = &mut self.edits[index];
                    check!(self, edit.state == EditState::InFlight, "{edit:?} saved");
                    edit.state = EditState::Applied;
                    self.versions[edit.embryo] = saved.version;
                }
                (Pending::Save(index), Body::Error(error))
                    if error.code == ErrorCode::Conflict.code() =>
                {
                    let edit = &mut self.edits[index];
                    let embryo = edit.embryo;
                    self.versions[embryo] = error.current_version;
                    let mine = format!("\"value\":\"{}\"", edit.value);
                    if error.current_json.contains(&mine) {
                        // Its earlier save, whose answer was lost, was applied.
                        edit.state = EditState::Applied;
                        self.totals.duplicates += 1;
                    } else {
                        // Someone else's change came first (the outcome is known: refused):
                        // save again on the new version.
                        edit.state = EditState::Kept;
                        edit.sent_version = None;
                        edit.seen_stored = false;
                    }
                    // And the viewer's other saves of the embryo found there.
                    self.reconcile(embryo, &error.current_json);
                }
                (Pending::Evaluate(embryo), Body::Saved(saved)) => {
                    self.versions[embryo] = saved.version;
                }
                (Pending::Evaluate(embryo), Body::Error(error))
                    if error.code == ErrorCode::Conflict.code() =>
                {
                    // Someone's change came first: the viewer takes the current version,
                    // and finds there its own saves whose answers were lost (else it would
                    // save them again on a version that already has them): kept ones are
                    // applied; one in flight (a resend, to be refused) is applied if that
                    // answer is lost too.
                    self.versions[embryo] = error.current_version;
                    self.reconcile(embryo, &error.current_json);
                }
                (
                    Pending::Read,
                    Body::ModelList(_)
                    | Body::Model(_)
                    | Body::EvaluationList(_)
                    | Body::Activity(_),
                ) => {}
                (Pending::Read, Body::Error(error)) if error.code == ErrorCode::Busy.code() => {}
                (pending, body) => panic!("step {}: {pending:?} answered by {body:?}", self.step),
            }
        }
        self.connection = Some(connection);
    }

    /// The viewer's saves of `embryo` found in its current state (a conflict's
    /// `current_json`), whose answers were lost: a kept one is applied (else it would be saved
    /// again on a version that already has it); one in flight (a resend, to be refused) is
    /// applied if that answer is lost too.
    fn reconcile(&mut self, embryo: usize, current_json: &str) {
        for edit in &mut self.edits {
            let mine = format!("\"value\":\"{}\"", edit.value);
            if edit.embryo != embryo || !current_json.contains(&mine) {
                continue;
            }
            match edit.state {
                EditState::Kept => {
                    edit.state = EditState::Applied;
                    self.totals.duplicates += 1;
                }
                EditState::InFlight => edit.seen_stored = true,
                EditState::Applied => {}
            }
        }
    }

    fn check_step(&self) {
        if let Some(connection) = &self.connection {
            check!(
                self,
                connection.pending.len() <= self.limits.inflight_requests_max as usize,
                "viewer has {} unanswered requests",
                connection.pending.len()
            );
            // The server closes a connection only by refusing its login.
            check!(
                self,
                !connection.server.state.closing || connection.inflight_max.is_none(),
                "the server closed an established connection"
            );
        }
    }

    /// The embryo as stored: its version and the values of its annotations.
    fn stored(&self, embryo: usize) -> (u64, Vec<String>) {
        let record = self
            .env
            .store()
            .read()
            .and_then(|reader| reader.embryo(&embryo_id(embryo)))
            .expect("the store reads")
            .expect("the embryo exists");
        let values = record.annotations.into_iter().map(|a| a.value).collect();
        (record.version, values)
    }

    /// Evaluations applied to each embryo, as the audit trail records them.
    fn evaluations_audited(&self) -> [u64; 2] {
        let reader = self.env.store().read().expect("the store reads");
        let mut counts = [0u64; 2];
        let mut after = 0;
        loop {
            let rows = reader.audit_after(after, 1000).expect("the audit reads");
            let Some(last) = rows.last() else {
                break;
            };
            after = last.seq;
            for row in &rows {
                if row.action == "embryo.evaluate"
                    && row.outcome == es_storage::AuditOutcome::Applied
                {
                    for (embryo, count) in counts.iter_mut().enumerate() {
                        if row.target == embryo_id(embryo) {
                            *count += 1;
                        }
                    }
                }
            }
        }
        counts
    }

    /// The embryo's stored result of the model, if it has one, is the model applied to its
    /// annotations as they are now.
    fn check_result(&self, embryo: usize) {
        let reader = self.env.store().read().expect("the store reads");
        let results = reader
            .model_results(&embryo_id(embryo))
            .expect("the results read")
            .expect("the embryo exists");
        let Some(result) = results.iter().find(|r| r.model == "sim") else {
            return;
        };
        let record = reader
            .embryo(&embryo_id(embryo))
            .expect("the store reads")
            .expect("the embryo exists");
        let model = es_models::Model::from_json(SIM_MODEL.as_bytes()).expect("the model reads");
        let expected = match model
            .evaluate(&crate::api::routes::model_inputs(&record.annotations))
            .outcome
        {
            es_models::Outcome::Category(category) => category,
            es_models::Outcome::Score(score) => score.to_string(),
            es_models::Outcome::NotAvailable(reason) => reason,
        };
        check!(
            self,
            result.value == expected,
            "embryo {embryo}: stored result {:?}, its annotations give {expected:?}",
            result.value
        );
    }

    fn check_end(&self) {
        let stored = [self.stored(0), self.stored(1)];
        let mut total = 0;
        for edit in &self.edits {
            let applied = stored[edit.embryo]
                .1
                .iter()
                .filter(|value| **value == edit.value)
                .count();
            check!(self, applied == 1, "{} applied {applied} times", edit.value);
            total += applied;
        }
        let annotations: usize = stored.iter().map(|(_, values)| values.len()).sum();
        check!(
            self,
            annotations == total + self.others as usize,
            "{annotations} annotations stored, {total} edits and {} by others",
            self.others
        );
        let evaluations = self.evaluations_audited();
        for (embryo, (version, values)) in stored.iter().enumerate() {
            check!(
                self,
                *version == self.first_versions[embryo] + values.len() as u64 + evaluations[embryo],
                "embryo {embryo} at version {version} with {} annotations and {} evaluations",
                values.len(),
                evaluations[embryo]
            );
            self.check_result(embryo);
        }
    }
}

fn send(connection: &mut Connection, pending: Pending, request: Request) {
    let seq = connection.next_seq;
    connection.next_seq += 1;
    connection.pending.insert(seq, pending);
    encode_frame(
        &pb::ClientMessage {
            seq,
            request: Some(request),
        },
        &mut connection.up.wire,
    );
}

fn world(seed: u64, trace: bool) -> Totals {
    World::new(seed, trace).run()
}

#[test]
fn viewer_saves_apply_exactly_once_across_drops_and_resumes() {
    let totals = run_seeds(
        "viewer",
        "esserver",
        "simulation::viewer::viewer_saves_apply_exactly_once_across_drops_and_resumes",
        RANDOM_SEEDS,
        world,
    );
    if std::env::var(SEED_VARIABLE).is_err() {
        assert!(totals.drops > 100, "{totals:?}");
        assert!(totals.lost_answers > 20, "{totals:?}");
        assert!(
            totals.duplicates > 20,
            "lost saves found applied: {totals:?}"
        );
        assert!(totals.refused_hellos > 10, "expired sessions: {totals:?}");
    }
}

#[test]
fn viewer_simulation_is_deterministic() {
    for seed in [7, 8] {
        assert_eq!(
            format!("{:?}", world(seed, false)),
            format!("{:?}", world(seed, false))
        );
    }
}
