//! A sub-agent written with the Rust client API (`tether::client`). It runs
//! where Python does not (the test VM's initramfs links it statically).
//!
//! Topics from `$SUBAGENT_TOPICS` (comma-separated, default `demo`). Methods:
//! `echo` (returns its args), `add` (a + b), `record` (cast: counts it, once
//! per delivery), `count` (how many `record` casts were handled), `fail`
//! (raises `ValueError`), `sleep` (waits `ms` milliseconds, then returns its
//! args: a call still running while a VM migrates).

use serde_json::{Value, json};
use tether::client::SubAgent;
use tether::rpc::Failure;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let topics = std::env::var("SUBAGENT_TOPICS").unwrap_or_else(|_| "demo".into());
    let topics: Vec<&str> = topics.split(',').filter(|t| !t.is_empty()).collect();
    let name = std::env::var("TETHER_SUBAGENT_NAME").unwrap_or_else(|_| "echo".into());
    let mut sa = SubAgent::connect_default(&name, &topics).await?;
    let mut recorded = 0u64;
    while let Some(r) = sa.next_request().await? {
        let res = match r.method.as_str() {
            "echo" => Ok(r.args.clone()),
            "add" => {
                let n = |k: &str| r.args.get(k).and_then(Value::as_i64).unwrap_or(0);
                Ok(json!(n("a") + n("b")))
            }
            "record" => {
                recorded += 1;
                Ok(Value::Null)
            }
            "count" => Ok(json!(recorded)),
            "sleep" => {
                let ms = r.args.get("ms").and_then(Value::as_u64).unwrap_or(0);
                tokio::time::sleep(std::time::Duration::from_millis(ms.min(60_000))).await;
                Ok(r.args.clone())
            }
            "fail" => Err(Failure {
                class: "ValueError".into(),
                module: "builtins".into(),
                message: r
                    .args
                    .get("message")
                    .and_then(Value::as_str)
                    .unwrap_or("failed")
                    .into(),
            }),
            other => Err(Failure {
                class: "NotImplementedError".into(),
                module: "builtins".into(),
                message: format!("no method {other:?}"),
            }),
        };
        if r.is_call() {
            sa.reply(r.id, res).await?;
        }
    }
    Ok(())
}
