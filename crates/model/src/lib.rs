//! The ecars contract: what travels between cars, services and other teams.
//!
//! - [`telemetry`]: eCars' sensor reading ([`TelemetryReading`]), how a raw MQTT payload becomes
//!   one, and why one is refused ([`DeadLetter`], [`RejectReason`]);
//! - [`connectivity`]: cars connecting and disconnecting ([`ConnectivityEvent`]);
//! - [`anomaly`]: the events of anomaly episodes and of their Salesforce Cases;
//! - [`record`]: the [`Record`] trait every stream's type implements, and the catalog of the
//!   streams other services can read;
//! - [`schema`]: the JSON Schemas of those streams, as published in `docs/schemas`;
//! - [`device_auth`], [`relay_token`] and [`api_key`]: how cars, live-view clients and callers of
//!   the HTTP API prove who they are.

pub mod anomaly;
pub mod api_key;
pub mod connectivity;
pub mod device_auth;
pub mod record;
pub mod relay_token;
pub mod schema;
pub mod telemetry;

pub use anomaly::{AnomalyChange, AnomalyEvent, CaseChange, CaseEvent};
pub use connectivity::{Connectivity, ConnectivityEvent, DisconnectReason};
pub use record::{Record, RecordInfo};
pub use telemetry::{DeadLetter, RejectReason, TelemetryReading, TelemetryTopic, Vin};
