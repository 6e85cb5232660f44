//! The anomaly worker: watches every car's readings for misbehaviour (a battery that drains too
//! fast, a reported malfunction, ...), keeps each finding as an episode, and opens one Salesforce
//! Service Cloud Case per episode through a durable outbox.
//!
//! Data flow: bus (consumer group `ecars-anomaly`) → [`detector::Detector`] → the car's state and
//! the episode's [`outbox::CaseDraft`], committed together → acknowledgement; then, apart,
//! [`sync::CaseSync`] → [`salesforce::SalesforceClient`] (Collections upsert by external id).

pub mod case;
pub mod detector;
pub mod events;
pub mod outbox;
pub mod rules;
pub mod salesforce;
pub mod sync;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::get;
use axum::{Json, Router};
use chrono::Utc;
use clap::Args;
use ecars_persist::writer::{run_writer, BatchPolicy, BatchSink, RetryPolicy, WriterError};
use ecars_persist::{SensorStore, StoreError};
use ecars_shared::bus::{Bus, BusError, BusRecord, Stream};
use ecars_shared::config::parse_duration;
use ecars_shared::telemetry::{TelemetryReading, Vin};
use serde::Deserialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::case::CaseSettings;
use crate::detector::{ChangeKind, Detector, VehicleState};
use crate::outbox::{CaseOutbox, CaseStatus};
use crate::rules::{RuleSet, RulesError};
use crate::salesforce::{SalesforceClient, SalesforceConfig, SalesforceConfigError};
use crate::sync::{CaseSync, SyncPolicy};

/// Metric names used here (described with the others in `ecars_shared::metrics`).
pub(crate) mod metrics {
    pub use ecars_shared::metrics::{
        ANOMALY_EPISODES as EPISODES, ANOMALY_READINGS_SKIPPED as READINGS_SKIPPED, CASES_SYNCED,
        CASE_SYNC_BUDGET_WAITS as SYNC_BUDGET_WAITS, CASE_SYNC_PAUSED as SYNC_PAUSED,
        CASE_SYNC_PAUSES as SYNC_PAUSES, SALESFORCE_API_LIMIT, SALESFORCE_API_USED,
        SALESFORCE_CALLS, SALESFORCE_ERRORS,
    };
}

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
        AnomalyConfig {
            rules: None,
            case_origin: "Web".into(),
            public_url: "http://127.0.0.1:8080".into(),
            case_update_interval: Duration::from_secs(300),
            api_budget: 0.8,
            retry_initial: Duration::from_secs(2),
            auth_retry: Duration::from_secs(30),
            salesforce: SalesforceConfig {
                login_url: "https://login.salesforce.com".into(),
                api_version: "62.0".into(),
                ..Default::default()
            },
        }
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
    Store(#[from] StoreError),
    /// A task panicked.
    #[error("anomaly task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// The worker, checked and subscribed, ready to run.
pub struct AnomalyWorker {
    detection: Arc<Detection>,
    subscription: Box<dyn ecars_shared::bus::Subscription>,
    sync: Option<CaseSync>,
    events: events::EpisodeEventRelay,
}

impl AnomalyWorker {
    /// Checks the settings (rules file, Salesforce) and joins the consumer group.
    /// `readiness` hears false while the Case sync is paused.
    pub async fn subscribe(
        config: &AnomalyConfig,
        store: SensorStore,
        bus: Arc<dyn Bus>,
        readiness: impl Fn(bool) + Send + Sync + 'static,
    ) -> Result<AnomalyWorker, AnomalyError> {
        let rules = match &config.rules {
            Some(path) => RuleSet::load(path)?,
            None => RuleSet::default(),
        };
        let outbox = CaseOutbox::new(store);
        let wake = Arc::new(Notify::new());
        let events = events::EpisodeEventRelay::new(outbox.clone(), Arc::clone(&bus));
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
            subscription: bus.subscribe(Stream::Telemetry, CONSUMER_GROUP).await?,
            sync,
            events,
        })
    }

    /// Detects and syncs until the bus closes or `shutdown` fires; the detector flushes what it
    /// received before returning.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), AnomalyError> {
        let detector = tokio::spawn(run_writer(
            DetectorSink(Arc::clone(&self.detection)),
            self.subscription,
            // Each batch reads and writes the state of every car in it: larger batches carry
            // more readings per state round trip (detection may lag by up to 250 ms).
            BatchPolicy {
                max_rows: 5000,
                max_delay: Duration::from_millis(250),
            },
            RetryPolicy::default(),
            shutdown.clone(),
        ));
        let sync_stop = shutdown.child_token();
        let sync = self
            .sync
            .map(|sync| tokio::spawn(sync.run(sync_stop.clone())));
        let events = tokio::spawn(self.events.run(sync_stop.clone()));
        let sweep = tokio::spawn(Arc::clone(&self.detection).sweep_until(sync_stop.clone()));
        let detected = detector.await;
        // The sync and the event relay stop with the detector (the bus closed) or with shutdown.
        sync_stop.cancel();
        if let Some(sync) = sync {
            sync.await??;
        }
        events.await??;
        sweep.await?;
        detected??;
        Ok(())
    }
}

/// Subscribes and runs the worker: the service's entry point.
pub async fn run(
    config: AnomalyConfig,
    store: SensorStore,
    bus: Arc<dyn Bus>,
    shutdown: CancellationToken,
) -> Result<(), AnomalyError> {
    AnomalyWorker::subscribe(&config, store, bus, |_| {})
        .await?
        .run(shutdown)
        .await
}

/// The detector with where its results go; shared by the batch sink and the silence sweep,
/// which take turns on the cars' states.
struct Detection {
    detector: Detector,
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

/// The Cases of a run of changes, one per episode (the newest change wins).
#[derive(Default)]
struct Drafts {
    drafts: Vec<outbox::CaseDraft>,
    index: HashMap<String, usize>,
}

impl Detection {
    fn record(&self, change: &detector::EpisodeChange, drafts: &mut Drafts) {
        ::metrics::counter!(
            metrics::EPISODES,
            "rule" => change.episode.rule.name(),
            "change" => match change.kind {
                ChangeKind::Opened => "opened",
                ChangeKind::Updated => "updated",
                ChangeKind::Closed => "closed",
            }
        )
        .increment(1);
        if change.kind == ChangeKind::Opened {
            tracing::info!(vin = %change.vin, rule = %change.episode.rule, key = change.episode.key, "anomaly episode opened");
        }
        let draft = case::draft(change, self.detector.rules(), &self.settings);
        match drafts.index.get(&draft.key) {
            Some(&i) => drafts.drafts[i] = draft,
            None => {
                drafts.index.insert(draft.key.clone(), drafts.drafts.len());
                drafts.drafts.push(draft);
            }
        }
    }

    async fn commit(
        &self,
        states: &HashMap<Vin, VehicleState>,
        drafts: &Drafts,
    ) -> Result<(), StoreError> {
        self.outbox
            .commit(
                states,
                &drafts.drafts,
                self.new_status,
                self.update_after_ms,
                Utc::now(),
            )
            .await?;
        if !drafts.drafts.is_empty() {
            self.wake.notify_one();
            self.events_wake.notify_one();
        }
        Ok(())
    }

    /// Runs a batch of readings through the detector; returns the Cases changed.
    async fn process(&self, batch: &[TelemetryReading]) -> Result<u64, StoreError> {
        let _turn = self.states.lock().await;
        // The states are read fresh for every batch: after a rebalance or restart, another
        // worker's progress on these cars is what counts.
        let mut vins: Vec<&Vin> = batch.iter().map(|r| &r.vin).collect();
        vins.sort();
        vins.dedup();
        let mut states: HashMap<Vin, VehicleState> = self.outbox.load_states(&vins).await?;
        let mut drafts = Drafts::default();
        for reading in batch {
            let state = states.entry(reading.vin.clone()).or_default();
            for change in self.detector.observe(state, reading) {
                self.record(&change, &mut drafts);
            }
        }
        self.commit(&states, &drafts).await?;
        Ok(drafts.drafts.len() as u64)
    }

    /// Opens `telemetry_silent` episodes for cars quiet for longer than the rule allows (wall
    /// clock). Every worker computes the same episode key, so two sweeping replicas agree.
    async fn sweep(&self, now: chrono::DateTime<Utc>) -> Result<usize, StoreError> {
        let rule = &self.detector.rules().telemetry_silent;
        let quiet_since = now - chrono::TimeDelta::from_std(rule.after).unwrap_or_default();
        let _turn = self.states.lock().await;
        let mut states = HashMap::new();
        let mut drafts = Drafts::default();
        for (vin, mut state) in self.outbox.quiet_states(quiet_since, 1000).await? {
            let changes = self.detector.sweep(&vin, &mut state, now);
            if !changes.is_empty() {
                for change in &changes {
                    self.record(change, &mut drafts);
                }
                states.insert(vin, state);
            }
        }
        if !states.is_empty() {
            self.commit(&states, &drafts).await?;
        }
        Ok(drafts.drafts.len())
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

    fn table(&self) -> &'static str {
        "case_outbox"
    }

    fn select(&self, record: BusRecord) -> Option<TelemetryReading> {
        match record {
            BusRecord::Telemetry(reading) => Some(reading),
            BusRecord::DeadLetter(_) | BusRecord::Anomaly(_) | BusRecord::Case(_) => None,
        }
    }

    async fn write(&self, batch: &[TelemetryReading]) -> Result<u64, StoreError> {
        self.0.process(batch).await
    }
}

/// `GET /v1/cases` query.
#[derive(Debug, Deserialize)]
struct CasesQuery {
    status: Option<String>,
    limit: Option<i64>,
}

/// The case routes: `GET /v1/cases[?status=failed&limit=100]` lists outbox rows;
/// `POST /v1/cases/{key}/retry` re-queues a failed one.
pub fn cases_router(outbox: CaseOutbox) -> Router {
    Router::new()
        .route("/v1/cases", get(list_cases))
        .route("/v1/cases/{key}/retry", axum::routing::post(retry_case))
        .with_state(outbox)
}

async fn list_cases(
    State(outbox): State<CaseOutbox>,
    Query(query): Query<CasesQuery>,
) -> Result<Json<serde_json::Value>, (StatusCode, Json<serde_json::Value>)> {
    let status = match query.status.as_deref() {
        None => None,
        Some(text) => Some(parse_status(text).map_err(|e| {
            (
                StatusCode::BAD_REQUEST,
                Json(serde_json::json!({ "error": e })),
            )
        })?),
    };
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let rows = outbox.list(status, limit).await.map_err(store_error)?;
    let counts = outbox.counts().await.map_err(store_error)?;
    Ok(Json(serde_json::json!({
        "counts": counts.iter().map(|(k, v)| (k.as_str(), *v)).collect::<HashMap<_, _>>(),
        "cases": rows,
    })))
}

async fn retry_case(
    State(outbox): State<CaseOutbox>,
    Path(key): Path<String>,
) -> Result<Json<serde_json::Value>, (StatusCode, Json<serde_json::Value>)> {
    if outbox.retry(&key, Utc::now()).await.map_err(store_error)? {
        Ok(Json(serde_json::json!({ "key": key, "status": "pending" })))
    } else {
        Err((
            StatusCode::NOT_FOUND,
            Json(serde_json::json!({ "error": format!("no failed case with key {key:?}") })),
        ))
    }
}

/// Parses a status name as `GET /v1/cases?status=` and `ecars cases list --status` take it.
pub fn parse_status(text: &str) -> Result<CaseStatus, String> {
    [
        CaseStatus::Pending,
        CaseStatus::Synced,
        CaseStatus::Failed,
        CaseStatus::Paused,
        CaseStatus::NotConfigured,
    ]
    .into_iter()
    .find(|s| s.as_str() == text)
    .ok_or_else(|| {
        format!("unknown status {text:?}: pending, synced, failed, paused or not_configured")
    })
}

fn store_error(e: StoreError) -> (StatusCode, Json<serde_json::Value>) {
    tracing::warn!(error = %e, "case outbox query failed");
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(serde_json::json!({ "error": format!("database: {e}") })),
    )
}
