//! The host proxy: one link per VM channel socket, the control socket, and
//! the enforcement point for guest traffic.
//!
//! - [`channels`]: finds `<instance-uuid>.sock` files (inotify).
//! - [`instance`]: one VM's link, topics and calls in flight.
//! - [`policy`]: the enforcement point, profiles, reply handles, audit.
//! - [`receipts`]: requests sent into a guest and not yet taken by a
//!   sub-agent (kept, and sent again to a new guest session).
//! - [`control`]: the control socket (JSON lines, `docs/control.md`).
//! - [`config`]: the proxy's TOML config.

pub mod agent_stats;
pub mod broker;
pub mod channels;
pub mod config;
pub mod control;
pub mod instance;
pub mod metrics;
pub mod policy;
pub mod receipts;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{broadcast, mpsc};
use tracing::{debug, error, info, warn};

use config::ProxyConfig;
use instance::{Instance, WatchEvent};

/// Guest casts buffered for each `watch` client; a client that falls further
/// behind is told how many it missed.
pub const WATCH_BUFFER: usize = 4096;

/// Why the proxy could not start.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// The policy (reply keys, assignments, audit log).
    #[error("the policy cannot be loaded")]
    Policy(#[from] policy::store::PolicyError),
    /// The control socket.
    #[error("cannot listen on the control socket {path}")]
    ControlSocket {
        /// The path.
        path: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The `[broker]` section.
    #[error("{0}")]
    Broker(String),
    /// The metrics endpoint.
    #[error("cannot listen for metrics on {addr}")]
    Metrics {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The channels directory.
    #[error("cannot watch the channels directory {path}")]
    Channels {
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
    /// Instances whose socket went, and since when.
    gone_since: Mutex<std::collections::HashMap<String, std::time::Instant>>,
    watch: broadcast::Sender<WatchEvent>,
    /// To the broker bridge, when a broker is configured.
    upstream: Option<broker::Outlet>,
    /// The broker bridge's state (`broker` on the control socket).
    pub bridge: Arc<broker::StatusCell>,
    /// The policy every instance is held to.
    pub policy: Arc<policy::store::PolicyHub>,
    /// The config file, re-read for the policy on reload.
    config_path: Option<std::path::PathBuf>,
}

impl Proxy {
    /// A proxy with no instances yet (no broker; the config file, if
    /// any, is re-read for the policy on [`Proxy::reload`]).
    pub fn new(
        cfg: ProxyConfig,
        config_path: Option<std::path::PathBuf>,
    ) -> Result<Arc<Self>, ProxyError> {
        Self::with_upstream(cfg, config_path, None)
    }

    fn with_upstream(
        cfg: ProxyConfig,
        config_path: Option<std::path::PathBuf>,
        upstream: Option<mpsc::Sender<broker::Upstream>>,
    ) -> Result<Arc<Self>, ProxyError> {
        let bridge = Arc::new(broker::StatusCell::default());
        let policy = policy::store::PolicyHub::new(&cfg.policy, &cfg.broker.control_exchange)?;
        let share = (
            cfg.broker.upstream_per_instance,
            cfg.broker.upstream_bytes_per_instance,
        );
        Ok(Arc::new(Self {
            cfg: Arc::new(cfg),
            instances: Mutex::new(BTreeMap::new()),
            gone_since: Mutex::default(),
            watch: broadcast::channel(WATCH_BUFFER).0,
            upstream: upstream.map(|tx| broker::Outlet::new(tx, bridge.clone(), share.0, share.1)),
            bridge,
            policy: Arc::new(policy),
            config_path,
        }))
    }

    /// Re-read the policy (SIGHUP): the `[policy]` section of the config
    /// file, the reply keys and every instance's assignment; reopen the
    /// audit log. Links stay up. A bad config or key file leaves the whole
    /// running policy in place; a bad assignment leaves that instance's.
    /// How many instances now run under a changed policy.
    pub fn reload(&self) -> Result<usize, String> {
        let pcfg = match &self.config_path {
            Some(p) => {
                let mut c = ProxyConfig::load(p).map_err(|e| crate::error_chain(&e))?;
                // Command-line overrides stay as they were.
                c.channels_dir.clone_from(&self.cfg.channels_dir);
                c.control_socket.clone_from(&self.cfg.control_socket);
                let mut running = (*self.cfg).clone();
                running.policy = c.policy.clone();
                if running != c {
                    warn!("reload: only [policy] changes apply; restart the proxy for the others");
                }
                if c.policy.audit_log != self.cfg.policy.audit_log {
                    warn!("reload: a new policy.audit_log path applies only after a restart");
                }
                c.policy
            }
            None => self.cfg.policy.clone(),
        };
        let store = policy::store::PolicyStore::load(&pcfg, &self.cfg.broker.control_exchange)
            .map_err(|e| crate::error_chain(&e))?;
        if let Err(e) = self.policy.audit.reopen() {
            error!(error = %e, "cannot reopen the audit log; it stays on the old file");
        }
        let mut changed = 0;
        for inst in self.instances() {
            match store.effective(&inst.id) {
                Ok(e) => {
                    if *inst.policy() != e {
                        changed += 1;
                        info!(instance = %inst.id, profile = ?e.profile_name, mode = e.profile.mode.name(), "instance policy changed");
                        inst.set_policy(Arc::new(e));
                    }
                }
                Err(e) => {
                    error!(instance = %inst.id, error = %crate::error_chain(&e), "bad instance policy refused; the instance keeps its running policy");
                }
            }
        }
        self.policy.replace(store);
        Ok(changed)
    }

    /// The policy of `instance`: the running one if it is linked, else what
    /// it would get now.
    pub fn policy_of(&self, instance: &str) -> (bool, Arc<policy::Effective>) {
        let id = instance.to_ascii_lowercase();
        match self.instance(&id) {
            Some(i) => (true, i.policy()),
            None => (false, self.policy.for_new(&id)),
        }
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
        crate::lock(&self.gone_since).remove(&c.instance);
        info!(instance = %c.instance, socket = %c.path.display(), "new channel");
        let inst = Instance::spawn(
            c.instance.clone(),
            c.path,
            self.cfg.link.clone(),
            self.policy.clone(),
            self.watch.clone(),
            self.upstream.clone(),
            self.cfg.guest_read_bytes_per_sec,
        );
        m.insert(c.instance, inst);
    }

    /// An instance's socket went: drop its connection now (its session
    /// waits out the grace period; the socket may come back).
    pub fn gone(&self, id: &str) {
        if let Some(inst) = self.map().get(id) {
            info!(instance = %id, "channel socket gone");
            inst.tx.drop_connection();
            crate::lock(&self.gone_since).insert(id.to_string(), std::time::Instant::now());
        }
    }

    /// Forget instances whose socket has stayed gone for the link's grace
    /// period (their sessions expired: nothing is kept for them any more),
    /// so the registry does not grow with every VM the host ever ran and
    /// `max_links` counts the VMs that are here.
    pub async fn forget_gone(&self) {
        let grace = self.cfg.link.grace;
        let due: Vec<String> = {
            let mut g = crate::lock(&self.gone_since);
            let due: Vec<String> = g
                .iter()
                .filter(|(_, t)| t.elapsed() >= grace)
                .map(|(k, _)| k.clone())
                .collect();
            for k in &due {
                g.remove(k);
            }
            due
        };
        let mut forgot = false;
        for id in due {
            let path = self.cfg.channels_dir.join(format!("{id}.sock"));
            if path.exists() {
                continue; // back again (its Appeared event is on the way)
            }
            let inst = self.map().remove(&id);
            if let Some(inst) = inst {
                info!(instance = %id, "instance forgotten: its socket stayed gone for the grace period");
                inst.close().await;
                forgot = true;
            }
        }
        if forgot {
            // Room again under max_links: channels ignored for it get their link.
            for c in channels::scan(&self.cfg.channels_dir) {
                if self.instance(&c.instance).is_none() {
                    self.ensure(c);
                }
            }
        }
    }

    /// The status line systemd shows: links up of instances known, the
    /// broker's state, and whether new VMs are still noticed.
    pub fn status_line(&self, watching: bool) -> String {
        let all = self.instances();
        let up = all.iter().filter(|i| i.linked()).count();
        let mut s = format!("{up} of {} instances linked", all.len());
        if self.cfg.broker.enabled() {
            let b = self.bridge.get();
            s.push_str(if b.connected {
                "; broker connected"
            } else {
                "; broker away"
            });
        } else {
            s.push_str("; no broker");
        }
        if !watching {
            s.push_str("; channels directory NOT watched (new VMs are not noticed)");
        }
        s
    }

    /// Close every link.
    pub async fn close_all(&self) {
        let all: Vec<_> = std::mem::take(&mut *self.map()).into_values().collect();
        for i in all {
            i.close().await;
        }
    }
}

/// Descriptors the proxy holds beside its links and control clients: the
/// broker's connection, the metrics endpoint and its scrapes, the channels
/// watch, the audit log, the runtime's own, with room to spare.
pub const FD_RESERVE: u64 = 256;

/// Warn at start when the open-file limit is below what `max_links` needs
/// (one descriptor per link): past it new links fail with "Too many open
/// files" and so does the control socket, so the operator could not even
/// ask why. Not an error: a small host may never run that many VMs. An
/// unreadable limit (a seccomp filter) is only noted.
fn check_open_file_limit(cfg: &ProxyConfig) {
    use nix::sys::resource::{Resource, getrlimit};
    let overhead = (cfg.max_control_clients as u64).saturating_add(FD_RESERVE);
    let need = (cfg.max_links as u64).saturating_add(overhead);
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) if soft < need => warn!(
            limit = soft,
            max_links = cfg.max_links,
            needed = need,
            "the open-file limit is below what max_links needs: links past about {} VMs will fail (\"Too many open files\"), and tetherctl with them; raise the limit (systemd: LimitNOFILE) or lower max_links",
            soft.saturating_sub(overhead)
        ),
        Ok(_) => {}
        Err(e) => debug!(error = %e, "open-file limit not readable"),
    }
}

/// Run the proxy until `shutdown` resolves; each item of `reload` (SIGHUP)
/// reloads the policy from `config_path` ([`Proxy::reload`]).
pub async fn run(
    mut cfg: ProxyConfig,
    config_path: Option<std::path::PathBuf>,
    shutdown: impl std::future::Future<Output = ()>,
    mut reload: mpsc::Receiver<()>,
) -> Result<(), ProxyError> {
    // The transport URL's options override the [broker] section, as
    // oslo's override [oslo_messaging_rabbit] (checked with the config).
    cfg.broker = cfg.broker.with_url_options().map_err(ProxyError::Broker)?;
    check_open_file_limit(&cfg);
    let listener = control::bind(&cfg.control_socket, cfg.control_socket_group.as_deref())
        .map_err(|source| ProxyError::ControlSocket {
            path: cfg.control_socket.clone(),
            source,
        })?;
    let metrics_listener = match cfg.metrics_listen {
        Some(addr) => {
            let l = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ProxyError::Metrics { addr, source })?;
            let at = l.local_addr().map_or(addr, |a| a);
            info!(addr = %at, "serving Prometheus metrics at /metrics");
            Some(l)
        }
        None => None,
    };
    let (up_tx, up_rx) = if cfg.broker.enabled() {
        let (t, r) = mpsc::channel(cfg.broker.upstream_hold);
        (Some(t), Some(r))
    } else {
        (None, None)
    };
    let proxy = Proxy::with_upstream(cfg, config_path, up_tx)?;
    let bridge =
        up_rx.map(|rx| tokio::spawn(broker::run(proxy.clone(), proxy.cfg.broker.clone(), rx)));
    let (ch_tx, mut ch_rx) = mpsc::channel(1024);
    let dir = proxy.cfg.channels_dir.clone();
    // Watched before READY: a proxy that cannot see its VMs does not start.
    let watch = channels::Watch::new(dir.clone()).map_err(|source| ProxyError::Channels {
        path: dir.clone(),
        source,
    })?;
    let watcher = tokio::spawn(async move {
        if let Err(e) = watch.run(ch_tx).await {
            tracing::error!(dir = %dir.display(), error = %e, "cannot watch the channels directory");
        }
    });
    let server = tokio::spawn(control::serve(listener, proxy.clone()));
    let metrics = metrics_listener.map(|l| tokio::spawn(metrics::serve(l, proxy.clone())));
    // The agents' own numbers are asked for only when something shows them.
    let agent_stats = (proxy.cfg.metrics_listen.is_some() && proxy.cfg.agent_stats_interval_ms > 0)
        .then(|| {
            let every = std::time::Duration::from_millis(proxy.cfg.agent_stats_interval_ms);
            tokio::spawn(agent_stats::run(proxy.clone(), every))
        });
    let audit = proxy.policy.audit.clone();
    let every = std::time::Duration::from_millis(proxy.cfg.policy.audit_interval_ms);
    let summaries = tokio::spawn(async move {
        let mut t = tokio::time::interval(every);
        loop {
            t.tick().await;
            audit.tick();
        }
    });
    let (probe_handle, mut probe) = crate::sd::probe("proxy main loop");
    let mut status = proxy.status_line(true);
    crate::sd::ready(&status);
    let watchdog = crate::sd::watchdog_interval()
        .map(|every| tokio::spawn(crate::sd::watchdog(every, vec![probe_handle])));
    info!(channels = %proxy.cfg.channels_dir.display(), control = %proxy.cfg.control_socket.display(), "tether-proxy ready");
    tokio::pin!(shutdown);
    let mut watching = true;
    let mut forget = tokio::time::interval(forget_every(proxy.cfg.link.grace));
    let mut refresh = tokio::time::interval(STATUS_EVERY);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = forget.tick() => proxy.forget_gone().await,
            _ = refresh.tick() => {
                let now = proxy.status_line(watching);
                if now != status {
                    crate::sd::status(&now);
                    status = now;
                }
            }
            q = probe.asked(), if watching => crate::sd::Probe::answer(q),
            Some(()) = reload.recv() => {
                crate::sd::reloading();
                match proxy.reload() {
                    Ok(n) => info!(changed = n, "policy reloaded"),
                    Err(e) => error!(error = %e, "reload refused; the running policy stays"),
                }
                crate::sd::ready(&status);
            }
            c = ch_rx.recv(), if watching => match c {
                Some(channels::ChannelEvent::Appeared(c)) => proxy.ensure(c),
                Some(channels::ChannelEvent::Gone(id)) => proxy.gone(&id),
                // The watcher ended (logged above): keep serving what we
                // have, say so, and stop answering the watchdog — under
                // systemd the proxy is restarted and watches again.
                None => watching = false,
            },
        }
    }
    info!("shutting down");
    crate::sd::stopping();
    if let Some(w) = watchdog {
        w.abort();
    }
    watcher.abort();
    server.abort();
    if let Some(m) = metrics {
        m.abort();
    }
    if let Some(a) = agent_stats {
        a.abort();
    }
    summaries.abort();
    proxy.policy.audit.tick();
    if let Some(b) = bridge {
        b.abort();
    }
    proxy.close_all().await;
    let _ = std::fs::remove_file(&proxy.cfg.control_socket);
    Ok(())
}

/// How often the `STATUS=` line is recomputed (sent only when it changed):
/// often enough for `systemctl status` to be current, rarely enough to cost
/// nothing with thousands of instances.
const STATUS_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// How often instances whose socket is gone are checked against the grace
/// period: often enough to forget them soon after it (half of it, at most a
/// minute, at least 100 ms).
fn forget_every(grace: std::time::Duration) -> std::time::Duration {
    (grace / 2).clamp(
        std::time::Duration::from_millis(100),
        std::time::Duration::from_secs(60),
    )
}
