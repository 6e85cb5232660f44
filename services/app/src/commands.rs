//! The one-shot commands of the `ecars` binary: what they do, and the text they print.

use std::future::Future;

use ecars_bus::kafka::{KafkaBus, KafkaConfig, TopicDescription};
use ecars_db::case_outbox::{CaseRecord, CaseStatus};
use ecars_db::{DatabaseConfig, DbError};
use ecars_model::record::published;
use ecars_simulator::{SimulatorConfig, SimulatorError, SimulatorReport};

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
