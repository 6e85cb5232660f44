//! `dead_letters`: every refused message with its original bytes and reason, unique by id.

use chrono::{DateTime, Utc};
use ecars_model::DeadLetter;
use serde::Serialize;
use sqlx::Row;
use uuid::Uuid;

use crate::sensor_rows::sqlite_insert;
use crate::{parse_time, parse_uuid, sqlite_time, Database, DbError, Pool};

/// One row of `dead_letters`, as the HTTP API shows it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeadLetterRow {
    /// Row id.
    pub id: Uuid,
    /// When ingest received the message.
    pub received_at: DateTime<Utc>,
    /// MQTT topic.
    pub topic: String,
    /// Publisher's MQTT client id.
    pub client_id: String,
    /// Reason code and detail.
    pub reason: String,
    /// The original payload bytes.
    pub payload: Vec<u8>,
}

/// The `dead_letters` table.
#[derive(Clone, Debug)]
pub struct DeadLetterRows {
    pub(crate) db: Database,
}

impl DeadLetterRows {
    /// Deletes up to `batch` of the oldest dead letters received before `cutoff` (retention);
    /// returns how many. Call again while it returns `batch`.
    pub async fn delete_received_before(
        &self,
        cutoff: DateTime<Utc>,
        batch: i64,
    ) -> Result<u64, DbError> {
        // Ids are UUIDv7: their order is the order the letters arrived in.
        const AGING: crate::Aging = crate::Aging {
            table: "dead_letters",
            pg_key: "id",
            time: "received_at",
        };
        crate::delete_older_than(&self.db, &AGING, cutoff, batch).await
    }

    /// Inserts dead letters in one transaction, idempotent by id. Returns the rows added.
    pub async fn insert(&self, letters: &[DeadLetter]) -> Result<u64, DbError> {
        if letters.is_empty() {
            return Ok(0);
        }
        match &self.db.pool {
            Pool::Postgres(pool) => {
                let ids: Vec<Uuid> = letters.iter().map(|l| l.id).collect();
                let times: Vec<DateTime<Utc>> = letters.iter().map(|l| l.received_at).collect();
                let topics: Vec<&str> = letters.iter().map(|l| l.topic.as_str()).collect();
                let clients: Vec<&str> = letters.iter().map(|l| l.client_id.as_str()).collect();
                let reasons: Vec<String> = letters.iter().map(DeadLetter::reason_text).collect();
                let payloads: Vec<&[u8]> = letters.iter().map(|l| l.payload.as_slice()).collect();
                let result = sqlx::query(
                    "INSERT INTO dead_letters (id, received_at, topic, client_id, reason, payload)
                     SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[], $4::text[],
                                          $5::text[], $6::bytea[])
                     ON CONFLICT (id) DO NOTHING",
                )
                .bind(&ids)
                .bind(&times)
                .bind(&topics)
                .bind(&clients)
                .bind(&reasons)
                .bind(&payloads)
                .execute(pool)
                .await?;
                Ok(result.rows_affected())
            }
            Pool::Sqlite(pool) => sqlite_insert(
                self.db.sqlite_writer.as_ref().unwrap_or(pool),
                "INSERT INTO dead_letters (id, received_at, topic, client_id, reason, payload) ",
                " ON CONFLICT (id) DO NOTHING",
                letters,
                |row, l| {
                    row.push_bind(l.id.to_string())
                        .push_bind(sqlite_time(&l.received_at))
                        .push_bind(l.topic.as_str())
                        .push_bind(l.client_id.as_str())
                        .push_bind(l.reason_text())
                        .push_bind(l.payload.as_slice());
                },
            )
            .await,
        }
    }

    /// The newest `limit` dead letters, newest first.
    pub async fn newest(&self, limit: i64) -> Result<Vec<DeadLetterRow>, DbError> {
        const SQL: &str = "SELECT id, received_at, topic, client_id, reason, payload
                           FROM dead_letters ORDER BY received_at DESC, id DESC LIMIT $1";
        match &self.db.pool {
            Pool::Postgres(pool) => {
                let rows = sqlx::query(SQL).bind(limit).fetch_all(pool).await?;
                rows.iter()
                    .map(|row| {
                        Ok(DeadLetterRow {
                            id: row.try_get("id")?,
                            received_at: row.try_get("received_at")?,
                            topic: row.try_get("topic")?,
                            client_id: row.try_get("client_id")?,
                            reason: row.try_get("reason")?,
                            payload: row.try_get("payload")?,
                        })
                    })
                    .collect()
            }
            Pool::Sqlite(pool) => {
                let rows = sqlx::query(SQL).bind(limit).fetch_all(pool).await?;
                rows.iter()
                    .map(|row| {
                        Ok(DeadLetterRow {
                            id: parse_uuid(row.try_get("id")?)?,
                            received_at: parse_time(row.try_get("received_at")?)?,
                            topic: row.try_get("topic")?,
                            client_id: row.try_get("client_id")?,
                            reason: row.try_get("reason")?,
                            payload: row.try_get("payload")?,
                        })
                    })
                    .collect()
            }
        }
    }
}
