//! Deterministic simulation (tests only): the harness every simulated world shares.
//!
//! One seeded generator drives a whole world: a client and a server, a byte pipe in each
//! direction that delivers random-sized pieces, stalls and drops the connection, a storage
//! that completes writes after random delays and in any order, and a client that reconnects
//! and resends what was never answered. After a bounded number of faulty steps a calm phase
//! (no faults) must bring every item home. The invariants are checked at every step and at
//! the end; a failure names its seed and step, and `ESSERVER_SIM_SEED=<seed>` replays that
//! one seed with a trace of every event.
//!
//! The worlds run the server's real incubator and viewer cores against the real storage
//! writer, so they live with them in `esserver` (`src/simulation/`) and use this harness.
//! See `docs/reliability.md`, section "Deterministic simulation".

use std::time::{SystemTime, UNIX_EPOCH};

use bytes::BytesMut;

use crate::fuzzing::Noise;

/// Seeds run on every test run, before the random ones.
pub const FIXED_SEEDS: [u64; 8] = [1, 2, 3, 42, 0xdead_beef, 0x5eed, 1 << 40, u64::MAX];

/// Random seeds added to the fixed ones on every run (`ESSERVER_SIM_SEEDS` overrides).
pub const RANDOM_SEEDS_DEFAULT: usize = 192;

/// The environment variable that replays one seed (with a trace).
pub const SEED_VARIABLE: &str = "ESSERVER_SIM_SEED";

/// The seeds of this run: the one of [`SEED_VARIABLE`] alone (and `true`: trace it), or the
/// fixed ones and `random` random ones (`ESSERVER_SIM_SEEDS` overrides) drawn from the clock.
fn seeds(name: &str, random: usize) -> (Vec<u64>, bool) {
    if let Ok(value) = std::env::var(SEED_VARIABLE) {
        let value = value.trim();
        let seed = value
            .strip_prefix("0x")
            .map(|hex| u64::from_str_radix(hex, 16))
            .unwrap_or_else(|| value.parse())
            .unwrap_or_else(|_| panic!("{SEED_VARIABLE}={value} is not a number"));
        return (vec![seed], true);
    }
    let count = std::env::var("ESSERVER_SIM_SEEDS")
        .ok()
        .and_then(|value| value.parse().ok())
        .unwrap_or(random);
    let clock = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos() as u64);
    let mut noise = Noise::new(clock ^ name.len() as u64);
    let mut seeds = FIXED_SEEDS.to_vec();
    seeds.extend((0..count).map(|_| noise.next_u64()));
    (seeds, false)
}

/// Runs `world(seed, trace)` for every seed of this run (the fixed ones and `random` random
/// ones); a panic is reported with its seed and the command that replays it: test `test`
/// (its path in the crate) of package `package`.
pub fn run_seeds(
    name: &str,
    package: &str,
    test: &str,
    random: usize,
    world: fn(u64, bool) -> Totals,
) -> Totals {
    let (seeds, trace) = seeds(name, random);
    let started = std::time::Instant::now();
    let mut totals = Totals::default();
    for seed in &seeds {
        let seed = *seed;
        match std::panic::catch_unwind(|| world(seed, trace)) {
            Ok(run) => totals.add(&run),
            Err(panic) => {
                let text = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                panic!(
                    "{name} simulation failed with seed {seed}: {text}\nreplay: \
                     {SEED_VARIABLE}={seed} cargo nextest run --release -p {package} -E \
                     'test({test})' --no-capture"
                );
            }
        }
    }
    eprintln!(
        "{name} simulation: {} seeds, {} steps, {} drops, {} answers lost, {} duplicates, \
         {} partial pieces, {} items acknowledged, {:?}",
        seeds.len(),
        totals.steps,
        totals.drops,
        totals.lost_answers,
        totals.duplicates,
        totals.partial_pieces,
        totals.acknowledged,
        started.elapsed()
    );
    totals
}

/// What the runs did, so the test can check that the faults really happened.
#[derive(Debug, Default, Clone, Copy)]
pub struct Totals {
    pub steps: u64,
    pub drops: u64,
    pub acknowledged: u64,
    /// Writes that reached storage after their connection was gone (answer lost).
    pub lost_answers: u64,
    /// Answers that said "already stored" (a resend or a deliberate duplicate).
    pub duplicates: u64,
    /// Partial deliveries: a piece that ended inside a frame.
    pub partial_pieces: u64,
    /// HELLOs refused (`enrolment_pending`: the serial waits for an administrator;
    /// `enrolment_in_progress`: an older connection still holds an issued secret), each
    /// followed by a backoff and a new connection.
    pub refused_hellos: u64,
}

impl Totals {
    pub fn add(&mut self, other: &Totals) {
        self.steps += other.steps;
        self.drops += other.drops;
        self.acknowledged += other.acknowledged;
        self.lost_answers += other.lost_answers;
        self.duplicates += other.duplicates;
        self.partial_pieces += other.partial_pieces;
        self.refused_hellos += other.refused_hellos;
    }
}

/// One direction of a connection: bytes written and not yet read by the other side.
#[derive(Debug, Default)]
pub struct Pipe {
    /// In transit (written by the sender, not yet delivered).
    pub wire: BytesMut,
    /// Delivered and not yet consumed by the receiver's session.
    pub inbox: BytesMut,
    /// The largest piece one delivery moves (a slow peer or small socket buffers).
    piece_max: usize,
    /// No delivery before this step (a stalled peer).
    stalled_until: u64,
}

impl Pipe {
    pub fn new(noise: &mut Noise) -> Pipe {
        Pipe {
            piece_max: [1, 3, 7, 16, 64, 512, 1 << 16][noise.below(7)],
            ..Pipe::default()
        }
    }

    /// Moves a random prefix of what is in transit to the receiver; true when it ended
    /// inside the transit bytes (a partial read). `calm`: everything at once.
    pub fn deliver(&mut self, noise: &mut Noise, step: u64, calm: bool) -> bool {
        if self.wire.is_empty() {
            return false;
        }
        if calm {
            let all = self.wire.split();
            self.inbox.extend_from_slice(&all);
            return false;
        }
        if step < self.stalled_until {
            return false;
        }
        if noise.below(40) == 0 {
            self.stalled_until = step + 1 + noise.below(60) as u64;
            return false;
        }
        let n = noise.below(self.piece_max.min(self.wire.len()) + 1);
        let piece = self.wire.split_to(n);
        self.inbox.extend_from_slice(&piece);
        !self.wire.is_empty() && n > 0
    }
}
