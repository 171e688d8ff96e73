//! The agent's port on a serial line (`serial:PATH`: a VM's `/dev/ttyS1`,
//! `/dev/hvc1`, a pseudo-terminal in tests), opened with `tokio-serial`:
//! raw mode, the configured baud rate and flow control, 8N1, and an
//! exclusive open (`TIOCEXCL` and an exclusive `flock`: a second agent on
//! the same line fails with "in use" instead of splitting its bytes).
//!
//! A serial line has no "host connected" signal: it counts as connected, and
//! the link's HELLO retry finds the peer whenever it starts. A line whose
//! stream ends (a hung-up pseudo-terminal reads an error) is opened again,
//! after [`REOPEN_DELAY`], so a line that keeps failing is not spun on.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use tokio_serial::{FlowControl, SerialPortBuilderExt, SerialStream};

use crate::link::Connector;
use crate::link::driver::ConnectFuture;

use super::port::PortError;

/// Wait before opening a line again after its stream ended.
pub const REOPEN_DELAY: Duration = Duration::from_secs(1);
/// The default baud rate: what QEMU's and most hypervisors' emulated UARTs
/// and a Linux console default to (an emulated UART ignores it; a physical
/// line needs both ends to agree).
pub const DEFAULT_BAUD_RATE: u32 = 115_200;
/// The fastest rate accepted: above what common UARTs clock (4 Mbit/s); a
/// larger number is a typo, not a line.
pub const MAX_BAUD_RATE: u32 = 4_000_000;

/// Flow control on the line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Flow {
    /// None: right for emulated lines (QEMU's UARTs lose nothing).
    #[default]
    None,
    /// XON/XOFF. Only for lines that carry text: the link's frames are
    /// binary and may contain the XON/XOFF bytes, which the line would eat.
    Software,
    /// RTS/CTS.
    Hardware,
}

/// The `[serial]` section of the agent's config.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SerialOptions {
    /// Baud rate (the line's speed in bits per second).
    pub baud_rate: u32,
    /// Flow control.
    pub flow_control: Flow,
}

impl Default for SerialOptions {
    fn default() -> Self {
        Self {
            baud_rate: DEFAULT_BAUD_RATE,
            flow_control: Flow::None,
        }
    }
}

impl SerialOptions {
    /// Check the values a config file gave.
    pub fn validate(&self) -> Result<(), String> {
        if self.baud_rate == 0 || self.baud_rate > MAX_BAUD_RATE {
            return Err(format!(
                "serial.baud_rate must be between 1 and {MAX_BAUD_RATE}, not {}",
                self.baud_rate
            ));
        }
        if self.flow_control == Flow::Software {
            return Err(
                "serial.flow_control = \"software\" (XON/XOFF) would eat bytes of the link's binary frames: use \"none\" or \"hardware\""
                    .into(),
            );
        }
        Ok(())
    }
}

/// A serial line (see the module's documentation).
pub struct SerialPort {
    /// Where to open it again; none for a stream the caller opened.
    path: Option<PathBuf>,
    options: SerialOptions,
    /// The stream opened at start, handed out by the first connect.
    first: Option<SerialStream>,
}

impl SerialPort {
    /// Open `path` (exclusively, raw, with `options`). Needs a tokio
    /// runtime (the stream registers with its reactor).
    pub fn open(path: &Path, options: &SerialOptions) -> Result<Self, PortError> {
        let stream = open_line(path, options)?;
        Ok(Self {
            path: Some(path.to_path_buf()),
            options: options.clone(),
            first: Some(stream),
        })
    }

    /// Use a stream the caller opened (one end of
    /// [`SerialStream::pair`], in tests); once it ends, the port is gone.
    pub fn from_stream(stream: SerialStream) -> Self {
        Self {
            path: None,
            options: SerialOptions::default(),
            first: Some(stream),
        }
    }
}

fn open_line(path: &Path, options: &SerialOptions) -> Result<SerialStream, PortError> {
    let flow = match options.flow_control {
        Flow::None => FlowControl::None,
        Flow::Software => FlowControl::Software,
        Flow::Hardware => FlowControl::Hardware,
    };
    tokio_serial::new(path.to_string_lossy(), options.baud_rate)
        .flow_control(flow)
        .open_native_async()
        .map_err(|e| {
            // The exclusive open failed (TIOCEXCL's EBUSY, or the flock
            // taken): serialport reports both as `NoDevice`, and only them.
            if e.kind() == tokio_serial::ErrorKind::NoDevice {
                PortError::SerialBusy(path.to_path_buf())
            } else {
                PortError::Open {
                    path: path.to_path_buf(),
                    source: std::io::Error::from(e),
                }
            }
        })
}

impl Connector for SerialPort {
    type Io = SerialStream;
    fn connect(&mut self) -> ConnectFuture<SerialStream> {
        if let Some(s) = self.first.take() {
            return Box::pin(async move { Ok(s) });
        }
        let path = self.path.clone();
        let options = self.options.clone();
        Box::pin(async move {
            let Some(path) = path else {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::NotConnected,
                    "the serial line's stream ended and it has no path to open again",
                ));
            };
            tokio::time::sleep(REOPEN_DELAY).await;
            open_line(&path, &options).map_err(std::io::Error::other)
        })
    }
    fn connect_timeout(&self) -> Option<Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<SerialOptions, String> {
        let o: SerialOptions = toml::from_str(s).map_err(|e| e.to_string())?;
        o.validate().map(|()| o)
    }

    #[test]
    fn options_default_parse_and_refuse_what_cannot_work() {
        assert_eq!(parse("").unwrap(), SerialOptions::default());
        assert_eq!(
            parse("baud_rate = 9600\nflow_control = \"hardware\"").unwrap(),
            SerialOptions {
                baud_rate: 9600,
                flow_control: Flow::Hardware
            }
        );
        assert!(parse("baud_rate = 0").unwrap_err().contains("baud_rate"));
        assert!(
            parse("baud_rate = 4000001")
                .unwrap_err()
                .contains("baud_rate")
        );
        assert!(parse("baud_rate = -1").is_err());
        assert!(
            parse("flow_control = \"software\"")
                .unwrap_err()
                .contains("XON/XOFF")
        );
        assert!(parse("flow_control = \"rts\"").is_err());
        assert!(parse("parity = \"odd\"").is_err(), "unknown keys refused");
    }
}
