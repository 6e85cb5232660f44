//! The anomaly worker's Prometheus metrics: names and descriptions.

use metrics::{describe_counter, describe_gauge};

/// Readings the anomaly detector skipped as duplicates or late arrivals.
pub const READINGS_SKIPPED: &str = "ecars_anomaly_readings_skipped_total";
/// Episode changes, labelled by `rule` and `change` (opened, updated, closed).
pub const EPISODES: &str = "ecars_anomaly_episodes_total";
/// Salesforce requests, labelled by `endpoint` (token, composite_upsert, query).
pub const SALESFORCE_CALLS: &str = "ecars_salesforce_calls_total";
/// Salesforce errors, labelled by `class` (transient, rate_limited, auth, permanent, unknown).
pub const SALESFORCE_ERRORS: &str = "ecars_salesforce_errors_total";
/// API calls the org made in the last 24 hours, from `Sforce-Limit-Info`.
pub const SALESFORCE_API_USED: &str = "ecars_salesforce_api_usage";
/// The org's daily API limit, from `Sforce-Limit-Info`.
pub const SALESFORCE_API_LIMIT: &str = "ecars_salesforce_api_limit";
/// Cases written to Salesforce, labelled by `outcome` (created, updated, failed).
pub const CASES_SYNCED: &str = "ecars_cases_synced_total";
/// 1 while the Case sync is paused because Salesforce refuses the credentials.
pub const SYNC_PAUSED: &str = "ecars_case_sync_paused";
/// Times the Case sync paused on refused credentials.
pub const SYNC_PAUSES: &str = "ecars_case_sync_pauses_total";
/// Times the Case sync waited because API usage passed the budget share.
pub const SYNC_BUDGET_WAITS: &str = "ecars_case_sync_budget_waits_total";

/// Batches of stored readings the worker of `ecars up` took, labelled by `from`: `memory` (as
/// the persistence worker committed them) or `rows` (read back from `sensor_data`).
pub const INPUT_BATCHES: &str = "ecars_anomaly_stored_batches_total";
/// Sensor rows the persistence worker committed that the anomaly worker of `ecars up` has not
/// committed its states for yet.
pub const ROWS_BEHIND: &str = "ecars_anomaly_rows_behind";

/// Case outbox rows, labelled by `status`.
pub const OUTBOX_ROWS: &str = "ecars_case_outbox_rows";
/// How long the oldest case outbox row of each `status` has been in it, seconds (0 when none).
pub const OUTBOX_OLDEST: &str = "ecars_case_outbox_oldest_seconds";

/// Describes the anomaly worker's metrics to the installed recorder.
pub fn describe() {
    describe_gauge!(OUTBOX_ROWS, "Case outbox rows, by status");
    describe_gauge!(
        OUTBOX_OLDEST,
        "Seconds the oldest case outbox row of each status has been in it (0: none)"
    );
    describe_counter!(
        READINGS_SKIPPED,
        "Readings the anomaly detector skipped as duplicates or late arrivals"
    );
    describe_counter!(
        INPUT_BATCHES,
        "Batches of stored readings the anomaly worker took, by from (memory, rows read back)"
    );
    describe_gauge!(
        ROWS_BEHIND,
        "Sensor rows stored that the anomaly worker has not committed its states for yet"
    );
    describe_counter!(EPISODES, "Anomaly episode changes, by rule and change");
    describe_counter!(SALESFORCE_CALLS, "Salesforce requests, by endpoint");
    describe_counter!(SALESFORCE_ERRORS, "Salesforce errors, by class");
    describe_gauge!(
        SALESFORCE_API_USED,
        "API calls the Salesforce org made in the last 24 hours (Sforce-Limit-Info)"
    );
    describe_gauge!(SALESFORCE_API_LIMIT, "The Salesforce org's daily API limit");
    describe_counter!(CASES_SYNCED, "Cases written to Salesforce, by outcome");
    describe_gauge!(
        SYNC_PAUSED,
        "1 while the Case sync is paused because Salesforce refuses the credentials"
    );
    describe_counter!(
        SYNC_PAUSES,
        "Times the Case sync paused on refused credentials"
    );
    describe_counter!(
        SYNC_BUDGET_WAITS,
        "Times the Case sync slowed down because API usage passed the budget share"
    );
}
