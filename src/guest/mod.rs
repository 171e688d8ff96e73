//! The guest super-agent: owns the port, routes RPC to sub-agents, supervises
//! them.
//!
//! - [`port`]: the virtio-serial device or an emulated port.
//! - [`subagent`]: the sub-agent socket (JSON lines, `docs/subagent.md`).
//! - [`router`]: link messages ⇄ sub-agent requests, dedup, deadlines,
//!   backpressure, receipts (`took`).
//! - [`holding`]: requests waiting for a sub-agent to serve their topic.
//! - [`journal`]: the taken requests, kept across agent restarts.
//! - [`supervisor`]: the built-in `tether.supervisor` target; [`identity`]:
//!   the user and group a sub-agent runs as.
//! - [`config`]: the agent's TOML config.

pub mod config;
pub mod holding;
pub mod identity;
pub mod journal;
pub mod port;
pub mod router;
pub mod serial;
pub mod subagent;
pub mod supervisor;

use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::link::{Link, LinkOptions};
use config::AgentConfig;
use port::{PortConnector, PortError, PortSpec};
use supervisor::Supervisor;

/// Sub-agent events queued for the router.
const SUB_EVENTS: usize = 1024;

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The port.
    #[error(transparent)]
    Port(#[from] PortError),
    /// The journal of taken requests.
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    /// The sub-agent socket.
    #[error("cannot listen on the sub-agent socket {path}")]
    SubagentSocket {
        /// The path.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Run the agent until `shutdown` resolves, then stop sub-agents and flush
/// the link within the configured bound. Each value from `reload` (SIGHUP)
/// is a re-read config: the supervisor's section applies at once; other
/// changes need a restart and are logged as such.
pub async fn run(
    cfg: AgentConfig,
    shutdown: impl std::future::Future<Output = ()>,
    mut reload: mpsc::Receiver<AgentConfig>,
) -> Result<(), AgentError> {
    let spec = PortSpec::parse(&cfg.port);
    let connector = PortConnector::open(&spec, &cfg.serial)?;
    let journal = std::sync::Arc::new(std::sync::Mutex::new(journal::Journal::open(
        &cfg.state_dir,
    )?));
    let listener = subagent::bind(&cfg.subagent_socket, cfg.subagent_socket_group.as_deref())
        .map_err(|source| AgentError::SubagentSocket {
            path: cfg.subagent_socket.clone(),
            source,
        })?;
    let link = Link::spawn(
        connector,
        LinkOptions {
            name: cfg.port.clone(),
            session: cfg.link.clone(),
            ..LinkOptions::default()
        },
        crate::random_session_id(),
    );
    let (sub_tx, sub_rx) = mpsc::channel(SUB_EVENTS);
    let handover = subagent::Handover {
        journal: journal.clone(),
        link: link.tx.clone(),
    };
    let server = tokio::spawn(subagent::serve(listener, cfg.max_line, sub_tx, handover));
    let supervisor = Supervisor::new(cfg.supervisor.clone(), cfg.subagent_socket.clone());
    for s in &cfg.subagents {
        if let Err(f) = supervisor.start_configured(s.clone()).await {
            warn!(subagent = %s.name, error = %f.message, "configured sub-agent did not start");
        }
    }
    let (probe_handle, probe) = crate::sd::probe("router");
    crate::sd::ready(router::STATUS_WAITING);
    let watchdog = crate::sd::watchdog_interval()
        .map(|every| tokio::spawn(crate::sd::watchdog(every, vec![probe_handle])));
    info!(port = %cfg.port, socket = %cfg.subagent_socket.display(), "tether-agent ready");
    let reloader = {
        let (sup, old) = (supervisor.clone(), cfg.clone());
        tokio::spawn(async move {
            while let Some(new) = reload.recv().await {
                sup.set_config(new.supervisor.clone());
                let restart_needed = AgentConfig {
                    supervisor: old.supervisor.clone(),
                    subagents: old.subagents.clone(),
                    ..new
                } != old;
                crate::sd::reloaded();
                if restart_needed {
                    warn!(
                        "config reloaded: the supervisor section applies now; other changes need a restart"
                    );
                } else {
                    info!("config reloaded: supervisor settings applied");
                }
            }
        })
    };
    let Link { tx, rx, task } = link;
    let grace = Duration::from_millis(cfg.unserved_grace_ms);
    let router = router::Router::new(tx.clone(), supervisor.clone(), journal, grace);
    // The router runs as a task of its own and the signals are watched
    // here: a `select!` polls every pending branch each time it wakes, and
    // the router's wakes once per message — polling the signal futures
    // there cost every request some 1,500 instructions.
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let mut routing = tokio::spawn(router.run(
        rx,
        sub_rx,
        async move {
            let _ = stopped.await;
        },
        probe,
    ));
    let routed = tokio::select! {
        _ = shutdown => {
            let _ = stop.send(());
            (&mut routing).await
        }
        r = &mut routing => r,
    };
    if let Err(e) = routed
        && e.is_panic()
    {
        std::panic::resume_unwind(e.into_panic());
    }
    info!("shutting down: stopping sub-agents and flushing the link");
    crate::sd::stopping();
    if let Some(w) = watchdog {
        w.abort();
    }
    server.abort();
    reloader.abort();
    let grace = Duration::from_millis(cfg.supervisor.stop_grace_ms);
    supervisor.stop_all(grace).await;
    let flush = Duration::from_millis(cfg.shutdown_flush_ms);
    if tokio::time::timeout(flush, tx.flush()).await.is_err() {
        warn!(
            "link not flushed within shutdown_flush_ms; unacknowledged messages are lost with this process"
        );
    }
    task.close().await;
    let _ = std::fs::remove_file(&cfg.subagent_socket);
    Ok(())
}
