//! Runs a [`Session`] over any byte stream: connects through a [`Connector`],
//! moves bytes, reconnects with capped backoff, and offers `send`/`recv`.
//!
//! One task per link. Reading and writing are both branches of one `select!`,
//! so two peers that write at the same time never deadlock on full socket
//! buffers. Frames are pulled from the session only while the write buffer is
//! below [`WRITE_HIGH_WATER`], and no frame is read while a delivery waits for
//! the application: memory stays bounded by the session window plus one frame.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures_util::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::{Instant as TokioInstant, Sleep, sleep_until};
use tokio_util::codec::FramedRead;
use tracing::{debug, info, warn};

use super::codec::{DecodeStats, FrameCodec};
use super::config::SessionConfig;
use super::session::{Event, Session, SessionStats};
use super::{LinkError, SendError, SessionId};

/// Stop pulling frames from the session once this much is waiting to be
/// written: one 32 KiB virtio-serial write twice over.
pub const WRITE_HIGH_WATER: usize = 64 * 1024;
/// Read buffer start size; it grows to one maximal frame at most.
const READ_BUF: usize = 64 * 1024;
/// Frames handled per wake-up before the other branches get a turn.
const FRAMES_PER_WAKE: usize = 64;
/// Commands queued from senders: a small buffer, `send` waits beyond it.
const CMD_QUEUE: usize = 64;
/// How long a connect attempt may take before it counts as failed.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Garbage on the stream is logged at most this often per link.
const GARBAGE_LOG_EVERY: Duration = Duration::from_secs(1);

/// A future that yields a connected byte stream.
pub type ConnectFuture<Io> = Pin<Box<dyn Future<Output = io::Result<Io>> + Send + 'static>>;

/// Makes connections for a link: a UNIX socket path, a serial port, a port
/// device that waits for the host... Called again after every disconnect.
pub trait Connector: Send + 'static {
    /// The byte stream.
    type Io: AsyncRead + AsyncWrite + Send + Unpin + 'static;
    /// Start one connection attempt.
    fn connect(&mut self) -> ConnectFuture<Self::Io>;
}

/// Driver options besides the session's own.
#[derive(Debug, Clone)]
pub struct LinkOptions {
    /// A name for logs (the instance id on the host, the port on the guest).
    pub name: String,
    /// Session limits and timers.
    pub session: SessionConfig,
    /// First reconnect delay.
    pub backoff_min: Duration,
    /// Reconnect delay cap.
    pub backoff_max: Duration,
    /// Received messages buffered for `recv` before reading stops.
    pub recv_queue: usize,
}

impl Default for LinkOptions {
    fn default() -> Self {
        Self {
            name: "link".into(),
            session: SessionConfig::default(),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            recv_queue: 1024,
        }
    }
}

/// What `recv` yields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LinkEvent {
    /// A message from the peer.
    Message(Bytes),
    /// The handshake completed on a new connection.
    Up {
        /// The peer's session id.
        peer: SessionId,
    },
    /// The connection was lost; the session waits for the next one.
    Down,
    /// The peer is a new session (restarted, or another host after migration).
    PeerChanged {
        /// The session before, if any.
        previous: Option<SessionId>,
        /// The new one.
        current: SessionId,
    },
    /// The grace period ran out while disconnected: these were never acknowledged.
    Expired {
        /// Unacknowledged payloads, oldest first.
        unacked: Vec<Bytes>,
    },
}

/// A snapshot of a link for status displays and `wait_acked`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LinkStatus {
    /// A byte stream is connected.
    pub connected: bool,
    /// The handshake is done on it.
    pub established: bool,
    /// Our session id.
    pub local: SessionId,
    /// The peer's (0: none yet).
    pub peer: SessionId,
    /// Our next sequence number.
    pub next_seq: u64,
    /// Highest of our sequence numbers the peer acknowledged.
    pub acked: u64,
    /// Next sequence number expected from the peer.
    pub expected: u64,
    /// Frames waiting for an ACK.
    pub unacked: usize,
    /// Connections made.
    pub connects: u64,
    /// Session counters.
    pub stats: SessionStats,
    /// Decoder counters over all connections.
    pub decode: DecodeStats,
    /// The task has ended.
    pub closed: bool,
}

/// Where a sent message stands: its sequence number in a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendReceipt {
    /// The session that sent it.
    pub session: SessionId,
    /// Its sequence number.
    pub seq: u64,
}

enum Cmd {
    Send(Bytes, oneshot::Sender<Result<SendReceipt, SendError>>),
}

/// The sending half; cheap to clone.
#[derive(Clone)]
pub struct LinkSender {
    cmd: mpsc::Sender<Cmd>,
    status: watch::Receiver<LinkStatus>,
}

impl LinkSender {
    /// Queue a message, waiting while the send window is full.
    pub async fn send(&self, msg: Bytes) -> Result<SendReceipt, SendError> {
        let (tx, rx) = oneshot::channel();
        self.cmd
            .send(Cmd::Send(msg, tx))
            .await
            .map_err(|_| SendError::Closed)?;
        rx.await.map_err(|_| SendError::Closed)?
    }

    /// Wait until the peer acknowledged `r`. Fails if the session expired
    /// (the message is then in [`LinkEvent::Expired`]) or the link closed.
    pub async fn wait_acked(&self, r: SendReceipt) -> Result<(), SendError> {
        let mut st = self.status.clone();
        let s = st
            .wait_for(|s| s.closed || s.local != r.session || s.acked >= r.seq)
            .await
            .map_err(|_| SendError::Closed)?;
        if s.local == r.session && s.acked >= r.seq {
            Ok(())
        } else {
            Err(SendError::Closed)
        }
    }

    /// The latest status.
    pub fn status(&self) -> LinkStatus {
        self.status.borrow().clone()
    }
}

/// The receiving half.
pub struct LinkReceiver {
    events: mpsc::Receiver<LinkEvent>,
}

impl LinkReceiver {
    /// The next event; `None` once the link task has ended.
    pub async fn recv(&mut self) -> Option<LinkEvent> {
        self.events.recv().await
    }
}

/// A running link: its halves and its task. Destructure it to hand the halves
/// to different tasks; dropping the [`LinkTask`] stops the link.
pub struct Link {
    /// Send side.
    pub tx: LinkSender,
    /// Receive side. Keep calling `recv`: reading stops while it is full.
    pub rx: LinkReceiver,
    /// The task that runs the link.
    pub task: LinkTask,
}

/// The task behind a [`Link`]; dropping it aborts the task.
pub struct LinkTask {
    handle: JoinHandle<()>,
    stop: Option<oneshot::Sender<()>>,
}

impl LinkTask {
    /// Stop the task and wait for it.
    pub async fn close(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        let _ = (&mut self.handle).await;
    }
}

impl Drop for LinkTask {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

impl Link {
    /// Start a link task on the current tokio runtime. `session_id` is the
    /// process's random session id (see [`crate::random_session_id`]).
    pub fn spawn<C: Connector>(connector: C, opts: LinkOptions, session_id: SessionId) -> Self {
        let (cmd_tx, cmd_rx) = mpsc::channel(CMD_QUEUE);
        let (ev_tx, ev_rx) = mpsc::channel(opts.recv_queue.max(1));
        let (st_tx, st_rx) = watch::channel(LinkStatus::default());
        let (stop_tx, stop_rx) = oneshot::channel();
        let now = TokioInstant::now().into_std();
        let session = Session::new(opts.session.clone(), session_id, now);
        let handle = tokio::spawn(
            Driver {
                opts,
                session,
                st_tx,
                pending: Default::default(),
                blocked: None,
                connects: 0,
                decode_total: DecodeStats::default(),
            }
            .run(connector, cmd_rx, ev_tx, stop_rx),
        );
        Self {
            tx: LinkSender {
                cmd: cmd_tx,
                status: st_rx,
            },
            rx: LinkReceiver { events: ev_rx },
            task: LinkTask {
                handle,
                stop: Some(stop_tx),
            },
        }
    }

    /// Stop the task and wait for it.
    pub async fn close(self) {
        self.task.close().await;
    }
}

struct Driver {
    opts: LinkOptions,
    session: Session,
    st_tx: watch::Sender<LinkStatus>,
    /// Events waiting for room in the receive queue.
    pending: std::collections::VecDeque<LinkEvent>,
    /// A send that found the window full.
    blocked: Option<(Bytes, oneshot::Sender<Result<SendReceipt, SendError>>)>,
    connects: u64,
    decode_total: DecodeStats,
}

struct Conn<Io> {
    reader: FramedRead<ReadHalf<Io>, FrameCodec>,
    writer: WriteHalf<Io>,
    out: BytesMut,
    established: bool,
    /// Close once `out` is written (the session asked for a reconnect).
    closing: bool,
    garbage_logged: DecodeStats,
    garbage_log_at: TokioInstant,
}

enum Phase<Io> {
    Wait(Pin<Box<Sleep>>),
    Connecting(Pin<Box<tokio::time::Timeout<ConnectFuture<Io>>>>),
    Connected(Box<Conn<Io>>),
}

fn now() -> std::time::Instant {
    TokioInstant::now().into_std()
}

impl Driver {
    async fn run<C: Connector>(
        mut self,
        mut connector: C,
        mut cmd_rx: mpsc::Receiver<Cmd>,
        ev_tx: mpsc::Sender<LinkEvent>,
        mut stop: oneshot::Receiver<()>,
    ) {
        let name = self.opts.name.clone();
        let mut backoff = self.opts.backoff_min;
        let mut phase: Phase<C::Io> = Phase::Connecting(Box::pin(tokio::time::timeout(
            CONNECT_TIMEOUT,
            connector.connect(),
        )));
        let mut timer = Box::pin(sleep_until(TokioInstant::now()));
        let mut cmds_open = true;
        loop {
            self.retry_blocked();
            let reconnect = self.collect_events(&mut phase);
            if reconnect && let Phase::Connected(c) = &mut phase {
                c.closing = true;
            }
            if let Phase::Connected(c) = &mut phase {
                self.fill(c);
                c.log_garbage(&name);
            }
            self.publish(&phase);
            let deadline = self
                .session
                .next_deadline()
                .map(|d| TokioInstant::from_std(d).max(TokioInstant::now()));
            if let Some(d) = deadline {
                timer.as_mut().reset(d);
            }
            let accept_cmds = cmds_open && self.blocked.is_none();
            let reading = self.pending.is_empty();
            tokio::select! {
                biased;
                _ = &mut stop => break,
                permit = ev_tx.reserve(), if !reading => match permit {
                    Ok(p) => {
                        if let Some(e) = self.pending.pop_front() {
                            p.send(e);
                        }
                    }
                    // Nobody listens any more: drop deliveries, keep acking.
                    Err(_) => self.pending.clear(),
                },
                step = Self::io_step(&mut phase, reading) => match step {
                    IoStep::Frames(frames) => {
                        let now = now();
                        for f in frames {
                            self.session.on_frame(f, now);
                        }
                    }
                    IoStep::Wrote => {}
                    IoStep::Connected(io) => {
                        self.connects += 1;
                        debug!(link = %name, "connected");
                        self.session.on_connected(now());
                        let (r, w) = tokio::io::split(io);
                        let codec = FrameCodec::new(self.opts.session.max_payload);
                        phase = Phase::Connected(Box::new(Conn {
                            reader: FramedRead::with_capacity(r, codec, READ_BUF),
                            writer: w,
                            out: BytesMut::new(),
                            established: false,
                            closing: false,
                            garbage_logged: DecodeStats::default(),
                            garbage_log_at: TokioInstant::now(),
                        }));
                    }
                    IoStep::Lost(why) => {
                        let was_up = self.disconnect(&mut phase, &name, &why);
                        backoff = if was_up { self.opts.backoff_min } else {
                            (backoff * 2).min(self.opts.backoff_max)
                        };
                        phase = Phase::Wait(Box::pin(tokio::time::sleep(backoff)));
                    }
                    IoStep::Retry => {
                        phase = Phase::Connecting(Box::pin(tokio::time::timeout(
                            CONNECT_TIMEOUT,
                            connector.connect(),
                        )));
                    }
                },
                cmd = cmd_rx.recv(), if accept_cmds => match cmd {
                    Some(c) => self.on_cmd(c),
                    None => cmds_open = false,
                },
                _ = &mut timer, if deadline.is_some() => self.session.on_tick(now()),
            }
        }
        if let Phase::Connected(c) = &mut phase {
            let _ = c.writer.shutdown().await;
        }
        self.st_tx.send_modify(|s| s.closed = true);
    }

    /// One I/O step in the current phase.
    async fn io_step<Io: AsyncRead + AsyncWrite + Send + Unpin>(
        phase: &mut Phase<Io>,
        reading: bool,
    ) -> IoStep<Io> {
        match phase {
            Phase::Wait(sleep) => {
                sleep.as_mut().await;
                IoStep::Retry
            }
            Phase::Connecting(fut) => match fut.as_mut().await {
                Ok(Ok(io)) => IoStep::Connected(io),
                Ok(Err(e)) => IoStep::Lost(format!("connect failed: {e}")),
                Err(_) => IoStep::Lost("connect timed out".into()),
            },
            Phase::Connected(c) => {
                let c = &mut **c;
                if c.closing && c.out.is_empty() {
                    return IoStep::Lost("closed by the session".into());
                }
                tokio::select! {
                    r = c.writer.write(&c.out), if !c.out.is_empty() => match r {
                        Ok(0) => IoStep::Lost("write returned 0".into()),
                        Ok(n) => {
                            c.out.advance(n);
                            if c.out.is_empty() && let Err(e) = c.writer.flush().await {
                                return IoStep::Lost(format!("flush failed: {e}"));
                            }
                            IoStep::Wrote
                        }
                        Err(e) => IoStep::Lost(format!("write failed: {e}")),
                    },
                    f = c.reader.next(), if reading && !c.closing => match f {
                        Some(Ok(first)) => {
                            let mut frames = vec![first];
                            while frames.len() < FRAMES_PER_WAKE {
                                match c.reader.next().now_or_never() {
                                    Some(Some(Ok(f))) => frames.push(f),
                                    _ => break,
                                }
                            }
                            IoStep::Frames(frames)
                        }
                        Some(Err(e)) => IoStep::Lost(format!("read failed: {e}")),
                        None => IoStep::Lost("end of stream".into()),
                    },
                    // Nothing to write and reading paused (a delivery waits for
                    // the application): this step waits, the others go on.
                    else => std::future::pending().await,
                }
            }
        }
    }

    /// Handle a lost connection; returns whether it had been established.
    fn disconnect<Io>(&mut self, phase: &mut Phase<Io>, name: &str, why: &str) -> bool {
        let mut was_up = false;
        if let Phase::Connected(c) = phase {
            was_up = c.established;
            add_stats(&mut self.decode_total, c.reader.decoder().stats());
            self.session.on_disconnected(now());
            if was_up {
                info!(link = %name, reason = %why, "link down");
                self.pending.push_back(LinkEvent::Down);
            } else {
                debug!(link = %name, reason = %why, "connection lost before handshake");
            }
        } else {
            debug!(link = %name, reason = %why, "no connection");
        }
        was_up
    }

    fn on_cmd(&mut self, cmd: Cmd) {
        match cmd {
            Cmd::Send(msg, reply) => {
                self.blocked = Some((msg, reply));
                self.retry_blocked();
            }
        }
    }

    fn retry_blocked(&mut self) {
        let Some((msg, reply)) = self.blocked.take() else {
            return;
        };
        let local = self.session.local_session();
        match self.session.send(msg.clone(), now()) {
            Ok(seq) => {
                let _ = reply.send(Ok(SendReceipt {
                    session: local,
                    seq,
                }));
            }
            Err(SendError::WindowFull) => self.blocked = Some((msg, reply)),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Move session events to the app queue and the log; true if the session
    /// asked for a reconnect.
    fn collect_events<Io>(&mut self, phase: &mut Phase<Io>) -> bool {
        let name = &self.opts.name;
        let mut reconnect = false;
        while let Some(e) = self.session.poll_event() {
            match e {
                Event::Deliver(p) => self.pending.push_back(LinkEvent::Message(p)),
                Event::Established { peer } => {
                    if let Phase::Connected(c) = phase {
                        c.established = true;
                    }
                    info!(link = %name, peer = format_args!("{peer:016x}"), "link up");
                    self.pending.push_back(LinkEvent::Up { peer });
                }
                Event::PeerChanged { previous, current } => {
                    info!(link = %name, previous = ?previous.map(|p| format!("{p:016x}")),
                          current = format_args!("{current:016x}"), "new peer session");
                    self.pending
                        .push_back(LinkEvent::PeerChanged { previous, current });
                }
                Event::Acked { .. } | Event::WindowOpen => {}
                Event::Reconnect(why) => {
                    warn!(link = %name, reason = ?why, "resetting connection");
                    reconnect = true;
                }
                Event::Expired { unacked } => {
                    warn!(link = %name, lost = unacked.len(), "session expired after the grace period");
                    self.pending.push_back(LinkEvent::Expired { unacked });
                }
                Event::ProtocolError(e) => log_protocol_error(name, &e),
            }
        }
        reconnect
    }

    fn fill<Io>(&mut self, c: &mut Conn<Io>) {
        let now = now();
        while c.out.len() < WRITE_HIGH_WATER {
            match self.session.poll_transmit(now) {
                Some(f) => f.encode_into(&mut c.out),
                None => break,
            }
        }
    }

    fn publish<Io>(&self, phase: &Phase<Io>) {
        let s = &self.session;
        let mut decode = self.decode_total;
        let connected = if let Phase::Connected(c) = phase {
            add_stats(&mut decode, c.reader.decoder().stats());
            true
        } else {
            false
        };
        let st = LinkStatus {
            connected,
            established: s.is_established(),
            local: s.local_session(),
            peer: s.peer_session(),
            next_seq: s.next_seq(),
            acked: s.base() - 1,
            expected: s.expected(),
            unacked: s.unacked_len(),
            connects: self.connects,
            stats: s.stats(),
            decode,
            closed: false,
        };
        self.st_tx.send_if_modified(|old| {
            if *old == st {
                false
            } else {
                *old = st;
                true
            }
        });
    }
}

enum IoStep<Io> {
    Frames(Vec<super::Frame>),
    Wrote,
    Connected(Io),
    Lost(String),
    Retry,
}

impl<Io> Conn<Io> {
    /// Log skipped garbage, at most once per [`GARBAGE_LOG_EVERY`].
    fn log_garbage(&mut self, name: &str) {
        let st = self.reader.decoder().stats();
        if st.skipped_bytes == self.garbage_logged.skipped_bytes {
            return;
        }
        let now = TokioInstant::now();
        if now < self.garbage_log_at {
            return;
        }
        warn!(
            link = %name,
            skipped_bytes = st.skipped_bytes - self.garbage_logged.skipped_bytes,
            rejected = st.rejected() - self.garbage_logged.rejected(),
            "garbage on the link skipped"
        );
        self.garbage_logged = st;
        self.garbage_log_at = now + GARBAGE_LOG_EVERY;
    }
}

fn log_protocol_error(name: &str, e: &LinkError) {
    warn!(link = %name, error = %e, "link protocol error");
}

fn add_stats(total: &mut DecodeStats, s: DecodeStats) {
    total.frames += s.frames;
    total.skipped_bytes += s.skipped_bytes;
    total.bad_header += s.bad_header;
    total.bad_version += s.bad_version;
    total.bad_payload += s.bad_payload;
    total.oversize += s.oversize;
    total.unknown_type += s.unknown_type;
}

/// Connects to a UNIX socket path (the host side of a QEMU chardev, or a test).
#[derive(Debug, Clone)]
pub struct UnixConnector {
    /// The socket path.
    pub path: std::path::PathBuf,
}

impl Connector for UnixConnector {
    type Io = tokio::net::UnixStream;
    fn connect(&mut self) -> ConnectFuture<Self::Io> {
        let path = self.path.clone();
        Box::pin(async move { tokio::net::UnixStream::connect(path).await })
    }
}

/// Accepts connections on a UNIX listener, one at a time: each `connect`
/// waits for the next client. This is how QEMU's `server=on` chardev behaves,
/// and how the emulated guest port works.
pub struct UnixAcceptor {
    listener: std::sync::Arc<tokio::net::UnixListener>,
}

impl UnixAcceptor {
    /// Wrap a bound listener.
    pub fn new(listener: tokio::net::UnixListener) -> Self {
        Self {
            listener: std::sync::Arc::new(listener),
        }
    }
}

impl Connector for UnixAcceptor {
    type Io = tokio::net::UnixStream;
    fn connect(&mut self) -> ConnectFuture<Self::Io> {
        let l = self.listener.clone();
        Box::pin(async move { l.accept().await.map(|(s, _)| s) })
    }
}
