//! The audit log: one JSON line per guest-originated decision, allowed or
//! denied, in a file of its own (or the daemon's log on target `audit`).
//!
//! A flood cannot fill the disk: within an interval
//! (`policy.audit_interval_ms`) a record identical to one already written
//! (same instance, kind, target, decision and reason) is only counted, and
//! each instance writes at most `policy.audit_records_per_interval`
//! distinct records; at the interval's end a `summary` record gives the
//! counts. So the log grows by at most (2 × that cap + 1) lines per
//! instance per interval, whatever the guest sends.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::lock;

/// Guest strings in records are cut to this many characters (names that
/// pass the checks are at most 255 bytes; refused ones may be anything).
const MAX_FIELD_CHARS: usize = 256;

/// One decision.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize)]
pub struct Record {
    /// The instance (host-side identity; shared, not copied per record).
    pub instance: Arc<str>,
    /// Its profile.
    pub profile: Arc<str>,
    /// What the guest sent: `cast`, `call`, `reply`, `topics`,
    /// `malformed`, ...
    pub kind: &'static str,
    /// Target exchange, topic, server, method (as the guest sent them, cut).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub exchange: Option<String>,
    /// Target topic, or the topics registered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub topic: Option<String>,
    /// Target server.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// Method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// The request's unique id, where the record is about one request.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unique_id: Option<String>,
    /// `allow`, `deny` or `ignore`.
    pub decision: &'static str,
    /// Why (always set for denials).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// A guest string for a record: cut to 256 characters.
pub fn clip(s: &str) -> String {
    if s.chars().count() <= MAX_FIELD_CHARS {
        s.to_string()
    } else {
        let head: String = s.chars().take(MAX_FIELD_CHARS).collect();
        format!("{head}… ({} bytes)", s.len())
    }
}

struct Seen {
    count: u64,
    bytes: u64,
}

struct Inner {
    path: Option<PathBuf>,
    file: Option<std::fs::File>,
    since: Instant,
    /// Keyed by the whole record, hashed once per guest message: foldhash
    /// (seeded per process) rather than std's SipHash, about 4% of the
    /// proxy's CPU under a flood of denied casts. The map holds at most
    /// `cap` records per instance per interval, so even a guest that found
    /// colliding names would make its own lookups slower, no one else's
    /// much.
    seen: HashMap<Record, Seen, foldhash::fast::RandomState>,
    /// Per instance: distinct records written, and records only counted.
    per_instance: HashMap<Arc<str>, (usize, u64)>,
    write_failed: bool,
}

/// The audit sink, shared by every instance.
pub struct Audit {
    interval: Duration,
    cap: usize,
    inner: Mutex<Inner>,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Audit({:?})", lock(&self.inner).path)
    }
}

fn open(path: &PathBuf) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)
}

impl Audit {
    /// Audit into `path` (or the log); fails if the file cannot be opened.
    pub fn new(path: Option<PathBuf>, interval: Duration, cap: usize) -> std::io::Result<Self> {
        let file = path.as_ref().map(open).transpose()?;
        Ok(Self {
            interval,
            cap,
            inner: Mutex::new(Inner {
                path,
                file,
                since: Instant::now(),
                seen: HashMap::default(),
                per_instance: HashMap::new(),
                write_failed: false,
            }),
        })
    }

    /// Reopen the file (after logrotate moved it: SIGHUP).
    pub fn reopen(&self) -> std::io::Result<()> {
        let mut g = lock(&self.inner);
        if let Some(p) = g.path.clone() {
            g.file = Some(open(&p)?);
            g.write_failed = false;
        }
        Ok(())
    }

    /// Record one decision about a guest message of `bytes` bytes.
    pub fn record(&self, r: Record, bytes: usize) {
        self.record_at(r, bytes, Instant::now())
    }

    /// [`Self::record`] as of `now`.
    fn record_at(&self, r: Record, bytes: usize, now: Instant) {
        let mut g = lock(&self.inner);
        self.roll(&mut g, now);
        if let Some(s) = g.seen.get_mut(&r) {
            s.count = s.count.saturating_add(1);
            s.bytes = s.bytes.saturating_add(bytes as u64);
            return;
        }
        let cap = self.cap;
        let e = g.per_instance.entry(r.instance.clone()).or_insert((0, 0));
        if e.0 >= cap {
            e.1 = e.1.saturating_add(1);
            return;
        }
        e.0 += 1;
        let mut v = serde_json::to_value(&r).unwrap_or(Value::Null);
        if let Value::Object(m) = &mut v {
            m.insert("bytes".into(), json!(bytes));
        }
        Self::write(&mut g, v);
        g.seen.insert(r, Seen { count: 0, bytes: 0 });
    }

    /// Write the summaries of an interval that has ended (called
    /// periodically, so a flood that stops is still summarised).
    pub fn tick(&self) {
        self.tick_at(Instant::now())
    }

    fn tick_at(&self, now: Instant) {
        let mut g = lock(&self.inner);
        self.roll(&mut g, now);
    }

    fn roll(&self, g: &mut Inner, now: Instant) {
        if now.saturating_duration_since(g.since) < self.interval {
            return;
        }
        let interval_ms = self.interval.as_millis() as u64;
        let seen = std::mem::take(&mut g.seen);
        for (r, s) in seen.into_iter().filter(|(_, s)| s.count > 0) {
            let mut v = serde_json::to_value(&r).unwrap_or(Value::Null);
            if let Value::Object(m) = &mut v {
                m.insert("summary".into(), json!(true));
                m.insert("repeated".into(), json!(s.count));
                m.insert("bytes".into(), json!(s.bytes));
                m.insert("interval_ms".into(), json!(interval_ms));
            }
            Self::write(g, v);
        }
        let per = std::mem::take(&mut g.per_instance);
        for (instance, (_, over)) in per.into_iter().filter(|(_, (_, o))| *o > 0) {
            Self::write(
                g,
                json!({
                    "instance": instance,
                    "kind": "overflow",
                    "summary": true,
                    "decision": "counted",
                    "repeated": over,
                    "interval_ms": interval_ms,
                    "reason": format!("more than {} distinct records in the interval", self.cap),
                }),
            );
        }
        g.since = now;
    }

    fn write(g: &mut Inner, mut v: Value) {
        if let Value::Object(m) = &mut v {
            m.insert("time".into(), json!(rfc3339_now()));
        }
        let line = v.to_string();
        match g.file.as_mut() {
            Some(f) => {
                let res = f.write_all(format!("{line}\n").as_bytes());
                match (res, g.write_failed) {
                    (Err(e), false) => {
                        g.write_failed = true;
                        warn!(path = ?g.path, error = %e, "cannot write the audit log");
                    }
                    (Ok(()), true) => g.write_failed = false,
                    _ => {}
                }
            }
            None => info!(target: "audit", "{line}"),
        }
    }
}

/// The time now as RFC 3339 UTC with milliseconds.
fn rfc3339_now() -> String {
    let ms = crate::unix_ms();
    let (secs, milli) = (ms / 1000, ms % 1000);
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (h, m, s) = (rem / 3600, rem % 3600 / 60, rem % 60);
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(i: &str, method: &str) -> Record {
        Record {
            instance: i.into(),
            profile: "p".into(),
            kind: "cast",
            method: Some(method.into()),
            decision: "deny",
            reason: Some("r".into()),
            ..Default::default()
        }
    }

    fn lines(p: &std::path::Path) -> Vec<Value> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    #[test]
    fn a_flood_is_summarised_and_bounded() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("a/audit.jsonl");
        // Time is given, not read: the records all fall in one interval
        // however long a busy machine takes to write them.
        let interval = Duration::from_secs(60);
        let t0 = Instant::now();
        // Its interval starts at t0 or just after.
        let a = Audit::new(Some(p.clone()), interval, 3).unwrap();
        for _ in 0..10_000 {
            a.record_at(rec("i1", "same"), 10, t0);
        }
        for n in 0..1000 {
            a.record_at(rec("i1", &format!("m{n}")), 10, t0);
        }
        a.record_at(rec("i2", "x\n\u{1b}[2J"), 1, t0);
        assert_eq!(lines(&p).len(), 4, "3 distinct for i1, 1 for i2");
        a.tick_at(t0 + interval - Duration::from_millis(1));
        assert_eq!(lines(&p).len(), 4, "the interval is not over yet");
        a.tick_at(t0 + interval * 2);
        let l = lines(&p);
        assert_eq!(l.len(), 6, "{l:?}");
        let sum = l.iter().find(|v| v["repeated"] == 9_999).expect("summary");
        assert_eq!(sum["summary"], true);
        assert_eq!(sum["bytes"], 99_990);
        let over = l
            .iter()
            .find(|v| v["kind"] == "overflow")
            .expect("overflow");
        assert_eq!(over["repeated"], 998);
        assert!(
            l.iter().any(|v| v["method"] == "x\n\u{1b}[2J"),
            "escaped by JSON"
        );
        assert!(
            std::fs::read_to_string(&p)
                .unwrap()
                .lines()
                .all(|l| !l.contains('\u{1b}'))
        );
        assert!(l[0]["time"].as_str().unwrap().ends_with('Z'));
    }

    #[test]
    fn reopen_follows_logrotate() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("audit.jsonl");
        let a = Audit::new(Some(p.clone()), Duration::from_secs(60), 10).unwrap();
        a.record(rec("i", "a"), 1);
        std::fs::rename(&p, d.path().join("audit.jsonl.1")).unwrap();
        a.reopen().unwrap();
        a.record(rec("i", "b"), 1);
        assert_eq!(lines(&p).len(), 1);
        assert_eq!(lines(&d.path().join("audit.jsonl.1")).len(), 1);
    }

    #[test]
    fn the_date_is_right() {
        let s = rfc3339_now();
        assert!(s.starts_with("20") && s.len() == 24, "{s}");
        assert_eq!(&s[4..5], "-");
    }
}
