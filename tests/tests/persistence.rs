//! The sensor and dead-letter tables against a real PostgreSQL server (started here) and SQLite.

use chrono::{Duration as ChronoDuration, SubsecRound, Utc};
use ecars_db::Database;
use ecars_e2e::PgServer;
use ecars_model::telemetry::{DeadLetter, RejectReason, Rejection, TelemetryReading, Vin};
use uuid::Uuid;

fn reading(vin: &str, minutes_ago: i64, battery: f64) -> TelemetryReading {
    let now = Utc::now().trunc_subsecs(6);
    TelemetryReading {
        event_id: Uuid::now_v7(),
        received_at: now,
        vin: Vin::parse(vin).unwrap(),
        name: Some("Car".into()),
        profile: Some("long".into()),
        range: Some(200.0),
        mpge: None,
        battery: Some(battery),
        malfunction: Some(false),
        speed: Some(55.5),
        latitude: Some(37.5),
        longitude: Some(-122.25),
        date: now - ChronoDuration::minutes(minutes_ago),
    }
}

async fn exercise(db: Database) {
    db.migrate().await.unwrap();
    // Migrations are re-runnable.
    db.migrate().await.unwrap();
    let store = db.sensor_rows();
    let letters = db.dead_letter_rows();

    let a = "1HGCM82633A004352";
    let b = "2HGCM82633A004352";
    let batch = vec![
        reading(a, 3, 90.0),
        reading(a, 1, 88.0),
        reading(a, 2, 89.0),
        reading(b, 5, 50.0),
    ];
    assert_eq!(store.insert(&batch).await.unwrap(), 4);
    // At-least-once redelivery: the same events again add nothing.
    assert_eq!(store.insert(&batch).await.unwrap(), 0);
    let mut mixed = batch[..2].to_vec();
    mixed.push(reading(b, 0, 49.0));
    assert_eq!(
        store.insert(&mixed).await.unwrap(),
        1,
        "only the new event is added"
    );
    assert_eq!(store.count().await.unwrap(), 5);

    let newest = store.of_vehicle(&Vin::parse(a).unwrap(), 2).await.unwrap();
    assert_eq!(
        newest.iter().map(|r| r.battery).collect::<Vec<_>>(),
        vec![Some(88.0), Some(89.0)]
    );
    assert_eq!(
        newest[0], batch[1],
        "a reading reads back exactly as written"
    );

    let latest = store.latest_per_vehicle().await.unwrap();
    assert_eq!(latest.len(), 2);
    assert_eq!((latest[0].vin.as_str(), latest[0].battery), (a, Some(88.0)));
    assert_eq!((latest[1].vin.as_str(), latest[1].battery), (b, Some(49.0)));

    // A bulk batch larger than one SQLite statement.
    let bulk: Vec<_> = (0..2_500).map(|i| reading(b, 10 + i, 40.0)).collect();
    assert_eq!(store.insert(&bulk).await.unwrap(), 2_500);
    assert_eq!(store.count().await.unwrap(), 2_505);

    let rejection = Rejection {
        reason: RejectReason::NotJson,
        detail: "payload is not JSON".into(),
    };
    let letter = DeadLetter::new(
        "ecars/data",
        "car-1",
        rejection,
        b"\xff\xfe not json",
        Utc::now(),
    );
    assert_eq!(
        letters.insert(std::slice::from_ref(&letter)).await.unwrap(),
        1
    );
    assert_eq!(
        letters.insert(std::slice::from_ref(&letter)).await.unwrap(),
        0
    );
    let rows = letters.newest(10).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0].reason, "not_json: payload is not JSON");
    assert_eq!(rows[0].payload, b"\xff\xfe not json");
    assert_eq!(
        (rows[0].topic.as_str(), rows[0].client_id.as_str()),
        ("ecars/data", "car-1")
    );
}

#[tokio::test]
async fn sqlite_store() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("nested-ok.db").display());
    exercise(Database::connect_lazy(&url).unwrap()).await;
}

#[tokio::test]
async fn postgres_store() {
    let server = PgServer::start().expect("throwaway PostgreSQL");
    exercise(Database::connect_lazy(&server.url()).unwrap()).await;
}
