//! The MQTT gateway: the front door of the embedded broker.
//!
//! Every client connection (TCP or WebSocket, MQTT 3.1.1 or 5 on the same port) passes through
//! here on its way to rumqttd. The gateway
//! - authenticates cars at CONNECT (and answers a refusal with a proper CONNACK);
//! - admits each PUBLISH on a telemetry topic to the bus and acknowledges it itself once the bus
//!   has it, so the car's PUBACK means "accepted", and a full bus stops reading from the car: that
//!   is the backpressure publishers feel. The reading then goes to the broker's MQTT subscribers
//!   through the [`TelemetryFanout`](crate::broker::TelemetryFanout), not through the car's broker connection;
//! - dead-letters a rejected reading and acknowledges it itself, so subscribers of the broker
//!   only see valid telemetry and the car does not resend a message that can never pass;
//! - forwards everything else untouched, so other MQTT clients can still subscribe.

use std::collections::{HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use chrono::Utc;
use ecars_bus::{Bus, BusError};
use ecars_model::telemetry::{
    parse_reading, DeadLetter, RejectReason, Rejection, TelemetryReading, TelemetryTopic, Vin,
};
use futures_util::stream::FuturesOrdered;
use futures_util::StreamExt;
use rumqttd::protocol::v4::{check, FixedHeader, PacketType, V4};
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{Login, Packet, Protocol, PublishProperties};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufWriter};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::broker::{EmbeddedBroker, SubscriberSession, MAX_PACKET_BYTES};
use crate::metrics as m;
use ecars_model::device_auth::{AuthError, DeviceSecret};

/// How long a new connection may take to send CONNECT.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// What every connection of one gateway shares.
pub struct Gateway {
    /// The bus readings are admitted to.
    pub bus: Bus,
    /// The broker behind the gateway.
    pub broker: EmbeddedBroker,
    /// The device secret; `None` admits anonymous clients.
    pub device_secret: Option<DeviceSecret>,
    /// QoS 2 packet ids the gateway acknowledged (PUBREC) and whose PUBREL has not come yet, by
    /// client id, kept while a car with a persistent session reconnects: its PUBREL must be
    /// answered here, because the broker never saw those packets.
    pub unreleased: Mutex<HashMap<String, HashSet<u16>>>,
}

impl Gateway {
    /// A gateway in front of `broker`, admitting readings to `bus`.
    pub fn new(bus: Bus, broker: EmbeddedBroker, device_secret: Option<DeviceSecret>) -> Self {
        Gateway {
            bus,
            broker,
            device_secret,
            unreleased: Mutex::new(HashMap::new()),
        }
    }

    /// The packet ids awaiting PUBREL that a returning client left; a clean session starts
    /// with none.
    fn take_unreleased(&self, client_id: &str, clean_session: bool) -> HashSet<u16> {
        let mut map = self.unreleased.lock().unwrap_or_else(|p| p.into_inner());
        let kept = map.remove(client_id);
        if clean_session {
            HashSet::new()
        } else {
            kept.unwrap_or_default()
        }
    }

    /// Keeps a leaving client's packet ids awaiting PUBREL for its next connection.
    fn keep_unreleased(&self, client_id: &str, ids: HashSet<u16>) {
        if !ids.is_empty() {
            let mut map = self.unreleased.lock().unwrap_or_else(|p| p.into_inner());
            map.insert(client_id.to_owned(), ids);
        }
    }
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// Socket error.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The client broke the MQTT protocol.
    #[error("protocol: {0}")]
    Protocol(String),
    /// The client did not send CONNECT in time.
    #[error("no CONNECT within {0:?}")]
    ConnectTimeout(Duration),
    /// The bus refused (shutdown): the connection is closed without acknowledging, so the car
    /// sends the message again elsewhere or later.
    #[error("bus: {0}")]
    Bus(#[from] BusError),
}

impl From<rumqttd::protocol::Error> for ConnectionError {
    fn from(e: rumqttd::protocol::Error) -> Self {
        ConnectionError::Protocol(e.to_string())
    }
}

/// MQTT protocol generation of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Version {
    V4,
    V5,
}

/// Reads whole MQTT packets off a byte stream.
struct FrameReader<R> {
    reader: R,
    buffer: BytesMut,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    fn new(reader: R) -> Self {
        FrameReader {
            reader,
            buffer: BytesMut::with_capacity(16 * 1024),
        }
    }

    /// A packet already in the buffer, if a whole one is there.
    fn buffered(&mut self) -> Result<Option<(FixedHeader, Bytes)>, ConnectionError> {
        match check(self.buffer.iter(), MAX_PACKET_BYTES) {
            Ok(header) => Ok(Some((
                header,
                self.buffer.split_to(header.frame_length()).freeze(),
            ))),
            Err(rumqttd::protocol::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether a whole packet is waiting in the buffer. Writers flush before the reader waits
    /// for more bytes: a client that waits for acknowledgements before sending the rest of a
    /// packet must never wait on bytes held in our buffer.
    fn has_whole_packet(&self) -> bool {
        check(self.buffer.iter(), MAX_PACKET_BYTES).is_ok()
    }

    /// The next packet; `None` at a clean end of stream.
    async fn next(&mut self) -> Result<Option<(FixedHeader, Bytes)>, ConnectionError> {
        loop {
            if let Some(frame) = self.buffered()? {
                return Ok(Some(frame));
            }
            if self.reader.read_buf(&mut self.buffer).await? == 0 {
                return if self.buffer.is_empty() {
                    Ok(None)
                } else {
                    Err(ConnectionError::Protocol(
                        "stream ended inside a packet".into(),
                    ))
                };
            }
        }
    }
}

/// A PUBLISH as the gateway needs to see it.
struct PublishView {
    qos: u8,
    pkid: u16,
    retain: bool,
    topic: String,
    /// The topic as it was on the wire, for the fan-out.
    topic_bytes: Bytes,
    payload: Bytes,
    /// The whole frame when it carries MQTT 5 properties, to rebuild them for the fan-out.
    with_properties: Option<Bytes>,
}

impl PublishView {
    /// The MQTT 5 properties to pass on, parsed only now (rare on telemetry) by rumqttd's own
    /// parser.
    fn properties(&self) -> Result<Option<PublishProperties>, ConnectionError> {
        let Some(frame) = &self.with_properties else {
            return Ok(None);
        };
        match V5.read_mut(&mut BytesMut::from(frame.as_ref()), MAX_PACKET_BYTES)? {
            Packet::Publish(_, properties) => Ok(properties),
            _ => Err(protocol_error("PUBLISH frame read as another packet")),
        }
    }
}

fn protocol_error(what: &str) -> ConnectionError {
    ConnectionError::Protocol(what.to_owned())
}

fn read_u16(bytes: &mut Bytes) -> Result<u16, ConnectionError> {
    if bytes.remaining() < 2 {
        return Err(protocol_error("truncated packet"));
    }
    Ok(bytes.get_u16())
}

fn read_varint(bytes: &mut Bytes) -> Result<usize, ConnectionError> {
    let mut value = 0usize;
    for shift in [0, 7, 14, 21] {
        if !bytes.has_remaining() {
            return Err(protocol_error("truncated variable integer"));
        }
        let byte = bytes.get_u8();
        value |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(protocol_error("variable integer longer than 4 bytes"))
}

fn skip(bytes: &mut Bytes, n: usize) -> Result<(), ConnectionError> {
    if bytes.remaining() < n {
        return Err(protocol_error("truncated packet"));
    }
    bytes.advance(n);
    Ok(())
}

/// Parses a PUBLISH frame (the fields rumqttd keeps private: QoS and packet id).
fn parse_publish(
    header: &FixedHeader,
    frame: &Bytes,
    version: Version,
) -> Result<PublishView, ConnectionError> {
    let qos = (header.byte1 >> 1) & 0b11;
    if qos == 3 {
        return Err(protocol_error("PUBLISH with QoS 3"));
    }
    let mut bytes = frame.slice(header.fixed_header_len..);
    let topic_len = usize::from(read_u16(&mut bytes)?);
    if bytes.remaining() < topic_len {
        return Err(protocol_error("truncated topic"));
    }
    let topic_bytes = bytes.split_to(topic_len);
    let topic = std::str::from_utf8(&topic_bytes)
        .map_err(|_| protocol_error("topic is not UTF-8"))?
        .to_owned();
    let pkid = if qos > 0 { read_u16(&mut bytes)? } else { 0 };
    let mut with_properties = None;
    if version == Version::V5 {
        let len = read_varint(&mut bytes)?;
        if bytes.remaining() < len {
            return Err(protocol_error("truncated properties"));
        }
        let props = bytes.split_to(len);
        if properties(&props)?
            .iter()
            .any(|(id, _)| *id == PROPERTY_TOPIC_ALIAS)
        {
            // The gateway's CONNACK offers no aliases, so a client using one breaks the protocol.
            return Err(protocol_error("topic alias used though none was offered"));
        }
        if !props.is_empty() {
            with_properties = Some(frame.clone());
        }
    }
    Ok(PublishView {
        qos,
        pkid,
        retain: header.byte1 & 0b1 == 1,
        topic,
        topic_bytes,
        payload: bytes,
        with_properties,
    })
}

/// MQTT 5 property "topic alias" (PUBLISH).
const PROPERTY_TOPIC_ALIAS: u8 = 0x23;
/// MQTT 5 property "topic alias maximum" (CONNACK).
const PROPERTY_TOPIC_ALIAS_MAXIMUM: u8 = 0x22;

/// Splits an MQTT 5 property block into (identifier, encoded property) pairs.
fn properties(block: &Bytes) -> Result<Vec<(u8, Bytes)>, ConnectionError> {
    let mut rest = block.clone();
    let mut out = Vec::new();
    while rest.has_remaining() {
        let start = block.len() - rest.len();
        let id = rest.get_u8();
        match id {
            // Byte.
            0x01 | 0x17 | 0x19 | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => skip(&mut rest, 1)?,
            // Two-byte integer.
            0x13 | 0x21 | 0x22 | 0x23 => skip(&mut rest, 2)?,
            // Four-byte integer.
            0x02 | 0x11 | 0x18 | 0x27 => skip(&mut rest, 4)?,
            // UTF-8 string or binary data.
            0x03 | 0x08 | 0x09 | 0x12 | 0x15 | 0x16 | 0x1A | 0x1C | 0x1F => {
                let n = usize::from(read_u16(&mut rest)?);
                skip(&mut rest, n)?
            }
            // Variable byte integer.
            0x0B => {
                read_varint(&mut rest)?;
            }
            // String pair.
            0x26 => {
                for _ in 0..2 {
                    let n = usize::from(read_u16(&mut rest)?);
                    skip(&mut rest, n)?
                }
            }
            other => {
                return Err(ConnectionError::Protocol(format!(
                    "unknown MQTT 5 property {other:#x}"
                )))
            }
        }
        let end = block.len() - rest.len();
        out.push((id, block.slice(start..end)));
    }
    Ok(out)
}

fn put_varint(out: &mut BytesMut, mut value: usize) {
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

/// Finds the protocol level in a CONNECT frame: after the fixed header, the protocol name
/// (length-prefixed) and then one byte.
fn connect_version(header: &FixedHeader, frame: &Bytes) -> Result<Version, ConnectionError> {
    let mut bytes = frame.slice(header.fixed_header_len..);
    let name_len = usize::from(read_u16(&mut bytes)?);
    skip(&mut bytes, name_len)?;
    if !bytes.has_remaining() {
        return Err(protocol_error("truncated CONNECT"));
    }
    match bytes.get_u8() {
        4 => Ok(Version::V4),
        5 => Ok(Version::V5),
        level => Err(ConnectionError::Protocol(format!(
            "unsupported MQTT protocol level {level}"
        ))),
    }
}

/// Packets the gateway writes itself.
fn ack_packet(kind: PacketType, pkid: u16, version: Version, reason: u8) -> Bytes {
    let mut out = BytesMut::with_capacity(5);
    out.put_u8(
        (kind as u8) << 4
            | if kind == PacketType::PubRel {
                0b0010
            } else {
                0
            },
    );
    match version {
        Version::V4 => {
            out.put_u8(2);
            out.put_u16(pkid);
        }
        Version::V5 => {
            out.put_u8(3);
            out.put_u16(pkid);
            out.put_u8(reason);
        }
    }
    out.freeze()
}

fn refused_connack(version: Version, error: AuthError) -> Bytes {
    match version {
        // 3.1.1: 4 = bad user name or password, 5 = not authorized.
        Version::V4 => Bytes::from_static(&[0x20, 0x02, 0x00, 0x04]),
        // 5: 0x86 = bad user name or password, 0x87 = not authorized; empty properties.
        Version::V5 => {
            let code = if error == AuthError::MissingCredentials {
                0x87
            } else {
                0x86
            };
            Bytes::copy_from_slice(&[0x20, 0x03, 0x00, code, 0x00])
        }
    }
}

/// MQTT 5 reason code "payload format invalid", sent in PUBACK/PUBREC for rejected readings.
const REASON_PAYLOAD_FORMAT_INVALID: u8 = 0x99;
/// MQTT 5 reason code "not authorized".
const REASON_NOT_AUTHORIZED: u8 = 0x87;

/// Serves one client connection until it closes or `shutdown` fires.
pub async fn serve_connection<S>(
    gateway: Arc<Gateway>,
    stream: S,
    peer: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (client_read, client_write) = tokio::io::split(stream);
    let mut client = FrameReader::new(client_read);
    let mut client_write = BufWriter::new(client_write);

    let (header, frame) = tokio::select! {
        frame = tokio::time::timeout(CONNECT_TIMEOUT, client.next()) => match frame {
            Ok(Ok(Some(frame))) => frame,
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(ConnectionError::ConnectTimeout(CONNECT_TIMEOUT)),
        },
        _ = shutdown.cancelled() => return Ok(()),
    };
    if header.packet_type()? != PacketType::Connect {
        return Err(protocol_error("first packet is not CONNECT"));
    }
    let version = connect_version(&header, &frame)?;
    let mut connect_buf = BytesMut::from(frame.as_ref());
    let packet = match version {
        Version::V4 => V4.read_mut(&mut connect_buf, MAX_PACKET_BYTES)?,
        Version::V5 => V5.read_mut(&mut connect_buf, MAX_PACKET_BYTES)?,
    };
    let Packet::Connect(connect, props, will, will_props, login) = packet else {
        return Err(protocol_error("first packet is not CONNECT"));
    };
    let client_id = connect.client_id.clone();
    let clean_session = connect.clean_session;

    // Authenticate the car; a refusal gets a CONNACK that says so, then the connection closes.
    let device_vin = match &gateway.device_secret {
        None => None,
        Some(secret) => {
            let (user, pass) = match &login {
                Some(l) => (Some(l.username.as_str()), Some(l.password.as_str())),
                None => (None, None),
            };
            match secret.verify(user, pass) {
                Ok(vin) => Some(vin),
                Err(error) => {
                    metrics::counter!(m::MQTT_CONNECTIONS_REFUSED, "reason" => error.code())
                        .increment(1);
                    tracing::warn!(%peer, client_id, reason = error.code(), "MQTT CONNECT refused");
                    client_write
                        .write_all(&refused_connack(version, error))
                        .await?;
                    client_write.flush().await?;
                    return Ok(());
                }
            }
        }
    };

    // Log in to the broker with the internal credential instead of the car's.
    let internal_login = Some(Login {
        username: gateway.broker.username.clone(),
        password: gateway.broker.password.clone(),
    });
    let mut connect_out = BytesMut::new();
    let broker_addr = match version {
        Version::V4 => {
            V4.write(
                Packet::Connect(connect, None, will, None, internal_login),
                &mut connect_out,
            )?;
            gateway.broker.listener(false)
        }
        Version::V5 => {
            V5.write(
                Packet::Connect(connect, props, will, will_props, internal_login),
                &mut connect_out,
            )?;
            gateway.broker.listener(true)
        }
    };
    let broker_stream = TcpStream::connect(broker_addr).await?;
    broker_stream.set_nodelay(true)?;
    let (broker_read, broker_write) = broker_stream.into_split();
    let mut broker_write = BufWriter::new(broker_write);
    broker_write.write_all(&connect_out).await?;
    broker_write.flush().await?;

    metrics::gauge!(m::MQTT_CONNECTIONS_OPEN).increment(1.0);
    tracing::debug!(%peer, client_id, ?version, vin = ?device_vin, "MQTT client connected");

    // Packets the gateway answers itself go to the client through the same writer as the
    // broker's, so they never interleave inside a packet.
    let (local_tx, local_rx) = mpsc::channel::<Bytes>(64);
    let downstream = tokio::spawn(forward_to_client(
        broker_read,
        client_write,
        local_rx,
        version,
    ));

    let mut upstream = Upstream {
        gateway: &gateway,
        subscriber: gateway.broker.fanout.session(&client_id, clean_session),
        client_id: &client_id,
        device_vin: device_vin.as_ref(),
        version,
        local_tx,
        acks: BytesMut::new(),
        locally_received: gateway.take_unreleased(&client_id, clean_session),
    };
    let result = upstream
        .run(&mut client, &mut broker_write, &shutdown)
        .await;
    gateway.keep_unreleased(&client_id, std::mem::take(&mut upstream.locally_received));
    drop(upstream);
    // Closing the broker side makes the broker end the session and the downstream task finish.
    let _ = broker_write.shutdown().await;
    drop(broker_write);
    let _ = downstream.await;
    metrics::gauge!(m::MQTT_CONNECTIONS_OPEN).decrement(1.0);
    result
}

/// Broker to client: frames from rumqttd and the gateway's own acknowledgements.
async fn forward_to_client<R, W>(
    broker_read: R,
    mut client_write: BufWriter<W>,
    mut local_rx: mpsc::Receiver<Bytes>,
    version: Version,
) -> Result<(), ConnectionError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut broker = FrameReader::new(broker_read);
    let mut local_open = true;
    loop {
        tokio::select! {
            frame = broker.next() => {
                let Some((header, frame)) = frame? else { break };
                let frame = if version == Version::V5 && header.packet_type()? == PacketType::ConnAck {
                    without_topic_aliases(&header, frame)?
                } else {
                    frame
                };
                client_write.write_all(&frame).await?;
            }
            local = local_rx.recv(), if local_open => match local {
                Some(frame) => client_write.write_all(&frame).await?,
                None => local_open = false,
            },
        }
        // Write out once nothing more is waiting: one syscall for a burst of acks.
        if !broker.has_whole_packet() && local_rx.is_empty() {
            client_write.flush().await?;
        }
    }
    client_write.flush().await?;
    let _ = client_write.shutdown().await;
    Ok(())
}

/// Rewrites the broker's MQTT 5 CONNACK so it offers no topic aliases: the gateway must see
/// every PUBLISH's topic to admit it.
fn without_topic_aliases(header: &FixedHeader, frame: Bytes) -> Result<Bytes, ConnectionError> {
    let mut body = frame.slice(header.fixed_header_len..);
    if body.remaining() < 2 {
        return Err(protocol_error("truncated CONNACK"));
    }
    let flags_and_code = body.split_to(2);
    let len = if body.has_remaining() {
        read_varint(&mut body)?
    } else {
        0
    };
    if body.remaining() < len {
        return Err(protocol_error("truncated CONNACK properties"));
    }
    let kept: Vec<Bytes> = properties(&body.split_to(len))?
        .into_iter()
        .filter(|(id, _)| *id != PROPERTY_TOPIC_ALIAS_MAXIMUM)
        .map(|(_, encoded)| encoded)
        .collect();
    let props_len: usize = kept.iter().map(Bytes::len).sum();
    let mut variable = BytesMut::new();
    variable.put_slice(&flags_and_code);
    put_varint(&mut variable, props_len);
    for encoded in kept {
        variable.put_slice(&encoded);
    }
    let mut out = BytesMut::with_capacity(variable.len() + 5);
    out.put_u8(header.byte1);
    put_varint(&mut out, variable.len());
    out.put_slice(&variable);
    Ok(out.freeze())
}

/// Client to broker: admission of telemetry, pass-through of the rest.
struct Upstream<'a> {
    gateway: &'a Gateway,
    /// This connection in the fan-out's registry of telemetry subscriptions.
    subscriber: SubscriberSession,
    client_id: &'a str,
    device_vin: Option<&'a Vin>,
    version: Version,
    local_tx: mpsc::Sender<Bytes>,
    /// Acknowledgements written by the gateway and not yet handed to the client's writer: the
    /// readings Kafka acknowledged together leave in one message and one write.
    acks: BytesMut,
    /// QoS 2 packet ids the gateway acknowledged itself (telemetry, accepted or rejected), whose
    /// PUBREL it must answer rather than the broker.
    locally_received: HashSet<u16>,
}

/// What the gateway does with a PUBLISH.
// A verdict lives for one packet on the stack; boxing the reading would cost an allocation per
// reading for nothing.
#[allow(clippy::large_enum_variant)]
enum Verdict {
    /// Not telemetry: pass it to the broker.
    Forward,
    /// A valid reading: publish it on the bus, then acknowledge it and fan it out.
    Accepted(TelemetryReading, PublishView),
    /// A refused reading: dead-letter it and acknowledge it here.
    Rejected {
        letter: DeadLetter,
        qos: u8,
        pkid: u16,
    },
}

/// A reading on its way to the bus, with its PUBLISH to acknowledge and fan out once it is there.
type InFlight<'a> = Pin<Box<dyn Future<Output = (Result<(), BusError>, PublishView)> + Send + 'a>>;

/// The next reading whose admission has finished, if one has; polled with the task's own waker,
/// so a reading finishing later still wakes the connection.
async fn ready<'a>(
    in_flight: &mut FuturesOrdered<InFlight<'a>>,
) -> Option<(Result<(), BusError>, PublishView)> {
    std::future::poll_fn(|cx| match in_flight.poll_next_unpin(cx) {
        std::task::Poll::Ready(Some(done)) => std::task::Poll::Ready(Some(done)),
        _ => std::task::Poll::Ready(None),
    })
    .await
}

/// Most readings of one connection on their way to the bus at once. Kafka acknowledges after a
/// round trip; keeping several in flight (in order) lets one car publish faster than one
/// reading per round trip, while the bound keeps memory flat.
const MAX_IN_FLIGHT: usize = 128;

impl<'a> Upstream<'a> {
    async fn run<R, W>(
        &mut self,
        client: &mut FrameReader<R>,
        broker_write: &mut BufWriter<W>,
        shutdown: &CancellationToken,
    ) -> Result<(), ConnectionError>
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        let gateway: &'a Gateway = self.gateway;
        let mut in_flight: FuturesOrdered<InFlight<'a>> = FuturesOrdered::new();
        let result = loop {
            let next = tokio::select! {
                biased;
                _ = shutdown.cancelled() => break Ok(()),
                Some(done) = in_flight.next(), if !in_flight.is_empty() => {
                    let mut outcome = self.admitted(done).await;
                    // And the others already admitted, without waiting.
                    while outcome.is_ok() {
                        match ready(&mut in_flight).await {
                            Some(done) => outcome = self.admitted(done).await,
                            None => break,
                        }
                    }
                    self.send_acks().await;
                    if let Err(e) = outcome {
                        break Err(e);
                    }
                    continue;
                }
                next = client.next(), if in_flight.len() < MAX_IN_FLIGHT => next,
            };
            let (header, frame) = match next {
                Ok(Some(packet)) => packet,
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            };
            let verdict = match header.packet_type()? {
                PacketType::Publish => self.judge(&header, &frame)?,
                PacketType::Connect => break Err(protocol_error("second CONNECT")),
                PacketType::Subscribe | PacketType::Unsubscribe => {
                    self.note_subscriptions(&frame)?;
                    Verdict::Forward
                }
                _ => Verdict::Forward,
            };
            if let Verdict::Accepted(reading, publish) = verdict {
                in_flight.push_back(Box::pin(async move {
                    (gateway.bus.publish(reading).await, publish)
                }));
                continue;
            }
            // Anything else keeps its place behind the readings still in flight: MQTT wants
            // acknowledgements in the order the packets came.
            self.drain(&mut in_flight).await?;
            let forward = match verdict {
                Verdict::Forward if header.packet_type()? == PacketType::PubRel => {
                    let pkid = read_u16(&mut frame.slice(header.fixed_header_len..))?;
                    if self.locally_received.remove(&pkid) {
                        self.reply(ack_packet(PacketType::PubComp, pkid, self.version, 0))
                            .await;
                        false
                    } else {
                        true
                    }
                }
                Verdict::Forward => true,
                Verdict::Rejected { letter, qos, pkid } => {
                    self.reject(letter, qos, pkid).await?;
                    false
                }
                Verdict::Accepted(..) => unreachable!("handled above"),
            };
            if forward {
                broker_write.write_all(&frame).await?;
            }
            if !client.has_whole_packet() {
                broker_write.flush().await?;
            }
        };
        // Whatever reached the bus is acknowledged before the connection ends.
        self.drain(&mut in_flight).await?;
        result
    }

    /// Acknowledges one reading that reached the bus, then hands it to the broker's subscribers.
    async fn admitted(
        &mut self,
        (result, publish): (Result<(), BusError>, PublishView),
    ) -> Result<(), ConnectionError> {
        result?;
        metrics::counter!(m::READINGS_ACCEPTED).increment(1);
        self.acknowledge(publish.qos, publish.pkid, 0);
        let fanout = &self.gateway.broker.fanout;
        if !fanout.wanted(publish.retain) {
            return Ok(());
        }
        let properties = publish.properties()?;
        fanout
            .publish(
                publish.topic_bytes,
                publish.payload,
                publish.retain,
                properties,
            )
            .await
            .map_err(|e| ConnectionError::Protocol(e.to_string()))
    }

    /// Waits for every reading in flight and acknowledges them in order.
    async fn drain(
        &mut self,
        in_flight: &mut FuturesOrdered<InFlight<'_>>,
    ) -> Result<(), ConnectionError> {
        while let Some(done) = in_flight.next().await {
            self.admitted(done).await?;
        }
        self.send_acks().await;
        Ok(())
    }

    /// Answers a PUBLISH the gateway took itself: PUBACK for QoS 1; PUBREC for QoS 2, after
    /// which the car's PUBREL is answered here too.
    /// The acknowledgement waits in `acks` until [`Upstream::send_acks`].
    fn acknowledge(&mut self, qos: u8, pkid: u16, reason: u8) {
        match qos {
            1 => self.acks.extend_from_slice(&ack_packet(
                PacketType::PubAck,
                pkid,
                self.version,
                reason,
            )),
            2 => {
                // MQTT 5 ends the exchange at a failing PUBREC; otherwise a PUBREL follows.
                if reason < 0x80 || self.version == Version::V4 {
                    self.locally_received.insert(pkid);
                }
                self.acks.extend_from_slice(&ack_packet(
                    PacketType::PubRec,
                    pkid,
                    self.version,
                    reason,
                ));
            }
            _ => {}
        }
    }

    /// Tells the fan-out which telemetry filters this client (un)subscribes, before the broker
    /// sees the packet: a reading admitted after it reaches the new subscriber.
    fn note_subscriptions(&self, frame: &Bytes) -> Result<(), ConnectionError> {
        let mut buffer = BytesMut::from(frame.as_ref());
        let packet = match self.version {
            Version::V4 => V4.read_mut(&mut buffer, MAX_PACKET_BYTES)?,
            Version::V5 => V5.read_mut(&mut buffer, MAX_PACKET_BYTES)?,
        };
        match packet {
            Packet::Subscribe(subscribe, _) => self
                .subscriber
                .subscribed(subscribe.filters.iter().map(|f| f.path.as_str())),
            Packet::Unsubscribe(unsubscribe, _) => self
                .subscriber
                .unsubscribed(unsubscribe.filters.iter().map(String::as_str)),
            _ => {}
        }
        Ok(())
    }

    /// Sends `packet` to the client, after the acknowledgements still pending.
    async fn reply(&mut self, packet: Bytes) {
        self.acks.extend_from_slice(&packet);
        self.send_acks().await;
    }

    /// Hands the pending acknowledgements to the client's writer.
    async fn send_acks(&mut self) {
        if self.acks.is_empty() {
            return;
        }
        let acks = self.acks.split().freeze();
        // The downstream task only stops when the connection is ending anyway.
        let _ = self.local_tx.send(acks).await;
    }

    /// Decides a PUBLISH.
    fn judge(&self, header: &FixedHeader, frame: &Bytes) -> Result<Verdict, ConnectionError> {
        let publish = parse_publish(header, frame, self.version)?;
        let Some(topic) = TelemetryTopic::classify(&publish.topic) else {
            return Ok(Verdict::Forward);
        };
        metrics::counter!(m::READINGS_RECEIVED).increment(1);
        let received_at = Utc::now();
        let verdict = parse_reading(&topic, &publish.payload, Uuid::now_v7(), received_at)
            .and_then(|reading| match self.device_vin {
                Some(own) if *own != reading.vin => Err(Rejection {
                    reason: RejectReason::UnauthorizedVin,
                    detail: format!(
                        "client authenticated as {own} published for {}",
                        reading.vin
                    ),
                }),
                _ => Ok(reading),
            });
        Ok(match verdict {
            Ok(reading) => Verdict::Accepted(reading, publish),
            Err(rejection) => {
                metrics::counter!(m::READINGS_REJECTED, "reason" => rejection.reason.code())
                    .increment(1);
                tracing::info!(
                    client_id = self.client_id,
                    topic = publish.topic,
                    reason = rejection.reason.code(),
                    detail = rejection.detail,
                    "reading rejected to the dead-letter store"
                );
                Verdict::Rejected {
                    letter: DeadLetter::new(
                        &publish.topic,
                        self.client_id,
                        rejection,
                        &publish.payload,
                        received_at,
                    ),
                    qos: publish.qos,
                    pkid: publish.pkid,
                }
            }
        })
    }

    /// Dead-letters a refused reading, then acknowledges it to the car.
    async fn reject(
        &mut self,
        letter: DeadLetter,
        qos: u8,
        pkid: u16,
    ) -> Result<(), ConnectionError> {
        let code = if letter.reason == RejectReason::UnauthorizedVin {
            REASON_NOT_AUTHORIZED
        } else {
            REASON_PAYLOAD_FORMAT_INVALID
        };
        self.gateway.bus.publish(letter).await?;
        self.acknowledge(qos, pkid, code);
        self.send_acks().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish_frame(
        topic: &str,
        qos: u8,
        pkid: u16,
        v5_props: Option<&[u8]>,
        payload: &[u8],
    ) -> (FixedHeader, Bytes) {
        let mut body = BytesMut::new();
        body.put_u16(topic.len() as u16);
        body.put_slice(topic.as_bytes());
        if qos > 0 {
            body.put_u16(pkid);
        }
        if let Some(props) = v5_props {
            body.put_u8(props.len() as u8);
            body.put_slice(props);
        }
        body.put_slice(payload);
        let mut frame = BytesMut::new();
        frame.put_u8(0x30 | (qos << 1));
        frame.put_u8(body.len() as u8);
        frame.put_slice(&body);
        let header = check(frame.iter(), MAX_PACKET_BYTES).unwrap();
        (header, frame.freeze())
    }

    #[test]
    fn parses_v4_and_v5_publish() {
        let (h, f) = publish_frame("ecars/data", 1, 7, None, b"{}");
        let p = parse_publish(&h, &f, Version::V4).unwrap();
        assert_eq!(
            (p.qos, p.pkid, p.topic.as_str(), p.payload.as_ref()),
            (1, 7, "ecars/data", &b"{}"[..])
        );

        let props = [
            0x01, 0x01, 0x03, 0x00, 0x04, b'j', b's', b'o', b'n', 0x26, 0, 1, b'k', 0, 1, b'v',
        ];
        let (h, f) = publish_frame("a/b", 2, 9, Some(&props), b"xyz");
        let p = parse_publish(&h, &f, Version::V5).unwrap();
        assert_eq!((p.qos, p.pkid, p.payload.as_ref()), (2, 9, &b"xyz"[..]));
        let props = p.properties().unwrap().unwrap();
        assert_eq!(props.content_type.as_deref(), Some("json"));
        assert_eq!(props.user_properties, vec![("k".into(), "v".into())]);

        let (h, f) = publish_frame("", 0, 0, Some(&[0x23, 0x00, 0x01]), b"x");
        assert!(parse_publish(&h, &f, Version::V5).is_err());

        let (h, f) = publish_frame("t", 0, 0, Some(&[0x7f]), b"x");
        assert!(parse_publish(&h, &f, Version::V5).is_err());
    }

    #[test]
    fn connack_loses_only_the_topic_alias_maximum() {
        // Session present 0, success, properties: receive max 100, topic alias max 10,
        // assigned client id "ab".
        let body = [
            0x00, 0x00, 0x0b, 0x21, 0x00, 0x64, 0x22, 0x00, 0x0a, 0x12, 0x00, 0x02, b'a', b'b',
        ];
        let mut frame = BytesMut::new();
        frame.put_u8(0x20);
        frame.put_u8(body.len() as u8);
        frame.put_slice(&body);
        let header = check(frame.iter(), MAX_PACKET_BYTES).unwrap();
        let out = without_topic_aliases(&header, frame.freeze()).unwrap();
        assert_eq!(
            out.as_ref(),
            &[0x20, 0x0b, 0x00, 0x00, 0x08, 0x21, 0x00, 0x64, 0x12, 0x00, 0x02, b'a', b'b']
        );
    }

    #[test]
    fn acks_are_well_formed() {
        assert_eq!(
            ack_packet(PacketType::PubAck, 0x0102, Version::V4, 0).as_ref(),
            &[0x40, 2, 1, 2]
        );
        assert_eq!(
            ack_packet(PacketType::PubRec, 5, Version::V5, 0x99).as_ref(),
            &[0x50, 3, 0, 5, 0x99]
        );
        assert_eq!(
            ack_packet(PacketType::PubComp, 5, Version::V4, 0).as_ref(),
            &[0x70, 2, 0, 5]
        );
    }
}
