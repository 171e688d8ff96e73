//! The real port under TCG: a QEMU guest with two virtio-serial ports, the
//! agent on `org.tether.agent.0` and a plain `cat` echo on `org.tether.echo.0`
//! (the baseline: same guest, same device, no tether), measured in one run.
//!
//! - RTT: sequential round trips. Raw: 64 bytes echoed. Tether: a control
//!   call answered by the agent itself (`tether.agent ping`, which answers
//!   its arguments as qemu-ga's `guest-sync` does: control socket →
//!   proxy → link over the port → agent → back) and one answered by the
//!   example sub-agent (`echo`, one more socket hop in the guest).
//! - Throughput: raw, bytes written in 32 KiB chunks while reading the echo
//!   back; tether, casts of 1 KiB of arguments pipelined on the control
//!   socket (each confirmed once the guest's link acknowledged it).
//!
//! - qemu-ga, the agent users already have, on a third port of the same
//!   guest (`org.qemu.guest_agent.0`, Debian's package of the same release):
//!   `guest-sync` and `guest-ping` round trips against tether's call
//!   answered by the agent, pipelined `guest-ping`s (64 in flight) against
//!   pipelined tether calls answered by the agent, and both agents'
//!   resident memory in the guest (read there through qemu-ga's
//!   `guest-exec`) after start-up and after the run.
//! - The like-for-like of that qemu-ga client: before the proxy starts, this
//!   program runs tether's link itself straight on the agent's chardev
//!   socket (what the proxy runs per VM) and times the same agent-answered
//!   call, in turn and 64 in flight. Then it closes, the proxy takes the
//!   port, and the agent sees a new host session.
//! - Sequential round trips are compared in interleaved blocks of a tenth
//!   each — tether's, then its baselines' (the raw echo, `guest-sync`),
//!   and again — so that the host's drift during the run weighs on both
//!   sides of a ratio alike.
//!
//! `cargo bench --bench vm` prints Markdown rows for docs/BENCHMARKS.md;
//! `-- --quick` does a fraction of the work (CI proves it runs). Needs the VM
//! assets (`scripts/vm-assets`).

mod common;
#[path = "../tests/support/vm.rs"]
#[allow(dead_code)]
mod vm;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Ctl, proxy, stats};
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

/// A round trip this slow is a stall (the aim: none in 10,000; a probe
/// interval is 200 ms — see docs/BENCHMARKS.md).
const STALL: Duration = Duration::from_millis(50);
const U: &str = "3e1d5c7a-2b4f-4a6e-9c8d-7f6e5d4c3b2a";

/// `n` round trips of 64 bytes through the raw echo, in turn.
async fn raw_rtt(s: &mut UnixStream, n: usize) -> Vec<Duration> {
    let msg = [0x5au8; 64];
    let mut back = [0u8; 64];
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        s.write_all(&msg).await.expect("write");
        s.read_exact(&mut back).await.expect("read");
        out.push(t.elapsed());
    }
    out
}

/// Bytes per second through the raw echo, `total` bytes each way.
async fn raw_throughput(echo: &Path, total: usize) -> f64 {
    let s = connect_echo(echo).await;
    let (mut r, mut w) = s.into_split();
    let t = Instant::now();
    let writer = tokio::spawn(async move {
        let chunk = vec![0xa5u8; 32 * 1024];
        let mut sent = 0;
        while sent < total {
            let n = chunk.len().min(total - sent);
            w.write_all(&chunk[..n]).await.expect("write");
            sent += n;
        }
        w
    });
    let mut buf = vec![0u8; 64 * 1024];
    let mut got = 0;
    while got < total {
        let n = r.read(&mut buf).await.expect("read");
        assert!(n > 0, "the echo closed after {got} bytes");
        got += n;
    }
    let _w = writer.await.expect("writer");
    total as f64 / t.elapsed().as_secs_f64()
}

/// Connect to the echo port and wait (bounded) until the guest echoes.
async fn connect_echo(p: &Path) -> UnixStream {
    let t = Instant::now();
    loop {
        if let Ok(mut s) = UnixStream::connect(p).await {
            let mut b = [0u8; 1];
            s.write_all(b"!").await.expect("write");
            if let Ok(Ok(1)) = tokio::time::timeout(Duration::from_secs(2), s.read(&mut b)).await {
                return s;
            }
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the guest's echo never answered"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn call_rtt(ctl: &mut Ctl, n: usize, topic: &str, method: &str) -> Vec<Duration> {
    let req =
        json!({"op": "call", "instance": U, "topic": topic, "method": method, "args": {"x": 1}});
    ctl.timed(&req, n).await
}

/// Payload bytes per second of `n` pipelined 1 KiB casts, `depth` in flight.
async fn cast_throughput(ctl: &mut Ctl, n: usize, depth: usize) -> f64 {
    let blob = "x".repeat(1024);
    let per_s = pipelined(
        ctl,
        n,
        depth,
        async |c, i| {
            c.send(
                &json!({"id": i, "op": "cast", "instance": U, "topic": "demo", "method": "echo",
                           "args": {"blob": blob}, "timeout_ms": 30_000}),
            )
            .await
        },
        async |c| {
            let v = c.recv().await;
            assert_eq!(v["ok"], true, "{v}");
        },
    )
    .await;
    per_s * 1024.0
}

/// Requests per second through `io`, `n` of them with `depth` in flight:
/// `send(io, i)` sends the i-th, `recv(io)` takes (and checks) one answer.
async fn pipelined<T>(
    io: &mut T,
    n: usize,
    depth: usize,
    mut send: impl AsyncFnMut(&mut T, usize),
    mut recv: impl AsyncFnMut(&mut T),
) -> f64 {
    let t = Instant::now();
    let (mut sent, mut done) = (0, 0);
    while done < n {
        while sent < n && sent - done < depth {
            send(io, sent).await;
            sent += 1;
        }
        recv(io).await;
        done += 1;
    }
    n as f64 / t.elapsed().as_secs_f64()
}

/// tether's host half in this process, straight on the agent's chardev
/// socket: the like-for-like of the qemu-ga client below (a program on the
/// host talking to the port; no proxy, no control socket). Calls to
/// `tether.agent ping`, answered by the agent itself.
struct Direct {
    tx: tether::link::driver::LinkSender,
    rx: tether::link::driver::LinkReceiver,
    task: tether::link::driver::LinkTask,
    next: u64,
}

impl Direct {
    /// Link up and wait (bounded) for the guest's topic list to name the
    /// example sub-agent's `demo`.
    async fn connect(chardev: &Path) -> Self {
        use tether::link::driver::UnixConnector;
        use tether::link::{Link, LinkOptions};
        let Link { tx, rx, task } = Link::spawn(
            UnixConnector {
                path: chardev.to_path_buf(),
            },
            LinkOptions {
                name: "bench".into(),
                ..LinkOptions::default()
            },
            tether::random_session_id(),
        );
        let mut d = Direct {
            tx,
            rx,
            task,
            next: 0,
        };
        // Until the example sub-agent has registered (the agent's first
        // list may precede it).
        loop {
            if let tether::rpc::LinkMsg::Topics { topics } = d.next_msg().await
                && topics.iter().any(|t| t == "demo")
            {
                return d;
            }
        }
    }

    async fn next_msg(&mut self) -> tether::rpc::LinkMsg {
        use tether::link::LinkEvent;
        loop {
            match tokio::time::timeout(Duration::from_secs(120), self.rx.recv()).await {
                Ok(Some(LinkEvent::Message(b))) => {
                    return tether::rpc::LinkMsg::from_bytes(&b).expect("the agent's message");
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => panic!("no message from the agent"),
            }
        }
    }

    async fn send_call(&mut self) {
        use tether::rpc::{Kind, LinkMsg, Request, Target};
        self.next += 1;
        let r = Request {
            kind: Kind::Call,
            target: Target {
                topic: "tether.agent".into(),
                ..Default::default()
            },
            method: "ping".into(),
            args: json!({"id": self.next}),
            ctx: json!({}),
            msg_id: Some(self.next.to_string()),
            unique_id: format!("bench-{}-{}", std::process::id(), self.next),
            reply_to: None,
            timeout_ms: Some(30_000),
        };
        self.tx
            .send(LinkMsg::Req(r).to_bytes())
            .await
            .expect("send over the link");
    }

    /// The next answer (receipts and other messages passed over).
    async fn answer(&mut self) {
        loop {
            if let tether::rpc::LinkMsg::Rep(r) = self.next_msg().await
                && r.ending
            {
                assert!(r.failure.is_none(), "{r:?}");
                return;
            }
        }
    }

    async fn rtt(&mut self, n: usize) -> Vec<Duration> {
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let t = Instant::now();
            self.send_call().await;
            self.answer().await;
            out.push(t.elapsed());
        }
        out
    }

    /// Calls answered per second, `n` with `depth` in flight.
    async fn throughput(&mut self, n: usize, depth: usize) -> f64 {
        pipelined(
            self,
            n,
            depth,
            async |d, _| d.send_call().await,
            async |d| d.answer().await,
        )
        .await
    }
}

/// A qemu-ga connection: JSON commands in, one JSON line per answer out.
struct Qga {
    r: tokio::io::Lines<BufReader<tokio::net::unix::OwnedReadHalf>>,
    w: tokio::net::unix::OwnedWriteHalf,
}

impl Qga {
    /// Connect and synchronise (bounded): qemu-ga may have half a
    /// command from an earlier client buffered, which `guest-sync` with a
    /// fresh id skips past.
    async fn connect(p: &Path) -> Self {
        let t = Instant::now();
        let mut id = 1000u64;
        loop {
            if let Ok(s) = UnixStream::connect(p).await {
                let (r, w) = s.into_split();
                let mut q = Qga {
                    r: BufReader::new(r).lines(),
                    w,
                };
                id += 1;
                let sync = json!({"execute": "guest-sync", "arguments": {"id": id}});
                q.send(&sync).await;
                let until = Instant::now() + Duration::from_secs(5);
                while let Ok(Ok(Some(l))) =
                    tokio::time::timeout_at(until.into(), q.r.next_line()).await
                {
                    let v: serde_json::Value = serde_json::from_str(&l).unwrap_or_default();
                    if v["return"] == id {
                        return q;
                    }
                }
            }
            assert!(
                t.elapsed() < Duration::from_secs(120),
                "qemu-ga never answered guest-sync"
            );
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    async fn send(&mut self, v: &serde_json::Value) {
        self.w
            .write_all(format!("{v}\n").as_bytes())
            .await
            .expect("write to qemu-ga");
    }

    async fn recv(&mut self) -> serde_json::Value {
        let l = self
            .r
            .next_line()
            .await
            .expect("read from qemu-ga")
            .expect("qemu-ga closed");
        serde_json::from_str(&l).expect("qemu-ga's JSON")
    }

    async fn req(&mut self, v: &serde_json::Value) -> serde_json::Value {
        self.send(v).await;
        self.recv().await
    }

    /// Round trips of `cmd`, `n` in turn.
    async fn rtt(&mut self, n: usize, cmd: &str) -> Vec<Duration> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let v = if cmd == "guest-sync" {
                json!({"execute": cmd, "arguments": {"id": i}})
            } else {
                json!({"execute": cmd})
            };
            let t = Instant::now();
            let back = self.req(&v).await;
            out.push(t.elapsed());
            assert!(back.get("return").is_some(), "{back}");
        }
        out
    }

    /// `guest-ping`s per second, `n` of them with `depth` in flight.
    async fn ping_throughput(&mut self, n: usize, depth: usize) -> f64 {
        pipelined(
            self,
            n,
            depth,
            async |q, _| q.send(&json!({"execute": "guest-ping"})).await,
            async |q| {
                let v = q.recv().await;
                assert!(v.get("return").is_some(), "{v}");
            },
        )
        .await
    }

    /// Run `script` in the guest through `guest-exec`; its stdout.
    async fn exec(&mut self, script: &str) -> String {
        use base64::Engine;
        let v = self
            .req(&json!({"execute": "guest-exec", "arguments": {
                "path": "/bin/sh", "arg": ["-c", script], "capture-output": true}}))
            .await;
        let pid = v["return"]["pid"].clone();
        assert!(pid.is_u64(), "{v}");
        let t = Instant::now();
        loop {
            let st = self
                .req(&json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}))
                .await;
            if st["return"]["exited"] == true {
                let out = st["return"]["out-data"].as_str().unwrap_or("");
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(out)
                    .expect("base64 from qemu-ga");
                return String::from_utf8_lossy(&bytes).into_owned();
            }
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "guest-exec never ended: {st}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Resident memory of the guest's processes named `names`, KiB.
    /// CPU time the guest process `name` has used so far, user and system
    /// (from /proc/PID/stat), in microseconds. The kernel counts in ticks
    /// of 10 ms: read around thousands of requests, not one.
    async fn cpu_us(&mut self, name: &str) -> (u64, u64) {
        let s = self
            .exec(&format!(
                "set -- $(cat /proc/$(pidof {name} | cut -d' ' -f1)/stat); echo ${{14}} ${{15}}"
            ))
            .await;
        let ticks: Vec<u64> = s
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        match ticks[..] {
            [user, system] => (user * 10_000, system * 10_000),
            _ => panic!("no CPU time for {name}: {s:?}"),
        }
    }

    /// Resident memory of each process, in KiB: `Rss` of
    /// /proc/PID/smaps_rollup, counted from the page tables. (`VmRSS` in
    /// /proc/PID/status is not: Linux 6.1 batches each thread's count and
    /// adds it to the process's every 64 page faults, so a small process
    /// can show 4 KiB.)
    async fn rss_kib(&mut self, names: &[&str]) -> Vec<u64> {
        let mut out = vec![];
        for n in names {
            let s = self
                .exec(&format!(
                    "grep '^Rss:' /proc/$(pidof {n} | cut -d' ' -f1)/smaps_rollup"
                ))
                .await;
            let kib = s
                .split_whitespace()
                .nth(1)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no Rss for {n}: {s:?}"));
            out.push(kib);
        }
        out
    }
}

/// CPU time per request, user and system, in µs, from two readings `n`
/// requests apart.
fn per_request(before: (u64, u64), after: (u64, u64), n: usize) -> (f64, f64) {
    let each = |a: u64, b: u64| b.saturating_sub(a) as f64 / n as f64;
    (each(before.0, after.0), each(before.1, after.1))
}

/// Calls answered by the agent per second, `n` with `depth` in flight.
async fn call_throughput(ctl: &mut Ctl, n: usize, depth: usize) -> f64 {
    pipelined(
        ctl,
        n,
        depth,
        async |c, i| {
            c.send(
                &json!({"id": i, "op": "call", "instance": U, "topic": "tether.agent",
                           "method": "ping", "args": {"id": i}, "timeout_ms": 30_000}),
            )
            .await
        },
        async |c| {
            let v = c.recv().await;
            assert_eq!(v["ok"], true, "{v}");
        },
    )
    .await
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rt = tether::daemon::runtime().expect("runtime");
    rt.block_on(async {
        let d = tempfile::tempdir().expect("tmp");
        let echo = d.path().join("echo.sock");
        let qga_sock = d.path().join("qga.sock");
        let chardev = d.path().join("ch").join(format!("{U}.sock"));
        std::fs::create_dir_all(d.path().join("ch")).expect("channels dir");
        let vm = vm::Vm::boot_with_ports(
            d.path(),
            "bench",
            &chardev,
            &[(&echo, "org.tether.echo.0"), (&qga_sock, "org.qemu.guest_agent.0")],
        );
        vm.wait_console("tether-agent ready", Duration::from_secs(120)).await;
        let n = if quick { 50 } else { 10_000 };
        let pipelined = if quick { 200 } else { 5000 };
        // Each comparison of round trips runs in interleaved blocks (tether,
        // then its baseline, and again), so that the host's drift over the
        // run — its other work, its clock, the emulator's caches — weighs
        // on both alike; CPU times are read around the whole interleaved
        // span (each agent idles while the other's block runs).
        let blocks = if quick { 2 } else { 10 };
        let block = n / blocks;
        // First the host program on the port itself, as qemu-ga's client is
        // below; then it lets go and the proxy takes the port (the agent
        // sees a new host session).
        let mut direct = Direct::connect(&chardev).await;
        let mut qga = Qga::connect(&qga_sock).await;
        let procs = ["tether-agent", "qemu-ga", "echo_subagent"];
        let rss_start = qga.rss_kib(&procs).await;
        direct.rtt(n / 10 + 1).await;
        qga.rtt(n / 10 + 1, "guest-sync").await;
        let (mut direct_rtt, mut sync1) = (vec![], vec![]);
        let cpu0 = (qga.cpu_us("tether-agent").await, qga.cpu_us("qemu-ga").await);
        for _ in 0..blocks {
            direct_rtt.extend(direct.rtt(block).await);
            sync1.extend(qga.rtt(block, "guest-sync").await);
        }
        let qga_cpu = per_request(cpu0.1, qga.cpu_us("qemu-ga").await, n);
        let agent_cpu = per_request(cpu0.0, qga.cpu_us("tether-agent").await, n);
        let (direct_rtt, sync1) = (stats(direct_rtt), stats(sync1));
        let direct_per_s = direct.throughput(pipelined, 64).await;
        direct.task.close().await;
        let _proxy = proxy(d.path());
        let mut ctl = Ctl::new(&d.path().join("ctl.sock")).await;
        let t = Instant::now();
        while ctl.req(&json!({"op": "call", "instance": U, "topic": "demo", "method": "echo", "timeout_ms": 5_000})).await["ok"] != true {
            assert!(t.elapsed() < Duration::from_secs(120), "the guest never linked");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let bytes = if quick { 256 * 1024 } else { 8 * 1024 * 1024 };
        let casts = if quick { 200 } else { 8000 };
        // Warm up every path.
        let mut echo_conn = connect_echo(&echo).await;
        raw_rtt(&mut echo_conn, n / 10 + 1).await;
        call_rtt(&mut ctl, n / 10 + 1, "tether.agent", "ping").await;
        call_rtt(&mut ctl, n / 10 + 1, "demo", "echo").await;
        let (mut raw, mut agent, mut sub, mut sync) = (vec![], vec![], vec![], vec![]);
        for _ in 0..blocks {
            raw.extend(raw_rtt(&mut echo_conn, block).await);
            agent.extend(call_rtt(&mut ctl, block, "tether.agent", "ping").await);
            sub.extend(call_rtt(&mut ctl, block, "demo", "echo").await);
            sync.extend(qga.rtt(block, "guest-sync").await);
        }
        drop(echo_conn);
        let stalled = |v: &[Duration]| v.iter().filter(|d| **d > STALL).count();
        let (raw_stalls, agent_stalls, sub_stalls) = (stalled(&raw), stalled(&agent), stalled(&sub));
        // A stall is a lost wake-up only if a loss probe ended it; the
        // rest is the machine's scheduling. Both ends count theirs (the
        // guest's since it started, the direct phase's too).
        let guest_stats = ctl
            .req(&json!({"op": "call", "instance": U, "topic": "tether.agent", "method": "stats"}))
            .await;
        let guest_probes = guest_stats["result"]["link"]["probes"].clone();
        let host_probes = ctl.req(&json!({"op": "links"})).await["result"][0]["probes"].clone();
        let (raw, agent, sub, sync) = (stats(raw), stats(agent), stats(sub), stats(sync));
        let raw_bps = raw_throughput(&echo, bytes).await;
        let tether_bps = cast_throughput(&mut ctl, casts, 64).await;
        let ping = stats(qga.rtt(n, "guest-ping").await);
        let qga_per_s = qga.ping_throughput(pipelined, 64).await;
        let tether_per_s = call_throughput(&mut ctl, pipelined, 64).await;
        let rss_end = qga.rss_kib(&procs).await;
        let bin = |p: &str| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let root = concat!(env!("CARGO_MANIFEST_DIR"), "/target/vm/root");
        let agent_size = bin(&format!("{root}/bin/tether-agent"));
        let qga_size = bin(&format!("{root}/bin/qemu-ga"));
        let libs: u64 = std::fs::read_dir(format!("{root}/lib/x86_64-linux-gnu"))
            .map(|d| d.flatten().map(|e| e.metadata().map(|m| m.len()).unwrap_or(0)).sum())
            .unwrap_or(0)
            + bin(&format!("{root}/lib64/ld-linux-x86-64.so.2"));
        let mb = |b: f64| b / 1e6;
        println!("| test (TCG guest, virtio-serial) | raw echo on the same VM | tether | tether / raw |");
        println!("|---|---|---|---|");
        println!(
            "| RTT mean, {n} rounds: answered by the agent | {:.0} µs | {:.0} µs | {:.1} |",
            raw.0, agent.0, agent.0 / raw.0
        );
        println!(
            "| RTT p50 / p99: answered by the agent | {:.0} / {:.0} µs | {:.0} / {:.0} µs | |",
            raw.1, raw.2, agent.1, agent.2
        );
        println!(
            "| RTT mean: answered by the guest's sub-agent | | {:.0} µs (p50 {:.0}, p99 {:.0}) | {:.1} |",
            sub.0, sub.1, sub.2, sub.0 / raw.0
        );
        println!(
            "| round trips over {} ms | {raw_stalls} of {n} | {agent_stalls} (agent), {sub_stalls} (sub-agent) of {n}; loss probes: guest {guest_probes}, host {host_probes} | |",
            STALL.as_millis()
        );
        println!(
            "| throughput ({} KiB raw; {casts} × 1 KiB casts, 64 in flight) | {:.2} MB/s | {:.2} MB/s ({:.0} casts/s) | {:.2} |",
            bytes / 1024,
            mb(raw_bps),
            mb(tether_bps),
            tether_bps / 1024.0,
            tether_bps / raw_bps
        );
        println!();
        println!("| same guest, same run | qemu-ga | tether | tether / qemu-ga |");
        println!("|---|---|---|---|");
        println!(
            "| RTT mean / p50 / p99: qemu-ga `guest-sync`; tether call answered by the agent | {:.0} / {:.0} / {:.0} µs | {:.0} / {:.0} / {:.0} µs | {:.2} (mean), {:.2} (p99) |",
            sync.0, sync.1, sync.2, agent.0, agent.1, agent.2, agent.0 / sync.0, agent.2 / sync.2
        );
        println!(
            "| RTT mean / p50 / p99: `guest-sync`; tether: the same call from tether's link in the host program, straight on the port (no proxy; interleaved with its own `guest-sync` blocks) | {:.0} / {:.0} / {:.0} µs | {:.0} / {:.0} / {:.0} µs | {:.2} (mean), {:.2} (p99) |",
            sync1.0, sync1.1, sync1.2, direct_rtt.0, direct_rtt.1, direct_rtt.2, direct_rtt.0 / sync1.0, direct_rtt.2 / sync1.2
        );
        println!(
            "| CPU time of the answering process in the guest per round trip, user + system (the two rows above) | {:.0} + {:.0} µs | {:.0} + {:.0} µs | {:.2} |",
            qga_cpu.0, qga_cpu.1, agent_cpu.0, agent_cpu.1,
            (agent_cpu.0 + agent_cpu.1) / (qga_cpu.0 + qga_cpu.1)
        );
        println!(
            "| RTT mean / p50 / p99: qemu-ga `guest-ping` | {:.0} / {:.0} / {:.0} µs | | {:.2} (mean) |",
            ping.0, ping.1, ping.2, agent.0 / ping.0
        );
        println!(
            "| pipelined, 64 in flight: `guest-ping`s; tether calls answered by the agent | {qga_per_s:.0} /s | {tether_per_s:.0} /s | {:.2} |",
            tether_per_s / qga_per_s
        );
        println!(
            "| pipelined, 64 in flight: `guest-ping`s; tether calls straight on the port (no proxy) | {qga_per_s:.0} /s | {direct_per_s:.0} /s | {:.2} |",
            direct_per_s / qga_per_s
        );
        println!(
            "| guest RSS after start-up / after the run (tether: the agent; its example sub-agent apart) | {} / {} KiB | {} / {} KiB (sub-agent {} / {} KiB) | {:.2} |",
            rss_start[1], rss_end[1], rss_start[0], rss_end[0], rss_start[2], rss_end[2],
            rss_start[0] as f64 / rss_start[1] as f64
        );
        println!(
            "| binary size (tether: static, nothing else; qemu-ga: dynamic, plus the libraries it loads) | {:.2} MB + {:.2} MB | {:.2} MB | |",
            qga_size as f64 / 1e6,
            libs as f64 / 1e6,
            agent_size as f64 / 1e6
        );
    });
}
