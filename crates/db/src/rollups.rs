//! `rollup_1m` and `rollup_1h`: per car and per minute or hour, the count, sum, min and max of
//! battery, speed and range, the first and last battery and the last position, so a chart of a
//! week or a year reads thousands of rows instead of millions.
//!
//! Two steps keep them off the write path. In the transaction of each batch of sensor rows
//! ([`crate::SensorRows::insert`]), the ids of the rows that batch added (a redelivered reading
//! adds nothing) are queued in `rollup_batches`: one small row per batch. Then
//! [`Rollups::apply_pending`] (the persistence worker, every few seconds) takes queued batches,
//! reads their rows, summarises them per car and minute or hour, upserts the rollups and
//! deletes what it took, in one transaction: exactly once, whatever order batches committed
//! in, and one upsert per car and minute for many batches. Upserting in each batch's own
//! transaction, or appending a summary per car to a staging table, cost PostgreSQL more than
//! half of its throughput where every car has one reading per batch (see
//! `docs/BENCHMARKS.md`).
//!
//! The same pass writes each car's latest state (`vehicle_state`'s newest reading and
//! `last_seen`, [`crate::vehicle_states`]) from the same batches, in the same transaction, so
//! a car's state costs one upsert per pass instead of one per batch.
//!
//! The process that queued a batch keeps its minute buckets and newest readings in memory (`QueuedSummaries`,
//! bounded) until a pass applies it, so a pass reads back only the rows of batches it does not
//! have: another process's, a batch that had redelivered readings (its summary would count
//! rows the insert skipped), or one queued before a restart. Reading the rows back and decoding
//! them was most of a pass's work, and on PostgreSQL each pass stalled the batches' commits
//! (the pipeline benchmark's `--timeline`). Hours are merged from the minutes.
//!
//! A queued batch whose rows retention deleted before it was applied (a worker stopped for
//! longer than `ECARS_RETENTION`) adds only the rows that remain when it is read back; one
//! summarised in memory adds all of its readings.
//!
//! The merge is associative: a bucket summarised from any split of its readings into batches,
//! in any order, equals the bucket summarised at once ([`Rollup::merge`] in Rust, and the
//! upsert's SQL, which mirrors it). Sums are floating point, so equal means equal to rounding.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use chrono::{DateTime, TimeDelta, Utc};
use ecars_model::{TelemetryReading, Vin};
use sqlx::{Postgres, Row, SqliteConnection, Transaction};
use uuid::Uuid;

use crate::sensor_rows::sqlite_insert_in;
use crate::vehicle_states::{self, merge_newest, newest_per_vehicle, NewestReading};
use crate::{
    parse_time, parse_uuid, parse_vin, replaced_when, sqlite_time, Database, DbError, Pool,
};

/// The width of a rollup's buckets.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Width {
    /// One bucket per car per minute (`rollup_1m`).
    Minute,
    /// One bucket per car per hour (`rollup_1h`).
    Hour,
}

impl Width {
    /// Both widths.
    pub const ALL: [Width; 2] = [Width::Minute, Width::Hour];

    /// The table of this width.
    pub fn table(self) -> &'static str {
        match self {
            Width::Minute => "rollup_1m",
            Width::Hour => "rollup_1h",
        }
    }

    /// The length of a bucket.
    pub fn length(self) -> TimeDelta {
        match self {
            Width::Minute => TimeDelta::minutes(1),
            Width::Hour => TimeDelta::hours(1),
        }
    }

    /// The start of the bucket that holds `time`.
    pub fn bucket(self, time: DateTime<Utc>) -> DateTime<Utc> {
        // Whole seconds (a minute and an hour are), rounded down also before 1970; chrono's
        // `duration_trunc` gives the same and was a tenth of the summary's time. The start of a
        // valid time's bucket is a valid time.
        let seconds = self.length().num_seconds();
        let start = time.timestamp() - time.timestamp().rem_euclid(seconds);
        DateTime::from_timestamp(start, 0).unwrap_or(time)
    }
}

/// The count, sum, least and greatest of one measure's values in a bucket (readings without
/// the measure do not count).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stats {
    /// How many readings had a value.
    pub n: i64,
    /// Their sum.
    pub sum: f64,
    /// The least (`None` when `n` is 0).
    pub min: Option<f64>,
    /// The greatest (`None` when `n` is 0).
    pub max: Option<f64>,
}

impl Stats {
    fn add(&mut self, value: Option<f64>) {
        if let Some(v) = value {
            self.merge(&Stats {
                n: 1,
                sum: v,
                min: Some(v),
                max: Some(v),
            });
        }
    }

    fn merge(&mut self, other: &Stats) {
        self.n += other.n;
        self.sum += other.sum;
        self.min = pick(self.min, other.min, f64::min);
        self.max = pick(self.max, other.max, f64::max);
    }

    /// The mean (`None` when there is no value).
    pub fn mean(&self) -> Option<f64> {
        (self.n > 0).then(|| self.sum / self.n as f64)
    }
}

fn pick(a: Option<f64>, b: Option<f64>, f: fn(f64, f64) -> f64) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) => Some(f(a, b)),
        (a, None) => a,
        (None, b) => b,
    }
}

/// A value and the event time (date, then event id) of the reading it came from: the first or
/// last of a bucket.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Stamped<T> {
    /// The reading's date.
    pub date: DateTime<Utc>,
    /// The reading's event id (breaks ties of date).
    pub event_id: Uuid,
    /// The value.
    pub value: T,
}

impl<T: Copy> Stamped<T> {
    fn key(&self) -> (DateTime<Utc>, Uuid) {
        (self.date, self.event_id)
    }

    /// Keeps whichever of `kept` and `other` `wins` (compares event times) chooses.
    fn keep(kept: &mut Option<Stamped<T>>, other: Option<Stamped<T>>, later: bool) {
        let Some(other) = other else { return };
        let replace = match kept {
            None => true,
            Some(k) if later => other.key() > k.key(),
            Some(k) => other.key() < k.key(),
        };
        if replace {
            *kept = Some(other);
        }
    }
}

/// One car's bucket.
#[derive(Clone, Debug, PartialEq)]
pub struct Rollup {
    /// The car.
    pub vin: Vin,
    /// The bucket's start.
    pub bucket: DateTime<Utc>,
    /// How many readings it summarises.
    pub readings: i64,
    /// Battery (percent).
    pub battery: Stats,
    /// Speed.
    pub speed: Stats,
    /// Range.
    pub range: Stats,
    /// The battery of the bucket's earliest reading that has one.
    pub first_battery: Option<Stamped<f64>>,
    /// The battery of the bucket's latest reading that has one.
    pub last_battery: Option<Stamped<f64>>,
    /// The position (latitude, longitude) of its latest reading that has one.
    pub position: Option<Stamped<(f64, f64)>>,
}

impl Rollup {
    fn empty(vin: Vin, bucket: DateTime<Utc>) -> Rollup {
        Rollup {
            vin,
            bucket,
            readings: 0,
            battery: Stats::default(),
            speed: Stats::default(),
            range: Stats::default(),
            first_battery: None,
            last_battery: None,
            position: None,
        }
    }

    /// Adds one reading (of the same car and bucket): what [`Rollup::merge`] does with a rollup
    /// of that reading alone, without making one (which copied the VIN for every reading).
    fn add(&mut self, r: &TelemetryReading) {
        let stamp = |value| Stamped {
            date: r.date,
            event_id: r.event_id,
            value,
        };
        self.readings += 1;
        self.battery.add(r.battery);
        self.speed.add(r.speed);
        self.range.add(r.range);
        Stamped::keep(&mut self.first_battery, r.battery.map(stamp), false);
        Stamped::keep(&mut self.last_battery, r.battery.map(stamp), true);
        let position = r.latitude.zip(r.longitude).map(|value| Stamped {
            date: r.date,
            event_id: r.event_id,
            value,
        });
        Stamped::keep(&mut self.position, position, true);
    }

    /// Adds the readings `other` summarises (of the same car and bucket).
    pub fn merge(&mut self, other: &Rollup) {
        self.readings += other.readings;
        self.battery.merge(&other.battery);
        self.speed.merge(&other.speed);
        self.range.merge(&other.range);
        Stamped::keep(&mut self.first_battery, other.first_battery, false);
        Stamped::keep(&mut self.last_battery, other.last_battery, true);
        Stamped::keep(&mut self.position, other.position, true);
    }
}

/// The buckets of `width` that `readings` fall in, summarised, by VIN then bucket: the order
/// every writer upserts them in, so two transactions cannot deadlock on their row locks.
pub fn summarise<'a>(
    width: Width,
    readings: impl IntoIterator<Item = &'a TelemetryReading>,
) -> Vec<Rollup> {
    // Found by hash and sorted once at the end, by their keys: a rollup is a few hundred bytes,
    // and an ordered map moved them within its nodes on inserts (an eighth of this function's
    // time with 1,000 cars, measured).
    let readings = readings.into_iter();
    let mut index: HashMap<(&str, DateTime<Utc>), usize> =
        HashMap::with_capacity(readings.size_hint().0);
    let mut buckets: Vec<Option<Rollup>> = Vec::with_capacity(readings.size_hint().0);
    for r in readings {
        let bucket = width.bucket(r.date);
        let i = *index.entry((r.vin.as_str(), bucket)).or_insert_with(|| {
            buckets.push(Some(Rollup::empty(r.vin.clone(), bucket)));
            buckets.len() - 1
        });
        if let Some(rollup) = &mut buckets[i] {
            rollup.add(r);
        }
    }
    let mut order: Vec<_> = index.into_iter().collect();
    order.sort_unstable();
    order
        .into_iter()
        .filter_map(|(_, i)| buckets[i].take())
        .collect()
}

/// The buckets of both widths from minute buckets (of any batches, in any order): minutes of
/// one car and minute merge, hours merge the minutes they hold. Sorted by VIN then bucket, the
/// order every writer upserts them in.
fn by_width(minutes: impl IntoIterator<Item = Rollup>) -> [(Width, Vec<Rollup>); 2] {
    let mut merged: BTreeMap<(Vin, DateTime<Utc>), Rollup> = BTreeMap::new();
    for minute in minutes {
        match merged.entry((minute.vin.clone(), minute.bucket)) {
            std::collections::btree_map::Entry::Occupied(mut kept) => kept.get_mut().merge(&minute),
            std::collections::btree_map::Entry::Vacant(slot) => {
                slot.insert(minute);
            }
        }
    }
    let mut hours: BTreeMap<(&Vin, DateTime<Utc>), Rollup> = BTreeMap::new();
    for ((vin, bucket), minute) in &merged {
        let hour = Width::Hour.bucket(*bucket);
        hours
            .entry((vin, hour))
            .or_insert_with(|| Rollup::empty(vin.clone(), hour))
            .merge(minute);
    }
    let hours = hours.into_values().collect();
    [
        (Width::Minute, merged.into_values().collect()),
        (Width::Hour, hours),
    ]
}

/// The minute buckets and cars' newest readings this many queued batches may hold in memory at
/// once, all batches together (about 30 MB); past it, new batches are read back when applied.
const KEPT_BUCKETS: usize = 100_000;

/// A queued batch of sensor rows: its queue id and the first row id it added. SQLite reuses a
/// deleted greatest id, so the id alone could name another process's batch after this one was
/// applied elsewhere; with its first row, it cannot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct QueuedBatch {
    /// `rollup_batches.id`.
    pub(crate) id: i64,
    /// The least `sensor_data.id` of its rows.
    pub(crate) first_row: i64,
}

/// The summaries of the batches this process queued and no pass has applied yet:
/// [`Rollups::apply_pending`] merges them instead of reading their rows back.
#[derive(Debug, Default)]
pub(crate) struct QueuedSummaries {
    kept: Mutex<KeptBatches>,
}

#[derive(Debug, Default)]
struct KeptBatches {
    batches: HashMap<QueuedBatch, BatchSummary>,
    buckets: usize,
}

/// What a batch adds: its minute buckets and each car's newest reading.
#[derive(Debug, Default)]
pub(crate) struct BatchSummary {
    minutes: Vec<Rollup>,
    newest: Vec<NewestReading>,
}

impl BatchSummary {
    /// The summary of `readings`.
    pub(crate) fn of(readings: &[TelemetryReading]) -> BatchSummary {
        BatchSummary {
            minutes: summarise(Width::Minute, readings),
            newest: newest_per_vehicle(readings),
        }
    }

    /// Its size against [`KEPT_BUCKETS`].
    fn buckets(&self) -> usize {
        self.minutes.len() + self.newest.len()
    }

    fn extend(&mut self, other: BatchSummary) {
        self.minutes.extend(other.minutes);
        self.newest.extend(other.newest);
    }
}

impl QueuedSummaries {
    /// Keeps the summary of `batch` (committed), whose rows are exactly the readings `summary`
    /// was made of; not when [`KEPT_BUCKETS`] are kept already.
    pub(crate) fn keep(&self, batch: QueuedBatch, summary: BatchSummary) {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        if kept.buckets + summary.buckets() > KEPT_BUCKETS {
            return;
        }
        kept.buckets += summary.buckets();
        if let Some(replaced) = kept.batches.insert(batch, summary) {
            kept.buckets -= replaced.buckets();
        }
    }

    /// Takes the kept summaries of `listed` (the queue's oldest batches, by id) and returns
    /// them with the batches it had none for. Kept batches up to the last listed id that are
    /// not listed are dropped: another process applied them, or (PostgreSQL) they committed
    /// after the queue was read, and a later pass reads their rows back.
    fn take(&self, listed: &[QueuedBatch]) -> (BatchSummary, Vec<QueuedBatch>) {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let mut taken = BatchSummary::default();
        let mut missing = Vec::new();
        for batch in listed {
            match kept.batches.remove(batch) {
                Some(summary) => {
                    kept.buckets -= summary.buckets();
                    taken.extend(summary);
                }
                None => missing.push(*batch),
            }
        }
        if let Some(last) = listed.iter().map(|b| b.id).max() {
            let mut dropped = 0;
            kept.batches.retain(|batch, summary| {
                let stale = batch.id <= last;
                if stale {
                    dropped += summary.buckets();
                }
                !stale
            });
            kept.buckets -= dropped;
        }
        (taken, missing)
    }
}

/// What one [`Rollups::apply_pending`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// Queued batches added to the rollups.
    pub batches: u64,
    /// How many of them were summarised from memory (the rest had their rows read back).
    pub from_memory: u64,
}

/// The measures with [`Stats`], as their columns are named.
const MEASURES: [&str; 3] = ["battery", "speed", "range"];

/// The stamped values: their columns (date, event id, then the value's), and whether the
/// later (`>`) or the earlier (`<`) event time wins.
const STAMPED: [(&[&str], &str); 3] = [
    (
        &["first_battery_date", "first_battery_event", "first_battery"],
        "<",
    ),
    (
        &["last_battery_date", "last_battery_event", "last_battery"],
        ">",
    ),
    (
        &["position_date", "position_event", "latitude", "longitude"],
        ">",
    ),
];

/// Every column of a rollup table, in the order the writers bind them.
fn columns() -> Vec<String> {
    let mut columns = vec!["vin".to_owned(), "bucket".to_owned(), "readings".to_owned()];
    for m in MEASURES {
        for part in ["n", "sum", "min", "max"] {
            columns.push(format!("{m}_{part}"));
        }
    }
    for (stamped, _) in STAMPED {
        columns.extend(stamped.iter().map(|c| (*c).to_owned()));
    }
    columns
}

/// The upsert's merge (SQL for [`Rollup::merge`]): counts and sums add, least and greatest
/// keep theirs, each stamped value follows the earlier or later event time. `least`/`greatest`
/// name the backend's functions; the `COALESCE`s let a side without values lose.
fn on_conflict(table: &str, least: &str, greatest: &str) -> String {
    let mut sets = vec![format!("readings = {table}.readings + excluded.readings")];
    for m in MEASURES {
        for part in ["n", "sum"] {
            sets.push(format!(
                "{m}_{part} = {table}.{m}_{part} + excluded.{m}_{part}"
            ));
        }
        for (part, f) in [("min", least), ("max", greatest)] {
            let c = format!("{m}_{part}");
            sets.push(format!(
                "{c} = {f}(COALESCE({table}.{c}, excluded.{c}), COALESCE(excluded.{c}, {table}.{c}))"
            ));
        }
    }
    for (stamped, wins) in STAMPED {
        let (date, event) = (stamped[0], stamped[1]);
        let when = format!(
            "{table}.{date} IS NULL OR \
             (excluded.{date}, excluded.{event}) {wins} ({table}.{date}, {table}.{event})"
        );
        sets.extend(replaced_when(table, stamped.iter().copied(), &when));
    }
    format!(
        " ON CONFLICT (vin, bucket) DO UPDATE SET {}",
        sets.join(", ")
    )
}

/// Queues the ids of the sensor rows a batch added for the rollups and the cars' states, inside
/// the batch's transaction (SQLite, where one writer at a time makes a batch's ids a range;
/// PostgreSQL queues in the batch's insert statement, [`crate::SensorRows::insert`]): one row
/// per batch, whatever its size, so the write path does not wait for the pass. Returns the
/// queued batch's id.
pub(crate) async fn queue_sqlite(
    conn: &mut SqliteConnection,
    first: i64,
    last: i64,
) -> Result<i64, DbError> {
    let queued = sqlx::query("INSERT INTO rollup_batches (first_row, last_row) VALUES ($1, $2)")
        .bind(first)
        .bind(last)
        .execute(&mut *conn)
        .await?;
    Ok(queued.last_insert_rowid())
}

/// Merges `rollups` into the table of `width` with one `UNNEST` upsert (PostgreSQL).
async fn upsert_pg(
    tx: &mut Transaction<'_, Postgres>,
    width: Width,
    rollups: &[Rollup],
) -> Result<(), DbError> {
    if rollups.is_empty() {
        return Ok(());
    }
    let casts = [
        "text",
        "timestamptz",
        "int8",
        "int8",
        "float8",
        "float8",
        "float8",
        "int8",
        "float8",
        "float8",
        "float8",
        "int8",
        "float8",
        "float8",
        "float8",
        "timestamptz",
        "uuid",
        "float8",
        "timestamptz",
        "uuid",
        "float8",
        "timestamptz",
        "uuid",
        "float8",
        "float8",
    ];
    let arrays: Vec<String> = casts
        .iter()
        .enumerate()
        .map(|(i, cast)| format!("${}::{cast}[]", i + 1))
        .collect();
    let table = width.table();
    let sql = format!(
        "INSERT INTO {table} ({}) SELECT * FROM UNNEST({}){}",
        columns().join(", "),
        arrays.join(", "),
        on_conflict(table, "LEAST", "GREATEST")
    );
    let mut query = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(rollups.iter().map(|r| r.vin.as_str()).collect::<Vec<_>>())
        .bind(rollups.iter().map(|r| r.bucket).collect::<Vec<_>>())
        .bind(rollups.iter().map(|r| r.readings).collect::<Vec<_>>());
    for stats in [
        |r: &Rollup| r.battery,
        |r: &Rollup| r.speed,
        |r: &Rollup| r.range,
    ] {
        query = query
            .bind(rollups.iter().map(|r| stats(r).n).collect::<Vec<_>>())
            .bind(rollups.iter().map(|r| stats(r).sum).collect::<Vec<_>>())
            .bind(rollups.iter().map(|r| stats(r).min).collect::<Vec<_>>())
            .bind(rollups.iter().map(|r| stats(r).max).collect::<Vec<_>>());
    }
    for battery in [|r: &Rollup| r.first_battery, |r: &Rollup| r.last_battery] {
        query = query
            .bind(
                rollups
                    .iter()
                    .map(|r| battery(r).map(|s| s.date))
                    .collect::<Vec<_>>(),
            )
            .bind(
                rollups
                    .iter()
                    .map(|r| battery(r).map(|s| s.event_id))
                    .collect::<Vec<_>>(),
            )
            .bind(
                rollups
                    .iter()
                    .map(|r| battery(r).map(|s| s.value))
                    .collect::<Vec<_>>(),
            );
    }
    query
        .bind(
            rollups
                .iter()
                .map(|r| r.position.map(|s| s.date))
                .collect::<Vec<_>>(),
        )
        .bind(
            rollups
                .iter()
                .map(|r| r.position.map(|s| s.event_id))
                .collect::<Vec<_>>(),
        )
        .bind(
            rollups
                .iter()
                .map(|r| r.position.map(|s| s.value.0))
                .collect::<Vec<_>>(),
        )
        .bind(
            rollups
                .iter()
                .map(|r| r.position.map(|s| s.value.1))
                .collect::<Vec<_>>(),
        )
        .execute(&mut **tx)
        .await?;
    Ok(())
}

/// Merges `rollups` into the table of `width` with multi-row upserts (SQLite).
async fn upsert_sqlite(
    conn: &mut SqliteConnection,
    width: Width,
    rollups: &[Rollup],
) -> Result<(), DbError> {
    // Built once per table: the statement's text is the key of its prepared statement.
    static STATEMENTS: std::sync::OnceLock<[(String, String); 2]> = std::sync::OnceLock::new();
    let statements = STATEMENTS.get_or_init(|| {
        Width::ALL.map(|width| {
            let table = width.table();
            (
                format!("INSERT INTO {table} ({}) ", columns().join(", ")),
                on_conflict(table, "MIN", "MAX"),
            )
        })
    });
    let (insert, on_conflict) = match width {
        Width::Minute => &statements[0],
        Width::Hour => &statements[1],
    };
    sqlite_insert_in(conn, insert, on_conflict, rollups, |row, r| {
        row.push_bind(r.vin.as_str())
            .push_bind(sqlite_time(&r.bucket))
            .push_bind(r.readings);
        for stats in [r.battery, r.speed, r.range] {
            row.push_bind(stats.n)
                .push_bind(stats.sum)
                .push_bind(stats.min)
                .push_bind(stats.max);
        }
        for battery in [r.first_battery, r.last_battery] {
            row.push_bind(battery.map(|s| sqlite_time(&s.date)))
                .push_bind(battery.map(|s| s.event_id.to_string()))
                .push_bind(battery.map(|s| s.value));
        }
        row.push_bind(r.position.map(|s| sqlite_time(&s.date)))
            .push_bind(r.position.map(|s| s.event_id.to_string()))
            .push_bind(r.position.map(|s| s.value.0))
            .push_bind(r.position.map(|s| s.value.1));
    })
    .await
    .map(|_| ())
}

/// The rollup tables.
#[derive(Clone, Debug)]
pub struct Rollups {
    pub(crate) db: Database,
}

impl Rollups {
    /// A page of one car's buckets of `width` for its history: up to `limit` that start in
    /// `[from, to)`, oldest first. The next page starts one bucket after the last of this one
    /// (buckets are aligned to their width); each page is one short query.
    pub async fn history_page(
        &self,
        width: Width,
        vin: &Vin,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        limit: i64,
    ) -> Result<Vec<Rollup>, DbError> {
        let sql = format!(
            "SELECT {} FROM {} WHERE vin = $1 AND bucket >= $2 AND bucket < $3
             ORDER BY bucket LIMIT $4",
            columns().join(", "),
            width.table()
        );
        match &self.db.pool {
            Pool::Postgres(pool) => sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(vin.as_str())
                .bind(from)
                .bind(to)
                .bind(limit)
                .fetch_all(pool)
                .await?
                .iter()
                .map(pg_rollup)
                .collect(),
            Pool::Sqlite(pool) => sqlx::query(sqlx::AssertSqlSafe(sql))
                .bind(vin.as_str())
                .bind(sqlite_time(&from))
                .bind(sqlite_time(&to))
                .bind(limit)
                .fetch_all(pool)
                .await?
                .iter()
                .map(sqlite_rollup)
                .collect(),
        }
    }

    /// Adds up to `limit` queued batches of sensor rows to the minute and hour rollups, in one
    /// transaction that also takes them off the queue: each row counts once, whichever worker
    /// applies it, and a crash leaves the batches queued. The batches this process queued are
    /// summarised from memory, the others from their rows read back; many batches of one car
    /// and minute make one upsert. Call again while it applies `limit`.
    pub async fn apply_pending(&self, limit: i64) -> Result<Applied, DbError> {
        let select = crate::sensor_rows::COLUMNS;
        match &self.db.pool {
            Pool::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                // SKIP LOCKED: two workers take different batches instead of waiting. A batch
                // names its rows' ids as ranges; one queued by an earlier version, as an array.
                // (The ranges travel as text: the driver has no multirange type.)
                type Queued = (
                    i64,
                    String,
                    i64,
                    Option<DateTime<Utc>>,
                    Option<DateTime<Utc>>,
                );
                let mut batches: Vec<Queued> = sqlx::query_as(
                    "WITH taken AS (
                       DELETE FROM rollup_batches WHERE id IN
                         (SELECT id FROM rollup_batches ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED)
                       RETURNING id, first_date, last_date, COALESCE(row_ranges,
                         (SELECT range_agg(int8range(i, i, '[]')) FROM unnest(row_ids) AS i))
                         AS ranges)
                     SELECT id, ranges::text, lower(ranges), first_date, last_date FROM taken",
                )
                .bind(limit)
                .fetch_all(&mut *tx)
                .await?;
                batches.sort_unstable_by_key(|b| b.0);
                let listed: Vec<QueuedBatch> = batches
                    .iter()
                    .map(|b| QueuedBatch {
                        id: b.0,
                        first_row: b.2,
                    })
                    .collect();
                let (mut taken, missing) = self.db.queued.take(&listed);
                let unread: Vec<&Queued> = batches
                    .iter()
                    .filter(|b| missing.iter().any(|m| m.id == b.0))
                    .collect();
                if !unread.is_empty() {
                    let ranges: Vec<&str> = unread.iter().map(|b| b.1.as_str()).collect();
                    // The days the rows are dated on, so only their partitions are read; a
                    // batch queued before the dates were kept may be on any day.
                    // (None sorts first: any batch without dates leaves the range open.)
                    let first = unread.iter().map(|b| b.3).min().flatten();
                    let last = match unread.iter().all(|b| b.4.is_some()) {
                        true => unread.iter().map(|b| b.4).max().flatten(),
                        false => None,
                    };
                    // Each range is an index range scan of the days' partitions, a few
                    // milliseconds; but the planner cannot tell how many rows a range holds,
                    // guesses millions, and past `jit_above_cost` compiled the query first:
                    // 180 ms of every pass that read a batch back, measured. No JIT, then.
                    sqlx::query("SET LOCAL jit = off").execute(&mut *tx).await?;
                    let sql = format!(
                        "SELECT {select}
                         FROM unnest($1::text[]::int8multirange[]) AS batch, unnest(batch) AS ids,
                              sensor_data
                         WHERE id >= lower(ids) AND id < upper(ids)
                           AND date >= COALESCE($2, '-infinity'::timestamptz)
                           AND date <= COALESCE($3, 'infinity'::timestamptz)"
                    );
                    let readings = sqlx::query(sqlx::AssertSqlSafe(sql))
                        .bind(&ranges)
                        .bind(first)
                        .bind(last)
                        .fetch_all(&mut *tx)
                        .await?
                        .iter()
                        .map(crate::sensor_rows::pg_reading)
                        .collect::<Result<Vec<_>, _>>()?;
                    taken.extend(BatchSummary::of(&readings));
                }
                // The same order as every other writer of these tables: the minutes, the
                // hours, then the cars' states (each by VIN).
                for (width, rollups) in by_width(taken.minutes) {
                    upsert_pg(&mut tx, width, &rollups).await?;
                }
                vehicle_states::upsert_pg(&mut tx, &merge_newest(taken.newest)).await?;
                tx.commit().await?;
                Ok(Applied {
                    batches: listed.len() as u64,
                    from_memory: (listed.len() - missing.len()) as u64,
                })
            }
            Pool::Sqlite(pool) => {
                // SQLite has one writer at a time, and every other writer (the sensor rows',
                // the detector's) waits while one holds the lock: the rows are read and
                // summarised first, outside any transaction (a reader blocks no one in WAL
                // mode), and the lock is taken only to claim the batches and merge. Holding it
                // across the read made every pass stall the readings' commits for most of a
                // second (the pipeline benchmark's `--timeline`).
                let mut conn = pool.acquire().await?;
                let batches: Vec<(i64, i64, i64)> = sqlx::query_as(
                    "SELECT id, first_row, last_row FROM rollup_batches ORDER BY id LIMIT $1",
                )
                .bind(limit)
                .fetch_all(&mut *conn)
                .await?;
                if batches.is_empty() {
                    return Ok(Applied::default());
                }
                let ids: Vec<i64> = batches.iter().map(|b| b.0).collect();
                let listed: Vec<QueuedBatch> = batches
                    .iter()
                    .map(|&(id, first_row, _)| QueuedBatch { id, first_row })
                    .collect();
                let (mut taken, missing) = self.db.queued.take(&listed);
                let sql = format!("SELECT {select} FROM sensor_data WHERE id BETWEEN $1 AND $2");
                let mut readings = Vec::new();
                for (_, first, last) in batches
                    .iter()
                    .filter(|b| missing.iter().any(|m| m.id == b.0))
                {
                    for row in sqlx::query(sqlx::AssertSqlSafe(sql.clone()))
                        .bind(first)
                        .bind(last)
                        .fetch_all(&mut *conn)
                        .await?
                    {
                        readings.push(crate::sensor_rows::sqlite_reading(&row)?);
                    }
                }
                drop(conn);
                taken.extend(BatchSummary::of(&readings));
                let summaries = by_width(taken.minutes);
                let newest = merge_newest(taken.newest);
                let list = serde_json::Value::from(ids.clone()).to_string();
                let writer = self.db.sqlite_writer.as_ref().unwrap_or(pool);
                let mut tx = writer.begin_with("BEGIN IMMEDIATE").await?;
                let claimed = sqlx::query(
                    "DELETE FROM rollup_batches WHERE id IN (SELECT value FROM json_each($1))",
                )
                .bind(list)
                .execute(&mut *tx)
                .await?
                .rows_affected();
                if claimed != ids.len() as u64 {
                    // Another worker on this file applied some of them since they were read:
                    // leave the rest to the next pass, which reads what is still queued.
                    tx.rollback().await?;
                    return Ok(Applied::default());
                }
                for (width, rollups) in &summaries {
                    upsert_sqlite(&mut tx, *width, rollups).await?;
                }
                vehicle_states::upsert_sqlite(&mut tx, &newest).await?;
                tx.commit().await?;
                Ok(Applied {
                    batches: ids.len() as u64,
                    from_memory: (ids.len() - missing.len()) as u64,
                })
            }
        }
    }

    /// Summarises up to `batch` of the sensor rows stored before the rollups existed (the
    /// migration that made them left their range in `rollup_backfill`); returns how many ids
    /// remain, 0 when done. Each step is one transaction that claims its range first, so two
    /// workers never summarise a row twice and a crash loses no progress.
    pub async fn backfill(&self, batch: i64) -> Result<i64, DbError> {
        const CLAIM: &str = "UPDATE rollup_backfill SET next_id = next_id + $1
                             RETURNING next_id - $1, last_id";
        const DONE: &str = "DELETE FROM rollup_backfill WHERE next_id > last_id";
        let select = format!(
            "SELECT {} FROM sensor_data WHERE id >= $1 AND id < $2 AND id <= $3",
            crate::sensor_rows::COLUMNS
        );
        // One step on either backend: `$decode` reads a row, `$upsert` merges into a table.
        macro_rules! step {
            ($pool:expr, $decode:path, $upsert:ident) => {{
                let mut tx = $pool.begin().await?;
                let Some((from, last)) = sqlx::query_as::<_, (i64, i64)>(CLAIM)
                    .bind(batch)
                    .fetch_optional(&mut *tx)
                    .await?
                else {
                    return Ok(0);
                };
                let readings = sqlx::query(sqlx::AssertSqlSafe(select))
                    .bind(from)
                    .bind(from + batch)
                    .bind(last)
                    .fetch_all(&mut *tx)
                    .await?
                    .iter()
                    .map($decode)
                    .collect::<Result<Vec<_>, _>>()?;
                for width in Width::ALL {
                    $upsert(&mut tx, width, &summarise(width, &readings)).await?;
                }
                sqlx::query(DONE).execute(&mut *tx).await?;
                tx.commit().await?;
                Ok((last - (from + batch) + 1).max(0))
            }};
        }
        match &self.db.pool {
            Pool::Postgres(pool) => step!(pool, crate::sensor_rows::pg_reading, upsert_pg),
            Pool::Sqlite(pool) => step!(
                self.db.sqlite_writer.as_ref().unwrap_or(pool),
                crate::sensor_rows::sqlite_reading,
                upsert_sqlite
            ),
        }
    }

    /// Deletes up to `batch` buckets of `width` that started before `cutoff` (retention);
    /// returns how many. Call again while it returns `batch`.
    pub async fn delete_before(
        &self,
        width: Width,
        cutoff: DateTime<Utc>,
        batch: i64,
    ) -> Result<u64, DbError> {
        let table = width.table();
        let deleted = match &self.db.pool {
            Pool::Postgres(pool) => {
                let sql = format!(
                    "DELETE FROM {table} WHERE (vin, bucket) IN
                       (SELECT vin, bucket FROM {table} WHERE bucket < $1 LIMIT $2)"
                );
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(cutoff)
                    .bind(batch)
                    .execute(pool)
                    .await?
                    .rows_affected()
            }
            Pool::Sqlite(pool) => {
                let pool = self.db.sqlite_writer.as_ref().unwrap_or(pool);
                let sql = format!(
                    "DELETE FROM {table} WHERE (vin, bucket) IN
                       (SELECT vin, bucket FROM {table} WHERE bucket < $1 LIMIT $2)"
                );
                sqlx::query(sqlx::AssertSqlSafe(sql))
                    .bind(sqlite_time(&cutoff))
                    .bind(batch)
                    .execute(pool)
                    .await?
                    .rows_affected()
            }
        };
        Ok(deleted)
    }
}

fn stamped<T>(
    date: Option<DateTime<Utc>>,
    event_id: Option<Uuid>,
    value: Option<T>,
) -> Option<Stamped<T>> {
    Some(Stamped {
        date: date?,
        event_id: event_id?,
        value: value?,
    })
}

fn pg_rollup(row: &sqlx::postgres::PgRow) -> Result<Rollup, DbError> {
    let stats = |m: &str| -> Result<Stats, DbError> {
        Ok(Stats {
            n: row.try_get(format!("{m}_n").as_str())?,
            sum: row.try_get(format!("{m}_sum").as_str())?,
            min: row.try_get(format!("{m}_min").as_str())?,
            max: row.try_get(format!("{m}_max").as_str())?,
        })
    };
    let battery = |prefix: &str| -> Result<Option<Stamped<f64>>, DbError> {
        Ok(stamped(
            row.try_get(format!("{prefix}_date").as_str())?,
            row.try_get(format!("{prefix}_event").as_str())?,
            row.try_get(prefix)?,
        ))
    };
    let latitude: Option<f64> = row.try_get("latitude")?;
    let longitude: Option<f64> = row.try_get("longitude")?;
    Ok(Rollup {
        vin: parse_vin(row.try_get("vin")?)?,
        bucket: row.try_get("bucket")?,
        readings: row.try_get("readings")?,
        battery: stats("battery")?,
        speed: stats("speed")?,
        range: stats("range")?,
        first_battery: battery("first_battery")?,
        last_battery: battery("last_battery")?,
        position: stamped(
            row.try_get("position_date")?,
            row.try_get("position_event")?,
            latitude.zip(longitude),
        ),
    })
}

fn sqlite_rollup(row: &sqlx::sqlite::SqliteRow) -> Result<Rollup, DbError> {
    let stats = |m: &str| -> Result<Stats, DbError> {
        Ok(Stats {
            n: row.try_get(format!("{m}_n").as_str())?,
            sum: row.try_get(format!("{m}_sum").as_str())?,
            min: row.try_get(format!("{m}_min").as_str())?,
            max: row.try_get(format!("{m}_max").as_str())?,
        })
    };
    let time = |column: &str| -> Result<Option<DateTime<Utc>>, DbError> {
        row.try_get::<Option<String>, _>(column)?
            .map(parse_time)
            .transpose()
    };
    let event = |column: &str| -> Result<Option<Uuid>, DbError> {
        row.try_get::<Option<String>, _>(column)?
            .map(parse_uuid)
            .transpose()
    };
    let battery = |prefix: &str| -> Result<Option<Stamped<f64>>, DbError> {
        Ok(stamped(
            time(&format!("{prefix}_date"))?,
            event(&format!("{prefix}_event"))?,
            row.try_get(prefix)?,
        ))
    };
    let latitude: Option<f64> = row.try_get("latitude")?;
    let longitude: Option<f64> = row.try_get("longitude")?;
    Ok(Rollup {
        vin: parse_vin(row.try_get("vin")?)?,
        bucket: parse_time(row.try_get("bucket")?)?,
        readings: row.try_get("readings")?,
        battery: stats("battery")?,
        speed: stats("speed")?,
        range: stats("range")?,
        first_battery: battery("first_battery")?,
        last_battery: battery("last_battery")?,
        position: stamped(
            time("position_date")?,
            event("position_event")?,
            latitude.zip(longitude),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn reading(vin: usize, seconds: i64, battery: Option<f64>, id: u128) -> TelemetryReading {
        const VINS: [&str; 3] = [
            "1HGCM82633A004352",
            "2HGCM82633A004352",
            "3HGCM82633A004352",
        ];
        TelemetryReading {
            event_id: Uuid::from_u128(id),
            received_at: DateTime::from_timestamp(1_800_000_000, 0).unwrap_or_default(),
            vin: Vin::parse(VINS[vin % 3]).unwrap_or_else(|_| unreachable!()),
            name: None,
            profile: None,
            range: battery.map(|b| b * 3.0),
            mpge: None,
            battery,
            malfunction: None,
            speed: (seconds % 2 == 0).then_some(seconds as f64),
            latitude: battery.map(|_| seconds as f64 / 1000.0),
            longitude: battery.map(|_| -(seconds as f64) / 1000.0),
            date: DateTime::from_timestamp(1_800_000_000 + seconds, 0).unwrap_or_default(),
        }
    }

    fn readings() -> impl Strategy<Value = Vec<TelemetryReading>> {
        // Few cars, dates over three hours at coarse steps (ties of date happen), some readings
        // without a battery.
        prop::collection::vec(
            (0..3usize, 0..180i64, prop::option::of(0.0..100.0f64)),
            1..60,
        )
        .prop_map(|specs| {
            specs
                .into_iter()
                .enumerate()
                .map(|(i, (vin, minute, battery))| {
                    reading(vin, minute * 60 + (i as i64 % 3), battery, i as u128 + 1)
                })
                .collect()
        })
    }

    fn close(a: &[Rollup], b: &[Rollup]) -> bool {
        a.len() == b.len()
            && a.iter().zip(b).all(|(a, b)| {
                let sums = |r: &Rollup| [r.battery.sum, r.speed.sum, r.range.sum];
                let mut a2 = a.clone();
                let mut b2 = b.clone();
                for s in [&mut a2, &mut b2] {
                    s.battery.sum = 0.0;
                    s.speed.sum = 0.0;
                    s.range.sum = 0.0;
                }
                a2 == b2
                    && sums(a)
                        .iter()
                        .zip(sums(b))
                        .all(|(x, y)| (x - y).abs() <= 1e-9 * x.abs().max(1.0))
            })
    }

    proptest! {
        #[test]
        fn merging_the_buckets_of_any_split_equals_summarising_at_once(
            all in readings(),
            cut in 0usize..60,
            width in prop_oneof![Just(Width::Minute), Just(Width::Hour)],
        ) {
            let cut = cut.min(all.len());
            let (left, right) = all.split_at(cut);
            let mut merged: BTreeMap<(String, DateTime<Utc>), Rollup> = BTreeMap::new();
            // The right part first: the order batches commit in does not matter.
            for part in [right, left] {
                for r in summarise(width, part) {
                    match merged.entry((r.vin.as_str().to_owned(), r.bucket)) {
                        std::collections::btree_map::Entry::Occupied(mut e) => e.get_mut().merge(&r),
                        std::collections::btree_map::Entry::Vacant(e) => { e.insert(r); }
                    }
                }
            }
            let merged: Vec<Rollup> = merged.into_values().collect();
            prop_assert!(close(&merged, &summarise(width, &all)));
        }
    }

    proptest! {
        #[test]
        fn a_bucket_starts_where_truncating_to_its_width_does(
            seconds in -100_000_000_000i64..100_000_000_000,
            nanos in 0u32..1_000_000_000,
        ) {
            let time = DateTime::from_timestamp(seconds, nanos).unwrap_or_default();
            use chrono::DurationRound;
            // (chrono truncates only times within 1677–2262, nanoseconds in an i64.)
            for width in Width::ALL {
                if let Ok(start) = time.duration_trunc(width.length()) {
                    prop_assert_eq!(width.bucket(time), start);
                }
            }
        }
    }

    #[test]
    fn a_bucket_counts_min_mean_max_first_and_last() {
        let rs = [
            reading(0, 10, Some(80.0), 1),
            reading(0, 50, None, 2),
            reading(0, 30, Some(70.0), 3),
            reading(0, 61, Some(10.0), 4),
        ];
        let minutes = summarise(Width::Minute, &rs);
        assert_eq!(minutes.len(), 2);
        let first = &minutes[0];
        assert_eq!(first.readings, 3);
        assert_eq!((first.battery.n, first.battery.mean()), (2, Some(75.0)));
        assert_eq!(
            (first.battery.min, first.battery.max),
            (Some(70.0), Some(80.0))
        );
        assert_eq!(first.first_battery.map(|s| s.value), Some(80.0));
        assert_eq!(first.last_battery.map(|s| s.value), Some(70.0));
        assert_eq!(first.position.map(|s| s.value), Some((0.03, -0.03)));
        // Speed only on even seconds: 10, 50 and 30 have one; their mean is 30.
        assert_eq!(first.speed.mean(), Some(30.0));
        let hour = summarise(Width::Hour, &rs);
        assert_eq!(hour.len(), 1);
        assert_eq!(hour[0].readings, 4);
        assert_eq!(hour[0].last_battery.map(|s| s.value), Some(10.0));
    }
}
