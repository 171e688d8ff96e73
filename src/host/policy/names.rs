//! Names a guest may use, and the patterns of allow-lists.
//!
//! Every name a guest sends (a topic it registers, a target's exchange,
//! topic, server and method) is checked here before anything else looks at
//! it. The rules, and why:
//!
//! | name | characters | why |
//! |---|---|---|
//! | topic | `A-Z a-z 0-9 _ -`, 1–[`MAX_NAME`] bytes | no `.`: the routing key `<topic>.<server>` must split one way only (a topic `good.<uuid>` would reach another instance's queue); no `*`/`#`: AMQP topic wildcards in a binding |
//! | server | `A-Z a-z 0-9 _ - . :` | host names and instance uuids |
//! | exchange | `A-Z a-z 0-9 _ - . :` | never the default exchange (empty) |
//! | method | `A-Z a-z 0-9 _`, not starting with a digit | a Python method name |
//! | event type | `A-Z a-z 0-9 _ - . :` | a notification's `event_type` (`lbaas.pool.update.end`) |
//!
//! A topic that is an instance uuid is refused too: it would read as
//! another instance's identity in queue names and logs.

/// Longest name (bytes): an AMQP short string.
pub const MAX_NAME: usize = 255;

/// Why a name is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty.
    #[error("empty {0}")]
    Empty(&'static str),
    /// Longer than [`MAX_NAME`].
    #[error("{what} is {len} bytes long (at most {MAX_NAME})")]
    TooLong {
        /// Which name.
        what: &'static str,
        /// Its length.
        len: usize,
    },
    /// A character outside the documented set.
    #[error("{what} {name} has a character outside [{allowed}]")]
    BadChar {
        /// Which name.
        what: &'static str,
        /// The name, escaped and shortened for logs.
        name: String,
        /// The allowed set.
        allowed: &'static str,
    },
    /// A topic shaped like an instance uuid.
    #[error("topic {0} looks like an instance uuid")]
    LooksLikeInstance(String),
}

/// Kinds of names, each with its character set.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameKind {
    /// A topic (registered or targeted).
    Topic,
    /// A target's server.
    Server,
    /// A target's exchange.
    Exchange,
    /// A method.
    Method,
    /// A notification's event type.
    EventType,
}

impl NameKind {
    fn what(self) -> &'static str {
        match self {
            Self::Topic => "topic",
            Self::Server => "server",
            Self::Exchange => "exchange",
            Self::Method => "method",
            Self::EventType => "event type",
        }
    }

    fn allowed(self) -> &'static str {
        match self {
            Self::Topic => "A-Za-z0-9_-",
            Self::Server | Self::Exchange | Self::EventType => "A-Za-z0-9_.:-",
            Self::Method => "A-Za-z0-9_",
        }
    }

    fn char_ok(self, c: u8) -> bool {
        c.is_ascii_alphanumeric()
            || c == b'_'
            || match self {
                Self::Topic => c == b'-',
                Self::Server | Self::Exchange | Self::EventType => {
                    matches!(c, b'-' | b'.' | b':')
                }
                Self::Method => false,
            }
    }
}

/// `s` for a log line or an error: escaped (no control characters, quotes
/// escaped) and cut to 64 characters, with the full length said.
pub fn shown(s: &str) -> String {
    const SHOWN: usize = 64;
    let n = s.chars().count();
    if n <= SHOWN {
        format!("{s:?}")
    } else {
        let head: String = s.chars().take(SHOWN).collect();
        format!("{head:?}… ({} bytes)", s.len())
    }
}

/// Check a name a guest sent.
pub fn check(kind: NameKind, name: &str) -> Result<(), NameError> {
    let what = kind.what();
    if name.is_empty() {
        return Err(NameError::Empty(what));
    }
    if name.len() > MAX_NAME {
        return Err(NameError::TooLong {
            what,
            len: name.len(),
        });
    }
    if !name.bytes().all(|c| kind.char_ok(c))
        || (kind == NameKind::Method && name.as_bytes().first().is_some_and(u8::is_ascii_digit))
    {
        return Err(NameError::BadChar {
            what,
            name: shown(name),
            allowed: kind.allowed(),
        });
    }
    if kind == NameKind::Topic && crate::host::channels::is_uuid(name) {
        return Err(NameError::LooksLikeInstance(shown(name)));
    }
    Ok(())
}

/// An allow-list entry: an exact name, or a prefix ending in one `*` (`*`
/// alone matches any name that passes [`check`]).
pub fn pattern_ok(p: &str) -> bool {
    let stem = p.strip_suffix('*').unwrap_or(p);
    !p.is_empty() && !stem.contains('*') && stem.len() <= MAX_NAME
}

/// Whether `name` matches the pattern `p`.
pub fn matches(p: &str, name: &str) -> bool {
    match p.strip_suffix('*') {
        Some(prefix) => name.starts_with(prefix),
        None => name == p,
    }
}

/// Whether `name` matches any of `patterns`.
pub fn any_matches(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| matches(p, name))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bad_topic_names_of_the_issue_are_refused() {
        let long = "x".repeat(200_000);
        for bad in [
            "",
            "#",
            "*",
            "a\0b",
            "../x",
            "tether.supervisor",
            "good.0000aaaa-0000-4000-8000-000000000000",
            "0000aaaa-0000-4000-8000-000000000000",
            long.as_str(),
            "naïve",
        ] {
            assert!(check(NameKind::Topic, bad).is_err(), "{}", shown(bad));
        }
        for good in ["lbaas-agent", "q_plugin", "octavia_provisioning_v2"] {
            assert_eq!(check(NameKind::Topic, good), Ok(()));
        }
    }

    #[test]
    fn servers_exchanges_and_methods() {
        assert!(check(NameKind::Server, "compute-1.example.org").is_ok());
        assert!(check(NameKind::Server, "a#").is_err());
        assert!(check(NameKind::Exchange, "neutron").is_ok());
        assert!(check(NameKind::Exchange, "").is_err());
        assert!(check(NameKind::Method, "report_state").is_ok());
        assert!(check(NameKind::Method, "9lives").is_err());
        assert!(check(NameKind::Method, "a.b").is_err());
    }

    #[test]
    fn patterns() {
        assert!(pattern_ok("lbaas*") && pattern_ok("*") && pattern_ok("x"));
        assert!(!pattern_ok("") && !pattern_ok("a*b*") && !pattern_ok("*x"));
        assert!(matches("lbaas*", "lbaas-agent") && !matches("lbaas*", "nova"));
        assert!(matches("*", "anything") && matches("x", "x") && !matches("x", "xy"));
    }

    #[test]
    fn shown_escapes_and_cuts() {
        assert_eq!(shown("a\nb\u{1b}[31m"), "\"a\\nb\\u{1b}[31m\"");
        let s = shown(&"y".repeat(1000));
        assert!(s.ends_with("(1000 bytes)") && s.len() < 100, "{s}");
    }
}
