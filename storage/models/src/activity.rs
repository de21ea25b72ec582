//! Blastomere activity: how much an embryo's picture changed from one acquisition to the next,
//! and the cleavage times its peaks suggest.
//!
//! # The curve
//!
//! For each acquisition after the first, the activity is the mean absolute difference of the
//! 8-bit grey values of the central focal plane between that acquisition and the previous one,
//! over the well: the central disc whose diameter is [`WELL_DIAMETER_FRACTION`] of the frame's
//! shorter side (the time-lapse frames are centred on their well), divided by 255 so that it
//! is a fraction from 0 (nothing changed) to 1. A cell division moves and reshapes the
//! blastomeres at once: a spike. Slow drift and camera noise stay low.
//!
//! # Proposed cleavage times
//!
//! A peak is an acquisition whose activity is a local maximum and stands out from the curve's
//! baseline: above its median by more than [`PEAK_SPREADS`] times its median absolute
//! deviation (with a floor, [`PEAK_FLOOR`], so a perfectly still series has none). The first
//! four peaks propose t2, t3, t4 and t5, in hours after insemination. They are suggestions
//! (`source = computed`): an embryologist accepts or corrects them, and they never replace an
//! annotation a person made.

use serde::{Deserialize, Serialize};

/// The well's diameter as a fraction of the frame's shorter side.
pub const WELL_DIAMETER_FRACTION: f64 = 0.8;
/// How many median absolute deviations above the median a peak stands.
pub const PEAK_SPREADS: f64 = 6.0;
/// The least a peak stands above the median (a fraction of full scale): 0.5 grey levels.
pub const PEAK_FLOOR: f64 = 0.5 / 255.0;

/// One decoded focal plane: 8-bit grey values, row by row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grey<'a> {
    pub width: usize,
    pub height: usize,
    pub pixels: &'a [u8],
}

/// Why two frames cannot be compared.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActivityError {
    #[error("the frames differ in size ({0} x {1} and {2} x {3})")]
    SizeMismatch(usize, usize, usize, usize),
    #[error("a frame of {0} x {1} needs {2} pixels, it has {3}")]
    ShortFrame(usize, usize, usize, usize),
    #[error("the frame is empty")]
    Empty,
}

impl Grey<'_> {
    fn check(&self) -> Result<(), ActivityError> {
        if self.width == 0 || self.height == 0 {
            return Err(ActivityError::Empty);
        }
        let needed = self.width.saturating_mul(self.height);
        if self.pixels.len() < needed {
            return Err(ActivityError::ShortFrame(
                self.width,
                self.height,
                needed,
                self.pixels.len(),
            ));
        }
        Ok(())
    }
}

/// The activity between two frames of the same size: the mean absolute difference over the
/// well's disc, from 0 to 1.
pub fn activity(previous: &Grey<'_>, next: &Grey<'_>) -> Result<f64, ActivityError> {
    previous.check()?;
    next.check()?;
    if (previous.width, previous.height) != (next.width, next.height) {
        return Err(ActivityError::SizeMismatch(
            previous.width,
            previous.height,
            next.width,
            next.height,
        ));
    }
    let (width, height) = (next.width, next.height);
    let radius = WELL_DIAMETER_FRACTION * width.min(height) as f64 / 2.0;
    let (cx, cy) = ((width as f64 - 1.0) / 2.0, (height as f64 - 1.0) / 2.0);
    let radius_squared = radius * radius;
    let (mut sum, mut count) = (0u64, 0u64);
    for y in 0..height {
        let dy = y as f64 - cy;
        let room = radius_squared - dy * dy;
        if room < 0.0 {
            continue;
        }
        let half = room.sqrt();
        let from = ((cx - half).ceil().max(0.0)) as usize;
        let to = ((cx + half).floor().min(width as f64 - 1.0)) as usize;
        if from > to {
            continue;
        }
        let row = y * width;
        for x in from..=to {
            sum += u64::from(previous.pixels[row + x].abs_diff(next.pixels[row + x]));
            count += 1;
        }
    }
    if count == 0 {
        return Err(ActivityError::Empty);
    }
    Ok(sum as f64 / count as f64 / 255.0)
}

/// One point of an activity curve: the acquisition and the change since the previous one.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Point {
    pub acquired_at_ms: i64,
    pub activity: f64,
}

/// The indices of the curve's peaks (see the module documentation), in time order.
pub fn peaks(curve: &[Point]) -> Vec<usize> {
    if curve.len() < 3 {
        return Vec::new();
    }
    // A value that is not a number (a frame that could not be compared) is no peak and does
    // not hide its neighbours.
    let values: Vec<f64> = curve
        .iter()
        .map(|p| {
            if p.activity.is_finite() {
                p.activity
            } else {
                f64::MIN
            }
        })
        .collect();
    let finite: Vec<f64> = values.iter().copied().filter(|v| *v > f64::MIN).collect();
    if finite.len() < 3 {
        return Vec::new();
    }
    let median = median(&finite);
    let deviations: Vec<f64> = finite.iter().map(|v| (v - median).abs()).collect();
    let spread = median_of(deviations);
    let threshold = median + (PEAK_SPREADS * spread).max(PEAK_FLOOR);
    (0..values.len())
        .filter(|&i| {
            let value = values[i];
            let left = if i == 0 { f64::MIN } else { values[i - 1] };
            let right = values.get(i + 1).copied().unwrap_or(f64::MIN);
            value > threshold && value > left && value >= right
        })
        .collect()
}

fn median(values: &[f64]) -> f64 {
    median_of(values.to_vec())
}

fn median_of(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    let middle = values.len() / 2;
    if values.len() % 2 == 1 {
        values[middle]
    } else {
        (values[middle - 1] + values[middle]) / 2.0
    }
}

/// Cleavage times the curve suggests, in hours after insemination (kept to 0.01 h).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Proposed {
    pub t2: Option<f64>,
    pub t3: Option<f64>,
    pub t4: Option<f64>,
    pub t5: Option<f64>,
}

/// The first four peaks of `curve` as t2, t3, t4 and t5.
pub fn propose(curve: &[Point], insemination_at_ms: i64) -> Proposed {
    // Peaks before insemination are no cleavage (compared in milliseconds: a peak a few
    // seconds before would round to 0.00 h).
    let hours: Vec<f64> = peaks(curve)
        .into_iter()
        .filter(|&i| curve[i].acquired_at_ms >= insemination_at_ms)
        .map(|i| {
            crate::variables::round_hours(
                curve[i].acquired_at_ms.saturating_sub(insemination_at_ms) as f64 / 3_600_000.0,
            )
        })
        .collect();
    Proposed {
        t2: hours.first().copied(),
        t3: hours.get(1).copied(),
        t4: hours.get(2).copied(),
        t5: hours.get(3).copied(),
    }
}

/// Width and height of [`svg`]'s plot, in pixels.
pub const PLOT_WIDTH: u32 = 720;
pub const PLOT_HEIGHT: u32 = 240;

/// The curve drawn as a standalone SVG image: activity (0 to the curve's maximum) against
/// hours after insemination, with a vertical mark and label at each proposed cleavage time.
/// `title` is escaped; nothing else in the image comes from outside.
pub fn svg(curve: &[Point], insemination_at_ms: i64, proposed: &Proposed, title: &str) -> String {
    let (left, right, top, bottom) = (48.0, 12.0, 28.0, 28.0);
    let (width, height) = (f64::from(PLOT_WIDTH), f64::from(PLOT_HEIGHT));
    let hours = |at_ms: i64| at_ms.saturating_sub(insemination_at_ms) as f64 / 3_600_000.0;
    let finite: Vec<(f64, f64)> = curve
        .iter()
        .filter(|p| p.activity.is_finite())
        .map(|p| (hours(p.acquired_at_ms), p.activity))
        .collect();
    let (x0, x1) = match (finite.first(), finite.last()) {
        (Some(first), Some(last)) if last.0 > first.0 => (first.0, last.0),
        (Some(first), _) => (first.0, first.0 + 1.0),
        _ => (0.0, 1.0),
    };
    let y1 = finite
        .iter()
        .map(|p| p.1)
        .fold(0.0f64, f64::max)
        .max(PEAK_FLOOR);
    let x = |h: f64| left + (h - x0) / (x1 - x0) * (width - left - right);
    let y = |a: f64| top + (1.0 - a / y1) * (height - top - bottom);
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{PLOT_WIDTH}\" height=\"{PLOT_HEIGHT}\" \
         viewBox=\"0 0 {PLOT_WIDTH} {PLOT_HEIGHT}\" font-family=\"sans-serif\" font-size=\"11\">\
         <title>{}</title><rect width=\"100%\" height=\"100%\" fill=\"white\"/>\
         <text x=\"{left}\" y=\"16\" font-size=\"13\">{}</text>",
        escape_xml(title),
        escape_xml(title)
    );
    // Axes, with the hours at both ends and the maximum activity.
    out.push_str(&format!(
        "<path d=\"M{left} {top}V{:.1}H{:.1}\" stroke=\"black\" fill=\"none\"/>\
         <text x=\"{left}\" y=\"{:.1}\">{x0:.1} h</text>\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{x1:.1} h</text>\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{:.4}</text>",
        height - bottom,
        width - right,
        height - bottom + 16.0,
        width - right,
        height - bottom + 16.0,
        left - 4.0,
        top + 4.0,
        y1,
    ));
    for (name, value) in [
        ("t2", proposed.t2),
        ("t3", proposed.t3),
        ("t4", proposed.t4),
        ("t5", proposed.t5),
    ] {
        let Some(h) = value.filter(|h| (x0..=x1).contains(h)) else {
            continue;
        };
        out.push_str(&format!(
            "<path d=\"M{:.1} {top}V{:.1}\" stroke=\"#c33\" stroke-dasharray=\"3 3\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" fill=\"#c33\">{name} {h:.2} h</text>",
            x(h),
            height - bottom,
            x(h) + 3.0,
            top + 10.0,
        ));
    }
    if !finite.is_empty() {
        out.push_str("<polyline fill=\"none\" stroke=\"#15c\" stroke-width=\"1.5\" points=\"");
        for (i, (h, a)) in finite.iter().enumerate() {
            if i > 0 {
                out.push(' ');
            }
            out.push_str(&format!("{:.1},{:.1}", x(*h), y(*a)));
        }
        out.push_str("\"/>");
    }
    out.push_str("</svg>");
    out
}

fn escape_xml(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}
