//! Viewer session tokens: issued at a login, resumed after a dropped connection.

use es_storage::Rights;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A new random session token: 48 hex characters.
pub fn new_token(entropy: &mut crate::Entropy) -> Option<String> {
    let mut bytes = [0u8; 24];
    entropy(&mut bytes).then(|| hex::encode(bytes))
}

/// What the registries tell a viewer connection from elsewhere.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Notice {
    /// New changes were committed (push them).
    ChangesCommitted,
    /// Its session was resumed on another connection.
    Superseded,
    /// An administrator disabled its account.
    AccountDisabled,
}

/// A viewer connection as the registries know it: its identity (unique in the process) and
/// how to tell it a [`Notice`].
#[derive(Clone)]
pub struct Peer {
    pub id: u64,
    notify: Arc<dyn Fn(Notice) -> bool + Send + Sync>,
}

impl Peer {
    pub fn new(id: u64, notify: Arc<dyn Fn(Notice) -> bool + Send + Sync>) -> Peer {
        Peer { id, notify }
    }

    /// Tells the connection; false when it could not be told (its loop is busy or gone).
    pub fn notify(&self, notice: Notice) -> bool {
        (self.notify)(notice)
    }
}

/// Sessions one user may hold at once (connected or waiting for a resume).
pub const SESSIONS_PER_USER_MAX: usize = 16;

/// One viewer session, alive while connected and for `resume` after a drop.
pub struct SessionEntry {
    pub user: String,
    pub rights: Rights,
    pub computer: String,
    /// The connection holding the session, if any.
    pub connection: Option<Peer>,
    pub disconnected_at: Option<Instant>,
}

/// The live viewer sessions, by token. Bounded: at most `sessions_max`; expired ones are
/// dropped whenever a session is added.
pub struct Sessions {
    map: Mutex<HashMap<String, SessionEntry>>,
    resume: Duration,
    sessions_max: usize,
}

/// What a Resume found.
pub enum Resumed {
    Ok {
        user: String,
        rights: Rights,
        computer: String,
        /// The connection that held the session until now.
        previous: Option<Peer>,
    },
    Expired,
}

impl Sessions {
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
    pub fn add(&self, token: String, entry: SessionEntry, now: Instant) -> Option<()> {
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
    pub fn resume(&self, token: &str, connection: Peer, now: Instant) -> Resumed {
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
            if entry.connection.as_ref().map(|c| c.id) == Some(connection_id) {
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
            .filter(|s| s.connection.as_ref().is_some_and(|c| c.id != except))
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

fn is_expired(entry: &SessionEntry, resume: Duration, now: Instant) -> bool {
    entry
        .disconnected_at
        .is_some_and(|at| now.saturating_duration_since(at) > resume)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(user: &str, disconnected_at: Option<Instant>) -> SessionEntry {
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
        let sessions: Sessions = Sessions::new(Duration::from_secs(600), 100);
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
}
