//! The bus's Prometheus metrics: names and descriptions.

use metrics::{describe_counter, describe_gauge, Unit};

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
/// Unix time (seconds) at which the oldest record still waiting in the Kafka spool was written
/// (to its segment: up to one segment older), 0 while the spool is empty. Its age is
/// `time() - ecars_kafka_spool_oldest_timestamp_seconds`.
pub const SPOOL_OLDEST: &str = "ecars_kafka_spool_oldest_timestamp_seconds";
/// Records of a partition not yet processed by this consumer group, labelled by `topic`,
/// `partition` and `group`: the high watermark minus the committed offset (a tail, which
/// never commits: minus the position it has read to). 0 for partitions another member holds.
pub const KAFKA_CONSUMER_LAG: &str = "ecars_kafka_consumer_lag";
/// Unix time (seconds) at which a consumer last reported its lag, labelled by `group`.
/// librdkafka hands a consumer its statistics only while the consumer reads, so a worker held up
/// by its sink (a database that does not answer) stops reporting, and [`KAFKA_CONSUMER_LAG`]
/// keeps its last value: the age of this one says how stale that is.
pub const KAFKA_CONSUMER_LAG_REPORTED: &str = "ecars_kafka_consumer_lag_timestamp_seconds";

/// Describes the bus's metrics to the installed recorder.
pub fn describe() {
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
        BUS_CONSUME_ERRORS,
        "Kafka consumption errors; librdkafka retries"
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
    describe_gauge!(
        SPOOL_OLDEST,
        Unit::Seconds,
        "Unix time at which the oldest record waiting in the Kafka spool was written (to its segment); 0 when empty"
    );
    describe_gauge!(
        KAFKA_CONSUMER_LAG,
        "Records of a partition not yet processed by this consumer group (high watermark minus committed offset)"
    );
    describe_gauge!(
        KAFKA_CONSUMER_LAG_REPORTED,
        Unit::Seconds,
        "Unix time at which this consumer last reported its lag (only while it reads)"
    );
}
