//! MQTT service accounts: subscribers that are not cars (a dashboard, another team's service),
//! each with a name, a password hash and the topic filters it may read. From a file
//! (`ECARS_MQTT_ACCOUNTS_FILE`), one account per line, re-read while running:
//!
//! ```text
//! # name      argon2 hash (PHC string)                              filters it may read
//! # (comments are whole lines: a filter may be `#`)
//! dashboard   $argon2id$v=19$m=19456,t=2,p=1$c2FsdA$…               vehicles/+/telemetry
//! ```
//!
//! Pure code: parsing, password checks and filter coverage; the gateway applies them at CONNECT
//! and SUBSCRIBE.
//!
//! argon2 (the OWASP default parameters) because these are passwords people choose and paste,
//! not random keys: a stolen file must not give them away. Checking one costs ~20 MiB and tens of
//! milliseconds, so a good password, once checked, is remembered (its SHA-256) until the file
//! changes, and the gateway checks one at a time.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use ecars_model::Vin;
use sha2::{Digest, Sha256};

/// A service account.
pub struct MqttAccount {
    /// Its name: the MQTT username, and the start of its client ids.
    pub name: String,
    /// The filters it may subscribe to (or narrower ones).
    pub filters: Vec<String>,
    /// The PHC string of its password's argon2 hash.
    hash: String,
    /// SHA-256 of the last password that verified, so a reconnecting subscriber does not pay
    /// for argon2 again.
    verified: Mutex<Option<[u8; 32]>>,
}

impl std::fmt::Debug for MqttAccount {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the hash.
        f.debug_struct("MqttAccount")
            .field("name", &self.name)
            .field("filters", &self.filters)
            .finish_non_exhaustive()
    }
}

impl MqttAccount {
    /// Whether `password` is the account's. Slow the first time (argon2); blocking.
    pub fn verify_password(&self, password: &[u8]) -> bool {
        let digest: [u8; 32] = Sha256::digest(password).into();
        let remembered = |verified: &Mutex<Option<[u8; 32]>>| {
            verified.lock().map(|v| *v == Some(digest)).unwrap_or(false)
        };
        if remembered(&self.verified) {
            return true;
        }
        let Ok(hash) = PasswordHash::new(&self.hash) else {
            return false;
        };
        let good = Argon2::default().verify_password(password, &hash).is_ok();
        if good {
            if let Ok(mut verified) = self.verified.lock() {
                *verified = Some(digest);
            }
        }
        good
    }

    /// Whether the account may subscribe to `filter`: some filter of its own matches every
    /// topic `filter` matches. A shared subscription (`$share/group/filter`) is judged by its
    /// filter.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        let filter = shared_filter(filter).unwrap_or(filter);
        self.filters.iter().any(|own| filter_covers(own, filter))
    }

    /// Whether `client_id` is one of the account's: its name, alone or followed by `-` and
    /// anything, so one account can never take over another's (or a car's) session.
    pub fn owns_client_id(&self, client_id: &str) -> bool {
        client_id
            .strip_prefix(self.name.as_str())
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('-'))
    }
}

/// The filter of a shared subscription, `None` for any other.
fn shared_filter(filter: &str) -> Option<&str> {
    let rest = filter.strip_prefix("$share/")?;
    let (_group, filter) = rest.split_once('/')?;
    Some(filter)
}

/// Whether every topic that `requested` matches is matched by `allowed` (both valid MQTT topic
/// filters). Topics starting with `$` are matched by no leading wildcard (MQTT 3.1.1 §4.7.2).
pub fn filter_covers(allowed: &str, requested: &str) -> bool {
    let mut own = allowed.split('/');
    let mut asked = requested.split('/');
    let mut first = true;
    loop {
        match (own.next(), asked.next()) {
            (Some("#"), Some(level)) => return !(first && level.starts_with('$')),
            (Some("#"), None) => return true,
            (Some(_), Some("#")) => return false,
            (Some("+"), Some(level)) => {
                if first && level.starts_with('$') {
                    return false;
                }
            }
            (Some(own_level), Some(level)) => {
                if own_level != level {
                    return false;
                }
            }
            (None, None) => return true,
            // `a/#` covers `a` (a `#` matches its parent level too); nothing else does.
            (Some(_), None) => return allowed.ends_with("/#") && own.next().is_none(),
            (None, Some(_)) => return false,
        }
        first = false;
    }
}

/// Whether `filter` is a valid MQTT topic filter: not empty, `#` only as the whole last level,
/// `+` only as a whole level.
fn valid_filter(filter: &str) -> bool {
    if filter.is_empty() {
        return false;
    }
    let levels: Vec<&str> = filter.split('/').collect();
    levels.iter().enumerate().all(|(at, level)| {
        (*level == "#" && at == levels.len() - 1)
            || *level == "+"
            || !(level.contains('#') || level.contains('+'))
    })
}

/// A line of the accounts file that cannot be used; the file is refused whole.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct AccountsError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub reason: String,
}

/// The accounts of an accounts file, by name.
#[derive(Debug, Default)]
pub struct MqttAccounts {
    by_name: HashMap<String, Arc<MqttAccount>>,
}

impl MqttAccounts {
    /// Parses an accounts file: `name hash filter[,filter]` per line; blank lines and lines
    /// starting with `#` ignored (only whole lines: a filter may be `#`).
    pub fn parse(text: &str) -> Result<MqttAccounts, AccountsError> {
        let mut accounts = MqttAccounts::default();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let err = |reason: String| AccountsError { line, reason };
            let content = raw.trim();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = content.split_whitespace().collect();
            let [name, hash, filters] = fields[..] else {
                return Err(err(format!(
                    "expected `name argon2-hash filter[,filter]`, got {} fields",
                    fields.len()
                )));
            };
            let name_ok = name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
            if !name_ok {
                return Err(err(format!(
                    "the name {name:?} may have only letters, digits, - _ ."
                )));
            }
            if Vin::parse(name).is_ok() {
                return Err(err(format!(
                    "the name {name:?} is a VIN: cars log in with those"
                )));
            }
            match PasswordHash::new(hash) {
                Ok(parsed) if parsed.algorithm.as_str().starts_with("argon2") => {}
                _ => {
                    return Err(err(
                        "the hash must be an argon2 PHC string ($argon2id$…)".into()
                    ))
                }
            }
            let filters: Vec<String> = filters.split(',').map(str::to_owned).collect();
            if let Some(bad) = filters.iter().find(|f| !valid_filter(f)) {
                return Err(err(format!("{bad:?} is not a valid topic filter")));
            }
            let account = MqttAccount {
                name: name.to_owned(),
                filters,
                hash: hash.to_owned(),
                verified: Mutex::new(None),
            };
            if accounts
                .by_name
                .insert(name.to_owned(), Arc::new(account))
                .is_some()
            {
                return Err(err(format!("the name {name:?} is used twice")));
            }
        }
        Ok(accounts)
    }

    /// The account named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<MqttAccount>> {
        self.by_name.get(name)
    }

    /// Whether some account owns `client_id`.
    pub fn owns_client_id(&self, client_id: &str) -> bool {
        self.by_name.values().any(|a| a.owns_client_id(client_id))
    }

    /// How many accounts there are.
    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }
}

/// The argon2id hash (PHC string) of `password`, with a random salt, for the accounts file.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coverage_follows_the_wildcards() {
        for (allowed, requested, covered) in [
            ("vehicles/+/telemetry", "vehicles/+/telemetry", true),
            (
                "vehicles/+/telemetry",
                "vehicles/1HGCM82633A004352/telemetry",
                true,
            ),
            ("vehicles/+/telemetry", "vehicles/#", false),
            ("vehicles/+/telemetry", "#", false),
            ("vehicles/+/telemetry", "vehicles/+/commands", false),
            ("vehicles/+/telemetry", "vehicles/+/telemetry/x", false),
            ("vehicles/+/telemetry", "vehicles/+", false),
            ("vehicles/#", "vehicles/a/b/c", true),
            ("vehicles/#", "vehicles", true),
            ("vehicles/#", "vehicles/+/telemetry", true),
            ("vehicles/#", "ecars/data", false),
            ("#", "anything/at/all", true),
            ("#", "$SYS/broker", false),
            ("+/x", "$SYS/x", false),
            ("ecars/data", "ecars/data", true),
            ("ecars/data", "ecars/+", false),
        ] {
            assert_eq!(
                filter_covers(allowed, requested),
                covered,
                "{allowed} covers {requested}"
            );
        }
    }

    fn account(filters: &str) -> Arc<MqttAccount> {
        let hash = hash_password("s3cret-password").unwrap();
        let accounts = MqttAccounts::parse(&format!("dashboard {hash} {filters}\n")).unwrap();
        Arc::clone(accounts.get("dashboard").unwrap())
    }

    #[test]
    fn an_account_reads_its_filters_and_owns_its_client_ids() {
        let dashboard = account("vehicles/+/telemetry,ecars/data");
        assert!(dashboard.may_subscribe("vehicles/+/telemetry"));
        assert!(dashboard.may_subscribe("ecars/data"));
        assert!(dashboard.may_subscribe("$share/ops/vehicles/+/telemetry"));
        assert!(!dashboard.may_subscribe("#"));
        assert!(!dashboard.may_subscribe("$share/ops/#"));
        assert!(dashboard.owns_client_id("dashboard"));
        assert!(dashboard.owns_client_id("dashboard-7"));
        assert!(!dashboard.owns_client_id("dashboards"));
        assert!(!dashboard.owns_client_id("1HGCM82633A004352"));
    }

    #[test]
    fn passwords_are_checked_against_the_hash() {
        let dashboard = account("#");
        assert!(!dashboard.verify_password(b"wrong"));
        assert!(dashboard.verify_password(b"s3cret-password"));
        // Remembered, and still only that password.
        assert!(dashboard.verify_password(b"s3cret-password"));
        assert!(!dashboard.verify_password(b"s3cret-passwore"));
    }

    #[test]
    fn a_bad_line_refuses_the_file_and_says_where() {
        let hash = hash_password("pw").unwrap();
        let good = format!("ok {hash} vehicles/+/telemetry");
        for (bad, says) in [
            (format!("two {hash}"), "got 2 fields"),
            (format!("1HGCM82633A004352 {hash} #"), "is a VIN"),
            (format!("bad/name {hash} #"), "only letters"),
            ("plain notahash #".to_owned(), "argon2"),
            (format!("f {hash} vehicles/#/x"), "not a valid topic filter"),
            (format!("g {hash} vehicles/a+"), "not a valid topic filter"),
            (format!("ok {hash} #"), "used twice"),
        ] {
            let err = MqttAccounts::parse(&format!("{good}\n{bad}\n")).unwrap_err();
            assert_eq!(err.line, 2, "{bad}");
            assert!(err.reason.contains(says), "{bad}: {err}");
        }
        let accounts = MqttAccounts::parse(&format!("{good}\n# only a comment\n")).unwrap();
        assert_eq!(accounts.len(), 1);
        assert_eq!(
            accounts.get("ok").unwrap().filters,
            vec!["vehicles/+/telemetry".to_owned()]
        );
    }
}
