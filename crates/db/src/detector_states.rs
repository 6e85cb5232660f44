//! `anomaly_vehicle_state`: what the anomaly detector remembers of each car (its own type,
//! stored as JSON), with the time of the car's newest reading for the silence sweep. Written
//! together with the Cases it changed ([`crate::CaseOutbox::commit`]).

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use ecars_model::Vin;
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

use crate::{ms, on_pool, parse_vin, Database, DbError};

/// One car's state, to be stored.
#[derive(Debug)]
pub struct StoredState<'a, S> {
    /// The car.
    pub vin: &'a Vin,
    /// The detector's state of it.
    pub state: &'a S,
    /// Event time of its newest reading (the silence sweep looks for old ones).
    pub last_date: Option<DateTime<Utc>>,
}

/// Upserts the rows of [`rows_json`] on PostgreSQL.
pub(crate) const PG_UPSERT: &str = "INSERT INTO anomaly_vehicle_state (vin, state, last_date_ms)
     SELECT x.vin, x.state, x.last_date_ms
     FROM jsonb_to_recordset($1::jsonb) AS x(vin text, state text, last_date_ms bigint)
     ON CONFLICT (vin) DO UPDATE SET state = excluded.state,
         last_date_ms = excluded.last_date_ms";

/// Upserts the rows of [`rows_json`] on SQLite (`WHERE true` keeps SQLite from reading ON
/// CONFLICT as part of the SELECT).
pub(crate) const SQLITE_UPSERT: &str =
    "INSERT INTO anomaly_vehicle_state (vin, state, last_date_ms)
     SELECT json_extract(value, '$.vin'), json_extract(value, '$.state'),
            json_extract(value, '$.last_date_ms')
     FROM json_each($1) WHERE true
     ON CONFLICT (vin) DO UPDATE SET state = excluded.state,
         last_date_ms = excluded.last_date_ms";

/// The states as one JSON array parameter, for a set-based upsert.
pub(crate) fn rows_json<S: Serialize>(states: &[StoredState<'_, S>]) -> Result<String, DbError> {
    let rows = states
        .iter()
        .map(|s| -> Result<Value, DbError> {
            Ok(json!({
                "vin": s.vin.as_str(),
                "state": serde_json::to_string(s.state)
                    .map_err(|e| DbError::Decode(format!("state of {}: {e}", s.vin)))?,
                "last_date_ms": s.last_date.map_or(0, ms),
            }))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Value::Array(rows).to_string())
}

/// A stored `(vin, state)` row.
fn parse_state<S: DeserializeOwned>((vin, state): (String, String)) -> Result<(Vin, S), DbError> {
    let vin = parse_vin(vin)?;
    let state = serde_json::from_str(&state)
        .map_err(|e| DbError::Decode(format!("state of {vin}: {e}")))?;
    Ok((vin, state))
}

/// The `anomaly_vehicle_state` table.
#[derive(Clone, Debug)]
pub struct DetectorStates {
    pub(crate) db: Database,
}

impl DetectorStates {
    /// The stored states of these cars (absent cars have none yet).
    pub async fn load<S: DeserializeOwned>(
        &self,
        vins: &[&Vin],
    ) -> Result<HashMap<Vin, S>, DbError> {
        if vins.is_empty() {
            return Ok(HashMap::new());
        }
        let list = Value::from(vins.iter().map(|v| v.as_str()).collect::<Vec<_>>()).to_string();
        let sql = match &self.db.pool {
            crate::Pool::Postgres(_) => {
                "SELECT vin, state FROM anomaly_vehicle_state
                 WHERE vin IN (SELECT jsonb_array_elements_text($1::jsonb))"
            }
            crate::Pool::Sqlite(_) => {
                "SELECT vin, state FROM anomaly_vehicle_state
                 WHERE vin IN (SELECT value FROM json_each($1))"
            }
        };
        let rows: Vec<(String, String)> = on_pool!(self.db, |pool| {
            sqlx::query_as(sql).bind(&list).fetch_all(pool).await?
        });
        rows.into_iter().map(parse_state).collect()
    }

    /// Cars whose newest reading is older than `before`, with their state (the silence sweep),
    /// the most recently quiet first: a car is swept in the first rounds after it went quiet,
    /// and cars long silent (their episode open already) do not crowd it out of the limit.
    pub async fn quiet<S: DeserializeOwned>(
        &self,
        before: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<(Vin, S)>, DbError> {
        let rows: Vec<(String, String)> = on_pool!(self.db, |pool| {
            sqlx::query_as(
                "SELECT vin, state FROM anomaly_vehicle_state WHERE last_date_ms < $1
                 ORDER BY last_date_ms DESC LIMIT $2",
            )
            .bind(ms(before))
            .bind(limit)
            .fetch_all(pool)
            .await?
        });
        rows.into_iter().map(parse_state).collect()
    }
}
