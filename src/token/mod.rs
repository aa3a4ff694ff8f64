//! Token lifecycle: the lock-free store the request path reads, the IAM client, the pure
//! schedule and failover logic, and the background refresher that ties them together.
//!
//! One writer (the refresher) and many readers (requests): the current token sits in an
//! `ArcSwapOption`, with its `Authorization` header value built once per refresh.

pub mod credential;
pub mod failover;
pub mod iam;
pub mod redact;
pub mod refresher;
pub mod schedule;
pub mod sets;

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption};
use http::HeaderValue;
use tokio::sync::{watch, Notify};
use tokio::time::Instant;

use crate::secret::Secret;

/// A usable access token.
pub struct Token {
    header: HeaderValue,
    /// When the token stops being sent: expiry minus the safety margin.
    usable_until: Instant,
    expires_at: Instant,
    generation: u64,
    credential: Arc<str>,
}

impl Token {
    /// Builds the token and its `Bearer` header (marked sensitive) once.
    pub fn new(
        access_token: &Secret,
        expires_at: Instant,
        margin: Duration,
        generation: u64,
        credential: Arc<str>,
    ) -> Result<Self, http::header::InvalidHeaderValue> {
        let mut header = HeaderValue::try_from(format!("Bearer {}", access_token.expose()))?;
        header.set_sensitive(true);
        Ok(Self {
            header,
            usable_until: expires_at.checked_sub(margin).unwrap_or(expires_at),
            expires_at,
            generation,
            credential,
        })
    }

    /// The `Authorization` header value; cloning it is a reference-count bump.
    pub fn header(&self) -> &HeaderValue {
        &self.header
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    pub fn credential(&self) -> &str {
        &self.credential
    }

    pub fn expires_at(&self) -> Instant {
        self.expires_at
    }

    /// True while the token may still be sent.
    pub fn is_usable(&self, now: Instant) -> bool {
        now < self.usable_until
    }
}

impl fmt::Debug for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Token")
            .field("header", &crate::secret::REDACTED)
            .field("generation", &self.generation)
            .field("credential", &self.credential)
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// The status before any fetch has finished.
pub const FIRST_FETCH: &str = "no valid token yet: the first fetch is in progress";

/// Why there is no usable token, for 503 bodies and `/readyz`.
#[derive(Debug, Clone)]
pub struct Unavailable {
    pub message: String,
    /// Every credential was rejected by the token endpoint (not a passing outage).
    pub rejected: bool,
    /// When the refresher tries next; becomes `Retry-After`.
    pub next_attempt: Instant,
}

impl Unavailable {
    /// Whole seconds until the next attempt, at least 1.
    pub fn retry_after_secs(&self, now: Instant) -> u64 {
        let d = self.next_attempt.saturating_duration_since(now);
        (d.as_secs() + u64::from(d.subsec_nanos() > 0)).max(1)
    }
}

/// What the refresher has published: the newest token generation, and the newest generation
/// whose forced-refresh request has been settled (refreshed, refused by the rate limit, or failed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Published {
    pub generation: u64,
    /// The generation the last handled forced-refresh request was about.
    pub settled: u64,
    /// How many forced-refresh requests have been handled, so a waiter only trusts one handled
    /// after it asked.
    pub settles: u64,
    /// How many times the refresher has recorded a status (after every fetch attempt).
    pub statuses: u64,
}

/// Cheap-to-clone handle on the current token, shared by the proxy and the refresher.
#[derive(Clone)]
pub struct TokenStore {
    inner: Arc<StoreInner>,
}

struct StoreInner {
    current: ArcSwapOption<Token>,
    status: ArcSwap<Unavailable>,
    published: watch::Sender<Published>,
    /// The highest generation a request has reported as rejected upstream.
    force_requested: AtomicU64,
    force: Notify,
}

impl fmt::Debug for TokenStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenStore").field("current", &self.inner.current.load()).finish()
    }
}

impl Default for TokenStore {
    fn default() -> Self {
        Self::new()
    }
}

impl TokenStore {
    pub fn new() -> Self {
        let status =
            Unavailable { message: FIRST_FETCH.into(), rejected: false, next_attempt: Instant::now() };
        Self {
            inner: Arc::new(StoreInner {
                current: ArcSwapOption::empty(),
                status: ArcSwap::from_pointee(status),
                published: watch::channel(Published::default()).0,
                force_requested: AtomicU64::new(0),
                force: Notify::new(),
            }),
        }
    }

    /// The token to send now, or why there is none. No lock, no await, no allocation on success.
    pub fn current(&self, now: Instant) -> Result<Arc<Token>, Unavailable> {
        match self.inner.current.load_full() {
            Some(token) if token.is_usable(now) => Ok(token),
            Some(_) => {
                let status = self.inner.status.load();
                let message = if status.message.starts_with(FIRST_FETCH) {
                    "no valid token: the token expired and a refresh is in progress".to_string()
                } else {
                    status.message.clone()
                };
                Err(Unavailable { message, rejected: status.rejected, next_attempt: status.next_attempt })
            }
            None => Err(Unavailable::clone(&self.inner.status.load())),
        }
    }

    /// True while a usable token is held.
    pub fn has_usable(&self, now: Instant) -> bool {
        self.inner.current.load().as_ref().is_some_and(|t| t.is_usable(now))
    }

    /// The current token whether or not it is still usable (for metrics and logs).
    pub fn latest(&self) -> Option<Arc<Token>> {
        self.inner.current.load_full()
    }

    /// Installs a new token (refresher only) and wakes requests waiting for it.
    pub fn install(&self, token: Token) {
        let generation = token.generation;
        self.inner.current.store(Some(Arc::new(token)));
        self.inner.published.send_modify(|p| p.generation = generation);
    }

    /// Records why fetching failed and when the next attempt is (refresher only).
    pub fn set_status(&self, status: Unavailable) {
        self.inner.status.store(Arc::new(status));
        self.inner.published.send_modify(|p| p.statuses += 1);
    }

    /// Waits at most `wait` for a usable token or the outcome of the next fetch attempt, then
    /// returns what there is. Used by requests that arrive before a set's first token (caller-
    /// supplied pairs start on demand).
    pub async fn wait_ready(&self, wait: Duration) -> Result<Arc<Token>, Unavailable> {
        let mut rx = self.inner.published.subscribe();
        let seen = rx.borrow_and_update().statuses;
        if let Ok(token) = self.current(Instant::now()) {
            return Ok(token);
        }
        let _ = tokio::time::timeout(wait, rx.wait_for(|p| p.statuses > seen)).await;
        self.current(Instant::now())
    }

    /// Marks forced-refresh requests up to `generation` as handled (refresher only).
    pub fn settle(&self, generation: u64) {
        self.inner.published.send_modify(|p| {
            p.settled = generation;
            p.settles += 1;
        });
    }

    /// The newest generation a request asked to replace (refresher only).
    pub fn force_requested(&self) -> u64 {
        self.inner.force_requested.load(Ordering::Acquire)
    }

    /// Resolves when a request has asked for a forced refresh (refresher only).
    pub async fn force_wanted(&self) {
        self.inner.force.notified().await
    }

    /// Tells the refresher that upstream rejected generation `rejected`, without waiting.
    pub fn report_rejected(&self, rejected: u64) {
        if self.latest().is_some_and(|t| t.generation == rejected) {
            self.inner.force_requested.fetch_max(rejected, Ordering::AcqRel);
            self.inner.force.notify_one();
        }
    }

    /// Called by a request whose token `rejected` was answered 401 upstream. Asks the refresher
    /// for a new token (all concurrent callers share one refresh), waits at most `wait`, and
    /// returns a usable token newer than `rejected`, if one arrived.
    pub async fn replace_rejected(&self, rejected: u64, wait: Duration) -> Option<Arc<Token>> {
        let newer = |store: &Self| store.current(Instant::now()).ok().filter(|t| t.generation > rejected);
        let mut rx = self.inner.published.subscribe();
        let asked_at = rx.borrow_and_update().settles;
        if let Some(token) = newer(self) {
            return Some(token);
        }
        self.inner.force_requested.fetch_max(rejected, Ordering::AcqRel);
        self.inner.force.notify_one();
        let _ = tokio::time::timeout(
            wait,
            rx.wait_for(|p| p.generation > rejected || (p.settles > asked_at && p.settled >= rejected)),
        )
        .await;
        newer(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn token(gen: u64, ttl: Duration) -> Token {
        Token::new(&Secret::new("tok"), Instant::now() + ttl, Duration::from_secs(5), gen, "p".into())
            .unwrap()
    }

    #[tokio::test(start_paused = true)]
    async fn never_hands_out_a_token_within_the_margin() {
        let store = TokenStore::new();
        assert!(store.current(Instant::now()).is_err());
        store.install(token(1, Duration::from_secs(60)));
        assert_eq!(store.current(Instant::now()).unwrap().generation(), 1);
        tokio::time::advance(Duration::from_secs(55)).await;
        let err = store.current(Instant::now()).unwrap_err();
        assert!(err.message.contains("expired"), "{}", err.message);
    }

    #[test]
    fn header_is_sensitive_and_debug_is_redacted() {
        let t = Token::new(&Secret::new("abc.def"), Instant::now(), Duration::ZERO, 1, "p".into()).unwrap();
        assert!(t.header().is_sensitive());
        assert!(!format!("{t:?}").contains("abc.def"));
        assert!(!format!("{:?}", t.header()).contains("abc.def"));
    }

    #[tokio::test(start_paused = true)]
    async fn replace_rejected_returns_newer_token_once_installed() {
        let store = TokenStore::new();
        store.install(token(1, Duration::from_secs(600)));
        let s2 = store.clone();
        let waiter = tokio::spawn(async move { s2.replace_rejected(1, Duration::from_secs(10)).await });
        store.force_wanted().await;
        assert_eq!(store.force_requested(), 1);
        store.install(token(2, Duration::from_secs(600)));
        let got = waiter.await.unwrap().expect("new token");
        assert_eq!(got.generation(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn replace_rejected_gives_up_when_settled_without_a_new_token() {
        let store = TokenStore::new();
        store.install(token(1, Duration::from_secs(600)));
        let s2 = store.clone();
        let waiter = tokio::spawn(async move { s2.replace_rejected(1, Duration::from_secs(10)).await });
        store.force_wanted().await;
        store.settle(1);
        assert!(waiter.await.unwrap().is_none());
    }

    #[test]
    fn retry_after_rounds_up() {
        let now = Instant::now();
        let u = Unavailable {
            message: String::new(),
            rejected: false,
            next_attempt: now + Duration::from_millis(1500),
        };
        assert_eq!(u.retry_after_secs(now), 2);
        let u = Unavailable { message: String::new(), rejected: false, next_attempt: now };
        assert_eq!(u.retry_after_secs(now), 1);
    }
}
