//! The HTTP surface, every route but the live WebSockets (which the relay serves), on two
//! listeners:
//!
//! - the public one ([`router`], `--http-addr`): fleet data (`/v1/vehicles`,
//!   `/v1/vehicles/{vin}/telemetry`, `/v1/vehicles/{vin}/history`, `/v1/dead-letters`), the case outbox (`/v1/cases`,
//!   `POST /v1/cases/{key}/retry`), live-view tokens (`POST /v1/relay-tokens`), the service's
//!   status (`/v1/status`) and the built-in dashboard at `/`; every `/v1` route checks the
//!   caller's credential ([`access`]);
//! - the internal one ([`admin_router`], `--admin-addr`, loopback by default): `/healthz`,
//!   `/readyz` and `/metrics`, for the kubelet and Prometheus, never behind an Ingress.
//!
//! JSON everywhere; errors are JSON objects with a message (and a `reason` code when a
//! credential is refused).

pub mod access;
pub mod history;
pub mod metrics;
pub mod openapi;
pub mod ready;
pub mod serve;
pub mod status;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use clap::Args;
use ecars_bus::Bus;
use ecars_db::case_outbox::CaseStatus;
use ecars_db::dead_letter_rows::DeadLetterRow;
use ecars_db::vehicle_states::FleetQuery;
use ecars_db::{Database, DbError};
use ecars_model::api_key::Scope;
use ecars_model::relay_token::{MintError, TokenMinter};
use ecars_model::{TelemetryReading, Vin};
use ecars_runtime::Readiness;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::access::{HttpAccess, Need, Refusal};

/// Settings of the HTTP surface.
#[derive(Clone, Debug, Args)]
pub struct HttpConfig {
    /// Address of the public HTTP listener (query API, live sockets, dashboard).
    #[arg(
        long = "http-addr",
        env = "ECARS_HTTP_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub http_addr: SocketAddr,
    /// Address of the internal listener for `/healthz`, `/readyz` and `/metrics` (the kubelet,
    /// Prometheus); keep it off the Internet.
    #[arg(
        long = "admin-addr",
        env = "ECARS_ADMIN_ADDR",
        default_value = "127.0.0.1:9090"
    )]
    pub admin_addr: SocketAddr,
    /// File of API keys: `name sha256:HEX scope[,scope]` per line (`ecars api-key create`
    /// prints one), re-read while running. With it, or with any relay secret, or off
    /// loopback, every `/v1` route needs a credential.
    #[arg(long = "api-keys-file", env = "ECARS_API_KEYS_FILE")]
    pub api_keys_file: Option<std::path::PathBuf>,
    /// Serve `/v1` without credentials on a non-loopback address: anyone who reaches the port
    /// reads every car. Only for demos behind a private network.
    #[arg(long = "api-allow-anonymous", env = "ECARS_API_ALLOW_ANONYMOUS")]
    pub allow_anonymous_api: bool,
    /// Serve the public HTTP listener over TLS (HTTPS and `wss://` live sockets) with the
    /// certificate of --tls-cert-file / --tls-key-file. The internal listener stays plain.
    #[arg(long = "http-tls", env = "ECARS_HTTP_TLS")]
    pub https: bool,
    /// Time a connection has to send a request's headers, from its opening or its last
    /// response: silent and idle sockets close after it.
    #[arg(long = "http-header-timeout", env = "ECARS_HTTP_HEADER_TIMEOUT", default_value = "10s", value_parser = ecars_runtime::settings::parse_duration)]
    pub header_timeout: Duration,
    /// Time a request has to be answered, reading its body included (not the life of a live
    /// socket, which ends the request at its upgrade).
    #[arg(long = "http-request-timeout", env = "ECARS_HTTP_REQUEST_TIMEOUT", default_value = "30s", value_parser = ecars_runtime::settings::parse_duration)]
    pub request_timeout: Duration,
    /// Largest request head (request line and headers) in bytes; larger ones get 431.
    #[arg(long = "http-max-header-bytes", env = "ECARS_HTTP_MAX_HEADER_BYTES", default_value_t = 16 * 1024, value_parser = clap::value_parser!(u32).range(1024..=1024 * 1024))]
    pub max_header_bytes: u32,
    /// How often settings files that may change while running (API keys, MQTT accounts,
    /// revocations, TLS certificates) are re-read.
    #[arg(long = "settings-reload-interval", env = "ECARS_SETTINGS_RELOAD_INTERVAL", default_value = "2s", value_parser = ecars_runtime::settings::parse_duration)]
    pub reload_interval: Duration,
    /// Map tiles behind the dashboard's fleet map, as a URL template
    /// (`https://tile.openstreetmap.org/{z}/{x}/{y}.png`, or your own tile server). Unset: the
    /// cars' markers on a plain background, and the browser fetches nothing from elsewhere.
    #[arg(long = "map-tiles-url", env = "ECARS_MAP_TILES_URL")]
    pub map_tiles_url: Option<String>,
    /// The attribution the tile server requires, shown on the map (HTML is not interpreted).
    #[arg(
        long = "map-attribution",
        env = "ECARS_MAP_ATTRIBUTION",
        default_value = ""
    )]
    pub map_attribution: String,
}

/// Most rows one query returns.
pub const MAX_LIMIT: i64 = 1000;

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The database the query API reads; `None` in a service without one (`ecars ingest`),
    /// whose query routes then answer 404.
    pub db: Option<Database>,
    /// The bus, checked by `/readyz`.
    pub bus: Option<Bus>,
    /// What the process needs the bus for: whether an outage makes it unready.
    pub bus_need: ready::BusNeed,
    /// Prometheus recorder handle for `/metrics`.
    pub metrics: PrometheusHandle,
    /// Readiness of the process's parts.
    pub readiness: Readiness,
    /// Mints live-view tokens at `POST /v1/relay-tokens`; `None`: minting is off.
    pub minter: Option<TokenMinter>,
    /// Who may call which `/v1` route.
    pub access: HttpAccess,
    /// The dashboard page `/` serves ([`dashboard_page`]), where the live relay runs too;
    /// `None`: no dashboard.
    pub dashboard: Option<axum::body::Bytes>,
    /// The OpenAPI document served at `/v1/openapi.json` ([`openapi::document`]).
    pub openapi: axum::body::Bytes,
}

impl std::fmt::Debug for ApiState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApiState")
            .field("db", &self.db.as_ref().map(Database::backend))
            .field("minting", &self.minter.is_some())
            .field("credentials_required", &self.access.required())
            .field("dashboard", &self.dashboard.is_some())
            .finish_non_exhaustive()
    }
}

/// An API error: a status and a message, rendered as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    /// A code for programs, where the status alone is ambiguous (refused credentials).
    reason: Option<&'static str>,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
            reason: None,
        }
    }

    fn status(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            reason: None,
        }
    }
}

impl From<Refusal> for ApiError {
    fn from(refusal: Refusal) -> Self {
        ::metrics::counter!(metrics::REFUSED, "reason" => refusal.code()).increment(1);
        let status = match refusal {
            Refusal::Missing | Refusal::Invalid => StatusCode::UNAUTHORIZED,
            Refusal::NotGranted(_) => StatusCode::FORBIDDEN,
        };
        ApiError {
            status,
            message: refusal.to_string(),
            reason: Some(refusal.code()),
        }
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        tracing::warn!(error = %e, "query failed");
        let status = if e.is_transient() {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        ApiError::status(status, format!("database: {e}"))
    }
}

/// The body of every error answer.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct ErrorBody {
    /// What went wrong, for people.
    pub error: String,
    /// For programs, where the status alone is ambiguous: why a credential was refused
    /// (`missing`, `invalid`, `not_granted`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'static str>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.message,
            reason: self.reason,
        };
        let mut response = (self.status, Json(body)).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            // RFC 6750 §3: a 401 names the scheme the caller should use.
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                header::HeaderValue::from_static("Bearer realm=\"ecars\""),
            );
        }
        response
    }
}

/// The public routes; the relay merges its WebSocket routes into the same router.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/", get(dashboard))
        .route("/v1/vehicles", get(vehicles))
        .route("/v1/vehicles/{vin}/telemetry", get(vehicle_telemetry))
        .route("/v1/vehicles/{vin}/history", get(vehicle_history))
        .route("/v1/dead-letters", get(dead_letters))
        .route("/v1/cases", get(list_cases))
        .route("/v1/cases/{key}/retry", post(retry_case))
        .route("/v1/relay-tokens", post(mint_relay_token))
        .route("/v1/status", get(status::service_status))
        .route("/v1/openapi.json", get(openapi_document))
        .route(LEAFLET_JS, get(leaflet_js))
        .route(LEAFLET_CSS, get(leaflet_css))
        .fallback(not_found)
        .with_state(state)
}

/// The internal routes: `/healthz`, `/readyz`, `/metrics`.
pub fn admin_router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(ready::healthz))
        .route("/readyz", get(ready::readyz))
        .route("/metrics", get(render_metrics))
        .fallback(not_found)
        .with_state(state)
}

impl HttpConfig {
    /// The limits every HTTP listener of the process applies.
    pub fn limits(&self) -> serve::HttpLimits {
        serve::HttpLimits {
            header_timeout: self.header_timeout,
            request_timeout: self.request_timeout,
            max_header_bytes: self.max_header_bytes as usize,
        }
    }
}

fn db(state: &ApiState) -> Result<&Database, ApiError> {
    state.db.as_ref().ok_or(ApiError::status(
        StatusCode::NOT_FOUND,
        "this service has no database; ask a service that runs persistence",
    ))
}

/// Checks the request's bearer credential for `need`.
fn authorize(state: &ApiState, headers: &HeaderMap, need: Need<'_>) -> Result<(), ApiError> {
    state.access.check(bearer(headers), need)?;
    Ok(())
}

/// Prometheus metrics, text exposition format 0.0.4.
#[utoipa::path(get, path = "/metrics", tag = "internal",
    responses((status = 200, description = "The metrics.", content_type = "text/plain; version=0.0.4")))]
async fn render_metrics(State(state): State<ApiState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        {
            ecars_runtime::process::record();
            state.metrics.render()
        },
    )
        .into_response()
}

#[derive(Debug, Deserialize)]
struct LimitQuery {
    limit: Option<String>,
}

fn limit(query: &LimitQuery, default: i64) -> Result<i64, ApiError> {
    match &query.limit {
        None => Ok(default),
        Some(text) => match text.parse::<i64>() {
            Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n),
            _ => Err(ApiError::bad_request(format!(
                "limit must be an integer from 1 to {MAX_LIMIT}, got {text:?}"
            ))),
        },
    }
}

/// One car in the fleet list.
#[derive(Serialize, schemars::JsonSchema)]
struct VehicleSummary {
    vin: Vin,
    /// The newest stored reading by event time (`null` before the first), as of the persistence
    /// worker's last pass over committed batches (every `--summary-interval`, 1 s).
    latest: Option<TelemetryReading>,
    /// When a reading of the car last arrived (as of the same pass).
    last_seen: Option<DateTime<Utc>>,
    /// Connected now (`null`: no connectivity event yet).
    online: Option<bool>,
    /// Since when, why, through which session and node (`null`: no event yet).
    connectivity: Option<ConnectivityView>,
    /// The rules with an open anomaly episode.
    open_anomalies: Vec<String>,
}

/// A car's connectivity in the fleet list.
#[derive(Serialize, schemars::JsonSchema)]
struct ConnectivityView {
    since: DateTime<Utc>,
    /// Why its last connection ended (offline only).
    reason: Option<String>,
    session_id: Uuid,
    node: String,
}

/// The query of `GET /v1/vehicles`: `limit` (page size), `after` (the cursor: the last VIN of
/// the page before), `online` (`true`: only connected cars; `false`: the others) and `anomaly`
/// (`true`: only cars with an open anomaly; `false`: the others).
fn fleet_query(params: &HashMap<String, String>) -> Result<FleetQuery, ApiError> {
    let mut query = FleetQuery {
        limit: MAX_LIMIT,
        ..FleetQuery::default()
    };
    for (name, value) in params {
        match name.as_str() {
            "limit" => {
                query.limit = limit(
                    &LimitQuery {
                        limit: Some(value.clone()),
                    },
                    MAX_LIMIT,
                )?
            }
            "after" => {
                query.after = Some(Vin::parse(value).map_err(|e| {
                    ApiError::bad_request(format!("after must be a VIN (the cursor): {e}"))
                })?)
            }
            "anomaly" | "online" => {
                let flag = Some(value.parse().map_err(|_| {
                    ApiError::bad_request(format!("{name} must be true or false, got {value:?}"))
                })?);
                if name == "anomaly" {
                    query.anomaly = flag;
                } else {
                    query.online = flag;
                }
            }
            other => {
                return Err(ApiError::bad_request(format!(
                    "unknown parameter {other:?}: expected limit, after, online or anomaly"
                )))
            }
        }
    }
    Ok(query)
}

/// The fleet, a page at a time by VIN, from each car's latest state (one row per car, whatever
/// the size of `sensor_data`). A full page links the next (`Link: <…>; rel="next"`, RFC 8288).
#[utoipa::path(get, path = "/v1/vehicles", tag = "fleet",
    params(
        ("limit" = Option<i64>, Query, description = "Page size, 1 to 1000 (default 1000).", minimum = 1, maximum = 1000),
        ("after" = Option<String>, Query, description = "The cursor: the last VIN of the page before."),
        ("online" = Option<bool>, Query, description = "`true`: only connected cars; `false`: the others."),
        ("anomaly" = Option<bool>, Query, description = "`true`: only cars with an open anomaly; `false`: the others."),
    ),
    responses(
        (status = 200, description = "A page of cars by VIN; a full page has a `Link: <...>; rel=\"next\"` header.",
            body = ref("#/components/schemas/VehiclePage")),
        (status = 400, description = "A bad parameter.", body = ref("#/components/schemas/ErrorBody")),
        (status = 401, description = "No valid credential.", body = ref("#/components/schemas/ErrorBody")),
        (status = 403, description = "The credential lacks `fleet:read`.", body = ref("#/components/schemas/ErrorBody")),
    ),
    security(("bearer" = [])))]
async fn vehicles(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Need::Scope(Scope::FleetRead))?;
    let query = fleet_query(&params)?;
    let page = db(&state)?.vehicle_states().page(&query).await?;
    let next = match page.last() {
        Some(last) if page.len() as i64 == query.limit => {
            let mut link = format!("/v1/vehicles?limit={}&after={}", query.limit, last.vin);
            if let Some(online) = query.online {
                link.push_str(&format!("&online={online}"));
            }
            if let Some(anomaly) = query.anomaly {
                link.push_str(&format!("&anomaly={anomaly}"));
            }
            Some(format!("<{link}>; rel=\"next\""))
        }
        _ => None,
    };
    let body: Vec<VehicleSummary> = page
        .into_iter()
        .map(|state| VehicleSummary {
            vin: state.vin,
            latest: state.latest,
            last_seen: state.last_seen,
            online: state.connectivity.as_ref().map(|c| c.online),
            connectivity: state.connectivity.map(|c| ConnectivityView {
                since: c.since,
                reason: c.reason,
                session_id: c.session_id,
                node: c.node,
            }),
            open_anomalies: state.open_anomalies,
        })
        .collect();
    let mut response = Json(body).into_response();
    if let Some(next) = next.and_then(|n| header::HeaderValue::from_str(&n).ok()) {
        response.headers_mut().insert(header::LINK, next);
    }
    Ok(response)
}

/// The VIN of a `/v1/vehicles/{vin}/…` route, once the caller may read that car.
fn vehicle(state: &ApiState, headers: &HeaderMap, vin: &str) -> Result<Vin, ApiError> {
    let vin = Vin::parse(vin).map_err(|e| ApiError::bad_request(e.to_string()));
    // The credential first: a caller without one learns nothing, not even what a VIN looks like.
    match &vin {
        Ok(vin) => authorize(state, headers, Need::Vehicle(vin))?,
        Err(_) => authorize(state, headers, Need::Scope(Scope::FleetRead))?,
    }
    vin
}

/// A car's newest readings, newest first.
#[utoipa::path(get, path = "/v1/vehicles/{vin}/telemetry", tag = "fleet",
    params(
        ("vin" = String, Path, description = "The car's VIN."),
        ("limit" = Option<i64>, Query, description = "1 to 1000 (default 100).", minimum = 1, maximum = 1000),
    ),
    responses(
        (status = 200, description = "Readings, newest first.", body = ref("#/components/schemas/Readings")),
        (status = 400, description = "Not a VIN, or a bad limit.", body = ref("#/components/schemas/ErrorBody")),
        (status = 401, description = "No valid credential.", body = ref("#/components/schemas/ErrorBody")),
        (status = 403, description = "The credential may not read this car.", body = ref("#/components/schemas/ErrorBody")),
    ),
    security(("bearer" = [])))]
async fn vehicle_telemetry(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(vin): Path<String>,
    Query(query): Query<LimitQuery>,
) -> Result<Json<Vec<TelemetryReading>>, ApiError> {
    let vin = vehicle(&state, &headers, &vin)?;
    let limit = limit(&query, 100)?;
    Ok(Json(
        db(&state)?.sensor_rows().of_vehicle(&vin, limit).await?,
    ))
}

/// One car's history over a time range: raw or from the rollups, as JSON or CSV, streamed
/// ([`history`]).
#[utoipa::path(get, path = "/v1/vehicles/{vin}/history", tag = "fleet",
    params(
        ("vin" = String, Path, description = "The car's VIN."),
        ("from" = Option<String>, Query, description = "RFC 3339 start (included); default an hour before `to`.", format = DateTime),
        ("to" = Option<String>, Query, description = "RFC 3339 end (excluded); default now.", format = DateTime),
        ("resolution" = Option<String>, Query, description = "`raw` (ranges up to 1 day), `1m` (31 days), `1h` (10 years) or `auto` (default: raw up to 2 hours, `1m` up to 7 days, `1h` beyond)."),
    ),
    responses(
        (status = 200, description = "The history, streamed; the `Ecars-Resolution` header names the resolution that answered.",
            content(
                (ref("#/components/schemas/History") = "application/json"),
                (String = "text/csv", example = "time,readings,battery_min,...\r\n"),
            )),
        (status = 400, description = "A bad range, resolution, time or parameter, with the reason.", body = ref("#/components/schemas/ErrorBody")),
        (status = 401, description = "No valid credential.", body = ref("#/components/schemas/ErrorBody")),
        (status = 403, description = "The credential may not read this car.", body = ref("#/components/schemas/ErrorBody")),
    ),
    security(("bearer" = [])))]
async fn vehicle_history(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(vin): Path<String>,
    Query(params): Query<HashMap<String, String>>,
) -> Result<Response, ApiError> {
    let vin = vehicle(&state, &headers, &vin)?;
    let query = history::HistoryQuery::parse(&params, Utc::now()).map_err(ApiError::bad_request)?;
    let db = db(&state)?.clone();
    Ok(history::respond(
        db,
        vin,
        query,
        history::Format::of(&headers),
    ))
}

/// A refused message.
#[derive(Serialize, schemars::JsonSchema)]
struct DeadLetterView {
    id: Uuid,
    received_at: DateTime<Utc>,
    topic: String,
    client_id: String,
    reason: String,
    /// The payload as text when it is UTF-8.
    payload: Option<String>,
    /// The payload bytes, base64.
    payload_base64: String,
}

impl From<DeadLetterRow> for DeadLetterView {
    fn from(row: DeadLetterRow) -> Self {
        DeadLetterView {
            payload: String::from_utf8(row.payload.clone()).ok(),
            payload_base64: base64::engine::general_purpose::STANDARD.encode(&row.payload),
            id: row.id,
            received_at: row.received_at,
            topic: row.topic,
            client_id: row.client_id,
            reason: row.reason,
        }
    }
}

/// The newest refused messages, newest first.
#[utoipa::path(get, path = "/v1/dead-letters", tag = "fleet",
    params(("limit" = Option<i64>, Query, description = "1 to 1000 (default 100).", minimum = 1, maximum = 1000)),
    responses(
        (status = 200, description = "Dead letters, newest first.", body = ref("#/components/schemas/DeadLetters")),
        (status = 400, description = "A bad limit.", body = ref("#/components/schemas/ErrorBody")),
        (status = 401, description = "No valid credential.", body = ref("#/components/schemas/ErrorBody")),
        (status = 403, description = "The credential lacks `dead-letters:read`.", body = ref("#/components/schemas/ErrorBody")),
    ),
    security(("bearer" = [])))]
async fn dead_letters(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Query(query): Query<LimitQuery>,
) -> Result<Json<Vec<DeadLetterView>>, ApiError> {
    authorize(&state, &headers, Need::Scope(Scope::DeadLettersRead))?;
    let limit = limit(&query, 100)?;
    Ok(Json(
        db(&state)?
            .dead_letter_rows()
            .newest(limit)
            .await?
            .into_iter()
            .map(DeadLetterView::from)
            .collect(),
    ))
}

/// `GET /v1/cases` query.
#[derive(Debug, Deserialize)]
struct CasesQuery {
    status: Option<String>,
    limit: Option<String>,
}

/// `GET /v1/cases[?status=failed&limit=100]`: outbox rows, newest first, with the count of each
/// status.
#[utoipa::path(get, path = "/v1/cases", tag = "cases",
    params(
        ("status" = Option<String>, Query, description = "Only rows of this status: pending, synced, failed, paused or not_configured."),
        ("limit" = Option<i64>, Query, description = "1 to 1000 (default 100).", minimum = 1, maximum = 1000),
    ),
    responses(
        (status = 200, description = "Outbox rows, newest first, and the count of each status.", body = ref("#/components/schemas/CasesPage")),
        (status = 400, description = "A bad status or limit.", body = ref("#/components/schemas/ErrorBody")),
        (status = 401, description = "No valid credential.", body = ref("#/components/schemas/ErrorBody")),
        (status = 403, description = "The credential lacks `cases:read`.", body = ref("#/components/schemas/ErrorBody")),
    ),
    security(("bearer" = [])))]
async fn list_cases(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Query(query): Query<CasesQuery>,
) -> Result<Json<CasesPage>, ApiError> {
    authorize(&state, &headers, Need::Scope(Scope::CasesRead))?;
    let status = match query.status.as_deref() {
        None => None,
        Some(text) => Some(
            text.parse::<CaseStatus>()
                .map_err(|e| ApiError::bad_request(e.to_string()))?,
        ),
    };
    let limit = limit(&LimitQuery { limit: query.limit }, 100)?;
    let outbox = db(&state)?.case_outbox();
    let cases = outbox.list(status, limit).await?;
    let counts = outbox.counts().await?;
    Ok(Json(CasesPage {
        counts: counts
            .iter()
            .map(|(k, v)| (k.as_str().to_owned(), *v))
            .collect(),
        cases,
    }))
}

/// A page of the case outbox.
#[derive(Serialize, schemars::JsonSchema)]
struct CasesPage {
    /// Rows of each status (all rows, not only this page's).
    counts: HashMap<String, i64>,
    /// The rows, newest first.
    cases: Vec<ecars_db::case_outbox::CaseRecord>,
}

/// A Case queued again.
#[derive(Serialize, schemars::JsonSchema)]
struct Retried {
    /// Its anomaly key.
    key: String,
    /// `pending`.
    status: CaseStatus,
}

/// `POST /v1/cases/{key}/retry`: re-queues a failed Case.
#[utoipa::path(post, path = "/v1/cases/{key}/retry", tag = "cases",
    params(("key" = String, Path, description = "The anomaly key (`Ecars_Anomaly_Key__c`).")),
    responses(
        (status = 200, description = "Queued again: `{\"key\": ..., \"status\": \"pending\"}`.", body = ref("#/components/schemas/Retried")),
        (status = 401, description = "No valid credential.", body = ref("#/components/schemas/ErrorBody")),
        (status = 403, description = "The credential lacks `cases:write`.", body = ref("#/components/schemas/ErrorBody")),
        (status = 404, description = "No failed Case with this key.", body = ref("#/components/schemas/ErrorBody")),
    ),
    security(("bearer" = [])))]
async fn retry_case(
    State(state): State<ApiState>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> Result<Json<Retried>, ApiError> {
    authorize(&state, &headers, Need::Scope(Scope::CasesWrite))?;
    if db(&state)?.case_outbox().retry(&key, Utc::now()).await? {
        Ok(Json(Retried {
            key,
            status: CaseStatus::Pending,
        }))
    } else {
        Err(ApiError::status(
            StatusCode::NOT_FOUND,
            format!("no failed case with key {key:?}"),
        ))
    }
}

/// What a live-view token should cover.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
struct MintRequest {
    /// A VIN, or `*` for the fleet.
    vin: String,
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
}

/// `POST /v1/relay-tokens {"vin": "..."}` with an API key as bearer: a live-view token.
#[utoipa::path(post, path = "/v1/relay-tokens", tag = "live",
    request_body(content = ref("#/components/schemas/MintRequest"), content_type = "application/json"),
    responses(
        (status = 200, description = "A token for the relay's sockets.", body = ref("#/components/schemas/MintedToken")),
        (status = 400, description = "Not a VIN nor `*`, or not JSON.", body = ref("#/components/schemas/ErrorBody")),
        (status = 401, description = "No valid credential.", body = ref("#/components/schemas/ErrorBody")),
        (status = 403, description = "The API key may not mint tokens for this subject.", body = ref("#/components/schemas/ErrorBody")),
        (status = 404, description = "Minting is off (no relay secret).", body = ref("#/components/schemas/ErrorBody")),
    ),
    security(("bearer" = [])))]
async fn mint_relay_token(
    State(state): State<ApiState>,
    headers: HeaderMap,
    request: Result<Json<MintRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, ApiError> {
    // The credential before the body: a caller without one learns nothing about the API.
    authorize(&state, &headers, Need::Mint)?;
    let Json(request) = request.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let Some(minter) = &state.minter else {
        return Err(ApiError::status(
            StatusCode::NOT_FOUND,
            "token minting is off: live sockets need no token here (no ECARS_RELAY_SECRET)",
        ));
    };
    match minter.mint(&request.vin) {
        Ok(token) => Ok(Json(token).into_response()),
        Err(e @ MintError::Subject(_)) => Err(ApiError::bad_request(e.to_string())),
        Err(e @ MintError::Token(_)) => Err(ApiError::status(
            StatusCode::INTERNAL_SERVER_ERROR,
            e.to_string(),
        )),
    }
}

/// The built-in dashboard (embedded in the binary): the fleet with its latest readings and open
/// anomalies, and a live chart of a chosen car, over the same HTTP and WebSocket API as any
/// client. `?vin=` picks the car; where credentials are required it asks for an API key once
/// and keeps it in the browser session.
async fn dashboard(State(state): State<ApiState>) -> Response {
    let Some(page) = state.dashboard else {
        return not_found().await.into_response();
    };
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        page,
    )
        .into_response()
}

/// The dashboard page with the map's settings filled in.
pub fn dashboard_page(config: &HttpConfig) -> axum::body::Bytes {
    let escape = |text: &str| {
        text.replace('&', "&amp;")
            .replace('"', "&quot;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('\'', "&#39;")
    };
    include_str!("../assets/dashboard.html")
        .replace(
            r#"<meta name="ecars-map-tiles" content="">"#,
            &format!(
                r#"<meta name="ecars-map-tiles" content="{}">"#,
                escape(config.map_tiles_url.as_deref().unwrap_or(""))
            ),
        )
        .replace(
            r#"<meta name="ecars-map-attribution" content="">"#,
            &format!(
                r#"<meta name="ecars-map-attribution" content="{}">"#,
                escape(&config.map_attribution)
            ),
        )
        .into()
}

/// Leaflet 1.9.4 (BSD-2-Clause, `assets/leaflet/LICENSE`), the dashboard's map, served from the
/// binary: the dashboard works without reaching any other site. Versioned paths: cached for a
/// year.
const LEAFLET_JS: &str = "/assets/leaflet-1.9.4.js";
const LEAFLET_CSS: &str = "/assets/leaflet-1.9.4.css";

async fn leaflet_js() -> Response {
    static_asset(
        "text/javascript; charset=utf-8",
        include_str!("../assets/leaflet/leaflet.js"),
    )
}

async fn leaflet_css() -> Response {
    static_asset(
        "text/css; charset=utf-8",
        include_str!("../assets/leaflet/leaflet.css"),
    )
}

fn static_asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
        ],
        body,
    )
        .into_response()
}

/// This document: the OpenAPI 3.1 description of the whole HTTP API. Any credential of the
/// server may read it (it holds no data, but which routes and versions run is an attacker's
/// map).
#[utoipa::path(get, path = "/v1/openapi.json", tag = "meta",
    responses((status = 200, description = "The OpenAPI document.", content_type = "application/json"),
        (status = 401, description = "No valid credential.", body = ref("#/components/schemas/ErrorBody"))),
    security(("bearer" = [])))]
async fn openapi_document(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &headers, Need::Credential)?;
    Ok((
        [(header::CONTENT_TYPE, "application/json")],
        state.openapi.clone(),
    )
        .into_response())
}

async fn not_found() -> ApiError {
    ApiError::status(StatusCode::NOT_FOUND, "no such resource")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limit_is_checked() {
        let q = |s: &str| LimitQuery {
            limit: Some(s.to_owned()),
        };
        assert_eq!(limit(&LimitQuery { limit: None }, 100).unwrap(), 100);
        assert_eq!(limit(&q("5"), 100).unwrap(), 5);
        for bad in ["0", "-1", "1001", "abc"] {
            let err = limit(&q(bad), 100).unwrap_err();
            assert_eq!(err.status, StatusCode::BAD_REQUEST);
            assert!(err.message.contains("limit"), "{}", err.message);
        }
    }
}
