//! Real-sized embryo frames: 500 x 500 8-bit greyscale JPEGs of about 30 KB, generated once
//! per run (a textured disc on a noisy background, so the encoder cannot shrink them to
//! nothing) and shared by every simulated incubator.

use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

pub const FRAME_SIDE_PIXELS: u16 = 500;
/// JPEG quality that gives frames of about 30 KB (the design figure) for this picture.
const QUALITY: u8 = 78;

/// `count` distinct frames, deterministic for a seed.
pub fn generate(count: usize, seed: u64) -> Vec<Bytes> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..count).map(|_| one_frame(&mut rng)).collect()
}

fn one_frame(rng: &mut StdRng) -> Bytes {
    let side = FRAME_SIDE_PIXELS as usize;
    let centre = side as f64 / 2.0 + rng.random_range(-20.0..20.0);
    let radius = 150.0 + rng.random_range(-20.0..20.0);
    let mut pixels = vec![0u8; side * side];
    for y in 0..side {
        for x in 0..side {
            let dx = x as f64 - centre;
            let dy = y as f64 - centre;
            let distance = (dx * dx + dy * dy).sqrt();
            let base = if distance < radius {
                // The embryo: a brighter textured disc with a darker rim.
                let texture = ((x as f64 / 7.0).sin() * (y as f64 / 9.0).cos()) * 18.0;
                170.0 + texture - (distance / radius).powi(6) * 60.0
            } else {
                90.0
            };
            let noise: f64 = rng.random_range(-9.0..9.0);
            pixels[y * side + x] = (base + noise).clamp(0.0, 255.0) as u8;
        }
    }
    encode_grey(&pixels, FRAME_SIDE_PIXELS, FRAME_SIDE_PIXELS)
}

/// An 8-bit grey picture (`width` x `height`, row by row) as a JPEG at the frames' quality.
pub fn encode_grey(pixels: &[u8], width: u16, height: u16) -> Bytes {
    let mut encoded = Vec::with_capacity(40 * 1024);
    let encoder = jpeg_encoder::Encoder::new(&mut encoded, QUALITY);
    encoder
        .encode(pixels, width, height, jpeg_encoder::ColorType::Luma)
        .expect("encoding into memory cannot fail");
    Bytes::from(encoded)
}

#[cfg(test)]
mod tests {
    #[test]
    fn frames_are_jpegs_of_realistic_size() {
        let frames = super::generate(3, 7);
        for frame in &frames {
            assert_eq!(&frame[..2], &[0xFF, 0xD8], "JPEG start of image");
            assert_eq!(
                &frame[frame.len() - 2..],
                &[0xFF, 0xD9],
                "JPEG end of image"
            );
            eprintln!("frame of {} bytes", frame.len());
            assert!(
                (20_000..=40_000).contains(&frame.len()),
                "frame of {} bytes",
                frame.len()
            );
        }
        assert_ne!(frames[0], frames[1], "frames differ");
    }
}
