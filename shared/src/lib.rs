//! What every ecars service shares.
//!
//! - [`telemetry`]: the eCars sensor reading, how a raw MQTT payload becomes one, and why it may
//!   be rejected;
//! - [`anomaly`]: the events the anomaly worker publishes for other services;
//! - [`bus`]: the stream interface between ingest and the workers, with an in-process
//!   implementation (Kafka comes as a second one);
//! - [`device_auth`]: device credentials (HMAC of the VIN under the fleet secret);
//! - [`config`]: settings shared by several services, logging set-up;
//! - [`metrics`]: the Prometheus recorder and the names of the metrics.

pub mod anomaly;
pub mod bus;
pub mod config;
pub mod device_auth;
pub mod metrics;
pub mod schema;
pub mod telemetry;
