//! Attacks on the link: a guest that never acknowledges, resend, PING and
//! garbage floods, impossible headers, log floods, ERROR on every link-up,
//! frames trickled a byte at a time.

use std::time::{Duration, Instant};

use serde_json::json;
use tether::rpc::LinkMsg;

use crate::scene::*;
use crate::support::guest::{RawGuest, hello_frame};
use crate::support::oslo::*;
use crate::support::*;

/// A guest that asks for the smallest window (4 frames) and never
/// acknowledges what the proxy sends, while it makes the bridge answer it
/// (calls nothing consumes: each is answered `NoRoute` by the bridge): its
/// link window and outbox fill — and nobody else's. The good guest's casts
/// keep being published; what the hostile guest would have got is dropped
/// and counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_never_acknowledges_holds_up_no_one_else() {
    const CALLS: usize = 3000;
    let mut s = scene().await;
    let (raw_id, mut raw) = s.raw_guest("raw", 4).await;
    let nothing = unique("nothing");
    for _ in 0..CALLS {
        raw.send(&LinkMsg::Req(call(&nothing, None))).await;
    }
    let t = Instant::now();
    loop {
        let l = s.ctl.link(&raw_id).await;
        if l["outbox_dropped"].as_u64() > Some(0) {
            break;
        }
        assert!(
            t.elapsed() < BOUND * 2,
            "the hostile guest's answers never backed up: {l}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The bridge is not stuck on it, nor its queue full of it.
    s.good_casts_arrive(0, 20).await;
    let b = s.bridge().await;
    assert_eq!(b["connects"], 1, "{b}");
    let l = s.ctl.link(&raw_id).await;
    assert_eq!(
        l["unacked"], 4,
        "the proxy kept to the window it was given: {l}"
    );
    assert_contained(&mut s.proxy);
}

/// Link-level tricks from a guest that speaks the protocol by hand, next to
/// a good guest on the same proxy: resend floods (NACKs, HELLOs), PINGs with
/// huge payloads, a HELLO at the top of the sequence space, a DATA frame at
/// u64::MAX, and a storm of headers announcing long payloads with bad
/// checksums. The proxy (a debug build: overflow checks on) stays up, the
/// good guest's calls keep working, and what the hostile guest gets back
/// stays small: resends are rate-limited, PONGs carry 8 bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn link_floods_and_tricks_cost_the_proxy_little_and_hurt_no_one() {
    use tether::link::frame::flags;
    use tether::link::{Frame, FrameType};
    let w = World::new();
    let mut proxy = w.proxy("");
    let mut ctl = w.ctl().await;
    let (good_id, mut g) = good_guest(&w, &mut ctl).await;
    let raw_id = random_uuid();
    let mut raw = RawGuest::start(&w.channels(), &raw_id, 4).await;
    raw.send(&LinkMsg::Topics {
        topics: vec!["raw".into()],
    })
    .await;
    wait_linked(&mut ctl, &raw_id, "raw").await;
    // Four casts into it that it never acknowledges: a full window to resend.
    for i in 0..4 {
        let v = ctl
            .req(json!({"op": "cast", "instance": raw_id, "topic": "raw", "method": "m", "args": {"i": i}, "timeout_ms": 1}))
            .await;
        assert_eq!(v["ok"], false, "{v}");
    }
    let t = Instant::now();
    let nack = || {
        let mut f = Frame::new(FrameType::Ack, 0, bytes::Bytes::new());
        f.flags = flags::NACK;
        f
    };
    let session = raw.session;
    let hello = |base: u64| hello_frame(session, base, 4);
    for _ in 0..2000 {
        raw.frame(nack()).await;
    }
    for _ in 0..100 {
        raw.frame(Frame::new(
            FrameType::Ping,
            0,
            bytes::Bytes::from(vec![7u8; 65536]),
        ))
        .await;
    }
    raw.frame(hello(u64::MAX)).await;
    let mut d = Frame::new(
        FrameType::Data,
        0,
        LinkMsg::Topics { topics: vec![] }.to_bytes(),
    );
    d.seq = u64::MAX;
    raw.frame(d).await;
    // Headers announcing 200 KiB payloads, each 36 bytes after the last.
    let mut long = bytes::BytesMut::new();
    Frame::new(
        FrameType::Data,
        0,
        bytes::Bytes::from(vec![0u8; 200 * 1024]),
    )
    .encode_into(&mut long);
    for _ in 0..2000 {
        raw.frame_bytes(&long[..36]).await;
    }
    raw.frame_bytes(&vec![0u8; 200 * 1024]).await;
    // A last message: once the proxy has it, it has read all of the above.
    raw.send(&LinkMsg::Topics {
        topics: vec!["raw2".into()],
    })
    .await;
    wait_linked(&mut ctl, &raw_id, "raw2").await;
    let elapsed = t.elapsed();

    // The proxy is up and serves the good guest.
    good_guest_answers(&mut ctl, &mut g, &good_id, w.ctl_sock()).await;
    assert!(proxy.child.try_wait().unwrap().is_none(), "the proxy died");
    let l = ctl.link(&raw_id).await;
    // At most one window resent per 500 ms (plus the first), not one per NACK.
    let rounds = elapsed.as_millis() as u64 / 500 + 2;
    let resent = l["resent"].as_u64().unwrap();
    assert!(
        resent <= 4 * rounds,
        "{resent} frames resent in {elapsed:?}: {l}"
    );
    assert!(l["rewinds_deferred"].as_u64() > Some(0), "{l}");
    // 6.5 MB of PINGs sent; PONGs of 8 bytes came back.
    let back = raw.received.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        back < 1 << 20,
        "{back} bytes sent back to the hostile guest"
    );
    assert_contained(&mut proxy);
}

/// A header that announces `len` payload bytes, with a valid header
/// checksum (so only the length can make the proxy refuse it).
fn header_announcing(len: u32) -> Vec<u8> {
    use tether::link::{Frame, FrameType};
    let mut b = bytes::BytesMut::new();
    Frame::new(FrameType::Data, 0, bytes::Bytes::from_static(b"x")).encode_into(&mut b);
    let mut h = b[..36].to_vec();
    h[24..28].copy_from_slice(&len.to_be_bytes());
    let hcrc = crc32c::crc32c(&h[..32]);
    h[32..36].copy_from_slice(&hcrc.to_be_bytes());
    h
}

/// Garbage, impossible headers and an acknowledgement of frames never
/// sent, from a hand-driven guest next to a good one: the proxy skips the
/// garbage (and counts it), refuses headers announcing 4 GiB, 16 MiB + 1 or
/// more than the negotiated maximum before allocating anything for them,
/// takes the guest's next real frame, and logs and ignores an
/// acknowledgement of what it never sent — staying up, within its memory
/// bound, serving the good guest throughout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_and_impossible_frames_cost_a_bounded_amount() {
    use tether::link::{Frame, FrameType};
    const JUNK: usize = 4 << 20;
    let w = World::new();
    let mut proxy = w.proxy("");
    let mut ctl = w.ctl().await;
    let (good_id, mut g) = good_guest(&w, &mut ctl).await;
    let raw_id = random_uuid();
    let mut raw = RawGuest::start(&w.channels(), &raw_id, 4).await;
    let mut rng = tether::testing::SplitMix64::new(11);
    let junk: Vec<u8> = (0..JUNK / 8)
        .flat_map(|_| rng.next_u64().to_le_bytes())
        .collect();
    raw.frame_bytes(&junk).await;
    for len in [
        u32::MAX,
        tether::link::frame::MAX_PAYLOAD_HARD + 1,
        tether::link::config::DEFAULT_MAX_PAYLOAD + 1,
    ] {
        raw.frame_bytes(&header_announcing(len)).await;
        raw.frame_bytes(&junk[..1000]).await;
    }
    // A real frame: once the proxy has it, it has read all of the above.
    raw.send(&LinkMsg::Topics {
        topics: vec!["raw".into()],
    })
    .await;
    wait_linked(&mut ctl, &raw_id, "raw").await;
    let l = ctl.link(&raw_id).await;
    let skipped = l["garbage_bytes"].as_u64().unwrap() as usize;
    assert!(skipped >= JUNK, "{skipped} bytes skipped: {l}");
    good_guest_answers(&mut ctl, &mut g, &good_id, w.ctl_sock()).await;
    assert_contained(&mut proxy);
    // An acknowledgement of a frame the proxy never sent: a protocol error,
    // logged (within the link's log budget) and ignored; the link goes on.
    raw.frame(Frame::new(FrameType::Ack, 1 << 40, bytes::Bytes::new()))
        .await;
    raw.send(&LinkMsg::Topics {
        topics: vec!["raw2".into()],
    })
    .await;
    wait_linked(&mut ctl, &raw_id, "raw2").await;
    assert!(
        proxy
            .log_text()
            .contains("peer acknowledged sequence 1099511627776"),
        "the protocol error is logged"
    );
    good_guest_answers(&mut ctl, &mut g, &good_id, w.ctl_sock()).await;
    assert_contained(&mut proxy);
}

/// What a guest makes the proxy log is bounded per instance: 5,000 HELLOs,
/// each with a new session id (one log line each, before), leave a few
/// lines per second in the proxy's log and one that counts the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_cannot_flood_the_proxys_log() {
    const HELLOS: u64 = 5000;
    let w = World::new();
    let proxy = w.proxy("");
    let mut ctl = w.ctl().await;
    let raw_id = random_uuid();
    let t = Instant::now();
    let mut raw = RawGuest::start(&w.channels(), &raw_id, 4).await;
    for n in 0..HELLOS {
        raw.frame(hello_frame(0x1000 + n, 1, 4)).await;
    }
    // Read to the end: the proxy has seen every HELLO once its peer
    // changes count them all.
    let wait = Instant::now();
    loop {
        let l = ctl.link(&raw_id).await;
        if l["peer_changes"].as_u64() == Some(HELLOS + 1) {
            break;
        }
        assert!(wait.elapsed() < BOUND, "{l}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let secs = t.elapsed().as_secs() + 1;
    let log = proxy.log_text();
    let lines = log
        .lines()
        .filter(|l| l.contains("new peer session"))
        .count() as u64;
    assert!(
        lines <= tether::logbudget::LOG_LINES_PER_SEC as u64 * (secs + 1),
        "{lines} lines in {secs} s"
    );
    assert!(lines >= 1, "the first is logged");
    let mut proxy = proxy;
    assert_contained(&mut proxy);
}

/// A guest that answers every link-up with an ERROR frame is relinked with
/// a growing backoff, not every few milliseconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_errors_on_every_link_up_is_relinked_with_backoff() {
    use tether::link::{Frame, FrameType};
    let w = World::new();
    let mut proxy = w.proxy("");
    let raw_id = random_uuid();
    let path = w.channels().join(format!("{raw_id}.sock"));
    let l = tokio::net::UnixListener::bind(&path).unwrap();
    let window = Duration::from_secs(3);
    let t = Instant::now();
    let mut accepts = 0u32;
    while let Ok(Ok((s, _))) =
        tokio::time::timeout(window.saturating_sub(t.elapsed()), l.accept()).await
    {
        use tokio::io::AsyncWriteExt;
        accepts += 1;
        let (_r, mut wr) = s.into_split();
        let mut b = bytes::BytesMut::new();
        hello_frame(0x77, 1, 4).encode_into(&mut b);
        Frame::new(FrameType::Error, 0, bytes::Bytes::from_static(b"go away")).encode_into(&mut b);
        let _ = wr.write_all(&b).await;
        // Keep the connection until the proxy drops it.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // 50 ms doubling, each wait jittered into the upper half of its step:
    // at least 50, 100, 200, 400, 800, 1600 ms... at most about seven in 3 s
    // (without the backoff it was one every ~60 ms: about fifty).
    assert!(accepts >= 2, "it relinks at all: {accepts}");
    assert!(accepts <= 10, "{accepts} relinks in {window:?}");
    assert_contained(&mut proxy);
}

/// Slowloris: guests that trickle their frames a byte at a time. Ten of
/// them each announce the longest payload and then send a byte every
/// 20 ms; one more trickles a whole (short) frame. Meanwhile the good
/// guest's calls and casts go on; the proxy holds at most one partial
/// frame per link, and the frame that does complete, however slowly, is
/// taken like any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guests_that_trickle_their_frames_hold_up_no_one() {
    use tether::link::{Frame, FrameType};
    const TRICKLERS: usize = 10;
    let mut s = scene().await;
    let mut long = bytes::BytesMut::new();
    Frame::new(
        FrameType::Data,
        0,
        bytes::Bytes::from(vec![0u8; 200 * 1024]),
    )
    .encode_into(&mut long);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut tricklers = vec![];
    for _ in 0..TRICKLERS {
        let (_, mut raw) = s.raw_guest("slow", 4).await;
        let (long, stop) = (long.clone(), stop.clone());
        tricklers.push(tokio::spawn(async move {
            for b in long.chunks(1) {
                if stop.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                raw.frame_bytes(b).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            raw
        }));
    }
    // One frame, whole, a byte at a time (its first: sequence 1).
    let (slow_id, mut slow) = s.raw_guest("slow0", 4).await;
    let mut f = Frame::new(
        FrameType::Data,
        0,
        LinkMsg::Topics {
            topics: vec!["slow1".into()],
        }
        .to_bytes(),
    );
    f.seq = 2;
    let mut whole = bytes::BytesMut::new();
    f.encode_into(&mut whole);
    let whole_frame = tokio::spawn(async move {
        for b in whole.chunks(1) {
            slow.frame_bytes(b).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        slow
    });
    // The good guest meanwhile: casts published, a call answered.
    for round in 0..3 {
        s.good_casts_arrive(round * 10, 10).await;
        let sock = s.w.ctl_sock();
        good_guest_answers(&mut s.ctl, &mut s.good, &s.good_id, sock).await;
    }
    let _slow = whole_frame.await.unwrap();
    wait_linked(&mut s.ctl, &slow_id, "slow1").await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in tricklers {
        t.await.unwrap();
    }
    assert_contained(&mut s.proxy);
}
