//! Consumer group members and tails: records decoded by their stream, offsets committed only
//! when the worker acknowledges (after its database commit).

use std::collections::HashMap;

use async_trait::async_trait;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::metrics::{BUS_COMMIT_FAILURES, BUS_CONSUME_ERRORS, BUS_UNDECODABLE};
use crate::{BusError, RawDelivery, RawSubscription, Receipt, Stream};

/// A consumer of one topic.
pub(crate) struct KafkaSubscription {
    pub(crate) consumer: StreamConsumer,
    pub(crate) stream: Stream,
    pub(crate) topic: String,
}

#[async_trait]
impl RawSubscription for KafkaSubscription {
    async fn next(&mut self) -> Result<Option<RawDelivery>, BusError> {
        let mut failures = 0u32;
        loop {
            let message = match self.consumer.recv().await {
                Ok(message) => message,
                // Broker restarts, coordinator moves, rebalances: librdkafka recovers by itself.
                // These are events it queued, not failures of this call: read on at once. (A
                // pause per event left a rejoin waiting behind minutes of queued outage errors.)
                Err(error) => {
                    failures += 1;
                    metrics::counter!(BUS_CONSUME_ERRORS, "stream" => self.stream.name)
                        .increment(1);
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
            match message.payload().map(|value| self.stream.decode(value)) {
                Some(Ok(record)) => return Ok(Some(RawDelivery { record, receipt })),
                // A record that is not ours (another producer wrote garbage): count it, skip it;
                // its offset is committed with the next acknowledged one.
                other => {
                    metrics::counter!(BUS_UNDECODABLE, "stream" => self.stream.name).increment(1);
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
            offsets
                .add_partition_offset(&self.topic, partition, Offset::Offset(offset))
                .map_err(|source| BusError::Kafka {
                    context: "invalid offset to commit",
                    source,
                })?;
        }
        // Asynchronous: a synchronous commit blocks while a rebalance waits for this consumer to
        // be polled, which is a deadlock. librdkafka sends it in order and waits for outstanding
        // commits when the consumer closes.
        tracing::debug!(topic = self.topic, ?offsets, "committing");
        if let Err(error) = self.consumer.commit(&offsets, CommitMode::Async) {
            // A rebalance took the partition away, or the coordinator is briefly gone. Nothing is
            // lost: the records are delivered again (to this or another replica) and the
            // database's unique event ids make the repeat harmless.
            metrics::counter!(BUS_COMMIT_FAILURES, "stream" => self.stream.name).increment(1);
            tracing::warn!(topic = self.topic, %error, "offset commit failed; the records will be delivered again");
        }
        Ok(())
    }
}

// No explicit unsubscribe on drop: dropping the consumer closes it, and librdkafka's close
// waits for the asynchronous commits in flight before it leaves the group. Leaving first would
// let another replica start from an older offset, or (with no commit yet) from the reset policy.
