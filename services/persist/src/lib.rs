//! The persistence worker: reads accepted readings and dead letters from the bus and writes them
//! to `sensor_data` and `dead_letters` in batches (PostgreSQL `UNNEST` arrays or SQLite multi-row
//! inserts), idempotent by event id, acknowledging only what is committed.

pub mod store;
pub mod writer;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use ecars_shared::bus::{Bus, BusError, BusRecord, Stream};
use ecars_shared::telemetry::{DeadLetter, TelemetryReading};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub use store::{SensorStore, StoreError};
use writer::{run_writer, BatchPolicy, BatchSink, RetryPolicy, WriterError};

/// The consumer group of the persistence worker.
pub const CONSUMER_GROUP: &str = "ecars-persist";

/// Where the data goes.
#[derive(Clone, Debug, Args)]
pub struct DatabaseConfig {
    /// Database URL: `postgres://user:password@host/db` or `sqlite://path.db` (created when
    /// missing). Prefer the environment variable: a password on the command line shows in `ps`.
    #[arg(
        long = "database-url",
        env = "DATABASE_URL",
        default_value = "sqlite://ecars.db",
        hide_env_values = true
    )]
    pub url: String,
}

/// Settings of the persistence worker.
#[derive(Clone, Debug, Args)]
pub struct PersistConfig {
    /// Flush a batch once it holds this many rows.
    #[arg(long = "batch-rows", env = "ECARS_BATCH_ROWS", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=50_000))]
    pub batch_rows: u32,
    /// Flush a batch once its oldest row has waited this many milliseconds.
    #[arg(long = "batch-ms", env = "ECARS_BATCH_MS", default_value_t = 50, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    pub batch_ms: u64,
}

impl Default for PersistConfig {
    fn default() -> Self {
        PersistConfig {
            batch_rows: 1000,
            batch_ms: 50,
        }
    }
}

impl PersistConfig {
    fn policy(&self) -> BatchPolicy {
        BatchPolicy {
            max_rows: self.batch_rows as usize,
            max_delay: Duration::from_millis(self.batch_ms),
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

/// The persistence worker, subscribed and ready to run.
pub struct PersistWorker {
    telemetry: writer::Subscribed<ReadingSink>,
    dead_letters: writer::Subscribed<DeadLetterSink>,
}

impl PersistWorker {
    /// Joins the consumer group on both streams. Subscribe before ingest starts publishing.
    pub async fn subscribe(
        config: &PersistConfig,
        store: SensorStore,
        bus: &dyn Bus,
        observer: Option<CommitObserver>,
    ) -> Result<PersistWorker, PersistError> {
        let policy = config.policy();
        Ok(PersistWorker {
            telemetry: writer::Subscribed {
                sink: ReadingSink {
                    store: store.clone(),
                    observer,
                },
                subscription: bus.subscribe(Stream::Telemetry, CONSUMER_GROUP).await?,
                policy,
            },
            dead_letters: writer::Subscribed {
                sink: DeadLetterSink { store },
                subscription: bus.subscribe(Stream::DeadLetters, CONSUMER_GROUP).await?,
                policy,
            },
        })
    }

    /// Writes until the bus closes or `shutdown` fires, then flushes and returns.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), PersistError> {
        let retry = RetryPolicy::default();
        let t = self.telemetry;
        let d = self.dead_letters;
        let telemetry = tokio::spawn(run_writer(
            t.sink,
            t.subscription,
            t.policy,
            retry,
            shutdown.clone(),
        ));
        let dead_letters = tokio::spawn(run_writer(
            d.sink,
            d.subscription,
            d.policy,
            retry,
            shutdown,
        ));
        let (a, b) = tokio::join!(telemetry, dead_letters);
        a??;
        b??;
        Ok(())
    }
}

/// Subscribes and runs the worker: the service's entry point.
pub async fn run(
    config: PersistConfig,
    store: SensorStore,
    bus: Arc<dyn Bus>,
    shutdown: CancellationToken,
) -> Result<(), PersistError> {
    PersistWorker::subscribe(&config, store, bus.as_ref(), None)
        .await?
        .run(shutdown)
        .await
}

struct ReadingSink {
    store: SensorStore,
    observer: Option<CommitObserver>,
}

impl BatchSink for ReadingSink {
    type Item = TelemetryReading;

    fn table(&self) -> &'static str {
        "sensor_data"
    }

    fn select(&self, record: BusRecord) -> Option<TelemetryReading> {
        match record {
            BusRecord::Telemetry(reading) => Some(reading),
            BusRecord::DeadLetter(_) | BusRecord::Anomaly(_) | BusRecord::Case(_) => None,
        }
    }

    async fn write(&self, batch: &[TelemetryReading]) -> Result<u64, StoreError> {
        let added = self.store.insert_readings(batch).await?;
        if let Some(observer) = &self.observer {
            let _ = observer.send(batch.to_vec()).await;
        }
        Ok(added)
    }
}

struct DeadLetterSink {
    store: SensorStore,
}

impl BatchSink for DeadLetterSink {
    type Item = DeadLetter;

    fn table(&self) -> &'static str {
        "dead_letters"
    }

    fn select(&self, record: BusRecord) -> Option<DeadLetter> {
        match record {
            BusRecord::DeadLetter(letter) => Some(letter),
            BusRecord::Telemetry(_) | BusRecord::Anomaly(_) | BusRecord::Case(_) => None,
        }
    }

    fn write(&self, batch: &[DeadLetter]) -> impl Future<Output = Result<u64, StoreError>> + Send {
        self.store.insert_dead_letters(batch)
    }
}
