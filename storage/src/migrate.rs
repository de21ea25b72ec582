//! Schema migrations, one step per version bump, run inside the opening transaction (all
//! steps commit together or not at all). Each step keeps the record layouts of the version it
//! reads here, frozen, so `tables.rs` only ever describes the current schema.

use crate::apply::{get_row, treatment_id};
use crate::error::StorageError;
use crate::model::{ChangeEntity, Fate};
use crate::tables::{
    self, decode, encode, AcquisitionRow, ImageValue, Location, PlaneRow, WellKey,
};
use crate::volume::{Appender, RecordHeader};
use redb::{
    Database, Durability, ReadableDatabase, ReadableTable, ReadableTableMetadata, WriteTransaction,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;

/// Migrates from `from` to `from + 1`. Add one arm per schema version bump.
pub(crate) fn step(txn: &WriteTransaction, from: u64) -> Result<(), StorageError> {
    match from {
        1 => v1_to_v2(txn),
        2 => v2_to_v3(txn),
        3 => v3_to_v4(txn),
        4 => v4_to_v5(txn),
        5 => v5_to_v6(txn),
        6 => v6_to_v7(txn),
        7 => v7_to_v8(txn),
        8 => v8_to_v9(txn),
        9 => v9_to_v10(txn),
        10 => v10_to_v11(txn),
        11 => v11_to_v12(txn),
        12 => v12_to_v13(txn),
        _ => Err(StorageError::Corrupt(format!(
            "no migration from schema version {from}"
        ))),
    }
}

/// Version 13 adds `devices` (created empty by `tables::create_all`): the browser viewer's
/// registered devices.
fn v12_to_v13(_txn: &WriteTransaction) -> Result<(), StorageError> {
    Ok(())
}

/// Version 12 adds `activity_curves` (created empty by `tables::create_all`) and
/// `meta/activity_cursor` (absent: 0): the background computation starts from the beginning of
/// the retained change log, or scans every embryo when older changes were pruned.
fn v11_to_v12(_txn: &WriteTransaction) -> Result<(), StorageError> {
    Ok(())
}

/// Version 11 adds `models` and `model_results` (created empty by `tables::create_all`): the
/// clinic's selection models and the embryos' results of them.
fn v10_to_v11(_txn: &WriteTransaction) -> Result<(), StorageError> {
    Ok(())
}

/// Version 10 adds `volume_archive` (created empty by `tables::create_all`): sealed volumes
/// moved to the object store. The version goes up so that an older esserver, which would call
/// an archived volume's missing file damage, refuses the database instead.
fn v9_to_v10(_txn: &WriteTransaction) -> Result<(), StorageError> {
    Ok(())
}

/// Version 9 gives every patient the original system's identifier (`patient_idx`, minted from
/// the site name and its creation time, indexed in `patient_by_idx`), every dish a
/// fertilization method (empty: not known), every embryo its label (`AA1`: its dish's place
/// among the treatment's dishes, by registration, and its well) and every instrument the source
/// of its number (the server's count). `patient_differences` starts empty.
fn v8_to_v9(txn: &WriteTransaction) -> Result<(), StorageError> {
    let site = match txn.open_table(tables::META)?.get(tables::META_SITE_NAME)? {
        Some(bytes) => tables::site_name(&String::from_utf8_lossy(bytes.value())),
        None => tables::site_name(""),
    };
    let mut minted = std::collections::HashSet::new();
    let indexed = rewrite_u64_rows(
        txn,
        tables::PATIENTS,
        "version 8 patient",
        |_, old: v8::PatientRow| {
            let mut step = 0u128;
            let patient_idx = loop {
                let idx = tables::patient_idx(&site, old.created_at_ms, step);
                if minted.insert(idx.clone()) {
                    break idx;
                }
                step += 1;
            };
            Ok((
                patient_idx.clone(),
                tables::PatientRow {
                    patient_id: old.patient_id,
                    first_name: old.first_name,
                    last_name: old.last_name,
                    date_of_birth: old.date_of_birth,
                    created_at_ms: old.created_at_ms,
                    updated_at_ms: old.updated_at_ms,
                    version: old.version,
                    patient_idx,
                },
            ))
        },
    )?;
    let patients = indexed.len();
    let mut by_idx = txn.open_table(tables::PATIENT_BY_IDX)?;
    for (key, idx) in indexed {
        by_idx.insert(idx.as_str(), key)?;
    }
    rewrite_u64_rows(
        txn,
        tables::DISHES,
        "version 8 dish",
        |_, old: v8::DishRow| {
            Ok((
                (),
                tables::DishRow {
                    instrument_id: old.instrument_id,
                    dish_id: old.dish_id,
                    slot: old.slot,
                    treatment_key: old.treatment_key,
                    insemination_at_ms: old.insemination_at_ms,
                    created_at_ms: old.created_at_ms,
                    updated_at_ms: old.updated_at_ms,
                    fertilization_method: String::new(),
                },
            ))
        },
    )?;
    rewrite_u64_rows(
        txn,
        tables::INSTRUMENTS,
        "version 8 instrument",
        |_, old: v8::InstrumentRow| {
            Ok((
                (),
                tables::InstrumentRow {
                    serial: old.serial,
                    model: old.model,
                    firmware: old.firmware,
                    number: old.number,
                    display_name: old.display_name,
                    first_seen_ms: old.first_seen_ms,
                    last_seen_ms: old.last_seen_ms,
                    secret_sha256: old.secret_sha256,
                    issued_secret_sha256: old.issued_secret_sha256,
                    issued_for_sha256: old.issued_for_sha256,
                    number_source: tables::NUMBER_BY_SERVER,
                },
            ))
        },
    )?;
    // Each dish's place among its treatment's dishes (dish keys ascend with registration).
    let mut dish_index: HashMap<u64, u64> = HashMap::new();
    {
        let by_treatment = txn.open_table(tables::DISH_BY_TREATMENT)?;
        let mut count: HashMap<u64, u64> = HashMap::new();
        for entry in by_treatment.iter()? {
            let (key, _) = entry?;
            let (treatment_key, dish_key) = key.value();
            let next = count.entry(treatment_key).or_default();
            dish_index.insert(dish_key, *next);
            *next += 1;
        }
    }
    let mut wells = txn.open_table(tables::WELLS)?;
    let mut converted = Vec::new();
    for entry in wells.iter()? {
        let (key, value) = entry?;
        let (dish_key, well) = key.value();
        let old: v8::EmbryoRow = decode(value.value(), "version 8 embryo")?;
        let index = dish_index.get(&dish_key).copied().unwrap_or(0);
        converted.push((
            key.value(),
            encode(&tables::EmbryoRow {
                embryo_key: old.embryo_key,
                embryo_id: old.embryo_id,
                created_at_ms: old.created_at_ms,
                updated_at_ms: old.updated_at_ms,
                version: old.version,
                fate: old.fate,
                comment: old.comment,
                label: tables::embryo_label(index, well),
            }),
        ));
    }
    let embryos = converted.len();
    for (key, bytes) in converted {
        wells.insert(key, bytes.as_slice())?;
    }
    tracing::info!(
        patients,
        embryos,
        site = %site,
        "gave every patient its PatientIDx and every embryo its label"
    );
    Ok(())
}

/// Version 8 adds `instrument_days` (created empty by `tables::create_all`) and fills it from
/// the image index, one pass over `acquisitions`: each acquisition's planes count on the day
/// its first plane was stored, with that time as their last (the index keeps no per-plane
/// time), and each plane's JPEG bytes are its record's length less the record header.
fn v7_to_v8(txn: &WriteTransaction) -> Result<(), StorageError> {
    use crate::tables::{day_of, InstrumentDayRow};
    let acquisitions = txn.open_table(tables::ACQUISITIONS)?;
    let dishes = txn.open_table(tables::DISHES)?;
    let mut instrument_of: HashMap<u64, (u64, u64)> = HashMap::new();
    let mut days: std::collections::BTreeMap<(u64, u32), InstrumentDayRow> =
        std::collections::BTreeMap::new();
    let mut rows = 0u64;
    for entry in acquisitions.iter()? {
        let (key, value) = entry?;
        let (dish_key, _, _) = key.value();
        let row = tables::AcquisitionRow::decode(value.value())?;
        let (instrument_id, header_bytes) = match instrument_of.get(&dish_key) {
            Some(known) => *known,
            None => {
                let Some(dish) = dishes.get(dish_key)? else {
                    continue;
                };
                let dish: v8::DishRow = decode(dish.value(), "dish")?;
                let known = (
                    dish.instrument_id,
                    (crate::volume::HEADER_FIXED_BYTES + dish.dish_id.len()) as u64,
                );
                instrument_of.insert(dish_key, known);
                known
            }
        };
        let day = days
            .entry((instrument_id, day_of(row.first_stored_at_ms)))
            .or_default();
        for plane in &row.planes {
            day.images += 1;
            day.image_bytes += u64::from(plane.location.length).saturating_sub(header_bytes);
        }
        day.last_image_ms = day.last_image_ms.max(row.first_stored_at_ms);
        rows += 1;
        if rows % 1_000_000 == 0 {
            tracing::info!(
                acquisitions = rows,
                "counting the stored images per instrument and day"
            );
        }
    }
    let mut table = txn.open_table(tables::INSTRUMENT_DAYS)?;
    for (key, day) in &days {
        table.insert(key, encode(day).as_slice())?;
    }
    tracing::info!(
        acquisitions = rows,
        rows = days.len(),
        "counted the stored images per instrument and day (for the dashboard)"
    );
    Ok(())
}

/// Version 7 adds `login_failures` (created empty by `tables::create_all`): failed logins are
/// counted and locked per account and source address. A lock an earlier version wrote on the
/// user row is honoured until it passes.
fn v6_to_v7(_txn: &WriteTransaction) -> Result<(), StorageError> {
    Ok(())
}

/// Version 6 packs acquisition rows (`AcquisitionRow::encode`) and stores no summary text in
/// the change rows of new acquisitions (the reader words it). Nothing is rewritten: rows of
/// version 5 read as they are and are written packed when next changed. The version number
/// goes up so that an older esserver, which cannot read packed rows, refuses the file instead
/// of calling it corrupt.
fn v5_to_v6(_txn: &WriteTransaction) -> Result<(), StorageError> {
    Ok(())
}

/// Version 4 adds the instrument-monitoring queue and alarm tables (created empty by
/// `tables::create_all`) and their counters row.
fn v3_to_v4(txn: &WriteTransaction) -> Result<(), StorageError> {
    let mut meta = txn.open_table(tables::META)?;
    meta.insert(
        tables::META_IMS,
        encode(&tables::ImsStateRow::default()).as_slice(),
    )?;
    Ok(())
}

/// Version 5 moves the JPEG bytes out of redb into volume files; `acquisitions` becomes the
/// image index. This step, inside the opening transaction, only rewrites every acquisition row
/// with its planes at `Location::LEGACY` ("still in the old `images` table"). The bytes are
/// moved afterwards by [`move_legacy_images`], in chunks that each commit, so a large store's
/// migration can be interrupted at any point and resumes where it stopped.
fn v4_to_v5(txn: &WriteTransaction) -> Result<(), StorageError> {
    let mut rows = txn.open_table(tables::ACQUISITIONS)?;
    let mut converted = Vec::new();
    for entry in rows.iter()? {
        let (key, value) = entry?;
        let old: v4::AcquisitionRow = decode(value.value(), "version 4 acquisition")?;
        let row = AcquisitionRow {
            planes: old
                .focal_planes
                .into_iter()
                .map(|focal_plane| PlaneRow {
                    focal_plane,
                    location: Location::LEGACY,
                })
                .collect(),
            first_stored_at_ms: old.first_stored_at_ms,
        };
        converted.push((key.value(), row.encode()));
    }
    for (key, bytes) in converted {
        rows.insert(key, bytes.as_slice())?;
    }
    Ok(())
}

/// The version 4 record layouts, frozen.
pub(crate) mod v4 {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct AcquisitionRow {
        pub focal_planes: Vec<i32>,
        pub first_stored_at_ms: i64,
    }
}

/// Most JPEG bytes moved per commit of [`move_legacy_images`].
const MOVE_CHUNK_BYTES_MAX: u64 = 16 * 1024 * 1024;
/// Most images moved per commit of [`move_legacy_images`].
const MOVE_CHUNK_IMAGES_MAX: usize = 2048;

/// Moves every image still in version 4's `images` table into the volumes, a chunk per
/// commit: append the chunk's records, `fdatasync`, then one transaction points their index
/// entries at the records and deletes the old rows. A crash between the two leaves records past
/// the volume's committed end, which the next open cuts off; the old rows are still there and
/// are moved again. The old table is deleted once empty. Logs progress every few seconds.
pub(crate) fn move_legacy_images(
    db: &Database,
    appender: &mut Appender,
) -> Result<(), StorageError> {
    let total = {
        let txn = db.begin_read()?;
        match txn.open_table(tables::LEGACY_IMAGES) {
            Ok(table) => table.len()?,
            Err(redb::TableError::TableDoesNotExist(_)) => return Ok(()),
            Err(error) => return Err(error.into()),
        }
    };
    tracing::info!(
        images = total,
        "moving images of schema version 4 into volume files (resumable)"
    );
    let started = std::time::Instant::now();
    let mut last_log = started;
    let mut moved = 0u64;
    let mut moved_bytes = 0u64;
    let mut dishes: HashMap<u64, (u64, String)> = HashMap::new();
    loop {
        let chunk = read_legacy_chunk(db)?;
        if chunk.is_empty() {
            break;
        }
        let result = move_chunk(db, appender, &chunk, &mut dishes);
        if let Err(error) = result {
            appender.abort();
            return Err(error);
        }
        moved += chunk.len() as u64;
        moved_bytes += chunk.iter().map(|(_, v)| v.len() as u64).sum::<u64>();
        if last_log.elapsed() >= std::time::Duration::from_secs(2) {
            last_log = std::time::Instant::now();
            let seconds = started.elapsed().as_secs_f64().max(0.001);
            tracing::info!(
                moved,
                total,
                mb_per_s = format!("{:.0}", moved_bytes as f64 / 1e6 / seconds),
                "moving images into volume files"
            );
        }
    }
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    txn.delete_table(tables::LEGACY_IMAGES)?;
    txn.commit()?;
    tracing::info!(
        moved,
        seconds = format!("{:.1}", started.elapsed().as_secs_f64()),
        "every image of schema version 4 is in a volume file; the old table is deleted"
    );
    Ok(())
}

type LegacyRow = (tables::ImageKey, Vec<u8>);

fn read_legacy_chunk(db: &Database) -> Result<Vec<LegacyRow>, StorageError> {
    let txn = db.begin_read()?;
    let table = txn.open_table(tables::LEGACY_IMAGES)?;
    let mut out = Vec::new();
    let mut bytes = 0u64;
    for entry in table.iter()? {
        let (key, value) = entry?;
        bytes += value.value().len() as u64;
        out.push((key.value(), value.value().to_vec()));
        if out.len() >= MOVE_CHUNK_IMAGES_MAX || bytes >= MOVE_CHUNK_BYTES_MAX {
            break;
        }
    }
    Ok(out)
}

fn move_chunk(
    db: &Database,
    appender: &mut Appender,
    chunk: &[LegacyRow],
    dishes: &mut HashMap<u64, (u64, String)>,
) -> Result<(), StorageError> {
    let mut txn = db.begin_write()?;
    txn.set_durability(Durability::Immediate)?;
    {
        let dish_rows = txn.open_table(tables::DISHES)?;
        let mut acquisitions = txn.open_table(tables::ACQUISITIONS)?;
        let mut legacy = txn.open_table(tables::LEGACY_IMAGES)?;
        let mut volume_rows = txn.open_table(tables::VOLUMES)?;
        let mut stored_at_last = 0i64;
        for (key, value) in chunk {
            let (dish_key, well, acquired_at_ms, focal_plane) = *key;
            if let std::collections::hash_map::Entry::Vacant(entry) = dishes.entry(dish_key) {
                let dish = match dish_rows.get(dish_key)? {
                    Some(row) => decode::<v8::DishRow>(row.value(), "dish")
                        .map(|row| (row.instrument_id, row.dish_id))
                        .unwrap_or((0, String::new())),
                    None => (0, String::new()),
                };
                entry.insert(dish);
            }
            let (instrument_id, dish_id) = dishes[&dish_key].clone();
            // A damaged image moves as it is (its SHA-256 no longer matches): verify names it.
            let (sha256, stored_at_ms, jpeg): ([u8; 32], i64, &[u8]) =
                match ImageValue::decode(value) {
                    Ok(image) => (image.sha256, image.stored_at_ms, image.jpeg),
                    Err(_) => ([0; 32], 0, value.as_slice()),
                };
            let jpeg = &jpeg[..jpeg.len().min(crate::limits::JPEG_BYTES_MAX)];
            let header = RecordHeader {
                dish_key,
                instrument_id,
                dish_id,
                well,
                acquired_at_ms,
                focal_plane,
                stored_at_ms,
                sha256,
                jpeg_len: jpeg.len() as u32,
            };
            let location = appender.append(&header, jpeg, stored_at_ms)?;
            stored_at_last = stored_at_last.max(stored_at_ms);
            let acquisition_key = (dish_key, well, acquired_at_ms);
            let mut row = match acquisitions.get(acquisition_key)? {
                Some(row) => AcquisitionRow::decode(row.value())?,
                None => AcquisitionRow {
                    planes: Vec::new(),
                    first_stored_at_ms: stored_at_ms,
                },
            };
            row.set(focal_plane, location);
            acquisitions.insert(acquisition_key, row.encode().as_slice())?;
            legacy.remove(*key)?;
        }
        let changes = appender.sync(stored_at_last)?;
        for (id, row) in &changes.rows {
            volume_rows.insert(*id, encode(row).as_slice())?;
        }
        drop((dish_rows, acquisitions, legacy, volume_rows));
        txn.commit()?;
        appender.committed(&changes);
    }
    Ok(())
}

/// The bytes of image `index` of a fixture: deterministic, distinct per key, JPEG-framed.
#[doc(hidden)]
pub fn fixture_jpeg(well: u32, index: u32, focal_plane: i32, len: usize) -> Vec<u8> {
    let mut x = (u64::from(well) << 40) ^ (u64::from(index) << 8) ^ (focal_plane as u64 & 0xff);
    x = x.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut out = Vec::with_capacity(len.max(4));
    out.extend_from_slice(&[0xff, 0xd8]);
    while out.len() + 2 < len.max(4) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.push(x as u8);
    }
    out.extend_from_slice(&[0xff, 0xd9]);
    out
}

/// One image of [`write_v4_fixture`]: its bytes are `fixture_jpeg(well, index, focal_plane,
/// jpeg_bytes)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FixtureImage {
    pub instrument_id: u64,
    pub dish_id: String,
    pub well: u32,
    pub index: u32,
    pub acquired_at_ms: i64,
    pub focal_plane: i32,
}

/// Writes a version 4 database with images into `dir`, as the version 4 binary would have: the
/// version 1 fixture migrated to 4, then `acquisitions_per_well` acquisitions of each of its
/// two wells, each at every plane of `planes`, `jpeg_bytes` each, JPEGs inside redb.
#[doc(hidden)]
pub fn write_v4_fixture(
    dir: &std::path::Path,
    acquisitions_per_well: u32,
    planes: &[i32],
    jpeg_bytes: usize,
) -> Result<Vec<FixtureImage>, StorageError> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(crate::DATABASE_FILE_NAME);
    write_v1_fixture(&path)?;
    let db = Database::open(&path)?;
    {
        let txn = db.begin_write()?;
        for from in 1..4 {
            step(&txn, from)?;
        }
        tables::create_all_v4(&txn)?;
        txn.open_table(tables::META)?.insert(
            tables::META_SCHEMA_VERSION,
            tables::encode_u64(4).as_slice(),
        )?;
        txn.commit()?;
    }
    let mut planes: Vec<i32> = planes.to_vec();
    planes.sort_unstable();
    planes.dedup();
    let mut images = Vec::new();
    let t0 = 1_700_000_000_000i64;
    for well in 1..=2u32 {
        let mut index = 0u32;
        while index < acquisitions_per_well {
            // About 32 MB per commit.
            let per_commit = (32_000_000 / (jpeg_bytes.max(1) * planes.len().max(1))).max(1) as u32;
            let until = (index + per_commit).min(acquisitions_per_well);
            let txn = db.begin_write()?;
            {
                let mut meta = txn.open_table(tables::META)?;
                let mut state: tables::StateRow = decode(
                    meta.get(tables::META_STATE)?.expect("state row").value(),
                    "state",
                )?;
                let mut legacy = txn.open_table(tables::LEGACY_IMAGES)?;
                let mut acquisitions = txn.open_table(tables::ACQUISITIONS)?;
                let mut changes = txn.open_table(tables::CHANGES)?;
                for i in index..until {
                    let acquired_at_ms = t0 + i64::from(i) * 600_000;
                    for &focal_plane in &planes {
                        let jpeg = fixture_jpeg(well, i, focal_plane, jpeg_bytes);
                        let value = ImageValue {
                            sha256: tables::sha256(&jpeg),
                            stored_at_ms: acquired_at_ms + 1000,
                            jpeg: &jpeg,
                        };
                        legacy.insert(
                            (1, well, acquired_at_ms, focal_plane),
                            value.encode().as_slice(),
                        )?;
                        state.images += 1;
                        state.image_bytes += jpeg.len() as u64;
                        images.push(FixtureImage {
                            instrument_id: 1,
                            dish_id: "D-V1".into(),
                            well,
                            index: i,
                            acquired_at_ms,
                            focal_plane,
                        });
                    }
                    let row = v4::AcquisitionRow {
                        focal_planes: planes.clone(),
                        first_stored_at_ms: acquired_at_ms + 1000,
                    };
                    acquisitions.insert((1, well, acquired_at_ms), encode(&row).as_slice())?;
                    state.acquisitions += 1;
                    state.change_last_seq += 1;
                    let change = tables::ChangeRow {
                        at_ms: acquired_at_ms + 1000,
                        entity: ChangeEntity::Acquisition.to_u8(),
                        key: u64::from(well),
                        id: format!("E-V1-{well}"),
                        version: 0,
                        summary: format!("acquisition of embryo E-V1-{well}"),
                    };
                    changes.insert(state.change_last_seq, encode(&change).as_slice())?;
                }
                meta.insert(tables::META_STATE, encode(&state).as_slice())?;
            }
            txn.commit()?;
            index = until;
        }
    }
    Ok(images)
}

/// The version 8 record layouts of the rows version 9 extended, frozen.
pub(crate) mod v8 {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct InstrumentRow {
        pub serial: String,
        pub model: String,
        pub firmware: String,
        pub number: u32,
        pub display_name: String,
        pub first_seen_ms: i64,
        pub last_seen_ms: i64,
        pub secret_sha256: Option<[u8; 32]>,
        pub issued_secret_sha256: Option<[u8; 32]>,
        pub issued_for_sha256: Option<[u8; 32]>,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct PatientRow {
        pub patient_id: String,
        pub first_name: String,
        pub last_name: String,
        pub date_of_birth: String,
        pub created_at_ms: i64,
        pub updated_at_ms: i64,
        pub version: u64,
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
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct EmbryoRow {
        pub embryo_key: u64,
        pub embryo_id: String,
        pub created_at_ms: i64,
        pub updated_at_ms: i64,
        pub version: u64,
        pub fate: u8,
        pub comment: String,
    }
}

/// The version 1 record layouts, frozen.
pub(crate) mod v1 {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct StateRow {
        pub instrument_id_last: u64,
        pub patient_key_last: u64,
        pub treatment_key_last: u64,
        pub dish_key_last: u64,
        pub embryo_key_last: u64,
        pub change_last_seq: u64,
        pub change_oldest_seq: u64,
        pub instruments: u64,
        pub patients: u64,
        pub treatments: u64,
        pub dishes: u64,
        pub embryos: u64,
        pub acquisitions: u64,
        pub images: u64,
        pub image_bytes: u64,
        pub telemetry_samples: u64,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct PatientRow {
        pub patient_id: String,
        pub first_name: String,
        pub last_name: String,
        pub date_of_birth: String,
        pub created_at_ms: i64,
        pub updated_at_ms: i64,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct TreatmentRow {
        pub patient_key: u64,
        pub name: String,
        pub created_at_ms: i64,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct EmbryoRow {
        pub embryo_key: u64,
        pub embryo_id: String,
        pub created_at_ms: i64,
    }

    #[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
    pub struct ChangeRow {
        pub at_ms: i64,
        pub entity: u8,
        pub key: u64,
        pub summary: String,
    }
}

/// The version 2 record layouts that version 3 changed, frozen.
pub(crate) mod v2 {
    use serde::{Deserialize, Serialize};

    #[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
    pub struct StateRow {
        pub instrument_id_last: u64,
        pub patient_key_last: u64,
        pub treatment_key_last: u64,
        pub dish_key_last: u64,
        pub embryo_key_last: u64,
        pub change_last_seq: u64,
        pub change_oldest_seq: u64,
        pub instruments: u64,
        pub patients: u64,
        pub treatments: u64,
        pub dishes: u64,
        pub embryos: u64,
        pub acquisitions: u64,
        pub images: u64,
        pub image_bytes: u64,
        pub telemetry_samples: u64,
        pub annotation_id_last: u64,
        pub audit_last_seq: u64,
        pub annotations: u64,
        pub users: u64,
    }
}

/// Version 3 adds scores, transfers, API keys and idempotency records (tables created empty
/// by `tables::create_all`) and their counters in the state row.
fn v2_to_v3(txn: &WriteTransaction) -> Result<(), StorageError> {
    let mut meta = txn.open_table(tables::META)?;
    let old: v2::StateRow = match meta.get(tables::META_STATE)? {
        Some(bytes) => decode(bytes.value(), "version 2 meta state")?,
        None => return Err(StorageError::Corrupt("meta state row is missing".into())),
    };
    let state = tables::StateRow {
        instrument_id_last: old.instrument_id_last,
        patient_key_last: old.patient_key_last,
        treatment_key_last: old.treatment_key_last,
        dish_key_last: old.dish_key_last,
        embryo_key_last: old.embryo_key_last,
        change_last_seq: old.change_last_seq,
        change_oldest_seq: old.change_oldest_seq,
        instruments: old.instruments,
        patients: old.patients,
        treatments: old.treatments,
        dishes: old.dishes,
        embryos: old.embryos,
        acquisitions: old.acquisitions,
        images: old.images,
        image_bytes: old.image_bytes,
        telemetry_samples: old.telemetry_samples,
        annotation_id_last: old.annotation_id_last,
        audit_last_seq: old.audit_last_seq,
        annotations: old.annotations,
        users: old.users,
        transfer_key_last: 0,
        transfers: 0,
        scores: 0,
        api_keys: 0,
    };
    meta.insert(tables::META_STATE, encode(&state).as_slice())?;
    Ok(())
}

/// Version 2 adds versions, comments and fate to patients, treatments and embryos, the
/// `embryo_by_key` and `dish_by_treatment` indexes, natural ids in change rows, and the
/// annotation, audit and user tables (created empty by `tables::create_all`).
fn v1_to_v2(txn: &WriteTransaction) -> Result<(), StorageError> {
    let mut meta = txn.open_table(tables::META)?;
    let old_state: v1::StateRow = match meta.get(tables::META_STATE)? {
        Some(bytes) => decode(bytes.value(), "version 1 meta state")?,
        None => return Err(StorageError::Corrupt("meta state row is missing".into())),
    };
    let state = v2::StateRow {
        instrument_id_last: old_state.instrument_id_last,
        patient_key_last: old_state.patient_key_last,
        treatment_key_last: old_state.treatment_key_last,
        dish_key_last: old_state.dish_key_last,
        embryo_key_last: old_state.embryo_key_last,
        change_last_seq: old_state.change_last_seq,
        change_oldest_seq: old_state.change_oldest_seq,
        instruments: old_state.instruments,
        patients: old_state.patients,
        treatments: old_state.treatments,
        dishes: old_state.dishes,
        embryos: old_state.embryos,
        acquisitions: old_state.acquisitions,
        images: old_state.images,
        image_bytes: old_state.image_bytes,
        telemetry_samples: old_state.telemetry_samples,
        annotation_id_last: 0,
        audit_last_seq: 0,
        annotations: 0,
        users: 0,
    };
    meta.insert(tables::META_STATE, encode(&state).as_slice())?;

    let patient_ids = migrate_patients(txn)?;
    migrate_treatments(txn)?;
    index_dishes(txn)?;
    let embryo_ids = migrate_wells(txn)?;
    migrate_changes(txn, &patient_ids, &embryo_ids)?;
    Ok(())
}

/// Rewrites every row of `table`; `convert` gives the new row and something to keep for each
/// (returned with its key).
fn rewrite_u64_rows<Old, New, Kept>(
    txn: &WriteTransaction,
    table: redb::TableDefinition<u64, &[u8]>,
    what: &str,
    mut convert: impl FnMut(u64, Old) -> Result<(Kept, New), StorageError>,
) -> Result<Vec<(u64, Kept)>, StorageError>
where
    Old: serde::de::DeserializeOwned,
    New: Serialize,
{
    let mut rows = txn.open_table(table)?;
    let mut converted = Vec::new();
    let mut kept = Vec::new();
    for entry in rows.iter()? {
        let (key, value) = entry?;
        let old: Old = decode(value.value(), what)?;
        let (keep, new) = convert(key.value(), old)?;
        converted.push((key.value(), encode(&new)));
        kept.push((key.value(), keep));
    }
    for (key, bytes) in converted {
        rows.insert(key, bytes.as_slice())?;
    }
    Ok(kept)
}

/// Returns patient_key -> patient_id.
fn migrate_patients(txn: &WriteTransaction) -> Result<HashMap<u64, String>, StorageError> {
    let mut ids = HashMap::new();
    rewrite_u64_rows(
        txn,
        tables::PATIENTS,
        "version 1 patient",
        |key, old: v1::PatientRow| {
            ids.insert(key, old.patient_id.clone());
            Ok((
                (),
                v8::PatientRow {
                    patient_id: old.patient_id,
                    first_name: old.first_name,
                    last_name: old.last_name,
                    date_of_birth: old.date_of_birth,
                    created_at_ms: old.created_at_ms,
                    updated_at_ms: old.updated_at_ms,
                    version: 1,
                },
            ))
        },
    )?;
    Ok(ids)
}

fn migrate_treatments(txn: &WriteTransaction) -> Result<(), StorageError> {
    rewrite_u64_rows(
        txn,
        tables::TREATMENTS,
        "version 1 treatment",
        |_, old: v1::TreatmentRow| {
            Ok((
                (),
                tables::TreatmentRow {
                    patient_key: old.patient_key,
                    name: old.name,
                    created_at_ms: old.created_at_ms,
                    updated_at_ms: old.created_at_ms,
                    version: 1,
                    comment: String::new(),
                },
            ))
        },
    )?;
    Ok(())
}

fn index_dishes(txn: &WriteTransaction) -> Result<(), StorageError> {
    let dishes = txn.open_table(tables::DISHES)?;
    let mut index = txn.open_table(tables::DISH_BY_TREATMENT)?;
    for entry in dishes.iter()? {
        let (key, value) = entry?;
        let dish: v8::DishRow = decode(value.value(), "dish")?;
        index.insert((dish.treatment_key, key.value()), ())?;
    }
    Ok(())
}

/// Rewrites every embryo row and builds `embryo_by_key`; returns embryo_key -> embryo_id.
fn migrate_wells(txn: &WriteTransaction) -> Result<HashMap<u64, String>, StorageError> {
    let mut wells = txn.open_table(tables::WELLS)?;
    let mut by_key = txn.open_table(tables::EMBRYO_BY_KEY)?;
    let mut converted: Vec<(WellKey, v8::EmbryoRow)> = Vec::new();
    for entry in wells.iter()? {
        let (key, value) = entry?;
        let old: v1::EmbryoRow = decode(value.value(), "version 1 embryo")?;
        converted.push((
            key.value(),
            v8::EmbryoRow {
                embryo_key: old.embryo_key,
                embryo_id: old.embryo_id,
                created_at_ms: old.created_at_ms,
                updated_at_ms: old.created_at_ms,
                version: 1,
                fate: Fate::Undecided.to_u8(),
                comment: String::new(),
            },
        ));
    }
    let mut ids = HashMap::new();
    for (key, row) in converted {
        wells.insert(key, encode(&row).as_slice())?;
        by_key.insert(row.embryo_key, key)?;
        ids.insert(row.embryo_key, row.embryo_id);
    }
    Ok(ids)
}

/// Change rows gain the entity's natural id; their version is 0 (not recorded in version 1).
fn migrate_changes(
    txn: &WriteTransaction,
    patient_ids: &HashMap<u64, String>,
    embryo_ids: &HashMap<u64, String>,
) -> Result<(), StorageError> {
    let instruments = txn.open_table(tables::INSTRUMENTS)?;
    let treatments = txn.open_table(tables::TREATMENTS)?;
    let dishes = txn.open_table(tables::DISHES)?;
    let natural_id = |entity: Option<ChangeEntity>, key: u64| -> Result<String, StorageError> {
        Ok(match entity {
            Some(ChangeEntity::Instrument) => {
                get_row::<v8::InstrumentRow>(&instruments, key, "instrument")
                    .map(|row| row.serial)
                    .unwrap_or_default()
            }
            Some(ChangeEntity::Patient) => patient_ids.get(&key).cloned().unwrap_or_default(),
            Some(ChangeEntity::Treatment) => {
                match get_row::<tables::TreatmentRow>(&treatments, key, "treatment") {
                    Ok(row) => treatment_id(
                        patient_ids.get(&row.patient_key).map_or("", String::as_str),
                        &row.name,
                    ),
                    Err(_) => String::new(),
                }
            }
            Some(ChangeEntity::Dish) => get_row::<v8::DishRow>(&dishes, key, "dish")
                .map(|row| row.dish_id)
                .unwrap_or_default(),
            Some(ChangeEntity::Embryo | ChangeEntity::Acquisition) => {
                embryo_ids.get(&key).cloned().unwrap_or_default()
            }
            // Version 1 had no users, transfers or API keys.
            Some(
                ChangeEntity::User
                | ChangeEntity::Transfer
                | ChangeEntity::ApiKey
                | ChangeEntity::Model
                | ChangeEntity::Device,
            )
            | None => String::new(),
        })
    };
    let mut changes = txn.open_table(tables::CHANGES)?;
    let mut converted = Vec::new();
    for entry in changes.iter()? {
        let (key, value) = entry?;
        let old: v1::ChangeRow = decode(value.value(), "version 1 change")?;
        let id = natural_id(ChangeEntity::from_u8(old.entity), old.key)?;
        let row = tables::ChangeRow {
            at_ms: old.at_ms,
            entity: old.entity,
            key: old.key,
            id,
            version: 0,
            summary: old.summary,
        };
        converted.push((key.value(), encode(&row)));
    }
    for (key, bytes) in converted {
        changes.insert(key, bytes.as_slice())?;
    }
    Ok(())
}

/// Writes a version 1 database for migration tests: one instrument, patient, treatment, dish
/// with two embryos, and their change rows, as the version 1 binary would have.
#[doc(hidden)]
pub fn write_v1_fixture(path: &std::path::Path) -> Result<(), StorageError> {
    #[derive(Serialize, Deserialize)]
    struct V1Instrument {
        serial: String,
        model: String,
        firmware: String,
        number: u32,
        display_name: String,
        first_seen_ms: i64,
        last_seen_ms: i64,
        secret_sha256: Option<[u8; 32]>,
        issued_secret_sha256: Option<[u8; 32]>,
        issued_for_sha256: Option<[u8; 32]>,
    }
    let db = redb::Database::create(path)?;
    let txn = db.begin_write()?;
    {
        let mut meta = txn.open_table(tables::META)?;
        meta.insert(
            tables::META_SCHEMA_VERSION,
            tables::encode_u64(1).as_slice(),
        )?;
        meta.insert(
            tables::META_SERVER_ID,
            "0123456789abcdef0123456789abcdef".as_bytes(),
        )?;
        let state = v1::StateRow {
            instrument_id_last: 1,
            patient_key_last: 1,
            treatment_key_last: 1,
            dish_key_last: 1,
            embryo_key_last: 2,
            change_last_seq: 6,
            change_oldest_seq: 1,
            instruments: 1,
            patients: 1,
            treatments: 1,
            dishes: 1,
            embryos: 2,
            ..v1::StateRow::default()
        };
        meta.insert(tables::META_STATE, encode(&state).as_slice())?;
        let instrument = V1Instrument {
            serial: "ES-V1".into(),
            model: "EmbryoScope+".into(),
            firmware: "1".into(),
            number: 1,
            display_name: "ES-V1".into(),
            first_seen_ms: 1,
            last_seen_ms: 1,
            secret_sha256: None,
            issued_secret_sha256: None,
            issued_for_sha256: None,
        };
        txn.open_table(tables::INSTRUMENTS)?
            .insert(1, encode(&instrument).as_slice())?;
        txn.open_table(tables::INSTRUMENT_BY_SERIAL)?
            .insert("ES-V1", 1)?;
        let patient = v1::PatientRow {
            patient_id: "P-V1".into(),
            first_name: "Ada".into(),
            last_name: "Old".into(),
            date_of_birth: "1980-01-02".into(),
            created_at_ms: 1,
            updated_at_ms: 1,
        };
        txn.open_table(tables::PATIENTS)?
            .insert(1, encode(&patient).as_slice())?;
        txn.open_table(tables::PATIENT_BY_ID)?.insert("P-V1", 1)?;
        let treatment = v1::TreatmentRow {
            patient_key: 1,
            name: "2020-1".into(),
            created_at_ms: 1,
        };
        txn.open_table(tables::TREATMENTS)?
            .insert(1, encode(&treatment).as_slice())?;
        txn.open_table(tables::TREATMENT_BY_PATIENT_NAME)?
            .insert((1, "2020-1"), 1)?;
        let dish = v8::DishRow {
            instrument_id: 1,
            dish_id: "D-V1".into(),
            slot: 1,
            treatment_key: 1,
            insemination_at_ms: 1000,
            created_at_ms: 1,
            updated_at_ms: 1,
        };
        txn.open_table(tables::DISHES)?
            .insert(1, encode(&dish).as_slice())?;
        txn.open_table(tables::DISH_BY_INSTRUMENT)?
            .insert((1, "D-V1"), 1)?;
        let mut wells = txn.open_table(tables::WELLS)?;
        let mut by_id = txn.open_table(tables::EMBRYO_BY_ID)?;
        for well in 1..=2u32 {
            let embryo = v1::EmbryoRow {
                embryo_key: u64::from(well),
                embryo_id: format!("E-V1-{well}"),
                created_at_ms: 1,
            };
            wells.insert((1, well), encode(&embryo).as_slice())?;
            by_id.insert(embryo.embryo_id.as_str(), (1, well))?;
        }
        let mut changes = txn.open_table(tables::CHANGES)?;
        let rows = [
            (ChangeEntity::Instrument, 1),
            (ChangeEntity::Patient, 1),
            (ChangeEntity::Treatment, 1),
            (ChangeEntity::Dish, 1),
            (ChangeEntity::Embryo, 1),
            (ChangeEntity::Embryo, 2),
        ];
        for (seq, (entity, key)) in (1u64..).zip(rows) {
            let row = v1::ChangeRow {
                at_ms: 1,
                entity: entity.to_u8(),
                key,
                summary: format!("{} {key}", entity.as_str()),
            };
            changes.insert(seq, encode(&row).as_slice())?;
        }
    }
    txn.commit()?;
    Ok(())
}
