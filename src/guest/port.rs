//! The agent's end of the channel: a virtio-serial port device, a serial
//! line in raw mode, or an emulated port (`unix-listen:PATH`) that behaves as
//! QEMU's chardev does.
//!
//! How the real port behaves (measured: `docs/virtio-serial.md`):
//! only one process may open it (`EBUSY`); while the host side is not
//! connected `read()` returns 0 with `POLLHUP` and `POLLOUT` is never set, so
//! "connected" is the writable edge; writes move at most 32 KiB each. A read
//! of 0 is therefore "host went away", not end of file for good: the stream
//! ends, the link driver calls `connect` again, and `connect` waits for the
//! next writable edge without spinning.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::link::Connector;
use crate::link::driver::quiet::read_into;
use crate::link::driver::{ConnectFuture, UnixAcceptor};

pub use super::serial::{SerialOptions, SerialPort};

/// The largest write the port takes at once.
const PORT_WRITE_MAX: usize = 32 * 1024;
/// A host connect that slipped between our check and our wait is noticed
/// within this long (a bounded re-check, not a poll loop).
const RECHECK: Duration = Duration::from_secs(1);

/// Where the agent's port is, as written in its config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortSpec {
    /// A virtio-serial port device (or a symlink to one).
    Device(PathBuf),
    /// An emulated port: listen on a UNIX socket, one client at a time.
    UnixListen(PathBuf),
    /// A serial line (`serial:PATH`, or a path under `/dev/ttyS`, `/dev/hvc`,
    /// `/dev/pts/`), put in raw mode; it is always "connected".
    Serial(PathBuf),
}

impl PortSpec {
    /// Parse `unix-listen:PATH` or a device path.
    pub fn parse(s: &str) -> Self {
        if let Some(p) = s.strip_prefix("unix-listen:") {
            return Self::UnixListen(PathBuf::from(p));
        }
        if let Some(p) = s.strip_prefix("serial:") {
            return Self::Serial(PathBuf::from(p));
        }
        if ["/dev/ttyS", "/dev/hvc", "/dev/pts/", "/dev/ttyAMA"]
            .iter()
            .any(|pre| s.starts_with(pre))
        {
            return Self::Serial(PathBuf::from(s));
        }
        Self::Device(PathBuf::from(s))
    }
}

/// Why the port could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum PortError {
    /// Another process holds the port.
    #[error(
        "port {0} is in use by another process (only one may open a virtio-serial port); is another tether-agent running?"
    )]
    Busy(PathBuf),
    /// Another process holds the serial line (its exclusive open).
    #[error(
        "serial line {0} is in use by another process (opened exclusively); is another tether-agent running on it?"
    )]
    SerialBusy(PathBuf),
    /// The device is missing or not openable.
    #[error("cannot open port {path}")]
    Open {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The emulated port's socket could not be bound.
    #[error("cannot listen on emulated port {path}")]
    Listen {
        /// The path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// A connector for either kind of port.
pub enum PortConnector {
    /// A virtio-serial device.
    Device(VirtioPort),
    /// An emulated port.
    Emulated(UnixAcceptor),
    /// A serial line.
    Serial(SerialPort),
}

impl PortConnector {
    /// Open the port described by `spec` (a serial line with `serial`'s
    /// settings). Needs a tokio runtime.
    pub fn open(spec: &PortSpec, serial: &SerialOptions) -> Result<Self, PortError> {
        match spec {
            PortSpec::Device(p) => VirtioPort::open(p).map(Self::Device),
            PortSpec::Serial(p) => SerialPort::open(p, serial).map(Self::Serial),
            PortSpec::UnixListen(p) => {
                if let Some(dir) = p.parent() {
                    std::fs::create_dir_all(dir).map_err(|source| PortError::Listen {
                        path: p.clone(),
                        source,
                    })?;
                }
                let _ = std::fs::remove_file(p);
                let l = tokio::net::UnixListener::bind(p).map_err(|source| PortError::Listen {
                    path: p.clone(),
                    source,
                })?;
                Ok(Self::Emulated(UnixAcceptor::new(l)))
            }
        }
    }
}

/// Either kind of connected stream.
pub enum PortStream {
    /// The device.
    Device(DeviceStream),
    /// A UNIX socket.
    Emulated(crate::link::driver::QuietUnixStream),
    /// A serial line.
    Serial(tokio_serial::SerialStream),
}

impl Connector for PortConnector {
    type Io = PortStream;
    fn connect(&mut self) -> ConnectFuture<PortStream> {
        match self {
            Self::Device(d) => {
                let f = d.connect();
                Box::pin(async move { f.await.map(PortStream::Device) })
            }
            Self::Emulated(a) => {
                let f = a.connect();
                Box::pin(async move { f.await.map(PortStream::Emulated) })
            }
            Self::Serial(p) => {
                let f = p.connect();
                Box::pin(async move { f.await.map(PortStream::Serial) })
            }
        }
    }
    fn connect_timeout(&self) -> Option<Duration> {
        None // waiting for the host is not a failure
    }
}

/// A virtio-serial port device, opened once and kept open: closing it would
/// discard what the host sent and the agent has not read yet.
///
/// Each connection registers a fresh duplicate of the descriptor with the
/// reactor: tokio keeps "read/write closed" readiness for good once a hang-up
/// was seen, so a registration that lived through a host disconnect would
/// report the port ready for ever after and spin. Waiting for the host uses
/// a private edge-triggered epoll instance for the same reason — made for
/// each wait and closed before the connection's stream is registered.
///
/// Nothing may poll the port while a stream is connected except the
/// stream's own registration: Linux's virtio_console (6.1, and later
/// kernels without the upstream fix for lost wake-ups of written-and-polled
/// ports) moves a just-arrived host buffer into the port while it answers
/// *any* poll of it, and the buffer's interrupt then finds nothing new and
/// wakes no one. A second poller that asks only for `EPOLLOUT` (as the
/// waiter does) throws the readable result away, and the data waited for
/// the agent's next write — its 200 ms loss probe — on ~1 % of round trips
/// (docs/virtio-serial.md).
pub struct VirtioPort {
    file: File,
}

impl VirtioPort {
    /// Open the device non-blocking, close-on-exec.
    pub fn open(path: &Path) -> Result<Self, PortError> {
        let err = |source| PortError::Open {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(nix::libc::O_NONBLOCK | nix::libc::O_CLOEXEC)
            .open(path)
            .map_err(|source| {
                if source.raw_os_error() == Some(nix::libc::EBUSY) {
                    PortError::Busy(path.to_path_buf())
                } else {
                    err(source)
                }
            })?;
        Ok(Self { file })
    }

    fn connect(&mut self) -> ConnectFuture<DeviceStream> {
        let file = self.file.try_clone();
        Box::pin(async move {
            let file = file?;
            // Watched before the first check, so the host's connect between
            // the two is not missed; closed (the port out of it) when this
            // returns or is dropped halfway — see VirtioPort.
            let host_edge = register(EdgeWaiter::new(&file)?)?;
            loop {
                if host_connected(&file) {
                    drop(host_edge);
                    return DeviceStream::new(file);
                }
                // Wait for the edge the host's connect produces (bounded: a
                // re-check costs one poll()).
                if let Ok(guard) = tokio::time::timeout(RECHECK, host_edge.readable()).await {
                    let mut guard = guard?;
                    host_edge.get_ref().drain()?;
                    guard.clear_ready();
                }
            }
        })
    }
}

/// A private epoll instance watching one descriptor edge-triggered for
/// `EPOLLOUT` (hang-ups are always reported too); readable when an edge
/// happened. Its own readiness never "closes".
struct EdgeWaiter(Epoll);

impl EdgeWaiter {
    fn new(watched: &File) -> io::Result<Self> {
        let ep = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC).map_err(io::Error::from)?;
        ep.add(
            watched,
            EpollEvent::new(EpollFlags::EPOLLOUT | EpollFlags::EPOLLET, 0),
        )
        .map_err(io::Error::from)?;
        Ok(Self(ep))
    }

    /// Take the pending edges off the ready list.
    fn drain(&self) -> io::Result<()> {
        let mut ev = [EpollEvent::empty(); 4];
        self.0
            .wait(&mut ev, EpollTimeout::ZERO)
            .map(drop)
            .map_err(io::Error::from)
    }
}

impl std::os::fd::AsRawFd for EdgeWaiter {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.0.as_raw_fd()
    }
}

/// Make a descriptor non-blocking whatever the caller opened it with: a
/// blocking descriptor would stall a runtime thread.
fn set_nonblocking(f: &File) -> io::Result<()> {
    use nix::fcntl::{FcntlArg, OFlag, fcntl};
    let flags = OFlag::from_bits_truncate(fcntl(f, FcntlArg::F_GETFL).map_err(io::Error::from)?);
    fcntl(f, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map_err(io::Error::from)?;
    Ok(())
}

/// Register with the reactor.
#[allow(unsafe_code)]
fn register<T: std::os::fd::AsRawFd>(t: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: `t` owns a valid, non-blocking descriptor (a `File` made
    // non-blocking, or an epoll instance, which never blocks in our use); the
    // `AsyncFd` takes it by value, and nothing closes or replaces that
    // descriptor while it is registered: it is closed only when the `AsyncFd`
    // is dropped, after deregistration.
    unsafe { AsyncFd::register(t) }.map_err(|e| e.into_parts().1)
}

/// `POLLOUT` is set exactly while a host client is connected.
fn host_connected(f: &File) -> bool {
    // POLLIN too: a poll of the port must not ask only for writability
    // (see VirtioPort); only the waiter's own epoll is left to watch it so.
    let mut p = [PollFd::new(
        f.as_fd(),
        PollFlags::POLLOUT | PollFlags::POLLIN,
    )];
    matches!(poll(&mut p, PollTimeout::ZERO), Ok(n) if n > 0)
        && p.first()
            .and_then(PollFd::revents)
            .is_some_and(|r| r.contains(PollFlags::POLLOUT))
}

/// The port while the host is connected: its own duplicate of the
/// descriptor, registered for this connection only.
pub struct DeviceStream {
    fd: AsyncFd<File>,
}

impl DeviceStream {
    fn new(dup: File) -> io::Result<Self> {
        set_nonblocking(&dup)?;
        Ok(Self { fd: register(dup)? })
    }
}

impl AsyncRead for DeviceStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut g = ready!(self.fd.poll_read_ready(cx))?;
            // Read until the port says `EAGAIN`: a short read does not mean
            // it is drained (one host buffer per read). Nothing read (filled
            // unchanged): the host disconnected; this stream ends (its
            // registration with it) and `connect` waits for the host.
            match g.try_io(|f| read_into(f.get_ref(), buf)) {
                Ok(Ok(_)) => return Poll::Ready(Ok(())),
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for DeviceStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let data = data
            .get(..data.len().min(PORT_WRITE_MAX))
            .unwrap_or_default();
        loop {
            let mut g = ready!(self.fd.poll_write_ready(cx))?;
            match g.try_io(|f| f.get_ref().write(data)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

impl AsyncRead for PortStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Device(d) => Pin::new(d).poll_read(cx, buf),
            Self::Emulated(s) => Pin::new(s).poll_read(cx, buf),
            Self::Serial(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for PortStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Device(d) => Pin::new(d).poll_write(cx, data),
            Self::Emulated(s) => Pin::new(s).poll_write(cx, data),
            Self::Serial(s) => Pin::new(s).poll_write(cx, data),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Device(d) => Pin::new(d).poll_flush(cx),
            Self::Emulated(s) => Pin::new(s).poll_flush(cx),
            Self::Serial(s) => Pin::new(s).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Device(d) => Pin::new(d).poll_shutdown(cx),
            Self::Emulated(s) => Pin::new(s).poll_shutdown(cx),
            Self::Serial(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use std::os::unix::fs::MetadataExt;

    /// How many epoll registrations in this process watch the file at
    /// `path` (from /proc/self/fdinfo: each `tfd:` line of an epoll names
    /// the watched file's inode and its filesystem's device, the kernel's
    /// own encoding; an epoll reachable through two descriptors shows the
    /// same lines twice, counted once).
    fn epolls_watching(path: &Path) -> usize {
        let m = std::fs::metadata(path).unwrap();
        let (major, minor) = (
            nix::sys::stat::major(m.dev()),
            nix::sys::stat::minor(m.dev()),
        );
        let needle = format!(" ino:{:x} sdev:{:x}", m.ino(), (major << 20) | minor);
        std::fs::read_dir("/proc/self/fdinfo")
            .unwrap()
            .filter_map(|e| std::fs::read_to_string(e.ok()?.path()).ok())
            .flat_map(|info| {
                info.lines()
                    .filter(|l| l.starts_with("tfd:") && l.trim_end().ends_with(&needle))
                    .map(String::from)
                    .collect::<Vec<_>>()
            })
            .collect::<std::collections::HashSet<_>>()
            .len()
    }

    /// The regression test for the 200 ms stalls on the real port (see
    /// VirtioPort): while a stream is connected the port is in no epoll
    /// but the stream's registration, and a wait for the host that is given
    /// up halfway leaves none behind. A pseudo-terminal stands in for the
    /// port (the kernel's poll bug is virtio_console's; which epolls watch
    /// the port is ours).
    #[tokio::test]
    async fn a_connected_port_is_watched_by_its_stream_alone() {
        let pty = nix::pty::openpty(None, None).unwrap();
        let path = nix::unistd::ttyname(&pty.slave).unwrap();
        let mut port = VirtioPort::open(&path).unwrap();
        assert_eq!(epolls_watching(&path), 0);
        let stream = port.connect().await.unwrap();
        assert_eq!(epolls_watching(&path), 1, "the stream's registration only");
        drop(stream);
        assert_eq!(epolls_watching(&path), 0);
        // "The host is not there": the terminal's output stopped, so the
        // port is not writable and connect waits for an edge. (Filling its
        // buffer instead is not stable: the kernel moves it on to the other
        // side's buffer in the background and the port turns writable.)
        nix::sys::termios::tcflow(&port.file, nix::sys::termios::FlowArg::TCOOFF).unwrap();
        assert!(!host_connected(&port.file));
        let mut wait = port.connect();
        assert!((&mut wait).now_or_never().is_none(), "it waits");
        assert_eq!(epolls_watching(&path), 1, "the waiter's own epoll");
        drop(wait);
        assert_eq!(epolls_watching(&path), 0, "given up halfway: none left");
        drop(pty.master);
    }
}
