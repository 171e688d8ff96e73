//! The one reconnect backoff: capped, doubling, jittered. Used by every
//! path that retries — the link reconnecting to its port or channel socket,
//! the broker bridge reconnecting to RabbitMQ, the supervisor restarting a
//! sub-agent.
//!
//! Jitter ("equal jitter"): each wait is drawn uniformly from the upper
//! half of the current step, `[step/2, step]`. Without it every proxy of a
//! cloud retries RabbitMQ in step after a broker restart (they all lost it
//! at the same instant), and the broker meets each wave at once; with it,
//! the waves spread over half a step. The lower half is kept clear so that
//! a step still bounds how fast a path retries (a guest that makes its link
//! reset is relinked at most once per `max / 2`).

use std::time::Duration;

/// A capped, doubling, jittered backoff.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    step: Duration,
}

impl Backoff {
    /// Steps from `min` up to `max` (a `max` below `min` is taken as `min`).
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            step: min,
        }
    }

    /// Back to the first step (the path worked).
    pub fn reset(&mut self) {
        self.step = self.min;
    }

    /// The next step: twice this one, at most `max` (the path failed again).
    pub fn grow(&mut self) {
        self.step = self.step.saturating_mul(2).min(self.max);
    }

    /// The current step, before jitter.
    pub fn step(&self) -> Duration {
        self.step
    }

    /// How long to wait now: uniform in `[step/2, step]`.
    pub fn wait(&self) -> Duration {
        jitter(self.step, crate::random_u64())
    }
}

/// `step/2 + (r mod (step/2 + 1))` in nanoseconds: within `[step/2, step]`.
fn jitter(step: Duration, r: u64) -> Duration {
    let nanos = u64::try_from(step.as_nanos()).unwrap_or(u64::MAX);
    let half = nanos / 2;
    let spread = nanos - half; // the upper half, rounded up
    let extra = match spread.checked_add(1) {
        Some(m) => r % m,
        None => r,
    };
    Duration::from_nanos(half.saturating_add(extra))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_double_up_to_the_cap_and_reset() {
        let mut b = Backoff::new(Duration::from_millis(50), Duration::from_millis(300));
        let mut steps = vec![b.step()];
        for _ in 0..5 {
            b.grow();
            steps.push(b.step());
        }
        let ms: Vec<u128> = steps.iter().map(|d| d.as_millis()).collect();
        assert_eq!(ms, [50, 100, 200, 300, 300, 300]);
        b.reset();
        assert_eq!(b.step(), Duration::from_millis(50));
        // A cap below the start is the start.
        let b = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(b.step(), Duration::from_secs(2));
    }

    #[test]
    fn waits_stay_in_the_upper_half_and_spread_over_it() {
        let step = Duration::from_millis(1000);
        let b = Backoff::new(step, step);
        let waits: Vec<Duration> = (0..2000).map(|_| b.wait()).collect();
        assert!(waits.iter().all(|w| *w >= step / 2 && *w <= step));
        // Spread: every tenth of the range is hit (2000 draws, 10 buckets).
        let mut buckets = [0u32; 10];
        for w in &waits {
            let i = ((w.as_millis() - 500) / 50).min(9) as usize;
            buckets[i] += 1;
        }
        assert!(buckets.iter().all(|&n| n > 50), "{buckets:?}");
    }

    #[test]
    fn extreme_inputs_do_not_overflow() {
        assert_eq!(jitter(Duration::ZERO, u64::MAX), Duration::ZERO);
        let big = Duration::MAX;
        for r in [0, 1, u64::MAX] {
            let w = jitter(big, r);
            assert!(w >= Duration::from_nanos(u64::MAX / 2));
        }
        let mut b = Backoff::new(Duration::from_secs(u64::MAX / 2), Duration::MAX);
        b.grow();
        b.grow();
        assert_eq!(b.step(), Duration::MAX);
    }
}
