//! The HTTP API's Prometheus metrics: names and descriptions.

use metrics::describe_counter;

/// Requests refused for their credentials, labelled by `reason` (`missing_credential`,
/// `invalid_credential`, `missing_scope`).
pub const REFUSED: &str = "ecars_api_refused_total";

/// Describes the API's metrics to the installed recorder.
pub fn describe() {
    describe_counter!(
        REFUSED,
        "HTTP requests refused for their credentials, by reason"
    );
}
