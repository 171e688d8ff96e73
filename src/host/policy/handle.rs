//! Sealed reply handles: a guest answers only calls delivered into it.
//!
//! When a proxy delivers a call into a guest, the guest gets a local call id
//! and, when reply keys are configured, an opaque handle in `reply_to` that
//! seals (instance, reply queue, oslo msg_id, expiry). A guest reply that
//! is not pending on the proxy that receives it — the call entered through
//! another host's proxy before a live migration — is published only if its
//! handle opens with one of this proxy's keys, for this very instance, and
//! has not expired. The guest never learns the control plane's reply-queue
//! names or message ids, so it cannot aim a reply anywhere else.
//!
//! Why XChaCha20-Poly1305 (RustCrypto `chacha20poly1305`) and not an HMAC
//! tag alone: a tag proves integrity but leaves the queue name and msg_id
//! readable; an AEAD both seals and hides them. The AEAD key is derived from
//! each secret file with HMAC-SHA256 (so any file of at least
//! [`MIN_KEY_BYTES`] random bytes serves), the instance uuid is the
//! associated data (a handle taken from one instance fails in another), and
//! the 192-bit nonce only needs to be unique, never secret.

use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Shortest secret file accepted.
pub const MIN_KEY_BYTES: usize = 32;
/// Longest handle accepted from a guest (a sealed handle is ~200 bytes).
pub const MAX_HANDLE: usize = 1024;
/// Handles start with this (the format's version).
const PREFIX: &str = "th1.";
/// Domain separation for the key derivation and the associated data.
const CONTEXT: &[u8] = b"tether reply handle v1";
const NONCE: usize = 24;

/// Why a key file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Not readable.
    #[error("cannot read reply key {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Too short.
    #[error("reply key {path} has {len} bytes; at least {MIN_KEY_BYTES} random bytes are needed")]
    Short {
        /// The file.
        path: PathBuf,
        /// Its length.
        len: usize,
    },
    /// Readable by others.
    #[error("reply key {path} is readable by other users (mode {mode:o}); chmod 600 or 640")]
    Exposed {
        /// The file.
        path: PathBuf,
        /// Its mode.
        mode: u32,
    },
}

/// Why a guest's handle was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HandleError {
    /// No keys configured: only locally pending calls can be answered.
    #[error("no reply keys are configured on this proxy")]
    NoKeys,
    /// Not a handle's shape.
    #[error("not a reply handle")]
    Malformed,
    /// No key of ours opens it for this instance (tampered, forged, or
    /// taken from another instance).
    #[error("the reply handle was not sealed by this cloud's proxies for this instance")]
    Forged,
    /// Past its expiry.
    #[error("the reply handle expired {0} ms ago")]
    Expired(u64),
}

/// What a handle carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Opened {
    /// Where the reply goes.
    pub reply_q: String,
    /// The oslo msg_id of the call.
    pub msg_id: String,
    /// When it stops being accepted (Unix ms).
    pub expires_unix_ms: u64,
    /// The handle's nonce, unique per sealed handle (for replay checks).
    pub nonce: [u8; NONCE],
}

/// Seals and opens handles with the configured keys.
#[derive(Clone, Default)]
pub struct Sealer {
    keys: Vec<XChaCha20Poly1305>,
}

impl std::fmt::Debug for Sealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Sealer({} keys)", self.keys.len())
    }
}

fn derive(secret: &[u8]) -> XChaCha20Poly1305 {
    // HMAC accepts keys of any length.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(secret)
        .unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(CONTEXT);
    XChaCha20Poly1305::new(&mac.finalize().into_bytes())
}

fn aad(instance: &str) -> Vec<u8> {
    [CONTEXT, b"\0", instance.as_bytes()].concat()
}

impl Sealer {
    /// Read the key files (the first seals).
    pub fn load(paths: &[PathBuf]) -> Result<Self, KeyError> {
        let keys = paths
            .iter()
            .map(|p| read_key(p).map(|k| derive(&k)))
            .collect::<Result<_, _>>()?;
        Ok(Self { keys })
    }

    /// A sealer with these secrets (tests).
    pub fn from_secrets(secrets: &[&[u8]]) -> Self {
        Self {
            keys: secrets.iter().map(|s| derive(s)).collect(),
        }
    }

    /// Whether handles are sealed at all.
    pub fn enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// A handle for a call delivered into `instance`; `None` without keys.
    pub fn seal(
        &self,
        instance: &str,
        reply_q: &str,
        msg_id: &str,
        expires_unix_ms: u64,
    ) -> Option<String> {
        let key = self.keys.first()?;
        let q = u8::try_from(reply_q.len()).ok()?;
        let mut plain = Vec::with_capacity(9 + reply_q.len() + msg_id.len());
        plain.extend_from_slice(&expires_unix_ms.to_be_bytes());
        plain.push(q);
        plain.extend_from_slice(reply_q.as_bytes());
        plain.extend_from_slice(msg_id.as_bytes());
        let mut nonce = [0u8; NONCE];
        for (i, chunk) in nonce.chunks_mut(8).enumerate() {
            // Unique, not secret: XChaCha's 192-bit nonce tolerates random ones.
            let r = crate::random_u64() ^ (i as u64);
            chunk.copy_from_slice(&r.to_le_bytes());
        }
        let aad = aad(instance);
        let sealed = key
            .encrypt(
                XNonce::from_slice(&nonce),
                Payload {
                    msg: &plain,
                    aad: &aad,
                },
            )
            .ok()?;
        let mut raw = nonce.to_vec();
        raw.extend_from_slice(&sealed);
        Some(format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(raw)))
    }

    /// Open a guest's handle for `instance` at `now_unix_ms`.
    pub fn open(
        &self,
        instance: &str,
        handle: &str,
        now_unix_ms: u64,
    ) -> Result<Opened, HandleError> {
        if self.keys.is_empty() {
            return Err(HandleError::NoKeys);
        }
        if handle.len() > MAX_HANDLE {
            return Err(HandleError::Malformed);
        }
        let body = handle.strip_prefix(PREFIX).ok_or(HandleError::Malformed)?;
        let raw = URL_SAFE_NO_PAD
            .decode(body)
            .map_err(|_| HandleError::Malformed)?;
        let (nonce, sealed) = raw.split_at_checked(NONCE).ok_or(HandleError::Malformed)?;
        let aad = aad(instance);
        let plain = self
            .keys
            .iter()
            .find_map(|k| {
                k.decrypt(
                    XNonce::from_slice(nonce),
                    Payload {
                        msg: sealed,
                        aad: &aad,
                    },
                )
                .ok()
            })
            .ok_or(HandleError::Forged)?;
        // Sealed by us, so well-formed; checked all the same.
        let (exp, rest) = plain.split_at_checked(8).ok_or(HandleError::Malformed)?;
        let exp = u64::from_be_bytes(exp.try_into().map_err(|_| HandleError::Malformed)?);
        let (&qlen, rest) = rest.split_first().ok_or(HandleError::Malformed)?;
        let (q, m) = rest
            .split_at_checked(usize::from(qlen))
            .ok_or(HandleError::Malformed)?;
        if now_unix_ms > exp {
            return Err(HandleError::Expired(now_unix_ms.saturating_sub(exp)));
        }
        let s = |b: &[u8]| String::from_utf8(b.to_vec()).map_err(|_| HandleError::Malformed);
        Ok(Opened {
            reply_q: s(q)?,
            msg_id: s(m)?,
            expires_unix_ms: exp,
            nonce: nonce.try_into().map_err(|_| HandleError::Malformed)?,
        })
    }
}

fn read_key(path: &Path) -> Result<Vec<u8>, KeyError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| KeyError::Read {
        path: path.into(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o007 != 0 {
        return Err(KeyError::Exposed {
            path: path.into(),
            mode,
        });
    }
    let k = std::fs::read(path).map_err(|source| KeyError::Read {
        path: path.into(),
        source,
    })?;
    if k.len() < MIN_KEY_BYTES {
        return Err(KeyError::Short {
            path: path.into(),
            len: k.len(),
        });
    }
    Ok(k)
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: &str = "0000aaaa-0000-4000-8000-000000000001";

    #[test]
    fn round_trip_hides_the_queue_and_the_id() {
        let s = Sealer::from_secrets(&[&[7u8; 32]]);
        let h = s.seal(I, "reply_abc", "msg123", 2_000).unwrap();
        assert!(!h.contains("reply_abc") && !h.contains("msg123"));
        let o = s.open(I, &h, 1_000).unwrap();
        assert_eq!(
            (o.reply_q.as_str(), o.msg_id.as_str()),
            ("reply_abc", "msg123")
        );
        assert_ne!(
            s.seal(I, "reply_abc", "msg123", 2_000).unwrap(),
            h,
            "fresh nonce"
        );
    }

    #[test]
    fn tampered_foreign_expired_and_unkeyed_handles_are_refused() {
        let s = Sealer::from_secrets(&[&[7u8; 32]]);
        let h = s.seal(I, "reply_abc", "msg123", 2_000).unwrap();
        let mut t = h.clone().into_bytes();
        let last = t.len() - 3;
        t[last] = if t[last] == b'A' { b'B' } else { b'A' };
        let t = String::from_utf8(t).unwrap();
        assert_eq!(s.open(I, &t, 1_000), Err(HandleError::Forged));
        let other = "0000aaaa-0000-4000-8000-000000000002";
        assert_eq!(s.open(other, &h, 1_000), Err(HandleError::Forged));
        assert_eq!(s.open(I, &h, 2_500), Err(HandleError::Expired(500)));
        assert_eq!(
            Sealer::from_secrets(&[&[8u8; 32]]).open(I, &h, 1_000),
            Err(HandleError::Forged)
        );
        assert_eq!(
            Sealer::default().open(I, &h, 1_000),
            Err(HandleError::NoKeys)
        );
        for bad in ["", "reply_abc", "th1.!!", "th1.AAAA", &"x".repeat(5000)] {
            assert!(s.open(I, bad, 0).is_err(), "{bad}");
        }
    }

    #[test]
    fn rotation_the_first_key_seals_all_open() {
        let old = Sealer::from_secrets(&[b"old-secret-old-secret-old-secret"]);
        let h = old.seal(I, "q", "m", 10).unwrap();
        let both = Sealer::from_secrets(&[
            b"new-secret-new-secret-new-secret",
            b"old-secret-old-secret-old-secret",
        ]);
        assert!(both.open(I, &h, 0).is_ok());
        let h2 = both.seal(I, "q", "m", 10).unwrap();
        assert_eq!(old.open(I, &h2, 0), Err(HandleError::Forged));
    }

    #[test]
    fn key_files_are_checked() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("k");
        std::fs::write(&p, [1u8; 16]).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(matches!(
            Sealer::load(std::slice::from_ref(&p)),
            Err(KeyError::Short { .. })
        ));
        std::fs::write(&p, [1u8; 32]).unwrap();
        assert!(Sealer::load(std::slice::from_ref(&p)).unwrap().enabled());
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(Sealer::load(&[p]), Err(KeyError::Exposed { .. })));
    }
}
