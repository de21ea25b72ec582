//! Models inside the writer's batch: importing a document as a version, evaluating a version
//! on an embryo, and recomputing an embryo's results when one of their inputs changes (in the
//! same transaction as the change).

use super::clinical::Audit;
use super::Batch;
use crate::error::{EditRefusal, StorageError, WriteError};
use crate::model::{AuditOutcome, ChangeEntity};
use crate::ops::{Actor, Applied, ModelImport, ModelImported};
use crate::tables::{decode, encode, AnnotationRow, DishRow, ModelResultRow, ModelRow, ScoreRow};
use es_models::{Evaluation, Model, Outcome};
use redb::ReadableTable;

const HOUR_MS: f64 = 3_600_000.0;

/// Stable numbers of [`ModelResultRow::outcome`].
pub(crate) const OUTCOME_CATEGORY: u8 = 1;
pub(crate) const OUTCOME_SCORE: u8 = 2;
pub(crate) const OUTCOME_NOT_AVAILABLE: u8 = 3;

impl Batch<'_> {
    pub(crate) fn model_import(
        &mut self,
        actor: &Actor,
        document: &str,
        at_ms: i64,
    ) -> Applied<ModelImport> {
        let model = match Model::from_json(document.as_bytes()) {
            Ok(model) => model,
            Err(error) => return Ok(Err(WriteError::InvalidInput(error.to_string()))),
        };
        let name = model.name.clone();
        let newest = self.model_version(&name, None)?;
        if let Some((version, row)) = &newest {
            let same =
                Model::from_json(row.document.as_bytes()).is_ok_and(|stored| stored == model);
            if same {
                return Ok(Ok(ModelImported {
                    name,
                    version: *version,
                    created: false,
                }));
            }
        }
        let version = newest.map_or(1, |(version, _)| version + 1);
        let row = ModelRow {
            document: document.to_string(),
            imported_by: actor.user.clone(),
            imported_at_ms: at_ms,
            used: false,
        };
        self.models
            .insert((name.as_str(), version), encode(&row).as_slice())?;
        self.audit_row(
            Audit {
                actor,
                action: "model.import",
                entity: ChangeEntity::Model,
                target: &name,
                outcome: AuditOutcome::Applied,
                before: String::new(),
                after:
                    serde_json::json!({ "name": name, "version": version, "kind": model.kind() })
                        .to_string(),
            },
            at_ms,
        )?;
        Ok(Ok(ModelImported {
            name,
            version,
            created: true,
        }))
    }

    /// Version `version` of model `name` (its newest when None).
    fn model_version(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<(u32, ModelRow)>, StorageError> {
        let found = match version {
            Some(version) => self
                .models
                .get((name, version))?
                .map(|row| (version, row.value().to_vec())),
            None => self
                .models
                .range((name, 0)..=(name, u32::MAX))?
                .next_back()
                .transpose()?
                .map(|(key, row)| (key.value().1, row.value().to_vec())),
        };
        match found {
            Some((version, bytes)) => Ok(Some((version, decode(&bytes, "model")?))),
            None => Ok(None),
        }
    }

    /// What the models see of embryo `embryo_key`: its timing events in hours after its
    /// dish's insemination, and its other annotations (the newest of each name).
    fn model_inputs(&self, embryo_key: u64) -> Result<es_models::Embryo, StorageError> {
        let Some(well_key) = self.embryo_by_key.get(embryo_key)?.map(|g| g.value()) else {
            return Err(StorageError::Corrupt(format!(
                "embryo key {embryo_key} has no well"
            )));
        };
        let dish: DishRow = match self.dishes.get(well_key.0)? {
            Some(row) => decode(row.value(), "dish")?,
            None => {
                return Err(StorageError::Corrupt(format!(
                    "dish {} of embryo key {embryo_key} is missing",
                    well_key.0
                )))
            }
        };
        // Oldest edit first, so the latest edit of each name wins (as in the REST API's derived
        // variables).
        let mut rows = Vec::new();
        for entry in self
            .annotations
            .range((embryo_key, 0)..=(embryo_key, u64::MAX))?
        {
            let (key, value) = entry?;
            let row: AnnotationRow = decode(value.value(), "annotation")?;
            rows.push((row.set_at_ms, key.value().1, row));
        }
        rows.sort_by_key(|(at, id, _)| (*at, *id));
        let mut embryo = es_models::Embryo::default();
        for (_, _, row) in rows {
            let hours = row
                .event_at_ms
                .map(|at| (at - dish.insemination_at_ms) as f64 / HOUR_MS);
            embryo.add_annotation(&row.name, &row.value, hours);
        }
        Ok(embryo)
    }

    /// Evaluates model `name` (version `version`, else its newest) on the embryo and stores
    /// the result; returns the change summary.
    pub(super) fn evaluate_model(
        &mut self,
        actor: &Actor,
        embryo_key: u64,
        embryo_id: &str,
        name: &str,
        version: Option<u32>,
        at_ms: i64,
    ) -> Result<Result<String, WriteError<EditRefusal>>, StorageError> {
        let Some((version, mut row)) = self.model_version(name, version)? else {
            return Ok(Err(WriteError::Refused(EditRefusal::NotFound(
                match version {
                    Some(version) => format!("model {name} version {version}"),
                    None => format!("model {name}"),
                },
            ))));
        };
        if self.model_results.get((embryo_key, name))?.is_none() {
            let count = self.result_models(embryo_key)?.len() as u64;
            if count >= crate::limits::MODEL_RESULTS_PER_EMBRYO_MAX {
                return Ok(Err(WriteError::InvalidInput(format!(
                    "embryo {embryo_id} has results of {count} models, the most it may have"
                ))));
            }
        }
        let evaluation = self.evaluate_row(embryo_key, name, &row)?;
        let summary = format!(
            "{name} v{version} of embryo {embryo_id}: {}",
            outcome_text(&evaluation.outcome)
        );
        self.store_result(embryo_key, name, version, evaluation, actor, at_ms)?;
        if !row.used {
            row.used = true;
            self.models
                .insert((name, version), encode(&row).as_slice())?;
        }
        Ok(Ok(summary))
    }

    fn evaluate_row(
        &self,
        embryo_key: u64,
        name: &str,
        row: &ModelRow,
    ) -> Result<Evaluation, StorageError> {
        // A stored document this version cannot read (a newer format, say) gives a result not
        // available, never a failed edit of the embryo.
        let model = match Model::from_json(row.document.as_bytes()) {
            Ok(model) => model,
            Err(error) => {
                tracing::error!(model = name, %error, "a stored model cannot be read");
                return Ok(Evaluation {
                    outcome: Outcome::NotAvailable(format!(
                        "the stored model cannot be read: {error}"
                    )),
                    rule: "model unreadable".into(),
                    variables: Default::default(),
                });
            }
        };
        Ok(model.evaluate(&self.model_inputs(embryo_key)?))
    }

    /// The models the embryo has results of, with the version each was evaluated with.
    fn result_models(&self, embryo_key: u64) -> Result<Vec<(String, u32)>, StorageError> {
        let mut out = Vec::new();
        for entry in self
            .model_results
            .range((embryo_key, "")..(embryo_key.saturating_add(1), ""))?
        {
            let (key, value) = entry?;
            let (key_embryo, name) = key.value();
            if key_embryo != embryo_key {
                break;
            }
            let row: ModelResultRow = decode(value.value(), "model result")?;
            out.push((name.to_string(), row.version));
        }
        Ok(out)
    }

    /// Evaluates every model the embryo has a result of again, with the version it was
    /// evaluated with: after one of its inputs (an annotation) changed.
    pub(super) fn recompute_results(
        &mut self,
        actor: &Actor,
        embryo_key: u64,
        at_ms: i64,
    ) -> Result<(), StorageError> {
        for (name, version) in self.result_models(embryo_key)? {
            let Some((version, row)) = self.model_version(&name, Some(version))? else {
                return Err(StorageError::Corrupt(format!(
                    "a result names model {name} version {version}, which is missing"
                )));
            };
            let evaluation = self.evaluate_row(embryo_key, &name, &row)?;
            self.store_result(embryo_key, &name, version, evaluation, actor, at_ms)?;
        }
        Ok(())
    }

    /// Stores a result, and mirrors a category or a score as the embryo's score of the model
    /// (what the original API's `evaluation` and the embryo's scores show); a result not
    /// available removes that score.
    fn store_result(
        &mut self,
        embryo_key: u64,
        name: &str,
        version: u32,
        evaluation: Evaluation,
        actor: &Actor,
        at_ms: i64,
    ) -> Result<(), StorageError> {
        let (outcome, value) = match &evaluation.outcome {
            Outcome::Category(category) => (OUTCOME_CATEGORY, category.clone()),
            Outcome::Score(score) => (OUTCOME_SCORE, score.to_string()),
            Outcome::NotAvailable(reason) => (OUTCOME_NOT_AVAILABLE, reason.clone()),
        };
        let key = (embryo_key, name);
        let previous: Option<ModelResultRow> = match self.model_results.get(key)? {
            Some(row) => Some(decode(row.value(), "model result")?),
            None => None,
        };
        let variables: Vec<(String, f64)> = evaluation.variables.into_iter().collect();
        if let Some(previous) = &previous {
            let same = previous.version == version
                && previous.outcome == outcome
                && previous.value == value
                && previous.rule == evaluation.rule
                && previous.variables == variables;
            if same {
                // Recomputed to the same result: who evaluated and when stay.
                return Ok(());
            }
        }
        let row = ModelResultRow {
            version,
            outcome,
            value: value.clone(),
            rule: evaluation.rule,
            variables,
            set_by: actor.user.clone(),
            set_at_ms: at_ms,
        };
        self.model_results.insert(key, encode(&row).as_slice())?;
        // The embryo's score of the model mirrors the result, unless a person set a score of
        // that name before the model was evaluated (it is theirs: left as it is).
        let mirrored = previous.is_some() || self.scores.get(key)?.is_none();
        if !mirrored {
            return Ok(());
        }
        if outcome == OUTCOME_NOT_AVAILABLE {
            if self.scores.remove(key)?.is_some() {
                self.state.scores = self.state.scores.saturating_sub(1);
            }
            return Ok(());
        }
        if self.scores.get(key)?.is_none() {
            let scores = self
                .scores
                .range((embryo_key, "")..(embryo_key.saturating_add(1), ""))?
                .count() as u64;
            if scores >= crate::limits::SCORES_PER_EMBRYO_MAX {
                return Ok(());
            }
            self.state.scores += 1;
        }
        let score = ScoreRow {
            model_version: format!("v{version}"),
            value,
            viability: String::new(),
            set_by: actor.user.clone(),
            set_at_ms: at_ms,
        };
        self.scores.insert(key, encode(&score).as_slice())?;
        Ok(())
    }
}

fn outcome_text(outcome: &Outcome) -> String {
    match outcome {
        Outcome::Category(category) => category.clone(),
        Outcome::Score(score) => score.to_string(),
        Outcome::NotAvailable(reason) => format!("not available ({reason})"),
    }
}
