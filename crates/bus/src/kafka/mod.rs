//! The Kafka bus: the same [`crate::Bus`] on a real Kafka cluster, for scale-out and for other
//! teams.
//!
//! - One topic per stream, `{prefix}{Record::TOPIC}` (`ecars.telemetry`, keyed by VIN so each
//!   car's readings stay in order in one partition), created when first used unless operators
//!   pre-create them (`config.rs`).
//! - Values are JSON; attributes follow the CloudEvents Kafka binding in binary mode
//!   (`ce_specversion`, `ce_id`, `ce_type`, `ce_source`, `ce_time`, `ce_subject`,
//!   `content-type`), so another service can consume without our code ([`codec`]).
//! - The producer is idempotent (`acks=all`), lz4-compressed, batched with a small linger, and
//!   never gives up on a record. With a spool ([`KafkaBus::connect_with_spool`], what ingest
//!   uses), records accepted while Kafka is unreachable or slower than the cars go to a bounded
//!   [`spool`] on disk and reach Kafka in order when it is back (`producer.rs`); when the spool is
//!   full, `publish` waits, which is backpressure to the cars. Without one, librdkafka's bounded
//!   queue holds them and `publish` waits once it is full.
//! - Consumers commit offsets only when the worker acknowledges (after its database commit)
//!   (`consumer.rs`).

mod admin;
pub mod codec;
mod config;
mod consumer;
pub mod partitioner;
mod producer;
pub mod spool;

use std::collections::HashSet;
use std::sync::RwLock;
use std::time::Duration;

use async_trait::async_trait;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::producer::Producer;
use rdkafka::util::Timeout;

pub use admin::TopicDescription;
pub use codec::cloud_event_headers;
pub use config::KafkaConfig;
use consumer::{KafkaSubscription, LagReport};
use producer::SpoolingProducer;

use crate::{Backend, BusError, BusHealth, Envelope, RawSubscription, Stream};

/// The Kafka implementation of [`Backend`].
pub struct KafkaBus {
    config: KafkaConfig,
    brokers: String,
    producer: SpoolingProducer,
    /// Topics (after the prefix) known to exist: created, found, or left to operators.
    ready_topics: RwLock<HashSet<&'static str>>,
}

impl std::fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBus")
            .field("brokers", &self.brokers)
            .field("topic_prefix", &self.config.topic_prefix)
            .finish_non_exhaustive()
    }
}

impl KafkaBus {
    /// Connects the producer. Without a spool: for services that only consume, or publish
    /// little.
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
            BusError::Unavailable("no brokers: set --kafka-brokers / ECARS_KAFKA_BROKERS".into())
        })?;
        let mut client = config.client_config(&brokers);
        client
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // The Java client's partitioner: other services find each car where we put it.
            .set("partitioner", partitioner::LIBRDKAFKA_PARTITIONER)
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
        Ok(KafkaBus {
            config: config.clone(),
            brokers,
            producer,
            ready_topics: RwLock::default(),
        })
    }

    /// The settings the bus runs with.
    pub fn config(&self) -> &KafkaConfig {
        &self.config
    }

    /// Makes sure these streams' topics exist, creating the missing ones (unless
    /// `--kafka-create-topics false`). Streams used later are checked when first used; creating
    /// the documented ones at start means other teams find them before the first record.
    pub async fn ensure_topics(&self, topics: &[&'static str]) -> Result<(), BusError> {
        let missing: Vec<&'static str> = {
            let ready = self.ready_topics.read().unwrap_or_else(|p| p.into_inner());
            topics
                .iter()
                .copied()
                .filter(|t| !ready.contains(t))
                .collect()
        };
        if missing.is_empty() {
            return Ok(());
        }
        if self.config.create_topics {
            self.create_topics(&missing).await?;
        }
        self.ready_topics
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .extend(missing);
        Ok(())
    }

    /// A consumer in `group`; `report` names the group in the lag metric and says whether it
    /// commits.
    fn consumer(
        &self,
        group: &str,
        offset_reset: &str,
        report: LagReport,
    ) -> Result<StreamConsumer<LagReport>, BusError> {
        let mut config = self.config.client_config(&self.brokers);
        if config.get("statistics.interval.ms").is_none() {
            config.set("statistics.interval.ms", consumer::STATISTICS_INTERVAL_MS);
        }
        config
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            // librdkafka otherwise remembers the position of every record handed out and commits
            // it by itself when partitions are revoked, which would skip records still in a batch.
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", offset_reset)
            .create_with_context(report)
            .map_err(|source| BusError::Kafka {
                context: "cannot create a consumer",
                source,
            })
    }

    fn follow(
        &self,
        consumer: StreamConsumer<LagReport>,
        stream: Stream,
    ) -> Result<Box<dyn RawSubscription>, BusError> {
        let topic = self.config.topic(stream.topic);
        consumer
            .subscribe(&[&topic])
            .map_err(|source| BusError::Kafka {
                context: "cannot subscribe",
                source,
            })?;
        Ok(Box::new(KafkaSubscription {
            consumer,
            stream,
            topic,
        }))
    }
}

#[async_trait]
impl Backend for KafkaBus {
    async fn publish(&self, envelope: Envelope) -> Result<(), BusError> {
        self.ensure_topics(&[envelope.stream.topic]).await?;
        let record = codec::encode(&envelope)?;
        self.producer.publish(envelope.stream, record).await
    }

    /// One Kafka group per topic: members of one group with different subscriptions make every
    /// rebalance of a small topic stall the others too (and librdkafka's mock cluster never
    /// finished such a rejoin after an outage). Callers name a group per stream.
    async fn subscribe(
        &self,
        stream: Stream,
        group: &str,
    ) -> Result<Box<dyn RawSubscription>, BusError> {
        self.ensure_topics(&[stream.topic]).await?;
        let report = LagReport {
            group: group.to_owned(),
            commits: true,
        };
        let subscription = self.follow(self.consumer(group, "earliest", report)?, stream)?;
        tracing::info!(
            topic = self.config.topic(stream.topic),
            group,
            "joined Kafka consumer group"
        );
        Ok(subscription)
    }

    /// A group of its own per process, from the newest offset, never committed: every relay
    /// instance sees every record, and a restarted one starts live.
    async fn tail(&self, stream: Stream, name: &str) -> Result<Box<dyn RawSubscription>, BusError> {
        self.ensure_topics(&[stream.topic]).await?;
        let group = format!("{name}-{}", uuid::Uuid::now_v7());
        let report = LagReport {
            group: name.to_owned(),
            commits: false,
        };
        let subscription = self.follow(self.consumer(&group, "latest", report)?, stream)?;
        tracing::info!(
            topic = self.config.topic(stream.topic),
            group,
            "following Kafka topic from its newest records"
        );
        Ok(subscription)
    }

    async fn health(&self) -> BusHealth {
        let spool = self.producer.spool_health();
        let producer = self.producer.kafka();
        // One topic's metadata is enough to know the cluster answers (all of a large cluster's
        // would be megabytes per probe); one of ours, so none is created by asking.
        let topic = self
            .ready_topics
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .next()
            .map(|t| self.config.topic(t));
        let answers = match tokio::task::spawn_blocking(move || {
            producer
                .client()
                .fetch_metadata(topic.as_deref(), Timeout::After(Duration::from_secs(2)))
                .map(|_| ())
        })
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(error)) => Err(format!("the Kafka cluster does not answer: {error}")),
            Err(error) => Err(format!("the Kafka probe failed: {error}")),
        };
        BusHealth { answers, spool }
    }

    async fn close(&self) {
        // Hand every accepted record to Kafka before the process ends, the spool's included;
        // what Kafka did not take within the time stays on disk for the next start.
        self.producer.close(Duration::from_secs(30)).await;
    }
}
