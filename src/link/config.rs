//! Session limits and timers, each with the reason for its default.

use std::time::Duration;

use serde::Deserialize;

use super::LinkError;
use super::frame::MAX_PAYLOAD_HARD;
use super::hello::MIN_MAX_PAYLOAD;

/// Default largest payload: 256 KiB. Big enough for any RPC envelope the
/// control plane sends in practice, small enough that a link's decoder buffer
/// (one frame) stays cheap with thousands of links.
pub const DEFAULT_MAX_PAYLOAD: u32 = 256 * 1024;
/// Default send window in frames: enough to keep the port busy across one
/// delayed-ACK period at the measured 96 MiB/s with 1 KiB messages.
pub const DEFAULT_WINDOW_FRAMES: u32 = 1024;
/// Default send window in bytes: bounds what a link keeps for resending.
pub const DEFAULT_WINDOW_BYTES: u32 = 4 * 1024 * 1024;
/// Upper bound on the frame window: past this an unacked queue is no longer
/// "bounded memory per link".
pub const MAX_WINDOW_FRAMES: u32 = 65_536;
/// Upper bound on the byte window (64 MiB).
pub const MAX_WINDOW_BYTES: u32 = 64 * 1024 * 1024;

/// Limits and timers of one session. Deserialisable so the daemons can take it
/// straight from their TOML files; [`SessionConfig::validate`] checks it once.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// Largest payload accepted from the peer and sent to it (bytes).
    pub max_payload: u32,
    /// Most unacknowledged DATA frames kept; `send` reports backpressure past it.
    pub window_frames: u32,
    /// Most unacknowledged payload bytes kept.
    pub window_bytes: u32,
    /// Send a standalone ACK after this many received frames at the latest.
    pub ack_every: u32,
    /// ... or after this delay, whichever comes first (unless a DATA frame
    /// carried the ACK already).
    #[serde(with = "millis")]
    pub ack_delay: Duration,
    /// PING when nothing has been received for this long.
    #[serde(with = "millis")]
    pub ping_interval: Duration,
    /// PING as a loss probe when sent frames stay unacknowledged this long.
    #[serde(with = "millis")]
    pub probe_after: Duration,
    /// Give up on a connection when nothing has been received for this long.
    #[serde(with = "millis")]
    pub dead_after: Duration,
    /// Resend our HELLO while the peer's has not come, at this interval.
    #[serde(with = "millis")]
    pub hello_retry: Duration,
    /// Keep the session (unacked frames, peer state) this long while
    /// disconnected: a VM paused for migration or suspend is not dead.
    #[serde(with = "millis")]
    pub grace: Duration,
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            max_payload: DEFAULT_MAX_PAYLOAD,
            window_frames: DEFAULT_WINDOW_FRAMES,
            window_bytes: DEFAULT_WINDOW_BYTES,
            // 32 frames or 5 ms: one ACK per 32 KiB port write at 1 KiB messages,
            // and well under a TCG round trip's worth of added latency.
            ack_every: 32,
            ack_delay: Duration::from_millis(5),
            ping_interval: Duration::from_secs(5),
            // 200 ms: a frame lost on a reset is found again this soon.
            // (About 1 % of host->guest frames once waited this long in the
            // guest — a lost wake-up the agent caused, since removed:
            // docs/virtio-serial.md; tests/vm.rs counts probes.)
            probe_after: Duration::from_millis(200),
            // Six missed pings: a TCG guest under load can stall for seconds.
            dead_after: Duration::from_secs(30),
            hello_retry: Duration::from_secs(1),
            // Migration measured at 0.7-2.6 s; an hour covers a suspended VM too.
            grace: Duration::from_secs(3600),
        }
    }
}

impl SessionConfig {
    /// Check every value once, at start-up or config load.
    pub fn validate(&self) -> Result<(), LinkError> {
        let bad = |what: &str| Err(LinkError::InvalidConfig(what.to_string()));
        if !(MIN_MAX_PAYLOAD..=MAX_PAYLOAD_HARD).contains(&self.max_payload) {
            return bad("max_payload must be between 1024 and 16777216");
        }
        if !(super::hello::MIN_WINDOW_FRAMES..=MAX_WINDOW_FRAMES).contains(&self.window_frames) {
            return bad("window_frames must be between 4 and 65536");
        }
        if self.window_bytes < self.max_payload || self.window_bytes > MAX_WINDOW_BYTES {
            return bad("window_bytes must be at least max_payload and at most 64 MiB");
        }
        if self.ack_every == 0 {
            return bad("ack_every must be at least 1");
        }
        let zero = Duration::ZERO;
        if self.ping_interval == zero || self.probe_after == zero || self.hello_retry == zero {
            return bad("ping_interval, probe_after and hello_retry must be above 0");
        }
        if self.dead_after <= self.ping_interval {
            return bad("dead_after must be longer than ping_interval");
        }
        Ok(())
    }
}

/// Durations in config files are integer milliseconds.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        u64::deserialize(d).map(Duration::from_millis)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_bad_values_are_named() {
        SessionConfig::default().validate().unwrap();
        let c = SessionConfig {
            window_bytes: 10,
            ..Default::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("window_bytes"), "{e}");
        let c = SessionConfig {
            max_payload: u32::MAX,
            ..Default::default()
        };
        assert!(c.validate().is_err());
    }
}
