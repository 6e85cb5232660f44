//! The Kafka backbone against a real Kafka-protocol broker over TCP (tansu): ingest publishes
//! each car's readings keyed by VIN with CloudEvents headers, two persistence replicas share the
//! consumer group, one stops in the middle, and every reading lands once.

use std::sync::Arc;
use std::time::Duration;

use ecars_e2e::{read_telemetry_topic, wait_for, KafkaServer, PgServer};
use ecars_ingest::{BoundIngest, IngestConfig};
use ecars_persist::{PersistConfig, PersistWorker, SensorStore};
use ecars_shared::bus::kafka::{DEAD_LETTER_EVENT_TYPE, TELEMETRY_EVENT_TYPE};
use ecars_shared::bus::{Bus, KafkaBus, KafkaConfig, Stream};
use ecars_simulator::SimulatorConfig;
use tokio_util::sync::CancellationToken;

fn count_now(store: &SensorStore) -> i64 {
    let store = store.clone();
    std::thread::spawn(move || {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(async move { store.count_readings().await.unwrap_or(-1) })
    })
    .join()
    .unwrap()
}

async fn persist_replica(
    kafka: &KafkaConfig,
    store: &SensorStore,
) -> (tokio::task::JoinHandle<()>, CancellationToken) {
    let bus = KafkaBus::connect(kafka).await.unwrap();
    let config = PersistConfig {
        batch_rows: 500,
        batch_ms: 50,
    };
    let worker = PersistWorker::subscribe(&config, store.clone(), &bus, None)
        .await
        .unwrap();
    let stop = CancellationToken::new();
    let token = stop.clone();
    let task = tokio::spawn(async move {
        worker.run(token).await.unwrap();
        drop(bus);
    });
    (task, stop)
}

/// Where the test's Kafka runs.
enum Broker {
    Tansu(KafkaServer),
    Mock(rdkafka::mocking::MockCluster<'static, rdkafka::producer::DefaultProducerContext>),
}

impl Broker {
    fn brokers(&self) -> String {
        match self {
            Broker::Tansu(server) => server.brokers(),
            Broker::Mock(cluster) => cluster.bootstrap_servers(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tansu_ingest_to_two_persist_replicas_exactly_once_in_order() {
    ecars_e2e::init_logs();
    two_replicas(Broker::Tansu(KafkaServer::start().unwrap()), false).await;
}

/// librdkafka's own mock cluster (the Kafka protocol over loopback) takes the rebalance: tansu
/// 0.6 was seen to hand a partition's new owner an offset past the last commit (see README).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_cluster_persist_replica_stopped_mid_run_loses_nothing() {
    ecars_e2e::init_logs();
    let cluster = rdkafka::mocking::MockCluster::new(1).unwrap();
    for topic in ["ecars.telemetry", "ecars.telemetry.dlq"] {
        cluster.create_topic(topic, 4, 1).unwrap();
    }
    two_replicas(Broker::Mock(cluster), true).await;
}

/// Ingest into Kafka, two persistence replicas in one group (one stopped in the middle when
/// `stop_one`), then checks: every reading stored once, keys, headers and per-car order.
async fn two_replicas(broker: Broker, stop_one: bool) {
    let pg = PgServer::start().unwrap();
    let store = SensorStore::connect_lazy(&pg.url()).unwrap();
    store.migrate().await.unwrap();
    let mut kafka = KafkaConfig::for_brokers(broker.brokers());
    kafka.partitions = 4;
    // The mock cluster's topics are made above (its admin API does not create them).
    kafka.create_topics = matches!(broker, Broker::Tansu(_));

    // Ingest publishes to Kafka.
    let bus: Arc<dyn Bus> = Arc::new(KafkaBus::connect(&kafka).await.unwrap());
    let ingest_config = IngestConfig {
        mqtt_addr: "127.0.0.1:0".parse().unwrap(),
        mqtt_ws_addr: "127.0.0.1:0".parse().unwrap(),
        ..IngestConfig::default()
    };
    let ingest = BoundIngest::bind(&ingest_config, Arc::clone(&bus))
        .await
        .unwrap();
    let mqtt_addr = ingest.mqtt_addr().unwrap();
    let stop_ingest = CancellationToken::new();
    let ingest_task = tokio::spawn(ingest.run(stop_ingest.clone()));

    // Two replicas of the persistence worker in one consumer group.
    let (mut first, stop_first) = persist_replica(&kafka, &store).await;
    let (second, stop_second) = persist_replica(&kafka, &store).await;

    let (cars, per_car) = (50u32, 100u64);
    let total = i64::from(cars) * per_car as i64;
    let simulator = tokio::spawn(ecars_simulator::run(
        SimulatorConfig {
            vehicles: cars,
            interval_ms: 5,
            broker: format!("mqtt://{mqtt_addr}"),
            readings_per_vehicle: Some(per_car),
            ..SimulatorConfig::default()
        },
        CancellationToken::new(),
    ));

    if stop_one {
        // Stop one replica in the middle: the other takes its partitions over.
        wait_for("a quarter of the rows", Duration::from_secs(60), || async {
            store.count_readings().await.unwrap_or(0) >= total / 4
        })
        .await
        .unwrap();
        stop_first.cancel();
        (&mut first).await.unwrap();
    }

    let report = simulator.await.unwrap().unwrap();
    assert_eq!(report.acknowledged, total as u64);
    wait_for(
        "every reading in PostgreSQL",
        Duration::from_secs(90),
        || async { store.count_readings().await.unwrap_or(0) >= total },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}: {} rows", count_now(&store)));
    // The unique event_id makes "exactly once" a count: no more rows than readings.
    assert_eq!(store.count_readings().await.unwrap(), total);

    stop_ingest.cancel();
    ingest_task.await.unwrap();
    bus.close().await;
    stop_second.cancel();
    second.await.unwrap();
    if !stop_one {
        stop_first.cancel();
        first.await.unwrap();
    }

    // Another consumer reads the topic as any service would: keys, headers, order per car.
    let readout = read_telemetry_topic(
        &broker.brokers(),
        &kafka.topic(ecars_shared::bus::Stream::Telemetry),
        total as usize,
    )
    .await
    .unwrap();
    readout.assert_complete_and_in_order(cars, per_car);
}

/// Runs the Python consumer on `topic` and returns its records (it validates each value against
/// `schema`, a file of docs/schemas).
async fn python_consume(
    brokers: &str,
    topic: &str,
    count: usize,
    schema: &str,
) -> Vec<serde_json::Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/consume_telemetry.py");
    let schema = format!(
        "{}/../{}/{schema}",
        env!("CARGO_MANIFEST_DIR"),
        ecars_shared::schema::SCHEMA_DIR
    );
    let out = tokio::process::Command::new("python3")
        .args([script, brokers, topic, &count.to_string(), &schema])
        .output()
        .await
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let records: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), count);
    records
}

/// Python's confluent-kafka, a client nobody here wrote, reads what we publish: VIN keys,
/// CloudEvents headers, JSON values with eCars' fields.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_python_confluent_kafka_consumer_reads_our_topic() {
    let kafka_server = KafkaServer::start().unwrap();
    let kafka = KafkaConfig::for_brokers(kafka_server.brokers());
    let bus = KafkaBus::connect(&kafka).await.unwrap();
    let topic = ecars_shared::telemetry::TelemetryTopic::Vehicle("1HGCM82633A004352".into());
    let mut sent = Vec::new();
    for battery in 0..10 {
        let payload = format!(r#"{{"battery":{battery},"latitude":"37.5","name":"Py"}}"#);
        let reading = ecars_shared::telemetry::parse_reading(
            &topic,
            payload.as_bytes(),
            uuid::Uuid::now_v7(),
            chrono::Utc::now(),
        )
        .unwrap();
        sent.push(reading.clone());
        bus.publish(ecars_shared::bus::BusRecord::Telemetry(reading))
            .await
            .unwrap();
    }
    // And dead letters, for the other topic and schema.
    let mut letters = Vec::new();
    for n in 0..3 {
        let letter = ecars_shared::telemetry::DeadLetter::new(
            "ecars/1HGCM82633A004352/telemetry",
            &format!("car-{n}"),
            ecars_shared::telemetry::Rejection {
                reason: ecars_shared::telemetry::RejectReason::NotJson,
                detail: "expected value at line 1 column 1".into(),
            },
            b"\xff not json",
            chrono::Utc::now(),
        );
        letters.push(letter.clone());
        bus.publish(ecars_shared::bus::BusRecord::DeadLetter(letter))
            .await
            .unwrap();
    }
    bus.close().await;

    let records = python_consume(
        &kafka_server.brokers(),
        &kafka.topic(Stream::Telemetry),
        10,
        "com.ecars.telemetry.v1.json",
    )
    .await;
    let dead = python_consume(
        &kafka_server.brokers(),
        &kafka.topic(Stream::DeadLetters),
        3,
        "com.ecars.telemetry.deadletter.v1.json",
    )
    .await;
    for (record, letter) in dead.iter().zip(&letters) {
        assert_eq!(record["schema_errors"], serde_json::json!([]), "{record}");
        assert_eq!(record["headers"]["ce_type"], DEAD_LETTER_EVENT_TYPE);
        assert_eq!(record["value"]["id"], letter.id.to_string());
        assert_eq!(record["value"]["reason"], "not_json");
    }
    assert_eq!(records.len(), 10);
    for (record, reading) in records.iter().zip(&sent) {
        assert_eq!(record["key"], "1HGCM82633A004352");
        assert_eq!(
            record["schema_errors"],
            serde_json::json!([]),
            "the value is valid against docs/schemas: {record}"
        );
        assert_eq!(record["headers"]["ce_specversion"], "1.0");
        assert_eq!(record["headers"]["ce_type"], TELEMETRY_EVENT_TYPE);
        assert_eq!(record["headers"]["ce_id"], reading.event_id.to_string());
        assert_eq!(record["headers"]["ce_subject"], "1HGCM82633A004352");
        assert_eq!(record["headers"]["content-type"], "application/json");
        let value = &record["value"];
        assert_eq!(value["event_id"], reading.event_id.to_string());
        assert_eq!(value["battery"], reading.battery.unwrap());
        assert_eq!(value["latitude"], 37.5, "numbers, whatever the car sent");
        assert_eq!(value["name"], "Py");
        for field in [
            "received_at",
            "date",
            "vin",
            "range",
            "mpge",
            "speed",
            "longitude",
            "malfunction",
            "profile",
        ] {
            assert!(
                value.get(field).is_some(),
                "{field} is present (null when the car sent none)"
            );
        }
    }
}

/// Each relay instance follows the telemetry topic on its own: two tails both get every record
/// published after they joined, and neither gets what came before (they start at the newest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tails_each_see_every_new_record_from_the_newest_offset() {
    use ecars_shared::bus::{Bus, BusRecord, Stream};
    let kafka_server = KafkaServer::start().unwrap();
    let kafka = KafkaConfig::for_brokers(kafka_server.brokers());
    let bus = KafkaBus::connect(&kafka).await.unwrap();
    let topic = ecars_shared::telemetry::TelemetryTopic::Vehicle("1HGCM82633A004352".into());
    let reading = |battery: u32| {
        let payload = format!(r#"{{"battery":{battery}}}"#);
        ecars_shared::telemetry::parse_reading(
            &topic,
            payload.as_bytes(),
            uuid::Uuid::now_v7(),
            chrono::Utc::now(),
        )
        .unwrap()
    };
    let old = reading(1);
    bus.publish(BusRecord::Telemetry(old.clone()))
        .await
        .unwrap();
    let mut a = bus.tail(Stream::Telemetry, "relay-test").await.unwrap();
    let mut b = bus.tail(Stream::Telemetry, "relay-test").await.unwrap();
    // A tail starts at the newest offset once it has its partitions: publish until both see
    // a record (each publish is a new reading), then check what they saw.
    let mut sent = Vec::new();
    let mut seen_a = Vec::new();
    let mut seen_b = Vec::new();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while seen_a.is_empty() || seen_b.is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the tails got nothing"
        );
        let r = reading(50 + sent.len() as u32);
        bus.publish(BusRecord::Telemetry(r.clone())).await.unwrap();
        sent.push(r.event_id);
        for (tail, seen) in [(&mut a, &mut seen_a), (&mut b, &mut seen_b)] {
            if let Ok(Ok(Some(delivery))) =
                tokio::time::timeout(Duration::from_millis(500), tail.next()).await
            {
                if let BusRecord::Telemetry(r) = delivery.record {
                    seen.push(r.event_id);
                }
            }
        }
    }
    for seen in [&seen_a, &seen_b] {
        assert!(
            !seen.contains(&old.event_id),
            "a tail starts at the newest record"
        );
        assert!(seen.iter().all(|id| sent.contains(id)));
    }
    // Once both follow, a new record reaches both.
    let last = reading(99);
    bus.publish(BusRecord::Telemetry(last.clone()))
        .await
        .unwrap();
    for tail in [&mut a, &mut b] {
        loop {
            let delivery = tokio::time::timeout(Duration::from_secs(10), tail.next())
                .await
                .expect("the record within 10 s")
                .unwrap()
                .unwrap();
            if let BusRecord::Telemetry(r) = delivery.record {
                if r.event_id == last.event_id {
                    break;
                }
            }
        }
    }
}
