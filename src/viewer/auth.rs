//! Passwords (argon2id, the manual's policy) and viewer session tokens.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use es_net::ConnHandle;
use es_storage::Rights;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::time::{Duration, Instant};

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

/// A new random session token: 48 hex characters.
pub fn new_token() -> Option<String> {
    let mut bytes = [0u8; 24];
    getrandom::fill(&mut bytes).ok()?;
    Some(hex::encode(bytes))
}

/// Sessions one user may hold at once (connected or waiting for a resume).
pub const SESSIONS_PER_USER_MAX: usize = 16;

/// One viewer session, alive while connected and for `resume` after a drop.
pub struct SessionEntry<M> {
    pub user: String,
    pub rights: Rights,
    pub computer: String,
    /// The connection holding the session, if any.
    pub connection: Option<ConnHandle<M>>,
    pub disconnected_at: Option<Instant>,
}

/// The live viewer sessions, by token. Bounded: at most `sessions_max`; expired ones are
/// dropped whenever a session is added.
pub struct Sessions<M> {
    map: Mutex<HashMap<String, SessionEntry<M>>>,
    resume: Duration,
    sessions_max: usize,
}

/// What a Resume found.
pub enum Resumed<M> {
    Ok {
        user: String,
        rights: Rights,
        computer: String,
        /// The connection that held the session until now.
        previous: Option<ConnHandle<M>>,
    },
    Expired,
}

impl<M: Send + 'static> Sessions<M> {
    pub fn new(resume: Duration, sessions_max: usize) -> Self {
        Sessions {
            map: Mutex::new(HashMap::new()),
            resume,
            sessions_max,
        }
    }

    pub fn resume_duration(&self) -> Duration {
        self.resume
    }

    /// Adds a session; None when the table is full of live sessions. One user holds at most
    /// [`SESSIONS_PER_USER_MAX`]: beyond, that user's oldest disconnected session is dropped
    /// (or, when all are connected, the login is refused), so one account cannot fill the
    /// table for everyone.
    pub fn add(&self, token: String, entry: SessionEntry<M>, now: Instant) -> Option<()> {
        let mut map = self.map.lock();
        let resume = self.resume;
        map.retain(|_, s| !is_expired(s, resume, now));
        let mine: Vec<(String, Option<Instant>)> = map
            .iter()
            .filter(|(_, s)| s.user == entry.user)
            .map(|(token, s)| (token.clone(), s.disconnected_at))
            .collect();
        if mine.len() >= SESSIONS_PER_USER_MAX {
            let oldest = mine
                .iter()
                .filter_map(|(token, at)| at.map(|at| (at, token)))
                .min()
                .map(|(_, token)| token.clone());
            map.remove(&oldest?);
        }
        if map.len() >= self.sessions_max {
            return None;
        }
        map.insert(token, entry);
        Some(())
    }

    /// Attaches the session to `connection` if the token is live.
    pub fn resume(&self, token: &str, connection: ConnHandle<M>, now: Instant) -> Resumed<M> {
        let mut map = self.map.lock();
        let Some(entry) = map.get_mut(token) else {
            return Resumed::Expired;
        };
        if is_expired(entry, self.resume, now) {
            map.remove(token);
            return Resumed::Expired;
        }
        let previous = entry.connection.replace(connection);
        entry.disconnected_at = None;
        Resumed::Ok {
            user: entry.user.clone(),
            rights: entry.rights,
            computer: entry.computer.clone(),
            previous,
        }
    }

    /// The connection `connection_id` dropped: the session waits for a Resume.
    pub fn detach(&self, token: &str, connection_id: u64, now: Instant) {
        let mut map = self.map.lock();
        if let Some(entry) = map.get_mut(token) {
            if entry.connection.as_ref().map(ConnHandle::id) == Some(connection_id) {
                entry.connection = None;
                entry.disconnected_at = Some(now);
            }
        }
    }

    /// Logout: the token stops working.
    pub fn remove(&self, token: &str) {
        self.map.lock().remove(token);
    }

    /// The computers (lowercased) with a connected session, but `except` (a connection).
    pub fn connected_computers(&self, except: u64) -> std::collections::BTreeSet<String> {
        self.map
            .lock()
            .values()
            .filter(|s| s.connection.as_ref().is_some_and(|c| c.id() != except))
            .map(|s| s.computer.to_lowercase())
            .collect()
    }

    /// Sessions alive now (connected or resumable).
    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn is_expired<M>(entry: &SessionEntry<M>, resume: Duration, now: Instant) -> bool {
    entry
        .disconnected_at
        .is_some_and(|at| now.saturating_duration_since(at) > resume)
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

    fn entry(user: &str, disconnected_at: Option<Instant>) -> SessionEntry<()> {
        SessionEntry {
            user: user.into(),
            rights: Rights::View,
            computer: "PC".into(),
            connection: None,
            disconnected_at,
        }
    }

    #[test]
    fn one_user_cannot_fill_the_session_table() {
        let sessions: Sessions<()> = Sessions::new(Duration::from_secs(600), 100);
        let start = Instant::now();
        for n in 0..SESSIONS_PER_USER_MAX {
            let at = start + Duration::from_millis(n as u64);
            assert!(sessions
                .add(format!("anna-{n}"), entry("anna", Some(at)), at)
                .is_some());
        }
        let later = start + Duration::from_secs(1);
        assert!(sessions
            .add("anna-new".into(), entry("anna", None), later)
            .is_some());
        assert_eq!(
            sessions.len(),
            SESSIONS_PER_USER_MAX,
            "the oldest disconnected one went"
        );
        for n in 0..SESSIONS_PER_USER_MAX {
            assert!(sessions
                .add(format!("bert-{n}"), entry("bert", None), later)
                .is_some());
        }
        assert!(
            sessions
                .add("bert-extra".into(), entry("bert", None), later)
                .is_none(),
            "all of bert's sessions are connected: refused"
        );
        // Expired sessions are dropped when another is added.
        let much_later = later + Duration::from_secs(3600);
        assert!(sessions
            .add("carl".into(), entry("carl", None), much_later)
            .is_some());
        assert_eq!(
            sessions.len(),
            SESSIONS_PER_USER_MAX + 1 + 1,
            "anna's disconnected ones expired"
        );
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
