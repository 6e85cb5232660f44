//! `ecars`: one binary for every service of ecars-realtime. It only parses settings and wires the
//! service crates together: broker → bus → workers → sinks.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ecars_anomaly::outbox::CaseOutbox;
use ecars_anomaly::{AnomalyConfig, AnomalyWorker};
use ecars_api::{ApiState, HttpConfig, Readiness};
use ecars_ingest::{BoundIngest, IngestConfig};
use ecars_persist::{DatabaseConfig, PersistConfig, PersistWorker, SensorStore};
use ecars_relay::{Relay, RelayConfig};
use ecars_shared::bus::{Bus, InProcessBus, KafkaBus, KafkaConfig};
use ecars_shared::config::LogConfig;
use ecars_simulator::SimulatorConfig;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// mimalloc: glibc's allocator spent a fifth of ingest's CPU on fragmentation and page faults
/// (MQTT → Kafka went from 46,600 to 58,000 readings/s in the benchmark).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// ecars-realtime: car telemetry over MQTT, stored, watched and streamed.
#[derive(Debug, Parser)]
#[command(name = "ecars", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    log: LogConfig,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run everything in one process: MQTT broker, bus (in process, or Kafka with
    /// --kafka-brokers), persistence and HTTP.
    Up(Box<UpArgs>),
    /// Scale-out: the MQTT broker, publishing accepted readings to Kafka.
    Ingest(IngestArgs),
    /// Scale-out: the persistence worker, consuming Kafka as group `ecars-persist`.
    Persist(PersistArgs),
    /// Scale-out: the anomaly worker (detection and Salesforce Cases), consuming Kafka as group
    /// `ecars-anomaly`.
    Anomaly(AnomalyArgs),
    /// Scale-out: the live relay (WebSockets on the HTTP port), following Kafka on its own.
    Relay(RelayArgs),
    /// Show or re-queue the Cases of the case outbox.
    Cases(CasesArgs),
    /// Print the Kafka topics other services can consume: partitions, keys, value schemas.
    Topics(TopicsArgs),
    /// Apply the database migrations and exit.
    Migrate(MigrateArgs),
    /// Drive simulated cars against a broker.
    Simulate(SimulatorConfig),
}

#[derive(Debug, Args)]
struct UpArgs {
    #[command(flatten)]
    ingest: IngestConfig,
    #[command(flatten)]
    http: HttpConfig,
    #[command(flatten)]
    database: DatabaseConfig,
    #[command(flatten)]
    persist: PersistConfig,
    #[command(flatten)]
    kafka: KafkaConfig,
    #[command(flatten)]
    anomaly: AnomalyConfig,
    #[command(flatten)]
    relay: RelayConfig,
    /// Records each in-process bus queue holds before publishers wait (backpressure).
    #[arg(long = "bus-capacity", env = "ECARS_BUS_CAPACITY", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    bus_capacity: u32,
    /// Also drive this many simulated cars inside the process.
    #[arg(long = "simulate", env = "ECARS_SIMULATE", default_value_t = 0)]
    simulate: u32,
    /// How many of the simulated cars malfunction.
    #[arg(
        long = "simulate-malfunction",
        env = "ECARS_SIMULATE_MALFUNCTION",
        default_value_t = 1
    )]
    simulate_malfunction: u32,
    /// Milliseconds between two readings of a simulated car.
    #[arg(
        long = "simulate-interval-ms",
        env = "ECARS_SIMULATE_INTERVAL_MS",
        default_value_t = 1000
    )]
    simulate_interval_ms: u64,
}

#[derive(Debug, Args)]
struct IngestArgs {
    #[command(flatten)]
    ingest: IngestConfig,
    #[command(flatten)]
    http: HttpConfig,
    #[command(flatten)]
    kafka: KafkaConfig,
}

#[derive(Debug, Args)]
struct PersistArgs {
    #[command(flatten)]
    database: DatabaseConfig,
    #[command(flatten)]
    persist: PersistConfig,
    #[command(flatten)]
    http: HttpConfig,
    #[command(flatten)]
    kafka: KafkaConfig,
}

#[derive(Debug, Args)]
struct AnomalyArgs {
    #[command(flatten)]
    database: DatabaseConfig,
    #[command(flatten)]
    anomaly: AnomalyConfig,
    #[command(flatten)]
    http: HttpConfig,
    #[command(flatten)]
    kafka: KafkaConfig,
}

#[derive(Debug, Args)]
struct RelayArgs {
    #[command(flatten)]
    relay: RelayConfig,
    #[command(flatten)]
    database: DatabaseConfig,
    #[command(flatten)]
    http: HttpConfig,
    #[command(flatten)]
    kafka: KafkaConfig,
}

#[derive(Debug, Args)]
struct CasesArgs {
    #[command(subcommand)]
    action: CasesAction,
}

#[derive(Debug, Subcommand)]
enum CasesAction {
    /// List outbox rows, newest first: key, VIN, rule, status, Salesforce Id, attempts, error.
    List {
        #[command(flatten)]
        database: DatabaseConfig,
        /// Only rows in this status: pending, synced, failed, paused, not_configured.
        #[arg(long = "status", value_parser = ecars_anomaly::parse_status)]
        status: Option<ecars_anomaly::outbox::CaseStatus>,
        /// Most rows shown.
        #[arg(long = "limit", default_value_t = 100)]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long = "json")]
        json: bool,
    },
    /// Send a failed Case again (after fixing what Salesforce refused).
    Retry {
        #[command(flatten)]
        database: DatabaseConfig,
        /// The Case's `Ecars_Anomaly_Key__c`.
        key: String,
    },
}

#[derive(Debug, Args)]
struct TopicsArgs {
    #[command(flatten)]
    kafka: KafkaConfig,
    /// Print JSON instead of text.
    #[arg(long = "json")]
    json: bool,
}

#[derive(Debug, Args)]
struct MigrateArgs {
    #[command(flatten)]
    database: DatabaseConfig,
}

/// Treats an empty `ECARS_*`, `SALESFORCE_*` or `DATABASE_URL` variable as unset, as a `.env`
/// file with `NAME=` means: an empty secret must not count as a (too short) secret.
fn unset_empty_settings() {
    let empty: Vec<String> = std::env::vars_os()
        .filter_map(|(name, value)| {
            let name = name.into_string().ok()?;
            let ours = name.starts_with("ECARS_")
                || name.starts_with("SALESFORCE_")
                || name == "DATABASE_URL";
            (ours && value.is_empty()).then_some(name)
        })
        .collect();
    for name in empty {
        // Single-threaded here: before the runtime and any thread start.
        std::env::remove_var(name);
    }
}

fn main() -> anyhow::Result<()> {
    unset_empty_settings();
    let cli = Cli::parse();
    cli.log.init()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => up(*args).await,
            Command::Ingest(args) => ingest(args).await,
            Command::Persist(args) => persist(args).await,
            Command::Anomaly(args) => anomaly(args).await,
            Command::Relay(args) => relay(args).await,
            Command::Cases(args) => cases(args).await,
            Command::Topics(args) => topics(args).await,
            Command::Migrate(args) => {
                let store = open_store(&args.database).await?;
                store.close().await;
                tracing::info!("migrations applied");
                Ok(())
            }
            Command::Simulate(config) => {
                let shutdown = CancellationToken::new();
                tokio::spawn(cancel_on_signal(shutdown.clone()));
                let report = ecars_simulator::run(config, shutdown).await?;
                // The report on stdout, for scripts; the logs go to stderr.
                println!("{}", serde_json::to_string(&report)?);
                Ok(())
            }
        }
    })
}

/// Connects and migrates, waiting up to a minute for a database that is still starting.
async fn open_store(config: &DatabaseConfig) -> anyhow::Result<SensorStore> {
    let store = SensorStore::connect_lazy(&config.url)?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        match store.migrate().await {
            Ok(()) => return Ok(store),
            Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, backend = store.backend(), "waiting for the database to accept connections");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => {
                return Err(e).with_context(|| {
                    format!(
                        "cannot migrate {}",
                        ecars_persist::store::redact_url(&config.url)
                    )
                })
            }
        }
    }
}

/// Whether a service publishes what cars send (and so needs the spool for Kafka outages).
#[derive(Clone, Copy, PartialEq, Eq)]
enum KafkaRole {
    /// Publishes accepted readings: the spool keeps them while Kafka is away.
    Publisher,
    /// Only consumes.
    Consumer,
}

/// The Kafka bus; fails naming the setting when no brokers are configured.
async fn kafka_bus(kafka: &KafkaConfig, role: KafkaRole) -> anyhow::Result<Arc<dyn Bus>> {
    anyhow::ensure!(
        kafka.brokers.is_some(),
        "this service runs on Kafka: set --kafka-brokers / ECARS_KAFKA_BROKERS (or use `ecars up` for the embedded bus)"
    );
    let bus = match role {
        KafkaRole::Publisher => KafkaBus::connect_with_spool(kafka).await,
        KafkaRole::Consumer => KafkaBus::connect(kafka).await,
    }
    .context("cannot connect to Kafka (--kafka-brokers / ECARS_KAFKA_BROKERS)")?;
    Ok(Arc::new(bus))
}

async fn bind_http(config: &HttpConfig) -> anyhow::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(config.http_addr)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (--http-addr / ECARS_HTTP_ADDR)",
                config.http_addr
            )
        })
}

/// Serves the HTTP surface on `listener`; cancelling the returned token stops it gracefully.
fn spawn_http(
    listener: tokio::net::TcpListener,
    state: ApiState,
    extra: axum::Router,
) -> (CancellationToken, JoinHandle<anyhow::Result<()>>) {
    let stop = CancellationToken::new();
    let router = ecars_api::router(state).merge(extra);
    let token = stop.clone();
    let task = tokio::spawn(async move { Ok(ecars_api::serve(listener, router, token).await?) });
    (stop, task)
}

/// Waits for a signal, or for a part that stops on its own, which is fatal: the error says
/// which, and the process exits non-zero so a supervisor restarts it.
async fn run_until_signal(
    shutdown: &CancellationToken,
    readiness: &Readiness,
    parts: Vec<(&'static str, &mut JoinHandle<anyhow::Result<()>>)>,
) -> anyhow::Result<()> {
    let watch = first_to_finish(parts);
    tokio::select! {
        _ = cancel_on_signal(shutdown.clone()) => {
            readiness.set("draining", false);
            Ok(())
        }
        (name, result) = watch => {
            readiness.set("failed", false);
            shutdown.cancel();
            let reason = match result {
                Ok(Ok(())) => "it returned".to_owned(),
                Ok(Err(e)) => format!("{e:#}"),
                Err(e) => e.to_string(),
            };
            anyhow::bail!("{name} stopped: {reason}")
        }
    }
}

/// The first of several tasks to finish, with its name.
async fn first_to_finish(
    parts: Vec<(&'static str, &mut JoinHandle<anyhow::Result<()>>)>,
) -> (
    &'static str,
    Result<anyhow::Result<()>, tokio::task::JoinError>,
) {
    let futures = parts
        .into_iter()
        .map(|(name, handle)| Box::pin(async move { (name, handle.await) }));
    let (first, _, _) = futures_util::future::select_all(futures).await;
    first
}

/// The anomaly worker, subscribed; `/readyz` hears when its Case sync pauses.
async fn subscribe_anomaly(
    config: &AnomalyConfig,
    store: &SensorStore,
    bus: &Arc<dyn Bus>,
    readiness: &Readiness,
) -> anyhow::Result<AnomalyWorker> {
    let readiness = readiness.clone();
    Ok(
        AnomalyWorker::subscribe(config, store.clone(), Arc::clone(bus), move |ready| {
            readiness.set("salesforce_sync", ready)
        })
        .await?,
    )
}

async fn up(args: UpArgs) -> anyhow::Result<()> {
    let metrics = ecars_shared::metrics::install_recorder();
    let store = open_store(&args.database).await?;
    let readiness = Readiness::default();
    let in_process = args
        .kafka
        .brokers
        .is_none()
        .then(|| Arc::new(InProcessBus::new(args.bus_capacity as usize)));
    let bus: Arc<dyn Bus> = match &in_process {
        Some(bus) => bus.clone(),
        None => kafka_bus(&args.kafka, KafkaRole::Publisher).await?,
    };

    // Workers subscribe before ingest publishes, so nothing is published to nobody.
    let persist =
        PersistWorker::subscribe(&args.persist, store.clone(), bus.as_ref(), None).await?;
    let anomaly = subscribe_anomaly(&args.anomaly, &store, &bus, &readiness).await?;
    let relay = Relay::new(&args.relay, args.http.http_addr, Some(store.clone()))?;
    let ingest = BoundIngest::bind(&args.ingest, Arc::clone(&bus)).await?;
    let mqtt_addr = ingest.mqtt_addr()?;
    let http = bind_http(&args.http).await?;

    let shutdown = CancellationToken::new();
    let stop_ingest = CancellationToken::new();
    // In process, persist stops when the bus is closed and drained; on Kafka, what it has not
    // read stays in Kafka for the next start, so it stops on a token.
    let stop_persist = CancellationToken::new();
    let mut persist_task = {
        let token = if in_process.is_some() {
            CancellationToken::new()
        } else {
            stop_persist.clone()
        };
        tokio::spawn(async move { Ok(persist.run(token).await?) })
    };
    let mut anomaly_task = {
        let token = if in_process.is_some() {
            CancellationToken::new()
        } else {
            stop_persist.clone()
        };
        tokio::spawn(async move { Ok(anomaly.run(token).await?) })
    };
    let stop_relay = CancellationToken::new();
    let mut relay_task = {
        let (relay, bus, token) = (Arc::clone(&relay), Arc::clone(&bus), stop_relay.clone());
        tokio::spawn(async move { Ok(relay.feed(bus, token).await?) })
    };
    let mut ingest_task = {
        let token = stop_ingest.clone();
        tokio::spawn(async move {
            ingest.run(token).await;
            Ok(())
        })
    };
    let (stop_http, mut http_task) = spawn_http(
        http,
        ApiState {
            store: Some(store.clone()),
            bus: Some(Arc::clone(&bus)),
            metrics,
            readiness: readiness.clone(),
        },
        ecars_anomaly::cases_router(CaseOutbox::new(store.clone()))
            .merge(ecars_relay::router(Arc::clone(&relay))),
    );
    readiness.set("workers", true);

    let simulator_task = (args.simulate > 0).then(|| {
        let config = SimulatorConfig {
            vehicles: args.simulate,
            interval_ms: args.simulate_interval_ms,
            broker: format!("mqtt://{mqtt_addr}"),
            device_secret: args.ingest.device_secret_text().ok().flatten(),
            malfunction: args.simulate_malfunction.min(args.simulate),
            ..SimulatorConfig::default()
        };
        tokio::spawn(ecars_simulator::run(config, shutdown.clone()))
    });
    tracing::info!(
        database = store.backend(),
        bus = if in_process.is_some() {
            "in-process"
        } else {
            "kafka"
        },
        "ecars is up; Ctrl-C stops it after storing what was accepted"
    );

    let parts = vec![
        ("the persistence worker", &mut persist_task),
        ("the anomaly worker", &mut anomaly_task),
        ("the live relay", &mut relay_task),
        ("MQTT ingest", &mut ingest_task),
        ("the HTTP server", &mut http_task),
    ];
    run_until_signal(&shutdown, &readiness, parts).await?;
    tracing::info!("shutting down: no new readings, flushing what was accepted");
    if let Some(task) = simulator_task {
        let _ = task.await;
    }
    stop_ingest.cancel();
    ingest_task.await.context("ingest task")??;
    bus.close().await;
    stop_persist.cancel();
    persist_task.await.context("persist task")??;
    anomaly_task.await.context("anomaly task")??;
    stop_relay.cancel();
    relay_task.await.context("relay task")??;
    stop_http.cancel();
    http_task.await.context("http task")??;
    store.close().await;
    tracing::info!("stopped cleanly");
    Ok(())
}

async fn ingest(args: IngestArgs) -> anyhow::Result<()> {
    let metrics = ecars_shared::metrics::install_recorder();
    let bus = kafka_bus(&args.kafka, KafkaRole::Publisher).await?;
    let readiness = Readiness::default();
    let ingest = BoundIngest::bind(&args.ingest, Arc::clone(&bus)).await?;
    let http = bind_http(&args.http).await?;
    let (shutdown, stop_ingest) = (CancellationToken::new(), CancellationToken::new());
    let mut ingest_task = {
        let token = stop_ingest.clone();
        tokio::spawn(async move {
            ingest.run(token).await;
            Ok(())
        })
    };
    let (stop_http, mut http_task) = spawn_http(
        http,
        ApiState {
            store: None,
            bus: Some(Arc::clone(&bus)),
            metrics,
            readiness: readiness.clone(),
        },
        axum::Router::new(),
    );
    readiness.set("ingest", true);
    run_until_signal(
        &shutdown,
        &readiness,
        vec![
            ("MQTT ingest", &mut ingest_task),
            ("the HTTP server", &mut http_task),
        ],
    )
    .await?;
    tracing::info!("shutting down: no new readings, handing what was accepted to Kafka");
    stop_ingest.cancel();
    ingest_task.await.context("ingest task")??;
    bus.close().await;
    stop_http.cancel();
    http_task.await.context("http task")??;
    tracing::info!("stopped cleanly");
    Ok(())
}

async fn persist(args: PersistArgs) -> anyhow::Result<()> {
    let store = open_store(&args.database).await?;
    let bus = kafka_bus(&args.kafka, KafkaRole::Consumer).await?;
    let readiness = Readiness::default();
    let worker = PersistWorker::subscribe(&args.persist, store.clone(), bus.as_ref(), None).await?;
    let service = ConsumerService {
        name: "the persistence worker",
        store,
        bus,
        readiness,
        routes: axum::Router::new(),
    };
    service
        .run(
            &args.http,
            |stop| async move { Ok(worker.run(stop).await?) },
        )
        .await
}

async fn anomaly(args: AnomalyArgs) -> anyhow::Result<()> {
    let store = open_store(&args.database).await?;
    let bus = kafka_bus(&args.kafka, KafkaRole::Consumer).await?;
    let readiness = Readiness::default();
    let worker = subscribe_anomaly(&args.anomaly, &store, &bus, &readiness).await?;
    let service = ConsumerService {
        name: "the anomaly worker",
        routes: ecars_anomaly::cases_router(CaseOutbox::new(store.clone())),
        store,
        bus,
        readiness,
    };
    service
        .run(
            &args.http,
            |stop| async move { Ok(worker.run(stop).await?) },
        )
        .await
}

/// A scale-out service that consumes Kafka into the database (`ecars persist`, `ecars anomaly`):
/// its worker and the HTTP surface, until a signal; then the worker commits what it has and
/// stops.
struct ConsumerService {
    name: &'static str,
    store: SensorStore,
    bus: Arc<dyn Bus>,
    readiness: Readiness,
    routes: axum::Router,
}

impl ConsumerService {
    async fn run<F, Fut>(self, http: &HttpConfig, worker: F) -> anyhow::Result<()>
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let metrics = ecars_shared::metrics::install_recorder();
        let http = bind_http(http).await?;
        let (shutdown, stop_worker) = (CancellationToken::new(), CancellationToken::new());
        let mut worker_task = tokio::spawn(worker(stop_worker.clone()));
        let (stop_http, mut http_task) = spawn_http(
            http,
            ApiState {
                store: Some(self.store.clone()),
                bus: Some(Arc::clone(&self.bus)),
                metrics,
                readiness: self.readiness.clone(),
            },
            self.routes,
        );
        self.readiness.set("worker", true);
        run_until_signal(
            &shutdown,
            &self.readiness,
            vec![
                (self.name, &mut worker_task),
                ("the HTTP server", &mut http_task),
            ],
        )
        .await?;
        tracing::info!("shutting down: committing the current batch and its offsets");
        stop_worker.cancel();
        worker_task.await.context("worker task")??;
        stop_http.cancel();
        http_task.await.context("http task")??;
        self.store.close().await;
        tracing::info!("stopped cleanly");
        Ok(())
    }
}

async fn relay(args: RelayArgs) -> anyhow::Result<()> {
    let store = open_store(&args.database).await?;
    let bus = kafka_bus(&args.kafka, KafkaRole::Consumer).await?;
    let relay = Relay::new(&args.relay, args.http.http_addr, Some(store.clone()))?;
    let service = ConsumerService {
        name: "the live relay",
        // The dashboard shows the case outbox too.
        routes: ecars_relay::router(Arc::clone(&relay))
            .merge(ecars_anomaly::cases_router(CaseOutbox::new(store.clone()))),
        store,
        bus: Arc::clone(&bus),
        readiness: Readiness::default(),
    };
    service
        .run(&args.http, |stop| async move {
            Ok(relay.feed(bus, stop).await?)
        })
        .await
}

async fn cases(args: CasesArgs) -> anyhow::Result<()> {
    let database = match &args.action {
        CasesAction::List { database, .. } | CasesAction::Retry { database, .. } => database,
    };
    let store = open_store(database).await?;
    let outbox = CaseOutbox::new(store.clone());
    match args.action {
        CasesAction::List {
            status,
            limit,
            json,
            ..
        } => {
            let rows = outbox.list(status, limit.clamp(1, 10_000)).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&rows)?);
            } else {
                println!(
                    "{:<64} {:<17} {:<20} {:<14} {:<18} {:>8}  LAST ERROR",
                    "KEY", "VIN", "RULE", "STATUS", "SALESFORCE ID", "ATTEMPTS"
                );
                for r in rows {
                    println!(
                        "{:<64} {:<17} {:<20} {:<14} {:<18} {:>8}  {}",
                        r.key,
                        r.vin,
                        r.rule,
                        r.status,
                        r.salesforce_id.as_deref().unwrap_or("-"),
                        r.attempts,
                        r.last_error.as_deref().unwrap_or("")
                    );
                }
            }
        }
        CasesAction::Retry { key, .. } => {
            anyhow::ensure!(
                outbox.retry(&key, chrono::Utc::now()).await?,
                "no failed case with key {key:?} (see `ecars cases list --status failed`)"
            );
            println!("{key}: queued for sync");
        }
    }
    store.close().await;
    Ok(())
}

async fn topics(args: TopicsArgs) -> anyhow::Result<()> {
    let mut kafka = args.kafka.clone();
    // Describing must not change the cluster.
    kafka.create_topics = false;
    anyhow::ensure!(
        kafka.brokers.is_some(),
        "set --kafka-brokers / ECARS_KAFKA_BROKERS"
    );
    let bus = KafkaBus::connect(&kafka)
        .await
        .context("cannot connect to Kafka")?;
    let topics = bus.describe_topics().await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&topics)?);
        return Ok(());
    }
    for t in topics {
        let partitions = t
            .partitions
            .map_or("not created yet".to_owned(), |n| n.to_string());
        println!("{}\n  partitions: {partitions}\n  key: {}\n  headers: CloudEvents binary mode, ce_type={}\n  value: {}\n", t.topic, t.key, t.event_type, t.value);
    }
    Ok(())
}

/// Waits for SIGINT or SIGTERM, then cancels `token`.
async fn cancel_on_signal(token: CancellationToken) {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(signal) => signal,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for SIGTERM");
                    let _ = ctrl_c.await;
                    token.cancel();
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    token.cancel();
}
