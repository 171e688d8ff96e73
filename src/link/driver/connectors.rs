//! Ready-made connectors for UNIX sockets.

use std::path::PathBuf;
use std::sync::Arc;

use tokio::net::UnixListener;

use super::quiet::QuietUnixStream;
use super::{ConnectFuture, Connector};

/// Connects to a UNIX socket path: the host side of a QEMU chardev, or a test.
#[derive(Debug, Clone)]
pub struct UnixConnector {
    /// The socket path.
    pub path: PathBuf,
}

impl Connector for UnixConnector {
    type Io = QuietUnixStream;
    fn connect(&mut self) -> ConnectFuture<Self::Io> {
        let path = self.path.clone();
        Box::pin(async move { QuietUnixStream::connect(path).await })
    }
}

/// Accepts connections on a UNIX listener, one at a time: each `connect`
/// waits for the next client. This is how QEMU's `server=on` chardev behaves,
/// and how the emulated guest port works.
#[derive(Debug, Clone)]
pub struct UnixAcceptor {
    listener: Arc<UnixListener>,
}

impl UnixAcceptor {
    /// Wrap a bound listener.
    pub fn new(listener: UnixListener) -> Self {
        Self {
            listener: Arc::new(listener),
        }
    }
}

impl Connector for UnixAcceptor {
    type Io = QuietUnixStream;
    fn connect(&mut self) -> ConnectFuture<Self::Io> {
        let l = self.listener.clone();
        Box::pin(async move { QuietUnixStream::from_tokio(l.accept().await?.0) })
    }

    fn connect_timeout(&self) -> Option<std::time::Duration> {
        // Waiting for a client is not a failed attempt.
        None
    }
}
