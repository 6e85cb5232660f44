//! The verdict on a PUBLISH, without I/O: telemetry is validated into a reading or refused into
//! a dead letter; anything else is the broker's business.

use chrono::{DateTime, Utc};
use ecars_model::telemetry::{
    check_date_not_in_future, parse_reading, DeadLetter, RejectReason, Rejection, TelemetryReading,
    TelemetryTopic,
};
use uuid::Uuid;

use crate::authorization::Identity;
use crate::codec::{PublishView, REASON_NOT_AUTHORIZED, REASON_PAYLOAD_FORMAT_INVALID};

/// What the gateway does with a PUBLISH.
// A verdict lives for one packet on the stack; boxing the reading would cost an allocation per
// reading for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Verdict {
    /// Not telemetry: the broker handles it.
    Forward,
    /// A valid reading: publish it on the bus, then acknowledge it.
    Accepted(TelemetryReading),
    /// A refused reading: dead-letter it, then acknowledge it (with the MQTT 5 reason code), so
    /// the car does not send again what can never pass.
    Rejected {
        /// The refused message with its bytes and reason.
        letter: DeadLetter,
        /// MQTT 5 reason code of the acknowledgement.
        reason_code: u8,
    },
}

/// Judges a PUBLISH of `client_id`, authenticated as `identity` (when clients log in),
/// received at `received_at`. Only a car may publish telemetry, and only its own; a reading
/// dated more than `max_clock_skew` after `received_at` is refused.
pub fn judge(
    publish: &PublishView,
    client_id: &str,
    identity: Option<&Identity>,
    received_at: DateTime<Utc>,
    max_clock_skew: chrono::TimeDelta,
) -> Verdict {
    let Some(topic) = TelemetryTopic::classify(&publish.topic) else {
        return Verdict::Forward;
    };
    let verdict =
        parse_reading(&topic, &publish.payload, Uuid::now_v7(), received_at).and_then(|reading| {
            match identity {
                Some(Identity::Car(own)) if *own != reading.vin => Err(Rejection {
                    reason: RejectReason::UnauthorizedVin,
                    detail: format!(
                        "client authenticated as {own} published for {}",
                        reading.vin
                    ),
                }),
                Some(Identity::Account(account)) => Err(Rejection {
                    reason: RejectReason::UnauthorizedVin,
                    detail: format!(
                        "service account {} published for {}: only cars publish telemetry",
                        account.name, reading.vin
                    ),
                }),
                _ => check_date_not_in_future(&reading, max_clock_skew).map(|()| reading),
            }
        });
    match verdict {
        Ok(reading) => Verdict::Accepted(reading),
        Err(rejection) => {
            let reason_code = if rejection.reason == RejectReason::UnauthorizedVin {
                REASON_NOT_AUTHORIZED
            } else {
                REASON_PAYLOAD_FORMAT_INVALID
            };
            Verdict::Rejected {
                letter: DeadLetter::new(
                    &publish.topic,
                    client_id,
                    rejection,
                    &publish.payload,
                    received_at,
                ),
                reason_code,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use bytes::{BufMut, BytesMut};
    use rumqttd::protocol::v4::check;

    use super::*;
    use crate::codec::{parse_publish, Version, MAX_PACKET_BYTES};

    fn publish(topic: &str, payload: &str) -> PublishView {
        let mut frame = BytesMut::new();
        frame.put_u8(0x32);
        frame.put_u8((2 + topic.len() + 2 + payload.len()) as u8);
        frame.put_u16(topic.len() as u16);
        frame.put_slice(topic.as_bytes());
        frame.put_u16(1);
        frame.put_slice(payload.as_bytes());
        let header = check(frame.iter(), MAX_PACKET_BYTES).unwrap();
        parse_publish(&header, &frame.freeze(), Version::V4).unwrap()
    }

    fn judge_now(
        publish: &PublishView,
        client_id: &str,
        identity: Option<&Identity>,
        received_at: DateTime<Utc>,
    ) -> Verdict {
        judge(
            publish,
            client_id,
            identity,
            received_at,
            chrono::TimeDelta::minutes(5),
        )
    }

    #[test]
    fn telemetry_is_admitted_refused_or_left_to_the_broker() {
        let vin = ecars_model::Vin::parse("1HGCM82633A004352").unwrap();
        let car = Identity::Car(vin.clone());
        let now = Utc::now();
        let topic = format!("vehicles/{vin}/telemetry");
        assert!(matches!(
            judge_now(&publish(&topic, r#"{"battery":50}"#), "car", Some(&car), now),
            Verdict::Accepted(r) if r.vin == vin && r.battery == Some(50.0)
        ));
        assert!(matches!(
            judge_now(&publish(&topic, r#"{"battery":150}"#), "car", Some(&car), now),
            Verdict::Rejected { reason_code: 0x99, letter } if letter.reason == RejectReason::BatteryOutOfRange
        ));
        let other = "vehicles/2HGCM82633A004352/telemetry";
        assert!(matches!(
            judge_now(&publish(other, "{}"), "car", Some(&car), now),
            Verdict::Rejected { reason_code: 0x87, letter } if letter.reason == RejectReason::UnauthorizedVin
        ));
        assert!(matches!(
            judge_now(&publish("fleet/notices", "hello"), "car", Some(&car), now),
            Verdict::Forward
        ));
        let from_next_year = format!(
            r#"{{"date":"{}"}}"#,
            (now + chrono::TimeDelta::days(365)).to_rfc3339()
        );
        assert!(matches!(
            judge_now(&publish(&topic, &from_next_year), "car", Some(&car), now),
            Verdict::Rejected { reason_code: 0x99, letter } if letter.reason == RejectReason::DateInFuture
        ));
    }
}
