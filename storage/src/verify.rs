//! `Store::verify`: every image's SHA-256 and the schema's invariants, from one read snapshot.
//! Findings go into the report; only a failure to read at all is an `Err`.

use crate::apply::read_state;
use crate::error::StorageError;
use crate::model::{ChangeEntity, VerifyProgress, VerifyReport};
use crate::reader::image_key_text;
use crate::tables::{self, decode, AcquisitionRow, ChangeRow, DishRow, ImageValue, StateRow};
use redb::{ReadTransaction, ReadableTableMetadata};
use std::collections::HashMap;

/// Progress is reported after every this many images.
const PROGRESS_IMAGES_INTERVAL: u64 = 1000;
/// Each list of the report keeps at most this many entries, then one "... more" line.
const REPORT_ITEMS_MAX: usize = 10_000;

pub(crate) fn verify(
    txn: &ReadTransaction,
    progress: &mut dyn FnMut(VerifyProgress),
) -> Result<VerifyReport, StorageError> {
    let state = read_state(&txn.open_table(tables::META)?)?;
    let mut report = Report::default();
    let image_totals = check_images(txn, &mut report, progress)?;
    let planes_total = check_acquisitions(txn, &mut report)?;
    if planes_total != image_totals.images {
        report.problem(format!(
            "acquisitions list {planes_total} focal planes but {} images are stored",
            image_totals.images
        ));
    }
    check_wells(txn, &mut report)?;
    check_changes(txn, &state, &mut report)?;
    check_audit(txn, &state, &mut report)?;
    check_counters(txn, &state, &image_totals, &mut report)?;
    Ok(report.finish(image_totals.images))
}

#[derive(Default)]
struct Report {
    damaged_images: Vec<String>,
    damaged_more: u64,
    problems: Vec<String>,
    problems_more: u64,
}

impl Report {
    fn damaged(&mut self, key: String) {
        tracing::error!(%key, "verify: damaged image");
        if self.damaged_images.len() < REPORT_ITEMS_MAX {
            self.damaged_images.push(key);
        } else {
            self.damaged_more += 1;
        }
    }

    fn problem(&mut self, problem: String) {
        tracing::error!(%problem, "verify: invariant violated");
        if self.problems.len() < REPORT_ITEMS_MAX {
            self.problems.push(problem);
        } else {
            self.problems_more += 1;
        }
    }

    fn finish(mut self, images_checked: u64) -> VerifyReport {
        if self.damaged_more > 0 {
            let more = format!("... and {} more damaged images", self.damaged_more);
            self.damaged_images.push(more);
        }
        if self.problems_more > 0 {
            let more = format!("... and {} more problems", self.problems_more);
            self.problems.push(more);
        }
        VerifyReport {
            images_checked,
            damaged_images: self.damaged_images,
            problems: self.problems,
        }
    }
}

#[derive(Default)]
struct ImageTotals {
    images: u64,
    image_bytes: u64,
}

/// Readable names of dishes, looked up on demand for messages.
struct DishNames<'t> {
    dishes: &'t redb::ReadOnlyTable<u64, &'static [u8]>,
    cache: HashMap<u64, (u64, String)>,
    exists: HashMap<u64, bool>,
}

impl DishNames<'_> {
    /// True when the dish row exists (looked up once per dish).
    fn exists(&mut self, dish_key: u64) -> Result<bool, StorageError> {
        if let Some(&exists) = self.exists.get(&dish_key) {
            return Ok(exists);
        }
        let exists = self.dishes.get(dish_key)?.is_some();
        self.exists.insert(dish_key, exists);
        Ok(exists)
    }

    fn image_key(&mut self, key: tables::ImageKey) -> Result<String, StorageError> {
        let (dish_key, well, acquired_at_ms, focal_plane) = key;
        if !self.cache.contains_key(&dish_key) {
            let name = match self.dishes.get(dish_key)? {
                Some(bytes) => match decode::<DishRow>(bytes.value(), "dish") {
                    Ok(row) => (row.instrument_id, row.dish_id),
                    Err(_) => (0, format!("<undecodable dish {dish_key}>")),
                },
                None => (0, format!("<missing dish {dish_key}>")),
            };
            self.cache.insert(dish_key, name);
        }
        let (instrument_id, dish_id) = &self.cache[&dish_key];
        Ok(image_key_text(
            *instrument_id,
            dish_id,
            well,
            focal_plane,
            acquired_at_ms,
        ))
    }
}

fn check_images(
    txn: &ReadTransaction,
    report: &mut Report,
    progress: &mut dyn FnMut(VerifyProgress),
) -> Result<ImageTotals, StorageError> {
    let images = txn.open_table(tables::IMAGES)?;
    let wells = txn.open_table(tables::WELLS)?;
    let acquisitions = txn.open_table(tables::ACQUISITIONS)?;
    let dishes = txn.open_table(tables::DISHES)?;
    let mut names = DishNames {
        dishes: &dishes,
        cache: HashMap::new(),
        exists: HashMap::new(),
    };
    let images_total = images.len()?;
    let mut totals = ImageTotals::default();
    // Images are sorted by acquisition, so the acquisition row is decoded once per acquisition.
    let mut acquisition: Option<(tables::AcquisitionKey, Option<AcquisitionRow>)> = None;
    for entry in images.range::<tables::ImageKey>(..)? {
        let (key, value) = entry?;
        let key = key.value();
        let (dish_key, well, acquired_at_ms, focal_plane) = key;
        totals.images += 1;
        match ImageValue::decode(value.value()) {
            Ok(image) => {
                totals.image_bytes += image.jpeg.len() as u64;
                if !image.is_intact() {
                    report.damaged(names.image_key(key)?);
                }
            }
            Err(error) => report.damaged(format!("{} ({error})", names.image_key(key)?)),
        }
        if !names.exists(dish_key)? {
            let text = names.image_key(key)?;
            report.problem(format!("image {text} has no dish"));
        }
        if wells.get((dish_key, well))?.is_none() {
            let text = names.image_key(key)?;
            report.problem(format!("image {text} has no registered well"));
        }
        let acquisition_key = (dish_key, well, acquired_at_ms);
        if acquisition.as_ref().map(|(k, _)| *k) != Some(acquisition_key) {
            let row = match acquisitions.get(acquisition_key)? {
                // A bad row is reported (check_acquisitions) and the walk goes on.
                Some(bytes) => decode::<AcquisitionRow>(bytes.value(), "acquisition").ok(),
                None => None,
            };
            acquisition = Some((acquisition_key, row));
        }
        let listed = acquisition
            .as_ref()
            .and_then(|(_, row)| row.as_ref())
            .is_some_and(|row| row.focal_planes.binary_search(&focal_plane).is_ok());
        if !listed {
            let text = names.image_key(key)?;
            report.problem(format!("image {text} is not listed in its acquisition row"));
        }
        if totals.images % PROGRESS_IMAGES_INTERVAL == 0 {
            progress(VerifyProgress {
                images_checked: totals.images,
                images_total,
            });
        }
    }
    progress(VerifyProgress {
        images_checked: totals.images,
        images_total,
    });
    Ok(totals)
}

/// Returns the number of focal planes listed over all acquisitions.
fn check_acquisitions(txn: &ReadTransaction, report: &mut Report) -> Result<u64, StorageError> {
    let acquisitions = txn.open_table(tables::ACQUISITIONS)?;
    let wells = txn.open_table(tables::WELLS)?;
    let mut planes_total: u64 = 0;
    for entry in acquisitions.range::<tables::AcquisitionKey>(..)? {
        let (key, value) = entry?;
        let (dish_key, well, acquired_at_ms) = key.value();
        let row: AcquisitionRow = match decode(value.value(), "acquisition") {
            Ok(row) => row,
            Err(error) => {
                report.problem(error.to_string());
                continue;
            }
        };
        planes_total += row.focal_planes.len() as u64;
        let sorted = row.focal_planes.windows(2).all(|pair| pair[0] < pair[1]);
        if row.focal_planes.is_empty() || !sorted {
            report.problem(format!(
                "acquisition (dish {dish_key} well {well} at {acquired_at_ms}) has \
                 empty or unsorted focal planes"
            ));
        }
        if wells.get((dish_key, well))?.is_none() {
            report.problem(format!(
                "acquisition (dish {dish_key} well {well} at {acquired_at_ms}) has no well"
            ));
        }
    }
    Ok(planes_total)
}

/// Every well (embryo) belongs to an existing dish.
fn check_wells(txn: &ReadTransaction, report: &mut Report) -> Result<(), StorageError> {
    let wells = txn.open_table(tables::WELLS)?;
    let dishes = txn.open_table(tables::DISHES)?;
    let mut last_dish: Option<(u64, bool)> = None;
    for entry in wells.range::<tables::WellKey>(..)? {
        let (key, _) = entry?;
        let (dish_key, well) = key.value();
        let exists = match last_dish {
            Some((key, exists)) if key == dish_key => exists,
            _ => dishes.get(dish_key)?.is_some(),
        };
        last_dish = Some((dish_key, exists));
        if !exists {
            report.problem(format!("well {well} of dish {dish_key} has no dish"));
        }
    }
    Ok(())
}

fn check_changes(
    txn: &ReadTransaction,
    state: &StateRow,
    report: &mut Report,
) -> Result<(), StorageError> {
    let changes = txn.open_table(tables::CHANGES)?;
    let mut expected = state.change_oldest_seq;
    for entry in changes.range::<u64>(..)? {
        let (key, value) = entry?;
        let seq = key.value();
        if seq != expected {
            report.problem(format!(
                "change log gap: expected seq {expected}, found {seq}"
            ));
        }
        expected = seq.saturating_add(1);
        match decode::<ChangeRow>(value.value(), "change") {
            Ok(row) if ChangeEntity::from_u8(row.entity).is_some() => {}
            Ok(row) => report.problem(format!("change {seq} has unknown entity {}", row.entity)),
            Err(error) => report.problem(format!("change {seq}: {error}")),
        }
    }
    if expected != state.change_last_seq.saturating_add(1) {
        report.problem(format!(
            "change log ends at seq {}, but the last change seq is {}",
            expected.saturating_sub(1),
            state.change_last_seq
        ));
    }
    Ok(())
}

/// The audit trail is never pruned: seqs 1..=audit_last_seq, every row readable.
fn check_audit(
    txn: &ReadTransaction,
    state: &StateRow,
    report: &mut Report,
) -> Result<(), StorageError> {
    let audit = txn.open_table(tables::AUDIT)?;
    let mut expected = 1u64;
    for entry in audit.range::<u64>(..)? {
        let (key, value) = entry?;
        let seq = key.value();
        if seq != expected {
            report.problem(format!(
                "audit trail gap: expected seq {expected}, found {seq}"
            ));
        }
        expected = seq.saturating_add(1);
        if let Err(error) = decode::<tables::AuditRow>(value.value(), "audit") {
            report.problem(format!("audit row {seq}: {error}"));
        }
    }
    if expected != state.audit_last_seq.saturating_add(1) {
        report.problem(format!(
            "audit trail ends at seq {}, but the last audit seq is {}",
            expected.saturating_sub(1),
            state.audit_last_seq
        ));
    }
    Ok(())
}

fn check_counters(
    txn: &ReadTransaction,
    state: &StateRow,
    images: &ImageTotals,
    report: &mut Report,
) -> Result<(), StorageError> {
    let ims_state = crate::apply::read_ims_state(&txn.open_table(tables::META)?)?;
    let counts = [
        (
            "instruments",
            state.instruments,
            txn.open_table(tables::INSTRUMENTS)?.len()?,
        ),
        (
            "instrument serials",
            state.instruments,
            txn.open_table(tables::INSTRUMENT_BY_SERIAL)?.len()?,
        ),
        (
            "patients",
            state.patients,
            txn.open_table(tables::PATIENTS)?.len()?,
        ),
        (
            "patient ids",
            state.patients,
            txn.open_table(tables::PATIENT_BY_ID)?.len()?,
        ),
        (
            "treatments",
            state.treatments,
            txn.open_table(tables::TREATMENTS)?.len()?,
        ),
        (
            "treatment names",
            state.treatments,
            txn.open_table(tables::TREATMENT_BY_PATIENT_NAME)?.len()?,
        ),
        (
            "dishes",
            state.dishes,
            txn.open_table(tables::DISHES)?.len()?,
        ),
        (
            "dish ids",
            state.dishes,
            txn.open_table(tables::DISH_BY_INSTRUMENT)?.len()?,
        ),
        (
            "embryos",
            state.embryos,
            txn.open_table(tables::WELLS)?.len()?,
        ),
        (
            "embryo ids",
            state.embryos,
            txn.open_table(tables::EMBRYO_BY_ID)?.len()?,
        ),
        (
            "acquisitions",
            state.acquisitions,
            txn.open_table(tables::ACQUISITIONS)?.len()?,
        ),
        ("images", state.images, images.images),
        ("image bytes", state.image_bytes, images.image_bytes),
        (
            "telemetry samples",
            state.telemetry_samples,
            txn.open_table(tables::TELEMETRY)?.len()?,
        ),
        (
            "monitoring queue records",
            ims_state.records,
            txn.open_table(tables::IMS_QUEUE)?.len()?,
        ),
        (
            "instrument alarms",
            ims_state.alarms,
            txn.open_table(tables::IMS_ALARMS)?.len()?,
        ),
        (
            "changes",
            state.changes_retained(),
            txn.open_table(tables::CHANGES)?.len()?,
        ),
        (
            "embryo keys",
            state.embryos,
            txn.open_table(tables::EMBRYO_BY_KEY)?.len()?,
        ),
        (
            "dishes by treatment",
            state.dishes,
            txn.open_table(tables::DISH_BY_TREATMENT)?.len()?,
        ),
        (
            "annotations",
            state.annotations,
            txn.open_table(tables::ANNOTATIONS)?.len()?,
        ),
        ("users", state.users, txn.open_table(tables::USERS)?.len()?),
        (
            "scores",
            state.scores,
            txn.open_table(tables::SCORES)?.len()?,
        ),
        (
            "transfers",
            state.transfers,
            txn.open_table(tables::TRANSFERS)?.len()?,
        ),
        (
            "transfers by treatment",
            state.transfers,
            txn.open_table(tables::TRANSFER_BY_TREATMENT)?.len()?,
        ),
        (
            "API keys",
            state.api_keys,
            txn.open_table(tables::API_KEYS)?.len()?,
        ),
        (
            "idempotency records by age",
            txn.open_table(tables::IDEMPOTENCY)?.len()?,
            txn.open_table(tables::IDEMPOTENCY_BY_AGE)?.len()?,
        ),
        (
            "audit rows",
            state.audit_last_seq,
            txn.open_table(tables::AUDIT)?.len()?,
        ),
    ];
    for (what, counted, stored) in counts {
        if counted != stored {
            report.problem(format!(
                "counter of {what} says {counted} but the table holds {stored}"
            ));
        }
    }
    Ok(())
}
