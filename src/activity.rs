//! An embryo's blastomere-activity curve and the cleavage times it proposes
//! (`es_models::activity`, docs/models.md), computed from its stored images when asked (on a
//! worker: the public API's requests run there), at its central focal plane.
//!
//! Each stored JPEG is decoded to grey with zune-jpeg, bounded in size; a frame that cannot be
//! decoded, or that differs in size from the one before, gives no point (the curve goes on from
//! the next). At most [`ACQUISITIONS_MAX`] acquisitions are read, and at most
//! [`COMPUTATIONS_MAX`] curves are computed at once (a curve costs up to a few CPU seconds:
//! requests beyond that are answered busy rather than filling every worker).

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

/// The curve of `embryo_id`; None when the embryo is unknown.
pub fn embryo_activity(
    store: &Store,
    embryo_id: &str,
) -> Result<Option<EmbryoActivity>, StorageError> {
    let reader = store.read()?;
    let Some(embryo) = reader.embryo(embryo_id)? else {
        return Ok(None);
    };
    // The central plane: the one nearest 0 of the first acquisition.
    let first = reader.acquisitions(embryo_id, None, 1)?.unwrap_or_default();
    let focal_plane = first
        .first()
        .and_then(|a| a.focal_planes.iter().copied().min_by_key(|p| p.abs()))
        .unwrap_or(0);
    drop(reader);
    let mut points = Vec::new();
    let mut skipped = 0u32;
    let mut previous: Option<(usize, usize, Vec<u8>)> = None;
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
        if chunk.frames.is_empty() {
            break;
        }
        for frame in &chunk.frames {
            read += 1;
            from_ms = frame.acquired_at_ms.saturating_add(1);
            let decoded = match decode_grey(&frame.jpeg) {
                Ok(decoded) => decoded,
                Err(error) => {
                    tracing::warn!(%embryo_id, acquired_at_ms = frame.acquired_at_ms, %error, "a frame cannot be decoded for the activity curve");
                    skipped += 1;
                    previous = None;
                    continue;
                }
            };
            if let Some((width, height, pixels)) = &previous {
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
                    Ok(value) => points.push(Point {
                        acquired_at_ms: frame.acquired_at_ms,
                        activity: value,
                    }),
                    Err(_) => skipped += 1,
                }
            }
            previous = Some(decoded);
        }
        if chunk.damaged.is_some() {
            skipped += 1;
            break;
        }
    }
    let proposed = activity::propose(&points, embryo.insemination_at_ms);
    let proposed_at_ms = activity::peaks(&points)
        .into_iter()
        .map(|i| points[i].acquired_at_ms)
        .filter(|at| *at >= embryo.insemination_at_ms)
        .take(4)
        .collect();
    Ok(Some(EmbryoActivity {
        focal_plane,
        points,
        proposed,
        proposed_at_ms,
        frames_skipped: skipped,
    }))
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
