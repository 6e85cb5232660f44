//! `ecars`: one binary for every service of ecars-realtime. It only parses settings and wires the
//! service crates together: broker → bus → workers → sinks.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ecars_api::{HttpConfig, Readiness};
use ecars_ingest::{BoundIngest, IngestConfig};
use ecars_persist::{DatabaseConfig, PersistConfig, PersistWorker, SensorStore};
use ecars_shared::bus::{Bus, InProcessBus};
use ecars_shared::config::LogConfig;
use ecars_simulator::SimulatorConfig;
use tokio_util::sync::CancellationToken;

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
    /// Run everything in one process: MQTT broker, in-process bus, persistence and HTTP.
    Up(UpArgs),
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
struct MigrateArgs {
    #[command(flatten)]
    database: DatabaseConfig,
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    cli.log.init()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Up(args) => up(args).await,
            Command::Migrate(args) => {
                let store = open_store(&args.database).await?;
                store.close().await;
                tracing::info!("migrations applied");
                Ok(())
            }
            Command::Simulate(config) => {
                let shutdown = CancellationToken::new();
                tokio::spawn(cancel_on_signal(shutdown.clone()));
                ecars_simulator::run(config, shutdown).await?;
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

async fn up(args: UpArgs) -> anyhow::Result<()> {
    let metrics = ecars_shared::metrics::install_recorder();
    let store = open_store(&args.database).await?;
    let readiness = Readiness::default();
    let bus = Arc::new(InProcessBus::new(args.bus_capacity as usize));
    let dyn_bus: Arc<dyn Bus> = bus.clone();

    // Workers subscribe before ingest publishes, so nothing is published to nobody.
    let persist =
        PersistWorker::subscribe(&args.persist, store.clone(), dyn_bus.as_ref(), None).await?;
    let ingest = BoundIngest::bind(&args.ingest, Arc::clone(&dyn_bus)).await?;
    let mqtt_addr = ingest.mqtt_addr()?;
    let http = tokio::net::TcpListener::bind(args.http.http_addr)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (--http-addr / ECARS_HTTP_ADDR)",
                args.http.http_addr
            )
        })?;

    let shutdown = CancellationToken::new();
    let stop_ingest = CancellationToken::new();
    let stop_http = CancellationToken::new();
    // Persist stops when the bus is closed and drained, not on a token.
    let mut persist_task = tokio::spawn(persist.run(CancellationToken::new()));
    readiness.set("persist", true);
    let mut ingest_task = tokio::spawn(ingest.run(stop_ingest.clone()));
    readiness.set("ingest", true);
    let router = ecars_api::router(ecars_api::ApiState {
        store: store.clone(),
        metrics,
        readiness: readiness.clone(),
    });
    let mut http_task = tokio::spawn(ecars_api::serve(http, router, stop_http.clone()));

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
        "ecars is up; Ctrl-C stops it after storing what was accepted"
    );

    // A part that stops on its own is fatal: say which, and exit non-zero so a supervisor
    // restarts the process.
    let failure = tokio::select! {
        _ = cancel_on_signal(shutdown.clone()) => None,
        result = &mut persist_task => Some(format!("the persistence worker stopped: {result:?}")),
        result = &mut ingest_task => Some(format!("MQTT ingest stopped: {result:?}")),
        result = &mut http_task => Some(format!("the HTTP server stopped: {result:?}")),
    };
    if let Some(failure) = failure {
        readiness.set("failed", false);
        shutdown.cancel();
        stop_ingest.cancel();
        bus.close();
        anyhow::bail!("{failure}");
    }
    tracing::info!("shutting down: no new readings, flushing what was accepted");
    readiness.set("draining", false);
    if let Some(task) = simulator_task {
        let _ = task.await;
    }
    stop_ingest.cancel();
    ingest_task.await.context("ingest task")?;
    bus.close();
    persist_task
        .await
        .context("persist task")?
        .context("persistence worker")?;
    stop_http.cancel();
    http_task
        .await
        .context("http task")?
        .context("HTTP server")?;
    store.close().await;
    tracing::info!("stopped cleanly");
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
