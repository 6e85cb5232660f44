//! The Kafka bus: the same [`Bus`] on a real Kafka cluster, for scale-out and for other teams.
//!
//! - Topics `{prefix}telemetry` (key = VIN, so each car's readings stay in order in one
//!   partition), `{prefix}telemetry.dlq`, `{prefix}anomalies` and `{prefix}cases` (key = VIN),
//!   created at start when missing.
//! - Values are JSON; attributes follow the CloudEvents Kafka binding in binary mode
//!   (`ce_specversion`, `ce_id`, `ce_type`, `ce_source`, `ce_time`, `ce_subject`,
//!   `content-type`), so another service can consume without our code.
//! - The producer is idempotent (`acks=all`), lz4-compressed, batched with a small linger, and
//!   never gives up on a record. With a spool ([`KafkaBus::connect_with_spool`], what ingest
//!   uses), records accepted while Kafka is unreachable or slower than the cars go to a bounded
//!   spool on disk and reach Kafka in order when it is back ([`producer`]); when the spool is
//!   full, `publish` waits, which is backpressure to the cars. Without one, librdkafka's bounded
//!   queue holds them and `publish` waits once it is full.
//! - Consumers commit offsets only when the worker acknowledges (after its database commit).

mod producer;

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use async_trait::async_trait;
use clap::Args;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::Producer;
use rdkafka::util::Timeout;
use rdkafka::{Offset, TopicPartitionList};

use super::spool::SpooledRecord;
use super::{Bus, BusError, BusRecord, Delivery, Receipt, Stream, Subscription};
use crate::anomaly::{AnomalyEvent, CaseEvent};
use crate::telemetry::{DeadLetter, TelemetryReading};
use producer::SpoolingProducer;

/// CloudEvents `type` of an accepted reading.
pub const TELEMETRY_EVENT_TYPE: &str = "com.ecars.telemetry.v1";
/// CloudEvents `type` of a rejected message.
pub const DEAD_LETTER_EVENT_TYPE: &str = "com.ecars.telemetry.deadletter.v1";
/// CloudEvents `type` of a change of an anomaly episode.
pub const ANOMALY_EVENT_TYPE: &str = "com.ecars.anomaly.v1";
/// CloudEvents `source` of records ingest publishes.
pub const EVENT_SOURCE: &str = "urn:ecars:ingest";
/// CloudEvents `source` of records the anomaly worker publishes.
pub const ANOMALY_EVENT_SOURCE: &str = "urn:ecars:anomaly";
/// CloudEvents `type` of a change of a Case's Salesforce sync.
pub const CASE_EVENT_TYPE: &str = "com.ecars.case.v1";
/// CloudEvents `source` of records the Case sync publishes.
pub const CASE_EVENT_SOURCE: &str = "urn:ecars:case-sync";

/// Environment variables of the form `ECARS_KAFKA_<NAME>` that are our own settings, not
/// librdkafka properties.
const OWN_SETTINGS: [&str; 7] = [
    "BROKERS",
    "TOPIC_PREFIX",
    "PARTITIONS",
    "REPLICATION_FACTOR",
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
    /// Settings for `brokers` with every default.
    pub fn for_brokers(brokers: impl Into<String>) -> KafkaConfig {
        KafkaConfig {
            brokers: Some(brokers.into()),
            topic_prefix: "ecars.".into(),
            partitions: 6,
            replication_factor: 1,
            create_topics: true,
            spool_dir: PathBuf::from("ecars-spool"),
            spool_max_bytes: 1 << 30,
        }
    }

    /// The Kafka topic of a stream.
    pub fn topic(&self, stream: Stream) -> String {
        match stream {
            Stream::Telemetry => format!("{}telemetry", self.topic_prefix),
            Stream::DeadLetters => format!("{}telemetry.dlq", self.topic_prefix),
            Stream::Anomalies => format!("{}anomalies", self.topic_prefix),
            Stream::Cases => format!("{}cases", self.topic_prefix),
        }
    }

    /// librdkafka properties from `ECARS_KAFKA_*` environment variables that are not ours.
    fn passthrough() -> Vec<(String, String)> {
        std::env::vars()
            .filter_map(|(name, value)| {
                let rest = name.strip_prefix("ECARS_KAFKA_")?;
                (!OWN_SETTINGS.contains(&rest))
                    .then(|| (rest.to_ascii_lowercase().replace('_', "."), value))
            })
            .collect()
    }

    fn client_config(&self, brokers: &str) -> ClientConfig {
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

impl From<KafkaError> for BusError {
    fn from(e: KafkaError) -> Self {
        BusError::Backend(e.to_string())
    }
}

/// The Kafka implementation of [`Bus`].
pub struct KafkaBus {
    config: KafkaConfig,
    brokers: String,
    producer: SpoolingProducer,
}

impl KafkaBus {
    /// Connects the producer and, if asked, creates the topics that are missing. Without a
    /// spool: for services that only consume, or publish little.
    pub async fn connect(config: &KafkaConfig) -> Result<KafkaBus, BusError> {
        Self::open(config, false).await
    }

    /// Like [`KafkaBus::connect`], with the disk spool of `config.spool_dir` behind the
    /// producer, so readings accepted during a Kafka outage are kept (what ingest uses).
    pub async fn connect_with_spool(config: &KafkaConfig) -> Result<KafkaBus, BusError> {
        Self::open(config, true).await
    }

    async fn open(config: &KafkaConfig, with_spool: bool) -> Result<KafkaBus, BusError> {
        let brokers = config.brokers.clone().ok_or_else(|| {
            BusError::Backend("no brokers: set --kafka-brokers / ECARS_KAFKA_BROKERS".into())
        })?;
        let mut client = config.client_config(&brokers);
        client
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", "lz4")
            .set("linger.ms", "5")
            .set("batch.num.messages", "10000")
            // Never drop a record for being old: keep retrying while Kafka is away. The queue
            // below bounds the memory; when it is full, records go to the spool or publish waits.
            .set("message.timeout.ms", "0")
            .set("queue.buffering.max.messages", "200000")
            .set("queue.buffering.max.kbytes", "262144");
        // Passthrough settings win over our defaults (a test shrinks the queue, for example).
        for (key, value) in KafkaConfig::passthrough() {
            client.set(key, value);
        }
        let spool = with_spool.then(|| (config.spool_dir.clone(), config.spool_max_bytes));
        let producer = SpoolingProducer::create(config, client, spool)?;
        let bus = KafkaBus {
            config: config.clone(),
            brokers,
            producer,
        };
        if config.create_topics {
            bus.create_topics().await?;
        }
        Ok(bus)
    }

    /// Creates the topics that do not exist yet.
    pub async fn create_topics(&self) -> Result<(), BusError> {
        let admin: AdminClient<DefaultClientContext> =
            self.config.client_config(&self.brokers).create()?;
        let names: Vec<String> = Stream::ALL.map(|s| self.config.topic(s)).to_vec();
        let topics: Vec<NewTopic> = names
            .iter()
            .map(|name| {
                NewTopic::new(
                    name,
                    self.config.partitions,
                    TopicReplication::Fixed(self.config.replication_factor),
                )
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
        for result in admin.create_topics(&topics, &options).await? {
            match result {
                Ok(topic) => tracing::info!(
                    topic,
                    partitions = self.config.partitions,
                    "Kafka topic created"
                ),
                Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => {
                    tracing::debug!(topic, "Kafka topic exists")
                }
                Err((topic, code)) => {
                    return Err(BusError::Backend(format!(
                        "cannot create Kafka topic {topic}: {code}"
                    )))
                }
            }
        }
        Ok(())
    }
}

/// What another team needs to know about one of our topics.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TopicDescription {
    /// Kafka topic name.
    pub topic: String,
    /// Partitions, as the cluster reports them (`None` when the topic does not exist yet).
    pub partitions: Option<usize>,
    /// What the record key is.
    pub key: &'static str,
    /// CloudEvents `type` header.
    pub event_type: &'static str,
    /// One line on the JSON value.
    pub value: &'static str,
}

impl KafkaBus {
    /// Describes every topic of the bus, with partition counts read from the cluster.
    pub async fn describe_topics(&self) -> Result<Vec<TopicDescription>, BusError> {
        let producer = self.producer.kafka();
        let metadata = tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(None, Timeout::After(Duration::from_secs(10)))
        })
        .await
        .map_err(|e| BusError::Backend(format!("metadata task: {e}")))??;
        let partitions = |name: &str| {
            metadata
                .topics()
                .iter()
                .find(|t| t.name() == name && t.error().is_none())
                .map(|t| t.partitions().len())
        };
        let telemetry = self.config.topic(Stream::Telemetry);
        let dlq = self.config.topic(Stream::DeadLetters);
        let anomalies = self.config.topic(Stream::Anomalies);
        let cases = self.config.topic(Stream::Cases);
        Ok(vec![
            TopicDescription {
                partitions: partitions(&telemetry),
                topic: telemetry,
                key: "VIN (each car's readings in order in one partition)",
                event_type: TELEMETRY_EVENT_TYPE,
                value: "TelemetryReading JSON: event_id, received_at, vin, name, profile, range, mpge, battery, malfunction, speed, latitude, longitude, date",
            },
            TopicDescription {
                partitions: partitions(&dlq),
                topic: dlq,
                key: "MQTT topic the message arrived on",
                event_type: DEAD_LETTER_EVENT_TYPE,
                value: "DeadLetter JSON: id, received_at, topic, client_id, reason, detail, payload (base64 of the original bytes), truncated",
            },
            TopicDescription {
                partitions: partitions(&anomalies),
                topic: anomalies,
                key: "VIN (each car's episode changes in order in one partition)",
                event_type: ANOMALY_EVENT_TYPE,
                value: "AnomalyEvent JSON: event_id, key (the Case's Ecars_Anomaly_Key__c), vin, rule, change (opened, updated, closed), version, started_at, closed_at, firings, subject, priority, recorded_at",
            },
            TopicDescription {
                partitions: partitions(&cases),
                topic: cases,
                key: "VIN (each car's Case changes in order in one partition)",
                event_type: CASE_EVENT_TYPE,
                value: "CaseEvent JSON: event_id, key (Ecars_Anomaly_Key__c), vin, rule, change (created, updated, failed), salesforce_id, synced_version, case_status, error, sequence, recorded_at",
            },
        ])
    }
}

/// The record as Kafka carries it: VIN key, CloudEvents headers, JSON value.
fn encode(record: &BusRecord) -> Result<SpooledRecord, BusError> {
    let (id, kind, source, time, subject, value) = match record {
        BusRecord::Telemetry(r) => (
            r.event_id.to_string(),
            TELEMETRY_EVENT_TYPE,
            EVENT_SOURCE,
            r.received_at,
            r.vin.to_string(),
            serde_json::to_vec(r),
        ),
        BusRecord::DeadLetter(d) => (
            d.id.to_string(),
            DEAD_LETTER_EVENT_TYPE,
            EVENT_SOURCE,
            d.received_at,
            d.topic.clone(),
            serde_json::to_vec(d),
        ),
        BusRecord::Anomaly(a) => (
            a.event_id.to_string(),
            ANOMALY_EVENT_TYPE,
            ANOMALY_EVENT_SOURCE,
            a.recorded_at,
            a.vin.to_string(),
            serde_json::to_vec(a),
        ),
        BusRecord::Case(c) => (
            c.event_id.to_string(),
            CASE_EVENT_TYPE,
            CASE_EVENT_SOURCE,
            c.recorded_at,
            c.vin.to_string(),
            serde_json::to_vec(c),
        ),
    };
    let value = value.map_err(|e| BusError::Backend(format!("cannot encode record: {e}")))?;
    let time = time.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let headers = [
        ("ce_specversion", "1.0"),
        ("ce_id", id.as_str()),
        ("ce_type", kind),
        ("ce_source", source),
        ("ce_time", time.as_str()),
        ("ce_subject", subject.as_str()),
        ("content-type", "application/json"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.as_bytes().to_vec()))
    .collect();
    Ok(SpooledRecord {
        stream: record.stream(),
        key: record.key().as_bytes().to_vec(),
        headers,
        value,
    })
}

fn decode(stream: Stream, value: &[u8]) -> Result<BusRecord, serde_json::Error> {
    Ok(match stream {
        Stream::Telemetry => {
            BusRecord::Telemetry(serde_json::from_slice::<TelemetryReading>(value)?)
        }
        Stream::DeadLetters => BusRecord::DeadLetter(serde_json::from_slice::<DeadLetter>(value)?),
        Stream::Anomalies => BusRecord::Anomaly(serde_json::from_slice::<AnomalyEvent>(value)?),
        Stream::Cases => BusRecord::Case(serde_json::from_slice::<CaseEvent>(value)?),
    })
}

#[async_trait]
impl Bus for KafkaBus {
    async fn publish(&self, record: BusRecord) -> Result<(), BusError> {
        self.producer.publish(encode(&record)?).await
    }

    async fn subscribe(
        &self,
        stream: Stream,
        group: &str,
    ) -> Result<Box<dyn Subscription>, BusError> {
        let topic = self.config.topic(stream);
        // One Kafka group per topic: members of one group with different subscriptions make
        // every rebalance of the small dead-letter topic stall telemetry too (and librdkafka's
        // mock cluster never finished such a rejoin after an outage).
        let group = match stream {
            Stream::Telemetry => group.to_owned(),
            Stream::DeadLetters => format!("{group}.dlq"),
            Stream::Anomalies => format!("{group}.anomalies"),
            Stream::Cases => format!("{group}.cases"),
        };
        let group = group.as_str();
        let consumer: StreamConsumer = self
            .config
            .client_config(&self.brokers)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            // librdkafka otherwise remembers the position of every record handed out and commits
            // it by itself when partitions are revoked, which would skip records still in a batch.
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .create()?;
        consumer.subscribe(&[&topic])?;
        tracing::info!(topic, group, "joined Kafka consumer group");
        Ok(Box::new(KafkaSubscription {
            consumer,
            stream,
            topic,
        }))
    }

    async fn tail(&self, stream: Stream, name: &str) -> Result<Box<dyn Subscription>, BusError> {
        let topic = self.config.topic(stream);
        // A group of its own per process, from the newest offset, never committed: every relay
        // instance sees every record, and a restarted one starts live.
        let group = format!("{name}-{}", uuid::Uuid::now_v7());
        let consumer: StreamConsumer = self
            .config
            .client_config(&self.brokers)
            .set("group.id", &group)
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "latest")
            .create()?;
        consumer.subscribe(&[&topic])?;
        tracing::info!(
            topic,
            group,
            "following Kafka topic from its newest records"
        );
        Ok(Box::new(KafkaSubscription {
            consumer,
            stream,
            topic,
        }))
    }

    async fn check(&self) -> Result<(), BusError> {
        if let Some((bytes, dir)) = self.producer.spooled() {
            return Err(BusError::Backend(format!(
                "Kafka unavailable or behind: {bytes} bytes of accepted records wait in the spool {}; they go to Kafka in order when it takes them",
                dir.display()
            )));
        }
        let producer = self.producer.kafka();
        let topic = self.config.topic(Stream::Telemetry);
        tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(Some(&topic), Timeout::After(Duration::from_secs(2)))
                .map(|_| ())
        })
        .await
        .map_err(|e| BusError::Backend(format!("metadata task: {e}")))??;
        Ok(())
    }

    async fn close(&self) {
        // Hand every accepted record to Kafka before the process ends; what is spooled stays on
        // disk for the next start.
        self.producer.close(Duration::from_secs(30)).await;
    }
}

struct KafkaSubscription {
    consumer: StreamConsumer,
    stream: Stream,
    topic: String,
}

#[async_trait]
impl Subscription for KafkaSubscription {
    async fn next(&mut self) -> Result<Option<Delivery>, BusError> {
        let mut failures = 0u32;
        loop {
            let message = match self.consumer.recv().await {
                Ok(message) => message,
                // Broker restarts, coordinator moves, rebalances: librdkafka recovers by itself.
                // These are events it queued, not failures of this call: read on at once. (A
                // pause per event left a rejoin waiting behind minutes of queued outage errors.)
                Err(error) => {
                    failures += 1;
                    metrics::counter!(crate::metrics::BUS_CONSUME_ERRORS, "stream" => self.stream.name()).increment(1);
                    if failures.is_power_of_two() {
                        tracing::warn!(topic = self.topic, %error, failures, "Kafka consumption failing; librdkafka retries");
                    }
                    continue;
                }
            };
            let receipt = Receipt {
                partition: message.partition(),
                offset: message.offset(),
            };
            match message.payload().map(|value| decode(self.stream, value)) {
                Some(Ok(record)) => return Ok(Some(Delivery { record, receipt })),
                // A record that is not ours (another producer wrote garbage): count it, skip it;
                // its offset is committed with the next acknowledged one.
                other => {
                    metrics::counter!(crate::metrics::BUS_UNDECODABLE, "stream" => self.stream.name()).increment(1);
                    let error = match other {
                        Some(Err(e)) => e.to_string(),
                        _ => "empty value".to_owned(),
                    };
                    tracing::error!(
                        topic = self.topic,
                        partition = receipt.partition,
                        offset = receipt.offset,
                        error,
                        "skipping a record that does not decode"
                    );
                }
            }
        }
    }

    async fn ack(&mut self, receipts: &[Receipt]) -> Result<(), BusError> {
        // Commit the next offset of the highest acknowledged record of each partition.
        let mut next: HashMap<i32, i64> = HashMap::new();
        for r in receipts {
            let entry = next.entry(r.partition).or_insert(r.offset + 1);
            *entry = (*entry).max(r.offset + 1);
        }
        let mut offsets = TopicPartitionList::new();
        for (partition, offset) in next {
            offsets.add_partition_offset(&self.topic, partition, Offset::Offset(offset))?;
        }
        // Asynchronous: a synchronous commit blocks while a rebalance waits for this consumer to
        // be polled, which is a deadlock. librdkafka sends it in order and waits for outstanding
        // commits when the consumer closes.
        tracing::debug!(topic = self.topic, ?offsets, "committing");
        if let Err(error) = self.consumer.commit(&offsets, CommitMode::Async) {
            // A rebalance took the partition away, or the coordinator is briefly gone. Nothing is
            // lost: the records are delivered again (to this or another replica) and the
            // database's unique event ids make the repeat harmless.
            metrics::counter!(crate::metrics::BUS_COMMIT_FAILURES, "stream" => self.stream.name())
                .increment(1);
            tracing::warn!(topic = self.topic, %error, "offset commit failed; the records will be delivered again");
        }
        Ok(())
    }
}

// No explicit unsubscribe on drop: dropping the consumer closes it, and librdkafka's close
// waits for the asynchronous commits in flight before it leaves the group. Leaving first would
// let another replica start from an older offset, or (with no commit yet) from the reset policy.

/// CloudEvents attributes of a consumed Kafka message, for tests and tools.
pub fn cloud_event_headers<M: Message>(message: &M) -> HashMap<String, String> {
    let mut out = HashMap::new();
    if let Some(headers) = message.headers() {
        for header in headers.iter() {
            if let Some(value) = header.value {
                out.insert(
                    header.key.to_owned(),
                    String::from_utf8_lossy(value).into_owned(),
                );
            }
        }
    }
    out
}
