//! Token budgets ("the ledger"): the tokens each signed key has used, charged to its `jti`, kept
//! per replica in memory or shared by every replica in Redis.
//!
//! The contract with the request path, for a key that carries `budget_tokens`:
//! 1. **Admit** while the key's used total is below its budget: [`Ledger::used`], then
//!    [`admits`]. A key never charged has used 0.
//! 2. **Charge** after the response, when its usage is known: [`Ledger::charge`] adds the tokens
//!    and returns the new total. So the request that crosses the budget completes, and every
//!    request admitted after its charge is refused (429 `budget_exhausted`). Admission and charge
//!    are separate steps, so requests admitted together all complete: a key can overshoot by
//!    what its requests in flight use, each bounded by its `max_tokens`.
//! 3. **Expire** with the key: each entry lives until `expires_at_unix`, which the caller sets to
//!    the last second the key can still verify (its `exp` plus the verification leeway), so the
//!    total is not forgotten while the key is usable.
//! 4. **Fail closed.** Every error is typed and counted in `sidekey_budget_store_errors_total`.
//!    [`LedgerError::Unavailable`] (Redis unreachable, erroring or slower than
//!    [`LedgerSettings::timeout`]) means the caller refuses budgeted requests with 503 and
//!    `Retry-After` unless `signed_keys.budget_fail_open` is set. A full memory store refuses
//!    new keys ([`LedgerError::Full`], from `used` already) instead of evicting a live total,
//!    which would reset someone's usage; treat it like `Unavailable`. A failed charge is not
//!    retried here: it may or may not have been applied (a timeout can fire after Redis ran the
//!    command), and retrying could count it twice. Redis itself must not evict the keys
//!    (`maxmemory-policy noeviction`: every budget key has a TTL, so `volatile-*` would too).
//!
//! The pieces: [`MemoryLedger`], a bounded map behind a briefly held lock; [`RedisLedger`], one
//! `MULTI INCRBY EXPIREAT EXEC` per charge on `sidekey:budget:<jti>` through the `redis`
//! crate's reconnecting connection manager. [`Ledger`] is the enum the request path holds.
//! Errors and logs never carry a `jti` (an id, not a secret, but not ours to spread); use
//! [`jti_tag`] to name one in a log line.

mod memory;
mod redis_store;

use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus::{IntCounter, Opts};

use crate::config::{redact_url, ConfigError};

pub use memory::MemoryLedger;
pub use redis_store::{RedisLedger, KEY_PREFIX};

/// The config key that selects the store (`"memory"` or a `redis://` URL).
pub const CONFIG_KEY: &str = "signed_keys.budget_store";

/// The value of [`CONFIG_KEY`] that selects the per-replica store.
pub const MEMORY: &str = "memory";

/// The counter of store errors, for the metrics registry.
pub const ERRORS_METRIC: &str = "sidekey_budget_store_errors_total";

/// Help text of [`ERRORS_METRIC`].
pub const ERRORS_HELP: &str =
    "Token budget store operations that failed (unavailable, timed out, full or refused).";

/// The longest `jti` accepted, in bytes: the memory store holds up to `max_entries` of them.
pub const MAX_JTI_BYTES: usize = 256;

/// An unregistered [`ERRORS_METRIC`] counter: register it, then pass it in
/// [`LedgerSettings::errors`].
pub fn errors_counter() -> IntCounter {
    IntCounter::with_opts(Opts::new(ERRORS_METRIC, ERRORS_HELP))
        .expect("constant metric name and help are valid")
}

/// How a store behaves, whichever it is.
#[derive(Clone, Debug)]
pub struct LedgerSettings {
    /// Bound on each Redis call, connecting included: a hanging Redis must not hold a request
    /// longer than this. The memory store never waits.
    pub timeout: Duration,
    /// Memory store: most keys tracked at once. Past it, new keys are refused while every
    /// tracked key is live, because evicting one would forget its usage.
    pub max_entries: usize,
    /// Incremented on every error a store returns (`sidekey_budget_store_errors_total`).
    pub errors: Option<IntCounter>,
}

impl Default for LedgerSettings {
    fn default() -> Self {
        Self { timeout: Duration::from_millis(500), max_entries: 100_000, errors: None }
    }
}

/// Why a store could not answer.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The shared store cannot be used now: callers fail closed (or open, if configured).
    #[error("budget store unavailable")]
    Unavailable(#[source] Unavailable),
    /// The memory store tracks `max_entries` live keys and will not evict one.
    #[error("budget store is full ({max_entries} keys with live budgets)")]
    Full { max_entries: usize },
    /// The `jti` is empty or longer than [`MAX_JTI_BYTES`].
    #[error("jti must be 1 to {MAX_JTI_BYTES} bytes long")]
    BadJti,
}

/// The cause behind [`LedgerError::Unavailable`].
#[derive(Debug, thiserror::Error)]
pub enum Unavailable {
    /// No answer within [`LedgerSettings::timeout`] (connecting included).
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// Connection refused or dropped, or Redis answered with an error.
    #[error("redis call failed")]
    Redis(#[source] ::redis::RedisError),
}

/// True while a key that has used `used` tokens may start another request.
pub fn admits(used: u64, budget_tokens: u64) -> bool {
    used < budget_tokens
}

/// A short, stable tag for naming a `jti` in logs: the first 8 bytes of its SHA-256, in hex.
pub fn jti_tag(jti: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, jti.as_bytes());
    digest.as_ref()[..8].iter().fold(String::with_capacity(16), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The budget store the request path holds: a cheap `Clone` handle.
#[derive(Clone, Debug)]
pub enum Ledger {
    /// Per replica: each replica counts only the requests it served.
    Memory(MemoryLedger),
    /// Shared by every replica pointed at the same Redis database.
    Redis(RedisLedger),
}

impl Ledger {
    /// Builds the store named by a [`CONFIG_KEY`] value: `"memory"` or `redis://host:port/db`.
    /// A Redis store connects lazily, on its first call, and reconnects by itself, so it can be
    /// built before Redis is up. Call it inside a Tokio runtime.
    pub fn from_url(url: &str, settings: LedgerSettings) -> Result<Self, ConfigError> {
        match parse_url(CONFIG_KEY, url)? {
            Store::Memory => Ok(Self::Memory(MemoryLedger::new(settings))),
            Store::Redis(info) => Ok(Self::Redis(RedisLedger::new(info, redact_url(url), settings)?)),
        }
    }

    /// `"memory"` or `"redis"`, for logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Memory(_) => "memory",
            Self::Redis(_) => "redis",
        }
    }

    /// Tokens charged to `jti` and not yet expired; 0 for a key never charged. Refuse the
    /// request on any error: [`LedgerError::Unavailable`] (Redis), [`LedgerError::Full`] (a new
    /// key the memory store could not charge), [`LedgerError::BadJti`].
    pub async fn used(&self, jti: &str) -> Result<u64, LedgerError> {
        match self {
            Self::Memory(m) => m.used(jti),
            Self::Redis(r) => r.used(jti).await,
        }
    }

    /// Adds `tokens` to `jti`'s total, which expires at `expires_at_unix` (seconds since the
    /// epoch; each charge sets it again), and returns the new total.
    pub async fn charge(&self, jti: &str, tokens: u64, expires_at_unix: u64) -> Result<u64, LedgerError> {
        match self {
            Self::Memory(m) => m.charge(jti, tokens, expires_at_unix),
            Self::Redis(r) => r.charge(jti, tokens, expires_at_unix).await,
        }
    }
}

/// Checks a [`CONFIG_KEY`] value: `"memory"` or a `redis://` URL that the Redis client accepts.
/// The message names `key` and never shows a password from the URL.
pub fn validate_url(key: &str, value: &str) -> Result<(), ConfigError> {
    parse_url(key, value).map(|_| ())
}

enum Store {
    Memory,
    Redis(::redis::ConnectionInfo),
}

fn parse_url(key: &str, value: &str) -> Result<Store, ConfigError> {
    use ::redis::IntoConnectionInfo;
    if value == MEMORY {
        return Ok(Store::Memory);
    }
    let invalid = |reason: String| ConfigError::Invalid { key: key.to_string(), reason };
    let shown = redact_url(value);
    if value.starts_with("rediss://") {
        return Err(invalid(format!(
            "{shown:?}: TLS to Redis is not supported by this build; use redis:// on a private network"
        )));
    }
    if !value.starts_with("redis://") {
        return Err(invalid(format!("{shown:?} must be \"memory\" or a redis://host:port/db URL")));
    }
    let info = value.into_connection_info().map_err(|_| {
        invalid(format!("{shown:?} is not a valid Redis URL (redis://[:password@]host[:port][/db])"))
    })?;
    if info.redis_settings().db() < 0 {
        return Err(invalid(format!("{shown:?}: the database number must not be negative")));
    }
    Ok(Store::Redis(info))
}

/// Checks the `jti` every store operation starts with.
fn check_jti(jti: &str) -> Result<(), LedgerError> {
    if jti.is_empty() || jti.len() > MAX_JTI_BYTES {
        return Err(LedgerError::BadJti);
    }
    Ok(())
}

/// Counts an error on its way out.
fn counted<T>(errors: &Option<IntCounter>, result: Result<T, LedgerError>) -> Result<T, LedgerError> {
    if result.is_err() {
        if let Some(c) = errors {
            c.inc();
        }
    }
    result
}

/// Seconds since the epoch now (0 before it: a clock that wrong expires nothing early).
fn now_unix() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admission_is_strictly_below_the_budget() {
        assert!(admits(0, 100));
        assert!(admits(99, 100));
        assert!(!admits(100, 100));
        assert!(!admits(130, 100));
        assert!(!admits(0, 0), "a zero budget admits nothing");
    }

    #[test]
    fn validate_url_accepts_memory_and_redis_urls() {
        for ok in
            ["memory", "redis://127.0.0.1:6379/0", "redis://redis", "redis://:pw@h:1/3", "redis://u:pw@h"]
        {
            validate_url(CONFIG_KEY, ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
    }

    #[test]
    fn validate_url_names_the_key_and_hides_the_password() {
        for bad in [
            "",
            "Memory",
            "redis",
            "http://:hunter2@h:6379",
            "rediss://:hunter2@h:6379/0",
            "redis://:hunter2@h:6379/notadb",
            "redis://:hunter2@h:6379/-1",
            "redis://:hunter2@0.0.0.0:6379",
            "unix:///run/redis.sock?pass=hunter2",
        ] {
            let err = validate_url("signed_keys.budget_store", bad).expect_err(bad);
            let msg = err.to_string();
            assert!(msg.contains("`signed_keys.budget_store`"), "{bad}: {msg}");
            assert!(!msg.contains("hunter2"), "{bad}: {msg}");
        }
    }

    #[test]
    fn jti_checks_bound_length() {
        assert!(check_jti("a").is_ok());
        assert!(check_jti(&"a".repeat(MAX_JTI_BYTES)).is_ok());
        assert!(matches!(check_jti(""), Err(LedgerError::BadJti)));
        assert!(matches!(check_jti(&"a".repeat(MAX_JTI_BYTES + 1)), Err(LedgerError::BadJti)));
    }

    #[test]
    fn jti_tag_is_short_stable_and_not_the_jti() {
        let tag = jti_tag("key-123");
        assert_eq!(tag.len(), 16);
        assert_eq!(tag, jti_tag("key-123"));
        assert_ne!(tag, jti_tag("key-124"));
        assert!(!tag.contains("key-123"));
    }

    #[test]
    fn errors_counter_has_the_documented_name() {
        let c = errors_counter();
        let r = prometheus::Registry::new();
        r.register(Box::new(c.clone())).unwrap();
        assert_eq!(r.gather()[0].name(), ERRORS_METRIC);
    }

    #[test]
    fn error_messages_are_single_layer_and_lowercase() {
        let e = LedgerError::Unavailable(Unavailable::Timeout(Duration::from_millis(500)));
        assert_eq!(e.to_string(), "budget store unavailable");
        let source = std::error::Error::source(&e).unwrap().to_string();
        assert_eq!(source, "no answer within 500ms");
    }

    #[tokio::test]
    async fn from_url_builds_each_store() {
        let s = LedgerSettings::default();
        assert_eq!(Ledger::from_url("memory", s.clone()).unwrap().kind(), "memory");
        // Lazy: no Redis needed to build one.
        let r = Ledger::from_url("redis://:hunter2@127.0.0.1:1/0", s.clone()).unwrap();
        assert_eq!(r.kind(), "redis");
        let debug = format!("{r:?}");
        assert!(!debug.contains("hunter2"), "{debug}");
        assert!(Ledger::from_url("nope", s).is_err());
    }
}
