//! A real full disk: the server's data directory on a small tmpfs, no reserve, images until
//! the filesystem answers ENOSPC. The failed batch is refused with disk_full (never
//! acknowledged), the server reopens its database and stays up, reads go on, and once the
//! filesystem grows the same images are accepted; nothing acknowledged is lost and `esserver
//! verify` is clean. Where the machine cannot mount a tmpfs (no privilege), the test says so
//! and returns: the storage backend test (storage/tests/enospc.rs) and the reserve test
//! (tests/incubator_faults.rs) still run.

mod common;

use es_loadtest::sim::Workload;
use es_perf::catalog::DeviceModel;
use es_proto::incubator::{pb, Message};
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted for the test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, megabytes: u32) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).ok()?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={megabytes}m"), "tmpfs"])
            .arg(at)
            .stderr(std::process::Stdio::null())
            .status()
            .ok()?;
        status.success().then(|| Tmpfs(at.to_path_buf()))
    }

    fn resize(&self, megabytes: u32) {
        let status = Command::new("mount")
            .args(["-o", &format!("remount,size={megabytes}m")])
            .arg(&self.0)
            .status()
            .unwrap();
        assert!(status.success(), "remount of the tmpfs failed");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn image(workload: &Workload, index: u64, frames: &[bytes::Bytes]) -> Message {
    let spec = workload.image(index);
    Message::Image(pb::Image {
        seq: 0,
        dish_id: spec.dish_id,
        well: spec.well,
        focal_plane: spec.focal_plane,
        acquired_at_ms: spec.acquired_at_ms,
        jpeg: frames[(index % frames.len() as u64) as usize].clone(),
    })
}

#[test]
fn enospc_refuses_the_batch_the_server_reopens_and_carries_on_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let Some(tmpfs) = Tmpfs::mount(&dir.path().join("data"), 16) else {
        println!("this machine cannot mount a tmpfs (no privilege): the real-ENOSPC test does not run here; storage/tests/enospc.rs covers ENOSPC through a failing storage backend");
        return;
    };
    let mut server = common::spawn_in(
        &dir,
        false,
        "[Storage]\nreserve_bytes = 0\ncache_bytes = 4 MiB\n",
    );
    let mut identity = common::identity("ENOSPC-01", "es-8");
    let mut client = common::connect(&server, &mut identity);
    let workload = Workload::full("ENOSPC-01", DeviceModel::EmbryoScope8, 4, 1_760_000_000_000);
    es_loadtest::sim::register_dishes(&mut client, &workload, common::TIMEOUT).unwrap();
    let dishes = workload.dish_registrations();
    let frames = es_loadtest::frames::generate(8, 11);

    // Images one at a time until the filesystem is full.
    let mut acked = 0u64;
    let refused_at = loop {
        assert!(acked < workload.len(), "16 MB never filled up");
        match client
            .request(image(&workload, acked, &frames), common::TIMEOUT)
            .unwrap()
        {
            Message::Ack(_) => acked += 1,
            Message::Error(error) => {
                assert_eq!(error.name, "disk_full", "{error:?}");
                break acked;
            }
            other => panic!("{other:?}"),
        }
    };
    assert!(refused_at > 10, "some images fit before the disk filled");
    let log = common::server_log(&dir);
    assert!(
        log.contains("database reopened after an I/O error"),
        "{log}"
    );

    // Still up; more writes are refused while the disk stays full. A failed batch may leave
    // volume space it had allocated (fallocate) for its records, or redb may shrink its file
    // when it is reopened; an image or two can fit into that before the next refusal.
    assert!(server.is_running());
    let mut fitted_after = 0u64;
    loop {
        let reply = client
            .request(image(&workload, acked, &frames), common::TIMEOUT)
            .unwrap();
        match reply {
            Message::Ack(ref a) if !a.duplicate => {
                acked += 1;
                fitted_after += 1;
                assert!(fitted_after <= 20, "the disk never refused again");
            }
            Message::Error(ref e) if e.name == "disk_full" => break,
            other => panic!("{other:?}"),
        }
    }

    // Reads answer, and see every acknowledged image.
    let mut stored = 0usize;
    for dish in &dishes {
        let reply = client
            .request(
                Message::SyncState(pb::SyncState {
                    seq: 0,
                    dish_id: dish.dish_id.clone(),
                }),
                common::TIMEOUT,
            )
            .unwrap();
        let Message::SyncStateResult(state) = reply else {
            panic!("{reply:?}")
        };
        stored += state
            .wells
            .iter()
            .flat_map(|w| w.acquisitions.iter())
            .map(|a| a.focal_planes.len())
            .sum::<usize>();
    }
    assert_eq!(stored as u64, acked, "every acknowledged image is readable");

    // Space returns: the refused image and the rest are accepted.
    tmpfs.resize(128);
    for index in acked..acked + 40 {
        let reply = client
            .request(image(&workload, index, &frames), common::TIMEOUT)
            .unwrap();
        assert!(
            matches!(reply, Message::Ack(ref a) if !a.duplicate),
            "image {index} after space returned: {reply:?}"
        );
    }
    let total = acked + 40;
    drop(client);
    assert_eq!(server.terminate(common::TIMEOUT), Some(0));

    let verify = Command::new(common::esserver_path())
        .args(["verify", "--data"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "{}{}",
        String::from_utf8_lossy(&verify.stdout),
        String::from_utf8_lossy(&verify.stderr)
    );
    let status = common::admin_json(&dir.path().join("data"), &["status"]);
    assert_eq!(status["storage"]["images"], total, "{status}");
    println!(
        "ENOSPC after {refused_at} images on a 16 MB tmpfs ({fitted_after} more fitted before the next refusal); {total} stored after it grew to 128 MB"
    );
    drop(tmpfs);
}
