//! Instrument monitoring (IMS) against a real server and a local HTTP sink on loopback:
//! the uploader survives a flaky and a downed endpoint, a kill -9, and a full queue, and no
//! patient data ever reaches the endpoint.

mod common;

use common::TIMEOUT;
use es_loadtest::client::IncubatorClient;
use es_loadtest::http_client::HttpClient;
use es_loadtest::sim::Workload;
use es_loadtest::spawn::ServerProcess;
use es_perf::catalog::DeviceModel;
use es_proto::incubator::{pb, Message};
use flate2::read::GzDecoder;
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const T0: i64 = 1_770_000_000_000;

/// What the sink does with the n-th request (deterministic: 3 in 10 fail, one way each).
#[derive(Debug, Clone, PartialEq)]
enum Fate {
    /// Answers 302 to another address.
    Redirect(String),
    Accept,
    /// Answers 500 without keeping anything.
    ServerError,
    /// Closes before reading the body.
    CloseEarly,
    /// Keeps the batch, then closes without answering: the server must send it again, and
    /// the sink drops the duplicate ids.
    LoseAnswer,
}

#[derive(Default)]
struct Received {
    requests: u64,
    failed: u64,
    /// Every decompressed request body the sink kept, plus every raw byte it read.
    bodies: Vec<Vec<u8>>,
    raw: Vec<u8>,
    /// record id -> the record, after de-duplication by id.
    records: HashMap<String, serde_json::Value>,
    duplicate_ids: u64,
    /// Every request whose body arrived whole: when, its bytes on the wire (head and body),
    /// and the (serial, id) of its records in order.
    arrivals: Vec<Arrival>,
}

/// One accepted request: when it arrived, its bytes on the wire, its (serial, id) records.
type Arrival = (Instant, u64, Vec<(String, String)>);

/// How the sink behaves.
#[derive(Clone)]
enum Mode {
    /// Plain HTTP; `flaky` fails 3 requests in 10.
    Plain { flaky: bool },
    /// HTTPS with this server configuration.
    Tls(std::sync::Arc<rustls::ServerConfig>),
    /// Answers every request with a redirect to this URL.
    Redirect(String),
}

struct Sink {
    port: u16,
    received: Arc<Mutex<Received>>,
    down: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Sink {
    /// Listens on `port` (0: any free port); `flaky` fails 3 requests in 10.
    fn start(port: u16, flaky: bool) -> Sink {
        Sink::with_mode(port, Mode::Plain { flaky })
    }

    fn with_mode(port: u16, mode: Mode) -> Sink {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("sink binds");
        let port = listener.local_addr().unwrap().port();
        let received = Arc::new(Mutex::new(Received::default()));
        let down = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (received, down, stop) = (received.clone(), down.clone(), stop.clone());
            std::thread::spawn(move || serve(listener, port, mode, &received, &down, &stop))
        };
        Sink {
            port,
            received,
            down,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/ims/upload", self.port)
    }

    fn records(&self) -> HashMap<String, serde_json::Value> {
        self.received.lock().unwrap().records.clone()
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(
    listener: TcpListener,
    port: u16,
    mode: Mode,
    received: &Mutex<Received>,
    down: &AtomicBool,
    stop: &AtomicBool,
) {
    let mut listener = Some(listener);
    let mut count = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if down.load(Ordering::Relaxed) {
            // Down: the port is closed, so connections are refused.
            listener = None;
            std::thread::sleep(Duration::from_millis(5));
            continue;
        }
        let active = match &listener {
            Some(listener) => listener,
            None => {
                listener = Some(TcpListener::bind(("127.0.0.1", port)).expect("sink rebinds"));
                continue;
            }
        };
        active.set_nonblocking(true).unwrap();
        let stream = match active.accept() {
            Ok((stream, _)) => stream,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(2));
                continue;
            }
        };
        stream.set_nonblocking(false).unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        count += 1;
        match &mode {
            Mode::Plain { flaky } => {
                let fate = match (flaky, count % 10) {
                    (true, 2) => Fate::ServerError,
                    (true, 5) => Fate::CloseEarly,
                    (true, 8) => Fate::LoseAnswer,
                    _ => Fate::Accept,
                };
                handle(stream, fate, received);
            }
            Mode::Tls(config) => {
                let connection = rustls::ServerConnection::new(config.clone()).unwrap();
                handle(
                    rustls::StreamOwned::new(connection, stream),
                    Fate::Accept,
                    received,
                );
            }
            Mode::Redirect(location) => {
                handle(stream, Fate::Redirect(location.clone()), received);
            }
        }
    }
}

fn handle(mut stream: impl Read + Write, fate: Fate, received: &Mutex<Received>) {
    let mut data = Vec::new();
    let mut chunk = [0u8; 65536];
    let head_end = loop {
        if let Some(at) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            break at + 4;
        }
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => data.extend_from_slice(&chunk[..n]),
        }
    };
    let head = String::from_utf8_lossy(&data[..head_end]).to_lowercase();
    assert!(head.starts_with("post /ims/upload http/1.1\r\n"), "{head}");
    assert!(head.contains("content-encoding: gzip"), "{head}");
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse().ok())
        .expect("content-length");
    let mut state = received.lock().unwrap();
    state.requests += 1;
    if fate == Fate::CloseEarly {
        state.failed += 1;
        return;
    }
    drop(state);
    while data.len() < head_end + length {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => return,
            Ok(n) => data.extend_from_slice(&chunk[..n]),
        }
    }
    let mut state = received.lock().unwrap();
    state.raw.extend_from_slice(&data);
    if fate == Fate::ServerError {
        state.failed += 1;
        drop(state);
        let _ =
            stream.write_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n\r\n");
        return;
    }
    if let Fate::Redirect(location) = &fate {
        state.failed += 1;
        drop(state);
        let answer =
            format!("HTTP/1.1 302 Found\r\nLocation: {location}\r\nContent-Length: 0\r\n\r\n");
        let _ = stream.write_all(answer.as_bytes());
        return;
    }
    let mut json = Vec::new();
    GzDecoder::new(&data[head_end..head_end + length])
        .read_to_end(&mut json)
        .expect("a gzip body");
    let document: serde_json::Value = serde_json::from_slice(&json).expect("a JSON body");
    assert_eq!(document["format"], "esserver-ims/1");
    let mut listed = Vec::new();
    for record in document["records"].as_array().expect("records") {
        let id = record["id"].as_str().expect("an id").to_string();
        let serial = record["serial"].as_str().expect("a serial").to_string();
        listed.push((serial, id.clone()));
        if state.records.insert(id, record.clone()).is_some() {
            state.duplicate_ids += 1;
        }
    }
    state.bodies.push(json);
    state
        .arrivals
        .push((Instant::now(), (head_end + length) as u64, listed));
    if fate == Fate::LoseAnswer {
        state.failed += 1;
        return;
    }
    drop(state);
    let _ = stream.write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n");
    let _ = stream.flush();
}

fn ims_config(endpoint: &str, extra: &str) -> String {
    format!(
        "[IMS]\nendpoint = {endpoint}\nupload_interval_ms = 50\nretry_initial_ms = 20\n\
         retry_max_ms = 300\nrequest_timeout_ms = 3000\nbatch_records_max = 40\n{extra}"
    )
}

/// Sends telemetry messages of `per_message` samples each, from `first` on, one minute
/// apart; every one acknowledged. Returns the (serial, channel, at_ms) sent.
fn send_samples(
    client: &mut IncubatorClient,
    serial: &str,
    messages: std::ops::Range<i64>,
    alarms: &[pb::Alarm],
) -> HashSet<(String, String, i64)> {
    const CHANNELS: [&str; 4] = [
        "temperature_c",
        "co2_percent",
        "o2_percent",
        "dishes_loaded",
    ];
    let mut sent = HashSet::new();
    for minute in messages {
        let at_ms = T0 + minute * 60_000;
        let samples = CHANNELS
            .iter()
            .map(|channel| {
                sent.insert((serial.to_string(), channel.to_string(), at_ms));
                pb::TelemetrySample {
                    channel: channel.to_string(),
                    value: 37.0 + minute as f64 / 1000.0,
                    at_ms,
                }
            })
            .collect();
        let reply = client
            .request(
                Message::Telemetry(pb::Telemetry {
                    seq: 0,
                    samples,
                    alarms: if minute == 0 { alarms.to_vec() } else { vec![] },
                }),
                TIMEOUT,
            )
            .expect("telemetry answered");
        assert!(matches!(reply, Message::Ack(_)), "{reply:?}");
    }
    sent
}

fn ims_status(server: &ServerProcess) -> serde_json::Value {
    common::admin_json(server.data_dir(), &["ims", "status"])
}

fn ims_switch(server: &ServerProcess, verb: &str, part: &str) {
    let output = Command::new(common::esserver_path())
        .args(["ims", verb, part, "--data"])
        .arg(server.data_dir())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

/// Waits until the sink holds `expected` distinct ids and the server's queue is empty.
fn wait_delivered(server: &ServerProcess, sink: &Sink, expected: usize, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let have = sink.records().len();
        let queued = ims_status(server)["queue"]["records"].as_u64().unwrap();
        if have >= expected && queued == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "only {have} of {expected} records arrived; {queued} still queued; status {}",
            ims_status(server)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// (serial, channel, at_ms) of the sample records the sink kept, and whether one sample came
/// under two ids.
fn samples_of(
    records: &HashMap<String, serde_json::Value>,
) -> (HashSet<(String, String, i64)>, usize) {
    let mut samples = HashSet::new();
    let mut twice = 0;
    for record in records.values() {
        if record["type"] != "sample" {
            continue;
        }
        let key = (
            record["serial"].as_str().unwrap().to_string(),
            record["channel"].as_str().unwrap().to_string(),
            record["at_ms"].as_i64().unwrap(),
        );
        if !samples.insert(key) {
            twice += 1;
        }
    }
    (samples, twice)
}

#[test]
fn every_sample_arrives_once_through_a_flaky_endpoint_that_goes_down_for_a_while() {
    let sink = Sink::start(0, true);
    let dir = tempfile::tempdir().unwrap();
    let server = common::spawn_in(&dir, false, &ims_config(&sink.url(), ""));
    let mut sent = HashSet::new();
    let serials = ["IMS-A", "IMS-B", "IMS-C"];
    let mut clients: Vec<_> = serials
        .iter()
        .map(|serial| {
            let mut identity = common::identity(serial, "es-8");
            common::connect(&server, &mut identity)
        })
        .collect();
    for (client, serial) in clients.iter_mut().zip(serials) {
        sent.extend(send_samples(client, serial, 0..30, &[]));
    }
    // The endpoint goes down while the incubators carry on.
    sink.down.store(true, Ordering::Relaxed);
    let down_since = Instant::now();
    for (client, serial) in clients.iter_mut().zip(serials) {
        sent.extend(send_samples(client, serial, 30..60, &[]));
    }
    std::thread::sleep(Duration::from_millis(1500).saturating_sub(down_since.elapsed()));
    let during = ims_status(&server);
    assert!(
        during["last_error"].as_str().is_some(),
        "an error while the endpoint is down: {during}"
    );
    sink.down.store(false, Ordering::Relaxed);
    for (client, serial) in clients.iter_mut().zip(serials) {
        sent.extend(send_samples(client, serial, 60..80, &[]));
    }
    assert_eq!(sent.len(), 3 * 80 * 4);
    wait_delivered(&server, &sink, sent.len(), Duration::from_secs(90));

    let records = sink.records();
    let (samples, twice) = samples_of(&records);
    assert_eq!(twice, 0, "a sample arrived under two ids");
    assert_eq!(records.len(), sent.len(), "one id per sample");
    assert_eq!(samples, sent, "every sample sent arrived");
    let received = sink.received.lock().unwrap();
    assert!(
        received.failed >= 3,
        "the sink failed {} requests",
        received.failed
    );
    assert!(
        received.duplicate_ids > 0,
        "a batch whose answer was lost was sent again"
    );
    drop(received);
    let status = ims_status(&server);
    assert!(status["failures"].as_u64().unwrap() >= 3, "{status}");
    assert!(status["last_success_ms"].as_i64().unwrap() > 0, "{status}");
    assert_eq!(status["queue"]["dropped_records"], 0, "{status}");
    let per_instrument = status["per_instrument"].as_array().unwrap();
    assert_eq!(per_instrument.len(), 3, "{status}");
    for row in per_instrument {
        assert!(row["bytes_last_hour"].as_u64().unwrap() > 0, "{row}");
        assert_eq!(row["budget_bits_per_s"], 500_000);
    }
    assert!(
        !common::server_log(&dir).contains("ERROR"),
        "{}",
        common::server_log(&dir)
    );
}

#[test]
fn what_was_queued_before_a_kill_9_is_sent_after_the_restart() {
    // An endpoint that is not there yet: reserve a port, then free it.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/ims/upload");
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::spawn_in(&dir, false, &ims_config(&url, ""));
    let mut identity = common::identity("IMS-K", "es-8");
    let mut client = common::connect(&server, &mut identity);
    let alarm = pb::Alarm {
        code: "CO2-LOW".into(),
        severity: pb::AlarmSeverity::Warning.into(),
        raised_at_ms: T0,
        cleared_at_ms: 0,
        text: "CO2 below set point".into(),
    };
    let sent = send_samples(&mut client, "IMS-K", 0..50, &[alarm]);
    let deadline = Instant::now() + TIMEOUT;
    let before = loop {
        let status = ims_status(&server);
        if status["last_error"].as_str().is_some() || Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(before["queue"]["records"], 50 * 4 + 1, "{before}");
    let error = before["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("cannot connect"), "{before}");
    drop(client);
    server.kill9();

    let sink = Sink::start(port, false);
    server.restart().expect("the server starts again");
    wait_delivered(&server, &sink, sent.len() + 1, Duration::from_secs(60));
    let records = sink.records();
    let (samples, twice) = samples_of(&records);
    assert_eq!((samples, twice), (sent, 0));
    let alarms: Vec<_> = records.values().filter(|r| r["type"] == "alarm").collect();
    assert_eq!(alarms.len(), 1, "{alarms:?}");
    assert_eq!(alarms[0]["code"], "CO2-LOW");
    assert_eq!(alarms[0]["severity"], "warning");
    assert!(
        alarms[0].get("text").is_none(),
        "alarm text stays on the server"
    );
}

#[test]
fn a_paused_upload_fills_the_queue_which_drops_its_oldest_and_never_holds_patient_data() {
    let sink = Sink::start(0, false);
    let dir = tempfile::tempdir().unwrap();
    let server = common::spawn_in(
        &dir,
        false,
        &ims_config(&sink.url(), "queue_bytes_max = 64 KiB\n"),
    );
    ims_switch(&server, "pause", "upload");
    assert_eq!(ims_status(&server)["upload"], false);

    // Patients, treatments, dishes and embryos on the same instrument that sends telemetry.
    let workload = Workload {
        serial: "IMS-P".into(),
        model: DeviceModel::EmbryoScope8,
        dishes: 1,
        wells_per_dish: 3,
        planes: vec![0],
        cycles: 1,
        start_ms: T0,
        interval_ms: 600_000,
    };
    let mut identity = common::identity("IMS-P", "es-8");
    let mut client = common::connect(&server, &mut identity);
    es_loadtest::sim::register_dishes(&mut client, &workload, TIMEOUT).unwrap();
    let patient = workload.dish_registrations().remove(0);
    let person = patient.patient.clone().unwrap();
    // Another instrument's dish, whose id this instrument could know from the clinic.
    let other = Workload {
        serial: "IMS-Q".into(),
        dishes: 1,
        ..workload.clone()
    };
    let mut other_identity = common::identity("IMS-Q", "es-8");
    let mut other_client = common::connect(&server, &mut other_identity);
    es_loadtest::sim::register_dishes(&mut other_client, &other, TIMEOUT).unwrap();
    let other_dish = other.dish_registrations().remove(0).dish_id;
    assert_ne!(other_dish, patient.dish_id);
    // Alarms whose codes equal or are built from patient data, and telemetry on a channel
    // named after the patient: all stored on the server, none queued. Only the codes of the
    // model's device catalog entry leave (ims.md "No patient data").
    let hostile: Vec<pb::Alarm> = [
        person.patient_id.clone(),
        patient.dish_id.clone(),
        patient.wells[0].embryo_id.clone(),
        person.last_name.to_uppercase(),
        patient.treatment_name.clone(),
        format!("ALERT-{}", person.last_name.to_uppercase()),
        format!("{}-LOW", person.patient_id),
        other_dish.clone(),
    ]
    .into_iter()
    .enumerate()
    .map(|(n, code)| pb::Alarm {
        code,
        severity: pb::AlarmSeverity::Critical.into(),
        raised_at_ms: T0 + n as i64,
        cleared_at_ms: 0,
        text: format!(
            "{} {} in dish {}",
            person.first_name, person.last_name, patient.dish_id
        ),
    })
    .collect();
    let hostile_telemetry = pb::Telemetry {
        seq: 0,
        samples: vec![pb::TelemetrySample {
            channel: person.last_name.clone(),
            value: 1.0,
            at_ms: T0,
        }],
        alarms: hostile,
    };
    let reply = client
        .request(Message::Telemetry(hostile_telemetry.clone()), TIMEOUT)
        .unwrap();
    assert!(
        matches!(
            reply,
            Message::Ack(pb::Ack {
                duplicate: false,
                ..
            })
        ),
        "{reply:?}"
    );
    // The same TELEMETRY again (a lost ACK): stored already, so ACK duplicate = true
    // (incubator.md 5.10), and nothing is queued twice.
    let reply = client
        .request(Message::Telemetry(hostile_telemetry), TIMEOUT)
        .unwrap();
    assert!(
        matches!(
            reply,
            Message::Ack(pb::Ack {
                duplicate: true,
                ..
            })
        ),
        "{reply:?}"
    );
    // Far more samples than 64 KiB of queue holds.
    let sent = send_samples(&mut client, "IMS-P", 0..600, &[]);
    let status = ims_status(&server);
    let dropped = status["queue"]["dropped_records"].as_u64().unwrap();
    let queued = status["queue"]["records"].as_u64().unwrap();
    assert!(dropped > 0, "{status}");
    assert!(
        status["queue"]["bytes"].as_u64().unwrap() <= 64 * 1024,
        "{status}"
    );
    assert_eq!(dropped + queued, sent.len() as u64, "{status}");
    assert_eq!(status["queue"]["withheld"], 9, "{status}");
    assert!(
        common::server_log(&dir).contains("monitoring (IMS) queue full"),
        "the log says the queue dropped records"
    );
    // /metrics reports the count.
    let key = common::create_api_key(&server, "monitoring", "read");
    let mut http = HttpClient::new(
        server.info.address("web"),
        server.info.client_tls("web"),
        TIMEOUT,
    );
    let metrics = http
        .get("/metrics", &[("authorization", &format!("Bearer {key}"))])
        .unwrap();
    assert_eq!(metrics.status, 200);
    let metrics = String::from_utf8(metrics.body).unwrap();
    assert!(
        metrics.contains(&format!("esserver_ims_dropped_records_total {dropped}")),
        "{metrics}"
    );
    assert!(metrics.contains("esserver_ims_upload 0"), "{metrics}");

    ims_switch(&server, "resume", "upload");
    wait_delivered(&server, &sink, queued as usize, Duration::from_secs(60));
    let records = sink.records();
    let (samples, twice) = samples_of(&records);
    assert_eq!((samples.len() as u64, twice), (queued, 0));
    // The oldest were dropped, the newest kept.
    let newest = T0 + 599 * 60_000;
    assert!(samples.iter().any(|(_, _, at)| *at == newest));
    assert!(!samples.iter().any(|(_, _, at)| *at == T0));
    assert!(records.values().all(|r| r["type"] == "sample"));

    // Every byte the endpoint received, compressed and not, holds no patient data.
    let received = sink.received.lock().unwrap();
    let mut haystacks: Vec<&[u8]> = received.bodies.iter().map(Vec::as_slice).collect();
    haystacks.push(&received.raw);
    let mut needles = vec![
        person.patient_id.clone(),
        person.first_name.clone(),
        person.last_name.clone(),
        person.last_name.to_uppercase(),
        patient.treatment_name.clone(),
        patient.dish_id.clone(),
        other_dish,
    ];
    needles.extend(patient.wells.iter().map(|w| w.embryo_id.clone()));
    for haystack in haystacks {
        let text = String::from_utf8_lossy(haystack);
        for needle in &needles {
            assert!(
                !text.contains(needle.as_str()),
                "{needle} reached the endpoint"
            );
        }
    }
    assert!(received.bodies.iter().map(Vec::len).sum::<usize>() > 10_000);
}

/// A backlog of two incubators (one four times the other's) drains at each incubator's
/// `[IMS] incubator_budget_bits_per_s`, measured at the endpoint second by second, with
/// every record delivered once and each incubator's in order.
#[test]
fn a_long_backlog_drains_within_each_incubators_budget_every_second() {
    const BITS_PER_S: u64 = 160_000;
    let bytes_per_s = BITS_PER_S as f64 / 8.0;
    let sink = Sink::start(0, false);
    let dir = tempfile::tempdir().unwrap();
    let config = format!(
        "[IMS]\nendpoint = {}\nupload_interval_ms = 50\nretry_initial_ms = 20\n\
         retry_max_ms = 300\nrequest_timeout_ms = 3000\nbatch_records_max = 1000\n\
         incubator_budget_bits_per_s = {BITS_PER_S}\n",
        sink.url()
    );
    let server = common::spawn_in(&dir, false, &config);
    ims_switch(&server, "pause", "upload");
    // Every monitoring channel once a minute while the endpoint is paused, as in an outage:
    // the big one 400 minutes, the small one 100, interleaved as they arrive.
    let channels = es_perf::catalog::MONITORING_CHANNELS;
    let mut expected = 0usize;
    let mut clients: Vec<(IncubatorClient, i64)> = [("IMS-BIG", 4), ("IMS-SMALL", 1)]
        .into_iter()
        .map(|(serial, per_round)| {
            let mut identity = common::identity(serial, "es-8");
            (common::connect(&server, &mut identity), per_round)
        })
        .collect();
    for round in 0..100i64 {
        for (client, per_round) in clients.iter_mut() {
            for k in 0..*per_round {
                let minute = round * *per_round + k;
                let at_ms = T0 + minute * 60_000;
                let samples = channels
                    .iter()
                    .enumerate()
                    .map(|(n, channel)| pb::TelemetrySample {
                        channel: channel.to_string(),
                        value: 20.0 + (minute * 7 + n as i64) as f64 / 13.0,
                        at_ms,
                    })
                    .collect();
                let telemetry = pb::Telemetry {
                    seq: 0,
                    samples,
                    alarms: vec![],
                };
                let reply = client
                    .request(Message::Telemetry(telemetry), TIMEOUT)
                    .expect("telemetry answered");
                assert!(matches!(reply, Message::Ack(_)), "{reply:?}");
                expected += channels.len();
            }
        }
    }
    assert_eq!(
        ims_status(&server)["queue"]["records"].as_u64(),
        Some(expected as u64)
    );
    ims_switch(&server, "resume", "upload");
    wait_delivered(&server, &sink, expected, Duration::from_secs(120));

    let received = sink.received.lock().unwrap();
    assert_eq!(received.records.len(), expected);
    assert_eq!(received.duplicate_ids, 0);
    let start = received.arrivals[0].0;
    // serial -> bytes in each second since the first arrival (a request's bytes shared by
    // its number of records, as the status does), and the record ids in arrival order.
    let mut seconds: HashMap<String, Vec<f64>> = HashMap::new();
    let mut order: HashMap<String, Vec<u64>> = HashMap::new();
    for (at, wire, listed) in &received.arrivals {
        let second = at.duration_since(start).as_secs() as usize;
        let share = *wire as f64 / listed.len() as f64;
        for (serial, id) in listed {
            let per = seconds.entry(serial.clone()).or_default();
            if per.len() <= second {
                per.resize(second + 1, 0.0);
            }
            per[second] += share;
            let number = id.rsplit('-').next().unwrap().parse::<u64>().unwrap();
            order.entry(serial.clone()).or_default().push(number);
        }
    }
    for (serial, ids) in &order {
        assert!(ids.windows(2).all(|w| w[0] < w[1]), "{serial} out of order");
    }
    for (serial, per) in &seconds {
        // Whole seconds only: the last is partial.
        let whole = &per[..per.len() - 1];
        eprintln!(
            "{serial}: bytes per second {:?} (budget {bytes_per_s})",
            whole.iter().map(|b| *b as u64).collect::<Vec<_>>()
        );
        assert!(
            whole.len() >= 2,
            "{serial}: the drain took under 3 s: {per:?}"
        );
        for (n, bytes) in whole.iter().enumerate() {
            assert!(
                *bytes <= 1.3 * bytes_per_s,
                "{serial}: {bytes} B in second {n}, budget {bytes_per_s} B/s"
            );
        }
        // Not starved either: the budget is what limits the drain, not the uploader.
        let mean = whole.iter().sum::<f64>() / whole.len() as f64;
        assert!(
            mean >= 0.6 * bytes_per_s,
            "{serial}: {mean} B/s on average, budget {bytes_per_s} B/s"
        );
    }
}

#[test]
fn an_https_endpoint_is_verified_and_a_redirect_is_never_followed() {
    // HTTPS: the sink's certificate is trusted through [IMS] ca_file.
    let certs = tempfile::tempdir().unwrap();
    let (cert, key, _) =
        es_net::tls::ensure_self_signed(certs.path(), &["localhost".to_string()]).unwrap();
    let tls = es_net::tls::server_config(&cert, &key).unwrap();
    let sink = Sink::with_mode(0, Mode::Tls(tls));
    let url = format!("https://localhost:{}/ims/upload", sink.port);
    // Without the CA file the system's bundle does not know the sink: refused, nothing sent.
    let dir = tempfile::tempdir().unwrap();
    let untrusting = common::spawn_in(&dir, false, &ims_config(&url, ""));
    let mut identity = common::identity("IMS-U", "es-8");
    let mut client = common::connect(&untrusting, &mut identity);
    send_samples(&mut client, "IMS-U", 0..3, &[]);
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        let status = ims_status(&untrusting);
        if status["last_error"].as_str().is_some() || Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let error = status["last_error"].as_str().unwrap_or_default();
    assert!(error.to_lowercase().contains("certificate"), "{status}");
    assert!(sink.records().is_empty());
    drop(client);
    drop(untrusting);

    let extra = format!("ca_file = {}\n", cert.display());
    let dir = tempfile::tempdir().unwrap();
    let server = common::spawn_in(&dir, false, &ims_config(&url, &extra));
    let mut identity = common::identity("IMS-T", "es-8");
    let mut client = common::connect(&server, &mut identity);
    let sent = send_samples(&mut client, "IMS-T", 0..10, &[]);
    wait_delivered(&server, &sink, sent.len(), Duration::from_secs(30));
    assert_eq!(samples_of(&sink.records()), (sent, 0));
    drop(client);
    drop(server);

    // A redirect to another port: the uploader reports it and never connects there.
    let elsewhere = TcpListener::bind("127.0.0.1:0").unwrap();
    elsewhere.set_nonblocking(true).unwrap();
    let target = format!(
        "http://127.0.0.1:{}/ims/upload",
        elsewhere.local_addr().unwrap().port()
    );
    let redirecting = Sink::with_mode(0, Mode::Redirect(target));
    let dir = tempfile::tempdir().unwrap();
    let server = common::spawn_in(&dir, false, &ims_config(&redirecting.url(), ""));
    let mut identity = common::identity("IMS-R", "es-8");
    let mut client = common::connect(&server, &mut identity);
    send_samples(&mut client, "IMS-R", 0..5, &[]);
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        let status = ims_status(&server);
        let redirects = redirecting.received.lock().unwrap().failed;
        if redirects >= 3 || Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let error = status["last_error"].as_str().unwrap_or_default();
    assert!(error.contains("never follows redirects"), "{status}");
    assert_eq!(status["queue"]["records"], 20, "nothing removed: {status}");
    assert!(
        elsewhere.accept().is_err(),
        "the uploader connected to the redirect's target"
    );
}
