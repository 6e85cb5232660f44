//! The embedded rumqttd broker. It listens on loopback ports of its own (for MQTT 3.1.1 and for
//! MQTT 5) that only the gateway uses, with an internal credential, so nothing reaches it
//! without passing the gateway's checks.
//!
//! A car that only sends telemetry never reaches it: the gateway answers such a car itself. A
//! client that subscribes, publishes on other topics or leaves a will gets a link of its own
//! ([`EmbeddedBroker`] as a [`Broker`]), opened when it first needs one.
//!
//! Accepted telemetry reaches the broker's MQTT subscribers through one in-process link into its
//! router, the [`TelemetryFanout`], and only while some subscription could match a telemetry
//! topic (the usual case, where services read the bus, costs the router nothing).

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ecars_model::telemetry::TelemetryTopic;
use rand::distr::{Alphanumeric, SampleString};
use rumqttd::protocol::{Packet, Publish, PublishProperties};
use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};
use tokio::io::{AsyncWriteExt, BufWriter};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::sync::{mpsc, oneshot};

use crate::codec::{packet_type, FrameReader, PacketType, Version};
use crate::connection::{Broker, BrokerLink, ConnectRequest, LinkError};

pub use crate::codec::MAX_PACKET_BYTES;

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

/// Listeners per protocol version. rumqttd serves each listener on a thread of its own and
/// accepts at most one connection per turn of that thread's timer: with one listener, 1,000 cars
/// connecting at once queued for seconds (and overflowed the accept queue, costing SYN
/// retransmissions of a second each).
const LISTENERS_PER_VERSION: usize = 4;

/// A running embedded broker: where the gateway reaches it and how it logs in.
#[derive(Clone, Debug)]
pub struct EmbeddedBroker {
    /// MQTT 3.1.1 listeners.
    v4_addrs: Vec<SocketAddr>,
    /// MQTT 5 listeners.
    v5_addrs: Vec<SocketAddr>,
    /// Spreads connections over the listeners.
    next_listener: Arc<AtomicUsize>,
    /// Internal username the gateway presents.
    username: String,
    /// Internal password the gateway presents (random per process).
    password: String,
}

/// Readings waiting for the broker's router, at most. A full queue makes the gateway wait (and
/// so the cars): backpressure rather than memory that grows with a stalled router.
const FANOUT_QUEUE: usize = 8192;

/// Most readings handed to the router at once: one wake-up of the router per batch.
const FANOUT_BATCH: usize = 1024;

/// How long the fan-out lets readings gather after a batch short of [`FANOUT_BATCH`], before it
/// waits for more. Without it the thread went back to sleep after nearly every reading, so
/// each car's connection paid a thread wake-up (a `futex` call) per reading and the router a
/// wake-up per reading or two; a subscriber gets its readings at most this much later (they
/// reach it after their commit, tens of milliseconds, anyway).
const FANOUT_LINGER: std::time::Duration = std::time::Duration::from_millis(1);

/// Accepted telemetry on its way to the broker's MQTT subscribers, through one in-process link
/// of the router (no socket, no acknowledgement: the gateway has already acknowledged it).
///
/// Every client reaches the broker through the gateway, so the gateway tells the fan-out about
/// each SUBSCRIBE and UNSUBSCRIBE, and readings skip the router while no subscription could
/// match a telemetry topic. Retained readings always go, so a later subscriber finds them.
#[derive(Clone, Debug)]
pub struct TelemetryFanout {
    queue: mpsc::Sender<QueuedPublish>,
    subscriptions: Arc<TelemetrySubscriptions>,
}

/// A PUBLISH waiting for the router, and who waits for it to be there.
#[derive(Debug)]
struct QueuedPublish {
    packet: Packet,
    /// Fired once the packet is in the router's event channel (a retained message's PUBACK
    /// waits for it).
    in_router: Option<oneshot::Sender<()>>,
}

/// Which sessions hold a subscription that can match a telemetry topic.
#[derive(Debug, Default)]
struct TelemetrySubscriptions {
    /// Client id → (the connection that last changed it, its telemetry filters). A persistent
    /// session keeps its entry after a disconnect: the broker keeps its subscriptions too.
    by_client: Mutex<HashMap<String, (u64, HashSet<String>)>>,
    /// Whether `by_client` has any entry: read on every reading, without the lock.
    any: AtomicBool,
    /// Numbers connections, so a clean session's old connection, ending after a new one with the
    /// same client id took over, does not remove the new one's subscriptions.
    connections: AtomicU64,
}

impl TelemetrySubscriptions {
    fn update(&self, change: impl FnOnce(&mut HashMap<String, (u64, HashSet<String>)>)) {
        let mut map = self.by_client.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut map);
        map.retain(|_, (_, filters)| !filters.is_empty());
        self.any.store(!map.is_empty(), Ordering::Release);
    }
}

/// One client connection's view of the fan-out's subscription registry.
#[derive(Debug)]
pub struct SubscriberSession {
    subscriptions: Arc<TelemetrySubscriptions>,
    client_id: String,
    connection: u64,
    clean: bool,
}

impl SubscriberSession {
    /// Notes the filters of a SUBSCRIBE that can match telemetry.
    pub fn subscribed<'f>(&self, filters: impl IntoIterator<Item = &'f str>) {
        let telemetry: Vec<&str> = filters
            .into_iter()
            .filter(|f| TelemetryTopic::filter_may_match(f))
            .collect();
        if telemetry.is_empty() {
            return;
        }
        self.subscriptions.update(|map| {
            let entry = map
                .entry(self.client_id.clone())
                .or_insert_with(|| (self.connection, HashSet::new()));
            entry.0 = self.connection;
            entry.1.extend(telemetry.into_iter().map(str::to_owned));
        });
    }

    /// Notes the filters of an UNSUBSCRIBE.
    pub fn unsubscribed<'f>(&self, filters: impl IntoIterator<Item = &'f str>) {
        let filters: Vec<&str> = filters.into_iter().collect();
        self.subscriptions.update(|map| {
            if let Some((_, held)) = map.get_mut(&self.client_id) {
                for filter in filters {
                    held.remove(filter);
                }
            }
        });
    }
}

impl Drop for SubscriberSession {
    /// A clean session's subscriptions end with its connection.
    fn drop(&mut self) {
        if self.clean {
            self.subscriptions.update(|map| {
                if map.get(&self.client_id).map(|(c, _)| *c) == Some(self.connection) {
                    map.remove(&self.client_id);
                }
            });
        }
    }
}

/// The router is gone (the broker stopped): nothing can reach MQTT subscribers any more.
#[derive(Debug, thiserror::Error)]
#[error("the embedded broker's router stopped")]
pub struct FanoutClosed;

impl TelemetryFanout {
    /// A fan-out into no router (tests of the gateway without a broker).
    #[cfg(test)]
    pub(crate) fn disconnected() -> TelemetryFanout {
        TelemetryFanout {
            queue: mpsc::channel(1).0,
            subscriptions: Arc::default(),
        }
    }

    /// A fan-out into a router played by the test: each batch waits for a `()` on `release`
    /// before the router takes it, then its number of packets is sent on `routed`.
    #[cfg(test)]
    pub(crate) fn held_by_test(
        release: std::sync::mpsc::Receiver<()>,
        routed: std::sync::mpsc::Sender<usize>,
    ) -> TelemetryFanout {
        let (queue, queued) = mpsc::channel(8);
        std::thread::spawn(move || {
            TelemetryFanout::forward(queued, |packets| {
                release.recv().is_ok() && routed.send(packets.len()).is_ok()
            })
        });
        TelemetryFanout {
            queue,
            subscriptions: Arc::default(),
        }
    }

    /// Registers a client connection. A clean session starts without the subscriptions a
    /// previous session of the same client id held.
    pub fn session(&self, client_id: &str, clean_session: bool) -> SubscriberSession {
        let connection = self
            .subscriptions
            .connections
            .fetch_add(1, Ordering::Relaxed);
        if clean_session {
            self.subscriptions.update(|map| {
                map.remove(client_id);
            });
        }
        SubscriberSession {
            subscriptions: Arc::clone(&self.subscriptions),
            client_id: client_id.to_owned(),
            connection,
            clean: clean_session,
        }
    }

    /// Whether a reading must go to the broker: some subscription could match it, or it is
    /// retained.
    pub fn wanted(&self, retain: bool) -> bool {
        retain || self.subscriptions.any.load(Ordering::Acquire)
    }

    /// Queues one accepted PUBLISH (topic, payload, retain flag and MQTT 5 properties are kept)
    /// for the broker's subscribers; waits while the queue is full. A retained one is waited
    /// for until it is in the router: the router takes events in order, so a SUBSCRIBE that
    /// reaches it afterwards (a client that saw the PUBACK) is sent the retained message.
    pub async fn publish(
        &self,
        topic: bytes::Bytes,
        payload: bytes::Bytes,
        retain: bool,
        properties: Option<PublishProperties>,
    ) -> Result<(), FanoutClosed> {
        let (in_router, delivered) = if retain {
            let (tx, rx) = oneshot::channel();
            (Some(tx), Some(rx))
        } else {
            (None, None)
        };
        let queued = QueuedPublish {
            packet: Packet::Publish(Publish::new(topic, payload, retain), properties),
            in_router,
        };
        self.queue.send(queued).await.map_err(|_| FanoutClosed)?;
        match delivered {
            Some(delivered) => delivered.await.map_err(|_| FanoutClosed),
            None => Ok(()),
        }
    }

    /// Moves queued packets into the router, a batch per wake-up, on its own thread:
    /// `into_router` blocks when the router's event channel is full, and says whether the router
    /// is still there.
    fn forward(
        mut queue: mpsc::Receiver<QueuedPublish>,
        mut into_router: impl FnMut(&mut Vec<Packet>) -> bool,
    ) {
        let mut batch = Vec::with_capacity(FANOUT_BATCH);
        let mut packets = Vec::with_capacity(FANOUT_BATCH);
        let mut waiting = Vec::new();
        while queue.blocking_recv_many(&mut batch, FANOUT_BATCH) > 0 {
            let short = batch.len() < FANOUT_BATCH;
            for queued in batch.drain(..) {
                packets.push(queued.packet);
                waiting.extend(queued.in_router);
            }
            if !into_router(&mut packets) {
                tracing::error!(
                    "embedded broker's router stopped: MQTT subscribers get no telemetry"
                );
                return;
            }
            packets.clear();
            for in_router in waiting.drain(..) {
                // The publisher may have gone; then nobody is waiting.
                let _ = in_router.send(());
            }
            if short {
                std::thread::sleep(FANOUT_LINGER);
            }
        }
    }
}

impl EmbeddedBroker {
    /// Starts rumqttd on free loopback ports and waits until they accept connections; returns
    /// the broker and the fan-out into its router.
    pub async fn start(
        max_connections: usize,
    ) -> Result<(EmbeddedBroker, TelemetryFanout), BrokerError> {
        let ports = || {
            (0..LISTENERS_PER_VERSION)
                .map(|_| free_loopback_port())
                .collect::<Result<Vec<_>, _>>()
        };
        let (v4_addrs, v5_addrs) = (ports()?, ports()?);
        let username = "ecars-gateway".to_owned();
        let password = Alphanumeric.sample_string(&mut rand::rng(), 32);
        // One more connection than the cars: the fan-out link.
        let config = broker_config(
            &v4_addrs,
            &v5_addrs,
            &username,
            &password,
            max_connections + 1,
        );
        let mut broker = rumqttd::Broker::new(config);
        // The link never subscribes, so nothing arrives on its receiving half; it is kept open
        // (moved into the fan-out thread) so the router never sees it disconnect.
        let (mut link, link_rx) = broker
            .link("ecars-gateway-fanout")
            .map_err(|e| BrokerError::Start(format!("fan-out link: {e}")))?;
        std::thread::Builder::new()
            .name("rumqttd".into())
            .spawn(move || {
                if let Err(e) = broker.start() {
                    tracing::error!(error = %e, "embedded MQTT broker stopped");
                }
            })
            .map_err(|e| BrokerError::Start(e.to_string()))?;
        let (queue, queued) = mpsc::channel(FANOUT_QUEUE);
        let runtime = tokio::runtime::Handle::current();
        std::thread::Builder::new()
            .name("mqtt-fanout".into())
            .spawn(move || {
                TelemetryFanout::forward(queued, |packets| {
                    let Some(last) = packets.pop() else {
                        return true;
                    };
                    link.buffer().extend(packets.drain(..));
                    // One event makes the router take everything in the link's buffer.
                    runtime.block_on(link.send(last)).is_ok()
                });
                drop(link_rx);
            })
            .map_err(|e| BrokerError::Start(e.to_string()))?;
        for addr in v4_addrs.iter().chain(&v5_addrs) {
            wait_until_listening(*addr).await?;
        }
        Ok((
            EmbeddedBroker {
                v4_addrs,
                v5_addrs,
                next_listener: Arc::default(),
                username,
                password,
            },
            TelemetryFanout {
                queue,
                subscriptions: Arc::default(),
            },
        ))
    }

    /// The listener for the next connection of this MQTT version (3.1.1 or 5).
    pub fn listener(&self, mqtt5: bool) -> SocketAddr {
        let addrs = if mqtt5 {
            &self.v5_addrs
        } else {
            &self.v4_addrs
        };
        addrs[self.next_listener.fetch_add(1, Ordering::Relaxed) % addrs.len()]
    }
}

/// A client's link into the embedded broker: a loopback connection of its own.
#[derive(Debug)]
pub struct TcpLink {
    reader: FrameReader<OwnedReadHalf>,
    writer: BufWriter<OwnedWriteHalf>,
}

impl BrokerLink for TcpLink {
    async fn send(&mut self, frame: &[u8]) -> Result<(), LinkError> {
        Ok(self.writer.write_all(frame).await?)
    }

    async fn flush(&mut self) -> Result<(), LinkError> {
        Ok(self.writer.flush().await?)
    }

    async fn next(&mut self) -> Result<Option<crate::codec::Frame>, LinkError> {
        Ok(self.reader.next().await?)
    }

    fn has_whole_packet(&self) -> bool {
        self.reader.has_whole_packet()
    }
}

impl Broker for EmbeddedBroker {
    type Link = TcpLink;

    async fn open(&self, request: &ConnectRequest) -> Result<(TcpLink, bool), LinkError> {
        let stream =
            tokio::net::TcpStream::connect(self.listener(request.version == Version::V5)).await?;
        stream.set_nodelay(true)?;
        let (read, write) = stream.into_split();
        let mut link = TcpLink {
            reader: FrameReader::new(read),
            writer: BufWriter::with_capacity(4096, write),
        };
        let login = rumqttd::protocol::Login {
            username: self.username.clone(),
            password: self.password.clone(),
        };
        let connect = request
            .encode(login)
            .map_err(|e| LinkError::Protocol(e.to_string()))?;
        link.send(&connect).await?;
        link.flush().await?;
        let Some((header, frame)) = link.next().await? else {
            return Err(LinkError::Protocol(
                "the broker closed before CONNACK".into(),
            ));
        };
        if packet_type(&header).ok() != Some(PacketType::ConnAck) {
            return Err(LinkError::Protocol(
                "the broker's first packet is not CONNACK".into(),
            ));
        }
        let body = frame.slice(header.fixed_header_len..);
        match (body.first(), body.get(1)) {
            (Some(flags), Some(0)) => Ok((link, flags & 1 == 1)),
            (_, code) => Err(LinkError::Protocol(format!(
                "the broker refused the session (code {code:?})"
            ))),
        }
    }
}

fn broker_config(
    v4: &[SocketAddr],
    v5: &[SocketAddr],
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
    let servers = |version: &str, addrs: &[SocketAddr]| {
        addrs
            .iter()
            .enumerate()
            .map(|(i, listen)| {
                let name = format!("internal-{version}-{i}");
                let settings = ServerSettings {
                    name: name.clone(),
                    listen: *listen,
                    tls: None,
                    next_connection_delay_ms: 0,
                    connections: connections.clone(),
                };
                (name, settings)
            })
            .collect::<HashMap<_, _>>()
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
        v4: Some(servers("v4", v4)),
        v5: Some(servers("v5", v5)),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn fanout() -> TelemetryFanout {
        TelemetryFanout {
            queue: mpsc::channel(1).0,
            subscriptions: Arc::default(),
        }
    }

    /// A retained reading's PUBLISH returns only once the router has it (its PUBACK waits for
    /// that); another returns once queued.
    #[tokio::test]
    async fn a_retained_reading_is_published_once_it_is_in_the_router() {
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (router, routed) = std::sync::mpsc::channel::<usize>();
        // The router takes nothing until the test lets it.
        let fanout = TelemetryFanout::held_by_test(released, router);
        let publish = |retain| {
            let fanout = fanout.clone();
            async move {
                let topic = bytes::Bytes::from_static(b"vehicles/1HGCM82633A004352/telemetry");
                let payload = bytes::Bytes::from_static(br#"{"battery":80}"#);
                fanout.publish(topic, payload, retain, None).await
            }
        };
        publish(false).await.expect("queued without the router");
        let mut retained = tokio::spawn(publish(true));
        let early = tokio::time::timeout(Duration::from_millis(300), &mut retained).await;
        assert!(early.is_err(), "returned before the router had it");
        release.send(()).unwrap();
        let mut in_router = routed.recv().unwrap();
        if in_router < 2 {
            release.send(()).unwrap();
            in_router += routed.recv().unwrap();
        }
        assert_eq!(in_router, 2);
        retained.await.unwrap().expect("in the router");
    }

    #[test]
    fn readings_go_to_the_broker_only_while_a_telemetry_subscription_exists() {
        let fanout = fanout();
        assert!(!fanout.wanted(false));
        assert!(fanout.wanted(true), "retained readings always go");

        let listener = fanout.session("listener", true);
        listener.subscribed(["fleet/notices"]);
        assert!(!fanout.wanted(false), "not a telemetry filter");
        listener.subscribed(["vehicles/+/telemetry", "ecars/data"]);
        assert!(fanout.wanted(false));
        listener.unsubscribed(["vehicles/+/telemetry"]);
        assert!(fanout.wanted(false), "ecars/data is still subscribed");
        listener.unsubscribed(["ecars/data"]);
        assert!(!fanout.wanted(false));

        listener.subscribed(["#"]);
        drop(listener);
        assert!(
            !fanout.wanted(false),
            "a clean session ends with its connection"
        );
    }

    #[test]
    fn persistent_sessions_keep_their_subscriptions_until_a_clean_start() {
        let fanout = fanout();
        let first = fanout.session("dashboard", false);
        first.subscribed(["ecars/#"]);
        drop(first);
        assert!(
            fanout.wanted(false),
            "the broker still queues for the session"
        );
        let back = fanout.session("dashboard", false);
        assert!(fanout.wanted(false));
        drop(back);
        let clean = fanout.session("dashboard", true);
        assert!(
            !fanout.wanted(false),
            "a clean start discards the old session"
        );
        drop(clean);
    }

    #[test]
    fn an_old_connection_ending_late_leaves_the_new_one_subscribed() {
        let fanout = fanout();
        let old = fanout.session("car-app", true);
        old.subscribed(["vehicles/#"]);
        let new = fanout.session("car-app", true);
        new.subscribed(["vehicles/#"]);
        drop(old);
        assert!(fanout.wanted(false));
        drop(new);
        assert!(!fanout.wanted(false));
    }

    /// An idle car is its task: the connection's future. It stays a few KiB (it was 4 KiB
    /// before the rare paths, CONNECT, goodbye and fan-out, were boxed); the rest of a car's
    /// cost is a descriptor and its socket's registration.
    #[tokio::test]
    async fn an_idle_cars_task_stays_small() {
        let bus = ecars_bus::Bus::in_process(10);
        let (broker, fanout) = EmbeddedBroker::start(10).await.unwrap();
        let gateway = Arc::new(crate::gateway::Gateway::new(
            bus, broker, fanout, None, None, 10,
        ));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let car = tokio::net::TcpStream::connect(listener.local_addr().unwrap());
        let (car, accepted) = tokio::join!(car, listener.accept());
        let (_car, (stream, _)) = (car.unwrap(), accepted.unwrap());
        let task = crate::connection::serve_connection(
            gateway,
            stream,
            true,
            None,
            tokio_util::sync::CancellationToken::new(),
        );
        let size = std::mem::size_of_val(&task);
        assert!(size <= 3 * 1024 + 512, "a car's task takes {size} bytes");
    }
}
