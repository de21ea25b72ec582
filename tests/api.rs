//! The public API against a real server (HTTPS with the generated certificate, pinned):
//! REST writes with ETag/If-Match and Idempotency-Key, the change feed and its long poll, a
//! viewer seeing an EMR's write, rights, API keys, images and time-lapse ZIPs; the original
//! API walked by a Python client written like the field clients; and the OpenAPI contract
//! checked by schemathesis against the served description.

mod common;

use es_loadtest::http_client::{HttpClient, HttpResponse};
use es_loadtest::spawn::ServerProcess;
use es_loadtest::viewer_client::{Credentials, ViewerClient};
use serde_json::{json, Value};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const PASSWORD: &str = "Embryo-2026!";

/// A server with users `emr` (edit) and `reader` (view), a write key and a read key, and one
/// uploaded dish of 3 embryos with `cycles` acquisitions.
struct Fixture {
    server: ServerProcess,
    dir: tempfile::TempDir,
    write_key: String,
    read_key: String,
}

fn fixture(serial: &str, cycles: u32) -> Fixture {
    let (server, dir) = common::spawn(true);
    common::add_user(&server, "emr", "edit", PASSWORD);
    common::add_user(&server, "reader", "view", PASSWORD);
    common::upload_dish(&server, serial, cycles);
    let write_key = common::create_api_key(&server, "EMR bridge", "write");
    let read_key = common::create_api_key(&server, "warehouse", "read");
    Fixture {
        server,
        dir,
        write_key,
        read_key,
    }
}

fn client(server: &ServerProcess) -> HttpClient {
    HttpClient::new(
        server.info.address("public-api"),
        server.info.client_tls("public-api"),
        common::TIMEOUT,
    )
}

struct Api {
    http: HttpClient,
    auth: String,
}

impl Api {
    fn new(server: &ServerProcess, key: &str) -> Api {
        Api {
            http: client(server),
            auth: format!("Bearer {key}"),
        }
    }

    fn call(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> HttpResponse {
        let mut all = vec![("authorization", self.auth.as_str())];
        all.extend_from_slice(headers);
        let body = body.map(|b| b.to_string());
        if body.is_some() {
            all.push(("content-type", "application/json"));
        }
        self.http
            .request(method, path, &all, body.as_deref().map(str::as_bytes))
            .unwrap_or_else(|error| panic!("{method} {path}: {error}"))
    }

    fn get(&mut self, path: &str) -> HttpResponse {
        self.call("GET", path, &[], None)
    }
}

fn ok(response: &HttpResponse, status: u16) -> Value {
    assert_eq!(
        response.status,
        status,
        "{}",
        String::from_utf8_lossy(&response.body)
    );
    response.json()
}

fn treatment_path(api: &mut Api) -> (String, String, Vec<String>) {
    let patients = ok(&api.get("/api/v1/patients"), 200);
    let patient = &patients["items"][0];
    let patient_id = patient["patient_id"].as_str().unwrap().to_string();
    let treatment = patient["treatments"][0]["name"]
        .as_str()
        .unwrap()
        .to_string();
    let path = format!("/api/v1/patients/{patient_id}/treatments/{treatment}");
    let embryos = ok(&api.get(&format!("{path}/embryos")), 200);
    let ids = embryos["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["embryo_id"].as_str().unwrap().to_string())
        .collect();
    (path, patient_id, ids)
}

fn last_seq(api: &mut Api) -> u64 {
    ok(&api.get("/api/v1/changes?limit=1"), 200)["last_seq"]
        .as_u64()
        .unwrap()
}

#[test]
fn emr_writes_are_versioned_idempotent_fed_and_pushed_to_viewers() {
    let fx = fixture("API-1", 3);
    let mut api = Api::new(&fx.server, &fx.write_key);
    let (treatment, _patient_id, embryo_ids) = treatment_path(&mut api);
    assert_eq!(embryo_ids.len(), 3);
    let embryo_id = embryo_ids[0].clone();
    let embryo_path = format!("/api/v1/embryos/{embryo_id}");

    // A viewer is logged in and sees every change.
    let mut viewer = ViewerClient::login(
        fx.server.info.address("viewer"),
        &fx.server.info.client_tls("viewer"),
        &Credentials {
            user: "reader".into(),
            password: PASSWORD.into(),
            computer: "VIEWER-1".into(),
        },
        common::TIMEOUT,
    )
    .unwrap();

    let embryo = api.get(&embryo_path);
    assert_eq!(embryo.header("etag"), Some("\"1\""));
    assert_eq!(ok(&embryo, 200)["fate"], "undecided");

    // A write without If-Match could overwrite a change it never saw: 428.
    let blind = api.call(
        "PUT",
        &format!("{embryo_path}/fate"),
        &[],
        Some(json!({"fate": "transfer"})),
    );
    assert_eq!(ok(&blind, 428)["code"], "precondition_required");

    // The same Idempotency-Key twice is one change.
    let before = last_seq(&mut api);
    let headers = [("if-match", "\"1\""), ("idempotency-key", "fate-E1-0001")];
    let first = api.call(
        "PUT",
        &format!("{embryo_path}/fate"),
        &headers,
        Some(json!({"fate": "transfer"})),
    );
    assert_eq!(ok(&first, 200)["version"], 2);
    assert_eq!(first.header("etag"), Some("\"2\""));
    let retry = api.call(
        "PUT",
        &format!("{embryo_path}/fate"),
        &headers,
        Some(json!({"fate": "transfer"})),
    );
    assert_eq!(ok(&retry, 200)["version"], 2);
    assert_eq!(retry.header("idempotent-replayed"), Some("true"));
    let feed = ok(&api.get(&format!("/api/v1/changes?after={before}")), 200);
    let embryo_changes: Vec<&Value> = feed["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["entity"] == "embryo" && c["id"] == embryo_id.as_str())
        .collect();
    assert_eq!(embryo_changes.len(), 1, "{feed}");
    assert_eq!(embryo_changes[0]["version"], 2);
    // The same key with another request is refused, and changes nothing.
    let reused = api.call(
        "PUT",
        &format!("{embryo_path}/fate"),
        &headers,
        Some(json!({"fate": "avoid"})),
    );
    assert_eq!(ok(&reused, 422)["code"], "idempotency_key_reused");

    // A stale ETag gets 412 with the current state and its ETag.
    let stale = api.call(
        "PUT",
        &format!("{embryo_path}/fate"),
        &[("if-match", "\"1\"")],
        Some(json!({"fate": "freeze"})),
    );
    let body = ok(&stale, 412);
    assert_eq!(body["code"], "precondition_failed");
    assert_eq!(body["current"]["version"], 2);
    assert_eq!(body["current"]["fate"], "transfer");
    assert_eq!(stale.header("etag"), Some("\"2\""));
    assert_eq!(ok(&api.get(&embryo_path), 200)["fate"], "transfer");

    // A score, then a transfer and its outcome.
    let scored = api.call(
        "PUT",
        &format!("{embryo_path}/scores/iDAScore"),
        &[("if-match", "\"2\"")],
        Some(json!({"value": "8.7", "model_version": "2.0", "viability": "high"})),
    );
    assert_eq!(ok(&scored, 200)["scores"][0]["value"], "8.7");
    let created = api.call(
        "POST",
        &format!("{treatment}/transfers"),
        &[("idempotency-key", "transfer-1")],
        Some(json!({"transferred_at": "2025-10-14T09:30:00Z", "embryo_ids": [embryo_id], "comment": "SET"})),
    );
    let transfer = ok(&created, 201);
    let location = created.header("location").unwrap().to_string();
    assert_eq!(
        location,
        format!("/api/v1/transfers/{}", transfer["transfer_id"])
    );
    let again = api.call(
        "POST",
        &format!("{treatment}/transfers"),
        &[("idempotency-key", "transfer-1")],
        Some(json!({"transferred_at": "2025-10-14T09:30:00Z", "embryo_ids": [embryo_id], "comment": "SET"})),
    );
    assert_eq!(ok(&again, 201)["transfer_id"], transfer["transfer_id"]);
    let listed = ok(&api.get(&format!("{treatment}/transfers")), 200);
    assert_eq!(
        listed["items"].as_array().unwrap().len(),
        1,
        "one transfer after a retried POST"
    );

    let held = last_seq(&mut api);
    let outcome = api.call(
        "PUT",
        &format!("{location}/outcome"),
        &[("if-match", "\"1\"")],
        Some(json!({"gestational_sacs": 1, "fetal_heartbeats": 1, "clinical_pregnancy": true, "live_birth": null, "comment": "7w scan"})),
    );
    let outcome = ok(&outcome, 200);
    assert_eq!(outcome["outcome"]["fetal_heartbeats"], 1);
    assert_eq!(outcome["version"], 2);

    // The change feed returns it after the seq the EMR held ...
    let feed = ok(&api.get(&format!("/api/v1/changes?after={held}")), 200);
    let items = feed["items"].as_array().unwrap();
    assert_eq!(items.len(), 1, "{feed}");
    assert_eq!(items[0]["entity"], "transfer");
    assert_eq!(items[0]["version"], 2);
    // ... and the logged-in viewer received it.
    let transfer_id = transfer["transfer_id"].to_string();
    viewer.wait_for_change(held + 1).unwrap();
    assert!(
        viewer
            .notices
            .iter()
            .any(|n| n.entity == "transfer" && n.id == transfer_id && n.version == 2),
        "the viewer got the transfer's change"
    );

    // A long poll waits for the next change and returns it.
    let now_seq = last_seq(&mut api);
    let server_api = fx.server.info.address("public-api");
    let tls = fx.server.info.client_tls("public-api");
    let key = fx.write_key.clone();
    let poll = std::thread::spawn(move || {
        let mut http = HttpClient::new(server_api, tls, Duration::from_secs(60));
        let auth = format!("Bearer {key}");
        http.get(
            &format!("/api/v1/changes?after={now_seq}&wait=30"),
            &[("authorization", &auth)],
        )
        .unwrap()
    });
    std::thread::sleep(Duration::from_millis(300));
    let comment = api.call(
        "PUT",
        &treatment,
        &[("if-match", "\"1\"")],
        Some(json!({"comment": "from the EMR"})),
    );
    assert_eq!(ok(&comment, 200)["comment"], "from the EMR");
    let polled = poll.join().unwrap();
    let polled = ok(&polled, 200);
    assert_eq!(polled["items"][0]["entity"], "treatment", "{polled}");
    assert_eq!(polled["items"][0]["seq"], now_seq + 1);

    // A cursor from the future is refused: the client must resynchronise.
    let ahead = api.get(&format!("/api/v1/changes?after={}", now_seq + 1000));
    assert_eq!(ok(&ahead, 410)["code"], "cursor_expired");
    drop(fx.dir);
}

#[test]
fn rights_keys_errors_images_and_zip() {
    let fx = fixture("API-2", 4);
    let mut api = Api::new(&fx.server, &fx.write_key);
    let (_treatment, _, embryo_ids) = treatment_path(&mut api);
    let embryo_path = format!("/api/v1/embryos/{}", embryo_ids[1]);

    // No credential, a bad one, a revoked key.
    let mut anonymous = client(&fx.server);
    let none = anonymous.get("/api/v1/patients", &[]).unwrap();
    assert_eq!(ok(&none, 401)["code"], "auth_required");
    let bogus = anonymous
        .get(
            "/api/v1/patients",
            &[("authorization", "Bearer 0123456789abcdef0123456789abcdef")],
        )
        .unwrap();
    assert_eq!(ok(&bogus, 401)["code"], "auth_failed");

    // A read key reads but may not write.
    let mut reader = Api::new(&fx.server, &fx.read_key);
    assert_eq!(reader.get(&embryo_path).status, 200);
    let refused = reader.call(
        "PUT",
        &format!("{embryo_path}/fate"),
        &[("if-match", "\"1\"")],
        Some(json!({"fate": "avoid"})),
    );
    assert_eq!(ok(&refused, 403)["code"], "forbidden");
    let key_id = &fx.read_key[4..20];
    let revoke = Command::new(common::esserver_path())
        .args(["apikey", "revoke", key_id, "--data"])
        .arg(fx.server.data_dir())
        .output()
        .unwrap();
    assert!(revoke.status.success(), "{revoke:?}");
    assert_eq!(
        reader.get(&embryo_path).status,
        401,
        "a revoked key stops at once"
    );

    // A user logs in for a token; a view user may not write.
    let login = anonymous
        .request(
            "POST",
            "/api/v1/login",
            &[("content-type", "application/json")],
            Some(
                json!({"username": "reader", "password": PASSWORD})
                    .to_string()
                    .as_bytes(),
            ),
        )
        .unwrap();
    let token = ok(&login, 200)["token"].as_str().unwrap().to_string();
    let mut viewer_user = Api::new(&fx.server, &token);
    assert_eq!(viewer_user.get(&embryo_path).status, 200);
    let refused = viewer_user.call(
        "PUT",
        &format!("{embryo_path}/fate"),
        &[("if-match", "\"1\"")],
        Some(json!({"fate": "avoid"})),
    );
    assert_eq!(refused.status, 403);
    let disable = Command::new(common::esserver_path())
        .args(["user", "disable", "reader", "--data"])
        .arg(fx.server.data_dir())
        .output()
        .unwrap();
    assert!(disable.status.success(), "{disable:?}");
    assert_eq!(
        viewer_user.get(&embryo_path).status,
        401,
        "a disabled user's token stops at once"
    );
    let wrong = anonymous
        .request(
            "POST",
            "/api/v1/login",
            &[("content-type", "application/json")],
            Some(
                json!({"username": "emr", "password": "wrong-Password-1"})
                    .to_string()
                    .as_bytes(),
            ),
        )
        .unwrap();
    assert_eq!(ok(&wrong, 401)["code"], "auth_failed");

    // Errors have one shape with stable codes.
    let cases: [(&str, &str, Option<&str>, u16, &str); 6] = [
        ("GET", "/api/v1/embryos/NO-SUCH", None, 404, "not_found"),
        ("GET", "/api/v1/nothing", None, 404, "not_found"),
        (
            "DELETE",
            "/api/v1/patients",
            None,
            405,
            "method_not_allowed",
        ),
        (
            "PUT",
            &format!("{embryo_path}/fate"),
            Some("{not json"),
            400,
            "invalid_json",
        ),
        (
            "GET",
            "/api/v1/patients?limit=0",
            None,
            400,
            "invalid_parameter",
        ),
        (
            "GET",
            "/api/v1/changes?wait=3600",
            None,
            400,
            "invalid_parameter",
        ),
    ];
    for (method, path, body, status, code) in cases {
        let mut headers = vec![("authorization", api.auth.clone())];
        headers.push(("if-match", "\"1\"".to_string()));
        let headers: Vec<(&str, &str)> = headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
        let response = api
            .http
            .request(method, path, &headers, body.map(str::as_bytes))
            .unwrap();
        let value = ok(&response, status);
        assert_eq!(value["code"], code, "{method} {path}");
        assert!(value["message"].as_str().is_some_and(|m| !m.is_empty()));
    }

    // Acquisitions, one image, the time-lapse as a ZIP.
    let acquisitions = ok(
        &api.get(&format!("{embryo_path}/acquisitions?limit=2")),
        200,
    );
    let items = acquisitions["items"].as_array().unwrap();
    assert_eq!(items.len(), 2);
    let next = acquisitions["next_after"].as_str().unwrap();
    let rest = ok(
        &api.get(&format!("{embryo_path}/acquisitions?after={next}")),
        200,
    );
    assert_eq!(rest["items"].as_array().unwrap().len(), 2);
    assert!(rest["next_after"].is_null());
    let at = items[0]["acquired_at_ms"].as_i64().unwrap();
    let image = api.get(&format!("{embryo_path}/images/{at}?focal_plane=0"));
    assert_eq!(image.status, 200);
    assert_eq!(image.header("content-type"), Some("image/jpeg"));
    assert_eq!(&image.body[..2], &[0xff, 0xd8]);
    let zip = api.get(&format!("{embryo_path}/timelapse?focal_plane=0"));
    assert_eq!(zip.status, 200);
    assert_eq!(zip.header("transfer-encoding"), Some("chunked"));
    assert_eq!(zip_entries(&zip.body), 4);
    let missing = api.get(&format!("{embryo_path}/timelapse?focal_plane=7"));
    assert_eq!(missing.status, 204, "no images at that plane");

    // Every request is logged with who made it; nothing secret reaches the log.
    let log = common::server_log(&fx.dir);
    let key_id = &fx.write_key[4..20];
    assert!(
        log.lines()
            .any(|l| l.contains("public API request") && l.contains(&format!("key:{key_id}"))),
        "requests are logged with their key"
    );
    for secret in [PASSWORD, &token, &fx.write_key[20..]] {
        assert!(!log.contains(secret), "the log holds a secret");
    }

    // Both refused writes are in the audit trail: the read key's and the view user's.
    let Fixture {
        mut server, dir, ..
    } = fx;
    assert_eq!(server.terminate(Duration::from_secs(20)), Some(0));
    let store = es_storage::Store::open(server.data_dir(), &Default::default(), [0; 16]).unwrap();
    let audit = store.read().unwrap().audit_after(0, 1000).unwrap();
    let denied: Vec<_> = audit
        .iter()
        .filter(|a| a.outcome.as_str() == "denied" && a.action == "embryo.fate")
        .map(|a| a.user.as_str())
        .collect();
    assert_eq!(denied.len(), 2, "{denied:?}");
    assert!(denied[0].starts_with("api-key:"), "{denied:?}");
    assert_eq!(denied[1], "reader");
    drop(dir);
}

/// The entry count of a ZIP's end record, after checking its signatures.
fn zip_entries(bytes: &[u8]) -> u16 {
    assert_eq!(&bytes[..4], b"PK\x03\x04");
    let end = &bytes[bytes.len() - 22..];
    assert_eq!(&end[..4], b"PK\x05\x06");
    u16::from_le_bytes([end[10], end[11]])
}

fn python(script: &str, args: &[String]) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let output = Command::new("python3")
        .arg(root.join("tests/python").join(script))
        .args(args)
        .output()
        .expect("python3 runs (scripts/test.sh installs its packages)");
    let stdout = String::from_utf8_lossy(&output.stdout).to_string();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{script} failed:\n{stdout}\n{stderr}"
    );
    stdout
}

/// A clinic as the original API's field clients see one: an instrument with its own number
/// (3253), embryo ids in the original's convention, two patients (one without a known date of
/// birth, with a free-text record number), treatment names with spaces, ICSI and IVF dishes,
/// image runs at three focal planes, a timing and a categorical annotation, a dish still in
/// culture; a server whose `[Clinic]` names its site and zone.
fn seed_like_a_clinic(server: &ServerProcess) {
    use es_proto::incubator::{pb, Message};
    let mut identity = common::identity("ES-3253", "es-plus");
    identity.instrument_number = 3253;
    let mut incubator = common::connect(server, &mut identity);
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    // (dish, record number, names, date of birth, treatment, method, t0, wells)
    let dishes = [
        (
            "S01790",
            "520.124",
            ("Anna", "Berg"),
            "1988-04-12",
            "2022 - 1449",
            "ICSI",
            common::START_MS,
            3,
        ),
        (
            "S01791",
            "send mail to Martin",
            ("", "Olsen"),
            "",
            "2023-0107",
            "IVF",
            common::START_MS + 3_600_000,
            2,
        ),
        (
            "S01792",
            "520.124",
            ("Anna", "Berg"),
            "1988-04-12",
            "2026 - 0001",
            "ICSI",
            now_ms - 86_400_000,
            2,
        ),
    ];
    let mut seq = 0;
    let mut request = |message: Message| {
        let answer = incubator.request(message, common::TIMEOUT).unwrap();
        assert!(matches!(answer, Message::Ack(_)), "{answer:?}");
    };
    for (dish_id, patient_id, (first, last), born, treatment, method, t0, wells) in dishes {
        seq += 1;
        let day = esserver::times::utc_day(t0).replace('-', ".");
        let embryo_id = |well: u32| format!("D{day}_{dish_id}_I3253_P-{well}");
        request(Message::RegisterDish(pb::RegisterDish {
            seq,
            dish_id: dish_id.into(),
            slot: 4,
            patient: Some(pb::Patient {
                patient_id: patient_id.into(),
                first_name: first.into(),
                last_name: last.into(),
                date_of_birth: born.into(),
            }),
            treatment_name: treatment.into(),
            insemination_time_ms: t0,
            wells: (1..=wells)
                .map(|well| pb::DishWell {
                    well,
                    embryo_id: embryo_id(well),
                    label: String::new(),
                })
                .collect(),
            fertilization_method: method.into(),
        }));
        for run in 0..3i64 {
            for well in 1..=wells {
                for focal_plane in [-15, 0, 15] {
                    seq += 1;
                    let jpeg = es_loadtest::frames::generate(1, seq % 200 + 1).remove(0);
                    request(Message::Image(pb::Image {
                        seq,
                        dish_id: dish_id.into(),
                        well,
                        focal_plane,
                        acquired_at_ms: t0 + 1_080_000 + run * 600_000 + i64::from(well) * 1000,
                        jpeg,
                    }));
                }
            }
        }
    }
    // Annotations, through the viewer as an embryologist makes them.
    let mut viewer = ViewerClient::login(
        server.info.address("viewer"),
        &server.info.client_tls("viewer"),
        &Credentials {
            user: "emr".into(),
            password: PASSWORD.into(),
            computer: "PC10T4L7".into(),
        },
        common::TIMEOUT,
    )
    .unwrap();
    use es_proto::viewer::pb as vpb;
    let day = esserver::times::utc_day(common::START_MS).replace('-', ".");
    let first = format!("D{day}_S01790_I3253_P-1");
    for (version, name, value, event_at_ms) in [
        (
            1,
            "t2",
            "",
            Some(common::START_MS + 23 * 3_600_000 + 1_080_000),
        ),
        (2, "PN", "2", None),
    ] {
        let request = vpb::client_message::Request::AddAnnotation(vpb::AddAnnotation {
            embryo_id: first.clone(),
            expected_version: version,
            annotation: Some(vpb::AnnotationInput {
                name: name.into(),
                value: value.into(),
                event_at_ms: event_at_ms.unwrap_or(0),
                has_event: event_at_ms.is_some(),
                source: "manual".into(),
            }),
        });
        viewer.call(request).unwrap();
    }
}

#[test]
fn the_original_api_answer_for_answer_and_a_typed_load_twice() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::spawn_in(
        &dir,
        true,
        "[Clinic]\nsite_name = NEXTGEN\ntime_zone = Europe/Copenhagen\n",
    );
    common::add_user(&server, "emr", "edit", PASSWORD);
    // The original's factory API account; clients log in as `Web` or `WEB`.
    common::add_user(&server, "Web", "view", PASSWORD);
    seed_like_a_clinic(&server);
    let address = server.info.address("public-api");
    let database = dir.path().join("warehouse.sqlite");
    let stdout = python(
        "api_compat_walk.py",
        &[
            "--base".into(),
            format!("https://{address}"),
            "--user".into(),
            "emr".into(),
            "--password".into(),
            PASSWORD.into(),
            "--reader".into(),
            "WEB".into(),
            "--site".into(),
            "NEXTGEN".into(),
            "--time-zone".into(),
            "Europe/Copenhagen".into(),
            "--database".into(),
            database.display().to_string(),
        ],
    );
    println!("{stdout}");
    assert!(stdout.contains("PASS: all checks passed"), "{stdout}");
    assert!(stdout.contains("second load: 0 new rows"), "{stdout}");

    // The viewer protocol shows the identifiers the REST API (and so the original API) shows.
    use es_proto::viewer::pb as vpb;
    use vpb::{client_message::Request, server_message::Body};
    let key = common::create_api_key(&server, "check", "read");
    let mut rest = Api::new(&server, &key);
    let patient = ok(&rest.get("/api/v1/patients/520.124"), 200);
    let mut viewer = ViewerClient::login(
        server.info.address("viewer"),
        &server.info.client_tls("viewer"),
        &Credentials {
            user: "emr".into(),
            password: PASSWORD.into(),
            computer: "VIEWER-1".into(),
        },
        common::TIMEOUT,
    )
    .unwrap();
    let Body::Patient(shown) = viewer
        .call(Request::GetPatient(vpb::GetPatient {
            patient_id: "520.124".into(),
        }))
        .unwrap()
    else {
        panic!("a patient")
    };
    assert!(shown.patient_idx.starts_with("NEXTGEN_"), "{shown:?}");
    assert_eq!(patient["patient_idx"], shown.patient_idx.as_str());
    let day = esserver::times::utc_day(common::START_MS).replace('-', ".");
    let embryo_id = format!("D{day}_S01790_I3253_P-2");
    let embryo = ok(&rest.get(&format!("/api/v1/embryos/{embryo_id}")), 200);
    let Body::Embryo(seen) = viewer
        .call(Request::GetEmbryo(vpb::GetEmbryo {
            embryo_id: embryo_id.clone(),
        }))
        .unwrap()
    else {
        panic!("an embryo")
    };
    assert_eq!(
        (
            seen.label.as_str(),
            seen.instrument_number,
            seen.fertilization_method.as_str()
        ),
        ("AA2", 3253, "ICSI")
    );
    assert_eq!(embryo["label"], "AA2");
    assert_eq!(embryo["instrument_number"], 3253);
    assert_eq!(embryo["fertilization_method"], "ICSI");
}

/// Raw bytes on one connection: pipelined requests are answered in order; a body over the
/// limit is refused from its declared length and the connection closed; smuggling-shaped
/// framing is refused; the server keeps serving.
#[test]
fn pipelining_limits_and_malformed_requests() {
    use es_net::client::ClientConn;
    let (server, _dir) = common::spawn(true);
    let address = server.info.address("public-api");
    let tls = server.info.client_tls("public-api");
    let exchange = |bytes: &[u8]| -> String {
        let mut conn = ClientConn::connect(address, &tls, common::TIMEOUT).unwrap();
        conn.queue(bytes);
        let deadline = Instant::now() + common::TIMEOUT;
        while !conn.is_eof() && Instant::now() < deadline {
            conn.pump(deadline).unwrap();
        }
        String::from_utf8_lossy(conn.input()).to_string()
    };
    let two = exchange(
        b"GET /api/v1/openapi.json HTTP/1.1\r\nhost: x\r\n\r\nGET /api/v1/patients HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    );
    let first = two.find("HTTP/1.1 200").expect("the first answer");
    let second = two.find("HTTP/1.1 401").expect("the second answer");
    assert!(first < second, "answers in request order");

    let big =
        exchange(b"POST /api/v1/login HTTP/1.1\r\nhost: x\r\ncontent-length: 99999999\r\n\r\n");
    assert!(big.starts_with("HTTP/1.1 413"), "{big}");
    assert!(big.contains("body_too_large"));
    let smuggled = exchange(
        b"POST /api/v1/login HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\ntransfer-encoding: chunked\r\n\r\n0\r\n\r\n",
    );
    assert!(smuggled.starts_with("HTTP/1.1 400"), "{smuggled}");
    let garbage = exchange(b"\x16\x03\x01 not http at all\r\n\r\n");
    assert!(garbage.starts_with("HTTP/1.1 400"), "{garbage}");
    let long = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(10_000));
    assert!(exchange(long.as_bytes()).starts_with("HTTP/1.1 414"));

    // Still serving.
    let mut http = client(&server);
    assert_eq!(http.get("/api/v1/openapi.json", &[]).unwrap().status, 200);
}

/// `IDASCORE` without parameters answers every scored embryo of the clinic, streamed a page
/// at a time: across pages it is one valid JSON document with each embryo once, in order.
#[test]
fn idascore_without_parameters_streams_every_scored_embryo_across_pages() {
    use es_proto::incubator::{pb, Message};
    let (server, _dir) = common::spawn(true);
    common::add_user(&server, "emr", "edit", PASSWORD);
    let mut identity = common::identity("IDA-1", "es-plus");
    let mut incubator = common::connect(&server, &mut identity);
    let embryos = esserver::api::compat::SCORES_PAGE_ROWS * 3 + 13;
    let embryo_id = |well: u32| format!("D2025.10.09_S00001_I1_P-{well}");
    let answer = incubator
        .request(
            Message::RegisterDish(pb::RegisterDish {
                seq: 1,
                dish_id: "S00001".into(),
                slot: 1,
                patient: Some(pb::Patient {
                    patient_id: "MRN-IDA".into(),
                    ..Default::default()
                }),
                treatment_name: "2025-1".into(),
                insemination_time_ms: common::START_MS,
                wells: (1..=embryos)
                    .map(|well| pb::DishWell {
                        well,
                        embryo_id: embryo_id(well),
                        label: String::new(),
                    })
                    .collect(),
                fertilization_method: String::new(),
            }),
            common::TIMEOUT,
        )
        .unwrap();
    assert!(matches!(answer, Message::Ack(_)), "{answer:?}");
    let key = common::create_api_key(&server, "scores", "write");
    let mut rest = Api::new(&server, &key);
    // Every embryo but each seventh gets an iDAScore; well 3 gets another model only.
    let mut scored = Vec::new();
    for well in 1..=embryos {
        let model = if well == 3 { "KIDScore" } else { "iDAScore" };
        if well % 7 == 0 {
            continue;
        }
        let path = format!("/api/v1/embryos/{}/scores/{model}", embryo_id(well));
        let body = json!({ "value": format!("{}.5", well % 10), "model_version": "2.0.4" });
        ok(
            &rest.call("PUT", &path, &[("if-match", "\"1\"")], Some(body)),
            200,
        );
        if model == "iDAScore" {
            scored.push(embryo_id(well));
        }
    }
    let mut http = client(&server);
    let token = {
        let login = http
            .get(&format!("/LOGIN?username=emr&password={PASSWORD}"), &[])
            .unwrap();
        ok(&login, 200)["Token"].as_str().unwrap().to_string()
    };
    let answer = http
        .get("/GET/IDASCORE", &[("api-token", token.as_str())])
        .unwrap();
    assert_eq!(answer.header("transfer-encoding"), Some("chunked"));
    let body = ok(&answer, 200);
    let listed: Vec<&str> = body["Scores"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["EmbryoID"].as_str().unwrap())
        .collect();
    assert!(scored.len() > 2 * esserver::api::compat::SCORES_PAGE_ROWS as usize);
    assert_eq!(listed, scored);
    let first = &body["Scores"][0];
    assert_eq!(first["Viability"], 1.5);
    assert_eq!(first["Version"], "2.0.4");
    // A HEAD gets the head only; the connection serves the next call.
    let head = http
        .request(
            "HEAD",
            "/GET/IDASCORE",
            &[("api-token", token.as_str())],
            None,
        )
        .unwrap();
    assert_eq!((head.status, head.body.len()), (200, 0));
    let again = http
        .get("/GET/idascore", &[("api-token", token.as_str())])
        .unwrap();
    assert_eq!(ok(&again, 200), body);
}
