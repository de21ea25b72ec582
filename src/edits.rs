//! One path for every clinical edit, whichever front end asks (the viewer port, the public
//! API): authorize it (the right each operation needs, from one table), check the disk, audit
//! every refusal, and hand it to the storage writer. The front end only turns the request into
//! a [`ClinicalEdit`] and the outcome into its own protocol's answer.
//!
//! Adding a clinical edit: a variant of `ClinicalEdit` (es-storage), its row in [`needed`]
//! (the compiler asks for it), its conversion in each front end that offers it.

use crate::disk_guard::DiskState;
use crate::now_ms;
use es_storage::{
    Actor, ApiScope, AuditDenied, ChangeEntity, ClinicalEdit, Edit, Idempotency, OpResult, Rights,
    SubmitError, Writer,
};

/// Longest description of a refused edit kept in the audit trail, in characters.
pub const ATTEMPT_CHARS_MAX: usize = 1024;

/// What a caller may do: a user's rights (viewer, web, a REST login) or an API key's scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Grant {
    User(Rights),
    Key(ApiScope),
}

impl Grant {
    /// True when the caller holds `needed`. An API key never holds more than write: it can
    /// change clinical data, never users or the server.
    pub fn allows(self, needed: Rights) -> bool {
        match self {
            Grant::User(rights) => rights.allows(needed),
            Grant::Key(scope) => match needed {
                Rights::View => scope.allows(ApiScope::Read),
                Rights::Edit => scope.allows(ApiScope::Write),
                Rights::Admin => false,
            },
        }
    }

    /// What a caller would need to hold `needed`, for messages.
    fn needs(self, needed: Rights) -> &'static str {
        match (self, needed) {
            (Grant::User(_), Rights::View) => "`view`",
            (Grant::User(_), Rights::Edit) => "`edit`",
            (Grant::User(_), Rights::Admin) => "`admin`",
            (Grant::Key(_), Rights::View) => "an API key with read scope",
            (Grant::Key(_), Rights::Edit) => "an API key with write scope",
            (Grant::Key(_), Rights::Admin) => "a user with `admin` (API keys cannot)",
        }
    }

    fn held(self) -> String {
        match self {
            Grant::User(rights) => format!("the right `{rights}`"),
            Grant::Key(scope) => format!("an API key of scope `{scope}`"),
        }
    }
}

/// The right each clinical edit needs: the one table the front ends' checks come from.
pub fn needed(edit: &ClinicalEdit) -> Rights {
    match edit {
        ClinicalEdit::CreatePatient { .. }
        | ClinicalEdit::UpdatePatient { .. }
        | ClinicalEdit::CreateTreatment { .. }
        | ClinicalEdit::UpdateTreatment { .. }
        | ClinicalEdit::AddAnnotation { .. }
        | ClinicalEdit::ChangeAnnotation { .. }
        | ClinicalEdit::RemoveAnnotation { .. }
        | ClinicalEdit::SetFate { .. }
        | ClinicalEdit::SetEmbryoComment { .. }
        | ClinicalEdit::SetScore { .. }
        | ClinicalEdit::Evaluate { .. }
        | ClinicalEdit::CreateTransfer { .. }
        | ClinicalEdit::UpdateTransfer { .. } => Rights::Edit,
    }
}

/// Who asks for an edit.
#[derive(Debug, Clone)]
pub struct Editor {
    /// Who the audit trail names, and from which computer.
    pub actor: Actor,
    pub grant: Grant,
}

/// Why an edit was not handed to the storage writer. Each front end answers with its own
/// code: viewer `permission_denied` / `disk_full` / `busy` / `shutting_down`, HTTP 403 / 503.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// The caller lacks the right; the attempt is in the audit trail.
    Forbidden(String),
    /// The disk is below its free-space reserve.
    DiskLow,
    /// The storage queue is full; nothing was written.
    Busy,
    ShuttingDown,
}

impl Refused {
    pub fn message(&self) -> String {
        match self {
            Refused::Forbidden(message) => message.clone(),
            Refused::DiskLow => "the server's disk is below its free-space reserve: changes \
                                 cannot be saved now; keep them and retry"
                .into(),
            Refused::Busy => "the server is busy; nothing was saved, retry in a moment".into(),
            Refused::ShuttingDown => "the server is shutting down; nothing was saved".into(),
        }
    }
}

/// Authorizes `edit` for `editor`, checks the disk and submits it as made at `at_ms`; `done`
/// is called with the storage outcome once the edit is durable or refused by storage. A
/// refusal for rights is recorded in the audit trail (best effort: with the storage queue
/// full it is logged).
pub fn submit(
    writer: &Writer,
    disk: &DiskState,
    editor: &Editor,
    edit: ClinicalEdit,
    idempotency: Option<Idempotency>,
    at_ms: i64,
    done: impl FnOnce(OpResult<Edit>) + Send + 'static,
) -> Result<(), Refused> {
    authorize(writer, editor, &edit)?;
    if disk.is_low() {
        return Err(Refused::DiskLow);
    }
    let op = Edit {
        actor: editor.actor.clone(),
        edit,
        idempotency,
        at_ms,
    };
    match writer.try_submit(op, done) {
        Ok(()) => Ok(()),
        Err(SubmitError::Full(..)) => Err(Refused::Busy),
        Err(SubmitError::Closed(..)) => Err(Refused::ShuttingDown),
    }
}

/// Imports a model document for `editor` (edit rights, as for the evaluations it serves),
/// auditing a refusal for lack of rights like an edit's. Blocks until the import is durable: a
/// rare, small write (at most 256 KiB).
pub fn import_model(
    writer: &Writer,
    disk: &DiskState,
    editor: &Editor,
    document: String,
) -> Result<es_storage::OpResult<es_storage::ModelImport>, Refused> {
    if !editor.grant.allows(Rights::Edit) {
        let message = format!(
            "{} has {}; model.import needs {}",
            editor.actor.user,
            editor.grant.held(),
            editor.grant.needs(Rights::Edit)
        );
        tracing::warn!(user = %editor.actor.user, computer = %editor.actor.computer, code = "forbidden", "{message}");
        audit_denied(writer, &editor.actor, "model.import", String::new());
        return Err(Refused::Forbidden(message));
    }
    if disk.is_low() {
        return Err(Refused::DiskLow);
    }
    let op = es_storage::ModelImport {
        actor: editor.actor.clone(),
        document,
        at_ms: now_ms(),
    };
    Ok(writer.write(op))
}

/// The rights check of [`submit`], with its audit entry (a front end with checks of its own
/// to make between the two calls it first).
pub fn authorize(writer: &Writer, editor: &Editor, edit: &ClinicalEdit) -> Result<(), Refused> {
    let needed = needed(edit);
    if editor.grant.allows(needed) {
        return Ok(());
    }
    let action = edit.action();
    let message = format!(
        "{} has {}; {action} needs {}",
        editor.actor.user,
        editor.grant.held(),
        editor.grant.needs(needed)
    );
    tracing::warn!(user = %editor.actor.user, computer = %editor.actor.computer, code = "forbidden", "{message}");
    audit_denied(
        writer,
        &editor.actor,
        action,
        format!("{edit:?}")
            .chars()
            .take(ATTEMPT_CHARS_MAX)
            .collect(),
    );
    Err(Refused::Forbidden(message))
}

/// Records a refused attempt in the audit trail, on the user who made it (best effort: when
/// the storage queue is full it is logged instead).
pub fn audit_denied(writer: &Writer, actor: &Actor, action: &str, attempted: String) {
    let op = AuditDenied {
        actor: actor.clone(),
        action: action.to_string(),
        entity: ChangeEntity::User,
        target: actor.user.clone(),
        attempted,
        at_ms: now_ms(),
    };
    if writer.try_submit(op, |_| {}).is_err() {
        tracing::warn!(user = %actor.user, action, "a refused attempt could not be audited: the storage queue is full");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_never_hold_admin_and_levels_include_the_ones_below() {
        assert!(Grant::Key(ApiScope::Write).allows(Rights::Edit));
        assert!(Grant::Key(ApiScope::Write).allows(Rights::View));
        assert!(!Grant::Key(ApiScope::Read).allows(Rights::Edit));
        assert!(!Grant::Key(ApiScope::Write).allows(Rights::Admin));
        assert!(Grant::User(Rights::Admin).allows(Rights::Edit));
        assert!(!Grant::User(Rights::View).allows(Rights::Edit));
    }
}
