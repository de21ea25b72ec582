//! Selection models as a clinic authors them, and their evaluation on one embryo.
//!
//! A model is a JSON document ([`FORMAT`], schema in `docs/models.md`) of one of three kinds:
//!
//! - **hierarchical**: a decision tree of conditions on variables and annotations whose
//!   leaves are categories (`A+`, `A-`, ..., `E`), after Meseguer et al., Human Reproduction
//!   2011, 26(10):2658-2671;
//! - **additive**: score = base + the sum of its terms, each term a value per band of a
//!   variable (points for "t5 in 48.8-56.6 h") or a coefficient times the variable;
//! - **multiplicative**: score = base x the product of its factors, each a value per band
//!   (relative implantation rates per interval, say).
//!
//! Each may have exclusion rules, checked first in order: the first that holds decides the
//! result (a category or a score) and names itself as the rule.
//!
//! # Missing inputs
//!
//! A model never guesses. A condition or term on a variable that is not available makes the
//! result **not available**, naming the variable and why (the one exception: a tree branch
//! not taken does not need its variables). A condition on an annotation that is not set is
//! false (`equals`, `one_of`) or answers `present: false`: an annotation not made is a
//! finding not made.
//!
//! Scores are rounded to 4 decimals, band edges are `at_least` (inclusive) and `below`
//! (exclusive), and everything is checked against the bounds below before a model is used.

use crate::variables::{is_variable, Embryo, Variable, EVENTS};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The `format` of a model document.
pub const FORMAT: &str = "esserver-model/1";

/// Bounds of a model document.
pub mod limits {
    pub const DOCUMENT_BYTES_MAX: usize = 256 * 1024;
    pub const NAME_BYTES_MAX: usize = 128;
    pub const DESCRIPTION_BYTES_MAX: usize = 4096;
    pub const TREE_NODES_MAX: usize = 512;
    pub const TREE_DEPTH_MAX: usize = 32;
    pub const TERMS_MAX: usize = 64;
    pub const BANDS_PER_TERM_MAX: usize = 32;
    pub const EXCLUSIONS_MAX: usize = 64;
    pub const CATEGORY_BYTES_MAX: usize = 32;
    pub const ANNOTATION_NAME_BYTES_MAX: usize = 64;
    pub const ANNOTATION_VALUE_BYTES_MAX: usize = 128;
    pub const ONE_OF_VALUES_MAX: usize = 32;
    /// Every number of a document (bounds, values, coefficients, bases, scores) is at most this
    /// in size.
    pub const NUMBER_ABS_MAX: f64 = 1e9;
}

/// A model document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Model {
    pub format: String,
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exclusions: Vec<Exclusion>,
    pub rule: Rule,
}

/// What the model computes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Rule {
    Hierarchical(Node),
    Additive(Terms),
    Multiplicative(Terms),
}

/// A node of a decision tree: a leaf (`category`) or a branch (`if`, `then`, `else`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Node {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    #[serde(rename = "if", default, skip_serializing_if = "Option::is_none")]
    pub condition: Option<Condition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub then: Option<Box<Node>>,
    #[serde(rename = "else", default, skip_serializing_if = "Option::is_none")]
    pub otherwise: Option<Box<Node>>,
}

/// A test on a variable (`at_least` <= value < `below`, either bound may be left out) or on
/// an annotation (`equals`, `one_of` or `present`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variable: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_least: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotation: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub equals: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_of: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub present: Option<bool>,
}

/// An exclusion rule: when `when` holds, the result is `category` (hierarchical models) or
/// `score` (additive and multiplicative ones).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Exclusion {
    pub name: String,
    pub when: Condition,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub score: Option<f64>,
}

/// The terms of an additive or multiplicative model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Terms {
    /// The start of the sum (default 0) or of the product (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<f64>,
    pub terms: Vec<Term>,
}

/// One term: the value of the first band the variable falls in (else `otherwise`, default 0
/// in a sum and 1 in a product), or `coefficient` x the variable.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Term {
    pub variable: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub bands: Vec<Band>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otherwise: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coefficient: Option<f64>,
}

/// `at_least` <= variable < `below` gives `value`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Band {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at_least: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<f64>,
    pub value: f64,
}

/// Why a model document was refused: where (a JSON-path-like location) and what.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid model: {at}: {message}")]
pub struct ModelError {
    pub at: String,
    pub message: String,
}

impl ModelError {
    /// The stable code.
    pub fn code(&self) -> &'static str {
        "invalid_model"
    }

    fn new(at: impl Into<String>, message: impl Into<String>) -> ModelError {
        ModelError {
            at: at.into(),
            message: message.into(),
        }
    }
}

/// What a model gives one embryo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Category(String),
    Score(f64),
    /// Not available: why (the variable missing, or an exclusion that cannot be decided).
    NotAvailable(String),
}

/// The result of a model on one embryo: the outcome, the rule that decided it (for a
/// person), and the variables it used with their values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    pub outcome: Outcome,
    pub rule: String,
    pub variables: BTreeMap<String, f64>,
}

impl Model {
    /// Parses and checks a model document.
    pub fn from_json(bytes: &[u8]) -> Result<Model, ModelError> {
        if bytes.len() > limits::DOCUMENT_BYTES_MAX {
            return Err(ModelError::new(
                "$",
                format!(
                    "the document is {} bytes; at most {} are allowed",
                    bytes.len(),
                    limits::DOCUMENT_BYTES_MAX
                ),
            ));
        }
        let model: Model = serde_json::from_slice(bytes).map_err(|error| {
            ModelError::new(
                format!("line {} column {}", error.line(), error.column()),
                error.to_string(),
            )
        })?;
        model.validate()?;
        Ok(model)
    }

    /// The document, pretty-printed (what `esserver model export` writes).
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a model serialises")
    }

    /// Checks the document against its rules and [`limits`].
    pub fn validate(&self) -> Result<(), ModelError> {
        if self.format != FORMAT {
            return Err(ModelError::new(
                "$.format",
                format!("expected {FORMAT:?}, got {:?}", self.format),
            ));
        }
        text("$.name", &self.name, limits::NAME_BYTES_MAX)?;
        if self.description.len() > limits::DESCRIPTION_BYTES_MAX {
            return Err(ModelError::new(
                "$.description",
                format!("at most {} bytes", limits::DESCRIPTION_BYTES_MAX),
            ));
        }
        if self.exclusions.len() > limits::EXCLUSIONS_MAX {
            return Err(ModelError::new(
                "$.exclusions",
                format!("at most {} exclusions", limits::EXCLUSIONS_MAX),
            ));
        }
        let hierarchical = matches!(self.rule, Rule::Hierarchical(_));
        for (index, exclusion) in self.exclusions.iter().enumerate() {
            let at = format!("$.exclusions[{index}]");
            text(
                &format!("{at}.name"),
                &exclusion.name,
                limits::NAME_BYTES_MAX,
            )?;
            exclusion.when.validate(&format!("{at}.when"))?;
            match (hierarchical, &exclusion.category, exclusion.score) {
                (true, Some(category), None) => {
                    text(
                        &format!("{at}.category"),
                        category,
                        limits::CATEGORY_BYTES_MAX,
                    )?;
                }
                (false, None, Some(score)) => finite(&format!("{at}.score"), score)?,
                (true, _, _) => {
                    return Err(ModelError::new(
                        at,
                        "an exclusion of a hierarchical model gives a category (and no score)",
                    ))
                }
                (false, _, _) => {
                    return Err(ModelError::new(
                        at,
                        "an exclusion of an additive or multiplicative model gives a score (and \
                         no category)",
                    ))
                }
            }
        }
        match &self.rule {
            Rule::Hierarchical(node) => {
                let mut nodes = 0;
                node.validate("$.rule.hierarchical", 1, &mut nodes)
            }
            Rule::Additive(terms) => terms.validate("$.rule.additive"),
            Rule::Multiplicative(terms) => terms.validate("$.rule.multiplicative"),
        }
    }

    /// The kind, as a word.
    pub fn kind(&self) -> &'static str {
        match self.rule {
            Rule::Hierarchical(_) => "hierarchical",
            Rule::Additive(_) => "additive",
            Rule::Multiplicative(_) => "multiplicative",
        }
    }

    /// Applies the model to `embryo`. The model must be valid ([`Model::validate`]).
    pub fn evaluate(&self, embryo: &Embryo) -> Evaluation {
        let mut used = BTreeMap::new();
        // The first exclusion that holds decides, even after one that cannot be decided.
        let mut undecided: Option<(&Exclusion, String)> = None;
        for exclusion in &self.exclusions {
            match exclusion.when.test(embryo, &mut used) {
                Truth::Yes => {
                    let outcome = match (&exclusion.category, exclusion.score) {
                        (Some(category), _) => Outcome::Category(category.clone()),
                        (None, Some(score)) => Outcome::Score(round_score(score)),
                        (None, None) => unreachable!("validated"),
                    };
                    return Evaluation {
                        outcome,
                        rule: format!(
                            "excluded: {} ({})",
                            exclusion.name,
                            exclusion.when.describe()
                        ),
                        variables: used,
                    };
                }
                Truth::No => {}
                Truth::Unknown(reason) => {
                    undecided.get_or_insert((exclusion, reason));
                }
            }
        }
        if let Some((exclusion, reason)) = undecided {
            return Evaluation {
                outcome: Outcome::NotAvailable(reason.clone()),
                rule: format!("exclusion {} cannot be decided: {reason}", exclusion.name),
                variables: used,
            };
        }
        match &self.rule {
            Rule::Hierarchical(node) => node.evaluate(embryo, used),
            Rule::Additive(terms) => terms.evaluate(embryo, used, false),
            Rule::Multiplicative(terms) => terms.evaluate(embryo, used, true),
        }
    }
}

fn text(at: &str, value: &str, bytes_max: usize) -> Result<(), ModelError> {
    if value.trim().is_empty() || value.len() > bytes_max || value.chars().any(char::is_control) {
        return Err(ModelError::new(
            at,
            format!("must be 1 to {bytes_max} bytes of text without control characters"),
        ));
    }
    Ok(())
}

fn finite(at: &str, value: f64) -> Result<(), ModelError> {
    if value.is_finite() && value.abs() <= limits::NUMBER_ABS_MAX {
        Ok(())
    } else {
        Err(ModelError::new(
            at,
            format!("must be a number from -{0} to {0}", limits::NUMBER_ABS_MAX),
        ))
    }
}

fn variable_name(at: &str, name: &str) -> Result<(), ModelError> {
    if is_variable(name) {
        Ok(())
    } else {
        Err(ModelError::new(
            at,
            format!(
                "{name:?} is not a variable; the timing events are {} and the derived ones {}",
                EVENTS.join(", "),
                crate::variables::DERIVED
                    .iter()
                    .map(|(name, _, _)| *name)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        ))
    }
}

fn bounds(at: &str, at_least: Option<f64>, below: Option<f64>) -> Result<(), ModelError> {
    if let Some(low) = at_least {
        finite(&format!("{at}.at_least"), low)?;
    }
    if let Some(high) = below {
        finite(&format!("{at}.below"), high)?;
    }
    if let (Some(low), Some(high)) = (at_least, below) {
        if low >= high {
            return Err(ModelError::new(
                at,
                format!("at_least ({low}) must be below below ({high})"),
            ));
        }
    }
    Ok(())
}

/// Whether a condition holds.
#[derive(Debug, Clone, PartialEq)]
enum Truth {
    Yes,
    No,
    /// It needs a variable that is not available: why.
    Unknown(String),
}

fn in_band(value: f64, at_least: Option<f64>, below: Option<f64>) -> bool {
    at_least.is_none_or(|low| value >= low) && below.is_none_or(|high| value < high)
}

fn band_text(at_least: Option<f64>, below: Option<f64>) -> String {
    match (at_least, below) {
        (Some(low), Some(high)) => format!("in [{low}, {high})"),
        (Some(low), None) => format!(">= {low}"),
        (None, Some(high)) => format!("< {high}"),
        (None, None) => "any value".into(),
    }
}

impl Condition {
    fn validate(&self, at: &str) -> Result<(), ModelError> {
        match (&self.variable, &self.annotation) {
            (Some(variable), None) => {
                variable_name(&format!("{at}.variable"), variable)?;
                if self.equals.is_some() || self.one_of.is_some() || self.present.is_some() {
                    return Err(ModelError::new(
                        at,
                        "a condition on a variable takes at_least and/or below",
                    ));
                }
                if self.at_least.is_none() && self.below.is_none() {
                    return Err(ModelError::new(at, "give at_least, below or both"));
                }
                bounds(at, self.at_least, self.below)
            }
            (None, Some(annotation)) => {
                text(
                    &format!("{at}.annotation"),
                    annotation,
                    limits::ANNOTATION_NAME_BYTES_MAX,
                )?;
                if self.at_least.is_some() || self.below.is_some() {
                    return Err(ModelError::new(
                        at,
                        "a condition on an annotation takes equals, one_of or present",
                    ));
                }
                match (&self.equals, &self.one_of, self.present) {
                    (Some(value), None, None) => text(
                        &format!("{at}.equals"),
                        value,
                        limits::ANNOTATION_VALUE_BYTES_MAX,
                    ),
                    (None, Some(values), None) => {
                        if values.is_empty() || values.len() > limits::ONE_OF_VALUES_MAX {
                            return Err(ModelError::new(
                                format!("{at}.one_of"),
                                format!("1 to {} values", limits::ONE_OF_VALUES_MAX),
                            ));
                        }
                        for (index, value) in values.iter().enumerate() {
                            text(
                                &format!("{at}.one_of[{index}]"),
                                value,
                                limits::ANNOTATION_VALUE_BYTES_MAX,
                            )?;
                        }
                        Ok(())
                    }
                    (None, None, Some(_)) => Ok(()),
                    _ => Err(ModelError::new(
                        at,
                        "give exactly one of equals, one_of and present",
                    )),
                }
            }
            _ => Err(ModelError::new(
                at,
                "a condition names exactly one variable or one annotation",
            )),
        }
    }

    fn test(&self, embryo: &Embryo, used: &mut BTreeMap<String, f64>) -> Truth {
        if let Some(name) = &self.variable {
            return match embryo.variable(name) {
                Variable::Hours(value) => {
                    used.insert(name.clone(), value);
                    if in_band(value, self.at_least, self.below) {
                        Truth::Yes
                    } else {
                        Truth::No
                    }
                }
                Variable::NotAvailable(reason) => Truth::Unknown(format!("{name}: {reason}")),
            };
        }
        // Names and values are compared trimmed and without regard to case (`MN4` = `mn4`,
        // `Yes` = `yes`).
        let name = self.annotation.as_deref().unwrap_or_default();
        let value = embryo.annotation(name);
        let same = |a: &str, b: &str| a.trim().eq_ignore_ascii_case(b.trim());
        let holds = match (&self.equals, &self.one_of, self.present) {
            (Some(expected), _, _) => value.is_some_and(|v| same(v, expected)),
            (_, Some(values), _) => value.is_some_and(|v| values.iter().any(|x| same(v, x))),
            (_, _, Some(present)) => value.is_some() == present,
            _ => false,
        };
        if holds {
            Truth::Yes
        } else {
            Truth::No
        }
    }

    fn describe(&self) -> String {
        if let Some(name) = &self.variable {
            return format!("{name} {}", band_text(self.at_least, self.below));
        }
        let name = self.annotation.as_deref().unwrap_or_default();
        match (&self.equals, &self.one_of, self.present) {
            (Some(value), _, _) => format!("{name} = {value}"),
            (_, Some(values), _) => format!("{name} one of {}", values.join(", ")),
            (_, _, Some(true)) => format!("{name} annotated"),
            _ => format!("{name} not annotated"),
        }
    }
}

impl Node {
    fn validate(&self, at: &str, depth: usize, nodes: &mut usize) -> Result<(), ModelError> {
        *nodes += 1;
        if *nodes > limits::TREE_NODES_MAX {
            return Err(ModelError::new(
                at,
                format!("the tree has more than {} nodes", limits::TREE_NODES_MAX),
            ));
        }
        if depth > limits::TREE_DEPTH_MAX {
            return Err(ModelError::new(
                at,
                format!("the tree is deeper than {}", limits::TREE_DEPTH_MAX),
            ));
        }
        match (&self.category, &self.condition, &self.then, &self.otherwise) {
            (Some(category), None, None, None) => text(
                &format!("{at}.category"),
                category,
                limits::CATEGORY_BYTES_MAX,
            ),
            (None, Some(condition), Some(then), Some(otherwise)) => {
                condition.validate(&format!("{at}.if"))?;
                then.validate(&format!("{at}.then"), depth + 1, nodes)?;
                otherwise.validate(&format!("{at}.else"), depth + 1, nodes)
            }
            _ => Err(ModelError::new(
                at,
                "a node is a leaf ({\"category\": ...}) or a branch (if, then and else)",
            )),
        }
    }

    fn evaluate(&self, embryo: &Embryo, mut used: BTreeMap<String, f64>) -> Evaluation {
        let mut node = self;
        let mut path = Vec::new();
        loop {
            if let Some(category) = &node.category {
                path.push(category.clone());
                return Evaluation {
                    outcome: Outcome::Category(category.clone()),
                    rule: path.join(" -> "),
                    variables: used,
                };
            }
            let (Some(condition), Some(then), Some(otherwise)) =
                (&node.condition, &node.then, &node.otherwise)
            else {
                unreachable!("validated");
            };
            match condition.test(embryo, &mut used) {
                Truth::Yes => {
                    path.push(condition.describe());
                    node = then;
                }
                Truth::No => {
                    path.push(format!("not {}", condition.describe()));
                    node = otherwise;
                }
                Truth::Unknown(reason) => {
                    path.push(format!("{}?", condition.describe()));
                    return Evaluation {
                        outcome: Outcome::NotAvailable(reason),
                        rule: path.join(" -> "),
                        variables: used,
                    };
                }
            }
        }
    }
}

impl Terms {
    fn validate(&self, at: &str) -> Result<(), ModelError> {
        if let Some(base) = self.base {
            finite(&format!("{at}.base"), base)?;
        }
        if self.terms.is_empty() || self.terms.len() > limits::TERMS_MAX {
            return Err(ModelError::new(
                format!("{at}.terms"),
                format!("1 to {} terms", limits::TERMS_MAX),
            ));
        }
        for (index, term) in self.terms.iter().enumerate() {
            let at = format!("{at}.terms[{index}]");
            variable_name(&format!("{at}.variable"), &term.variable)?;
            match (term.bands.is_empty(), term.coefficient) {
                (false, None) => {
                    if term.bands.len() > limits::BANDS_PER_TERM_MAX {
                        return Err(ModelError::new(
                            format!("{at}.bands"),
                            format!("at most {} bands", limits::BANDS_PER_TERM_MAX),
                        ));
                    }
                    for (band_index, band) in term.bands.iter().enumerate() {
                        let at = format!("{at}.bands[{band_index}]");
                        bounds(&at, band.at_least, band.below)?;
                        finite(&format!("{at}.value"), band.value)?;
                    }
                    if let Some(otherwise) = term.otherwise {
                        finite(&format!("{at}.otherwise"), otherwise)?;
                    }
                }
                (true, Some(coefficient)) => {
                    finite(&format!("{at}.coefficient"), coefficient)?;
                    if term.otherwise.is_some() {
                        return Err(ModelError::new(
                            at,
                            "a coefficient term has no otherwise (it applies to every value)",
                        ));
                    }
                }
                _ => {
                    return Err(ModelError::new(
                        at,
                        "a term has bands or a coefficient (one of them)",
                    ))
                }
            }
        }
        Ok(())
    }

    fn evaluate(
        &self,
        embryo: &Embryo,
        mut used: BTreeMap<String, f64>,
        product: bool,
    ) -> Evaluation {
        let (identity, operator) = if product { (1.0, " x ") } else { (0.0, " + ") };
        let mut result = self.base.unwrap_or(identity);
        let mut parts = vec![format!("base {}", self.base.unwrap_or(identity))];
        for term in &self.terms {
            let value = match embryo.variable(&term.variable) {
                Variable::Hours(value) => value,
                Variable::NotAvailable(reason) => {
                    return Evaluation {
                        outcome: Outcome::NotAvailable(format!("{}: {reason}", term.variable)),
                        rule: format!("{} is needed", term.variable),
                        variables: used,
                    }
                }
            };
            used.insert(term.variable.clone(), value);
            let (contribution, how) = match term.coefficient {
                Some(coefficient) => (
                    coefficient * value,
                    format!("{coefficient} x {}", term.variable),
                ),
                None => match term
                    .bands
                    .iter()
                    .find(|band| in_band(value, band.at_least, band.below))
                {
                    Some(band) => (
                        band.value,
                        format!("{} {}", term.variable, band_text(band.at_least, band.below)),
                    ),
                    None => (
                        term.otherwise.unwrap_or(identity),
                        format!("{} in no band", term.variable),
                    ),
                },
            };
            if product {
                result *= contribution;
            } else {
                result += contribution;
            }
            parts.push(format!("{} ({how})", round_score(contribution)));
        }
        let score = round_score(result);
        if !score.is_finite() {
            return Evaluation {
                outcome: Outcome::NotAvailable(format!(
                    "the score is not a finite number ({})",
                    parts.join(operator)
                )),
                rule: "the terms overflow".into(),
                variables: used,
            };
        }
        Evaluation {
            outcome: Outcome::Score(score),
            rule: format!("{} = {score}", parts.join(operator)),
            variables: used,
        }
    }
}

/// Rounds a score to 4 decimals (and -0 to 0).
pub fn round_score(score: f64) -> f64 {
    (score * 10_000.0).round() / 10_000.0 + 0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Model, ModelError> {
        Model::from_json(text.as_bytes())
    }

    const LEAF: &str = r#"{"category": "A"}"#;

    fn hierarchical(tree: &str) -> String {
        format!(
            r#"{{"format": "esserver-model/1", "name": "m", "rule": {{"hierarchical": {tree}}}}}"#
        )
    }

    #[test]
    fn bad_documents_are_refused_saying_where_and_why() {
        let cases = [
            (
                r#"{"format": "esserver-model/2", "name": "m", "rule": {"hierarchical": {"category": "A"}}}"#.to_string(),
                "$.format",
            ),
            (hierarchical(r#"{"category": "A", "if": {"variable": "t5", "below": 50}}"#), "$.rule.hierarchical"),
            (hierarchical(r#"{"if": {"variable": "t99", "below": 50}, "then": {"category": "A"}, "else": {"category": "B"}}"#), "$.rule.hierarchical.if.variable"),
            (hierarchical(r#"{"if": {"variable": "t5", "at_least": 60, "below": 50}, "then": {"category": "A"}, "else": {"category": "B"}}"#), "$.rule.hierarchical.if"),
            (hierarchical(r#"{"if": {"variable": "t5"}, "then": {"category": "A"}, "else": {"category": "B"}}"#), "$.rule.hierarchical.if"),
            (hierarchical(r#"{"if": {"annotation": "MN4", "equals": "yes", "present": true}, "then": {"category": "A"}, "else": {"category": "B"}}"#), "$.rule.hierarchical.if"),
            (hierarchical(r#"{"category": ""}"#), "$.rule.hierarchical.category"),
            (
                r#"{"format": "esserver-model/1", "name": "m", "rule": {"additive": {"terms": [{"variable": "cc2"}]}}}"#.to_string(),
                "$.rule.additive.terms[0]",
            ),
            (
                r#"{"format": "esserver-model/1", "name": "m", "rule": {"additive": {"terms": []}}}"#.to_string(),
                "$.rule.additive.terms",
            ),
            (
                r#"{"format": "esserver-model/1", "name": "m", "exclusions": [{"name": "x", "when": {"annotation": "MN4", "equals": "yes"}, "category": "E"}], "rule": {"additive": {"terms": [{"variable": "cc2", "coefficient": 1}]}}}"#.to_string(),
                "$.exclusions[0]",
            ),
        ];
        for (document, at) in cases {
            let error = parse(&document).expect_err(&document);
            assert_eq!(error.at, at, "{document}: {error}");
            assert_eq!(error.code(), "invalid_model");
        }
        // Unknown fields are refused (a typo must not silently drop a rule), with the line.
        let error = parse(
            r#"{"format": "esserver-model/1", "name": "m", "exclusion": [], "rule": {"hierarchical": {"category": "A"}}}"#,
        )
        .unwrap_err();
        assert!(error.message.contains("exclusion"), "{error}");
        assert!(error.at.starts_with("line 1"), "{error}");
    }

    #[test]
    fn a_score_that_overflows_is_not_available() {
        let terms: Vec<String> = (0..40)
            .map(|_| r#"{"variable": "t2", "coefficient": 1e9}"#.to_string())
            .collect();
        let document = format!(
            r#"{{"format": "esserver-model/1", "name": "m", "rule": {{"multiplicative": {{"terms": [{}]}}}}}}"#,
            terms.join(",")
        );
        let model = parse(&document).unwrap();
        let embryo = Embryo {
            events: [("t2".to_string(), 10_000.0)].into(),
            ..Embryo::default()
        };
        let evaluation = model.evaluate(&embryo);
        assert!(
            matches!(evaluation.outcome, Outcome::NotAvailable(_)),
            "{evaluation:?}"
        );
    }

    #[test]
    fn numbers_are_bounded_and_annotations_match_without_regard_to_case() {
        let error = parse(
            r#"{"format": "esserver-model/1", "name": "m", "exclusions": [{"name": "x", "when": {"annotation": "MN4", "equals": "yes"}, "score": 1e306}], "rule": {"additive": {"terms": [{"variable": "cc2", "coefficient": 1}]}}}"#,
        )
        .unwrap_err();
        assert_eq!(error.at, "$.exclusions[0].score", "{error}");
        let model = parse(&hierarchical(
            r#"{"if": {"annotation": "MN4", "equals": "yes"}, "then": {"category": "E"}, "else": {"category": "A"}}"#,
        ))
        .unwrap();
        let mut embryo = Embryo::default();
        // A finding saved with a time is still a finding; its name and value match loosely.
        embryo.add_annotation("mn4", " Yes", Some(40.0));
        assert_eq!(
            model.evaluate(&embryo).outcome,
            Outcome::Category("E".into())
        );
        // The latest of a name wins.
        embryo.add_annotation("t2", "", Some(25.0));
        embryo.add_annotation("T2", "", Some(26.0));
        assert_eq!(embryo.variable("t2"), crate::Variable::Hours(26.0));
    }

    #[test]
    fn a_decisive_exclusion_wins_over_one_that_cannot_be_decided() {
        let model = parse(
            r#"{"format": "esserver-model/1", "name": "m", "exclusions": [
                {"name": "direct", "when": {"variable": "cc2", "below": 5}, "category": "E"},
                {"name": "mn", "when": {"annotation": "MN4", "equals": "yes"}, "category": "E"}],
                "rule": {"hierarchical": {"category": "A"}}}"#,
        )
        .unwrap();
        let mut embryo = Embryo::default();
        embryo.add_annotation("MN4", "yes", None);
        let evaluation = model.evaluate(&embryo);
        assert_eq!(evaluation.outcome, Outcome::Category("E".into()));
        assert!(evaluation.rule.contains("mn"), "{}", evaluation.rule);
        embryo.annotations.clear();
        assert!(matches!(
            model.evaluate(&embryo).outcome,
            Outcome::NotAvailable(_)
        ));
    }

    #[test]
    fn bounds_hold_depth_nodes_and_size() {
        let mut tree = LEAF.to_string();
        for _ in 0..limits::TREE_DEPTH_MAX {
            tree = format!(
                r#"{{"if": {{"variable": "t5", "below": 50}}, "then": {tree}, "else": {LEAF}}}"#
            );
        }
        let error = parse(&hierarchical(&tree)).unwrap_err();
        assert!(error.message.contains("deeper"), "{error}");
        let big = format!(
            r#"{{"format": "esserver-model/1", "name": "m", "description": "{}", "rule": {{"hierarchical": {LEAF}}}}}"#,
            "x".repeat(limits::DOCUMENT_BYTES_MAX)
        );
        assert!(parse(&big).unwrap_err().message.contains("bytes"));
        // Within the bounds: fine.
        assert!(parse(&hierarchical(LEAF)).is_ok());
    }

    #[test]
    fn random_and_mutated_documents_never_panic() {
        let valid = hierarchical(
            r#"{"if": {"variable": "s2", "below": 0.77}, "then": {"category": "A"}, "else": {"if": {"annotation": "MN4", "one_of": ["yes", "unsure"]}, "then": {"category": "E"}, "else": {"category": "B"}}}"#,
        );
        let embryo = Embryo {
            events: [("t3".to_string(), 37.4), ("t4".to_string(), 38.0)].into(),
            annotations: [("MN4".to_string(), "unsure".to_string())].into(),
        };
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut parsed = 0;
        for _ in 0..5000 {
            let mut bytes = valid.clone().into_bytes();
            for _ in 0..(next() % 4 + 1) {
                let at = (next() % bytes.len() as u64) as usize;
                match next() % 3 {
                    0 => bytes[at] = (next() % 128) as u8,
                    1 => {
                        bytes.remove(at);
                    }
                    _ => bytes.insert(at, b"{}[]\":,0-e."[(next() % 11) as usize]),
                }
            }
            if let Ok(model) = Model::from_json(&bytes) {
                parsed += 1;
                let _ = model.evaluate(&embryo);
            }
        }
        assert!(parsed > 0, "some mutations stay valid and are evaluated");
    }
}
