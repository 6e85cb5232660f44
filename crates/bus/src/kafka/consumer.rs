//! Consumer group members and tails: records decoded by their stream, offsets committed only
//! when the worker acknowledges (after its database commit).

use std::collections::HashMap;

use async_trait::async_trait;
use rdkafka::client::ClientContext;
use rdkafka::consumer::{CommitMode, Consumer, ConsumerContext, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::statistics::{Partition, Statistics};
use rdkafka::{Offset, TopicPartitionList};

use crate::metrics::{
    BUS_COMMIT_FAILURES, BUS_CONSUME_ERRORS, BUS_UNDECODABLE, KAFKA_CONSUMER_LAG,
    KAFKA_CONSUMER_LAG_REPORTED,
};
use crate::{BusError, RawDelivery, RawSubscription, Receipt, Stream};

/// How often librdkafka reports a consumer's statistics (and so its lag), unless
/// `ECARS_KAFKA_STATISTICS_INTERVAL_MS` says otherwise.
pub(crate) const STATISTICS_INTERVAL_MS: &str = "10000";

/// A consumer's librdkafka context: it turns the statistics librdkafka reports every
/// [`STATISTICS_INTERVAL_MS`] into [`KAFKA_CONSUMER_LAG`] per partition, and the time of the
/// report into [`KAFKA_CONSUMER_LAG_REPORTED`].
pub(crate) struct LagReport {
    /// The group as operators know it (a tail's per-process suffix left out, so restarts do not
    /// add series).
    pub(crate) group: String,
    /// Whether the group commits offsets (a tail does not: its lag is to what it has read).
    pub(crate) commits: bool,
}

impl ClientContext for LagReport {
    fn stats(&self, statistics: Statistics) {
        for (topic, stats) in &statistics.topics {
            for partition in stats.partitions.values() {
                // librdkafka's internal "unassigned" partition (-1) is not a partition of the
                // topic.
                if partition.partition < 0 {
                    continue;
                }
                let lag = partition_lag(partition, self.commits).unwrap_or(0);
                metrics::gauge!(
                    KAFKA_CONSUMER_LAG,
                    "topic" => topic.clone(),
                    "partition" => partition.partition.to_string(),
                    "group" => self.group.clone(),
                )
                .set(lag as f64);
            }
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |since| since.as_secs_f64());
        metrics::gauge!(KAFKA_CONSUMER_LAG_REPORTED, "group" => self.group.clone()).set(now);
    }
}

impl ConsumerContext for LagReport {}

/// Records of `partition` this consumer has yet to process, or `None` when it does not consume
/// the partition (another member of the group does) or librdkafka does not know the offsets
/// yet.
fn partition_lag(partition: &Partition, commits: bool) -> Option<i64> {
    if !partition.desired || partition.fetch_state != "active" || partition.hi_offset < 0 {
        return None;
    }
    let done = if !commits {
        partition.app_offset
    } else if partition.committed_offset >= 0 {
        partition.committed_offset
    } else {
        // Nothing committed yet: a new group reads from the oldest record the broker keeps,
        // so all of them are still to do.
        partition.lo_offset.max(0)
    };
    (done >= 0).then(|| (partition.hi_offset - done).max(0))
}

/// A consumer of one topic.
pub(crate) struct KafkaSubscription {
    pub(crate) consumer: StreamConsumer<LagReport>,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn partition(committed: i64, app: i64) -> Partition {
        Partition {
            partition: 3,
            desired: true,
            fetch_state: "active".into(),
            lo_offset: 100,
            hi_offset: 1_000,
            committed_offset: committed,
            app_offset: app,
            ..Partition::default()
        }
    }

    #[test]
    fn lag_is_what_the_group_has_not_committed() {
        assert_eq!(partition_lag(&partition(900, 950), true), Some(100));
        // Read but not committed is still to do: a crash now delivers it again.
        assert_eq!(partition_lag(&partition(1_000, 1_000), true), Some(0));
        // A new group starts at the oldest record the broker keeps.
        assert_eq!(partition_lag(&partition(-1001, -1001), true), Some(900));
    }

    #[test]
    fn a_tail_lags_by_what_it_has_not_read() {
        assert_eq!(partition_lag(&partition(-1001, 990), false), Some(10));
        assert_eq!(partition_lag(&partition(-1001, -1001), false), None);
    }

    #[test]
    fn partitions_of_other_members_are_not_this_ones_lag() {
        let mut other = partition(10, 10);
        other.desired = false;
        assert_eq!(partition_lag(&other, true), None);
        let mut starting = partition(10, 10);
        starting.fetch_state = "offset-query".into();
        assert_eq!(partition_lag(&starting, true), None);
        let mut unknown = partition(10, 10);
        unknown.hi_offset = -1;
        assert_eq!(partition_lag(&unknown, true), None);
    }
}
