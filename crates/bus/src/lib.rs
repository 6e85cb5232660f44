//! The bus between ingest and the workers: typed streams of [`Record`]s, keyed (by VIN for the
//! per-car streams), consumed by named groups that acknowledge what they durably handled.
//!
//! - [`Bus`] is the handle every part of a process shares: `publish(record)`,
//!   `subscribe::<T>(group)`, `tail::<T>(name)`. A stream is a record type: adding one is a type
//!   implementing [`Record`] and a consumer that subscribes to it; nothing here changes.
//! - A [`Backend`] carries the records: [`InProcessBus`] (bounded queues in memory, the embedded
//!   default) or, with the `kafka` feature, [`kafka::KafkaBus`] (topics, consumer groups and a
//!   disk spool for outages). Workers are written once against [`Bus`].

mod in_process;
#[cfg(feature = "kafka")]
pub mod kafka;
pub mod metrics;
mod record;
mod stream;

use std::marker::PhantomData;
use std::sync::Arc;

use async_trait::async_trait;
pub use ecars_model::Record;

pub use in_process::InProcessBus;
pub use record::{AnyRecord, Envelope};
pub use stream::Stream;

/// The bus as the parts of a process use it: cheap to clone, typed by record.
#[derive(Clone)]
pub struct Bus {
    backend: Arc<dyn Backend>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bus(..)")
    }
}

impl Bus {
    /// A bus on this backend.
    pub fn new(backend: impl Backend) -> Bus {
        Bus {
            backend: Arc::new(backend),
        }
    }

    /// The embedded bus: one bounded queue of `capacity` records per stream and group.
    pub fn in_process(capacity: usize) -> Bus {
        Bus::new(InProcessBus::new(capacity))
    }

    /// Publishes a record to its stream. Waits while the stream is full: this wait is the
    /// backpressure that reaches MQTT publishers.
    pub async fn publish<T: Record>(&self, record: T) -> Result<(), BusError> {
        self.backend.publish(Envelope::new(record)).await
    }

    /// Joins consumer group `group` on `T`'s stream. Members of one group share the records;
    /// each group gets every record. On Kafka a group follows one topic: give each stream a
    /// group name of its own (`ecars-persist`, `ecars-persist.dlq`).
    pub async fn subscribe<T: Record>(&self, group: &str) -> Result<Subscription<T>, BusError> {
        let raw = self.backend.subscribe(Stream::of::<T>(), group).await?;
        Ok(Subscription::new(raw))
    }

    /// Every record of `T`'s stream published from now on, for this process alone: no group
    /// shared with other instances, nothing committed (live views, where each instance must see
    /// every record and a restart starts at the newest). `name` identifies the reader.
    pub async fn tail<T: Record>(&self, name: &str) -> Result<Subscription<T>, BusError> {
        let raw = self.backend.tail(Stream::of::<T>(), name).await?;
        Ok(Subscription::new(raw))
    }

    /// How the bus is doing now (Kafka: whether the cluster answers, and the spool).
    pub async fn health(&self) -> BusHealth {
        self.backend.health().await
    }

    /// Stops accepting records and hands on what was accepted (Kafka: flushes the producer).
    /// In process, subscriptions end once they have delivered everything.
    pub async fn close(&self) {
        self.backend.close().await
    }
}

/// How the bus is doing, for readiness and status: whether it answers, and this process's
/// spool (Kafka), which accepts records while the cluster is away.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BusHealth {
    /// `Ok` when the bus answers now; why not.
    pub answers: Result<(), String>,
    /// This process's spool, when it has one.
    pub spool: Option<SpoolHealth>,
}

/// A spool's state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpoolHealth {
    /// Records go through the spool now (Kafka is away or behind).
    pub in_use: bool,
    /// Bytes waiting in it.
    pub bytes: u64,
    /// It is full: publishers wait.
    pub full: bool,
    /// When the oldest record waiting in it was written (to within a segment), `None` when it
    /// is empty.
    pub oldest: Option<std::time::SystemTime>,
    /// Where it is.
    pub dir: std::path::PathBuf,
}

impl Default for BusHealth {
    /// Answers, no spool (the in-process bus).
    fn default() -> Self {
        BusHealth {
            answers: Ok(()),
            spool: None,
        }
    }
}

impl BusHealth {
    /// Whether a record published now is accepted without waiting for the cluster: it answers,
    /// or the spool takes the record.
    pub fn accepts_records(&self) -> bool {
        self.answers.is_ok() || self.spool.as_ref().is_some_and(|spool| !spool.full)
    }

    /// Whether consumers can read now: the bus answers.
    pub fn delivers_records(&self) -> bool {
        self.answers.is_ok()
    }
}

/// What carries records. Records reach a backend with their type erased ([`Envelope`]) and
/// leave it the same way ([`RawDelivery`]); [`Bus`] restores the types.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Publishes one record; see [`Bus::publish`].
    async fn publish(&self, record: Envelope) -> Result<(), BusError>;
    /// Joins a consumer group; see [`Bus::subscribe`].
    async fn subscribe(
        &self,
        stream: Stream,
        group: &str,
    ) -> Result<Box<dyn RawSubscription>, BusError>;
    /// Follows a stream from now on; see [`Bus::tail`]. In process, a group of its own.
    async fn tail(&self, stream: Stream, name: &str) -> Result<Box<dyn RawSubscription>, BusError> {
        self.subscribe(stream, name).await
    }
    /// See [`Bus::health`].
    async fn health(&self) -> BusHealth {
        BusHealth::default()
    }
    /// See [`Bus::close`].
    async fn close(&self);
}

/// Where a delivered record sits in its stream; handed back to [`Subscription::ack`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Receipt {
    /// Partition (always 0 in process).
    pub partition: i32,
    /// Position within the partition.
    pub offset: i64,
}

/// A record a backend delivered, its type erased.
#[derive(Debug)]
pub struct RawDelivery {
    /// The record.
    pub record: Arc<dyn AnyRecord>,
    /// Its position.
    pub receipt: Receipt,
}

/// A consumer's view of a stream, as a backend provides it.
#[async_trait]
pub trait RawSubscription: Send {
    /// The next record; `None` once the bus is closed and everything was delivered.
    async fn next(&mut self) -> Result<Option<RawDelivery>, BusError>;
    /// Acknowledges that these records are durably handled (Kafka: commits their offsets).
    async fn ack(&mut self, receipts: &[Receipt]) -> Result<(), BusError>;
}

/// A record delivered to a consumer.
#[derive(Debug)]
pub struct Delivery<T> {
    /// The record.
    pub record: T,
    /// Its position, to acknowledge once the record is durably handled.
    pub receipt: Receipt,
}

/// A consumer group member's view of the stream of `T`.
pub struct Subscription<T> {
    raw: Box<dyn RawSubscription>,
    record: PhantomData<fn() -> T>,
}

impl<T> std::fmt::Debug for Subscription<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Subscription(..)")
    }
}

impl<T: Record> Subscription<T> {
    fn new(raw: Box<dyn RawSubscription>) -> Subscription<T> {
        Subscription {
            raw,
            record: PhantomData,
        }
    }

    /// The next record; `None` once the bus is closed and everything was delivered.
    pub async fn next(&mut self) -> Result<Option<Delivery<T>>, BusError> {
        let Some(delivery) = self.raw.next().await? else {
            return Ok(None);
        };
        let record =
            delivery
                .record
                .into_any()
                .downcast::<T>()
                .map_err(|_| BusError::WrongType {
                    stream: T::STREAM,
                    expected: std::any::type_name::<T>(),
                })?;
        Ok(Some(Delivery {
            // In process the last group to take a record gets it without a copy.
            record: Arc::unwrap_or_clone(record),
            receipt: delivery.receipt,
        }))
    }

    /// Acknowledges that these records are durably handled (Kafka: commits their offsets).
    pub async fn ack(&mut self, receipts: &[Receipt]) -> Result<(), BusError> {
        self.raw.ack(receipts).await
    }
}

/// Errors of a bus.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BusError {
    /// The bus was closed (shutdown): nothing more is accepted.
    #[error("the bus is closed")]
    Closed,
    /// Nobody consumes the stream, so an in-process record would be lost.
    #[error("no consumer group subscribes to stream {0}; the record would be lost")]
    NoSubscribers(&'static str),
    /// A backend delivered a record of another type than the stream's (two record types claim
    /// one stream name).
    #[error("stream {stream} delivered a record that is not a {expected}")]
    WrongType {
        /// The stream.
        stream: &'static str,
        /// The type the subscriber expects.
        expected: &'static str,
    },
    /// A record could not be encoded.
    #[error("cannot encode a record of stream {stream}: {source}")]
    Encode {
        /// The stream.
        stream: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// Kafka refused or failed.
    #[cfg(feature = "kafka")]
    #[error("Kafka: {context}: {source}")]
    Kafka {
        /// What was being done.
        context: &'static str,
        /// librdkafka's error.
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The Kafka spool failed.
    #[cfg(feature = "kafka")]
    #[error("Kafka spool: {0}")]
    Spool(#[from] kafka::spool::SpoolError),
    /// The bus cannot carry records now, and why.
    #[error("{0}")]
    Unavailable(String),
    /// A background task of the bus failed.
    #[error("bus task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}
