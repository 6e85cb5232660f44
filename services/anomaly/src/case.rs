//! How an episode becomes a Service Cloud Case: its fields, from the rule's mapping.

use chrono::SecondsFormat;
use serde_json::{Map, Value};

use ecars_db::case_outbox::CaseDraft;
use ecars_model::AnomalyChange;

use crate::detector::EpisodeChange;
use crate::rules::RuleSet;

/// Case `Ecars_Anomaly_Key__c`: the external id every upsert goes by.
pub const ANOMALY_KEY_FIELD: &str = "Ecars_Anomaly_Key__c";
/// Case `Vehicle__c`: eCars' lookup to `Vehicle__c`, filled in at sync time.
pub const VEHICLE_FIELD: &str = "Vehicle__c";
/// Fields sent only when the Case is created, so an agent's later edits (Status) stand.
pub const CREATE_ONLY_FIELDS: [&str; 2] = ["Status", "Origin"];

/// Settings that shape every Case.
#[derive(Clone, Debug)]
pub struct CaseSettings {
    /// Case `Origin`.
    pub origin: String,
    /// Base URL of the live view, for the link in the Description.
    pub public_url: String,
}

/// The Case an episode should have after a change.
pub fn draft(change: &EpisodeChange, rules: &RuleSet, settings: &CaseSettings) -> CaseDraft {
    let episode = &change.episode;
    let mapping = rules.case_mapping(episode.rule);
    let name = change.name.as_deref().unwrap_or("unnamed car");
    let subject = mapping
        .subject
        .replace("{vin}", change.vin.as_str())
        .replace("{name}", name)
        .replace("{rule}", episode.rule.name());
    let mut description = format!(
        "ecars-realtime detected {rule} on {name} (VIN {vin}) at {start}.\n",
        rule = episode.rule,
        vin = change.vin,
        start = episode
            .started_at
            .to_rfc3339_opts(SecondsFormat::Secs, true),
    );
    if !episode.evidence.is_empty() {
        description.push_str("\nReadings that tripped it:\n");
        for e in &episode.evidence {
            description.push_str(&format!(
                "- {} (reading {}): {}\n",
                e.date.to_rfc3339_opts(SecondsFormat::Millis, true),
                e.event_id,
                e.detail
            ));
        }
    }
    description.push_str(&format!(
        "\nLive view: {}/?vin={}\n",
        settings.public_url.trim_end_matches('/'),
        change.vin
    ));
    let mut fields = Map::new();
    fields.insert(
        "Subject".into(),
        subject.chars().take(255).collect::<String>().into(),
    );
    fields.insert("Description".into(), description.into());
    fields.insert("Priority".into(), mapping.priority.to_owned().into());
    fields.insert("Status".into(), "New".into());
    fields.insert("Origin".into(), settings.origin.clone().into());
    fields.insert("Ecars_Rule__c".into(), episode.rule.name().into());
    fields.insert("Ecars_Firings__c".into(), Value::from(episode.firings));
    fields.insert(
        "Ecars_Last_Fired_At__c".into(),
        episode
            .last_fired_at
            .to_rfc3339_opts(SecondsFormat::Millis, true)
            .into(),
    );
    if change.kind == AnomalyChange::Closed {
        if let Some(closed) = episode.closed_at {
            fields.insert(
                "Ecars_Episode_Ended_At__c".into(),
                closed.to_rfc3339_opts(SecondsFormat::Millis, true).into(),
            );
        }
    }
    CaseDraft {
        key: episode.key.clone(),
        vin: change.vin.clone(),
        rule: episode.rule.name().into(),
        started_at: episode.started_at,
        closed_at: episode.closed_at,
        fields,
    }
}

/// The fields to send: on create everything, on update only what differs from what Salesforce
/// has, never the create-only ones.
pub fn changed_fields(
    wanted: &Map<String, Value>,
    synced: &Map<String, Value>,
    created: bool,
) -> Map<String, Value> {
    if !created {
        return wanted.clone();
    }
    wanted
        .iter()
        .filter(|(k, v)| !CREATE_ONLY_FIELDS.contains(&k.as_str()) && synced.get(*k) != Some(v))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detector::{Episode, Evidence};
    use crate::rules::RuleKind;
    use ecars_model::Vin;

    #[test]
    fn every_custom_field_written_is_in_the_salesforce_metadata() {
        let vin = Vin::parse("5YJ3E1EA000000001").unwrap();
        let now = chrono::Utc::now();
        let episode = Episode {
            key: Episode::key_for(&vin, RuleKind::BatteryDrain, now),
            rule: RuleKind::BatteryDrain,
            started_at: now,
            last_fired_at: now,
            firings: 3,
            evidence: vec![Evidence {
                event_id: uuid::Uuid::nil(),
                date: now,
                battery: Some(50.0),
                speed: None,
                detail: "battery fell".into(),
            }],
            closed_at: Some(now),
        };
        let change = EpisodeChange {
            vin,
            name: None,
            kind: AnomalyChange::Closed,
            episode,
        };
        let settings = CaseSettings {
            origin: "Web".into(),
            public_url: "https://ecars.example".into(),
        };
        let fields = draft(&change, &RuleSet::default(), &settings).fields;
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../salesforce/force-app/main/default/objects/Case/fields");
        let custom = fields
            .keys()
            .map(String::as_str)
            .chain([ANOMALY_KEY_FIELD, VEHICLE_FIELD])
            .filter(|k| k.ends_with("__c"));
        for field in custom {
            assert!(
                dir.join(format!("{field}.field-meta.xml")).is_file(),
                "salesforce/ lacks the metadata of Case.{field}"
            );
        }
        assert!(fields["Description"]
            .as_str()
            .unwrap()
            .contains("https://ecars.example/?vin=5YJ3E1EA000000001"));
    }

    #[test]
    fn an_update_sends_only_what_changed_and_never_the_status() {
        let mut synced = Map::new();
        synced.insert("Subject".into(), "a".into());
        synced.insert("Status".into(), "New".into());
        synced.insert("Ecars_Firings__c".into(), 1.into());
        let mut wanted = synced.clone();
        wanted.insert("Ecars_Firings__c".into(), 7.into());
        let sent = changed_fields(&wanted, &synced, true);
        assert_eq!(sent.len(), 1);
        assert_eq!(sent["Ecars_Firings__c"], 7);
        assert_eq!(changed_fields(&wanted, &Map::new(), false), wanted);
    }
}
