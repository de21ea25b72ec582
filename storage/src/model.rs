//! Read-model types returned by `Reader` and `Store::verify`.

use serde::Serialize;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InstrumentRecord {
    pub instrument_id: u64,
    pub serial: String,
    pub model: String,
    pub firmware: String,
    pub number: u32,
    pub display_name: String,
    pub first_seen_ms: i64,
    pub last_seen_ms: i64,
    /// Who gave `number`: `server` (counted), `instrument` (its HELLO) or `administrator`.
    pub number_set_by: &'static str,
}

/// The images an instrument delivered, from `instrument_days` (see `Reader::activity`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct InstrumentActivity {
    pub instrument_id: u64,
    /// When its latest image was stored; 0 if none ever was.
    pub last_image_ms: i64,
    /// Its images and JPEG bytes stored on the UTC day asked for.
    pub images_today: u64,
    pub image_bytes_today: u64,
    /// Images and JPEG bytes of each of the `days` UTC days before that day, oldest first,
    /// from the first day it delivered one (fewer entries for a newer instrument).
    pub days_before: Vec<(u64, u64)>,
}

/// What the server holds for one dish, so an incubator can send only what is missing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DishSyncState {
    pub dish_id: String,
    /// Every registered well, ascending.
    pub wells: Vec<WellSync>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WellSync {
    pub well: u32,
    pub embryo_id: String,
    /// Ascending by time.
    pub acquisitions: Vec<AcquisitionSync>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AcquisitionSync {
    pub acquired_at_ms: i64,
    /// The focal planes stored, ascending.
    pub focal_planes: Vec<i32>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PatientSummary {
    pub patient_id: String,
    pub first_name: String,
    pub last_name: String,
    pub date_of_birth: String,
    /// Treatment names, ascending.
    pub treatments: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct StoreStats {
    pub instruments: u64,
    pub patients: u64,
    pub treatments: u64,
    pub dishes: u64,
    pub embryos: u64,
    pub acquisitions: u64,
    pub images: u64,
    pub image_bytes: u64,
    pub telemetry_samples: u64,
    /// Retained change-log entries.
    pub changes: u64,
    pub last_change_seq: u64,
    /// Image volume files, and how many of them are sealed.
    pub volumes: u64,
    pub volumes_sealed: u64,
    /// The volume images are appended to (0: none yet).
    pub active_volume: u32,
    /// Bytes of committed records in all volumes (headers included).
    pub volume_bytes: u64,
}

/// The space one redb table takes, as redb counts it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TableSpace {
    pub name: String,
    pub entries: u64,
    /// Bytes of the keys and values in its leaf pages.
    pub stored_bytes: u64,
    /// Branch-page keys and other B-tree metadata.
    pub metadata_bytes: u64,
    /// Unused space inside its pages.
    pub fragmented_bytes: u64,
}

impl TableSpace {
    /// Everything the table's pages take.
    pub fn total_bytes(&self) -> u64 {
        self.stored_bytes + self.metadata_bytes + self.fragmented_bytes
    }
}

/// The kind of thing a change-log entry is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeEntity {
    /// key: instrument_id.
    Instrument,
    /// key: patient_key.
    Patient,
    /// key: treatment_key.
    Treatment,
    /// key: dish_key.
    Dish,
    /// key: embryo_key.
    Embryo,
    /// A new acquisition (image run) of an embryo; key: embryo_key. Later focal planes of the
    /// same acquisition add no change.
    Acquisition,
    /// A viewer or API user (audit trail only; user changes are not pushed).
    User,
    /// An embryo transfer and its outcome; key: transfer_key, id: the transfer key in decimal.
    Transfer,
    /// A public API key (audit trail only; key changes are not pushed).
    ApiKey,
    /// A selection model (audit trail only); key: its version, id: its name.
    Model,
    /// A browser viewer's device (audit trail only); id: the device id.
    Device,
}

impl ChangeEntity {
    /// The stable number stored on disk. Append new kinds; never renumber.
    pub fn to_u8(self) -> u8 {
        match self {
            ChangeEntity::Instrument => 1,
            ChangeEntity::Patient => 2,
            ChangeEntity::Treatment => 3,
            ChangeEntity::Dish => 4,
            ChangeEntity::Embryo => 5,
            ChangeEntity::Acquisition => 6,
            ChangeEntity::User => 7,
            ChangeEntity::Transfer => 8,
            ChangeEntity::ApiKey => 9,
            ChangeEntity::Model => 10,
            ChangeEntity::Device => 11,
        }
    }

    pub fn from_u8(value: u8) -> Option<ChangeEntity> {
        match value {
            1 => Some(ChangeEntity::Instrument),
            2 => Some(ChangeEntity::Patient),
            3 => Some(ChangeEntity::Treatment),
            4 => Some(ChangeEntity::Dish),
            5 => Some(ChangeEntity::Embryo),
            6 => Some(ChangeEntity::Acquisition),
            7 => Some(ChangeEntity::User),
            8 => Some(ChangeEntity::Transfer),
            9 => Some(ChangeEntity::ApiKey),
            10 => Some(ChangeEntity::Model),
            11 => Some(ChangeEntity::Device),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ChangeEntity::Instrument => "instrument",
            ChangeEntity::Patient => "patient",
            ChangeEntity::Treatment => "treatment",
            ChangeEntity::Dish => "dish",
            ChangeEntity::Embryo => "embryo",
            ChangeEntity::Acquisition => "acquisition",
            ChangeEntity::User => "user",
            ChangeEntity::Transfer => "transfer",
            ChangeEntity::ApiKey => "api_key",
            ChangeEntity::Model => "model",
            ChangeEntity::Device => "device",
        }
    }
}

/// One change-log entry. Seqs are gapless and increasing; every change has its own.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub seq: u64,
    pub at_ms: i64,
    pub entity: ChangeEntity,
    pub key: u64,
    /// The entity's natural id (serial number, patient id, `patient id/treatment`, dish id,
    /// embryo id).
    pub id: String,
    /// The entity's version after the change; 0 for entities without versions.
    pub version: u64,
    /// Human-readable; carries no patient names.
    pub summary: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VerifyProgress {
    pub images_checked: u64,
    pub images_total: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VerifyReport {
    pub images_checked: u64,
    /// Readable keys of images whose bytes do not match their SHA-256.
    pub damaged_images: Vec<String>,
    /// Invariant violations found.
    pub problems: Vec<String>,
    /// Volume records that no index entry names (the index lost them).
    pub orphan_records: Vec<String>,
    /// Ranges of volumes that hold no readable record. The images they held are listed in
    /// `damaged_images`; a range that held only superseded copies costs nothing.
    pub unreadable_ranges: Vec<String>,
    pub volumes_checked: u64,
    /// Older copies of images stored again (a damaged copy repaired by a resend): not in the
    /// index, harmless, reclaimable.
    pub records_superseded: u64,
    /// Volumes whose local file is gone because their checked copy is in the object store;
    /// their records were checked when they were archived and are not read again here.
    pub volumes_archived: u64,
    /// Images in those volumes (counted in `images_checked`'s total, not read).
    pub images_archived: u64,
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.damaged_images.is_empty() && self.problems.is_empty() && self.orphan_records.is_empty()
    }
}

/// Declares a small enum stored as a stable number and named by a stable snake_case string.
macro_rules! stable_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $number:literal, $text:literal;)+ }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vdoc])* $variant,)+ }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant,)+];

            /// The stable number stored on disk. Append new kinds; never renumber.
            pub fn to_u8(self) -> u8 {
                match self { $($name::$variant => $number,)+ }
            }

            pub fn from_u8(value: u8) -> Option<$name> {
                match value { $($number => Some($name::$variant),)+ _ => None }
            }

            /// The stable name on the wire and in the audit trail.
            pub fn as_str(self) -> &'static str {
                match self { $($name::$variant => $text,)+ }
            }

            pub fn from_name(name: &str) -> Option<$name> {
                $name::ALL.iter().copied().find(|v| v.as_str() == name)
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

stable_enum! {
    /// The decision taken for an embryo.
    Fate {
        Undecided = 0, "undecided";
        Transfer = 1, "transfer";
        Freeze = 2, "freeze";
        Avoid = 3, "avoid";
    }
}

stable_enum! {
    /// Where an annotation came from.
    AnnotationSource {
        Manual = 1, "manual";
        Guided = 2, "guided";
        Automatic = 3, "automatic";
        /// Proposed by the server's computation (a cleavage time from the activity curve) and
        /// accepted by the person who saved it.
        Computed = 4, "computed";
    }
}

stable_enum! {
    /// What a user may do. Each level includes the ones below it.
    Rights {
        /// Read everything.
        View = 1, "view";
        /// Also change clinical data (patients, treatments, annotations, fate, comments).
        Edit = 2, "edit";
        /// Also manage users and the server.
        Admin = 3, "admin";
    }
}

impl Rights {
    /// True when these rights include `needed`.
    pub fn allows(self, needed: Rights) -> bool {
        self >= needed
    }
}

stable_enum! {
    /// What a public API key may do.
    ApiScope {
        /// Read everything the API offers.
        Read = 1, "read";
        /// Also write decisions, outcomes, scores and patient demographics.
        Write = 2, "write";
    }
}

impl ApiScope {
    /// True when this scope includes `needed`.
    pub fn allows(self, needed: ApiScope) -> bool {
        self >= needed
    }
}

stable_enum! {
    /// What became of an audited attempt.
    AuditOutcome {
        Applied = 1, "applied";
        /// Refused: the client's version was stale.
        Conflict = 2, "conflict";
        /// Refused: the user lacks the right.
        Denied = 3, "denied";
        /// Not applied: the stored record was kept (a dish registration's patient details
        /// that differ from the stored ones, `patient.details_differ`). Since schema 9.
        Kept = 4, "kept";
    }
}

/// A patient with its treatments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PatientRecord {
    pub patient_key: u64,
    pub patient_id: String,
    pub first_name: String,
    pub last_name: String,
    pub date_of_birth: String,
    pub version: u64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    /// Ascending by name.
    pub treatments: Vec<TreatmentRecord>,
    /// The original system's identifier (`PatientIDx`, e.g. `ESSERVER_45993.3717631944`).
    pub patient_idx: String,
    /// A dish registration's details that differ from these, not resolved yet.
    pub details_differ: Option<PatientDifference>,
}

/// A dish registration gave other details for a stored patient; the stored ones were kept.
/// An edit of the patient (REST API, viewer) resolves it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PatientDifference {
    pub patient_id: String,
    pub instrument_serial: String,
    pub dish_id: String,
    /// What the registration gave.
    pub first_name: String,
    pub last_name: String,
    pub date_of_birth: String,
    /// When the latest such registration came, and how many did.
    pub at_ms: i64,
    pub times: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TreatmentRecord {
    pub treatment_key: u64,
    pub patient_id: String,
    pub name: String,
    pub comment: String,
    pub version: u64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DishRecord {
    pub dish_key: u64,
    pub dish_id: String,
    pub instrument_serial: String,
    pub instrument_number: u32,
    pub slot: u32,
    pub patient_id: String,
    pub treatment_name: String,
    pub insemination_at_ms: i64,
    pub created_at_ms: i64,
    /// Registered wells with their embryo ids, ascending.
    pub wells: Vec<(u32, String)>,
    /// `ICSI`, `IVF`, ...; empty when not known.
    pub fertilization_method: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EmbryoRecord {
    pub embryo_key: u64,
    pub embryo_id: String,
    pub dish_key: u64,
    pub dish_id: String,
    pub well: u32,
    pub instrument_serial: String,
    pub instrument_number: u32,
    pub patient_id: String,
    pub treatment_name: String,
    pub insemination_at_ms: i64,
    pub version: u64,
    pub fate: Fate,
    pub comment: String,
    pub updated_at_ms: i64,
    /// Its label in the original system's style (`AA1`, `EmbryoDescriptionID`).
    pub label: String,
    /// The dish's fertilization method (`ICSI`, `IVF`, ...); empty when not known.
    pub fertilization_method: String,
    /// Ascending by annotation id (the order they were added).
    pub annotations: Vec<AnnotationRecord>,
    /// Ascending by model name.
    pub scores: Vec<ScoreRecord>,
}

/// A named score of an embryo: a user-defined model's class or a vendor score (KIDScore,
/// iDAScore), with the model version that produced it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScoreRecord {
    pub model: String,
    pub model_version: String,
    pub value: String,
    /// The vendor's viability class or probability, as given; empty when the model has none.
    pub viability: String,
    pub set_by: String,
    pub set_at_ms: i64,
}

/// What became of a transfer. Every field is unknown (`None`) until the EMR reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct TransferOutcome {
    /// Known implantation data: gestational sacs seen on ultrasound.
    pub gestational_sacs: Option<u32>,
    /// Known implantation data: fetal heartbeats seen.
    pub fetal_heartbeats: Option<u32>,
    pub clinical_pregnancy: Option<bool>,
    pub live_birth: Option<bool>,
}

/// An embryo transfer of a treatment, with its outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TransferRecord {
    pub transfer_key: u64,
    pub patient_id: String,
    pub treatment_name: String,
    pub transferred_at_ms: i64,
    /// The embryos transferred, in the order given.
    pub embryo_ids: Vec<String>,
    pub outcome: TransferOutcome,
    pub comment: String,
    pub version: u64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

/// A public API key, without its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiKeyRecord {
    /// The public part of the key (`esk_<key_id>_<secret>`), 16 hex characters.
    pub key_id: String,
    pub name: String,
    pub scope: ApiScope,
    pub created_by: String,
    pub created_at_ms: i64,
    /// 0 while the key is valid.
    pub revoked_at_ms: i64,
    /// Never serialised: only the authentication check reads it.
    #[serde(skip)]
    pub secret_sha256: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AnnotationRecord {
    pub annotation_id: u64,
    pub name: String,
    pub value: String,
    pub event_at_ms: Option<i64>,
    /// Hours after insemination, derived from `event_at_ms` and the dish's insemination time.
    pub hours: Option<f64>,
    pub source: AnnotationSource,
    pub set_by: String,
    pub set_at_ms: i64,
}

/// One version of a selection model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ModelRecord {
    pub name: String,
    pub version: u32,
    /// `hierarchical`, `additive` or `multiplicative`.
    pub kind: String,
    pub imported_by: String,
    pub imported_at_ms: i64,
    /// An evaluation used it: it never changes again.
    pub used: bool,
    /// The model document (`es_models`), as imported.
    pub document: String,
}

/// An embryo's current result of one model.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelResultRecord {
    pub model: String,
    pub version: u32,
    /// `category`, `score` or `not_available`.
    pub outcome: &'static str,
    /// The category, the score, or why there is none.
    pub value: String,
    /// The rule that decided, for a person.
    pub rule: String,
    pub variables: std::collections::BTreeMap<String, f64>,
    pub set_by: String,
    pub set_at_ms: i64,
}

/// One acquisition (image run) of an embryo.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AcquisitionRecord {
    pub acquired_at_ms: i64,
    /// Ascending.
    pub focal_planes: Vec<i32>,
}

/// One frame of a time-lapse or overview read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub acquired_at_ms: i64,
    pub focal_plane: i32,
    pub jpeg: bytes::Bytes,
}

/// Frames of an embryo in time order, read up to a limit or up to the first damaged one.
#[derive(Debug)]
pub struct FrameChunk {
    pub frames: Vec<Frame>,
    /// The read stopped at a damaged frame (`StorageError::ImageDamaged`): `frames` holds
    /// every frame before it, and a read starting after the last of them meets it first.
    pub damaged: Option<crate::StorageError>,
}

impl FrameChunk {
    /// The frames, or the damage when it comes before any frame: a reader that goes on from
    /// after the last frame meets the damaged one at the start of its next read.
    pub fn into_frames(self) -> Result<Vec<Frame>, crate::StorageError> {
        match self.damaged {
            Some(damage) if self.frames.is_empty() => Err(damage),
            _ => Ok(self.frames),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub at_ms: i64,
    pub user: String,
    pub computer: String,
    pub action: String,
    pub entity: ChangeEntity,
    pub target: String,
    pub outcome: AuditOutcome,
    pub before: String,
    pub after: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UserRecord {
    pub name: String,
    pub rights: Rights,
    pub disabled: bool,
    pub failed_logins: u32,
    /// A lock for every address (written by schema 6 and earlier), 0 when none.
    pub locked_until_ms: i64,
    /// Source addresses the account is locked for, each until when (compare with the time).
    pub locks: Vec<(String, i64)>,
    pub created_at_ms: i64,
    pub password_changed_at_ms: i64,
    pub last_login_ms: i64,
    /// Never serialised: only the login check reads it.
    #[serde(skip)]
    pub password_hash: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_entity_numbers_round_trip() {
        let all = [
            ChangeEntity::Instrument,
            ChangeEntity::Patient,
            ChangeEntity::Treatment,
            ChangeEntity::Dish,
            ChangeEntity::Embryo,
            ChangeEntity::Acquisition,
            ChangeEntity::User,
            ChangeEntity::Transfer,
            ChangeEntity::ApiKey,
            ChangeEntity::Model,
            ChangeEntity::Device,
        ];
        for entity in all {
            assert_eq!(ChangeEntity::from_u8(entity.to_u8()), Some(entity));
        }
        assert_eq!(ChangeEntity::from_u8(0), None);
        assert_eq!(ChangeEntity::from_u8(12), None);
        for &fate in Fate::ALL {
            assert_eq!(Fate::from_u8(fate.to_u8()), Some(fate));
            assert_eq!(Fate::from_name(fate.as_str()), Some(fate));
        }
        for &rights in Rights::ALL {
            assert_eq!(Rights::from_u8(rights.to_u8()), Some(rights));
            assert_eq!(Rights::from_name(rights.as_str()), Some(rights));
        }
        for &source in AnnotationSource::ALL {
            assert_eq!(AnnotationSource::from_u8(source.to_u8()), Some(source));
        }
        for &scope in ApiScope::ALL {
            assert_eq!(ApiScope::from_u8(scope.to_u8()), Some(scope));
            assert_eq!(ApiScope::from_name(scope.as_str()), Some(scope));
        }
        assert!(ApiScope::Write.allows(ApiScope::Read) && !ApiScope::Read.allows(ApiScope::Write));
        for &outcome in AuditOutcome::ALL {
            assert_eq!(AuditOutcome::from_u8(outcome.to_u8()), Some(outcome));
        }
        assert!(Rights::Admin.allows(Rights::Edit) && Rights::Edit.allows(Rights::View));
        assert!(!Rights::View.allows(Rights::Edit) && !Rights::Edit.allows(Rights::Admin));
    }
}
