//! The persistence worker: reads accepted readings, dead letters and connectivity events from the
//! bus and writes them to `sensor_data` (with each car's latest state), `dead_letters` and the
//! cars' connectivity in `vehicle_state`, in batches (PostgreSQL `UNNEST` arrays or SQLite
//! multi-row inserts), idempotent, acknowledging only what is committed.

use std::time::{Duration, Instant};

use clap::Args;
use ecars_bus::{Bus, BusError, Subscription};
use ecars_db::rollups::Width;
use ecars_db::sensor_rows::{CommittedReadings, StoredBatch};
use ecars_db::{Database, DbError, LogRestart};
use ecars_model::{ConnectivityEvent, DeadLetter, TelemetryReading};
use ecars_runtime::settings::{parse_duration, parse_millis};
use ecars_runtime::writer::{
    run_writer, BatchPolicy, BatchSink, RetryPolicy, WriteFailure, WriterError,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// The consumer group of the persistence worker on the telemetry stream.
pub const CONSUMER_GROUP: &str = "ecars-persist";
/// Its consumer group on the dead-letter stream (a group per stream: see [`Bus::subscribe`]).
pub const DEAD_LETTER_GROUP: &str = "ecars-persist.dlq";
/// Its consumer group on the connectivity stream.
pub const CONNECTIVITY_GROUP: &str = "ecars-persist.connectivity";

/// Settings of the persistence worker.
#[derive(Clone, Debug, Args)]
pub struct PersistConfig {
    /// Flush a batch once it holds this many rows (below about 100,000 readings/s,
    /// --batch-delay flushes first).
    #[arg(long = "batch-rows", env = "ECARS_BATCH_ROWS", default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=50_000))]
    pub batch_rows: u32,
    /// The most rows one batch holds: while the commit before it runs, a batch keeps filling
    /// past --batch-rows up to this many, so a database that falls behind gets fewer, larger
    /// batches (cheaper per row) instead of a queue of small ones. At least --batch-rows.
    #[arg(long = "batch-max-rows", env = "ECARS_BATCH_MAX_ROWS", default_value_t = 20_000, value_parser = clap::value_parser!(u32).range(1..=50_000))]
    pub batch_max_rows: u32,
    /// Flush a batch once its oldest row has waited this long (`50ms`, `1s`).
    #[arg(long = "batch-delay", env = "ECARS_BATCH_DELAY", default_value = "50ms", value_parser = parse_batch_delay)]
    pub batch_delay: Duration,
    /// The same in whole milliseconds, as earlier versions took it; wins over --batch-delay.
    #[arg(long = "batch-ms", env = "ECARS_BATCH_MS", value_parser = parse_batch_ms)]
    pub batch_ms: Option<Duration>,
    /// How long sensor rows are kept after their date, and dead letters after they arrive
    /// (`30d`); `0s` keeps them forever. Once a minute, off the write path, PostgreSQL drops the
    /// days (partitions) that ended before, SQLite deletes older rows in small batches.
    #[arg(long = "retention", env = "ECARS_RETENTION", default_value = "30d", value_parser = parse_duration)]
    pub retention: Duration,
    /// How long the per-minute and per-hour rollups of the readings (the history API's long
    /// ranges) are kept, by bucket start (`400d`); `0s` keeps them forever.
    #[arg(long = "rollup-retention", env = "ECARS_ROLLUP_RETENTION", default_value = "400d", value_parser = parse_duration)]
    pub rollup_retention: Duration,
    /// How often committed batches are added to the rollups and to each car's latest state
    /// (`GET /v1/vehicles`), which trail the stored readings by about this much (`1s`, up to
    /// `60s`). Longer costs the database less: one upsert per car per pass, whatever its
    /// readings in between.
    #[arg(long = "summary-interval", env = "ECARS_SUMMARY_INTERVAL", default_value = "1s", value_parser = parse_batch_delay)]
    pub summary_interval: Duration,
}

/// Rows one retention statement deletes at most: short transactions, so the writers are never
/// held up for long (SQLite has one writer).
pub const RETENTION_BATCH: i64 = 5_000;
/// How often retention runs.
const RETENTION_INTERVAL: Duration = Duration::from_secs(60);
/// The pause between two retention statements of one pass: room for the writers' commits.
const RETENTION_PAUSE: Duration = Duration::from_millis(20);

/// What one retention pass deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetentionPass {
    /// Sensor rows deleted one by one (SQLite; on PostgreSQL, those dated on no day of their
    /// own).
    pub readings: u64,
    /// Days of sensor rows dropped whole (PostgreSQL's daily partitions).
    pub days: u64,
    /// Dead letters deleted.
    pub dead_letters: u64,
    /// Rollup buckets deleted (both widths).
    pub rollups: u64,
}

/// What retention deletes: what is older than these times (`None`: kept forever).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cutoffs {
    /// Sensor rows dated before it (on PostgreSQL, whole days: those that ended by it) and
    /// dead letters that arrived before it.
    pub readings: Option<chrono::DateTime<chrono::Utc>>,
    /// Rollup buckets that started before it.
    pub rollups: Option<chrono::DateTime<chrono::Utc>>,
}

impl Cutoffs {
    /// The cutoffs of keeping rows for `readings` and rollups for `rollups` (zero: forever)
    /// at `now`.
    pub fn at(
        now: chrono::DateTime<chrono::Utc>,
        readings: Duration,
        rollups: Duration,
    ) -> Cutoffs {
        let before = |keep: Duration| {
            (!keep.is_zero())
                .then(|| chrono::TimeDelta::from_std(keep).ok())
                .flatten()
                .and_then(|keep| now.checked_sub_signed(keep))
        };
        Cutoffs {
            readings: before(readings),
            rollups: before(rollups),
        }
    }
}

/// Deletes what is older than `cutoffs`, [`RETENTION_BATCH`] rows per statement with a pause
/// between statements.
pub async fn apply_retention(db: &Database, cutoffs: Cutoffs) -> Result<RetentionPass, DbError> {
    let mut pass = RetentionPass::default();
    if let Some(cutoff) = cutoffs.readings {
        let readings = db.sensor_rows();
        let letters = db.dead_letter_rows();
        pass.days = readings.drop_days_before(cutoff).await?;
        pass.readings =
            until_drained(|| readings.delete_dated_before(cutoff, RETENTION_BATCH)).await?;
        pass.dead_letters =
            until_drained(|| letters.delete_received_before(cutoff, RETENTION_BATCH)).await?;
    }
    if let Some(cutoff) = cutoffs.rollups {
        let rollups = db.rollups();
        for width in Width::ALL {
            pass.rollups +=
                until_drained(|| rollups.delete_before(width, cutoff, RETENTION_BATCH)).await?;
        }
    }
    Ok(pass)
}

/// Summarises the sensor rows stored before the rollups existed, [`RETENTION_BATCH`] ids per
/// transaction with a pause between them, until none remain or `shutdown`; a failure is logged
/// and tried again 5 s later.
async fn backfill_rollups(db: Database, shutdown: CancellationToken) {
    let rollups = db.rollups();
    let mut announced = false;
    loop {
        let pause = match rollups.backfill(RETENTION_BATCH).await {
            Ok(0) => {
                if announced {
                    tracing::info!("rollups of the readings stored before them are complete");
                }
                metrics::gauge!(ROLLUP_BACKFILL_REMAINING).set(0.0);
                return;
            }
            Ok(remaining) => {
                if !announced {
                    tracing::info!(remaining, "summarising stored readings into rollups");
                    announced = true;
                }
                metrics::gauge!(ROLLUP_BACKFILL_REMAINING).set(remaining as f64);
                RETENTION_PAUSE
            }
            Err(error) => {
                tracing::warn!(%error, "rollup backfill failed; trying again in 5s");
                Duration::from_secs(5)
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// Queued batches one rollup transaction takes at most (up to 50,000 rows at the default batch
/// size).
pub const ROLLUP_BATCH: i64 = 50;

/// Adds queued batches to the rollups and the cars' states every `interval`
/// (`--summary-interval`: one upsert per car and minute, hour and state per pass, whatever the
/// car sent in between), [`ROLLUP_BATCH`] per
/// transaction while there are more, until `done` (the writers stopped); then once more, so a
/// clean stop leaves none behind. A failure is logged and tried again at the next pass (the batches stay
/// queued).
async fn apply_rollups(db: Database, interval: Duration, done: CancellationToken) {
    let rollups = db.rollups();
    loop {
        let stopping = tokio::select! {
            _ = done.cancelled() => true,
            _ = tokio::time::sleep(interval) => false,
        };
        loop {
            match rollups.apply_pending(ROLLUP_BATCH).await {
                Ok(applied) => {
                    let read_back = applied.batches - applied.from_memory;
                    metrics::counter!(ROLLUP_APPLIED, "from" => "memory")
                        .increment(applied.from_memory);
                    metrics::counter!(ROLLUP_APPLIED, "from" => "rows").increment(read_back);
                    if applied.batches < ROLLUP_BATCH as u64 {
                        break;
                    }
                }
                Err(error) => {
                    tracing::warn!(%error, "updating the rollups failed; trying again later");
                    break;
                }
            }
        }
        if stopping {
            return;
        }
    }
}

/// Checkpoints the database's write-ahead log every second (SQLite; commits do not), so a
/// commit never waits for long, and reports the log's size ([`SQLITE_LOG_PAGES`]). A failure is
/// logged, rate-limited, and tried again.
async fn checkpoint_every_second(db: Database) {
    if db.backend() != "sqlite" {
        return;
    }
    let mut every = tokio::time::interval(Duration::from_secs(1));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failures = 0u32;
    let mut restarts = RestartBackoff::default();
    loop {
        every.tick().await;
        let now = Instant::now();
        match db.checkpoint(restarts.allowed(now)).await {
            Ok(checkpoint) => {
                failures = 0;
                restarts.record(checkpoint.restart, now);
                metrics::gauge!(SQLITE_LOG_PAGES).set(checkpoint.log_pages as f64);
                metrics::histogram!(SQLITE_CHECKPOINT_SECONDS, "step" => "passive")
                    .record(checkpoint.passive_took.as_secs_f64());
                if checkpoint.restart != LogRestart::NotTried {
                    metrics::histogram!(SQLITE_CHECKPOINT_SECONDS, "step" => "restart")
                        .record(checkpoint.restart_took.as_secs_f64());
                }
            }
            Err(error) => {
                failures += 1;
                if failures.is_power_of_two() {
                    tracing::warn!(%error, failures, "checkpointing the SQLite log failed; trying again");
                }
            }
        }
    }
}

/// When the checkpoint's `RESTART` step may run. Each try holds new writers back for up to
/// [`ecars_db::RESTART_WAIT`]; while a reader that does not end (a long history export) keeps
/// it out, trying every second would cost every second's commits that wait for nothing. After
/// a busy try the next waits 2 s, then 4, … up to [`RESTART_BACKOFF_MAX`]; a restart resets it.
#[derive(Debug, Default)]
struct RestartBackoff {
    /// The earliest next try (`None`: any time).
    not_before: Option<Instant>,
    /// The wait after the last busy try.
    wait: Duration,
}

/// The longest wait between two `RESTART` tries a reader kept out.
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(32);

impl RestartBackoff {
    fn allowed(&self, now: Instant) -> bool {
        self.not_before.is_none_or(|at| now >= at)
    }

    fn record(&mut self, restart: LogRestart, now: Instant) {
        match restart {
            LogRestart::NotTried => {}
            LogRestart::Restarted => *self = RestartBackoff::default(),
            LogRestart::Busy => {
                self.wait = (self.wait * 2).clamp(Duration::from_secs(2), RESTART_BACKOFF_MAX);
                self.not_before = Some(now + self.wait);
            }
        }
    }
}

/// The SQLite write-ahead log's pages (4 KiB each) at the last checkpoint: it starts over at
/// about a second of commits; a log that keeps growing means the checkpoints cannot finish (a
/// reader that never ends).
pub const SQLITE_LOG_PAGES: &str = "ecars_sqlite_log_pages";

/// How long each step of the SQLite checkpoint took (`step`: `passive`, copying the log into
/// the database beside the commits; `restart`, which holds new commits back while it finishes
/// the copy and waits for readers, at most 100 ms of waiting).
pub const SQLITE_CHECKPOINT_SECONDS: &str = "ecars_sqlite_checkpoint_seconds";

/// Batches of sensor rows added to the rollups, by where their summary came from (`from`:
/// `memory`, this process queued it; `rows`, its rows were read back).
pub const ROLLUP_APPLIED: &str = "ecars_rollup_batches_applied_total";

/// Sensor-row ids stored before the rollups existed and not yet summarised.
pub const ROLLUP_BACKFILL_REMAINING: &str = "ecars_rollup_backfill_remaining_rows";

/// Runs `delete` (one statement of at most [`RETENTION_BATCH`] rows) until it deletes fewer,
/// pausing between statements; returns the rows deleted.
async fn until_drained<F, Fut>(mut delete: F) -> Result<u64, DbError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<u64, DbError>>,
{
    let mut total = 0;
    loop {
        let n = delete().await?;
        total += n;
        if n < RETENTION_BATCH as u64 {
            return Ok(total);
        }
        tokio::time::sleep(RETENTION_PAUSE).await;
    }
}

/// Days ahead of today whose partitions of sensor rows (PostgreSQL) are made in advance: a
/// reading is never dated more than the clock skew allowed ahead, and the margin covers a
/// worker that was down for a while.
const DAYS_AHEAD: u64 = 3;

/// Once at start and then once a minute until `shutdown`: makes the partitions of the coming
/// days, and applies retention if any is set. A failed pass is logged and tried again at the
/// next.
async fn upkeep(db: Database, keep: (Duration, Duration), shutdown: CancellationToken) {
    let mut reported_blocked = std::collections::HashSet::new();
    let mut first = true;
    loop {
        if !std::mem::take(&mut first) {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(RETENTION_INTERVAL) => {}
            }
        }
        let today = chrono::Utc::now().date_naive();
        let days = (
            today - chrono::Days::new(1),
            today + chrono::Days::new(DAYS_AHEAD),
        );
        match db.sensor_rows().prepare_days(days.0, days.1).await {
            Ok(prepared) => {
                for day in prepared.created {
                    tracing::info!(%day, "created the partition of sensor rows dated on {day}");
                }
                for day in prepared.blocked {
                    // Once per day, not once a minute.
                    if reported_blocked.insert(day) {
                        tracing::warn!(
                            %day,
                            "sensor rows dated on {day} are in the default partition already, \
                             so the day gets no partition of its own (retention deletes them row \
                             by row)"
                        );
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "making the partitions of the coming days failed"),
        }
        if keep == (Duration::ZERO, Duration::ZERO) {
            continue;
        }
        match apply_retention(&db, Cutoffs::at(chrono::Utc::now(), keep.0, keep.1)).await {
            Ok(pass) => {
                metrics::counter!(RETENTION_DELETED, "table" => "sensor_data")
                    .increment(pass.readings);
                metrics::counter!(RETENTION_DROPPED_DAYS).increment(pass.days);
                metrics::counter!(RETENTION_DELETED, "table" => "dead_letters")
                    .increment(pass.dead_letters);
                metrics::counter!(RETENTION_DELETED, "table" => "rollups").increment(pass.rollups);
                if pass != RetentionPass::default() {
                    tracing::info!(
                        readings = pass.readings,
                        days = pass.days,
                        dead_letters = pass.dead_letters,
                        rollups = pass.rollups,
                        "retention deleted rows older than {:?} and rollups older than {:?}",
                        keep.0,
                        keep.1
                    );
                }
            }
            Err(error) => tracing::warn!(%error, "retention pass failed; trying again later"),
        }
    }
}

/// Days of sensor rows retention dropped whole (PostgreSQL's daily partitions).
pub const RETENTION_DROPPED_DAYS: &str = "ecars_retention_dropped_days_total";

/// Rows deleted by retention, labelled by `table`.
pub const RETENTION_DELETED: &str = "ecars_retention_deleted_rows_total";

fn parse_batch_delay(text: &str) -> Result<Duration, String> {
    within_a_minute(parse_duration(text)?)
}

fn parse_batch_ms(text: &str) -> Result<Duration, String> {
    within_a_minute(parse_millis(text)?)
}

fn within_a_minute(delay: Duration) -> Result<Duration, String> {
    if (Duration::from_millis(1)..=Duration::from_secs(60)).contains(&delay) {
        Ok(delay)
    } else {
        Err(format!("{delay:?} is not between 1ms and 60s"))
    }
}

impl Default for PersistConfig {
    fn default() -> Self {
        ecars_runtime::settings::defaults()
    }
}

impl PersistConfig {
    /// When batches are flushed.
    pub fn policy(&self) -> BatchPolicy {
        BatchPolicy {
            flush_rows: self.batch_rows as usize,
            max_delay: self.batch_ms.unwrap_or(self.batch_delay),
            // BatchPolicy holds a batch to at least its flush size.
            max_rows: self.batch_max_rows as usize,
        }
    }
}

/// Errors that stop the worker.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// The bus failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// A writer failed.
    #[error(transparent)]
    Writer(#[from] WriterError),
    /// A writer task panicked.
    #[error("writer task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Readings of one committed batch, reported to an observer (benchmarks measure
/// publish-to-row latency with it).
pub type CommitObserver = mpsc::Sender<Vec<TelemetryReading>>;

/// Where committed batches of readings go next, in commit order: the anomaly worker of
/// `ecars up` ([`PersistWorker::feeding`]). Bounded: a reader that falls behind holds the
/// writer back.
pub type CommittedFeed = mpsc::Sender<CommittedReadings>;

/// The persistence worker, subscribed and ready to run.
#[derive(Debug)]
pub struct PersistWorker {
    readings: (ReadingSink, Subscription<TelemetryReading>),
    dead_letters: (DeadLetterSink, Subscription<DeadLetter>),
    connectivity: (ConnectivitySink, Subscription<ConnectivityEvent>),
    policy: BatchPolicy,
    /// The database, and how long its rows and its rollups are kept (zero: forever).
    retention: (Database, (Duration, Duration)),
    /// `--summary-interval`.
    summary_interval: Duration,
}

impl PersistWorker {
    /// Joins the consumer groups of its streams. Subscribe before ingest starts publishing.
    pub async fn subscribe(
        config: &PersistConfig,
        db: Database,
        bus: &Bus,
        observer: Option<CommitObserver>,
    ) -> Result<PersistWorker, PersistError> {
        Ok(PersistWorker {
            readings: (
                ReadingSink {
                    db: db.clone(),
                    observer,
                    feed: None,
                    stored: std::sync::Mutex::new(StoredBatch::default()),
                },
                bus.subscribe(CONSUMER_GROUP).await?,
            ),
            dead_letters: (
                DeadLetterSink { db: db.clone() },
                bus.subscribe(DEAD_LETTER_GROUP).await?,
            ),
            connectivity: (
                ConnectivitySink { db: db.clone() },
                bus.subscribe(CONNECTIVITY_GROUP).await?,
            ),
            policy: config.policy(),
            retention: (db, (config.retention, config.rollup_retention)),
            summary_interval: config.summary_interval,
        })
    }

    /// Hands every committed batch of readings to `feed`, in commit order, before the batch is
    /// acknowledged.
    pub fn feeding(mut self, feed: CommittedFeed) -> PersistWorker {
        self.readings.0.feed = Some(feed);
        self
    }

    /// Writes until the bus closes or `shutdown` fires, then flushes and returns.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), PersistError> {
        let retry = RetryPolicy::default();
        let (sink, subscription) = self.readings;
        let readings = tokio::spawn(run_writer(
            sink,
            subscription,
            self.policy,
            retry,
            shutdown.clone(),
        ));
        let (sink, subscription) = self.dead_letters;
        let dead_letters = tokio::spawn(run_writer(
            sink,
            subscription,
            self.policy,
            retry,
            shutdown.clone(),
        ));
        let (sink, subscription) = self.connectivity;
        let connectivity = tokio::spawn(run_writer(
            sink,
            subscription,
            self.policy,
            retry,
            shutdown.clone(),
        ));
        let (db, keep) = self.retention;
        let backfill = tokio::spawn(backfill_rollups(db.clone(), shutdown.clone()));
        // Its own signal: the last pass comes after the writers' last commit.
        let writers_done = CancellationToken::new();
        let rollups = tokio::spawn(apply_rollups(
            db.clone(),
            self.summary_interval,
            writers_done.clone(),
        ));
        let checkpoints = tokio::spawn(checkpoint_every_second(db.clone()));
        let upkeep = tokio::spawn(upkeep(db, keep, shutdown.clone()));
        let (a, b, c) = tokio::join!(readings, dead_letters, connectivity);
        // The writers stopped (shutdown, or the bus closed): so does the upkeep, the rollups
        // after a last pass over what the writers committed.
        backfill.abort();
        writers_done.cancel();
        let _ = rollups.await;
        upkeep.abort();
        checkpoints.abort();
        a??;
        b??;
        c??;
        Ok(())
    }
}

#[derive(Debug)]
struct ReadingSink {
    db: Database,
    observer: Option<CommitObserver>,
    feed: Option<CommittedFeed>,
    /// The ids of the last batch written, for [`BatchSink::committed`] (one commit at a time).
    stored: std::sync::Mutex<StoredBatch>,
}

impl BatchSink for ReadingSink {
    type Item = TelemetryReading;
    type Error = DbError;

    fn table(&self) -> &'static str {
        "sensor_data"
    }

    async fn write(&self, batch: &[TelemetryReading]) -> Result<u64, DbError> {
        let stored = self.db.sensor_rows().insert_batch(batch).await?;
        let added = stored.added;
        *self.stored.lock().unwrap_or_else(|p| p.into_inner()) = stored;
        // How far behind the cars the stored data is (a queue, an outage, a car's clock).
        let now = chrono::Utc::now();
        let age = metrics::histogram!(ecars_runtime::metrics::READING_AGE);
        for reading in batch {
            age.record((now - reading.date).as_seconds_f64().max(0.0));
        }
        if let Some(observer) = &self.observer {
            let _ = observer.send(batch.to_vec()).await;
        }
        Ok(added)
    }

    async fn committed(&self, batch: Vec<TelemetryReading>) {
        let Some(feed) = &self.feed else {
            return;
        };
        let ids = std::mem::take(&mut *self.stored.lock().unwrap_or_else(|p| p.into_inner()));
        if ids.added == 0 {
            // Every reading was stored before: the reader had them then.
            return;
        }
        let readings = (ids.added == batch.len() as u64).then_some(batch);
        // The reader gone (it stopped) loses nothing: it reads the rows after its cursor when
        // it starts again.
        let _ = feed.send(CommittedReadings { ids, readings }).await;
    }

    fn failure(&self, error: &DbError) -> WriteFailure {
        WriteFailure::classify(error.is_conflict(), error.is_transient())
    }
}

#[derive(Debug)]
struct DeadLetterSink {
    db: Database,
}

impl BatchSink for DeadLetterSink {
    type Item = DeadLetter;
    type Error = DbError;

    fn table(&self) -> &'static str {
        "dead_letters"
    }

    async fn write(&self, batch: &[DeadLetter]) -> Result<u64, DbError> {
        self.db.dead_letter_rows().insert(batch).await
    }

    fn failure(&self, error: &DbError) -> WriteFailure {
        WriteFailure::classify(error.is_conflict(), error.is_transient())
    }
}

#[derive(Debug)]
struct ConnectivitySink {
    db: Database,
}

impl BatchSink for ConnectivitySink {
    type Item = ConnectivityEvent;
    type Error = DbError;

    fn table(&self) -> &'static str {
        "vehicle_state"
    }

    async fn write(&self, batch: &[ConnectivityEvent]) -> Result<u64, DbError> {
        self.db.vehicle_states().apply(batch).await
    }

    fn failure(&self, error: &DbError) -> WriteFailure {
        WriteFailure::classify(error.is_conflict(), error.is_transient())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        persist: PersistConfig,
    }

    #[test]
    fn the_batch_delay_reads_as_a_duration_and_the_old_milliseconds_still_work() {
        assert_eq!(
            PersistConfig::default().policy().max_delay,
            Duration::from_millis(50)
        );
        assert_eq!(PersistConfig::default().policy().flush_rows, 5000);
        assert_eq!(PersistConfig::default().policy().max_rows, 20_000);
        let delay = |args: &[&str]| {
            Cli::try_parse_from(std::iter::once("x").chain(args.iter().copied()))
                .map(|cli| cli.persist.policy().max_delay)
        };
        assert_eq!(
            delay(&["--batch-delay", "250ms"]).unwrap(),
            Duration::from_millis(250)
        );
        assert_eq!(
            delay(&["--batch-delay", "2s"]).unwrap(),
            Duration::from_secs(2)
        );
        assert_eq!(
            delay(&["--batch-ms", "20"]).unwrap(),
            Duration::from_millis(20)
        );
        assert!(delay(&["--batch-ms", "20ms"]).is_err());
        assert!(delay(&["--batch-delay", "2m"]).is_err(), "over a minute");
    }

    #[test]
    fn a_restart_a_reader_kept_out_waits_longer_each_time_until_one_succeeds() {
        let start = Instant::now();
        let at = |seconds: u64| start + Duration::from_secs(seconds);
        let mut backoff = RestartBackoff::default();
        assert!(backoff.allowed(at(0)));
        backoff.record(LogRestart::NotTried, at(0));
        assert!(backoff.allowed(at(1)), "a small log asks nothing");
        backoff.record(LogRestart::Busy, at(1));
        assert!(!backoff.allowed(at(2)));
        assert!(backoff.allowed(at(3)), "2 s after the first busy try");
        backoff.record(LogRestart::Busy, at(3));
        assert!(!backoff.allowed(at(6)));
        assert!(backoff.allowed(at(7)), "then 4 s");
        for n in 0..10 {
            backoff.record(LogRestart::Busy, at(100 * n));
        }
        assert!(!backoff.allowed(at(900 + 31)));
        assert!(backoff.allowed(at(900 + 32)), "at most 32 s");
        backoff.record(LogRestart::Restarted, at(932));
        assert!(backoff.allowed(at(933)), "a restart resets it");
        backoff.record(LogRestart::Busy, at(933));
        assert!(backoff.allowed(at(935)), "back to 2 s");
    }

    #[test]
    fn retention_defaults_to_thirty_days_and_zero_keeps_everything() {
        assert_eq!(
            PersistConfig::default().retention,
            Duration::from_secs(30 * 86_400)
        );
        assert_eq!(
            PersistConfig::default().rollup_retention,
            Duration::from_secs(400 * 86_400)
        );
        let retention = |value: &str| {
            Cli::try_parse_from(["x", "--retention", value]).map(|cli| cli.persist.retention)
        };
        assert_eq!(retention("7d").unwrap(), Duration::from_secs(7 * 86_400));
        assert!(retention("0s").unwrap().is_zero());
        assert!(retention("soon").is_err());
    }
}
