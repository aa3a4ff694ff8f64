//! `sidekey mint`: signs a key with the first secret of an `hs256_secret_file`, for backends that
//! shell out and for tests. What it writes is what the verifier reads (see `claims`).

use std::path::PathBuf;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::Serialize;

use super::verifier::{hs256_secrets, KeyFileError};
use crate::config::MAX_DURATION_SECS;

/// What to put in the key. `ttl_secs` becomes `exp = now + ttl`, with `iat = now`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MintArgs {
    pub secret_file: PathBuf,
    pub ttl_secs: u64,
    pub models: Vec<String>,
    pub max_tokens: Option<u64>,
    pub budget_tokens: Option<u64>,
    pub sub: Option<String>,
    pub event_id: Option<String>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub client: Option<String>,
    /// `None`: 128 random bits, hex.
    pub jti: Option<String>,
}

/// The `--ttl` when none is given: short-lived is the point.
pub const DEFAULT_TTL_SECS: u64 = 600;

impl MintArgs {
    /// Arguments with the default TTL and nothing else set.
    pub fn new(secret_file: impl Into<PathBuf>) -> Self {
        Self {
            secret_file: secret_file.into(),
            ttl_secs: DEFAULT_TTL_SECS,
            models: Vec::new(),
            max_tokens: None,
            budget_tokens: None,
            sub: None,
            event_id: None,
            issuer: None,
            audience: None,
            client: None,
            jti: None,
        }
    }
}

/// Minting failed. Never carries the secret.
#[derive(Debug, thiserror::Error)]
pub enum MintError {
    #[error(transparent)]
    Secret(#[from] KeyFileError),
    #[error("cannot sign the key: {0}")]
    Sign(#[source] jsonwebtoken::errors::Error),
    #[error("cannot draw a random jti")]
    Random,
}

#[derive(Serialize)]
struct Claims<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sub: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    aud: Option<&'a str>,
    exp: u64,
    iat: u64,
    jti: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    event_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    model: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    budget_tokens: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    client: Option<&'a str>,
}

/// Signs a key (HS256) issued at `now_unix`.
pub fn mint(args: &MintArgs, now_unix: u64) -> Result<String, MintError> {
    let bytes = std::fs::read(&args.secret_file)
        .map_err(|source| KeyFileError::Read { path: args.secret_file.clone(), source })?;
    let secrets = hs256_secrets(&args.secret_file, &bytes)?;
    let jti = match &args.jti {
        Some(jti) => jti.clone(),
        None => random_jti()?,
    };
    let model = match args.models.as_slice() {
        [] => None,
        [one] => Some(serde_json::Value::from(one.as_str())),
        many => Some(serde_json::Value::from(many.to_vec())),
    };
    let claims = Claims {
        iss: args.issuer.as_deref(),
        sub: args.sub.as_deref(),
        aud: args.audience.as_deref(),
        exp: now_unix.saturating_add(args.ttl_secs),
        iat: now_unix,
        jti: &jti,
        event_id: args.event_id.as_deref(),
        model,
        max_tokens: args.max_tokens,
        budget_tokens: args.budget_tokens,
        client: args.client.as_deref(),
    };
    jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secrets[0]))
        .map_err(MintError::Sign)
}

fn random_jti() -> Result<String, MintError> {
    use ring::rand::SecureRandom;
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut bytes).map_err(|_| MintError::Random)?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

/// Parses a `--ttl`: a positive number with a unit, `90s`, `10m`, `2h` or `1d`, up to a year.
pub fn parse_ttl(text: &str) -> Result<u64, &'static str> {
    const EXPECTED: &str = "expected a number with a unit: 90s, 10m, 2h or 1d";
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or(EXPECTED)?;
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits.parse().map_err(|_| EXPECTED)?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(EXPECTED),
    };
    match n.checked_mul(scale) {
        Some(0) => Err("must be greater than 0"),
        Some(secs) if secs <= MAX_DURATION_SECS => Ok(secs),
        _ => Err("is too long (at most 365d)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signed::testutil::{hs256_config, tempdir, SECRET_A};
    use crate::signed::Verifier;

    const NOW: u64 = 1_700_000_000;

    #[test]
    fn ttl_units() {
        assert_eq!(parse_ttl("90s"), Ok(90));
        assert_eq!(parse_ttl("10m"), Ok(600));
        assert_eq!(parse_ttl("2h"), Ok(7200));
        assert_eq!(parse_ttl("1d"), Ok(86_400));
        assert_eq!(parse_ttl("365d"), Ok(MAX_DURATION_SECS));
        for bad in ["", "10", "m", "10x", "1.5h", "-1m", " 10m", "10 m", "10mm"] {
            assert!(parse_ttl(bad).is_err(), "{bad:?}");
        }
        assert_eq!(parse_ttl("0s"), Err("must be greater than 0"));
        assert!(parse_ttl("366d").is_err());
        assert!(parse_ttl("99999999999999999999d").is_err());
    }

    #[test]
    fn a_minted_key_verifies_with_every_claim() {
        let dir = tempdir();
        let config = hs256_config(dir.path(), &[SECRET_A]);
        let args = MintArgs {
            models: vec!["GigaChat/*".into(), "gpt-4o".into()],
            max_tokens: Some(512),
            budget_tokens: Some(20_000),
            sub: Some("user-42".into()),
            event_id: Some("ev-1".into()),
            issuer: Some("backend".into()),
            audience: Some("sidekey".into()),
            client: Some("mobile".into()),
            jti: Some("k-1".into()),
            ttl_secs: 600,
            ..MintArgs::new(config.hs256_secret_file.clone().unwrap())
        };
        let token = mint(&args, NOW).unwrap();
        let config = crate::signed::SignedKeysConfig {
            issuer: Some("backend".into()),
            audience: Some("sidekey".into()),
            ..config
        };
        let key = Verifier::new(&config).unwrap().verify(&token, NOW).unwrap();
        assert_eq!((key.exp(), key.iat()), (NOW + 600, Some(NOW)));
        assert_eq!(
            (key.sub(), key.event_id(), key.jti(), key.client()),
            (Some("user-42"), Some("ev-1"), Some("k-1"), Some("mobile"))
        );
        assert_eq!((key.max_tokens(), key.budget_tokens()), (Some(512), Some(20_000)));
        assert!(
            key.allows_model("GigaChat/GigaChat-2-Max")
                && key.allows_model("gpt-4o")
                && !key.allows_model("o3")
        );
    }

    #[test]
    fn signs_with_the_first_secret_and_draws_a_random_jti() {
        let dir = tempdir();
        let config = hs256_config(dir.path(), &[SECRET_A, crate::signed::testutil::SECRET_B]);
        let args = MintArgs {
            models: vec!["one".into()],
            ..MintArgs::new(config.hs256_secret_file.clone().unwrap())
        };
        let (a, b) = (mint(&args, NOW).unwrap(), mint(&args, NOW).unwrap());
        let verifier = Verifier::new(&config).unwrap();
        let (ka, kb) = (verifier.verify(&a, NOW).unwrap(), verifier.verify(&b, NOW).unwrap());
        let jti = ka.jti().unwrap();
        assert_eq!(jti.len(), 32);
        assert!(jti.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(ka.jti(), kb.jti());
        assert_eq!(ka.exp(), NOW + DEFAULT_TTL_SECS);
        assert_eq!(ka.models(), Some(&["one".to_string()][..]));
        let only_a = hs256_config(&dir.path().join("a"), &[SECRET_A]);
        assert!(Verifier::new(&only_a).unwrap().verify(&a, NOW).is_ok(), "signed with the first line");
    }

    #[test]
    fn secret_file_errors_never_show_the_secret() {
        let dir = tempdir();
        let missing = MintArgs::new(dir.path().join("missing"));
        let err = mint(&missing, NOW).unwrap_err().to_string();
        assert!(err.starts_with("cannot read ") && err.contains("missing"), "{err}");
        let short = dir.path().join("short");
        std::fs::write(&short, "tooshort-secret\n").unwrap();
        let err = mint(&MintArgs::new(&short), NOW).unwrap_err().to_string();
        assert!(err.contains("shorter than 32 bytes") && !err.contains("tooshort"), "{err}");
    }
}
