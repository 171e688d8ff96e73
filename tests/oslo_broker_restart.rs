//! RabbitMQ stopped and started under traffic, and the proxy's connection
//! cut while the broker stays up. In a test binary of its own: these disturb
//! the suite's shared broker, and cargo runs test binaries one after
//! another, so no other broker test runs meanwhile; within this binary the
//! tests take turns ([`SERIAL`]).

mod support;

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::json;
use support::oslo::*;
use support::*;

/// One disturbance of the shared broker at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn broker(cmd: &str) {
    broker_args(&[cmd]);
}

fn broker_args(args: &[&str]) {
    let st = Command::new(format!("{}/scripts/broker", env!("CARGO_MANIFEST_DIR")))
        .args(args)
        .status()
        .expect("scripts/broker");
    assert!(st.success(), "scripts/broker {args:?} failed");
}

/// A broker user of the proxy's own (the Python client stays `guest`),
/// deleted when dropped: a test keeps the proxy away by taking this user's
/// permissions for as long as it needs — not by a reconnect backoff it
/// hopes is long enough.
struct ProxyUser {
    name: String,
}

impl ProxyUser {
    fn new() -> Self {
        let u = ProxyUser {
            name: unique("proxy"),
        };
        broker_args(&["ctl", "add_user", &u.name, "tether-test"]);
        u.allow();
        u
    }

    fn allow(&self) {
        broker_args(&[
            "ctl",
            "set_permissions",
            "-p",
            "/",
            &self.name,
            ".*",
            ".*",
            ".*",
        ]);
    }

    fn deny(&self) {
        broker_args(&["ctl", "clear_permissions", "-p", "/", &self.name]);
    }

    /// `url` (guest's) as this user.
    fn url(&self, url: &str) -> String {
        url.replacen("guest:guest@", &format!("{}:tether-test@", self.name), 1)
    }
}

impl Drop for ProxyUser {
    fn drop(&mut self) {
        let _ = Command::new(format!("{}/scripts/broker", env!("CARGO_MANIFEST_DIR")))
            .args(["ctl", "delete_user", &self.name])
            .status();
    }
}

/// Starts the broker again if the test fails while it is stopped, so the
/// tests after it find it serving.
struct StartOnFailure;

impl Drop for StartOnFailure {
    fn drop(&mut self) {
        if std::thread::panicking() {
            broker("start");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broker_stopped_and_started_under_traffic_nothing_lost_everything_resumes() {
    let _turn = SERIAL.lock().await;
    const N: u64 = 200;
    const TOLD: u64 = 20;
    let url = amqp_url();
    let ex = unique("ex");
    let topic = unique("rs");
    let w = World::new();
    let _proxy = w.proxy(&broker_section(&url, &ex));
    let u = uuid(541);
    let _a = w.agent(&u, &w.channels().join(format!("{u}.sock")), &topic, "");
    let mut server = OsloServer::start(&url, &ex, "demo-events", "conductor-1").await;
    let mut c = OsloClient::start(&url, &ex);
    served(&mut c, &topic, &u).await;
    let v = c
        .op(json!({"op": "casts", "topic": topic, "server": u, "method": "record", "n": N}))
        .await;
    assert_eq!(v["ok"], true, "{v}");
    recorded_exactly_once(&w, &u, N, Duration::from_secs(30)).await;

    let guard = StartOnFailure;
    broker("stop");
    // Links stay up; the control socket still reaches the guest; what the
    // guest sends upstream meanwhile is held.
    let mut ctl = w.ctl().await;
    let links = ctl.req(json!({"op": "links"})).await;
    assert_eq!(links["result"][0]["established"], true, "{links}");
    for k in 0..TOLD {
        let v = ctl
            .req(json!({"op": "call", "instance": u, "topic": topic, "method": "tell_host", "args": {"k": k}}))
            .await;
        assert_eq!(v["ok"], true, "{v}");
    }
    broker("start");
    drop(guard);

    // Everything resumes: oslo casts reach the guest again (the proxy
    // restored its consumers), and the held casts reach the oslo server.
    served(&mut c, &topic, &u).await;
    let v = c
        .op(json!({"op": "casts", "topic": topic, "server": u, "method": "record", "n": N, "start": N}))
        .await;
    assert_eq!(v["ok"], true, "{v}");
    recorded_exactly_once(&w, &u, 2 * N, Duration::from_secs(60)).await;
    let t = Instant::now();
    let mut told = std::collections::BTreeSet::new();
    while (told.len() as u64) < TOLD {
        let got = server.next(Duration::from_secs(60)).await;
        assert_eq!(got["method"], "told", "{got}");
        assert!(
            told.insert(got["args"]["k"].as_u64().unwrap()),
            "told twice: {got}"
        );
        assert!(t.elapsed() < Duration::from_secs(90));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_fanouts_published_while_the_proxy_is_cut_off_arrive_once_after_it_reconnects() {
    let _turn = SERIAL.lock().await;
    let url = amqp_url();
    // oslo's options for the Python side, in the URL query where it reads them.
    let py_url = format!(
        "{url}?rabbit_transient_quorum_queue=true&rabbit_stream_fanout=true&rabbit_qos_prefetch_count=10"
    );
    let ex = unique("ex");
    let topic = unique("sf");
    let w = World::new();
    // The proxy connects as a user of its own, so that the test can keep
    // it away (its permissions taken) while the Python client publishes.
    let user = ProxyUser::new();
    let _proxy = w.proxy(&format!(
        "[broker]\ntransport_url = {:?}\ncontrol_exchange = {ex:?}\ntransient_quorum_queues = true\nstream_fanout = true\nreconnect_min_ms = 100\nreconnect_max_ms = 1000\n",
        user.url(&url)
    ));
    let u = random_uuid();
    let _a = w.agent(&u, &w.channels().join(format!("{u}.sock")), &topic, "");
    let mut ctl = w.ctl().await;
    let mut c = OsloClient::start(&py_url, &ex);
    served(&mut c, &topic, &u).await;
    let fanout = |i: u64| json!({"op": "cast", "topic": topic, "fanout": true, "method": "record", "args": {"i": i}});
    fanout_consumed(&mut ctl, 1).await;
    assert_eq!(c.op(fanout(0)).await["ok"], true);
    recorded_exactly_once(&w, &u, 1, Duration::from_secs(30)).await;

    // Cut every connection (the proxy's and the Python client's; the
    // client reconnects by itself on its next publish), and keep the proxy
    // out until the fanouts are in the stream.
    user.deny();
    broker_args(&["ctl", "close_all_connections", "test: cut the proxy off"]);
    broker_status_until(&mut ctl, "the proxy noticing the cut", |v| {
        v["connected"] != true
    })
    .await;
    // Published into the stream while the proxy is away.
    for i in 1..4 {
        assert_eq!(c.op(fanout(i)).await["ok"], true);
    }
    let b = broker_status(&mut ctl).await;
    assert_eq!(
        b["connected"], false,
        "the fanouts must go out while the proxy is away: {b}"
    );
    user.allow();
    // It reconnects and reads on from after the last offset it handled:
    // the three missed fanouts arrive, and the first is not replayed.
    recorded_exactly_once(&w, &u, 4, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(w.recorded(&u).len(), 4, "nothing replayed later either");
}

fn signal(pid: u32, s: nix::sys::signal::Signal) {
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), s);
}

/// Casts the proxy got from a durable (quorum) queue and the guest had not
/// taken when the broker stopped are delivered again after it restarts —
/// not acknowledged before a sub-agent took them — and each runs once:
/// those the guest took while the broker was away are confirmed from the
/// agent's journal, not run again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn casts_untaken_when_the_broker_stops_are_redelivered_from_quorum_queues_and_run_once() {
    let _turn = SERIAL.lock().await;
    const N: u64 = 100;
    let url = amqp_url();
    let ex = unique("ex");
    let topic = unique("rq");
    let w = World::new();
    // All N in flight to the proxy at once (prefetch), and a long requeue
    // grace: the deliveries stay with the proxy (unacked) while the agent
    // is stopped, rather than going back to the queue.
    let _proxy = w.proxy(&format!(
        "[broker]\ntransport_url = {url:?}\ncontrol_exchange = {ex:?}\nquorum_queues = true\nprefetch = {N}\nreconnect_min_ms = 100\nreconnect_max_ms = 1000\nrequeue_grace_ms = 120000\n"
    ));
    let u = random_uuid();
    let agent = w.agent(&u, &w.channels().join(format!("{u}.sock")), &topic, "");
    let mut ctl = w.ctl().await;
    // oslo's option for the Python side (a durable control exchange).
    let mut c = OsloClient::start(&format!("{url}?rabbit_quorum_queue=true"), &ex);
    // Calls of `served` that timed out on a loaded machine may be taken
    // and acknowledged after it returned: at most this many more.
    let strays = served(&mut c, &topic, &u).await - 1;
    let base = broker_status(&mut ctl).await["delivered"].as_u64().unwrap();

    // The agent stops reading: the deliveries wait in the link, unacked.
    signal(agent.pid(), nix::sys::signal::Signal::SIGSTOP);
    struct Cont(u32);
    impl Drop for Cont {
        fn drop(&mut self) {
            signal(self.0, nix::sys::signal::Signal::SIGCONT);
        }
    }
    let cont = Cont(agent.pid());
    let v = c
        .op(json!({"op": "casts", "topic": topic, "server": u, "method": "record", "n": N}))
        .await;
    assert_eq!(v["ok"], true, "{v}");
    let t = Instant::now();
    loop {
        let l = ctl.link(&u).await;
        if l["outstanding"] == N {
            break;
        }
        assert!(
            t.elapsed() < BOUND,
            "the deliveries never reached the proxy: {l}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = broker_status(&mut ctl).await;
    assert!(
        before["delivered"].as_u64().unwrap() - base <= strays,
        "acknowledged before taken ({strays} calls of served could be late): {before}"
    );

    let guard = StartOnFailure;
    broker("stop");
    // The guest takes them while the broker is away: the acks cannot go.
    drop(cont);
    recorded_exactly_once(&w, &u, N, Duration::from_secs(60)).await;
    broker("start");
    drop(guard);

    // The quorum queue gives them all again; the agent confirms each from
    // its journal without running it, and the proxy acknowledges them.
    // Each confirmed from the journal (the agent counts it before its
    // receipt goes), then acknowledged to the broker.
    let t = Instant::now();
    loop {
        let stats = ctl
            .req(json!({"op": "call", "instance": u, "topic": "tether.agent", "method": "stats"}))
            .await;
        let dropped = stats["result"]["router"]["duplicates_dropped"].as_u64();
        assert!(dropped <= Some(N), "more than one redelivery each: {stats}");
        if dropped == Some(N) {
            break;
        }
        assert!(
            t.elapsed() < BOUND * 2,
            "redeliveries never all confirmed from the journal: {stats}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    broker_status_until(&mut ctl, "every redelivery acknowledged", |v| {
        v["delivered"].as_u64() >= Some(base + N)
    })
    .await;
    recorded_exactly_once(&w, &u, N, Duration::from_secs(5)).await;
    assert_eq!(ctl.link(&u).await["outstanding"], 0);
}
