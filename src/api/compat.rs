//! The original Public API, for clients written against it: `GET /LOGIN?username=&password=`
//! and `GET /GET/<name>?...` with the original's parameter names, JSON keys, `yyyy.mm.dd`
//! dates and status codes (200, 204 when there are no images, 400, 401, 500, 503). Names and
//! parameter names are matched without regard to case, as the original did. Every call and
//! field is listed in `docs/api-compat.md`.

use super::routes::{self, focal_plane_param, jpeg_response};
use super::{auth, ApiMsg, ApiShared, Response, Step, ZipPlan};
use crate::civil::{legacy_date, legacy_time};
use es_net::http::Request;
use es_net::ConnHandle;
use es_storage::limits::READ_ROWS_MAX;
use es_storage::{AcquisitionRecord, EmbryoRecord, Fate, PatientRecord, Reader, StorageError};
use serde_json::{json, Value};
use std::net::SocketAddr;

/// A treatment is "in culture" while a dish of it was inseminated less than this long ago
/// (culture lasts at most 7 days).
pub const ONGOING_MS: i64 = 7 * 24 * 3600 * 1000;
/// Patients one `patients` call lists at most (the original had no paging).
pub const PATIENTS_MAX: usize = 100_000;

type Refusal = Box<Response>;

/// The original answers every bad request with 400, never 404.
fn bad(message: impl Into<String>) -> Refusal {
    Box::new(Response::error(400, "bad_request", message))
}

fn storage(error: StorageError) -> Refusal {
    Box::new(Response::storage(&error))
}

pub(super) fn login(
    shared: &ApiShared,
    request: &Request,
    peer: SocketAddr,
    handle: &ConnHandle<ApiMsg>,
) -> Result<Step, Refusal> {
    let (Some(user), Some(password)) = (
        request.query_param_ci("username"),
        request.query_param_ci("password"),
    ) else {
        return Err(bad("LOGIN needs username and password"));
    };
    routes::start_login(
        shared,
        user,
        password,
        super::LoginKind::Legacy,
        peer,
        handle,
    )
}

pub(super) fn call(shared: &ApiShared, request: &Request, name: &str) -> Result<Step, Refusal> {
    // The original's clients know 503 as "try again later", not a new status.
    if let Some(message) = routes::license_refusal(shared) {
        return Err(Box::new(Response::error(503, "license_invalid", message)));
    }
    match auth::authenticate(
        &shared.store,
        &shared.tokens,
        request,
        std::time::Instant::now(),
    ) {
        Ok(_) => {}
        Err(auth::Refused::Unavailable(detail)) => {
            return Err(Box::new(Response::error(
                503,
                "storage_unavailable",
                detail,
            )))
        }
        Err(_) => {
            return Err(Box::new(Response::error(
                401,
                "auth_failed",
                "the API-token is unknown or expired; log in again",
            )))
        }
    }
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
            return Err(bad(format!("embryo {embryo_id} is unknown")));
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
            json!({ "EmbryoIDs": ids })
        }
        "embryodata" => {
            let embryos = embryos_of(&reader, need("PatientIDx")?, need("TreatmentName")?)?;
            let list: Vec<Value> = embryos
                .iter()
                .map(|(e, slot)| embryo_data(e, *slot))
                .collect();
            json!({ "EmbryoDataList": list })
        }
        "embryodetails" => {
            let embryo = embryo_of(&reader, need("EmbryoID")?)?;
            let slot = slot_of(&reader, &embryo)?;
            json!({ "EmbryoID": embryo.embryo_id, "EmbryoDetails": details(&embryo, slot) })
        }
        "embryofate" => {
            let embryo = embryo_of(&reader, need("EmbryoID")?)?;
            json!({ "EmbryoID": embryo.embryo_id, "EmbryoFate": fate_name(embryo.fate) })
        }
        "evaluation" => {
            let embryo = embryo_of(&reader, need("EmbryoID")?)?;
            json!({ "EmbryoID": embryo.embryo_id, "Evaluation": evaluation(&embryo) })
        }
        "fertilizationtime" => {
            let embryo = embryo_of(&reader, need("EmbryoID")?)?;
            json!({
                "EmbryoID": embryo.embryo_id,
                "FertilizationTime": legacy_time(embryo.insemination_at_ms),
            })
        }
        "imageruns" => {
            let embryo_id = need("EmbryoID")?;
            let acquisitions = all_acquisitions(&reader, embryo_id)
                .map_err(storage)?
                .ok_or_else(|| bad(format!("embryo {embryo_id} is unknown")))?;
            let runs: Vec<Value> = acquisitions
                .iter()
                .enumerate()
                .map(|(index, a)| {
                    json!({
                        "ImageRun": index + 1,
                        "Time": legacy_time(a.acquired_at_ms),
                        "FocalPlanes": a.focal_planes,
                    })
                })
                .collect();
            json!({ "EmbryoID": embryo_id, "ImageRuns": runs })
        }
        "idascore" => {
            // The scores of a treatment's embryos, or of one embryo.
            let embryos = match param("EmbryoID") {
                Some(embryo_id) => vec![embryo_of(&reader, embryo_id)?],
                None => {
                    let (Some(patient_idx), Some(treatment)) =
                        (param("PatientIDx"), param("TreatmentName"))
                    else {
                        return Err(bad(
                            "idascore needs PatientIDx and TreatmentName, or EmbryoID",
                        ));
                    };
                    embryos_of(&reader, patient_idx, treatment)?
                        .into_iter()
                        .map(|(e, _)| e)
                        .collect()
                }
            };
            let scores: Vec<Value> = embryos
                .iter()
                .filter_map(|e| {
                    let score = e
                        .scores
                        .iter()
                        .find(|s| s.model.eq_ignore_ascii_case("iDAScore"))?;
                    Some(json!({
                        "EmbryoID": e.embryo_id,
                        "Score": score.value,
                        "Viability": score.viability,
                    }))
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
                        "TransferDate": legacy_time(t.transferred_at_ms),
                        "EmbryoIDs": t.embryo_ids,
                        "GestationalSacs": t.outcome.gestational_sacs,
                        "FetalHeartbeats": t.outcome.fetal_heartbeats,
                        "ClinicalPregnancy": t.outcome.clinical_pregnancy,
                        "LiveBirth": t.outcome.live_birth,
                        "Comment": t.comment,
                    }));
                }
            }
            json!({ "PatientIDx": patient.patient_key, "Transfers": list })
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
                .ok_or_else(|| bad(format!("embryo {embryo_id} is unknown")))?;
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

fn patients(reader: &Reader, ongoing_only: bool) -> Result<Value, Refusal> {
    let now = crate::now_ms();
    let mut list = Vec::new();
    let mut after: Option<String> = None;
    'pages: loop {
        let page = reader
            .patients(after.as_deref(), es_storage::limits::READ_ROWS_MAX)
            .map_err(storage)?;
        let Some(last) = page.last() else { break };
        after = Some(last.patient_id.clone());
        for patient in &page {
            if ongoing_only && !in_culture(reader, patient, now).map_err(storage)? {
                continue;
            }
            list.push(json!({
                "PatientIDx": patient.patient_key,
                "PatientID": patient.patient_id,
                "FirstName": patient.first_name,
                "LastName": patient.last_name,
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
    let key: u64 = patient_idx
        .parse()
        .map_err(|_| bad(format!("PatientIDx {patient_idx:?} is not a number")))?;
    reader
        .patient_of_key(key)
        .map_err(storage)?
        .ok_or_else(|| bad(format!("patient {key} is unknown")))
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
        .ok_or_else(|| {
            bad(format!(
                "treatment {treatment} of patient {patient_idx} is unknown"
            ))
        })?;
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
        .ok_or_else(|| bad(format!("embryo {embryo_id} is unknown")))
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

/// `slot`: the position of the embryo's dish in the instrument (see [`slot_of`]).
fn details(e: &EmbryoRecord, slot: u32) -> Value {
    json!({
        "InstrumentNumber": e.instrument_number,
        "Position": slot,
        "WellNumber": e.well,
        "FertilizationTime": legacy_time(e.insemination_at_ms),
        "EmbryoFate": fate_name(e.fate),
        "Description": e.comment,
        "EmbryoDescriptionID": e.embryo_key,
    })
}

/// The most recent score of the embryo (a user-defined model, KIDScore or iDAScore), or
/// empty fields when it has none.
fn evaluation(e: &EmbryoRecord) -> Value {
    match e.scores.iter().max_by_key(|s| s.set_at_ms) {
        Some(score) => json!({
            "Model": score.model,
            "Evaluation": score.value,
            "User": score.set_by,
            "EvaluationDate": legacy_time(score.set_at_ms),
        }),
        None => json!({ "Model": "", "Evaluation": "", "User": "", "EvaluationDate": "" }),
    }
}

fn embryo_data(e: &EmbryoRecord, slot: u32) -> Value {
    let annotations: Vec<Value> = e
        .annotations
        .iter()
        .map(|a| {
            json!({
                "Name": a.name,
                "Time": a.hours.map(|h| (h * 100.0).round() / 100.0),
                "Value": a.value,
                "Timestamp": legacy_time(a.event_at_ms.unwrap_or(a.set_at_ms)),
            })
        })
        .collect();
    json!({
        "EmbryoID": e.embryo_id,
        "AnnotationList": annotations,
        "EmbryoDetails": details(e, slot),
        "Evaluation": evaluation(e),
    })
}
