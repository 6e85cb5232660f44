//! A Salesforce REST API client for Cases: OAuth 2.0 (JWT bearer or client credentials) with a
//! cached token, sObject Collections upsert by external id, and the SOQL look-up of a car's
//! `Vehicle__c` record. It knows nothing of MQTT, Kafka or the outbox.

mod error;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use clap::Args;
use serde::Deserialize;
use serde_json::{json, Map, Value};

pub use error::{classify_code, ErrorClass, SalesforceError};

/// Most records in one sObject Collections call (Salesforce's limit).
pub const MAX_COLLECTION_RECORDS: usize = 200;

/// Salesforce connection settings; all absent means "not configured".
#[derive(Clone, Debug, Args)]
pub struct SalesforceConfig {
    /// Connected App consumer key. Setting it turns the Case sync on.
    #[arg(long = "salesforce-client-id", env = "SALESFORCE_CLIENT_ID")]
    pub client_id: Option<String>,
    /// Integration user for the JWT bearer flow (with --salesforce-private-key-file).
    #[arg(long = "salesforce-username", env = "SALESFORCE_USERNAME")]
    pub username: Option<String>,
    /// PEM file of the RSA private key whose certificate the Connected App holds (JWT bearer).
    #[arg(
        long = "salesforce-private-key-file",
        env = "SALESFORCE_PRIVATE_KEY_FILE"
    )]
    pub private_key_file: Option<PathBuf>,
    /// Consumer secret, for the client-credentials flow instead of JWT bearer. Environment
    /// only in production: a flag shows in `ps`.
    #[arg(
        long = "salesforce-client-secret",
        env = "SALESFORCE_CLIENT_SECRET",
        hide_env_values = true
    )]
    pub client_secret: Option<String>,
    /// Where tokens come from: `https://login.salesforce.com`, `https://test.salesforce.com`
    /// for sandboxes, or the org's My Domain URL (required for client credentials).
    #[arg(
        long = "salesforce-login-url",
        env = "SALESFORCE_LOGIN_URL",
        default_value = "https://login.salesforce.com"
    )]
    pub login_url: String,
    /// REST API version.
    #[arg(
        long = "salesforce-api-version",
        env = "SALESFORCE_API_VERSION",
        default_value = "62.0"
    )]
    pub api_version: String,
}

impl Default for SalesforceConfig {
    fn default() -> Self {
        ecars_runtime::settings::defaults()
    }
}

/// A Salesforce setting that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("invalid setting {setting}: {reason}")]
pub struct SalesforceConfigError {
    /// Which setting.
    pub setting: &'static str,
    /// Why.
    pub reason: String,
}

/// How the client logs in.
enum Grant {
    JwtBearer {
        client_id: String,
        username: String,
        key: jsonwebtoken::EncodingKey,
    },
    ClientCredentials {
        client_id: String,
        client_secret: String,
    },
}

impl SalesforceConfig {
    /// Whether any Salesforce setting is present.
    pub fn is_configured(&self) -> bool {
        self.client_id.is_some()
    }

    fn grant(&self) -> Result<Grant, SalesforceConfigError> {
        let client_id = self.client_id.clone().ok_or(SalesforceConfigError {
            setting: "SALESFORCE_CLIENT_ID",
            reason: "missing".into(),
        })?;
        match (&self.username, &self.private_key_file, &self.client_secret) {
            (Some(username), Some(path), None) => {
                let pem = std::fs::read(path).map_err(|e| SalesforceConfigError {
                    setting: "SALESFORCE_PRIVATE_KEY_FILE",
                    reason: format!("cannot read {}: {e}", path.display()),
                })?;
                let key = jsonwebtoken::EncodingKey::from_rsa_pem(&pem).map_err(|e| {
                    SalesforceConfigError {
                        setting: "SALESFORCE_PRIVATE_KEY_FILE",
                        reason: format!("{} is not an RSA private key in PEM: {e}", path.display()),
                    }
                })?;
                Ok(Grant::JwtBearer {
                    client_id,
                    username: username.clone(),
                    key,
                })
            }
            (None, None, Some(secret)) => Ok(Grant::ClientCredentials {
                client_id,
                client_secret: secret.clone(),
            }),
            (_, _, Some(_)) => Err(SalesforceConfigError {
                setting: "SALESFORCE_CLIENT_SECRET",
                reason: "set together with SALESFORCE_USERNAME/SALESFORCE_PRIVATE_KEY_FILE; choose JWT bearer (username and key) or client credentials (secret)".into(),
            }),
            (None, _, None) => Err(SalesforceConfigError {
                setting: "SALESFORCE_USERNAME",
                reason: "missing: the JWT bearer flow needs the integration user (or set SALESFORCE_CLIENT_SECRET for client credentials)".into(),
            }),
            (Some(_), None, None) => Err(SalesforceConfigError {
                setting: "SALESFORCE_PRIVATE_KEY_FILE",
                reason: "missing: the JWT bearer flow signs with the Connected App's private key".into(),
            }),
        }
    }
}

/// An access token and the instance it is for.
#[derive(Clone, Debug)]
struct Token {
    access_token: String,
    instance_url: String,
}

/// The OAuth token endpoint's answer.
#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    instance_url: String,
}

/// The OAuth token endpoint's error.
#[derive(Deserialize)]
struct OAuthError {
    error: String,
    #[serde(default)]
    error_description: String,
}

/// One REST API error, as Salesforce writes them: `[{"message","errorCode","fields"}]`.
#[derive(Deserialize)]
struct ApiErrorBody {
    #[serde(default)]
    message: String,
    #[serde(rename = "errorCode", default)]
    error_code: String,
}

/// A record-level error of a Collections call.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct RecordError {
    /// `statusCode` (`UNABLE_TO_LOCK_ROW`, `INVALID_FIELD`, ...).
    #[serde(rename = "statusCode", default)]
    pub status_code: String,
    /// Its message.
    #[serde(default)]
    pub message: String,
    /// The fields concerned.
    #[serde(default)]
    pub fields: Vec<String>,
}

/// The result of one record of a Collections upsert, in request order.
#[derive(Clone, Debug, PartialEq, Deserialize)]
pub struct RecordResult {
    /// The record's Id.
    #[serde(default)]
    pub id: Option<String>,
    /// Whether it was saved.
    pub success: bool,
    /// Whether it was created (false: updated).
    #[serde(default)]
    pub created: bool,
    /// Why not.
    #[serde(default)]
    pub errors: Vec<RecordError>,
}

/// The org's daily API usage, from `Sforce-Limit-Info: api-usage=N/M`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ApiUsage {
    /// Calls made in the last 24 hours.
    pub used: u64,
    /// The org's daily limit.
    pub limit: u64,
}

impl ApiUsage {
    /// Parses the `Sforce-Limit-Info` header.
    pub fn parse(header: &str) -> Option<ApiUsage> {
        let value = header
            .split(';')
            .map(str::trim)
            .find_map(|part| part.strip_prefix("api-usage="))?;
        let (used, limit) = value.split_once('/')?;
        Some(ApiUsage {
            used: used.trim().parse().ok()?,
            limit: limit.trim().parse().ok()?,
        })
    }

    /// Used share of the limit, 0..=1 (and beyond when over).
    pub fn share(&self) -> f64 {
        if self.limit == 0 {
            1.0
        } else {
            self.used as f64 / self.limit as f64
        }
    }
}

/// Calls made, by kind, for the API economy report.
#[derive(Debug, Default)]
pub struct CallCounts {
    /// Token requests.
    pub token: AtomicU64,
    /// REST API requests (upserts and queries).
    pub api: AtomicU64,
}

/// The Salesforce REST API, authenticated.
pub struct SalesforceClient {
    http: reqwest::Client,
    grant: Grant,
    login_url: String,
    api_version: String,
    token: tokio::sync::Mutex<Option<Token>>,
    vehicles: Mutex<HashMap<String, Option<String>>>,
    usage: Mutex<Option<ApiUsage>>,
    /// Calls made so far.
    pub calls: CallCounts,
}

impl SalesforceClient {
    /// A client for these settings; checks them (and reads the private key) now, so a bad
    /// setting stops the service at start.
    pub fn new(config: &SalesforceConfig) -> Result<SalesforceClient, SalesforceConfigError> {
        let grant = config.grant()?;
        let login_url = config.login_url.trim_end_matches('/').to_owned();
        if !(login_url.starts_with("https://") || login_url.starts_with("http://")) {
            return Err(SalesforceConfigError {
                setting: "SALESFORCE_LOGIN_URL",
                reason: format!("{login_url:?} is not an http(s) URL"),
            });
        }
        let version_ok = config
            .api_version
            .split_once('.')
            .is_some_and(|(a, b)| a.parse::<u32>().is_ok() && b.parse::<u32>().is_ok());
        if !version_ok {
            return Err(SalesforceConfigError {
                setting: "SALESFORCE_API_VERSION",
                reason: format!("{:?} is not a version such as 62.0", config.api_version),
            });
        }
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| SalesforceConfigError {
                setting: "SALESFORCE_LOGIN_URL",
                reason: format!("HTTP client: {e}"),
            })?;
        Ok(SalesforceClient {
            http,
            grant,
            login_url,
            api_version: config.api_version.clone(),
            token: tokio::sync::Mutex::new(None),
            vehicles: Mutex::new(HashMap::new()),
            usage: Mutex::new(None),
            calls: CallCounts::default(),
        })
    }

    /// The newest API usage Salesforce reported.
    pub fn api_usage(&self) -> Option<ApiUsage> {
        *self.usage.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Gets a token now (used to probe whether a paused sync can resume).
    pub async fn login(&self) -> Result<(), SalesforceError> {
        let token = self.fetch_token().await?;
        *self.token.lock().await = Some(token);
        Ok(())
    }

    async fn fetch_token(&self) -> Result<Token, SalesforceError> {
        self.calls.token.fetch_add(1, Ordering::Relaxed);
        metrics::counter!(crate::metrics::SALESFORCE_CALLS, "endpoint" => "token").increment(1);
        let form: Vec<(&str, String)> = match &self.grant {
            Grant::JwtBearer {
                client_id,
                username,
                key,
            } => {
                let now = chrono::Utc::now().timestamp();
                let claims = json!({
                    "iss": client_id,
                    "sub": username,
                    "aud": self.login_url,
                    "exp": now + 180,
                });
                let assertion = jsonwebtoken::encode(
                    &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::RS256),
                    &claims,
                    key,
                )
                .map_err(|e| SalesforceError::Protocol(format!("signing the JWT: {e}")))?;
                vec![
                    (
                        "grant_type",
                        "urn:ietf:params:oauth:grant-type:jwt-bearer".into(),
                    ),
                    ("assertion", assertion),
                ]
            }
            Grant::ClientCredentials {
                client_id,
                client_secret,
            } => vec![
                ("grant_type", "client_credentials".into()),
                ("client_id", client_id.clone()),
                ("client_secret", client_secret.clone()),
            ],
        };
        let response = self
            .http
            .post(format!("{}/services/oauth2/token", self.login_url))
            .form(&form)
            .send()
            .await
            .map_err(|e| SalesforceError::Connection(without_url(&e)))?;
        let status = response.status();
        let body = response
            .bytes()
            .await
            .map_err(|e| SalesforceError::Connection(without_url(&e)))?;
        if status.is_success() {
            let token: TokenResponse = serde_json::from_slice(&body)
                .map_err(|e| SalesforceError::Protocol(format!("token response: {e}")))?;
            return Ok(Token {
                access_token: token.access_token,
                instance_url: token.instance_url.trim_end_matches('/').to_owned(),
            });
        }
        if status.is_server_error() {
            return Err(SalesforceError::Api {
                status: status.as_u16(),
                code: String::new(),
                message: "token endpoint unavailable".into(),
            });
        }
        match serde_json::from_slice::<OAuthError>(&body) {
            Ok(error) => Err(SalesforceError::Login {
                code: error.error,
                description: error.error_description,
            }),
            Err(_) => Err(SalesforceError::Login {
                code: format!("http_{}", status.as_u16()),
                description: String::from_utf8_lossy(&body).chars().take(200).collect(),
            }),
        }
    }

    /// Sends a request built for the current token; on `401 INVALID_SESSION_ID` gets one new
    /// token and tries once more.
    async fn send(
        &self,
        endpoint: &'static str,
        build: impl Fn(&reqwest::Client, &Token) -> reqwest::RequestBuilder,
    ) -> Result<Value, SalesforceError> {
        let mut refreshed = false;
        loop {
            let token = {
                let mut cached = self.token.lock().await;
                match &*cached {
                    Some(token) => token.clone(),
                    None => {
                        let token = self.fetch_token().await?;
                        *cached = Some(token.clone());
                        token
                    }
                }
            };
            self.calls.api.fetch_add(1, Ordering::Relaxed);
            metrics::counter!(crate::metrics::SALESFORCE_CALLS, "endpoint" => endpoint)
                .increment(1);
            let response = build(&self.http, &token)
                .bearer_auth(&token.access_token)
                .send()
                .await
                .map_err(|e| SalesforceError::Connection(without_url(&e)))?;
            if let Some(usage) = response
                .headers()
                .get("Sforce-Limit-Info")
                .and_then(|v| v.to_str().ok())
                .and_then(ApiUsage::parse)
            {
                metrics::gauge!(crate::metrics::SALESFORCE_API_USED).set(usage.used as f64);
                metrics::gauge!(crate::metrics::SALESFORCE_API_LIMIT).set(usage.limit as f64);
                *self.usage.lock().unwrap_or_else(|e| e.into_inner()) = Some(usage);
            }
            let status = response.status();
            let body = response
                .bytes()
                .await
                .map_err(|e| SalesforceError::Connection(without_url(&e)))?;
            if status.is_success() {
                if body.is_empty() {
                    return Ok(Value::Null);
                }
                return serde_json::from_slice(&body)
                    .map_err(|e| SalesforceError::Protocol(format!("{endpoint}: {e}")));
            }
            let error = api_error(status.as_u16(), &body);
            if status.as_u16() == 401 && !refreshed {
                // The session expired or was revoked: one new token, one more try.
                tracing::info!("Salesforce session expired; getting a new token");
                *self.token.lock().await = None;
                refreshed = true;
                continue;
            }
            return Err(error);
        }
    }

    /// Upserts Cases by `Ecars_Anomaly_Key__c` with one sObject Collections call
    /// (`allOrNone: false`): one result per record, in order.
    pub async fn upsert_cases(
        &self,
        records: &[Map<String, Value>],
    ) -> Result<Vec<RecordResult>, SalesforceError> {
        if records.is_empty() {
            return Ok(Vec::new());
        }
        let body = json!({
            "allOrNone": false,
            "records": records
                .iter()
                .map(|fields| {
                    let mut record = fields.clone();
                    record.insert("attributes".into(), json!({"type": "Case"}));
                    Value::Object(record)
                })
                .collect::<Vec<_>>(),
        });
        let path = format!(
            "/services/data/v{}/composite/sobjects/Case/{}",
            self.api_version,
            crate::case::ANOMALY_KEY_FIELD
        );
        let answer = self
            .send("composite_upsert", |http, token| {
                http.patch(format!("{}{path}", token.instance_url))
                    .json(&body)
            })
            .await?;
        let results: Vec<RecordResult> = serde_json::from_value(answer)
            .map_err(|e| SalesforceError::Protocol(format!("collections upsert: {e}")))?;
        if results.len() != records.len() {
            return Err(SalesforceError::Protocol(format!(
                "collections upsert answered {} results for {} records",
                results.len(),
                records.len()
            )));
        }
        Ok(results)
    }

    /// The `Vehicle__c` Ids of these VINs (absent: no such vehicle), from the cache or one SOQL
    /// query for the VINs not cached yet.
    pub async fn vehicle_ids(
        &self,
        vins: &[&str],
    ) -> Result<HashMap<String, Option<String>>, SalesforceError> {
        let mut found = HashMap::new();
        let mut missing: Vec<&str> = Vec::new();
        {
            let cache = self.vehicles.lock().unwrap_or_else(|e| e.into_inner());
            for vin in vins {
                match cache.get(*vin) {
                    Some(id) => {
                        found.insert((*vin).to_owned(), id.clone());
                    }
                    None if !missing.contains(vin) => missing.push(vin),
                    None => {}
                }
            }
        }
        // A SOQL query travels in the URL: 300 VINs keep it well under the 16 KB limit.
        for chunk in missing.chunks(300) {
            let list = chunk
                .iter()
                .map(|v| format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'")))
                .collect::<Vec<_>>()
                .join(",");
            let soql = format!("SELECT Id, VIN__c FROM Vehicle__c WHERE VIN__c IN ({list})");
            let path = format!("/services/data/v{}/query", self.api_version);
            let mut answer = self
                .send("query", |http, token| {
                    http.get(format!("{}{path}", token.instance_url))
                        .query(&[("q", &soql)])
                })
                .await?;
            let mut ids: HashMap<String, String> = HashMap::new();
            loop {
                let records = answer["records"].as_array().cloned().unwrap_or_default();
                for record in records {
                    if let (Some(id), Some(vin)) =
                        (record["Id"].as_str(), record["VIN__c"].as_str())
                    {
                        ids.insert(vin.to_ascii_uppercase(), id.to_owned());
                    }
                }
                let Some(next) = answer["nextRecordsUrl"].as_str().map(str::to_owned) else {
                    break;
                };
                answer = self
                    .send("query", |http, token| {
                        http.get(format!("{}{next}", token.instance_url))
                    })
                    .await?;
            }
            let mut cache = self.vehicles.lock().unwrap_or_else(|e| e.into_inner());
            for vin in chunk {
                let id = ids.get(*vin).cloned();
                cache.insert((*vin).to_owned(), id.clone());
                found.insert((*vin).to_owned(), id);
            }
        }
        Ok(found)
    }
}

fn api_error(status: u16, body: &[u8]) -> SalesforceError {
    let first = serde_json::from_slice::<Vec<ApiErrorBody>>(body)
        .ok()
        .and_then(|errors| errors.into_iter().next());
    match first {
        Some(e) => SalesforceError::Api {
            status,
            code: e.error_code,
            message: e.message,
        },
        None => SalesforceError::Api {
            status,
            code: String::new(),
            message: String::from_utf8_lossy(body).chars().take(200).collect(),
        },
    }
}

/// A reqwest error's text without its URL (which may carry a query).
fn without_url(error: &reqwest::Error) -> String {
    let kind = if error.is_timeout() {
        "timeout"
    } else if error.is_connect() {
        "connection failed"
    } else {
        "request failed"
    };
    let mut source = std::error::Error::source(error);
    let mut text = String::new();
    while let Some(e) = source {
        text = e.to_string();
        source = e.source();
    }
    format!("{kind}: {text}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn api_usage_reads_the_limit_header() {
        let usage = ApiUsage::parse("api-usage=4000/5000").unwrap();
        assert_eq!((usage.used, usage.limit), (4000, 5000));
        assert_eq!(usage.share(), 0.8);
        let usage = ApiUsage::parse("api-usage=18/15000; per-app-api-usage=17/250(appName=x)");
        assert_eq!(usage.map(|u| u.used), Some(18));
        assert!(ApiUsage::parse("nothing").is_none());
    }

    #[test]
    fn settings_must_pick_one_grant_and_name_what_is_missing() {
        let none = SalesforceConfig::default();
        assert!(!none.is_configured());
        let mut config = SalesforceConfig {
            client_id: Some("id".into()),
            ..Default::default()
        };
        assert_eq!(config.login_url, "https://login.salesforce.com");
        assert_eq!(config.api_version, "62.0");
        let error = SalesforceClient::new(&config).err().unwrap();
        assert_eq!(error.setting, "SALESFORCE_USERNAME");
        config.username = Some("user@example.com".into());
        let error = SalesforceClient::new(&config).err().unwrap();
        assert_eq!(error.setting, "SALESFORCE_PRIVATE_KEY_FILE");
        config.username = None;
        config.client_secret = Some("secret".into());
        assert!(SalesforceClient::new(&config).is_ok());
        config.api_version = "v62".into();
        let error = SalesforceClient::new(&config).err().unwrap();
        assert_eq!(error.setting, "SALESFORCE_API_VERSION");
    }
}
