//! The MQTT edge as cars meet it, in the composition `ecars up` runs: keep-alive as the spec says
//! (with Python's paho-mqtt, a client stack nobody here wrote), answers in packet order, and the
//! protocol checks (with raw packets, which no client library sends on purpose).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use ecars_e2e::mqtt_wire::{packet, put_string as string};
use ecars_e2e::{test_vin, wait_for, Pipeline, PipelineOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn sqlite_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}", dir.path().join("edge.db").display())
}

/// Runs `tests/python/paho_car.py`; returns its report.
async fn paho_car(
    addr: SocketAddr,
    vin: &str,
    keep_alive: u16,
    seconds: f64,
    interval: f64,
) -> serde_json::Value {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/python/paho_car.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .args([
            addr.ip().to_string(),
            addr.port().to_string(),
            vin.to_owned(),
            keep_alive.to_string(),
            seconds.to_string(),
            interval.to_string(),
        ])
        .output()
        .await
        .expect("python3 runs (the test command installs paho-mqtt)");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A car on paho-mqtt publishing every 200 ms with keep-alive 2 s never sends PINGREQ: every
/// packet is activity, so it stays connected (the gateway used to leave it to the broker, which
/// saw silence and dropped it at 3 s).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_paho_car_that_never_pings_stays_connected() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = Pipeline::start(PipelineOptions::new(sqlite_url(&dir)))
        .await
        .unwrap();
    let vin = test_vin(701);
    let report = paho_car(pipeline.mqtt_addr, &vin, 2, 10.5, 0.2).await;
    assert_eq!(report["connack"], "Success", "{report}");
    assert_eq!(report["disconnects"], 0, "never disconnected: {report}");
    let published = report["published"].as_u64().unwrap();
    assert!(published >= 50, "{report}");
    assert_eq!(report["acked"].as_u64(), Some(published), "{report}");
    let db = pipeline.shutdown().await.unwrap();
    assert_eq!(db.sensor_rows().count().await.unwrap() as u64, published);
}

/// Keep-alive 0 ("off", as the spec allows) is accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paho_car_with_keep_alive_0_is_accepted() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = Pipeline::start(PipelineOptions::new(sqlite_url(&dir)))
        .await
        .unwrap();
    let report = paho_car(pipeline.mqtt_addr, &test_vin(702), 0, 1.0, 0.5).await;
    assert_eq!(report["connack"], "Success", "{report}");
    assert_eq!(report["disconnects"], 0, "{report}");
    assert_eq!(report["acked"], report["published"], "{report}");
    pipeline.shutdown().await.unwrap();
}

fn connect(level: u8, client_id: &str, keep_alive: u16) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, "MQTT");
    body.push(level);
    body.push(0x02);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    if level == 5 {
        body.push(0);
    }
    string(&mut body, client_id);
    packet(0x10, &body)
}

fn publish(level: u8, topic: &str, pkid: u16, payload: &str) -> Vec<u8> {
    let mut body = Vec::new();
    string(&mut body, topic);
    body.extend_from_slice(&pkid.to_be_bytes());
    if level == 5 {
        body.push(0);
    }
    body.extend_from_slice(payload.as_bytes());
    packet(0x32, &body)
}

fn reading(vin: &str) -> String {
    ecars_e2e::reading_json(vin, 50.0)
}

async fn connected(addr: SocketAddr, level: u8, client_id: &str, keep_alive: u16) -> TcpStream {
    let mut socket = TcpStream::connect(addr).await.unwrap();
    socket
        .write_all(&connect(level, client_id, keep_alive))
        .await
        .unwrap();
    let mut head = [0u8; 2];
    socket.read_exact(&mut head).await.unwrap();
    assert_eq!(head[0], 0x20, "CONNACK");
    let mut rest = vec![0u8; usize::from(head[1])];
    socket.read_exact(&mut rest).await.unwrap();
    assert_eq!(rest[1], 0, "accepted");
    socket
}

/// Reads what the server sends until it closes; how long that took.
async fn until_closed(socket: &mut TcpStream, within: Duration) -> (Vec<u8>, Duration) {
    let started = Instant::now();
    let mut all = Vec::new();
    tokio::time::timeout(within, socket.read_to_end(&mut all))
        .await
        .expect("the server closes the connection in time")
        .unwrap_or(0);
    (all, started.elapsed())
}

/// A silent car is closed at one and a half times its keep-alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_car_is_closed_at_one_and_a_half_keep_alives() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = Pipeline::start(PipelineOptions::new(sqlite_url(&dir)))
        .await
        .unwrap();
    let mut socket = connected(pipeline.mqtt_addr, 5, "silent", 2).await;
    let (rest, waited) = until_closed(&mut socket, Duration::from_secs(10)).await;
    assert_eq!(
        rest,
        [0xE0, 2, 0x8D, 0],
        "MQTT 5 DISCONNECT: keep alive timeout"
    );
    assert!(
        waited >= Duration::from_millis(2900) && waited < Duration::from_millis(4000),
        "{waited:?}"
    );
    pipeline.shutdown().await.unwrap();
}

/// SUBSCRIBE, PINGREQ and a reading in one TCP write: SUBACK, PINGRESP and PUBACK, in that
/// order (the SUBACK comes from the broker, the others from the gateway).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packets_in_one_write_are_answered_in_their_order() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = Pipeline::start(PipelineOptions::new(sqlite_url(&dir)))
        .await
        .unwrap();
    let vin = test_vin(703);
    for round in 0..10u16 {
        let mut socket = connected(pipeline.mqtt_addr, 4, &format!("app-{round}"), 60).await;
        let mut burst = Vec::new();
        let mut subscribe = (7u16).to_be_bytes().to_vec();
        string(&mut subscribe, "fleet/notices");
        subscribe.push(1);
        burst.extend(packet(0x82, &subscribe));
        burst.extend([0xC0, 0x00]);
        burst.extend(publish(
            4,
            &format!("vehicles/{vin}/telemetry"),
            8,
            &reading(&vin),
        ));
        socket.write_all(&burst).await.unwrap();
        let mut answers = [0u8; 5 + 2 + 4];
        tokio::time::timeout(Duration::from_secs(5), socket.read_exact(&mut answers))
            .await
            .expect("every answer within 5 s")
            .unwrap();
        assert_eq!(
            answers,
            [0x90, 3, 0, 7, 1, 0xD0, 0, 0x40, 2, 0, 8],
            "SUBACK, PINGRESP, PUBACK (round {round})"
        );
    }
    pipeline.shutdown().await.unwrap();
}

/// A QoS 1 PUBLISH with packet id 0 breaks the protocol: MQTT 3.1.1 closes the connection,
/// MQTT 5 says DISCONNECT 0x82 first. Nothing is acknowledged or stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn packet_id_0_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = Pipeline::start(PipelineOptions::new(sqlite_url(&dir)))
        .await
        .unwrap();
    let vin = test_vin(704);
    let topic = format!("vehicles/{vin}/telemetry");
    for (level, expected) in [(4u8, vec![]), (5, vec![0xE0, 2, 0x82, 0])] {
        let mut socket = connected(pipeline.mqtt_addr, level, "zero", 60).await;
        socket
            .write_all(&publish(level, &topic, 0, &reading(&vin)))
            .await
            .unwrap();
        let (rest, _) = until_closed(&mut socket, Duration::from_secs(5)).await;
        assert_eq!(rest, expected, "MQTT level {level}");
    }
    // A valid reading afterwards is stored: the count says the refused ones were not.
    let mut socket = connected(pipeline.mqtt_addr, 4, "valid", 60).await;
    socket
        .write_all(&publish(4, &topic, 1, &reading(&vin)))
        .await
        .unwrap();
    let mut puback = [0u8; 4];
    socket.read_exact(&mut puback).await.unwrap();
    assert_eq!(puback, [0x40, 2, 0, 1]);
    wait_for("the valid reading", Duration::from_secs(10), || async {
        pipeline.db.sensor_rows().count().await.unwrap_or(0) == 1
    })
    .await
    .unwrap();
    let metrics = pipeline.metrics().await.unwrap();
    assert!(
        metrics.contains("ecars_mqtt_protocol_violations_total{reason=\"protocol_error\"}"),
        "{metrics}"
    );
    pipeline.shutdown().await.unwrap();
}

/// A stopping node tells its MQTT 5 cars why (DISCONNECT 0x8B "server shutting down") or, with
/// `--mqtt-server-reference`, where to go (0x9C "use another server" with the Server
/// Reference); MQTT 3.1.1 has no DISCONNECT from the server, so those cars see the close.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_node_tells_mqtt_5_cars_why_or_where_to_go() {
    let reference = "mqtt-b.example.com:8883";
    let mut to_b = vec![0xE0, 28, 0x9C, 26, 0x1C, 0, 23];
    to_b.extend_from_slice(reference.as_bytes());
    for (server_reference, expected) in [(None, vec![0xE0, 2, 0x8B, 0]), (Some(reference), to_b)] {
        let dir = tempfile::tempdir().unwrap();
        let mut options = PipelineOptions::new(sqlite_url(&dir));
        options.ingest.server_reference = server_reference.map(str::to_owned);
        let pipeline = Pipeline::start(options).await.unwrap();
        let mut v5 = connected(pipeline.mqtt_addr, 5, "stopping-v5", 60).await;
        let mut v4 = connected(pipeline.mqtt_addr, 4, "stopping-v4", 60).await;
        pipeline.shutdown().await.unwrap();
        let (said, _) = until_closed(&mut v5, Duration::from_secs(10)).await;
        assert_eq!(said, expected, "MQTT 5, reference {server_reference:?}");
        let (said, _) = until_closed(&mut v4, Duration::from_secs(10)).await;
        assert!(said.is_empty(), "MQTT 3.1.1: {said:?}");
    }
}
