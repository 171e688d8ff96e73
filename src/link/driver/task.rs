//! The link task: connect, move bytes, run timers, reconnect.
//!
//! Reading and writing are both branches of one `select!`, so two peers that
//! write at the same time never deadlock on full socket buffers. Frames are
//! pulled from the session only while the write buffer is below
//! [`WRITE_HIGH_WATER`], and no frame is read while events wait for the
//! application — unless our own sends wait for the peer's window: then
//! frames are read for the acknowledgements they carry and their DATA is
//! dropped unacknowledged, to be sent again ([`Session::set_receiving`]).
//! Memory stays bounded by the session window plus one batch of frames.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures_util::{FutureExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadHalf, WriteHalf};
use tokio::sync::{Semaphore, TryAcquireError, mpsc, oneshot, watch};
use tokio::time::{Instant as TokioInstant, Sleep, sleep_until};
use tokio_util::codec::FramedRead;
use tracing::{debug, info, trace, warn};

use super::throttle::Throttled;
use super::{ConnectFuture, Connector, LinkEvent, LinkOptions, LinkStatus, Shared};
use crate::link::Frame;
use crate::link::codec::{DecodeStats, FrameCodec};
use crate::link::session::{Event, ResetReason, Session};
use crate::logbudget::LogBudget;

/// Stop pulling frames from the session once this much is waiting to be
/// written: one 32 KiB virtio-serial write twice over.
pub const WRITE_HIGH_WATER: usize = 64 * 1024;
/// Read buffer start size; it grows to one maximal frame at most.
const READ_BUF: usize = 64 * 1024;
/// Frames handled per wake-up before the other branches get a turn.
const FRAMES_PER_WAKE: usize = 64;
/// How long a graceful close may spend writing what is due.
const CLOSE_FLUSH: Duration = Duration::from_secs(1);
/// Garbage on the stream is logged at most this often per link.
const GARBAGE_LOG_EVERY: Duration = Duration::from_secs(1);

pub(crate) fn now() -> std::time::Instant {
    TokioInstant::now().into_std()
}

struct Conn<Io> {
    reader: FramedRead<Throttled<ReadHalf<Io>>, FrameCodec>,
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
    Connecting(ConnectFuture<Io>),
    Connected(Box<Conn<Io>>),
}

enum IoStep<Io> {
    Frames(Vec<Frame>),
    Wrote,
    Connected(Io),
    Lost(String),
    Retry,
}

struct Driver {
    opts: LinkOptions,
    shared: Arc<Shared>,
    ev_tx: mpsc::UnboundedSender<Vec<LinkEvent>>,
    /// Room in the receive queue, in events (the receiver gives it back as
    /// it takes them).
    room: Arc<Semaphore>,
    st_tx: watch::Sender<LinkStatus>,
    /// Events waiting for room in the receive queue.
    pending: VecDeque<LinkEvent>,
    connects: u64,
    decode_total: DecodeStats,
    last_frame_unix_ms: u64,
    up_since_unix_ms: u64,
    /// What this link's peer may make us log ([`crate::logbudget`]).
    log: LogBudget,
    /// The session reset the connection because of the peer (its ERROR, an
    /// incompatible HELLO).
    reset_by_peer: bool,
    /// When the connection was last established.
    up_at: Option<TokioInstant>,
    /// A sender waits for the peer's window (as of the last housekeeping):
    /// frames are read even while events wait for the application.
    window_wanted: bool,
}

/// A connection the peer made us reset sooner than this after it came up
/// does not reset the reconnect backoff (it doubles): a guest that answers
/// every link-up with an ERROR is relinked at most every `backoff_max / 2`
/// (the backoff's jitter, [`crate::backoff`]), not
/// every few milliseconds with consumers re-created each time.
pub const STABLE_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// Run a link until `stop` fires.
pub(crate) async fn run<C: Connector>(
    mut connector: C,
    opts: LinkOptions,
    shared: Arc<Shared>,
    (ev_tx, room): (mpsc::UnboundedSender<Vec<LinkEvent>>, Arc<Semaphore>),
    st_tx: watch::Sender<LinkStatus>,
    mut stop: oneshot::Receiver<()>,
) {
    let mut d = Driver {
        opts,
        shared,
        ev_tx,
        room,
        st_tx,
        pending: VecDeque::new(),
        connects: 0,
        decode_total: DecodeStats::default(),
        last_frame_unix_ms: 0,
        up_since_unix_ms: 0,
        log: LogBudget::new(),
        reset_by_peer: false,
        up_at: None,
        window_wanted: false,
    };
    let name = d.opts.name.clone();
    let mut backoff = crate::backoff::Backoff::new(d.opts.backoff_min, d.opts.backoff_max);
    let mut phase: Phase<C::Io> = Phase::Connecting(start_connect(&mut connector));
    let mut timer = Box::pin(sleep_until(TokioInstant::now()));
    let room = d.room.clone();
    // The armed timer. Most deadlines only move later (every received frame
    // pushes the liveness deadline), so the timer is re-armed only when the
    // new deadline is earlier or the armed one has fired: an early wake-up is
    // a harmless tick, a timer-wheel update per frame is not free.
    let mut armed: Option<TokioInstant> = None;
    loop {
        let deadline = d.housekeeping(&mut phase, &name);
        if let Some(t) = deadline
            && armed.is_none_or(|a| t < a)
        {
            timer.as_mut().reset(t);
            trace!(link = %name, in_ms = t.saturating_duration_since(TokioInstant::now()).as_millis() as u64, "timer armed");
            armed = Some(t);
        }
        let reading = d.pending.is_empty() || d.window_wanted;
        let (batch, cost) = d.batch_len();
        let shared = d.shared.clone();
        tokio::select! {
            biased;
            _ = &mut stop => break,
            permit = room.clone().acquire_many_owned(cost), if !d.pending.is_empty() => match permit {
                Ok(p) => {
                    p.forget();
                    d.send_batch(batch);
                }
                // Nobody listens any more: drop deliveries, keep acking.
                Err(_) => d.pending.clear(),
            },
            step = io_step(&mut phase, reading) => match step {
                IoStep::Frames(frames) => {
                    d.last_frame_unix_ms = crate::unix_ms();
                    let now = now();
                    let mut s = d.shared.lock();
                    s.set_receiving(d.pending.is_empty());
                    for f in frames {
                        trace!(link = %name, kind = ?f.kind, seq = f.seq, ack = f.ack, "frame in");
                        s.on_frame(f, now);
                    }
                }
                IoStep::Wrote => trace!(link = %name, "wrote"),
                IoStep::Connected(io) => {
                    d.connects += 1;
                    debug!(link = %name, "connected");
                    d.shared.lock().on_connected(now());
                    phase = Phase::Connected(Box::new(d.new_conn(io)));
                }
                IoStep::Lost(why) => {
                    let was_up = d.disconnect(&mut phase, &name, &why);
                    let flapping = std::mem::take(&mut d.reset_by_peer)
                        && d.up_at.is_none_or(|t| t.elapsed() < STABLE_AFTER);
                    if was_up && !flapping {
                        backoff.reset();
                    } else {
                        backoff.grow();
                    }
                    phase = Phase::Wait(Box::pin(tokio::time::sleep(backoff.wait())));
                }
                IoStep::Retry => phase = Phase::Connecting(start_connect(&mut connector)),
            },
            // A sender queued something: the next housekeeping transmits it.
            // Or the owner knows the peer is back: cut the backoff short.
            _ = shared.wake_task.notified() => {
                if d.shared.drop_now.swap(false, std::sync::atomic::Ordering::Relaxed)
                    && matches!(phase, Phase::Connected(_))
                {
                    d.disconnect(&mut phase, &name, "the peer's endpoint is gone");
                    backoff.reset();
                    phase = Phase::Wait(Box::pin(tokio::time::sleep(backoff.wait())));
                }
                if d.shared.retry_now.swap(false, std::sync::atomic::Ordering::Relaxed)
                    && matches!(phase, Phase::Wait(_))
                {
                    debug!(link = %name, "retrying at once");
                    backoff.reset();
                    phase = Phase::Connecting(start_connect(&mut connector));
                }
            }
            _ = &mut timer, if armed.is_some() => {
                armed = None;
                trace!(link = %name, "timer");
                d.shared.lock().on_tick(now());
            }
        }
    }
    if matches!(phase, Phase::Connected(_)) {
        // Graceful close: send what is due (at least our final ACK) within a
        // bound, so the peer does not keep frames we already have.
        d.shared.lock().ack_now();
        d.housekeeping(&mut phase, &name);
        if let Phase::Connected(c) = &mut phase {
            let _ = tokio::time::timeout(CLOSE_FLUSH, async {
                c.writer.write_all(&c.out).await?;
                c.writer.shutdown().await
            })
            .await;
        }
    }
    d.st_tx.send_modify(|s| s.closed = true);
    d.shared.window.notify_waiters();
}

fn start_connect<C: Connector>(c: &mut C) -> ConnectFuture<C::Io> {
    let fut = c.connect();
    match c.connect_timeout() {
        None => fut,
        Some(t) => Box::pin(async move {
            tokio::time::timeout(t, fut).await.unwrap_or_else(|_| {
                Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "connect timed out",
                ))
            })
        }),
    }
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
            Ok(io) => IoStep::Connected(io),
            Err(e) => IoStep::Lost(format!("connect failed: {e}")),
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
                // Nothing to write and reading paused (events wait for the
                // application): this step waits, the other branches go on.
                else => std::future::pending().await,
            }
        }
    }
}

impl Driver {
    fn new_conn<Io: AsyncRead + AsyncWrite>(&self, io: Io) -> Conn<Io> {
        let (r, w) = tokio::io::split(io);
        let codec = FrameCodec::new(self.opts.session.max_payload);
        Conn {
            reader: FramedRead::with_capacity(
                Throttled::new(r, self.opts.read_bytes_per_sec),
                codec,
                READ_BUF,
            ),
            writer: w,
            out: BytesMut::new(),
            established: false,
            closing: false,
            garbage_logged: DecodeStats::default(),
            garbage_log_at: TokioInstant::now(),
        }
    }

    /// Everything between two waits, under one lock: session events out,
    /// frames to the write buffer, status published. Returns the next timer.
    fn housekeeping<Io>(&mut self, phase: &mut Phase<Io>, name: &str) -> Option<TokioInstant> {
        let shared = self.shared.clone();
        let mut s = shared.lock();
        let (reconnect, window_open) = self.collect_events(&mut s, phase, name);
        // Events to the application first: whether it has room decides
        // whether the session takes DATA (and NACKs what it dropped).
        self.flush_pending();
        s.set_receiving(self.pending.is_empty());
        self.window_wanted = s.window_wanted();
        if let Phase::Connected(c) = phase {
            if reconnect {
                c.closing = true;
            }
            let now = now();
            while c.out.len() < WRITE_HIGH_WATER {
                match s.poll_transmit(now) {
                    Some(f) => {
                        trace!(link = %name, kind = ?f.kind, seq = f.seq, ack = f.ack, "frame out");
                        f.encode_into(&mut c.out)
                    }
                    None => break,
                }
            }
            c.log_garbage(name);
        }
        self.publish(&s, phase);
        let deadline = s
            .next_deadline()
            .map(|d| TokioInstant::from_std(d).max(TokioInstant::now()));
        drop(s);
        if window_open {
            self.shared.window.notify_waiters();
        }
        deadline
    }

    /// Handle a lost connection; returns whether it had been established.
    fn disconnect<Io>(&mut self, phase: &mut Phase<Io>, name: &str, why: &str) -> bool {
        let Phase::Connected(c) = phase else {
            debug!(link = %name, reason = %why, "no connection");
            return false;
        };
        add_stats(&mut self.decode_total, c.reader.decoder().stats());
        self.shared.lock().on_disconnected(now());
        if c.established {
            if let Some(suppressed) = self.log.allow(std::time::Instant::now()) {
                info!(link = %name, reason = %why, suppressed, "link down");
            }
            self.pending.push_back(LinkEvent::Down);
        } else {
            debug!(link = %name, reason = %why, "connection lost before handshake");
        }
        c.established
    }

    /// Hand queued events to the application without waiting, all of them
    /// in one batch when they fit; what does not fit stays queued and
    /// pauses reading.
    fn flush_pending(&mut self) {
        while !self.pending.is_empty() {
            let (n, cost) = self.batch_len();
            let taken = self.room.try_acquire_many(cost).map(|p| p.forget());
            match taken {
                Ok(()) => self.send_batch(n),
                Err(TryAcquireError::NoPermits) => break,
                // Nobody listens any more: drop deliveries, keep acking.
                Err(TryAcquireError::Closed) => self.pending.clear(),
            }
        }
    }

    /// How many of the pending events go in the next batch, and their cost
    /// (all of them, up to the queue's size; at least one).
    fn batch_len(&self) -> (usize, u32) {
        let cap = queue_cap(&self.opts);
        let (mut n, mut cost) = (0usize, 0usize);
        for e in &self.pending {
            let c = super::event_cost(e, cap);
            if n > 0 && cost.saturating_add(c) > cap {
                break;
            }
            n += 1;
            cost = cost.saturating_add(c);
        }
        (n, u32::try_from(cost).unwrap_or(u32::MAX))
    }

    /// Send the first `n` pending events, for which room was taken.
    fn send_batch(&mut self, n: usize) {
        let n = n.min(self.pending.len());
        let batch: Vec<LinkEvent> = self.pending.drain(..n).collect();
        if self.ev_tx.send(batch).is_err() {
            self.pending.clear();
        }
    }

    /// Move session events to the app queue and the log. Returns whether the
    /// session asked for a reconnect and whether the window opened.
    fn collect_events<Io>(
        &mut self,
        s: &mut Session,
        phase: &mut Phase<Io>,
        name: &str,
    ) -> (bool, bool) {
        let (mut reconnect, mut window_open) = (false, false);
        while let Some(e) = s.poll_event() {
            match e {
                Event::Deliver(p) => self.pending.push_back(LinkEvent::Message(p)),
                Event::Established { peer } => {
                    if let Phase::Connected(c) = phase {
                        c.established = true;
                    }
                    self.up_since_unix_ms = crate::unix_ms();
                    self.up_at = Some(TokioInstant::now());
                    if let Some(suppressed) = self.log.allow(std::time::Instant::now()) {
                        info!(link = %name, peer = format_args!("{peer:016x}"), suppressed, "link up");
                    }
                    self.pending.push_back(LinkEvent::Up { peer });
                }
                Event::PeerChanged { previous, current } => {
                    if let Some(suppressed) = self.log.allow(std::time::Instant::now()) {
                        info!(link = %name, previous = ?previous.map(|p| format!("{p:016x}")),
                              current = format_args!("{current:016x}"), suppressed, "new peer session");
                    }
                    self.pending
                        .push_back(LinkEvent::PeerChanged { previous, current });
                }
                Event::Acked { .. } => {}
                Event::WindowOpen => window_open = true,
                Event::Reconnect(why) => {
                    if let Some(suppressed) = self.log.allow(std::time::Instant::now()) {
                        warn!(link = %name, reason = ?why, suppressed, "resetting connection");
                    }
                    // A peer that makes us reset grows the reconnect backoff.
                    self.reset_by_peer =
                        matches!(why, ResetReason::PeerGaveUp | ResetReason::Incompatible);
                    reconnect = true;
                }
                Event::Expired { unacked } => {
                    warn!(link = %name, lost = unacked.len(), "session expired after the grace period");
                    self.pending.push_back(LinkEvent::Expired { unacked });
                }
                Event::ProtocolError(e) => {
                    if let Some(suppressed) = self.log.allow(std::time::Instant::now()) {
                        warn!(link = %name, error = %e, suppressed, "link protocol error");
                    }
                }
            }
        }
        (reconnect, window_open)
    }

    fn publish<Io>(&self, s: &Session, phase: &Phase<Io>) {
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
            last_frame_unix_ms: self.last_frame_unix_ms,
            up_since_unix_ms: self.up_since_unix_ms,
            closed: false,
        };
        // Always stored, so it is current for every reader; watchers wake
        // only for what `LinkStatus::notifies` names (never for counters
        // alone, nor for no change at all).
        self.st_tx.send_if_modified(|old| {
            let wake = old.notifies(&st);
            *old = st;
            wake
        });
    }
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

fn add_stats(total: &mut DecodeStats, s: DecodeStats) {
    total.frames += s.frames;
    total.skipped_bytes += s.skipped_bytes;
    total.bad_header += s.bad_header;
    total.bad_version += s.bad_version;
    total.bad_payload += s.bad_payload;
    total.oversize += s.oversize;
    total.unknown_type += s.unknown_type;
}

/// The receive queue's size in bytes (see [`LinkOptions::recv_queue_bytes`]).
pub(crate) fn queue_cap(opts: &LinkOptions) -> usize {
    opts.recv_queue_bytes.clamp(1, u32::MAX as usize)
}
