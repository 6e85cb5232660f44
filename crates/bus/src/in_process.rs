//! The embedded bus: bounded queues in memory, whose publish returns once every consumer group
//! has acknowledged the record, that is once it is committed where the group keeps it.
//!
//! The queues are memory, so a record only survives a crash of the process (`kill -9`) once a
//! consumer has committed it to the database. A publish therefore waits for the
//! acknowledgements of every consumer group (in `ecars up`, the persistence worker's after its
//! commit; the anomaly worker reads what that commit stored); live tails (the relay) are not
//! waited for. A car's PUBACK follows the publish, so it means the reading is stored.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use async_trait::async_trait;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::{BUS_BACKPRESSURE, BUS_QUEUE_DEPTH};
use crate::{
    AnyRecord, Backend, BusError, Envelope, RawDelivery, RawSubscription, Receipt, Stream,
};

/// A queued record: its offset, the record (shared by every group's queue), and what its
/// publisher waits on (`None` for a tail).
type Queued = (i64, Arc<dyn AnyRecord>, Option<Arc<Acknowledgements>>);

/// The acknowledgements a published record still waits for.
#[derive(Debug)]
struct Acknowledgements {
    remaining: AtomicUsize,
    publisher: Mutex<Option<oneshot::Sender<()>>>,
}

impl Acknowledgements {
    /// One group acknowledged; the last one tells the publisher.
    fn acknowledge(&self) {
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            if let Some(publisher) = self
                .publisher
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .take()
            {
                let _ = publisher.send(());
            }
        }
    }
}

/// Queue of one consumer group in process.
type GroupQueue = Arc<tokio::sync::Mutex<mpsc::Receiver<Queued>>>;

#[derive(Clone)]
struct GroupSender {
    sender: mpsc::Sender<Queued>,
    /// A consumer group whose acknowledgement the publisher waits for; false for a live tail.
    durable: bool,
    /// The group's [`BUS_QUEUE_DEPTH`], looked up once: a lookup per record (its labels hashed,
    /// the group's name copied) was a visible part of a busy `ecars up`'s profile.
    depth: metrics::Gauge,
    /// The stream's [`BUS_BACKPRESSURE`].
    backpressure: metrics::Counter,
}

#[derive(Default)]
struct StreamState {
    senders: Arc<Vec<GroupSender>>,
    queues: HashMap<String, GroupQueue>,
}

/// The embedded bus: one bounded queue per (stream, consumer group), in memory; a publish
/// returns once every consumer group acknowledged the record (see the module's documentation).
#[derive(Clone)]
pub struct InProcessBus {
    capacity: usize,
    streams: Arc<RwLock<HashMap<Stream, StreamState>>>,
    /// One counter for all streams: offsets grow within each stream, gaps are harmless.
    offsets: Arc<AtomicI64>,
}

impl std::fmt::Debug for InProcessBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InProcessBus")
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
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

    async fn send_to(&self, target: &GroupSender, item: Queued) -> Result<(), BusError> {
        match target.sender.try_send(item) {
            Ok(()) => {}
            Err(TrySendError::Full(item)) => {
                target.backpressure.increment(1);
                target
                    .sender
                    .send(item)
                    .await
                    .map_err(|_| BusError::Closed)?;
            }
            Err(TrySendError::Closed(_)) => return Err(BusError::Closed),
        }
        target
            .depth
            .set((self.capacity - target.sender.capacity()) as f64);
        Ok(())
    }
}

#[async_trait]
impl Backend for InProcessBus {
    async fn publish(&self, envelope: Envelope) -> Result<(), BusError> {
        let stream = envelope.stream;
        let senders = {
            let streams = self.streams.read().unwrap_or_else(|p| p.into_inner());
            match streams.get(&stream) {
                Some(state) => Arc::clone(&state.senders),
                None => return Err(BusError::NoSubscribers(stream.name)),
            }
        };
        if senders.is_empty() {
            return Err(BusError::Closed);
        }
        let offset = self.offsets.fetch_add(1, Ordering::Relaxed) + 1;
        let groups = senders.iter().filter(|s| s.durable).count();
        let (acknowledgements, acknowledged) = if groups == 0 {
            (None, None)
        } else {
            let (tx, rx) = oneshot::channel();
            let acks = Arc::new(Acknowledgements {
                remaining: AtomicUsize::new(groups),
                publisher: Mutex::new(Some(tx)),
            });
            (Some(acks), Some(rx))
        };
        // Every group gets the same record: a reference, not a copy.
        for target in senders.iter() {
            let acks = if target.durable {
                acknowledgements.clone()
            } else {
                None
            };
            self.send_to(target, (offset, Arc::clone(&envelope.record), acks))
                .await?;
        }
        // The senders must not outlive the sending: a closed bus ends its subscriptions once
        // no sender is left, and the last batch is only flushed (and acknowledged) then.
        drop(senders);
        // Only the queued records hold the acknowledgements now: if every holder drops the
        // record unacknowledged, the publisher hears it.
        drop(acknowledgements);
        match acknowledged {
            // A group dropping the record unacknowledged (stopped before its commit) drops the
            // sender: the record is not known to be kept, and the publisher must not say it is.
            Some(acknowledged) => acknowledged.await.map_err(|_| BusError::Closed),
            None => Ok(()),
        }
    }

    async fn subscribe(
        &self,
        stream: Stream,
        group: &str,
    ) -> Result<Box<dyn RawSubscription>, BusError> {
        Ok(self.join(stream, group, true))
    }

    /// A tail is a group of its own whose acknowledgement no publisher waits for.
    async fn tail(&self, stream: Stream, name: &str) -> Result<Box<dyn RawSubscription>, BusError> {
        Ok(self.join(stream, name, false))
    }

    async fn close(&self) {
        let mut streams = self.streams.write().unwrap_or_else(|p| p.into_inner());
        for state in streams.values_mut() {
            state.senders = Arc::new(Vec::new());
        }
    }
}

impl InProcessBus {
    fn join(&self, stream: Stream, group: &str, durable: bool) -> Box<dyn RawSubscription> {
        let mut streams = self.streams.write().unwrap_or_else(|p| p.into_inner());
        let state = streams.entry(stream).or_default();
        let queue = match state.queues.get(group) {
            Some(queue) => Arc::clone(queue),
            None => {
                let (sender, receiver) = mpsc::channel(self.capacity);
                let queue: GroupQueue = Arc::new(tokio::sync::Mutex::new(receiver));
                let mut senders = state.senders.as_ref().clone();
                senders.push(GroupSender {
                    sender,
                    durable,
                    depth: metrics::gauge!(BUS_QUEUE_DEPTH, "stream" => stream.name, "group" => group.to_owned()),
                    backpressure: metrics::counter!(BUS_BACKPRESSURE, "stream" => stream.name),
                });
                state.senders = Arc::new(senders);
                state.queues.insert(group.to_owned(), Arc::clone(&queue));
                queue
            }
        };
        Box::new(InProcessSubscription {
            queue,
            unacknowledged: VecDeque::new(),
        })
    }
}

struct InProcessSubscription {
    queue: GroupQueue,
    /// Records handed out whose publishers wait for this group's acknowledgement, by offset.
    unacknowledged: VecDeque<(i64, Arc<Acknowledgements>)>,
}

#[async_trait]
impl RawSubscription for InProcessSubscription {
    async fn next(&mut self) -> Result<Option<RawDelivery>, BusError> {
        let mut queue = self.queue.lock().await;
        Ok(queue.recv().await.map(|(offset, record, acks)| {
            if let Some(acks) = acks {
                self.unacknowledged.push_back((offset, acks));
            }
            RawDelivery {
                record,
                receipt: Receipt {
                    partition: 0,
                    offset,
                },
            }
        }))
    }

    async fn ack(&mut self, receipts: &[Receipt]) -> Result<(), BusError> {
        // Consumers acknowledge in the order they received (a batch at a time), so the records
        // are found at the front.
        for receipt in receipts {
            if let Some(index) = self
                .unacknowledged
                .iter()
                .position(|(offset, _)| *offset == receipt.offset)
            {
                if let Some((_, acks)) = self.unacknowledged.remove(index) {
                    acks.acknowledge();
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use chrono::{DateTime, Utc};
    use ecars_model::Record;
    use serde::{Deserialize, Serialize};
    use uuid::Uuid;

    use crate::{Bus, BusError};

    /// A stream the product does not have: the bus carries it with no change of its own.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
    struct Ping {
        n: u32,
        at: DateTime<Utc>,
    }

    impl Record for Ping {
        const STREAM: &'static str = "pings";
        const TOPIC: &'static str = "pings";
        const EVENT_TYPE: &'static str = "com.example.ping.v1";
        const SOURCE: &'static str = "urn:example:test";
        const KEY: &'static str = "always `ping`";

        fn key(&self) -> &str {
            "ping"
        }

        fn id(&self) -> Uuid {
            Uuid::from_u128(u128::from(self.n))
        }

        fn time(&self) -> DateTime<Utc> {
            self.at
        }
    }

    /// Another new stream, to check that streams do not mix.
    #[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
    struct Pong {
        n: u32,
    }

    impl Record for Pong {
        const STREAM: &'static str = "pongs";
        const TOPIC: &'static str = "pongs";
        const EVENT_TYPE: &'static str = "com.example.pong.v1";
        const SOURCE: &'static str = "urn:example:test";
        const KEY: &'static str = "always `pong`";

        fn key(&self) -> &str {
            "pong"
        }

        fn id(&self) -> Uuid {
            Uuid::from_u128(u128::from(self.n))
        }

        fn time(&self) -> DateTime<Utc> {
            DateTime::UNIX_EPOCH
        }
    }

    fn ping(n: u32) -> Ping {
        Ping { n, at: Utc::now() }
    }

    /// Takes and acknowledges every record of `sub` until the bus closes; returns them.
    async fn consume<T: Record>(mut sub: crate::Subscription<T>) -> Vec<T> {
        let mut seen = Vec::new();
        while let Some(d) = sub.next().await.unwrap() {
            sub.ack(&[d.receipt]).await.unwrap();
            seen.push(d.record);
        }
        seen
    }

    #[tokio::test]
    async fn each_group_gets_every_record_of_its_type_in_order_and_close_drains() {
        let bus = Bus::in_process(16);
        let a = tokio::spawn(consume(bus.subscribe::<Ping>("a").await.unwrap()));
        let b = tokio::spawn(consume(bus.subscribe::<Ping>("b").await.unwrap()));
        let pongs = tokio::spawn(consume(bus.subscribe::<Pong>("a").await.unwrap()));
        for n in 0..10 {
            bus.publish(ping(n)).await.unwrap();
            bus.publish(Pong { n: 100 + n }).await.unwrap();
        }
        bus.close().await;
        assert!(matches!(bus.publish(ping(99)).await, Err(BusError::Closed)));
        for sub in [a, b] {
            let seen: Vec<u32> = sub.await.unwrap().iter().map(|p| p.n).collect();
            assert_eq!(seen, (0..10).collect::<Vec<_>>());
        }
        let seen: Vec<u32> = pongs.await.unwrap().iter().map(|p| p.n).collect();
        assert_eq!(seen, (100..110).collect::<Vec<_>>());
    }

    /// A publish returns once every consumer group acknowledged the record (after its commit),
    /// not when it was queued; a tail is not waited for.
    #[tokio::test]
    async fn a_publish_returns_once_every_group_acknowledged_and_tails_are_not_waited_for() {
        let bus = Bus::in_process(16);
        let mut persist = bus.subscribe::<Ping>("persist").await.unwrap();
        let mut anomaly = bus.subscribe::<Ping>("anomaly").await.unwrap();
        let _tail = bus.tail::<Ping>("relay").await.unwrap();
        let publishing = {
            let bus = bus.clone();
            tokio::spawn(async move { bus.publish(ping(1)).await })
        };
        let first = persist.next().await.unwrap().unwrap();
        let second = anomaly.next().await.unwrap().unwrap();
        persist.ack(&[first.receipt]).await.unwrap();
        tokio::task::yield_now().await;
        assert!(!publishing.is_finished(), "one group of two has it");
        anomaly.ack(&[second.receipt]).await.unwrap();
        tokio::time::timeout(Duration::from_secs(5), publishing)
            .await
            .expect("the publish returns")
            .unwrap()
            .unwrap();
    }

    /// A group that stops without acknowledging (it never committed the record) fails the
    /// publish: the publisher must not tell the car it was kept.
    #[tokio::test]
    async fn a_record_dropped_unacknowledged_fails_its_publish() {
        let bus = Bus::in_process(16);
        let mut persist = bus.subscribe::<Ping>("persist").await.unwrap();
        let publishing = {
            let bus = bus.clone();
            tokio::spawn(async move { bus.publish(ping(1)).await })
        };
        let _taken = persist.next().await.unwrap().unwrap();
        drop(persist);
        bus.close().await;
        // The queue still holds the group's receiver: closing the bus drops the record.
        let result = tokio::time::timeout(Duration::from_secs(5), publishing)
            .await
            .expect("the publish returns")
            .unwrap();
        assert!(matches!(result, Err(BusError::Closed)), "{result:?}");
    }

    #[tokio::test]
    async fn publishing_to_a_stream_nobody_consumes_is_an_error_not_a_silent_drop() {
        let bus = Bus::in_process(4);
        assert!(matches!(
            bus.publish(ping(1)).await,
            Err(BusError::NoSubscribers("pings"))
        ));
    }

    #[tokio::test]
    async fn a_full_queue_makes_the_publisher_wait() {
        let bus = Bus::in_process(2);
        // A tail: the publisher waits only for room in its queue.
        let mut sub = bus.tail::<Ping>("slow").await.unwrap();
        bus.publish(ping(1)).await.unwrap();
        bus.publish(ping(2)).await.unwrap();
        let blocked = {
            let bus = bus.clone();
            tokio::spawn(async move { bus.publish(ping(3)).await })
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
