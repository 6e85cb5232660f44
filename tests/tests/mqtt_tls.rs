//! MQTT over TLS (issue 14) with clients nobody here wrote: Debian's `mosquitto_pub` with
//! `--cafile`, `--cert` and `--key`, against certificates made by `openssl` for the test. A car
//! with a certificate from the configured CA logs in as the VIN in it, whatever its username
//! says; one from another CA is refused; a password still works for cars without a certificate;
//! revoked VINs and certificate serials are refused, and a connected revoked car is dropped
//! within seconds of the file change; a renewed server certificate is served without a restart.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ecars_e2e::{test_vin, wait_for, Pipeline, PipelineOptions};
use ecars_model::device_auth::DeviceSecret;
use ecars_runtime::tls::TlsConfig;
use rumqttc::{AsyncClient, ConnectReturnCode, ConnectionError, Event, MqttOptions, Packet};

const SECRET: &str = "a-fleet-secret-of-some-length";
const WAIT: Duration = Duration::from_secs(10);

fn openssl(dir: &Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl (apt-get install openssl)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA `name`.pem / `name`.key.
fn ca(dir: &Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
        ],
    );
}

/// A certificate `name`.pem / `name`.key for `cn`, signed by `ca`, with `extensions`.
fn issue(dir: &Path, ca: &str, name: &str, cn: &str, extensions: &str) {
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
            "-subj",
            &format!("/CN={cn}"),
        ],
    );
    std::fs::write(dir.join(format!("{name}.ext")), extensions).unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-CAcreateserial",
            "-out",
            &format!("{name}.pem"),
            "-days",
            "2",
            "-extfile",
            &format!("{name}.ext"),
        ],
    );
}

const SERVER_EXT: &str = "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n";
const CLIENT_EXT: &str = "extendedKeyUsage=clientAuth\n";

/// A reading published with `mosquitto_pub` over TLS, trusting the CA `ca` (`ca`.pem).
struct TlsPublish<'a> {
    ca: &'a str,
    /// A client certificate: `name`.pem and `name`.key.
    cert: Option<&'a str>,
    client_id: &'a str,
    /// Username and password.
    login: Option<(&'a str, &'a str)>,
    /// The car the reading is for, and its battery level.
    vin: &'a str,
    battery: u32,
}

impl TlsPublish<'_> {
    /// Runs it against `port`; whether it succeeded, and what it said.
    async fn run(&self, port: u16, dir: &Path) -> (bool, String) {
        let mut args = vec![
            "-h".to_owned(),
            "127.0.0.1".into(),
            "-p".into(),
            port.to_string(),
            "-q".into(),
            "1".into(),
            "--cafile".into(),
            format!("{}.pem", self.ca),
            "-i".into(),
            self.client_id.into(),
            "-t".into(),
            format!("vehicles/{}/telemetry", self.vin),
            "-m".into(),
            format!(r#"{{"battery":{}}}"#, self.battery),
        ];
        if let Some(cert) = self.cert {
            args.extend([
                "--cert".into(),
                format!("{cert}.pem"),
                "--key".into(),
                format!("{cert}.key"),
            ]);
        }
        if let Some((user, password)) = self.login {
            args.extend(["-u".into(), user.into(), "-P".into(), password.into()]);
        }
        let out = tokio::process::Command::new("mosquitto_pub")
            .current_dir(dir)
            .args(&args)
            .output()
            .await
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

fn path(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cars_log_in_with_certificates_and_revoked_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ca(d, "fleet-ca");
    ca(d, "other-ca");
    issue(d, "fleet-ca", "server", "localhost", SERVER_EXT);
    let (car, other, revoked) = (test_vin(1), test_vin(2), test_vin(3));
    issue(d, "fleet-ca", "car", &car, CLIENT_EXT);
    issue(d, "other-ca", "impostor", &car, CLIENT_EXT);
    std::fs::write(path(d, "revoked"), "# nothing yet\n").unwrap();

    let mut options = PipelineOptions::new(format!("sqlite://{}", d.join("ecars.db").display()));
    options.device_secret = Some(SECRET.into());
    options.revoked_file = Some(path(d, "revoked"));
    options.tls = TlsConfig {
        cert_file: Some(path(d, "server.pem")),
        key_file: Some(path(d, "server.key")),
        client_ca_file: Some(path(d, "fleet-ca.pem")),
    };
    let pipeline = Pipeline::start(options).await.unwrap();
    let port = pipeline.tls_addr.expect("the TLS listener").port();
    let with_cert = |cert, vin, battery| TlsPublish {
        ca: "fleet-ca",
        cert: Some(cert),
        client_id: &car,
        login: None,
        vin,
        battery,
    };

    // The certificate's VIN is the car, whatever the username says: no password needed, and a
    // username naming another car changes nothing.
    let (ok, said) = TlsPublish {
        login: Some((&other, "not-its-password")),
        ..with_cert("car", &car, 61)
    }
    .run(port, d)
    .await;
    assert!(ok, "{said}");
    let rows = pipeline.db.sensor_rows();
    let car_vin = ecars_model::Vin::parse(&car).unwrap();
    wait_for("the certified car's reading", WAIT, || async {
        rows.of_vehicle(&car_vin, 10)
            .await
            .is_ok_and(|r| r.iter().any(|r| r.battery == Some(61.0)))
    })
    .await
    .unwrap();
    // Its certificate does not make it another car: that car's telemetry is dead-lettered.
    let (ok, said) = with_cert("car", &other, 62).run(port, d).await;
    assert!(ok, "{said}");
    wait_for("the other car's reading dead-lettered", WAIT, || async {
        pipeline
            .db
            .dead_letter_rows()
            .newest(10)
            .await
            .unwrap_or_default()
            .iter()
            .any(|row| row.reason.starts_with("unauthorized_vin"))
    })
    .await
    .unwrap();

    // A certificate from another CA: the handshake fails.
    let (ok, _) = with_cert("impostor", &car, 63).run(port, d).await;
    assert!(!ok, "a certificate from another CA is refused");

    // No certificate: the password, as on the plain port.
    let password =
        DeviceSecret::new(SECRET).password_for(&ecars_model::Vin::parse(&other).unwrap());
    let with_password = |ca, password| TlsPublish {
        ca,
        cert: None,
        client_id: &other,
        login: Some((&other, password)),
        vin: &other,
        battery: 64,
    };
    let (ok, said) = with_password("fleet-ca", &password).run(port, d).await;
    assert!(ok, "{said}");
    let (ok, _) = with_password("fleet-ca", "wrong").run(port, d).await;
    assert!(!ok, "a wrong password over TLS is refused");

    // A car connected with its password, then revoked: dropped within seconds, then refused.
    let revoked_vin = ecars_model::Vin::parse(&revoked).unwrap();
    let revoked_password = DeviceSecret::new(SECRET).password_for(&revoked_vin);
    let mut mqtt = MqttOptions::new(revoked.as_str(), "127.0.0.1", pipeline.mqtt_addr.port());
    mqtt.set_keep_alive(Duration::from_secs(30));
    mqtt.set_credentials(revoked.as_str(), revoked_password.as_str());
    let (_client, mut events) = AsyncClient::new(mqtt.clone(), 16);
    match tokio::time::timeout(WAIT, events.poll()).await {
        Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => {
            assert_eq!(ack.code, ConnectReturnCode::Success)
        }
        other => panic!("no CONNACK: {other:?}"),
    }
    // A car connected with its certificate (and no password), whose certificate is then
    // revoked: dropped too.
    let mut certified = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let mut tls = client_tls(&path(d, "fleet-ca.pem"), Some("car"))
            .connect(
                tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap(),
                tcp,
            )
            .await
            .unwrap();
        let mut body = Vec::new();
        ecars_e2e::mqtt_wire::put_string(&mut body, "MQTT");
        body.extend_from_slice(&[4, 0x02, 0, 30]);
        ecars_e2e::mqtt_wire::put_string(&mut body, &car);
        tls.write_all(&ecars_e2e::mqtt_wire::packet(0x10, &body))
            .await
            .unwrap();
        let mut connack = [0u8; 4];
        tokio::time::timeout(WAIT, tls.read_exact(&mut connack))
            .await
            .expect("a CONNACK")
            .unwrap();
        assert_eq!(connack, [0x20, 2, 0, 0], "the certified car is accepted");
        tls
    };
    let serial = {
        let out = std::process::Command::new("openssl")
            .current_dir(d)
            .args(["x509", "-in", "car.pem", "-noout", "-serial"])
            .output()
            .unwrap();
        String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .trim_start_matches("serial=")
            .to_owned()
    };
    std::fs::write(
        path(d, "revoked"),
        format!("vin {revoked}\nserial {serial}\n"),
    )
    .unwrap();
    let dropped = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::Disconnect)) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(dropped.is_ok(), "the revoked car is dropped within seconds");
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        use tokio::io::AsyncReadExt;
        let mut buf = [0u8; 64];
        // MQTT 3.1.1 has no DISCONNECT from the server: the connection just closes.
        while certified.read(&mut buf).await.is_ok_and(|n| n > 0) {}
    })
    .await;
    assert!(
        closed.is_ok(),
        "the car whose certificate was revoked is dropped within seconds"
    );
    let (_client, mut again) = AsyncClient::new(mqtt, 16);
    let refused = loop {
        match tokio::time::timeout(WAIT, again.poll()).await {
            Ok(Err(ConnectionError::ConnectionRefused(code))) => break code,
            Ok(Ok(Event::Incoming(Packet::ConnAck(ack)))) => panic!("accepted: {ack:?}"),
            Ok(_) => {}
            Err(_) => panic!("no answer"),
        }
    };
    assert_eq!(refused, ConnectReturnCode::NotAuthorized);
    // The revoked certificate: refused, whatever it says.
    let (ok, _) = with_cert("car", &car, 65).run(port, d).await;
    assert!(!ok, "a revoked certificate is refused");

    // A renewed server certificate (here from another CA) is served without a restart.
    issue(d, "other-ca", "renewed", "localhost", SERVER_EXT);
    // Key first, then the certificate: the pair is applied once both are the new ones.
    std::fs::copy(path(d, "renewed.key"), path(d, "server.key")).unwrap();
    std::fs::copy(path(d, "renewed.pem"), path(d, "server.pem")).unwrap();
    wait_for("the renewed certificate", WAIT, || async {
        with_password("other-ca", &password).run(port, d).await.0
    })
    .await
    .unwrap();
    let metrics = pipeline.metrics().await.unwrap();
    for line in [
        "ecars_mqtt_connections_ended_total{reason=\"tls_handshake_failed\"}",
        "ecars_mqtt_connections_ended_total{reason=\"revoked\"}",
        "ecars_mqtt_connections_refused_total{reason=\"revoked\"}",
        "ecars_mqtt_connections_refused_total{reason=\"revoked_certificate\"}",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    pipeline.shutdown().await.unwrap();
}

/// A rustls client trusting `ca` (PEM), presenting the client certificate `cert` (`cert`.pem
/// and `cert`.key in the same directory) if given.
fn client_tls(ca: &Path, cert: Option<&str>) -> tokio_rustls::TlsConnector {
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(cert.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::aws_lc_rs::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots);
    let config = match cert {
        None => config.with_no_client_auth(),
        Some(name) => {
            let dir = ca.parent().unwrap();
            let chain =
                rustls::pki_types::CertificateDer::pem_file_iter(path(dir, &format!("{name}.pem")))
                    .unwrap()
                    .map(Result::unwrap)
                    .collect();
            let key =
                rustls::pki_types::PrivateKeyDer::from_pem_file(path(dir, &format!("{name}.key")))
                    .unwrap();
            config.with_client_auth_cert(chain, key).unwrap()
        }
    };
    tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
}

/// With `--http-tls`, the API is HTTPS with the same certificate (and plain HTTP on its port
/// fails); MQTT over secure WebSocket (`wss://`, the `mqtt` subprotocol) logs a car in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_and_mqtt_over_secure_websocket_use_the_certificate() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    use tokio_tungstenite::tungstenite::Message;

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    ca(d, "fleet-ca");
    issue(d, "fleet-ca", "server", "localhost", SERVER_EXT);
    let mut options = PipelineOptions::new(format!("sqlite://{}", d.join("ecars.db").display()));
    options.device_secret = Some(SECRET.into());
    options.tls = TlsConfig {
        cert_file: Some(path(d, "server.pem")),
        key_file: Some(path(d, "server.key")),
        client_ca_file: None,
    };
    options.http.https = true;
    let pipeline = Pipeline::start(options).await.unwrap();

    // HTTPS, the certificate trusted through the test CA.
    let ca_pem = std::fs::read(path(d, "fleet-ca.pem")).unwrap();
    let https = reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca_pem).unwrap()])
        .build()
        .unwrap();
    let answer = https
        .get(format!("https://{}/v1/vehicles", pipeline.http_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let plain = reqwest::get(format!("http://{}/v1/vehicles", pipeline.http_addr)).await;
    assert!(
        plain.map_or(true, |r| !r.status().is_success()),
        "plain HTTP on the HTTPS port"
    );

    // MQTT over secure WebSocket: a car logs in with its password and gets its CONNACK.
    let wss = pipeline.wss_addr.expect("the secure WebSocket listener");
    let tcp = tokio::net::TcpStream::connect(wss).await.unwrap();
    let tls = client_tls(&path(d, "fleet-ca.pem"), None)
        .connect(
            tokio_rustls::rustls::pki_types::ServerName::try_from("localhost").unwrap(),
            tcp,
        )
        .await
        .unwrap();
    let mut request = format!("wss://localhost:{}/mqtt", wss.port())
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "mqtt".parse().unwrap());
    let (mut socket, response) = tokio_tungstenite::client_async(request, tls).await.unwrap();
    assert_eq!(
        response.headers().get("sec-websocket-protocol").unwrap(),
        "mqtt"
    );
    let vin = test_vin(7);
    let password = DeviceSecret::new(SECRET).password_for(&ecars_model::Vin::parse(&vin).unwrap());
    let mut body = Vec::new();
    ecars_e2e::mqtt_wire::put_string(&mut body, "MQTT");
    body.extend_from_slice(&[4, 0xC2, 0, 30]);
    ecars_e2e::mqtt_wire::put_string(&mut body, &vin);
    ecars_e2e::mqtt_wire::put_string(&mut body, &vin);
    ecars_e2e::mqtt_wire::put_string(&mut body, &password);
    socket
        .send(Message::binary(ecars_e2e::mqtt_wire::packet(0x10, &body)))
        .await
        .unwrap();
    let connack = tokio::time::timeout(WAIT, socket.next())
        .await
        .expect("a CONNACK")
        .unwrap()
        .unwrap();
    assert_eq!(connack.into_data().as_ref(), &[0x20, 2, 0, 0]);
    pipeline.shutdown().await.unwrap();
}
