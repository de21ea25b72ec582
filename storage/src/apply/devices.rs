//! The browser viewer's devices inside the writer's batch (`crate::devices`).

use super::clinical::Audit;
use super::Batch;
use crate::devices::{DeviceRefusal, DeviceRegister, DeviceRegistered, DeviceRevoke};
use crate::error::WriteError;
use crate::model::{AuditOutcome, ChangeEntity};
use crate::ops::Applied;
use crate::tables::{decode, encode, DeviceRow};
use redb::ReadableTable;

impl Batch<'_> {
    pub(crate) fn device_register(&mut self, op: &DeviceRegister) -> Applied<DeviceRegister> {
        let mut active = 0u32;
        let mut found: Option<DeviceRow> = None;
        for entry in self.devices().range::<&str>(..)? {
            let (key, value) = entry?;
            let row: DeviceRow = decode(value.value(), "device")?;
            if key.value() == op.device_id {
                found = Some(row.clone());
            }
            if row.revoked_at_ms.is_none() {
                active += 1;
            }
        }
        let audit = |outcome, after: String| Audit {
            actor: &op.actor,
            action: "device.register",
            entity: ChangeEntity::Device,
            target: &op.device_id,
            outcome,
            before: String::new(),
            after,
        };
        let (row, created) = match found {
            Some(row) => {
                if let Some(at_ms) = row.revoked_at_ms {
                    let refusal = DeviceRefusal::Revoked {
                        by: row.revoked_by.clone(),
                        at_ms,
                    };
                    self.audit_row(audit(AuditOutcome::Denied, refusal.to_string()), op.at_ms)?;
                    return Ok(Err(WriteError::Refused(refusal)));
                }
                // More devices than the licence allows (registered under a DEMO licence, or
                // before a licence with fewer): none logs in until an administrator revokes
                // enough of them.
                if let Some(limit) = op.limit {
                    if active > limit {
                        let refusal = DeviceRefusal::LimitReached { limit, active };
                        self.audit_row(audit(AuditOutcome::Denied, refusal.to_string()), op.at_ms)?;
                        return Ok(Err(WriteError::Refused(refusal)));
                    }
                }
                let row = DeviceRow {
                    last_login_by: op.actor.user.clone(),
                    last_login_at_ms: op.at_ms,
                    ..row
                };
                (row, false)
            }
            None => {
                if let Some(limit) = op.limit {
                    if active >= limit {
                        let refusal = DeviceRefusal::LimitReached { limit, active };
                        self.audit_row(audit(AuditOutcome::Denied, refusal.to_string()), op.at_ms)?;
                        return Ok(Err(WriteError::Refused(refusal)));
                    }
                }
                active += 1;
                let row = DeviceRow {
                    name: op.name.trim().to_string(),
                    registered_by: op.actor.user.clone(),
                    registered_at_ms: op.at_ms,
                    last_login_by: op.actor.user.clone(),
                    last_login_at_ms: op.at_ms,
                    revoked_at_ms: None,
                    revoked_by: String::new(),
                };
                self.audit_row(
                    audit(
                        AuditOutcome::Applied,
                        serde_json::json!({ "name": row.name }).to_string(),
                    ),
                    op.at_ms,
                )?;
                (row, true)
            }
        };
        self.devices()
            .insert(op.device_id.as_str(), encode(&row).as_slice())?;
        Ok(Ok(DeviceRegistered { created, active }))
    }

    pub(crate) fn device_revoke(&mut self, op: &DeviceRevoke) -> Applied<DeviceRevoke> {
        let row: Option<DeviceRow> = match self.devices().get(op.device_id.as_str())? {
            Some(row) => Some(decode(row.value(), "device")?),
            None => None,
        };
        let Some(mut row) = row else {
            let refusal = DeviceRefusal::NotFound(op.device_id.clone());
            self.audit_row(
                Audit {
                    actor: &op.actor,
                    action: "device.revoke",
                    entity: ChangeEntity::Device,
                    target: &op.device_id,
                    outcome: AuditOutcome::Denied,
                    before: String::new(),
                    after: refusal.to_string(),
                },
                op.at_ms,
            )?;
            return Ok(Err(WriteError::Refused(refusal)));
        };
        if row.revoked_at_ms.is_some() {
            return Ok(Ok(()));
        }
        row.revoked_at_ms = Some(op.at_ms);
        row.revoked_by = op.actor.user.clone();
        self.devices()
            .insert(op.device_id.as_str(), encode(&row).as_slice())?;
        self.audit_row(
            Audit {
                actor: &op.actor,
                action: "device.revoke",
                entity: ChangeEntity::Device,
                target: &op.device_id,
                outcome: AuditOutcome::Applied,
                before: serde_json::json!({ "name": row.name }).to_string(),
                after: String::new(),
            },
            op.at_ms,
        )?;
        Ok(Ok(()))
    }
}
