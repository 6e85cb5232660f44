//! Revoked cars and certificates: a stolen or retired car, or a leaked certificate, is refused
//! without touching the fleet secret or the CA. From a file (`ECARS_REVOKED_FILE`), re-read
//! while running; one entry per line:
//!
//! ```text
//! # what    which
//! vin       1HGCM82633A004352
//! serial    4f:1a:09:…          (a client certificate's serial, as `openssl x509 -serial` prints it)
//! ```
//!
//! A revoked VIN is refused at CONNECT, however it logs in, and its connections are dropped
//! when the file changes; a revoked serial is refused at the TLS handshake's end, and the
//! connections that presented it are dropped when the file changes.

use std::collections::HashSet;

use ecars_model::Vin;
use ecars_runtime::tls::normalize_serial;

/// The revocations in force.
#[derive(Debug, Default)]
pub struct Revoked {
    vins: HashSet<Vin>,
    serials: HashSet<String>,
}

/// A line of the revocations file that cannot be used; the file is refused whole.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("line {line}: {reason}")]
pub struct RevokedError {
    /// 1-based line number.
    pub line: usize,
    /// What is wrong with it.
    pub reason: String,
}

impl Revoked {
    /// Parses a revocations file: `vin VIN` or `serial HEX` per line; blank lines and `#`
    /// comments ignored.
    pub fn parse(text: &str) -> Result<Revoked, RevokedError> {
        let mut revoked = Revoked::default();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let err = |reason: String| RevokedError { line, reason };
            let content = raw.split('#').next().unwrap_or("").trim();
            if content.is_empty() {
                continue;
            }
            let fields: Vec<&str> = content.split_whitespace().collect();
            match fields[..] {
                ["vin", vin] => {
                    let vin = Vin::parse(vin).map_err(|e| err(e.to_string()))?;
                    revoked.vins.insert(vin);
                }
                ["serial", serial] => {
                    let hex = serial.replace(':', "");
                    if hex.is_empty() || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
                        return Err(err(format!("{serial:?} is not a hexadecimal serial")));
                    }
                    revoked.serials.insert(normalize_serial(serial));
                }
                _ => return Err(err("expected `vin VIN` or `serial HEX`".into())),
            }
        }
        Ok(revoked)
    }

    /// Whether the car is revoked.
    pub fn vin(&self, vin: &Vin) -> bool {
        self.vins.contains(vin)
    }

    /// Whether the certificate with this serial (normalized) is revoked.
    pub fn serial(&self, serial: &str) -> bool {
        self.serials.contains(serial)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vins_and_serials_are_revoked_as_written() {
        let revoked =
            Revoked::parse("# stolen\nvin 1hgcm82633a004352\nserial 00:4F:1A  # leaked\n\n")
                .unwrap();
        assert!(revoked.vin(&Vin::parse("1HGCM82633A004352").unwrap()));
        assert!(!revoked.vin(&Vin::parse("1HGCM82633A004353").unwrap()));
        assert!(revoked.serial(&normalize_serial("4f1a")));
        assert!(!revoked.serial("4f1b"));
        for (bad, says) in [
            ("vin nope", "VIN"),
            ("serial xyz", "hexadecimal"),
            ("car 1HGCM82633A004352", "expected"),
        ] {
            let err = Revoked::parse(&format!("vin 1HGCM82633A004352\n{bad}")).unwrap_err();
            assert_eq!(err.line, 2);
            assert!(err.reason.contains(says), "{bad}: {err}");
        }
    }
}
