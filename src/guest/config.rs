//! The agent's configuration file (TOML), documented in `docs/configuration.md`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use crate::config::ConfigError;
use crate::config::Validate;

use super::supervisor::{StartSpec, SupervisorConfig};
use crate::link::SessionConfig;

/// Default port: the virtio-serial port named `org.tether.agent.0`.
pub const DEFAULT_PORT: &str = "/dev/virtio-ports/org.tether.agent.0";
/// Default sub-agent socket.
pub const DEFAULT_SUBAGENT_SOCKET: &str = "/run/tether/agent.sock";
/// Default state directory: the journal of taken requests. In the VM's
/// memory (tmpfs), so a live migration carries it and a reboot clears it.
pub const DEFAULT_STATE_DIR: &str = "/run/tether";

/// Everything the agent reads from its config file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// The port: a device path, or `unix-listen:PATH` for an emulated port.
    pub port: String,
    /// A serial line's settings (`port = "serial:PATH"`).
    pub serial: super::serial::SerialOptions,
    /// The sub-agent socket path (created with mode 0600).
    pub subagent_socket: PathBuf,
    /// A group given access to the sub-agent socket (mode 0660), for
    /// sub-agents that run as another user than the agent's.
    pub subagent_socket_group: Option<String>,
    /// Longest JSON line accepted on the sub-agent socket (bytes).
    pub max_line: usize,
    /// Link limits and timers.
    pub link: SessionConfig,
    /// Supervisor limits and the executable allow-list.
    pub supervisor: SupervisorConfig,
    /// Sub-agents started at boot.
    pub subagents: Vec<StartSpec>,
    /// Bound on the link flush at shutdown (ms).
    pub shutdown_flush_ms: u64,
    /// Where the journal of taken requests lives (see `docs/subagent.md`).
    pub state_dir: PathBuf,
    /// How long a request waits for a sub-agent to register its topic
    /// before it is refused (ms).
    pub unserved_grace_ms: u64,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            port: DEFAULT_PORT.into(),
            serial: Default::default(),
            subagent_socket: DEFAULT_SUBAGENT_SOCKET.into(),
            subagent_socket_group: None,
            max_line: 1024 * 1024,
            link: SessionConfig::default(),
            supervisor: SupervisorConfig::default(),
            subagents: vec![],
            shutdown_flush_ms: 5_000,
            state_dir: DEFAULT_STATE_DIR.into(),
            unserved_grace_ms: super::holding::DEFAULT_UNSERVED_GRACE.as_millis() as u64,
        }
    }
}

impl AgentConfig {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        crate::config::load(path)
    }
}

impl Validate for AgentConfig {
    fn validate(&self) -> Result<(), String> {
        self.link.validate().map_err(|e| e.to_string())?;
        if self.port.is_empty() {
            return Err("port must not be empty".into());
        }
        self.serial.validate()?;
        if self.state_dir.as_os_str().is_empty() {
            return Err("state_dir must not be empty".into());
        }
        if self.unserved_grace_ms > 3_600_000 {
            return Err("unserved_grace_ms must be at most 3600000 (an hour)".into());
        }
        if self.max_line < 1024 {
            return Err("max_line must be at least 1024".into());
        }
        for a in &self.supervisor.allowed_executables {
            if !a.is_absolute() {
                return Err(format!(
                    "allowed_executables entry '{}' is not an absolute path",
                    a.display()
                ));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for s in &self.subagents {
            if !names.insert(&s.name) {
                return Err(format!("sub-agent '{}' is defined twice", s.name));
            }
        }
        Ok(())
    }
}
