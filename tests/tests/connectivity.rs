//! Connectivity events through `ecars up`'s composition: each way a car's connection ends gives
//! its reason, the fleet list shows who is online, and a car that reconnects through a second
//! ingest node before the first notices ends up online.

use ecars_e2e::mqtt_wire::{packet, put_string};
use std::time::Duration;

use ecars_e2e::{loopback_ingest, test_vin, wait_for, Pipeline, PipelineOptions};
use ecars_model::{Connectivity, ConnectivityEvent, DisconnectReason};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

/// A car connected over raw MQTT 3.1.1 (client id = VIN), its CONNACK read.
async fn connect(addr: std::net::SocketAddr, vin: &str, keep_alive: u16) -> TcpStream {
    let mut socket = TcpStream::connect(addr).await.unwrap();
    let mut body = Vec::new();
    put_string(&mut body, "MQTT");
    body.extend_from_slice(&[4, 0x02]);
    body.extend_from_slice(&keep_alive.to_be_bytes());
    put_string(&mut body, vin);
    socket.write_all(&packet(0x10, &body)).await.unwrap();
    let mut connack = [0u8; 4];
    tokio::time::timeout(WAIT, socket.read_exact(&mut connack))
        .await
        .expect("a CONNACK")
        .unwrap();
    assert_eq!(connack, [0x20, 2, 0, 0]);
    socket
}

/// Sends DISCONNECT and waits for the close.
async fn car_says_goodbye(mut socket: TcpStream) {
    socket.write_all(&[0xE0, 0x00]).await.unwrap();
    closed(socket).await;
}

/// Waits until the server closes `socket`.
async fn closed(mut socket: TcpStream) {
    let mut buf = [0u8; 64];
    tokio::time::timeout(WAIT, async {
        while socket.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    })
    .await
    .expect("the server closes the connection");
}

/// Collects connectivity events until `done` holds for them.
async fn events_until(
    tail: &mut ecars_bus::Subscription<ConnectivityEvent>,
    seen: &mut Vec<ConnectivityEvent>,
    what: &str,
    done: impl Fn(&[ConnectivityEvent]) -> bool,
) {
    tokio::time::timeout(WAIT, async {
        while !done(seen) {
            let delivery = tail.next().await.unwrap().expect("the stream goes on");
            seen.push(delivery.record);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("{what}: events so far {seen:#?}"));
}

fn disconnected(seen: &[ConnectivityEvent], vin: &str) -> Option<DisconnectReason> {
    seen.iter()
        .find(|e| e.vin.as_str() == vin && e.state == Connectivity::Disconnected)
        .and_then(|e| e.reason)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_end_of_a_connection_gives_its_reason_and_the_newest_session_decides() {
    let dir = tempfile::tempdir().unwrap();
    let mut options = PipelineOptions::new(format!(
        "sqlite://{}",
        dir.path().join("ecars.db").display()
    ));
    options.ingest.node_id = Some("ingest-a".into());
    let pipeline = Pipeline::start(options).await.unwrap();
    let mut tail = pipeline
        .bus
        .tail::<ConnectivityEvent>("connectivity-test")
        .await
        .unwrap();
    let mut seen = Vec::new();
    let addr = pipeline.mqtt_addr;
    let (clean, silent, dropped, taken) = (test_vin(1), test_vin(2), test_vin(3), test_vin(4));

    // A clean end: mosquitto_pub publishes and says DISCONNECT.
    let out = tokio::process::Command::new("mosquitto_pub")
        .args(["-h", "127.0.0.1", "-p", &addr.port().to_string()])
        .args([
            "-i",
            &clean,
            "-q",
            "1",
            "-t",
            &format!("vehicles/{clean}/telemetry"),
        ])
        .args(["-m", r#"{"battery":50}"#])
        .output()
        .await
        .unwrap();
    assert!(out.status.success());
    // Silent for 1.5 keep-alives.
    let silent_socket = connect(addr, &silent, 1).await;
    // The socket closes without DISCONNECT.
    let dropped_socket = connect(addr, &dropped, 60).await;
    drop(dropped_socket);
    // The same client id again: the first connection is taken over.
    let first = connect(addr, &taken, 60).await;
    let _second = connect(addr, &taken, 60).await;
    closed(first).await;
    closed(silent_socket).await;
    events_until(&mut tail, &mut seen, "the four ends", |seen| {
        [&clean, &silent, &dropped, &taken]
            .iter()
            .all(|vin| disconnected(seen, vin).is_some())
    })
    .await;
    assert_eq!(
        disconnected(&seen, &clean),
        Some(DisconnectReason::ClientDisconnect)
    );
    assert_eq!(
        disconnected(&seen, &silent),
        Some(DisconnectReason::KeepAliveTimeout)
    );
    assert_eq!(
        disconnected(&seen, &dropped),
        Some(DisconnectReason::ConnectionError)
    );
    assert_eq!(
        disconnected(&seen, &taken),
        Some(DisconnectReason::TakenOver)
    );
    for event in &seen {
        assert_eq!(event.node, "ingest-a");
        assert_eq!(event.client_id, event.vin.as_str());
    }
    // Each connection is a session: its connected and disconnected carry one id, and the
    // takeover's new session sorts after the old.
    events_until(
        &mut tail,
        &mut seen,
        "both connections of the taken-over car",
        |seen| {
            seen.iter()
                .filter(|e| e.vin.as_str() == taken && e.state == Connectivity::Connected)
                .count()
                == 2
        },
    )
    .await;
    let sessions = |vin: &str, state| {
        seen.iter()
            .filter(|e| e.vin.as_str() == vin && e.state == state)
            .map(|e| e.session_id)
            .collect::<Vec<_>>()
    };
    let taken_connected = sessions(&taken, Connectivity::Connected);
    let taken_ended = sessions(&taken, Connectivity::Disconnected);
    assert_eq!(taken_ended.len(), 1);
    let old = taken_ended[0];
    assert!(taken_connected.contains(&old));
    let new = taken_connected.iter().copied().max().unwrap();
    assert!(new > old, "the newer connection's session sorts after");

    // The fleet list: the taken-over car is online (its newer session), the others offline
    // with their reasons.
    let url = format!("{}/v1/vehicles", pipeline.http_base());
    let fleet = |url: String| async move {
        reqwest::get(url)
            .await
            .unwrap()
            .json::<Vec<Value>>()
            .await
            .unwrap()
    };
    let find = |fleet: &[Value], vin: &str| fleet.iter().find(|v| v["vin"] == vin).cloned();
    wait_for("the fleet list's connectivity", WAIT, || async {
        let fleet = fleet(url.clone()).await;
        find(&fleet, &taken).is_some_and(|v| v["online"] == true)
            && find(&fleet, &dropped).is_some_and(|v| v["online"] == false)
            && find(&fleet, &silent).is_some_and(|v| v["online"] == false)
            && find(&fleet, &clean).is_some_and(|v| v["online"] == false)
            // (Its reading comes with the rollup pass, up to a second after its row.)
            && find(&fleet, &clean).is_some_and(|v| v["latest"]["battery"] == 50.0)
    })
    .await
    .unwrap();
    let list = fleet(url.clone()).await;
    let silent_row = find(&list, &silent).unwrap();
    assert_eq!(silent_row["connectivity"]["reason"], "keep_alive_timeout");
    assert!(
        silent_row["latest"].is_null(),
        "connected, never sent a reading"
    );
    assert_eq!(find(&list, &clean).unwrap()["latest"]["battery"], 50.0);
    let online: Vec<Value> = fleet(format!("{url}?online=true")).await;
    assert_eq!(online.len(), 1);
    assert_eq!(online[0]["vin"], taken.as_str());
    assert_eq!(
        online[0]["connectivity"]["session_id"],
        new.to_string().as_str()
    );

    // A live socket that asked for connectivity changes sees a car come and go (tagged
    // frames; the car's readings would come as before).
    let watched = test_vin(6);
    let (mut live, _) = tokio_tungstenite::connect_async(format!(
        "ws://{}/v1/vehicles/{watched}/live?connectivity=true",
        pipeline.http_addr
    ))
    .await
    .unwrap();
    let mut frames = Vec::new();
    let car = connect(addr, &watched, 60).await;
    car_says_goodbye(car).await;
    tokio::time::timeout(WAIT, async {
        use futures_util::StreamExt;
        while frames.len() < 2 {
            let message = live.next().await.unwrap().unwrap();
            if let Ok(text) = message.to_text() {
                if let Ok(frame) = serde_json::from_str::<Value>(text) {
                    frames.push(frame);
                }
            }
        }
    })
    .await
    .expect("two connectivity frames");
    // The connected one is told in the background: the two may come in either order.
    frames.sort_by_key(|f| f["online"] == false);
    assert_eq!(frames[0]["type"], "connectivity");
    assert_eq!(frames[0]["online"], true);
    assert_eq!(frames[1]["online"], false);
    assert_eq!(frames[1]["reason"], "client_disconnect");
    assert_eq!(frames[0]["session_id"], frames[1]["session_id"]);

    // A second ingest node on the same bus. The car drops off node A and reconnects through
    // node B before A notices: A's late `disconnected` must not take it offline.
    let mut b_config = loopback_ingest();
    b_config.node_id = Some("ingest-b".into());
    let node_b = ecars_ingest::BoundIngest::bind(&b_config, pipeline.bus.clone(), None)
        .await
        .unwrap();
    let b_addr = node_b.mqtt_addr().unwrap();
    let stop_b = CancellationToken::new();
    let node_b = tokio::spawn(node_b.run(stop_b.clone()));
    let roamer = test_vin(5);
    let roamer_url = format!("{url}?after={}&limit=1", test_vin(4));
    assert!(
        test_vin(5) < test_vin(6),
        "the roaming car's page holds it alone"
    );
    let roamer_through = |node: &'static str| {
        let url = roamer_url.clone();
        let roamer = roamer.clone();
        move || {
            let url = url.clone();
            let roamer = roamer.clone();
            async move {
                let page = fleet(url).await;
                page.first().is_some_and(|v| {
                    v["vin"] == roamer.as_str()
                        && v["online"] == true
                        && v["connectivity"]["node"] == node
                })
            }
        }
    };
    let on_a = connect(addr, &roamer, 60).await;
    wait_for(
        "the car online through node A",
        WAIT,
        roamer_through("ingest-a"),
    )
    .await
    .unwrap();
    let on_b = connect(b_addr, &roamer, 60).await;
    wait_for(
        "the car online through node B",
        WAIT,
        roamer_through("ingest-b"),
    )
    .await
    .unwrap();
    // Now A notices the old connection's end: its event arrives last.
    let metric = "ecars_connectivity_events_total{state=\"disconnected\"} ";
    let disconnections = || async {
        let metrics = pipeline.metrics().await.unwrap();
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(metric))
            .map_or(0, |n| n.trim().parse::<u64>().unwrap())
    };
    // Five connections ended so far (clean, silent, dropped, taken over, watched), each
    // counted once committed.
    let before = 5;
    wait_for("the earlier ends committed", WAIT, || async {
        disconnections().await == before
    })
    .await
    .unwrap();
    drop(on_a);
    events_until(
        &mut tail,
        &mut seen,
        "A noticing the old connection's end",
        |seen| disconnected(seen, &roamer).is_some(),
    )
    .await;
    let ended = seen
        .iter()
        .find(|e| e.vin.as_str() == roamer && e.state == Connectivity::Disconnected)
        .unwrap();
    assert_eq!(ended.node, "ingest-a");
    // Published means committed by the persist worker (the in-process bus waits for it).
    wait_for("A's late event committed", WAIT, || async {
        disconnections().await == before + 1
    })
    .await
    .unwrap();
    let page = fleet(roamer_url.clone()).await;
    assert_eq!(
        page[0]["online"], true,
        "the newest session decides: {page:?}"
    );
    assert_eq!(page[0]["connectivity"]["node"], "ingest-b");
    drop(on_b);
    stop_b.cancel();
    node_b.await.unwrap();
    pipeline.shutdown().await.unwrap();
}
