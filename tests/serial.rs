//! The agent over a serial line: a pseudo-terminal pair stands in for
//! /dev/ttyS1 — the agent opens the slave end, the test is the host on the
//! master end, speaking the link protocol through the same raw tty code.

mod support;

use std::fs::File;

use serde_json::json;
use support::*;
use tether::guest::port::SerialPort;
use tether::link::{Link, LinkEvent, LinkOptions};
use tether::rpc::{Kind, LinkMsg, Request, Target};

#[tokio::test]
async fn agent_serves_over_a_raw_serial_line() {
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave = nix::unistd::ttyname(&pty.slave).unwrap();
    let w = World::new();
    let sock = w.path("agent.sock");
    let cfg = w.path("agent.toml");
    // A topic nobody serves is refused after a 1 s grace (default 60 s).
    std::fs::write(
        &cfg,
        format!(
            "port = \"serial:{}\"\nsubagent_socket = {:?}\nstate_dir = {:?}\nunserved_grace_ms = 1000\n",
            slave.display(),
            sock,
            w.path("state")
        ),
    )
    .unwrap();
    let _agent = spawn("agent", AGENT, &["-c", cfg.to_str().unwrap()], w.dir.path());
    let host = SerialPort::from_file(File::from(pty.master)).unwrap();
    let Link { tx, mut rx, task } = Link::spawn(host, LinkOptions::default(), 42);
    // Our copy of the slave stays open so the master never sees a hang-up.
    let _slave = pty.slave;

    let call = |method: &str, topic: &str, id: &str| {
        LinkMsg::Req(Request {
            kind: Kind::Call,
            target: Target {
                topic: topic.into(),
                ..Default::default()
            },
            method: method.into(),
            args: json!({}),
            ctx: json!({}),
            msg_id: Some(id.into()),
            unique_id: id.into(),
            reply_to: None,
            timeout_ms: Some(10_000),
        })
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
    task.close().await;
}
