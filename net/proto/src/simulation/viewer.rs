//! The viewer protocol under faults: a viewer that logs in, saves annotations with
//! `expected_version`, loses connections and answers, resumes (or logs in again when its
//! session expired) and saves what it kept; the real viewer [`ServerSession`] in front of a
//! small store of embryos with versions and a change log pushed as notices.
//!
//! Saves carry no idempotency key: what makes a resend safe is the version. A save whose
//! answer was lost is resent with the version the viewer had; if the first one was applied,
//! the resend is refused as a `conflict` carrying the current state, in which the viewer finds
//! its own annotation. Checked: every edit is applied exactly once, whatever was lost; change
//! notices arrive gapless and in order across resumes and new logins.

use std::collections::BTreeMap;

use super::{run_seeds, Pipe, Totals};
use crate::fuzzing::Noise;
use crate::viewer::pb::{self, client_message::Request, server_message::Body};
use crate::viewer::{
    encode_frame, error_message, ErrorCode, FrameDecoder, ServerEvent, ServerLimits, ServerSession,
    PROTOCOL_VERSION, RESPONSE_BYTES_MAX_DEFAULT,
};

const FAULTY_STEPS_MAX: u64 = 1_500;
const CALM_STEPS_MAX: u64 = 1_500;
const EMBRYOS: [&str; 2] = ["D1_E1", "D1_E2"];
/// Changes in the log before the viewer's first login.
const EARLIER_CHANGES: u64 = 3;

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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Pending {
    Login,
    Save(usize),
    Ping,
}

struct Connection {
    id: u64,
    up: Pipe,
    down: Pipe,
    // The viewer's side.
    next_seq: u64,
    pending: BTreeMap<u64, Pending>,
    decoder: FrameDecoder,
    inflight_max: Option<u32>,
    // The server's side.
    session: ServerSession,
    /// The token this connection's session uses, once accepted.
    token: Option<String>,
    /// The last change seq pushed on this connection (once established).
    pushed: Option<u64>,
}

struct Embryo {
    version: u64,
    /// (annotation_id, value).
    annotations: Vec<(u64, String)>,
}

struct Save {
    connection: u64,
    seq: u64,
    embryo: usize,
    expected_version: u64,
    value: String,
    due: u64,
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
    token: Option<String>,
    last_change_seq: u64,
    reconnect_at: u64,
    // The link and the server.
    connection: Option<Connection>,
    next_connection: u64,
    next_token: u64,
    sessions: BTreeMap<String, bool>,
    embryos: Vec<Embryo>,
    next_annotation: u64,
    changes: Vec<pb::ChangeNotice>,
    saves: Vec<Save>,
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
                embryo: noise.below(EMBRYOS.len()),
                value: format!("edit-{k}"),
                state: EditState::Kept,
            })
            .collect();
        let limits = ServerLimits {
            inflight_requests_max: 1 + noise.below(4) as u32,
            ..ServerLimits::default()
        };
        let changes = (1..=EARLIER_CHANGES)
            .map(|change_seq| pb::ChangeNotice {
                change_seq,
                entity: "instrument".into(),
                id: "ESP-0001".into(),
                ..Default::default()
            })
            .collect();
        World {
            seed,
            step: 0,
            trace,
            noise,
            calm: false,
            limits,
            edits,
            released: 0,
            versions: [1, 1],
            token: None,
            last_change_seq: 0,
            reconnect_at: 0,
            connection: None,
            next_connection: 1,
            next_token: 1,
            sessions: BTreeMap::new(),
            embryos: (0..EMBRYOS.len())
                .map(|_| Embryo {
                    version: 1,
                    annotations: Vec::new(),
                })
                .collect(),
            next_annotation: 1,
            changes,
            saves: Vec::new(),
            others: 0,
            totals: Totals::default(),
        }
    }

    fn log(&self, event: impl FnOnce() -> String) {
        if self.trace {
            eprintln!("[seed {} step {}] {}", self.seed, self.step, event());
        }
    }

    fn done(&self) -> bool {
        self.released == self.edits.len()
            && self
                .edits
                .iter()
                .all(|edit| edit.state == EditState::Applied)
            && self.last_change_seq == self.changes.len() as u64
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
                self.changes.len()
            );
            self.tick();
        }
        self.check_end();
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
        let mut actions = [0u8, 1, 2, 3, 4, 5];
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
                3 => self.store_commits(),
                4 => self.other_user_writes(),
                _ => self.viewer_reads(),
            }
        }
        if !self.calm && self.connection.is_some() && self.noise.below(120) == 0 {
            self.drop_connection();
        }
        if !self.calm && self.noise.below(400) == 0 {
            // The session expires (or an administrator ends it): the next Resume is refused.
            for alive in self.sessions.values_mut() {
                *alive = false;
            }
        }
        self.check_step();
    }

    fn connect(&mut self) {
        let id = self.next_connection;
        self.next_connection += 1;
        let mut connection = Connection {
            id,
            up: Pipe::new(&mut self.noise),
            down: Pipe::new(&mut self.noise),
            next_seq: 1,
            pending: BTreeMap::new(),
            decoder: FrameDecoder::new(RESPONSE_BYTES_MAX_DEFAULT),
            inflight_max: None,
            session: ServerSession::new(self.limits),
            token: None,
            pushed: None,
        };
        let request = match &self.token {
            Some(token) => Request::Resume(pb::Resume {
                protocol_version: PROTOCOL_VERSION,
                session_token: token.clone(),
                changes_after: self.last_change_seq,
            }),
            None => Request::Login(pb::Login {
                protocol_version: PROTOCOL_VERSION,
                user: "anna".into(),
                password: "Embryo-2026!".into(),
                computer: "VIEWER-1".into(),
                changes_after: self.last_change_seq,
                ..Default::default()
            }),
        };
        self.log(|| format!("connection {id} opened: {request:?}"));
        send(&mut connection, Pending::Login, request);
        self.connection = Some(connection);
    }

    fn drop_connection(&mut self) {
        let Some(connection) = self.connection.take() else {
            return;
        };
        self.totals.drops += 1;
        for edit in &mut self.edits {
            if edit.state == EditState::InFlight {
                edit.state = EditState::Kept;
            }
        }
        self.log(|| format!("connection {} dropped", connection.id));
        self.reconnect_at = self.step + self.noise.below(20) as u64;
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
            let request = Request::AddAnnotation(pb::AddAnnotation {
                embryo_id: EMBRYOS[edit.embryo].into(),
                expected_version: self.versions[edit.embryo],
                annotation: Some(pb::AnnotationInput {
                    name: "t2".into(),
                    value: edit.value.clone(),
                    ..Default::default()
                }),
            });
            if self.trace {
                eprintln!(
                    "[seed {} step {}] connection {}: save {request:?}",
                    self.seed, self.step, connection.id
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

    fn server_reads(&mut self) {
        let Some(mut connection) = self.connection.take() else {
            return;
        };
        // A refused Resume closed the session: the server reads no more, and closes.
        while !connection.session.is_closed() {
            let event = match connection.session.poll_event(&mut connection.up.inbox) {
                Ok(Some(event)) => event,
                Ok(None) => break,
                Err(error) => panic!("step {}: server session error: {error}", self.step),
            };
            let out = &mut connection.down.wire;
            match event {
                ServerEvent::Login(_, login) => {
                    let token = format!("token-{:032}", self.next_token);
                    self.next_token += 1;
                    self.sessions.insert(token.clone(), true);
                    let after = if login.changes_after == 0 {
                        self.changes.len() as u64
                    } else {
                        login.changes_after
                    };
                    self.accept(&mut connection, token, after);
                }
                ServerEvent::Resume(_, resume) => {
                    if self.sessions.get(&resume.session_token) == Some(&true) {
                        self.accept(&mut connection, resume.session_token, resume.changes_after);
                    } else {
                        connection.session.refuse_login(
                            ErrorCode::SessionExpired,
                            "log in again",
                            out,
                        );
                    }
                }
                ServerEvent::Request(seq, Request::Ping(_)) => {
                    connection
                        .session
                        .respond(seq, Body::Done(pb::Done {}), out);
                }
                ServerEvent::Request(seq, Request::AddAnnotation(add)) => {
                    let embryo = EMBRYOS
                        .iter()
                        .position(|id| *id == add.embryo_id)
                        .expect("a known embryo");
                    let value = add.annotation.map(|a| a.value).unwrap_or_default();
                    let delay = if self.calm {
                        0
                    } else {
                        self.noise.below(30) as u64
                    };
                    self.saves.push(Save {
                        connection: connection.id,
                        seq,
                        embryo,
                        expected_version: add.expected_version,
                        value,
                        due: self.step + delay,
                    });
                }
                ServerEvent::Request(seq, other) => {
                    panic!("step {}: unexpected request {seq} {other:?}", self.step)
                }
            }
        }
        self.connection = Some(connection);
    }

    fn accept(&mut self, connection: &mut Connection, token: String, after: u64) {
        connection.session.accept_login(
            pb::LoginOk {
                session_token: token.clone(),
                user: "anna".into(),
                rights: "edit".into(),
                last_change_seq: self.changes.len() as u64,
                resume_seconds: 600,
                ..Default::default()
            },
            &mut connection.down.wire,
        );
        connection.token = Some(token);
        connection.pushed = Some(after);
        self.push_notices(connection);
    }

    /// Pushes every change after the connection's cursor, in order.
    fn push_notices(&self, connection: &mut Connection) {
        let Some(pushed) = connection.pushed else {
            return;
        };
        if connection.session.is_closed() {
            return;
        }
        for notice in &self.changes[pushed as usize..] {
            connection
                .session
                .push(notice.clone(), &mut connection.down.wire);
        }
        connection.pushed = Some(self.changes.len() as u64);
    }

    fn commit_change(&mut self, embryo: usize) -> u64 {
        let change_seq = self.changes.len() as u64 + 1;
        self.changes.push(pb::ChangeNotice {
            change_seq,
            entity: "embryo".into(),
            id: EMBRYOS[embryo].into(),
            version: self.embryos[embryo].version,
            ..Default::default()
        });
        if let Some(mut connection) = self.connection.take() {
            self.push_notices(&mut connection);
            self.connection = Some(connection);
        }
        change_seq
    }

    /// Somebody else annotates an embryo: its version moves on under the viewer.
    fn other_user_writes(&mut self) {
        if self.calm || self.noise.below(25) != 0 {
            return;
        }
        let embryo = self.noise.below(EMBRYOS.len());
        let annotation = self.next_annotation;
        self.next_annotation += 1;
        self.others += 1;
        let target = &mut self.embryos[embryo];
        target.version += 1;
        target
            .annotations
            .push((annotation, format!("other-{annotation}")));
        self.commit_change(embryo);
    }

    /// Commits due saves in any order; a stale expected_version is a conflict carrying the
    /// current state. The answer goes out only if its connection is still there.
    fn store_commits(&mut self) {
        let budget = if self.calm {
            usize::MAX
        } else {
            1 + self.noise.below(4)
        };
        for _ in 0..budget {
            let due: Vec<usize> = (0..self.saves.len())
                .filter(|index| self.saves[*index].due <= self.step)
                .collect();
            if due.is_empty() {
                break;
            }
            let save = self.saves.swap_remove(due[self.noise.below(due.len())]);
            let embryo = &mut self.embryos[save.embryo];
            let body = if save.expected_version == embryo.version {
                let annotation_id = self.next_annotation;
                self.next_annotation += 1;
                embryo.version += 1;
                embryo.annotations.push((annotation_id, save.value.clone()));
                let version = embryo.version;
                let change_seq = self.commit_change(save.embryo);
                Body::Saved(pb::Saved {
                    entity: "embryo".into(),
                    id: EMBRYOS[save.embryo].into(),
                    version,
                    change_seq,
                    annotation_id,
                })
            } else {
                let annotations: Vec<String> = embryo
                    .annotations
                    .iter()
                    .map(|(id, value)| {
                        format!("{{\"annotation_id\":{id},\"name\":\"t2\",\"value\":\"{value}\"}}")
                    })
                    .collect();
                let current_json = format!(
                    "{{\"embryo_id\":\"{}\",\"version\":{},\"annotations\":[{}]}}",
                    EMBRYOS[save.embryo],
                    embryo.version,
                    annotations.join(",")
                );
                let mut error = error_message(save.seq, ErrorCode::Conflict, "stale version");
                if let Some(Body::Error(inner)) = &mut error.body {
                    inner.current_version = embryo.version;
                    inner.current_json = current_json;
                }
                error.body.expect("an error body")
            };
            match self.connection.as_mut() {
                Some(connection) if connection.id == save.connection => {
                    connection
                        .session
                        .respond(save.seq, body, &mut connection.down.wire);
                }
                _ => {
                    self.totals.lost_answers += 1;
                    self.log(|| format!("answer to save {} lost: {body:?}", save.value));
                }
            }
        }
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
                    connection.id
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
                (Pending::Login, Body::Error(error))
                    if error.code == ErrorCode::SessionExpired.code() =>
                {
                    // The injected expiry: log in again on a new connection.
                    self.token = None;
                    self.connection = Some(connection);
                    self.drop_connection();
                    self.reconnect_at = self.step;
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
                    self.versions[edit.embryo] = error.current_version;
                    let mine = format!("\"value\":\"{}\"", edit.value);
                    if error.current_json.contains(&mine) {
                        // Its earlier save, whose answer was lost, was applied.
                        edit.state = EditState::Applied;
                        self.totals.duplicates += 1;
                    } else {
                        // Someone else's change came first: save again on the new version.
                        edit.state = EditState::Kept;
                    }
                }
                (pending, body) => panic!("step {}: {pending:?} answered by {body:?}", self.step),
            }
        }
        self.connection = Some(connection);
    }

    fn check_step(&self) {
        if let Some(connection) = &self.connection {
            check!(
                self,
                connection.session.inflight() <= self.limits.inflight_requests_max,
                "server in flight {}",
                connection.session.inflight()
            );
            check!(
                self,
                connection.pending.len() <= self.limits.inflight_requests_max as usize,
                "viewer has {} unanswered requests",
                connection.pending.len()
            );
        }
        for (embryo, state) in self.embryos.iter().enumerate() {
            let expected = 1 + state.annotations.len() as u64;
            check!(self, state.version == expected, "embryo {embryo} version");
        }
    }

    fn check_end(&self) {
        let mut total = 0;
        for edit in &self.edits {
            let applied = self.embryos[edit.embryo]
                .annotations
                .iter()
                .filter(|(_, value)| *value == edit.value)
                .count();
            check!(self, applied == 1, "{} applied {applied} times", edit.value);
            total += applied;
        }
        let stored: usize = self.embryos.iter().map(|e| e.annotations.len()).sum();
        check!(
            self,
            stored == total + self.others as usize,
            "{stored} annotations stored, {total} edits and {} by others",
            self.others
        );
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
        "es-proto",
        "simulation::viewer::viewer_saves_apply_exactly_once_across_drops_and_resumes",
        super::RANDOM_SEEDS_DEFAULT,
        world,
    );
    if std::env::var(super::SEED_VARIABLE).is_err() {
        assert!(totals.drops > 100, "{totals:?}");
        assert!(totals.lost_answers > 20, "{totals:?}");
        assert!(
            totals.duplicates > 20,
            "lost saves found applied: {totals:?}"
        );
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
