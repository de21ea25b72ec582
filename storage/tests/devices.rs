//! The browser viewer's devices in the store: the licence's limit holds for new devices only,
//! a known device logs in again at the limit, a revoked one is refused at once and no longer
//! counts, and every registration, refusal and revocation is audited.

use es_storage::devices::{DeviceRefusal, DeviceRegister, DeviceRevoke};
use es_storage::*;

mod common;
use common::{open, T0};

fn actor(user: &str) -> Actor {
    Actor {
        user: user.into(),
        computer: "web".into(),
    }
}

fn id(n: u8) -> String {
    format!("{n:02x}").repeat(16)
}

fn register(
    writer: &Writer,
    n: u8,
    limit: Option<u32>,
) -> Result<devices::DeviceRegistered, WriteError<DeviceRefusal>> {
    writer.write(DeviceRegister {
        actor: actor("anna"),
        device_id: id(n),
        name: format!("Tablet {n}"),
        limit,
        at_ms: T0 + i64::from(n),
    })
}

#[test]
fn the_limit_holds_for_new_devices_and_revocation_takes_effect_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let writer = store.start_writer(WriterOptions::default());

    let first = register(&writer, 1, Some(2)).unwrap();
    assert_eq!((first.created, first.active), (true, 1));
    assert_eq!(register(&writer, 2, Some(2)).unwrap().active, 2);
    // The third is refused with the reason; a known one logs in again at the limit.
    match register(&writer, 3, Some(2)) {
        Err(WriteError::Refused(DeviceRefusal::LimitReached { limit, active })) => {
            assert_eq!((limit, active), (2, 2));
        }
        other => panic!("{other:?}"),
    }
    let again = register(&writer, 1, Some(2)).unwrap();
    assert_eq!((again.created, again.active), (false, 2));

    // Revoked: refused from now on, and no longer counted.
    writer
        .write(DeviceRevoke {
            actor: actor("admin"),
            device_id: id(1),
            at_ms: T0 + 100,
        })
        .unwrap();
    match register(&writer, 1, Some(2)) {
        Err(WriteError::Refused(DeviceRefusal::Revoked { by, at_ms })) => {
            assert_eq!((by.as_str(), at_ms), ("admin", T0 + 100));
        }
        other => panic!("{other:?}"),
    }
    assert!(register(&writer, 3, Some(2)).unwrap().created);
    // Revoking again changes nothing; an unknown device is not found.
    writer
        .write(DeviceRevoke {
            actor: actor("admin"),
            device_id: id(1),
            at_ms: T0 + 200,
        })
        .unwrap();
    assert!(matches!(
        writer.write(DeviceRevoke {
            actor: actor("admin"),
            device_id: id(9),
            at_ms: T0,
        }),
        Err(WriteError::Refused(DeviceRefusal::NotFound(_)))
    ));
    // No limit (a DEMO licence): any number.
    for n in 10..20 {
        assert!(register(&writer, n, None).unwrap().created);
    }
    // Then a licence with fewer: no device logs in until enough are revoked.
    match register(&writer, 10, Some(2)) {
        Err(WriteError::Refused(DeviceRefusal::LimitReached { limit, active })) => {
            assert_eq!((limit, active), (2, 12));
        }
        other => panic!("{other:?}"),
    }

    let reader = store.read().unwrap();
    let devices = reader.devices().unwrap();
    assert_eq!(devices.len(), 13);
    let first = reader.device(&id(1)).unwrap().unwrap();
    assert_eq!(first.name, "Tablet 1");
    assert_eq!(
        first.revoked_at_ms,
        Some(T0 + 100),
        "the first revocation stands"
    );
    assert_eq!(first.last_login_at_ms, T0 + 1);
    // Audited: registrations, refusals (denied) and the revocation.
    let audit = reader.audit_after(0, 1000).unwrap();
    let count = |action: &str, outcome: AuditOutcome| {
        audit
            .iter()
            .filter(|a| a.action == action && a.outcome == outcome)
            .count()
    };
    assert_eq!(count("device.register", AuditOutcome::Applied), 13);
    assert_eq!(count("device.register", AuditOutcome::Denied), 3);
    assert_eq!(count("device.revoke", AuditOutcome::Applied), 1);
    assert_eq!(
        count("device.revoke", AuditOutcome::Denied),
        1,
        "the unknown device"
    );
    assert!(store.verify(&mut |_| {}).unwrap().is_clean());
}

#[test]
fn malformed_devices_are_refused_before_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let writer = store.start_writer(WriterOptions::default());
    for (device_id, name) in [
        ("short", "Tablet"),
        (&*"G".repeat(32), "Tablet"),
        (&*"AB".repeat(16), "Tablet"),
        (&*id(1), ""),
        (&*id(1), "   "),
        (&*id(1), "tab\u{7}let"),
        (&*id(1), &*"x".repeat(65)),
    ] {
        let refused = writer.write(DeviceRegister {
            actor: actor("anna"),
            device_id: device_id.to_string(),
            name: name.to_string(),
            limit: None,
            at_ms: T0,
        });
        assert!(
            matches!(refused, Err(WriteError::InvalidInput(_))),
            "{device_id:?} {name:?}: {refused:?}"
        );
    }
    assert!(store.read().unwrap().devices().unwrap().is_empty());
}
