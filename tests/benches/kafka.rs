//! Benchmark of the Kafka backbone against a local Kafka-protocol broker (tansu, in memory):
//!
//! - MQTT → Kafka: 1,000 simulated cars publish as fast as they are acknowledged; a car's
//!   PUBACK is sent only after Kafka acknowledged the record (`acks=all`), so acknowledged
//!   readings per second is the ingest rate into Kafka;
//! - Kafka → PostgreSQL: then one persistence worker reads the topic from the start and writes
//!   it; rows per second until every reading is stored.
//!
//! Run: `cargo bench -p ecars-e2e --bench kafka` (`-- --quick` for a short run).

use std::sync::Arc;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use std::time::{Duration, Instant};

use ecars_e2e::{KafkaServer, PgServer};
use ecars_ingest::{BoundIngest, IngestConfig};
use ecars_persist::{PersistConfig, PersistWorker, SensorStore};
use ecars_shared::bus::{Bus, KafkaBus, KafkaConfig};
use ecars_simulator::SimulatorConfig;
use tokio_util::sync::CancellationToken;

/// What drives the cars.
#[derive(Clone, Copy)]
enum Load {
    /// `ecars_e2e::raw_mqtt_load`: pre-encoded packets, little CPU.
    Raw,
    /// The eCars simulator: one rumqttc client per car.
    Simulator,
}

/// One run of cars through ingest into Kafka; returns acknowledged readings per second.
async fn mqtt_to_kafka(bus: &Arc<dyn Bus>, load: Load, vehicles: u32, per_vehicle: u64) -> f64 {
    let config = IngestConfig {
        mqtt_addr: "127.0.0.1:0".parse().unwrap(),
        mqtt_ws_addr: "127.0.0.1:0".parse().unwrap(),
        ..IngestConfig::default()
    };
    let ingest = BoundIngest::bind(&config, Arc::clone(bus)).await.unwrap();
    let mqtt = ingest.mqtt_addr().unwrap();
    let stop = CancellationToken::new();
    let ingest_task = tokio::spawn(ingest.run(stop.clone()));
    if let Load::Raw = load {
        let rate = ecars_e2e::raw_mqtt_load(mqtt, vehicles, per_vehicle, 32)
            .await
            .unwrap();
        stop.cancel();
        ingest_task.await.unwrap();
        return rate;
    }
    let report = ecars_simulator::run(
        SimulatorConfig {
            vehicles,
            interval_ms: 0,
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
    stop.cancel();
    ingest_task.await.unwrap();
    report.rate()
}

fn main() {
    let log = ecars_shared::config::LogConfig {
        format: ecars_shared::config::LogFormat::Text,
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
        let mut kafka = KafkaConfig::for_brokers(kafka_server.brokers());
        kafka.partitions = 6;
        let bus: Arc<dyn Bus> = Arc::new(KafkaBus::connect(&kafka).await.unwrap());
        // One configuration per process (`--raw`): each run starts a fresh broker.
        let load = if std::env::args().any(|a| a == "--raw") {
            Load::Raw
        } else {
            Load::Simulator
        };
        {
            let rate = mqtt_to_kafka(&bus, load, vehicles, per_vehicle).await;
            println!(
                "MQTT -> Kafka, {}: {total} readings from {vehicles} cars = {rate:.0} readings/s",
                match load {
                    Load::Raw => "raw MQTT load generator (32 in flight per car)",
                    Load::Simulator => "simulator (a rumqttc client per car, same 2 cores)",
                }
            );
        }

        bus.close().await;

        let store = SensorStore::connect_lazy(&pg.url()).unwrap();
        store.migrate().await.unwrap();
        let worker = PersistWorker::subscribe(
            &PersistConfig {
                batch_rows: 5000,
                batch_ms: 50,
            },
            store.clone(),
            bus.as_ref(),
            None,
        )
        .await
        .unwrap();
        let stop = CancellationToken::new();
        let started = Instant::now();
        let task = tokio::spawn(worker.run(stop.clone()));
        while (store.count_readings().await.unwrap_or(0) as u64) < total {
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
        stop.cancel();
        task.await.unwrap().unwrap();
    });
}
