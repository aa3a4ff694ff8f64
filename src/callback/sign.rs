//! The callback signature: `X-Sidekey-Signature: sha256=<hex>` over `"<timestamp>.<body>"`
//! with HMAC-SHA256 (`ring::hmac`), and `X-Sidekey-Timestamp: <timestamp>` (unix seconds).
//!
//! The timestamp is inside the MAC so a captured POST cannot be replayed later: a receiver
//! refuses timestamps too far from its clock. The key is the content of `secret_file` with
//! surrounding whitespace trimmed, re-read before every POST.

use std::fmt;
use std::path::{Path, PathBuf};

use ring::hmac;

/// The header carrying `sha256=<hex HMAC>`.
pub const SIGNATURE_HEADER: &str = "x-sidekey-signature";
/// The header carrying the signed unix timestamp, in seconds.
pub const TIMESTAMP_HEADER: &str = "x-sidekey-timestamp";

/// `sha256=` and the lowercase hex HMAC-SHA256 of `"<timestamp>.<body>"` under `key`.
pub fn signature(key: &[u8], timestamp: u64, body: &[u8]) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    let mut ctx = hmac::Context::with_key(&key);
    ctx.update(timestamp.to_string().as_bytes());
    ctx.update(b".");
    ctx.update(body);
    let tag = ctx.sign();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in tag.as_ref() {
        out.push(char::from(HEX[usize::from(b >> 4)]));
        out.push(char::from(HEX[usize::from(b & 0xf)]));
    }
    out
}

const HEX: &[u8; 16] = b"0123456789abcdef";

/// Reading the signing key failed. Never carries the key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read the callback signing key {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the callback signing key {} is empty", .0.display())]
    Empty(PathBuf),
}

/// The signing key file, re-read on every [`SigningKey::load`]; the last good key stays in use
/// while the file is briefly missing or empty (a Secret volume mid-update).
pub struct SigningKey {
    path: PathBuf,
    last: Option<Vec<u8>>,
}

impl SigningKey {
    pub fn new(path: &Path) -> Self {
        Self { path: path.to_path_buf(), last: None }
    }

    /// The key to sign the next POST with: the file as it is now, else the last good key.
    /// Fails only if the file has never been read successfully, so nothing goes out unsigned.
    pub async fn load(&mut self) -> Result<&[u8], KeyError> {
        match read(&self.path).await {
            Ok(key) => {
                self.last = Some(key);
            }
            Err(e) if self.last.is_some() => {
                tracing::warn!(error = %e, "Cannot re-read the usage callback signing key; signing with the last good key");
            }
            Err(e) => return Err(e),
        }
        Ok(self.last.as_deref().unwrap_or_default())
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("path", &self.path)
            .field("key", &self.last.as_ref().map(|_| crate::secret::REDACTED))
            .finish()
    }
}

async fn read(path: &Path) -> Result<Vec<u8>, KeyError> {
    let raw = tokio::fs::read(path).await.map_err(|source| KeyError::Read { path: path.into(), source })?;
    let key = raw.trim_ascii();
    if key.is_empty() {
        return Err(KeyError::Empty(path.into()));
    }
    Ok(key.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_is_hmac_sha256_of_timestamp_dot_body() {
        // From Python: hmac.new(b"k3y", b"1700000000.[]", hashlib.sha256).hexdigest()
        assert_eq!(
            signature(b"k3y", 1_700_000_000, b"[]"),
            "sha256=342d7c0012bc22a9a1afe63e534f7b846cc38261e899a32d9e3204060aaa18d6"
        );
        let body = br#"[{"id":"x"}]"#;
        let sig = signature(b"secret", 42, body);
        let tag: Vec<u8> =
            (7..sig.len()).step_by(2).map(|i| u8::from_str_radix(&sig[i..i + 2], 16).unwrap()).collect();
        let key = hmac::Key::new(hmac::HMAC_SHA256, b"secret");
        hmac::verify(&key, br#"42.[{"id":"x"}]"#, &tag).unwrap();
        assert!(hmac::verify(&key, br#"43.[{"id":"x"}]"#, &tag).is_err(), "the timestamp is signed");
        assert!(hmac::verify(&key, body, &tag).is_err(), "the body alone is not what is signed");
    }

    #[tokio::test]
    async fn key_is_trimmed_reread_and_kept_while_missing() {
        let dir = std::env::temp_dir().join(format!("sidekey-sign-{:016x}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        let mut key = SigningKey::new(&path);
        assert!(matches!(key.load().await, Err(KeyError::Read { .. })), "never read: no key");
        std::fs::write(&path, "first\n").unwrap();
        assert_eq!(key.load().await.unwrap(), b"first");
        std::fs::write(&path, "  second \r\n").unwrap();
        assert_eq!(key.load().await.unwrap(), b"second");
        std::fs::remove_file(&path).unwrap();
        assert_eq!(key.load().await.unwrap(), b"second", "the last good key while the file is gone");
        std::fs::write(&path, "\n").unwrap();
        assert_eq!(key.load().await.unwrap(), b"second", "an empty file is not a key");
        assert!(!format!("{key:?}").contains("second"));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
