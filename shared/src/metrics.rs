//! Prometheus metrics: the recorder every service installs, and the metric names, described once
//! here so `/metrics` explains itself.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// MQTT PUBLISH packets received on telemetry topics.
pub const READINGS_RECEIVED: &str = "ecars_readings_received_total";
/// Readings accepted and published on the bus.
pub const READINGS_ACCEPTED: &str = "ecars_readings_accepted_total";
/// Readings rejected, labelled by `reason`.
pub const READINGS_REJECTED: &str = "ecars_readings_rejected_total";
/// MQTT connections refused at CONNECT, labelled by `reason`.
pub const MQTT_CONNECTIONS_REFUSED: &str = "ecars_mqtt_connections_refused_total";
/// MQTT connections currently open through the gateway.
pub const MQTT_CONNECTIONS_OPEN: &str = "ecars_mqtt_connections_open";
/// Times a bus publish had to wait for room (backpressure), labelled by `stream`.
pub const BUS_BACKPRESSURE: &str = "ecars_bus_backpressure_total";
/// Records waiting in an in-process queue, labelled by `stream` and `group`.
pub const BUS_QUEUE_DEPTH: &str = "ecars_bus_queue_depth";
/// Kafka records skipped because they do not decode, labelled by `stream`.
pub const BUS_UNDECODABLE: &str = "ecars_bus_undecodable_total";
/// Kafka consumption errors (retried), labelled by `stream`.
pub const BUS_CONSUME_ERRORS: &str = "ecars_bus_consume_errors_total";
/// Kafka offset commits that failed (the records are delivered again), labelled by `stream`.
pub const BUS_COMMIT_FAILURES: &str = "ecars_bus_commit_failures_total";
/// Bytes of records waiting in the Kafka spool on disk.
pub const SPOOL_BYTES: &str = "ecars_kafka_spool_bytes";
/// Records written to (`op="written"`) and delivered from (`op="delivered"`) the Kafka spool.
pub const SPOOL_RECORDS: &str = "ecars_kafka_spool_records_total";
/// Times the Kafka spool was full and MQTT publishers had to wait.
pub const SPOOL_FULL: &str = "ecars_kafka_spool_full_total";
/// Times the Kafka producer lost every broker.
pub const KAFKA_OUTAGES: &str = "ecars_kafka_outages_total";
/// 1 while accepted readings go to the spool instead of straight to Kafka.
pub const KAFKA_SPOOLING: &str = "ecars_kafka_spooling";
/// Rows committed to the database, labelled by `table`.
pub const ROWS_WRITTEN: &str = "ecars_rows_written_total";
/// Rows in each committed batch, labelled by `table`.
pub const BATCH_SIZE: &str = "ecars_batch_rows";
/// Time to commit one batch, labelled by `table`.
pub const BATCH_LATENCY: &str = "ecars_batch_write_seconds";
/// Failed batch writes that will be retried, labelled by `table`.
pub const BATCH_RETRIES: &str = "ecars_batch_write_retries_total";
/// Whether the database answered the last write or health check (1) or not (0).
pub const DATABASE_UP: &str = "ecars_database_up";

/// Readings the anomaly detector skipped as duplicates or late arrivals.
pub const ANOMALY_READINGS_SKIPPED: &str = "ecars_anomaly_readings_skipped_total";
/// Episode changes, labelled by `rule` and `change` (opened, updated, closed).
pub const ANOMALY_EPISODES: &str = "ecars_anomaly_episodes_total";
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
pub const CASE_SYNC_PAUSED: &str = "ecars_case_sync_paused";
/// Times the Case sync paused on refused credentials.
pub const CASE_SYNC_PAUSES: &str = "ecars_case_sync_pauses_total";
/// Times the Case sync waited because API usage passed the budget share.
pub const CASE_SYNC_BUDGET_WAITS: &str = "ecars_case_sync_budget_waits_total";

/// Live sockets open on the relay.
pub const RELAY_CLIENTS: &str = "ecars_relay_clients";
/// Live sockets refused, labelled by `reason` (missing, invalid, expired, wrong_vin, origin,
/// api_key).
pub const RELAY_REFUSED: &str = "ecars_relay_refused_total";
/// Live sockets closed because the client fell too far behind.
pub const RELAY_SLOW_CLIENTS: &str = "ecars_relay_slow_clients_total";

/// Installs the process-wide Prometheus recorder and describes every metric.
///
/// Safe to call more than once (tests start several services in one process): later calls
/// return a handle to the recorder already installed.
pub fn install_recorder() -> PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets(&[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    10.0,
                ])
                .map(|b| b.build_recorder())
                .unwrap_or_else(|_| PrometheusBuilder::new().build_recorder());
            let handle = recorder.handle();
            // Another recorder may already be installed (a test harness); ours still renders.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(
        READINGS_RECEIVED,
        "MQTT PUBLISH packets received on telemetry topics"
    );
    describe_counter!(
        READINGS_ACCEPTED,
        "Readings accepted and published on the bus"
    );
    describe_counter!(
        READINGS_REJECTED,
        "Readings rejected to the dead-letter store, by reason"
    );
    describe_counter!(
        MQTT_CONNECTIONS_REFUSED,
        "MQTT connections refused at CONNECT, by reason"
    );
    describe_gauge!(
        MQTT_CONNECTIONS_OPEN,
        "MQTT connections open through the gateway"
    );
    describe_counter!(
        BUS_BACKPRESSURE,
        "Bus publishes that waited for room in a full queue"
    );
    describe_gauge!(
        BUS_QUEUE_DEPTH,
        "Records waiting in an in-process bus queue"
    );
    describe_counter!(
        BUS_UNDECODABLE,
        "Kafka records skipped because they do not decode"
    );
    describe_counter!(
        BUS_COMMIT_FAILURES,
        "Kafka offset commits that failed; the records are delivered again"
    );
    describe_gauge!(
        SPOOL_BYTES,
        Unit::Bytes,
        "Bytes of accepted records waiting on disk for Kafka"
    );
    describe_counter!(
        SPOOL_RECORDS,
        "Records written to (op=written) and delivered from (op=delivered) the Kafka spool"
    );
    describe_counter!(
        SPOOL_FULL,
        "Times the Kafka spool was full and MQTT publishers waited"
    );
    describe_counter!(KAFKA_OUTAGES, "Times the Kafka producer lost every broker");
    describe_gauge!(
        KAFKA_SPOOLING,
        "1 while accepted readings go to the disk spool instead of straight to Kafka"
    );
    describe_counter!(ROWS_WRITTEN, "Rows committed to the database, by table");
    describe_histogram!(BATCH_SIZE, "Rows per committed batch, by table");
    describe_histogram!(
        BATCH_LATENCY,
        Unit::Seconds,
        "Time to commit one batch, by table"
    );
    describe_counter!(
        BATCH_RETRIES,
        "Failed batch writes that are retried, by table"
    );
    describe_gauge!(
        DATABASE_UP,
        "1 when the database answered the last write or check, else 0"
    );
    describe_counter!(
        ANOMALY_READINGS_SKIPPED,
        "Readings the anomaly detector skipped as duplicates or late arrivals"
    );
    describe_counter!(
        ANOMALY_EPISODES,
        "Anomaly episode changes, by rule and change"
    );
    describe_counter!(SALESFORCE_CALLS, "Salesforce requests, by endpoint");
    describe_counter!(SALESFORCE_ERRORS, "Salesforce errors, by class");
    describe_gauge!(
        SALESFORCE_API_USED,
        "API calls the Salesforce org made in the last 24 hours (Sforce-Limit-Info)"
    );
    describe_gauge!(SALESFORCE_API_LIMIT, "The Salesforce org's daily API limit");
    describe_counter!(CASES_SYNCED, "Cases written to Salesforce, by outcome");
    describe_gauge!(
        CASE_SYNC_PAUSED,
        "1 while the Case sync is paused because Salesforce refuses the credentials"
    );
    describe_counter!(
        CASE_SYNC_PAUSES,
        "Times the Case sync paused on refused credentials"
    );
    describe_gauge!(RELAY_CLIENTS, "Live sockets open on the relay");
    describe_counter!(RELAY_REFUSED, "Live sockets refused, by reason");
    describe_counter!(
        RELAY_SLOW_CLIENTS,
        "Live sockets closed because the client fell too far behind"
    );
    describe_counter!(
        CASE_SYNC_BUDGET_WAITS,
        "Times the Case sync slowed down because API usage passed the budget share"
    );
}
