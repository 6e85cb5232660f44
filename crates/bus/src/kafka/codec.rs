//! How a record looks on Kafka: the record's key, its JSON value, and its CloudEvents attributes
//! as headers (binary content mode), so another service can consume without our code.

use std::collections::HashMap;

use rdkafka::message::{Headers, Message};

use super::spool::SpooledRecord;
use crate::{BusError, Envelope};

/// The record as Kafka carries it: key, CloudEvents headers, JSON value.
pub(crate) fn encode(envelope: &Envelope) -> Result<SpooledRecord, BusError> {
    let stream = envelope.stream;
    let record = &envelope.record;
    let value = record.encode().map_err(|source| BusError::Encode {
        stream: stream.name,
        source,
    })?;
    let id = record.id().to_string();
    let time = record
        .time()
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let headers = [
        ("ce_specversion", "1.0"),
        ("ce_id", id.as_str()),
        ("ce_type", stream.event_type),
        ("ce_source", stream.source),
        ("ce_time", time.as_str()),
        ("ce_subject", record.subject()),
        ("content-type", "application/json"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.as_bytes().to_vec()))
    .collect();
    Ok(SpooledRecord {
        topic: stream.topic.to_owned(),
        key: record.key().as_bytes().to_vec(),
        headers,
        value,
    })
}

/// CloudEvents attributes of a consumed Kafka message, for tests and tools.
pub fn cloud_event_headers<M: Message>(message: &M) -> HashMap<String, String> {
    let mut out = HashMap::new();
    if let Some(headers) = message.headers() {
        for header in headers.iter() {
            if let Some(value) = header.value {
                out.insert(
                    header.key.to_owned(),
                    String::from_utf8_lossy(value).into_owned(),
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use chrono::{TimeZone, Utc};
    use ecars_model::{DeadLetter, RejectReason};

    use super::*;

    #[test]
    fn a_dead_letter_is_keyed_by_its_topic_with_its_cloud_event_attributes() {
        let letter = DeadLetter {
            id: uuid::Uuid::from_u128(7),
            received_at: Utc.with_ymd_and_hms(2026, 1, 2, 3, 4, 5).unwrap(),
            topic: "vehicles/1HGCM82633A004352/telemetry".into(),
            client_id: "car".into(),
            reason: RejectReason::NotJson,
            detail: "x".into(),
            payload: b"nope".to_vec(),
            truncated: false,
        };
        let encoded = encode(&Envelope::new(letter.clone())).unwrap();
        assert_eq!(encoded.topic, "telemetry.dlq");
        assert_eq!(encoded.key, letter.topic.as_bytes());
        let headers: HashMap<_, _> = encoded
            .headers
            .iter()
            .map(|(k, v)| (k.as_str(), String::from_utf8_lossy(v).into_owned()))
            .collect();
        assert_eq!(headers["ce_type"], "com.ecars.telemetry.deadletter.v1");
        assert_eq!(headers["ce_source"], "urn:ecars:ingest");
        assert_eq!(headers["ce_id"], letter.id.to_string());
        assert_eq!(headers["ce_time"], "2026-01-02T03:04:05.000000Z");
        assert_eq!(headers["ce_subject"], letter.topic);
        let back: DeadLetter = serde_json::from_slice(&encoded.value).unwrap();
        assert_eq!(back, letter);
    }
}
