//! MQTT ingest: a gateway that authenticates cars and admits their telemetry to the bus, with
//! an embedded rumqttd broker behind it for the clients that need one.
//!
//! ```text
//! car ──MQTT/TCP or WS──▶ gateway ──(valid reading)──▶ bus ──▶ workers
//!                           │  └─(rejected)──▶ bus (dead letters)
//!                           └──(SUBSCRIBE, other topics, wills)──▶ rumqttd ──▶ MQTT subscribers
//! ```
//!
//! The gateway in layers: [`codec`] (MQTT on the wire), [`session`] (the protocol state of a
//! connection: keep-alive, answers in order, QoS 2), [`admission`] (the verdict on a PUBLISH) —
//! all pure — and [`connection`] (the I/O of one connection, generic over the stream and the
//! broker), sharing a [`gateway::Gateway`]; [`limits`] says how many cars fit.

pub mod accounts;
pub mod admission;
pub mod authorization;
pub mod broker;
pub mod codec;
pub mod connection;
pub mod gateway;
pub mod limits;
pub mod metrics;
pub mod retained;
pub mod revocation;
pub mod session;
pub mod websocket;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use ecars_bus::Bus;
use ecars_runtime::reloading::Reloading;
use ecars_runtime::settings::{is_loopback, parse_duration, value_or_file, ConfigError};
use ecars_runtime::tls::ServerTls;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use broker::{BrokerError, EmbeddedBroker};
use connection::Ended;
pub use ecars_model::device_auth::DeviceSecret;
use ecars_runtime::accept::{self, AcceptFailures};
use gateway::Gateway;

/// Settings of MQTT ingest.
#[derive(Clone, Debug, Args)]
pub struct IngestConfig {
    /// Address of the MQTT listener (MQTT 3.1.1 and 5 on the same port).
    #[arg(
        long = "mqtt-addr",
        env = "ECARS_MQTT_ADDR",
        default_value = "127.0.0.1:1883"
    )]
    pub mqtt_addr: SocketAddr,
    /// Address of the MQTT-over-WebSocket listener (any path, `mqtt` subprotocol).
    #[arg(
        long = "mqtt-ws-addr",
        env = "ECARS_MQTT_WS_ADDR",
        default_value = "127.0.0.1:8083"
    )]
    pub mqtt_ws_addr: SocketAddr,
    /// Address of the MQTT-over-TLS listener, which listens when a certificate is set
    /// (`--tls-cert-file`, `--tls-key-file`).
    #[arg(
        long = "mqtt-tls-addr",
        env = "ECARS_MQTT_TLS_ADDR",
        default_value = "127.0.0.1:8883"
    )]
    pub mqtt_tls_addr: SocketAddr,
    /// Address of the MQTT-over-secure-WebSocket listener (`wss://`), which listens when a
    /// certificate is set.
    #[arg(
        long = "mqtt-wss-addr",
        env = "ECARS_MQTT_WSS_ADDR",
        default_value = "127.0.0.1:8884"
    )]
    pub mqtt_wss_addr: SocketAddr,
    /// Most PUBLISH packets a second one MQTT connection may send (a burst of one second's worth
    /// passes); over it the gateway stops reading from the connection until the rate allows, so
    /// the car is slowed by backpressure, never dropped. 0: no limit.
    #[arg(
        long = "mqtt-max-publish-rate",
        env = "ECARS_MQTT_MAX_PUBLISH_RATE",
        default_value_t = 1000
    )]
    pub max_publish_rate: u32,
    /// Largest retained message, in bytes: a retained PUBLISH over it is refused (MQTT 5
    /// 0x97). With the topic limit, this bounds what retained messages take (4 KiB × 100,000 =
    /// 400 MiB at most by default).
    #[arg(long = "mqtt-retained-max-bytes", env = "ECARS_MQTT_RETAINED_MAX_BYTES", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=1024 * 1024))]
    pub retained_max_bytes: u32,
    /// Most topics holding a retained message at once; a retained PUBLISH to one more is
    /// refused (an empty retained payload clears a topic).
    #[arg(long = "mqtt-retained-max-topics", env = "ECARS_MQTT_RETAINED_MAX_TOPICS", default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(0..=100_000_000))]
    pub retained_max_topics: u32,
    /// File of revoked cars and client certificates: `vin VIN` or `serial HEX` per line,
    /// re-read while running; revoked cars are refused at CONNECT and dropped when added.
    #[arg(long = "revoked-file", env = "ECARS_REVOKED_FILE")]
    pub revoked_file: Option<PathBuf>,
    /// Fleet device secret. When set, a car logs in with username = its VIN and password =
    /// lowercase hex of HMAC-SHA256(secret, VIN), and may only publish its own readings.
    /// Prefer the environment variable or --device-secret-file: flags show in `ps`.
    #[arg(
        long = "device-secret",
        env = "ECARS_DEVICE_SECRET",
        hide_env_values = true
    )]
    pub device_secret: Option<String>,
    /// File holding the fleet device secret (trailing newline ignored), as an alternative to
    /// ECARS_DEVICE_SECRET (for Kubernetes and Docker secrets).
    #[arg(
        long = "device-secret-file",
        env = "ECARS_DEVICE_SECRET_FILE",
        conflicts_with = "device_secret"
    )]
    pub device_secret_file: Option<PathBuf>,
    /// Accept anonymous MQTT clients on a non-loopback address (without a device secret).
    /// Without this, binding beyond loopback with no secret refuses to start.
    #[arg(long = "allow-anonymous", env = "ECARS_ALLOW_ANONYMOUS")]
    pub allow_anonymous: bool,
    /// File of MQTT service accounts (subscribers that are not cars): `name argon2-hash
    /// filter[,filter]` per line (`ecars mqtt-account create` prints one), re-read while
    /// running. Needs device credentials (ECARS_DEVICE_SECRET).
    #[arg(long = "mqtt-accounts-file", env = "ECARS_MQTT_ACCOUNTS_FILE")]
    pub accounts_file: Option<PathBuf>,
    /// Most MQTT connections served at once; beyond it a client's CONNECT is refused ("server
    /// unavailable", MQTT 5 "quota exceeded"). Without it: as many as the process's descriptor
    /// limit allows (raised to the hard limit at start), less a reserve of 1024.
    #[arg(long = "mqtt-max-connections", env = "ECARS_MQTT_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Longest keep-alive a client gets (`10m`): a longer one, or none (0), is cut to it, so an
    /// idle socket cannot stay forever. MQTT 5 clients are told (Server Keep Alive).
    #[arg(long = "mqtt-max-keep-alive", env = "ECARS_MQTT_MAX_KEEP_ALIVE", default_value = "10m", value_parser = parse_keep_alive)]
    pub max_keep_alive: Duration,
    /// How far in the future a reading may be dated (`5m`): a car's clock may run a little
    /// ahead; a reading dated later is dead-lettered as `date_in_future`, so one broken clock
    /// cannot stand as the car's latest reading or blind its anomaly detection.
    #[arg(long = "max-clock-skew", env = "ECARS_MAX_CLOCK_SKEW", default_value = "5m", value_parser = parse_duration)]
    pub max_clock_skew: Duration,
    /// This ingest node's name in connectivity events (`node`); without it, the host name
    /// (`HOSTNAME`: a Kubernetes pod's name), else `ecars`.
    #[arg(long = "node-id", env = "ECARS_NODE_ID")]
    pub node_id: Option<String>,
    /// Where MQTT 5 cars should reconnect when this node shuts down (`mqtt.example.com:8883`):
    /// their DISCONNECT then says "use another server" (0x9C) with this Server Reference
    /// instead of "server shutting down" (0x8B). Unset: 0x8B, and cars reconnect through the
    /// load balancer as they would anyway.
    #[arg(long = "mqtt-server-reference", env = "ECARS_MQTT_SERVER_REFERENCE", value_parser = parse_server_reference)]
    pub server_reference: Option<String>,
}

impl IngestConfig {
    /// The node's name in connectivity events.
    pub fn node(&self) -> String {
        self.node_id
            .clone()
            .or_else(|| std::env::var("HOSTNAME").ok())
            .filter(|n| !n.trim().is_empty())
            .unwrap_or_else(|| "ecars".to_owned())
    }
}

fn parse_server_reference(text: &str) -> Result<String, String> {
    if text.is_empty() || text.len() > 1024 || text.chars().any(char::is_control) {
        Err("a host (and port) of at most 1024 characters, no control characters".to_owned())
    } else {
        Ok(text.to_owned())
    }
}

fn parse_keep_alive(text: &str) -> Result<Duration, String> {
    let duration = parse_duration(text)?;
    if (Duration::from_secs(1)..=Duration::from_secs(u64::from(u16::MAX))).contains(&duration) {
        Ok(duration)
    } else {
        Err(format!("{duration:?} is not between 1s and 65535s"))
    }
}

impl Default for IngestConfig {
    fn default() -> Self {
        ecars_runtime::settings::defaults()
    }
}

/// Errors of ingest.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    /// A setting is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A listener could not bind.
    #[error("cannot listen on {addr} ({setting}): {source}")]
    Bind {
        /// The flag and environment variable.
        setting: &'static str,
        /// The address.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The embedded broker failed.
    #[error(transparent)]
    Broker(#[from] BrokerError),
}

impl IngestConfig {
    /// The device secret from the flag, the environment or the file.
    pub fn device_secret(&self) -> Result<Option<DeviceSecret>, IngestError> {
        Ok(self.device_secret_text()?.map(DeviceSecret::new))
    }

    /// The device secret as text (the in-process simulator logs in with it).
    pub fn device_secret_text(&self) -> Result<Option<String>, IngestError> {
        let secret = value_or_file(
            self.device_secret.as_deref(),
            self.device_secret_file.as_deref(),
            "--device-secret / ECARS_DEVICE_SECRET (or --device-secret-file / ECARS_DEVICE_SECRET_FILE)",
        )?;
        match secret {
            Some(s) if s.len() < 16 => Err(ConfigError::Invalid {
                setting: "--device-secret / ECARS_DEVICE_SECRET",
                reason: "the secret must be at least 16 characters".into(),
            }
            .into()),
            other => Ok(other),
        }
    }

    /// The service accounts of the accounts file, loaded (and then watched by the composition).
    fn accounts(
        &self,
        device_auth: bool,
    ) -> Result<Option<Reloading<accounts::MqttAccounts>>, IngestError> {
        let Some(path) = &self.accounts_file else {
            return Ok(None);
        };
        if !device_auth {
            return Err(ConfigError::Invalid {
                setting: "--mqtt-accounts-file / ECARS_MQTT_ACCOUNTS_FILE",
                reason: "service accounts need device credentials (ECARS_DEVICE_SECRET); without them every client is anonymous".into(),
            }
            .into());
        }
        Reloading::load(path, "mqtt_accounts", accounts::MqttAccounts::parse)
            .map(Some)
            .map_err(|e| {
                ConfigError::Invalid {
                    setting: "--mqtt-accounts-file / ECARS_MQTT_ACCOUNTS_FILE",
                    reason: e.to_string(),
                }
                .into()
            })
    }

    /// Checks the security rules: anonymous access is only for loopback unless allowed.
    fn check_exposure(&self, secret: Option<&DeviceSecret>) -> Result<(), IngestError> {
        if secret.is_some() {
            return Ok(());
        }
        let exposed: Vec<SocketAddr> = [self.mqtt_addr, self.mqtt_ws_addr]
            .into_iter()
            .filter(|a| !is_loopback(a))
            .collect();
        if exposed.is_empty() {
            tracing::warn!("no device secret: anonymous MQTT clients are accepted (loopback only)");
            Ok(())
        } else if self.allow_anonymous {
            tracing::warn!(?exposed, "no device secret and --allow-anonymous: anyone who reaches these addresses can publish telemetry");
            Ok(())
        } else {
            Err(ConfigError::Invalid {
                setting: "--device-secret / ECARS_DEVICE_SECRET",
                reason: format!(
                    "MQTT listens beyond loopback ({exposed:?}) without a device secret; set ECARS_DEVICE_SECRET, or pass --allow-anonymous to accept unauthenticated cars"
                ),
            }
            .into())
        }
    }
}

/// Connections waiting to be accepted, at most (the kernel caps it at `net.core.somaxconn`).
/// The usual 128 overflowed when 1,000 cars reconnected at once, and each overflowed car waited a
/// second for its SYN to be sent again.
const ACCEPT_BACKLOG: u32 = 4096;

/// Connections told "at capacity" at once, at most: past these, new sockets are closed at once
/// (each one waits up to the CONNECT timeout for the CONNECT it refuses).
const REFUSING_AT_ONCE: usize = 256;

/// Binds a listener with room for a whole fleet reconnecting at once.
fn listen(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(ACCEPT_BACKLOG)
}

/// Ingest with its listeners bound, ready to run.
#[derive(Debug)]
pub struct BoundIngest {
    gateway: Arc<Gateway<EmbeddedBroker>>,
    tcp: TcpListener,
    ws: TcpListener,
    /// The TLS and secure WebSocket listeners and their TLS, when a certificate is set.
    tls: Option<(TcpListener, ServerTls)>,
    wss: Option<(TcpListener, ServerTls)>,
    /// One permit per connection allowed.
    admitted: Arc<Semaphore>,
    /// Connections being told the gateway is at capacity.
    refusing: Arc<Semaphore>,
    max_connections: usize,
}

impl BoundIngest {
    /// Validates the settings, starts the embedded broker and binds both listeners.
    /// `tls` turns the MQTT-over-TLS listener on.
    pub async fn bind(
        config: &IngestConfig,
        bus: Bus,
        tls: Option<&ServerTls>,
    ) -> Result<BoundIngest, IngestError> {
        let device_secret = config.device_secret()?;
        config.check_exposure(device_secret.as_ref())?;
        let accounts = config.accounts(device_secret.is_some())?;
        let revoked = match &config.revoked_file {
            Some(path) => Some(
                Reloading::load(path, "revoked", revocation::Revoked::parse).map_err(|e| {
                    ConfigError::Invalid {
                        setting: "--revoked-file / ECARS_REVOKED_FILE",
                        reason: e.to_string(),
                    }
                })?,
            ),
            None => None,
        };
        let bind = |setting: &'static str, addr: SocketAddr| async move {
            listen(addr).map_err(|source| IngestError::Bind {
                setting,
                addr,
                source,
            })
        };
        let descriptors = limits::raise_descriptor_limit();
        let max_connections = limits::connection_limit(config.max_connections, descriptors)?;
        let tcp = bind("--mqtt-addr / ECARS_MQTT_ADDR", config.mqtt_addr).await?;
        let ws = bind("--mqtt-ws-addr / ECARS_MQTT_WS_ADDR", config.mqtt_ws_addr).await?;
        let (tls, wss) = match tls {
            Some(tls) => (
                Some((
                    bind(
                        "--mqtt-tls-addr / ECARS_MQTT_TLS_ADDR",
                        config.mqtt_tls_addr,
                    )
                    .await?,
                    tls.clone(),
                )),
                Some((
                    bind(
                        "--mqtt-wss-addr / ECARS_MQTT_WSS_ADDR",
                        config.mqtt_wss_addr,
                    )
                    .await?,
                    tls.clone(),
                )),
            ),
            None => (None, None),
        };
        let (broker, fanout) = EmbeddedBroker::start(max_connections).await?;
        Ok(BoundIngest {
            gateway: Arc::new(
                Gateway::new(
                    bus,
                    broker,
                    fanout,
                    device_secret,
                    Some(config.max_keep_alive),
                    max_connections,
                )
                .with_accounts(accounts)
                .with_revoked(revoked)
                .with_max_clock_skew(config.max_clock_skew)
                .with_node(&config.node())
                .with_server_reference(config.server_reference.clone())
                .with_publish_rate(config.max_publish_rate)
                .with_retained_limits(
                    config.retained_max_bytes as usize,
                    config.retained_max_topics as usize,
                ),
            ),
            tcp,
            ws,
            tls,
            wss,
            admitted: Arc::new(Semaphore::new(max_connections)),
            refusing: Arc::new(Semaphore::new(REFUSING_AT_ONCE)),
            max_connections,
        })
    }

    /// The connection limit in force.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// The service accounts, to be watched for changes ([`Reloading::watch`]).
    pub fn accounts(&self) -> Option<&Reloading<accounts::MqttAccounts>> {
        self.gateway.accounts.as_ref()
    }

    /// The revocations, to be watched for changes ([`Reloading::watch`]).
    pub fn revoked(&self) -> Option<&Reloading<revocation::Revoked>> {
        self.gateway.revoked.as_ref()
    }

    /// The MQTT-over-secure-WebSocket listener's address, when it listens.
    pub fn wss_addr(&self) -> Option<std::io::Result<SocketAddr>> {
        self.wss.as_ref().map(|(listener, _)| listener.local_addr())
    }

    /// The MQTT-over-TLS listener's address, when it listens.
    pub fn tls_addr(&self) -> Option<std::io::Result<SocketAddr>> {
        self.tls.as_ref().map(|(listener, _)| listener.local_addr())
    }

    /// The MQTT listener's address (useful with port 0).
    pub fn mqtt_addr(&self) -> std::io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// The MQTT-over-WebSocket listener's address.
    pub fn ws_addr(&self) -> std::io::Result<SocketAddr> {
        self.ws.local_addr()
    }

    /// Serves until `shutdown` fires, then stops accepting, lets every connection finish the
    /// packets it is admitting, and returns once all are closed.
    pub async fn run(self, shutdown: CancellationToken) {
        tracing::info!(
            mqtt = %self.tcp.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            websocket = %self.ws.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            device_auth = self.gateway.device_secret.is_some(),
            max_connections = self.max_connections,
            "MQTT ingest listening"
        );
        let tracker = TaskTracker::new();
        if self.gateway.revoked.is_some() || self.gateway.accounts.is_some() {
            tracker.spawn(enforce_revocations(
                Arc::clone(&self.gateway),
                shutdown.clone(),
            ));
        }
        let mut failures = AcceptFailures::default();
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.tcp.accept() => accepted.map(|(s, _)| (s, Transport::Tcp)),
                accepted = self.ws.accept() => accepted.map(|(s, _)| (s, Transport::WebSocket)),
                accepted = accept_tls(self.tls.as_ref()) => accepted.map(|(s, _)| (s, Transport::Tls)),
                accepted = accept_tls(self.wss.as_ref()) => accepted.map(|(s, _)| (s, Transport::SecureWebSocket)),
            };
            let (stream, transport) = match accepted {
                Ok(accepted) => {
                    failures.succeeded();
                    accepted
                }
                Err(error) => {
                    let exhaustion = accept::is_exhaustion(&error);
                    let reason = if exhaustion {
                        "descriptors_or_memory"
                    } else {
                        "other"
                    };
                    ::metrics::counter!(metrics::ACCEPT_FAILURES, "reason" => reason).increment(1);
                    let after = failures.failed(exhaustion, tokio::time::Instant::now());
                    if let Some(count) = after.log {
                        tracing::warn!(%error, failures = count, pause = ?after.pause, "MQTT accept failing; pausing before the next");
                    }
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(after.pause) => continue,
                    }
                }
            };
            let _ = stream.set_nodelay(true);
            let permit = match Arc::clone(&self.admitted).try_acquire_owned() {
                Ok(permit) => Ok(permit),
                Err(_) => match Arc::clone(&self.refusing).try_acquire_owned() {
                    Ok(refusing) => Err(refusing),
                    // Too many waiting to be refused already: close at once.
                    Err(_) => {
                        ::metrics::counter!(metrics::MQTT_CONNECTIONS_REFUSED, "reason" => "connection_limit").increment(1);
                        continue;
                    }
                },
            };
            let gateway = Arc::clone(&self.gateway);
            let shutdown = shutdown.clone();
            let tls = match transport {
                Transport::Tls => self.tls.as_ref(),
                Transport::SecureWebSocket => self.wss.as_ref(),
                Transport::Tcp | Transport::WebSocket => None,
            }
            .map(|(_, tls)| tls.acceptor());
            tracker.spawn(async move {
                let admitted = permit.is_ok();
                // WebSocket and TLS connections are boxed: their state is larger, and held inline
                // it would widen every plain TCP car's task too.
                let ended = match (transport, tls) {
                    (Transport::Tcp, _) | (Transport::Tls | Transport::SecureWebSocket, None) => {
                        Some(
                            connection::serve_connection(gateway, stream, admitted, None, shutdown)
                                .await,
                        )
                    }
                    (Transport::WebSocket, _) => {
                        Box::pin(serve_websocket(gateway, stream, admitted, None, shutdown)).await
                    }
                    (Transport::Tls, Some(acceptor)) => {
                        Box::pin(serve_tls(
                            gateway, acceptor, stream, false, admitted, shutdown,
                        ))
                        .await
                    }
                    (Transport::SecureWebSocket, Some(acceptor)) => {
                        Box::pin(serve_tls(
                            gateway, acceptor, stream, true, admitted, shutdown,
                        ))
                        .await
                    }
                };
                drop(permit);
                if let Some(ended) = ended {
                    note_end(&ended);
                }
            });
            // Revocations that changed since the last accept or tick are enforced below too.
        }
        tracker.close();
        tracker.wait().await;
        tracing::info!("MQTT ingest stopped; every admitted reading is on the bus");
    }
}

/// Drops the connections of cars as soon as the revocations file names them, and of service
/// accounts as soon as the accounts file no longer has them (checked every second; the files
/// themselves are re-read by their watchers).
async fn enforce_revocations(gateway: Arc<Gateway<EmbeddedBroker>>, shutdown: CancellationToken) {
    let mut revoked = gateway.revoked.as_ref().map(Reloading::current);
    let mut accounts = gateway.accounts.as_ref().map(Reloading::current);
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let now = gateway.revoked.as_ref().map(Reloading::current);
        if let (Some(now), Some(before)) = (&now, &revoked) {
            if !Arc::ptr_eq(now, before) {
                let dropped = gateway.drop_revoked(now);
                if dropped > 0 {
                    tracing::warn!(dropped, "revoked cars disconnected");
                }
            }
        }
        revoked = now;
        let now = gateway.accounts.as_ref().map(Reloading::current);
        if let (Some(now), Some(before)) = (&now, &accounts) {
            if !Arc::ptr_eq(now, before) {
                let dropped = gateway.drop_removed_accounts(now);
                if dropped > 0 {
                    tracing::warn!(dropped, "removed MQTT service accounts disconnected");
                }
            }
        }
        accounts = now;
    }
}

/// How a connection reached the gateway.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Transport {
    Tcp,
    WebSocket,
    Tls,
    SecureWebSocket,
}

/// The next connection on the TLS listener; never, without one.
async fn accept_tls(
    tls: Option<&(TcpListener, ServerTls)>,
) -> std::io::Result<(tokio::net::TcpStream, SocketAddr)> {
    match tls {
        Some((listener, _)) => listener.accept().await,
        None => std::future::pending().await,
    }
}

/// Counts a connection that ended before it became MQTT (a failed handshake).
fn note_handshake_end(reason: &'static str) {
    ::metrics::counter!(metrics::CONNECTIONS_ENDED, "reason" => reason).increment(1);
}

/// Serves an MQTT-over-WebSocket connection; `None` when its handshake failed.
async fn serve_websocket<S>(
    gateway: Arc<Gateway<EmbeddedBroker>>,
    stream: S,
    admitted: bool,
    certified: Option<Box<ecars_runtime::tls::PeerCertificate>>,
    shutdown: CancellationToken,
) -> Option<Ended>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    match websocket::accept(stream).await {
        Ok(pipe) => {
            Some(connection::serve_connection(gateway, pipe, admitted, certified, shutdown).await)
        }
        Err(e) => {
            note_handshake_end(match e {
                websocket::HandshakeError::Timeout(_) => "websocket_handshake_timeout",
                websocket::HandshakeError::WebSocket(_) => "websocket_handshake_failed",
            });
            tracing::debug!(error = %e, "WebSocket handshake failed");
            None
        }
    }
}

/// Serves an MQTT-over-TLS connection (`websocket`: MQTT over a WebSocket inside the TLS): the
/// handshake within [`websocket::HANDSHAKE_TIMEOUT`], a revoked certificate refused, the VIN of
/// a verified client certificate as the car's identity. `None` when a handshake failed or the
/// certificate is revoked.
async fn serve_tls(
    gateway: Arc<Gateway<EmbeddedBroker>>,
    acceptor: tokio_rustls::TlsAcceptor,
    stream: tokio::net::TcpStream,
    websocket: bool,
    admitted: bool,
    shutdown: CancellationToken,
) -> Option<Ended> {
    let stream =
        match tokio::time::timeout(websocket::HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
            Ok(Ok(stream)) => stream,
            Ok(Err(e)) => {
                // Counted, and logged at debug only: anyone can fail a handshake on purpose.
                note_handshake_end("tls_handshake_failed");
                tracing::debug!(error = %e, "TLS handshake failed");
                return None;
            }
            Err(_) => {
                note_handshake_end("tls_handshake_timeout");
                return None;
            }
        };
    let peer = ecars_runtime::tls::peer_certificate(stream.get_ref().1);
    if let Some(peer) = &peer {
        let revoked = gateway
            .revoked
            .as_ref()
            .is_some_and(|r| r.current().serial(&peer.serial));
        if revoked {
            ::metrics::counter!(metrics::MQTT_CONNECTIONS_REFUSED, "reason" => "revoked_certificate")
                .increment(1);
            tracing::debug!(serial = peer.serial, "a revoked certificate was refused");
            return None;
        }
    }
    let certified = peer.map(Box::new);
    if websocket {
        return serve_websocket(gateway, stream, admitted, certified, shutdown).await;
    }
    Some(connection::serve_connection(gateway, stream, admitted, certified, shutdown).await)
}

/// Counts how a connection ended; protocol violations are logged, at a bounded rate (a peer can
/// send them as fast as it likes).
fn note_end(ended: &Ended) {
    ::metrics::counter!(metrics::CONNECTIONS_ENDED, "reason" => ended.code()).increment(1);
    if let Ended::Violation(violation) = ended {
        ::metrics::counter!(metrics::PROTOCOL_VIOLATIONS, "reason" => violation.kind.code())
            .increment(1);
        if VIOLATION_LOG.allow() {
            tracing::info!(reason = violation.kind.code(), detail = %violation.detail, "MQTT connection closed for a protocol violation");
        }
    } else {
        tracing::debug!(reason = ended.code(), detail = %ended, "MQTT connection ended");
    }
}

/// Log lines about protocol violations: at most a few per second, whatever the peers send.
static VIOLATION_LOG: ecars_runtime::logging::LogBudget =
    ecars_runtime::logging::LogBudget::per_second(5);

/// Binds and serves (without TLS): the service's entry point.
pub async fn run(
    config: IngestConfig,
    bus: Bus,
    shutdown: CancellationToken,
) -> Result<(), IngestError> {
    BoundIngest::bind(&config, bus, None)
        .await?
        .run(shutdown)
        .await;
    Ok(())
}
