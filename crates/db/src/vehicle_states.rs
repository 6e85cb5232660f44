//! `vehicle_state`: each car's latest state, one row per car. Its newest reading by event time
//! and when it was last heard from are written in the same transaction as the batch of sensor
//! rows that brought them ([`crate::SensorRows::insert`]), with one set-based upsert per batch;
//! its open anomalies come from the case outbox. The fleet list reads this table, so its cost
//! does not grow with `sensor_data`.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use ecars_model::{TelemetryReading, Vin};
use sqlx::{Postgres, Row, SqliteConnection, Transaction};

use crate::sensor_rows::{pg_reading, sqlite_insert_in, sqlite_reading};
use crate::{parse_time, sqlite_time, Database, DbError, Pool};

/// One car's latest state.
#[derive(Clone, Debug, PartialEq)]
pub struct VehicleState {
    /// The car's newest reading by event time (`date`, then event id).
    pub latest: TelemetryReading,
    /// When ingest last received a reading of the car (the newest `received_at`).
    pub last_seen: DateTime<Utc>,
    /// The rules with an open anomaly episode for the car, by name.
    pub open_anomalies: Vec<String>,
}

/// Which cars a page of the fleet holds.
#[derive(Clone, Debug, Default)]
pub struct FleetQuery {
    /// Only cars with (`true`) or without (`false`) an open anomaly.
    pub anomaly: Option<bool>,
    /// Only cars after this VIN (the cursor: the last VIN of the page before).
    pub after: Option<Vin>,
    /// At most this many cars.
    pub limit: i64,
}

/// The `vehicle_state` table.
#[derive(Clone, Debug)]
pub struct VehicleStates {
    pub(crate) db: Database,
}

/// The columns of `vehicle_state`, in the order the statements here name them.
const COLUMNS: &str = r#"vin, event_id, received_at, name, profile, "range", mpge, battery,
                         malfunction, speed, latitude, longitude, date, last_seen"#;

/// The reading's columns, replaced only by a newer reading (by event time, then event id), so
/// a late or redelivered batch never moves a car back; `last_seen` only moves forward.
fn on_conflict(greatest: &str) -> String {
    const READING: [&str; 12] = [
        "event_id",
        "received_at",
        "name",
        "profile",
        "\"range\"",
        "mpge",
        "battery",
        "malfunction",
        "speed",
        "latitude",
        "longitude",
        "date",
    ];
    let newer = "(excluded.date, excluded.event_id) > (vehicle_state.date, vehicle_state.event_id)";
    let mut sql = String::from(" ON CONFLICT (vin) DO UPDATE SET ");
    for column in READING {
        sql.push_str(&format!(
            "{column} = CASE WHEN {newer} THEN excluded.{column} ELSE vehicle_state.{column} END, "
        ));
    }
    sql.push_str(&format!(
        "last_seen = {greatest}(vehicle_state.last_seen, excluded.last_seen)"
    ));
    sql
}

/// Each car's newest reading in `readings` (by event time, then event id) and the newest time
/// one of its readings was received, by VIN.
fn newest_per_vehicle(readings: &[TelemetryReading]) -> Vec<(&TelemetryReading, DateTime<Utc>)> {
    let mut newest: HashMap<&Vin, (&TelemetryReading, DateTime<Utc>)> = HashMap::new();
    for reading in readings {
        newest
            .entry(&reading.vin)
            .and_modify(|(kept, last_seen)| {
                if (reading.date, reading.event_id) > (kept.date, kept.event_id) {
                    *kept = reading;
                }
                *last_seen = (*last_seen).max(reading.received_at);
            })
            .or_insert((reading, reading.received_at));
    }
    let mut newest: Vec<_> = newest.into_values().collect();
    // One order for every writer: two transactions upserting the same cars take their row
    // locks in the same order and cannot deadlock (PostgreSQL).
    newest.sort_by(|a, b| a.0.vin.as_str().cmp(b.0.vin.as_str()));
    newest
}

/// Upserts the cars of `readings` inside the sensor rows' transaction (PostgreSQL).
pub(crate) async fn upsert_pg(
    tx: &mut Transaction<'_, Postgres>,
    readings: &[TelemetryReading],
) -> Result<(), DbError> {
    let newest = newest_per_vehicle(readings);
    let column = |f: fn(&TelemetryReading) -> Option<f64>| -> Vec<Option<f64>> {
        newest.iter().map(|(r, _)| f(r)).collect()
    };
    let sql = format!(
        r#"INSERT INTO vehicle_state ({COLUMNS})
           SELECT * FROM UNNEST($1::text[], $2::uuid[], $3::timestamptz[], $4::text[], $5::text[],
              $6::float8[], $7::float8[], $8::float8[], $9::bool[], $10::float8[], $11::float8[],
              $12::float8[], $13::timestamptz[], $14::timestamptz[]){}"#,
        on_conflict("GREATEST")
    );
    sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(
            newest
                .iter()
                .map(|(r, _)| r.vin.as_str())
                .collect::<Vec<_>>(),
        )
        .bind(newest.iter().map(|(r, _)| r.event_id).collect::<Vec<_>>())
        .bind(
            newest
                .iter()
                .map(|(r, _)| r.received_at)
                .collect::<Vec<_>>(),
        )
        .bind(
            newest
                .iter()
                .map(|(r, _)| r.name.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            newest
                .iter()
                .map(|(r, _)| r.profile.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(column(|r| r.range))
        .bind(column(|r| r.mpge))
        .bind(column(|r| r.battery))
        .bind(
            newest
                .iter()
                .map(|(r, _)| r.malfunction)
                .collect::<Vec<_>>(),
        )
        .bind(column(|r| r.speed))
        .bind(column(|r| r.latitude))
        .bind(column(|r| r.longitude))
        .bind(newest.iter().map(|(r, _)| r.date).collect::<Vec<_>>())
        .bind(newest.iter().map(|(_, seen)| *seen).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Upserts the cars of `readings` inside the sensor rows' transaction (SQLite).
pub(crate) async fn upsert_sqlite(
    conn: &mut SqliteConnection,
    readings: &[TelemetryReading],
) -> Result<(), DbError> {
    let newest = newest_per_vehicle(readings);
    // Built once: the statement's text is the key of its prepared statement.
    static ON_CONFLICT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let on_conflict = ON_CONFLICT.get_or_init(|| on_conflict("MAX"));
    sqlite_insert_in(
        conn,
        r#"INSERT INTO vehicle_state (vin, event_id, received_at, name, profile, "range", mpge,
              battery, malfunction, speed, latitude, longitude, date, last_seen) "#,
        on_conflict,
        &newest,
        |row, (r, last_seen)| {
            row.push_bind(r.vin.as_str())
                .push_bind(r.event_id.to_string())
                .push_bind(sqlite_time(&r.received_at))
                .push_bind(r.name.as_deref())
                .push_bind(r.profile.as_deref())
                .push_bind(r.range)
                .push_bind(r.mpge)
                .push_bind(r.battery)
                .push_bind(r.malfunction)
                .push_bind(r.speed)
                .push_bind(r.latitude)
                .push_bind(r.longitude)
                .push_bind(sqlite_time(&r.date))
                .push_bind(sqlite_time(last_seen));
        },
    )
    .await?;
    Ok(())
}

impl VehicleStates {
    /// A page of the fleet, by VIN.
    pub async fn page(&self, query: &FleetQuery) -> Result<Vec<VehicleState>, DbError> {
        let anomaly = match query.anomaly {
            None => "",
            Some(true) => "AND EXISTS (SELECT 1 FROM case_outbox c WHERE c.vin = v.vin AND c.episode_closed_ms IS NULL)",
            Some(false) => "AND NOT EXISTS (SELECT 1 FROM case_outbox c WHERE c.vin = v.vin AND c.episode_closed_ms IS NULL)",
        };
        let after = query.after.as_ref().map_or("", |v| v.as_str());
        match &self.db.pool {
            Pool::Postgres(pool) => {
                let sql = format!(
                    "SELECT {COLUMNS},
                        (SELECT string_agg(c.rule, ',' ORDER BY c.rule) FROM case_outbox c
                         WHERE c.vin = v.vin AND c.episode_closed_ms IS NULL) AS open_anomalies
                     FROM vehicle_state v WHERE v.vin > $1 {anomaly} ORDER BY v.vin LIMIT $2"
                );
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(after)
                    .bind(query.limit)
                    .fetch_all(pool)
                    .await?;
                rows.iter()
                    .map(|row| {
                        Ok(VehicleState {
                            latest: pg_reading(row)?,
                            last_seen: row.try_get("last_seen")?,
                            open_anomalies: rules(row.try_get("open_anomalies")?),
                        })
                    })
                    .collect()
            }
            Pool::Sqlite(pool) => {
                let sql = format!(
                    "SELECT {COLUMNS},
                        (SELECT group_concat(rule, ',') FROM
                           (SELECT c.rule FROM case_outbox c
                            WHERE c.vin = v.vin AND c.episode_closed_ms IS NULL ORDER BY c.rule))
                          AS open_anomalies
                     FROM vehicle_state v WHERE v.vin > $1 {anomaly} ORDER BY v.vin LIMIT $2"
                );
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(after)
                    .bind(query.limit)
                    .fetch_all(pool)
                    .await?;
                rows.iter()
                    .map(|row| {
                        Ok(VehicleState {
                            latest: sqlite_reading(row)?,
                            last_seen: parse_time(row.try_get("last_seen")?)?,
                            open_anomalies: rules(row.try_get("open_anomalies")?),
                        })
                    })
                    .collect()
            }
        }
    }
}

/// The rule names of a comma-separated list (`None`: no open anomaly).
fn rules(list: Option<String>) -> Vec<String> {
    list.map(|l| l.split(',').map(str::to_owned).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(vin: &str, date_s: i64, received_s: i64) -> TelemetryReading {
        let time = |s| DateTime::from_timestamp(s, 0).unwrap();
        TelemetryReading {
            event_id: uuid::Uuid::now_v7(),
            received_at: time(received_s),
            vin: Vin::parse(vin).unwrap(),
            name: None,
            profile: None,
            range: None,
            mpge: None,
            battery: Some(date_s as f64),
            malfunction: None,
            speed: None,
            latitude: None,
            longitude: None,
            date: time(date_s),
        }
    }

    #[test]
    fn each_car_keeps_its_newest_reading_by_event_time_and_its_latest_receipt() {
        const A: &str = "1HGCM82633A004352";
        const B: &str = "2HGCM82633A004352";
        // A's readings arrive out of order: the one dated 300 arrived before the one dated 200.
        let batch = [
            reading(A, 300, 1_000),
            reading(B, 50, 1_001),
            reading(A, 200, 1_002),
        ];
        let newest = newest_per_vehicle(&batch);
        assert_eq!(newest.len(), 2);
        let (a, a_seen) = newest[0];
        assert_eq!((a.vin.as_str(), a.battery), (A, Some(300.0)));
        assert_eq!(a_seen.timestamp(), 1_002);
        let (b, b_seen) = newest[1];
        assert_eq!((b.vin.as_str(), b_seen.timestamp()), (B, 1_001));
    }
}
