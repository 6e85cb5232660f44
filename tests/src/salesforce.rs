//! A Salesforce emulator for tests: the OAuth token endpoint (JWT bearer and client
//! credentials), sObject Collections upsert and single-record upsert of Case by external id, and
//! SOQL on `Vehicle__c`, answering as the REST API documentation says (bodies, error codes,
//! `Sforce-Limit-Info`), with fault injection. Not part of the product.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::extract::{Form, Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use axum::{Json, Router};
use serde_json::{json, Map, Value};

/// Case fields the emulated org has (anything else is `INVALID_FIELD`).
const CASE_FIELDS: [&str; 11] = [
    "Subject",
    "Description",
    "Priority",
    "Status",
    "Origin",
    "Vehicle__c",
    "Ecars_Anomaly_Key__c",
    "Ecars_Rule__c",
    "Ecars_Firings__c",
    "Ecars_Last_Fired_At__c",
    "Ecars_Episode_Ended_At__c",
];
/// The Case `Priority` picklist (restricted).
const PRIORITIES: [&str; 3] = ["High", "Medium", "Low"];

/// A Case stored in the emulator.
#[derive(Clone, Debug)]
pub struct EmulatedCase {
    /// Salesforce Id.
    pub id: String,
    /// Current fields.
    pub fields: Map<String, Value>,
    /// Times it was written after creation.
    pub updates: u32,
}

/// Faults to inject.
#[derive(Debug, Default)]
pub struct Faults {
    /// Every API request answers 503 `SERVER_UNAVAILABLE` until then.
    pub unavailable_until: Option<Instant>,
    /// The next this many records get `UNABLE_TO_LOCK_ROW`.
    pub lock_errors: u32,
    /// Every API request answers 403 `REQUEST_LIMIT_EXCEEDED`.
    pub limit_exceeded: bool,
    /// The token endpoint refuses the client (`invalid_client`).
    pub reject_client: bool,
}

/// Everything the emulator saw and holds.
#[derive(Debug, Default)]
pub struct EmulatorState {
    /// Cases by external id.
    pub cases: HashMap<String, EmulatedCase>,
    /// Vehicles: VIN → `Vehicle__c` Id.
    pub vehicles: HashMap<String, String>,
    /// Faults.
    pub faults: Faults,
    /// Token requests received.
    pub token_requests: u64,
    /// REST API requests received (whatever their answer).
    pub api_requests: u64,
    /// Collections upsert requests received.
    pub upsert_requests: u64,
    /// SOQL queries received.
    pub queries: u64,
    /// VINs asked for by SOQL, in order (a VIN twice would be a wasted look-up).
    pub queried_vins: Vec<String>,
    /// Record writes attempted per external id (each record of each upsert).
    pub attempts_per_key: HashMap<String, u32>,
    /// Cases created per external id (more than 1 would be a duplicate).
    pub creations_per_key: HashMap<String, u32>,
    valid_tokens: HashSet<String>,
    next_id: u64,
    api_used: u64,
}

/// Credentials the emulated Connected App accepts.
#[derive(Clone, Debug)]
pub struct EmulatorCredentials {
    /// Consumer key.
    pub client_id: String,
    /// Consumer secret (client credentials).
    pub client_secret: String,
    /// Integration user (JWT bearer).
    pub username: String,
    /// PEM public key of the certificate uploaded to the Connected App (JWT bearer).
    pub public_key_pem: Option<Vec<u8>>,
}

struct Shared {
    state: Mutex<EmulatorState>,
    credentials: EmulatorCredentials,
    base_url: String,
    api_limit: u64,
}

/// A running emulator.
pub struct SalesforceEmulator {
    shared: Arc<Shared>,
    /// Its URL (login URL and instance URL at once).
    pub base_url: String,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SalesforceEmulator {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl SalesforceEmulator {
    /// Starts on a free loopback port.
    pub async fn start(credentials: EmulatorCredentials) -> anyhow::Result<SalesforceEmulator> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr: SocketAddr = listener.local_addr()?;
        let base_url = format!("http://{addr}");
        let shared = Arc::new(Shared {
            state: Mutex::new(EmulatorState::default()),
            credentials,
            base_url: base_url.clone(),
            api_limit: 100_000,
        });
        let router = Router::new()
            .route("/services/oauth2/token", post(token))
            .route(
                "/services/data/{version}/composite/sobjects/Case/Ecars_Anomaly_Key__c",
                patch(collections_upsert),
            )
            .route(
                "/services/data/{version}/sobjects/Case/Ecars_Anomaly_Key__c/{key}",
                patch(single_upsert),
            )
            .route("/services/data/{version}/query", get(query))
            .with_state(Arc::clone(&shared));
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Ok(SalesforceEmulator {
            shared,
            base_url,
            task,
        })
    }

    /// Reads or changes the emulator's state.
    pub fn with<T>(&self, f: impl FnOnce(&mut EmulatorState) -> T) -> T {
        f(&mut self.shared.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Adds a `Vehicle__c` record for a VIN; returns its Id.
    pub fn add_vehicle(&self, vin: &str) -> String {
        self.with(|s| {
            s.next_id += 1;
            let id = format!("a0V{:015}", s.next_id);
            s.vehicles.insert(vin.to_owned(), id.clone());
            id
        })
    }

    /// Invalidates every issued token (sessions expire).
    pub fn expire_tokens(&self) {
        self.with(|s| s.valid_tokens.clear());
    }
}

type Shared_ = Arc<Shared>;

fn api_error(status: StatusCode, code: &str, message: &str) -> Response {
    (
        status,
        Json(json!([{ "message": message, "errorCode": code, "fields": [] }])),
    )
        .into_response()
}

fn oauth_error(code: &str, description: &str) -> Response {
    (
        StatusCode::BAD_REQUEST,
        Json(json!({ "error": code, "error_description": description })),
    )
        .into_response()
}

async fn token(
    State(shared): State<Shared_>,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    state.token_requests += 1;
    if state.faults.reject_client {
        return oauth_error("invalid_client", "invalid client credentials");
    }
    let creds = &shared.credentials;
    match form.get("grant_type").map(String::as_str) {
        Some("client_credentials") => {
            if form.get("client_id") != Some(&creds.client_id) {
                return oauth_error("invalid_client_id", "client identifier invalid");
            }
            if form.get("client_secret") != Some(&creds.client_secret) {
                return oauth_error("invalid_client", "invalid client credentials");
            }
        }
        Some("urn:ietf:params:oauth:grant-type:jwt-bearer") => {
            let Some(pem) = &creds.public_key_pem else {
                return oauth_error("invalid_grant", "no certificate uploaded");
            };
            let Some(assertion) = form.get("assertion") else {
                return oauth_error("invalid_request", "assertion missing");
            };
            let Ok(key) = jsonwebtoken::DecodingKey::from_rsa_pem(pem) else {
                return oauth_error("invalid_grant", "bad certificate");
            };
            let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::RS256);
            validation.set_audience(&[shared.base_url.as_str()]);
            validation.set_issuer(&[creds.client_id.as_str()]);
            let claims = match jsonwebtoken::decode::<Value>(assertion, &key, &validation) {
                Ok(data) => data.claims,
                Err(e) => return oauth_error("invalid_grant", &format!("invalid assertion: {e}")),
            };
            if claims["sub"] != creds.username.as_str() {
                return oauth_error("invalid_grant", "user hasn't approved this consumer");
            }
        }
        _ => return oauth_error("unsupported_grant_type", "grant type not supported"),
    }
    state.next_id += 1;
    let access_token = format!("00Dxx0000000001!AQ{:012}", state.next_id);
    state.valid_tokens.insert(access_token.clone());
    Json(json!({
        "access_token": access_token,
        "instance_url": shared.base_url,
        "id": format!("{}/id/00Dxx0000000001/005xx0000000001", shared.base_url),
        "token_type": "Bearer",
        "issued_at": chrono::Utc::now().timestamp_millis().to_string(),
        "signature": "emulated",
        "scope": "api",
    }))
    .into_response()
}

/// Common checks of every REST API request: the session, injected outages, the API limit.
/// Returns the refusal, if any.
fn refusal(state: &mut EmulatorState, headers: &HeaderMap) -> Option<Response> {
    state.api_requests += 1;
    let token = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    if !token.is_some_and(|t| state.valid_tokens.contains(t)) {
        return Some(api_error(
            StatusCode::UNAUTHORIZED,
            "INVALID_SESSION_ID",
            "Session expired or invalid",
        ));
    }
    if state
        .faults
        .unavailable_until
        .is_some_and(|until| Instant::now() < until)
    {
        return Some(api_error(
            StatusCode::SERVICE_UNAVAILABLE,
            "SERVER_UNAVAILABLE",
            "Server is temporarily unavailable",
        ));
    }
    if state.faults.limit_exceeded {
        return Some(api_error(
            StatusCode::FORBIDDEN,
            "REQUEST_LIMIT_EXCEEDED",
            "TotalRequests Limit exceeded.",
        ));
    }
    state.api_used += 1;
    None
}

fn with_limit_info(shared: &Shared, used: u64, response: Response) -> Response {
    let mut response = response;
    if let Ok(value) = HeaderValue::from_str(&format!("api-usage={used}/{}", shared.api_limit)) {
        response.headers_mut().insert("Sforce-Limit-Info", value);
    }
    response
}

/// Validates and writes one Case record; `Err` is a record-level error.
fn write_case(
    state: &mut EmulatorState,
    record: &Map<String, Value>,
) -> Result<(String, bool), Value> {
    let error = |code: &str, message: &str, fields: &[&str]| json!({ "statusCode": code, "message": message, "fields": fields });
    let Some(key) = record.get("Ecars_Anomaly_Key__c").and_then(Value::as_str) else {
        return Err(error(
            "REQUIRED_FIELD_MISSING",
            "Required fields are missing: [Ecars_Anomaly_Key__c]",
            &["Ecars_Anomaly_Key__c"],
        ));
    };
    *state.attempts_per_key.entry(key.to_owned()).or_default() += 1;
    if state.faults.lock_errors > 0 {
        state.faults.lock_errors -= 1;
        return Err(error(
            "UNABLE_TO_LOCK_ROW",
            "unable to obtain exclusive access to this record",
            &[],
        ));
    }
    if let Some(priority) = record.get("Priority").and_then(Value::as_str) {
        if !PRIORITIES.contains(&priority) {
            return Err(error(
                "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST",
                &format!("Priority: bad value for restricted picklist field: {priority}"),
                &["Priority"],
            ));
        }
    }
    if record
        .get("Subject")
        .and_then(Value::as_str)
        .is_some_and(|s| s.chars().count() > 255)
    {
        return Err(error(
            "STRING_TOO_LONG",
            "Subject: data value too large",
            &["Subject"],
        ));
    }
    let key = key.to_owned();
    let mut fields = record.clone();
    fields.remove("attributes");
    if let Some(case) = state.cases.get_mut(&key) {
        case.fields.extend(fields);
        case.updates += 1;
        return Ok((case.id.clone(), false));
    }
    state.next_id += 1;
    let id = format!("500xx{:013}", state.next_id);
    state.cases.insert(
        key.clone(),
        EmulatedCase {
            id: id.clone(),
            fields,
            updates: 0,
        },
    );
    *state.creations_per_key.entry(key).or_default() += 1;
    Ok((id, true))
}

/// Unknown fields fail the whole request, as Salesforce does when a column does not exist.
fn unknown_field(record: &Map<String, Value>) -> Option<String> {
    record
        .keys()
        .find(|k| *k != "attributes" && !CASE_FIELDS.contains(&k.as_str()))
        .cloned()
}

async fn collections_upsert(
    State(shared): State<Shared_>,
    headers: HeaderMap,
    Json(body): Json<Value>,
) -> Response {
    let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(response) = refusal(&mut state, &headers) {
        return response;
    }
    state.upsert_requests += 1;
    let used = state.api_used;
    let Some(records) = body["records"].as_array() else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "JSON_PARSER_ERROR",
            "records missing",
        );
    };
    if records.len() > 200 {
        return api_error(
            StatusCode::BAD_REQUEST,
            "EXCEEDED_MAX_SIZE_REQUEST",
            "The number of records exceeds the limit of 200",
        );
    }
    let mut results = Vec::new();
    for record in records {
        let Some(record) = record.as_object() else {
            return api_error(
                StatusCode::BAD_REQUEST,
                "JSON_PARSER_ERROR",
                "record is not an object",
            );
        };
        if record["attributes"]["type"] != "Case" {
            return api_error(
                StatusCode::BAD_REQUEST,
                "INVALID_TYPE",
                "attributes.type must be Case",
            );
        }
        if let Some(field) = unknown_field(record) {
            return api_error(
                StatusCode::BAD_REQUEST,
                "INVALID_FIELD",
                &format!("No such column '{field}' on sobject of type Case"),
            );
        }
        results.push(match write_case(&mut state, record) {
            Ok((id, created)) => {
                json!({"id": id, "success": true, "errors": [], "created": created})
            }
            Err(error) => json!({"success": false, "errors": [error]}),
        });
    }
    with_limit_info(&shared, used, Json(Value::Array(results)).into_response())
}

async fn single_upsert(
    State(shared): State<Shared_>,
    headers: HeaderMap,
    Path((_version, key)): Path<(String, String)>,
    Json(body): Json<Value>,
) -> Response {
    let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(response) = refusal(&mut state, &headers) {
        return response;
    }
    let used = state.api_used;
    let Some(record) = body.as_object() else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "JSON_PARSER_ERROR",
            "body is not an object",
        );
    };
    if let Some(field) = unknown_field(record) {
        return api_error(
            StatusCode::BAD_REQUEST,
            "INVALID_FIELD",
            &format!("No such column '{field}' on sobject of type Case"),
        );
    }
    let mut record = record.clone();
    record.insert("Ecars_Anomaly_Key__c".into(), Value::String(key));
    let response = match write_case(&mut state, &record) {
        Ok((id, true)) => (
            StatusCode::CREATED,
            Json(json!({"id": id, "success": true, "errors": [], "created": true})),
        )
            .into_response(),
        Ok((id, false)) => (
            StatusCode::OK,
            Json(json!({"id": id, "success": true, "errors": [], "created": false})),
        )
            .into_response(),
        Err(error) => (
            StatusCode::BAD_REQUEST,
            Json(json!([{ "message": error["message"], "errorCode": error["statusCode"], "fields": error["fields"] }])),
        )
            .into_response(),
    };
    with_limit_info(&shared, used, response)
}

async fn query(
    State(shared): State<Shared_>,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
) -> Response {
    let mut state = shared.state.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(response) = refusal(&mut state, &headers) {
        return response;
    }
    state.queries += 1;
    let used = state.api_used;
    let soql = params.get("q").cloned().unwrap_or_default();
    let prefix = "SELECT Id, VIN__c FROM Vehicle__c WHERE VIN__c IN (";
    let Some(list) = soql.strip_prefix(prefix).and_then(|r| r.strip_suffix(')')) else {
        return api_error(
            StatusCode::BAD_REQUEST,
            "MALFORMED_QUERY",
            &format!("unexpected query: {soql:.100}"),
        );
    };
    let records: Vec<Value> = list
        .split(',')
        .map(|v| v.trim().trim_matches('\''))
        .filter_map(|vin| {
            state.queried_vins.push(vin.to_owned());
            state.vehicles.get(vin).map(|id| {
                json!({
                    "attributes": {"type": "Vehicle__c", "url": format!("/services/data/v62.0/sobjects/Vehicle__c/{id}")},
                    "Id": id,
                    "VIN__c": vin,
                })
            })
        })
        .collect();
    with_limit_info(
        &shared,
        used,
        Json(json!({"totalSize": records.len(), "done": true, "records": records})).into_response(),
    )
}

/// Generates an RSA key pair with `openssl` for the JWT bearer flow: (private key file, public
/// key PEM).
pub fn rsa_key_pair(dir: &std::path::Path) -> anyhow::Result<(std::path::PathBuf, Vec<u8>)> {
    let private = dir.join("salesforce-key.pem");
    let public = dir.join("salesforce-key.pub.pem");
    let status = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
        ])
        .arg(&private)
        .stderr(std::process::Stdio::null())
        .status()?;
    anyhow::ensure!(status.success(), "openssl genpkey failed");
    let status = std::process::Command::new("openssl")
        .args(["pkey", "-pubout", "-in"])
        .arg(&private)
        .arg("-out")
        .arg(&public)
        .status()?;
    anyhow::ensure!(status.success(), "openssl pkey failed");
    Ok((private, std::fs::read(public)?))
}
