//! What a peer without credentials can cost the listeners, over real sockets against the
//! composition `ecars up` runs: a WebSocket message announcing 60 MiB is refused at its frame
//! header (MQTT over WebSocket and the relay), a message fragmented past the limit too; idle
//! sockets on the HTTP port and the MQTT-over-WebSocket port are closed after their timeouts
//! (1,000 of each); an oversized request head gets 431, a body that never comes 408.

use std::time::Duration;

use ecars_e2e::{Pipeline, PipelineOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

async fn pipeline(dir: &tempfile::TempDir, header_timeout: Duration) -> Pipeline {
    let mut options =
        PipelineOptions::new(format!("sqlite://{}", dir.path().join("l.db").display()));
    options.http.header_timeout = header_timeout;
    options.http.request_timeout = Duration::from_secs(2);
    Pipeline::start(options).await.unwrap()
}

/// Opens a WebSocket on `path` by hand (so the test controls every frame) and returns the
/// socket after the server's 101.
async fn websocket(addr: std::net::SocketAddr, path: &str, protocol: Option<&str>) -> TcpStream {
    let mut socket = TcpStream::connect(addr).await.unwrap();
    let protocol = protocol
        .map(|p| format!("Sec-WebSocket-Protocol: {p}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{protocol}\r\n"
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    // Up to the end of the response head, byte by byte (nothing after it is ours to read).
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut byte = [0u8; 1];
        socket.read_exact(&mut byte).await.unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    socket
}

/// A masked binary frame header (client frames are masked) announcing `length` bytes.
fn frame_header(fin: bool, opcode: u8, length: u64) -> Vec<u8> {
    let mut header = vec![if fin { 0x80 } else { 0 } | opcode, 0x80 | 127];
    header.extend_from_slice(&length.to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    header
}

/// Writes up to `budget` bytes of payload; returns how many went out before the server closed.
async fn send_until_closed(socket: &mut TcpStream, budget: usize) -> usize {
    let chunk = vec![0u8; 16 * 1024];
    let mut sent = 0;
    while sent < budget {
        match tokio::time::timeout(Duration::from_secs(5), socket.write_all(&chunk)).await {
            Ok(Ok(())) => sent += chunk.len(),
            _ => break,
        }
    }
    sent
}

/// Whether the server closes the socket (a close frame and EOF, or a reset) within `limit`.
async fn closed_within(socket: &mut TcpStream, limit: Duration) -> bool {
    let mut buffer = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, socket.read(&mut buffer)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_60_mib_websocket_message_is_refused_at_its_header() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = pipeline(&dir, Duration::from_secs(10)).await;
    let announced = 60 * 1024 * 1024;
    for (addr, path, protocol) in [
        (pipeline.ws_addr, "/mqtt", Some("mqtt")),
        (pipeline.http_addr, "/v1/live", None),
    ] {
        // One frame announcing 60 MiB: refused at its header, so the server closes while the
        // client has sent a small part of it (socket buffers hold a few MiB at most).
        let mut socket = websocket(addr, path, protocol).await;
        socket
            .write_all(&frame_header(true, 0x2, announced))
            .await
            .unwrap();
        let sent = send_until_closed(&mut socket, 16 * 1024 * 1024).await;
        assert!(
            closed_within(&mut socket, Duration::from_secs(5)).await,
            "{path}: the 60 MiB frame is refused"
        );
        assert!(
            sent < 12 * 1024 * 1024,
            "{path}: {sent} bytes accepted before the refusal"
        );

        // The same amount as fragments of 512 KiB, none final: refused once the message passes
        // the limit.
        let mut socket = websocket(addr, path, protocol).await;
        let fragment = 512 * 1024;
        let mut refused = false;
        for i in 0..120 {
            let opcode = if i == 0 { 0x2 } else { 0x0 };
            let header = frame_header(false, opcode, fragment as u64);
            if socket.write_all(&header).await.is_err()
                || send_until_closed(&mut socket, fragment).await < fragment
            {
                refused = true;
                break;
            }
        }
        assert!(
            refused || closed_within(&mut socket, Duration::from_secs(5)).await,
            "{path}: a message fragmented past the limit is refused"
        );
    }
    pipeline.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_idle_sockets_on_each_port_are_closed_after_their_timeouts() {
    let dir = tempfile::tempdir().unwrap();
    let pipeline = pipeline(&dir, Duration::from_secs(2)).await;
    let mut sockets = Vec::new();
    for addr in [pipeline.http_addr, pipeline.ws_addr] {
        for _ in 0..1_000 {
            sockets.push((addr, TcpStream::connect(addr).await.unwrap()));
        }
    }
    // WebSockets that complete the handshake and then send no CONNECT.
    for _ in 0..50 {
        sockets.push((
            pipeline.ws_addr,
            websocket(pipeline.ws_addr, "/mqtt", Some("mqtt")).await,
        ));
    }
    // HTTP: the header timeout (2 s here); MQTT over WebSocket: the handshake's or CONNECT's
    // 10 s. Each socket is awaited until its close, all at once.
    let started = tokio::time::Instant::now();
    let waits = sockets.into_iter().map(|(addr, mut socket)| async move {
        (
            addr,
            closed_within(&mut socket, Duration::from_secs(20)).await,
        )
    });
    let results = futures_util::future::join_all(waits).await;
    let open: Vec<_> = results.iter().filter(|(_, closed)| !closed).collect();
    assert!(open.is_empty(), "{} sockets still open", open.len());
    assert!(started.elapsed() < Duration::from_secs(20));

    // A request head over the limit gets 431, and a well-formed one still works.
    let http = reqwest::Client::new();
    let huge = http
        .get(format!("{}/v1/vehicles", pipeline.http_base()))
        .header("x-padding", "a".repeat(32 * 1024))
        .send()
        .await
        .unwrap();
    assert_eq!(huge.status(), 431);
    let fine = http
        .get(format!("{}/v1/vehicles", pipeline.http_base()))
        .send()
        .await
        .unwrap();
    assert_eq!(fine.status(), 200);

    // Headers announcing a body that never comes: 408 at the request timeout (2 s here).
    let mut slow = TcpStream::connect(pipeline.http_addr).await.unwrap();
    slow.write_all(
        b"POST /v1/relay-tokens HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{",
    )
    .await
    .unwrap();
    let mut answer = vec![0u8; 1024];
    let n = tokio::time::timeout(Duration::from_secs(10), slow.read(&mut answer))
        .await
        .expect("an answer within the request timeout")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    let metrics = pipeline.metrics().await.unwrap();
    for line in [
        "ecars_http_connections_closed_total{reason=\"header_timeout\"}",
        "ecars_http_connections_closed_total{reason=\"request_timeout\"}",
        "ecars_mqtt_connections_ended_total{reason=\"websocket_handshake_timeout\"}",
        "ecars_mqtt_connections_ended_total{reason=\"connect_timeout\"}",
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }
    pipeline.shutdown().await.unwrap();
}
