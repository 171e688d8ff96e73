//! A sub-agent written with the Rust client API (`tether::client`). It runs
//! where Python does not (the test VM's initramfs links it statically).
//!
//! Topics from `$SUBAGENT_TOPICS` (comma-separated, default `demo`). Methods:
//! `echo` (returns its args), `add` (a + b), `record` (cast: counts it, once
//! per delivery, and notes its `i` argument), `count` (how many `record`
//! casts were handled), `tally` (`{handled, distinct}`: handled `record`s and
//! distinct `i`s among them; both equal to N for ids 0..N means each
//! exactly once), `fail`
//! (raises `ValueError`), `sleep` (waits `ms` milliseconds, then returns its
//! args), `hold` (a call answered only at the next `release`, with its own
//! args: a call still running while a VM migrates, for as long as the test
//! needs, not for a time it guesses), `held` (how many calls are held) and
//! `release` (answers every held call; returns how many).
//!
//! With `$ECHO_RECORD` (a file path) it registers with `ack` and keeps its
//! `record`s in that file, one line per request unique id: a restarted
//! echo (the agent or the supervisor restarted it) reads it back, handles a
//! request it had recorded but not confirmed once only, and counts on from
//! there. A cast is confirmed (`took`) once recorded; a call as it starts.

use std::collections::HashSet;
use std::io::{BufRead, Write};

use serde_json::{Value, json};
use tether::client::SubAgent;
use tether::rpc::Failure;

#[tokio::main(flavor = "current_thread")]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let topics = std::env::var("SUBAGENT_TOPICS").unwrap_or_else(|_| "demo".into());
    let topics: Vec<&str> = topics.split(',').filter(|t| !t.is_empty()).collect();
    let name = std::env::var("TETHER_SUBAGENT_NAME").unwrap_or_else(|_| "echo".into());
    /// Distinct `i`s remembered, at most (a test streams far fewer; the
    /// bound keeps a long-running demo's memory flat).
    const MAX_DISTINCT: usize = 1 << 20;
    let mut recorded = 0u64;
    let mut distinct: HashSet<u64> = HashSet::new();
    let mut uids: HashSet<String> = HashSet::new();
    let record_file = std::env::var_os("ECHO_RECORD").map(std::path::PathBuf::from);
    let mut sa = match &record_file {
        Some(path) => {
            if let Ok(f) = std::fs::File::open(path) {
                for line in std::io::BufReader::new(f).lines().map_while(Result::ok) {
                    // A line cut by a kill is skipped.
                    let Ok(v) = serde_json::from_str::<Value>(&line) else {
                        continue;
                    };
                    recorded += 1;
                    if let Some(i) = v.get("i").and_then(Value::as_u64) {
                        distinct.insert(i);
                    }
                    if let Some(u) = v.get("uid").and_then(Value::as_str) {
                        uids.insert(u.to_string());
                    }
                }
            }
            SubAgent::connect_default_ack(&name, &topics).await?
        }
        None => SubAgent::connect_default(&name, &topics).await?,
    };
    /// Calls `hold` keeps at once, at most (more are refused).
    const MAX_HELD: usize = 64;
    let mut held: Vec<(u64, Value)> = Vec::new();
    let mut out = match &record_file {
        Some(p) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)?,
        ),
        None => None,
    };
    while let Some(r) = sa.next_request().await? {
        let acking = out.is_some();
        if acking && r.is_call() {
            sa.took(r.id).await?;
        }
        let res = match r.method.as_str() {
            "echo" => Ok(r.args.clone()),
            "add" => {
                let n = |k: &str| r.args.get(k).and_then(Value::as_i64).unwrap_or(0);
                Ok(json!(n("a") + n("b")))
            }
            "record" if uids.contains(&r.unique_id) => Ok(Value::Null),
            "record" => {
                let i = r.args.get("i").and_then(Value::as_u64);
                if let Some(f) = out.as_mut() {
                    // One write of one line: a kill leaves it whole or absent.
                    let line = json!({"i": i, "uid": r.unique_id}).to_string() + "\n";
                    f.write_all(line.as_bytes())?;
                    uids.insert(r.unique_id.clone());
                }
                recorded += 1;
                if let Some(i) = i
                    && distinct.len() < MAX_DISTINCT
                {
                    distinct.insert(i);
                }
                Ok(Value::Null)
            }
            "count" => Ok(json!(recorded)),
            "tally" => Ok(json!({"handled": recorded, "distinct": distinct.len()})),
            "sleep" => {
                let ms = r.args.get("ms").and_then(Value::as_u64).unwrap_or(0);
                tokio::time::sleep(std::time::Duration::from_millis(ms.min(60_000))).await;
                Ok(r.args.clone())
            }
            "hold" if r.is_call() && held.len() < MAX_HELD => {
                held.push((r.id, r.args.clone()));
                continue; // answered at the next release
            }
            "hold" => Err(Failure {
                class: "ValueError".into(),
                module: "builtins".into(),
                message: format!("hold: calls only, at most {MAX_HELD} at once"),
            }),
            "held" => Ok(json!(held.len())),
            "release" => {
                let n = held.len();
                for (id, args) in held.drain(..) {
                    sa.reply(id, Ok(args)).await?;
                }
                Ok(json!(n))
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
        } else if acking {
            sa.took(r.id).await?;
        }
    }
    Ok(())
}
