//! The browser viewer's devices against a real server (HTTPS, the web port), as browsers use
//! it: a viewer user logs in, names the device, finds a patient and opens a dish's grid and its
//! latest frame; a second device beyond the
//! licence's one is refused with the reason; an administrator sees it on the Devices page
//! and revokes the first, which is refused at its next request and frees its place; a session
//! cookie carried to another browser is refused, and a device cookie copied to another
//! browser leaves one session to the device; a DEMO licence sets no limit; without a valid
//! licence every device is shut out.

mod common;

use es_client::http::HttpResponse;
use es_loadtest::browser_bench::Session;
use es_loadtest::spawn::ServerProcess;

const PASSWORD: &str = "Viewer-2026!";

/// A browser: the load generator's (one connection and its cookie jar), answers unwrapped.
struct Browser {
    session: Session,
}

impl Browser {
    fn new(server: &ServerProcess) -> Browser {
        Browser {
            session: Session::new(server, common::TIMEOUT),
        }
    }

    fn send(&mut self, method: &str, path: &str, form: Option<&str>) -> HttpResponse {
        self.session.send(method, path, form).unwrap()
    }

    /// What the embryo page's script sends: JSON with its CSRF token in a header.
    fn send_json(&mut self, path: &str, body: &serde_json::Value, csrf: &str) -> HttpResponse {
        let body = body.to_string();
        let csrf = [("x-csrf-token", csrf)];
        self.session
            .request(
                "POST",
                path,
                Some(body.as_bytes()),
                Some("application/json"),
                &csrf,
            )
            .unwrap()
    }

    fn body(response: &HttpResponse) -> String {
        String::from_utf8_lossy(&response.body).into_owned()
    }

    fn csrf(page: &str) -> String {
        page.split("name=csrf value='")
            .nth(1)
            .and_then(|rest| rest.split('\'').next())
            .expect("a form with a CSRF token")
            .to_string()
    }

    /// Logs in and follows to the device page or the patients.
    fn log_in(&mut self, user: &str) -> HttpResponse {
        let form = format!("username={user}&password={}", PASSWORD.replace('!', "%21"));
        let login = self.send("POST", "/view/login", Some(&form));
        assert_eq!(login.status, 303, "{}", Self::body(&login));
        assert_eq!(login.header("location"), Some("/view/"));
        self.send("GET", "/view/", None)
    }

    /// Names this browser on the device page; the answer to the form.
    fn register(&mut self, name: &str) -> HttpResponse {
        let page = self.send("GET", "/view/device", None);
        assert_eq!(page.status, 200, "{}", Self::body(&page));
        let csrf = Self::csrf(&Self::body(&page));
        self.send(
            "POST",
            "/view/device",
            Some(&format!("csrf={csrf}&name={}", name.replace(' ', "+"))),
        )
    }

    fn cookie(&self, name: &str) -> Option<String> {
        self.session.cookie(name)
    }
}

#[test]
fn devices_count_against_the_licence_and_a_revoked_one_is_refused_at_once() {
    let issuer = common::Issuer::new();
    let dir = tempfile::tempdir().unwrap();
    let server = issuer.spawn(&dir);
    let licence = dir.path().join("one-device.lic");
    let output = issuer
        .issue_command()
        .args(["--server-id", &server.info.server_id])
        .args(["--clinic", "Clinic A", "--configuration", "basic"])
        .args(["--mobile-devices", "1", "--out"])
        .arg(&licence)
        .output()
        .unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(issuer.install(&server, &licence).status.success());
    common::add_user(&server, "anna", "view", PASSWORD);
    common::add_user(&server, "root1", "admin", PASSWORD);
    common::upload_dish(&server, "BV-1", 1);

    // The first browser: logged in, sent to name the device, then the patients.
    let mut tablet = Browser::new(&server);
    let first = tablet.log_in("anna");
    assert_eq!(first.status, 303);
    assert_eq!(first.header("location"), Some("/view/device"));
    let registered = tablet.register("Ward tablet");
    assert_eq!(registered.status, 303, "{}", Browser::body(&registered));
    let patients = tablet.send("GET", "/view/", None);
    assert_eq!(patients.status, 200);
    let page = Browser::body(&patients);
    assert!(page.contains("class=patient"), "{page}");
    assert!(page.contains("width=device-width"), "a page for phones");
    let policy = patients.header("content-security-policy").unwrap();
    assert!(!policy.contains("unsafe-inline"), "{policy}");
    let style = tablet.send("GET", "/view/view.css", None);
    assert_eq!(
        style.header("content-type"),
        Some("text/css; charset=utf-8")
    );
    // Patient -> treatment -> dish grid -> the latest frame, a JPEG straight from storage.
    let treatment = tablet.send("GET", &link(&page, "/view/treatment?"), None);
    assert_eq!(treatment.status, 200);
    let treatment = Browser::body(&treatment);
    let dish = tablet.send("GET", &link(&treatment, "/view/dish?"), None);
    assert_eq!(dish.status, 200);
    let dish = Browser::body(&dish);
    assert!(dish.contains("class=embryo"), "{dish}");
    let frame = tablet.send("GET", &link(&dish, "/view/frame?"), None);
    assert_eq!(frame.status, 200, "{}", Browser::body(&frame));
    assert_eq!(frame.header("content-type"), Some("image/jpeg"));
    assert_eq!(&frame.body[..2], &[0xff, 0xd8], "a JPEG");
    // Not without a session.
    let mut stranger = Browser::new(&server);
    let refused = stranger.send("GET", &link(&dish, "/view/frame?"), None);
    assert_eq!(refused.header("location"), Some("/view/login"));
    let found = tablet.send("GET", "/view/?q=nobody-like-this", None);
    assert!(Browser::body(&found).contains("No patient matches"));

    // A second browser: the licence's one device is taken.
    let mut phone = Browser::new(&server);
    assert_eq!(
        phone.log_in("anna").header("location"),
        Some("/view/device")
    );
    let refused = phone.register("Pocket phone");
    assert_eq!(refused.status, 403);
    let text = Browser::body(&refused);
    assert!(
        text.contains("the licence allows 1 browser device(s) and 1 are registered"),
        "{text}"
    );

    // The tablet's session cookie carried to the phone (with the phone's device cookie) is
    // refused.
    let mut thief = Browser::new(&server);
    thief.session.cookies = vec![
        ("esview".into(), tablet.cookie("esview").unwrap()),
        ("esdevice".into(), phone.cookie("esdevice").unwrap()),
    ];
    let stolen = thief.send("GET", "/view/", None);
    assert_eq!(stolen.status, 303, "{}", Browser::body(&stolen));
    assert_eq!(stolen.header("location"), Some("/view/login"));
    // (that also ended the tablet's session: it logs in again)
    assert_eq!(tablet.log_in("anna").status, 200);

    // One session per device: the tablet's device cookie copied to another browser gives it
    // no place of its own; its login ends the tablet's session.
    let mut copy = Browser::new(&server);
    copy.session.cookies = vec![("esdevice".into(), tablet.cookie("esdevice").unwrap())];
    assert_eq!(copy.log_in("anna").status, 200);
    let ended = tablet.send("GET", "/view/", None);
    assert_eq!(ended.header("location"), Some("/view/login"));
    assert_eq!(tablet.log_in("anna").status, 200);
    assert_eq!(
        copy.send("GET", "/view/", None).header("location"),
        Some("/view/login")
    );

    // A form without its session's CSRF token is refused.
    let forged = phone.send("POST", "/view/device", Some("csrf=nope&name=Forged"));
    assert_eq!(forged.status, 403);

    // The administrator sees the device and revokes it.
    let mut admin = Browser::new(&server);
    let form = format!("username=root1&password={}", PASSWORD.replace('!', "%21"));
    let login = admin.send("POST", "/login", Some(&form));
    assert_eq!(login.status, 303, "{}", Browser::body(&login));
    let devices = Browser::body(&admin.send("GET", "/devices", None));
    assert!(devices.contains("Ward tablet"), "{devices}");
    assert!(devices.contains("1 browser device(s) registered; 1 allowed by the licence"));
    let csrf = Browser::csrf(&devices);
    let device = tablet.cookie("esdevice").unwrap();
    let revoked = admin.send(
        "POST",
        "/devices",
        Some(&format!("csrf={csrf}&device={device}")),
    );
    assert!(Browser::body(&revoked).contains("Revoked"));

    // At once: the tablet's next request is refused, and the phone may register.
    let gone = tablet.send("GET", "/view/", None);
    assert_eq!(gone.status, 403);
    assert!(Browser::body(&gone).contains("was revoked by root1"));
    assert_eq!(phone.register("Pocket phone").status, 303);
    assert_eq!(phone.send("GET", "/view/", None).status, 200);
}

#[test]
fn without_a_valid_licence_every_device_is_shut_out() {
    let issuer = common::Issuer::new();
    let dir = tempfile::tempdir().unwrap();
    let server = issuer.spawn(&dir);
    common::add_user(&server, "anna", "view", PASSWORD);
    let mut browser = Browser::new(&server);
    let form = format!("username=anna&password={}", PASSWORD.replace('!', "%21"));
    let login = browser.send("POST", "/view/login", Some(&form));
    let text = Browser::body(&login);
    assert_eq!(login.status, 401, "{text}");
    assert!(text.to_lowercase().contains("licen"), "{text}");
}

#[test]
fn a_demo_licence_sets_no_device_limit() {
    let (server, _dir) = common::spawn(true);
    common::add_user(&server, "anna", "view", PASSWORD);
    for name in ["First tablet", "Second tablet", "Third phone"] {
        let mut browser = Browser::new(&server);
        assert_eq!(
            browser.log_in("anna").header("location"),
            Some("/view/device")
        );
        assert_eq!(browser.register(name).status, 303, "{name}");
        assert_eq!(browser.send("GET", "/view/", None).status, 200);
    }
}

fn json(response: &HttpResponse) -> serde_json::Value {
    serde_json::from_slice(&response.body)
        .unwrap_or_else(|_| panic!("not JSON: {}", Browser::body(response)))
}

/// The text between `prefix` and the next quote in a page, `&amp;` decoded.
fn link(page: &str, prefix: &str) -> String {
    let start = page
        .find(prefix)
        .unwrap_or_else(|| panic!("no {prefix} in {page}"));
    page[start..]
        .split('\'')
        .next()
        .unwrap()
        .replace("&amp;", "&")
}

fn data_attribute(page: &str, name: &str) -> String {
    let prefix = format!("data-{name}='");
    let start = page.find(&prefix).expect("the attribute") + prefix.len();
    page[start..].split('\'').next().unwrap().to_string()
}

#[test]
fn the_embryo_page_plays_annotates_with_the_version_check_and_hears_changes() {
    let (server, _dir) = common::spawn(true);
    common::add_user(&server, "anna", "edit", PASSWORD);
    common::add_user(&server, "ben", "edit", PASSWORD);
    common::add_user(&server, "vera", "view", PASSWORD);
    common::upload_dish(&server, "BV-3", 4);
    let mut anna = Browser::new(&server);
    anna.log_in("anna");
    assert_eq!(anna.register("Bench tablet").status, 303);
    let patients = Browser::body(&anna.send("GET", "/view/", None));
    let treatment = Browser::body(&anna.send("GET", &link(&patients, "/view/treatment?"), None));
    let dish = Browser::body(&anna.send("GET", &link(&treatment, "/view/dish?"), None));
    // The grid's frames are smaller ones; each embryo links its page.
    assert!(dish.contains("&amp;w=320"), "{dish}");
    assert!(
        dish.contains("<script src='/view/dish.js'>"),
        "the grid redraws itself live"
    );
    let page = anna.send("GET", &link(&dish, "/view/embryo?"), None);
    assert_eq!(page.status, 200, "{}", Browser::body(&page));
    let page = Browser::body(&page);
    assert!(page.contains("id=player") && page.contains("<script src='/view/player.js'>"));
    assert!(page.contains("id=annotate"), "edit rights: the form");
    let embryo_id = data_attribute(&page, "embryo");
    let csrf = data_attribute(&page, "csrf");
    let script = anna.send("GET", "/view/player.js", None);
    assert_eq!(
        script.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert!(Browser::body(&script).contains("/view/embryo.json"));

    // The embryo, its acquisitions, and where the change log stood.
    let read = json(&anna.send("GET", &format!("/view/embryo.json?id={embryo_id}"), None));
    assert_eq!(
        read["acquisitions"].as_array().map(Vec::len),
        Some(4),
        "{read} {embryo_id}"
    );
    assert_eq!(read["acquisitions"][0]["planes"], serde_json::json!([0]));
    assert_eq!(read["embryo"]["embryo_id"], embryo_id.as_str());
    let version = read["version"].as_u64().unwrap();
    let last_seq = read["last_seq"].as_u64().unwrap();
    let first_at = read["acquisitions"][0]["at"].as_i64().unwrap();

    // The full frame and a smaller one (the same bytes when asked again: from the cache, or
    // made again the same way; the unit tests check the cache), and a width not offered.
    let frame_path = format!("/view/frame?embryo={embryo_id}&at={first_at}&plane=0");
    let full = anna.send("GET", &frame_path, None);
    assert_eq!(full.status, 200);
    let small = anna.send("GET", &format!("{frame_path}&w=80"), None);
    assert_eq!(small.status, 200, "{}", Browser::body(&small));
    assert_eq!(&small.body[..2], &[0xff, 0xd8], "a JPEG");
    assert!(
        small.body.len() < full.body.len(),
        "{} {}",
        small.body.len(),
        full.body.len()
    );
    assert_eq!(
        anna.send("GET", &format!("{frame_path}&w=80"), None).body,
        small.body
    );
    assert_eq!(
        anna.send("GET", &format!("{frame_path}&w=100"), None)
            .status,
        400
    );

    // Ben, on his own device, edits the embryo while Anna's page waits on the change feed.
    let mut ben = Browser::new(&server);
    ben.log_in("ben");
    assert_eq!(ben.register("Theatre phone").status, 303);
    let ben_page = Browser::body(&ben.send("GET", &format!("/view/embryo?id={embryo_id}"), None));
    let ben_csrf = data_attribute(&ben_page, "csrf");
    let edit = std::thread::spawn({
        let embryo_id = embryo_id.clone();
        move || {
            std::thread::sleep(std::time::Duration::from_millis(300));
            let body = serde_json::json!({
                "embryo_id": embryo_id, "version": version, "name": "t2", "value": "",
                "event_at_ms": first_at,
            });
            let saved = ben.send_json("/view/annotate", &body, &ben_csrf);
            assert_eq!(saved.status, 200, "{}", Browser::body(&saved));
            json(&saved)
        }
    });
    let asked = std::time::Instant::now();
    let waited = anna.send(
        "GET",
        &format!("/view/changes?after={last_seq}&wait=20"),
        None,
    );
    // Woken by Ben's commit, not by the end of its 20 s wait.
    assert!(asked.elapsed() < std::time::Duration::from_secs(15));
    assert_eq!(waited.header("cache-control"), Some("no-store"));
    let saved_by_ben = edit.join().unwrap();
    assert_eq!(waited.status, 200, "{}", Browser::body(&waited));
    let changes = json(&waited);
    let heard = changes["items"]
        .as_array()
        .unwrap()
        .iter()
        .any(|c| c["entity"] == "embryo" && c["id"] == embryo_id.as_str());
    assert!(heard, "{changes}");
    assert_eq!(saved_by_ben["version"].as_u64(), Some(version + 1));

    // Anna saves from the version she read: refused, with the embryo as it is now.
    let mine = serde_json::json!({
        "embryo_id": embryo_id, "version": version, "name": "t2", "value": "",
        "event_at_ms": first_at + 600_000,
    });
    let stale = anna.send_json("/view/annotate", &mine, &csrf);
    assert_eq!(stale.status, 412, "{}", Browser::body(&stale));
    let stale = json(&stale);
    assert_eq!(stale["code"], "precondition_failed");
    assert_eq!(stale["current"]["version"].as_u64(), Some(version + 1));
    let current = &stale["current"]["annotations"][0];
    assert_eq!(
        (current["name"].as_str(), current["set_by"].as_str()),
        (Some("t2"), Some("ben"))
    );
    // From the current version: saved; then a change of Ben's annotation.
    let mut mine = mine;
    mine["version"] = (version + 1).into();
    mine["name"] = "Comment".into();
    mine["value"] = "good symmetry".into();
    let saved = anna.send_json("/view/annotate", &mine, &csrf);
    assert_eq!(saved.status, 200, "{}", Browser::body(&saved));
    let saved = json(&saved);
    assert_eq!(saved["version"].as_u64(), Some(version + 2));
    let change = serde_json::json!({
        "embryo_id": embryo_id, "version": version + 2,
        "annotation_id": current["annotation_id"], "name": "t2", "value": "",
        "event_at_ms": first_at + 1_200_000,
    });
    let changed = anna.send_json("/view/annotate", &change, &csrf);
    assert_eq!(changed.status, 200, "{}", Browser::body(&changed));
    let changed = json(&changed);
    let t2 = changed["annotations"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "t2")
        .unwrap()
        .clone();
    assert_eq!(t2["set_by"], "anna");
    assert_eq!(
        t2["hours"].as_f64().map(|h| (h * 10.0).round()),
        Some(changed_hours(&changed, first_at + 1_200_000))
    );

    // Refused: without the page's CSRF token, from a view-only account, a body that is not an
    // annotation; nothing changes.
    let forged = anna.send_json("/view/annotate", &mine, "not-the-token");
    assert_eq!(forged.status, 403);
    assert_eq!(json(&forged)["code"], "csrf");
    let mut vera = Browser::new(&server);
    vera.log_in("vera");
    assert_eq!(vera.register("Office browser").status, 303);
    let vera_page = Browser::body(&vera.send("GET", &format!("/view/embryo?id={embryo_id}"), None));
    assert!(!vera_page.contains("id=annotate"), "view rights: no form");
    let vera_csrf = data_attribute(&vera_page, "csrf");
    let mut attempt = mine.clone();
    attempt["version"] = (version + 3).into();
    let forbidden = vera.send_json("/view/annotate", &attempt, &vera_csrf);
    assert_eq!(forbidden.status, 403, "{}", Browser::body(&forbidden));
    assert_eq!(json(&forbidden)["code"], "forbidden");
    let garbage = anna.send_json("/view/annotate", &serde_json::json!({"embryo": 1}), &csrf);
    assert_eq!(garbage.status, 400);
    let now = json(&anna.send("GET", &format!("/view/embryo.json?id={embryo_id}"), None));
    assert_eq!(now["version"].as_u64(), Some(version + 3));

    // A long poll with nothing new answers empty at the end of its wait; a script's request
    // without a session is told to log in, in JSON.
    let quiet = json(&anna.send(
        "GET",
        &format!("/view/changes?after={}&wait=1", now["last_seq"]),
        None,
    ));
    assert_eq!(quiet["items"].as_array().map(Vec::len), Some(0), "{quiet}");
    let mut stranger = Browser::new(&server);
    let refused = stranger.send("GET", &format!("/view/embryo.json?id={embryo_id}"), None);
    assert_eq!(refused.status, 401);
    assert_eq!(json(&refused)["code"], "session_ended");
    let refused = stranger.send("GET", "/view/changes?after=0&wait=1", None);
    assert_eq!(json(&refused)["code"], "session_ended");
    // A position ahead of the log (a restored server) is refused at once: read again.
    let ahead = anna.send("GET", "/view/changes?after=999999999&wait=20", None);
    assert_eq!(ahead.status, 410, "{}", Browser::body(&ahead));
    assert_eq!(json(&ahead)["code"], "cursor_expired");
    // Widths other than the few offered are refused.
    for width in ["abc", "1000", "-1"] {
        let path = format!("/view/frame?embryo={embryo_id}&at={first_at}&plane=0&w={width}");
        assert_eq!(anna.send("GET", &path, None).status, 400, "{width}");
    }
}

/// An annotation's hours after insemination times ten, rounded, as the server computes them.
fn changed_hours(embryo: &serde_json::Value, at_ms: i64) -> f64 {
    let inseminated = embryo["insemination_at"].as_str().unwrap();
    let inseminated_ms = inseminated
        .parse::<jiff::Timestamp>()
        .unwrap()
        .as_millisecond();
    ((at_ms - inseminated_ms) as f64 / 3_600_000.0 * 10.0).round()
}

/// Headless Chromium as a phone and as a tablet walks the browser viewer
/// (`tests/python/view_browser_test.py`): log in, name the device, search, open a dish, play a
/// 200-frame time-lapse through, switch planes, annotate, see another user's edit arrive live,
/// and hit a stale-version conflict. The screenshots are left in
/// `target/test-artifacts/view/` (docs/web.md shows them).
#[test]
fn a_real_browser_on_a_phone_and_a_tablet_plays_annotates_and_sees_edits_live() {
    let (server, _dir) = common::spawn(true);
    common::add_user(&server, "anna", "edit", PASSWORD);
    common::add_user(&server, "ben", "edit", PASSWORD);
    common::upload_dish_planes(&server, "BV-PLAY", 200, vec![-15, 0, 15]);
    let args: Vec<String> = [
        "--base",
        &format!("https://{}", server.info.address("web")),
        "--user",
        "anna",
        "--other",
        "ben",
        "--password",
        PASSWORD,
        "--patient",
        "MRN-BV-PLAY-1",
    ]
    .map(String::from)
    .to_vec();
    let mut pages = Vec::new();
    for device in ["phone", "tablet"] {
        for page in [
            "login",
            "device",
            "patients",
            "treatment",
            "dish",
            "embryo",
            "conflict",
        ] {
            pages.push(format!("view-{page}-{device}"));
        }
    }
    let output = common::run_browser_script("view_browser_test.py", &args, "view", &pages);
    // The figures (first frame, playback rate) for the record, not asserted.
    println!("{output}");
}
