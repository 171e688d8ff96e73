//! A hostile guest next to a well-behaved one on the same proxy, over a
//! real RabbitMQ and the real Python oslo.messaging: each attack is one
//! test, and each asserts that the proxy stays up, that the good guest's
//! traffic keeps flowing with nothing lost, and that the attack shows in the
//! counters. The hostile guest is played by the test ([`FakeGuest`]).

mod support;

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::guest::{FakeGuest, RawGuest, assign, cast, policy, target};
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
    _proxy: Proc,
    ctl: Ctl,
    good: FakeGuest,
    bad: FakeGuest,
    server: OsloServer,
    svc: String,
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
        _proxy: proxy,
        ctl,
        good,
        bad,
        server,
        svc,
    }
}

impl Scene {
    /// The good guest casts `n` times to the service; each arrives once.
    async fn good_casts_arrive(&mut self, from: u64, n: u64) {
        for i in from..from + n {
            let mut r = cast(target(&self.svc, None, None), "told", json!({}));
            r.args = json!({"i": i});
            self.good.send(LinkMsg::Req(r)).await;
        }
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

    async fn bridge(&mut self) -> Value {
        broker_status(&mut self.ctl).await
    }
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
/// same message first after every reconnect.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_the_broker_refuses_fails_alone() {
    let mut s = scene().await;
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
    let raw_id = random_uuid();
    assign(&s.w, &raw_id, "profile = \"hostile\"\n");
    let mut raw = RawGuest::start(&s.w.channels(), &raw_id, 4).await;
    raw.send(&LinkMsg::Topics {
        topics: vec!["raw".into()],
    })
    .await;
    wait_linked(&mut s.ctl, &raw_id, "raw").await;
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
}
