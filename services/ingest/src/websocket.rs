//! MQTT over WebSocket (as browsers and eCars' own clients speak it): the WebSocket is unwrapped
//! into a byte stream and served by the same gateway as TCP, so both get the same checks.
//!
//! Limits before any credential: the handshake must complete within [`HANDSHAKE_TIMEOUT`] (its
//! request is bounded by tungstenite at 64 KiB), a WebSocket message or frame may not exceed
//! the MQTT packet limit (a peer announcing 60 MiB is refused at the frame header, not
//! buffered), and the socket closes as soon as the gateway ends the MQTT connection (for one,
//! when no CONNECT came within its time), whatever the peer does.

use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::codec::MAX_PACKET_BYTES;

/// Time a peer has to complete the WebSocket handshake (its MQTT CONNECT then has the
/// gateway's own time).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest WebSocket message or frame: one MQTT packet at its limit, with room for the packets
/// a client may pack around it.
pub const MAX_MESSAGE_BYTES: usize = MAX_PACKET_BYTES + 64 * 1024;

/// Time the peer has to answer our close frame before the socket is dropped.
const CLOSE_GRACE: Duration = Duration::from_secs(2);

/// Why a WebSocket did not become an MQTT connection.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    /// The handshake did not complete in time.
    #[error("no WebSocket handshake within {0:?}")]
    Timeout(Duration),
    /// The handshake failed.
    #[error(transparent)]
    WebSocket(#[from] tokio_tungstenite::tungstenite::Error),
}

/// Completes the WebSocket handshake (answering the `mqtt` subprotocol when offered) and returns
/// a byte stream carrying the MQTT packets.
pub async fn accept<S>(tcp: S) -> Result<DuplexStream, HandshakeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
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
    // Cars send small packets: tungstenite's default 128 KiB read buffer would be most of a
    // connection's memory.
    let config = WebSocketConfig::default()
        .read_buffer_size(4 * 1024)
        .write_buffer_size(16 * 1024)
        .max_write_buffer_size(MAX_MESSAGE_BYTES)
        .max_message_size(Some(MAX_MESSAGE_BYTES))
        .max_frame_size(Some(MAX_MESSAGE_BYTES));
    let ws = tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        tokio_tungstenite::accept_hdr_async_with_config(tcp, callback, Some(config)),
    )
    .await
    .map_err(|_| HandshakeError::Timeout(HANDSHAKE_TIMEOUT))??;
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    tokio::spawn(bridge(ws, ours));
    Ok(theirs)
}

/// Moves binary messages into the byte stream and bytes back out as binary messages. When the
/// gateway's side ends, the peer gets a close frame and [`CLOSE_GRACE`] to answer, then the
/// socket is dropped: a peer that never reads or answers cannot keep it open.
async fn bridge<S>(ws: tokio_tungstenite::WebSocketStream<S>, pipe: DuplexStream)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
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
    tokio::pin!(inbound);
    tokio::pin!(outbound);
    tokio::select! {
        () = &mut inbound => {
            // The peer left: the gateway sees the end of the stream and finishes; what it still
            // sends has no one to read it.
            let _ = tokio::time::timeout(CLOSE_GRACE, outbound).await;
        }
        () = &mut outbound => {
            let _ = tokio::time::timeout(CLOSE_GRACE, inbound).await;
        }
    }
}
