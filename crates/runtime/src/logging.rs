//! Log lines a peer can cause, kept to a budget: a flood of bad input must not become a flood of
//! log (or of disk).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Allows at most `per_second` log lines each second; the rest are dropped (count them in a
/// metric instead).
#[derive(Debug)]
pub struct LogBudget {
    per_second: u64,
    /// The second of the current window (Unix seconds) in the high 32 bits, lines spent in it
    /// in the low 32.
    window: AtomicU64,
}

impl LogBudget {
    /// A budget of `per_second` lines a second.
    pub const fn per_second(per_second: u64) -> LogBudget {
        LogBudget {
            per_second,
            window: AtomicU64::new(0),
        }
    }

    /// Whether a line may be written now.
    pub fn allow(&self) -> bool {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.allow_at(now)
    }

    fn allow_at(&self, second: u64) -> bool {
        let mut current = self.window.load(Ordering::Relaxed);
        loop {
            let (window, spent) = (current >> 32, current & 0xFFFF_FFFF);
            let next = if window == (second & 0xFFFF_FFFF) {
                if spent >= self.per_second {
                    return false;
                }
                current + 1
            } else {
                ((second & 0xFFFF_FFFF) << 32) | 1
            };
            match self.window.compare_exchange_weak(
                current,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(actual) => current = actual,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_budget_allows_its_lines_per_second_and_no_more() {
        let budget = LogBudget::per_second(3);
        let allowed = (0..1000).filter(|_| budget.allow_at(100)).count();
        assert_eq!(allowed, 3);
        assert!(budget.allow_at(101), "a new second, a new budget");
    }
}
