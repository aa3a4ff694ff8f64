//! The store shared by replicas: Redis, through the `redis` crate's `ConnectionManager`, which
//! multiplexes every call on one connection and reconnects in the background when it drops.
//!
//! A charge is one transaction, `MULTI; INCRBY sidekey:budget:<jti> n; EXPIREAT ... exp; EXEC`,
//! so the total and its expiry change together and concurrent charges from any number of
//! replicas add up exactly. A read is `GET` (missing = 0). Every call, connecting included, is
//! bounded by [`LedgerSettings::timeout`]; any failure is [`LedgerError::Unavailable`].
//!
//! The manager reconnects after I/O errors only: a connection attempt that fails any other way
//! (a wrong password, Redis still loading its data) is its answer for good. So when every call
//! has failed for [`REBUILD_AFTER`], the next failing call swaps in a fresh manager, at most once
//! per that interval: a Redis fixed by its operator is used again without restarting sidekey.

use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::IntCounter;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Client, ConnectionInfo, RedisError};
use tokio::time::Instant;

use super::{check_jti, counted, LedgerError, LedgerSettings, Unavailable};
use crate::config::ConfigError;

/// Prefix of every key the Redis store writes: `sidekey:budget:<jti>`.
pub const KEY_PREFIX: &str = "sidekey:budget:";

/// How soon a lost connection is tried again: the manager retries with jittered exponential
/// backoff from `MIN` to `MAX`, a few times per round; the next call after a failed round starts
/// another, so Redis coming back is noticed within about `MAX` of traffic.
const RECONNECT_MIN_DELAY: Duration = Duration::from_millis(50);
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);
const RECONNECT_RETRIES: usize = 3;

/// After this long with no successful call, a failing call replaces the connection manager.
const REBUILD_AFTER: Duration = Duration::from_secs(5);

/// The Redis budget store. Cloning shares the connection.
#[derive(Clone)]
pub struct RedisLedger(Arc<Inner>);

struct Inner {
    conn: ArcSwap<ConnectionManager>,
    client: Client,
    config: ConnectionManagerConfig,
    /// The URL with any password redacted, for `Debug`.
    shown: String,
    timeout: Duration,
    errors: Option<IntCounter>,
    /// `healthy_ms` counts from here.
    started: Instant,
    /// When a call last succeeded or the manager was last replaced, in ms since `started`.
    healthy_ms: AtomicU64,
}

impl fmt::Debug for RedisLedger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisLedger").field("url", &self.0.shown).field("timeout", &self.0.timeout).finish()
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
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), config.clone())
            .map_err(|_| invalid(format!("{shown:?}: cannot set up a Redis connection")))?;
        Ok(Self(Arc::new(Inner {
            conn: ArcSwap::from_pointee(conn),
            client,
            config,
            shown,
            timeout: settings.timeout,
            errors: settings.errors,
            started: Instant::now(),
            healthy_ms: AtomicU64::new(0),
        })))
    }

    /// Tokens charged to `jti` and not yet expired (Redis drops the key at its expiry).
    pub async fn used(&self, jti: &str) -> Result<u64, LedgerError> {
        let result = async {
            check_jti(jti)?;
            let mut conn = self.conn();
            let cmd = redis::cmd("GET").arg(key(jti)).to_owned();
            let used: Option<u64> = self.bounded(cmd.query_async(&mut conn)).await?;
            Ok(used.unwrap_or(0))
        };
        counted(&self.0.errors, result.await)
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
            let mut conn = self.conn();
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
        counted(&self.0.errors, result.await)
    }

    fn conn(&self) -> ConnectionManager {
        ConnectionManager::clone(&self.0.conn.load())
    }

    /// Runs one Redis call within the timeout, mapping every failure to `Unavailable`.
    async fn bounded<T>(&self, call: impl Future<Output = Result<T, RedisError>>) -> Result<T, LedgerError> {
        let timeout = self.0.timeout;
        let result = match tokio::time::timeout(timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.is_timeout() => Err(Unavailable::Timeout(timeout)),
            Ok(Err(e)) => Err(Unavailable::Redis(e)),
            Err(_) => Err(Unavailable::Timeout(timeout)),
        };
        let now = self.elapsed_ms();
        match result {
            Ok(v) => {
                self.0.healthy_ms.fetch_max(now, Ordering::Relaxed);
                Ok(v)
            }
            Err(e) => {
                self.rebuild_if_stuck(now);
                Err(LedgerError::Unavailable(e))
            }
        }
    }

    /// Replaces the connection manager if nothing has worked for [`REBUILD_AFTER`]; of the calls
    /// failing together, the one that moves `healthy_ms` does it.
    fn rebuild_if_stuck(&self, now: u64) {
        let healthy = self.0.healthy_ms.load(Ordering::Relaxed);
        if now.saturating_sub(healthy) < REBUILD_AFTER.as_millis() as u64 {
            return;
        }
        if self.0.healthy_ms.compare_exchange(healthy, now, Ordering::Relaxed, Ordering::Relaxed).is_err() {
            return;
        }
        // Only fails for a push-sender misconfiguration, which this config never has.
        if let Ok(fresh) =
            ConnectionManager::new_lazy_with_config(self.0.client.clone(), self.0.config.clone())
        {
            self.0.conn.store(Arc::new(fresh));
        }
    }

    fn elapsed_ms(&self) -> u64 {
        u64::try_from(self.0.started.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// The Redis key holding `jti`'s total.
fn key(jti: &str) -> String {
    format!("{KEY_PREFIX}{jti}")
}
