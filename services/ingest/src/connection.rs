//! One client connection: its packets read in order and each handled in turn, the answers
//! written in the same order, the keep-alive enforced, and — only when the client needs it — a
//! link into the embedded broker.
//!
//! A car that sends telemetry and pings needs no broker at all: the gateway answers CONNECT,
//! PINGREQ, PUBLISH (after the bus has the reading) and PUBREL itself, so the car costs one
//! socket and a few KiB. A client that subscribes, publishes on other topics or leaves a will
//! gets a link into the broker ([`Broker::open`]), opened when it first needs one; the broker's
//! answers take their place in the client's order ([`Answers`]).
//!
//! The loop is generic over the client's byte stream and over the broker, so the protocol rules
//! are tested over in-memory pipes with a broker of the test's making.

use std::collections::HashSet;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use chrono::Utc;
use ecars_bus::BusError;
use ecars_model::device_auth::DeviceSecret;
use ecars_model::{Connectivity, ConnectivityEvent, DisconnectReason, Vin};
use ecars_runtime::tls::PeerCertificate;
use futures_util::stream::FuturesOrdered;
use futures_util::StreamExt;
use rumqttd::protocol::v4::FixedHeader;
use rumqttd::protocol::{
    Connect, ConnectProperties, LastWill, LastWillProperties, Login, Packet, SubAck, Subscribe,
    SubscribeProperties, SubscribeReasonCode,
};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::admission::{judge, Verdict};
use crate::authorization::{Identity, NotAuthorized};
use crate::codec::{
    accepted_connack, ack_packet, connect_version, decode, disconnect, encode, is_broker_private,
    packet_id, packet_type, parse_publish, protocol_error, refused_connack, Accepted, Frame,
    FrameReader, Malformed, PacketType, PublishView, ReadError, Refusal, Version, Violation,
    PINGRESP, REASON_KEEP_ALIVE_TIMEOUT, REASON_NOT_AUTHORIZED, REASON_SESSION_TAKEN_OVER,
};
use crate::gateway::{Gateway, Registration};
use crate::metrics as m;
use crate::session::{Answers, KeepAlive, PublishThrottle, Releases};

/// How long a new connection may take to send CONNECT.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Most packets of one connection on their way to the bus at once. Kafka acknowledges after a
/// round trip; keeping several in flight (in order) lets one car publish faster than one
/// reading per round trip, while the bound keeps memory flat.
const MAX_IN_FLIGHT: usize = 128;

/// Packets (and answers) a connection handles before it lets the other tasks run.
const PACKETS_PER_TURN: usize = 32;

/// The client's CONNECT, kept to open its broker session when it first needs one.
#[derive(Clone, Debug)]
pub struct ConnectRequest {
    /// Its protocol version.
    pub version: Version,
    /// Client id, clean-session flag and the keep-alive of the broker link (the gateway pings
    /// the broker at half of it; the broker refuses 0), as the gateway settled them.
    pub connect: Connect,
    /// MQTT 5 CONNECT properties.
    pub properties: Option<ConnectProperties>,
    /// The will, if any.
    pub will: Option<LastWill>,
    /// The will's MQTT 5 properties.
    pub will_properties: Option<LastWillProperties>,
}

impl ConnectRequest {
    /// The CONNECT the broker gets: the client's, logging in with `login` (the gateway's own
    /// credential).
    pub fn encode(&self, login: Login) -> Result<Bytes, Malformed> {
        let connect = self.connect.clone();
        let packet = match self.version {
            Version::V4 => Packet::Connect(connect, None, self.will.clone(), None, Some(login)),
            Version::V5 => Packet::Connect(
                connect,
                self.properties.clone(),
                self.will.clone(),
                self.will_properties.clone(),
                Some(login),
            ),
        };
        encode(self.version, packet)
    }
}

/// The broker behind the gateway, as a connection sees it.
pub trait Broker: Send + Sync + 'static {
    /// A client's link into the broker.
    type Link: BrokerLink;

    /// Opens `request`'s session in the broker; returns the link and whether the broker had a
    /// session for the client id.
    fn open(
        &self,
        request: &ConnectRequest,
    ) -> impl Future<Output = Result<(Self::Link, bool), LinkError>> + Send;
}

/// One client's link into the broker.
pub trait BrokerLink: Send {
    /// Queues a whole packet for the broker.
    fn send(&mut self, frame: &[u8]) -> impl Future<Output = Result<(), LinkError>> + Send;
    /// Sends what was queued.
    fn flush(&mut self) -> impl Future<Output = Result<(), LinkError>> + Send;
    /// The broker's next packet to the client; `None` when the broker ended the session.
    /// Cancel-safe.
    fn next(&mut self) -> impl Future<Output = Result<Option<Frame>, LinkError>> + Send;
    /// Whether [`BrokerLink::next`] has a whole packet without waiting for I/O: the broker
    /// writes a subscriber's messages in bursts, and the connection passes a burst on in one
    /// write to the client rather than one per message.
    fn has_whole_packet(&self) -> bool;
}

/// The broker link failed.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    /// Its socket failed.
    #[error("broker link: {0}")]
    Io(#[from] std::io::Error),
    /// The broker refused the session or broke the protocol.
    #[error("broker link: {0}")]
    Protocol(String),
}

impl From<ReadError> for LinkError {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Io(e) => LinkError::Io(e),
            ReadError::Malformed(e) => LinkError::Protocol(e.to_string()),
        }
    }
}

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum Ended {
    /// The client sent DISCONNECT (or, before its CONNECT, closed its socket).
    #[error("client disconnected")]
    ClientDisconnect,
    /// The client closed its socket without DISCONNECT: its network dropped, or it gave up.
    #[error("connection lost")]
    ConnectionLost,
    /// The client was silent for one and a half keep-alives.
    #[error("keep-alive timeout")]
    KeepAliveTimeout,
    /// Another connection took the client id over.
    #[error("session taken over")]
    TakenOver,
    /// The gateway is shutting down.
    #[error("server shutdown")]
    ServerShutdown,
    /// The client broke the protocol.
    #[error("protocol violation: {0}")]
    Violation(Malformed),
    /// The client's credentials were refused, or the gateway is full.
    #[error("refused at CONNECT")]
    Refused,
    /// The client closed its socket right after its CONNECT, before the gateway read it: it
    /// gave up waiting and connects again, so this CONNECT must not take its session over.
    #[error("client gone before CONNACK")]
    Abandoned,
    /// The car was revoked while connected (`ECARS_REVOKED_FILE`).
    #[error("revoked")]
    Revoked,
    /// The client sent no CONNECT in time.
    #[error("no CONNECT within {0:?}")]
    ConnectTimeout(Duration),
    /// The socket failed.
    #[error("connection error: {0}")]
    ConnectionError(#[from] std::io::Error),
    /// The broker ended the client's session or its link failed.
    #[error("{0}")]
    Broker(#[from] LinkError),
    /// The bus refused (shutdown): the connection closes without acknowledging, so the car
    /// sends the message again elsewhere or later.
    #[error("bus: {0}")]
    Bus(#[from] BusError),
}

impl Ended {
    /// Stable code for metric labels and logs.
    pub fn code(&self) -> &'static str {
        match self {
            Ended::ClientDisconnect => "client_disconnect",
            Ended::ConnectionLost => "connection_lost",
            Ended::KeepAliveTimeout => "keep_alive_timeout",
            Ended::TakenOver => "taken_over",
            Ended::Revoked => "revoked",
            Ended::ServerShutdown => "server_shutdown",
            Ended::Violation(_) => "protocol_violation",
            Ended::Refused => "refused",
            Ended::Abandoned => "abandoned",
            Ended::ConnectTimeout(_) => "connect_timeout",
            Ended::ConnectionError(_) => "connection_error",
            Ended::Broker(_) => "broker",
            Ended::Bus(_) => "bus",
        }
    }

    /// The reason a connectivity event gives for this end of a car's connection.
    pub fn disconnect_reason(&self) -> DisconnectReason {
        match self {
            Ended::ClientDisconnect => DisconnectReason::ClientDisconnect,
            Ended::KeepAliveTimeout => DisconnectReason::KeepAliveTimeout,
            Ended::TakenOver => DisconnectReason::TakenOver,
            Ended::Revoked => DisconnectReason::Revoked,
            // The bus refuses only when the node is stopping.
            Ended::ServerShutdown | Ended::Bus(_) => DisconnectReason::ServerShutdown,
            Ended::Violation(_) => DisconnectReason::ProtocolViolation,
            Ended::ConnectionLost
            | Ended::ConnectionError(_)
            | Ended::Broker(_)
            | Ended::Refused
            | Ended::Abandoned
            | Ended::ConnectTimeout(_) => DisconnectReason::ConnectionError,
        }
    }
}

impl From<ReadError> for Ended {
    fn from(e: ReadError) -> Self {
        match e {
            ReadError::Io(e) => Ended::ConnectionError(e),
            ReadError::Malformed(m) => Ended::Violation(m),
        }
    }
}

impl From<Malformed> for Ended {
    fn from(m: Malformed) -> Self {
        Ended::Violation(m)
    }
}

/// What an answer owes once its bus publish is done.
struct Owed {
    /// Its slot in [`Answers`].
    slot: u64,
    qos: u8,
    pkid: u16,
    /// The acknowledgement's MQTT 5 reason code (0: success).
    reason: u8,
    /// An accepted reading's PUBLISH, for the broker's MQTT subscribers.
    fanout: Option<PublishView>,
}

/// A publish on its way to the bus, with what it owes the client when it is there.
type InFlight<'a> = Pin<Box<dyn Future<Output = (Result<(), BusError>, Owed)> + Send + 'a>>;

/// Serves one client connection until it ends. `admitted` is false when the gateway is at its
/// connection limit: the client is then told so in its CONNACK.
pub async fn serve_connection<S, B>(
    gateway: Arc<Gateway<B>>,
    stream: S,
    admitted: bool,
    certified: Option<Box<PeerCertificate>>,
    shutdown: CancellationToken,
) -> Ended
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
    B: Broker,
{
    let (read, write) = tokio::io::split(stream);
    let mut client = FrameReader::new(read);
    let mut out = ClientWriter {
        write,
        buffer: BytesMut::new(),
    };
    let connected = tokio::select! {
        frame = tokio::time::timeout(CONNECT_TIMEOUT, client.next()) => match frame {
            Ok(Ok(Some(frame))) => frame,
            Ok(Ok(None)) => return Ended::ClientDisconnect,
            Ok(Err(e)) => return e.into(),
            Err(_) => return Ended::ConnectTimeout(CONNECT_TIMEOUT),
        },
        _ = shutdown.cancelled() => return Ended::ServerShutdown,
    };
    // Acting on an abandoned CONNECT would disconnect the car's newer connection (a takeover)
    // for nothing: nobody is there to read the CONNACK.
    if client.peer_closed() {
        return Ended::Abandoned;
    }
    // The CONNECT's handling and the goodbye are boxed: each runs once, and held inline their
    // futures would widen every idle car's task for its whole life.
    let mut connection = match Box::pin(Connection::start(
        &gateway, connected, admitted, certified, &mut out,
    ))
    .await
    {
        Ok(connection) => connection,
        Err(ended) => {
            let _ = out.flush().await;
            return ended;
        }
    };
    // Told in the background: the car's first packets need not wait for the bus. Its order
    // against this session's `disconnected` does not matter (the session's end wins).
    if let Some(event) = connection.connectivity(Connectivity::Connected, None) {
        let gateway = Arc::clone(&gateway);
        tokio::spawn(async move { gateway.announce(event).await });
    }
    let ended = connection.run(&mut client, &mut out, &shutdown).await;
    Box::pin(connection.finish(&mut out, &ended)).await;
    ended
}

/// Writes to the client through a buffer that grows with a burst and is given back after.
struct ClientWriter<W> {
    write: W,
    buffer: BytesMut,
}

impl<W: AsyncWrite + Unpin> ClientWriter<W> {
    async fn flush(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        self.write.write_all(&self.buffer).await?;
        self.write.flush().await?;
        self.buffer.clear();
        if self.buffer.capacity() > 16 * 1024 {
            self.buffer = BytesMut::new();
        }
        Ok(())
    }
}

/// A connection after CONNECT.
struct Connection<'g, B: Broker> {
    gateway: &'g Gateway<B>,
    request: ConnectRequest,
    registration: Registration,
    /// Who the client logged in as (`None` where clients are anonymous).
    identity: Option<Identity>,
    keep_alive: KeepAlive,
    link: Option<B::Link>,
    answers: Answers,
    releases: Releases,
    /// This connection in the fan-out's registry of telemetry subscriptions, once it subscribes.
    subscriber: Option<crate::broker::SubscriberSession>,
    /// SUBSCRIBEs the broker got without their refused filters: packet id and the refused
    /// filters' places, to put back into the broker's SUBACK.
    refused_filters: Vec<(u16, Vec<usize>)>,
    last_activity: Instant,
    /// The publish rate limit, where one is set (boxed: eight bytes in every car's task).
    throttle: Option<Box<PublishThrottle>>,
    /// This connection's session in connectivity events (UUIDv7: later connections sort
    /// after it).
    session_id: Uuid,
}

/// Who the CONNECT's credentials belong to: a service account when the username is an
/// account's name, else a car (username = VIN, password from the device secret). The error is
/// the refusal's code.
async fn authenticate<B>(
    gateway: &Gateway<B>,
    secret: &DeviceSecret,
    login: Option<&Login>,
) -> Result<Identity, &'static str> {
    let account = login.and_then(|l| {
        let accounts = gateway.accounts.as_ref()?.current();
        accounts.get(&l.username).cloned()
    });
    if let (Some(account), Some(login)) = (account, login) {
        // argon2 costs ~20 MiB and tens of milliseconds: one check at a time, off the runtime's
        // threads, so a flood of bad passwords costs one core at most.
        let Ok(_turn) = gateway.password_checks.acquire().await else {
            return Err("server_shutdown");
        };
        let password = login.password.clone();
        let checked = Arc::clone(&account);
        let good =
            tokio::task::spawn_blocking(move || checked.verify_password(password.as_bytes()))
                .await
                .unwrap_or(false);
        return if good {
            Ok(Identity::Account(account))
        } else {
            Err("wrong_password")
        };
    }
    let (user, pass) = match login {
        Some(l) => (Some(l.username.as_str()), Some(l.password.as_str())),
        None => (None, None),
    };
    secret
        .verify(user, pass)
        .map(Identity::Car)
        .map_err(|error| error.code())
}

impl<'g, B: Broker> Connection<'g, B> {
    /// Reads the CONNECT, authenticates the client, settles its session and answers CONNACK.
    async fn start<W: AsyncWrite + Unpin>(
        gateway: &'g Gateway<B>,
        (header, frame): Frame,
        admitted: bool,
        certified: Option<Box<PeerCertificate>>,
        out: &mut ClientWriter<W>,
    ) -> Result<Connection<'g, B>, Ended> {
        if packet_type(&header)? != PacketType::Connect {
            return Err(protocol_error("first packet is not CONNECT").into());
        }
        let version = connect_version(&header, &frame)?;
        let packet = decode(version, &frame)?;
        let Packet::Connect(mut connect, properties, will, will_properties, login) = packet else {
            return Err(protocol_error("first packet is not CONNECT").into());
        };
        let refuse = |out: &mut ClientWriter<W>, refusal: Refusal, reason: &'static str| {
            metrics::counter!(m::MQTT_CONNECTIONS_REFUSED, "reason" => reason).increment(1);
            out.buffer
                .extend_from_slice(&refused_connack(version, refusal));
            Ended::Refused
        };
        if !admitted {
            return Err(refuse(out, Refusal::AtCapacity, "connection_limit"));
        }
        let serial = certified.as_ref().map(|c| c.serial.as_str().into());
        let identity = match (&gateway.device_secret, certified.and_then(|c| c.vin)) {
            // The certificate's VIN is the car, whatever the username says: the CA vouched.
            (_, Some(vin)) => Some(Identity::Car(vin)),
            (None, None) => None,
            (Some(secret), None) => {
                match Box::pin(authenticate(gateway, secret, login.as_ref())).await {
                    Ok(identity) => Some(identity),
                    Err(code) => {
                        gateway.log_refusal(&connect.client_id, code);
                        let missing = login.is_none();
                        return Err(refuse(out, Refusal::BadCredentials { missing }, code));
                    }
                }
            }
        };
        if let Some(vin) = identity.as_ref().and_then(Identity::vin) {
            if gateway.is_revoked(vin) {
                gateway.log_refusal(&connect.client_id, "revoked");
                return Err(refuse(out, Refusal::NotAuthorized, "revoked"));
            }
        }
        // An empty client id gets one of the gateway's (MQTT 5 tells the client which); MQTT
        // 3.1.1 allows it only with a clean session.
        let mut assigned_client_id = None;
        if connect.client_id.is_empty() {
            if version == Version::V4 && !connect.clean_session {
                return Err(refuse(out, Refusal::ClientIdRejected, "empty_client_id"));
            }
            connect.client_id = match &identity {
                Some(identity) => identity.assigned_client_id(),
                None => format!("ecars-{}", uuid::Uuid::now_v7().simple()),
            };
            assigned_client_id = (version == Version::V5).then(|| connect.client_id.clone());
        } else if let Some(identity) = &identity {
            // Another client's id would take its session over: refused, never taken.
            if !identity.owns_client_id(&connect.client_id) {
                gateway.log_refusal(&connect.client_id, "client_id_not_owned");
                return Err(refuse(
                    out,
                    Refusal::ClientIdRejected,
                    "client_id_not_owned",
                ));
            }
        }
        let negotiated = KeepAlive::negotiate(connect.keep_alive, gateway.max_keep_alive);
        connect.keep_alive = broker_keep_alive(negotiated.keep_alive);
        let request = ConnectRequest {
            version,
            connect,
            properties,
            will,
            will_properties,
        };
        let client_id = request.connect.client_id.clone();
        // A second connection with this client id takes the session over: the first closes.
        let registration = gateway.register(&client_id, serial);
        let state = gateway.session_state(&client_id, request.connect.clean_session);
        let mut connection = Connection {
            gateway,
            identity,
            keep_alive: negotiated.keep_alive,
            link: None,
            answers: Answers::default(),
            releases: Releases::restored(state.releases),
            subscriber: None,
            refused_filters: Vec::new(),
            throttle: gateway
                .max_publish_rate
                .map(|rate| Box::new(PublishThrottle::new(rate, Instant::now()))),
            session_id: Uuid::now_v7(),
            last_activity: Instant::now(),
            registration,
            request,
        };
        // The broker must know a will from the start, and holds what a persistent session
        // subscribed to: such a client gets its link now.
        let mut session_present = state.present;
        if connection.request.will.is_some() || state.in_broker {
            session_present = connection.open_link().await?;
        }
        out.buffer.extend_from_slice(&accepted_connack(
            version,
            &Accepted {
                session_present,
                server_keep_alive: negotiated
                    .server_keep_alive
                    .filter(|_| version == Version::V5),
                assigned_client_id,
            },
        ));
        out.flush().await?;
        metrics::gauge!(m::MQTT_CONNECTIONS_OPEN).increment(1.0);
        tracing::debug!(
            client_id,
            ?version,
            session_present,
            identity = connection.identity.as_ref().map(Identity::name),
            "MQTT client connected"
        );
        Ok(connection)
    }

    /// Opens the client's link into the broker; returns whether the broker had its session.
    async fn open_link(&mut self) -> Result<bool, Ended> {
        // Boxed: opening a link is rare and its future is large; held inline it would sit in
        // every idle car's task.
        let (link, session_present) = Box::pin(self.gateway.broker.open(&self.request)).await?;
        self.link = Some(link);
        if !self.request.connect.clean_session {
            self.gateway
                .note_broker_session(&self.request.connect.client_id);
        }
        Ok(session_present)
    }

    /// The link, opened first if need be.
    async fn link(&mut self) -> Result<&mut B::Link, Ended> {
        if self.link.is_none() {
            self.open_link().await?;
        }
        match self.link.as_mut() {
            Some(link) => Ok(link),
            None => Err(Ended::Broker(LinkError::Protocol("link not open".into()))),
        }
    }

    /// Handles the client's packets, the bus's and the broker's answers, the keep-alive and the
    /// shutdown, until one of them ends the connection.
    async fn run<R, W>(
        &mut self,
        client: &mut FrameReader<R>,
        out: &mut ClientWriter<W>,
        shutdown: &CancellationToken,
    ) -> Ended
    where
        R: AsyncRead + Unpin + Send,
        W: AsyncWrite + Unpin + Send,
    {
        let gateway = self.gateway;
        let taken_over = self.registration.taken_over.clone();
        let mut in_flight: FuturesOrdered<InFlight<'g>> = FuturesOrdered::new();
        // The broker sees no packet of a car the gateway answers itself: it is pinged instead.
        let broker_ping = Duration::from_secs(u64::from(self.request.connect.keep_alive)) / 2;
        let mut next_broker_ping = Instant::now() + broker_ping;
        let mut turn = 0;
        let ended = loop {
            let throttled = self.throttle.as_ref().and_then(|t| t.resume_at());
            let reading = in_flight.len() < MAX_IN_FLIGHT && throttled.is_none();
            // Silence counts only while the gateway listens: when the bus or the rate limit
            // holds it back, the client waits on the gateway, not the other way round. While
            // throttled, the deadline is when reading resumes.
            let deadline = if reading {
                self.keep_alive.deadline(self.last_activity)
            } else {
                throttled
            };
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ended::ServerShutdown,
                _ = taken_over.cancelled() => {
                    let revoked = match &self.identity {
                        Some(Identity::Car(vin)) => self.gateway.is_revoked(vin),
                        Some(Identity::Account(account)) => !self.gateway.has_account(&account.name),
                        None => false,
                    } || self.gateway.is_registration_revoked(
                        &self.request.connect.client_id,
                        &self.registration,
                    );
                    break if revoked { Ended::Revoked } else { Ended::TakenOver };
                }
                Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                    if let Err(ended) = self.admitted(done, out).await {
                        break ended;
                    }
                    // And the others already admitted, without waiting.
                    while let Some(done) = ready(&mut in_flight).await {
                        if let Err(ended) = self.admitted(done, out).await {
                            return ended;
                        }
                    }
                    // Time spent waiting for the bus is not the client's silence.
                    self.last_activity = Instant::now();
                }
                frame = next_from(&mut self.link) => {
                    match frame {
                        Ok(Some(frame)) => self.on_broker_packet(frame, out),
                        Ok(None) => break Ended::Broker(LinkError::Protocol("the broker ended the session".into())),
                        Err(e) => break Ended::Broker(e),
                    }
                }
                _ = tokio::time::sleep_until(next_broker_ping), if self.link.is_some() => {
                    next_broker_ping = Instant::now() + broker_ping;
                    if let Some(link) = self.link.as_mut() {
                        // PINGREQ; the broker's PINGRESP is not passed on.
                        if let Err(e) = link.send(&[0xC0, 0x00]).await {
                            break e.into();
                        }
                        if let Err(e) = link.flush().await {
                            break e.into();
                        }
                    }
                }
                _ = sleep_until(deadline) => {
                    match self.throttle.as_mut() {
                        Some(throttle) if throttled.is_some() => {
                            throttle.resume(Instant::now());
                            // Time spent held back is not the client's silence.
                            self.last_activity = Instant::now();
                        }
                        _ => break Ended::KeepAliveTimeout,
                    }
                }
                next = client.next(), if reading => {
                    let frame = match next {
                        Ok(Some(frame)) => frame,
                        Ok(None) => break Ended::ConnectionLost,
                        Err(e) => break e.into(),
                    };
                    self.last_activity = Instant::now();
                    match self.on_client_packet(frame, &mut in_flight).await {
                        Ok(Continue::Yes) => {}
                        Ok(Continue::No) => break Ended::ClientDisconnect,
                        Err(ended) => break ended,
                    }
                }
            }
            self.answers.take_ready(&mut out.buffer);
            // A busy car's buffer can hold hundreds of packets that need no I/O to read: after a
            // turn's worth the task yields, so a thousand busy cars cannot keep a new car's
            // CONNECT (or the accept loop) waiting for seconds behind them.
            turn += 1;
            let turn_over = turn >= PACKETS_PER_TURN;
            // Write out once nothing more is waiting, from the client or the broker: one syscall
            // for a burst of answers or of messages to a subscriber (one per message was 36,000
            // syscalls a second for a `#` subscriber at the edge benchmark's rate).
            let more_waiting = client.has_whole_packet()
                || self
                    .link
                    .as_ref()
                    .is_some_and(|link| link.has_whole_packet());
            if turn_over || !more_waiting {
                if let Err(e) = out.flush().await {
                    break e.into();
                }
                if let Some(link) = self.link.as_mut() {
                    if let Err(e) = link.flush().await {
                        break e.into();
                    }
                }
            }
            if turn_over {
                turn = 0;
                tokio::task::yield_now().await;
            }
        };
        // Whatever reached the bus is acknowledged before the connection ends.
        while let Some(done) = in_flight.next().await {
            if self.admitted(done, out).await.is_err() {
                break;
            }
        }
        self.answers.take_ready(&mut out.buffer);
        drop(in_flight);
        let _ = gateway;
        ended
    }

    /// One packet from the client.
    async fn on_client_packet(
        &mut self,
        (header, frame): Frame,
        in_flight: &mut FuturesOrdered<InFlight<'g>>,
    ) -> Result<Continue, Ended> {
        let version = self.request.version;
        match packet_type(&header)? {
            PacketType::Publish => {
                let publish = parse_publish(&header, &frame, version)?;
                if let Some(throttle) = self.throttle.as_mut() {
                    if throttle.publish(Instant::now()) {
                        metrics::counter!(m::PUBLISH_THROTTLED).increment(1);
                    }
                }
                if publish.retain {
                    if let Err(refusal) = self
                        .gateway
                        .retained
                        .admit(&publish.topic, publish.payload.len())
                    {
                        metrics::counter!(m::RETAINED_REFUSED, "reason" => refusal.code())
                            .increment(1);
                        if REJECTION_LOG.allow() {
                            tracing::warn!(
                                client_id = self.request.connect.client_id,
                                topic = publish.topic,
                                reason = refusal.code(),
                                "a retained message over the limits: refused"
                            );
                        }
                        let topic = publish.topic.clone();
                        return self.refuse_publish(&publish, Violation::QuotaExceeded, || {
                            format!("retained PUBLISH to {topic:?}: {}", refusal.code())
                        });
                    }
                }
                let verdict = judge(
                    &publish,
                    &self.request.connect.client_id,
                    self.identity.as_ref(),
                    Utc::now(),
                    self.gateway.max_clock_skew,
                );
                let bus = &self.gateway.bus;
                match verdict {
                    Verdict::Accepted(reading) => {
                        self.gateway.readings.received.increment(1);
                        let owed = Owed {
                            slot: self.answers.await_bus(),
                            qos: publish.qos,
                            pkid: publish.pkid,
                            reason: 0,
                            fanout: Some(publish),
                        };
                        in_flight
                            .push_back(Box::pin(async move { (bus.publish(reading).await, owed) }));
                    }
                    Verdict::Rejected {
                        letter,
                        reason_code,
                    } => {
                        self.gateway.readings.received.increment(1);
                        metrics::counter!(m::READINGS_REJECTED, "reason" => letter.reason.code())
                            .increment(1);
                        self.gateway.log_rejection(&letter);
                        let owed = Owed {
                            slot: self.answers.await_bus(),
                            qos: publish.qos,
                            pkid: publish.pkid,
                            reason: reason_code,
                            fanout: None,
                        };
                        in_flight
                            .push_back(Box::pin(async move { (bus.publish(letter).await, owed) }));
                    }
                    Verdict::Forward => {
                        if let Some(identity) = &self.identity {
                            if !identity.may_publish_other(&publish.topic) {
                                metrics::counter!(m::MQTT_NOT_AUTHORIZED, "action" => NotAuthorized::Publish.code())
                                    .increment(1);
                                if REJECTION_LOG.allow() {
                                    tracing::warn!(
                                        client_id = self.request.connect.client_id,
                                        topic = publish.topic,
                                        "a client published outside its own topics: refused"
                                    );
                                }
                                let topic = publish.topic.clone();
                                return self.refuse_publish(
                                    &publish,
                                    Violation::NotAuthorized,
                                    || {
                                        format!(
                                            "PUBLISH to {topic:?}, not one of the client's topics"
                                        )
                                    },
                                );
                            }
                        }
                        match publish.qos {
                            1 => self.answers.await_broker(PacketType::PubAck, publish.pkid),
                            2 => self.answers.await_broker(PacketType::PubRec, publish.pkid),
                            _ => {}
                        }
                        self.link().await?.send(&frame).await?;
                    }
                }
            }
            PacketType::PubRel => {
                let pkid = packet_id(&header, &frame)?;
                if self.releases.release(pkid) || self.link.is_none() {
                    // The gateway took the PUBLISH itself, or nobody has it (the broker never
                    // saw this client): the exchange ends here.
                    self.answers
                        .ready(ack_packet(PacketType::PubComp, pkid, version, 0));
                } else {
                    self.answers.await_broker(PacketType::PubComp, pkid);
                    self.link().await?.send(&frame).await?;
                }
            }
            kind @ (PacketType::Subscribe | PacketType::Unsubscribe) => {
                // Boxed: rare, and its state (a parsed packet) would otherwise sit in every
                // car's task.
                return Box::pin(self.on_subscription(kind, &header, frame)).await;
            }
            PacketType::PingReq => self.answers.ready(Bytes::from_static(&PINGRESP)),
            // The client's acknowledgements of what the broker delivered to it.
            PacketType::PubAck | PacketType::PubRec | PacketType::PubComp => {
                packet_id(&header, &frame)?;
                match self.link.as_mut() {
                    Some(link) => link.send(&frame).await?,
                    None => {
                        return Err(protocol_error(
                            "acknowledgement of a message the server never sent",
                        )
                        .into())
                    }
                }
            }
            PacketType::Disconnect => {
                // The broker drops the will on a DISCONNECT (MQTT 5: unless its reason asks for
                // it).
                if let Some(link) = self.link.as_mut() {
                    link.send(&frame).await?;
                    link.flush().await?;
                }
                return Ok(Continue::No);
            }
            PacketType::Connect => return Err(protocol_error("second CONNECT").into()),
            other => {
                return Err(protocol_error(format!("{other:?} from a client")).into());
            }
        }
        Ok(Continue::Yes)
    }

    /// A SUBSCRIBE or UNSUBSCRIBE: a car's filters outside its own topics are refused; the rest
    /// goes to the broker, whose answer takes its place in the client's order.
    async fn on_subscription(
        &mut self,
        kind: PacketType,
        header: &FixedHeader,
        frame: Bytes,
    ) -> Result<Continue, Ended> {
        let pkid = packet_id(header, &frame)?;
        let packet = decode(self.request.version, &frame)?;
        let frame = {
            let (packet, frame) = match (packet, &self.identity) {
                (Packet::Subscribe(subscribe, properties), Some(identity)) => {
                    match self.authorize_subscribe(
                        identity.clone(),
                        subscribe,
                        properties,
                        frame,
                    )? {
                        Some(allowed) => allowed,
                        // Nothing left to subscribe: the gateway answered.
                        None => return Ok(Continue::Yes),
                    }
                }
                (packet, _) => (packet, frame),
            };
            self.note_subscriptions(&packet);
            frame
        };
        let answer = if kind == PacketType::Subscribe {
            PacketType::SubAck
        } else {
            PacketType::UnsubAck
        };
        self.answers.await_broker(answer, pkid);
        self.link().await?.send(&frame).await?;
        Ok(Continue::Yes)
    }

    /// A publish the bus took (or refused): the client's acknowledgement, then the fan-out.
    async fn admitted<W: AsyncWrite + Unpin>(
        &mut self,
        (result, owed): (Result<(), BusError>, Owed),
        out: &mut ClientWriter<W>,
    ) -> Result<(), Ended> {
        result?;
        if owed.fanout.is_some() {
            self.gateway.readings.accepted.increment(1);
        }
        let fanout = &self.gateway.fanout;
        let publish = owed.fanout.filter(|publish| fanout.wanted(publish.retain));
        // Boxed: only readings someone subscribed to take this path, and its future (a whole
        // broker packet on its way into a channel) would otherwise sit in every car's task.
        match publish {
            // In the router before its acknowledgement goes out, so a client that subscribes
            // after seeing it is sent the reading.
            Some(retained) if retained.retain => {
                Box::pin(self.fan_out(retained)).await?;
                self.answer(owed.slot, owed.qos, owed.pkid, owed.reason, out);
            }
            // Answered first: the fan-out's queue may make this wait.
            publish => {
                self.answer(owed.slot, owed.qos, owed.pkid, owed.reason, out);
                if let Some(publish) = publish {
                    Box::pin(self.fan_out(publish)).await?;
                }
            }
        }
        Ok(())
    }

    /// Acknowledges an admitted PUBLISH (QoS 1: PUBACK; QoS 2: PUBREC) in its turn.
    fn answer<W>(&mut self, slot: u64, qos: u8, pkid: u16, reason: u8, out: &mut ClientWriter<W>) {
        let version = self.request.version;
        let answer = match qos {
            1 => Some(ack_packet(PacketType::PubAck, pkid, version, reason)),
            2 => {
                // MQTT 5 ends the exchange at a failing PUBREC; otherwise a PUBREL follows.
                if reason < 0x80 || version == Version::V4 {
                    self.releases.hold(pkid);
                }
                Some(ack_packet(PacketType::PubRec, pkid, version, reason))
            }
            _ => None,
        };
        self.answers.bus_done(slot, answer);
        self.answers.take_ready(&mut out.buffer);
    }

    /// Hands an accepted reading to the broker's MQTT subscribers.
    async fn fan_out(&self, publish: PublishView) -> Result<(), Ended> {
        let properties = publish.properties()?;
        self.gateway
            .fanout
            .publish(
                publish.topic_bytes,
                publish.payload,
                publish.retain,
                properties,
            )
            .await
            .map_err(|e| Ended::Broker(LinkError::Protocol(e.to_string())))
    }

    /// One packet from the broker: an answer takes its slot; anything else goes to the client.
    fn on_broker_packet<W>(&mut self, (header, frame): Frame, out: &mut ClientWriter<W>) {
        let Ok(kind) = packet_type(&header) else {
            return;
        };
        if is_broker_private(kind) {
            return;
        }
        if matches!(
            kind,
            PacketType::SubAck
                | PacketType::UnsubAck
                | PacketType::PubAck
                | PacketType::PubRec
                | PacketType::PubComp
        ) {
            if let Ok(pkid) = crate::codec::read_u16(&mut frame.slice(header.fixed_header_len..)) {
                let frame = if kind == PacketType::SubAck && !self.refused_filters.is_empty() {
                    self.with_refused_filters(pkid, frame.clone())
                } else {
                    frame.clone()
                };
                if self.answers.broker_answered(kind, pkid, frame) {
                    return;
                }
            }
        }
        out.buffer.extend_from_slice(&frame);
    }

    /// Keeps the filters of a car's SUBSCRIBE that are its own. Returns the SUBSCRIBE to pass to
    /// the broker, or `None` when every filter was refused and the gateway answered itself. When
    /// only some were, the broker's SUBACK gets the refusals put back in their places.
    fn authorize_subscribe(
        &mut self,
        identity: Identity,
        mut subscribe: Subscribe,
        properties: Option<SubscribeProperties>,
        frame: Bytes,
    ) -> Result<Option<(Packet, Bytes)>, Malformed> {
        let refused: Vec<usize> = subscribe
            .filters
            .iter()
            .enumerate()
            .filter(|(_, f)| !identity.may_subscribe(&f.path))
            .map(|(at, _)| at)
            .collect();
        if refused.is_empty() {
            return Ok(Some((Packet::Subscribe(subscribe, properties), frame)));
        }
        metrics::counter!(m::MQTT_NOT_AUTHORIZED, "action" => NotAuthorized::Subscribe.code())
            .increment(refused.len() as u64);
        if REJECTION_LOG.allow() {
            let filters: Vec<&str> = refused
                .iter()
                .map(|&at| subscribe.filters[at].path.as_str())
                .collect();
            tracing::warn!(
                client_id = self.request.connect.client_id,
                identity = identity.name(),
                ?filters,
                "a client subscribed outside its own topics: refused"
            );
        }
        let pkid = subscribe.pkid;
        if refused.len() == subscribe.filters.len() {
            let suback = SubAck {
                pkid,
                return_codes: vec![self.refused_code(); refused.len()],
            };
            let answer = encode(self.request.version, Packet::SubAck(suback, None))?;
            self.answers.ready(answer);
            return Ok(None);
        }
        for &at in refused.iter().rev() {
            subscribe.filters.remove(at);
        }
        self.refused_filters.push((pkid, refused));
        let packet = Packet::Subscribe(subscribe, properties);
        let frame = encode(self.request.version, packet.clone())?;
        Ok(Some((packet, frame)))
    }

    /// The SUBACK code of a refused filter: 3.1.1 has one failure code, 5 says why.
    fn refused_code(&self) -> SubscribeReasonCode {
        match self.request.version {
            Version::V4 => SubscribeReasonCode::Failure,
            Version::V5 => SubscribeReasonCode::NotAuthorized,
        }
    }

    /// The broker's SUBACK for a SUBSCRIBE whose refused filters the gateway took out, with their
    /// refusals back in place; any other frame as it is.
    fn with_refused_filters(&mut self, pkid: u16, frame: Bytes) -> Bytes {
        let Some(at) = self.refused_filters.iter().position(|(p, _)| *p == pkid) else {
            return frame;
        };
        let (_, refused) = self.refused_filters.swap_remove(at);
        let Ok(Packet::SubAck(mut suback, properties)) = decode(self.request.version, &frame)
        else {
            return frame;
        };
        for at in refused {
            let at = at.min(suback.return_codes.len());
            suback.return_codes.insert(at, self.refused_code());
        }
        encode(self.request.version, Packet::SubAck(suback, properties)).unwrap_or(frame)
    }

    /// Refuses a car's PUBLISH to a topic that is not its own: MQTT 5 says so in the
    /// acknowledgement; MQTT 3.1.1 (and QoS 0, which has none) has no way but closing the
    /// connection.
    /// Refuses a PUBLISH the client may not make: MQTT 5 QoS 1 and 2 get the refusal in their
    /// acknowledgement; otherwise the protocol has no answer but closing the connection.
    fn refuse_publish(
        &mut self,
        publish: &PublishView,
        violation: Violation,
        detail: impl FnOnce() -> String,
    ) -> Result<Continue, Ended> {
        let version = self.request.version;
        let acknowledgement = match publish.qos {
            1 => Some(PacketType::PubAck),
            2 => Some(PacketType::PubRec),
            _ => None,
        };
        if let (Version::V5, Some(kind)) = (version, acknowledgement) {
            // A failing PUBREC ends a QoS 2 exchange in MQTT 5: no PUBREL follows.
            self.answers.ready(ack_packet(
                kind,
                publish.pkid,
                version,
                violation.reason_code(),
            ));
            return Ok(Continue::Yes);
        }
        Err(Malformed {
            kind: violation,
            detail: detail(),
        }
        .into())
    }

    /// Tells the fan-out which telemetry filters this client (un)subscribes, before the broker
    /// sees the packet: a reading admitted after it reaches the new subscriber.
    fn note_subscriptions(&mut self, packet: &Packet) {
        let subscriber = self.subscriber.get_or_insert_with(|| {
            self.gateway.fanout.session(
                &self.request.connect.client_id,
                self.request.connect.clean_session,
            )
        });
        match packet {
            Packet::Subscribe(subscribe, _) => {
                subscriber.subscribed(subscribe.filters.iter().map(|f| f.path.as_str()))
            }
            Packet::Unsubscribe(unsubscribe, _) => {
                subscriber.unsubscribed(unsubscribe.filters.iter().map(String::as_str))
            }
            _ => {}
        }
    }

    /// Writes what is owed, tells an MQTT 5 client why the server ends the connection, keeps a
    /// persistent session's state, and closes the broker link.
    async fn finish<W: AsyncWrite + Unpin>(self, out: &mut ClientWriter<W>, ended: &Ended) {
        let gateway = self.gateway;
        let goodbye =
            self.connectivity(Connectivity::Disconnected, Some(ended.disconnect_reason()));
        if self.request.version == Version::V5 {
            let farewell = match ended {
                Ended::KeepAliveTimeout => Some(disconnect(REASON_KEEP_ALIVE_TIMEOUT)),
                Ended::TakenOver => Some(disconnect(REASON_SESSION_TAKEN_OVER)),
                Ended::Revoked => Some(disconnect(REASON_NOT_AUTHORIZED)),
                Ended::ServerShutdown => Some(gateway.shutdown_farewell.clone()),
                Ended::Violation(m) => Some(disconnect(m.kind.reason_code())),
                _ => None,
            };
            if let Some(farewell) = farewell {
                out.buffer.extend_from_slice(&farewell);
            }
        }
        let _ = out.flush().await;
        let _ = out.write.shutdown().await;
        metrics::gauge!(m::MQTT_CONNECTIONS_OPEN).decrement(1.0);
        let client_id = self.request.connect.client_id.clone();
        tracing::debug!(client_id, reason = ended.code(), "MQTT connection finished");
        if !self.request.connect.clean_session {
            self.gateway
                .keep_session(&client_id, self.releases.into_held());
        }
        // Dropping the link closes its socket: the broker ends the session (and sends the will
        // unless the client said DISCONNECT).
        drop(self.link);
        self.gateway.deregister(&client_id, &self.registration);
        // Awaited: a node that stops tells of every car it lets go before the bus closes.
        if let Some(event) = goodbye {
            gateway.announce(event).await;
        }
    }

    /// This connection's connectivity event, for a car (a car's identity, or where clients are
    /// anonymous, a client id that starts with a VIN); `None` for other clients.
    fn connectivity(
        &self,
        state: Connectivity,
        reason: Option<DisconnectReason>,
    ) -> Option<ConnectivityEvent> {
        let client_id = &self.request.connect.client_id;
        let vin = match &self.identity {
            Some(Identity::Car(vin)) => vin.clone(),
            Some(Identity::Account(_)) => return None,
            None => client_id.get(..17).and_then(|p| Vin::parse(p).ok())?,
        };
        Some(ConnectivityEvent {
            event_id: Uuid::now_v7(),
            vin,
            state,
            reason,
            session_id: self.session_id,
            node: self.gateway.node.to_string(),
            client_id: client_id.clone(),
            time: Utc::now(),
        })
    }
}

/// Whether the loop goes on after a client packet.
enum Continue {
    Yes,
    No,
}

/// How long the broker link's keep-alive is at most (the broker refuses keep-alive 0).
const DEFAULT_BROKER_KEEP_ALIVE: Duration = Duration::from_secs(60);

/// The keep-alive of a client's broker link, in seconds: the client's, at most a minute, at
/// least a second.
fn broker_keep_alive(client: KeepAlive) -> u16 {
    let interval = client
        .interval()
        .unwrap_or(DEFAULT_BROKER_KEEP_ALIVE)
        .min(DEFAULT_BROKER_KEEP_ALIVE);
    u16::try_from(interval.as_secs().max(1)).unwrap_or(60)
}

/// The next packet from the broker link; pending forever while there is none.
async fn next_from<L: BrokerLink>(link: &mut Option<L>) -> Result<Option<Frame>, LinkError> {
    match link {
        Some(link) => link.next().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// The next publish whose bus call has finished, if one has; polled with the task's own waker,
/// so one finishing later still wakes the connection.
async fn ready<'a>(
    in_flight: &mut FuturesOrdered<InFlight<'a>>,
) -> Option<(Result<(), BusError>, Owed)> {
    std::future::poll_fn(|cx| match in_flight.poll_next_unpin(cx) {
        std::task::Poll::Ready(Some(done)) => std::task::Poll::Ready(Some(done)),
        _ => std::task::Poll::Ready(None),
    })
    .await
}

/// Log lines about rejected readings and refused CONNECTs: a peer can cause as many as it likes,
/// so they are kept to a budget (the metrics count every one).
static REJECTION_LOG: ecars_runtime::logging::LogBudget =
    ecars_runtime::logging::LogBudget::per_second(20);

impl<B: Broker> Gateway<B> {
    fn log_rejection(&self, letter: &ecars_model::DeadLetter) {
        if REJECTION_LOG.allow() {
            tracing::info!(
                client_id = letter.client_id,
                topic = letter.topic,
                reason = letter.reason.code(),
                detail = letter.detail,
                "reading rejected to the dead-letter store"
            );
        }
    }

    fn log_refusal(&self, client_id: &str, reason: &str) {
        if REJECTION_LOG.allow() {
            tracing::warn!(client_id, reason, "MQTT CONNECT refused");
        }
    }
}

/// Ids of the QoS 2 exchanges a leaving persistent session left open.
pub type HeldReleases = HashSet<u16>;

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use bytes::BufMut;
    use ecars_model::TelemetryReading;
    use tokio::io::{AsyncReadExt, DuplexStream};

    use super::*;
    use crate::broker::TelemetryFanout;
    use crate::DeviceSecret;

    /// A broker played by the test: opening a link hands the test the other end of a pipe.
    #[derive(Default)]
    struct PipeBroker {
        opened: Mutex<Vec<DuplexStream>>,
    }

    struct PipeLink {
        reader: FrameReader<tokio::io::ReadHalf<DuplexStream>>,
        writer: tokio::io::WriteHalf<DuplexStream>,
    }

    impl BrokerLink for PipeLink {
        async fn send(&mut self, frame: &[u8]) -> Result<(), LinkError> {
            Ok(self.writer.write_all(frame).await?)
        }
        async fn flush(&mut self) -> Result<(), LinkError> {
            Ok(self.writer.flush().await?)
        }
        async fn next(&mut self) -> Result<Option<Frame>, LinkError> {
            Ok(self.reader.next().await?)
        }
        fn has_whole_packet(&self) -> bool {
            self.reader.has_whole_packet()
        }
    }

    impl Broker for PipeBroker {
        type Link = PipeLink;
        async fn open(&self, _request: &ConnectRequest) -> Result<(PipeLink, bool), LinkError> {
            let (ours, theirs) = tokio::io::duplex(64 * 1024);
            self.opened.lock().unwrap().push(theirs);
            let (read, writer) = tokio::io::split(ours);
            Ok((
                PipeLink {
                    reader: FrameReader::new(read),
                    writer,
                },
                false,
            ))
        }
    }

    struct Harness {
        gateway: Arc<Gateway<PipeBroker>>,
        readings: tokio::sync::mpsc::UnboundedReceiver<TelemetryReading>,
        shutdown: CancellationToken,
    }

    /// Takes and acknowledges every record of `T`, as a worker would after its commit.
    async fn committing<T: ecars_model::Record>(
        bus: &ecars_bus::Bus,
        group: &str,
    ) -> tokio::sync::mpsc::UnboundedReceiver<T> {
        let mut subscription = bus.subscribe::<T>(group).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            while let Ok(Some(delivery)) = subscription.next().await {
                subscription.ack(&[delivery.receipt]).await.unwrap();
                let _ = tx.send(delivery.record);
            }
        });
        rx
    }

    async fn harness(max_keep_alive: Option<Duration>) -> Harness {
        harness_with(max_keep_alive, None).await
    }

    async fn harness_with(
        max_keep_alive: Option<Duration>,
        device_secret: Option<DeviceSecret>,
    ) -> Harness {
        harness_with_fanout(
            max_keep_alive,
            device_secret,
            TelemetryFanout::disconnected(),
        )
        .await
    }

    async fn harness_with_fanout(
        max_keep_alive: Option<Duration>,
        device_secret: Option<DeviceSecret>,
        fanout: TelemetryFanout,
    ) -> Harness {
        let bus = ecars_bus::Bus::in_process(1000);
        let readings = committing::<TelemetryReading>(&bus, "test").await;
        // Dead letters need a consumer too, or the in-process bus refuses them.
        let _letters = committing::<ecars_model::DeadLetter>(&bus, "test.dlq").await;
        let gateway = Arc::new(Gateway::new(
            bus,
            PipeBroker::default(),
            fanout,
            device_secret,
            max_keep_alive,
            100,
        ));
        Harness {
            gateway,
            readings,
            shutdown: CancellationToken::new(),
        }
    }

    impl Harness {
        /// A client connection; returns the client's end and the connection's task.
        fn connect(&self, admitted: bool) -> (DuplexStream, tokio::task::JoinHandle<Ended>) {
            let (client, server) = tokio::io::duplex(64 * 1024);
            let task = tokio::spawn(serve_connection(
                Arc::clone(&self.gateway),
                server,
                admitted,
                None,
                self.shutdown.clone(),
            ));
            (client, task)
        }

        fn links_opened(&self) -> usize {
            self.gateway.broker.opened.lock().unwrap().len()
        }

        fn take_link(&self) -> DuplexStream {
            self.gateway.broker.opened.lock().unwrap().remove(0)
        }
    }

    fn string(out: &mut BytesMut, text: &str) {
        out.put_u16(text.len() as u16);
        out.put_slice(text.as_bytes());
    }

    fn packet(first: u8, body: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        out.put_u8(first);
        let mut len = body.len();
        loop {
            let mut byte = (len % 128) as u8;
            len /= 128;
            if len > 0 {
                byte |= 0x80;
            }
            out.put_u8(byte);
            if len == 0 {
                break;
            }
        }
        out.put_slice(body);
        out.to_vec()
    }

    fn connect_packet(version: Version, client_id: &str, keep_alive: u16) -> Vec<u8> {
        let mut body = BytesMut::new();
        string(&mut body, "MQTT");
        body.put_u8(if version == Version::V5 { 5 } else { 4 });
        body.put_u8(0x02); // clean session
        body.put_u16(keep_alive);
        if version == Version::V5 {
            body.put_u8(0); // no properties
        }
        string(&mut body, client_id);
        packet(0x10, &body)
    }

    /// An MQTT 5 CONNECT with a user name and password.
    fn v5_login_packet(client_id: &str, user: &str, password: &str) -> Vec<u8> {
        let mut body = BytesMut::new();
        string(&mut body, "MQTT");
        body.put_u8(5);
        body.put_u8(0x80 | 0x40 | 0x02); // user name, password, clean start
        body.put_u16(60);
        body.put_u8(0); // no properties
        string(&mut body, client_id);
        string(&mut body, user);
        string(&mut body, password);
        packet(0x10, &body)
    }

    fn publish_packet(version: Version, topic: &str, pkid: u16, payload: &str) -> Vec<u8> {
        let mut body = BytesMut::new();
        string(&mut body, topic);
        body.put_u16(pkid);
        if version == Version::V5 {
            body.put_u8(0);
        }
        body.put_slice(payload.as_bytes());
        packet(0x32, &body)
    }

    fn subscribe_packet(pkid: u16, filter: &str) -> Vec<u8> {
        let mut body = BytesMut::new();
        body.put_u16(pkid);
        string(&mut body, filter);
        body.put_u8(1);
        packet(0x82, &body)
    }

    const VIN: &str = "1HGCM82633A004352";

    fn reading(n: u32) -> String {
        format!(
            r#"{{"vin":"{VIN}","battery":{},"date":"2026-01-01T00:00:{:02}.000Z"}}"#,
            50 + n % 50,
            n % 60
        )
    }

    /// Reads exactly `n` bytes, within 5 s of virtual time.
    async fn read_exactly(client: &mut DuplexStream, n: usize) -> Vec<u8> {
        let mut buf = vec![0u8; n];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut buf))
            .await
            .expect("the answer within 5 s")
            .expect("the connection is open");
        buf
    }

    /// Sends a 3.1.1 CONNECT and expects the CONNACK that accepts it (no session present).
    async fn connect_v4(client: &mut DuplexStream, client_id: &str, keep_alive: u16) {
        client
            .write_all(&connect_packet(Version::V4, client_id, keep_alive))
            .await
            .unwrap();
        assert_eq!(read_exactly(client, 4).await, [0x20, 2, 0, 0], "CONNACK");
    }

    /// Reads until the server closes the connection; returns what came before.
    async fn read_to_close(client: &mut DuplexStream) -> Vec<u8> {
        let mut rest = Vec::new();
        let _ = client.read_to_end(&mut rest).await;
        rest
    }

    /// A retained reading is acknowledged only once the broker's router has it, so a client
    /// that subscribes after the PUBACK is sent it as retained; another reading's PUBACK does
    /// not wait for the router.
    #[tokio::test]
    async fn a_retained_readings_puback_waits_until_the_router_has_it() {
        let (release, released) = std::sync::mpsc::channel::<()>();
        let (router, routed) = std::sync::mpsc::channel::<usize>();
        let fanout = TelemetryFanout::held_by_test(released, router);
        // The fan-out takes readings only while someone could receive them (or they are
        // retained): a subscriber elsewhere.
        let listener = fanout.session("listener", true);
        listener.subscribed(["vehicles/#"]);
        let h = harness_with_fanout(None, None, fanout).await;
        let (mut car, _task) = h.connect(true);
        connect_v4(&mut car, "car", 60).await;
        let topic = format!("vehicles/{VIN}/telemetry");
        car.write_all(&publish_packet(Version::V4, &topic, 1, &reading(1)))
            .await
            .unwrap();
        assert_eq!(read_exactly(&mut car, 4).await, [0x40, 2, 0, 1]);
        let mut retained = publish_packet(Version::V4, &topic, 2, &reading(2));
        retained[0] |= 0x01;
        car.write_all(&retained).await.unwrap();
        let mut puback = [0u8; 4];
        let early = tokio::time::timeout(Duration::from_millis(300), car.read_exact(&mut puback));
        assert!(early.await.is_err(), "PUBACK before the router had it");
        let mut in_router = 0;
        while in_router < 2 {
            release.send(()).unwrap();
            in_router += routed.recv().unwrap();
        }
        assert_eq!(read_exactly(&mut car, 4).await, [0x40, 2, 0, 2]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_car_that_publishes_without_pinging_stays_and_needs_no_broker() {
        let mut h = harness(None).await;
        let (mut car, task) = h.connect(true);
        connect_v4(&mut car, "car", 2).await;
        // A reading every 200 ms for 10 s, never a PINGREQ: every packet is activity.
        let topic = format!("vehicles/{VIN}/telemetry");
        for n in 1..=50u16 {
            car.write_all(&publish_packet(
                Version::V4,
                &topic,
                n,
                &reading(u32::from(n)),
            ))
            .await
            .unwrap();
            assert_eq!(read_exactly(&mut car, 4).await, [0x40, 2, 0, n as u8]);
            h.readings.recv().await.unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(!task.is_finished(), "still connected after 10 s");
        assert_eq!(
            h.links_opened(),
            0,
            "a telemetry-only car never reaches the broker"
        );
        // Then it falls silent: closed at 1.5 x 2 s.
        let silent = Instant::now();
        assert!(read_to_close(&mut car).await.is_empty());
        let ended = task.await.unwrap();
        assert!(matches!(ended, Ended::KeepAliveTimeout), "{ended:?}");
        let waited = silent.elapsed();
        assert!(
            waited >= Duration::from_millis(2800) && waited <= Duration::from_millis(3300),
            "{waited:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn keep_alive_0_is_accepted_and_capped_and_mqtt_5_is_told() {
        let h = harness(Some(Duration::from_secs(60))).await;
        let (mut car, task) = h.connect(true);
        car.write_all(&connect_packet(Version::V5, "car", 0))
            .await
            .unwrap();
        // CONNACK: success, max packet size, Server Keep Alive 60.
        let connack = read_exactly(&mut car, 2).await;
        assert_eq!(connack[0], 0x20);
        let rest = read_exactly(&mut car, usize::from(connack[1])).await;
        assert_eq!(&rest[..2], [0, 0], "accepted");
        assert!(rest.windows(3).any(|w| w == [0x13, 0x00, 60]), "{rest:?}");
        let start = Instant::now();
        let closing = read_to_close(&mut car).await;
        assert_eq!(closing, [0xE0, 2, 0x8D, 0], "DISCONNECT keep alive timeout");
        assert!(matches!(task.await.unwrap(), Ended::KeepAliveTimeout));
        assert_eq!(start.elapsed().as_secs(), 90);

        let uncapped = harness(None).await;
        let (mut car, task) = uncapped.connect(true);
        connect_v4(&mut car, "car", 0).await;
        tokio::time::sleep(Duration::from_secs(3600)).await;
        assert!(
            !task.is_finished(),
            "keep-alive 0 without a cap: never closed for silence"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn subscribe_ping_and_telemetry_in_one_write_are_answered_in_order() {
        let mut h = harness(None).await;
        let (mut car, _task) = h.connect(true);
        connect_v4(&mut car, "app", 60).await;
        let mut burst = subscribe_packet(7, "fleet/notices");
        burst.extend_from_slice(&[0xC0, 0x00]); // PINGREQ
        burst.extend_from_slice(&publish_packet(
            Version::V4,
            &format!("vehicles/{VIN}/telemetry"),
            8,
            &reading(1),
        ));
        car.write_all(&burst).await.unwrap();
        h.readings.recv().await.unwrap();
        // The broker answers the SUBSCRIBE late: nothing may overtake its SUBACK.
        tokio::time::sleep(Duration::from_millis(500)).await;
        let mut link = h.take_link();
        let mut seen = vec![0u8; 256];
        let n = link.read(&mut seen).await.unwrap();
        assert!(n > 0, "the broker got the CONNECT and the SUBSCRIBE");
        link.write_all(&[0x90, 3, 0, 7, 1]).await.unwrap(); // SUBACK
        let answers = read_exactly(&mut car, 5 + 2 + 4).await;
        assert_eq!(
            answers,
            [0x90, 3, 0, 7, 1, 0xD0, 0, 0x40, 2, 0, 8],
            "SUBACK, PINGRESP, PUBACK"
        );
    }

    /// Returns once the connection opened its broker link.
    async fn wait_for_link(h: &Harness) {
        tokio::time::timeout(Duration::from_secs(5), async {
            while h.links_opened() == 0 {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("a broker link within 5 s");
    }

    /// The client's end of a connection, counting the connection's writes to it.
    struct CountingStream {
        inner: DuplexStream,
        writes: Arc<std::sync::atomic::AtomicUsize>,
    }

    impl tokio::io::AsyncRead for CountingStream {
        fn poll_read(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
        }
    }

    impl AsyncWrite for CountingStream {
        fn poll_write(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
            buf: &[u8],
        ) -> std::task::Poll<std::io::Result<usize>> {
            self.writes
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
        }
        fn poll_flush(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_flush(cx)
        }
        fn poll_shutdown(
            mut self: std::pin::Pin<&mut Self>,
            cx: &mut std::task::Context<'_>,
        ) -> std::task::Poll<std::io::Result<()>> {
            std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
        }
    }

    #[tokio::test]
    async fn a_burst_from_the_broker_reaches_the_subscriber_in_one_write() {
        let h = harness(None).await;
        let (mut app, server) = tokio::io::duplex(64 * 1024);
        let writes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let _task = tokio::spawn(serve_connection(
            Arc::clone(&h.gateway),
            CountingStream {
                inner: server,
                writes: Arc::clone(&writes),
            },
            true,
            None,
            h.shutdown.clone(),
        ));
        connect_v4(&mut app, "app", 60).await;
        app.write_all(&subscribe_packet(7, "fleet/notices"))
            .await
            .unwrap();
        wait_for_link(&h).await;
        let mut link = h.take_link();
        let mut seen = vec![0u8; 256];
        assert!(
            link.read(&mut seen).await.unwrap() > 0,
            "CONNECT, SUBSCRIBE"
        );
        link.write_all(&[0x90, 3, 0, 7, 0]).await.unwrap(); // SUBACK
        assert_eq!(read_exactly(&mut app, 5).await, [0x90, 3, 0, 7, 0]);
        let before = writes.load(std::sync::atomic::Ordering::SeqCst);
        // Ten QoS 0 messages, as the broker's link writes a burst: in one write.
        let one = packet(0x30, &{
            let mut body = BytesMut::new();
            string(&mut body, "fleet/notices");
            body.put_slice(b"hello");
            body.to_vec()
        });
        link.write_all(&one.repeat(10)).await.unwrap();
        assert_eq!(read_exactly(&mut app, one.len() * 10).await, one.repeat(10));
        assert_eq!(
            writes.load(std::sync::atomic::Ordering::SeqCst) - before,
            1,
            "one write for the burst, not one per message"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn packet_id_0_closes_a_3_1_1_client_and_disconnects_an_mqtt_5_one() {
        let h = harness(None).await;
        let topic = format!("vehicles/{VIN}/telemetry");
        let (mut car, task) = h.connect(true);
        car.write_all(&connect_packet(Version::V4, "old", 60))
            .await
            .unwrap();
        read_exactly(&mut car, 4).await;
        car.write_all(&publish_packet(Version::V4, &topic, 0, &reading(1)))
            .await
            .unwrap();
        assert!(
            read_to_close(&mut car).await.is_empty(),
            "closed, no PUBACK"
        );
        let ended = task.await.unwrap();
        assert!(
            matches!(&ended, Ended::Violation(v) if v.kind == crate::codec::Violation::ProtocolError),
            "{ended:?}"
        );

        let (mut car, task) = h.connect(true);
        car.write_all(&connect_packet(Version::V5, "new", 60))
            .await
            .unwrap();
        let connack = read_exactly(&mut car, 2).await;
        read_exactly(&mut car, usize::from(connack[1])).await;
        car.write_all(&publish_packet(Version::V5, &topic, 0, &reading(2)))
            .await
            .unwrap();
        assert_eq!(read_to_close(&mut car).await, [0xE0, 2, 0x82, 0]);
        assert!(matches!(task.await.unwrap(), Ended::Violation(_)));
    }

    #[tokio::test(start_paused = true)]
    async fn an_mqtt_5_car_is_told_not_authorized_outside_its_topics_and_the_broker_never_sees_it()
    {
        let secret = DeviceSecret::new("a-fleet-secret-of-some-length");
        let vin = ecars_model::Vin::parse(VIN).unwrap();
        let password = secret.password_for(&vin);
        let h = harness_with(None, Some(secret)).await;
        let other = "1HGCM82633A004353";

        // Another car's client id: refused at CONNECT (0x85, client identifier not valid).
        let (mut thief, task) = h.connect(true);
        thief
            .write_all(&v5_login_packet(other, VIN, &password))
            .await
            .unwrap();
        assert_eq!(read_to_close(&mut thief).await, [0x20, 3, 0, 0x85, 0]);
        assert!(matches!(task.await.unwrap(), Ended::Refused));

        let (mut car, task) = h.connect(true);
        car.write_all(&v5_login_packet(&format!("{VIN}-1"), VIN, &password))
            .await
            .unwrap();
        let connack = read_exactly(&mut car, 2).await;
        assert_eq!(read_exactly(&mut car, usize::from(connack[1])).await[1], 0);
        // QoS 1 PUBLISH to another car's topic: PUBACK 0x87; a SUBSCRIBE to it: SUBACK 0x87.
        let publish = publish_packet(Version::V5, &format!("vehicles/{other}/commands"), 7, "x");
        let mut subscribe = BytesMut::new();
        subscribe.put_u16(8);
        subscribe.put_u8(0); // no properties
        string(&mut subscribe, &format!("vehicles/{other}/#"));
        subscribe.put_u8(1);
        car.write_all(&[publish, packet(0x82, &subscribe)].concat())
            .await
            .unwrap();
        assert_eq!(
            read_exactly(&mut car, 5 + 6).await,
            [0x40, 3, 0, 7, 0x87, 0x90, 4, 0, 8, 0, 0x87]
        );
        assert_eq!(h.links_opened(), 0, "the broker saw none of it");
        // QoS 0 has no acknowledgement to say it in: DISCONNECT 0x87.
        let qos0 = {
            // A QoS 0 PUBLISH has no packet id: topic, properties, payload.
            let mut body = BytesMut::new();
            string(&mut body, &format!("vehicles/{other}/commands"));
            body.put_u8(0);
            body.put_slice(b"x");
            packet(0x30, &body)
        };
        car.write_all(&qos0).await.unwrap();
        assert_eq!(read_to_close(&mut car).await, [0xE0, 2, 0x87, 0]);
        assert!(
            matches!(task.await.unwrap(), Ended::Violation(v) if v.kind == Violation::NotAuthorized)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_connection_with_the_client_id_takes_the_session_over() {
        let h = harness(None).await;
        let (mut first, first_task) = h.connect(true);
        first
            .write_all(&connect_packet(Version::V5, "car-1", 60))
            .await
            .unwrap();
        let connack = read_exactly(&mut first, 2).await;
        read_exactly(&mut first, usize::from(connack[1])).await;
        let (mut second, second_task) = h.connect(true);
        connect_v4(&mut second, "car-1", 60).await;
        assert_eq!(read_to_close(&mut first).await, [0xE0, 2, 0x8E, 0]);
        assert!(matches!(first_task.await.unwrap(), Ended::TakenOver));
        assert!(!second_task.is_finished(), "the new connection stays");
    }

    #[tokio::test(start_paused = true)]
    async fn a_connect_its_client_abandoned_takes_nothing_over() {
        let mut h = harness(None).await;
        let (mut live, live_task) = h.connect(true);
        connect_v4(&mut live, "car-1", 60).await;
        // An earlier attempt of the same car that gave up before the gateway read it.
        let (mut stale, stale_task) = h.connect(true);
        stale
            .write_all(&connect_packet(Version::V4, "car-1", 60))
            .await
            .unwrap();
        stale.shutdown().await.unwrap();
        assert!(matches!(stale_task.await.unwrap(), Ended::Abandoned));
        assert!(!live_task.is_finished(), "the live connection stays");
        // A client that sends its packets and closes without waiting is served all the same.
        let (mut hasty, hasty_task) = h.connect(true);
        let mut burst = connect_packet(Version::V4, "car-2", 60);
        burst.extend(publish_packet(
            Version::V4,
            &format!("vehicles/{VIN}/telemetry"),
            1,
            &reading(1),
        ));
        hasty.write_all(&burst).await.unwrap();
        hasty.shutdown().await.unwrap();
        assert!(matches!(hasty_task.await.unwrap(), Ended::ConnectionLost));
        assert_eq!(h.readings.recv().await.unwrap().battery, Some(51.0));
    }

    #[tokio::test(start_paused = true)]
    async fn at_the_connection_limit_the_connack_says_so() {
        let h = harness(None).await;
        let (mut car, task) = h.connect(false);
        car.write_all(&connect_packet(Version::V4, "late", 60))
            .await
            .unwrap();
        assert_eq!(
            read_to_close(&mut car).await,
            [0x20, 2, 0, 3],
            "server unavailable"
        );
        assert!(matches!(task.await.unwrap(), Ended::Refused));
        let (mut car, _) = h.connect(false);
        car.write_all(&connect_packet(Version::V5, "late", 60))
            .await
            .unwrap();
        assert_eq!(
            read_to_close(&mut car).await,
            [0x20, 3, 0, 0x97, 0],
            "quota exceeded"
        );
    }
}
