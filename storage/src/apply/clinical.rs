//! Applying clinical edits (viewers, public API), users, logins and API keys, with the audit
//! trail.
//!
//! Every edit of an existing row checks the version the client names against the stored one.
//! A stale version writes nothing but an audit row (outcome `conflict`) and is answered with
//! `EditRefusal::Stale`, which names the record; the writer reads it once the batch
//! committed (`Edit::after_commit`). The audit trail's before and after states are JSON text:
//! that is the audit table's stored format, and it never crosses the storage boundary as an
//! answer.

use super::{get_row, insert_new, treatment_id, Batch};
use crate::error::{AdminRefusal, EditRefusal, Stale, StaleTarget, StorageError, WriteError};
use crate::limits;
use crate::model::{
    AnnotationSource, ApiScope, AuditOutcome, ChangeEntity, Fate, Rights, TransferOutcome,
};
use crate::ops::{
    Actor, AnnotationInput, ApiKeyCreate, ApiKeyRevoke, Applied, AuditDenied, ClinicalEdit, Edit,
    Edited, Idempotency, InstrumentApprove, InstrumentRename, InstrumentRenumber, LoginAttempt,
    LoginRecorded, PatientRef, UserAdd, UserChange, UserUpdate,
};
use crate::tables::{
    self, decode, encode, AnnotationRow, ApiKeyRow, AuditRow, DishRow, EmbryoRow, IdempotencyRow,
    InstrumentRow, LoginFailureRow, PatientRow, ScoreRow, TransferRow, TreatmentRow, UserRow,
    WellKey,
};
use redb::ReadableTable;
use serde_json::json;

/// One audit entry, before it is numbered.
pub(crate) struct Audit<'a> {
    pub(crate) actor: &'a Actor,
    pub(crate) action: &'a str,
    pub(crate) entity: ChangeEntity,
    pub(crate) target: &'a str,
    pub(crate) outcome: AuditOutcome,
    pub(crate) before: String,
    pub(crate) after: String,
}

/// An edit of an existing versioned record, for `Batch::versioned_update`.
struct VersionedUpdate<'a> {
    actor: &'a Actor,
    action: &'a str,
    entity: ChangeEntity,
    key: u64,
    id: &'a str,
    /// The version the client saw.
    expected_version: u64,
    stored_version: u64,
    /// The record's audited state before the edit, and what the edit attempted.
    before: String,
    attempted: String,
    target: StaleTarget,
}

/// What `versioned_update`'s write did.
struct Written {
    summary: String,
    /// The record's audited state after the edit.
    after: String,
    annotation_id: Option<u64>,
}

/// An embryo row located by its id.
struct EmbryoAt {
    well_key: WellKey,
    row: EmbryoRow,
}

impl Batch<'_> {
    pub(super) fn edit(&mut self, actor: &Actor, edit: &ClinicalEdit, at_ms: i64) -> Applied<Edit> {
        match edit {
            ClinicalEdit::CreatePatient { patient } => self.patient_create(actor, patient, at_ms),
            ClinicalEdit::UpdatePatient {
                patient,
                expected_version,
            } => self.patient_update(actor, patient, *expected_version, at_ms),
            ClinicalEdit::CreateTreatment {
                patient_id,
                name,
                comment,
            } => self.treatment_add(actor, patient_id, name, comment, at_ms),
            ClinicalEdit::UpdateTreatment {
                patient_id,
                name,
                comment,
                expected_version,
            } => self.treatment_update(actor, patient_id, name, comment, *expected_version, at_ms),
            ClinicalEdit::AddAnnotation { .. }
            | ClinicalEdit::ChangeAnnotation { .. }
            | ClinicalEdit::RemoveAnnotation { .. }
            | ClinicalEdit::SetFate { .. }
            | ClinicalEdit::SetEmbryoComment { .. }
            | ClinicalEdit::SetScore { .. }
            | ClinicalEdit::Evaluate { .. } => self.embryo_edit(actor, edit, at_ms),
            ClinicalEdit::CreateTransfer {
                patient_id,
                treatment_name,
                transferred_at_ms,
                embryo_ids,
                comment,
            } => self.transfer_create(
                actor,
                NewTransfer {
                    patient_id,
                    treatment_name,
                    transferred_at_ms: *transferred_at_ms,
                    embryo_ids,
                    comment,
                },
                at_ms,
            ),
            ClinicalEdit::UpdateTransfer {
                transfer_key,
                expected_version,
                outcome,
                comment,
            } => self.transfer_update(
                actor,
                *transfer_key,
                *expected_version,
                outcome,
                comment,
                at_ms,
            ),
        }
    }

    /// Applies an edit under an Idempotency-Key: a retry of the same request is answered with
    /// the recorded outcome and changes nothing; the same key with another request is refused.
    /// Only an applied edit is recorded, so a refused one (conflict, not found) may be retried.
    pub(crate) fn idempotent_edit(
        &mut self,
        actor: &Actor,
        edit: &ClinicalEdit,
        idempotency: Option<&Idempotency>,
        at_ms: i64,
    ) -> Applied<Edit> {
        let Some(idempotency) = idempotency else {
            return self.edit(actor, edit, at_ms);
        };
        let slot = (idempotency.principal.as_str(), idempotency.key.as_str());
        if let Some(bytes) = self.idempotency.get(slot)? {
            let row: IdempotencyRow = decode(bytes.value(), "idempotency")?;
            if row.request_sha256 != idempotency.request_sha256 {
                return Ok(Err(WriteError::Refused(EditRefusal::IdempotencyKeyReused(
                    idempotency.key.clone(),
                ))));
            }
            let entity = ChangeEntity::from_u8(row.entity).ok_or_else(|| {
                StorageError::Corrupt(format!("idempotency row names entity {}", row.entity))
            })?;
            return Ok(Ok(Edited {
                entity,
                key: row.key,
                id: row.id,
                version: row.version,
                change_seq: row.change_seq,
                annotation_id: row.annotation_id,
                replayed: true,
            }));
        }
        let outcome = self.edit(actor, edit, at_ms)?;
        if let Ok(Edited {
            entity,
            key,
            id,
            version,
            change_seq,
            annotation_id,
            ..
        }) = &outcome
        {
            let row = IdempotencyRow {
                request_sha256: idempotency.request_sha256,
                at_ms,
                entity: entity.to_u8(),
                key: *key,
                id: id.clone(),
                version: *version,
                change_seq: *change_seq,
                annotation_id: *annotation_id,
            };
            self.idempotency.insert(slot, encode(&row).as_slice())?;
            self.idempotency_by_age
                .insert((at_ms, slot.0, slot.1), ())?;
        }
        Ok(outcome)
    }

    // ---------------------------------------------------------------- patients

    fn patient_create(&mut self, actor: &Actor, patient: &PatientRef, at_ms: i64) -> Applied<Edit> {
        let id = patient.patient_id.as_str();
        if self.patient_by_id.get(id)?.is_some() {
            return Ok(Err(WriteError::Refused(EditRefusal::AlreadyExists(
                format!("patient {id}"),
            ))));
        }
        if !patient.patient_idx.is_empty() && self.patient_idx_taken(&patient.patient_idx)? {
            return Ok(Err(WriteError::Refused(EditRefusal::AlreadyExists(
                format!("a patient with PatientIDx {}", patient.patient_idx),
            ))));
        }
        let patient_key = self.state.patient_key_last + 1;
        self.patient_insert(patient_key, PatientRow::new(patient, at_ms))?;
        let row: PatientRow = get_row(&self.patients, patient_key, "patient")?;
        let change_seq = self.logged_change(
            ChangeEntity::Patient,
            patient_key,
            id,
            1,
            at_ms,
            format!("patient {id} created"),
        )?;
        self.audit_row(
            Audit {
                actor,
                action: "patient.create",
                entity: ChangeEntity::Patient,
                target: id,
                outcome: AuditOutcome::Applied,
                before: String::new(),
                after: patient_json(&row),
            },
            at_ms,
        )?;
        Ok(Ok(edited(
            ChangeEntity::Patient,
            patient_key,
            id,
            1,
            change_seq,
        )))
    }

    fn patient_update(
        &mut self,
        actor: &Actor,
        patient: &PatientRef,
        expected_version: u64,
        at_ms: i64,
    ) -> Applied<Edit> {
        let id = patient.patient_id.as_str();
        let Some(patient_key) = self.patient_by_id.get(id)?.map(|g| g.value()) else {
            return Ok(Err(not_found(format!("patient {id}"))));
        };
        let row: PatientRow = get_row(&self.patients, patient_key, "patient")?;
        let mut attempt = row.clone();
        attempt.first_name.clone_from(&patient.first_name);
        attempt.last_name.clone_from(&patient.last_name);
        attempt.date_of_birth.clone_from(&patient.date_of_birth);
        let update = VersionedUpdate {
            actor,
            action: "patient.update",
            entity: ChangeEntity::Patient,
            key: patient_key,
            id,
            expected_version,
            stored_version: row.version,
            before: patient_json(&row),
            attempted: patient_json(&attempt),
            target: StaleTarget::Patient(id.to_string()),
        };
        self.versioned_update(update, at_ms, |batch, version| {
            attempt.version = version;
            attempt.updated_at_ms = at_ms;
            batch
                .patients
                .insert(patient_key, encode(&attempt).as_slice())?;
            // The clinic decided the details: an instrument's that differed are resolved.
            batch.patient_difference_resolved(patient_key)?;
            Ok(Ok(Written {
                summary: format!("patient {id} updated"),
                after: patient_json(&attempt),
                annotation_id: None,
            }))
        })
    }

    // ---------------------------------------------------------------- treatments

    fn treatment_add(
        &mut self,
        actor: &Actor,
        patient_id: &str,
        name: &str,
        comment: &str,
        at_ms: i64,
    ) -> Applied<Edit> {
        let Some(patient_key) = self.patient_by_id.get(patient_id)?.map(|g| g.value()) else {
            return Ok(Err(WriteError::Refused(EditRefusal::NotFound(format!(
                "patient {patient_id}"
            )))));
        };
        let id = treatment_id(patient_id, name);
        if self
            .treatment_by_patient_name
            .get((patient_key, name))?
            .is_some()
        {
            return Ok(Err(WriteError::Refused(EditRefusal::AlreadyExists(
                format!("treatment {id}"),
            ))));
        }
        let treatment_key = self.treatment_create(patient_key, name, comment, at_ms)?;
        let row: TreatmentRow = get_row(&self.treatments, treatment_key, "treatment")?;
        let change_seq = self.state.change_last_seq;
        self.audit_row(
            Audit {
                actor,
                action: "treatment.create",
                entity: ChangeEntity::Treatment,
                target: &id,
                outcome: AuditOutcome::Applied,
                before: String::new(),
                after: treatment_json(&row),
            },
            at_ms,
        )?;
        Ok(Ok(edited(
            ChangeEntity::Treatment,
            treatment_key,
            &id,
            1,
            change_seq,
        )))
    }

    fn treatment_update(
        &mut self,
        actor: &Actor,
        patient_id: &str,
        name: &str,
        comment: &str,
        expected_version: u64,
        at_ms: i64,
    ) -> Applied<Edit> {
        let id = treatment_id(patient_id, name);
        let Some(patient_key) = self.patient_by_id.get(patient_id)?.map(|g| g.value()) else {
            return Ok(Err(not_found(format!("patient {patient_id}"))));
        };
        let Some(treatment_key) = self
            .treatment_by_patient_name
            .get((patient_key, name))?
            .map(|g| g.value())
        else {
            return Ok(Err(not_found(format!("treatment {id}"))));
        };
        let row: TreatmentRow = get_row(&self.treatments, treatment_key, "treatment")?;
        let mut attempt = row.clone();
        attempt.comment = comment.to_string();
        let update = VersionedUpdate {
            actor,
            action: "treatment.update",
            entity: ChangeEntity::Treatment,
            key: treatment_key,
            id: &id,
            expected_version,
            stored_version: row.version,
            before: treatment_json(&row),
            attempted: treatment_json(&attempt),
            target: StaleTarget::Treatment {
                patient_id: patient_id.to_string(),
                name: name.to_string(),
            },
        };
        self.versioned_update(update, at_ms, |batch, version| {
            attempt.version = version;
            attempt.updated_at_ms = at_ms;
            batch
                .treatments
                .insert(treatment_key, encode(&attempt).as_slice())?;
            Ok(Ok(Written {
                summary: format!("treatment {id} updated"),
                after: treatment_json(&attempt),
                annotation_id: None,
            }))
        })
    }

    // ---------------------------------------------------------------- embryos

    fn embryo_at(&self, embryo_id: &str) -> Result<Option<EmbryoAt>, StorageError> {
        let Some(well_key) = self.embryo_by_id.get(embryo_id)?.map(|g| g.value()) else {
            return Ok(None);
        };
        let Some(bytes) = self.wells.get(well_key)? else {
            return Err(StorageError::Corrupt(format!(
                "embryo {embryo_id} is indexed but its well row is missing"
            )));
        };
        let row: EmbryoRow = decode(bytes.value(), "embryo")?;
        Ok(Some(EmbryoAt { well_key, row }))
    }

    fn embryo_annotations(
        &self,
        embryo_key: u64,
    ) -> Result<Vec<(u64, AnnotationRow)>, StorageError> {
        let mut out = Vec::new();
        for entry in self
            .annotations
            .range((embryo_key, 0)..=(embryo_key, u64::MAX))?
        {
            let (key, value) = entry?;
            out.push((key.value().1, decode(value.value(), "annotation")?));
        }
        Ok(out)
    }

    fn embryo_scores(&self, embryo_key: u64) -> Result<Vec<(String, ScoreRow)>, StorageError> {
        let mut out = Vec::new();
        for entry in self
            .scores
            .range((embryo_key, "")..(embryo_key.saturating_add(1), ""))?
        {
            let (key, value) = entry?;
            if key.value().0 != embryo_key {
                break;
            }
            out.push((key.value().1.to_string(), decode(value.value(), "score")?));
        }
        Ok(out)
    }

    fn embryo_json(&self, row: &EmbryoRow) -> Result<String, StorageError> {
        let annotations: Vec<_> = self
            .embryo_annotations(row.embryo_key)?
            .into_iter()
            .map(|(id, a)| annotation_json(id, &a))
            .collect();
        let scores: Vec<_> = self
            .embryo_scores(row.embryo_key)?
            .into_iter()
            .map(|(model, s)| {
                json!({
                    "model": model, "model_version": s.model_version, "value": s.value,
                    "viability": s.viability, "set_by": s.set_by, "set_at_ms": s.set_at_ms,
                })
            })
            .collect();
        Ok(json!({
            "embryo_id": row.embryo_id,
            "version": row.version,
            "fate": Fate::from_u8(row.fate).map_or("unknown", Fate::as_str),
            "comment": row.comment,
            "annotations": annotations,
            "scores": scores,
        })
        .to_string())
    }

    // ---------------------------------------------------------------- transfers

    fn transfer_create(
        &mut self,
        actor: &Actor,
        new: NewTransfer<'_>,
        at_ms: i64,
    ) -> Applied<Edit> {
        let NewTransfer {
            patient_id,
            treatment_name,
            transferred_at_ms,
            embryo_ids,
            comment,
        } = new;
        let Some(patient_key) = self.patient_by_id.get(patient_id)?.map(|g| g.value()) else {
            return Ok(Err(WriteError::Refused(EditRefusal::NotFound(format!(
                "patient {patient_id}"
            )))));
        };
        let treatment = treatment_id(patient_id, treatment_name);
        let Some(treatment_key) = self
            .treatment_by_patient_name
            .get((patient_key, treatment_name))?
            .map(|g| g.value())
        else {
            return Ok(Err(WriteError::Refused(EditRefusal::NotFound(format!(
                "treatment {treatment}"
            )))));
        };
        let mut embryo_keys = Vec::with_capacity(embryo_ids.len());
        for embryo_id in embryo_ids {
            let Some(EmbryoAt { well_key, row }) = self.embryo_at(embryo_id)? else {
                return Ok(Err(WriteError::Refused(EditRefusal::NotFound(format!(
                    "embryo {embryo_id}"
                )))));
            };
            let dish: DishRow = get_row(&self.dishes, well_key.0, "dish")?;
            if dish.treatment_key != treatment_key {
                return Ok(Err(WriteError::InvalidInput(format!(
                    "embryo {embryo_id} does not belong to treatment {treatment}"
                ))));
            }
            embryo_keys.push(row.embryo_key);
        }
        let transfer_key = self.state.transfer_key_last + 1;
        let row = TransferRow {
            treatment_key,
            transferred_at_ms,
            embryo_keys,
            outcome: TransferOutcome::default(),
            comment: comment.to_string(),
            version: 1,
            created_at_ms: at_ms,
            updated_at_ms: at_ms,
        };
        insert_new(&mut self.transfers, transfer_key, &encode(&row), "transfer")?;
        self.transfer_by_treatment
            .insert((treatment_key, transfer_key), ())?;
        self.state.transfer_key_last = transfer_key;
        self.state.transfers += 1;
        let id = transfer_key.to_string();
        let change_seq = self.logged_change(
            ChangeEntity::Transfer,
            transfer_key,
            &id,
            1,
            at_ms,
            format!("transfer {id} of treatment {treatment} recorded"),
        )?;
        self.audit_row(
            Audit {
                actor,
                action: "transfer.create",
                entity: ChangeEntity::Transfer,
                target: &id,
                outcome: AuditOutcome::Applied,
                before: String::new(),
                after: transfer_json(&row, embryo_ids),
            },
            at_ms,
        )?;
        Ok(Ok(edited(
            ChangeEntity::Transfer,
            transfer_key,
            &id,
            1,
            change_seq,
        )))
    }

    fn transfer_update(
        &mut self,
        actor: &Actor,
        transfer_key: u64,
        expected_version: u64,
        outcome: &TransferOutcome,
        comment: &str,
        at_ms: i64,
    ) -> Applied<Edit> {
        let id = transfer_key.to_string();
        let Some(bytes) = self.transfers.get(transfer_key)? else {
            return Ok(Err(not_found(format!("transfer {id}"))));
        };
        let row: TransferRow = decode(bytes.value(), "transfer")?;
        drop(bytes);
        let embryo_ids = self.embryo_ids_of_keys(&row.embryo_keys)?;
        let mut attempt = row.clone();
        attempt.outcome = outcome.clone();
        attempt.comment = comment.to_string();
        let update = VersionedUpdate {
            actor,
            action: "transfer.update",
            entity: ChangeEntity::Transfer,
            key: transfer_key,
            id: &id,
            expected_version,
            stored_version: row.version,
            before: transfer_json(&row, &embryo_ids),
            attempted: transfer_json(&attempt, &embryo_ids),
            target: StaleTarget::Transfer(transfer_key),
        };
        self.versioned_update(update, at_ms, |batch, version| {
            attempt.version = version;
            attempt.updated_at_ms = at_ms;
            batch
                .transfers
                .insert(transfer_key, encode(&attempt).as_slice())?;
            Ok(Ok(Written {
                summary: format!("outcome of transfer {id} updated"),
                after: transfer_json(&attempt, &embryo_ids),
                annotation_id: None,
            }))
        })
    }

    fn embryo_ids_of_keys(&self, embryo_keys: &[u64]) -> Result<Vec<String>, StorageError> {
        let mut ids = Vec::with_capacity(embryo_keys.len());
        for &embryo_key in embryo_keys {
            let Some(well_key) = self.embryo_by_key.get(embryo_key)?.map(|g| g.value()) else {
                return Err(StorageError::Corrupt(format!(
                    "a transfer names embryo key {embryo_key}, which is not indexed"
                )));
            };
            let row: EmbryoRow = match self.wells.get(well_key)? {
                Some(bytes) => decode(bytes.value(), "embryo")?,
                None => {
                    return Err(StorageError::Corrupt(format!(
                        "embryo key {embryo_key} is indexed but its well row is missing"
                    )))
                }
            };
            ids.push(row.embryo_id);
        }
        Ok(ids)
    }

    // ---------------------------------------------------------------- instruments

    pub(crate) fn instrument_approve(
        &mut self,
        actor: &Actor,
        serial: &str,
        model: &str,
        at_ms: i64,
    ) -> Applied<InstrumentApprove> {
        if self.instrument_by_serial.get(serial)?.is_some() {
            return Ok(Err(WriteError::Refused(AdminRefusal::AlreadyExists(
                format!("instrument {serial} is already enrolled"),
            ))));
        }
        let summary = format!("instrument {serial} approved by {}", actor.user);
        // No secret: its first HELLO is issued one, like a first connection.
        let secrets = super::InstrumentSecrets::default();
        if let Err(message) = self.instrument_insert(
            super::NewInstrument {
                serial,
                model,
                firmware: "",
                number: 0,
            },
            secrets,
            at_ms,
            summary,
        )? {
            return Ok(Err(WriteError::InvalidInput(message)));
        }
        self.audit_row(
            Audit {
                actor,
                action: "instrument.approve",
                entity: ChangeEntity::Instrument,
                target: serial,
                outcome: AuditOutcome::Applied,
                before: String::new(),
                after: json!({ "serial": serial, "model": model }).to_string(),
            },
            at_ms,
        )?;
        Ok(Ok(()))
    }

    pub(crate) fn instrument_rename(
        &mut self,
        actor: &Actor,
        serial: &str,
        display_name: &str,
        at_ms: i64,
    ) -> Applied<InstrumentRename> {
        self.instrument_edit(actor, serial, "instrument.rename", at_ms, |row| {
            let before = json!({ "display_name": row.display_name });
            row.display_name = display_name.to_string();
            let after = json!({ "display_name": display_name });
            (
                before,
                after,
                format!("instrument {serial} renamed {display_name}"),
            )
        })
    }

    pub(crate) fn instrument_renumber(
        &mut self,
        actor: &Actor,
        serial: &str,
        number: u32,
        at_ms: i64,
    ) -> Applied<InstrumentRenumber> {
        if let Some(other) = self.number_holder(serial, number)? {
            return Ok(Err(WriteError::Refused(AdminRefusal::AlreadyExists(
                format!("instrument number {number} (instrument {other} has it)"),
            ))));
        }
        self.instrument_edit(actor, serial, "instrument.number", at_ms, |row| {
            let before = json!({ "number": row.number });
            row.number = number;
            row.number_source = tables::NUMBER_BY_ADMINISTRATOR;
            let after = json!({ "number": number });
            (
                before,
                after,
                format!("instrument {serial} is number {number}"),
            )
        })
    }

    /// An administrator's edit of an instrument row: `edit` changes it and returns the
    /// audited state before and after and the change's summary.
    fn instrument_edit(
        &mut self,
        actor: &Actor,
        serial: &str,
        action: &str,
        at_ms: i64,
        edit: impl FnOnce(&mut InstrumentRow) -> (serde_json::Value, serde_json::Value, String),
    ) -> Result<Result<(), WriteError<AdminRefusal>>, StorageError> {
        let Some(instrument_id) = self.instrument_by_serial.get(serial)?.map(|g| g.value()) else {
            return Ok(Err(WriteError::Refused(AdminRefusal::NotFound(format!(
                "instrument {serial}"
            )))));
        };
        let mut row: InstrumentRow = get_row(&self.instruments, instrument_id, "instrument")?;
        let (before, after, summary) = edit(&mut row);
        self.instruments
            .insert(instrument_id, encode(&row).as_slice())?;
        self.logged_change(
            ChangeEntity::Instrument,
            instrument_id,
            serial,
            0,
            at_ms,
            summary,
        )?;
        self.audit_row(
            Audit {
                actor,
                action,
                entity: ChangeEntity::Instrument,
                target: serial,
                outcome: AuditOutcome::Applied,
                before: before.to_string(),
                after: after.to_string(),
            },
            at_ms,
        )?;
        Ok(Ok(()))
    }

    // ---------------------------------------------------------------- API keys

    pub(crate) fn api_key_create(
        &mut self,
        actor: &Actor,
        key_id: &str,
        name: &str,
        scope: ApiScope,
        secret_sha256: &[u8; 32],
        at_ms: i64,
    ) -> Applied<ApiKeyCreate> {
        if self.api_keys.get(key_id)?.is_some() {
            return Ok(Err(WriteError::Refused(AdminRefusal::AlreadyExists(
                format!("API key {key_id}"),
            ))));
        }
        let row = ApiKeyRow {
            secret_sha256: *secret_sha256,
            scope: scope.to_u8(),
            name: name.to_string(),
            created_by: actor.user.clone(),
            created_at_ms: at_ms,
            revoked_at_ms: 0,
        };
        self.api_keys.insert(key_id, encode(&row).as_slice())?;
        self.state.api_keys += 1;
        self.audit_row(
            Audit {
                actor,
                action: "api_key.create",
                entity: ChangeEntity::ApiKey,
                target: key_id,
                outcome: AuditOutcome::Applied,
                before: String::new(),
                after: api_key_json(&row),
            },
            at_ms,
        )?;
        Ok(Ok(()))
    }

    pub(crate) fn api_key_revoke(
        &mut self,
        actor: &Actor,
        key_id: &str,
        at_ms: i64,
    ) -> Applied<ApiKeyRevoke> {
        let Some(bytes) = self.api_keys.get(key_id)? else {
            return Ok(Err(WriteError::Refused(AdminRefusal::NotFound(format!(
                "API key {key_id}"
            )))));
        };
        let mut row: ApiKeyRow = decode(bytes.value(), "API key")?;
        drop(bytes);
        if row.revoked_at_ms != 0 {
            return Ok(Ok(()));
        }
        let before = api_key_json(&row);
        row.revoked_at_ms = at_ms;
        self.api_keys.insert(key_id, encode(&row).as_slice())?;
        self.audit_row(
            Audit {
                actor,
                action: "api_key.revoke",
                entity: ChangeEntity::ApiKey,
                target: key_id,
                outcome: AuditOutcome::Applied,
                before,
                after: api_key_json(&row),
            },
            at_ms,
        )?;
        Ok(Ok(()))
    }

    fn embryo_edit(&mut self, actor: &Actor, edit: &ClinicalEdit, at_ms: i64) -> Applied<Edit> {
        let (embryo_id, expected_version) = match edit {
            ClinicalEdit::AddAnnotation {
                embryo_id,
                expected_version,
                ..
            }
            | ClinicalEdit::ChangeAnnotation {
                embryo_id,
                expected_version,
                ..
            }
            | ClinicalEdit::RemoveAnnotation {
                embryo_id,
                expected_version,
                ..
            }
            | ClinicalEdit::SetFate {
                embryo_id,
                expected_version,
                ..
            }
            | ClinicalEdit::SetEmbryoComment {
                embryo_id,
                expected_version,
                ..
            }
            | ClinicalEdit::SetScore {
                embryo_id,
                expected_version,
                ..
            }
            | ClinicalEdit::Evaluate {
                embryo_id,
                expected_version,
                ..
            } => (embryo_id.as_str(), *expected_version),
            _ => unreachable!("embryo_edit is called for embryo edits only"),
        };
        let Some(EmbryoAt { well_key, mut row }) = self.embryo_at(embryo_id)? else {
            return Ok(Err(not_found(format!("embryo {embryo_id}"))));
        };
        let update = VersionedUpdate {
            actor,
            action: edit.action(),
            entity: ChangeEntity::Embryo,
            key: row.embryo_key,
            id: embryo_id,
            expected_version,
            stored_version: row.version,
            before: self.embryo_json(&row)?,
            attempted: attempt_json(edit),
            target: StaleTarget::Embryo(embryo_id.to_string()),
        };
        self.versioned_update(update, at_ms, |batch, version| {
            let (annotation_id, summary) = match batch.embryo_apply(actor, &mut row, edit, at_ms)? {
                Ok(done) => done,
                Err(error) => return Ok(Err(error)),
            };
            row.version = version;
            row.updated_at_ms = at_ms;
            batch.wells.insert(well_key, encode(&row).as_slice())?;
            Ok(Ok(Written {
                summary,
                after: batch.embryo_json(&row)?,
                annotation_id,
            }))
        })
    }

    /// Applies an embryo edit to its row and annotations; returns the annotation touched and
    /// the change summary. The inner error (unknown annotation, too many) writes nothing.
    #[allow(clippy::type_complexity)]
    fn embryo_apply(
        &mut self,
        actor: &Actor,
        row: &mut EmbryoRow,
        edit: &ClinicalEdit,
        at_ms: i64,
    ) -> Result<Result<(Option<u64>, String), WriteError<EditRefusal>>, StorageError> {
        let embryo_key = row.embryo_key;
        let embryo_id = row.embryo_id.clone();
        Ok(Ok(match edit {
            ClinicalEdit::AddAnnotation { annotation, .. } => {
                let count = self.embryo_annotations(embryo_key)?.len() as u64;
                if count >= limits::ANNOTATIONS_PER_EMBRYO_MAX {
                    return Ok(Err(WriteError::InvalidInput(format!(
                        "embryo {embryo_id} has {count} annotations, the most it may have"
                    ))));
                }
                let annotation_id = self.state.annotation_id_last + 1;
                let value = annotation_row(annotation, actor, at_ms);
                if self
                    .annotations
                    .insert((embryo_key, annotation_id), encode(&value).as_slice())?
                    .is_some()
                {
                    return Err(StorageError::Corrupt(format!(
                        "annotation id {annotation_id} is already taken"
                    )));
                }
                self.state.annotation_id_last = annotation_id;
                self.state.annotations += 1;
                self.recompute_results(actor, embryo_key, at_ms)?;
                let summary = format!("annotation {} added to embryo {embryo_id}", value.name);
                (Some(annotation_id), summary)
            }
            ClinicalEdit::ChangeAnnotation {
                annotation_id,
                annotation,
                ..
            } => {
                let key = (embryo_key, *annotation_id);
                if self.annotations.get(key)?.is_none() {
                    return Ok(Err(WriteError::Refused(EditRefusal::NotFound(format!(
                        "annotation {annotation_id} of embryo {embryo_id}"
                    )))));
                }
                let value = annotation_row(annotation, actor, at_ms);
                self.annotations.insert(key, encode(&value).as_slice())?;
                self.recompute_results(actor, embryo_key, at_ms)?;
                let summary = format!("annotation {} of embryo {embryo_id} changed", value.name);
                (Some(*annotation_id), summary)
            }
            ClinicalEdit::RemoveAnnotation { annotation_id, .. } => {
                let key = (embryo_key, *annotation_id);
                let name = match self.annotations.remove(key)? {
                    Some(removed) => decode::<AnnotationRow>(removed.value(), "annotation")
                        .map(|a| a.name)
                        .unwrap_or_default(),
                    None => {
                        return Ok(Err(WriteError::Refused(EditRefusal::NotFound(format!(
                            "annotation {annotation_id} of embryo {embryo_id}"
                        )))));
                    }
                };
                self.state.annotations = self.state.annotations.saturating_sub(1);
                self.recompute_results(actor, embryo_key, at_ms)?;
                let summary = format!("annotation {name} removed from embryo {embryo_id}");
                (Some(*annotation_id), summary)
            }
            ClinicalEdit::SetFate { fate, .. } => {
                row.fate = fate.to_u8();
                (None, format!("fate of embryo {embryo_id} set to {fate}"))
            }
            ClinicalEdit::SetEmbryoComment { comment, .. } => {
                row.comment.clone_from(comment);
                (None, format!("comment of embryo {embryo_id} changed"))
            }
            ClinicalEdit::SetScore { score, .. } => {
                if self
                    .model_results
                    .get((embryo_key, score.model.as_str()))?
                    .is_some()
                {
                    return Ok(Err(WriteError::InvalidInput(format!(
                        "the {} score of embryo {embryo_id} is the result of the clinic's model \
                         of that name, computed from the embryo's annotations: evaluate the \
                         model again instead",
                        score.model
                    ))));
                }
                let value = ScoreRow {
                    model_version: score.model_version.clone(),
                    value: score.value.clone(),
                    viability: score.viability.clone(),
                    set_by: actor.user.clone(),
                    set_at_ms: at_ms,
                };
                let key = (embryo_key, score.model.as_str());
                if self.scores.get(key)?.is_none() {
                    let count = self.embryo_scores(embryo_key)?.len() as u64;
                    if count >= limits::SCORES_PER_EMBRYO_MAX {
                        return Ok(Err(WriteError::InvalidInput(format!(
                            "embryo {embryo_id} has {count} scores, the most it may have"
                        ))));
                    }
                    self.state.scores += 1;
                }
                self.scores.insert(key, encode(&value).as_slice())?;
                let summary = format!(
                    "{} score of embryo {embryo_id} set to {}",
                    score.model, score.value
                );
                (None, summary)
            }
            ClinicalEdit::Evaluate { model, version, .. } => {
                match self.evaluate_model(actor, embryo_key, &embryo_id, model, *version, at_ms)? {
                    Ok(summary) => (None, summary),
                    Err(error) => return Ok(Err(error)),
                }
            }
            _ => unreachable!("embryo_apply is called for embryo edits only"),
        }))
    }

    // ---------------------------------------------------------------- denied attempts

    pub(crate) fn audit_denied(
        &mut self,
        actor: &Actor,
        action: &str,
        entity: ChangeEntity,
        target: &str,
        attempted: &str,
        at_ms: i64,
    ) -> Applied<AuditDenied> {
        self.audit_row(
            Audit {
                actor,
                action,
                entity,
                target,
                outcome: AuditOutcome::Denied,
                before: String::new(),
                after: attempted.to_string(),
            },
            at_ms,
        )?;
        Ok(Ok(()))
    }

    // ---------------------------------------------------------------- users

    pub(crate) fn user_add(
        &mut self,
        actor: &Actor,
        name: &str,
        password_hash: &str,
        rights: Rights,
        at_ms: i64,
    ) -> Applied<UserAdd> {
        if self.users.get(name)?.is_some() {
            return Ok(Err(WriteError::Refused(AdminRefusal::AlreadyExists(
                format!("user {name}"),
            ))));
        }
        // Logins compare names without regard to case, so two names may not differ by case
        // alone.
        let folded = name.to_lowercase();
        for entry in self.users.iter()? {
            let (key, _) = entry?;
            if key.value().to_lowercase() == folded {
                return Ok(Err(WriteError::Refused(AdminRefusal::AlreadyExists(
                    format!(
                        "user {} (user names differ by more than case: logins ignore it)",
                        key.value()
                    ),
                ))));
            }
        }
        let row = UserRow {
            password_hash: password_hash.to_string(),
            rights: rights.to_u8(),
            disabled: false,
            failed_logins: 0,
            locked_until_ms: 0,
            created_at_ms: at_ms,
            updated_at_ms: at_ms,
            password_changed_at_ms: at_ms,
            last_login_ms: 0,
        };
        self.users.insert(name, encode(&row).as_slice())?;
        self.state.users += 1;
        self.audit_row(
            Audit {
                actor,
                action: "user.add",
                entity: ChangeEntity::User,
                target: name,
                outcome: AuditOutcome::Applied,
                before: String::new(),
                after: user_json(&row),
            },
            at_ms,
        )?;
        Ok(Ok(()))
    }

    pub(crate) fn user_update(
        &mut self,
        actor: &Actor,
        name: &str,
        change: &UserChange,
        at_ms: i64,
    ) -> Applied<UserUpdate> {
        let Some(mut row) = self.user_row(name)? else {
            return Ok(Err(WriteError::Refused(AdminRefusal::NotFound(format!(
                "user {name}"
            )))));
        };
        let before = user_json(&row);
        let action = match change {
            UserChange::Password(hash) => {
                row.password_hash.clone_from(hash);
                row.password_changed_at_ms = at_ms;
                row.failed_logins = 0;
                row.locked_until_ms = 0;
                self.clear_login_failures(name)?;
                "user.passwd"
            }
            UserChange::Disabled(disabled) => {
                row.disabled = *disabled;
                if *disabled {
                    "user.disable"
                } else {
                    "user.enable"
                }
            }
            UserChange::Unlock => {
                row.failed_logins = 0;
                row.locked_until_ms = 0;
                self.clear_login_failures(name)?;
                "user.unlock"
            }
            UserChange::Rights(rights) => {
                row.rights = rights.to_u8();
                "user.rights"
            }
        };
        row.updated_at_ms = at_ms;
        self.users.insert(name, encode(&row).as_slice())?;
        self.audit_row(
            Audit {
                actor,
                action,
                entity: ChangeEntity::User,
                target: name,
                outcome: AuditOutcome::Applied,
                before,
                after: user_json(&row),
            },
            at_ms,
        )?;
        Ok(Ok(()))
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn login_attempt(
        &mut self,
        name: &str,
        computer: &str,
        address: &str,
        success: bool,
        failures_max: u32,
        lockout_ms: i64,
        at_ms: i64,
    ) -> Applied<LoginAttempt> {
        let Some(mut row) = self.user_row(name)? else {
            return Ok(Err(WriteError::Refused(AdminRefusal::NotFound(format!(
                "user {name}"
            )))));
        };
        let actor = Actor {
            user: name.to_string(),
            computer: computer.to_string(),
        };
        let known = match self.login_failures.get((name, address))? {
            Some(bytes) => Some(decode::<LoginFailureRow>(bytes.value(), "login failures")?),
            None => None,
        };
        let mut failure = known.clone().unwrap_or_default();
        // Checked again here, in the transaction that records the attempt: a lock or a
        // disable that happened while the password was being checked still refuses.
        let locked_until_ms = row.locked_until_ms.max(failure.locked_until_ms);
        let locked = locked_until_ms > at_ms;
        let (action, outcome, granted, detail) = if row.disabled {
            (
                "user.login",
                AuditOutcome::Denied,
                false,
                "account disabled",
            )
        } else if locked {
            (
                "user.login",
                AuditOutcome::Denied,
                false,
                "account locked for this address",
            )
        } else if success {
            row.failed_logins = 0;
            row.last_login_ms = at_ms;
            failure = LoginFailureRow::default();
            ("user.login", AuditOutcome::Applied, true, "")
        } else {
            row.failed_logins = row.failed_logins.saturating_add(1);
            failure.failures = failure.failures.saturating_add(1);
            failure.last_at_ms = at_ms;
            if failure.failures >= failures_max.max(1) {
                failure.failures = 0;
                failure.locked_until_ms = at_ms.saturating_add(lockout_ms);
                (
                    "user.lockout",
                    AuditOutcome::Denied,
                    false,
                    "wrong password; account locked for this address",
                )
            } else {
                ("user.login", AuditOutcome::Denied, false, "wrong password")
            }
        };
        self.users.insert(name, encode(&row).as_slice())?;
        if failure == LoginFailureRow::default() {
            if known.is_some() {
                self.login_failures.remove((name, address))?;
            }
        } else if known.as_ref() != Some(&failure) {
            if known.is_none() {
                self.forget_least_recent_address(name)?;
            }
            self.login_failures
                .insert((name, address), encode(&failure).as_slice())?;
        }
        self.audit_row(
            Audit {
                actor: &actor,
                action,
                entity: ChangeEntity::User,
                target: name,
                outcome,
                before: String::new(),
                after: if detail.is_empty() {
                    String::new()
                } else {
                    json!({ "refused": detail, "address": address }).to_string()
                },
            },
            at_ms,
        )?;
        let locked_until_ms = row.locked_until_ms.max(failure.locked_until_ms);
        Ok(Ok(LoginRecorded {
            granted,
            disabled: row.disabled,
            locked_until_ms: if locked_until_ms > at_ms {
                locked_until_ms
            } else {
                0
            },
        }))
    }

    /// Makes room for one more address of `name` in `login_failures`: at the bound, the
    /// address of the least recent failure is forgotten.
    fn forget_least_recent_address(&mut self, name: &str) -> Result<(), StorageError> {
        let mut count = 0usize;
        let mut oldest: Option<(String, i64)> = None;
        for entry in self.login_failures.range((name, "")..)? {
            let (key, value) = entry?;
            let (user, address) = key.value();
            if user != name {
                break;
            }
            count += 1;
            let row: LoginFailureRow = decode(value.value(), "login failures")?;
            if oldest.as_ref().is_none_or(|(_, at)| row.last_at_ms < *at) {
                oldest = Some((address.to_string(), row.last_at_ms));
            }
        }
        if count >= limits::LOGIN_ADDRESSES_PER_USER_MAX {
            if let Some((address, _)) = oldest {
                self.login_failures.remove((name, address.as_str()))?;
            }
        }
        Ok(())
    }

    /// Forgets every address's failures and locks of `name` (unlock, new password).
    fn clear_login_failures(&mut self, name: &str) -> Result<(), StorageError> {
        let mut addresses = Vec::new();
        for entry in self.login_failures.range((name, "")..)? {
            let (key, _) = entry?;
            let (user, address) = key.value();
            if user != name {
                break;
            }
            addresses.push(address.to_string());
        }
        for address in addresses {
            self.login_failures.remove((name, address.as_str()))?;
        }
        Ok(())
    }

    fn user_row(&self, name: &str) -> Result<Option<UserRow>, StorageError> {
        match self.users.get(name)? {
            Some(bytes) => Ok(Some(decode(bytes.value(), "user")?)),
            None => Ok(None),
        }
    }

    // ---------------------------------------------------------------- shared

    /// The steps every edit of an existing versioned record takes, in this order and only
    /// here: check the version the client saw (a stale one is audited as a conflict, with
    /// what was attempted, and refused with `EditRefusal::Stale`; nothing else is written),
    /// then `write` the record at the next version, log the change and audit it as applied.
    /// A refusal from `write` (an unknown annotation, say) writes nothing.
    fn versioned_update(
        &mut self,
        update: VersionedUpdate<'_>,
        at_ms: i64,
        write: impl FnOnce(
            &mut Self,
            u64,
        ) -> Result<Result<Written, WriteError<EditRefusal>>, StorageError>,
    ) -> Applied<Edit> {
        let audit = |outcome, before: String, after| Audit {
            actor: update.actor,
            action: update.action,
            entity: update.entity,
            target: update.id,
            outcome,
            before,
            after,
        };
        if update.stored_version != update.expected_version {
            self.audit_row(
                audit(AuditOutcome::Conflict, update.before, update.attempted),
                at_ms,
            )?;
            return Ok(Err(WriteError::Refused(EditRefusal::Stale(Box::new(
                Stale {
                    expected: update.expected_version,
                    version: update.stored_version,
                    entity: update.entity,
                    current: None,
                    target: update.target,
                },
            )))));
        }
        let version = update.stored_version + 1;
        let written = match write(self, version)? {
            Ok(written) => written,
            Err(refusal) => return Ok(Err(refusal)),
        };
        let change_seq = self.logged_change(
            update.entity,
            update.key,
            update.id,
            version,
            at_ms,
            written.summary,
        )?;
        self.audit_row(
            audit(AuditOutcome::Applied, update.before, written.after),
            at_ms,
        )?;
        let mut outcome = edited(update.entity, update.key, update.id, version, change_seq);
        outcome.annotation_id = written.annotation_id;
        Ok(Ok(outcome))
    }

    /// Records a change and returns its seq.
    fn logged_change(
        &mut self,
        entity: ChangeEntity,
        key: u64,
        id: &str,
        version: u64,
        at_ms: i64,
        summary: String,
    ) -> Result<u64, StorageError> {
        self.change(entity, key, id, version, at_ms, summary)?;
        Ok(self.state.change_last_seq)
    }

    pub(crate) fn audit_row(&mut self, audit: Audit<'_>, at_ms: i64) -> Result<(), StorageError> {
        let seq = self.state.audit_last_seq + 1;
        let row = AuditRow {
            at_ms,
            user: audit.actor.user.clone(),
            computer: audit.actor.computer.clone(),
            action: audit.action.to_string(),
            entity: audit.entity.to_u8(),
            target: audit.target.to_string(),
            outcome: audit.outcome.to_u8(),
            before: audit.before,
            after: audit.after,
        };
        insert_new(&mut self.audit, seq, &encode(&row), "audit")?;
        self.state.audit_last_seq = seq;
        Ok(())
    }
}

fn edited(entity: ChangeEntity, key: u64, id: &str, version: u64, change_seq: u64) -> Edited {
    Edited {
        entity,
        key,
        id: id.to_string(),
        version,
        change_seq,
        annotation_id: None,
        replayed: false,
    }
}

/// A transfer to record, as the edit names it.
struct NewTransfer<'a> {
    patient_id: &'a str,
    treatment_name: &'a str,
    transferred_at_ms: i64,
    embryo_ids: &'a [String],
    comment: &'a str,
}

fn transfer_json(row: &TransferRow, embryo_ids: &[String]) -> String {
    json!({
        "transferred_at_ms": row.transferred_at_ms,
        "embryo_ids": embryo_ids,
        "outcome": row.outcome,
        "comment": row.comment,
        "version": row.version,
    })
    .to_string()
}

/// An API key's audited state: never the secret's hash.
fn api_key_json(row: &ApiKeyRow) -> String {
    json!({
        "name": row.name,
        "scope": ApiScope::from_u8(row.scope).map_or("unknown", ApiScope::as_str),
        "revoked_at_ms": row.revoked_at_ms,
    })
    .to_string()
}

fn not_found(what: String) -> WriteError<EditRefusal> {
    WriteError::Refused(EditRefusal::NotFound(what))
}

fn annotation_row(input: &AnnotationInput, actor: &Actor, at_ms: i64) -> AnnotationRow {
    AnnotationRow {
        name: input.name.clone(),
        value: input.value.clone(),
        event_at_ms: input.event_at_ms,
        source: input.source.to_u8(),
        set_by: actor.user.clone(),
        set_at_ms: at_ms,
    }
}

fn annotation_json(annotation_id: u64, row: &AnnotationRow) -> serde_json::Value {
    json!({
        "annotation_id": annotation_id,
        "name": row.name,
        "value": row.value,
        "event_at_ms": row.event_at_ms,
        "source": AnnotationSource::from_u8(row.source).map_or("unknown", AnnotationSource::as_str),
        "set_by": row.set_by,
        "set_at_ms": row.set_at_ms,
    })
}

/// What a refused embryo edit tried to do, for the audit trail.
fn attempt_json(edit: &ClinicalEdit) -> String {
    let value = match edit {
        ClinicalEdit::AddAnnotation { annotation, .. } => json!({
            "name": annotation.name, "value": annotation.value,
            "event_at_ms": annotation.event_at_ms, "source": annotation.source.as_str(),
        }),
        ClinicalEdit::ChangeAnnotation {
            annotation_id,
            annotation,
            ..
        } => json!({
            "annotation_id": annotation_id, "name": annotation.name, "value": annotation.value,
            "event_at_ms": annotation.event_at_ms, "source": annotation.source.as_str(),
        }),
        ClinicalEdit::RemoveAnnotation { annotation_id, .. } => {
            json!({ "remove_annotation_id": annotation_id })
        }
        ClinicalEdit::SetFate { fate, .. } => json!({ "fate": fate.as_str() }),
        ClinicalEdit::SetEmbryoComment { comment, .. } => json!({ "comment": comment }),
        ClinicalEdit::SetScore { score, .. } => json!({
            "model": score.model, "model_version": score.model_version,
            "value": score.value, "viability": score.viability,
        }),
        ClinicalEdit::Evaluate { model, version, .. } => json!({
            "evaluate": model, "version": version,
        }),
        _ => json!({}),
    };
    value.to_string()
}

fn patient_json(row: &PatientRow) -> String {
    json!({
        "patient_id": row.patient_id,
        "first_name": row.first_name,
        "last_name": row.last_name,
        "date_of_birth": row.date_of_birth,
        "version": row.version,
    })
    .to_string()
}

fn treatment_json(row: &TreatmentRow) -> String {
    json!({ "name": row.name, "comment": row.comment, "version": row.version }).to_string()
}

/// A user's audited state: never the password hash.
fn user_json(row: &UserRow) -> String {
    json!({
        "rights": Rights::from_u8(row.rights).map_or("unknown", Rights::as_str),
        "disabled": row.disabled,
        "password_changed_at_ms": row.password_changed_at_ms,
    })
    .to_string()
}
