//! The PostgreSQL side of `loadtest pg-compare`: finds the server binaries, runs a private
//! PostgreSQL on loopback in a temporary directory (as the `postgres` user when the load
//! generator runs as root, since PostgreSQL refuses to run as root), and runs the ingestion
//! workload of [`crate::bench::run_ingest`] against it: the same frames and image keys, one
//! connection per simulated incubator, one INSERT per image in its own durable transaction
//! (one commit per acknowledged image, as an acknowledgement needs).

use crate::bench::{IngestOptions, IngestResult, StartGate};
use crate::sim::{Pacing, Workload};
use es_perf::latency::LatencyRecorder;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Where Debian installs each major version's server binaries (`<ver>/bin`).
pub const DEBIAN_ROOT: &str = "/usr/lib/postgresql";

/// What to tell a user without PostgreSQL server binaries.
pub const INSTALL_HINT: &str = "install them with `apt-get install postgresql` (Debian, Ubuntu), \
     or name their directory with --pg-bin";

/// The three server programs the comparison runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgBinaries {
    pub initdb: PathBuf,
    pub pg_ctl: PathBuf,
    pub postgres: PathBuf,
}

impl PgBinaries {
    /// The programs in `dir`, when all three are there.
    pub fn in_dir(dir: &Path) -> Option<PgBinaries> {
        let binaries = PgBinaries {
            initdb: dir.join("initdb"),
            pg_ctl: dir.join("pg_ctl"),
            postgres: dir.join("postgres"),
        };
        (binaries.initdb.is_file() && binaries.pg_ctl.is_file() && binaries.postgres.is_file())
            .then_some(binaries)
    }
}

/// The server binaries: the highest version under Debian's `root/<ver>/bin` first, then a
/// directory of `path_var` (a `PATH`) holding all three; a clear error naming the install
/// command otherwise.
pub fn find_binaries(
    root: &Path,
    path_var: Option<&std::ffi::OsStr>,
) -> Result<PgBinaries, String> {
    let mut versions: Vec<(Vec<u32>, PathBuf)> = std::fs::read_dir(root)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let version: Option<Vec<u32>> = name.split('.').map(|p| p.parse().ok()).collect();
            Some((version?, entry.path().join("bin")))
        })
        .collect();
    versions.sort();
    if let Some(binaries) = versions
        .iter()
        .rev()
        .find_map(|(_, dir)| PgBinaries::in_dir(dir))
    {
        return Ok(binaries);
    }
    if let Some(binaries) = path_var
        .into_iter()
        .flat_map(std::env::split_paths)
        .find_map(|dir| PgBinaries::in_dir(&dir))
    {
        return Ok(binaries);
    }
    Err(format!(
        "no PostgreSQL server binaries (initdb, pg_ctl, postgres) under {}/<version>/bin or on PATH; {INSTALL_HINT}",
        root.display()
    ))
}

/// Server settings of the comparison. Durability stays at PostgreSQL's defaults (fsync,
/// synchronous_commit and full_page_writes on, so a commit is on disk before it returns).
#[derive(Debug, Clone)]
pub struct PgSettings {
    pub shared_buffers_mb: u64,
    pub max_connections: u32,
    /// More `name = value` settings, after ours (so they win), from `--pg-set`.
    pub extra: Vec<(String, String)>,
}

/// One `--pg-set NAME=VALUE`: a setting name (letters, digits, `_`, `.`) and a one-line
/// value.
pub fn parse_setting(text: &str) -> Result<(String, String), String> {
    let (name, value) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?} is not NAME=VALUE"))?;
    let name = name.trim();
    let valid_name = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.');
    if !valid_name || value.contains(['\n', '\r']) {
        return Err(format!("{text:?} is not NAME=VALUE"));
    }
    Ok((name.to_string(), value.trim().to_string()))
}

impl PgSettings {
    /// The lines appended to the cluster's `postgresql.conf`.
    pub fn config_lines(&self, port: u16, socket_dir: &Path) -> String {
        let mut text = format!(
            "\n# written by loadtest pg-compare\n\
             listen_addresses = '127.0.0.1'\n\
             port = {port}\n\
             unix_socket_directories = '{}'\n\
             max_connections = {}\n\
             shared_buffers = {}MB\n\
             fsync = on\n\
             synchronous_commit = on\n\
             full_page_writes = on\n\
             wal_level = minimal\n\
             max_wal_senders = 0\n",
            socket_dir.display(),
            self.max_connections,
            self.shared_buffers_mb
        );
        for (name, value) in &self.extra {
            text.push_str(&format!("{name} = '{}'\n", value.replace('\'', "''")));
        }
        text
    }
}

/// The settings the report shows, read back from the running server.
pub const REPORTED_SETTINGS: &[&str] = &[
    "server_version",
    "fsync",
    "synchronous_commit",
    "full_page_writes",
    "wal_sync_method",
    "wal_level",
    "commit_delay",
    "commit_siblings",
    "shared_buffers",
    "wal_buffers",
    "max_wal_size",
    "checkpoint_timeout",
    "log_checkpoints",
    "max_connections",
];

/// The table: the image key esserver uses, the SHA-256 and storing time it records, and the
/// JPEG kept uncompressed out of line (JPEGs do not compress; trying would only cost CPU).
pub const SCHEMA: &str = "\
CREATE TABLE images (
    dish_id text NOT NULL,
    well int NOT NULL,
    focal_plane int NOT NULL,
    acquired_at_ms bigint NOT NULL,
    sha256 bytea NOT NULL,
    stored_at_ms bigint NOT NULL,
    jpeg bytea NOT NULL,
    PRIMARY KEY (dish_id, well, acquired_at_ms, focal_plane)
);
ALTER TABLE images ALTER COLUMN jpeg SET STORAGE EXTERNAL;";

/// One image, one statement, one transaction (autocommit): the server computes the SHA-256
/// and the storing time, as esserver does.
pub const INSERT: &str = "\
INSERT INTO images (dish_id, well, focal_plane, acquired_at_ms, sha256, stored_at_ms, jpeg)
VALUES ($1, $2, $3, $4, sha256($5), (extract(epoch FROM clock_timestamp()) * 1000)::bigint, $5)
ON CONFLICT DO NOTHING";

/// A PostgreSQL server of our own in a temporary directory, stopped (`pg_ctl stop -m fast`)
/// and deleted when dropped.
pub struct PgServer {
    binaries: PgBinaries,
    /// `Some("postgres")` when we run as root.
    run_as: Option<String>,
    dir: tempfile::TempDir,
    pub port: u16,
    started: bool,
    /// The `--pg-set` names, shown with `REPORTED_SETTINGS`.
    extra_names: Vec<String>,
    /// An immediate stop and the directory's removal if the load generator is interrupted.
    _undo: crate::cleanup::Registration,
}

impl PgServer {
    /// initdb in a new directory under `scratch_root`, then start the server on a free
    /// loopback port and create the table.
    pub fn start(
        binaries: &PgBinaries,
        scratch_root: &Path,
        settings: &PgSettings,
    ) -> Result<PgServer, String> {
        let run_as = run_as_user()?;
        let dir = tempfile::Builder::new()
            .prefix("esserver-pgcompare-")
            .tempdir_in(scratch_root)
            .map_err(|e| {
                format!(
                    "cannot create a directory in {}: {e}",
                    scratch_root.display()
                )
            })?;
        let socket_dir = dir.path().join("socket");
        std::fs::create_dir(&socket_dir).map_err(|e| e.to_string())?;
        if let Some(user) = &run_as {
            give_to(user, dir.path())?;
            give_to(user, &socket_dir)?;
        }
        let undo = {
            let (pg_ctl, user, root) = (
                binaries.pg_ctl.clone(),
                run_as.clone(),
                dir.path().to_path_buf(),
            );
            crate::cleanup::on_interrupt(move || {
                // An immediate stop (no checkpoint), then the directory goes.
                let mut command = match &user {
                    Some(user) => {
                        let mut command = Command::new("runuser");
                        command.args(["-u", user, "--"]).arg(&pg_ctl);
                        command
                    }
                    None => Command::new(&pg_ctl),
                };
                let _ = command
                    .arg("-D")
                    .arg(root.join("data"))
                    .args(["-m", "immediate", "-w", "stop"])
                    .current_dir(&root)
                    .output();
                let _ = std::fs::remove_dir_all(&root);
            })
        };
        let mut server = PgServer {
            binaries: binaries.clone(),
            run_as,
            dir,
            port: 0,
            started: false,
            extra_names: settings
                .extra
                .iter()
                .map(|(name, _)| name.clone())
                .collect(),
            _undo: undo,
        };
        let data = server.data_dir();
        server.run(
            &server.binaries.initdb,
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-U".as_ref(),
                "postgres".as_ref(),
                "--auth=trust".as_ref(),
                "--encoding=UTF8".as_ref(),
                "--locale=C".as_ref(),
            ],
        )?;
        server.port = free_port()?;
        let conf = data.join("postgresql.conf");
        let mut text = std::fs::read_to_string(&conf)
            .map_err(|e| format!("cannot read {}: {e}", conf.display()))?;
        text.push_str(&settings.config_lines(server.port, &socket_dir));
        std::fs::write(&conf, text).map_err(|e| format!("cannot write {}: {e}", conf.display()))?;
        let log = server.dir.path().join("postgres.log");
        server.started = true;
        server
            .run(
                &server.binaries.pg_ctl,
                &[
                    "-D".as_ref(),
                    data.as_os_str(),
                    "-l".as_ref(),
                    log.as_os_str(),
                    "-w".as_ref(),
                    "-t".as_ref(),
                    "60".as_ref(),
                    "start".as_ref(),
                ],
            )
            .map_err(|e| {
                let tail = std::fs::read_to_string(&log).unwrap_or_default();
                format!("{e}\n{tail}")
            })?;
        let mut client = server.connect()?;
        client
            .batch_execute(SCHEMA)
            .map_err(|e| format!("creating the table: {e}"))?;
        Ok(server)
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A new client connection over loopback TCP (plain, like the incubator port with
    /// `tls = off`).
    pub fn connect(&self) -> Result<postgres::Client, String> {
        postgres::Config::new()
            .host("127.0.0.1")
            .port(self.port)
            .user("postgres")
            .dbname("postgres")
            .connect_timeout(Duration::from_secs(30))
            .connect(postgres::NoTls)
            .map_err(|e| format!("cannot connect to PostgreSQL on port {}: {e}", self.port))
    }

    /// `REPORTED_SETTINGS` and the `--pg-set` ones as the server has them (with units).
    pub fn settings(&self) -> Result<BTreeMap<String, String>, String> {
        let mut client = self.connect()?;
        let mut settings = BTreeMap::new();
        let names = REPORTED_SETTINGS
            .iter()
            .copied()
            .chain(self.extra_names.iter().map(String::as_str));
        for name in names {
            let row = client
                .query_one(&format!("SHOW {name}"), &[])
                .map_err(|e| format!("SHOW {name}: {e}"))?;
            settings.insert(name.to_string(), row.get::<_, String>(0));
        }
        Ok(settings)
    }

    /// (rows, bytes of the table with its TOAST table and indexes).
    pub fn table_size(&self) -> Result<(u64, u64), String> {
        let mut client = self.connect()?;
        let row = client
            .query_one(
                "SELECT count(*), pg_total_relation_size('images') FROM images",
                &[],
            )
            .map_err(|e| e.to_string())?;
        Ok((row.get::<_, i64>(0) as u64, row.get::<_, i64>(1) as u64))
    }

    /// WAL syncs so far (`pg_stat_wal.wal_sync`, PostgreSQL 14 and later): with one image
    /// per transaction, commits per sync is how many images each fsync made durable.
    pub fn wal_syncs(&self) -> Option<u64> {
        let mut client = self.connect().ok()?;
        let row = client
            .query_one("SELECT wal_sync FROM pg_stat_wal", &[])
            .ok()?;
        Some(row.get::<_, i64>(0) as u64)
    }

    /// Bytes of the WAL directory.
    pub fn wal_bytes(&self) -> u64 {
        std::fs::read_dir(self.data_dir().join("pg_wal"))
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.metadata().ok())
            .filter(|m| m.is_file())
            .map(|m| m.len())
            .sum()
    }

    /// Checkpoints the server has started so far (PostgreSQL 15 logs each one by default:
    /// `log_checkpoints = on`), from its log.
    pub fn checkpoints_logged(&self) -> u64 {
        std::fs::read_to_string(self.dir.path().join("postgres.log"))
            .unwrap_or_default()
            .lines()
            .filter(|line| line.contains("checkpoint starting"))
            .count() as u64
    }

    /// Stops the server (fast shutdown: a checkpoint, clients disconnected).
    pub fn stop(&mut self) -> Result<(), String> {
        if !self.started {
            return Ok(());
        }
        self.started = false;
        let data = self.data_dir();
        if !data.join("postmaster.pid").exists() {
            // It never started (or has already stopped).
            return Ok(());
        }
        self.run(
            &self.binaries.pg_ctl,
            &[
                "-D".as_ref(),
                data.as_os_str(),
                "-m".as_ref(),
                "fast".as_ref(),
                "-w".as_ref(),
                "-t".as_ref(),
                "120".as_ref(),
                "stop".as_ref(),
            ],
        )
    }

    /// Runs one of the binaries (as the `postgres` user when we are root), failing with its
    /// output.
    fn run(&self, program: &Path, args: &[&std::ffi::OsStr]) -> Result<(), String> {
        let mut command = match &self.run_as {
            Some(user) => {
                let mut command = Command::new("runuser");
                command.args(["-u", user, "--"]).arg(program);
                command
            }
            None => Command::new(program),
        };
        // initdb and pg_ctl complain when they cannot enter the current directory.
        command.args(args).current_dir(self.dir.path());
        let output = command
            .output()
            .map_err(|e| format!("cannot run {}: {e}", program.display()))?;
        if output.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{} failed ({}): {}{}",
                program.display(),
                output.status,
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ))
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Err(error) = self.stop() {
            eprintln!("loadtest: stopping PostgreSQL: {error}");
        }
    }
}

/// `Some("postgres")` when this process runs as root (PostgreSQL refuses to), after checking
/// that the user exists.
#[cfg(unix)]
fn run_as_user() -> Result<Option<String>, String> {
    // SAFETY: geteuid(2) cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    user_ids("postgres").ok_or_else(|| {
        "running as root, and PostgreSQL refuses to run as root, but there is no `postgres` user \
         to run it as (Debian's postgresql package creates it: `apt-get install postgresql`; or \
         `useradd --system postgres`, or run loadtest as another user)"
            .to_string()
    })?;
    Ok(Some("postgres".into()))
}

#[cfg(not(unix))]
fn run_as_user() -> Result<Option<String>, String> {
    Ok(None)
}

#[cfg(unix)]
fn user_ids(name: &str) -> Option<(u32, u32)> {
    let c_name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid C string; the result is read at once, before any other getpw* call.
    let entry = unsafe { libc::getpwnam(c_name.as_ptr()) };
    if entry.is_null() {
        return None;
    }
    // SAFETY: non-null, points to libc's static passwd record.
    let entry = unsafe { &*entry };
    Some((entry.pw_uid, entry.pw_gid))
}

#[cfg(unix)]
fn give_to(user: &str, path: &Path) -> Result<(), String> {
    let (uid, gid) = user_ids(user).ok_or_else(|| format!("no user {user}"))?;
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .map_err(|e| format!("cannot give {} to {user}: {e}", path.display()))
}

#[cfg(not(unix))]
fn give_to(_user: &str, _path: &Path) -> Result<(), String> {
    Ok(())
}

fn free_port() -> Result<u16, String> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").map_err(|e| e.to_string())?;
    Ok(listener.local_addr().map_err(|e| e.to_string())?.port())
}

/// Runs one ingestion phase against PostgreSQL, shaped like [`crate::bench::run_ingest`]:
/// `options.incubators` client threads, each with its own connection and its own simulated
/// instrument's images (`tag`-NN, the same keys and frames), one at a time per connection.
/// Open loop, latency counts from each image's intended send time; otherwise as fast as the
/// commits return, latency from the send.
pub fn run_pg_ingest(server: &PgServer, options: &IngestOptions, tag: &str) -> IngestResult {
    let frame_bytes = options.frames.iter().map(|f| f.len() as u64).sum::<u64>()
        / options.frames.len().max(1) as u64;
    let images_total = options.bytes_max / frame_bytes.max(1);
    let per_client = (images_total / options.incubators.max(1) as u64).max(1);
    let start_ms = crate::client::now_ms() - 86_400_000;
    let gate = Arc::new(StartGate::new(options.incubators));
    let threads: Vec<_> = (0..options.incubators)
        .map(|n| {
            let options = options.clone();
            let serial = format!("{tag}-{n:02}");
            let client = server.connect();
            let gate = gate.clone();
            std::thread::spawn(move || -> (ClientStats, Option<String>) {
                let ready = client.and_then(|mut client| {
                    let statement = client.prepare(INSERT).map_err(|e| e.to_string())?;
                    Ok((client, statement))
                });
                // Every connection is open and its statement prepared before the start.
                let begin = gate.wait();
                let (mut client, statement) = match ready {
                    Ok(ready) => ready,
                    Err(error) => return (ClientStats::default(), Some(error)),
                };
                let spec = options.model.spec();
                let per_cycle = spec.positions() as u64 * spec.focal_planes.len() as u64;
                let cycles = per_client.div_ceil(per_cycle.max(1)) as u32;
                let workload = Workload::full(&serial, options.model, cycles.max(1), start_ms);
                let pacing = match options.offered_per_s {
                    Some(total) => Pacing::OpenLoop {
                        start: begin,
                        interval: Duration::from_secs_f64(options.incubators as f64 / total),
                    },
                    None => Pacing::Window,
                };
                let deadline = begin.max(Instant::now()) + options.duration;
                insert_images(
                    &mut client,
                    &statement,
                    &workload,
                    per_client.min(workload.len()),
                    &options.frames,
                    pacing,
                    deadline,
                )
            })
        })
        .collect();
    let mut latency = LatencyRecorder::new();
    let mut result = crate::bench::empty_result();
    result.incubators = options.incubators;
    result.offered_per_s = options.offered_per_s;
    let mut elapsed_max = Duration::ZERO;
    for thread in threads {
        let (stats, error) = thread.join().expect("PostgreSQL client thread");
        latency.merge(&stats.latency);
        result.images_acked += stats.committed;
        result.bytes_acked += stats.bytes_committed;
        elapsed_max = elapsed_max.max(stats.elapsed);
        for (name, count) in stats.errors {
            *result.errors.entry(name).or_default() += count;
        }
        if let Some(error) = error {
            result.connection_errors.push(error);
        }
    }
    result.elapsed_s = elapsed_max.as_secs_f64().max(1e-9);
    result.images_per_s = result.images_acked as f64 / result.elapsed_s;
    result.megabytes_per_s = result.bytes_acked as f64 / result.elapsed_s / 1e6;
    result.ack_latency = latency.summary();
    result
}

#[derive(Default)]
struct ClientStats {
    committed: u64,
    bytes_committed: u64,
    errors: BTreeMap<String, u64>,
    latency: LatencyRecorder,
    elapsed: Duration,
}

/// Inserts workload images `0..count`, one transaction each, until `deadline`. A lost
/// connection ends the run with the stats so far and the error.
fn insert_images(
    client: &mut postgres::Client,
    statement: &postgres::Statement,
    workload: &Workload,
    count: u64,
    frames: &[bytes::Bytes],
    pacing: Pacing,
    deadline: Instant,
) -> (ClientStats, Option<String>) {
    let started = Instant::now();
    let mut stats = ClientStats::default();
    for index in 0..count {
        let due = match pacing {
            Pacing::OpenLoop { start, interval } => start + interval * index as u32,
            Pacing::Window => Instant::now(),
        };
        if due >= deadline || Instant::now() >= deadline {
            break;
        }
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let spec = workload.image(index);
        let frame = &frames[(index % frames.len() as u64) as usize];
        let measured_from = match pacing {
            Pacing::OpenLoop { .. } => due,
            Pacing::Window => Instant::now(),
        };
        let outcome = client.execute(
            statement,
            &[
                &spec.dish_id,
                &(spec.well as i32),
                &spec.focal_plane,
                &spec.acquired_at_ms,
                &frame.as_ref(),
            ],
        );
        match outcome {
            Ok(_) => {
                stats
                    .latency
                    .record(Instant::now().saturating_duration_since(measured_from));
                stats.committed += 1;
                stats.bytes_committed += frame.len() as u64;
            }
            Err(error) if error.is_closed() || error.code().is_none() => {
                stats.elapsed = started.elapsed();
                return (stats, Some(error.to_string()));
            }
            Err(error) => {
                let code = error
                    .code()
                    .map(|c| c.code().to_string())
                    .unwrap_or_default();
                *stats.errors.entry(format!("sqlstate_{code}")).or_default() += 1;
            }
        }
    }
    stats.elapsed = started.elapsed();
    (stats, None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"").unwrap();
    }

    #[test]
    fn missing_binaries_name_the_install_command() {
        let root = tempfile::tempdir().unwrap();
        // A client-only install: psql but no server programs.
        touch(&root.path().join("15/bin/psql"));
        let error = find_binaries(root.path(), Some("".as_ref())).unwrap_err();
        assert!(error.contains("apt-get install postgresql"), "{error}");
    }

    #[test]
    fn highest_debian_version_wins_over_path() {
        let root = tempfile::tempdir().unwrap();
        for version in ["9.6", "13", "15"] {
            for program in ["initdb", "pg_ctl", "postgres"] {
                touch(&root.path().join(format!("{version}/bin/{program}")));
            }
        }
        // 16 has only a client.
        touch(&root.path().join("16/bin/psql"));
        let path_dir = tempfile::tempdir().unwrap();
        for program in ["initdb", "pg_ctl", "postgres"] {
            touch(&path_dir.path().join(program));
        }
        let found = find_binaries(root.path(), Some(path_dir.path().as_os_str())).unwrap();
        assert_eq!(found.initdb, root.path().join("15/bin/initdb"));
        // Without Debian's directories, PATH is used.
        let empty = tempfile::tempdir().unwrap();
        let found = find_binaries(empty.path(), Some(path_dir.path().as_os_str())).unwrap();
        assert_eq!(found.postgres, path_dir.path().join("postgres"));
    }

    #[test]
    fn configuration_is_durable_and_on_loopback() {
        let settings = PgSettings {
            shared_buffers_mb: 256,
            max_connections: 100,
            extra: vec![parse_setting("max_wal_size=8GB").unwrap()],
        };
        let text = settings.config_lines(5999, Path::new("/tmp/x/socket"));
        for line in [
            "listen_addresses = '127.0.0.1'",
            "port = 5999",
            "unix_socket_directories = '/tmp/x/socket'",
            "fsync = on",
            "synchronous_commit = on",
            "full_page_writes = on",
            "shared_buffers = 256MB",
            "max_wal_size = '8GB'",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in {text}");
        }
        assert!(parse_setting("fsync").is_err());
        assert!(parse_setting("a b=1").is_err());
        assert!(parse_setting("x=1\nfsync=off").is_err());
    }
}
