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
}

impl VerifyReport {
    pub fn is_clean(&self) -> bool {
        self.damaged_images.is_empty() && self.problems.is_empty()
    }
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
        ];
        for entity in all {
            assert_eq!(ChangeEntity::from_u8(entity.to_u8()), Some(entity));
        }
        assert_eq!(ChangeEntity::from_u8(0), None);
        assert_eq!(ChangeEntity::from_u8(7), None);
    }
}
