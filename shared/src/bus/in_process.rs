//! The embedded bus: bounded queues in memory.

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

use super::{Bus, BusError, BusRecord, Delivery, Receipt, Stream, Subscription};

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
    use crate::bus::{Bus, BusError, BusRecord, Stream};
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
        bus.close().await;
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
