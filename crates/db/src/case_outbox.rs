//! `case_outbox`: one row per anomaly episode holding the Case as it should be in Salesforce
//! and how far its sync got, written in the same transaction as the detector's per-car state
//! ([`crate::detector_states`]); and the changes other services are told about (the anomalies and
//! cases streams), published from here at least once (a transactional outbox).
//!
//! The SQL is written once for PostgreSQL and SQLite (times as Unix milliseconds, JSON as text);
//! where the two differ (unpacking a JSON array of rows) each gets its own statement.

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use ecars_model::{CaseChange, Vin};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use sqlx::{ColumnIndex, Decode, Row, Type};

use crate::detector_states::{self, StoredState};
use crate::sensor_cursors::{self, SensorCursor};
use crate::{from_ms as time, ms, on_pool, on_write_pool, Database, DbError, Pool};

/// Where an outbox row stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CaseStatus {
    /// Waiting to be sent (first time or an update).
    Pending,
    /// Salesforce has the Case as the row wants it.
    Synced,
    /// A permanent error: kept for a person; `ecars cases retry KEY` sends it again.
    Failed,
    /// Salesforce authentication fails: the whole sync waits.
    Paused,
    /// No Salesforce settings: kept until they are set.
    NotConfigured,
}

impl CaseStatus {
    /// Every status.
    pub const ALL: [CaseStatus; 5] = [
        CaseStatus::Pending,
        CaseStatus::Synced,
        CaseStatus::Failed,
        CaseStatus::Paused,
        CaseStatus::NotConfigured,
    ];

    /// The status as stored, and as `GET /v1/cases?status=` and `ecars cases list --status`
    /// take it.
    pub fn as_str(self) -> &'static str {
        match self {
            CaseStatus::Pending => "pending",
            CaseStatus::Synced => "synced",
            CaseStatus::Failed => "failed",
            CaseStatus::Paused => "paused",
            CaseStatus::NotConfigured => "not_configured",
        }
    }
}

/// A name that is no [`CaseStatus`].
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown status {0:?}: pending, synced, failed, paused or not_configured")]
pub struct UnknownStatus(pub String);

impl FromStr for CaseStatus {
    type Err = UnknownStatus;

    fn from_str(text: &str) -> Result<CaseStatus, UnknownStatus> {
        CaseStatus::ALL
            .into_iter()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| UnknownStatus(text.to_owned()))
    }
}

fn stored_status(text: &str) -> Result<CaseStatus, DbError> {
    text.parse()
        .map_err(|e: UnknownStatus| DbError::Decode(e.to_string()))
}

impl fmt::Display for CaseStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A Case as the detector wants it, for one episode.
#[derive(Clone, Debug, PartialEq)]
pub struct CaseDraft {
    /// `Ecars_Anomaly_Key__c`.
    pub key: String,
    /// The car.
    pub vin: Vin,
    /// The rule.
    pub rule: String,
    /// Episode start, event time.
    pub started_at: DateTime<Utc>,
    /// Episode end, once closed.
    pub closed_at: Option<DateTime<Utc>>,
    /// The Case fields.
    pub fields: Map<String, Value>,
}

/// One outbox row, as the sync and `GET /v1/cases` see it.
#[derive(Clone, Debug, PartialEq, Serialize, schemars::JsonSchema)]
pub struct CaseRecord {
    /// `Ecars_Anomaly_Key__c`.
    pub key: String,
    /// The car.
    pub vin: String,
    /// The rule.
    pub rule: String,
    /// Where the sync stands.
    pub status: CaseStatus,
    /// The Case's Salesforce Id, once created.
    pub salesforce_id: Option<String>,
    /// Attempts since the last success.
    pub attempts: i64,
    /// The last error's text.
    pub last_error: Option<String>,
    /// Episode start.
    pub episode_started_at: DateTime<Utc>,
    /// Episode end.
    pub episode_closed_at: Option<DateTime<Utc>>,
    /// Row created.
    pub created_at: DateTime<Utc>,
    /// Row changed.
    pub updated_at: DateTime<Utc>,
    /// Last successful sync.
    pub synced_at: Option<DateTime<Utc>>,
    /// The Case fields wanted.
    #[serde(skip)]
    pub fields: Map<String, Value>,
    /// The Case fields Salesforce has.
    #[serde(skip)]
    pub synced_fields: Map<String, Value>,
    /// Version of `fields`.
    #[serde(skip)]
    pub version: i64,
    /// When the first of the current run of errors happened.
    #[serde(skip)]
    pub first_error_at: Option<DateTime<Utc>>,
    /// The newest version published on the anomalies stream.
    #[serde(skip)]
    pub published_version: i64,
    /// Version of `fields` Salesforce has (0 before the first success).
    #[serde(skip)]
    pub synced_version: i64,
    /// The latest change of the Case's sync, for the cases stream.
    #[serde(skip)]
    pub case_event: Option<CaseChange>,
    /// How many changes of the Case's sync there were.
    #[serde(skip)]
    pub case_event_seq: i64,
    /// When the latest change happened.
    #[serde(skip)]
    pub case_event_at: Option<DateTime<Utc>>,
}

/// How a row's sync ended, to be written back.
#[derive(Clone, Debug, PartialEq)]
pub enum SyncOutcome {
    /// Salesforce accepted the fields sent.
    Synced {
        /// Case Id.
        salesforce_id: Option<String>,
        /// The fields Salesforce now has.
        fields: Map<String, Value>,
        /// The row version sent.
        version: i64,
    },
    /// Try again at `at`.
    Retry {
        /// Why.
        error: String,
        /// When.
        at: DateTime<Utc>,
    },
    /// Give up: a person looks at it.
    Failed {
        /// Why.
        error: String,
    },
}

/// The `case_outbox` table.
#[derive(Clone, Debug)]
pub struct CaseOutbox {
    pub(crate) db: Database,
}

fn json_object(text: Option<String>) -> Result<Map<String, Value>, DbError> {
    match text {
        None => Ok(Map::new()),
        Some(text) => match serde_json::from_str(&text) {
            Ok(Value::Object(map)) => Ok(map),
            Ok(_) | Err(_) => Err(DbError::Decode(format!(
                "case fields are not a JSON object: {text:.80}"
            ))),
        },
    }
}

fn record<'r, R>(row: &'r R) -> Result<CaseRecord, DbError>
where
    R: Row,
    &'r str: ColumnIndex<R>,
    i64: Decode<'r, R::Database> + Type<R::Database>,
    String: Decode<'r, R::Database> + Type<R::Database>,
{
    let get_i64 = |c: &'r str| row.try_get::<i64, _>(c);
    let get_opt_i64 = |c: &'r str| row.try_get::<Option<i64>, _>(c);
    let get_opt_str = |c: &'r str| row.try_get::<Option<String>, _>(c);
    Ok(CaseRecord {
        key: row.try_get("anomaly_key")?,
        vin: row.try_get("vin")?,
        rule: row.try_get("rule")?,
        status: stored_status(&row.try_get::<String, _>("status")?)?,
        salesforce_id: get_opt_str("salesforce_id")?,
        attempts: get_i64("attempts")?,
        last_error: get_opt_str("last_error")?,
        episode_started_at: time(get_i64("episode_started_ms")?),
        episode_closed_at: get_opt_i64("episode_closed_ms")?.map(time),
        created_at: time(get_i64("created_ms")?),
        updated_at: time(get_i64("updated_ms")?),
        synced_at: get_opt_i64("synced_ms")?.map(time),
        fields: json_object(Some(row.try_get("fields")?))?,
        synced_fields: json_object(get_opt_str("synced_fields")?)?,
        version: get_i64("version")?,
        first_error_at: get_opt_i64("first_error_ms")?.map(time),
        published_version: get_i64("published_version")?,
        case_event: get_opt_str("case_event")?
            .as_deref()
            .map(case_change)
            .transpose()?,
        synced_version: get_i64("synced_version")?,
        case_event_seq: get_i64("case_event_seq")?,
        case_event_at: get_opt_i64("case_event_ms")?.map(time),
    })
}

/// A stored Case sync change.
fn case_change(text: &str) -> Result<CaseChange, DbError> {
    match text {
        "created" => Ok(CaseChange::Created),
        "updated" => Ok(CaseChange::Updated),
        "failed" => Ok(CaseChange::Failed),
        other => Err(DbError::Decode(format!("unknown case event {other:?}"))),
    }
}

const COLUMNS: &str = "anomaly_key, vin, rule, status, salesforce_id, attempts, last_error, \
     episode_started_ms, episode_closed_ms, created_ms, updated_ms, synced_ms, fields, \
     synced_fields, version, first_error_ms, published_version, synced_version, case_event, \
     case_event_seq, case_event_ms";

/// `rows` in the order every multi-row writer of the outbox locks them: by key. Two
/// transactions that lock the same rows in different orders deadlock on PostgreSQL (the soak
/// run saw it every few seconds when the "published" marks went in publication order).
fn in_key_order<T>(rows: &[T], key: impl Fn(&T) -> &String) -> Vec<&T> {
    let mut ordered: Vec<&T> = rows.iter().collect();
    ordered.sort_unstable_by(|a, b| key(a).cmp(key(b)));
    ordered
}

impl CaseOutbox {
    /// Stores the cars' new states and the Cases their readings changed, in one transaction.
    /// A draft for a key already in the outbox replaces its fields and bumps its version; a
    /// synced row becomes pending again, not before `update_after_ms` after its last sync (so a
    /// busy episode costs one API call per interval, not one per reading).
    ///
    /// With a `cursor`, the reader of the sensor rows that made these states
    /// ([`crate::sensor_cursors`]) stores its position in the same transaction.
    pub async fn commit<S: Serialize>(
        &self,
        states: &[StoredState<'_, S>],
        drafts: &[CaseDraft],
        cursor: Option<SensorCursor<'_>>,
        new_status: CaseStatus,
        update_after_ms: i64,
        now: DateTime<Utc>,
    ) -> Result<(), DbError> {
        let state_rows = detector_states::rows_json(states)?;
        let now_ms = ms(now);
        let case_rows = Value::Array(
            in_key_order(drafts, |d| &d.key)
                .into_iter()
                .map(|d| {
                    json!({
                        "anomaly_key": d.key,
                        "vin": d.vin.as_str(),
                        "rule": d.rule,
                        "episode_started_ms": ms(d.started_at),
                        "episode_closed_ms": d.closed_at.map(ms),
                        "fields": Value::Object(d.fields.clone()).to_string(),
                    })
                })
                .collect(),
        )
        .to_string();
        // The upsert is the same on both databases; only unpacking the JSON rows differs.
        let upsert_tail = "
            ON CONFLICT (anomaly_key) DO UPDATE SET
                fields = excluded.fields,
                episode_closed_ms = excluded.episode_closed_ms,
                version = case_outbox.version + 1,
                updated_ms = excluded.updated_ms,
                status = CASE WHEN case_outbox.status = 'synced' THEN 'pending'
                              ELSE case_outbox.status END,
                next_attempt_ms = CASE
                    WHEN case_outbox.status = 'synced'
                         AND case_outbox.synced_ms + $5 > excluded.next_attempt_ms
                    THEN case_outbox.synced_ms + $5
                    ELSE case_outbox.next_attempt_ms END";
        let (states_sql, drafts_rows) = match &self.db.pool {
            Pool::Postgres(_) => (
                detector_states::PG_UPSERT,
                "SELECT x.anomaly_key, x.vin, x.rule, x.episode_started_ms,
                     x.episode_closed_ms, x.fields, 1, $2, $3, $4, $4
                 FROM jsonb_to_recordset($1::jsonb) AS x(anomaly_key text, vin text,
                     rule text, episode_started_ms bigint, episode_closed_ms bigint,
                     fields text)",
            ),
            // `WHERE true` keeps SQLite from reading ON CONFLICT as part of the SELECT.
            Pool::Sqlite(_) => (
                detector_states::SQLITE_UPSERT,
                "SELECT json_extract(value, '$.anomaly_key'), json_extract(value, '$.vin'),
                     json_extract(value, '$.rule'), json_extract(value, '$.episode_started_ms'),
                     json_extract(value, '$.episode_closed_ms'), json_extract(value, '$.fields'),
                     1, $2, $3, $4, $4
                 FROM json_each($1) WHERE true",
            ),
        };
        let drafts_sql = format!(
            "INSERT INTO case_outbox (anomaly_key, vin, rule, episode_started_ms,
                 episode_closed_ms, fields, version, status, next_attempt_ms,
                 created_ms, updated_ms)
             {drafts_rows}
             {upsert_tail}"
        );
        on_write_pool!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            sqlx::query(states_sql)
                .bind(&state_rows)
                .execute(&mut *tx)
                .await?;
            if !drafts.is_empty() {
                sqlx::query(sqlx::AssertSqlSafe(drafts_sql))
                    .bind(&case_rows)
                    .bind(new_status.as_str())
                    .bind(now_ms)
                    .bind(now_ms)
                    .bind(update_after_ms)
                    .execute(&mut *tx)
                    .await?;
            }
            if let Some(cursor) = cursor {
                sqlx::query(sensor_cursors::UPSERT)
                    .bind(cursor.consumer)
                    .bind(cursor.through_id)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Leases up to `limit` due pending rows, oldest first, until `lease_until` (another worker
    /// skips them meanwhile; an expired lease makes them due again).
    pub async fn claim_due(
        &self,
        now: DateTime<Utc>,
        lease_until: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<CaseRecord>, DbError> {
        let sql = format!(
            "UPDATE case_outbox SET lease_until_ms = $1 WHERE anomaly_key IN (
                 SELECT anomaly_key FROM case_outbox
                 WHERE status = 'pending' AND next_attempt_ms <= $2 AND lease_until_ms <= $2
                 ORDER BY created_ms, anomaly_key LIMIT $3)
             RETURNING {COLUMNS}"
        );
        let mut records = on_write_pool!(self.db, |pool| {
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(ms(lease_until))
                .bind(ms(now))
                .bind(limit)
                .fetch_all(pool)
                .await?;
            rows.iter().map(record).collect::<Result<Vec<_>, _>>()?
        });
        records.sort_by(|a, b| (a.created_at, &a.key).cmp(&(b.created_at, &b.key)));
        Ok(records)
    }

    /// When the next pending row is due, if any.
    pub async fn next_due(&self) -> Result<Option<DateTime<Utc>>, DbError> {
        let next: Option<i64> = on_pool!(self.db, |pool| {
            sqlx::query_scalar(
                "SELECT MIN(CASE WHEN lease_until_ms > next_attempt_ms THEN lease_until_ms
                                 ELSE next_attempt_ms END)
                 FROM case_outbox WHERE status = 'pending'",
            )
            .fetch_one(pool)
            .await?
        });
        Ok(next.map(time))
    }

    /// Writes back how the sync of leased rows ended, in one transaction.
    pub async fn finish(
        &self,
        outcomes: &[(CaseRecord, SyncOutcome)],
        update_after_ms: i64,
        now: DateTime<Utc>,
    ) -> Result<(), DbError> {
        let now_ms = ms(now);
        let outcomes = in_key_order(outcomes, |(row, _)| &row.key);
        on_write_pool!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            for (row, outcome) in outcomes.iter().copied() {
                match outcome {
                    SyncOutcome::Synced {
                        salesforce_id,
                        fields,
                        version,
                    } => {
                        // A newer version written meanwhile stays pending, due one update
                        // interval after this sync.
                        sqlx::query(
                            "UPDATE case_outbox SET synced_fields = $1, synced_version = $2,
                                 salesforce_id = COALESCE($3, salesforce_id), attempts = 0,
                                 first_error_ms = NULL, last_error = NULL, lease_until_ms = 0,
                                 synced_ms = $4, updated_ms = $4,
                                 case_event = CASE WHEN synced_version = 0 THEN 'created'
                                                   ELSE 'updated' END,
                                 case_event_seq = case_event_seq + 1, case_event_ms = $4,
                                 status = CASE WHEN version = $2 THEN 'synced' ELSE status END,
                                 next_attempt_ms = $4 + $5
                             WHERE anomaly_key = $6",
                        )
                        .bind(Value::Object(fields.clone()).to_string())
                        .bind(*version)
                        .bind(salesforce_id.as_deref())
                        .bind(now_ms)
                        .bind(update_after_ms)
                        .bind(&row.key)
                        .execute(&mut *tx)
                        .await?;
                    }
                    SyncOutcome::Retry { error, at } => {
                        sqlx::query(
                            "UPDATE case_outbox SET attempts = attempts + 1,
                                 first_error_ms = COALESCE(first_error_ms, $1), last_error = $2,
                                 next_attempt_ms = $3, lease_until_ms = 0, updated_ms = $1
                             WHERE anomaly_key = $4",
                        )
                        .bind(now_ms)
                        .bind(error)
                        .bind(ms(*at))
                        .bind(&row.key)
                        .execute(&mut *tx)
                        .await?;
                    }
                    SyncOutcome::Failed { error } => {
                        sqlx::query(
                            "UPDATE case_outbox SET attempts = attempts + 1, status = 'failed',
                                 first_error_ms = COALESCE(first_error_ms, $1), last_error = $2,
                                 lease_until_ms = 0, updated_ms = $1, case_event = 'failed',
                                 case_event_seq = case_event_seq + 1, case_event_ms = $1
                             WHERE anomaly_key = $3",
                        )
                        .bind(now_ms)
                        .bind(error)
                        .bind(&row.key)
                        .execute(&mut *tx)
                        .await?;
                    }
                }
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Moves every row in status `from` to `to` (not configured → pending when Salesforce is
    /// set; pending ↔ paused while authentication fails). Returns the rows moved.
    pub async fn move_status(&self, from: CaseStatus, to: CaseStatus) -> Result<u64, DbError> {
        let done = on_write_pool!(self.db, |pool| {
            sqlx::query("UPDATE case_outbox SET status = $1, lease_until_ms = 0 WHERE status = $2")
                .bind(to.as_str())
                .bind(from.as_str())
                .execute(pool)
                .await?
                .rows_affected()
        });
        Ok(done)
    }

    /// Re-queues a failed row after a fix (`ecars cases retry KEY`); false when no failed row
    /// has that key.
    pub async fn retry(&self, key: &str, now: DateTime<Utc>) -> Result<bool, DbError> {
        let done = on_write_pool!(self.db, |pool| {
            sqlx::query(
                "UPDATE case_outbox SET status = 'pending', attempts = 0, first_error_ms = NULL,
                     next_attempt_ms = $1, lease_until_ms = 0, updated_ms = $1
                 WHERE anomaly_key = $2 AND status = 'failed'",
            )
            .bind(ms(now))
            .bind(key)
            .execute(pool)
            .await?
            .rows_affected()
        });
        Ok(done == 1)
    }

    /// The newest rows, optionally of one status.
    pub async fn list(
        &self,
        status: Option<CaseStatus>,
        limit: i64,
    ) -> Result<Vec<CaseRecord>, DbError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM case_outbox WHERE ($1 IS NULL OR status = $1)
             ORDER BY created_ms DESC, anomaly_key LIMIT $2"
        );
        let status = status.map(CaseStatus::as_str);
        let records = on_pool!(self.db, |pool| {
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(status)
                .bind(limit)
                .fetch_all(pool)
                .await?;
            rows.iter().map(record).collect::<Result<Vec<_>, _>>()?
        });
        Ok(records)
    }

    /// Rows changed since they were last published on the anomalies stream, oldest change
    /// first.
    pub async fn unpublished(&self, limit: i64) -> Result<Vec<CaseRecord>, DbError> {
        self.pending_events("version > published_version ORDER BY updated_ms", limit)
            .await
    }

    /// Records that these versions were published (a newer version written meanwhile stays
    /// unpublished).
    pub async fn mark_published(&self, published: &[(String, i64)]) -> Result<(), DbError> {
        self.mark_events("published_version", published).await
    }

    /// Rows whose latest Case sync change has not gone out on the cases stream, oldest first.
    pub async fn unpublished_case_events(&self, limit: i64) -> Result<Vec<CaseRecord>, DbError> {
        self.pending_events(
            "case_event_seq > case_published_seq ORDER BY case_event_ms",
            limit,
        )
        .await
    }

    /// Records that these Case sync changes (key, sequence) were published.
    pub async fn mark_case_events_published(
        &self,
        published: &[(String, i64)],
    ) -> Result<(), DbError> {
        self.mark_events("case_published_seq", published).await
    }

    /// Rows matching `condition_and_order` (a fixed SQL fragment of ours), then by key.
    async fn pending_events(
        &self,
        condition_and_order: &'static str,
        limit: i64,
    ) -> Result<Vec<CaseRecord>, DbError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM case_outbox WHERE {condition_and_order}, anomaly_key LIMIT $1"
        );
        let records = on_pool!(self.db, |pool| {
            let rows = sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                .bind(limit)
                .fetch_all(pool)
                .await?;
            rows.iter().map(record).collect::<Result<Vec<_>, _>>()?
        });
        Ok(records)
    }

    /// Raises `column` (a published marker) to each (key, number), never lowering it.
    async fn mark_events(
        &self,
        column: &'static str,
        published: &[(String, i64)],
    ) -> Result<(), DbError> {
        let sql = format!(
            "UPDATE case_outbox SET {column} = $1 WHERE anomaly_key = $2 AND {column} < $1"
        );
        let published = in_key_order(published, |(key, _)| key);
        on_write_pool!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            for (key, number) in published.iter().copied() {
                sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                    .bind(*number)
                    .bind(key)
                    .execute(&mut *tx)
                    .await?;
            }
            tx.commit().await?;
        });
        Ok(())
    }

    /// Rows per status, each with the time its oldest row last changed (how long the oldest
    /// has waited in that status): what the backlog gauges report.
    pub async fn backlog(&self) -> Result<Vec<(CaseStatus, i64, DateTime<Utc>)>, DbError> {
        let rows: Vec<(String, i64, i64)> = on_pool!(self.db, |pool| {
            sqlx::query_as(
                "SELECT status, COUNT(*), MIN(updated_ms) FROM case_outbox GROUP BY status",
            )
            .fetch_all(pool)
            .await?
        });
        rows.into_iter()
            .map(|(status, n, oldest)| Ok((stored_status(&status)?, n, crate::from_ms(oldest))))
            .collect()
    }

    /// Rows per status.
    pub async fn counts(&self) -> Result<HashMap<CaseStatus, i64>, DbError> {
        let rows: Vec<(String, i64)> = on_pool!(self.db, |pool| {
            sqlx::query_as("SELECT status, COUNT(*) FROM case_outbox GROUP BY status")
                .fetch_all(pool)
                .await?
        });
        rows.into_iter()
            .map(|(status, n)| Ok((stored_status(&status)?, n)))
            .collect()
    }
}
