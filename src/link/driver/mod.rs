//! Runs a [`Session`] over any byte stream: connects through a [`Connector`],
//! moves bytes, reconnects with capped backoff, and offers `send`/`recv`.
//!
//! One task per link (the private `task` module). The session sits behind a std `Mutex` shared
//! by the task and the senders, locked for a few microseconds at a time and
//! never across an `.await`: `send` queues straight into the session's window
//! and pokes the task, so a sender streams without a task round trip per
//! message. The session itself stays a pure state machine.

mod connectors;
pub mod quiet;
mod task;
pub mod throttle;

use std::collections::VecDeque;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Notify, Semaphore, mpsc, oneshot, watch};
use tokio::task::JoinHandle;

pub use connectors::{UnixAcceptor, UnixConnector};
pub use quiet::QuietUnixStream;
pub use task::WRITE_HIGH_WATER;

use super::codec::DecodeStats;
use super::config::SessionConfig;
use super::session::{Session, SessionStats};
use super::{SendError, SessionId};

/// How long a connect attempt may take before it counts as failed.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// A future that yields a connected byte stream.
pub type ConnectFuture<Io> = Pin<Box<dyn Future<Output = io::Result<Io>> + Send + 'static>>;

/// Makes connections for a link: a UNIX socket path, a serial port, a port
/// device that waits for the host... Called again after every disconnect.
pub trait Connector: Send + 'static {
    /// The byte stream.
    type Io: AsyncRead + AsyncWrite + Send + Unpin + 'static;
    /// Start one connection attempt.
    fn connect(&mut self) -> ConnectFuture<Self::Io>;
    /// How long one attempt may take (None: as long as it takes, for
    /// connectors that wait for a peer to show up).
    fn connect_timeout(&self) -> Option<Duration> {
        Some(CONNECT_TIMEOUT)
    }
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
    /// Bytes of received events buffered for `recv` before reading stops
    /// (each counts its payload plus [`EVENT_OVERHEAD`]; at least 1, at most
    /// `u32::MAX`): what one peer can make this process hold unread.
    pub recv_queue_bytes: usize,
    /// Most bytes read from the peer per second (0: no limit): what a
    /// flooding peer can cost this process ([`throttle`]).
    pub read_bytes_per_sec: u64,
}

/// Default [`LinkOptions::recv_queue_bytes`]: 4 MiB, a send window's worth.
pub const DEFAULT_RECV_QUEUE_BYTES: usize = 4 << 20;
/// What an event costs in the receive queue beyond its payload (so a flood
/// of empty messages is bounded too).
pub const EVENT_OVERHEAD: usize = 64;

/// What `e` costs in a receive queue of `cap` bytes (never more than `cap`:
/// one event always fits).
pub(crate) fn event_cost(e: &LinkEvent, cap: usize) -> usize {
    let payload = match e {
        LinkEvent::Message(b) => b.len(),
        _ => 0,
    };
    payload.saturating_add(EVENT_OVERHEAD).min(cap)
}

impl Default for LinkOptions {
    fn default() -> Self {
        Self {
            name: "link".into(),
            session: SessionConfig::default(),
            backoff_min: Duration::from_millis(50),
            backoff_max: Duration::from_secs(5),
            recv_queue_bytes: DEFAULT_RECV_QUEUE_BYTES,
            read_bytes_per_sec: 0,
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
    /// When the last frame arrived (milliseconds since the UNIX epoch; 0:
    /// none yet). After a migration, the source's last frame.
    pub last_frame_unix_ms: u64,
    /// When the current handshake completed (milliseconds since the UNIX
    /// epoch; 0: never). After a migration, the destination's first frame.
    pub up_since_unix_ms: u64,
    /// The task has ended.
    pub closed: bool,
}

impl LinkStatus {
    /// Whether going from `self` to `new` is a change someone may wait for
    /// ([`LinkSender::watch_status`]): the connection, the handshake, the
    /// sessions, the acknowledged position, the task's end. The counters
    /// and timestamps move with every frame; they are published without a
    /// notification, so a frame does not wake every task that watches the
    /// link (on the host, each delivery waiting for its guest).
    pub(crate) fn notifies(&self, new: &LinkStatus) -> bool {
        self.connected != new.connected
            || self.established != new.established
            || self.local != new.local
            || self.peer != new.peer
            || self.acked != new.acked
            || self.connects != new.connects
            || self.closed != new.closed
    }
}

/// Where a sent message stands: its sequence number in a session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SendReceipt {
    /// The session that sent it.
    pub session: SessionId,
    /// Its sequence number.
    pub seq: u64,
}

/// State shared by the task and the senders.
pub(crate) struct Shared {
    session: Mutex<Session>,
    /// Poked by `send`: there is something new to transmit.
    wake_task: Notify,
    /// Set by `retry_now`: skip the rest of the reconnect backoff.
    retry_now: std::sync::atomic::AtomicBool,
    /// Set by `drop_connection`: the peer's endpoint is gone.
    drop_now: std::sync::atomic::AtomicBool,
    /// Poked by the task when the window opens or the link closes.
    window: Notify,
}

impl Shared {
    /// Lock the session. A panic while holding the lock cannot leave the
    /// session half-updated in a way that matters more than losing the link,
    /// so a poisoned lock is simply taken over.
    pub(crate) fn lock(&self) -> MutexGuard<'_, Session> {
        crate::lock(&self.session)
    }
}

/// The sending half; cheap to clone.
#[derive(Clone)]
pub struct LinkSender {
    shared: Arc<Shared>,
    status: watch::Receiver<LinkStatus>,
}

impl LinkSender {
    /// Queue a message, waiting while the send window is full. Returns once
    /// the message is in the window (it will be resent until acknowledged).
    pub async fn send(&self, msg: Bytes) -> Result<SendReceipt, SendError> {
        let mut q = VecDeque::from([msg]);
        self.queue_with(|s, now| match s.send_front(&mut q, now) {
            Ok(Some(seq)) => Ok(Some(SendReceipt {
                session: s.local_session(),
                seq,
            })),
            Ok(None) | Err(SendError::WindowFull) => Ok(None),
            Err(e) => Err(e),
        })
        .await
    }

    /// Queue messages from the front of `msgs`, as many as the send window
    /// takes, waiting until it takes at least one (when `msgs` is not
    /// empty): one lock and one wake-up of the link task for all of them,
    /// where [`Self::send`] takes one each. Returns how many were queued. A
    /// message too large for the link fails the call (it stays at the front
    /// when nothing was queued before it).
    pub async fn send_some(&self, msgs: &mut VecDeque<Bytes>) -> Result<usize, SendError> {
        self.queue_with(|s, now| {
            let mut n = 0;
            loop {
                match s.send_front(msgs, now) {
                    Ok(Some(_)) => n += 1,
                    Ok(None) => return Ok(Some(n)),
                    Err(SendError::WindowFull) if n == 0 => return Ok(None),
                    Err(SendError::WindowFull) => return Ok(Some(n)),
                    Err(e) if n == 0 => return Err(e),
                    Err(_) => return Ok(Some(n)),
                }
            }
        })
        .await
    }

    /// Run `queue` under the session lock until it gives a result (`None`:
    /// the window is full, wait for it to open), waking the link task after
    /// each try: to transmit what was queued, or — while we wait — to read
    /// on for the peer's ACKs even if its receive queue is full (it does so
    /// only if it knows we wait).
    async fn queue_with<T>(
        &self,
        mut queue: impl FnMut(
            &mut crate::link::Session,
            std::time::Instant,
        ) -> Result<Option<T>, SendError>,
    ) -> Result<T, SendError> {
        loop {
            let notified = self.shared.window.notified();
            tokio::pin!(notified);
            // Register before checking, so an opening between the check and
            // the wait is not missed.
            notified.as_mut().enable();
            if self.status.borrow().closed {
                return Err(SendError::Closed);
            }
            let res = queue(&mut self.shared.lock(), task::now())?;
            self.shared.wake_task.notify_one();
            match res {
                Some(r) => return Ok(r),
                None => notified.await,
            }
        }
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

    /// Wait until the peer acknowledged everything sent through this link so
    /// far (by any sender). Fails like [`Self::wait_acked`].
    pub async fn flush(&self) -> Result<(), SendError> {
        let last = {
            let s = self.shared.lock();
            SendReceipt {
                session: s.local_session(),
                seq: s.next_seq() - 1,
            }
        };
        self.wait_acked(last).await
    }

    /// The peer is probably there now (its socket just appeared): if the
    /// link waits out a reconnect backoff, connect at once instead.
    pub fn retry_now(&self) {
        self.shared
            .retry_now
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.shared.wake_task.notify_one();
    }

    /// The peer's endpoint is gone (its socket was removed): drop the
    /// connection now rather than wait for the liveness timeout; the session
    /// stays, and the link reconnects with its backoff.
    pub fn drop_connection(&self) {
        self.shared
            .drop_now
            .store(true, std::sync::atomic::Ordering::Relaxed);
        self.shared.wake_task.notify_one();
    }

    /// The status as of the link task's last wake-up: it may lag a `send`
    /// that just returned. Use [`Self::wait_acked`] or [`Self::flush`] to wait
    /// for acknowledgements.
    pub fn status(&self) -> LinkStatus {
        self.status.borrow().clone()
    }

    /// A receiver of status changes. It is notified when the connection,
    /// the handshake, a session, the acknowledged position or the task's
    /// end changes; the counters are updated with them and in between
    /// without a notification (read them with `borrow`).
    pub fn watch_status(&self) -> watch::Receiver<LinkStatus> {
        self.status.clone()
    }
}

/// The receiving half. Events come from the link task in batches —
/// everything one read of the connection produced arrives together, so
/// [`Self::try_recv`] after a [`Self::recv`] sees the rest of that read —
/// and at most [`LinkOptions::recv_queue_bytes`] wait here; past that the
/// link stops reading.
pub struct LinkReceiver {
    events: mpsc::UnboundedReceiver<Vec<LinkEvent>>,
    batch: VecDeque<LinkEvent>,
    room: Arc<Semaphore>,
    cap: usize,
    /// Room taken out of the queue but not given back yet: given back when
    /// the batch is done (or a quarter of the queue is owed), one
    /// semaphore operation per batch rather than per event.
    owed: usize,
}

impl LinkReceiver {
    /// The next event; `None` once the link task has ended.
    pub async fn recv(&mut self) -> Option<LinkEvent> {
        loop {
            if let Some(e) = self.pop() {
                return Some(e);
            }
            self.batch.extend(self.events.recv().await?);
        }
    }

    /// The next event if one is ready now (`None` when none is, or once
    /// the link task has ended: [`Self::recv`] tells which).
    pub fn try_recv(&mut self) -> Option<LinkEvent> {
        if self.batch.is_empty() {
            self.batch.extend(self.events.try_recv().ok()?);
        }
        self.pop()
    }

    fn pop(&mut self) -> Option<LinkEvent> {
        let e = self.batch.pop_front()?;
        self.owed = self.owed.saturating_add(event_cost(&e, self.cap));
        if self.batch.is_empty() || self.owed >= self.cap / 4 {
            self.room.add_permits(std::mem::take(&mut self.owed));
        }
        Some(e)
    }
}

impl Drop for LinkReceiver {
    fn drop(&mut self) {
        // The link task stops waiting for room: nobody reads any more.
        self.room.close();
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
        let (ev_tx, ev_rx) = mpsc::unbounded_channel();
        let cap = task::queue_cap(&opts);
        let room = Arc::new(Semaphore::new(cap));
        let (st_tx, st_rx) = watch::channel(LinkStatus::default());
        let (stop_tx, stop_rx) = oneshot::channel();
        let session = Session::new(opts.session.clone(), session_id, task::now());
        let shared = Arc::new(Shared {
            session: Mutex::new(session),
            wake_task: Notify::new(),
            retry_now: std::sync::atomic::AtomicBool::new(false),
            drop_now: std::sync::atomic::AtomicBool::new(false),
            window: Notify::new(),
        });
        let handle = tokio::spawn(task::run(
            connector,
            opts,
            shared.clone(),
            (ev_tx, room.clone()),
            st_tx,
            stop_rx,
        ));
        Self {
            tx: LinkSender {
                shared,
                status: st_rx,
            },
            rx: LinkReceiver {
                events: ev_rx,
                batch: VecDeque::new(),
                room,
                cap,
                owed: 0,
            },
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

#[cfg(test)]
mod tests {
    use super::LinkStatus;

    #[test]
    fn counters_alone_change_the_status_silently_and_the_ack_position_wakes() {
        let old = LinkStatus {
            connected: true,
            established: true,
            acked: 4,
            ..LinkStatus::default()
        };
        let mut busy = old.clone();
        busy.next_seq = 9;
        busy.expected = 7;
        busy.unacked = 3;
        busy.stats.sent = 12;
        busy.stats.delivered = 6;
        busy.last_frame_unix_ms = 1;
        assert!(!old.notifies(&busy), "counters alone wake nobody");
        let acked = LinkStatus {
            acked: 5,
            ..busy.clone()
        };
        assert!(
            busy.notifies(&acked),
            "a waiter in wait_acked needs this one"
        );
        let down = LinkStatus {
            established: false,
            ..busy.clone()
        };
        assert!(busy.notifies(&down));
        let closed = LinkStatus {
            closed: true,
            ..busy.clone()
        };
        assert!(busy.notifies(&closed));
        let new_peer = LinkStatus { peer: 77, ..busy };
        assert!(old.notifies(&new_peer));
    }
}
