//! `[signed_keys]`: where the verifying key lives, the claim rules, who pays and where budgets
//! are kept.

use std::path::PathBuf;

use serde::{Deserialize, Serialize, Serializer};

use crate::config::{ConfigError, MAX_DURATION_SECS};

/// How signed keys are verified. Exactly one of `hs256_secret_file` and `public_key_file` is set.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SignedKeysConfig {
    /// HS256 shared secrets, one per line (each at least 32 bytes, used as written, not
    /// base64-decoded). Several lines make a rotation window: a key signed by any of them verifies.
    pub hs256_secret_file: Option<PathBuf>,
    /// One PEM public key (`-----BEGIN PUBLIC KEY-----`): P-256 for ES256 or Ed25519 for EdDSA,
    /// told apart by the key itself. The backend keeps the private key; sidekey can only verify.
    pub public_key_file: Option<PathBuf>,
    /// When set, `iss` must equal it.
    pub issuer: Option<String>,
    /// When set, `aud` (a string or one of a list) must equal it.
    pub audience: Option<String>,
    /// Clock skew allowed on `exp`, `nbf` and `iat`: backend and gateway clocks disagree a little.
    pub leeway_secs: u64,
    /// Keys whose `exp - iat` (or `exp - now` without `iat`) is longer are refused, so a leaked
    /// key cannot live for years.
    pub max_lifetime_secs: u64,
    /// The credential set that pays for signed-key requests.
    pub credentials: String,
    /// `memory` (a bounded map per replica) or `redis://host:6379/0` (shared by replicas).
    /// Serialized with any user info redacted: the URL may carry the Redis password.
    #[serde(serialize_with = "serialize_store")]
    pub budget_store: String,
    /// When the budget store is unreachable: `false` refuses budgeted keys with 503 (a budget
    /// that cannot be checked is not a budget), `true` admits them uncharged.
    pub budget_fail_open: bool,
    /// How often the key file is re-checked for a rotation.
    pub key_poll_secs: u64,
}

impl std::fmt::Debug for SignedKeysConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // A Redis URL may carry a password.
        f.debug_struct("SignedKeysConfig")
            .field("hs256_secret_file", &self.hs256_secret_file)
            .field("public_key_file", &self.public_key_file)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("leeway_secs", &self.leeway_secs)
            .field("max_lifetime_secs", &self.max_lifetime_secs)
            .field("credentials", &self.credentials)
            .field("budget_store", &crate::config::redact_url(&self.budget_store))
            .field("budget_fail_open", &self.budget_fail_open)
            .field("key_poll_secs", &self.key_poll_secs)
            .finish()
    }
}

impl Default for SignedKeysConfig {
    fn default() -> Self {
        Self {
            hs256_secret_file: None,
            public_key_file: None,
            issuer: None,
            audience: None,
            leeway_secs: 30,
            max_lifetime_secs: 86_400,
            credentials: "default".into(),
            budget_store: "memory".into(),
            budget_fail_open: false,
            key_poll_secs: 10,
        }
    }
}

fn serialize_store<S: Serializer>(store: &str, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&crate::config::redact_url(store))
}

impl SignedKeysConfig {
    /// Checks the section; `prefix` is its key (`signed_keys`) so errors name the full key.
    /// A key file that was given must exist; whether it holds a usable key is
    /// [`Verifier::new`](super::Verifier::new)'s check.
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        let key = |name: &str| format!("{prefix}.{name}");
        let invalid = |name: &str, reason: String| ConfigError::Invalid { key: key(name), reason };
        let (file_key, path) = match (&self.hs256_secret_file, &self.public_key_file) {
            (Some(_), Some(_)) => {
                return Err(invalid(
                    "hs256_secret_file",
                    "set either hs256_secret_file or public_key_file, not both".into(),
                ))
            }
            (None, None) => {
                return Err(invalid(
                    "hs256_secret_file",
                    "missing (set hs256_secret_file or public_key_file)".into(),
                ))
            }
            (Some(path), None) => ("hs256_secret_file", path),
            (None, Some(path)) => ("public_key_file", path),
        };
        if !path.is_file() {
            return Err(invalid(file_key, format!("{} does not exist", path.display())));
        }
        for (name, value) in [("issuer", &self.issuer), ("audience", &self.audience)] {
            if value.as_deref() == Some("") {
                return Err(invalid(name, "must not be empty (leave it unset to accept any)".into()));
            }
        }
        if self.credentials.is_empty() {
            return Err(invalid("credentials", "must name a credential set".into()));
        }
        let store = self.budget_store.as_str();
        let redis_host = store.strip_prefix("redis://").map(|rest| rest.split('/').next().unwrap_or(""));
        match (store, redis_host) {
            ("memory", _) => {}
            (_, Some(host)) if !host.is_empty() && !host.ends_with('@') => {}
            (_, Some(_)) => return Err(invalid("budget_store", "redis:// URL has no host".into())),
            // The value is not echoed: a mistyped URL may still carry a password.
            _ => return Err(invalid("budget_store", "must be \"memory\" or a redis:// URL".into())),
        }
        for (name, value) in [
            ("leeway_secs", self.leeway_secs),
            ("max_lifetime_secs", self.max_lifetime_secs),
            ("key_poll_secs", self.key_poll_secs),
        ] {
            if value > MAX_DURATION_SECS {
                return Err(invalid(
                    name,
                    format!("{value} is too large (at most {MAX_DURATION_SECS} seconds (one year))"),
                ));
            }
        }
        for (name, value) in
            [("max_lifetime_secs", self.max_lifetime_secs), ("key_poll_secs", self.key_poll_secs)]
        {
            if value == 0 {
                return Err(invalid(name, "must be greater than 0".into()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signed::testutil::tempdir;

    fn with_secret(dir: &std::path::Path) -> SignedKeysConfig {
        let path = dir.join("secret");
        std::fs::write(&path, "x".repeat(32)).unwrap();
        SignedKeysConfig { hs256_secret_file: Some(path), ..Default::default() }
    }

    fn invalid_key(c: &SignedKeysConfig) -> String {
        match c.validate("signed_keys") {
            Err(ConfigError::Invalid { key, .. }) => key,
            other => panic!("expected an invalid key, got {other:?}"),
        }
    }

    #[test]
    fn defaults_follow_the_issue() {
        let c: SignedKeysConfig = toml::from_str("").unwrap();
        assert_eq!(c, SignedKeysConfig::default());
        assert_eq!((c.leeway_secs, c.max_lifetime_secs, c.key_poll_secs), (30, 86_400, 10));
        assert_eq!(
            (c.credentials.as_str(), c.budget_store.as_str(), c.budget_fail_open),
            ("default", "memory", false)
        );
        assert!(toml::from_str::<SignedKeysConfig>("frobnicate = 1").is_err(), "unknown keys are refused");
    }

    #[test]
    fn a_valid_section_passes() {
        let dir = tempdir();
        let mut c = with_secret(dir.path());
        c.validate("signed_keys").unwrap();
        c.budget_store = "redis://redis.sidekey.svc:6379/0".into();
        c.validate("signed_keys").unwrap();
        let public = dir.path().join("pub.pem");
        std::fs::write(&public, "not checked here").unwrap();
        let c = SignedKeysConfig { public_key_file: Some(public), ..Default::default() };
        c.validate("signed_keys").unwrap();
    }

    #[test]
    fn errors_name_the_key() {
        let dir = tempdir();
        let good = with_secret(dir.path());
        type Change = Box<dyn Fn(&mut SignedKeysConfig)>;
        let cases: Vec<(&str, Change)> = vec![
            ("signed_keys.hs256_secret_file", Box::new(|c| c.hs256_secret_file = None)),
            ("signed_keys.hs256_secret_file", Box::new(|c| c.public_key_file = Some("/x".into()))),
            (
                "signed_keys.hs256_secret_file",
                Box::new(|c| c.hs256_secret_file = Some("/nonexistent".into())),
            ),
            (
                "signed_keys.public_key_file",
                Box::new(|c| {
                    c.hs256_secret_file = None;
                    c.public_key_file = Some("/nonexistent.pem".into());
                }),
            ),
            ("signed_keys.issuer", Box::new(|c| c.issuer = Some(String::new()))),
            ("signed_keys.audience", Box::new(|c| c.audience = Some(String::new()))),
            ("signed_keys.credentials", Box::new(|c| c.credentials.clear())),
            ("signed_keys.budget_store", Box::new(|c| c.budget_store = "memcached://x".into())),
            ("signed_keys.budget_store", Box::new(|c| c.budget_store = "redis://".into())),
            ("signed_keys.budget_store", Box::new(|c| c.budget_store = "redis://:pw@/0".into())),
            ("signed_keys.leeway_secs", Box::new(|c| c.leeway_secs = MAX_DURATION_SECS + 1)),
            ("signed_keys.max_lifetime_secs", Box::new(|c| c.max_lifetime_secs = MAX_DURATION_SECS + 1)),
            ("signed_keys.max_lifetime_secs", Box::new(|c| c.max_lifetime_secs = 0)),
            ("signed_keys.key_poll_secs", Box::new(|c| c.key_poll_secs = 0)),
        ];
        for (want, change) in cases {
            let mut c = good.clone();
            change(&mut c);
            assert_eq!(invalid_key(&c), want, "{c:?}");
        }
        let mut c = good.clone();
        c.leeway_secs = MAX_DURATION_SECS;
        c.max_lifetime_secs = MAX_DURATION_SECS;
        c.validate("signed_keys").expect("one year is the inclusive bound");
    }

    #[test]
    fn the_redis_password_is_never_shown() {
        let dir = tempdir();
        let mut c = with_secret(dir.path());
        c.budget_store = "redis://:hunter2pw@redis:6379/0".into();
        let shown = toml::to_string(&c).unwrap();
        assert!(!shown.contains("hunter2pw"), "{shown}");
        assert!(shown.contains("redis:6379/0"), "{shown}");
        c.budget_store = "rediss://:hunter2pw@redis:6379/0".into();
        let err = c.validate("signed_keys").unwrap_err().to_string();
        assert!(!err.contains("hunter2pw"), "{err}");
    }
}
