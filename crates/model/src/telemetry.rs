//! The telemetry contract: eCars' sensor reading, the MQTT topics it arrives on, and the precise
//! reasons a payload is refused.
//!
//! The field names are eCars' own (`vin`, `name`, `profile`, `range`, `mpge`, `battery`,
//! `malfunction`, `speed`, `latitude`, `longitude`, `date`), and so is its leniency: numbers may
//! come as numeric strings (the eCars simulator sends latitude and longitude as strings), `date`
//! is RFC 3339 as JavaScript's `toISOString()` writes it.

use std::fmt;

use base64::Engine as _;
use chrono::{DateTime, SecondsFormat, SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

mod fields;
use fields::{Field, ReadingFields};
use uuid::Uuid;

/// Largest telemetry payload accepted, in bytes; a larger one is rejected as
/// [`RejectReason::PayloadTooLarge`].
pub const MAX_PAYLOAD_BYTES: usize = 64 * 1024;

/// eCars' legacy topic: the VIN is read from the payload.
pub const LEGACY_TOPIC: &str = "ecars/data";

/// A vehicle identification number: 17 characters of `A-Z` and `0-9`, upper-cased on parse.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Vin(String);

/// Why a string is not a [`Vin`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("VIN {value:?} is not 17 characters of A-Z and 0-9")]
pub struct VinError {
    /// The offending value, cut to 40 characters so a hostile input cannot flood logs.
    pub value: String,
}

impl Vin {
    /// Number of characters in a VIN.
    pub const LEN: usize = 17;

    /// Parses a VIN, upper-casing it first.
    pub fn parse(value: &str) -> Result<Vin, VinError> {
        let upper = value.to_ascii_uppercase();
        if upper.len() == Self::LEN
            && upper
                .bytes()
                .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
        {
            Ok(Vin(upper))
        } else {
            Err(VinError {
                value: value.chars().take(40).collect(),
            })
        }
    }

    /// The VIN as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl schemars::JsonSchema for Vin {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "Vin".into()
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": "^[A-Z0-9]{17}$",
            "description": "Vehicle identification number: 17 characters of A-Z and 0-9."
        })
    }
}

impl fmt::Display for Vin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl TryFrom<String> for Vin {
    type Error = VinError;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Vin::parse(&value)
    }
}

impl From<Vin> for String {
    fn from(vin: Vin) -> String {
        vin.0
    }
}

impl std::str::FromStr for Vin {
    type Err = VinError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Vin::parse(s)
    }
}

/// One accepted sensor reading of one car, as it travels on the bus and lands in `sensor_data`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct TelemetryReading {
    /// Unique id of the reading, the idempotence key, a UUIDv7. When the car dated the reading,
    /// its time is that date and its other bits hash the car's payload (see
    /// [`content_event_id`]), so the same reading sent again after a reconnect has the same id;
    /// an undated reading gets a fresh id at ingest.
    pub event_id: Uuid,
    /// When ingest accepted the reading.
    pub received_at: DateTime<Utc>,
    /// The car.
    pub vin: Vin,
    /// The car's display name.
    pub name: Option<String>,
    /// The eCars driving profile (`short`, `medium`, `long`).
    pub profile: Option<String>,
    /// Remaining range, miles.
    pub range: Option<f64>,
    /// Efficiency, miles per gallon equivalent.
    pub mpge: Option<f64>,
    /// State of charge, percent, 0..=100.
    #[schemars(range(min = 0, max = 100))]
    pub battery: Option<f64>,
    /// Whether the car reports a malfunction.
    pub malfunction: Option<bool>,
    /// Speed, non-negative.
    #[schemars(range(min = 0))]
    pub speed: Option<f64>,
    /// Latitude in degrees, -90..=90.
    #[schemars(range(min = -90, max = 90))]
    pub latitude: Option<f64>,
    /// Longitude in degrees, -180..=180.
    #[schemars(range(min = -180, max = 180))]
    pub longitude: Option<f64>,
    /// When the car took the reading (event time); `received_at` when the car sent none.
    pub date: DateTime<Utc>,
}

/// The event id of a reading: UUIDv7 layout (so ids sort by event time), the millisecond
/// timestamp of `date`, and the remaining 74 bits from SHA-256 of the VIN and the exact payload
/// bytes. A retransmission of one reading (MQTT `DUP`, or a resend after a reconnect) gets the
/// same id, which is what makes at-least-once delivery from the car harmless downstream.
pub fn content_event_id(vin: &Vin, date: DateTime<Utc>, payload: &[u8]) -> Uuid {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(vin.as_str().as_bytes())
        .chain_update([0u8])
        .chain_update(payload)
        .finalize();
    let mut random = [0u8; 10];
    random.copy_from_slice(&digest[..10]);
    let millis = u64::try_from(date.timestamp_millis()).unwrap_or(0);
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
}

/// The telemetry topics ingest admits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TelemetryTopic {
    /// `vehicles/{VIN}/telemetry`; the VIN as written in the topic, checked on parse.
    Vehicle(String),
    /// eCars' `ecars/data`, VIN in the payload.
    Legacy,
}

impl TelemetryTopic {
    /// Classifies an MQTT topic; `None` for topics that are not telemetry (those pass through the
    /// broker untouched).
    pub fn classify(topic: &str) -> Option<TelemetryTopic> {
        if topic == LEGACY_TOPIC {
            return Some(TelemetryTopic::Legacy);
        }
        let rest = topic.strip_prefix("vehicles/")?;
        let vin = rest.strip_suffix("/telemetry")?;
        (!vin.contains('/')).then(|| TelemetryTopic::Vehicle(vin.to_owned()))
    }

    /// The topic on which a car publishes its telemetry.
    pub fn for_vin(vin: &Vin) -> String {
        format!("vehicles/{vin}/telemetry")
    }

    /// Whether an MQTT subscription filter (wildcards `+` and `#`, a `$share/{group}/` prefix
    /// allowed) can match any telemetry topic: `ecars/data` or `vehicles/{vin}/telemetry`.
    pub fn filter_may_match(filter: &str) -> bool {
        let filter = match filter.strip_prefix("$share/") {
            Some(shared) => shared.split_once('/').map_or("", |(_, rest)| rest),
            None => filter,
        };
        // `None` stands for the VIN level, which can be anything.
        let patterns: [&[Option<&str>]; 2] = [
            &[Some("ecars"), Some("data")],
            &[Some("vehicles"), None, Some("telemetry")],
        ];
        patterns.iter().any(|pattern| {
            let mut levels = filter.split('/');
            for expected in pattern.iter() {
                match (levels.next(), expected) {
                    (Some("#"), _) => return true,
                    (Some("+"), _) | (Some(_), None) => {}
                    (Some(level), Some(expected)) if level == *expected => {}
                    _ => return false,
                }
            }
            match levels.next() {
                None => true,
                // `vehicles/x/telemetry/#` also matches `vehicles/x/telemetry` itself.
                Some(rest) => rest == "#" && levels.next().is_none(),
            }
        })
    }
}

/// Why a telemetry payload was refused. The [`RejectReason::code`] is stable: it labels metrics
/// and starts the `reason` column of `dead_letters`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    /// Larger than [`MAX_PAYLOAD_BYTES`].
    PayloadTooLarge,
    /// Not valid JSON (or not UTF-8).
    NotJson,
    /// JSON, but not an object.
    NotObject,
    /// No VIN in the payload of a topic that carries none.
    MissingVin,
    /// A VIN that is not 17 characters of A-Z and 0-9 (payload or topic).
    MalformedVin,
    /// The payload's VIN differs from the topic's.
    VinMismatch,
    /// An authenticated device published for a VIN other than its own.
    UnauthorizedVin,
    /// A field of the wrong type (a number that is not a number, a name that is not text...).
    InvalidField,
    /// NaN or an infinity.
    NonFiniteNumber,
    /// `battery` outside 0..=100.
    BatteryOutOfRange,
    /// `latitude` outside -90..=90.
    LatitudeOutOfRange,
    /// `longitude` outside -180..=180.
    LongitudeOutOfRange,
    /// `speed` below zero.
    NegativeSpeed,
    /// `date` that is not an RFC 3339 time.
    InvalidDate,
    /// `date` further in the future than the clock skew allowed (`ECARS_MAX_CLOCK_SKEW`): one
    /// such reading would otherwise stand as the car's latest and blind its detection, which
    /// only moves forward in event time.
    DateInFuture,
}

impl RejectReason {
    /// Every reason, for metric initialisation and documentation.
    pub const ALL: [RejectReason; 15] = [
        RejectReason::PayloadTooLarge,
        RejectReason::NotJson,
        RejectReason::NotObject,
        RejectReason::MissingVin,
        RejectReason::MalformedVin,
        RejectReason::VinMismatch,
        RejectReason::UnauthorizedVin,
        RejectReason::InvalidField,
        RejectReason::NonFiniteNumber,
        RejectReason::BatteryOutOfRange,
        RejectReason::LatitudeOutOfRange,
        RejectReason::LongitudeOutOfRange,
        RejectReason::NegativeSpeed,
        RejectReason::InvalidDate,
        RejectReason::DateInFuture,
    ];

    /// The stable snake_case code.
    pub fn code(self) -> &'static str {
        match self {
            RejectReason::PayloadTooLarge => "payload_too_large",
            RejectReason::NotJson => "not_json",
            RejectReason::NotObject => "not_object",
            RejectReason::MissingVin => "missing_vin",
            RejectReason::MalformedVin => "malformed_vin",
            RejectReason::VinMismatch => "vin_mismatch",
            RejectReason::UnauthorizedVin => "unauthorized_vin",
            RejectReason::InvalidField => "invalid_field",
            RejectReason::NonFiniteNumber => "non_finite_number",
            RejectReason::BatteryOutOfRange => "battery_out_of_range",
            RejectReason::LatitudeOutOfRange => "latitude_out_of_range",
            RejectReason::LongitudeOutOfRange => "longitude_out_of_range",
            RejectReason::NegativeSpeed => "negative_speed",
            RejectReason::InvalidDate => "invalid_date",
            RejectReason::DateInFuture => "date_in_future",
        }
    }
}

impl fmt::Display for RejectReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

/// A refused payload: the reason and a human-readable detail naming the field and value.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {detail}")]
pub struct Rejection {
    /// The class of the refusal.
    pub reason: RejectReason,
    /// What exactly was wrong, for the dead-letter row and the log.
    pub detail: String,
}

impl Rejection {
    fn new(reason: RejectReason, detail: impl Into<String>) -> Rejection {
        Rejection {
            reason,
            detail: detail.into(),
        }
    }
}

/// Refuses a reading dated more than `max_skew` after it was received (a car's clock can run
/// a little ahead; a reading from next year is a broken clock, not telemetry).
pub fn check_date_not_in_future(
    reading: &TelemetryReading,
    max_skew: chrono::TimeDelta,
) -> Result<(), Rejection> {
    let latest = reading.received_at + max_skew;
    if reading.date > latest {
        return Err(Rejection::new(
            RejectReason::DateInFuture,
            format!(
                "date {} is more than {} s after it was received ({})",
                reading
                    .date
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
                max_skew.num_seconds(),
                reading
                    .received_at
                    .to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            ),
        ));
    }
    Ok(())
}

/// Parses an MQTT payload received on a telemetry topic into a [`TelemetryReading`].
///
/// `received_at` is given by the caller (ingest), which keeps this function pure. A payload with
/// its own `date` gets the [`content_event_id`] of that date and these bytes, so a car sending the
/// same reading twice (a resend after a reconnect) produces one event id; a payload without a
/// date cannot be told from a new reading with the same values, and gets `event_id_if_undated`.
/// Times are cut to microseconds, the precision both databases store, so a reading reads back
/// exactly as it travelled.
pub fn parse_reading(
    topic: &TelemetryTopic,
    payload: &[u8],
    event_id_if_undated: Uuid,
    received_at: DateTime<Utc>,
) -> Result<TelemetryReading, Rejection> {
    let received_at = received_at.trunc_subsecs(6);
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err(Rejection::new(
            RejectReason::PayloadTooLarge,
            format!(
                "payload of {} bytes exceeds {MAX_PAYLOAD_BYTES}",
                payload.len()
            ),
        ));
    }
    let fields = ReadingFields::read(payload).map_err(|e| shape_rejection(payload, e))?;

    let vin = reading_vin(topic, fields.vin.as_ref())?;
    let battery = number_field("battery", fields.battery.as_ref())?;
    check_range(
        "battery",
        battery,
        0.0,
        100.0,
        RejectReason::BatteryOutOfRange,
    )?;
    let latitude = number_field("latitude", fields.latitude.as_ref())?;
    check_range(
        "latitude",
        latitude,
        -90.0,
        90.0,
        RejectReason::LatitudeOutOfRange,
    )?;
    let longitude = number_field("longitude", fields.longitude.as_ref())?;
    check_range(
        "longitude",
        longitude,
        -180.0,
        180.0,
        RejectReason::LongitudeOutOfRange,
    )?;
    let speed = number_field("speed", fields.speed.as_ref())?;
    if let Some(speed) = speed.filter(|s| *s < 0.0) {
        return Err(Rejection::new(
            RejectReason::NegativeSpeed,
            format!("speed {speed} is negative"),
        ));
    }
    let dated = fields.date.is_some();
    let date = match &fields.date {
        None => received_at,
        Some(Field::Text(text)) => DateTime::parse_from_rfc3339(text.trim())
            .map_err(|e| {
                Rejection::new(
                    RejectReason::InvalidDate,
                    format!("date {:?} is not an RFC 3339 time: {e}", clip(text)),
                )
            })?
            .with_timezone(&Utc)
            .trunc_subsecs(6),
        Some(other) => {
            return Err(Rejection::new(
                RejectReason::InvalidDate,
                format!("date is a JSON {}, not an RFC 3339 string", other.kind()),
            ))
        }
    };

    let event_id = if dated {
        content_event_id(&vin, date, payload)
    } else {
        event_id_if_undated
    };
    Ok(TelemetryReading {
        event_id,
        received_at,
        vin,
        name: text_field("name", fields.name)?,
        profile: text_field("profile", fields.profile)?,
        range: number_field("range", fields.range.as_ref())?,
        mpge: number_field("mpge", fields.mpge.as_ref())?,
        battery,
        malfunction: bool_field("malfunction", fields.malfunction.as_ref())?,
        speed,
        latitude,
        longitude,
        date,
    })
}

/// Why a payload that [`ReadingFields`] could not read is refused: not JSON, or JSON but not an
/// object (read again as a `Value` to say which, on this rare path only).
fn shape_rejection(payload: &[u8], error: serde_json::Error) -> Rejection {
    match serde_json::from_slice::<Value>(payload) {
        Err(e) => Rejection::new(RejectReason::NotJson, format!("payload is not JSON: {e}")),
        Ok(value) if !value.is_object() => Rejection::new(
            RejectReason::NotObject,
            format!("payload is a JSON {}, not an object", json_kind(&value)),
        ),
        // Not expected: the fields are read from any object a `Value` reads.
        Ok(_) => Rejection::new(
            RejectReason::NotJson,
            format!("payload is not JSON: {error}"),
        ),
    }
}

fn reading_vin(topic: &TelemetryTopic, vin: Option<&Field<'_>>) -> Result<Vin, Rejection> {
    let from_payload = match vin {
        None => None,
        Some(Field::Text(text)) => Some(
            Vin::parse(text)
                .map_err(|e| Rejection::new(RejectReason::MalformedVin, format!("payload {e}")))?,
        ),
        Some(other) => {
            return Err(Rejection::new(
                RejectReason::MalformedVin,
                format!("vin is a JSON {}, not a string", other.kind()),
            ))
        }
    };
    match topic {
        TelemetryTopic::Legacy => from_payload.ok_or_else(|| {
            Rejection::new(
                RejectReason::MissingVin,
                format!("payload on {LEGACY_TOPIC} has no vin"),
            )
        }),
        TelemetryTopic::Vehicle(raw) => {
            let in_topic = Vin::parse(raw)
                .map_err(|e| Rejection::new(RejectReason::MalformedVin, format!("topic {e}")))?;
            match from_payload {
                Some(vin) if vin != in_topic => Err(Rejection::new(
                    RejectReason::VinMismatch,
                    format!("payload vin {vin} differs from topic vin {in_topic}"),
                )),
                _ => Ok(in_topic),
            }
        }
    }
}

fn number_field(field: &str, value: Option<&Field<'_>>) -> Result<Option<f64>, Rejection> {
    let number = match value {
        None => return Ok(None),
        Some(Field::Number(n)) => n.as_f64().ok_or_else(|| {
            Rejection::new(
                RejectReason::InvalidField,
                format!("{field} {n} is not representable as a number"),
            )
        })?,
        Some(Field::Text(text)) => text.trim().parse::<f64>().map_err(|_| {
            Rejection::new(
                RejectReason::InvalidField,
                format!("{field} {:?} is not a number", clip(text)),
            )
        })?,
        Some(other) => {
            return Err(Rejection::new(
                RejectReason::InvalidField,
                format!("{field} is a JSON {}, not a number", other.kind()),
            ))
        }
    };
    if !number.is_finite() {
        return Err(Rejection::new(
            RejectReason::NonFiniteNumber,
            format!("{field} is {number}, not a finite number"),
        ));
    }
    Ok(Some(number))
}

fn check_range(
    field: &str,
    value: Option<f64>,
    min: f64,
    max: f64,
    reason: RejectReason,
) -> Result<(), Rejection> {
    match value {
        Some(v) if !(min..=max).contains(&v) => Err(Rejection::new(
            reason,
            format!("{field} {v} is outside {min}..={max}"),
        )),
        _ => Ok(()),
    }
}

fn text_field(field: &str, value: Option<Field<'_>>) -> Result<Option<String>, Rejection> {
    match value {
        None => Ok(None),
        Some(Field::Text(text)) => Ok(Some(text.into_owned())),
        Some(other) => Err(Rejection::new(
            RejectReason::InvalidField,
            format!("{field} is a JSON {}, not a string", other.kind()),
        )),
    }
}

fn bool_field(field: &str, value: Option<&Field<'_>>) -> Result<Option<bool>, Rejection> {
    match value {
        None => Ok(None),
        Some(Field::Bool(b)) => Ok(Some(*b)),
        Some(Field::Text(text)) => match text.trim().to_ascii_lowercase().as_str() {
            "true" | "1" => Ok(Some(true)),
            "false" | "0" => Ok(Some(false)),
            _ => Err(Rejection::new(
                RejectReason::InvalidField,
                format!("{field} {:?} is not a boolean", clip(text)),
            )),
        },
        Some(Field::Number(n)) if n.as_u64() == Some(0) => Ok(Some(false)),
        Some(Field::Number(n)) if n.as_u64() == Some(1) => Ok(Some(true)),
        Some(other) => Err(Rejection::new(
            RejectReason::InvalidField,
            format!("{field} is {}, not a boolean", clip(&other.to_string())),
        )),
    }
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Cuts user-provided text for error messages so a hostile payload cannot flood logs.
fn clip(text: &str) -> String {
    const MAX: usize = 40;
    if text.chars().count() <= MAX {
        text.to_owned()
    } else {
        let mut cut: String = text.chars().take(MAX).collect();
        cut.push('…');
        cut
    }
}

/// A message ingest refused, kept with its original bytes so nothing is lost.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DeadLetter {
    /// Unique id (UUIDv7).
    pub id: Uuid,
    /// When ingest received the message.
    pub received_at: DateTime<Utc>,
    /// The MQTT topic it was published on.
    pub topic: String,
    /// The MQTT client id of the publisher.
    pub client_id: String,
    /// Why it was refused.
    pub reason: RejectReason,
    /// What exactly was wrong.
    pub detail: String,
    /// The payload as received (at most [`MAX_PAYLOAD_BYTES`]; see `truncated`).
    #[serde(with = "base64_bytes")]
    #[schemars(with = "String", extend("contentEncoding" = "base64"))]
    pub payload: Vec<u8>,
    /// Whether `payload` was cut to [`MAX_PAYLOAD_BYTES`] (only for oversized payloads).
    #[serde(default)]
    pub truncated: bool,
}

impl DeadLetter {
    /// Builds a dead letter, keeping at most [`MAX_PAYLOAD_BYTES`] of the payload.
    pub fn new(
        topic: &str,
        client_id: &str,
        rejection: Rejection,
        payload: &[u8],
        received_at: DateTime<Utc>,
    ) -> DeadLetter {
        let truncated = payload.len() > MAX_PAYLOAD_BYTES;
        DeadLetter {
            id: Uuid::now_v7(),
            received_at,
            topic: topic.to_owned(),
            client_id: client_id.to_owned(),
            reason: rejection.reason,
            detail: rejection.detail,
            payload: payload[..payload.len().min(MAX_PAYLOAD_BYTES)].to_vec(),
            truncated,
        }
    }

    /// The text stored in `dead_letters.reason`: the stable code, then the detail.
    pub fn reason_text(&self) -> String {
        format!("{}: {}", self.reason.code(), self.detail)
    }
}

impl crate::Record for TelemetryReading {
    const STREAM: &'static str = "telemetry";
    const TOPIC: &'static str = "telemetry";
    const EVENT_TYPE: &'static str = "com.ecars.telemetry.v1";
    const SOURCE: &'static str = "urn:ecars:ingest";
    const KEY: &'static str = "VIN (each car's readings in order in one partition)";

    fn key(&self) -> &str {
        self.vin.as_str()
    }

    fn id(&self) -> Uuid {
        self.event_id
    }

    fn time(&self) -> DateTime<Utc> {
        self.received_at
    }
}

impl crate::Record for DeadLetter {
    const STREAM: &'static str = "dead_letters";
    const TOPIC: &'static str = "telemetry.dlq";
    const EVENT_TYPE: &'static str = "com.ecars.telemetry.deadletter.v1";
    const SOURCE: &'static str = "urn:ecars:ingest";
    const KEY: &'static str = "MQTT topic the message arrived on";

    /// The topic, so one car's rejects stay together.
    fn key(&self) -> &str {
        &self.topic
    }

    fn id(&self) -> Uuid {
        self.id
    }

    fn time(&self) -> DateTime<Utc> {
        self.received_at
    }
}

/// Formats a time the way `sensor_data` stores it in SQLite: fixed microsecond precision and a
/// `Z`, so that text order is time order.
///
/// Written digit by digit: chrono's general formatter was a seventh of the cost of binding a
/// reading's row, which carries two times. Years outside 0..=9999 and leap seconds, which
/// chrono writes its own way, go through chrono.
pub fn format_timestamp(time: &DateTime<Utc>) -> String {
    use chrono::{Datelike, Timelike};
    let naive = time.naive_utc();
    let year = naive.year();
    let nanos = naive.nanosecond();
    if !(0..=9999).contains(&year) || nanos >= 1_000_000_000 {
        return time.to_rfc3339_opts(SecondsFormat::Micros, true);
    }
    // "YYYY-MM-DDTHH:MM:SS.uuuuuuZ"
    let mut text = *b"0000-00-00T00:00:00.000000Z";
    let mut put = |at: usize, width: usize, mut value: u32| {
        for i in (at..at + width).rev() {
            text[i] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, 4, year as u32);
    put(5, 2, naive.month());
    put(8, 2, naive.day());
    put(11, 2, naive.hour());
    put(14, 2, naive.minute());
    put(17, 2, naive.second());
    put(20, 6, nanos / 1_000);
    match std::str::from_utf8(&text) {
        Ok(text) => text.to_owned(),
        // Not reached: the text is ASCII digits and separators.
        Err(_) => time.to_rfc3339_opts(SecondsFormat::Micros, true),
    }
}

mod base64_bytes {
    use super::*;
    use serde::{Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&base64::engine::general_purpose::STANDARD.encode(bytes))
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<u8>, D::Error> {
        let text = String::deserialize(deserializer)?;
        base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn subscription_filters_that_can_see_telemetry() {
        for filter in [
            "#",
            "ecars/data",
            "ecars/#",
            "+/data",
            "+/+",
            "vehicles/+/telemetry",
            "vehicles/#",
            "vehicles/WP0ZZZ99ZTS392124/telemetry",
            "+/+/+",
            "vehicles/+/telemetry/#",
            "$share/relay/vehicles/+/telemetry",
        ] {
            assert!(TelemetryTopic::filter_may_match(filter), "{filter}");
        }
        for filter in [
            "fleet/notices",
            "ecars",
            "ecars/data/more",
            "+",
            "vehicles/+",
            "vehicles/+/status",
            "+/+/+/+",
            "$share/relay/fleet/#",
            "$share/only-a-group",
        ] {
            assert!(!TelemetryTopic::filter_may_match(filter), "{filter}");
        }
    }

    use super::*;

    #[test]
    fn a_reading_dated_past_the_allowed_skew_is_refused() {
        let topic = TelemetryTopic::Legacy;
        let received = DateTime::parse_from_rfc3339("2026-12-01T12:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        let skew = chrono::TimeDelta::minutes(5);
        let dated = |date: &str| {
            let payload = format!(r#"{{"vin":"1HGCM82633A004352","date":"{date}"}}"#);
            parse_reading(&topic, payload.as_bytes(), Uuid::now_v7(), received).unwrap()
        };
        assert!(check_date_not_in_future(&dated("2026-12-01T12:05:00Z"), skew).is_ok());
        assert!(check_date_not_in_future(&dated("2020-01-01T00:00:00Z"), skew).is_ok());
        let refused = check_date_not_in_future(&dated("2026-12-01T12:05:00.000001Z"), skew);
        assert_eq!(refused.unwrap_err().reason, RejectReason::DateInFuture);
        let refused = check_date_not_in_future(&dated("9999-12-31T00:00:00Z"), skew).unwrap_err();
        assert_eq!(refused.reason.code(), "date_in_future");
        assert!(refused.detail.contains("9999-12-31"), "{}", refused.detail);
    }

    #[test]
    fn a_resent_reading_keeps_its_event_id_and_another_reading_gets_another() {
        let vin = Vin::parse("5YJ3E1EA000000001").unwrap();
        let date: DateTime<Utc> = "2026-11-22T10:00:00.123Z".parse().unwrap();
        let payload = br#"{"battery":50}"#;
        let id = content_event_id(&vin, date, payload);
        assert_eq!(id, content_event_id(&vin, date, payload));
        assert_eq!(id.get_version_num(), 7);
        let (secs, nanos) = id.get_timestamp().unwrap().to_unix();
        assert_eq!((secs, nanos / 1_000_000), (date.timestamp() as u64, 123));
        assert_ne!(id, content_event_id(&vin, date, br#"{"battery":49}"#));
        let other = Vin::parse("5YJ3E1EA000000002").unwrap();
        assert_ne!(id, content_event_id(&other, date, payload));

        // parse_reading: a dated payload gets its content id, twice the same; an undated one
        // the id it is given.
        let topic = TelemetryTopic::Vehicle(vin.to_string());
        let dated = br#"{"battery":50,"date":"2026-11-22T10:00:00.123Z"}"#;
        let first = parse_reading(&topic, dated, Uuid::now_v7(), Utc::now()).unwrap();
        let again = parse_reading(&topic, dated, Uuid::now_v7(), Utc::now()).unwrap();
        assert_eq!(first.event_id, again.event_id);
        let given = Uuid::now_v7();
        let undated = parse_reading(&topic, payload, given, Utc::now()).unwrap();
        assert_eq!(undated.event_id, given);
    }

    const VIN: &str = "1HGCM82633A004352";

    fn parse(topic: &str, payload: &str) -> Result<TelemetryReading, Rejection> {
        let topic = TelemetryTopic::classify(topic).expect("telemetry topic");
        parse_reading(&topic, payload.as_bytes(), Uuid::now_v7(), Utc::now())
    }

    #[test]
    fn accepts_an_ecars_simulator_payload_with_string_coordinates() {
        let payload = format!(
            r#"{{"vin":"{}","name":"Car 1","profile":"short","range":"210.5","mpge":"112","battery":80.5,
               "malfunction":false,"speed":"45","latitude":"37.7749","longitude":"-122.4194",
               "date":"2024-05-01T10:00:00.123Z"}}"#,
            VIN.to_lowercase()
        );
        let reading = parse(LEGACY_TOPIC, &payload).expect("accepted");
        assert_eq!(reading.vin.as_str(), VIN);
        assert_eq!(reading.latitude, Some(37.7749));
        assert_eq!(reading.longitude, Some(-122.4194));
        assert_eq!(reading.range, Some(210.5));
        assert_eq!(reading.malfunction, Some(false));
        assert_eq!(
            reading.date.to_rfc3339_opts(SecondsFormat::Millis, true),
            "2024-05-01T10:00:00.123Z"
        );
    }

    #[test]
    fn vehicle_topic_supplies_the_vin_and_missing_date_defaults_to_received_at() {
        let received_at = Utc::now().trunc_subsecs(6);
        let topic = TelemetryTopic::classify(&format!("vehicles/{VIN}/telemetry")).unwrap();
        let reading =
            parse_reading(&topic, br#"{"battery":50}"#, Uuid::now_v7(), received_at).unwrap();
        assert_eq!(reading.vin.as_str(), VIN);
        assert_eq!(reading.date, received_at);
        assert_eq!(reading.battery, Some(50.0));
    }

    #[test]
    fn classifies_topics() {
        assert_eq!(
            TelemetryTopic::classify("ecars/data"),
            Some(TelemetryTopic::Legacy)
        );
        assert_eq!(
            TelemetryTopic::classify("vehicles/abc/telemetry"),
            Some(TelemetryTopic::Vehicle("abc".into()))
        );
        assert_eq!(TelemetryTopic::classify("vehicles/a/b/telemetry"), None);
        assert_eq!(TelemetryTopic::classify("vehicles/abc/status"), None);
        assert_eq!(TelemetryTopic::classify("other"), None);
    }

    #[test]
    fn every_rejection_reason_has_a_case() {
        let vt = format!("vehicles/{VIN}/telemetry");
        let big = format!(
            r#"{{"vin":"{VIN}","name":"{}"}}"#,
            "x".repeat(MAX_PAYLOAD_BYTES)
        );
        let cases: Vec<(&str, String, RejectReason, &str)> = vec![
            (
                LEGACY_TOPIC,
                big,
                RejectReason::PayloadTooLarge,
                "exceeds 65536",
            ),
            (
                LEGACY_TOPIC,
                "not json".into(),
                RejectReason::NotJson,
                "not JSON",
            ),
            (
                LEGACY_TOPIC,
                "\u{0}\u{1}".into(),
                RejectReason::NotJson,
                "not JSON",
            ),
            (
                LEGACY_TOPIC,
                "[1,2]".into(),
                RejectReason::NotObject,
                "array",
            ),
            (LEGACY_TOPIC, "42".into(), RejectReason::NotObject, "number"),
            (
                LEGACY_TOPIC,
                r#"{"battery":5}"#.into(),
                RejectReason::MissingVin,
                "no vin",
            ),
            (
                LEGACY_TOPIC,
                r#"{"vin":"SHORT"}"#.into(),
                RejectReason::MalformedVin,
                "SHORT",
            ),
            (
                LEGACY_TOPIC,
                r#"{"vin":"1HGCM82633A00435$"}"#.into(),
                RejectReason::MalformedVin,
                "17 characters",
            ),
            (
                LEGACY_TOPIC,
                r#"{"vin":12345678901234567}"#.into(),
                RejectReason::MalformedVin,
                "not a string",
            ),
            (
                "vehicles/NOTAVIN/telemetry",
                "{}".into(),
                RejectReason::MalformedVin,
                "topic VIN",
            ),
            (
                &vt,
                r#"{"vin":"2HGCM82633A004352"}"#.into(),
                RejectReason::VinMismatch,
                "differs",
            ),
            (
                &vt,
                r#"{"battery":100.5}"#.into(),
                RejectReason::BatteryOutOfRange,
                "battery 100.5",
            ),
            (
                &vt,
                r#"{"battery":-1}"#.into(),
                RejectReason::BatteryOutOfRange,
                "battery -1",
            ),
            (
                &vt,
                r#"{"latitude":"90.1"}"#.into(),
                RejectReason::LatitudeOutOfRange,
                "latitude 90.1",
            ),
            (
                &vt,
                r#"{"longitude":-180.5}"#.into(),
                RejectReason::LongitudeOutOfRange,
                "longitude -180.5",
            ),
            (
                &vt,
                r#"{"speed":-3}"#.into(),
                RejectReason::NegativeSpeed,
                "speed -3",
            ),
            (
                &vt,
                r#"{"speed":"NaN"}"#.into(),
                RejectReason::NonFiniteNumber,
                "speed is NaN",
            ),
            (
                &vt,
                r#"{"range":"Infinity"}"#.into(),
                RejectReason::NonFiniteNumber,
                "range is inf",
            ),
            (
                &vt,
                r#"{"mpge":"-inf"}"#.into(),
                RejectReason::NonFiniteNumber,
                "mpge is -inf",
            ),
            (
                &vt,
                r#"{"date":"yesterday"}"#.into(),
                RejectReason::InvalidDate,
                "yesterday",
            ),
            (
                &vt,
                r#"{"date":1714557600000}"#.into(),
                RejectReason::InvalidDate,
                "number",
            ),
            (
                &vt,
                r#"{"battery":"full"}"#.into(),
                RejectReason::InvalidField,
                "battery \"full\"",
            ),
            (
                &vt,
                r#"{"speed":[1]}"#.into(),
                RejectReason::InvalidField,
                "array",
            ),
            (
                &vt,
                r#"{"name":7}"#.into(),
                RejectReason::InvalidField,
                "name is a JSON number",
            ),
            (
                &vt,
                r#"{"malfunction":"maybe"}"#.into(),
                RejectReason::InvalidField,
                "malfunction",
            ),
        ];
        let mut seen = std::collections::HashSet::new();
        for (topic, payload, reason, needle) in cases {
            let rejection =
                parse(topic, &payload).expect_err(&format!("{payload:.60} should be rejected"));
            assert_eq!(rejection.reason, reason, "{payload:.60}: {rejection}");
            assert!(
                rejection.detail.contains(needle),
                "{:?} should mention {needle:?}",
                rejection.detail
            );
            seen.insert(reason);
        }
        // UnauthorizedVin is decided by ingest's device authentication, not by the payload;
        // DateInFuture by the time of receipt (its own test above).
        for reason in RejectReason::ALL.iter().filter(|r| {
            !matches!(
                r,
                RejectReason::UnauthorizedVin | RejectReason::DateInFuture
            )
        }) {
            assert!(seen.contains(reason), "no case for {reason}");
        }
    }

    #[test]
    fn boundaries_are_inclusive() {
        let vt = format!("vehicles/{VIN}/telemetry");
        let reading = parse(
            &vt,
            r#"{"battery":0,"latitude":-90,"longitude":180,"speed":0,"malfunction":"true"}"#,
        )
        .unwrap();
        assert_eq!(reading.battery, Some(0.0));
        assert_eq!(reading.malfunction, Some(true));
        assert!(parse(&vt, r#"{"battery":100,"latitude":90,"longitude":-180}"#).is_ok());
    }

    #[test]
    fn dead_letter_keeps_bytes_and_truncates_oversized() {
        let rejection = Rejection::new(RejectReason::PayloadTooLarge, "big");
        let payload = vec![b'x'; MAX_PAYLOAD_BYTES + 10];
        let letter = DeadLetter::new("ecars/data", "c1", rejection, &payload, Utc::now());
        assert!(letter.truncated);
        assert_eq!(letter.payload.len(), MAX_PAYLOAD_BYTES);
        assert_eq!(letter.reason_text(), "payload_too_large: big");
        let json = serde_json::to_string(&letter).unwrap();
        let back: DeadLetter = serde_json::from_str(&json).unwrap();
        assert_eq!(back, letter);
    }

    #[test]
    fn timestamps_sort_as_text() {
        let a = DateTime::parse_from_rfc3339("2024-05-01T10:00:00.9Z")
            .unwrap()
            .with_timezone(&Utc);
        let b = DateTime::parse_from_rfc3339("2024-05-01T10:00:01Z")
            .unwrap()
            .with_timezone(&Utc);
        assert!(format_timestamp(&a) < format_timestamp(&b));
        assert_eq!(format_timestamp(&b), "2024-05-01T10:00:01.000000Z");
    }

    proptest::proptest! {
        #[test]
        fn parser_never_panics_on_bytes(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
            let _ = parse_reading(&TelemetryTopic::Legacy, &bytes, Uuid::nil(), Utc::now());
        }

        #[test]
        fn timestamps_are_formatted_as_chrono_formats_them(
            seconds in -70_000_000_000i64..300_000_000_000i64,
            nanos in 0u32..2_000_000_000,
        ) {
            if let Some(time) = DateTime::<Utc>::from_timestamp(seconds, nanos) {
                proptest::prop_assert_eq!(
                    format_timestamp(&time),
                    time.to_rfc3339_opts(SecondsFormat::Micros, true)
                );
            }
        }

        #[test]
        fn parser_never_panics_on_json_like_input(
            vin in "[A-Za-z0-9$]{0,20}",
            battery in proptest::num::f64::ANY,
            lat in "[-+0-9.eEinfNa]{0,12}",
            date in "[-0-9T:.Z+]{0,30}",
            malfunction in proptest::option::of(proptest::bool::ANY),
        ) {
            let payload = serde_json::json!({
                "vin": vin, "battery": battery, "latitude": lat, "date": date, "malfunction": malfunction,
            });
            let bytes = serde_json::to_vec(&payload).unwrap();
            let topic = TelemetryTopic::Vehicle(vin.clone());
            let _ = parse_reading(&topic, &bytes, Uuid::nil(), Utc::now());
            let _ = parse_reading(&TelemetryTopic::Legacy, &bytes, Uuid::nil(), Utc::now());
        }
    }
}
