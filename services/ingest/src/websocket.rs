//! MQTT over WebSocket (as browsers and eCars' own clients speak it): the WebSocket is unwrapped
//! into a byte stream and served by the same gateway as TCP, so both get the same checks.

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;

/// Completes the WebSocket handshake (answering the `mqtt` subprotocol when offered) and returns
/// a byte stream carrying the MQTT packets.
pub async fn accept(tcp: TcpStream) -> Result<DuplexStream, tokio_tungstenite::tungstenite::Error> {
    let offers_mqtt = |request: &Request| {
        request
            .headers()
            .get_all("sec-websocket-protocol")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|p| p.trim().eq_ignore_ascii_case("mqtt"))
    };
    // The error type is tungstenite's, so its size is not ours to choose.
    #[allow(clippy::result_large_err)]
    let callback = |request: &Request, mut response: Response| -> Result<Response, ErrorResponse> {
        if offers_mqtt(request) {
            response
                .headers_mut()
                .insert("sec-websocket-protocol", HeaderValue::from_static("mqtt"));
        }
        Ok(response)
    };
    let ws = tokio_tungstenite::accept_hdr_async(tcp, callback).await?;
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    tokio::spawn(bridge(ws, ours));
    Ok(theirs)
}

/// Moves binary messages into the byte stream and bytes back out as binary messages.
async fn bridge(ws: tokio_tungstenite::WebSocketStream<TcpStream>, pipe: DuplexStream) {
    let (mut ws_tx, mut ws_rx) = ws.split();
    let (mut pipe_rx, mut pipe_tx) = tokio::io::split(pipe);
    let inbound = async {
        while let Some(message) = ws_rx.next().await {
            match message {
                Ok(Message::Binary(data)) => {
                    if pipe_tx.write_all(&data).await.is_err() {
                        break;
                    }
                }
                Ok(Message::Close(_)) | Err(_) => break,
                // Pings are answered by tungstenite; text frames are not MQTT.
                Ok(_) => {}
            }
        }
        let _ = pipe_tx.shutdown().await;
    };
    let outbound = async {
        let mut buffer = vec![0u8; 16 * 1024];
        loop {
            match pipe_rx.read(&mut buffer).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if ws_tx
                        .send(Message::binary(buffer[..n].to_vec()))
                        .await
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
        let _ = ws_tx.close().await;
    };
    tokio::join!(inbound, outbound);
}
