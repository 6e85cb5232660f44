//! The bus between ingest and the workers: publish records to a stream keyed by VIN, consume a
//! stream as a named group and acknowledge what was durably handled.
//!
//! [`InProcessBus`] is the embedded default. Kafka implements the same [`Bus`] trait, with
//! [`Receipt`] as partition and offset, so workers are written once.

use std::fmt;

use async_trait::async_trait;

use crate::anomaly::{AnomalyEvent, CaseEvent};
use crate::telemetry::{DeadLetter, TelemetryReading};

mod in_process;
pub mod kafka;
pub mod spool;

pub use in_process::InProcessBus;
pub use kafka::{KafkaBus, KafkaConfig};

/// A named stream of records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Accepted telemetry readings, keyed by VIN.
    Telemetry,
    /// Rejected messages with their reasons.
    DeadLetters,
    /// Changes of anomaly episodes, keyed by VIN, for other services.
    Anomalies,
    /// Changes of the Salesforce sync of episodes' Cases, keyed by VIN, for other services.
    Cases,
}

impl Stream {
    /// Every stream.
    pub const ALL: [Stream; 4] = [
        Stream::Telemetry,
        Stream::DeadLetters,
        Stream::Anomalies,
        Stream::Cases,
    ];

    /// The stream's name, as used in metric labels (and Kafka topic suffixes).
    pub fn name(self) -> &'static str {
        match self {
            Stream::Telemetry => "telemetry",
            Stream::DeadLetters => "dead_letters",
            Stream::Anomalies => "anomalies",
            Stream::Cases => "cases",
        }
    }
}

impl fmt::Display for Stream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// One record on the bus.
#[derive(Clone, Debug, PartialEq)]
pub enum BusRecord {
    /// An accepted reading.
    Telemetry(TelemetryReading),
    /// A rejected message.
    DeadLetter(DeadLetter),
    /// A change of an anomaly episode.
    Anomaly(AnomalyEvent),
    /// A change of an episode's Case sync.
    Case(CaseEvent),
}

impl BusRecord {
    /// The stream this record belongs to.
    pub fn stream(&self) -> Stream {
        match self {
            BusRecord::Telemetry(_) => Stream::Telemetry,
            BusRecord::DeadLetter(_) => Stream::DeadLetters,
            BusRecord::Anomaly(_) => Stream::Anomalies,
            BusRecord::Case(_) => Stream::Cases,
        }
    }

    /// The partitioning key: the VIN for telemetry, anomalies and cases, so each car's records
    /// stay in order.
    pub fn key(&self) -> &str {
        match self {
            BusRecord::Telemetry(reading) => reading.vin.as_str(),
            BusRecord::DeadLetter(letter) => letter.key(),
            BusRecord::Anomaly(event) => event.vin.as_str(),
            BusRecord::Case(event) => event.vin.as_str(),
        }
    }
}

/// Where a delivered record sits in its stream; handed back to [`Subscription::ack`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// Partition (always 0 in process).
    pub partition: i32,
    /// Position within the partition.
    pub offset: i64,
}

/// A record delivered to a consumer group member.
#[derive(Debug)]
pub struct Delivery {
    /// The record.
    pub record: BusRecord,
    /// Its position, to acknowledge once the record is durably handled.
    pub receipt: Receipt,
}

/// Errors of a bus.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// The bus was closed (shutdown): nothing more is accepted.
    #[error("the bus is closed")]
    Closed,
    /// Nobody consumes the stream, so an in-process record would be lost.
    #[error("no consumer group subscribes to stream {0}; the record would be lost")]
    NoSubscribers(Stream),
    /// A backend failure (Kafka).
    #[error("bus backend: {0}")]
    Backend(String),
}

/// Publish and subscribe, whatever carries the records.
#[async_trait]
pub trait Bus: Send + Sync + 'static {
    /// Publishes a record to its stream. Waits while the stream is full: this wait is the
    /// backpressure that reaches MQTT publishers.
    async fn publish(&self, record: BusRecord) -> Result<(), BusError>;

    /// Joins consumer group `group` on `stream`. Members of one group share the records; each
    /// group gets every record. (On Kafka, the dead-letter stream's group is `{group}.dlq`.)
    async fn subscribe(
        &self,
        stream: Stream,
        group: &str,
    ) -> Result<Box<dyn Subscription>, BusError>;

    /// Every record of `stream` published from now on, for this process alone: no group shared
    /// with other instances, nothing committed (live views, where each instance must see every
    /// record and a restart starts at the newest). `name` identifies the reader. In process,
    /// that is a group of its own.
    async fn tail(&self, stream: Stream, name: &str) -> Result<Box<dyn Subscription>, BusError> {
        self.subscribe(stream, name).await
    }

    /// Checks that the bus can carry records now (Kafka: the cluster answers).
    async fn check(&self) -> Result<(), BusError> {
        Ok(())
    }

    /// Stops accepting records and hands on what was accepted (Kafka: flushes the producer).
    /// In process, subscriptions end once they have delivered everything.
    async fn close(&self);
}

/// A consumer group member's view of a stream.
#[async_trait]
pub trait Subscription: Send {
    /// The next record; `None` once the bus is closed and everything was delivered.
    async fn next(&mut self) -> Result<Option<Delivery>, BusError>;

    /// Acknowledges that these records are durably handled (for Kafka: commits their offsets).
    async fn ack(&mut self, receipts: &[Receipt]) -> Result<(), BusError>;
}
