//! tether: RPC between a cloud's control plane and agents inside service VMs,
//! over a QEMU virtio-serial port, with nothing lost when the channel resets.
//!
//! # Layout
//! - [`link`]: the link protocol both ends share. [`link::frame`] and
//!   [`link::codec`] turn bytes into checksummed frames and resynchronise after
//!   garbage; [`link::session`] is the I/O-free state machine (sequencing,
//!   cumulative ACKs, send window, HELLO/resume, liveness, grace);
//!   [`link::driver`] runs a session over any byte stream and reconnects.
//! - [`testing`]: support for tests and benchmarks that want real sockets with
//!   faults: a deterministic RNG and a fault-injecting UNIX socket relay.
//!
//! The wire protocol is specified in `docs/protocol.md`; measurements are in
//! `docs/BENCHMARKS.md`.

// Nothing a peer or a file sends may panic the library: no unwrap, expect
// or unchecked indexing outside tests.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod client;
pub mod config;
pub mod daemon;
pub mod guest;
pub mod host;
pub mod link;
pub mod rpc;
pub mod sd;
pub mod testing;

/// A fresh random session id for this process run (never 0).
///
/// Falls back to a mix of the time and the process id if the OS random source
/// fails: uniqueness matters here, unpredictability does not (identity comes
/// from the host side, never from a session id).
pub fn random_session_id() -> link::SessionId {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_ok() {
        return u64::from_le_bytes(b).max(1);
    }
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    testing::SplitMix64::new(t ^ u64::from(std::process::id()) << 32)
        .next_u64()
        .max(1)
}
