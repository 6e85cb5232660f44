//! The anomaly worker of `ecars up`: it reads the readings the persistence worker of its process
//! committed, batch by batch in commit order, rather than a consumer group of its own on the
//! in-process bus, and stores how far it got (a `sensor_data` id, [`ecars_db::sensor_cursors`])
//! in the transaction of the cars' states.
//!
//! A car's PUBACK then waits for one commit, the persistence worker's, and the detector's states
//! are written a few times a second instead of at the pace of the cars' acknowledgements. A
//! crash loses nothing: the rows stored after the cursor are read back at the next start. A
//! batch that arrives after a gap (ids a sequence skipped), or whose readings are not exactly
//! the rows it added (some were stored before), is read back from the table too.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use ecars_db::sensor_cursors::SensorCursor;
use ecars_db::sensor_rows::{CommittedReadings, StoredBatch};
use ecars_db::DbError;
use ecars_model::TelemetryReading;
use ecars_runtime::writer::{sleep_until, BatchPolicy};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::{metrics, Detection, CONSUMER_GROUP};

/// What to do with a committed batch, given the id through which the reader has its rows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Step {
    /// Its rows are read already (read back after a restart or a gap).
    Skip,
    /// Read back the rows up to `read_back_to` (nothing when that is where the reader is), then
    /// take the batch's readings from memory when `memory`, or read on through its last row.
    Take {
        /// Read rows back up to this id first.
        read_back_to: i64,
        /// The batch's readings are its rows and follow on: no need to read them.
        memory: bool,
    },
}

/// The step for a batch whose rows took `ids`, for a reader at `position`; `complete` when
/// its readings are exactly the rows it added.
fn step(position: i64, ids: StoredBatch, complete: bool) -> Step {
    if ids.through <= position {
        Step::Skip
    } else if complete && ids.after >= position {
        Step::Take {
            read_back_to: ids.after,
            memory: true,
        }
    } else {
        Step::Take {
            read_back_to: ids.through,
            memory: false,
        }
    }
}

/// Readings gathered for the next commit of the states, and where they end.
struct Gathered {
    readings: Vec<TelemetryReading>,
    /// Every row up to this id is in `readings` or committed.
    through: i64,
    /// The id through which the states are committed.
    committed: i64,
    /// When the oldest gathered reading is due.
    deadline: Option<Instant>,
    policy: BatchPolicy,
}

/// Follows the committed batches on `feed` until it closes (the persistence worker stopped) or
/// `stop`, then commits what it gathered. Database failures are retried until they pass or
/// `stop`; giving up loses nothing, the next start reads the rows after the cursor.
pub(crate) async fn follow(
    detection: Arc<Detection>,
    mut feed: mpsc::Receiver<CommittedReadings>,
    policy: BatchPolicy,
    stop: CancellationToken,
) {
    let cursors = detection.db.sensor_cursors();
    let Some(start) = retrying(&stop, "reading the anomaly worker's cursor", || {
        cursors.start(CONSUMER_GROUP)
    })
    .await
    else {
        return;
    };
    let mut gathered = Gathered {
        readings: Vec::new(),
        through: start,
        committed: start,
        deadline: None,
        policy,
    };
    // What was stored after the cursor: a crash's unfinished work.
    let rows = detection.db.sensor_rows();
    let Some(newest) = retrying(&stop, "reading the newest sensor row", || rows.last_id()).await
    else {
        return;
    };
    if newest > start {
        tracing::info!(
            from = start,
            through = newest,
            "the anomaly worker reads the readings stored since its last commit"
        );
    }
    if !gathered.read_back(&detection, newest, &stop).await {
        return;
    }
    // The newest row the persistence worker reported, for the lag.
    let mut stored = newest;
    loop {
        if gathered.due() {
            if !gathered.flush(&detection, &stop).await {
                return;
            }
            ::metrics::gauge!(metrics::ROWS_BEHIND)
                .set((stored - gathered.committed).max(0) as f64);
        }
        let deadline = gathered.deadline;
        let batch = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            _ = sleep_until(deadline) => continue,
            batch = feed.recv(), if gathered.readings.len() < policy.max_rows => batch,
        };
        let Some(batch) = batch else { break };
        stored = stored.max(batch.ids.through);
        ::metrics::gauge!(metrics::ROWS_BEHIND).set((stored - gathered.committed).max(0) as f64);
        match step(gathered.through, batch.ids, batch.readings.is_some()) {
            Step::Skip => {}
            Step::Take {
                read_back_to,
                memory,
            } => {
                if !gathered.read_back(&detection, read_back_to, &stop).await {
                    return;
                }
                match (memory, batch.readings) {
                    (true, Some(readings)) => {
                        ::metrics::counter!(metrics::INPUT_BATCHES, "from" => "memory")
                            .increment(1);
                        gathered.take(readings, batch.ids.through);
                    }
                    _ => {
                        ::metrics::counter!(metrics::INPUT_BATCHES, "from" => "rows").increment(1);
                        if !gathered
                            .read_back(&detection, batch.ids.through, &stop)
                            .await
                        {
                            return;
                        }
                    }
                }
            }
        }
    }
    gathered.flush(&detection, &stop).await;
    tracing::info!("the anomaly worker stopped after committing what it read");
}

impl Gathered {
    fn due(&self) -> bool {
        !self.readings.is_empty()
            && (self.readings.len() >= self.policy.flush_rows
                || self.deadline.is_some_and(|at| Instant::now() >= at))
    }

    fn take(&mut self, readings: Vec<TelemetryReading>, through: i64) {
        if self.readings.is_empty() {
            self.readings = readings;
        } else {
            self.readings.extend(readings);
        }
        self.through = through;
        // No deadline without a reading: nothing would be due at it, and the loop would wake
        // for it again and again.
        if !self.readings.is_empty() {
            self.deadline
                .get_or_insert_with(|| Instant::now() + self.policy.max_delay);
        }
    }

    /// Reads the rows after `through` up to `to`, committing whenever a batch is full; false
    /// when it gave up (`stop`).
    async fn read_back(
        &mut self,
        detection: &Detection,
        to: i64,
        stop: &CancellationToken,
    ) -> bool {
        let rows = detection.db.sensor_rows();
        while self.through < to {
            let room = self
                .policy
                .max_rows
                .saturating_sub(self.readings.len())
                .max(1_000);
            let after = self.through;
            let Some(page) = retrying(stop, "reading stored readings back", || {
                rows.between(after, to, room as i64)
            })
            .await
            else {
                return false;
            };
            let through = match page.last() {
                Some((id, _)) if page.len() == room => *id,
                _ => to,
            };
            self.take(page.into_iter().map(|(_, r)| r).collect(), through);
            if self.readings.len() >= self.policy.flush_rows && !self.flush(detection, stop).await {
                return false;
            }
        }
        true
    }

    /// Runs the gathered readings through the detector and commits the states with the
    /// cursor; false when it gave up (`stop`).
    async fn flush(&mut self, detection: &Detection, stop: &CancellationToken) -> bool {
        if self.readings.is_empty() {
            // Nothing to commit: the cursor stays behind, and reading back from it finds no row.
            self.deadline = None;
            return true;
        }
        let cursor = SensorCursor {
            consumer: CONSUMER_GROUP,
            through_id: self.through,
        };
        let started = Instant::now();
        let readings = &self.readings;
        if retrying(stop, "storing the cars' anomaly states", || {
            detection.process(readings, Some(cursor))
        })
        .await
        .is_none()
        {
            return false;
        }
        let table = "case_outbox";
        ::metrics::histogram!(ecars_runtime::metrics::BATCH_SIZE, "table" => table)
            .record(self.readings.len() as f64);
        ::metrics::histogram!(ecars_runtime::metrics::BATCH_LATENCY, "table" => table)
            .record(started.elapsed().as_secs_f64());
        self.committed = self.through;
        self.readings.clear();
        self.deadline = None;
        true
    }
}

/// Runs `attempt` until it succeeds, waiting 100 ms after the first failure, twice as long after
/// each next (up to 5 s), logging at the 1st, 2nd, 4th, 8th… failure; `None` once `stop` fires
/// during a wait.
async fn retrying<T, F, Fut>(stop: &CancellationToken, what: &str, mut attempt: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, DbError>>,
{
    let mut wait = Duration::from_millis(100);
    let mut failures = 0u32;
    loop {
        match attempt().await {
            Ok(value) => {
                if failures > 0 {
                    tracing::info!(failures, "{what}: the database is back");
                }
                return Some(value);
            }
            Err(error) => {
                failures += 1;
                if failures.is_power_of_two() {
                    tracing::warn!(%error, failures, "{what} failed; trying again");
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => return None,
            _ = tokio::time::sleep(wait) => {}
        }
        wait = (wait * 2).min(Duration::from_secs(5));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(after: i64, through: i64) -> StoredBatch {
        StoredBatch {
            added: (through - after) as u64,
            after,
            through,
        }
    }

    #[test]
    fn a_batch_that_follows_on_is_taken_from_memory() {
        assert_eq!(
            step(10, ids(10, 20), true),
            Step::Take {
                read_back_to: 10,
                memory: true
            }
        );
    }

    #[test]
    fn a_batch_after_a_gap_reads_the_gap_back_first() {
        // A batch the reader missed (it started after it was committed, or ids a sequence
        // skipped): the rows in between are read, then the batch from memory.
        assert_eq!(
            step(10, ids(15, 20), true),
            Step::Take {
                read_back_to: 15,
                memory: true
            }
        );
    }

    #[test]
    fn a_batch_with_readings_stored_before_is_read_back() {
        assert_eq!(
            step(10, ids(10, 20), false),
            Step::Take {
                read_back_to: 20,
                memory: false
            }
        );
    }

    #[test]
    fn a_batch_read_already_is_skipped_and_one_read_in_part_is_read_on() {
        assert_eq!(step(20, ids(10, 20), true), Step::Skip);
        assert_eq!(step(30, ids(10, 20), true), Step::Skip);
        assert_eq!(
            step(15, ids(10, 20), true),
            Step::Take {
                read_back_to: 20,
                memory: false
            }
        );
    }
}
