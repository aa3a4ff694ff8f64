//! Configuration: one serde tree with defaults, loaded from a TOML file and the environment, and
//! validated in one place that names the offending key.
//!
//! Sources, later ones win: built-in defaults, the TOML file (`--config FILE` or
//! `SIDEKEY_CONFIG`), `SIDEKEY_<SECTION>__<KEY>` variables, then the names users of the Cloud.ru
//! SDK already have (`EVOLUTION_KEY_ID`, `EVOLUTION_SECRET`, `EVOLUTION_BACKUP_KEY_ID`,
//! `EVOLUTION_BACKUP_SECRET`, `EVOLUTION_TOKEN_URL`, `EVOLUTION_BASE_URL`).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Toml};
use figment::Figment;
use http::Uri;
use serde::{Deserialize, Serialize};

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
}

/// The client-facing listeners and their limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Where OpenAI SDKs connect. Loopback by default: anyone who can reach this port can spend
    /// our credentials.
    pub listen: SocketAddr,
    /// Metrics and probes; never serves anything that spends credentials.
    pub admin_listen: SocketAddr,
    /// Must be set on purpose to listen on a non-loopback address.
    pub allow_non_loopback: bool,
    /// Largest request body accepted (413 above it), checked on `Content-Length` and while
    /// streaming.
    pub max_request_body_bytes: u64,
    /// Request bodies up to this size are kept (as shared chunks, while streaming up) so a request
    /// answered 401 can be replayed once with a fresh token. 0 disables replay.
    pub replay_buffer_bytes: u64,
    /// In-flight requests get this long to finish after shutdown starts.
    pub shutdown_grace_secs: u64,
    /// New connections are still accepted this long after a shutdown signal (for classic
    /// sidecars whose app is still draining).
    pub shutdown_delay_secs: u64,
    /// Serve `POST /quitquitquit` on the admin port (loopback callers only).
    pub enable_quit_endpoint: bool,
    /// From accept to a complete first request head (HTTP/1 headers, or the HTTP/2 preface and
    /// first request) at most, and for each later HTTP/1 request head (slowloris guard).
    pub header_read_timeout_secs: u64,
    /// A connection with no request in flight for this long is closed (HTTP/1 keep-alive and
    /// HTTP/2 alike).
    pub connection_idle_timeout_secs: u64,
    /// A request body that sends nothing for this long is cut: 408 if sidekey is still reading
    /// it, and its slot and memory are freed.
    pub body_read_timeout_secs: u64,
    /// Bytes of request bodies held in memory at once, process-wide: bodies read for the policy
    /// and the copies kept for a 401 replay. When spent, policy reads get 503 with
    /// `Retry-After` and new uploads are not made replayable.
    pub max_buffered_bytes: u64,
    /// Open client connections at most. At the limit, the oldest connection with no request in
    /// flight is closed to make room; if every connection is busy, new ones wait in the kernel
    /// backlog.
    pub max_connections: usize,
    /// Open connections to the admin listener at most, its own budget: probes keep answering
    /// however busy the proxy port is.
    pub admin_max_connections: usize,
    /// Request headers per request at most (HTTP/1).
    pub max_headers: usize,
    /// Bytes of request line plus headers at most (HTTP/1 read buffer, at least 8192).
    pub max_header_bytes: usize,
    /// Requests proxied at once at most (unset: unlimited). More wait up to `queue_timeout_ms`,
    /// then get 429 with `Retry-After`, which SDK retry logic handles.
    pub max_inflight: Option<usize>,
    pub queue_timeout_ms: u64,
    /// Proxy worker threads, each with its own event loop, listener (`SO_REUSEPORT`) and
    /// upstream connection pool. Unset: one per CPU core.
    pub worker_threads: Option<usize>,
    /// Extra names accepted in the `Host` header while the proxy listens on loopback (which
    /// otherwise accepts only loopback addresses and `localhost`: a guard against DNS
    /// rebinding from a browser).
    pub allowed_hosts: Vec<String>,
    /// Browser origins allowed to call the proxy. Requests with any other `Origin` get 403.
    pub allowed_origins: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8181)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9191)),
            allow_non_loopback: false,
            max_request_body_bytes: 32 * 1024 * 1024,
            replay_buffer_bytes: 1024 * 1024,
            shutdown_grace_secs: 30,
            shutdown_delay_secs: 0,
            enable_quit_endpoint: false,
            header_read_timeout_secs: 30,
            connection_idle_timeout_secs: 75,
            body_read_timeout_secs: 30,
            max_buffered_bytes: 64 * 1024 * 1024,
            max_connections: 4096,
            admin_max_connections: 64,
            max_headers: 100,
            max_header_bytes: 64 * 1024,
            max_inflight: None,
            queue_timeout_ms: 10_000,
            worker_threads: None,
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
        }
    }
}

/// The OpenAI-format API every request is forwarded to.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// `/v1/<rest>` maps to `{base_url}/<rest>`.
    pub base_url: String,
    pub connect_timeout_secs: u64,
    /// Optional limit on a whole request, response body included. Off by default: LLM streams
    /// legitimately run for minutes.
    pub request_timeout_secs: Option<u64>,
    /// Longest silence from upstream, waiting for headers or between body chunks.
    pub idle_timeout_secs: u64,
    /// Extra PEM CA bundle trusted besides the built-in web roots (private CA, test gateway).
    pub ca_file: Option<PathBuf>,
    /// Idle pooled connections are closed after this long.
    pub pool_idle_timeout_secs: u64,
    /// Idle pooled connections kept per upstream host at most.
    pub pool_max_idle_per_host: usize,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            base_url: "https://foundation-models.api.cloud.ru/v1".into(),
            connect_timeout_secs: 5,
            request_timeout_secs: None,
            idle_timeout_secs: 300,
            ca_file: None,
            pool_idle_timeout_secs: 90,
            pool_max_idle_per_host: 256,
        }
    }
}

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

/// Limits on what callers may ask for (keys handed to untrusted callers need limits). Once any
/// limit is set the policy fails closed: only `allowed_endpoints` are forwarded, and their JSON
/// bodies are read and checked.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyConfig {
    /// Exact model names or globs (`*`, `?`); empty allows every model. Others get 403.
    pub allowed_models: Vec<String>,
    /// With a limit set, the endpoints forwarded at all (labels as in `sidekey_requests_total`:
    /// chat_completions, completions, embeddings, responses, models, audio, images, files,
    /// other). Others get 403 naming the endpoint.
    pub allowed_endpoints: Vec<String>,
    /// Cap on `max_tokens` / `max_completion_tokens` / `max_output_tokens`.
    pub max_tokens: Option<u64>,
    pub max_tokens_mode: MaxTokensMode,
    /// Add the cap to requests that set no limit (on by default: an uncapped request would
    /// escape the cap).
    pub set_max_tokens_when_missing: bool,
    /// Cap on `n` and `best_of` (choices multiply the tokens). Unset: 1 when `max_tokens` is
    /// set, else no cap.
    pub max_choices: Option<u64>,
    /// Largest body the policy reads (413 above it); chat requests are small.
    pub max_body_bytes: u64,
}

/// The endpoints a policy forwards unless `policy.allowed_endpoints` says otherwise: those that
/// report usage, and the model list.
pub const DEFAULT_POLICY_ENDPOINTS: [&str; 5] =
    ["chat_completions", "completions", "embeddings", "responses", "models"];

impl Default for PolicyConfig {
    fn default() -> Self {
        Self {
            allowed_models: Vec::new(),
            allowed_endpoints: DEFAULT_POLICY_ENDPOINTS.iter().map(|e| e.to_string()).collect(),
            max_tokens: None,
            max_tokens_mode: MaxTokensMode::Reject,
            set_max_tokens_when_missing: true,
            max_choices: None,
            max_body_bytes: 1024 * 1024,
        }
    }
}

/// What to do with a request over `policy.max_tokens`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MaxTokensMode {
    /// 400 with an OpenAI-shaped error.
    #[default]
    Reject,
    /// Lower the value to the cap and forward.
    Clamp,
}

/// Token usage accounting from responses.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct UsageConfig {
    /// Read `usage` from JSON and SSE responses (incrementally, never delaying a byte).
    pub scan: bool,
    /// Add `"stream_options": {"include_usage": true}` to streaming chat requests that have no
    /// `stream_options`, so usage is always known. Clients then see one extra chunk with empty
    /// `choices` at the end of each stream.
    pub include_stream_usage: bool,
}

impl Default for UsageConfig {
    fn default() -> Self {
        Self { scan: true, include_stream_usage: false }
    }
}

/// Metric label bounds.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Distinct `model` label values at most; later models are counted as `other`.
    pub max_models: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { max_models: 50 }
    }
}

/// Logging.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `RUST_LOG`-style filter, e.g. `info` or `sidekey=debug,hyper=info`. `RUST_LOG` wins.
    pub level: String,
    pub format: LogFormat,
    /// One line per proxied request (method, endpoint, status, durations, bytes, credential).
    pub access: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: "info".into(), format: LogFormat::Text, access: false }
    }
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
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
    fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
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
        self.validate_server()?;
        self.validate_upstream()?;
        self.validate_auth()?;
        self.validate_credentials()?;
        self.validate_policy()?;
        self.validate_ranges()?;
        tracing_subscriber::EnvFilter::try_new(&self.log.level)
            .map_err(|e| ConfigError::invalid("log.level", e.to_string()))?;
        Ok(())
    }

    fn validate_server(&self) -> Result<(), ConfigError> {
        let s = &self.server;
        for (key, addr) in [("server.listen", s.listen), ("server.admin_listen", s.admin_listen)] {
            if !addr.ip().is_loopback() && !s.allow_non_loopback {
                return Err(ConfigError::invalid(
                    key,
                    format!(
                        "{addr} is not a loopback address; anyone who can reach it can spend \
                         the configured credentials (set server.allow_non_loopback = true to allow)"
                    ),
                ));
            }
        }
        if s.listen == s.admin_listen && s.listen.port() != 0 {
            return Err(ConfigError::invalid("server.admin_listen", "must differ from server.listen"));
        }
        positive("server.max_request_body_bytes", s.max_request_body_bytes)?;
        positive("server.header_read_timeout_secs", s.header_read_timeout_secs)?;
        positive("server.max_connections", s.max_connections as u64)?;
        positive("server.max_headers", s.max_headers as u64)?;
        if s.worker_threads == Some(0) {
            return Err(ConfigError::invalid(
                "server.worker_threads",
                "must be greater than 0 (or unset for one per core)",
            ));
        }
        if s.max_inflight == Some(0) {
            return Err(ConfigError::invalid(
                "server.max_inflight",
                "must be greater than 0 (or unset for no limit)",
            ));
        }
        if s.max_header_bytes < 8192 {
            return Err(ConfigError::invalid("server.max_header_bytes", "must be at least 8192"));
        }
        if s.replay_buffer_bytes > s.max_request_body_bytes {
            return Err(ConfigError::invalid(
                "server.replay_buffer_bytes",
                "must not exceed server.max_request_body_bytes",
            ));
        }
        Ok(())
    }

    fn validate_upstream(&self) -> Result<(), ConfigError> {
        let u = &self.upstream;
        parse_base_url("upstream.base_url", &u.base_url)?;
        positive("upstream.connect_timeout_secs", u.connect_timeout_secs)?;
        positive("upstream.idle_timeout_secs", u.idle_timeout_secs)?;
        if let Some(t) = u.request_timeout_secs {
            positive("upstream.request_timeout_secs", t)?;
        }
        if let Some(ca) = &u.ca_file {
            if !ca.is_file() {
                return Err(ConfigError::invalid(
                    "upstream.ca_file",
                    format!("{} does not exist", ca.display()),
                ));
            }
        }
        Ok(())
    }

    fn validate_auth(&self) -> Result<(), ConfigError> {
        let a = &self.auth;
        if a.provider == Provider::Oauth2ClientCredentials && a.token_url == DEFAULT_TOKEN_URL {
            return Err(ConfigError::invalid(
                "auth.token_url",
                "set it to your OAuth2 server's token endpoint (the default is Cloud.ru IAM's)",
            ));
        }
        if a.provider != Provider::Oauth2ClientCredentials && (a.scope.is_some() || a.audience.is_some()) {
            return Err(ConfigError::invalid(
                "auth.scope",
                "scope and audience apply to oauth2_client_credentials only",
            ));
        }
        parse_base_url("auth.token_url", &a.token_url)?;
        positive("auth.connect_timeout_secs", a.connect_timeout_secs)?;
        positive("auth.timeout_secs", a.timeout_secs)?;
        positive("auth.backoff_initial_ms", a.backoff_initial_ms)?;
        positive("auth.failover_after_failures", u64::from(a.failover_after_failures))?;
        positive("auth.credential_poll_secs", a.credential_poll_secs)?;
        positive("auth.failback_after_secs", a.failback_after_secs)?;
        if a.refresh_before_secs <= a.expiry_margin_secs {
            return Err(ConfigError::invalid(
                "auth.refresh_before_secs",
                "must be greater than auth.expiry_margin_secs, or tokens would expire before their refresh",
            ));
        }
        positive("auth.forced_refresh_timeout_secs", a.forced_refresh_timeout_secs)?;
        if a.backoff_max_ms < a.backoff_initial_ms {
            return Err(ConfigError::invalid(
                "auth.backoff_max_ms",
                "must be at least auth.backoff_initial_ms",
            ));
        }
        Ok(())
    }

    fn validate_credentials(&self) -> Result<(), ConfigError> {
        let creds = &self.auth.credentials;
        if creds.is_empty() {
            return Err(ConfigError::invalid(
                "auth.credentials",
                "at least one credential is required ([[auth.credentials]] with key_id/secret or \
                 key_id_file/secret_file, or EVOLUTION_KEY_ID and EVOLUTION_SECRET)",
            ));
        }
        let mut names = HashSet::new();
        for (i, c) in creds.iter().enumerate() {
            let key = |field: &str| format!("auth.credentials[{i}].{field}");
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
            let wanted: &[&str] = match self.auth.provider {
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
                            "not used with auth.provider = \"{}\" (it takes {})",
                            self.auth.provider.as_str(),
                            wanted.join(" and ")
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn validate_policy(&self) -> Result<(), ConfigError> {
        let p = &self.policy;
        for (i, name) in p.allowed_endpoints.iter().enumerate() {
            if crate::proxy::path::Endpoint::from_label(name).is_none() {
                let known: Vec<&str> = crate::proxy::path::Endpoint::ALL.iter().map(|e| e.as_str()).collect();
                return Err(ConfigError::invalid(
                    format!("policy.allowed_endpoints[{i}]"),
                    format!("unknown endpoint {name:?} (known: {})", known.join(", ")),
                ));
            }
        }
        if p.max_choices == Some(0) {
            return Err(ConfigError::invalid("policy.max_choices", "must be at least 1 (or unset)"));
        }
        positive("policy.max_body_bytes", p.max_body_bytes)?;
        if p.max_body_bytes > self.server.max_request_body_bytes {
            return Err(ConfigError::invalid(
                "policy.max_body_bytes",
                "must not exceed server.max_request_body_bytes",
            ));
        }
        Ok(())
    }

    /// Upper bounds, so no configured value can overflow an `Instant` or a semaphore at run time.
    fn validate_ranges(&self) -> Result<(), ConfigError> {
        let (s, u, a) = (&self.server, &self.upstream, &self.auth);
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
        validate_auth_ranges("auth", a)?;
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

/// The longest configurable duration: far beyond any sensible setting, far below an overflow.
pub const MAX_DURATION_SECS: u64 = 365 * 24 * 3600;
/// The largest configurable connection or request count.
const MAX_COUNT: u64 = 1_000_000;

fn at_most(key: &str, value: u64, max: u64, unit: &str) -> Result<(), ConfigError> {
    if value > max {
        let unit = if unit.is_empty() { String::new() } else { format!(" {unit}") };
        return Err(ConfigError::invalid(key, format!("{value} is too large (at most {max}{unit})")));
    }
    Ok(())
}

/// Range checks for one `[auth]`-shaped section (`prefix` is its key, e.g. `auth`).
fn validate_auth_ranges(prefix: &str, a: &AuthConfig) -> Result<(), ConfigError> {
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
    for (key, value) in [("backoff_initial_ms", a.backoff_initial_ms), ("backoff_max_ms", a.backoff_max_ms)] {
        at_most(&format!("{prefix}.{key}"), value, MAX_DURATION_SECS * 1000, "ms (one year)")?;
    }
    Ok(())
}

fn positive(key: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::invalid(key, "must be greater than 0"));
    }
    Ok(())
}

fn one_source(
    key: &str,
    file_key: &str,
    inline: Option<&Secret>,
    file: Option<&PathBuf>,
) -> Result<(), ConfigError> {
    match (inline, file) {
        (Some(_), Some(_)) => {
            Err(ConfigError::invalid(key, format!("set either {key} or {file_key}, not both")))
        }
        (None, None) => Err(ConfigError::invalid(key, format!("missing (set {key} or {file_key})"))),
        (Some(v), None) if v.is_empty() => Err(ConfigError::invalid(key, "must not be empty")),
        (None, Some(path)) if !path.is_file() => {
            Err(ConfigError::invalid(file_key, format!("{} does not exist", path.display())))
        }
        _ => Ok(()),
    }
}

/// Parses an absolute `http`/`https` URL without userinfo, query or fragment. Errors quote the
/// URL with its userinfo, query and fragment redacted: they may hold a credential.
pub fn parse_base_url(key: &str, value: &str) -> Result<Uri, ConfigError> {
    let shown = redact_url(value);
    let uri: Uri = value.parse().map_err(|_| ConfigError::invalid(key, format!("{shown:?} is not a URL")))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(ConfigError::invalid(key, format!("{shown:?} must start with http:// or https://"))),
    }
    let Some(authority) = uri.authority() else {
        return Err(ConfigError::invalid(key, format!("{shown:?} has no host")));
    };
    if authority.as_str().contains('@') {
        return Err(ConfigError::invalid(
            key,
            format!("{shown:?} must not carry user info (put credentials in [auth], never in a URL)"),
        ));
    }
    if uri.query().is_some() || value.contains('#') {
        return Err(ConfigError::invalid(key, format!("{shown:?} must not have a query or fragment")));
    }
    Ok(uri)
}

/// A URL for error messages: userinfo, query and fragment replaced by `[redacted]`.
pub fn redact_url(value: &str) -> String {
    let redacted = crate::secret::REDACTED;
    let (head, had_tail) = match value.find(['?', '#']) {
        Some(i) => (&value[..i], true),
        None => (value, false),
    };
    let mut out = match head.split_once("://") {
        Some((scheme, rest)) => {
            let end = rest.find('/').unwrap_or(rest.len());
            match rest[..end].rfind('@') {
                Some(at) => format!("{scheme}://{redacted}@{}", &rest[at + 1..]),
                None => head.to_string(),
            }
        }
        None => match head.rfind('@') {
            Some(at) => format!("{redacted}@{}", &head[at + 1..]),
            None => head.to_string(),
        },
    };
    if had_tail {
        out.push_str(if value[head.len()..].starts_with('?') { "?" } else { "#" });
        out.push_str(redacted);
    }
    out
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
mod tests {
    use super::*;

    #[test]
    fn syntax_errors_do_not_quote_the_source_line() {
        let dir = std::env::temp_dir().join(format!("sidekey-syntax-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.toml");
        std::fs::write(&path, "[[auth.credentials]]\nname = \"p\"\nsecret = \"SEKRIT\\qXYZ\"\n").unwrap();
        let err = Config::load(Some(&path)).unwrap_err().to_string();
        assert!(!err.contains("SEKRIT"), "{err}");
        assert!(err.contains("line 3"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn with_credential() -> Config {
        let mut c = Config::default();
        c.auth.credentials.push(CredentialConfig {
            name: "primary".into(),
            key_id: Some("KEYID-7f3a".into()),
            secret: Some("SECRET-9c2e".into()),
            ..Default::default()
        });
        c
    }

    #[test]
    fn defaults_match_the_documented_contract() {
        let c = Config::default();
        assert_eq!(c.server.listen.to_string(), "127.0.0.1:8181");
        assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:9191");
        assert_eq!(c.server.max_request_body_bytes, 33_554_432);
        assert_eq!(c.server.shutdown_grace_secs, 30);
        assert_eq!(c.upstream.base_url, "https://foundation-models.api.cloud.ru/v1");
        assert_eq!(c.upstream.connect_timeout_secs, 5);
        assert_eq!(c.auth.token_url, "https://iam.api.cloud.ru/api/v1/auth/token");
        assert_eq!(c.auth.refresh_before_secs, 300);
    }

    #[test]
    fn a_valid_config_validates() {
        with_credential().validate().unwrap();
    }

    #[test]
    fn non_loopback_listen_needs_opt_in() {
        let mut c = with_credential();
        c.server.listen = "0.0.0.0:8181".parse().unwrap();
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("server.listen"), "{err}");
        c.server.allow_non_loopback = true;
        c.validate().unwrap();
    }

    #[test]
    fn missing_credentials_name_the_key() {
        let err = Config::default().validate().unwrap_err().to_string();
        assert!(err.contains("auth.credentials"), "{err}");
        let mut c = with_credential();
        c.auth.credentials[0].secret = None;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("auth.credentials[0].secret"), "{err}");
    }

    #[test]
    fn duplicate_credential_names_are_refused() {
        let mut c = with_credential();
        c.auth.credentials.push(c.auth.credentials[0].clone());
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("auth.credentials[1].name"), "{err}");
    }

    #[test]
    fn url_errors_redact_userinfo_and_query() {
        for (url, leaked) in [
            ("http://user:p4ssw0rd@host/v1", "p4ssw0rd"),
            ("https://host/v1?api_key=SEKRIT123", "SEKRIT123"),
            ("ftp://user:p4ssw0rd@host/v1?k=SEKRIT123", "SEKRIT123"),
            ("not a url?key=SEKRIT123", "SEKRIT123"),
            ("https://host/v1#frag=SEKRIT123", "SEKRIT123"),
            ("user:p4ssw0rd@host", "p4ssw0rd"),
        ] {
            let err = parse_base_url("upstream.base_url", url).unwrap_err().to_string();
            assert!(!err.contains(leaked), "{err}");
            assert!(err.contains("upstream.base_url"), "{err}");
        }
        assert_eq!(redact_url("http://u:p@h:1/x?y"), "http://[redacted]@h:1/x?[redacted]");
        assert_eq!(redact_url("http://h/x"), "http://h/x");
    }

    #[test]
    fn huge_values_are_refused_by_name() {
        type Tweak = fn(&mut Config);
        let cases: [(&str, Tweak); 6] = [
            ("upstream.idle_timeout_secs", |c| c.upstream.idle_timeout_secs = u64::MAX),
            ("auth.forced_refresh_timeout_secs", |c| c.auth.forced_refresh_timeout_secs = u64::MAX - 1),
            ("server.max_inflight", |c| c.server.max_inflight = Some(usize::MAX)),
            ("server.max_connections", |c| c.server.max_connections = usize::MAX),
            ("server.queue_timeout_ms", |c| c.server.queue_timeout_ms = u64::MAX),
            ("auth.backoff_max_ms", |c| c.auth.backoff_max_ms = u64::MAX),
        ];
        for (key, set) in cases {
            let mut c = with_credential();
            set(&mut c);
            let err = c.validate().unwrap_err().to_string();
            assert!(err.contains(key), "{key}: {err}");
        }
    }

    #[test]
    fn policy_endpoints_must_be_known() {
        let mut c = with_credential();
        c.policy.allowed_endpoints.push("batches".into());
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("policy.allowed_endpoints[5]") && err.contains("batches"), "{err}");
    }

    #[test]
    fn base_url_must_be_http() {
        assert!(parse_base_url("k", "ftp://x/v1").is_err());
        assert!(parse_base_url("k", "/v1").is_err());
        assert!(parse_base_url("k", "http://x/v1?a=b").is_err());
        assert!(parse_base_url("k", "https://x/v1/").is_ok());
    }

    #[test]
    fn evolution_env_fills_primary_and_backup() {
        let mut c = Config::default();
        let env = |k: &str| match k {
            "EVOLUTION_KEY_ID" => Some("k1".to_string()),
            "EVOLUTION_SECRET" => Some("s1".to_string()),
            "EVOLUTION_BACKUP_KEY_ID" => Some("k2".to_string()),
            "EVOLUTION_BACKUP_SECRET" => Some("s2".to_string()),
            "EVOLUTION_BASE_URL" => Some("http://127.0.0.1:1/v1".to_string()),
            _ => None,
        };
        c.apply_evolution_env(env);
        assert_eq!(c.auth.credentials.len(), 2);
        assert_eq!(c.auth.credentials[0].name, "primary");
        assert_eq!(c.auth.credentials[1].name, "backup");
        assert_eq!(c.auth.credentials[1].secret.as_ref().unwrap().expose(), "s2");
        assert_eq!(c.upstream.base_url, "http://127.0.0.1:1/v1");
        c.validate().unwrap();
    }

    #[test]
    fn debug_and_redacted_toml_hide_secrets() {
        let c = with_credential();
        let debug = format!("{c:?}");
        let toml = c.to_redacted_toml();
        for out in [debug, toml] {
            assert!(!out.contains("KEYID-7f3a") && !out.contains("SECRET-9c2e"), "{out}");
            assert!(out.contains("[redacted]"));
        }
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    fn toml_value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<i64>().prop_map(|v| v.to_string()),
            any::<u32>().prop_map(|v| v.to_string()),
            any::<bool>().prop_map(|v| v.to_string()),
            "[a-z0-9:./]{0,24}".prop_map(|v| format!("{v:?}")),
            Just("\"127.0.0.1:0\"".to_string()),
            Just("\"http://127.0.0.1:1/v1\"".to_string()),
            Just("1.5".to_string()),
            Just("[]".to_string()),
        ]
    }

    const KEYS: &[(&str, &str)] = &[
        ("server", "listen"),
        ("server", "admin_listen"),
        ("server", "max_request_body_bytes"),
        ("server", "replay_buffer_bytes"),
        ("server", "max_connections"),
        ("server", "max_header_bytes"),
        ("upstream", "base_url"),
        ("upstream", "idle_timeout_secs"),
        ("upstream", "request_timeout_secs"),
        ("auth", "token_url"),
        ("auth", "backoff_initial_ms"),
        ("auth", "backoff_max_ms"),
        ("auth", "failover_after_failures"),
        ("log", "level"),
        ("log", "format"),
    ];

    proptest! {
        /// Any value for any key parses or fails cleanly, and a parsed config validates or names
        /// a key: never a panic.
        #[test]
        fn any_value_is_accepted_or_refused_cleanly(picks in proptest::collection::vec((0..KEYS.len(), toml_value()), 1..5)) {
            let mut sections: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
            for (i, value) in &picks {
                let (section, key) = KEYS[*i];
                sections.entry(section).or_default().push(format!("{key} = {value}"));
            }
            let mut text = String::new();
            for (section, lines) in &sections {
                let mut seen = HashSet::new();
                text.push_str(&format!("[{section}]\n"));
                for line in lines {
                    if seen.insert(line.split(' ').next().unwrap_or_default().to_string()) {
                        text.push_str(line);
                        text.push('\n');
                    }
                }
            }
            text.push_str("[[auth.credentials]]\nname = \"p\"\nkey_id = \"k\"\nsecret = \"s\"\n");
            if let Ok(config) = toml::from_str::<Config>(&text) {
                if let Err(ConfigError::Invalid { key, .. }) = config.validate() {
                    prop_assert!(key.contains('.'), "{}", key);
                }
            }
        }
    }
}
