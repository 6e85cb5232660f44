//! `GET /v1/status`: how the service is doing, for operators and their tools. The same probes
//! as `/readyz`, in more detail and behind a credential (`status:read`): a degraded state that
//! still serves (ingest spooling accepted readings while Kafka is away, the relay without
//! Kafka) is "degraded" here, while `/readyz` keeps answering 200 so Kubernetes keeps sending
//! traffic.

use std::collections::BTreeMap;
use std::time::SystemTime;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::Json;
use chrono::{DateTime, Utc};
use ecars_bus::BusHealth;
use ecars_model::api_key::Scope;
use serde::Serialize;

use crate::access::Need;
use crate::ready::{check, describe, Checks};
use crate::{authorize, ApiError, ApiState};

/// One word for the whole service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Condition {
    /// Everything answers.
    Ok,
    /// It serves, but something is not as it should be (`problems` says what): ingest keeps
    /// accepted readings in its spool while Kafka is away, or the relay serves without Kafka.
    Degraded,
    /// It cannot serve what it is for (`/readyz` answers 503).
    Unavailable,
}

/// A dependency: whether it answers, and if not, why.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct Dependency {
    /// It answered within its probe's time.
    pub answers: bool,
    /// Why not, when it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The disk spool of a process that takes cars' readings in while Kafka is away.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct SpoolStatus {
    /// Accepted records go through the spool now (Kafka is away or behind).
    pub in_use: bool,
    /// Bytes waiting in it.
    pub bytes: u64,
    /// It is full: the cars' publishes wait.
    pub full: bool,
    /// When the oldest waiting record was written (to within one segment of the spool).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_at: Option<DateTime<Utc>>,
    /// Its age in seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub oldest_age_seconds: Option<f64>,
    /// Where it is.
    pub dir: String,
}

/// The bus (Kafka, or the in-process bus of `ecars up`).
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct BusStatus {
    /// The cluster answers (always, in process).
    pub answers: bool,
    /// Why it does not, when it does not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The bus does what this process needs it for (ingest: records are accepted, by Kafka or
    /// the spool; the workers: records are delivered).
    pub serves_this_process: bool,
    /// The spool, where there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spool: Option<SpoolStatus>,
}

/// The answer of `GET /v1/status`.
#[derive(Debug, Serialize, schemars::JsonSchema)]
pub struct ServiceStatus {
    /// One word for the whole.
    pub condition: Condition,
    /// What is degraded or unavailable, one sentence each; empty when `ok`.
    pub problems: Vec<String>,
    /// The version this process runs.
    pub version: String,
    /// When the process started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<DateTime<Utc>>,
    /// The parts this process runs (ingest, persistence, …) and whether each is ready.
    pub parts: BTreeMap<String, bool>,
    /// The database, where the process has one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database: Option<Dependency>,
    /// The bus.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bus: Option<BusStatus>,
}

fn spool_status(health: &BusHealth, now: SystemTime) -> Option<SpoolStatus> {
    let spool = health.spool.as_ref()?;
    let age = spool
        .oldest
        .map(|oldest| now.duration_since(oldest).unwrap_or_default().as_secs_f64());
    Some(SpoolStatus {
        in_use: spool.in_use,
        bytes: spool.bytes,
        full: spool.full,
        oldest_at: spool.oldest.map(DateTime::<Utc>::from),
        oldest_age_seconds: age,
        dir: spool.dir.display().to_string(),
    })
}

/// The status the checks describe, at `now`.
fn status(checks: &Checks, now: SystemTime) -> ServiceStatus {
    let mut problems = Vec::new();
    let database = checks.database.as_ref().map(|answer| {
        let answers = answer == "ok";
        if !answers {
            problems.push(format!("the database does not answer: {answer}"));
        }
        Dependency {
            answers,
            error: (!answers).then(|| answer.clone()),
        }
    });
    let bus = checks.bus.as_ref().map(|(health, serves)| {
        let spooling = health.spool.as_ref().is_some_and(|spool| spool.in_use);
        if health.answers.is_err() || spooling {
            problems.push(describe(health));
        }
        BusStatus {
            answers: health.answers.is_ok(),
            error: health.answers.clone().err(),
            serves_this_process: *serves,
            spool: spool_status(health, now),
        }
    });
    for (part, ready) in &checks.parts {
        if !ready {
            problems.push(format!("{part} is not ready"));
        }
    }
    let condition = if !checks.ready() {
        Condition::Unavailable
    } else if problems.is_empty() {
        Condition::Ok
    } else {
        Condition::Degraded
    };
    ServiceStatus {
        condition,
        problems,
        version: env!("CARGO_PKG_VERSION").to_owned(),
        started_at: ecars_runtime::process::start_time().map(DateTime::<Utc>::from),
        parts: checks
            .parts
            .iter()
            .map(|(part, ready)| ((*part).to_owned(), *ready))
            .collect(),
        database,
        bus,
    }
}

/// How the service is doing: ok, degraded (serving, with problems) or unavailable.
#[utoipa::path(get, path = "/v1/status", tag = "status",
    responses(
        (status = 200, description = "The status, also while degraded or unavailable (`condition` says which).", body = ref("#/components/schemas/ServiceStatus")),
        (status = 401, description = "No valid credential.", body = ref("#/components/schemas/ErrorBody")),
        (status = 403, description = "The credential lacks `status:read`.", body = ref("#/components/schemas/ErrorBody")),
    ),
    security(("bearer" = [])))]
pub(crate) async fn service_status(
    State(state): State<ApiState>,
    headers: HeaderMap,
) -> Result<Json<ServiceStatus>, ApiError> {
    authorize(&state, &headers, Need::Scope(Scope::StatusRead))?;
    let checks = check(&state).await;
    Ok(Json(status(&checks, SystemTime::now())))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ecars_bus::SpoolHealth;

    use super::*;

    fn checks(database: &str, answers: bool, spool_in_use: bool, serves: bool) -> Checks {
        let now = SystemTime::now();
        Checks {
            database: Some(database.to_owned()),
            bus: Some((
                BusHealth {
                    answers: if answers {
                        Ok(())
                    } else {
                        Err("the Kafka cluster does not answer".to_owned())
                    },
                    spool: Some(SpoolHealth {
                        in_use: spool_in_use,
                        bytes: if spool_in_use { 8192 } else { 0 },
                        full: false,
                        oldest: spool_in_use.then(|| now - Duration::from_secs(90)),
                        dir: "/var/lib/ecars/spool".into(),
                    }),
                },
                serves,
            )),
            parts: BTreeMap::from([("ingest", true)]),
        }
    }

    #[test]
    fn all_answering_is_ok() {
        let status = status(&checks("ok", true, false, true), SystemTime::now());
        assert_eq!(status.condition, Condition::Ok);
        assert!(status.problems.is_empty(), "{:?}", status.problems);
        let spool = status.bus.and_then(|bus| bus.spool).unwrap();
        assert_eq!(spool.oldest_age_seconds, None);
    }

    #[test]
    fn spooling_while_kafka_is_away_is_degraded_not_unavailable() {
        let status = status(&checks("ok", false, true, true), SystemTime::now());
        assert_eq!(status.condition, Condition::Degraded);
        assert_eq!(status.problems.len(), 1, "{:?}", status.problems);
        assert!(status.problems[0].starts_with("spooling: 8192 bytes"));
        let bus = status.bus.unwrap();
        assert!(!bus.answers && bus.serves_this_process);
        let age = bus.spool.unwrap().oldest_age_seconds.unwrap();
        assert!((89.0..=91.0).contains(&age), "{age}");
    }

    #[test]
    fn not_ready_is_unavailable_and_says_why() {
        let mut down = checks("connection refused", true, false, true);
        down.parts.insert("persistence", false);
        let status = status(&down, SystemTime::now());
        assert_eq!(status.condition, Condition::Unavailable);
        assert_eq!(
            status.problems,
            vec![
                "the database does not answer: connection refused".to_owned(),
                "persistence is not ready".to_owned()
            ]
        );
        let workers = status_of_workers_without_kafka();
        assert_eq!(workers.condition, Condition::Unavailable);
    }

    fn status_of_workers_without_kafka() -> ServiceStatus {
        let mut checks = checks("ok", false, false, false);
        if let Some((health, _)) = checks.bus.as_mut() {
            health.spool = None;
        }
        status(&checks, SystemTime::now())
    }
}
