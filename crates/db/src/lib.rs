//! The ecars database: PostgreSQL (production, scale-out) or SQLite (the embedded default)
//! behind one [`Database`], with every migration, and one module per table:
//!
//! - [`sensor_rows`]: `sensor_data`, the accepted readings, written in batches;
//! - [`dead_letter_rows`]: `dead_letters`, the refused messages with their bytes and reason;
//! - [`vehicle_states`]: `vehicle_state`, each car's latest state (the fleet list);
//! - [`rollups`]: `rollup_1m` and `rollup_1h`, each car's readings summarised per minute and
//!   per hour (the history API's long ranges);
//! - [`detector_states`]: `anomaly_vehicle_state`, what the anomaly detector remembers per car;
//! - [`case_outbox`]: `case_outbox`, one row per anomaly episode and its Salesforce Case sync.
//!
//! Writes are idempotent (unique event ids, upserts by key), so redelivered records change
//! nothing. The backend stays private: callers see tables, not pools.

pub mod case_outbox;
mod day_partitions;
pub mod dead_letter_rows;
pub mod detector_states;
pub mod rollups;
pub mod sensor_cursors;
pub mod sensor_rows;
pub mod vehicle_states;

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeZone, Utc};
use clap::Args;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use uuid::Uuid;

pub use case_outbox::CaseOutbox;
pub use day_partitions::PreparedDays;
pub use dead_letter_rows::DeadLetterRows;
pub use detector_states::DetectorStates;
pub use rollups::Rollups;
pub use sensor_cursors::SensorCursors;
pub use sensor_rows::SensorRows;
pub use vehicle_states::VehicleStates;

/// Where the data goes.
#[derive(Clone, Debug, Args)]
pub struct DatabaseConfig {
    /// Database URL: `postgres://user:password@host/db` or `sqlite://path.db` (created when
    /// missing). Prefer the environment variable: a password on the command line shows in `ps`.
    #[arg(
        long = "database-url",
        env = "DATABASE_URL",
        default_value = "sqlite://ecars.db",
        hide_env_values = true
    )]
    pub url: String,
}

/// Errors of the database.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// `DATABASE_URL` is neither `postgres://` nor `sqlite:`.
    #[error("invalid setting --database-url / DATABASE_URL: {0}")]
    InvalidUrl(String),
    /// The database refused or could not be reached.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A stored value could not be read back.
    #[error("stored value: {0}")]
    Decode(String),
}

impl DbError {
    /// Whether retrying later may succeed (the database is down or overloaded), as opposed to a
    /// request that will fail every time.
    pub fn is_transient(&self) -> bool {
        match self {
            DbError::Database(e) => match e {
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_) => true,
                sqlx::Error::Database(db) => db.code().is_some_and(|code| {
                    // 08: connection exception, 53: insufficient resources, 57: operator
                    // intervention (shutdown).
                    is_conflict_code(&code)
                        || code.starts_with("08")
                        || code.starts_with("53")
                        || code.starts_with("57")
                }),
                _ => false,
            },
            _ => false,
        }
    }

    /// Whether the write lost a race with another transaction and succeeds when retried: a
    /// serialization failure or deadlock on PostgreSQL, a locked file on SQLite.
    pub fn is_conflict(&self) -> bool {
        match self {
            DbError::Database(sqlx::Error::Database(db)) => {
                db.code().is_some_and(|code| is_conflict_code(&code))
            }
            _ => false,
        }
    }
}

/// A serialization failure or deadlock (PostgreSQL's class 40), or a SQLite file that another
/// connection kept locked past the busy timeout (5 busy, 6 locked).
fn is_conflict_code(code: &str) -> bool {
    code.starts_with("40") || code == "5" || code == "6"
}

/// The pool of whichever backend `DATABASE_URL` names.
#[derive(Clone, Debug)]
enum Pool {
    /// PostgreSQL: bulk writes through `UNNEST` arrays and JSON record sets.
    Postgres(PgPool),
    /// SQLite: multi-row `INSERT`s and `json_each`, in one transaction per batch.
    Sqlite(SqlitePool),
}

/// [`on_pool!`] for a batch writer's transaction: on SQLite, the writers' own connection
/// ([`Database`]'s `sqlite_writer`).
macro_rules! on_write_pool {
    ($db:expr, |$pool:ident| $body:expr) => {
        match &$db.pool {
            $crate::Pool::Postgres($pool) => $body,
            $crate::Pool::Sqlite($pool) => {
                let $pool = $db.sqlite_writer.as_ref().unwrap_or($pool);
                $body
            }
        }
    };
}
pub(crate) use on_write_pool;

/// Runs `$body` with `$pool` bound to whichever pool the database has: for SQL written once for
/// both backends.
macro_rules! on_pool {
    ($db:expr, |$pool:ident| $body:expr) => {
        match &$db.pool {
            $crate::Pool::Postgres($pool) => $body,
            $crate::Pool::Sqlite($pool) => $body,
        }
    };
}
pub(crate) use on_pool;

/// The database behind `DATABASE_URL`: cheap to clone, shared by every part of a process.
#[derive(Clone, Debug)]
pub struct Database {
    pool: Pool,
    /// SQLite: one connection for every write (sensor rows, the detector's states and Cases,
    /// the Case sync's and the event relay's marks, connectivity, dead letters, the rollups,
    /// retention). SQLite has one writer at a time anyway, and a connection discards its whole
    /// page cache whenever another connection wrote since its last transaction: with the
    /// writers on pooled connections in turn, every batch started cold and read its pages back
    /// from the files. A write from another connection also waits for the lock in SQLite's busy
    /// handler, which sleeps up to 100 ms between tries: the sensor rows' commits behind it
    /// waited that long, and a busy writer kept it out for seconds. On this connection writes
    /// queue in order instead. `None` on PostgreSQL.
    sqlite_writer: Option<SqlitePool>,
    /// The minute buckets of the sensor-row batches this process queued for the rollups.
    queued: std::sync::Arc<rollups::QueuedSummaries>,
    /// PostgreSQL: the last day found without a partition of `sensor_data`.
    missing_day: std::sync::Arc<day_partitions::MissingDay>,
}

/// How long a SQLite statement waits for a lock another connection holds.
const SQLITE_BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// The write-ahead log's pages (4 KiB each) past which [`Database::checkpoint`] starts it over:
/// SQLite's own default checkpoint threshold.
pub const RESTART_AFTER_PAGES: i64 = 1000;

/// How long [`Database::checkpoint`]'s `RESTART` waits for the writer and readers, holding
/// new writers back meanwhile.
pub const RESTART_WAIT: Duration = Duration::from_millis(100);

/// The size a SQLite write-ahead log is cut back to when it starts over (64 MiB).
const JOURNAL_SIZE_LIMIT: i64 = 64 * 1024 * 1024;

/// A pooled SQLite connection whose busy timeout [`Database::checkpoint`] shortened: closed
/// when dropped before its timeout is set back (an error, a cancelled task), so the pool never
/// hands it out with the shorter wait.
struct ShortWait {
    conn: sqlx::pool::PoolConnection<sqlx::Sqlite>,
    restored: bool,
}

impl Drop for ShortWait {
    fn drop(&mut self) {
        if !self.restored {
            self.conn.close_on_drop();
        }
    }
}

/// What [`Database::checkpoint`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Checkpoint {
    /// The pages in the write-ahead log.
    pub log_pages: i64,
    /// How many of them the `PASSIVE` step copied into the database file.
    pub copied: i64,
    /// Whether the `RESTART` step ran and how it ended.
    pub restart: LogRestart,
    /// How long the `PASSIVE` step took, both passes before a `RESTART` (it holds no one back,
    /// but shares the disk).
    pub passive_took: Duration,
    /// How long the `RESTART` step took (zero when not tried): new commits wait that long.
    pub restart_took: Duration,
}

/// The `RESTART` step of [`Database::checkpoint`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum LogRestart {
    /// Not tried: not asked for, the log below [`RESTART_AFTER_PAGES`], or PostgreSQL.
    #[default]
    NotTried,
    /// The log was copied completely; the next commit starts it over.
    Restarted,
    /// A reader (or another process's writer) kept it out for [`RESTART_WAIT`]: new writers
    /// waited that long for nothing, so a caller backs off before trying again.
    Busy,
}

impl Database {
    /// Connects lazily: no connection is made until first use, so a service can start while the
    /// database is still down and report it on `/readyz`.
    pub fn connect_lazy(url: &str) -> Result<Database, DbError> {
        let mut sqlite_writer = None;
        let pool = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let options =
                PgConnectOptions::from_str(url).map_err(|e| DbError::InvalidUrl(e.to_string()))?;
            Pool::Postgres(
                PgPoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(Duration::from_secs(3))
                    .connect_lazy_with(options),
            )
        } else if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(|e| DbError::InvalidUrl(e.to_string()))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                // A multi-row INSERT keeps a statement journal; past 64 KiB SQLite spills it to
                // a temporary file, a write per page per statement (about 7 % of a busy
                // `ecars up`'s CPU went into those writes). In memory it stays a copy.
                .pragma("temp_store", "memory")
                // Commits do not checkpoint the WAL ([`Database::checkpoint`] does, off their
                // path): a commit that crossed SQLite's 1,000-page mark copied the log back
                // into the database and synced it while the readings behind it waited.
                .pragma("wal_autocheckpoint", "0")
                // A log that grew (a burst, a reader that kept a `RESTART` checkpoint out) is
                // cut back to this size when it starts over, rather than kept at its largest.
                .pragma("journal_size_limit", JOURNAL_SIZE_LIMIT.to_string())
                .busy_timeout(SQLITE_BUSY_TIMEOUT);
            // Waiting for the writer is waiting for SQLite's write lock, which a batch holds
            // for its commit: as long as a busy timeout.
            sqlite_writer = Some(
                SqlitePoolOptions::new()
                    .max_connections(1)
                    .acquire_timeout(SQLITE_BUSY_TIMEOUT)
                    .connect_lazy_with(options.clone()),
            );
            Pool::Sqlite(
                SqlitePoolOptions::new()
                    .max_connections(4)
                    .acquire_timeout(Duration::from_secs(5))
                    .connect_lazy_with(options),
            )
        } else {
            return Err(DbError::InvalidUrl(format!(
                "{:?} is neither postgres://... nor sqlite:...",
                redact_url(url)
            )));
        };
        Ok(Database {
            pool,
            sqlite_writer,
            queued: Default::default(),
            missing_day: std::sync::Arc::new(day_partitions::MissingDay::new()),
        })
    }

    /// Which backend, for logs.
    pub fn backend(&self) -> &'static str {
        match self.pool {
            Pool::Postgres(_) => "postgres",
            Pool::Sqlite(_) => "sqlite",
        }
    }

    /// Applies the embedded migrations of this backend.
    pub async fn migrate(&self) -> Result<(), DbError> {
        match &self.pool {
            Pool::Postgres(pool) => sqlx::migrate!("./migrations/postgres").run(pool).await?,
            Pool::Sqlite(pool) => sqlx::migrate!("./migrations/sqlite").run(pool).await?,
        }
        Ok(())
    }

    /// Answers whether the database is reachable.
    pub async fn ping(&self) -> Result<(), DbError> {
        on_pool!(self, |pool| {
            sqlx::query("SELECT 1").execute(pool).await?;
        });
        Ok(())
    }

    /// Copies what the write-ahead log holds back into the database file and starts the log
    /// over (SQLite); commits leave this to a task that calls it every second. PostgreSQL
    /// checkpoints by itself: [`Checkpoint::default`].
    ///
    /// Two steps. A `PASSIVE` checkpoint copies the log without waiting for readers or
    /// writers. But the log only starts over when a writer finds all of it copied and no
    /// reader still using it, and under a steady stream of commits a `PASSIVE` checkpoint never
    /// catches up with the commits made while it ran: the log grew without end (3.5 GB in a
    /// one-minute benchmark at 30,000 readings/s, and every new page of it cost the filesystem
    /// a zeroed block). So once the log holds [`RESTART_AFTER_PAGES`], a `RESTART` checkpoint
    /// follows (after a second `PASSIVE`): it copies the few pages committed since and makes
    /// the next commit start the log over. It holds new writers back while it waits for
    /// readers, so it waits at most [`RESTART_WAIT`] and otherwise reports
    /// [`LogRestart::Busy`]; `restart: false` skips it (a caller backing off from a reader that
    /// does not end).
    pub async fn checkpoint(&self, restart: bool) -> Result<Checkpoint, DbError> {
        let Pool::Sqlite(pool) = &self.pool else {
            return Ok(Checkpoint::default());
        };
        let mut conn = pool.acquire().await?;
        let started = std::time::Instant::now();
        let (_busy, log_pages, copied): (i64, i64, i64) =
            sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
                .fetch_one(&mut *conn)
                .await?;
        let mut checkpoint = Checkpoint {
            log_pages,
            copied,
            restart: LogRestart::NotTried,
            passive_took: started.elapsed(),
            restart_took: Duration::ZERO,
        };
        if !restart || log_pages < RESTART_AFTER_PAGES {
            return Ok(checkpoint);
        }
        // The `RESTART` step holds commits back while it syncs the log, copies what the
        // `PASSIVE` step left and syncs the database file. A second `PASSIVE` first copies
        // what was committed while the first ran, so the step that blocks has less left:
        // 25 instead of 45 ms at a median under 40,000 readings/s (about a second of commits
        // in the log), measured by `ecars_sqlite_checkpoint_seconds`.
        sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
            .execute(&mut *conn)
            .await?;
        checkpoint.passive_took = started.elapsed();
        let mut short = ShortWait {
            conn,
            restored: false,
        };
        let set_wait = |wait: Duration| format!("PRAGMA busy_timeout = {}", wait.as_millis());
        sqlx::query(sqlx::AssertSqlSafe(set_wait(RESTART_WAIT)))
            .execute(&mut *short.conn)
            .await?;
        let restarting = std::time::Instant::now();
        let (busy, _, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(RESTART)")
            .fetch_one(&mut *short.conn)
            .await?;
        checkpoint.restart_took = restarting.elapsed();
        sqlx::query(sqlx::AssertSqlSafe(set_wait(SQLITE_BUSY_TIMEOUT)))
            .execute(&mut *short.conn)
            .await?;
        short.restored = true;
        checkpoint.restart = match busy {
            0 => LogRestart::Restarted,
            _ => LogRestart::Busy,
        };
        Ok(checkpoint)
    }

    /// Closes the pools, waiting for connections to be returned.
    pub async fn close(&self) {
        if let Some(writer) = &self.sqlite_writer {
            writer.close().await;
        }
        on_pool!(self, |pool| pool.close().await)
    }

    /// The accepted readings.
    pub fn sensor_rows(&self) -> SensorRows {
        SensorRows { db: self.clone() }
    }

    /// How far readers of the sensor rows in id order got.
    pub fn sensor_cursors(&self) -> SensorCursors {
        SensorCursors { db: self.clone() }
    }

    /// The refused messages.
    pub fn dead_letter_rows(&self) -> DeadLetterRows {
        DeadLetterRows { db: self.clone() }
    }

    /// Each car's latest state.
    pub fn vehicle_states(&self) -> VehicleStates {
        VehicleStates { db: self.clone() }
    }

    /// The per-minute and per-hour summaries of each car's readings.
    pub fn rollups(&self) -> Rollups {
        Rollups { db: self.clone() }
    }

    /// The anomaly detector's state of each car.
    pub fn detector_states(&self) -> DetectorStates {
        DetectorStates { db: self.clone() }
    }

    /// The case outbox.
    pub fn case_outbox(&self) -> CaseOutbox {
        CaseOutbox { db: self.clone() }
    }
}

/// A table whose rows age out ([`crate::SensorRows::delete_dated_before`] on SQLite,
/// [`crate::DeadLetterRows::delete_received_before`]): its name, the key its rows were added
/// in (roughly arrival order) on PostgreSQL, and the time they age by.
pub(crate) struct Aging {
    pub(crate) table: &'static str,
    pub(crate) pg_key: &'static str,
    pub(crate) time: &'static str,
}

/// Deletes up to `batch` of the oldest rows of `aging` (by the key they were added in) whose
/// time is before `cutoff`; returns how many. Walking the key, not the time column, needs no
/// index of its own: rows are added in about the order they arrive, so the oldest are first.
/// A row that arrived late among older ones waits for the next pass that reaches it.
pub(crate) async fn delete_older_than(
    db: &Database,
    aging: &Aging,
    cutoff: DateTime<Utc>,
    batch: i64,
) -> Result<u64, DbError> {
    let Aging {
        table,
        pg_key,
        time,
    } = aging;
    let deleted = match &db.pool {
        Pool::Postgres(pool) => {
            let sql = format!(
                "DELETE FROM {table} WHERE {pg_key} IN
                   (SELECT {pg_key} FROM {table} ORDER BY {pg_key} LIMIT $1)
                 AND {time} < $2"
            );
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(batch)
                .bind(cutoff)
                .execute(pool)
                .await?
                .rows_affected()
        }
        Pool::Sqlite(pool) => {
            let pool = db.sqlite_writer.as_ref().unwrap_or(pool);
            let sql = format!(
                "DELETE FROM {table} WHERE rowid IN
                   (SELECT rowid FROM {table} ORDER BY rowid LIMIT $1)
                 AND {time} < $2"
            );
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(batch)
                .bind(sqlite_time(&cutoff))
                .execute(pool)
                .await?
                .rows_affected()
        }
    };
    Ok(deleted)
}

/// `column = CASE WHEN {when} THEN excluded.column ELSE {table}.column END` for each of
/// `columns`: an upsert's new values, taken only when `when` holds. Every `SET` of an upsert
/// reads the row as it was, so `when` may name the columns being replaced.
pub(crate) fn replaced_when<'c>(
    table: &str,
    columns: impl Iterator<Item = &'c str>,
    when: &str,
) -> Vec<String> {
    columns
        .map(|column| {
            format!("{column} = CASE WHEN {when} THEN excluded.{column} ELSE {table}.{column} END")
        })
        .collect()
}

/// Unix milliseconds, as the outbox tables store times (the same on both backends).
pub(crate) fn ms(time: DateTime<Utc>) -> i64 {
    time.timestamp_millis()
}

/// A time stored as Unix milliseconds.
pub(crate) fn from_ms(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms).single().unwrap_or_default()
}

/// Formats a time the way SQLite's tables store it: fixed microsecond precision and a `Z`, so
/// that text order is time order.
pub(crate) fn sqlite_time(time: &DateTime<Utc>) -> String {
    ecars_model::telemetry::format_timestamp(time)
}

/// A time SQLite stored as text.
pub(crate) fn parse_time(text: String) -> Result<DateTime<Utc>, DbError> {
    DateTime::parse_from_rfc3339(&text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| DbError::Decode(format!("time {text:?}: {e}")))
}

/// A UUID SQLite stored as text.
pub(crate) fn parse_uuid(text: String) -> Result<Uuid, DbError> {
    Uuid::parse_str(&text).map_err(|e| DbError::Decode(format!("uuid {text:?}: {e}")))
}

/// A stored VIN.
pub(crate) fn parse_vin(text: String) -> Result<ecars_model::Vin, DbError> {
    ecars_model::Vin::parse(&text).map_err(|e| DbError::Decode(e.to_string()))
}

/// A database URL with its password replaced, safe to log.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            let userinfo = &url[scheme_end + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}://{user}:***{}", &url[..scheme_end], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(redact_url("sqlite://ecars.db"), "sqlite://ecars.db");
    }

    #[test]
    fn rejects_unknown_schemes_naming_the_setting() {
        let err = Database::connect_lazy("mysql://x").unwrap_err();
        assert!(err.to_string().contains("DATABASE_URL"), "{err}");
    }
}
