//! The episode event relay: publishes changes of the case outbox for other services, on two
//! streams:
//!
//! - anomalies (Kafka topic `{prefix}anomalies`): each change of an episode, written by the
//!   detector in the same transaction as its state;
//! - cases (`{prefix}cases`): each change of the episode's Case sync (created in Salesforce,
//!   updated, failed for good), written by the sync in the same transaction as its outcome.
//!
//! A change counts as published only once the bus took it, so every change goes out at least
//! once, even across a crash (a transactional outbox). Changes made in quick succession go out
//! as one event with the newest state.

use std::sync::Arc;
use std::time::Duration;

use ecars_bus::{Bus, BusError, Record};
use ecars_db::case_outbox::{CaseOutbox, CaseRecord};
use ecars_db::DbError;
use ecars_model::telemetry::VinError;
use ecars_model::{AnomalyChange, AnomalyEvent, CaseChange, CaseEvent, Vin};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Rows published per round.
const BATCH: i64 = 500;
/// Longest sleep when nothing changed (a change wakes the relay earlier).
const IDLE_POLL: Duration = Duration::from_secs(1);
/// Longest time the last round at a stop may take.
pub const FINAL_ROUND: Duration = Duration::from_secs(10);

/// Publishes outbox changes on the bus.
#[derive(Debug)]
pub struct EpisodeEventRelay {
    outbox: CaseOutbox,
    bus: Bus,
    /// Woken when the detector or the sync wrote rows.
    pub wake: Arc<Notify>,
}

/// How publishing one batch went.
enum Round {
    /// Every record went out (or had nowhere to go); `busy` when the batch was full.
    Done { busy: bool },
    /// The bus refused for now.
    Failed,
    /// The bus closed: the relay stops.
    Closed,
}

impl EpisodeEventRelay {
    /// A relay from this outbox to this bus.
    pub fn new(outbox: CaseOutbox, bus: Bus) -> EpisodeEventRelay {
        EpisodeEventRelay {
            outbox,
            bus,
            wake: Arc::new(Notify::new()),
        }
    }

    /// Publishes until `shutdown` or the bus closes. At `shutdown` it makes one last round, so
    /// what the sync wrote just before goes out now (within [`FINAL_ROUND`]); what is left goes
    /// out after the next start.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), DbError> {
        let mut failures = 0u32;
        loop {
            let anomalies = self.anomaly_round().await?;
            let cases = self.case_round().await?;
            let (busy, failed) = match (anomalies, cases) {
                (Round::Closed, _) | (_, Round::Closed) => return Ok(()),
                (Round::Failed, _) | (_, Round::Failed) => (false, true),
                (Round::Done { busy: a }, Round::Done { busy: c }) => (a || c, false),
            };
            failures = if failed {
                failures.saturating_add(1)
            } else {
                0
            };
            if busy {
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
                _ = shutdown.cancelled() => return self.final_round().await,
                _ = self.wake.notified(), if !failed => {}
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The last publishing round before a stop, bounded in time: an unreachable bus must not
    /// hold the process back (the outbox keeps what did not go out).
    async fn final_round(&self) -> Result<(), DbError> {
        let round = async {
            loop {
                let anomalies = self.anomaly_round().await?;
                let cases = self.case_round().await?;
                match (anomalies, cases) {
                    (Round::Done { busy: true }, _) | (_, Round::Done { busy: true }) => continue,
                    _ => return Ok(()),
                }
            }
        };
        match tokio::time::timeout(FINAL_ROUND, round).await {
            Ok(result) => result,
            Err(_) => {
                tracing::warn!(
                    "outbox events not all published within {FINAL_ROUND:?} of the stop; they go out after the next start"
                );
                Ok(())
            }
        }
    }

    /// Publishes the episode changes not yet on the anomalies stream.
    async fn anomaly_round(&self) -> Result<Round, DbError> {
        let rows = match self.outbox.unpublished(BATCH).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "case outbox unavailable to the event relay; retrying");
                return Ok(Round::Failed);
            }
        };
        let busy = rows.len() as i64 == BATCH;
        let records = rows.iter().map(|row| (event_of(row), row, row.version));
        let (round, published) = self.publish(records).await;
        if !published.is_empty() {
            if let Err(e) = self.outbox.mark_published(&published).await {
                // Published but not marked: they go out again next round, and consumers drop
                // the repeat by event id. A database blip must not stop the worker.
                tracing::warn!(error = %e, "cannot mark anomaly events published; retrying");
                return Ok(Round::Failed);
            }
        }
        Ok(match round {
            Round::Done { .. } => Round::Done { busy },
            other => other,
        })
    }

    /// Publishes the Case sync changes not yet on the cases stream.
    async fn case_round(&self) -> Result<Round, DbError> {
        let rows = match self.outbox.unpublished_case_events(BATCH).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "case outbox unavailable to the event relay; retrying");
                return Ok(Round::Failed);
            }
        };
        let busy = rows.len() as i64 == BATCH;
        let records = rows.iter().filter_map(|row| {
            let event = case_event_of(row).transpose()?;
            Some((event, row, row.case_event_seq))
        });
        let (round, published) = self.publish(records).await;
        if !published.is_empty() {
            if let Err(e) = self.outbox.mark_case_events_published(&published).await {
                tracing::warn!(error = %e, "cannot mark Case events published; retrying");
                return Ok(Round::Failed);
            }
        }
        Ok(match round {
            Round::Done { .. } => Round::Done { busy },
            other => other,
        })
    }

    /// Publishes records in order until the bus refuses; returns how it went and the (key,
    /// version) of every row done with.
    async fn publish<'r, T: Record>(
        &self,
        records: impl Iterator<Item = (Result<T, VinError>, &'r CaseRecord, i64)>,
    ) -> (Round, Vec<(String, i64)>) {
        let mut published = Vec::new();
        for (record, row, version) in records {
            let Ok(record) = record else {
                // Only the detector writes rows, with VINs it parsed; skip rather than loop.
                tracing::error!(
                    key = row.key,
                    vin = row.vin,
                    "outbox row with an invalid VIN; not published"
                );
                published.push((row.key.clone(), version));
                continue;
            };
            let stream = T::STREAM;
            match self.bus.publish(record).await {
                // In process nobody may listen to these streams: nothing to deliver then.
                Ok(()) | Err(BusError::NoSubscribers(_)) => {
                    published.push((row.key.clone(), version))
                }
                Err(BusError::Closed) => return (Round::Closed, published),
                Err(e) => {
                    tracing::warn!(error = %e, %stream, "cannot publish outbox events; retrying");
                    return (Round::Failed, published);
                }
            }
        }
        (Round::Done { busy: false }, published)
    }
}

/// The event of a row's latest Case sync change; `None` when its Case never changed.
pub fn case_event_of(row: &CaseRecord) -> Result<Option<CaseEvent>, VinError> {
    let Some(change) = row.case_event else {
        return Ok(None);
    };
    Ok(Some(CaseEvent {
        event_id: CaseEvent::id_for(&row.key, row.case_event_seq),
        key: row.key.clone(),
        vin: Vin::parse(&row.vin)?,
        rule: row.rule.clone(),
        change,
        salesforce_id: row.salesforce_id.clone(),
        synced_version: row.synced_version,
        case_status: row
            .fields
            .get("Status")
            .and_then(|v| v.as_str())
            .map(str::to_owned),
        error: (change == CaseChange::Failed)
            .then(|| row.last_error.clone())
            .flatten(),
        sequence: row.case_event_seq,
        recorded_at: row.case_event_at.unwrap_or(row.updated_at),
    }))
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
