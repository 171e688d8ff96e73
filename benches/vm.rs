//! The real port under TCG: a QEMU guest with two virtio-serial ports, the
//! agent on `org.tether.agent.0` and a plain `cat` echo on `org.tether.echo.0`
//! (the baseline: same guest, same device, no tether), measured in one run.
//!
//! - RTT: sequential round trips. Raw: 64 bytes echoed. Tether: a control
//!   call answered by the agent itself (`tether.agent stats`: control socket →
//!   proxy → link over the port → agent → back) and one answered by the
//!   example sub-agent (`echo`, one more socket hop in the guest).
//! - Throughput: raw, bytes written in 32 KiB chunks while reading the echo
//!   back; tether, casts of 1 KiB of arguments pipelined on the control
//!   socket (each confirmed once the guest's link acknowledged it).
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
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// A round trip this slow is a stall (the aim: none in 10,000; a probe
/// interval is 200 ms — see docs/BENCHMARKS.md).
const STALL: Duration = Duration::from_millis(50);
const U: &str = "3e1d5c7a-2b4f-4a6e-9c8d-7f6e5d4c3b2a";

async fn raw_rtt(echo: &Path, n: usize) -> Vec<Duration> {
    let mut s = connect_echo(echo).await;
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
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let v = ctl.req(&req).await;
        out.push(t.elapsed());
        assert_eq!(v["ok"], true, "{v}");
    }
    out
}

/// Payload bytes per second of `n` pipelined 1 KiB casts, `depth` in flight.
async fn cast_throughput(ctl: &mut Ctl, n: usize, depth: usize) -> f64 {
    let blob = "x".repeat(1024);
    let t = Instant::now();
    let (mut sent, mut done) = (0, 0);
    while done < n {
        while sent < n && sent - done < depth {
            ctl.send(
                &json!({"id": sent, "op": "cast", "instance": U, "topic": "demo", "method": "echo",
                             "args": {"blob": blob}, "timeout_ms": 30_000}),
            )
            .await;
            sent += 1;
        }
        let v = ctl.recv().await;
        assert_eq!(v["ok"], true, "{v}");
        done += 1;
    }
    (n * 1024) as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let d = tempfile::tempdir().expect("tmp");
        let _proxy = proxy(d.path());
        let echo = d.path().join("echo.sock");
        let _vm = vm::Vm::boot_with_echo(d.path(), "bench", &d.path().join("ch").join(format!("{U}.sock")), &echo);
        let mut ctl = Ctl::new(&d.path().join("ctl.sock")).await;
        let t = Instant::now();
        while ctl.req(&json!({"op": "call", "instance": U, "topic": "demo", "method": "echo", "timeout_ms": 5_000})).await["ok"] != true {
            assert!(t.elapsed() < Duration::from_secs(120), "the guest never linked");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        let n = if quick { 50 } else { 10_000 };
        let bytes = if quick { 256 * 1024 } else { 8 * 1024 * 1024 };
        let casts = if quick { 200 } else { 8000 };
        // Warm up both paths.
        raw_rtt(&echo, n / 10 + 1).await;
        call_rtt(&mut ctl, n / 10 + 1, "tether.agent", "stats").await;
        let stalled = |v: &[Duration]| v.iter().filter(|d| **d > STALL).count();
        let raw = raw_rtt(&echo, n).await;
        let agent = call_rtt(&mut ctl, n, "tether.agent", "stats").await;
        let sub = call_rtt(&mut ctl, n, "demo", "echo").await;
        let (raw_stalls, agent_stalls, sub_stalls) = (stalled(&raw), stalled(&agent), stalled(&sub));
        let (raw, agent, sub) = (stats(raw), stats(agent), stats(sub));
        let raw_bps = raw_throughput(&echo, bytes).await;
        let tether_bps = cast_throughput(&mut ctl, casts, 64).await;
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
            "| round trips over {} ms | {raw_stalls} of {n} | {agent_stalls} (agent), {sub_stalls} (sub-agent) of {n} | |",
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
    });
}
