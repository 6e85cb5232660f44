//! The sensor and dead-letter tables against a real PostgreSQL server (started here) and SQLite.

use chrono::{Duration as ChronoDuration, SubsecRound, Utc};
use ecars_db::case_outbox::{CaseDraft, CaseStatus};
use ecars_db::detector_states::StoredState;
use ecars_db::rollups::Width;
use ecars_db::vehicle_states::{FleetQuery, VehicleState};
use ecars_db::Database;
use ecars_e2e::{apply_pending_batches, PgServer};
use ecars_model::telemetry::{DeadLetter, RejectReason, Rejection, TelemetryReading, Vin};
use ecars_model::{Connectivity, ConnectivityEvent, DisconnectReason};
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

    // Each car's latest state: its newest reading by event time, whatever the arrival order,
    // once the rollup pass (every second in the persistence worker) took the batches in.
    let fleet = db.vehicle_states();
    let all = FleetQuery {
        limit: 10,
        ..FleetQuery::default()
    };
    assert!(
        fleet.page(&all).await.unwrap().is_empty(),
        "not before the pass"
    );
    apply_pending_batches(&db).await.unwrap();
    let latest = fleet.page(&all).await.unwrap();
    assert_eq!(latest.len(), 2);
    assert_eq!(
        (
            latest[0].vin.as_str(),
            latest[0].latest.as_ref().unwrap().battery
        ),
        (a, Some(88.0))
    );
    assert_eq!(
        latest[0].latest.as_ref(),
        Some(&batch[1]),
        "the state holds the reading as written"
    );
    assert_eq!(
        (
            latest[1].vin.as_str(),
            latest[1].latest.as_ref().unwrap().battery
        ),
        (b, Some(49.0))
    );
    // A late reading (dated before the latest, received after): the latest stays, and the car
    // was seen later.
    let late = reading(a, 30, 10.0);
    assert_eq!(store.insert(std::slice::from_ref(&late)).await.unwrap(), 1);
    apply_pending_batches(&db).await.unwrap();
    let a_state = &fleet.page(&all).await.unwrap()[0];
    assert_eq!(a_state.latest.as_ref().unwrap().battery, Some(88.0));
    assert_eq!(a_state.last_seen, Some(late.received_at));
    assert!(a_state.open_anomalies.is_empty());
    // Pages by VIN, the cursor being the last VIN of the page before.
    let first = fleet
        .page(&FleetQuery {
            limit: 1,
            ..FleetQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(first.len(), 1);
    let second = fleet
        .page(&FleetQuery {
            limit: 1,
            after: Some(first[0].vin.clone()),
            ..FleetQuery::default()
        })
        .await
        .unwrap();
    assert_eq!(second[0].vin.as_str(), b);
    // An open anomaly episode of b: listed with b, and the `anomaly` filter picks it.
    let no_states: &[StoredState<'_, ()>] = &[];
    let episode = CaseDraft {
        key: format!("{b}:battery_drain:1"),
        vin: Vin::parse(b).unwrap(),
        rule: "battery_drain".into(),
        started_at: Utc::now(),
        closed_at: None,
        fields: serde_json::Map::new(),
    };
    db.case_outbox()
        .commit(
            no_states,
            std::slice::from_ref(&episode),
            None,
            CaseStatus::Pending,
            0,
            Utc::now(),
        )
        .await
        .unwrap();
    let anomalous = fleet
        .page(&FleetQuery {
            anomaly: Some(true),
            ..all.clone()
        })
        .await
        .unwrap();
    assert_eq!(anomalous.len(), 1);
    assert_eq!(anomalous[0].vin.as_str(), b);
    assert_eq!(
        anomalous[0].open_anomalies,
        vec!["battery_drain".to_owned()]
    );
    let calm = fleet
        .page(&FleetQuery {
            anomaly: Some(false),
            ..all.clone()
        })
        .await
        .unwrap();
    assert_eq!(calm.len(), 1);
    assert_eq!(calm[0].vin.as_str(), a);
    // The episode closes: b is calm again.
    let closed = CaseDraft {
        closed_at: Some(Utc::now()),
        ..episode
    };
    db.case_outbox()
        .commit(
            no_states,
            &[closed],
            None,
            CaseStatus::Pending,
            0,
            Utc::now(),
        )
        .await
        .unwrap();
    let anomalous = fleet
        .page(&FleetQuery {
            anomaly: Some(true),
            ..all.clone()
        })
        .await
        .unwrap();
    assert!(anomalous.is_empty());

    // Connectivity, applied by session whatever the arrival order.
    let c = "3HGCM82633A004352";
    let event = |vin: &str, session: Uuid, state: Connectivity, reason| ConnectivityEvent {
        event_id: Uuid::now_v7(),
        vin: Vin::parse(vin).unwrap(),
        state,
        reason,
        session_id: session,
        node: "ingest-0".into(),
        client_id: vin.into(),
        time: Utc::now().trunc_subsecs(6),
    };
    let (a_old, a_new, b_session, c_session) = (
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
        Uuid::now_v7(),
    );
    // a reconnected through another node before the first noticed: its old session's end
    // comes last, in a later batch. b timed out. c connected and has sent nothing yet.
    let first = vec![
        event(a, a_old, Connectivity::Connected, None),
        event(a, a_new, Connectivity::Connected, None),
        event(b, b_session, Connectivity::Connected, None),
        event(
            b,
            b_session,
            Connectivity::Disconnected,
            Some(DisconnectReason::KeepAliveTimeout),
        ),
        event(c, c_session, Connectivity::Connected, None),
    ];
    fleet.apply(&first).await.unwrap();
    let late = vec![event(
        a,
        a_old,
        Connectivity::Disconnected,
        Some(DisconnectReason::TakenOver),
    )];
    fleet.apply(&late).await.unwrap();
    // Applying again changes nothing.
    fleet.apply(&first).await.unwrap();
    fleet.apply(&late).await.unwrap();
    let states = fleet.page(&all).await.unwrap();
    let state = |vin: &str| {
        states
            .iter()
            .find(|s| s.vin.as_str() == vin)
            .unwrap_or_else(|| panic!("{vin} listed"))
            .clone()
    };
    let a_link = state(a).connectivity.unwrap();
    assert!(a_link.online, "the newest session decides");
    assert_eq!(a_link.session_id, a_new);
    assert_eq!(a_link.node, "ingest-0");
    let b_link = state(b).connectivity.unwrap();
    assert!(!b_link.online);
    assert_eq!(b_link.reason.as_deref(), Some("keep_alive_timeout"));
    assert_eq!(b_link.since, first[3].time);
    let c_state = state(c);
    assert!(c_state.connectivity.unwrap().online);
    assert_eq!((c_state.latest, c_state.last_seen), (None, None));
    // What a crash of ingest-0 would leave open: a and c, each in its newest session.
    let open = |list: Vec<(Vin, Uuid)>| {
        list.into_iter()
            .map(|(vin, session)| (vin.to_string(), session))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        open(fleet.online_on_node("ingest-0").await.unwrap()),
        [(a.to_owned(), a_new), (c.to_owned(), c_session)]
    );
    assert!(fleet.online_on_node("ingest-1").await.unwrap().is_empty());
    // A reading of c after its connection: the row gets its reading, keeps its connectivity.
    assert_eq!(store.insert(&[reading(c, 0, 70.0)]).await.unwrap(), 1);
    apply_pending_batches(&db).await.unwrap();
    let c_state = fleet
        .page(&FleetQuery {
            after: Some(Vin::parse(b).unwrap()),
            ..all.clone()
        })
        .await
        .unwrap()[0]
        .clone();
    assert_eq!(c_state.latest.unwrap().battery, Some(70.0));
    assert!(c_state.connectivity.unwrap().online);
    let online = |flag| FleetQuery {
        online: Some(flag),
        ..all.clone()
    };
    let vins = |states: Vec<VehicleState>| {
        states
            .into_iter()
            .map(|s| s.vin.to_string())
            .collect::<Vec<_>>()
    };
    assert_eq!(vins(fleet.page(&online(true)).await.unwrap()), vec![a, c]);
    assert_eq!(vins(fleet.page(&online(false)).await.unwrap()), vec![b]);

    // A bulk batch larger than one SQLite statement.
    let bulk: Vec<_> = (0..2_500).map(|i| reading(b, 10 + i, 40.0)).collect();
    assert_eq!(store.insert(&bulk).await.unwrap(), 2_500);
    assert_eq!(store.count().await.unwrap(), 2_507);

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

/// Retention deletes, in batches, the sensor rows and dead letters that arrived before the
/// cutoff, and keeps the rest.
async fn retention(db: Database) {
    db.migrate().await.unwrap();
    let store = db.sensor_rows();
    let now = Utc::now().trunc_subsecs(6);
    let long_ago = now - ChronoDuration::days(40);
    // More old rows than one statement deletes, then the newer ones (rows arrive in order).
    let old: Vec<_> = (0..12_001)
        .map(|i| TelemetryReading {
            received_at: long_ago + ChronoDuration::milliseconds(i),
            date: long_ago + ChronoDuration::milliseconds(i),
            ..reading("4HGCM82633A004352", 0, 60.0)
        })
        .collect();
    for chunk in old.chunks(1000) {
        store.insert(chunk).await.unwrap();
    }
    let recent: Vec<_> = (0..10)
        .map(|i| reading("4HGCM82633A004352", i, 61.0))
        .collect();
    store.insert(&recent).await.unwrap();
    let rejection = || Rejection {
        reason: RejectReason::NotJson,
        detail: "payload is not JSON".into(),
    };
    let letters = db.dead_letter_rows();
    letters
        .insert(&[DeadLetter::new(
            "ecars/data",
            "c",
            rejection(),
            b"{",
            long_ago,
        )])
        .await
        .unwrap();
    letters
        .insert(&[DeadLetter::new("ecars/data", "c", rejection(), b"{", now)])
        .await
        .unwrap();
    // The rollups take the batches in, as the persistence worker does within seconds.
    apply_pending_batches(&db).await.unwrap();
    let cutoffs = ecars_persist::Cutoffs {
        readings: Some(now - ChronoDuration::days(30)),
        rollups: None,
    };
    let pass = ecars_persist::apply_retention(&db, cutoffs).await.unwrap();
    assert!(
        12_001 > 2 * ecars_persist::RETENTION_BATCH as u64,
        "several statements"
    );
    assert_eq!(pass.readings, 12_001);
    assert_eq!(pass.dead_letters, 1);
    assert_eq!(store.count().await.unwrap(), 10, "the recent rows stay");
    let kept = letters.newest(10).await.unwrap();
    assert_eq!(kept.len(), 1);
    assert_eq!(kept[0].received_at, now);
    // Nothing more to delete: a second pass deletes nothing.
    let again = ecars_persist::apply_retention(&db, cutoffs).await.unwrap();
    assert_eq!(again, ecars_persist::RetentionPass::default());
    // The rollups outlive the rows they summarise, until their own retention: the old
    // readings' minute and hour buckets go, the recent ones' stay.
    let rollups = db.rollups();
    let buckets = |width| {
        let rollups = rollups.clone();
        async move {
            let vin = Vin::parse("4HGCM82633A004352").unwrap();
            let all = rollups
                .history_page(
                    width,
                    &vin,
                    long_ago - ChronoDuration::days(1),
                    now + ChronoDuration::days(1),
                    1_000,
                )
                .await
                .unwrap();
            all.iter().map(|r| r.readings).collect::<Vec<_>>()
        }
    };
    let old_minutes = buckets(Width::Minute).await;
    assert_eq!(old_minutes.iter().sum::<i64>(), 12_011, "{old_minutes:?}");
    let pass = ecars_persist::apply_retention(
        &db,
        ecars_persist::Cutoffs {
            readings: None,
            rollups: Some(now - ChronoDuration::days(30)),
        },
    )
    .await
    .unwrap();
    assert!(pass.rollups >= 2, "{pass:?}");
    assert_eq!(buckets(Width::Minute).await.iter().sum::<i64>(), 10);
    assert_eq!(buckets(Width::Hour).await.iter().sum::<i64>(), 10);
}

/// A reader of the sensor rows in commit order (the anomaly worker of `ecars up`): the ids each
/// committed batch took, the rows read back by id, and a cursor that starts at the newest row
/// and is stored with the outbox's commit.
async fn reading_in_commit_order(db: Database) {
    db.migrate().await.unwrap();
    let (rows, cursors) = (db.sensor_rows(), db.sensor_cursors());
    let a = "3HGCM82633A004352";
    let old = vec![reading(a, 9, 80.0), reading(a, 8, 79.0)];
    rows.insert(&old).await.unwrap();
    let newest = rows.last_id().await.unwrap();
    assert!(newest > 0);
    assert_eq!(cursors.get("reader").await.unwrap(), None);
    assert_eq!(
        cursors.start("reader").await.unwrap(),
        newest,
        "a new reader starts after the rows stored before it"
    );

    let batch = vec![
        reading(a, 3, 70.0),
        reading(a, 2, 69.0),
        reading(a, 1, 68.0),
    ];
    let stored = rows.insert_batch(&batch).await.unwrap();
    assert_eq!(stored.added, 3);
    assert_eq!(stored.after, newest, "the batch follows on");
    assert!(stored.through >= stored.after + 3, "{stored:?}");
    let read = rows
        .between(stored.after, stored.through, 100)
        .await
        .unwrap();
    let ids = |readings: &[TelemetryReading]| -> Vec<Uuid> {
        readings.iter().map(|r| r.event_id).collect()
    };
    let read_readings: Vec<TelemetryReading> = read.iter().map(|(_, r)| r.clone()).collect();
    assert_eq!(ids(&read_readings), ids(&batch), "in commit (id) order");
    assert_eq!(read_readings[0], batch[0], "every field read back");
    assert!(read.windows(2).all(|w| w[0].0 < w[1].0));
    assert_eq!(read.last().unwrap().0, stored.through);
    let page = rows.between(stored.after, stored.through, 2).await.unwrap();
    assert_eq!(page.len(), 2, "a page at a time");

    // Two readings stored before and one new: only the new one is in the batch's ids.
    let mixed = vec![batch[0].clone(), reading(a, 0, 67.0), batch[1].clone()];
    let again = rows.insert_batch(&mixed).await.unwrap();
    assert_eq!(again.added, 1);
    assert!(again.after >= stored.through, "{again:?} after {stored:?}");
    let read = rows.between(again.after, again.through, 100).await.unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].1.event_id, mixed[1].event_id);
    assert_eq!(rows.insert_batch(&mixed).await.unwrap().added, 0);

    // The cursor moves with the states it was read into, in one transaction.
    let no_states: &[StoredState<'_, ()>] = &[];
    db.case_outbox()
        .commit(
            no_states,
            &[],
            Some(ecars_db::sensor_cursors::SensorCursor {
                consumer: "reader",
                through_id: again.through,
            }),
            CaseStatus::Pending,
            0,
            Utc::now(),
        )
        .await
        .unwrap();
    assert_eq!(cursors.get("reader").await.unwrap(), Some(again.through));
    assert_eq!(
        cursors.start("reader").await.unwrap(),
        again.through,
        "a reader that has a cursor starts there"
    );
}

#[tokio::test]
async fn sqlite_store() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("nested-ok.db").display());
    exercise(Database::connect_lazy(&url).unwrap()).await;
    let url = format!("sqlite://{}", dir.path().join("retention.db").display());
    retention(Database::connect_lazy(&url).unwrap()).await;
    let url = format!("sqlite://{}", dir.path().join("cursor.db").display());
    reading_in_commit_order(Database::connect_lazy(&url).unwrap()).await;
}

/// A SQLite database from before the idempotence key became (date, event id) is rebuilt with
/// every row and id kept; redelivered readings still add nothing, and new rows go on after the
/// old ids.
#[tokio::test]
async fn the_sqlite_migration_keys_readings_by_date_and_event_id() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("old.db").display());
    let options: sqlx::sqlite::SqliteConnectOptions = url.parse().unwrap();
    let pool = sqlx::SqlitePool::connect_with(options.create_if_missing(true))
        .await
        .unwrap();
    let migrations =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/db/migrations/sqlite");
    let migrator = sqlx::migrate::Migrator::new(migrations).await.unwrap();
    let before = migrator
        .iter()
        .map(|m| m.version)
        .filter(|v| *v < 20261203000009)
        .max()
        .unwrap();
    migrator.run_to(before, &pool).await.unwrap();

    let old = [
        reading("1HGCM82633A004352", 3, 90.0),
        reading("1HGCM82633A004352", 2, 89.0),
        reading("2HGCM82633A004352", 1, 50.0),
    ];
    let text = |t: chrono::DateTime<Utc>| t.format("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    // Written as the previous version wrote, with a gap in the ids (a deleted row).
    for (r, id) in old.iter().zip([1i64, 2, 5]) {
        sqlx::query(
            "INSERT INTO sensor_data (id, event_id, received_at, vin, battery, date)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        )
        .bind(id)
        .bind(r.event_id.to_string())
        .bind(text(r.received_at))
        .bind(r.vin.as_str())
        .bind(r.battery)
        .bind(text(r.date))
        .execute(&pool)
        .await
        .unwrap();
    }

    let db = Database::connect_lazy(&url).unwrap();
    db.migrate().await.unwrap();

    let kept: Vec<(i64, String)> =
        sqlx::query_as("SELECT id, event_id FROM sensor_data ORDER BY id")
            .fetch_all(&pool)
            .await
            .unwrap();
    let expected: Vec<(i64, String)> = old
        .iter()
        .zip([1i64, 2, 5])
        .map(|(r, id)| (id, r.event_id.to_string()))
        .collect();
    assert_eq!(kept, expected);
    let unique: Vec<String> = sqlx::query_scalar(
        "SELECT name FROM pragma_index_list('sensor_data') WHERE \"unique\" = 1 ORDER BY name",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        unique,
        ["sensor_data_date_event"],
        "no index on the event id alone"
    );
    let store = db.sensor_rows();
    assert_eq!(
        store.insert(&old).await.unwrap(),
        0,
        "redelivered: nothing added"
    );
    let new = reading("2HGCM82633A004352", 0, 49.0);
    let stored = store
        .insert_batch(std::slice::from_ref(&new))
        .await
        .unwrap();
    assert_eq!((stored.added, stored.after, stored.through), (1, 5, 6));
    let newest = store.of_vehicle(&new.vin, 1).await.unwrap();
    assert_eq!(newest[0].event_id, new.event_id);
    db.close().await;
}

#[tokio::test]
async fn postgres_store() {
    let server = PgServer::start().expect("throwaway PostgreSQL");
    exercise(Database::connect_lazy(&server.url()).unwrap()).await;
    server.psql("CREATE DATABASE retention").unwrap();
    let url = server.url().replace("/ecars", "/retention");
    retention(Database::connect_lazy(&url).unwrap()).await;
    server.psql("CREATE DATABASE cursor").unwrap();
    let url = server.url().replace("/ecars", "/cursor");
    reading_in_commit_order(Database::connect_lazy(&url).unwrap()).await;
}

/// The anomaly worker's commits and the event relay's "published" marks touch the same outbox
/// rows at once; both lock them in key order, so PostgreSQL never has to break a deadlock
/// (the soak run saw one every few seconds when the marks went in publication order).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_outbox_writers_lock_in_one_order() {
    let server = PgServer::start().expect("throwaway PostgreSQL");
    let db = Database::connect_lazy(&server.url()).unwrap();
    db.migrate().await.unwrap();
    let no_states: &[StoredState<'_, ()>] = &[];
    let vin = Vin::parse("1HGCM82633A004352").unwrap();
    let drafts: Vec<CaseDraft> = (0..300)
        .map(|i| CaseDraft {
            key: format!("{vin}:battery_drain:{i:04}"),
            vin: vin.clone(),
            rule: "battery_drain".into(),
            started_at: Utc::now(),
            closed_at: None,
            fields: serde_json::Map::new(),
        })
        .collect();
    let outbox = db.case_outbox();
    outbox
        .commit(no_states, &drafts, None, CaseStatus::Pending, 0, Utc::now())
        .await
        .unwrap();
    // The worker writes the drafts newest key first, the relay marks them oldest first: the
    // orders that deadlocked.
    let mut reversed = drafts.clone();
    reversed.reverse();
    let worker = {
        let outbox = db.case_outbox();
        tokio::spawn(async move {
            let no_states: &[StoredState<'static, ()>] = &[];
            for _ in 0..40 {
                outbox
                    .commit(
                        no_states,
                        &reversed,
                        None,
                        CaseStatus::Pending,
                        0,
                        Utc::now(),
                    )
                    .await?;
            }
            Ok::<_, ecars_db::DbError>(())
        })
    };
    let relay = {
        let outbox = db.case_outbox();
        let keys: Vec<String> = drafts.iter().map(|d| d.key.clone()).collect();
        tokio::spawn(async move {
            for round in 0..40i64 {
                let published: Vec<(String, i64)> =
                    keys.iter().map(|k| (k.clone(), round + 2)).collect();
                outbox.mark_published(&published).await?;
            }
            Ok::<_, ecars_db::DbError>(())
        })
    };
    worker
        .await
        .unwrap()
        .expect("the worker's commits never deadlock");
    relay
        .await
        .unwrap()
        .expect("the relay's marks never deadlock");
    // A newer version of every row than any mark: all of them wait to be published.
    outbox
        .commit(no_states, &drafts, None, CaseStatus::Pending, 0, Utc::now())
        .await
        .unwrap();
    let pending = outbox.unpublished(1000).await.unwrap();
    assert_eq!(
        pending.len(),
        300,
        "each key's newest version is unpublished"
    );
}

/// A deadlock on PostgreSQL and a locked SQLite file are conflicts (the batch writer retries
/// them without calling the database down); a refused value is neither a conflict nor
/// transient.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadlocks_and_locked_files_are_conflicts_and_a_bad_value_is_refused() {
    use sqlx::{Connection, Executor};
    let server = PgServer::start().expect("throwaway PostgreSQL");
    let mut setup = sqlx::PgConnection::connect(&server.url()).await.unwrap();
    setup
        .execute(
            "CREATE TABLE pair (id int PRIMARY KEY, n int); INSERT INTO pair VALUES (1, 0), (2, 0)",
        )
        .await
        .unwrap();
    // Two transactions lock the two rows in opposite orders: PostgreSQL breaks the deadlock by
    // failing one of them with 40P01.
    let both_locked = std::sync::Arc::new(tokio::sync::Barrier::new(2));
    let cross = |first: i32, second: i32| {
        let (url, both_locked) = (server.url(), std::sync::Arc::clone(&both_locked));
        tokio::spawn(async move {
            let mut connection = sqlx::PgConnection::connect(&url).await.unwrap();
            let mut tx = connection.begin().await.unwrap();
            sqlx::query("UPDATE pair SET n = n + 1 WHERE id = $1")
                .bind(first)
                .execute(&mut *tx)
                .await
                .unwrap();
            both_locked.wait().await;
            let second = sqlx::query("UPDATE pair SET n = n + 1 WHERE id = $1")
                .bind(second)
                .execute(&mut *tx)
                .await;
            match second {
                Ok(_) => tx.commit().await.map(drop),
                Err(error) => Err(error),
            }
        })
    };
    let (one, other) = (cross(1, 2), cross(2, 1));
    let outcomes = [one.await.unwrap(), other.await.unwrap()];
    let deadlocked: Vec<ecars_db::DbError> = outcomes
        .into_iter()
        .filter_map(Result::err)
        .map(ecars_db::DbError::from)
        .collect();
    assert_eq!(deadlocked.len(), 1, "one side is broken: {deadlocked:?}");
    assert!(
        deadlocked[0].is_conflict() && deadlocked[0].is_transient(),
        "{}",
        deadlocked[0]
    );
    let refused = ecars_db::DbError::from(
        setup
            .execute("INSERT INTO pair VALUES (1, 0)")
            .await
            .unwrap_err(),
    );
    assert!(
        !refused.is_conflict() && !refused.is_transient(),
        "{refused}"
    );

    // SQLite: a second connection that finds the file locked past its busy timeout.
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}?mode=rwc", dir.path().join("x.db").display());
    let mut holder = sqlx::SqliteConnection::connect(&url).await.unwrap();
    holder
        .execute("CREATE TABLE t (n INTEGER); BEGIN IMMEDIATE; INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let options: sqlx::sqlite::SqliteConnectOptions = url.parse().unwrap();
    let mut writer = sqlx::SqliteConnection::connect_with(
        &options.busy_timeout(std::time::Duration::from_millis(50)),
    )
    .await
    .unwrap();
    let locked = ecars_db::DbError::from(
        writer
            .execute("INSERT INTO t VALUES (2)")
            .await
            .unwrap_err(),
    );
    assert!(locked.is_conflict() && locked.is_transient(), "{locked}");
}

/// Writes `batches` batches of 1,000 readings, one commit each.
async fn write_batches(db: &Database, batches: u32) {
    for batch in 0..batches {
        let readings: Vec<_> = (0..1000)
            .map(|car| reading(&format!("1HGCM82633A{batch:02}{car:04}"), 1, 50.0))
            .collect();
        db.sensor_rows().insert(&readings).await.unwrap();
        // And the pass that writes their rollups and the cars' states, as the persistence
        // worker's would.
        apply_pending_batches(db).await.unwrap();
    }
}

/// On SQLite, commits leave the write-ahead log alone (none of them stops to copy it back into
/// the database file while the readings behind it wait); `Database::checkpoint`, which the
/// persistence worker calls every second, copies all of it back.
#[tokio::test]
async fn sqlite_commits_leave_checkpoints_to_the_worker() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("log.db").display());
    let db = Database::connect_lazy(&url).unwrap();
    db.migrate().await.unwrap();
    db.checkpoint(true).await.unwrap();
    write_batches(&db, 30).await;
    // SQLite's own default checkpoints in the commit that passes 1,000 pages, and the next
    // write starts the log over: it would never hold more than about that.
    let checkpoint = db.checkpoint(true).await.unwrap();
    assert!(
        checkpoint.log_pages > 1000,
        "30,000 rows stay in the log until the checkpoint: {checkpoint:?}"
    );
    assert_eq!(
        checkpoint.copied, checkpoint.log_pages,
        "the checkpoint copies the whole log back"
    );
    assert_eq!(
        checkpoint.restart,
        ecars_db::LogRestart::Restarted,
        "and starts it over"
    );
}

/// While commits follow each other without a pause, the checkpoints still start the log over:
/// a `PASSIVE` checkpoint alone never caught up with the commits made while it ran, and the log
/// grew with every commit (3.5 GB in a one-minute benchmark).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_log_starts_over_under_steady_commits() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("steady.db").display());
    let db = Database::connect_lazy(&url).unwrap();
    db.migrate().await.unwrap();
    // Two writers and a reader, as in `ecars up` (sensor rows, the detector, the API).
    let writers: Vec<_> = (0..2)
        .map(|writer| {
            let db = db.clone();
            tokio::spawn(async move {
                for batch in 0..75 {
                    let readings: Vec<_> = (0..500)
                        .map(|car| reading(&format!("1HGCM82{writer}{batch:04}{car:05}"), 1, 50.0))
                        .collect();
                    db.sensor_rows().insert(&readings).await.unwrap();
                }
            })
        })
        .collect();
    let reader = {
        let db = db.clone();
        tokio::spawn(async move {
            loop {
                db.sensor_rows().count().await.unwrap();
            }
        })
    };
    let (mut checkpoints, mut largest) = (Vec::<ecars_db::Checkpoint>::new(), 0);
    // As the persistence worker does, at a shorter interval.
    let mut every = tokio::time::interval(std::time::Duration::from_millis(250));
    while !writers.iter().all(|w| w.is_finished()) {
        every.tick().await;
        let checkpoint = db.checkpoint(true).await.unwrap();
        largest = largest.max(checkpoint.log_pages);
        checkpoints.push(checkpoint);
    }
    reader.abort();
    for writer in writers {
        writer.await.unwrap();
    }
    // The log starts over: a checkpoint finds fewer pages in it than the one before.
    let starts = checkpoints
        .windows(2)
        .filter(|pair| pair[1].log_pages < pair[0].log_pages)
        .count();
    assert!(
        starts >= 2,
        "the log started over {starts} times in {} checkpoints (largest: {largest} pages): {checkpoints:?}",
        checkpoints.len()
    );
}

/// A reader that does not end keeps the log from starting over: the `RESTART` step gives up
/// after its short wait (new writers wait that long, not the 5 s busy timeout) and says so, and
/// the next try after the reader ended starts the log over.
#[tokio::test]
async fn sqlite_log_restart_gives_up_on_a_reader_that_does_not_end() {
    use sqlx::{Connection, Executor};
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("reader.db").display());
    let db = Database::connect_lazy(&url).unwrap();
    db.migrate().await.unwrap();
    write_batches(&db, 10).await;
    let mut reader = sqlx::SqliteConnection::connect(&url).await.unwrap();
    reader
        .execute("BEGIN; SELECT COUNT(*) FROM sensor_data;")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let checkpoint = db.checkpoint(true).await.unwrap();
    let waited = started.elapsed();
    assert!(
        checkpoint.log_pages >= ecars_db::RESTART_AFTER_PAGES,
        "{checkpoint:?}"
    );
    assert_eq!(
        checkpoint.restart,
        ecars_db::LogRestart::Busy,
        "{checkpoint:?}"
    );
    assert!(
        waited < std::time::Duration::from_secs(2),
        "the restart gave up after its short wait, not the busy timeout: {waited:?}"
    );
    // What the step reports (the histogram `ecars_sqlite_checkpoint_seconds`) is that wait.
    assert!(
        checkpoint.restart_took >= ecars_db::RESTART_WAIT
            && checkpoint.restart_took + checkpoint.passive_took <= waited,
        "{checkpoint:?} in {waited:?}"
    );
    reader.execute("COMMIT").await.unwrap();
    let checkpoint = db.checkpoint(true).await.unwrap();
    assert_eq!(
        checkpoint.restart,
        ecars_db::LogRestart::Restarted,
        "{checkpoint:?}"
    );
}
