//! Browsers on the browser viewer (`/view/` on the web port, HTTPS), as its page's script
//! uses it: each browser logs in, names its device, then over and over opens an embryo
//! (`/view/embryo.json`, then its latest frame: the first frame on screen) and plays
//! [`PLAYBACK_FRAMES`] frames of its time-lapse at [`PLAYBACK_FPS`] with the page's prefetch
//! window ([`PREFETCH_AHEAD`] frames ahead of the one shown), one connection per browser;
//! after each playback it fetches that frame as the dish grid shows it (`w=320`, made smaller
//! on the server, then cached). Beside it, on a second connection, the page's long poll of
//! the change feed (`/view/changes`), woken by every commit of the clinic.
//!
//! A frame is shown at its slot (one every 1/fps after the first) or when it arrives, if
//! later: a stall. A playback's rate is its frames after the first over the time from its
//! first to its last frame shown, so it is `PLAYBACK_FPS` exactly when nothing stalled. With
//! the prefetch window, a stall after the window has filled needs one fetch slower than about
//! `PREFETCH_AHEAD` slots (2.7 s): the start of a playback is where it can show.

use crate::http_client::HttpClient;
use crate::spawn::ServerProcess;
use es_perf::latency::LatencyRecorder;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Frames played per embryo opened.
pub const PLAYBACK_FRAMES: usize = 60;
/// The playback speed the page is set to.
pub const PLAYBACK_FPS: f64 = 15.0;
/// Frames fetched ahead of the one shown at most (the page's `PREFETCH_AHEAD`).
pub const PREFETCH_AHEAD: usize = 40;
/// Pause between two playbacks of one browser (the user looks, picks another embryo).
const THINK: Duration = Duration::from_millis(500);
/// The long poll's wait (the page's is 25 s; shorter here so the run ends on time).
const POLL_WAIT_S: u32 = 5;
const TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct BrowserOptions {
    pub browsers: u32,
    pub duration: Duration,
    pub stop: Option<Arc<AtomicBool>>,
    /// The users' password (the users exist, with view rights or more).
    pub password: String,
}

#[derive(Debug, Default)]
pub struct BrowserResult {
    /// Opening an embryo until its first frame's bytes are in.
    pub first_frame: LatencyRecorder,
    /// One frame's request until its bytes are in.
    pub frame: LatencyRecorder,
    pub playbacks: u64,
    /// Playbacks in which some frame came after its slot.
    pub playbacks_stalled: u64,
    /// Each playback's rate (frames/s), for the lowest and the median.
    pub playback_fps: Vec<f64>,
    pub frames: u64,
    /// Answers of the browsers' long polls.
    pub polls: u64,
    pub elapsed: Duration,
    pub errors: Vec<String>,
}

impl BrowserResult {
    fn merge(&mut self, other: BrowserResult) {
        self.first_frame.merge(&other.first_frame);
        self.frame.merge(&other.frame);
        self.playbacks += other.playbacks;
        self.playbacks_stalled += other.playbacks_stalled;
        self.playback_fps.extend(other.playback_fps);
        self.frames += other.frames;
        self.polls += other.polls;
        self.elapsed = self.elapsed.max(other.elapsed);
        self.errors.extend(other.errors);
    }

    /// The lowest playback rate (0 without any playback).
    pub fn fps_min(&self) -> f64 {
        self.playback_fps
            .iter()
            .copied()
            .fold(f64::NAN, f64::min)
            .max(0.0)
    }

    pub fn fps_median(&self) -> f64 {
        let mut sorted = self.playback_fps.clone();
        sorted.sort_by(f64::total_cmp);
        sorted.get(sorted.len() / 2).copied().unwrap_or(0.0)
    }
}

/// Runs `options.browsers` browsers until `duration` ends or `stop` is set.
pub fn run(
    server: &ServerProcess,
    options: &BrowserOptions,
    embryos: &[String],
    users: &[String],
) -> BrowserResult {
    let mut result = BrowserResult::default();
    if embryos.is_empty() || users.is_empty() {
        result
            .errors
            .push("browsers need seeded embryos and users".into());
        return result;
    }
    let deadline = Instant::now() + options.duration;
    std::thread::scope(|scope| {
        let threads: Vec<_> = (0..options.browsers as usize)
            .map(|n| {
                let user = &users[n % users.len()];
                scope.spawn(move || browse(server, options, n, user, embryos, deadline))
            })
            .collect();
        for thread in threads {
            result.merge(thread.join().expect("browser thread"));
        }
    });
    result
}

/// A browser on the web port: one connection and its cookie jar (name -> value), sending what
/// a page's forms and scripts send (`sec-fetch-site: same-origin`). The tests drive the browser
/// viewer with it too.
pub struct Session {
    http: HttpClient,
    pub cookies: Vec<(String, String)>,
}

impl Session {
    pub fn new(server: &ServerProcess, timeout: Duration) -> Session {
        Session {
            http: HttpClient::new(
                server.info.address("web"),
                server.info.client_tls("web"),
                timeout,
            ),
            cookies: Vec::new(),
        }
    }

    /// A GET, or a POST of a form.
    pub fn send(
        &mut self,
        method: &str,
        path: &str,
        form: Option<&str>,
    ) -> Result<crate::http_client::HttpResponse, String> {
        let content_type = form.map(|_| "application/x-www-form-urlencoded");
        self.request(method, path, form.map(str::as_bytes), content_type, &[])
    }

    /// Any request: the jar's cookies go with it, and the answer's `set-cookie`s update the
    /// jar (an empty value or `Max-Age=0` removes the cookie).
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        content_type: Option<&str>,
        extra: &[(&str, &str)],
    ) -> Result<crate::http_client::HttpResponse, String> {
        let cookie = self
            .cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ");
        let mut headers = vec![("sec-fetch-site", "same-origin")];
        if !cookie.is_empty() {
            headers.push(("cookie", cookie.as_str()));
        }
        if let Some(content_type) = content_type {
            headers.push(("content-type", content_type));
        }
        headers.extend_from_slice(extra);
        let response = self
            .http
            .request(method, path, &headers, body)
            .map_err(|e| format!("{method} {path}: {e}"))?;
        for (name, value) in &response.headers {
            if !name.eq_ignore_ascii_case("set-cookie") {
                continue;
            }
            let Some((key, value)) = value.split(';').next().and_then(|p| p.split_once('=')) else {
                continue;
            };
            self.cookies.retain(|(k, _)| k != key);
            if !value.is_empty() && !value.contains("Max-Age=0") {
                self.cookies.push((key.to_string(), value.to_string()));
            }
        }
        Ok(response)
    }

    /// The value of a cookie in the jar.
    pub fn cookie(&self, name: &str) -> Option<String> {
        self.cookies
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    }

    /// Logs in on `/view/login` and names this browser as a device.
    pub fn log_in(&mut self, user: &str, password: &str, device: &str) -> Result<(), String> {
        let form = format!("username={user}&password={}", form_part(password));
        let login = self.send("POST", "/view/login", Some(&form))?;
        if login.status != 303 {
            return Err(format!("browser login of {user}: status {}", login.status));
        }
        let page = self.send("GET", "/view/device", None)?;
        let body = String::from_utf8_lossy(&page.body).into_owned();
        let csrf = body
            .split("name=csrf value='")
            .nth(1)
            .and_then(|rest| rest.split('\'').next())
            .ok_or_else(|| format!("no device form for {user}: status {}", page.status))?
            .to_string();
        let named = self.send(
            "POST",
            "/view/device",
            Some(&format!("csrf={csrf}&name={}", form_part(device))),
        )?;
        if named.status != 303 {
            let text = String::from_utf8_lossy(&named.body);
            return Err(format!("device {device} refused: {}", text.trim()));
        }
        Ok(())
    }
}

fn form_part(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn browse(
    server: &ServerProcess,
    options: &BrowserOptions,
    n: usize,
    user: &str,
    embryos: &[String],
    deadline: Instant,
) -> BrowserResult {
    let mut result = BrowserResult::default();
    let started = Instant::now();
    let mut session = Session::new(server, TIMEOUT);
    if let Err(error) = session.log_in(user, &options.password, &format!("load browser {n}")) {
        result.errors.push(error);
        return result;
    }
    let stopped = || {
        Instant::now() >= deadline
            || options
                .stop
                .as_ref()
                .is_some_and(|s| s.load(Ordering::Relaxed))
    };
    // The page's long poll, on its own connection with the same cookies, from the position
    // of the first embryo read.
    let first = match session.send(
        "GET",
        &format!("/view/embryo.json?id={}", embryos[n % embryos.len()]),
        None,
    ) {
        Ok(read) if read.status == 200 => serde_json::from_slice::<serde_json::Value>(&read.body)
            .ok()
            .and_then(|v| v["last_seq"].as_u64()),
        Ok(read) => {
            result
                .errors
                .push(format!("embryo.json: status {}", read.status));
            None
        }
        Err(error) => {
            result.errors.push(error);
            None
        }
    };
    let Some(mut after) = first else {
        return result;
    };
    let mut poller = Session::new(server, TIMEOUT);
    poller.cookies = session.cookies.clone();
    let (polls, poll_error) = std::thread::scope(|scope| {
        let polling = scope.spawn(|| {
            let mut polls = 0u64;
            while !stopped() {
                let path = format!("/view/changes?after={after}&wait={POLL_WAIT_S}&limit=200");
                let answer = match poller.send("GET", &path, None) {
                    Ok(answer) if answer.status == 200 => answer,
                    Ok(answer) => {
                        return (polls, Some(format!("{path}: status {}", answer.status)))
                    }
                    Err(error) => return (polls, Some(error)),
                };
                polls += 1;
                match serde_json::from_slice::<serde_json::Value>(&answer.body)
                    .ok()
                    .and_then(|v| v["next_after"].as_u64())
                {
                    Some(next) => after = next,
                    None => return (polls, Some(format!("{path}: no next_after"))),
                }
            }
            (polls, None)
        });
        let mut next = n;
        while !stopped() {
            let embryo = &embryos[next % embryos.len()];
            next += options.browsers.max(1) as usize;
            if let Err(error) = play(&mut session, embryo, &mut result) {
                result.errors.push(error);
                break;
            }
            std::thread::sleep(THINK);
        }
        polling.join().expect("poll thread")
    });
    result.polls = polls;
    result.errors.extend(poll_error);
    result.elapsed = started.elapsed();
    result
}

/// Opens `embryo` as the page does and plays its last [`PLAYBACK_FRAMES`] frames.
fn play(session: &mut Session, embryo: &str, result: &mut BrowserResult) -> Result<(), String> {
    let opened = Instant::now();
    let read = session.send("GET", &format!("/view/embryo.json?id={embryo}"), None)?;
    if read.status != 200 {
        return Err(format!("embryo.json of {embryo}: status {}", read.status));
    }
    let json: serde_json::Value =
        serde_json::from_slice(&read.body).map_err(|e| format!("embryo.json: {e}"))?;
    let frames: Vec<i64> = json["acquisitions"]
        .as_array()
        .map(|a| a.iter().filter_map(|f| f["at"].as_i64()).collect())
        .unwrap_or_default();
    if frames.is_empty() {
        return Err(format!("embryo {embryo} has no frames"));
    }
    let frame_path = |at: i64| format!("/view/frame?embryo={embryo}&at={at}&plane=0");
    // The first frame on screen: the latest.
    let latest = *frames.last().expect("not empty");
    fetch(session, &frame_path(latest), result)?;
    result.first_frame.record(opened.elapsed());
    // Then a playback of the frames before it, as the page's prefetch window fetches them.
    let from = frames.len().saturating_sub(PLAYBACK_FRAMES);
    let played = &frames[from..];
    let slot = Duration::from_secs_f64(1.0 / PLAYBACK_FPS);
    let mut shown: Vec<Instant> = Vec::with_capacity(played.len());
    let mut stalled = false;
    for (i, &at) in played.iter().enumerate() {
        if i > PREFETCH_AHEAD {
            // The page fetches no further ahead than the window: wait for frame
            // i - PREFETCH_AHEAD to be shown.
            let until = shown[i - PREFETCH_AHEAD];
            if let Some(wait) = until.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        fetch(session, &frame_path(at), result)?;
        let arrived = Instant::now();
        let at_slot = shown.last().map_or(arrived, |previous| *previous + slot);
        if arrived > at_slot && i > 0 {
            stalled = true;
        }
        shown.push(arrived.max(at_slot));
    }
    if let (Some(first), Some(last)) = (shown.first(), shown.last()) {
        let seconds = last.duration_since(*first).as_secs_f64();
        if shown.len() > 1 && seconds > 0.0 {
            // To a thousandth: the slots are sums of 1/fps, a hair off in floating point.
            let fps = (shown.len() - 1) as f64 / seconds;
            result.playback_fps.push((fps * 1000.0).round() / 1000.0);
        }
    }
    result.playbacks += 1;
    result.playbacks_stalled += u64::from(stalled);
    // Back to the dish: the frame as the grid shows it, made smaller on the server.
    let thumbnail = format!("{}&w=320", frame_path(latest));
    fetch(session, &thumbnail, result)
}

fn fetch(session: &mut Session, path: &str, result: &mut BrowserResult) -> Result<(), String> {
    let asked = Instant::now();
    let response = session.send("GET", path, None)?;
    if response.status != 200 || response.body.get(..2) != Some(&[0xff, 0xd8]) {
        return Err(format!("{path}: status {}, not a JPEG", response.status));
    }
    result.frame.record(asked.elapsed());
    result.frames += 1;
    Ok(())
}
