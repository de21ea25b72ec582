//! Who calls the public API: login tokens (the original API's `/LOGIN`, and `POST
//! /api/v1/login`) and API keys (`esk_<key id>_<secret>`, made by `esserver apikey create`).
//!
//! A token is 32 hex characters (the original's form), valid while used at least once per
//! [`TOKEN_IDLE`] and for [`TOKEN_LIFETIME`] at most; then the client gets 401 and logs in
//! again. Tokens live in memory only: a restart logs every API client out. Each use checks
//! the account in the store, so disabling a user ends its tokens at once. An API key is
//! checked against the SHA-256 of its secret in the store on every request, so a revoked
//! key stops working at once.

use es_storage::{Actor, Rights, Store};
use parking_lot::Mutex;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A token unused for this long expires.
pub const TOKEN_IDLE: Duration = Duration::from_secs(30 * 60);
/// A token expires this long after the login however much it is used.
pub const TOKEN_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// Live tokens at most; a login beyond it drops the least recently used token.
pub const TOKENS_MAX: usize = 4096;
/// The prefix of every API key.
pub const KEY_PREFIX: &str = "esk_";

pub use crate::edits::Grant;

/// An authenticated caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// `user:NAME` or `key:KEY_ID`: scopes Idempotency-Keys and names the caller in logs.
    pub id: String,
    /// Who the audit trail names: the user, or `api-key:<id> (<name>)`.
    pub actor_user: String,
    pub grant: Grant,
}

impl Principal {
    pub fn actor(&self, peer: std::net::SocketAddr) -> Actor {
        Actor {
            user: self.actor_user.clone(),
            computer: format!("api {}", peer.ip()),
        }
    }
}

struct TokenEntry {
    user: String,
    rights: Rights,
    created: Instant,
    last_used: Instant,
}

/// The live login tokens.
pub struct Tokens {
    map: Mutex<HashMap<String, TokenEntry>>,
}

impl Default for Tokens {
    fn default() -> Self {
        Tokens {
            map: Mutex::new(HashMap::new()),
        }
    }
}

impl Tokens {
    /// A new token for `user`; None without randomness.
    pub fn issue(&self, user: &str, rights: Rights, now: Instant) -> Option<String> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).ok()?;
        let token = hex::encode_upper(bytes);
        let mut map = self.map.lock();
        map.retain(|_, entry| !expired(entry, now));
        if map.len() >= TOKENS_MAX {
            let oldest = map
                .iter()
                .min_by_key(|(_, entry)| entry.last_used)
                .map(|(token, _)| token.clone());
            if let Some(oldest) = oldest {
                map.remove(&oldest);
            }
        }
        map.insert(
            token.clone(),
            TokenEntry {
                user: user.to_string(),
                rights,
                created: now,
                last_used: now,
            },
        );
        Some(token)
    }

    /// The user and rights of a live token, refreshing its idle timer.
    pub fn check(&self, token: &str, now: Instant) -> Option<(String, Rights)> {
        let mut map = self.map.lock();
        let entry = map.get_mut(token)?;
        if expired(entry, now) {
            map.remove(token);
            return None;
        }
        entry.last_used = now;
        Some((entry.user.clone(), entry.rights))
    }

    /// The user and rights of a live token, without refreshing its idle timer (a page's
    /// background requests: they must not keep an unattended screen logged in).
    pub fn peek(&self, token: &str, now: Instant) -> Option<(String, Rights)> {
        let mut map = self.map.lock();
        let entry = map.get(token)?;
        if expired(entry, now) {
            map.remove(token);
            return None;
        }
        Some((entry.user.clone(), entry.rights))
    }

    /// True while the token is live, without refreshing its idle timer.
    pub fn is_live(&self, token: &str, now: Instant) -> bool {
        self.map
            .lock()
            .get(token)
            .is_some_and(|entry| !expired(entry, now))
    }

    pub fn revoke(&self, token: &str) -> bool {
        self.map.lock().remove(token).is_some()
    }

    pub fn len(&self) -> usize {
        self.map.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn expired(entry: &TokenEntry, now: Instant) -> bool {
    now.saturating_duration_since(entry.last_used) >= TOKEN_IDLE
        || now.saturating_duration_since(entry.created) >= TOKEN_LIFETIME
}

/// A new API key: (key id, the whole key to hand out once, SHA-256 of its secret).
pub fn new_api_key() -> Result<(String, String, [u8; 32]), String> {
    let mut id = [0u8; 8];
    let mut secret = [0u8; 32];
    getrandom::fill(&mut id).map_err(|e| format!("no randomness for an API key: {e}"))?;
    getrandom::fill(&mut secret).map_err(|e| format!("no randomness for an API key: {e}"))?;
    let key_id = hex::encode(id);
    let secret = hex::encode(secret);
    let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
    Ok((
        key_id.clone(),
        format!("{KEY_PREFIX}{key_id}_{secret}"),
        digest,
    ))
}

/// Splits `esk_<16 hex>_<64 hex>` into (key id, secret); None when it is not of that form.
pub fn parse_api_key(text: &str) -> Option<(&str, &str)> {
    let rest = text.strip_prefix(KEY_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let hex_of = |s: &str, n: usize| {
        s.len() == n
            && s.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    (hex_of(id, 16) && hex_of(secret, 64)).then_some((id, secret))
}

/// Why a credential was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    /// None was sent.
    Missing,
    /// Unknown, expired, revoked or wrong.
    Invalid,
    /// The store could not be read.
    Unavailable(String),
}

/// Checks an API key against the store (runs on a worker: it reads the store).
pub fn check_api_key(store: &Store, key: &str) -> Result<Principal, Refused> {
    let (key_id, secret) = parse_api_key(key).ok_or(Refused::Invalid)?;
    let record = store
        .read()
        .and_then(|reader| reader.api_key(key_id))
        .map_err(|error| Refused::Unavailable(error.to_string()))?
        .ok_or(Refused::Invalid)?;
    let digest: [u8; 32] = Sha256::digest(secret.as_bytes()).into();
    // Compares every byte whatever differs first.
    let differs = digest
        .iter()
        .zip(record.secret_sha256.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if differs != 0 || record.revoked_at_ms != 0 {
        return Err(Refused::Invalid);
    }
    Ok(Principal {
        id: format!("key:{key_id}"),
        actor_user: format!("api-key:{key_id} ({})", record.name),
        grant: Grant::Key(record.scope),
    })
}

/// The credential a request carries: `Authorization: Bearer <token or key>`, or the
/// original API's `API-token: <token>` header.
pub fn credential(request: &es_net::http::Request) -> Option<&str> {
    let bearer = request.header("authorization").and_then(|value| {
        let (scheme, rest) = value.split_once(' ')?;
        scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
    });
    // Another scheme (a proxy's Basic, say) does not hide the original API's header.
    bearer.or_else(|| request.header("api-token").map(str::trim))
}

/// Checks whatever credential the request carries.
pub fn authenticate(
    store: &Store,
    tokens: &Tokens,
    request: &es_net::http::Request,
    now: Instant,
) -> Result<Principal, Refused> {
    let credential = credential(request).ok_or(Refused::Missing)?;
    if credential.starts_with(KEY_PREFIX) {
        return check_api_key(store, credential);
    }
    let (user, _) = tokens.check(credential, now).ok_or(Refused::Invalid)?;
    // The account as it is now: a disabled or removed user's tokens stop at once, and
    // changed rights apply from the next request.
    let record = store
        .read()
        .and_then(|reader| reader.user(&user))
        .map_err(|error| Refused::Unavailable(error.to_string()))?;
    let rights = match record {
        Some(record) if !record.disabled => record.rights,
        _ => {
            tokens.revoke(credential);
            return Err(Refused::Invalid);
        }
    };
    Ok(Principal {
        id: format!("user:{user}"),
        actor_user: user,
        grant: Grant::User(rights),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_expire_when_idle_or_old() {
        let tokens = Tokens::default();
        let t0 = Instant::now();
        let token = tokens.issue("anna", Rights::Edit, t0).unwrap();
        assert_eq!(token.len(), 32);
        assert!(token.bytes().all(|b| b.is_ascii_hexdigit()));
        let later = t0 + TOKEN_IDLE - Duration::from_secs(1);
        assert_eq!(
            tokens.check(&token, later),
            Some(("anna".to_string(), Rights::Edit))
        );
        // Used just now, so idle time starts again; but the lifetime is absolute.
        assert!(tokens.check(&token, later + TOKEN_IDLE / 2).is_some());
        assert!(tokens.check(&token, t0 + TOKEN_LIFETIME).is_none());
        let idle = tokens.issue("bo", Rights::View, t0).unwrap();
        assert!(tokens.check(&idle, t0 + TOKEN_IDLE).is_none());
        // A peek (a page's background request) does not refresh the idle timer.
        let quiet = tokens.issue("di", Rights::View, t0).unwrap();
        assert!(tokens.peek(&quiet, later).is_some());
        assert!(tokens.peek(&quiet, t0 + TOKEN_IDLE).is_none());
        assert!(
            tokens.check(&quiet, t0 + TOKEN_IDLE).is_none(),
            "expired, and forgotten"
        );
        let other = tokens.issue("cy", Rights::View, t0).unwrap();
        assert!(tokens.revoke(&other));
        assert!(tokens.check(&other, t0).is_none());
    }

    #[test]
    fn api_keys_have_one_form() {
        let (id, key, digest) = new_api_key().unwrap();
        let (parsed_id, secret) = parse_api_key(&key).unwrap();
        assert_eq!(parsed_id, id);
        assert_eq!(<[u8; 32]>::from(Sha256::digest(secret.as_bytes())), digest);
        for bad in [
            "",
            "esk_",
            "esk_0123_abcd",
            &key.to_uppercase(),
            &format!("{key}0"),
            &key.replace("esk_", "esx_"),
        ] {
            assert!(parse_api_key(bad).is_none(), "{bad}");
        }
    }
}
