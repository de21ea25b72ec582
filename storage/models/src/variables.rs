//! Morphokinetic variables: an embryo's timing events and the intervals derived from them.
//!
//! # Events
//!
//! Timing events are hours after t0, the dish's insemination (IVF) or injection (ICSI) time,
//! as the annotations give them ([`EVENTS`]). The nomenclature is that of Ciray et al.,
//! "Proposed guidelines on the nomenclature and annotation of dynamic human embryo
//! monitoring by a time-lapse user group", Human Reproduction 2014, 29(12):2650-2660.
//!
//! # Derived variables ([`DERIVED`])
//!
//! | Name | Definition | Meaning |
//! |---|---|---|
//! | `cc1` | t2 - tPB2 | first cell cycle |
//! | `cc2` | t3 - t2 | second cell cycle (of the first blastomere) |
//! | `cc3` | t5 - t3 | third cell cycle |
//! | `s2` | t4 - t3 | synchrony of the second cleavage |
//! | `s3` | t8 - t5 | synchrony of the third cleavage |
//! | `t5-t2` | t5 - t2 | |
//! | `ECC2` | t4 - t2 | second embryo cell cycle |
//! | `ECC3` | t8 - t4 | third embryo cell cycle |
//! | `VP` | tPNf - tPNa | pronuclei visible (PN duration) |
//! | `dB` | tB - tSB | duration of blastulation |
//!
//! A derived variable is **not available** when an event it needs is not annotated, and when
//! its events are out of order (t3 before t2: a mistaken annotation), never a wrong number.
//! Every value is rounded to 0.01 h (36 s, finer than any acquisition interval), so results
//! computed from the same annotations are the same everywhere.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The timing events, in the order of development.
pub const EVENTS: [&str; 17] = [
    "tPB2", "tPNa", "tPNf", "t2", "t3", "t4", "t5", "t6", "t7", "t8", "t9+", "tSC", "tM", "tSB",
    "tB", "tEB", "tHB",
];

/// The derived variables: (name, later event, earlier event). The value is later - earlier.
pub const DERIVED: [(&str, &str, &str); 10] = [
    ("cc1", "t2", "tPB2"),
    ("cc2", "t3", "t2"),
    ("cc3", "t5", "t3"),
    ("s2", "t4", "t3"),
    ("s3", "t8", "t5"),
    ("t5-t2", "t5", "t2"),
    ("ECC2", "t4", "t2"),
    ("ECC3", "t8", "t4"),
    ("VP", "tPNf", "tPNa"),
    ("dB", "tB", "tSB"),
];

/// Hours after t0 (events) or hours (intervals), or why there is no value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Variable {
    Hours(f64),
    /// Not available: the reason, for a person ("t3 is not annotated").
    NotAvailable(String),
}

impl Variable {
    pub fn hours(&self) -> Option<f64> {
        match self {
            Variable::Hours(hours) => Some(*hours),
            Variable::NotAvailable(_) => None,
        }
    }
}

/// What is known of one embryo: its timing events (hours after t0) and its other
/// annotations (name -> value as text, e.g. `MN4` -> `yes`, `FRAG2CAT` -> `10-20%`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Embryo {
    #[serde(default)]
    pub events: BTreeMap<String, f64>,
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// Rounds hours to 0.01 h.
pub fn round_hours(hours: f64) -> f64 {
    (hours * 100.0).round() / 100.0
}

/// True when `name` is a timing event or a derived variable.
pub fn is_variable(name: &str) -> bool {
    EVENTS.contains(&name) || DERIVED.iter().any(|(derived, _, _)| *derived == name)
}

impl Embryo {
    /// Records timing event `name` (matched to [`EVENTS`] without regard to case: `T2` is
    /// `t2`) at `hours` after t0; a later call for the same event replaces it.
    pub fn set_event(&mut self, name: &str, hours: f64) {
        let name = EVENTS
            .iter()
            .find(|event| event.eq_ignore_ascii_case(name))
            .map_or_else(|| name.to_string(), |event| event.to_string());
        self.events.insert(name, hours);
    }

    /// Records an annotation as the models see it: a timing event (its name is one of
    /// [`EVENTS`], without regard to case, and it has a time) at `hours` after t0, or else a
    /// finding with its value. Feed annotations oldest first: a later one of the same name
    /// replaces an earlier one.
    pub fn add_annotation(&mut self, name: &str, value: &str, hours: Option<f64>) {
        let timing = EVENTS.iter().any(|event| event.eq_ignore_ascii_case(name));
        match hours {
            Some(hours) if timing => self.set_event(name, hours),
            _ => {
                self.annotations.insert(name.to_string(), value.to_string());
            }
        }
    }

    /// The value of finding `name` (without regard to case, the latest added).
    pub fn annotation(&self, name: &str) -> Option<&str> {
        if let Some(value) = self.annotations.get(name) {
            return Some(value);
        }
        self.annotations
            .iter()
            .find(|(key, _)| key.trim().eq_ignore_ascii_case(name.trim()))
            .map(|(_, value)| value.as_str())
    }

    /// The variable `name`: a timing event as annotated, or a derived interval.
    pub fn variable(&self, name: &str) -> Variable {
        if let Some((_, later, earlier)) = DERIVED.iter().find(|(derived, _, _)| *derived == name) {
            return match (self.event(later), self.event(earlier)) {
                (Variable::Hours(later_h), Variable::Hours(earlier_h)) if later_h >= earlier_h => {
                    Variable::Hours(round_hours(later_h - earlier_h))
                }
                (Variable::Hours(_), Variable::Hours(_)) => Variable::NotAvailable(format!(
                    "{later} is before {earlier}: the annotations contradict each other"
                )),
                (Variable::NotAvailable(reason), _) | (_, Variable::NotAvailable(reason)) => {
                    Variable::NotAvailable(reason)
                }
            };
        }
        self.event(name)
    }

    fn event(&self, name: &str) -> Variable {
        match self.events.get(name) {
            Some(hours) if hours.is_finite() && *hours >= 0.0 => {
                Variable::Hours(round_hours(*hours))
            }
            Some(hours) => Variable::NotAvailable(format!(
                "{name} is {hours} h, not a time after insemination"
            )),
            None => Variable::NotAvailable(format!("{name} is not annotated")),
        }
    }

    /// Every derived variable, by name.
    pub fn derived(&self) -> BTreeMap<&'static str, Variable> {
        DERIVED
            .iter()
            .map(|(name, _, _)| (*name, self.variable(name)))
            .collect()
    }
}
