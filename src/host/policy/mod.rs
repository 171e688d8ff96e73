//! The one enforcement point for guest-originated traffic, and the policy it
//! enforces. Every message a guest sends passes the [`Enforcer`] before
//! anything else looks at it; what an instance may do is decided only from
//! host-side facts: its uuid (the channel socket's file name), the profile
//! the host assigned it, and the calls this host delivered into it.
//!
//! - [`names`]: which names a guest may use (topics, targets, methods).
//! - [`store`]: profiles and per-instance assignments, loaded and reloaded.
//! - [`enforcer`]: the per-instance decision (mode, targets, context, rates).
//! - [`handle`]: sealed reply handles (a guest answers only calls it got).
//! - [`audit`]: the JSON-lines audit log, summarised under floods.
//!
//! The threat model and every option: `docs/security.md`.

pub mod audit;
pub mod enforcer;
pub mod handle;
pub mod names;
pub mod store;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use enforcer::{Decision, Enforcer};
pub use store::{Effective, PolicyStore};

/// The name of the profile instances get when nothing assigns them one
/// (built in as `reply-only` with nothing allowed, unless the config
/// defines it).
pub const DEFAULT_PROFILE: &str = "default";

/// What a guest may originate, in the seed's four modes; each includes the
/// one before it. Host → guest casts, calls and fanouts work in every mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Only link control frames: no replies onto the broker, no casts, no
    /// calls; the guest's topic announcements are ignored (the instance's
    /// topics come from its profile). Calls from the broker are answered
    /// `Denied` by the proxy without reaching the guest; the control
    /// socket's calls (local, nothing published) still work.
    OneWay,
    /// Answers to calls delivered into this instance, and registration of
    /// the profile's topics.
    ReplyOnly,
    /// Also casts to the profile's targets.
    Cast,
    /// Also calls to the profile's targets.
    Call,
}

impl Mode {
    /// The mode's name as in config files.
    pub fn name(self) -> &'static str {
        match self {
            Self::OneWay => "one-way",
            Self::ReplyOnly => "reply-only",
            Self::Cast => "cast",
            Self::Call => "call",
        }
    }
}

/// One allowed target for guest casts and calls. Each field is a list of
/// exact names or prefixes ending in `*`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetRule {
    /// Exchanges; empty (the default): the broker's control exchange only.
    #[serde(default)]
    pub exchanges: Vec<String>,
    /// Topics (at least one).
    pub topics: Vec<String>,
    /// Servers the guest may name; empty (the default): none — the cast or
    /// call goes to the topic's shared queue.
    #[serde(default)]
    pub servers: Vec<String>,
    /// Methods (at least one; `["*"]` for any).
    pub methods: Vec<String>,
}

/// A named set of permissions; instances are assigned one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Profile {
    /// What the guest may originate.
    pub mode: Mode,
    /// Topics the guest's sub-agents may register (patterns); in `one-way`
    /// mode, the topics the instance serves (exact names).
    pub topics: Vec<String>,
    /// Where guest casts and calls may go (`cast` and `call` modes).
    pub targets: Vec<TargetRule>,
    /// Notification topics the guest may send oslo notifications to
    /// (patterns; a notification's routing key is `<topic>.<priority>`).
    /// Empty: notifications are refused. Independent of `mode`.
    pub notifications: Vec<String>,
    /// Context keys a guest may set (exact names); all others are dropped.
    pub context_keys: Vec<String>,
    /// Context the proxy stamps over whatever the guest said (for example
    /// the service user and project the control plane authorises as).
    pub static_context: Map<String, Value>,
    /// Sustained guest messages per second (token bucket rate).
    pub messages_per_sec: f64,
    /// Burst of guest messages (token bucket size).
    pub message_burst: f64,
    /// Sustained guest payload bytes per second.
    pub bytes_per_sec: f64,
    /// Burst of guest payload bytes.
    pub byte_burst: f64,
    /// Most topics the instance may register.
    pub max_topics: usize,
}

impl Default for Profile {
    fn default() -> Self {
        Self {
            mode: Mode::ReplyOnly,
            topics: vec![],
            targets: vec![],
            notifications: vec![],
            context_keys: vec![],
            static_context: Map::new(),
            messages_per_sec: 100.0,
            message_burst: 1000.0,
            bytes_per_sec: 1_000_000.0,
            byte_burst: 4_000_000.0,
            max_topics: 64,
        }
    }
}

/// Whether the proxy declares the queue of a notification on `topic`
/// (`<topic>.<priority>`) before publishing it, as oslo's notifier does:
/// only when the profile lists `<topic>` exactly. A topic allowed through a
/// pattern is published to whatever is bound (a listener declares its own
/// queue); otherwise a guest could make the proxy create queues on the
/// shared broker at will, one per name it invents.
pub fn declares_notify_queue(profile: &Profile, topic: &str) -> bool {
    topic
        .rsplit_once('.')
        .is_some_and(|(base, _)| profile.notifications.iter().any(|n| n == base))
}

/// The context key the proxy stamps with the instance uuid.
pub const IDENTITY_KEY: &str = "tether_instance";

impl Profile {
    /// Check the values; `what` names the profile in messages.
    pub fn validate(&self, what: &str) -> Result<(), String> {
        for (k, v) in [
            ("messages_per_sec", self.messages_per_sec),
            ("message_burst", self.message_burst),
            ("bytes_per_sec", self.bytes_per_sec),
            ("byte_burst", self.byte_burst),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(format!("{what}: {k} must be a positive number"));
            }
        }
        let pats = |field: &str, ps: &[String]| {
            ps.iter().try_for_each(|p| {
                if names::pattern_ok(p) {
                    Ok(())
                } else {
                    Err(format!(
                        "{what}: {field} {p:?} must be a name, or a prefix followed by one '*' at the end"
                    ))
                }
            })
        };
        pats("topics", &self.topics)?;
        pats("notifications", &self.notifications)?;
        if self.mode == Mode::OneWay {
            for t in &self.topics {
                names::check(names::NameKind::Topic, t)
                    .map_err(|e| format!("{what}: one-way topics are exact topic names: {e}"))?;
            }
        }
        for (i, r) in self.targets.iter().enumerate() {
            let w = format!("targets[{i}]");
            if r.topics.is_empty() || r.methods.is_empty() {
                return Err(format!(
                    "{what}: {w} needs topics and methods (use [\"*\"] for any)"
                ));
            }
            pats(&format!("{w}.exchanges"), &r.exchanges)?;
            pats(&format!("{w}.topics"), &r.topics)?;
            pats(&format!("{w}.servers"), &r.servers)?;
            pats(&format!("{w}.methods"), &r.methods)?;
        }
        if let Some(k) = self.context_keys.iter().find(|k| *k == IDENTITY_KEY) {
            return Err(format!(
                "{what}: context_keys may not include {k:?}: the proxy stamps it"
            ));
        }
        if self.static_context.contains_key(IDENTITY_KEY) {
            return Err(format!(
                "{what}: static_context may not set {IDENTITY_KEY:?}: the proxy stamps it"
            ));
        }
        Ok(())
    }
}

/// The `[policy]` section of the proxy's config.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PolicyConfig {
    /// The profile of instances that have no assignment file.
    pub default_profile: String,
    /// Named profiles (`[policy.profiles.<name>]`). `default` is built in
    /// (reply-only, nothing else allowed) unless defined here.
    pub profiles: BTreeMap<String, Profile>,
    /// Per-instance assignments: `<instance-uuid>.toml` files written by
    /// whoever provisions the VM (`profile = "<name>"` plus overrides).
    /// Unset: every instance gets the default profile.
    pub instances_dir: Option<PathBuf>,
    /// The audit log (JSON lines, appended; reopened on SIGHUP). Unset:
    /// audit records go to the daemon's log on target `audit`.
    pub audit_log: Option<PathBuf>,
    /// Identical audit records within this interval are written once, then
    /// summarised with their count (ms).
    pub audit_interval_ms: u64,
    /// Distinct audit records per instance per interval; beyond, only
    /// counted (in a summary record at the interval's end).
    pub audit_records_per_interval: usize,
    /// Secret files (at least 32 bytes each) that seal reply handles, so
    /// another host's proxy can accept a guest's reply after a live
    /// migration. The first seals; all are accepted (key rotation). Empty:
    /// only replies to calls pending on this proxy go out.
    pub reply_keys: Vec<PathBuf>,
}

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            default_profile: DEFAULT_PROFILE.into(),
            profiles: BTreeMap::new(),
            instances_dir: None,
            audit_log: None,
            audit_interval_ms: 10_000,
            audit_records_per_interval: 100,
            reply_keys: vec![],
        }
    }
}

impl PolicyConfig {
    /// The profiles, with the built-in `default` where not defined.
    pub fn profiles(&self) -> BTreeMap<String, Profile> {
        let mut p = self.profiles.clone();
        p.entry(DEFAULT_PROFILE.into()).or_default();
        p
    }

    /// Check the values (the key files and assignments are read by
    /// [`PolicyStore::load`]).
    pub fn validate(&self) -> Result<(), String> {
        let profiles = self.profiles();
        for (name, p) in &profiles {
            p.validate(&format!("policy.profiles.{name}"))?;
        }
        if !profiles.contains_key(&self.default_profile) {
            return Err(format!(
                "policy.default_profile {:?} is not a profile",
                self.default_profile
            ));
        }
        if self.audit_interval_ms == 0 || self.audit_records_per_interval == 0 {
            return Err(
                "policy.audit_interval_ms and audit_records_per_interval must be above 0".into(),
            );
        }
        Ok(())
    }
}

/// An instance's assignment file (`<uuid>.toml` in `instances_dir`): a
/// profile and overrides of its fields.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assignment {
    /// The profile's name.
    pub profile: String,
    /// Overrides the profile's mode.
    pub mode: Option<Mode>,
    /// Overrides the profile's topics (one-way: the topics it serves).
    pub topics: Option<Vec<String>>,
    /// Overrides the profile's targets.
    pub targets: Option<Vec<TargetRule>>,
    /// Overrides the profile's notification topics.
    pub notifications: Option<Vec<String>>,
    /// Overrides the profile's context keys.
    pub context_keys: Option<Vec<String>>,
    /// Merged over the profile's static context.
    #[serde(default)]
    pub static_context: Map<String, Value>,
}

impl Assignment {
    /// The profile `base` with these overrides.
    pub fn apply(&self, mut base: Profile) -> Profile {
        if let Some(m) = self.mode {
            base.mode = m;
        }
        if let Some(t) = &self.topics {
            base.topics = t.clone();
        }
        if let Some(t) = &self.targets {
            base.targets = t.clone();
        }
        if let Some(n) = &self.notifications {
            base.notifications = n.clone();
        }
        if let Some(k) = &self.context_keys {
            base.context_keys = k.clone();
        }
        for (k, v) in &self.static_context {
            base.static_context.insert(k.clone(), v.clone());
        }
        base
    }
}
