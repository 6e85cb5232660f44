//! Device credentials: a car logs in with username = its VIN and password = lowercase hex of
//! HMAC-SHA256(secret, VIN). One fleet secret, no per-car table to provision.

use crate::telemetry::Vin;
use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The fleet's device secret. Its `Debug` never shows the value.
#[derive(Clone)]
pub struct DeviceSecret(Vec<u8>);

impl std::fmt::Debug for DeviceSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceSecret(***)")
    }
}

/// Why a CONNECT was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No username or password.
    #[error("no credentials")]
    MissingCredentials,
    /// The username is not a VIN.
    #[error("username is not a VIN")]
    UsernameNotVin,
    /// The password does not match.
    #[error("wrong password")]
    WrongPassword,
}

impl AuthError {
    /// Stable code for metric labels.
    pub fn code(self) -> &'static str {
        match self {
            AuthError::MissingCredentials => "missing_credentials",
            AuthError::UsernameNotVin => "username_not_vin",
            AuthError::WrongPassword => "wrong_password",
        }
    }
}

impl DeviceSecret {
    /// Wraps the secret bytes.
    pub fn new(secret: impl Into<Vec<u8>>) -> DeviceSecret {
        DeviceSecret(secret.into())
    }

    fn mac(&self) -> HmacSha256 {
        // HMAC accepts keys of any length; this cannot fail.
        match HmacSha256::new_from_slice(&self.0) {
            Ok(mac) => mac,
            Err(_) => unreachable!("HMAC takes keys of any length"),
        }
    }

    /// The password of a car: lowercase hex of HMAC-SHA256(secret, VIN).
    pub fn password_for(&self, vin: &Vin) -> String {
        let mut mac = self.mac();
        mac.update(vin.as_str().as_bytes());
        hex::encode(mac.finalize().into_bytes())
    }

    /// Checks a login in constant time; returns the car's VIN.
    pub fn verify(&self, username: Option<&str>, password: Option<&str>) -> Result<Vin, AuthError> {
        let (Some(username), Some(password)) = (username, password) else {
            return Err(AuthError::MissingCredentials);
        };
        let vin = Vin::parse(username).map_err(|_| AuthError::UsernameNotVin)?;
        let Ok(given) = hex::decode(password.trim()) else {
            return Err(AuthError::WrongPassword);
        };
        let mut mac = self.mac();
        mac.update(vin.as_str().as_bytes());
        mac.verify_slice(&given)
            .map_err(|_| AuthError::WrongPassword)?;
        Ok(vin)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn password_round_trip_and_refusals() {
        let secret = DeviceSecret::new("fleet-secret");
        let vin = Vin::parse("1HGCM82633A004352").unwrap();
        let password = secret.password_for(&vin);
        assert_eq!(password.len(), 64);
        assert!(password
            .chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
        assert_eq!(
            secret.verify(Some("1hgcm82633a004352"), Some(&password)),
            Ok(vin.clone())
        );
        assert_eq!(
            secret.verify(Some(vin.as_str()), Some("00")),
            Err(AuthError::WrongPassword)
        );
        assert_eq!(
            secret.verify(Some(vin.as_str()), Some("zz")),
            Err(AuthError::WrongPassword)
        );
        assert_eq!(
            secret.verify(Some("bob"), Some(&password)),
            Err(AuthError::UsernameNotVin)
        );
        assert_eq!(
            secret.verify(None, None),
            Err(AuthError::MissingCredentials)
        );
        let other = Vin::parse("2HGCM82633A004352").unwrap();
        assert_eq!(
            secret.verify(Some(other.as_str()), Some(&password)),
            Err(AuthError::WrongPassword)
        );
        assert_eq!(format!("{secret:?}"), "DeviceSecret(***)");
    }
}
