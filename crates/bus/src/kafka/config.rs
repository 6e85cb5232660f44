//! Kafka settings: ours as flags and environment variables, and librdkafka's own properties
//! passed through from `ECARS_KAFKA_*`.

use std::path::PathBuf;

use clap::Args;
use rdkafka::config::ClientConfig;

/// Environment variables of the form `ECARS_KAFKA_<NAME>` that are our own settings, not
/// librdkafka properties.
const OWN_SETTINGS: [&str; 8] = [
    "BROKERS",
    "TOPIC_PREFIX",
    "PARTITIONS",
    "REPLICATION_FACTOR",
    "MIN_INSYNC_REPLICAS",
    "CREATE_TOPICS",
    "SPOOL_DIR",
    "SPOOL_MAX_BYTES",
];

/// Kafka settings. Any other `ECARS_KAFKA_*` variable is passed to librdkafka as a property:
/// `ECARS_KAFKA_SECURITY_PROTOCOL=sasl_ssl` becomes `security.protocol=sasl_ssl`.
#[derive(Clone, Debug, Args)]
pub struct KafkaConfig {
    /// Kafka bootstrap servers (`host:port,host:port`). Setting it switches the service from the
    /// in-process bus to Kafka.
    #[arg(long = "kafka-brokers", env = "ECARS_KAFKA_BROKERS")]
    pub brokers: Option<String>,
    /// Prefix of the topic names (`ecars.` gives `ecars.telemetry`, `ecars.telemetry.dlq`).
    #[arg(
        long = "kafka-topic-prefix",
        env = "ECARS_KAFKA_TOPIC_PREFIX",
        default_value = "ecars."
    )]
    pub topic_prefix: String,
    /// Partitions of topics created at start: the most replicas of a consumer group that share
    /// the work.
    #[arg(long = "kafka-partitions", env = "ECARS_KAFKA_PARTITIONS", default_value_t = 6, value_parser = clap::value_parser!(i32).range(1..=10_000))]
    pub partitions: i32,
    /// Replication factor of topics created at start (3 on a production cluster).
    #[arg(long = "kafka-replication-factor", env = "ECARS_KAFKA_REPLICATION_FACTOR", default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=100))]
    pub replication_factor: i32,
    /// `min.insync.replicas` of topics created at start: with the producer's `acks=all`, a
    /// record is acknowledged once this many replicas have it (2 with a replication factor of
    /// 3). Unset: the cluster's default.
    #[arg(long = "kafka-min-insync-replicas", env = "ECARS_KAFKA_MIN_INSYNC_REPLICAS", value_parser = clap::value_parser!(i32).range(1..=100))]
    pub min_insync_replicas: Option<i32>,
    /// Create missing topics at start (`false` when operators pre-create them).
    #[arg(long = "kafka-create-topics", env = "ECARS_KAFKA_CREATE_TOPICS", default_value_t = true, action = clap::ArgAction::Set)]
    pub create_topics: bool,
    /// Directory of the disk spool that keeps accepted readings while Kafka is unreachable
    /// (ingest only). Give it a persistent volume: what is in it goes to Kafka at the next start.
    #[arg(
        long = "kafka-spool-dir",
        env = "ECARS_KAFKA_SPOOL_DIR",
        default_value = "ecars-spool"
    )]
    pub spool_dir: PathBuf,
    /// Most bytes the spool holds; when it is full, MQTT publishers wait (backpressure).
    #[arg(long = "kafka-spool-max-bytes", env = "ECARS_KAFKA_SPOOL_MAX_BYTES", default_value_t = 1 << 30, value_parser = clap::value_parser!(u64).range(65_536..))]
    pub spool_max_bytes: u64,
}

impl KafkaConfig {
    /// The Kafka topic of a stream's [`ecars_model::Record::TOPIC`].
    pub fn topic(&self, topic: &str) -> String {
        format!("{}{topic}", self.topic_prefix)
    }

    /// librdkafka properties from `ECARS_KAFKA_*` environment variables that are not ours.
    pub(crate) fn passthrough() -> Vec<(String, String)> {
        std::env::vars()
            .filter_map(|(name, value)| {
                let rest = name.strip_prefix("ECARS_KAFKA_")?;
                (!OWN_SETTINGS.contains(&rest))
                    .then(|| (rest.to_ascii_lowercase().replace('_', "."), value))
            })
            .collect()
    }

    /// A librdkafka client configuration for `brokers`, with the passthrough properties.
    pub(crate) fn client_config(&self, brokers: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", brokers)
            .set("client.id", "ecars");
        for (key, value) in Self::passthrough() {
            config.set(key, value);
        }
        config
    }
}
