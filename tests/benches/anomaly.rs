//! Benchmark of the anomaly worker:
//!
//! - detection throughput: readings/s through the detector with its per-car state and case
//!   outbox committed per batch, on a throwaway PostgreSQL server (in-process bus);
//! - API economy: Salesforce calls (token and vehicle look-ups included) to open 1,000 Cases for
//!   1,000 cars, then 1,000 more on the same cars (steady state: token and vehicles cached), against
//!   the emulator.
//!
//! Run: `cargo bench -p ecars-e2e --bench anomaly` (`--quick` for a smaller run). Results are
//! printed and written to `bench-results/anomaly.json`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{TimeDelta, Utc};
use ecars_anomaly::salesforce::{SalesforceClient, SalesforceConfig};
use ecars_anomaly::sync::{CaseSync, SyncPolicy};
use ecars_anomaly::{AnomalyConfig, AnomalyWorker};
use ecars_bus::Bus;
use ecars_db::case_outbox::{CaseDraft, CaseStatus};
use ecars_db::detector_states::StoredState;
use ecars_db::Database;
use ecars_e2e::salesforce::{EmulatorCredentials, SalesforceEmulator};
use ecars_e2e::PgServer;
use ecars_model::{TelemetryReading, Vin};
use futures_util::StreamExt;
use serde_json::{json, Map};
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn reading(vin: &Vin, n: u64, start: chrono::DateTime<Utc>, battery: f64) -> TelemetryReading {
    let date = start + TimeDelta::seconds(n as i64);
    TelemetryReading {
        event_id: uuid::Uuid::now_v7(),
        received_at: date,
        vin: vin.clone(),
        name: Some("bench car".into()),
        profile: Some("medium".into()),
        range: Some(200.0),
        mpge: Some(110.0),
        battery: Some(battery),
        malfunction: Some(false),
        speed: Some(40.0),
        latitude: Some(37.7),
        longitude: Some(-122.4),
        date,
    }
}

async fn detection(url: &str, cars: u32, per_car: u64) -> (u64, f64, usize) {
    let db = Database::connect_lazy(url).unwrap();
    db.migrate().await.unwrap();
    let bus = Bus::in_process(10_000);
    let worker =
        AnomalyWorker::subscribe(&AnomalyConfig::default(), db.clone(), bus.clone(), |_| {})
            .await
            .unwrap();
    let task = tokio::spawn(worker.run(CancellationToken::new()));
    let vins: Vec<Vin> = (0..cars)
        .map(|i| Vin::parse(&ecars_e2e::test_vin(i)).unwrap())
        .collect();
    let start = Utc::now();
    let started = Instant::now();
    // A publish returns once the worker committed the reading: keep thousands in flight, queued
    // in order (the in-process queue is FIFO), as many cars would.
    let readings = (0..per_car).flat_map(|n| {
        vins.iter().enumerate().map(move |(i, vin)| {
            // Every tenth car drains at 6 %/min: its episodes are written too.
            let rate = if i % 10 == 0 { 6.0 } else { 0.5 };
            let battery = 90.0 - rate * n as f64 / 60.0;
            reading(vin, n, start, battery)
        })
    });
    futures_util::stream::iter(readings)
        .map(|r| bus.publish(r))
        .buffered(8_000)
        .for_each(|published| async move { published.unwrap() })
        .await;
    bus.close().await;
    task.await.unwrap().unwrap();
    let seconds = started.elapsed().as_secs_f64();
    let episodes = db.case_outbox().list(None, 10_000).await.unwrap().len();
    (u64::from(cars) * per_car, seconds, episodes)
}

fn draft(vin: &Vin, round: u32) -> CaseDraft {
    let mut fields = Map::new();
    fields.insert(
        "Subject".into(),
        json!(format!("Battery draining fast: {vin}")),
    );
    fields.insert(
        "Description".into(),
        json!("battery fell 5.1 %/min over 60 s"),
    );
    fields.insert("Priority".into(), json!("High"));
    fields.insert("Status".into(), json!("New"));
    fields.insert("Origin".into(), json!("Web"));
    CaseDraft {
        key: format!("{vin}-battery_drain-{round}"),
        vin: vin.clone(),
        rule: "battery_drain".into(),
        started_at: Utc::now(),
        closed_at: None,
        fields,
    }
}

struct Economy {
    cases: usize,
    token: u64,
    queries: u64,
    upserts: u64,
}

impl Economy {
    fn calls(&self) -> u64 {
        self.token + self.queries + self.upserts
    }
}

async fn api_economy(cars: u32) -> (Economy, Economy) {
    let emulator = SalesforceEmulator::start(EmulatorCredentials {
        client_id: "bench".into(),
        client_secret: "bench".into(),
        username: "bench".into(),
        public_key_pem: None,
    })
    .await
    .unwrap();
    let vins: Vec<Vin> = (0..cars)
        .map(|i| Vin::parse(&ecars_e2e::test_vin(i)).unwrap())
        .collect();
    for vin in &vins {
        emulator.add_vehicle(vin.as_str());
    }
    let dir = tempfile::tempdir().unwrap();
    let db =
        Database::connect_lazy(&format!("sqlite://{}", dir.path().join("b.db").display())).unwrap();
    db.migrate().await.unwrap();
    let outbox = db.case_outbox();
    let client = Arc::new(
        SalesforceClient::new(&SalesforceConfig {
            client_id: Some("bench".into()),
            client_secret: Some("bench".into()),
            login_url: emulator.base_url.clone(),
            api_version: "62.0".into(),
            ..Default::default()
        })
        .unwrap(),
    );
    let stop = CancellationToken::new();
    let sync = CaseSync::new(
        outbox.clone(),
        client,
        SyncPolicy {
            idle_poll: Duration::from_millis(20),
            ..SyncPolicy::default()
        },
    );
    let task = tokio::spawn(sync.run(stop.clone()));
    let mut rounds = Vec::new();
    for round in 0..2 {
        let before = emulator.with(|s| (s.token_requests, s.queries, s.upsert_requests));
        let drafts: Vec<_> = vins.iter().map(|v| draft(v, round)).collect();
        // Episodes arrive in detector batches, as they would from the worker.
        for chunk in drafts.chunks(250) {
            let no_states: &[StoredState<'_, ()>] = &[];
            outbox
                .commit(
                    no_states,
                    chunk,
                    None,
                    CaseStatus::Pending,
                    300_000,
                    Utc::now(),
                )
                .await
                .unwrap();
        }
        let want = vins.len() * (round as usize + 1);
        let deadline = Instant::now() + Duration::from_secs(120);
        while outbox
            .list(Some(CaseStatus::Synced), 100_000)
            .await
            .unwrap()
            .len()
            < want
        {
            assert!(Instant::now() < deadline, "cases did not sync");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let after = emulator.with(|s| (s.token_requests, s.queries, s.upsert_requests));
        rounds.push(Economy {
            cases: vins.len(),
            token: after.0 - before.0,
            queries: after.1 - before.1,
            upserts: after.2 - before.2,
        });
    }
    stop.cancel();
    task.await.unwrap().unwrap();
    let steady = rounds.pop().unwrap();
    let first = rounds.pop().unwrap();
    (first, steady)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (cars, per_car) = if quick { (200, 50) } else { (1_000, 200) };
    let pg = PgServer::start().expect("PostgreSQL starts");
    let (readings, seconds, episodes) = detection(&pg.url(), cars, per_car).await;
    let rate = readings as f64 / seconds;
    println!(
        "detection (PostgreSQL): {readings} readings of {cars} cars in {seconds:.2} s = {rate:.0} readings/s; {episodes} episodes"
    );
    let (first, steady) = api_economy(1_000).await;
    for (name, e) in [
        ("cold (token and vehicles fetched)", &first),
        ("steady state", &steady),
    ] {
        println!(
            "API economy, {name}: {} Cases in {} calls (token {}, vehicle queries {}, collections upserts {}) = {:.0} Cases per call",
            e.cases,
            e.calls(),
            e.token,
            e.queries,
            e.upserts,
            e.cases as f64 / e.calls() as f64
        );
    }
    let economy: Vec<serde_json::Value> = [&first, &steady]
        .iter()
        .map(|e| {
            json!({
                "cases": e.cases, "calls": e.calls(), "token": e.token, "queries": e.queries,
                "upserts": e.upserts, "cases_per_call": e.cases as f64 / e.calls() as f64,
            })
        })
        .collect();
    let results = json!({
        "detection_postgres": {"readings": readings, "cars": cars, "seconds": seconds, "readings_per_second": rate, "episodes": episodes},
        "api_economy": economy,
    });
    std::fs::create_dir_all("bench-results").ok();
    std::fs::write(
        "bench-results/anomaly.json",
        serde_json::to_string_pretty(&results).unwrap(),
    )
    .ok();
}
