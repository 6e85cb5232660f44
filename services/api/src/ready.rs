//! `/healthz` and `/readyz`, as Kubernetes takes them: alive means the process answers; ready
//! means it can serve what it is for, so a Service sends it traffic. A Kafka outage makes only
//! the processes unready that cannot serve without Kafka: ingest keeps accepting cars into its
//! spool (a degraded state the body and `ecars_kafka_spooling` show), the relay serves the
//! backlog from the database, and only the workers, which do nothing but read Kafka, are not
//! ready.

use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use ecars_bus::BusHealth;

use crate::ApiState;

/// What a process needs the bus for, which decides whether a bus outage makes it unready.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BusNeed {
    /// It takes records in (ingest): ready while they are accepted, by the cluster or by the
    /// spool.
    #[default]
    Accept,
    /// It only reads records (the persistence and anomaly workers): ready while the bus
    /// delivers them.
    Consume,
    /// It serves without the bus (the relay: the backlog from the database, live records once
    /// the bus answers): a bus outage shows in the body only.
    Optional,
}

impl BusNeed {
    /// The need of a process that runs these parts: ingest's if it takes cars in, none if it
    /// serves the relay, else the workers'.
    pub fn of(ingest: bool, relay: bool) -> BusNeed {
        match (ingest, relay) {
            (true, _) => BusNeed::Accept,
            (false, true) => BusNeed::Optional,
            (false, false) => BusNeed::Consume,
        }
    }

    /// Whether a process with this need can serve with the bus as `health` says.
    pub fn ready(self, health: &BusHealth) -> bool {
        match self {
            BusNeed::Accept => health.accepts_records(),
            BusNeed::Consume => health.delivers_records(),
            BusNeed::Optional => true,
        }
    }
}

/// How the bus is doing, in a word or a sentence: "ok", or what is degraded or down.
pub(crate) fn describe(health: &BusHealth) -> String {
    let spool = health.spool.as_ref().filter(|spool| spool.in_use);
    match (&health.answers, spool) {
        (Ok(()), None) => "ok".to_owned(),
        (answers, Some(spool)) => format!(
            "spooling: {} bytes of accepted records wait in {}{}; they go to Kafka in order when \
             it takes them ({})",
            spool.bytes,
            spool.dir.display(),
            if spool.full {
                ", which is full: publishers wait"
            } else {
                ""
            },
            match answers {
                Ok(()) => "Kafka answers".to_owned(),
                Err(why) => why.clone(),
            }
        ),
        (Err(why), None) => why.clone(),
    }
}

/// Alive: the process answers (nothing else is checked).
#[utoipa::path(get, path = "/healthz", tag = "internal",
    responses((status = 200, description = "`{\"status\": \"ok\"}`")))]
pub(crate) async fn healthz() -> Json<serde_json::Value> {
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

/// What the probes of the process's dependencies and parts found, for `/readyz` and
/// `/v1/status`.
pub(crate) struct Checks {
    /// "ok" or why the database does not answer; `None` without a database.
    pub(crate) database: Option<String>,
    /// How the bus is doing, and whether that lets this process serve; `None` without a bus.
    pub(crate) bus: Option<(BusHealth, bool)>,
    /// Every part of the process and whether it is ready.
    pub(crate) parts: std::collections::BTreeMap<&'static str, bool>,
}

impl Checks {
    /// Whether the process can serve: what `/readyz` answers.
    pub(crate) fn ready(&self) -> bool {
        self.database.as_deref().is_none_or(|answer| answer == "ok")
            && self.bus.as_ref().is_none_or(|(_, ready)| *ready)
            && self.parts.values().all(|ready| *ready)
    }
}

/// Probes the database (2 s) and the bus (3 s) and reads the parts' readiness.
pub(crate) async fn check(state: &ApiState) -> Checks {
    let database = match &state.db {
        Some(db) => Some(probe(db.ping()).await),
        None => None,
    };
    let bus = match &state.bus {
        Some(bus) => {
            let health = match tokio::time::timeout(Duration::from_secs(3), bus.health()).await {
                Ok(health) => health,
                Err(_) => BusHealth {
                    answers: Err("no answer within 3s".to_owned()),
                    ..BusHealth::default()
                },
            };
            let ready = state.bus_need.ready(&health);
            Some((health, ready))
        }
        None => None,
    };
    Checks {
        database,
        bus,
        parts: state.readiness.snapshot(),
    }
}

/// Ready: the database answers within 2 s, the bus serves what this process needs it for
/// (ingest: records are accepted, by Kafka or the spool; the workers: Kafka answers; the
/// relay: not needed), and every part of the process is ready.
#[utoipa::path(get, path = "/readyz", tag = "internal",
    responses(
        (status = 200, description = "Ready: `{\"database\": \"ok\", \"bus\": \"ok\", \"bus_ready\": true, \"parts\": {...}, \"ready\": true}`; `bus` says `spooling: …` while ingest keeps cars' readings on disk."),
        (status = 503, description = "Not ready: the same object, saying which dependency or part is not."),
    ))]
pub(crate) async fn readyz(State(state): State<ApiState>) -> Response {
    let checks = check(&state).await;
    let ready = checks.ready();
    let mut body = serde_json::Map::new();
    if let Some(answer) = &checks.database {
        body.insert("database".into(), answer.clone().into());
    }
    if let Some((health, bus_ready)) = &checks.bus {
        body.insert("bus".into(), describe(health).into());
        body.insert("bus_ready".into(), (*bus_ready).into());
    }
    body.insert("parts".into(), serde_json::json!(checks.parts));
    body.insert("ready".into(), ready.into());
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(serde_json::Value::Object(body))).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ecars_bus::SpoolHealth;

    fn health(answers: bool, spool: Option<(bool, bool)>) -> BusHealth {
        BusHealth {
            answers: if answers {
                Ok(())
            } else {
                Err("the Kafka cluster does not answer".into())
            },
            spool: spool.map(|(in_use, full)| SpoolHealth {
                in_use,
                bytes: 4096,
                full,
                oldest: None,
                dir: "/var/lib/ecars/spool".into(),
            }),
        }
    }

    #[test]
    fn ingest_stays_ready_while_its_spool_takes_the_cars_readings() {
        let need = BusNeed::of(true, false);
        assert_eq!(need, BusNeed::Accept);
        assert!(need.ready(&health(true, None)));
        assert!(need.ready(&health(false, Some((true, false)))), "spooling");
        assert!(
            need.ready(&health(false, Some((false, false)))),
            "the spool takes the next record"
        );
        assert!(!need.ready(&health(false, Some((true, true)))), "full");
        assert!(!need.ready(&health(false, None)), "no spool");
        // A process that runs ingest with the relay (`ecars up` on Kafka) is ingest first.
        assert_eq!(BusNeed::of(true, true), BusNeed::Accept);
    }

    #[test]
    fn the_relay_serves_without_the_bus_and_the_workers_need_it() {
        let down = health(false, None);
        assert!(BusNeed::of(false, true).ready(&down));
        assert!(!BusNeed::of(false, false).ready(&down));
        assert!(BusNeed::of(false, false).ready(&health(true, None)));
    }

    #[test]
    fn the_body_says_what_is_degraded() {
        assert_eq!(describe(&health(true, Some((false, false)))), "ok");
        let spooling = describe(&health(false, Some((true, false))));
        assert!(spooling.starts_with("spooling: 4096 bytes"), "{spooling}");
        assert!(spooling.contains("does not answer"), "{spooling}");
        let full = describe(&health(false, Some((true, true))));
        assert!(full.contains("full"), "{full}");
        assert_eq!(
            describe(&health(false, None)),
            "the Kafka cluster does not answer"
        );
    }
}
