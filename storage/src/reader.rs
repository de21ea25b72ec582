//! Typed reads from one MVCC snapshot (a redb read transaction). Readers never block the writer
//! and never see a partial group commit.

use crate::apply::{get_row, read_ims_state, read_state};
use crate::error::StorageError;
use crate::ims::{severity_name, AlarmRecord, ImsQueueStats, ImsRecord, ImsRecordBody};
use crate::limits;
use crate::model::{
    AcquisitionSync, Change, ChangeEntity, DishSyncState, InstrumentActivity, InstrumentRecord,
    PatientSummary, StoreStats, TableSpace, WellSync,
};
use crate::tables::{
    self, decode, AcquisitionRow, ChangeRow, EmbryoRow, ImageKey, ImageValue, InstrumentRow,
    PatientRow, StateRow,
};
use crate::volume::{Location, ReadFailure, Volumes};
use redb::{ReadTransaction, ReadableTable};
use std::ops::Bound;
use std::sync::Arc;

mod clinical;
mod models;

/// A read snapshot. Dropping it releases the snapshot; keep it short-lived on event loops.
pub struct Reader {
    pub(crate) txn: ReadTransaction,
    volumes: Arc<Volumes>,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader").finish_non_exhaustive()
    }
}

impl Reader {
    pub(crate) fn new(txn: ReadTransaction, volumes: Arc<Volumes>) -> Reader {
        Reader { txn, volumes }
    }

    /// The JPEG of the image `key` at `location`, read from its volume (or, during the
    /// migration from version 4, from the old table) and checked: a record that is not
    /// intact is `ImageDamaged`, named by `text`.
    pub(crate) fn read_jpeg(
        &self,
        location: Location,
        key: ImageKey,
        text: impl FnOnce() -> String,
    ) -> Result<bytes::Bytes, StorageError> {
        if location.is_legacy() {
            let legacy = match self.txn.open_table(tables::LEGACY_IMAGES) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => {
                    return Err(StorageError::ImageDamaged { key: text() });
                }
                Err(error) => return Err(error.into()),
            };
            let Some(stored) = legacy.get(key)? else {
                return Err(StorageError::ImageDamaged { key: text() });
            };
            return checked_jpeg(stored.value(), text);
        }
        match self.volumes.read_record(location, key) {
            Ok(record) => Ok(record.jpeg),
            Err(ReadFailure::Missing(reason)) => self.read_archived(location, key, text, reason),
            Err(failure) => Err(failure.into_storage_error(text())),
        }
    }

    /// The record at `location` from the object store, when its volume was archived and its
    /// local file is gone; a volume file missing without an archive row is damage.
    fn read_archived(
        &self,
        location: Location,
        key: ImageKey,
        text: impl FnOnce() -> String,
        missing: String,
    ) -> Result<bytes::Bytes, StorageError> {
        let archive = self.txn.open_table(tables::VOLUME_ARCHIVE)?;
        let row = match archive.get(location.volume)? {
            Some(row) => decode::<tables::ArchivedVolumeRow>(row.value(), "archived volume")?,
            // Archived after this snapshot was taken, and its file removed since.
            None => match self.volumes.archived_row(location.volume) {
                Some(row) => row,
                None => return Err(ReadFailure::Missing(missing).into_storage_error(text())),
            },
        };
        let fetch = self.volumes.archive();
        let fetched = crate::archive::fetch_record(
            fetch.as_ref(),
            location.volume,
            &row,
            location.offset,
            location.length,
        );
        let bytes = match fetched {
            Ok(bytes) => bytes,
            Err(reason) => {
                return Err(StorageError::ArchiveUnavailable {
                    key: text(),
                    reason,
                })
            }
        };
        match crate::volume::check_record(bytes.to_vec(), key) {
            Ok(record) => Ok(record.jpeg),
            Err(reason) => Err({
                if let Some(fetch) = &fetch {
                    fetch.discard(location.volume, location.offset);
                }
                ReadFailure::Damaged(format!(
                    "archived volume {} offset {} (object {}): {reason}",
                    location.volume, location.offset, row.object
                ))
                .into_storage_error(text())
            }),
        }
    }

    pub fn instrument_by_serial(
        &self,
        serial: &str,
    ) -> Result<Option<InstrumentRecord>, StorageError> {
        let by_serial = self.txn.open_table(tables::INSTRUMENT_BY_SERIAL)?;
        let Some(instrument_id) = by_serial.get(serial)?.map(|g| g.value()) else {
            return Ok(None);
        };
        let instruments = self.txn.open_table(tables::INSTRUMENTS)?;
        let row: InstrumentRow = get_row(&instruments, instrument_id, "instrument")?;
        Ok(Some(instrument_record(instrument_id, row)))
    }

    /// Every instrument, by instrument_id.
    pub fn instruments(&self) -> Result<Vec<InstrumentRecord>, StorageError> {
        let instruments = self.txn.open_table(tables::INSTRUMENTS)?;
        let mut out = Vec::new();
        for entry in instruments.range::<u64>(..)? {
            let (key, value) = entry?;
            let row: InstrumentRow = decode(value.value(), "instrument")?;
            out.push(instrument_record(key.value(), row));
        }
        Ok(out)
    }

    /// Each instrument's images: the latest one's time, those stored on UTC day `today`
    /// (`tables::day_of`) and on each of the `days` days before it. A few rows per instrument.
    pub fn activity(&self, today: u32, days: u32) -> Result<Vec<InstrumentActivity>, StorageError> {
        let instruments = self.txn.open_table(tables::INSTRUMENTS)?;
        let table = self.txn.open_table(tables::INSTRUMENT_DAYS)?;
        let mut out = Vec::new();
        for entry in instruments.range::<u64>(..)? {
            let instrument_id = entry?.0.value();
            let mut activity = InstrumentActivity {
                instrument_id,
                ..InstrumentActivity::default()
            };
            let all = (instrument_id, 0)..=(instrument_id, u32::MAX);
            if let Some(last) = table.range(all)?.next_back() {
                let row: tables::InstrumentDayRow = decode(last?.1.value(), "instrument day")?;
                activity.last_image_ms = row.last_image_ms;
            }
            let first = today.saturating_sub(days);
            let mut first_seen: Option<u32> = None;
            let mut by_day = vec![(0u64, 0u64); (today - first) as usize];
            for entry in table.range((instrument_id, first)..=(instrument_id, today))? {
                let (key, value) = entry?;
                let day = key.value().1;
                let row: tables::InstrumentDayRow = decode(value.value(), "instrument day")?;
                if day == today {
                    activity.images_today = row.images;
                    activity.image_bytes_today = row.image_bytes;
                } else {
                    first_seen.get_or_insert(day);
                    by_day[(day - first) as usize] = (row.images, row.image_bytes);
                }
            }
            if let Some(from) = first_seen {
                activity.days_before = by_day.split_off((from - first) as usize);
            }
            out.push(activity);
        }
        Ok(out)
    }

    /// The key of an instrument's dish, if it is registered.
    fn dish_key(&self, instrument_id: u64, dish_id: &str) -> Result<Option<u64>, StorageError> {
        let by_instrument = self.txn.open_table(tables::DISH_BY_INSTRUMENT)?;
        let key = by_instrument
            .get((instrument_id, dish_id))?
            .map(|g| g.value());
        Ok(key)
    }

    /// What the server holds for a dish: per registered well, each acquisition time with the
    /// sorted focal planes stored. None if the dish is unknown.
    pub fn sync_state(
        &self,
        instrument_id: u64,
        dish_id: &str,
    ) -> Result<Option<DishSyncState>, StorageError> {
        let Some(dish_key) = self.dish_key(instrument_id, dish_id)? else {
            return Ok(None);
        };
        let wells = self.txn.open_table(tables::WELLS)?;
        let acquisitions = self.txn.open_table(tables::ACQUISITIONS)?;
        let mut out = DishSyncState {
            dish_id: dish_id.to_string(),
            wells: Vec::new(),
        };
        for entry in wells.range((dish_key, u32::MIN)..=(dish_key, u32::MAX))? {
            let (key, value) = entry?;
            let (_, well) = key.value();
            let embryo: EmbryoRow = decode(value.value(), "embryo")?;
            let mut well_sync = WellSync {
                well,
                embryo_id: embryo.embryo_id,
                acquisitions: Vec::new(),
            };
            let range = (dish_key, well, i64::MIN)..=(dish_key, well, i64::MAX);
            for entry in acquisitions.range(range)? {
                let (key, value) = entry?;
                let row = AcquisitionRow::decode(value.value())?;
                well_sync.acquisitions.push(AcquisitionSync {
                    acquired_at_ms: key.value().2,
                    focal_planes: row.focal_planes(),
                });
            }
            out.wells.push(well_sync);
        }
        Ok(Some(out))
    }

    /// Patients with their treatment names, ordered by patient_id, at most `limit` (capped at
    /// `limits::READ_ROWS_MAX`), starting after `after_patient_id`.
    pub fn list_patients(
        &self,
        after_patient_id: Option<&str>,
        limit: u32,
    ) -> Result<Vec<PatientSummary>, StorageError> {
        let by_id = self.txn.open_table(tables::PATIENT_BY_ID)?;
        let patients = self.txn.open_table(tables::PATIENTS)?;
        let treatments = self.txn.open_table(tables::TREATMENT_BY_PATIENT_NAME)?;
        let limit = limit.min(limits::READ_ROWS_MAX) as usize;
        let start = match after_patient_id {
            Some(after) => Bound::Excluded(after),
            None => Bound::Unbounded,
        };
        let mut out = Vec::new();
        for entry in by_id.range::<&str>((start, Bound::Unbounded))?.take(limit) {
            let (_, patient_key) = entry?;
            let patient_key = patient_key.value();
            let row: PatientRow = get_row(&patients, patient_key, "patient")?;
            let mut names = Vec::new();
            for entry in treatments.range((patient_key, "")..)? {
                let (key, _) = entry?;
                let (owner, name) = key.value();
                if owner != patient_key {
                    break;
                }
                names.push(name.to_string());
            }
            out.push(PatientSummary {
                patient_id: row.patient_id,
                first_name: row.first_name,
                last_name: row.last_name,
                date_of_birth: row.date_of_birth,
                treatments: names,
            });
        }
        Ok(out)
    }

    /// The stored JPEG, its SHA-256 checked: a mismatch is `ImageDamaged`.
    pub fn image(
        &self,
        instrument_id: u64,
        dish_id: &str,
        well: u32,
        focal_plane: i32,
        acquired_at_ms: i64,
    ) -> Result<Option<bytes::Bytes>, StorageError> {
        let Some(dish_key) = self.dish_key(instrument_id, dish_id)? else {
            return Ok(None);
        };
        let Some(location) = self.location(dish_key, well, acquired_at_ms, focal_plane)? else {
            return Ok(None);
        };
        let key = (dish_key, well, acquired_at_ms, focal_plane);
        let text = || image_key_text(instrument_id, dish_id, well, focal_plane, acquired_at_ms);
        self.read_jpeg(location, key, text).map(Some)
    }

    /// Where the image is, from its acquisition row.
    pub(crate) fn location(
        &self,
        dish_key: u64,
        well: u32,
        acquired_at_ms: i64,
        focal_plane: i32,
    ) -> Result<Option<Location>, StorageError> {
        let acquisitions = self.txn.open_table(tables::ACQUISITIONS)?;
        let Some(row) = acquisitions.get((dish_key, well, acquired_at_ms))? else {
            return Ok(None);
        };
        let row = AcquisitionRow::decode(row.value())?;
        Ok(row.location(focal_plane))
    }

    /// Up to `limit` (capped at `limits::READ_ROWS_MAX`) changes with seq > `after`. A cursor
    /// older than the retained log, or ahead of its last entry, is `CursorExpired { oldest }`:
    /// the client must resynchronise.
    pub fn changes_after(&self, after: u64, limit: u32) -> Result<Vec<Change>, StorageError> {
        let state = self.state()?;
        if after.saturating_add(1) < state.change_oldest_seq || after > state.change_last_seq {
            // Older than the retained log, or ahead of it (a cursor from another database, a
            // restored backup): either way the client must resynchronise, never skip.
            return Err(StorageError::CursorExpired {
                oldest: state.change_oldest_seq,
            });
        }
        if after == state.change_last_seq {
            return Ok(Vec::new());
        }
        let changes = self.txn.open_table(tables::CHANGES)?;
        let limit = limit.min(limits::READ_ROWS_MAX) as usize;
        let mut out = Vec::with_capacity(limit.min(1024));
        let range = changes.range::<u64>((Bound::Excluded(after), Bound::Unbounded))?;
        for (expected, entry) in (after.saturating_add(1)..).zip(range.take(limit)) {
            let (key, value) = entry?;
            let seq = key.value();
            if seq != expected {
                return Err(StorageError::Corrupt(format!(
                    "change log gap: expected seq {expected}, found {seq}"
                )));
            }
            out.push(change_from_row(seq, decode(value.value(), "change")?)?);
        }
        Ok(out)
    }

    pub fn last_change_seq(&self) -> Result<u64, StorageError> {
        Ok(self.state()?.change_last_seq)
    }

    /// The newest audit row's seq (0: none yet).
    pub fn last_audit_seq(&self) -> Result<u64, StorageError> {
        Ok(self.state()?.audit_last_seq)
    }

    /// The space each table takes, largest first: where the database's bytes per image go.
    pub fn table_space(&self) -> Result<Vec<TableSpace>, StorageError> {
        use redb::{ReadableTableMetadata, TableDefinition, TableHandle};
        fn space<K: redb::Key + 'static, V: redb::Value + 'static>(
            txn: &ReadTransaction,
            definition: TableDefinition<K, V>,
        ) -> Result<Option<TableSpace>, StorageError> {
            let table = match txn.open_table(definition) {
                Ok(table) => table,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(error) => return Err(error.into()),
            };
            let stats = table.stats()?;
            Ok(Some(TableSpace {
                name: definition.name().to_string(),
                entries: table.len()?,
                stored_bytes: stats.stored_bytes(),
                metadata_bytes: stats.metadata_bytes(),
                fragmented_bytes: stats.fragmented_bytes(),
            }))
        }
        let txn = &self.txn;
        let mut out: Vec<TableSpace> = [
            space(txn, tables::META)?,
            space(txn, tables::INSTRUMENTS)?,
            space(txn, tables::INSTRUMENT_BY_SERIAL)?,
            space(txn, tables::PATIENTS)?,
            space(txn, tables::PATIENT_BY_ID)?,
            space(txn, tables::TREATMENTS)?,
            space(txn, tables::TREATMENT_BY_PATIENT_NAME)?,
            space(txn, tables::DISHES)?,
            space(txn, tables::DISH_BY_INSTRUMENT)?,
            space(txn, tables::DISH_BY_TREATMENT)?,
            space(txn, tables::WELLS)?,
            space(txn, tables::EMBRYO_BY_ID)?,
            space(txn, tables::EMBRYO_BY_KEY)?,
            space(txn, tables::ANNOTATIONS)?,
            space(txn, tables::AUDIT)?,
            space(txn, tables::USERS)?,
            space(txn, tables::LOGIN_FAILURES)?,
            space(txn, tables::SCORES)?,
            space(txn, tables::TRANSFERS)?,
            space(txn, tables::TRANSFER_BY_TREATMENT)?,
            space(txn, tables::API_KEYS)?,
            space(txn, tables::IDEMPOTENCY)?,
            space(txn, tables::IDEMPOTENCY_BY_AGE)?,
            space(txn, tables::ACQUISITIONS)?,
            space(txn, tables::VOLUMES)?,
            space(txn, tables::LEGACY_IMAGES)?,
            space(txn, tables::TELEMETRY)?,
            space(txn, tables::IMS_QUEUE)?,
            space(txn, tables::IMS_ALARMS)?,
            space(txn, tables::CHANGES)?,
        ]
        .into_iter()
        .flatten()
        .collect();
        out.sort_by_key(|t| std::cmp::Reverse(t.total_bytes()));
        Ok(out)
    }

    /// Reads the counters row and the volume rows (one per volume file).
    pub fn stats(&self) -> Result<StoreStats, StorageError> {
        let state = self.state()?;
        let (mut volumes, mut volumes_sealed, mut active_volume, mut volume_bytes) = (0, 0, 0, 0);
        for entry in self.txn.open_table(tables::VOLUMES)?.range::<u32>(..)? {
            let (id, row) = entry?;
            let row: tables::VolumeRow = decode(row.value(), "volume")?;
            volumes += 1;
            volume_bytes += row.end;
            if row.sealed {
                volumes_sealed += 1;
            } else {
                active_volume = id.value();
            }
        }
        Ok(StoreStats {
            volumes,
            volumes_sealed,
            active_volume,
            volume_bytes,
            instruments: state.instruments,
            patients: state.patients,
            treatments: state.treatments,
            dishes: state.dishes,
            embryos: state.embryos,
            acquisitions: state.acquisitions,
            images: state.images,
            image_bytes: state.image_bytes,
            telemetry_samples: state.telemetry_samples,
            changes: state.changes_retained(),
            last_change_seq: state.change_last_seq,
        })
    }

    /// The monitoring queue's counters and the receive time of its oldest record.
    pub fn ims_stats(&self) -> Result<ImsQueueStats, StorageError> {
        let state = read_ims_state(&self.txn.open_table(tables::META)?)?;
        let oldest_received_at_ms = match self.txn.open_table(tables::IMS_QUEUE)?.first()? {
            Some((_, value)) => {
                let row: tables::ImsRecordRow = decode(value.value(), "monitoring record")?;
                row.received_at_ms
            }
            None => 0,
        };
        Ok(ImsQueueStats {
            records: state.records,
            bytes: state.bytes,
            oldest_received_at_ms,
            dropped_records: state.dropped_records,
            dropped_bytes: state.dropped_bytes,
            uploaded_records: state.uploaded_records,
            withheld: state.withheld,
            alarms: state.alarms,
        })
    }

    /// The oldest queued monitoring records, at most `limit` (capped at
    /// `limits::IMS_BATCH_RECORDS_MAX`) and, past the first, at most `bytes_max` encoded bytes.
    pub fn ims_batch(&self, limit: u32, bytes_max: u64) -> Result<Vec<ImsRecord>, StorageError> {
        self.ims_batch_after(0, limit, bytes_max)
    }

    /// [`Self::ims_batch`] of the records with ids above `after_id`: the uploader reads on
    /// past an instrument whose upload budget is spent.
    pub fn ims_batch_after(
        &self,
        after_id: u64,
        limit: u32,
        bytes_max: u64,
    ) -> Result<Vec<ImsRecord>, StorageError> {
        let limit = limit.min(limits::IMS_BATCH_RECORDS_MAX) as usize;
        let table = self.txn.open_table(tables::IMS_QUEUE)?;
        let mut out = Vec::new();
        let mut bytes = 0u64;
        let Some(first) = after_id.checked_add(1) else {
            return Ok(out);
        };
        for entry in table.range(first..)? {
            if out.len() >= limit {
                break;
            }
            let (key, value) = entry?;
            bytes += value.value().len() as u64 + 8;
            if !out.is_empty() && bytes > bytes_max {
                break;
            }
            let row: tables::ImsRecordRow = decode(value.value(), "monitoring record")?;
            let body = match row.body {
                tables::ImsBody::Sample {
                    channel,
                    value,
                    at_ms,
                } => ImsRecordBody::Sample {
                    channel,
                    value,
                    at_ms,
                },
                tables::ImsBody::Alarm {
                    code,
                    severity,
                    raised_at_ms,
                    cleared_at_ms,
                } => ImsRecordBody::Alarm {
                    code,
                    severity: severity_name(severity),
                    raised_at_ms,
                    cleared_at_ms,
                },
            };
            out.push(ImsRecord {
                id: key.value(),
                serial: row.serial,
                model: row.model,
                received_at_ms: row.received_at_ms,
                body,
            });
        }
        Ok(out)
    }

    /// The alarms instruments reported, newest raised first, at most `limit`.
    pub fn alarms(&self, limit: u32) -> Result<Vec<AlarmRecord>, StorageError> {
        let instruments = self.txn.open_table(tables::INSTRUMENTS)?;
        let table = self.txn.open_table(tables::IMS_ALARMS)?;
        let mut all = Vec::new();
        for entry in table.iter()? {
            let (key, value) = entry?;
            let (instrument_id, code, raised_at_ms) = key.value();
            let row: tables::AlarmRow = decode(value.value(), "alarm")?;
            let serial =
                get_row::<InstrumentRow>(&instruments, instrument_id, "instrument")?.serial;
            all.push(AlarmRecord {
                serial,
                code: code.to_owned(),
                severity: severity_name(row.severity),
                raised_at_ms,
                cleared_at_ms: row.cleared_at_ms,
                text: row.text,
            });
        }
        all.sort_by_key(|a| std::cmp::Reverse(a.raised_at_ms));
        all.truncate(limit.min(limits::READ_ROWS_MAX) as usize);
        Ok(all)
    }

    fn state(&self) -> Result<StateRow, StorageError> {
        read_state(&self.txn.open_table(tables::META)?)
    }
}

fn instrument_record(instrument_id: u64, row: InstrumentRow) -> InstrumentRecord {
    InstrumentRecord {
        instrument_id,
        serial: row.serial,
        model: row.model,
        firmware: row.firmware,
        number: row.number,
        display_name: row.display_name,
        first_seen_ms: row.first_seen_ms,
        last_seen_ms: row.last_seen_ms,
        number_set_by: match row.number_source {
            tables::NUMBER_BY_INSTRUMENT => "instrument",
            tables::NUMBER_BY_ADMINISTRATOR => "administrator",
            _ => "server",
        },
    }
}

pub(crate) fn change_from_row(seq: u64, row: ChangeRow) -> Result<Change, StorageError> {
    let Some(entity) = ChangeEntity::from_u8(row.entity) else {
        return Err(StorageError::Corrupt(format!(
            "change {seq} has unknown entity {}",
            row.entity
        )));
    };
    let summary = if row.summary.is_empty() && entity == ChangeEntity::Acquisition {
        // Since version 6 an acquisition's change row carries no text of its own.
        format!("new acquisition of embryo {}", row.id)
    } else {
        row.summary
    };
    Ok(Change {
        seq,
        at_ms: row.at_ms,
        entity,
        key: row.key,
        id: row.id,
        version: row.version,
        summary,
    })
}

/// The JPEG of an image value, its SHA-256 checked: a mismatch is `ImageDamaged`.
pub(crate) fn checked_jpeg(
    stored: &[u8],
    key: impl FnOnce() -> String,
) -> Result<bytes::Bytes, StorageError> {
    let value = ImageValue::decode(stored)?;
    if !value.is_intact() {
        let key = key();
        tracing::error!(%key, "stored image is damaged");
        return Err(StorageError::ImageDamaged { key });
    }
    Ok(bytes::Bytes::copy_from_slice(value.jpeg))
}

/// A readable image key for messages and reports.
pub(crate) fn image_key_text(
    instrument_id: u64,
    dish_id: &str,
    well: u32,
    focal_plane: i32,
    acquired_at_ms: i64,
) -> String {
    format!(
        "instrument {instrument_id} dish {dish_id:?} well {well} \
         acquired_at_ms {acquired_at_ms} focal_plane {focal_plane}"
    )
}

/// The cursor of the page after `page`, which was asked for `limit` rows: the last row's key
/// when the page is full (there may be more), empty when it is the last page.
pub fn next_page_after<T>(page: &[T], limit: u32, key: impl Fn(&T) -> &str) -> String {
    let full = page.len() as u64 >= u64::from(limit.min(crate::limits::READ_ROWS_MAX));
    match page.last() {
        Some(last) if full => key(last).to_string(),
        _ => String::new(),
    }
}

#[cfg(test)]
mod page_tests {
    use super::next_page_after;

    #[test]
    fn a_full_page_names_its_last_key_and_a_short_one_ends_the_list() {
        let page = ["a", "b", "c"];
        assert_eq!(next_page_after(&page, 3, |k| k), "c");
        assert_eq!(next_page_after(&page, 4, |k| k), "");
        assert_eq!(next_page_after::<&str>(&[], 0, |k| k), "");
    }
}
