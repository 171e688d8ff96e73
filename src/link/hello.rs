//! The HELLO payload: who I am, what I last saw of you, and my limits.
//!
//! ```text
//!  0       2       4       8               16              24              32              40      44      48      52
//!  +-------+-------+-------+---------------+---------------+---------------+---------------+-------+-------+-------+
//!  |version| rsvd  | caps  |  session id   | peer session  | next expected |   send base   |maxpay |win frm|win byt|
//!  +-------+-------+-------+---------------+---------------+---------------+---------------+-------+-------+-------+
//! ```
//! Bytes after offset 52 are ignored, so a later version may append fields.

use bytes::{BufMut, Bytes, BytesMut};

use super::LinkError;

/// The link protocol version this implementation speaks.
pub const PROTOCOL_VERSION: u16 = 1;
/// The oldest protocol version this implementation can speak.
pub const MIN_PROTOCOL_VERSION: u16 = 1;
/// Encoded size of the fields this version knows.
pub const HELLO_LEN: usize = 52;
/// No peer advertises less than this maximum payload: smaller would not fit a
/// useful RPC envelope, and a zero would stall the link.
pub const MIN_MAX_PAYLOAD: u32 = 1024;
/// The highest sequence number a peer may announce (`send_base`,
/// `next_expected`): 2^62 frames is more than any link sends in its life,
/// and leaves room above it for every `+ 1` the session does.
pub const MAX_SEQ: u64 = 1 << 62;
/// The smallest window a peer may ask for, in frames: below it a sender
/// would wait on the peer for every few messages.
pub const MIN_WINDOW_FRAMES: u32 = 4;

/// A session id: random per process run, never 0 (0 means "none seen").
pub type SessionId = u64;

/// The decoded HELLO payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    /// Highest protocol version the sender speaks.
    pub version: u16,
    /// Capability bits (none are defined in version 1; unknown bits are ignored).
    pub capabilities: u32,
    /// The sender's session id.
    pub session: SessionId,
    /// The receiver's session id as last seen by the sender (0: none).
    pub peer_session: SessionId,
    /// Next sequence number the sender expects from `peer_session`.
    pub next_expected: u64,
    /// Oldest sequence number the sender still holds unacknowledged (its next
    /// sequence number if it holds none): where its stream resumes for a
    /// receiver that has never seen this session.
    pub send_base: u64,
    /// Largest payload the sender accepts.
    pub max_payload: u32,
    /// Most unacknowledged DATA frames the sender wants in flight towards it.
    pub window_frames: u32,
    /// Most unacknowledged payload bytes the sender wants in flight towards it.
    pub window_bytes: u32,
}

impl Hello {
    /// Encode into a payload.
    pub fn encode(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(HELLO_LEN);
        b.put_u16(self.version);
        b.put_u16(0);
        b.put_u32(self.capabilities);
        b.put_u64(self.session);
        b.put_u64(self.peer_session);
        b.put_u64(self.next_expected);
        b.put_u64(self.send_base);
        b.put_u32(self.max_payload);
        b.put_u32(self.window_frames);
        b.put_u32(self.window_bytes);
        b.freeze()
    }

    /// Decode and validate a payload.
    pub fn decode(p: &[u8]) -> Result<Self, LinkError> {
        let Some(p) = p.get(..HELLO_LEN) else {
            return Err(LinkError::MalformedHello("payload shorter than 52 bytes"));
        };
        let mut at = 0usize;
        let mut take = |n: usize| -> u64 {
            let v = p
                .get(at..at + n)
                .map(|s| s.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
                .unwrap_or(0);
            at += n;
            v
        };
        let version = take(2) as u16;
        let _reserved = take(2);
        let h = Hello {
            version,
            capabilities: take(4) as u32,
            session: take(8),
            peer_session: take(8),
            next_expected: take(8),
            send_base: take(8),
            max_payload: take(4) as u32,
            window_frames: take(4) as u32,
            window_bytes: take(4) as u32,
        };
        if h.version < MIN_PROTOCOL_VERSION {
            return Err(LinkError::IncompatibleVersion {
                ours: PROTOCOL_VERSION,
                theirs: h.version,
            });
        }
        if h.session == 0 {
            return Err(LinkError::MalformedHello("session id is 0"));
        }
        if h.send_base == 0 {
            return Err(LinkError::MalformedHello(
                "send base is 0 (sequences start at 1)",
            ));
        }
        if h.send_base > MAX_SEQ || h.next_expected > MAX_SEQ {
            return Err(LinkError::MalformedHello("sequence number beyond 2^62"));
        }
        if h.max_payload < MIN_MAX_PAYLOAD {
            return Err(LinkError::MalformedHello("max payload below 1024"));
        }
        if h.window_frames < MIN_WINDOW_FRAMES
            || h.window_bytes < h.max_payload.min(MIN_MAX_PAYLOAD)
        {
            return Err(LinkError::MalformedHello("window too small"));
        }
        Ok(h)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            capabilities: 0,
            session: 0x1122_3344_5566_7788,
            peer_session: 9,
            next_expected: 42,
            send_base: 40,
            max_payload: 65536,
            window_frames: 256,
            window_bytes: 1 << 22,
        }
    }

    #[test]
    fn round_trip_and_trailing_bytes_ignored() {
        let h = sample();
        let mut p = h.encode().to_vec();
        assert_eq!(p.len(), HELLO_LEN);
        assert_eq!(Hello::decode(&p).unwrap(), h);
        p.extend_from_slice(b"future fields");
        assert_eq!(Hello::decode(&p).unwrap(), h);
    }

    #[test]
    fn rejects_short_zero_and_old() {
        let h = sample();
        let p = h.encode();
        assert!(matches!(
            Hello::decode(&p[..51]),
            Err(LinkError::MalformedHello(_))
        ));
        let zero = Hello { session: 0, ..h }.encode();
        assert!(matches!(
            Hello::decode(&zero),
            Err(LinkError::MalformedHello(_))
        ));
        let old = Hello { version: 0, ..h }.encode();
        assert!(matches!(
            Hello::decode(&old),
            Err(LinkError::IncompatibleVersion { theirs: 0, .. })
        ));
        let tiny = Hello {
            max_payload: 10,
            ..h
        }
        .encode();
        assert!(Hello::decode(&tiny).is_err());
    }
}
