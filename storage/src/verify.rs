//! `Store::verify`: every image's SHA-256 and the schema's invariants, from one read snapshot.
//! Findings go into the report; only a failure to read at all is an `Err`.

use crate::apply::read_state;
use crate::error::StorageError;
use crate::model::{ChangeEntity, VerifyProgress, VerifyReport};
use crate::reader::image_key_text;
use crate::tables::{
    self, decode, AcquisitionRow, ChangeRow, DishRow, ImageValue, StateRow, VolumeRow,
};
use crate::volume::{self, Volumes};
use redb::{ReadTransaction, ReadableTableMetadata};
use std::collections::HashMap;

/// Progress is reported after every this many images.
const PROGRESS_IMAGES_INTERVAL: u64 = 1000;
/// Each list of the report keeps at most this many entries, then one "... more" line.
const REPORT_ITEMS_MAX: usize = 10_000;

pub(crate) fn verify(
    txn: &ReadTransaction,
    volumes: &Volumes,
    progress: &mut dyn FnMut(VerifyProgress),
) -> Result<VerifyReport, StorageError> {
    let state = read_state(&txn.open_table(tables::META)?)?;
    let mut report = Report {
        archived: archived_without_file(txn, volumes)?,
        ..Report::default()
    };
    let image_totals = check_images(txn, volumes, &state, &mut report, progress)?;
    check_volumes(txn, volumes, &mut report)?;
    check_wells(txn, &mut report)?;
    check_changes(txn, &state, &mut report)?;
    check_audit(txn, &state, &mut report)?;
    check_model_results(txn, &mut report)?;
    crate::activity::check_curves(txn, &mut |problem| report.problem(problem))?;
    crate::devices::check_devices(txn, &mut |problem| report.problem(problem))?;
    check_counters(txn, &state, &image_totals, &mut report)?;
    Ok(report.finish(image_totals.images))
}

#[derive(Default)]
struct Report {
    damaged_images: Vec<String>,
    damaged_more: u64,
    problems: Vec<String>,
    problems_more: u64,
    orphans: Vec<String>,
    orphans_more: u64,
    unreadable: Vec<String>,
    unreadable_more: u64,
    volumes_checked: u64,
    records_superseded: u64,
    /// Archived volumes whose local file is gone.
    archived: std::collections::HashSet<u32>,
    images_archived: u64,
}

/// The archived volumes (`volume_archive`) whose local file is gone.
fn archived_without_file(
    txn: &ReadTransaction,
    volumes: &Volumes,
) -> Result<std::collections::HashSet<u32>, StorageError> {
    let archive = txn.open_table(tables::VOLUME_ARCHIVE)?;
    let mut ids = volumes.archived_ids();
    for entry in archive.range::<u32>(..)? {
        ids.push(entry?.0.value());
    }
    // Archived after the snapshot was taken count too: their files may go during a verify.
    Ok(ids
        .into_iter()
        .filter(|id| !volumes.path(*id).exists())
        .collect())
}

/// Adds `item` to a bounded list of the report, or counts it past the bound.
fn bounded_push(list: &mut Vec<String>, more: &mut u64, item: String) {
    if list.len() < REPORT_ITEMS_MAX {
        list.push(item);
    } else {
        *more += 1;
    }
}

impl Report {
    fn damaged(&mut self, key: String) {
        tracing::error!(%key, "verify: damaged image");
        bounded_push(&mut self.damaged_images, &mut self.damaged_more, key);
    }

    fn problem(&mut self, problem: String) {
        tracing::error!(%problem, "verify: invariant violated");
        bounded_push(&mut self.problems, &mut self.problems_more, problem);
    }

    fn orphan(&mut self, record: String) {
        tracing::error!(%record, "verify: volume record not in the index");
        bounded_push(&mut self.orphans, &mut self.orphans_more, record);
    }

    fn unreadable(&mut self, range: String) {
        tracing::warn!(%range, "verify: volume bytes hold no readable record");
        bounded_push(&mut self.unreadable, &mut self.unreadable_more, range);
    }

    fn finish(mut self, images_checked: u64) -> VerifyReport {
        for (list, more, what) in [
            (
                &mut self.damaged_images,
                self.damaged_more,
                "damaged images",
            ),
            (&mut self.problems, self.problems_more, "problems"),
            (
                &mut self.orphans,
                self.orphans_more,
                "records not in the index",
            ),
            (
                &mut self.unreadable,
                self.unreadable_more,
                "unreadable ranges",
            ),
        ] {
            if more > 0 {
                list.push(format!("... and {more} more {what}"));
            }
        }
        VerifyReport {
            images_checked,
            damaged_images: self.damaged_images,
            problems: self.problems,
            orphan_records: self.orphans,
            unreadable_ranges: self.unreadable,
            volumes_checked: self.volumes_checked,
            records_superseded: self.records_superseded,
            volumes_archived: self.archived.len() as u64,
            images_archived: self.images_archived,
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
    cache: HashMap<u64, Option<(u64, String)>>,
}

impl DishNames<'_> {
    /// The dish's (instrument id, dish id), None when its row is missing or unreadable (looked
    /// up once per dish).
    fn get(&mut self, dish_key: u64) -> Result<Option<(u64, String)>, StorageError> {
        if let Some(found) = self.cache.get(&dish_key) {
            return Ok(found.clone());
        }
        let found = match self.dishes.get(dish_key)? {
            Some(bytes) => decode::<DishRow>(bytes.value(), "dish")
                .ok()
                .map(|row| (row.instrument_id, row.dish_id)),
            None => None,
        };
        self.cache.insert(dish_key, found.clone());
        Ok(found)
    }

    fn image_key(&mut self, key: tables::ImageKey) -> Result<String, StorageError> {
        let (dish_key, well, acquired_at_ms, focal_plane) = key;
        let (instrument_id, dish_id) = self
            .get(dish_key)?
            .unwrap_or((0, format!("<missing dish {dish_key}>")));
        Ok(image_key_text(
            instrument_id,
            &dish_id,
            well,
            focal_plane,
            acquired_at_ms,
        ))
    }
}

/// Walks the image index (the acquisition rows): every focal plane's record is read back and
/// checked (header, key, SHA-256), and every acquisition has its well and dish.
fn check_images(
    txn: &ReadTransaction,
    volumes: &Volumes,
    state: &StateRow,
    report: &mut Report,
    progress: &mut dyn FnMut(VerifyProgress),
) -> Result<ImageTotals, StorageError> {
    let acquisitions = txn.open_table(tables::ACQUISITIONS)?;
    let wells = txn.open_table(tables::WELLS)?;
    let dishes = txn.open_table(tables::DISHES)?;
    let legacy = match txn.open_table(tables::LEGACY_IMAGES) {
        Ok(table) => Some(table),
        Err(redb::TableError::TableDoesNotExist(_)) => None,
        Err(error) => return Err(error.into()),
    };
    let mut names = DishNames {
        dishes: &dishes,
        cache: HashMap::new(),
    };
    let images_total = state.images;
    let mut totals = ImageTotals::default();
    for entry in acquisitions.range::<tables::AcquisitionKey>(..)? {
        let (key, value) = entry?;
        let (dish_key, well, acquired_at_ms) = key.value();
        let row = match AcquisitionRow::decode(value.value()) {
            Ok(row) => row,
            Err(error) => {
                report.problem(format!(
                    "acquisition (dish {dish_key} well {well} at {acquired_at_ms}): {error}"
                ));
                continue;
            }
        };
        let sorted = row
            .planes
            .windows(2)
            .all(|pair| pair[0].focal_plane < pair[1].focal_plane);
        if row.planes.is_empty() || !sorted {
            report.problem(format!(
                "acquisition (dish {dish_key} well {well} at {acquired_at_ms}) has \
                 empty or unsorted focal planes"
            ));
        }
        let dish = names.get(dish_key)?;
        let well_registered = wells.get((dish_key, well))?.is_some();
        let dish_id_len = dish.as_ref().map_or(0, |(_, id)| id.len());
        for plane in &row.planes {
            let key = (dish_key, well, acquired_at_ms, plane.focal_plane);
            totals.images += 1;
            if dish.is_none() {
                let text = names.image_key(key)?;
                report.problem(format!("image {text} has no dish"));
            }
            if !well_registered {
                let text = names.image_key(key)?;
                report.problem(format!("image {text} has no registered well"));
            }
            let location = plane.location;
            if location.is_legacy() {
                let stored = match &legacy {
                    Some(table) => table.get(key)?.map(|v| v.value().to_vec()),
                    None => None,
                };
                match stored.as_deref().map(ImageValue::decode) {
                    Some(Ok(image)) => {
                        totals.image_bytes += image.jpeg.len() as u64;
                        if !image.is_intact() {
                            report.damaged(names.image_key(key)?);
                        }
                    }
                    Some(Err(error)) => {
                        report.damaged(format!("{} ({error})", names.image_key(key)?))
                    }
                    None => report.damaged(format!(
                        "{} (listed as not yet moved, but not in the old table)",
                        names.image_key(key)?
                    )),
                }
            } else if report.archived.contains(&location.volume) {
                let header_len = (volume::HEADER_FIXED_BYTES + dish_id_len) as u64;
                totals.image_bytes += u64::from(location.length).saturating_sub(header_len);
                report.images_archived += 1;
            } else {
                let header_len = (volume::HEADER_FIXED_BYTES + dish_id_len) as u64;
                totals.image_bytes += u64::from(location.length).saturating_sub(header_len);
                match volumes.read_record(location, key) {
                    Ok(_) => {}
                    Err(volume::ReadFailure::Missing(_))
                        if volumes.archived_row(location.volume).is_some() =>
                    {
                        // Archived, and its file removed while this verify ran.
                        report.images_archived += 1;
                    }
                    Err(
                        volume::ReadFailure::Damaged(reason) | volume::ReadFailure::Missing(reason),
                    ) => {
                        let text = names.image_key(key)?;
                        tracing::error!(key = %text, %reason, "verify: image record damaged");
                        report.damaged(text);
                    }
                    Err(volume::ReadFailure::Io(error)) => {
                        let text = names.image_key(key)?;
                        tracing::error!(key = %text, %error, "verify: image record unreadable");
                        report.damaged(text);
                    }
                }
            }
            if totals.images % PROGRESS_IMAGES_INTERVAL == 0 {
                progress(VerifyProgress {
                    images_checked: totals.images,
                    images_total,
                });
            }
        }
    }
    progress(VerifyProgress {
        images_checked: totals.images,
        images_total,
    });
    Ok(totals)
}

/// The other direction: every record in every volume's committed part is the one the index
/// names for its key (or an older copy the index moved away from: superseded); its file is
/// there and long enough.
fn check_volumes(
    txn: &ReadTransaction,
    volumes: &Volumes,
    report: &mut Report,
) -> Result<(), StorageError> {
    let rows = txn.open_table(tables::VOLUMES)?;
    let acquisitions = txn.open_table(tables::ACQUISITIONS)?;
    for entry in rows.range::<u32>(..)? {
        let (id, row) = entry?;
        let id = id.value();
        let row: VolumeRow = match decode(row.value(), "volume") {
            Ok(row) => row,
            Err(error) => {
                report.problem(format!("volume {id}: {error}"));
                continue;
            }
        };
        if report.archived.contains(&id)
            || (volumes.archived_row(id).is_some() && !volumes.path(id).exists())
        {
            continue;
        }
        report.volumes_checked += 1;
        let path = volumes.path(id);
        let len = match std::fs::metadata(&path) {
            Ok(meta) => meta.len(),
            Err(error) => {
                report.problem(format!(
                    "volume {id} ({}) cannot be opened: {error}",
                    path.display()
                ));
                continue;
            }
        };
        if len < row.end {
            report.problem(format!(
                "volume {id} is {len} bytes, shorter than its {} committed bytes",
                row.end
            ));
            continue;
        }
        let mut records = 0u64;
        let mut offsets = Vec::new();
        let unreadable_before = report.unreadable.len() + report.unreadable_more as usize;
        volume::walk(volumes, id, row.end, &mut |walked| {
            match walked {
                volume::Walked::Record { offset, header } => {
                    records += 1;
                    if row.sealed {
                        offsets.push(offset);
                    }
                    let key = header.image_key();
                    let indexed = match acquisitions.get((key.0, key.1, key.2))? {
                        Some(value) => AcquisitionRow::decode(value.value())
                            .ok()
                            .and_then(|row| row.location(key.3)),
                        None => None,
                    };
                    match indexed {
                        Some(at) if at.volume == id && at.offset == offset => {}
                        Some(_) => report.records_superseded += 1,
                        None => report.orphan(format!(
                            "volume {id} offset {offset}: dish {:?} well {} acquired_at_ms {} \
                             focal_plane {}",
                            header.dish_id, key.1, key.2, key.3
                        )),
                    }
                }
                volume::Walked::Unreadable { offset, bytes } => {
                    report.unreadable(format!(
                        "volume {id} bytes {offset}..{} hold no readable record",
                        offset + bytes
                    ));
                }
            }
            Ok(())
        })?;
        let unreadable_here =
            report.unreadable.len() + report.unreadable_more as usize > unreadable_before;
        // Where damage hides records from the walk, the damaged images are reported already.
        if row.sealed && !unreadable_here && volumes.companion_path(id).exists() {
            match volume::read_companion(volumes, id) {
                Ok((end, listed)) => {
                    let listed: Vec<u64> = listed.iter().map(|(offset, _)| *offset).collect();
                    if end != row.end || listed != offsets {
                        report.problem(format!(
                            "the companion file of volume {id} lists {} records up to {end}, \
                             the volume holds {} readable records up to {}",
                            listed.len(),
                            offsets.len(),
                            row.end
                        ));
                    }
                }
                Err(reason) => report.problem(format!(
                    "the companion file of volume {id} is damaged: {reason}"
                )),
            }
        }
        if records != row.records && report.unreadable.is_empty() {
            report.problem(format!(
                "volume {id} holds {records} records, its row says {}",
                row.records
            ));
        }
    }
    Ok(())
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

/// Every model result names an embryo that exists and a model version that exists and is
/// marked used.
fn check_model_results(txn: &ReadTransaction, report: &mut Report) -> Result<(), StorageError> {
    let results = txn.open_table(tables::MODEL_RESULTS)?;
    let models = txn.open_table(tables::MODELS)?;
    let embryos = txn.open_table(tables::EMBRYO_BY_KEY)?;
    for entry in results.range::<(u64, &str)>(..)? {
        let (key, value) = entry?;
        let (embryo_key, name) = key.value();
        let row: tables::ModelResultRow = match decode(value.value(), "model result") {
            Ok(row) => row,
            Err(error) => {
                report.problem(format!("model result of embryo key {embryo_key}: {error}"));
                continue;
            }
        };
        if embryos.get(embryo_key)?.is_none() {
            report.problem(format!(
                "a result of model {name} names embryo key {embryo_key}, which does not exist"
            ));
        }
        match models.get((name, row.version))? {
            None => report.problem(format!(
                "a result of embryo key {embryo_key} names model {name} version {}, which does \
                 not exist",
                row.version
            )),
            Some(model) => match decode::<tables::ModelRow>(model.value(), "model") {
                Ok(model) if model.used => {}
                Ok(_) => report.problem(format!(
                    "model {name} version {} has results but is not marked used",
                    row.version
                )),
                Err(error) => report.problem(format!("model {name}: {error}")),
            },
        }
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
