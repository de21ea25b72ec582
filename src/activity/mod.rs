//! An embryo's blastomere-activity curve and the cleavage times it proposes
//! (`es_models::activity`, docs/models.md), at its central focal plane.
//!
//! - [`Background`] computes every embryo's curve as its images arrive and stores it
//!   (`[Server] activity = on`); [`curve`] serves the stored curve.
//! - Without a stored curve (the computation off, or not there yet), [`curve`] computes it from
//!   the stored images for the request ([`embryo_activity`], on a worker: the API's requests
//!   and the viewers' reads run there), at most [`COMPUTATIONS_MAX`] at once: a curve costs up
//!   to a few CPU seconds, so requests beyond that are answered busy rather than filling every
//!   worker.
//!
//! Each stored JPEG is decoded to grey with zune-jpeg, bounded in size; a frame that cannot be
//! decoded, or that differs in size from the one before, gives no point (the curve goes on from
//! the next). At most [`ACQUISITIONS_MAX`] acquisitions are read for one curve. Both paths share
//! one analysis (`Analysis`), so they give the same points.

mod background;

pub use background::{Background, BackgroundStatus};
use es_models::activity::{self, Grey, Point, Proposed};
use es_storage::{StorageError, Store};
use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;
use zune_jpeg::JpegDecoder;

/// Acquisitions read for one curve at most (a week at one acquisition every 10 minutes is
/// about 1,000).
pub const ACQUISITIONS_MAX: usize = 4000;
/// Frames larger than this on a side are not decoded.
pub const FRAME_SIDE_MAX: usize = 4096;
/// Curves computed at the same time, at most.
pub const COMPUTATIONS_MAX: usize = 1;

static COMPUTING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A slot for one computation; None when [`COMPUTATIONS_MAX`] are running.
pub struct Slot(());

impl Slot {
    pub fn take() -> Option<Slot> {
        use std::sync::atomic::Ordering;
        let taken = COMPUTING.fetch_add(1, Ordering::AcqRel);
        if taken >= COMPUTATIONS_MAX {
            COMPUTING.fetch_sub(1, Ordering::AcqRel);
            return None;
        }
        Some(Slot(()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        COMPUTING.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// An embryo's curve.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EmbryoActivity {
    pub focal_plane: i32,
    pub points: Vec<Point>,
    pub proposed: Proposed,
    /// The acquisitions of the proposed t2, t3, t4, t5 (Unix ms), in that order.
    #[serde(skip)]
    pub proposed_at_ms: Vec<i64>,
    /// Frames that could not be decoded or compared.
    pub frames_skipped: u32,
    /// The latest acquisition analysed (Unix ms); None when there is none.
    pub through_ms: Option<i64>,
    /// From the background computation's store (else computed on request).
    pub stored: bool,
    /// Later acquisitions are still to be analysed by the background computation.
    pub pending: bool,
}

/// Decodes a JPEG to 8-bit grey: (width, height, pixels).
pub fn decode_grey(jpeg: &[u8]) -> Result<(usize, usize, Vec<u8>), String> {
    let options = DecoderOptions::default()
        .jpeg_set_out_colorspace(ColorSpace::Luma)
        .set_max_width(FRAME_SIDE_MAX)
        .set_max_height(FRAME_SIDE_MAX);
    let mut decoder = JpegDecoder::new_with_options(ZCursor::new(jpeg), options);
    let pixels = decoder.decode().map_err(|error| error.to_string())?;
    let (width, height) = decoder.dimensions().ok_or("the JPEG has no dimensions")?;
    if pixels.len() != width * height {
        return Err(format!(
            "decoded {} values for {width} x {height} grey pixels",
            pixels.len()
        ));
    }
    Ok((width, height, pixels))
}

/// A decoded frame: (width, height, grey pixels).
type Decoded = (usize, usize, Vec<u8>);

/// Turns an embryo's frames, given in time order, into curve points: each frame is decoded
/// and compared with the one before. One analysis for the computation on request and the one
/// in the background.
#[derive(Default)]
struct Analysis {
    previous: Option<(i64, Decoded)>,
    points: Vec<Point>,
    skipped: u32,
    /// Frames decoded (the measure of work: images analysed).
    decoded: u64,
}

impl Analysis {
    fn starting_from(previous: Option<(i64, Decoded)>) -> Analysis {
        Analysis {
            previous,
            ..Analysis::default()
        }
    }

    /// The frame acquired at `at_ms`: a point when the frame before it could be compared.
    fn frame(&mut self, embryo_id: &str, at_ms: i64, jpeg: &[u8]) {
        self.decoded += 1;
        let decoded = match decode_grey(jpeg) {
            Ok(decoded) => decoded,
            Err(error) => {
                tracing::warn!(%embryo_id, acquired_at_ms = at_ms, %error, "a frame cannot be decoded for the activity curve");
                self.skipped += 1;
                self.previous = None;
                return;
            }
        };
        if let Some((_, (width, height, pixels))) = &self.previous {
            let before = Grey {
                width: *width,
                height: *height,
                pixels,
            };
            let now = Grey {
                width: decoded.0,
                height: decoded.1,
                pixels: &decoded.2,
            };
            match activity::activity(&before, &now) {
                Ok(value) => self.points.push(Point {
                    acquired_at_ms: at_ms,
                    activity: value,
                }),
                Err(_) => self.skipped += 1,
            }
        }
        self.previous = Some((at_ms, decoded));
    }
}

/// The central focal plane of an embryo: the one nearest 0 of its first acquisition.
fn central_plane(reader: &es_storage::Reader, embryo_id: &str) -> Result<i32, StorageError> {
    let first = reader.acquisitions(embryo_id, None, 1)?.unwrap_or_default();
    Ok(first
        .first()
        .and_then(|a| a.focal_planes.iter().copied().min_by_key(|p| p.abs()))
        .unwrap_or(0))
}

/// The acquisition time of the embryo's first frame at `focal_plane` after `after` (from the
/// start when None): where a read that met damage stopped.
pub(crate) fn next_frame_at(
    reader: &es_storage::Reader,
    embryo_id: &str,
    focal_plane: i32,
    after: Option<i64>,
) -> Result<Option<i64>, StorageError> {
    let mut after = after;
    loop {
        let Some(page) = reader.acquisitions(embryo_id, after, 256)? else {
            return Ok(None);
        };
        let Some(last) = page.last().map(|a| a.acquired_at_ms) else {
            return Ok(None);
        };
        if let Some(found) = page.iter().find(|a| a.focal_planes.contains(&focal_plane)) {
            return Ok(Some(found.acquired_at_ms));
        }
        after = Some(last);
    }
}

/// The curve with its proposals, from its points.
fn with_proposals(
    focal_plane: i32,
    points: Vec<Point>,
    frames_skipped: u32,
    insemination_at_ms: i64,
    through_ms: Option<i64>,
    stored: bool,
) -> EmbryoActivity {
    let proposed = activity::propose(&points, insemination_at_ms);
    let proposed_at_ms = activity::peaks(&points)
        .into_iter()
        .map(|i| points[i].acquired_at_ms)
        .filter(|at| *at >= insemination_at_ms)
        .take(4)
        .collect();
    EmbryoActivity {
        focal_plane,
        points,
        proposed,
        proposed_at_ms,
        frames_skipped,
        through_ms,
        stored,
        pending: false,
    }
}

/// The curve of `embryo_id`, computed now from its stored images; None when the embryo is
/// unknown.
pub fn embryo_activity(
    store: &Store,
    embryo_id: &str,
) -> Result<Option<EmbryoActivity>, StorageError> {
    let reader = store.read()?;
    let Some(embryo) = reader.embryo(embryo_id)? else {
        return Ok(None);
    };
    let focal_plane = central_plane(&reader, embryo_id)?;
    drop(reader);
    let mut analysis = Analysis::default();
    let mut from_ms = i64::MIN;
    let mut read = 0usize;
    while read < ACQUISITIONS_MAX {
        let chunk = store.read()?.frames(
            embryo_id,
            focal_plane,
            from_ms,
            i64::MAX,
            (ACQUISITIONS_MAX - read).min(u32::MAX as usize) as u32,
        )?;
        let Some(chunk) = chunk else {
            return Ok(None);
        };
        if chunk.frames.is_empty() && chunk.damaged.is_none() {
            break;
        }
        for frame in &chunk.frames {
            read += 1;
            from_ms = frame.acquired_at_ms.saturating_add(1);
            analysis.frame(embryo_id, frame.acquired_at_ms, &frame.jpeg);
        }
        match chunk.damaged {
            None => {}
            Some(error @ StorageError::ArchiveUnavailable { .. }) => return Err(error),
            Some(_) => {
                // Passed over, as the background computation does: the curve goes on from
                // the frame after it.
                let after = (from_ms != i64::MIN).then(|| from_ms - 1);
                let Some(damaged_at) =
                    next_frame_at(&store.read()?, embryo_id, focal_plane, after)?
                else {
                    break;
                };
                read += 1;
                analysis.skipped += 1;
                analysis.previous = None;
                from_ms = damaged_at.saturating_add(1);
            }
        }
    }
    let through_ms = analysis.previous.as_ref().map(|(at, _)| *at);
    Ok(Some(with_proposals(
        focal_plane,
        analysis.points,
        analysis.skipped,
        embryo.insemination_at_ms,
        through_ms,
        false,
    )))
}

/// Why a curve cannot be given now.
#[derive(Debug)]
pub enum CurveError {
    /// [`COMPUTATIONS_MAX`] computations are running: retry in a moment.
    Busy,
    Storage(StorageError),
}

impl From<StorageError> for CurveError {
    fn from(error: StorageError) -> Self {
        CurveError::Storage(error)
    }
}

/// The curve of `embryo_id` as a viewer or the API should see it; None when the embryo is
/// unknown. The stored curve when it covers every acquisition; with the background
/// computation on (`background`), the stored curve even when it lags (`pending` says so);
/// otherwise the curve computed now, in one of [`COMPUTATIONS_MAX`] slots.
pub fn curve(
    store: &Store,
    embryo_id: &str,
    background: bool,
) -> Result<Option<EmbryoActivity>, CurveError> {
    let reader = store.read()?;
    let Some(embryo) = reader.embryo(embryo_id)? else {
        return Ok(None);
    };
    if let Some(stored) = reader.activity_curve(embryo_id)? {
        let row = stored.row;
        let newer = reader
            .acquisitions(embryo_id, Some(row.through_ms), 1)?
            .is_some_and(|later| !later.is_empty());
        if background || !newer {
            let points = row
                .points
                .iter()
                .map(|&(acquired_at_ms, activity)| Point {
                    acquired_at_ms,
                    activity,
                })
                .collect();
            let mut curve = with_proposals(
                row.focal_plane,
                points,
                row.frames_skipped,
                embryo.insemination_at_ms,
                (row.through_ms != i64::MIN).then_some(row.through_ms),
                true,
            );
            curve.pending = newer;
            return Ok(Some(curve));
        }
    }
    drop(reader);
    let Some(_slot) = Slot::take() else {
        return Err(CurveError::Busy);
    };
    Ok(embryo_activity(store, embryo_id)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_grey_jpeg_decodes_to_its_size_and_garbage_is_an_error() {
        let pixels: Vec<u8> = (0..64 * 48).map(|i| (i % 251) as u8).collect();
        let jpeg = es_loadtest::frames::encode_grey(&pixels, 64, 48);
        let (width, height, decoded) = decode_grey(&jpeg).unwrap();
        assert_eq!((width, height, decoded.len()), (64, 48, 64 * 48));
        assert!(decode_grey(b"not a jpeg").is_err());
    }
}

#[cfg(test)]
mod slot_tests {
    use super::*;

    #[test]
    fn computations_are_bounded() {
        let first = Slot::take().expect("a free slot");
        assert!(Slot::take().is_none(), "a second computation waits");
        drop(first);
        assert!(Slot::take().is_some());
    }
}

#[cfg(test)]
mod damage_tests {
    //! A damaged frame costs the curve exactly that frame, the same way in the background and
    //! on request.
    use super::*;
    use es_storage::*;

    const T0: i64 = 1_700_000_000_000;
    const FRAMES: u32 = 40;
    const DAMAGED: u32 = 15;
    const SIDE: usize = 96;

    fn frame(index: u32) -> bytes::Bytes {
        let pixels = es_models::synthetic::frame(SIDE, index as usize, &[10, 20, 23, 30]);
        es_loadtest::frames::encode_grey(&pixels, SIDE as u16, SIDE as u16)
    }

    fn filled(dir: &std::path::Path) -> (Store, Writer) {
        let store = Store::open(dir, &StoreOptions::default(), [7; 16]).unwrap();
        let writer = store.start_writer(WriterOptions::default());
        let instrument = writer
            .write(InstrumentHello {
                number: 0,
                serial: "SN-A".into(),
                model: "EmbryoScope+".into(),
                firmware: "1".into(),
                presented_secret: None,
                new_secret: "s".into(),
                issued_connection_open: false,
                enrolment: Default::default(),
                at_ms: T0,
            })
            .unwrap()
            .instrument_id;
        writer
            .write(RegisterDish {
                instrument_id: instrument,
                dish: DishRegistration {
                    fertilization_method: String::new(),
                    dish_id: "D1".into(),
                    slot: 1,
                    patient: PatientRef {
                        patient_idx: String::new(),
                        patient_id: "MRN-A".into(),
                        first_name: String::new(),
                        last_name: String::new(),
                        date_of_birth: String::new(),
                    },
                    treatment_name: "2026-1".into(),
                    insemination_at_ms: T0 - 20 * 3_600_000,
                    wells: vec![WellRegistration {
                        label: String::new(),
                        well: 1,
                        embryo_id: "E1".into(),
                    }],
                },
                at_ms: T0,
            })
            .unwrap();
        for n in 0..FRAMES {
            writer
                .write(PutImage {
                    instrument_id: instrument,
                    dish_id: "D1".into(),
                    well: 1,
                    focal_plane: 0,
                    acquired_at_ms: T0 + i64::from(n) * 600_000,
                    jpeg: ImageBytes::new(frame(n)),
                    at_ms: T0 + i64::from(n),
                })
                .unwrap();
        }
        (store, writer)
    }

    /// Flips a byte in the middle of frame `n`'s record in the volume files.
    fn damage(store: &Store, n: u32) {
        let jpeg = frame(n);
        let needle = &jpeg[jpeg.len() / 2..jpeg.len() / 2 + 32];
        for entry in std::fs::read_dir(store.volumes_dir()).unwrap() {
            let path = entry.unwrap().path();
            let mut bytes = std::fs::read(&path).unwrap();
            if let Some(at) = bytes.windows(needle.len()).position(|w| w == needle) {
                bytes[at + 8] ^= 0x5a;
                std::fs::write(&path, bytes).unwrap();
                return;
            }
        }
        panic!("frame {n} is in no volume");
    }

    #[test]
    fn a_damaged_frame_costs_the_curve_that_frame_in_the_background_and_on_request() {
        let dir = tempfile::tempdir().unwrap();
        let (store, writer) = filled(dir.path());
        damage(&store, DAMAGED);
        let on_request = embryo_activity(&store, "E1").unwrap().unwrap();
        let background = Background::start(&store, &writer).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
        let stored = loop {
            let reader = store.read().unwrap();
            let done = reader.activity_cursor().unwrap() == reader.last_change_seq().unwrap();
            if let (true, Some(curve)) = (done, reader.activity_curve("E1").unwrap()) {
                break curve.row;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{:?}",
                background.status()
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        background.stop();
        let at = |n: u32| T0 + i64::from(n) * 600_000;
        // Every frame gives a point but the first, the damaged one and the one after it
        // (nothing to compare it with).
        let expected: Vec<i64> = (1..FRAMES)
            .filter(|n| *n != DAMAGED && *n != DAMAGED + 1)
            .map(at)
            .collect();
        let stored_at: Vec<i64> = stored.points.iter().map(|p| p.0).collect();
        assert_eq!(stored_at, expected);
        assert_eq!(stored.frames_skipped, 1);
        assert_eq!(stored.through_ms, at(FRAMES - 1));
        let requested: Vec<(i64, f64)> = on_request
            .points
            .iter()
            .map(|p| (p.acquired_at_ms, p.activity))
            .collect();
        assert_eq!(requested, stored.points, "the same points both ways");
        assert_eq!(on_request.frames_skipped, 1);
        // The served curve is the stored one.
        let served = curve(&store, "E1", true).unwrap().unwrap();
        assert!(served.stored && !served.pending);
        assert_eq!(served.through_ms, Some(at(FRAMES - 1)));
        writer.shutdown();
    }
}
