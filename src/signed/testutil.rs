//! Test helpers: scratch directories, key files and tokens signed in the test.

use std::path::{Path, PathBuf};

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use ring::signature::KeyPair;
use serde_json::Value;

use super::SignedKeysConfig;

/// HS256 secrets of the minimum length and more.
pub(crate) const SECRET_A: &str = "secret-a-0123456789abcdef0123456789";
pub(crate) const SECRET_B: &str = "secret-b-0123456789abcdef0123456789-longer";

/// A scratch directory removed on drop.
pub(crate) struct TempDir(PathBuf);

impl TempDir {
    pub(crate) fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(crate) fn tempdir() -> TempDir {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("sidekey-signed-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

/// A config whose `hs256_secret_file` (in `dir`, created if needed) holds `secrets`, one a line.
pub(crate) fn hs256_config(dir: &Path, secrets: &[&str]) -> SignedKeysConfig {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("signing-key");
    std::fs::write(&path, secrets.join("\n") + "\n").unwrap();
    SignedKeysConfig { hs256_secret_file: Some(path), ..Default::default() }
}

/// A config whose `public_key_file` (in `dir`) holds `pem`.
pub(crate) fn public_key_config(dir: &Path, pem: &str) -> SignedKeysConfig {
    let path = dir.join("backend.pub.pem");
    std::fs::write(&path, pem).unwrap();
    SignedKeysConfig { public_key_file: Some(path), ..Default::default() }
}

/// Signs `claims` with HS256 and `secret`.
pub(crate) fn hs256(secret: &str, claims: &Value) -> String {
    sign(Algorithm::HS256, &EncodingKey::from_secret(secret.as_bytes()), claims)
}

pub(crate) fn sign(alg: Algorithm, key: &EncodingKey, claims: &Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), claims, key).unwrap()
}

/// A token with exactly this header and payload text, signed with HS256 and `secret` (or with an
/// empty signature): for tokens `jsonwebtoken::encode` would not write.
pub(crate) fn raw_token(header: &str, payload: &str, secret: Option<&[u8]>) -> String {
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use base64::Engine;
    let message = format!("{}.{}", URL_SAFE_NO_PAD.encode(header), URL_SAFE_NO_PAD.encode(payload));
    let signature = match secret {
        Some(s) => {
            jsonwebtoken::crypto::sign(message.as_bytes(), &EncodingKey::from_secret(s), Algorithm::HS256)
                .unwrap()
        }
        None => String::new(),
    };
    format!("{message}.{signature}")
}

/// A fresh key pair: the signing key and the public key as PEM (SubjectPublicKeyInfo).
pub(crate) struct Asymmetric {
    pub(crate) alg: Algorithm,
    pub(crate) signing: EncodingKey,
    pub(crate) public_pem: String,
}

impl Asymmetric {
    pub(crate) fn ed25519() -> Self {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
        let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref()).unwrap();
        // SEQUENCE { SEQUENCE { OID 1.3.101.112 }, BIT STRING { key } }
        let mut spki = vec![0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
        spki.extend_from_slice(pair.public_key().as_ref());
        Self {
            alg: Algorithm::EdDSA,
            signing: EncodingKey::from_ed_der(pkcs8.as_ref()),
            public_pem: pem::encode(&pem::Pem::new("PUBLIC KEY", spki)),
        }
    }

    pub(crate) fn p256() -> Self {
        use ring::signature::{EcdsaKeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng).unwrap();
        // SEQUENCE { SEQUENCE { OID ecPublicKey, OID prime256v1 }, BIT STRING { point } }
        let mut spki = vec![
            0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
            0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
        ];
        spki.extend_from_slice(pair.public_key().as_ref());
        Self {
            alg: Algorithm::ES256,
            signing: EncodingKey::from_ec_der(pkcs8.as_ref()),
            public_pem: pem::encode(&pem::Pem::new("PUBLIC KEY", spki)),
        }
    }

    pub(crate) fn sign(&self, claims: &Value) -> String {
        sign(self.alg, &self.signing, claims)
    }
}
