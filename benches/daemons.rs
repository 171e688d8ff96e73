//! The daemons, measured against baselines in the same run:
//! - a control-socket call through tether-proxy, tether-agent and a sub-agent
//!   and back, against a raw JSON-line round trip over a UNIX socket;
//! - tether-proxy's RSS and idle CPU with 1,000 emulated guest links, against
//!   the same proxy with none.
//!
//! `cargo bench --bench daemons` prints Markdown rows for docs/BENCHMARKS.md;
//! `-- --quick` does a fraction of the work (CI proves it runs).

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{Ctl, Daemon, cpu_secs, proxy, stats, status_kib, wait};

use serde_json::json;
use tether::client::SubAgent;
use tether::link::driver::UnixAcceptor;
use tether::link::{Link, LinkOptions};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

async fn raw_rtt(dir: &Path, n: usize, line: &str) -> Vec<Duration> {
    let p = dir.join("raw.sock");
    let l = UnixListener::bind(&p).expect("bind");
    tokio::spawn(async move {
        let (s, _) = l.accept().await.expect("accept");
        let (r, mut w) = s.into_split();
        let mut lines = BufReader::new(r).lines();
        while let Ok(Some(l)) = lines.next_line().await {
            w.write_all(format!("{l}\n").as_bytes())
                .await
                .expect("echo");
        }
    });
    let (r, mut w) = UnixStream::connect(&p).await.expect("connect").into_split();
    let mut lines = BufReader::new(r).lines();
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        w.write_all(format!("{line}\n").as_bytes())
            .await
            .expect("write");
        lines.next_line().await.expect("read");
        out.push(t.elapsed());
    }
    out
}

async fn call_rtt(dir: &Path, n: usize) -> Vec<Duration> {
    let uuid = "6ba7b810-9dad-41d1-80b4-00c04fd430c8";
    let _proxy = proxy(dir);
    let sock = dir.join("agent.sock");
    let port = format!(
        "unix-listen:{}",
        dir.join("ch").join(format!("{uuid}.sock")).display()
    );
    let _agent = Daemon(
        Command::new(env!("CARGO_BIN_EXE_tether-agent"))
            .args(["--port", &port, "--subagent-socket", sock.to_str().unwrap()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tether-agent"),
    );
    wait(&sock);
    let mut sa = SubAgent::connect(&sock, "bench", &["bench"])
        .await
        .expect("sub-agent");
    tokio::spawn(async move {
        while let Ok(Some(r)) = sa.next_request().await {
            let _ = sa.reply(r.id, Ok(r.args)).await;
        }
    });
    let mut ctl = Ctl::new(&dir.join("ctl.sock")).await;
    let req = json!({"op": "call", "instance": uuid, "topic": "bench", "method": "echo", "args": {"x": 1}});
    let t = Instant::now();
    while ctl.req(&req).await["ok"] != true {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the guest never linked"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    ctl.timed(&req, n).await
}

/// Proxy RSS (KiB) and CPU used over `idle` (percent of one core) with `n`
/// emulated guests linked.
async fn links_cost(dir: &Path, n: usize, idle: Duration) -> (u64, f64) {
    let p = proxy(dir);
    let pid = p.0.id();
    let mut guests = vec![];
    for i in 0..n {
        let path = dir
            .join("ch")
            .join(format!("{i:08x}-0000-4000-8000-000000000000.sock"));
        let l = UnixListener::bind(&path).expect("bind guest");
        guests.push(Link::spawn(
            UnixAcceptor::new(l),
            LinkOptions {
                name: format!("g{i}"),
                ..Default::default()
            },
            i as u64 + 1,
        ));
    }
    let t = Instant::now();
    while guests.iter().filter(|g| g.tx.status().established).count() < n {
        assert!(
            t.elapsed() < Duration::from_secs(120),
            "not all guests linked"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let c0 = cpu_secs(pid);
    tokio::time::sleep(idle).await;
    let cpu = (cpu_secs(pid) - c0) / idle.as_secs_f64() * 100.0;
    let rss = status_kib(pid, "VmRSS:");
    drop(p);
    for g in guests {
        g.close().await;
    }
    (rss, cpu)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let rt = tether::daemon::runtime().expect("runtime");
    rt.block_on(async {
        let n = if quick { 300 } else { 5000 };
        let d1 = tempfile::tempdir().expect("tmp");
        let line = json!({"id": 1, "ok": true, "result": {"x": 1}}).to_string();
        let raw = stats(raw_rtt(d1.path(), n, &line).await);
        let d2 = tempfile::tempdir().expect("tmp");
        let tether = stats(call_rtt(d2.path(), n).await);
        println!("| test | baseline | tether | tether / baseline |");
        println!("|---|---|---|---|");
        println!(
            "| call RTT mean, {n} calls (control socket → proxy → agent → sub-agent → back) | {:.1} µs (raw JSON-line echo) | {:.1} µs | {:.1} |",
            raw.0, tether.0, tether.0 / raw.0
        );
        println!("| call RTT p50 / p99 | {:.1} / {:.1} µs | {:.1} / {:.1} µs | |", raw.1, raw.2, tether.1, tether.2);
        let links = if quick { 100 } else { 1000 };
        let idle = Duration::from_secs(if quick { 2 } else { 20 });
        let d3 = tempfile::tempdir().expect("tmp");
        let (rss0, cpu0) = links_cost(d3.path(), 0, idle).await;
        let d4 = tempfile::tempdir().expect("tmp");
        let (rss1, cpu1) = links_cost(d4.path(), links, idle).await;
        println!(
            "| proxy RSS with {links} links | {rss0} KiB (no links) | {rss1} KiB | {:.1} KiB per link |",
            (rss1.saturating_sub(rss0)) as f64 / links as f64
        );
        println!("| proxy idle CPU over {}s with {links} links | {cpu0:.2} % (no links) | {cpu1:.2} % of one core | |", idle.as_secs());
    });
}
