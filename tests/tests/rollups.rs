//! The rollups a database keeps equal the aggregates of the raw rows they summarise, whatever
//! batches the readings came in, however often they were redelivered and however the pending
//! summaries were merged (property test, on SQLite and PostgreSQL), and readings stored before
//! the rollups existed are summarised by the backfill.

use std::sync::atomic::{AtomicU32, Ordering};

use chrono::{DateTime, Duration as ChronoDuration, Utc};
use ecars_db::rollups::{summarise, Applied, Rollup, Width};
use ecars_db::vehicle_states::FleetQuery;
use ecars_db::Database;
use ecars_e2e::PgServer;
use ecars_model::telemetry::{TelemetryReading, Vin};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use uuid::Uuid;

/// A reading's shape: which of the case's three cars, seconds into a three-hour window (coarse,
/// so dates tie), and its battery, speed and position when it has them.
type Spec = (usize, i64, Option<f64>, Option<f64>, bool);

/// One case: readings, the batches they are written in (cut points), and which readings are
/// delivered again in a later batch.
fn case() -> impl Strategy<Value = (Vec<Spec>, Vec<usize>, Vec<usize>)> {
    let specs = prop::collection::vec(
        (
            0..3usize,
            0..10_800i64,
            prop::option::of(0.0..100.0f64),
            prop::option::of(0.0..150.0f64),
            any::<bool>(),
        ),
        1..120,
    );
    specs.prop_flat_map(|specs| {
        let n = specs.len();
        (
            Just(specs),
            prop::collection::vec(0..n, 0..6),
            prop::collection::vec(0..n, 0..10),
        )
    })
}

static CASE: AtomicU32 = AtomicU32::new(0);

fn vin(case: u32, car: usize) -> Vin {
    Vin::parse(&format!("RLUP{case:06}{car}ABCDEF")).unwrap()
}

fn readings(case: u32, specs: &[Spec]) -> Vec<TelemetryReading> {
    let start = DateTime::from_timestamp(1_790_000_000, 0).unwrap();
    specs
        .iter()
        .map(
            |&(car, seconds, battery, speed, positioned)| TelemetryReading {
                event_id: Uuid::now_v7(),
                received_at: Utc::now(),
                vin: vin(case, car),
                name: None,
                profile: None,
                range: battery.map(|b| b * 3.1),
                mpge: None,
                battery,
                malfunction: None,
                speed,
                latitude: positioned.then_some(37.0 + seconds as f64 / 1e4),
                longitude: positioned.then_some(-122.0 - seconds as f64 / 1e4),
                date: start + ChronoDuration::seconds(seconds),
            },
        )
        .collect()
}

/// Whether two lists of buckets are equal, their sums to rounding.
fn same(stored: &[Rollup], expected: &[Rollup]) -> Result<(), String> {
    if stored.len() != expected.len() {
        return Err(format!(
            "{} buckets stored, {} expected",
            stored.len(),
            expected.len()
        ));
    }
    for (s, e) in stored.iter().zip(expected) {
        let zeroed = |r: &Rollup| {
            let mut r = r.clone();
            r.battery.sum = 0.0;
            r.speed.sum = 0.0;
            r.range.sum = 0.0;
            r
        };
        let sums = |r: &Rollup| [r.battery.sum, r.speed.sum, r.range.sum];
        let close = sums(s)
            .iter()
            .zip(sums(e))
            .all(|(a, b)| (a - b).abs() <= 1e-9 * b.abs().max(1.0));
        if zeroed(s) != zeroed(e) || !close {
            return Err(format!("stored {s:?}\nexpected {e:?}"));
        }
    }
    Ok(())
}

/// Writes one case in its batches (with redeliveries), then compares each car's stored
/// buckets with the buckets of its raw rows.
async fn check(
    db: &Database,
    case: u32,
    specs: &[Spec],
    cuts: &[usize],
    again: &[usize],
) -> Result<(), String> {
    let all = readings(case, specs);
    let mut cuts: Vec<usize> = cuts.to_vec();
    cuts.push(0);
    cuts.push(all.len());
    cuts.sort_unstable();
    let store = db.sensor_rows();
    for (i, window) in cuts.windows(2).enumerate() {
        let mut batch = all[window[0]..window[1]].to_vec();
        // Redeliveries: readings of earlier batches, and twice within this one.
        batch.extend(
            again
                .iter()
                .filter(|&&j| j < window[1])
                .map(|&j| all[j].clone()),
        );
        if i % 2 == 1 {
            batch.reverse();
        }
        store.insert(&batch).await.map_err(|e| e.to_string())?;
        // The rollups merge pending summaries a few at a time, between batches, as the
        // persistence worker does while the writers go on.
        let rollups = db.rollups();
        rollups
            .apply_pending((i % 4) as i64)
            .await
            .map_err(|e| e.to_string())?;
    }
    // Then whatever is left.
    while db
        .rollups()
        .apply_pending(7)
        .await
        .map_err(|e| e.to_string())?
        .batches
        > 0
    {}
    rollups_match_raw_rows(db, case, Some(&all)).await
}

/// Compares each of the case's three cars' stored buckets with the buckets of its raw rows;
/// `written`: the readings written, to check first that each is stored once.
async fn rollups_match_raw_rows(
    db: &Database,
    case: u32,
    written: Option<&[TelemetryReading]>,
) -> Result<(), String> {
    let (from, to) = (
        DateTime::from_timestamp(1_780_000_000, 0).unwrap(),
        DateTime::from_timestamp(1_800_000_000, 0).unwrap(),
    );
    let states = db
        .vehicle_states()
        .page(&FleetQuery {
            limit: 100_000,
            ..FleetQuery::default()
        })
        .await
        .map_err(|e| e.to_string())?;
    for car in 0..3 {
        let vin = vin(case, car);
        let raw = db
            .sensor_rows()
            .history_page(&vin, (from, Uuid::nil()), to, 100_000)
            .await
            .map_err(|e| e.to_string())?;
        if let Some(written) = written {
            let expected_count = written.iter().filter(|r| r.vin == vin).count();
            if raw.len() != expected_count {
                return Err(format!(
                    "{} raw rows of {vin}, {expected_count} written",
                    raw.len()
                ));
            }
            // The same passes keep the car's state: its newest row by event time, seen when
            // the last of its rows was received.
            let state = states.iter().find(|s| s.vin == vin);
            let newest = raw.iter().max_by_key(|r| (r.date, r.event_id));
            let last_seen = raw.iter().map(|r| r.received_at).max();
            let kept = state.map(|s| (s.latest.as_ref(), s.last_seen));
            if kept.unwrap_or((None, None)) != (newest, last_seen) {
                return Err(format!(
                    "the state of {vin} is {kept:?}, its rows say {:?}",
                    (newest, last_seen)
                ));
            }
        }
        for width in Width::ALL {
            let stored = db
                .rollups()
                .history_page(width, &vin, from, to, 100_000)
                .await
                .map_err(|e| e.to_string())?;
            same(&stored, &summarise(width, &raw))
                .map_err(|e| format!("{width:?} of {vin}: {e}"))?;
        }
    }
    Ok(())
}

fn property(url: &str, cases: u32) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let db = {
        let _context = runtime.enter();
        Database::connect_lazy(url).unwrap()
    };
    runtime.block_on(db.migrate()).unwrap();
    let mut runner = TestRunner::new(Config {
        cases,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&case(), |(specs, cuts, again)| {
            let case = CASE.fetch_add(1, Ordering::Relaxed);
            runtime
                .block_on(check(&db, case, &specs, &cuts, &again))
                .map_err(TestCaseError::fail)
        })
        .unwrap();
}

#[test]
fn sqlite_rollups_equal_the_aggregates_of_their_raw_rows() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("rollups.db").display());
    property(&url, 64);
}

#[test]
fn postgres_rollups_equal_the_aggregates_of_their_raw_rows() {
    let server = PgServer::start().expect("throwaway PostgreSQL");
    property(&server.url(), 32);
}

/// Readings stored before the rollups existed (the migration leaves their id range in
/// `rollup_backfill`) are summarised by the backfill, a few at a time, exactly once.
#[tokio::test]
async fn the_backfill_summarises_readings_stored_before_the_rollups() {
    let server = PgServer::start().expect("throwaway PostgreSQL");
    let db = Database::connect_lazy(&server.url()).unwrap();
    db.migrate().await.unwrap();
    let specs: Vec<Spec> = (0..500)
        .map(|i| {
            (
                i % 3,
                (i as i64 * 37) % 10_800,
                Some(i as f64 / 5.0),
                None,
                i % 2 == 0,
            )
        })
        .collect();
    let all = readings(900_000, &specs);
    db.sensor_rows().insert(&all).await.unwrap();
    // As a database upgraded from before the rollups: rows, no buckets, the range to do.
    server
        .psql(
            "DELETE FROM rollup_1m; DELETE FROM rollup_1h;
             INSERT INTO rollup_backfill SELECT MIN(id), MAX(id) FROM sensor_data",
        )
        .unwrap();
    let rollups = db.rollups();
    let mut steps = 0;
    let mut remaining = i64::MAX;
    loop {
        let left = rollups.backfill(64).await.unwrap();
        steps += 1;
        assert!(left < remaining, "progress: {left} after {remaining}");
        remaining = left;
        if left == 0 {
            break;
        }
    }
    assert_eq!(
        steps,
        500_usize.div_ceil(64),
        "one claim of 64 ids per step"
    );
    // Done: another call claims nothing and changes nothing.
    assert_eq!(rollups.backfill(64).await.unwrap(), 0);
    assert_eq!(
        server
            .psql("SELECT COUNT(*) FROM rollup_backfill")
            .unwrap()
            .trim(),
        "0"
    );
    rollups_match_raw_rows(&db, 900_000, None).await.unwrap();
}

/// Two handles on one migrated database, as two processes would have: each keeps its own
/// summaries of the batches it queued.
async fn two_processes(url: &str) -> (Database, Database) {
    let (one, two) = (
        Database::connect_lazy(url).unwrap(),
        Database::connect_lazy(url).unwrap(),
    );
    one.migrate().await.unwrap();
    (one, two)
}

/// Two workers applying the same queue at once (two processes on one database): each batch is
/// summarised once. On SQLite both read the queued rows before either claims them, so the one
/// that claims second must notice and leave them.
async fn concurrent_appliers_count_each_row_once(url: &str, case: u32) {
    let (one, two) = two_processes(url).await;
    let specs: Vec<Spec> = (0..300)
        .map(|i| {
            (
                i % 3,
                (i as i64 * 53) % 10_800,
                Some(i as f64 / 4.0),
                Some(20.0),
                true,
            )
        })
        .collect();
    let all = readings(case, &specs);
    for batch in all.chunks(30) {
        one.sensor_rows().insert(batch).await.unwrap();
    }
    let (first, second) = (one.rollups(), two.rollups());
    let (a, b) = tokio::join!(first.apply_pending(10), second.apply_pending(10));
    let mut applied = a.unwrap().batches + b.unwrap().batches;
    loop {
        let more = one.rollups().apply_pending(10).await.unwrap().batches;
        if more == 0 {
            break;
        }
        applied += more;
    }
    assert_eq!(applied, 10, "every queued batch applied once");
    rollups_match_raw_rows(&one, case, Some(&all))
        .await
        .unwrap();
}

#[tokio::test]
async fn sqlite_concurrent_appliers_count_each_row_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("appliers.db").display());
    concurrent_appliers_count_each_row_once(&url, 910_000).await;
}

#[tokio::test]
async fn postgres_concurrent_appliers_count_each_row_once() {
    let server = PgServer::start().expect("throwaway PostgreSQL");
    concurrent_appliers_count_each_row_once(&server.url(), 920_000).await;
}

/// The batches a process queued are summarised from memory when it applies them; a batch with a
/// redelivered reading (its summary would count a row the insert skipped) and a batch another
/// process queued have their rows read back; the rollups equal the raw rows either way, and a
/// summary kept of a batch another process applied is not applied again.
async fn summaries_come_from_memory_where_this_process_queued_them(url: &str, case: u32) {
    let (one, two) = two_processes(url).await;
    let specs: Vec<Spec> = (0..150)
        .map(|i| {
            (
                i % 3,
                (i as i64 * 71) % 10_800,
                Some(i as f64 / 2.0),
                (i % 4 != 0).then_some(i as f64),
                i % 5 != 0,
            )
        })
        .collect();
    let all = readings(case, &specs);
    for batch in all[..60].chunks(20) {
        one.sensor_rows().insert(batch).await.unwrap();
    }
    let mut again = all[60..90].to_vec();
    again.push(all[0].clone());
    assert_eq!(one.sensor_rows().insert(&again).await.unwrap(), 30);
    two.sensor_rows().insert(&all[90..120]).await.unwrap();
    assert_eq!(
        one.rollups().apply_pending(100).await.unwrap(),
        Applied {
            batches: 5,
            from_memory: 3
        }
    );
    rollups_match_raw_rows(&one, case, Some(&all[..120]))
        .await
        .unwrap();
    // `two` still keeps the summary of its batch, which `one` applied.
    two.sensor_rows().insert(&all[120..]).await.unwrap();
    assert_eq!(
        two.rollups().apply_pending(100).await.unwrap(),
        Applied {
            batches: 1,
            from_memory: 1
        }
    );
    rollups_match_raw_rows(&two, case, Some(&all))
        .await
        .unwrap();
}

#[tokio::test]
async fn sqlite_summaries_come_from_memory_where_this_process_queued_them() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("memory.db").display());
    summaries_come_from_memory_where_this_process_queued_them(&url, 930_000).await;
}

#[tokio::test]
async fn postgres_summaries_come_from_memory_where_this_process_queued_them() {
    let server = PgServer::start().expect("throwaway PostgreSQL");
    summaries_come_from_memory_where_this_process_queued_them(&server.url(), 940_000).await;
}

/// SQLite gives a new queued batch the id of one deleted at the top of the queue: a summary a
/// process kept of a batch another process applied must not stand in for a new batch of that
/// id.
async fn a_summary_kept_of_a_batch_applied_elsewhere_is_not_applied(url: &str, case: u32) {
    let (one, two) = two_processes(url).await;
    let specs: Vec<Spec> = (0..40)
        .map(|i| (i % 3, i as i64 * 97, Some(i as f64), Some(1.0), true))
        .collect();
    let all = readings(case, &specs);
    one.sensor_rows().insert(&all[..20]).await.unwrap();
    assert_eq!(two.rollups().apply_pending(10).await.unwrap().batches, 1);
    // The queue is empty: on SQLite the next batch gets the id the first one had.
    two.sensor_rows().insert(&all[20..]).await.unwrap();
    assert_eq!(
        one.rollups().apply_pending(10).await.unwrap(),
        Applied {
            batches: 1,
            from_memory: 0
        }
    );
    rollups_match_raw_rows(&one, case, Some(&all))
        .await
        .unwrap();
}

#[tokio::test]
async fn sqlite_a_summary_kept_of_a_batch_applied_elsewhere_is_not_applied() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("reused.db").display());
    a_summary_kept_of_a_batch_applied_elsewhere_is_not_applied(&url, 950_000).await;
}

#[tokio::test]
async fn postgres_a_summary_kept_of_a_batch_applied_elsewhere_is_not_applied() {
    let server = PgServer::start().expect("throwaway PostgreSQL");
    a_summary_kept_of_a_batch_applied_elsewhere_is_not_applied(&server.url(), 960_000).await;
}

/// A batch queued by the previous version (its rows' ids as an array, no ranges: left by the
/// migration's rolling upgrade, or by a writer not yet upgraded) is applied like any other, its
/// rows read back by those ids.
#[tokio::test]
async fn postgres_a_batch_queued_by_ids_is_read_back() {
    let server = PgServer::start().expect("throwaway PostgreSQL");
    let (one, two) = two_processes(&server.url()).await;
    let case = 970_000;
    let specs: Vec<Spec> = (0..60)
        .map(|i| (i % 3, i as i64 * 89, Some(i as f64), Some(3.0), true))
        .collect();
    let all = readings(case, &specs);
    one.sensor_rows().insert(&all[..30]).await.unwrap();
    // Redelivered readings leave ids unused between the rows added: more than one range.
    let mut again = all[30..].to_vec();
    again.insert(10, all[0].clone());
    again.insert(20, all[1].clone());
    assert_eq!(one.sensor_rows().insert(&again).await.unwrap(), 30);
    let pieces = server
        .psql("SELECT string_agg(row_ranges::text, ' ' ORDER BY id) FROM rollup_batches")
        .unwrap();
    assert_eq!(pieces.matches('[').count(), 4, "{pieces}");
    server
        .psql(
            "UPDATE rollup_batches SET row_ids = (SELECT array_agg(i) FROM unnest(row_ranges) AS r,
               generate_series(lower(r), upper(r) - 1) AS i), row_ranges = NULL",
        )
        .unwrap();
    // Another process, which kept no summary: both batches are read back.
    assert_eq!(
        two.rollups().apply_pending(10).await.unwrap(),
        Applied {
            batches: 2,
            from_memory: 0
        }
    );
    rollups_match_raw_rows(&two, case, Some(&all))
        .await
        .unwrap();
}
