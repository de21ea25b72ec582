//! What an unclean shutdown costs at the next open, against the size of the database, with
//! and without redb's quick repair, and what quick repair costs per commit.
//!
//! cargo run --release -p es-storage --example repair_bench -- [DIR] [DATABASE_MB]
//!
//! Fills a store's database (not its volumes) with telemetry rows up to DATABASE_MB, then for
//! quick repair off and on: runs a child process that commits small batches as fast as it
//! can, kills it with SIGKILL, and times `Store::open` (the repair) in this process; times the
//! commits of 2,000 one-sample batches. The store is deleted afterwards.

use es_storage::{
    InstrumentHello, PutTelemetry, Store, StoreOptions, TelemetrySample, WriterOptions,
};
use std::path::Path;
use std::time::{Duration, Instant};

fn options(quick_repair: bool) -> StoreOptions {
    StoreOptions {
        quick_repair,
        ..StoreOptions::default()
    }
}

fn call<O: es_storage::Operation>(writer: &es_storage::Writer, op: O) -> O::Outcome {
    writer.write(op).unwrap()
}

fn instrument(writer: &es_storage::Writer) -> u64 {
    call(
        writer,
        InstrumentHello {
            number: 0,
            serial: "REPAIR".into(),
            model: "es-plus".into(),
            firmware: "1".into(),
            presented_secret: Some("s".into()),
            new_secret: "s".into(),
            issued_connection_open: false,
            enrolment: Default::default(),
            at_ms: 1,
        },
    )
    .instrument_id
}

fn telemetry(instrument_id: u64, from_ms: i64, samples: i64) -> PutTelemetry {
    PutTelemetry {
        instrument_id,
        samples: (0..samples)
            .map(|i| TelemetrySample {
                channel: "temperature".into(),
                value: 37.0,
                at_ms: from_ms + i,
            })
            .collect(),
        alarms: Vec::new(),
        ims: None,
        at_ms: from_ms,
    }
}

fn database_bytes(dir: &Path) -> u64 {
    std::fs::metadata(dir.join(es_storage::DATABASE_FILE_NAME))
        .map(|m| m.len())
        .unwrap_or(0)
}

/// The child: commits small batches until killed.
fn child(dir: &Path, quick_repair: bool) {
    let store = Store::open(dir, &options(quick_repair), [9; 16]).unwrap();
    let writer = store.start_writer(WriterOptions::default());
    let id = instrument(&writer);
    let mut at = 4_000_000_000_000i64;
    println!("ready");
    loop {
        call(&writer, telemetry(id, at, 100));
        at += 100;
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.get(1).map(String::as_str) == Some("child") {
        child(Path::new(&args[2]), args[3] == "on");
        return;
    }
    let base = args
        .get(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let database_mb: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(1000);
    let scratch = tempfile::tempdir_in(&base).unwrap();
    let dir = scratch.path();
    {
        let store = Store::open(dir, &options(false), [9; 16]).unwrap();
        let writer = store.start_writer(WriterOptions::default());
        let id = instrument(&writer);
        let mut at = 1_000_000_000_000i64;
        let started = Instant::now();
        while database_bytes(dir) < database_mb * 1_000_000 {
            call(&writer, telemetry(id, at, 10_000));
            at += 10_000;
        }
        writer.shutdown();
        println!(
            "filled: {:.0} MB database, {} telemetry rows, in {:.0} s",
            database_bytes(dir) as f64 / 1e6,
            store.read().unwrap().stats().unwrap().telemetry_samples,
            started.elapsed().as_secs_f64()
        );
    }
    for quick in [false, true] {
        let mode = if quick { "on" } else { "off" };
        // Commit cost: 2,000 one-sample commits.
        let mut latencies = Vec::new();
        {
            let store = Store::open(dir, &options(quick), [9; 16]).unwrap();
            let writer = store.start_writer(WriterOptions::default());
            let id = instrument(&writer);
            for n in 0..2000i64 {
                let started = Instant::now();
                call(
                    &writer,
                    telemetry(id, 3_000_000_000_000 + n * 10 + i64::from(quick), 1),
                );
                latencies.push(started.elapsed());
            }
            writer.shutdown();
        }
        latencies.sort();
        let at =
            |q: f64| latencies[((latencies.len() as f64 * q) as usize).min(latencies.len() - 1)];
        // Restart after SIGKILL during commits.
        let exe = std::env::current_exe().unwrap();
        let mut child = std::process::Command::new(exe)
            .args(["child", dir.to_str().unwrap(), mode])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        child.kill().unwrap();
        child.wait().unwrap();
        let started = Instant::now();
        let store = Store::open(dir, &options(quick), [9; 16]).unwrap();
        let repair = started.elapsed();
        drop(store);
        let started = Instant::now();
        drop(Store::open(dir, &options(quick), [9; 16]).unwrap());
        let clean = started.elapsed();
        println!(
            "quick repair {mode}: one-sample commit p50 {:.2} ms p99 {:.2} ms; open after SIGKILL {:.2} s, after a clean close {:.2} s ({:.0} MB database)",
            at(0.5).as_secs_f64() * 1e3,
            at(0.99).as_secs_f64() * 1e3,
            repair.as_secs_f64(),
            clean.as_secs_f64(),
            database_bytes(dir) as f64 / 1e6
        );
    }
}
