//! `vehicle_state`: each car's latest state, one row per car. Its newest reading by event time
//! and when a reading last arrived are written by the rollup pass
//! ([`crate::Rollups::apply_pending`]), from the same durable queue of committed batches and in
//! the same transaction as the rollups: exactly once per batch, one set-based upsert per car
//! for many batches, and after a crash from the batches still queued. Written in each batch's
//! own transaction, a second row per reading cost PostgreSQL 42–43 % of its write path where
//! every car has one reading per batch (docs/BENCHMARKS.md, session 22); now the state trails
//! the sensor rows by about the pass's interval (a second). Whether it is connected comes from
//! the connectivity stream ([`VehicleStates::apply`]), by session, at once; its open anomalies
//! come from the case outbox. The fleet list reads this table, so its cost does not grow with
//! `sensor_data`.

use std::collections::HashMap;

use chrono::{DateTime, Utc};
use ecars_model::{Connectivity, ConnectivityEvent, TelemetryReading, Vin};
use sqlx::{Postgres, Row, SqliteConnection, Transaction};
use uuid::Uuid;

use crate::sensor_rows::{
    pg_reading, push_reading, sqlite_insert_in, sqlite_reading, ReadingArrays, PG_ARRAYS,
};
use crate::{
    on_pool, parse_time, parse_uuid, parse_vin, replaced_when, sqlite_time, Database, DbError, Pool,
};

/// One car's latest state.
#[derive(Clone, Debug, PartialEq)]
pub struct VehicleState {
    /// The car.
    pub vin: Vin,
    /// The car's newest reading by event time (`date`, then event id); `None` before its
    /// first.
    pub latest: Option<TelemetryReading>,
    /// When ingest last received a reading of the car (the newest `received_at`).
    pub last_seen: Option<DateTime<Utc>>,
    /// Whether it is connected, as its newest session says; `None` before its first.
    pub connectivity: Option<ConnectivityState>,
    /// The rules with an open anomaly episode for the car, by name.
    pub open_anomalies: Vec<String>,
}

/// Whether a car is connected, since when and why.
#[derive(Clone, Debug, PartialEq)]
pub struct ConnectivityState {
    /// Connected now.
    pub online: bool,
    /// When its state last changed.
    pub since: DateTime<Utc>,
    /// Why its last connection ended (offline only): a [`ecars_model::DisconnectReason`] code.
    pub reason: Option<String>,
    /// The session (connection) that decided it.
    pub session_id: Uuid,
    /// The ingest node that served that session.
    pub node: String,
}

/// Which cars a page of the fleet holds.
#[derive(Clone, Debug, Default)]
pub struct FleetQuery {
    /// Only cars with (`true`) or without (`false`) an open anomaly.
    pub anomaly: Option<bool>,
    /// Only cars connected (`true`) or not known to be (`false`).
    pub online: Option<bool>,
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

/// The columns of `vehicle_state` a reading fills: a reading's own, in the order
/// [`crate::sensor_rows::COLUMNS`] names them, and `last_seen`.
fn reading_columns() -> String {
    format!("{}, last_seen", crate::sensor_rows::COLUMNS)
}

/// The connectivity columns.
const CONNECTIVITY_COLUMNS: &str =
    "online, session_id, connectivity_changed_at, connectivity_reason, node";

/// The reading's columns, replaced only by a newer reading (by event time, then event id), so
/// a late or redelivered batch never moves a car back; `last_seen` only moves forward.
fn on_conflict(greatest: &str) -> String {
    let newer = "vehicle_state.date IS NULL OR \
                 (excluded.date, excluded.event_id) > (vehicle_state.date, vehicle_state.event_id)";
    let reading = crate::sensor_rows::COLUMNS
        .split(',')
        .map(str::trim)
        .filter(|column| *column != "vin");
    let mut sets = replaced_when("vehicle_state", reading, newer);
    // COALESCE: SQLite's MAX of a NULL is NULL (a car that connected before its first reading).
    sets.push(format!(
        "last_seen = {greatest}(COALESCE(vehicle_state.last_seen, excluded.last_seen), excluded.last_seen)"
    ));
    format!(" ON CONFLICT (vin) DO UPDATE SET {}", sets.join(", "))
}

/// The connectivity columns, replaced only by an event that supersedes the state they hold
/// (SQL for [`ConnectivityEvent::supersedes`]): a newer session, or the end of the same one.
fn on_connectivity_conflict() -> String {
    let supersedes = "vehicle_state.session_id IS NULL \
        OR excluded.session_id > vehicle_state.session_id \
        OR (excluded.session_id = vehicle_state.session_id \
            AND vehicle_state.online AND NOT excluded.online)";
    let sets = replaced_when(
        "vehicle_state",
        CONNECTIVITY_COLUMNS.split(", "),
        supersedes,
    );
    format!(" ON CONFLICT (vin) DO UPDATE SET {}", sets.join(", "))
}

/// Each car's event in `events` that supersedes its others (applied in order, as the table
/// applies them), by VIN.
fn deciding_per_vehicle(events: &[ConnectivityEvent]) -> Vec<&ConnectivityEvent> {
    let mut deciding: HashMap<&Vin, &ConnectivityEvent> = HashMap::new();
    for event in events {
        let current = deciding
            .get(&event.vin)
            .map(|kept| (kept.session_id, kept.state));
        if event.supersedes(current) {
            deciding.insert(&event.vin, event);
        }
    }
    let mut deciding: Vec<_> = deciding.into_values().collect();
    deciding.sort_by(|a, b| a.vin.as_str().cmp(b.vin.as_str()));
    deciding
}

/// A car's newest reading among some (by event time, then event id) and when the last of them
/// was received: what they add to the car's state.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct NewestReading {
    /// The newest reading.
    pub(crate) reading: TelemetryReading,
    /// The newest `received_at` of the car's readings.
    pub(crate) last_seen: DateTime<Utc>,
}

/// Whether `reading` is newer than `than` by event time (date, then event id): the one rule
/// that picks a car's newest reading.
fn is_newer(reading: &TelemetryReading, than: &TelemetryReading) -> bool {
    (reading.date, reading.event_id) > (than.date, than.event_id)
}

/// Each car's newest reading in `readings` and the newest time one of its readings was
/// received, by VIN. Only the newest are copied: this runs after every batch's commit.
pub(crate) fn newest_per_vehicle(readings: &[TelemetryReading]) -> Vec<NewestReading> {
    let mut newest: HashMap<&Vin, (&TelemetryReading, DateTime<Utc>)> = HashMap::new();
    for reading in readings {
        newest
            .entry(&reading.vin)
            .and_modify(|(kept, last_seen)| {
                if is_newer(reading, kept) {
                    *kept = reading;
                }
                *last_seen = (*last_seen).max(reading.received_at);
            })
            .or_insert((reading, reading.received_at));
    }
    // Sorted before the copies, as references: each reading is a few hundred bytes.
    let mut newest: Vec<_> = newest.into_iter().collect();
    newest.sort_unstable_by(|a, b| a.0.as_str().cmp(b.0.as_str()));
    newest
        .into_iter()
        .map(|(_, (reading, last_seen))| NewestReading {
            reading: reading.clone(),
            last_seen,
        })
        .collect()
}

/// The newest readings of many batches (in any order) merged: each car's newest, seen when the
/// latest of them was, by VIN.
pub(crate) fn merge_newest(batches: impl IntoIterator<Item = NewestReading>) -> Vec<NewestReading> {
    let mut merged: HashMap<Vin, NewestReading> = HashMap::new();
    for newest in batches {
        match merged.entry(newest.reading.vin.clone()) {
            std::collections::hash_map::Entry::Occupied(mut kept) => {
                let kept = kept.get_mut();
                kept.last_seen = kept.last_seen.max(newest.last_seen);
                if is_newer(&newest.reading, &kept.reading) {
                    kept.reading = newest.reading;
                }
            }
            std::collections::hash_map::Entry::Vacant(slot) => {
                slot.insert(newest);
            }
        }
    }
    by_vin(merged.into_values())
}

/// Sorted by VIN: one order for every writer, so two transactions upserting the same cars take
/// their row locks in the same order and cannot deadlock (PostgreSQL).
fn by_vin(newest: impl Iterator<Item = NewestReading>) -> Vec<NewestReading> {
    let mut newest: Vec<_> = newest.collect();
    newest.sort_by(|a, b| a.reading.vin.as_str().cmp(b.reading.vin.as_str()));
    newest
}

/// Upserts cars' newest readings inside the rollup pass's transaction (PostgreSQL).
pub(crate) async fn upsert_pg(
    tx: &mut Transaction<'_, Postgres>,
    newest: &[NewestReading],
) -> Result<(), DbError> {
    if newest.is_empty() {
        return Ok(());
    }
    let arrays = ReadingArrays::of(newest.iter().map(|n| &n.reading));
    let sql = format!(
        "INSERT INTO vehicle_state ({}) SELECT * FROM UNNEST({PG_ARRAYS}, $14::timestamptz[]){}",
        reading_columns(),
        on_conflict("GREATEST")
    );
    arrays
        .bind(sqlx::query(sqlx::AssertSqlSafe(sql)))
        .bind(newest.iter().map(|n| n.last_seen).collect::<Vec<_>>())
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Upserts cars' newest readings inside the rollup pass's transaction (SQLite).
pub(crate) async fn upsert_sqlite(
    conn: &mut SqliteConnection,
    newest: &[NewestReading],
) -> Result<(), DbError> {
    // Built once: the statement's text is the key of its prepared statement.
    static STATEMENT: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();
    let (insert, on_conflict) = STATEMENT.get_or_init(|| {
        (
            // OR IGNORE for the one constraint besides the key, the VIN's NOT NULL (bound from
            // a required field): a statement that cannot abort needs no statement journal
            // (see the sensor rows' insert). The key's conflict is the upsert's.
            format!(
                "INSERT OR IGNORE INTO vehicle_state ({}) ",
                reading_columns()
            ),
            on_conflict("MAX"),
        )
    });
    sqlite_insert_in(conn, insert, on_conflict, newest, |row, n| {
        push_reading(row, &n.reading);
        row.push_bind(sqlite_time(&n.last_seen));
    })
    .await?;
    Ok(())
}

impl VehicleStates {
    /// Applies connectivity events: each car's state follows its newest session, whatever
    /// order the events come in; applying one twice changes nothing. Returns the cars whose
    /// event was written (not counting those an older-session event left as they were).
    pub async fn apply(&self, events: &[ConnectivityEvent]) -> Result<u64, DbError> {
        let deciding = deciding_per_vehicle(events);
        if deciding.is_empty() {
            return Ok(0);
        }
        let reason = |e: &ConnectivityEvent| e.reason.map(|r| r.code());
        let online = |e: &ConnectivityEvent| e.state == Connectivity::Connected;
        match &self.db.pool {
            Pool::Postgres(pool) => {
                let sql = format!(
                    "INSERT INTO vehicle_state (vin, {CONNECTIVITY_COLUMNS})
                     SELECT * FROM UNNEST($1::text[], $2::bool[], $3::uuid[], $4::timestamptz[],
                        $5::text[], $6::text[]){}",
                    on_connectivity_conflict()
                );
                let result = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(deciding.iter().map(|e| e.vin.as_str()).collect::<Vec<_>>())
                    .bind(deciding.iter().map(|e| online(e)).collect::<Vec<_>>())
                    .bind(deciding.iter().map(|e| e.session_id).collect::<Vec<_>>())
                    .bind(deciding.iter().map(|e| e.time).collect::<Vec<_>>())
                    .bind(deciding.iter().map(|e| reason(e)).collect::<Vec<_>>())
                    .bind(deciding.iter().map(|e| e.node.as_str()).collect::<Vec<_>>())
                    .execute(pool)
                    .await?;
                Ok(result.rows_affected())
            }
            Pool::Sqlite(pool) => {
                static ON_CONFLICT: std::sync::OnceLock<String> = std::sync::OnceLock::new();
                let on_conflict = ON_CONFLICT.get_or_init(on_connectivity_conflict);
                crate::sensor_rows::sqlite_insert(
                    self.db.sqlite_writer.as_ref().unwrap_or(pool),
                    "INSERT INTO vehicle_state (vin, online, session_id, connectivity_changed_at,
                        connectivity_reason, node) ",
                    on_conflict,
                    &deciding,
                    |row, e| {
                        row.push_bind(e.vin.as_str())
                            .push_bind(online(e))
                            .push_bind(e.session_id.to_string())
                            .push_bind(sqlite_time(&e.time))
                            .push_bind(reason(e))
                            .push_bind(e.node.as_str());
                    },
                )
                .await
            }
        }
    }

    /// The cars whose newest session, served by ingest node `node`, is still open here: after
    /// that node stopped without ending its sessions (`kill -9`, a lost machine), these are
    /// the ones it left online. Each with that session's id.
    pub async fn online_on_node(&self, node: &str) -> Result<Vec<(Vin, Uuid)>, DbError> {
        // The session id as text from both backends (a UUID on PostgreSQL), so one decoding.
        const SQL: &str = "SELECT vin, CAST(session_id AS TEXT) FROM vehicle_state \
             WHERE node = $1 AND online ORDER BY vin";
        on_pool!(self.db, |pool| sqlx::query(SQL)
            .bind(node)
            .fetch_all(pool)
            .await?
            .into_iter()
            .map(|row| Ok((parse_vin(row.try_get(0)?)?, parse_uuid(row.try_get(1)?)?)))
            .collect())
    }

    /// A page of the fleet, by VIN.
    pub async fn page(&self, query: &FleetQuery) -> Result<Vec<VehicleState>, DbError> {
        const OPEN: &str =
            "SELECT 1 FROM case_outbox c WHERE c.vin = v.vin AND c.episode_closed_ms IS NULL";
        let mut filters = String::new();
        match query.anomaly {
            None => {}
            Some(true) => filters.push_str(&format!(" AND EXISTS ({OPEN})")),
            Some(false) => filters.push_str(&format!(" AND NOT EXISTS ({OPEN})")),
        }
        match query.online {
            None => {}
            Some(true) => filters.push_str(" AND v.online IS TRUE"),
            Some(false) => filters.push_str(" AND v.online IS NOT TRUE"),
        }
        let after = query.after.as_ref().map_or("", |v| v.as_str());
        match &self.db.pool {
            Pool::Postgres(pool) => {
                let sql = format!(
                    "SELECT {}, {CONNECTIVITY_COLUMNS},
                        (SELECT string_agg(c.rule, ',' ORDER BY c.rule) FROM case_outbox c
                         WHERE c.vin = v.vin AND c.episode_closed_ms IS NULL) AS open_anomalies
                     FROM vehicle_state v WHERE v.vin > $1 {filters} ORDER BY v.vin LIMIT $2",
                    reading_columns()
                );
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(after)
                    .bind(query.limit)
                    .fetch_all(pool)
                    .await?;
                rows.iter()
                    .map(|row| {
                        let has_reading = row.try_get::<Option<Uuid>, _>("event_id")?.is_some();
                        let connectivity = match row.try_get::<Option<Uuid>, _>("session_id")? {
                            None => None,
                            Some(session_id) => Some(ConnectivityState {
                                online: row.try_get("online")?,
                                since: row.try_get("connectivity_changed_at")?,
                                reason: row.try_get("connectivity_reason")?,
                                session_id,
                                node: row.try_get("node")?,
                            }),
                        };
                        Ok(VehicleState {
                            vin: crate::parse_vin(row.try_get("vin")?)?,
                            latest: has_reading.then(|| pg_reading(row)).transpose()?,
                            last_seen: row.try_get("last_seen")?,
                            connectivity,
                            open_anomalies: rules(row.try_get("open_anomalies")?),
                        })
                    })
                    .collect()
            }
            Pool::Sqlite(pool) => {
                let sql = format!(
                    "SELECT {}, {CONNECTIVITY_COLUMNS},
                        (SELECT group_concat(rule, ',') FROM
                           (SELECT c.rule FROM case_outbox c
                            WHERE c.vin = v.vin AND c.episode_closed_ms IS NULL ORDER BY c.rule))
                          AS open_anomalies
                     FROM vehicle_state v WHERE v.vin > $1 {filters} ORDER BY v.vin LIMIT $2",
                    reading_columns()
                );
                let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(after)
                    .bind(query.limit)
                    .fetch_all(pool)
                    .await?;
                rows.iter()
                    .map(|row| {
                        let has_reading = row.try_get::<Option<String>, _>("event_id")?.is_some();
                        let connectivity = match row.try_get::<Option<String>, _>("session_id")? {
                            None => None,
                            Some(session_id) => Some(ConnectivityState {
                                online: row.try_get("online")?,
                                since: parse_time(row.try_get("connectivity_changed_at")?)?,
                                reason: row.try_get("connectivity_reason")?,
                                session_id: parse_uuid(session_id)?,
                                node: row.try_get("node")?,
                            }),
                        };
                        Ok(VehicleState {
                            vin: crate::parse_vin(row.try_get("vin")?)?,
                            latest: has_reading.then(|| sqlite_reading(row)).transpose()?,
                            last_seen: row
                                .try_get::<Option<String>, _>("last_seen")?
                                .map(parse_time)
                                .transpose()?,
                            connectivity,
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
        let a = &newest[0];
        assert_eq!(
            (a.reading.vin.as_str(), a.reading.battery),
            (A, Some(300.0))
        );
        assert_eq!(a.last_seen.timestamp(), 1_002);
        let b = &newest[1];
        assert_eq!(
            (b.reading.vin.as_str(), b.last_seen.timestamp()),
            (B, 1_001)
        );
    }

    #[test]
    fn batches_merge_into_each_cars_newest_whatever_their_order() {
        const A: &str = "1HGCM82633A004352";
        const B: &str = "2HGCM82633A004352";
        let first = [reading(A, 300, 1_000), reading(B, 50, 1_001)];
        let second = [reading(A, 200, 1_005), reading(B, 60, 1_003)];
        let all: Vec<_> = first.iter().chain(&second).cloned().collect();
        let at_once = newest_per_vehicle(&all);
        for order in [[&first[..], &second[..]], [&second[..], &first[..]]] {
            let merged = merge_newest(order.into_iter().flat_map(newest_per_vehicle));
            assert_eq!(merged, at_once);
        }
        assert_eq!(
            at_once[0].reading.battery,
            Some(300.0),
            "A's newest by date"
        );
        assert_eq!(at_once[0].last_seen.timestamp(), 1_005, "A last seen later");
        assert_eq!(at_once[1].reading.battery, Some(60.0));
    }
}
