//! `[auth]` and `[auth.sets.<name>]`: token acquisition, refresh and failover for one
//! credential set each.

use std::collections::BTreeMap;
use std::collections::HashSet;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::check::{at_most, one_source, parse_base_url, positive, MAX_DURATION_SECS};
use super::ConfigError;
use crate::secret::Secret;

/// Token acquisition, refresh and failover.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// How tokens are obtained.
    pub provider: Provider,
    /// The token endpoint (Cloud.ru IAM, or the OAuth2 server's token endpoint).
    pub token_url: String,
    /// OAuth2 only: requested scope and audience, and how the client authenticates.
    pub scope: Option<String>,
    pub audience: Option<String>,
    pub client_auth: ClientAuth,
    /// Refresh this long before expiry, but no earlier than half the usable life (so short-lived
    /// tokens are refreshed at about half their life; see the README for worked examples).
    pub refresh_before_secs: u64,
    /// A token is never sent once it is this close to expiry.
    pub expiry_margin_secs: u64,
    pub connect_timeout_secs: u64,
    /// Whole IAM round trip at most.
    pub timeout_secs: u64,
    /// First retry delay after a failed fetch; doubles up to `backoff_max_ms`, jittered.
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// Consecutive transient failures of the active credential before failing over.
    pub failover_after_failures: u32,
    /// While on a backup, probe the primary at most this often.
    pub failback_after_secs: u64,
    /// Upstream 401s force at most one refresh per this interval.
    pub min_forced_refresh_interval_secs: u64,
    /// A request answered 401 waits at most this long for the forced refresh before replay.
    pub forced_refresh_timeout_secs: u64,
    /// Credential files are re-read this often; a change triggers a prompt refresh.
    pub credential_poll_secs: u64,
    /// What to do with a `key_id_file`/`secret_file` that any user on the machine can read:
    /// `warn` (log once), `refuse` (treat the credential as rejected), or `allow`.
    pub world_readable_secret_files: FilePolicy,
    /// Ordered: the first is the primary, the rest are backups.
    pub credentials: Vec<CredentialConfig>,
    /// Extra credential sets beside this one (which is called "default"), each with the same
    /// keys, its own refresher, token store, failover and readiness. Only in `[auth]`; a set's
    /// keys default to the built-in defaults, not to `[auth]`'s values.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub sets: BTreeMap<String, AuthConfig>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            provider: Provider::CloudruIam,
            token_url: DEFAULT_TOKEN_URL.into(),
            scope: None,
            audience: None,
            client_auth: ClientAuth::Basic,
            refresh_before_secs: 300,
            expiry_margin_secs: 5,
            connect_timeout_secs: 5,
            timeout_secs: 30,
            backoff_initial_ms: 1000,
            backoff_max_ms: 30_000,
            failover_after_failures: 3,
            failback_after_secs: 300,
            min_forced_refresh_interval_secs: 10,
            forced_refresh_timeout_secs: 10,
            credential_poll_secs: 10,
            world_readable_secret_files: FilePolicy::Warn,
            credentials: Vec::new(),
            sets: BTreeMap::new(),
        }
    }
}

/// The Cloud.ru IAM endpoint.
pub const DEFAULT_TOKEN_URL: &str = "https://iam.api.cloud.ru/api/v1/auth/token";

/// Where tokens come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Provider {
    /// `POST {keyId, secret}` to Cloud.ru IAM; credentials take `key_id` and `secret`.
    #[default]
    CloudruIam,
    /// A static API key sent as `Bearer` (Cloud.ru API keys, any OpenAI-compatible key);
    /// credentials take `api_key`. Files are re-read, so rotation needs no restart.
    Static,
    /// RFC 6749 §4.4 against any token endpoint; credentials take `client_id` and `client_secret`.
    Oauth2ClientCredentials,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::CloudruIam => "cloudru_iam",
            Provider::Static => "static",
            Provider::Oauth2ClientCredentials => "oauth2_client_credentials",
        }
    }
}

/// How an OAuth2 client authenticates to the token endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// HTTP Basic (`client_secret_basic`), the RFC's default.
    #[default]
    Basic,
    /// `client_id`/`client_secret` in the form body (`client_secret_post`).
    Body,
}

/// One credential, inline or from files (Kubernetes Secret volumes). Which fields it takes
/// depends on `auth.provider`.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CredentialConfig {
    /// Shown in logs, metrics and errors; never the key id itself.
    pub name: String,
    /// Cloud.ru IAM.
    pub key_id: Option<Secret>,
    pub key_id_file: Option<PathBuf>,
    pub secret: Option<Secret>,
    pub secret_file: Option<PathBuf>,
    /// Static provider.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key_file: Option<PathBuf>,
    /// OAuth2 client credentials.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id_file: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<Secret>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<PathBuf>,
}

/// Policy for credential files readable by anyone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FilePolicy {
    #[default]
    Warn,
    Refuse,
    Allow,
}

impl AuthConfig {
    /// Checks one set (`prefix` is its key: `auth` or `auth.sets.<name>`), naming the key of the
    /// first problem.
    pub(super) fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        self.validate_settings(prefix)?;
        self.validate_credentials(prefix)?;
        self.validate_ranges(prefix)
    }

    fn validate_settings(&self, prefix: &str) -> Result<(), ConfigError> {
        let a = self;
        if a.provider == Provider::Oauth2ClientCredentials && a.token_url == DEFAULT_TOKEN_URL {
            return Err(ConfigError::invalid(
                format!("{prefix}.token_url"),
                "set it to your OAuth2 server's token endpoint (the default is Cloud.ru IAM's)",
            ));
        }
        if a.provider != Provider::Oauth2ClientCredentials && (a.scope.is_some() || a.audience.is_some()) {
            return Err(ConfigError::invalid(
                format!("{prefix}.scope"),
                "scope and audience apply to oauth2_client_credentials only",
            ));
        }
        parse_base_url(&format!("{prefix}.token_url"), &a.token_url)?;
        positive(&format!("{prefix}.connect_timeout_secs"), a.connect_timeout_secs)?;
        positive(&format!("{prefix}.timeout_secs"), a.timeout_secs)?;
        positive(&format!("{prefix}.backoff_initial_ms"), a.backoff_initial_ms)?;
        positive(&format!("{prefix}.failover_after_failures"), u64::from(a.failover_after_failures))?;
        positive(&format!("{prefix}.credential_poll_secs"), a.credential_poll_secs)?;
        positive(&format!("{prefix}.failback_after_secs"), a.failback_after_secs)?;
        if a.refresh_before_secs <= a.expiry_margin_secs {
            return Err(ConfigError::invalid(
                format!("{prefix}.refresh_before_secs"),
                format!("must be greater than {prefix}.expiry_margin_secs, or tokens would expire before their refresh"),
            ));
        }
        positive(&format!("{prefix}.forced_refresh_timeout_secs"), a.forced_refresh_timeout_secs)?;
        if a.backoff_max_ms < a.backoff_initial_ms {
            return Err(ConfigError::invalid(
                format!("{prefix}.backoff_max_ms"),
                format!("must be at least {prefix}.backoff_initial_ms"),
            ));
        }
        Ok(())
    }

    fn validate_credentials(&self, prefix: &str) -> Result<(), ConfigError> {
        let creds = &self.credentials;
        if creds.is_empty() {
            let hint = if prefix == "auth" { ", or EVOLUTION_KEY_ID and EVOLUTION_SECRET" } else { "" };
            return Err(ConfigError::invalid(
                format!("{prefix}.credentials"),
                format!(
                    "at least one credential is required ([[{prefix}.credentials]] with key_id/secret or \
                     key_id_file/secret_file{hint})"
                ),
            ));
        }
        let mut names = HashSet::new();
        for (i, c) in creds.iter().enumerate() {
            let key = |field: &str| format!("{prefix}.credentials[{i}].{field}");
            if c.name.trim().is_empty() {
                return Err(ConfigError::invalid(key("name"), "must not be empty"));
            }
            if !names.insert(c.name.as_str()) {
                return Err(ConfigError::invalid(key("name"), format!("duplicate name '{}'", c.name)));
            }
            let fields = [
                ("key_id", c.key_id.as_ref(), c.key_id_file.as_ref()),
                ("secret", c.secret.as_ref(), c.secret_file.as_ref()),
                ("api_key", c.api_key.as_ref(), c.api_key_file.as_ref()),
                ("client_id", c.client_id.as_ref(), c.client_id_file.as_ref()),
                ("client_secret", c.client_secret.as_ref(), c.client_secret_file.as_ref()),
            ];
            let wanted: &[&str] = match self.provider {
                Provider::CloudruIam => &["key_id", "secret"],
                Provider::Static => &["api_key"],
                Provider::Oauth2ClientCredentials => &["client_id", "client_secret"],
            };
            for (field, inline, file) in fields {
                let file_key = key(&format!("{field}_file"));
                if wanted.contains(&field) {
                    one_source(&key(field), &file_key, inline, file)?;
                } else if inline.is_some() || file.is_some() {
                    return Err(ConfigError::invalid(
                        key(field),
                        format!(
                            "not used with {prefix}.provider = \"{}\" (it takes {})",
                            self.provider.as_str(),
                            wanted.join(" and ")
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Upper bounds, so no configured duration can overflow an `Instant`.
    fn validate_ranges(&self, prefix: &str) -> Result<(), ConfigError> {
        let a = self;
        let secs = [
            ("refresh_before_secs", a.refresh_before_secs),
            ("expiry_margin_secs", a.expiry_margin_secs),
            ("connect_timeout_secs", a.connect_timeout_secs),
            ("timeout_secs", a.timeout_secs),
            ("failback_after_secs", a.failback_after_secs),
            ("min_forced_refresh_interval_secs", a.min_forced_refresh_interval_secs),
            ("forced_refresh_timeout_secs", a.forced_refresh_timeout_secs),
            ("credential_poll_secs", a.credential_poll_secs),
        ];
        for (key, value) in secs {
            at_most(&format!("{prefix}.{key}"), value, MAX_DURATION_SECS, "seconds (one year)")?;
        }
        for (key, value) in
            [("backoff_initial_ms", a.backoff_initial_ms), ("backoff_max_ms", a.backoff_max_ms)]
        {
            at_most(&format!("{prefix}.{key}"), value, MAX_DURATION_SECS * 1000, "ms (one year)")?;
        }
        Ok(())
    }
}
