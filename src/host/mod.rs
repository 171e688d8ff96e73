//! The host proxy: one link per VM channel socket, the control socket, and
//! the enforcement point for guest traffic.
//!
//! - [`channels`]: finds `<instance-uuid>.sock` files (inotify).
//! - [`instance`]: one VM's link, topics and calls in flight.
//! - [`policy`]: the enforcement point.
//! - [`control`]: the control socket (JSON lines, `docs/control.md`).
//! - [`config`]: the proxy's TOML config.

pub mod broker;
pub mod channels;
pub mod config;
pub mod control;
pub mod instance;
pub mod policy;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, mpsc};
use tracing::{debug, info, warn};

use config::ProxyConfig;
use instance::{Instance, WatchEvent};

/// Guest casts buffered for each `watch` client; a client that falls further
/// behind is told how many it missed.
pub const WATCH_BUFFER: usize = 4096;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The control socket.
    #[error("cannot listen on the control socket {path}")]
    ControlSocket {
        /// The path.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The proxy's shared state.
pub struct Proxy {
    /// The configuration.
    pub cfg: Arc<ProxyConfig>,
    instances: Mutex<BTreeMap<String, Arc<Instance>>>,
    watch: broadcast::Sender<WatchEvent>,
    /// To the broker bridge, when a broker is configured.
    upstream: Option<broker::Outlet>,
    /// The broker bridge's state (`broker` on the control socket).
    pub bridge: Arc<broker::StatusCell>,
}

impl Proxy {
    /// A proxy with no instances yet.
    pub fn new(cfg: ProxyConfig) -> Arc<Self> {
        Self::with_upstream(cfg, None)
    }

    fn with_upstream(
        cfg: ProxyConfig,
        upstream: Option<mpsc::Sender<broker::Upstream>>,
    ) -> Arc<Self> {
        let bridge = Arc::new(broker::StatusCell::default());
        Arc::new(Self {
            cfg: Arc::new(cfg),
            instances: Mutex::new(BTreeMap::new()),
            watch: broadcast::channel(WATCH_BUFFER).0,
            upstream: upstream.map(|tx| broker::Outlet::new(tx, bridge.clone())),
            bridge,
        })
    }

    fn map(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Instance>>> {
        crate::lock(&self.instances)
    }

    /// The instance with this id, if linked.
    pub fn instance(&self, id: &str) -> Option<Arc<Instance>> {
        self.map().get(&id.to_ascii_lowercase()).cloned()
    }

    /// Every instance.
    pub fn instances(&self) -> Vec<Arc<Instance>> {
        self.map().values().cloned().collect()
    }

    /// Subscribe to guest casts.
    pub fn subscribe(&self) -> broadcast::Receiver<WatchEvent> {
        self.watch.subscribe()
    }

    /// Link a channel if it is new.
    pub fn ensure(&self, c: channels::Channel) {
        let mut m = self.map();
        if let Some(inst) = m.get(&c.instance) {
            // The socket came back (a VM migrated in, QEMU restarted): the
            // link need not wait out its reconnect backoff.
            debug!(instance = %c.instance, "channel socket appeared again");
            inst.tx.retry_now();
            return;
        }
        if m.len() >= self.cfg.max_links {
            warn!(instance = %c.instance, max_links = self.cfg.max_links, "too many links; channel ignored");
            return;
        }
        info!(instance = %c.instance, socket = %c.path.display(), "new channel");
        let inst = Instance::spawn(
            c.instance.clone(),
            c.path,
            self.cfg.link.clone(),
            self.cfg.policy.clone(),
            self.watch.clone(),
            self.upstream.clone(),
        );
        m.insert(c.instance, inst);
    }

    /// An instance's socket went: drop its connection now (its session
    /// waits out the grace period; the socket may come back).
    pub fn gone(&self, id: &str) {
        if let Some(inst) = self.map().get(id) {
            info!(instance = %id, "channel socket gone");
            inst.tx.drop_connection();
        }
    }

    /// Close every link.
    pub async fn close_all(&self) {
        let all: Vec<_> = std::mem::take(&mut *self.map()).into_values().collect();
        for i in all {
            i.close().await;
        }
    }
}

/// Run the proxy until `shutdown` resolves.
pub async fn run(
    cfg: ProxyConfig,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), ProxyError> {
    let listener =
        control::bind(&cfg.control_socket).map_err(|source| ProxyError::ControlSocket {
            path: cfg.control_socket.clone(),
            source,
        })?;
    let (up_tx, up_rx) = if cfg.broker.enabled() {
        let (t, r) = mpsc::channel(cfg.broker.upstream_hold);
        (Some(t), Some(r))
    } else {
        (None, None)
    };
    let proxy = Proxy::with_upstream(cfg, up_tx);
    let bridge =
        up_rx.map(|rx| tokio::spawn(broker::run(proxy.clone(), proxy.cfg.broker.clone(), rx)));
    let (ch_tx, mut ch_rx) = mpsc::channel(1024);
    let dir = proxy.cfg.channels_dir.clone();
    let watcher = tokio::spawn(async move {
        if let Err(e) = channels::watch(dir.clone(), ch_tx).await {
            tracing::error!(dir = %dir.display(), error = %e, "cannot watch the channels directory");
        }
    });
    let server = tokio::spawn(control::serve(listener, proxy.clone()));
    crate::sd::notify("READY=1");
    if let Some(every) = crate::sd::watchdog_interval() {
        tokio::spawn(crate::sd::watchdog(every));
    }
    info!(channels = %proxy.cfg.channels_dir.display(), control = %proxy.cfg.control_socket.display(), "tether-proxy ready");
    tokio::pin!(shutdown);
    let mut watching = true;
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            c = ch_rx.recv(), if watching => match c {
                Some(channels::ChannelEvent::Appeared(c)) => proxy.ensure(c),
                Some(channels::ChannelEvent::Gone(id)) => proxy.gone(&id),
                // The watcher ended (logged above): keep serving what we have.
                None => watching = false,
            },
        }
    }
    info!("shutting down");
    crate::sd::notify("STOPPING=1");
    watcher.abort();
    server.abort();
    if let Some(b) = bridge {
        b.abort();
    }
    proxy.close_all().await;
    let _ = std::fs::remove_file(&proxy.cfg.control_socket);
    Ok(())
}
