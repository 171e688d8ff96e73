//! Link throughput and round-trip time over a UNIX socket pair, against a raw
//! length-prefixed stream over the same kind of socket, in the same run.
//!
//! `cargo bench --bench link` prints a Markdown table for docs/BENCHMARKS.md.
//! `-- --quick` runs a tenth of the work (for CI: proves it runs, not fast).

use std::time::{Duration, Instant};

use bytes::Bytes;
use tether::link::driver::{ConnectFuture, LinkOptions};
use tether::link::{Connector, Link, LinkEvent};
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::UnixStream;

/// Hands out one pre-made stream, then never connects again.
struct Once(Option<UnixStream>);

impl Connector for Once {
    type Io = UnixStream;
    fn connect(&mut self) -> ConnectFuture<UnixStream> {
        match self.0.take() {
            Some(s) => Box::pin(async move { Ok(s) }),
            None => Box::pin(std::future::pending()),
        }
    }
}

fn link_pair() -> (Link, Link) {
    let (a, b) = UnixStream::pair().expect("socketpair");
    let o = |n: &str| LinkOptions {
        name: n.into(),
        ..LinkOptions::default()
    };
    (
        Link::spawn(Once(Some(a)), o("a"), 1),
        Link::spawn(Once(Some(b)), o("b"), 2),
    )
}

async fn raw_throughput(size: usize, count: usize) -> Duration {
    let (a, b) = UnixStream::pair().expect("socketpair");
    // The best a raw stream can do: one prebuilt length-prefixed buffer per
    // message, written through a 64 KiB buffer (large ones go straight out).
    let mut frame = (size as u32).to_be_bytes().to_vec();
    frame.extend(std::iter::repeat_n(7u8, size));
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        let mut w = BufWriter::with_capacity(64 * 1024, a);
        for _ in 0..count {
            w.write_all(&frame).await.expect("write");
        }
        w.flush().await.expect("flush");
        w
    });
    let mut r = BufReader::with_capacity(64 * 1024, b);
    let mut buf = vec![0u8; size];
    for _ in 0..count {
        let n = r.read_u32().await.expect("read") as usize;
        r.read_exact(&mut buf[..n]).await.expect("read");
    }
    let elapsed = start.elapsed();
    drop(writer.await);
    elapsed
}

async fn link_throughput(size: usize, count: usize) -> Duration {
    let (a, b) = link_pair();
    let payload = Bytes::from(vec![7u8; size]);
    let Link { mut rx, task, .. } = b;
    let start = Instant::now();
    let tx = a.tx.clone();
    let sender = tokio::spawn(async move {
        for _ in 0..count {
            tx.send(payload.clone()).await.expect("send");
        }
    });
    let mut got = 0;
    while got < count {
        if let LinkEvent::Message(_) = rx.recv().await.expect("link ended") {
            got += 1;
        }
    }
    let elapsed = start.elapsed();
    sender.await.expect("sender");
    a.close().await;
    task.close().await;
    elapsed
}

async fn raw_rtt(rounds: usize) -> Vec<Duration> {
    let (mut a, mut b) = UnixStream::pair().expect("socketpair");
    let echo = tokio::spawn(async move {
        let mut buf = [0u8; 12];
        for _ in 0..rounds {
            b.read_exact(&mut buf).await.expect("read");
            b.write_all(&buf).await.expect("write");
        }
    });
    let mut out = Vec::with_capacity(rounds);
    let mut buf = [0u8; 12];
    for i in 0..rounds {
        let t = Instant::now();
        let mut msg = [0u8; 12];
        msg[..4].copy_from_slice(&8u32.to_be_bytes());
        msg[4..].copy_from_slice(&(i as u64).to_be_bytes());
        a.write_all(&msg).await.expect("write");
        a.read_exact(&mut buf).await.expect("read");
        out.push(t.elapsed());
    }
    echo.await.expect("echo");
    out
}

async fn link_rtt(rounds: usize) -> Vec<Duration> {
    let (a, b) = link_pair();
    let Link {
        tx: btx,
        rx: mut brx,
        task: btask,
    } = b;
    let echo = tokio::spawn(async move {
        let mut n = 0;
        while n < rounds {
            if let LinkEvent::Message(m) = brx.recv().await.expect("link ended") {
                btx.send(m).await.expect("send");
                n += 1;
            }
        }
        btask
    });
    let Link { tx, mut rx, task } = a;
    let mut out = Vec::with_capacity(rounds);
    for i in 0..rounds {
        let t = Instant::now();
        tx.send(Bytes::copy_from_slice(&(i as u64).to_be_bytes()))
            .await
            .expect("send");
        loop {
            if let LinkEvent::Message(_) = rx.recv().await.expect("link ended") {
                break;
            }
        }
        out.push(t.elapsed());
    }
    echo.await.expect("echo").close().await;
    task.close().await;
    out
}

fn pct(v: &mut [Duration], p: f64) -> Duration {
    v.sort();
    v[((v.len() as f64 - 1.0) * p) as usize]
}

fn mean(v: &[Duration]) -> Duration {
    v.iter().sum::<Duration>() / v.len() as u32
}

fn rtt_rows(label: &str, rt: &tokio::runtime::Runtime, rounds: usize) {
    rt.block_on(async {
        raw_rtt(rounds / 10).await;
        link_rtt(rounds / 10).await;
        let mut raw = raw_rtt(rounds).await;
        let mut link = link_rtt(rounds).await;
        let (rm, lm) = (mean(&raw), mean(&link));
        println!(
            "| ping RTT mean, {label} | {:.1} µs | {:.1} µs | {:.2} |",
            rm.as_secs_f64() * 1e6,
            lm.as_secs_f64() * 1e6,
            lm.as_secs_f64() / rm.as_secs_f64()
        );
        let (r50, l50) = (pct(&mut raw, 0.5), pct(&mut link, 0.5));
        let (r99, l99) = (pct(&mut raw, 0.99), pct(&mut link, 0.99));
        println!(
            "| ping RTT p50 / p99, {label} | {:.1} / {:.1} µs | {:.1} / {:.1} µs | {:.2} / {:.2} |",
            r50.as_secs_f64() * 1e6,
            r99.as_secs_f64() * 1e6,
            l50.as_secs_f64() * 1e6,
            l99.as_secs_f64() * 1e6,
            l50.as_secs_f64() / r50.as_secs_f64(),
            l99.as_secs_f64() / r99.as_secs_f64()
        );
    });
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let scale = if quick { 10 } else { 1 };
    let multi = tether::daemon::runtime().expect("runtime");
    let single = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!("| test | raw socket | tether link | link / raw |");
    println!("|---|---|---|---|");
    multi.block_on(async {
        for (size, count) in [(1024usize, 200_000 / scale), (64 * 1024, 4_000 / scale)] {
            // Warm up both paths once, then measure.
            raw_throughput(size, count / 10).await;
            link_throughput(size, count / 10).await;
            let raw = raw_throughput(size, count).await;
            let link = link_throughput(size, count).await;
            let mbs = |d: Duration| (size * count) as f64 / d.as_secs_f64() / 1e6;
            let mps = |d: Duration| count as f64 / d.as_secs_f64();
            println!(
                "| throughput, {} KiB messages | {:.0} MB/s ({:.0} msg/s) | {:.0} MB/s ({:.0} msg/s) | {:.2} |",
                size / 1024,
                mbs(raw),
                mps(raw),
                mbs(link),
                mps(link),
                mbs(link) / mbs(raw)
            );
        }
    });
    let rounds = 20_000 / scale;
    rtt_rows("2 worker threads", &multi, rounds);
    rtt_rows("1 thread", &single, rounds);
}
