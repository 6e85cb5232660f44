//! `sensor_data`: every accepted reading, one row each, unique by event id.

use ecars_model::{TelemetryReading, Vin};
use sqlx::query_builder::Separated;
use sqlx::{QueryBuilder, Row, Sqlite, SqliteConnection, SqlitePool};

use uuid::Uuid;

use crate::day_partitions::{self, PreparedDays, DEFAULT_PARTITION, TABLE};
use crate::rollups;
use crate::{on_pool, parse_time, parse_uuid, parse_vin, sqlite_time, Database, DbError, Pool};

/// Rows per SQLite statement. A fixed size lets one prepared statement serve every full chunk
/// (preparing a statement of thousands of parameters per batch cost more than the insert).
const SQLITE_ROWS_PER_STATEMENT: usize = 100;

/// The columns of a reading, in the order the queries here name them ([`push_reading`] and
/// [`ReadingArrays`] follow it).
pub(crate) const COLUMNS: &str = r#"event_id, received_at, vin, name, profile, "range", mpge, battery,
                         malfunction, speed, latitude, longitude, date"#;

/// Binds a reading's columns, in [`COLUMNS`] order, to a row of a SQLite multi-row insert.
pub(crate) fn push_reading(row: &mut Separated<'_, Sqlite, &'static str>, r: &TelemetryReading) {
    // Encoded straight into its text: `to_string` goes through the formatting machinery.
    let event_id = r.event_id.hyphenated();
    row.push_bind(String::from(
        &*event_id.encode_lower(&mut Uuid::encode_buffer()),
    ))
    .push_bind(sqlite_time(&r.received_at))
    .push_bind(r.vin.as_str())
    .push_bind(r.name.as_deref())
    .push_bind(r.profile.as_deref())
    .push_bind(r.range)
    .push_bind(r.mpge)
    .push_bind(r.battery)
    .push_bind(r.malfunction)
    .push_bind(r.speed)
    .push_bind(r.latitude)
    .push_bind(r.longitude)
    .push_bind(sqlite_time(&r.date));
}

/// The `UNNEST` arrays of a reading's columns, in [`COLUMNS`] order (PostgreSQL).
pub(crate) const PG_ARRAYS: &str = "$1::uuid[], $2::timestamptz[], $3::text[], $4::text[], \
     $5::text[], $6::float8[], $7::float8[], $8::float8[], $9::bool[], $10::float8[], \
     $11::float8[], $12::float8[], $13::timestamptz[]";

/// Readings as one PostgreSQL array per column, bound in [`COLUMNS`] order as [`PG_ARRAYS`].
pub(crate) struct ReadingArrays<'a> {
    event_ids: Vec<uuid::Uuid>,
    received_ats: Vec<chrono::DateTime<chrono::Utc>>,
    vins: Vec<&'a str>,
    names: Vec<Option<&'a str>>,
    profiles: Vec<Option<&'a str>>,
    ranges: Vec<Option<f64>>,
    mpges: Vec<Option<f64>>,
    batteries: Vec<Option<f64>>,
    malfunctions: Vec<Option<bool>>,
    speeds: Vec<Option<f64>>,
    latitudes: Vec<Option<f64>>,
    longitudes: Vec<Option<f64>>,
    dates: Vec<chrono::DateTime<chrono::Utc>>,
}

impl<'a> ReadingArrays<'a> {
    /// The arrays of these readings.
    pub(crate) fn of(readings: impl Iterator<Item = &'a TelemetryReading>) -> ReadingArrays<'a> {
        let mut arrays = ReadingArrays {
            event_ids: Vec::new(),
            received_ats: Vec::new(),
            vins: Vec::new(),
            names: Vec::new(),
            profiles: Vec::new(),
            ranges: Vec::new(),
            mpges: Vec::new(),
            batteries: Vec::new(),
            malfunctions: Vec::new(),
            speeds: Vec::new(),
            latitudes: Vec::new(),
            longitudes: Vec::new(),
            dates: Vec::new(),
        };
        for r in readings {
            arrays.event_ids.push(r.event_id);
            arrays.received_ats.push(r.received_at);
            arrays.vins.push(r.vin.as_str());
            arrays.names.push(r.name.as_deref());
            arrays.profiles.push(r.profile.as_deref());
            arrays.ranges.push(r.range);
            arrays.mpges.push(r.mpge);
            arrays.batteries.push(r.battery);
            arrays.malfunctions.push(r.malfunction);
            arrays.speeds.push(r.speed);
            arrays.latitudes.push(r.latitude);
            arrays.longitudes.push(r.longitude);
            arrays.dates.push(r.date);
        }
        arrays
    }

    /// `query` with the arrays bound as its parameters `$1` to `$13`.
    pub(crate) fn bind<'q>(
        &'q self,
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(&self.event_ids)
            .bind(&self.received_ats)
            .bind(&self.vins)
            .bind(&self.names)
            .bind(&self.profiles)
            .bind(&self.ranges)
            .bind(&self.mpges)
            .bind(&self.batteries)
            .bind(&self.malfunctions)
            .bind(&self.speeds)
            .bind(&self.latitudes)
            .bind(&self.longitudes)
            .bind(&self.dates)
    }
}

/// The ids one committed insert gave the rows it added: every one is in `(after, through]`
/// (PostgreSQL may leave ids in between unused), and a writer that commits one batch at a time
/// (`ecars up`) commits the next batch's rows after `through`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct StoredBatch {
    /// Rows added (duplicates add none).
    pub added: u64,
    /// The ids of the rows added are greater than this.
    pub after: i64,
    /// The greatest id of a row added (`after` when none was).
    pub through: i64,
}

/// A batch the persistence worker committed, handed on to a reader of the sensor rows in
/// commit order (the anomaly worker in `ecars up`).
#[derive(Clone, Debug)]
pub struct CommittedReadings {
    /// The ids its rows took.
    pub ids: StoredBatch,
    /// Its readings when they are exactly the rows added (`None` when some were stored already:
    /// the reader reads the rows instead).
    pub readings: Option<Vec<TelemetryReading>>,
}

/// What [`insert_and_queue_pg`] answers: the queue row's id (`None` when no row was added), how
/// many rows were added, and their least and greatest ids.
type InsertedAndQueued = (Option<i64>, i64, Option<i64>, Option<i64>);

/// Inserts readings into `table` (`sensor_data` or one of its partitions) and queues the ids of
/// the rows it added for the rollup pass, in one statement (PostgreSQL): one round trip, and
/// its own transaction, so the rows and the queue row naming them commit together. What comes
/// back is one row, not a row per reading.
async fn insert_and_queue_pg(
    conn: &mut sqlx::PgConnection,
    table: &str,
    arrays: &ReadingArrays<'_>,
) -> Result<InsertedAndQueued, sqlx::Error> {
    // (event_id, date): a partitioned table's unique key includes its partition key; the same
    // as event_id alone, which is derived from the date. The queue row is written only when a
    // row was added (`HAVING`).
    let sql = format!(
        "WITH added AS (
             INSERT INTO {table} ({COLUMNS}) SELECT * FROM UNNEST({PG_ARRAYS})
             ON CONFLICT (event_id, date) DO NOTHING RETURNING id, date),
         queued AS (
             INSERT INTO rollup_batches (row_ranges, first_date, last_date)
             SELECT range_agg(int8range(id, id, '[]')), min(date), max(date) FROM added
             HAVING count(*) > 0
             RETURNING id)
         SELECT (SELECT id FROM queued), count(*), min(id), max(id) FROM added"
    );
    let row = arrays
        .bind(sqlx::query(sqlx::AssertSqlSafe(sql)))
        .fetch_one(conn)
        .await?;
    Ok((
        row.try_get(0)?,
        row.try_get(1)?,
        row.try_get(2)?,
        row.try_get(3)?,
    ))
}

/// The greatest id of a stored row, 0 when there is none.
const LAST_ID: &str = "SELECT COALESCE(MAX(id), 0) FROM sensor_data";

/// The `sensor_data` table.
#[derive(Clone, Debug)]
pub struct SensorRows {
    pub(crate) db: Database,
}

impl SensorRows {
    /// Inserts readings in one transaction, with the ids of the rows it added queued for the
    /// rollups and the cars' latest state ([`crate::rollups`], [`crate::vehicle_states`]); a
    /// reading whose `event_id` is stored already adds nothing. Returns the number of rows
    /// added.
    pub async fn insert(&self, readings: &[TelemetryReading]) -> Result<u64, DbError> {
        Ok(self.insert_batch(readings).await?.added)
    }

    /// [`SensorRows::insert`], saying which ids the rows it added took.
    pub async fn insert_batch(
        &self,
        readings: &[TelemetryReading],
    ) -> Result<StoredBatch, DbError> {
        if readings.is_empty() {
            return Ok(StoredBatch::default());
        }
        let (stored, queued, summary) = self.write_batch(readings).await?;
        // Kept only when the rows added are exactly `readings`: a redelivered reading would be
        // counted twice.
        if let Some(batch) = queued {
            if stored.added == readings.len() as u64 {
                self.db.queued.keep(batch, summary);
            }
        }
        Ok(stored)
    }

    /// Writes a batch (not empty) and queues it for the rollup pass; returns its ids, its place
    /// in the queue (`None` when it added no row), and the summary of `readings` the pass takes
    /// from memory. The summary is worked out while the database writes the batch (`biased`:
    /// the write goes first, so its statement is on its way) instead of after the commit. (The
    /// summary is not free: without it the write path ran 0.94 times the one before fleet
    /// state instead of 0.90, 1,000 cars a batch; computed beside the statement or after it
    /// made no difference to see on two cores.)
    async fn write_batch(
        &self,
        readings: &[TelemetryReading],
    ) -> Result<
        (
            StoredBatch,
            Option<rollups::QueuedBatch>,
            rollups::BatchSummary,
        ),
        DbError,
    > {
        let summarise = async { rollups::BatchSummary::of(readings) };
        let (written, summary) = match &self.db.pool {
            Pool::Postgres(pool) => {
                // A connection first: taking one from the pool may wait, and the summary would
                // be worked out before the statement left.
                let mut conn = pool.acquire().await?;
                tokio::join!(biased; self.write_pg(&mut conn, readings), summarise)
            }
            Pool::Sqlite(pool) => {
                let pool = self.db.sqlite_writer.as_ref().unwrap_or(pool);
                tokio::join!(biased; self.write_sqlite(pool, readings), summarise)
            }
        };
        let (stored, queued) = written?;
        Ok((stored, queued, summary))
    }

    /// [`SensorRows::write_batch`] on PostgreSQL.
    async fn write_pg(
        &self,
        conn: &mut sqlx::PgConnection,
        readings: &[TelemetryReading],
    ) -> Result<(StoredBatch, Option<rollups::QueuedBatch>), DbError> {
        let arrays = ReadingArrays::of(readings.iter());
        // PostgreSQL routes each row of an insert into the partitioned table to its
        // partition; a batch dated on one day goes straight into that day's partition
        // instead (the same rows and keys, measured 5–7 % faster). A day without a
        // partition (older than the ones kept, or not prepared yet) has its rows in the
        // default partition, through the parent.
        let day = day_partitions::one_day(readings.iter().map(|r| r.date))
            .filter(|day| !self.db.missing_day.is(*day));
        let into_day = match day {
            Some(day) => {
                let table = day_partitions::partition_name(day);
                match insert_and_queue_pg(conn, &table, &arrays).await {
                    // 42P01: no such table.
                    Err(sqlx::Error::Database(e)) if e.code().as_deref() == Some("42P01") => {
                        self.db.missing_day.set(day);
                        None
                    }
                    written => Some(written?),
                }
            }
            None => None,
        };
        let (queued, added, least, greatest) = match into_day {
            Some(written) => written,
            None => insert_and_queue_pg(conn, TABLE, &arrays).await?,
        };
        let added = u64::try_from(added).unwrap_or_default();
        let queued = queued
            .zip(least)
            .map(|(id, first_row)| rollups::QueuedBatch { id, first_row });
        // A sequence hands out ids in order, also to rows ON CONFLICT then skips: the
        // rows added are within (least - 1, greatest], with unused ids between them.
        let stored = match (least, greatest) {
            (Some(least), Some(greatest)) => StoredBatch {
                added,
                after: least - 1,
                through: greatest,
            },
            _ => StoredBatch::default(),
        };
        Ok((stored, queued))
    }

    /// [`SensorRows::write_batch`] on SQLite, on the writer connection's pool.
    async fn write_sqlite(
        &self,
        pool: &SqlitePool,
        readings: &[TelemetryReading],
    ) -> Result<(StoredBatch, Option<rollups::QueuedBatch>), DbError> {
        // One writer at a time, and a new row's id is the greatest so far plus one: the
        // rows this transaction adds are the ids after the greatest before it (no
        // RETURNING, which cost SQLite a quarter of its throughput).
        let mut tx = pool.begin_with("BEGIN IMMEDIATE").await?;
        let before: i64 = sqlx::query_scalar(LAST_ID).fetch_one(&mut *tx).await?;
        // OR IGNORE: the only constraint a row can break is the idempotence key's
        // uniqueness, (date, event id) (the NOT NULL columns are bound from required
        // fields), where it does what ON CONFLICT DO NOTHING does. A statement that
        // can abort instead (a NOT NULL check's default) makes SQLite copy every page
        // it changes into a statement journal first, to undo it alone: a quarter more
        // CPU per batch, measured.
        let added = sqlite_insert_in(
            &mut tx,
            r#"INSERT OR IGNORE INTO sensor_data
                         (event_id, received_at, vin, name, profile, "range", mpge, battery,
                          malfunction, speed, latitude, longitude, date) "#,
            "",
            readings,
            push_reading,
        )
        .await?;
        let mut queued = None;
        let mut through = before;
        if added > 0 {
            through = sqlx::query_scalar(LAST_ID).fetch_one(&mut *tx).await?;
            queued = Some(rollups::QueuedBatch {
                id: rollups::queue_sqlite(&mut tx, before + 1, through).await?,
                first_row: before + 1,
            });
        }
        tx.commit().await?;
        let stored = StoredBatch {
            added,
            after: before,
            through,
        };
        Ok((stored, queued))
    }

    /// Up to `limit` rows with an id in `(after, through]`, in id order, with their ids: what a
    /// reader of the table in commit order ([`crate::sensor_cursors`]) missed.
    pub async fn between(
        &self,
        after: i64,
        through: i64,
        limit: i64,
    ) -> Result<Vec<(i64, TelemetryReading)>, DbError> {
        let sql = format!(
            "SELECT id, {COLUMNS} FROM sensor_data WHERE id > $1 AND id <= $2 ORDER BY id LIMIT $3"
        );
        match &self.db.pool {
            Pool::Postgres(pool) => {
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(after)
                    .bind(through)
                    .bind(limit)
                    .fetch_all(pool)
                    .await?;
                rows.iter()
                    .map(|row| Ok((row.try_get("id")?, pg_reading(row)?)))
                    .collect()
            }
            Pool::Sqlite(pool) => {
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(after)
                    .bind(through)
                    .bind(limit)
                    .fetch_all(pool)
                    .await?;
                rows.iter()
                    .map(|row| Ok((row.try_get("id")?, sqlite_reading(row)?)))
                    .collect()
            }
        }
    }

    /// The greatest id of a stored row (0 when there is none).
    pub async fn last_id(&self) -> Result<i64, DbError> {
        on_pool!(self.db, |pool| Ok(sqlx::query_scalar::<_, i64>(LAST_ID)
            .fetch_one(pool)
            .await?))
    }

    /// The newest `limit` readings of one car, newest first.
    pub async fn of_vehicle(
        &self,
        vin: &Vin,
        limit: i64,
    ) -> Result<Vec<TelemetryReading>, DbError> {
        match &self.db.pool {
            Pool::Postgres(pool) => {
                let sql = format!(
                    "SELECT {COLUMNS} FROM sensor_data WHERE vin = $1 ORDER BY date DESC, event_id DESC LIMIT $2"
                );
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(vin.as_str())
                    .bind(limit)
                    .fetch_all(pool)
                    .await?;
                rows.iter().map(pg_reading).collect()
            }
            Pool::Sqlite(pool) => {
                let sql = format!(
                    "SELECT {COLUMNS} FROM sensor_data WHERE vin = ?1 ORDER BY date DESC, event_id DESC LIMIT ?2"
                );
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(vin.as_str())
                    .bind(limit)
                    .fetch_all(pool)
                    .await?;
                rows.iter().map(sqlite_reading).collect()
            }
        }
    }

    /// A page of one car's readings for its history: up to `limit` dated before `to`, after
    /// the event time `after` (date, then event id; start at the range's start and the nil
    /// id), oldest first. The next page starts after the last reading of this one; each page
    /// is one short query, so a slow reader of a long range holds no connection.
    pub async fn history_page(
        &self,
        vin: &Vin,
        after: (chrono::DateTime<chrono::Utc>, Uuid),
        to: chrono::DateTime<chrono::Utc>,
        limit: i64,
    ) -> Result<Vec<TelemetryReading>, DbError> {
        let sql = format!(
            "SELECT {COLUMNS} FROM sensor_data
             WHERE vin = $1 AND date >= $2 AND (date, event_id) > ($2, $3) AND date < $4
             ORDER BY date, event_id LIMIT $5"
        );
        match &self.db.pool {
            Pool::Postgres(pool) => {
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(vin.as_str())
                    .bind(after.0)
                    .bind(after.1)
                    .bind(to)
                    .bind(limit)
                    .fetch_all(pool)
                    .await?;
                rows.iter().map(pg_reading).collect()
            }
            Pool::Sqlite(pool) => {
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(vin.as_str())
                    .bind(sqlite_time(&after.0))
                    .bind(after.1.to_string())
                    .bind(sqlite_time(&to))
                    .bind(limit)
                    .fetch_all(pool)
                    .await?;
                rows.iter().map(sqlite_reading).collect()
            }
        }
    }

    /// Makes sure the readings dated on each day from `first` to `last` (UTC, both included)
    /// have a partition of their own, so retention can drop them whole (PostgreSQL; SQLite has
    /// no partitions, and nothing to do).
    pub async fn prepare_days(
        &self,
        first: chrono::NaiveDate,
        last: chrono::NaiveDate,
    ) -> Result<PreparedDays, DbError> {
        match &self.db.pool {
            Pool::Postgres(pool) => {
                day_partitions::prepare(pool, first, last, &self.db.missing_day).await
            }
            Pool::Sqlite(_) => Ok(PreparedDays::default()),
        }
    }

    /// Retention, the whole days: drops the partitions of the days that ended by `cutoff`
    /// (PostgreSQL; none on SQLite); returns how many.
    pub async fn drop_days_before(
        &self,
        cutoff: chrono::DateTime<chrono::Utc>,
    ) -> Result<u64, DbError> {
        match &self.db.pool {
            Pool::Postgres(pool) => day_partitions::drop_expired(pool, cutoff).await,
            Pool::Sqlite(_) => Ok(0),
        }
    }

    /// Retention, row by row: deletes up to `batch` of the rows dated before `cutoff` that no
    /// day's partition holds (PostgreSQL: those of the default partition; SQLite: the oldest
    /// rows, in the order they were added); returns how many. Call again while it returns
    /// `batch`.
    pub async fn delete_dated_before(
        &self,
        cutoff: chrono::DateTime<chrono::Utc>,
        batch: i64,
    ) -> Result<u64, DbError> {
        match &self.db.pool {
            Pool::Postgres(pool) => {
                // By ctid: the default partition has no index on its dates, and is small.
                let sql = format!(
                    "DELETE FROM {DEFAULT_PARTITION} WHERE ctid = ANY(ARRAY(
                       SELECT ctid FROM {DEFAULT_PARTITION} WHERE date < $1 LIMIT $2))"
                );
                Ok(sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(cutoff)
                    .bind(batch)
                    .execute(pool)
                    .await?
                    .rows_affected())
            }
            Pool::Sqlite(_) => {
                const AGING: crate::Aging = crate::Aging {
                    table: "sensor_data",
                    pg_key: "id",
                    time: "date",
                };
                crate::delete_older_than(&self.db, &AGING, cutoff, batch).await
            }
        }
    }

    /// Counts the rows (tests and benchmarks).
    pub async fn count(&self) -> Result<i64, DbError> {
        const SQL: &str = "SELECT COUNT(*) FROM sensor_data";
        Ok(on_pool!(self.db, |pool| sqlx::query_scalar(SQL)
            .fetch_one(pool)
            .await?))
    }
}

/// Inserts `items` in one SQLite transaction, [`SQLITE_ROWS_PER_STATEMENT`] rows per statement;
/// returns the rows added.
pub(crate) async fn sqlite_insert<'a, T>(
    pool: &SqlitePool,
    insert: &'static str,
    on_conflict: &'static str,
    items: &'a [T],
    bind_row: impl Fn(&mut Separated<'_, Sqlite, &'static str>, &'a T),
) -> Result<u64, DbError> {
    let mut tx = pool.begin().await?;
    let added = sqlite_insert_in(&mut tx, insert, on_conflict, items, bind_row).await?;
    tx.commit().await?;
    Ok(added)
}

/// Inserts `items` within the transaction or connection `conn`, [`SQLITE_ROWS_PER_STATEMENT`]
/// rows per statement; returns the rows added.
pub(crate) async fn sqlite_insert_in<'a, T>(
    conn: &mut SqliteConnection,
    insert: &'static str,
    on_conflict: &'static str,
    items: &'a [T],
    bind_row: impl Fn(&mut Separated<'_, Sqlite, &'static str>, &'a T),
) -> Result<u64, DbError> {
    let mut added = 0;
    for chunk in items.chunks(SQLITE_ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::new(insert);
        query.push_values(chunk, |mut row, item| bind_row(&mut row, item));
        query.push(on_conflict);
        added += query.build().execute(&mut *conn).await?.rows_affected();
    }
    Ok(added)
}

pub(crate) fn pg_reading(row: &sqlx::postgres::PgRow) -> Result<TelemetryReading, DbError> {
    Ok(TelemetryReading {
        event_id: row.try_get("event_id")?,
        received_at: row.try_get("received_at")?,
        vin: parse_vin(row.try_get("vin")?)?,
        name: row.try_get("name")?,
        profile: row.try_get("profile")?,
        range: row.try_get("range")?,
        mpge: row.try_get("mpge")?,
        battery: row.try_get("battery")?,
        malfunction: row.try_get("malfunction")?,
        speed: row.try_get("speed")?,
        latitude: row.try_get("latitude")?,
        longitude: row.try_get("longitude")?,
        date: row.try_get("date")?,
    })
}

pub(crate) fn sqlite_reading(row: &sqlx::sqlite::SqliteRow) -> Result<TelemetryReading, DbError> {
    Ok(TelemetryReading {
        event_id: parse_uuid(row.try_get("event_id")?)?,
        received_at: parse_time(row.try_get("received_at")?)?,
        vin: parse_vin(row.try_get("vin")?)?,
        name: row.try_get("name")?,
        profile: row.try_get("profile")?,
        range: row.try_get("range")?,
        mpge: row.try_get("mpge")?,
        battery: row.try_get("battery")?,
        malfunction: row.try_get("malfunction")?,
        speed: row.try_get("speed")?,
        latitude: row.try_get("latitude")?,
        longitude: row.try_get("longitude")?,
        date: parse_time(row.try_get("date")?)?,
    })
}
