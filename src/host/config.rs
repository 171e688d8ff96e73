//! The proxy's configuration file (TOML), documented in `docs/configuration.md`.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::policy::PolicyConfig;
use crate::guest::config::ConfigError;
use crate::link::SessionConfig;

/// Default channels directory: one `<instance-uuid>.sock` per VM.
pub const DEFAULT_CHANNELS_DIR: &str = "/var/lib/tether/channels";
/// Default control socket.
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/tether/proxy.sock";

/// Everything the proxy reads from its config file.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProxyConfig {
    /// Where the VMs' chardev sockets are.
    pub channels_dir: PathBuf,
    /// The control socket (mode 0600).
    pub control_socket: PathBuf,
    /// Longest JSON line accepted on the control socket (bytes).
    pub max_line: usize,
    /// Default time a call or a cast acknowledgement may take (ms).
    pub default_timeout_ms: u64,
    /// Most instance links at once.
    pub max_links: usize,
    /// Link limits and timers (the same for every instance).
    pub link: SessionConfig,
    /// What guests may send.
    pub policy: PolicyConfig,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            channels_dir: DEFAULT_CHANNELS_DIR.into(),
            control_socket: DEFAULT_CONTROL_SOCKET.into(),
            max_line: 1024 * 1024,
            default_timeout_ms: 30_000,
            max_links: 10_000,
            link: SessionConfig::default(),
            policy: PolicyConfig::default(),
        }
    }
}

impl ProxyConfig {
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
        c.policy.validate().map_err(invalid)?;
        if c.max_line < 1024 {
            return Err(invalid("max_line must be at least 1024".into()));
        }
        if c.default_timeout_ms == 0 {
            return Err(invalid("default_timeout_ms must be above 0".into()));
        }
        if c.max_links == 0 {
            return Err(invalid("max_links must be above 0".into()));
        }
        Ok(c)
    }
}
