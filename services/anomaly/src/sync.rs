//! The Case sync: sends due outbox rows to Salesforce in Collections batches, oldest first, and
//! writes back per record what happened, by the error policy:
//! transient errors retry with exponential backoff and jitter, a spent API limit waits long,
//! permanent errors mark the row failed (no loop), unknown errors retry within a short window,
//! and refused credentials pause the whole sync with a few, growing-apart token attempts.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Utc};
use ecars_db::case_outbox::{CaseOutbox, CaseRecord, CaseStatus, SyncOutcome};
use ecars_db::DbError;
use rand::Rng;
use serde_json::{Map, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::case::{changed_fields, ANOMALY_KEY_FIELD, VEHICLE_FIELD};
use crate::metrics as m;
use crate::salesforce::{
    ErrorClass, RecordResult, SalesforceClient, SalesforceError, MAX_COLLECTION_RECORDS,
};

/// Timing of the sync.
#[derive(Clone, Debug)]
pub struct SyncPolicy {
    /// Least time between two updates of one Case (firings in between are coalesced).
    pub update_interval: Duration,
    /// First retry wait of a transient error; doubles per attempt, with jitter.
    pub retry_initial: Duration,
    /// Longest retry wait.
    pub retry_max: Duration,
    /// How long an unrecognised error is retried before the row is marked failed.
    pub unknown_window: Duration,
    /// Wait after `REQUEST_LIMIT_EXCEEDED`.
    pub rate_limit_wait: Duration,
    /// First wait of a paused sync before the next token attempt; doubles per failure.
    pub auth_initial: Duration,
    /// Longest wait between token attempts.
    pub auth_max: Duration,
    /// Share of the daily API limit past which the sync slows down and batches harder.
    pub budget_share: f64,
    /// Wait before each call while past the budget share (rows pile up into fuller batches).
    pub over_budget_wait: Duration,
    /// Longest sleep when nothing is due (new rows wake the sync earlier).
    pub idle_poll: Duration,
}

impl Default for SyncPolicy {
    fn default() -> Self {
        SyncPolicy {
            update_interval: Duration::from_secs(300),
            retry_initial: Duration::from_secs(2),
            retry_max: Duration::from_secs(300),
            unknown_window: Duration::from_secs(600),
            rate_limit_wait: Duration::from_secs(900),
            auth_initial: Duration::from_secs(30),
            auth_max: Duration::from_secs(3600),
            budget_share: 0.8,
            over_budget_wait: Duration::from_secs(60),
            idle_poll: Duration::from_secs(1),
        }
    }
}

/// How long a claimed batch stays leased to this worker.
const LEASE: Duration = Duration::from_secs(120);

/// Sends the outbox to Salesforce.
pub struct CaseSync {
    outbox: CaseOutbox,
    client: Arc<SalesforceClient>,
    policy: SyncPolicy,
    /// Woken when the detector wrote new rows.
    pub wake: Arc<Notify>,
    /// Woken after outcomes were written: the event relay publishes Case changes.
    pub events_wake: Arc<Notify>,
    readiness: Option<Box<dyn Fn(bool) + Send + Sync>>,
}

/// Why a batch could not be sent at all.
enum BatchError {
    /// Credentials refused: pause.
    Auth(SalesforceError),
    /// The database failed.
    Store(DbError),
}

impl From<DbError> for BatchError {
    fn from(e: DbError) -> Self {
        BatchError::Store(e)
    }
}

fn delta(d: Duration) -> TimeDelta {
    TimeDelta::from_std(d).unwrap_or(TimeDelta::MAX)
}

impl CaseSync {
    /// A sync of this outbox through this client.
    pub fn new(outbox: CaseOutbox, client: Arc<SalesforceClient>, policy: SyncPolicy) -> CaseSync {
        CaseSync {
            outbox,
            client,
            policy,
            wake: Arc::new(Notify::new()),
            events_wake: Arc::new(Notify::new()),
            readiness: None,
        }
    }

    /// Writes back how leased rows' sync ended (with their Case changes), then wakes the event
    /// relay.
    async fn finish(&self, outcomes: &[(CaseRecord, SyncOutcome)]) -> Result<(), DbError> {
        self.outbox
            .finish(outcomes, ms(self.policy.update_interval), Utc::now())
            .await?;
        self.events_wake.notify_one();
        Ok(())
    }

    /// Reports readiness changes (false while paused) to `report`.
    pub fn on_readiness(mut self, report: impl Fn(bool) + Send + Sync + 'static) -> CaseSync {
        self.readiness = Some(Box::new(report));
        self
    }

    fn set_ready(&self, ready: bool) {
        metrics::gauge!(m::SYNC_PAUSED).set(if ready { 0.0 } else { 1.0 });
        if let Some(report) = &self.readiness {
            report(ready);
        }
    }

    /// Runs until `shutdown`: rows written before are still sent if they are due (a batch in
    /// flight finishes; the rest stays in the outbox for the next start).
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), DbError> {
        // Rows written while Salesforce was not configured, or left paused, go out now.
        let resumed = self
            .outbox
            .move_status(CaseStatus::NotConfigured, CaseStatus::Pending)
            .await?
            + self
                .outbox
                .move_status(CaseStatus::Paused, CaseStatus::Pending)
                .await?;
        if resumed > 0 {
            tracing::info!(
                rows = resumed,
                "Cases waiting for Salesforce are queued for sync"
            );
        }
        self.set_ready(true);
        let mut outage_failures = 0u32;
        loop {
            if shutdown.is_cancelled() {
                return Ok(());
            }
            if let Some(usage) = self.client.api_usage() {
                if usage.share() >= self.policy.budget_share {
                    tracing::warn!(
                        used = usage.used,
                        limit = usage.limit,
                        "Salesforce API usage past the budget share: slowing down, batching harder"
                    );
                    metrics::counter!(m::SYNC_BUDGET_WAITS).increment(1);
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(self.policy.over_budget_wait) => {}
                    }
                }
            }
            let now = Utc::now();
            let rows = match self
                .outbox
                .claim_due(now, now + delta(LEASE), MAX_COLLECTION_RECORDS as i64)
                .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(error = %e, "case outbox unavailable; retrying");
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(self.policy.retry_initial) => {}
                    }
                    continue;
                }
            };
            if rows.is_empty() {
                let wait = match self.outbox.next_due().await {
                    Ok(Some(due)) => (due - Utc::now())
                        .to_std()
                        .unwrap_or_default()
                        .min(self.policy.idle_poll),
                    _ => self.policy.idle_poll,
                };
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = self.wake.notified() => {}
                    _ = tokio::time::sleep(wait) => {}
                }
                continue;
            }
            match self.sync_batch(rows, outage_failures).await {
                Ok(None) => outage_failures = 0,
                Ok(Some(wait)) => {
                    // The whole call failed (Salesforce down or out of API calls): the sync
                    // waits as one, instead of each row coming due on its own and calling.
                    outage_failures = outage_failures.saturating_add(1);
                    tokio::select! {
                        _ = shutdown.cancelled() => return Ok(()),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                Err(BatchError::Store(e)) => {
                    tracing::warn!(error = %e, "case outbox write failed; the leased rows come back when their lease ends");
                }
                Err(BatchError::Auth(error)) => {
                    if !self.pause_until_login(error, &shutdown).await? {
                        return Ok(());
                    }
                }
            }
        }
    }

    /// Pauses the sync after refused credentials: rows show as paused, `/readyz` is 503, and a
    /// new token is tried after a growing wait. Returns false if shutdown came first.
    async fn pause_until_login(
        &self,
        error: SalesforceError,
        shutdown: &CancellationToken,
    ) -> Result<bool, DbError> {
        tracing::error!(%error, "Salesforce refused the credentials: Case sync paused; fix the Connected App or its settings");
        metrics::counter!(m::SYNC_PAUSES).increment(1);
        self.set_ready(false);
        self.outbox
            .move_status(CaseStatus::Pending, CaseStatus::Paused)
            .await?;
        let mut wait = self.policy.auth_initial;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(false),
                _ = tokio::time::sleep(wait) => {}
            }
            match self.client.login().await {
                Ok(()) => {
                    tracing::info!("Salesforce accepted the credentials again: Case sync resumed");
                    self.outbox
                        .move_status(CaseStatus::Paused, CaseStatus::Pending)
                        .await?;
                    self.set_ready(true);
                    return Ok(true);
                }
                Err(e) if e.class() == ErrorClass::Auth => {
                    wait = (wait * 2).min(self.policy.auth_max);
                    tracing::error!(error = %e, retry_in_s = wait.as_secs(), "Salesforce still refuses the credentials; Case sync stays paused");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Salesforce login failed; trying again");
                }
            }
        }
    }

    fn backoff(&self, attempts: i64) -> DateTime<Utc> {
        Utc::now() + delta(self.backoff_wait(attempts))
    }

    /// Exponential backoff with jitter for the given number of failed attempts.
    fn backoff_wait(&self, attempts: i64) -> Duration {
        let exp = u32::try_from(attempts.clamp(0, 20)).unwrap_or(20);
        let base = self
            .policy
            .retry_initial
            .saturating_mul(2u32.saturating_pow(exp))
            .min(self.policy.retry_max);
        // Full jitter between half and the whole wait: workers that failed together do not
        // come back together.
        base.mul_f64(rand::rng().random_range(0.5..=1.0))
    }

    /// What to do with one row after an error of this class.
    fn outcome_for(&self, row: &CaseRecord, class: ErrorClass, error: String) -> SyncOutcome {
        metrics::counter!(m::SALESFORCE_ERRORS, "class" => class.name()).increment(1);
        match class {
            ErrorClass::Transient | ErrorClass::Auth => SyncOutcome::Retry {
                error,
                at: self.backoff(row.attempts),
            },
            ErrorClass::RateLimited => SyncOutcome::Retry {
                error,
                at: Utc::now() + delta(self.policy.rate_limit_wait),
            },
            ErrorClass::Permanent => {
                tracing::error!(key = row.key, vin = row.vin, %error, "Salesforce refused the Case for good; marked failed (fix, then `ecars cases retry KEY`)");
                metrics::counter!(m::CASES_SYNCED, "outcome" => "failed").increment(1);
                SyncOutcome::Failed { error }
            }
            ErrorClass::Unknown => {
                let since = row.first_error_at.unwrap_or_else(Utc::now);
                if Utc::now() - since >= delta(self.policy.unknown_window) {
                    tracing::error!(key = row.key, %error, "unrecognised Salesforce error kept failing; marked failed");
                    metrics::counter!(m::CASES_SYNCED, "outcome" => "failed").increment(1);
                    SyncOutcome::Failed { error }
                } else {
                    SyncOutcome::Retry {
                        error,
                        at: self.backoff(row.attempts),
                    }
                }
            }
        }
    }

    /// Sends one batch. `Ok(Some(wait))`: the whole call failed and the sync should wait.
    async fn sync_batch(
        &self,
        rows: Vec<CaseRecord>,
        outage_failures: u32,
    ) -> Result<Option<Duration>, BatchError> {
        let vins: Vec<&str> = rows.iter().map(|r| r.vin.as_str()).collect();
        let vehicles = match self.client.vehicle_ids(&vins).await {
            Ok(v) => v,
            Err(e) => return self.fail_batch(rows, e, outage_failures).await,
        };
        let mut outcomes = Vec::with_capacity(rows.len());
        let mut sent: Vec<(CaseRecord, Map<String, Value>)> = Vec::new();
        for row in rows {
            let mut wanted = row.fields.clone();
            if let Some(Some(id)) = vehicles.get(&row.vin) {
                wanted.insert(VEHICLE_FIELD.into(), Value::String(id.clone()));
            }
            let created = row.salesforce_id.is_some() || !row.synced_fields.is_empty();
            let changes = changed_fields(&wanted, &row.synced_fields, created);
            if changes.is_empty() {
                // Nothing Salesforce lacks (an episode closed, say): no call.
                let version = row.version;
                outcomes.push((
                    row,
                    SyncOutcome::Synced {
                        salesforce_id: None,
                        fields: wanted,
                        version,
                    },
                ));
                continue;
            }
            let mut record = changes;
            record.insert(ANOMALY_KEY_FIELD.into(), Value::String(row.key.clone()));
            sent.push((row, record));
        }
        if !sent.is_empty() {
            let records: Vec<Map<String, Value>> = sent.iter().map(|(_, r)| r.clone()).collect();
            let results = match self.client.upsert_cases(&records).await {
                Ok(results) => results,
                Err(e) => {
                    let rows = sent.into_iter().map(|(row, _)| row).collect();
                    if !outcomes.is_empty() {
                        self.finish(&outcomes).await?;
                    }
                    return self.fail_batch(rows, e, outage_failures).await;
                }
            };
            for ((row, record), result) in sent.into_iter().zip(results) {
                let outcome = self.record_outcome(&row, record, result);
                outcomes.push((row, outcome));
            }
        }
        self.finish(&outcomes).await?;
        Ok(None)
    }

    fn record_outcome(
        &self,
        row: &CaseRecord,
        mut record: Map<String, Value>,
        result: RecordResult,
    ) -> SyncOutcome {
        if result.success {
            let outcome = if result.created { "created" } else { "updated" };
            metrics::counter!(m::CASES_SYNCED, "outcome" => outcome).increment(1);
            tracing::debug!(key = row.key, outcome, id = ?result.id, "Case synced");
            record.remove(ANOMALY_KEY_FIELD);
            let mut fields = row.synced_fields.clone();
            fields.extend(record);
            // Create-only fields were sent (or are not wanted again): remember them as synced.
            for (k, v) in &row.fields {
                fields.entry(k.clone()).or_insert_with(|| v.clone());
            }
            return SyncOutcome::Synced {
                salesforce_id: result.id,
                fields,
                version: row.version,
            };
        }
        let (class, text) = match result.errors.first() {
            Some(e) => (
                crate::salesforce::classify_code(&e.status_code),
                format!(
                    "{}: {}{}",
                    e.status_code,
                    e.message,
                    if e.fields.is_empty() {
                        String::new()
                    } else {
                        format!(" (fields: {})", e.fields.join(", "))
                    }
                ),
            ),
            None => (
                ErrorClass::Unknown,
                "record refused without an error".into(),
            ),
        };
        self.outcome_for(row, class, text)
    }

    async fn fail_batch(
        &self,
        rows: Vec<CaseRecord>,
        error: SalesforceError,
        outage_failures: u32,
    ) -> Result<Option<Duration>, BatchError> {
        let class = error.class();
        metrics::counter!(m::SALESFORCE_ERRORS, "class" => class.name()).increment(1);
        let wait = match class {
            ErrorClass::Auth => {
                // Give the leases back at once; the rows wait as paused.
                let outcomes: Vec<_> = rows
                    .into_iter()
                    .map(|row| {
                        let outcome = SyncOutcome::Retry {
                            error: error.to_string(),
                            at: Utc::now(),
                        };
                        (row, outcome)
                    })
                    .collect();
                self.finish(&outcomes).await?;
                return Err(BatchError::Auth(error));
            }
            ErrorClass::Transient => self.backoff_wait(i64::from(outage_failures)),
            ErrorClass::RateLimited => self.policy.rate_limit_wait,
            ErrorClass::Permanent | ErrorClass::Unknown => {
                // The request itself is refused (a field the org lacks, say): judge each row.
                tracing::warn!(%error, class = class.name(), rows = rows.len(), "Salesforce refused the call");
                let outcomes: Vec<_> = rows
                    .into_iter()
                    .map(|row| {
                        let outcome = self.outcome_for(&row, class, error.to_string());
                        (row, outcome)
                    })
                    .collect();
                self.finish(&outcomes).await?;
                return Ok(None);
            }
        };
        tracing::warn!(%error, class = class.name(), rows = rows.len(), retry_in_ms = wait.as_millis() as u64, "Salesforce call failed; the sync waits");
        let at = Utc::now() + delta(wait);
        let outcomes: Vec<_> = rows
            .into_iter()
            .map(|row| {
                let outcome = SyncOutcome::Retry {
                    error: error.to_string(),
                    at,
                };
                (row, outcome)
            })
            .collect();
        self.finish(&outcomes).await?;
        Ok(Some(wait))
    }
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}
