//! The HTTP API's credentials, over real HTTP against the composition `ecars up` runs: every
//! `/v1` route answers 401 without a credential or with a wrong one and 403 with a key lacking
//! its scope; a relay token reads its own car only; health, readiness and metrics are only on
//! the internal listener; the keys file is re-read while running.

use std::time::Duration;

use ecars_e2e::{wait_for, Pipeline, PipelineOptions};
use ecars_model::api_key::{key_line, Scope, Scopes};
use ecars_model::relay_token::TokenAuthority;
use ecars_relay::RelayConfig;
use reqwest::{Method, StatusCode};

const SECRET: &str = "relay-secret-of-at-least-32-bytes!!";

fn scopes(list: &[Scope]) -> Scopes {
    list.iter().copied().collect()
}

/// A route, and a key that may call it.
struct Route {
    method: Method,
    path: String,
    body: Option<serde_json::Value>,
    scope: Scope,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_v1_route_needs_a_key_with_its_scope() {
    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("api-keys");
    // One key per scope, named after it, granting only it.
    let key_of = |scope: Scope| format!("key-for-{scope}");
    let lines: Vec<String> = Scope::ALL
        .iter()
        .map(|&s| key_line(&s.as_str().replace(':', "-"), &key_of(s), scopes(&[s])))
        .collect();
    std::fs::write(&keys_file, lines.join("\n")).unwrap();

    let mut options =
        PipelineOptions::new(format!("sqlite://{}", dir.path().join("h.db").display()));
    options.http.api_keys_file = Some(keys_file.clone());
    options.relay = RelayConfig {
        secret: Some(SECRET.into()),
        ..RelayConfig::default()
    };
    let pipeline = Pipeline::start(options).await.unwrap();
    let base = pipeline.http_base();
    let http = reqwest::Client::new();
    let car = ecars_e2e::test_vin(1);
    let other_car = ecars_e2e::test_vin(2);

    let routes = [
        ("GET", "/v1/vehicles".to_owned(), None, Scope::FleetRead),
        (
            "GET",
            format!("/v1/vehicles/{car}/telemetry"),
            None,
            Scope::FleetRead,
        ),
        (
            "GET",
            "/v1/dead-letters".into(),
            None,
            Scope::DeadLettersRead,
        ),
        ("GET", "/v1/cases".into(), None, Scope::CasesRead),
        (
            "POST",
            "/v1/cases/no-such-case/retry".into(),
            None,
            Scope::CasesWrite,
        ),
        (
            "POST",
            "/v1/relay-tokens".into(),
            Some(serde_json::json!({ "vin": car })),
            Scope::RelayTokensMint,
        ),
        ("GET", "/v1/status".into(), None, Scope::StatusRead),
    ]
    .map(|(method, path, body, scope)| Route {
        method: method.parse().unwrap(),
        path,
        body,
        scope,
    });
    let call = |route: &Route, bearer: Option<String>| {
        let mut request = http.request(route.method.clone(), format!("{base}{}", route.path));
        if let Some(body) = &route.body {
            request = request.json(body);
        }
        if let Some(bearer) = bearer {
            request = request.bearer_auth(bearer);
        }
        async move { request.send().await.unwrap() }
    };

    for route in &routes {
        let what = format!("{} {}", route.method, route.path);
        let none = call(route, None).await;
        assert_eq!(none.status(), StatusCode::UNAUTHORIZED, "{what}");
        assert!(
            none.headers()
                .get("www-authenticate")
                .is_some_and(|v| v.to_str().unwrap().starts_with("Bearer")),
            "{what}: a 401 names the scheme"
        );
        let body: serde_json::Value = none.json().await.unwrap();
        assert_eq!(body["reason"], "missing_credential", "{what}: {body}");

        let wrong = call(route, Some("ecars_not-a-key".into())).await;
        assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED, "{what}");
        let body: serde_json::Value = wrong.json().await.unwrap();
        assert_eq!(body["reason"], "invalid_credential", "{what}: {body}");

        // Every other scope's key: 403, except fleet:read, which may also mint.
        for other in Scope::ALL.into_iter().filter(|s| *s != route.scope) {
            if route.scope == Scope::RelayTokensMint && other == Scope::FleetRead {
                continue;
            }
            let lacking = call(route, Some(key_of(other))).await;
            assert_eq!(
                lacking.status(),
                StatusCode::FORBIDDEN,
                "{what} with {other}"
            );
            let body: serde_json::Value = lacking.json().await.unwrap();
            assert_eq!(body["reason"], "missing_scope", "{what}: {body}");
            assert!(
                body["error"]
                    .as_str()
                    .unwrap()
                    .contains(route.scope.as_str()),
                "{what}: the 403 names the scope it lacks: {body}"
            );
        }

        let granted = call(route, Some(key_of(route.scope))).await;
        let status = granted.status();
        let expected = if route.path.contains("no-such-case") {
            // Past the credential check: the outbox has no such failed Case.
            StatusCode::NOT_FOUND
        } else {
            StatusCode::OK
        };
        assert_eq!(
            status,
            expected,
            "{what}: {}",
            granted.text().await.unwrap()
        );
    }

    // The API's description: any key of the server, whatever its scopes; nobody else.
    let openapi = format!("{base}/v1/openapi.json");
    let none = http.get(&openapi).send().await.unwrap();
    assert_eq!(none.status(), StatusCode::UNAUTHORIZED);
    let body: serde_json::Value = none.json().await.unwrap();
    assert_eq!(body["reason"], "missing_credential", "{body}");
    let wrong = http.get(&openapi).bearer_auth("ecars_not-a-key").send();
    assert_eq!(wrong.await.unwrap().status(), StatusCode::UNAUTHORIZED);
    for scope in Scope::ALL {
        let read = http.get(&openapi).bearer_auth(key_of(scope)).send();
        let read = read.await.unwrap();
        assert_eq!(read.status(), StatusCode::OK, "with {scope}");
        let doc: serde_json::Value = read.json().await.unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
    }

    // A relay token reads the telemetry of its own car, and nothing else.
    let authority = TokenAuthority::new(SECRET.as_bytes());
    let token = authority.mint(&car, Duration::from_secs(60)).unwrap();
    let get = |path: String, bearer: String| {
        let request = http.get(format!("{base}{path}")).bearer_auth(bearer);
        async move { request.send().await.unwrap().status() }
    };
    assert_eq!(
        get(format!("/v1/vehicles/{car}/telemetry"), token.clone()).await,
        StatusCode::OK
    );
    assert_eq!(
        get(format!("/v1/vehicles/{other_car}/telemetry"), token.clone()).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        get("/v1/vehicles".into(), token.clone()).await,
        StatusCode::FORBIDDEN
    );
    let forged = TokenAuthority::new(b"another secret, of 32 bytes too!")
        .mint(&car, Duration::from_secs(60))
        .unwrap();
    assert_eq!(
        get(format!("/v1/vehicles/{car}/telemetry"), forged).await,
        StatusCode::UNAUTHORIZED
    );

    // Operations are on the internal listener only.
    for path in ["/metrics", "/healthz", "/readyz"] {
        let public = reqwest::get(format!("{base}{path}")).await.unwrap();
        assert_eq!(public.status(), StatusCode::NOT_FOUND, "public {path}");
        let admin = reqwest::get(format!("{}{path}", pipeline.admin_base()))
            .await
            .unwrap();
        assert_eq!(admin.status(), StatusCode::OK, "internal {path}");
    }
    let metrics = pipeline.metrics().await.unwrap();
    for reason in ["missing_credential", "invalid_credential", "missing_scope"] {
        let line = format!("ecars_api_refused_total{{reason=\"{reason}\"}}");
        assert!(metrics.contains(&line), "{line} in\n{metrics}");
    }

    // A key added to the file works within seconds, without a restart; a removed one stops.
    let vehicles = Route {
        method: Method::GET,
        path: "/v1/vehicles".into(),
        body: None,
        scope: Scope::FleetRead,
    };
    let new_key = "key-added-while-running";
    let mut with_new = lines.clone();
    with_new.push(key_line("added", new_key, scopes(&[Scope::FleetRead])));
    std::fs::write(&keys_file, with_new.join("\n")).unwrap();
    wait_for("the added key to work", Duration::from_secs(10), || async {
        call(&vehicles, Some(new_key.into())).await.status() == StatusCode::OK
    })
    .await
    .unwrap();
    // A broken file is not applied: the keys in force stay.
    std::fs::write(&keys_file, "this is not a keys file\n").unwrap();
    wait_for(
        "the refused reload to be counted",
        Duration::from_secs(10),
        || async {
            pipeline
                .metrics()
                .await
                .unwrap()
                .contains(r#"ecars_settings_file_reloads_total{file="api_keys",result="refused"}"#)
        },
    )
    .await
    .unwrap();
    assert_eq!(
        call(&vehicles, Some(new_key.into())).await.status(),
        StatusCode::OK
    );
    std::fs::write(&keys_file, lines.join("\n")).unwrap();
    wait_for(
        "the removed key to stop working",
        Duration::from_secs(10),
        || async {
            call(&vehicles, Some(new_key.into())).await.status() == StatusCode::UNAUTHORIZED
        },
    )
    .await
    .unwrap();
    pipeline.shutdown().await.unwrap();
}

/// Without any secret, on loopback (`ecars up` on a laptop), the API stays open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_loopback_demo_without_secrets_needs_no_key() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = Pipeline::start(PipelineOptions::new(format!(
        "sqlite://{}",
        dir.path().join("o.db").display()
    )))
    .await
    .unwrap();
    let vehicles = reqwest::get(format!("{}/v1/vehicles", pipeline.http_base()))
        .await
        .unwrap();
    assert_eq!(vehicles.status(), StatusCode::OK);
    pipeline.shutdown().await.unwrap();
}

/// With API keys and no relay secret, live sockets need a credential too: a key that may read
/// the car (as a bearer header or the first message) streams it; a wrong key, or one without
/// `fleet:read`, is closed with 1008.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_sockets_take_api_keys_and_need_a_credential_where_keys_are_set() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    let dir = tempfile::tempdir().unwrap();
    let keys_file = dir.path().join("api-keys");
    std::fs::write(
        &keys_file,
        [
            key_line("reader", "the-reader-key", scopes(&[Scope::FleetRead])),
            key_line("ops", "the-ops-key", scopes(&[Scope::DeadLettersRead])),
        ]
        .join("\n"),
    )
    .unwrap();
    let mut options =
        PipelineOptions::new(format!("sqlite://{}", dir.path().join("l.db").display()));
    options.http.api_keys_file = Some(keys_file);
    let pipeline = Pipeline::start(options).await.unwrap();
    let car = ecars_e2e::test_vin(3);
    let url = format!("ws://{}/v1/vehicles/{car}/live", pipeline.http_addr);
    let close_code = |mut socket: tokio_tungstenite::WebSocketStream<_>| async move {
        loop {
            match tokio::time::timeout(Duration::from_secs(15), socket.next()).await {
                Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| u16::from(f.code)),
                Ok(Some(Ok(_))) => {}
                other => panic!("no close: {other:?}"),
            }
        }
    };

    for first in ["not-a-key", "the-ops-key"] {
        let (mut socket, _) = tokio_tungstenite::connect_async(&url).await.unwrap();
        socket.send(Message::text(first)).await.unwrap();
        assert_eq!(close_code(socket).await, Some(1008), "{first}");
    }

    let mut request = url.as_str().into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", "Bearer the-reader-key".parse().unwrap());
    let (mut socket, _) = tokio_tungstenite::connect_async(request).await.unwrap();
    ecars_e2e::wait_for("the socket registered", Duration::from_secs(10), || async {
        pipeline.relay.hub().clients() == 1
    })
    .await
    .unwrap();
    let reading: ecars_model::TelemetryReading = serde_json::from_value(serde_json::json!({
        "event_id": uuid::Uuid::now_v7(),
        "received_at": chrono::Utc::now(),
        "vin": car,
        "battery": 77.0,
        "date": chrono::Utc::now(),
    }))
    .unwrap();
    pipeline.bus.publish(reading).await.unwrap();
    let frame = loop {
        match tokio::time::timeout(Duration::from_secs(10), socket.next()).await {
            Ok(Some(Ok(Message::Text(text)))) => break text,
            Ok(Some(Ok(_))) => {}
            other => panic!("no reading: {other:?}"),
        }
    };
    assert!(frame.as_str().contains("77"), "{frame}");
    pipeline.shutdown().await.unwrap();
}
