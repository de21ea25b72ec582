//! The storage side of the background activity computation: each embryo's blastomere-activity
//! curve ([`tables::ACTIVITY_CURVES`]) and how far along the change log the computation is
//! (`meta/activity_cursor`).
//!
//! # Rules
//!
//! - The server's computation (`src/activity.rs`) follows the change log: an acquisition
//!   change names an embryo with a new image run. It reads the frames after the curve's
//!   `through_ms`, computes their points and submits [`ActivityRecorded`].
//! - Applying appends only the points after the stored `through_ms`, so a resend (after a
//!   crash between the computation and the commit) changes nothing, and the cursor only moves
//!   forward. The cursor moves to the end of a page of changes only with, or after, the curves
//!   of every embryo that page named: a crash repeats work, never skips it.
//! - Curves are derived data: no change-log entry, no audit row. `esserver verify` checks that
//!   each row decodes, names an embryo, and has its points in time order within bounds.

use crate::apply::Batch;
use crate::error::{Never, StorageError};
use crate::limits::{ACTIVITY_CURVES_PER_OP_MAX, ACTIVITY_POINTS_PER_EMBRYO_MAX, INSTANT_MS_MAX};
use crate::ops::{Applied, Operation};
use crate::reader::Reader;
use crate::tables::{self, decode, encode, ActivityCurveRow, EmbryoRow};
use redb::{ReadableTable, ReadableTableMetadata};

/// New points of one embryo's curve.
#[derive(Debug, Clone, PartialEq)]
pub struct CurveUpdate {
    pub embryo_id: String,
    pub focal_plane: i32,
    /// (acquired_at_ms, activity from 0 to 1), strictly increasing in time.
    pub points: Vec<(i64, f64)>,
    /// Frames of this update that could not be decoded or compared.
    pub frames_skipped: u32,
    /// The latest acquisition this update analysed (at least its last point's).
    pub through_ms: i64,
}

/// Appends points to embryos' curves and moves the cursor to `cursor` (never back). Embryos
/// that do not exist are passed over.
#[derive(Debug, Clone, PartialEq)]
pub struct ActivityRecorded {
    pub curves: Vec<CurveUpdate>,
    pub cursor: u64,
}

/// What [`ActivityRecorded`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ActivityApplied {
    /// Points appended (points at or before a curve's `through_ms` are not).
    pub points: u64,
    /// Curves that were created.
    pub curves_created: u64,
}

impl Operation for ActivityRecorded {
    type Outcome = ActivityApplied;
    type Refusal = Never;

    fn validate(&self) -> Result<(), String> {
        if self.curves.len() > ACTIVITY_CURVES_PER_OP_MAX {
            return Err(format!(
                "{} curves in one update; at most {ACTIVITY_CURVES_PER_OP_MAX}",
                self.curves.len()
            ));
        }
        for curve in &self.curves {
            if curve.embryo_id.is_empty() || curve.embryo_id.len() > 128 {
                return Err("an embryo id must have 1 to 128 bytes".into());
            }
            if curve.points.len() > ACTIVITY_POINTS_PER_EMBRYO_MAX {
                return Err(format!(
                    "{} points for embryo {}; at most {ACTIVITY_POINTS_PER_EMBRYO_MAX}",
                    curve.points.len(),
                    curve.embryo_id
                ));
            }
            let mut previous = i64::MIN;
            for &(at_ms, activity) in &curve.points {
                if at_ms <= previous || !(0..=INSTANT_MS_MAX).contains(&at_ms) {
                    return Err(format!(
                        "the points of embryo {} are not in time order within bounds",
                        curve.embryo_id
                    ));
                }
                if !(0.0..=1.0).contains(&activity) {
                    return Err(format!(
                        "an activity of embryo {} is {activity}; it is a fraction from 0 to 1",
                        curve.embryo_id
                    ));
                }
                previous = at_ms;
            }
            if curve.through_ms < previous || !(0..=INSTANT_MS_MAX).contains(&curve.through_ms) {
                return Err(format!(
                    "through_ms of embryo {} is before its last point or out of bounds",
                    curve.embryo_id
                ));
            }
        }
        Ok(())
    }

    fn apply(&self, batch: &mut Batch<'_>) -> Applied<Self> {
        batch.activity_recorded(self)
    }

    fn at_ms(&self) -> Option<i64> {
        None
    }
}

impl Batch<'_> {
    pub(crate) fn activity_recorded(&mut self, op: &ActivityRecorded) -> Applied<ActivityRecorded> {
        let mut applied = ActivityApplied::default();
        for update in &op.curves {
            let Some(well) = self
                .embryo_by_id()
                .get(update.embryo_id.as_str())?
                .map(|g| g.value())
            else {
                continue;
            };
            let embryo_key = match self.wells().get(well)? {
                Some(embryo) => decode::<EmbryoRow>(embryo.value(), "embryo")?.embryo_key,
                None => continue,
            };
            let stored = match self.activity_curves().get(embryo_key)? {
                Some(row) => Some(decode::<ActivityCurveRow>(row.value(), "activity curve")?),
                None => None,
            };
            let mut row = match stored {
                Some(row) if row.focal_plane == update.focal_plane => row,
                Some(row) if update.through_ms <= row.through_ms => continue,
                // New, or computed at another plane (the first acquisition came in late):
                // this update starts the curve again.
                _ => {
                    applied.curves_created += 1;
                    ActivityCurveRow {
                        focal_plane: update.focal_plane,
                        through_ms: i64::MIN,
                        frames_skipped: 0,
                        points: Vec::new(),
                    }
                }
            };
            if update.through_ms <= row.through_ms {
                continue;
            }
            let room = ACTIVITY_POINTS_PER_EMBRYO_MAX.saturating_sub(row.points.len());
            let fresh: Vec<(i64, f64)> = update
                .points
                .iter()
                .copied()
                .filter(|(at_ms, _)| *at_ms > row.through_ms)
                .take(room)
                .collect();
            applied.points += fresh.len() as u64;
            row.points.extend(fresh);
            row.through_ms = update.through_ms;
            row.frames_skipped = row.frames_skipped.saturating_add(update.frames_skipped);
            self.activity_curves()
                .insert(embryo_key, encode(&row).as_slice())?;
        }
        let cursor = match self.meta().get(tables::META_ACTIVITY_CURSOR)? {
            Some(bytes) => decode_cursor(bytes.value())?,
            None => 0,
        };
        if op.cursor > cursor {
            self.meta().insert(
                tables::META_ACTIVITY_CURSOR,
                op.cursor.to_le_bytes().as_slice(),
            )?;
        }
        Ok(Ok(applied))
    }
}

fn decode_cursor(bytes: &[u8]) -> Result<u64, StorageError> {
    let bytes: [u8; 8] = bytes
        .try_into()
        .map_err(|_| StorageError::Corrupt("meta/activity_cursor is not 8 bytes".into()))?;
    Ok(u64::from_le_bytes(bytes))
}

/// An embryo's stored curve.
#[derive(Debug, Clone, PartialEq)]
pub struct ActivityCurve {
    pub embryo_key: u64,
    pub row: ActivityCurveRow,
}

impl Reader {
    /// The change-log seq the activity computation has consumed (0: none yet).
    pub fn activity_cursor(&self) -> Result<u64, StorageError> {
        let meta = self.txn.open_table(tables::META)?;
        let cursor = match meta.get(tables::META_ACTIVITY_CURSOR)? {
            Some(bytes) => decode_cursor(bytes.value())?,
            None => 0,
        };
        Ok(cursor)
    }

    /// The stored curve of `embryo_id`; None when the embryo is unknown or has none yet.
    pub fn activity_curve(&self, embryo_id: &str) -> Result<Option<ActivityCurve>, StorageError> {
        let by_id = self.txn.open_table(tables::EMBRYO_BY_ID)?;
        let Some(well) = by_id.get(embryo_id)?.map(|g| g.value()) else {
            return Ok(None);
        };
        let wells = self.txn.open_table(tables::WELLS)?;
        let Some(row) = wells.get(well)? else {
            return Ok(None);
        };
        let embryo_key = decode::<EmbryoRow>(row.value(), "embryo")?.embryo_key;
        let curves = self.txn.open_table(tables::ACTIVITY_CURVES)?;
        let row = match curves.get(embryo_key)? {
            Some(row) => row,
            None => return Ok(None),
        };
        Ok(Some(ActivityCurve {
            embryo_key,
            row: decode(row.value(), "activity curve")?,
        }))
    }

    /// Embryos with a stored curve.
    pub fn activity_curve_count(&self) -> Result<u64, StorageError> {
        Ok(self.txn.open_table(tables::ACTIVITY_CURVES)?.len()?)
    }

    /// Up to `limit` embryo ids by embryo key, after `after` (a key): for a scan of every
    /// embryo. Returns (key, id) pairs.
    pub fn embryo_ids_after(
        &self,
        after: u64,
        limit: u32,
    ) -> Result<Vec<(u64, String)>, StorageError> {
        let by_key = self.txn.open_table(tables::EMBRYO_BY_KEY)?;
        let wells = self.txn.open_table(tables::WELLS)?;
        let mut out = Vec::new();
        for entry in by_key.range(after.saturating_add(1)..)? {
            if out.len() >= limit as usize {
                break;
            }
            let (key, well) = entry?;
            if let Some(row) = wells.get(well.value())? {
                out.push((
                    key.value(),
                    decode::<EmbryoRow>(row.value(), "embryo")?.embryo_id,
                ));
            }
        }
        Ok(out)
    }
}

/// `esserver verify`: every curve decodes, names an embryo, and has at most
/// `ACTIVITY_POINTS_PER_EMBRYO_MAX` points in time order, each from 0 to 1, none after its
/// `through_ms`.
pub(crate) fn check_curves(
    txn: &redb::ReadTransaction,
    problem: &mut dyn FnMut(String),
) -> Result<(), StorageError> {
    let curves = txn.open_table(tables::ACTIVITY_CURVES)?;
    let embryos = txn.open_table(tables::EMBRYO_BY_KEY)?;
    for entry in curves.range::<u64>(..)? {
        let (key, value) = entry?;
        let embryo_key = key.value();
        let row: ActivityCurveRow = match decode(value.value(), "activity curve") {
            Ok(row) => row,
            Err(error) => {
                problem(format!(
                    "activity curve of embryo key {embryo_key}: {error}"
                ));
                continue;
            }
        };
        if embryos.get(embryo_key)?.is_none() {
            problem(format!(
                "an activity curve names embryo key {embryo_key}, which does not exist"
            ));
        }
        let ordered = row.points.windows(2).all(|w| w[0].0 < w[1].0);
        let bounded = row.points.len() <= ACTIVITY_POINTS_PER_EMBRYO_MAX
            && row
                .points
                .iter()
                .all(|(at, a)| (0.0..=1.0).contains(a) && *at <= row.through_ms);
        if !ordered || !bounded {
            problem(format!(
                "the activity curve of embryo key {embryo_key} has points out of order or \
                 bounds"
            ));
        }
    }
    Ok(())
}
