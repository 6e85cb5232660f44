//! The fan-out: readings routed to the clients watching their car, by VIN (no scan of every
//! client per reading), each client behind a bounded queue. A client whose queue is full is
//! cut off (the socket closes with [`crate::CLOSE_TOO_SLOW`]) instead of growing memory or
//! slowing anyone else.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use axum::extract::ws::Utf8Bytes;
use ecars_model::connectivity::LiveConnectivityFrame;
use ecars_model::{ConnectivityEvent, TelemetryReading, Vin};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// One reading as the clients get it: serialized once, shared by every client.
#[derive(Clone, Debug)]
pub struct Frame {
    /// The reading's event id (to skip a live frame already sent in the backlog).
    pub event_id: Uuid,
    /// The reading as JSON text.
    pub text: Utf8Bytes,
}

impl Frame {
    /// The frame of a reading.
    pub fn of(reading: &TelemetryReading) -> Frame {
        Frame {
            event_id: reading.event_id,
            text: Utf8Bytes::from(serde_json::to_string(reading).unwrap_or_default()),
        }
    }

    /// The frame of a connectivity change, for clients that asked for them: tagged
    /// `"type": "connectivity"` so it is never taken for a reading.
    pub fn of_connectivity(event: &ConnectivityEvent) -> Frame {
        let frame = LiveConnectivityFrame::of(event);
        Frame {
            event_id: event.event_id,
            text: Utf8Bytes::from(serde_json::to_string(&frame).unwrap_or_default()),
        }
    }
}

struct Client {
    tx: mpsc::Sender<Frame>,
    kicked: CancellationToken,
    /// Whether the client asked for connectivity changes too.
    connectivity: bool,
}

#[derive(Default)]
struct Routes {
    by_vin: HashMap<Vin, HashMap<u64, Client>>,
    fleet: HashMap<u64, Client>,
}

/// Who watches what.
pub struct Hub {
    routes: RwLock<Routes>,
    next_id: AtomicU64,
    queue: usize,
}

/// A client's place in the hub; leaving it (drop) unregisters the client.
pub struct Registration {
    /// Frames for this client.
    pub frames: mpsc::Receiver<Frame>,
    /// Cancelled when the client fell too far behind and was cut off.
    pub kicked: CancellationToken,
    id: u64,
    vins: Option<Vec<Vin>>,
    hub: Arc<Hub>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.remove(self.id, self.vins.as_deref());
    }
}

impl Hub {
    /// A hub whose clients each queue at most `queue` frames.
    pub fn new(queue: usize) -> Arc<Hub> {
        // From the start, so alerts and panels see 0 rather than no series.
        metrics::counter!(crate::metrics::SLOW_CLIENTS).increment(0);
        metrics::gauge!(crate::metrics::CLIENTS).increment(0.0);
        Arc::new(Hub {
            routes: RwLock::default(),
            next_id: AtomicU64::new(1),
            queue: queue.max(1),
        })
    }

    /// Registers a client for these cars (`None`: the whole fleet), with their connectivity
    /// changes if `connectivity`.
    pub fn register(self: &Arc<Self>, vins: Option<Vec<Vin>>, connectivity: bool) -> Registration {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, frames) = mpsc::channel(self.queue);
        let kicked = CancellationToken::new();
        {
            let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
            let client = || Client {
                tx: tx.clone(),
                kicked: kicked.clone(),
                connectivity,
            };
            match &vins {
                None => {
                    routes.fleet.insert(id, client());
                }
                Some(vins) => {
                    for vin in vins {
                        routes
                            .by_vin
                            .entry(vin.clone())
                            .or_default()
                            .insert(id, client());
                    }
                }
            }
        }
        metrics::gauge!(crate::metrics::CLIENTS).increment(1.0);
        Registration {
            frames,
            kicked,
            id,
            vins,
            hub: Arc::clone(self),
        }
    }

    fn remove(&self, id: u64, vins: Option<&[Vin]>) {
        let mut routes = self.routes.write().unwrap_or_else(|e| e.into_inner());
        match vins {
            None => {
                routes.fleet.remove(&id);
            }
            Some(vins) => {
                for vin in vins {
                    if let Some(clients) = routes.by_vin.get_mut(vin) {
                        clients.remove(&id);
                        if clients.is_empty() {
                            routes.by_vin.remove(vin);
                        }
                    }
                }
            }
        }
        metrics::gauge!(crate::metrics::CLIENTS).decrement(1.0);
    }

    /// Hands a reading to every client watching its car; never waits.
    pub fn publish(&self, reading: &TelemetryReading) {
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
        let watchers = routes.by_vin.get(&reading.vin);
        if watchers.is_none_or(HashMap::is_empty) && routes.fleet.is_empty() {
            return;
        }
        let frame = Frame::of(reading);
        let clients = watchers
            .into_iter()
            .flat_map(HashMap::values)
            .chain(routes.fleet.values());
        deliver(clients, &frame);
    }

    /// Hands a connectivity change to every client watching its car that asked for them;
    /// never waits.
    pub fn publish_connectivity(&self, event: &ConnectivityEvent) {
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
        let clients: Vec<&Client> = routes
            .by_vin
            .get(&event.vin)
            .into_iter()
            .flat_map(HashMap::values)
            .chain(routes.fleet.values())
            .filter(|c| c.connectivity)
            .collect();
        if !clients.is_empty() {
            deliver(clients.into_iter(), &Frame::of_connectivity(event));
        }
    }

    /// Clients registered now.
    /// Clients registered now.
    pub fn clients(&self) -> usize {
        let routes = self.routes.read().unwrap_or_else(|e| e.into_inner());
        let mut ids: std::collections::HashSet<u64> = routes.fleet.keys().copied().collect();
        for clients in routes.by_vin.values() {
            ids.extend(clients.keys());
        }
        ids.len()
    }
}

/// Queues `frame` for each of `clients`; a client whose queue is full is cut off.
fn deliver<'a>(clients: impl Iterator<Item = &'a Client>, frame: &Frame) {
    for client in clients {
        match client.tx.try_send(frame.clone()) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                if !client.kicked.is_cancelled() {
                    metrics::counter!(crate::metrics::SLOW_CLIENTS).increment(1);
                    client.kicked.cancel();
                }
            }
            // The client is on its way out.
            Err(TrySendError::Closed(_)) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Utc;
    use ecars_model::Connectivity;

    fn reading(vin: &Vin) -> TelemetryReading {
        TelemetryReading {
            event_id: Uuid::now_v7(),
            received_at: Utc::now(),
            vin: vin.clone(),
            name: None,
            profile: None,
            range: None,
            mpge: None,
            battery: Some(50.0),
            malfunction: None,
            speed: None,
            latitude: None,
            longitude: None,
            date: Utc::now(),
        }
    }

    fn vin(n: u8) -> Vin {
        Vin::parse(&format!("5YJ3E1EA00000000{n}")).unwrap()
    }

    #[test]
    fn a_reading_reaches_its_cars_watchers_and_the_fleet_only() {
        let hub = Hub::new(8);
        let mut one = hub.register(Some(vec![vin(1)]), false);
        let mut two = hub.register(Some(vec![vin(2)]), false);
        let mut both = hub.register(Some(vec![vin(1), vin(2)]), false);
        let mut fleet = hub.register(None, false);
        hub.publish(&reading(&vin(1)));
        assert!(one.frames.try_recv().is_ok());
        assert!(two.frames.try_recv().is_err());
        assert!(both.frames.try_recv().is_ok());
        assert!(fleet.frames.try_recv().is_ok());
        assert_eq!(hub.clients(), 4);
        drop(one);
        assert_eq!(hub.clients(), 3);
    }

    #[test]
    fn connectivity_changes_reach_only_the_clients_that_asked() {
        let hub = Hub::new(8);
        let mut readings_only = hub.register(Some(vec![vin(1)]), false);
        let mut with_connectivity = hub.register(Some(vec![vin(1)]), true);
        let mut other_car = hub.register(Some(vec![vin(2)]), true);
        let mut fleet = hub.register(None, true);
        let event = ConnectivityEvent {
            event_id: Uuid::now_v7(),
            vin: vin(1),
            state: Connectivity::Disconnected,
            reason: Some(ecars_model::DisconnectReason::KeepAliveTimeout),
            session_id: Uuid::now_v7(),
            node: "ingest-0".into(),
            client_id: "c".into(),
            time: Utc::now(),
        };
        hub.publish_connectivity(&event);
        assert!(readings_only.frames.try_recv().is_err());
        assert!(other_car.frames.try_recv().is_err());
        assert!(fleet.frames.try_recv().is_ok());
        let frame = with_connectivity.frames.try_recv().unwrap();
        let json: serde_json::Value = serde_json::from_str(frame.text.as_str()).unwrap();
        assert_eq!(json["type"], "connectivity");
        assert_eq!(json["online"], false);
        assert_eq!(json["reason"], "keep_alive_timeout");
        assert_eq!(json["vin"], vin(1).as_str());
    }

    #[test]
    fn a_client_that_falls_behind_is_cut_off_and_others_are_not() {
        let hub = Hub::new(2);
        let slow = hub.register(Some(vec![vin(1)]), false);
        let mut fast = hub.register(Some(vec![vin(1)]), false);
        for _ in 0..3 {
            hub.publish(&reading(&vin(1)));
            assert!(fast.frames.try_recv().is_ok());
        }
        assert!(slow.kicked.is_cancelled());
        assert!(!fast.kicked.is_cancelled());
    }
}
