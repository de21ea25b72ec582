//! Synthetic time-lapse frames with divisions at chosen acquisitions, for the tests of the
//! activity curve (here and in the server): textured blastomeres on a noisy background, the
//! largest cell replaced by two of 0.8 its radius at each division, side by side (alternately
//! left-right and top-bottom). Deterministic for a frame index.

/// (x, y, radius) of each blastomere.
type Cell = (f64, f64, f64);

/// The cells of a `side` x `side` frame after the divisions at or before `frame`.
fn cells_at(side: usize, frame: usize, divisions: &[usize]) -> Vec<Cell> {
    let start = side as f64 / 2.0;
    let mut cells: Vec<Cell> = vec![(start, start, side as f64 * 0.21)];
    for (n, &at) in divisions.iter().enumerate() {
        if at > frame {
            break;
        }
        let largest = (0..cells.len())
            .max_by(|&a, &b| cells[a].2.total_cmp(&cells[b].2))
            .expect("there is always a cell");
        let (x, y, r) = cells.remove(largest);
        let (dx, dy) = if n % 2 == 0 {
            (0.55 * r, 0.0)
        } else {
            (0.0, 0.55 * r)
        };
        cells.push((x - dx, y - dy, 0.8 * r));
        cells.push((x + dx, y + dy, 0.8 * r));
    }
    cells
}

/// Frame `index` of the series (8-bit grey, row by row): background 90, cells about 170 with a
/// fixed texture, and per-frame noise of up to +-3 grey levels.
pub fn frame(side: usize, index: usize, divisions: &[usize]) -> Vec<u8> {
    let cells = cells_at(side, index, divisions);
    let mut state = (index as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut pixels = vec![0u8; side * side];
    for y in 0..side {
        for x in 0..side {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let noise = (state % 7) as i32 - 3;
            let inside = cells.iter().any(|&(cx, cy, r)| {
                let (dx, dy) = (x as f64 - cx, y as f64 - cy);
                dx * dx + dy * dy <= r * r
            });
            let base = if inside {
                165 + ((x * 7 + y * 13) % 11) as i32
            } else {
                90
            };
            pixels[y * side + x] = (base + noise).clamp(0, 255) as u8;
        }
    }
    pixels
}
