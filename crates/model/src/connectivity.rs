//! Connectivity events: a car connected or disconnected, and why. Ingest emits one `connected`
//! when it accepts a car's CONNECT and one `disconnected` when that connection ends, on the
//! `connectivity` stream (Kafka `ecars.connectivity`, key = VIN).
//!
//! Events of one car can arrive out of order: a car that drops off node A and reconnects to
//! node B may be `connected` on B before A notices the old connection's end. Each connection is
//! a session with a time-ordered id (UUIDv7, taken when the CONNECT is accepted), and the state
//! a car is in follows the newest session, not the newest arrival
//! ([`ConnectivityEvent::supersedes`]).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::Vin;

/// Connected or not.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum Connectivity {
    /// The car's CONNECT was accepted.
    Connected,
    /// The car's connection ended.
    Disconnected,
}

/// Why a car's connection ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum DisconnectReason {
    /// The car sent DISCONNECT, or closed its socket between packets.
    ClientDisconnect,
    /// The car was silent for one and a half keep-alives.
    KeepAliveTimeout,
    /// The socket failed (reset, broken pipe), or the broker link behind it.
    ConnectionError,
    /// A newer connection with the car's client id took the session over.
    TakenOver,
    /// The ingest node shut down, or crashed and reported the end when it started again.
    ServerShutdown,
    /// The car, or the certificate it connected with, was revoked.
    Revoked,
    /// The car broke the MQTT protocol and was disconnected.
    ProtocolViolation,
}

impl DisconnectReason {
    /// The stable snake_case code (as in the JSON).
    pub fn code(self) -> &'static str {
        match self {
            DisconnectReason::ClientDisconnect => "client_disconnect",
            DisconnectReason::KeepAliveTimeout => "keep_alive_timeout",
            DisconnectReason::ConnectionError => "connection_error",
            DisconnectReason::TakenOver => "taken_over",
            DisconnectReason::ServerShutdown => "server_shutdown",
            DisconnectReason::Revoked => "revoked",
            DisconnectReason::ProtocolViolation => "protocol_violation",
        }
    }
}

/// A car connected or disconnected.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ConnectivityEvent {
    /// Unique id of the event (UUIDv7), the idempotence key.
    pub event_id: Uuid,
    /// The car.
    pub vin: Vin,
    /// What happened.
    pub state: Connectivity,
    /// Why the connection ended (`disconnected` only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<DisconnectReason>,
    /// The connection (UUIDv7 taken when its CONNECT was accepted): both events of one
    /// connection carry it, and a later connection has a greater one.
    pub session_id: Uuid,
    /// The ingest node that served the connection (`ECARS_NODE_ID`).
    pub node: String,
    /// The MQTT client id of the connection; empty in the `disconnected` event a restarted
    /// node sends for a session it left open when it crashed (the id was not kept).
    pub client_id: String,
    /// When it happened.
    pub time: DateTime<Utc>,
}

impl ConnectivityEvent {
    /// Whether this event decides the car's state over the one decided by `current` (the
    /// session and state last applied): a newer session always does; within one session,
    /// only its end does (so a `connected` arriving after its own `disconnected` changes
    /// nothing); an older session never does.
    pub fn supersedes(&self, current: Option<(Uuid, Connectivity)>) -> bool {
        match current {
            None => true,
            Some((session, state)) => {
                self.session_id > session
                    || (self.session_id == session
                        && self.state == Connectivity::Disconnected
                        && state == Connectivity::Connected)
            }
        }
    }
}

/// A connectivity change as the live relay sends it to a WebSocket client that asked for them
/// (`?connectivity=true`), beside the readings: tagged `"type": "connectivity"`, which no
/// reading has, so a client tells the two apart.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct LiveConnectivityFrame {
    /// Always `connectivity`.
    #[serde(rename = "type")]
    pub kind: LiveFrameKind,
    /// The car.
    pub vin: Vin,
    /// Connected now.
    pub online: bool,
    /// Why the connection ended (`null` while online).
    pub reason: Option<DisconnectReason>,
    /// The connection the change belongs to (UUIDv7; a later connection has a greater one).
    pub session_id: Uuid,
    /// The ingest node that served the connection.
    pub node: String,
    /// When it happened.
    pub time: DateTime<Utc>,
}

/// The tag of a live connectivity frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum LiveFrameKind {
    /// A connectivity change.
    Connectivity,
}

impl LiveConnectivityFrame {
    /// The frame of a connectivity event.
    pub fn of(event: &ConnectivityEvent) -> LiveConnectivityFrame {
        LiveConnectivityFrame {
            kind: LiveFrameKind::Connectivity,
            vin: event.vin.clone(),
            online: event.state == Connectivity::Connected,
            reason: event.reason,
            session_id: event.session_id,
            node: event.node.clone(),
            time: event.time,
        }
    }
}

impl crate::Record for ConnectivityEvent {
    const STREAM: &'static str = "connectivity";
    const TOPIC: &'static str = "connectivity";
    const EVENT_TYPE: &'static str = "com.ecars.connectivity.v1";
    const SOURCE: &'static str = "urn:ecars:ingest";
    const KEY: &'static str = "VIN (each car's connections in order in one partition)";

    fn key(&self) -> &str {
        self.vin.as_str()
    }

    fn id(&self) -> Uuid {
        self.event_id
    }

    fn time(&self) -> DateTime<Utc> {
        self.time
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(session: Uuid, state: Connectivity) -> ConnectivityEvent {
        ConnectivityEvent {
            event_id: Uuid::now_v7(),
            vin: Vin::parse("1HGCM82633A004352").unwrap(),
            state,
            reason: (state == Connectivity::Disconnected).then_some(DisconnectReason::TakenOver),
            session_id: session,
            node: "a".into(),
            client_id: "1HGCM82633A004352".into(),
            time: Utc::now(),
        }
    }

    /// Applies events in arrival order the way the state table does.
    fn apply(events: &[ConnectivityEvent]) -> Option<(Uuid, Connectivity)> {
        let mut current = None;
        for e in events {
            if e.supersedes(current) {
                current = Some((e.session_id, e.state));
            }
        }
        current
    }

    #[test]
    fn the_newest_session_decides_whatever_the_arrival_order() {
        use Connectivity::*;
        let (old, new) = (Uuid::now_v7(), Uuid::now_v7());
        assert!(new > old, "UUIDv7 ids are time-ordered");
        // Reconnected through node B before node A noticed the old connection's end.
        let online = [
            event(old, Connected),
            event(new, Connected),
            event(old, Disconnected),
        ];
        assert_eq!(apply(&online), Some((new, Connected)));
        // Every arrival order of the four events ends in the same state.
        let all = [
            event(old, Connected),
            event(old, Disconnected),
            event(new, Connected),
            event(new, Disconnected),
        ];
        let orders = [
            [0, 1, 2, 3],
            [3, 2, 1, 0],
            [2, 0, 3, 1],
            [1, 3, 0, 2],
            [2, 3, 1, 0],
        ];
        for order in orders {
            let events: Vec<_> = order.iter().map(|&i| all[i].clone()).collect();
            assert_eq!(apply(&events), Some((new, Disconnected)), "{order:?}");
        }
        // A session's `connected` after its own `disconnected` leaves it offline.
        assert_eq!(
            apply(&[event(old, Disconnected), event(old, Connected)]),
            Some((old, Disconnected))
        );
    }
}
