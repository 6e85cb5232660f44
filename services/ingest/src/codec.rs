//! MQTT on the wire, as far as the gateway reads and writes it itself: framing (whole packets off
//! a byte stream), the fields of PUBLISH and CONNECT it decides on, and the packets it answers
//! with (CONNACK, PUBACK, PUBREC, PUBCOMP, PINGRESP, DISCONNECT). Pure: no I/O but the framing
//! reader's reads.
//!
//! Packets the gateway passes to the embedded broker untouched (SUBSCRIBE, other topics) are
//! framed here and parsed by rumqttd's own codec where a field is needed.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rumqttd::protocol::v4::{check, FixedHeader, V4};
use rumqttd::protocol::v5::V5;
use rumqttd::protocol::{Packet, Protocol, PublishProperties};
use tokio::io::{AsyncRead, AsyncReadExt};

pub use rumqttd::protocol::v4::PacketType;

/// Largest MQTT packet the gateway and broker carry, in bytes (telemetry itself is capped lower,
/// at 64 KiB, and larger telemetry is dead-lettered rather than refused).
pub const MAX_PACKET_BYTES: usize = 1024 * 1024;

/// What a connection's read buffer starts with: most cars send packets of a few hundred bytes,
/// and an idle car should cost little. It grows to what a packet needs.
const INITIAL_READ_BUFFER: usize = 512;

/// A read buffer grown past this by a large packet is given back once it is empty again.
const KEPT_READ_BUFFER: usize = 16 * 1024;

/// The most a single read asks for: a busy car's pipelined packets come in large reads.
const LARGEST_READ: usize = 64 * 1024;

/// MQTT protocol generation of a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Version {
    /// MQTT 3.1.1 (protocol level 4).
    V4,
    /// MQTT 5.
    V5,
}

/// A whole packet of this protocol version, parsed by rumqttd's parser (for the rare packets the
/// gateway needs whole: CONNECT, SUBSCRIBE, the broker's SUBACK).
pub fn decode(version: Version, frame: &[u8]) -> Result<Packet, Malformed> {
    let mut buffer = BytesMut::from(frame);
    Ok(match version {
        Version::V4 => V4.read_mut(&mut buffer, MAX_PACKET_BYTES)?,
        Version::V5 => V5.read_mut(&mut buffer, MAX_PACKET_BYTES)?,
    })
}

/// A packet of this protocol version, on the wire.
pub fn encode(version: Version, packet: Packet) -> Result<Bytes, Malformed> {
    let mut buffer = BytesMut::new();
    match version {
        Version::V4 => V4.write(packet, &mut buffer)?,
        Version::V5 => V5.write(packet, &mut buffer)?,
    };
    Ok(buffer.freeze())
}

/// A packet that breaks the protocol, with the reason it is refused for.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{detail}")]
pub struct Malformed {
    /// What kind of violation, for metrics and the MQTT 5 DISCONNECT reason.
    pub kind: Violation,
    /// What exactly was wrong.
    pub detail: String,
}

/// Kinds of protocol violation, each counted by its code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Violation {
    /// A packet that does not parse (truncated, bad lengths, bad UTF-8).
    Malformed,
    /// A well-formed packet that the protocol forbids here (packet id 0, QoS 3, a second
    /// CONNECT, a topic alias that was never offered).
    ProtocolError,
    /// A packet longer than [`MAX_PACKET_BYTES`].
    PacketTooLarge,
    /// Something the client's identity may not do where the protocol has no other answer (a
    /// car's PUBLISH to a topic not its own, in MQTT 3.1.1 or at QoS 0).
    NotAuthorized,
    /// A retained message over the retained limits, where the protocol has no other answer.
    QuotaExceeded,
}

impl Violation {
    /// Stable code for metric labels and logs.
    pub fn code(self) -> &'static str {
        match self {
            Violation::Malformed => "malformed_packet",
            Violation::ProtocolError => "protocol_error",
            Violation::PacketTooLarge => "packet_too_large",
            Violation::NotAuthorized => "not_authorized",
            Violation::QuotaExceeded => "quota_exceeded",
        }
    }

    /// The MQTT 5 DISCONNECT reason code.
    pub fn reason_code(self) -> u8 {
        match self {
            Violation::Malformed => 0x81,
            Violation::ProtocolError => 0x82,
            Violation::PacketTooLarge => 0x95,
            Violation::NotAuthorized => 0x87,
            Violation::QuotaExceeded => 0x97,
        }
    }
}

fn malformed(detail: impl Into<String>) -> Malformed {
    Malformed {
        kind: Violation::Malformed,
        detail: detail.into(),
    }
}

/// A protocol error (a well-formed packet the protocol forbids).
pub fn protocol_error(detail: impl Into<String>) -> Malformed {
    Malformed {
        kind: Violation::ProtocolError,
        detail: detail.into(),
    }
}

impl From<rumqttd::protocol::Error> for Malformed {
    fn from(e: rumqttd::protocol::Error) -> Self {
        match e {
            rumqttd::protocol::Error::PayloadSizeLimitExceeded(_) => Malformed {
                kind: Violation::PacketTooLarge,
                detail: e.to_string(),
            },
            other => malformed(other.to_string()),
        }
    }
}

/// Why reading a packet failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The socket failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not MQTT.
    #[error("{0}")]
    Malformed(#[from] Malformed),
}

/// One whole packet: its fixed header and the whole frame (fixed header included).
pub type Frame = (FixedHeader, Bytes);

/// Reads whole MQTT packets off a byte stream.
#[derive(Debug)]
pub struct FrameReader<R> {
    reader: R,
    buffer: BytesMut,
    /// How much the next read asks for: doubled while reads come back full (a busy car),
    /// halved while they come back short (an idle one), so an idle car keeps a small buffer and
    /// a busy one is read in few system calls.
    read_size: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    /// A reader with a small buffer that grows with the packets.
    pub fn new(reader: R) -> Self {
        FrameReader {
            reader,
            buffer: BytesMut::new(),
            read_size: INITIAL_READ_BUFFER,
        }
    }

    /// A packet already in the buffer, if a whole one is there.
    fn buffered(&mut self) -> Result<Option<Frame>, Malformed> {
        match check(self.buffer.iter(), MAX_PACKET_BYTES) {
            Ok(header) => {
                let frame = self.buffer.split_to(header.frame_length()).freeze();
                if self.buffer.is_empty() && self.buffer.capacity() > KEPT_READ_BUFFER {
                    self.buffer = BytesMut::new();
                }
                Ok(Some((header, frame)))
            }
            Err(rumqttd::protocol::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Whether a whole packet is waiting in the buffer. Writers flush before the reader waits
    /// for more bytes: a client that waits for acknowledgements before sending the rest of a
    /// packet must never wait on bytes held in our buffer.
    pub fn has_whole_packet(&self) -> bool {
        check(self.buffer.iter(), MAX_PACKET_BYTES).is_ok()
    }

    /// Whether the peer has already closed its end with nothing more to read, judged without
    /// waiting. Bytes that did arrive stay for [`FrameReader::next`].
    ///
    /// A car whose CONNECT timed out closes its socket and connects again; under load the
    /// abandoned CONNECT may still wait in the listen queue and be read after the new one.
    pub fn peer_closed(&mut self) -> bool {
        use futures_util::FutureExt;
        if !self.buffer.is_empty() {
            return false;
        }
        self.buffer.reserve(INITIAL_READ_BUFFER);
        matches!(
            self.reader.read_buf(&mut self.buffer).now_or_never(),
            Some(Ok(0))
        )
    }

    /// The next packet; `None` at a clean end of stream. Cancel-safe: bytes read before a
    /// cancellation stay in the buffer.
    pub async fn next(&mut self) -> Result<Option<Frame>, ReadError> {
        loop {
            if let Some(frame) = self.buffered()? {
                return Ok(Some(frame));
            }
            let want = match check(self.buffer.iter(), MAX_PACKET_BYTES) {
                Err(rumqttd::protocol::Error::InsufficientBytes(n)) => n.max(self.read_size),
                _ => self.read_size,
            };
            self.buffer.reserve(want);
            let room = self.buffer.capacity() - self.buffer.len();
            let read = self.reader.read_buf(&mut self.buffer).await?;
            self.read_size = if read == room {
                (self.read_size * 2).min(LARGEST_READ)
            } else if read < room / 2 {
                (self.read_size / 2).max(INITIAL_READ_BUFFER)
            } else {
                self.read_size
            };
            if read == 0 {
                return if self.buffer.is_empty() {
                    Ok(None)
                } else {
                    Err(malformed("stream ended inside a packet").into())
                };
            }
        }
    }
}

/// The packet type of a frame, or why it has none.
pub fn packet_type(header: &FixedHeader) -> Result<PacketType, Malformed> {
    Ok(header.packet_type()?)
}

/// A PUBLISH as the gateway needs to see it.
#[derive(Clone, Debug)]
pub struct PublishView {
    /// QoS 0, 1 or 2.
    pub qos: u8,
    /// Packet id (0 for QoS 0).
    pub pkid: u16,
    /// The retain flag.
    pub retain: bool,
    /// The topic.
    pub topic: String,
    /// The topic as it was on the wire, for the fan-out.
    pub topic_bytes: Bytes,
    /// The payload.
    pub payload: Bytes,
    /// The whole frame when it carries MQTT 5 properties, to rebuild them for the fan-out.
    with_properties: Option<Bytes>,
}

impl PublishView {
    /// The MQTT 5 properties to pass on, parsed only now (rare on telemetry) by rumqttd's own
    /// parser.
    pub fn properties(&self) -> Result<Option<PublishProperties>, Malformed> {
        let Some(frame) = &self.with_properties else {
            return Ok(None);
        };
        match decode(Version::V5, frame)? {
            Packet::Publish(_, properties) => Ok(properties),
            _ => Err(malformed("PUBLISH frame read as another packet")),
        }
    }
}

/// Reads a two-byte integer.
pub fn read_u16(bytes: &mut Bytes) -> Result<u16, Malformed> {
    if bytes.remaining() < 2 {
        return Err(malformed("truncated packet"));
    }
    Ok(bytes.get_u16())
}

fn read_varint(bytes: &mut Bytes) -> Result<usize, Malformed> {
    let mut value = 0usize;
    for shift in [0, 7, 14, 21] {
        if !bytes.has_remaining() {
            return Err(malformed("truncated variable integer"));
        }
        let byte = bytes.get_u8();
        value |= usize::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(malformed("variable integer longer than 4 bytes"))
}

fn skip(bytes: &mut Bytes, n: usize) -> Result<(), Malformed> {
    if bytes.remaining() < n {
        return Err(malformed("truncated packet"));
    }
    bytes.advance(n);
    Ok(())
}

/// MQTT 5 property "topic alias" (PUBLISH).
const PROPERTY_TOPIC_ALIAS: u8 = 0x23;

/// Parses a PUBLISH frame (the fields rumqttd keeps private: QoS and packet id), refusing what
/// the protocol forbids: QoS 3, packet id 0 at QoS 1 or 2 (3.1.1 §2.3.1, 5 §2.2.1), and topic
/// aliases, which the gateway never offers.
pub fn parse_publish(
    header: &FixedHeader,
    frame: &Bytes,
    version: Version,
) -> Result<PublishView, Malformed> {
    let qos = (header.byte1 >> 1) & 0b11;
    if qos == 3 {
        return Err(protocol_error("PUBLISH with QoS 3"));
    }
    let mut bytes = frame.slice(header.fixed_header_len..);
    let topic_len = usize::from(read_u16(&mut bytes)?);
    if bytes.remaining() < topic_len {
        return Err(malformed("truncated topic"));
    }
    let topic_bytes = bytes.split_to(topic_len);
    let topic = std::str::from_utf8(&topic_bytes)
        .map_err(|_| malformed("topic is not UTF-8"))?
        .to_owned();
    let pkid = if qos > 0 { read_u16(&mut bytes)? } else { 0 };
    if qos > 0 && pkid == 0 {
        return Err(protocol_error(format!(
            "QoS {qos} PUBLISH with packet id 0"
        )));
    }
    let mut with_properties = None;
    if version == Version::V5 {
        let len = read_varint(&mut bytes)?;
        if bytes.remaining() < len {
            return Err(malformed("truncated properties"));
        }
        let props = bytes.split_to(len);
        if properties(&props)?
            .iter()
            .any(|(id, _)| *id == PROPERTY_TOPIC_ALIAS)
        {
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

/// The packet id of a packet that carries one right after its fixed header (PUBACK, PUBREC,
/// PUBREL, PUBCOMP, SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK), refusing id 0.
pub fn packet_id(header: &FixedHeader, frame: &Bytes) -> Result<u16, Malformed> {
    let pkid = read_u16(&mut frame.slice(header.fixed_header_len..))?;
    if pkid == 0 {
        return Err(protocol_error("packet id 0"));
    }
    Ok(pkid)
}

/// Splits an MQTT 5 property block into (identifier, encoded property) pairs.
pub fn properties(block: &Bytes) -> Result<Vec<(u8, Bytes)>, Malformed> {
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
            other => return Err(malformed(format!("unknown MQTT 5 property {other:#x}"))),
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
pub fn connect_version(header: &FixedHeader, frame: &Bytes) -> Result<Version, Malformed> {
    let mut bytes = frame.slice(header.fixed_header_len..);
    let name_len = usize::from(read_u16(&mut bytes)?);
    skip(&mut bytes, name_len)?;
    if !bytes.has_remaining() {
        return Err(malformed("truncated CONNECT"));
    }
    match bytes.get_u8() {
        4 => Ok(Version::V4),
        5 => Ok(Version::V5),
        level => Err(protocol_error(format!(
            "unsupported MQTT protocol level {level}"
        ))),
    }
}

/// An acknowledgement the gateway writes itself: PUBACK, PUBREC, PUBREL or PUBCOMP (MQTT 5 with
/// its reason code).
pub fn ack_packet(kind: PacketType, pkid: u16, version: Version, reason: u8) -> Bytes {
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

/// PINGRESP.
pub const PINGRESP: [u8; 2] = [0xD0, 0x00];

/// Why a CONNECT is refused, as each protocol version says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Wrong or missing credentials (3.1.1 code 4, 5 0x86; 0x87 without any).
    BadCredentials {
        /// Whether the client sent none at all (MQTT 5: 0x87 "not authorized").
        missing: bool,
    },
    /// The server is at its connection limit (3.1.1 code 3 "server unavailable", 5 0x97
    /// "quota exceeded").
    AtCapacity,
    /// The client id is not acceptable (3.1.1 code 2, 5 0x85).
    ClientIdRejected,
    /// The client is revoked (3.1.1 code 5 "not authorized", 5 0x87).
    NotAuthorized,
}

/// CONNACK refusing a connection.
pub fn refused_connack(version: Version, refusal: Refusal) -> Bytes {
    let (v4, v5) = match refusal {
        Refusal::BadCredentials { missing: true } => (4, 0x87),
        Refusal::BadCredentials { missing: false } => (4, 0x86),
        Refusal::AtCapacity => (3, 0x97),
        Refusal::ClientIdRejected => (2, 0x85),
        Refusal::NotAuthorized => (5, 0x87),
    };
    match version {
        Version::V4 => Bytes::copy_from_slice(&[0x20, 0x02, 0x00, v4]),
        // Empty properties.
        Version::V5 => Bytes::copy_from_slice(&[0x20, 0x03, 0x00, v5, 0x00]),
    }
}

/// What a CONNACK accepting a connection says.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Accepted {
    /// Whether the server had a session for the client id.
    pub session_present: bool,
    /// MQTT 5: the keep-alive the server imposes, when it differs from the client's.
    pub server_keep_alive: Option<u16>,
    /// MQTT 5: the client id the server chose for a client that sent none.
    pub assigned_client_id: Option<String>,
}

/// CONNACK accepting a connection. MQTT 5 also says what the gateway allows: no topic aliases
/// (their absence means 0), packets of at most [`MAX_PACKET_BYTES`].
pub fn accepted_connack(version: Version, accepted: &Accepted) -> Bytes {
    let flags = u8::from(accepted.session_present);
    match version {
        Version::V4 => Bytes::copy_from_slice(&[0x20, 0x02, flags, 0x00]),
        Version::V5 => {
            let mut props = BytesMut::new();
            props.put_u8(0x27); // Maximum Packet Size
            props.put_u32(MAX_PACKET_BYTES as u32);
            if let Some(keep_alive) = accepted.server_keep_alive {
                props.put_u8(0x13); // Server Keep Alive
                props.put_u16(keep_alive);
            }
            if let Some(id) = &accepted.assigned_client_id {
                props.put_u8(0x12); // Assigned Client Identifier
                props.put_u16(id.len() as u16);
                props.put_slice(id.as_bytes());
            }
            let mut variable = BytesMut::new();
            variable.put_u8(flags);
            variable.put_u8(0x00);
            put_varint(&mut variable, props.len());
            variable.put_slice(&props);
            packet(0x20, &variable)
        }
    }
}

/// A whole packet: its first byte (type and flags), the remaining length, then `body`.
fn packet(first: u8, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.put_u8(first);
    put_varint(&mut out, body.len());
    out.put_slice(body);
    out.freeze()
}

/// MQTT 5 DISCONNECT with a reason code, sent by the server before it closes.
pub fn disconnect(reason: u8) -> Bytes {
    Bytes::copy_from_slice(&[0xE0, 0x02, reason, 0x00])
}

/// An MQTT 5 DISCONNECT that sends the client to another server: reason "use another server"
/// (0x9C) with the Server Reference property (MQTT 5 §4.11: a Server Reference goes with
/// 0x9C or 0x9D). `reference` is at most 65,535 bytes (the setting checks it).
pub fn disconnect_to(reference: &str) -> Bytes {
    let reference = &reference.as_bytes()[..reference.len().min(usize::from(u16::MAX))];
    let properties = 3 + reference.len();
    let mut body = BytesMut::with_capacity(8 + properties);
    body.put_u8(REASON_USE_ANOTHER_SERVER);
    put_varint(&mut body, properties);
    body.put_u8(PROPERTY_SERVER_REFERENCE);
    body.put_u16(reference.len() as u16);
    body.put_slice(reference);
    packet(0xE0, &body)
}

/// MQTT 5 reason "use another server".
pub const REASON_USE_ANOTHER_SERVER: u8 = 0x9C;
/// MQTT 5 property "Server Reference" (a UTF-8 string).
const PROPERTY_SERVER_REFERENCE: u8 = 0x1C;
/// MQTT 5 DISCONNECT reason "keep alive timeout".
pub const REASON_KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
/// MQTT 5 DISCONNECT reason "session taken over".
pub const REASON_SESSION_TAKEN_OVER: u8 = 0x8E;
/// MQTT 5 DISCONNECT reason "server shutting down".
pub const REASON_SERVER_SHUTTING_DOWN: u8 = 0x8B;
/// MQTT 5 reason code "payload format invalid", sent in PUBACK/PUBREC for rejected readings.
pub const REASON_PAYLOAD_FORMAT_INVALID: u8 = 0x99;
/// MQTT 5 reason code "not authorized".
pub const REASON_NOT_AUTHORIZED: u8 = 0x87;

/// A packet the gateway must not let through to its client: the broker's own CONNACK of a link
/// opened after the gateway already answered, and PINGRESPs to the gateway's own pings.
pub fn is_broker_private(kind: PacketType) -> bool {
    matches!(kind, PacketType::ConnAck | PacketType::PingResp)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn publish_frame(
        topic: &str,
        qos: u8,
        pkid: u16,
        v5_props: Option<&[u8]>,
        payload: &[u8],
    ) -> Frame {
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
        put_varint(&mut frame, body.len());
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
        assert_eq!(
            parse_publish(&h, &f, Version::V5).unwrap_err().kind,
            Violation::ProtocolError
        );

        let (h, f) = publish_frame("t", 0, 0, Some(&[0x7f]), b"x");
        assert_eq!(
            parse_publish(&h, &f, Version::V5).unwrap_err().kind,
            Violation::Malformed
        );
    }

    #[test]
    fn packet_id_zero_is_a_protocol_error_at_qos_1_and_2_only() {
        for qos in [1, 2] {
            let (h, f) = publish_frame("ecars/data", qos, 0, None, b"{}");
            let error = parse_publish(&h, &f, Version::V4).unwrap_err();
            assert_eq!(error.kind, Violation::ProtocolError, "QoS {qos}");
            assert_eq!(error.kind.reason_code(), 0x82);
        }
        let (h, f) = publish_frame("ecars/data", 0, 0, None, b"{}");
        assert!(parse_publish(&h, &f, Version::V4).is_ok());
        // PUBREL with id 0.
        let frame = Bytes::from_static(&[0x62, 0x02, 0x00, 0x00]);
        let header = check(frame.iter(), MAX_PACKET_BYTES).unwrap();
        assert_eq!(
            packet_id(&header, &frame).unwrap_err().kind,
            Violation::ProtocolError
        );
    }

    #[test]
    fn acks_and_connacks_are_well_formed() {
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
        let plain = Accepted::default();
        assert_eq!(
            accepted_connack(
                Version::V4,
                &Accepted {
                    session_present: true,
                    ..plain.clone()
                }
            )
            .as_ref(),
            &[0x20, 2, 1, 0]
        );
        let v5 = accepted_connack(
            Version::V5,
            &Accepted {
                session_present: false,
                server_keep_alive: Some(300),
                assigned_client_id: Some("ab".into()),
            },
        );
        // Flags, reason, properties: max packet size (5), server keep alive (3), assigned id (5).
        assert_eq!(
            v5.as_ref(),
            &[
                0x20, 16, 0x00, 0x00, 13, 0x27, 0x00, 0x10, 0x00, 0x00, 0x13, 0x01, 0x2C, 0x12,
                0x00, 0x02, b'a', b'b'
            ]
        );
        assert_eq!(
            refused_connack(Version::V4, Refusal::AtCapacity).as_ref(),
            &[0x20, 2, 0, 3]
        );
        assert_eq!(
            refused_connack(Version::V5, Refusal::AtCapacity).as_ref(),
            &[0x20, 3, 0, 0x97, 0]
        );
        assert_eq!(disconnect(0x82).as_ref(), &[0xE0, 2, 0x82, 0]);
    }

    #[test]
    fn a_disconnect_to_another_server_carries_its_reference() {
        let mut frame = BytesMut::from(disconnect_to("mqtt-b.example.com:8883").as_ref());
        match V5.read_mut(&mut frame, MAX_PACKET_BYTES) {
            Ok(Packet::Disconnect(disconnect, Some(properties))) => {
                assert_eq!(
                    disconnect.reason_code,
                    rumqttd::protocol::DisconnectReasonCode::UseAnotherServer
                );
                assert_eq!(
                    properties.server_reference.as_deref(),
                    Some("mqtt-b.example.com:8883")
                );
            }
            other => panic!("{other:?}"),
        }
        assert!(frame.is_empty(), "one whole packet");
        // A reference long enough for a two-byte remaining length still parses.
        let long = "a".repeat(300);
        let mut frame = BytesMut::from(disconnect_to(&long).as_ref());
        assert!(matches!(
            V5.read_mut(&mut frame, MAX_PACKET_BYTES),
            Ok(Packet::Disconnect(_, Some(p))) if p.server_reference.as_deref() == Some(long.as_str())
        ));
    }

    #[tokio::test]
    async fn frames_are_read_whole_whatever_the_reads_and_the_buffer_starts_small() {
        let (h, one) = publish_frame("vehicles/X/telemetry", 1, 1, None, &[b'x'; 3000]);
        let (_, two) = publish_frame("ecars/data", 0, 0, None, b"{}");
        let mut bytes = one.to_vec();
        bytes.extend_from_slice(&two);
        let (client, mut server) = tokio::io::duplex(64);
        let writer = tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            for chunk in bytes.chunks(7) {
                server.write_all(chunk).await.unwrap();
            }
        });
        let mut reader = FrameReader::new(client);
        let (header, frame) = reader.next().await.unwrap().unwrap();
        assert_eq!((header.frame_length(), frame), (h.frame_length(), one));
        let (_, frame) = reader.next().await.unwrap().unwrap();
        assert_eq!(frame, two);
        writer.await.unwrap();
        assert!(reader.next().await.unwrap().is_none());
    }
}
