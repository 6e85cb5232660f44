//! Benchmark: the fleet list (`GET /v1/vehicles`, 1,000 cars) against the size of
//! `sensor_data` on PostgreSQL, and the write path (batches of sensor rows with each car's
//! latest state) on PostgreSQL and SQLite.
//!
//! - list: `ecars up`'s composition on a throwaway PostgreSQL server; `sensor_data` is filled
//!   server-side (`generate_series`) to each size, 1,000 cars get a newest reading through the
//!   product's write path, then `GET /v1/vehicles` is timed (sequential requests, p50 / p99).
//!   The query the list ran before `vehicle_state` (ranking every reading) is timed beside it
//!   with `EXPLAIN ANALYZE`, for contrast;
//! - write: batches of 1,000 readings through `SensorRows::insert`, as the persistence worker
//!   writes them (with their rollup pass, which also writes each car's state, every
//!   [`PASS_EVERY`] batches, timed on its own), from 1,000 cars (one reading each: the most state
//!   rows a batch can have) and from 100 cars (ten each); rows per second. Event ids are what
//!   ingest gives a reading, and on PostgreSQL today's partition already holds `--day-rows`
//!   readings (default 4,000,000: about an hour of 1,000 cars reporting once a second, or seven
//!   minutes of 10,000), because how an index takes new rows shows only once it is large.
//!   Beside it, the write path as it was before the fleet state (issue 15): the same batches in
//!   one `INSERT … ON CONFLICT (event_id) DO NOTHING` into a table of the first migration's
//!   shape (not partitioned, unique event id), holding as many rows. The two take turns ten
//!   batches at a time ([`ROUNDS`] rounds, which goes first alternating), with a checkpoint
//!   every ten rounds: this machine's speed drifts by a fifth between runs minutes apart, and
//!   turns this short give both paths the same drift and the same share of the writes right
//!   after a checkpoint (a page's first change after one writes the whole page to the WAL).
//!   Reported per block of ten rounds and in total, with the WAL each path wrote per row.
//!
//! Run: `cargo bench -p ecars-e2e --bench fleet` (`-- --quick`: smaller tables; `-- --rows
//! 1000000,10000000`: the sizes of the list's table; `-- --day-rows N`).

use std::time::{Duration, Instant};

use chrono::Utc;
use ecars_db::Database;
use ecars_e2e::{PgServer, Pipeline, PipelineOptions};
use ecars_model::telemetry::content_event_id;
use ecars_model::{TelemetryReading, Vin};
use sqlx::PgPool;

const CARS: u32 = 1_000;

fn vin(car: u32) -> Vin {
    Vin::parse(&format!("1BENCH{car:011}")).expect("a valid VIN")
}

/// 1,000 readings: one per car of `cars`, round robin.
fn batch_of(round: u32, cars: u32) -> Vec<TelemetryReading> {
    let now = Utc::now();
    (0..CARS)
        .map(|n| (n, n % cars))
        .map(|(n, car)| TelemetryReading {
            // As ingest makes it: a hash, so random (a time-ordered id would hide what a
            // unique index led by it costs).
            event_id: content_event_id(&vin(car), now, format!("{round}/{n}").as_bytes()),
            received_at: now,
            vin: vin(car),
            name: Some(format!("Car {car}")),
            profile: Some("short".into()),
            range: Some(200.0),
            mpge: Some(110.0),
            battery: Some(f64::from(round % 100)),
            malfunction: Some(false),
            speed: Some(42.0),
            latitude: Some(37.77),
            longitude: Some(-122.41),
            date: now,
        })
        .collect()
}

/// One reading per car of the fleet.
fn batch(round: u32) -> Vec<TelemetryReading> {
    batch_of(round, CARS)
}

/// Readings in a run of SQLite's write path: 200 batches of 1,000.
const RUN: f64 = 200.0 * CARS as f64;

/// Batches one rollup pass takes in this benchmark: about a second of them at these rates, as
/// the persistence worker's pass every `--summary-interval` (1 s) would.
const PASS_EVERY: usize = 40;

/// Rounds of the PostgreSQL comparison; each writes ten batches through each path.
const ROUNDS: u32 = 60;

/// Batches of a path in one round.
const TURN: u32 = 10;

/// Rows per second of 200 batches of 1,000 readings from `cars` cars through the product's
/// write path (SQLite). After every [`PASS_EVERY`] batches the rollup pass (rollups and each
/// car's state) applies them, as the persistence worker's would beside the writes; its time is
/// added to `pass`, not to the write path's.
async fn write_path(db: &Database, cars: u32, pass: &mut Duration) -> f64 {
    let rows = db.sensor_rows();
    let batches: Vec<_> = (0..200).map(|round| batch_of(round, cars)).collect();
    let mut writing = Duration::ZERO;
    for some in batches.chunks(PASS_EVERY) {
        let started = Instant::now();
        for b in some {
            rows.insert(b).await.expect("the batch is written");
        }
        writing += started.elapsed();
        let started = Instant::now();
        ecars_e2e::apply_pending_batches(db)
            .await
            .expect("the rollup pass");
        *pass += started.elapsed();
    }
    RUN / writing.as_secs_f64()
}

/// The position of the WAL, in bytes.
async fn wal_position(pool: &PgPool) -> i64 {
    sqlx::query_scalar("SELECT (pg_current_wal_insert_lsn() - '0/0'::pg_lsn)::bigint")
        .fetch_one(pool)
        .await
        .expect("the WAL")
}

/// The table the write path before issue 15 wrote: `sensor_data` as the first migration made it
/// (its statements up to the next table's), under another name.
fn before_table() -> String {
    const FIRST_MIGRATION: &str =
        include_str!("../../crates/db/migrations/postgres/20261122000001_initial.sql");
    let next = FIRST_MIGRATION
        .find("CREATE TABLE IF NOT EXISTS dead_letters")
        .expect("the first migration creates dead_letters after sensor_data");
    FIRST_MIGRATION[..next].replace("sensor_data", "sensor_data_before_issue_15")
}

/// Writes `batches` as before issue 15: one statement per batch, the sensor rows alone (the
/// statement of that time, verbatim).
async fn write_before_issue_15(pool: &PgPool, batches: &[Vec<TelemetryReading>]) {
    for b in batches {
        let column = |f: fn(&TelemetryReading) -> Option<f64>| b.iter().map(f).collect::<Vec<_>>();
        sqlx::query(
            r#"INSERT INTO sensor_data_before_issue_15
                 (event_id, received_at, vin, name, profile, "range", mpge, battery,
                  malfunction, speed, latitude, longitude, date)
               SELECT * FROM UNNEST($1::uuid[], $2::timestamptz[], $3::text[], $4::text[],
                  $5::text[], $6::float8[], $7::float8[], $8::float8[], $9::bool[],
                  $10::float8[], $11::float8[], $12::float8[], $13::timestamptz[])
               ON CONFLICT (event_id) DO NOTHING"#,
        )
        .bind(b.iter().map(|r| r.event_id).collect::<Vec<_>>())
        .bind(b.iter().map(|r| r.received_at).collect::<Vec<_>>())
        .bind(b.iter().map(|r| r.vin.as_str()).collect::<Vec<_>>())
        .bind(b.iter().map(|r| r.name.as_deref()).collect::<Vec<_>>())
        .bind(b.iter().map(|r| r.profile.as_deref()).collect::<Vec<_>>())
        .bind(column(|r| r.range))
        .bind(column(|r| r.mpge))
        .bind(column(|r| r.battery))
        .bind(b.iter().map(|r| r.malfunction).collect::<Vec<_>>())
        .bind(column(|r| r.speed))
        .bind(column(|r| r.latitude))
        .bind(column(|r| r.longitude))
        .bind(b.iter().map(|r| r.date).collect::<Vec<_>>())
        .execute(pool)
        .await
        .expect("the batch is written");
    }
}

/// What one path did over some rounds.
#[derive(Clone, Copy, Debug, Default)]
struct Tally {
    /// Time spent writing batches (not the passes).
    writing: Duration,
    /// Rows written.
    rows: f64,
    /// WAL written, passes included.
    wal: i64,
    /// Time of the rollup passes.
    pass: Duration,
}

impl Tally {
    fn rate(&self) -> f64 {
        self.rows / self.writing.as_secs_f64()
    }

    /// Rows per second with the passes' time added, as if they ran on the write path.
    fn rate_with_pass(&self) -> f64 {
        self.rows / (self.writing + self.pass).as_secs_f64()
    }

    fn add(&mut self, other: &Tally) {
        self.writing += other.writing;
        self.rows += other.rows;
        self.wal += other.wal;
        self.pass += other.pass;
    }
}

/// The write path before issue 15 and the product's (`db`, the rollup pass every
/// [`PASS_EVERY`] batches), taking turns for [`ROUNDS`] rounds of [`TURN`] batches from `cars`
/// cars each; a checkpoint every ten rounds. Returns each block of ten rounds' tallies, before
/// and now.
async fn compare(pool: &PgPool, db: &Database, cars: u32) -> Vec<[Tally; 2]> {
    let mut blocks = Vec::new();
    let mut block = [Tally::default(); 2];
    let mut batches_now = 0;
    for round in 0..ROUNDS {
        if round % 10 == 0 {
            sqlx::query("CHECKPOINT")
                .execute(pool)
                .await
                .expect("a checkpoint");
        }
        for path in [round % 2, 1 - round % 2] {
            let batches: Vec<_> = (0..TURN)
                .map(|i| batch_of((round * 2 + path) * TURN + i, cars))
                .collect();
            let wal = wal_position(pool).await;
            let started = Instant::now();
            if path == 0 {
                write_before_issue_15(pool, &batches).await;
            } else {
                for b in &batches {
                    db.sensor_rows()
                        .insert(b)
                        .await
                        .expect("the batch is written");
                }
            }
            let tally = &mut block[path as usize];
            tally.writing += started.elapsed();
            tally.rows += f64::from(TURN * CARS);
            if path == 1 {
                batches_now += TURN as usize;
                if batches_now % PASS_EVERY == 0 {
                    let started = Instant::now();
                    ecars_e2e::apply_pending_batches(db)
                        .await
                        .expect("the rollup pass");
                    tally.pass += started.elapsed();
                }
            }
            tally.wal += wal_position(pool).await - wal;
        }
        if round % 10 == 9 {
            blocks.push(std::mem::take(&mut block));
        }
    }
    blocks
}

/// Adds `rows` readings dated today (the last `rows` / 1,000 seconds, not before midnight) to
/// `table`.
fn fill_today(pg: &PgServer, table: &str, rows: u64) {
    generate(
        pg,
        table,
        0..rows,
        &format!("GREATEST(date_trunc('day', now(), 'UTC'), now() - make_interval(secs => i / {CARS}.0))"),
    );
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i].as_secs_f64() * 1000.0
}

/// Fills `sensor_data` to `rows` rows, server-side, a million at a time: 1,000 cars, a reading
/// a second each, in the past.
fn fill(pg: &PgServer, rows: u64) {
    let have: u64 = pg
        .psql("SELECT count(*) FROM sensor_data")
        .expect("count")
        .trim()
        .parse()
        .expect("a number");
    generate(
        pg,
        "sensor_data",
        have..rows,
        &format!("now() - interval '1 day' - make_interval(secs => i / {CARS}.0)"),
    );
}

/// Adds the readings numbered `numbers` to `table`, server-side, a million at a time: 1,000
/// cars, random event ids, reading `i` dated `date` (SQL over `i`); then analyzes the table.
fn generate(pg: &PgServer, table: &str, numbers: std::ops::Range<u64>, date: &str) {
    let mut from = numbers.start;
    while from < numbers.end {
        let to = (from + 1_000_000).min(numbers.end);
        pg.psql(&format!(
            r#"INSERT INTO {table} (event_id, received_at, vin, name, profile, "range", mpge,
                   battery, malfunction, speed, latitude, longitude, date)
               SELECT gen_random_uuid(), t, '1BENCH' || lpad((i % {CARS})::text, 11, '0'), 'Car',
                   'short', 200, 110, 50 + i % 50, false, 40, 37.7, -122.4, t
               FROM generate_series({from}, {to} - 1) AS i, LATERAL (SELECT {date}) AS d(t)"#
        ))
        .expect("the fill");
        from = to;
        eprint!(".");
    }
    pg.psql(&format!("ANALYZE {table}")).expect("analyze");
    eprintln!();
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
    let day_rows: u64 = args
        .iter()
        .position(|a| a == "--day-rows")
        .and_then(|i| args.get(i + 1))
        .map(|n| n.parse().expect("a row count"))
        .unwrap_or(if quick { 400_000 } else { 4_000_000 });
    let sizes: Vec<u64> = args
        .iter()
        .position(|a| a == "--rows")
        .and_then(|i| args.get(i + 1))
        .map(|list| {
            list.split(',')
                .map(|n| n.parse().expect("a row count"))
                .collect()
        })
        .unwrap_or_else(|| {
            if quick {
                vec![100_000, 1_000_000]
            } else {
                vec![1_000_000, 10_000_000]
            }
        });

    println!("# Fleet state: the fleet list against the size of sensor_data, and the write path\n");
    println!("## SQLite write path: 200 batches of 1,000 readings, sensor rows + rollup queue; then the background pass (rollups + vehicle_state)\n");
    println!("| database | 1,000 cars a batch (one reading each) | 100 cars a batch (ten each) | the pass (rollups and state), 1,000 cars / 100 cars |");
    println!("|---|---|---|---|");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let sqlite = Database::connect_lazy(&format!(
        "sqlite://{}",
        dir.path().join("fleet.db").display()
    ))
    .expect("SQLite");
    sqlite.migrate().await.expect("migrations");
    let (mut a_pass, mut b_pass) = (Duration::ZERO, Duration::ZERO);
    let a = write_path(&sqlite, CARS, &mut a_pass).await;
    let b = write_path(&sqlite, 100, &mut b_pass).await;
    let pass_rate = |pass: Duration| RUN / pass.as_secs_f64();
    println!(
        "| SQLite | {a:.0} rows/s | {b:.0} rows/s | {:.0} / {:.0} rows/s |",
        pass_rate(a_pass),
        pass_rate(b_pass)
    );

    // A server of its own, so the fleet list's table below holds only the rows it is sized to.
    let pg = PgServer::start().expect("PostgreSQL");
    let db = Database::connect_lazy(&pg.url()).expect("PostgreSQL");
    db.migrate().await.expect("migrations");
    pg.psql(&before_table()).expect("the table before issue 15");
    eprint!("filling today's partition and the table before issue 15 with {day_rows} rows each");
    fill_today(&pg, "sensor_data", day_rows);
    fill_today(&pg, "sensor_data_before_issue_15", day_rows);
    let pool = PgPool::connect(&pg.url()).await.expect("a pool");
    println!("\n## PostgreSQL write path against the one before issue 15 (sensor rows only, not partitioned, unique event id), taking turns {TURN} batches at a time, {ROUNDS} rounds, a checkpoint every 10 rounds, {day_rows} rows of today stored before; rows/s of each block of 10 rounds; WAL per row (\"now\" includes its passes'); \"with the pass\": the rollup passes' time (rollups and each car's state, every {PASS_EVERY} batches) added, as if the pass ran on the write path\n");
    for cars in [CARS, 100] {
        let blocks = compare(&pool, &db, cars).await;
        println!(
            "\n### {cars} cars a batch ({} reading(s) each)\n",
            CARS / cars
        );
        println!("| rounds | before | now | now / before | now with the pass | WAL a row, before / now |");
        println!("|---|---|---|---|---|---|");
        let mut total = [Tally::default(); 2];
        let row = |label: String, [old, now]: &[Tally; 2]| {
            println!(
                "| {label} | {:.0} rows/s | {:.0} rows/s | {:.3} | {:.0} rows/s | {:.0} / {:.0} B |",
                old.rate(),
                now.rate(),
                now.rate() / old.rate(),
                now.rate_with_pass(),
                old.wal as f64 / old.rows,
                now.wal as f64 / now.rows,
            )
        };
        for (i, tallies) in blocks.iter().enumerate() {
            row(format!("{}–{}", i * 10 + 1, i * 10 + 10), tallies);
            total[0].add(&tallies[0]);
            total[1].add(&tallies[1]);
        }
        row("all".into(), &total);
    }
    pool.close().await;
    db.close().await;
    drop(pg);

    let pg = PgServer::start().expect("PostgreSQL");
    let pipeline = Pipeline::start(PipelineOptions::new(pg.url()))
        .await
        .expect("the pipeline starts");

    println!("\n## GET /v1/vehicles, {CARS} cars, PostgreSQL\n");
    println!("| sensor_data rows | GET /v1/vehicles p50 / p99 | before: ranking every reading (EXPLAIN ANALYZE, median of 3) |");
    println!("|---|---|---|");
    let http = reqwest::Client::new();
    let url = format!("{}/v1/vehicles", pipeline.http_base());
    // The fill's days (up to 50,000 s before yesterday) get partitions of their own, as the
    // persistence worker would have made them while the readings came in.
    let today = chrono::Utc::now().date_naive();
    pipeline
        .db
        .sensor_rows()
        .prepare_days(today - chrono::Days::new(3), today)
        .await
        .expect("the partitions");
    for rows in sizes {
        fill(&pg, rows);
        // Each car's newest reading, through the product's write path.
        pipeline
            .db
            .sensor_rows()
            .insert(&batch(7))
            .await
            .expect("the newest readings");
        // Their state, as the persistence worker's next pass writes it.
        ecars_e2e::apply_pending_batches(&pipeline.db)
            .await
            .expect("the rollup pass");
        let mut took = Vec::new();
        for i in 0..220 {
            let started = Instant::now();
            let answer = http.get(&url).send().await.expect("an answer");
            let cars = answer.json::<Vec<serde_json::Value>>().await.expect("JSON");
            assert_eq!(cars.len(), CARS as usize);
            // The first requests warm the connection pool and the caches.
            if i >= 20 {
                took.push(started.elapsed());
            }
        }
        took.sort();
        let mut before: Vec<f64> = (0..3)
            .map(|_| {
                let plan = pg
                    .psql(
                        "EXPLAIN ANALYZE SELECT * FROM (SELECT s.*, ROW_NUMBER() OVER \
                         (PARTITION BY vin ORDER BY date DESC, event_id DESC) AS rn \
                         FROM sensor_data s) newest WHERE rn = 1 ORDER BY vin",
                    )
                    .expect("the plan");
                plan.lines()
                    .find_map(|l| l.strip_prefix("Execution Time: "))
                    .and_then(|t| t.trim_end_matches(" ms").parse().ok())
                    .expect("an execution time")
            })
            .collect();
        before.sort_by(f64::total_cmp);
        println!(
            "| {rows} | {:.1} / {:.1} ms | {:.0} ms |",
            percentile(&took, 0.5),
            percentile(&took, 0.99),
            before[1]
        );
    }
    pipeline.shutdown().await.expect("a clean stop");
}
