//! The web interface against a real server (HTTPS, certificate pinned): health and metrics,
//! admin login with a session cookie, CSRF on forms, the dashboard showing a connected
//! incubator and the licence state, and a licence installed through the form restoring
//! access without a restart.

mod common;

use es_loadtest::http_client::{HttpClient, HttpResponse};
use es_loadtest::spawn::ServerProcess;
use std::process::Command;

const PASSWORD: &str = "Embryo-2026!";

fn web(server: &ServerProcess) -> HttpClient {
    HttpClient::new(
        server.info.address("web"),
        server.info.client_tls("web"),
        common::TIMEOUT,
    )
}

fn body(response: &HttpResponse) -> String {
    String::from_utf8_lossy(&response.body).to_string()
}

fn post_form(
    http: &mut HttpClient,
    path: &str,
    cookie: Option<&str>,
    fields: &[(&str, &str)],
) -> HttpResponse {
    let encoded: Vec<String> = fields
        .iter()
        .map(|(k, v)| format!("{k}={}", form_encode(v)))
        .collect();
    let mut headers = vec![("content-type", "application/x-www-form-urlencoded")];
    let cookie_header;
    if let Some(cookie) = cookie {
        cookie_header = format!("esweb={cookie}");
        headers.push(("cookie", &cookie_header));
    }
    http.request("POST", path, &headers, Some(encoded.join("&").as_bytes()))
        .unwrap()
}

fn form_encode(text: &str) -> String {
    let mut out = String::new();
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn get(http: &mut HttpClient, path: &str, cookie: &str) -> HttpResponse {
    let cookie = format!("esweb={cookie}");
    http.get(path, &[("cookie", &cookie)]).unwrap()
}

/// The session token a login's `Set-Cookie: esweb=TOKEN; ...` carries.
fn session_of(set_cookie: &str) -> String {
    let token = set_cookie
        .strip_prefix("esweb=")
        .and_then(|rest| rest.split(';').next())
        .unwrap_or_else(|| panic!("not a session cookie: {set_cookie}"));
    assert!(!token.is_empty(), "an empty session token: {set_cookie}");
    token.to_string()
}

/// The value of the hidden csrf field of a page.
fn csrf(page: &str) -> String {
    let at = page
        .find("name=csrf value='")
        .expect("a form with a CSRF token")
        + 17;
    page[at..at + 32].to_string()
}

#[test]
fn admin_logs_in_sees_the_server_and_installs_a_licence() {
    let issuer = common::Issuer::new();
    let dir = tempfile::tempdir().unwrap();
    let server = issuer.spawn(&dir);
    common::add_user(&server, "root", "admin", PASSWORD);
    common::add_user(&server, "anna", "edit", PASSWORD);
    let mut http = web(&server);

    // Health for monitoring, without login; metrics need one.
    let health = http.get("/healthz", &[]).unwrap();
    assert_eq!(health.status, 200);
    assert!(health.json()["license"]
        .as_str()
        .unwrap()
        .starts_with("invalid: no licence"));
    // The version and the commit it was built from, as `esserver --version` says.
    let version = Command::new(common::esserver_path())
        .arg("--version")
        .output()
        .unwrap();
    let version = String::from_utf8_lossy(&version.stdout).into_owned();
    let (health_version, commit) = (
        health.json()["version"].as_str().unwrap().to_string(),
        health.json()["commit"].as_str().unwrap().to_string(),
    );
    assert_eq!(
        version.trim(),
        format!("esserver {health_version} (commit {commit})")
    );
    assert!(!commit.is_empty());
    assert_eq!(http.get("/metrics", &[]).unwrap().status, 401);

    // Not logged in: to the login form. Wrong password, non-admin: refused with the reason.
    let home = http.get("/", &[]).unwrap();
    assert_eq!(home.status, 303);
    assert_eq!(home.header("location"), Some("/login"));
    let wrong = post_form(
        &mut http,
        "/login",
        None,
        &[("username", "root"), ("password", "nope")],
    );
    assert_eq!(wrong.status, 401);
    assert!(body(&wrong).contains("wrong user name or password"));
    // Login CSRF: another site's page posting the login form (with the right password even)
    // is refused and logs nobody in.
    let encoded = format!("username=root&password={}", form_encode(PASSWORD));
    for (name, value) in [
        ("origin", "https://evil.example"),
        ("sec-fetch-site", "cross-site"),
    ] {
        let cross = http
            .request(
                "POST",
                "/login",
                &[
                    ("content-type", "application/x-www-form-urlencoded"),
                    (name, value),
                ],
                Some(encoded.as_bytes()),
            )
            .unwrap();
        assert_eq!(cross.status, 403, "{name}: {value}: {}", body(&cross));
        assert!(cross.header("set-cookie").is_none(), "{name}: {value}");
    }
    // Over HTTPS: HSTS, and no inline script allowed (the licence page's script is a file).
    let page = http.get("/login", &[]).unwrap();
    assert_eq!(
        page.header("strict-transport-security"),
        Some("max-age=31536000")
    );
    let policy = page.header("content-security-policy").unwrap();
    assert!(policy.contains("script-src 'self'"), "{policy}");
    assert!(!policy.contains("script-src 'unsafe-inline'"), "{policy}");
    let script = http.get("/license.js", &[]).unwrap();
    assert_eq!(script.status, 200);
    assert!(body(&script).contains("license-text"));
    let editor = post_form(
        &mut http,
        "/login",
        None,
        &[("username", "anna"), ("password", PASSWORD)],
    );
    assert!(
        body(&editor).contains("needs the admin right"),
        "{}",
        body(&editor)
    );

    let login = post_form(
        &mut http,
        "/login",
        None,
        &[("username", "root"), ("password", PASSWORD)],
    );
    assert_eq!(login.status, 303, "{}", body(&login));
    let set_cookie = login.header("set-cookie").unwrap().to_string();
    for flag in ["HttpOnly", "Secure", "SameSite=Strict"] {
        assert!(set_cookie.contains(flag), "{set_cookie}");
    }
    let cookie = session_of(&set_cookie);

    // The dashboard: the licence warning on the page, a connected incubator listed, and one
    // that disconnected still listed as such.
    let mut gone = common::identity("WEB-INC-GONE", "es-d");
    drop(common::connect(&server, &mut gone));
    let mut identity = common::identity("WEB-INC-1", "es-plus");
    let _incubator = common::connect(&server, &mut identity);
    // A refused HELLO (a wrong secret for a known serial) is listed with its reason.
    let mut impostor = common::identity("WEB-INC-GONE", "es-d");
    impostor.secret = "not-its-secret".into();
    let refused = es_loadtest::client::IncubatorClient::connect(
        server.info.address("incubator"),
        &server.info.client_tls("incubator"),
        &mut impostor,
        common::TIMEOUT,
    );
    assert!(refused.is_err());
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    // Until the server has seen the first connection close (the row asserted below).
    while std::time::Instant::now() < deadline
        && !body(&get(&mut http, "/", &cookie))
            .contains("<td>WEB-INC-GONE</td><td>es-d</td><td class=err>disconnected</td>")
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let dashboard = get(&mut http, "/", &cookie);
    assert_eq!(dashboard.status, 200);
    let page = body(&dashboard);
    assert!(
        page.contains("Licence invalid: no licence is installed"),
        "{page}"
    );
    assert!(page.contains("WEB-INC-1"), "{page}");
    assert!(
        page.contains("<td>WEB-INC-GONE</td><td>es-d</td><td class=err>disconnected</td>"),
        "{page}"
    );
    assert!(
        page.contains("<table id=refused>")
            && page.contains("<td>WEB-INC-GONE</td><td>1</td><td class=err>auth_failed</td>"),
        "{page}"
    );
    // What an administrator needs at a glance: version, server id, certificate fingerprint,
    // data directory, disk use; empty tables say so; the page refreshes itself.
    let fingerprint =
        es_net::tls::fingerprint(&es_net::tls::read_certificate(&server.info.certificate).unwrap());
    for wanted in [
        format!("esserver {}", env!("CARGO_PKG_VERSION")),
        format!("<td id=server-id>{}</td>", server.info.server_id),
        format!("<td id=fingerprint>{fingerprint}</td>"),
        server.data_dir().display().to_string(),
        " %); ".to_string(),
        "GiB free".to_string(),
        "<td id=growth>no images stored in the last days</td>".to_string(),
        "GiB/day for the 2 instrument(s) enrolled".to_string(),
        "<td>WEB-INC-GONE</td><td>es-d</td><td class=err>disconnected</td>".to_string(),
        "<td>never</td><td>0</td><td><span class=err>1 (auth_failed)</span></td>".to_string(),
        "No viewer is logged in.".to_string(),
        "<meta http-equiv=refresh content=30>".to_string(),
        // No [Backup] target and none taken: the backups card and the glance line warn.
        "<h2>Backups</h2>".to_string(),
        "<p class=err id=backup-warning>no backup is configured".to_string(),
        "<span class='card bad' id=backup-glance>no backup</span>".to_string(),
    ] {
        assert!(page.contains(&wanted), "{wanted} missing from:\n{page}");
    }
    // The warnings since the start: the refused HELLO among them, on the page and its own.
    assert!(page.contains("<table id=warnings>"), "{page}");
    assert!(
        page.contains("WEB-INC-GONE presented a wrong secret"),
        "{page}"
    );
    let warnings = body(&get(&mut http, "/warnings", &cookie));
    assert!(
        warnings.contains("WEB-INC-GONE presented a wrong secret")
            && warnings.contains("code=auth_failed"),
        "{warnings}"
    );
    assert_eq!(get(&mut http, "/warnings?skip=x", &cookie).status, 400);
    // The audit trail, newest page by default: the refused and granted logins above.
    let audit = body(&get(&mut http, "/audit", &cookie));
    assert!(audit.contains("<table id=audit>"), "{audit}");
    assert!(audit.contains("user.login"), "{audit}");
    assert!(audit.contains("wrong password"), "{audit}");
    assert_eq!(get(&mut http, "/audit?after=x", &cookie).status, 400);
    let license_page = body(&get(&mut http, "/license", &cookie));
    assert!(
        license_page.contains(&format!(
            "<code id=server-id>{}</code>",
            server.info.server_id
        )),
        "the licence page shows the id a licence must name: {license_page}"
    );
    let metrics = body(&get(&mut http, "/metrics", &cookie));
    assert!(
        metrics.contains("esserver_license_expires_in_seconds 0"),
        "{metrics}"
    );
    assert!(metrics.contains("esserver_up 1"));
    assert!(
        metrics.contains(&format!(
            "esserver_build_info{{version=\"{}\",commit=\"",
            env!("CARGO_PKG_VERSION")
        )),
        "{metrics}"
    );
    assert!(metrics.contains("esserver_license_valid 0"));
    assert!(metrics.contains("esserver_incubators_connected 1"));
    assert!(
        metrics.contains("esserver_ims_queue_records 0"),
        "{metrics}"
    );

    // Instrument monitoring: its panel, and a pause from the dashboard that applies at once.
    assert!(page.contains("Instrument monitoring (IMS)"), "{page}");
    assert!(
        page.contains("none configured: nothing is uploaded"),
        "{page}"
    );
    let paused = post_form(
        &mut http,
        "/ims",
        Some(&cookie),
        &[("csrf", &csrf(&page)), ("part", "upload"), ("on", "off")],
    );
    assert!(
        body(&paused).contains("Monitoring switched"),
        "{}",
        body(&paused)
    );
    assert!(body(&paused).contains("upload off"), "{}", body(&paused));
    let status = common::admin_json(server.data_dir(), &["ims", "status"]);
    assert_eq!(
        (&status["upload"], &status["receive"]),
        (&false.into(), &true.into())
    );
    let forged = post_form(
        &mut http,
        "/ims",
        Some(&cookie),
        &[("part", "all"), ("on", "off")],
    );
    assert_eq!(forged.status, 403, "no CSRF token, no switch");

    // Forms need the page's CSRF token.
    let licence_page = body(&get(&mut http, "/license", &cookie));
    let token = csrf(&licence_page);
    let file = issuer.issue(&server, "high-capacity", &["LAB-1"], "w.lic");
    let licence = std::fs::read_to_string(file).unwrap();
    let forged = post_form(
        &mut http,
        "/license",
        Some(&cookie),
        &[("license", &licence)],
    );
    assert_eq!(forged.status, 403, "no CSRF token, no change");
    // Every refused action is in the audit trail: the forged forms, the editor's login. The
    // audit entry is written beside the refusal, not before it: wait for its commit.
    let deadline = std::time::Instant::now() + common::TIMEOUT;
    for refused in [
        "<td>web.login</td><td>anna</td><td>denied</td>",
        "<td>web.ims</td><td>root</td><td>denied</td>",
        "<td>web.license</td><td>root</td><td>denied</td>",
    ] {
        loop {
            let audit = body(&get(&mut http, "/audit", &cookie));
            if audit.contains(refused) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "{refused} in {audit}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    let tampered = licence.replacen("Clinic A", "Clinic X", 1);
    let refused = post_form(
        &mut http,
        "/license",
        Some(&cookie),
        &[("csrf", &token), ("license", &tampered)],
    );
    assert!(
        body(&refused).contains("Not installed"),
        "{}",
        body(&refused)
    );
    assert!(body(&refused).contains("signature does not match"));

    // A valid licence applies at once: the API serves again, the page says so.
    let key = common::create_api_key(&server, "EMR", "read");
    let mut api = HttpClient::new(
        server.info.address("public-api"),
        server.info.client_tls("public-api"),
        common::TIMEOUT,
    );
    let auth = format!("Bearer {key}");
    assert_eq!(
        api.get("/api/v1/patients", &[("authorization", &auth)])
            .unwrap()
            .status,
        403
    );
    let installed = post_form(
        &mut http,
        "/license",
        Some(&cookie),
        &[("csrf", &token), ("license", &licence)],
    );
    assert!(
        body(&installed).contains("installed; it applies now"),
        "{}",
        body(&installed)
    );
    assert_eq!(
        api.get("/api/v1/patients", &[("authorization", &auth)])
            .unwrap()
            .status,
        200
    );
    let page = body(&get(&mut http, "/", &cookie));
    assert!(
        page.contains("high-capacity configuration, licence"),
        "{page}"
    );
    assert!(
        page.contains("Capacity units: 2 of 16 used (1 EmbryoScope+/Flex of 8)"),
        "{page}"
    );
    // A logged-in viewer is listed with its computer.
    let _viewer = es_loadtest::viewer_client::ViewerClient::login(
        server.info.address("viewer"),
        &server.info.client_tls("viewer"),
        &es_loadtest::viewer_client::Credentials {
            user: "anna".into(),
            password: PASSWORD.into(),
            computer: "LAB-1".into(),
        },
        common::TIMEOUT,
    )
    .expect("a licensed computer logs in");
    let page = body(&get(&mut http, "/", &cookie));
    assert!(page.contains("<td>anna</td><td>LAB-1</td>"), "{page}");
    assert!(!page.contains("Licence invalid"));

    // An instrument is renamed from its page; only the name shown changes.
    let renamed = post_form(
        &mut http,
        "/instruments",
        Some(&cookie),
        &[
            ("csrf", &token),
            ("serial", "WEB-INC-1"),
            ("name", "Lab 3 <left>"),
        ],
    );
    let page = body(&renamed);
    assert!(page.contains("is now shown as"), "{page}");
    assert!(
        page.contains("Lab 3 &lt;left&gt;"),
        "the name is shown, escaped"
    );

    // Users: added (the password policy applies), disabled, given a new password.
    let weak = post_form(
        &mut http,
        "/users",
        Some(&cookie),
        &[
            ("csrf", &token),
            ("action", "add"),
            ("name", "bob"),
            ("rights", "view"),
            ("password", "short"),
        ],
    );
    assert!(
        body(&weak).contains("does not meet the policy"),
        "{}",
        body(&weak)
    );
    let added = post_form(
        &mut http,
        "/users",
        Some(&cookie),
        &[
            ("csrf", &token),
            ("action", "add"),
            ("name", "bob"),
            ("rights", "view"),
            ("password", "Bob-pass-2026"),
        ],
    );
    assert!(body(&added).contains("user bob added"), "{}", body(&added));
    let disabled = post_form(
        &mut http,
        "/users",
        Some(&cookie),
        &[("csrf", &token), ("action", "disable"), ("name", "bob")],
    );
    assert!(
        body(&disabled).contains("bob: disabled"),
        "{}",
        body(&disabled)
    );
    let reset = post_form(
        &mut http,
        "/users",
        Some(&cookie),
        &[
            ("csrf", &token),
            ("action", "password"),
            ("name", "bob"),
            ("password", "Bob-new-2026!"),
        ],
    );
    assert!(
        body(&reset).contains("password changed"),
        "{}",
        body(&reset)
    );
    let list = Command::new(common::esserver_path())
        .args(["user", "list", "--json", "--data"])
        .arg(server.data_dir())
        .output()
        .unwrap();
    let users = String::from_utf8_lossy(&list.stdout);
    assert!(users.contains("\"bob\""), "{users}");

    // Logging out ends the session.
    let out = post_form(&mut http, "/logout", Some(&cookie), &[("csrf", &token)]);
    assert_eq!(out.status, 303);
    assert_eq!(get(&mut http, "/", &cookie).status, 303);
}

/// Headless Chromium through WebDriver walks every part of the interface (see
/// `tests/python/web_browser_test.py`): three EmbryoScope+ connected and one disconnected
/// (with images and a refused HELLO), a basic licence installed by choosing its file and
/// over its limit. The screenshots are left in `target/test-artifacts/web/` (docs/web.md
/// shows them).
#[test]
fn a_real_browser_walks_the_dashboard_with_incubators_over_a_basic_licence() {
    let issuer = common::Issuer::new();
    let dir = tempfile::tempdir().unwrap();
    let server = issuer.spawn(&dir);
    common::add_user(&server, "root", "admin", PASSWORD);
    // One incubator uploads 12 images and disconnects; later a HELLO of its serial with a
    // wrong secret is refused.
    common::upload_dish(&server, "LAB-GONE", 4);
    let mut impostor = common::identity("LAB-GONE", "es-plus");
    impostor.secret = "not-its-secret".into();
    let refused = es_loadtest::client::IncubatorClient::connect(
        server.info.address("incubator"),
        &server.info.client_tls("incubator"),
        &mut impostor,
        common::TIMEOUT,
    );
    assert!(refused.is_err(), "a wrong secret is refused");
    // Three EmbryoScope+ (6 capacity units; a basic licence has 2) stay connected.
    let serials = ["LAB-A", "LAB-B", "LAB-C"];
    let _connections: Vec<_> = serials
        .iter()
        .map(|serial| {
            let mut identity = common::identity(serial, "es-plus");
            common::connect(&server, &mut identity)
        })
        .collect();
    // Valid through a day 20 days ahead: the card counts the days left and warns of expiry.
    let licence = dir.path().join("clinic.lic");
    let through = day_in(20);
    let issued = issuer
        .issue_command()
        .args(["--server-id", &server.info.server_id])
        .args(["--clinic", "Clinic A", "--configuration", "basic"])
        .args(["--computer", "LAB-1", "--expires", &through, "--out"])
        .arg(&licence)
        .output()
        .unwrap();
    assert!(issued.status.success(), "{issued:?}");
    let fingerprint =
        es_net::tls::fingerprint(&es_net::tls::read_certificate(&server.info.certificate).unwrap());
    let args: Vec<String> = [
        "--base",
        &format!("https://{}", server.info.address("web")),
        "--user",
        "root",
        "--password",
        PASSWORD,
        "--license",
        &licence.display().to_string(),
        "--connected",
        &serials.join(","),
        "--gone",
        "LAB-GONE",
        "--server-id",
        &server.info.server_id,
        "--fingerprint",
        &fingerprint,
    ]
    .map(String::from)
    .to_vec();
    let pages = [
        "login",
        "status",
        "license",
        "warnings",
        "instruments",
        "audit",
        "users",
    ]
    .map(String::from);
    common::run_browser_script("web_browser_test.py", &args, "web", &pages);
}

/// The UTC day `days` from now, as yyyy-mm-dd.
fn day_in(days: i64) -> String {
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    esserver::times::utc_day(now_ms + days * 86_400_000)
}

/// `[WebInterface] tls = off` serves plain HTTP (a trusted link only): the session cookie is
/// then not `Secure`, since a browser would never send it back.
#[test]
fn plain_http_only_when_configured() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::spawn_in(&dir, true, "[WebInterface]\ntls = off\n");
    assert!(matches!(
        server.info.client_tls("web"),
        es_net::client::ClientTls::Plain
    ));
    common::add_user(&server, "root", "admin", PASSWORD);
    let mut http = web(&server);
    assert_eq!(http.get("/healthz", &[]).unwrap().status, 200);
    let login = post_form(
        &mut http,
        "/login",
        None,
        &[("username", "root"), ("password", PASSWORD)],
    );
    assert_eq!(login.status, 303);
    let cookie = login.header("set-cookie").unwrap();
    assert!(
        cookie.contains("HttpOnly") && !cookie.contains("Secure"),
        "{cookie}"
    );
    assert!(common::server_log(&dir).contains("WITHOUT TLS"));
    // Logging out clears the cookie the same way (a Secure one would be ignored over HTTP).
    let session = session_of(cookie);
    // The page table answers what it does not serve: 405 naming the methods a page
    // answers, 404 for an unknown page (a redirect to the login without a session).
    let cookie_header = format!("esweb={session}");
    let headers = [("cookie", cookie_header.as_str())];
    let delete = http.request("DELETE", "/users", &headers, None).unwrap();
    assert_eq!(delete.status, 405);
    assert_eq!(delete.header("allow"), Some("GET, HEAD, POST"));
    let logout_get = get(&mut http, "/logout", &session);
    assert_eq!(logout_get.status, 405);
    assert_eq!(logout_get.header("allow"), Some("POST"));
    assert_eq!(get(&mut http, "/no-such-page", &session).status, 404);
    let anonymous = http.get("/no-such-page", &[]).unwrap();
    assert_eq!(anonymous.status, 303);
    assert_eq!(anonymous.header("location"), Some("/login"));
    let page = body(&get(&mut http, "/", &session));
    let out = post_form(
        &mut http,
        "/logout",
        Some(&session),
        &[("csrf", &csrf(&page))],
    );
    assert_eq!(out.status, 303);
    let cleared = out.header("set-cookie").unwrap();
    assert!(
        cleared.contains("Max-Age=0") && !cleared.contains("Secure"),
        "{cleared}"
    );
}

/// With `enrolment = approve`, a refused serial number waits on the Instruments page; its
/// Approve button (CSRF-checked, audited) enrols it and its next connection is accepted.
#[test]
fn an_administrator_approves_a_pending_instrument_from_the_instruments_page() {
    let dir = tempfile::tempdir().unwrap();
    let server = common::spawn_in(&dir, false, "[IncubatorTransport]\nenrolment = approve\n");
    common::add_user(&server, "root", "admin", PASSWORD);
    let mut waiting = common::identity("PEND-01", "es-plus");
    let refused = es_loadtest::client::IncubatorClient::connect(
        server.info.address("incubator"),
        &server.info.client_tls("incubator"),
        &mut waiting,
        common::TIMEOUT,
    );
    assert!(matches!(refused, Err(ref e)
        if e.error_code() == Some(es_proto::incubator::ErrorCode::EnrolmentPending)));

    let mut http = web(&server);
    let login = post_form(
        &mut http,
        "/login",
        None,
        &[("username", "root"), ("password", PASSWORD)],
    );
    assert_eq!(login.status, 303);
    let session = session_of(login.header("set-cookie").unwrap());
    let home = body(&get(&mut http, "/", &session));
    assert!(
        home.contains("id=pending-banner>1 new instrument(s) wait for approval"),
        "{home}"
    );
    let page = body(&get(&mut http, "/instruments", &session));
    assert!(page.contains("id=enrolment>Approval"), "{page}");
    assert!(
        page.contains("<td>PEND-01</td><td>es-plus</td><td>1</td>"),
        "{page}"
    );
    assert!(page.contains("id='approve-PEND-01'"), "{page}");
    // Without the CSRF token nothing is approved.
    let forged = post_form(
        &mut http,
        "/instruments",
        Some(&session),
        &[("action", "approve"), ("serial", "PEND-01")],
    );
    assert_eq!(forged.status, 403);
    let approved = post_form(
        &mut http,
        "/instruments",
        Some(&session),
        &[
            ("csrf", &csrf(&page)),
            ("action", "approve"),
            ("serial", "PEND-01"),
        ],
    );
    let answer = body(&approved);
    assert!(answer.contains("PEND-01 is approved"), "{answer}");
    assert!(
        answer.contains("No instrument is waiting for approval."),
        "{answer}"
    );
    // Recorded with the model its HELLO named, and audited under the administrator.
    assert!(
        answer.contains("<tr><td>PEND-01</td><td>es-plus</td>"),
        "{answer}"
    );
    let audit = body(&get(&mut http, "/audit", &session));
    assert!(
        audit.contains("<td>web:root</td>") && audit.contains("instrument.approve"),
        "{audit}"
    );
    let mut connection = common::connect(&server, &mut waiting);
    assert!(!waiting.secret.is_empty());
    connection
        .request(
            es_proto::incubator::Message::Ping(es_proto::incubator::pb::Ping { seq: 0 }),
            common::TIMEOUT,
        )
        .unwrap();
}

/// The instrument's own number from its HELLO, corrected on the Instruments page (audited,
/// and kept against the next HELLO); a dish registration with other patient details shows on
/// the dashboard with the patient's PatientIDx until the clinic edits the patient.
#[test]
fn instrument_numbers_are_set_on_the_instruments_page_and_differing_patient_details_are_shown() {
    use es_proto::incubator::{pb, Message};
    let dir = tempfile::tempdir().unwrap();
    let server = common::spawn_in(&dir, false, "[Clinic]\nsite_name = IVFLAB\n");
    common::add_user(&server, "root", "admin", PASSWORD);
    let workload = common::upload_dish(&server, "NUM-1", 1);
    let mut identity = common::identity("NUM-2", "es-plus");
    identity.instrument_number = 3253;
    let mut incubator = common::connect(&server, &mut identity);
    // The patient of NUM-1's dish, with another first name and date of birth.
    let registration = &workload.dish_registrations()[0];
    let mut other = registration.clone();
    other.seq = 1;
    other.dish_id = "OTHER-DISH".into();
    other.wells = vec![pb::DishWell {
        well: 1,
        embryo_id: "D2025.10.09_S00001_I3253_P-1".into(),
        label: String::new(),
    }];
    let patient = other.patient.as_mut().unwrap();
    patient.first_name = "Someone".into();
    patient.date_of_birth = "1990-01-01".into();
    let answer = incubator
        .request(Message::RegisterDish(other), common::TIMEOUT)
        .unwrap();
    assert!(matches!(answer, Message::Ack(_)), "{answer:?}");
    let patient_id = registration.patient.as_ref().unwrap().patient_id.clone();

    let mut http = web(&server);
    let login = post_form(
        &mut http,
        "/login",
        None,
        &[("username", "root"), ("password", PASSWORD)],
    );
    let session = session_of(login.header("set-cookie").unwrap());
    let page = body(&get(&mut http, "/instruments", &session));
    assert!(
        page.contains("value='3253' size=6") && page.contains("(its own)"),
        "{page}"
    );
    assert!(page.contains("(counted)"), "NUM-1 sent no number: {page}");
    let refused = post_form(
        &mut http,
        "/instruments",
        Some(&session),
        &[
            ("csrf", &csrf(&page)),
            ("action", "number"),
            ("serial", "NUM-2"),
            ("number", "zero"),
        ],
    );
    assert!(
        body(&refused).contains("Number not set"),
        "{}",
        body(&refused)
    );
    let set = post_form(
        &mut http,
        "/instruments",
        Some(&session),
        &[
            ("csrf", &csrf(&page)),
            ("action", "number"),
            ("serial", "NUM-2"),
            ("number", "77"),
        ],
    );
    let answer = body(&set);
    assert!(answer.contains("NUM-2 is now number 77"), "{answer}");
    assert!(answer.contains("value='77' size=6") && answer.contains("(set here)"));
    let audit = body(&get(&mut http, "/audit", &session));
    assert!(audit.contains("instrument.number"), "{audit}");
    // The instrument's next HELLO does not undo it.
    drop(incubator);
    let _again = common::connect(&server, &mut identity);
    let page = body(&get(&mut http, "/instruments", &session));
    assert!(page.contains("value='77' size=6"), "{page}");
    // The command line sets it too.
    let output = common::admin(server.data_dir(), &["instrument", "number", "NUM-1", "12"]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(String::from_utf8_lossy(&output.stdout).contains("NUM-1 is now number 12"));

    let home = body(&get(&mut http, "/", &session));
    let row = format!("<tr><td>{patient_id}</td><td>IVFLAB_");
    assert!(home.contains(&row), "{home}");
    assert!(
        home.contains("Someone") && home.contains("born 1990-01-01") && home.contains("OTHER-DISH"),
        "{home}"
    );
}
