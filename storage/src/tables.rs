//! The redb schema: every table of the database, its key, its value and the record layouts.
//!
//! # Layout and versioning
//!
//! Records are postcard-encoded serde structs stored as `&[u8]`. Their layout (field order and
//! types, and the numbering of enums such as [`ChangeRow::entity`]) is tied to
//! [`SCHEMA_VERSION`]: any change of a table, key or record layout needs a version bump and a
//! migration step in `store::migrate_step`. Fields are never reordered or reused.
//!
//! Nothing written to disk uses `usize`: keys and records use fixed-width integers only.
//! Times are Unix milliseconds UTC (`i64`, names end in `_ms`).
//!
//! Surrogate keys (`instrument_id`, `patient_key`, `treatment_key`, `dish_key`, `embryo_key`)
//! are `u64`, allocated from [`StateRow`] starting at 1, and never reused.

use crate::error::StorageError;
pub use crate::volume::Location;
use redb::TableDefinition;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

/// The schema version this binary writes and reads. See the module documentation.
pub const SCHEMA_VERSION: u64 = 13;

/// `meta`: name -> bytes. Rows: [`META_SCHEMA_VERSION`] (u64 LE), [`META_SERVER_ID`] (UTF-8,
/// 32 hex chars), [`META_STATE`] (postcard [`StateRow`]), [`META_IMS`] (postcard
/// [`ImsStateRow`], since version 4).
pub const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
pub const META_SCHEMA_VERSION: &str = "schema_version";
pub const META_SERVER_ID: &str = "server_id";
pub const META_STATE: &str = "state";
pub const META_IMS: &str = "ims_state";
/// The name new patients' `patient_idx` begin with (UTF-8, see [`site_name`]), since version
/// 9; written at every read-write open from `StoreOptions::site_name`.
pub const META_SITE_NAME: &str = "site_name";
/// The change-log seq the background activity computation has consumed (u64 LE), since
/// version 12: every acquisition change up to it is in [`ACTIVITY_CURVES`].
pub const META_ACTIVITY_CURSOR: &str = "activity_cursor";

/// `instruments`: instrument_id -> [`InstrumentRow`].
pub const INSTRUMENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("instruments");
/// `instrument_by_serial`: serial number -> instrument_id. Unique.
pub const INSTRUMENT_BY_SERIAL: TableDefinition<&str, u64> =
    TableDefinition::new("instrument_by_serial");

/// `patients`: patient_key -> [`PatientRow`].
pub const PATIENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("patients");
/// `patient_by_id`: clinic medical record number (patient_id) -> patient_key. Unique; its order
/// is the order of `list_patients`.
pub const PATIENT_BY_ID: TableDefinition<&str, u64> = TableDefinition::new("patient_by_id");
/// `patient_by_idx`: the patient's `PatientIDx` (see [`PatientRow::patient_idx`]) ->
/// patient_key. Unique. Since version 9.
pub const PATIENT_BY_IDX: TableDefinition<&str, u64> = TableDefinition::new("patient_by_idx");
/// `patient_differences`: patient_key -> [`PatientDifferenceRow`]: the latest dish
/// registration whose patient details disagreed with the stored ones, until someone resolves
/// it (an edit of the patient through the REST API or the viewer removes the row). Since
/// version 9.
pub const PATIENT_DIFFERENCES: TableDefinition<u64, &[u8]> =
    TableDefinition::new("patient_differences");

/// `treatments`: treatment_key -> [`TreatmentRow`].
pub const TREATMENTS: TableDefinition<u64, &[u8]> = TableDefinition::new("treatments");
/// `treatment_by_patient_name`: (patient_key, treatment name) -> treatment_key. Unique.
pub const TREATMENT_BY_PATIENT_NAME: TableDefinition<(u64, &str), u64> =
    TableDefinition::new("treatment_by_patient_name");

/// `dishes`: dish_key -> [`DishRow`].
pub const DISHES: TableDefinition<u64, &[u8]> = TableDefinition::new("dishes");
/// `dish_by_instrument`: (instrument_id, dish_id) -> dish_key. Unique.
pub const DISH_BY_INSTRUMENT: TableDefinition<(u64, &str), u64> =
    TableDefinition::new("dish_by_instrument");

/// `dish_by_treatment`: (treatment_key, dish_key) -> (). The dishes of a treatment.
pub const DISH_BY_TREATMENT: TableDefinition<(u64, u64), ()> =
    TableDefinition::new("dish_by_treatment");

/// `wells`: (dish_key, well) -> [`EmbryoRow`]. One embryo per registered well.
pub const WELLS: TableDefinition<WellKey, &[u8]> = TableDefinition::new("wells");
/// `embryo_by_id`: embryo_id -> (dish_key, well). Unique: an embryo id names one well.
pub const EMBRYO_BY_ID: TableDefinition<&str, WellKey> = TableDefinition::new("embryo_by_id");
/// `embryo_by_key`: embryo_key -> (dish_key, well). Unique.
pub const EMBRYO_BY_KEY: TableDefinition<u64, WellKey> = TableDefinition::new("embryo_by_key");

/// `annotations`: (embryo_key, annotation_id) -> [`AnnotationRow`]. Removing an annotation
/// deletes its row; the audit trail keeps what it was.
pub const ANNOTATIONS: TableDefinition<(u64, u64), &[u8]> = TableDefinition::new("annotations");

/// `audit`: audit seq (from 1, gapless, never pruned) -> [`AuditRow`]: who changed what, from
/// which computer, when, the state before and after, and the outcome (applied, conflict,
/// denied).
pub const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");

/// `users`: user name -> [`UserRow`]. Viewer and API users; passwords as argon2id PHC strings.
pub const USERS: TableDefinition<&str, &[u8]> = TableDefinition::new("users");

/// `login_failures`: (user name, source address) -> [`LoginFailureRow`] (since version 7).
/// Failed logins are counted per account and address, so failures from one address lock the
/// account for that address only; at most `limits::LOGIN_ADDRESSES_PER_USER_MAX` rows per
/// user (the least recent goes).
pub const LOGIN_FAILURES: TableDefinition<(&str, &str), &[u8]> =
    TableDefinition::new("login_failures");

/// `scores`: (embryo_key, model name) -> [`ScoreRow`]. One current score per model; the audit
/// trail keeps the earlier ones.
pub const SCORES: TableDefinition<(u64, &str), &[u8]> = TableDefinition::new("scores");

/// `transfers`: transfer_key -> [`TransferRow`].
pub const TRANSFERS: TableDefinition<u64, &[u8]> = TableDefinition::new("transfers");
/// `transfer_by_treatment`: (treatment_key, transfer_key) -> (). The transfers of a treatment.
pub const TRANSFER_BY_TREATMENT: TableDefinition<(u64, u64), ()> =
    TableDefinition::new("transfer_by_treatment");

/// `api_keys`: key id (16 hex chars) -> [`ApiKeyRow`].
pub const API_KEYS: TableDefinition<&str, &[u8]> = TableDefinition::new("api_keys");

/// `idempotency`: (principal, Idempotency-Key) -> [`IdempotencyRow`]: the outcome of the first
/// write sent with that key, written in the same transaction as the write itself, so a retry
/// cannot apply it twice. Rows older than the change-log retention are pruned with it.
pub const IDEMPOTENCY: TableDefinition<(&str, &str), &[u8]> = TableDefinition::new("idempotency");
/// `idempotency_by_age`: (at_ms, principal, Idempotency-Key) -> (). The pruning order.
pub const IDEMPOTENCY_BY_AGE: TableDefinition<(i64, &str, &str), ()> =
    TableDefinition::new("idempotency_by_age");

/// `acquisitions`: (dish_key, well, acquired_at_ms) -> [`AcquisitionRow`]: the focal planes
/// stored for that acquisition, sorted, each with where its record is in the volumes. This is
/// the image index (one row per acquisition, not per image, to keep it small).
pub const ACQUISITIONS: TableDefinition<AcquisitionKey, &[u8]> =
    TableDefinition::new("acquisitions");

/// `volumes`: volume id (from 1) -> [`VolumeRow`]: the image volume files (`crate::volume`),
/// how many bytes of each hold committed records, and whether it is sealed. Updated in the
/// same transaction as the index entries of the records it counts.
pub const VOLUMES: TableDefinition<u32, &[u8]> = TableDefinition::new("volumes");
/// `volume_archive`: volume id -> [`ArchivedVolumeRow`]: sealed volumes copied to the object
/// store, read back and checked. A volume with a row here may have no local file; its records
/// are read from the object store (`crate::archive`). Since version 10.
pub const VOLUME_ARCHIVE: TableDefinition<u32, &[u8]> = TableDefinition::new("volume_archive");

/// `models`: (model name, version from 1) -> [`ModelRow`]: the clinic's selection models, as
/// their documents (`es_models`). A version once used by an evaluation never changes; a new
/// document under the same name is the next version. Since version 11.
pub const MODELS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("models");
/// `model_results`: (embryo_key, model name) -> [`ModelResultRow`]: the embryo's current
/// result of that model (the version it was evaluated with), recomputed in the transaction
/// that changes one of its inputs. Since version 11.
pub const MODEL_RESULTS: TableDefinition<(u64, &str), &[u8]> =
    TableDefinition::new("model_results");

/// `activity_curves`: embryo_key -> [`ActivityCurveRow`]: the embryo's blastomere-activity
/// curve as the background computation has analysed it so far (derived from the images; a
/// lost row is computed again). Since version 12.
pub const ACTIVITY_CURVES: TableDefinition<u64, &[u8]> = TableDefinition::new("activity_curves");

/// `devices`: device id -> [`DeviceRow`]: the browsers registered to use the browser viewer,
/// counted against the licence's mobile devices (revoked ones are kept, not counted). Since
/// version 13.
pub const DEVICES: TableDefinition<&str, &[u8]> = TableDefinition::new("devices");

/// Version 4's `images` table: (dish_key, well, acquired_at_ms, focal_plane) -> SHA-256 ||
/// stored_at_ms (i64 LE) || JPEG bytes ([`ImageValue`]). In version 5 it exists only while
/// the migration moves its images into volumes (`crate::migrate::move_legacy_images`), which
/// deletes it when it is empty; index entries still pointing into it have
/// `Location::LEGACY`.
pub const LEGACY_IMAGES: TableDefinition<ImageKey, &[u8]> = TableDefinition::new("images");

/// `telemetry`: (instrument_id, channel, at_ms) -> [`TelemetryRow`]. A sample is identified by
/// its instrument, channel and time, so a resent sample is stored once.
pub const TELEMETRY: TableDefinition<TelemetryKey, &[u8]> = TableDefinition::new("telemetry");

/// `ims_queue`: record id (from 1, increasing, never reused) -> [`ImsRecordRow`]. The
/// instrument-monitoring queue: instrument data only, never patient data (see `crate::ims`).
/// Oldest first; the uploader removes rows after the endpoint accepted them, and a full queue
/// drops its oldest rows.
pub const IMS_QUEUE: TableDefinition<u64, &[u8]> = TableDefinition::new("ims_queue");
/// `ims_alarms`: (instrument_id, alarm code, raised_at_ms) -> [`AlarmRow`]: every alarm an
/// instrument reported, kept locally; a resend is stored once, a clear updates the row.
pub const IMS_ALARMS: TableDefinition<AlarmKey, &[u8]> = TableDefinition::new("ims_alarms");

/// `instrument_days`: (instrument_id, UTC day number since 1970-01-01) ->
/// [`InstrumentDayRow`]: the images an instrument delivered that day (since version 8), for
/// the dashboard's "last image", "images today" and the storage growth per day. Written in
/// the transaction that stores the images; a resend stored once counts once.
pub const INSTRUMENT_DAYS: TableDefinition<(u64, u32), &[u8]> =
    TableDefinition::new("instrument_days");

/// `changes`: change seq (gapless from [`StateRow::change_oldest_seq`] to
/// [`StateRow::change_last_seq`]) -> [`ChangeRow`].
pub const CHANGES: TableDefinition<u64, &[u8]> = TableDefinition::new("changes");

/// (dish_key, well)
pub type WellKey = (u64, u32);
/// (dish_key, well, acquired_at_ms)
pub type AcquisitionKey = (u64, u32, i64);
/// (dish_key, well, acquired_at_ms, focal_plane)
pub type ImageKey = (u64, u32, i64, i32);
/// (instrument_id, channel, at_ms)
pub type TelemetryKey = (u64, &'static str, i64);
/// (instrument_id, alarm code, raised_at_ms)
pub type AlarmKey = (u64, &'static str, i64);

/// The names of every table, for tooling and for the "create all tables on open" step.
pub const TABLE_NAMES: [&str; 37] = [
    "meta",
    "instruments",
    "instrument_by_serial",
    "patients",
    "patient_by_id",
    "treatments",
    "treatment_by_patient_name",
    "dishes",
    "dish_by_instrument",
    "dish_by_treatment",
    "wells",
    "embryo_by_id",
    "embryo_by_key",
    "acquisitions",
    "volumes",
    "telemetry",
    "changes",
    "annotations",
    "audit",
    "users",
    "scores",
    "transfers",
    "transfer_by_treatment",
    "api_keys",
    "idempotency",
    "idempotency_by_age",
    "ims_queue",
    "ims_alarms",
    "login_failures",
    "instrument_days",
    "patient_by_idx",
    "patient_differences",
    "volume_archive",
    "models",
    "model_results",
    "activity_curves",
    "devices",
];

/// Creates every table that does not exist yet, so read transactions never miss one.
pub(crate) fn create_all(txn: &redb::WriteTransaction) -> Result<(), StorageError> {
    txn.open_table(META)?;
    txn.open_table(INSTRUMENTS)?;
    txn.open_table(INSTRUMENT_BY_SERIAL)?;
    txn.open_table(PATIENTS)?;
    txn.open_table(PATIENT_BY_ID)?;
    txn.open_table(TREATMENTS)?;
    txn.open_table(TREATMENT_BY_PATIENT_NAME)?;
    txn.open_table(DISHES)?;
    txn.open_table(DISH_BY_INSTRUMENT)?;
    txn.open_table(DISH_BY_TREATMENT)?;
    txn.open_table(WELLS)?;
    txn.open_table(EMBRYO_BY_ID)?;
    txn.open_table(EMBRYO_BY_KEY)?;
    txn.open_table(ACQUISITIONS)?;
    txn.open_table(VOLUMES)?;
    txn.open_table(TELEMETRY)?;
    txn.open_table(CHANGES)?;
    txn.open_table(ANNOTATIONS)?;
    txn.open_table(AUDIT)?;
    txn.open_table(USERS)?;
    txn.open_table(SCORES)?;
    txn.open_table(TRANSFERS)?;
    txn.open_table(TRANSFER_BY_TREATMENT)?;
    txn.open_table(API_KEYS)?;
    txn.open_table(IDEMPOTENCY)?;
    txn.open_table(IDEMPOTENCY_BY_AGE)?;
    txn.open_table(IMS_QUEUE)?;
    txn.open_table(IMS_ALARMS)?;
    txn.open_table(LOGIN_FAILURES)?;
    txn.open_table(INSTRUMENT_DAYS)?;
    txn.open_table(PATIENT_BY_IDX)?;
    txn.open_table(PATIENT_DIFFERENCES)?;
    txn.open_table(VOLUME_ARCHIVE)?;
    txn.open_table(MODELS)?;
    txn.open_table(MODEL_RESULTS)?;
    txn.open_table(ACTIVITY_CURVES)?;
    txn.open_table(DEVICES)?;
    Ok(())
}

/// Creates the tables of schema version 4 (for the version-4 fixture of the migration tests).
#[doc(hidden)]
pub(crate) fn create_all_v4(txn: &redb::WriteTransaction) -> Result<(), StorageError> {
    create_all(txn)?;
    txn.delete_table(VOLUMES)?;
    txn.open_table(LEGACY_IMAGES)?;
    Ok(())
}

/// The counters row (`meta/state`): id allocation, change-log bounds and entity counts, updated
/// in the same transaction as the rows they count, so statistics are O(1).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateRow {
    pub instrument_id_last: u64,
    pub patient_key_last: u64,
    pub treatment_key_last: u64,
    pub dish_key_last: u64,
    pub embryo_key_last: u64,
    /// The seq of the newest change; 0 when no change was ever written.
    pub change_last_seq: u64,
    /// The seq of the oldest retained change (`change_last_seq + 1` when none is retained).
    pub change_oldest_seq: u64,
    pub instruments: u64,
    pub patients: u64,
    pub treatments: u64,
    pub dishes: u64,
    pub embryos: u64,
    pub acquisitions: u64,
    pub images: u64,
    /// Sum of the JPEG lengths of all images.
    pub image_bytes: u64,
    pub telemetry_samples: u64,
    pub annotation_id_last: u64,
    /// The seq of the newest audit row; 0 when none was written.
    pub audit_last_seq: u64,
    pub annotations: u64,
    pub users: u64,
    pub transfer_key_last: u64,
    pub transfers: u64,
    pub scores: u64,
    pub api_keys: u64,
}

impl StateRow {
    /// The state of a new database.
    pub fn initial() -> StateRow {
        StateRow {
            change_oldest_seq: 1,
            ..StateRow::default()
        }
    }

    /// Checks the row read from disk: the change-log bounds must be ordered.
    pub fn check(&self) -> Result<(), StorageError> {
        let ordered = self.change_oldest_seq >= 1
            && self.change_oldest_seq <= self.change_last_seq.saturating_add(1);
        if ordered {
            Ok(())
        } else {
            Err(StorageError::Corrupt(format!(
                "change log bounds out of order: oldest {} last {}",
                self.change_oldest_seq, self.change_last_seq
            )))
        }
    }

    /// Number of retained changes (after [`StateRow::check`] passed).
    pub fn changes_retained(&self) -> u64 {
        self.change_last_seq
            .saturating_add(1)
            .saturating_sub(self.change_oldest_seq)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstrumentRow {
    pub serial: String,
    pub model: String,
    pub firmware: String,
    pub number: u32,
    pub display_name: String,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    /// SHA-256 of the confirmed secret (presented at least once after it was issued); None
    /// until the first confirmation and after a reset.
    pub secret_sha256: Option<[u8; 32]>,
    /// SHA-256 of a secret issued and not yet confirmed.
    pub issued_secret_sha256: Option<[u8; 32]>,
    /// SHA-256 of the secret the HELLO that led to the issue presented (of "" for none):
    /// it stays acceptable until the issued one is confirmed, so a lost HELLO_OK cannot
    /// lock the instrument out (docs/protocol/incubator.md, section 6.2).
    pub issued_for_sha256: Option<[u8; 32]>,
    /// Who gave `number`: [`NUMBER_BY_SERVER`], [`NUMBER_BY_INSTRUMENT`] (its HELLO) or
    /// [`NUMBER_BY_ADMINISTRATOR`]. An instrument's HELLO changes a number it or the server
    /// gave, never one an administrator set. Since version 9.
    pub number_source: u8,
}

/// `InstrumentRow::number_source`: counted by the server when the instrument did not say.
pub const NUMBER_BY_SERVER: u8 = 0;
/// `InstrumentRow::number_source`: the instrument's own number, from its HELLO.
pub const NUMBER_BY_INSTRUMENT: u8 = 1;
/// `InstrumentRow::number_source`: set by an administrator.
pub const NUMBER_BY_ADMINISTRATOR: u8 = 2;

/// One instrument's images of one UTC day, in [`INSTRUMENT_DAYS`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstrumentDayRow {
    pub images: u64,
    /// JPEG bytes.
    pub image_bytes: u64,
    /// When the latest of them was stored.
    pub last_image_ms: i64,
}

/// The UTC day number (days since 1970-01-01) of a Unix time in milliseconds; 0 before 1970.
pub fn day_of(at_ms: i64) -> u32 {
    u32::try_from(at_ms.div_euclid(86_400_000).max(0)).unwrap_or(u32::MAX)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatientRow {
    pub patient_id: String,
    pub first_name: String,
    pub last_name: String,
    /// `yyyy-mm-dd` or empty.
    pub date_of_birth: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub version: u64,
    /// The original system's patient identifier (`PatientIDx`): `<site name>_<creation time
    /// as a spreadsheet serial day>` (see [`patient_idx`]), or the one the patient came with.
    /// Unique ([`PATIENT_BY_IDX`]) and never changed. Since version 9.
    pub patient_idx: String,
}

impl PatientRow {
    /// A new patient (version 1) as given; an empty `patient_idx` is minted on insert.
    pub(crate) fn new(patient: &crate::ops::PatientRef, at_ms: i64) -> PatientRow {
        PatientRow {
            patient_id: patient.patient_id.clone(),
            first_name: patient.first_name.clone(),
            last_name: patient.last_name.clone(),
            date_of_birth: patient.date_of_birth.clone(),
            created_at_ms: at_ms,
            updated_at_ms: at_ms,
            version: 1,
            patient_idx: patient.patient_idx.clone(),
        }
    }
}

/// A dish registration's patient details that disagreed with the stored patient, in
/// [`PATIENT_DIFFERENCES`]. The stored details were kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PatientDifferenceRow {
    /// The serial number of the instrument that registered the dish.
    pub instrument_serial: String,
    pub dish_id: String,
    /// The details it gave.
    pub first_name: String,
    pub last_name: String,
    pub date_of_birth: String,
    /// When the latest such registration was stored, and how many there were.
    pub at_ms: i64,
    pub times: u64,
}

/// The largest site name [`site_name`] keeps, in bytes (a Windows computer name's limit).
pub const SITE_NAME_BYTES_MAX: usize = 15;

/// The site name `patient_idx` values begin with: the letters, digits and `-` of `text`
/// before its first `.` (a host name without its domain), in capitals, at most
/// [`SITE_NAME_BYTES_MAX`] of them; `ESSERVER` when none is left.
pub fn site_name(text: &str) -> String {
    let name: String = text
        .split('.')
        .next()
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
        .map(|c| c.to_ascii_uppercase())
        .take(SITE_NAME_BYTES_MAX)
        .collect();
    if name.is_empty() {
        "ESSERVER".to_string()
    } else {
        name
    }
}

/// Days from the spreadsheet epoch (1899-12-30) to the Unix epoch.
pub const SERIAL_DAY_UNIX_EPOCH: i64 = 25_569;
/// Decimals of a serial day in a `patient_idx` (1e-10 day is 8.64 microseconds).
pub const SERIAL_DAY_DECIMALS: u32 = 10;

/// A Unix time in ms as a spreadsheet serial day in units of 1e-10 day (10 decimals),
/// rounded down. Times before 1899-12-30 count as that day.
pub fn serial_day_units(at_ms: i64) -> u128 {
    let since_epoch_ms =
        (i128::from(at_ms) + i128::from(SERIAL_DAY_UNIX_EPOCH) * 86_400_000).max(0);
    (since_epoch_ms as u128) * 10u128.pow(SERIAL_DAY_DECIMALS) / 86_400_000
}

/// `44803.5316606366` from [`serial_day_units`].
pub fn serial_day_text(units: u128) -> String {
    let scale = 10u128.pow(SERIAL_DAY_DECIMALS);
    format!(
        "{}.{:0width$}",
        units / scale,
        units % scale,
        width = SERIAL_DAY_DECIMALS as usize
    )
}

/// The `patient_idx` of a patient created at `at_ms` on site `site`, `step` units of 1e-10
/// day later when earlier values are taken.
pub fn patient_idx(site: &str, at_ms: i64, step: u128) -> String {
    format!("{site}_{}", serial_day_text(serial_day_units(at_ms) + step))
}

/// The label of well `well` of the `dish_index`-th dish (from 0, in registration order) of a
/// treatment, as the original system labelled embryos (`EmbryoDescriptionID`): two letters
/// for the dish (`AA`, `AB`, ..., `AZ`, `BA`, ...) and the well number: `AA1`, `AA2`, `AB1`.
pub fn embryo_label(dish_index: u64, well: u32) -> String {
    let first = b'A' + ((dish_index / 26) % 26) as u8;
    let second = b'A' + (dish_index % 26) as u8;
    format!("{}{}{well}", first as char, second as char)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreatmentRow {
    pub patient_key: u64,
    pub name: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub version: u64,
    pub comment: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DishRow {
    pub instrument_id: u64,
    pub dish_id: String,
    pub slot: u32,
    pub treatment_key: u64,
    pub insemination_at_ms: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// How the dish's oocytes were fertilized (`ICSI`, `IVF`, ...), as the incubator or an
    /// embryologist gave it; empty when not known. Since version 9.
    pub fertilization_method: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbryoRow {
    pub embryo_key: u64,
    pub embryo_id: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// Raised by every change to the embryo, its annotations, fate or comment.
    pub version: u64,
    /// [`crate::Fate`] as its stable number.
    pub fate: u8,
    pub comment: String,
    /// The embryo's label in the original system's style (`EmbryoDescriptionID`, e.g.
    /// `AA1`): the incubator's, or [`embryo_label`] at registration. Since version 9.
    pub label: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnnotationRow {
    /// `t2`, `tPNf`, `PN`, `ICM`, ... (see `docs/protocol/viewer.md`).
    pub name: String,
    /// The value as entered: empty for a pure timing event, a grade or count otherwise.
    pub value: String,
    /// For timing events: the instant of the event (the acquisition it was seen on), UTC ms.
    /// Hours after insemination are derived from the dish's insemination time on read.
    pub event_at_ms: Option<i64>,
    /// [`crate::AnnotationSource`] as its stable number.
    pub source: u8,
    pub set_by: String,
    pub set_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRow {
    pub at_ms: i64,
    pub user: String,
    pub computer: String,
    /// `patient.create`, `annotation.add`, `embryo.fate`, ... (stable names).
    pub action: String,
    /// [`crate::ChangeEntity`] as its stable number.
    pub entity: u8,
    /// The entity's natural id (patient id, embryo id, ...).
    pub target: String,
    /// [`crate::AuditOutcome`] as its stable number.
    pub outcome: u8,
    /// JSON of the state before (empty for a create or a refused attempt on nothing).
    pub before: String,
    /// JSON of the state after, or of the attempted change when it was refused.
    pub after: String,
}

/// Failed logins of one account from one source address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoginFailureRow {
    /// Consecutive failures from the address since its last success, lock or unlock.
    pub failures: u32,
    /// Logins of the account from the address are refused until then (0: not locked).
    pub locked_until_ms: i64,
    pub last_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRow {
    /// argon2id PHC string (`$argon2id$v=19$...`); never logged.
    pub password_hash: String,
    /// [`crate::Rights`] as its stable number.
    pub rights: u8,
    pub disabled: bool,
    /// Consecutive failed logins since the last success or unlock, from every address.
    pub failed_logins: u32,
    /// Logins are refused until this instant from every address (0: not locked). Written by
    /// version 6 and earlier; since version 7 locks are per address (`LOGIN_FAILURES`) and this
    /// is only honoured until it passes.
    pub locked_until_ms: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub password_changed_at_ms: i64,
    pub last_login_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScoreRow {
    pub model_version: String,
    pub value: String,
    pub viability: String,
    pub set_by: String,
    pub set_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransferRow {
    pub treatment_key: u64,
    pub transferred_at_ms: i64,
    /// The embryo keys transferred, in the order given.
    pub embryo_keys: Vec<u64>,
    pub outcome: crate::TransferOutcome,
    pub comment: String,
    pub version: u64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiKeyRow {
    /// SHA-256 of the secret part. The secret is 32 random bytes, so a plain hash suffices.
    pub secret_sha256: [u8; 32],
    /// [`crate::ApiScope`] as its stable number.
    pub scope: u8,
    pub name: String,
    pub created_by: String,
    pub created_at_ms: i64,
    /// 0 while the key is valid.
    pub revoked_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdempotencyRow {
    /// SHA-256 of the request (method, path and body) first sent with the key.
    pub request_sha256: [u8; 32],
    pub at_ms: i64,
    /// [`crate::ChangeEntity`] as its stable number.
    pub entity: u8,
    pub key: u64,
    pub id: String,
    pub version: u64,
    pub change_seq: u64,
    pub annotation_id: Option<u64>,
}

/// One acquisition's row in [`ACQUISITIONS`]: where each focal plane's record is.
///
/// Encoded by [`AcquisitionRow::encode`] in the packed layout of version 6 (a 0 byte, then
/// varints, each plane's focal plane, volume and offset as the difference from the previous
/// plane's, so the planes of one stack written one after the other take about 6 bytes each);
/// [`AcquisitionRow::decode`] also reads the plain postcard layout version 5 wrote (which never
/// starts with a 0 byte: it starts with the number of planes, and a row has at least one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcquisitionRow {
    /// Sorted ascending by focal plane, no duplicates, never empty.
    pub planes: Vec<PlaneRow>,
    pub first_stored_at_ms: i64,
}

/// Version 5's layout of [`AcquisitionRow`], frozen: read, never written.
#[derive(Deserialize)]
struct AcquisitionRowV5 {
    planes: Vec<PlaneRow>,
    first_stored_at_ms: i64,
}

/// The first byte of a packed (version 6) acquisition row.
const ACQUISITION_PACKED: u8 = 0;

impl AcquisitionRow {
    /// The row's bytes in the packed layout.
    pub fn encode(&self) -> Vec<u8> {
        debug_assert!(!self.planes.is_empty(), "an acquisition row has a plane");
        let mut out = Vec::with_capacity(8 + self.planes.len() * 8);
        out.push(ACQUISITION_PACKED);
        put_varint(&mut out, zigzag(self.first_stored_at_ms));
        put_varint(&mut out, self.planes.len() as u64);
        let mut previous: Option<&PlaneRow> = None;
        for plane in &self.planes {
            let location = plane.location;
            match previous {
                None => {
                    put_varint(&mut out, zigzag(i64::from(plane.focal_plane)));
                    put_varint(&mut out, u64::from(location.volume));
                    put_varint(&mut out, location.offset);
                }
                Some(before) => {
                    let step = i64::from(plane.focal_plane) - i64::from(before.focal_plane);
                    put_varint(&mut out, zigzag(step - 1));
                    let volume_step =
                        i64::from(location.volume) - i64::from(before.location.volume);
                    put_varint(&mut out, zigzag(volume_step));
                    if volume_step == 0 {
                        let after_before =
                            before.location.offset as i64 + i64::from(before.location.length);
                        put_varint(&mut out, zigzag(location.offset as i64 - after_before));
                    } else {
                        put_varint(&mut out, location.offset);
                    }
                }
            }
            put_varint(&mut out, u64::from(location.length));
            previous = Some(plane);
        }
        out
    }

    /// Reads a row of either layout; anything else is corruption.
    pub fn decode(bytes: &[u8]) -> Result<AcquisitionRow, StorageError> {
        let corrupt = |what: &str| {
            StorageError::Corrupt(format!("acquisition record does not decode: {what}"))
        };
        let row = match bytes.first() {
            None => return Err(corrupt("empty")),
            Some(&ACQUISITION_PACKED) => {
                let mut at = 1;
                let mut next = || get_varint(bytes, &mut at).ok_or_else(|| corrupt("truncated"));
                let first_stored_at_ms = unzigzag(next()?);
                let count = next()?;
                if count == 0 || count > 4096 {
                    return Err(corrupt("bad plane count"));
                }
                let mut planes: Vec<PlaneRow> = Vec::with_capacity(count as usize);
                for index in 0..count {
                    let (focal_plane, volume, offset) = match planes.last() {
                        None => (unzigzag(next()?), next()? as i64, next()?),
                        Some(before) => {
                            let focal_plane = i64::from(before.focal_plane) + unzigzag(next()?) + 1;
                            let volume_step = unzigzag(next()?);
                            let volume = i64::from(before.location.volume) + volume_step;
                            let offset = if volume_step == 0 {
                                let after_before = before.location.offset as i64
                                    + i64::from(before.location.length);
                                (after_before + unzigzag(next()?)) as u64
                            } else {
                                next()?
                            };
                            (focal_plane, volume, offset)
                        }
                    };
                    let length = next()?;
                    let (Ok(focal_plane), Ok(volume), Ok(length)) = (
                        i32::try_from(focal_plane),
                        u32::try_from(volume),
                        u32::try_from(length),
                    ) else {
                        return Err(corrupt(&format!("plane {index} is out of range")));
                    };
                    planes.push(PlaneRow {
                        focal_plane,
                        location: Location {
                            volume,
                            offset,
                            length,
                        },
                    });
                }
                if at != bytes.len() {
                    return Err(corrupt("trailing bytes"));
                }
                AcquisitionRow {
                    planes,
                    first_stored_at_ms,
                }
            }
            Some(_) => {
                let old: AcquisitionRowV5 = decode(bytes, "version 5 acquisition")?;
                AcquisitionRow {
                    planes: old.planes,
                    first_stored_at_ms: old.first_stored_at_ms,
                }
            }
        };
        let ascending = row
            .planes
            .windows(2)
            .all(|pair| pair[0].focal_plane < pair[1].focal_plane);
        if row.planes.is_empty() || !ascending {
            return Err(corrupt("planes not ascending"));
        }
        Ok(row)
    }

    /// The focal planes stored, ascending.
    pub fn focal_planes(&self) -> Vec<i32> {
        self.planes.iter().map(|p| p.focal_plane).collect()
    }

    /// Where the image of `focal_plane` is, if it is stored.
    pub fn location(&self, focal_plane: i32) -> Option<Location> {
        self.planes
            .binary_search_by_key(&focal_plane, |p| p.focal_plane)
            .ok()
            .map(|at| self.planes[at].location)
    }

    /// Records (or moves) the image of `focal_plane`; true when the plane is new.
    pub fn set(&mut self, focal_plane: i32, location: Location) -> bool {
        match self
            .planes
            .binary_search_by_key(&focal_plane, |p| p.focal_plane)
        {
            Ok(at) => {
                self.planes[at].location = location;
                false
            }
            Err(at) => {
                self.planes.insert(
                    at,
                    PlaneRow {
                        focal_plane,
                        location,
                    },
                );
                true
            }
        }
    }
}

/// One focal plane of an acquisition and where its record is. The SHA-256 and stored_at are in
/// the record's header (checked on every read), not here: about 12 bytes per image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlaneRow {
    pub focal_plane: i32,
    pub location: Location,
}

/// A volume file's row in [`VOLUMES`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VolumeRow {
    /// Bytes of committed records, from offset 0: everything before is durable and indexed;
    /// anything after was never acknowledged and is cut off at start.
    pub end: u64,
    /// Records in `[0, end)`, indexed or superseded.
    pub records: u64,
    /// Sealed volumes never change again.
    pub sealed: bool,
    pub created_at_ms: i64,
    /// 0 while active.
    pub sealed_at_ms: i64,
}

/// A sealed volume's row in [`VOLUME_ARCHIVE`]: where its copy in the object store is and
/// what was checked there before the local file could go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivedVolumeRow {
    /// The object's key in the archive's bucket (prefix included).
    pub object: String,
    /// Its size: the volume's committed `end`.
    pub bytes: u64,
    /// SHA-256 of the object as read back, equal to the local file's `[0, end)`.
    pub sha256: [u8; 32],
    pub archived_at_ms: i64,
}

/// A model version's row in [`MODELS`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRow {
    /// The model document (JSON, `es_models::FORMAT`), as imported.
    pub document: String,
    pub imported_by: String,
    pub imported_at_ms: i64,
    /// An evaluation used it: it never changes again.
    pub used: bool,
}

/// An embryo's result of one model, in [`MODEL_RESULTS`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelResultRow {
    pub version: u32,
    /// 1 category, 2 score, 3 not available.
    pub outcome: u8,
    /// The category, the score (as text, 4 decimals at most) or why it is not available.
    pub value: String,
    /// The rule that decided, for a person.
    pub rule: String,
    /// The variables used, with their values.
    pub variables: Vec<(String, f64)>,
    /// Who asked for the evaluation (or changed an input it was recomputed after), and when.
    pub set_by: String,
    pub set_at_ms: i64,
}

/// A browser viewer's device, in [`DEVICES`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRow {
    /// The name its user gave it ("Ward tablet").
    pub name: String,
    /// Who registered it, and when.
    pub registered_by: String,
    pub registered_at_ms: i64,
    /// The latest login from it.
    pub last_login_by: String,
    pub last_login_at_ms: i64,
    /// When an administrator revoked it (it is refused from then on), and who.
    pub revoked_at_ms: Option<i64>,
    pub revoked_by: String,
}

/// An embryo's activity curve, in [`ACTIVITY_CURVES`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivityCurveRow {
    /// The focal plane analysed (the central one of the embryo's first acquisition).
    pub focal_plane: i32,
    /// The latest acquisition analysed (Unix ms): later ones are still to come.
    pub through_ms: i64,
    /// Frames that could not be decoded or compared.
    pub frames_skipped: u32,
    /// (acquired_at_ms, activity from 0 to 1), by time; at most
    /// `limits::ACTIVITY_POINTS_PER_EMBRYO_MAX`.
    pub points: Vec<(i64, f64)>,
}

/// The monitoring queue's counters (`meta/ims_state`), updated in the same transaction as the
/// queue rows.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImsStateRow {
    /// The id of the newest record ever queued; 0 when none was.
    pub id_last: u64,
    /// Rows in `ims_queue`.
    pub records: u64,
    /// Their bytes (encoded row plus its 8-byte key).
    pub bytes: u64,
    /// Records dropped, oldest first, because the queue was full (since the database was made).
    pub dropped_records: u64,
    pub dropped_bytes: u64,
    /// Records removed after the endpoint accepted them.
    pub uploaded_records: u64,
    /// Samples and alarms kept locally but not queued, because their channel is not a
    /// monitoring channel or their alarm code could name patient data.
    pub withheld: u64,
    /// Rows in `ims_alarms`.
    pub alarms: u64,
}

/// One queued monitoring record. Built only from instrument data (see `crate::ims`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImsRecordRow {
    /// The instrument's serial number and model, as it reported them at HELLO.
    pub serial: String,
    pub model: String,
    /// When the server received it.
    pub received_at_ms: i64,
    pub body: ImsBody,
}

/// What a monitoring record carries. Variants are numbered by position: append only.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ImsBody {
    Sample {
        channel: String,
        value: f64,
        at_ms: i64,
    },
    Alarm {
        code: String,
        /// 1 info, 2 warning, 3 critical (the protocol's numbering).
        severity: u8,
        raised_at_ms: i64,
        /// 0 while the alarm is active.
        cleared_at_ms: i64,
    },
}

/// One alarm as the instrument reported it, text included (the text stays on the server).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlarmRow {
    pub severity: u8,
    pub cleared_at_ms: i64,
    pub text: String,
    pub stored_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryRow {
    pub value: f64,
    pub stored_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChangeRow {
    pub at_ms: i64,
    /// [`crate::ChangeEntity`] as its stable number (`ChangeEntity::to_u8`).
    pub entity: u8,
    pub key: u64,
    /// The entity's natural id: serial number, patient id, `patient id/treatment name`, dish
    /// id, embryo id.
    pub id: String,
    /// The entity's version after the change (0 for entities without versions).
    pub version: u64,
    pub summary: String,
}

fn zigzag(value: i64) -> u64 {
    ((value << 1) ^ (value >> 63)) as u64
}

fn unzigzag(value: u64) -> i64 {
    ((value >> 1) as i64) ^ -((value & 1) as i64)
}

/// LEB128, as postcard writes its integers.
fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn get_varint(bytes: &[u8], at: &mut usize) -> Option<u64> {
    let mut value = 0u64;
    for shift in (0..64).step_by(7) {
        let byte = *bytes.get(*at)?;
        *at += 1;
        value |= u64::from(byte & 0x7f).checked_shl(shift)?;
        if byte & 0x80 == 0 {
            return Some(value);
        }
    }
    None
}

/// Encodes a record. Encoding into a Vec cannot fail for these types; a failure is a bug.
pub fn encode<T: Serialize>(row: &T) -> Vec<u8> {
    postcard::to_stdvec(row).expect("postcard encodes plain records into a Vec")
}

/// Decodes a record read from disk; a record that does not decode is corruption.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], what: &str) -> Result<T, StorageError> {
    postcard::from_bytes(bytes)
        .map_err(|error| StorageError::Corrupt(format!("{what} record does not decode: {error}")))
}

pub fn encode_u64(value: u64) -> [u8; 8] {
    value.to_le_bytes()
}

pub fn decode_u64(bytes: &[u8], what: &str) -> Result<u64, StorageError> {
    let array: [u8; 8] = bytes.try_into().map_err(|_| {
        StorageError::Corrupt(format!("{what} has {} bytes, expected 8", bytes.len()))
    })?;
    Ok(u64::from_le_bytes(array))
}

/// The value of a version-4 [`LEGACY_IMAGES`] row: SHA-256 (32 bytes) || stored_at_ms (i64 LE) || JPEG.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageValue<'a> {
    pub sha256: [u8; 32],
    pub stored_at_ms: i64,
    pub jpeg: &'a [u8],
}

impl<'a> ImageValue<'a> {
    pub const HEADER_BYTES: usize = 32 + 8;

    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![0u8; self.encoded_len()];
        self.encode_into(&mut out);
        out
    }

    pub fn encoded_len(&self) -> usize {
        Self::HEADER_BYTES + self.jpeg.len()
    }

    /// Writes the value into `out`, which must be exactly [`ImageValue::encoded_len`] long.
    pub fn encode_into(&self, out: &mut [u8]) {
        assert_eq!(
            out.len(),
            self.encoded_len(),
            "image value slot of the wrong size"
        );
        out[..32].copy_from_slice(&self.sha256);
        out[32..Self::HEADER_BYTES].copy_from_slice(&self.stored_at_ms.to_le_bytes());
        out[Self::HEADER_BYTES..].copy_from_slice(self.jpeg);
    }

    pub fn decode(bytes: &'a [u8]) -> Result<ImageValue<'a>, StorageError> {
        if bytes.len() < Self::HEADER_BYTES {
            return Err(StorageError::Corrupt(format!(
                "image value has {} bytes, shorter than its {}-byte header",
                bytes.len(),
                Self::HEADER_BYTES
            )));
        }
        let (sha, rest) = bytes.split_at(32);
        let (stored, jpeg) = rest.split_at(8);
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(sha);
        let mut stored_at = [0u8; 8];
        stored_at.copy_from_slice(stored);
        Ok(ImageValue {
            sha256,
            stored_at_ms: i64::from_le_bytes(stored_at),
            jpeg,
        })
    }

    /// Whether the stored SHA-256 matches the bytes.
    pub fn is_intact(&self) -> bool {
        sha256(self.jpeg) == self.sha256
    }
}

pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(bytes).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plane(focal_plane: i32, volume: u32, offset: u64, length: u32) -> PlaneRow {
        PlaneRow {
            focal_plane,
            location: Location {
                volume,
                offset,
                length,
            },
        }
    }

    /// Version 5's layout, as it wrote rows.
    #[derive(Serialize)]
    struct WrittenByV5<'a> {
        planes: &'a [PlaneRow],
        first_stored_at_ms: i64,
    }

    #[test]
    fn acquisition_rows_pack_and_read_both_layouts() {
        let stack: Vec<PlaneRow> = (0..11)
            .map(|p| plane(p, 3, 3_900_000_000 + p as u64 * 30_100, 30_100))
            .collect();
        let cases = [
            // A stack written back to back near the end of a 4 GiB volume.
            stack.clone(),
            // Gaps (other instruments' records in between), a plane written again later at a
            // lower offset, negative planes (EmbryoScope D offsets), a volume change.
            vec![
                plane(-75, 1, 4_000_000_000, 29_000),
                plane(-45, 1, 4_000_450_000, 31_000),
                plane(-15, 1, 12_288, 30_500),
                plane(15, 2, 0, 30_000),
                plane(45, 1, 100, 1),
                plane(75, u32::MAX, u64::MAX / 4, u32::MAX),
            ],
            vec![plane(i32::MIN, 0, 0, 0), plane(i32::MAX, 0, 0, 0)],
        ];
        for planes in cases {
            let row = AcquisitionRow {
                planes: planes.clone(),
                first_stored_at_ms: 1_764_806_400_123,
            };
            let packed = row.encode();
            assert_eq!(packed[0], ACQUISITION_PACKED);
            assert_eq!(AcquisitionRow::decode(&packed).unwrap(), row);
            let plain = encode(&WrittenByV5 {
                planes: &planes,
                first_stored_at_ms: row.first_stored_at_ms,
            });
            assert_ne!(plain[0], ACQUISITION_PACKED);
            assert_eq!(AcquisitionRow::decode(&plain).unwrap(), row);
        }
        // The stack: 11 planes of 30 KB in 78 bytes; the plain layout takes 117.
        let plain = encode(&WrittenByV5 {
            planes: &stack,
            first_stored_at_ms: 1_764_806_400_123,
        });
        let row = AcquisitionRow {
            planes: stack,
            first_stored_at_ms: 1_764_806_400_123,
        };
        assert_eq!((row.encode().len(), plain.len()), (78, 117));
    }

    #[test]
    fn a_damaged_acquisition_row_is_corruption_never_a_panic() {
        let row = AcquisitionRow {
            planes: (0..5).map(|p| plane(p, 1, p as u64 * 100, 100)).collect(),
            first_stored_at_ms: 7,
        };
        let packed = row.encode();
        for cut in 0..packed.len() {
            assert!(
                AcquisitionRow::decode(&packed[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut longer = packed.clone();
        longer.push(0);
        assert!(AcquisitionRow::decode(&longer).is_err());
        // Every single-byte change either fails to decode or decodes to ascending planes.
        for at in 0..packed.len() {
            for value in [0u8, 1, 0x7f, 0x80, 0xff] {
                let mut damaged = packed.clone();
                damaged[at] = value;
                if let Ok(decoded) = AcquisitionRow::decode(&damaged) {
                    assert!(decoded
                        .planes
                        .windows(2)
                        .all(|w| w[0].focal_plane < w[1].focal_plane));
                }
            }
        }
        // A packed row claiming no planes, or planes out of order.
        assert!(AcquisitionRow::decode(&[ACQUISITION_PACKED, 14, 0]).is_err());
        let unordered = encode(&WrittenByV5 {
            planes: &[plane(2, 1, 0, 1), plane(1, 1, 1, 1)],
            first_stored_at_ms: 0,
        });
        assert!(AcquisitionRow::decode(&unordered).is_err());
    }

    #[test]
    fn image_value_round_trips_and_detects_damage() {
        let jpeg = b"\xff\xd8not really a jpeg\xff\xd9";
        let value = ImageValue {
            sha256: sha256(jpeg),
            stored_at_ms: -5,
            jpeg,
        };
        let bytes = value.encode();
        let decoded = ImageValue::decode(&bytes).unwrap();
        assert_eq!(decoded, value);
        assert!(decoded.is_intact());
        let mut damaged = bytes.clone();
        damaged[ImageValue::HEADER_BYTES] ^= 1;
        assert!(!ImageValue::decode(&damaged).unwrap().is_intact());
        assert!(matches!(
            ImageValue::decode(&bytes[..39]),
            Err(StorageError::Corrupt(_))
        ));
    }

    #[test]
    fn bad_records_are_corrupt_not_panics() {
        assert!(matches!(
            decode::<InstrumentRow>(&[0xff, 0xff], "instrument"),
            Err(StorageError::Corrupt(_))
        ));
        assert!(matches!(
            decode_u64(&[1, 2, 3], "schema version"),
            Err(StorageError::Corrupt(_))
        ));
        assert_eq!(decode_u64(&encode_u64(7), "x").unwrap(), 7);
    }
}
