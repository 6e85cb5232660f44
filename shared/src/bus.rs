//! The bus between ingest and the workers: publish records to a stream keyed by VIN, consume a
//! stream as a named group and acknowledge what was durably handled.
//!
//! [`InProcessBus`] is the embedded default. Kafka implements the same [`Bus`] trait, with
//! [`Receipt`] as partition and offset, so workers are written once.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::telemetry::{DeadLetter, TelemetryReading};

/// A named stream of records.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Accepted telemetry readings, keyed by VIN.
    Telemetry,
    /// Rejected messages with their reasons.
    DeadLetters,
}

impl Stream {
    /// The stream's name, as used in metric labels (and Kafka topic suffixes).
    pub fn name(self) -> &'static str {
        match self {
            Stream::Telemetry => "telemetry",
            Stream::DeadLetters => "dead_letters",
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
}

impl BusRecord {
    /// The stream this record belongs to.
    pub fn stream(&self) -> Stream {
        match self {
            BusRecord::Telemetry(_) => Stream::Telemetry,
            BusRecord::DeadLetter(_) => Stream::DeadLetters,
        }
    }

    /// The partitioning key: the VIN for telemetry, so each car's readings stay in order.
    pub fn key(&self) -> &str {
        match self {
            BusRecord::Telemetry(reading) => reading.vin.as_str(),
            BusRecord::DeadLetter(letter) => letter.key(),
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
    /// group gets every record.
    async fn subscribe(
        &self,
        stream: Stream,
        group: &str,
    ) -> Result<Box<dyn Subscription>, BusError>;

    /// Stops accepting records; subscriptions end once they have delivered what was accepted.
    fn close(&self);
}

/// A consumer group member's view of a stream.
#[async_trait]
pub trait Subscription: Send {
    /// The next record; `None` once the bus is closed and everything was delivered.
    async fn next(&mut self) -> Result<Option<Delivery>, BusError>;

    /// Acknowledges that these records are durably handled (for Kafka: commits their offsets).
    async fn ack(&mut self, receipts: &[Receipt]) -> Result<(), BusError>;
}

/// Queue of one consumer group in process.
type GroupQueue = Arc<tokio::sync::Mutex<mpsc::Receiver<(i64, BusRecord)>>>;

#[derive(Clone)]
struct GroupSender {
    group: String,
    sender: mpsc::Sender<(i64, BusRecord)>,
}

#[derive(Default)]
struct StreamState {
    senders: Arc<Vec<GroupSender>>,
    queues: HashMap<String, GroupQueue>,
}

/// The embedded bus: one bounded queue per (stream, consumer group), in memory.
///
/// Records are lost if the process dies before a worker has handled them; this is the embedded
/// trade-off. Kafka is the durable bus.
#[derive(Clone)]
pub struct InProcessBus {
    capacity: usize,
    streams: Arc<RwLock<HashMap<Stream, StreamState>>>,
    /// One counter for all streams: offsets grow within each stream, gaps are harmless.
    offsets: Arc<AtomicI64>,
}

impl InProcessBus {
    /// A bus whose queues hold at most `capacity` records each.
    pub fn new(capacity: usize) -> InProcessBus {
        InProcessBus {
            capacity: capacity.max(1),
            streams: Arc::default(),
            offsets: Arc::default(),
        }
    }

    async fn send_to(
        &self,
        stream: Stream,
        target: &GroupSender,
        item: (i64, BusRecord),
    ) -> Result<(), BusError> {
        match target.sender.try_send(item) {
            Ok(()) => {}
            Err(TrySendError::Full(item)) => {
                metrics::counter!(crate::metrics::BUS_BACKPRESSURE, "stream" => stream.name())
                    .increment(1);
                target
                    .sender
                    .send(item)
                    .await
                    .map_err(|_| BusError::Closed)?;
            }
            Err(TrySendError::Closed(_)) => return Err(BusError::Closed),
        }
        metrics::gauge!(crate::metrics::BUS_QUEUE_DEPTH, "stream" => stream.name(), "group" => target.group.clone())
            .set((self.capacity - target.sender.capacity()) as f64);
        Ok(())
    }
}

#[async_trait]
impl Bus for InProcessBus {
    async fn publish(&self, record: BusRecord) -> Result<(), BusError> {
        let stream = record.stream();
        let senders = {
            let streams = self.streams.read().unwrap_or_else(|p| p.into_inner());
            match streams.get(&stream) {
                Some(state) => Arc::clone(&state.senders),
                None => return Err(BusError::NoSubscribers(stream)),
            }
        };
        let Some((last, others)) = senders.split_last() else {
            return Err(BusError::Closed);
        };
        let offset = self.offsets.fetch_add(1, Ordering::Relaxed) + 1;
        for target in others {
            self.send_to(stream, target, (offset, record.clone()))
                .await?;
        }
        self.send_to(stream, last, (offset, record)).await
    }

    async fn subscribe(
        &self,
        stream: Stream,
        group: &str,
    ) -> Result<Box<dyn Subscription>, BusError> {
        let mut streams = self.streams.write().unwrap_or_else(|p| p.into_inner());
        let state = streams.entry(stream).or_default();
        let queue = match state.queues.get(group) {
            Some(queue) => Arc::clone(queue),
            None => {
                let (sender, receiver) = mpsc::channel(self.capacity);
                let queue: GroupQueue = Arc::new(tokio::sync::Mutex::new(receiver));
                let mut senders = state.senders.as_ref().clone();
                senders.push(GroupSender {
                    group: group.to_owned(),
                    sender,
                });
                state.senders = Arc::new(senders);
                state.queues.insert(group.to_owned(), Arc::clone(&queue));
                queue
            }
        };
        Ok(Box::new(InProcessSubscription { queue }))
    }

    fn close(&self) {
        let mut streams = self.streams.write().unwrap_or_else(|p| p.into_inner());
        for state in streams.values_mut() {
            state.senders = Arc::new(Vec::new());
        }
    }
}

struct InProcessSubscription {
    queue: GroupQueue,
}

#[async_trait]
impl Subscription for InProcessSubscription {
    async fn next(&mut self) -> Result<Option<Delivery>, BusError> {
        let mut queue = self.queue.lock().await;
        Ok(queue.recv().await.map(|(offset, record)| Delivery {
            record,
            receipt: Receipt {
                partition: 0,
                offset,
            },
        }))
    }

    async fn ack(&mut self, _receipts: &[Receipt]) -> Result<(), BusError> {
        // In process, a record handed out is gone from the queue: there is nothing to commit.
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::{TelemetryReading, Vin};
    use chrono::Utc;
    use std::time::Duration;
    use uuid::Uuid;

    fn reading(n: u32) -> BusRecord {
        let now = Utc::now();
        BusRecord::Telemetry(TelemetryReading {
            event_id: Uuid::now_v7(),
            received_at: now,
            vin: Vin::parse("1HGCM82633A004352").unwrap(),
            name: Some(format!("car {n}")),
            profile: None,
            range: None,
            mpge: None,
            battery: Some(f64::from(n % 100)),
            malfunction: None,
            speed: None,
            latitude: None,
            longitude: None,
            date: now,
        })
    }

    #[tokio::test]
    async fn each_group_gets_every_record_in_order_and_close_drains() {
        let bus = InProcessBus::new(16);
        let mut a = bus.subscribe(Stream::Telemetry, "a").await.unwrap();
        let mut b = bus.subscribe(Stream::Telemetry, "b").await.unwrap();
        for n in 0..10 {
            bus.publish(reading(n)).await.unwrap();
        }
        bus.close();
        assert!(matches!(
            bus.publish(reading(99)).await,
            Err(BusError::Closed)
        ));
        for sub in [&mut a, &mut b] {
            let mut offsets = Vec::new();
            while let Some(d) = sub.next().await.unwrap() {
                offsets.push(d.receipt.offset);
            }
            assert_eq!(offsets, (1..=10).collect::<Vec<_>>());
        }
    }

    #[tokio::test]
    async fn publishing_to_a_stream_nobody_consumes_is_an_error_not_a_silent_drop() {
        let bus = InProcessBus::new(4);
        assert!(matches!(
            bus.publish(reading(1)).await,
            Err(BusError::NoSubscribers(Stream::Telemetry))
        ));
    }

    #[tokio::test]
    async fn a_full_queue_makes_the_publisher_wait() {
        let bus = InProcessBus::new(2);
        let mut sub = bus.subscribe(Stream::Telemetry, "slow").await.unwrap();
        bus.publish(reading(1)).await.unwrap();
        bus.publish(reading(2)).await.unwrap();
        let blocked = {
            let bus = bus.clone();
            tokio::spawn(async move { bus.publish(reading(3)).await })
        };
        // The third publish cannot complete until the consumer takes a record.
        let early = tokio::time::timeout(Duration::from_millis(100), async {
            while !blocked.is_finished() {
                tokio::task::yield_now().await;
            }
        })
        .await;
        assert!(
            early.is_err(),
            "publish should wait while the queue is full"
        );
        sub.next().await.unwrap().unwrap();
        blocked.await.unwrap().unwrap();
    }
}
