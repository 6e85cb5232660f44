//! How many cars fit: the process's descriptor limit, raised to what the system allows, and the
//! connection limit derived from it; and what happens when the descriptors run out anyway.

use std::time::Duration;

use ecars_runtime::settings::ConfigError;
use tokio::time::Instant;

/// Descriptors kept for everything but MQTT clients: the database pool, Kafka, the HTTP API and
/// its WebSockets, the embedded broker's own listeners and links, log files.
pub const RESERVED_DESCRIPTORS: u64 = 1024;

/// Raises the process's soft descriptor limit to its hard limit and returns the limit now in
/// force. A car costs one descriptor; the default soft limit (often 1024) would cap the fleet
/// long before memory does.
pub fn raise_descriptor_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            let current = rlimit::getrlimit(rlimit::Resource::NOFILE)
                .map(|(soft, _)| soft)
                .unwrap_or(1024);
            tracing::warn!(error = %e, current, "cannot raise the descriptor limit");
            current
        }
    }
}

/// The MQTT connection limit: `requested` if the descriptors allow it, otherwise an error that
/// names the setting; without a request, what the descriptors allow after the reserve.
pub fn connection_limit(requested: Option<usize>, descriptors: u64) -> Result<usize, ConfigError> {
    let available = descriptors.saturating_sub(RESERVED_DESCRIPTORS);
    match requested {
        None if available == 0 => Err(ConfigError::Invalid {
            setting: "the descriptor limit (ulimit -n)",
            reason: format!(
                "{descriptors} descriptors leave none for MQTT clients after {RESERVED_DESCRIPTORS} reserved; raise it"
            ),
        }),
        None => Ok(usize::try_from(available).unwrap_or(usize::MAX)),
        Some(n) if n as u64 <= available => Ok(n),
        Some(n) => Err(ConfigError::Invalid {
            setting: "--mqtt-max-connections / ECARS_MQTT_MAX_CONNECTIONS",
            reason: format!(
                "{n} connections need {} descriptors, but this process may open {descriptors} (ulimit -n); lower the setting to at most {available} or raise the limit",
                n as u64 + RESERVED_DESCRIPTORS
            ),
        }),
    }
}

/// Whether an accept error means the process or system ran out of descriptors or memory: the
/// listener is fine, and accepting again at once would fail again.
pub fn is_exhaustion(error: &std::io::Error) -> bool {
    matches!(
        error.raw_os_error(),
        Some(code) if code == libc_codes::EMFILE
            || code == libc_codes::ENFILE
            || code == libc_codes::ENOBUFS
            || code == libc_codes::ENOMEM
    )
}

/// The Linux error numbers of exhaustion (stable across Linux architectures).
mod libc_codes {
    pub(super) const ENOMEM: i32 = 12;
    pub(super) const ENFILE: i32 = 23;
    pub(super) const EMFILE: i32 = 24;
    pub(super) const ENOBUFS: i32 = 105;
}

/// Accept failures: a pause that grows while they last, and one log line per interval that says
/// how many there were, instead of a line per failure in a tight loop.
#[derive(Debug)]
pub struct AcceptFailures {
    pause: Duration,
    unlogged: u64,
    last_log: Option<Instant>,
}

/// Least pause after an exhaustion failure.
const FIRST_PAUSE: Duration = Duration::from_millis(10);
/// Longest pause.
const LONGEST_PAUSE: Duration = Duration::from_secs(1);
/// Least time between two log lines about accept failures.
pub const LOG_INTERVAL: Duration = Duration::from_secs(10);

impl Default for AcceptFailures {
    fn default() -> Self {
        AcceptFailures {
            pause: FIRST_PAUSE,
            unlogged: 0,
            last_log: None,
        }
    }
}

/// What to do after an accept failure.
#[derive(Debug, PartialEq, Eq)]
pub struct AfterFailure {
    /// How long to wait before accepting again.
    pub pause: Duration,
    /// `Some(n)`: log now that `n` accepts failed since the last line.
    pub log: Option<u64>,
}

impl AcceptFailures {
    /// Records a failure at `now`.
    pub fn failed(&mut self, exhaustion: bool, now: Instant) -> AfterFailure {
        self.unlogged += 1;
        let pause = if exhaustion {
            let pause = self.pause;
            self.pause = (self.pause * 2).min(LONGEST_PAUSE);
            pause
        } else {
            Duration::ZERO
        };
        let due = self
            .last_log
            .is_none_or(|last| now.duration_since(last) >= LOG_INTERVAL);
        let log = due.then(|| {
            self.last_log = Some(now);
            std::mem::take(&mut self.unlogged)
        });
        AfterFailure { pause, log }
    }

    /// An accept succeeded: the next failure pauses briefly again.
    pub fn succeeded(&mut self) {
        self.pause = FIRST_PAUSE;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_comes_from_the_descriptors_unless_set_and_a_setting_that_cannot_fit_is_refused() {
        assert_eq!(connection_limit(None, 20_000).unwrap(), 20_000 - 1024);
        assert_eq!(connection_limit(Some(5_000), 20_000).unwrap(), 5_000);
        let error = connection_limit(Some(20_000), 20_000).unwrap_err();
        assert!(
            error.to_string().contains("--mqtt-max-connections")
                && error.to_string().contains("18976"),
            "{error}"
        );
        assert!(connection_limit(None, 1000).is_err());
    }

    #[test]
    fn exhaustion_pauses_longer_and_longer_and_logs_once_per_interval() {
        let mut failures = AcceptFailures::default();
        let start = Instant::now();
        let first = failures.failed(true, start);
        assert_eq!(
            first,
            AfterFailure {
                pause: Duration::from_millis(10),
                log: Some(1)
            }
        );
        let mut logged = 0;
        let mut pauses = Vec::new();
        // 100,000 failures within one interval: no log line, pauses up to a second.
        for n in 0..100_000u32 {
            let after = failures.failed(true, start + Duration::from_micros(u64::from(n)));
            logged += u64::from(after.log.is_some());
            pauses.push(after.pause);
        }
        assert_eq!(logged, 0);
        assert_eq!(pauses[0], Duration::from_millis(20));
        assert_eq!(*pauses.last().unwrap(), Duration::from_secs(1));
        let later = failures.failed(true, start + LOG_INTERVAL);
        assert_eq!(later.log, Some(100_001), "one line says how many");
        failures.succeeded();
        assert_eq!(
            failures.failed(true, start + LOG_INTERVAL * 3).pause,
            Duration::from_millis(10)
        );
        let emfile = std::io::Error::from_raw_os_error(24);
        assert!(is_exhaustion(&emfile));
        assert!(!is_exhaustion(&std::io::Error::from_raw_os_error(104)));
    }
}
