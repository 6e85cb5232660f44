//! API keys of the HTTP API: who may call which `/v1` route.
//!
//! A key is a random string (`ecars_` and 43 base64url characters, 256 bits) that its holder
//! sends as `Authorization: Bearer`. The server keeps only its SHA-256 hash, with a name and the
//! scopes it grants, one key per line of a file (`ECARS_API_KEYS_FILE`):
//!
//! ```text
//! # name            hash                                                                     scopes
//! ops-dashboard     sha256:4f3c…(64 hex digits)                                              fleet:read,cases:read
//! salesforce        sha256:9a1b…                                                             relay-tokens:mint
//! ```
//!
//! SHA-256 rather than a password hash (argon2) on purpose: the keys are 256 random bits, so a
//! stolen file cannot be brute-forced anyway, and every request checks a key; a
//! deliberately slow hash would let anyone without a key buy our CPU by the request.

use std::collections::HashMap;
use std::fmt;

use sha2::{Digest, Sha256};

/// What a key may do. The names are what the file and the API's errors say.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Scope {
    /// Read the fleet: `/v1/vehicles`, any car's telemetry; also mint live-view tokens, which
    /// show the same data live.
    FleetRead,
    /// Read the rejected messages: `/v1/dead-letters`.
    DeadLettersRead,
    /// Read the case outbox: `GET /v1/cases`.
    CasesRead,
    /// Re-queue failed Cases: `POST /v1/cases/{key}/retry`.
    CasesWrite,
    /// Mint live-view tokens for any car: `POST /v1/relay-tokens` (a Salesforce Named
    /// Credential).
    RelayTokensMint,
    /// Read how the service is doing: `GET /v1/status` (no car's data).
    StatusRead,
}

impl Scope {
    /// Every scope.
    pub const ALL: [Scope; 6] = [
        Scope::FleetRead,
        Scope::DeadLettersRead,
        Scope::CasesRead,
        Scope::CasesWrite,
        Scope::RelayTokensMint,
        Scope::StatusRead,
    ];

    /// The scope's name, as in the file.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::FleetRead => "fleet:read",
            Scope::DeadLettersRead => "dead-letters:read",
            Scope::CasesRead => "cases:read",
            Scope::CasesWrite => "cases:write",
            Scope::RelayTokensMint => "relay-tokens:mint",
            Scope::StatusRead => "status:read",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A scope name that is not one of [`Scope::ALL`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown scope {0:?} (known: fleet:read, dead-letters:read, cases:read, cases:write, relay-tokens:mint, status:read)")]
pub struct UnknownScope(pub String);

impl std::str::FromStr for Scope {
    type Err = UnknownScope;

    fn from_str(text: &str) -> Result<Scope, UnknownScope> {
        Scope::ALL
            .into_iter()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| UnknownScope(text.to_owned()))
    }
}

/// A set of scopes.
#[derive(Clone, Copy, Default, PartialEq, Eq)]
pub struct Scopes(u8);

impl Scopes {
    /// Whether `scope` is in the set.
    pub fn contains(self, scope: Scope) -> bool {
        self.0 & scope.bit() != 0
    }

    /// The set with `scope` added.
    pub fn with(self, scope: Scope) -> Scopes {
        Scopes(self.0 | scope.bit())
    }

    /// The scopes in the set, in [`Scope::ALL`] order.
    pub fn iter(self) -> impl Iterator<Item = Scope> {
        Scope::ALL.into_iter().filter(move |s| self.contains(*s))
    }
}

impl FromIterator<Scope> for Scopes {
    fn from_iter<I: IntoIterator<Item = Scope>>(iter: I) -> Scopes {
        iter.into_iter().fold(Scopes::default(), Scopes::with)
    }
}

impl fmt::Debug for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set()
            .entries(self.iter().map(Scope::as_str))
            .finish()
    }
}

impl fmt::Display for Scopes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.iter().map(Scope::as_str).collect();
        f.write_str(&names.join(","))
    }
}

/// Who a key belongs to and what it may do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ApiKeyHolder {
    /// The key's name in the file (logs and metrics say it, never the key).
    pub name: String,
    /// What it may do.
    pub scopes: Scopes,
}

/// A line of the keys file that cannot be used; the file is refused whole, so a typo never
/// silently drops a key or widens one.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct ApiKeysError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub reason: String,
}

/// The keys of a keys file, found by the hash of the presented key.
#[derive(Clone, Debug, Default)]
pub struct ApiKeys {
    by_hash: HashMap<[u8; 32], ApiKeyHolder>,
}

/// Prefix of the hashes in the file, naming the algorithm so another can follow.
const HASH_PREFIX: &str = "sha256:";

/// The hash of `key` as the file writes it (`sha256:` and 64 hex digits).
pub fn key_hash(key: &str) -> String {
    format!("{HASH_PREFIX}{}", hex::encode(digest(key)))
}

fn digest(key: &str) -> [u8; 32] {
    Sha256::digest(key.as_bytes()).into()
}

/// The line of the keys file for `key` with `name` and `scopes`.
pub fn key_line(name: &str, key: &str, scopes: Scopes) -> String {
    format!("{name} {} {scopes}", key_hash(key))
}

impl ApiKeys {
    /// Parses a keys file: one `name hash scopes` line per key (scopes comma-separated), blank
    /// lines and `#` comments ignored.
    pub fn parse(text: &str) -> Result<ApiKeys, ApiKeysError> {
        let mut keys = ApiKeys::default();
        let mut names = std::collections::HashSet::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let err = |reason: String| ApiKeysError { line, reason };
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let fields: Vec<&str> = content.split_whitespace().collect();
            let [name, hash, scopes] = fields[..] else {
                return Err(err(format!(
                    "expected `name sha256:HEX scope[,scope]`, got {} fields",
                    fields.len()
                )));
            };
            let hex_digest = hash
                .strip_prefix(HASH_PREFIX)
                .ok_or_else(|| err(format!("the hash must start with {HASH_PREFIX}")))?;
            let mut bytes = [0u8; 32];
            hex::decode_to_slice(hex_digest, &mut bytes)
                .map_err(|_| err("the hash must be 64 hexadecimal digits".into()))?;
            let scopes = scopes
                .split(',')
                .map(|s| s.trim().parse::<Scope>())
                .collect::<Result<Scopes, _>>()
                .map_err(|e| err(e.to_string()))?;
            if !names.insert(name.to_owned()) {
                return Err(err(format!("the name {name:?} is used twice")));
            }
            if keys.by_hash.contains_key(&bytes) {
                return Err(err("the same key is listed twice".into()));
            }
            keys.by_hash.insert(
                bytes,
                ApiKeyHolder {
                    name: name.to_owned(),
                    scopes,
                },
            );
        }
        Ok(keys)
    }

    /// Adds a key given in clear (the older single `ECARS_RELAY_API_KEY`).
    pub fn insert(&mut self, key: &str, holder: ApiKeyHolder) {
        self.by_hash.insert(digest(key), holder);
    }

    /// The holder of `presented`, if it is a key of this set. A lookup by hash: how long it
    /// takes says nothing about how close a guess came.
    pub fn holder(&self, presented: &str) -> Option<&ApiKeyHolder> {
        self.by_hash.get(&digest(presented))
    }

    /// How many keys there are.
    pub fn len(&self) -> usize {
        self.by_hash.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_hash.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ecars_test-key-one";

    #[test]
    fn a_key_is_found_by_its_hash_with_its_scopes() {
        let text = format!(
            "# keys\n\n{}   # the ops dashboard\nsf {} relay-tokens:mint\n",
            key_line(
                "ops",
                KEY,
                [Scope::FleetRead, Scope::CasesRead].into_iter().collect()
            ),
            key_hash("another")
        );
        let keys = ApiKeys::parse(&text).unwrap();
        assert_eq!(keys.len(), 2);
        let ops = keys.holder(KEY).unwrap();
        assert_eq!(ops.name, "ops");
        assert!(ops.scopes.contains(Scope::FleetRead));
        assert!(ops.scopes.contains(Scope::CasesRead));
        assert!(!ops.scopes.contains(Scope::CasesWrite));
        assert_eq!(ops.scopes.to_string(), "fleet:read,cases:read");
        assert_eq!(keys.holder("another").unwrap().name, "sf");
        assert!(keys.holder("ecars_test-key-onf").is_none());
        assert!(keys.holder("").is_none());
    }

    #[test]
    fn a_bad_line_refuses_the_file_and_says_where() {
        let good = key_line("a", "k1", Scopes::default().with(Scope::FleetRead));
        for (bad, says) in [
            ("b sha256:abc fleet:read", "64 hexadecimal"),
            (
                &format!("b {} fleet:write", key_hash("k2")),
                "unknown scope",
            ),
            (&format!("b md5:{} fleet:read", "0".repeat(64)), "sha256:"),
            ("b fleet:read", "got 2 fields"),
            (&format!("a {} fleet:read", key_hash("k2")), "used twice"),
            (&format!("c {} fleet:read", key_hash("k1")), "listed twice"),
        ] {
            let err = ApiKeys::parse(&format!("{good}\n{bad}\n")).unwrap_err();
            assert_eq!(err.line, 2, "{bad}");
            assert!(err.to_string().contains(says), "{bad}: {err}");
        }
    }

    #[test]
    fn scope_names_round_trip() {
        for scope in Scope::ALL {
            assert_eq!(scope.as_str().parse::<Scope>().unwrap(), scope);
        }
        assert!("fleet".parse::<Scope>().is_err());
    }
}
