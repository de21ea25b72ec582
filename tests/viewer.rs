//! The viewer interface against a real server (TLS with the generated certificate, pinned):
//! two viewers sharing a save and a conflict, rights, lock-out, and a playback that survives
//! a dropped connection through its session token.

mod common;

use es_loadtest::sim::{self, Pacing, Workload};
use es_loadtest::spawn::ServerProcess;
use es_loadtest::viewer_client::{Credentials, ViewerClient, ViewerError};
use es_perf::catalog::DeviceModel;
use es_proto::viewer::pb::{self, client_message::Request, server_message::Body};
use es_proto::viewer::ErrorCode;
use std::io::Write;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::START_MS;
const PASSWORD: &str = "Embryo-2026!";

fn credentials(user: &str, password: &str) -> Credentials {
    Credentials {
        user: user.into(),
        password: password.into(),
        computer: format!("VIEWER-{user}"),
    }
}

fn login(server: &ServerProcess, user: &str, password: &str) -> Result<ViewerClient, ViewerError> {
    ViewerClient::login(
        server.info.address("viewer"),
        &server.info.client_tls("viewer"),
        &credentials(user, password),
        common::TIMEOUT,
    )
}

fn embryo(client: &mut ViewerClient, embryo_id: &str) -> pb::Embryo {
    let request = Request::GetEmbryo(pb::GetEmbryo {
        embryo_id: embryo_id.into(),
    });
    match client.call(request).unwrap() {
        Body::Embryo(embryo) => embryo,
        other => panic!("unexpected {other:?}"),
    }
}

fn add_t2(embryo_id: &str, expected_version: u64, hours: i64) -> Request {
    Request::AddAnnotation(pb::AddAnnotation {
        embryo_id: embryo_id.into(),
        expected_version,
        annotation: Some(pb::AnnotationInput {
            name: "t2".into(),
            value: String::new(),
            event_at_ms: START_MS - 3_600_000 + hours * 3_600_000,
            has_event: true,
            source: "manual".into(),
        }),
    })
}

#[test]
fn two_viewers_share_a_save_and_a_stale_write_is_a_conflict_in_the_audit_trail() {
    let (mut server, dir) = common::spawn(true);
    common::add_user(&server, "anna", "edit", PASSWORD);
    common::add_user(&server, "bert", "edit", PASSWORD);
    let workload = common::upload_dish(&server, "VW-1", 2);
    let embryo_id = format!("{}_S1_P-1", workload.serial);

    let mut anna = login(&server, "anna", PASSWORD).unwrap();
    let mut bert = login(&server, "bert", PASSWORD).unwrap();
    assert_eq!(anna.login.rights, "edit");
    assert_eq!(anna.login.server_id, server.info.server_id);

    // Browse: patient -> treatment -> dish -> embryo, acquisitions and one image.
    let patients = match anna
        .call(Request::ListPatients(pb::ListPatients::default()))
        .unwrap()
    {
        Body::PatientList(list) => list.patients,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(patients.len(), 1);
    let treatment = &patients[0].treatments[0];
    let dishes = match anna
        .call(Request::ListDishes(pb::ListDishes {
            patient_id: patients[0].patient_id.clone(),
            treatment_name: treatment.name.clone(),
        }))
        .unwrap()
    {
        Body::DishList(list) => list.dishes,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(dishes.len(), 1);
    let dish = match anna
        .call(Request::GetDish(pb::GetDish {
            dish_key: dishes[0].dish_key,
        }))
        .unwrap()
    {
        Body::Dish(dish) => dish,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(dish.embryos.len(), 3);
    assert_eq!(dish.embryos[0].embryo_id, embryo_id);
    let overview = match anna
        .call(Request::DishOverview(pb::DishOverview {
            dish_key: dish.dish_key,
            focal_plane: 0,
        }))
        .unwrap()
    {
        Body::Overview(overview) => overview,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(overview.well_numbers, [1, 2, 3]);
    assert!(overview
        .wells
        .iter()
        .all(|image| image.jpeg.starts_with(&[0xff, 0xd8])));

    // A saves t2; B is pushed the change with the new version.
    let before = embryo(&mut anna, &embryo_id);
    let saved = match anna.call(add_t2(&embryo_id, before.version, 26)).unwrap() {
        Body::Saved(saved) => saved,
        other => panic!("unexpected {other:?}"),
    };
    assert_eq!(
        (saved.entity.as_str(), saved.id.as_str()),
        ("embryo", embryo_id.as_str())
    );
    assert_eq!(saved.version, before.version + 1);
    bert.wait_for_change(saved.change_seq).unwrap();
    let notice = bert
        .notices
        .iter()
        .find(|n| n.change_seq == saved.change_seq)
        .expect("B received the notice of A's save");
    assert_eq!(
        (notice.entity.as_str(), notice.id.as_str(), notice.version),
        ("embryo", embryo_id.as_str(), saved.version)
    );
    // Notices arrive in seq order without gaps.
    let seqs: Vec<u64> = bert.notices.iter().map(|n| n.change_seq).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "{seqs:?}");

    // B saves on the version it had: conflict, with A's value attached; nothing changes.
    let error = bert
        .call(add_t2(&embryo_id, before.version, 27))
        .unwrap_err();
    let ViewerError::Server {
        current_version,
        current_json,
        ..
    } = &error
    else {
        panic!("unexpected {error:?}");
    };
    assert_eq!(error.error_code(), Some(ErrorCode::Conflict));
    assert_eq!(*current_version, saved.version);
    assert!(current_json.contains("anna"), "{current_json}");
    let after = embryo(&mut bert, &embryo_id);
    assert_eq!(after.version, saved.version);
    assert_eq!(after.annotations.len(), 1);
    assert_eq!(after.annotations[0].set_by, "anna");
    assert!((after.annotations[0].hours - 26.0).abs() < 1e-9);

    // B reloads and saves on the current version.
    let fate = Request::SetFate(pb::SetFate {
        embryo_id: embryo_id.clone(),
        expected_version: after.version,
        fate: "transfer".into(),
    });
    assert!(matches!(bert.call(fate).unwrap(), Body::Saved(_)));
    drop(anna);
    drop(bert);

    // The audit trail holds both attempts with their outcome.
    assert_eq!(server.terminate(Duration::from_secs(20)), Some(0));
    let store = es_storage::Store::open(server.data_dir(), &Default::default(), [0; 16]).unwrap();
    let audit = store.read().unwrap().audit_after(0, 1000).unwrap();
    let attempts: Vec<_> = audit
        .iter()
        .filter(|a| a.action == "annotation.add")
        .map(|a| (a.user.as_str(), a.outcome.as_str(), a.computer.as_str()))
        .collect();
    assert_eq!(
        attempts,
        [
            ("anna", "applied", "VIEWER-anna"),
            ("bert", "conflict", "VIEWER-bert")
        ]
    );
    assert!(audit
        .iter()
        .any(|a| a.action == "embryo.fate" && a.user == "bert"));
    drop(dir);
}

#[test]
fn a_view_user_cannot_write_and_five_wrong_passwords_lock_the_account() {
    let (mut server, dir) = common::spawn(true);
    common::add_user(&server, "vera", "view", PASSWORD);
    common::add_user(&server, "carl", "edit", PASSWORD);
    let workload = common::upload_dish(&server, "VW-2", 1);
    let embryo_id = format!("{}_S1_P-2", workload.serial);

    let mut vera = login(&server, "vera", PASSWORD).unwrap();
    assert_eq!(vera.login.rights, "view");
    let current = embryo(&mut vera, &embryo_id);
    let error = vera
        .call(add_t2(&embryo_id, current.version, 25))
        .unwrap_err();
    assert_eq!(
        error.error_code(),
        Some(ErrorCode::PermissionDenied),
        "{error}"
    );
    assert_eq!(
        embryo(&mut vera, &embryo_id).version,
        current.version,
        "nothing was written"
    );
    // Reads still work on the same connection.
    assert!(matches!(
        vera.call(Request::Ping(pb::Ping {})).unwrap(),
        Body::Done(_)
    ));

    // Weak passwords are refused by the command line.
    let output = Command::new(common::esserver_path())
        .args(["user", "passwd", "carl", "--password-stdin", "--data"])
        .arg(server.data_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            writeln!(child.stdin.take().unwrap(), "weakpassword")?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("policy"));

    let message_of = |error: &ViewerError| match error {
        ViewerError::Server { message, .. } => message.clone(),
        other => panic!("not a server refusal: {other}"),
    };
    let mut answers = std::collections::BTreeSet::new();
    for attempt in 1..=5 {
        let error = login(&server, "carl", "Wrong-pass1!")
            .err()
            .expect("refused");
        assert_eq!(
            error.error_code(),
            Some(ErrorCode::AuthFailed),
            "attempt {attempt}: {error}"
        );
        answers.insert(message_of(&error));
    }
    // Locked from this address: even the right password is refused, with the same answer
    // as a wrong password or an unknown user, so a login tells nothing about an account.
    let error = login(&server, "carl", PASSWORD).err().expect("locked");
    assert_eq!(error.error_code(), Some(ErrorCode::AuthFailed));
    answers.insert(message_of(&error));
    let error = login(&server, "nobody", PASSWORD).err().expect("refused");
    assert_eq!(error.error_code(), Some(ErrorCode::AuthFailed));
    answers.insert(message_of(&error));
    assert_eq!(answers.len(), 1, "{answers:?}");
    // The lock is for this address only: from another address the account logs in (the
    // server binds all of loopback; the viewer tool connects from 127.0.0.2 here).
    let stream = common::connect_from(
        std::net::Ipv4Addr::new(127, 0, 0, 2),
        server.info.address("viewer"),
    )
    .unwrap();
    let elsewhere = ViewerClient::login_over(
        stream,
        &server.info.client_tls("viewer"),
        &Credentials {
            user: "carl".into(),
            password: PASSWORD.into(),
            computer: "VIEWER-carl".into(),
        },
        common::TIMEOUT,
    );
    assert!(elsewhere.is_ok(), "{:?}", elsewhere.err());
    drop(elsewhere);
    // Still locked from the first address.
    let error = login(&server, "carl", PASSWORD).err().expect("locked");
    assert_eq!(error.error_code(), Some(ErrorCode::AuthFailed));

    let status = Command::new(common::esserver_path())
        .args(["user", "unlock", "carl", "--data"])
        .arg(server.data_dir())
        .status()
        .unwrap();
    assert!(status.success());
    assert!(login(&server, "carl", PASSWORD).is_ok());
    let log = common::server_log(&dir);
    assert!(
        !log.contains(PASSWORD) && !log.contains("Wrong-pass1!"),
        "a password reached the log"
    );

    // The refused write is in the audit trail, on the user who tried it.
    assert_eq!(server.terminate(Duration::from_secs(20)), Some(0));
    let store = es_storage::Store::open(server.data_dir(), &Default::default(), [0; 16]).unwrap();
    let audit = store.read().unwrap().audit_after(0, 1000).unwrap();
    let denied: Vec<_> = audit
        .iter()
        .filter(|a| a.outcome.as_str() == "denied" && a.user == "vera")
        .map(|a| (a.action.as_str(), a.computer.as_str()))
        .collect();
    assert_eq!(denied, [("annotation.add", "VIEWER-vera")]);
}

fn frame_of(body: Body) -> pb::Frame {
    match body {
        Body::Frame(frame) => frame,
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn playback_resumes_after_the_connection_drops() {
    let (server, _dir) = common::spawn(true);
    common::add_user(&server, "anna", "edit", PASSWORD);
    let workload = common::upload_dish(&server, "VW-3", 40);
    let embryo_id = format!("{}_S1_P-3", workload.serial);

    let mut anna = login(&server, "anna", PASSWORD).unwrap();
    let token = anna.login.session_token.clone();
    let playback = Request::Playback(pb::Playback {
        embryo_id: embryo_id.clone(),
        focal_plane: 0,
        from_ms: 0,
        to_ms: 0,
        max_frames: 0,
    });
    let seq = anna.send(playback);
    let mut seen = Vec::new();
    for _ in 0..10 {
        let frame = frame_of(anna.wait(seq, "a frame").unwrap());
        assert!(!frame.last);
        seen.push(frame.image.unwrap().acquired_at_ms);
    }
    let changes_seen = anna.last_change_seq;
    anna.drop_connection();

    // Reconnect with the session token (no password) and continue after the last frame.
    let mut again = ViewerClient::resume(
        server.info.address("viewer"),
        &server.info.client_tls("viewer"),
        &token,
        changes_seen,
        common::TIMEOUT,
    )
    .unwrap();
    assert_eq!(again.login.user, "anna");
    assert!(!again.login.resync_required);
    let seq = again.send(Request::Playback(pb::Playback {
        embryo_id: embryo_id.clone(),
        focal_plane: 0,
        from_ms: seen.last().unwrap() + 1,
        to_ms: 0,
        max_frames: 0,
    }));
    loop {
        let frame = frame_of(again.wait(seq, "a frame").unwrap());
        if let Some(image) = frame.image {
            seen.push(image.acquired_at_ms);
        }
        if frame.last {
            break;
        }
    }
    let expected: Vec<i64> = (0..40)
        .map(|cycle| START_MS + cycle * 600_000 + 3_000)
        .collect();
    assert_eq!(seen, expected, "every frame once, in time order");

    // The token survives only one connection at a time; after logout it is gone.
    assert!(matches!(
        again.call(Request::Logout(pb::Logout {})).unwrap(),
        Body::Done(_)
    ));
    let error = ViewerClient::resume(
        server.info.address("viewer"),
        &server.info.client_tls("viewer"),
        &token,
        0,
        common::TIMEOUT,
    )
    .err()
    .expect("logged out");
    assert_eq!(error.error_code(), Some(ErrorCode::SessionExpired));
}

/// A 1,000-frame playback completes while 16 simulated EmbryoScope+ upload at 10 x their
/// nominal rate, and the incubators lose no acknowledgement. (Latency under this load is the
/// benchmark's job, not this test's.)
#[test]
fn a_1000_frame_playback_completes_while_16_incubators_upload_at_10x() {
    let (server, _dir) = common::spawn(true);
    common::add_user(&server, "anna", "edit", PASSWORD);
    // One embryo with 1,000 acquisitions at plane 0 (1 dish x 1 well).
    let mut identity = common::identity("VW-PLAY", "es-plus");
    let mut client = common::connect(&server, &mut identity);
    let long = Workload {
        serial: "VW-PLAY".into(),
        model: DeviceModel::EmbryoScopePlus,
        dishes: 1,
        wells_per_dish: 1,
        planes: vec![0],
        cycles: 1000,
        start_ms: START_MS,
        interval_ms: 600_000,
    };
    sim::register_dishes(&mut client, &long, common::TIMEOUT).unwrap();
    let frames = es_loadtest::frames::generate(4, 9);
    let (stats, error) = sim::upload(
        &mut client,
        &long,
        0..long.len(),
        &frames,
        Pacing::Window,
        Instant::now() + Duration::from_secs(120),
    );
    assert!(
        error.is_none() && stats.acked == 1000,
        "{error:?} {stats:?}"
    );
    // Gone before the 16 others connect: they fill the DEMO licence's 16 capacity units.
    client.close(common::TIMEOUT).unwrap();

    // 16 incubators at 10 x nominal (44 images/s each), for about 8 seconds; EmbryoScope 8
    // (1 unit each, the same 11 planes as EmbryoScope+), so that 16 fit high capacity.
    let rate = DeviceModel::EmbryoScopePlus.spec().images_per_second() * 10.0;
    let interval = Duration::from_secs_f64(1.0 / rate);
    let per_incubator = (rate * 8.0) as u64;
    let uploaders: Vec<_> = (0..16)
        .map(|index| {
            let address = server.info.address("incubator");
            let tls = server.info.client_tls("incubator");
            let frames = frames.clone();
            std::thread::spawn(move || {
                let serial = format!("VW-LOAD-{index:02}");
                let mut identity = common::identity(&serial, "es-8");
                let mut client = es_loadtest::client::IncubatorClient::connect(
                    address,
                    &tls,
                    &mut identity,
                    common::TIMEOUT,
                )
                .expect("incubator connects");
                let workload = Workload::full(&serial, DeviceModel::EmbryoScope8, 1, START_MS);
                sim::register_dishes(&mut client, &workload, common::TIMEOUT).unwrap();
                let pacing = Pacing::OpenLoop {
                    start: Instant::now(),
                    interval,
                };
                let deadline = Instant::now() + Duration::from_secs(120);
                sim::upload(
                    &mut client,
                    &workload,
                    0..per_incubator,
                    &frames,
                    pacing,
                    deadline,
                )
            })
        })
        .collect();

    let mut anna = login(&server, "anna", PASSWORD).unwrap();
    let seq = anna.send(Request::Playback(pb::Playback {
        embryo_id: "VW-PLAY_S1_P-1".into(),
        focal_plane: 0,
        from_ms: 0,
        to_ms: 0,
        max_frames: 1000,
    }));
    let mut times = Vec::new();
    loop {
        let frame = frame_of(anna.wait(seq, "a playback frame").unwrap());
        if let Some(image) = frame.image {
            assert_eq!(frame.index as usize, times.len());
            assert!(image.jpeg.starts_with(&[0xff, 0xd8]));
            times.push(image.acquired_at_ms);
        }
        if frame.last {
            break;
        }
    }
    assert_eq!(times.len(), 1000);
    assert!(
        times.windows(2).all(|w| w[0] < w[1]),
        "frames in time order"
    );

    for uploader in uploaders {
        let (stats, error) = uploader.join().unwrap();
        assert!(error.is_none(), "an incubator failed: {error:?}");
        assert!(stats.errors.is_empty(), "{:?}", stats.errors);
        assert_eq!(stats.acked, per_incubator, "every image acknowledged");
    }
}

/// Runs `esserver viewer --ini ... ARGS` with the password on standard input.
fn viewer_tool(
    ini: &std::path::Path,
    user: &str,
    password: &str,
    args: &[&str],
) -> std::process::Output {
    let mut child = Command::new(common::esserver_path())
        .arg("viewer")
        .arg("--ini")
        .arg(ini)
        .args(["--user", user, "--password-stdin", "--computer", "TOOL-PC"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("esserver viewer runs");
    writeln!(child.stdin.take().unwrap(), "{password}").unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn the_viewer_tool_pins_the_certificate_exports_and_annotates() {
    let (server, dir) = common::spawn(true);
    common::add_user(&server, "anna", "edit", PASSWORD);
    let workload = common::upload_dish(&server, "VW-4", 5);
    let embryo_id = format!("{}_S1_P-1", workload.serial);
    let ini = dir.path().join("Viewer_d.ini");
    std::fs::write(
        &ini,
        format!("[Servers]\nClinic={}\n", server.info.address("viewer")),
    )
    .unwrap();

    let output = viewer_tool(&ini, "anna", PASSWORD, &["patients"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(stdout.contains("MRN-VW-4-1"), "{stdout}");
    assert!(stderr.contains("pinned the certificate"), "{stderr}");
    let pins = std::fs::read_to_string(dir.path().join("Viewer_d.pins")).unwrap();
    let fingerprint =
        es_net::tls::fingerprint(&es_net::tls::read_certificate(&server.info.certificate).unwrap());
    assert!(pins.contains(&fingerprint), "{pins}");

    // The ini names the server by IP address: the generated certificate names it, so
    // verifying it with `--ca` (its own certificate as the CA) works too.
    assert!(
        server.info.address("viewer").ip().is_loopback(),
        "{}",
        server.info.address("viewer")
    );
    let ca = server.data_dir().join("tls").join("server.crt");
    let output = viewer_tool(
        &ini,
        "anna",
        PASSWORD,
        &["--ca", ca.to_str().unwrap(), "patients"],
    );
    assert!(
        output.status.success(),
        "--ca against an IP address: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("MRN-VW-4-1"));

    let out = dir.path().join("export");
    let output = viewer_tool(
        &ini,
        "anna",
        PASSWORD,
        &[
            "export",
            &embryo_id,
            "--plane",
            "0",
            "--out",
            out.to_str().unwrap(),
        ],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let files: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
    assert_eq!(files.len(), 5, "one JPEG per acquisition");

    let output = viewer_tool(
        &ini,
        "anna",
        PASSWORD,
        &["annotate", &embryo_id, "t2", "--hours", "25.5"],
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let output = viewer_tool(&ini, "anna", PASSWORD, &["embryo", &embryo_id]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("t2") && stdout.contains("25.50 h") && stdout.contains("by anna"),
        "{stdout}"
    );

    // A changed certificate is refused with a clear message.
    std::fs::write(
        dir.path().join("Viewer_d.pins"),
        format!("{} {}\n", server.info.address("viewer"), "00".repeat(32)),
    )
    .unwrap();
    let output = viewer_tool(&ini, "anna", PASSWORD, &["patients"]);
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("changed since it was pinned"));
}

/// The protocol documents are enough to write a viewer: a Python client written only from
/// `docs/protocol/viewer.md` and `viewer.proto` runs its scenario against a real server (TLS,
/// certificate pinned). `scripts/test.sh` installs its Python packages.
#[test]
fn python_viewer_client_from_the_documents_alone() {
    let (server, _dir) = common::spawn(true);
    common::add_user(&server, "pyanna", "edit", PASSWORD);
    common::add_user(&server, "pybert", "edit", PASSWORD);
    common::add_user(&server, "pyvera", "view", PASSWORD);
    common::upload_dish(&server, "VW-PY", 3);
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let address = server.info.address("viewer");
    let output = Command::new("python3")
        .arg(root.join("tests/python/viewer_client_test.py"))
        .args([
            "--host",
            &address.ip().to_string(),
            "--port",
            &address.port().to_string(),
        ])
        .arg("--cert")
        .arg(&server.info.certificate)
        .arg("--proto-dir")
        .arg(root.join("docs/protocol"))
        .args([
            "--editor",
            "pyanna",
            "--editor2",
            "pybert",
            "--viewer",
            "pyvera",
            "--password",
            PASSWORD,
        ])
        .output()
        .expect("python3 runs (scripts/test.sh installs its packages)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "the Python viewer failed:\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains("PASS: all checks passed"), "{stdout}");
}

/// `[ViewerTransport] cert/key` give the viewer port its own certificate; the other ports keep
/// the generated one.
#[test]
fn the_viewer_port_takes_its_own_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let own = dir.path().join("viewer-cert");
    let (cert, key, _) =
        es_net::tls::ensure_self_signed(&own, &["viewer.clinic".to_string()]).unwrap();
    let extra = format!(
        "[ViewerTransport]\ncert = {}\nkey = {}\n",
        cert.display(),
        key.display()
    );
    let server = common::spawn_in(&dir, true, &extra);
    common::add_user(&server, "anna", "edit", PASSWORD);
    let pinned = |path: &std::path::Path| es_net::client::ClientTls::Tls {
        config: es_net::tls::pinned_client_config(es_net::tls::read_certificate(path).unwrap()),
        server_name: "esserver".try_into().unwrap(),
    };
    let credentials = credentials("anna", PASSWORD);
    let address = server.info.address("viewer");
    assert!(ViewerClient::login(address, &pinned(&cert), &credentials, common::TIMEOUT).is_ok());
    assert!(
        ViewerClient::login(
            address,
            &pinned(&server.info.certificate),
            &credentials,
            common::TIMEOUT
        )
        .is_err(),
        "the viewer port does not present the generated certificate"
    );
    // The incubator port still presents the generated one.
    let mut identity = common::identity("VW-CERT", "es-plus");
    common::connect(&server, &mut identity);
}

/// More pipelined requests than the in-flight limit, then a half-close: every one is answered.
#[test]
fn pipelined_requests_before_a_half_close_are_all_answered() {
    let (server, _dir) = common::spawn(true);
    common::add_user(&server, "anna", "edit", PASSWORD);
    let mut anna = login(&server, "anna", PASSWORD).unwrap();
    let limit = anna.login.inflight_requests_max as usize;
    // Reads go to the worker threads, so the first `limit` stay in flight while the rest wait
    // in the server's input buffer.
    let seqs: Vec<u64> = (0..limit + 8)
        .map(|_| anna.send(Request::ListPatients(pb::ListPatients::default())))
        .collect();
    anna.finish_sending().unwrap();
    for seq in seqs {
        let answer = anna.wait(seq, "an answer").unwrap();
        assert!(
            matches!(answer, Body::PatientList(_)),
            "seq {seq}: {answer:?}"
        );
    }
}

/// A viewer that asks for a long playback and never reads is disconnected after the idle
/// timeout, and its buffers released; the server stays up for the others.
#[test]
fn a_viewer_that_does_not_read_is_disconnected() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::spawn_in(&dir, true, "[Limits]\nidle_timeout_ms = 1500\n");
    common::add_user(&server, "anna", "edit", PASSWORD);
    let workload = common::upload_dish(&server, "VW-SLOW", 1000);
    let mut stalled = login(&server, "anna", PASSWORD).unwrap();
    stalled.send(Request::Playback(pb::Playback {
        embryo_id: format!("{}_S1_P-1", workload.serial),
        focal_plane: 0,
        ..Default::default()
    }));
    stalled.finish_sending().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !common::server_log(&dir).contains("has not read what it was sent") {
        assert!(
            Instant::now() < deadline,
            "the stalled viewer was not disconnected"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut other = login(&server, "anna", PASSWORD).unwrap();
    assert!(matches!(
        other.call(Request::Ping(pb::Ping {})).unwrap(),
        Body::Done(_)
    ));
}

/// SIGTERM during a playback: the playback ends, the viewer is told `shutting_down`, and the
/// server exits 0 well within its shutdown timeout.
#[test]
fn shutdown_during_a_playback_exits_cleanly() {
    let (mut server, _dir) = common::spawn(true);
    common::add_user(&server, "anna", "edit", PASSWORD);
    let workload = common::upload_dish(&server, "VW-STOP", 300);
    let mut anna = login(&server, "anna", PASSWORD).unwrap();
    let seq = anna.send(Request::Playback(pb::Playback {
        embryo_id: format!("{}_S1_P-1", workload.serial),
        focal_plane: 0,
        ..Default::default()
    }));
    let first = frame_of(anna.wait(seq, "a frame").unwrap());
    assert!(first.image.is_some());
    // SIGTERM while the viewer goes on reading (the server flushes what it owes before it
    // closes, so a viewer that stopped reading would hold the stop until its timeout).
    let stopping = std::thread::spawn(move || {
        let started = Instant::now();
        let code = server.terminate(Duration::from_secs(30));
        (code, started.elapsed())
    });
    // The viewer sees its playback end (last frame) and then the connection-level error.
    let mut ended = false;
    loop {
        match anna.wait(seq, "the rest of the playback") {
            Ok(Body::Frame(frame)) if frame.last => ended = true,
            Ok(_) => {}
            Err(ViewerError::Server { name, .. }) => {
                assert_eq!(name, "shutting_down");
                break;
            }
            Err(ViewerError::Closed) => break,
            Err(other) => panic!("unexpected {other}"),
        }
    }
    assert!(ended, "the playback was ended before the connection closed");
    let (code, took) = stopping.join().unwrap();
    assert_eq!(code, Some(0));
    assert!(
        took < Duration::from_secs(10),
        "stopped within the shutdown timeout"
    );
}

/// Disabling an account ends its live viewer connections at once, not only its next login.
#[test]
fn disabling_an_account_closes_its_live_viewer_connections() {
    let (server, _dir) = common::spawn(true);
    common::add_user(&server, "anna", "edit", PASSWORD);
    common::add_user(&server, "bert", "edit", PASSWORD);
    let mut anna = login(&server, "anna", PASSWORD).unwrap();
    let mut bert = login(&server, "bert", PASSWORD).unwrap();
    let output = Command::new(common::esserver_path())
        .args(["user", "disable", "anna", "--data"])
        .arg(server.data_dir())
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    match anna.call(Request::Ping(pb::Ping {})) {
        Err(error @ ViewerError::Server { .. }) => {
            assert_eq!(
                error.error_code(),
                Some(ErrorCode::AccountDisabled),
                "{error}"
            )
        }
        other => panic!("anna's connection should have been closed: {other:?}"),
    }
    // Only anna's.
    assert!(bert.call(Request::Ping(pb::Ping {})).is_ok());
    // And her session cannot be resumed or logged into.
    let again = login(&server, "anna", PASSWORD);
    assert!(matches!(again, Err(ViewerError::Server { .. })));
}

/// A viewer that logged in while the change log was empty (LoginOk.last_change_seq 0) and
/// saw no notice before its connection dropped resumes with changes_after 0: at a resume that
/// means "after seq 0", so the changes made while it was away are pushed, not skipped.
#[test]
fn a_resume_after_an_empty_change_log_misses_nothing() {
    let (server, _dir) = common::spawn(true);
    common::add_user(&server, "anna", "edit", PASSWORD);
    let anna = login(&server, "anna", PASSWORD).unwrap();
    let token = anna.login.session_token.clone();
    assert_eq!(
        anna.login.last_change_seq, 0,
        "a fresh server's change log is empty"
    );
    anna.drop_connection();
    // Meanwhile an incubator registers a dish and uploads: changes 1, 2, ...
    common::upload_dish(&server, "VW-EMPTY", 1);
    let mut again = ViewerClient::resume(
        server.info.address("viewer"),
        &server.info.client_tls("viewer"),
        &token,
        0,
        common::TIMEOUT,
    )
    .unwrap();
    assert!(!again.login.resync_required);
    let last = again.login.last_change_seq;
    assert!(last > 0);
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    while !again.notices.iter().any(|n| n.change_seq == last)
        && std::time::Instant::now() < deadline
    {
        again
            .poll(std::time::Instant::now() + std::time::Duration::from_millis(100))
            .unwrap();
    }
    let seqs: Vec<u64> = again.notices.iter().map(|n| n.change_seq).collect();
    assert_eq!(
        seqs,
        (1..=last).collect::<Vec<_>>(),
        "every change from the first"
    );
}
