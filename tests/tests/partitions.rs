//! PostgreSQL keeps `sensor_data` in one partition per day: the migration converts a database
//! that has readings already, and retention drops the days that ended before its cutoff and
//! keeps the rest. Against a real PostgreSQL server.

use chrono::{DateTime, Duration as ChronoDuration, NaiveDate, SubsecRound, Utc};
use ecars_db::Database;
use ecars_e2e::PgServer;
use ecars_model::telemetry::{TelemetryReading, Vin};
use sqlx::PgPool;
use uuid::Uuid;

const VIN: &str = "5YJ3E1EA7JF000316";

fn reading_dated(date: DateTime<Utc>, battery: f64) -> TelemetryReading {
    TelemetryReading {
        event_id: Uuid::new_v4(),
        received_at: Utc::now().trunc_subsecs(6),
        vin: Vin::parse(VIN).unwrap(),
        name: Some("Car".into()),
        profile: Some("long".into()),
        range: Some(200.0),
        mpge: None,
        battery: Some(battery),
        malfunction: Some(false),
        speed: Some(55.5),
        latitude: Some(37.5),
        longitude: Some(-122.25),
        date,
    }
}

fn midnight(day: NaiveDate) -> DateTime<Utc> {
    day.and_hms_opt(0, 0, 0).unwrap().and_utc()
}

/// The days that have a partition, and whether the default partition exists.
async fn partitions(pool: &PgPool) -> (Vec<String>, bool) {
    let names: Vec<String> = sqlx::query_scalar(
        "SELECT c.relname::text FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
         WHERE i.inhparent = 'sensor_data'::regclass ORDER BY 1",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    let default = names.iter().any(|n| n == "sensor_data_default");
    (
        names
            .into_iter()
            .filter(|n| n != "sensor_data_default")
            .collect(),
        default,
    )
}

async fn rows_in(pool: &PgPool, table: &str) -> i64 {
    sqlx::query_scalar(sqlx::AssertSqlSafe(format!("SELECT COUNT(*) FROM {table}")))
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A database with readings from before the partitions is converted: every row is kept with
/// its id, recent days get partitions, old rows go to the default partition, the ids go on
/// where they were, and redelivered readings still add nothing.
async fn the_migration_converts_existing_readings(server: &PgServer) {
    let url = server.url();
    let pool = PgPool::connect(&url).await.unwrap();
    let migrations =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../crates/db/migrations/postgres");
    let migrator = sqlx::migrate::Migrator::new(migrations).await.unwrap();
    let before_partitions = migrator
        .iter()
        .map(|m| m.version)
        .filter(|v| *v < 20261203000007)
        .max()
        .unwrap();
    migrator.run_to(before_partitions, &pool).await.unwrap();
    let (names, _) = partitions(&pool).await;
    assert!(names.is_empty(), "not partitioned yet: {names:?}");

    let now = Utc::now().trunc_subsecs(6);
    let dated = [
        now - ChronoDuration::days(200),
        now - ChronoDuration::days(3),
        now - ChronoDuration::days(3),
        now,
    ];
    let readings: Vec<_> = dated
        .iter()
        .enumerate()
        .map(|(i, date)| reading_dated(*date, i as f64))
        .collect();
    let db = Database::connect_lazy(&url).unwrap();
    // Written as the previous version wrote (its key was the event id alone).
    for r in &readings {
        sqlx::query(
            "INSERT INTO sensor_data (event_id, received_at, vin, battery, date)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(r.event_id)
        .bind(r.received_at)
        .bind(r.vin.as_str())
        .bind(r.battery)
        .bind(r.date)
        .execute(&pool)
        .await
        .unwrap();
    }
    let ids_before: Vec<i64> = sqlx::query_scalar("SELECT id FROM sensor_data ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();

    db.migrate().await.unwrap();

    let (names, default) = partitions(&pool).await;
    assert!(default);
    let day = |d: DateTime<Utc>| format!("sensor_data_{}", d.format("%Y%m%d"));
    assert!(names.contains(&day(dated[1])), "{names:?}");
    assert!(names.contains(&day(now)), "{names:?}");
    assert!(
        names.contains(&day(now + ChronoDuration::days(7))),
        "the week ahead: {names:?}"
    );
    assert!(!names.contains(&day(dated[0])), "{names:?}");
    assert_eq!(
        rows_in(&pool, "sensor_data_default").await,
        1,
        "the old one"
    );
    assert_eq!(rows_in(&pool, &day(dated[1])).await, 2);
    let ids_after: Vec<i64> = sqlx::query_scalar("SELECT id FROM sensor_data ORDER BY id")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(ids_after, ids_before, "every row, with its id");

    let store = db.sensor_rows();
    assert_eq!(store.insert(&readings).await.unwrap(), 0, "redelivered");
    let newer = reading_dated(now + ChronoDuration::seconds(1), 9.0);
    assert_eq!(store.insert(std::slice::from_ref(&newer)).await.unwrap(), 1);
    let newest_id: i64 = sqlx::query_scalar("SELECT MAX(id) FROM sensor_data")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert!(
        newest_id > *ids_before.last().unwrap(),
        "ids go on: {newest_id}"
    );
    let history = store
        .of_vehicle(&Vin::parse(VIN).unwrap(), 10)
        .await
        .unwrap();
    assert_eq!(history.len(), 5);
    assert_eq!(history[0].event_id, newer.event_id);
    // The rollups (queued with the batch's dates) read the new row from its day.
    ecars_e2e::apply_pending_batches(&db).await.unwrap();
    let minutes = db
        .rollups()
        .history_page(
            ecars_db::rollups::Width::Minute,
            &Vin::parse(VIN).unwrap(),
            now - ChronoDuration::minutes(1),
            now + ChronoDuration::minutes(2),
            10,
        )
        .await
        .unwrap();
    assert_eq!(minutes.iter().map(|m| m.readings).sum::<i64>(), 1);
}

/// Retention drops the partitions of the days that ended before the cutoff, deletes the old
/// rows of the default partition, and keeps every other row (the cutoff's own day whole).
async fn retention_drops_old_days_and_keeps_the_rest(url: &str) {
    let db = Database::connect_lazy(url).unwrap();
    db.migrate().await.unwrap();
    let pool = PgPool::connect(url).await.unwrap();
    let store = db.sensor_rows();
    let now = Utc::now().trunc_subsecs(6);
    let today = now.date_naive();
    let first = today - chrono::Days::new(50);
    let prepared = store
        .prepare_days(first, today + chrono::Days::new(1))
        .await
        .unwrap();
    assert!(prepared.blocked.is_empty(), "{prepared:?}");
    assert!(prepared.created.contains(&first), "{prepared:?}");
    // Again: nothing to do.
    let again = store
        .prepare_days(first, today + chrono::Days::new(1))
        .await
        .unwrap();
    assert_eq!(again, ecars_db::PreparedDays::default());

    let cutoff = now - ChronoDuration::days(30);
    let cutoff_day = cutoff.date_naive();
    // Per age: (days ago, readings).
    let old_days = [45_i64, 40, 35, 31];
    let mut batch = Vec::new();
    for ago in old_days {
        for i in 0..100 {
            batch.push(reading_dated(
                // Earlier, never later: a day before the cutoff's stays before it.
                now - ChronoDuration::days(ago) - ChronoDuration::seconds(i),
                50.0,
            ));
        }
    }
    // Older than any partition: the default partition.
    for i in 0..7 {
        batch.push(reading_dated(
            now - ChronoDuration::days(120) - ChronoDuration::seconds(i),
            40.0,
        ));
    }
    // The first moment of the cutoff's day: before the cutoff, kept with its day.
    let kept_whole_day = reading_dated(midnight(cutoff_day), 60.0);
    batch.push(kept_whole_day.clone());
    let recent: Vec<_> = (0..20)
        .map(|i| {
            reading_dated(
                now - ChronoDuration::days(10) + ChronoDuration::seconds(i),
                70.0,
            )
        })
        .chain((0..5).map(|i| reading_dated(now - ChronoDuration::seconds(i), 80.0)))
        .collect();
    batch.extend(recent.iter().cloned());
    assert_eq!(store.insert(&batch).await.unwrap(), batch.len() as u64);
    assert_eq!(rows_in(&pool, "sensor_data_default").await, 7);

    let cutoffs = ecars_persist::Cutoffs {
        readings: Some(cutoff),
        rollups: None,
    };
    let pass = ecars_persist::apply_retention(&db, cutoffs).await.unwrap();
    let expected_days = (cutoff_day - first).num_days() as u64;
    assert_eq!(pass.days, expected_days, "{pass:?}");
    assert_eq!(
        pass.readings, 7,
        "the default partition's old rows: {pass:?}"
    );
    assert_eq!(
        store.count().await.unwrap(),
        recent.len() as i64 + 1,
        "the recent rows and the cutoff's day stay"
    );
    let (names, default) = partitions(&pool).await;
    assert!(default, "the default partition stays");
    let oldest_kept = names.first().cloned().unwrap_or_default();
    assert_eq!(
        oldest_kept,
        format!("sensor_data_{}", cutoff_day.format("%Y%m%d")),
        "{names:?}"
    );
    let history = store
        .of_vehicle(&Vin::parse(VIN).unwrap(), 1_000)
        .await
        .unwrap();
    assert!(history
        .iter()
        .any(|r| r.event_id == kept_whole_day.event_id));
    assert!(history.iter().all(|r| r.battery != Some(50.0)));

    // Nothing more to drop or delete.
    let again = ecars_persist::apply_retention(&db, cutoffs).await.unwrap();
    assert_eq!(again, ecars_persist::RetentionPass::default());

    // A day whose readings went to the default partition cannot get a partition of its own:
    // reported, not an error, and its readings stay where they are.
    let blocked_day = today - chrono::Days::new(60);
    store
        .insert(&[reading_dated(midnight(blocked_day), 30.0)])
        .await
        .unwrap();
    let prepared = store.prepare_days(blocked_day, blocked_day).await.unwrap();
    assert_eq!(prepared.blocked, vec![blocked_day]);
    assert_eq!(rows_in(&pool, "sensor_data_default").await, 1);

    // A batch dated on one day is written straight into that day's partition (the writer names
    // it; a missing one, as the blocked day's above, falls back to the parent): the same rows,
    // and a redelivery still adds nothing. A batch across midnight goes through the parent.
    let partition = |day: NaiveDate| format!("sensor_data_{}", day.format("%Y%m%d"));
    let tomorrow = today + chrono::Days::new(1);
    let (today_rows, tomorrow_rows) = (
        rows_in(&pool, &partition(today)).await,
        rows_in(&pool, &partition(tomorrow)).await,
    );
    let one_day: Vec<_> = (0..4)
        .map(|i| reading_dated(midnight(today) + ChronoDuration::seconds(i), 90.0))
        .collect();
    assert_eq!(store.insert(&one_day).await.unwrap(), 4);
    assert_eq!(store.insert(&one_day).await.unwrap(), 0, "a redelivery");
    let across = [
        reading_dated(midnight(tomorrow) - ChronoDuration::microseconds(1), 91.0),
        reading_dated(midnight(tomorrow), 92.0),
    ];
    assert_eq!(store.insert(&across).await.unwrap(), 2);
    assert_eq!(store.insert(&across).await.unwrap(), 0, "a redelivery");
    assert_eq!(
        rows_in(&pool, &partition(today)).await,
        today_rows + 5,
        "four of one day and one before midnight"
    );
    assert_eq!(
        rows_in(&pool, &partition(tomorrow)).await,
        tomorrow_rows + 1
    );
    assert_eq!(rows_in(&pool, "sensor_data_default").await, 1);
    // Each batch that added rows is queued for the rollup pass by the ids it took, as ranges.
    let queued: Vec<(String, i64)> = sqlx::query_as(
        "SELECT row_ranges::text, (SELECT count(*) FROM sensor_data s WHERE s.id <@ row_ranges)
         FROM rollup_batches ORDER BY id DESC LIMIT 2",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        queued.iter().map(|(_, rows)| *rows).collect::<Vec<_>>(),
        [2, 4],
        "{queued:?}"
    );
}

#[tokio::test]
async fn postgres_keeps_sensor_rows_by_day() {
    let server = PgServer::start().expect("throwaway PostgreSQL");
    the_migration_converts_existing_readings(&server).await;
    server.psql("CREATE DATABASE retention").unwrap();
    let url = server.url().replace("/ecars", "/retention");
    retention_drops_old_days_and_keeps_the_rest(&url).await;
}
