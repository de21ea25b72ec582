//! What a run must undo when it is interrupted (Ctrl-C, SIGTERM): the servers it started and
//! the scratch directories it made. Drop guards undo them when a run ends or fails; a signal
//! skips every drop, so each guard also registers its undo here, and [`install`] runs them
//! all when a signal arrives, then exits with status 130.

use parking_lot::Mutex;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

type Action = Box<dyn FnOnce() + Send>;

static ACTIONS: Mutex<Vec<(u64, Action)>> = Mutex::new(Vec::new());
static NEXT: AtomicU64 = AtomicU64::new(1);

/// Keeps an undo registered; dropping it (the normal end) forgets the undo.
#[derive(Debug)]
pub struct Registration(u64);

impl Drop for Registration {
    fn drop(&mut self) {
        ACTIONS.lock().retain(|(id, _)| *id != self.0);
    }
}

/// Registers `action`, run if the process is interrupted while the registration lives.
pub fn on_interrupt(action: impl FnOnce() + Send + 'static) -> Registration {
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    ACTIONS.lock().push((id, Box::new(action)));
    Registration(id)
}

/// Removes `dir` and everything in it if the process is interrupted.
pub fn remove_on_interrupt(dir: PathBuf) -> Registration {
    on_interrupt(move || {
        let _ = std::fs::remove_dir_all(&dir);
    })
}

/// Runs every registered undo, newest first (servers before the directories they write).
pub fn run_all() {
    let actions: Vec<(u64, Action)> = std::mem::take(&mut *ACTIONS.lock());
    for (_, action) in actions.into_iter().rev() {
        action();
    }
}

/// Waits for SIGINT or SIGTERM on a thread of its own; then undoes what is registered and
/// exits with 130. Call once, at the start of the binary.
#[cfg(unix)]
pub fn install() -> std::io::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGINT, SIGTERM])?;
    std::thread::Builder::new()
        .name("loadtest-signals".into())
        .spawn(move || {
            if let Some(signal) = signals.forever().next() {
                eprintln!(
                    "loadtest: interrupted (signal {signal}); stopping the servers it started and deleting its scratch data"
                );
                run_all();
                std::process::exit(130);
            }
        })?;
    Ok(())
}

#[cfg(not(unix))]
pub fn install() -> std::io::Result<()> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_undos_run_newest_first_and_dropped_ones_not_at_all() {
        let order = std::sync::Arc::new(Mutex::new(Vec::new()));
        let push = |n: u32| {
            let order = order.clone();
            move || order.lock().push(n)
        };
        let first = on_interrupt(push(1));
        let second = on_interrupt(push(2));
        let dropped = on_interrupt(push(3));
        drop(dropped);
        let dir = tempfile::tempdir().unwrap().keep();
        std::fs::write(dir.join("f"), b"x").unwrap();
        let removal = remove_on_interrupt(dir.clone());
        run_all();
        assert_eq!(*order.lock(), vec![2, 1]);
        assert!(!dir.exists());
        drop((first, second, removal));
        assert!(ACTIONS.lock().is_empty());
    }
}
