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
        // In the order they were made (annotation ids grow): the latest of each name wins, as
        // in the REST API's derived variables.
        let mut embryo = es_models::Embryo::default();
        for entry in self
            .annotations
            .range((embryo_key, 0)..=(embryo_key, u64::MAX))?
        {
            let (_, value) = entry?;
            let row: AnnotationRow = decode(value.value(), "annotation")?;
            match row.event_at_ms {
                Some(at) => {
                    let hours = (at - dish.insemination_at_ms) as f64 / HOUR_MS;
                    embryo.set_event(&row.name, hours);
                }
                None => {
                    embryo.annotations.insert(row.name, row.value);
                }
            }
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
        let model = Model::from_json(row.document.as_bytes()).map_err(|error| {
            StorageError::Corrupt(format!("stored model {name} does not parse: {error}"))
        })?;
        Ok(model.evaluate(&self.model_inputs(embryo_key)?))
    }

    /// Evaluates every model the embryo has a result of again, with the version it was
    /// evaluated with: after one of its inputs (an annotation) changed.
    pub(super) fn recompute_results(
        &mut self,
        actor: &Actor,
        embryo_key: u64,
        at_ms: i64,
    ) -> Result<(), StorageError> {
        let mut current = Vec::new();
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
            current.push((name.to_string(), row.version));
        }
        for (name, version) in current {
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
        let row = ModelResultRow {
            version,
            outcome,
            value: value.clone(),
            rule: evaluation.rule,
            variables: evaluation.variables.into_iter().collect(),
            set_by: actor.user.clone(),
            set_at_ms: at_ms,
        };
        self.model_results
            .insert((embryo_key, name), encode(&row).as_slice())?;
        let key = (embryo_key, name);
        if outcome == OUTCOME_NOT_AVAILABLE {
            if self.scores.remove(key)?.is_some() {
                self.state.scores = self.state.scores.saturating_sub(1);
            }
            return Ok(());
        }
        if self.scores.get(key)?.is_none() {
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
