//! A stopping ingest node (SIGTERM: a rolling update, a node drain) hands its spool to Kafka
//! before it exits: readings acknowledged to cars during a Kafka outage reach Kafka even if the
//! pod and its volume never come back.

use std::time::Duration;

use ecars_bus::kafka::spool::Spool;
use ecars_e2e::{
    ingest_service, kafka_config, metric_sum, read_telemetry_topic, wait_for, RunningApp,
};
use ecars_model::{Record, TelemetryReading};
use ecars_simulator::SimulatorConfig;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_ingest_node_hands_its_spool_to_kafka() {
    ecars_e2e::init_logs();
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    for topic in ["ecars.telemetry", "ecars.telemetry.dlq"] {
        cluster.create_topic(topic, 4, 1).unwrap();
    }
    let spool_dir = tempfile::tempdir().unwrap();
    let mut kafka = kafka_config(cluster.bootstrap_servers());
    kafka.create_topics = false;
    kafka.spool_dir = spool_dir.path().to_owned();
    let ingest = ingest_service(&kafka).await.unwrap();
    let mqtt_addr = ingest.mqtt_addr().unwrap();
    let ingest = RunningApp::start(ingest);

    // Kafka is away while the cars send: every reading is acknowledged from the spool.
    cluster.broker_down(1).unwrap();
    let (cars, per_car) = (20u32, 1_500u64);
    let total = u64::from(cars) * per_car;
    let report = ecars_simulator::run(
        SimulatorConfig {
            vehicles: cars,
            interval: Duration::from_millis(2),
            broker: format!("mqtt://{mqtt_addr}"),
            readings_per_vehicle: Some(per_car),
            ..SimulatorConfig::default()
        },
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(report.acknowledged, total);
    wait_for("readings on disk", Duration::from_secs(30), || async {
        metric_sum("ecars_kafka_spool_bytes", "") > 0.0
    })
    .await
    .unwrap();

    // Kafka comes back and the node is told to stop at once, as SIGTERM does.
    cluster.broker_up(1).unwrap();
    ingest.shutdown().await.unwrap();

    // Nothing was left on the node's disk, and Kafka has every reading, each car's in order.
    let spool = Spool::open(spool_dir.path(), 1 << 30).unwrap();
    assert!(
        spool.is_empty(),
        "{} bytes left in the spool",
        spool.bytes()
    );
    let readout = read_telemetry_topic(
        &cluster.bootstrap_servers(),
        &kafka.topic(TelemetryReading::TOPIC),
        total as usize,
    )
    .await
    .unwrap();
    readout.assert_complete_and_in_order(cars, per_car);
}
