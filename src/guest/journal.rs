//! The agent's journal of taken requests: the unique ids of requests handed
//! to a sub-agent, written before the hand-over, so an agent restarted
//! (kill -9, a crash, an upgrade) neither runs a request twice nor leaves
//! the host waiting for its receipt — and of requests the host cancelled
//! (their caller gave up) before any sub-agent took them, so they never
//! run, whenever they arrive.
//!
//! It lives in the agent's state directory (`/run/tether` by default: the
//! VM's memory, which a live migration carries along and a reboot clears —
//! as it clears the sub-agents). Two files bound it: `taken.cur` takes
//! appends; when it holds [`JOURNAL_GENERATION`] ids it becomes `taken.prev`
//! (replacing the older one) and a new `taken.cur` starts. At start both
//! are read, so the last one to two generations of ids are remembered. Each
//! line is one JSON value: a string (taken) or `{"cancelled": id}`; a line
//! cut by a crash is skipped.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use tracing::{error, info, warn};

/// Ids per journal file. The host keeps at most
/// the host's `MAX_OUTSTANDING` (8192) requests waiting for a
/// receipt and sends nothing else again, so remembering at least that many
/// (here 8192–16384) covers every resend.
pub const JOURNAL_GENERATION: usize = 8192;
/// Longest unique id journaled (host ids are 32 hex digits; a control-socket
/// caller may choose its own). Longer ones are kept in memory only.
pub const MAX_ID_BYTES: usize = 256;

/// What the journal says about one id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// A sub-agent took it, in this run of the agent.
    Taken,
    /// A sub-agent took it, in an earlier run (the host may not have got
    /// its receipt).
    TakenEarlier,
    /// The host cancelled it before a sub-agent took it: never run.
    Cancelled,
}

/// The journal.
pub struct Journal {
    dir: PathBuf,
    file: Option<File>,
    current: HashMap<String, State>,
    previous: HashMap<String, State>,
    /// A write failed: logged once, then ids are kept in memory only.
    failing: bool,
}

/// Why the journal cannot be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the journal in {dir}")]
pub struct JournalError {
    /// The state directory.
    pub dir: PathBuf,
    /// Why.
    #[source]
    pub source: std::io::Error,
}

impl Journal {
    /// Open (creating `dir` if needed) and read what an
    /// earlier run of the agent took.
    pub fn open(dir: &Path) -> Result<Self, JournalError> {
        let err = |source| JournalError {
            dir: dir.to_path_buf(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(err)?;
        let previous = read_ids(&dir.join("taken.prev")).map_err(err)?;
        let current = read_ids(&dir.join("taken.cur")).map_err(err)?;
        let file = append(&dir.join("taken.cur")).map_err(err)?;
        if !current.is_empty() || !previous.is_empty() {
            info!(
                ids = current.len() + previous.len(),
                "journal recovered: requests taken by an earlier run are not run again"
            );
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            file: Some(file),
            current,
            previous,
            failing: false,
        })
    }

    /// A journal that keeps ids in memory only (tests, benchmarks).
    pub fn in_memory() -> Self {
        Self {
            dir: PathBuf::new(),
            file: None,
            current: HashMap::new(),
            previous: HashMap::new(),
            failing: false,
        }
    }

    /// What is known of `id` (this run or a recent earlier one).
    pub fn state(&self, id: &str) -> Option<State> {
        self.current
            .get(id)
            .or_else(|| self.previous.get(id))
            .copied()
    }

    /// True if `id` was taken (by this run or a recent earlier one).
    pub fn contains(&self, id: &str) -> bool {
        matches!(self.state(id), Some(State::Taken | State::TakenEarlier))
    }

    /// Record `id` as taken. Written to the file before it returns (one
    /// `write(2)`); if the file cannot be written the id is still remembered
    /// in memory, and the failure is logged once. Does nothing if `id` is
    /// known already (see [`Self::take`] for the check against a cancel).
    pub fn record(&mut self, id: &str) {
        if self.state(id).is_none() {
            self.write(id, State::Taken);
        }
    }

    /// Record `id` as taken just before it is handed to a sub-agent —
    /// unless the host cancelled it: then false, and it must not be handed
    /// over. Checked and recorded under the journal's one lock, so a cancel
    /// and a hand-over cannot both win.
    pub fn take(&mut self, id: &str) -> bool {
        match self.state(id) {
            Some(State::Cancelled) => false,
            Some(_) => true,
            None => {
                self.write(id, State::Taken);
                true
            }
        }
    }

    /// The host cancelled `id`: returns what was known of it before (if a
    /// sub-agent took it, the cancel comes too late); when nothing was, it
    /// is recorded as cancelled and will never be handed over.
    pub fn cancel(&mut self, id: &str) -> Option<State> {
        let before = self.state(id);
        if before.is_none() {
            self.write(id, State::Cancelled);
        }
        before
    }

    fn write(&mut self, id: &str, state: State) {
        if self.current.len() >= JOURNAL_GENERATION {
            self.rotate();
        }
        self.current.insert(id.to_string(), state);
        if id.len() > MAX_ID_BYTES {
            return;
        }
        let Some(f) = self.file.as_mut() else {
            return;
        };
        let mut line = match state {
            State::Cancelled => serde_json::json!({ "cancelled": id }).to_string(),
            _ => serde_json::to_string(id).unwrap_or_default(),
        };
        line.push('\n');
        if let Err(e) = f.write_all(line.as_bytes()) {
            self.fail(&e);
        }
    }

    fn rotate(&mut self) {
        self.previous = std::mem::take(&mut self.current);
        if self.file.is_none() {
            return;
        }
        let (cur, prev) = (self.dir.join("taken.cur"), self.dir.join("taken.prev"));
        let res = std::fs::rename(&cur, &prev).and_then(|()| append(&cur));
        match res {
            Ok(f) => self.file = Some(f),
            Err(e) => self.fail(&e),
        }
    }

    fn fail(&mut self, e: &std::io::Error) {
        if !self.failing {
            error!(dir = %self.dir.display(), error = %e,
                "journal write failed: taken requests are remembered in memory only (a restart of the agent may run some twice)");
            self.failing = true;
        }
    }
}

fn append(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)
}

/// One journal line as written by [`Journal::write`].
#[derive(serde::Deserialize)]
#[serde(untagged)]
enum Line {
    Taken(String),
    Cancelled { cancelled: String },
}

fn read_ids(path: &Path) -> std::io::Result<HashMap<String, State>> {
    let f = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(HashMap::new()),
        Err(e) => return Err(e),
    };
    let mut ids = HashMap::new();
    let mut skipped = 0usize;
    // Bounded: a file of ours holds at most JOURNAL_GENERATION lines of at
    // most MAX_ID_BYTES; anything past that was not written by this code.
    let max_line = MAX_ID_BYTES * 6 + 20;
    for line in BufReader::new(f).split(b'\n').take(JOURNAL_GENERATION) {
        let line = line?;
        match (line.len() <= max_line)
            .then(|| serde_json::from_slice::<Line>(&line).ok())
            .flatten()
        {
            Some(Line::Taken(id)) => {
                ids.insert(id, State::TakenEarlier);
            }
            Some(Line::Cancelled { cancelled }) => {
                ids.insert(cancelled, State::Cancelled);
            }
            None => skipped += 1,
        }
    }
    if skipped > 0 {
        warn!(file = %path.display(), skipped, "journal lines that could not be read were skipped (a write cut by a crash?)");
    }
    Ok(ids)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recovered_after_a_restart_and_a_cut_line_is_skipped() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        j.record("a");
        j.record("b\n\"odd");
        drop(j);
        let mut f = append(&d.path().join("taken.cur")).unwrap();
        f.write_all(b"\"cut-by-a-cr").unwrap();
        let j = Journal::open(d.path()).unwrap();
        assert!(j.contains("a"));
        assert!(j.contains("b\n\"odd"));
        assert!(!j.contains("cut-by-a-cr"));
        assert!(!j.contains("c"));
    }

    #[test]
    fn two_generations_are_remembered_and_no_more() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        for n in 0..JOURNAL_GENERATION * 2 + 1 {
            j.record(&n.to_string());
        }
        drop(j);
        let j = Journal::open(d.path()).unwrap();
        assert!(!j.contains("0"), "the oldest generation is gone");
        assert!(j.contains(&JOURNAL_GENERATION.to_string()));
        assert!(j.contains(&(JOURNAL_GENERATION * 2).to_string()));
    }

    #[test]
    fn a_cancel_and_a_hand_over_exclude_each_other_across_restarts() {
        let d = tempfile::tempdir().unwrap();
        let mut j = Journal::open(d.path()).unwrap();
        assert!(j.take("a"));
        assert_eq!(j.cancel("a"), Some(State::Taken), "too late to cancel");
        assert_eq!(j.cancel("b"), None);
        assert!(!j.take("b"), "a cancelled request is never handed over");
        assert_eq!(j.cancel("b"), Some(State::Cancelled));
        drop(j);
        let mut j = Journal::open(d.path()).unwrap();
        assert_eq!(j.state("a"), Some(State::TakenEarlier));
        assert_eq!(j.state("b"), Some(State::Cancelled));
        assert!(!j.contains("b"));
        assert!(!j.take("b"), "still cancelled after a restart");
        assert_eq!(j.cancel("a"), Some(State::TakenEarlier));
    }

    #[test]
    fn an_unwritable_directory_is_an_error() {
        let f = tempfile::NamedTempFile::new().unwrap();
        assert!(Journal::open(&f.path().join("sub")).is_err());
    }
}
