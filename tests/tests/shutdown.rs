//! A car's PUBACK means its reading is committed, and a shutdown keeps that promise: the
//! readings in flight are committed and acknowledged before the connections close, however long
//! their batch would otherwise have waited. (A file of its own: it reads the process's metrics.)

use std::time::{Duration, Instant};

use ecars_e2e::mqtt_wire::{packet, put_string as string};
use ecars_e2e::{reading_json, test_vin, wait_for, Pipeline, PipelineOptions};
use ecars_persist::PersistConfig;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_commits_and_acknowledges_every_reading_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let mut options =
        PipelineOptions::new(format!("sqlite://{}", dir.path().join("s.db").display()));
    // Batches that would wait a minute: only the shutdown commits them.
    options.persist = PersistConfig {
        batch_rows: 50_000,
        batch_delay: Duration::from_secs(60),
        ..PersistConfig::default()
    };
    let pipeline = Pipeline::start(options).await.unwrap();

    let mut socket = tokio::net::TcpStream::connect(pipeline.mqtt_addr)
        .await
        .unwrap();
    let mut connect = Vec::new();
    string(&mut connect, "MQTT");
    connect.extend_from_slice(&[4, 2, 0, 60]);
    string(&mut connect, "burst");
    socket.write_all(&packet(0x10, &connect)).await.unwrap();
    let mut connack = [0u8; 4];
    socket.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);
    let vin = test_vin(77);
    let mut burst = Vec::new();
    for pkid in 1..=100u16 {
        let mut body = Vec::new();
        string(&mut body, &format!("vehicles/{vin}/telemetry"));
        body.extend_from_slice(&pkid.to_be_bytes());
        body.extend_from_slice(reading_json(&vin, 50.0).as_bytes());
        burst.extend(packet(0x32, &body));
    }
    socket.write_all(&burst).await.unwrap();

    // The gateway has read them all: they wait for the batch's commit (a minute away).
    wait_for("100 readings received", Duration::from_secs(10), || async {
        pipeline
            .metrics()
            .await
            .unwrap()
            .lines()
            .any(|l| l == "ecars_readings_received_total 100")
    })
    .await
    .unwrap();
    let mut early = [0u8; 1];
    assert!(
        tokio::time::timeout(Duration::from_millis(300), socket.read(&mut early))
            .await
            .is_err(),
        "no PUBACK before the commit"
    );

    let stopping = Instant::now();
    let shutdown = tokio::spawn(pipeline.shutdown());
    let mut acks = Vec::new();
    socket.read_to_end(&mut acks).await.unwrap();
    let db = shutdown.await.unwrap().unwrap();
    assert!(
        stopping.elapsed() < Duration::from_secs(20),
        "the shutdown commits at once, not when the batch was due: {:?}",
        stopping.elapsed()
    );
    let pubacks: Vec<u16> = acks
        .chunks(4)
        .filter(|a| a.len() == 4 && a[0] == 0x40 && a[1] == 2)
        .map(|a| u16::from_be_bytes([a[2], a[3]]))
        .collect();
    assert_eq!(
        pubacks,
        (1..=100).collect::<Vec<_>>(),
        "every reading acknowledged, in order"
    );
    assert_eq!(db.sensor_rows().count().await.unwrap(), 100, "and stored");
}
