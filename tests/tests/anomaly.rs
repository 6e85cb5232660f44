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
