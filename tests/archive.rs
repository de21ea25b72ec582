//! The archive tier against a real S3-compatible server (moto in server mode, on loopback,
//! started and stopped by PID): sealed volumes are uploaded, read back and checked before
//! their local files go; every image still reads byte for byte through the public API, the
//! viewer and a time-lapse ZIP; an object store that stops answering (paused) or is gone
//! (killed) is a clear `archive_unavailable` for archived images only and reads resume when
//! it answers again; an upload cut off by the store, or by `kill -9` of the server, leaves
//! every local file and nothing recorded, and the next pass completes. Backups to the
//! object store (`esserver backup --to s3://...`) are incremental, verified, restored into a
//! data directory that verifies clean, report a flipped byte, and survive `kill -9`.
//!
//! `ESSERVER_TEST_S3_ENDPOINT` (with `AWS_ACCESS_KEY_ID` and `AWS_SECRET_ACCESS_KEY`) points
//! the round trip at another store, a MinIO say; the outage steps need the local moto and are
//! skipped then.

mod common;

use es_loadtest::http_client::{HttpClient, HttpResponse};
use es_loadtest::sim::Workload;
use es_loadtest::spawn::ServerProcess;
use es_loadtest::viewer_client::{Credentials, ViewerClient};
use es_proto::viewer::pb::{self, client_message::Request, server_message::Body};
use esserver::archive::s3::ObjectStore;
use std::io::Read;
use std::net::TcpListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const PASSWORD: &str = "Archive-2026!";
const SECRET: &str = "moto-secret-never-logged";

/// An S3-compatible server for one test.
struct S3 {
    endpoint: String,
    access_key: String,
    secret_key: String,
    /// The local moto, None for an external store.
    moto: Option<Child>,
    port: u16,
}

impl S3 {
    fn start() -> S3 {
        if let Ok(endpoint) = std::env::var("ESSERVER_TEST_S3_ENDPOINT") {
            return S3 {
                endpoint,
                access_key: std::env::var("AWS_ACCESS_KEY_ID").unwrap_or_default(),
                secret_key: std::env::var("AWS_SECRET_ACCESS_KEY").unwrap_or_default(),
                moto: None,
                port: 0,
            };
        }
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut s3 = S3 {
            endpoint: format!("http://127.0.0.1:{port}"),
            access_key: "AKIDTESTARCHIVE".into(),
            secret_key: SECRET.into(),
            moto: None,
            port,
        };
        s3.launch();
        s3
    }

    /// Starts moto on the port and waits until it answers.
    fn launch(&mut self) {
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
            .arg(self.port.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("python3 -m moto.server runs (scripts/test.sh installs moto[server])");
        self.moto = Some(child);
        let deadline = Instant::now() + common::TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "moto did not start on port {}",
                self.port
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn is_local(&self) -> bool {
        self.moto.is_some()
    }

    fn signal(&self, signal: i32) {
        let pid = self.moto.as_ref().expect("a local moto").id();
        assert_eq!(unsafe { libc::kill(pid as i32, signal) }, 0);
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.moto.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    fn client(&self, bucket: &str) -> ObjectStore {
        ObjectStore::new(
            &self.endpoint,
            false,
            bucket,
            "us-east-1",
            rusty_s3::Credentials::new(self.access_key.clone(), self.secret_key.clone()),
            Duration::from_secs(10),
        )
        .unwrap()
    }

    fn create_bucket(&self, bucket: &str) {
        self.client(bucket).create_bucket().expect("bucket created");
    }

    /// `[Archive]` with only how to reach the store (no archive tier): for backups.
    fn connection(&self) -> String {
        format!(
            "[Archive]\nendpoint = {}\naccess_key_id = {}\nsecret_access_key = {}\n",
            self.endpoint, self.access_key, self.secret_key
        )
    }

    /// The `[Archive]` section for `bucket`: archive as soon as sealed, passes on request.
    /// The background activity computation is off: its reads of archived frames would change
    /// what the read cache holds, which the tests count on.
    fn config(&self, bucket: &str) -> String {
        format!(
            "[Server]\nactivity = off\n[Storage]\nvolume_bytes_max = 1 MiB\n\
             [Archive]\ntarget = s3://{bucket}/site-a\nendpoint = {}\n\
             access_key_id = {}\nsecret_access_key = {}\nafter_days = 0\n\
             request_timeout_ms = 2000\ncheck_interval_ms = 3600000\ncache_bytes_max = 1 MiB\n",
            self.endpoint, self.access_key, self.secret_key
        )
    }
}

impl Drop for S3 {
    fn drop(&mut self) {
        if self.moto.is_some() {
            self.signal(libc::SIGCONT);
        }
        self.kill();
    }
}

fn bucket_name(test: &str) -> String {
    format!("esserver-test-{test}-{}", std::process::id())
}

/// The JPEG `common::upload_dish` sent as image `index`.
fn jpeg(index: u64) -> bytes::Bytes {
    let frames = es_loadtest::frames::generate(4, 7);
    frames[(index % frames.len() as u64) as usize].clone()
}

fn embryo_id(workload: &Workload, index: u64) -> String {
    let spec = workload.image(index);
    format!("{}_S1_P-{}", workload.serial, spec.well)
}

fn image_path(workload: &Workload, index: u64) -> String {
    format!(
        "/api/v1/embryos/{}/images/{}?focal_plane=0",
        embryo_id(workload, index),
        workload.image(index).acquired_at_ms
    )
}

struct Api {
    http: HttpClient,
    auth: String,
}

impl Api {
    fn new(server: &ServerProcess) -> Api {
        let key = common::create_api_key(server, "archive test", "read");
        Api {
            http: HttpClient::new(
                server.info.address("public-api"),
                server.info.client_tls("public-api"),
                common::TIMEOUT,
            ),
            auth: format!("Bearer {key}"),
        }
    }

    fn get(&mut self, path: &str) -> HttpResponse {
        self.http
            .request("GET", path, &[("authorization", &self.auth)], None)
            .unwrap_or_else(|error| panic!("GET {path}: {error}"))
    }
}

/// `esserver archive --json`: (succeeded, its JSON or its stderr).
fn archive(data: &Path) -> (bool, String) {
    let output = common::admin(data, &["archive", "--json"]);
    let text = if output.status.success() {
        String::from_utf8_lossy(&output.stdout).into_owned()
    } else {
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    (output.status.success(), text)
}

fn status(data: &Path) -> serde_json::Value {
    common::admin_json(data, &["status"])
}

/// Volume files (`NNNNNNNN.vol`) in the data directory.
fn local_volumes(data: &Path) -> usize {
    std::fs::read_dir(data.join("volumes"))
        .unwrap()
        .filter(|entry| {
            entry
                .as_ref()
                .is_ok_and(|e| e.file_name().to_string_lossy().ends_with(".vol"))
        })
        .count()
}

/// Waits until the server's sealed volumes are all complete (companion files written), so a
/// pass archives every sealed one.
fn settle() {
    std::thread::sleep(Duration::from_millis(500));
}

fn assert_every_image_reads(api: &mut Api, workload: &Workload) {
    for index in 0..workload.len() {
        let response = api.get(&image_path(workload, index));
        assert_eq!(
            response.status,
            200,
            "image {index}: {}",
            String::from_utf8_lossy(&response.body)
        );
        assert_eq!(response.body, jpeg(index), "image {index}");
    }
}

fn zip_entries(bytes: &[u8]) -> u16 {
    assert_eq!(&bytes[..4], b"PK\x03\x04");
    let end = &bytes[bytes.len() - 22..];
    assert_eq!(&end[..4], b"PK\x05\x06");
    u16::from_le_bytes([end[10], end[11]])
}

#[test]
fn archived_volumes_read_back_exactly_and_an_unreachable_store_costs_only_their_images() {
    let mut s3 = S3::start();
    let bucket = bucket_name("reads");
    s3.create_bucket(&bucket);
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::spawn_in(&dir, false, &s3.config(&bucket));
    let data = server.data_dir().to_path_buf();
    common::add_user(&server, "anna", "view", PASSWORD);
    let workload = common::upload_dish(&server, "AR-1", 40);
    settle();
    let volumes_before = local_volumes(&data);
    assert!(volumes_before >= 3, "{volumes_before} volumes");

    // One pass: the sealed volumes go, the active one stays.
    let (ok, report) = archive(&data);
    assert!(ok, "{report}");
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    let archived = report["volumes_archived"].as_u64().unwrap() as usize;
    assert!(archived >= 2, "{report}");
    assert_eq!(local_volumes(&data), volumes_before - archived);
    let status = status(&data);
    assert_eq!(
        status["archive"]["volumes_archived"], archived as u64,
        "{status}"
    );
    assert_eq!(status["archive"]["last_error"], serde_json::Value::Null);
    // The objects are there, as big as the volumes.
    assert!(status["archive"]["bytes_archived"].as_u64().unwrap() > 0);

    // Every image reads, byte for byte: the archived ones by range requests.
    let mut api = Api::new(&server);
    assert_every_image_reads(&mut api, &workload);
    let reads = status_of(&data)["remote_reads"].as_u64().unwrap();
    assert!(reads > 0);
    // A time-lapse ZIP and the viewer read them too.
    let zip = api.get(&format!(
        "/api/v1/embryos/{}/timelapse?focal_plane=0",
        embryo_id(&workload, 0)
    ));
    assert_eq!(zip.status, 200);
    assert_eq!(zip_entries(&zip.body), 40);
    let mut viewer = ViewerClient::login(
        server.info.address("viewer"),
        &server.info.client_tls("viewer"),
        &Credentials {
            user: "anna".into(),
            password: PASSWORD.into(),
            computer: "VIEWER-anna".into(),
        },
        common::TIMEOUT,
    )
    .unwrap();
    let image = viewer
        .call(Request::GetImage(pb::GetImage {
            embryo_id: embryo_id(&workload, 0),
            acquired_at_ms: workload.image(0).acquired_at_ms,
            focal_plane: 0,
        }))
        .unwrap();
    match image {
        Body::Image(image) => assert_eq!(image.jpeg, jpeg(0)),
        other => panic!("not an image: {other:?}"),
    }
    assert!(status_of(&data)["cache"]["bytes"].as_u64().unwrap() <= 1 << 20);

    // Verify is clean and says the archived volumes were not read locally.
    let verify = common::admin(&data, &["verify"]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    let verified: serde_json::Value = serde_json::from_slice(&verify.stdout).unwrap();
    assert_eq!(verified["volumes_archived"], archived as u64, "{verified}");
    assert!(
        verified["images_archived"].as_u64().unwrap() > 0,
        "{verified}"
    );
    let log = common::server_log(&dir);
    assert!(!log.contains(SECRET), "the secret key is in the log");
    assert!(
        !log.contains("X-Amz-Signature"),
        "a signed URL is in the log"
    );

    if s3.is_local() {
        // The store stops answering: image 1 (evicted from the 1 MiB cache by the reads
        // since) fails clearly within the request timeout; the active volume still reads.
        s3.signal(libc::SIGSTOP);
        let last = workload.len() - 1;
        let local = api.get(&image_path(&workload, last));
        assert_eq!(local.status, 200);
        assert_eq!(local.body, jpeg(last));
        let paused = api.get(&image_path(&workload, 1));
        assert_eq!(
            paused.status,
            503,
            "{}",
            String::from_utf8_lossy(&paused.body)
        );
        let body: serde_json::Value = paused.json();
        assert_eq!(body["code"], "archive_unavailable", "{body}");
        let message = body["message"].as_str().unwrap();
        assert!(message.contains("object store unreachable"), "{message}");
        assert!(!message.contains(SECRET) && !message.contains("Signature"));
        // It answers again: the same image reads (once the few seconds in which reads fail
        // at once after an unreachable store have passed).
        s3.signal(libc::SIGCONT);
        let deadline = Instant::now() + common::TIMEOUT;
        let resumed = loop {
            let response = api.get(&image_path(&workload, 1));
            if response.status != 503 || Instant::now() > deadline {
                break response;
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        assert_eq!(resumed.status, 200);
        assert_eq!(resumed.body, jpeg(1));
        // The store is gone: a clear error again, the server keeps serving.
        s3.kill();
        let gone = api.get(&image_path(&workload, 2));
        assert_eq!(gone.status, 503);
        let status = status_of(&data);
        assert!(
            status["remote_read_failures"].as_u64().unwrap() >= 2,
            "{status}"
        );
        let local = api.get(&image_path(&workload, last));
        assert_eq!(local.status, 200);
        // A restart needs no object store to start.
        assert!(server.terminate(common::TIMEOUT).is_some());
        let server = common::spawn_in(&dir, false, &s3.config(&bucket));
        let mut api = Api::new(&server);
        let local = api.get(&image_path(&workload, last));
        assert_eq!(local.status, 200);
    }
}

fn status_of(data: &Path) -> serde_json::Value {
    status(data)["archive"].clone()
}

#[test]
fn an_upload_cut_off_by_the_store_or_by_kill_9_keeps_every_local_file_and_the_next_pass_completes()
{
    let mut s3 = S3::start();
    if !s3.is_local() {
        eprintln!("skipped: the outage steps need the local moto");
        return;
    }
    let bucket = bucket_name("uploads");
    s3.create_bucket(&bucket);
    let dir = tempfile::tempdir().unwrap();
    let mut server = common::spawn_in(&dir, false, &s3.config(&bucket));
    let data = server.data_dir().to_path_buf();
    let workload = common::upload_dish(&server, "AR-2", 40);
    settle();
    let volumes_before = local_volumes(&data);

    // The store stops in the middle of the first upload, then is killed.
    s3.signal(libc::SIGSTOP);
    let (mut pass, mut progress) = archive_started(&data);
    std::thread::sleep(Duration::from_millis(300));
    s3.kill();
    let rest: Vec<String> = progress.by_ref().map_while(Result::ok).collect();
    let output = pass.wait().unwrap();
    assert!(!output.success(), "the pass reported success");
    let said = rest.join("\n");
    assert!(
        said.contains("uploading") && said.contains("the local file is kept"),
        "{said}"
    );
    assert_eq!(local_volumes(&data), volumes_before);
    let status = status_of(&data);
    assert_eq!(status["volumes_archived"], 0, "{status}");
    assert!(status["last_error"].as_str().is_some(), "{status}");
    let verify = common::admin(&data, &["verify"]);
    assert!(verify.status.success());

    // The store is back (empty: moto keeps nothing); kill -9 of the server mid-upload.
    s3.launch();
    s3.create_bucket(&bucket);
    s3.signal(libc::SIGSTOP);
    let (mut pass, _progress) = archive_started(&data);
    server.kill9();
    let _ = pass.wait();
    s3.signal(libc::SIGCONT);
    assert_eq!(local_volumes(&data), volumes_before);

    // A new start: nothing recorded, every image there; the next pass completes.
    let server = common::spawn_in(&dir, false, &s3.config(&bucket));
    let verify = common::admin(&data, &["verify"]);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert_eq!(status_of(&data)["volumes_archived"], 0);
    let (ok, report) = archive(&data);
    assert!(ok, "{report}");
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    let archived = report["volumes_archived"].as_u64().unwrap() as usize;
    assert!(archived >= 2, "{report}");
    assert_eq!(local_volumes(&data), volumes_before - archived);
    let mut api = Api::new(&server);
    assert_every_image_reads(&mut api, &workload);

    // The archived copies check, by size and whole; one removed from the store is named.
    for check in [
        &["archive", "--check"][..],
        &["archive", "--check", "full"][..],
    ] {
        let output = common::admin(&data, check);
        assert!(
            output.status.success(),
            "{check:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    let client = s3.client(&bucket);
    let (key, _) = client.list("site-a/").unwrap().into_iter().next().unwrap();
    client.delete(&key).unwrap();
    let output = common::admin(&data, &["archive", "--check"]);
    assert!(!output.status.success());
    let said = String::from_utf8_lossy(&output.stderr);
    assert!(said.contains(&key) && said.contains("missing"), "{said}");
}

type StderrLines = std::io::Lines<std::io::BufReader<std::process::ChildStderr>>;

/// Starts `esserver archive` and returns it once it reported its first volume.
fn archive_started(data: &Path) -> (Child, StderrLines) {
    started(&["archive"], data, "archive: volume")
}

/// Starts `esserver <args> --data <data>` and returns it once a line of its standard error
/// starts with `prefix` (the work is under way), with the rest of its standard error.
fn started(args: &[&str], data: &Path, prefix: &str) -> (Child, StderrLines) {
    let mut child = Command::new(common::esserver_path())
        .args(args)
        .arg("--data")
        .arg(data)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()));
    let going = lines.any(|line| line.map(|l| l.starts_with(prefix)).unwrap_or(false));
    assert!(going, "esserver {args:?} never printed {prefix:?}");
    (child, lines)
}

/// `esserver <args> --config <ini>` (a command that reads a backup target).
fn with_config(args: &[&str], ini: &Path) -> std::process::Output {
    Command::new(common::esserver_path())
        .args(args)
        .arg("--config")
        .arg(ini)
        .output()
        .expect("esserver runs")
}

fn backup_json(data: &Path, to: &str) -> serde_json::Value {
    let output = common::admin(data, &["backup", "--json", "--to", to]);
    assert!(
        output.status.success(),
        "backup: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

#[test]
fn backups_in_the_object_store_are_incremental_restorable_checked_and_survive_kill_9() {
    let s3 = S3::start();
    let bucket = bucket_name("backups");
    s3.create_bucket(&bucket);
    let to = format!("s3://{bucket}/clinic/backups");
    let dir = tempfile::tempdir().unwrap();
    let extra = format!("[Storage]\nvolume_bytes_max = 1 MiB\n{}", s3.connection());
    let mut server = common::spawn_in(&dir, false, &extra);
    let data = server.data_dir().to_path_buf();
    let ini = dir.path().join("cli.ini");
    std::fs::write(&ini, s3.connection()).unwrap();
    let first_upload = common::upload_dish(&server, "BS-1", 40);
    settle();

    // The first backup copies everything; the second, after more images, little of it.
    let first = backup_json(&data, &to);
    assert_eq!(first["bytes_copied"], first["bytes"], "{first}");
    common::upload_dish(&server, "BS-2", 10);
    settle();
    let second = backup_json(&data, &to);
    let (copied, total) = (
        second["bytes_copied"].as_u64().unwrap(),
        second["bytes"].as_u64().unwrap(),
    );
    assert!(copied < total / 2, "{second}");
    let listed = with_config(&["backup", "list", "--json", "--from", &to], &ini);
    assert!(
        listed.status.success(),
        "{}",
        String::from_utf8_lossy(&listed.stderr)
    );
    let listed: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 2, "{listed}");
    let verify = with_config(&["backup", "verify", "--from", &to], &ini);
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );

    // kill -9 of the server while a backup is storing: the earlier backups are intact, and
    // the next backup clears what the killed one left and completes.
    if s3.is_local() {
        let (mut running, _lines) = started(&["backup", "--to", &to], &data, "backup: ");
        s3.signal(libc::SIGSTOP);
        server.kill9();
        let _ = running.wait();
        s3.signal(libc::SIGCONT);
        server = common::spawn_in(&dir, false, &extra);
        let verify = with_config(&["backup", "verify", "--from", &to], &ini);
        assert!(
            verify.status.success(),
            "{}",
            String::from_utf8_lossy(&verify.stderr)
        );
        backup_json(&data, &to);
        // Every backup's objects have their manifest: the killed one's are gone.
        let objects = s3.client(&bucket).list("clinic/backups/backups/").unwrap();
        let name_of = |key: &str| key.split('/').nth(3).map(str::to_owned);
        let names: std::collections::BTreeSet<String> =
            objects.iter().filter_map(|(key, _)| name_of(key)).collect();
        let complete: std::collections::BTreeSet<String> = objects
            .iter()
            .filter(|(key, _)| key.ends_with("/manifest.json"))
            .filter_map(|(key, _)| name_of(key))
            .collect();
        assert_eq!(names, complete);
        assert_eq!(complete.len(), 3, "{complete:?}");
    }

    // Restored from the object store: verify is clean, every image of the first upload is
    // there byte for byte.
    let restored = dir.path().join("restored");
    let restore = Command::new(common::esserver_path())
        .args(["restore", "--from", &to, "--config"])
        .arg(&ini)
        .arg("--data")
        .arg(&restored)
        .output()
        .unwrap();
    assert!(
        restore.status.success(),
        "{}",
        String::from_utf8_lossy(&restore.stderr)
    );
    let verified = common::admin(&restored, &["verify"]);
    assert!(
        verified.status.success(),
        "{}",
        String::from_utf8_lossy(&verified.stderr)
    );
    let copy =
        es_storage::Store::open_read_only(&restored, &es_storage::StoreOptions::default()).unwrap();
    let reader = copy.read().unwrap();
    let instrument = reader.instrument_by_serial("BS-1").unwrap().unwrap();
    for index in 0..first_upload.len() {
        let spec = first_upload.image(index);
        let image = reader
            .image(
                instrument.instrument_id,
                &spec.dish_id,
                spec.well,
                spec.focal_plane,
                spec.acquired_at_ms,
            )
            .unwrap();
        assert_eq!(image, Some(jpeg(index)), "image {index}");
    }
    drop(reader);
    drop(copy);

    // One flipped byte in a shared volume: verify and restore both report it.
    let client = s3.client(&bucket);
    let (key, bytes) = client
        .list("clinic/backups/volumes/")
        .unwrap()
        .into_iter()
        .next()
        .expect("a shared volume");
    let mut content = Vec::new();
    client
        .open(&key)
        .unwrap()
        .read_to_end(&mut content)
        .unwrap();
    assert_eq!(content.len() as u64, bytes);
    content[1000] ^= 0x01;
    client
        .put(&key, &mut content.as_slice(), content.len() as u64)
        .unwrap();
    let verify = with_config(&["backup", "verify", "--from", &to], &ini);
    assert!(!verify.status.success());
    let said = String::from_utf8_lossy(&verify.stdout);
    assert!(
        said.contains("DAMAGED") && said.contains("SHA-256"),
        "{said}"
    );
    let again = dir.path().join("again");
    let restore = Command::new(common::esserver_path())
        .args(["restore", "--from", &to, "--config"])
        .arg(&ini)
        .arg("--data")
        .arg(&again)
        .output()
        .unwrap();
    assert!(!restore.status.success());
    assert!(
        String::from_utf8_lossy(&restore.stderr).contains("SHA-256"),
        "{}",
        String::from_utf8_lossy(&restore.stderr)
    );
    assert!(!again.exists(), "a refused restore left a data directory");
    drop(server);
}
