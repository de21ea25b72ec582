//! Where the database's bytes per image go: stores IMAGES images of 30 KB (in acquisitions of
//! PLANES focal planes, 16 wells, as an EmbryoScope+ captures them) through the writer, then
//! prints each table's space as redb counts it, per image, and the database file's size per
//! image. The store is deleted afterwards.
//!
//! cargo run --release -p es-storage --example index_bench -- [DIR] [IMAGES] [PLANES]

mod common;

use es_storage::{PutImage, Store, StoreOptions, WriterOptions};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const WELLS: u32 = 16;
const WINDOW: u64 = 2048;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let base = args
        .get(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let images: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(100_000);
    let planes: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(11);
    let image_bytes = 30_000u64;
    let needed = images * (image_bytes + 200) + (1 << 30);
    let free = free_bytes(&base);
    assert!(
        free > needed,
        "{} has {} MB free; this run needs {} MB",
        base.display(),
        free >> 20,
        needed >> 20
    );
    let dir = tempfile::tempdir_in(&base).expect("scratch directory");
    let store = Store::open(dir.path(), &StoreOptions::default(), [7; 16]).expect("store");
    let writer = store.start_writer(WriterOptions::default());
    let instrument_id = common::instrument_with_dish(&writer, "INDEX", "D2026-12-04-0001", WELLS);
    let frame = common::frame(image_bytes as u32);
    let t0_ms = 1_764_806_400_000i64;
    let done = Arc::new(AtomicU64::new(0));
    let mut submitted = 0u64;
    while done.load(Ordering::Relaxed) < images {
        while submitted < images && submitted - done.load(Ordering::Relaxed) < WINDOW {
            let plane = (submitted % planes) as i32;
            let well = ((submitted / planes) % u64::from(WELLS)) as u32 + 1;
            let cycle = submitted / planes / u64::from(WELLS);
            let acquired_at_ms = t0_ms + cycle as i64 * 600_000 + i64::from(well) * 1_000;
            let op = PutImage {
                instrument_id,
                dish_id: "D2026-12-04-0001".into(),
                well,
                focal_plane: plane,
                acquired_at_ms,
                jpeg: es_storage::ImageBytes::new(frame.clone()),
                at_ms: acquired_at_ms + 500,
            };
            let done = done.clone();
            writer
                .submit(op, move |r| {
                    r.unwrap();
                    done.fetch_add(1, Ordering::Relaxed);
                })
                .ok()
                .unwrap();
            submitted += 1;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    writer.shutdown();
    let reader = store.read().unwrap();
    let stats = reader.stats().unwrap();
    let space = reader.table_space().unwrap();
    drop(reader);
    use std::os::unix::fs::MetadataExt;
    let database = std::fs::metadata(dir.path().join(es_storage::DATABASE_FILE_NAME)).unwrap();
    let (database_bytes, database_allocated) = (database.len(), database.blocks() * 512);
    let per = |bytes: u64| bytes as f64 / stats.images as f64;
    println!(
        "{} images in {} acquisitions ({planes} planes), {} change-log entries",
        stats.images, stats.acquisitions, stats.changes
    );
    println!(
        "{:<24} {:>10} {:>12} {:>10} {:>10} {:>10} {:>9}",
        "table", "entries", "stored B", "meta B", "frag B", "B/image", "B/entry"
    );
    let mut total = 0;
    for table in space.iter().filter(|t| t.entries > 0) {
        total += table.total_bytes();
        println!(
            "{:<24} {:>10} {:>12} {:>10} {:>10} {:>10.2} {:>9.1}",
            table.name,
            table.entries,
            table.stored_bytes,
            table.metadata_bytes,
            table.fragmented_bytes,
            per(table.total_bytes()),
            table.total_bytes() as f64 / table.entries as f64
        );
    }
    println!(
        "tables {:.2} B/image; database file {} bytes = {:.2} B/image, {} bytes allocated on disk = {:.2} B/image (free pages and allocator state included; redb doubles the file as it grows)",
        per(total),
        database_bytes,
        per(database_bytes),
        database_allocated,
        per(database_allocated)
    );
    drop(store);
}

fn free_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: c is a valid NUL-terminated path and s a zeroed statvfs to fill.
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return 0;
    }
    s.f_bavail as u64 * s.f_frsize as u64
}
