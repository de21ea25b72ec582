//! kill -9 at random moments of a mixed workload, 50 times, restarting on the same data
//! directory. Four writers run at once in every round: an incubator uploading images, a
//! second incubator sending telemetry (queued for the monitoring upload, which has no
//! endpoint here so everything stays queued), a public API client writing scores and
//! transfers with Idempotency-Key, and a viewer saving annotations. Each records only what
//! was acknowledged before the kill; a write cut off by the kill is unknown and is sent again
//! after the restart. At the end every acknowledged write is in the database with the value
//! acknowledged, the retried API writes were applied once, every telemetry sample is queued
//! once, the change log has no gaps and `verify` is clean. The schedule comes from a seed,
//! printed so a failure can be replayed (ESSERVER_CRASH_SEED=<seed>).

mod common;

use es_loadtest::client::{ClientError, Identity, IncubatorClient};
use es_loadtest::http_client::HttpClient;
use es_loadtest::sim::{self, Pacing, Workload};
use es_loadtest::spawn::{ServerInfo, ServerProcess};
use es_loadtest::viewer_client::{Credentials, ViewerClient, ViewerError};
use es_perf::catalog::DeviceModel;
use es_proto::incubator::{pb, Message};
use es_proto::viewer::pb as vpb;
use es_proto::viewer::pb::{client_message::Request, server_message::Body};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

const KILL_POINTS: u32 = 50;
/// Load before each kill: a random duration in this range (ms).
const LOAD_MS: std::ops::Range<u64> = 20..300;

const IMAGE_SERIAL: &str = "CRASH-IMG";
const TELEMETRY_SERIAL: &str = "CRASH-TEL";
const PASSWORD: &str = "Embryo-2026!";
const VIEWER_USER: &str = "crashviewer";
/// Annotation saves of the viewer per round at most.
const VIEWER_SAVES_PER_ROUND: u32 = 15;
/// Images per round at most, so the run stays small in bytes (a frame is about 30 KB), and
/// their pace, so that uploads are in flight when the kill comes.
const IMAGES_PER_ROUND: u64 = 40;
const IMAGE_INTERVAL: Duration = Duration::from_millis(8);
/// Telemetry messages per round at most, so the queue stays well within one read batch, and
/// the pause between them.
const TELEMETRY_MESSAGES_PER_ROUND: u64 = 60;
const TELEMETRY_PAUSE: Duration = Duration::from_millis(4);
const TELEMETRY_CHANNELS: [&str; 2] = ["temperature_c", "co2_percent"];
const TELEMETRY_T0: i64 = 1_770_000_000_000;
const SCORE_MODEL: &str = "CrashScore";
const ANNOTATION_NAME: &str = "crashmix";

/// The images of one EmbryoScope+ (2 capacity units): a few small dishes, many cycles.
fn image_workload() -> Workload {
    Workload {
        serial: IMAGE_SERIAL.into(),
        model: DeviceModel::EmbryoScopePlus,
        dishes: 2,
        wells_per_dish: 4,
        planes: vec![0, 1, 2],
        cycles: 64,
        start_ms: common::START_MS,
        interval_ms: 600_000,
    }
}

/// The embryo the viewer annotates, the one the API scores, and the treatment (patient id,
/// name) and embryo of the API's transfers.
fn viewer_embryo() -> String {
    format!("{IMAGE_SERIAL}_S1_P-1")
}
fn scored_embryo() -> String {
    format!("{IMAGE_SERIAL}_S1_P-3")
}
fn transfer_treatment() -> (String, String) {
    (format!("MRN-{IMAGE_SERIAL}-2"), "2026-1001".into())
}
fn transferred_embryo() -> String {
    format!("{IMAGE_SERIAL}_S2_P-1")
}

// ---------------------------------------------------------------- the image incubator

struct Images {
    identity: Identity,
    workload: Workload,
    frames: Vec<bytes::Bytes>,
    acked: BTreeSet<u64>,
    /// Images sent and not answered before a kill.
    cut_off: u64,
}

impl Images {
    fn round(mut self, server: &ServerInfo) -> Images {
        let Ok(mut client) = IncubatorClient::connect(
            server.address("incubator"),
            &server.client_tls("incubator"),
            &mut self.identity,
            common::TIMEOUT,
        ) else {
            return self;
        };
        // Resume from the first image not acknowledged yet.
        let len = self.workload.len();
        let from = (0..len).find(|i| !self.acked.contains(i)).unwrap_or(len);
        let to = (from + IMAGES_PER_ROUND).min(len);
        let deadline = Instant::now() + Duration::from_secs(60);
        let (stats, _error) = sim::upload(
            &mut client,
            &self.workload,
            from..to,
            &self.frames,
            Pacing::OpenLoop {
                start: Instant::now(),
                interval: IMAGE_INTERVAL,
            },
            deadline,
        );
        assert!(stats.errors.is_empty(), "image errors: {:?}", stats.errors);
        self.cut_off += stats.sent - stats.acked;
        self.acked.extend(stats.acked_indexes);
        self
    }
}

// ---------------------------------------------------------------- the telemetry incubator

struct Telemetry {
    identity: Identity,
    /// Messages 0..next were acknowledged; message `next` may have been cut off.
    next: u64,
    /// Messages sent again after their answer was lost to a kill.
    resent: u64,
    unknown: bool,
}

fn telemetry_message(n: u64) -> Message {
    let at_ms = TELEMETRY_T0 + n as i64 * 1000;
    Message::Telemetry(pb::Telemetry {
        seq: 0,
        samples: TELEMETRY_CHANNELS
            .iter()
            .enumerate()
            .map(|(i, channel)| pb::TelemetrySample {
                channel: channel.to_string(),
                value: telemetry_value(n, i),
                at_ms,
            })
            .collect(),
        alarms: vec![],
    })
}

fn telemetry_value(n: u64, channel: usize) -> f64 {
    [37.0, 6.0][channel] + (n % 100) as f64 / 1000.0
}

impl Telemetry {
    /// Sends up to `messages` messages; false when the connection failed.
    fn send(&mut self, server: &ServerInfo, messages: u64, pause: Duration) -> bool {
        let Ok(mut client) = IncubatorClient::connect(
            server.address("incubator"),
            &server.client_tls("incubator"),
            &mut self.identity,
            common::TIMEOUT,
        ) else {
            return false;
        };
        for _ in 0..messages {
            if self.unknown {
                self.resent += 1;
            }
            self.unknown = true;
            match client.request(telemetry_message(self.next), common::TIMEOUT) {
                Ok(Message::Ack(_)) => {
                    self.next += 1;
                    self.unknown = false;
                    std::thread::sleep(pause);
                }
                Ok(other) => panic!("telemetry {} answered {other:?}", self.next),
                Err(ClientError::Server { name, .. }) if name == "busy" => {}
                Err(_) => return false,
            }
        }
        true
    }

    fn round(mut self, server: &ServerInfo) -> Telemetry {
        self.send(server, TELEMETRY_MESSAGES_PER_ROUND, TELEMETRY_PAUSE);
        self
    }
}

// ---------------------------------------------------------------- the public API client

#[derive(Debug, Clone)]
enum ApiWrite {
    /// PUT a score `n` with If-Match of the version seen.
    Score { n: u64, if_match: u64 },
    /// POST a transfer whose comment is `xfer-n`.
    Transfer { n: u64 },
}

#[derive(Default)]
struct Api {
    key: String,
    next: u64,
    /// The write cut off by a kill, sent again (same Idempotency-Key) before any other.
    pending: Option<ApiWrite>,
    score_version: u64,
    /// (n, version) of each acknowledged score, in order.
    scores: Vec<(u64, u64)>,
    /// n -> transfer id of each acknowledged transfer.
    transfers: BTreeMap<u64, u64>,
    /// Writes sent again after a kill, and how many of them the server answered as replays.
    retried: u64,
    replayed: u64,
}

impl Api {
    fn request(write: &ApiWrite) -> (&'static str, String, String, Value) {
        match write {
            ApiWrite::Score { n, .. } => (
                "PUT",
                format!("/api/v1/embryos/{}/scores/{SCORE_MODEL}", scored_embryo()),
                format!("score-{n}"),
                json!({"value": n.to_string(), "model_version": "1.0", "viability": "high"}),
            ),
            ApiWrite::Transfer { n } => {
                let (patient, treatment) = transfer_treatment();
                (
                    "POST",
                    format!("/api/v1/patients/{patient}/treatments/{treatment}/transfers"),
                    format!("xfer-{n}"),
                    json!({"transferred_at": "2025-10-14T09:30:00Z",
                           "embryo_ids": [transferred_embryo()], "comment": format!("xfer-{n}")}),
                )
            }
        }
    }

    /// Sends up to `writes` writes (the pending one first); false when the connection failed
    /// (the write in flight stays pending).
    fn send(&mut self, server: &ServerInfo, writes: u64) -> bool {
        let mut http = HttpClient::new(
            server.address("public-api"),
            server.client_tls("public-api"),
            common::TIMEOUT,
        );
        let auth = format!("Bearer {}", self.key);
        let mut done = 0;
        while done < writes {
            let retry = self.pending.is_some();
            let write = self.pending.take().unwrap_or_else(|| {
                let n = self.next;
                self.next += 1;
                if n % 2 == 0 {
                    ApiWrite::Score {
                        n,
                        if_match: self.score_version,
                    }
                } else {
                    ApiWrite::Transfer { n }
                }
            });
            let (method, path, key, body) = Api::request(&write);
            let if_match = match write {
                ApiWrite::Score { if_match, .. } => Some(format!("\"{if_match}\"")),
                ApiWrite::Transfer { .. } => None,
            };
            let mut headers = vec![
                ("authorization", auth.as_str()),
                ("idempotency-key", key.as_str()),
                ("content-type", "application/json"),
            ];
            if let Some(if_match) = &if_match {
                headers.push(("if-match", if_match.as_str()));
            }
            let body = body.to_string();
            self.pending = Some(write.clone());
            let response = match http.request(method, &path, &headers, Some(body.as_bytes())) {
                Ok(response) => response,
                Err(_) => return false,
            };
            if response.status == 503 {
                continue;
            }
            assert!(
                (200..300).contains(&response.status),
                "{method} {path} ({key}, retry {retry}): {} {}",
                response.status,
                String::from_utf8_lossy(&response.body)
            );
            self.pending = None;
            done += 1;
            if retry {
                self.retried += 1;
            }
            if response.header("idempotent-replayed") == Some("true") {
                self.replayed += 1;
            }
            let answer = response.json();
            match write {
                ApiWrite::Score { n, .. } => {
                    let version = answer["version"].as_u64().expect("version answered");
                    let value = answer["scores"]
                        .as_array()
                        .and_then(|s| s.iter().find(|s| s["model"] == SCORE_MODEL))
                        .map(|s| s["value"].clone());
                    assert_eq!(value, Some(json!(n.to_string())), "{answer}");
                    self.score_version = version;
                    self.scores.push((n, version));
                }
                ApiWrite::Transfer { n } => {
                    assert_eq!(answer["comment"], format!("xfer-{n}"), "{answer}");
                    let id = answer["transfer_id"]
                        .as_u64()
                        .expect("transfer id answered");
                    self.transfers.insert(n, id);
                }
            }
        }
        true
    }

    fn round(mut self, server: &ServerInfo) -> Api {
        self.send(server, u64::MAX);
        self
    }
}

// ---------------------------------------------------------------- the viewer

#[derive(Default)]
struct Viewer {
    next: u64,
    /// annotation id -> value of each acknowledged save.
    saved: BTreeMap<u64, String>,
}

impl Viewer {
    fn round(mut self, server: &ServerInfo) -> Viewer {
        let credentials = Credentials {
            user: VIEWER_USER.into(),
            password: PASSWORD.into(),
            computer: "CRASH-VIEWER".into(),
        };
        let Ok(mut client) = ViewerClient::login(
            server.address("viewer"),
            &server.client_tls("viewer"),
            &credentials,
            common::TIMEOUT,
        ) else {
            return self;
        };
        // A save cut off by the last kill may have been applied: start from what is stored.
        let mut version = match client.call(Request::GetEmbryo(vpb::GetEmbryo {
            embryo_id: viewer_embryo(),
        })) {
            Ok(Body::Embryo(embryo)) => embryo.version,
            Ok(other) => panic!("unexpected {other:?}"),
            Err(error) => return self.ended_by(error),
        };
        // An embryo holds at most 1,000 annotations: 50 rounds of at most 15 saves stay below.
        for _ in 0..VIEWER_SAVES_PER_ROUND {
            let value = format!("a{}", self.next);
            self.next += 1;
            let save = Request::AddAnnotation(vpb::AddAnnotation {
                embryo_id: viewer_embryo(),
                expected_version: version,
                annotation: Some(vpb::AnnotationInput {
                    name: ANNOTATION_NAME.into(),
                    value: value.clone(),
                    event_at_ms: 0,
                    has_event: false,
                    source: "manual".into(),
                }),
            });
            match client.call(save) {
                Ok(Body::Saved(saved)) => {
                    assert_eq!(saved.version, version + 1, "{saved:?}");
                    version = saved.version;
                    self.saved.insert(saved.annotation_id, value);
                }
                Ok(other) => panic!("unexpected {other:?}"),
                Err(error) => return self.ended_by(error),
            }
        }
        self
    }

    /// The server vanishing ends a round, and so does `busy` (overloaded: nothing was
    /// written, the next round goes on); any other error answer is a failure.
    fn ended_by(self, error: ViewerError) -> Viewer {
        if let ViewerError::Server { name, .. } = &error {
            assert_eq!(name, "busy", "viewer save refused: {error}");
        }
        self
    }
}

// ---------------------------------------------------------------- the test

fn seed() -> u64 {
    std::env::var("ESSERVER_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}

fn ims_status(server: &ServerProcess) -> Value {
    common::admin_json(server.data_dir(), &["ims", "status"])
}

/// Runs one writer's round on its own thread against the server described by `info`.
fn spawn_round<T: Send + 'static>(
    info: &ServerInfo,
    round: impl FnOnce(&ServerInfo) -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let info = info.clone();
    std::thread::spawn(move || round(&info))
}

#[test]
fn kill_9_during_a_mixed_workload_loses_no_acknowledged_write() {
    let seed = seed();
    println!("crash schedule seed: {seed} (replay with ESSERVER_CRASH_SEED={seed})");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::spawn_in(&dir, false, "[IMS]\nreceive = on\n");

    // Set up once, before any kill: the users, the key, the dishes, each instrument's secret.
    common::add_user(&server, VIEWER_USER, "edit", PASSWORD);
    let key = common::create_api_key(&server, "crash EMR", "write");
    let mut images = Images {
        identity: common::identity(IMAGE_SERIAL, "es-plus"),
        workload: image_workload(),
        frames: es_loadtest::frames::generate(4, seed),
        acked: BTreeSet::new(),
        cut_off: 0,
    };
    let mut client = common::connect(&server, &mut images.identity);
    sim::register_dishes(&mut client, &images.workload, common::TIMEOUT).unwrap();
    drop(client);
    let mut telemetry = Telemetry {
        identity: common::identity(TELEMETRY_SERIAL, "es-8"),
        next: 0,
        resent: 0,
        unknown: false,
    };
    drop(common::connect(&server, &mut telemetry.identity));
    let mut api = Api {
        key,
        score_version: 1,
        ..Api::default()
    };
    let mut viewer = Viewer::default();

    let started = Instant::now();
    for round in 0..KILL_POINTS {
        let load = Duration::from_millis(rng.random_range(LOAD_MS));
        let info = &server.info;
        let threads = (
            spawn_round(info, move |info| images.round(info)),
            spawn_round(info, move |info| telemetry.round(info)),
            spawn_round(info, move |info| api.round(info)),
            spawn_round(info, move |info| viewer.round(info)),
        );
        std::thread::sleep(load);
        server.kill9();
        let (i, t, a, v) = (
            threads.0.join().unwrap(),
            threads.1.join().unwrap(),
            threads.2.join().unwrap(),
            threads.3.join().unwrap(),
        );
        (images, telemetry, api, viewer) = (i, t, a, v);
        println!(
            "round {round}: killed after {load:?}; acked so far: {} images, {} telemetry \
             messages, {} API writes, {} viewer saves",
            images.acked.len(),
            telemetry.next,
            api.scores.len() + api.transfers.len(),
            viewer.saved.len()
        );
        server
            .restart()
            .unwrap_or_else(|e| panic!("round {round}: the database opens again: {e}"));
    }
    let load_time = started.elapsed();

    // What a kill cut off is sent again until answered: then every write is acknowledged.
    assert!(
        telemetry.send(&server.info, 1, Duration::ZERO),
        "telemetry after the last restart"
    );
    assert!(api.send(&server.info, 1), "API after the last restart");
    assert!(!telemetry.unknown && api.pending.is_none());
    let samples = telemetry.next * TELEMETRY_CHANNELS.len() as u64;
    let status = ims_status(&server);
    assert_eq!(
        status["queue"]["records"].as_u64(),
        Some(samples),
        "every acknowledged sample queued once: {status}"
    );
    assert_eq!(server.terminate(Duration::from_secs(30)), Some(0));
    let data = server.data_dir().to_path_buf();
    drop(server);

    let store =
        es_storage::Store::open(&data, &es_storage::StoreOptions::default(), [0; 16]).unwrap();
    let reader = store.read().unwrap();

    // Images: every acknowledged one present and byte-identical.
    let instrument = reader
        .instrument_by_serial(IMAGE_SERIAL)
        .unwrap()
        .expect("instrument recorded");
    for &index in &images.acked {
        let spec = images.workload.image(index);
        let stored = reader
            .image(
                instrument.instrument_id,
                &spec.dish_id,
                spec.well,
                spec.focal_plane,
                spec.acquired_at_ms,
            )
            .unwrap()
            .unwrap_or_else(|| panic!("acknowledged image {index} ({spec:?}) missing"));
        let sent = &images.frames[(index % images.frames.len() as u64) as usize];
        assert!(
            Sha256::digest(&stored) == Sha256::digest(sent),
            "image {index} differs"
        );
    }
    let stats = reader.stats().unwrap();
    assert!(stats.images >= images.acked.len() as u64, "{stats:?}");

    // Telemetry: every sample stored and queued exactly once.
    assert_eq!(stats.telemetry_samples, samples, "{stats:?}");
    let queue = reader.ims_batch(u32::MAX, u64::MAX).unwrap();
    assert_eq!(queue.len() as u64, samples);
    let mut queued = BTreeMap::new();
    for record in &queue {
        assert_eq!(record.serial, TELEMETRY_SERIAL);
        let es_storage::ims::ImsRecordBody::Sample {
            channel,
            value,
            at_ms,
        } = &record.body
        else {
            panic!("not a sample: {record:?}");
        };
        let n = ((at_ms - TELEMETRY_T0) / 1000) as u64;
        let index = TELEMETRY_CHANNELS
            .iter()
            .position(|c| c == channel)
            .unwrap_or_else(|| panic!("unexpected channel {channel}"));
        assert_eq!(*value, telemetry_value(n, index), "{record:?}");
        assert!(
            queued.insert((n, index), record.id).is_none(),
            "sample {n} {channel} queued twice"
        );
    }
    assert_eq!(
        queued.keys().map(|(n, _)| *n).collect::<BTreeSet<_>>(),
        (0..telemetry.next).collect::<BTreeSet<_>>(),
        "every acknowledged message's samples are queued"
    );

    // API writes: every acknowledged score in order, the last one current, each applied once
    // (the embryo's version counts them); every transfer once.
    let scored = reader.embryo(&scored_embryo()).unwrap().unwrap();
    assert!(
        api.scores
            .iter()
            .map(|(_, v)| *v)
            .eq(2..2 + api.scores.len() as u64),
        "one version per acknowledged score"
    );
    assert_eq!(scored.version, 1 + api.scores.len() as u64);
    if let Some((n, _)) = api.scores.last() {
        let score = scored.scores.iter().find(|s| s.model == SCORE_MODEL);
        assert_eq!(score.map(|s| s.value.clone()), Some(n.to_string()));
    }
    let (patient, treatment) = transfer_treatment();
    let transfers = reader
        .treatment_transfers(&patient, &treatment)
        .unwrap()
        .unwrap();
    let stored: BTreeMap<u64, String> = transfers
        .iter()
        .map(|t| (t.transfer_key, t.comment.clone()))
        .collect();
    assert_eq!(stored.len(), transfers.len());
    let acked: BTreeMap<u64, String> = api
        .transfers
        .iter()
        .map(|(n, id)| (*id, format!("xfer-{n}")))
        .collect();
    assert_eq!(stored, acked, "every transfer stored once, none more");

    // Viewer saves: every acknowledged annotation with its value.
    let annotated = reader.embryo(&viewer_embryo()).unwrap().unwrap();
    let annotations: BTreeMap<u64, String> = annotated
        .annotations
        .iter()
        .map(|a| (a.annotation_id, a.value.clone()))
        .collect();
    for (id, value) in &viewer.saved {
        assert_eq!(
            annotations.get(id),
            Some(value),
            "acknowledged annotation {id}"
        );
    }
    assert_eq!(annotated.version, 1 + annotations.len() as u64);

    // The change log: gapless from its oldest entry to the last seq, and each embryo's
    // versions appear in it one by one.
    let last = reader.last_change_seq().unwrap();
    let mut after = 0;
    let mut seqs = Vec::new();
    let mut embryo_versions: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    loop {
        let page = match reader.changes_after(after, 1000) {
            Ok(page) => page,
            Err(es_storage::StorageError::CursorExpired { oldest }) if seqs.is_empty() => {
                after = oldest.saturating_sub(1);
                continue;
            }
            Err(error) => panic!("changes after {after}: {error}"),
        };
        let Some(tail) = page.last() else { break };
        after = tail.seq;
        for change in page {
            seqs.push(change.seq);
            if change.entity == es_storage::ChangeEntity::Embryo {
                embryo_versions
                    .entry(change.id.clone())
                    .or_default()
                    .push(change.version);
            }
        }
    }
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "change log gap");
    assert_eq!(seqs.last().copied(), Some(last));
    for embryo in [&scored, &annotated] {
        // Version 1 is the embryo's registration, then one change per write.
        let versions = embryo_versions
            .remove(&embryo.embryo_id)
            .unwrap_or_default();
        assert!(
            versions.iter().copied().eq(1..=embryo.version),
            "changes of {} (version {}): {} entries, first {:?}, last {:?}",
            embryo.embryo_id,
            embryo.version,
            versions.len(),
            versions.first(),
            versions.last()
        );
    }
    drop(reader);

    // Invariants: counters match the tables, every image has its dish and well, no gaps.
    let report = store.verify(&mut |_| {}).unwrap();
    assert!(report.is_clean(), "verify after crashes: {report:?}");

    println!(
        "{KILL_POINTS} kill points in {load_time:?}; acknowledged: {} images ({} cut off by a kill), {} \
         telemetry samples ({} messages resent after a lost answer), {} API writes ({} scores, {} \
         transfers; {} sent again after a kill, {} of them replayed), {} viewer annotation saves",
        images.acked.len(),
        images.cut_off,
        samples,
        telemetry.resent,
        api.scores.len() + api.transfers.len(),
        api.scores.len(),
        api.transfers.len(),
        api.retried,
        api.replayed,
        viewer.saved.len()
    );
    assert!(!images.acked.is_empty() && telemetry.next > 0);
    assert!(!api.scores.is_empty() && !api.transfers.is_empty() && !viewer.saved.is_empty());
}
