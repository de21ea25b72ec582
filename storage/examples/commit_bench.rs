//! Storage alone, without the network: how many 30 KB images per second the group-commit
//! writer stores durably, and its commit latency, against the disk's own write+fsync limit
//! for the same bytes and batch sizes.
//!
//! cargo run --release -p es-storage --example commit_bench -- [DIR] [IMAGES] [WINDOW]

mod common;

use es_storage::{PutImage, Store, StoreOptions, WriterOptions};
use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let base = args
        .get(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let images: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(20_000);
    let window: u64 = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let dir = tempfile::tempdir_in(&base).expect("scratch directory");
    let store = Store::open(dir.path(), &StoreOptions::default(), [7; 16]).expect("store");
    let writer = store.start_writer(WriterOptions::default());
    let instrument_id = common::instrument_with_dish(&writer, "BENCH", "D1", 16);
    let frame = common::frame(30_000);
    let done = Arc::new(AtomicU64::new(0));
    let latency_us_total = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut submitted = 0u64;
    while done.load(Ordering::Relaxed) < images {
        while submitted < images && submitted - done.load(Ordering::Relaxed) < window {
            let done = done.clone();
            let latency = latency_us_total.clone();
            let sent = Instant::now();
            let op = PutImage {
                instrument_id,
                dish_id: "D1".into(),
                well: (submitted % 16) as u32 + 1,
                focal_plane: 0,
                acquired_at_ms: submitted as i64,
                jpeg: es_storage::ImageBytes::new(frame.clone()),
                at_ms: 1,
            };
            writer
                .submit(op, move |r| {
                    r.unwrap();
                    latency.fetch_add(sent.elapsed().as_micros() as u64, Ordering::Relaxed);
                    done.fetch_add(1, Ordering::Relaxed);
                })
                .ok()
                .unwrap();
            submitted += 1;
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    let elapsed = started.elapsed().as_secs_f64();
    let stats = writer.stats();
    let batch = stats.requests as f64 / stats.commits as f64;
    println!(
        "writer: {images} images in {elapsed:.2} s = {:.0} images/s, {:.1} MB/s; {} commits, {batch:.0} requests per commit, mean latency {:.1} ms",
        images as f64 / elapsed,
        images as f64 * 30_000.0 / elapsed / 1e6,
        stats.commits,
        latency_us_total.load(Ordering::Relaxed) as f64 / images as f64 / 1000.0
    );
    println!(
        "writer time: apply {:.2} s, commit {:.2} s",
        stats.apply_us as f64 / 1e6,
        stats.commit_us as f64 / 1e6
    );
    writer.shutdown();
    let file_bytes = std::fs::metadata(store.path())
        .map(|m| m.len())
        .unwrap_or(0);
    println!(
        "database file: {:.1} MB for {:.1} MB of images",
        file_bytes as f64 / 1e6,
        images as f64 * 0.03
    );
    drop(store);
    // The disk's own limit for the same bytes and batches.
    let path = dir.path().join("raw");
    let mut file = std::fs::File::create(&path).unwrap();
    let chunk = frame.repeat(batch.round().max(1.0) as usize);
    let started = Instant::now();
    let mut written = 0u64;
    while written < images {
        file.write_all(&chunk).unwrap();
        file.sync_data().unwrap();
        written += batch.round().max(1.0) as u64;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "disk:   {:.0} images/s, {:.1} MB/s in batches of {batch:.0} (write + fdatasync)",
        written as f64 / elapsed,
        written as f64 * 0.03 / elapsed
    );
}
