//! The HTTP API's Prometheus metrics: names and descriptions.

use metrics::describe_counter;

/// Requests refused for their credentials, labelled by `reason` (`missing_credential`,
/// `invalid_credential`, `missing_scope`).
pub const REFUSED: &str = "ecars_api_refused_total";

/// Connections the HTTP listeners failed to accept (out of descriptors, mostly).
pub const ACCEPT_FAILURES: &str = "ecars_http_accept_failures_total";
/// HTTP connections or requests cut short by a limit or a bad peer, labelled by `reason`
/// (`header_timeout`, `header_too_large`, `malformed`, `request_timeout`, `io`).
pub const CONNECTIONS_CLOSED: &str = "ecars_http_connections_closed_total";

/// Describes the API's metrics to the installed recorder.
pub fn describe() {
    describe_counter!(
        ACCEPT_FAILURES,
        "Connections the HTTP listeners failed to accept"
    );
    describe_counter!(
        CONNECTIONS_CLOSED,
        "HTTP connections or requests cut short by a limit or a bad peer, by reason"
    );
    describe_counter!(
        REFUSED,
        "HTTP requests refused for their credentials, by reason"
    );
}
