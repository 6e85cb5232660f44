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

/// Connectivity events published, labelled by `state` (connected, disconnected).
pub const CONNECTIVITY_EVENTS: &str = "ecars_connectivity_events_total";
/// Connectivity events the bus refused, labelled by `state`.
pub const CONNECTIVITY_EVENTS_FAILED: &str = "ecars_connectivity_events_failed_total";
/// MQTT connections ended, labelled by `reason` (client_disconnect, connection_lost, keep_alive_timeout,
/// taken_over, server_shutdown, protocol_violation, refused, connect_timeout, connection_error,
/// broker, bus; over WebSocket also websocket_handshake_timeout, websocket_handshake_failed).
pub const CONNECTIONS_ENDED: &str = "ecars_mqtt_connections_ended_total";
/// MQTT connections closed for breaking the protocol, labelled by `reason` (malformed_packet,
/// protocol_error, packet_too_large, not_authorized).
pub const PROTOCOL_VIOLATIONS: &str = "ecars_mqtt_protocol_violations_total";
/// Times a connection went over the publish rate limit and was held back (its next packets
/// read only once the rate allows).
pub const PUBLISH_THROTTLED: &str = "ecars_mqtt_publish_throttled_total";
/// Retained messages refused for the retained limits, labelled by `reason` (`too_large`,
/// `too_many_topics`).
pub const RETAINED_REFUSED: &str = "ecars_mqtt_retained_refused_total";
/// Operations of a car refused by its authorization, labelled by `action` (subscribe: per topic
/// filter; publish).
pub const MQTT_NOT_AUTHORIZED: &str = "ecars_mqtt_not_authorized_total";
/// MQTT accepts that failed, labelled by `reason` (descriptors_or_memory, other).
pub const ACCEPT_FAILURES: &str = "ecars_mqtt_accept_failures_total";

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
    describe_counter!(CONNECTIONS_ENDED, "MQTT connections ended, by reason");
    describe_counter!(
        PROTOCOL_VIOLATIONS,
        "MQTT connections closed for breaking the protocol, by reason"
    );
    describe_counter!(
        MQTT_NOT_AUTHORIZED,
        "Operations of a car outside its own topics, refused, by action"
    );
    describe_counter!(
        ACCEPT_FAILURES,
        "MQTT accepts that failed (descriptors or memory exhausted, or other), by reason"
    );
}
