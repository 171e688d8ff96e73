//! tether: RPC between a cloud's control plane and agents inside service VMs,
//! over a QEMU virtio-serial port, with nothing lost when the channel resets.
//!
//! # Layout
//! - [`link`]: the link protocol both ends share. [`link::frame`] and
//!   [`link::codec`] turn bytes into checksummed frames and resynchronise after
//!   garbage; [`link::session`] is the I/O-free state machine (sequencing,
//!   cumulative ACKs, send window, HELLO/resume, liveness, grace), with
//!   the HELLO payload in [`link::hello`] and its limits and timers, each
//!   with its reason, in [`link::config`];
//!   [`link::driver`] runs a session over any byte stream, reconnects, and
//!   bounds what a peer costs (a byte-bounded receive queue, a read rate
//!   limit: [`link::driver::throttle`]); its UNIX sockets, and every other
//!   UNIX stream of ours, are [`link::driver::quiet`]'s, woken by the
//!   reactor only when there is something to read or a write waits.
//! - [`rpc`]: the RPC envelope carried in link messages; the duplicate window.
//! - [`guest`]: the agent — the port ([`guest::port`]; a serial line,
//!   [`guest::serial`]), the router to sub-agents ([`guest::router`]: the
//!   host's requests in `intake.rs`, the sub-agents' events in `subs.rs`,
//!   their messages to the control plane in `upstream.rs`; with the
//!   requests it holds for unserved topics, [`guest::holding`], and the
//!   journal of taken requests, [`guest::journal`]), the sub-agent socket,
//!   the supervisor (and the user and group a sub-agent runs as,
//!   [`guest::identity`]).
//! - [`host`]: the proxy — the channels directory ([`host::channels`]:
//!   instance ids from the sockets' names), one [`host::instance`] per VM (with its
//!   requests no sub-agent took yet, [`host::receipts`]), the control
//!   socket, [`host::policy`] (the one enforcement point for guest traffic:
//!   profiles, names, context, reply handles, audit) and [`host::broker`]
//!   (oslo.messaging over RabbitMQ: its wire format, [`host::broker::wire`];
//!   deliveries into guests, acknowledged once a sub-agent took them, in
//!   `host/broker/deliver.rs`; one connection's work in
//!   `host/broker/session/`, guest messages published pipelined in its
//!   `upstream.rs`; each instance's share of it,
//!   [`host::broker::share`]; oslo's transport URL, [`host::broker::url`]);
//!   the Prometheus endpoint, [`host::metrics`], and the guest agents' own
//!   numbers it shows, [`host::agent_stats`].
//! - [`client`]: the Rust API for sub-agents.
//! - Cargo features: `proxy` (default) builds [`host`] and the proxy's
//!   dependencies (AMQP, TLS, crypto, metrics); the guest's programs build
//!   without it (`--no-default-features`).
//! - [`config`], [`daemon`], [`sd`]: config loading, start-up helpers
//!   (logging, signals, sockets), systemd notification and the watchdog;
//!   [`backoff`]: the one jittered backoff every retry path uses;
//!   [`logbudget`]: what one peer may make a daemon log.
//! - [`testing`]: support for tests and benchmarks that want real sockets with
//!   faults: a deterministic RNG and a fault-injecting UNIX socket relay.
//!
//! The wire protocol is specified in `docs/protocol.md`, the security model in
//! `docs/security.md`; measurements are in `docs/BENCHMARKS.md`.

// Nothing a peer or a file sends may panic the library: no unwrap, expect
// or unchecked indexing outside tests.
#![cfg_attr(
    not(test),
    deny(clippy::unwrap_used, clippy::expect_used, clippy::indexing_slicing)
)]

pub mod backoff;
pub mod client;
pub mod config;
pub mod daemon;
pub mod guest;
#[cfg(feature = "proxy")]
pub mod host;
pub mod link;
pub mod logbudget;
pub mod rpc;
pub mod sd;
pub mod testing;

/// 64 random bits that never block: std's `RandomState` keys (seeded by the
/// kernel without waiting for the entropy pool) hashed with the time, the
/// process id and a counter. Early in a VM's boot, with no entropy yet,
/// `getrandom()` blocks for minutes; these ids need to be unique, not secret
/// (identity comes from the host side, never from them).
pub fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    h.write_u128(nanos);
    // The process id, read once: `getpid` is a system call each time (glibc
    // does not cache it), and ids are made several times per request. The
    // daemons never fork without exec, so it cannot go stale.
    static PID: std::sync::OnceLock<u32> = std::sync::OnceLock::new();
    h.write_u32(*PID.get_or_init(std::process::id));
    h.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    h.finish()
}

/// Lock `m`, taking over a poisoned lock: a panic elsewhere while it was
/// held leaves plain bookkeeping, which is better served than a daemon that
/// panics on every later use.
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// An error and its causes on one line, for logs and status fields
/// (messages never repeat their source, so this prints each once).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Wall-clock milliseconds since the Unix epoch (0 if the clock is before
/// it), for status fields an operator compares across hosts.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A fresh random session id for this process run (never 0).
pub fn random_session_id() -> link::SessionId {
    random_u64().max(1)
}
