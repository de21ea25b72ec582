//! The run's picture, as SVG (no dependency): on the left, each operation's latency by
//! percentile (the x axis in "nines": 0, 90, 99, 99.9, 99.99 %; the y axis logarithmic, ms),
//! with its p99 target marked; on the right, images/s achieved each second against the
//! offered rate.

use crate::run::{OperationReport, Sample};
use std::fmt::Write as _;

const WIDTH: f64 = 1100.0;
const PANEL_W: f64 = 460.0;
const PANEL_H: f64 = 320.0;
const TOP: f64 = 60.0;
const LEFT_1: f64 = 80.0;
const LEFT_2: f64 = 620.0;
const COLOURS: [&str; 8] = [
    "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
];
/// The rightmost percentile shown: 99.99 % (four nines).
const NINES_MAX: f64 = 4.0;

fn nines(percentile: f64) -> f64 {
    let rest = (1.0 - percentile / 100.0).max(1e-12);
    (-rest.log10()).clamp(0.0, NINES_MAX)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The SVG document.
pub fn svg(title: &str, operations: &[OperationReport], timeline: &[Sample]) -> String {
    let mut out = String::new();
    // Room under the panels for the axis labels and one legend line per operation.
    let height = TOP + PANEL_H + 60.0 + 16.0 * operations.len() as f64;
    let _ = write!(
        out,
        "<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{height}' \
         font-family='sans-serif' font-size='12'>\
         <rect width='100%' height='100%' fill='white'/>\
         <text x='{}' y='24' font-size='16' text-anchor='middle'>{}</text>",
        WIDTH / 2.0,
        escape(title)
    );
    latency_panel(&mut out, operations);
    throughput_panel(&mut out, timeline);
    out.push_str("</svg>\n");
    out
}

fn latency_panel(out: &mut String, operations: &[OperationReport]) {
    let values_ms = operations
        .iter()
        .flat_map(|op| op.curve.iter().map(|(_, us)| *us as f64 / 1000.0))
        .chain(
            operations
                .iter()
                .filter_map(|op| es_perf::targets::target(&op.name).and_then(|t| t.p99_ms_max)),
        );
    let max_ms = values_ms.fold(1.0f64, f64::max);
    let (log_min, log_max) = (-2.0f64, max_ms.log10().ceil().max(0.0));
    let x = |n: f64| LEFT_1 + n / NINES_MAX * PANEL_W;
    let y = |ms: f64| {
        let l = ms.max(10f64.powf(log_min)).log10();
        TOP + PANEL_H - (l - log_min) / (log_max - log_min) * PANEL_H
    };
    axes(out, LEFT_1, "latency by percentile (ms, log scale)");
    for (n, label) in [
        (0.0, "0%"),
        (1.0, "90%"),
        (2.0, "99%"),
        (3.0, "99.9%"),
        (4.0, "99.99%"),
    ] {
        let _ = write!(
            out,
            "<line x1='{0}' y1='{TOP}' x2='{0}' y2='{1}' stroke='#ddd'/>\
             <text x='{0}' y='{2}' text-anchor='middle'>{label}</text>",
            x(n),
            TOP + PANEL_H,
            TOP + PANEL_H + 16.0
        );
    }
    let mut decade = log_min;
    while decade <= log_max {
        let ms = 10f64.powf(decade);
        let _ = write!(
            out,
            "<line x1='{LEFT_1}' y1='{0}' x2='{1}' y2='{0}' stroke='#ddd'/>\
             <text x='{2}' y='{3}' text-anchor='end'>{4}</text>",
            y(ms),
            LEFT_1 + PANEL_W,
            LEFT_1 - 6.0,
            y(ms) + 4.0,
            if ms < 1.0 {
                format!("{ms}")
            } else {
                format!("{ms:.0}")
            }
        );
        decade += 1.0;
    }
    for (i, op) in operations.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        if op.curve.is_empty() {
            continue;
        }
        let points: Vec<String> = op
            .curve
            .iter()
            .map(|(p, us)| format!("{:.1},{:.1}", x(nines(*p)), y(*us as f64 / 1000.0)))
            .collect();
        let _ = write!(
            out,
            "<polyline fill='none' stroke='{colour}' stroke-width='2' points='{}'/>",
            points.join(" ")
        );
        if let Some(limit) = es_perf::targets::target(&op.name).and_then(|t| t.p99_ms_max) {
            let _ = write!(
                out,
                "<line x1='{0}' y1='{1}' x2='{2}' y2='{1}' stroke='{colour}' stroke-width='3' \
                 stroke-dasharray='4 3'><title>{3} p99 target {limit} ms</title></line>",
                x(2.0) - 14.0,
                y(limit),
                x(2.0) + 14.0,
                escape(&op.name)
            );
        }
        let _ = write!(
            out,
            "<rect x='{0}' y='{1}' width='12' height='3' fill='{colour}'/>\
             <text x='{2}' y='{3}'>{4} (p99 {5:.2} ms)</text>",
            LEFT_1 + 10.0,
            TOP + PANEL_H + 46.0 + 16.0 * i as f64,
            LEFT_1 + 28.0,
            TOP + PANEL_H + 50.0 + 16.0 * i as f64,
            escape(&op.name),
            op.latency.p99_us as f64 / 1000.0
        );
    }
    let _ = write!(
        out,
        "<text x='{}' y='{}' text-anchor='end' fill='#555'>dashes at 99 %: p99 targets</text>",
        LEFT_1 + PANEL_W - 6.0,
        TOP + 16.0
    );
}

fn throughput_panel(out: &mut String, timeline: &[Sample]) {
    let t_max = timeline.last().map_or(1.0, |s| s.t_s).max(1.0);
    let r_max = timeline
        .iter()
        .map(|s| s.achieved_per_s.max(s.offered_per_s))
        .fold(1.0f64, f64::max)
        * 1.15;
    let x = |t: f64| LEFT_2 + t / t_max * PANEL_W;
    let y = |r: f64| TOP + PANEL_H - r / r_max * PANEL_H;
    axes(out, LEFT_2, "images/s acknowledged each second");
    for i in 0..=4 {
        let r = r_max * i as f64 / 4.0;
        let t = t_max * i as f64 / 4.0;
        let _ = write!(
            out,
            "<line x1='{LEFT_2}' y1='{0}' x2='{1}' y2='{0}' stroke='#ddd'/>\
             <text x='{2}' y='{3}' text-anchor='end'>{r:.0}</text>\
             <text x='{4}' y='{5}' text-anchor='middle'>{t:.0} s</text>",
            y(r),
            LEFT_2 + PANEL_W,
            LEFT_2 - 6.0,
            y(r) + 4.0,
            x(t),
            TOP + PANEL_H + 16.0
        );
    }
    if timeline.is_empty() {
        return;
    }
    let achieved: Vec<String> = timeline
        .iter()
        .map(|s| format!("{:.1},{:.1}", x(s.t_s), y(s.achieved_per_s)))
        .collect();
    let offered: Vec<String> = timeline
        .iter()
        .map(|s| format!("{:.1},{:.1}", x(s.t_s), y(s.offered_per_s)))
        .collect();
    let _ = write!(
        out,
        "<polyline fill='none' stroke='#999' stroke-width='2' stroke-dasharray='6 4' points='{0}'/>\
         <polyline fill='none' stroke='{1}' stroke-width='2' points='{2}'/>\
         <text x='{3}' y='{4}' fill='#999'>offered</text><text x='{3}' y='{5}' fill='{1}'>achieved</text>",
        offered.join(" "),
        COLOURS[0],
        achieved.join(" "),
        LEFT_2 + 10.0,
        TOP + 14.0,
        TOP + 30.0,
    );
}

fn axes(out: &mut String, left: f64, title: &str) {
    let _ = write!(
        out,
        "<rect x='{left}' y='{TOP}' width='{PANEL_W}' height='{PANEL_H}' fill='none' stroke='#333'/>\
         <text x='{}' y='{}' text-anchor='middle' font-size='13'>{}</text>",
        left + PANEL_W / 2.0,
        TOP - 10.0,
        escape(title)
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use es_perf::latency::LatencyRecorder;

    #[test]
    fn the_plot_is_well_formed_svg_with_one_curve_per_operation() {
        let mut recorder = LatencyRecorder::new();
        for us in 1..=10_000u64 {
            recorder.record_us(us);
        }
        let op = |name: &str| OperationReport {
            name: name.into(),
            per_s: 10.0,
            latency: recorder.summary(),
            errors: 0,
            curve: recorder.percentile_curve(),
        };
        let timeline: Vec<Sample> = (1..=5)
            .map(|t| Sample {
                t_s: t as f64,
                offered_per_s: 100.0,
                achieved_per_s: 90.0 + t as f64,
                p99_ms: 3.0,
            })
            .collect();
        let text = svg(
            "a <run>",
            &[op("image_ack"), op("viewer_frame_fetch")],
            &timeline,
        );
        assert!(text.starts_with("<svg") && text.trim_end().ends_with("</svg>"));
        assert_eq!(text.matches("<polyline").count(), 2 + 2);
        assert!(text.contains("a &lt;run&gt;"));
        assert!(text.contains("image_ack p99 target 10 ms"));
        assert!((nines(99.0) - 2.0).abs() < 1e-9);
        assert_eq!(nines(100.0), NINES_MAX);
    }
}
