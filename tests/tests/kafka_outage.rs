//! Kafka goes away for 60 s in the middle of a simulated run (librdkafka's mock cluster takes its
//! only broker down). Ingest keeps acknowledging the cars from its disk spool and stays ready
//! (its `/readyz` says it is spooling), the relay stays ready, the persistence worker, which
//! only reads Kafka, is not; when Kafka is back every accepted reading reaches PostgreSQL once,
//! each car's in order.

use std::time::Duration;

use ecars_e2e::{
    ingest_service, kafka_config, metric_sum, persist_service, read_telemetry_topic, wait_for,
    PgServer, RunningApp,
};
use ecars_model::{Record, TelemetryReading};
use ecars_simulator::SimulatorConfig;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kafka_down_for_60s_loses_and_duplicates_nothing() {
    ecars_e2e::init_logs();
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    for topic in ["ecars.telemetry", "ecars.telemetry.dlq"] {
        cluster.create_topic(topic, 4, 1).unwrap();
    }
    let pg = PgServer::start().unwrap();
    let spool_dir = tempfile::tempdir().unwrap();
    let mut kafka = kafka_config(cluster.bootstrap_servers());
    kafka.create_topics = false;
    kafka.spool_dir = spool_dir.path().to_owned();

    // `ecars ingest` and `ecars persist`, each as its own application.
    let ingest = ingest_service(&kafka).await.unwrap();
    let mqtt_addr = ingest.mqtt_addr().unwrap();
    let readyz = format!("http://{}/readyz", ingest.admin_addr());
    let status = format!("http://{}/v1/status", ingest.http_addr());
    let ingest = RunningApp::start(ingest);
    let persist = persist_service(&kafka, &pg.url(), 500).await.unwrap();
    let store = persist.database().unwrap().sensor_rows();
    let persist_readyz = format!("http://{}/readyz", persist.admin_addr());
    let persist = RunningApp::start(persist);
    // `ecars relay`: the live view, its backlog from the database.
    let relay = ecars_app::App::build(ecars_app::Settings {
        database: Some(ecars_db::DatabaseConfig { url: pg.url() }),
        relay: Some(ecars_relay::RelayConfig::default()),
        ..ecars_app::Settings::service(ecars_e2e::loopback_http(), kafka.clone())
    })
    .await
    .unwrap();
    let relay_readyz = format!("http://{}/readyz", relay.admin_addr());
    let relay = RunningApp::start(relay);

    // 20 cars, a reading every 25 ms each (800/s), for about 80 s: the outage is in the middle.
    let (cars, per_car) = (20u32, 3_200u64);
    let total = u64::from(cars) * per_car;
    let simulator = tokio::spawn(ecars_simulator::run(
        SimulatorConfig {
            vehicles: cars,
            interval: Duration::from_millis(25),
            broker: format!("mqtt://{mqtt_addr}"),
            readings_per_vehicle: Some(per_car),
            malfunction: 2,
            ..SimulatorConfig::default()
        },
        CancellationToken::new(),
    ));

    wait_for("the first 2,000 rows", Duration::from_secs(60), || async {
        store.count().await.unwrap_or(0) >= 2_000
    })
    .await
    .unwrap();
    for url in [&readyz, &persist_readyz, &relay_readyz] {
        assert_eq!(reqwest::get(url).await.unwrap().status(), 200, "{url}");
    }

    cluster.broker_down(1).unwrap();
    wait_for(
        "ingest to switch to its spool",
        Duration::from_secs(30),
        || async { metric_sum("ecars_kafka_spooling", "") == 1.0 },
    )
    .await
    .unwrap();
    // Ingest can serve (cars are acknowledged from the spool): it stays in the Service. While
    // the broker is down, a probe takes up to its 2 s metadata timeout.
    let ready = reqwest::get(&readyz).await.unwrap();
    assert_eq!(ready.status(), 200, "ingest stays ready while it spools");
    let body: serde_json::Value = ready.json().await.unwrap();
    assert!(
        body["bus"].as_str().unwrap().starts_with("spooling: "),
        "{body}"
    );
    let relay_ready = reqwest::get(&relay_readyz).await.unwrap();
    assert_eq!(relay_ready.status(), 200, "the relay stays ready");
    // The worker only reads Kafka: it says so, once the cluster stops answering.
    wait_for(
        "the persistence worker to report the outage",
        Duration::from_secs(30),
        || async { reqwest::get(&persist_readyz).await.unwrap().status() == 503 },
    )
    .await
    .unwrap();
    let spooled_at_start = metric_sum("ecars_kafka_spool_records_total", "written");
    tokio::time::sleep(Duration::from_secs(60)).await;
    // Cars were acknowledged all along: a minute of readings went to disk, not just a window.
    let spooled = metric_sum("ecars_kafka_spool_records_total", "written") - spooled_at_start;
    assert!(
        spooled >= 20_000.0,
        "the cars kept being acknowledged during the outage: {spooled} readings spooled"
    );
    assert!(metric_sum("ecars_kafka_spool_bytes", "") > 0.0);
    // The status calls it degraded, and says since when readings wait.
    let degraded: serde_json::Value = reqwest::get(&status).await.unwrap().json().await.unwrap();
    assert_eq!(degraded["condition"], "degraded", "{degraded}");
    let spool = &degraded["bus"]["spool"];
    assert_eq!(spool["in_use"], true, "{degraded}");
    let waited = spool["oldest_age_seconds"].as_f64().unwrap();
    assert!(
        waited >= 55.0,
        "the oldest spooled reading is from the outage's start: {degraded}"
    );
    let oldest = metric_sum("ecars_kafka_spool_oldest_timestamp_seconds", "");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    assert!((55.0..3600.0).contains(&(now - oldest)), "{oldest}");
    cluster.broker_up(1).unwrap();

    let report = simulator.await.unwrap().unwrap();
    assert_eq!(report.published, total);
    assert_eq!(report.acknowledged, total, "every reading acknowledged");
    wait_for(
        "every reading in PostgreSQL",
        Duration::from_secs(120),
        || async { store.count().await.unwrap_or(0) >= total as i64 },
    )
    .await
    .unwrap();
    wait_for("the spool to drain", Duration::from_secs(30), || async {
        metric_sum("ecars_kafka_spooling", "") == 0.0
    })
    .await
    .unwrap();
    assert_eq!(metric_sum("ecars_kafka_spool_bytes", ""), 0.0);
    assert_eq!(
        metric_sum("ecars_kafka_spool_oldest_timestamp_seconds", ""),
        0.0
    );
    for url in [&readyz, &persist_readyz, &relay_readyz] {
        assert_eq!(reqwest::get(url).await.unwrap().status(), 200, "{url}");
    }
    let recovered: serde_json::Value = reqwest::get(&status).await.unwrap().json().await.unwrap();
    assert_eq!(recovered["condition"], "ok", "{recovered}");
    // Unique event ids: the count is "none lost, none twice".
    assert_eq!(store.count().await.unwrap(), total as i64);

    ingest.shutdown().await.unwrap();
    persist.shutdown().await.unwrap();
    relay.shutdown().await.unwrap();

    let readout = read_telemetry_topic(
        &cluster.bootstrap_servers(),
        &kafka.topic(TelemetryReading::TOPIC),
        total as usize,
    )
    .await
    .unwrap();
    readout.assert_complete_and_in_order(cars, per_car);
    // Also the records ingest produced from its spool.
    readout.assert_java_partitioning(4);
    eprintln!(
        "outage: {spooled} readings spooled, {} delivered twice to Kafka (absorbed by event ids)",
        readout.duplicates
    );
}
