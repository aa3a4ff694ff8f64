//! The verifier: the keys from `hs256_secret_file` or `public_key_file` behind an `ArcSwap`, the
//! signature check (by `jsonwebtoken` on `ring`), and the loop that re-reads the file.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

use super::claims::{self, Rules, SignedKey, SignedKeyError};
use super::SignedKeysConfig;

/// Longer keys are refused before any parsing: real ones are a few hundred bytes.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// RFC 7518 §3.2: an HS256 key must be at least as long as the hash output.
pub const MIN_SECRET_BYTES: usize = 32;

/// A key file that cannot be used. Never carries key material.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("set exactly one of hs256_secret_file and public_key_file")]
    NoKeyFile,
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} holds no secret", .0.display())]
    Empty(PathBuf),
    #[error("{}: the secret on line {line} is shorter than {MIN_SECRET_BYTES} bytes", path.display())]
    ShortSecret { path: PathBuf, line: usize },
    #[error("{}: {reason}", path.display())]
    PublicKey { path: PathBuf, reason: &'static str },
}

/// Verifies signed keys. A cheap `Clone` handle: clones share the keys, and a reload seen by one
/// is seen by all.
#[derive(Clone)]
pub struct Verifier {
    inner: Arc<Inner>,
}

struct Inner {
    source: Source,
    rules: Rules,
    poll: Duration,
    keys: ArcSwap<KeySet>,
    /// The last reload failed: warn once per failure streak, not on every poll.
    failing: AtomicBool,
}

#[derive(Debug, Clone)]
enum Source {
    Hs256(PathBuf),
    PublicKey(PathBuf),
}

impl Source {
    fn path(&self) -> &Path {
        match self {
            Source::Hs256(p) | Source::PublicKey(p) => p,
        }
    }
}

/// The decoded keys of one version of the key file.
struct KeySet {
    alg: Algorithm,
    /// Any of them verifies (several only for HS256 rotation).
    keys: Vec<DecodingKey>,
    validation: Validation,
    /// SHA-256 of the file as read: a reload swaps only when it changes.
    digest: [u8; 32],
}

impl fmt::Debug for Verifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let keys = self.inner.keys.load();
        f.debug_struct("Verifier")
            .field("file", &self.inner.source.path())
            .field("algorithm", &keys.alg)
            .field("keys", &keys.keys.len())
            .field("rules", &self.inner.rules)
            .finish()
    }
}

impl Verifier {
    /// Reads the configured key file. Fails if it is missing, unreadable or holds no usable key.
    pub fn new(config: &SignedKeysConfig) -> Result<Self, KeyFileError> {
        let source = match (&config.hs256_secret_file, &config.public_key_file) {
            (Some(path), None) => Source::Hs256(path.clone()),
            (None, Some(path)) => Source::PublicKey(path.clone()),
            _ => return Err(KeyFileError::NoKeyFile),
        };
        let keys = KeySet::load(&source, &read(source.path())?)?;
        let rules = Rules {
            issuer: config.issuer.clone(),
            audience: config.audience.clone(),
            leeway_secs: config.leeway_secs,
            max_lifetime_secs: config.max_lifetime_secs,
        };
        Ok(Self {
            inner: Arc::new(Inner {
                source,
                rules,
                poll: Duration::from_secs(config.key_poll_secs.max(1)),
                keys: ArcSwap::from_pointee(keys),
                failing: AtomicBool::new(false),
            }),
        })
    }

    /// The algorithm the configured key verifies: `HS256`, `ES256` or `EdDSA`. Tokens signed
    /// with any other are refused as malformed.
    pub fn algorithm(&self) -> &'static str {
        match self.inner.keys.load().alg {
            Algorithm::HS256 => "HS256",
            Algorithm::ES256 => "ES256",
            Algorithm::EdDSA => "EdDSA",
            _ => "unsupported",
        }
    }

    /// How many keys verify right now (HS256 secrets in the rotation window, or 1).
    pub fn key_count(&self) -> usize {
        self.inner.keys.load().keys.len()
    }

    /// Checks the signature, then the claims against the rules at `now_unix` (seconds since the
    /// epoch). Lock-free; the token is neither stored nor logged.
    pub fn verify(&self, token: &str, now_unix: u64) -> Result<SignedKey, SignedKeyError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(SignedKeyError::Malformed("too long"));
        }
        let keys = self.inner.keys.load();
        // Checked before the library so `alg: none`, a symmetric/asymmetric mix-up and a
        // parse error in the header are all "algorithm not accepted", not a library message.
        match header_alg(token) {
            Some(alg) if alg == alg_name(keys.alg) => {}
            Some(_) => {
                return Err(SignedKeyError::Malformed("algorithm not accepted for the configured key"))
            }
            None => return Err(SignedKeyError::Malformed("not a JWT")),
        }
        for key in &keys.keys {
            match jsonwebtoken::decode::<Map<String, Value>>(token, key, &keys.validation) {
                Ok(data) => return claims::check(&data.claims, &self.inner.rules, now_unix),
                Err(e) if *e.kind() == ErrorKind::InvalidSignature => continue,
                Err(e) => return Err(malformed(e.kind())),
            }
        }
        Err(SignedKeyError::BadSignature)
    }

    /// Re-reads the key file and swaps the keys in if its content changed: `Ok(true)` when it
    /// did. A file that became unreadable or invalid leaves the last good keys in place (logged
    /// once per failure streak, never with key material).
    pub fn reload(&self) -> Result<bool, KeyFileError> {
        let inner = &*self.inner;
        let result = read(inner.source.path()).and_then(|bytes| {
            if digest(&bytes) == inner.keys.load().digest {
                return Ok(false);
            }
            let keys = KeySet::load(&inner.source, &bytes)?;
            let (alg, count) = (keys.alg, keys.keys.len());
            inner.keys.store(Arc::new(keys));
            tracing::info!(path = %inner.source.path().display(), algorithm = ?alg, keys = count, "Signed-key verification keys reloaded");
            Ok(true)
        });
        match &result {
            Ok(_) => {
                if inner.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(path = %inner.source.path().display(), "Signed-key file is usable again");
                }
            }
            Err(e) => {
                if !inner.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(error = %e, "Signed-key file cannot be reloaded; keeping the last good keys");
                }
            }
        }
        result
    }

    /// Re-checks the key file every `key_poll_secs` until `cancel` fires.
    pub async fn run(self, cancel: CancellationToken) {
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(self.inner.poll) => {}
            }
            let this = self.clone();
            // A small file, but a read can still stall on a slow volume: keep it off the runtime.
            // Failures are logged by reload itself.
            let _ = tokio::task::spawn_blocking(move || this.reload()).await;
        }
    }
}

impl KeySet {
    fn load(source: &Source, bytes: &[u8]) -> Result<Self, KeyFileError> {
        let (alg, keys) = match source {
            Source::Hs256(path) => (Algorithm::HS256, hs256_keys(path, bytes)?),
            Source::PublicKey(path) => {
                let (alg, key) = public_key(path, bytes)?;
                (alg, vec![key])
            }
        };
        // Time, issuer and audience are checked by `claims::check` with an explicit `now`; the
        // library checks the shape, the algorithm and the signature.
        let mut validation = Validation::new(alg);
        validation.required_spec_claims.clear();
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.validate_aud = false;
        validation.leeway = 0;
        Ok(Self { alg, keys, validation, digest: digest(bytes) })
    }
}

fn read(path: &Path) -> Result<Vec<u8>, KeyFileError> {
    std::fs::read(path).map_err(|source| KeyFileError::Read { path: path.to_path_buf(), source })
}

fn digest(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The secrets of an `hs256_secret_file`: one per non-empty line, surrounding whitespace trimmed,
/// the bytes used as written. Shared with `sidekey mint`, which signs with the first.
pub(crate) fn hs256_secrets<'a>(path: &Path, bytes: &'a [u8]) -> Result<Vec<&'a [u8]>, KeyFileError> {
    let mut secrets = Vec::new();
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let line = line.trim_ascii();
        if line.is_empty() {
            continue;
        }
        if line.len() < MIN_SECRET_BYTES {
            return Err(KeyFileError::ShortSecret { path: path.to_path_buf(), line: i + 1 });
        }
        secrets.push(line);
    }
    if secrets.is_empty() {
        return Err(KeyFileError::Empty(path.to_path_buf()));
    }
    Ok(secrets)
}

fn hs256_keys(path: &Path, bytes: &[u8]) -> Result<Vec<DecodingKey>, KeyFileError> {
    Ok(hs256_secrets(path, bytes)?.into_iter().map(DecodingKey::from_secret).collect())
}

/// DER of the algorithm identifiers in a SubjectPublicKeyInfo.
const OID_ED25519: &[u8] = &[0x06, 0x03, 0x2b, 0x65, 0x70];
const OID_EC_PUBLIC_KEY: &[u8] = &[0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];
const OID_P256: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const OID_RSA: &[u8] = &[0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];

/// One PEM public key: Ed25519 (EdDSA) or P-256 (ES256), told apart by its algorithm identifier.
/// The library parses the key; the identifier only picks which parser and gives clear errors.
fn public_key(path: &Path, bytes: &[u8]) -> Result<(Algorithm, DecodingKey), KeyFileError> {
    let err = |reason| KeyFileError::PublicKey { path: path.to_path_buf(), reason };
    let blocks = pem::parse_many(bytes).map_err(|_| err("is not a PEM file"))?;
    let block = match blocks.as_slice() {
        [] => return Err(err("is not a PEM file")),
        [one] => one,
        _ => return Err(err("holds more than one PEM block; give one public key")),
    };
    if block.tag().contains("PRIVATE") {
        return Err(err("holds a private key; give sidekey the public key only"));
    }
    if block.tag() != "PUBLIC KEY" {
        return Err(err("is not a PEM public key (-----BEGIN PUBLIC KEY-----)"));
    }
    let der = block.contents();
    let has = |oid: &[u8]| der.windows(oid.len()).any(|w| w == oid);
    let (alg, key) = if has(OID_ED25519) {
        (Algorithm::EdDSA, DecodingKey::from_ed_pem(bytes))
    } else if has(OID_EC_PUBLIC_KEY) && has(OID_P256) {
        (Algorithm::ES256, DecodingKey::from_ec_pem(bytes))
    } else if has(OID_EC_PUBLIC_KEY) {
        return Err(err("is an EC key on a curve other than P-256 (ES256 only)"));
    } else if has(OID_RSA) {
        return Err(err("is an RSA key (use ES256 or EdDSA)"));
    } else {
        return Err(err("is not an ES256 (P-256) or EdDSA (Ed25519) public key"));
    };
    Ok((alg, key.map_err(|_| err("cannot be parsed as a public key"))?))
}

fn alg_name(alg: Algorithm) -> &'static str {
    match alg {
        Algorithm::HS256 => "HS256",
        Algorithm::ES256 => "ES256",
        Algorithm::EdDSA => "EdDSA",
        _ => "",
    }
}

/// The `alg` of a JWT's header, if `token` has the shape of one: three dot-separated segments,
/// the first base64url (unpadded) JSON object with a string `alg`.
fn header_alg(token: &str) -> Option<String> {
    use base64::Engine;
    let mut parts = token.split('.');
    let (header, payload, signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || header.is_empty() || payload.is_empty() || header.len() > 1024 {
        return None;
    }
    let b64url = |s: &str| s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !b64url(header) || !b64url(payload) || !b64url(signature) {
        return None;
    }
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(header).ok()?;
    match serde_json::from_slice::<Value>(&json).ok()? {
        Value::Object(map) => match map.get("alg") {
            Some(Value::String(alg)) => Some(alg.clone()),
            _ => None,
        },
        _ => None,
    }
}

/// True if `key` has the shape of a JWT (three base64url segments, the first a JSON object with
/// `alg`), without checking a signature: how a resolver tells a signed key from a plain client
/// key. An `alg: none` token counts, so it is refused as a signed key, not looked up as a client.
pub fn looks_like_jwt(key: &str) -> bool {
    key.len() <= MAX_TOKEN_BYTES && header_alg(key).is_some()
}

/// Library errors after the signature check become fixed phrases: their own messages can quote
/// parts of the token.
fn malformed(kind: &ErrorKind) -> SignedKeyError {
    SignedKeyError::Malformed(match kind {
        ErrorKind::InvalidToken => "not a JWT",
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName | ErrorKind::MissingAlgorithm => {
            "algorithm not accepted for the configured key"
        }
        ErrorKind::Base64(_) => "not base64url",
        ErrorKind::Json(_) => "header or claims are not a JSON object",
        ErrorKind::Utf8(_) => "claims are not UTF-8",
        _ => "cannot be verified",
    })
}
