//! The anomaly contract: what the anomaly worker publishes for other services. On the anomalies
//! stream (Kafka topic `{prefix}anomalies`), one event per change of an episode; on the cases
//! stream (`{prefix}cases`), one event per change of its Salesforce Case's sync.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::telemetry::Vin;

/// What happened to an episode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum AnomalyChange {
    /// A rule fired outside any open episode: a new Case is on its way.
    Opened,
    /// The rule fired again inside the episode.
    Updated,
    /// The rule stayed quiet for the quiet period.
    Closed,
}

impl AnomalyChange {
    /// The change as it is serialized and labelled in metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            AnomalyChange::Opened => "opened",
            AnomalyChange::Updated => "updated",
            AnomalyChange::Closed => "closed",
        }
    }
}

/// One change of an anomaly episode of one car.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AnomalyEvent {
    /// Id of this event: the same episode version always gets the same id, so a republished
    /// event is recognisably the same (CloudEvents `ce_id`).
    pub event_id: Uuid,
    /// The episode's key, `{VIN}-{rule}-{episode start}`: the Salesforce Case's
    /// `Ecars_Anomaly_Key__c`.
    pub key: String,
    /// The car.
    pub vin: Vin,
    /// The rule (`battery_drain`, `malfunction_reported`, `battery_critical`,
    /// `telemetry_silent`).
    pub rule: String,
    /// What happened.
    pub change: AnomalyChange,
    /// Version of the episode's Case fields this event reflects (grows by one per change).
    pub version: i64,
    /// Event time of the first firing.
    pub started_at: DateTime<Utc>,
    /// When the episode closed, once closed.
    pub closed_at: Option<DateTime<Utc>>,
    /// Firings so far.
    pub firings: u64,
    /// The Case subject.
    pub subject: String,
    /// The Case priority.
    pub priority: String,
    /// When the worker recorded this change.
    pub recorded_at: DateTime<Utc>,
}

impl AnomalyEvent {
    /// The event id of an episode version (UUIDv8 of SHA-256 of key and version).
    pub fn id_for(key: &str, version: i64) -> Uuid {
        derived_id(b"", key, version)
    }
}

/// A UUIDv8 from SHA-256 of a domain, a key and a number: the same inputs, the same id.
fn derived_id(domain: &[u8], key: &str, number: i64) -> Uuid {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(domain)
        .chain_update(key.as_bytes())
        .chain_update(number.to_be_bytes())
        .finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_custom_bytes(bytes).into_uuid()
}

/// What happened to an episode's Salesforce Case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum CaseChange {
    /// Salesforce has the Case for the first time: `salesforce_id` is its Id.
    Created,
    /// Salesforce took a newer version of the Case's fields.
    Updated,
    /// Salesforce refused the Case for good (a permanent error, in `error`); it stays in the
    /// outbox for a person (`ecars cases retry KEY`).
    Failed,
}

/// One change of the Salesforce sync of an episode's Case.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct CaseEvent {
    /// Id of this event: the same change always gets the same id (CloudEvents `ce_id`).
    pub event_id: Uuid,
    /// The episode's key, the Case's `Ecars_Anomaly_Key__c` (as on the anomalies stream).
    pub key: String,
    /// The car.
    pub vin: Vin,
    /// The rule that opened the episode.
    pub rule: String,
    /// What happened.
    pub change: CaseChange,
    /// The Case's Salesforce Id, once created.
    pub salesforce_id: Option<String>,
    /// Version of the episode's Case fields Salesforce has (0 before the first success).
    pub synced_version: i64,
    /// The Case's status as sent (`New` when created; set by agents afterwards).
    pub case_status: Option<String>,
    /// Why Salesforce refused it (`Failed` only).
    pub error: Option<String>,
    /// Sequence number of this change for the episode (1, 2, ...).
    pub sequence: i64,
    /// When the worker recorded this change.
    pub recorded_at: DateTime<Utc>,
}

impl CaseEvent {
    /// The event id of an episode's `sequence`-th Case change.
    pub fn id_for(key: &str, sequence: i64) -> Uuid {
        derived_id(b"case:", key, sequence)
    }
}

impl crate::Record for AnomalyEvent {
    const STREAM: &'static str = "anomalies";
    const TOPIC: &'static str = "anomalies";
    const EVENT_TYPE: &'static str = "com.ecars.anomaly.v1";
    const SOURCE: &'static str = "urn:ecars:anomaly";
    const KEY: &'static str = "VIN (each car's episode changes in order in one partition)";

    fn key(&self) -> &str {
        self.vin.as_str()
    }

    fn id(&self) -> Uuid {
        self.event_id
    }

    fn time(&self) -> DateTime<Utc> {
        self.recorded_at
    }
}

impl crate::Record for CaseEvent {
    const STREAM: &'static str = "cases";
    const TOPIC: &'static str = "cases";
    const EVENT_TYPE: &'static str = "com.ecars.case.v1";
    const SOURCE: &'static str = "urn:ecars:case-sync";
    const KEY: &'static str = "VIN (each car's Case changes in order in one partition)";

    fn key(&self) -> &str {
        self.vin.as_str()
    }

    fn id(&self) -> Uuid {
        self.event_id
    }

    fn time(&self) -> DateTime<Utc> {
        self.recorded_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_episode_version_has_one_event_id() {
        let a = AnomalyEvent::id_for("K", 1);
        assert_eq!(a, AnomalyEvent::id_for("K", 1));
        assert_ne!(a, AnomalyEvent::id_for("K", 2));
        assert_ne!(a, AnomalyEvent::id_for("L", 1));
        assert_eq!(a.get_version_num(), 8);
        assert_ne!(
            CaseEvent::id_for("K", 1),
            a,
            "case events have ids of their own"
        );
        assert_eq!(CaseEvent::id_for("K", 1), CaseEvent::id_for("K", 1));
    }
}
