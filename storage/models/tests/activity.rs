//! Synthetic time-lapse series with divisions at chosen acquisitions (`es_models::synthetic`:
//! textured blastomeres on a noisy background, a cell replaced by two smaller ones at each
//! division):
//! the activity curve peaks within one acquisition of every division and nowhere else, and the
//! proposed t2-t5 are within one acquisition interval of the true times.

use es_models::activity::{activity, peaks, propose, Grey, Point};

const SIDE: usize = 160;
const INTERVAL_MS: i64 = 10 * 60 * 1000;
const INSEMINATION_MS: i64 = 1_700_000_000_000;
/// The first acquisition, 20 h after insemination.
const FIRST_MS: i64 = INSEMINATION_MS + 20 * 3_600_000;

fn curve(frames: usize, divisions: &[usize]) -> Vec<Point> {
    let images: Vec<Vec<u8>> = (0..frames)
        .map(|i| es_models::synthetic::frame(SIDE, i, divisions))
        .collect();
    let grey = |i: usize| Grey {
        width: SIDE,
        height: SIDE,
        pixels: &images[i],
    };
    (1..frames)
        .map(|i| Point {
            acquired_at_ms: FIRST_MS + i as i64 * INTERVAL_MS,
            activity: activity(&grey(i - 1), &grey(i)).unwrap(),
        })
        .collect()
}

fn hours_at(frame: usize) -> f64 {
    (FIRST_MS + frame as i64 * INTERVAL_MS - INSEMINATION_MS) as f64 / 3_600_000.0
}

#[test]
fn peaks_fall_on_the_divisions_and_propose_t2_to_t5() {
    for divisions in [[40, 52, 55, 70], [12, 30, 33, 36], [60, 75, 90, 110]] {
        let curve = curve(130, &divisions);
        let found: Vec<usize> = peaks(&curve)
            .into_iter()
            .map(|i| {
                // Curve point i is the change into frame i + 1.
                i + 1
            })
            .collect();
        assert_eq!(
            found.len(),
            divisions.len(),
            "{divisions:?}: peaks at {found:?}"
        );
        for (got, want) in found.iter().zip(divisions) {
            assert!(
                got.abs_diff(want) <= 1,
                "{divisions:?}: peak at {got}, division at {want}"
            );
        }
        let proposed = propose(&curve, INSEMINATION_MS);
        let interval_h = INTERVAL_MS as f64 / 3_600_000.0;
        for (name, got, division) in [
            ("t2", proposed.t2, divisions[0]),
            ("t3", proposed.t3, divisions[1]),
            ("t4", proposed.t4, divisions[2]),
            ("t5", proposed.t5, divisions[3]),
        ] {
            let got = got.unwrap_or_else(|| panic!("{divisions:?}: no {name}"));
            let want = hours_at(division);
            assert!(
                (got - want).abs() <= interval_h + 1e-9,
                "{divisions:?}: {name} proposed at {got} h, divided at {want} h"
            );
        }
    }
}

#[test]
fn a_still_series_has_no_peaks_and_mismatched_frames_are_refused() {
    let curve = curve(60, &[]);
    assert!(peaks(&curve).is_empty(), "noise alone made peaks");
    assert_eq!(propose(&curve, INSEMINATION_MS).t2, None);
    let a = vec![0u8; 100];
    let b = vec![0u8; 99];
    let small = Grey {
        width: 10,
        height: 10,
        pixels: &a,
    };
    let short = Grey {
        width: 10,
        height: 10,
        pixels: &b,
    };
    assert!(activity(&small, &short).is_err());
    let other = Grey {
        width: 5,
        height: 20,
        pixels: &a,
    };
    assert!(activity(&small, &other).is_err());
    // Identical frames: no change; inverted: the most change.
    assert_eq!(activity(&small, &small).unwrap(), 0.0);
    let white = vec![255u8; 100];
    let inverted = Grey {
        width: 10,
        height: 10,
        pixels: &white,
    };
    assert_eq!(activity(&small, &inverted).unwrap(), 1.0);
}

#[test]
fn the_plot_draws_every_point_and_marks_each_proposal() {
    let divisions = [40, 52, 55, 70];
    let curve = curve(100, &divisions);
    let proposed = propose(&curve, INSEMINATION_MS);
    let svg = es_models::activity::svg(&curve, INSEMINATION_MS, &proposed, "Embryo <E1> & co");
    assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert!(svg.ends_with("</svg>"));
    assert!(
        svg.contains("Embryo &lt;E1&gt; &amp; co"),
        "the title is escaped"
    );
    assert!(!svg.contains("<E1>"));
    let polyline = svg.split("points=\"").nth(1).unwrap();
    let drawn = polyline.split('"').next().unwrap().split(' ').count();
    assert_eq!(drawn, curve.len(), "one vertex per point");
    for name in ["t2", "t3", "t4", "t5"] {
        assert!(svg.contains(&format!(">{name} ")), "{name} is marked");
    }
    // Every coordinate lies inside the image.
    for vertex in polyline.split('"').next().unwrap().split(' ') {
        let (x, y) = vertex.split_once(',').unwrap();
        let (x, y): (f64, f64) = (x.parse().unwrap(), y.parse().unwrap());
        assert!(
            (0.0..=720.0).contains(&x) && (0.0..=240.0).contains(&y),
            "{vertex}"
        );
    }
    // An empty curve is an empty plot, not a panic.
    let empty = es_models::activity::svg(&[], INSEMINATION_MS, &Default::default(), "");
    assert!(!empty.contains("polyline"));
}
