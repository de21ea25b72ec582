//! Reads for viewers and the public API: patients, treatments, dishes, embryos with their
//! annotations and scores, transfers, acquisitions, images and time-lapse frames, users, API
//! keys and the audit trail.

use super::{image_key_text, Reader};
use crate::apply::{get_row, treatment_id};
use crate::error::StorageError;
use crate::limits;
use crate::model::{
    AcquisitionRecord, AnnotationRecord, AnnotationSource, ApiKeyRecord, ApiScope, AuditOutcome,
    AuditRecord, ChangeEntity, DishRecord, EmbryoRecord, Fate, Frame, FrameChunk,
    PatientDifference, PatientRecord, Rights, ScoreRecord, TransferRecord, TreatmentRecord,
    UserRecord,
};
use crate::tables::{
    self, decode, AcquisitionRow, AnnotationRow, ApiKeyRow, AuditRow, DishRow, EmbryoRow,
    InstrumentRow, PatientRow, ScoreRow, TransferRow, TreatmentRow, UserRow, WellKey,
};
use redb::ReadableTable;
use std::ops::Bound;

const HOUR_MS: f64 = 3_600_000.0;

/// Where an embryo is: its well key, row and dish.
struct EmbryoPlace {
    well_key: WellKey,
    row: EmbryoRow,
    dish: DishRow,
}

impl Reader {
    /// One patient with its treatments, by the clinic's patient id.
    pub fn patient(&self, patient_id: &str) -> Result<Option<PatientRecord>, StorageError> {
        let by_id = self.txn.open_table(tables::PATIENT_BY_ID)?;
        let Some(patient_key) = by_id.get(patient_id)?.map(|g| g.value()) else {
            return Ok(None);
        };
        self.patient_by_key(patient_key).map(Some)
    }

    /// Patients with their treatments, ordered by patient id, at most `limit` (capped at
    /// `limits::READ_ROWS_MAX`), after `after_patient_id`.
    pub fn patients(
        &self,
        after_patient_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<PatientRecord>, StorageError> {
        let by_id = self.txn.open_table(tables::PATIENT_BY_ID)?;
        let limit = limit.min(limits::READ_ROWS_MAX) as usize;
        let start = match after_patient_id {
            Some(after) => Bound::Excluded(after),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for entry in by_id.range::<&str>((start, Bound::Unbounded))?.take(limit) {
            let (_, patient_key) = entry?;
            out.push(self.patient_by_key(patient_key.value())?);
        }
        Ok(out)
    }

    /// One patient by the server's key for it (the original API's `PatientIDx`).
    pub fn patient_of_key(&self, patient_key: u64) -> Result<Option<PatientRecord>, StorageError> {
        let patients = self.txn.open_table(tables::PATIENTS)?;
        if patients.get(patient_key)?.is_none() {
            return Ok(None);
        }
        drop(patients);
        self.patient_by_key(patient_key).map(Some)
    }

    /// One patient by the original system's identifier (`PatientIDx`).
    pub fn patient_of_idx(&self, patient_idx: &str) -> Result<Option<PatientRecord>, StorageError> {
        let by_idx = self.txn.open_table(tables::PATIENT_BY_IDX)?;
        let Some(patient_key) = by_idx.get(patient_idx)?.map(|g| g.value()) else {
            return Ok(None);
        };
        drop(by_idx);
        self.patient_by_key(patient_key).map(Some)
    }

    /// The patients whose details a dish registration disagreed with, not resolved yet, by
    /// patient key, at most `limit` (capped at `limits::READ_ROWS_MAX`).
    pub fn patient_differences(&self, limit: u32) -> Result<Vec<PatientDifference>, StorageError> {
        let table = self.txn.open_table(tables::PATIENT_DIFFERENCES)?;
        let limit = limit.min(limits::READ_ROWS_MAX) as usize;
        let patients = self.txn.open_table(tables::PATIENTS)?;
        let mut out = Vec::new();
        for entry in table.iter()?.take(limit) {
            let (key, value) = entry?;
            let row: tables::PatientDifferenceRow = decode(value.value(), "patient difference")?;
            let patient: PatientRow = get_row(&patients, key.value(), "patient")?;
            out.push(difference_record(patient.patient_id, row));
        }
        Ok(out)
    }

    /// Embryos with a score of `model` (compared without regard to case), ascending by
    /// embryo key after `after_embryo_key`, at most `limit` (capped at
    /// `limits::READ_ROWS_MAX`), each with that score. For paging through every scored
    /// embryo of the clinic.
    pub fn scored_embryos(
        &self,
        model: &str,
        after_embryo_key: u64,
        limit: u32,
    ) -> Result<Vec<(EmbryoRecord, ScoreRecord)>, StorageError> {
        let limit = limit.min(limits::READ_ROWS_MAX) as usize;
        let scores = self.txn.open_table(tables::SCORES)?;
        let by_key = self.txn.open_table(tables::EMBRYO_BY_KEY)?;
        let mut out = Vec::new();
        let Some(start) = after_embryo_key.checked_add(1) else {
            return Ok(out);
        };
        let mut last_pushed = None;
        for entry in scores.range((start, "")..)? {
            if out.len() >= limit {
                break;
            }
            let (key, _) = entry?;
            let (embryo_key, name) = key.value();
            // Model names are stored as given: `iDAScore` and `IDASCORE` are one model here,
            // and an embryo is listed once.
            if !name.eq_ignore_ascii_case(model) || last_pushed == Some(embryo_key) {
                continue;
            }
            let Some(well_key) = by_key.get(embryo_key)?.map(|g| g.value()) else {
                return Err(StorageError::Corrupt(format!(
                    "embryo key {embryo_key} has scores but no embryo"
                )));
            };
            let place = self.embryo_place_at(well_key)?;
            let record = self.embryo_record(place)?;
            let Some(score) = record
                .scores
                .iter()
                .find(|s| s.model.eq_ignore_ascii_case(model))
                .cloned()
            else {
                continue;
            };
            last_pushed = Some(embryo_key);
            out.push((record, score));
        }
        Ok(out)
    }

    fn embryo_place_at(&self, well_key: WellKey) -> Result<EmbryoPlace, StorageError> {
        let wells = self.txn.open_table(tables::WELLS)?;
        let Some(bytes) = wells.get(well_key)? else {
            return Err(StorageError::Corrupt(format!(
                "embryo at dish {} well {} is indexed but its well row is missing",
                well_key.0, well_key.1
            )));
        };
        let row: EmbryoRow = decode(bytes.value(), "embryo")?;
        let dishes = self.txn.open_table(tables::DISHES)?;
        let dish: DishRow = get_row(&dishes, well_key.0, "dish")?;
        Ok(EmbryoPlace {
            well_key,
            row,
            dish,
        })
    }

    fn patient_by_key(&self, patient_key: u64) -> Result<PatientRecord, StorageError> {
        let patients = self.txn.open_table(tables::PATIENTS)?;
        let row: PatientRow = get_row(&patients, patient_key, "patient")?;
        let by_name = self.txn.open_table(tables::TREATMENT_BY_PATIENT_NAME)?;
        let treatments = self.txn.open_table(tables::TREATMENTS)?;
        let mut list = Vec::new();
        for entry in by_name.range((patient_key, "")..)? {
            let (key, treatment_key) = entry?;
            if key.value().0 != patient_key {
                break;
            }
            let treatment_key = treatment_key.value();
            let treatment: TreatmentRow = get_row(&treatments, treatment_key, "treatment")?;
            list.push(treatment_record(treatment_key, &row.patient_id, treatment));
        }
        Ok(PatientRecord {
            patient_key,
            patient_id: row.patient_id,
            first_name: row.first_name,
            last_name: row.last_name,
            date_of_birth: row.date_of_birth,
            version: row.version,
            created_at_ms: row.created_at_ms,
            updated_at_ms: row.updated_at_ms,
            treatments: list,
            patient_idx: row.patient_idx,
            details_differ: self
                .txn
                .open_table(tables::PATIENT_DIFFERENCES)?
                .get(patient_key)?
                .map(|bytes| decode(bytes.value(), "patient difference"))
                .transpose()?
                .map(|difference| difference_record(String::new(), difference)),
        })
        .map(|mut record| {
            if let Some(difference) = &mut record.details_differ {
                difference.patient_id.clone_from(&record.patient_id);
            }
            record
        })
    }

    fn treatment_key(&self, patient_id: &str, name: &str) -> Result<Option<u64>, StorageError> {
        let by_id = self.txn.open_table(tables::PATIENT_BY_ID)?;
        let Some(patient_key) = by_id.get(patient_id)?.map(|g| g.value()) else {
            return Ok(None);
        };
        let by_name = self.txn.open_table(tables::TREATMENT_BY_PATIENT_NAME)?;
        Ok(by_name.get((patient_key, name))?.map(|g| g.value()))
    }

    pub fn treatment(
        &self,
        patient_id: &str,
        name: &str,
    ) -> Result<Option<TreatmentRecord>, StorageError> {
        let Some(treatment_key) = self.treatment_key(patient_id, name)? else {
            return Ok(None);
        };
        let treatments = self.txn.open_table(tables::TREATMENTS)?;
        let row: TreatmentRow = get_row(&treatments, treatment_key, "treatment")?;
        Ok(Some(treatment_record(treatment_key, patient_id, row)))
    }

    /// The culture dishes of a treatment, by dish key; None if the treatment is unknown.
    pub fn treatment_dishes(
        &self,
        patient_id: &str,
        name: &str,
    ) -> Result<Option<Vec<DishRecord>>, StorageError> {
        let Some(treatment_key) = self.treatment_key(patient_id, name)? else {
            return Ok(None);
        };
        let index = self.txn.open_table(tables::DISH_BY_TREATMENT)?;
        let mut out = Vec::new();
        for entry in index.range((treatment_key, 0)..=(treatment_key, u64::MAX))? {
            let (key, _) = entry?;
            if let Some(dish) = self.dish(key.value().1)? {
                out.push(dish);
            }
        }
        Ok(Some(out))
    }

    pub fn dish(&self, dish_key: u64) -> Result<Option<DishRecord>, StorageError> {
        let dishes = self.txn.open_table(tables::DISHES)?;
        let Some(bytes) = dishes.get(dish_key)? else {
            return Ok(None);
        };
        let row: DishRow = decode(bytes.value(), "dish")?;
        let (patient_id, treatment_name) = self.treatment_names(row.treatment_key)?;
        let instrument = self.instrument_row(row.instrument_id)?;
        let wells = self.txn.open_table(tables::WELLS)?;
        let mut well_list = Vec::new();
        for entry in wells.range((dish_key, 0)..=(dish_key, u32::MAX))? {
            let (key, value) = entry?;
            let embryo: EmbryoRow = decode(value.value(), "embryo")?;
            well_list.push((key.value().1, embryo.embryo_id));
        }
        Ok(Some(DishRecord {
            dish_key,
            dish_id: row.dish_id,
            instrument_serial: instrument.serial,
            instrument_number: instrument.number,
            slot: row.slot,
            patient_id,
            treatment_name,
            insemination_at_ms: row.insemination_at_ms,
            created_at_ms: row.created_at_ms,
            wells: well_list,
            fertilization_method: row.fertilization_method,
        }))
    }

    fn instrument_row(&self, instrument_id: u64) -> Result<InstrumentRow, StorageError> {
        let instruments = self.txn.open_table(tables::INSTRUMENTS)?;
        get_row(&instruments, instrument_id, "instrument")
    }

    /// (patient id, treatment name) of a treatment key.
    fn treatment_names(&self, treatment_key: u64) -> Result<(String, String), StorageError> {
        let treatments = self.txn.open_table(tables::TREATMENTS)?;
        let treatment: TreatmentRow = get_row(&treatments, treatment_key, "treatment")?;
        let patients = self.txn.open_table(tables::PATIENTS)?;
        let patient: PatientRow = get_row(&patients, treatment.patient_key, "patient")?;
        Ok((patient.patient_id, treatment.name))
    }

    fn embryo_place(&self, embryo_id: &str) -> Result<Option<EmbryoPlace>, StorageError> {
        let by_id = self.txn.open_table(tables::EMBRYO_BY_ID)?;
        let Some(well_key) = by_id.get(embryo_id)?.map(|g| g.value()) else {
            return Ok(None);
        };
        let wells = self.txn.open_table(tables::WELLS)?;
        let Some(bytes) = wells.get(well_key)? else {
            return Err(StorageError::Corrupt(format!(
                "embryo {embryo_id} is indexed but its well row is missing"
            )));
        };
        let row: EmbryoRow = decode(bytes.value(), "embryo")?;
        let dishes = self.txn.open_table(tables::DISHES)?;
        let dish: DishRow = get_row(&dishes, well_key.0, "dish")?;
        Ok(Some(EmbryoPlace {
            well_key,
            row,
            dish,
        }))
    }

    /// One embryo with its annotations, fate and comment.
    pub fn embryo(&self, embryo_id: &str) -> Result<Option<EmbryoRecord>, StorageError> {
        let Some(place) = self.embryo_place(embryo_id)? else {
            return Ok(None);
        };
        self.embryo_record(place).map(Some)
    }

    /// The embryos of a dish, by well.
    pub fn dish_embryos(&self, dish_key: u64) -> Result<Vec<EmbryoRecord>, StorageError> {
        let dishes = self.txn.open_table(tables::DISHES)?;
        let Some(bytes) = dishes.get(dish_key)? else {
            return Ok(Vec::new());
        };
        let dish: DishRow = decode(bytes.value(), "dish")?;
        let wells = self.txn.open_table(tables::WELLS)?;
        let mut out = Vec::new();
        for entry in wells.range((dish_key, 0)..=(dish_key, u32::MAX))? {
            let (key, value) = entry?;
            let row: EmbryoRow = decode(value.value(), "embryo")?;
            out.push(self.embryo_record(EmbryoPlace {
                well_key: key.value(),
                row,
                dish: dish.clone(),
            })?);
        }
        Ok(out)
    }

    fn embryo_record(&self, place: EmbryoPlace) -> Result<EmbryoRecord, StorageError> {
        let EmbryoPlace {
            well_key,
            row,
            dish,
        } = place;
        let (patient_id, treatment_name) = self.treatment_names(dish.treatment_key)?;
        let instrument = self.instrument_row(dish.instrument_id)?;
        let table = self.txn.open_table(tables::ANNOTATIONS)?;
        let mut annotations = Vec::new();
        for entry in table.range((row.embryo_key, 0)..=(row.embryo_key, u64::MAX))? {
            let (key, value) = entry?;
            let annotation: AnnotationRow = decode(value.value(), "annotation")?;
            annotations.push(annotation_record(
                key.value().1,
                annotation,
                dish.insemination_at_ms,
            ));
        }
        let scores_table = self.txn.open_table(tables::SCORES)?;
        let mut scores = Vec::new();
        for entry in scores_table.range((row.embryo_key, "")..)? {
            let (key, value) = entry?;
            let (embryo_key, model) = key.value();
            if embryo_key != row.embryo_key {
                break;
            }
            let score: ScoreRow = decode(value.value(), "score")?;
            scores.push(ScoreRecord {
                model: model.to_string(),
                model_version: score.model_version,
                value: score.value,
                viability: score.viability,
                set_by: score.set_by,
                set_at_ms: score.set_at_ms,
            });
        }
        Ok(EmbryoRecord {
            embryo_key: row.embryo_key,
            embryo_id: row.embryo_id,
            dish_key: well_key.0,
            dish_id: dish.dish_id,
            well: well_key.1,
            instrument_serial: instrument.serial,
            instrument_number: instrument.number,
            patient_id,
            treatment_name,
            insemination_at_ms: dish.insemination_at_ms,
            version: row.version,
            fate: Fate::from_u8(row.fate).unwrap_or(Fate::Undecided),
            comment: row.comment,
            updated_at_ms: row.updated_at_ms,
            label: row.label,
            fertilization_method: dish.fertilization_method,
            annotations,
            scores,
        })
    }

    /// The embryo id of an embryo key (change-log entries name embryos by key).
    pub fn embryo_id_of_key(&self, embryo_key: u64) -> Result<Option<String>, StorageError> {
        let by_key = self.txn.open_table(tables::EMBRYO_BY_KEY)?;
        let Some(well_key) = by_key.get(embryo_key)?.map(|g| g.value()) else {
            return Ok(None);
        };
        let wells = self.txn.open_table(tables::WELLS)?;
        match wells.get(well_key)? {
            Some(bytes) => Ok(Some(
                decode::<EmbryoRow>(bytes.value(), "embryo")?.embryo_id,
            )),
            None => Ok(None),
        }
    }

    /// Acquisitions of an embryo after `after_ms` (exclusive), ascending, at most `limit`
    /// (capped at `limits::READ_ROWS_MAX`). None if the embryo is unknown.
    pub fn acquisitions(
        &self,
        embryo_id: &str,
        after_ms: Option<i64>,
        limit: u32,
    ) -> Result<Option<Vec<AcquisitionRecord>>, StorageError> {
        let by_id = self.txn.open_table(tables::EMBRYO_BY_ID)?;
        let Some((dish_key, well)) = by_id.get(embryo_id)?.map(|g| g.value()) else {
            return Ok(None);
        };
        let table = self.txn.open_table(tables::ACQUISITIONS)?;
        let start = match after_ms {
            Some(after) => Bound::Excluded((dish_key, well, after)),
            None => Bound::Included((dish_key, well, i64::MIN)),
        };
        let end = Bound::Included((dish_key, well, i64::MAX));
        let limit = limit.min(limits::READ_ROWS_MAX) as usize;
        let mut out = Vec::new();
        for entry in table.range::<(u64, u32, i64)>((start, end))?.take(limit) {
            let (key, value) = entry?;
            let row = AcquisitionRow::decode(value.value())?;
            out.push(AcquisitionRecord {
                acquired_at_ms: key.value().2,
                focal_planes: row.focal_planes(),
            });
        }
        Ok(Some(out))
    }

    /// One image of an embryo, its SHA-256 checked. None if the embryo or image is unknown.
    pub fn embryo_image(
        &self,
        embryo_id: &str,
        acquired_at_ms: i64,
        focal_plane: i32,
    ) -> Result<Option<bytes::Bytes>, StorageError> {
        let Some(place) = self.embryo_place(embryo_id)? else {
            return Ok(None);
        };
        let (dish_key, well) = place.well_key;
        let Some(location) = self.location(dish_key, well, acquired_at_ms, focal_plane)? else {
            return Ok(None);
        };
        let key = (dish_key, well, acquired_at_ms, focal_plane);
        let text = || {
            image_key_text(
                place.dish.instrument_id,
                &place.dish.dish_id,
                well,
                focal_plane,
                acquired_at_ms,
            )
        };
        self.read_jpeg(location, key, text).map(Some)
    }

    /// Time-lapse frames of an embryo at one focal plane, acquisitions from `from_ms` to
    /// `to_ms` inclusive, ascending, at most `limit` frames (capped at
    /// `limits::READ_ROWS_MAX`). Acquisitions without that plane are skipped. None if the
    /// embryo is unknown. A damaged frame (or an archived one the object store cannot give
    /// now) ends the chunk: the frames before it are returned with the error
    /// (`FrameChunk::damaged`), so a playback or export ends exactly there.
    pub fn frames(
        &self,
        embryo_id: &str,
        focal_plane: i32,
        from_ms: i64,
        to_ms: i64,
        limit: u32,
    ) -> Result<Option<FrameChunk>, StorageError> {
        let Some(place) = self.embryo_place(embryo_id)? else {
            return Ok(None);
        };
        let (dish_key, well) = place.well_key;
        let acquisitions = self.txn.open_table(tables::ACQUISITIONS)?;
        let limit = limit.min(limits::READ_ROWS_MAX) as usize;
        let mut out = Vec::new();
        if from_ms > to_ms {
            return Ok(Some(FrameChunk {
                frames: out,
                damaged: None,
            }));
        }
        for entry in acquisitions.range((dish_key, well, from_ms)..=(dish_key, well, to_ms))? {
            if out.len() >= limit {
                break;
            }
            let (key, value) = entry?;
            let acquired_at_ms = key.value().2;
            let row = AcquisitionRow::decode(value.value())?;
            let Some(location) = row.location(focal_plane) else {
                continue;
            };
            let key = (dish_key, well, acquired_at_ms, focal_plane);
            let text = || {
                image_key_text(
                    place.dish.instrument_id,
                    &place.dish.dish_id,
                    well,
                    focal_plane,
                    acquired_at_ms,
                )
            };
            let jpeg = match self.read_jpeg(location, key, text) {
                Ok(jpeg) => jpeg,
                // A damaged frame, or an archived one the object store cannot give now, ends
                // the chunk after the frames before it.
                Err(
                    damage @ (StorageError::ImageDamaged { .. }
                    | StorageError::ArchiveUnavailable { .. }),
                ) => {
                    return Ok(Some(FrameChunk {
                        frames: out,
                        damaged: Some(damage),
                    }));
                }
                Err(error) => return Err(error),
            };
            out.push(Frame {
                acquired_at_ms,
                focal_plane,
                jpeg,
            });
        }
        Ok(Some(FrameChunk {
            frames: out,
            damaged: None,
        }))
    }

    /// The latest image of every well of a dish: at `focal_plane` when that acquisition has
    /// it, else at the stored plane nearest to it. Wells without images have no frame.
    pub fn dish_overview(
        &self,
        dish_key: u64,
        focal_plane: i32,
    ) -> Result<Vec<(u32, String, Option<Frame>)>, StorageError> {
        let wells = self.txn.open_table(tables::WELLS)?;
        let acquisitions = self.txn.open_table(tables::ACQUISITIONS)?;
        let mut out = Vec::new();
        for entry in wells.range((dish_key, 0)..=(dish_key, u32::MAX))? {
            let (key, value) = entry?;
            let well = key.value().1;
            let embryo: EmbryoRow = decode(value.value(), "embryo")?;
            let latest = acquisitions
                .range((dish_key, well, i64::MIN)..=(dish_key, well, i64::MAX))?
                .next_back()
                .transpose()?;
            let Some((acquisition_key, acquisition)) = latest else {
                out.push((well, embryo.embryo_id, None));
                continue;
            };
            let acquired_at_ms = acquisition_key.value().2;
            let row = AcquisitionRow::decode(acquisition.value())?;
            let Some(plane) = row
                .planes
                .iter()
                .min_by_key(|plane| (i64::from(plane.focal_plane) - i64::from(focal_plane)).abs())
            else {
                out.push((well, embryo.embryo_id, None));
                continue;
            };
            let key = (dish_key, well, acquired_at_ms, plane.focal_plane);
            let text = || format!("dish {dish_key} well {well} at {acquired_at_ms}");
            let frame = Some(Frame {
                acquired_at_ms,
                focal_plane: plane.focal_plane,
                jpeg: self.read_jpeg(plane.location, key, text)?,
            });
            out.push((well, embryo.embryo_id, frame));
        }
        Ok(out)
    }

    /// The transfers of a treatment, oldest first; None if the treatment is unknown.
    pub fn treatment_transfers(
        &self,
        patient_id: &str,
        name: &str,
    ) -> Result<Option<Vec<TransferRecord>>, StorageError> {
        let Some(treatment_key) = self.treatment_key(patient_id, name)? else {
            return Ok(None);
        };
        let index = self.txn.open_table(tables::TRANSFER_BY_TREATMENT)?;
        let mut out = Vec::new();
        for entry in index.range((treatment_key, 0)..=(treatment_key, u64::MAX))? {
            let (key, _) = entry?;
            if let Some(transfer) = self.transfer(key.value().1)? {
                out.push(transfer);
            }
        }
        Ok(Some(out))
    }

    /// One transfer by its key.
    pub fn transfer(&self, transfer_key: u64) -> Result<Option<TransferRecord>, StorageError> {
        let transfers = self.txn.open_table(tables::TRANSFERS)?;
        let Some(bytes) = transfers.get(transfer_key)? else {
            return Ok(None);
        };
        let row: TransferRow = decode(bytes.value(), "transfer")?;
        let (patient_id, treatment_name) = self.treatment_names(row.treatment_key)?;
        let mut embryo_ids = Vec::with_capacity(row.embryo_keys.len());
        for &embryo_key in &row.embryo_keys {
            let id = self.embryo_id_of_key(embryo_key)?.ok_or_else(|| {
                StorageError::Corrupt(format!(
                    "transfer {transfer_key} names embryo key {embryo_key}, which is unknown"
                ))
            })?;
            embryo_ids.push(id);
        }
        Ok(Some(TransferRecord {
            transfer_key,
            patient_id,
            treatment_name,
            transferred_at_ms: row.transferred_at_ms,
            embryo_ids,
            outcome: row.outcome,
            comment: row.comment,
            version: row.version,
            created_at_ms: row.created_at_ms,
            updated_at_ms: row.updated_at_ms,
        }))
    }

    /// One API key by its id (the public part of the key).
    pub fn api_key(&self, key_id: &str) -> Result<Option<ApiKeyRecord>, StorageError> {
        let keys = self.txn.open_table(tables::API_KEYS)?;
        match keys.get(key_id)? {
            Some(bytes) => Ok(Some(api_key_record(
                key_id,
                decode(bytes.value(), "API key")?,
            )?)),
            None => Ok(None),
        }
    }

    /// Every API key, revoked ones included, by id.
    pub fn api_keys(&self) -> Result<Vec<ApiKeyRecord>, StorageError> {
        let keys = self.txn.open_table(tables::API_KEYS)?;
        let mut out = Vec::new();
        for entry in keys.iter()? {
            let (key, value) = entry?;
            out.push(api_key_record(
                key.value(),
                decode(value.value(), "API key")?,
            )?);
        }
        Ok(out)
    }

    pub fn user(&self, name: &str) -> Result<Option<UserRecord>, StorageError> {
        let users = self.txn.open_table(tables::USERS)?;
        match users.get(name)? {
            Some(bytes) => {
                let mut record = user_record(name, decode(bytes.value(), "user")?)?;
                record.locks = self.login_locks(name)?;
                Ok(Some(record))
            }
            None => Ok(None),
        }
    }

    /// The account a login names: the user of exactly that name, or else the one user whose
    /// name equals it without regard to case (`WEB` logs in as `Web`, as on the original's
    /// Windows accounts). None when there is none (or, which `user add` prevents, several).
    pub fn user_for_login(&self, name: &str) -> Result<Option<UserRecord>, StorageError> {
        if let Some(record) = self.user(name)? {
            return Ok(Some(record));
        }
        let folded = name.to_lowercase();
        let users = self.txn.open_table(tables::USERS)?;
        let mut found = None;
        for entry in users.iter()? {
            let (key, _) = entry?;
            if key.value().to_lowercase() == folded {
                if found.is_some() {
                    return Ok(None);
                }
                found = Some(key.value().to_string());
            }
        }
        drop(users);
        match found {
            Some(stored) => self.user(&stored),
            None => Ok(None),
        }
    }

    /// The addresses `name` is locked for (or was: compare the instants with the time).
    fn login_locks(&self, name: &str) -> Result<Vec<(String, i64)>, StorageError> {
        let table = match self.txn.open_table(tables::LOGIN_FAILURES) {
            Ok(table) => table,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
            Err(error) => return Err(error.into()),
        };
        let mut out = Vec::new();
        for entry in table.range((name, "")..)? {
            let (key, value) = entry?;
            let (user, address) = key.value();
            if user != name {
                break;
            }
            let row: tables::LoginFailureRow = decode(value.value(), "login failures")?;
            if row.locked_until_ms > 0 {
                out.push((address.to_string(), row.locked_until_ms));
            }
        }
        Ok(out)
    }

    /// Every user, by name.
    pub fn users(&self) -> Result<Vec<UserRecord>, StorageError> {
        let users = self.txn.open_table(tables::USERS)?;
        let mut out = Vec::new();
        for entry in users.iter()? {
            let (key, value) = entry?;
            let mut record = user_record(key.value(), decode(value.value(), "user")?)?;
            record.locks = self.login_locks(key.value())?;
            out.push(record);
        }
        Ok(out)
    }

    /// Audit rows with seq > `after`, ascending, at most `limit` (capped at
    /// `limits::READ_ROWS_MAX`).
    pub fn audit_after(&self, after: u64, limit: u32) -> Result<Vec<AuditRecord>, StorageError> {
        let audit = self.txn.open_table(tables::AUDIT)?;
        let limit = limit.min(limits::READ_ROWS_MAX) as usize;
        let mut out = Vec::new();
        for entry in audit
            .range::<u64>((Bound::Excluded(after), Bound::Unbounded))?
            .take(limit)
        {
            let (key, value) = entry?;
            let seq = key.value();
            let row: AuditRow = decode(value.value(), "audit")?;
            let entity = ChangeEntity::from_u8(row.entity).ok_or_else(|| {
                StorageError::Corrupt(format!("audit row {seq} has unknown entity"))
            })?;
            let outcome = AuditOutcome::from_u8(row.outcome).ok_or_else(|| {
                StorageError::Corrupt(format!("audit row {seq} has unknown outcome"))
            })?;
            out.push(AuditRecord {
                seq,
                at_ms: row.at_ms,
                user: row.user,
                computer: row.computer,
                action: row.action,
                entity,
                target: row.target,
                outcome,
                before: row.before,
                after: row.after,
            });
        }
        Ok(out)
    }
}

fn difference_record(patient_id: String, row: tables::PatientDifferenceRow) -> PatientDifference {
    PatientDifference {
        patient_id,
        instrument_serial: row.instrument_serial,
        dish_id: row.dish_id,
        first_name: row.first_name,
        last_name: row.last_name,
        date_of_birth: row.date_of_birth,
        at_ms: row.at_ms,
        times: row.times,
    }
}

fn treatment_record(treatment_key: u64, patient_id: &str, row: TreatmentRow) -> TreatmentRecord {
    debug_assert!(!treatment_id(patient_id, &row.name).is_empty());
    TreatmentRecord {
        treatment_key,
        patient_id: patient_id.to_string(),
        name: row.name,
        comment: row.comment,
        version: row.version,
        created_at_ms: row.created_at_ms,
        updated_at_ms: row.updated_at_ms,
    }
}

fn annotation_record(
    annotation_id: u64,
    row: AnnotationRow,
    insemination_at_ms: i64,
) -> AnnotationRecord {
    AnnotationRecord {
        annotation_id,
        hours: row
            .event_at_ms
            .map(|at| at.saturating_sub(insemination_at_ms) as f64 / HOUR_MS),
        name: row.name,
        value: row.value,
        event_at_ms: row.event_at_ms,
        source: AnnotationSource::from_u8(row.source).unwrap_or(AnnotationSource::Manual),
        set_by: row.set_by,
        set_at_ms: row.set_at_ms,
    }
}

fn user_record(name: &str, row: UserRow) -> Result<UserRecord, StorageError> {
    let rights = Rights::from_u8(row.rights)
        .ok_or_else(|| StorageError::Corrupt(format!("user {name} has unknown rights")))?;
    Ok(UserRecord {
        name: name.to_string(),
        rights,
        disabled: row.disabled,
        failed_logins: row.failed_logins,
        locked_until_ms: row.locked_until_ms,
        locks: Vec::new(),
        created_at_ms: row.created_at_ms,
        password_changed_at_ms: row.password_changed_at_ms,
        last_login_ms: row.last_login_ms,
        password_hash: row.password_hash,
    })
}

fn api_key_record(key_id: &str, row: ApiKeyRow) -> Result<ApiKeyRecord, StorageError> {
    let scope = ApiScope::from_u8(row.scope)
        .ok_or_else(|| StorageError::Corrupt(format!("API key {key_id} has unknown scope")))?;
    Ok(ApiKeyRecord {
        key_id: key_id.to_string(),
        name: row.name,
        scope,
        created_by: row.created_by,
        created_at_ms: row.created_at_ms,
        revoked_at_ms: row.revoked_at_ms,
        secret_sha256: row.secret_sha256,
    })
}
