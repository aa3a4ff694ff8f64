//! `[usage.callback]`: where usage events go, how they are signed, and the delivery budget.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::{parse_base_url, ConfigError, MAX_DURATION_SECS};

/// The largest `max_queue` / `batch_max`: far beyond any sensible setting, bounded so a typo
/// cannot reserve gigabytes.
const MAX_QUEUE: usize = 1_000_000;
const MAX_BATCH: usize = 10_000;
const MAX_ATTEMPTS: u32 = 1_000;

/// The usage callback's settings. `url` has no default: a section that is present must name
/// its receiver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallbackConfig {
    /// The receiver: an absolute `http://` or `https://` URL, no userinfo, query or fragment
    /// (a credential in a URL ends up in logs; sign with `secret_file` instead).
    pub url: String,
    /// HMAC-SHA256 key for `X-Sidekey-Signature`, the file's content with surrounding
    /// whitespace trimmed. Re-read before every POST, so a rotated Kubernetes Secret takes
    /// effect on the next batch; unset means unsigned.
    pub secret_file: Option<PathBuf>,
    /// One POST, from connect to the end of the response; longer counts as a failed attempt.
    pub timeout_ms: u64,
    /// Events waiting for delivery; beyond it new events are dropped (and counted), so a dead
    /// receiver costs bounded memory and never slows a request.
    pub max_queue: usize,
    /// POSTs per batch, the first included; then its events count as failed.
    pub max_attempts: u32,
    /// Events per POST (a JSON array).
    pub batch_max: usize,
    /// Retry delays: `backoff_initial_ms` doubling up to `backoff_max_ms`, with equal jitter.
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
}

impl Default for CallbackConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            secret_file: None,
            timeout_ms: 2000,
            max_queue: 10_000,
            max_attempts: 5,
            batch_max: 100,
            backoff_initial_ms: 500,
            backoff_max_ms: 30_000,
        }
    }
}

impl CallbackConfig {
    /// Checks every key; errors name it as `<prefix>.<key>` (`prefix` is the section, e.g.
    /// `usage.callback`).
    pub fn validate(&self, prefix: &str) -> Result<(), ConfigError> {
        let key = |k: &str| format!("{prefix}.{k}");
        let invalid = |k: &str, reason: String| ConfigError::Invalid { key: key(k), reason };
        if self.url.trim().is_empty() {
            return Err(invalid("url", "missing (the receiver's http:// or https:// URL)".into()));
        }
        parse_base_url(&key("url"), &self.url)?;
        if let Some(path) = &self.secret_file {
            if !path.is_file() {
                return Err(invalid("secret_file", format!("{} does not exist", path.display())));
            }
        }
        let max_ms = MAX_DURATION_SECS * 1000;
        for (k, value) in [
            ("timeout_ms", self.timeout_ms),
            ("backoff_initial_ms", self.backoff_initial_ms),
            ("backoff_max_ms", self.backoff_max_ms),
        ] {
            if value == 0 {
                return Err(invalid(k, "must be greater than 0".into()));
            }
            if value > max_ms {
                return Err(invalid(k, format!("{value} is too large (at most {max_ms} ms, one year)")));
            }
        }
        if self.backoff_max_ms < self.backoff_initial_ms {
            return Err(invalid(
                "backoff_max_ms",
                format!("{} is below backoff_initial_ms ({})", self.backoff_max_ms, self.backoff_initial_ms),
            ));
        }
        for (k, value, max) in [
            ("max_queue", self.max_queue as u64, MAX_QUEUE as u64),
            ("batch_max", self.batch_max as u64, MAX_BATCH as u64),
            ("max_attempts", u64::from(self.max_attempts), u64::from(MAX_ATTEMPTS)),
        ] {
            if value == 0 {
                return Err(invalid(k, "must be greater than 0".into()));
            }
            if value > max {
                return Err(invalid(k, format!("{value} is too large (at most {max})")));
            }
        }
        Ok(())
    }

    pub(crate) fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    pub(crate) fn backoff_initial(&self) -> Duration {
        Duration::from_millis(self.backoff_initial_ms)
    }

    pub(crate) fn backoff_max(&self) -> Duration {
        Duration::from_millis(self.backoff_max_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> CallbackConfig {
        CallbackConfig { url: "https://backend.internal/v1/callback/usage".into(), ..Default::default() }
    }

    fn error(c: &CallbackConfig) -> String {
        c.validate("usage.callback").unwrap_err().to_string()
    }

    #[test]
    fn defaults_with_a_url_are_valid() {
        valid().validate("usage.callback").unwrap();
        let c = CallbackConfig::default();
        assert_eq!((c.timeout_ms, c.max_queue, c.max_attempts, c.batch_max), (2000, 10_000, 5, 100));
        assert_eq!((c.backoff_initial_ms, c.backoff_max_ms), (500, 30_000));
    }

    #[test]
    fn errors_name_the_key() {
        assert!(error(&CallbackConfig::default()).contains("`usage.callback.url`: missing"));
        for (url, why) in [
            ("ftp://backend/x", "must start with http:// or https://"),
            ("/v1/callback", "must start with http"),
            ("https://user:pw@backend/x", "user info"),
            ("https://backend/x?token=abc", "query or fragment"),
        ] {
            let e = error(&CallbackConfig { url: url.into(), ..valid() });
            assert!(e.contains("`usage.callback.url`") && e.contains(why), "{url}: {e}");
            assert!(!e.contains("abc") && !e.contains("pw"), "a URL's secrets are not echoed: {e}");
        }
        type Break = fn(&mut CallbackConfig);
        let cases: [(&str, Break); 9] = [
            ("timeout_ms", |c| c.timeout_ms = 0),
            ("timeout_ms", |c| c.timeout_ms = u64::MAX),
            ("max_queue", |c| c.max_queue = 0),
            ("max_queue", |c| c.max_queue = MAX_QUEUE + 1),
            ("batch_max", |c| c.batch_max = 0),
            ("max_attempts", |c| c.max_attempts = 0),
            ("backoff_initial_ms", |c| c.backoff_initial_ms = 0),
            ("backoff_max_ms", |c| c.backoff_max_ms = 100),
            ("secret_file", |c| c.secret_file = Some("/nonexistent/callback-key".into())),
        ];
        for (key, break_it) in cases {
            let mut c = valid();
            break_it(&mut c);
            let e = error(&c);
            assert!(e.contains(&format!("`usage.callback.{key}`")), "{key}: {e}");
        }
    }

    #[test]
    fn toml_takes_defaults_and_refuses_unknown_keys() {
        let c: CallbackConfig =
            toml::from_str("url = \"http://127.0.0.1:9000/usage\"\nmax_queue = 5").unwrap();
        assert_eq!(
            c,
            CallbackConfig { url: "http://127.0.0.1:9000/usage".into(), max_queue: 5, ..Default::default() }
        );
        let e = toml::from_str::<CallbackConfig>("url = \"http://x/\"\nsecret = \"s\"").unwrap_err();
        assert!(e.to_string().contains("unknown field `secret`"), "{e}");
    }
}
