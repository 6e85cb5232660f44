//! Who may call which `/v1` route: API keys with scopes ([`ecars_model::api_key`]), and relay
//! tokens for reads of the car they name.
//!
//! Credentials are required as soon as any secret is configured (a keys file, the relay
//! secret, the older relay API key) or the listener is not loopback; only a loopback demo
//! without secrets is open. A request without a credential is answered 401, one whose
//! credential does not verify 401, one whose credential lacks the right 403, each with a JSON
//! reason and counted (never logged: a peer could fill the log).

use ecars_model::api_key::{ApiKeys, Scope};
use ecars_model::relay_token::{TokenAuthority, FLEET};
use ecars_model::Vin;
use ecars_runtime::reloading::Reloading;

/// What a route needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need<'a> {
    /// A key with this scope.
    Scope(Scope),
    /// Reading this car: a key with `fleet:read`, or a relay token for the car or the fleet.
    Vehicle(&'a Vin),
    /// Minting a live-view token: a key with `relay-tokens:mint` or `fleet:read` (which may
    /// read the same data already).
    Mint,
    /// Any credential of this server, whatever it grants: an API key or a valid relay token.
    /// For what holds no data but is nobody else's business either (the API's description).
    Credential,
}

/// Who called.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// Nobody in particular: credentials are not required here (a loopback demo).
    Anonymous,
    /// The holder of the named API key.
    Key(String),
    /// A relay token for a VIN or `*`.
    Token(String),
}

/// Why a request is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// No credential (401).
    #[error("a credential is required: an API key (or a relay token) as Authorization: Bearer")]
    Missing,
    /// The credential is not a key of this server nor a valid relay token (401).
    #[error("the credential is not a valid API key or relay token")]
    Invalid,
    /// The credential is valid but does not grant this (403).
    #[error("the credential does not grant {0}")]
    NotGranted(&'static str),
}

impl Refusal {
    /// A short code for metrics and the JSON `reason`.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::Missing => "missing_credential",
            Refusal::Invalid => "invalid_credential",
            Refusal::NotGranted(_) => "missing_scope",
        }
    }
}

/// The credentials one HTTP listener accepts.
#[derive(Clone, Debug)]
pub struct HttpAccess {
    /// Keys of the keys file, reloaded as it changes.
    keys: Option<Reloading<ApiKeys>>,
    /// Keys given in settings (the older `ECARS_RELAY_API_KEY`, granted `relay-tokens:mint`).
    fixed: ApiKeys,
    /// Checks relay tokens, where the relay runs in this process.
    tokens: Option<TokenAuthority>,
    /// Whether a request needs a credential at all.
    required: bool,
}

impl HttpAccess {
    /// Access with these credentials; `required` says whether requests need one.
    pub fn new(
        keys: Option<Reloading<ApiKeys>>,
        fixed: ApiKeys,
        tokens: Option<TokenAuthority>,
        required: bool,
    ) -> HttpAccess {
        HttpAccess {
            keys,
            fixed,
            tokens,
            required,
        }
    }

    /// Open access (a loopback demo without secrets).
    pub fn open() -> HttpAccess {
        HttpAccess::new(None, ApiKeys::default(), None, false)
    }

    /// Whether requests need a credential.
    pub fn required(&self) -> bool {
        self.required
    }

    /// Checks `presented` (the bearer credential, if any) for `need`.
    pub fn check(&self, presented: Option<&str>, need: Need<'_>) -> Result<Caller, Refusal> {
        if !self.required {
            return Ok(Caller::Anonymous);
        }
        let presented = presented
            .filter(|p| !p.is_empty())
            .ok_or(Refusal::Missing)?;
        let from_file = self.keys.as_ref().map(Reloading::current);
        let holder = from_file
            .as_deref()
            .and_then(|keys| keys.holder(presented))
            .or_else(|| self.fixed.holder(presented));
        if let Some(holder) = holder {
            let granted = match need {
                Need::Scope(scope) => holder.scopes.contains(scope),
                Need::Vehicle(_) => holder.scopes.contains(Scope::FleetRead),
                Need::Mint => {
                    holder.scopes.contains(Scope::RelayTokensMint)
                        || holder.scopes.contains(Scope::FleetRead)
                }
                Need::Credential => true,
            };
            return if granted {
                Ok(Caller::Key(holder.name.clone()))
            } else {
                Err(Refusal::NotGranted(needed(need)))
            };
        }
        let claims = self
            .tokens
            .as_ref()
            // No car to cover yet: only the signature and expiry; `need` decides below.
            .and_then(|tokens| tokens.check(presented, Some(&[])).ok())
            .ok_or(Refusal::Invalid)?;
        let granted = match need {
            Need::Vehicle(vin) => claims.sub == FLEET || claims.sub == vin.as_str(),
            Need::Scope(Scope::FleetRead) => claims.sub == FLEET,
            // A token never mints another (no chains of ever-renewed tokens), nor reaches
            // dead letters or Cases.
            Need::Scope(_) | Need::Mint => false,
            Need::Credential => true,
        };
        if granted {
            Ok(Caller::Token(claims.sub))
        } else {
            Err(Refusal::NotGranted(needed(need)))
        }
    }
}

/// What to tell a caller it lacks.
fn needed(need: Need<'_>) -> &'static str {
    match need {
        Need::Scope(scope) => scope.as_str(),
        Need::Vehicle(_) => "fleet:read (or a relay token for this car)",
        Need::Mint => "relay-tokens:mint or fleet:read",
        Need::Credential => "a credential of this server",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ecars_model::api_key::{ApiKeyHolder, Scopes};
    use std::time::Duration;

    fn vin(n: u8) -> Vin {
        Vin::parse(&format!("5YJ3E1EA00000000{n}")).unwrap()
    }

    fn access() -> (HttpAccess, TokenAuthority) {
        let mut keys = ApiKeys::default();
        keys.insert(
            "reader",
            ApiKeyHolder {
                name: "reader".into(),
                scopes: Scopes::default().with(Scope::FleetRead),
            },
        );
        keys.insert(
            "salesforce",
            ApiKeyHolder {
                name: "salesforce".into(),
                scopes: Scopes::default().with(Scope::RelayTokensMint),
            },
        );
        let authority = TokenAuthority::new(b"0123456789abcdef0123456789abcdef");
        (
            HttpAccess::new(None, keys, Some(authority.clone()), true),
            authority,
        )
    }

    #[test]
    fn keys_grant_their_scopes_only() {
        let (access, _) = access();
        assert_eq!(
            access.check(Some("reader"), Need::Scope(Scope::FleetRead)),
            Ok(Caller::Key("reader".into()))
        );
        assert!(access.check(Some("reader"), Need::Vehicle(&vin(1))).is_ok());
        assert!(access.check(Some("reader"), Need::Mint).is_ok());
        assert_eq!(
            access.check(Some("reader"), Need::Scope(Scope::CasesWrite)),
            Err(Refusal::NotGranted("cases:write"))
        );
        assert!(access.check(Some("salesforce"), Need::Mint).is_ok());
        assert!(matches!(
            access.check(Some("salesforce"), Need::Vehicle(&vin(1))),
            Err(Refusal::NotGranted(_))
        ));
        assert_eq!(
            access.check(None, Need::Scope(Scope::FleetRead)),
            Err(Refusal::Missing)
        );
        assert_eq!(
            access.check(Some(""), Need::Scope(Scope::FleetRead)),
            Err(Refusal::Missing)
        );
        assert_eq!(
            access.check(Some("readex"), Need::Scope(Scope::FleetRead)),
            Err(Refusal::Invalid)
        );
    }

    #[test]
    fn any_credential_of_the_server_is_a_credential_and_nothing_else_is() {
        let (access, authority) = access();
        let car = authority
            .mint(vin(1).as_str(), Duration::from_secs(60))
            .unwrap();
        for holder in ["reader", "salesforce", car.as_str()] {
            assert!(
                access.check(Some(holder), Need::Credential).is_ok(),
                "{holder}"
            );
        }
        assert_eq!(access.check(None, Need::Credential), Err(Refusal::Missing));
        assert_eq!(
            access.check(Some("readex"), Need::Credential),
            Err(Refusal::Invalid)
        );
        let forged = TokenAuthority::new(b"another secret of 32 bytes......")
            .mint(vin(1).as_str(), Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            access.check(Some(&forged), Need::Credential),
            Err(Refusal::Invalid)
        );
    }

    #[test]
    fn a_relay_token_reads_its_own_car_and_nothing_else() {
        let (access, authority) = access();
        let car = authority
            .mint(vin(1).as_str(), Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            access.check(Some(&car), Need::Vehicle(&vin(1))),
            Ok(Caller::Token(vin(1).to_string()))
        );
        for need in [
            Need::Vehicle(&vin(2)),
            Need::Scope(Scope::FleetRead),
            Need::Scope(Scope::DeadLettersRead),
            Need::Mint,
        ] {
            assert!(
                matches!(access.check(Some(&car), need), Err(Refusal::NotGranted(_))),
                "{need:?}"
            );
        }
        let fleet = authority.mint(FLEET, Duration::from_secs(60)).unwrap();
        assert!(access.check(Some(&fleet), Need::Vehicle(&vin(2))).is_ok());
        assert!(access
            .check(Some(&fleet), Need::Scope(Scope::FleetRead))
            .is_ok());
        assert!(access.check(Some(&fleet), Need::Mint).is_err());
        let forged = TokenAuthority::new(b"another secret of 32 bytes......")
            .mint(FLEET, Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            access.check(Some(&forged), Need::Vehicle(&vin(1))),
            Err(Refusal::Invalid)
        );
    }

    #[test]
    fn open_access_asks_nothing() {
        assert_eq!(
            HttpAccess::open().check(None, Need::Scope(Scope::CasesWrite)),
            Ok(Caller::Anonymous)
        );
    }
}
