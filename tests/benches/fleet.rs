//! Benchmark: the fleet list (`GET /v1/vehicles`, 1,000 cars) against the size of
//! `sensor_data` on PostgreSQL, and the write path (batches of sensor rows with each car's
//! latest state) on PostgreSQL and SQLite.
//!
//! - list: `ecars up`'s composition on a throwaway PostgreSQL server; `sensor_data` is filled
//!   server-side (`generate_series`) to each size, 1,000 cars get a newest reading through the
//!   product's write path, then `GET /v1/vehicles` is timed (sequential requests, p50 / p99).
//!   The query the list ran before `vehicle_state` (ranking every reading) is timed beside it
//!   with `EXPLAIN ANALYZE`, for contrast;
//! - write: 200 batches of 1,000 readings through `SensorRows::insert`, as the persistence
//!   worker writes them, from 1,000 cars (one reading each: the most state rows a batch can
//!   have) and from 100 cars (ten each); rows per second.
//!
//! Run: `cargo bench -p ecars-e2e --bench fleet` (`-- --quick`: smaller tables; `-- --rows
//! 1000000,10000000`: the sizes).

use std::time::{Duration, Instant};

use chrono::Utc;
use ecars_db::Database;
use ecars_e2e::{PgServer, Pipeline, PipelineOptions};
use ecars_model::{TelemetryReading, Vin};
use uuid::Uuid;

const CARS: u32 = 1_000;

fn vin(car: u32) -> Vin {
    Vin::parse(&format!("1BENCH{car:011}")).expect("a valid VIN")
}

/// 1,000 readings: one per car of `cars`, round robin.
fn batch_of(round: u32, cars: u32) -> Vec<TelemetryReading> {
    let now = Utc::now();
    (0..CARS)
        .map(|n| n % cars)
        .map(|car| TelemetryReading {
            event_id: Uuid::now_v7(),
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

/// Rows per second of 200 batches of 1,000 readings from `cars` cars through the product's
/// write path, then rows per second of adding the queued batches to the rollups (the
/// persistence worker's background step).
async fn write_path(db: &Database, cars: u32) -> (f64, f64) {
    let rows = db.sensor_rows();
    let batches: Vec<_> = (0..200).map(|round| batch_of(round, cars)).collect();
    let started = Instant::now();
    for b in &batches {
        rows.insert(b).await.expect("the batch is written");
    }
    let written = (200.0 * f64::from(CARS)) / started.elapsed().as_secs_f64();
    let started = Instant::now();
    while db
        .rollups()
        .apply_pending(50)
        .await
        .expect("the rollups")
        .batches
        > 0
    {}
    let rolled = (200.0 * f64::from(CARS)) / started.elapsed().as_secs_f64();
    (written, rolled)
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
    let mut from = have;
    while from < rows {
        let to = (from + 1_000_000).min(rows);
        pg.psql(&format!(
            r#"INSERT INTO sensor_data (event_id, received_at, vin, name, profile, "range", mpge,
                   battery, malfunction, speed, latitude, longitude, date)
               SELECT gen_random_uuid(), t, '1BENCH' || lpad((i % {CARS})::text, 11, '0'), 'Car',
                   'short', 200, 110, 50 + i % 50, false, 40, 37.7, -122.4, t
               FROM generate_series({from}, {to} - 1) AS i,
                    LATERAL (SELECT now() - interval '1 day' - make_interval(secs => i / {CARS}.0)) AS d(t)"#
        ))
        .expect("the fill");
        from = to;
        eprint!(".");
    }
    pg.psql("ANALYZE sensor_data").expect("analyze");
    eprintln!();
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let quick = args.iter().any(|a| a == "--quick");
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
    println!("## write path: 200 batches of 1,000 readings, sensor rows + vehicle_state + rollup queue; then the rollups' background step\n");
    println!("| database | 1,000 cars a batch (one reading each) | 100 cars a batch (ten each) | rollups, 1,000 cars / 100 cars |");
    println!("|---|---|---|---|");
    let dir = tempfile::tempdir().expect("a temporary directory");
    let sqlite = Database::connect_lazy(&format!(
        "sqlite://{}",
        dir.path().join("fleet.db").display()
    ))
    .expect("SQLite");
    sqlite.migrate().await.expect("migrations");
    let (a, b) = (
        write_path(&sqlite, CARS).await,
        write_path(&sqlite, 100).await,
    );
    println!(
        "| SQLite | {:.0} rows/s | {:.0} rows/s | {:.0} / {:.0} rows/s |",
        a.0, b.0, a.1, b.1
    );

    let pg = PgServer::start().expect("PostgreSQL");
    let pipeline = Pipeline::start(PipelineOptions::new(pg.url()))
        .await
        .expect("the pipeline starts");
    let (a, b) = (
        write_path(&pipeline.db, CARS).await,
        write_path(&pipeline.db, 100).await,
    );
    println!(
        "| PostgreSQL | {:.0} rows/s | {:.0} rows/s | {:.0} / {:.0} rows/s |",
        a.0, b.0, a.1, b.1
    );

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
