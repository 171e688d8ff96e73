//! The link protocol in action, on this machine, in words a newcomer follows.
//!
//! A "guest" endpoint listens on a UNIX socket that plays the virtio-serial
//! port; a "host" endpoint reaches it through a relay that cuts the
//! connection at random points (mid-frame, like QEMU discarding a virtqueue at
//! a reset) and injects garbage. Both stream messages at each other; at the
//! end every message has arrived exactly once, in order.
//!
//! Run: `cargo run --release --example link_demo`

use std::time::{Duration, Instant};

use bytes::Bytes;
use tether::link::driver::{UnixAcceptor, UnixConnector};
use tether::link::{Link, LinkEvent, LinkOptions, SessionConfig};
use tether::testing::{FaultRelay, RelayFaults};

const N: u64 = 20_000;

fn opts(name: &str) -> LinkOptions {
    LinkOptions {
        name: name.into(),
        session: SessionConfig {
            probe_after: Duration::from_millis(100),
            ..SessionConfig::default()
        },
        backoff_min: Duration::from_millis(5),
        ..LinkOptions::default()
    }
}

async fn stream(link: Link, label: &'static str) -> anyhow::Result<(u64, u64, Link)> {
    let Link { tx, mut rx, task } = link;
    let sender = tx.clone();
    let send = tokio::spawn(async move {
        for i in 0..N {
            sender
                .send(Bytes::copy_from_slice(&i.to_be_bytes()))
                .await?;
        }
        anyhow::Ok(())
    });
    let (mut next, mut ups) = (0u64, 0u64);
    while next < N {
        match rx.recv().await {
            Some(LinkEvent::Message(m)) => {
                let got = u64::from_be_bytes(m.as_ref().try_into()?);
                anyhow::ensure!(got == next, "{label}: expected message {next}, got {got}");
                next += 1;
            }
            Some(LinkEvent::Up { .. }) => ups += 1,
            Some(_) => {}
            None => anyhow::bail!("{label}: link ended"),
        }
    }
    send.await??;
    Ok((next, ups, Link { tx, rx, task }))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let port = dir.path().join("port.sock");
    let relay_path = dir.path().join("relay.sock");
    println!("tether link demo");
    println!(
        "  guest endpoint listens on {} (the emulated port)",
        port.display()
    );
    let guest = Link::spawn(
        UnixAcceptor::new(tokio::net::UnixListener::bind(&port)?),
        opts("guest"),
        tether::random_session_id(),
    );
    let relay = FaultRelay::start(
        &relay_path,
        &port,
        RelayFaults {
            cut_after: Some((50_000, 500_000)),
            garbage_chance: 0.01,
            garbage_max: 64,
            max_chunk: 8192,
        },
        tether::random_session_id(),
    )?;
    println!("  a fault relay sits in between: it resets the channel every 50-500 KB,");
    println!("  cutting frames in half and dropping bytes in flight, and injects garbage");
    let host = Link::spawn(
        UnixConnector { path: relay_path },
        opts("host"),
        tether::random_session_id(),
    );
    println!("  host and guest now each send {N} numbered messages to the other...");
    let t = Instant::now();
    let (h, g) = tokio::join!(stream(host, "host"), stream(guest, "guest"));
    let ((h_got, h_ups, host), (g_got, _, guest)) = (h?, g?);
    // Both wait until the other acknowledged everything, then close.
    let (hf, gf) = tokio::join!(host.tx.flush(), guest.tx.flush());
    hf?;
    gf?;
    host.close().await;
    guest.close().await;
    let rs = relay.stats();
    println!();
    println!(
        "  the channel was reset {} times and {} garbage bytes were injected,",
        rs.cuts, rs.garbage_bytes
    );
    println!("  the host connected {h_ups} times; each reconnect resumed where the peer stopped");
    println!(
        "  host received {h_got}/{N}, guest received {g_got}/{N}: every message exactly once, in order"
    );
    println!("  ({:.1} s)", t.elapsed().as_secs_f64());
    Ok(())
}
