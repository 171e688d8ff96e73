//! The agent's configuration file (TOML), documented in `docs/configuration.md`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::supervisor::{StartSpec, SupervisorConfig};
use crate::link::SessionConfig;

/// Default port: the virtio-serial port named `org.tether.agent.0`.
pub const DEFAULT_PORT: &str = "/dev/virtio-ports/org.tether.agent.0";
/// Default sub-agent socket.
pub const DEFAULT_SUBAGENT_SOCKET: &str = "/run/tether/agent.sock";

/// Everything the agent reads from its config file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AgentConfig {
    /// The port: a device path, or `unix-listen:PATH` for an emulated port.
    pub port: String,
    /// The sub-agent socket path (created with mode 0600).
    pub subagent_socket: PathBuf,
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
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            port: DEFAULT_PORT.into(),
            subagent_socket: DEFAULT_SUBAGENT_SOCKET.into(),
            max_line: 1024 * 1024,
            link: SessionConfig::default(),
            supervisor: SupervisorConfig::default(),
            subagents: vec![],
            shutdown_flush_ms: 5_000,
        }
    }
}

/// A config file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not readable.
    #[error("cannot read config file {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML or not the expected shape.
    #[error("config file {path} is invalid: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's message (names the key and line).
        message: String,
    },
    /// A value out of range.
    #[error("config file {path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

impl AgentConfig {
    /// Read, parse and validate a config file.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// Parse and validate config text (`path` is for messages).
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let c: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.into(),
            message: e.to_string(),
        })?;
        let invalid = |message: String| ConfigError::Invalid {
            path: path.into(),
            message,
        };
        c.link.validate().map_err(|e| invalid(e.to_string()))?;
        if c.port.is_empty() {
            return Err(invalid("port must not be empty".into()));
        }
        if c.max_line < 1024 {
            return Err(invalid("max_line must be at least 1024".into()));
        }
        for a in &c.supervisor.allowed_executables {
            if !a.is_absolute() {
                return Err(invalid(format!(
                    "allowed_executables entry '{}' is not an absolute path",
                    a.display()
                )));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for s in &c.subagents {
            if !names.insert(&s.name) {
                return Err(invalid(format!("sub-agent '{}' is defined twice", s.name)));
            }
        }
        Ok(c)
    }
}
