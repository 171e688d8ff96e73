//! A session fed arbitrary frames, ticks, sends and connection changes. It
//! must never panic, never exceed its window, and never ask to be woken in
//! the past.
#![no_main]

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use tether::link::{Frame, FrameCodec, FrameType, Hello, Session, SessionConfig};
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let cfg = SessionConfig {
        max_payload: 1024,
        window_frames: 8,
        window_bytes: 4096,
        ..SessionConfig::default()
    };
    let start = Instant::now();
    let mut now = start;
    let mut s = Session::new(cfg.clone(), 0x5e55, now);
    let mut codec = FrameCodec::new(cfg.max_payload);
    let mut buf = BytesMut::new();
    let mut i = 0;
    while let Some(&op) = data.get(i) {
        i += 1;
        match op % 8 {
            0 => s.on_connected(now),
            1 => s.on_disconnected(now),
            2 => now += Duration::from_millis(u64::from(op) * 37),
            3 => {
                let len = usize::from(data.get(i).copied().unwrap_or(0)) * 8;
                let _ = s.send(Bytes::from(vec![op; len]), now);
                i += 1;
            }
            4 | 5 => {
                // Raw wire input: the next bytes, up to a length byte.
                let len = usize::from(data.get(i).copied().unwrap_or(0));
                let end = (i + 1 + len).min(data.len());
                buf.extend_from_slice(data.get(i + 1..end).unwrap_or_default());
                i = end;
                while let Ok(Some(f)) = codec.decode(&mut buf) {
                    s.on_frame(f, now);
                }
            }
            _ => {
                // A well-formed frame whose numbers sit near the session's own,
                // so the interesting branches (gaps, duplicates, resumes) are hit.
                let b = |k: usize| data.get(i + k).copied().unwrap_or(0);
                let near = |base: u64, d: u8| base.saturating_add(u64::from(d % 8)).saturating_sub(4);
                let kind = match b(0) % 6 {
                    0 => FrameType::Hello,
                    1 => FrameType::Data,
                    2 => FrameType::Ack,
                    3 => FrameType::Ping,
                    4 => FrameType::Pong,
                    _ => FrameType::Error,
                };
                let payload = if kind == FrameType::Hello {
                    Hello {
                        version: u16::from(b(1) % 3),
                        capabilities: 0,
                        session: u64::from(b(2) % 3),
                        peer_session: if b(3) % 2 == 0 { s.local_session() } else { u64::from(b(3)) },
                        next_expected: near(s.next_seq(), b(4)),
                        send_base: near(s.expected(), b(5)),
                        max_payload: 512 + u32::from(b(6)) * 8,
                        window_frames: u32::from(b(7) % 16),
                        window_bytes: 4096,
                    }
                    .encode()
                } else {
                    Bytes::from(vec![b(1); usize::from(b(2) % 16)])
                };
                let frame = Frame {
                    kind,
                    flags: u16::from(b(3) % 4),
                    seq: near(s.expected(), b(4)),
                    ack: near(s.next_seq(), b(5)),
                    payload,
                };
                i += 8;
                s.on_frame(frame, now);
            }
        }
        s.on_tick(now);
        let mut n = 0;
        while s.poll_transmit(now).is_some() {
            n += 1;
            assert!(n < 10_000, "poll_transmit never ends");
        }
        while s.poll_event().is_some() {}
        assert!(s.unacked_len() <= cfg.window_frames as usize);
        assert!(s.unacked_bytes() <= cfg.window_bytes as usize);
        if let Some(d) = s.next_deadline() {
            assert!(d >= start);
        }
    }
});
