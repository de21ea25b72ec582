//! The browser viewer (`/view/` on the web interface's port), for viewer users on tablets,
//! phones and any browser: log in, register the device against the licence, find a patient,
//! a treatment's dishes and a dish's grid (`view_embryo` has the embryo page: the player, the
//! annotations and the live updates; docs/web.md describes them all).
//!
//! # Devices and the licence
//!
//! A browser is a device: the first time it reaches a page after a login it has no device
//! cookie, or one the server does not know, and its user names it (`/view/device`). The
//! server mints the device id (32 hex digits, a long-lived `esdevice` cookie) and registers
//! it through storage (`es_storage::devices`), which refuses a new device beyond the
//! licence's mobile devices with the reason; a DEMO licence sets no limit. Every page checks,
//! at every request: the licence is valid now (an invalid one shuts every device out), the
//! session is alive and its account enabled, the device is registered and not revoked (a
//! revocation takes effect at the next request), and the session is the one bound to this
//! device (a session cookie carried to another browser is refused).

use super::{
    csrf_of, escape, html, redirect, time_text, Call, WebShared, DEVICE_COOKIE, VIEW_COOKIE,
};
use crate::api::{LoginKind, Response, Step};
use crate::now_ms;
use es_storage::devices::{is_device_id, DeviceRefusal, DeviceRegister};
use es_storage::{Actor, Rights, WriteError};
use parking_lot::Mutex;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Instant;

/// Sessions of the browser viewer, and the device each is bound to.
#[derive(Default)]
pub struct ViewState {
    pub sessions: crate::api::auth::Tokens,
    /// Session token -> device id, once the device is registered.
    bound: Mutex<HashMap<String, String>>,
    /// Smaller frames made on request.
    pub thumbnails: super::view_embryo::Thumbnails,
}

/// Bound sessions kept at most (beyond it, the ended ones are forgotten, and if that is not
/// enough, all: their sessions log in again).
const BOUND_SESSIONS_MAX: usize = 4096;

/// Patients shown by a search at most.
const SEARCH_RESULTS_MAX: usize = 200;
/// Patients read for one search at most.
const SEARCH_SCAN_MAX: u32 = 10_000;

/// A checked session of the browser viewer.
pub(super) struct ViewSession {
    pub user: String,
    /// The account's rights as stored now (not as at the login).
    pub rights: Rights,
    pub token: String,
    pub device_id: Option<String>,
}

pub(super) fn cookie(request: &es_net::http::Request, name: &str) -> Option<String> {
    let cookies = request.header("cookie")?;
    cookies.split(';').find_map(|pair| {
        let (key, value) = pair.trim().split_once('=')?;
        (key == name).then(|| value.trim().to_string())
    })
}

fn set_cookie(shared: &WebShared, name: &str, value: &str, max_age_s: Option<u64>) -> String {
    let secure = if shared.site.tls { "; Secure" } else { "" };
    let age = max_age_s.map_or(String::new(), |s| format!("; Max-Age={s}"));
    format!("{name}={value}; Path=/view/; HttpOnly{secure}; SameSite=Strict{age}")
}

/// The page around a browser-viewer body: small, for a phone first.
pub(super) fn view_page(title: &str, user: Option<(&str, &str)>, body: &str) -> String {
    let nav = match user {
        Some((user, csrf)) => format!(
            "<nav><a href='/view/'>Patients</a> <span class=who>{}</span>\
             <form class=inline method=post action='/view/logout'><input type=hidden name=csrf value='{csrf}'>\
             <button id=logout>Log out</button></form></nav>",
            escape(user)
        ),
        None => String::new(),
    };
    format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8>\
         <meta name=viewport content='width=device-width, initial-scale=1'>\
         <title>{} - esserver viewer</title>\
         <link rel=stylesheet href='/view/view.css'></head><body>\
         <h1>{}</h1>{nav}{body}</body></html>",
        escape(title),
        escape(title)
    )
}

/// The browser viewer's style sheet, served as a file: its pages' policy allows no inline
/// style or script.
pub(super) const STYLE: &str = "body{font-family:sans-serif;margin:1em;max-width:60em}\
input,button{font-size:1em;padding:.4em}li{margin:.4em 0}.err{color:#a00}.who{margin:0 1em}\
.inline{display:inline}nav{margin-bottom:1em}ul{padding-left:1.2em}\
.grid{display:flex;flex-wrap:wrap;gap:.6em}.embryo{border:1px solid #ccc;padding:.4em;width:170px}\
.frame{max-width:100%;height:auto;background:#eee}.empty{color:#666}\
.stage{max-width:500px}.stage .frame{width:100%}.frame.missing{opacity:.3}\
.controls{display:flex;flex-wrap:wrap;gap:.4em;align-items:center}#scrub{flex:1 1 12em;min-width:8em}\
.controls button{min-width:3em}table{border-collapse:collapse;margin:.4em 0}\
td,th{border-bottom:1px solid #ddd;padding:.3em .5em;text-align:left}.annotate label{display:inline-block;margin:.3em 0}\
.ok{color:#060}.conflict{background:#fee;padding:.4em}\n";

/// The dish grid's script: it redraws the grid when one of its embryos changes.
pub(super) const DISH_SCRIPT: &str = include_str!("view_dish.js");

/// A browser-viewer page: as [`html`], under a policy without `unsafe-inline`.
pub(super) fn page_response(status: u16, body: String) -> Response {
    let mut response = html(status, body);
    for (name, value) in &mut response.headers {
        if *name == "content-security-policy" {
            *value = "default-src 'self'; style-src 'self'; script-src 'self'; img-src 'self'; \
                      form-action 'self'; frame-ancestors 'none'"
                .into();
        }
    }
    response
}

pub(super) fn refused_page(status: u16, title: &str, message: &str) -> Response {
    page_response(
        status,
        view_page(
            title,
            None,
            &format!(
                "<p class=err id=refused>{}</p><p><a href='/view/login'>Log in</a></p>",
                escape(message)
            ),
        ),
    )
}

/// Checks the session, the licence, the account and the device of a request (see the
/// module documentation). `device_needed`: false for the device page itself.
pub(super) fn session_of(
    shared: &WebShared,
    request: &es_net::http::Request,
    device_needed: bool,
) -> Result<ViewSession, Response> {
    if shared.licensing.current(now_ms()).is_err() {
        // Why is for administrators (the web interface's pages and the log), not visitors.
        return Err(refused_page(
            403,
            "Licence",
            "The browser viewer is closed: the server's licence is not valid. An administrator \
             can see why on the web interface.",
        ));
    }
    let view = &shared.site.view;
    let Some(token) = cookie(request, VIEW_COOKIE) else {
        return Err(redirect("/view/login"));
    };
    // A page's own background requests (the long poll, the reads it makes on a change) do
    // not count as use: a screen left open logs out after the idle time like any other.
    let background = request.path == "/view/changes" || request.query_param("live") == Some("1");
    let checked = if background {
        view.sessions.peek(&token, Instant::now())
    } else {
        view.sessions.check(&token, Instant::now())
    };
    let Some((user, _)) = checked else {
        return Err(redirect("/view/login"));
    };
    let account = shared
        .store
        .read()
        .ok()
        .and_then(|r| r.user(&user).ok().flatten());
    let rights = match account {
        Some(a) if !a.disabled && a.rights.allows(Rights::View) => a.rights,
        _ => {
            end_session(shared, &token);
            return Err(redirect("/view/login"));
        }
    };
    let device = cookie(request, DEVICE_COOKIE).filter(|id| is_device_id(id));
    let stored = match &device {
        Some(id) => shared
            .store
            .read()
            .and_then(|r| r.device(id))
            .map_err(|error| refused_page(503, "Unavailable", &error.to_string()))?,
        None => None,
    };
    if let Some(row) = &stored {
        if let Some(at_ms) = row.revoked_at_ms {
            end_session(shared, &token);
            return Err(refused_page(
                403,
                "Device revoked",
                &format!(
                    "This device ({}) was revoked by {} at {}; ask an administrator.",
                    row.name,
                    row.revoked_by,
                    time_text(at_ms)
                ),
            ));
        }
    }
    let bound = view.bound.lock().get(&token).cloned();
    match (&bound, &device, &stored) {
        // The session belongs to another device: its cookie was carried elsewhere.
        (Some(bound), Some(device), _) if bound != device => {
            end_session(shared, &token);
            Err(redirect("/view/login"))
        }
        (Some(_), None, _) => {
            end_session(shared, &token);
            Err(redirect("/view/login"))
        }
        (Some(_), Some(device), Some(_)) => Ok(ViewSession {
            user,
            rights,
            token,
            device_id: Some(device.clone()),
        }),
        // A registered device's first page after a login: the login is recorded, the
        // session bound to it.
        (None, Some(device), Some(_)) => {
            register(shared, &user, device, "", None)?;
            bind(shared, &token, device);
            Ok(ViewSession {
                user,
                rights,
                token,
                device_id: Some(device.clone()),
            })
        }
        // Not registered (yet): the device page names it.
        _ if device_needed => Err(redirect("/view/device")),
        _ => Ok(ViewSession {
            user,
            rights,
            token,
            device_id: None,
        }),
    }
}

/// Ends a session and forgets its device.
fn end_session(shared: &WebShared, token: &str) {
    shared.site.view.sessions.revoke(token);
    shared.site.view.bound.lock().remove(token);
}

/// Binds a session to its device. One session per device: another session bound to the same
/// device ends (a device cookie copied to other browsers gives them no place of their own).
fn bind(shared: &WebShared, token: &str, device: &str) {
    let view = &shared.site.view;
    let mut bound = view.bound.lock();
    let now = Instant::now();
    let others: Vec<String> = bound
        .iter()
        .filter(|(t, d)| d.as_str() == device && t.as_str() != token)
        .map(|(t, _)| t.clone())
        .collect();
    for other in others {
        bound.remove(&other);
        view.sessions.revoke(&other);
    }
    if bound.len() >= BOUND_SESSIONS_MAX {
        // Sessions that ended (idle or revoked) go; the check does not refresh live ones.
        bound.retain(|t, _| view.sessions.is_live(t, now));
    }
    if bound.len() >= BOUND_SESSIONS_MAX {
        tracing::warn!(
            sessions = bound.len(),
            "too many browser viewer sessions bound: the oldest are forgotten (they log in again)"
        );
        bound.clear();
    }
    bound.insert(token.to_string(), device.to_string());
}

/// Registers `device` (a login from it when it is known), within the licence's limit.
fn register(
    shared: &WebShared,
    user: &str,
    device: &str,
    name: &str,
    peer: Option<SocketAddr>,
) -> Result<(), Response> {
    let license = shared
        .licensing
        .current(now_ms())
        .map_err(|error| refused_page(403, "Licence", &format!("licence invalid ({error})")))?;
    let limit = (!license.demo).then_some(license.mobile_devices);
    let op = DeviceRegister {
        actor: Actor {
            user: user.to_string(),
            computer: peer.map_or_else(|| "browser".to_string(), |p| format!("browser {}", p.ip())),
        },
        device_id: device.to_string(),
        // A known device keeps its name; the op needs one.
        name: if name.is_empty() {
            "browser".into()
        } else {
            name.to_string()
        },
        limit,
        at_ms: now_ms(),
    };
    match shared.writer.write(op) {
        Ok(done) => {
            if done.created {
                tracing::info!(%user, device, active = done.active, "browser device registered");
            }
            Ok(())
        }
        Err(WriteError::Refused(refusal)) => {
            tracing::warn!(%user, device, code = es_storage::Refusal::code(&refusal), "browser device refused: {refusal}");
            let title = match refusal {
                DeviceRefusal::LimitReached { .. } => "Device limit reached",
                DeviceRefusal::Revoked { .. } => "Device revoked",
                DeviceRefusal::NotFound(_) => "Device unknown",
            };
            Err(refused_page(403, title, &format!("{}: {refusal}.", title)))
        }
        Err(WriteError::InvalidInput(message)) => Err(refused_page(400, "Device", &message)),
        Err(error) => Err(refused_page(503, "Unavailable", &error.to_string())),
    }
}

// ---------------------------------------------------------------- pages

pub(super) fn login_page(error: Option<&str>) -> Response {
    let error = error.map_or(String::new(), |e| {
        format!("<p class=err id=error>{}</p>", escape(e))
    });
    let body = format!(
        "{error}<form method=post action='/view/login'>\
         <p><label>User<br><input name=username id=username autocomplete=username></label></p>\
         <p><label>Password<br><input type=password name=password id=password autocomplete=current-password></label></p>\
         <p><button id=login>Log in</button></p></form>"
    );
    page_response(
        if error.is_empty() { 200 } else { 401 },
        view_page("Embryo viewer", None, &body),
    )
}

pub(super) fn login_post(call: &mut Call<'_>) -> Step {
    super::start_form_login(call, LoginKind::View).unwrap_or_else(|refusal| {
        Step::Respond(login_page(Some(&super::refusal_message(&refusal))))
    })
}

/// The answer to a recorded browser-viewer login: a session cookie and the patients page (which
/// sends an unregistered device to be named first), or the form again.
pub(super) fn login_answer(
    shared: &WebShared,
    user: &str,
    rights: Rights,
    refused: Option<String>,
    peer: SocketAddr,
    now: Instant,
) -> Response {
    if let Some(message) = refused {
        return login_page(Some(&message));
    }
    let Some(token) = shared.site.view.sessions.issue(user, rights, now) else {
        return login_page(Some("no randomness for a session"));
    };
    tracing::info!(%user, peer = %peer, "browser viewer login");
    let mut response = redirect("/view/");
    response
        .headers
        .push(("set-cookie", set_cookie(shared, VIEW_COOKIE, &token, None)));
    response
}

pub(super) fn logout_post(call: &mut Call<'_>) -> Step {
    if let Some(token) = cookie(call.request, VIEW_COOKIE) {
        if call.field("csrf") != Some(csrf_of(&token).as_str()) {
            return Step::Respond(refused_page(
                403,
                "Refused",
                "This form is stale or was not sent by this site; reload the page.",
            ));
        }
        end_session(call.shared, &token);
    }
    let mut response = redirect("/view/login");
    response.headers.push((
        "set-cookie",
        set_cookie(call.shared, VIEW_COOKIE, "", Some(0)),
    ));
    Step::Respond(response)
}

/// Names this browser as a device (minting its id when it has none).
pub(super) fn device_page(call: &mut Call<'_>) -> Response {
    let session = match session_of(call.shared, call.request, false) {
        Ok(session) => session,
        Err(response) => return response,
    };
    *call.caller = Some(format!("view:{}", session.user));
    if session.device_id.is_some() {
        return redirect("/view/");
    }
    if let Ok(license) = call.shared.licensing.current(now_ms()) {
        if !license.demo && license.mobile_devices == 0 {
            return refused_page(
                403,
                "No browser devices",
                "The server's licence allows no browser devices; ask for a licence that \
                 includes them.",
            );
        }
    }
    let existing = cookie(call.request, DEVICE_COOKIE).filter(|id| is_device_id(id));
    let (device, minted) = match existing {
        Some(id) => (id, false),
        None => {
            let mut bytes = [0u8; 16];
            if getrandom::fill(&mut bytes).is_err() {
                return refused_page(503, "Unavailable", "no randomness for a device id");
            }
            (hex::encode(bytes), true)
        }
    };
    let csrf = csrf_of(&session.token);
    let body = format!(
        "<p>This browser is not registered yet. Name it, so that an administrator can tell it \
         from the clinic's other devices (it counts against the licence's devices).</p>\
         <form method=post action='/view/device'><input type=hidden name=csrf value='{csrf}'>\
         <p><label>Device name<br><input name=name id=device-name maxlength=64 \
         placeholder='Lab tablet 2'></label></p><p><button id=register>Register this device</button></p></form>"
    );
    let mut response = page_response(
        200,
        view_page("Register this device", Some((&session.user, &csrf)), &body),
    );
    if minted {
        // Ten years: the device keeps its id as long as the browser keeps the cookie.
        response.headers.push((
            "set-cookie",
            set_cookie(call.shared, DEVICE_COOKIE, &device, Some(10 * 365 * 86_400)),
        ));
    }
    response
}

pub(super) fn device_post(call: &mut Call<'_>) -> Step {
    let session = match session_of(call.shared, call.request, false) {
        Ok(session) => session,
        Err(response) => return Step::Respond(response),
    };
    *call.caller = Some(format!("view:{}", session.user));
    if call.field("csrf") != Some(csrf_of(&session.token).as_str()) {
        return Step::Respond(refused_page(
            403,
            "Refused",
            "This form is stale or was not sent by this site; reload the page.",
        ));
    }
    let Some(device) = cookie(call.request, DEVICE_COOKIE).filter(|id| is_device_id(id)) else {
        return Step::Respond(redirect("/view/device"));
    };
    let name = call.field("name").unwrap_or("").trim().to_string();
    if name.is_empty() {
        return Step::Respond(refused_page(400, "Device", "Give the device a name."));
    }
    if let Err(response) = register(call.shared, &session.user, &device, &name, Some(call.peer)) {
        return Step::Respond(response);
    }
    bind(call.shared, &session.token, &device);
    Step::Respond(redirect("/view/"))
}

/// Patients, searched by record number or name.
pub(super) fn patients_page(call: &mut Call<'_>) -> Response {
    let session = match session_of(call.shared, call.request, true) {
        Ok(session) => session,
        Err(response) => return response,
    };
    *call.caller = Some(format!("view:{}", session.user));
    let query = call
        .request
        .query_param("q")
        .unwrap_or("")
        .trim()
        .to_lowercase();
    let csrf = csrf_of(&session.token);
    let reader = match call.shared.store.read() {
        Ok(reader) => reader,
        Err(error) => return refused_page(503, "Unavailable", &error.to_string()),
    };
    let patients = match reader.patients(None, SEARCH_SCAN_MAX) {
        Ok(patients) => patients,
        Err(error) => return refused_page(503, "Unavailable", &error.to_string()),
    };
    let mut list = String::new();
    let mut shown = 0;
    for patient in &patients {
        let haystack = format!(
            "{} {} {}",
            patient.patient_id, patient.first_name, patient.last_name
        )
        .to_lowercase();
        if !query.is_empty() && !haystack.contains(&query) {
            continue;
        }
        if shown == SEARCH_RESULTS_MAX {
            list.push_str("<li class=more>More patients match: narrow the search.</li>");
            break;
        }
        shown += 1;
        let treatments: Vec<String> = patient
            .treatments
            .iter()
            .map(|t| {
                format!(
                    "<a class=treatment href='/view/treatment?patient={}&amp;name={}'>{}</a>",
                    url_part(&patient.patient_id),
                    url_part(&t.name),
                    escape(&t.name)
                )
            })
            .collect();
        list.push_str(&format!(
            "<li class=patient><b>{}</b> {} {} <span class=treatments>{}</span></li>",
            escape(&patient.patient_id),
            escape(&patient.first_name),
            escape(&patient.last_name),
            treatments.join(", ")
        ));
    }
    if shown == 0 {
        list.push_str("<li class=empty>No patient matches.</li>");
    }
    if patients.len() >= SEARCH_SCAN_MAX as usize {
        list.push_str(&format!(
            "<li class=more>The search covered the first {SEARCH_SCAN_MAX} patients by record \
             number only.</li>"
        ));
    }
    let body = format!(
        "<form method=get action='/view/'><input name=q id=search value='{}' \
         placeholder='Record number or name'> <button id=find>Find</button></form><ul id=patients>{list}</ul>",
        escape(&query)
    );
    page_response(
        200,
        view_page("Patients", Some((&session.user, &csrf)), &body),
    )
}

/// `text` for a URL's query: everything but unreserved characters percent-encoded.
pub(super) fn url_part(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
            out.push(byte as char);
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

pub(super) fn storage_page(error: &es_storage::StorageError) -> Response {
    refused_page(503, "Unavailable", &format!("storage unavailable: {error}"))
}

/// The dishes of a treatment.
pub(super) fn treatment_page(call: &mut Call<'_>) -> Response {
    let session = match session_of(call.shared, call.request, true) {
        Ok(session) => session,
        Err(response) => return response,
    };
    *call.caller = Some(format!("view:{}", session.user));
    let patient = call
        .request
        .query_param("patient")
        .unwrap_or("")
        .to_string();
    let name = call.request.query_param("name").unwrap_or("").to_string();
    let dishes = match call
        .shared
        .store
        .read()
        .and_then(|r| r.treatment_dishes(&patient, &name))
    {
        Ok(Some(dishes)) => dishes,
        Ok(None) => return refused_page(404, "Not found", "No such treatment."),
        Err(error) => return storage_page(&error),
    };
    let mut list = String::new();
    for dish in &dishes {
        list.push_str(&format!(
            "<li class=dish><a href='/view/dish?key={}'>Dish {}</a> on {} slot {}, {} embryo(s), \
             inseminated {}</li>",
            dish.dish_key,
            escape(&dish.dish_id),
            escape(&dish.instrument_serial),
            dish.slot,
            dish.wells.len(),
            time_text(dish.insemination_at_ms)
        ));
    }
    if dishes.is_empty() {
        list.push_str("<li class=empty>No dish yet.</li>");
    }
    let csrf = csrf_of(&session.token);
    let title = format!("{patient}, treatment {name}");
    page_response(
        200,
        view_page(
            &title,
            Some((&session.user, &csrf)),
            &format!("<ul id=dishes>{list}</ul>"),
        ),
    )
}

/// A dish as a grid: every embryo with its latest frame (central plane) and key annotations.
pub(super) fn dish_page(call: &mut Call<'_>) -> Response {
    let session = match session_of(call.shared, call.request, true) {
        Ok(session) => session,
        Err(response) => return response,
    };
    *call.caller = Some(format!("view:{}", session.user));
    let Some(key) = call
        .request
        .query_param("key")
        .and_then(|k| k.parse::<u64>().ok())
    else {
        return refused_page(400, "Dish", "Which dish? (?key=N)");
    };
    let reader = match call.shared.store.read() {
        Ok(reader) => reader,
        Err(error) => return storage_page(&error),
    };
    // The change log's position before the reads: the grid's script listens from there.
    let last_seq = match reader.last_change_seq() {
        Ok(seq) => seq,
        Err(error) => return storage_page(&error),
    };
    let dish = match reader.dish(key) {
        Ok(Some(dish)) => dish,
        Ok(None) => return refused_page(404, "Not found", "No such dish."),
        Err(error) => return storage_page(&error),
    };
    let (embryos, overview) = match (reader.dish_embryos(key), reader.dish_overview(key, 0)) {
        (Ok(embryos), Ok(overview)) => (embryos, overview),
        (Err(error), _) | (_, Err(error)) => return storage_page(&error),
    };
    let mut grid = String::new();
    for embryo in &embryos {
        let frame = overview
            .iter()
            .find(|(well, _, _)| *well == embryo.well)
            .and_then(|(_, _, frame)| frame.as_ref());
        let image = match frame {
            Some(frame) => format!(
                "<a href='/view/embryo?id={id}'><img class=frame alt='latest frame' width=160 \
                 height=160 src='/view/frame?embryo={id}&amp;at={}&amp;plane={}&amp;w=320'></a>\
                 <br>{:.1} h",
                frame.acquired_at_ms,
                frame.focal_plane,
                (frame.acquired_at_ms - embryo.insemination_at_ms) as f64 / 3_600_000.0,
                id = url_part(&embryo.embryo_id),
            ),
            None => "<span class=empty>no image yet</span>".to_string(),
        };
        let timings: Vec<String> = embryo
            .annotations
            .iter()
            .filter_map(|a| a.hours.map(|h| format!("{} {:.1} h", escape(&a.name), h)))
            .take(6)
            .collect();
        let score = embryo
            .scores
            .first()
            .map(|s| format!(" {} {}", escape(&s.model), escape(&s.value)))
            .unwrap_or_default();
        grid.push_str(&format!(
            "<div class=embryo id='well-{}' data-embryo='{}'><b>{} well {}</b> {}<br>{image}<br>\
             <span class=fate>{}</span>{score}<br><span class=timings>{}</span></div>",
            embryo.well,
            escape(&embryo.embryo_id),
            escape(&embryo.label),
            embryo.well,
            super::view_embryo::embryo_link(&embryo.embryo_id, &embryo.embryo_id),
            embryo.fate.as_str(),
            timings.join(", ")
        ));
    }
    let csrf = csrf_of(&session.token);
    let title = format!("Dish {}", dish.dish_id);
    page_response(
        200,
        view_page(
            &title,
            Some((&session.user, &csrf)),
            &format!(
                "<p>{}, treatment {}; inseminated {}</p><div id=grid class=grid \
                 data-seq='{last_seq}'>{grid}</div><p id=live class=empty></p>\
                 <script src='/view/dish.js'></script>",
                escape(&dish.patient_id),
                escape(&dish.treatment_name),
                time_text(dish.insemination_at_ms)
            ),
        ),
    )
}

/// One stored JPEG, exactly as the incubator sent it (its SHA-256 checked on the read).
pub(super) fn frame(call: &mut Call<'_>) -> Response {
    let session = match session_of(call.shared, call.request, true) {
        Ok(session) => session,
        Err(response) => return response,
    };
    *call.caller = Some(format!("view:{}", session.user));
    let request = call.request;
    let embryo = request.query_param("embryo").unwrap_or("");
    let at = request
        .query_param("at")
        .and_then(|v| v.parse::<i64>().ok());
    let plane = request
        .query_param("plane")
        .and_then(|v| v.parse::<i32>().ok());
    let (Some(at), Some(plane)) = (at, plane) else {
        return refused_page(400, "Frame", "Which frame? (?embryo=ID&at=MS&plane=P)");
    };
    let found = match request.query_param("w") {
        Some(width) => {
            match super::view_embryo::smaller_frame(call.shared, embryo, at, plane, width) {
                Ok(jpeg) => Ok(Some(jpeg)),
                Err(response) => return response,
            }
        }
        None => call
            .shared
            .store
            .read()
            .and_then(|r| r.embryo_image(embryo, at, plane)),
    };
    match found {
        Ok(Some(jpeg)) => Response {
            status: 200,
            headers: vec![
                ("content-type", "image/jpeg".into()),
                // A stored frame never changes.
                ("cache-control", "private, max-age=86400, immutable".into()),
                ("x-content-type-options", "nosniff".into()),
            ],
            body: jpeg,
        },
        Ok(None) => refused_page(404, "Not found", "No such frame."),
        Err(error) => storage_page(&error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_parts_encode_everything_but_unreserved_characters() {
        assert_eq!(url_part("MRN-1_a.b~"), "MRN-1_a.b~");
        assert_eq!(url_part("a b&c=d'<"), "a%20b%26c%3Dd%27%3C");
    }

    #[test]
    fn cookies_are_found_by_exact_name() {
        let request = es_net::http::Request {
            headers: vec![(
                "cookie".into(),
                "esview2=x; esview=TOKEN ; esdevice=abc".into(),
            )],
            ..Default::default()
        };
        assert_eq!(cookie(&request, "esview").as_deref(), Some("TOKEN"));
        assert_eq!(cookie(&request, "esdevice").as_deref(), Some("abc"));
        assert_eq!(cookie(&request, "other"), None);
    }
}
