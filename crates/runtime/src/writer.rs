//! The batch writer: takes records from a bus subscription, commits them in batches, and only
//! then acknowledges them.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use ecars_bus::{BusError, Receipt, Record, Subscription};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics as m;

/// When a batch is flushed.
#[derive(Clone, Copy, Debug)]
pub struct BatchPolicy {
    /// Flush once this many rows are waiting.
    pub flush_rows: usize,
    /// Flush once the oldest waiting row has waited this long.
    pub max_delay: Duration,
    /// The most rows one batch holds (at least `flush_rows`). While the commit before it runs,
    /// a batch keeps filling past `flush_rows`: a database that falls behind the intake gets
    /// fewer, larger batches, which cost it less per row (SQLite rewrites each car's index
    /// page once per commit, however many of its rows the commit adds), rather than a queue
    /// of full small ones.
    pub max_rows: usize,
}

impl BatchPolicy {
    /// The most rows one batch holds.
    fn cap(&self) -> usize {
        self.max_rows.max(self.flush_rows).max(1)
    }
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

/// Something that commits a batch of records of one stream.
pub trait BatchSink: Send + Sync {
    /// The record type (a reading or a dead letter).
    type Item: Record;
    /// Why a write failed.
    type Error: std::error::Error + Send;
    /// The table written, for logs and metric labels.
    fn table(&self) -> &'static str;
    /// Commits the batch, returning rows added (duplicates add none).
    fn write(&self, batch: &[Self::Item]) -> impl Future<Output = Result<u64, Self::Error>> + Send;
    /// Called with each batch once it is committed, before its records are acknowledged (a
    /// hand-off to the next stage; waiting here holds the writer back).
    fn committed(&self, _batch: Vec<Self::Item>) -> impl Future<Output = ()> + Send {
        async {}
    }
    /// What kind of failure `error` is. The batch is retried whatever the answer, since dropping
    /// it would lose accepted readings; the answer decides what the retry reports.
    fn failure(&self, _error: &Self::Error) -> WriteFailure {
        WriteFailure::Unavailable
    }
}

/// Why a batch write failed, as far as what the writer reports about it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WriteFailure {
    /// The database cannot be reached, is out of resources or is shutting down.
    Unavailable,
    /// The write lost a race with another transaction (a deadlock, a serialization failure, a
    /// locked SQLite file): the database is up, and the retry succeeds once the other
    /// transaction is done.
    Conflict,
    /// The database refused this batch (a constraint, a value).
    Refused,
}

impl WriteFailure {
    /// From what the database layer says of an error.
    pub fn classify(conflict: bool, transient: bool) -> WriteFailure {
        match (conflict, transient) {
            (true, _) => WriteFailure::Conflict,
            (false, true) => WriteFailure::Unavailable,
            (false, false) => WriteFailure::Refused,
        }
    }

    /// The `reason` label of [`m::BATCH_RETRIES`].
    fn label(self) -> &'static str {
        match self {
            WriteFailure::Unavailable => "unavailable",
            WriteFailure::Conflict => "conflict",
            WriteFailure::Refused => "refused",
        }
    }

    /// Whether the `attempt`th failure in a row of one batch means the database is down for
    /// [`m::DATABASE_UP`] (and the alert on it). A conflict retried at once is no outage; one
    /// that keeps coming back after [`CONFLICTS_BEFORE_DOWN`] tries is reported as one.
    fn database_down(self, attempt: u32) -> bool {
        self != WriteFailure::Conflict || attempt > CONFLICTS_BEFORE_DOWN
    }
}

/// Conflicts in a row on one batch that are retried without calling the database down.
const CONFLICTS_BEFORE_DOWN: u32 = 5;

/// Runs a writer until the subscription ends (bus closed) or `shutdown` fires; flushes what was
/// received before returning, so an accepted record is never dropped on shutdown.
///
/// One batch commits while the next one fills: the database works on its own thread (SQLite) or
/// server (PostgreSQL), and taking records from the bus overlaps that wait instead of following
/// it. One commit at a time, acknowledged in order, so the bus sees its records acknowledged in
/// the order it handed them out.
pub async fn run_writer<S: BatchSink>(
    sink: S,
    mut subscription: Subscription<S::Item>,
    policy: BatchPolicy,
    retry: RetryPolicy,
    shutdown: CancellationToken,
) -> Result<(), WriterError> {
    let table = sink.table();
    let mut batch: Vec<S::Item> = Vec::with_capacity(policy.flush_rows);
    let mut receipts: Vec<Receipt> = Vec::with_capacity(policy.flush_rows);
    let mut deadline: Option<Instant> = None;
    // The batch being committed, and the receipts to acknowledge once it is.
    let mut committing: Option<Commit<'_>> = None;
    let mut committing_receipts: Vec<Receipt> = Vec::with_capacity(policy.flush_rows);
    let cap = policy.cap();
    loop {
        let due = !batch.is_empty()
            && (batch.len() >= policy.flush_rows || deadline.is_some_and(|d| Instant::now() >= d));
        if due && committing.is_none() {
            let full = std::mem::replace(&mut batch, Vec::with_capacity(policy.flush_rows));
            std::mem::swap(&mut receipts, &mut committing_receipts);
            committing = Some(Box::pin(commit(&sink, full, retry)));
            deadline = None;
        }
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled() => None,
            // The commit in flight finished: acknowledge its records.
            () = async { committing.as_mut().expect("guarded by the condition").await },
                if committing.is_some() => {
                committing = None;
                acknowledge(&mut subscription, &mut committing_receipts).await?;
                continue;
            }
            // Only worth waking for while nothing commits: a commit's end checks it too.
            _ = sleep_until(deadline), if committing.is_none() => continue,
            // A batch at its cap waits for the commit before it (backpressure onto the bus).
            delivery = subscription.next(), if batch.len() < cap => delivery?,
        };
        match next {
            // Stream ended or shutdown: finish the commit in flight, flush the rest and stop.
            None => {
                if let Some(in_flight) = committing.take() {
                    in_flight.await;
                    acknowledge(&mut subscription, &mut committing_receipts).await?;
                }
                commit(&sink, batch, retry).await;
                acknowledge(&mut subscription, &mut receipts).await?;
                tracing::info!(table, "writer stopped after flushing");
                return Ok(());
            }
            Some(delivery) => {
                receipts.push(delivery.receipt);
                batch.push(delivery.record);
                deadline.get_or_insert_with(|| Instant::now() + policy.max_delay);
            }
        }
    }
}

/// A batch's commit in flight (it owns the batch).
type Commit<'a> = Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

/// Sleeps until `deadline`; forever without one (a `select!` branch that never fires).
pub async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Acknowledges committed records on the bus.
async fn acknowledge<T: Record>(
    subscription: &mut Subscription<T>,
    receipts: &mut Vec<Receipt>,
) -> Result<(), WriterError> {
    if !receipts.is_empty() {
        subscription.ack(receipts).await?;
        receipts.clear();
    }
    Ok(())
}

/// Commits the batch, retrying with backoff while the database is unavailable (holding back the
/// subscription, which is the backpressure), then hands it to [`BatchSink::committed`].
async fn commit<S: BatchSink>(sink: &S, batch: Vec<S::Item>, retry: RetryPolicy) {
    let table = sink.table();
    if batch.is_empty() {
        return;
    }
    let mut wait = retry.initial;
    let mut attempt = 0u32;
    loop {
        let started = Instant::now();
        match sink.write(&batch).await {
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
                sink.committed(batch).await;
                return;
            }
            Err(error) => {
                attempt += 1;
                let failure = sink.failure(&error);
                metrics::counter!(m::BATCH_RETRIES, "table" => table, "reason" => failure.label())
                    .increment(1);
                if !failure.database_down(attempt) {
                    tracing::info!(
                        table,
                        rows = batch.len(),
                        attempt,
                        %error,
                        "write conflict with another transaction; retrying the batch"
                    );
                } else {
                    metrics::gauge!(m::DATABASE_UP).set(0.0);
                    let kind = match failure {
                        WriteFailure::Unavailable => "database unavailable",
                        WriteFailure::Conflict => "write conflicts persist",
                        WriteFailure::Refused => "batch refused",
                    };
                    tracing::warn!(
                        table,
                        rows = batch.len(),
                        attempt,
                        retry_in_ms = wait.as_millis() as u64,
                        %error,
                        "{kind}: holding the batch and intake back, waiting for the database to accept the write"
                    );
                }
                // Shutdown is no reason to drop accepted rows: keep trying until the database
                // returns (an operator can still kill the process).
                tokio::time::sleep(wait).await;
                wait = (wait * 2).min(retry.max);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use ecars_bus::Bus;
    use ecars_model::{TelemetryReading, Vin};
    use std::sync::{Arc, Mutex};

    /// The database refused (as an outage would).
    #[derive(Debug, thiserror::Error)]
    #[error("database unavailable")]
    struct Unavailable;

    /// Records batch sizes; fails the first `failures` writes as a database outage would.
    struct RecordingSink {
        batches: Arc<Mutex<Vec<usize>>>,
        failures: Arc<Mutex<u32>>,
        committed: Arc<tokio::sync::Notify>,
    }

    impl BatchSink for RecordingSink {
        type Item = TelemetryReading;
        type Error = Unavailable;
        fn table(&self) -> &'static str {
            "test"
        }
        fn write(
            &self,
            batch: &[TelemetryReading],
        ) -> impl Future<Output = Result<u64, Unavailable>> + Send {
            let result = {
                let mut failures = self.failures.lock().unwrap();
                if *failures > 0 {
                    *failures -= 1;
                    Err(Unavailable)
                } else {
                    self.batches.lock().unwrap().push(batch.len());
                    self.committed.notify_one();
                    Ok(batch.len() as u64)
                }
            };
            async move { result }
        }
    }

    fn reading() -> TelemetryReading {
        let now = Utc::now();
        TelemetryReading {
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
        }
    }

    /// Starts `n` publishes; returns once every one of them is queued.
    async fn publish_all(
        bus: &Bus,
        n: usize,
    ) -> Vec<tokio::task::JoinHandle<Result<(), BusError>>> {
        let mut publishes = Vec::new();
        for _ in 0..n {
            let (bus, reading) = (bus.clone(), reading());
            publishes.push(tokio::spawn(async move { bus.publish(reading).await }));
        }
        // Each task queues its record at its first poll; let them all run that far.
        for _ in 0..n {
            tokio::task::yield_now().await;
        }
        publishes
    }

    async fn start(
        policy: BatchPolicy,
        failures: u32,
    ) -> (
        Bus,
        Arc<Mutex<Vec<usize>>>,
        Arc<tokio::sync::Notify>,
        tokio::task::JoinHandle<Result<(), WriterError>>,
    ) {
        let bus = Bus::in_process(10_000);
        let subscription = bus.subscribe::<TelemetryReading>("test").await.unwrap();
        let batches = Arc::new(Mutex::new(Vec::new()));
        let committed = Arc::new(tokio::sync::Notify::new());
        let sink = RecordingSink {
            batches: Arc::clone(&batches),
            failures: Arc::new(Mutex::new(failures)),
            committed: Arc::clone(&committed),
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
        (bus, batches, committed, task)
    }

    #[test]
    fn a_conflict_retried_at_once_is_no_outage_but_one_that_persists_is() {
        use WriteFailure::{Conflict, Refused, Unavailable};
        assert_eq!(WriteFailure::classify(true, true), Conflict);
        assert_eq!(WriteFailure::classify(false, true), Unavailable);
        assert_eq!(WriteFailure::classify(false, false), Refused);
        assert!((1..=CONFLICTS_BEFORE_DOWN).all(|attempt| !Conflict.database_down(attempt)));
        assert!(Conflict.database_down(CONFLICTS_BEFORE_DOWN + 1));
        assert!(Unavailable.database_down(1) && Refused.database_down(1));
    }

    #[tokio::test]
    async fn flushes_at_the_row_limit_and_at_close() {
        let policy = BatchPolicy {
            flush_rows: 1000,
            max_delay: Duration::from_secs(3600),
            max_rows: 1000,
        };
        let (bus, batches, _, task) = start(policy, 0).await;
        // A publish returns once the writer acknowledged it: publish them all at once.
        let publishes = publish_all(&bus, 2500).await;
        bus.close().await;
        task.await.unwrap().unwrap();
        assert_eq!(*batches.lock().unwrap(), vec![1000, 1000, 500]);
        for publish in publishes {
            publish.await.unwrap().unwrap();
        }
    }

    #[tokio::test]
    async fn flushes_a_small_batch_once_it_waited_long_enough() {
        let policy = BatchPolicy {
            flush_rows: 1000,
            max_delay: Duration::from_millis(30),
            max_rows: 1000,
        };
        let (bus, batches, committed, task) = start(policy, 0).await;
        let publishes = publish_all(&bus, 3).await;
        tokio::time::timeout(Duration::from_secs(5), committed.notified())
            .await
            .expect("a commit within 5 s");
        assert_eq!(
            *batches.lock().unwrap(),
            vec![3],
            "a timed flush, before any close"
        );
        for publish in publishes {
            publish.await.unwrap().unwrap();
        }
        bus.close().await;
        task.await.unwrap().unwrap();
    }

    /// Takes 100 ms per commit and notes when each began and how many rows it had.
    struct SlowSink {
        commits: Arc<Mutex<Vec<(Instant, usize)>>>,
    }

    impl BatchSink for SlowSink {
        type Item = TelemetryReading;
        type Error = Unavailable;
        fn table(&self) -> &'static str {
            "test"
        }
        fn write(
            &self,
            batch: &[TelemetryReading],
        ) -> impl Future<Output = Result<u64, Unavailable>> + Send {
            let rows = batch.len();
            self.commits.lock().unwrap().push((Instant::now(), rows));
            async move {
                tokio::time::sleep(Duration::from_millis(100)).await;
                Ok(rows as u64)
            }
        }
    }

    /// Publishes `records` at once to a writer with `policy` on a [`SlowSink`]; returns when each
    /// commit began (milliseconds after the publishing) and its rows.
    async fn slow_commits(policy: BatchPolicy, records: usize) -> Vec<(u128, usize)> {
        let bus = Bus::in_process(10_000);
        let subscription = bus.subscribe::<TelemetryReading>("test").await.unwrap();
        let commits = Arc::new(Mutex::new(Vec::new()));
        let sink = SlowSink {
            commits: Arc::clone(&commits),
        };
        let task = tokio::spawn(run_writer(
            sink,
            subscription,
            policy,
            RetryPolicy::default(),
            CancellationToken::new(),
        ));
        let started = Instant::now();
        let publishes = publish_all(&bus, records).await;
        for publish in publishes {
            publish.await.unwrap().unwrap();
        }
        bus.close().await;
        task.await.unwrap().unwrap();
        let commits = commits.lock().unwrap().clone();
        commits
            .iter()
            .map(|(at, rows)| ((*at - started).as_millis(), *rows))
            .collect()
    }

    #[tokio::test(start_paused = true)]
    async fn the_next_batch_fills_while_the_one_before_commits() {
        let policy = BatchPolicy {
            flush_rows: 1000,
            max_delay: Duration::from_millis(30),
            max_rows: 1000,
        };
        // The 5 after the full batch were taken during its commit and waited out their 30 ms
        // there: their commit follows the first one at once (taking them only afterwards would
        // start it at 130 ms).
        assert_eq!(slow_commits(policy, 1005).await, vec![(0, 1000), (100, 5)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_grows_past_the_flush_size_while_the_one_before_commits() {
        let policy = BatchPolicy {
            flush_rows: 1000,
            max_delay: Duration::from_millis(30),
            max_rows: 3000,
        };
        // The first batch commits at its flush size; the next takes what waited during that
        // commit, up to the cap, and the rest follows.
        assert_eq!(
            slow_commits(policy, 5000).await,
            vec![(0, 1000), (100, 3000), (200, 1000)]
        );
    }

    #[tokio::test]
    async fn retries_a_failed_batch_without_losing_or_splitting_it() {
        let policy = BatchPolicy {
            flush_rows: 10,
            max_delay: Duration::from_secs(3600),
            max_rows: 10,
        };
        let (bus, batches, _, task) = start(policy, 3).await;
        let publishes = publish_all(&bus, 25).await;
        bus.close().await;
        task.await.unwrap().unwrap();
        assert_eq!(*batches.lock().unwrap(), vec![10, 10, 5]);
        for publish in publishes {
            publish.await.unwrap().unwrap();
        }
    }
}
