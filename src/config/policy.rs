//! `[policy]` (and each client's `[clients.policy]`): limits on what callers may ask for.

use serde::{Deserialize, Serialize};

use super::check::positive;
use super::ConfigError;

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
    /// `[clients.policy]` only: this client's requests in flight at most (429 with
    /// `Retry-After` beyond it). For all requests use `server.max_inflight`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_inflight: Option<usize>,
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
            max_inflight: None,
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

impl PolicyConfig {
    /// Checks this policy (`prefix`: `policy` or `clients[i].policy`); `max_request_body` is
    /// `server.max_request_body_bytes`.
    pub(super) fn validate(&self, prefix: &str, max_request_body: u64) -> Result<(), ConfigError> {
        let p = self;
        for (i, name) in p.allowed_endpoints.iter().enumerate() {
            if crate::proxy::path::Endpoint::from_label(name).is_none() {
                let known: Vec<&str> = crate::proxy::path::Endpoint::ALL.iter().map(|e| e.as_str()).collect();
                return Err(ConfigError::invalid(
                    format!("{prefix}.allowed_endpoints[{i}]"),
                    format!("unknown endpoint {name:?} (known: {})", known.join(", ")),
                ));
            }
        }
        if p.max_choices == Some(0) {
            return Err(ConfigError::invalid(
                format!("{prefix}.max_choices"),
                "must be at least 1 (or unset)",
            ));
        }
        positive(&format!("{prefix}.max_body_bytes"), p.max_body_bytes)?;
        if let Some(n) = p.max_inflight {
            positive(&format!("{prefix}.max_inflight"), n as u64)?;
            super::check::at_most(&format!("{prefix}.max_inflight"), n as u64, super::check::MAX_COUNT, "")?;
        }
        if p.max_body_bytes > max_request_body {
            return Err(ConfigError::invalid(
                format!("{prefix}.max_body_bytes"),
                "must not exceed server.max_request_body_bytes",
            ));
        }
        Ok(())
    }
}
