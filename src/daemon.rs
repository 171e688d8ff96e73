//! Start-up helpers shared by the daemons: logging and the shutdown signal.

use tracing_subscriber::EnvFilter;

/// How the daemons write their log (`--log-format`, or `TETHER_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum LogFormat {
    /// One line of text per event: level, target, message, fields.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `target`, `fields`,
    /// `spans`), for log shippers.
    Json,
}

/// Log to stderr, level from `RUST_LOG` or `default`.
///
/// - Colours only on a terminal (and not when `NO_COLOR` is set): a file,
///   a pipe or the journal gets no escape bytes.
/// - Every line names its target (`tether::host::instance`, `audit`, …):
///   `RUST_LOG` filters by it, and the audit trail is told apart by it.
/// - Under journald (`JOURNAL_STREAM` names our stderr) text lines carry
///   no timestamp: the journal stamps each line itself.
///
/// By default the AMQP client's own warnings are off: it warns once per
/// message the broker returns (a guest's cast nothing consumes), which the
/// bridge already counts and audits — one guest must not decide the log
/// volume.
/// So is its error per channel the broker closes ([`is_broker_close`]):
/// the broker closes the publishing channel over each guest message to an
/// exchange that does not exist, and the bridge already refuses and audits
/// each such message within the audit log's budget. `RUST_LOG` set turns
/// the warnings back on; the channel errors come back only with a
/// `RUST_LOG` that names `lapin` (the tests, and operators, set
/// `RUST_LOG=info` without wanting one guest to fill the log).
pub fn init_logging(default: &str, format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| EnvFilter::new(format!("{default},lapin=error")));
    let quiet = !std::env::var("RUST_LOG").is_ok_and(|v| v.contains("lapin"));
    let closes = tracing_subscriber::filter::filter_fn(move |m| !(quiet && is_broker_close(m)));
    let no_color = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    let ansi = std::io::stderr().is_terminal() && !no_color;
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true)
        .with_ansi(ansi);
    let _ = match format {
        LogFormat::Json => b.json().finish().with(closes).try_init(),
        LogFormat::Text if stderr_is_journal() => b.without_time().finish().with(closes).try_init(),
        LogFormat::Text => b.finish().with(closes).try_init(),
    };
}

/// The AMQP client's error event for a channel (or connection) the broker
/// closed: target `lapin::channel`, level ERROR, with the fields `channel`,
/// `method` (the broker's `Close`, with its reply code and text) and
/// `error`. One per guest message the broker refuses; the bridge reports
/// those itself (audit, `refused`, `last_error`, "broker connection lost").
pub fn is_broker_close(m: &tracing::Metadata<'_>) -> bool {
    let f = m.fields();
    m.is_event()
        && *m.level() == tracing::Level::ERROR
        && m.target() == "lapin::channel"
        && f.field("channel").is_some()
        && f.field("method").is_some()
        && f.field("error").is_some()
}

/// Whether stderr is the journal's stream: systemd sets `JOURNAL_STREAM`
/// to its `device:inode` (systemd.exec(5)); a redirected stderr no longer
/// matches it.
fn stderr_is_journal() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    match std::fs::metadata("/proc/self/fd/2") {
        Ok(m) => dev.parse() == Ok(m.dev()) && ino.parse() == Ok(m.ino()),
        Err(_) => false,
    }
}

/// Print `cmd`'s manual page (roff, section 8: a system daemon) to stdout:
/// the daemons' hidden `--man`, which packaging runs.
pub fn print_man(cmd: clap::Command) -> std::io::Result<()> {
    clap_mangen::Man::new(cmd)
        .section("8")
        .render(&mut std::io::stdout())
}

/// Resolves on SIGTERM or SIGINT. The handlers are installed when this is
/// called (inside the runtime), not when the future is first polled: a
/// SIGTERM that comes while the daemon is still starting is then a clean
/// shutdown as soon as it runs, not the signal's default (death, leaving
/// its socket files behind).
pub fn terminated() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{SignalKind, signal};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    );
    async move {
        let (Ok(mut term), Ok(mut int)) = handlers else {
            tracing::error!("cannot handle SIGTERM/SIGINT: stop with SIGKILL");
            std::future::pending::<()>().await;
            return;
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
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

/// The agent's runtime: one thread. A guest has a vCPU or a few and the
/// agent's work is moving bytes between a port and a few sockets: with two
/// worker threads every hand-off between its tasks could be a wake-up of the
/// other thread (a futex and a context switch, each costly in a VM),
/// measured in docs/BENCHMARKS.md. Blocking work still goes to tokio's
/// blocking pool.
pub fn agent_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

/// The proxy's runtime: two worker threads (the machines tether runs on are
/// small, and one link task per VM needs no more).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
}
