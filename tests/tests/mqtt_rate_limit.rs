//! The per-connection publish rate limit (issue 14): a car that publishes faster than the limit
//! is slowed by backpressure — every reading acknowledged and stored, none dropped — and the
//! throttling is counted. Raw MQTT, so the test controls the pace (all at once).

use std::time::{Duration, Instant};

use ecars_e2e::mqtt_wire::{packet, put_string};
use ecars_e2e::{test_vin, wait_for, Pipeline, PipelineOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_car_over_the_rate_is_slowed_and_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut options =
        PipelineOptions::new(format!("sqlite://{}", dir.path().join("t.db").display()));
    options.ingest.max_publish_rate = 100;
    let pipeline = Pipeline::start(options).await.unwrap();
    let vin = test_vin(9);
    let mut socket = tokio::net::TcpStream::connect(pipeline.mqtt_addr)
        .await
        .unwrap();
    let mut connect = Vec::new();
    put_string(&mut connect, "MQTT");
    connect.extend_from_slice(&[4, 0x02, 0, 60]);
    put_string(&mut connect, &vin);
    socket.write_all(&packet(0x10, &connect)).await.unwrap();
    let mut connack = [0u8; 4];
    socket.read_exact(&mut connack).await.unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);

    // 300 readings at once: 100 pass at once (one second's burst), the rest at 100 a second.
    let count = 300u16;
    let mut burst = Vec::new();
    for pkid in 1..=count {
        let mut body = Vec::new();
        put_string(&mut body, &format!("vehicles/{vin}/telemetry"));
        body.extend_from_slice(&pkid.to_be_bytes());
        body.extend_from_slice(format!(r#"{{"battery":{}}}"#, pkid % 100).as_bytes());
        burst.extend_from_slice(&packet(0x32, &body));
    }
    let started = Instant::now();
    socket.write_all(&burst).await.unwrap();
    let mut acks = vec![0u8; usize::from(count) * 4];
    tokio::time::timeout(Duration::from_secs(30), socket.read_exact(&mut acks))
        .await
        .expect("every PUBACK")
        .unwrap();
    let took = started.elapsed();
    for (i, ack) in acks.chunks_exact(4).enumerate() {
        assert_eq!(ack[0], 0x40, "PUBACK {i}");
        assert_eq!(
            u16::from_be_bytes([ack[2], ack[3]]),
            i as u16 + 1,
            "in order"
        );
    }
    assert!(
        took >= Duration::from_millis(1_500),
        "200 readings over the burst at 100/s take about 2 s, took {took:?}"
    );
    wait_for("all 300 stored", Duration::from_secs(10), || async {
        pipeline.db.sensor_rows().count().await.unwrap_or(0) == i64::from(count)
    })
    .await
    .unwrap();
    let metrics = pipeline.metrics().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("ecars_mqtt_publish_throttled_total ") && !l.ends_with(" 0")),
        "{metrics}"
    );
    pipeline.shutdown().await.unwrap();
}
