//! The composition of ecars: one [`App`], built from [`Settings`], for every way the product
//! runs.
//!
//! A part runs when its settings are present: `ecars up` has them all (on the in-process bus
//! and SQLite by default), `ecars ingest` only ingest's, `ecars persist` only the persistence
//! worker's, and so on; the end-to-end tests build the same [`App`]. Data flows top to bottom:
//!
//! ```text
//! MQTT ingest ──▶ bus (in process, or Kafka) ──▶ persistence worker ──▶ database
//!                                            ├─▶ anomaly worker ──▶ case outbox ──▶ Salesforce
//!                                            └─▶ live relay ──▶ WebSockets
//! HTTP API ◀── database, bus, readiness, metrics
//! ```
//!
//! In process, the anomaly worker reads the batches the persistence worker committed rather than
//! the bus, so a car's PUBACK waits for one commit; it stores how far it got with its states and
//! reads the rows after that again after a crash.
//!
//! Parts stop in the reverse order of the data: the simulator and ingest first (no new
//! readings), then the bus is closed, the workers drain it into the database, and the relay
//! and the HTTP listener go last.

pub mod commands;

pub use ecars_anomaly as anomaly;
pub use ecars_api as api;
pub use ecars_bus as bus;
pub use ecars_db as db;
pub use ecars_ingest as ingest;
pub use ecars_model as model;
pub use ecars_persist as persist;
pub use ecars_relay as relay;
pub use ecars_runtime as runtime;
pub use ecars_simulator as simulator;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use ecars_anomaly::{AnomalyConfig, AnomalyError, AnomalyWorker};
use ecars_api::access::HttpAccess;
use ecars_api::{ApiState, HttpConfig};
use ecars_bus::kafka::{KafkaBus, KafkaConfig};
use ecars_bus::{Bus, BusError};
use ecars_db::{Database, DatabaseConfig, DbError};
use ecars_ingest::{BoundIngest, IngestConfig, IngestError};
use ecars_model::api_key::{ApiKeyHolder, ApiKeys, Scope, Scopes};
use ecars_model::record::published;
use ecars_model::{Connectivity, ConnectivityEvent, DisconnectReason};
use ecars_persist::{CommitObserver, PersistConfig, PersistError, PersistWorker};
use ecars_relay::{Relay, RelayConfig};
use ecars_runtime::reloading::Reloading;
use ecars_runtime::settings::{parse_duration, parse_millis, ConfigError};
use ecars_runtime::supervisor::SupervisorError;
use ecars_runtime::tls::{ServerTls, TlsConfig};
use ecars_runtime::{Readiness, Supervisor};
use ecars_simulator::SimulatorConfig;
use tokio::net::TcpListener;

/// How long a service waits at start for a database that does not accept connections yet.
const DATABASE_START_WAIT: Duration = Duration::from_secs(60);

/// The in-process bus of `ecars up`.
#[derive(Clone, Debug, Args)]
pub struct InProcessBusConfig {
    /// Records each in-process bus queue holds before publishers wait (backpressure).
    #[arg(long = "bus-capacity", env = "ECARS_BUS_CAPACITY", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub capacity: u32,
}

/// Simulated cars inside `ecars up` (demos).
#[derive(Clone, Debug, Args)]
pub struct SimulationConfig {
    /// Also drive this many simulated cars inside the process.
    #[arg(long = "simulate", env = "ECARS_SIMULATE", default_value_t = 0)]
    pub vehicles: u32,
    /// How many of the simulated cars malfunction.
    #[arg(
        long = "simulate-malfunction",
        env = "ECARS_SIMULATE_MALFUNCTION",
        default_value_t = 1
    )]
    pub malfunction: u32,
    /// Time between two readings of a simulated car (`1s`, `200ms`).
    #[arg(long = "simulate-interval", env = "ECARS_SIMULATE_INTERVAL", default_value = "1s", value_parser = parse_duration)]
    pub interval: Duration,
    /// The same in whole milliseconds, as earlier versions took it; wins over
    /// --simulate-interval.
    #[arg(
        long = "simulate-interval-ms",
        env = "ECARS_SIMULATE_INTERVAL_MS",
        value_parser = parse_millis
    )]
    pub interval_ms: Option<Duration>,
}

impl Default for SimulationConfig {
    fn default() -> Self {
        ecars_runtime::settings::defaults()
    }
}

/// Every part's settings; a part runs when its settings are present.
#[derive(Clone, Debug)]
pub struct Settings {
    /// The HTTP listener (every service has one: health, readiness, metrics).
    pub http: HttpConfig,
    /// Kafka; without brokers, the in-process bus (only where ingest and the workers run in
    /// one process).
    pub kafka: KafkaConfig,
    /// The in-process bus.
    pub in_process_bus: InProcessBusConfig,
    /// The database (every part but ingest needs one).
    pub database: Option<DatabaseConfig>,
    /// MQTT ingest.
    pub ingest: Option<IngestConfig>,
    /// The persistence worker.
    pub persist: Option<PersistConfig>,
    /// The anomaly worker.
    pub anomaly: Option<AnomalyConfig>,
    /// The live relay (and the dashboard).
    pub relay: Option<RelayConfig>,
    /// Simulated cars (needs ingest).
    pub simulation: Option<SimulationConfig>,
    /// TLS of the listeners that offer it (MQTT over TLS).
    pub tls: TlsConfig,
}

impl Settings {
    /// `ecars up`: every part, with these settings.
    #[allow(clippy::too_many_arguments)]
    pub fn everything(
        http: HttpConfig,
        kafka: KafkaConfig,
        in_process_bus: InProcessBusConfig,
        database: DatabaseConfig,
        ingest: IngestConfig,
        persist: PersistConfig,
        anomaly: AnomalyConfig,
        relay: RelayConfig,
        simulation: SimulationConfig,
    ) -> Settings {
        Settings {
            http,
            kafka,
            in_process_bus,
            database: Some(database),
            ingest: Some(ingest),
            persist: Some(persist),
            anomaly: Some(anomaly),
            relay: Some(relay),
            simulation: (simulation.vehicles > 0).then_some(simulation),
            tls: TlsConfig::default(),
        }
    }

    /// A service with no part yet (add the parts it runs).
    pub fn service(http: HttpConfig, kafka: KafkaConfig) -> Settings {
        Settings {
            http,
            kafka,
            in_process_bus: ecars_runtime::settings::defaults(),
            database: None,
            ingest: None,
            persist: None,
            anomaly: None,
            relay: None,
            simulation: None,
            tls: TlsConfig::default(),
        }
    }
}

/// Hooks for benchmarks and tests, beyond what settings say.
#[derive(Debug, Default)]
pub struct Hooks {
    /// Told the readings of each committed batch (publish-to-row latency).
    pub on_commit: Option<CommitObserver>,
}

/// Why the application did not start, or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    /// A setting is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The database refused.
    #[error("cannot use the database {url}: {source}")]
    Database {
        /// `DATABASE_URL`, password hidden.
        url: String,
        /// Why.
        #[source]
        source: DbError,
    },
    /// The bus refused.
    #[error("cannot use the bus: {0}")]
    Bus(#[from] BusError),
    /// A service that needs Kafka has no brokers.
    #[error("this service runs on Kafka: set --kafka-brokers / ECARS_KAFKA_BROKERS (or use `ecars up` for the embedded bus)")]
    NeedsKafka,
    /// A part that needs the database has none.
    #[error("{0} needs a database (--database-url / DATABASE_URL)")]
    NeedsDatabase(&'static str),
    /// MQTT ingest could not start.
    #[error(transparent)]
    Ingest(#[from] IngestError),
    /// The persistence worker could not start.
    #[error(transparent)]
    Persist(#[from] PersistError),
    /// The anomaly worker could not start.
    #[error(transparent)]
    Anomaly(#[from] AnomalyError),
    /// An HTTP listener could not bind.
    #[error("cannot listen on {addr} ({setting}): {source}")]
    HttpBind {
        /// The setting naming it.
        setting: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A part stopped on its own, or failed while stopping.
    #[error(transparent)]
    Stopped(#[from] SupervisorError),
}

/// The composed application: its parts running under a supervisor.
#[derive(Debug)]
pub struct App {
    supervisor: Supervisor,
    db: Option<Database>,
    bus: Bus,
    relay: Option<Arc<Relay>>,
    mqtt_addr: Option<SocketAddr>,
    mqtt_ws_addr: Option<SocketAddr>,
    mqtt_tls_addr: Option<SocketAddr>,
    mqtt_wss_addr: Option<SocketAddr>,
    http_addr: SocketAddr,
    admin_addr: SocketAddr,
}

/// Connects and migrates, waiting up to a minute for a database that is still starting.
pub async fn open_database(config: &DatabaseConfig) -> Result<Database, AppError> {
    let failed = |source| AppError::Database {
        url: ecars_db::redact_url(&config.url),
        source,
    };
    let db = Database::connect_lazy(&config.url).map_err(failed)?;
    let deadline = tokio::time::Instant::now() + DATABASE_START_WAIT;
    loop {
        match db.migrate().await {
            Ok(()) => return Ok(db),
            Err(e) if e.is_transient() && tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %e, backend = db.backend(), "waiting for the database to accept connections");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
            Err(e) => return Err(failed(e)),
        }
    }
}

/// Describes every metric of every part to the process's recorder (installing it).
pub fn install_metrics() -> metrics_exporter_prometheus::PrometheusHandle {
    let handle = ecars_runtime::metrics::install_recorder();
    ecars_ingest::metrics::describe();
    ecars_anomaly::metrics::describe();
    ecars_relay::metrics::describe();
    ecars_api::metrics::describe();
    handle
}

impl App {
    /// Checks the settings, connects what the parts need and starts them.
    pub async fn build(settings: Settings) -> Result<App, AppError> {
        App::build_with(settings, Hooks::default()).await
    }

    /// [`App::build`] with hooks for benchmarks and tests.
    pub async fn build_with(settings: Settings, hooks: Hooks) -> Result<App, AppError> {
        let metrics = install_metrics();
        let readiness = Readiness::default();
        let db = match &settings.database {
            Some(config) => Some(open_database(config).await?),
            None => None,
        };
        let needs_db = |part: &'static str| db.clone().ok_or(AppError::NeedsDatabase(part));
        let bus = connect_bus(&settings).await?;

        // Workers subscribe before ingest publishes, so nothing is published to nobody.
        let in_process = settings.kafka.brokers.is_none();
        // In process, the anomaly worker reads what the persistence worker committed instead
        // of a queue of its own: a car's PUBACK waits for one commit, not two, and the
        // detector's states are committed at their own pace (a crash replays the rows stored
        // after its cursor). A few batches in hand; more hold the persistence worker back.
        let (committed, committed_feed) = match (in_process, &settings.persist, &settings.anomaly) {
            (true, Some(_), Some(_)) => {
                let (feed, committed) = tokio::sync::mpsc::channel(4);
                (Some(committed), Some(feed))
            }
            _ => (None, None),
        };
        let persist = match &settings.persist {
            Some(config) => Some(
                PersistWorker::subscribe(
                    config,
                    needs_db("the persistence worker")?,
                    &bus,
                    hooks.on_commit,
                )
                .await
                .map(|worker| match committed_feed {
                    Some(feed) => worker.feeding(feed),
                    None => worker,
                })?,
            ),
            None => None,
        };
        let anomaly = match &settings.anomaly {
            Some(config) => {
                let sync_readiness = readiness.clone();
                let db = needs_db("the anomaly worker")?;
                let readiness = move |ready| sync_readiness.set("salesforce_sync", ready);
                Some(match committed {
                    Some(committed) => {
                        AnomalyWorker::after_persist(config, db, bus.clone(), committed, readiness)?
                    }
                    None => AnomalyWorker::subscribe(config, db, bus.clone(), readiness).await?,
                })
            }
            None => None,
        };
        let relay = match &settings.relay {
            Some(config) => Some((
                Relay::new(config, settings.http.http_addr, db.clone())?,
                Relay::tail(&bus).await?,
            )),
            None => None,
        };
        let tls = ServerTls::from_config(&settings.tls).map_err(ConfigError::from)?;
        let ingest = match &settings.ingest {
            Some(config) => Some(BoundIngest::bind(config, bus.clone(), tls.as_ref()).await?),
            None => None,
        };
        let https = match (&tls, settings.http.https) {
            (_, false) => None,
            (Some(tls), true) => Some(
                tls.without_client_auth()
                    .map_err(ConfigError::from)?
                    .acceptor(),
            ),
            (None, true) => {
                return Err(ConfigError::Invalid {
                    setting: "--http-tls / ECARS_HTTP_TLS",
                    reason: "HTTPS needs a certificate: set --tls-cert-file and --tls-key-file"
                        .into(),
                }
                .into())
            }
        };
        let (mqtt_addr, mqtt_ws_addr, mqtt_tls_addr, mqtt_wss_addr) =
            match (&ingest, &settings.ingest) {
                (Some(ingest), Some(config)) => {
                    let bound = |setting, addr, local: std::io::Result<SocketAddr>| {
                        local.map_err(|source| IngestError::Bind {
                            setting,
                            addr,
                            source,
                        })
                    };
                    (
                        Some(bound(
                            "--mqtt-addr / ECARS_MQTT_ADDR",
                            config.mqtt_addr,
                            ingest.mqtt_addr(),
                        )?),
                        Some(bound(
                            "--mqtt-ws-addr / ECARS_MQTT_WS_ADDR",
                            config.mqtt_ws_addr,
                            ingest.ws_addr(),
                        )?),
                        ingest
                            .tls_addr()
                            .map(|local| {
                                bound(
                                    "--mqtt-tls-addr / ECARS_MQTT_TLS_ADDR",
                                    config.mqtt_tls_addr,
                                    local,
                                )
                            })
                            .transpose()?,
                        ingest
                            .wss_addr()
                            .map(|local| {
                                bound(
                                    "--mqtt-wss-addr / ECARS_MQTT_WSS_ADDR",
                                    config.mqtt_wss_addr,
                                    local,
                                )
                            })
                            .transpose()?,
                    )
                }
                _ => (None, None, None, None),
            };
        let (access, api_keys) =
            http_access(&settings.http, settings.http.http_addr, relay.as_ref())?;
        let (http, http_addr) =
            bind_http(settings.http.http_addr, "--http-addr / ECARS_HTTP_ADDR").await?;
        let (admin, admin_addr) =
            bind_http(settings.http.admin_addr, "--admin-addr / ECARS_ADMIN_ADDR").await?;

        // Parts in the order they stop: sources first, sinks last.
        let mut supervisor = Supervisor::new(readiness.clone());
        if let (Some(simulation), Some(addr), Some(ingest_config)) =
            (&settings.simulation, mqtt_addr, &settings.ingest)
        {
            let config = SimulatorConfig {
                vehicles: simulation.vehicles,
                interval: simulation.interval_ms.unwrap_or(simulation.interval),
                interval_ms: None,
                broker: format!("mqtt://{addr}"),
                device_secret: ingest_config.device_secret_text()?,
                malfunction: simulation.malfunction.min(simulation.vehicles),
                ..SimulatorConfig::default()
            };
            supervisor.spawn_auxiliary("the simulator", move |stop| async move {
                ecars_simulator::run(config, stop).await.map(|_| ())
            });
        }
        let ingest_runs = ingest.is_some();
        if let Some(tls) = tls.filter(|_| ingest.is_some() || https.is_some()) {
            let interval = settings.http.reload_interval;
            supervisor.spawn_auxiliary("the TLS certificate reloader", move |stop| {
                tls.watch(interval, stop)
            });
        }
        if let Some(revoked) = ingest.as_ref().and_then(|i| i.revoked()).cloned() {
            let interval = settings.http.reload_interval;
            supervisor.spawn_auxiliary("the revocations reloader", move |stop| {
                revoked.watch(interval, ecars_ingest::revocation::Revoked::parse, stop)
            });
        }
        if let Some(accounts) = ingest.as_ref().and_then(|i| i.accounts()).cloned() {
            let interval = settings.http.reload_interval;
            supervisor.spawn_auxiliary("the MQTT accounts reloader", move |stop| {
                accounts.watch(interval, ecars_ingest::accounts::MqttAccounts::parse, stop)
            });
        }
        // Where ingest shares the process with the database (`ecars up`, one node per bus).
        // Read before ingest accepts anyone: a car that reconnects at once has a new session,
        // which must not be taken for one left open.
        if let (Some(config), Some(db), true) =
            (&settings.ingest, &db, ingest.is_some() && in_process)
        {
            let node = config.node();
            let open = sessions_left_open(db, &node).await;
            if !open.is_empty() {
                let bus = bus.clone();
                supervisor.spawn_auxiliary("ending the sessions a crash left open", move |_| {
                    end_sessions(bus, node, open)
                });
            }
        }
        if let Some(ingest) = ingest {
            readiness.set("ingest", true);
            let run = |stop| async move {
                ingest.run(stop).await;
                Ok::<(), std::convert::Infallible>(())
            };
            if in_process {
                // In process a car's PUBACK waits for the workers' commits: ingest stops
                // reading, and its last readings are committed by the workers while the bus
                // closes; then it is done.
                supervisor.spawn_joined_later("MQTT ingest", run);
            } else {
                supervisor.spawn("MQTT ingest", run);
            }
        }
        let close_bus = {
            let bus = bus.clone();
            async move { bus.close().await }
        };
        // In process, the workers stop once they drained the closed bus, so it closes first. On
        // Kafka they stop on their own (what they did not read stays in Kafka) and may still
        // publish (the anomaly worker's events), so it closes after them, flushing the producer.
        let mut close_bus = Some(close_bus);
        if in_process {
            if let Some(close) = close_bus.take() {
                supervisor.then("close the bus", close);
            }
            if ingest_runs {
                supervisor.join("MQTT ingest");
            }
        }
        if let Some(persist) = persist {
            readiness.set("persist", true);
            supervisor.spawn("the persistence worker", move |stop| async move {
                persist
                    .run(if in_process { Default::default() } else { stop })
                    .await
            });
        }
        if let Some(anomaly) = anomaly {
            readiness.set("anomaly", true);
            supervisor.spawn("the anomaly worker", move |stop| async move {
                anomaly
                    .run(if in_process { Default::default() } else { stop })
                    .await
            });
        }
        if let Some(close) = close_bus.take() {
            supervisor.then("close the bus", close);
        }
        let state_access = access.clone();
        let state = ApiState {
            db: db.clone(),
            bus: Some(bus.clone()),
            bus_need: ecars_api::ready::BusNeed::of(ingest_runs, relay.is_some()),
            metrics,
            readiness: readiness.clone(),
            minter: relay.as_ref().and_then(|(r, _)| r.minter().cloned()),
            access,
            dashboard: relay
                .is_some()
                .then(|| ecars_api::dashboard_page(&settings.http)),
            openapi: ecars_api::openapi::document(relay.as_ref().map(|_| ecars_relay::openapi()))
                .into(),
        };
        let admin_routes = ecars_api::admin_router(state.clone());
        let mut routes = ecars_api::router(state);
        let relay = match relay {
            Some((relay, tail)) => {
                relay.accept_api_keys(Arc::new(KeysForLiveSockets(state_access.clone())));
                readiness.set("relay", true);
                routes = routes.merge(ecars_relay::router(Arc::clone(&relay)));
                let feeding = Arc::clone(&relay);
                supervisor.spawn("the live relay", move |stop| feeding.feed(tail, stop));
                Some(relay)
            }
            None => None,
        };
        // Every route's requests counted and timed, the relay's included.
        let routes = routes.route_layer(axum::middleware::from_fn(ecars_api::metrics::track));
        let limits = settings.http.limits();
        supervisor.spawn("the HTTP server", move |stop| {
            ecars_api::serve::serve(http, routes, limits, https, stop)
        });
        if let Some((keys, path)) = api_keys {
            let interval = settings.http.reload_interval;
            supervisor.spawn_auxiliary("the API keys reloader", move |stop| {
                keys.watch(interval, parse_api_keys, stop)
            });
            tracing::info!(file = %path.display(), "API keys from the file, re-read as it changes");
        }
        if let Some(db) = db.clone() {
            supervisor.then("close the database", async move { db.close().await });
        }
        // Last: `/readyz` and `/metrics` answer until the rest has stopped.
        supervisor.spawn("the admin HTTP server", move |stop| {
            ecars_api::serve::serve(admin, admin_routes, limits, None, stop)
        });
        tracing::info!(
            database = db.as_ref().map_or("none", Database::backend),
            bus = if in_process { "in-process" } else { "kafka" },
            mqtt = ?mqtt_addr,
            mqtt_tls = ?mqtt_tls_addr,
            http = %http_addr,
            admin = %admin_addr,
            "ecars is up; Ctrl-C or SIGTERM stops it after storing what was accepted"
        );
        Ok(App {
            supervisor,
            db,
            bus,
            relay,
            mqtt_addr,
            mqtt_ws_addr,
            mqtt_tls_addr,
            mqtt_wss_addr,
            http_addr,
            admin_addr,
        })
    }

    /// The MQTT listener, when ingest runs (useful with port 0).
    pub fn mqtt_addr(&self) -> Option<SocketAddr> {
        self.mqtt_addr
    }

    /// The MQTT-over-WebSocket listener, when ingest runs.
    pub fn mqtt_ws_addr(&self) -> Option<SocketAddr> {
        self.mqtt_ws_addr
    }

    /// The MQTT-over-TLS listener, when ingest runs with a certificate.
    pub fn mqtt_tls_addr(&self) -> Option<SocketAddr> {
        self.mqtt_tls_addr
    }

    /// The MQTT-over-secure-WebSocket listener, when ingest runs with a certificate.
    pub fn mqtt_wss_addr(&self) -> Option<SocketAddr> {
        self.mqtt_wss_addr
    }

    /// The public HTTP listener.
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// The internal listener (`/healthz`, `/readyz`, `/metrics`).
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_addr
    }

    /// The database, when a part uses one.
    pub fn database(&self) -> Option<&Database> {
        self.db.as_ref()
    }

    /// The bus.
    pub fn bus(&self) -> &Bus {
        &self.bus
    }

    /// The live relay, when it runs.
    pub fn relay(&self) -> Option<&Arc<Relay>> {
        self.relay.as_ref()
    }

    /// Runs until `shutdown` completes, then stops every part in order; or until a part stops
    /// on its own, which is an error naming it.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), AppError> {
        self.supervisor.run_until(shutdown).await?;
        tracing::info!("stopped cleanly");
        Ok(())
    }
}

/// The HTTP API's credentials, as the relay asks about them for a live socket.
#[derive(Debug)]
struct KeysForLiveSockets(HttpAccess);

impl ecars_relay::LiveKeys for KeysForLiveSockets {
    fn required(&self) -> bool {
        self.0.required()
    }

    fn check(
        &self,
        presented: &str,
        vins: Option<&[ecars_model::Vin]>,
    ) -> Result<(), ecars_model::relay_token::TokenError> {
        use ecars_api::access::{Need, Refusal};
        use ecars_model::relay_token::TokenError;
        let refused = |refusal: Refusal, what: String| match refusal {
            Refusal::Missing => TokenError::Missing,
            Refusal::Invalid => TokenError::Invalid,
            Refusal::NotGranted(_) => TokenError::WrongVin(what),
        };
        match vins {
            None => self
                .0
                .check(Some(presented), Need::Scope(Scope::FleetRead))
                .map(|_| ())
                .map_err(|r| refused(r, "the whole fleet".into())),
            Some(vins) => vins.iter().try_for_each(|vin| {
                self.0
                    .check(Some(presented), Need::Vehicle(vin))
                    .map(|_| ())
                    .map_err(|r| refused(r, vin.to_string()))
            }),
        }
    }
}

/// The sessions this ingest node left open when it stopped without ending them (`kill -9`, a
/// lost machine): its cars still online in `vehicle_state`, each with its session. Where the
/// database cannot be read soon, none (logged): a start does not wait for it.
async fn sessions_left_open(db: &Database, node: &str) -> Vec<(ecars_model::Vin, uuid::Uuid)> {
    let states = db.vehicle_states();
    match tokio::time::timeout(Duration::from_secs(5), states.online_on_node(node)).await {
        Ok(Ok(open)) => open,
        Ok(Err(error)) => {
            tracing::warn!(%error, node, "could not read the sessions a crash may have left open");
            Vec::new()
        }
        Err(_) => {
            tracing::warn!(
                node,
                "could not read the sessions a crash may have left open in 5 s"
            );
            Vec::new()
        }
    }
}

/// Ends the sessions [`sessions_left_open`] found: a `disconnected` event (`server_shutdown`,
/// at the time of this start) for each, through the bus like any other, so the relay and
/// other readers see it too. A car that reconnected since has a newer session, which the event
/// does not override.
async fn end_sessions(
    bus: Bus,
    node: String,
    open: Vec<(ecars_model::Vin, uuid::Uuid)>,
) -> Result<(), std::convert::Infallible> {
    tracing::info!(
        cars = open.len(),
        node,
        "ending the sessions a crash left open"
    );
    let now = chrono::Utc::now();
    for (vin, session_id) in open {
        let ended = ConnectivityEvent {
            event_id: uuid::Uuid::now_v7(),
            vin,
            state: Connectivity::Disconnected,
            reason: Some(DisconnectReason::ServerShutdown),
            session_id,
            node: node.clone(),
            // Not kept in the car's state; the session id names the connection.
            client_id: String::new(),
            time: now,
        };
        if let Err(error) = bus.publish(ended).await {
            tracing::warn!(%error, "could not end the sessions a crash left open");
            break;
        }
    }
    Ok(())
}

async fn bind_http(
    addr: SocketAddr,
    setting: &'static str,
) -> Result<(TcpListener, SocketAddr), AppError> {
    let failed = |source| AppError::HttpBind {
        setting,
        addr,
        source,
    };
    let listener = TcpListener::bind(addr).await.map_err(failed)?;
    let local = listener.local_addr().map_err(failed)?;
    Ok((listener, local))
}

fn parse_api_keys(text: &str) -> Result<ApiKeys, ecars_model::api_key::ApiKeysError> {
    ApiKeys::parse(text)
}

/// Who may call the `/v1` routes of the listener on `http_addr`, and the keys file to watch.
#[allow(clippy::type_complexity)]
fn http_access(
    http: &HttpConfig,
    http_addr: SocketAddr,
    relay: Option<&(Arc<Relay>, ecars_relay::Tails)>,
) -> Result<(HttpAccess, Option<(Reloading<ApiKeys>, PathBuf)>), AppError> {
    let keys = match &http.api_keys_file {
        Some(path) => Some(
            Reloading::load(path, "api_keys", parse_api_keys).map_err(|e| {
                ConfigError::Invalid {
                    setting: "ECARS_API_KEYS_FILE",
                    reason: e.to_string(),
                }
            })?,
        ),
        None => None,
    };
    let relay = relay.map(|(relay, _)| relay);
    let mut fixed = ApiKeys::default();
    if let Some(key) = relay.and_then(|r| r.api_key()) {
        fixed.insert(
            key,
            ApiKeyHolder {
                name: "ECARS_RELAY_API_KEY".into(),
                scopes: Scopes::default().with(Scope::RelayTokensMint),
            },
        );
    }
    let tokens = relay
        .and_then(|r| r.minter())
        .map(|m| m.authority().clone());
    let loopback = http_addr.ip().is_loopback();
    let required = keys.is_some()
        || !fixed.is_empty()
        || tokens.is_some()
        || !(loopback || http.allow_anonymous_api);
    if !required && !loopback {
        tracing::warn!(%http_addr, "ECARS_API_ALLOW_ANONYMOUS: /v1 is open to anyone who reaches this address");
    } else if required && keys.is_none() {
        tracing::warn!(%http_addr, "credentials are required but there is no ECARS_API_KEYS_FILE: /v1 accepts only relay tokens and ECARS_RELAY_API_KEY");
    }
    let watched = keys.clone().zip(http.api_keys_file.clone());
    Ok((HttpAccess::new(keys, fixed, tokens, required), watched))
}

/// The in-process bus where ingest and the workers share the process and no brokers are set;
/// Kafka otherwise (with the disk spool where ingest publishes).
async fn connect_bus(settings: &Settings) -> Result<Bus, AppError> {
    if settings.kafka.brokers.is_none() {
        let embedded = settings.ingest.is_some() && settings.persist.is_some();
        if !embedded {
            return Err(AppError::NeedsKafka);
        }
        return Ok(Bus::in_process(settings.in_process_bus.capacity as usize));
    }
    let kafka = if settings.ingest.is_some() {
        KafkaBus::connect_with_spool(&settings.kafka).await?
    } else {
        KafkaBus::connect(&settings.kafka).await?
    };
    // Other teams find every documented topic before the first record; streams used later are
    // created when first used.
    let topics: Vec<&'static str> = published().iter().map(|info| info.topic).collect();
    kafka.ensure_topics(&topics).await?;
    Ok(Bus::new(kafka))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every settings struct takes its defaults from its flags; one without a default for a
    /// setting would panic here rather than at a user's start.
    #[test]
    fn every_part_has_its_defaults() {
        let _: HttpConfig = ecars_runtime::settings::defaults();
        let _: KafkaConfig = ecars_runtime::settings::defaults();
        let _: DatabaseConfig = ecars_runtime::settings::defaults();
        let in_process: InProcessBusConfig = ecars_runtime::settings::defaults();
        assert_eq!(in_process.capacity, 10_000);
        assert_eq!(
            IngestConfig::default().max_connections,
            None,
            "derived from descriptors"
        );
        assert_eq!(
            IngestConfig::default().max_keep_alive,
            Duration::from_secs(600)
        );
        assert_eq!(PersistConfig::default().batch_rows, 5000);
        assert_eq!(
            AnomalyConfig::default().case_update_interval,
            Duration::from_secs(300)
        );
        assert_eq!(RelayConfig::default().backlog, 20);
        assert_eq!(SimulatorConfig::default().vehicles, 20);
        let simulation = SimulationConfig::default();
        assert_eq!(
            (simulation.vehicles, simulation.interval),
            (0, Duration::from_secs(1))
        );
    }

    #[tokio::test]
    async fn a_scale_out_service_without_brokers_names_the_setting() {
        let settings = Settings {
            persist: Some(PersistConfig::default()),
            database: Some(DatabaseConfig {
                url: "sqlite::memory:".into(),
            }),
            ..Settings::service(
                ecars_runtime::settings::defaults(),
                ecars_runtime::settings::defaults(),
            )
        };
        let error = App::build(settings).await.unwrap_err();
        assert!(matches!(error, AppError::NeedsKafka), "{error}");
        assert!(error.to_string().contains("--kafka-brokers"));
    }
}
