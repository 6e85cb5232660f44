//! The Grafana dashboard and the alert rules name only metrics the binary exports: every metric
//! they query is on `/metrics` of a running process (`ecars up`'s composition, beside an ingest
//! node on Kafka with its spool and a persistence worker reading it, as in a scale-out
//! deployment), once it has seen one reading, one refused message and one HTTP request.

use std::collections::BTreeSet;
use std::time::Duration;

use ecars_e2e::{
    ingest_service, kafka_config, persist_service, publish_v4, test_vin, wait_for, Pipeline,
    PipelineOptions, RunningApp,
};

const CHART_FILES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../helm/ecars/files");

/// The metric names in a PromQL text: `ecars_*` and `process_*` identifiers.
fn metric_names(promql: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = promql.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts = promql[i..].starts_with("ecars_") || promql[i..].starts_with("process_");
        let boundary = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts && boundary {
            let end = promql[i..]
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .map_or(promql.len(), |n| i + n);
            names.insert(promql[i..end].to_owned());
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

/// Every PromQL expression of the dashboard (its panels' targets and its variables' queries).
fn dashboard_queries(dashboard: &serde_json::Value) -> Vec<String> {
    let mut queries = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            queries.push(target["expr"].as_str().expect("an expr").to_owned());
        }
    }
    for variable in dashboard["templating"]["list"]
        .as_array()
        .expect("variables")
    {
        if let Some(query) = variable["query"].as_str() {
            queries.push(query.to_owned());
        }
    }
    queries
}

/// The `expr:` of each alert rule (single-line or a `|` block).
fn alert_expressions(rules: &str) -> Vec<String> {
    let mut exprs = Vec::new();
    let mut lines = rules.lines().peekable();
    while let Some(line) = lines.next() {
        let Some(rest) = line.trim_start().strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        if rest == "|" {
            let mut block = String::new();
            while let Some(next) = lines.peek() {
                if next.trim_start().starts_with("for:") || next.trim_start().starts_with("labels:")
                {
                    break;
                }
                block.push_str(next.trim());
                block.push('\n');
                lines.next();
            }
            exprs.push(block);
        } else {
            exprs.push(rest.to_owned());
        }
    }
    exprs
}

#[test]
fn the_name_finder_finds_whole_metric_names() {
    let names = metric_names(
        "histogram_quantile(0.99, sum by (le) (rate(ecars_reading_age_seconds_bucket[5m]))) \
         / process_max_fds{job=~\"x\"} + my_ecars_thing",
    );
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        ["ecars_reading_age_seconds_bucket", "process_max_fds"]
    );
    let rules = "      - alert: A\n        expr: max(ecars_a) > 1\n        for: 5m\n      - alert: B\n        expr: |\n          sum(ecars_b)\n          and ecars_c\n        for: 1m\n";
    assert_eq!(
        alert_expressions(rules),
        ["max(ecars_a) > 1", "sum(ecars_b)\nand ecars_c\n"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_and_the_alerts_name_only_exported_metrics() {
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{CHART_FILES}/grafana-dashboard.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let rules = std::fs::read_to_string(format!("{CHART_FILES}/alerts.yml")).unwrap();
    let alerts = alert_expressions(&rules);
    assert!(alerts.len() >= 6, "{alerts:?}");
    let queries = dashboard_queries(&dashboard);
    assert!(queries.len() >= 16, "{queries:?}");
    let wanted: BTreeSet<String> = queries
        .iter()
        .chain(&alerts)
        .flat_map(|q| metric_names(q))
        .collect();

    // An ingest node on Kafka, with its spool.
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    for topic in ["ecars.telemetry", "ecars.telemetry.dlq"] {
        cluster.create_topic(topic, 2, 1).unwrap();
    }
    let spool = tempfile::tempdir().unwrap();
    let mut kafka = kafka_config(cluster.bootstrap_servers());
    kafka.create_topics = false;
    kafka.spool_dir = spool.path().to_owned();
    let ingest = RunningApp::start(ingest_service(&kafka).await.unwrap());
    // A persistence worker reading it, for the consumer lag.
    let worker_db = tempfile::tempdir().unwrap();
    let worker_url = format!("sqlite://{}", worker_db.path().join("worker.db").display());
    let persist = RunningApp::start(persist_service(&kafka, &worker_url, 100).await.unwrap());
    // `ecars up`'s composition: one reading, one refused message, one request.
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("ecars.db").display());
    let pipeline = Pipeline::start(PipelineOptions::new(url)).await.unwrap();
    let vin = test_vin(7);
    publish_v4(
        pipeline.mqtt_addr,
        &vin,
        None,
        vec![
            (
                format!("vehicles/{vin}/telemetry"),
                r#"{"battery": 80}"#.into(),
            ),
            (format!("vehicles/{vin}/telemetry"), "not json".into()),
        ],
    )
    .await
    .unwrap();
    let store = pipeline.db.sensor_rows();
    wait_for("the reading stored", Duration::from_secs(30), || async {
        store.count().await.unwrap_or(0) == 1
    })
    .await
    .unwrap();
    let answer = reqwest::get(format!("{}/v1/vehicles", pipeline.http_base()))
        .await
        .unwrap();
    assert!(answer.status().is_success());

    let metrics_url = format!("{}/metrics", pipeline.admin_base());
    let missing = || async {
        let exported = reqwest::get(&metrics_url)
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let names: BTreeSet<String> = exported
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .map(str::to_owned)
            .collect();
        wanted
            .iter()
            .filter(|name| !names.contains(*name))
            .cloned()
            .collect::<BTreeSet<String>>()
    };
    // The outbox gauges come from a task of their own, at start.
    if wait_for(
        "every metric on /metrics",
        Duration::from_secs(30),
        || async { missing().await.is_empty() },
    )
    .await
    .is_err()
    {
        panic!("not exported: {:?}", missing().await);
    }

    pipeline.shutdown().await.unwrap();
    persist.shutdown().await.unwrap();
    ingest.shutdown().await.unwrap();
}
