//! The anomaly worker in process: episodes from readings on the bus to the case outbox, the
//! silence sweep, and a restart that reopens nothing.

use std::time::Duration;

use chrono::{TimeDelta, Utc};
use ecars_anomaly::{AnomalyConfig, AnomalyWorker};
use ecars_bus::Bus;
use ecars_db::case_outbox::CaseStatus;
use ecars_db::Database;
use ecars_e2e::wait_for;
use ecars_model::{TelemetryReading, Vin};
use tokio_util::sync::CancellationToken;

fn reading(
    vin: &Vin,
    date: chrono::DateTime<Utc>,
    battery: f64,
    malfunction: bool,
) -> TelemetryReading {
    TelemetryReading {
        event_id: uuid::Uuid::now_v7(),
        received_at: date,
        vin: vin.clone(),
        name: Some("Test car".into()),
        profile: None,
        range: None,
        mpge: None,
        battery: Some(battery),
        malfunction: Some(malfunction),
        speed: Some(30.0),
        latitude: None,
        longitude: None,
        date,
    }
}

struct Worker {
    bus: Bus,
    task: tokio::task::JoinHandle<Result<(), ecars_anomaly::AnomalyError>>,
}

async fn start(db: &Database, config: &AnomalyConfig) -> Worker {
    let bus = Bus::in_process(1000);
    let worker = AnomalyWorker::subscribe(config, db.clone(), bus.clone(), |_| {})
        .await
        .unwrap();
    let task = tokio::spawn(worker.run(CancellationToken::new()));
    Worker { bus, task }
}

impl Worker {
    /// Closes the bus: the worker processes what it got, then returns.
    async fn finish(self) {
        self.bus.close().await;
        self.task.await.unwrap().unwrap();
    }
}

async fn sqlite() -> (tempfile::TempDir, Database) {
    let dir = tempfile::tempdir().unwrap();
    let db =
        Database::connect_lazy(&format!("sqlite://{}", dir.path().join("a.db").display())).unwrap();
    db.migrate().await.unwrap();
    (dir, db)
}

#[tokio::test]
async fn a_restart_carries_on_the_episode_and_redelivered_readings_change_nothing() {
    let (_dir, db) = sqlite().await;
    let outbox = db.case_outbox();
    let vin = Vin::parse(&ecars_e2e::test_vin(1)).unwrap();
    let start_at = Utc::now();
    let first: Vec<_> = (0..10)
        .map(|i| reading(&vin, start_at + TimeDelta::seconds(i), 80.0, true))
        .collect();
    let worker = start(&db, &AnomalyConfig::default()).await;
    for r in &first {
        worker.bus.publish(r.clone()).await.unwrap();
    }
    worker.finish().await;
    let rows = outbox.list(None, 10).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].rule, "malfunction_reported");
    assert_eq!(
        rows[0].status,
        CaseStatus::NotConfigured,
        "no Salesforce settings"
    );
    let version = rows[0].version;

    // A new process: the same readings again (at-least-once redelivery), then new ones.
    let worker = start(&db, &AnomalyConfig::default()).await;
    for r in &first {
        worker.bus.publish(r.clone()).await.unwrap();
    }
    worker.finish().await;
    let rows = outbox.list(None, 10).await.unwrap();
    assert_eq!(
        (rows.len(), rows[0].version),
        (1, version),
        "redelivery changed nothing"
    );

    let worker = start(&db, &AnomalyConfig::default()).await;
    worker
        .bus
        .publish(reading(&vin, start_at + TimeDelta::seconds(20), 80.0, true))
        .await
        .unwrap();
    worker.finish().await;
    let rows = outbox.list(None, 10).await.unwrap();
    assert_eq!(
        rows.len(),
        1,
        "the restart updated the open episode, opened none"
    );
    assert!(rows[0].version > version);
}

#[tokio::test]
async fn a_car_that_goes_quiet_opens_a_silence_episode_and_closes_it_when_it_reports() {
    let (dir, db) = sqlite().await;
    let rules = dir.path().join("rules.toml");
    std::fs::write(
        &rules,
        "[telemetry_silent]\nenabled = true\nafter = \"2s\"\n",
    )
    .unwrap();
    let config = AnomalyConfig {
        rules: Some(rules),
        ..AnomalyConfig::default()
    };
    let outbox = db.case_outbox();
    let vin = Vin::parse(&ecars_e2e::test_vin(2)).unwrap();
    let worker = start(&db, &config).await;
    worker
        .bus
        .publish(reading(&vin, Utc::now(), 80.0, false))
        .await
        .unwrap();
    let silent = || async {
        outbox
            .list(None, 10)
            .await
            .unwrap()
            .into_iter()
            .find(|r| r.rule == "telemetry_silent")
    };
    wait_for("a silence episode", Duration::from_secs(15), || async {
        silent().await.is_some()
    })
    .await
    .unwrap();
    assert!(silent().await.unwrap().episode_closed_at.is_none());
    worker
        .bus
        .publish(reading(&vin, Utc::now(), 79.0, false))
        .await
        .unwrap();
    wait_for("the silence closed", Duration::from_secs(15), || async {
        silent()
            .await
            .is_some_and(|r| r.episode_closed_at.is_some())
    })
    .await
    .unwrap();
    worker.finish().await;
    assert_eq!(outbox.list(None, 10).await.unwrap().len(), 1);
}

/// The worker of `ecars up` reads the batches the persistence worker committed; what its feed
/// did not carry it reads back from `sensor_data`: a batch committed while it was not looking
/// (the rows before a batch that does not follow on), a batch whose readings were partly stored
/// before (its rows, not its readings), and at start everything after its stored cursor.
#[tokio::test]
async fn after_persist_it_reads_back_what_its_feed_did_not_carry() {
    use ecars_db::sensor_rows::CommittedReadings;

    let (_dir, db) = sqlite().await;
    let (rows, cursors, outbox) = (db.sensor_rows(), db.sensor_cursors(), db.case_outbox());
    let group = ecars_anomaly::CONSUMER_GROUP;
    let car = |n: u32| Vin::parse(&ecars_e2e::test_vin(40 + n)).unwrap();
    let malfunction = |n: u32| vec![reading(&car(n), Utc::now(), 70.0, true)];
    let start = |db: &Database| {
        let (feed, committed) = tokio::sync::mpsc::channel(4);
        let worker = AnomalyWorker::after_persist(
            &AnomalyConfig::default(),
            db.clone(),
            Bus::in_process(100),
            committed,
            |_| {},
        )
        .unwrap();
        (feed, tokio::spawn(worker.run(CancellationToken::new())))
    };
    let cases_of = |cases: &[ecars_db::case_outbox::CaseRecord]| -> Vec<String> {
        let mut vins: Vec<String> = cases.iter().map(|c| c.vin.clone()).collect();
        vins.sort();
        vins
    };

    let (feed, worker) = start(&db);
    wait_for("the worker's cursor", Duration::from_secs(10), || async {
        cursors.get(group).await.is_ok_and(|c| c == Some(0))
    })
    .await
    .unwrap();
    // Car 1's batch is committed but never handed on; car 2's is, and does not follow on.
    rows.insert_batch(&malfunction(1)).await.unwrap();
    let second = malfunction(2);
    let ids = rows.insert_batch(&second).await.unwrap();
    feed.send(CommittedReadings {
        ids,
        readings: Some(second.clone()),
    })
    .await
    .unwrap();
    // Car 3's batch repeats car 2's reading: handed on without readings, as the persistence
    // worker does when not every reading was added.
    let mut third = malfunction(3);
    third.extend(second);
    let ids = rows.insert_batch(&third).await.unwrap();
    assert_eq!(ids.added, 1);
    feed.send(CommittedReadings {
        ids,
        readings: None,
    })
    .await
    .unwrap();
    drop(feed);
    worker.await.unwrap().unwrap();
    let cases = outbox.list(None, 10).await.unwrap();
    assert_eq!(
        cases_of(&cases),
        vec![car(1).to_string(), car(2).to_string(), car(3).to_string()],
        "one Case per car, the missed batch's included"
    );
    assert!(cases.iter().all(|c| c.rule == "malfunction_reported"));
    assert_eq!(
        cursors.get(group).await.unwrap(),
        Some(rows.last_id().await.unwrap())
    );

    // Stopped, car 4's reading is stored: the next start reads it.
    rows.insert_batch(&malfunction(4)).await.unwrap();
    let (feed, worker) = start(&db);
    drop(feed);
    worker.await.unwrap().unwrap();
    let cases = outbox.list(None, 10).await.unwrap();
    assert_eq!(cases.len(), 4, "{:?}", cases_of(&cases));
    assert!(cases_of(&cases).contains(&car(4).to_string()));
    assert_eq!(
        cursors.get(group).await.unwrap(),
        Some(rows.last_id().await.unwrap())
    );
}
