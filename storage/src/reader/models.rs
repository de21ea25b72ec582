//! Reads of the clinic's models and of embryos' results of them.

use super::Reader;
use crate::error::StorageError;
use crate::model::{ModelRecord, ModelResultRecord};
use crate::tables::{self, decode, ModelResultRow, ModelRow};

impl Reader {
    /// Every version of every model, by name then version.
    pub fn models(&self) -> Result<Vec<ModelRecord>, StorageError> {
        let table = self.txn.open_table(tables::MODELS)?;
        let mut out = Vec::new();
        for entry in table.range::<(&str, u32)>(..)? {
            let (key, value) = entry?;
            let (name, version) = key.value();
            out.push(model_record(name, version, decode(value.value(), "model")?));
        }
        Ok(out)
    }

    /// Version `version` of model `name` (its newest when None); None when there is none.
    pub fn model(
        &self,
        name: &str,
        version: Option<u32>,
    ) -> Result<Option<ModelRecord>, StorageError> {
        let table = self.txn.open_table(tables::MODELS)?;
        let found = match version {
            Some(version) => table
                .get((name, version))?
                .map(|row| (version, row.value().to_vec())),
            None => table
                .range((name, 0)..=(name, u32::MAX))?
                .next_back()
                .transpose()?
                .map(|(key, row)| (key.value().1, row.value().to_vec())),
        };
        match found {
            Some((version, bytes)) => {
                Ok(Some(model_record(name, version, decode(&bytes, "model")?)))
            }
            None => Ok(None),
        }
    }

    /// The embryo's current model results, by model name; None when the embryo is unknown.
    pub fn model_results(
        &self,
        embryo_id: &str,
    ) -> Result<Option<Vec<ModelResultRecord>>, StorageError> {
        let by_id = self.txn.open_table(tables::EMBRYO_BY_ID)?;
        let Some(well_key) = by_id.get(embryo_id)?.map(|g| g.value()) else {
            return Ok(None);
        };
        let wells = self.txn.open_table(tables::WELLS)?;
        let Some(row) = wells.get(well_key)? else {
            return Ok(None);
        };
        let embryo_key = decode::<tables::EmbryoRow>(row.value(), "embryo")?.embryo_key;
        let results = self.txn.open_table(tables::MODEL_RESULTS)?;
        let mut out = Vec::new();
        for entry in results.range((embryo_key, "")..(embryo_key.saturating_add(1), ""))? {
            let (key, value) = entry?;
            let (key_embryo, model) = key.value();
            if key_embryo != embryo_key {
                break;
            }
            let row: ModelResultRow = decode(value.value(), "model result")?;
            out.push(ModelResultRecord {
                model: model.to_string(),
                version: row.version,
                outcome: match row.outcome {
                    1 => "category",
                    2 => "score",
                    _ => "not_available",
                },
                value: row.value,
                rule: row.rule,
                variables: row.variables.into_iter().collect(),
                set_by: row.set_by,
                set_at_ms: row.set_at_ms,
            });
        }
        Ok(Some(out))
    }
}

fn model_record(name: &str, version: u32, row: ModelRow) -> ModelRecord {
    let kind = es_models::Model::from_json(row.document.as_bytes())
        .map(|model| model.kind())
        .unwrap_or("unreadable");
    ModelRecord {
        name: name.to_string(),
        version,
        kind: kind.to_string(),
        imported_by: row.imported_by,
        imported_at_ms: row.imported_at_ms,
        used: row.used,
        document: row.document,
    }
}
