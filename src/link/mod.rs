//! The link protocol both ends share: frames, the I/O-free session, and the
//! async driver that moves its bytes.
//!
//! - [`frame`]: the wire form of one frame (header layout, types, flags).
//! - [`codec`]: bytes ⇄ frames with resynchronisation after garbage.
//! - [`hello`]: the handshake payload.
//! - [`session`]: the state machine (events in, actions out; no I/O, no clock).
//! - [`driver`]: runs a session over any byte stream, reconnecting as needed.
//!
//! The protocol itself is specified in `docs/protocol.md`.

pub mod codec;
pub mod config;
pub mod driver;
pub mod frame;
pub mod hello;
pub mod session;

pub use codec::{DecodeStats, FrameCodec};
pub use config::SessionConfig;
pub use driver::{Connector, Link, LinkEvent, LinkOptions, LinkStatus, SendReceipt};
pub use frame::{Frame, FrameType};
pub use hello::{Hello, SessionId};
pub use session::{Event, ResetReason, Session, SessionStats};

/// What can go wrong in the link layer. None of these end the process: a
/// protocol error is counted, logged and answered by a reconnect at worst.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The peer's HELLO could not be used.
    #[error("malformed HELLO from peer: {0}")]
    MalformedHello(&'static str),
    /// The peer speaks only protocol versions we do not.
    #[error(
        "peer speaks link protocol version {theirs}, this side needs at least {ours}; upgrade the older side"
    )]
    IncompatibleVersion {
        /// Our version.
        ours: u16,
        /// Theirs.
        theirs: u16,
    },
    /// Frames we hold are larger than the peer accepts.
    #[error(
        "peer accepts payloads up to {peer_max} bytes but {queued} bytes are queued for it; configure the same max_payload on both sides"
    )]
    PeerMaxPayloadTooSmall {
        /// The peer's limit.
        peer_max: u32,
        /// The largest payload we hold.
        queued: usize,
    },
    /// The peer acknowledged or claimed frames this session never sent.
    #[error("peer acknowledged sequence {ack} but the next one to send is {next}")]
    AckBeyondSent {
        /// What the peer claimed.
        ack: u64,
        /// Our next sequence number.
        next: u64,
    },
    /// The peer asked for frames this session already freed.
    #[error("peer resumes at sequence {asked} but frames before {base} were already acknowledged")]
    ResumeBeforeBase {
        /// Where the peer wants to resume.
        asked: u64,
        /// Our oldest held frame.
        base: u64,
    },
    /// Our own HELLO came back to us.
    #[error(
        "received our own HELLO: the channel echoes or is looped back (a serial line not in raw mode?)"
    )]
    OwnHelloEchoed,
    /// The peer sent an ERROR frame.
    #[error("peer reported: {0}")]
    PeerError(String),
    /// A configuration value is out of range.
    #[error("invalid link configuration: {0}")]
    InvalidConfig(String),
}

/// Why `send` did not take a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The payload is larger than the negotiated maximum.
    #[error("message of {len} bytes is larger than the link maximum of {max} bytes")]
    TooLarge {
        /// Its size.
        len: usize,
        /// The limit.
        max: u32,
    },
    /// The send window is full: wait for [`Event::WindowOpen`].
    #[error("send window full")]
    WindowFull,
    /// The link has stopped.
    #[error("link closed")]
    Closed,
}
