//! The Kafka backbone against a real Kafka-protocol broker over TCP (tansu): ingest publishes
//! each car's readings keyed by VIN with CloudEvents headers, two persistence replicas share the
//! consumer group, one stops in the middle, and every reading lands once.

use std::time::Duration;

use chrono::{DateTime, Utc};
use ecars_bus::kafka::{KafkaBus, KafkaConfig};
use ecars_bus::Bus;
use ecars_db::SensorRows;
use ecars_e2e::{
    ingest_service, kafka_config, metric_sum, persist_service, read_telemetry_topic, wait_for,
    KafkaServer, PgServer, RunningApp,
};
use ecars_model::telemetry::{parse_reading, DeadLetter, RejectReason, Rejection, TelemetryTopic};
use ecars_model::{Record, TelemetryReading};
use ecars_simulator::SimulatorConfig;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

fn count_now(store: &SensorRows) -> i64 {
    let store = store.clone();
    std::thread::spawn(move || {
        tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(async move { store.count().await.unwrap_or(-1) })
    })
    .join()
    .unwrap()
}

/// `ecars persist` on `database_url`, as an application of its own.
async fn persist_replica(kafka: &KafkaConfig, database_url: &str) -> RunningApp {
    RunningApp::start(persist_service(kafka, database_url, 500).await.unwrap())
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
    let spool = tempfile::tempdir().unwrap();
    let mut kafka = kafka_config(broker.brokers());
    kafka.partitions = 4;
    kafka.spool_dir = spool.path().to_owned();
    // The mock cluster's topics are made above (its admin API does not create them).
    kafka.create_topics = matches!(broker, Broker::Tansu(_));

    // Two replicas of `ecars persist` in one consumer group, started together so that they join
    // the group together: tansu 0.6 can hand a partition's new owner an offset past the last
    // commit when a member joins or leaves while records flow (see docs/ARCHITECTURE.md); a
    // replica leaving mid-run is tested on librdkafka's mock cluster.
    let database_url = pg.url();
    let (first, second) = tokio::join!(
        persist_replica(&kafka, &database_url),
        persist_replica(&kafka, &database_url)
    );

    // `ecars ingest` publishes to Kafka.
    let ingest = ingest_service(&kafka).await.unwrap();
    let mqtt_addr = ingest.mqtt_addr().unwrap();
    let ingest = RunningApp::start(ingest);
    let store = ecars_db::Database::connect_lazy(&pg.url())
        .unwrap()
        .sensor_rows();

    let (cars, per_car) = (50u32, 100u64);
    let total = i64::from(cars) * per_car as i64;
    let simulator = tokio::spawn(ecars_simulator::run(
        SimulatorConfig {
            vehicles: cars,
            interval: Duration::from_millis(5),
            broker: format!("mqtt://{mqtt_addr}"),
            readings_per_vehicle: Some(per_car),
            ..SimulatorConfig::default()
        },
        CancellationToken::new(),
    ));

    let first = if stop_one {
        // Stop one replica in the middle (as SIGTERM does): the other takes its partitions over.
        wait_for("a quarter of the rows", Duration::from_secs(60), || async {
            store.count().await.unwrap_or(0) >= total / 4
        })
        .await
        .unwrap();
        first.shutdown().await.unwrap();
        None
    } else {
        Some(first)
    };

    let report = simulator.await.unwrap().unwrap();
    assert_eq!(report.acknowledged, total as u64);
    if let Err(e) = wait_for(
        "every reading in PostgreSQL",
        Duration::from_secs(90),
        || async { store.count().await.unwrap_or(0) >= total },
    )
    .await
    {
        // Say where readings went missing: in Kafka already, or between Kafka and the table.
        let in_topic = read_telemetry_topic(
            &broker.brokers(),
            &kafka.topic(TelemetryReading::TOPIC),
            total as usize,
        )
        .await
        .map_or_else(
            |e| format!("not all: {e}"),
            |r| format!("all (and {} twice)", r.duplicates),
        );
        panic!(
            "{e}: {} rows; readings in the topic: {in_topic}",
            count_now(&store)
        );
    }
    // The unique event_id makes "exactly once" a count: no more rows than readings.
    assert_eq!(store.count().await.unwrap(), total);

    ingest.shutdown().await.unwrap();
    second.shutdown().await.unwrap();
    if let Some(first) = first {
        first.shutdown().await.unwrap();
    }

    // Another consumer reads the topic as any service would: keys, headers, order per car.
    let readout = read_telemetry_topic(
        &broker.brokers(),
        &kafka.topic(TelemetryReading::TOPIC),
        total as usize,
    )
    .await
    .unwrap();
    readout.assert_complete_and_in_order(cars, per_car);
    // Where a Java service producing or joining by VIN expects each car.
    readout.assert_java_partitioning(4);
}

/// The path of a published schema file of docs/schemas.
fn published_schema(file: &str) -> String {
    format!(
        "{}/../{}/{file}",
        env!("CARGO_MANIFEST_DIR"),
        ecars_model::schema::SCHEMA_DIR
    )
}

/// Runs the Python consumer on `topic` and returns its records (it validates each value against
/// the JSON Schema in the file `schema`).
async fn python_consume(
    brokers: &str,
    topic: &str,
    count: usize,
    schema: &str,
) -> Vec<serde_json::Value> {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/consume_telemetry.py");
    let out = tokio::process::Command::new("python3")
        .args([script, brokers, topic, &count.to_string(), schema])
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
    let kafka = kafka_config(kafka_server.brokers());
    let bus = Bus::new(KafkaBus::connect(&kafka).await.unwrap());
    let topic = TelemetryTopic::Vehicle("1HGCM82633A004352".into());
    let mut sent = Vec::new();
    for battery in 0..10 {
        let payload = format!(r#"{{"battery":{battery},"latitude":"37.5","name":"Py"}}"#);
        let reading = parse_reading(
            &topic,
            payload.as_bytes(),
            uuid::Uuid::now_v7(),
            chrono::Utc::now(),
        )
        .unwrap();
        sent.push(reading.clone());
        bus.publish(reading).await.unwrap();
    }
    // And dead letters, for the other topic and schema.
    let mut letters = Vec::new();
    for n in 0..3 {
        let letter = DeadLetter::new(
            "ecars/1HGCM82633A004352/telemetry",
            &format!("car-{n}"),
            Rejection {
                reason: RejectReason::NotJson,
                detail: "expected value at line 1 column 1".into(),
            },
            b"\xff not json",
            chrono::Utc::now(),
        );
        letters.push(letter.clone());
        bus.publish(letter).await.unwrap();
    }
    bus.close().await;

    let records = python_consume(
        &kafka_server.brokers(),
        &kafka.topic(TelemetryReading::TOPIC),
        10,
        &published_schema("com.ecars.telemetry.v1.json"),
    )
    .await;
    let dead = python_consume(
        &kafka_server.brokers(),
        &kafka.topic(DeadLetter::TOPIC),
        3,
        &published_schema("com.ecars.telemetry.deadletter.v1.json"),
    )
    .await;
    for (record, letter) in dead.iter().zip(&letters) {
        assert_eq!(record["schema_errors"], serde_json::json!([]), "{record}");
        assert_eq!(record["headers"]["ce_type"], DeadLetter::EVENT_TYPE);
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
        assert_eq!(record["headers"]["ce_type"], TelemetryReading::EVENT_TYPE);
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
    let kafka_server = KafkaServer::start().unwrap();
    let kafka = kafka_config(kafka_server.brokers());
    let bus = Bus::new(KafkaBus::connect(&kafka).await.unwrap());
    let topic = TelemetryTopic::Vehicle("1HGCM82633A004352".into());
    let reading = |battery: u32| {
        let payload = format!(r#"{{"battery":{battery}}}"#);
        parse_reading(
            &topic,
            payload.as_bytes(),
            uuid::Uuid::now_v7(),
            chrono::Utc::now(),
        )
        .unwrap()
    };
    let old = reading(1);
    bus.publish(old.clone()).await.unwrap();
    let mut a = bus.tail::<TelemetryReading>("relay-test").await.unwrap();
    let mut b = bus.tail::<TelemetryReading>("relay-test").await.unwrap();
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
        bus.publish(r.clone()).await.unwrap();
        sent.push(r.event_id);
        for (tail, seen) in [(&mut a, &mut seen_a), (&mut b, &mut seen_b)] {
            if let Ok(Ok(Some(delivery))) =
                tokio::time::timeout(Duration::from_millis(500), tail.next()).await
            {
                seen.push(delivery.record.event_id);
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
    bus.publish(last.clone()).await.unwrap();
    for tail in [&mut a, &mut b] {
        loop {
            let delivery = tokio::time::timeout(Duration::from_secs(10), tail.next())
                .await
                .expect("the record within 10 s")
                .unwrap()
                .unwrap();
            if delivery.record.event_id == last.event_id {
                break;
            }
        }
    }
}

/// A stream the product does not have, to show what adding one takes: this type and its
/// `Record` implementation, nothing in the bus.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
struct DoorEvent {
    vin: String,
    open: bool,
    at: DateTime<Utc>,
    id: uuid::Uuid,
}

impl Record for DoorEvent {
    const STREAM: &'static str = "doors";
    const TOPIC: &'static str = "doors";
    const EVENT_TYPE: &'static str = "com.example.door.v1";
    const SOURCE: &'static str = "urn:example:doors";
    const KEY: &'static str = "VIN";

    fn key(&self) -> &str {
        &self.vin
    }

    fn id(&self) -> uuid::Uuid {
        self.id
    }

    fn time(&self) -> DateTime<Utc> {
        self.at
    }
}

/// A new record type is a new topic on Kafka, created when first used, with its key and
/// CloudEvents headers, and a consumer group reads it back: no change to the bus.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_record_type_is_a_new_topic_with_no_change_to_the_bus() {
    let kafka_server = KafkaServer::start().unwrap();
    let kafka = kafka_config(kafka_server.brokers());
    let bus = Bus::new(KafkaBus::connect(&kafka).await.unwrap());
    let mut doors = bus.subscribe::<DoorEvent>("door-watcher").await.unwrap();
    let sent: Vec<DoorEvent> = (0..5)
        .map(|n| DoorEvent {
            vin: "1HGCM82633A004352".into(),
            open: n % 2 == 0,
            at: Utc::now(),
            id: uuid::Uuid::now_v7(),
        })
        .collect();
    for event in &sent {
        bus.publish(event.clone()).await.unwrap();
    }
    let mut received = Vec::new();
    while received.len() < sent.len() {
        let delivery = tokio::time::timeout(Duration::from_secs(30), doors.next())
            .await
            .expect("a door event within 30 s")
            .unwrap()
            .unwrap();
        doors.ack(&[delivery.receipt]).await.unwrap();
        received.push(delivery.record);
    }
    assert_eq!(
        received, sent,
        "every event, in order (one key, one partition)"
    );

    // Another team's client sees the topic with its key and headers, and values that match the
    // type's schema.
    let schema_dir = tempfile::tempdir().unwrap();
    let schema = schema_dir.path().join("door.json");
    let info = ecars_model::RecordInfo::of::<DoorEvent>();
    std::fs::write(&schema, (info.schema)().to_string()).unwrap();
    let records = python_consume(
        &kafka_server.brokers(),
        &kafka.topic(DoorEvent::TOPIC),
        5,
        schema.to_str().unwrap(),
    )
    .await;
    for (record, event) in records.iter().zip(&sent) {
        assert_eq!(record["schema_errors"], serde_json::json!([]), "{record}");
        assert_eq!(record["key"], event.vin);
        assert_eq!(record["headers"]["ce_type"], DoorEvent::EVENT_TYPE);
        assert_eq!(record["headers"]["ce_id"], event.id.to_string());
        assert_eq!(record["value"]["open"], event.open);
    }
    bus.close().await;
}

/// `ecars_kafka_consumer_lag`: per partition, the records the group has not committed. Records
/// read but not acknowledged (not yet in the database) still count; acknowledging them brings
/// it to 0. librdkafka reports it every 10 s while the consumer reads, and only then: the time
/// of the last report says how stale the figure is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_lag_counts_what_the_group_has_not_committed() {
    let kafka_server = KafkaServer::start().unwrap();
    let kafka = kafka_config(kafka_server.brokers());
    let bus = Bus::new(KafkaBus::connect(&kafka).await.unwrap());
    for i in 0..12u32 {
        bus.publish(DoorEvent {
            vin: format!("LAGCAR{}", i % 3),
            open: i % 2 == 0,
            at: Utc::now(),
            id: uuid::Uuid::now_v7(),
        })
        .await
        .unwrap();
    }
    let mut doors = bus.subscribe::<DoorEvent>("lag-test").await.unwrap();
    let mut receipts = Vec::new();
    while receipts.len() < 12 {
        let delivery = tokio::time::timeout(Duration::from_secs(30), doors.next())
            .await
            .expect("the records within 30 s")
            .unwrap()
            .unwrap();
        receipts.push(delivery.receipt);
    }
    reads_until(&mut doors, 12.0).await;
    doors.ack(&receipts).await.unwrap();
    reads_until(&mut doors, 0.0).await;

    // When it last reported: recent while it reads; unchanged while it does not read (the
    // absence of a report can only be waited out: two and a half statistics intervals); moving
    // again once it reads.
    let reported = || {
        metric_sum(
            "ecars_kafka_consumer_lag_timestamp_seconds{",
            "group=\"lag-test\"",
        )
    };
    let last = reported();
    let now = Utc::now().timestamp() as f64;
    assert!((now - last).abs() < 60.0, "reported at {last}, now {now}");
    tokio::time::sleep(Duration::from_secs(25)).await;
    assert_eq!(
        reported(),
        last,
        "no report while the consumer does not read"
    );
    reads_while(
        &mut doors,
        || reported() == last,
        || "no report after reading again".into(),
    )
    .await;

    assert!(
        ecars_runtime::metrics::install_recorder()
            .render()
            .lines()
            .filter(|l| l.starts_with("ecars_kafka_consumer_lag{") && l.contains("lag-test"))
            .count()
            >= 2,
        "a series per partition"
    );
}

fn lag_of_test_group() -> f64 {
    metric_sum("ecars_kafka_consumer_lag{", "group=\"lag-test\"")
}

/// Reads on until the lag metric is `want`, for at most 40 s.
async fn reads_until(doors: &mut ecars_bus::Subscription<DoorEvent>, want: f64) {
    reads_while(
        doors,
        || lag_of_test_group() != want,
        || format!("lag {} instead of {want}", lag_of_test_group()),
    )
    .await;
}

/// Reads on (there is nothing more to read: librdkafka's statistics arrive while the consumer
/// polls) while `waiting` holds, for at most 40 s; then fails with `failure`.
async fn reads_while(
    doors: &mut ecars_bus::Subscription<DoorEvent>,
    waiting: impl Fn() -> bool,
    failure: impl Fn() -> String,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    while waiting() {
        assert!(tokio::time::Instant::now() < deadline, "{}", failure());
        let next = tokio::time::timeout(Duration::from_millis(200), doors.next()).await;
        assert!(next.is_err(), "no record beyond the 12");
    }
}

/// Topics created at start carry `--kafka-min-insync-replicas`: the broker reports it in the
/// topic's configuration, so `acks=all` waits for that many replicas.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn created_topics_carry_min_insync_replicas() {
    use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
    use rdkafka::client::DefaultClientContext;

    let kafka_server = KafkaServer::start().unwrap();
    let mut kafka = kafka_config(kafka_server.brokers());
    kafka.min_insync_replicas = Some(2);
    let bus = KafkaBus::connect(&kafka).await.unwrap();
    bus.ensure_topics(&[TelemetryReading::TOPIC]).await.unwrap();
    let admin: AdminClient<DefaultClientContext> = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka_server.brokers())
        .create()
        .unwrap();
    let topic = kafka.topic(TelemetryReading::TOPIC);
    let described = admin
        .describe_configs(
            [&ResourceSpecifier::Topic(&topic)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(10))),
        )
        .await
        .unwrap();
    let config = described
        .into_iter()
        .next()
        .expect("one resource")
        .expect("the broker describes the topic");
    let min_insync = config
        .get("min.insync.replicas")
        .and_then(|entry| entry.value.clone());
    assert_eq!(min_insync.as_deref(), Some("2"), "{:?}", config.entries);
}
