//! Ingest's Prometheus metrics: names and descriptions.

use metrics::{describe_counter, describe_gauge};

/// MQTT PUBLISH packets received on telemetry topics.
pub const READINGS_RECEIVED: &str = "ecars_readings_received_total";
/// Readings accepted and published on the bus.
pub const READINGS_ACCEPTED: &str = "ecars_readings_accepted_total";
/// Readings rejected, labelled by `reason`.
pub const READINGS_REJECTED: &str = "ecars_readings_rejected_total";
/// MQTT connections refused at CONNECT, labelled by `reason`.
pub const MQTT_CONNECTIONS_REFUSED: &str = "ecars_mqtt_connections_refused_total";
/// MQTT connections currently open through the gateway.
pub const MQTT_CONNECTIONS_OPEN: &str = "ecars_mqtt_connections_open";

/// Describes ingest's metrics to the installed recorder.
pub fn describe() {
    describe_counter!(
        READINGS_RECEIVED,
        "MQTT PUBLISH packets received on telemetry topics"
    );
    describe_counter!(
        READINGS_ACCEPTED,
        "Readings accepted and published on the bus"
    );
    describe_counter!(
        READINGS_REJECTED,
        "Readings rejected to the dead-letter store, by reason"
    );
    describe_counter!(
        MQTT_CONNECTIONS_REFUSED,
        "MQTT connections refused at CONNECT, by reason"
    );
    describe_gauge!(
        MQTT_CONNECTIONS_OPEN,
        "MQTT connections open through the gateway"
    );
}
