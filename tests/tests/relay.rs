//! The live relay over real WebSockets (tokio-tungstenite clients), in the composition `ecars
//! up` runs: routing by VIN, the backlog on connect, a slow client cut off, token checks and
//! minting, and the Origin allow-list.

use std::sync::Arc;
use std::time::Duration;

use chrono::{TimeDelta, Utc};
use ecars_bus::Bus;
use ecars_db::Database;
use ecars_e2e::{Pipeline, PipelineOptions};
use ecars_model::relay_token::{RelayClaims, TokenAuthority};
use ecars_model::{TelemetryReading, Vin};
use ecars_relay::{Relay, RelayConfig, CLOSE_POLICY, CLOSE_TOO_SLOW};
use ecars_runtime::settings::ConfigError;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const SECRET: &str = "relay-secret-of-at-least-32-bytes!!";

fn reading(vin: &Vin, seconds: i64) -> TelemetryReading {
    let date = Utc::now() + TimeDelta::seconds(seconds);
    TelemetryReading {
        event_id: uuid::Uuid::now_v7(),
        received_at: date,
        vin: vin.clone(),
        name: Some("Live car".into()),
        profile: None,
        range: None,
        mpge: None,
        battery: Some(50.0 + seconds as f64 / 100.0),
        malfunction: Some(false),
        speed: Some(20.0),
        latitude: None,
        longitude: None,
        date,
    }
}

fn vin(n: u32) -> Vin {
    Vin::parse(&ecars_e2e::test_vin(n)).unwrap()
}

struct Server {
    base: String,
    bus: Bus,
    store: ecars_db::SensorRows,
    relay: Arc<Relay>,
    pipeline: Pipeline,
    _dir: tempfile::TempDir,
}

impl Server {
    async fn stop(self) {
        self.pipeline.shutdown().await.unwrap();
    }
}

async fn server(config: RelayConfig) -> Server {
    let dir = tempfile::tempdir().unwrap();
    let mut options =
        PipelineOptions::new(format!("sqlite://{}", dir.path().join("r.db").display()));
    options.bus_capacity = 100_000;
    options.relay = config;
    let pipeline = Pipeline::start(options).await.unwrap();
    let db: &Database = &pipeline.db;
    Server {
        base: format!("ws://{}", pipeline.http_addr),
        bus: pipeline.bus.clone(),
        store: db.sensor_rows(),
        relay: Arc::clone(&pipeline.relay),
        pipeline,
        _dir: dir,
    }
}

type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn connect(
    url: &str,
    headers: &[(&str, &str)],
) -> Result<Socket, tokio_tungstenite::tungstenite::Error> {
    let mut request = url.into_client_request().unwrap();
    for (k, v) in headers {
        let name =
            tokio_tungstenite::tungstenite::http::HeaderName::from_bytes(k.as_bytes()).unwrap();
        request.headers_mut().insert(name, v.parse().unwrap());
    }
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(s, _)| s)
}

/// The next reading frame (pings are answered by the client library).
async fn next_reading(socket: &mut Socket) -> TelemetryReading {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a frame within 10 s")
            .expect("the socket is open")
            .unwrap();
        if let Message::Text(text) = message {
            return serde_json::from_str(text.as_str()).unwrap();
        }
    }
}

/// Reads until the server closes; returns the close code.
async fn close_code(socket: &mut Socket) -> Option<CloseCode> {
    loop {
        match tokio::time::timeout(Duration::from_secs(30), socket.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| f.code),
            Ok(Some(Ok(_))) => continue,
            _ => return None,
        }
    }
}

#[tokio::test]
async fn a_socket_gets_its_cars_backlog_then_its_live_readings_only() {
    let s = server(RelayConfig::default()).await;
    let (a, b) = (vin(1), vin(2));
    let history: Vec<_> = (-30..0).map(|i| reading(&a, i)).collect();
    s.store.insert(&history).await.unwrap();
    let mut socket = connect(&format!("{}/v1/vehicles/{a}/live", s.base), &[])
        .await
        .unwrap();
    // The newest 20, oldest first.
    for expected in &history[10..] {
        assert_eq!(next_reading(&mut socket).await.event_id, expected.event_id);
    }
    let other = reading(&b, 1);
    let own = reading(&a, 2);
    s.bus.publish(other).await.unwrap();
    s.bus.publish(own.clone()).await.unwrap();
    let live = next_reading(&mut socket).await;
    assert_eq!(
        live.event_id, own.event_id,
        "the other car's reading never arrives"
    );

    // A fleet socket filtered to B sees B only; an unfiltered one sees both.
    let mut only_b = connect(&format!("{}/v1/live?vin={b}", s.base), &[])
        .await
        .unwrap();
    let mut fleet = connect(&format!("{}/v1/live", s.base), &[]).await.unwrap();
    ecars_e2e::wait_for("three clients", Duration::from_secs(5), || async {
        s.relay.hub().clients() == 3
    })
    .await
    .unwrap();
    let (ra, rb) = (reading(&a, 3), reading(&b, 4));
    s.bus.publish(ra.clone()).await.unwrap();
    s.bus.publish(rb.clone()).await.unwrap();
    assert_eq!(next_reading(&mut only_b).await.vin, b);
    assert_eq!(next_reading(&mut fleet).await.event_id, ra.event_id);
    assert_eq!(next_reading(&mut fleet).await.event_id, rb.event_id);
    assert_eq!(next_reading(&mut socket).await.event_id, ra.event_id);
    s.stop().await;
}

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_as_too_slow_and_others_carry_on() {
    let s = server(RelayConfig {
        client_queue: 256,
        ..RelayConfig::default()
    })
    .await;
    let car = vin(3);
    let mut stalled = connect(&format!("{}/v1/vehicles/{car}/live", s.base), &[])
        .await
        .unwrap();
    let mut reader = connect(&format!("{}/v1/vehicles/{car}/live", s.base), &[])
        .await
        .unwrap();
    ecars_e2e::wait_for("two clients", Duration::from_secs(5), || async {
        s.relay.hub().clients() == 2
    })
    .await
    .unwrap();
    let received = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let total = 20_000u32;
    let reading_task = {
        let received = Arc::clone(&received);
        tokio::spawn(async move {
            while let Some(Ok(message)) = reader.next().await {
                if matches!(message, Message::Text(_))
                    && received.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1 == total
                {
                    break;
                }
            }
        })
    };
    // Far more than the socket buffers hold, paced by the reading client (never more than 128
    // ahead of it), so only the stalled client's queue fills. A publish returns once the
    // database committed it (a batch window): 128 go at once, not one per window.
    for start in (0..total).step_by(128) {
        let received = &received;
        ecars_e2e::wait_for(
            "the reader to catch up",
            Duration::from_secs(10),
            || async move { received.load(std::sync::atomic::Ordering::SeqCst) + 128 >= start },
        )
        .await
        .unwrap();
        let chunk =
            (start..(start + 128).min(total)).map(|i| s.bus.publish(reading(&car, i64::from(i))));
        for published in futures_util::future::join_all(chunk).await {
            published.unwrap();
        }
    }
    reading_task.await.unwrap();
    assert_eq!(
        received.load(std::sync::atomic::Ordering::SeqCst),
        total,
        "the reading client got everything"
    );
    assert_eq!(
        close_code(&mut stalled).await,
        Some(CloseCode::from(CLOSE_TOO_SLOW))
    );
    ecars_e2e::wait_for("the slow client gone", Duration::from_secs(5), || async {
        s.relay.hub().clients() == 0
    })
    .await
    .unwrap();
    s.stop().await;
}

#[tokio::test]
async fn tokens_are_checked_and_minted_for_the_api_key_only() {
    let s = server(RelayConfig {
        secret: Some(SECRET.into()),
        api_key: Some("api-key-for-salesforce".into()),
        ..RelayConfig::default()
    })
    .await;
    let car = vin(4);
    let url = format!("{}/v1/vehicles/{car}/live", s.base);
    let authority = TokenAuthority::new(SECRET.as_bytes());
    let other = TokenAuthority::new(b"some-other-secret-of-32-bytes!!!!");
    let good = authority
        .mint(car.as_str(), Duration::from_secs(60))
        .unwrap();
    let for_other_car = authority
        .mint(vin(5).as_str(), Duration::from_secs(60))
        .unwrap();
    let wrong_secret = other.mint(car.as_str(), Duration::from_secs(60)).unwrap();
    let expired = jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &RelayClaims {
            sub: car.to_string(),
            exp: Utc::now().timestamp() - 10,
        },
        &jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();

    // Missing (the first message is not a token), wrong secret, expired, wrong VIN: 1008.
    let mut socket = connect(&url, &[]).await.unwrap();
    socket.send(Message::Text("hello".into())).await.unwrap();
    assert_eq!(close_code(&mut socket).await, Some(CloseCode::Policy));
    for token in [&wrong_secret, &expired, &for_other_car] {
        let mut socket = connect(&format!("{url}?access_token={token}"), &[])
            .await
            .unwrap();
        assert_eq!(
            close_code(&mut socket).await,
            Some(CloseCode::from(CLOSE_POLICY))
        );
    }
    // A fleet socket needs a fleet token.
    let mut socket = connect(&format!("{}/v1/live?access_token={good}", s.base), &[])
        .await
        .unwrap();
    assert_eq!(close_code(&mut socket).await, Some(CloseCode::Policy));

    // Good token: as a header, as a query parameter, as the first message.
    let bearer = format!("Bearer {good}");
    let mut by_header = connect(&url, &[("authorization", &bearer)]).await.unwrap();
    let mut by_query = connect(&format!("{url}?access_token={good}"), &[])
        .await
        .unwrap();
    let mut by_message = connect(&url, &[]).await.unwrap();
    by_message
        .send(Message::Text(
            serde_json::json!({ "access_token": good })
                .to_string()
                .into(),
        ))
        .await
        .unwrap();
    ecars_e2e::wait_for("three clients", Duration::from_secs(5), || async {
        s.relay.hub().clients() == 3
    })
    .await
    .unwrap();
    let live = reading(&car, 1);
    s.bus.publish(live.clone()).await.unwrap();
    for socket in [&mut by_header, &mut by_query, &mut by_message] {
        assert_eq!(next_reading(socket).await.event_id, live.event_id);
    }

    // Minting: the API key, and only it.
    let http = reqwest::Client::new();
    let mint_url = format!("{}/v1/relay-tokens", s.base.replace("ws://", "http://"));
    let refused = http
        .post(&mint_url)
        .bearer_auth("not-the-key")
        .json(&serde_json::json!({ "vin": car.as_str() }))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 401);
    let minted: serde_json::Value = http
        .post(&mint_url)
        .bearer_auth("api-key-for-salesforce")
        .json(&serde_json::json!({ "vin": car.as_str() }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let token = minted["token"].as_str().unwrap();
    assert!(authority
        .check(token, Some(std::slice::from_ref(&car)))
        .is_ok());
    assert!(authority.check(token, Some(&[vin(5)])).is_err());
    s.stop().await;
}

#[tokio::test]
async fn browsers_from_origins_off_the_allow_list_are_refused() {
    let s = server(RelayConfig {
        allowed_origins: vec!["https://myorg.lightning.force.com".into()],
        ..RelayConfig::default()
    })
    .await;
    let url = format!("{}/v1/vehicles/{}/live", s.base, vin(6));
    let refused = connect(&url, &[("origin", "https://evil.example")]).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 403)
        }
        other => panic!("expected a 403 handshake, got {:?}", other.map(|_| ())),
    }
    assert!(
        connect(&url, &[("origin", "https://myorg.lightning.force.com")])
            .await
            .is_ok()
    );
    s.stop().await;
}

#[test]
fn without_a_secret_the_relay_refuses_a_public_address() {
    let error = Relay::new(
        &RelayConfig::default(),
        "0.0.0.0:8080".parse().unwrap(),
        None,
    )
    .err()
    .unwrap();
    assert!(
        matches!(
            error,
            ConfigError::Invalid {
                setting: "ECARS_RELAY_SECRET",
                ..
            }
        ),
        "{error}"
    );
    let short = RelayConfig {
        secret: Some("short".into()),
        ..RelayConfig::default()
    };
    assert!(Relay::new(&short, "127.0.0.1:8080".parse().unwrap(), None).is_err());
}

#[tokio::test]
async fn a_client_that_answers_no_pings_is_closed_as_idle() {
    let s = server(RelayConfig {
        ping_interval: Duration::from_millis(100),
        idle_timeout: Duration::from_millis(300),
        ..RelayConfig::default()
    })
    .await;
    let mut quiet = connect(&format!("{}/v1/vehicles/{}/live", s.base, vin(7)), &[])
        .await
        .unwrap();
    // Not polling the socket means not answering pings: the observation window itself.
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(close_code(&mut quiet).await, Some(CloseCode::Away));
    s.stop().await;
}
