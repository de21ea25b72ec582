//! The original Public API, answer for answer, for the EMR bridges and data-warehouse
//! extractions written against it: `GET /LOGIN` and `GET /GET/<name>?...` with the original's
//! parameter names, JSON keys and identifier formats (`PatientIDx` as text such as
//! `ESSERVER_45993.3717631944`), local times in the clinic's zone (`[Clinic] time_zone`),
//! `yyyy.mm.dd` dates, spreadsheet serial days, and its status codes (200, 204 when there is
//! nothing to return, 400 with a text reason, 401, 500, 503). Call and parameter names are
//! matched without regard to case, as the original did. Every call and field is listed, with
//! the original's answer beside ours, in `docs/api-compat.md`.

use super::routes::{self, focal_plane_param, jpeg_response};
use super::{auth, ApiMsg, ApiShared, JsonPlan, Response, Step, ZipPlan};
use crate::times::{legacy_date, legacy_day, legacy_time, serial_day};
use base64::Engine;
use es_net::http::Request;
use es_net::ConnHandle;
use es_storage::limits::READ_ROWS_MAX;
use es_storage::{
    AcquisitionRecord, EmbryoRecord, Fate, PatientRecord, Reader, ScoreRecord, StorageError,
};
use jiff::tz::TimeZone;
use serde_json::{json, Map, Value};
use std::net::SocketAddr;
use std::sync::Arc;

/// A treatment is "in culture" while a dish of it was inseminated less than this long ago
/// (culture lasts at most 7 days).
pub const ONGOING_MS: i64 = 7 * 24 * 3600 * 1000;
/// Patients one `patients` call lists at most (the original had no paging).
pub const PATIENTS_MAX: usize = 100_000;
/// Scored embryos read per page of a streamed `IDASCORE` answer.
pub const SCORES_PAGE_ROWS: u32 = 256;
/// The model whose scores `IDASCORE` lists (compared without regard to case).
pub const IDASCORE_MODEL: &str = "iDAScore";

type Refusal = Box<Response>;

/// The original answers every bad request with 400 and a reason in plain text, never 404.
fn bad(message: impl Into<String>) -> Refusal {
    Box::new(text_error(400, "bad_request", message.into()))
}

/// `EmbryoID is invalid: ABCD-1`, as the original words an unknown identifier.
fn invalid(parameter: &str, value: &str) -> Refusal {
    bad(format!("{parameter} is invalid: {value}"))
}

/// An error of this API: the reason as plain text (as the original sent it), its stable
/// code in `es-error-code`, and the headers `Response::error` gives the status.
fn text_error(status: u16, code: &str, message: String) -> Response {
    let mut response = Response::error(status, code, message.clone());
    response.headers.retain(|(name, _)| *name != "content-type");
    response
        .headers
        .push(("content-type", "text/plain; charset=utf-8".into()));
    response.headers.push(("es-error-code", code.to_string()));
    let mut body = message.into_bytes();
    body.push(b'\n');
    response.body = bytes::Bytes::from(body);
    response
}

fn storage(error: StorageError) -> Refusal {
    let generic = Response::storage(&error);
    Box::new(text_error(generic.status, error.code(), error.to_string()))
}

/// `/LOGIN`: the user name and password from the query (`username`, `password`) or, when
/// the query has neither, from an `Authorization: Basic` header.
pub(super) fn login(
    shared: &ApiShared,
    request: &Request,
    peer: SocketAddr,
    handle: &ConnHandle<ApiMsg>,
) -> Result<Step, Refusal> {
    let query = (
        request.query_param_ci("username"),
        request.query_param_ci("password"),
    );
    let (user, password) = match query {
        (Some(user), Some(password)) => (user.to_string(), password.to_string()),
        (None, None) => match basic_credentials(request) {
            Some(credentials) => credentials,
            None => return Err(bad("LOGIN needs username and password")),
        },
        _ => return Err(bad("LOGIN needs username and password")),
    };
    routes::start_login(
        shared,
        &user,
        &password,
        super::LoginKind::Legacy,
        peer,
        handle,
    )
    .map_err(|refusal| Box::new(as_text(*refusal)))
}

/// `Authorization: Basic base64(user:password)`.
fn basic_credentials(request: &Request) -> Option<(String, String)> {
    let value = request.header("authorization")?;
    let (scheme, encoded) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (user, password) = text.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// A JSON error of the shared login path, as this API's text error.
fn as_text(response: Response) -> Response {
    let value: Value = serde_json::from_slice(&response.body).unwrap_or(Value::Null);
    match (value["code"].as_str(), value["message"].as_str()) {
        (Some(code), Some(message)) => text_error(response.status, code, message.to_string()),
        _ => response,
    }
}

pub(super) fn call(shared: &ApiShared, request: &Request, name: &str) -> Result<Step, Refusal> {
    // The original's clients know 503 as "try again later", not a new status.
    if let Some(message) = routes::license_refusal(shared) {
        return Err(Box::new(text_error(503, "license_invalid", message)));
    }
    // The API-token header (or a Bearer token) authenticates; an `Authorization: Basic`
    // header that clients send along on every call is ignored (docs/api-compat.md).
    match auth::authenticate(
        &shared.store,
        &shared.tokens,
        request,
        std::time::Instant::now(),
    ) {
        Ok(_) => {}
        Err(auth::Refused::Unavailable(detail)) => {
            return Err(Box::new(text_error(503, "storage_unavailable", detail)))
        }
        Err(_) => {
            return Err(Box::new(text_error(
                401,
                "auth_failed",
                "the API-token is unknown or expired; log in again".into(),
            )))
        }
    }
    let zone = shared.settings.time_zone.clone();
    let name = name.to_ascii_lowercase();
    let param = |key: &str| request.query_param_ci(key).filter(|v| !v.is_empty());
    let need = |key: &str| param(key).ok_or_else(|| bad(format!("{name} needs {key}")));
    if name == "allimages" {
        let embryo_id = need("EmbryoID")?;
        let focal_plane = focal_plane_param(param("focalPlane"))
            .map_err(|_| bad("focalPlane must be a whole number"))?;
        // The stream would answer an unknown embryo with 404; the original answers 400.
        let known = shared
            .store
            .read()
            .and_then(|reader| reader.acquisitions(embryo_id, None, 1))
            .map_err(storage)?
            .is_some();
        if !known {
            return Err(invalid("EmbryoID", embryo_id));
        }
        // ImageOverlay is accepted; images are always sent as stored (see api-compat.md).
        return Ok(Step::Zip(ZipPlan {
            embryo_id: embryo_id.to_string(),
            focal_plane,
            name_prefix: routes::file_name_part(embryo_id),
        }));
    }
    let reader = shared.store.read().map_err(storage)?;
    let value = match name.as_str() {
        "patients" => patients(&reader, false)?,
        "ongoingpatients" => patients(&reader, true)?,
        "treatment" => {
            let patient = patient_of(&reader, need("PatientIDx")?)?;
            let names: Vec<&str> = patient.treatments.iter().map(|t| t.name.as_str()).collect();
            json!({ "TreatmentList": names })
        }
        "embryoid" => {
            let embryos = embryos_of(&reader, need("PatientIDx")?, need("TreatmentName")?)?;
            let ids: Vec<&str> = embryos.iter().map(|(e, _)| e.embryo_id.as_str()).collect();
            json!({ "EmbryoIDList": ids })
        }
        "embryodata" => {
            let embryos = embryos_of(&reader, need("PatientIDx")?, need("TreatmentName")?)?;
            if embryos.is_empty() {
                // The original answered a treatment without embryos with an empty body.
                return Ok(Step::Respond(no_content()));
            }
            let list: Vec<Value> = embryos
                .iter()
                .map(|(e, slot)| embryo_data(e, *slot, &zone))
                .collect();
            json!({ "EmbryoDataList": list })
        }
        "embryodetails" => {
            let embryo = embryo_of(&reader, need("EmbryoID")?)?;
            let slot = slot_of(&reader, &embryo)?;
            details(&embryo, slot, &zone)
        }
        "embryofate" => {
            let embryo = embryo_of(&reader, need("EmbryoID")?)?;
            json!({ "EmbryoFate": fate_name(embryo.fate) })
        }
        "evaluation" => evaluation(&embryo_of(&reader, need("EmbryoID")?)?, &zone),
        "fertilizationtime" => {
            let embryo = embryo_of(&reader, need("EmbryoID")?)?;
            json!({ "FertilizationTime": legacy_time(embryo.insemination_at_ms, &zone) })
        }
        "imageruns" => {
            let embryo = embryo_of(&reader, need("EmbryoID")?)?;
            let acquisitions = all_acquisitions(&reader, &embryo.embryo_id)
                .map_err(storage)?
                .ok_or_else(|| invalid("EmbryoID", &embryo.embryo_id))?;
            let runs: Vec<Value> = acquisitions
                .iter()
                .enumerate()
                .map(|(index, a)| {
                    json!({
                        "Run": index + 1,
                        "Time": hours_since(embryo.insemination_at_ms, a.acquired_at_ms),
                    })
                })
                .collect();
            json!({ "ImageRuns": runs })
        }
        "idascore" => {
            // One embryo, the embryos of a treatment, or (no parameters, as clients call it)
            // every scored embryo of the clinic, streamed.
            let embryos = match (param("EmbryoID"), param("PatientIDx")) {
                (Some(embryo_id), _) => vec![embryo_of(&reader, embryo_id)?],
                (None, Some(patient_idx)) => {
                    embryos_of(&reader, patient_idx, need("TreatmentName")?)?
                        .into_iter()
                        .map(|(e, _)| e)
                        .collect()
                }
                (None, None) if param("TreatmentName").is_some() => {
                    return Err(bad("idascore needs PatientIDx with TreatmentName"))
                }
                (None, None) => return Ok(Step::Json(every_score(zone))),
            };
            let scores: Vec<Value> = embryos
                .iter()
                .filter_map(|e| {
                    let score = e
                        .scores
                        .iter()
                        .find(|s| s.model.eq_ignore_ascii_case(IDASCORE_MODEL))?;
                    Some(score_entry(e, score, &zone))
                })
                .collect();
            json!({ "Scores": scores })
        }
        "transfers" => {
            let patient = patient_of(&reader, need("PatientIDx")?)?;
            let mut list = Vec::new();
            for treatment in &patient.treatments {
                let transfers = reader
                    .treatment_transfers(&patient.patient_id, &treatment.name)
                    .map_err(storage)?
                    .unwrap_or_default();
                for t in transfers {
                    list.push(json!({
                        "TransferID": t.transfer_key,
                        "TreatmentName": t.treatment_name,
                        "TransferDate": legacy_time(t.transferred_at_ms, &zone),
                        "EmbryoIDs": t.embryo_ids,
                        "GestationalSacs": t.outcome.gestational_sacs,
                        "FetalHeartbeats": t.outcome.fetal_heartbeats,
                        "ClinicalPregnancy": t.outcome.clinical_pregnancy,
                        "LiveBirth": t.outcome.live_birth,
                        "Comment": t.comment,
                    }));
                }
            }
            if list.is_empty() {
                // The original answered a patient without transfers with an empty body.
                return Ok(Step::Respond(no_content()));
            }
            json!({ "PatientIDx": patient.patient_idx, "Transfers": list })
        }
        "image" => {
            let embryo_id = need("EmbryoID")?;
            let run: usize = need("ImageRun")?
                .parse()
                .ok()
                .filter(|&run| run >= 1)
                .ok_or_else(|| bad("ImageRun is a run number from 1"))?;
            let focal_plane = focal_plane_param(param("focalPlane"))
                .map_err(|_| bad("focalPlane must be a whole number"))?;
            let acquisition = nth_acquisition(&reader, embryo_id, run)
                .map_err(storage)?
                .ok_or_else(|| invalid("EmbryoID", embryo_id))?;
            let Some(acquisition) = acquisition else {
                return Ok(Step::Respond(no_content()));
            };
            let jpeg = reader
                .embryo_image(embryo_id, acquisition.acquired_at_ms, focal_plane)
                .map_err(storage)?;
            return Ok(Step::Respond(match jpeg {
                Some(jpeg) => jpeg_response(jpeg),
                None => no_content(),
            }));
        }
        other => return Err(bad(format!("unknown call GET/{other}"))),
    };
    Ok(Step::Respond(Response::json(200, &value)))
}

fn no_content() -> Response {
    Response {
        status: 204,
        headers: Vec::new(),
        body: bytes::Bytes::new(),
    }
}

/// Hours from `from_ms` to `at_ms`, to one decimal, as the original wrote them.
fn hours_since(from_ms: i64, at_ms: i64) -> f64 {
    let hours = (at_ms - from_ms) as f64 / 3_600_000.0;
    (hours * 10.0).round() / 10.0
}

fn patients(reader: &Reader, ongoing_only: bool) -> Result<Value, Refusal> {
    let now = crate::now_ms();
    let mut list = Vec::new();
    let mut after: Option<String> = None;
    'pages: loop {
        let page = reader
            .patients(after.as_deref(), READ_ROWS_MAX)
            .map_err(storage)?;
        let Some(last) = page.last() else { break };
        after = Some(last.patient_id.clone());
        for patient in &page {
            if ongoing_only && !in_culture(reader, patient, now).map_err(storage)? {
                continue;
            }
            list.push(json!({
                "PatientIDx": patient.patient_idx,
                "PatientID": patient.patient_id,
                "FirstName": patient.first_name,
                "LastName": patient.last_name,
                // Unknown: null, never "" (clients load it into a date column).
                "DateOfBirth": legacy_date(&patient.date_of_birth),
            }));
            if list.len() >= PATIENTS_MAX {
                break 'pages;
            }
        }
    }
    Ok(json!({ "Patients": list }))
}

fn in_culture(reader: &Reader, patient: &PatientRecord, now: i64) -> Result<bool, StorageError> {
    for treatment in &patient.treatments {
        let dishes = reader
            .treatment_dishes(&patient.patient_id, &treatment.name)?
            .unwrap_or_default();
        if dishes
            .iter()
            .any(|d| now.saturating_sub(d.insemination_at_ms) < ONGOING_MS)
        {
            return Ok(true);
        }
    }
    Ok(false)
}

fn patient_of(reader: &Reader, patient_idx: &str) -> Result<PatientRecord, Refusal> {
    reader
        .patient_of_idx(patient_idx)
        .map_err(storage)?
        .ok_or_else(|| invalid("PatientIDx", patient_idx))
}

/// The embryos of a treatment by dish and well, each with the slot of its dish.
fn embryos_of(
    reader: &Reader,
    patient_idx: &str,
    treatment: &str,
) -> Result<Vec<(EmbryoRecord, u32)>, Refusal> {
    let patient = patient_of(reader, patient_idx)?;
    let dishes = reader
        .treatment_dishes(&patient.patient_id, treatment)
        .map_err(storage)?
        .ok_or_else(|| invalid("TreatmentName", treatment))?;
    let mut embryos = Vec::new();
    for dish in &dishes {
        for (_, embryo_id) in &dish.wells {
            if let Some(embryo) = reader.embryo(embryo_id).map_err(storage)? {
                embryos.push((embryo, dish.slot));
            }
        }
    }
    Ok(embryos)
}

/// The slot of the instrument the embryo's dish is in (1-based; 0 when unknown).
fn slot_of(reader: &Reader, e: &EmbryoRecord) -> Result<u32, Refusal> {
    Ok(reader
        .dish(e.dish_key)
        .map_err(storage)?
        .map_or(0, |dish| dish.slot))
}

/// Every acquisition of an embryo, ascending (read in pages); None if the embryo is unknown.
fn all_acquisitions(
    reader: &Reader,
    embryo_id: &str,
) -> Result<Option<Vec<AcquisitionRecord>>, StorageError> {
    let mut all = Vec::new();
    let mut after = None;
    loop {
        let Some(page) = reader.acquisitions(embryo_id, after, READ_ROWS_MAX)? else {
            return Ok(None);
        };
        let full = page.len() >= READ_ROWS_MAX as usize;
        after = page.last().map(|a| a.acquired_at_ms);
        all.extend(page);
        if !full {
            return Ok(Some(all));
        }
    }
}

/// Image run `run` (1-based) of an embryo: None if the embryo is unknown, Some(None) if it
/// has fewer runs.
fn nth_acquisition(
    reader: &Reader,
    embryo_id: &str,
    run: usize,
) -> Result<Option<Option<AcquisitionRecord>>, StorageError> {
    let mut skip = run - 1;
    let mut after = None;
    loop {
        let Some(page) = reader.acquisitions(embryo_id, after, READ_ROWS_MAX)? else {
            return Ok(None);
        };
        if skip < page.len() {
            return Ok(Some(page.into_iter().nth(skip)));
        }
        if page.len() < READ_ROWS_MAX as usize {
            return Ok(Some(None));
        }
        skip -= page.len();
        after = page.last().map(|a| a.acquired_at_ms);
    }
}

fn embryo_of(reader: &Reader, embryo_id: &str) -> Result<EmbryoRecord, Refusal> {
    reader
        .embryo(embryo_id)
        .map_err(storage)?
        .ok_or_else(|| invalid("EmbryoID", embryo_id))
}

/// The original's fate names.
fn fate_name(fate: Fate) -> &'static str {
    match fate {
        Fate::Undecided => "Undecided",
        Fate::Transfer => "Transfer",
        Fate::Freeze => "Freeze",
        Fate::Avoid => "Avoid",
    }
}

/// `embryodetails`, and `EmbryoDetails` inside `embryodata`. `slot`: the position of the
/// embryo's dish in the instrument (see [`slot_of`]).
fn details(e: &EmbryoRecord, slot: u32, zone: &TimeZone) -> Value {
    let mut object = Map::new();
    object.insert("InstrumentNumber".into(), json!(e.instrument_number));
    object.insert("Position".into(), json!(slot));
    object.insert("WellNumber".into(), json!(e.well));
    object.insert(
        "FertilizationTime".into(),
        json!(legacy_time(e.insemination_at_ms, zone)),
    );
    let method = (!e.fertilization_method.is_empty()).then_some(&e.fertilization_method);
    object.insert("FertilizationMethod".into(), json!(method));
    object.insert("EmbryoFate".into(), json!(fate_name(e.fate)));
    // As the original: only when set.
    if !e.comment.is_empty() {
        object.insert("Description".into(), json!(e.comment));
    }
    object.insert("EmbryoDescriptionID".into(), json!(e.label));
    Value::Object(object)
}

/// `evaluation`, and `Evaluation` inside `embryodata`: the embryo's most recent score of
/// any model (a clinic's model, KIDScore, iDAScore), every field null when it has none.
fn evaluation(e: &EmbryoRecord, zone: &TimeZone) -> Value {
    match e.scores.iter().max_by_key(|s| s.set_at_ms) {
        Some(score) => json!({
            "Model": model_name(score),
            "Evaluation": score.value,
            "User": score.set_by,
            "EvaluationDate": legacy_day(score.set_at_ms, zone),
        }),
        None => json!({
            "Model": Value::Null,
            "Evaluation": Value::Null,
            "User": Value::Null,
            "EvaluationDate": Value::Null,
        }),
    }
}

/// `KIDScoreD5 v3`: the model and its version, as the original named them.
fn model_name(score: &ScoreRecord) -> String {
    if score.model_version.is_empty() {
        score.model.clone()
    } else {
        format!("{} {}", score.model, score.model_version)
    }
}

fn embryo_data(e: &EmbryoRecord, slot: u32, zone: &TimeZone) -> Value {
    let annotations: Vec<Value> = e
        .annotations
        .iter()
        .map(|a| {
            // A timing annotation's value is its event's instant as a serial day; others
            // carry their value ("2", "0-10%", "Bi").
            let value = match a.event_at_ms {
                Some(at_ms) => serial_day(at_ms, zone),
                None => a.value.clone(),
            };
            json!({
                "Name": a.name,
                "Time": a.hours.map(|h| (h * 10.0).round() / 10.0),
                "Value": value,
                "Timestamp": legacy_time(a.set_at_ms, zone),
            })
        })
        .collect();
    json!({
        "EmbryoID": e.embryo_id,
        "EmbryoDetails": details(e, slot, zone),
        "AnnotationList": annotations,
        "Evaluation": evaluation(e, zone),
    })
}

/// One entry of `IDASCORE`: `Viability` is the score (a number; null when the stored value
/// is not one), `Time` the hours after insemination it was set at, `Version` the model's.
fn score_entry(e: &EmbryoRecord, score: &ScoreRecord, zone: &TimeZone) -> Value {
    let viability = score
        .value
        .trim()
        .parse::<f64>()
        .ok()
        .filter(|v| v.is_finite());
    json!({
        "EmbryoID": e.embryo_id,
        "Viability": viability,
        "Time": hours_since(e.insemination_at_ms, score.set_at_ms),
        "Version": score.model_version,
        "Timestamp": legacy_time(score.set_at_ms, zone),
    })
}

/// `IDASCORE` without parameters: every embryo with an iDAScore, by embryo key, read
/// [`SCORES_PAGE_ROWS`] at a time while the answer is sent (a clinic has tens of thousands).
fn every_score(zone: TimeZone) -> JsonPlan {
    JsonPlan {
        open: "{\"Scores\":[",
        close: "]}",
        render_error: as_text,
        read: Arc::new(move |store, after| {
            let reader = store.read()?;
            let page = reader.scored_embryos(IDASCORE_MODEL, after, SCORES_PAGE_ROWS)?;
            let next = (page.len() == SCORES_PAGE_ROWS as usize)
                .then(|| page.last().map(|(e, _)| e.embryo_key))
                .flatten();
            let items = page
                .iter()
                .map(|(e, score)| score_entry(e, score, &zone))
                .collect();
            Ok((items, next))
        }),
    }
}
