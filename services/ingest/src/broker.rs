//! The embedded rumqttd broker. It listens on loopback ports of its own (one for MQTT 3.1.1, one
//! for MQTT 5) that only the gateway uses, with an internal credential, so nothing reaches it
//! without passing the gateway's checks.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::time::Duration;

use rand::distr::{Alphanumeric, SampleString};
use rumqttd::{Broker, Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Largest MQTT packet the gateway and broker carry, in bytes (telemetry itself is capped lower,
/// at 64 KiB, and larger telemetry is dead-lettered rather than refused).
pub const MAX_PACKET_BYTES: usize = 1024 * 1024;

/// Errors starting the broker.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// No free loopback port.
    #[error("no free loopback port for the embedded broker: {0}")]
    Port(std::io::Error),
    /// The broker thread could not start.
    #[error("embedded broker failed to start: {0}")]
    Start(String),
}

/// A running embedded broker: where the gateway reaches it and how it logs in.
#[derive(Clone, Debug)]
pub struct EmbeddedBroker {
    /// MQTT 3.1.1 listener.
    pub v4_addr: SocketAddr,
    /// MQTT 5 listener.
    pub v5_addr: SocketAddr,
    /// Internal username the gateway presents.
    pub username: String,
    /// Internal password the gateway presents (random per process).
    pub password: String,
}

impl EmbeddedBroker {
    /// Starts rumqttd on two free loopback ports and waits until both accept connections.
    pub async fn start(max_connections: usize) -> Result<EmbeddedBroker, BrokerError> {
        let v4_addr = free_loopback_port()?;
        let v5_addr = free_loopback_port()?;
        let username = "ecars-gateway".to_owned();
        let password = Alphanumeric.sample_string(&mut rand::rng(), 32);
        let config = broker_config(v4_addr, v5_addr, &username, &password, max_connections);
        std::thread::Builder::new()
            .name("rumqttd".into())
            .spawn(move || {
                let mut broker = Broker::new(config);
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "embedded MQTT broker stopped");
                }
            })
            .map_err(|e| BrokerError::Start(e.to_string()))?;
        for addr in [v4_addr, v5_addr] {
            wait_until_listening(addr).await?;
        }
        Ok(EmbeddedBroker {
            v4_addr,
            v5_addr,
            username,
            password,
        })
    }
}

fn broker_config(
    v4: SocketAddr,
    v5: SocketAddr,
    user: &str,
    password: &str,
    max_connections: usize,
) -> Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: MAX_PACKET_BYTES,
        max_inflight_count: 500,
        auth: Some(HashMap::from([(user.to_owned(), password.to_owned())])),
        external_auth: None,
        dynamic_filters: false,
    };
    let server = |name: &str, listen| ServerSettings {
        name: name.to_owned(),
        listen,
        tls: None,
        next_connection_delay_ms: 0,
        connections: connections.clone(),
    };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections,
            max_outgoing_packet_count: 200,
            // One commit log for every topic ("#") plus one per subscribed filter, each at most
            // 4 x 4 MiB: memory stays bounded however many cars publish.
            max_segment_size: 4 * 1024 * 1024,
            max_segment_count: 4,
            custom_segment: None,
            initialized_filters: Some(vec!["#".to_owned()]),
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([(
            "v4".to_owned(),
            server("internal-v4", v4),
        )])),
        v5: Some(HashMap::from([(
            "v5".to_owned(),
            server("internal-v5", v5),
        )])),
        ws: None,
        cluster: None,
        console: None,
        bridge: None,
        prometheus: None,
        metrics: None,
    }
}

fn free_loopback_port() -> Result<SocketAddr, BrokerError> {
    let listener = TcpListener::bind("127.0.0.1:0").map_err(BrokerError::Port)?;
    listener.local_addr().map_err(BrokerError::Port)
}

async fn wait_until_listening(addr: SocketAddr) -> Result<(), BrokerError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::net::TcpStream::connect(addr).await {
            Ok(_) => return Ok(()),
            Err(e) if tokio::time::Instant::now() >= deadline => {
                return Err(BrokerError::Start(format!(
                    "{addr} does not accept connections: {e}"
                )))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}
