//! `es-models`: an embryo's morphokinetic variables and the clinic's selection models.
//!
//! Pure computation, no I/O and no clock: [`variables`] derives the intervals the field uses
//! from an embryo's timing annotations (never a number when an input is missing), and
//! [`model`] parses, checks and evaluates the models a clinic authors (hierarchical, additive,
//! multiplicative, each with exclusion rules), and [`activity`] computes the blastomere-activity
//! curve from consecutive frames and the cleavage times its peaks suggest. The server stores
//! models and results and
//! decides when to evaluate; the same model document gives the same results on every server.
//! The document format is in `docs/models.md`; `tests/cases.json` holds hand-computed cases.

pub mod activity;
pub mod model;
pub mod synthetic;
pub mod variables;

pub use model::{Evaluation, Model, ModelError, Outcome, FORMAT};
pub use variables::{Embryo, Variable, DERIVED, EVENTS};
