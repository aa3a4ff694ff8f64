//! The store shared by replicas: Redis, through the `redis` crate's `ConnectionManager`, which
//! multiplexes every call on one connection and reconnects in the background when it drops.
//!
//! A charge is one transaction, `MULTI; INCRBY sidekey:budget:<jti> n; EXPIREAT ... exp; EXEC`,
//! so the total and its expiry change together and concurrent charges from any number of
//! replicas add up exactly. A read is `GET` (missing = 0). Every call, connecting included, is
//! bounded by [`LedgerSettings::timeout`]; any failure is [`LedgerError::Unavailable`].

use std::fmt;
use std::time::Duration;

use prometheus::IntCounter;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, ConnectionInfo, RedisError};

use super::{check_jti, counted, LedgerError, LedgerSettings, Unavailable};
use crate::config::ConfigError;

/// Prefix of every key this store writes.
pub const KEY_PREFIX: &str = "sidekey:budget:";

/// How soon a lost connection is tried again: the manager retries with jittered exponential
/// backoff from `MIN` to `MAX`, a few times per round; the next call after a failed round starts
/// another, so Redis coming back is noticed within about `MAX` of traffic.
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(50);
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);
const RECONNECT_RETRIES: usize = 3;

/// The Redis budget store. Cloning shares the connection.
#[derive(Clone)]
pub struct RedisLedger {
    conn: ConnectionManager,
    /// The URL with any password redacted, for `Debug`.
    shown: String,
    timeout: Duration,
    errors: Option<IntCounter>,
}

impl fmt::Debug for RedisLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLedger").field("url", &self.shown).field("timeout", &self.timeout).finish()
    }
}

impl RedisLedger {
    /// A store for `info` that connects on its first call. `shown` is the URL as logs may show
    /// it (password redacted). Call it inside a Tokio runtime.
    pub(super) fn new(
        info: ConnectionInfo,
        shown: String,
        settings: LedgerSettings,
    ) -> Result<Self, ConfigError> {
        let invalid = |reason: String| ConfigError::Invalid { key: super::CONFIG_KEY.to_string(), reason };
        let client =
            Client::open(info).map_err(|_| invalid(format!("{shown:?} is not a usable Redis URL")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_min_delay(RECONNECT_MIN_DELAY)
            .set_max_delay(RECONNECT_MAX_DELAY)
            .set_number_of_retries(RECONNECT_RETRIES);
        let conn = ConnectionManager::new_lazy_with_config(client, config)
            .map_err(|_| invalid(format!("{shown:?}: cannot set up a Redis connection")))?;
        Ok(Self { conn, shown, timeout: settings.timeout, errors: settings.errors })
    }

    /// Tokens charged to `jti` and not yet expired (Redis drops the key at its expiry).
    pub async fn used(&self, jti: &str) -> Result<u64, LedgerError> {
        let result = async {
            check_jti(jti)?;
            let mut conn = self.conn.clone();
            let cmd = redis::cmd("GET").arg(key(jti)).to_owned();
            let used: Option<u64> = self.bounded(cmd.query_async(&mut conn)).await?;
            Ok(used.unwrap_or(0))
        };
        counted(&self.errors, result.await)
    }

    /// Adds `tokens` to `jti`'s total and sets its expiry to `expires_at_unix`, atomically;
    /// returns the new total. An expiry in the past deletes the key at once (as Redis does).
    pub async fn charge(&self, jti: &str, tokens: u64, expires_at_unix: u64) -> Result<u64, LedgerError> {
        let result = async {
            check_jti(jti)?;
            let key = key(jti);
            // Redis integers are i64: clamp rather than send a value it would refuse.
            let n = i64::try_from(tokens).unwrap_or(i64::MAX);
            let exp = i64::try_from(expires_at_unix).unwrap_or(i64::MAX);
            let mut conn = self.conn.clone();
            let pipe = redis::pipe()
                .atomic()
                .cmd("INCRBY")
                .arg(&key)
                .arg(n)
                .cmd("EXPIREAT")
                .arg(&key)
                .arg(exp)
                .ignore()
                .to_owned();
            let (total,): (u64,) = self.bounded(pipe.query_async(&mut conn)).await?;
            Ok(total)
        };
        counted(&self.errors, result.await)
    }

    /// Runs one Redis call within the timeout, mapping every failure to `Unavailable`.
    async fn bounded<T>(
        &self,
        call: impl std::future::Future<Output = Result<T, RedisError>>,
    ) -> Result<T, LedgerError> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.is_timeout() => Err(LedgerError::Unavailable(Unavailable::Timeout(self.timeout))),
            Ok(Err(e)) => Err(LedgerError::Unavailable(Unavailable::Redis(e))),
            Err(_) => Err(LedgerError::Unavailable(Unavailable::Timeout(self.timeout))),
        }
    }
}

/// The Redis key holding `jti`'s total.
pub fn key(jti: &str) -> String {
    format!("{KEY_PREFIX}{jti}")
}
