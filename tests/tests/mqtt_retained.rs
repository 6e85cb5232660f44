//! Retained messages are bounded (issue 14): a retained message over the size limit, or on one
//! topic too many, is refused and counted (MQTT 3.1.1 has no refusal, so the connection
//! closes); replacing a topic's message or clearing it with an empty payload stays possible.
//! Anonymous clients on loopback, so that any topic may be published to.

use std::time::Duration;

use ecars_e2e::{Pipeline, PipelineOptions};
use rumqttc::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS};

const WAIT: Duration = Duration::from_secs(10);

async fn client(pipeline: &Pipeline, id: &str) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(id, "127.0.0.1", pipeline.mqtt_addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut events) = AsyncClient::new(options, 16);
    loop {
        match tokio::time::timeout(WAIT, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return (client, events),
            Ok(Ok(_)) => {}
            other => panic!("no CONNACK: {other:?}"),
        }
    }
}

/// Publishes a retained message at QoS 1: `true` when it was acknowledged, `false` when the
/// broker closed the connection instead.
async fn retain(pipeline: &Pipeline, id: &str, topic: &str, payload: Vec<u8>) -> bool {
    let (client, mut events) = client(pipeline, id).await;
    client
        .publish(topic, QoS::AtLeastOnce, true, payload)
        .await
        .unwrap();
    loop {
        match tokio::time::timeout(WAIT, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => return true,
            Ok(Ok(_)) => {}
            Ok(Err(ConnectionError::Io(_) | ConnectionError::MqttState(_))) => return false,
            Ok(Err(e)) => panic!("unexpected: {e}"),
            Err(_) => panic!("neither PUBACK nor close within {WAIT:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retained_messages_are_bounded_in_size_and_topics() {
    let dir = tempfile::tempdir().unwrap();
    let mut options =
        PipelineOptions::new(format!("sqlite://{}", dir.path().join("r.db").display()));
    options.ingest.retained_max_bytes = 1024;
    options.ingest.retained_max_topics = 2;
    let pipeline = Pipeline::start(options).await.unwrap();

    assert!(
        !retain(&pipeline, "big", "fleet/notice", vec![b'x'; 2048]).await,
        "a retained message over the size limit is refused"
    );
    assert!(retain(&pipeline, "a", "fleet/a", b"one".to_vec()).await);
    assert!(retain(&pipeline, "b", "fleet/b", b"two".to_vec()).await);
    assert!(
        retain(&pipeline, "a2", "fleet/a", b"one again".to_vec()).await,
        "replacing a topic's message takes no new place"
    );
    assert!(
        !retain(&pipeline, "c", "fleet/c", b"three".to_vec()).await,
        "a third retained topic is refused"
    );
    assert!(
        retain(&pipeline, "clear", "fleet/a", Vec::new()).await,
        "an empty payload clears its topic"
    );
    assert!(retain(&pipeline, "c2", "fleet/c", b"three".to_vec()).await);

    // What was kept reaches a later subscriber; what was refused does not.
    let (subscriber, mut events) = client(&pipeline, "late").await;
    subscriber
        .subscribe("fleet/#", QoS::AtMostOnce)
        .await
        .unwrap();
    let mut retained = Vec::new();
    while retained.len() < 2 {
        match tokio::time::timeout(WAIT, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::Publish(p)))) => retained.push(p.topic.clone()),
            Ok(Ok(_)) => {}
            other => panic!("retained messages missing ({retained:?}): {other:?}"),
        }
    }
    retained.sort();
    assert_eq!(retained, vec!["fleet/b".to_owned(), "fleet/c".to_owned()]);

    let metrics = pipeline.metrics().await.unwrap();
    for line in [
        "ecars_mqtt_retained_refused_total{reason=\"too_large\"} 1",
        "ecars_mqtt_retained_refused_total{reason=\"too_many_topics\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    pipeline.shutdown().await.unwrap();
}
