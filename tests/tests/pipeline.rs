//! End to end through the real rumqttd broker: MQTT clients nobody here wrote (rumqttc,
//! Debian's mosquitto_pub) publish, and rows appear in a real database and the HTTP API.

use std::time::Duration;
use tokio::process::Command;

use ecars_e2e::{
    publish_v4, reading_json, test_vin, wait_for, PgServer, Pipeline, PipelineOptions,
};
use ecars_model::device_auth::DeviceSecret;
use ecars_model::Vin;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS, Transport};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

fn sqlite_url(dir: &tempfile::TempDir) -> String {
    format!("sqlite://{}", dir.path().join("ecars.db").display())
}

async fn get_json(url: &str) -> Value {
    reqwest::get(url)
        .await
        .expect("HTTP request")
        .json()
        .await
        .expect("JSON body")
}

async fn count(pipeline: &Pipeline) -> i64 {
    pipeline.db.sensor_rows().count().await.unwrap_or(-1)
}

async fn mosquitto_pub(addr: std::net::SocketAddr, args: &[&str]) -> std::process::Output {
    Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args(args)
        .output()
        .await
        .expect("mosquitto_pub (Debian's mosquitto-clients) is installed by the test command")
}

#[tokio::test]
async fn rumqttc_v4_and_v5_clients_reach_the_database_and_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = Pipeline::start(PipelineOptions::new(sqlite_url(&dir)))
        .await
        .unwrap();

    let messages: Vec<(String, String)> = (0..5)
        .flat_map(|car| {
            let vin = test_vin(car);
            (0..20).map(move |i| {
                (
                    format!("vehicles/{vin}/telemetry"),
                    reading_json(&vin, 90.0 - f64::from(i)),
                )
            })
        })
        .collect();
    publish_v4(pipeline.mqtt_addr, "v4-client", None, messages)
        .await
        .unwrap();

    // MQTT 5 on the same port.
    let mut options =
        rumqttc::v5::MqttOptions::new("v5-client", "127.0.0.1", pipeline.mqtt_addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = rumqttc::v5::AsyncClient::new(options, 16);
    let vin = test_vin(99);
    for i in 0..10 {
        client
            .publish(
                format!("vehicles/{vin}/telemetry"),
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
                false,
                reading_json(&vin, 50.0 + f64::from(i)),
            )
            .await
            .unwrap();
    }
    let mut acked = 0;
    while acked < 10 {
        if let rumqttc::v5::Event::Incoming(rumqttc::v5::mqttbytes::v5::Packet::PubAck(ack)) =
            tokio::time::timeout(WAIT, eventloop.poll())
                .await
                .unwrap()
                .unwrap()
        {
            assert_eq!(
                ack.reason,
                rumqttc::v5::mqttbytes::v5::PubAckReason::Success
            );
            acked += 1;
        }
    }

    wait_for("110 rows", WAIT, || async { count(&pipeline).await == 110 })
        .await
        .unwrap();
    let base = pipeline.http_base();
    let rows = get_json(&format!(
        "{base}/v1/vehicles/{}/telemetry?limit=5",
        test_vin(2)
    ))
    .await;
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 5);
    // Newest first: the last published reading (battery 71) leads.
    assert_eq!(rows[0]["battery"], 71.0);
    assert_eq!(
        rows[0]["latitude"], 37.7749,
        "string coordinates are stored as numbers"
    );
    // Each car's state follows its rows within the persistence worker's next pass (a second).
    let car2 = || async {
        get_json(&format!("{base}/v1/vehicles"))
            .await
            .as_array()
            .into_iter()
            .flatten()
            .find(|v| v["vin"] == test_vin(2).as_str())
            .cloned()
    };
    wait_for(
        "the fleet list has car 2's newest reading",
        WAIT,
        || async {
            car2()
                .await
                .is_some_and(|car| car["latest"]["battery"] == 71.0)
        },
    )
    .await
    .unwrap();
    let vehicles = get_json(&format!("{base}/v1/vehicles")).await;
    assert_eq!(vehicles.as_array().unwrap().len(), 6);
    let car2 = car2().await.unwrap();
    assert!(car2["last_seen"].is_string(), "{car2}");
    assert_eq!(car2["open_anomalies"], serde_json::json!([]));
    // Pages of 4, linked (RFC 8288): the second holds the rest and links nothing.
    let first = reqwest::get(format!("{base}/v1/vehicles?limit=4"))
        .await
        .unwrap();
    let link = first.headers()["link"].to_str().unwrap().to_owned();
    let page: Vec<Value> = first.json().await.unwrap();
    assert_eq!(page.len(), 4);
    let last_vin = page[3]["vin"].as_str().unwrap();
    assert_eq!(
        link,
        format!("</v1/vehicles?limit=4&after={last_vin}>; rel=\"next\"")
    );
    let next = link[1..link.find('>').unwrap()].to_owned();
    let second = reqwest::get(format!("{base}{next}")).await.unwrap();
    assert!(second.headers().get("link").is_none());
    let rest: Vec<Value> = second.json().await.unwrap();
    assert_eq!(rest.len(), 2);
    assert!(rest.iter().all(|v| v["vin"].as_str().unwrap() > last_vin));
    for (query, needle) in [
        ("limit=0", "limit must be"),
        ("after=NOPE", "after must be a VIN"),
        ("anomaly=maybe", "anomaly must be true or false"),
        ("online=yes", "online must be true or false"),
        ("since=1", "unknown parameter"),
    ] {
        let answer = reqwest::get(format!("{base}/v1/vehicles?{query}"))
            .await
            .unwrap();
        assert_eq!(answer.status(), 400, "{query}");
        let error = answer.json::<Value>().await.unwrap()["error"].to_string();
        assert!(error.contains(needle), "{query}: {error}");
    }
    let bad = reqwest::get(format!("{base}/v1/vehicles/NOPE/telemetry"))
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert!(bad.json::<Value>().await.unwrap()["error"]
        .as_str()
        .unwrap()
        .contains("17 characters"));
    pipeline.shutdown().await.unwrap();
}

#[tokio::test]
async fn mosquitto_pub_on_postgres_valid_malformed_and_legacy_topic() {
    let pg = PgServer::start().unwrap();
    let pipeline = Pipeline::start(PipelineOptions::new(pg.url()))
        .await
        .unwrap();
    let vin = "1HGCM82633A004352";

    let started = std::time::Instant::now();
    let out = mosquitto_pub(
        pipeline.mqtt_addr,
        &[
            "-q",
            "1",
            "-t",
            &format!("vehicles/{vin}/telemetry"),
            "-m",
            &format!(r#"{{"vin":"{vin}","battery":80.5}}"#),
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let url = format!("{}/v1/vehicles/{vin}/telemetry", pipeline.http_base());
    wait_for("the reading in the API", Duration::from_secs(2), || async {
        get_json(&url)
            .await
            .as_array()
            .is_some_and(|a| a.len() == 1)
    })
    .await
    .unwrap();
    println!("mosquitto_pub to API row: {:?}", started.elapsed());
    assert_eq!(get_json(&url).await[0]["battery"], 80.5);

    let out = mosquitto_pub(
        pipeline.mqtt_addr,
        &[
            "-q",
            "1",
            "-t",
            &format!("vehicles/{vin}/telemetry"),
            "-m",
            "{oops",
        ],
    )
    .await;
    assert!(out.status.success());
    // eCars' own message shape on its legacy topic, coordinates as strings.
    let legacy = r#"{"vin":"5YJ3E1EA7KF000001","name":"Car 1","profile":"long","range":"230","mpge":"116",
        "battery":"77.5","malfunction":false,"speed":"61","latitude":"37.79","longitude":"-122.40",
        "date":"2024-05-01T10:00:00.000Z"}"#;
    let out = mosquitto_pub(
        pipeline.mqtt_addr,
        &["-V", "mqttv5", "-q", "1", "-t", "ecars/data", "-m", legacy],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dl_url = format!("{}/v1/dead-letters", pipeline.http_base());
    wait_for("the dead letter", WAIT, || async {
        get_json(&dl_url)
            .await
            .as_array()
            .is_some_and(|a| a.len() == 1)
    })
    .await
    .unwrap();
    let letter = &get_json(&dl_url).await[0];
    assert!(
        letter["reason"].as_str().unwrap().starts_with("not_json: "),
        "{letter}"
    );
    assert_eq!(letter["payload"], "{oops");
    assert_eq!(letter["topic"], format!("vehicles/{vin}/telemetry"));
    wait_for("the legacy reading", WAIT, || async {
        count(&pipeline).await == 2
    })
    .await
    .unwrap();
    let legacy_rows = pipeline
        .db
        .sensor_rows()
        .of_vehicle(&Vin::parse("5YJ3E1EA7KF000001").unwrap(), 1)
        .await
        .unwrap();
    assert_eq!(legacy_rows[0].battery, Some(77.5));
    assert_eq!(
        legacy_rows[0].date.to_rfc3339(),
        "2024-05-01T10:00:00+00:00"
    );

    // A broken clock: a reading dated in 9999 is dead-lettered (it would stand as the car's
    // latest forever); the car's next reading is stored as usual.
    for payload in [
        format!(r#"{{"vin":"{vin}","battery":70,"date":"9999-12-31T00:00:00Z"}}"#),
        format!(r#"{{"vin":"{vin}","battery":69}}"#),
    ] {
        let topic = format!("vehicles/{vin}/telemetry");
        let out = mosquitto_pub(
            pipeline.mqtt_addr,
            &["-q", "1", "-t", &topic, "-m", &payload],
        )
        .await;
        assert!(out.status.success());
    }
    wait_for("the future-dated reading dead-lettered", WAIT, || async {
        get_json(&dl_url).await.as_array().is_some_and(|letters| {
            letters.iter().any(|l| {
                l["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("date_in_future: "))
                    && l["payload"].as_str().is_some_and(|p| p.contains("9999"))
            })
        })
    })
    .await
    .unwrap();
    wait_for("the next reading", WAIT, || async {
        count(&pipeline).await == 3
    })
    .await
    .unwrap();
    let newest = &get_json(&url).await[0];
    assert_eq!(newest["battery"], 69.0, "{newest}");
    pipeline.shutdown().await.unwrap();
}

#[tokio::test]
async fn mqtt_over_websocket() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = Pipeline::start(PipelineOptions::new(sqlite_url(&dir)))
        .await
        .unwrap();
    let url = format!("ws://127.0.0.1:{}/mqtt", pipeline.ws_addr.port());
    let mut options = MqttOptions::new("ws-client", url, pipeline.ws_addr.port());
    options
        .set_transport(Transport::Ws)
        .set_keep_alive(Duration::from_secs(30));
    // Room for every request: the event loop is only polled after publishing.
    let (client, mut eventloop) = AsyncClient::new(options, 32);
    let vin = test_vin(7);
    for i in 0..25 {
        client
            .publish(
                format!("vehicles/{vin}/telemetry"),
                QoS::AtLeastOnce,
                false,
                reading_json(&vin, f64::from(i)),
            )
            .await
            .unwrap();
    }
    let mut acked = 0;
    while acked < 25 {
        if let Event::Incoming(Packet::PubAck(_)) = tokio::time::timeout(WAIT, eventloop.poll())
            .await
            .unwrap()
            .unwrap()
        {
            acked += 1;
        }
    }
    wait_for("25 rows", WAIT, || async { count(&pipeline).await == 25 })
        .await
        .unwrap();
    pipeline.shutdown().await.unwrap();
}

#[tokio::test]
async fn device_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let secret_text = "a-fleet-secret-of-some-length";
    let mut options = PipelineOptions::new(sqlite_url(&dir));
    options.device_secret = Some(secret_text.into());
    let pipeline = Pipeline::start(options).await.unwrap();
    let secret = DeviceSecret::new(secret_text);
    let vin = Vin::parse(&test_vin(1)).unwrap();
    let other = test_vin(2);
    let password = secret.password_for(&vin);

    // Wrong password: refused at CONNECT, with a CONNACK that says so.
    let mut opts = MqttOptions::new("bad", "127.0.0.1", pipeline.mqtt_addr.port());
    opts.set_credentials(vin.as_str(), "00ff");
    let (_client, mut eventloop) = AsyncClient::new(opts, 4);
    match tokio::time::timeout(WAIT, eventloop.poll()).await.unwrap() {
        Err(rumqttc::ConnectionError::ConnectionRefused(code)) => {
            assert_eq!(code, rumqttc::ConnectReturnCode::BadUserNamePassword)
        }
        other => panic!("expected a refused connection, got {other:?}"),
    }
    // No credentials at all, with Debian's client.
    let out = mosquitto_pub(pipeline.mqtt_addr, &["-t", "ecars/data", "-m", "{}"]).await;
    assert!(!out.status.success(), "anonymous publish must be refused");
    let out = mosquitto_pub(
        pipeline.mqtt_addr,
        &[
            "-u",
            vin.as_str(),
            "-P",
            "wrong",
            "-t",
            "ecars/data",
            "-m",
            "{}",
        ],
    )
    .await;
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .to_lowercase()
            .contains("password"),
        "{out:?}"
    );

    // Right credentials: its own reading is stored; a reading for another car is dead-lettered.
    let creds = Some((vin.to_string(), password.clone()));
    let client_id = format!("{vin}-1");
    publish_v4(
        pipeline.mqtt_addr,
        &client_id,
        creds,
        vec![
            (
                format!("vehicles/{vin}/telemetry"),
                reading_json(vin.as_str(), 60.0),
            ),
            (
                format!("vehicles/{other}/telemetry"),
                reading_json(&other, 60.0),
            ),
            ("ecars/data".into(), reading_json(&other, 61.0)),
        ],
    )
    .await
    .unwrap();
    let out = mosquitto_pub(
        pipeline.mqtt_addr,
        &[
            "-i",
            vin.as_str(),
            "-u",
            vin.as_str(),
            "-P",
            &password,
            "-q",
            "1",
            "-t",
            "ecars/data",
            "-m",
            &reading_json(vin.as_str(), 59.0),
        ],
    )
    .await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    wait_for("two dead letters", WAIT, || async {
        pipeline
            .db
            .dead_letter_rows()
            .newest(10)
            .await
            .map(|d| d.len())
            .unwrap_or(0)
            == 2
    })
    .await
    .unwrap();
    wait_for("two own readings", WAIT, || async {
        count(&pipeline).await == 2
    })
    .await
    .unwrap();
    for letter in pipeline.db.dead_letter_rows().newest(10).await.unwrap() {
        assert!(
            letter
                .reason
                .starts_with("unauthorized_vin: client authenticated as"),
            "{}",
            letter.reason
        );
        assert_eq!(letter.client_id, client_id);
    }
    let metrics = pipeline.metrics().await.unwrap();
    assert!(
        metrics.contains(r#"ecars_readings_rejected_total{reason="unauthorized_vin"}"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"ecars_mqtt_connections_refused_total{reason="wrong_password"}"#));
    pipeline.shutdown().await.unwrap();
}

#[tokio::test]
async fn subscribers_see_valid_telemetry_and_other_topics_pass_through() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = Pipeline::start(PipelineOptions::new(sqlite_url(&dir)))
        .await
        .unwrap();
    let mut options = MqttOptions::new("listener", "127.0.0.1", pipeline.mqtt_addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (subscriber, mut events) = AsyncClient::new(options, 16);
    subscriber
        .subscribe("vehicles/+/telemetry", QoS::AtLeastOnce)
        .await
        .unwrap();
    subscriber
        .subscribe("fleet/notices", QoS::AtLeastOnce)
        .await
        .unwrap();
    loop {
        if let Event::Incoming(Packet::SubAck(ack)) = tokio::time::timeout(WAIT, events.poll())
            .await
            .unwrap()
            .unwrap()
        {
            if ack.pkid == 2 {
                break;
            }
        }
    }
    let vin = test_vin(3);
    let topic = format!("vehicles/{vin}/telemetry");
    publish_v4(
        pipeline.mqtt_addr,
        "publisher",
        None,
        vec![
            (topic.clone(), r#"{"battery":101}"#.into()),
            (topic.clone(), reading_json(&vin, 64.0)),
            ("fleet/notices".into(), "hello".into()),
        ],
    )
    .await
    .unwrap();
    let mut received = Vec::new();
    while received.len() < 2 {
        if let Event::Incoming(Packet::Publish(p)) = tokio::time::timeout(WAIT, events.poll())
            .await
            .unwrap()
            .unwrap()
        {
            received.push((
                p.topic.clone(),
                String::from_utf8_lossy(&p.payload).to_string(),
            ));
        }
    }
    // Telemetry reaches subscribers through the gateway's fan-out link, other topics through the
    // publisher's own broker connection: MQTT orders messages per topic, not across topics.
    received.sort();
    assert_eq!(
        received[0],
        ("fleet/notices".to_owned(), "hello".to_owned())
    );
    assert_eq!(received[1].0, topic);
    assert!(
        received[1].1.contains("64"),
        "the rejected reading (battery 101) is not relayed: {received:?}"
    );

    // A retained reading stays retained: a later subscriber gets it at once.
    let retained = mosquitto_pub(
        pipeline.mqtt_addr,
        &[
            "-q",
            "1",
            "-r",
            "-t",
            &topic,
            "-m",
            &reading_json(&vin, 63.0),
        ],
    )
    .await;
    assert!(retained.status.success(), "{retained:?}");
    let mut options = MqttOptions::new("late-listener", "127.0.0.1", pipeline.mqtt_addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (late, mut late_events) = AsyncClient::new(options, 16);
    late.subscribe(topic.as_str(), QoS::AtLeastOnce)
        .await
        .unwrap();
    let publish = loop {
        if let Event::Incoming(Packet::Publish(p)) = tokio::time::timeout(WAIT, late_events.poll())
            .await
            .expect("the retained reading reaches a new subscriber")
            .unwrap()
        {
            break p;
        }
    };
    assert!(publish.retain, "delivered as a retained message");
    assert!(String::from_utf8_lossy(&publish.payload).contains("63"));
    pipeline.shutdown().await.unwrap();
}

/// MQTT 3.1.1 packets by hand, for what client libraries never do on purpose.
fn raw_packet(first_byte: u8, body: &[u8]) -> Vec<u8> {
    assert!(body.len() < 128, "one-byte remaining length");
    let mut packet = vec![first_byte, body.len() as u8];
    packet.extend_from_slice(body);
    packet
}

fn mqtt_string(text: &str) -> Vec<u8> {
    let mut out = (text.len() as u16).to_be_bytes().to_vec();
    out.extend_from_slice(text.as_bytes());
    out
}

#[tokio::test]
async fn a_packet_split_across_reads_does_not_hold_back_earlier_acknowledgements() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = tempfile::tempdir().unwrap();
    let pipeline = Pipeline::start(PipelineOptions::new(sqlite_url(&dir)))
        .await
        .unwrap();
    let mut socket = tokio::net::TcpStream::connect(pipeline.mqtt_addr)
        .await
        .unwrap();

    let mut connect = mqtt_string("MQTT");
    connect.extend_from_slice(&[4, 0x02, 0, 60]);
    connect.extend(mqtt_string("raw-client"));
    socket.write_all(&raw_packet(0x10, &connect)).await.unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(WAIT, socket.read_exact(&mut connack))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);

    let vin = test_vin(5);
    let publish = |pkid: u16| {
        let mut body = mqtt_string(&format!("vehicles/{vin}/telemetry"));
        body.extend_from_slice(&pkid.to_be_bytes());
        body.extend_from_slice(br#"{"battery":42}"#);
        raw_packet(0x32, &body)
    };
    // A whole PUBLISH, then half of the next one: like a client whose window is full, send
    // nothing more until the first is acknowledged.
    let mut bytes = publish(1);
    let second = publish(2);
    bytes.extend_from_slice(&second[..second.len() / 2]);
    socket.write_all(&bytes).await.unwrap();
    let mut puback = [0u8; 4];
    tokio::time::timeout(Duration::from_secs(5), socket.read_exact(&mut puback))
        .await
        .expect("PUBACK of the whole packet arrives while the next is incomplete")
        .unwrap();
    assert_eq!(puback, [0x40, 2, 0, 1]);
    socket.write_all(&second[second.len() / 2..]).await.unwrap();
    tokio::time::timeout(WAIT, socket.read_exact(&mut puback))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(puback, [0x40, 2, 0, 2]);
    wait_for("both rows", WAIT, || async { count(&pipeline).await == 2 })
        .await
        .unwrap();
    pipeline.shutdown().await.unwrap();
}

/// Reads one MQTT 3.1.1 packet of at most 127 bytes.
async fn read_small_packet(socket: &mut tokio::net::TcpStream) -> Vec<u8> {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 2];
    tokio::time::timeout(WAIT, socket.read_exact(&mut head))
        .await
        .expect("a packet arrives")
        .unwrap();
    let mut body = vec![0u8; usize::from(head[1])];
    tokio::time::timeout(WAIT, socket.read_exact(&mut body))
        .await
        .unwrap()
        .unwrap();
    [head.to_vec(), body].concat()
}

#[tokio::test]
async fn qos2_telemetry_completes_at_the_gateway_even_across_a_reconnect() {
    use tokio::io::AsyncWriteExt;
    let dir = tempfile::tempdir().unwrap();
    let pipeline = Pipeline::start(PipelineOptions::new(sqlite_url(&dir)))
        .await
        .unwrap();
    let vin = test_vin(8);
    let topic = format!("vehicles/{vin}/telemetry");
    let mut options = MqttOptions::new("qos2-listener", "127.0.0.1", pipeline.mqtt_addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    let (subscriber, mut events) = AsyncClient::new(options, 16);
    subscriber
        .subscribe(topic.as_str(), QoS::ExactlyOnce)
        .await
        .unwrap();
    while !matches!(
        tokio::time::timeout(WAIT, events.poll())
            .await
            .unwrap()
            .unwrap(),
        Event::Incoming(Packet::SubAck(_))
    ) {}

    // A car with a persistent session (clean session flag 0).
    let connect = || {
        let mut body = mqtt_string("MQTT");
        body.extend_from_slice(&[4, 0x00, 0, 60]);
        body.extend(mqtt_string("qos2-car"));
        raw_packet(0x10, &body)
    };
    let publish = |first_byte: u8, pkid: u16, battery: f64| {
        let mut body = mqtt_string(&topic);
        body.extend_from_slice(&pkid.to_be_bytes());
        body.extend_from_slice(reading_json(&vin, battery).as_bytes());
        let mut packet = vec![first_byte];
        let mut len = body.len();
        loop {
            let byte = (len % 128) as u8;
            len /= 128;
            packet.push(if len > 0 { byte | 0x80 } else { byte });
            if len == 0 {
                break;
            }
        }
        packet.extend(body);
        packet
    };
    let mut socket = tokio::net::TcpStream::connect(pipeline.mqtt_addr)
        .await
        .unwrap();
    socket.write_all(&connect()).await.unwrap();
    assert_eq!(read_small_packet(&mut socket).await[..2], [0x20, 2]);
    socket.write_all(&publish(0x34, 7, 55.0)).await.unwrap();
    assert_eq!(
        read_small_packet(&mut socket).await,
        [0x50, 2, 0, 7],
        "PUBREC once the reading is accepted"
    );
    // The connection drops before the car sends PUBREL.
    drop(socket);

    let mut socket = tokio::net::TcpStream::connect(pipeline.mqtt_addr)
        .await
        .unwrap();
    socket.write_all(&connect()).await.unwrap();
    let connack = read_small_packet(&mut socket).await;
    assert_eq!((connack[0], connack[3]), (0x20, 0), "{connack:?}");
    socket.write_all(&[0x62, 2, 0, 7]).await.unwrap();
    assert_eq!(
        read_small_packet(&mut socket).await,
        [0x70, 2, 0, 7],
        "the gateway completes the exchange the broker never saw"
    );
    // The connection is still good: the next reading is acknowledged.
    socket.write_all(&publish(0x32, 8, 54.0)).await.unwrap();
    assert_eq!(read_small_packet(&mut socket).await, [0x40, 2, 0, 8]);

    let mut batteries = Vec::new();
    while batteries.len() < 2 {
        if let Event::Incoming(Packet::Publish(p)) = tokio::time::timeout(WAIT, events.poll())
            .await
            .unwrap()
            .unwrap()
        {
            let reading: Value = serde_json::from_slice(&p.payload).unwrap();
            batteries.push(reading["battery"].as_f64().unwrap());
        }
    }
    assert_eq!(
        batteries,
        [55.0, 54.0],
        "subscribers get both readings, in order"
    );
    wait_for("both rows", WAIT, || async { count(&pipeline).await == 2 })
        .await
        .unwrap();
    pipeline.shutdown().await.unwrap();
}
