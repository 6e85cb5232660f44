//! What every connection of one gateway shares: the bus readings are admitted to, the broker
//! behind it, the device secret, and the registries of client ids (who is connected now, and
//! what persistent sessions left behind).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use bytes::Bytes;
use ecars_bus::Bus;
use ecars_model::device_auth::DeviceSecret;
use ecars_runtime::reloading::Reloading;
use tokio_util::sync::CancellationToken;

use crate::accounts::MqttAccounts;
use crate::codec::{disconnect, disconnect_to, REASON_SERVER_SHUTTING_DOWN};
use crate::retained::RetainedTopics;
use crate::revocation::Revoked;

/// Retained limits where no settings say otherwise (tests): those of `--mqtt-retained-max-bytes`
/// and `--mqtt-retained-max-topics`.
const DEFAULT_RETAINED_BYTES: usize = 4 * 1024;
const DEFAULT_RETAINED_TOPICS: usize = 100_000;
/// The clock skew allowed where no settings say otherwise (tests): that of `--max-clock-skew`.
const DEFAULT_CLOCK_SKEW_MINUTES: i64 = 5;
use ecars_model::{Connectivity, ConnectivityEvent, Vin};

/// Log lines about connectivity events the bus refused: a few per second at most.
static CONNECTIVITY_LOG: ecars_runtime::logging::LogBudget =
    ecars_runtime::logging::LogBudget::per_second(1);

use crate::broker::TelemetryFanout;
use crate::connection::Broker;

/// Most persistent sessions remembered at once, per allowed connection: a client that churns
/// client ids cannot grow the registry without bound (a forgotten session only means its next
/// CONNACK says "no session present").
const SESSIONS_PER_CONNECTION: usize = 4;

/// The gateway in front of the broker.
pub struct Gateway<B> {
    /// The bus readings are admitted to.
    pub bus: Bus,
    /// The broker behind the gateway.
    pub broker: B,
    /// Accepted telemetry on its way to the broker's MQTT subscribers.
    pub fanout: TelemetryFanout,
    /// The device secret; `None` admits anonymous clients.
    pub device_secret: Option<DeviceSecret>,
    /// The longest keep-alive a client gets (a longer one, or none, is cut to it).
    pub max_keep_alive: Option<Duration>,
    /// Service accounts (subscribers that are not cars), where device credentials are on.
    pub accounts: Option<Reloading<MqttAccounts>>,
    /// Revoked cars and certificates.
    pub revoked: Option<Reloading<Revoked>>,
    /// Most PUBLISH packets a second one connection may send before it is held back; `None`:
    /// no limit.
    pub max_publish_rate: Option<u32>,
    /// The topics holding retained messages, and their limits.
    pub retained: RetainedTopics,
    /// How far in the future a reading may be dated (a car's clock running ahead).
    pub max_clock_skew: chrono::TimeDelta,
    /// This ingest node's name in connectivity events.
    pub node: std::sync::Arc<str>,
    /// The DISCONNECT MQTT 5 clients get when this node shuts down: "server shutting down", or
    /// with a server reference, "use another server" and where.
    pub shutdown_farewell: Bytes,
    /// Turns to check an account's password (argon2): one at a time.
    pub password_checks: tokio::sync::Semaphore,
    /// The counters every reading moves, looked up once rather than per reading.
    pub(crate) readings: ReadingCounters,
    connected: Mutex<HashMap<String, Held>>,
    sessions: Mutex<Sessions>,
    registrations: AtomicU64,
}

/// Handles of the per-reading counters ([`crate::metrics`]).
#[derive(Debug)]
pub(crate) struct ReadingCounters {
    /// [`crate::metrics::READINGS_RECEIVED`].
    pub(crate) received: metrics::Counter,
    /// [`crate::metrics::READINGS_ACCEPTED`].
    pub(crate) accepted: metrics::Counter,
}

impl<B> std::fmt::Debug for Gateway<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gateway")
            .field("device_auth", &self.device_secret.is_some())
            .field("max_keep_alive", &self.max_keep_alive)
            .finish_non_exhaustive()
    }
}

/// A connection's hold on its client id.
#[derive(Clone, Debug)]
pub struct Registration {
    id: u64,
    /// Cancelled when another connection takes the client id over.
    pub taken_over: CancellationToken,
}

/// A connected client id: whose connection holds it, and the serial of the certificate that
/// connection presented (so revoking the certificate drops it).
#[derive(Debug)]
struct Held {
    registration: Registration,
    serial: Option<Box<str>>,
}

/// What a persistent session left for its next connection.
#[derive(Debug, Default)]
struct Remembered {
    /// QoS 2 exchanges the gateway answered PUBREC for and awaits PUBREL of.
    releases: HashSet<u16>,
    /// Whether the broker holds a session for the client id (subscriptions, queued messages).
    in_broker: bool,
    /// Age, for evicting the oldest when the registry is full.
    touched: u64,
}

#[derive(Debug, Default)]
struct Sessions {
    by_client: HashMap<String, Remembered>,
    clock: u64,
    cap: usize,
}

/// The state a connection starts with.
#[derive(Debug, Default)]
pub struct SessionState {
    /// Whether a session is present (MQTT's "session present" flag).
    pub present: bool,
    /// QoS 2 exchanges left open.
    pub releases: HashSet<u16>,
    /// Whether the broker holds a session for this client id: the connection opens its link at
    /// once (to resume it, or to discard it on a clean start).
    pub in_broker: bool,
}

impl<B: Broker> Gateway<B> {
    /// A gateway in front of `broker`, admitting readings to `bus`, for at most
    /// `max_connections` clients at once.
    pub fn new(
        bus: Bus,
        broker: B,
        fanout: TelemetryFanout,
        device_secret: Option<DeviceSecret>,
        max_keep_alive: Option<Duration>,
        max_connections: usize,
    ) -> Gateway<B> {
        Gateway {
            bus,
            broker,
            fanout,
            device_secret,
            max_keep_alive,
            accounts: None,
            revoked: None,
            max_publish_rate: None,
            retained: RetainedTopics::new(DEFAULT_RETAINED_BYTES, DEFAULT_RETAINED_TOPICS),
            max_clock_skew: chrono::TimeDelta::minutes(DEFAULT_CLOCK_SKEW_MINUTES),
            node: "ecars".into(),
            shutdown_farewell: disconnect(REASON_SERVER_SHUTTING_DOWN),
            password_checks: tokio::sync::Semaphore::new(1),
            connected: Mutex::default(),
            sessions: Mutex::new(Sessions {
                cap: max_connections
                    .saturating_mul(SESSIONS_PER_CONNECTION)
                    .max(1024),
                ..Sessions::default()
            }),
            registrations: AtomicU64::new(1),
            readings: ReadingCounters {
                received: metrics::counter!(crate::metrics::READINGS_RECEIVED),
                accepted: metrics::counter!(crate::metrics::READINGS_ACCEPTED),
            },
        }
    }

    /// The gateway with these service accounts.
    pub fn with_accounts(mut self, accounts: Option<Reloading<MqttAccounts>>) -> Gateway<B> {
        self.accounts = accounts;
        self
    }

    /// The gateway with this publish rate limit per connection (0: none).
    pub fn with_publish_rate(mut self, per_second: u32) -> Gateway<B> {
        self.max_publish_rate = (per_second > 0).then_some(per_second);
        self
    }

    /// The gateway with these retained limits.
    pub fn with_retained_limits(mut self, max_bytes: usize, max_topics: usize) -> Gateway<B> {
        self.retained = RetainedTopics::new(max_bytes, max_topics);
        self
    }

    /// The gateway allowing readings dated up to `skew` after they arrive.
    pub fn with_max_clock_skew(mut self, skew: Duration) -> Gateway<B> {
        self.max_clock_skew = chrono::TimeDelta::from_std(skew).unwrap_or(chrono::TimeDelta::MAX);
        self
    }

    /// The gateway naming itself `node` in connectivity events.
    pub fn with_node(mut self, node: &str) -> Gateway<B> {
        self.node = node.into();
        self
    }

    /// Sends MQTT 5 clients to `reference` when this node shuts down.
    pub fn with_server_reference(mut self, reference: Option<String>) -> Gateway<B> {
        if let Some(reference) = reference {
            self.shutdown_farewell = disconnect_to(&reference);
        }
        self
    }

    /// Publishes a car's connectivity event; counted, and where the bus refuses (it is
    /// closing, or nobody reads the stream) logged at a bounded rate, never fatal to the
    /// connection.
    pub async fn announce(&self, event: ConnectivityEvent) {
        let state = match event.state {
            Connectivity::Connected => "connected",
            Connectivity::Disconnected => "disconnected",
        };
        match self.bus.publish(event).await {
            Ok(()) => {
                metrics::counter!(crate::metrics::CONNECTIVITY_EVENTS, "state" => state)
                    .increment(1);
            }
            Err(error) => {
                metrics::counter!(crate::metrics::CONNECTIVITY_EVENTS_FAILED, "state" => state)
                    .increment(1);
                if CONNECTIVITY_LOG.allow() {
                    if matches!(error, ecars_bus::BusError::Closed) {
                        // In `ecars up` the bus closes before the sessions end at shutdown
                        // (their last readings are committed first); the next start ends them.
                        tracing::info!(
                            state,
                            "the bus closed before this event: the next start of this node ends the session"
                        );
                    } else {
                        tracing::warn!(%error, state, "a connectivity event was not published");
                    }
                }
            }
        }
    }

    /// The gateway with these revocations.
    pub fn with_revoked(mut self, revoked: Option<Reloading<Revoked>>) -> Gateway<B> {
        self.revoked = revoked;
        self
    }

    /// Whether the car is revoked.
    pub fn is_revoked(&self, vin: &Vin) -> bool {
        self.revoked.as_ref().is_some_and(|r| r.current().vin(vin))
    }

    /// Ends the connections of the cars `revoked` names (a car's client ids start with its
    /// VIN) and of those that presented a revoked certificate; returns how many. Each ends as
    /// revoked ([`crate::connection::Ended::Revoked`]).
    pub fn drop_revoked(&self, revoked: &Revoked) -> usize {
        self.drop_where(|_, car, serial| {
            car.is_some_and(|vin| revoked.vin(vin)) || serial.is_some_and(|s| revoked.serial(s))
        })
    }

    /// Whether the connection holding `registration` is still to be served: its car, or the
    /// certificate it presented, was not revoked since.
    pub fn is_registration_revoked(&self, client_id: &str, registration: &Registration) -> bool {
        let Some(revoked) = &self.revoked else {
            return false;
        };
        let revoked = revoked.current();
        let connected = self.connected.lock().unwrap_or_else(|p| p.into_inner());
        connected
            .get(client_id)
            .filter(|held| held.registration.id == registration.id)
            .and_then(|held| held.serial.as_deref())
            .is_some_and(|serial| revoked.serial(serial))
    }

    /// Whether the service account still exists (it was not removed from the file).
    pub fn has_account(&self, name: &str) -> bool {
        self.accounts
            .as_ref()
            .is_some_and(|a| a.current().get(name).is_some())
    }

    /// Ends the connections of service accounts no longer in `accounts` (a client id that is
    /// no car's and no current account's); returns how many. Each ends as revoked.
    pub fn drop_removed_accounts(&self, accounts: &MqttAccounts) -> usize {
        self.drop_where(|client_id, car, _| car.is_none() && !accounts.owns_client_id(client_id))
    }

    /// Ends the connections that `drop` picks by client id, by the VIN it starts with (a
    /// car's) and by the serial of the certificate presented; returns how many. The connection
    /// asks the gateway why when it ends.
    fn drop_where(&self, drop: impl Fn(&str, Option<&Vin>, Option<&str>) -> bool) -> usize {
        let connected = self.connected.lock().unwrap_or_else(|p| p.into_inner());
        let mut dropped = 0;
        for (client_id, held) in connected.iter() {
            let car = client_id
                .get(..17)
                .and_then(|prefix| Vin::parse(prefix).ok());
            if drop(client_id, car.as_ref(), held.serial.as_deref()) {
                held.registration.taken_over.cancel();
                dropped += 1;
            }
        }
        dropped
    }

    /// Registers a connection of `client_id` (that presented the certificate with `serial`, if
    /// any); an earlier connection with that client id is told it was taken over (MQTT: the
    /// server disconnects the existing client).
    pub fn register(&self, client_id: &str, serial: Option<Box<str>>) -> Registration {
        let registration = Registration {
            id: self.registrations.fetch_add(1, Ordering::Relaxed),
            taken_over: CancellationToken::new(),
        };
        let previous = self
            .connected
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                client_id.to_owned(),
                Held {
                    registration: registration.clone(),
                    serial,
                },
            );
        if let Some(previous) = previous {
            previous.registration.taken_over.cancel();
        }
        registration
    }

    /// Ends a connection's hold on its client id (unless another connection took it over).
    pub fn deregister(&self, client_id: &str, registration: &Registration) {
        let mut connected = self.connected.lock().unwrap_or_else(|p| p.into_inner());
        if connected.get(client_id).map(|held| held.registration.id) == Some(registration.id) {
            connected.remove(client_id);
        }
    }

    /// The state a connection of `client_id` starts with: a clean session forgets what the
    /// last one left (but still learns whether the broker must discard a session).
    pub fn session_state(&self, client_id: &str, clean_session: bool) -> SessionState {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if clean_session {
            let old = sessions.by_client.remove(client_id);
            return SessionState {
                present: false,
                releases: HashSet::new(),
                in_broker: old.is_some_and(|r| r.in_broker),
            };
        }
        sessions.clock += 1;
        let clock = sessions.clock;
        match sessions.by_client.get_mut(client_id) {
            Some(remembered) => {
                remembered.touched = clock;
                SessionState {
                    present: true,
                    releases: std::mem::take(&mut remembered.releases),
                    in_broker: remembered.in_broker,
                }
            }
            None => {
                sessions.insert(
                    client_id,
                    Remembered {
                        touched: clock,
                        ..Remembered::default()
                    },
                );
                SessionState::default()
            }
        }
    }

    /// Keeps a leaving persistent session's open QoS 2 exchanges for its next connection.
    pub fn keep_session(&self, client_id: &str, releases: HashSet<u16>) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.clock += 1;
        let clock = sessions.clock;
        let entry = sessions.entry(client_id, clock);
        entry.releases = releases;
    }

    /// Notes that the broker holds a persistent session for `client_id`.
    pub fn note_broker_session(&self, client_id: &str) {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.clock += 1;
        let clock = sessions.clock;
        sessions.entry(client_id, clock).in_broker = true;
    }
}

impl Sessions {
    fn insert(&mut self, client_id: &str, remembered: Remembered) {
        if self.by_client.len() >= self.cap {
            self.evict();
        }
        self.by_client.insert(client_id.to_owned(), remembered);
    }

    fn entry(&mut self, client_id: &str, clock: u64) -> &mut Remembered {
        if !self.by_client.contains_key(client_id) {
            self.insert(client_id, Remembered::default());
        }
        let entry = self.by_client.entry(client_id.to_owned()).or_default();
        entry.touched = clock;
        entry
    }

    /// Forgets the oldest tenth of the sessions the broker does not hold.
    fn evict(&mut self) {
        let mut ages: Vec<u64> = self
            .by_client
            .values()
            .filter(|r| !r.in_broker)
            .map(|r| r.touched)
            .collect();
        if ages.is_empty() {
            return;
        }
        ages.sort_unstable();
        let cutoff = ages[(ages.len() / 10).min(ages.len() - 1)];
        self.by_client
            .retain(|_, r| r.in_broker || r.touched > cutoff);
        tracing::warn!(
            kept = self.by_client.len(),
            "persistent MQTT sessions over their bound; the oldest were forgotten"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sessions(cap: usize) -> Sessions {
        Sessions {
            cap,
            ..Sessions::default()
        }
    }

    #[test]
    fn the_session_registry_stays_bounded_and_forgets_the_oldest() {
        let mut s = sessions(100);
        for n in 0..1000u64 {
            s.clock += 1;
            let clock = s.clock;
            s.insert(
                &format!("car-{n}"),
                Remembered {
                    touched: clock,
                    ..Remembered::default()
                },
            );
            assert!(s.by_client.len() <= 100);
        }
        assert!(s.by_client.contains_key("car-999"), "the newest stay");
        assert!(!s.by_client.contains_key("car-0"), "the oldest go");
    }
}
