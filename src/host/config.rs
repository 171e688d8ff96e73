//! The proxy's configuration file (TOML), documented in `docs/configuration.md`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::policy::PolicyConfig;
use crate::config::{ConfigError, Validate};
use crate::link::SessionConfig;

/// Default channels directory: one `<instance-uuid>.sock` per VM.
pub const DEFAULT_CHANNELS_DIR: &str = "/var/lib/tether/channels";
/// Default control socket.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/tether/proxy.sock";
/// Default read rate limit per guest link (see
/// [`ProxyConfig::guest_read_bytes_per_sec`]).
pub const DEFAULT_GUEST_READ_BYTES_PER_SEC: u64 = 4 << 20;

/// Everything the proxy reads from its config file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Where the VMs' chardev sockets are.
    pub channels_dir: PathBuf,
    /// The control socket (mode 0600).
    pub control_socket: PathBuf,
    /// A group given access to the control socket (mode 0660): operators
    /// in it use `tetherctl` without root.
    pub control_socket_group: Option<String>,
    /// Longest JSON line accepted on the control socket (bytes).
    pub max_line: usize,
    /// Default time a call or a cast acknowledgement may take (ms).
    pub default_timeout_ms: u64,
    /// Most instance links at once.
    pub max_links: usize,
    /// Most control-socket connections at once; one more is told so and
    /// closed.
    pub max_control_clients: usize,
    /// Where to serve Prometheus metrics (`GET /metrics`), as `address:port`
    /// (e.g. `127.0.0.1:9464`); none (the default): no endpoint.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// How often each linked agent is asked for its own numbers, exported
    /// as `tether_agent_*` (ms; 0: never). Only with `metrics_listen`.
    pub agent_stats_interval_ms: u64,
    /// Bytes of control requests in progress, all connections together; a
    /// connection past it waits before its next request is read.
    pub max_control_bytes: usize,
    /// Most bytes read from one guest's link per second: a guest flooding
    /// its port costs the proxy a bounded share of CPU (past it the proxy
    /// reads later; the guest's writes wait). The default, 4 MiB/s, is four
    /// times what the default profile lets a guest originate (1 MB/s; the
    /// rest it sends is answers and receipts for what the host sent it) and
    /// keeps a flood of messages the policy denies to a few percent of a
    /// core and a neighbour's call p99 within 2× idle (docs/BENCHMARKS.md;
    /// at 32 MiB/s a denied-cast flood took 0.4 of a core and the p99 4–6×).
    pub guest_read_bytes_per_sec: u64,
    /// Link limits and timers (the same for every instance).
    pub link: SessionConfig,
    /// What guests may send.
    pub policy: PolicyConfig,
    /// RabbitMQ, in oslo.messaging terms (none by default).
    pub broker: super::broker::BrokerConfig,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            channels_dir: DEFAULT_CHANNELS_DIR.into(),
            control_socket: DEFAULT_CONTROL_SOCKET.into(),
            control_socket_group: None,
            max_line: 1024 * 1024,
            default_timeout_ms: 30_000,
            max_links: 10_000,
            max_control_clients: 64,
            metrics_listen: None,
            agent_stats_interval_ms: 60_000,
            max_control_bytes: 64 << 20,
            guest_read_bytes_per_sec: DEFAULT_GUEST_READ_BYTES_PER_SEC,
            link: SessionConfig::default(),
            policy: PolicyConfig::default(),
            broker: Default::default(),
        }
    }
}

impl ProxyConfig {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        crate::config::load(path)
    }
}

impl Validate for ProxyConfig {
    fn validate(&self) -> Result<(), String> {
        self.link.validate().map_err(|e| e.to_string())?;
        self.policy.validate()?;
        self.broker.validate()?;
        if self.max_line < 1024 {
            return Err("max_line must be at least 1024".into());
        }
        if self.default_timeout_ms == 0 {
            return Err("default_timeout_ms must be above 0".into());
        }
        if self.max_links == 0 {
            return Err("max_links must be above 0".into());
        }
        if self.guest_read_bytes_per_sec != 0 && self.guest_read_bytes_per_sec < 1 << 20 {
            return Err("guest_read_bytes_per_sec must be 0 (no limit) or at least 1 MiB/s".into());
        }
        if self.agent_stats_interval_ms != 0
            && self.agent_stats_interval_ms < super::agent_stats::MIN_INTERVAL_MS
        {
            return Err(format!(
                "agent_stats_interval_ms must be 0 (off) or at least {}",
                super::agent_stats::MIN_INTERVAL_MS
            ));
        }
        if self.max_control_clients == 0 {
            return Err("max_control_clients must be above 0".into());
        }
        if self.max_control_bytes < self.max_line || self.max_control_bytes > u32::MAX as usize {
            return Err("max_control_bytes must be at least max_line and below 4 GiB".into());
        }
        Ok(())
    }
}
