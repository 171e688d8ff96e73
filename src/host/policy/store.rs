//! Profiles and per-instance assignments: what each instance may do.
//!
//! The proxy's config names profiles; whoever provisions a VM writes
//! `<instance-uuid>.toml` into `policy.instances_dir` (a profile name and
//! overrides). An instance's policy is read when its channel appears and
//! again on every reload (SIGHUP), so provisioning need not signal the
//! proxy for a new VM. A bad assignment is refused with a clear error: a
//! running instance keeps the policy it had; a new one gets the
//! fail-closed policy (`one-way`, nothing served) until it is fixed.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use super::audit::Audit;
use super::handle::{KeyError, Sealer};
use super::{Assignment, Mode, PolicyConfig, Profile};
use crate::lock;

/// Why a policy cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A reply key file.
    #[error("reply key")]
    Key(#[from] KeyError),
    /// An assignment file is unreadable, not TOML of the right shape, names
    /// no profile, or gives values out of range.
    #[error("instance policy {path}: {message}")]
    Assignment {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The instances directory cannot be listed.
    #[error("cannot list the instance policy directory {path}")]
    ReadDir {
        /// The directory.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The audit log cannot be opened.
    #[error("cannot open the audit log {path}")]
    AuditLog {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Where an instance's policy came from.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "from")]
pub enum Source {
    /// No assignment file: the default profile.
    Default,
    /// Its assignment file.
    File {
        /// The file.
        path: PathBuf,
    },
    /// Its assignment file was bad when the instance appeared: nothing is
    /// allowed until it is fixed (then reload).
    FailedClosed {
        /// Why.
        error: String,
    },
}

/// One instance's policy, as enforced.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Effective {
    /// The instance.
    pub instance: String,
    /// The profile's name.
    pub profile_name: Arc<str>,
    /// Where it came from.
    pub source: Source,
    /// The profile with the assignment's overrides.
    pub profile: Profile,
    /// The control exchange (the exchange target rules default to).
    pub control_exchange: String,
    /// Whether reply handles are sealed (migration-proof replies).
    pub reply_handles: bool,
}

/// Profiles, keys and where assignments live; replaced whole on reload.
#[derive(Debug)]
pub struct PolicyStore {
    cfg: PolicyConfig,
    profiles: BTreeMap<String, Profile>,
    control_exchange: String,
    /// Seals and opens reply handles.
    pub sealer: Sealer,
}

impl PolicyStore {
    /// The store for a validated `[policy]` section; reads the key files.
    pub fn load(cfg: &PolicyConfig, control_exchange: &str) -> Result<Self, PolicyError> {
        Ok(Self {
            profiles: cfg.profiles(),
            cfg: cfg.clone(),
            control_exchange: control_exchange.into(),
            sealer: Sealer::load(&cfg.reply_keys)?,
        })
    }

    /// The `[policy]` section it came from.
    pub fn config(&self) -> &PolicyConfig {
        &self.cfg
    }

    fn assignment_path(&self, instance: &str) -> Option<PathBuf> {
        self.cfg
            .instances_dir
            .as_ref()
            .map(|d| d.join(format!("{instance}.toml")))
    }

    fn effective_with(&self, instance: &str, name: &str, p: Profile, source: Source) -> Effective {
        Effective {
            instance: instance.into(),
            profile_name: name.into(),
            source,
            profile: p,
            control_exchange: self.control_exchange.clone(),
            reply_handles: self.sealer.enabled(),
        }
    }

    /// The policy of `instance`, from its assignment file if it has one.
    pub fn effective(&self, instance: &str) -> Result<Effective, PolicyError> {
        let default = || {
            let name = &self.cfg.default_profile;
            let p = self.profiles.get(name).cloned().unwrap_or_default();
            self.effective_with(instance, name, p, Source::Default)
        };
        let Some(path) = self.assignment_path(instance) else {
            return Ok(default());
        };
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(default()),
            Err(e) => {
                return Err(PolicyError::Assignment {
                    path,
                    message: format!("cannot read it: {e}"),
                });
            }
        };
        let (name, p) = self.parse_assignment(&text, &path)?;
        Ok(self.effective_with(instance, &name, p, Source::File { path }))
    }

    fn parse_assignment(&self, text: &str, path: &Path) -> Result<(String, Profile), PolicyError> {
        let bad = |message: String| PolicyError::Assignment {
            path: path.into(),
            message,
        };
        let a: Assignment = toml::from_str(text).map_err(|e| bad(e.to_string()))?;
        let base = self.profiles.get(&a.profile).cloned().ok_or_else(|| {
            bad(format!(
                "profile {:?} is not defined (profiles: {})",
                a.profile,
                self.profiles.keys().cloned().collect::<Vec<_>>().join(", ")
            ))
        })?;
        let p = a.apply(base);
        p.validate("the assignment").map_err(bad)?;
        Ok((a.profile, p))
    }

    /// The fail-closed policy of an instance whose assignment is bad.
    pub fn fail_closed(&self, instance: &str, e: &PolicyError) -> Effective {
        let p = Profile {
            mode: Mode::OneWay,
            ..Profile::default()
        };
        let source = Source::FailedClosed {
            error: crate::error_chain(e),
        };
        self.effective_with(instance, "(fail-closed)", p, source)
    }

    /// Check every assignment file in the instances directory (for
    /// `--check-config`); how many there are.
    pub fn check_all(&self) -> Result<usize, PolicyError> {
        let Some(dir) = &self.cfg.instances_dir else {
            return Ok(0);
        };
        let rd = match std::fs::read_dir(dir) {
            Ok(rd) => rd,
            // Provisioning creates it with the first VM.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(source) => {
                return Err(PolicyError::ReadDir {
                    path: dir.clone(),
                    source,
                });
            }
        };
        let mut n = 0;
        for e in rd.flatten() {
            let path = e.path();
            let Some(stem) = path
                .file_name()
                .and_then(|f| f.to_str())
                .and_then(|f| f.strip_suffix(".toml"))
            else {
                continue;
            };
            if !crate::host::channels::is_uuid(stem) {
                return Err(PolicyError::Assignment {
                    path,
                    message: "the file name must be <instance-uuid>.toml".into(),
                });
            }
            self.effective(&stem.to_ascii_lowercase())?;
            n += 1;
        }
        Ok(n)
    }
}

/// The proxy's policy: the current store (swapped on reload) and the audit
/// log, shared by every instance.
#[derive(Debug)]
pub struct PolicyHub {
    store: Mutex<Arc<PolicyStore>>,
    /// The audit log.
    pub audit: Arc<Audit>,
}

impl PolicyHub {
    /// Load the store and open the audit log.
    pub fn new(cfg: &PolicyConfig, control_exchange: &str) -> Result<Self, PolicyError> {
        let store = PolicyStore::load(cfg, control_exchange)?;
        let audit = Audit::new(
            cfg.audit_log.clone(),
            std::time::Duration::from_millis(cfg.audit_interval_ms),
            cfg.audit_records_per_interval,
        )
        .map_err(|source| PolicyError::AuditLog {
            path: cfg.audit_log.clone().unwrap_or_default(),
            source,
        })?;
        Ok(Self {
            store: Mutex::new(Arc::new(store)),
            audit: Arc::new(audit),
        })
    }

    /// The current store.
    pub fn store(&self) -> Arc<PolicyStore> {
        lock(&self.store).clone()
    }

    /// Replace the store (a reload that succeeded).
    pub fn replace(&self, s: PolicyStore) {
        *lock(&self.store) = Arc::new(s);
    }

    /// The policy for an instance that just appeared: fail closed on a bad
    /// assignment (logged).
    pub fn for_new(&self, instance: &str) -> Arc<Effective> {
        let s = self.store();
        Arc::new(s.effective(instance).unwrap_or_else(|e| {
            tracing::error!(instance = %instance, error = %crate::error_chain(&e), "bad instance policy: nothing allowed until it is fixed and the proxy reloaded");
            s.fail_closed(instance, &e)
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: &str = "0000aaaa-0000-4000-8000-000000000001";

    fn cfg(dir: &Path) -> PolicyConfig {
        let text = format!(
            r#"instances_dir = {dir:?}
[profiles.lbaas]
mode = "cast"
topics = ["lbaas*"]
static_context = {{ user_id = "svc" }}
[[profiles.lbaas.targets]]
topics = ["lbaas-plugin"]
methods = ["update_*"]
"#
        );
        let c: PolicyConfig = toml::from_str(&text).unwrap();
        c.validate().unwrap();
        c
    }

    #[test]
    fn default_file_override_and_fail_closed() {
        let d = tempfile::tempdir().unwrap();
        let s = PolicyStore::load(&cfg(d.path()), "openstack").unwrap();
        let e = s.effective(I).unwrap();
        assert_eq!(
            (&*e.profile_name, e.profile.mode),
            ("default", Mode::ReplyOnly)
        );
        assert!(e.profile.topics.is_empty(), "default: no topics");
        std::fs::write(
            d.path().join(format!("{I}.toml")),
            "profile = \"lbaas\"\nstatic_context = { project_id = \"p1\" }\n",
        )
        .unwrap();
        let e = s.effective(I).unwrap();
        assert_eq!(e.profile.mode, Mode::Cast);
        assert_eq!(e.profile.static_context["user_id"], "svc");
        assert_eq!(e.profile.static_context["project_id"], "p1");
        assert_eq!(s.check_all().unwrap(), 1);
        for bad in [
            "profile = \"nope\"\n",
            "profile = \"lbaas\"\nmode = \"root\"\n",
            "profile = \"lbaas\"\nstatic_context = { tether_instance = \"x\" }\n",
            "profile = \"lbaas\"\nmode = \"one-way\"\ntopics = [\"x*\"]\n",
            "nonsense",
        ] {
            std::fs::write(d.path().join(format!("{I}.toml")), bad).unwrap();
            let err = s.effective(I).unwrap_err();
            assert!(err.to_string().contains(I), "{err}");
            assert!(s.check_all().is_err());
            let fc = s.fail_closed(I, &err);
            assert_eq!(fc.profile.mode, Mode::OneWay);
            assert!(fc.profile.topics.is_empty());
        }
        std::fs::write(d.path().join("not-a-uuid.toml"), "profile = \"lbaas\"").unwrap();
        std::fs::remove_file(d.path().join(format!("{I}.toml"))).unwrap();
        assert!(s.check_all().is_err());
    }

    #[test]
    fn config_validation() {
        for bad in [
            "default_profile = \"nope\"",
            "[profiles.x]\nmessages_per_sec = 0",
            "[profiles.x]\ncontext_keys = [\"tether_instance\"]",
            "[[profiles.x.targets]]\ntopics = []\nmethods = [\"*\"]",
            "[[profiles.x.targets]]\ntopics = [\"a*b*\"]\nmethods = [\"*\"]",
        ] {
            let c: PolicyConfig = toml::from_str(bad).unwrap();
            assert!(c.validate().is_err(), "{bad}");
        }
        assert!(toml::from_str::<PolicyConfig>("[profiles.x]\nmode = \"admin\"").is_err());
    }
}
