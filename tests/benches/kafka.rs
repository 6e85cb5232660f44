//! Benchmark of the Kafka backbone against a local Kafka-protocol broker (tansu, in memory):
//!
//! - MQTT → Kafka: 1,000 simulated cars publish as fast as they are acknowledged; a car's
//!   PUBACK is sent only after Kafka acknowledged the record (`acks=all`), so acknowledged
//!   readings per second is the ingest rate into Kafka;
//! - Kafka → PostgreSQL: then one persistence worker reads the topic from the start and writes
//!   it; rows per second until every reading is stored.
//!
//! Run: `cargo bench -p ecars-e2e --bench kafka` (`-- --quick` for a short run).

use std::time::{Duration, Instant};

use ecars_bus::kafka::KafkaConfig;
use ecars_e2e::{ingest_service, kafka_config, persist_service, KafkaServer, PgServer, RunningApp};
use ecars_simulator::SimulatorConfig;
use tokio_util::sync::CancellationToken;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// What drives the cars.
#[derive(Clone, Copy)]
enum Load {
    /// `ecars_e2e::raw_mqtt_load`: pre-encoded packets, little CPU.
    Raw,
    /// The eCars simulator: one rumqttc client per car.
    Simulator,
}

/// One run of cars through ingest into Kafka; returns acknowledged readings per second.
async fn mqtt_to_kafka(kafka: &KafkaConfig, load: Load, vehicles: u32, per_vehicle: u64) -> f64 {
    // `ecars ingest`, as it runs in production (with its disk spool for outages).
    let ingest = ingest_service(kafka).await.unwrap();
    let mqtt = ingest.mqtt_addr().unwrap();
    let ingest = RunningApp::start(ingest);
    if let Load::Raw = load {
        let rate = ecars_e2e::raw_mqtt_load(mqtt, vehicles, per_vehicle, 32)
            .await
            .unwrap();
        ingest.shutdown().await.unwrap();
        return rate;
    }
    let report = ecars_simulator::run(
        SimulatorConfig {
            vehicles,
            interval: Duration::ZERO,
            broker: format!("mqtt://{mqtt}"),
            readings_per_vehicle: Some(per_vehicle),
            ..SimulatorConfig::default()
        },
        CancellationToken::new(),
    )
    .await
    .unwrap();
    assert_eq!(report.acknowledged, u64::from(vehicles) * per_vehicle);
    if report.connection_errors > 0 {
        println!(
            "  ({} connection errors, each followed by a reconnect)",
            report.connection_errors
        );
    }
    ingest.shutdown().await.unwrap();
    report.rate()
}

fn main() {
    let log = ecars_runtime::settings::LogConfig {
        format: ecars_runtime::settings::LogFormat::Text,
        filter: std::env::var("ECARS_LOG").unwrap_or_else(|_| "warn,rumqttd=off".into()),
    };
    log.init().expect("log filter");
    let quick = std::env::args().any(|a| a == "--quick");
    let (vehicles, mut per_vehicle) = if quick { (200u32, 100u64) } else { (1000, 200) };
    // `--per-car N`: a longer run, where the 1,000 connections' start weighs less.
    let args: Vec<String> = std::env::args().collect();
    if let Some(n) = args
        .iter()
        .position(|a| a == "--per-car")
        .and_then(|i| args.get(i + 1))
    {
        per_vehicle = n.parse().expect("--per-car takes a number");
    }
    let total = u64::from(vehicles) * per_vehicle;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let kafka_server = KafkaServer::start().expect("tansu");
    let pg = PgServer::start().expect("PostgreSQL");
    runtime.block_on(async {
        let spool = tempfile::tempdir().unwrap();
        let mut kafka = kafka_config(kafka_server.brokers());
        kafka.partitions = 6;
        kafka.spool_dir = spool.path().to_owned();
        // One configuration per process (`--raw`): each run starts a fresh broker.
        let load = if std::env::args().any(|a| a == "--raw") {
            Load::Raw
        } else {
            Load::Simulator
        };
        {
            let rate = mqtt_to_kafka(&kafka, load, vehicles, per_vehicle).await;
            println!(
                "MQTT -> Kafka, {}: {total} readings from {vehicles} cars = {rate:.0} readings/s",
                match load {
                    Load::Raw => "raw MQTT load generator (32 in flight per car)",
                    Load::Simulator => "simulator (a rumqttc client per car, same 2 cores)",
                }
            );
        }

        // `ecars persist`: one replica reads the topic from the start.
        let started = Instant::now();
        let persist = persist_service(&kafka, &pg.url(), 5000).await.unwrap();
        let store = persist.database().unwrap().sensor_rows();
        let persist = RunningApp::start(persist);
        while (store.count().await.unwrap_or(0) as u64) < total {
            assert!(
                started.elapsed() < Duration::from_secs(300),
                "persist stalled"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let seconds = started.elapsed().as_secs_f64();
        println!(
            "Kafka -> PostgreSQL: {total} rows in {seconds:.2}s = {:.0} rows/s (one worker)",
            total as f64 / seconds
        );
        persist.shutdown().await.unwrap();
    });
}
