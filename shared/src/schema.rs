//! JSON Schemas of the values on our Kafka topics, generated from the Rust types, so another
//! team can validate or generate code without reading ours. The files in `docs/schemas/` are
//! these; a test fails when they drift (`ECARS_WRITE_SCHEMAS=1 cargo test -p ecars-shared`
//! rewrites them).

use schemars::JsonSchema;

use crate::anomaly::{AnomalyEvent, CaseEvent};
use crate::bus::kafka::{
    ANOMALY_EVENT_TYPE, CASE_EVENT_TYPE, DEAD_LETTER_EVENT_TYPE, TELEMETRY_EVENT_TYPE,
};
use crate::telemetry::{DeadLetter, TelemetryReading};

/// Where the schemas are published, relative to the repository root.
pub const SCHEMA_DIR: &str = "docs/schemas";

/// A topic value's schema and the file it is published as.
#[derive(Debug)]
pub struct TopicSchema {
    /// CloudEvents `type` of the records it describes.
    pub event_type: &'static str,
    /// File name under [`SCHEMA_DIR`].
    pub file: String,
    /// The JSON Schema (draft 2020-12).
    pub schema: serde_json::Value,
}

fn schema_of<T: JsonSchema>(event_type: &'static str) -> TopicSchema {
    let file = format!("{event_type}.json");
    let mut schema = schemars::schema_for!(T).to_value();
    if let Some(object) = schema.as_object_mut() {
        object.insert(
            "$id".into(),
            format!("urn:ecars:schema:{event_type}").into(),
        );
    }
    TopicSchema {
        event_type,
        file,
        schema,
    }
}

/// The schemas of every topic value: accepted readings, dead letters, anomaly and Case events.
pub fn topic_schemas() -> Vec<TopicSchema> {
    vec![
        schema_of::<TelemetryReading>(TELEMETRY_EVENT_TYPE),
        schema_of::<DeadLetter>(DEAD_LETTER_EVENT_TYPE),
        schema_of::<AnomalyEvent>(ANOMALY_EVENT_TYPE),
        schema_of::<CaseEvent>(CASE_EVENT_TYPE),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_schemas_match_the_types() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("..")
            .join(SCHEMA_DIR);
        let write = std::env::var_os("ECARS_WRITE_SCHEMAS").is_some();
        for topic in topic_schemas() {
            let text = serde_json::to_string_pretty(&topic.schema).unwrap() + "\n";
            let path = dir.join(&topic.file);
            if write {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &text).unwrap();
            }
            let published = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            assert_eq!(
                published,
                text,
                "{} is out of date: run ECARS_WRITE_SCHEMAS=1 cargo test -p ecars-shared",
                path.display()
            );
        }
    }

    /// The AsyncAPI document names our topics and points at the published schema files.
    #[test]
    fn the_asyncapi_document_matches_the_topics_and_schemas() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let asyncapi = std::fs::read_to_string(root.join("docs/asyncapi.yaml")).unwrap();
        let kafka = crate::bus::KafkaConfig::for_brokers("x");
        for stream in crate::bus::Stream::ALL {
            let address = format!("address: {}\n", kafka.topic(stream));
            assert!(asyncapi.contains(&address), "asyncapi.yaml lacks {address}");
        }
        for topic in topic_schemas() {
            let reference = format!("$ref: './schemas/{}'", topic.file);
            assert!(
                asyncapi.contains(&reference),
                "asyncapi.yaml lacks {reference}"
            );
            assert!(asyncapi.contains(&format!("name: {}\n", topic.event_type)));
            assert!(root.join(SCHEMA_DIR).join(&topic.file).exists());
        }
    }

    #[test]
    fn the_reading_schema_names_every_field_and_requires_the_keys() {
        let schema = &topic_schemas()[0].schema;
        let properties = schema["properties"].as_object().unwrap();
        for field in [
            "event_id",
            "received_at",
            "vin",
            "name",
            "profile",
            "range",
            "mpge",
            "battery",
            "malfunction",
            "speed",
            "latitude",
            "longitude",
            "date",
        ] {
            assert!(properties.contains_key(field), "{field}");
        }
        let required: Vec<&str> = schema["required"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        for field in ["event_id", "received_at", "vin", "date"] {
            assert!(required.contains(&field), "{field} is required");
        }
    }
}
