//! The supervisor: a process's parts, started as they are added and stopped in the order they
//! were declared, when the shutdown signal comes or when one of them stops on its own.
//!
//! A part stopping on its own is fatal (a worker whose database refused it, a listener that
//! died): the supervisor marks the process unready, stops the others in order, and reports
//! which part stopped and why, so the process exits non-zero and its orchestrator restarts it.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use futures_util::future::select_all;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::readiness::Readiness;

/// Any part's error.
pub type PartError = Box<dyn std::error::Error + Send + Sync>;

/// How long the others get to stop after a part failed: a failed part may leave the others
/// waiting for it (a full queue it no longer reads), and the process must still exit.
const STOP_AFTER_FAILURE: Duration = Duration::from_secs(10);

/// Why a supervised process stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    /// A part stopped before it was asked to.
    #[error("{part} stopped: {reason}")]
    PartStopped {
        /// The part.
        part: &'static str,
        /// What it said (its error, or that it returned).
        reason: String,
    },
    /// A part failed while it was being stopped.
    #[error("{part} failed while stopping: {reason}")]
    Stopping {
        /// The part.
        part: &'static str,
        /// Its error.
        reason: String,
    },
}

enum Step {
    /// A running part and the token that asks it to stop.
    Part {
        name: &'static str,
        stop: CancellationToken,
        task: Option<JoinHandle<Result<(), PartError>>>,
        /// Whether its end stops the process.
        essential: bool,
        /// Whether the stop waits for it here; `false`: at its [`Step::Join`] later.
        joined_here: bool,
    },
    /// Waits for a part asked to stop earlier ([`Supervisor::spawn_joined_later`]).
    Join { part: &'static str },
    /// Something done at this point of the stop sequence (closing the bus once the parts
    /// that publish have stopped).
    Action {
        name: &'static str,
        action: Pin<Box<dyn Future<Output = ()> + Send>>,
    },
}

/// Starts parts and stops them in a declared order.
pub struct Supervisor {
    steps: Vec<Step>,
    readiness: Readiness,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self
            .steps
            .iter()
            .map(|s| match s {
                Step::Part { name, .. } | Step::Action { name, .. } => *name,
                Step::Join { part } => part,
            })
            .collect();
        f.debug_struct("Supervisor").field("steps", &names).finish()
    }
}

/// Describes an error with its causes, for the reason a part stopped.
fn report(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        // Errors that print their source already need it only once.
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

impl Supervisor {
    /// A supervisor that reports to `readiness` (unready while stopping).
    pub fn new(readiness: Readiness) -> Supervisor {
        Supervisor {
            steps: Vec::new(),
            readiness,
        }
    }

    /// Starts an essential part: `run` gets the token that asks it to stop, and the part must
    /// not end before. Parts stop in the order they were added.
    pub fn spawn<F, Fut, E>(&mut self, name: &'static str, run: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<PartError>,
    {
        self.start(name, run, true, true);
    }

    /// Starts an essential part that is asked to stop at this point of the stop sequence but
    /// waited for only at [`Supervisor::join`]: the steps between let it finish (MQTT ingest
    /// drains its last readings while the bus is closed and the workers commit them).
    pub fn spawn_joined_later<F, Fut, E>(&mut self, name: &'static str, run: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<PartError>,
    {
        self.start(name, run, true, false);
    }

    /// Waits here, in the stop sequence, for the part `name` started with
    /// [`Supervisor::spawn_joined_later`].
    pub fn join(&mut self, name: &'static str) {
        self.steps.push(Step::Join { part: name });
    }

    /// Starts a part whose end does not stop the process (the demo simulator: it may finish).
    pub fn spawn_auxiliary<F, Fut, E>(&mut self, name: &'static str, run: F)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<PartError>,
    {
        self.start(name, run, false, true);
    }

    fn start<F, Fut, E>(&mut self, name: &'static str, run: F, essential: bool, joined_here: bool)
    where
        F: FnOnce(CancellationToken) -> Fut,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: Into<PartError>,
    {
        let stop = CancellationToken::new();
        let future = run(stop.clone());
        let task = tokio::spawn(async move { future.await.map_err(Into::into) });
        self.steps.push(Step::Part {
            name,
            stop,
            task: Some(task),
            essential,
            joined_here,
        });
    }

    /// Adds a step to the stop sequence at this point: after the parts added before it have
    /// stopped, before the ones added after.
    pub fn then(&mut self, name: &'static str, action: impl Future<Output = ()> + Send + 'static) {
        self.steps.push(Step::Action {
            name,
            action: Box::pin(action),
        });
    }

    /// Runs until `shutdown` completes (a signal) or an essential part stops on its own, then
    /// stops every part in order. Returns the first failure: the part that stopped early, or a
    /// part that failed while stopping.
    pub async fn run_until(
        mut self,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), SupervisorError> {
        let early = {
            let watched: Vec<_> = self
                .steps
                .iter_mut()
                .filter_map(|step| match step {
                    Step::Part {
                        name,
                        task: Some(task),
                        essential: true,
                        ..
                    } => Some(Box::pin(async move {
                        let result = task.await;
                        (*name, result)
                    })),
                    _ => None,
                })
                .collect();
            let first_to_end = async move {
                if watched.is_empty() {
                    return std::future::pending().await;
                }
                select_all(watched).await.0
            };
            tokio::select! {
                _ = shutdown => None,
                (name, result) = first_to_end => Some((name, result)),
            }
        };
        let failure = match early {
            None => {
                self.readiness.set("draining", false);
                tracing::info!("shutting down: stopping every part in order");
                None
            }
            Some((name, result)) => {
                self.readiness.set("failed", false);
                let reason = match result {
                    Ok(Ok(())) => "it returned".to_owned(),
                    Ok(Err(e)) => report(e.as_ref()),
                    Err(e) => e.to_string(),
                };
                tracing::error!(
                    part = name,
                    reason,
                    "a part stopped on its own; stopping the others"
                );
                // Its task is finished: it must not be awaited again.
                for step in &mut self.steps {
                    if let Step::Part {
                        name: part, task, ..
                    } = step
                    {
                        if *part == name {
                            *task = None;
                        }
                    }
                }
                Some(SupervisorError::PartStopped { part: name, reason })
            }
        };
        let stopping = self.stop_all();
        match failure {
            None => stopping.await,
            Some(failure) => {
                if tokio::time::timeout(STOP_AFTER_FAILURE, stopping)
                    .await
                    .is_err()
                {
                    tracing::error!(
                        "the other parts did not stop within {STOP_AFTER_FAILURE:?}; exiting"
                    );
                }
                Err(failure)
            }
        }
    }

    /// Stops the parts in order; the first failure while stopping is returned (the rest still
    /// stop).
    async fn stop_all(self) -> Result<(), SupervisorError> {
        let mut first_error = None;
        let mut deferred: Vec<(&'static str, JoinHandle<Result<(), PartError>>)> = Vec::new();
        for step in self.steps {
            let (name, task) = match step {
                Step::Part {
                    name,
                    stop,
                    task,
                    joined_here,
                    ..
                } => {
                    stop.cancel();
                    let Some(task) = task else { continue };
                    if !joined_here {
                        deferred.push((name, task));
                        continue;
                    }
                    (name, task)
                }
                Step::Join { part } => {
                    let Some(index) = deferred.iter().position(|(name, _)| *name == part) else {
                        continue;
                    };
                    deferred.swap_remove(index)
                }
                Step::Action { name, action } => {
                    tracing::debug!(step = name, "stop step");
                    action.await;
                    continue;
                }
            };
            if let Some(error) = Self::stopped(name, task).await {
                first_error.get_or_insert(error);
            }
        }
        // Parts asked to stop whose join step was never declared are waited for last.
        for (name, task) in deferred {
            if let Some(error) = Self::stopped(name, task).await {
                first_error.get_or_insert(error);
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Waits for a part asked to stop; its failure, if it failed.
    async fn stopped(
        name: &'static str,
        task: JoinHandle<Result<(), PartError>>,
    ) -> Option<SupervisorError> {
        let reason = match task.await {
            Ok(Ok(())) => {
                tracing::debug!(part = name, "stopped");
                return None;
            }
            Ok(Err(e)) => report(e.as_ref()),
            Err(e) => e.to_string(),
        };
        tracing::error!(part = name, reason, "failed while stopping");
        Some(SupervisorError::Stopping { part: name, reason })
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// A part that records when it was asked to stop, and then stops.
    fn recording(
        log: &Arc<Mutex<Vec<String>>>,
        name: &'static str,
    ) -> impl FnOnce(CancellationToken) -> Pin<Box<dyn Future<Output = Result<(), PartError>> + Send>>
    {
        let log = Arc::clone(log);
        move |stop| {
            Box::pin(async move {
                stop.cancelled().await;
                log.lock().unwrap().push(format!("stop {name}"));
                Ok(())
            })
        }
    }

    #[tokio::test]
    async fn parts_stop_in_the_declared_order_with_the_steps_between() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let readiness = Readiness::default();
        let mut supervisor = Supervisor::new(readiness.clone());
        supervisor.spawn("ingest", recording(&log, "ingest"));
        let closed = Arc::clone(&log);
        supervisor.then("close the bus", async move {
            closed.lock().unwrap().push("close bus".into());
        });
        supervisor.spawn("persist", recording(&log, "persist"));
        supervisor.spawn("http", recording(&log, "http"));
        supervisor.run_until(async {}).await.unwrap();
        assert_eq!(
            *log.lock().unwrap(),
            ["stop ingest", "close bus", "stop persist", "stop http"]
        );
        assert!(!readiness.all_ready(), "draining makes the process unready");
    }

    #[tokio::test]
    async fn a_part_joined_later_is_asked_to_stop_first_and_waited_for_after_the_steps_between() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut supervisor = Supervisor::new(Readiness::default());
        // Ingest stops reading at once but finishes only once the bus is closed.
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
        let ingest_log = Arc::clone(&log);
        supervisor.spawn_joined_later("ingest", move |stop| async move {
            stop.cancelled().await;
            ingest_log
                .lock()
                .unwrap()
                .push("ingest asked to stop".to_owned());
            let _ = closed_rx.await;
            ingest_log.lock().unwrap().push("ingest drained".to_owned());
            Ok::<(), PartError>(())
        });
        let close_log = Arc::clone(&log);
        supervisor.then("close the bus", async move {
            close_log.lock().unwrap().push("close bus".into());
            let _ = closed_tx.send(());
        });
        supervisor.join("ingest");
        supervisor.spawn("persist", recording(&log, "persist"));
        supervisor.run_until(async {}).await.unwrap();
        let log = log.lock().unwrap();
        let at = |entry: &str| log.iter().position(|e| e == entry).unwrap();
        assert!(at("ingest asked to stop") < at("ingest drained"));
        assert!(at("close bus") < at("ingest drained"), "{log:?}");
        assert!(at("ingest drained") < at("stop persist"), "{log:?}");
    }

    #[tokio::test]
    async fn an_essential_part_ending_stops_the_others_and_names_it() {
        let log = Arc::new(Mutex::new(Vec::new()));
        let readiness = Readiness::default();
        let mut supervisor = Supervisor::new(readiness.clone());
        supervisor.spawn("http", recording(&log, "http"));
        supervisor.spawn("persist", |_stop| async {
            Err::<(), PartError>("database: connection refused".into())
        });
        supervisor.spawn_auxiliary("simulator", |_stop| async { Ok::<(), PartError>(()) });
        let error = supervisor
            .run_until(std::future::pending())
            .await
            .unwrap_err();
        assert!(
            matches!(&error, SupervisorError::PartStopped { part: "persist", reason } if reason.contains("connection refused")),
            "{error}"
        );
        assert_eq!(*log.lock().unwrap(), ["stop http"]);
        assert_eq!(readiness.snapshot().get("failed"), Some(&false));
    }

    #[tokio::test]
    async fn an_auxiliary_part_may_end_without_stopping_the_process() {
        let mut supervisor = Supervisor::new(Readiness::default());
        let (done_tx, done_rx) = tokio::sync::oneshot::channel::<()>();
        supervisor.spawn_auxiliary("simulator", move |_stop| async move {
            let _ = done_tx.send(());
            Ok::<(), PartError>(())
        });
        let log = Arc::new(Mutex::new(Vec::new()));
        supervisor.spawn("http", recording(&log, "http"));
        // Shut down only after the auxiliary part has ended: the process kept running.
        supervisor
            .run_until(async {
                let _ = done_rx.await;
            })
            .await
            .unwrap();
        assert_eq!(*log.lock().unwrap(), ["stop http"]);
    }
}
