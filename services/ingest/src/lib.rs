//! MQTT ingest: an embedded rumqttd broker behind a gateway that authenticates cars and admits
//! their telemetry to the bus.
//!
//! ```text
//! car ──MQTT/TCP or WS──▶ gateway ──(valid reading)──▶ bus ──▶ workers
//!                           │  └─(rejected)──▶ bus (dead letters)
//!                           └──forward──▶ rumqttd ──▶ other MQTT subscribers
//! ```

pub mod broker;
pub mod gateway;
pub mod metrics;
pub mod websocket;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Args;
use ecars_bus::Bus;
use ecars_runtime::settings::{is_loopback, value_or_file, ConfigError};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use broker::{BrokerError, EmbeddedBroker};
pub use ecars_model::device_auth::DeviceSecret;
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
    /// Most MQTT connections served at once.
    #[arg(
        long = "mqtt-max-connections",
        env = "ECARS_MQTT_MAX_CONNECTIONS",
        default_value_t = 20_000
    )]
    pub max_connections: usize,
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
pub struct BoundIngest {
    gateway: Arc<Gateway>,
    tcp: TcpListener,
    ws: TcpListener,
}

impl BoundIngest {
    /// Validates the settings, starts the embedded broker and binds both listeners.
    pub async fn bind(config: &IngestConfig, bus: Bus) -> Result<BoundIngest, IngestError> {
        let device_secret = config.device_secret()?;
        config.check_exposure(device_secret.as_ref())?;
        let bind = |setting: &'static str, addr: SocketAddr| async move {
            listen(addr).map_err(|source| IngestError::Bind {
                setting,
                addr,
                source,
            })
        };
        let tcp = bind("--mqtt-addr / ECARS_MQTT_ADDR", config.mqtt_addr).await?;
        let ws = bind("--mqtt-ws-addr / ECARS_MQTT_WS_ADDR", config.mqtt_ws_addr).await?;
        let broker = EmbeddedBroker::start(config.max_connections).await?;
        Ok(BoundIngest {
            gateway: Arc::new(Gateway::new(bus, broker, device_secret)),
            tcp,
            ws,
        })
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
    /// packet it is admitting, and returns once all are closed.
    pub async fn run(self, shutdown: CancellationToken) {
        tracing::info!(
            mqtt = %self.tcp.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            websocket = %self.ws.local_addr().map(|a| a.to_string()).unwrap_or_default(),
            device_auth = self.gateway.device_secret.is_some(),
            "MQTT ingest listening"
        );
        let tracker = TaskTracker::new();
        loop {
            let (stream, peer, websocket) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = self.tcp.accept() => match accepted {
                    Ok((s, p)) => (s, p, false),
                    Err(e) => { tracing::warn!(error = %e, "MQTT accept failed"); continue }
                },
                accepted = self.ws.accept() => match accepted {
                    Ok((s, p)) => (s, p, true),
                    Err(e) => { tracing::warn!(error = %e, "MQTT WebSocket accept failed"); continue }
                },
            };
            let _ = stream.set_nodelay(true);
            let gateway = Arc::clone(&self.gateway);
            let shutdown = shutdown.clone();
            tracker.spawn(async move {
                let result = if websocket {
                    match websocket::accept(stream).await {
                        Ok(pipe) => gateway::serve_connection(gateway, pipe, peer, shutdown).await,
                        Err(e) => {
                            tracing::debug!(%peer, error = %e, "WebSocket handshake failed");
                            Ok(())
                        }
                    }
                } else {
                    gateway::serve_connection(gateway, stream, peer, shutdown).await
                };
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "MQTT connection ended");
                }
            });
        }
        tracker.close();
        tracker.wait().await;
        tracing::info!("MQTT ingest stopped; every admitted reading is on the bus");
    }
}

/// Binds and serves: the service's entry point.
pub async fn run(
    config: IngestConfig,
    bus: Bus,
    shutdown: CancellationToken,
) -> Result<(), IngestError> {
    BoundIngest::bind(&config, bus).await?.run(shutdown).await;
    Ok(())
}
