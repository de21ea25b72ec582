//! End-to-end tests of the store through its public API, each in its own temporary directory.
//! No test depends on wall-clock time: ordering is forced with channels ("gates").

use bytes::Bytes;
use crossbeam_channel::{bounded, Receiver, Sender};
use es_storage::*;
use std::path::Path;

const SEED: [u8; 16] = [0xab; 16];
const T0: i64 = 1_700_000_000_000;
const MINUTE_MS: i64 = 60_000;

fn open(dir: &Path) -> Store {
    Store::open(dir, &StoreOptions::default(), SEED).unwrap()
}

fn open_with_retention(dir: &Path, change_log_retention_ms: i64) -> Store {
    let options = StoreOptions {
        change_log_retention_ms,
        ..StoreOptions::default()
    };
    Store::open(dir, &options, SEED).unwrap()
}

/// Submits and waits for the completion.
fn write<O: Operation>(writer: &Writer, op: O) -> OpResult<O> {
    writer.write(op)
}

fn completion<O: Operation>() -> (Completion<O>, Receiver<OpResult<O>>) {
    let (sender, receiver) = bounded(1);
    let done: Completion<O> = Box::new(move |result| {
        sender.send(result).unwrap();
    });
    (done, receiver)
}

fn hello_op(
    serial: &str,
    presented: Option<&str>,
    new_secret: &str,
    at_ms: i64,
) -> InstrumentHello {
    InstrumentHello {
        number: 0,
        serial: serial.into(),
        model: "EmbryoScope+".into(),
        firmware: "7.9".into(),
        presented_secret: presented.map(Into::into),
        new_secret: new_secret.into(),
        issued_connection_open: false,
        enrolment: Default::default(),
        at_ms,
    }
}

/// A new instrument; returns its id.
fn hello(writer: &Writer, serial: &str) -> u64 {
    match write(
        writer,
        hello_op(serial, None, &format!("secret-{serial}"), T0),
    ) {
        Ok(InstrumentAccepted { instrument_id, .. }) => instrument_id,
        other => panic!("unexpected {other:?}"),
    }
}

fn dish(dish_id: &str, patient_id: &str, wells: &[(u32, &str)]) -> DishRegistration {
    DishRegistration {
        fertilization_method: String::new(),
        dish_id: dish_id.into(),
        slot: 3,
        patient: PatientRef {
            patient_idx: String::new(),
            patient_id: patient_id.into(),
            first_name: "Ada".into(),
            last_name: "Lovelace".into(),
            date_of_birth: "1985-12-10".into(),
        },
        treatment_name: "2022-1411".into(),
        insemination_at_ms: T0 - 3_600_000,
        wells: wells
            .iter()
            .map(|(well, embryo_id)| WellRegistration {
                label: String::new(),
                well: *well,
                embryo_id: (*embryo_id).into(),
            })
            .collect(),
    }
}

fn register(writer: &Writer, instrument_id: u64, dish: DishRegistration) -> DishRegistered {
    write(
        writer,
        RegisterDish {
            instrument_id,
            dish,
            at_ms: T0,
        },
    )
    .unwrap()
}

fn jpeg(tag: u32, bytes: usize) -> Bytes {
    let mut data = vec![0xffu8, 0xd8];
    data.extend((0..bytes).map(|i| (i as u32).wrapping_mul(31).wrapping_add(tag) as u8));
    data.extend([0xff, 0xd9]);
    Bytes::from(data)
}

fn image_op(
    instrument_id: u64,
    well: u32,
    plane: i32,
    acquired_at_ms: i64,
    jpeg: Bytes,
) -> PutImage {
    PutImage {
        instrument_id,
        dish_id: "D1".into(),
        well,
        focal_plane: plane,
        acquired_at_ms,
        jpeg: es_storage::ImageBytes::new(jpeg),
        at_ms: acquired_at_ms + 1000,
    }
}

/// An instrument with dish "D1" (wells 1..=3, embryos E1..E3) on a fresh writer.
fn setup(store: &Store) -> (Writer, u64) {
    let writer = store.start_writer(WriterOptions::default());
    let instrument_id = hello(&writer, "SN-1");
    let wells = [(1, "E1"), (2, "E2"), (3, "E3")];
    register(&writer, instrument_id, dish("D1", "MRN-1", &wells));
    (writer, instrument_id)
}

/// Holds the writer thread inside a completion until dropped, so that requests submitted
/// meanwhile queue up and form the next batch.
struct Gate {
    _release: Sender<()>,
}

fn block_writer(writer: &Writer) -> Gate {
    let (entered_tx, entered_rx) = bounded(1);
    let (release_tx, release_rx) = bounded::<()>(0);
    let op = ResetInstrumentSecret {
        serial: "gate".into(),
    };
    let done: Completion<ResetInstrumentSecret> = Box::new(move |_| {
        entered_tx.send(()).unwrap();
        let _ = release_rx.recv(); // Returns when the Gate is dropped.
    });
    writer.submit(op, done).unwrap();
    entered_rx.recv().unwrap();
    Gate {
        _release: release_tx,
    }
}

/// `op` is refused as invalid input.
fn assert_invalid<O: Operation>(writer: &Writer, op: O) {
    let text = format!("{op:?}");
    let error = write(writer, op).unwrap_err();
    assert_eq!(error.code(), "invalid_input", "{text}");
}

fn all_changes(store: &Store) -> Vec<Change> {
    store.read().unwrap().changes_after(0, 10_000).unwrap()
}

#[test]
fn group_commit_of_many_concurrent_submissions() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (writer, instrument_id) = setup(&store);
    let commits_before = writer.stats().commits;
    let gate = block_writer(&writer);
    let threads_count: u32 = 4;
    let per_thread: u32 = 50;
    let (results_tx, results_rx) = bounded(1000);
    std::thread::scope(|scope| {
        for thread in 0..threads_count {
            let writer = writer.clone();
            let results_tx = results_tx.clone();
            scope.spawn(move || {
                for i in 0..per_thread {
                    let tx = results_tx.clone();
                    let t = T0 + i64::from(i) * 10 * MINUTE_MS;
                    let op = image_op(
                        instrument_id,
                        thread % 3 + 1,
                        thread as i32,
                        t,
                        jpeg(i, 100),
                    );
                    let done = move |result| tx.send(result).unwrap();
                    writer.try_submit(op, done).unwrap();
                }
            });
        }
    });
    let total = (threads_count * per_thread) as usize;
    assert_eq!(writer.queue_len(), total);
    drop(gate);
    for _ in 0..total {
        let result = results_rx.recv().unwrap();
        assert_eq!(result, Ok(ImageStored { duplicate: false }));
    }
    let stats = writer.stats();
    // The gate's batch, then ONE batch holding every queued request.
    assert_eq!(stats.commits, commits_before + 2);
    assert_eq!(stats.last_batch_requests, total as u64);
    let reader = store.read().unwrap();
    assert_eq!(reader.stats().unwrap().images, total as u64);
    for thread in 0..threads_count {
        for i in 0..per_thread {
            let t = T0 + i64::from(i) * 10 * MINUTE_MS;
            let bytes = reader
                .image(instrument_id, "D1", thread % 3 + 1, thread as i32, t)
                .unwrap();
            assert_eq!(bytes, Some(jpeg(i, 100)));
        }
    }
    writer.shutdown();
}

#[test]
fn batch_limits_split_batches() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let writer = store.start_writer(WriterOptions {
        queue_requests_max: 64,
        batch_requests_max: 4,
        batch_bytes_max: 1 << 20,
    });
    let instrument_id = hello(&writer, "SN-1");
    register(&writer, instrument_id, dish("D1", "MRN-1", &[(1, "E1")]));
    let gate = block_writer(&writer);
    let mut receivers = Vec::new();
    for i in 0..10 {
        let (done, rx) = completion::<PutImage>();
        let op = image_op(instrument_id, 1, 0, T0 + i, jpeg(1, 10));
        writer.try_submit(op, done).unwrap();
        receivers.push(rx);
    }
    let commits_before = writer.stats().commits;
    drop(gate);
    for rx in receivers {
        assert!(rx.recv().unwrap().is_ok());
    }
    // 10 requests at most 4 per batch: 4 + 4 + 2 (the gate's own batch is counted before its
    // completion runs, so it is in `commits_before`).
    assert_eq!(writer.stats().commits, commits_before + 3);
    assert_eq!(writer.stats().last_batch_requests, 2);
    writer.shutdown();
}

#[test]
fn full_queue_hands_the_request_back() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let writer = store.start_writer(WriterOptions {
        queue_requests_max: 2,
        ..WriterOptions::default()
    });
    let gate = block_writer(&writer);
    for _ in 0..2 {
        let (done, _rx) = completion::<ResetInstrumentSecret>();
        let op = ResetInstrumentSecret { serial: "x".into() };
        writer.try_submit(op, done).unwrap();
    }
    let (done, _rx) = completion::<ResetInstrumentSecret>();
    let op = ResetInstrumentSecret {
        serial: "third".into(),
    };
    match writer.try_submit(op, done) {
        Err(SubmitError::Full(submission)) => {
            // Handed back whole: the operation is the one submitted.
            let text = format!("{submission:?}");
            assert!(text.contains("third"), "{text}");
        }
        other => panic!("expected Full, got {other:?}"),
    }
    drop(gate);
    writer.shutdown();
}

#[test]
fn batch_with_a_refused_op_commits_the_others_and_sees_earlier_ops() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (writer, instrument_id) = setup(&store);
    let gate = block_writer(&writer);
    let ops = [
        image_op(instrument_id, 1, 0, T0, jpeg(1, 50)),
        image_op(instrument_id, 1, 0, T0, jpeg(1, 50)), // duplicate of the first, same batch
        image_op(instrument_id, 1, 0, T0, jpeg(2, 50)), // conflict with the first, same batch
        image_op(instrument_id, 9, 0, T0, jpeg(3, 50)), // unknown well
        image_op(instrument_id, 2, 0, T0, jpeg(4, 50)),
    ];
    let receivers: Vec<_> = ops
        .into_iter()
        .map(|op| {
            let (done, rx) = completion::<PutImage>();
            writer.try_submit(op, done).unwrap();
            rx
        })
        .collect();
    drop(gate);
    let results: Vec<_> = receivers.iter().map(|rx| rx.recv().unwrap()).collect();
    assert_eq!(
        results,
        vec![
            Ok(ImageStored { duplicate: false }),
            Ok(ImageStored { duplicate: true }),
            Err(WriteError::Refused(ImageRefusal::Conflict)),
            Err(WriteError::Refused(ImageRefusal::UnknownWell)),
            Ok(ImageStored { duplicate: false }),
        ]
    );
    let reader = store.read().unwrap();
    assert_eq!(
        reader.image(instrument_id, "D1", 1, 0, T0).unwrap(),
        Some(jpeg(1, 50))
    );
    assert_eq!(
        reader.image(instrument_id, "D1", 2, 0, T0).unwrap(),
        Some(jpeg(4, 50))
    );
    assert_eq!(reader.stats().unwrap().images, 2);
    assert!(store.verify(&mut |_| {}).unwrap().is_clean());
    writer.shutdown();
}

#[test]
fn idempotent_re_put() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (writer, instrument_id) = setup(&store);
    let first = write(&writer, image_op(instrument_id, 1, 0, T0, jpeg(7, 300)));
    assert_eq!(first, Ok(ImageStored { duplicate: false }));
    let seq_after_first = store.read().unwrap().last_change_seq().unwrap();
    let second = write(&writer, image_op(instrument_id, 1, 0, T0, jpeg(7, 300)));
    assert_eq!(second, Ok(ImageStored { duplicate: true }));
    let reader = store.read().unwrap();
    let stats = reader.stats().unwrap();
    assert_eq!(stats.images, 1);
    assert_eq!(stats.image_bytes, jpeg(7, 300).len() as u64);
    assert_eq!(stats.acquisitions, 1);
    assert_eq!(reader.last_change_seq().unwrap(), seq_after_first);
    writer.shutdown();
}

/// Each instrument's images are counted per UTC day as they are stored: a resend stored once
/// counts once, a refused one not at all; the dashboard reads the latest time, today's
/// count and the days before.
#[test]
fn images_are_counted_per_instrument_and_day() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (writer, instrument_id) = setup(&store);
    let other = hello(&writer, "SN-2");
    const DAY_MS: i64 = 86_400_000;
    // T0 is 2023-11-14 22:13 UTC: two images that day, three the next.
    let day0 = es_storage::tables::day_of(T0);
    for (n, at) in [
        T0,
        T0 + 60_000,
        T0 + DAY_MS,
        T0 + DAY_MS + 1,
        T0 + DAY_MS + 2,
    ]
    .into_iter()
    .enumerate()
    {
        write(
            &writer,
            image_op(instrument_id, 1, n as i32, at, jpeg(n as u32, 100)),
        )
        .unwrap();
    }
    // A resend is a duplicate; a conflicting one is refused: neither counts.
    let resend = write(&writer, image_op(instrument_id, 1, 0, T0, jpeg(0, 100))).unwrap();
    assert!(resend.duplicate);
    let conflict = write(&writer, image_op(instrument_id, 1, 0, T0, jpeg(9, 100)));
    assert!(conflict.is_err());
    let activity = store.read().unwrap().activity(day0 + 1, 7).unwrap();
    assert_eq!(activity.len(), 2);
    let mine = &activity[0];
    assert_eq!(mine.instrument_id, instrument_id);
    assert_eq!(mine.images_today, 3);
    assert_eq!(
        mine.image_bytes_today,
        3 * 104,
        "JPEG bytes: 100 and the markers"
    );
    // `image_op` stores each image a second after its acquisition.
    assert_eq!(mine.last_image_ms, T0 + DAY_MS + 2 + 1000);
    assert_eq!(
        mine.days_before,
        vec![(2, 208)],
        "only days it delivered on, from the first"
    );
    // Another instrument that sent nothing.
    assert_eq!(activity[1].instrument_id, other);
    assert_eq!(
        (activity[1].images_today, activity[1].last_image_ms),
        (0, 0)
    );
    assert!(activity[1].days_before.is_empty());
    // A day later nothing arrived: today is 0, the two days before are counted.
    let later = store.read().unwrap().activity(day0 + 2, 7).unwrap();
    assert_eq!(later[0].images_today, 0);
    assert_eq!(later[0].days_before, vec![(2, 208), (3, 312)]);
    assert_eq!(later[0].last_image_ms, T0 + DAY_MS + 2 + 1000);
    writer.shutdown();
}

#[test]
fn conflict_keeps_the_original_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (writer, instrument_id) = setup(&store);
    write(&writer, image_op(instrument_id, 1, 2, T0, jpeg(1, 300))).unwrap();
    let conflict = write(&writer, image_op(instrument_id, 1, 2, T0, jpeg(2, 300)));
    assert_eq!(conflict, Err(WriteError::Refused(ImageRefusal::Conflict)));
    assert_eq!(conflict.unwrap_err().code(), "image_conflict");
    let reader = store.read().unwrap();
    assert_eq!(
        reader.image(instrument_id, "D1", 1, 2, T0).unwrap(),
        Some(jpeg(1, 300))
    );
    assert_eq!(reader.stats().unwrap().images, 1);
    writer.shutdown();
}

#[test]
fn unknown_dish_well_and_instrument_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (writer, instrument_id) = setup(&store);
    let before = store.read().unwrap().stats().unwrap();
    let mut op = image_op(instrument_id, 1, 0, T0, jpeg(1, 10));
    op.dish_id = "NO-SUCH-DISH".into();
    let unknown_dish = write(&writer, op).unwrap_err();
    assert_eq!(unknown_dish, WriteError::Refused(ImageRefusal::UnknownDish));
    assert_eq!(unknown_dish.code(), "unknown_dish");
    let unknown_well = write(&writer, image_op(instrument_id, 4, 0, T0, jpeg(1, 10)));
    assert_eq!(
        unknown_well,
        Err(WriteError::Refused(ImageRefusal::UnknownWell))
    );
    let unknown_instrument = write(&writer, image_op(999, 1, 0, T0, jpeg(1, 10)));
    assert_eq!(
        unknown_instrument,
        Err(WriteError::Refused(ImageRefusal::UnknownInstrument))
    );
    let register_unknown = write(
        &writer,
        RegisterDish {
            instrument_id: 999,
            dish: dish("D9", "MRN-9", &[(1, "E9")]),
            at_ms: T0,
        },
    );
    assert_eq!(
        register_unknown,
        Err(WriteError::Refused(UnknownInstrument))
    );
    let empty = write(&writer, image_op(instrument_id, 1, 0, T0, Bytes::new()));
    assert_eq!(empty.unwrap_err().code(), "invalid_input");
    let reader = store.read().unwrap();
    assert_eq!(reader.stats().unwrap(), before);
    assert_eq!(
        reader.sync_state(instrument_id, "NO-SUCH-DISH").unwrap(),
        None
    );
    writer.shutdown();
}

#[test]
fn instrument_secret_issue_accept_refuse_reset() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let writer = store.start_writer(WriterOptions::default());
    let InstrumentAccepted {
        instrument_id,
        issued_secret,
    } = write(&writer, hello_op("SN-7", None, "s-one", T0)).unwrap();
    assert_eq!(issued_secret.as_deref(), Some("s-one"));

    // The HELLO_OK carrying s-one was lost: the instrument says HELLO without a secret again
    // and is issued a fresh one rather than being locked out.
    let lost = write(&writer, hello_op("SN-7", None, "s-fresh", T0 + 1));
    assert_eq!(
        lost,
        Ok(InstrumentAccepted {
            instrument_id,
            issued_secret: Some("s-fresh".into())
        })
    );
    // Presenting the older, superseded issue is refused; the fresh one confirms.
    let stale = write(&writer, hello_op("SN-7", Some("s-one"), "s-x", T0 + 2));
    assert_eq!(stale, Err(WriteError::Refused(HelloRefusal::AuthFailed)));
    let confirmed = write(
        &writer,
        hello_op("SN-7", Some("s-fresh"), "s-unused", T0 + 3),
    );
    assert_eq!(
        confirmed,
        Ok(InstrumentAccepted {
            instrument_id,
            issued_secret: None
        })
    );
    let accepted = write(
        &writer,
        hello_op("SN-7", Some("s-fresh"), "s-unused", T0 + 5),
    );
    assert_eq!(
        accepted,
        Ok(InstrumentAccepted {
            instrument_id,
            issued_secret: None
        })
    );
    let wrong = write(&writer, hello_op("SN-7", Some("s-wrong"), "s-x", T0 + 6));
    assert_eq!(wrong, Err(WriteError::Refused(HelloRefusal::AuthFailed)));
    let missing = write(&writer, hello_op("SN-7", None, "s-x", T0 + 7));
    assert_eq!(missing.unwrap_err().code(), "auth_failed");
    // A refused HELLO changes nothing.
    let record = store
        .read()
        .unwrap()
        .instrument_by_serial("SN-7")
        .unwrap()
        .unwrap();
    assert_eq!(record.last_seen_ms, T0 + 5);
    assert_eq!(record.first_seen_ms, T0);
    assert_eq!(record.instrument_id, instrument_id);
    assert_eq!(record.number, 1);

    let reset = write(
        &writer,
        ResetInstrumentSecret {
            serial: "SN-7".into(),
        },
    );
    assert_eq!(reset, Ok(SecretReset { existed: true }));
    let reset_unknown = write(
        &writer,
        ResetInstrumentSecret {
            serial: "SN-0".into(),
        },
    );
    assert_eq!(reset_unknown, Ok(SecretReset { existed: false }));
    let reissued = write(&writer, hello_op("SN-7", Some("s-one"), "s-two", T0 + 8));
    assert_eq!(
        reissued,
        Ok(InstrumentAccepted {
            instrument_id,
            issued_secret: Some("s-two".into())
        })
    );
    let new_secret = write(&writer, hello_op("SN-7", Some("s-two"), "s-x", T0 + 9));
    assert!(matches!(
        new_secret,
        Ok(InstrumentAccepted {
            issued_secret: None,
            ..
        })
    ));
    // Once s-two is confirmed, the secret that led to it no longer opens the door.
    let old_secret = write(&writer, hello_op("SN-7", Some("s-one"), "s-x", T0 + 10));
    assert_eq!(
        old_secret,
        Err(WriteError::Refused(HelloRefusal::AuthFailed))
    );
    let instruments = store.read().unwrap().instruments().unwrap();
    assert_eq!(instruments.len(), 1);
    assert_eq!(instruments[0].serial, "SN-7");
    writer.shutdown();
}

#[test]
fn approve_enrolment_refuses_unknown_serials_until_an_administrator_approves_them() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let writer = store.start_writer(WriterOptions::default());
    // A known instrument keeps connecting when the server switches to approval.
    let known = hello(&writer, "SN-KNOWN");
    let approve = |mut op: InstrumentHello| {
        op.enrolment = Enrolment::Approve;
        op
    };
    let again = write(
        &writer,
        approve(hello_op("SN-KNOWN", Some("secret-SN-KNOWN"), "s-x", T0 + 1)),
    );
    assert_eq!(
        again,
        Ok(InstrumentAccepted {
            instrument_id: known,
            issued_secret: None
        })
    );
    // A new serial number is refused, whatever secret it presents, and nothing is stored.
    let changes_before = store.read().unwrap().last_change_seq().unwrap();
    for presented in [None, Some("guess")] {
        let refused = write(
            &writer,
            approve(hello_op("SN-NEW", presented, "s-new", T0 + 2)),
        );
        assert_eq!(
            refused,
            Err(WriteError::Refused(HelloRefusal::EnrolmentPending))
        );
        assert_eq!(refused.unwrap_err().code(), "enrolment_pending");
    }
    let reader = store.read().unwrap();
    assert_eq!(reader.instruments().unwrap().len(), 1);
    assert_eq!(reader.last_change_seq().unwrap(), changes_before);
    drop(reader);

    let actor = Actor {
        user: "web:admin".into(),
        computer: "web 127.0.0.1".into(),
    };
    let approve_op = |serial: &str| InstrumentApprove {
        actor: actor.clone(),
        serial: serial.into(),
        model: "EmbryoScope+".into(),
        at_ms: T0 + 3,
    };
    write(&writer, approve_op("SN-NEW")).unwrap();
    let twice = write(&writer, approve_op("SN-NEW"));
    assert_eq!(twice.unwrap_err().code(), "already_exists");
    let audit_seq = store.read().unwrap().last_audit_seq().unwrap();
    let audit = store
        .read()
        .unwrap()
        .audit_after(audit_seq - 1, 10)
        .unwrap();
    assert_eq!(audit.len(), 1);
    assert_eq!(audit[0].action, "instrument.approve");
    assert_eq!(audit[0].user, "web:admin");
    assert_eq!(audit[0].target, "SN-NEW");

    // Its first HELLO is issued a secret, like a first connection; then it is an
    // instrument like any other.
    let first = write(
        &writer,
        approve(hello_op("SN-NEW", None, "s-issued", T0 + 4)),
    )
    .unwrap();
    assert_eq!(first.issued_secret.as_deref(), Some("s-issued"));
    let confirmed = write(
        &writer,
        approve(hello_op("SN-NEW", Some("s-issued"), "s-y", T0 + 5)),
    )
    .unwrap();
    assert_eq!(confirmed.issued_secret, None);
    assert_eq!(confirmed.instrument_id, first.instrument_id);
    let record = store
        .read()
        .unwrap()
        .instrument_by_serial("SN-NEW")
        .unwrap()
        .unwrap();
    assert_eq!((record.number, record.model.as_str()), (2, "EmbryoScope+"));
    writer.shutdown();
}

#[test]
fn sync_state_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (writer, instrument_id) = setup(&store);
    let t1 = T0;
    let t2 = T0 + 10 * MINUTE_MS;
    for (well, plane, t) in [(1, 3, t1), (1, -2, t1), (1, 0, t1), (1, 0, t2), (3, 5, t2)] {
        write(
            &writer,
            image_op(instrument_id, well, plane, t, jpeg(well, 20)),
        )
        .unwrap();
    }
    let state = store
        .read()
        .unwrap()
        .sync_state(instrument_id, "D1")
        .unwrap();
    let expected = DishSyncState {
        dish_id: "D1".into(),
        wells: vec![
            WellSync {
                well: 1,
                embryo_id: "E1".into(),
                acquisitions: vec![
                    AcquisitionSync {
                        acquired_at_ms: t1,
                        focal_planes: vec![-2, 0, 3],
                    },
                    AcquisitionSync {
                        acquired_at_ms: t2,
                        focal_planes: vec![0],
                    },
                ],
            },
            WellSync {
                well: 2,
                embryo_id: "E2".into(),
                acquisitions: vec![],
            },
            WellSync {
                well: 3,
                embryo_id: "E3".into(),
                acquisitions: vec![AcquisitionSync {
                    acquired_at_ms: t2,
                    focal_planes: vec![5],
                }],
            },
        ],
    };
    assert_eq!(state, Some(expected));
    assert_eq!(
        store
            .read()
            .unwrap()
            .sync_state(instrument_id + 1, "D1")
            .unwrap(),
        None
    );
    writer.shutdown();
}

#[test]
fn change_log_is_gapless_with_one_change_per_acquisition() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (writer, instrument_id) = setup(&store);
    let setup_changes = all_changes(&store);
    // HELLO (instrument) + patient + treatment + dish + 3 embryos.
    let entities: Vec<_> = setup_changes.iter().map(|c| c.entity).collect();
    assert_eq!(
        entities,
        vec![
            ChangeEntity::Instrument,
            ChangeEntity::Patient,
            ChangeEntity::Treatment,
            ChangeEntity::Dish,
            ChangeEntity::Embryo,
            ChangeEntity::Embryo,
            ChangeEntity::Embryo,
        ]
    );
    // 11 focal planes of one acquisition, in one batch, plus 11 of a second one, one at a time.
    let gate = block_writer(&writer);
    let receivers: Vec<_> = (-5..=5)
        .map(|plane| {
            let (done, rx) = completion::<PutImage>();
            writer
                .try_submit(image_op(instrument_id, 2, plane, T0, jpeg(2, 40)), done)
                .unwrap();
            rx
        })
        .collect();
    drop(gate);
    for rx in receivers {
        rx.recv().unwrap().unwrap();
    }
    for plane in -5..=5 {
        write(
            &writer,
            image_op(instrument_id, 2, plane, T0 + 10 * MINUTE_MS, jpeg(3, 40)),
        )
        .unwrap();
    }
    let changes = all_changes(&store);
    assert_eq!(changes.len(), setup_changes.len() + 2);
    for (index, change) in changes.iter().enumerate() {
        assert_eq!(change.seq, index as u64 + 1, "gapless from 1");
    }
    let acquisitions: Vec<_> = changes[setup_changes.len()..].to_vec();
    assert!(acquisitions
        .iter()
        .all(|c| c.entity == ChangeEntity::Acquisition));
    assert_eq!(
        acquisitions[0].key, acquisitions[1].key,
        "both about embryo E2"
    );
    assert!(
        acquisitions[0].summary.contains("E2"),
        "{}",
        acquisitions[0].summary
    );
    let reader = store.read().unwrap();
    assert_eq!(reader.last_change_seq().unwrap(), changes.len() as u64);
    let page = reader.changes_after(3, 2).unwrap();
    assert_eq!(page.iter().map(|c| c.seq).collect::<Vec<_>>(), vec![4, 5]);
    assert!(reader
        .changes_after(changes.len() as u64, 10)
        .unwrap()
        .is_empty());
    let stats = reader.stats().unwrap();
    assert_eq!(stats.acquisitions, 2);
    assert_eq!(stats.images, 22);
    assert_eq!(stats.changes, changes.len() as u64);
    writer.shutdown();
}

#[test]
fn retention_prunes_old_changes_and_expires_old_cursors() {
    let dir = tempfile::tempdir().unwrap();
    let retention_ms = 60 * MINUTE_MS;
    let store = open_with_retention(dir.path(), retention_ms);
    let (writer, instrument_id) = setup(&store); // 7 changes at T0
    let reader = store.read().unwrap();
    assert_eq!(
        reader.changes_after(0, 100).unwrap().len(),
        7,
        "cursor 0 is fine before pruning"
    );
    drop(reader);
    // Within retention: nothing is pruned.
    let inside = T0 + retention_ms - 1000;
    write(
        &writer,
        image_op(instrument_id, 1, 0, inside - 1000, jpeg(1, 10)),
    )
    .unwrap();
    assert_eq!(all_changes(&store).len(), 8);
    // Two hours later the 7 setup changes expire; the acquisition change at `inside` stays.
    let later = T0 + 2 * retention_ms - 10_000;
    write(
        &writer,
        image_op(instrument_id, 1, 0, later - 1000, jpeg(1, 10)),
    )
    .unwrap();
    let reader = store.read().unwrap();
    let expired = reader.changes_after(0, 100).unwrap_err();
    assert!(
        matches!(expired, StorageError::CursorExpired { oldest: 8 }),
        "{expired}"
    );
    assert_eq!(expired.code(), "cursor_expired");
    assert!(matches!(
        reader.changes_after(6, 100),
        Err(StorageError::CursorExpired { oldest: 8 })
    ));
    let retained: Vec<_> = reader
        .changes_after(7, 100)
        .unwrap()
        .iter()
        .map(|c| c.seq)
        .collect();
    assert_eq!(retained, vec![8, 9]);
    assert!(
        reader.changes_after(9, 100).unwrap().is_empty(),
        "up to date"
    );
    // A cursor ahead of the log (another database, a restored backup) must resynchronise.
    for ahead in [10, u64::MAX - 1, u64::MAX] {
        assert!(matches!(
            reader.changes_after(ahead, 100),
            Err(StorageError::CursorExpired { oldest: 8 })
        ));
    }
    assert_eq!(reader.last_change_seq().unwrap(), 9);
    assert_eq!(reader.stats().unwrap().changes, 2);
    assert!(store.verify(&mut |_| {}).unwrap().is_clean());
    writer.shutdown();
}

#[test]
fn newer_schema_is_refused_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    drop(open(dir.path()));
    set_schema_version_for_tests(dir.path(), Store::SCHEMA_VERSION + 1).unwrap();
    let error = Store::open(dir.path(), &StoreOptions::default(), SEED).unwrap_err();
    let (found, supported) = (Store::SCHEMA_VERSION + 1, Store::SCHEMA_VERSION);
    assert!(matches!(
        error,
        StorageError::SchemaTooNew { found: f, supported: s } if f == found && s == supported
    ));
    assert_eq!(error.code(), "schema_too_new");
    assert_eq!(
        error.to_string(),
        format!(
            "database schema version {found} is newer than this esserver supports ({supported}); upgrade esserver"
        )
    );
    // The refusal did not touch the file: the current version still opens after a downgrade.
    set_schema_version_for_tests(dir.path(), Store::SCHEMA_VERSION).unwrap();
    assert!(Store::open(dir.path(), &StoreOptions::default(), SEED).is_ok());
}

#[test]
fn reopen_after_drop_keeps_everything() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert_eq!(store.server_id(), "ab".repeat(16));
    assert_eq!(store.path(), dir.path().join("esserver.redb"));
    let (writer, instrument_id) = setup(&store);
    write(&writer, image_op(instrument_id, 3, 1, T0, jpeg(9, 500))).unwrap();
    let telemetry = || PutTelemetry {
        instrument_id,
        samples: vec![
            TelemetrySample {
                channel: "temperature_c".into(),
                value: 37.1,
                at_ms: T0,
            },
            TelemetrySample {
                channel: "co2_percent".into(),
                value: 6.0,
                at_ms: T0,
            },
        ],
        alarms: vec![],
        ims: None,
        at_ms: T0,
    };
    let stored = |duplicate| TelemetryStored {
        samples: 2,
        duplicate,
        ims_queued: 0,
        ims_withheld: 0,
        ims_dropped: 0,
    };
    assert_eq!(write(&writer, telemetry()), Ok(stored(false)));
    // A resend (a lost ACK) stores nothing new, and says it was a duplicate.
    assert_eq!(write(&writer, telemetry()), Ok(stored(true)));
    let stats_before = store.read().unwrap().stats().unwrap();
    assert_eq!(stats_before.telemetry_samples, 2);
    let changes_before = all_changes(&store);
    writer.shutdown();
    drop(writer);
    drop(store);

    let store = Store::open(dir.path(), &StoreOptions::default(), [0x11; 16]).unwrap();
    assert_eq!(
        store.server_id(),
        "ab".repeat(16),
        "the server id is kept, not re-seeded"
    );
    let reader = store.read().unwrap();
    assert_eq!(reader.stats().unwrap(), stats_before);
    assert_eq!(stats_before.telemetry_samples, 2);
    assert_eq!(stats_before.images, 1);
    assert_eq!(all_changes(&store), changes_before);
    assert_eq!(
        reader.image(instrument_id, "D1", 3, 1, T0).unwrap(),
        Some(jpeg(9, 500))
    );
    assert_eq!(
        reader
            .instrument_by_serial("SN-1")
            .unwrap()
            .unwrap()
            .instrument_id,
        instrument_id
    );
    // A new writer continues the sequences.
    let writer = store.start_writer(WriterOptions::default());
    assert_eq!(hello(&writer, "SN-2"), instrument_id + 1);
    assert_eq!(
        store.read().unwrap().last_change_seq().unwrap(),
        changes_before.len() as u64 + 1
    );
    writer.shutdown();
}

#[test]
fn verify_detects_a_damaged_image() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (writer, instrument_id) = setup(&store);
    let count = 2500u32;
    let gate = block_writer(&writer);
    let receivers: Vec<_> = (0..count)
        .map(|i| {
            let (done, rx) = completion::<PutImage>();
            let op = image_op(instrument_id, i % 3 + 1, 0, T0 + i64::from(i), jpeg(i, 30));
            writer.try_submit(op, done).unwrap();
            rx
        })
        .collect();
    drop(gate);
    for rx in receivers {
        rx.recv().unwrap().unwrap();
    }
    writer.shutdown();
    let mut calls = Vec::new();
    let clean = store.verify(&mut |p| calls.push(p)).unwrap();
    assert!(clean.is_clean(), "{clean:?}");
    assert_eq!(clean.images_checked, u64::from(count));
    assert_eq!(
        calls.iter().map(|p| p.images_checked).collect::<Vec<_>>(),
        vec![1000, 2000, 2500]
    );
    assert!(calls.iter().all(|p| p.images_total == u64::from(count)));

    let damaged_t = T0 + 4; // i = 4 -> well 2
    assert!(store
        .corrupt_image_for_tests(instrument_id, "D1", 2, 0, damaged_t)
        .unwrap());
    assert!(!store
        .corrupt_image_for_tests(instrument_id, "D1", 2, 0, T0 - 1)
        .unwrap());
    let report = store.verify(&mut |_| {}).unwrap();
    assert!(!report.is_clean());
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.damaged_images.len(), 1);
    let key = &report.damaged_images[0];
    assert!(key.contains("\"D1\"") && key.contains("well 2"), "{key}");
    assert!(key.contains(&damaged_t.to_string()), "{key}");
    let read = store
        .read()
        .unwrap()
        .image(instrument_id, "D1", 2, 0, damaged_t);
    match read {
        Err(StorageError::ImageDamaged { key: read_key }) => assert_eq!(&read_key, key),
        other => panic!("expected ImageDamaged, got {other:?}"),
    }
    // Its neighbours still read fine.
    let neighbour = store
        .read()
        .unwrap()
        .image(instrument_id, "D1", 3, 0, T0 + 5)
        .unwrap();
    assert_eq!(neighbour, Some(jpeg(5, 30)));

    // Other bytes under the damaged key are still a conflict; the original repairs it.
    let writer = store.start_writer(WriterOptions::default());
    let other = write(
        &writer,
        image_op(instrument_id, 2, 0, damaged_t, jpeg(999, 30)),
    );
    assert_eq!(other, Err(WriteError::Refused(ImageRefusal::Conflict)));
    let repaired = write(
        &writer,
        image_op(instrument_id, 2, 0, damaged_t, jpeg(4, 30)),
    );
    assert_eq!(repaired, Ok(ImageStored { duplicate: false }));
    writer.shutdown();
    let read = store
        .read()
        .unwrap()
        .image(instrument_id, "D1", 2, 0, damaged_t)
        .unwrap();
    assert_eq!(read, Some(jpeg(4, 30)));
    let report = store.verify(&mut |_| {}).unwrap();
    assert!(report.is_clean(), "after the repair: {report:?}");
    assert_eq!(
        store.read().unwrap().stats().unwrap().images,
        u64::from(count)
    );
}

#[test]
fn verify_finds_images_and_wells_without_a_dish_and_a_gap_in_the_change_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (writer, instrument_id) = setup(&store);
    for i in 0..3u32 {
        let op = image_op(instrument_id, i + 1, 0, T0 + i64::from(i), jpeg(i, 30));
        write(&writer, op).unwrap();
    }
    writer.shutdown();
    let report = store.verify(&mut |_| {}).unwrap();
    assert!(report.is_clean(), "{report:?}");
    let dish_key = store
        .read()
        .unwrap()
        .embryo("E1")
        .unwrap()
        .unwrap()
        .dish_key;
    let changes = store.read().unwrap().changes_after(0, 100).unwrap();
    assert!(changes.len() >= 3, "{changes:?}");
    drop(store);

    // Take the dish row and one change from the middle of the log, behind the store's back.
    let db = redb::Database::open(dir.path().join(DATABASE_FILE_NAME)).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut dishes = txn.open_table(tables::DISHES).unwrap();
        assert!(dishes.remove(dish_key).unwrap().is_some());
        let mut log = txn.open_table(tables::CHANGES).unwrap();
        assert!(log.remove(changes[1].seq).unwrap().is_some());
    }
    txn.commit().unwrap();
    drop(db);

    let store = open(dir.path());
    let report = store.verify(&mut |_| {}).unwrap();
    let has = |text: &str| report.problems.iter().any(|p| p.contains(text));
    assert!(has("has no dish"), "{:?}", report.problems);
    assert!(
        has(&format!("well 1 of dish {dish_key} has no dish")),
        "{:?}",
        report.problems
    );
    let images_without_dish = report
        .problems
        .iter()
        .filter(|p| p.starts_with("image ") && p.ends_with("has no dish"))
        .count();
    assert_eq!(images_without_dish, 3, "{:?}", report.problems);
    let gap = format!(
        "change log gap: expected seq {}, found {}",
        changes[1].seq, changes[2].seq
    );
    assert!(has(&gap), "{:?}", report.problems);
    assert!(report.damaged_images.is_empty());
}

#[test]
fn shutdown_completes_queued_requests() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (writer, instrument_id) = setup(&store);
    let gate = block_writer(&writer);
    let receivers: Vec<_> = (0..100)
        .map(|i| {
            let (done, rx) = completion::<PutImage>();
            let op = image_op(instrument_id, 1, 0, T0 + i, jpeg(1, 10));
            writer.try_submit(op, done).unwrap();
            rx
        })
        .collect();
    let mut probes = Vec::new();
    std::thread::scope(|scope| {
        let stopper = writer.clone();
        let shutting = scope.spawn(move || stopper.shutdown());
        // Probe until shutdown has closed the queue (no clock: spin on the observable state).
        // Probes taken before that are queued requests like the others and must complete.
        loop {
            let (done, rx) = completion::<ResetInstrumentSecret>();
            let probe = ResetInstrumentSecret {
                serial: "probe".into(),
            };
            match writer.try_submit(probe, done) {
                Err(SubmitError::Closed(..)) => break,
                Err(SubmitError::Full(..)) => {} // Handed back, never completed: retry.
                Ok(()) => probes.push(rx),
            }
            std::thread::yield_now();
        }
        drop(gate);
        shutting.join().unwrap();
    });
    for rx in receivers {
        assert_eq!(rx.recv().unwrap(), Ok(ImageStored { duplicate: false }));
    }
    for rx in probes {
        assert_eq!(rx.recv().unwrap(), Ok(SecretReset { existed: false }));
    }
    assert_eq!(store.read().unwrap().stats().unwrap().images, 100);
    let (done, _rx) = completion::<ResetInstrumentSecret>();
    let late = writer.submit(ResetInstrumentSecret { serial: "x".into() }, done);
    assert_eq!(late.unwrap_err().code(), "shutting_down");
    // Shutdown is idempotent, and the store accepts a new writer afterwards.
    writer.shutdown();
    let writer = store.start_writer(WriterOptions::default());
    assert_eq!(
        write(
            &writer,
            ResetInstrumentSecret {
                serial: "SN-1".into()
            }
        ),
        Ok(SecretReset { existed: true })
    );
    writer.shutdown();
}

#[test]
fn register_dish_rules() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (writer, instrument_id) = setup(&store);
    let changes_before = all_changes(&store).len();

    // Identical re-registration: idempotent, no changes.
    let again = register(
        &writer,
        instrument_id,
        dish("D1", "MRN-1", &[(1, "E1"), (2, "E2")]),
    );
    assert_eq!(
        again,
        DishRegistered {
            dish_key: 1,
            created: false,
            changed: false
        }
    );
    assert_eq!(all_changes(&store).len(), changes_before);

    // The insemination time is t0 of every embryo: it cannot change.
    let mut moved_t0 = dish("D1", "MRN-1", &[(1, "E1"), (2, "E2")]);
    moved_t0.insemination_at_ms += 3_600_000;
    let refused = write(
        &writer,
        RegisterDish {
            instrument_id,
            dish: moved_t0,
            at_ms: T0,
        },
    );
    assert!(
        matches!(refused, Err(WriteError::InvalidInput(ref m)) if m.contains("insemination")),
        "{refused:?}"
    );

    // Changing a well's embryo id is refused and writes nothing.
    let changed = write(
        &writer,
        RegisterDish {
            instrument_id,
            dish: dish("D1", "MRN-1", &[(4, "E4"), (1, "E1-other")]),
            at_ms: T0,
        },
    );
    assert_eq!(changed.unwrap_err().code(), "invalid_input");
    // An embryo id used in another well is refused.
    let reused = write(
        &writer,
        RegisterDish {
            instrument_id,
            dish: dish("D2", "MRN-1", &[(1, "E1")]),
            at_ms: T0,
        },
    );
    assert!(matches!(reused, Err(WriteError::InvalidInput(_))));
    // A dish cannot move to another patient.
    let moved = write(
        &writer,
        RegisterDish {
            instrument_id,
            dish: dish("D1", "MRN-2", &[]),
            at_ms: T0,
        },
    );
    assert!(matches!(moved, Err(WriteError::InvalidInput(_))));
    let after_refusals = store.read().unwrap().stats().unwrap();
    assert_eq!(after_refusals.dishes, 1);
    assert_eq!(after_refusals.embryos, 3);
    assert_eq!(after_refusals.patients, 1);
    assert_eq!(all_changes(&store).len(), changes_before);

    // Adding a well and registering a second dish of another patient.
    let added = register(&writer, instrument_id, dish("D1", "MRN-1", &[(4, "E4")]));
    assert_eq!(
        added,
        DishRegistered {
            dish_key: 1,
            created: false,
            changed: true
        }
    );
    let mut other = dish("D2", "MRN-0", &[(1, "F1")]);
    other.patient.first_name = String::new();
    other.patient.date_of_birth = String::new();
    other.treatment_name = "2023-0001".into();
    let created = register(&writer, instrument_id, other);
    assert_eq!(
        created,
        DishRegistered {
            dish_key: 2,
            created: true,
            changed: true
        }
    );
    // Details that differ from the stored ones are kept as stored (and recorded for an
    // embryologist); empty fields keep the stored value.
    let mut update = dish("D3", "MRN-1", &[]);
    update.patient.last_name = "Byron".into();
    update.patient.first_name = String::new();
    update.treatment_name = "2024-0002".into();
    register(&writer, instrument_id, update);

    let reader = store.read().unwrap();
    let all = reader.list_patients(None, 10).unwrap();
    assert_eq!(
        all.iter()
            .map(|p| p.patient_id.as_str())
            .collect::<Vec<_>>(),
        vec!["MRN-0", "MRN-1"]
    );
    assert_eq!(all[1].first_name, "Ada");
    assert_eq!(all[1].last_name, "Lovelace");
    assert_eq!(all[1].date_of_birth, "1985-12-10");
    let differs = reader.patient("MRN-1").unwrap().unwrap().details_differ;
    assert_eq!(
        differs.map(|d| (d.dish_id, d.last_name, d.times)),
        Some(("D3".to_string(), "Byron".to_string(), 1))
    );
    assert_eq!(all[1].treatments, vec!["2022-1411", "2024-0002"]);
    assert_eq!(all[0].treatments, vec!["2023-0001"]);
    assert_eq!(all[0].first_name, "");
    let page = reader.list_patients(Some("MRN-0"), 10).unwrap();
    assert_eq!(page.len(), 1);
    assert_eq!(page[0].patient_id, "MRN-1");
    assert_eq!(reader.list_patients(None, 1).unwrap().len(), 1);
    let stats = reader.stats().unwrap();
    assert_eq!(
        (
            stats.patients,
            stats.treatments,
            stats.dishes,
            stats.embryos
        ),
        (2, 3, 3, 5)
    );
    assert!(store.verify(&mut |_| {}).unwrap().is_clean());
    writer.shutdown();
}

#[test]
fn input_bounds_are_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (writer, instrument_id) = setup(&store);
    let long = "x".repeat(129);
    let before = store.read().unwrap().stats().unwrap();
    assert_invalid(&writer, hello_op(&long, None, "s", T0));
    assert_invalid(&writer, hello_op("", None, "s", T0));
    assert_invalid(&writer, image_op(instrument_id, 1, 1001, T0, jpeg(1, 10)));
    assert_invalid(&writer, image_op(instrument_id, 0, 0, T0, jpeg(1, 10)));
    assert_invalid(
        &writer,
        RegisterDish {
            instrument_id,
            dish: dish("D5", "MRN-5", &[(1, &long)]),
            at_ms: T0,
        },
    );
    assert_invalid(
        &writer,
        RegisterDish {
            instrument_id,
            dish: dish("D5", "MRN-5", &[(1, "A"), (1, "B")]),
            at_ms: T0,
        },
    );
    assert_invalid(
        &writer,
        PutTelemetry {
            instrument_id,
            samples: vec![
                TelemetrySample {
                    channel: "temperature_c".into(),
                    value: 37.0,
                    at_ms: T0,
                };
                10_001
            ],
            alarms: vec![],
            ims: None,
            at_ms: T0,
        },
    );
    assert_eq!(store.read().unwrap().stats().unwrap(), before);
    let telemetry_unknown = write(
        &writer,
        PutTelemetry {
            instrument_id: 77,
            samples: vec![],
            alarms: vec![],
            ims: None,
            at_ms: T0,
        },
    );
    assert_eq!(
        telemetry_unknown,
        Err(WriteError::Refused(UnknownInstrument))
    );
    writer.shutdown();
}

#[test]
#[should_panic(expected = "a writer of this store is running already")]
fn a_second_concurrent_writer_is_a_bug() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let _first = store.start_writer(WriterOptions::default());
    let _second = store.start_writer(WriterOptions::default());
}

// ---------------------------------------------------------------- clinical data, users, audit

fn actor(user: &str) -> Actor {
    Actor {
        user: user.into(),
        computer: "VIEWER-1".into(),
    }
}

fn edit(writer: &Writer, user: &str, edit: ClinicalEdit) -> OpResult<Edit> {
    write(
        writer,
        Edit {
            actor: actor(user),
            edit,
            idempotency: None,
            at_ms: T0 + 5 * MINUTE_MS,
        },
    )
}

fn idempotent_edit(
    writer: &Writer,
    key: &str,
    request: u8,
    edit: ClinicalEdit,
    at_ms: i64,
) -> OpResult<Edit> {
    write(
        writer,
        Edit {
            actor: actor("emr"),
            edit,
            idempotency: Some(Idempotency {
                principal: "key:0123456789abcdef".into(),
                key: key.into(),
                request_sha256: [request; 32],
            }),
            at_ms,
        },
    )
}

fn score(embryo_id: &str, expected_version: u64, model: &str, value: &str) -> ClinicalEdit {
    ClinicalEdit::SetScore {
        embryo_id: embryo_id.into(),
        expected_version,
        score: ScoreInput {
            model: model.into(),
            model_version: "2.1".into(),
            value: value.into(),
            viability: String::new(),
        },
    }
}

#[test]
fn scores_are_set_per_model_and_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (writer, _) = setup(&store);
    edit(&writer, "emr", score("E1", 1, "KIDScore", "4.1")).unwrap();
    edit(&writer, "emr", score("E1", 2, "iDAScore", "7.9")).unwrap();
    let outcome = edit(&writer, "emr", score("E1", 3, "KIDScore", "5.0")).unwrap();
    assert!(matches!(outcome, Edited { version: 4, .. }));
    let stale = edit(&writer, "emr", score("E1", 3, "KIDScore", "1.0")).unwrap_err();
    assert_eq!(stale.code(), "conflict");
    let embryo = store.read().unwrap().embryo("E1").unwrap().unwrap();
    let scores: Vec<_> = embryo
        .scores
        .iter()
        .map(|s| (s.model.as_str(), s.value.as_str(), s.set_by.as_str()))
        .collect();
    assert_eq!(
        scores,
        [("KIDScore", "5.0", "emr"), ("iDAScore", "7.9", "emr")]
    );
    // Another embryo's scores are its own.
    let other = store.read().unwrap().embryo("E2").unwrap().unwrap();
    assert!(other.scores.is_empty());
    assert!(store.verify(&mut |_| {}).unwrap().is_clean());
    writer.shutdown();
}

#[test]
fn transfers_are_recorded_with_outcomes_and_versions() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (writer, instrument_id) = setup(&store);
    register(&writer, instrument_id, dish("D9", "MRN-9", &[(1, "E9")]));
    let create = |embryo_ids: &[&str]| ClinicalEdit::CreateTransfer {
        patient_id: "MRN-1".into(),
        treatment_name: "2022-1411".into(),
        transferred_at_ms: T0 + 5 * 24 * 3_600_000,
        embryo_ids: embryo_ids.iter().map(|e| e.to_string()).collect(),
        comment: "single blastocyst".into(),
    };
    // An embryo of another patient cannot be transferred in this treatment.
    let refused = edit(&writer, "emr", create(&["E1", "E9"])).unwrap_err();
    assert_eq!(refused.code(), "invalid_input", "{refused}");
    let unknown = edit(&writer, "emr", create(&["E404"])).unwrap_err();
    assert_eq!(unknown.code(), "not_found");
    let twice = edit(&writer, "emr", create(&["E1", "E1"])).unwrap_err();
    assert_eq!(twice.code(), "invalid_input");

    let outcome = edit(&writer, "emr", create(&["E2"])).unwrap();
    let Edited {
        entity,
        key,
        id,
        version,
        ..
    } = outcome;
    assert_eq!(
        (entity, id.as_str(), version),
        (ChangeEntity::Transfer, "1", 1)
    );
    let update = |expected_version, heartbeats| ClinicalEdit::UpdateTransfer {
        transfer_key: key,
        expected_version,
        outcome: TransferOutcome {
            gestational_sacs: Some(1),
            fetal_heartbeats: heartbeats,
            clinical_pregnancy: Some(true),
            live_birth: None,
        },
        comment: "6 week scan".into(),
    };
    edit(&writer, "emr", update(1, Some(1))).unwrap();
    let WriteError::Refused(EditRefusal::Stale(stale)) =
        edit(&writer, "emr", update(1, Some(2))).unwrap_err()
    else {
        panic!("a stale version is a conflict")
    };
    let Some(Current::Transfer(current)) = &stale.current else {
        panic!("the current transfer comes with the conflict: {stale:?}");
    };
    assert_eq!(current.outcome.fetal_heartbeats, Some(1));
    assert_eq!(current.version, stale.version);
    let too_many = edit(&writer, "emr", update(2, Some(99))).unwrap_err();
    assert_eq!(too_many.code(), "invalid_input");

    let reader = store.read().unwrap();
    let transfers = reader
        .treatment_transfers("MRN-1", "2022-1411")
        .unwrap()
        .unwrap();
    assert_eq!(transfers.len(), 1);
    let transfer = &transfers[0];
    assert_eq!(transfer.embryo_ids, ["E2"]);
    assert_eq!(transfer.version, 2);
    assert_eq!(transfer.outcome.fetal_heartbeats, Some(1));
    assert_eq!(transfer.outcome.clinical_pregnancy, Some(true));
    assert_eq!(transfer.comment, "6 week scan");
    assert!(reader
        .treatment_transfers("MRN-1", "nope")
        .unwrap()
        .is_none());
    let changes = reader.changes_after(0, 1000).unwrap();
    let transfer_changes: Vec<_> = changes
        .iter()
        .filter(|c| c.entity == ChangeEntity::Transfer)
        .map(|c| (c.id.as_str(), c.version))
        .collect();
    assert_eq!(transfer_changes, [("1", 1), ("1", 2)]);
    drop(reader);
    assert!(store.verify(&mut |_| {}).unwrap().is_clean());
    writer.shutdown();
}

#[test]
fn an_idempotency_key_applies_a_write_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (writer, _) = setup(&store);
    let at = T0 + 10 * MINUTE_MS;
    let first = idempotent_edit(&writer, "k-1", 1, score("E1", 1, "KIDScore", "4"), at).unwrap();
    let Edited {
        version,
        change_seq,
        replayed: false,
        ..
    } = first
    else {
        panic!("{first:?}")
    };
    assert_eq!(version, 2);
    // The retry is answered with the first outcome and changes nothing.
    let again = idempotent_edit(&writer, "k-1", 1, score("E1", 1, "KIDScore", "4"), at).unwrap();
    assert!(
        matches!(again, Edited { version: 2, change_seq: c, replayed: true, .. } if c == change_seq),
        "{again:?}"
    );
    let embryo = store.read().unwrap().embryo("E1").unwrap().unwrap();
    assert_eq!(embryo.version, 2);
    assert_eq!(store.read().unwrap().last_change_seq().unwrap(), change_seq);
    // The same key for another request is refused.
    let reused =
        idempotent_edit(&writer, "k-1", 2, score("E1", 2, "KIDScore", "9"), at).unwrap_err();
    assert_eq!(reused.code(), "idempotency_key_reused");
    // A refused write is not recorded: after a conflict the same key may be retried.
    let stale = idempotent_edit(&writer, "k-2", 3, score("E1", 1, "KIDScore", "6"), at);
    assert_eq!(stale.unwrap_err().code(), "conflict");
    let fixed = idempotent_edit(&writer, "k-2", 3, score("E1", 2, "KIDScore", "6"), at).unwrap();
    assert!(matches!(
        fixed,
        Edited {
            version: 3,
            replayed: false,
            ..
        }
    ));
    assert!(store.verify(&mut |_| {}).unwrap().is_clean());
    writer.shutdown();
}

#[test]
fn idempotency_records_are_pruned_with_the_change_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_with_retention(dir.path(), 60 * MINUTE_MS);
    let (writer, _) = setup(&store);
    let old = T0 + MINUTE_MS;
    idempotent_edit(&writer, "old", 1, score("E1", 1, "KIDScore", "4"), old).unwrap();
    // Two hours later the old record is gone: the key is free again (a new write).
    let later = old + 120 * MINUTE_MS;
    idempotent_edit(&writer, "new", 2, score("E1", 2, "KIDScore", "5"), later).unwrap();
    let again = idempotent_edit(&writer, "old", 1, score("E1", 3, "KIDScore", "4"), later).unwrap();
    assert!(
        matches!(
            again,
            Edited {
                version: 4,
                replayed: false,
                ..
            }
        ),
        "{again:?}"
    );
    assert!(store.verify(&mut |_| {}).unwrap().is_clean());
    writer.shutdown();
}

#[test]
fn api_keys_are_created_listed_and_revoked_without_their_secret_in_the_audit() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let writer = store.start_writer(WriterOptions::default());
    let create = |key_id: &str| ApiKeyCreate {
        actor: actor("admin"),
        key_id: key_id.into(),
        name: "EMR".into(),
        scope: ApiScope::Write,
        secret_sha256: [7; 32],
        at_ms: T0,
    };
    write(&writer, create("00112233445566ff")).unwrap();
    let twice = write(&writer, create("00112233445566ff")).unwrap_err();
    assert_eq!(twice.code(), "already_exists");
    let bad = write(&writer, create("not-hex")).unwrap_err();
    assert_eq!(bad.code(), "invalid_input");
    let key = store
        .read()
        .unwrap()
        .api_key("00112233445566ff")
        .unwrap()
        .unwrap();
    assert_eq!(
        (key.scope, key.revoked_at_ms, key.secret_sha256),
        (ApiScope::Write, 0, [7; 32])
    );
    write(
        &writer,
        ApiKeyRevoke {
            actor: actor("admin"),
            key_id: "00112233445566ff".into(),
            at_ms: T0 + 1,
        },
    )
    .unwrap();
    let keys = store.read().unwrap().api_keys().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(keys[0].revoked_at_ms, T0 + 1);
    let audit = store.read().unwrap().audit_after(0, 100).unwrap();
    let actions: Vec<_> = audit.iter().map(|a| a.action.as_str()).collect();
    assert_eq!(actions, ["api_key.create", "api_key.revoke"]);
    assert!(audit.iter().all(|a| !a.after.contains("secret")));
    assert!(store.verify(&mut |_| {}).unwrap().is_clean());
    writer.shutdown();
}

fn t2(embryo_id: &str, expected_version: u64, event_at_ms: i64) -> ClinicalEdit {
    ClinicalEdit::AddAnnotation {
        embryo_id: embryo_id.into(),
        expected_version,
        annotation: AnnotationInput {
            name: "t2".into(),
            value: String::new(),
            event_at_ms: Some(event_at_ms),
            source: AnnotationSource::Manual,
        },
    }
}

#[test]
fn embryo_edits_check_the_version_and_audit_every_attempt() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (writer, _) = setup(&store);
    let embryo = store.read().unwrap().embryo("E1").unwrap().unwrap();
    assert_eq!((embryo.version, embryo.fate), (1, Fate::Undecided));
    assert_eq!(embryo.well, 1);
    assert_eq!(embryo.patient_id, "MRN-1");

    // A saves t2 at 25 h after insemination (insemination is T0 - 1 h).
    let at = T0 + 24 * 3_600_000;
    let outcome = edit(&writer, "anna", t2("E1", 1, at)).unwrap();
    let Edited {
        entity,
        id,
        version,
        change_seq,
        annotation_id,
        ..
    } = outcome;
    assert_eq!(
        (entity, id.as_str(), version),
        (ChangeEntity::Embryo, "E1", 2)
    );
    let annotation_id = annotation_id.expect("an added annotation has an id");

    // B, still at version 1, is refused with the current state; nothing of B's is stored.
    let error = edit(&writer, "bert", t2("E1", 1, at + 3_600_000)).unwrap_err();
    let WriteError::Refused(EditRefusal::Stale(stale)) = &error else {
        panic!("unexpected {error:?}");
    };
    assert_eq!((stale.expected, stale.version), (1, 2));
    let Some(Current::Embryo(current)) = &stale.current else {
        panic!("the current embryo comes with the conflict: {stale:?}");
    };
    assert_eq!(current.version, 2);
    assert_eq!(current.annotations[0].set_by, "anna");
    assert_eq!(error.code(), "conflict");

    let embryo = store.read().unwrap().embryo("E1").unwrap().unwrap();
    assert_eq!(embryo.version, 2);
    assert_eq!(embryo.annotations.len(), 1);
    let annotation = &embryo.annotations[0];
    assert_eq!(annotation.annotation_id, annotation_id);
    assert_eq!(annotation.hours, Some(25.0));
    assert_eq!(annotation.set_by, "anna");

    // The change log names the embryo and its new version.
    let changes = all_changes(&store);
    let last = changes.last().unwrap();
    assert_eq!(last.seq, change_seq);
    assert_eq!(
        (last.entity, last.id.as_str(), last.version),
        (ChangeEntity::Embryo, "E1", 2)
    );

    // Both attempts are in the audit trail, with their outcome.
    let audit = store.read().unwrap().audit_after(0, 100).unwrap();
    let attempts: Vec<_> = audit
        .iter()
        .filter(|a| a.action == "annotation.add")
        .map(|a| (a.user.as_str(), a.outcome, a.computer.as_str()))
        .collect();
    assert_eq!(
        attempts,
        [
            ("anna", AuditOutcome::Applied, "VIEWER-1"),
            ("bert", AuditOutcome::Conflict, "VIEWER-1")
        ]
    );
    assert!(audit[1].after.contains("t2"), "{:?}", audit[1]);

    // Fate, comment, change and removal each raise the version.
    let fate = ClinicalEdit::SetFate {
        embryo_id: "E1".into(),
        expected_version: 2,
        fate: Fate::Transfer,
    };
    assert!(edit(&writer, "anna", fate).is_ok());
    let comment = ClinicalEdit::SetEmbryoComment {
        embryo_id: "E1".into(),
        expected_version: 3,
        comment: "even blastomeres".into(),
    };
    assert!(edit(&writer, "anna", comment).is_ok());
    let change = ClinicalEdit::ChangeAnnotation {
        embryo_id: "E1".into(),
        expected_version: 4,
        annotation_id,
        annotation: AnnotationInput {
            name: "t2".into(),
            value: String::new(),
            event_at_ms: Some(at + 600_000),
            source: AnnotationSource::Guided,
        },
    };
    assert!(edit(&writer, "bert", change).is_ok());
    let embryo = store.read().unwrap().embryo("E1").unwrap().unwrap();
    assert_eq!(embryo.version, 5);
    assert_eq!(embryo.fate, Fate::Transfer);
    assert_eq!(embryo.comment, "even blastomeres");
    assert_eq!(embryo.annotations[0].source, AnnotationSource::Guided);
    assert_eq!(embryo.annotations[0].set_by, "bert");
    let remove = ClinicalEdit::RemoveAnnotation {
        embryo_id: "E1".into(),
        expected_version: 5,
        annotation_id,
    };
    assert!(edit(&writer, "anna", remove.clone()).is_ok());
    let again = ClinicalEdit::RemoveAnnotation {
        embryo_id: "E1".into(),
        expected_version: 6,
        annotation_id,
    };
    assert_eq!(
        edit(&writer, "anna", again).unwrap_err().code(),
        "not_found"
    );
    let unknown = t2("NO-SUCH-EMBRYO", 1, at);
    assert_eq!(
        edit(&writer, "anna", unknown).unwrap_err().code(),
        "not_found"
    );
    let embryo = store.read().unwrap().embryo("E1").unwrap().unwrap();
    assert_eq!((embryo.version, embryo.annotations.len()), (6, 0));
    let report = store.verify(&mut |_| {}).unwrap();
    assert!(report.is_clean(), "{report:?}");
    writer.shutdown();
}

#[test]
fn patients_and_treatments_are_created_and_edited_with_versions() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (writer, _) = setup(&store);
    let patient = PatientRef {
        patient_idx: String::new(),
        patient_id: "MRN-2".into(),
        first_name: "Grace".into(),
        last_name: "Hopper".into(),
        date_of_birth: "1986-12-09".into(),
    };
    let create = ClinicalEdit::CreatePatient {
        patient: patient.clone(),
    };
    assert!(edit(&writer, "anna", create.clone()).is_ok());
    assert_eq!(
        edit(&writer, "anna", create).unwrap_err().code(),
        "already_exists"
    );
    let renamed = PatientRef {
        last_name: "Murray Hopper".into(),
        ..patient.clone()
    };
    let update = |expected_version| ClinicalEdit::UpdatePatient {
        patient: renamed.clone(),
        expected_version,
    };
    assert!(edit(&writer, "anna", update(1)).is_ok());
    assert_eq!(
        edit(&writer, "bert", update(1)).unwrap_err().code(),
        "conflict"
    );
    let record = store.read().unwrap().patient("MRN-2").unwrap().unwrap();
    assert_eq!(
        (record.version, record.last_name.as_str()),
        (2, "Murray Hopper")
    );

    let treatment = ClinicalEdit::CreateTreatment {
        patient_id: "MRN-2".into(),
        name: "2026-0001".into(),
        comment: String::new(),
    };
    assert!(edit(&writer, "anna", treatment).is_ok());
    let comment = |expected_version| ClinicalEdit::UpdateTreatment {
        patient_id: "MRN-2".into(),
        name: "2026-0001".into(),
        comment: "ICSI".into(),
        expected_version,
    };
    assert!(edit(&writer, "anna", comment(1)).is_ok());
    assert_eq!(
        edit(&writer, "anna", comment(1)).unwrap_err().code(),
        "conflict"
    );
    let reader = store.read().unwrap();
    let record = reader.patient("MRN-2").unwrap().unwrap();
    assert_eq!(record.treatments.len(), 1);
    assert_eq!(
        (
            record.treatments[0].version,
            record.treatments[0].comment.as_str()
        ),
        (2, "ICSI")
    );
    assert_eq!(
        reader.treatment_dishes("MRN-2", "2026-0001").unwrap(),
        Some(vec![])
    );
    // The instrument-registered treatment lists its dish.
    let dishes = reader
        .treatment_dishes("MRN-1", "2022-1411")
        .unwrap()
        .unwrap();
    assert_eq!(dishes.len(), 1);
    assert_eq!(dishes[0].dish_id, "D1");
    assert_eq!(dishes[0].wells.len(), 3);
    assert_eq!(reader.patients(None, 10).unwrap().len(), 2);
    writer.shutdown();
}

#[test]
fn users_lock_out_after_failures_and_unlock() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let writer = store.start_writer(WriterOptions::default());
    let hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNo".to_string();
    let add = UserAdd {
        actor: actor("admin"),
        name: "anna".into(),
        password_hash: hash.clone(),
        rights: Rights::Edit,
        at_ms: T0,
    };
    assert!(write(&writer, add).is_ok());
    let login_from = |address: &str, success: bool, at_ms: i64| {
        write(
            &writer,
            LoginAttempt {
                name: "anna".into(),
                computer: "VIEWER-1".into(),
                address: address.into(),
                success,
                failures_max: 5,
                lockout_ms: 15 * MINUTE_MS,
                at_ms,
            },
        )
    };
    let login = |success: bool, at_ms: i64| login_from("10.0.0.7", success, at_ms);
    let recorded = |granted, locked_until_ms| LoginRecorded {
        granted,
        disabled: false,
        locked_until_ms,
    };
    for attempt in 1..=4 {
        assert_eq!(login(false, T0 + attempt).unwrap(), recorded(false, 0));
    }
    let locked_until = T0 + 5 + 15 * MINUTE_MS;
    assert_eq!(login(false, T0 + 5).unwrap(), recorded(false, locked_until));
    // While locked, even the right password is refused (checked in the transaction).
    assert_eq!(login(true, T0 + 6).unwrap(), recorded(false, locked_until));
    // The lock is for that address only: the account logs in from another one, and the
    // failures from the first did not count there.
    assert_eq!(
        login_from("10.0.0.8", true, T0 + 7).unwrap(),
        recorded(true, 0)
    );
    assert_eq!(
        login_from("10.0.0.8", false, T0 + 8).unwrap(),
        recorded(false, 0)
    );
    assert_eq!(login(true, T0 + 9).unwrap(), recorded(false, locked_until));
    // After the lock ran out, a failure is a plain failure and a success is granted.
    assert_eq!(login(false, locked_until + 1).unwrap(), recorded(false, 0));
    assert_eq!(login(true, locked_until + 2).unwrap(), recorded(true, 0));
    // Lock again for the unlock below.
    for attempt in 0..5 {
        login(false, locked_until + 10 + attempt).unwrap();
    }
    let user = store.read().unwrap().user("anna").unwrap().unwrap();
    assert_eq!(
        user.locks,
        [("10.0.0.7".to_string(), locked_until + 14 + 15 * MINUTE_MS)]
    );
    assert_eq!(user.locked_until_ms, 0, "no lock for every address");
    assert_eq!(user.rights, Rights::Edit);
    let unlock = UserUpdate {
        actor: actor("admin"),
        name: "anna".into(),
        change: UserChange::Unlock,
        at_ms: locked_until + 20,
    };
    assert!(write(&writer, unlock).is_ok());
    assert!(store
        .read()
        .unwrap()
        .user("anna")
        .unwrap()
        .unwrap()
        .locks
        .is_empty());
    assert_eq!(
        login(true, locked_until + 21).unwrap(),
        recorded(true, 0),
        "unlocked"
    );
    // The audit trail records the lock-out with its address, and never the hash.
    let audit = store.read().unwrap().audit_after(0, 100).unwrap();
    assert!(audit
        .iter()
        .any(|a| a.action == "user.lockout" && a.after.contains("10.0.0.7")));
    assert!(audit
        .iter()
        .all(|a| !a.after.contains("argon2") && !a.before.contains("argon2")));
    let bad_hash = UserAdd {
        actor: actor("admin"),
        name: "bert".into(),
        password_hash: "plain-text".into(),
        rights: Rights::View,
        at_ms: T0,
    };
    assert_eq!(
        write(&writer, bad_hash).unwrap_err().code(),
        "invalid_input"
    );
    writer.shutdown();
}

#[test]
fn time_lapse_reads_frames_acquisitions_and_the_dish_overview() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (writer, instrument_id) = setup(&store);
    for step in 0..5i64 {
        for plane in [-1, 0, 1] {
            let at = T0 + step * 10 * MINUTE_MS;
            let op = image_op(
                instrument_id,
                1,
                plane,
                at,
                jpeg((100 + step * 10 + i64::from(plane)) as u32, 50),
            );
            write(&writer, op).unwrap();
        }
    }
    // Well 2 has one acquisition with plane 3 only.
    write(&writer, image_op(instrument_id, 2, 3, T0, jpeg(7, 50))).unwrap();
    let reader = store.read().unwrap();
    let acquisitions = reader.acquisitions("E1", None, 100).unwrap().unwrap();
    assert_eq!(acquisitions.len(), 5);
    assert_eq!(acquisitions[0].focal_planes, [-1, 0, 1]);
    let after = reader
        .acquisitions("E1", Some(T0 + 20 * MINUTE_MS), 100)
        .unwrap()
        .unwrap();
    assert_eq!(after.len(), 2);
    let frames = reader
        .frames("E1", 0, T0 + 10 * MINUTE_MS, T0 + 30 * MINUTE_MS, 100)
        .unwrap()
        .unwrap()
        .into_frames()
        .unwrap();
    assert_eq!(
        frames.iter().map(|f| f.acquired_at_ms).collect::<Vec<_>>(),
        [
            T0 + 10 * MINUTE_MS,
            T0 + 20 * MINUTE_MS,
            T0 + 30 * MINUTE_MS
        ]
    );
    assert_eq!(frames[0].jpeg, jpeg(110, 50));
    let limited = reader
        .frames("E1", 0, i64::MIN, i64::MAX, 2)
        .unwrap()
        .unwrap();
    assert_eq!(limited.frames.len(), 2);
    assert!(limited.damaged.is_none());
    assert!(reader.frames("NOPE", 0, 0, 1, 1).unwrap().is_none());
    assert_eq!(
        reader.embryo_image("E1", T0, -1).unwrap(),
        Some(jpeg(99, 50))
    );
    let overview = reader.dish_overview(1, 0).unwrap();
    assert_eq!(overview.len(), 3);
    let (well, embryo_id, frame) = &overview[0];
    assert_eq!((*well, embryo_id.as_str()), (1, "E1"));
    let frame = frame.as_ref().unwrap();
    assert_eq!(
        (frame.acquired_at_ms, frame.focal_plane),
        (T0 + 40 * MINUTE_MS, 0)
    );
    // Nearest stored plane when the asked one is missing; none for a well without images.
    assert_eq!(overview[1].2.as_ref().unwrap().focal_plane, 3);
    assert!(overview[2].2.is_none());
    writer.shutdown();
}

#[test]
fn a_version_1_database_is_migrated_on_open() {
    let dir = tempfile::tempdir().unwrap();
    write_v1_fixture(&dir.path().join(DATABASE_FILE_NAME)).unwrap();
    let store = open(dir.path());
    assert_eq!(store.server_id(), "0123456789abcdef0123456789abcdef");
    let reader = store.read().unwrap();
    let patient = reader.patient("P-V1").unwrap().unwrap();
    assert_eq!((patient.version, patient.first_name.as_str()), (1, "Ada"));
    assert_eq!(patient.treatments[0].name, "2020-1");
    let embryo = reader.embryo("E-V1-2").unwrap().unwrap();
    assert_eq!(
        (embryo.version, embryo.fate, embryo.dish_id.as_str()),
        (1, Fate::Undecided, "D-V1")
    );
    assert_eq!(
        reader.embryo_id_of_key(2).unwrap().as_deref(),
        Some("E-V1-2")
    );
    let dishes = reader.treatment_dishes("P-V1", "2020-1").unwrap().unwrap();
    assert_eq!(dishes.len(), 1);
    // Version 9: the original's identifiers, minted from the site name (the host name by
    // default: ESSERVER when none) and the patient's creation time (1 ms after 1970).
    assert_eq!(patient.patient_idx, "ESSERVER_25569.0000000115");
    assert_eq!(
        reader
            .patient_of_idx("ESSERVER_25569.0000000115")
            .unwrap()
            .map(|p| p.patient_id),
        Some("P-V1".to_string())
    );
    assert_eq!(embryo.label, "AA2");
    assert_eq!(embryo.fertilization_method, "");
    let instrument = reader.instrument_by_serial("ES-V1").unwrap().unwrap();
    assert_eq!((instrument.number, instrument.number_set_by), (1, "server"));
    let changes = reader.changes_after(0, 100).unwrap();
    let ids: Vec<_> = changes.iter().map(|c| c.id.as_str()).collect();
    assert_eq!(
        ids,
        ["ES-V1", "P-V1", "P-V1/2020-1", "D-V1", "E-V1-1", "E-V1-2"]
    );
    drop(reader);
    let report = store.verify(&mut |_| {}).unwrap();
    assert!(report.is_clean(), "{report:?}");
    // The migrated database takes new writes: the next embryo edit is version 2.
    let writer = store.start_writer(WriterOptions::default());
    let outcome = edit(&writer, "anna", t2("E-V1-1", 1, 5000)).unwrap();
    assert!(
        matches!(
            outcome,
            Edited {
                version: 2,
                change_seq: 7,
                ..
            }
        ),
        "{outcome:?}"
    );
    writer.shutdown();
    drop(store);
    // Reopening does not migrate again.
    let store = open(dir.path());
    assert_eq!(
        store
            .read()
            .unwrap()
            .embryo("E-V1-1")
            .unwrap()
            .unwrap()
            .version,
        2
    );
}

#[test]
fn renaming_an_instrument_keeps_every_image_and_annotation_reachable() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (writer, instrument_id) = setup(&store);
    write(&writer, image_op(instrument_id, 1, 0, T0, jpeg(1, 100))).unwrap();
    edit(&writer, "anna", t2("E1", 1, T0 + 3_600_000)).unwrap();
    let rename = |serial: &str, name: &str| InstrumentRename {
        actor: actor("admin"),
        serial: serial.into(),
        display_name: name.into(),
        at_ms: T0 + 10 * MINUTE_MS,
    };
    write(&writer, rename("SN-1", "Lab 2, left")).unwrap();
    let unknown = write(&writer, rename("SN-404", "x"));
    assert_eq!(unknown.unwrap_err().code(), "not_found");
    let reader = store.read().unwrap();
    let instruments = reader.instruments().unwrap();
    assert_eq!(instruments.len(), 1);
    assert_eq!(
        (
            instruments[0].serial.as_str(),
            instruments[0].display_name.as_str()
        ),
        ("SN-1", "Lab 2, left")
    );
    let embryo = reader.embryo("E1").unwrap().unwrap();
    assert_eq!(embryo.annotations.len(), 1);
    assert_eq!(embryo.instrument_serial, "SN-1");
    assert!(reader.embryo_image("E1", T0, 0).unwrap().is_some());
    drop(reader);
    // The same instrument says HELLO again under its serial: the same instrument, its data.
    assert_eq!(hello(&writer, "SN-1"), instrument_id);
    let audit = store.read().unwrap().audit_after(0, 100).unwrap();
    assert!(audit.iter().any(|a| a.action == "instrument.rename"));
    assert!(store.verify(&mut |_| {}).unwrap().is_clean());
    writer.shutdown();
}

fn ims_telemetry(
    instrument_id: u64,
    samples: &[(&str, i64)],
    alarms: &[(&str, i64, i64)],
    queue_bytes_max: u64,
) -> PutTelemetry {
    PutTelemetry {
        instrument_id,
        samples: samples
            .iter()
            .map(|(channel, at_ms)| TelemetrySample {
                channel: (*channel).into(),
                value: 37.0,
                at_ms: *at_ms,
            })
            .collect(),
        alarms: alarms
            .iter()
            .map(|(code, raised_at_ms, cleared_at_ms)| AlarmInput {
                code: (*code).into(),
                severity: 2,
                raised_at_ms: *raised_at_ms,
                cleared_at_ms: *cleared_at_ms,
                text: "Patient Ada Lovelace, dish D1: door left open".into(),
            })
            .collect(),
        ims: Some(ImsQueueing {
            queue_bytes_max,
            channels: &["temperature_c", "co2_percent"],
            alarm_codes: &["CO2-LOW", "DOOR-OPEN"],
        }),
        at_ms: T0,
    }
}

fn telemetry_outcome(stored: TelemetryStored) -> (u32, u32, u32) {
    (stored.ims_queued, stored.ims_withheld, stored.ims_dropped)
}

#[test]
fn monitoring_queue_takes_instrument_data_only_and_drops_the_oldest_when_full() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (writer, instrument_id) = setup(&store);
    let big = 1 << 30;
    // The model's channels and alarm codes are queued; anything else is withheld: an unknown
    // channel, and alarm codes equal to or built from patient data (patient id, name, dish id,
    // embryo id), free text, and another instrument's code.
    let op = || {
        ims_telemetry(
            instrument_id,
            &[("temperature_c", T0), ("co2_percent", T0), ("Lovelace", T0)],
            &[
                ("CO2-LOW", T0, 0),
                ("MRN-1", T0, 0),
                ("LOVELACE", T0, 0),
                ("ADA", T0, 0),
                ("D1", T0, 0),
                ("E2", T0, 0),
                ("door open", T0, 0),
                ("ALERT-LOVELACE", T0, 0),
                ("CAMERA-FAULT", T0, 0),
            ],
            big,
        )
    };
    assert_eq!(telemetry_outcome(write(&writer, op()).unwrap()), (3, 9, 0));
    // A resend queues nothing; clearing the alarm queues it again.
    assert_eq!(telemetry_outcome(write(&writer, op()).unwrap()), (0, 0, 0));
    let clear = ims_telemetry(instrument_id, &[], &[("CO2-LOW", T0, T0 + 5)], big);
    assert_eq!(telemetry_outcome(write(&writer, clear).unwrap()), (1, 0, 0));

    let reader = store.read().unwrap();
    let stats = reader.ims_stats().unwrap();
    assert_eq!((stats.records, stats.withheld, stats.alarms), (4, 9, 9));
    assert_eq!(stats.oldest_received_at_ms, T0);
    let batch = reader.ims_batch(100, u64::MAX).unwrap();
    assert_eq!(
        batch.iter().map(|r| r.id).collect::<Vec<_>>(),
        vec![1, 2, 3, 4]
    );
    let json = serde_json::to_string(&batch).unwrap();
    for secret in [
        "Ada",
        "ADA",
        "Lovelace",
        "MRN-1",
        "2022-1411",
        "\"D1\"",
        "E2",
        "door",
        "ALERT",
        "CAMERA",
    ] {
        assert!(!json.contains(secret), "{secret} in {json}");
    }
    assert!(json.contains("\"type\":\"alarm\""), "{json}");
    // The alarm's text stays on the server.
    let alarms = reader.alarms(10).unwrap();
    assert_eq!(alarms.len(), 9);
    assert!(alarms.iter().all(|a| a.text.contains("door left open")));
    drop(reader);

    // Removing after upload: ids gone are skipped.
    let removed = write(
        &writer,
        ImsRemove {
            ids: vec![1, 2, 99],
        },
    )
    .unwrap();
    assert_eq!(removed, ImsRemoved { removed: 2 });
    let stats = store.read().unwrap().ims_stats().unwrap();
    assert_eq!((stats.records, stats.uploaded_records), (2, 2));

    // A small bound: the oldest go first, counted.
    let row_bytes = stats.bytes / stats.records;
    let bound = row_bytes * 5;
    for minute in 1..=20 {
        let op = ims_telemetry(
            instrument_id,
            &[("temperature_c", T0 + minute * MINUTE_MS)],
            &[],
            bound,
        );
        write(&writer, op).unwrap();
    }
    let reader = store.read().unwrap();
    let stats = reader.ims_stats().unwrap();
    assert!(stats.bytes <= bound, "{stats:?}");
    assert!(stats.dropped_records >= 15, "{stats:?}");
    assert_eq!(
        stats.records + stats.dropped_records + stats.uploaded_records,
        24
    );
    let batch = reader.ims_batch(100, u64::MAX).unwrap();
    assert_eq!(batch.last().unwrap().id, 24);
    let kept_newest = batch.iter().all(|r| r.id > 24 - stats.records);
    assert!(kept_newest, "{batch:?}");
    drop(reader);
    writer.shutdown();
    let report = store.verify(&mut |_| {}).unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}

/// Small writes queued behind megabytes of images are committed and answered first, in a
/// transaction of their own; the images follow in the next one.
#[test]
fn small_writes_do_not_wait_for_the_images_of_their_batch() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (writer, instrument_id) = setup(&store);
    let gate = block_writer(&writer);
    let order = std::sync::Arc::new(parking_lot::Mutex::new(Vec::new()));
    let (all_done, done_rx) = bounded::<()>(64);
    for i in 0..20u32 {
        let order = order.clone();
        let all_done = all_done.clone();
        let op = image_op(instrument_id, 1, 0, T0 + i64::from(i), jpeg(i, 60_000));
        let done = move |result: OpResult<PutImage>| {
            assert!(result.is_ok());
            order.lock().push("image");
            all_done.send(()).unwrap();
        };
        writer.try_submit(op, done).unwrap();
    }
    let embryo_version = store.read().unwrap().embryo("E1").unwrap().unwrap().version;
    let edit = Edit {
        actor: actor("anna"),
        edit: ClinicalEdit::SetEmbryoComment {
            embryo_id: "E1".into(),
            expected_version: embryo_version,
            comment: "looks good".into(),
        },
        idempotency: None,
        at_ms: T0,
    };
    {
        let order = order.clone();
        let all_done = all_done.clone();
        let done = move |result: OpResult<Edit>| {
            assert!(result.is_ok(), "{result:?}");
            order.lock().push("edit");
            all_done.send(()).unwrap();
        };
        writer.try_submit(edit, done).unwrap();
    }
    let commits_before = writer.stats().commits;
    drop(gate);
    for _ in 0..21 {
        done_rx.recv().unwrap();
    }
    let order = order.lock().clone();
    assert_eq!(order[0], "edit", "{order:?}");
    assert_eq!(order.len(), 21);
    // One commit for the edit, one for the 20 images (1.2 MB).
    assert_eq!(writer.stats().commits, commits_before + 2);
    writer.shutdown();
}

// ---------------------------------------------------------------- the original's identifiers

#[test]
fn patients_embryos_and_instruments_carry_the_original_systems_identifiers() {
    let dir = tempfile::tempdir().unwrap();
    let options = StoreOptions {
        site_name: "ivf-lab.clinic".into(),
        ..StoreOptions::default()
    };
    let store = Store::open(dir.path(), &options, SEED).unwrap();
    let writer = store.start_writer(WriterOptions::default());
    // The instrument's own number from its HELLO; an administrator's number wins over it.
    let mut first = hello_op("SN-7", None, "secret-7", T0);
    first.number = 3253;
    let instrument_id = write(&writer, first).unwrap().instrument_id;
    let number_of = |serial: &str| {
        let record = store
            .read()
            .unwrap()
            .instrument_by_serial(serial)
            .unwrap()
            .unwrap();
        (record.number, record.number_set_by)
    };
    assert_eq!(number_of("SN-7"), (3253, "instrument"));
    let renumber = InstrumentRenumber {
        actor: actor("admin"),
        serial: "SN-7".into(),
        number: 12,
        at_ms: T0,
    };
    write(&writer, renumber).unwrap();
    let mut again = hello_op("SN-7", Some("secret-7"), "unused", T0 + 1);
    again.number = 3253;
    write(&writer, again).unwrap();
    assert_eq!(number_of("SN-7"), (12, "administrator"));
    // One that sends no number gets the lowest no instrument has.
    let other = hello(&writer, "SN-8");
    assert_eq!(number_of("SN-8"), (1, "server"));
    // Two instruments may not be given one number.
    let clash = InstrumentRenumber {
        actor: actor("admin"),
        serial: "SN-8".into(),
        number: 12,
        at_ms: T0,
    };
    assert_eq!(write(&writer, clash).unwrap_err().code(), "already_exists");

    // Two patients created in the same millisecond get distinct PatientIDx values made of
    // the site name and the spreadsheet serial day of their creation.
    let mut a = dish("D1", "MRN-A", &[(1, "EA1"), (2, "EA2")]);
    a.fertilization_method = "ICSI".into();
    register(&writer, instrument_id, a);
    let mut b = dish("D2", "MRN-B", &[(1, "EB1")]);
    b.wells[0].label = "X7".into();
    register(&writer, other, b);
    // A second dish of the same treatment: its embryos are labelled AB<well>.
    register(&writer, instrument_id, dish("D3", "MRN-A", &[(4, "EA4")]));
    let reader = store.read().unwrap();
    let patient_a = reader.patient("MRN-A").unwrap().unwrap();
    let patient_b = reader.patient("MRN-B").unwrap().unwrap();
    // T0 (2023-11-14 22:13:20 UTC) is serial day 45244.9259259259.
    assert_eq!(patient_a.patient_idx, "IVF-LAB_45244.9259259259");
    assert_eq!(patient_b.patient_idx, "IVF-LAB_45244.9259259260");
    assert_eq!(
        reader
            .patient_of_idx(&patient_b.patient_idx)
            .unwrap()
            .map(|p| p.patient_id),
        Some("MRN-B".to_string())
    );
    assert!(reader.patient_of_idx("IVF-LAB_1.0").unwrap().is_none());
    let embryo = |id: &str| reader.embryo(id).unwrap().unwrap();
    assert_eq!(
        (embryo("EA1").label.as_str(), embryo("EA2").label.as_str()),
        ("AA1", "AA2")
    );
    assert_eq!(embryo("EA4").label, "AB4");
    assert_eq!(embryo("EB1").label, "X7");
    assert_eq!(embryo("EA1").fertilization_method, "ICSI");
    assert_eq!(embryo("EA4").fertilization_method, "");
    assert_eq!(embryo("EA1").instrument_number, 12);
    drop(reader);

    // A PatientIDx a patient comes with is kept, and may not be taken twice.
    let create = |patient_id: &str, idx: &str| ClinicalEdit::CreatePatient {
        patient: PatientRef {
            patient_id: patient_id.into(),
            first_name: String::new(),
            last_name: String::new(),
            date_of_birth: String::new(),
            patient_idx: idx.into(),
        },
    };
    edit(&writer, "emr", create("MRN-C", "PC10T4L7_44803.5316606366")).unwrap();
    let taken = edit(&writer, "emr", create("MRN-D", "PC10T4L7_44803.5316606366")).unwrap_err();
    assert_eq!(taken.code(), "already_exists", "{taken}");
    let malformed = edit(&writer, "emr", create("MRN-E", "PC 10")).unwrap_err();
    assert_eq!(malformed.code(), "invalid_input", "{malformed}");
    let reader = store.read().unwrap();
    assert_eq!(
        reader.patient("MRN-C").unwrap().unwrap().patient_idx,
        "PC10T4L7_44803.5316606366"
    );
    drop(reader);

    // Every embryo with an iDAScore, page by page in embryo-key order.
    for (embryo_id, value) in [("EA1", "8.1"), ("EA4", "2.5"), ("EB1", "6.0")] {
        edit(&writer, "emr", score(embryo_id, 1, "iDAScore", value)).unwrap();
    }
    edit(&writer, "emr", score("EA2", 1, "KIDScore", "4")).unwrap();
    // A model name in other capitals is the same model: the embryo is listed once.
    edit(&writer, "emr", score("EB1", 2, "IDASCORE", "6.1")).unwrap();
    let reader = store.read().unwrap();
    let first_page = reader.scored_embryos("idascore", 0, 2).unwrap();
    let ids: Vec<_> = first_page
        .iter()
        .map(|(e, _)| e.embryo_id.as_str())
        .collect();
    assert_eq!(ids, ["EA1", "EB1"]);
    let after = first_page[1].0.embryo_key;
    let rest = reader.scored_embryos("iDAScore", after, 2).unwrap();
    let values: Vec<_> = rest
        .iter()
        .map(|(e, s)| (e.embryo_id.as_str(), s.value.as_str()))
        .collect();
    assert_eq!(values, [("EA4", "2.5")]);
    drop(reader);
    assert!(store.verify(&mut |_| {}).unwrap().is_clean());
    writer.shutdown();
    drop(store);
    // An opener that names no site (an offline tool without the configuration) keeps the
    // stored one: the next patient's PatientIDx still begins with it.
    let store = Store::open(dir.path(), &StoreOptions::default(), SEED).unwrap();
    let writer = store.start_writer(WriterOptions::default());
    edit(&writer, "emr", create("MRN-F", "")).unwrap();
    let idx = store
        .read()
        .unwrap()
        .patient("MRN-F")
        .unwrap()
        .unwrap()
        .patient_idx;
    assert!(idx.starts_with("IVF-LAB_"), "{idx}");
    writer.shutdown();
}

#[test]
fn a_dish_registration_with_other_patient_details_keeps_the_stored_ones_until_the_clinic_edits() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let (writer, instrument_id) = setup(&store);
    let mut other = dish("D2", "MRN-1", &[(1, "E21")]);
    other.patient.first_name = "Augusta".into();
    other.patient.date_of_birth = "1815-12-10".into();
    let registered = register(&writer, instrument_id, other.clone());
    assert!(
        registered.created,
        "the images matter more: the dish is registered"
    );
    // The same registration again is the same difference, not a second one.
    register(&writer, instrument_id, other);
    let reader = store.read().unwrap();
    let patient = reader.patient("MRN-1").unwrap().unwrap();
    assert_eq!(
        (patient.first_name.as_str(), patient.date_of_birth.as_str()),
        ("Ada", "1985-12-10")
    );
    assert_eq!(patient.version, 1);
    let differs = patient.details_differ.clone().unwrap();
    assert_eq!(
        (
            differs.instrument_serial.as_str(),
            differs.first_name.as_str(),
            differs.date_of_birth.as_str(),
            differs.times
        ),
        ("SN-1", "Augusta", "1815-12-10", 1)
    );
    assert_eq!(reader.patient_differences(10).unwrap(), vec![differs]);
    let audit = reader.audit_after(0, 100).unwrap();
    let entry = audit
        .iter()
        .find(|a| a.action == "patient.details_differ")
        .expect("audited");
    assert_eq!(entry.outcome, AuditOutcome::Kept);
    assert_eq!(entry.user, "instrument:SN-1");
    let summaries: Vec<_> = all_changes(&store)
        .into_iter()
        .filter(|c| c.summary.contains("differ"))
        .collect();
    assert_eq!(summaries.len(), 1);
    drop(reader);
    // The clinic decides: an edit of the patient resolves the difference.
    let update = ClinicalEdit::UpdatePatient {
        patient: PatientRef {
            patient_id: "MRN-1".into(),
            first_name: "Augusta Ada".into(),
            last_name: "Lovelace".into(),
            date_of_birth: "1815-12-10".into(),
            patient_idx: String::new(),
        },
        expected_version: 1,
    };
    edit(&writer, "anna", update).unwrap();
    let reader = store.read().unwrap();
    assert!(reader
        .patient("MRN-1")
        .unwrap()
        .unwrap()
        .details_differ
        .is_none());
    assert!(reader.patient_differences(10).unwrap().is_empty());
    drop(reader);
    writer.shutdown();
}

#[test]
fn logins_find_the_account_without_regard_to_case_and_names_may_not_differ_by_case_alone() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let writer = store.start_writer(WriterOptions::default());
    let hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHQ$aGFzaGhhc2hoYXNoaGFzaGhhc2hoYXNoaGFzaGg";
    let add = |name: &str| UserAdd {
        actor: actor("admin"),
        name: name.into(),
        password_hash: hash.into(),
        rights: Rights::View,
        at_ms: T0,
    };
    write(&writer, add("Web")).unwrap();
    let refused = write(&writer, add("WEB")).unwrap_err();
    assert_eq!(refused.code(), "already_exists", "{refused}");
    let reader = store.read().unwrap();
    for typed in ["Web", "WEB", "web"] {
        let found = reader.user_for_login(typed).unwrap().map(|u| u.name);
        assert_eq!(found.as_deref(), Some("Web"), "{typed}");
    }
    assert!(reader.user_for_login("webb").unwrap().is_none());
    // Lookups other than logins are exact.
    assert!(reader.user("WEB").unwrap().is_none());
    drop(reader);
    writer.shutdown();
}
