//! The link session: a state machine with no I/O and no clock of its own.
//!
//! # How it is driven
//! Inputs are method calls: [`Session::on_connected`], [`Session::on_frame`],
//! [`Session::on_disconnected`], [`Session::on_tick`] and [`Session::send`], each
//! given the current time. Outputs are pulled: [`Session::poll_transmit`] yields
//! the next frame to write (control frames first, then DATA from the resend
//! cursor), [`Session::poll_event`] yields deliveries and state changes, and
//! [`Session::next_deadline`] says when `on_tick` is next needed. Pulling frames
//! means a writer that cannot keep up simply stops pulling: nothing queues
//! beyond the send window.
//!
//! # Reliability in one paragraph
//! Every DATA frame gets the next 64-bit sequence number of this session and
//! stays in the unacknowledged queue until the peer's cumulative ACK covers it.
//! On each connection both sides send HELLO {own session, the peer session last
//! seen, next sequence expected from it, oldest sequence still held}. A peer
//! that knows this session resumes exactly where it stopped receiving; one that
//! does not gets everything still held. Frames lost inside a connection
//! (garbage, a truncated frame) are found by a NACK on a sequence gap or by a
//! PING probe whose PONG acknowledges less than was sent before it, and resent.
//! Duplicates are dropped by sequence number.

use std::collections::VecDeque;
use std::time::Instant;

use bytes::Bytes;

use super::config::SessionConfig;
use super::frame::{Frame, FrameType, flags};
use super::hello::{Hello, PROTOCOL_VERSION, SessionId};
use super::{LinkError, SendError};

/// Why the session asks its driver for a new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetReason {
    /// Nothing was received for `dead_after`.
    LivenessTimeout,
    /// The peer's HELLO showed we cannot talk to it (see the preceding error).
    Incompatible,
    /// The peer sent an ERROR frame.
    PeerGaveUp,
}

/// What the session reports to its owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A message from the peer, in order, once per peer session.
    Deliver(Bytes),
    /// The handshake completed on the current connection.
    Established {
        /// The peer's session id.
        peer: SessionId,
    },
    /// The peer is a session we have not talked to before: it restarted, or we
    /// now talk to another process (a VM that migrated to another host).
    PeerChanged {
        /// The session we talked to before, if any.
        previous: Option<SessionId>,
        /// The new one.
        current: SessionId,
    },
    /// Every DATA frame up to `up_to` is acknowledged by the peer.
    Acked {
        /// Highest acknowledged sequence number.
        up_to: u64,
    },
    /// The send window has room again after `send` reported it full.
    WindowOpen,
    /// The driver should drop the connection and connect again.
    Reconnect(ResetReason),
    /// The grace period ran out while disconnected. The session has started
    /// over under a new id; these messages were never acknowledged.
    Expired {
        /// Payloads that were sent but not acknowledged, in order.
        unacked: Vec<Bytes>,
    },
    /// The peer misbehaved; the link carries on (or reconnects, if a
    /// `Reconnect` follows).
    ProtocolError(LinkError),
}

/// Counters a link exposes as metrics (they only grow), and its last round
/// trip.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SessionStats {
    /// The last PING's round trip: from writing it to the matching PONG
    /// (none yet: no PONG answered one of ours). The peer's PONG comes
    /// after it read everything before the PING, so this is the link's
    /// round trip including the peer's reading — a slow or stalled guest
    /// shows here. Only PINGs measure it: they go out after
    /// `ping_interval` of silence and as loss probes, so an idle link is
    /// measured every `ping_interval` and a busy one only when it probes.
    pub last_rtt: Option<std::time::Duration>,
    /// DATA frames sent for the first time.
    pub sent: u64,
    /// DATA frames sent again (after a reconnect, NACK or failed probe).
    pub resent: u64,
    /// Payloads delivered to the owner.
    pub delivered: u64,
    /// DATA frames dropped because their sequence number was already received.
    pub duplicates: u64,
    /// DATA frames dropped because an earlier one was missing.
    pub out_of_order: u64,
    /// Frames dropped because they arrived before the peer's HELLO.
    pub before_hello: u64,
    /// Connections that completed a handshake.
    pub established: u64,
    /// Times the peer turned out to be a new session.
    pub peer_changes: u64,
    /// Protocol errors seen.
    pub protocol_errors: u64,
    /// Sessions expired after the grace period.
    pub expired: u64,
    /// PINGs sent: after `ping_interval` of silence, or as loss probes when
    /// the peer's ACK did not come within `probe_after`. A steady stream of
    /// them under traffic means the peer's delayed ACKs do not arrive.
    pub pings: u64,
    /// Of those PINGs, the loss probes: sent because DATA stayed
    /// unacknowledged for `probe_after`. On a healthy link under sequential
    /// traffic this stays near zero (the next request carries the ACK);
    /// a steady count means the peer does not see our frames until our
    /// own next write — the lost wake-up of docs/virtio-serial.md.
    pub probes: u64,
    /// Rewinds of the send cursor put off by [`MIN_REWIND_INTERVAL`] (a
    /// climbing count means the peer asks for resends far too often).
    pub rewinds_deferred: u64,
    /// In-order DATA frames dropped unacknowledged because the owner's
    /// receive queue was full (see [`Session::set_receiving`]); the peer
    /// sends them again after the NACK that follows.
    pub discarded_full: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Conn {
    /// No connection; since when.
    Down { since: Instant },
    /// Connected, our HELLO sent (or due), the peer's not yet received.
    AwaitHello { hello_sent: Option<Instant> },
    /// Handshake done: DATA flows.
    Up,
}

#[derive(Debug, Clone, Copy)]
struct PingOut {
    nonce: u64,
    /// Our cursor when the PING was written: the PONG must acknowledge
    /// everything before it, or something was lost on the way.
    cursor: u64,
    sent: Instant,
}

/// One end of a link. See the module documentation.
#[derive(Debug)]
pub struct Session {
    cfg: SessionConfig,
    local: SessionId,
    // --- send side ---
    /// Sequence number the next `send` gets.
    next_seq: u64,
    /// Unacknowledged payloads; the first has sequence `base()`.
    unacked: VecDeque<Bytes>,
    unacked_bytes: usize,
    /// Next sequence number to transmit on this connection.
    cursor: u64,
    window_was_full: bool,
    /// Highest sequence number ever transmitted (to count resends apart).
    max_sent: u64,
    /// Since when the oldest transmitted frame waits for an ACK (None: none does).
    in_flight_since: Option<Instant>,
    // --- receive side ---
    /// The peer session we receive from (0: none yet).
    peer: SessionId,
    /// Next sequence number expected from `peer`.
    expected: u64,
    rx_since_ack: u32,
    ack_deadline: Option<Instant>,
    ack_now: bool,
    /// Send an ACK with the NACK flag (a gap was seen).
    nack_now: bool,
    /// The `expected` value a NACK was last sent for (one NACK per gap).
    nacked_at: u64,
    /// The owner takes what arrives (see [`Session::set_receiving`]).
    receiving: bool,
    /// DATA was dropped while not receiving: NACK once receiving again.
    discarded: bool,
    // --- peer limits (after a HELLO) ---
    peer_max_payload: Option<u32>,
    peer_window: Option<(u32, u32)>,
    // --- connection ---
    conn: Conn,
    hello_due: bool,
    hello_reply_due: bool,
    error_due: Option<String>,
    last_rx: Instant,
    ping_out: Option<PingOut>,
    next_nonce: u64,
    pong_due: Option<Bytes>,
    /// When the send cursor last moved back (NACK, PONG, HELLO).
    last_rewind: Option<Instant>,
    /// A rewind asked for within [`MIN_REWIND_INTERVAL`] of the last: done
    /// when the interval is over.
    rewind_deferred: Option<u64>,
    events: VecDeque<Event>,
    stats: SessionStats,
}

/// Rewinds of the send cursor (each resends up to a window) are at least this
/// far apart: a peer flooding NACKs, stale PONGs or HELLOs gets at most two
/// windows resent per second, not one per frame it sends. Real loss is rare
/// (the transport is a local stream); its recovery waits this long at most.
pub const MIN_REWIND_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);
/// The longest PING payload echoed in a PONG (ours carry an 8-byte nonce):
/// a PING of any size must not be answered with the same size.
pub const MAX_PING_PAYLOAD: usize = 8;

/// SplitMix64 step: derives a fresh session id when a session expires, so the
/// state machine stays free of any randomness source of its own.
fn next_id(x: SessionId) -> SessionId {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    (z ^ (z >> 31)).max(1)
}

impl Session {
    /// A new session with id `local` (random per process run, not 0; a 0 is
    /// replaced by 1), disconnected as of `now`. The config must be validated.
    pub fn new(cfg: SessionConfig, local: SessionId, now: Instant) -> Self {
        Self {
            cfg,
            local: local.max(1),
            next_seq: 1,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            cursor: 1,
            window_was_full: false,
            max_sent: 0,
            in_flight_since: None,
            peer: 0,
            expected: 0,
            rx_since_ack: 0,
            ack_deadline: None,
            ack_now: false,
            nack_now: false,
            nacked_at: 0,
            receiving: true,
            discarded: false,
            peer_max_payload: None,
            peer_window: None,
            conn: Conn::Down { since: now },
            hello_due: false,
            hello_reply_due: false,
            error_due: None,
            last_rx: now,
            ping_out: None,
            next_nonce: 1,
            pong_due: None,
            last_rewind: None,
            rewind_deferred: None,
            events: VecDeque::new(),
            stats: SessionStats::default(),
        }
    }

    // ------------------------------------------------------------ accessors

    /// This session's id.
    pub fn local_session(&self) -> SessionId {
        self.local
    }
    /// The peer session we last talked to (0: none).
    pub fn peer_session(&self) -> SessionId {
        self.peer
    }
    /// Whether the handshake is done on the current connection.
    pub fn is_established(&self) -> bool {
        self.conn == Conn::Up
    }
    /// Sequence number the next `send` will get.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }
    /// Next sequence number expected from the peer.
    pub fn expected(&self) -> u64 {
        self.expected
    }
    /// Oldest unacknowledged sequence number (= `next_seq` when none).
    pub fn base(&self) -> u64 {
        self.next_seq - self.unacked.len() as u64
    }
    /// How many frames wait for an ACK.
    pub fn unacked_len(&self) -> usize {
        self.unacked.len()
    }
    /// How many payload bytes wait for an ACK.
    pub fn unacked_bytes(&self) -> usize {
        self.unacked_bytes
    }
    /// The unacknowledged payloads, oldest first.
    pub fn unacked_payloads(&self) -> impl Iterator<Item = &Bytes> {
        self.unacked.iter()
    }
    /// Counters.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }
    /// The configuration this session runs with.
    pub fn config(&self) -> &SessionConfig {
        &self.cfg
    }

    /// Largest payload `send` accepts now: ours, or the peer's if smaller.
    pub fn max_send_payload(&self) -> u32 {
        self.peer_max_payload
            .map_or(self.cfg.max_payload, |p| p.min(self.cfg.max_payload))
    }

    fn window(&self) -> (usize, usize) {
        let (mut f, mut b) = (self.cfg.window_frames, self.cfg.window_bytes);
        if let Some((pf, pb)) = self.peer_window {
            f = f.min(pf);
            b = b.min(pb);
        }
        (f as usize, b as usize)
    }

    /// Whether a message of `len` bytes fits the window now.
    pub fn can_send(&self, len: usize) -> bool {
        let (f, b) = self.window();
        // An empty queue takes any message up to the maximum payload, so a
        // peer window below max_payload cannot wedge the link.
        self.unacked.is_empty()
            || (self.unacked.len() < f && self.unacked_bytes.saturating_add(len) <= b)
    }

    /// Someone waits for room in the send window (a `send` was refused
    /// with [`SendError::WindowFull`] and the window has not opened since).
    pub fn window_wanted(&self) -> bool {
        self.window_was_full
    }

    // ------------------------------------------------------------ inputs

    /// Whether the owner can take delivered messages now. While it cannot,
    /// an in-order DATA frame is dropped unacknowledged (counted in
    /// [`SessionStats::discarded_full`]) instead of delivered, and no NACK
    /// is sent for gaps; once it can again, one NACK asks the peer to send
    /// from `expected` again. The driver reads on while its queue is full
    /// only when its own sends wait for the peer's window: the peer's
    /// acknowledgements may sit in the stream behind DATA it cannot take,
    /// and not reading them would leave both sides waiting for ever.
    pub fn set_receiving(&mut self, receiving: bool) {
        if receiving && !self.receiving && self.discarded && self.conn == Conn::Up {
            self.nacked_at = self.expected;
            self.nack_now = true;
        }
        if receiving {
            self.discarded = false;
        }
        self.receiving = receiving;
    }

    /// Queue a message. Returns its sequence number, or why it was refused.
    pub fn send(&mut self, payload: Bytes, _now: Instant) -> Result<u64, SendError> {
        self.admit(payload.len())?;
        Ok(self.push(payload))
    }

    /// Queue the message at the front of `q`, taking it out of `q` only if
    /// it is queued (no copy of it either way). Like [`Self::send`];
    /// `Ok(None)` when `q` is empty.
    pub fn send_front(
        &mut self,
        q: &mut VecDeque<Bytes>,
        _now: Instant,
    ) -> Result<Option<u64>, SendError> {
        let Some(len) = q.front().map(Bytes::len) else {
            return Ok(None);
        };
        self.admit(len)?;
        let payload = q.pop_front().unwrap_or_default();
        Ok(Some(self.push(payload)))
    }

    /// Whether a message of `len` bytes may be queued now.
    fn admit(&mut self, len: usize) -> Result<(), SendError> {
        let max = self.max_send_payload();
        if len > max as usize {
            return Err(SendError::TooLarge { len, max });
        }
        if !self.can_send(len) {
            self.window_was_full = true;
            return Err(SendError::WindowFull);
        }
        Ok(())
    }

    fn push(&mut self, payload: Bytes) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.unacked_bytes += payload.len();
        self.unacked.push_back(payload);
        seq
    }

    /// A new connection is up: say HELLO.
    pub fn on_connected(&mut self, _now: Instant) {
        self.conn = Conn::AwaitHello { hello_sent: None };
        self.hello_due = true;
        self.reset_connection_state();
    }

    /// The connection is gone. Everything in flight on it is presumed lost.
    pub fn on_disconnected(&mut self, now: Instant) {
        if !matches!(self.conn, Conn::Down { .. }) {
            self.conn = Conn::Down { since: now };
        }
        self.reset_connection_state();
    }

    fn reset_connection_state(&mut self) {
        self.hello_reply_due = false;
        self.error_due = None;
        self.ping_out = None;
        self.pong_due = None;
        self.ack_now = false;
        self.nack_now = false;
        // A new connection's HELLO tells the peer where to resume.
        self.discarded = false;
        self.ack_deadline = None;
        self.in_flight_since = None;
        self.rewind_deferred = None;
    }

    /// Closing: acknowledge everything received now rather than after the
    /// ACK delay, so the peer can free it.
    pub fn ack_now(&mut self) {
        if self.rx_since_ack > 0 || self.ack_deadline.is_some() {
            self.ack_now = true;
        }
    }

    /// A frame arrived on the current connection.
    pub fn on_frame(&mut self, frame: Frame, now: Instant) {
        if matches!(self.conn, Conn::Down { .. }) {
            // A driver bug or a stale frame read after the disconnect: ignore.
            return;
        }
        self.last_rx = now;
        match frame.kind {
            FrameType::Hello => self.on_hello(&frame, now),
            FrameType::Error => {
                let reason = String::from_utf8_lossy(&frame.payload).into_owned();
                self.protocol_error(LinkError::PeerError(reason));
                self.request_reconnect(now, ResetReason::PeerGaveUp);
            }
            _ if self.conn != Conn::Up => self.stats.before_hello += 1,
            FrameType::Data => {
                self.on_ack(frame.ack, now);
                self.on_data(frame.seq, frame.payload, now);
            }
            FrameType::Ack => {
                self.on_ack(frame.ack, now);
                if frame.flags & flags::NACK != 0 {
                    self.rewind(frame.ack.saturating_add(1), now);
                }
            }
            FrameType::Ping => {
                self.on_ack(frame.ack, now);
                // Only the latest PING is answered: a PING flood costs one
                // PONG, of at most MAX_PING_PAYLOAD bytes.
                let n = frame.payload.len().min(MAX_PING_PAYLOAD);
                self.pong_due = Some(frame.payload.slice(..n));
            }
            FrameType::Pong => {
                self.on_ack(frame.ack, now);
                self.on_pong(&frame, now);
            }
        }
    }

    fn on_data(&mut self, seq: u64, payload: Bytes, now: Instant) {
        if !self.receiving && seq >= self.expected {
            // No room with the owner: the peer sends it again after our
            // NACK once there is (see `set_receiving`).
            self.stats.discarded_full += 1;
            self.discarded = true;
            return;
        }
        if seq == self.expected {
            // `expected` starts at most at MAX_SEQ (the HELLO's bound).
            let Some(next) = self.expected.checked_add(1) else {
                return self
                    .protocol_error(LinkError::MalformedHello("sequence numbers exhausted"));
            };
            self.expected = next;
            self.stats.delivered += 1;
            self.events.push_back(Event::Deliver(payload));
            self.rx_since_ack += 1;
            if self.rx_since_ack >= self.cfg.ack_every {
                self.ack_now = true;
            } else if self.ack_deadline.is_none() {
                self.ack_deadline = Some(now + self.cfg.ack_delay);
            }
        } else if seq < self.expected {
            // The peer resent what we have: tell it where we are.
            self.stats.duplicates += 1;
            self.ack_now = true;
        } else {
            self.stats.out_of_order += 1;
            if self.nacked_at != self.expected {
                self.nacked_at = self.expected;
                self.nack_now = true;
            }
        }
    }

    fn on_ack(&mut self, ack: u64, now: Instant) {
        let base = self.base();
        if ack < base {
            return; // nothing new (or 0: nothing received yet)
        }
        if ack >= self.next_seq {
            self.protocol_error(LinkError::AckBeyondSent {
                ack,
                next: self.next_seq,
            });
            return;
        }
        let n = (ack - base + 1) as usize;
        for p in self.unacked.drain(..n) {
            self.unacked_bytes -= p.len();
        }
        self.cursor = self.cursor.max(ack + 1);
        self.in_flight_since = (self.cursor > self.base()).then_some(now);
        self.events.push_back(Event::Acked { up_to: ack });
        if self.window_was_full && self.can_send(0) {
            self.window_was_full = false;
            self.events.push_back(Event::WindowOpen);
        }
    }

    fn on_pong(&mut self, frame: &Frame, now: Instant) {
        let Some(p) = self.ping_out else { return };
        let mut nonce = [0u8; 8];
        if let Some(s) = frame.payload.get(..8) {
            nonce.copy_from_slice(s);
        }
        if u64::from_be_bytes(nonce) != p.nonce {
            return;
        }
        self.ping_out = None;
        self.stats.last_rtt = Some(now.saturating_duration_since(p.sent));
        // The PONG was written after the peer read everything we sent before
        // the PING; if its ACK is short of that, those frames were lost.
        if frame.ack.saturating_add(1) < p.cursor {
            self.rewind(frame.ack.saturating_add(1), now);
        }
    }

    /// Resend from `from` on this connection (never before the base), at
    /// most once per [`MIN_REWIND_INTERVAL`]: a rewind asked for sooner is
    /// done when the interval is over.
    fn rewind(&mut self, from: u64, now: Instant) {
        let from = from.max(self.base());
        if from >= self.cursor {
            return;
        }
        if self
            .last_rewind
            .is_some_and(|t| now < t + MIN_REWIND_INTERVAL)
        {
            self.rewind_deferred = Some(self.rewind_deferred.map_or(from, |d| d.min(from)));
            self.stats.rewinds_deferred += 1;
            return;
        }
        self.cursor = from;
        self.last_rewind = Some(now);
    }

    /// When a deferred rewind is due.
    fn rewind_deadline(&self) -> Option<Instant> {
        self.rewind_deferred?;
        Some(self.last_rewind? + MIN_REWIND_INTERVAL)
    }

    fn on_hello(&mut self, frame: &Frame, now: Instant) {
        let h = match Hello::decode(&frame.payload) {
            Ok(h) => h,
            Err(e) => {
                let fatal = matches!(e, LinkError::IncompatibleVersion { .. });
                self.error_due = Some(e.to_string());
                self.protocol_error(e);
                if fatal {
                    self.request_reconnect(now, ResetReason::Incompatible);
                }
                return;
            }
        };
        if h.session == self.local {
            // Our own HELLO came back: the line echoes or is looped back
            // (a tty not yet in raw mode does this). Never take ourselves
            // for the peer.
            self.protocol_error(LinkError::OwnHelloEchoed);
            return;
        }
        if let Some(queued) = self.unacked.iter().map(Bytes::len).max()
            && queued > h.max_payload as usize
        {
            let e = LinkError::PeerMaxPayloadTooSmall {
                peer_max: h.max_payload,
                queued,
            };
            self.error_due = Some(e.to_string());
            self.protocol_error(e);
            self.request_reconnect(now, ResetReason::Incompatible);
            return;
        }
        self.peer_max_payload = Some(h.max_payload);
        self.peer_window = Some((h.window_frames, h.window_bytes));

        // Receive side: which stream of theirs do we follow?
        if h.session != self.peer {
            let previous = (self.peer != 0).then_some(self.peer);
            self.peer = h.session;
            self.expected = h.send_base;
            self.nacked_at = 0;
            self.rx_since_ack = 0;
            self.stats.peer_changes += 1;
            self.events.push_back(Event::PeerChanged {
                previous,
                current: h.session,
            });
        } else if h.send_base > self.expected {
            // Frames between were acknowledged by another host's proxy while
            // the VM ran there (migration back and forth): they are not ours
            // to wait for.
            self.expected = h.send_base;
        }

        // Send side: what does the peer have of ours?
        let resume = if h.peer_session == self.local {
            let e = h.next_expected;
            if e > self.next_seq {
                self.protocol_error(LinkError::AckBeyondSent {
                    ack: e.saturating_sub(1),
                    next: self.next_seq,
                });
                self.base()
            } else {
                if e < self.base() {
                    self.protocol_error(LinkError::ResumeBeforeBase {
                        asked: e,
                        base: self.base(),
                    });
                }
                self.on_ack(e.saturating_sub(1), now);
                e.max(self.base())
            }
        } else {
            self.base()
        };
        let is_reply = frame.flags & flags::REPLY != 0;
        let was_up = self.conn == Conn::Up;
        if !was_up {
            // A new connection: resume from what the peer has.
            self.cursor = resume;
            self.ping_out = None;
            self.in_flight_since = None;
        } else if !is_reply {
            // A fresh HELLO on an established connection: the peer's view
            // restarted (a migration's pre-connected destination), or a
            // peer asks for resends — rate-limited like any rewind. A
            // REPLY on an established connection only confirms it.
            self.rewind(resume, now);
            self.ping_out = None;
            self.in_flight_since = None;
        }
        if !is_reply {
            self.hello_reply_due = true;
        }
        self.hello_due = false;
        if !was_up {
            self.conn = Conn::Up;
            self.stats.established += 1;
            self.events
                .push_back(Event::Established { peer: h.session });
        }
    }

    fn protocol_error(&mut self, e: LinkError) {
        self.stats.protocol_errors += 1;
        self.events.push_back(Event::ProtocolError(e));
    }

    fn request_reconnect(&mut self, now: Instant, why: ResetReason) {
        self.events.push_back(Event::Reconnect(why));
        // Keep an ERROR frame due so the peer learns why, if the driver still
        // writes before it drops the connection.
        let err = self.error_due.take();
        self.on_disconnected(now);
        self.error_due = err;
    }

    /// Time has passed: run the timers.
    pub fn on_tick(&mut self, now: Instant) {
        match self.conn {
            Conn::Down { since } => {
                if now.saturating_duration_since(since) >= self.cfg.grace {
                    self.expire(now);
                }
            }
            Conn::AwaitHello { hello_sent } => {
                if hello_sent.is_some_and(|t| now >= t + self.cfg.hello_retry) {
                    self.hello_due = true;
                }
            }
            Conn::Up => {
                if now.saturating_duration_since(self.last_rx) >= self.cfg.dead_after {
                    self.request_reconnect(now, ResetReason::LivenessTimeout);
                    return;
                }
                if self.ack_deadline.is_some_and(|t| now >= t) {
                    self.ack_now = true;
                }
                if self.rewind_deadline().is_some_and(|t| now >= t)
                    && let Some(from) = self.rewind_deferred.take()
                {
                    self.rewind(from, now);
                }
            }
        }
    }

    fn expire(&mut self, now: Instant) {
        let unacked: Vec<Bytes> = self.unacked.drain(..).collect();
        self.stats.expired += 1;
        self.local = next_id(self.local);
        self.next_seq = 1;
        self.cursor = 1;
        self.max_sent = 0;
        self.unacked_bytes = 0;
        self.peer = 0;
        self.expected = 0;
        self.peer_max_payload = None;
        self.peer_window = None;
        self.conn = Conn::Down { since: now };
        self.events.push_back(Event::Expired { unacked });
        if self.window_was_full {
            self.window_was_full = false;
            self.events.push_back(Event::WindowOpen);
        }
    }

    /// When `on_tick` must run next (None: no timer is armed).
    pub fn next_deadline(&self) -> Option<Instant> {
        match self.conn {
            Conn::Down { since } => Some(since + self.cfg.grace),
            Conn::AwaitHello { hello_sent } => hello_sent.map(|t| t + self.cfg.hello_retry),
            Conn::Up => {
                let mut d = self.last_rx + self.cfg.dead_after;
                if let Some(t) = self.ack_deadline {
                    d = d.min(t);
                }
                if let Some(t) = self.ping_deadline() {
                    d = d.min(t);
                }
                if let Some(t) = self.rewind_deadline() {
                    d = d.min(t);
                }
                Some(d)
            }
        }
    }

    /// When a PING becomes due: after `ping_interval` of silence, or as a loss
    /// probe after `probe_after` without ACK progress; one outstanding at a
    /// time, a lost one replaced after `ping_interval`.
    fn ping_deadline(&self) -> Option<Instant> {
        let idle = self.last_rx + self.cfg.ping_interval;
        let due = self.probe_deadline().map_or(idle, |p| p.min(idle));
        match self.ping_out {
            Some(p) => Some(due.max(p.sent + self.cfg.ping_interval)),
            None => Some(due),
        }
    }

    /// When a loss probe becomes due: DATA unacknowledged for `probe_after`.
    fn probe_deadline(&self) -> Option<Instant> {
        self.in_flight_since.map(|t| t + self.cfg.probe_after)
    }

    // ------------------------------------------------------------ outputs

    /// The next event for the owner, if any.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// The next frame to write, if any. Control frames come first; DATA comes
    /// from the resend cursor. Every frame carries the current cumulative ACK.
    pub fn poll_transmit(&mut self, now: Instant) -> Option<Frame> {
        let ack = self.expected.saturating_sub(1);
        if let Some(reason) = self.error_due.take() {
            return Some(Frame::new(FrameType::Error, ack, Bytes::from(reason)));
        }
        match self.conn {
            Conn::Down { .. } => None,
            Conn::AwaitHello { .. } => {
                if !self.hello_due {
                    return None;
                }
                self.hello_due = false;
                self.conn = Conn::AwaitHello {
                    hello_sent: Some(now),
                };
                Some(self.hello_frame(0))
            }
            Conn::Up => self.poll_transmit_up(now, ack),
        }
    }

    fn poll_transmit_up(&mut self, now: Instant, ack: u64) -> Option<Frame> {
        let frame = if self.hello_reply_due {
            self.hello_reply_due = false;
            self.hello_frame(flags::REPLY)
        } else if let Some(p) = self.pong_due.take() {
            Frame::new(FrameType::Pong, ack, p)
        } else if self.ping_deadline().is_some_and(|t| now >= t) {
            let nonce = self.next_nonce;
            self.next_nonce += 1;
            self.stats.pings += 1;
            if self.probe_deadline().is_some_and(|t| now >= t) {
                self.stats.probes += 1;
            }
            self.ping_out = Some(PingOut {
                nonce,
                cursor: self.cursor,
                sent: now,
            });
            Frame::new(
                FrameType::Ping,
                ack,
                Bytes::copy_from_slice(&nonce.to_be_bytes()),
            )
        } else if let Some(f) = self.next_data(ack, now) {
            f
        } else if self.nack_now {
            self.nack_now = false;
            let mut f = Frame::new(FrameType::Ack, ack, Bytes::new());
            f.flags = flags::NACK;
            f
        } else if self.ack_now {
            Frame::new(FrameType::Ack, ack, Bytes::new())
        } else {
            return None;
        };
        // Whatever goes out carries the ACK.
        self.ack_now = false;
        self.ack_deadline = None;
        self.rx_since_ack = 0;
        Some(frame)
    }

    fn next_data(&mut self, ack: u64, now: Instant) -> Option<Frame> {
        let idx = usize::try_from(self.cursor.checked_sub(self.base())?).ok()?;
        let payload = self.unacked.get(idx)?.clone();
        if self.cursor > self.max_sent {
            self.max_sent = self.cursor;
            self.stats.sent += 1;
        } else {
            self.stats.resent += 1;
        }
        let seq = self.cursor;
        self.cursor += 1;
        if self.in_flight_since.is_none() {
            self.in_flight_since = Some(now);
        }
        Some(Frame {
            kind: FrameType::Data,
            flags: 0,
            seq,
            ack,
            payload,
        })
    }

    fn hello_frame(&self, flags: u16) -> Frame {
        let h = Hello {
            version: PROTOCOL_VERSION,
            capabilities: 0,
            session: self.local,
            peer_session: self.peer,
            next_expected: self.expected,
            send_base: self.base(),
            max_payload: self.cfg.max_payload,
            window_frames: self.cfg.window_frames,
            window_bytes: self.cfg.window_bytes,
        };
        let mut f = Frame::new(
            FrameType::Hello,
            self.expected.saturating_sub(1),
            h.encode(),
        );
        f.flags = flags;
        f
    }
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
