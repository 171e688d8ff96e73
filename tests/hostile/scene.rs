//! The scene every hostile test plays in, and what each asserts at the end.

use std::time::Instant;

use serde_json::{Value, json};
use tether::rpc::{Kind, LinkMsg, Request, new_unique_id};

use crate::support::guest::{FakeGuest, RawGuest, assign, cast, policy, target};
use crate::support::oslo::*;
use crate::support::*;

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
pub struct Scene {
    pub w: World,
    pub proxy: Proc,
    pub ctl: Ctl,
    pub good: FakeGuest,
    pub good_id: String,
    pub bad: FakeGuest,
    pub server: OsloServer,
    pub svc: String,
    pub url: String,
    pub ex: String,
}

pub async fn scene() -> Scene {
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
    pub async fn good_casts_arrive(&mut self, from: u64, n: u64) {
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
    pub async fn send_good_casts(&self, from: u64, n: u64) {
        for i in from..from + n {
            let mut r = cast(target(&self.svc, None, None), "told", json!({}));
            r.args = json!({"i": i});
            self.good.send(LinkMsg::Req(r)).await;
        }
    }

    /// A hand-driven guest with the hostile profile, asking for
    /// `window_frames`, linked and serving `topic`.
    pub async fn raw_guest(&mut self, topic: &str, window_frames: u32) -> (String, RawGuest) {
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
    pub async fn bad_calls_unavailable(&mut self, n: usize, why: &str) {
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

    pub async fn bridge(&mut self) -> Value {
        broker_status(&mut self.ctl).await
    }

    /// The control plane's oslo client calls the good guest, which
    /// answers: the answer reaches the caller.
    pub async fn good_guest_answers_oslo(&mut self, c: OsloClient) -> OsloClient {
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
pub const PROXY_PEAK_RSS_KIB: u64 = (24 + 4 * (4 + 8 + 1) + 3) * 1024;

/// The proxy is up and never held more than [`PROXY_PEAK_RSS_KIB`].
pub fn assert_contained(proxy: &mut Proc) {
    assert!(proxy.child.try_wait().unwrap().is_none(), "the proxy died");
    let peak = proxy.peak_rss_kib();
    eprintln!("proxy peak RSS: {peak} KiB");
    assert!(
        peak <= PROXY_PEAK_RSS_KIB,
        "the proxy held {peak} KiB at its peak (bound {PROXY_PEAK_RSS_KIB} KiB)"
    );
}

pub fn call(topic: &str, exchange: Option<&str>) -> Request {
    Request {
        kind: Kind::Call,
        msg_id: Some(new_unique_id()),
        timeout_ms: Some(60_000),
        ..cast(target(topic, None, exchange), "m", json!({}))
    }
}

/// A well-behaved guest on `w`'s proxy, linked and serving `good`.
pub async fn good_guest(w: &World, ctl: &mut Ctl) -> (String, FakeGuest) {
    let id = random_uuid();
    let g = FakeGuest::start(&w.channels(), &id);
    g.topics(&["good"]).await;
    wait_linked(ctl, &id, "good").await;
    (id, g)
}

/// The good guest still gets a call from the control socket and answers it.
pub async fn good_guest_answers(
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
