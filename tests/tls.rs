//! TLS to RabbitMQ: the test broker's TLS listener (it wants a client
//! certificate; certificates made by `scripts/broker`), the proxy with
//! oslo's ssl options, the real Python oslo client over TLS too — and the
//! ways it goes wrong, each said clearly.

mod support;

use std::path::PathBuf;
use std::process::Command;

use serde_json::{Value, json};
use support::oslo::*;
use support::*;

/// The broker's TLS port and its certificates' directory.
fn tls_info() -> (u16, PathBuf) {
    let out = Command::new(format!("{}/scripts/broker", env!("CARGO_MANIFEST_DIR")))
        .arg("tls")
        .output()
        .expect("scripts/broker");
    let text = String::from_utf8_lossy(&out.stdout);
    let (port, dir) = text
        .trim()
        .split_once(' ')
        .unwrap_or_else(|| panic!("scripts/broker tls said {text:?}"));
    let dir = PathBuf::from(dir);
    assert!(
        dir.join("ca.pem").exists(),
        "{} has no certificates: start the broker with scripts/broker start",
        dir.display()
    );
    (port.parse().unwrap(), dir)
}

/// A proxy's `[broker]` section for `url` with `tls` lines.
fn section(url: &str, ex: &str, tls: &str) -> String {
    format!("{}{tls}", broker_section(url, ex))
}

/// Wait (bounded) until the proxy says why it cannot connect, and that
/// reason contains `says`.
async fn refused(w: &World, says: &str) -> Value {
    let mut ctl = w.ctl().await;
    broker_status_until(&mut ctl, &format!("a refusal saying {says:?}"), |v| {
        v["connected"] == false && v["last_error"].as_str().is_some_and(|e| e.contains(says))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oslo_over_tls_through_tether_and_every_tls_mistake_said_clearly() {
    let (port, dir) = tls_info();
    let tls_url = format!("rabbit://guest:guest@127.0.0.1:{port}/");
    let file = |f: &str| dir.join(f).display().to_string();
    let ex = unique("ex");
    let topic = unique("tls");

    // The proxy over TLS, with its client certificate, and the Python
    // client over TLS (oslo's options in the URL): a call and a cast
    // through tether to the guest's sub-agent.
    let w = World::new();
    let _proxy = w.proxy(&section(
        &tls_url,
        &ex,
        &format!(
            "ssl = true\nssl_ca_file = {:?}\nssl_cert_file = {:?}\nssl_key_file = {:?}\n",
            file("ca.pem"),
            file("client.pem"),
            file("client.key")
        ),
    ));
    let u = uuid(701);
    let _a = w.agent(&u, &w.channels().join(format!("{u}.sock")), &topic, "");
    let py_url = format!(
        "{tls_url}?ssl=true&ssl_ca_file={}&ssl_cert_file={}&ssl_key_file={}",
        file("ca.pem"),
        file("client.pem"),
        file("client.key")
    );
    let mut c = OsloClient::start(&py_url, &ex);
    served(&mut c, &topic, &u).await;
    let v = c
        .op(json!({"op": "call", "topic": topic, "server": u, "method": "add", "args": {"a": 40, "b": 2}}))
        .await;
    assert_eq!(v, json!({"ok": true, "result": 42}));
    assert_eq!(
        c.op(
            json!({"op": "cast", "topic": topic, "server": u, "method": "record", "args": {"i": 0}})
        )
        .await["ok"],
        true
    );
    recorded_exactly_once(&w, &u, 1, BOUND).await;
    let mut ctl = w.ctl().await;
    let b = broker_status(&mut ctl).await;
    assert!(b["broker"].as_str().unwrap().starts_with("amqps://"), "{b}");

    // The same transport URL with oslo's options in its query does too.
    let w2 = World::new();
    let _p2 = w2.proxy(&section(&py_url, &unique("ex"), ""));
    let mut ctl2 = w2.ctl().await;
    broker_status_until(&mut ctl2, "a TLS connection by the URL's options", |v| {
        v["connected"] == true
    })
    .await;

    // A CA that did not sign the broker's certificate.
    let w3 = World::new();
    let _p3 = w3.proxy(&section(
        &tls_url,
        &unique("ex"),
        &format!(
            "ssl = true\nssl_ca_file = {:?}\nssl_cert_file = {:?}\nssl_key_file = {:?}\n",
            file("other-ca.pem"),
            file("client.pem"),
            file("client.key")
        ),
    ));
    let v = refused(&w3, "the broker's certificate was not accepted").await;
    assert!(
        v["last_error"].as_str().unwrap().contains("ssl_ca_file"),
        "{v}"
    );

    // No client certificate, to a broker that wants one.
    let w4 = World::new();
    let _p4 = w4.proxy(&section(
        &tls_url,
        &unique("ex"),
        &format!("ssl = true\nssl_ca_file = {:?}\n", file("ca.pem")),
    ));
    refused(&w4, "ssl_cert_file").await;

    // Plain AMQP to the TLS port.
    let w5 = World::new();
    let _p5 = w5.proxy(&section(&tls_url, &unique("ex"), ""));
    refused(&w5, "set broker.ssl = true").await;
}
