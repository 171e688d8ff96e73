//! The channels directory: each `<instance-uuid>.sock` is one VM's chardev
//! socket. The instance id is the file stem, validated as a UUID; anything
//! else is ignored with a warning.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use futures_util::StreamExt;
use inotify::{Inotify, WatchMask};
use tokio::sync::mpsc;
use tracing::warn;

/// A socket appeared in (or was found in) the channels directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Channel {
    /// The instance uuid.
    pub instance: String,
    /// The socket path.
    pub path: PathBuf,
}

/// The instance id of a channel file name, if it is `<uuid>.sock`.
pub fn instance_id(name: &OsStr) -> Option<String> {
    let stem = name.to_str()?.strip_suffix(".sock")?;
    is_uuid(stem).then(|| stem.to_ascii_lowercase())
}

/// Whether `s` is shaped like a uuid (`8-4-4-4-12` hex digits).
pub fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    let lens = [8, 4, 4, 4, 12];
    groups.len() == 5
        && groups
            .iter()
            .zip(lens)
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}

fn consider(dir: &Path, name: &OsStr) -> Option<Channel> {
    match instance_id(name) {
        Some(instance) => Some(Channel {
            instance,
            path: dir.join(name),
        }),
        None => {
            warn!(file = %name.to_string_lossy(), "ignoring a file in the channels directory that is not <instance-uuid>.sock");
            None
        }
    }
}

/// The channels in `dir` now (unreadable: none).
pub fn scan(dir: &Path) -> Vec<Channel> {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    instance_id(&e.file_name()).map(|instance| Channel {
                        instance,
                        path: e.path(),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// What happened in the channels directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelEvent {
    /// A socket is there (found at start, created, or moved in).
    Appeared(Channel),
    /// The instance's socket went (its QEMU exited, or it was moved away:
    /// a migration to another host). The link keeps its session for the
    /// grace period — the VM may come back — but drops the connection now.
    Gone(String),
}

/// The channels directory, watched: made by [`Watch::new`] (which fails
/// when the directory cannot be watched — the proxy then does not start,
/// rather than serve no VM), run by [`Watch::run`].
pub struct Watch {
    dir: PathBuf,
    inotify: Inotify,
}

impl Watch {
    /// Create `dir` if needed and watch it.
    pub fn new(dir: PathBuf) -> std::io::Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let inotify = Inotify::init()?;
        inotify.watches().add(
            &dir,
            WatchMask::CREATE
                | WatchMask::MOVED_TO
                | WatchMask::ATTRIB
                | WatchMask::DELETE
                | WatchMask::MOVED_FROM,
        )?;
        Ok(Watch { dir, inotify })
    }

    /// Report every channel already present, then every one that appears
    /// or goes, until `out` closes or the watch fails.
    pub async fn run(self, out: mpsc::Sender<ChannelEvent>) -> std::io::Result<()> {
        let Watch { dir, inotify } = self;
        // Scan after the watch is in place, so nothing slips between the two.
        for e in std::fs::read_dir(&dir)?.flatten() {
            if let Some(c) = consider(&dir, &e.file_name())
                && out.send(ChannelEvent::Appeared(c)).await.is_err()
            {
                return Ok(());
            }
        }
        let mut events = inotify.into_event_stream(vec![0u8; 64 * 1024])?;
        while let Some(ev) = events.next().await {
            let ev = ev?;
            let Some(name) = ev.name else { continue };
            let gone = ev
                .mask
                .intersects(inotify::EventMask::DELETE | inotify::EventMask::MOVED_FROM);
            let e = if gone {
                match instance_id(&name) {
                    Some(i) => ChannelEvent::Gone(i),
                    None => continue,
                }
            } else {
                match consider(&dir, &name) {
                    Some(c) => ChannelEvent::Appeared(c),
                    None => continue,
                }
            };
            if out.send(e).await.is_err() {
                break;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uuid_stems_only() {
        let ok = OsStr::new("0f8fad5b-d9cb-469f-a165-70867728950e.sock");
        assert_eq!(
            instance_id(ok).as_deref(),
            Some("0f8fad5b-d9cb-469f-a165-70867728950e")
        );
        for bad in [
            "x.sock",
            "0f8fad5b-d9cb-469f-a165-70867728950e",
            "0f8fad5b-d9cb-469f-a165-70867728950g.sock",
            "../0f8fad5b-d9cb-469f-a165-70867728950e.sock",
        ] {
            assert_eq!(instance_id(OsStr::new(bad)), None, "{bad}");
        }
    }
}
