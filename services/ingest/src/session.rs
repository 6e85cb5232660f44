//! The protocol state of one MQTT connection, without I/O: the keep-alive clock, the answers
//! owed to the client in the order its packets came, and the QoS 2 exchanges the gateway holds.
//!
//! MQTT wants acknowledgements in the order of the packets they answer (3.1.1 §4.6, 5 §4.6), and
//! the gateway answers some packets itself at once (PINGREQ), some once the bus has a reading
//! (PUBLISH of telemetry), and passes some to the broker, which answers later (SUBSCRIBE). Each
//! packet that needs an answer takes a slot in [`Answers`]; the answers leave when every slot
//! before theirs is filled.

use std::collections::{HashSet, VecDeque};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::time::Instant;

use crate::codec::PacketType;

/// The keep-alive of a connection: MQTT's "one and a half times the keep-alive" of silence
/// closes it (3.1.1 §3.1.2.10, 5 §3.1.2.10). Any packet from the client counts as activity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeepAlive {
    /// The interval in force; `None` is "off" (the client sent 0 and no cap applies).
    interval: Option<Duration>,
}

/// The keep-alive both sides agreed on at CONNECT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// What the gateway enforces.
    pub keep_alive: KeepAlive,
    /// MQTT 5: the Server Keep Alive to announce in CONNACK, when it differs from the client's.
    pub server_keep_alive: Option<u16>,
}

impl KeepAlive {
    /// The keep-alive for a client that asked for `requested` seconds (0: off), with `cap` the
    /// longest the server allows: a longer or absent keep-alive is cut to the cap (MQTT 5 tells
    /// the client so; MQTT 3.1.1 has no way to, and the cap applies all the same).
    pub fn negotiate(requested: u16, cap: Option<Duration>) -> Negotiated {
        let requested_interval = (requested > 0).then(|| Duration::from_secs(u64::from(requested)));
        let interval = match (requested_interval, cap) {
            (Some(asked), Some(cap)) => Some(asked.min(cap)),
            (None, Some(cap)) => Some(cap),
            (asked, None) => asked,
        };
        let server_keep_alive = match interval {
            Some(interval) if Some(interval) != requested_interval => {
                Some(u16::try_from(interval.as_secs()).unwrap_or(u16::MAX))
            }
            _ => None,
        };
        Negotiated {
            keep_alive: KeepAlive { interval },
            server_keep_alive,
        }
    }

    /// The interval in force.
    pub fn interval(&self) -> Option<Duration> {
        self.interval
    }

    /// When a client last heard at `last_activity` is closed for silence; `None` never.
    pub fn deadline(&self, last_activity: Instant) -> Option<Instant> {
        self.interval
            .map(|interval| last_activity + interval + interval / 2)
    }
}

/// What an answer slot waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Awaited {
    /// A bus publish (a reading or a dead letter), by its place in the connection's order.
    Bus(u64),
    /// The broker's answer of this kind to this packet id (SUBACK, UNSUBACK, PUBACK, PUBREC,
    /// PUBCOMP of a packet the gateway passed on).
    Broker(PacketType, u16),
}

#[derive(Debug)]
enum Slot {
    Ready(Bytes),
    Waiting(Awaited),
}

/// Answers owed to the client, in the order of the packets they answer.
#[derive(Debug, Default)]
pub struct Answers {
    slots: VecDeque<Slot>,
    /// Numbers bus publishes in the order they were made.
    next_bus: u64,
}

impl Answers {
    /// An answer that is ready now (PINGRESP, PUBCOMP of a release the gateway holds).
    pub fn ready(&mut self, packet: Bytes) {
        self.slots.push_back(Slot::Ready(packet));
    }

    /// A slot for a bus publish; returns its number, for [`Answers::bus_done`].
    pub fn await_bus(&mut self) -> u64 {
        let n = self.next_bus;
        self.next_bus += 1;
        self.slots.push_back(Slot::Waiting(Awaited::Bus(n)));
        n
    }

    /// A slot for the broker's answer to a packet passed on.
    pub fn await_broker(&mut self, kind: PacketType, pkid: u16) {
        self.slots
            .push_back(Slot::Waiting(Awaited::Broker(kind, pkid)));
    }

    /// Fills a bus slot with its answer (nothing to send for QoS 0: `None`).
    pub fn bus_done(&mut self, n: u64, answer: Option<Bytes>) {
        self.fill(Awaited::Bus(n), answer);
    }

    /// Fills the slot of a broker answer; false when no slot waits for it (the broker answers a
    /// packet the gateway did not pass on: a PUBLISH to the client is no answer).
    pub fn broker_answered(&mut self, kind: PacketType, pkid: u16, frame: Bytes) -> bool {
        self.fill(Awaited::Broker(kind, pkid), Some(frame))
    }

    fn fill(&mut self, awaited: Awaited, answer: Option<Bytes>) -> bool {
        let Some(index) = self
            .slots
            .iter()
            .position(|slot| matches!(slot, Slot::Waiting(w) if *w == awaited))
        else {
            return false;
        };
        match answer {
            Some(bytes) => self.slots[index] = Slot::Ready(bytes),
            None => self.slots[index] = Slot::Ready(Bytes::new()),
        }
        true
    }

    /// Moves every answer that may leave now (the ready ones before the first waiting slot)
    /// into `out`.
    pub fn take_ready(&mut self, out: &mut BytesMut) {
        while let Some(Slot::Ready(_)) = self.slots.front() {
            if let Some(Slot::Ready(bytes)) = self.slots.pop_front() {
                out.extend_from_slice(&bytes);
            }
        }
    }

    /// Whether answers wait on the broker (the connection must not close its link yet).
    pub fn waits_for_broker(&self) -> bool {
        self.slots
            .iter()
            .any(|slot| matches!(slot, Slot::Waiting(Awaited::Broker(..))))
    }

    /// Whether nothing is owed.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }
}

/// QoS 2 packet ids the gateway acknowledged itself (PUBREC) and whose PUBREL it must answer,
/// because the broker never saw those PUBLISHes.
#[derive(Debug, Default)]
pub struct Releases {
    held: HashSet<u16>,
}

impl Releases {
    /// Restores the ids a persistent session left at its last connection.
    pub fn restored(held: HashSet<u16>) -> Releases {
        Releases { held }
    }

    /// The gateway sent PUBREC for `pkid`.
    pub fn hold(&mut self, pkid: u16) {
        self.held.insert(pkid);
    }

    /// A PUBREL for `pkid` came: true when the gateway holds it (and answers PUBCOMP itself).
    pub fn release(&mut self, pkid: u16) -> bool {
        self.held.remove(&pkid)
    }

    /// The ids still held, for the session's next connection.
    pub fn into_held(self) -> HashSet<u16> {
        self.held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keep_alive_follows_the_client_within_the_cap() {
        let cap = Some(Duration::from_secs(600));
        let n = KeepAlive::negotiate(60, cap);
        assert_eq!(n.keep_alive.interval(), Some(Duration::from_secs(60)));
        assert_eq!(n.server_keep_alive, None, "the client's own value stands");
        let n = KeepAlive::negotiate(3600, cap);
        assert_eq!(n.keep_alive.interval(), Some(Duration::from_secs(600)));
        assert_eq!(n.server_keep_alive, Some(600));
        let n = KeepAlive::negotiate(0, cap);
        assert_eq!(n.keep_alive.interval(), Some(Duration::from_secs(600)));
        assert_eq!(n.server_keep_alive, Some(600), "0 is capped too");
        let off = KeepAlive::negotiate(0, None);
        assert_eq!(off.keep_alive.interval(), None);
        assert_eq!(off.keep_alive.deadline(Instant::now()), None);
    }

    #[test]
    fn silence_closes_at_one_and_a_half_keep_alives() {
        let n = KeepAlive::negotiate(2, None);
        let now = Instant::now();
        assert_eq!(
            n.keep_alive.deadline(now),
            Some(now + Duration::from_secs(3))
        );
    }

    #[test]
    fn answers_leave_in_packet_order_whoever_answers_first() {
        let mut answers = Answers::default();
        let mut out = BytesMut::new();
        // SUBSCRIBE (broker), PINGREQ (gateway), telemetry (bus).
        answers.await_broker(PacketType::SubAck, 1);
        answers.ready(Bytes::from_static(b"PINGRESP"));
        let reading = answers.await_bus();
        answers.bus_done(reading, Some(Bytes::from_static(b"PUBACK")));
        answers.take_ready(&mut out);
        assert!(out.is_empty(), "the SUBACK comes first");
        assert!(answers.waits_for_broker());
        assert!(!answers.broker_answered(PacketType::SubAck, 2, Bytes::new()));
        assert!(answers.broker_answered(PacketType::SubAck, 1, Bytes::from_static(b"SUBACK")));
        answers.take_ready(&mut out);
        assert_eq!(out.as_ref(), b"SUBACKPINGRESPPUBACK");
        assert!(answers.is_empty());
    }

    #[test]
    fn bus_answers_may_complete_out_of_order_and_still_leave_in_order() {
        let mut answers = Answers::default();
        let mut out = BytesMut::new();
        let a = answers.await_bus();
        let b = answers.await_bus();
        let c = answers.await_bus();
        answers.bus_done(b, Some(Bytes::from_static(b"b")));
        answers.bus_done(c, None);
        answers.take_ready(&mut out);
        assert!(out.is_empty());
        answers.bus_done(a, Some(Bytes::from_static(b"a")));
        answers.take_ready(&mut out);
        assert_eq!(out.as_ref(), b"ab");
        assert!(answers.is_empty());
    }

    #[test]
    fn releases_are_kept_across_connections() {
        let mut releases = Releases::default();
        releases.hold(7);
        let kept = releases.into_held();
        let mut next = Releases::restored(kept);
        assert!(next.release(7));
        assert!(!next.release(7), "once");
        assert!(!next.release(8));
    }
}

/// A connection's publish rate limit: a token bucket of `per_second` tokens a second holding at
/// most `per_second` (one second's burst). A PUBLISH over it is not dropped: it is handled, and
/// the gateway then reads nothing more from the connection until the bucket has paid for it, so
/// the car is slowed by TCP backpressure.
#[derive(Clone, Debug)]
pub struct PublishThrottle {
    per_second: f64,
    tokens: f64,
    updated: Instant,
    /// Reading resumes at this time.
    resume_at: Option<Instant>,
}

impl PublishThrottle {
    /// A full bucket of `per_second` publishes a second.
    pub fn new(per_second: u32, now: Instant) -> PublishThrottle {
        let per_second = f64::from(per_second.max(1));
        PublishThrottle {
            per_second,
            tokens: per_second,
            updated: now,
            resume_at: None,
        }
    }

    /// Pays for one PUBLISH at `now`; returns `true` when this one starts a pause (the caller
    /// counts it).
    pub fn publish(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.per_second);
        self.updated = now;
        self.tokens -= 1.0;
        if self.tokens >= 0.0 {
            return false;
        }
        let pausing = self.resume_at.is_none();
        self.resume_at = Some(now + Duration::from_secs_f64(-self.tokens / self.per_second));
        pausing
    }

    /// When reading may resume, while paused.
    pub fn resume_at(&self) -> Option<Instant> {
        self.resume_at
    }

    /// Ends the pause once its time has come; returns whether reading may go on.
    pub fn resume(&mut self, now: Instant) -> bool {
        match self.resume_at {
            Some(at) if now < at => false,
            _ => {
                self.resume_at = None;
                true
            }
        }
    }
}

#[cfg(test)]
mod throttle_tests {
    use super::*;

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let start = Instant::now();
        let mut throttle = PublishThrottle::new(10, start);
        for _ in 0..10 {
            assert!(!throttle.publish(start), "the first second's worth passes");
        }
        assert_eq!(throttle.resume_at(), None);
        assert!(
            throttle.publish(start),
            "the eleventh pauses the connection"
        );
        let resume = throttle.resume_at().unwrap();
        assert_eq!(resume - start, Duration::from_millis(100));
        assert!(!throttle.resume(start + Duration::from_millis(50)));
        assert!(throttle.resume(resume));
        // A second later the bucket is full again, never fuller.
        let later = start + Duration::from_secs(5);
        for _ in 0..10 {
            assert!(!throttle.publish(later));
        }
        assert!(throttle.publish(later));
    }
}
