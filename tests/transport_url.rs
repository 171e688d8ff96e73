//! `transport_url` read as oslo.messaging reads it: each case (oslo's own
//! URL tests, and the ones a deployment meets) parsed by the venv's real
//! oslo.messaging and by tether, and compared.

mod support;

use std::io::Write;
use std::process::{Command, Stdio};

use serde_json::{Value, json};
use support::oslo::oslo_python;
use tether::host::broker::url::TransportUrl;

/// oslo.messaging's `tests/test_urls.py` cases (its scheme `foo:` made
/// `rabbit:`), and more.
const CASES: &[&str] = &[
    "rabbit:",
    "rabbit:////",
    "rabbit:///bar",
    "rabbit://host/bar",
    "rabbit://[ffff::1]/bar",
    "rabbit://host:1234/bar",
    "rabbit://[ffff::1]:1234/bar",
    "rabbit://u@host:1234/bar",
    "rabbit://u:p@host:1234/bar",
    "rabbit://u:p@/bar",
    "rabbit://u:p@host1:1234,host2:4321/bar",
    "rabbit://u:p@host1,host2/bar",
    "rabbit://u1:p1@host1:1234,u2:p2@host2:4321/bar",
    "rabbit://u1:p1@[ffff::1]:1234,u2:p2@[ffff::2]:4321/bar",
    "rabbit://u%24:p%26@host:1234/%24",
    // A vhost with a slash, percent-encoded (was encoded twice).
    "rabbit://u:p@h/%2Fnova",
    "rabbit://u:p@h/%2F",
    "rabbit://u:p@h/",
    "rabbit://u:p@h",
    // Empty hosts are skipped (were refused).
    "rabbit://u:p@h1:5672,,u:p@h2:5672,/",
    "rabbit://,/",
    // An unbracketed IPv6 address has no port.
    "rabbit://u:p@ffff::1/x",
    // Passwords with reserved characters, percent-encoded.
    "rabbit://nova:s%40cr%3At%2F%3F@rabbit.example:5671/nova",
    // The query: repeated keys, blank values, +, escapes, a fragment.
    "rabbit://h/v?ssl=1&a=1&a=2&blank=&novalue&plus=x+y%21#frag",
    "rabbit://h/v;params?q=1",
    // Refused by both.
    "rabbit://h:port/",
    "rabbit://h:/",
    "rabbit://[ffff::1/",
    "no scheme",
];

#[test]
fn transport_urls_parse_as_oslo_messaging_parses_them() {
    let mut py = Command::new(oslo_python())
        .arg(format!(
            "{}/tests/oslo/parse_urls.py",
            env!("CARGO_MANIFEST_DIR")
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    py.stdin
        .take()
        .unwrap()
        .write_all(json!(CASES).to_string().as_bytes())
        .unwrap();
    let out = py.wait_with_output().unwrap();
    assert!(out.status.success(), "the oslo side failed");
    let oslo: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(oslo.len(), CASES.len());
    for (url, want) in CASES.iter().zip(&oslo) {
        let ours = TransportUrl::parse(url);
        match (want.get("error"), ours) {
            (Some(_), Err(_)) => {}
            (Some(e), Ok(u)) => panic!("{url}: oslo refuses it ({e}), tether reads {u:?}"),
            (None, Err(e)) => panic!("{url}: oslo reads {want}, tether refuses it: {e}"),
            (None, Ok(u)) => assert_eq!(&serde_json::to_value(&u).unwrap(), want, "{url}"),
        }
    }
}

/// The vhost `/` written `%2F` reaches RabbitMQ's default vhost (it was
/// encoded twice, a vhost nobody has), with a query option oslo reads
/// honoured; an option tether does not honour stops the proxy with a clear
/// message, before it listens.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_broker_by_an_oslo_url_and_an_option_tether_cannot_honour() {
    use support::oslo::{amqp_url, broker_status_until};
    use support::*;
    let base = amqp_url();
    let base = base.trim_end_matches('/');
    let w = World::new();
    let _proxy = w.proxy(&format!(
        "[broker]\ntransport_url = \"{base}/%2F?rabbit_qos_prefetch_count=5&rabbit_retry_interval=1\"\n"
    ));
    let mut ctl = w.ctl().await;
    let b = broker_status_until(&mut ctl, "a connection to vhost /", |v| {
        v["connected"] == true
    })
    .await;
    assert!(
        !b["broker"].as_str().unwrap().contains("guest:guest"),
        "{b}"
    );

    let cfg = w.path("refused.toml");
    std::fs::write(
        &cfg,
        format!("[broker]\ntransport_url = \"{base}/?heartbeat_rate=3\"\n"),
    )
    .unwrap();
    for args in [
        vec!["--check-config", "-c", cfg.to_str().unwrap()],
        vec!["-c", cfg.to_str().unwrap()],
    ] {
        let out = Command::new(PROXY).args(&args).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?}");
        assert!(
            err.contains("\"heartbeat_rate\" is not one tether-proxy honours"),
            "{args:?}: {err}"
        );
    }
}
