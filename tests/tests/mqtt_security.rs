//! Cars isolated from each other on MQTT (issue 14): with device credentials on, a car that
//! logged in reads and writes only its own topics and cannot take another car's session.

use std::time::Duration;

use ecars_e2e::{reading_json, test_vin, Pipeline, PipelineOptions};
use ecars_model::device_auth::DeviceSecret;
use ecars_model::Vin;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet,
    Publish, QoS, SubscribeFilter, SubscribeReasonCode,
};

const WAIT: Duration = Duration::from_secs(10);
const SECRET: &str = "a-fleet-secret-of-some-length";

/// A car logged in as `vin` with client id `client_id`.
async fn car(pipeline: &Pipeline, vin: &Vin, client_id: &str) -> (AsyncClient, EventLoop) {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", pipeline.mqtt_addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_credentials(vin.as_str(), DeviceSecret::new(SECRET).password_for(vin));
    let (client, mut events) = AsyncClient::new(options, 16);
    match next_packet(&mut events).await {
        Packet::ConnAck(ack) => assert_eq!(ack.code, ConnectReturnCode::Success),
        other => panic!("expected CONNACK, got {other:?}"),
    }
    (client, events)
}

/// The next packet from the server.
async fn next_packet(events: &mut EventLoop) -> Packet {
    loop {
        match tokio::time::timeout(WAIT, events.poll()).await {
            Ok(Ok(Event::Incoming(packet))) => return packet,
            Ok(Ok(Event::Outgoing(_))) => {}
            Ok(Err(e)) => panic!("connection failed: {e}"),
            Err(_) => panic!("nothing from the server within {WAIT:?}"),
        }
    }
}

/// The return codes of the next SUBACK.
async fn suback(events: &mut EventLoop) -> Vec<SubscribeReasonCode> {
    loop {
        if let Packet::SubAck(ack) = next_packet(events).await {
            return ack.return_codes;
        }
    }
}

/// The next message delivered (PUBACKs and other answers skipped).
async fn delivered(events: &mut EventLoop) -> Publish {
    loop {
        if let Packet::Publish(publish) = next_packet(events).await {
            return publish;
        }
    }
}

#[tokio::test]
async fn a_car_reads_and_writes_only_its_own_topics_and_keeps_its_session() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = PipelineOptions::new(format!(
        "sqlite://{}",
        dir.path().join("ecars.db").display()
    ));
    options.device_secret = Some(SECRET.into());
    let pipeline = Pipeline::start(options).await.unwrap();
    let (a, b) = (
        Vin::parse(&test_vin(1)).unwrap(),
        Vin::parse(&test_vin(2)).unwrap(),
    );
    let b_telemetry = format!("vehicles/{b}/telemetry");
    let a_telemetry = format!("vehicles/{a}/telemetry");

    // B listens on its own topics.
    let (b_client, mut b_events) = car(&pipeline, &b, b.as_str()).await;
    b_client
        .subscribe(format!("vehicles/{b}/#"), QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(
        suback(&mut b_events).await,
        vec![SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );

    // A asks for everything: only its own filter is granted, each refusal in its place.
    let (a_client, mut a_events) = car(&pipeline, &a, &format!("{a}-1")).await;
    let filters = [
        "#".to_owned(),
        "vehicles/+/telemetry".to_owned(),
        format!("vehicles/{b}/#"),
        format!("vehicles/{a}/#"),
    ];
    a_client
        .subscribe_many(
            filters
                .iter()
                .map(|f| SubscribeFilter::new(f.clone(), QoS::AtLeastOnce)),
        )
        .await
        .unwrap();
    assert_eq!(
        suback(&mut a_events).await,
        vec![
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
        ]
    );
    // A SUBSCRIBE with nothing of A's in it is answered without reaching the broker.
    a_client
        .subscribe(b_telemetry.clone(), QoS::AtLeastOnce)
        .await
        .unwrap();
    assert_eq!(
        suback(&mut a_events).await,
        vec![SubscribeReasonCode::Failure]
    );

    // B's reading reaches B, and not A: the first message A gets is its own later reading.
    b_client
        .publish(
            &b_telemetry,
            QoS::AtLeastOnce,
            false,
            reading_json(b.as_str(), 70.0),
        )
        .await
        .unwrap();
    assert_eq!(delivered(&mut b_events).await.topic, b_telemetry);
    a_client
        .publish(
            &a_telemetry,
            QoS::AtLeastOnce,
            false,
            reading_json(a.as_str(), 71.0),
        )
        .await
        .unwrap();
    assert_eq!(delivered(&mut a_events).await.topic, a_telemetry);

    // A may not publish to B's topics: MQTT 3.1.1 has no refusal but closing the connection.
    a_client
        .publish(
            format!("vehicles/{b}/commands"),
            QoS::AtLeastOnce,
            true,
            "unlock",
        )
        .await
        .unwrap();
    let closed = loop {
        match tokio::time::timeout(WAIT, a_events.poll()).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => break e,
            Err(_) => panic!("A's connection stayed open after publishing to B's topic"),
        }
    };
    assert!(
        !matches!(closed, ConnectionError::ConnectionRefused(_)),
        "{closed:?}"
    );

    // A with B's client id is refused; B keeps its connection and its session.
    let mut stolen = MqttOptions::new(b.as_str(), "127.0.0.1", pipeline.mqtt_addr.port());
    stolen.set_credentials(a.as_str(), DeviceSecret::new(SECRET).password_for(&a));
    let (_thief, mut thief_events) = AsyncClient::new(stolen, 4);
    match tokio::time::timeout(WAIT, thief_events.poll())
        .await
        .unwrap()
    {
        Err(ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, ConnectReturnCode::BadClientId)
        }
        other => panic!("expected a refused connection, got {other:?}"),
    }
    // Nothing of A's reached B: the next message B gets is its own next reading.
    b_client
        .publish(
            &b_telemetry,
            QoS::AtLeastOnce,
            false,
            reading_json(b.as_str(), 69.0),
        )
        .await
        .unwrap();
    let next = delivered(&mut b_events).await;
    assert_eq!(next.topic, b_telemetry);
    assert!(!next.retain);

    // A later subscriber on B's topics finds no retained message forged by A.
    let (late, mut late_events) = car(&pipeline, &b, &format!("{b}-late")).await;
    late.subscribe(format!("vehicles/{b}/#"), QoS::AtLeastOnce)
        .await
        .unwrap();
    suback(&mut late_events).await;
    b_client
        .publish(
            &b_telemetry,
            QoS::AtLeastOnce,
            false,
            reading_json(b.as_str(), 68.0),
        )
        .await
        .unwrap();
    // (rumqttc sends from its event loop: B's must run for the publish to go out.)
    assert_eq!(delivered(&mut b_events).await.topic, b_telemetry);
    assert_eq!(delivered(&mut late_events).await.topic, b_telemetry);

    let metrics = pipeline.metrics().await.unwrap();
    for line in [
        r#"ecars_mqtt_not_authorized_total{action="subscribe"} 4"#,
        r#"ecars_mqtt_not_authorized_total{action="publish"} 1"#,
        r#"ecars_mqtt_connections_refused_total{reason="client_id_not_owned"} 1"#,
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    pipeline.shutdown().await.unwrap();
}
