//! Settings files that change while the process runs (API keys now; accounts and revocations
//! next): read at start, where an unusable file stops the start, then re-read every interval.
//! A changed file that parses replaces the old contents at once; one that does not is logged
//! and counted, and the old contents stay in force (a half-written file never opens or closes
//! anything).
//!
//! Polling rather than file notifications: Kubernetes updates a mounted Secret by swapping a
//! symlink, which inotify watches on the file miss, and a small file read every few seconds
//! costs nothing.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// Reloads of watched files, labelled by `file` (what it holds) and `result` (`applied`,
/// `refused`: unreadable or invalid, old contents kept).
pub const RELOADS: &str = "ecars_settings_file_reloads_total";

/// Why a watched file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ReloadError {
    /// The file cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file does not parse.
    #[error("{path}: {reason}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong, from the parser.
        reason: String,
    },
}

/// The current contents of a watched file, parsed; cheap to clone and to read.
pub struct Reloading<T> {
    current: Arc<RwLock<Arc<T>>>,
    /// The files, read together (a certificate and its key).
    paths: Arc<[PathBuf]>,
    what: &'static str,
    /// The texts the first contents were parsed from, where watching starts.
    loaded: Arc<[String]>,
}

impl<T> Clone for Reloading<T> {
    fn clone(&self) -> Self {
        Reloading {
            current: Arc::clone(&self.current),
            paths: Arc::clone(&self.paths),
            what: self.what,
            loaded: Arc::clone(&self.loaded),
        }
    }
}

impl<T> std::fmt::Debug for Reloading<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloading")
            .field("paths", &self.paths)
            .field("what", &self.what)
            .finish_non_exhaustive()
    }
}

fn read(paths: &[PathBuf]) -> Result<Vec<String>, ReloadError> {
    paths
        .iter()
        .map(|path| {
            std::fs::read_to_string(path).map_err(|source| ReloadError::Read {
                path: path.to_owned(),
                source,
            })
        })
        .collect()
}

impl<T: Send + Sync + 'static> Reloading<T> {
    /// Reads and parses `path`; `what` names its contents in logs and metrics (`api_keys`).
    pub fn load<E: std::fmt::Display>(
        path: &Path,
        what: &'static str,
        parse: impl Fn(&str) -> Result<T, E>,
    ) -> Result<Reloading<T>, ReloadError> {
        Reloading::load_all(&[path.to_owned()], what, |texts| parse(&texts[0]))
    }

    /// Reads `paths` and parses their texts together (a certificate chain and its key).
    pub fn load_all<E: std::fmt::Display>(
        paths: &[PathBuf],
        what: &'static str,
        parse: impl Fn(&[String]) -> Result<T, E>,
    ) -> Result<Reloading<T>, ReloadError> {
        let texts = read(paths)?;
        let value = parse(&texts).map_err(|e| ReloadError::Invalid {
            path: paths.first().cloned().unwrap_or_default(),
            reason: e.to_string(),
        })?;
        Ok(Reloading {
            current: Arc::new(RwLock::new(Arc::new(value))),
            paths: paths.into(),
            what,
            loaded: texts.into(),
        })
    }

    /// The contents in force.
    pub fn current(&self) -> Arc<T> {
        // A poisoned lock still holds a complete value: it is only ever replaced whole.
        match self.current.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    fn replace(&self, value: T) {
        let mut guard = match self.current.write() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        *guard = Arc::new(value);
    }

    /// Re-reads the file every `interval` until `stop`, applying a changed file that parses.
    /// Returns `Ok` so a supervisor can run it as a part.
    pub async fn watch<E: std::fmt::Display>(
        self,
        interval: Duration,
        parse: impl Fn(&str) -> Result<T, E>,
        stop: CancellationToken,
    ) -> Result<(), std::convert::Infallible> {
        self.watch_all(interval, |texts| parse(&texts[0]), stop)
            .await
    }

    /// [`Reloading::watch`] for contents read from several files: a change of any is applied
    /// once they parse together.
    pub async fn watch_all<E: std::fmt::Display>(
        self,
        interval: Duration,
        parse: impl Fn(&[String]) -> Result<T, E>,
        stop: CancellationToken,
    ) -> Result<(), std::convert::Infallible> {
        // The texts last seen, applied or not: an invalid file is reported once, not every tick.
        let mut seen = Some(self.loaded.to_vec());
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                _ = ticks.tick() => {}
            }
            let texts = match read(&self.paths) {
                Ok(texts) => texts,
                Err(e) => {
                    if seen.take().is_some() {
                        self.refused(&e.to_string());
                    }
                    continue;
                }
            };
            if seen.as_ref() == Some(&texts) {
                continue;
            }
            match parse(&texts) {
                Ok(value) => {
                    self.replace(value);
                    tracing::info!(files = ?self.paths, what = self.what, "settings file changed; applied");
                    metrics::counter!(RELOADS, "file" => self.what, "result" => "applied")
                        .increment(1);
                }
                Err(e) => self.refused(&e.to_string()),
            }
            seen = Some(texts);
        }
    }

    fn refused(&self, reason: &str) {
        tracing::error!(files = ?self.paths, what = self.what, %reason, "settings file changed but cannot be used; the previous contents stay in force");
        metrics::counter!(RELOADS, "file" => self.what, "result" => "refused").increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<u32, String> {
        text.trim().parse::<u32>().map_err(|e| e.to_string())
    }

    #[test]
    fn an_unusable_file_stops_the_start() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n");
        assert!(matches!(
            Reloading::load(&path, "n", parse),
            Err(ReloadError::Read { .. })
        ));
        std::fs::write(&path, "x").unwrap();
        let err = Reloading::load(&path, "n", parse).unwrap_err();
        assert!(err.to_string().contains("invalid digit"), "{err}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_changed_file_applies_and_a_broken_one_keeps_the_old_contents() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n");
        std::fs::write(&path, "1").unwrap();
        let watched = Reloading::load(&path, "n", parse).unwrap();
        assert_eq!(*watched.current(), 1);
        let stop = CancellationToken::new();
        let task = tokio::spawn(
            watched
                .clone()
                .watch(Duration::from_secs(2), parse, stop.clone()),
        );
        let after_a_tick = || tokio::time::sleep(Duration::from_millis(2_100));

        std::fs::write(&path, "2").unwrap();
        after_a_tick().await;
        assert_eq!(*watched.current(), 2);

        std::fs::write(&path, "two").unwrap();
        after_a_tick().await;
        assert_eq!(*watched.current(), 2, "a broken file is not applied");
        std::fs::remove_file(&path).unwrap();
        after_a_tick().await;
        assert_eq!(*watched.current(), 2, "a missing file is not applied");

        std::fs::write(&path, "3").unwrap();
        after_a_tick().await;
        assert_eq!(*watched.current(), 3);
        stop.cancel();
        task.await.unwrap().unwrap();
    }
}
