//! The anomaly worker: watches every car's readings for misbehaviour (a battery that drains too
//! fast, a reported malfunction, ...), keeps each finding as an episode, and opens one Salesforce
//! Service Cloud Case per episode through a durable outbox.
//!
//! Data flow: bus (consumer group `ecars-anomaly`; in `ecars up`, the batches the persistence
//! worker committed, in commit order, see [`AnomalyWorker::after_persist`]) →
//! [`detector::Detector`] → the car's state and the episode's [`CaseDraft`], committed together
//! in the case outbox ([`ecars_db::case_outbox`]) → acknowledgement; then, apart,
//! [`sync::CaseSync`] → [`salesforce::SalesforceClient`] (Collections upsert by external id), and
//! [`events::EpisodeEventRelay`] → the anomalies and cases streams.

pub mod case;
pub mod detector;
pub mod events;
mod follow;
pub mod metrics;
pub mod rules;
pub mod salesforce;
pub mod sync;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use clap::Args;
use ecars_bus::{Bus, BusError, Subscription};
use ecars_db::case_outbox::{CaseDraft, CaseOutbox, CaseStatus};
use ecars_db::detector_states::StoredState;
use ecars_db::sensor_cursors::SensorCursor;
use ecars_db::sensor_rows::CommittedReadings;
use ecars_db::{Database, DbError};
use ecars_model::{TelemetryReading, Vin};
use ecars_runtime::settings::parse_duration;
use ecars_runtime::writer::{
    run_writer, BatchPolicy, BatchSink, RetryPolicy, WriteFailure, WriterError,
};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

use crate::case::CaseSettings;
use crate::detector::{Detector, VehicleState};
use crate::rules::{RuleSet, RulesError};
use crate::salesforce::{SalesforceClient, SalesforceConfig, SalesforceConfigError};
use crate::sync::{CaseSync, SyncPolicy};

/// The consumer group of the anomaly worker.
pub const CONSUMER_GROUP: &str = "ecars-anomaly";

/// Settings of the anomaly worker.
#[derive(Clone, Debug, Args)]
pub struct AnomalyConfig {
    /// Rules file (TOML); absent, the documented defaults apply (README, "Anomaly rules").
    #[arg(long = "rules", env = "ECARS_ANOMALY_RULES")]
    pub rules: Option<PathBuf>,
    /// Case `Origin` of the Cases opened.
    #[arg(long = "case-origin", env = "ECARS_CASE_ORIGIN", default_value = "Web")]
    pub case_origin: String,
    /// Public base URL of the live view, linked from each Case's Description.
    #[arg(
        long = "public-url",
        env = "ECARS_PUBLIC_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub public_url: String,
    /// How long the detector gathers readings before it commits the cars' states (`500ms`; at
    /// most 20,000 readings). Longer: fewer, larger commits. In `ecars up` nothing waits for
    /// this commit (the worker reads what the persistence worker committed, and a crash makes
    /// it read the rows again); on Kafka the offsets are committed after it.
    #[arg(id = "anomaly_batch_delay", value_name = "ANOMALY_BATCH_DELAY", long = "anomaly-batch-delay", env = "ECARS_ANOMALY_BATCH_DELAY", default_value = "500ms", value_parser = parse_duration)]
    pub batch_delay: Duration,
    /// Least time between two updates of one Case while its episode keeps firing (`5m`).
    #[arg(long = "case-update-interval", env = "ECARS_CASE_UPDATE_INTERVAL", default_value = "5m", value_parser = parse_duration)]
    pub case_update_interval: Duration,
    /// Share of the org's daily API limit past which the sync slows down and batches harder.
    #[arg(long = "salesforce-api-budget", env = "ECARS_SALESFORCE_API_BUDGET", default_value_t = 0.8, value_parser = parse_share)]
    pub api_budget: f64,
    /// First wait of a transient Salesforce error's retry (doubles per attempt, with jitter).
    #[arg(long = "salesforce-retry-initial", env = "ECARS_SALESFORCE_RETRY_INITIAL", default_value = "2s", value_parser = parse_duration)]
    pub retry_initial: Duration,
    /// First wait before a new token attempt after Salesforce refused the credentials (doubles
    /// per failure, up to an hour).
    #[arg(long = "salesforce-auth-retry", env = "ECARS_SALESFORCE_AUTH_RETRY", default_value = "30s", value_parser = parse_duration)]
    pub auth_retry: Duration,
    /// Salesforce connection.
    #[command(flatten)]
    pub salesforce: SalesforceConfig,
}

impl Default for AnomalyConfig {
    fn default() -> Self {
        ecars_runtime::settings::defaults()
    }
}

fn parse_share(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 1.0 => Ok(v),
        _ => Err(format!("{text:?} is not a share in (0, 1], such as 0.8")),
    }
}

/// Errors that stop the worker (at start: which setting and why).
#[derive(Debug, thiserror::Error)]
pub enum AnomalyError {
    /// The rules file is unusable.
    #[error(transparent)]
    Rules(#[from] RulesError),
    /// A Salesforce setting is unusable.
    #[error(transparent)]
    Salesforce(#[from] SalesforceConfigError),
    /// The bus failed.
    #[error(transparent)]
    Bus(#[from] BusError),
    /// The detector's writer failed.
    #[error(transparent)]
    Writer(#[from] WriterError),
    /// The database failed.
    #[error(transparent)]
    Db(#[from] DbError),
    /// A task panicked.
    #[error("anomaly task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The worker, checked and subscribed, ready to run.
pub struct AnomalyWorker {
    detection: Arc<Detection>,
    input: Input,
    policy: BatchPolicy,
    sync: Option<CaseSync>,
    events: events::EpisodeEventRelay,
}

/// Where the worker's readings come from.
enum Input {
    /// Its consumer group on the bus.
    Bus(Subscription<TelemetryReading>),
    /// The batches the persistence worker of this process committed, in commit order.
    Committed(mpsc::Receiver<CommittedReadings>),
}

impl AnomalyWorker {
    /// Checks the settings (rules file, Salesforce) and joins the consumer group.
    /// `readiness` hears false while the Case sync is paused.
    pub async fn subscribe(
        config: &AnomalyConfig,
        db: Database,
        bus: Bus,
        readiness: impl Fn(bool) + Send + Sync + 'static,
    ) -> Result<AnomalyWorker, AnomalyError> {
        let input = Input::Bus(bus.subscribe(CONSUMER_GROUP).await?);
        AnomalyWorker::new(config, db, bus, input, readiness)
    }

    /// Checks the settings, and reads the batches of readings the persistence worker of this
    /// process commits (its `feeding`) instead of the bus, storing how far it got with the
    /// cars' states; after a crash it reads the rows stored since. `bus` still carries the
    /// anomaly and Case events.
    pub fn after_persist(
        config: &AnomalyConfig,
        db: Database,
        bus: Bus,
        committed: mpsc::Receiver<CommittedReadings>,
        readiness: impl Fn(bool) + Send + Sync + 'static,
    ) -> Result<AnomalyWorker, AnomalyError> {
        AnomalyWorker::new(config, db, bus, Input::Committed(committed), readiness)
    }

    fn new(
        config: &AnomalyConfig,
        db: Database,
        bus: Bus,
        input: Input,
        readiness: impl Fn(bool) + Send + Sync + 'static,
    ) -> Result<AnomalyWorker, AnomalyError> {
        let rules = match &config.rules {
            Some(path) => RuleSet::load(path)?,
            None => RuleSet::default(),
        };
        let outbox = db.case_outbox();
        // Not paused, until the sync says otherwise (also without Salesforce settings): an
        // alert on it sees 0 rather than no series.
        ::metrics::gauge!(metrics::SYNC_PAUSED).set(0.0);
        let wake = Arc::new(Notify::new());
        let events = events::EpisodeEventRelay::new(outbox.clone(), bus.clone());
        let sync = if config.salesforce.is_configured() {
            let client = Arc::new(SalesforceClient::new(&config.salesforce)?);
            let policy = SyncPolicy {
                update_interval: config.case_update_interval,
                retry_initial: config.retry_initial,
                auth_initial: config.auth_retry,
                budget_share: config.api_budget,
                ..SyncPolicy::default()
            };
            let mut sync = CaseSync::new(outbox.clone(), client, policy).on_readiness(readiness);
            sync.wake = Arc::clone(&wake);
            sync.events_wake = Arc::clone(&events.wake);
            Some(sync)
        } else {
            tracing::warn!("no Salesforce settings (SALESFORCE_CLIENT_ID): anomalies are kept in the case outbox as not configured");
            None
        };
        let detection = Arc::new(Detection {
            detector: Detector::new(rules),
            db,
            outbox,
            settings: CaseSettings {
                origin: config.case_origin.clone(),
                public_url: config.public_url.clone(),
            },
            new_status: if sync.is_some() {
                CaseStatus::Pending
            } else {
                CaseStatus::NotConfigured
            },
            update_after_ms: i64::try_from(config.case_update_interval.as_millis())
                .unwrap_or(i64::MAX),
            wake,
            events_wake: Arc::clone(&events.wake),
            states: tokio::sync::Mutex::new(()),
        });
        Ok(AnomalyWorker {
            detection,
            input,
            // Each batch reads and writes the state of every car in it: larger batches carry
            // more readings per state round trip.
            policy: BatchPolicy {
                flush_rows: 20_000,
                max_delay: config.batch_delay,
                max_rows: 20_000,
            },
            sync,
            events,
        })
    }

    /// Detects and syncs until the bus closes or `shutdown` fires; the detector flushes what it
    /// received before returning.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AnomalyError> {
        let detector = match self.input {
            Input::Bus(subscription) => tokio::spawn(run_writer(
                DetectorSink(Arc::clone(&self.detection)),
                subscription,
                self.policy,
                RetryPolicy::default(),
                shutdown.clone(),
            )),
            Input::Committed(feed) => {
                let detection = Arc::clone(&self.detection);
                let (policy, stop) = (self.policy, shutdown.clone());
                tokio::spawn(async move {
                    follow::follow(detection, feed, policy, stop).await;
                    Ok(())
                })
            }
        };
        let sync_stop = shutdown.child_token();
        let sync = self
            .sync
            .map(|sync| tokio::spawn(sync.run(sync_stop.clone())));
        let sweep = tokio::spawn(Arc::clone(&self.detection).sweep_until(sync_stop.clone()));
        let backlog = tokio::spawn(report_backlog(
            self.detection.outbox.clone(),
            sync_stop.clone(),
        ));
        // Not a child of `shutdown`: the event relay stops after the sync, so it publishes the
        // sync's last outcomes in its final round.
        let events_stop = CancellationToken::new();
        let events = tokio::spawn(self.events.run(events_stop.clone()));
        let detected = detector.await;
        // The sync and the sweep stop with the detector (the bus closed) or with shutdown.
        sync_stop.cancel();
        if let Some(sync) = sync {
            sync.await??;
        }
        sweep.await?;
        backlog.await?;
        events_stop.cancel();
        events.await??;
        detected??;
        Ok(())
    }
}

/// How often the case outbox's backlog is measured.
const BACKLOG_INTERVAL: Duration = Duration::from_secs(15);

/// Every [`BACKLOG_INTERVAL`] until `stop`: the outbox's rows per status and how long the
/// oldest of each has waited in it (the alerts on a stuck Salesforce sync read these). A failed
/// query is logged and leaves the gauges as they were.
async fn report_backlog(outbox: CaseOutbox, stop: CancellationToken) {
    loop {
        match outbox.backlog().await {
            Ok(backlog) => {
                let now = chrono::Utc::now();
                for status in CaseStatus::ALL {
                    let (rows, oldest) = backlog
                        .iter()
                        .find(|(s, _, _)| *s == status)
                        .map_or((0, now), |(_, rows, oldest)| (*rows, *oldest));
                    let status = status.as_str();
                    ::metrics::gauge!(metrics::OUTBOX_ROWS, "status" => status).set(rows as f64);
                    ::metrics::gauge!(metrics::OUTBOX_OLDEST, "status" => status)
                        .set((now - oldest).as_seconds_f64().max(0.0));
                }
            }
            Err(error) => tracing::warn!(%error, "measuring the case outbox failed"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(BACKLOG_INTERVAL) => {}
        }
    }
}

/// Subscribes and runs the worker: the service's entry point.
pub async fn run(
    config: AnomalyConfig,
    db: Database,
    bus: Bus,
    shutdown: CancellationToken,
) -> Result<(), AnomalyError> {
    AnomalyWorker::subscribe(&config, db, bus, |_| {})
        .await?
        .run(shutdown)
        .await
}

/// The detector with where its results go; shared by the batch sink and the silence sweep,
/// which take turns on the cars' states.
struct Detection {
    detector: Detector,
    db: Database,
    outbox: CaseOutbox,
    settings: CaseSettings,
    new_status: CaseStatus,
    update_after_ms: i64,
    wake: Arc<Notify>,
    events_wake: Arc<Notify>,
    /// Held while states are read, changed and written back, so the sweep and a batch never
    /// overwrite each other's changes to one car.
    states: tokio::sync::Mutex<()>,
}

/// The changes of a run of readings, one per episode (the newest change wins), drafted into
/// Cases only at the commit: a car in an episode changes it with every reading, and drafting
/// each change (text formatted for Salesforce) cost more than the detection itself.
#[derive(Default)]
struct NewestChanges {
    changes: Vec<detector::EpisodeChange>,
    index: HashMap<String, usize>,
}

impl NewestChanges {
    /// Keeps `change` in place of any earlier change of its episode.
    fn keep(&mut self, change: detector::EpisodeChange) {
        match self.index.get(&change.episode.key) {
            Some(&i) => self.changes[i] = change,
            None => {
                self.index
                    .insert(change.episode.key.clone(), self.changes.len());
                self.changes.push(change);
            }
        }
    }

    fn len(&self) -> usize {
        self.changes.len()
    }
}

impl Detection {
    fn record(&self, change: detector::EpisodeChange, changes: &mut NewestChanges) {
        ::metrics::counter!(
            metrics::EPISODES,
            "rule" => change.episode.rule.name(),
            "change" => change.kind.as_str()
        )
        .increment(1);
        if change.kind == ecars_model::AnomalyChange::Opened {
            tracing::info!(vin = %change.vin, rule = %change.episode.rule, key = change.episode.key, "anomaly episode opened");
        }
        changes.keep(change);
    }

    async fn commit(
        &self,
        states: &HashMap<Vin, VehicleState>,
        changes: &NewestChanges,
        cursor: Option<SensorCursor<'_>>,
    ) -> Result<(), DbError> {
        let states: Vec<StoredState<'_, VehicleState>> = states
            .iter()
            .map(|(vin, state)| StoredState {
                vin,
                state,
                last_date: state.last_date,
            })
            .collect();
        let drafts: Vec<CaseDraft> = changes
            .changes
            .iter()
            .map(|change| case::draft(change, self.detector.rules(), &self.settings))
            .collect();
        self.outbox
            .commit(
                &states,
                &drafts,
                cursor,
                self.new_status,
                self.update_after_ms,
                Utc::now(),
            )
            .await?;
        if !drafts.is_empty() {
            self.wake.notify_one();
            self.events_wake.notify_one();
        }
        Ok(())
    }

    /// Runs a batch of readings through the detector; returns the Cases changed. With a
    /// `cursor`, the sensor rows it read are stored as handled in the same transaction.
    async fn process(
        &self,
        batch: &[TelemetryReading],
        cursor: Option<SensorCursor<'_>>,
    ) -> Result<u64, DbError> {
        let _turn = self.states.lock().await;
        // The states are read fresh for every batch: after a rebalance or restart, another
        // worker's progress on these cars is what counts.
        let mut vins: Vec<&Vin> = batch.iter().map(|r| &r.vin).collect();
        vins.sort();
        vins.dedup();
        let mut states: HashMap<Vin, VehicleState> = self.db.detector_states().load(&vins).await?;
        let mut changes = NewestChanges::default();
        for reading in batch {
            let state = states.entry(reading.vin.clone()).or_default();
            for change in self.detector.observe(state, reading) {
                self.record(change, &mut changes);
            }
        }
        self.commit(&states, &changes, cursor).await?;
        Ok(changes.len() as u64)
    }

    /// Opens `telemetry_silent` episodes for cars quiet for longer than the rule allows (wall
    /// clock). Every worker computes the same episode key, so two sweeping replicas agree.
    async fn sweep(&self, now: chrono::DateTime<Utc>) -> Result<usize, DbError> {
        let rule = &self.detector.rules().telemetry_silent;
        let quiet_since = now - chrono::TimeDelta::from_std(rule.after).unwrap_or_default();
        let _turn = self.states.lock().await;
        let mut states = HashMap::new();
        let mut changes = NewestChanges::default();
        let quiet: Vec<(Vin, VehicleState)> =
            self.db.detector_states().quiet(quiet_since, 1000).await?;
        for (vin, mut state) in quiet {
            let swept = self.detector.sweep(&vin, &mut state, now);
            if !swept.is_empty() {
                for change in swept {
                    self.record(change, &mut changes);
                }
                states.insert(vin, state);
            }
        }
        if !states.is_empty() {
            self.commit(&states, &changes, None).await?;
        }
        Ok(changes.len())
    }

    /// Sweeps for silent cars every quarter of the rule's threshold (at most every 30 s) until
    /// `stop`; does nothing when the rule is off.
    async fn sweep_until(self: Arc<Self>, stop: CancellationToken) {
        let rule = &self.detector.rules().telemetry_silent;
        if !rule.enabled {
            return;
        }
        let every = (rule.after / 4).clamp(Duration::from_secs(1), Duration::from_secs(30));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(e) = self.sweep(Utc::now()).await {
                tracing::warn!(error = %e, "silence sweep failed; trying again later");
            }
        }
    }
}

/// The batch sink of the detector: each batch's states and Cases in one transaction.
struct DetectorSink(Arc<Detection>);

impl BatchSink for DetectorSink {
    type Item = TelemetryReading;
    type Error = DbError;

    fn table(&self) -> &'static str {
        "case_outbox"
    }

    async fn write(&self, batch: &[TelemetryReading]) -> Result<u64, DbError> {
        self.0.process(batch, None).await
    }

    fn failure(&self, error: &DbError) -> WriteFailure {
        WriteFailure::classify(error.is_conflict(), error.is_transient())
    }
}
