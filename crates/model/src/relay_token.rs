//! Relay tokens: short-lived JWTs (HS256) naming what a client may watch, one VIN or `*` for the
//! fleet, minted by `POST /v1/relay-tokens` for callers holding the API key (a Salesforce Named
//! Credential, say).

use std::time::Duration;

use crate::telemetry::Vin;
use jsonwebtoken::{decode, encode, Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};

/// `sub` of a token that may watch every car.
pub const FLEET: &str = "*";

/// A token's claims.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RelayClaims {
    /// A VIN, or `*` for the fleet.
    pub sub: String,
    /// Expiry, Unix seconds.
    pub exp: i64,
}

/// Why a token is refused.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No token was presented.
    #[error(
        "a relay token is required (Authorization: Bearer, ?access_token= or the first message)"
    )]
    Missing,
    /// The token does not verify (bad signature, malformed, wrong algorithm).
    #[error("the relay token is invalid")]
    Invalid,
    /// The token expired.
    #[error("the relay token expired")]
    Expired,
    /// The token is for another car.
    #[error("the relay token does not cover {0}")]
    WrongVin(String),
}

impl TokenError {
    /// A short code for metrics.
    pub fn code(&self) -> &'static str {
        match self {
            TokenError::Missing => "missing",
            TokenError::Invalid => "invalid",
            TokenError::Expired => "expired",
            TokenError::WrongVin(_) => "wrong_vin",
        }
    }
}

/// Signs and checks relay tokens with the relay secret.
#[derive(Clone)]
pub struct TokenAuthority {
    encoding: EncodingKey,
    decoding: DecodingKey,
}

impl std::fmt::Debug for TokenAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.write_str("TokenAuthority(..)")
    }
}

impl TokenAuthority {
    /// An authority for this secret.
    pub fn new(secret: &[u8]) -> TokenAuthority {
        TokenAuthority {
            encoding: EncodingKey::from_secret(secret),
            decoding: DecodingKey::from_secret(secret),
        }
    }

    /// A token for `subject` (a VIN or `*`) valid for `ttl`.
    pub fn mint(&self, subject: &str, ttl: Duration) -> Result<String, TokenError> {
        let exp =
            chrono::Utc::now().timestamp() + i64::try_from(ttl.as_secs()).unwrap_or(i64::MAX / 2);
        encode(
            &Header::new(Algorithm::HS256),
            &RelayClaims {
                sub: subject.to_owned(),
                exp,
            },
            &self.encoding,
        )
        .map_err(|_| TokenError::Invalid)
    }

    /// Checks a token and that it covers every car in `vins` (`None`: the whole fleet).
    pub fn check(&self, token: &str, vins: Option<&[Vin]>) -> Result<RelayClaims, TokenError> {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.leeway = 0;
        validation.set_required_spec_claims(&["exp", "sub"]);
        let claims = decode::<RelayClaims>(token, &self.decoding, &validation)
            .map_err(|e| match e.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => TokenError::Expired,
                _ => TokenError::Invalid,
            })?
            .claims;
        if claims.sub == FLEET {
            return Ok(claims);
        }
        match vins {
            None => Err(TokenError::WrongVin("the whole fleet".into())),
            Some(vins) => match vins.iter().find(|v| v.as_str() != claims.sub) {
                Some(other) => Err(TokenError::WrongVin(other.to_string())),
                None => Ok(claims),
            },
        }
    }
}

/// Mints relay tokens (`POST /v1/relay-tokens`); who may ask is the HTTP API's decision.
#[derive(Clone, Debug)]
pub struct TokenMinter {
    authority: TokenAuthority,
    ttl: Duration,
}

/// Why a token was not minted.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum MintError {
    /// The subject is neither a VIN nor `*`.
    #[error(transparent)]
    Subject(#[from] crate::telemetry::VinError),
    /// The token could not be signed.
    #[error(transparent)]
    Token(#[from] TokenError),
}

/// A minted token and what it covers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, schemars::JsonSchema)]
pub struct MintedToken {
    /// The JWT.
    pub token: String,
    /// A VIN, or `*` for the fleet.
    pub sub: String,
    /// Seconds until it expires.
    pub expires_in: u64,
}

impl TokenMinter {
    /// A minter that signs with `authority` tokens valid for `ttl`.
    pub fn new(authority: TokenAuthority, ttl: Duration) -> TokenMinter {
        TokenMinter { authority, ttl }
    }

    /// The authority that signs (and checks) the tokens.
    pub fn authority(&self) -> &TokenAuthority {
        &self.authority
    }

    /// A token for `subject`: a VIN, or `*` for the fleet.
    pub fn mint(&self, subject: &str) -> Result<MintedToken, MintError> {
        let sub = if subject == FLEET {
            FLEET.to_owned()
        } else {
            Vin::parse(subject)?.to_string()
        };
        Ok(MintedToken {
            token: self.authority.mint(&sub, self.ttl)?,
            sub,
            expires_in: self.ttl.as_secs(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vin(n: u8) -> Vin {
        Vin::parse(&format!("5YJ3E1EA00000000{n}")).unwrap()
    }

    #[test]
    fn a_token_covers_its_car_only_and_a_fleet_token_covers_all() {
        let authority = TokenAuthority::new(b"0123456789abcdef0123456789abcdef");
        let token = authority
            .mint(vin(1).as_str(), Duration::from_secs(60))
            .unwrap();
        assert!(authority.check(&token, Some(&[vin(1)])).is_ok());
        assert_eq!(
            authority.check(&token, Some(&[vin(2)])),
            Err(TokenError::WrongVin(vin(2).to_string()))
        );
        assert!(matches!(
            authority.check(&token, None),
            Err(TokenError::WrongVin(_))
        ));
        let fleet = authority.mint(FLEET, Duration::from_secs(60)).unwrap();
        assert!(authority.check(&fleet, None).is_ok());
        assert!(authority.check(&fleet, Some(&[vin(1), vin(2)])).is_ok());
    }

    #[test]
    fn tokens_are_minted_for_a_vin_or_the_fleet() {
        let authority = TokenAuthority::new(b"0123456789abcdef0123456789abcdef");
        let minter = TokenMinter::new(authority.clone(), Duration::from_secs(60));
        let minted = minter.mint("5yj3e1ea000000001").unwrap();
        assert_eq!(minted.sub, vin(1).as_str());
        assert_eq!(minted.expires_in, 60);
        assert!(authority.check(&minted.token, Some(&[vin(1)])).is_ok());
        assert!(matches!(minter.mint("bob"), Err(MintError::Subject(_))));
        assert_eq!(minter.mint(FLEET).unwrap().sub, FLEET);
    }

    #[test]
    fn wrong_secret_garbage_and_expired_tokens_are_refused() {
        let authority = TokenAuthority::new(b"0123456789abcdef0123456789abcdef");
        let other = TokenAuthority::new(b"another secret of 32 bytes......");
        let token = other.mint(FLEET, Duration::from_secs(60)).unwrap();
        assert_eq!(authority.check(&token, None), Err(TokenError::Invalid));
        assert_eq!(
            authority.check("not.a.token", None),
            Err(TokenError::Invalid)
        );
        let expired = encode(
            &Header::new(Algorithm::HS256),
            &RelayClaims {
                sub: FLEET.into(),
                exp: chrono::Utc::now().timestamp() - 5,
            },
            &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
        )
        .unwrap();
        assert_eq!(authority.check(&expired, None), Err(TokenError::Expired));
    }
}
