//! A UNIX stream that is woken only when there is something to do: it asks
//! the reactor for readability, and for writability only while a write
//! waits for room.
//!
//! tokio's own `UnixStream` is registered for both directions,
//! edge-triggered, for its whole life. A socket becomes writable again each
//! time the peer reads what was written, so every message a process sends
//! and its peer reads wakes the sender's reactor once more, for nothing: a
//! return from `epoll_wait`, and a context switch when the thread had gone
//! to sleep meanwhile. On a request path (the proxy: control client →
//! link → guest → link → control client) that is one wasted wake per
//! socket written per request. Linux passes the event (`EPOLLOUT`) with a
//! UNIX socket's wake-up, and epoll does not wake a waiter whose
//! registration does not ask for it — so this stream's registration does
//! not ask for it, except while a write finds the socket full: then it is
//! replaced by one that asks for both, and replaced back once that write
//! goes through. There is one registration at any time. A replacement
//! drops the wakers tokio kept for the old one, so the reader's waker is
//! kept here too and woken after each replacement, to wait on the new one.
//!
//! The measurements behind it are in docs/BENCHMARKS.md ("Wakes for
//! nothing on the host").

use std::io;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::pin::Pin;
use std::task::{Context, Poll, Waker, ready};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};

/// A connected UNIX stream registered for readability, and for
/// writability only while a write waits (see the module's docs).
#[derive(Debug)]
pub struct QuietUnixStream {
    /// `None` only if registering again failed (the stream then fails).
    fd: Option<AsyncFd<StdUnixStream>>,
    /// The registration asks for writability too.
    wide: bool,
    /// The task waiting for the socket to turn readable, if any.
    reader: Option<Waker>,
}

impl QuietUnixStream {
    /// Take over a connected socket. Needs a tokio runtime.
    pub fn new(s: StdUnixStream) -> io::Result<Self> {
        s.set_nonblocking(true)?;
        Ok(Self {
            fd: Some(register(s, Interest::READABLE)?),
            wide: false,
            reader: None,
        })
    }

    /// Take over one of tokio's streams (it leaves tokio's reactor first).
    pub fn from_tokio(s: tokio::net::UnixStream) -> io::Result<Self> {
        Self::new(s.into_std()?)
    }

    /// Connect to `path`.
    pub async fn connect(path: impl AsRef<std::path::Path>) -> io::Result<Self> {
        Self::from_tokio(tokio::net::UnixStream::connect(path).await?)
    }

    fn fd(&self) -> io::Result<&AsyncFd<StdUnixStream>> {
        self.fd.as_ref().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the socket's registration with the reactor was lost",
            )
        })
    }

    /// Replace the registration with one that asks for writability too
    /// (`wide`) or not, and wake the reader to wait on the new one.
    fn reregister(&mut self, wide: bool) -> io::Result<()> {
        let Some(old) = self.fd.take() else {
            return self.fd().map(drop);
        };
        let interest = if wide {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        };
        let new = register(old.into_inner(), interest);
        if let Some(w) = self.reader.take() {
            w.wake();
        }
        self.fd = Some(new?);
        self.wide = wide;
        Ok(())
    }
}

/// Register with the reactor, for `interest`.
#[allow(unsafe_code)]
fn register(s: StdUnixStream, interest: Interest) -> io::Result<AsyncFd<StdUnixStream>> {
    // SAFETY: the `AsyncFd` owns the socket, so its descriptor stays open
    // and the same until the `AsyncFd` deregisters it (on drop or
    // `into_inner`).
    unsafe { AsyncFd::register_with_interest(s, interest) }.map_err(|e| e.into_parts().1)
}

/// `read(2)` from `fd` into `buf`'s unfilled part, which need not be
/// initialised; the bytes read are filled. `ReadBuf::initialize_unfilled`
/// would zero the whole unfilled part first, on every read: the link
/// reads into a 64 KiB buffer, so that was ~128 KiB of `memset` per
/// request (two reads, the second finding nothing), 70 % of what the agent
/// executed for a call, and slower still under TCG.
#[allow(unsafe_code)]
pub(crate) fn read_into(
    fd: &impl std::os::fd::AsRawFd,
    buf: &mut ReadBuf<'_>,
) -> io::Result<usize> {
    // SAFETY: `unfilled_mut` is writable memory of its length, owned by
    // `buf` for this call; `read` writes at most that many bytes there and
    // no Rust reference to the uninitialised bytes is made.
    let unfilled = unsafe { buf.unfilled_mut() };
    let n =
        unsafe { nix::libc::read(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len()) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    // SAFETY: the kernel initialised the first `n` bytes of the unfilled
    // part (n ≤ its length).
    unsafe { buf.assume_init(n) };
    buf.advance(n);
    Ok(n)
}

/// `send(2)` with `MSG_NOSIGNAL`: a peer gone is `EPIPE`, never a
/// `SIGPIPE` (which a program using the client API may not ignore).
fn send(s: &StdUnixStream, data: &[u8]) -> io::Result<usize> {
    use nix::sys::socket::{MsgFlags, send};
    use std::os::fd::AsRawFd;
    send(s.as_raw_fd(), data, MsgFlags::MSG_NOSIGNAL).map_err(io::Error::from)
}

impl AsyncRead for QuietUnixStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            let fd = this.fd()?;
            let mut g = match fd.poll_read_ready(cx) {
                Poll::Ready(g) => g?,
                Poll::Pending => {
                    match &mut this.reader {
                        Some(w) if w.will_wake(cx.waker()) => {}
                        slot => *slot = Some(cx.waker().clone()),
                    }
                    return Poll::Pending;
                }
            };
            let room = buf.remaining();
            match g.try_io(|s| read_into(s.get_ref(), buf)) {
                Ok(Ok(n)) => {
                    // A stream socket that filled less than asked had
                    // nothing more: what arrives next is a new edge. (As
                    // tokio's own streams do; it spares a read that would
                    // find nothing. Not so for the virtio port, which
                    // hands over one host buffer per read.)
                    if n > 0 && n < room {
                        g.clear_ready();
                    }
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for QuietUnixStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if !this.wide {
            match send(this.fd()?.get_ref(), data) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => this.reregister(true)?,
                r => return Poll::Ready(r),
            }
        }
        loop {
            let mut g = ready!(this.fd()?.poll_write_ready(cx))?;
            match g.try_io(|s| send(s.get_ref(), data)) {
                Ok(Ok(n)) => {
                    this.reregister(false)?;
                    return Poll::Ready(Ok(n));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.fd()?.get_ref().shutdown(std::net::Shutdown::Write))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::FutureExt;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// The events the epoll registrations of this process's descriptor
    /// `fd` ask for (from /proc/self/fdinfo's `tfd:` lines, which name the
    /// watched descriptor and its events in hex; an epoll reachable
    /// through two descriptors shows the same lines twice, counted once).
    fn masks(fd: std::os::fd::RawFd) -> Vec<u32> {
        let mut out = vec![];
        let mut seen = std::collections::HashSet::new();
        for e in std::fs::read_dir("/proc/self/fdinfo").unwrap().flatten() {
            let Ok(info) = std::fs::read_to_string(e.path()) else {
                continue;
            };
            for l in info.lines().filter(|l| l.starts_with("tfd:")) {
                let mut w = l.split_whitespace();
                if w.nth(1).and_then(|v| v.parse().ok()) != Some(fd) || !seen.insert(l.to_string())
                {
                    continue;
                }
                let hex = l.split("events:").nth(1).unwrap().split_whitespace().next();
                out.push(u32::from_str_radix(hex.unwrap(), 16).unwrap());
            }
        }
        out
    }

    const IN: u32 = nix::libc::EPOLLIN as u32;
    const OUT: u32 = nix::libc::EPOLLOUT as u32;

    /// Readability only; writability too only while a write waits for
    /// room; a read waiting across the swaps still completes; nothing is
    /// lost or reordered.
    #[tokio::test]
    async fn asks_for_writability_only_while_a_write_waits() {
        use std::os::fd::AsRawFd;
        let (a, b) = StdUnixStream::pair().unwrap();
        let fd = a.as_raw_fd();
        let a = QuietUnixStream::new(a).unwrap();
        let only_in = |m: &[u32]| matches!(m, [m] if m & IN != 0 && m & OUT == 0);
        assert!(only_in(&masks(fd)), "{:x?}", masks(fd));
        let (mut rd, mut wr) = tokio::io::split(a);
        let reader = tokio::spawn(async move {
            let mut got = [0u8; 5];
            rd.read_exact(&mut got).await.map(|_| got)
        });
        tokio::task::yield_now().await; // the reader waits
        wr.write_all(b"ab").await.unwrap();
        assert!(only_in(&masks(fd)), "a write with room: {:x?}", masks(fd));
        // Fill the socket until a write waits.
        let chunk = vec![7u8; 64 * 1024];
        let mut sent = 2usize;
        let mut write = loop {
            let mut w = Box::pin(wr.write(&chunk));
            match (&mut w).now_or_never() {
                Some(n) => sent += n.unwrap(),
                None => break w,
            }
        };
        assert!(
            matches!(masks(fd)[..], [m] if m & IN != 0 && m & OUT != 0),
            "one registration, both: {:x?}",
            masks(fd)
        );
        // The reader, woken by the swap, waits on the new registration.
        let b = tokio::net::UnixStream::from_std({
            b.set_nonblocking(true).unwrap();
            b
        })
        .unwrap();
        let (mut b_rd, mut b_wr) = b.into_split();
        b_wr.write_all(b"hello").await.unwrap();
        let got = tokio::time::timeout(std::time::Duration::from_secs(10), reader).await;
        assert_eq!(&got.unwrap().unwrap().unwrap(), b"hello");
        // The peer drains; the waiting write goes through, and the
        // registration asks for readability alone again.
        let drain = tokio::spawn(async move {
            let mut all = vec![];
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = b_rd.read(&mut buf).await.unwrap();
                if n == 0 {
                    return all;
                }
                all.extend_from_slice(&buf[..n]);
            }
        });
        let n = tokio::time::timeout(std::time::Duration::from_secs(10), &mut write).await;
        sent += n.unwrap().unwrap();
        drop(write);
        assert!(only_in(&masks(fd)), "narrow again: {:x?}", masks(fd));
        wr.shutdown().await.unwrap();
        let all = tokio::time::timeout(std::time::Duration::from_secs(10), drain).await;
        let all = all.unwrap().unwrap();
        assert_eq!(all.len(), sent);
        assert_eq!(&all[..2], b"ab");
        assert!(all[2..].iter().all(|&c| c == 7));
    }
}
