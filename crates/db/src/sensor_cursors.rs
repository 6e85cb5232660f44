//! `sensor_cursors`: how far a reader of `sensor_data` in id order got, stored by the reader in
//! the transaction of what it made of the rows (the anomaly worker's states and Cases, through
//! [`crate::CaseOutbox::commit`]).
//!
//! In `ecars up` one persistence worker commits one batch at a time, so ids grow in commit
//! order, and "every row up to `through_id` is handled" is a complete record of a reader's
//! progress: after a crash it reads the rows after its cursor again.

use crate::{on_pool, on_write_pool, Database, DbError};

/// A reader's position, to store with its results: every row with an id up to `through_id`
/// is handled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SensorCursor<'a> {
    /// The reader.
    pub consumer: &'a str,
    /// The greatest id handled.
    pub through_id: i64,
}

/// Upserts a cursor (both databases; `$1` consumer, `$2` id).
pub(crate) const UPSERT: &str = "INSERT INTO sensor_cursors (consumer, through_id) VALUES ($1, $2)
     ON CONFLICT (consumer) DO UPDATE SET through_id = excluded.through_id";

/// A consumer's cursor (`$1` consumer).
const CURSOR: &str = "SELECT through_id FROM sensor_cursors WHERE consumer = $1";

/// The `sensor_cursors` table.
#[derive(Clone, Debug)]
pub struct SensorCursors {
    pub(crate) db: Database,
}

impl SensorCursors {
    /// `consumer`'s cursor; a consumer without one starts at the newest row stored now (the
    /// rows before it were handled by whatever ran before it, as the in-process bus it
    /// replaces started empty).
    pub async fn start(&self, consumer: &str) -> Result<i64, DbError> {
        on_write_pool!(self.db, |pool| {
            let mut tx = pool.begin().await?;
            let stored: Option<i64> = sqlx::query_scalar(CURSOR)
                .bind(consumer)
                .fetch_optional(&mut *tx)
                .await?;
            if let Some(through) = stored {
                tx.commit().await?;
                return Ok(through);
            }
            // The newest row is looked for only when the consumer has no cursor: on PostgreSQL
            // the ids have a BRIN index, not a B-tree, and `MAX(id)` reads every partition.
            // `WHERE true` keeps SQLite from reading ON CONFLICT as part of the SELECT.
            sqlx::query(
                "INSERT INTO sensor_cursors (consumer, through_id)
                 SELECT $1, COALESCE(MAX(id), 0) FROM sensor_data WHERE true
                 ON CONFLICT (consumer) DO NOTHING",
            )
            .bind(consumer)
            .execute(&mut *tx)
            .await?;
            let through: i64 = sqlx::query_scalar(CURSOR)
                .bind(consumer)
                .fetch_one(&mut *tx)
                .await?;
            tx.commit().await?;
            Ok(through)
        })
    }

    /// `consumer`'s stored cursor, if it has one.
    pub async fn get(&self, consumer: &str) -> Result<Option<i64>, DbError> {
        on_pool!(self.db, |pool| Ok(sqlx::query_scalar(CURSOR)
            .bind(consumer)
            .fetch_optional(pool)
            .await?))
    }
}
