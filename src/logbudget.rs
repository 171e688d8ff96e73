//! A per-peer log budget: what one guest's behaviour makes a daemon log is
//! bounded. Each link and each instance gets its own [`LogBudget`]: at most
//! [`LOG_LINES_PER_SEC`] lines in any one-second window; lines past it are
//! counted, and the next line that is allowed says how many were
//! suppressed. The counters that matter stay exact elsewhere (`tetherctl
//! links`, the audit summaries); the log is for reading.

use std::time::{Duration, Instant};

/// Lines one peer may cause per second, per budget: a guest has two (its
/// link's and its instance's), so at most 10 a second in all.
pub const LOG_LINES_PER_SEC: u32 = 5;

const WINDOW: Duration = Duration::from_secs(1);

/// One peer's budget.
#[derive(Debug, Clone)]
pub struct LogBudget {
    window_start: Option<Instant>,
    used: u32,
    suppressed: u64,
}

impl Default for LogBudget {
    fn default() -> Self {
        Self::new()
    }
}

impl LogBudget {
    /// A full budget.
    pub fn new() -> Self {
        Self {
            window_start: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// May one more line be logged at `now`? `Some(n)`: yes, and `n` lines
    /// were suppressed since the last one logged (say so in it); `None`:
    /// no (it is counted).
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        let fresh = self
            .window_start
            .is_none_or(|s| now.saturating_duration_since(s) >= WINDOW);
        if fresh {
            self.window_start = Some(now);
            self.used = 0;
        }
        if self.used >= LOG_LINES_PER_SEC {
            self.suppressed = self.suppressed.saturating_add(1);
            return None;
        }
        self.used += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_few_lines_a_second_and_the_rest_counted() {
        let mut b = LogBudget::new();
        let t = Instant::now();
        let allowed = (0..1000).filter(|_| b.allow(t).is_some()).count();
        assert_eq!(allowed, LOG_LINES_PER_SEC as usize);
        let rest = 1000 - u64::from(LOG_LINES_PER_SEC);
        assert_eq!(b.allow(t + WINDOW), Some(rest), "the next line says so");
        assert_eq!(b.allow(t + WINDOW), Some(0));
    }
}
