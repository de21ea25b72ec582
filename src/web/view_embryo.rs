//! The browser viewer's embryo page: the time-lapse player, the annotations, and what its
//! script (`/view/player.js`) reads and sends.
//!
//! - `/view/embryo?id=` the page, rendered on the server (the annotations are readable without
//!   the script; the player needs it).
//! - `/view/embryo.json?id=` the embryo (as the public API renders it), its acquisitions with
//!   their focal planes, and the change-log position it was read at.
//! - `/view/annotate` (POST, JSON) adds or changes an annotation through the one edit path
//!   (`crate::edits`): the rights check and its audit, the version check, and the public API's
//!   answer, 412 with the current embryo when the version was stale.
//! - `/view/changes?after=&wait=` the change feed, long-polled: the page hears new
//!   acquisitions and other users' edits without a reload.
//! - `/view/frame?...&w=` a stored JPEG made smaller ([`Thumbnails`]), at one of a few widths,
//!   cached and bounded.

use super::view::{
    page_response, refused_page, session_of, storage_page, url_part, view_page, ViewSession,
};
use super::{csrf_of, escape, time_text, Call, WebShared};
use crate::api::{ApiMsg, Render, Response, Step, CHANGES_WAIT_MAX};
use crate::edits::{self, Editor, Grant};
use bytes::Bytes;
use es_storage::{Actor, AnnotationInput, AnnotationSource, ClinicalEdit, Rights};
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::json;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// Acquisitions one embryo page plays at most (a week at one every 10 minutes is about 1,000).
pub const PLAYER_ACQUISITIONS_MAX: u32 = 5000;
/// Longest change-feed wait of the page's long poll.
pub const VIEW_CHANGES_WAIT_MAX: Duration = Duration::from_secs(25);
/// Changes one long poll answers at most.
const VIEW_CHANGES_LIMIT_MAX: u32 = 500;
/// Bytes of an annotation request's body at most.
const ANNOTATE_BODY_BYTES_MAX: usize = 16 * 1024;
/// The widths a smaller frame may be asked at (pixels): few, so that a frame has few
/// smaller copies to make and keep.
pub const THUMBNAIL_WIDTHS: [usize; 4] = [80, 160, 320, 640];
/// Bytes of smaller frames the cache keeps at most.
pub const THUMBNAIL_CACHE_BYTES_MAX: usize = 32 * 1024 * 1024;
/// JPEG quality of a smaller frame.
const THUMBNAIL_QUALITY: u8 = 80;

/// The page's script, served as a file (the pages' policy allows no inline script).
pub(super) const PLAYER_SCRIPT: &str = include_str!("view_player.js");

fn json_refusal(status: u16, code: &str, message: impl Into<String>) -> Response {
    let mut response = Response::error(status, code, message);
    response
        .headers
        .push(("cache-control", "no-store".to_string()));
    response
}

/// The session of a request the page's script makes: refusals as JSON, not pages.
fn json_session(call: &mut Call<'_>) -> Result<ViewSession, Response> {
    match session_of(call.shared, call.request, true) {
        Ok(session) => {
            *call.caller = Some(format!("view:{}", session.user));
            Ok(session)
        }
        Err(page) if page.status == 303 => Err(json_refusal(
            401,
            "session_ended",
            "the session ended (logged out, expired, or opened on another device); log in again",
        )),
        Err(page) => Err(json_refusal(
            page.status,
            "refused",
            "refused: reload the page to see why",
        )),
    }
}

/// The embryo page: where it is, the player, the annotations and scores, and (with edit rights)
/// the annotation form.
pub(super) fn embryo_page(call: &mut Call<'_>) -> Response {
    let session = match session_of(call.shared, call.request, true) {
        Ok(session) => session,
        Err(response) => return response,
    };
    *call.caller = Some(format!("view:{}", session.user));
    let id = call.request.query_param("id").unwrap_or("").to_string();
    let embryo = match call.shared.store.read().and_then(|r| r.embryo(&id)) {
        Ok(Some(embryo)) => embryo,
        Ok(None) => return refused_page(404, "Not found", "No such embryo."),
        Err(error) => return storage_page(&error),
    };
    let csrf = csrf_of(&session.token);
    let can_edit = session.rights.allows(Rights::Edit);
    let mut rows = String::new();
    for a in &embryo.annotations {
        rows.push_str(&format!(
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            escape(&a.name),
            escape(&a.value),
            a.hours.map_or(String::new(), |h| format!("{h:.1} h")),
            escape(&a.set_by)
        ));
    }
    let scores: Vec<String> = embryo
        .scores
        .iter()
        .map(|s| format!("{} {}", escape(&s.model), escape(&s.value)))
        .collect();
    let form = if can_edit {
        "<form id=annotate class=annotate><input type=hidden id=annotation-id value=''>\
         <label>Annotation <input id=annotation-name list=annotation-names maxlength=64 \
         placeholder='t2' required></label> \
         <label>Value <input id=annotation-value maxlength=256></label> \
         <label><input type=checkbox id=annotation-at-frame checked> at this frame \
         (<span id=at-hours></span>)</label> \
         <button id=save>Save</button> <button type=button id=cancel-change hidden>New \
         annotation</button></form><datalist id=annotation-names><option value=tPNf>\
         <option value=t2><option value=t3><option value=t4><option value=t5><option value=t8>\
         <option value=tM><option value=tSB><option value=tB><option value=Comment></datalist>"
    } else {
        "<p class=empty>Your account has view rights: annotations are read only.</p>"
    };
    let body = format!(
        "<p id=where>{patient}, treatment {treatment}, <a href='/view/dish?key={dish_key}'>dish {dish}</a> \
         well {well}; inseminated {inseminated}; fate <span id=fate>{fate}</span></p>\
         <div id=player data-embryo='{embryo_attr}' data-csrf='{csrf}' data-edit='{edit}'>\
         <div class=stage><img id=frame class=frame alt='time-lapse frame' width=500 height=500></div>\
         <p id=when class=when>Loading the time-lapse...</p>\
         <div class=controls><button id=back type=button title='Step back'>&lt;</button> \
         <button id=play type=button>Play</button> \
         <button id=next type=button title='Step forward'>&gt;</button> \
         <input type=range id=scrub min=0 max=0 value=0 aria-label='Frame'> \
         <label>Speed <select id=speed><option value=5>5/s</option><option value=10>10/s</option>\
         <option value=15 selected>15/s</option><option value=25>25/s</option></select></label> \
         <label>Plane <select id=plane></select></label></div>\
         <p id=status class=empty></p></div>\
         <h2>Annotations</h2><table id=annotations><thead><tr><th>Name</th><th>Value</th>\
         <th>Time</th><th>By</th></tr></thead><tbody>{rows}</tbody></table>\
         <p id=scores>Scores: {scores}</p>{form}<p id=message class=message></p>\
         <p id=live class=empty></p><script src='/view/player.js'></script>",
        patient = escape(&embryo.patient_id),
        treatment = escape(&embryo.treatment_name),
        dish_key = embryo.dish_key,
        dish = escape(&embryo.dish_id),
        well = embryo.well,
        inseminated = time_text(embryo.insemination_at_ms),
        fate = embryo.fate.as_str(),
        embryo_attr = escape(&embryo.embryo_id),
        edit = if can_edit { 1 } else { 0 },
        scores = if scores.is_empty() {
            "none".to_string()
        } else {
            scores.join(", ")
        },
    );
    let title = format!("Embryo {} ({})", embryo.label, embryo.embryo_id);
    page_response(200, view_page(&title, Some((&session.user, &csrf)), &body))
}

/// The embryo, its acquisitions and the change-log position they were read at (the page's long
/// poll starts there, so nothing committed after this read is missed).
pub(super) fn embryo_json(call: &mut Call<'_>) -> Response {
    if let Err(response) = json_session(call) {
        return response;
    }
    let id = call.request.query_param("id").unwrap_or("");
    let reader = match call.shared.store.read() {
        Ok(reader) => reader,
        Err(error) => return Response::storage(&error),
    };
    // The position first: a change committed between it and the reads below is heard again,
    // which costs one more read; the other order could miss one.
    let last_seq = match reader.last_change_seq() {
        Ok(seq) => seq,
        Err(error) => return Response::storage(&error),
    };
    let embryo = match reader.embryo(id) {
        Ok(Some(embryo)) => embryo,
        Ok(None) => return json_refusal(404, "not_found", format!("embryo {id} is unknown")),
        Err(error) => return Response::storage(&error),
    };
    // The first ones (a 35-day culture at one acquisition every 10 minutes fits): beyond,
    // the page says the time-lapse is cut.
    let acquisitions = match reader.acquisitions(id, None, PLAYER_ACQUISITIONS_MAX) {
        Ok(found) => found.unwrap_or_default(),
        Err(error) => return Response::storage(&error),
    };
    let truncated = acquisitions.len() == PLAYER_ACQUISITIONS_MAX as usize;
    let frames: Vec<serde_json::Value> = acquisitions
        .iter()
        .map(|a| json!({ "at": a.acquired_at_ms, "planes": a.focal_planes }))
        .collect();
    let body = json!({
        "embryo": crate::api::routes::embryo_json(&embryo),
        "version": embryo.version,
        "insemination_at_ms": embryo.insemination_at_ms,
        "acquisitions": frames,
        "truncated": truncated,
        "last_seq": last_seq,
    });
    let mut response = Response::json(200, &body);
    response
        .headers
        .push(("cache-control", "no-store".to_string()));
    response
}

/// An annotation as the page's script sends it.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AnnotateBody {
    embryo_id: String,
    /// The embryo's version the user saw.
    version: u64,
    /// Present: change this annotation; absent: add one.
    #[serde(default)]
    annotation_id: Option<u64>,
    name: String,
    #[serde(default)]
    value: String,
    /// The frame the user was on, for a timing annotation.
    #[serde(default)]
    event_at_ms: Option<i64>,
}

/// Adds or changes an annotation. The page sends its CSRF token in `x-csrf-token`; the answer
/// is the public API's: 200 with the embryo as it is now, 412 with the current embryo when
/// another user changed it since it was read.
pub(super) fn annotate_post(call: &mut Call<'_>) -> Step {
    let session = match json_session(call) {
        Ok(session) => session,
        Err(response) => return Step::Respond(response),
    };
    if call.request.header("x-csrf-token") != Some(csrf_of(&session.token).as_str()) {
        return Step::Respond(json_refusal(
            403,
            "csrf",
            "this request was not sent by this site's page; reload the page",
        ));
    }
    if call.request.body.len() > ANNOTATE_BODY_BYTES_MAX {
        return Step::Respond(json_refusal(
            413,
            "too_large",
            format!("an annotation request is at most {ANNOTATE_BODY_BYTES_MAX} bytes"),
        ));
    }
    let body: AnnotateBody = match serde_json::from_slice(&call.request.body) {
        Ok(body) => body,
        Err(error) => {
            return Step::Respond(json_refusal(
                400,
                "invalid_json",
                format!("the request is not an annotation: {error}"),
            ))
        }
    };
    let name = body.name.trim().to_string();
    if name.is_empty() {
        return Step::Respond(json_refusal(
            422,
            "invalid_input",
            "an annotation needs a name",
        ));
    }
    let annotation = AnnotationInput {
        name,
        value: body.value,
        event_at_ms: body.event_at_ms,
        source: AnnotationSource::Manual,
    };
    let embryo_id = body.embryo_id;
    let edit = match body.annotation_id {
        None => ClinicalEdit::AddAnnotation {
            embryo_id: embryo_id.clone(),
            expected_version: body.version,
            annotation,
        },
        Some(annotation_id) => ClinicalEdit::ChangeAnnotation {
            embryo_id: embryo_id.clone(),
            expected_version: body.version,
            annotation_id,
            annotation,
        },
    };
    let editor = Editor {
        actor: Actor {
            user: session.user.clone(),
            computer: format!("browser {}", call.peer.ip()),
        },
        grant: Grant::User(session.rights),
    };
    let reply = call.handle.clone();
    let done = move |result| {
        reply.send(ApiMsg::Written {
            result,
            render: Render::Embryo { embryo_id },
        });
    };
    let shared = call.shared;
    match edits::submit(
        &shared.writer,
        &shared.disk,
        &editor,
        edit,
        None,
        crate::now_ms(),
        done,
    ) {
        Ok(()) => Step::Submitted,
        Err(edits::Refused::Forbidden(message)) => {
            Step::Respond(json_refusal(403, "forbidden", message))
        }
        Err(edits::Refused::Busy) => Step::Respond(Response::busy()),
        Err(refused @ edits::Refused::DiskLow) => {
            Step::Respond(json_refusal(503, "disk_full", refused.message()))
        }
        Err(refused @ edits::Refused::ShuttingDown) => {
            Step::Respond(json_refusal(503, "shutting_down", refused.message()))
        }
    }
}

/// The change feed after `after`, waiting up to `wait` seconds for a commit when there is
/// nothing yet (the public API's `/api/v1/changes`, on this port and this session).
pub(super) fn changes(call: &mut Call<'_>) -> Step {
    if let Err(response) = json_session(call) {
        return Step::Respond(response);
    }
    let request = call.request;
    let number = |name: &str| request.query_param(name).map(|v| v.parse::<u64>().ok());
    let (Some(Some(after)), wait, limit) = (number("after"), number("wait"), number("limit"))
    else {
        return Step::Respond(json_refusal(
            400,
            "invalid_parameter",
            "after (a change sequence number) is needed",
        ));
    };
    let (Some(wait), Some(limit)) = (wait.unwrap_or(Some(0)), limit.unwrap_or(Some(100))) else {
        return Step::Respond(json_refusal(
            400,
            "invalid_parameter",
            "wait and limit are whole numbers",
        ));
    };
    let wait = Duration::from_secs(wait).min(VIEW_CHANGES_WAIT_MAX.min(CHANGES_WAIT_MAX));
    let limit = (limit as u32).clamp(1, VIEW_CHANGES_LIMIT_MAX);
    // Wait only when the cursor is good and nothing follows it yet; otherwise answer now (a
    // cursor older than the log or ahead of it gets 410 `cursor_expired`, as on the public API).
    let nothing_yet = call
        .shared
        .store
        .read()
        .and_then(|reader| reader.changes_after(after, 1))
        .is_ok_and(|changes| changes.is_empty());
    if nothing_yet && !wait.is_zero() {
        return Step::Wait {
            after,
            limit,
            until: Instant::now() + wait,
        };
    }
    Step::Respond(crate::api::routes::changes_now(call.shared, after, limit))
}

/// Smaller frames, made on request and kept within [`THUMBNAIL_CACHE_BYTES_MAX`] (the oldest
/// made go first).
#[derive(Default)]
pub struct Thumbnails {
    cache: Mutex<ThumbnailCache>,
}

#[derive(Default)]
struct ThumbnailCache {
    frames: HashMap<String, Bytes>,
    order: VecDeque<String>,
    bytes: usize,
}

impl Thumbnails {
    fn get(&self, key: &str) -> Option<Bytes> {
        self.cache.lock().frames.get(key).cloned()
    }

    fn put(&self, key: String, jpeg: Bytes) {
        let cost = Self::cost(&key, &jpeg);
        if cost > THUMBNAIL_CACHE_BYTES_MAX / 16 {
            return;
        }
        let mut cache = self.cache.lock();
        if cache.frames.contains_key(&key) {
            return;
        }
        while cache.bytes + cost > THUMBNAIL_CACHE_BYTES_MAX {
            let Some(oldest) = cache.order.pop_front() else {
                break;
            };
            if let Some(gone) = cache.frames.remove(&oldest) {
                cache.bytes -= Self::cost(&oldest, &gone);
            }
        }
        cache.bytes += cost;
        cache.order.push_back(key.clone());
        cache.frames.insert(key, jpeg);
    }

    /// What an entry takes: the frame, its key twice (map and order) and the bookkeeping.
    fn cost(key: &str, jpeg: &Bytes) -> usize {
        jpeg.len() + 2 * key.len() + 128
    }

    /// Bytes held now (frames, keys and bookkeeping).
    pub fn bytes(&self) -> usize {
        self.cache.lock().bytes
    }
}

/// `jpeg` at most `width` pixels wide (grey, as the incubators' frames are), or None when it is
/// that small already. Err: the stored JPEG does not decode.
pub fn shrink(jpeg: &[u8], width: usize) -> Result<Option<Vec<u8>>, String> {
    // The header first: a frame as small already is not decoded.
    let mut header = zune_jpeg::JpegDecoder::new(zune_core::bytestream::ZCursor::new(jpeg));
    header.decode_headers().map_err(|error| error.to_string())?;
    match header.dimensions() {
        Some((w, _)) if w <= width => return Ok(None),
        _ => {}
    }
    let (w, h, pixels) = crate::activity::decode_grey(jpeg)?;
    if w <= width || w == 0 || h == 0 {
        return Ok(None);
    }
    let height = (h * width).div_ceil(w).max(1);
    let mut out = vec![0u8; width * height];
    // Area average: each output pixel is the mean of the source pixels it covers.
    for oy in 0..height {
        let (y0, y1) = (
            oy * h / height,
            ((oy + 1) * h / height).max(oy * h / height + 1),
        );
        for ox in 0..width {
            let (x0, x1) = (
                ox * w / width,
                ((ox + 1) * w / width).max(ox * w / width + 1),
            );
            let mut sum = 0u32;
            for y in y0..y1.min(h) {
                let row = &pixels[y * w..(y + 1) * w];
                sum += row[x0..x1.min(w)].iter().map(|&p| p as u32).sum::<u32>();
            }
            let count = ((y1.min(h) - y0) * (x1.min(w) - x0)) as u32;
            out[oy * width + ox] = (sum / count.max(1)) as u8;
        }
    }
    let mut encoded = Vec::new();
    let encoder = jpeg_encoder::Encoder::new(&mut encoded, THUMBNAIL_QUALITY);
    encoder
        .encode(
            &out,
            width as u16,
            height as u16,
            jpeg_encoder::ColorType::Luma,
        )
        .map_err(|error| error.to_string())?;
    Ok(Some(encoded))
}

/// A frame `w` pixels wide at most: from the cache, or made from the stored JPEG and kept.
pub(super) fn smaller_frame(
    shared: &WebShared,
    embryo: &str,
    at: i64,
    plane: i32,
    width: &str,
) -> Result<Bytes, Response> {
    let width = match width.parse::<usize>() {
        Ok(w) if THUMBNAIL_WIDTHS.contains(&w) => w,
        _ => {
            return Err(refused_page(
                400,
                "Frame",
                &format!("w is one of {THUMBNAIL_WIDTHS:?} pixels"),
            ))
        }
    };
    let reader = shared.store.read().map_err(|error| storage_page(&error))?;
    // The embryo as it is now: a cached copy of a frame of a removed embryo is not served.
    match reader.embryo(embryo) {
        Ok(Some(_)) => {}
        Ok(None) => return Err(refused_page(404, "Not found", "No such frame.")),
        Err(error) => return Err(storage_page(&error)),
    }
    let key = format!("{embryo}\n{at}\n{plane}\n{width}");
    let thumbnails = &shared.site.view.thumbnails;
    if let Some(jpeg) = thumbnails.get(&key) {
        return Ok(jpeg);
    }
    let stored = match reader.embryo_image(embryo, at, plane) {
        Ok(Some(jpeg)) => jpeg,
        Ok(None) => return Err(refused_page(404, "Not found", "No such frame.")),
        Err(error) => return Err(storage_page(&error)),
    };
    drop(reader);
    match shrink(&stored, width) {
        Ok(Some(small)) => {
            // Copied to its own exact size: the cache counts what it holds.
            let small = Bytes::copy_from_slice(&small);
            thumbnails.put(key, small.clone());
            Ok(small)
        }
        // As small already (read from the header alone, nothing decoded): sent as stored.
        Ok(None) => Ok(stored),
        Err(error) => {
            tracing::warn!(embryo, at, plane, %error, "a stored frame does not decode; sent as stored");
            Ok(stored)
        }
    }
}

/// A link to an embryo's page.
pub(super) fn embryo_link(embryo_id: &str, text: &str) -> String {
    format!(
        "<a class=open href='/view/embryo?id={}'>{}</a>",
        url_part(embryo_id),
        escape(text)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grey_jpeg(width: u16, height: u16) -> Vec<u8> {
        let pixels: Vec<u8> = (0..width as usize * height as usize)
            .map(|i| (i % 251) as u8)
            .collect();
        let mut out = Vec::new();
        jpeg_encoder::Encoder::new(&mut out, 90)
            .encode(&pixels, width, height, jpeg_encoder::ColorType::Luma)
            .unwrap();
        out
    }

    #[test]
    fn a_frame_is_shrunk_to_the_width_asked_keeping_its_shape() {
        let jpeg = grey_jpeg(400, 300);
        let small = shrink(&jpeg, 100).unwrap().expect("smaller");
        let (w, h, _) = crate::activity::decode_grey(&small).unwrap();
        assert_eq!((w, h), (100, 75));
        assert!(small.len() < jpeg.len());
        // Already as small: nothing to make.
        assert!(shrink(&jpeg, 400).unwrap().is_none());
        assert!(shrink(b"not a jpeg", 100).is_err());
    }

    #[test]
    fn the_thumbnail_cache_stays_within_its_bytes() {
        let cache = Thumbnails::default();
        let frame = Bytes::from(vec![0u8; THUMBNAIL_CACHE_BYTES_MAX / 20]);
        for i in 0..50 {
            cache.put(format!("k{i}"), frame.clone());
            assert!(cache.bytes() <= THUMBNAIL_CACHE_BYTES_MAX);
        }
        assert!(cache.get("k49").is_some());
        assert!(cache.get("k0").is_none());
        // Too large for the cache: not kept.
        cache.put(
            "huge".into(),
            Bytes::from(vec![0u8; THUMBNAIL_CACHE_BYTES_MAX / 8]),
        );
        assert!(cache.get("huge").is_none());
    }
}
