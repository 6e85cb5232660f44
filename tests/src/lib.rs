//! What the end-to-end tests and benchmarks need: a throwaway PostgreSQL server, the product's
//! own composition (`ecars up`) on free ports, MQTT clients, and waiting for a condition with a
//! deadline.

pub mod salesforce;

use std::collections::HashMap;
use std::future::Future;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};
use chrono::SubsecRound;
use ecars_app::{App, AppError, Hooks, Settings};
use ecars_db::{Database, DatabaseConfig};
use ecars_ingest::IngestConfig;
use ecars_persist::{CommitObserver, PersistConfig};
use ecars_runtime::settings::defaults;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// A free TCP port on loopback for a process the test starts (bound, then released; the
/// process binds it again).
///
/// Taken below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`): a released port
/// of that range can meanwhile become the local port of any outgoing connection (a test with
/// 1,000 cars makes thousands) or of another `bind` to port 0, and the process then fails with
/// "address in use" (seen in CI). Each port is handed out once per test process.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOWEST: u32 = 10_000;
    static TRIED: AtomicU32 = AtomicU32::new(0);
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|range| range.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if ephemeral > LOWEST + 1_000 {
        let span = ephemeral - LOWEST;
        // Test processes run one after another; a start of their own keeps one from meeting
        // the ports the previous one left in TIME_WAIT or to its children still stopping.
        let start = std::process::id().wrapping_mul(7_919) % span;
        for _ in 0..span {
            let n = TRIED.fetch_add(1, Ordering::Relaxed);
            let port = LOWEST + (start + n) % span;
            let Ok(port) = u16::try_from(port) else {
                continue;
            };
            if TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

/// The address for `ECARS_ADMIN_ADDR` of a process whose HTTP listener is on port `http`: a free
/// loopback port, the same for the same `http` (so a test that knows a service's HTTP port finds
/// its `/readyz`).
pub fn admin_addr_for(http: u16) -> String {
    static PORTS: std::sync::Mutex<Option<HashMap<u16, u16>>> = std::sync::Mutex::new(None);
    let mut ports = PORTS
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let port = *ports
        .get_or_insert_with(HashMap::new)
        .entry(http)
        .or_insert_with(free_port);
    format!("127.0.0.1:{port}")
}

/// Polls `condition` until it holds or `timeout` passes; fails with `what` on timeout.
pub async fn wait_for<F, Fut>(what: &str, timeout: Duration, mut condition: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if condition().await {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Applies every queued batch of sensor rows to the rollups and the cars' states, as the
/// persistence worker's pass does every `--summary-interval` ([`ecars_persist::ROLLUP_BATCH`]
/// batches per transaction).
pub async fn apply_pending_batches(db: &ecars_db::Database) -> anyhow::Result<()> {
    let rollups = db.rollups();
    while rollups
        .apply_pending(ecars_persist::ROLLUP_BATCH)
        .await?
        .batches
        > 0
    {}
    Ok(())
}

/// A PostgreSQL server of Debian's `postgresql` package, in a temporary directory, on a free
/// port; stopped and removed on drop.
pub struct PgServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    port: u16,
    as_postgres: bool,
}

impl PgServer {
    /// Creates and starts a cluster with a database `ecars`. Fails (never skips) when the
    /// PostgreSQL server binaries are missing: the test command installs them.
    pub fn start() -> anyhow::Result<PgServer> {
        let bin = pg_bin_dir()?;
        let dir = tempfile::Builder::new().prefix("ecars-pg-").tempdir()?;
        // initdb refuses to run as root: run the server as the `postgres` user then.
        let as_postgres = is_root();
        if as_postgres {
            run(Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path()))?;
        }
        let server = PgServer {
            bin,
            dir,
            port: free_port(),
            as_postgres,
        };
        server.pg(
            "initdb",
            &[
                "-D",
                &server.data_dir(),
                "-U",
                "postgres",
                "-A",
                "trust",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        )?;
        server.start_server()?;
        server.pg(
            "createdb",
            &[
                "-h",
                "127.0.0.1",
                "-p",
                &server.port.to_string(),
                "-U",
                "postgres",
                "ecars",
            ],
        )?;
        Ok(server)
    }

    fn data_dir(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn pg(&self, tool: &str, args: &[&str]) -> anyhow::Result<()> {
        let program = self.bin.join(tool);
        let mut command = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&program);
            c
        } else {
            Command::new(&program)
        };
        command.args(args);
        run(&mut command)
    }

    /// Starts the server (again, after [`PgServer::stop`]) on the same port and data.
    pub fn start_server(&self) -> anyhow::Result<()> {
        let options = format!(
            // fsync off is safe here (the OS survives an immediate stop); synchronous_commit stays
            // on: with it off, an immediate stop loses commits the database already confirmed.
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c full_page_writes=off",
            self.port,
            self.dir.path().display()
        );
        let log = self.dir.path().join("log").display().to_string();
        self.pg(
            "pg_ctl",
            &[
                "-D",
                &self.data_dir(),
                "-w",
                "-l",
                &log,
                "-o",
                &options,
                "start",
            ],
        )
    }

    /// Stops the server at once, as an outage would (open connections are cut).
    pub fn stop(&self) -> anyhow::Result<()> {
        self.pg(
            "pg_ctl",
            &["-D", &self.data_dir(), "-w", "-m", "immediate", "stop"],
        )
    }

    /// Runs `sql` with `psql` on the `ecars` database (benchmarks fill tables with it); returns
    /// what it printed, unaligned and without headers.
    pub fn psql(&self, sql: &str) -> anyhow::Result<String> {
        let output = Command::new(self.bin.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
            ])
            .args(["-d", "ecars", "-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
            .output()
            .context("cannot run psql")?;
        if !output.status.success() {
            bail!("psql failed: {}", String::from_utf8_lossy(&output.stderr));
        }
        Ok(String::from_utf8_lossy(&output.stdout).into_owned())
    }

    /// The `DATABASE_URL` of the `ecars` database.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/ecars", self.port)
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let _ = self.stop();
    }
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0\n"))
        .unwrap_or(false)
}

fn pg_bin_dir() -> anyhow::Result<PathBuf> {
    if let Ok(dir) = std::env::var("ECARS_TEST_PG_BIN") {
        return Ok(PathBuf::from(dir));
    }
    let root = Path::new("/usr/lib/postgresql");
    let mut versions: Vec<PathBuf> = std::fs::read_dir(root)
        .with_context(|| {
            format!(
                "PostgreSQL server not installed ({} missing): run the README's test command",
                root.display()
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
        .filter(|bin| bin.join("initdb").exists())
        .collect();
    versions.sort();
    versions
        .pop()
        .context("no initdb under /usr/lib/postgresql/*/bin: install Debian's postgresql package")
}

fn run(command: &mut Command) -> anyhow::Result<()> {
    let output = command
        .output()
        .with_context(|| format!("cannot run {command:?}"))?;
    if !output.status.success() {
        bail!(
            "{command:?} failed: {}\n{}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Options of a test pipeline.
#[derive(Clone, Debug)]
pub struct PipelineOptions {
    /// Database URL.
    pub database_url: String,
    /// Fleet device secret.
    pub device_secret: Option<String>,
    /// MQTT service accounts file (needs the device secret).
    pub mqtt_accounts_file: Option<std::path::PathBuf>,
    /// Revoked cars and certificates.
    pub revoked_file: Option<std::path::PathBuf>,
    /// TLS of the MQTT-over-TLS listener.
    pub tls: ecars_runtime::tls::TlsConfig,
    /// The rest of ingest's settings (free loopback ports by default); the fields above win.
    pub ingest: IngestConfig,
    /// In-process bus capacity.
    pub bus_capacity: usize,
    /// Persistence batching.
    pub persist: PersistConfig,
    /// Observer of committed batches (benchmarks).
    pub observer: Option<CommitObserver>,
    /// The live relay.
    pub relay: ecars_relay::RelayConfig,
    /// The anomaly worker; `None` leaves it out (benchmarks that measure the write path alone).
    pub anomaly: Option<ecars_app::anomaly::AnomalyConfig>,
    /// The HTTP listeners (free loopback ports by default).
    pub http: ecars_api::HttpConfig,
}

impl PipelineOptions {
    /// Defaults on the given database.
    pub fn new(database_url: impl Into<String>) -> PipelineOptions {
        PipelineOptions {
            database_url: database_url.into(),
            device_secret: None,
            mqtt_accounts_file: None,
            revoked_file: None,
            tls: Default::default(),
            ingest: loopback_ingest(),
            bus_capacity: 10_000,
            persist: PersistConfig::default(),
            observer: None,
            relay: defaults(),
            anomaly: Some(defaults()),
            http: loopback_http(),
        }
    }

    /// The settings of `ecars up` with these options, every listener on a free loopback port.
    pub fn settings(&self) -> anyhow::Result<Settings> {
        let http = self.http.clone();
        let mut bus: ecars_app::InProcessBusConfig = defaults();
        bus.capacity = u32::try_from(self.bus_capacity)?;
        let settings = Settings::everything(
            http,
            defaults(),
            bus,
            DatabaseConfig {
                url: self.database_url.clone(),
            },
            IngestConfig {
                device_secret: self.device_secret.clone(),
                accounts_file: self.mqtt_accounts_file.clone(),
                revoked_file: self.revoked_file.clone(),
                ..self.ingest.clone()
            },
            self.persist.clone(),
            defaults(),
            self.relay.clone(),
            defaults(),
        );
        Ok(Settings {
            tls: self.tls.clone(),
            anomaly: self.anomaly.clone(),
            ..settings
        })
    }
}

/// The product's own composition, as `ecars up` runs it (MQTT ingest, the in-process bus, the
/// persistence and anomaly workers, the live relay and the HTTP API), on free loopback ports.
pub struct Pipeline {
    /// The database it writes.
    pub db: Database,
    /// The MQTT listener.
    pub mqtt_addr: SocketAddr,
    /// The MQTT-over-WebSocket listener.
    pub ws_addr: SocketAddr,
    /// The MQTT-over-TLS listener, with a certificate set.
    pub tls_addr: Option<SocketAddr>,
    /// The MQTT-over-secure-WebSocket listener, with a certificate set.
    pub wss_addr: Option<SocketAddr>,
    /// The public HTTP listener.
    pub http_addr: SocketAddr,
    /// The internal listener (`/healthz`, `/readyz`, `/metrics`).
    pub admin_addr: SocketAddr,
    /// The bus (tests publish on it directly).
    pub bus: ecars_bus::Bus,
    /// The live relay.
    pub relay: std::sync::Arc<ecars_relay::Relay>,
    database_url: String,
    app: RunningApp,
}

impl Pipeline {
    /// Builds and starts the application.
    pub async fn start(options: PipelineOptions) -> anyhow::Result<Pipeline> {
        let settings = options.settings()?;
        let database_url = options.database_url.clone();
        let hooks = Hooks {
            on_commit: options.observer,
        };
        let app = App::build_with(settings, hooks).await?;
        let db = app.database().context("ecars up has a database")?.clone();
        let mqtt_addr = app.mqtt_addr().context("ecars up runs ingest")?;
        let ws_addr = app.mqtt_ws_addr().context("ecars up runs ingest")?;
        let tls_addr = app.mqtt_tls_addr();
        let wss_addr = app.mqtt_wss_addr();
        let http_addr = app.http_addr();
        let admin_addr = app.admin_addr();
        let bus = app.bus().clone();
        let relay = app.relay().context("ecars up runs the relay")?.clone();
        let app = RunningApp::start(app);
        Ok(Pipeline {
            db,
            mqtt_addr,
            ws_addr,
            tls_addr,
            wss_addr,
            http_addr,
            admin_addr,
            bus,
            relay,
            database_url,
            app,
        })
    }

    /// `http://addr` of the public HTTP listener.
    pub fn http_base(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// `http://addr` of the internal listener.
    pub fn admin_base(&self) -> String {
        format!("http://{}", self.admin_addr)
    }

    /// The Prometheus metrics, as `/metrics` serves them.
    pub async fn metrics(&self) -> anyhow::Result<String> {
        Ok(reqwest::get(format!("{}/metrics", self.admin_base()))
            .await?
            .text()
            .await?)
    }

    /// Graceful shutdown, as on Ctrl-C: stop ingest, drain the bus into the database, stop HTTP.
    /// Returns a new connection to the database (the application closed its own), to check
    /// what was stored.
    pub async fn shutdown(self) -> anyhow::Result<Database> {
        self.app.shutdown().await?;
        Ok(Database::connect_lazy(&self.database_url)?)
    }
}

/// The sum of this process's samples of the Prometheus metric `name` whose line contains
/// `filter` (`""`: all of them), from the process-wide recorder.
pub fn metric_sum(name: &str, filter: &str) -> f64 {
    ecars_runtime::metrics::install_recorder()
        .render()
        .lines()
        .filter(|l| l.starts_with(name) && l.contains(filter))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Kafka settings for `brokers`, every other setting at its default.
pub fn kafka_config(brokers: impl Into<String>) -> ecars_bus::kafka::KafkaConfig {
    ecars_bus::kafka::KafkaConfig {
        brokers: Some(brokers.into()),
        ..defaults()
    }
}

/// HTTP settings on free loopback ports (public and internal), no API keys.
pub fn loopback_http() -> ecars_api::HttpConfig {
    ecars_api::HttpConfig {
        http_addr: ([127, 0, 0, 1], 0).into(),
        admin_addr: ([127, 0, 0, 1], 0).into(),
        ..defaults()
    }
}

/// Ingest settings on free loopback ports, without a device secret.
pub fn loopback_ingest() -> IngestConfig {
    IngestConfig {
        mqtt_addr: ([127, 0, 0, 1], 0).into(),
        mqtt_ws_addr: ([127, 0, 0, 1], 0).into(),
        mqtt_tls_addr: ([127, 0, 0, 1], 0).into(),
        mqtt_wss_addr: ([127, 0, 0, 1], 0).into(),
        ..IngestConfig::default()
    }
}

/// `ecars ingest` on Kafka, on free loopback ports (its spool where `kafka.spool_dir` says).
pub async fn ingest_service(kafka: &ecars_bus::kafka::KafkaConfig) -> anyhow::Result<App> {
    Ok(App::build(Settings {
        ingest: Some(loopback_ingest()),
        ..Settings::service(loopback_http(), kafka.clone())
    })
    .await?)
}

/// `ecars persist` on Kafka into `database_url`, flushing at `batch_rows` or 50 ms.
pub async fn persist_service(
    kafka: &ecars_bus::kafka::KafkaConfig,
    database_url: &str,
    batch_rows: u32,
) -> anyhow::Result<App> {
    Ok(App::build(Settings {
        database: Some(DatabaseConfig {
            url: database_url.to_owned(),
        }),
        persist: Some(PersistConfig {
            batch_rows,
            batch_delay: Duration::from_millis(50),
            ..PersistConfig::default()
        }),
        ..Settings::service(loopback_http(), kafka.clone())
    })
    .await?)
}

/// A running [`App`] and what stops it.
pub struct RunningApp {
    /// Stops the application gracefully when cancelled.
    pub stop: CancellationToken,
    task: JoinHandle<Result<(), AppError>>,
}

impl RunningApp {
    /// Runs `app` until [`RunningApp::shutdown`].
    pub fn start(app: App) -> RunningApp {
        let stop = CancellationToken::new();
        let task = tokio::spawn(app.run(stop.clone().cancelled_owned()));
        RunningApp { stop, task }
    }

    /// Stops it as a signal would and waits until every part stopped.
    pub async fn shutdown(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await??;
        Ok(())
    }
}

/// A JSON reading as a car would send it.
pub fn reading_json(vin: &str, battery: f64) -> String {
    serde_json::json!({
        "vin": vin,
        "name": "Test car",
        "profile": "short",
        "range": 200.5,
        "mpge": 110,
        "battery": battery,
        "malfunction": false,
        "speed": 42.0,
        "latitude": "37.7749",
        "longitude": "-122.4194",
        "date": unique_now().to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    })
    .to_string()
}

/// Now, but never the same instant twice in this process: readings a test makes in a tight loop
/// are different readings, so they must not share a date (equal payloads with equal dates are
/// one reading sent twice, and get one event id).
pub fn unique_now() -> chrono::DateTime<chrono::Utc> {
    static LAST: std::sync::Mutex<Option<chrono::DateTime<chrono::Utc>>> =
        std::sync::Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    let mut now = chrono::Utc::now().trunc_subsecs(6);
    if let Some(previous) = *last {
        if now <= previous {
            now = previous + chrono::TimeDelta::microseconds(1);
        }
    }
    *last = Some(now);
    now
}

/// A made-up valid VIN for car `n`.
pub fn test_vin(n: u32) -> String {
    format!("1TEST0000{n:08}")
}

/// Publishes `messages` (topic, payload) at QoS 1 over MQTT 3.1.1 with rumqttc and returns once
/// the broker acknowledged every one. `credentials` log in as a car.
pub async fn publish_v4(
    addr: SocketAddr,
    client_id: &str,
    credentials: Option<(String, String)>,
    messages: Vec<(String, String)>,
) -> anyhow::Result<()> {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let mut options = MqttOptions::new(client_id, addr.ip().to_string(), addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    if let Some((user, password)) = credentials {
        options.set_credentials(user, password);
    }
    let (client, mut eventloop) = AsyncClient::new(options, 64);
    let total = messages.len();
    let publisher = tokio::spawn(async move {
        for (topic, payload) in messages {
            client
                .publish(topic, QoS::AtLeastOnce, false, payload)
                .await?;
        }
        anyhow::Ok(client)
    });
    let mut acked = 0;
    while acked < total {
        match tokio::time::timeout(Duration::from_secs(20), eventloop.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                bail!("MQTT connection failed after {acked}/{total} acknowledgements: {e}")
            }
            Err(_) => bail!("no MQTT event for 20s after {acked}/{total} acknowledgements"),
        }
    }
    let client = publisher.await??;
    client.disconnect().await?;
    Ok(())
}

/// A Kafka-protocol broker (tansu, in memory) on a free port; killed on drop. Fails (never skips)
/// when tansu is missing: the test command installs it.
pub struct KafkaServer {
    child: std::process::Child,
    port: u16,
}

impl KafkaServer {
    /// Starts tansu and waits until it accepts connections.
    pub fn start() -> anyhow::Result<KafkaServer> {
        let tansu = tansu_binary()?;
        let port = free_port();
        let url = format!("tcp://127.0.0.1:{port}");
        let child = Command::new(&tansu)
            .args([
                "broker",
                "--listener-url",
                &url,
                "--advertised-listener-url",
                &url,
            ])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("cannot start {}", tansu.display()))?;
        let server = KafkaServer { child, port };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if std::time::Instant::now() > deadline {
                bail!("tansu did not listen on {port} within 20s");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(server)
    }

    /// `host:port` for `ECARS_KAFKA_BROKERS`.
    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for KafkaServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn tansu_binary() -> anyhow::Result<PathBuf> {
    if let Ok(path) = std::env::var("ECARS_TEST_TANSU") {
        return Ok(PathBuf::from(path));
    }
    let home = std::env::var("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("HOME").map(|h| Path::new(&h).join(".cargo")))
        .context("no CARGO_HOME or HOME")?;
    let path = home.join("bin").join("tansu");
    anyhow::ensure!(
        path.exists(),
        "{} is missing: run the README's test command, which installs tansu",
        path.display()
    );
    Ok(path)
}

/// Sends the services' logs to stderr when `ECARS_LOG` is set (for example
/// `ECARS_LOG=info,ecars_persist=debug cargo test -- --nocapture`).
pub fn init_logs() {
    if let Ok(filter) = std::env::var("ECARS_LOG") {
        let log = ecars_runtime::settings::LogConfig {
            format: ecars_runtime::settings::LogFormat::Text,
            filter,
        };
        let _ = log.init();
    }
}

/// What a plain Kafka consumer saw on the telemetry topic.
#[derive(Debug, Default)]
pub struct TopicReadout {
    /// Each car's reading dates in topic order (first delivery of each event id).
    pub dates_per_car: std::collections::HashMap<String, Vec<chrono::DateTime<chrono::Utc>>>,
    /// Records seen again with an event id already read (at-least-once redelivery).
    pub duplicates: u64,
    /// The partition each car's records are in, by VIN.
    pub partition_of_car: std::collections::HashMap<String, i32>,
}

impl TopicReadout {
    /// Panics unless every car is in the partition the Java client's partitioner (murmur2 of
    /// the VIN) picks among `partitions`.
    pub fn assert_java_partitioning(&self, partitions: i32) {
        use ecars_bus::kafka::partitioner::java_partition;
        assert!(!self.partition_of_car.is_empty());
        for (vin, partition) in &self.partition_of_car {
            assert_eq!(
                *partition,
                java_partition(vin.as_bytes(), partitions),
                "{vin} is where a Java producer would put it"
            );
        }
    }

    /// Panics unless the topic held `per_car` readings of each of `cars` cars, each car's in
    /// event-time order.
    pub fn assert_complete_and_in_order(&self, cars: u32, per_car: u64) {
        assert_eq!(self.dates_per_car.len(), cars as usize, "cars in the topic");
        for (vin, dates) in &self.dates_per_car {
            assert_eq!(dates.len(), per_car as usize, "{vin}");
            assert!(
                dates.windows(2).all(|w| w[0] <= w[1]),
                "{vin}'s readings are in order in the topic"
            );
        }
    }
}

/// Reads the telemetry topic from the start, as another team's service would, until `distinct`
/// readings were seen, checking every record on the way: key = VIN, CloudEvents headers, one
/// partition per car.
pub async fn read_telemetry_topic(
    brokers: &str,
    topic: &str,
    distinct: usize,
) -> anyhow::Result<TopicReadout> {
    use ecars_bus::kafka::cloud_event_headers;
    use ecars_model::{Record, TelemetryReading};
    use rdkafka::consumer::{Consumer, StreamConsumer};
    use rdkafka::message::Message;

    let consumer: StreamConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", format!("reader-{}", uuid::Uuid::now_v7()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()?;
    consumer.subscribe(&[topic])?;
    let mut readout = TopicReadout::default();
    let mut seen = std::collections::HashSet::new();
    let mut partition_of_car = std::collections::HashMap::new();
    let result = async {
        while seen.len() < distinct {
            let message = tokio::time::timeout(Duration::from_secs(30), consumer.recv())
                .await
                .with_context(|| format!("no record within 30s after {} readings", seen.len()))??;
            let key = String::from_utf8(message.key().context("no key")?.to_vec())?;
            let reading: TelemetryReading =
                serde_json::from_slice(message.payload().context("no value")?)?;
            anyhow::ensure!(reading.vin.as_str() == key, "key {key} is not the VIN");
            let headers = cloud_event_headers(&message);
            for (name, want) in [
                ("ce_specversion", "1.0"),
                ("ce_type", TelemetryReading::EVENT_TYPE),
                ("ce_id", reading.event_id.to_string().as_str()),
                ("ce_subject", key.as_str()),
                ("content-type", "application/json"),
            ] {
                anyhow::ensure!(
                    headers.get(name).map(String::as_str) == Some(want),
                    "header {name} is {:?}, not {want}",
                    headers.get(name)
                );
            }
            anyhow::ensure!(headers.contains_key("ce_source") && headers.contains_key("ce_time"));
            let partition = *partition_of_car
                .entry(key.clone())
                .or_insert(message.partition());
            anyhow::ensure!(partition == message.partition(), "{key} in two partitions");
            if seen.insert(reading.event_id) {
                readout
                    .dates_per_car
                    .entry(key)
                    .or_default()
                    .push(reading.date);
            } else {
                readout.duplicates += 1;
            }
        }
        Ok(())
    }
    .await;
    consumer.unsubscribe();
    readout.partition_of_car = partition_of_car;
    result.map(|()| readout)
}

/// A light MQTT 3.1.1 load generator for benchmarks: `cars` raw TCP connections, each
/// pipelining `per_car` QoS 1 PUBLISHes of eCars-shaped readings with at most `window`
/// unacknowledged. Unlike the simulator (a rumqttc client per car), it spends almost no CPU, so
/// on a 2-core machine the broker's own rate shows. Returns acknowledged readings per second.
pub async fn raw_mqtt_load(
    addr: SocketAddr,
    cars: u32,
    per_car: u64,
    window: u64,
) -> anyhow::Result<f64> {
    use mqtt_wire::put_varint;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn car(addr: SocketAddr, n: u32, per_car: u64, window: u64) -> anyhow::Result<()> {
        let vin = test_vin(900_000 + n);
        let client_id = format!("load-{n}");
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let mut connect = vec![0x10];
        let body_len = 10 + 2 + client_id.len();
        put_varint(&mut connect, body_len);
        connect.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60]);
        connect.extend_from_slice(&(client_id.len() as u16).to_be_bytes());
        connect.extend_from_slice(client_id.as_bytes());
        stream.write_all(&connect).await?;
        let mut connack = [0u8; 4];
        stream.read_exact(&mut connack).await?;
        anyhow::ensure!(connack[0] == 0x20 && connack[3] == 0, "CONNACK {connack:?}");
        let topic = format!("vehicles/{vin}/telemetry");
        let (mut read, mut write) = stream.into_split();
        let (mut sent, mut acked) = (0u64, 0u64);
        let mut out = Vec::with_capacity(64 * 1024);
        let mut input = vec![0u8; 16 * 1024];
        let mut partial = 0usize;
        while acked < per_car {
            out.clear();
            while sent < per_car && sent - acked < window {
                let payload = format!(
                    r#"{{"vin":"{vin}","name":"Load {n}","profile":"medium","range":{:.1},"mpge":112.0,"battery":{:.2},"malfunction":false,"speed":{},"latitude":37.79,"longitude":-122.39}}"#,
                    300.0 - (sent % 300) as f64,
                    100.0 - (sent % 10_000) as f64 / 100.0,
                    sent % 80
                );
                out.push(0x32);
                put_varint(&mut out, 2 + topic.len() + 2 + payload.len());
                out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
                out.extend_from_slice(topic.as_bytes());
                out.extend_from_slice(&((sent % 65_535 + 1) as u16).to_be_bytes());
                out.extend_from_slice(payload.as_bytes());
                sent += 1;
            }
            if !out.is_empty() {
                write.write_all(&out).await?;
            }
            let n = read.read(&mut input[partial..]).await?;
            anyhow::ensure!(n > 0, "broker closed after {acked} acknowledgements");
            let available = partial + n;
            let whole = available / 4 * 4;
            for ack in input[..whole].chunks_exact(4) {
                anyhow::ensure!(
                    ack[0] == 0x40 && ack[1] == 2,
                    "expected PUBACK, got {ack:?}"
                );
                acked += 1;
            }
            input.copy_within(whole..available, 0);
            partial = available - whole;
        }
        write.write_all(&[0xE0, 0]).await?;
        Ok(())
    }

    let started = std::time::Instant::now();
    let mut cars_running = tokio::task::JoinSet::new();
    for n in 0..cars {
        cars_running.spawn(car(addr, n, per_car, window));
    }
    while let Some(result) = cars_running.join_next().await {
        result??;
    }
    Ok((u64::from(cars) * per_car) as f64 / started.elapsed().as_secs_f64())
}

/// Raw MQTT encoding, for tests and load generators that speak the protocol without a client
/// library (to send what no library sends, or to spend almost no CPU per message).
pub mod mqtt_wire {
    /// Appends MQTT's variable-length integer (a packet's remaining length).
    pub fn put_varint(out: &mut Vec<u8>, mut value: usize) {
        loop {
            let mut byte = (value % 128) as u8;
            value /= 128;
            if value > 0 {
                byte |= 0x80;
            }
            out.push(byte);
            if value == 0 {
                break;
            }
        }
    }

    /// A whole packet: its first byte, the remaining length, the body.
    pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![first];
        put_varint(&mut out, body.len());
        out.extend_from_slice(body);
        out
    }

    /// Appends a length-prefixed UTF-8 string.
    pub fn put_string(out: &mut Vec<u8>, text: &str) {
        out.extend_from_slice(&(text.len() as u16).to_be_bytes());
        out.extend_from_slice(text.as_bytes());
    }
}
