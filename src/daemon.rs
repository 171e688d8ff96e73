//! Start-up helpers shared by the daemons: logging and the shutdown signal.

use tracing_subscriber::EnvFilter;

/// Log to stderr (journald picks it up), level from `RUST_LOG` or `default`.
/// By default the AMQP client's own warnings are off: it warns once per
/// message the broker returns (a guest's cast nothing consumes), which the
/// bridge already counts and audits — one guest must not decide the log
/// volume.
pub fn init_logging(default: &str) {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{default},lapin=error")));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// Resolves on SIGTERM or SIGINT.
pub async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
}

/// One item per SIGHUP (a reload request); none if the handler cannot be
/// installed (logged). Bursts coalesce: one pending reload covers them.
pub fn hangups() -> tokio::sync::mpsc::Receiver<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    match signal(SignalKind::hangup()) {
        Ok(mut hup) => {
            tokio::spawn(async move {
                while hup.recv().await.is_some() {
                    tracing::info!("SIGHUP: reloading");
                    let _ = tx.try_send(());
                }
            });
        }
        Err(e) => tracing::error!(error = %e, "cannot handle SIGHUP; reload by restarting"),
    }
    rx
}

/// Listen on a UNIX socket at `path` with `mode`, replacing a stale socket
/// file. The socket is bound under a temporary name, given its mode, and then
/// renamed into place: a client never finds the path before it listens, nor
/// with looser permissions.
pub fn bind_unix(path: &std::path::Path, mode: u32) -> std::io::Result<tokio::net::UnixListener> {
    bind_unix_owned(path, mode, None)
}

/// [`bind_unix`], the socket's group set too (before it appears at `path`).
fn bind_unix_owned(
    path: &std::path::Path,
    mode: u32,
    gid: Option<nix::unistd::Gid>,
) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    let _ = std::fs::remove_file(&tmp);
    let l = tokio::net::UnixListener::bind(&tmp)?;
    if gid.is_some() {
        nix::unistd::chown(&tmp, None, gid)?;
    }
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path)?;
    Ok(l)
}

/// Bind a UNIX socket for local clients ([`bind_unix`], mode 0600); with
/// `group`, give that group access (0660) — for operators in that group
/// (the control socket) or sub-agents running as other users (the
/// sub-agent socket). The socket appears at `path` with its final group
/// and mode (set before the rename), so no client ever sees it otherwise.
/// A group that does not exist leaves the socket 0600 (closed; root still
/// connects), with a warning: the daemon does not refuse to start over it.
pub fn bind_unix_for(
    path: &std::path::Path,
    group: Option<&str>,
) -> std::io::Result<tokio::net::UnixListener> {
    let gid = group.and_then(|g| match nix::unistd::Group::from_name(g) {
        Ok(Some(grp)) => Some(grp.gid),
        Ok(None) => {
            tracing::warn!(group = g, socket = ?path, "no such group: the socket stays 0600");
            None
        }
        Err(e) => {
            tracing::warn!(group = g, socket = ?path, error = %e, "cannot look up the group: the socket stays 0600");
            None
        }
    });
    match gid {
        Some(gid) => bind_unix_owned(path, 0o660, Some(gid)),
        None => bind_unix(path, 0o600),
    }
}

/// The daemons' runtime: two worker threads (the machines tether runs on are
/// small, and one link task per VM needs no more).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}
