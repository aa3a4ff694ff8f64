//! Configuration: one serde tree with defaults, loaded from a TOML file and the environment, and
//! validated in one place that names the offending key.
//!
//! Sources, later ones win: built-in defaults, the TOML file (`--config FILE` or
//! `SIDEKEY_CONFIG`), `SIDEKEY_<SECTION>__<KEY>` variables, then the names users of the Cloud.ru
//! SDK already have (`EVOLUTION_KEY_ID`, `EVOLUTION_SECRET`, `EVOLUTION_BACKUP_KEY_ID`,
//! `EVOLUTION_BACKUP_SECRET`, `EVOLUTION_TOKEN_URL`, `EVOLUTION_BASE_URL`).

//!
//! One file per section: [`server`], [`upstream`], [`auth`] (credential sets), [`policy`],
//! [`gateway`] (routes, clients, caller-supplied credentials), [`observe`] (usage, metrics,
//! log); [`check`] holds the value checks they share. `Config::validate` runs each section's
//! check, then the ones that span sections.

mod auth;
mod check;
mod gateway;
mod observe;
mod policy;
mod server;
mod upstream;

use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

pub use self::auth::{AuthConfig, ClientAuth, CredentialConfig, FilePolicy, Provider, DEFAULT_TOKEN_URL};
use self::check::{at_most, MAX_COUNT};
pub use self::check::{parse_base_url, redact_url, MAX_DURATION_SECS};
pub use self::gateway::{
    client_digests, digest_of, keys_in, sets, sha256, CallerCredentialsConfig, ClientConfig, RouteConfig,
    DEFAULT_SET,
};
pub use self::observe::{LogConfig, LogFormat, MetricsConfig, UsageConfig};
pub use self::policy::{MaxTokensMode, PolicyConfig, DEFAULT_POLICY_ENDPOINTS};
pub use self::server::ServerConfig;
pub use self::upstream::UpstreamConfig;
use crate::secret::Secret;

/// The whole configuration. Every field has a default, so an empty file is a valid config
/// (apart from credentials, which `validate` asks for).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub server: ServerConfig,
    pub upstream: UpstreamConfig,
    pub auth: AuthConfig,
    pub log: LogConfig,
    pub policy: PolicyConfig,
    pub usage: UsageConfig,
    pub metrics: MetricsConfig,
    /// Client path prefixes routed to other upstreams (longest prefix wins). Empty: `/v1` goes
    /// to `upstream.base_url` with the default set.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<RouteConfig>,
    /// Callers and their keys. Empty: every caller that reaches the port is trusted.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<ClientConfig>,
    pub caller_credentials: CallerCredentialsConfig,
    /// Short-lived signed keys minted by a backend for untrusted callers.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub signed_keys: Option<crate::signed::SignedKeysConfig>,
}

/// A configuration problem. The message names the key and, where known, the source.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {} does not exist", .0.display())]
    FileMissing(PathBuf),
    #[error("config file {} is not a regular file", .0.display())]
    NotAFile(PathBuf),
    #[error("{0}")]
    Parse(String),
    #[error("invalid `{key}`: {reason}")]
    Invalid { key: String, reason: String },
}

impl ConfigError {
    pub(crate) fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::Invalid { key: key.into(), reason: reason.into() }
    }
}

impl Config {
    /// Loads the config from the optional file, then the environment. Does not validate.
    pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
        let mut figment = Figment::new();
        if let Some(path) = path {
            if !path.exists() {
                return Err(ConfigError::FileMissing(path.to_path_buf()));
            }
            if !path.is_file() {
                return Err(ConfigError::NotAFile(path.to_path_buf()));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(Env::prefixed("SIDEKEY_").split("__").ignore(&["config"]));
        let mut config: Config = figment.extract().map_err(|e| parse_error(&e))?;
        config.apply_evolution_env(|name| std::env::var(name).ok().filter(|v| !v.is_empty()));
        Ok(config)
    }

    /// Applies the Cloud.ru SDK's environment names: the first two credentials are "primary"
    /// and "backup"; inline values replace files for the field they set.
    pub fn apply_evolution_env(&mut self, get: impl Fn(&str) -> Option<String>) {
        if let Some(url) = get("EVOLUTION_TOKEN_URL") {
            self.auth.token_url = url;
        }
        if let Some(url) = get("EVOLUTION_BASE_URL") {
            self.upstream.base_url = url;
        }
        let slots = [
            (0, "primary", "EVOLUTION_KEY_ID", "EVOLUTION_SECRET"),
            (1, "backup", "EVOLUTION_BACKUP_KEY_ID", "EVOLUTION_BACKUP_SECRET"),
        ];
        for (index, name, key_var, secret_var) in slots {
            let (key_id, secret) = (get(key_var), get(secret_var));
            if key_id.is_none() && secret.is_none() {
                continue;
            }
            while self.auth.credentials.len() <= index {
                let name = ["primary", "backup"][self.auth.credentials.len()];
                self.auth.credentials.push(CredentialConfig { name: name.into(), ..Default::default() });
            }
            let cred = &mut self.auth.credentials[index];
            if cred.name.is_empty() {
                cred.name = name.into();
            }
            if let Some(key_id) = key_id {
                cred.key_id = Some(Secret::from(key_id));
                cred.key_id_file = None;
            }
            if let Some(secret) = secret {
                cred.secret = Some(Secret::from(secret));
                cred.secret_file = None;
            }
        }
    }

    /// Checks everything `run` needs, naming the key of the first problem.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate()?;
        self.upstream.validate()?;
        self.auth.validate("auth")?;
        gateway::validate_sets(&self.auth)?;
        if self.policy.max_inflight.is_some() {
            return Err(ConfigError::invalid(
                "policy.max_inflight",
                "applies to [clients.policy] only; for all requests use server.max_inflight",
            ));
        }
        self.policy.validate("policy", self.server.max_request_body_bytes)?;
        let policy_bodies =
            std::iter::once(&self.policy).chain(self.clients.iter().filter_map(|c| c.policy.as_ref()));
        if policy_bodies.map(|p| p.max_body_bytes).max().unwrap_or(0) > self.server.max_buffered_bytes {
            return Err(ConfigError::invalid(
                "server.max_buffered_bytes",
                "must be at least policy.max_body_bytes (of every policy), or those bodies would always get 503",
            ));
        }
        gateway::validate(self)?;
        if let Some(sk) = &self.signed_keys {
            sk.validate("signed_keys")?;
            crate::ledger::validate_url(crate::ledger::CONFIG_KEY, &sk.budget_store)?;
            if sk.credentials != DEFAULT_SET && !self.auth.sets.contains_key(&sk.credentials) {
                return Err(ConfigError::invalid(
                    "signed_keys.credentials",
                    format!("no credential set named {:?}", sk.credentials),
                ));
            }
        }
        if let Some(cb) = &self.usage.callback {
            cb.validate("usage.callback")?;
        }
        self.validate_ranges()?;
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| ConfigError::invalid("log.level", e.to_string()))?;
        Ok(())
    }

    /// Upper bounds, so no configured value can overflow an `Instant` or a semaphore at run time.
    fn validate_ranges(&self) -> Result<(), ConfigError> {
        let (s, u) = (&self.server, &self.upstream);
        let secs = [
            ("server.shutdown_grace_secs", s.shutdown_grace_secs),
            ("server.shutdown_delay_secs", s.shutdown_delay_secs),
            ("server.header_read_timeout_secs", s.header_read_timeout_secs),
            ("server.connection_idle_timeout_secs", s.connection_idle_timeout_secs),
            ("server.body_read_timeout_secs", s.body_read_timeout_secs),
            ("upstream.connect_timeout_secs", u.connect_timeout_secs),
            ("upstream.idle_timeout_secs", u.idle_timeout_secs),
            ("upstream.request_timeout_secs", u.request_timeout_secs.unwrap_or(0)),
            ("upstream.pool_idle_timeout_secs", u.pool_idle_timeout_secs),
        ];
        for (key, value) in secs {
            at_most(key, value, MAX_DURATION_SECS, "seconds (one year)")?;
        }
        at_most("server.queue_timeout_ms", s.queue_timeout_ms, MAX_DURATION_SECS * 1000, "ms (one year)")?;
        let counts = [
            ("server.max_connections", s.max_connections as u64, MAX_COUNT),
            ("server.admin_max_connections", s.admin_max_connections as u64, MAX_COUNT),
            ("server.max_inflight", s.max_inflight.unwrap_or(0) as u64, MAX_COUNT),
            ("server.worker_threads", s.worker_threads.unwrap_or(0) as u64, 1024),
            ("server.max_headers", s.max_headers as u64, 10_000),
            ("server.max_header_bytes", s.max_header_bytes as u64, 16 * 1024 * 1024),
            ("metrics.max_models", self.metrics.max_models as u64, 10_000),
        ];
        for (key, value, max) in counts {
            at_most(key, value, max, "")?;
        }
        Ok(())
    }

    /// The config as TOML with every secret replaced by `[redacted]`.
    pub fn to_redacted_toml(&self) -> String {
        toml::to_string_pretty(self).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }
}

/// Turns a figment error into one line naming the key and the source, without echoing a value
/// that was meant to be secret.
fn parse_error(err: &figment::Error) -> ConfigError {
    let mut lines = Vec::new();
    for e in err.clone() {
        const SENSITIVE: [&str; 5] = ["key_id", "secret", "api_key", "client_id", "client_secret"];
        let sensitive = e.path.last().is_some_and(|k| SENSITIVE.contains(&k.as_str()));
        if e.path.is_empty() {
            // A syntax error: the TOML parser quotes the offending source line, which may hold
            // a secret. Keep its position and message, drop the quoted source.
            let text = e.to_string();
            let kept: Vec<&str> =
                text.lines().map(str::trim).filter(|l| !l.is_empty() && !is_source_excerpt(l)).collect();
            lines.push(kept.join(" "));
        } else if sensitive {
            let key = e.path.join(".");
            let key = key.strip_prefix("default.").unwrap_or(&key);
            let source = e
                .metadata
                .as_ref()
                .map(|m| match &m.source {
                    Some(src) => format!(" in {src} {}", m.name),
                    None => format!(" in {}", m.name),
                })
                .unwrap_or_default();
            lines.push(format!("invalid value (redacted) for key \"{key}\"{source}"));
        } else {
            // Figment's profile prefix ("default.") means nothing to our users.
            lines.push(e.to_string().replace("for key \"default.", "for key \""));
        }
    }
    ConfigError::Parse(lines.join("; "))
}

/// Lines like `3 | secret = "..."` or `  |      ^` in a TOML parse error.
fn is_source_excerpt(line: &str) -> bool {
    let rest = line.trim_start_matches(|c: char| c.is_ascii_digit()).trim_start();
    rest.starts_with('|')
}

#[cfg(test)]
mod tests;
