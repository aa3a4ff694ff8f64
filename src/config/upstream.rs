//! `[upstream]`: the OpenAI-format API requests are forwarded to.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::check::{parse_base_url, positive};
use super::ConfigError;

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
    /// Offer HTTP/2 by ALPN on HTTPS upstreams (HTTP/1.1 is always offered too). `false`: HTTP/1.1
    /// only, one request per pooled connection at a time.
    pub http2: bool,
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
            http2: true,
        }
    }
}

impl UpstreamConfig {
    /// Checks this section, naming the key of the first problem.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let u = self;
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
}
