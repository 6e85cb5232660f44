//! What a listener does when `accept` fails: mostly the descriptor limit, when a flood of
//! connections (cars, HTTP clients, an attacker) has used every descriptor. Retrying at once
//! would fail again in a tight loop and log a line per failure (a measured 16–20 GB of log in
//! a few minutes); instead the pause grows while failures last and one line per interval says
//! how many there were. The MQTT and HTTP listeners share this policy.

use std::time::Duration;

use tokio::time::Instant;

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
