//! The OpenAPI 3.1 document of the whole HTTP API, served at `/v1/openapi.json`. Generated from
//! the code: each route's method, path, parameters and answers from the `#[utoipa::path]`
//! attribute on its handler (the relay's live routes from those on its own, in `ecars-relay`),
//! and the schemas of the bodies from the Rust types that are serialised (schemars, the
//! generator of the topics' JSON Schemas, whose dialect, JSON Schema 2020-12, is OpenAPI 3.1's).
//! A test validates the document and checks live answers against its schemas.

use ecars_model::relay_token::MintedToken;
use ecars_model::TelemetryReading;
use schemars::generate::SchemaSettings;
use serde_json::{json, Map, Value};
use utoipa::OpenApi;

use crate::history::HistoryDocument;
use crate::status::ServiceStatus;
use crate::{CasesPage, DeadLetterView, ErrorBody, MintRequest, Retried, VehicleSummary};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "ecars-realtime",
        description = "Live vehicle telemetry: the fleet's latest state, each car's readings and \
            history, refused messages, the Salesforce Case outbox and live-view tokens. Every \
            `/v1` route takes a bearer credential (an API key, or for one car's routes a relay \
            token) except where `ecars up` serves anonymously on loopback. `/healthz`, `/readyz` \
            and `/metrics` are served on the internal listener (`--admin-addr`), not this one."
    ),
    paths(
        crate::vehicles,
        crate::vehicle_telemetry,
        crate::vehicle_history,
        crate::dead_letters,
        crate::list_cases,
        crate::retry_case,
        crate::mint_relay_token,
        crate::status::service_status,
        crate::openapi_document,
        crate::ready::healthz,
        crate::ready::readyz,
        crate::render_metrics,
    ),
    tags(
        (name = "fleet", description = "Cars, their readings and history, refused messages."),
        (name = "cases", description = "The Salesforce Case outbox."),
        (name = "live", description = "Live WebSockets and their tokens (served where the relay runs)."),
        (name = "status", description = "How the service is doing (the detail behind `/readyz`)."),
        (name = "internal", description = "Health, readiness and metrics, on the internal listener."),
        (name = "meta", description = "This document."),
    )
)]
struct Routes;

/// The document, as served: `live` adds the relay's routes where the process runs the relay.
pub fn document(live: Option<utoipa::openapi::OpenApi>) -> String {
    let mut api = Routes::openapi();
    if let Some(live) = live {
        api.merge(live);
    }
    let mut doc = serde_json::to_value(&api).unwrap_or_else(|_| json!({}));
    doc["components"] = json!({
        "schemas": schemas(),
        "securitySchemes": {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "An API key (`ecars api-key create`), or for one car's routes and \
                    the live sockets a relay token (`POST /v1/relay-tokens`)."
            }
        }
    });
    serde_json::to_string_pretty(&doc).unwrap_or_default()
}

/// Every body's schema, by the name the routes refer to, with the types they name.
fn schemas() -> Value {
    let mut generator = SchemaSettings::draft2020_12()
        .with(|s| s.definitions_path = "/components/schemas".into())
        .into_generator();
    let named: Vec<(&str, schemars::Schema)> = vec![
        (
            "VehiclePage",
            generator.subschema_for::<Vec<VehicleSummary>>(),
        ),
        (
            "Readings",
            generator.subschema_for::<Vec<TelemetryReading>>(),
        ),
        ("History", generator.subschema_for::<HistoryDocument>()),
        (
            "DeadLetters",
            generator.subschema_for::<Vec<DeadLetterView>>(),
        ),
        ("CasesPage", generator.subschema_for::<CasesPage>()),
        ("Retried", generator.subschema_for::<Retried>()),
        ("MintRequest", generator.subschema_for::<MintRequest>()),
        ("MintedToken", generator.subschema_for::<MintedToken>()),
        ("ErrorBody", generator.subschema_for::<ErrorBody>()),
        ("ServiceStatus", generator.subschema_for::<ServiceStatus>()),
    ];
    let mut schemas: Map<String, Value> = generator.take_definitions(true);
    for (name, schema) in named {
        // A named type is a reference to its definition, already among the schemas: the name
        // the routes use is then that reference, unless it is the same name.
        let own = format!("#/components/schemas/{name}");
        if schema.get("$ref").and_then(|r| r.as_str()) != Some(own.as_str()) {
            schemas.insert(name.to_owned(), schema.to_value());
        }
    }
    Value::Object(schemas)
}
