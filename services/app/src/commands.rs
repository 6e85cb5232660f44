//! The one-shot commands of the `ecars` binary: what they do, and the text they print.

use std::future::Future;

use base64::Engine as _;
use ecars_bus::kafka::{KafkaBus, KafkaConfig, TopicDescription};
use ecars_db::case_outbox::{CaseRecord, CaseStatus};
use ecars_db::{DatabaseConfig, DbError};
use ecars_model::api_key::{key_line, Scopes};
use ecars_model::record::published;
use ecars_simulator::{SimulatorConfig, SimulatorError, SimulatorReport};
use rand::RngCore as _;

use crate::{open_database, AppError};

/// Applies the database migrations (`ecars migrate`).
pub async fn migrate(database: &DatabaseConfig) -> Result<(), AppError> {
    let db = open_database(database).await?;
    db.close().await;
    tracing::info!("migrations applied");
    Ok(())
}

/// The newest case outbox rows, optionally of one status (`ecars cases list`).
pub async fn list_cases(
    database: &DatabaseConfig,
    status: Option<CaseStatus>,
    limit: i64,
) -> Result<Vec<CaseRecord>, AppError> {
    let db = open_database(database).await?;
    let rows = db.case_outbox().list(status, limit.clamp(1, 10_000)).await;
    db.close().await;
    rows.map_err(database_error(database))
}

/// The error of a query on `database`, naming it (password hidden).
fn database_error(database: &DatabaseConfig) -> impl FnOnce(DbError) -> AppError + '_ {
    |source| AppError::Database {
        url: ecars_db::redact_url(&database.url),
        source,
    }
}

/// Case outbox rows as a table for people.
pub fn cases_table(rows: &[CaseRecord]) -> String {
    let mut out = format!(
        "{:<64} {:<17} {:<20} {:<14} {:<18} {:>8}  LAST ERROR\n",
        "KEY", "VIN", "RULE", "STATUS", "SALESFORCE ID", "ATTEMPTS"
    );
    for r in rows {
        out.push_str(&format!(
            "{:<64} {:<17} {:<20} {:<14} {:<18} {:>8}  {}\n",
            r.key,
            r.vin,
            r.rule,
            r.status,
            r.salesforce_id.as_deref().unwrap_or("-"),
            r.attempts,
            r.last_error.as_deref().unwrap_or("")
        ));
    }
    out
}

/// Sends a failed Case again (`ecars cases retry KEY`); false when no failed Case has that key.
pub async fn retry_case(database: &DatabaseConfig, key: &str) -> Result<bool, AppError> {
    let db = open_database(database).await?;
    let retried = db.case_outbox().retry(key, chrono::Utc::now()).await;
    db.close().await;
    retried.map_err(database_error(database))
}

/// Describes the topics other services can consume (`ecars topics`), without changing the
/// cluster.
pub async fn topics(kafka: &KafkaConfig) -> Result<Vec<TopicDescription>, AppError> {
    if kafka.brokers.is_none() {
        return Err(AppError::NeedsKafka);
    }
    let mut kafka = kafka.clone();
    kafka.create_topics = false;
    let bus = KafkaBus::connect(&kafka).await?;
    Ok(bus.describe_topics(&published()).await?)
}

/// Topic descriptions as text for people.
pub fn topics_text(topics: &[TopicDescription]) -> String {
    let mut out = String::new();
    for t in topics {
        let partitions = t
            .partitions
            .map_or("not created yet".to_owned(), |n| n.to_string());
        out.push_str(&format!(
            "{}\n  partitions: {partitions}\n  key: {}\n  headers: CloudEvents binary mode, ce_type={}\n  value: {}\n\n",
            t.topic, t.key, t.event_type, t.value
        ));
    }
    out
}

/// Drives simulated cars until they are done or `shutdown` completes (`ecars simulate`).
pub async fn simulate(
    config: SimulatorConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<SimulatorReport, SimulatorError> {
    let stop = tokio_util::sync::CancellationToken::new();
    let cancel = stop.clone();
    tokio::spawn(async move {
        shutdown.await;
        cancel.cancel();
    });
    ecars_simulator::run(config, stop).await
}

/// A new API key (`ecars api-key create`): the key for its holder, and the line for the keys
/// file, which holds only its hash.
#[derive(Debug)]
pub struct NewApiKey {
    /// The key: `ecars_` and 256 random bits, base64url. Shown once.
    pub key: String,
    /// `name sha256:HEX scopes`, to append to `ECARS_API_KEYS_FILE`.
    pub line: String,
}

/// Mints a new API key for `name` with `scopes`.
pub fn create_api_key(name: &str, scopes: Scopes) -> Result<NewApiKey, AppError> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '@'));
    if !valid {
        return Err(ecars_runtime::settings::ConfigError::Invalid {
            setting: "--name",
            reason: format!("{name:?}: use letters, digits, - _ . @ (no spaces)"),
        }
        .into());
    }
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    let key = format!(
        "ecars_{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    );
    let line = key_line(name, &key, scopes);
    Ok(NewApiKey { key, line })
}

/// A new MQTT service account (`ecars mqtt-account create`): its password, and the line for
/// the accounts file, which holds only its argon2 hash.
#[derive(Debug)]
pub struct NewMqttAccount {
    /// A random password (192 bits, base64url). Shown once.
    pub password: String,
    /// `name argon2-hash filters`, to append to `ECARS_MQTT_ACCOUNTS_FILE`.
    pub line: String,
}

/// Creates an MQTT service account `name` that may read `filters`.
pub fn create_mqtt_account(name: &str, filters: &[String]) -> Result<NewMqttAccount, AppError> {
    let invalid = |reason: String| -> AppError {
        ecars_runtime::settings::ConfigError::Invalid {
            setting: "ecars mqtt-account create",
            reason,
        }
        .into()
    };
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    let password = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
    let hash = ecars_ingest::accounts::hash_password(&password)
        .map_err(|e| invalid(format!("cannot hash the password: {e}")))?;
    let line = format!("{name} {hash} {}", filters.join(","));
    // The line must be one the server accepts: the same parser says so now, not at a reload.
    ecars_ingest::accounts::MqttAccounts::parse(&line).map_err(|e| invalid(e.reason))?;
    Ok(NewMqttAccount { password, line })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ecars_model::api_key::{ApiKeys, Scope};

    #[test]
    fn a_created_key_is_found_in_a_file_of_its_line() {
        let scopes: Scopes = [Scope::FleetRead, Scope::CasesWrite].into_iter().collect();
        let created = create_api_key("ops", scopes).unwrap();
        assert!(created.key.starts_with("ecars_") && created.key.len() == 6 + 43);
        assert!(
            !created.line.contains(&created.key),
            "the file never holds the key"
        );
        let keys = ApiKeys::parse(&created.line).unwrap();
        let holder = keys.holder(&created.key).unwrap();
        assert_eq!((holder.name.as_str(), holder.scopes), ("ops", scopes));
        assert_ne!(create_api_key("ops", scopes).unwrap().key, created.key);
        assert!(create_api_key("two words", scopes).is_err());
    }

    #[test]
    fn a_created_account_logs_in_with_its_password() {
        let filters = vec!["vehicles/+/telemetry".to_owned()];
        let created = create_mqtt_account("dashboard", &filters).unwrap();
        assert!(!created.line.contains(&created.password));
        let accounts = ecars_ingest::accounts::MqttAccounts::parse(&created.line).unwrap();
        let account = accounts.get("dashboard").unwrap();
        assert!(account.verify_password(created.password.as_bytes()));
        assert!(create_mqtt_account("1HGCM82633A004352", &filters).is_err());
        assert!(create_mqtt_account("ops", &["a/#/b".to_owned()]).is_err());
    }
}
