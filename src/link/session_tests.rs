//! Unit tests of the session rules, one scenario each. The seeded
//! fault simulation over real bytes lives in `tests/link_sim.rs`.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;
use crate::link::hello::HELLO_LEN;

fn cfg() -> SessionConfig {
    SessionConfig {
        window_frames: 4,
        window_bytes: 4096,
        max_payload: 1024,
        ..SessionConfig::default()
    }
}

struct Pair {
    a: Session,
    b: Session,
    now: Instant,
    /// Frames a→b and b→a that were written but not yet delivered.
    got_a: Vec<Bytes>,
    got_b: Vec<Bytes>,
    events_a: Vec<Event>,
    events_b: Vec<Event>,
}

impl Pair {
    fn new() -> Self {
        let now = Instant::now();
        Self {
            a: Session::new(cfg(), 0xA, now),
            b: Session::new(cfg(), 0xB, now),
            now,
            got_a: vec![],
            got_b: vec![],
            events_a: vec![],
            events_b: vec![],
        }
    }

    fn connect(&mut self) {
        self.a.on_connected(self.now);
        self.b.on_connected(self.now);
    }

    fn disconnect(&mut self) {
        self.a.on_disconnected(self.now);
        self.b.on_disconnected(self.now);
    }

    /// Exchange frames until both are quiet; `drop_a_to_b` filters a→b frames.
    fn pump_with(&mut self, mut keep_a_to_b: impl FnMut(&Frame) -> bool) {
        for _ in 0..1000 {
            let mut moved = false;
            while let Some(f) = self.a.poll_transmit(self.now) {
                moved = true;
                if keep_a_to_b(&f) {
                    self.b.on_frame(f, self.now);
                }
            }
            while let Some(f) = self.b.poll_transmit(self.now) {
                moved = true;
                self.a.on_frame(f, self.now);
            }
            self.drain();
            if !moved {
                return;
            }
        }
        panic!("pump did not settle");
    }

    fn pump(&mut self) {
        self.pump_with(|_| true);
    }

    fn drain(&mut self) {
        while let Some(e) = self.a.poll_event() {
            if let Event::Deliver(p) = &e {
                self.got_a.push(p.clone());
            }
            self.events_a.push(e);
        }
        while let Some(e) = self.b.poll_event() {
            if let Event::Deliver(p) = &e {
                self.got_b.push(p.clone());
            }
            self.events_b.push(e);
        }
    }

    fn tick(&mut self, by: Duration) {
        self.now += by;
        self.a.on_tick(self.now);
        self.b.on_tick(self.now);
        self.drain();
    }
}

fn msg(i: u32) -> Bytes {
    Bytes::from(i.to_be_bytes().to_vec())
}

#[test]
fn handshake_then_data_in_order_and_acked() {
    let mut p = Pair::new();
    p.connect();
    p.pump();
    assert!(p.a.is_established() && p.b.is_established());
    for i in 0..3 {
        p.a.send(msg(i), p.now).unwrap();
    }
    p.pump();
    assert_eq!(p.got_b, vec![msg(0), msg(1), msg(2)]);
    // Delayed ACK: not yet sent (3 < ack_every), sent after ack_delay.
    assert_eq!(p.a.unacked_len(), 3);
    p.tick(cfg().ack_delay);
    p.pump();
    assert_eq!(p.a.unacked_len(), 0);
    assert!(p.events_a.contains(&Event::Acked { up_to: 3 }));
}

#[test]
fn data_before_hello_is_dropped_and_resent() {
    let mut p = Pair::new();
    p.a.send(msg(1), p.now).unwrap();
    // a has nothing to say before it is connected.
    assert!(p.a.poll_transmit(p.now).is_none());
    p.connect();
    p.pump();
    assert_eq!(p.got_b, vec![msg(1)]);
}

#[test]
fn window_full_then_open() {
    let mut p = Pair::new();
    for i in 0..4 {
        p.a.send(msg(i), p.now).unwrap();
    }
    assert_eq!(p.a.send(msg(9), p.now), Err(SendError::WindowFull));
    assert_eq!(p.a.unacked_len(), 4);
    p.connect();
    p.pump();
    p.tick(cfg().ack_delay);
    p.pump();
    assert!(p.events_a.contains(&Event::WindowOpen));
    assert!(p.a.send(msg(9), p.now).is_ok());
}

#[test]
fn too_large_is_refused() {
    let mut p = Pair::new();
    let big = Bytes::from(vec![0u8; 1025]);
    assert_eq!(
        p.a.send(big, p.now),
        Err(SendError::TooLarge {
            len: 1025,
            max: 1024
        })
    );
}

#[test]
fn resume_same_peer_resends_exactly_what_is_missing() {
    let mut p = Pair::new();
    p.connect();
    p.pump();
    p.a.send(msg(0), p.now).unwrap();
    p.a.send(msg(1), p.now).unwrap();
    p.pump();
    // Both arrived, but b's ACK never made it back: the connection drops.
    assert_eq!(p.got_b.len(), 2);
    p.disconnect();
    p.a.send(msg(2), p.now).unwrap();
    p.connect();
    p.pump();
    // b says it expects 3: a resends only seq 3.
    assert_eq!(p.got_b, vec![msg(0), msg(1), msg(2)]);
    assert_eq!(p.a.stats().resent, 0);
    assert_eq!(p.b.stats().duplicates, 0);
}

#[test]
fn lost_tail_is_resent_after_reconnect() {
    let mut p = Pair::new();
    p.connect();
    p.pump();
    p.a.send(msg(0), p.now).unwrap();
    p.a.send(msg(1), p.now).unwrap();
    // The second DATA frame is lost in the reset.
    p.pump_with(|f| f.seq != 2);
    p.disconnect();
    p.connect();
    p.pump();
    assert_eq!(p.got_b, vec![msg(0), msg(1)]);
    assert_eq!(p.a.stats().resent, 1);
}

#[test]
fn restarted_peer_gets_everything_unacked() {
    let mut p = Pair::new();
    p.connect();
    p.pump();
    p.a.send(msg(0), p.now).unwrap();
    p.a.send(msg(1), p.now).unwrap();
    p.pump();
    p.disconnect();
    // b restarts: new session id, no memory.
    p.b = Session::new(cfg(), 0xBB, p.now);
    p.got_b.clear();
    p.connect();
    p.pump();
    assert_eq!(
        p.got_b,
        vec![msg(0), msg(1)],
        "at least once across a restart"
    );
    assert!(p.events_a.contains(&Event::PeerChanged {
        previous: Some(0xB),
        current: 0xBB
    }));
}

#[test]
fn gap_inside_a_connection_is_nacked_and_filled() {
    let mut p = Pair::new();
    p.connect();
    p.pump();
    for i in 0..3 {
        p.a.send(msg(i), p.now).unwrap();
    }
    let mut dropped = false;
    p.pump_with(|f| {
        if f.seq == 2 && !dropped {
            dropped = true;
            return false;
        }
        true
    });
    assert_eq!(p.got_b, vec![msg(0), msg(1), msg(2)]);
    assert_eq!(p.b.stats().out_of_order, 1);
}

#[test]
fn lost_last_frame_is_found_by_probe() {
    let mut p = Pair::new();
    p.connect();
    p.pump();
    p.a.send(msg(0), p.now).unwrap();
    p.pump_with(|f| f.kind != FrameType::Data);
    assert!(p.got_b.is_empty());
    assert_eq!(p.a.stats().probes, 0);
    p.tick(cfg().probe_after);
    p.pump();
    assert_eq!(p.got_b, vec![msg(0)]);
    // Its PINGs were loss probes, and counted as such.
    let s = p.a.stats();
    assert!(s.probes >= 1 && s.probes == s.pings, "{s:?}");
}

#[test]
fn silence_means_ping_then_reconnect() {
    let mut p = Pair::new();
    p.connect();
    p.pump();
    p.tick(cfg().ping_interval);
    let f = p.a.poll_transmit(p.now).unwrap();
    assert_eq!(f.kind, FrameType::Ping);
    // A keep-alive (nothing was in flight), not a loss probe.
    assert_eq!((p.a.stats().pings, p.a.stats().probes), (1, 0));
    p.tick(cfg().dead_after);
    assert!(
        p.events_a
            .contains(&Event::Reconnect(ResetReason::LivenessTimeout))
    );
    assert!(!p.a.is_established());
}

#[test]
fn a_pong_measures_the_round_trip_of_its_ping_only() {
    let mut p = Pair::new();
    p.connect();
    p.pump();
    assert_eq!(p.a.stats().last_rtt, None);
    p.tick(cfg().ping_interval);
    let ping = p.a.poll_transmit(p.now).unwrap();
    assert_eq!(ping.kind, FrameType::Ping);
    // A PONG with another nonce (stale, or forged) measures nothing.
    p.now += Duration::from_millis(3);
    let wrong = Frame::new(FrameType::Pong, 0, Bytes::from_static(b"00000000"));
    p.a.on_frame(wrong, p.now);
    assert_eq!(p.a.stats().last_rtt, None);
    p.now += Duration::from_millis(4);
    p.b.on_frame(ping, p.now);
    let pong = p.b.poll_transmit(p.now).unwrap();
    assert_eq!(pong.kind, FrameType::Pong);
    p.a.on_frame(pong.clone(), p.now);
    assert_eq!(p.a.stats().last_rtt, Some(Duration::from_millis(7)));
    // The same PONG again is answered already: the sample stays.
    p.now += Duration::from_millis(50);
    p.a.on_frame(pong, p.now);
    assert_eq!(p.a.stats().last_rtt, Some(Duration::from_millis(7)));
}

#[test]
fn ping_flood_costs_one_pong() {
    let mut p = Pair::new();
    p.connect();
    p.pump();
    for n in 0u64..100 {
        let ping = Frame::new(FrameType::Ping, 0, Bytes::copy_from_slice(&n.to_be_bytes()));
        p.b.on_frame(ping, p.now);
    }
    let pongs: Vec<_> = std::iter::from_fn(|| p.b.poll_transmit(p.now)).collect();
    assert_eq!(pongs.len(), 1);
    assert_eq!(&pongs[0].payload[..], &99u64.to_be_bytes());
}

#[test]
fn grace_keeps_then_expires_with_the_unacked_returned() {
    let mut p = Pair::new();
    p.a.send(msg(7), p.now).unwrap();
    p.tick(cfg().grace - Duration::from_millis(1));
    assert_eq!(p.a.unacked_len(), 1, "kept during the grace period");
    let old = p.a.local_session();
    p.tick(Duration::from_millis(1));
    assert!(p.events_a.contains(&Event::Expired {
        unacked: vec![msg(7)]
    }));
    assert_ne!(p.a.local_session(), old);
    assert_eq!(p.a.unacked_len(), 0);
}

#[test]
fn malformed_hello_is_an_error_not_a_crash() {
    let mut p = Pair::new();
    p.b.on_connected(p.now);
    p.b.on_frame(
        Frame::new(FrameType::Hello, 0, Bytes::from_static(b"short")),
        p.now,
    );
    p.drain();
    assert!(matches!(
        p.events_b[..],
        [Event::ProtocolError(LinkError::MalformedHello(_))]
    ));
    assert!(!p.b.is_established());
}

#[test]
fn incompatible_version_sends_error_and_asks_reconnect() {
    let mut p = Pair::new();
    p.b.on_connected(p.now);
    let mut payload = vec![0u8; HELLO_LEN];
    payload[8] = 1; // a session id, version 0
    p.b.on_frame(Frame::new(FrameType::Hello, 0, Bytes::from(payload)), p.now);
    p.drain();
    assert!(
        p.events_b
            .contains(&Event::Reconnect(ResetReason::Incompatible))
    );
    let f = p.b.poll_transmit(p.now).unwrap();
    assert_eq!(f.kind, FrameType::Error);
    assert!(String::from_utf8_lossy(&f.payload).contains("version 0"));
}

#[test]
fn ack_beyond_sent_is_ignored() {
    let mut p = Pair::new();
    p.connect();
    p.pump();
    p.a.send(msg(0), p.now).unwrap();
    p.a.on_frame(Frame::new(FrameType::Ack, 99, Bytes::new()), p.now);
    p.drain();
    assert_eq!(p.a.unacked_len(), 1);
    assert!(
        p.events_a
            .iter()
            .any(|e| matches!(e, Event::ProtocolError(LinkError::AckBeyondSent { .. })))
    );
}

#[test]
fn lost_hello_is_retried() {
    let mut p = Pair::new();
    p.connect();
    // a's HELLO vanishes; b's arrives.
    p.pump_with(|f| f.kind != FrameType::Hello);
    assert!(!p.b.is_established());
    p.tick(cfg().hello_retry);
    p.pump();
    assert!(p.a.is_established() && p.b.is_established());
}

#[test]
fn next_deadline_always_moves_forward_after_tick() {
    // Regression guard against a driver spinning on a deadline that a tick
    // does not clear.
    let mut p = Pair::new();
    p.connect();
    p.pump();
    p.a.send(msg(0), p.now).unwrap();
    for _ in 0..50 {
        let d = p.a.next_deadline().unwrap();
        p.now = p.now.max(d);
        p.a.on_tick(p.now);
        while p.a.poll_transmit(p.now).is_some() {}
        p.drain();
        if let Some(d2) = p.a.next_deadline() {
            assert!(
                d2 > p.now || !p.a.is_established(),
                "deadline did not advance"
            );
        }
        if !p.a.is_established() {
            break;
        }
    }
}

#[test]
fn own_hello_echoed_back_is_refused() {
    let mut p = Pair::new();
    p.a.on_connected(p.now);
    let hello = p.a.poll_transmit(p.now).unwrap();
    p.a.on_frame(hello, p.now);
    p.drain();
    assert!(!p.a.is_established(), "took itself for the peer");
    assert!(
        p.events_a
            .contains(&Event::ProtocolError(LinkError::OwnHelloEchoed))
    );
}

/// A HELLO a hostile peer could send: `send_base` and windows as it likes.
fn hello_from(session: SessionId, send_base: u64, window_frames: u32) -> Frame {
    let h = crate::link::hello::Hello {
        version: crate::link::hello::PROTOCOL_VERSION,
        capabilities: 0,
        session,
        peer_session: 0,
        next_expected: 1,
        send_base,
        max_payload: 1024,
        window_frames,
        window_bytes: 4096,
    };
    Frame::new(FrameType::Hello, 0, h.encode())
}

#[test]
fn sequence_numbers_at_the_top_of_the_space_and_tiny_windows_are_refused() {
    for (base, window) in [(u64::MAX, 4), (crate::link::hello::MAX_SEQ + 1, 4), (1, 1)] {
        let mut p = Pair::new();
        p.b.on_connected(p.now);
        p.b.on_frame(hello_from(0x66, base, window), p.now);
        // A DATA frame at the top of the space changes nothing either.
        let mut d = Frame::new(FrameType::Data, 0, msg(1));
        d.seq = u64::MAX;
        p.b.on_frame(d, p.now);
        p.drain();
        assert!(!p.b.is_established(), "base {base}, window {window}");
        assert!(p.got_b.is_empty());
    }
    // The highest base allowed: its frames are delivered, nothing overflows.
    let mut p = Pair::new();
    p.b.on_connected(p.now);
    let top = crate::link::hello::MAX_SEQ;
    p.b.on_frame(hello_from(0x66, top, 4), p.now);
    let mut d = Frame::new(FrameType::Data, 0, msg(1));
    d.seq = top;
    p.b.on_frame(d, p.now);
    p.drain();
    assert_eq!(p.got_b, vec![msg(1)]);
}

#[test]
fn a_ping_is_echoed_with_at_most_8_bytes() {
    let mut p = Pair::new();
    p.connect();
    p.pump();
    let big = Frame::new(FrameType::Ping, 0, Bytes::from(vec![7u8; 65536]));
    p.b.on_frame(big, p.now);
    let pong = p.b.poll_transmit(p.now).unwrap();
    assert_eq!(pong.kind, FrameType::Pong);
    assert_eq!(pong.payload.len(), MAX_PING_PAYLOAD);
}

#[test]
fn a_nack_or_hello_flood_resends_at_most_a_window_per_interval() {
    let mut p = Pair::new();
    p.connect();
    p.pump();
    for i in 0..4 {
        p.a.send(msg(i), p.now).unwrap();
    }
    let data = |p: &mut Pair| {
        std::iter::from_fn(|| p.a.poll_transmit(p.now))
            .filter(|f| f.kind == FrameType::Data)
            .count()
    };
    assert_eq!(data(&mut p), 4, "sent once");
    let nack = || {
        let mut f = Frame::new(FrameType::Ack, 0, Bytes::new());
        f.flags = flags::NACK;
        f
    };
    p.a.on_frame(nack(), p.now);
    assert_eq!(data(&mut p), 4, "the first NACK resends the window");
    let before = p.a.stats().rewinds_deferred;
    for _ in 0..100 {
        p.a.on_frame(nack(), p.now);
        // A fresh HELLO on the established connection asks the same.
        p.a.on_frame(hello_from(0xB, 1, 4), p.now);
    }
    assert_eq!(data(&mut p), 0, "no resend within the interval");
    assert!(p.a.stats().rewinds_deferred >= before + 100);
    p.tick(MIN_REWIND_INTERVAL);
    assert_eq!(data(&mut p), 4, "one resend when the interval is over");
}

#[test]
fn data_the_owner_cannot_take_is_dropped_unacked_and_sent_again_after_a_nack() {
    let mut p = Pair::new();
    p.connect();
    p.pump();
    // b's owner has no room: what a sends is read (its ACKs count) but not
    // delivered, not acknowledged, not NACKed.
    p.b.set_receiving(false);
    assert!(!p.b.window_wanted());
    for i in 0..3 {
        p.a.send(msg(i), p.now).unwrap();
    }
    p.pump();
    assert!(p.got_b.is_empty());
    assert_eq!(p.b.stats().discarded_full, 3);
    assert_eq!(p.b.stats().delivered, 0);
    assert_eq!(p.a.unacked_len(), 3);
    // b's own sends still get through, and a's ACKs of them are read.
    p.b.send(msg(9), p.now).unwrap();
    p.pump();
    p.tick(Duration::from_millis(100));
    p.pump();
    assert_eq!(p.got_a, vec![msg(9)]);
    assert_eq!(p.b.unacked_len(), 0);
    assert_eq!(p.b.stats().discarded_full, 3);
    // Room again: one NACK, a resends from where b is, b takes them once.
    p.tick(MIN_REWIND_INTERVAL);
    p.b.set_receiving(true);
    p.pump();
    assert_eq!(p.got_b, vec![msg(0), msg(1), msg(2)]);
    p.tick(Duration::from_millis(100));
    p.pump();
    assert_eq!(p.a.unacked_len(), 0);
    assert_eq!(p.b.stats().duplicates, 0);
}

#[test]
fn window_wanted_until_the_window_opens() {
    let mut p = Pair::new();
    p.connect();
    p.pump();
    for i in 0..4 {
        p.a.send(msg(i), p.now).unwrap();
    }
    assert!(!p.a.window_wanted());
    assert!(matches!(
        p.a.send(msg(4), p.now),
        Err(SendError::WindowFull)
    ));
    assert!(p.a.window_wanted());
    p.pump();
    p.tick(Duration::from_millis(100));
    p.pump();
    assert!(!p.a.window_wanted());
}
