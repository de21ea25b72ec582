//! The web interface (port 4010, HTTPS by default) for the clinic's system administrator:
//! the status dashboard, the licence (show, install), `GET /healthz` for monitoring and
//! `GET /metrics` (Prometheus text). Server-rendered HTML with inline style, embedded in the
//! binary; no external resources. It runs on the public API's session and worker machinery
//! ([`crate::api`]) with its own routes, and stays up without a valid licence so an
//! administrator can install one.
//!
//! Login: a user with `admin` rights, checked like every login (argon2id, lock-out shared
//! with the viewer port). The session is a cookie (HttpOnly, Secure, SameSite=Strict, idle
//! 30 min); every form carries a CSRF token derived from the session's secret, checked on
//! every POST.

use crate::api::auth::Tokens;
use crate::api::{ApiMsg, ApiShared, LoginKind, Response, Site, Step};
use crate::now_ms;
use crate::times::time_text;
use es_net::http::Request;
use es_net::ConnHandle;
use es_storage::Rights;
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// The session cookie's name.
pub const COOKIE: &str = "esweb";
/// The browser viewer's session cookie (`/view/`).
pub const VIEW_COOKIE: &str = "esview";
/// The browser viewer's device id cookie: the device the licence counts.
pub const DEVICE_COOKIE: &str = "esdevice";

mod view;
mod view_embryo;

/// What the dashboard shows besides storage: who is connected.
/// The web interface's listener: the API's session machinery with the web's routes and state.
type WebShared = ApiShared<WebContext>;

impl Site for WebContext {
    const SERVICE: &'static str = "web";
    const LABEL: &'static str = "web";

    fn handle(
        shared: &WebShared,
        request: &Request,
        peer: SocketAddr,
        handle: &ConnHandle<ApiMsg>,
        caller: &mut Option<String>,
    ) -> Step {
        self::handle(shared, request, peer, handle, caller)
    }

    fn web_login_answer(
        shared: &WebShared,
        kind: LoginKind,
        user: &str,
        rights: Rights,
        refused: Option<String>,
        peer: SocketAddr,
        now: Instant,
    ) -> Response {
        match kind {
            LoginKind::View => view::login_answer(shared, user, rights, refused, peer, now),
            _ => login_answer(shared, user, rights, refused, peer, now),
        }
    }
}

pub struct WebContext {
    pub registry: Arc<crate::incubator::Registry>,
    pub viewers: Arc<crate::viewer::Hub>,
    pub sessions: Tokens,
    /// The browser viewer's sessions and the devices they are bound to.
    pub view: view::ViewState,
    /// False when the port serves plain HTTP (`[WebInterface] tls = off`): the session
    /// cookie then cannot be `Secure`.
    pub tls: bool,
    /// Instrument monitoring: its status on the dashboard and its run-time switches.
    pub ims: Arc<crate::ims::ImsShared>,
    /// When the server started, for its uptime.
    pub started_at_ms: i64,
    pub data_dir: std::path::PathBuf,
    /// SHA-256 of the shared TLS certificate (what viewers pin), when it reads.
    pub certificate_sha256: Option<String>,
    /// How new instruments are enrolled (`[IncubatorTransport] enrolment`).
    pub enrolment: es_storage::Enrolment,
    /// The backups: the last one, its age, the next scheduled one.
    pub backups: Arc<crate::backup::Backups>,
    /// The archive tier, when `[Archive]` is configured.
    pub archive: Option<Arc<crate::archive::Archive>>,
    /// The background activity computation, when on (`[Server] activity`).
    pub activity: Option<Arc<crate::activity::Background>>,
}

/// Escapes text for HTML content and attribute values.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The CSRF token of a session: derived from its secret, so it needs no storage.
fn csrf_of(session: &str) -> String {
    hex::encode(&Sha256::digest(format!("esserver-csrf:{session}").as_bytes())[..16])
}

/// A page's paragraph for a store that cannot be read.
fn storage_unavailable(error: &es_storage::StorageError) -> String {
    format!(
        "<p class=err>storage unavailable: {}</p>",
        escape(&error.to_string())
    )
}

fn html(status: u16, body: String) -> Response {
    Response {
        status,
        headers: vec![
            ("content-type", "text/html; charset=utf-8".into()),
            ("cache-control", "no-store".into()),
            ("x-frame-options", "DENY".into()),
            ("content-security-policy", "default-src 'self'; style-src 'unsafe-inline'; script-src 'self'; form-action 'self'; frame-ancestors 'none'".into()),
            ("referrer-policy", "same-origin".into()),
        ],
        body: bytes::Bytes::from(body),
    }
}

fn redirect(to: &str) -> Response {
    Response {
        status: 303,
        headers: vec![("location", to.to_string())],
        body: bytes::Bytes::new(),
    }
}

fn text(status: u16, body: String, content_type: &str) -> Response {
    Response {
        status,
        headers: vec![("content-type", content_type.to_string())],
        body: bytes::Bytes::from(body),
    }
}

/// The page around every body: the licence banner (DEMO, or why it is invalid) on each page.
fn page(shared: &WebShared, title: &str, user: Option<(&str, &str)>, body: &str) -> String {
    let banner = match shared.licensing.current(now_ms()) {
        Ok(license) if license.demo => format!(
            "<div class=banner>DEMO licence ({}): install the clinic's licence for production.</div>",
            escape(license.configuration.name())
        ),
        Ok(_) => String::new(),
        Err(error) => format!(
            "<div class='banner bad'>Licence invalid: {}. Viewers and the public API are refused; incubators keep uploading. <a href='/license'>Install a licence</a>.</div>",
            escape(&error.to_string())
        ),
    };
    let nav = match user {
        Some((name, csrf)) => format!(
            "<nav><a href='/'>Status</a> <a href='/license'>Licence</a> <a href='/instruments'>Instruments</a> <a href='/users'>Users</a> <a href='/devices'>Devices</a> <a href='/audit'>Audit trail</a> <a href='/warnings'>Warnings</a> <span class=who>{}</span> \
             <form method=post action='/logout' class=inline><input type=hidden name=csrf value='{csrf}'>\
             <button id=logout>Log out</button></form></nav>",
            escape(name)
        ),
        None => String::new(),
    };
    format!(
        "<!doctype html><html lang=en><head><meta charset=utf-8><title>{} - esserver</title>\
         <style>body{{font-family:sans-serif;margin:2em;max-width:70em}}table{{border-collapse:collapse}}\
         td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}.banner{{background:#fff3c4;padding:.6em;margin:1em 0}}\
         .bad{{background:#ffd6d6}}.inline{{display:inline}}nav a{{margin-right:1em}}.who{{margin:0 1em}}\
         textarea{{width:100%;height:12em}}.ok{{color:#060}}.err{{color:#a00}}.empty{{color:#666}}\
         .card{{display:inline-block;border:1px solid #9c9;background:#efe;padding:.4em .8em;margin:0 .5em .5em 0}}\
         .card.bad{{border-color:#c99;background:#fee}}</style></head><body>\
         <h1>esserver: {}</h1>{nav}{banner}{body}</body></html>",
        escape(title),
        escape(title)
    )
}

/// The logged-in administrator, from the session cookie.
fn session_of(shared: &WebShared, request: &Request) -> Option<(String, String)> {
    let web = &shared.site;
    let cookies = request.header("cookie")?;
    let token = cookies.split(';').find_map(|pair| {
        let (name, value) = pair.trim().split_once('=')?;
        (name == COOKIE).then(|| value.trim().to_string())
    })?;
    let (user, rights) = web.sessions.check(&token, Instant::now())?;
    // The account as it is now: a disabled user or lost admin right ends the session.
    let record = shared.store.read().ok()?.user(&user).ok()??;
    if record.disabled || !record.rights.allows(Rights::Admin) || !rights.allows(Rights::Admin) {
        web.sessions.revoke(&token);
        return None;
    }
    Some((user, token))
}

/// The licence page's only script, served as a file so the pages' policy allows no inline
/// script (`script-src 'self'`).
const LICENSE_SCRIPT_PATH: &str = "/license.js";
const LICENSE_SCRIPT: &str =
    "document.getElementById('file').addEventListener('change',function(e){\
var f=e.target.files[0];if(!f)return;\
f.text().then(function(t){document.getElementById('license-text').value=t;});});\n";

/// Why a form POST did not come from this site's own pages, if it did not. Browsers send
/// `Sec-Fetch-Site` and `Origin` with every POST; a request with neither (a script, an old
/// browser) is let through, since it cannot carry another site's page's cookies by itself.
fn cross_site(request: &Request, tls: bool) -> Option<&'static str> {
    if let Some(site) = request.header("sec-fetch-site") {
        // The browser says where the request came from; it cannot be set by a page.
        let site = site.trim().to_ascii_lowercase();
        return (site != "same-origin" && site != "none")
            .then_some("sec-fetch-site is not same-origin");
    }
    // Older browsers: the Origin (pages are served with `referrer-policy: same-origin`, so a
    // browser sends the real origin, not "null", for this site's own forms).
    let origin = request.header("origin")?.trim();
    let host = request.header("host").unwrap_or("").trim();
    let scheme = if tls { "https" } else { "http" };
    let expected = format!("{scheme}://{host}");
    if host.is_empty() || !origin.eq_ignore_ascii_case(&expected) {
        return Some("origin is not this server");
    }
    None
}

fn form(request: &Request) -> Vec<(String, String)> {
    es_net::http::parse_form(&request.body).unwrap_or_default()
}

fn field<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
    fields
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// Who may use a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Anybody (the login page, the health check, the page script).
    Public,
    /// A monitoring scraper with an API key (any scope), or an administrator's session.
    Scraper,
    /// An administrator's session; a POST also needs the session's CSRF token.
    Admin,
    /// The browser viewer: its handlers check their own session, device and licence
    /// (`view::session_of`), and their forms' CSRF tokens.
    Viewer,
}

/// One request as a page handler sees it, once its access was checked.
struct Call<'a> {
    shared: &'a WebShared,
    request: &'a Request,
    peer: SocketAddr,
    handle: &'a ConnHandle<ApiMsg>,
    caller: &'a mut Option<String>,
    /// The administrator and the session token (for `Access::Admin` pages).
    session: Option<(String, String)>,
    /// The session's CSRF token (empty without a session).
    csrf: String,
    /// A POST's form fields.
    fields: Vec<(String, String)>,
}

impl Call<'_> {
    /// The administrator (an `Access::Admin` page has one).
    fn user(&self) -> &str {
        self.session.as_ref().map_or("", |(user, _)| user.as_str())
    }

    fn field(&self, name: &str) -> Option<&str> {
        field(&self.fields, name)
    }
}

type Get = fn(&mut Call<'_>) -> Response;
type Post = fn(&mut Call<'_>) -> Step;

/// One page of the web interface: its path, who may use it, and what answers GET (and HEAD)
/// and POST. A path not here is a 404; a method a page does not answer is a 405 naming the
/// ones it does.
struct Page {
    path: &'static str,
    access: Access,
    get: Option<Get>,
    /// A GET answered later than its handler returns (a long poll), instead of `get`.
    get_step: Option<Post>,
    post: Option<Post>,
}

/// Every page: adding one is one entry here and its handlers.
const PAGES: &[Page] = &[
    Page {
        path: "/healthz",
        access: Access::Public,
        get: Some(|call| healthz(call.shared)),
        get_step: None,
        post: None,
    },
    Page {
        path: LICENSE_SCRIPT_PATH,
        access: Access::Public,
        get: Some(|_| text(200, LICENSE_SCRIPT.into(), "text/javascript; charset=utf-8")),
        get_step: None,
        post: None,
    },
    Page {
        path: "/login",
        access: Access::Public,
        get: Some(|call| login_page(call.shared, None)),
        get_step: None,
        post: Some(login_post),
    },
    Page {
        path: "/metrics",
        access: Access::Scraper,
        get: Some(|call| metrics(call.shared)),
        get_step: None,
        post: None,
    },
    Page {
        path: "/",
        access: Access::Admin,
        get: Some(|call| dashboard(call.shared, call.user(), &call.csrf)),
        get_step: None,
        post: None,
    },
    Page {
        path: "/logout",
        access: Access::Admin,
        get: None,
        get_step: None,
        post: Some(logout_post),
    },
    Page {
        path: "/license",
        access: Access::Admin,
        get: Some(|call| license_page(call.shared, call.user(), &call.csrf, "")),
        get_step: None,
        post: Some(license_post),
    },
    Page {
        path: "/instruments",
        access: Access::Admin,
        get: Some(|call| instruments_page(call.shared, call.user(), &call.csrf, "")),
        get_step: None,
        post: Some(instruments_post),
    },
    Page {
        path: "/users",
        access: Access::Admin,
        get: Some(|call| users_page(call.shared, call.user(), &call.csrf, "")),
        get_step: None,
        post: Some(|call| {
            let message = user_action(call.shared, call.user(), &call.fields);
            Step::Respond(users_page(call.shared, call.user(), &call.csrf, &message))
        }),
    },
    Page {
        path: "/ims",
        access: Access::Admin,
        get: None,
        get_step: None,
        post: Some(ims_post),
    },
    Page {
        path: "/audit",
        access: Access::Admin,
        get: Some(|call| {
            let after = call.request.query_param("after");
            audit_page(call.shared, call.user(), &call.csrf, after)
        }),
        get_step: None,
        post: None,
    },
    Page {
        path: "/devices",
        access: Access::Admin,
        get: Some(|call| devices_page(call.shared, call.user(), &call.csrf, "")),
        get_step: None,
        post: Some(devices_post),
    },
    Page {
        path: "/view/view.css",
        access: Access::Public,
        get: Some(|_| text(200, view::STYLE.into(), "text/css; charset=utf-8")),
        get_step: None,
        post: None,
    },
    Page {
        path: "/view/login",
        access: Access::Public,
        get: Some(|_| view::login_page(None)),
        get_step: None,
        post: Some(view::login_post),
    },
    Page {
        path: "/view/logout",
        access: Access::Viewer,
        get: None,
        get_step: None,
        post: Some(view::logout_post),
    },
    Page {
        path: "/view/device",
        access: Access::Viewer,
        get: Some(view::device_page),
        get_step: None,
        post: Some(view::device_post),
    },
    Page {
        path: "/view/",
        access: Access::Viewer,
        get: Some(view::patients_page),
        get_step: None,
        post: None,
    },
    Page {
        path: "/view/treatment",
        access: Access::Viewer,
        get: Some(view::treatment_page),
        get_step: None,
        post: None,
    },
    Page {
        path: "/view/dish",
        access: Access::Viewer,
        get: Some(view::dish_page),
        get_step: None,
        post: None,
    },
    Page {
        path: "/view/frame",
        access: Access::Viewer,
        get: Some(view::frame),
        get_step: None,
        post: None,
    },
    Page {
        path: "/view/embryo",
        access: Access::Viewer,
        get: Some(view_embryo::embryo_page),
        get_step: None,
        post: None,
    },
    Page {
        path: "/view/player.js",
        access: Access::Public,
        get: Some(|_| {
            text(
                200,
                view_embryo::PLAYER_SCRIPT.into(),
                "text/javascript; charset=utf-8",
            )
        }),
        get_step: None,
        post: None,
    },
    Page {
        path: "/view/dish.js",
        access: Access::Public,
        get: Some(|_| {
            text(
                200,
                view::DISH_SCRIPT.into(),
                "text/javascript; charset=utf-8",
            )
        }),
        get_step: None,
        post: None,
    },
    Page {
        path: "/view/embryo.json",
        access: Access::Viewer,
        get: Some(view_embryo::embryo_json),
        get_step: None,
        post: None,
    },
    Page {
        path: "/view/annotate",
        access: Access::Viewer,
        get: None,
        get_step: None,
        post: Some(view_embryo::annotate_post),
    },
    Page {
        path: "/view/changes",
        access: Access::Viewer,
        get: None,
        // A long poll: answered by the session when a commit comes or the wait ends.
        get_step: Some(view_embryo::changes),
        post: None,
    },
    Page {
        path: "/warnings",
        access: Access::Admin,
        get: Some(|call| {
            let skip = call.request.query_param("skip");
            warnings_page(call.shared, call.user(), &call.csrf, skip)
        }),
        get_step: None,
        post: None,
    },
];

/// Dispatches a request through [`PAGES`]: forms from other sites are refused first, then
/// access is checked (an administrator's form also by its CSRF token, audited when wrong),
/// then the page's handler answers.
fn handle(
    shared: &WebShared,
    request: &Request,
    peer: SocketAddr,
    handle: &ConnHandle<ApiMsg>,
    caller: &mut Option<String>,
) -> Step {
    let method = request.method.as_str();
    let path = request.path.as_str();
    if method == "POST" {
        if let Some(reason) = cross_site(request, shared.site.tls) {
            // Login CSRF included: another site's page must not log a browser in here.
            tracing::warn!(peer = %peer, path, reason, "web form refused: sent from another site");
            let body = "<p class=err>This form was not sent by this site's own pages; open \
                        the server's address directly and try again.</p>";
            return Step::Respond(html(403, page(shared, "Refused", None, body)));
        }
    }
    let found = PAGES.iter().find(|page| page.path == path);
    let session = match found.map(|page| page.access) {
        Some(Access::Public | Access::Viewer) => None,
        Some(Access::Scraper) => {
            let key_ok = crate::api::auth::credential(request)
                .filter(|c| c.starts_with(crate::api::auth::KEY_PREFIX))
                .is_some_and(|c| crate::api::auth::check_api_key(&shared.store, c).is_ok());
            if !key_ok && session_of(shared, request).is_none() {
                return Step::Respond(text(
                    401,
                    "log in as an administrator or send an API key\n".into(),
                    "text/plain; charset=utf-8",
                ));
            }
            None
        }
        // Unknown paths too: only an administrator learns that a page does not exist.
        Some(Access::Admin) | None => match session_of(shared, request) {
            Some(session) => Some(session),
            None => return Step::Respond(redirect("/login")),
        },
    };
    let csrf = session
        .as_ref()
        .map_or_else(String::new, |(_, token)| csrf_of(token));
    if let Some((user, _)) = &session {
        *caller = Some(format!("web:{user}"));
    }
    let Some(found) = found else {
        let user = session.as_ref().map(|(user, _)| user.as_str());
        let nav = user.map(|user| (user, csrf.as_str()));
        let body = "<p>No such page.</p>";
        return Step::Respond(html(404, page(shared, "Not found", nav, body)));
    };
    let fields = if method == "POST" {
        form(request)
    } else {
        Vec::new()
    };
    let mut call = Call {
        shared,
        request,
        peer,
        handle,
        caller,
        session,
        csrf,
        fields,
    };
    match (method, found.get, found.get_step, found.post) {
        ("GET" | "HEAD", Some(get), _, _) => Step::Respond(get(&mut call)),
        ("GET" | "HEAD", None, Some(get_step), _) => get_step(&mut call),
        ("POST", _, _, Some(post)) => {
            if found.access == Access::Admin && call.field("csrf") != Some(call.csrf.as_str()) {
                return Step::Respond(csrf_refused(&call));
            }
            post(&mut call)
        }
        _ => {
            let mut allowed = Vec::new();
            if found.get.is_some() || found.get_step.is_some() {
                allowed.extend(["GET", "HEAD"]);
            }
            if found.post.is_some() {
                allowed.push("POST");
            }
            let allow = allowed.join(", ");
            let mut response = text(
                405,
                format!("{method} is not answered here; use {allow}\n"),
                "text/plain; charset=utf-8",
            );
            response.headers.push(("allow", allow));
            Step::Respond(response)
        }
    }
}

/// An administrator's form without its session's CSRF token: refused and audited.
fn csrf_refused(call: &Call<'_>) -> Response {
    let (user, path, peer) = (call.user(), call.request.path.as_str(), call.peer);
    tracing::warn!(%user, peer = %peer, path, "web form refused: missing or wrong CSRF token");
    let actor = es_storage::Actor {
        user: user.to_string(),
        computer: format!("web {}", peer.ip()),
    };
    let action = format!("web{}", path.replace('/', "."));
    let attempted = r#"{"refused":"missing or wrong CSRF token"}"#.to_string();
    crate::edits::audit_denied(&call.shared.writer, &actor, &action, attempted);
    let body = "<p class=err>This form is stale or was not sent by this site; reload the page \
                and try again.</p>";
    html(
        403,
        page(call.shared, "Refused", Some((user, &call.csrf)), body),
    )
}

/// Starts the password check of a login form (`username`, `password`) on a worker; its
/// answer comes to `Site::web_login_answer`. Err: refused at once (the refusal's JSON).
fn start_form_login(call: &mut Call<'_>, kind: LoginKind) -> Result<Step, Response> {
    let user = call.field("username").unwrap_or("").to_string();
    let password = call.field("password").unwrap_or("").to_string();
    let label = if kind == LoginKind::View {
        "view-login"
    } else {
        "login"
    };
    *call.caller = Some(format!("{label}:{user}"));
    crate::api::routes::start_login(call.shared, &user, &password, kind, call.peer, call.handle)
        .map_err(|refusal| *refusal)
}

/// The message of a refused login's JSON answer.
fn refusal_message(refusal: &Response) -> String {
    let value: serde_json::Value = serde_json::from_slice(&refusal.body).unwrap_or_default();
    value["message"]
        .as_str()
        .unwrap_or("login refused")
        .to_string()
}

fn login_post(call: &mut Call<'_>) -> Step {
    start_form_login(call, LoginKind::Web).unwrap_or_else(|refusal| {
        Step::Respond(login_page(call.shared, Some(&refusal_message(&refusal))))
    })
}

fn logout_post(call: &mut Call<'_>) -> Step {
    if let Some((_, token)) = &call.session {
        call.shared.site.sessions.revoke(token);
    }
    let mut response = redirect("/login");
    let secure = if call.shared.site.tls { "; Secure" } else { "" };
    response.headers.push((
        "set-cookie",
        format!("{COOKIE}=; Max-Age=0; Path=/; HttpOnly{secure}; SameSite=Strict"),
    ));
    Step::Respond(response)
}

fn license_post(call: &mut Call<'_>) -> Step {
    let (shared, user) = (call.shared, call.user());
    let text = call.field("license").unwrap_or("");
    let message = match shared.licensing.install(text.trim().as_bytes(), now_ms()) {
        Ok(license) => {
            tracing::info!(%user, license = %license.license_id, "licence installed from the web interface");
            let over = shared.site.registry.over_limit(&shared.licensing);
            if let Some(warning) = &over {
                tracing::warn!("{warning}");
            }
            format!(
                "<p class=ok id=result>Licence {} for {} installed; it applies now.</p>{}",
                escape(&license.license_id),
                escape(&license.clinic),
                over.map_or_else(String::new, |w| format!(
                    "<p class=err id=over-limit>Warning: {}</p>",
                    escape(&w)
                ))
            )
        }
        Err(error) => format!(
            "<p class=err id=result>Not installed: {}</p>",
            escape(&error.to_string())
        ),
    };
    Step::Respond(license_page(shared, user, &call.csrf, &message))
}

fn ims_post(call: &mut Call<'_>) -> Step {
    let part = call.field("part").and_then(crate::ims::Part::parse);
    let on = call.field("on") == Some("on");
    let message = match part {
        Some(part) => {
            let by = format!("web:{}", call.user());
            call.shared.site.ims.set(part, on, &by);
            "<p class=ok id=result>Monitoring switched; it applies now, until the next start.</p>"
        }
        None => "<p class=err id=result>Not switched: unknown part.</p>",
    };
    Step::Respond(dashboard_with(
        call.shared,
        call.user(),
        &call.csrf,
        message,
    ))
}

fn instruments_post(call: &mut Call<'_>) -> Step {
    let (shared, user) = (call.shared, call.user());
    let serial = call.field("serial").unwrap_or("");
    let message = match call.field("action") {
        Some("approve") => {
            let computer = format!("web {}", call.peer.ip());
            let by = format!("web:{user}");
            let response = crate::admin::approve_pending(
                &shared.writer,
                &shared.site.registry,
                serial,
                &by,
                &computer,
            );
            result_paragraph(&response, "Not approved: ")
        }
        Some("number") => {
            let response = match call.field("number").map(str::trim) {
                Some(text) => match text.parse::<u32>() {
                    Ok(number) if number >= 1 => {
                        crate::admin::instrument_number(&shared.writer, serial, number, user)
                    }
                    _ => crate::control::Response::error(
                        "invalid_input",
                        format!("{text:?} is not an instrument number (1 or more)"),
                    ),
                },
                None => {
                    crate::control::Response::error("invalid_input", "give the instrument's number")
                }
            };
            result_paragraph(&response, "Number not set: ")
        }
        _ => {
            let name = call.field("name").unwrap_or("").trim();
            let response = crate::admin::instrument_rename(&shared.writer, serial, name, user);
            result_paragraph(&response, "Not renamed: ")
        }
    };
    Step::Respond(instruments_page(shared, user, &call.csrf, &message))
}

fn login_page(shared: &WebShared, error: Option<&str>) -> Response {
    let error = error.map_or(String::new(), |e| {
        format!("<p class=err id=error>{}</p>", escape(e))
    });
    let body = format!(
        "{error}<form method=post action='/login'><p><label>User <input name=username id=username autocomplete=username></label></p>\
         <p><label>Password <input type=password name=password id=password autocomplete=current-password></label></p>\
         <p><button id=login>Log in</button></p></form><p>Administrators only (rights <code>admin</code>).</p>"
    );
    html(
        if error.is_empty() { 200 } else { 401 },
        page(shared, "Log in", None, &body),
    )
}

/// The answer to a recorded web login: a session cookie and the dashboard, or the form again.
fn login_answer(
    shared: &WebShared,
    user: &str,
    rights: Rights,
    refused: Option<String>,
    peer: SocketAddr,
    now: Instant,
) -> Response {
    if let Some(message) = refused {
        return login_page(shared, Some(&message));
    }
    if !rights.allows(Rights::Admin) {
        tracing::warn!(%user, peer = %peer, "web interface login refused: not an administrator");
        let actor = es_storage::Actor {
            user: user.to_string(),
            computer: format!("web {}", peer.ip()),
        };
        let attempted = format!(r#"{{"refused":"needs admin","rights":"{rights}"}}"#);
        crate::edits::audit_denied(&shared.writer, &actor, "web.login", attempted);
        return login_page(
            shared,
            Some(&format!(
                "{user} may not use the web interface: it needs the admin right"
            )),
        );
    }
    let web = &shared.site;
    let Some(token) = web.sessions.issue(user, rights, now) else {
        return login_page(shared, Some("no randomness for a session"));
    };
    tracing::info!(%user, "web interface login");
    let mut response = redirect("/");
    let secure = if web.tls { "; Secure" } else { "" };
    response.headers.push((
        "set-cookie",
        format!("{COOKIE}={token}; Path=/; HttpOnly{secure}; SameSite=Strict"),
    ));
    response
}

fn healthz(shared: &WebShared) -> Response {
    let storage = shared.store.read().and_then(|r| r.last_change_seq());
    let license = shared.licensing.current(now_ms());
    let healthy = storage.is_ok() && !shared.disk.is_low();
    let body = serde_json::json!({
        "status": if healthy { "ok" } else { "degraded" },
        "storage": match &storage { Ok(_) => "ok".to_string(), Err(e) => e.to_string() },
        "disk_low": shared.disk.is_low(),
        "license": match &license { Ok(l) if l.demo => "demo".to_string(), Ok(_) => "valid".to_string(), Err(e) => format!("invalid: {e}") },
        "version": crate::VERSION,
        "commit": crate::COMMIT,
    });
    Response::json(if healthy { 200 } else { 503 }, &body)
}

fn metrics(shared: &WebShared) -> Response {
    let mut out = format!(
        "# HELP esserver_build_info The server's version and the commit it was built from.\n\
         # TYPE esserver_build_info gauge\n\
         esserver_build_info{{version=\"{}\",commit=\"{}\"}} 1\n",
        crate::VERSION,
        crate::COMMIT
    );
    let mut gauge = |name: &str, help: &str, value: u64| {
        let _ = writeln!(
            out,
            "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
        );
    };
    gauge("esserver_up", "1 while the server answers.", 1);
    gauge(
        "esserver_license_valid",
        "1 when a valid licence is installed.",
        u64::from(shared.licensing.current(now_ms()).is_ok()),
    );
    let expires_in_s = shared
        .licensing
        .current(now_ms())
        .ok()
        .and_then(|license| license.expires_at_ms)
        .map_or(0, |expires| ((expires - now_ms()).max(0) / 1000) as u64);
    gauge(
        "esserver_license_expires_in_seconds",
        "Seconds until the licence expires (0: no expiry, or no valid licence).",
        expires_in_s,
    );
    gauge(
        "esserver_disk_free_bytes",
        "Free bytes on the data directory's filesystem.",
        shared.disk.free_bytes(),
    );
    {
        let web = &shared.site;
        gauge(
            "esserver_incubators_connected",
            "Incubators connected now.",
            web.registry.snapshot().len() as u64,
        );
        gauge(
            "esserver_viewers_connected",
            "Logged-in viewer connections now.",
            web.viewers.len() as u64,
        );
    }
    if let Ok(stats) = shared.store.read().and_then(|r| r.stats()) {
        gauge("esserver_patients", "Patients stored.", stats.patients);
        gauge("esserver_embryos", "Embryos stored.", stats.embryos);
        gauge("esserver_images", "Images stored.", stats.images);
        gauge(
            "esserver_image_bytes",
            "Bytes of stored images.",
            stats.image_bytes,
        );
        gauge(
            "esserver_last_change_seq",
            "The newest change-log sequence number.",
            stats.last_change_seq,
        );
    }
    {
        let web = &shared.site;
        if let Ok(ims) = web.ims.status(&shared.store, now_ms()) {
            let mut gauge = |name: &str, help: &str, value: u64| {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
                );
            };
            gauge(
                "esserver_ims_receive",
                "1 while telemetry is queued for monitoring.",
                u64::from(ims.receive),
            );
            gauge(
                "esserver_ims_upload",
                "1 while the monitoring queue is uploaded.",
                u64::from(ims.upload),
            );
            gauge(
                "esserver_ims_queue_records",
                "Records in the monitoring queue.",
                ims.queue.records,
            );
            gauge(
                "esserver_ims_queue_bytes",
                "Bytes of the monitoring queue.",
                ims.queue.bytes,
            );
            gauge(
                "esserver_ims_oldest_age_seconds",
                "Age of the oldest queued monitoring record.",
                ims.oldest_age_s as u64,
            );
            let mut counter = |name: &str, help: &str, value: u64| {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
                );
            };
            counter(
                "esserver_ims_dropped_records_total",
                "Monitoring records dropped because the queue was full.",
                ims.queue.dropped_records,
            );
            counter(
                "esserver_ims_uploaded_records_total",
                "Monitoring records the endpoint accepted.",
                ims.queue.uploaded_records,
            );
            counter(
                "esserver_ims_withheld_total",
                "Telemetry kept on the server but not queued for monitoring.",
                ims.queue.withheld,
            );
            counter(
                "esserver_ims_upload_failures_total",
                "Failed upload attempts since the start.",
                ims.failures,
            );
        }
        let _ = writeln!(
            out,
            "# HELP esserver_incubator_images_total Images received from each connected incubator on its connection.\n# TYPE esserver_incubator_images_total counter"
        );
        for incubator in web.registry.snapshot() {
            let _ = writeln!(
                out,
                "esserver_incubator_images_total{{serial=\"{}\"}} {}",
                incubator.serial.replace(['"', '\\', '\n'], "_"),
                incubator.images
            );
        }
        let backups = web.backups.status(now_ms());
        let last = backups.last_success.as_ref();
        let mut gauge = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        gauge(
            "esserver_backup_last_success_timestamp_seconds",
            "When the last successful backup was taken (Unix seconds; 0: none).",
            last.map_or(0, |l| (l.at_ms / 1000) as u64),
        );
        gauge(
            "esserver_backup_last_size_bytes",
            "Bytes of the last successful backup (every file it is made of).",
            last.map_or(0, |l| l.bytes),
        );
        gauge(
            "esserver_backup_last_failed",
            "1 when the last backup attempt failed.",
            u64::from(backups.last_failure.is_some()),
        );
        gauge(
            "esserver_backup_attention",
            "1 when the backups need attention: none, the last older than 26 h, or it failed.",
            u64::from(backups.warning.is_some()),
        );
        if let Some(archive) = &web.archive {
            let status = archive.status();
            for (name, help, value) in [
                (
                    "esserver_archive_volumes",
                    "Volumes whose checked copy is in the object store.",
                    status.volumes_archived,
                ),
                (
                    "esserver_archive_bytes",
                    "Bytes of those volumes.",
                    status.bytes_archived,
                ),
                (
                    "esserver_archive_due_volumes",
                    "Sealed volumes old enough to archive and not archived yet.",
                    status.volumes_due,
                ),
                (
                    "esserver_archive_last_failed",
                    "1 when the last archive pass failed.",
                    u64::from(status.last_error.is_some()),
                ),
                (
                    "esserver_archive_cache_bytes",
                    "Bytes in the local cache of records read from the object store.",
                    status.cache.bytes,
                ),
            ] {
                gauge(name, help, value);
            }
            for (name, help, value) in [
                (
                    "esserver_archive_remote_reads_total",
                    "Records read from the object store (range requests).",
                    status.remote_reads,
                ),
                (
                    "esserver_archive_remote_read_failures_total",
                    "Range requests to the object store that failed.",
                    status.remote_read_failures,
                ),
            ] {
                let _ = writeln!(
                    out,
                    "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
                );
            }
        }
    }
    if let Some(activity) = &shared.site.activity {
        let status = activity.status();
        let mut gauge = |name: &str, help: &str, value: u64| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        };
        gauge(
            "esserver_activity_changes_behind",
            "Changes the background activity computation has still to look at.",
            status.changes_behind,
        );
        gauge(
            "esserver_activity_curves",
            "Embryos with a stored activity curve.",
            status.curves,
        );
        for (name, help, value) in [
            (
                "esserver_activity_images_analysed_total",
                "Frames decoded and compared by the background activity computation.",
                status.images_analysed,
            ),
            (
                "esserver_activity_cpu_milliseconds_total",
                "CPU time of the background activity computation.",
                status.cpu_ms,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
    }
    text(200, out, "text/plain; version=0.0.4; charset=utf-8")
}

/// " of 500.0 GB (12 % used)" for the data directory's disk, or nothing when unknown.
const MIB: f64 = 1024.0 * 1024.0;
const GIB: f64 = 1024.0 * MIB;

/// Days of image growth averaged for the storage card.
const GROWTH_DAYS: u32 = 7;

/// Stored data, the disk (used of total, free, the reserve) and how fast it fills: the growth
/// per day measured over the last days, the growth the capacity model expects of the
/// instruments enrolled, and the days left at each. Sizes in binary units (GiB), as the
/// reserve and the cache are set.
fn storage_card(shared: &WebShared, now: i64) -> String {
    use es_perf::catalog::DeviceModel;
    let mut out = String::from("<h2>Storage</h2>");
    let read = shared.store.read().and_then(|r| {
        Ok((
            r.stats()?,
            r.instruments()?,
            r.activity(es_storage::tables::day_of(now), GROWTH_DAYS)?,
        ))
    });
    let (stats, instruments, activity) = match read {
        Ok(read) => read,
        Err(error) => return out + &storage_unavailable(&error),
    };
    let free = shared.disk.free_bytes();
    let reserve = shared.disk.reserve_bytes();
    let total = crate::os::disk_total_bytes(&shared.site.data_dir)
        .ok()
        .filter(|total| *total > 0);
    let disk = match total {
        Some(total) => format!(
            "{:.1} GiB used of {:.1} GiB ({:.0} %); {:.1} GiB free",
            total.saturating_sub(free) as f64 / GIB,
            total as f64 / GIB,
            100.0 * (1.0 - free.min(total) as f64 / total as f64),
            free as f64 / GIB
        ),
        None => format!("{:.1} GiB free", free as f64 / GIB),
    };
    // Measured: the bytes of the days before today on which anything arrived, from the
    // first such day; with none yet, today's so far, per day elapsed.
    let mut per_day = vec![0u64; GROWTH_DAYS as usize];
    let mut days_counted = 0usize;
    for a in &activity {
        let offset = per_day.len() - a.days_before.len();
        for (n, (_, bytes)) in a.days_before.iter().enumerate() {
            per_day[offset + n] += bytes;
        }
        days_counted = days_counted.max(a.days_before.len());
    }
    let today_bytes: u64 = activity.iter().map(|a| a.image_bytes_today).sum();
    let measured = if days_counted > 0 {
        Some((
            per_day.iter().sum::<u64>() as f64 / days_counted as f64,
            format!("mean of the last {days_counted} day(s)"),
        ))
    } else if today_bytes > 0 {
        let elapsed_days = (now.rem_euclid(86_400_000) as f64 / 86_400_000.0).max(1.0 / 24.0);
        Some((
            today_bytes as f64 / elapsed_days,
            "today so far".to_string(),
        ))
    } else {
        None
    };
    let mut devices: Vec<(DeviceModel, u32)> = Vec::new();
    for i in &instruments {
        let model = i.model.parse().unwrap_or(DeviceModel::EmbryoScope8);
        match devices.iter_mut().find(|(m, _)| *m == model) {
            Some((_, n)) => *n += 1,
            None => devices.push((model, 1)),
        }
    }
    let expected = es_perf::capacity::estimate(&devices).bytes_per_day as f64;
    let usable = free.saturating_sub(reserve) as f64;
    let days_left = |per_day: f64| {
        if per_day > 0.0 {
            format!("{:.0} days left", usable / per_day)
        } else {
            "-".to_string()
        }
    };
    let growth = match &measured {
        Some((bytes, how)) => format!("{:.2} GiB/day ({how}); {}", bytes / GIB, days_left(*bytes)),
        None => "no images stored in the last days".to_string(),
    };
    let _ = write!(
        out,
        "<table id=storage><tr><td>Patients</td><td>{}</td></tr><tr><td>Embryos</td><td>{}</td></tr>\
         <tr><td>Images</td><td>{}</td></tr><tr><td>Image data</td><td>{:.2} GiB</td></tr>\
         <tr><td>Disk</td><td id=disk{}>{disk}{}</td></tr>\
         <tr><td>Reserve</td><td>{:.1} GiB kept free: uploads are refused below it</td></tr>\
         <tr><td>Growth, measured</td><td id=growth>{growth}</td></tr>\
         <tr><td>Growth, expected</td><td id=growth-expected>{:.1} GiB/day for the {} instrument(s) enrolled, \
         every position cultured (capacity model); {}</td></tr></table>",
        stats.patients,
        stats.embryos,
        stats.images,
        stats.image_bytes as f64 / GIB,
        if shared.disk.is_low() { " class=err" } else { "" },
        if shared.disk.is_low() { " (LOW: writes refused)" } else { "" },
        reserve as f64 / GIB,
        expected / GIB,
        instruments.len(),
        days_left(expected),
    );
    out
}

/// A licence expiring within this is flagged on the status page.
const EXPIRY_WARNING_MS: i64 = 30 * 86_400_000;

/// "valid through 2031-12-31 (UTC), 412 days left", or "never expires".
fn validity_text(expires_at_ms: Option<i64>, now: i64) -> String {
    match expires_at_ms {
        None => "never expires".to_string(),
        Some(expires) => format!(
            "{}, {} days left",
            crate::times::valid_through(expires),
            (expires - now).max(0) / 86_400_000
        ),
    }
}

/// Product, version, server id, uptime, data directory and the certificate's fingerprint.
fn server_card(shared: &WebShared, now: i64) -> String {
    let web = &shared.site;
    let uptime_s = (now - web.started_at_ms).max(0) / 1000;
    let uptime = format!(
        "{} d {} h {} min",
        uptime_s / 86_400,
        uptime_s % 86_400 / 3600,
        uptime_s % 3600 / 60
    );
    format!(
        "<table id=server><tr><td>Server</td><td id=version>esserver {}</td></tr>\
         <tr><td>Server id</td><td id=server-id>{}</td></tr>\
         <tr><td>Up for</td><td>{uptime} (since {})</td></tr>\
         <tr><td>Data directory</td><td>{}</td></tr>\
         <tr><td>Certificate SHA-256</td><td id=fingerprint>{}</td></tr></table>",
        escape(crate::VERSION_TEXT),
        escape(&shared.store.server_id()),
        escape(&time_text(web.started_at_ms)),
        escape(&web.data_dir.display().to_string()),
        escape(web.certificate_sha256.as_deref().unwrap_or("unknown")),
    )
}

fn dashboard(shared: &WebShared, user: &str, csrf: &str) -> Response {
    dashboard_with(shared, user, csrf, "")
}

fn dashboard_with(shared: &WebShared, user: &str, csrf: &str, message: &str) -> Response {
    let mut body = String::from(message);
    let now = now_ms();
    {
        let web = &shared.site;
        body.push_str(&glance(shared, web, now));
    }
    body.push_str(&server_card(shared, now));
    body.push_str("<h2>Licence</h2>");
    match shared.licensing.current(now) {
        Ok(license) => {
            let _ = write!(
                body,
                "<p id=license-state>{} configuration, licence {} for {}{}; {}</p>",
                escape(license.configuration.name()),
                escape(&license.license_id),
                escape(&license.clinic),
                if license.demo { " (DEMO)" } else { "" },
                escape(&validity_text(license.expires_at_ms, now))
            );
            if license
                .expires_at_ms
                .is_some_and(|expires| expires - now < EXPIRY_WARNING_MS)
            {
                body.push_str(
                    "<p class=err id=license-expiring>The licence expires within 30 days: \
                     order its renewal now (viewers and the public API stop when it expires).</p>",
                );
            }
        }
        Err(error) => {
            let _ = write!(
                body,
                "<p id=license-state class=err>licence invalid: {}</p>",
                escape(&error.to_string())
            );
        }
    }
    let (capacity, rate) = capacity_and_rate(shared, &shared.site, now);
    body.push_str(&capacity);
    body.push_str("<h2>Incubators</h2>");
    {
        let web = &shared.site;
        body.push_str(&incubators_table(shared, web, now));
        let refusals = web.registry.refusals();
        if !refusals.is_empty() {
            body.push_str("<h3>Refused incubator connections (since the start)</h3><table id=refused><tr><th>Serial</th><th>Times</th><th>Latest reason</th><th>From</th><th>When</th></tr>");
            for r in refusals.iter().take(50) {
                let _ = write!(
                    body,
                    "<tr><td>{}</td><td>{}</td><td class=err>{}</td><td>{}</td><td>{}</td></tr>",
                    escape(&r.serial),
                    r.count,
                    escape(r.code),
                    escape(&r.peer),
                    escape(&time_text(r.at_ms))
                );
            }
            body.push_str("</table>");
        }
        let pending = web.registry.pending();
        if !pending.is_empty() {
            let _ = write!(
                body,
                "<p class=err id=pending-banner>{} new instrument(s) wait for approval: \
                 <a href='/instruments'>Instruments</a>.</p>",
                pending.len()
            );
        }
        body.push_str(&rate);
        body.push_str(&storage_card(shared, now));
        body.push_str(&backup_card(web, now));
        body.push_str(&archive_card(web));
        body.push_str(&activity_card(web));
        body.push_str("<h2>Viewers</h2><table id=viewers><tr><th>User</th><th>Computer</th><th>Address</th><th>Since</th></tr>");
        let viewers = web.viewers.snapshot();
        if viewers.is_empty() {
            body.push_str("<tr><td colspan=4 class=empty>No viewer is logged in.</td></tr>");
        }
        for v in viewers {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
                escape(&v.user),
                escape(&v.computer),
                escape(&v.peer),
                escape(&time_text(v.since_ms))
            );
        }
        body.push_str("</table>");
        body.push_str(&ims_panel(shared, web, csrf, now));
        body.push_str(&differences_card(shared));
        body.push_str(&warnings_card());
    }
    // The status page refreshes itself every 30 s (it has no fields to lose).
    let page_text = page(shared, "Status", Some((user, csrf)), &body).replacen(
        "<meta charset=utf-8>",
        "<meta charset=utf-8><meta http-equiv=refresh content=30>",
        1,
    );
    html(200, page_text)
}

/// Every instrument ever seen, connected or not: state, address, since when, its latest
/// image and today's images (UTC day, from the store, so they survive reconnects and
/// restarts), and its HELLOs refused since the start.
fn incubators_table(shared: &WebShared, web: &WebContext, now: i64) -> String {
    let connected = web.registry.snapshot();
    let refusals = web.registry.refusals();
    let (known, activity) = match shared.store.read().and_then(|r| {
        Ok((
            r.instruments()?,
            r.activity(es_storage::tables::day_of(now), 0)?,
        ))
    }) {
        Ok(read) => read,
        Err(error) => return storage_unavailable(&error),
    };
    let mut out = String::from(
        "<table id=incubators><tr><th>Serial</th><th>Model</th><th>State</th><th>Address</th>\
         <th>Since</th><th>Last image</th><th>Images today (UTC)</th><th>Refused</th></tr>",
    );
    if connected.is_empty() && known.is_empty() {
        out.push_str("<tr><td colspan=8 class=empty>No incubator has connected yet.</td></tr>");
    }
    let refused_text = |serial: &str| {
        refusals
            .iter()
            .find(|r| r.serial == serial)
            .map_or_else(String::new, |r| {
                format!("<span class=err>{} ({})</span>", r.count, escape(r.code))
            })
    };
    for i in &known {
        let live = connected.iter().find(|c| c.serial == i.serial);
        let seen = activity.iter().find(|a| a.instrument_id == i.instrument_id);
        let last_image = match seen.map(|a| a.last_image_ms) {
            Some(at) if at > 0 => escape(&time_text(at)),
            _ => "never".to_string(),
        };
        let today = seen.map_or(0, |a| a.images_today);
        let (state, address, since) = match live {
            Some(c) => (
                "<td class=ok>connected</td>",
                escape(&c.peer),
                escape(&time_text(c.connected_at_ms)),
            ),
            None => (
                "<td class=err>disconnected</td>",
                String::new(),
                format!("last seen {}", escape(&time_text(i.last_seen_ms))),
            ),
        };
        let _ = write!(
            out,
            "<tr id='incubator-{serial}'><td>{serial}</td><td>{}</td>{state}<td>{address}</td><td>{since}</td>\
             <td>{last_image}</td><td>{today}</td><td>{}</td></tr>",
            escape(&i.model),
            refused_text(&i.serial),
            serial = escape(&i.serial),
        );
    }
    out.push_str("</table>");
    out
}

/// The newest warnings, with a link to the rest.
/// Patients shown in the "details differ" card at most.
const DIFFERENCES_SHOWN_MAX: u32 = 50;

/// Patients whose details an incubator's dish registration disagreed with: the stored ones
/// were kept, and an embryologist resolves it by editing the patient (viewer or REST API).
fn differences_card(shared: &WebShared) -> String {
    let mut out = String::from("<h2>Patient details that differ</h2>");
    let (differences, patients) = match shared.store.read().and_then(|reader| {
        let differences = reader.patient_differences(DIFFERENCES_SHOWN_MAX)?;
        let mut patients = Vec::new();
        for d in &differences {
            patients.push(reader.patient(&d.patient_id)?);
        }
        Ok((differences, patients))
    }) {
        Ok(found) => found,
        Err(error) => return out + &storage_unavailable(&error),
    };
    out.push_str(
        "<table id=differences><tr><th>Patient</th><th>PatientIDx</th><th>Stored</th>\
         <th>The incubator gave</th><th>Instrument, dish</th><th>Latest</th><th>Times</th></tr>",
    );
    if differences.is_empty() {
        out.push_str(
            "<tr><td colspan=7 class=empty>No dish registration disagreed with a stored \
             patient.</td></tr>",
        );
    }
    let who = |first: &str, last: &str, born: &str| {
        escape(&format!(
            "{first} {last}, born {}",
            if born.is_empty() { "?" } else { born }
        ))
    };
    for (d, patient) in differences.iter().zip(patients) {
        let (stored, idx) = match &patient {
            Some(p) => (
                who(&p.first_name, &p.last_name, &p.date_of_birth),
                escape(&p.patient_idx),
            ),
            None => (String::new(), String::new()),
        };
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{idx}</td><td>{stored}</td><td class=err>{}</td><td>{}, {}</td><td>{}</td><td>{}</td></tr>",
            escape(&d.patient_id),
            who(&d.first_name, &d.last_name, &d.date_of_birth),
            escape(&d.instrument_serial),
            escape(&d.dish_id),
            escape(&time_text(d.at_ms)),
            d.times
        );
    }
    out.push_str(
        "</table><p>The stored details were kept and the dishes registered. An edit of the \
         patient in the viewer or through the REST API resolves the difference.</p>",
    );
    out
}

fn warnings_card() -> String {
    let log = &crate::warnings::LOG;
    let newest = log.newest(0, 5);
    let mut out = format!(
        "<h2>Warnings</h2><p id=warnings-count>{} warnings and errors logged since the start \
         (<a href='/warnings'>all kept</a>).</p>",
        log.total()
    );
    out.push_str(&warnings_table(&newest));
    out
}

fn warnings_table(rows: &[crate::warnings::Warning]) -> String {
    let mut out = String::from(
        "<table id=warnings><tr><th>#</th><th>When</th><th>Level</th><th>What</th></tr>",
    );
    if rows.is_empty() {
        out.push_str("<tr><td colspan=4 class=empty>No warning since the start.</td></tr>");
    }
    for w in rows {
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td class={}>{}</td><td>{}</td></tr>",
            w.seq,
            escape(&time_text(w.at_ms)),
            if w.level == "ERROR" { "err" } else { "warn" },
            w.level,
            escape(&w.text)
        );
    }
    out.push_str("</table>");
    out
}

/// Warnings shown per page.
const WARNINGS_PAGE_ROWS: usize = 100;

/// The warnings and errors kept since the start, newest first, a page at a time
/// (`?skip=N`).
fn warnings_page(shared: &WebShared, user: &str, csrf: &str, skip: Option<&str>) -> Response {
    let skip = match skip.map(str::parse::<usize>) {
        None => 0,
        Some(Ok(skip)) => skip,
        Some(Err(_)) => {
            let body = "<p class=err>skip must be a number of warnings</p>".to_string();
            return html(400, page(shared, "Warnings", Some((user, csrf)), &body));
        }
    };
    let log = &crate::warnings::LOG;
    let rows = log.newest(skip, WARNINGS_PAGE_ROWS);
    let mut body = format!(
        "<p id=warnings-count>{} warnings and errors logged since the start; the newest {} are \
         kept here (the server's log has them all). Newest first.</p>",
        log.total(),
        log.kept()
    );
    body.push_str(&warnings_table(&rows));
    body.push_str("<p>");
    if skip > 0 {
        let _ = write!(
            body,
            "<a href='/warnings?skip={}' id=newer>Newer</a> ",
            skip.saturating_sub(WARNINGS_PAGE_ROWS)
        );
    }
    if skip + rows.len() < log.kept() {
        let _ = write!(
            body,
            "<a href='/warnings?skip={}' id=older>Older</a>",
            skip + WARNINGS_PAGE_ROWS
        );
    }
    body.push_str("</p>");
    html(200, page(shared, "Warnings", Some((user, csrf)), &body))
}

/// The monitoring queue and uploader: switches, queue, drops, last success and error, and
/// each incubator's measured upload against the manual's 0.5 Mbit/s budget.
fn ims_panel(shared: &WebShared, web: &WebContext, csrf: &str, now: i64) -> String {
    let mut out = String::from("<h2>Instrument monitoring (IMS)</h2>");
    let status = match web.ims.status(&shared.store, now) {
        Ok(status) => status,
        Err(error) => return out + &storage_unavailable(&error),
    };
    let switch = |part: &str, on: bool| {
        let (label, state, value) = if on {
            ("pause", "on", "off")
        } else {
            ("resume", "off", "on")
        };
        format!(
            "{part} {state} <form method=post action='/ims' class=inline><input type=hidden name=csrf value='{csrf}'>\
             <input type=hidden name=part value={part}><input type=hidden name=on value={value}>\
             <button id=ims-{part}>{label}</button></form>"
        )
    };
    let _ = write!(
        out,
        "<p id=ims-switches>{}; {}</p><table id=ims>\
         <tr><td>Endpoint</td><td>{}</td></tr>\
         <tr><td>Queue</td><td id=ims-queue>{} records, {:.2} MiB of {:.0} MiB; oldest {}</td></tr>\
         <tr><td>Dropped (queue full)</td><td id=ims-dropped{}>{} records</td></tr>\
         <tr><td>Withheld (kept here, not sent)</td><td>{}</td></tr>\
         <tr><td>Last success</td><td>{}</td></tr>\
         <tr><td>Last error</td><td id=ims-error>{}</td></tr></table>",
        switch("receive", status.receive),
        switch("upload", status.upload),
        escape(
            status
                .endpoint
                .as_deref()
                .unwrap_or("none configured: nothing is uploaded")
        ),
        status.queue.records,
        // The bound is set in binary units ([IMS] queue_bytes_max = 256 MiB): shown in them.
        status.queue.bytes as f64 / MIB,
        status.queue_bytes_max as f64 / MIB,
        if status.queue.records == 0 {
            "-".to_string()
        } else {
            format!("{:.0} s ago", status.oldest_age_s)
        },
        if status.queue.dropped_records > 0 {
            " class=err"
        } else {
            ""
        },
        status.queue.dropped_records,
        status.queue.withheld,
        if status.last_success_ms > 0 {
            escape(&time_text(status.last_success_ms))
        } else {
            "never".into()
        },
        match &status.last_error {
            Some(error) => format!(
                "{} ({})",
                escape(error),
                escape(&time_text(status.last_error_ms))
            ),
            None => "none".into(),
        },
    );
    if !status.per_instrument.is_empty() {
        out.push_str("<table id=ims-budget><tr><th>Incubator</th><th>Sent, last hour</th><th>Mean rate</th><th>Of the 0.5 Mbit/s budget</th></tr>");
        for row in &status.per_instrument {
            let _ = write!(
                out,
                "<tr><td>{}</td><td>{} bytes</td><td>{:.1} bit/s</td><td>{:.4} %</td></tr>",
                escape(&row.serial),
                row.bytes_last_hour,
                row.bits_per_s,
                row.budget_used * 100.0
            );
        }
        out.push_str("</table>");
    }
    out
}

/// Adds a user, disables or enables one, or sets a password (the policy of every password),
/// as `esserver user` does; returns the message to show.
fn user_action(shared: &WebShared, admin: &str, fields: &[(String, String)]) -> String {
    use crate::control::UserRequest;
    let name = field(fields, "name").unwrap_or("").trim().to_string();
    let by = format!("web:{admin}");
    let new_hash = || -> Result<String, String> {
        let password = field(fields, "password").unwrap_or("");
        crate::accounts::check_password_policy(password)?;
        crate::accounts::hash_password(password)
    };
    let request = match field(fields, "action").unwrap_or("") {
        "add" => new_hash().map(|password_hash| UserRequest::Add {
            name: name.clone(),
            password_hash,
            rights: field(fields, "rights").unwrap_or("view").to_string(),
            by,
        }),
        "password" => new_hash().map(|password_hash| UserRequest::Passwd {
            name: name.clone(),
            password_hash,
            by,
        }),
        "disable" if name == admin => Err("you cannot disable your own account here".into()),
        "disable" => Ok(UserRequest::Disable {
            name: name.clone(),
            by,
        }),
        "enable" => Ok(UserRequest::Enable {
            name: name.clone(),
            by,
        }),
        other => Err(format!("unknown action {other:?}")),
    };
    let request = match request {
        Ok(request) => request,
        Err(message) => {
            return format!(
                "<p class=err id=result>{}: {}</p>",
                escape(&name),
                escape(&message)
            )
        }
    };
    let disabling = matches!(request, UserRequest::Disable { .. });
    let response = crate::admin::user(&shared.writer, &shared.store, request);
    if response.ok && disabling {
        {
            let web = &shared.site;
            web.viewers.disconnect_user(&name);
        }
    }
    if response.ok {
        tracing::info!(%admin, user = %name, "user changed from the web interface");
    }
    result_paragraph(&response, "")
}

/// The paragraph a form's answer shows for an admin command's response: its message, or why
/// it was refused (after `refused_prefix`).
fn result_paragraph(response: &crate::control::Response, refused_prefix: &str) -> String {
    if response.ok {
        format!(
            "<p class=ok id=result>{}</p>",
            escape(response.body["message"].as_str().unwrap_or("done"))
        )
    } else {
        format!(
            "<p class=err id=result>{refused_prefix}{}</p>",
            escape(response.message.as_deref().unwrap_or("refused"))
        )
    }
}

fn users_page(shared: &WebShared, admin: &str, csrf: &str, message: &str) -> Response {
    let mut body = String::from(message);
    let hidden = format!("<input type=hidden name=csrf value='{csrf}'>");
    match shared.store.read().and_then(|r| r.users()) {
        Ok(users) => {
            body.push_str("<table id=users><tr><th>User</th><th>Rights</th><th>State</th><th>Last login</th><th></th></tr>");
            for u in users {
                let now = now_ms();
                let locked_for: Vec<&str> = u
                    .locks
                    .iter()
                    .filter(|(_, until)| *until > now)
                    .map(|(address, _)| address.as_str())
                    .collect();
                let state = if u.disabled {
                    "disabled".to_string()
                } else if u.locked_until_ms > now {
                    "locked".to_string()
                } else if !locked_for.is_empty() {
                    format!("locked from {}", locked_for.join(", "))
                } else {
                    "active".to_string()
                };
                let state = escape(&state);
                let toggle = if u.disabled { "enable" } else { "disable" };
                let name = escape(&u.name);
                let _ = write!(
                    body,
                    "<tr><td>{name}</td><td>{}</td><td>{state}</td><td>{}</td><td>\
                     <form method=post action='/users' class=inline>{hidden}<input type=hidden name=name value='{name}'>\
                     <input type=hidden name=action value={toggle}><button>{toggle}</button></form> \
                     <form method=post action='/users' class=inline>{hidden}<input type=hidden name=name value='{name}'>\
                     <input type=hidden name=action value=password><input type=password name=password aria-label='new password' placeholder='new password'> \
                     <button>set password</button></form></td></tr>",
                    u.rights.as_str(),
                    if u.last_login_ms > 0 { escape(&time_text(u.last_login_ms)) } else { "never".into() },
                );
            }
            body.push_str("</table>");
        }
        Err(error) => body.push_str(&storage_unavailable(&error)),
    }
    let _ = write!(
        body,
        "<h2>Add a user</h2><form method=post action='/users' id=add-user>{hidden}<input type=hidden name=action value=add>\
         <label>Name <input name=name id=new-name></label> <label>Rights <select name=rights id=new-rights>\
         <option>view</option><option>edit</option><option>admin</option></select></label> \
         <label>Password <input type=password name=password id=new-password></label> <button id=add-button>Add</button></form>\
         <p>Passwords need at least 8 characters with an upper-case letter, a lower-case letter, a digit and a special character.</p>"
    );
    html(200, page(shared, "Users", Some((admin, csrf)), &body))
}

/// Every instrument ever seen, with a form to change the name it is shown by. The manual
/// warns that renaming an instrument there loses its data; here the name is a label and the
/// serial number the identity, so nothing moves.
/// Audit rows shown per page.
const AUDIT_PAGE_ROWS: u32 = 100;

/// The audit trail, oldest first, a page at a time (`?after=SEQ`), newest page by default.
fn audit_page(shared: &WebShared, user: &str, csrf: &str, after: Option<&str>) -> Response {
    let reader = match shared.store.read() {
        Ok(reader) => reader,
        Err(error) => {
            let body = storage_unavailable(&error);
            return html(503, page(shared, "Audit trail", Some((user, csrf)), &body));
        }
    };
    let after = match after.map(str::parse::<u64>) {
        Some(Ok(after)) => after,
        Some(Err(_)) => {
            let body = "<p class=err>after must be an audit sequence number</p>".to_string();
            return html(400, page(shared, "Audit trail", Some((user, csrf)), &body));
        }
        // The newest page by default.
        None => reader
            .last_audit_seq()
            .unwrap_or(0)
            .saturating_sub(u64::from(AUDIT_PAGE_ROWS)),
    };
    let rows = match reader.audit_after(after, AUDIT_PAGE_ROWS) {
        Ok(rows) => rows,
        Err(error) => {
            let body = storage_unavailable(&error);
            return html(503, page(shared, "Audit trail", Some((user, csrf)), &body));
        }
    };
    let mut body = String::from(
        "<table id=audit><tr><th>#</th><th>When</th><th>User</th><th>Computer</th><th>Action</th>\
         <th>On</th><th>Outcome</th><th>After</th></tr>",
    );
    if rows.is_empty() {
        body.push_str("<tr><td colspan=8 class=empty>Nothing recorded here.</td></tr>");
    }
    for row in &rows {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            row.seq,
            escape(&time_text(row.at_ms)),
            escape(&row.user),
            escape(&row.computer),
            escape(&row.action),
            escape(&row.target),
            escape(row.outcome.as_str()),
            escape(&row.after.chars().take(200).collect::<String>()),
        );
    }
    body.push_str("</table><p>");
    if after > 0 {
        let previous = after.saturating_sub(u64::from(AUDIT_PAGE_ROWS));
        let _ = write!(body, "<a href='/audit?after={previous}'>Older</a> ");
    }
    if let Some(last) = rows.last().filter(|_| rows.len() as u32 == AUDIT_PAGE_ROWS) {
        let _ = write!(body, "<a href='/audit?after={}'>Newer</a>", last.seq);
    }
    body.push_str("</p>");
    html(200, page(shared, "Audit trail", Some((user, csrf)), &body))
}

fn instruments_page(shared: &WebShared, user: &str, csrf: &str, message: &str) -> Response {
    let mut body = String::from(message);
    match shared.store.read().and_then(|r| r.instruments()) {
        Ok(instruments) => {
            body.push_str("<table id=instruments><tr><th>Serial</th><th>Model</th><th>Number</th><th>Shown as</th><th>Last seen</th><th>Rename</th></tr>");
            for i in instruments {
                let _ = write!(
                    body,
                    "<tr><td>{serial}</td><td>{}</td><td>\
                     <form method=post action='/instruments' class=inline>\
                     <input type=hidden name=csrf value='{csrf}'><input type=hidden name=serial value='{serial}'>\
                     <input type=hidden name=action value=number>\
                     <input name=number value='{number}' size=6 inputmode=numeric aria-label='instrument number'> \
                     <button>Set</button></form> <small>({})</small></td><td>{}</td><td>{}</td><td>\
                     <form method=post action='/instruments' class=inline>\
                     <input type=hidden name=csrf value='{csrf}'><input type=hidden name=serial value='{serial}'>\
                     <input name=name value='{}' aria-label='new name'> <button>Rename</button></form></td></tr>",
                    escape(&i.model),
                    match i.number_set_by {
                        "instrument" => "its own",
                        "administrator" => "set here",
                        _ => "counted",
                    },
                    escape(&i.display_name),
                    escape(&time_text(i.last_seen_ms)),
                    escape(&i.display_name),
                    serial = escape(&i.serial),
                    number = i.number,
                );
            }
            body.push_str("</table><p>The number is the instrument's own (the <code>I3253</code> of its embryo ids, <code>InstrumentNumber</code> for EMR systems): an instrument that sends it is numbered by it; one that does not gets the lowest number no other instrument has. A number set here stays until changed here; two instruments cannot be given one number.</p><p>Renaming changes only the name shown; the instrument's serial number, dishes, images and annotations stay as they are.</p>");
        }
        Err(error) => body.push_str(&storage_unavailable(&error)),
    }
    body.push_str(&enrolment_panel(shared, csrf));
    html(200, page(shared, "Instruments", Some((user, csrf)), &body))
}

/// New instruments: the enrolment mode, the serial numbers waiting for approval (each with an
/// Approve button) and a form to approve one before it first connects.
fn enrolment_panel(shared: &WebShared, csrf: &str) -> String {
    let web = &shared.site;
    let hidden = format!(
        "<input type=hidden name=csrf value='{csrf}'><input type=hidden name=action value=approve>"
    );
    let mut out = String::from("<h2>Enrolment of new instruments</h2>");
    out.push_str(match web.enrolment {
        es_storage::Enrolment::Open => {
            "<p id=enrolment>Open: a new serial number is enrolled at its first connection \
             (<code>[IncubatorTransport] enrolment = approve</code> makes each wait for an \
             administrator's approval).</p>"
        }
        es_storage::Enrolment::Approve => {
            "<p id=enrolment>Approval: a new serial number is refused \
             (<code>enrolment_pending</code>) and waits here until approved; its next \
             connection is then enrolled and issued a secret.</p>"
        }
    });
    let pending = web.registry.pending();
    out.push_str("<table id=pending><tr><th>Serial</th><th>Model</th><th>Attempts</th><th>From</th><th>Latest</th><th></th></tr>");
    if pending.is_empty() {
        out.push_str(
            "<tr><td colspan=6 class=empty>No instrument is waiting for approval.</td></tr>",
        );
    }
    for p in &pending {
        let serial = escape(&p.serial);
        let _ = write!(
            out,
            "<tr><td>{serial}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>\
             <form method=post action='/instruments' class=inline>{hidden}\
             <input type=hidden name=serial value='{serial}'><button id='approve-{serial}'>Approve</button></form></td></tr>",
            escape(&p.model),
            p.count,
            escape(&p.peer),
            escape(&time_text(p.at_ms)),
        );
    }
    let _ = write!(
        out,
        "</table><form method=post action='/instruments' id=approve-form>{hidden}\
         <label>Approve a serial number before it connects <input name=serial id=approve-serial></label> \
         <button id=approve-button>Approve</button></form>"
    );
    out
}

/// Capacity units used of the licence's, the ingestion rate of the connected instruments
/// (images since each connected, over its connected time) and, from it, days until the disk
/// is full.
fn capacity_and_rate(shared: &WebShared, web: &WebContext, now: i64) -> (String, String) {
    use es_perf::catalog::DeviceModel;
    let connected = web.registry.snapshot();
    let mut devices: Vec<(DeviceModel, u32)> = Vec::new();
    let (mut images_per_s, mut bytes_per_s) = (0.0f64, 0.0f64);
    for c in &connected {
        let model = c.model.parse().unwrap_or(DeviceModel::EmbryoScope8);
        match devices.iter_mut().find(|(m, _)| *m == model) {
            Some((_, n)) => *n += 1,
            None => devices.push((model, 1)),
        }
        let seconds = ((now - c.connected_at_ms).max(1000) as f64) / 1000.0;
        images_per_s += c.images as f64 / seconds;
        bytes_per_s += c.image_bytes as f64 / seconds;
    }
    let mut out = String::new();
    if let Some(warning) = web.registry.over_limit(&shared.licensing) {
        let _ = write!(
            out,
            "<div class='banner bad' id=over-limit>Over the licence: {}</div>",
            escape(&warning)
        );
    }
    if let Ok(license) = shared.licensing.current(now) {
        let used = es_perf::config_rules::usage(license.configuration, &devices, 0);
        let _ = write!(
            out,
            "<p id=capacity>Capacity units: {} of {} used ({} EmbryoScope+/Flex of {})</p>",
            used.units_used, used.units_max, used.plus_flex_used, used.plus_flex_max
        );
    }
    let rate = format!(
        "<p id=rate>Ingestion now: {images_per_s:.1} images/s ({:.2} MiB/s) from the \
         connected incubators.</p>",
        bytes_per_s / MIB
    );
    (out, rate)
}

/// The backups: the last success (when, how big, where), a failure, the next scheduled one.
fn backup_card(web: &WebContext, now: i64) -> String {
    let status = web.backups.status(now);
    let mut out = String::from("<h2>Backups</h2>");
    if let Some(warning) = &status.warning {
        let _ = write!(
            out,
            "<p class=err id=backup-warning>{}</p>",
            escape(warning)
        );
    }
    out.push_str("<table id=backups>");
    let row = |out: &mut String, name: &str, value: String| {
        let _ = write!(out, "<tr><td>{name}</td><td>{}</td></tr>", escape(&value));
    };
    match &status.last_success {
        Some(last) => {
            row(
                &mut out,
                "Last successful",
                format!(
                    "{} ({} h ago), {} in {}, {} images",
                    time_text(last.at_ms),
                    status.last_success_age_s.unwrap_or(0) / 3600,
                    crate::backup::bytes_text(last.bytes),
                    last.target,
                    last.images
                ),
            );
        }
        None => row(&mut out, "Last successful", "none".into()),
    }
    if let Some(failed) = &status.last_failure {
        row(
            &mut out,
            "Last failed",
            format!("{}: {}", time_text(failed.at_ms), failed.reason),
        );
    }
    let schedule = match (&status.scheduled_target, status.next_at_ms) {
        (Some(target), Some(next)) => {
            format!("daily into {target}, next {}", time_text(next))
        }
        (Some(target), None) => format!("daily into {target}"),
        (None, _) => {
            "none ([Backup] target is not set); `esserver backup --to DIR` takes one".into()
        }
    };
    row(&mut out, "Scheduled", schedule);
    if status.running {
        row(&mut out, "Now", "a backup is running".into());
    }
    out.push_str("</table>");
    out
}

/// The background activity computation: how far behind it is and what it costs.
fn activity_card(web: &WebContext) -> String {
    let Some(activity) = &web.activity else {
        return String::new();
    };
    let status = activity.status();
    let mut out = String::from("<h2>Activity curves</h2><table id=activity>");
    let rows = [
        (
            "Curves",
            format!(
                "{} embryo(s); {} change(s) still to look at",
                status.curves, status.changes_behind
            ),
        ),
        (
            "Analysed",
            format!(
                "{} image(s), {} skipped, in {:.1} s of CPU ({:.0} images per CPU second, at {} priority)",
                status.images_analysed,
                status.frames_skipped,
                status.cpu_ms as f64 / 1000.0,
                status.images_per_cpu_s,
                status.priority
            ),
        ),
    ];
    for (name, value) in rows {
        let _ = write!(out, "<tr><td>{name}</td><td>{}</td></tr>", escape(&value));
    }
    out.push_str("</table>");
    if let Some(error) = &status.last_error {
        let _ = write!(
            out,
            "<p class=err id=activity-warning>Last problem: {}</p>",
            escape(error)
        );
    }
    out
}

/// The browser viewer's devices: every one registered, how many the licence allows, and a
/// revoke button (effective at the device's next request).
fn devices_page(shared: &WebShared, admin: &str, csrf: &str, message: &str) -> Response {
    let devices = match shared.store.read().and_then(|r| r.devices()) {
        Ok(devices) => devices,
        Err(error) => {
            return html(
                503,
                page(
                    shared,
                    "Devices",
                    Some((admin, csrf)),
                    &storage_unavailable(&error),
                ),
            )
        }
    };
    let active = devices
        .iter()
        .filter(|d| d.row.revoked_at_ms.is_none())
        .count();
    let allowed = match shared.licensing.current(now_ms()) {
        Ok(license) if license.demo => "no limit (DEMO licence)".to_string(),
        Ok(license) => format!("{} allowed by the licence", license.mobile_devices),
        Err(error) => format!("none: the licence is invalid ({error})"),
    };
    let mut body = format!(
        "{message}<p id=device-count>{active} browser device(s) registered; {}.</p>\
         <table id=devices><tr><th>Name</th><th>Registered</th><th>Last login</th><th>State</th><th></th></tr>",
        escape(&allowed)
    );
    for device in &devices {
        let row = &device.row;
        let (state, action) = match row.revoked_at_ms {
            Some(at) => (
                format!("revoked by {} at {}", escape(&row.revoked_by), time_text(at)),
                String::new(),
            ),
            None => (
                "active".to_string(),
                format!(
                    "<form class=inline method=post action='/devices'><input type=hidden name=csrf value='{csrf}'>\
                     <input type=hidden name=device value='{}'><button>Revoke</button></form>",
                    escape(&device.device_id)
                ),
            ),
        };
        let _ = write!(
            body,
            "<tr class=device><td>{}</td><td>{} at {}</td><td>{} at {}</td><td>{state}</td><td>{action}</td></tr>",
            escape(&row.name),
            escape(&row.registered_by),
            time_text(row.registered_at_ms),
            escape(&row.last_login_by),
            time_text(row.last_login_at_ms),
        );
    }
    body.push_str("</table>");
    html(200, page(shared, "Devices", Some((admin, csrf)), &body))
}

fn devices_post(call: &mut Call<'_>) -> Step {
    let (shared, admin) = (call.shared, call.user());
    let device = call.field("device").unwrap_or("").to_string();
    let op = es_storage::devices::DeviceRevoke {
        actor: es_storage::Actor {
            user: admin.to_string(),
            computer: format!("web {}", call.peer.ip()),
        },
        device_id: device.clone(),
        at_ms: now_ms(),
    };
    let message = match shared.writer.write(op) {
        Ok(()) => {
            tracing::info!(%admin, %device, "browser device revoked");
            "<p class=ok id=message>Revoked: the device is refused from its next request.</p>"
                .to_string()
        }
        Err(error) => format!(
            "<p class=err id=message>Not revoked: {}</p>",
            escape(&error.to_string())
        ),
    };
    Step::Respond(devices_page(shared, admin, &call.csrf, &message))
}

/// The archive tier: what is in the object store, what is due, the last failure, reads.
fn archive_card(web: &WebContext) -> String {
    let Some(archive) = &web.archive else {
        return String::new();
    };
    let status = archive.status();
    let mut out = String::from("<h2>Archive</h2>");
    if let Some(error) = &status.last_error {
        let _ = write!(
            out,
            "<p class=err id=archive-warning>The last archive pass failed{}: {}</p>",
            status
                .last_error_at_ms
                .map(|at| format!(" at {}", time_text(at)))
                .unwrap_or_default(),
            escape(error)
        );
    }
    out.push_str("<table id=archive>");
    let row = |out: &mut String, name: &str, value: String| {
        let _ = write!(out, "<tr><td>{name}</td><td>{}</td></tr>", escape(&value));
    };
    row(
        &mut out,
        "Object store",
        format!(
            "{} at {}, volumes sealed more than {} day(s) ago",
            status.target, status.endpoint, status.after_days
        ),
    );
    row(
        &mut out,
        "Archived",
        format!(
            "{} volume(s), {}",
            status.volumes_archived,
            crate::backup::bytes_text(status.bytes_archived)
        ),
    );
    row(
        &mut out,
        "Due",
        format!(
            "{} volume(s), {}",
            status.volumes_due,
            crate::backup::bytes_text(status.bytes_due)
        ),
    );
    row(
        &mut out,
        "Reads from the object store",
        format!(
            "{} ({} failed), {} from the local cache ({} of {})",
            status.remote_reads,
            status.remote_read_failures,
            status.cache_hits,
            crate::backup::bytes_text(status.cache.bytes),
            crate::backup::bytes_text(status.cache.bytes_max)
        ),
    );
    out.push_str("</table>");
    out
}

/// One line an administrator reads first: licence, incubators, disk, warnings.
fn glance(shared: &WebShared, web: &WebContext, now: i64) -> String {
    let licence = match shared.licensing.current(now) {
        Ok(license) => match license.expires_at_ms {
            Some(expires) => format!(
                "{} licence, {} days left",
                license.configuration.name(),
                (expires - now).max(0) / 86_400_000
            ),
            None => format!("{} licence", license.configuration.name()),
        },
        Err(_) => "licence invalid".to_string(),
    };
    let licence_bad = shared.licensing.current(now).is_err()
        || web.registry.over_limit(&shared.licensing).is_some();
    let connected = web.registry.snapshot().len();
    let known = shared
        .store
        .read()
        .and_then(|r| r.instruments())
        .map_or(connected, |i| i.len().max(connected));
    let disconnected = known - connected;
    let free = shared.disk.free_bytes();
    let disk = match crate::os::disk_total_bytes(&web.data_dir) {
        Ok(total) if total > 0 => format!(
            "disk {:.0} % used",
            100.0 * (1.0 - free.min(total) as f64 / total as f64)
        ),
        _ => format!("{:.1} GiB free", free as f64 / GIB),
    };
    let warnings = crate::warnings::LOG.total();
    let item = |bad: bool, text: String| {
        format!(
            "<span class='card{}'>{}</span>",
            if bad { " bad" } else { "" },
            escape(&text)
        )
    };
    format!(
        "<p id=glance>{}{}{}{}{}</p>",
        item(licence_bad, licence),
        item(
            disconnected > 0,
            format!("{connected} incubator(s) connected, {disconnected} disconnected")
        ),
        item(shared.disk.is_low(), disk),
        item(
            warnings > 0,
            format!("{warnings} warning(s) since the start")
        ),
        backup_glance(web, now),
    )
}

/// The glance line's backup item: the last backup's age, red when it needs attention.
fn backup_glance(web: &WebContext, now: i64) -> String {
    let status = web.backups.status(now);
    let text = match status.last_success_age_s {
        Some(age) => format!("last backup {} h ago", age / 3600),
        None => "no backup".to_string(),
    };
    format!(
        "<span class='card{}' id=backup-glance>{}</span>",
        if status.warning.is_some() { " bad" } else { "" },
        escape(&text)
    )
}

fn license_page(shared: &WebShared, user: &str, csrf: &str, message: &str) -> Response {
    let current = match shared.licensing.current(now_ms()) {
        Ok(license) => format!(
            "<table id=license><tr><td>Licence</td><td>{}</td></tr><tr><td>Clinic</td><td>{}</td></tr>\
             <tr><td>Configuration</td><td>{}</td></tr><tr><td>Viewer computers</td><td>{}</td></tr>\
             <tr><td>Issued</td><td>{}</td></tr><tr><td>Validity</td><td>{}</td></tr></table>",
            escape(&license.license_id),
            escape(&license.clinic),
            escape(license.configuration.name()),
            escape(&if license.viewer_computers.is_empty() {
                "any (DEMO)".to_string()
            } else {
                license.viewer_computers.join(", ")
            }),
            escape(&time_text(license.issued_at_ms)),
            escape(&validity_text(license.expires_at_ms, now_ms()))
        ),
        Err(error) => format!(
            "<p class=err id=license-state>licence invalid: {}</p>",
            escape(&error.to_string())
        ),
    };
    let server_id = format!(
        "<p>This server's id (a licence names it): <code id=server-id>{}</code></p>",
        escape(&shared.store.server_id())
    );
    let body = format!(
        "{message}{server_id}{current}<h2>Install a licence</h2>\
         <form method=post action='/license' id=install>\
         <input type=hidden name=csrf value='{csrf}'>\
         <p><input type=file id=file accept='.lic,.json,application/json'></p>\
         <p><textarea name=license id=license-text placeholder='or paste the licence file here'></textarea></p>\
         <p><button id=install-button>Install</button></p></form>\
         <script src='{LICENSE_SCRIPT_PATH}'></script>"
    );
    html(200, page(shared, "Licence", Some((user, csrf)), &body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_page_is_listed_once_and_answers_something() {
        for (index, page) in PAGES.iter().enumerate() {
            assert!(page.path.starts_with('/'), "{}", page.path);
            assert!(
                page.get.is_some() || page.get_step.is_some() || page.post.is_some(),
                "{} answers nothing",
                page.path
            );
            assert!(
                page.get.is_none() || page.get_step.is_none(),
                "{} has two GET handlers",
                page.path
            );
            assert!(
                PAGES[..index].iter().all(|other| other.path != page.path),
                "{} is listed twice",
                page.path
            );
        }
    }

    fn post(headers: &[(&str, &str)]) -> Request {
        let mut text = String::from("POST /login HTTP/1.1\r\ncontent-length: 0\r\n");
        for (name, value) in headers {
            text.push_str(&format!("{name}: {value}\r\n"));
        }
        text.push_str("\r\n");
        let mut parser = es_net::http::RequestParser::new(es_net::http::HttpLimits::default());
        let mut input = bytes::BytesMut::from(text.as_bytes());
        match parser.parse(&mut input) {
            Ok(es_net::http::Parsed::Request(request)) => *request,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn forms_from_another_site_are_told_apart() {
        let host = ("host", "10.0.0.5:4010");
        let same = [
            host,
            ("origin", "https://10.0.0.5:4010"),
            ("sec-fetch-site", "same-origin"),
        ];
        assert_eq!(cross_site(&post(&same), true), None);
        // Chrome sends Origin: null under some referrer policies; Sec-Fetch-Site decides.
        let null_origin = [host, ("origin", "null"), ("sec-fetch-site", "same-origin")];
        assert_eq!(cross_site(&post(&null_origin), true), None);
        assert_eq!(cross_site(&post(&[host]), true), None, "no browser headers");
        for evil in [
            vec![host, ("origin", "https://evil.example")],
            vec![host, ("origin", "null")],
            vec![host, ("origin", "http://10.0.0.5:4010")],
            vec![host, ("sec-fetch-site", "cross-site")],
            vec![
                host,
                ("sec-fetch-site", "same-site"),
                ("origin", "https://10.0.0.5:4010"),
            ],
            vec![
                host,
                ("sec-fetch-site", "cross-site"),
                ("origin", "https://10.0.0.5:4010"),
            ],
        ] {
            assert!(cross_site(&post(&evil), true).is_some(), "{evil:?}");
        }
        let plain = [host, ("origin", "http://10.0.0.5:4010")];
        assert_eq!(cross_site(&post(&plain), false), None);
    }

    #[test]
    fn html_is_escaped_and_csrf_is_stable_per_session() {
        assert_eq!(
            escape("<a href=\"x\">'&'</a>"),
            "&lt;a href=&quot;x&quot;&gt;&#39;&amp;&#39;&lt;/a&gt;"
        );
        assert_eq!(csrf_of("s1"), csrf_of("s1"));
        assert_ne!(csrf_of("s1"), csrf_of("s2"));
        assert_eq!(csrf_of("s1").len(), 32);
    }
}
