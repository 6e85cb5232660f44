//! The live relay: streams readings to WebSocket clients (a service agent's Case page, the
//! dashboard), one car or a chosen set per socket, on the HTTP port.
//!
//! - `GET /v1/vehicles/{vin}/live`: one car; `GET /v1/live[?vin=A,B]`: the fleet or some cars.
//!   A socket first gets the newest readings of its cars from the database (so a chart starts
//!   full), then live ones, each a JSON text frame of the reading with its `event_id`.
//! - Routing by VIN and a bounded queue per client ([`hub`]); a client that falls behind is closed
//!   with [`CLOSE_TOO_SLOW`]; pings keep sockets alive and an idle one is closed.
//! - With `ECARS_RELAY_SECRET`, a client presents a relay token
//!   ([`ecars_model::relay_token`]) as `Authorization: Bearer`, `?access_token=` or its first
//!   message; otherwise the socket closes with 1008 (policy violation). The HTTP API mints
//!   tokens (`POST /v1/relay-tokens`, [`Relay::minter`]) for callers whose API key may.
//!   Without a secret the relay only runs on a loopback address.
//! - Data flow: bus (a tail of the telemetry stream of its own: every instance sees every
//!   reading) → [`hub::Hub`] → sockets.

pub mod hub;
pub mod metrics;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use clap::Args;
use ecars_bus::{Bus, BusError, Subscription};
use ecars_db::Database;
use ecars_model::relay_token::{TokenAuthority, TokenError, TokenMinter};
use ecars_model::{ConnectivityEvent, TelemetryReading, Vin};
use ecars_runtime::settings::{parse_duration, value_or_file, ConfigError};
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::hub::{Frame, Hub};

/// Close code of a client that fell too far behind (private-use range of RFC 6455).
pub const CLOSE_TOO_SLOW: u16 = 4001;
/// Close code of a missing, invalid, expired or wrong token (RFC 6455 policy violation).
pub const CLOSE_POLICY: u16 = 1008;
/// Close code of a socket idle for too long (RFC 6455 going away).
pub const CLOSE_IDLE: u16 = 1001;

/// Settings of the relay.
#[derive(Clone, Debug, Args)]
pub struct RelayConfig {
    /// Secret that signs relay tokens (HS256, at least 32 bytes). Without it the relay is open
    /// and refuses to run on a non-loopback address. Prefer the environment or the file.
    #[arg(
        long = "relay-secret",
        env = "ECARS_RELAY_SECRET",
        hide_env_values = true
    )]
    pub secret: Option<String>,
    /// File holding the relay secret.
    #[arg(long = "relay-secret-file", env = "ECARS_RELAY_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// A single API key that may mint relay tokens at `POST /v1/relay-tokens` (for a Salesforce
    /// Named Credential); the older form of a key with the scope `relay-tokens:mint` in
    /// `ECARS_API_KEYS_FILE`.
    #[arg(
        long = "relay-api-key",
        env = "ECARS_RELAY_API_KEY",
        hide_env_values = true
    )]
    pub api_key: Option<String>,
    /// File holding the API key.
    #[arg(long = "relay-api-key-file", env = "ECARS_RELAY_API_KEY_FILE")]
    pub api_key_file: Option<PathBuf>,
    /// Run without a relay secret on a non-loopback address: anyone who reaches the port can
    /// watch every car. Only for demos behind a private network (docker compose on a laptop).
    #[arg(long = "relay-allow-anonymous", env = "ECARS_RELAY_ALLOW_ANONYMOUS")]
    pub allow_anonymous_sockets: bool,
    /// Origins allowed to open sockets, comma-separated (for example
    /// `https://myorg.lightning.force.com`); empty allows any. Clients without an Origin header
    /// (not browsers) are not affected.
    #[arg(
        long = "relay-allowed-origins",
        env = "ECARS_RELAY_ALLOWED_ORIGINS",
        value_delimiter = ','
    )]
    pub allowed_origins: Vec<String>,
    /// Readings of each car sent first on connect.
    #[arg(long = "relay-backlog", env = "ECARS_RELAY_BACKLOG", default_value_t = 20, value_parser = clap::value_parser!(i64).range(0..=1000))]
    pub backlog: i64,
    /// Frames a client may fall behind before it is closed.
    #[arg(long = "relay-client-queue", env = "ECARS_RELAY_CLIENT_QUEUE", default_value_t = 256, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub client_queue: u32,
    /// Interval of pings to each client.
    #[arg(long = "relay-ping-interval", env = "ECARS_RELAY_PING_INTERVAL", default_value = "20s", value_parser = parse_duration)]
    pub ping_interval: Duration,
    /// A client silent this long (no pong, no message) is closed.
    #[arg(long = "relay-idle-timeout", env = "ECARS_RELAY_IDLE_TIMEOUT", default_value = "60s", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Lifetime of minted tokens.
    #[arg(long = "relay-token-ttl", env = "ECARS_RELAY_TOKEN_TTL", default_value = "5m", value_parser = parse_duration)]
    pub token_ttl: Duration,
}

impl Default for RelayConfig {
    fn default() -> Self {
        ecars_runtime::settings::defaults()
    }
}

/// API keys a live socket may present instead of a relay token (the HTTP API's, where they are
/// configured): the relay asks, the composition answers with the API's own checks.
pub trait LiveKeys: Send + Sync + std::fmt::Debug {
    /// Whether the HTTP listener wants a credential for every `/v1` route (then a live socket
    /// needs one too, relay secret or not).
    fn required(&self) -> bool;
    /// `Ok` when `presented` is a key that may read `vins` (`None`: the whole fleet);
    /// [`TokenError::Invalid`] when it is no key, [`TokenError::WrongVin`] when it may not.
    fn check(&self, presented: &str, vins: Option<&[Vin]>) -> Result<(), TokenError>;
}

/// The consumer name of the relay's tail of the telemetry stream.
pub const TAIL_NAME: &str = "ecars-relay";

/// The running relay's shared state.
pub struct Relay {
    hub: Arc<Hub>,
    db: Option<Database>,
    auth: Option<TokenAuthority>,
    minter: Option<TokenMinter>,
    api_key: Option<String>,
    /// The HTTP API's keys, once the composition has them.
    keys: std::sync::OnceLock<Arc<dyn LiveKeys>>,
    config: RelayConfig,
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("tokens_required", &self.auth.is_some())
            .field("minting", &self.minter.is_some())
            .finish_non_exhaustive()
    }
}

impl Relay {
    /// Checks the settings for a relay served on `http_addr`, reading backlogs from `db`.
    pub fn new(
        config: &RelayConfig,
        http_addr: SocketAddr,
        db: Option<Database>,
    ) -> Result<Arc<Relay>, ConfigError> {
        let secret = value_or_file(
            config.secret.as_deref(),
            config.secret_file.as_deref(),
            "ECARS_RELAY_SECRET",
        )?;
        let api_key = value_or_file(
            config.api_key.as_deref(),
            config.api_key_file.as_deref(),
            "ECARS_RELAY_API_KEY",
        )?;
        let auth = match &secret {
            Some(secret) if secret.len() < 32 => {
                return Err(ConfigError::Invalid {
                    setting: "ECARS_RELAY_SECRET",
                    reason: format!("{} bytes; at least 32 are needed for HS256", secret.len()),
                })
            }
            Some(secret) => Some(TokenAuthority::new(secret.as_bytes())),
            None if !http_addr.ip().is_loopback() && !config.allow_anonymous_sockets => {
                return Err(ConfigError::Invalid {
                    setting: "ECARS_RELAY_SECRET",
                    reason: format!("missing, and the HTTP listener {http_addr} is not loopback: anyone could watch every car (set a secret, or ECARS_RELAY_ALLOW_ANONYMOUS for a private demo)"),
                })
            }
            None if !http_addr.ip().is_loopback() => {
                tracing::warn!(%http_addr, "no relay secret and ECARS_RELAY_ALLOW_ANONYMOUS: live sockets are open to anyone who reaches this address");
                None
            }
            None => {
                tracing::warn!("no relay secret: live sockets are open to anyone who reaches the loopback HTTP listener");
                None
            }
        };
        if api_key.is_some() && auth.is_none() {
            return Err(ConfigError::Invalid {
                setting: "ECARS_RELAY_API_KEY",
                reason: "minting tokens needs ECARS_RELAY_SECRET to sign them".into(),
            });
        }
        let minter = auth
            .as_ref()
            .map(|auth| TokenMinter::new(auth.clone(), config.token_ttl));
        Ok(Arc::new(Relay {
            hub: Hub::new(config.client_queue as usize),
            db,
            auth,
            minter,
            api_key,
            keys: std::sync::OnceLock::new(),
            config: config.clone(),
        }))
    }

    /// What mints tokens for this relay's clients (for `POST /v1/relay-tokens`); `None` when
    /// sockets need no token (no relay secret).
    pub fn minter(&self) -> Option<&TokenMinter> {
        self.minter.as_ref()
    }

    /// Lets live sockets present the HTTP API's keys (set once, by the composition).
    pub fn accept_api_keys(&self, keys: Arc<dyn LiveKeys>) {
        let _ = self.keys.set(keys);
    }

    /// The older single API key (`ECARS_RELAY_API_KEY`), which the HTTP API accepts with the
    /// scope `relay-tokens:mint`.
    pub fn api_key(&self) -> Option<&str> {
        self.api_key.as_deref()
    }

    /// The fan-out.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// Follows the telemetry and connectivity streams into the hub until `shutdown` or the bus
    /// closes. Each relay
    /// has a tail of its own (in Kafka: its own group, from the newest offset); subscribe it
    /// with [`Relay::tail`] before readings flow, so none is missed.
    pub async fn feed(
        self: Arc<Self>,
        tails: Tails,
        shutdown: CancellationToken,
    ) -> Result<(), BusError> {
        let Tails {
            mut readings,
            mut connectivity,
        } = tails;
        let mut connectivity_open = true;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                delivery = readings.next() => match delivery? {
                    None => return Ok(()),
                    Some(delivery) => self.hub.publish(&delivery.record),
                },
                delivery = connectivity.next(), if connectivity_open => match delivery {
                    Ok(Some(delivery)) => self.hub.publish_connectivity(&delivery.record),
                    Ok(None) => connectivity_open = false,
                    // Connectivity frames are an extra: the readings go on without them.
                    Err(error) => {
                        tracing::warn!(%error, "the connectivity stream failed; live sockets get readings only");
                        connectivity_open = false;
                    }
                },
            }
        }
    }
}

/// The relay's own tails of the streams it relays, for [`Relay::feed`].
#[derive(Debug)]
pub struct Tails {
    readings: Subscription<TelemetryReading>,
    connectivity: Subscription<ConnectivityEvent>,
}

impl Relay {
    /// The relay's own tails of the telemetry and connectivity streams, for [`Relay::feed`].
    pub async fn tail(bus: &Bus) -> Result<Tails, BusError> {
        Ok(Tails {
            readings: bus.tail(TAIL_NAME).await?,
            connectivity: bus.tail(TAIL_NAME).await?,
        })
    }
}

/// The OpenAPI description of the relay's routes, for the HTTP API's document.
pub fn openapi() -> utoipa::openapi::OpenApi {
    #[derive(utoipa::OpenApi)]
    #[openapi(paths(vehicle_live, fleet_live))]
    struct LiveRoutes;
    <LiveRoutes as utoipa::OpenApi>::openapi()
}

/// The relay's routes: the live WebSockets.
pub fn router(relay: Arc<Relay>) -> Router {
    Router::new()
        .route("/v1/vehicles/{vin}/live", get(vehicle_live))
        .route("/v1/live", get(fleet_live))
        .with_state(relay)
}

#[derive(Debug, Deserialize)]
struct LiveQuery {
    access_token: Option<String>,
    vin: Option<String>,
    /// `true`: connectivity changes of the watched cars too (frames tagged
    /// `"type": "connectivity"`); readings only otherwise, as clients written before them expect.
    connectivity: Option<bool>,
}

fn refuse(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": message.into() }))).into_response()
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(|t| t.trim().to_owned())
}

impl Relay {
    /// Refuses a browser from an Origin not on the allow-list.
    fn origin_allowed(&self, headers: &HeaderMap) -> bool {
        let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) else {
            return true;
        };
        self.config.allowed_origins.is_empty()
            || self
                .config
                .allowed_origins
                .iter()
                .any(|allowed| allowed.trim_end_matches('/') == origin)
    }

    fn upgrade(
        self: Arc<Self>,
        upgrade: WebSocketUpgrade,
        headers: &HeaderMap,
        query: LiveQuery,
        vins: Option<Vec<Vin>>,
    ) -> Response {
        if !self.origin_allowed(headers) {
            ::metrics::counter!(metrics::REFUSED, "reason" => "origin").increment(1);
            return refuse(
                StatusCode::FORBIDDEN,
                "this Origin may not open live sockets",
            );
        }
        let token = bearer(headers).or(query.access_token);
        // Registered before the handshake completes, so a reading published right after the
        // client sees the upgrade reaches it; dropped if the token is refused.
        let registration = self
            .hub
            .register(vins.clone(), query.connectivity.unwrap_or(false));
        // Clients send little (a token, pongs): tungstenite's default 128 KiB read buffer per
        // socket would be most of the relay's memory at 10,000 sockets.
        upgrade
            .read_buffer_size(4 * 1024)
            .write_buffer_size(16 * 1024)
            .max_write_buffer_size(1024 * 1024)
            .max_message_size(64 * 1024)
            // Checked at the frame header: a frame announcing more is refused unread.
            .max_frame_size(64 * 1024)
            .on_upgrade(move |socket| self.serve(socket, vins, token, registration))
    }

    /// Sends a close frame and waits (briefly) for the client's, so the client reads the code
    /// and reason rather than a reset connection.
    async fn close(socket: &mut WebSocket, code: u16, reason: &str) {
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: Utf8Bytes::from(reason),
        }));
        if socket.send(frame).await.is_err() {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while let Some(Ok(message)) = socket.recv().await {
                if matches!(message, Message::Close(_)) {
                    break;
                }
            }
        })
        .await;
    }

    /// Waits for the first message to carry the token: the raw token or
    /// `{"access_token": "..."}`.
    async fn token_from_first_message(socket: &mut WebSocket) -> Option<String> {
        let first = tokio::time::timeout(Duration::from_secs(10), socket.recv()).await;
        let Ok(Some(Ok(Message::Text(text)))) = first else {
            return None;
        };
        let text = text.as_str().trim();
        match serde_json::from_str::<serde_json::Value>(text) {
            Ok(value) => value["access_token"].as_str().map(str::to_owned),
            Err(_) => Some(text.to_owned()),
        }
    }

    async fn serve(
        self: Arc<Self>,
        mut socket: WebSocket,
        vins: Option<Vec<Vin>>,
        token: Option<String>,
        mut registration: hub::Registration,
    ) {
        let keys = self.keys.get();
        if self.auth.is_some() || keys.is_some_and(|k| k.required()) {
            let token = match token {
                Some(token) => Some(token),
                None => Self::token_from_first_message(&mut socket).await,
            };
            let checked = match token {
                None => Err(TokenError::Missing),
                Some(token) => {
                    let by_token = match &self.auth {
                        Some(auth) => auth.check(&token, vins.as_deref()).map(|_| ()),
                        None => Err(TokenError::Invalid),
                    };
                    // Not a relay token: perhaps one of the API's keys.
                    match (by_token, keys) {
                        (Err(TokenError::Invalid), Some(keys)) => {
                            keys.check(&token, vins.as_deref())
                        }
                        (checked, _) => checked,
                    }
                }
            };
            if let Err(error) = checked {
                ::metrics::counter!(metrics::REFUSED, "reason" => error.code()).increment(1);
                tracing::info!(reason = error.code(), "live socket refused");
                Self::close(&mut socket, CLOSE_POLICY, &error.to_string()).await;
                return;
            }
        }
        // Registered before the backlog is read, so nothing published meanwhile is missed;
        // a reading in both is sent once.
        let mut sent: HashSet<uuid::Uuid> = HashSet::new();
        if let (Some(db), Some(vins)) = (&self.db, &vins) {
            for vin in vins {
                let readings = match db.sensor_rows().of_vehicle(vin, self.config.backlog).await {
                    Ok(readings) => readings,
                    Err(e) => {
                        tracing::warn!(error = %e, %vin, "backlog unavailable; live readings only");
                        Vec::new()
                    }
                };
                for reading in readings.iter().rev() {
                    sent.insert(reading.event_id);
                    if socket
                        .send(Message::Text(Frame::of(reading).text))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
        let mut ping = tokio::time::interval(self.config.ping_interval);
        ping.reset();
        let mut last_heard = tokio::time::Instant::now();
        loop {
            tokio::select! {
                frame = registration.frames.recv() => {
                    let Some(frame) = frame else { return };
                    if !sent.is_empty() && sent.remove(&frame.event_id) {
                        continue;
                    }
                    if socket.send(Message::Text(frame.text)).await.is_err() {
                        return;
                    }
                }
                _ = registration.kicked.cancelled() => {
                    let reason = format!("client too slow: more than {} readings behind", self.config.client_queue);
                    Self::close(&mut socket, CLOSE_TOO_SLOW, &reason).await;
                    return;
                }
                _ = ping.tick() => {
                    if last_heard.elapsed() > self.config.idle_timeout {
                        Self::close(&mut socket, CLOSE_IDLE, "idle").await;
                        return;
                    }
                    if socket.send(Message::Ping(Default::default())).await.is_err() {
                        return;
                    }
                }
                message = socket.recv() => match message {
                    None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                    Some(Ok(_)) => last_heard = tokio::time::Instant::now(),
                },
            }
        }
    }
}

/// One car, live: a WebSocket of its newest readings, then each new one as a JSON text frame.
#[utoipa::path(
    get,
    path = "/v1/vehicles/{vin}/live",
    tag = "live",
    params(
        ("vin" = String, Path, description = "The car's VIN (17 characters)."),
        ("access_token" = Option<String>, Query, description = "A relay token, where a header cannot be set (browsers); or send it as `Authorization: Bearer` or as the first text message."),
        ("connectivity" = Option<bool>, Query, description = "`true`: also frames `{\"type\": \"connectivity\", ...}` when a watched car connects or disconnects."),
    ),
    responses(
        (status = 101, description = "Switched to WebSocket: text frames of readings (`TelemetryReading` with its `event_id`)."),
        (status = 400, description = "Not a VIN, or not a WebSocket request."),
        (status = 401, description = "No valid relay token (where the relay requires one)."),
    ),
    security(("bearer" = []))
)]
async fn vehicle_live(
    State(relay): State<Arc<Relay>>,
    Path(vin): Path<String>,
    Query(query): Query<LiveQuery>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    match Vin::parse(&vin) {
        Ok(vin) => relay.upgrade(upgrade, &headers, query, Some(vec![vin])),
        Err(e) => refuse(StatusCode::BAD_REQUEST, e.to_string()),
    }
}

/// The fleet, or some cars, live.
#[utoipa::path(
    get,
    path = "/v1/live",
    tag = "live",
    params(
        ("vin" = Option<String>, Query, description = "Comma-separated VINs; all cars when absent (a fleet token)."),
        ("access_token" = Option<String>, Query, description = "A relay token, where a header cannot be set (browsers); or send it as `Authorization: Bearer` or as the first text message."),
        ("connectivity" = Option<bool>, Query, description = "`true`: also frames `{\"type\": \"connectivity\", ...}` when a watched car connects or disconnects."),
    ),
    responses(
        (status = 101, description = "Switched to WebSocket: text frames of readings."),
        (status = 400, description = "A VIN of the list is not a VIN, or not a WebSocket request."),
        (status = 401, description = "No valid relay token (where the relay requires one)."),
    ),
    security(("bearer" = []))
)]
async fn fleet_live(
    State(relay): State<Arc<Relay>>,
    Query(query): Query<LiveQuery>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Response {
    let vins = match query.vin.as_deref().filter(|v| !v.trim().is_empty()) {
        None => None,
        Some(list) => match list.split(',').map(|v| Vin::parse(v.trim())).collect() {
            Ok(vins) => Some(vins),
            Err(e) => return refuse(StatusCode::BAD_REQUEST, e.to_string()),
        },
    };
    relay.upgrade(upgrade, &headers, query, vins)
}
