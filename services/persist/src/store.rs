//! The sensor store: `sensor_data` and `dead_letters` in PostgreSQL or SQLite, written in batches.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use ecars_shared::telemetry::{format_timestamp, DeadLetter, TelemetryReading, Vin};
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::query_builder::Separated;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row, Sqlite};
use uuid::Uuid;

/// Rows per SQLite statement. A fixed size lets one prepared statement serve every full chunk
/// (preparing a statement of thousands of parameters per batch cost more than the insert).
const SQLITE_ROWS_PER_STATEMENT: usize = 100;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
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

impl StoreError {
    /// Whether retrying later may succeed (the database is down or overloaded), as opposed to a
    /// request that will fail every time.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Database(e) => match e {
                sqlx::Error::Io(_)
                | sqlx::Error::PoolTimedOut
                | sqlx::Error::PoolClosed
                | sqlx::Error::WorkerCrashed
                | sqlx::Error::Tls(_)
                | sqlx::Error::Protocol(_) => true,
                sqlx::Error::Database(db) => db.code().is_some_and(|code| {
                    // 08: connection exception, 53: insufficient resources, 57: operator
                    // intervention (shutdown), 40: serialization/deadlock; SQLite 5/6: busy/locked.
                    code.starts_with("08")
                        || code.starts_with("53")
                        || code.starts_with("57")
                        || code.starts_with("40")
                        || code == "5"
                        || code == "6"
                }),
                _ => false,
            },
            _ => false,
        }
    }
}

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

/// The database behind `DATABASE_URL`.
#[derive(Clone, Debug)]
pub enum SensorStore {
    /// PostgreSQL: bulk writes through `UNNEST` arrays.
    Postgres(PgPool),
    /// SQLite: multi-row `INSERT`s in one transaction.
    Sqlite(SqlitePool),
}

impl SensorStore {
    /// Connects lazily: no connection is made until first use, so a service can start while the
    /// database is still down and report it on `/readyz`.
    pub fn connect_lazy(url: &str) -> Result<SensorStore, StoreError> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            let options = PgConnectOptions::from_str(url)
                .map_err(|e| StoreError::InvalidUrl(e.to_string()))?;
            let pool = PgPoolOptions::new()
                .max_connections(8)
                .acquire_timeout(Duration::from_secs(3))
                .connect_lazy_with(options);
            Ok(SensorStore::Postgres(pool))
        } else if url.starts_with("sqlite:") {
            let options = SqliteConnectOptions::from_str(url)
                .map_err(|e| StoreError::InvalidUrl(e.to_string()))?
                .create_if_missing(true)
                .journal_mode(SqliteJournalMode::Wal)
                .synchronous(SqliteSynchronous::Normal)
                .busy_timeout(Duration::from_secs(5));
            let pool = SqlitePoolOptions::new()
                .max_connections(4)
                .acquire_timeout(Duration::from_secs(5))
                .connect_lazy_with(options);
            Ok(SensorStore::Sqlite(pool))
        } else {
            Err(StoreError::InvalidUrl(format!(
                "{:?} is neither postgres://... nor sqlite:...",
                redact_url(url)
            )))
        }
    }

    /// Which backend, for logs.
    pub fn backend(&self) -> &'static str {
        match self {
            SensorStore::Postgres(_) => "postgres",
            SensorStore::Sqlite(_) => "sqlite",
        }
    }

    /// Applies the embedded migrations of this backend.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        match self {
            SensorStore::Postgres(pool) => {
                sqlx::migrate!("./migrations/postgres").run(pool).await?
            }
            SensorStore::Sqlite(pool) => sqlx::migrate!("./migrations/sqlite").run(pool).await?,
        }
        Ok(())
    }

    /// Answers whether the database is reachable.
    pub async fn ping(&self) -> Result<(), StoreError> {
        match self {
            SensorStore::Postgres(pool) => sqlx::query("SELECT 1").execute(pool).await?,
            SensorStore::Sqlite(pool) => {
                sqlx::query("SELECT 1").execute(pool).await?;
                return Ok(());
            }
        };
        Ok(())
    }

    /// Inserts readings in one transaction; a reading whose `event_id` is stored already adds
    /// nothing. Returns the number of rows added.
    pub async fn insert_readings(&self, readings: &[TelemetryReading]) -> Result<u64, StoreError> {
        if readings.is_empty() {
            return Ok(0);
        }
        match self {
            SensorStore::Postgres(pool) => {
                let n = readings.len();
                let mut event_ids = Vec::with_capacity(n);
                let mut received_ats = Vec::with_capacity(n);
                let mut vins = Vec::with_capacity(n);
                let mut names = Vec::with_capacity(n);
                let mut profiles = Vec::with_capacity(n);
                let mut ranges = Vec::with_capacity(n);
                let mut mpges = Vec::with_capacity(n);
                let mut batteries = Vec::with_capacity(n);
                let mut malfunctions = Vec::with_capacity(n);
                let mut speeds = Vec::with_capacity(n);
                let mut latitudes = Vec::with_capacity(n);
                let mut longitudes = Vec::with_capacity(n);
                let mut dates = Vec::with_capacity(n);
                for r in readings {
                    event_ids.push(r.event_id);
                    received_ats.push(r.received_at);
                    vins.push(r.vin.as_str());
                    names.push(r.name.as_deref());
                    profiles.push(r.profile.as_deref());
                    ranges.push(r.range);
                    mpges.push(r.mpge);
                    batteries.push(r.battery);
                    malfunctions.push(r.malfunction);
                    speeds.push(r.speed);
                    latitudes.push(r.latitude);
                    longitudes.push(r.longitude);
                    dates.push(r.date);
                }
                let result = sqlx::query(
                    r#"INSERT INTO sensor_data
                         (event_id, received_at, vin, name, profile, "range", mpge, battery,
                          malfunction, speed, latitude, longitude, date)
                       SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[], $4::text[],
                          $5::text[], $6::float8[], $7::float8[], $8::float8[], $9::bool[],
                          $10::float8[], $11::float8[], $12::float8[], $13::timestamptz[])
                       ON CONFLICT (event_id) DO NOTHING"#,
                )
                .bind(&event_ids)
                .bind(&received_ats)
                .bind(&vins)
                .bind(&names)
                .bind(&profiles)
                .bind(&ranges)
                .bind(&mpges)
                .bind(&batteries)
                .bind(&malfunctions)
                .bind(&speeds)
                .bind(&latitudes)
                .bind(&longitudes)
                .bind(&dates)
                .execute(pool)
                .await?;
                Ok(result.rows_affected())
            }
            SensorStore::Sqlite(pool) => {
                sqlite_insert(
                    pool,
                    r#"INSERT INTO sensor_data
                         (event_id, received_at, vin, name, profile, "range", mpge, battery,
                          malfunction, speed, latitude, longitude, date) "#,
                    " ON CONFLICT (event_id) DO NOTHING",
                    readings,
                    |row, r| {
                        row.push_bind(r.event_id.to_string())
                            .push_bind(format_timestamp(&r.received_at))
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
                            .push_bind(format_timestamp(&r.date));
                    },
                )
                .await
            }
        }
    }

    /// Inserts dead letters in one transaction, idempotent by id. Returns the rows added.
    pub async fn insert_dead_letters(&self, letters: &[DeadLetter]) -> Result<u64, StoreError> {
        if letters.is_empty() {
            return Ok(0);
        }
        match self {
            SensorStore::Postgres(pool) => {
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
            SensorStore::Sqlite(pool) => sqlite_insert(
                pool,
                "INSERT INTO dead_letters (id, received_at, topic, client_id, reason, payload) ",
                " ON CONFLICT (id) DO NOTHING",
                letters,
                |row, l| {
                    row.push_bind(l.id.to_string())
                        .push_bind(format_timestamp(&l.received_at))
                        .push_bind(l.topic.as_str())
                        .push_bind(l.client_id.as_str())
                        .push_bind(l.reason_text())
                        .push_bind(l.payload.as_slice());
                },
            )
            .await,
        }
    }

    /// The newest `limit` readings of one car, newest first.
    pub async fn vehicle_readings(
        &self,
        vin: &Vin,
        limit: i64,
    ) -> Result<Vec<TelemetryReading>, StoreError> {
        const COLUMNS: &str = r#"event_id, received_at, vin, name, profile, "range", mpge, battery,
                                 malfunction, speed, latitude, longitude, date"#;
        match self {
            SensorStore::Postgres(pool) => {
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
            SensorStore::Sqlite(pool) => {
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

    /// Each car with its newest reading, by VIN.
    pub async fn latest_per_vehicle(&self) -> Result<Vec<TelemetryReading>, StoreError> {
        // A window over the (vin, date DESC) index; both backends support it.
        const SQL: &str = r#"SELECT event_id, received_at, vin, name, profile, "range", mpge, battery,
                                    malfunction, speed, latitude, longitude, date
                             FROM (SELECT s.*, ROW_NUMBER() OVER (PARTITION BY vin ORDER BY date DESC, event_id DESC) AS rn
                                   FROM sensor_data s) newest
                             WHERE rn = 1 ORDER BY vin"#;
        match self {
            SensorStore::Postgres(pool) => sqlx::query(SQL)
                .fetch_all(pool)
                .await?
                .iter()
                .map(pg_reading)
                .collect(),
            SensorStore::Sqlite(pool) => sqlx::query(SQL)
                .fetch_all(pool)
                .await?
                .iter()
                .map(sqlite_reading)
                .collect(),
        }
    }

    /// The newest `limit` dead letters, newest first.
    pub async fn dead_letters(&self, limit: i64) -> Result<Vec<DeadLetterRow>, StoreError> {
        match self {
            SensorStore::Postgres(pool) => {
                let rows = sqlx::query(
                    "SELECT id, received_at, topic, client_id, reason, payload FROM dead_letters
                     ORDER BY received_at DESC, id DESC LIMIT $1",
                )
                .bind(limit)
                .fetch_all(pool)
                .await?;
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
            SensorStore::Sqlite(pool) => {
                let rows = sqlx::query(
                    "SELECT id, received_at, topic, client_id, reason, payload FROM dead_letters
                     ORDER BY received_at DESC, id DESC LIMIT ?1",
                )
                .bind(limit)
                .fetch_all(pool)
                .await?;
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

    /// Counts the rows of `sensor_data` (tests and benchmarks).
    pub async fn count_readings(&self) -> Result<i64, StoreError> {
        const SQL: &str = "SELECT COUNT(*) FROM sensor_data";
        let count = match self {
            SensorStore::Postgres(pool) => sqlx::query_scalar(SQL).fetch_one(pool).await?,
            SensorStore::Sqlite(pool) => sqlx::query_scalar(SQL).fetch_one(pool).await?,
        };
        Ok(count)
    }

    /// Closes the pool, waiting for connections to be returned.
    pub async fn close(&self) {
        match self {
            SensorStore::Postgres(pool) => pool.close().await,
            SensorStore::Sqlite(pool) => pool.close().await,
        }
    }
}

/// Inserts `items` in one SQLite transaction, [`SQLITE_ROWS_PER_STATEMENT`] rows per statement;
/// returns the rows added.
async fn sqlite_insert<'a, T>(
    pool: &SqlitePool,
    insert: &'static str,
    on_conflict: &'static str,
    items: &'a [T],
    bind_row: impl Fn(&mut Separated<'_, Sqlite, &'static str>, &'a T),
) -> Result<u64, StoreError> {
    let mut tx = pool.begin().await?;
    let mut added = 0;
    for chunk in items.chunks(SQLITE_ROWS_PER_STATEMENT) {
        let mut query = QueryBuilder::new(insert);
        query.push_values(chunk, |mut row, item| bind_row(&mut row, item));
        query.push(on_conflict);
        added += query.build().execute(&mut *tx).await?.rows_affected();
    }
    tx.commit().await?;
    Ok(added)
}

fn pg_reading(row: &sqlx::postgres::PgRow) -> Result<TelemetryReading, StoreError> {
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

fn sqlite_reading(row: &sqlx::sqlite::SqliteRow) -> Result<TelemetryReading, StoreError> {
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

fn parse_vin(text: String) -> Result<Vin, StoreError> {
    Vin::parse(&text).map_err(|e| StoreError::Decode(e.to_string()))
}

fn parse_uuid(text: String) -> Result<Uuid, StoreError> {
    Uuid::parse_str(&text).map_err(|e| StoreError::Decode(format!("uuid {text:?}: {e}")))
}

fn parse_time(text: String) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(&text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| StoreError::Decode(format!("time {text:?}: {e}")))
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
        let err = SensorStore::connect_lazy("mysql://x").unwrap_err();
        assert!(err.to_string().contains("DATABASE_URL"), "{err}");
    }
}
