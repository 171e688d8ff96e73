//! Who a sub-agent runs as: an optional user and group per sub-agent, so a
//! sub-agent needs no more of the VM than its job (the agent itself usually
//! runs as root: it starts them).
//!
//! Names are resolved each time the sub-agent is started (a restart sees a
//! user removed since, and fails with a clear reason). The child drops its
//! privileges between fork and exec, in this order: supplementary groups
//! (the user's, from the group database, as login and systemd's `User=`
//! set them), group, user. The parent-death signal is set after that: the
//! kernel clears it when a process changes its credentials.

use nix::unistd::{Gid, Group, Uid, User};

/// The credentials a sub-agent's process takes before it runs its program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// The user to run as (`None`: the agent's own).
    pub uid: Option<Uid>,
    /// The primary group.
    pub gid: Gid,
    /// The supplementary groups.
    pub groups: Vec<Gid>,
}

/// Resolve `user` and `group` (names from a start request or the agent's
/// config). `None` for both: the sub-agent runs as the agent. A user alone
/// runs with its primary group; a group alone changes only the group.
pub fn resolve(user: Option<&str>, group: Option<&str>) -> Result<Option<Identity>, String> {
    let group = match group {
        Some(g) => Some(
            Group::from_name(g)
                .map_err(|e| format!("cannot look up group '{g}': {e}"))?
                .ok_or_else(|| format!("no group named '{g}'"))?,
        ),
        None => None,
    };
    let Some(u) = user else {
        return Ok(group.map(|g| Identity {
            uid: None,
            gid: g.gid,
            groups: vec![g.gid],
        }));
    };
    let u = User::from_name(u)
        .map_err(|e| format!("cannot look up user '{u}': {e}"))?
        .ok_or_else(|| format!("no user named '{u}'"))?;
    let gid = group.map_or(u.gid, |g| g.gid);
    let name = std::ffi::CString::new(u.name.as_bytes())
        .map_err(|_| format!("user name '{}' has a NUL byte", u.name))?;
    let mut groups = nix::unistd::getgrouplist(&name, u.gid)
        .map_err(|e| format!("cannot list the groups of user '{}': {e}", u.name))?;
    if !groups.contains(&gid) {
        groups.push(gid);
    }
    Ok(Some(Identity {
        uid: Some(u.uid),
        gid,
        groups,
    }))
}

impl Identity {
    /// Take these credentials (in the child, between fork and exec: only
    /// system calls, nothing that allocates or locks).
    pub fn assume(&self) -> std::io::Result<()> {
        nix::unistd::setgroups(&self.groups)?;
        nix::unistd::setgid(self.gid)?;
        if let Some(uid) = self.uid {
            nix::unistd::setuid(uid)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_or_say_what_is_missing() {
        assert_eq!(resolve(None, None), Ok(None));
        let root = resolve(Some("root"), None).unwrap().unwrap();
        assert_eq!(root.uid, Some(Uid::from_raw(0)));
        assert_eq!(root.gid, Gid::from_raw(0));
        assert!(root.groups.contains(&Gid::from_raw(0)));
        let g = resolve(None, Some("root")).unwrap().unwrap();
        assert_eq!((g.uid, g.gid), (None, Gid::from_raw(0)));
        let e = resolve(Some("no-such-user-here"), None).unwrap_err();
        assert_eq!(e, "no user named 'no-such-user-here'");
        let e = resolve(Some("root"), Some("no-such-group-here")).unwrap_err();
        assert_eq!(e, "no group named 'no-such-group-here'");
    }
}
