//! The agent over a serial line: a pseudo-terminal pair stands in for
//! /dev/ttyS1 — the agent opens the slave end by its path (through
//! tokio-serial: raw, the configured baud rate, an exclusive open), the test
//! is the host on the master end, speaking the link protocol.

mod support;

use serde_json::json;
use support::*;
use tether::guest::serial::SerialPort;
use tether::link::{Link, LinkEvent, LinkOptions};
use tether::rpc::LinkMsg;
use tokio_serial::SerialPort as _;

#[tokio::test]
async fn agent_serves_over_a_raw_serial_line() {
    let (master, slave) = tokio_serial::SerialStream::pair().unwrap();
    let slave_path = slave.name().expect("the pty's slave path");
    let w = World::new();
    let cfg = |name: &str| {
        let cfg = w.path(&format!("{name}.toml"));
        // A topic nobody serves is refused after a 1 s grace (default 60 s).
        std::fs::write(
            &cfg,
            format!(
                "port = \"serial:{slave_path}\"\nsubagent_socket = {:?}\nstate_dir = {:?}\nunserved_grace_ms = 1000\n\
                 [serial]\nbaud_rate = 57600\n",
                w.path(&format!("{name}.sock")),
                w.path(&format!("{name}-state"))
            ),
        )
        .unwrap();
        cfg
    };
    let agent_cfg = cfg("agent");
    let _agent = spawn(
        "agent",
        AGENT,
        &["-c", agent_cfg.to_str().unwrap()],
        w.dir.path(),
    );
    let host = SerialPort::from_stream(master);
    let Link { tx, mut rx, task } = Link::spawn(host, LinkOptions::default(), 42);
    // Our copy of the slave stays open so the master never sees a hang-up.
    let slave = slave;

    let call = |method: &str, topic: &str, id: &str| {
        LinkMsg::Req(support::guest::call_request(
            topic,
            method,
            json!({}),
            id,
            10_000,
        ))
    };
    tx.send(call("list", "tether.supervisor", "m1").to_bytes())
        .await
        .unwrap();
    tx.send(call("x", "nobody", "m2").to_bytes()).await.unwrap();
    // One bound for the whole exchange. Regression: the master fd from
    // openpty was blocking, a read stalled the runtime, and the exchange took
    // minutes while each single wait stayed under its own bound.
    let mut replies = vec![];
    tokio::time::timeout(BOUND, async {
        while replies.len() < 2 {
            match rx.recv().await {
                Some(LinkEvent::Message(b)) => {
                    if let LinkMsg::Rep(r) = LinkMsg::from_bytes(&b).unwrap() {
                        replies.push(r);
                    }
                }
                Some(_) => {}
                None => panic!("link ended"),
            }
        }
    })
    .await
    .expect("no replies over the serial line");
    replies.sort_by(|a, b| a.msg_id.cmp(&b.msg_id));
    assert_eq!(
        replies[0].result,
        Some(json!([])),
        "the supervisor lists no sub-agents"
    );
    assert_eq!(replies[1].failure.as_ref().unwrap().class, "NoSuchTopic");

    // The line runs at the configured rate (termios2's speed: the rate is
    // set as a number, which the old termios calls, and stty, show as 0).
    assert_eq!(slave.baud_rate().unwrap(), 57600);
    // The agent holds the line exclusively: a second agent on it stops at
    // once and says why, and the first one keeps serving.
    let second_cfg = cfg("second");
    let out = tokio::time::timeout(
        BOUND,
        tokio::process::Command::new(AGENT)
            .args(["-c", second_cfg.to_str().unwrap()])
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("the second agent stopped")
    .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is in use by another process"), "{err}");
    tx.send(call("list", "tether.supervisor", "m3").to_bytes())
        .await
        .unwrap();
    tokio::time::timeout(BOUND, async {
        loop {
            match rx.recv().await {
                Some(LinkEvent::Message(b)) => {
                    if let LinkMsg::Rep(r) = LinkMsg::from_bytes(&b).unwrap()
                        && r.msg_id == "m3"
                    {
                        return;
                    }
                }
                Some(_) => {}
                None => panic!("link ended"),
            }
        }
    })
    .await
    .expect("the first agent still serves");
    task.close().await;
}
