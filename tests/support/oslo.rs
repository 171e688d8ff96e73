//! The real Python oslo.messaging client and server, and the test broker.
//! `scripts/test` starts a loopback RabbitMQ (`scripts/broker`) and creates
//! the venv; a missing one fails the test with what to run, never skips it.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use std::time::Instant;

use serde_json::{Value, json};

use super::World;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

/// The test broker's URL (oslo form), from `TETHER_AMQP_URL`.
pub fn amqp_url() -> String {
    std::env::var("TETHER_AMQP_URL").unwrap_or_else(|_| {
        panic!(
            "these tests need RabbitMQ: run scripts/test, or `scripts/broker start` and \
             export TETHER_AMQP_URL=rabbit://guest:guest@127.0.0.1:5673/"
        )
    })
}

/// The venv's python with oslo.messaging.
pub fn oslo_python() -> PathBuf {
    let p = std::env::var("TETHER_OSLO_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/oslo-venv/bin/python")
        });
    assert!(
        p.exists(),
        "{} is missing: run scripts/test (it creates the venv with oslo.messaging), or \
         python3 -m venv target/oslo-venv && target/oslo-venv/bin/pip install oslo.messaging",
        p.display()
    );
    p
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/oslo")
        .join(name)
}

/// A unique name for this test's exchange and topics (tests share a broker).
pub fn unique(prefix: &str) -> String {
    format!("{prefix}_{:016x}", tether::random_u64())
}

/// A long-lived Python process driven by JSON lines; killed on drop.
pub struct Py {
    _child: Child,
    stdin: Option<ChildStdin>,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Py {
    fn spawn(script_name: &str, args: &[&str]) -> Self {
        let mut child = Command::new(oslo_python())
            .arg(script(script_name))
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("python");
        let stdin = child.stdin.take();
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Self {
            _child: child,
            stdin,
            lines,
        }
    }

    /// The next line, within `bound`.
    pub async fn line(&mut self, bound: Duration) -> String {
        tokio::time::timeout(bound, self.lines.next_line())
            .await
            .expect("the Python side said nothing in time")
            .expect("read")
            .expect("the Python side exited")
    }
}

/// The oslo.messaging RPC client.
pub struct OsloClient(Py);

impl OsloClient {
    pub fn start(url: &str, exchange: &str) -> Self {
        Self(Py::spawn("client.py", &[url, exchange]))
    }

    /// Run one op (see tests/oslo/client.py); its result.
    pub async fn op(&mut self, op: Value) -> Value {
        let w = self.0.stdin.as_mut().expect("stdin");
        w.write_all(format!("{op}\n").as_bytes())
            .await
            .expect("write");
        let l = self.0.line(Duration::from_secs(120)).await;
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}"))
    }
}

/// An oslo.messaging RPC server on the control side.
pub struct OsloServer(Py);

impl OsloServer {
    pub async fn start(url: &str, exchange: &str, topic: &str, server: &str) -> Self {
        let mut p = Py::spawn("server.py", &[url, exchange, topic, server]);
        assert_eq!(p.line(Duration::from_secs(60)).await, "ready");
        Self(p)
    }

    /// The next request it received.
    pub async fn next(&mut self, bound: Duration) -> Value {
        let l = self.0.line(bound).await;
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}"))
    }
}

/// An oslo.messaging notification listener on the control side.
pub struct OsloListener(Py);

impl OsloListener {
    pub async fn start(url: &str, exchange: &str, topic: &str) -> Self {
        let mut p = Py::spawn("listener.py", &[url, exchange, topic]);
        assert_eq!(p.line(Duration::from_secs(60)).await, "ready");
        Self(p)
    }

    /// The next notification it received.
    pub async fn next(&mut self, bound: Duration) -> Value {
        let l = self.0.line(bound).await;
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("{e}: {l}"))
    }
}

/// What [`cast_rounds_until`] did.
pub struct Rounds {
    pub rounds: u64,
    pub answered: u64,
    pub timed_out: u64,
}

/// Rounds of `per` oslo casts of `record` to `topic` on `server` (`i`
/// numbered from 0 across rounds), each round ended by the call
/// `call(round)` (whose answer, when it comes, must satisfy
/// `check(round, result)`; else it timed out): at least `min` rounds, and
/// on until `until` is finished, at most `max`.
pub async fn cast_rounds_until<T>(
    c: &mut OsloClient,
    (topic, server): (&str, &str),
    (per, min, max): (u64, u64, u64),
    until: &tokio::task::JoinHandle<T>,
    call: impl Fn(u64) -> Value,
    check: impl Fn(u64, &Value),
) -> Rounds {
    let mut r = Rounds {
        rounds: 0,
        answered: 0,
        timed_out: 0,
    };
    while r.rounds < min || !until.is_finished() {
        assert!(r.rounds < max, "still going after {max} rounds");
        let v = c
            .op(
                json!({"op": "casts", "topic": topic, "server": server, "method": "record",
                       "n": per, "start": r.rounds * per}),
            )
            .await;
        assert_eq!(v["ok"], true, "{v}");
        let v = c.op(call(r.rounds)).await;
        if v["ok"] == true {
            check(r.rounds, &v["result"]);
            r.answered += 1;
        } else {
            assert_eq!(v["class"], "MessagingTimeout", "{v}");
            r.timed_out += 1;
        }
        r.rounds += 1;
    }
    r
}

/// The `[broker]` section of a test proxy's config.
pub fn broker_section(url: &str, exchange: &str) -> String {
    format!(
        "[broker]\ntransport_url = {url:?}\ncontrol_exchange = {exchange:?}\nreconnect_min_ms = 100\nreconnect_max_ms = 1000\nrequeue_grace_ms = 500\n"
    )
}

/// Wait (bounded) until an oslo call to `topic` on `server` is answered:
/// the instance is linked and the proxy consumes its queue.
/// Returns how many calls it made: all but the last timed out on the
/// caller's side, and may still be taken (and acknowledged) later.
pub async fn served(c: &mut OsloClient, topic: &str, server: &str) -> u64 {
    let t = Instant::now();
    let mut calls = 0;
    loop {
        calls += 1;
        let v = c
            .op(
                json!({"op": "call", "topic": topic, "server": server, "method": "echo",
                       "args": {"ping": 1}, "timeout": 1}),
            )
            .await;
        if v["ok"] == true {
            return calls;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "{server} never served {topic} over the broker: {v}"
        );
    }
}

/// Wait (bounded) until the sub-agent of `u` recorded `n` casts; assert each
/// `i` in 0..n exactly once.
pub async fn recorded_exactly_once(w: &World, u: &str, n: u64, bound: Duration) {
    let t = Instant::now();
    loop {
        let r = w.recorded(u);
        if r.len() as u64 >= n || t.elapsed() > bound {
            let (dups, missing) =
                super::twice_and_missing(r.iter().map(|x| x["i"].as_u64().unwrap()), n);
            assert!(
                dups.is_empty() && missing.is_empty() && r.len() as u64 == n,
                "casts handled {} times for {n} sent; duplicated: {dups:?}; missing: {missing:?}",
                r.len()
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The proxy's broker status (the control socket's `broker` op).
pub async fn broker_status(ctl: &mut super::Ctl) -> Value {
    ctl.req(json!({"op": "broker"})).await["result"].clone()
}

/// Wait (bounded) until the proxy's broker status satisfies `ok`, which
/// `what` describes for the failure; the status that satisfied it.
pub async fn broker_status_until(
    ctl: &mut super::Ctl,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let t = Instant::now();
    loop {
        let v = broker_status(ctl).await;
        if ok(&v) {
            return v;
        }
        assert!(t.elapsed() < super::BOUND, "{what} never came: {v}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Wait (bounded) until the proxy consumes the fanout of `n` topics: a
/// fanout published before its queue is bound (or, for a stream, before
/// the consumer attached at `next`) reaches nobody — oslo's semantics too.
pub async fn fanout_consumed(ctl: &mut super::Ctl, n: u64) {
    broker_status_until(ctl, "consuming the fanout", |v| {
        v["fanout_topics"].as_u64().unwrap_or(0) >= n
    })
    .await;
}

/// An AMQP connection of the test's own to the broker at oslo's `url`.
pub async fn amqp_connection(url: &str) -> lapin::Connection {
    // lapin reads a trailing '/' as the empty vhost; oslo as the default.
    let uri = url.replacen("rabbit://", "amqp://", 1);
    let uri = uri.trim_end_matches('/');
    lapin::Connection::connect(uri, lapin::ConnectionProperties::default())
        .await
        .expect("connect to the test broker")
}

/// A queue of the test's own on the broker, to see what reaches it: bound
/// to `exchange` with `key` (`#`: everything), or unbound (a queue a guest
/// might aim a forged reply at, by name).
pub struct Spy {
    _conn: lapin::Connection,
    ch: lapin::Channel,
    pub queue: String,
}

impl Spy {
    pub async fn start(url: &str, bind: Option<(&str, &str)>) -> Self {
        use lapin::options::{QueueBindOptions, QueueDeclareOptions};
        let conn = amqp_connection(url).await;
        let ch = conn.create_channel().await.unwrap();
        let queue = unique("spy");
        let opts = QueueDeclareOptions {
            auto_delete: true,
            ..Default::default()
        };
        ch.queue_declare(queue.as_str().into(), opts, Default::default())
            .await
            .unwrap();
        if let Some((ex, key)) = bind {
            ch.queue_bind(
                queue.as_str().into(),
                ex.into(),
                key.into(),
                QueueBindOptions::default(),
                Default::default(),
            )
            .await
            .unwrap();
        }
        Self {
            _conn: conn,
            ch,
            queue,
        }
    }

    /// Every message in the queue now, as JSON (oslo envelopes unwrapped).
    pub async fn drain(&self) -> Vec<Value> {
        use lapin::options::BasicGetOptions;
        let mut out = vec![];
        while let Some(m) = self
            .ch
            .basic_get(self.queue.as_str().into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            let v: Value = serde_json::from_slice(&m.delivery.data).unwrap_or(Value::Null);
            let inner = v["oslo.message"]
                .as_str()
                .and_then(|s| serde_json::from_str(s).ok())
                .unwrap_or(v);
            out.push(inner);
        }
        out
    }
}
