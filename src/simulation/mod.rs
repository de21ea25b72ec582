//! Deterministic simulation of the server's real session cores (tests only).
//!
//! The harness (seeds, byte pipes, totals) is es-proto's (`es_proto::simulation`); the worlds
//! here run esserver's own cores against the real storage writer on a temporary database, so
//! a bug in the server's deduplication, enrolment or answer bookkeeping shows up as a broken
//! invariant with the seed that replays it. See `docs/reliability.md`, section
//! "Deterministic simulation".

mod incubator;
