//! The episode event relay: publishes changes of the case outbox on the anomalies stream
//! (Kafka topic `{prefix}anomalies`) for other services. The outbox row is written in the same
//! transaction as the detector's state, and a row counts as published only once the bus took
//! it, so every change goes out at least once, even across a crash (a transactional outbox).
//! Changes made in quick succession go out as one event with the newest state.

use std::sync::Arc;
use std::time::Duration;

use ecars_persist::StoreError;
use ecars_shared::anomaly::{AnomalyChange, AnomalyEvent};
use ecars_shared::bus::{Bus, BusError, BusRecord};
use ecars_shared::telemetry::{Vin, VinError};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::outbox::{CaseOutbox, CaseRecord};

/// Rows published per round.
const BATCH: i64 = 500;
/// Longest sleep when nothing changed (a change wakes the relay earlier).
const IDLE_POLL: Duration = Duration::from_secs(1);

/// Publishes outbox changes on the bus.
pub struct EpisodeEventRelay {
    outbox: CaseOutbox,
    bus: Arc<dyn Bus>,
    /// Woken when the detector wrote rows.
    pub wake: Arc<Notify>,
}

impl EpisodeEventRelay {
    /// A relay from this outbox to this bus.
    pub fn new(outbox: CaseOutbox, bus: Arc<dyn Bus>) -> EpisodeEventRelay {
        EpisodeEventRelay {
            outbox,
            bus,
            wake: Arc::new(Notify::new()),
        }
    }

    /// Publishes until `shutdown` or the bus closes; what is left goes out after the next start.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), StoreError> {
        let mut failures = 0u32;
        loop {
            let rows = match self.outbox.unpublished(BATCH).await {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(error = %e, "case outbox unavailable to the event relay; retrying");
                    Vec::new()
                }
            };
            let mut published = Vec::with_capacity(rows.len());
            let mut failed = false;
            for row in &rows {
                let Ok(event) = event_of(row) else {
                    // Only the detector writes rows, with VINs it parsed; skip rather than loop.
                    tracing::error!(
                        key = row.key,
                        vin = row.vin,
                        "outbox row with an invalid VIN; not published"
                    );
                    published.push((row.key.clone(), row.version));
                    continue;
                };
                match self.bus.publish(BusRecord::Anomaly(event)).await {
                    // In process nobody may listen to anomalies: nothing to deliver then.
                    Ok(()) | Err(BusError::NoSubscribers(_)) => {
                        published.push((row.key.clone(), row.version))
                    }
                    Err(BusError::Closed) => {
                        self.outbox.mark_published(&published).await?;
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot publish anomaly events; retrying");
                        failed = true;
                        break;
                    }
                }
            }
            if !published.is_empty() {
                self.outbox.mark_published(&published).await?;
            }
            failures = if failed {
                failures.saturating_add(1)
            } else {
                0
            };
            if !rows.is_empty() && !failed {
                continue;
            }
            let wait = if failed {
                Duration::from_millis(200)
                    .saturating_mul(2u32.saturating_pow(failures.min(8)))
                    .min(Duration::from_secs(30))
            } else {
                IDLE_POLL
            };
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = self.wake.notified(), if !failed => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
}

/// The event of an outbox row's current version.
pub fn event_of(row: &CaseRecord) -> Result<AnomalyEvent, VinError> {
    let change = if row.episode_closed_at.is_some() {
        AnomalyChange::Closed
    } else if row.published_version == 0 {
        AnomalyChange::Opened
    } else {
        AnomalyChange::Updated
    };
    let text = |field: &str| {
        row.fields
            .get(field)
            .and_then(|v| v.as_str())
            .unwrap_or_default()
            .to_owned()
    };
    Ok(AnomalyEvent {
        event_id: AnomalyEvent::id_for(&row.key, row.version),
        key: row.key.clone(),
        vin: Vin::parse(&row.vin)?,
        rule: row.rule.clone(),
        change,
        version: row.version,
        started_at: row.episode_started_at,
        closed_at: row.episode_closed_at,
        firings: row
            .fields
            .get("Ecars_Firings__c")
            .and_then(|v| v.as_u64())
            .unwrap_or(1),
        subject: text("Subject"),
        priority: text("Priority"),
        recorded_at: row.updated_at,
    })
}
