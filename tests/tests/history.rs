//! The history API end to end: a car publishes three hours of readings over MQTT, and
//! `GET /v1/vehicles/{vin}/history` answers them raw or from the rollups, picks the resolution
//! by the range, streams more than one page, answers CSV, and refuses bad requests with a
//! reason (SQLite and PostgreSQL).

use std::time::Duration;

use chrono::{DateTime, DurationRound, TimeDelta, Utc};
use ecars_e2e::{publish_v4, test_vin, wait_for, PgServer, Pipeline, PipelineOptions};
use serde_json::Value;

/// Readings: one every 4 s over 10,000 s (2 h 46 min 40 s), the battery falling 0.01 a reading.
const READINGS: i64 = 2_500;
const STEP_S: i64 = 4;

fn payload(vin: &str, date: DateTime<Utc>, i: i64) -> String {
    serde_json::json!({
        "vin": vin,
        "battery": 100.0 - i as f64 * 0.01,
        "speed": (i % 100) as f64,
        "range": 300.0 - i as f64 * 0.05,
        "latitude": 37.0 + i as f64 * 1e-4,
        "longitude": -122.0,
        "date": date.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
    })
    .to_string()
}

fn at(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

async fn history(base: &str, vin: &str, query: &str, accept: Option<&str>) -> reqwest::Response {
    let mut request =
        reqwest::Client::new().get(format!("{base}/v1/vehicles/{vin}/history?{query}"));
    if let Some(accept) = accept {
        request = request.header("accept", accept);
    }
    request.send().await.expect("HTTP request")
}

async fn json(response: reqwest::Response) -> (String, Value) {
    assert_eq!(response.status(), 200);
    let resolution = response.headers()["ecars-resolution"]
        .to_str()
        .unwrap()
        .to_owned();
    (resolution, response.json().await.expect("JSON body"))
}

async fn scenario(database_url: String) {
    let pipeline = Pipeline::start(PipelineOptions::new(database_url))
        .await
        .unwrap();
    let vin = test_vin(7);
    // Four hours ago, on the hour: buckets fall on known boundaries.
    let t0 = Utc::now().duration_trunc(TimeDelta::hours(1)).unwrap() - TimeDelta::hours(4);
    let messages = (0..READINGS)
        .map(|i| {
            (
                format!("vehicles/{vin}/telemetry"),
                payload(&vin, t0 + TimeDelta::seconds(i * STEP_S), i),
            )
        })
        .collect();
    publish_v4(pipeline.mqtt_addr, "history-car", None, messages)
        .await
        .unwrap();
    wait_for("every reading stored", Duration::from_secs(20), || async {
        pipeline.db.sensor_rows().count().await.unwrap_or(0) == READINGS
    })
    .await
    .unwrap();
    let base = pipeline.http_base();

    // Two hours: auto answers raw, oldest first.
    let (resolution, body) = json(
        history(
            &base,
            &vin,
            &format!("from={}&to={}", at(t0), at(t0 + TimeDelta::hours(2))),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(resolution, "raw");
    assert_eq!(body["resolution"], "raw");
    let points = body["points"].as_array().unwrap();
    assert_eq!(points.len(), 1_800);
    assert_eq!(points[0]["battery"], 100.0);
    let second: DateTime<Utc> = points[1]["time"].as_str().unwrap().parse().unwrap();
    assert_eq!(second, t0 + TimeDelta::seconds(STEP_S));

    // All of it, raw: more than one page, in order, each reading once.
    let (_, body) = json(
        history(
            &base,
            &vin,
            &format!(
                "from={}&to={}&resolution=raw",
                at(t0),
                at(t0 + TimeDelta::hours(3))
            ),
            None,
        )
        .await,
    )
    .await;
    let times: Vec<DateTime<Utc>> = body["points"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["time"].as_str().unwrap().parse().unwrap())
        .collect();
    assert_eq!(times.len(), READINGS as usize);
    assert!(
        times.windows(2).all(|w| w[0] < w[1]),
        "strictly oldest first"
    );

    // The rollups trail the rows by the persistence worker's merge interval (a few seconds).
    let ten_days = format!(
        "from={}&to={}",
        at(t0 - TimeDelta::days(9)),
        at(t0 + TimeDelta::days(1))
    );
    wait_for(
        "the rollups to catch up",
        Duration::from_secs(20),
        || async {
            let (_, body) = json(history(&base, &vin, &ten_days, None).await).await;
            body["points"].as_array().is_some_and(|p| {
                p.iter().filter_map(|h| h["readings"].as_i64()).sum::<i64>() == READINGS
            })
        },
    )
    .await
    .unwrap();

    // Ten days: auto answers hours, from the rollups: 900 + 900 + 700 readings.
    let (resolution, body) = json(
        history(
            &base,
            &vin,
            &format!(
                "from={}&to={}",
                at(t0 - TimeDelta::days(9)),
                at(t0 + TimeDelta::days(1))
            ),
            None,
        )
        .await,
    )
    .await;
    assert_eq!(resolution, "1h");
    let hours = body["points"].as_array().unwrap();
    let counts: Vec<i64> = hours
        .iter()
        .map(|h| h["readings"].as_i64().unwrap())
        .collect();
    assert_eq!(counts, [900, 900, 700]);
    assert_eq!(
        hours[0]["time"]
            .as_str()
            .unwrap()
            .parse::<DateTime<Utc>>()
            .unwrap(),
        t0
    );
    assert_eq!(hours[0]["battery_first"], 100.0);
    assert_eq!(hours[0]["battery_max"], 100.0);
    let last = 100.0 - 899.0 * 0.01;
    assert!((hours[0]["battery_last"].as_f64().unwrap() - last).abs() < 1e-9);
    assert!((hours[0]["battery_min"].as_f64().unwrap() - last).abs() < 1e-9);
    let mean = (100.0 + last) / 2.0;
    assert!((hours[0]["battery_mean"].as_f64().unwrap() - mean).abs() < 1e-9);

    // Minutes as CSV: a header and a line per minute, 15 readings each but the last.
    let response = history(
        &base,
        &vin,
        &format!(
            "from={}&to={}&resolution=1m",
            at(t0),
            at(t0 + TimeDelta::hours(3))
        ),
        Some("text/csv"),
    )
    .await;
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/csv"));
    assert!(response.headers()["content-disposition"]
        .to_str()
        .unwrap()
        .contains(".csv"));
    let csv = response.text().await.unwrap();
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(header[..3], ["time", "readings", "battery_min"]);
    let readings_column = header.iter().position(|c| *c == "readings").unwrap();
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len(), 167, "10,000 s is 166 whole minutes and a part");
    assert!(rows.iter().all(|r| r.len() == header.len()));
    let counts: Vec<i64> = rows
        .iter()
        .map(|r| r[readings_column].parse().unwrap())
        .collect();
    assert!(counts[..166].iter().all(|c| *c == 15), "{counts:?}");
    assert_eq!(counts.iter().sum::<i64>(), READINGS);

    // Bad requests: 400 with a reason.
    for (query, says) in [
        (
            format!("from={}&to={}", at(t0), at(t0 - TimeDelta::hours(1))),
            "before",
        ),
        (
            format!("from={}&resolution=raw", at(t0 - TimeDelta::days(3))),
            "too long",
        ),
        ("from=last-tuesday".to_owned(), "RFC 3339"),
        ("resolution=5m".to_owned(), "resolution"),
        ("page=2".to_owned(), "unknown parameter"),
    ] {
        let response = history(&base, &vin, &query, None).await;
        assert_eq!(response.status(), 400, "{query}");
        let body: Value = response.json().await.unwrap();
        assert!(
            body["error"].as_str().unwrap().contains(says),
            "{query}: {body}"
        );
    }
    let response = history(&base, "NOT-A-VIN", "", None).await;
    assert_eq!(response.status(), 400);

    // A car without readings has an empty history, not an error.
    let (_, body) = json(history(&base, &test_vin(8), "", None).await).await;
    assert_eq!(body["points"].as_array().unwrap().len(), 0);
    pipeline.shutdown().await.unwrap();
}

#[tokio::test]
async fn sqlite_history() {
    let dir = tempfile::tempdir().unwrap();
    scenario(format!(
        "sqlite://{}",
        dir.path().join("ecars.db").display()
    ))
    .await;
}

#[tokio::test]
async fn postgres_history() {
    let server = PgServer::start().expect("throwaway PostgreSQL");
    scenario(server.url()).await;
}

/// A clean stop merges what the writers committed into the rollups before it returns: nothing
/// is left pending, though the merge interval had not come round.
#[tokio::test]
async fn a_clean_stop_leaves_no_rollup_pending() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = Pipeline::start(PipelineOptions::new(format!(
        "sqlite://{}",
        dir.path().join("ecars.db").display()
    )))
    .await
    .unwrap();
    let vin = test_vin(9);
    let t0 = Utc::now() - TimeDelta::minutes(30);
    let messages = (0..50)
        .map(|i| {
            (
                format!("vehicles/{vin}/telemetry"),
                payload(&vin, t0 + TimeDelta::seconds(i), i),
            )
        })
        .collect();
    publish_v4(pipeline.mqtt_addr, "stopping-car", None, messages)
        .await
        .unwrap();
    wait_for("the readings stored", Duration::from_secs(10), || async {
        pipeline.db.sensor_rows().count().await.unwrap_or(0) == 50
    })
    .await
    .unwrap();
    let db = pipeline.shutdown().await.unwrap();
    assert_eq!(
        db.rollups().apply_pending(1_000).await.unwrap().batches,
        0,
        "none pending"
    );
    let vin = ecars_model::Vin::parse(&vin).unwrap();
    let hours = db
        .rollups()
        .history_page(
            ecars_db::rollups::Width::Hour,
            &vin,
            t0 - TimeDelta::hours(2),
            t0 + TimeDelta::hours(2),
            10,
        )
        .await
        .unwrap();
    assert_eq!(hours.iter().map(|h| h.readings).sum::<i64>(), 50);
}
