//! Caller-supplied credentials: an API key of the form `<key_id>:<secret>` is a Cloud.ru key
//! pair, and sidekey runs the whole token lifecycle for it (the same refresher as a configured
//! set, with one credential), isolated from every other pair.
//!
//! Pairs are keyed by the SHA-256 of the whole key, so two pairs never share a token and the
//! secret is not kept as a map key. The first request for a pair creates its entry and starts
//! its refresher; concurrent first requests find the same entry and wait on the same first fetch
//! (single flight). A pair the IAM rejects is evicted by the request that learns it. The cache
//! is bounded (least recently used evicted), idle pairs are forgotten, and token fetches for all
//! pairs together are limited to `caller_credentials.max_fetches_per_sec`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::runtime::Handle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::digest_of;
use crate::metrics::Metrics;
use crate::token::credential::{CredentialSource, Credentials};
use crate::token::iam::{FetchError, Fetched, Fetcher};
use crate::token::refresher::{RefreshSettings, Refresher};
use crate::token::{TokenStore, FIRST_FETCH};

/// `[caller_credentials]` in the units the code needs.
#[derive(Debug, Clone)]
pub struct PairSettings {
    pub max_entries: usize,
    pub idle_evict: Duration,
    pub max_fetches_per_sec: u32,
    /// The `provider_of` set's refresh settings.
    pub refresh: RefreshSettings,
}

/// One pair's token lifecycle.
pub struct PairEntry {
    pub store: TokenStore,
    digest: [u8; 32],
    /// Stops the pair's refresher.
    cancel: CancellationToken,
    last_used_ms: AtomicU64,
}

impl std::fmt::Debug for PairEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The digest of a key pair is as sensitive as the pair.
        f.debug_struct("PairEntry").field("store", &self.store).finish_non_exhaustive()
    }
}

impl Drop for PairEntry {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The bounded cache of pairs. Cheap to clone.
#[derive(Clone)]
pub struct PairCache<F> {
    inner: Arc<Inner<F>>,
}

struct Inner<F> {
    entries: Mutex<HashMap<[u8; 32], Arc<PairEntry>>>,
    fetcher: Limited<F>,
    settings: PairSettings,
    metrics: Metrics,
    /// Where pair refreshers run (the control runtime, not a proxy worker).
    handle: Handle,
    born: Instant,
}

impl<F> std::fmt::Debug for PairCache<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let entries = self.inner.entries.lock().map_or(0, |e| e.len());
        f.debug_struct("PairCache").field("entries", &entries).finish()
    }
}

/// True if `key` has the `<key_id>:<secret>` form.
pub fn is_pair(key: &str) -> bool {
    split(key).is_some()
}

fn split(key: &str) -> Option<(&str, &str)> {
    let (id, secret) = key.split_once(':')?;
    let fine = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_graphic());
    (fine(id) && fine(secret)).then_some((id, secret))
}

impl<F: Fetcher + Clone> PairCache<F> {
    pub fn new(fetcher: F, settings: PairSettings, metrics: Metrics, handle: Handle) -> Self {
        let limiter = Arc::new(RateLimiter::new(settings.max_fetches_per_sec));
        Self {
            inner: Arc::new(Inner {
                entries: Mutex::default(),
                fetcher: Limited { inner: fetcher, limiter, metrics: metrics.clone() },
                settings,
                metrics,
                handle,
                born: Instant::now(),
            }),
        }
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entry for a pair-shaped key, created (and its refresher started) on first use.
    pub fn get(&self, key: &str) -> Option<Arc<PairEntry>> {
        let (id, secret) = split(key)?;
        let digest = digest_of(key);
        let now_ms = self.now_ms();
        let mut entries = self.lock();
        if let Some(entry) = entries.get(&digest) {
            entry.last_used_ms.store(now_ms, Ordering::Relaxed);
            return Some(Arc::clone(entry));
        }
        if entries.len() >= self.inner.settings.max_entries {
            let oldest =
                entries.iter().min_by_key(|(_, e)| e.last_used_ms.load(Ordering::Relaxed)).map(|(d, _)| *d);
            if let Some(d) = oldest {
                entries.remove(&d);
                tracing::debug!("Caller credential cache full; forgot the least recently used pair");
            }
        }
        let store = TokenStore::new();
        let cancel = CancellationToken::new();
        let entry = Arc::new(PairEntry {
            store: store.clone(),
            digest,
            cancel: cancel.clone(),
            last_used_ms: AtomicU64::new(now_ms),
        });
        let creds = vec![CredentialSource::inline("caller", id, secret)];
        let refresher = Refresher::new(
            self.inner.fetcher.clone(),
            store,
            creds,
            self.inner.settings.refresh.clone(),
            self.inner.metrics.clone(),
        )
        .with_set("caller");
        self.inner.handle.spawn(refresher.run(cancel, Arc::new(AtomicBool::new(false))));
        entries.insert(digest, Arc::clone(&entry));
        Some(entry)
    }

    /// Forgets a pair (the IAM rejected it).
    pub fn evict(&self, entry: &PairEntry) {
        let mut entries = self.lock();
        if entries.get(&entry.digest).is_some_and(|e| std::ptr::eq(Arc::as_ptr(e), entry)) {
            entries.remove(&entry.digest);
        }
    }

    /// Forgets idle pairs and keeps `sidekey_caller_credentials{state}` current, until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        let every =
            (self.inner.settings.idle_evict / 4).clamp(Duration::from_millis(200), Duration::from_secs(5));
        loop {
            tokio::select! {
                _ = cancel.cancelled() => {
                    self.lock().clear();
                    return;
                }
                _ = tokio::time::sleep(every) => {}
            }
            self.sweep();
        }
    }

    /// One pass of [`PairCache::run`].
    pub fn sweep(&self) {
        let now_ms = self.now_ms();
        let idle_ms = u64::try_from(self.inner.settings.idle_evict.as_millis()).unwrap_or(u64::MAX);
        let (mut ready, mut pending, mut failed) = (0, 0, 0);
        let now = Instant::now();
        let mut entries = self.lock();
        entries.retain(|_, e| now_ms.saturating_sub(e.last_used_ms.load(Ordering::Relaxed)) < idle_ms);
        for e in entries.values() {
            match e.store.current(now) {
                Ok(_) => ready += 1,
                Err(u) if u.message.starts_with(FIRST_FETCH) => pending += 1,
                Err(_) => failed += 1,
            }
        }
        drop(entries);
        let g = &self.inner.metrics.caller_credentials;
        g.with_label_values(&["ready"]).set(ready);
        g.with_label_values(&["pending"]).set(pending);
        g.with_label_values(&["failed"]).set(failed);
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.inner.born.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Arc<PairEntry>>> {
        self.inner.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A fetcher whose fetches, across every pair, wait for the shared rate limit, and are counted.
#[derive(Clone)]
struct Limited<F> {
    inner: F,
    limiter: Arc<RateLimiter>,
    metrics: Metrics,
}

impl<F: Fetcher> Fetcher for Limited<F> {
    async fn fetch(&self, creds: Credentials) -> Result<Fetched, FetchError> {
        if self.limiter.acquire().await {
            self.metrics.caller_credential_fetches_total.with_label_values(&["rate_limited"]).inc();
        }
        let result = self.inner.fetch(creds).await;
        let label = match &result {
            Ok(_) => "success",
            Err(e) if e.outcome() == crate::token::failover::Outcome::Rejected => "rejected",
            Err(_) => "failure",
        };
        self.metrics.caller_credential_fetches_total.with_label_values(&[label]).inc();
        result
    }
}

/// A token bucket: `rate` fetches per second, bursts of up to `rate`.
#[derive(Debug)]
struct RateLimiter {
    rate: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Self { rate, state: Mutex::new((rate, Instant::now())) }
    }

    /// Waits for a permit; true if it had to wait.
    async fn acquire(&self) -> bool {
        let mut waited = false;
        loop {
            let wait = {
                let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                s.0 = (s.0 + now.duration_since(s.1).as_secs_f64() * self.rate).min(self.rate);
                s.1 = now;
                if s.0 >= 1.0 {
                    s.0 -= 1.0;
                    return waited;
                }
                Duration::from_secs_f64((1.0 - s.0) / self.rate)
            };
            waited = true;
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_shape() {
        assert!(is_pair("KEYID:SECRET"));
        assert!(is_pair("a:b:c"));
        for not in ["", "sk-abc", ":x", "x:", "a b:c", "a:b c"] {
            assert!(!is_pair(not), "{not:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_spaces_fetches() {
        let limiter = RateLimiter::new(5);
        let start = Instant::now();
        for _ in 0..5 {
            assert!(!limiter.acquire().await, "the burst is free");
        }
        assert_eq!(start.elapsed(), Duration::ZERO);
        for _ in 0..10 {
            limiter.acquire().await;
        }
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(1990) && took <= Duration::from_millis(2100), "{took:?}");
    }
}
