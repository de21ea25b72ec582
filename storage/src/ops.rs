//! Write requests (`WriteOp`), their outcomes, and input validation against `limits`.

use crate::error::WriteError;
use crate::limits;
use crate::model::{AnnotationSource, ApiScope, ChangeEntity, Fate, Rights, TransferOutcome};
use std::collections::BTreeSet;
use std::fmt;

/// An image's bytes with their SHA-256, computed when the value is made: on the thread that
/// received the image (the event loops, in parallel), not on the single storage writer.
#[derive(Clone, PartialEq, Eq)]
pub struct ImageBytes {
    jpeg: bytes::Bytes,
    sha256: [u8; 32],
}

impl ImageBytes {
    pub fn new(jpeg: bytes::Bytes) -> ImageBytes {
        let sha256 = crate::tables::sha256(&jpeg);
        ImageBytes { jpeg, sha256 }
    }

    pub fn sha256(&self) -> &[u8; 32] {
        &self.sha256
    }

    pub fn bytes(&self) -> &bytes::Bytes {
        &self.jpeg
    }
}

impl std::ops::Deref for ImageBytes {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.jpeg
    }
}

impl std::fmt::Debug for ImageBytes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ImageBytes({} bytes, sha256 {})",
            self.jpeg.len(),
            hex::encode(self.sha256)
        )
    }
}

/// One write request for the writer thread. See the crate documentation for each op's rules.
pub enum WriteOp {
    /// First message of every incubator connection. Unknown serial: record the instrument, store
    /// the SHA-256 of `new_secret` and issue it. Known serial: `presented_secret` must hash to the
    /// stored hash, else `AuthFailed`; model, firmware and last-seen are updated.
    InstrumentHello {
        serial: String,
        model: String,
        firmware: String,
        presented_secret: Option<String>,
        new_secret: String,
        at_ms: i64,
    },
    /// Admin: forget the secret; the next HELLO of that serial is issued a new one.
    ResetInstrumentSecret { serial: String },
    /// Changes an instrument's display name. Its identity (serial number) and every image,
    /// dish and annotation stay as they are: names are labels, never keys.
    InstrumentRename {
        actor: Actor,
        serial: String,
        display_name: String,
        at_ms: i64,
    },
    /// Create or update a culture dish (key: instrument_id + dish_id), creating its patient and
    /// treatment when missing. An embryo id, once assigned to (dish, well), never changes.
    RegisterDish {
        instrument_id: u64,
        dish: DishRegistration,
        at_ms: i64,
    },
    /// Idempotent by (instrument, dish, well, focal_plane, acquired_at_ms).
    PutImage {
        instrument_id: u64,
        dish_id: String,
        well: u32,
        focal_plane: i32,
        acquired_at_ms: i64,
        jpeg: ImageBytes,
        at_ms: i64,
    },
    /// Idempotent by (instrument, channel, at_ms) per sample and (instrument, code,
    /// raised_at_ms) per alarm. With `ims`, what is new and allowed is also queued for the
    /// monitoring uploader (see `crate::ims`).
    PutTelemetry {
        instrument_id: u64,
        samples: Vec<TelemetrySample>,
        alarms: Vec<AlarmInput>,
        ims: Option<ImsQueueing>,
        at_ms: i64,
    },
    /// The monitoring endpoint accepted these queue records: remove them. Ids no longer
    /// queued (dropped meanwhile) are skipped.
    ImsRemove { ids: Vec<u64> },
    /// A change to clinical data from a viewer or the public API. Every edit of an existing
    /// row names the version the client last saw; a stale one is refused with
    /// `WriteError::Conflict` (carrying the current state) and audited as a conflict.
    ///
    /// With `idempotency`, the outcome is recorded under the key in the same transaction: the
    /// same key and request again is answered with the recorded outcome (`replayed`) and
    /// changes nothing; the same key with another request is refused (`IdempotencyKeyReused`).
    Edit {
        actor: Actor,
        edit: ClinicalEdit,
        idempotency: Option<Idempotency>,
        at_ms: i64,
    },
    /// Creates a public API key. The caller makes the secret and passes its SHA-256 only.
    ApiKeyCreate {
        actor: Actor,
        key_id: String,
        name: String,
        scope: ApiScope,
        secret_sha256: [u8; 32],
        at_ms: i64,
    },
    /// Revokes a public API key; it can never be used again.
    ApiKeyRevoke {
        actor: Actor,
        key_id: String,
        at_ms: i64,
    },
    /// Records a refused attempt (the user lacked the right) in the audit trail.
    AuditDenied {
        actor: Actor,
        action: String,
        entity: ChangeEntity,
        target: String,
        attempted: String,
        at_ms: i64,
    },
    /// Creates a user. `password_hash` is an argon2id PHC string made by the caller.
    UserAdd {
        actor: Actor,
        name: String,
        password_hash: String,
        rights: Rights,
        at_ms: i64,
    },
    UserUpdate {
        actor: Actor,
        name: String,
        change: UserChange,
        at_ms: i64,
    },
    /// The outcome of a login attempt whose password was checked by the caller. A failure
    /// raises the user's failure count; the `failures_max`-th locks the account for
    /// `lockout_ms`. A success clears the count.
    LoginAttempt {
        name: String,
        computer: String,
        success: bool,
        failures_max: u32,
        lockout_ms: i64,
        at_ms: i64,
    },
}

/// An `Idempotency-Key` sent with a write, scoped to who sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    /// `user:NAME` or `key:KEY_ID`: keys of different clients never collide.
    pub principal: String,
    pub key: String,
    /// SHA-256 of the request (method, path, body), to tell a retry from a reuse.
    pub request_sha256: [u8; 32],
}

/// Who makes a change, from which computer. Recorded in the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor {
    pub user: String,
    pub computer: String,
}

/// An edit of clinical data. Edits of existing rows carry `expected_version`.
#[derive(Debug, Clone, PartialEq)]
pub enum ClinicalEdit {
    CreatePatient {
        patient: PatientRef,
    },
    UpdatePatient {
        patient: PatientRef,
        expected_version: u64,
    },
    CreateTreatment {
        patient_id: String,
        name: String,
        comment: String,
    },
    UpdateTreatment {
        patient_id: String,
        name: String,
        comment: String,
        expected_version: u64,
    },
    AddAnnotation {
        embryo_id: String,
        expected_version: u64,
        annotation: AnnotationInput,
    },
    ChangeAnnotation {
        embryo_id: String,
        expected_version: u64,
        annotation_id: u64,
        annotation: AnnotationInput,
    },
    RemoveAnnotation {
        embryo_id: String,
        expected_version: u64,
        annotation_id: u64,
    },
    SetFate {
        embryo_id: String,
        expected_version: u64,
        fate: Fate,
    },
    SetEmbryoComment {
        embryo_id: String,
        expected_version: u64,
        comment: String,
    },
    /// Sets (replaces) the embryo's score of one model.
    SetScore {
        embryo_id: String,
        expected_version: u64,
        score: ScoreInput,
    },
    /// Records a transfer of embryos of one treatment. Its key is allocated by the server.
    CreateTransfer {
        patient_id: String,
        treatment_name: String,
        transferred_at_ms: i64,
        embryo_ids: Vec<String>,
        comment: String,
    },
    /// Replaces a transfer's outcome and comment.
    UpdateTransfer {
        transfer_key: u64,
        expected_version: u64,
        outcome: TransferOutcome,
        comment: String,
    },
}

/// A score as a client gives it; who set it and when come from the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScoreInput {
    pub model: String,
    pub model_version: String,
    pub value: String,
    pub viability: String,
}

impl ClinicalEdit {
    /// The stable action name recorded in the audit trail.
    pub fn action(&self) -> &'static str {
        match self {
            ClinicalEdit::CreatePatient { .. } => "patient.create",
            ClinicalEdit::UpdatePatient { .. } => "patient.update",
            ClinicalEdit::CreateTreatment { .. } => "treatment.create",
            ClinicalEdit::UpdateTreatment { .. } => "treatment.update",
            ClinicalEdit::AddAnnotation { .. } => "annotation.add",
            ClinicalEdit::ChangeAnnotation { .. } => "annotation.change",
            ClinicalEdit::RemoveAnnotation { .. } => "annotation.remove",
            ClinicalEdit::SetFate { .. } => "embryo.fate",
            ClinicalEdit::SetEmbryoComment { .. } => "embryo.comment",
            ClinicalEdit::SetScore { .. } => "embryo.score",
            ClinicalEdit::CreateTransfer { .. } => "transfer.create",
            ClinicalEdit::UpdateTransfer { .. } => "transfer.update",
        }
    }

    fn validate(&self) -> Result<(), WriteError> {
        match self {
            ClinicalEdit::CreatePatient { patient }
            | ClinicalEdit::UpdatePatient { patient, .. } => validate_patient(patient),
            ClinicalEdit::CreateTreatment {
                patient_id,
                name,
                comment,
            }
            | ClinicalEdit::UpdateTreatment {
                patient_id,
                name,
                comment,
                ..
            } => {
                text("patient id", patient_id, Required::Yes)?;
                text("treatment name", name, Required::Yes)?;
                comment_text(comment)
            }
            ClinicalEdit::AddAnnotation {
                embryo_id,
                annotation,
                ..
            }
            | ClinicalEdit::ChangeAnnotation {
                embryo_id,
                annotation,
                ..
            } => {
                text("embryo id", embryo_id, Required::Yes)?;
                text("annotation name", &annotation.name, Required::Yes)?;
                text("annotation value", &annotation.value, Required::No)?;
                if let Some(at) = annotation.event_at_ms {
                    if !(0..=limits::INSTANT_MS_MAX).contains(&at) {
                        return Err(invalid(format!(
                            "annotation event time {at} ms is outside 1970..2286"
                        )));
                    }
                }
                if annotation.value.is_empty() && annotation.event_at_ms.is_none() {
                    return Err(invalid(format!(
                        "annotation {} has neither a value nor an event time",
                        annotation.name
                    )));
                }
                Ok(())
            }
            ClinicalEdit::RemoveAnnotation { embryo_id, .. }
            | ClinicalEdit::SetFate { embryo_id, .. } => {
                text("embryo id", embryo_id, Required::Yes)
            }
            ClinicalEdit::SetEmbryoComment {
                embryo_id, comment, ..
            } => {
                text("embryo id", embryo_id, Required::Yes)?;
                comment_text(comment)
            }
            ClinicalEdit::SetScore {
                embryo_id, score, ..
            } => {
                text("embryo id", embryo_id, Required::Yes)?;
                text("score model", &score.model, Required::Yes)?;
                text("score model version", &score.model_version, Required::No)?;
                text("score value", &score.value, Required::Yes)?;
                text("score viability", &score.viability, Required::No)
            }
            ClinicalEdit::CreateTransfer {
                patient_id,
                treatment_name,
                transferred_at_ms,
                embryo_ids,
                comment,
            } => {
                text("patient id", patient_id, Required::Yes)?;
                text("treatment name", treatment_name, Required::Yes)?;
                instant("transfer time", *transferred_at_ms)?;
                if embryo_ids.is_empty() || embryo_ids.len() > limits::EMBRYOS_PER_TRANSFER_MAX {
                    return Err(invalid(format!(
                        "a transfer names 1 to {} embryos, not {}",
                        limits::EMBRYOS_PER_TRANSFER_MAX,
                        embryo_ids.len()
                    )));
                }
                let mut seen = BTreeSet::new();
                for embryo_id in embryo_ids {
                    text("embryo id", embryo_id, Required::Yes)?;
                    if !seen.insert(embryo_id) {
                        return Err(invalid(format!(
                            "embryo {embryo_id} is named twice in the transfer"
                        )));
                    }
                }
                comment_text(comment)
            }
            ClinicalEdit::UpdateTransfer {
                outcome, comment, ..
            } => {
                for (what, count) in [
                    ("gestational sacs", outcome.gestational_sacs),
                    ("fetal heartbeats", outcome.fetal_heartbeats),
                ] {
                    if count.is_some_and(|n| n > limits::OUTCOME_COUNT_MAX) {
                        return Err(invalid(format!(
                            "{what} must be at most {}",
                            limits::OUTCOME_COUNT_MAX
                        )));
                    }
                }
                comment_text(comment)
            }
        }
    }
}

/// An annotation as a client gives it; who set it and when come from the request.
#[derive(Debug, Clone, PartialEq)]
pub struct AnnotationInput {
    pub name: String,
    pub value: String,
    /// For timing events: the instant the event was seen (UTC ms).
    pub event_at_ms: Option<i64>,
    pub source: AnnotationSource,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UserChange {
    /// A new argon2id PHC string; clears failures and any lock.
    Password(String),
    Disabled(bool),
    /// Clears failures and any lock.
    Unlock,
    Rights(Rights),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DishRegistration {
    pub dish_id: String,
    pub slot: u32,
    pub patient: PatientRef,
    pub treatment_name: String,
    pub insemination_at_ms: i64,
    pub wells: Vec<WellRegistration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatientRef {
    /// The clinic's medical record number.
    pub patient_id: String,
    pub first_name: String,
    pub last_name: String,
    /// `yyyy-mm-dd` or empty.
    pub date_of_birth: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WellRegistration {
    pub well: u32,
    pub embryo_id: String,
}

/// One alarm reported by an instrument.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlarmInput {
    pub code: String,
    /// 1 info, 2 warning, 3 critical.
    pub severity: u8,
    pub raised_at_ms: i64,
    /// 0 while active.
    pub cleared_at_ms: i64,
    /// Readable description; kept on the server, never queued.
    pub text: String,
}

/// How telemetry enters the monitoring queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImsQueueing {
    /// The queue's bound; the oldest records are dropped to stay under it.
    pub queue_bytes_max: u64,
}

/// One telemetry reading, e.g. channel `temperature_c`.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetrySample {
    pub channel: String,
    pub value: f64,
    pub at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutcome {
    InstrumentAccepted {
        instrument_id: u64,
        issued_secret: Option<String>,
    },
    SecretReset {
        existed: bool,
    },
    DishRegistered {
        dish_key: u64,
        created: bool,
        /// False when the registration was already stored exactly as given (a resend).
        changed: bool,
    },
    ImageStored {
        duplicate: bool,
    },
    TelemetryStored {
        samples: u32,
        /// Records added to the monitoring queue.
        ims_queued: u32,
        /// Samples and alarms kept but not queued (see `crate::ims`).
        ims_withheld: u32,
        /// Oldest queue records dropped to make room.
        ims_dropped: u32,
    },
    ImsRemoved {
        removed: u32,
    },
    /// A clinical edit was applied and logged with change `change_seq`.
    Edited {
        entity: ChangeEntity,
        key: u64,
        id: String,
        version: u64,
        change_seq: u64,
        /// The annotation added, changed or removed.
        annotation_id: Option<u64>,
        /// True when this is the recorded outcome of an earlier request with the same
        /// Idempotency-Key: nothing was changed now.
        replayed: bool,
    },
    ApiKeyChanged,
    InstrumentRenamed,
    Audited,
    UserChanged,
    LoginRecorded {
        /// True when the login is granted: the password was right and the account is neither
        /// disabled nor locked at the attempt's time.
        granted: bool,
        disabled: bool,
        /// The account is locked until then (0: not locked at the attempt's time).
        locked_until_ms: i64,
    },
}

impl WriteOp {
    /// The bytes this op adds to a batch, for `batch_bytes_max` (JPEG bytes for images).
    pub fn payload_bytes(&self) -> u64 {
        match self {
            WriteOp::PutImage { jpeg, .. } => jpeg.len() as u64,
            WriteOp::PutTelemetry {
                samples, alarms, ..
            } => ((samples.len() + alarms.len()) as u64).saturating_mul(32),
            _ => 0,
        }
    }

    /// The request's time (server receive time), if it carries one.
    pub fn at_ms(&self) -> Option<i64> {
        match self {
            WriteOp::InstrumentHello { at_ms, .. }
            | WriteOp::RegisterDish { at_ms, .. }
            | WriteOp::PutImage { at_ms, .. }
            | WriteOp::PutTelemetry { at_ms, .. }
            | WriteOp::Edit { at_ms, .. }
            | WriteOp::AuditDenied { at_ms, .. }
            | WriteOp::UserAdd { at_ms, .. }
            | WriteOp::UserUpdate { at_ms, .. }
            | WriteOp::LoginAttempt { at_ms, .. }
            | WriteOp::ApiKeyCreate { at_ms, .. }
            | WriteOp::ApiKeyRevoke { at_ms, .. } => Some(*at_ms),
            WriteOp::ResetInstrumentSecret { .. } | WriteOp::ImsRemove { .. } => None,
            WriteOp::InstrumentRename { at_ms, .. } => Some(*at_ms),
        }
    }

    /// Checks the op against `limits` without touching the database.
    pub fn validate(&self) -> Result<(), WriteError> {
        match self {
            WriteOp::InstrumentHello {
                serial,
                model,
                firmware,
                presented_secret,
                new_secret,
                ..
            } => {
                text("serial", serial, Required::Yes)?;
                text("model", model, Required::No)?;
                text("firmware", firmware, Required::No)?;
                text("new secret", new_secret, Required::Yes)?;
                match presented_secret {
                    Some(secret) => text("presented secret", secret, Required::No),
                    None => Ok(()),
                }
            }
            WriteOp::ResetInstrumentSecret { serial } => text("serial", serial, Required::Yes),
            WriteOp::InstrumentRename {
                actor,
                serial,
                display_name,
                ..
            } => {
                validate_actor(actor)?;
                text("serial", serial, Required::Yes)?;
                text("display name", display_name, Required::Yes)
            }
            WriteOp::RegisterDish { dish, .. } => validate_dish(dish),
            WriteOp::PutImage {
                dish_id,
                well,
                focal_plane,
                jpeg,
                ..
            } => {
                text("dish id", dish_id, Required::Yes)?;
                well_number(*well)?;
                if !(limits::FOCAL_PLANE_MIN..=limits::FOCAL_PLANE_MAX).contains(focal_plane) {
                    return Err(invalid(format!(
                        "focal plane {focal_plane} is outside {}..={}",
                        limits::FOCAL_PLANE_MIN,
                        limits::FOCAL_PLANE_MAX
                    )));
                }
                if !(limits::JPEG_BYTES_MIN..=limits::JPEG_BYTES_MAX).contains(&jpeg.len()) {
                    return Err(invalid(format!(
                        "image of {} bytes is outside {}..={} bytes",
                        jpeg.len(),
                        limits::JPEG_BYTES_MIN,
                        limits::JPEG_BYTES_MAX
                    )));
                }
                Ok(())
            }
            WriteOp::PutTelemetry {
                samples, alarms, ..
            } => validate_telemetry(samples, alarms),
            WriteOp::ImsRemove { ids } => {
                if ids.len() > limits::IMS_REMOVE_IDS_MAX {
                    return Err(invalid(format!(
                        "{} queue ids exceed the {} allowed per request",
                        ids.len(),
                        limits::IMS_REMOVE_IDS_MAX
                    )));
                }
                Ok(())
            }
            WriteOp::Edit {
                actor,
                edit,
                idempotency,
                ..
            } => {
                validate_actor(actor)?;
                if let Some(idempotency) = idempotency {
                    text(
                        "idempotency principal",
                        &idempotency.principal,
                        Required::Yes,
                    )?;
                    text("Idempotency-Key", &idempotency.key, Required::Yes)?;
                }
                edit.validate()
            }
            WriteOp::ApiKeyCreate {
                actor,
                key_id,
                name,
                ..
            } => {
                validate_actor(actor)?;
                key_id_text(key_id)?;
                text("API key name", name, Required::Yes)
            }
            WriteOp::ApiKeyRevoke { actor, key_id, .. } => {
                validate_actor(actor)?;
                key_id_text(key_id)
            }
            WriteOp::AuditDenied {
                actor,
                action,
                target,
                attempted,
                ..
            } => {
                validate_actor(actor)?;
                text("action", action, Required::Yes)?;
                text("target", target, Required::No)?;
                comment_text(attempted)
            }
            WriteOp::UserAdd {
                actor,
                name,
                password_hash,
                ..
            } => {
                validate_actor(actor)?;
                user_name(name)?;
                hash_text(password_hash)
            }
            WriteOp::UserUpdate {
                actor,
                name,
                change,
                ..
            } => {
                validate_actor(actor)?;
                user_name(name)?;
                match change {
                    UserChange::Password(hash) => hash_text(hash),
                    _ => Ok(()),
                }
            }
            WriteOp::LoginAttempt {
                name,
                computer,
                lockout_ms,
                ..
            } => {
                user_name(name)?;
                text("computer name", computer, Required::No)?;
                if *lockout_ms < 0 {
                    return Err(invalid("lock-out duration is negative".into()));
                }
                Ok(())
            }
        }
    }
}

fn validate_actor(actor: &Actor) -> Result<(), WriteError> {
    text("user name", &actor.user, Required::Yes)?;
    text("computer name", &actor.computer, Required::No)
}

fn validate_patient(patient: &PatientRef) -> Result<(), WriteError> {
    text("patient id", &patient.patient_id, Required::Yes)?;
    text("first name", &patient.first_name, Required::No)?;
    text("last name", &patient.last_name, Required::No)?;
    date_of_birth(&patient.date_of_birth)
}

/// A user name: 1 to 64 bytes, no control characters and no white space at either end.
pub fn user_name(name: &str) -> Result<(), WriteError> {
    if name.is_empty() || name.len() > limits::USER_NAME_BYTES_MAX {
        return Err(invalid(format!(
            "a user name has 1 to {} bytes",
            limits::USER_NAME_BYTES_MAX
        )));
    }
    if name.chars().any(char::is_control) || name.trim() != name {
        return Err(invalid(
            "a user name has no control characters and no spaces at either end".into(),
        ));
    }
    Ok(())
}

fn hash_text(hash: &str) -> Result<(), WriteError> {
    if !hash.starts_with("$argon2id$") || hash.len() > limits::PASSWORD_HASH_BYTES_MAX {
        return Err(invalid(
            "the password hash is not an argon2id PHC string".into(),
        ));
    }
    Ok(())
}

/// An API key id: 16 lowercase hex characters.
fn key_id_text(key_id: &str) -> Result<(), WriteError> {
    let hex = key_id.len() == 16
        && key_id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if hex {
        Ok(())
    } else {
        Err(invalid(format!(
            "API key id {key_id:?} is not 16 lowercase hex characters"
        )))
    }
}

fn instant(what: &str, at_ms: i64) -> Result<(), WriteError> {
    if (0..=limits::INSTANT_MS_MAX).contains(&at_ms) {
        Ok(())
    } else {
        Err(invalid(format!("{what} {at_ms} ms is outside 1970..2286")))
    }
}

fn comment_text(comment: &str) -> Result<(), WriteError> {
    if comment.len() > limits::COMMENT_BYTES_MAX {
        return Err(invalid(format!(
            "comment has {} bytes, more than {}",
            comment.len(),
            limits::COMMENT_BYTES_MAX
        )));
    }
    Ok(())
}

fn validate_dish(dish: &DishRegistration) -> Result<(), WriteError> {
    text("dish id", &dish.dish_id, Required::Yes)?;
    validate_patient(&dish.patient)?;
    text("treatment name", &dish.treatment_name, Required::Yes)?;
    if dish.wells.len() > limits::WELLS_PER_DISH_MAX {
        return Err(invalid(format!(
            "{} wells exceed the {} wells a dish may have",
            dish.wells.len(),
            limits::WELLS_PER_DISH_MAX
        )));
    }
    let mut wells = BTreeSet::new();
    let mut embryo_ids = BTreeSet::new();
    for well in &dish.wells {
        well_number(well.well)?;
        text("embryo id", &well.embryo_id, Required::Yes)?;
        if !wells.insert(well.well) {
            return Err(invalid(format!("well {} is listed twice", well.well)));
        }
        if !embryo_ids.insert(well.embryo_id.as_str()) {
            return Err(invalid(format!(
                "embryo id {:?} is listed for two wells",
                well.embryo_id
            )));
        }
    }
    Ok(())
}

fn validate_telemetry(
    samples: &[TelemetrySample],
    alarms: &[AlarmInput],
) -> Result<(), WriteError> {
    if alarms.len() > limits::ALARMS_PER_OP_MAX {
        return Err(invalid(format!(
            "{} alarms exceed the {} allowed per request",
            alarms.len(),
            limits::ALARMS_PER_OP_MAX
        )));
    }
    for alarm in alarms {
        text("alarm code", &alarm.code, Required::Yes)?;
        if alarm.text.len() > limits::ALARM_TEXT_BYTES_MAX {
            return Err(invalid(format!(
                "alarm {:?} has a text of {} bytes, more than {}",
                alarm.code,
                alarm.text.len(),
                limits::ALARM_TEXT_BYTES_MAX
            )));
        }
        if !(1..=3).contains(&alarm.severity) {
            return Err(invalid(format!(
                "alarm {:?} has severity {}; expected 1, 2 or 3",
                alarm.code, alarm.severity
            )));
        }
    }
    if samples.len() > limits::TELEMETRY_SAMPLES_PER_OP_MAX {
        return Err(invalid(format!(
            "{} telemetry samples exceed the {} allowed per request",
            samples.len(),
            limits::TELEMETRY_SAMPLES_PER_OP_MAX
        )));
    }
    for sample in samples {
        text("telemetry channel", &sample.channel, Required::Yes)?;
        if !sample.value.is_finite() {
            return Err(invalid(format!(
                "telemetry channel {:?} has a non-finite value",
                sample.channel
            )));
        }
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Required {
    Yes,
    No,
}

fn text(what: &str, value: &str, required: Required) -> Result<(), WriteError> {
    if required == Required::Yes && value.is_empty() {
        return Err(invalid(format!("{what} is empty")));
    }
    if value.len() > limits::TEXT_BYTES_MAX {
        return Err(invalid(format!(
            "{what} has {} bytes, more than {}",
            value.len(),
            limits::TEXT_BYTES_MAX
        )));
    }
    Ok(())
}

fn well_number(well: u32) -> Result<(), WriteError> {
    if (limits::WELL_MIN..=limits::WELL_MAX).contains(&well) {
        Ok(())
    } else {
        Err(invalid(format!(
            "well {well} is outside {}..={}",
            limits::WELL_MIN,
            limits::WELL_MAX
        )))
    }
}

/// `yyyy-mm-dd`, a date that exists, or empty.
fn date_of_birth(value: &str) -> Result<(), WriteError> {
    if value.is_empty() {
        return Ok(());
    }
    let bytes = value.as_bytes();
    let shape_ok = bytes.len() == 10
        && bytes[4] == b'-'
        && bytes[7] == b'-'
        && bytes
            .iter()
            .enumerate()
            .all(|(i, b)| i == 4 || i == 7 || b.is_ascii_digit());
    if !shape_ok {
        return Err(invalid(format!(
            "date of birth {value:?} is not yyyy-mm-dd"
        )));
    }
    let number = |range: std::ops::Range<usize>| -> u32 {
        value[range].parse().unwrap_or(0) // Digits were checked above.
    };
    let (year, month, day) = (number(0..4), number(5..7), number(8..10));
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => 0,
    };
    if (1..=days_in_month).contains(&day) {
        Ok(())
    } else {
        Err(invalid(format!(
            "date of birth {value:?} is not yyyy-mm-dd"
        )))
    }
}

fn invalid(message: String) -> WriteError {
    WriteError::InvalidInput(message)
}

/// Compact, secret-free Debug: secrets are never printed and images print their length only.
impl fmt::Debug for WriteOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteOp::InstrumentHello {
                serial,
                model,
                firmware,
                presented_secret,
                at_ms,
                ..
            } => f
                .debug_struct("InstrumentHello")
                .field("serial", serial)
                .field("model", model)
                .field("firmware", firmware)
                .field(
                    "presented_secret",
                    &presented_secret.as_ref().map(|_| "<redacted>"),
                )
                .field("at_ms", at_ms)
                .finish_non_exhaustive(),
            WriteOp::InstrumentRename {
                serial,
                display_name,
                ..
            } => f
                .debug_struct("InstrumentRename")
                .field("serial", serial)
                .field("display_name", display_name)
                .finish_non_exhaustive(),
            WriteOp::ResetInstrumentSecret { serial } => f
                .debug_struct("ResetInstrumentSecret")
                .field("serial", serial)
                .finish(),
            WriteOp::RegisterDish {
                instrument_id,
                dish,
                at_ms,
            } => f
                .debug_struct("RegisterDish")
                .field("instrument_id", instrument_id)
                .field("dish_id", &dish.dish_id)
                .field("wells", &dish.wells.len())
                .field("at_ms", at_ms)
                .finish_non_exhaustive(),
            WriteOp::PutImage {
                instrument_id,
                dish_id,
                well,
                focal_plane,
                acquired_at_ms,
                jpeg,
                at_ms,
            } => f
                .debug_struct("PutImage")
                .field("instrument_id", instrument_id)
                .field("dish_id", dish_id)
                .field("well", well)
                .field("focal_plane", focal_plane)
                .field("acquired_at_ms", acquired_at_ms)
                .field("jpeg_bytes", &jpeg.len())
                .field("at_ms", at_ms)
                .finish(),
            WriteOp::PutTelemetry {
                instrument_id,
                samples,
                alarms,
                ims,
                at_ms,
            } => f
                .debug_struct("PutTelemetry")
                .field("instrument_id", instrument_id)
                .field("samples", &samples.len())
                .field("alarms", &alarms.len())
                .field("ims", &ims.is_some())
                .field("at_ms", at_ms)
                .finish(),
            WriteOp::ImsRemove { ids } => f
                .debug_struct("ImsRemove")
                .field("ids", &ids.len())
                .finish(),
            WriteOp::Edit {
                actor,
                edit,
                idempotency,
                at_ms,
            } => f
                .debug_struct("Edit")
                .field("user", &actor.user)
                .field("action", &edit.action())
                .field("idempotent", &idempotency.is_some())
                .field("at_ms", at_ms)
                .finish_non_exhaustive(),
            WriteOp::ApiKeyCreate { key_id, scope, .. } => f
                .debug_struct("ApiKeyCreate")
                .field("key_id", key_id)
                .field("scope", scope)
                .finish_non_exhaustive(),
            WriteOp::ApiKeyRevoke { key_id, .. } => f
                .debug_struct("ApiKeyRevoke")
                .field("key_id", key_id)
                .finish_non_exhaustive(),
            WriteOp::AuditDenied {
                actor,
                action,
                at_ms,
                ..
            } => f
                .debug_struct("AuditDenied")
                .field("user", &actor.user)
                .field("action", action)
                .field("at_ms", at_ms)
                .finish_non_exhaustive(),
            WriteOp::UserAdd { name, rights, .. } => f
                .debug_struct("UserAdd")
                .field("name", name)
                .field("rights", rights)
                .finish_non_exhaustive(),
            WriteOp::UserUpdate { name, change, .. } => {
                let change = match change {
                    UserChange::Password(_) => "password",
                    UserChange::Disabled(true) => "disable",
                    UserChange::Disabled(false) => "enable",
                    UserChange::Unlock => "unlock",
                    UserChange::Rights(_) => "rights",
                };
                f.debug_struct("UserUpdate")
                    .field("name", name)
                    .field("change", &change)
                    .finish_non_exhaustive()
            }
            WriteOp::LoginAttempt { name, success, .. } => f
                .debug_struct("LoginAttempt")
                .field("name", name)
                .field("success", success)
                .finish_non_exhaustive(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(well: u32, focal_plane: i32, jpeg_bytes: usize) -> WriteOp {
        WriteOp::PutImage {
            instrument_id: 1,
            dish_id: "D1".into(),
            well,
            focal_plane,
            acquired_at_ms: 0,
            jpeg: ImageBytes::new(bytes::Bytes::from(vec![1u8; jpeg_bytes])),
            at_ms: 0,
        }
    }

    #[test]
    fn image_bounds() {
        assert!(image(1, 0, 1).validate().is_ok());
        assert!(image(1024, 1000, 1).validate().is_ok());
        assert!(image(1, -1000, limits::JPEG_BYTES_MAX).validate().is_ok());
        for op in [
            image(0, 0, 1),
            image(1025, 0, 1),
            image(1, 1001, 1),
            image(1, -1001, 1),
            image(1, 0, 0),
            image(1, 0, limits::JPEG_BYTES_MAX + 1),
        ] {
            assert_eq!(op.validate().unwrap_err().code(), "invalid_input", "{op:?}");
        }
    }

    #[test]
    fn dates_of_birth() {
        for good in ["", "1985-02-28", "2000-12-31", "2000-02-29", "1996-02-29"] {
            assert!(date_of_birth(good).is_ok(), "{good}");
        }
        for bad in [
            "1985.02.28",
            "1985-13-01",
            "1985-00-10",
            "85-02-28",
            "1985-02-2x",
            "1985-02-31",
            "1900-02-29",
            "1985-04-31",
        ] {
            assert!(date_of_birth(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn debug_never_shows_secrets() {
        let op = WriteOp::InstrumentHello {
            serial: "S1".into(),
            model: "M".into(),
            firmware: "F".into(),
            presented_secret: Some("hunter2-presented".into()),
            new_secret: "hunter2-new".into(),
            at_ms: 0,
        };
        let text = format!("{op:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("S1"));
    }

    #[test]
    fn long_text_is_refused() {
        let op = WriteOp::ResetInstrumentSecret {
            serial: "x".repeat(limits::TEXT_BYTES_MAX + 1),
        };
        assert!(matches!(op.validate(), Err(WriteError::InvalidInput(_))));
    }
}
