//! JSON Schemas of the values on our Kafka topics and of the live relay's WebSocket frames,
//! generated from the Rust types, so another team can validate or generate code without reading
//! ours. The files in `docs/schemas/` are these; a test fails when they drift
//! (`ECARS_WRITE_SCHEMAS=1 cargo test -p ecars-model` rewrites them).

use crate::record::{published, RecordInfo};

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

impl TopicSchema {
    /// The published schema of one stream's values.
    pub fn of(info: &RecordInfo) -> TopicSchema {
        TopicSchema::named(info.event_type, (info.schema)())
    }

    /// `schema` published for `event_type`: given its `$id` and its file name.
    fn named(event_type: &'static str, mut schema: serde_json::Value) -> TopicSchema {
        if let Some(object) = schema.as_object_mut() {
            object.insert(
                "$id".into(),
                format!("urn:ecars:schema:{event_type}").into(),
            );
        }
        TopicSchema {
            event_type,
            file: format!("{event_type}.json"),
            schema,
        }
    }
}

/// The schemas of every published stream's values (see [`published`]).
pub fn topic_schemas() -> Vec<TopicSchema> {
    published().iter().map(TopicSchema::of).collect()
}

/// The schemas of the live relay's frames other than readings (a reading's frame is the
/// telemetry topic's value), described with the relay's WebSocket in `docs/asyncapi-live.yaml`.
pub fn live_frame_schemas() -> Vec<TopicSchema> {
    vec![TopicSchema::named(
        "com.ecars.live.connectivity.v1",
        schemars::schema_for!(crate::connectivity::LiveConnectivityFrame).to_value(),
    )]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn repository_root() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
    }

    #[test]
    fn published_schemas_match_the_types() {
        let dir = repository_root().join(SCHEMA_DIR);
        let write = std::env::var_os("ECARS_WRITE_SCHEMAS").is_some();
        for topic in topic_schemas().into_iter().chain(live_frame_schemas()) {
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
                "{} is out of date: run ECARS_WRITE_SCHEMAS=1 cargo test -p ecars-model",
                path.display()
            );
        }
    }

    /// The AsyncAPI document names every published topic (with the default prefix) and points at
    /// the published schema files.
    #[test]
    fn the_asyncapi_document_matches_the_topics_and_schemas() {
        let root = repository_root();
        let asyncapi = std::fs::read_to_string(root.join("docs/asyncapi.yaml")).unwrap();
        for info in published() {
            let address = format!("address: ecars.{}\n", info.topic);
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

    /// The live relay's AsyncAPI document points at the schemas of both kinds of frame.
    #[test]
    fn the_live_asyncapi_document_points_at_the_frame_schemas() {
        let root = repository_root();
        let asyncapi = std::fs::read_to_string(root.join("docs/asyncapi-live.yaml")).unwrap();
        let reading = &topic_schemas()[0];
        for frame in std::iter::once(reading).chain(&live_frame_schemas()) {
            let reference = format!("$ref: './schemas/{}'", frame.file);
            assert!(
                asyncapi.contains(&reference),
                "asyncapi-live.yaml lacks {reference}"
            );
            assert!(root.join(SCHEMA_DIR).join(&frame.file).exists());
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
