//! The embedded bus: bounded queues in memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use crate::metrics::{BUS_BACKPRESSURE, BUS_QUEUE_DEPTH};
use crate::{
    AnyRecord, Backend, BusError, Envelope, RawDelivery, RawSubscription, Receipt, Stream,
};

/// A queued record: its offset and the record, shared by every group's queue.
type Queued = (i64, Arc<dyn AnyRecord>);

/// Queue of one consumer group in process.
type GroupQueue = Arc<tokio::sync::Mutex<mpsc::Receiver<Queued>>>;

#[derive(Clone)]
struct GroupSender {
    group: String,
    sender: mpsc::Sender<Queued>,
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

    async fn send_to(
        &self,
        stream: Stream,
        target: &GroupSender,
        item: Queued,
    ) -> Result<(), BusError> {
        match target.sender.try_send(item) {
            Ok(()) => {}
            Err(TrySendError::Full(item)) => {
                metrics::counter!(BUS_BACKPRESSURE, "stream" => stream.name).increment(1);
                target
                    .sender
                    .send(item)
                    .await
                    .map_err(|_| BusError::Closed)?;
            }
            Err(TrySendError::Closed(_)) => return Err(BusError::Closed),
        }
        metrics::gauge!(BUS_QUEUE_DEPTH, "stream" => stream.name, "group" => target.group.clone())
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
        // Every group gets the same record: a reference, not a copy.
        for target in senders.iter() {
            self.send_to(stream, target, (offset, Arc::clone(&envelope.record)))
                .await?;
        }
        Ok(())
    }

    async fn subscribe(
        &self,
        stream: Stream,
        group: &str,
    ) -> Result<Box<dyn RawSubscription>, BusError> {
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

    async fn close(&self) {
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
impl RawSubscription for InProcessSubscription {
    async fn next(&mut self) -> Result<Option<RawDelivery>, BusError> {
        let mut queue = self.queue.lock().await;
        Ok(queue.recv().await.map(|(offset, record)| RawDelivery {
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

    #[tokio::test]
    async fn each_group_gets_every_record_of_its_type_in_order_and_close_drains() {
        let bus = Bus::in_process(16);
        let mut a = bus.subscribe::<Ping>("a").await.unwrap();
        let mut b = bus.subscribe::<Ping>("b").await.unwrap();
        let mut pongs = bus.subscribe::<Pong>("a").await.unwrap();
        for n in 0..10 {
            bus.publish(ping(n)).await.unwrap();
            bus.publish(Pong { n: 100 + n }).await.unwrap();
        }
        bus.close().await;
        assert!(matches!(bus.publish(ping(99)).await, Err(BusError::Closed)));
        for sub in [&mut a, &mut b] {
            let mut seen = Vec::new();
            while let Some(d) = sub.next().await.unwrap() {
                seen.push(d.record.n);
            }
            assert_eq!(seen, (0..10).collect::<Vec<_>>());
        }
        let mut seen = Vec::new();
        while let Some(d) = pongs.next().await.unwrap() {
            seen.push(d.record.n);
        }
        assert_eq!(seen, (100..110).collect::<Vec<_>>());
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
        let mut sub = bus.subscribe::<Ping>("slow").await.unwrap();
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
