//! The server's log: lines on standard error, at a level that `[Server] log_level` sets and a
//! reload (SIGHUP) may change while the server runs.
//!
//! Under systemd (`JOURNAL_STREAM` names standard error's stream) the lines carry no time of
//! their own and no colours: the journal stamps every line itself.

use std::sync::OnceLock;
use tracing_subscriber::filter::LevelFilter;
use tracing_subscriber::reload;

type Handle = reload::Handle<LevelFilter, tracing_subscriber::Registry>;

static LEVEL: OnceLock<Handle> = OnceLock::new();

/// The log levels `[Server] log_level` accepts, least verbose first.
pub const LEVELS: [&str; 5] = ["error", "warn", "info", "debug", "trace"];

fn parse(level: &str) -> Result<LevelFilter, String> {
    let level: tracing::Level = level
        .parse()
        .map_err(|_| format!("unknown log level {level:?}; use {}", LEVELS.join(", ")))?;
    Ok(LevelFilter::from_level(level))
}

/// True when standard error is the systemd journal's stream.
#[cfg(unix)]
pub fn to_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let stream = stream.to_string_lossy().into_owned();
    let Some((device, inode)) = stream.split_once(':') else {
        return false;
    };
    // JOURNAL_STREAM is "device:inode" of the stream; standard error may have been
    // redirected since (then it is not the journal).
    let Ok(stderr) = std::fs::metadata("/dev/stderr") else {
        return false;
    };
    device.parse::<u64>().ok() == Some(stderr.dev())
        && inode.parse::<u64>().ok() == Some(stderr.ino())
}

#[cfg(not(unix))]
pub fn to_journal() -> bool {
    false
}

/// Installs the log at `level`; once per process.
pub fn init(level: &str) -> Result<(), String> {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let (filter, handle) = reload::Layer::new(parse(level)?);
    let journal = to_journal();
    let lines = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(!journal && std::io::stderr().is_terminal())
        .with_target(false);
    let lines: Box<dyn Layer<tracing_subscriber::Registry> + Send + Sync> = if journal {
        lines.without_time().boxed()
    } else {
        lines.boxed()
    };
    // The level filters the lines only: the web interface's Warnings page gets WARN and
    // ERROR whatever the log level.
    let warnings = crate::warnings::layer().with_filter(LevelFilter::WARN);
    tracing_subscriber::registry()
        .with(lines.with_filter(filter))
        .with(warnings)
        .try_init()
        .map_err(|error| format!("cannot install the log: {error}"))?;
    let _ = LEVEL.set(handle);
    Ok(())
}

/// Changes the level of the running log (a reload); the level in force before.
pub fn set_level(level: &str) -> Result<String, String> {
    let filter = parse(level)?;
    let handle = LEVEL.get().ok_or("the log is not installed")?;
    let mut before = String::new();
    handle
        .modify(|current| {
            before = current.to_string().to_lowercase();
            *current = filter;
        })
        .map_err(|error| format!("cannot change the log level: {error}"))?;
    Ok(before)
}
