//! Activity curves in the store: points are appended after the curve's `through_ms` only (a
//! resend changes nothing), the cursor only moves forward, the per-embryo bound holds, an
//! unknown embryo is passed over, bad updates are refused, and verify checks the rows.

use es_storage::activity::{ActivityRecorded, CurveUpdate};
use es_storage::limits::ACTIVITY_POINTS_PER_EMBRYO_MAX;
use es_storage::*;

mod common;
use common::{open, setup, T0};

fn update(embryo_id: &str, points: &[(i64, f64)], through_ms: i64) -> CurveUpdate {
    CurveUpdate {
        embryo_id: embryo_id.into(),
        focal_plane: 0,
        points: points.to_vec(),
        frames_skipped: 0,
        through_ms,
    }
}

#[test]
fn curves_append_once_and_the_cursor_only_moves_forward() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let writer = store.start_writer(WriterOptions::default());
    setup(&writer);
    assert_eq!(store.read().unwrap().activity_cursor().unwrap(), 0);
    assert!(store
        .read()
        .unwrap()
        .activity_curve("EB1")
        .unwrap()
        .is_none());

    let first = writer
        .write(ActivityRecorded {
            curves: vec![
                update(
                    "EB1",
                    &[(T0 + 600_000, 0.01), (T0 + 1_200_000, 0.2)],
                    T0 + 1_200_000,
                ),
                update("NO-SUCH-EMBRYO", &[(T0, 0.5)], T0),
            ],
            cursor: 7,
        })
        .unwrap();
    assert_eq!((first.points, first.curves_created), (2, 1));

    // A resend of the same update (a crash before the computation saw the commit) and an
    // update overlapping the stored points append only what is new.
    let again = writer
        .write(ActivityRecorded {
            curves: vec![update(
                "EB1",
                &[(T0 + 1_200_000, 0.2), (T0 + 1_800_000, 0.03)],
                T0 + 1_800_000,
            )],
            cursor: 5,
        })
        .unwrap();
    assert_eq!((again.points, again.curves_created), (1, 0));
    let resent = writer
        .write(ActivityRecorded {
            curves: vec![update("EB1", &[(T0 + 1_800_000, 0.03)], T0 + 1_800_000)],
            cursor: 5,
        })
        .unwrap();
    assert_eq!(resent.points, 0);

    let reader = store.read().unwrap();
    let curve = reader.activity_curve("EB1").unwrap().unwrap();
    assert_eq!(
        curve.row.points,
        vec![
            (T0 + 600_000, 0.01),
            (T0 + 1_200_000, 0.2),
            (T0 + 1_800_000, 0.03)
        ]
    );
    assert_eq!(curve.row.through_ms, T0 + 1_800_000);
    assert_eq!(reader.activity_cursor().unwrap(), 7, "never moves back");
    assert_eq!(reader.activity_curve_count().unwrap(), 1);
    assert!(store.verify(&mut |_| {}).unwrap().is_clean());
}

#[test]
fn a_curve_holds_at_most_its_bound_and_bad_updates_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let writer = store.start_writer(WriterOptions::default());
    setup(&writer);
    let points: Vec<(i64, f64)> = (0..ACTIVITY_POINTS_PER_EMBRYO_MAX as i64)
        .map(|i| (T0 + i * 600_000, 0.01))
        .collect();
    let last = points.last().unwrap().0;
    writer
        .write(ActivityRecorded {
            curves: vec![update("EB2", &points, last)],
            cursor: 1,
        })
        .unwrap();
    let more = writer
        .write(ActivityRecorded {
            curves: vec![update("EB2", &[(last + 600_000, 0.5)], last + 600_000)],
            cursor: 2,
        })
        .unwrap();
    assert_eq!(more.points, 0, "a full curve takes no more points");
    let curve = store
        .read()
        .unwrap()
        .activity_curve("EB2")
        .unwrap()
        .unwrap();
    assert_eq!(curve.row.points.len(), ACTIVITY_POINTS_PER_EMBRYO_MAX);
    assert_eq!(curve.row.through_ms, last + 600_000, "but it moves on");

    for bad in [
        update("EB3", &[(T0, 1.5)], T0),
        update("EB3", &[(T0, f64::NAN)], T0),
        update("EB3", &[(T0 + 1, 0.1), (T0, 0.1)], T0 + 1),
        update("EB3", &[(T0, 0.1)], T0 - 1),
        update("", &[], T0),
    ] {
        let refused = writer.write(ActivityRecorded {
            curves: vec![bad.clone()],
            cursor: 3,
        });
        assert!(
            matches!(refused, Err(WriteError::InvalidInput(_))),
            "{bad:?} was not refused: {refused:?}"
        );
    }
    assert_eq!(store.read().unwrap().activity_cursor().unwrap(), 2);
    assert!(store
        .read()
        .unwrap()
        .activity_curve("EB3")
        .unwrap()
        .is_none());
    assert!(store.verify(&mut |_| {}).unwrap().is_clean());
}

#[test]
fn every_embryo_can_be_listed_for_a_scan() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let writer = store.start_writer(WriterOptions::default());
    setup(&writer);
    let reader = store.read().unwrap();
    let first = reader.embryo_ids_after(0, 3).unwrap();
    assert_eq!(first.len(), 3);
    let rest = reader.embryo_ids_after(first[2].0, 3).unwrap();
    let ids: Vec<String> = first.into_iter().chain(rest).map(|(_, id)| id).collect();
    assert_eq!(ids, ["EB1", "EB2", "EB3", "EB4"]);
}
