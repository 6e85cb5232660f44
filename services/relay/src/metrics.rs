//! The relay's Prometheus metrics: names and descriptions.

use metrics::{describe_counter, describe_gauge};

/// Live sockets open on the relay.
pub const CLIENTS: &str = "ecars_relay_clients";
/// Live sockets refused, labelled by `reason` (missing, invalid, expired, wrong_vin, origin).
pub const REFUSED: &str = "ecars_relay_refused_total";
/// Live sockets closed because the client fell too far behind.
pub const SLOW_CLIENTS: &str = "ecars_relay_slow_clients_total";

/// Describes the relay's metrics to the installed recorder.
pub fn describe() {
    describe_gauge!(CLIENTS, "Live sockets open on the relay");
    describe_counter!(REFUSED, "Live sockets refused, by reason");
    describe_counter!(
        SLOW_CLIENTS,
        "Live sockets closed because the client fell too far behind"
    );
}
