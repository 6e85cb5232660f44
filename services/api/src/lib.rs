//! The HTTP surface: `/healthz`, `/readyz`, `/metrics` and the telemetry query API
//! (`/v1/vehicles`, `/v1/vehicles/{vin}/telemetry`, `/v1/dead-letters`). JSON everywhere; errors
//! are JSON objects with a message.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use base64::Engine as _;
use chrono::{DateTime, Utc};
use clap::Args;
use ecars_persist::store::DeadLetterRow;
use ecars_persist::{SensorStore, StoreError};
use ecars_shared::bus::Bus;
use ecars_shared::telemetry::{TelemetryReading, Vin};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Settings of the HTTP surface.
#[derive(Clone, Debug, Args)]
pub struct HttpConfig {
    /// Address of the HTTP listener (health, metrics, query API).
    #[arg(
        long = "http-addr",
        env = "ECARS_HTTP_ADDR",
        default_value = "127.0.0.1:8080"
    )]
    pub http_addr: SocketAddr,
}

/// Most rows one query returns.
pub const MAX_LIMIT: i64 = 1000;

/// Which parts of the process are ready; `/readyz` is 200 only when all are (and the database
/// answers).
#[derive(Clone, Debug, Default)]
pub struct Readiness {
    parts: Arc<Mutex<BTreeMap<&'static str, bool>>>,
}

impl Readiness {
    /// Records whether a part (a worker, the broker, "draining") is ready.
    pub fn set(&self, part: &'static str, ready: bool) {
        self.parts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(part, ready);
    }

    fn snapshot(&self) -> BTreeMap<&'static str, bool> {
        self.parts.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The database the query API reads; `None` in a service without one (`ecars ingest`),
    /// whose query routes then answer 404.
    pub store: Option<SensorStore>,
    /// The bus, checked by `/readyz`.
    pub bus: Option<Arc<dyn Bus>>,
    /// Prometheus recorder handle for `/metrics`.
    pub metrics: PrometheusHandle,
    /// Readiness of the process's parts.
    pub readiness: Readiness,
}

/// An API error: a status and a message, rendered as `{"error": "..."}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::warn!(error = %e, "query failed");
        let status = if e.is_transient() {
            StatusCode::SERVICE_UNAVAILABLE
        } else {
            StatusCode::INTERNAL_SERVER_ERROR
        };
        ApiError {
            status,
            message: format!("database: {e}"),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(serde_json::json!({ "error": self.message })),
        )
            .into_response()
    }
}

/// The routes of this crate; other services (the relay) merge theirs into the same router.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/vehicles", get(vehicles))
        .route("/v1/vehicles/{vin}/telemetry", get(vehicle_telemetry))
        .route("/v1/dead-letters", get(dead_letters))
        .fallback(not_found)
        .with_state(state)
}

/// Serves `router` on a bound listener until `shutdown` fires.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "HTTP listening");
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
}

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// "ok", or why a dependency does not answer within 2 s.
async fn probe<E: std::fmt::Display>(
    check: impl std::future::Future<Output = Result<(), E>>,
) -> String {
    match tokio::time::timeout(Duration::from_secs(2), check).await {
        Ok(Ok(())) => "ok".to_owned(),
        Ok(Err(e)) => e.to_string(),
        Err(_) => "no answer within 2s".to_owned(),
    }
}

async fn readyz(State(state): State<ApiState>) -> Response {
    let mut body = serde_json::Map::new();
    if let Some(store) = &state.store {
        body.insert("database".into(), probe(store.ping()).await.into());
    }
    if let Some(bus) = &state.bus {
        body.insert("bus".into(), probe(bus.check()).await.into());
    }
    let parts = state.readiness.snapshot();
    let ready = body.values().all(|v| v == "ok") && parts.values().all(|ready| *ready);
    body.insert("parts".into(), serde_json::json!(parts));
    body.insert("ready".into(), ready.into());
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(serde_json::Value::Object(body))).into_response()
}

fn store(state: &ApiState) -> Result<&SensorStore, ApiError> {
    state.store.as_ref().ok_or(ApiError {
        status: StatusCode::NOT_FOUND,
        message: "this service has no database; ask a service that runs persistence".into(),
    })
}

async fn metrics(State(state): State<ApiState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
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

#[derive(Serialize)]
struct VehicleSummary {
    vin: Vin,
    latest: TelemetryReading,
}

async fn vehicles(State(state): State<ApiState>) -> Result<Json<Vec<VehicleSummary>>, ApiError> {
    let latest = store(&state)?.latest_per_vehicle().await?;
    Ok(Json(
        latest
            .into_iter()
            .map(|r| VehicleSummary {
                vin: r.vin.clone(),
                latest: r,
            })
            .collect(),
    ))
}

async fn vehicle_telemetry(
    State(state): State<ApiState>,
    Path(vin): Path<String>,
    Query(query): Query<LimitQuery>,
) -> Result<Json<Vec<TelemetryReading>>, ApiError> {
    let vin = Vin::parse(&vin).map_err(|e| ApiError::bad_request(e.to_string()))?;
    let limit = limit(&query, 100)?;
    Ok(Json(store(&state)?.vehicle_readings(&vin, limit).await?))
}

#[derive(Serialize)]
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

async fn dead_letters(
    State(state): State<ApiState>,
    Query(query): Query<LimitQuery>,
) -> Result<Json<Vec<DeadLetterView>>, ApiError> {
    let limit = limit(&query, 100)?;
    Ok(Json(
        store(&state)?
            .dead_letters(limit)
            .await?
            .into_iter()
            .map(DeadLetterView::from)
            .collect(),
    ))
}

async fn not_found() -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: "no such resource".into(),
    }
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
