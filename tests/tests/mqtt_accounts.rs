//! MQTT service accounts (issue 14): subscribers that are not cars log in with a name and a
//! password from the accounts file, read only their filters and own only their client ids.

use std::time::Duration;

use ecars_e2e::{reading_json, test_vin, Pipeline, PipelineOptions};
use ecars_model::device_auth::DeviceSecret;
use ecars_model::Vin;
use rumqttc::{
    AsyncClient, ConnectReturnCode, ConnectionError, Event, EventLoop, MqttOptions, Packet, QoS,
    SubscribeFilter, SubscribeReasonCode,
};

const WAIT: Duration = Duration::from_secs(10);
const SECRET: &str = "a-fleet-secret-of-some-length";

/// A car logged in as `vin`, its event loop polled in the background.
async fn car(pipeline: &Pipeline, vin: &Vin) -> (AsyncClient, tokio::task::JoinHandle<()>) {
    let password = DeviceSecret::new(SECRET).password_for(vin);
    let (client, mut events, code) = login(pipeline, vin.as_str(), vin.as_str(), &password).await;
    assert_eq!(code, ConnectReturnCode::Success);
    (
        client,
        tokio::spawn(async move { while events.poll().await.is_ok() {} }),
    )
}

/// The return codes of the next SUBACK.
async fn suback(events: &mut EventLoop) -> Vec<SubscribeReasonCode> {
    loop {
        match tokio::time::timeout(WAIT, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::SubAck(ack)))) => return ack.return_codes,
            Ok(Ok(_)) => {}
            other => panic!("no SUBACK: {other:?}"),
        }
    }
}

/// A client logged in with `username`/`password` and `client_id`; the CONNACK's code.
async fn login(
    pipeline: &Pipeline,
    client_id: &str,
    username: &str,
    password: &str,
) -> (AsyncClient, EventLoop, ConnectReturnCode) {
    let mut options = MqttOptions::new(client_id, "127.0.0.1", pipeline.mqtt_addr.port());
    options.set_keep_alive(Duration::from_secs(30));
    options.set_credentials(username, password);
    let (client, mut events) = AsyncClient::new(options, 16);
    let code = loop {
        match tokio::time::timeout(WAIT, events.poll()).await {
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => break ack.code,
            Ok(Ok(_)) => {}
            Ok(Err(ConnectionError::ConnectionRefused(code))) => break code,
            Ok(Err(e)) => panic!("connection failed: {e}"),
            Err(_) => panic!("no CONNACK within {WAIT:?}"),
        }
    };
    (client, events, code)
}

/// A service account (a dashboard, another team's service) reads the filters of its account and
/// nothing else, over rumqttc and Debian's mosquitto_sub; its password and client ids are its
/// own; it publishes no telemetry; an account added to the file logs in without a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_account_reads_only_its_filters() {
    let dir = tempfile::tempdir().unwrap();
    let accounts_file = dir.path().join("mqtt-accounts");
    let dashboard =
        ecars_app::commands::create_mqtt_account("dashboard", &["vehicles/+/telemetry".to_owned()])
            .unwrap();
    std::fs::write(&accounts_file, format!("{}\n", dashboard.line)).unwrap();
    let mut options = PipelineOptions::new(format!(
        "sqlite://{}",
        dir.path().join("ecars.db").display()
    ));
    options.device_secret = Some(SECRET.into());
    options.mqtt_accounts_file = Some(accounts_file.clone());
    let pipeline = Pipeline::start(options).await.unwrap();
    let port = pipeline.mqtt_addr.port().to_string();
    let a = Vin::parse(&test_vin(1)).unwrap();
    let (a_client, a_events) = car(&pipeline, &a).await;

    // mosquitto_sub as the account, on its filter: it gets the car's readings.
    let subscriber = tokio::process::Command::new("mosquitto_sub")
        .args([
            "-h",
            "127.0.0.1",
            "-p",
            &port,
            "-q",
            "1",
            "-C",
            "1",
            "-W",
            "20",
        ])
        .args([
            "-u",
            "dashboard",
            "-P",
            &dashboard.password,
            "-i",
            "dashboard-sub",
        ])
        .args(["-t", "vehicles/+/telemetry"])
        .kill_on_drop(true)
        .output();
    let publishing = async {
        loop {
            a_client
                .publish(
                    format!("vehicles/{a}/telemetry"),
                    QoS::AtLeastOnce,
                    false,
                    reading_json(a.as_str(), 42.5),
                )
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    };
    let out = tokio::select! {
        out = subscriber => out.unwrap(),
        () = publishing => unreachable!(),
    };
    let received = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && received.contains("42.5"),
        "{received} {}",
        String::from_utf8_lossy(&out.stderr)
    );

    // mosquitto_sub on `#`: denied.
    let denied = tokio::process::Command::new("mosquitto_sub")
        .args(["-h", "127.0.0.1", "-p", &port, "-C", "1", "-W", "5"])
        .args([
            "-u",
            "dashboard",
            "-P",
            &dashboard.password,
            "-i",
            "dashboard-all",
        ])
        .args(["-t", "#"])
        .output()
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&denied.stderr);
    assert!(said.contains("denied"), "{said}");

    // rumqttc: of one SUBSCRIBE, the filter of the account passes, the others fail.
    let (client, mut events, code) =
        login(&pipeline, "dashboard-2", "dashboard", &dashboard.password).await;
    assert_eq!(code, ConnectReturnCode::Success);
    client
        .subscribe_many([
            SubscribeFilter::new("#".into(), QoS::AtLeastOnce),
            SubscribeFilter::new(format!("vehicles/{a}/telemetry"), QoS::AtLeastOnce),
            SubscribeFilter::new("vehicles/+/commands".into(), QoS::AtLeastOnce),
        ])
        .await
        .unwrap();
    assert_eq!(
        suback(&mut events).await,
        vec![
            SubscribeReasonCode::Failure,
            SubscribeReasonCode::Success(QoS::AtLeastOnce),
            SubscribeReasonCode::Failure,
        ]
    );
    let polling = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    // An account publishes no telemetry: dead-lettered as not its own.
    client
        .publish(
            format!("vehicles/{a}/telemetry"),
            QoS::AtLeastOnce,
            false,
            reading_json(a.as_str(), 10.0),
        )
        .await
        .unwrap();
    ecars_e2e::wait_for("the account's reading dead-lettered", WAIT, || async {
        pipeline
            .db
            .dead_letter_rows()
            .newest(10)
            .await
            .unwrap_or_default()
            .iter()
            .any(|row| row.client_id == "dashboard-2" && row.reason.starts_with("unauthorized_vin"))
    })
    .await
    .unwrap();

    // A wrong password, another identity's client id: refused.
    let (_, _, wrong) = login(&pipeline, "dashboard-3", "dashboard", "not-the-password").await;
    assert_eq!(wrong, ConnectReturnCode::BadUserNamePassword);
    let (_, _, stolen) = login(&pipeline, a.as_str(), "dashboard", &dashboard.password).await;
    assert_eq!(stolen, ConnectReturnCode::BadClientId);

    // An account added to the file logs in within seconds, without a restart.
    let ops = ecars_app::commands::create_mqtt_account("ops", &["vehicles/#".to_owned()]).unwrap();
    std::fs::write(
        &accounts_file,
        format!("{}\n{}\n", dashboard.line, ops.line),
    )
    .unwrap();
    ecars_e2e::wait_for("the added account to log in", WAIT, || async {
        login(&pipeline, "ops", "ops", &ops.password).await.2 == ConnectReturnCode::Success
    })
    .await
    .unwrap();

    // Removed from the file: its connection is dropped within seconds, and it cannot log in.
    let (_ops_client, mut ops_events, code) = login(&pipeline, "ops-1", "ops", &ops.password).await;
    assert_eq!(code, ConnectReturnCode::Success);
    std::fs::write(&accounts_file, format!("{}\n", dashboard.line)).unwrap();
    let dropped = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match ops_events.poll().await {
                Ok(Event::Incoming(Packet::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(
        dropped.is_ok(),
        "the removed account is dropped within seconds"
    );
    assert_ne!(
        login(&pipeline, "ops-2", "ops", &ops.password).await.2,
        ConnectReturnCode::Success
    );
    a_events.abort();
    polling.abort();
    pipeline.shutdown().await.unwrap();
}
