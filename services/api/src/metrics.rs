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

/// Counts and times each request of a route (`Router::route_layer`, so the route's pattern,
/// not the path, labels it: `/v1/vehicles/{vin}/history`, a bounded set).
pub async fn track(
    matched: Option<axum::extract::MatchedPath>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let started = std::time::Instant::now();
    let method = request.method().as_str().to_owned();
    let route = matched
        .as_ref()
        .map_or("unmatched", |m| m.as_str())
        .to_owned();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    metrics::counter!(
        ecars_runtime::metrics::HTTP_REQUESTS,
        "route" => route.clone(),
        "method" => method,
        "status" => status
    )
    .increment(1);
    metrics::histogram!(ecars_runtime::metrics::HTTP_REQUEST_SECONDS, "route" => route)
        .record(started.elapsed().as_secs_f64());
    response
}
