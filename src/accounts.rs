//! Accounts: passwords (argon2id, the manual's policy), the login check (disabled, locked
//! per address, wrong password) and the audit of logins for users that do not exist. The
//! viewer port, the public API and the web interface all log in through here; the
//! attempt itself is recorded by the storage writer (`LoginAttempt`), which also locks an
//! account after too many failures.

use crate::now_ms;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use es_storage::{Actor, Rights, Store, Writer};

/// Longest password accepted, in bytes (argon2 takes any length; this bounds the work).
pub const PASSWORD_BYTES_MAX: usize = 128;

/// The manual's policy (section 1.8): at least 8 characters with an upper-case letter, a
/// lower-case letter, a digit and a special character. Checked on every set and change.
pub fn check_password_policy(password: &str) -> Result<(), String> {
    let mut missing = Vec::new();
    if password.chars().count() < 8 {
        missing.push("at least 8 characters");
    }
    if !password.chars().any(char::is_uppercase) {
        missing.push("an upper-case letter");
    }
    if !password.chars().any(char::is_lowercase) {
        missing.push("a lower-case letter");
    }
    if !password.chars().any(|c| c.is_ascii_digit()) {
        missing.push("a digit");
    }
    if !password
        .chars()
        .any(|c| !c.is_alphanumeric() && !c.is_whitespace())
    {
        missing.push("a special character (such as ! # % - _)");
    }
    if password.len() > PASSWORD_BYTES_MAX {
        return Err(format!(
            "the password is longer than {PASSWORD_BYTES_MAX} bytes"
        ));
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "the password does not meet the policy; it needs {}",
            missing.join(", ")
        ))
    }
}

/// An argon2id PHC string of `password` with a fresh random salt.
pub fn hash_password(password: &str) -> Result<String, String> {
    let mut salt = [0u8; 16];
    getrandom::fill(&mut salt).map_err(|error| format!("no randomness for a salt: {error}"))?;
    let salt = SaltString::encode_b64(&salt).map_err(|error| error.to_string())?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|error| format!("cannot hash the password: {error}"))
}

/// True when `password` matches the PHC string. A malformed stored hash never matches.
pub fn verify_password(password: &str, phc: &str) -> bool {
    let Ok(hash) = PasswordHash::new(phc) else {
        return false;
    };
    Argon2::default()
        .verify_password(password.as_bytes(), &hash)
        .is_ok()
}

/// A hash to verify against when the user does not exist, so that the answer takes as long
/// as for a real user and does not tell which user names exist.
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password("Dummy-password-1").unwrap_or_default())
}

/// What a worker found for a Login.
pub enum LoginCheck {
    UnknownUser,
    Disabled,
    Locked { until_ms: i64 },
    Wrong,
    Correct { rights: Rights },
    Unavailable(String),
}

/// The one answer to every refused login (unknown user, wrong password, disabled, locked).
pub const LOGIN_REFUSED: &str = "wrong user name or password, or the account is \
    disabled or locked for this computer after too many failed logins; an administrator can \
    check and unlock it";

/// Runs on a worker: the user's state and the password check (argon2id). `address` is where
/// the attempt comes from: a lock is per account and address. The user name is compared
/// without regard to case (`Reader::user_for_login`); the account's name as stored is
/// returned with the outcome (the name given when there is no such account), and is the one
/// to record the attempt and issue the session for.
pub fn check_password(
    store: &Store,
    user: &str,
    password: &str,
    address: &str,
) -> (String, LoginCheck) {
    let record = match store.read().and_then(|reader| reader.user_for_login(user)) {
        Ok(record) => record,
        Err(error) => return (user.to_string(), LoginCheck::Unavailable(error.to_string())),
    };
    let Some(record) = record else {
        verify_password(password, dummy_hash());
        return (user.to_string(), LoginCheck::UnknownUser);
    };
    let name = record.name.clone();
    (name, password_check(&record, password, address))
}

fn password_check(record: &es_storage::UserRecord, password: &str, address: &str) -> LoginCheck {
    if record.disabled {
        return LoginCheck::Disabled;
    }
    let now = now_ms();
    let address_lock = record
        .locks
        .iter()
        .filter(|(locked, _)| locked == address)
        .map(|(_, until)| *until)
        .max()
        .unwrap_or(0);
    let until_ms = record.locked_until_ms.max(address_lock);
    if until_ms > now {
        return LoginCheck::Locked { until_ms };
    }
    if verify_password(password, &record.password_hash) {
        LoginCheck::Correct {
            rights: record.rights,
        }
    } else {
        LoginCheck::Wrong
    }
}

/// Records a login attempt for a user that does not exist in the audit trail (best effort:
/// when the storage queue is full it is logged instead).
pub fn audit_unknown_user(writer: &Writer, user: &str, computer: &str) {
    let actor = Actor {
        user: user.to_string(),
        computer: computer.to_string(),
    };
    crate::edits::audit_denied(
        writer,
        &actor,
        "user.login",
        r#"{"refused":"unknown user"}"#.into(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_policy_of_the_manual() {
        assert!(check_password_policy("Embryo-2026").is_ok());
        for (weak, needs) in [
            ("Ab1!", "at least 8 characters"),
            ("embryo-2026", "upper-case"),
            ("EMBRYO-2026", "lower-case"),
            ("Embryo-abcd", "digit"),
            ("Embryo2026x", "special"),
        ] {
            let error = check_password_policy(weak).unwrap_err();
            assert!(error.contains(needs), "{weak}: {error}");
        }
        assert!(check_password_policy(&format!("Aa1!{}", "x".repeat(200))).is_err());
    }

    #[test]
    fn hashes_are_argon2id_salted_and_verify() {
        let one = hash_password("Embryo-2026").unwrap();
        let two = hash_password("Embryo-2026").unwrap();
        assert!(one.starts_with("$argon2id$"), "{one}");
        assert_ne!(one, two, "each hash has its own salt");
        assert!(verify_password("Embryo-2026", &one));
        assert!(!verify_password("Embryo-2027", &one));
        assert!(!verify_password("Embryo-2026", "not a hash"));
        assert!(!dummy_hash().is_empty());
    }
}
