//! A hostile guest next to a well-behaved one on the same proxy, over a
//! real RabbitMQ and the real Python oslo.messaging: each attack is one
//! test, and each asserts that the proxy stays up, that the good guest's
//! traffic keeps flowing with nothing lost, and that the attack shows in the
//! counters. The hostile guest is played by the test ([`FakeGuest`]).

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::guest::{FakeGuest, FloodGuest, RawGuest, assign, cast, hello_frame, policy, target};
use support::oslo::*;
use support::*;
use tether::rpc::{Kind, LinkMsg, Request, new_unique_id};

/// Profiles: `default` casts to the service topic `svc` only; `hostile`
/// may cast and call anything anywhere, as fast as it likes (so the attack
/// is the proxy's to contain, not the rate limit's).
fn profiles(svc: &str) -> String {
    format!(
        r#"[policy.profiles.default]
mode = "cast"
topics = ["good"]
[[policy.profiles.default.targets]]
topics = ["{svc}"]
methods = ["*"]
[policy.profiles.limited]
mode = "cast"
topics = ["*"]
message_burst = 50.0
messages_per_sec = 50.0
[[policy.profiles.limited.targets]]
topics = ["{svc}flood"]
methods = ["*"]
[policy.profiles.hostile]
mode = "call"
topics = ["*"]
message_burst = 1000000.0
messages_per_sec = 1000000.0
byte_burst = 1000000000.0
bytes_per_sec = 1000000000.0
[[policy.profiles.hostile.targets]]
exchanges = ["*"]
topics = ["*"]
servers = ["*"]
methods = ["*"]
"#
    )
}

/// A proxy with the broker, a good and a hostile guest linked, and an oslo
/// server on `svc` the good guest casts to.
struct Scene {
    w: World,
    proxy: Proc,
    ctl: Ctl,
    good: FakeGuest,
    good_id: String,
    bad: FakeGuest,
    server: OsloServer,
    svc: String,
    url: String,
    ex: String,
}

async fn scene() -> Scene {
    let url = amqp_url();
    let ex = unique("ex");
    let svc = unique("svc");
    let w = World::new();
    let (good_id, bad_id) = (random_uuid(), random_uuid());
    let _ = policy(&w, "", "");
    assign(&w, &bad_id, "profile = \"hostile\"\n");
    let proxy = w.proxy(&format!(
        "{}{}",
        broker_section(&url, &ex),
        policy(&w, "", &profiles(&svc))
    ));
    let mut ctl = w.ctl().await;
    broker_status_until(&mut ctl, "connected", |v| v["connected"] == true).await;
    let server = OsloServer::start(&url, &ex, &svc, "conductor-1").await;
    let good = FakeGuest::start(&w.channels(), &good_id);
    let bad = FakeGuest::start(&w.channels(), &bad_id);
    good.topics(&["good"]).await;
    bad.topics(&["bad"]).await;
    wait_linked(&mut ctl, &good_id, "good").await;
    wait_linked(&mut ctl, &bad_id, "bad").await;
    Scene {
        w,
        proxy,
        ctl,
        good,
        good_id,
        bad,
        server,
        svc,
        url,
        ex,
    }
}

impl Scene {
    /// The good guest casts `n` times to the service; each arrives once.
    async fn good_casts_arrive(&mut self, from: u64, n: u64) {
        self.send_good_casts(from, n).await;
        let mut got = std::collections::BTreeSet::new();
        let t = Instant::now();
        while (got.len() as u64) < n {
            let m = self.server.next(BOUND).await;
            assert_eq!(m["method"], "told", "{m}");
            let i = m["args"]["i"].as_u64().unwrap();
            assert!((from..from + n).contains(&i), "{m}");
            assert!(got.insert(i), "twice: {m}");
            assert!(t.elapsed() < BOUND * 2, "good casts stalled: {got:?}");
        }
    }

    /// The good guest casts `told` with `i` from `from` to `from + n - 1`.
    async fn send_good_casts(&self, from: u64, n: u64) {
        for i in from..from + n {
            let mut r = cast(target(&self.svc, None, None), "told", json!({}));
            r.args = json!({"i": i});
            self.good.send(LinkMsg::Req(r)).await;
        }
    }

    /// A hand-driven guest with the hostile profile, asking for
    /// `window_frames`, linked and serving `topic`.
    async fn raw_guest(&mut self, topic: &str, window_frames: u32) -> (String, RawGuest) {
        let id = random_uuid();
        assign(&self.w, &id, "profile = \"hostile\"\n");
        let mut raw = RawGuest::start(&self.w.channels(), &id, window_frames).await;
        raw.send(&LinkMsg::Topics {
            topics: vec![topic.into()],
        })
        .await;
        wait_linked(&mut self.ctl, &id, topic).await;
        (id, raw)
    }

    /// The hostile guest's next `n` messages are its calls answered
    /// `BrokerUnavailable`, past the bound `why` names.
    async fn bad_calls_unavailable(&mut self, n: usize, why: &str) {
        for _ in 0..n {
            match self.bad.next().await {
                LinkMsg::Rep(r) => {
                    let f = r.failure.expect("a failure");
                    assert_eq!(f.class, "BrokerUnavailable", "{f:?}");
                    assert!(f.message.contains(why), "{f:?}");
                }
                m => panic!("unexpected {m:?}"),
            }
        }
    }

    async fn bridge(&mut self) -> Value {
        broker_status(&mut self.ctl).await
    }

    /// The control plane's oslo client calls the good guest, which
    /// answers: the answer reaches the caller.
    async fn good_guest_answers_oslo(&mut self, c: OsloClient) -> OsloClient {
        let id = self.good_id.clone();
        let call = tokio::spawn(async move {
            let mut c = c;
            let v = c
                .op(
                    json!({"op": "call", "topic": "good", "server": id, "method": "ping",
                           "args": {}, "timeout": 30}),
                )
                .await;
            (c, v)
        });
        let r = self.good.next_request().await;
        assert_eq!(r.method, "ping", "{r:?}");
        self.good
            .reply(
                r.msg_id.as_deref().unwrap(),
                r.reply_to.clone(),
                json!({"pong": 1}),
            )
            .await;
        let (c, v) = call.await.unwrap();
        assert_eq!(v, json!({"ok": true, "result": {"pong": 1}}));
        c
    }
}

/// The most memory a proxy may have held at once in these tests, KiB: its
/// own start-up and the broker client (a debug build: about 20 MiB) plus,
/// for each of the at most four instances that carry traffic in a test,
/// the budgets docs/security.md states per instance — 4 MiB of unread
/// received messages (`recv_queue_bytes`), 8 MiB of requests kept for it
/// (receipts), 1,024 queued answers (the outbox, under 1 MiB) — and a
/// partial frame (at most 256 KiB) for each of the slowloris test's ten
/// trickling guests.
const PROXY_PEAK_RSS_KIB: u64 = (24 + 4 * (4 + 8 + 1) + 3) * 1024;

/// The proxy is up and never held more than [`PROXY_PEAK_RSS_KIB`].
fn assert_contained(proxy: &mut Proc) {
    assert!(proxy.child.try_wait().unwrap().is_none(), "the proxy died");
    let peak = proxy.peak_rss_kib();
    eprintln!("proxy peak RSS: {peak} KiB");
    assert!(
        peak <= PROXY_PEAK_RSS_KIB,
        "the proxy held {peak} KiB at its peak (bound {PROXY_PEAK_RSS_KIB} KiB)"
    );
}

fn call(topic: &str, exchange: Option<&str>) -> Request {
    Request {
        kind: Kind::Call,
        msg_id: Some(new_unique_id()),
        timeout_ms: Some(60_000),
        ..cast(target(topic, None, exchange), "m", json!({}))
    }
}

/// A cast to an exchange that does not exist makes the broker close the
/// publishing channel: that message alone is refused (back to its guest,
/// audited); the bridge keeps its connection and the good guest's casts go
/// on being published. (It used to tear the connection down and replay the
/// same message first after every reconnect.) The answers of guests to the
/// control plane's calls go out on a channel no guest message can close
/// (they shared the guests' publishing channel, and were lost after the
/// first bad message).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_broker_refuses_fails_alone() {
    let mut s = scene().await;
    let c = OsloClient::start(&s.url, &s.ex);
    let c = s.good_guest_answers_oslo(c).await;
    let nowhere = unique("nowhere");
    for round in 0..5u64 {
        for _ in 0..4 {
            let r = cast(target("t", None, Some(&nowhere)), "m", json!({}));
            s.bad.send(LinkMsg::Req(r)).await;
        }
        s.bad.send(LinkMsg::Req(call("t", Some(&nowhere)))).await;
        s.good_casts_arrive(round * 10, 10).await;
    }
    let mut refused = 0;
    let mut failed_calls = 0;
    while refused + failed_calls < 25 {
        match s.bad.next().await {
            LinkMsg::Refused { reason, .. } => {
                assert!(reason.starts_with("BrokerRefused: "), "{reason}");
                refused += 1;
            }
            LinkMsg::Rep(r) => {
                let f = r.failure.expect("a failure");
                assert_eq!(f.class, "BrokerRefused", "{f:?}");
                failed_calls += 1;
            }
            m => panic!("unexpected {m:?}"),
        }
    }
    let b = s.bridge().await;
    assert_eq!(b["connects"], 1, "the connection never went down: {b}");
    assert_eq!(b["refused"], 25, "{b}");
    assert!(b["published"].as_u64() >= Some(50), "{b}");
    s.good_guest_answers_oslo(c).await;
    // One audit record per refused message (the audit log's budget bounds
    // those), and nothing else: the AMQP client's error per channel the
    // broker closed is not logged (it was one more line per message).
    let log = s.proxy.log_text();
    let about = |l: &&str| l.contains(nowhere.as_str());
    let audit = log
        .lines()
        .filter(about)
        .filter(|l| l.contains(" audit: "))
        .count();
    let other: Vec<_> = log
        .lines()
        .filter(about)
        .filter(|l| !l.contains(" audit: "))
        .collect();
    assert_eq!(audit, 25, "{log}");
    assert!(other.is_empty(), "{other:#?}");
    assert_contained(&mut s.proxy);
}

/// Guest casts go to the broker pipelined (many wait for their confirms at
/// once). An exchange deleted under them: the broker closes the publishing
/// channel over the first cast to it, and every publish then waiting fails
/// with it. Only the cast that fails alone is refused, to its own guest;
/// the others go again, alone, and arrive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exchange_deleted_under_pipelined_casts_fails_only_the_casts_to_it() {
    use lapin::options::{
        ExchangeDeclareOptions, ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions,
    };
    // Within the good guest's share of the bridge (100 waiting at once).
    const GOOD: u64 = 90;
    let mut s = scene().await;
    let gone = unique("gone");
    let conn = amqp_connection(&s.url).await;
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        gone.as_str().into(),
        lapin::ExchangeKind::Topic,
        ExchangeDeclareOptions {
            auto_delete: true,
            ..Default::default()
        },
        Default::default(),
    )
    .await
    .unwrap();
    let q = unique("q");
    let auto = QueueDeclareOptions {
        auto_delete: true,
        ..Default::default()
    };
    ch.queue_declare(q.as_str().into(), auto, Default::default())
        .await
        .unwrap();
    ch.queue_bind(
        q.as_str().into(),
        gone.as_str().into(),
        "#".into(),
        QueueBindOptions::default(),
        Default::default(),
    )
    .await
    .unwrap();
    let to_gone = || cast(target("t", None, Some(&gone)), "m", json!({}));
    // The hostile guest's first cast to it is taken: the exchange is known.
    let published = s.bridge().await["published"].as_u64().unwrap();
    s.bad.send(LinkMsg::Req(to_gone())).await;
    let t = Instant::now();
    while s.bridge().await["published"].as_u64() <= Some(published) {
        assert!(
            t.elapsed() < BOUND,
            "the first cast to {gone} was never published"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ch.exchange_delete(gone.as_str().into(), ExchangeDeleteOptions::default())
        .await
        .unwrap();
    // Now one cast to it, the good guest's casts right behind it, another.
    s.bad.send(LinkMsg::Req(to_gone())).await;
    s.send_good_casts(0, GOOD).await;
    s.bad.send(LinkMsg::Req(to_gone())).await;
    // Every good cast arrives (one sent again may arrive twice: the broker
    // routed it and only its confirm was lost with the channel).
    let mut got = std::collections::BTreeSet::new();
    let mut twice = 0;
    let t = Instant::now();
    while (got.len() as u64) < GOOD {
        let Ok(m) = tokio::time::timeout(BOUND, s.server.next(BOUND * 2)).await else {
            panic!(
                "good casts lost: {} of {GOOD} arrived; {}",
                got.len(),
                s.bridge().await
            );
        };
        assert_eq!(m["method"], "told", "{m}");
        if !got.insert(m["args"]["i"].as_u64().unwrap()) {
            twice += 1;
        }
        assert!(
            t.elapsed() < BOUND * 2,
            "good casts lost: {} of {GOOD}",
            got.len()
        );
    }
    for _ in 0..2 {
        match s.bad.next().await {
            LinkMsg::Refused { reason, .. } => {
                assert!(reason.starts_with("BrokerRefused: "), "{reason}");
                assert!(reason.contains("NOT_FOUND"), "{reason}");
            }
            m => panic!("unexpected {m:?}"),
        }
    }
    let b = s.bridge().await;
    assert_eq!(b["refused"], 2, "{b}");
    // The first cast to the deleted exchange went out in company (its
    // exchange was known), so it was published again, alone — on this
    // connection, or on the next: a publish the AMQP client sent on the
    // channel while the broker was closing it makes the broker end the
    // connection (504 CHANNEL_ERROR), and what was not confirmed goes
    // again on the next one. Once, not in a loop.
    assert!(b["connects"].as_u64() <= Some(2), "{b}");
    assert!(
        b["published_again"].as_u64() >= Some(1) || b["connects"] == 2,
        "{b}"
    );
    println!(
        "published again: {}; good casts seen twice: {twice}",
        b["published_again"]
    );
    assert_contained(&mut s.proxy);
}

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

/// A well-behaved guest on `w`'s proxy, linked and serving `good`.
async fn good_guest(w: &World, ctl: &mut Ctl) -> (String, FakeGuest) {
    let id = random_uuid();
    let g = FakeGuest::start(&w.channels(), &id);
    g.topics(&["good"]).await;
    wait_linked(ctl, &id, "good").await;
    (id, g)
}

/// The good guest still gets a call from the control socket and answers it.
async fn good_guest_answers(
    ctl: &mut Ctl,
    g: &mut FakeGuest,
    good_id: &str,
    sock: std::path::PathBuf,
) {
    let id = good_id.to_string();
    let call = tokio::spawn(async move {
        Ctl::connect(&sock)
            .await
            .req(json!({"op": "call", "instance": id, "topic": "good", "method": "ping", "timeout_ms": 30_000}))
            .await
    });
    let r = g.next_request().await;
    g.reply(
        r.msg_id.as_deref().unwrap(),
        r.reply_to.clone(),
        json!("pong"),
    )
    .await;
    let v = call.await.unwrap();
    assert_eq!(v["result"], "pong", "{v}");
    let _ = ctl;
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

/// A guest's calls waiting for their answers count against its share of
/// the bridge: past `upstream_per_instance` (100) in flight, its next calls
/// are answered `BrokerUnavailable` at once — and its neighbour's casts are
/// published as ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guests_calls_in_flight_are_bounded_by_its_share() {
    let mut s = scene().await;
    let sink = unique("sink");
    // Something takes the calls and never answers them.
    let spy = Spy::start(&s.url, Some((&s.ex, &sink))).await;
    for _ in 0..150 {
        s.bad.send(LinkMsg::Req(call(&sink, None))).await;
    }
    s.bad_calls_unavailable(50, "100 messages").await;
    s.good_casts_arrive(0, 10).await;
    // Exactly its share was published (the good casts above were published
    // after all of these, on the same channel, in order).
    let published = spy.drain().await.len();
    assert_eq!(published, 100);
    assert_contained(&mut s.proxy);
}

/// The share is bounded in bytes too: calls of 200 KiB each, waiting for
/// answers that never come, hold at most `upstream_bytes_per_instance`
/// (4 MiB: about 20 of them); the next are answered `BrokerUnavailable` at
/// once, and the neighbour's casts are published as ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guests_bytes_in_flight_are_bounded_by_its_share() {
    const CALLS: usize = 40;
    const ARGS: usize = 200 * 1024;
    let mut s = scene().await;
    let sink = unique("sink");
    let spy = Spy::start(&s.url, Some((&s.ex, &sink))).await;
    let big = "x".repeat(ARGS);
    for _ in 0..CALLS {
        let mut r = call(&sink, None);
        r.args = json!({"blob": big});
        s.bad.send(LinkMsg::Req(r)).await;
    }
    let fit = (4 << 20) / ARGS;
    let unavailable = CALLS - fit;
    s.bad_calls_unavailable(unavailable, "bytes of messages")
        .await;
    s.good_casts_arrive(0, 10).await;
    // What was published: the calls that fit in 4 MiB, each a little over
    // 200 KiB on the link.
    let published = spy.drain().await.len();
    assert_eq!(published, CALLS - unavailable);
    assert!(
        (fit - 2..=fit).contains(&published),
        "{published} published"
    );
    assert_contained(&mut s.proxy);
}

/// Topic churn: a guest announcing a new topic set 12 times in a row gets
/// at most a burst of them applied on the broker (queues declared and
/// consumed), then the latest as the window allows — not 50 rounds of
/// declarations.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn topic_churn_is_rate_limited_on_the_broker() {
    let mut s = scene().await;
    let bad_id = s.ctl.req(json!({"op": "links"})).await["result"]
        .as_array()
        .unwrap()
        .iter()
        .find(|l| l["profile"] == "hostile")
        .map(|l| l["instance"].as_str().unwrap().to_string())
        .unwrap();
    // Spaced wider than the bridge's 200 ms reconcile tick, so that each
    // would be applied on its own without the limit.
    let churn: Vec<String> = (0..12).map(|i| format!("churn{i}")).collect();
    for t in &churn {
        s.bad.topics(&[t.as_str()]).await;
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // The last set is served in the end.
    let last = format!("\"{}.{bad_id}\"", churn[11]);
    let t = Instant::now();
    while !s.proxy.log_text().contains(&last) {
        assert!(t.elapsed() < BOUND, "the last topic set was never applied");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let log = s.proxy.log_text();
    let consumed = log
        .lines()
        .filter(|l| l.contains("consuming") && l.contains("churn") && l.contains(&bad_id))
        .count();
    // The burst (5), then the last set once the window allows.
    assert!(consumed <= 5 + 1, "{consumed} churned queues consumed");
    s.good_casts_arrive(0, 5).await;
    assert_contained(&mut s.proxy);
}

/// Fanouts reach every guest serving the topic at once, and a guest that
/// never takes them holds nobody up: past the broker's prefetch (64) the
/// good guest still gets every one, because a fanout is acknowledged once
/// the slow guest had 5 s (the proxy keeps it for that guest).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_takes_no_fanouts_holds_up_no_one_else() {
    const FANOUTS: u64 = 100;
    let mut s = scene().await;
    let (_raw_id, _raw) = s.raw_guest("good", 4096).await;
    fanout_consumed(&mut s.ctl, 1).await;
    let mut c = OsloClient::start(&s.url, &s.ex);
    for i in 0..FANOUTS {
        let v = c
            .op(json!({"op": "cast", "topic": "good", "fanout": true, "method": "news", "args": {"i": i}}))
            .await;
        assert_eq!(v["ok"], true, "{v}");
    }
    // Each fanout by its unique id (a redelivery, if the hostile guest's
    // link is reset meanwhile, comes with the same id: the real agent drops
    // it).
    let mut got = std::collections::BTreeMap::new();
    let t = Instant::now();
    while (got.len() as u64) < FANOUTS {
        let r = s.good.next_request().await;
        s.good
            .send(LinkMsg::Took {
                unique_id: r.unique_id.clone(),
            })
            .await;
        assert_eq!(r.kind, Kind::Fanout, "{r:?}");
        let i = r.args["i"].as_u64().unwrap();
        let first = got.entry(i).or_insert_with(|| r.unique_id.clone());
        assert_eq!(*first, r.unique_id, "a different fanout with the same i");
        assert!(t.elapsed() < BOUND * 2, "fanouts stalled at {}", got.len());
    }
    let b = s.bridge().await;
    assert!(b["fanouts_missed"].as_u64() >= Some(1), "{b}");
    assert_contained(&mut s.proxy);
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

/// A guest casting as fast as it can at a target its profile allows, past
/// its rate limit (50 messages a second): what is over the limit is refused
/// back to it, each cast once and none silently — every cast is either
/// published or refused — the denials are counted, and the good guest's
/// casts go on being published meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cast_flood_at_the_rate_limit_hurts_no_one_else() {
    const FLOOD: usize = 5000;
    const GOOD: u64 = 20;
    let mut s = scene().await;
    let flood_topic = format!("{}flood", s.svc);
    let mut flood_server = OsloServer::start(&s.url, &s.ex, &flood_topic, "flood-1").await;
    let id = random_uuid();
    assign(&s.w, &id, "profile = \"limited\"\n");
    let mut g = FakeGuest::start(&s.w.channels(), &id);
    g.topics(&["limited"]).await;
    wait_linked(&mut s.ctl, &id, "limited").await;
    let published0 = s.bridge().await["published"].as_u64().unwrap();
    let t = Instant::now();
    let mut sent = std::collections::HashMap::new();
    for i in 0..FLOOD {
        let mut r = cast(target(&flood_topic, None, None), "record", json!({}));
        r.args = json!({"i": i});
        sent.insert(r.unique_id.clone(), i);
        g.send(LinkMsg::Req(r)).await;
    }
    // The good guest's casts meanwhile.
    s.good_casts_arrive(0, GOOD).await;
    let (rtx, mut rrx) = tokio::sync::mpsc::unbounded_channel();
    let collector = tokio::spawn(async move {
        loop {
            if rtx.send(g.next_refusal().await).is_err() {
                break;
            }
        }
    });
    let mut refused = std::collections::BTreeSet::new();
    let passed = loop {
        while let Ok((unique_id, reason)) = rrx.try_recv() {
            assert_eq!(reason, "Denied: message rate limit exceeded");
            let i = sent.get(&unique_id).expect("a refusal for a cast it sent");
            assert!(refused.insert(*i), "refused twice: {i}");
        }
        let published = s.bridge().await["published"].as_u64().unwrap();
        let passed = (published - published0 - GOOD) as usize;
        assert!(refused.len() + passed <= FLOOD);
        if refused.len() + passed == FLOOD {
            break passed;
        }
        assert!(
            t.elapsed() < BOUND * 2,
            "{} refused, {passed} published of {FLOOD}",
            refused.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    collector.abort();
    let secs = t.elapsed().as_secs_f64();
    // What passed: the burst and the rate for the time the flood took.
    assert!(
        passed as f64 <= 50.0 + 50.0 * (secs + 1.0),
        "{passed} of {FLOOD} passed in {secs:.1} s"
    );
    let l = s.ctl.link(&id).await;
    assert_eq!(l["denied"], refused.len(), "{l}");
    // The published ones reached their server, each once, none refused.
    let mut got = std::collections::BTreeSet::new();
    while got.len() < passed {
        let m = flood_server.next(BOUND).await;
        let i = m["args"]["i"].as_u64().unwrap() as usize;
        assert!(!refused.contains(&i), "{i} was refused and published");
        assert!(got.insert(i), "{i} published twice");
    }
    assert_contained(&mut s.proxy);
}

/// A guest that floods casts its policy denies, faster than the proxy can
/// refuse them through the small window it asks for, while it reads its link, acknowledges what it reads and
/// sends again what a NACK asks for, as a real peer does: every cast gets
/// its refusal, each once, and nothing is dropped. The proxy's receive
/// queue fills with casts it must refuse, its refusals wait for the guest's
/// window, and the guest's acknowledgements sit in the stream behind its
/// casts: a proxy that stopped reading whenever its receive queue was full
/// would wait for them for ever (it did: the link stood still, one refusal
/// dropped every 5 s). No broker: the policy refuses the casts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_flooding_denied_casts_gets_every_refusal_and_its_link_moves() {
    // Well over what the proxy's receive queue holds (4 MiB: about 17,000
    // of these casts).
    const FLOOD: usize = 40_000;
    let w = World::new();
    let id = random_uuid();
    let _ = policy(&w, "", "");
    assign(&w, &id, "profile = \"quiet\"\n");
    let mut proxy = w.proxy(&policy(
        &w,
        "",
        "[policy.profiles.quiet]\ntopics = [\"*\"]\nmessage_burst = 1000000.0\nmessages_per_sec = 1000000.0\nbyte_burst = 1000000000.0\nbytes_per_sec = 1000000000.0\n",
    ));
    let mut ctl = w.ctl().await;
    // A window of 256 frames: the proxy's refusals wait for the guest's
    // ACKs, which come after what the guest wrote before them.
    let mut g = FloodGuest::start(&w.channels(), &id, 256, "quiet", FLOOD, || {
        cast(target("anything", None, None), "m", json!({}))
    })
    .await;
    let mut refused = std::collections::HashSet::new();
    let t = Instant::now();
    while refused.len() < FLOOD {
        let (unique_id, reason) = tokio::time::timeout(BOUND, g.refusals.recv())
            .await
            .unwrap_or_else(|_| panic!("no refusal within {BOUND:?}; {} so far", refused.len()))
            .expect("the flooding guest's link ended");
        assert!(reason.starts_with("Denied: "), "{reason}");
        assert!(
            g.sent.contains(&unique_id),
            "a refusal for a cast it never sent"
        );
        assert!(refused.insert(unique_id), "refused twice");
        // A liveness bound (this takes seconds): a wedged link still lets
        // a refusal through every 5 s, never all of them.
        assert!(
            t.elapsed() < BOUND * 4,
            "{} of {FLOOD} refused: {}",
            refused.len(),
            ctl.link(&id).await
        );
    }
    let l = ctl.link(&id).await;
    assert_eq!(l["denied"], FLOOD, "{l}");
    assert_eq!(l["outbox_dropped"], 0, "no refusal was dropped: {l}");
    eprintln!("{FLOOD} refused in {:.1} s: {l}", t.elapsed().as_secs_f64());
    assert_contained(&mut proxy);
}
