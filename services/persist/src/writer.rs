//! The batch writer: takes records from a bus subscription, commits them in batches, and only
//! then acknowledges them.

use std::future::Future;
use std::time::Duration;

use ecars_shared::bus::{BusError, BusRecord, Receipt, Subscription};
use ecars_shared::metrics as m;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::store::StoreError;

/// When a batch is flushed.
#[derive(Clone, Copy, Debug)]
pub struct BatchPolicy {
    /// Flush once this many rows are waiting.
    pub max_rows: usize,
    /// Flush once the oldest waiting row has waited this long.
    pub max_delay: Duration,
}

/// How long to wait between retries of a failed write.
#[derive(Clone, Copy, Debug)]
pub struct RetryPolicy {
    /// First wait.
    pub initial: Duration,
    /// Longest wait.
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(5),
        }
    }
}

/// Errors that stop a writer.
#[derive(Debug, thiserror::Error)]
pub enum WriterError {
    /// The bus failed.
    #[error("bus: {0}")]
    Bus(#[from] BusError),
}

/// Something that commits a batch of records of one kind.
pub trait BatchSink: Send {
    /// The record type (a reading or a dead letter).
    type Item: Send;
    /// The table written, for logs and metric labels.
    fn table(&self) -> &'static str;
    /// Picks this sink's records off the bus; others are acknowledged and skipped.
    fn select(&self, record: BusRecord) -> Option<Self::Item>;
    /// Commits the batch, returning rows added (duplicates add none).
    fn write(&self, batch: &[Self::Item]) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// Runs a writer until the subscription ends (bus closed) or `shutdown` fires; flushes what was
/// received before returning, so an accepted record is never dropped on shutdown.
pub async fn run_writer<S: BatchSink>(
    sink: S,
    mut subscription: Box<dyn Subscription>,
    policy: BatchPolicy,
    retry: RetryPolicy,
    shutdown: CancellationToken,
) -> Result<(), WriterError> {
    let table = sink.table();
    let mut batch: Vec<S::Item> = Vec::with_capacity(policy.max_rows);
    let mut receipts: Vec<Receipt> = Vec::with_capacity(policy.max_rows);
    let mut deadline: Option<Instant> = None;
    loop {
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled() => None,
            _ = sleep_until(deadline) => Some(None),
            delivery = subscription.next() => delivery?.map(Some),
        };
        match next {
            // Stream ended or shutdown: flush and stop.
            None => {
                flush(
                    &sink,
                    &mut batch,
                    &mut receipts,
                    subscription.as_mut(),
                    retry,
                )
                .await?;
                tracing::info!(table, "writer stopped after flushing");
                return Ok(());
            }
            // The oldest row waited long enough.
            Some(None) => {
                flush(
                    &sink,
                    &mut batch,
                    &mut receipts,
                    subscription.as_mut(),
                    retry,
                )
                .await?;
                deadline = None;
            }
            Some(Some(delivery)) => {
                receipts.push(delivery.receipt);
                if let Some(item) = sink.select(delivery.record) {
                    batch.push(item);
                    deadline.get_or_insert_with(|| Instant::now() + policy.max_delay);
                }
                if batch.len() >= policy.max_rows {
                    flush(
                        &sink,
                        &mut batch,
                        &mut receipts,
                        subscription.as_mut(),
                        retry,
                    )
                    .await?;
                    deadline = None;
                }
            }
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Commits the batch, retrying with backoff while the database is unavailable (holding back the
/// subscription, which is the backpressure), then acknowledges.
async fn flush<S: BatchSink>(
    sink: &S,
    batch: &mut Vec<S::Item>,
    receipts: &mut Vec<Receipt>,
    subscription: &mut dyn Subscription,
    retry: RetryPolicy,
) -> Result<(), WriterError> {
    let table = sink.table();
    if !batch.is_empty() {
        let mut wait = retry.initial;
        let mut attempt = 0u32;
        loop {
            let started = Instant::now();
            match sink.write(batch).await {
                Ok(added) => {
                    let elapsed = started.elapsed();
                    metrics::gauge!(m::DATABASE_UP).set(1.0);
                    metrics::counter!(m::ROWS_WRITTEN, "table" => table).increment(added);
                    metrics::histogram!(m::BATCH_SIZE, "table" => table).record(batch.len() as f64);
                    metrics::histogram!(m::BATCH_LATENCY, "table" => table)
                        .record(elapsed.as_secs_f64());
                    if attempt > 0 {
                        tracing::info!(
                            table,
                            rows = batch.len(),
                            attempts = attempt + 1,
                            "database is back; batch committed"
                        );
                    }
                    tracing::debug!(
                        table,
                        rows = batch.len(),
                        added,
                        ?elapsed,
                        "batch committed"
                    );
                    break;
                }
                Err(error) => {
                    attempt += 1;
                    metrics::gauge!(m::DATABASE_UP).set(0.0);
                    metrics::counter!(m::BATCH_RETRIES, "table" => table).increment(1);
                    let kind = if error.is_transient() {
                        "database unavailable"
                    } else {
                        "batch refused"
                    };
                    tracing::warn!(
                        table,
                        rows = batch.len(),
                        attempt,
                        retry_in_ms = wait.as_millis() as u64,
                        %error,
                        "{kind}: holding the batch and intake back, waiting for the database to accept the write"
                    );
                    // Shutdown is no reason to drop accepted rows: keep trying until the database
                    // returns (an operator can still kill the process).
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(retry.max);
                }
            }
        }
        batch.clear();
    }
    if !receipts.is_empty() {
        subscription.ack(receipts).await?;
        receipts.clear();
    }
    Ok(())
}

/// A sink with its subscription and policy, ready for [`run_writer`].
pub struct Subscribed<S: BatchSink> {
    /// Where rows go.
    pub sink: S,
    /// Where records come from.
    pub subscription: Box<dyn Subscription>,
    /// When to flush.
    pub policy: BatchPolicy,
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use ecars_shared::bus::{Bus, InProcessBus, Stream};
    use ecars_shared::telemetry::{TelemetryReading, Vin};
    use std::sync::{Arc, Mutex};

    /// Records batch sizes; fails the first `failures` writes as a database outage would.
    struct RecordingSink {
        batches: Arc<Mutex<Vec<usize>>>,
        failures: Arc<Mutex<u32>>,
    }

    impl BatchSink for RecordingSink {
        type Item = TelemetryReading;
        fn table(&self) -> &'static str {
            "test"
        }
        fn select(&self, record: BusRecord) -> Option<TelemetryReading> {
            match record {
                BusRecord::Telemetry(r) => Some(r),
                BusRecord::DeadLetter(_) | BusRecord::Anomaly(_) | BusRecord::Case(_) => None,
            }
        }
        fn write(
            &self,
            batch: &[TelemetryReading],
        ) -> impl Future<Output = Result<u64, StoreError>> + Send {
            let result = {
                let mut failures = self.failures.lock().unwrap();
                if *failures > 0 {
                    *failures -= 1;
                    Err(StoreError::Database(sqlx::Error::PoolTimedOut))
                } else {
                    self.batches.lock().unwrap().push(batch.len());
                    Ok(batch.len() as u64)
                }
            };
            async move { result }
        }
    }

    fn reading() -> BusRecord {
        let now = Utc::now();
        BusRecord::Telemetry(TelemetryReading {
            event_id: uuid::Uuid::now_v7(),
            received_at: now,
            vin: Vin::parse("1HGCM82633A004352").unwrap(),
            name: None,
            profile: None,
            range: None,
            mpge: None,
            battery: Some(50.0),
            malfunction: None,
            speed: None,
            latitude: None,
            longitude: None,
            date: now,
        })
    }

    async fn start(
        policy: BatchPolicy,
        failures: u32,
    ) -> (
        InProcessBus,
        Arc<Mutex<Vec<usize>>>,
        tokio::task::JoinHandle<Result<(), WriterError>>,
    ) {
        let bus = InProcessBus::new(10_000);
        let subscription = bus.subscribe(Stream::Telemetry, "test").await.unwrap();
        let batches = Arc::new(Mutex::new(Vec::new()));
        let sink = RecordingSink {
            batches: Arc::clone(&batches),
            failures: Arc::new(Mutex::new(failures)),
        };
        let retry = RetryPolicy {
            initial: Duration::from_millis(1),
            max: Duration::from_millis(5),
        };
        let task = tokio::spawn(run_writer(
            sink,
            subscription,
            policy,
            retry,
            CancellationToken::new(),
        ));
        (bus, batches, task)
    }

    #[tokio::test]
    async fn flushes_at_the_row_limit_and_at_close() {
        let policy = BatchPolicy {
            max_rows: 1000,
            max_delay: Duration::from_secs(3600),
        };
        let (bus, batches, task) = start(policy, 0).await;
        for _ in 0..2500 {
            bus.publish(reading()).await.unwrap();
        }
        bus.close().await;
        task.await.unwrap().unwrap();
        assert_eq!(*batches.lock().unwrap(), vec![1000, 1000, 500]);
    }

    #[tokio::test]
    async fn flushes_a_small_batch_once_it_waited_long_enough() {
        let policy = BatchPolicy {
            max_rows: 1000,
            max_delay: Duration::from_millis(30),
        };
        let (bus, batches, task) = start(policy, 0).await;
        for _ in 0..3 {
            bus.publish(reading()).await.unwrap();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while batches.lock().unwrap().is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            *batches.lock().unwrap(),
            vec![3],
            "a timed flush, before any close"
        );
        bus.close().await;
        task.await.unwrap().unwrap();
    }

    #[tokio::test]
    async fn retries_a_failed_batch_without_losing_or_splitting_it() {
        let policy = BatchPolicy {
            max_rows: 10,
            max_delay: Duration::from_secs(3600),
        };
        let (bus, batches, task) = start(policy, 3).await;
        for _ in 0..25 {
            bus.publish(reading()).await.unwrap();
        }
        bus.close().await;
        task.await.unwrap().unwrap();
        assert_eq!(*batches.lock().unwrap(), vec![10, 10, 5]);
    }
}
