//! Write operations: one type per operation with its outcome and refusal (`Operation`), their
//! inputs, and input validation against `limits`.

pub use crate::apply::Batch;
use crate::error::{
    AdminRefusal, Current, EditRefusal, HelloRefusal, ImageRefusal, Never, Refusal, Stale,
    StaleTarget, StorageError, UnknownInstrument, WriteError,
};
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

/// One write operation for the writer thread: a value with its own outcome and refusal types
/// (`Outcome`, `Refusal`), validated against `limits` before the database is touched, and
/// applied inside the writer's batch transaction. redb's `TableDefinition<K, V>` is the model:
/// the types say what goes in and what comes out.
///
/// Each operation in this module documents its rules. Submit one with
/// [`crate::Writer::try_submit`]; its completion receives [`OpResult<Self>`].
pub trait Operation: fmt::Debug + Send + Sized + 'static {
    /// What the operation reports when it was applied (or found already applied).
    type Outcome: fmt::Debug + Send + 'static;
    /// Why the operation's own rules may refuse it ([`Never`] when they never do).
    type Refusal: Refusal;

    /// Checks the operation against `limits` without touching the database; the message says
    /// what is wrong. An operation that fails it is answered `WriteError::InvalidInput`.
    fn validate(&self) -> Result<(), String>;

    /// Check phase (reads only; a refusal returns here having written nothing but the audit
    /// row the operation documents), then apply phase (writes; only a storage error can fail
    /// it, and that aborts the whole batch).
    #[doc(hidden)]
    fn apply(&self, batch: &mut Batch<'_>) -> Applied<Self>;

    /// The request's time (server receive time), if it carries one.
    fn at_ms(&self) -> Option<i64>;

    /// The bytes this operation adds to a batch, for `batch_bytes_max` (JPEG bytes for images).
    fn payload_bytes(&self) -> u64 {
        0
    }

    /// Images go in the image lane; everything else is small and never waits behind
    /// megabytes of images (see `crate::writer`).
    fn lane(&self) -> Lane {
        Lane::Small
    }

    /// Called after the batch committed, with a reader of the state right after it: fills in
    /// what the answer reports of the committed state (a stale edit's current record).
    #[doc(hidden)]
    fn after_commit(_result: &mut OpResult<Self>, _reader: &crate::Reader) {}

    /// True when `after_commit` has something to do for `result` (the writer opens a reader
    /// after a commit only then).
    #[doc(hidden)]
    fn wants_after_commit(_result: &OpResult<Self>) -> bool {
        false
    }
}

/// The result an operation's completion receives.
pub type OpResult<O> = Result<<O as Operation>::Outcome, WriteError<<O as Operation>::Refusal>>;

/// The result of applying an operation inside the batch: the outer error is a storage failure
/// that aborts the batch, the inner result the operation's own.
pub type Applied<O> = Result<OpResult<O>, StorageError>;

/// Which lane of the writer an operation goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lane {
    /// Image records: megabytes per batch written to the volumes.
    Image,
    /// Everything else: annotation saves, API writes, dish registrations, telemetry, users.
    Small,
}

/// First message of every incubator connection. Unknown serial: record the instrument, store
/// the SHA-256 of `new_secret` and issue it. Known serial: `presented_secret` must hash to the
/// confirmed or the issued secret, else `HelloRefusal::AuthFailed`; model, firmware and
/// last-seen are updated. The HELLO that led to an issued secret is answered with a fresh one
/// (its HELLO_OK may have been lost), but not while the connection the secret was issued on
/// is still open (`issued_connection_open`): then it is `HelloRefusal::EnrolmentInProgress`.
/// With `Enrolment::Approve` an unknown serial is `HelloRefusal::EnrolmentPending` until an
/// administrator approves it (`InstrumentApprove`). A refused HELLO writes nothing.
pub struct InstrumentHello {
    pub serial: String,
    pub model: String,
    pub firmware: String,
    pub presented_secret: Option<String>,
    pub new_secret: String,
    /// Another connection of this serial is open and has not confirmed the secret it was
    /// issued.
    pub issued_connection_open: bool,
    /// Whether a serial number never seen is recorded at its first HELLO.
    pub enrolment: Enrolment,
    /// The instrument's own number (HELLO.instrument_number); 0 when it does not say. It
    /// replaces a number the server counted or the instrument gave before, not one an
    /// administrator set.
    pub number: u32,
    pub at_ms: i64,
}

/// How a serial number never seen before is enrolled (`[IncubatorTransport] enrolment`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Enrolment {
    /// Recorded at its first HELLO and issued a secret.
    #[default]
    Open,
    /// Refused (`enrolment_pending`) until an administrator approves the serial number.
    Approve,
}

impl Enrolment {
    /// The configuration value: `open` or `approve`.
    pub fn as_str(self) -> &'static str {
        match self {
            Enrolment::Open => "open",
            Enrolment::Approve => "approve",
        }
    }

    pub fn parse(text: &str) -> Option<Enrolment> {
        match text {
            "open" => Some(Enrolment::Open),
            "approve" => Some(Enrolment::Approve),
            _ => None,
        }
    }
}

/// Admin: records a serial number that has not connected yet (or waits as pending) as an
/// instrument with no secret, so its next HELLO is accepted like a first connection and
/// issued one. `AdminRefusal::AlreadyExists` when the serial is known. Audited.
#[derive(Debug)]
pub struct InstrumentApprove {
    pub actor: Actor,
    pub serial: String,
    /// The model its refused HELLO named, if known (the next HELLO records its own).
    pub model: String,
    pub at_ms: i64,
}

/// The connection an instrument was issued a secret on sent its first request: the
/// instrument stored the secret (it must, before any request), so it is the confirmed one.
/// Nothing changes when `secret_sha256` is no longer the issued secret (reset meanwhile).
#[derive(Debug)]
pub struct ConfirmInstrumentSecret {
    pub instrument_id: u64,
    pub secret_sha256: [u8; 32],
}

/// Admin: forget the secret; the next HELLO of that serial is issued a new one.
#[derive(Debug)]
pub struct ResetInstrumentSecret {
    pub serial: String,
}

/// Changes an instrument's display name. Its identity (serial number) and every image, dish
/// and annotation stay as they are: names are labels, never keys.
#[derive(Debug)]
pub struct InstrumentRename {
    pub actor: Actor,
    pub serial: String,
    pub display_name: String,
    pub at_ms: i64,
}

/// Admin: sets an instrument's number (the `I<number>` of its embryo ids, `InstrumentNumber`
/// in the original API). From then on the instrument's HELLO no longer changes it. Audited.
#[derive(Debug)]
pub struct InstrumentRenumber {
    pub actor: Actor,
    pub serial: String,
    pub number: u32,
    pub at_ms: i64,
}

/// Create or update a culture dish (key: instrument_id + dish_id), creating its patient and
/// treatment when missing. An embryo id, once assigned to (dish, well), never changes.
pub struct RegisterDish {
    pub instrument_id: u64,
    pub dish: DishRegistration,
    pub at_ms: i64,
}

/// One image. Idempotent by (instrument, dish, well, focal_plane, acquired_at_ms): the same
/// bytes again are a duplicate, other bytes under the same key are refused
/// (`ImageRefusal::Conflict`) and the stored image is kept.
pub struct PutImage {
    pub instrument_id: u64,
    pub dish_id: String,
    pub well: u32,
    pub focal_plane: i32,
    pub acquired_at_ms: i64,
    pub jpeg: ImageBytes,
    pub at_ms: i64,
}

/// Telemetry samples and alarms. Idempotent by (instrument, channel, at_ms) per sample and
/// (instrument, code, raised_at_ms) per alarm. With `ims`, what is new and allowed is also
/// queued for the monitoring uploader (see `crate::ims`).
pub struct PutTelemetry {
    pub instrument_id: u64,
    pub samples: Vec<TelemetrySample>,
    pub alarms: Vec<AlarmInput>,
    pub ims: Option<ImsQueueing>,
    pub at_ms: i64,
}

/// The monitoring endpoint accepted these queue records: remove them. Ids no longer queued
/// (dropped meanwhile) are skipped.
pub struct ImsRemove {
    pub ids: Vec<u64>,
}

/// A change to clinical data from a viewer or the public API. Every edit of an existing row
/// names the version the client last saw; a stale one is refused with `EditRefusal::Stale`
/// (carrying the current record) and audited as a conflict.
///
/// With `idempotency`, the outcome is recorded under the key in the same transaction: the
/// same key and request again is answered with the recorded outcome (`replayed`) and changes
/// nothing; the same key with another request is refused (`IdempotencyKeyReused`).
pub struct Edit {
    pub actor: Actor,
    pub edit: ClinicalEdit,
    pub idempotency: Option<Idempotency>,
    pub at_ms: i64,
}

/// Creates a public API key. The caller makes the secret and passes its SHA-256 only.
pub struct ApiKeyCreate {
    pub actor: Actor,
    pub key_id: String,
    pub name: String,
    pub scope: ApiScope,
    pub secret_sha256: [u8; 32],
    pub at_ms: i64,
}

/// Revokes a public API key; it can never be used again. Revoking a revoked key changes
/// nothing.
#[derive(Debug)]
pub struct ApiKeyRevoke {
    pub actor: Actor,
    pub key_id: String,
    pub at_ms: i64,
}

/// Records a refused attempt (the user lacked the right) in the audit trail.
#[derive(Debug)]
pub struct AuditDenied {
    pub actor: Actor,
    pub action: String,
    pub entity: ChangeEntity,
    pub target: String,
    pub attempted: String,
    pub at_ms: i64,
}

/// Creates a user. `password_hash` is an argon2id PHC string made by the caller.
pub struct UserAdd {
    pub actor: Actor,
    pub name: String,
    pub password_hash: String,
    pub rights: Rights,
    pub at_ms: i64,
}

/// Imports a model document (`es_models`): a name not seen before becomes version 1; a
/// document that differs from its name's newest version becomes the next version (a version
/// never changes once stored); the same document again is a no-op (`created: false`).
/// Audited as `model.import`.
#[derive(Debug)]
pub struct ModelImport {
    pub actor: Actor,
    pub document: String,
    pub at_ms: i64,
}

/// A model document stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelImported {
    pub name: String,
    pub version: u32,
    /// False when the document was the newest version already.
    pub created: bool,
}

impl Operation for ModelImport {
    type Outcome = ModelImported;
    type Refusal = Never;

    fn validate(&self) -> Result<(), String> {
        validate_actor(&self.actor)?;
        es_models::Model::from_json(self.document.as_bytes())
            .map(|_| ())
            .map_err(|error| error.to_string())
    }

    fn apply(&self, batch: &mut Batch<'_>) -> Applied<Self> {
        batch.model_import(&self.actor, &self.document, self.at_ms)
    }

    fn at_ms(&self) -> Option<i64> {
        Some(self.at_ms)
    }

    fn payload_bytes(&self) -> u64 {
        self.document.len() as u64
    }
}

/// Changes a user's password, rights, lock or disabled state.
#[derive(Debug)]
pub struct UserUpdate {
    pub actor: Actor,
    pub name: String,
    pub change: UserChange,
    pub at_ms: i64,
}

/// The outcome of a login attempt whose password was checked by the caller. A failure
/// raises the failure count of the account from `address`; the `failures_max`-th locks the
/// account for `lockout_ms` from that address only (audited as `user.lockout`). A success
/// clears that address's count.
#[derive(Debug)]
pub struct LoginAttempt {
    pub name: String,
    pub computer: String,
    /// The source address (IP) the attempt came from: failures lock the account for it only.
    pub address: String,
    pub success: bool,
    pub failures_max: u32,
    pub lockout_ms: i64,
    pub at_ms: i64,
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
    /// Applies a model (the `version` given, else its newest) to the embryo and stores the
    /// result (and, for a category or a score, the embryo's score of that model). The result
    /// is recomputed whenever one of the embryo's annotations changes.
    Evaluate {
        embryo_id: String,
        expected_version: u64,
        model: String,
        version: Option<u32>,
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
            ClinicalEdit::Evaluate { .. } => "embryo.evaluate",
            ClinicalEdit::CreateTransfer { .. } => "transfer.create",
            ClinicalEdit::UpdateTransfer { .. } => "transfer.update",
        }
    }

    fn validate(&self) -> Result<(), String> {
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
                        return Err(format!(
                            "annotation event time {at} ms is outside 1970..2286"
                        ));
                    }
                }
                if annotation.value.is_empty() && annotation.event_at_ms.is_none() {
                    return Err(format!(
                        "annotation {} has neither a value nor an event time",
                        annotation.name
                    ));
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
            ClinicalEdit::Evaluate {
                embryo_id, model, ..
            } => {
                text("embryo id", embryo_id, Required::Yes)?;
                text("model name", model, Required::Yes)
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
                    return Err(format!(
                        "a transfer names 1 to {} embryos, not {}",
                        limits::EMBRYOS_PER_TRANSFER_MAX,
                        embryo_ids.len()
                    ));
                }
                let mut seen = BTreeSet::new();
                for embryo_id in embryo_ids {
                    text("embryo id", embryo_id, Required::Yes)?;
                    if !seen.insert(embryo_id) {
                        return Err(format!("embryo {embryo_id} is named twice in the transfer"));
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
                        return Err(format!(
                            "{what} must be at most {}",
                            limits::OUTCOME_COUNT_MAX
                        ));
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

#[derive(Clone, PartialEq, Eq)]
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
    /// `ICSI`, `IVF`, ...; empty when the incubator does not say.
    pub fertilization_method: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PatientRef {
    /// The clinic's medical record number.
    pub patient_id: String,
    pub first_name: String,
    pub last_name: String,
    /// `yyyy-mm-dd` or empty.
    pub date_of_birth: String,
    /// The original system's `PatientIDx` the patient came with; empty (the usual case) has
    /// the server mint one when it creates the patient. Ignored for a known patient.
    pub patient_idx: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WellRegistration {
    pub well: u32,
    pub embryo_id: String,
    /// The embryo's label (`EmbryoDescriptionID`, e.g. `AA1`); empty has the server label it
    /// (`tables::embryo_label`).
    pub label: String,
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
    /// The allowlist of the instrument's model: only samples on these channels enter the
    /// queue (the device catalog's monitoring channels).
    pub channels: &'static [&'static str],
    /// Only alarms with one of these codes enter the queue (the catalog's codes of the
    /// instrument's model).
    pub alarm_codes: &'static [&'static str],
}

/// One telemetry reading, e.g. channel `temperature_c`.
#[derive(Debug, Clone, PartialEq)]
pub struct TelemetrySample {
    pub channel: String,
    pub value: f64,
    pub at_ms: i64,
}

/// `InstrumentHello` accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstrumentAccepted {
    pub instrument_id: u64,
    /// A secret issued now (first HELLO, or after a reset), to be sent to the instrument.
    pub issued_secret: Option<String>,
}

/// `ConfirmInstrumentSecret` done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecretConfirmed {
    /// False when the secret was no longer the issued one.
    pub confirmed: bool,
}

/// `ResetInstrumentSecret` done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecretReset {
    /// False when no instrument has that serial number.
    pub existed: bool,
}

/// `RegisterDish` stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DishRegistered {
    pub dish_key: u64,
    pub created: bool,
    /// False when the registration was already stored exactly as given (a resend).
    pub changed: bool,
}

/// `PutImage` stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageStored {
    /// The same bytes were already stored under the key (a resend).
    pub duplicate: bool,
}

/// `PutTelemetry` stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TelemetryStored {
    pub samples: u32,
    /// True when every sample and alarm was already stored as given (a resend): nothing
    /// changed.
    pub duplicate: bool,
    /// Records added to the monitoring queue.
    pub ims_queued: u32,
    /// Samples and alarms kept but not queued (see `crate::ims`).
    pub ims_withheld: u32,
    /// Oldest queue records dropped to make room.
    pub ims_dropped: u32,
}

/// `ImsRemove` done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImsRemoved {
    pub removed: u32,
}

/// A clinical edit was applied and logged with change `change_seq`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edited {
    pub entity: ChangeEntity,
    pub key: u64,
    pub id: String,
    pub version: u64,
    pub change_seq: u64,
    /// The annotation added, changed or removed.
    pub annotation_id: Option<u64>,
    /// True when this is the recorded outcome of an earlier request with the same
    /// Idempotency-Key: nothing was changed now.
    pub replayed: bool,
}

/// `LoginAttempt` recorded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoginRecorded {
    /// True when the login is granted: the password was right and the account is neither
    /// disabled nor locked at the attempt's time.
    pub granted: bool,
    pub disabled: bool,
    /// The account is locked until then (0: not locked at the attempt's time).
    pub locked_until_ms: i64,
}

impl Operation for InstrumentHello {
    type Outcome = InstrumentAccepted;
    type Refusal = HelloRefusal;

    fn validate(&self) -> Result<(), String> {
        text("serial", &self.serial, Required::Yes)?;
        text("model", &self.model, Required::No)?;
        text("firmware", &self.firmware, Required::No)?;
        text("new secret", &self.new_secret, Required::Yes)?;
        match &self.presented_secret {
            Some(secret) => text("presented secret", secret, Required::No),
            None => Ok(()),
        }
    }

    fn apply(&self, batch: &mut Batch<'_>) -> Applied<Self> {
        batch.instrument_hello(self)
    }

    fn at_ms(&self) -> Option<i64> {
        Some(self.at_ms)
    }
}

impl Operation for ConfirmInstrumentSecret {
    type Outcome = SecretConfirmed;
    type Refusal = Never;

    fn validate(&self) -> Result<(), String> {
        Ok(())
    }

    fn apply(&self, batch: &mut Batch<'_>) -> Applied<Self> {
        batch.confirm_secret(self.instrument_id, &self.secret_sha256)
    }

    fn at_ms(&self) -> Option<i64> {
        None
    }
}

impl Operation for ResetInstrumentSecret {
    type Outcome = SecretReset;
    type Refusal = Never;

    fn validate(&self) -> Result<(), String> {
        text("serial", &self.serial, Required::Yes)
    }

    fn apply(&self, batch: &mut Batch<'_>) -> Applied<Self> {
        batch.reset_secret(&self.serial)
    }

    fn at_ms(&self) -> Option<i64> {
        None
    }
}

impl Operation for InstrumentApprove {
    type Outcome = ();
    type Refusal = AdminRefusal;

    fn validate(&self) -> Result<(), String> {
        validate_actor(&self.actor)?;
        text("serial", &self.serial, Required::Yes)?;
        text("model", &self.model, Required::No)
    }

    fn apply(&self, batch: &mut Batch<'_>) -> Applied<Self> {
        batch.instrument_approve(&self.actor, &self.serial, &self.model, self.at_ms)
    }

    fn at_ms(&self) -> Option<i64> {
        Some(self.at_ms)
    }
}

impl Operation for InstrumentRename {
    type Outcome = ();
    type Refusal = AdminRefusal;

    fn validate(&self) -> Result<(), String> {
        validate_actor(&self.actor)?;
        text("serial", &self.serial, Required::Yes)?;
        text("display name", &self.display_name, Required::Yes)
    }

    fn apply(&self, batch: &mut Batch<'_>) -> Applied<Self> {
        batch.instrument_rename(&self.actor, &self.serial, &self.display_name, self.at_ms)
    }

    fn at_ms(&self) -> Option<i64> {
        Some(self.at_ms)
    }
}

impl Operation for InstrumentRenumber {
    type Outcome = ();
    type Refusal = AdminRefusal;

    fn validate(&self) -> Result<(), String> {
        validate_actor(&self.actor)?;
        text("serial", &self.serial, Required::Yes)?;
        if self.number == 0 {
            return Err("an instrument number is at least 1".into());
        }
        Ok(())
    }

    fn apply(&self, batch: &mut Batch<'_>) -> Applied<Self> {
        batch.instrument_renumber(&self.actor, &self.serial, self.number, self.at_ms)
    }

    fn at_ms(&self) -> Option<i64> {
        Some(self.at_ms)
    }
}

impl Operation for RegisterDish {
    type Outcome = DishRegistered;
    type Refusal = UnknownInstrument;

    fn validate(&self) -> Result<(), String> {
        validate_dish(&self.dish)
    }

    fn apply(&self, batch: &mut Batch<'_>) -> Applied<Self> {
        batch.register_dish(self.instrument_id, &self.dish, self.at_ms)
    }

    fn at_ms(&self) -> Option<i64> {
        Some(self.at_ms)
    }
}

impl Operation for PutImage {
    type Outcome = ImageStored;
    type Refusal = ImageRefusal;

    fn validate(&self) -> Result<(), String> {
        text("dish id", &self.dish_id, Required::Yes)?;
        well_number(self.well)?;
        if !(limits::FOCAL_PLANE_MIN..=limits::FOCAL_PLANE_MAX).contains(&self.focal_plane) {
            return Err(format!(
                "focal plane {} is outside {}..={}",
                self.focal_plane,
                limits::FOCAL_PLANE_MIN,
                limits::FOCAL_PLANE_MAX
            ));
        }
        if !(limits::JPEG_BYTES_MIN..=limits::JPEG_BYTES_MAX).contains(&self.jpeg.len()) {
            return Err(format!(
                "image of {} bytes is outside {}..={} bytes",
                self.jpeg.len(),
                limits::JPEG_BYTES_MIN,
                limits::JPEG_BYTES_MAX
            ));
        }
        Ok(())
    }

    fn apply(&self, batch: &mut Batch<'_>) -> Applied<Self> {
        batch.put_image(self)
    }

    fn at_ms(&self) -> Option<i64> {
        Some(self.at_ms)
    }

    fn payload_bytes(&self) -> u64 {
        self.jpeg.len() as u64
    }

    fn lane(&self) -> Lane {
        Lane::Image
    }
}

impl Operation for PutTelemetry {
    type Outcome = TelemetryStored;
    type Refusal = UnknownInstrument;

    fn validate(&self) -> Result<(), String> {
        validate_telemetry(&self.samples, &self.alarms)
    }

    fn apply(&self, batch: &mut Batch<'_>) -> Applied<Self> {
        batch.put_telemetry(
            self.instrument_id,
            &self.samples,
            &self.alarms,
            self.ims,
            self.at_ms,
        )
    }

    fn at_ms(&self) -> Option<i64> {
        Some(self.at_ms)
    }

    fn payload_bytes(&self) -> u64 {
        ((self.samples.len() + self.alarms.len()) as u64).saturating_mul(32)
    }
}

impl Operation for ImsRemove {
    type Outcome = ImsRemoved;
    type Refusal = Never;

    fn validate(&self) -> Result<(), String> {
        if self.ids.len() > limits::IMS_REMOVE_IDS_MAX {
            return Err(format!(
                "{} queue ids exceed the {} allowed per request",
                self.ids.len(),
                limits::IMS_REMOVE_IDS_MAX
            ));
        }
        Ok(())
    }

    fn apply(&self, batch: &mut Batch<'_>) -> Applied<Self> {
        batch.ims_remove(&self.ids)
    }

    fn at_ms(&self) -> Option<i64> {
        None
    }
}

impl Operation for Edit {
    type Outcome = Edited;
    type Refusal = EditRefusal;

    fn validate(&self) -> Result<(), String> {
        validate_actor(&self.actor)?;
        if let Some(idempotency) = &self.idempotency {
            text(
                "idempotency principal",
                &idempotency.principal,
                Required::Yes,
            )?;
            text("Idempotency-Key", &idempotency.key, Required::Yes)?;
        }
        self.edit.validate()
    }

    fn apply(&self, batch: &mut Batch<'_>) -> Applied<Self> {
        batch.idempotent_edit(
            &self.actor,
            &self.edit,
            self.idempotency.as_ref(),
            self.at_ms,
        )
    }

    fn at_ms(&self) -> Option<i64> {
        Some(self.at_ms)
    }

    fn wants_after_commit(result: &OpResult<Self>) -> bool {
        matches!(result, Err(WriteError::Refused(EditRefusal::Stale(_))))
    }

    /// A stale edit is answered with the record as it is once the batch committed.
    fn after_commit(result: &mut OpResult<Self>, reader: &crate::Reader) {
        let Err(WriteError::Refused(EditRefusal::Stale(stale))) = result else {
            return;
        };
        match current_record(reader, stale) {
            Ok(current) => stale.current = current,
            Err(error) => {
                tracing::error!(code = error.code(), %error, "reading the current record of a stale edit failed");
            }
        }
    }
}

/// The record a stale edit names, as `reader` sees it.
fn current_record(reader: &crate::Reader, stale: &Stale) -> Result<Option<Current>, StorageError> {
    Ok(match &stale.target {
        StaleTarget::Patient(patient_id) => reader.patient(patient_id)?.map(Current::Patient),
        StaleTarget::Treatment { patient_id, name } => {
            reader.treatment(patient_id, name)?.map(Current::Treatment)
        }
        StaleTarget::Embryo(embryo_id) => reader
            .embryo(embryo_id)?
            .map(|record| Current::Embryo(Box::new(record))),
        StaleTarget::Transfer(transfer_key) => {
            reader.transfer(*transfer_key)?.map(Current::Transfer)
        }
    })
}

impl Operation for ApiKeyCreate {
    type Outcome = ();
    type Refusal = AdminRefusal;

    fn validate(&self) -> Result<(), String> {
        validate_actor(&self.actor)?;
        key_id_text(&self.key_id)?;
        text("API key name", &self.name, Required::Yes)
    }

    fn apply(&self, batch: &mut Batch<'_>) -> Applied<Self> {
        batch.api_key_create(
            &self.actor,
            &self.key_id,
            &self.name,
            self.scope,
            &self.secret_sha256,
            self.at_ms,
        )
    }

    fn at_ms(&self) -> Option<i64> {
        Some(self.at_ms)
    }
}

impl Operation for ApiKeyRevoke {
    type Outcome = ();
    type Refusal = AdminRefusal;

    fn validate(&self) -> Result<(), String> {
        validate_actor(&self.actor)?;
        key_id_text(&self.key_id)
    }

    fn apply(&self, batch: &mut Batch<'_>) -> Applied<Self> {
        batch.api_key_revoke(&self.actor, &self.key_id, self.at_ms)
    }

    fn at_ms(&self) -> Option<i64> {
        Some(self.at_ms)
    }
}

impl Operation for AuditDenied {
    type Outcome = ();
    type Refusal = Never;

    fn validate(&self) -> Result<(), String> {
        validate_actor(&self.actor)?;
        text("action", &self.action, Required::Yes)?;
        text("target", &self.target, Required::No)?;
        comment_text(&self.attempted)
    }

    fn apply(&self, batch: &mut Batch<'_>) -> Applied<Self> {
        batch.audit_denied(
            &self.actor,
            &self.action,
            self.entity,
            &self.target,
            &self.attempted,
            self.at_ms,
        )
    }

    fn at_ms(&self) -> Option<i64> {
        Some(self.at_ms)
    }
}

impl Operation for UserAdd {
    type Outcome = ();
    type Refusal = AdminRefusal;

    fn validate(&self) -> Result<(), String> {
        validate_actor(&self.actor)?;
        user_name(&self.name)?;
        hash_text(&self.password_hash)
    }

    fn apply(&self, batch: &mut Batch<'_>) -> Applied<Self> {
        batch.user_add(
            &self.actor,
            &self.name,
            &self.password_hash,
            self.rights,
            self.at_ms,
        )
    }

    fn at_ms(&self) -> Option<i64> {
        Some(self.at_ms)
    }
}

impl Operation for UserUpdate {
    type Outcome = ();
    type Refusal = AdminRefusal;

    fn validate(&self) -> Result<(), String> {
        validate_actor(&self.actor)?;
        user_name(&self.name)?;
        match &self.change {
            UserChange::Password(hash) => hash_text(hash),
            _ => Ok(()),
        }
    }

    fn apply(&self, batch: &mut Batch<'_>) -> Applied<Self> {
        batch.user_update(&self.actor, &self.name, &self.change, self.at_ms)
    }

    fn at_ms(&self) -> Option<i64> {
        Some(self.at_ms)
    }
}

impl Operation for LoginAttempt {
    type Outcome = LoginRecorded;
    type Refusal = AdminRefusal;

    fn validate(&self) -> Result<(), String> {
        user_name(&self.name)?;
        text("computer name", &self.computer, Required::No)?;
        text("source address", &self.address, Required::No)?;
        if self.lockout_ms < 0 {
            return Err("lock-out duration is negative".into());
        }
        Ok(())
    }

    fn apply(&self, batch: &mut Batch<'_>) -> Applied<Self> {
        batch.login_attempt(
            &self.name,
            &self.computer,
            &self.address,
            self.success,
            self.failures_max,
            self.lockout_ms,
            self.at_ms,
        )
    }

    fn at_ms(&self) -> Option<i64> {
        Some(self.at_ms)
    }
}

fn validate_actor(actor: &Actor) -> Result<(), String> {
    text("user name", &actor.user, Required::Yes)?;
    text("computer name", &actor.computer, Required::No)
}

fn validate_patient(patient: &PatientRef) -> Result<(), String> {
    text("patient id", &patient.patient_id, Required::Yes)?;
    text("first name", &patient.first_name, Required::No)?;
    text("last name", &patient.last_name, Required::No)?;
    patient_idx(&patient.patient_idx)?;
    date_of_birth(&patient.date_of_birth)
}

/// A `PatientIDx` a patient comes with: empty (the server mints one), or 1 to
/// `PATIENT_IDX_BYTES_MAX` letters, digits, `_`, `.` and `-`.
pub fn patient_idx(idx: &str) -> Result<(), String> {
    let allowed = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    if idx.len() > limits::PATIENT_IDX_BYTES_MAX || !idx.chars().all(allowed) {
        return Err(format!(
            "a PatientIDx has at most {} letters, digits, '_', '.' and '-'",
            limits::PATIENT_IDX_BYTES_MAX
        ));
    }
    Ok(())
}

fn short_text(what: &str, value: &str, bytes_max: usize) -> Result<(), String> {
    if value.len() > bytes_max || value.chars().any(char::is_control) {
        return Err(format!(
            "{what} has at most {bytes_max} bytes and no control characters"
        ));
    }
    Ok(())
}

/// A user name: 1 to 64 bytes, no control characters and no white space at either end.
pub fn user_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > limits::USER_NAME_BYTES_MAX {
        return Err(format!(
            "a user name has 1 to {} bytes",
            limits::USER_NAME_BYTES_MAX
        ));
    }
    if name.chars().any(char::is_control) || name.trim() != name {
        return Err("a user name has no control characters and no spaces at either end".into());
    }
    Ok(())
}

fn hash_text(hash: &str) -> Result<(), String> {
    if !hash.starts_with("$argon2id$") || hash.len() > limits::PASSWORD_HASH_BYTES_MAX {
        return Err("the password hash is not an argon2id PHC string".into());
    }
    Ok(())
}

/// An API key id: 16 lowercase hex characters.
fn key_id_text(key_id: &str) -> Result<(), String> {
    let hex = key_id.len() == 16
        && key_id
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if hex {
        Ok(())
    } else {
        Err(format!(
            "API key id {key_id:?} is not 16 lowercase hex characters"
        ))
    }
}

fn instant(what: &str, at_ms: i64) -> Result<(), String> {
    if (0..=limits::INSTANT_MS_MAX).contains(&at_ms) {
        Ok(())
    } else {
        Err(format!("{what} {at_ms} ms is outside 1970..2286"))
    }
}

fn comment_text(comment: &str) -> Result<(), String> {
    if comment.len() > limits::COMMENT_BYTES_MAX {
        return Err(format!(
            "comment has {} bytes, more than {}",
            comment.len(),
            limits::COMMENT_BYTES_MAX
        ));
    }
    Ok(())
}

fn validate_dish(dish: &DishRegistration) -> Result<(), String> {
    text("dish id", &dish.dish_id, Required::Yes)?;
    validate_patient(&dish.patient)?;
    text("treatment name", &dish.treatment_name, Required::Yes)?;
    short_text(
        "the fertilization method",
        &dish.fertilization_method,
        limits::FERTILIZATION_METHOD_BYTES_MAX,
    )?;
    if dish.wells.len() > limits::WELLS_PER_DISH_MAX {
        return Err(format!(
            "{} wells exceed the {} wells a dish may have",
            dish.wells.len(),
            limits::WELLS_PER_DISH_MAX
        ));
    }
    let mut wells = BTreeSet::new();
    let mut embryo_ids = BTreeSet::new();
    for well in &dish.wells {
        well_number(well.well)?;
        text("embryo id", &well.embryo_id, Required::Yes)?;
        short_text(
            "an embryo label",
            &well.label,
            limits::EMBRYO_LABEL_BYTES_MAX,
        )?;
        if !wells.insert(well.well) {
            return Err(format!("well {} is listed twice", well.well));
        }
        if !embryo_ids.insert(well.embryo_id.as_str()) {
            return Err(format!(
                "embryo id {:?} is listed for two wells",
                well.embryo_id
            ));
        }
    }
    Ok(())
}

fn validate_telemetry(samples: &[TelemetrySample], alarms: &[AlarmInput]) -> Result<(), String> {
    if alarms.len() > limits::ALARMS_PER_OP_MAX {
        return Err(format!(
            "{} alarms exceed the {} allowed per request",
            alarms.len(),
            limits::ALARMS_PER_OP_MAX
        ));
    }
    for alarm in alarms {
        text("alarm code", &alarm.code, Required::Yes)?;
        if alarm.text.len() > limits::ALARM_TEXT_BYTES_MAX {
            return Err(format!(
                "alarm {:?} has a text of {} bytes, more than {}",
                alarm.code,
                alarm.text.len(),
                limits::ALARM_TEXT_BYTES_MAX
            ));
        }
        if !(1..=3).contains(&alarm.severity) {
            return Err(format!(
                "alarm {:?} has severity {}; expected 1, 2 or 3",
                alarm.code, alarm.severity
            ));
        }
    }
    if samples.len() > limits::TELEMETRY_SAMPLES_PER_OP_MAX {
        return Err(format!(
            "{} telemetry samples exceed the {} allowed per request",
            samples.len(),
            limits::TELEMETRY_SAMPLES_PER_OP_MAX
        ));
    }
    for sample in samples {
        text("telemetry channel", &sample.channel, Required::Yes)?;
        if !sample.value.is_finite() {
            return Err(format!(
                "telemetry channel {:?} has a non-finite value",
                sample.channel
            ));
        }
    }
    Ok(())
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Required {
    Yes,
    No,
}

fn text(what: &str, value: &str, required: Required) -> Result<(), String> {
    if required == Required::Yes && value.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if value.len() > limits::TEXT_BYTES_MAX {
        return Err(format!(
            "{what} has {} bytes, more than {}",
            value.len(),
            limits::TEXT_BYTES_MAX
        ));
    }
    Ok(())
}

fn well_number(well: u32) -> Result<(), String> {
    if (limits::WELL_MIN..=limits::WELL_MAX).contains(&well) {
        Ok(())
    } else {
        Err(format!(
            "well {well} is outside {}..={}",
            limits::WELL_MIN,
            limits::WELL_MAX
        ))
    }
}

/// `yyyy-mm-dd`, a date that exists, or empty.
fn date_of_birth(value: &str) -> Result<(), String> {
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
        return Err(format!("date of birth {value:?} is not yyyy-mm-dd"));
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
        Err(format!("date of birth {value:?} is not yyyy-mm-dd"))
    }
}

/// Secret-free Debug: secrets and hashes are never printed, images print their length only.
impl fmt::Debug for InstrumentHello {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("InstrumentHello")
            .field("serial", &self.serial)
            .field("model", &self.model)
            .field("firmware", &self.firmware)
            .field(
                "presented_secret",
                &self.presented_secret.as_ref().map(|_| "<redacted>"),
            )
            .field("issued_connection_open", &self.issued_connection_open)
            .field("enrolment", &self.enrolment)
            .field("at_ms", &self.at_ms)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for RegisterDish {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RegisterDish")
            .field("instrument_id", &self.instrument_id)
            .field("dish_id", &self.dish.dish_id)
            .field("wells", &self.dish.wells.len())
            .field("at_ms", &self.at_ms)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for PutImage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PutImage")
            .field("instrument_id", &self.instrument_id)
            .field("dish_id", &self.dish_id)
            .field("well", &self.well)
            .field("focal_plane", &self.focal_plane)
            .field("acquired_at_ms", &self.acquired_at_ms)
            .field("jpeg_bytes", &self.jpeg.len())
            .field("at_ms", &self.at_ms)
            .finish()
    }
}

impl fmt::Debug for PutTelemetry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PutTelemetry")
            .field("instrument_id", &self.instrument_id)
            .field("samples", &self.samples.len())
            .field("alarms", &self.alarms.len())
            .field("ims", &self.ims.is_some())
            .field("at_ms", &self.at_ms)
            .finish()
    }
}

impl fmt::Debug for ImsRemove {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImsRemove")
            .field("ids", &self.ids.len())
            .finish()
    }
}

impl fmt::Debug for Edit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Edit")
            .field("user", &self.actor.user)
            .field("action", &self.edit.action())
            .field("idempotent", &self.idempotency.is_some())
            .field("at_ms", &self.at_ms)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for ApiKeyCreate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ApiKeyCreate")
            .field("key_id", &self.key_id)
            .field("scope", &self.scope)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for UserAdd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UserAdd")
            .field("name", &self.name)
            .field("rights", &self.rights)
            .finish_non_exhaustive()
    }
}

impl fmt::Debug for UserChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            UserChange::Password(_) => f.write_str("Password(<redacted>)"),
            UserChange::Disabled(disabled) => write!(f, "Disabled({disabled})"),
            UserChange::Unlock => f.write_str("Unlock"),
            UserChange::Rights(rights) => write!(f, "Rights({})", rights.as_str()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(well: u32, focal_plane: i32, jpeg_bytes: usize) -> PutImage {
        PutImage {
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
            assert!(op.validate().is_err(), "{op:?}");
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
        let op = InstrumentHello {
            number: 0,
            serial: "S1".into(),
            model: "M".into(),
            firmware: "F".into(),
            presented_secret: Some("hunter2-presented".into()),
            new_secret: "hunter2-new".into(),
            issued_connection_open: false,
            enrolment: Default::default(),
            at_ms: 0,
        };
        let text = format!("{op:?}");
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("S1"));
    }

    #[test]
    fn long_text_is_refused() {
        let op = ResetInstrumentSecret {
            serial: "x".repeat(limits::TEXT_BYTES_MAX + 1),
        };
        let message = op.validate().unwrap_err();
        assert!(message.contains("more than"), "{message}");
    }
}
