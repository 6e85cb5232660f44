//! The [`Record`] trait: what a type says about itself to travel on the bus as a stream of its
//! own, and the [catalog](published) of the streams other services can read.
//!
//! The bus needs nothing else: a new stream is a new type implementing [`Record`] and a consumer
//! that subscribes to it (`bus.subscribe::<NewType>(group)`). Listing it in [`published`] is
//! what documents it for other teams (its JSON Schema file, the AsyncAPI document and
//! `ecars topics` are checked against that list).

use std::fmt;

use chrono::{DateTime, Utc};
use schemars::JsonSchema;
use serde::de::DeserializeOwned;
use serde::Serialize;
use uuid::Uuid;

use crate::anomaly::{AnomalyEvent, CaseEvent};
use crate::connectivity::ConnectivityEvent;
use crate::telemetry::{DeadLetter, TelemetryReading};

/// A type that travels on the bus: a stream of its own, with CloudEvents attributes.
///
/// On Kafka each record is a message on topic `{prefix}{TOPIC}`, keyed by [`Record::key`], with
/// a JSON value and the CloudEvents attributes as headers (binary mode).
pub trait Record:
    Serialize + DeserializeOwned + JsonSchema + Clone + fmt::Debug + Send + Sync + 'static
{
    /// The stream's name: in metric labels and logs. Unique per record type.
    const STREAM: &'static str;
    /// The Kafka topic after the deployment's prefix (`telemetry` is `ecars.telemetry`).
    const TOPIC: &'static str;
    /// CloudEvents `type`, versioned (`com.ecars.telemetry.v1`).
    const EVENT_TYPE: &'static str;
    /// CloudEvents `source`: the service that publishes it.
    const SOURCE: &'static str;
    /// What the partitioning key is, in words, for the teams that consume the stream.
    const KEY: &'static str;

    /// The partitioning key: records with one key stay in order (the VIN, for per-car streams).
    fn key(&self) -> &str;
    /// The record's id (CloudEvents `id`): the same record always has the same id, which is what
    /// makes redelivery harmless.
    fn id(&self) -> Uuid;
    /// When the record came to be (CloudEvents `time`).
    fn time(&self) -> DateTime<Utc>;
    /// What the record is about (CloudEvents `subject`); the key unless a type says otherwise.
    fn subject(&self) -> &str {
        self.key()
    }
}

/// What a consuming team needs to know of one stream, from its [`Record`] implementation.
#[derive(Clone, Copy)]
pub struct RecordInfo {
    /// [`Record::STREAM`].
    pub stream: &'static str,
    /// [`Record::TOPIC`].
    pub topic: &'static str,
    /// [`Record::EVENT_TYPE`].
    pub event_type: &'static str,
    /// [`Record::SOURCE`].
    pub source: &'static str,
    /// [`Record::KEY`].
    pub key: &'static str,
    /// The JSON Schema of the record's value.
    pub schema: fn() -> serde_json::Value,
}

impl fmt::Debug for RecordInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RecordInfo")
            .field("stream", &self.stream)
            .field("topic", &self.topic)
            .field("event_type", &self.event_type)
            .finish_non_exhaustive()
    }
}

impl RecordInfo {
    /// The description of `T`'s stream.
    pub fn of<T: Record>() -> RecordInfo {
        RecordInfo {
            stream: T::STREAM,
            topic: T::TOPIC,
            event_type: T::EVENT_TYPE,
            source: T::SOURCE,
            key: T::KEY,
            schema: || schemars::schema_for!(T).to_value(),
        }
    }

    /// One line on the value: the type's name and its fields, from the schema.
    pub fn value_summary(&self) -> String {
        let schema = (self.schema)();
        let title = schema["title"].as_str().unwrap_or(self.stream).to_owned();
        let fields: Vec<&str> = schema["properties"]
            .as_object()
            .map(|p| p.keys().map(String::as_str).collect())
            .unwrap_or_default();
        format!("{title} JSON: {}", fields.join(", "))
    }
}

/// The streams the product publishes for other services, in the order they are documented.
pub fn published() -> Vec<RecordInfo> {
    vec![
        RecordInfo::of::<TelemetryReading>(),
        RecordInfo::of::<DeadLetter>(),
        RecordInfo::of::<AnomalyEvent>(),
        RecordInfo::of::<CaseEvent>(),
        RecordInfo::of::<ConnectivityEvent>(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_published_stream_has_its_own_name_topic_and_type() {
        let streams = published();
        for (i, a) in streams.iter().enumerate() {
            for b in &streams[i + 1..] {
                assert_ne!(a.stream, b.stream);
                assert_ne!(a.topic, b.topic);
                assert_ne!(a.event_type, b.event_type);
            }
        }
    }

    #[test]
    fn the_value_summary_names_the_type_and_its_fields() {
        let summary = RecordInfo::of::<TelemetryReading>().value_summary();
        assert!(summary.starts_with("TelemetryReading JSON: "), "{summary}");
        for field in ["event_id", "vin", "battery", "date"] {
            assert!(summary.contains(field), "{summary}");
        }
    }
}
