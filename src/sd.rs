//! systemd notifications (`sd_notify`) without libsystemd: one datagram to
//! `$NOTIFY_SOCKET`. Harmless when not run by systemd.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// Send `state` (for example `READY=1` or `STATUS=...`). Returns whether a
/// notification socket was there and took it.
pub fn notify(state: &str) -> bool {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
        return false;
    };
    let Ok(sock) = UnixDatagram::unbound() else {
        return false;
    };
    let bytes = path.as_encoded_bytes();
    let sent = if let Some(name) = bytes.strip_prefix(b"@") {
        // An abstract socket name.
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name)
            .and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), &path)
    };
    sent.is_ok()
}

/// The watchdog interval systemd asked for, halved (ping twice per period).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// Ping the watchdog forever (spawn it when [`watchdog_interval`] is set).
pub async fn watchdog(every: Duration) {
    let mut t = tokio::time::interval(every);
    loop {
        t.tick().await;
        notify("WATCHDOG=1");
    }
}
