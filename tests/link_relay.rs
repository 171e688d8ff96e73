//! The async driver over real UNIX sockets with the fault-injecting relay in
//! between: connections cut at random points (mid-frame), garbage injected.
//! 10,000 messages each way, each delivered exactly once and in order.

use std::time::Duration;

use bytes::Bytes;
use tether::link::driver::{LinkOptions, UnixAcceptor, UnixConnector};
use tether::link::{Link, LinkEvent, SessionConfig};
use tether::testing::{FaultRelay, RelayFaults};
use tokio::net::UnixListener;

const N: u64 = 10_000;
/// Liveness bound for the whole exchange; it takes about a second here.
const BOUND: Duration = Duration::from_secs(120);

fn opts(name: &str) -> LinkOptions {
    LinkOptions {
        name: name.into(),
        session: SessionConfig {
            probe_after: Duration::from_millis(100),
            hello_retry: Duration::from_millis(100),
            ..SessionConfig::default()
        },
        backoff_min: Duration::from_millis(5),
        backoff_max: Duration::from_millis(100),
        ..LinkOptions::default()
    }
}

fn msg(i: u64) -> Bytes {
    let mut v = i.to_be_bytes().to_vec();
    v.resize(8 + (i % 300) as usize, (i % 251) as u8);
    Bytes::from(v)
}

/// Send N messages and receive N, checking order; returns the events seen.
async fn run_side(link: Link) -> (Link, u64) {
    let Link { tx, mut rx, task } = link;
    let link_tx = tx.clone();
    let sender = tokio::spawn(async move {
        for i in 0..N {
            tx.send(msg(i)).await.expect("link closed while sending");
        }
    });
    let mut next = 0u64;
    let mut ups = 0;
    while next < N {
        match rx.recv().await.expect("link ended") {
            LinkEvent::Message(m) => {
                assert_eq!(
                    m,
                    msg(next),
                    "message {next} out of order, duplicated or damaged"
                );
                next += 1;
            }
            LinkEvent::Up { .. } => ups += 1,
            LinkEvent::PeerChanged {
                previous: Some(_), ..
            } => {
                panic!("neither side restarted, yet the peer changed")
            }
            LinkEvent::Expired { .. } => panic!("session expired"),
            _ => {}
        }
    }
    sender.await.unwrap();
    (
        Link {
            tx: link_tx,
            rx,
            task,
        },
        ups,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_each_way_through_cuts_and_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let b_path = dir.path().join("b.sock");
    let r_path = dir.path().join("relay.sock");
    let listener = UnixListener::bind(&b_path).unwrap();
    let relay = FaultRelay::start(
        &r_path,
        &b_path,
        RelayFaults {
            cut_after: Some((20_000, 400_000)),
            garbage_chance: 0.005,
            garbage_max: 100,
            max_chunk: 4096,
        },
        0x5eed,
    )
    .unwrap();
    let b = Link::spawn(UnixAcceptor::new(listener), opts("b"), 0xB);
    let a = Link::spawn(
        UnixConnector {
            path: r_path.clone(),
        },
        opts("a"),
        0xA,
    );
    let (ra, rb) = tokio::time::timeout(BOUND, async {
        tokio::join!(tokio::spawn(run_side(a)), tokio::spawn(run_side(b)))
    })
    .await
    .expect("exchange did not finish within the bound");
    let ((a, a_ups), (b, _)) = (ra.unwrap(), rb.unwrap());

    // Both ends settle: everything acknowledged.
    relay.set_faults(RelayFaults::none());
    for l in [&a, &b] {
        tokio::time::timeout(BOUND, l.tx.flush())
            .await
            .expect("not everything was acknowledged")
            .unwrap();
    }
    let stats = relay.stats();
    let sa = a.tx.status();
    eprintln!("relay {stats:?}\na {sa:?}\nb {:?}", b.tx.status());
    assert!(stats.cuts >= 3, "the relay cut only {} times", stats.cuts);
    assert!(stats.garbage_bytes > 0);
    assert!(a_ups >= stats.cuts.min(3), "reconnects not seen");
    assert!(sa.decode.skipped_bytes > 0 || b.tx.status().decode.skipped_bytes > 0);
    a.close().await;
    b.close().await;
}

#[tokio::test]
async fn send_waits_for_the_window_and_resumes_when_the_peer_appears() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("late.sock");
    let mut o = opts("a");
    o.session.window_frames = 8;
    let a = Link::spawn(UnixConnector { path: path.clone() }, o, 0xA);
    // No peer yet: eight sends fit the window, the ninth waits.
    for i in 0..8 {
        a.tx.send(msg(i)).await.unwrap();
    }
    let tx = a.tx.clone();
    let ninth = tokio::spawn(async move { tx.send(msg(8)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        !ninth.is_finished(),
        "send must wait while the window is full"
    );
    let b = Link::spawn(
        UnixAcceptor::new(UnixListener::bind(&path).unwrap()),
        opts("b"),
        0xB,
    );
    let receipt = tokio::time::timeout(BOUND, ninth)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    a.tx.wait_acked(receipt).await.unwrap();
    let Link { mut rx, .. } = b;
    let mut got = vec![];
    while got.len() < 9 {
        if let Some(LinkEvent::Message(m)) = rx.recv().await {
            got.push(m);
        }
    }
    assert_eq!(got, (0..9).map(msg).collect::<Vec<_>>());
}

/// Regression: with reading paused for a slow application and nothing to
/// write, the driver's I/O step had every `select!` branch disabled and
/// panicked, ending the link.
#[tokio::test]
async fn slow_receiver_pauses_reading_without_ending_the_link() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("slow.sock");
    let mut ob = opts("b");
    ob.recv_queue_bytes = 1;
    let b = Link::spawn(
        UnixAcceptor::new(UnixListener::bind(&path).unwrap()),
        ob,
        0xB,
    );
    let a = Link::spawn(UnixConnector { path }, opts("a"), 0xA);
    for i in 0..50 {
        a.tx.send(msg(i)).await.unwrap();
    }
    // The application does not read for a while: b stops reading.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let Link { mut rx, .. } = b;
    let mut got = vec![];
    while got.len() < 50 {
        match tokio::time::timeout(BOUND, rx.recv()).await.unwrap() {
            Some(LinkEvent::Message(m)) => got.push(m),
            Some(_) => {}
            None => panic!("link ended while the application was slow"),
        }
    }
    assert_eq!(got, (0..50).map(msg).collect::<Vec<_>>());
}

/// Regression: a link closed right after receiving left its delayed ACK
/// unsent, so the peer kept (and waited on) frames that had arrived.
#[tokio::test]
async fn graceful_close_sends_the_final_ack() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("close.sock");
    let mut ob = opts("b");
    // Only the close itself can acknowledge.
    ob.session.ack_delay = Duration::from_secs(600);
    ob.session.ack_every = 1_000;
    ob.session.probe_after = Duration::from_secs(600);
    ob.session.ping_interval = Duration::from_secs(600);
    ob.session.dead_after = Duration::from_secs(1200);
    let mut oa = opts("a");
    oa.session.probe_after = Duration::from_secs(600);
    oa.session.ping_interval = Duration::from_secs(600);
    oa.session.dead_after = Duration::from_secs(1200);
    let b = Link::spawn(
        UnixAcceptor::new(UnixListener::bind(&path).unwrap()),
        ob,
        0xB,
    );
    let a = Link::spawn(UnixConnector { path }, oa, 0xA);
    for i in 0..3 {
        a.tx.send(msg(i)).await.unwrap();
    }
    let Link { tx, mut rx, task } = b;
    let mut n = 0;
    while n < 3 {
        if let Some(LinkEvent::Message(_)) = rx.recv().await {
            n += 1;
        }
    }
    drop(tx);
    task.close().await;
    tokio::time::timeout(Duration::from_secs(10), a.tx.flush())
        .await
        .expect("the closing side did not send its final ACK")
        .unwrap();
}
