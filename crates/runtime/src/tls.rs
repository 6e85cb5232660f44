//! TLS for the listeners (rustls, aws-lc-rs): the server certificate and key from files,
//! re-read while running so a renewed certificate (cert-manager, an ACME client) is served
//! without a restart; optionally client certificates from a CA (mutual TLS), whose subject names
//! a car.
//!
//! What a car's certificate says is read here ([`PeerCertificate`]); what it may then do is the
//! ingest's business.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use ecars_model::Vin;
use tokio_rustls::rustls;
use tokio_rustls::rustls::crypto::CryptoProvider;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use tokio_rustls::rustls::sign::CertifiedKey;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_util::sync::CancellationToken;

use crate::reloading::{ReloadError, Reloading};
use crate::settings::ConfigError;

/// TLS settings shared by the listeners that offer TLS.
#[derive(Clone, Debug, Default, Args)]
pub struct TlsConfig {
    /// The server's certificate chain (PEM, leaf first). With the key, turns on the TLS
    /// listeners; re-read while running.
    #[arg(
        long = "tls-cert-file",
        env = "ECARS_TLS_CERT_FILE",
        requires = "key_file"
    )]
    pub cert_file: Option<PathBuf>,
    /// The server certificate's private key (PEM: PKCS#8, PKCS#1 or SEC1).
    #[arg(
        long = "tls-key-file",
        env = "ECARS_TLS_KEY_FILE",
        requires = "cert_file"
    )]
    pub key_file: Option<PathBuf>,
    /// CA certificates (PEM) whose client certificates cars may log in with (mutual TLS): the
    /// VIN in the certificate's subject CN (or a SAN) is the car's identity. Cars without a
    /// certificate still log in with a password.
    #[arg(
        long = "mqtt-client-ca-file",
        env = "ECARS_MQTT_CLIENT_CA_FILE",
        requires = "cert_file"
    )]
    pub client_ca_file: Option<PathBuf>,
}

/// Why TLS cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file cannot be read or does not hold what it should.
    #[error(transparent)]
    File(#[from] ReloadError),
    /// rustls refused the configuration.
    #[error("TLS: {0}")]
    Rustls(#[from] rustls::Error),
    /// The client CA file holds no usable certificate.
    #[error("ECARS_MQTT_CLIENT_CA_FILE: {0}")]
    ClientCa(String),
}

impl From<TlsError> for ConfigError {
    fn from(e: TlsError) -> Self {
        ConfigError::Invalid {
            setting: "--tls-cert-file / --tls-key-file / --mqtt-client-ca-file",
            reason: e.to_string(),
        }
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A certificate chain and its key, from their PEM texts.
fn certified_key(texts: &[String]) -> Result<CertifiedKey, String> {
    let [chain, key] = texts else {
        return Err("expected a certificate file and a key file".into());
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(chain.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| format!("certificate file: {e}"))?;
    if chain.is_empty() {
        return Err("the certificate file holds no certificate".into());
    }
    let key =
        PrivateKeyDer::from_pem_slice(key.as_bytes()).map_err(|e| format!("key file: {e}"))?;
    let certified = CertifiedKey::from_der(chain, key, &provider()).map_err(|e| e.to_string())?;
    // A key that does not match the certificate would fail every handshake: refuse it here.
    certified
        .keys_match()
        .map_err(|e| format!("the key does not match the certificate: {e}"))?;
    Ok(certified)
}

/// The server certificate in force, swapped when its files change.
#[derive(Debug)]
struct ReloadingCertificate(Reloading<Arc<CertifiedKey>>);

impl ResolvesServerCert for ReloadingCertificate {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0.current()))
    }
}

/// A listener's TLS: the rustls configuration and the certificate to keep fresh.
#[derive(Clone, Debug)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
    certificate: Reloading<Arc<CertifiedKey>>,
}

impl ServerTls {
    /// TLS from the settings; `None` without a certificate. `client_auth` asks for client
    /// certificates (when a client CA is set).
    pub fn from_config(config: &TlsConfig) -> Result<Option<ServerTls>, TlsError> {
        let (Some(cert), Some(key)) = (&config.cert_file, &config.key_file) else {
            return Ok(None);
        };
        let certificate =
            Reloading::load_all(&[cert.clone(), key.clone()], "tls_certificate", |texts| {
                certified_key(texts).map(Arc::new)
            })?;
        let builder = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?;
        let builder = match &config.client_ca_file {
            None => builder.with_no_client_auth(),
            Some(path) => {
                let pem = std::fs::read(path).map_err(|source| ReloadError::Read {
                    path: path.clone(),
                    source,
                })?;
                let mut roots = RootCertStore::empty();
                for cert in CertificateDer::pem_slice_iter(&pem) {
                    let cert = cert.map_err(|e| TlsError::ClientCa(e.to_string()))?;
                    roots
                        .add(cert)
                        .map_err(|e| TlsError::ClientCa(e.to_string()))?;
                }
                if roots.is_empty() {
                    return Err(TlsError::ClientCa("no certificate in the file".into()));
                }
                // Optional: cars without a certificate log in with a password.
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
                        .allow_unauthenticated()
                        .build()
                        .map_err(|e| TlsError::ClientCa(e.to_string()))?;
                builder.with_client_cert_verifier(verifier)
            }
        };
        let mut server =
            builder.with_cert_resolver(Arc::new(ReloadingCertificate(certificate.clone())));
        server.alpn_protocols = Vec::new();
        Ok(Some(ServerTls {
            config: Arc::new(server),
            certificate,
        }))
    }

    /// The same certificate without client certificates (HTTPS: a browser must not be asked
    /// for one).
    pub fn without_client_auth(&self) -> Result<ServerTls, TlsError> {
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(ReloadingCertificate(self.certificate.clone())));
        server.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(ServerTls {
            config: Arc::new(server),
            certificate: self.certificate.clone(),
        })
    }

    /// The acceptor for handshakes.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(Arc::clone(&self.config))
    }

    /// Re-reads the certificate and key every `interval` until `stop` (run it as a part).
    pub async fn watch(
        self,
        interval: Duration,
        stop: CancellationToken,
    ) -> Result<(), std::convert::Infallible> {
        self.certificate
            .watch_all(interval, |texts| certified_key(texts).map(Arc::new), stop)
            .await
    }
}

/// What a verified client certificate says about its holder.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCertificate {
    /// The VIN in the subject CN, or else in a DNS or URI SAN; `None` when none is a VIN.
    pub vin: Option<Vin>,
    /// The serial number, lowercase hex without leading zeros (as `openssl x509 -serial`
    /// prints it, lowercased).
    pub serial: String,
}

/// The identity in a client's verified certificate (the leaf of the chain it presented).
pub fn peer_certificate(connection: &rustls::ServerConnection) -> Option<PeerCertificate> {
    let leaf = connection.peer_certificates()?.first()?;
    let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
    let from_cn = cert
        .subject()
        .iter_common_name()
        .filter_map(|cn| cn.as_str().ok())
        .find_map(|cn| Vin::parse(cn).ok());
    let from_san = || {
        let san = cert.subject_alternative_name().ok().flatten()?;
        san.value.general_names.iter().find_map(|name| match name {
            x509_parser::extensions::GeneralName::DNSName(text)
            | x509_parser::extensions::GeneralName::URI(text) => {
                Vin::parse(text.rsplit([':', '/']).next().unwrap_or(text)).ok()
            }
            _ => None,
        })
    };
    let serial = cert.tbs_certificate.raw_serial_as_string().replace(':', "");
    Some(PeerCertificate {
        vin: from_cn.or_else(from_san),
        serial: normalize_serial(&serial),
    })
}

/// A serial number as this module writes it: lowercase hex, no leading zeros, no colons.
pub fn normalize_serial(serial: &str) -> String {
    let hex: String = serial
        .chars()
        .filter(|c| *c != ':')
        .map(|c| c.to_ascii_lowercase())
        .collect();
    let trimmed = hex.trim_start_matches('0');
    if trimmed.is_empty() {
        "0".into()
    } else {
        trimmed.into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_compare_as_numbers() {
        assert_eq!(normalize_serial("00:1A:2b"), "1a2b");
        assert_eq!(normalize_serial("0"), "0");
        assert_eq!(normalize_serial("1A2B"), normalize_serial("00:1a:2b"));
        assert_ne!(normalize_serial("1A2B"), normalize_serial("01:1a:2b"));
    }

    #[test]
    fn a_key_file_that_is_no_key_is_refused() {
        let err = certified_key(&["".into(), "".into()]).unwrap_err();
        assert!(err.contains("no certificate"), "{err}");
    }
}
