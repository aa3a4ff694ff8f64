//! `[usage]`, `[metrics]` and `[log]`: what sidekey reports about the traffic.

use serde::{Deserialize, Serialize};

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
    /// One JSON event per finished request POSTed to a backend (`[usage.callback]`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callback: Option<crate::callback::CallbackConfig>,
}

impl Default for UsageConfig {
    fn default() -> Self {
        Self { scan: true, include_stream_usage: false, callback: None }
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

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}
