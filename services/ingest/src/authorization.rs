//! What a client that logged in may do over MQTT, without I/O: use client ids of its own and its
//! own topics, nothing of another's.
//!
//! With device credentials on (`ECARS_DEVICE_SECRET`), every MQTT client is either a car, whose
//! identity is the VIN it logged in as, or a service account ([`crate::accounts`]) that reads
//! the topics its filters allow. Telemetry is judged by the admission rules (a reading for
//! another VIN is dead-lettered); this module rules on the rest.

use std::sync::Arc;

use ecars_model::Vin;

use crate::accounts::MqttAccount;

/// Who a client logged in as.
#[derive(Clone, Debug)]
pub enum Identity {
    /// A car, by the VIN its credentials are for.
    Car(Vin),
    /// A service account (a subscriber that is not a car).
    Account(Arc<MqttAccount>),
}

impl Identity {
    /// The car's VIN; `None` for a service account.
    pub fn vin(&self) -> Option<&Vin> {
        match self {
            Identity::Car(vin) => Some(vin),
            Identity::Account(_) => None,
        }
    }

    /// The VIN or the account's name, for logs.
    pub fn name(&self) -> &str {
        match self {
            Identity::Car(vin) => vin.as_str(),
            Identity::Account(account) => &account.name,
        }
    }

    /// Whether `client_id` belongs to this identity (see [`owns_client_id`] for cars,
    /// [`MqttAccount::owns_client_id`] for accounts).
    pub fn owns_client_id(&self, client_id: &str) -> bool {
        match self {
            Identity::Car(vin) => owns_client_id(vin, client_id),
            Identity::Account(account) => account.owns_client_id(client_id),
        }
    }

    /// A client id for a client that sent none: its own, with a unique suffix.
    pub fn assigned_client_id(&self) -> String {
        match self {
            Identity::Car(vin) => assigned_client_id(vin),
            Identity::Account(account) => {
                format!("{}-{}", account.name, uuid::Uuid::now_v7().simple())
            }
        }
    }

    /// Whether the client may subscribe to `filter`.
    pub fn may_subscribe(&self, filter: &str) -> bool {
        match self {
            Identity::Car(vin) => may_subscribe(vin, filter),
            Identity::Account(account) => account.may_subscribe(filter),
        }
    }

    /// Whether the client may publish to `topic`, a topic that is not telemetry: nobody yet
    /// (service accounts read; see [`may_publish_other`] for cars).
    pub fn may_publish_other(&self, topic: &str) -> bool {
        match self {
            Identity::Car(vin) => may_publish_other(vin, topic),
            Identity::Account(_) => false,
        }
    }
}

/// Why an operation of a car was refused, as counted and logged.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NotAuthorized {
    /// A topic filter outside the car's own topics.
    Subscribe,
    /// A PUBLISH to a topic that is not one of the car's.
    Publish,
}

impl NotAuthorized {
    /// Stable code for metric labels and logs.
    pub fn code(self) -> &'static str {
        match self {
            NotAuthorized::Subscribe => "subscribe",
            NotAuthorized::Publish => "publish",
        }
    }
}

/// Whether `client_id` belongs to the car: its VIN, alone or followed by anything
/// (`1HGCM82633A004352-dashcam`). VINs all have 17 characters, so no car's client ids can be
/// another car's, and a car can never take over another car's session.
pub fn owns_client_id(vin: &Vin, client_id: &str) -> bool {
    client_id.starts_with(vin.as_str())
}

/// A client id for a car that sent none: its VIN and a unique suffix, so that it is its own.
pub fn assigned_client_id(vin: &Vin) -> String {
    format!("{vin}-{}", uuid::Uuid::now_v7().simple())
}

/// Whether the car may subscribe to `filter`: only below `vehicles/{VIN}/` (where commands to
/// the car will go). Wildcards are fine there, since they cannot reach above that prefix;
/// `#`, `vehicles/+/…` and shared subscriptions (`$share/…`) are not.
pub fn may_subscribe(vin: &Vin, filter: &str) -> bool {
    filter
        .strip_prefix("vehicles/")
        .and_then(|rest| rest.strip_prefix(vin.as_str()))
        .is_some_and(|rest| rest.starts_with('/'))
}

/// Whether the car may publish to `topic`, a topic that is not telemetry (telemetry has its own
/// rules). The product defines no other topic a car publishes to yet, so none: a car's messages
/// must never reach another car's subscriptions or forge retained messages for them.
pub fn may_publish_other(_vin: &Vin, _topic: &str) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vin(n: u8) -> Vin {
        Vin::parse(&format!("1HGCM82633A00435{n}")).unwrap()
    }

    #[test]
    fn a_car_owns_client_ids_that_start_with_its_vin() {
        let (a, b) = (vin(1), vin(2));
        assert!(owns_client_id(&a, a.as_str()));
        assert!(owns_client_id(&a, &format!("{a}-dashcam")));
        assert!(!owns_client_id(&a, b.as_str()));
        assert!(!owns_client_id(&a, &format!("ecars-sim-{a}")));
        assert!(!owns_client_id(&a, ""));
        assert!(owns_client_id(&a, &assigned_client_id(&a)));
        assert_ne!(assigned_client_id(&a), assigned_client_id(&a));
    }

    #[test]
    fn a_car_subscribes_only_below_its_own_topics() {
        let (a, b) = (vin(1), vin(2));
        for allowed in [
            format!("vehicles/{a}/commands"),
            format!("vehicles/{a}/#"),
            format!("vehicles/{a}/+"),
            format!("vehicles/{a}/telemetry"),
        ] {
            assert!(may_subscribe(&a, &allowed), "{allowed}");
        }
        for refused in [
            "#".to_owned(),
            "+/+/+".to_owned(),
            "vehicles/#".to_owned(),
            "vehicles/+/telemetry".to_owned(),
            format!("vehicles/{b}/#"),
            format!("vehicles/{b}/telemetry"),
            format!("vehicles/{a}"),
            format!("vehicles/{a}x/#"),
            format!("$share/g/vehicles/{a}/#"),
            "ecars/data".to_owned(),
        ] {
            assert!(!may_subscribe(&a, &refused), "{refused}");
        }
    }

    #[test]
    fn a_car_publishes_nothing_but_telemetry() {
        let (a, b) = (vin(1), vin(2));
        assert!(!may_publish_other(&a, &format!("vehicles/{b}/commands")));
        assert!(!may_publish_other(&a, &format!("vehicles/{a}/anything")));
        assert!(!may_publish_other(&a, "ecars/other"));
    }
}
