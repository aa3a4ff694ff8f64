//! The background refresher: the single owner of every token fetch.
//!
//! It fetches at once on start, then sleeps on the pure schedule until the next refresh, a
//! failback probe, a forced refresh (an upstream 401), or a credential file poll. Failures keep
//! the last good token serving while it is valid and retry with jittered backoff; a panic in a
//! fetch is caught, counted and treated as a transient failure.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::FutureExt;
use tokio::time::{sleep_until, Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use super::credential::CredentialSource;
use super::failover::{Failover, Outcome, Transition};
use super::iam::{FetchError, Fetched, Fetcher};
use super::schedule::{backoff, refresh_after};
use super::{Token, TokenStore, Unavailable};
use crate::config::AuthConfig;
use crate::metrics::Metrics;

/// Timing knobs, in the units the code needs.
#[derive(Debug, Clone)]
pub struct RefreshSettings {
    pub refresh_before: Duration,
    pub expiry_margin: Duration,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub failover_after_failures: u32,
    pub failback_after: Duration,
    pub min_forced_interval: Duration,
    /// How long a request answered 401 waits for the forced refresh; attempts that would start
    /// later help none of the waiters.
    pub forced_refresh_timeout: Duration,
    pub credential_poll: Duration,
}

impl RefreshSettings {
    pub fn from_config(a: &AuthConfig) -> Self {
        Self {
            refresh_before: Duration::from_secs(a.refresh_before_secs),
            expiry_margin: Duration::from_secs(a.expiry_margin_secs),
            backoff_initial: Duration::from_millis(a.backoff_initial_ms),
            backoff_max: Duration::from_millis(a.backoff_max_ms),
            failover_after_failures: a.failover_after_failures,
            failback_after: Duration::from_secs(a.failback_after_secs),
            min_forced_interval: Duration::from_secs(a.min_forced_refresh_interval_secs),
            forced_refresh_timeout: Duration::from_secs(a.forced_refresh_timeout_secs),
            credential_poll: Duration::from_secs(a.credential_poll_secs.max(1)),
        }
    }
}

/// Owns the fetch schedule and the failover state.
pub struct Refresher<F> {
    fetcher: Arc<F>,
    store: TokenStore,
    creds: Vec<CredentialSource>,
    names: Vec<String>,
    failover: Failover,
    settings: RefreshSettings,
    metrics: Metrics,
    /// The last failure of each credential, for 503 messages.
    reasons: Vec<Option<String>>,
    fingerprints: Vec<Option<u64>>,
    /// Consecutive failed fetches, for the backoff; reset by a success.
    failures: u32,
    next_refresh: Instant,
    last_forced: Option<Instant>,
    generation: u64,
    /// The credential set this refresher serves: a label on its metrics and logs.
    set: Arc<str>,
    /// Whether each credential's last fetch was a rejection.
    rejected: Vec<bool>,
}

impl<F> std::fmt::Debug for Refresher<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refresher")
            .field("credentials", &self.names)
            .field("failover", &self.failover)
            .field("failures", &self.failures)
            .field("next_refresh", &self.next_refresh)
            .finish()
    }
}

impl<F: Fetcher> Refresher<F> {
    pub fn new(
        fetcher: F,
        store: TokenStore,
        creds: Vec<CredentialSource>,
        settings: RefreshSettings,
        metrics: Metrics,
    ) -> Self {
        let n = creds.len();
        let names = creds.iter().map(|c| c.name().to_string()).collect();
        Self {
            fetcher: Arc::new(fetcher),
            store,
            creds,
            names,
            failover: Failover::new(n, settings.failover_after_failures, settings.failback_after),
            settings,
            metrics,
            reasons: vec![None; n],
            fingerprints: vec![None; n],
            failures: 0,
            next_refresh: Instant::now(),
            last_forced: None,
            generation: 0,
            set: Arc::from(crate::config::DEFAULT_SET),
            rejected: vec![false; n],
        }
    }

    /// Names the credential set this refresher serves (the `set` label; `default` otherwise).
    pub fn with_set(mut self, set: &str) -> Self {
        self.set = Arc::from(set);
        self
    }

    /// Runs until `cancel` fires. A panic inside the loop is caught and the loop goes on; `alive`
    /// is true while this runs (liveness).
    pub async fn run(mut self, cancel: CancellationToken, alive: Arc<AtomicBool>) {
        struct Alive(Arc<AtomicBool>);
        impl Drop for Alive {
            fn drop(&mut self) {
                self.0.store(false, Ordering::Release);
            }
        }
        alive.store(true, Ordering::Release);
        let _alive = Alive(alive);
        if self.creds.is_empty() {
            cancel.cancelled().await;
            return;
        }
        self.metrics.set_active_credential(&self.set, &self.names, 0);
        self.baseline_fingerprints().await;
        loop {
            let result = AssertUnwindSafe(self.run_loop(&cancel)).catch_unwind().await;
            if result.is_ok() || cancel.is_cancelled() {
                return;
            }
            self.metrics.refresher_panics_total.inc();
            tracing::error!("Token refresher panicked; restarting its loop in one second");
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
    }

    async fn run_loop(&mut self, cancel: &CancellationToken) {
        let watch_files = self.creds.iter().any(CredentialSource::uses_files);
        let mut poll = tokio::time::interval(self.settings.credential_poll);
        poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
        poll.tick().await;
        /// What woke the loop.
        enum Wake {
            Forced,
            Poll,
            Due,
        }
        loop {
            let wake_at = match self.failover.next_probe() {
                Some(probe) => probe.min(self.next_refresh),
                None => self.next_refresh,
            };
            let wake = tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = self.store.force_wanted() => Wake::Forced,
                _ = poll.tick(), if watch_files => Wake::Poll,
                _ = sleep_until(wake_at) => Wake::Due,
            };
            // Every piece of work races the cancellation, so shutdown never waits for a hanging
            // token endpoint (the spawned fetch is aborted with it).
            let work = async {
                match wake {
                    Wake::Forced => self.on_forced().await,
                    Wake::Poll => self.check_files().await,
                    Wake::Due => {
                        let now = Instant::now();
                        let cred = if self.failover.probe_due(now) { 0 } else { self.failover.active() };
                        self.attempt(cred).await;
                    }
                }
            };
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = work => {}
            }
        }
    }

    /// An upstream 401 for the current token: refresh now unless one was forced recently.
    ///
    /// The requests waiting on this refresh are settled only once it is over: it follows the
    /// failover state machine and the backoff schedule within their wait, so a credential
    /// rejected here hands over to the next one at once, and a transient failure is retried
    /// after its backoff. It ends with the first token installed, when no credential is left that
    /// could issue one, or when the next attempt would start after the waiters have given up.
    async fn on_forced(&mut self) {
        let wanted = self.store.force_requested();
        let current = self.store.latest().map_or(0, |t| t.generation());
        let now = Instant::now();
        if wanted < current {
            // Already replaced since that request was sent.
            self.store.settle(wanted);
            return;
        }
        if let Some(last) = self.last_forced {
            if now.duration_since(last) < self.settings.min_forced_interval {
                tracing::debug!(
                    min_interval_secs = self.settings.min_forced_interval.as_secs(),
                    "Upstream rejected the token again; forced refresh is rate-limited"
                );
                self.store.settle(wanted);
                return;
            }
        }
        self.last_forced = Some(now);
        self.metrics.forced_refreshes_total.with_label_values(&[&self.set]).inc();
        tracing::info!(generation = wanted, "Upstream answered 401 for the current token; refreshing now");
        let deadline = later(now, self.settings.forced_refresh_timeout);
        loop {
            if self.attempt(self.failover.active()).await {
                break;
            }
            if self.failover.all_rejected() {
                break;
            }
            // `on_failure` has set the next attempt: at once after a switch, else after the
            // backoff (never before a server's Retry-After), so this loop cannot spin.
            if self.next_refresh >= deadline {
                tracing::debug!(
                    retry_in_ms =
                        self.next_refresh.saturating_duration_since(Instant::now()).as_millis() as u64,
                    "Forced refresh gave up: the next attempt is due after the requests stop waiting"
                );
                break;
            }
            sleep_until(self.next_refresh).await;
        }
        self.store.settle(wanted);
    }

    async fn baseline_fingerprints(&mut self) {
        for (i, c) in self.creds.iter().enumerate() {
            if c.uses_files() {
                self.fingerprints[i] = c.read().await.ok().map(|v| v.fingerprint());
            }
        }
    }

    /// Re-reads credential files; a changed credential is given a fresh chance at once.
    async fn check_files(&mut self) {
        let now = Instant::now();
        for i in 0..self.creds.len() {
            if !self.creds[i].uses_files() {
                continue;
            }
            let fingerprint = self.creds[i].read().await.ok().map(|v| v.fingerprint());
            if fingerprint == self.fingerprints[i] {
                continue;
            }
            self.fingerprints[i] = fingerprint;
            tracing::info!(credential = %self.names[i], "Credential files changed; refreshing promptly");
            self.failover.reset(i);
            self.reasons[i] = None;
            self.rejected[i] = false;
            if i == self.failover.active() {
                self.next_refresh = now;
            } else if i == 0 {
                self.failover.expedite_probe(now);
            }
        }
    }

    /// One fetch with credential `cred`, and everything that follows from its outcome. True if
    /// it installed a new token.
    async fn attempt(&mut self, cred: usize) -> bool {
        let name = self.names[cred].clone();
        let started = Instant::now();
        let wall_started = SystemTime::now();
        let source = self.creds[cred].clone();
        let fetcher = Arc::clone(&self.fetcher);
        // A separate task, so a panic in the fetch is contained and reported as a failure.
        let task = tokio::spawn(async move {
            let creds = source.read().await?;
            fetcher.fetch(creds).await
        });
        /// Aborts the fetch if this future is dropped (shutdown).
        struct AbortOnDrop(tokio::task::AbortHandle);
        impl Drop for AbortOnDrop {
            fn drop(&mut self) {
                self.0.abort();
            }
        }
        let _abort = AbortOnDrop(task.abort_handle());
        let result = match task.await {
            Ok(result) => result,
            Err(join) => {
                if join.is_panic() {
                    self.metrics.refresher_panics_total.inc();
                    tracing::error!(credential = %name, "Token fetch panicked; treating it as a transient failure");
                }
                Err(FetchError::Panicked)
            }
        };
        let now = Instant::now();
        self.metrics
            .token_refresh_duration_seconds
            .with_label_values(&[&*self.set, &name])
            .observe(now.duration_since(started).as_secs_f64());
        let installed = match result {
            Ok(fetched) => self.on_success(cred, fetched, started, wall_started, now),
            Err(err) => {
                self.on_failure(cred, err, now);
                false
            }
        };
        self.metrics.set_active_credential(&self.set, &self.names, self.failover.active());
        installed
    }

    /// Installs the fetched token, or counts it as a failure if it is unusable. True if installed.
    fn on_success(
        &mut self,
        cred: usize,
        fetched: Fetched,
        started: Instant,
        wall_started: SystemTime,
        now: Instant,
    ) -> bool {
        if fetched.expires_in <= self.settings.expiry_margin {
            let err = FetchError::TooShortLived {
                expires_in: fetched.expires_in,
                margin: self.settings.expiry_margin,
            };
            self.on_failure(cred, err, now);
            return false;
        }
        let name = &self.names[cred];
        self.generation += 1;
        // Expiry counts from before the request was sent, on the monotonic clock.
        let expires_at = started + fetched.expires_in;
        let token = match Token::new(
            &fetched.access_token,
            expires_at,
            self.settings.expiry_margin,
            self.generation,
            Arc::clone(self.creds[cred].name()),
        ) {
            Ok(token) => token,
            Err(_) => {
                let err = FetchError::BadResponse(super::iam::ResponseError::InvalidToken);
                self.on_failure(cred, err, now);
                return false;
            }
        };
        self.store.install(token);
        self.metrics.token_refresh_total.with_label_values(&[&*self.set, name, "success"]).inc();
        let expiry_unix = unix_secs(wall_started + fetched.expires_in);
        self.metrics.token_expiry_timestamp_seconds.with_label_values(&[&self.set]).set(expiry_unix);
        self.metrics
            .token_last_success_timestamp_seconds
            .with_label_values(&[&self.set])
            .set(unix_secs(SystemTime::now()));
        self.failures = 0;
        self.reasons[cred] = None;
        self.rejected[cred] = false;
        let delay = refresh_after(
            fetched.expires_in,
            self.settings.refresh_before,
            self.settings.expiry_margin,
            fastrand::f64(),
        );
        self.next_refresh = started + delay;
        // Old failure reasons no longer describe the state; if this token runs out before the
        // next refresh lands, the message says a refresh is in progress.
        self.store.set_status(Unavailable {
            message: super::FIRST_FETCH.into(),
            rejected: false,
            next_attempt: self.next_refresh,
        });
        tracing::info!(
            credential = %name,
            generation = self.generation,
            expires_in_secs = fetched.expires_in.as_secs(),
            next_refresh_in_secs = self.next_refresh.saturating_duration_since(now).as_secs(),
            "Token refreshed"
        );
        if let Transition::Switch { from, to } = self.failover.record(cred, Outcome::Success, now) {
            self.log_switch(from, to, "failback: the primary works again");
        }
        true
    }

    fn on_failure(&mut self, cred: usize, err: FetchError, now: Instant) {
        let name = self.names[cred].clone();
        self.metrics.token_refresh_total.with_label_values(&[&*self.set, &name, "failure"]).inc();
        self.reasons[cred] = Some(err.summary());
        let was_active = cred == self.failover.active();
        let outcome = err.outcome();
        self.rejected[cred] = outcome == Outcome::Rejected;
        let transition = self.failover.record(cred, outcome, now);
        let retry_in = match transition {
            Transition::Switch { from, to } => {
                let why = match outcome {
                    Outcome::Rejected => "credential rejected",
                    _ => "too many consecutive failures",
                };
                self.log_switch(from, to, why);
                self.failures = self.failures.saturating_add(u32::from(outcome == Outcome::Transient));
                self.next_refresh = now;
                Duration::ZERO
            }
            Transition::Stay if was_active => {
                self.failures = self.failures.saturating_add(1);
                let delay = backoff(
                    self.failures,
                    self.settings.backoff_initial,
                    self.settings.backoff_max,
                    fastrand::f64(),
                    err.retry_after(),
                );
                self.next_refresh = now + delay;
                delay
            }
            // A failed failback probe: the backup's schedule is unchanged.
            Transition::Stay => self.next_refresh.saturating_duration_since(now),
        };
        let token_valid = self.store.has_usable(now);
        tracing::warn!(
            credential = %name,
            outcome = ?outcome,
            reason = %err.summary(),
            error = %error_chain(&err),
            retry_in_ms = retry_in.as_millis() as u64,
            token_still_valid = token_valid,
            probe = !was_active,
            "Token fetch failed"
        );
        self.store.set_status(Unavailable {
            message: self.unavailable_message(),
            rejected: self.rejected.iter().all(|r| *r),
            next_attempt: self.next_refresh,
        });
    }

    fn log_switch(&self, from: usize, to: usize, why: &str) {
        self.metrics
            .credential_failovers_total
            .with_label_values(&[&*self.set, &self.names[from], &self.names[to]])
            .inc();
        tracing::warn!(set = %self.set, from = %self.names[from], to = %self.names[to], reason = why, "Switched credential");
    }

    fn unavailable_message(&self) -> String {
        let parts: Vec<String> = self
            .names
            .iter()
            .zip(&self.reasons)
            .filter_map(|(name, reason)| reason.as_ref().map(|r| format!("credential '{name}' {r}")))
            .collect();
        if parts.is_empty() {
            super::FIRST_FETCH.into()
        } else {
            format!("no valid token: {}", parts.join(", "))
        }
    }
}

/// `at + d`, or a time far beyond any wait if that overflows (a huge configured duration).
fn later(at: Instant, d: Duration) -> Instant {
    at.checked_add(d).unwrap_or_else(|| at + Duration::from_secs(30 * 365 * 24 * 3600))
}

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

/// An error and its sources on one line.
pub fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        out.push_str(": ");
        out.push_str(&e.to_string());
        source = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    //! The schedule on paused time, with an in-memory fetcher (no sockets, so time can jump).
    use std::collections::{HashMap, VecDeque};
    use std::sync::Mutex;

    use http::StatusCode;

    use super::*;
    use crate::token::credential::Credentials;
    use crate::token::redact::ErrorBody;

    #[derive(Clone, Debug)]
    enum Step {
        Issue(u64),
        Reject,
        Unavailable(Option<u64>),
        Panic,
    }

    #[derive(Default)]
    struct Inner {
        queued: HashMap<String, VecDeque<Step>>,
        fallback: HashMap<String, Step>,
        /// How long a fetch with this key takes (none by default).
        latency: HashMap<String, Duration>,
        calls: Vec<(String, Instant)>,
    }

    #[derive(Clone, Default)]
    struct Script(Arc<Mutex<Inner>>);

    impl Script {
        fn queue(&self, key: &str, steps: &[Step]) {
            self.0.lock().unwrap().queued.entry(key.into()).or_default().extend(steps.iter().cloned());
        }
        fn otherwise(&self, key: &str, step: Step) {
            self.0.lock().unwrap().fallback.insert(key.into(), step);
        }
        fn latency(&self, key: &str, latency: Duration) {
            self.0.lock().unwrap().latency.insert(key.into(), latency);
        }
        fn calls(&self) -> Vec<(String, Instant)> {
            self.0.lock().unwrap().calls.clone()
        }
        fn count(&self, key: &str) -> usize {
            self.calls().iter().filter(|(k, _)| k == key).count()
        }
    }

    impl Fetcher for Script {
        async fn fetch(&self, creds: Credentials) -> Result<Fetched, FetchError> {
            let key = creds.id.expose().to_string();
            let (step, latency) = {
                let mut s = self.0.lock().unwrap();
                s.calls.push((key.clone(), Instant::now()));
                let queued = s.queued.get_mut(&key).and_then(VecDeque::pop_front);
                let step = queued.or_else(|| s.fallback.get(&key).cloned()).unwrap_or(Step::Issue(3600));
                (step, s.latency.get(&key).copied().unwrap_or_default())
            };
            tokio::time::sleep(latency).await;
            match step {
                Step::Issue(secs) => Ok(Fetched {
                    access_token: format!("token-{key}-{}", fastrand::u32(..)).into(),
                    expires_in: Duration::from_secs(secs),
                }),
                Step::Reject => {
                    Err(FetchError::Rejected { status: StatusCode::UNAUTHORIZED, body: ErrorBody::default() })
                }
                Step::Unavailable(retry_after) => Err(FetchError::Status {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    body: ErrorBody::default(),
                    retry_after: retry_after.map(Duration::from_secs),
                }),
                Step::Panic => panic!("scripted panic in fetch"),
            }
        }
    }

    fn settings() -> RefreshSettings {
        RefreshSettings {
            refresh_before: Duration::from_secs(300),
            expiry_margin: Duration::from_secs(5),
            backoff_initial: Duration::from_secs(1),
            backoff_max: Duration::from_secs(30),
            failover_after_failures: 3,
            failback_after: Duration::from_secs(300),
            min_forced_interval: Duration::from_secs(10),
            forced_refresh_timeout: Duration::from_secs(10),
            credential_poll: Duration::from_secs(10),
        }
    }

    struct Running {
        script: Script,
        store: TokenStore,
        metrics: Metrics,
        start: Instant,
        _cancel: tokio_util::sync::DropGuard,
    }

    fn start(names: &[&str]) -> Running {
        let script = Script::default();
        let store = TokenStore::new();
        let owned: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let metrics = Metrics::new(&owned);
        let creds = names.iter().map(|n| CredentialSource::inline(n, n, "secret")).collect();
        let refresher = Refresher::new(script.clone(), store.clone(), creds, settings(), metrics.clone());
        let cancel = CancellationToken::new();
        tokio::spawn(refresher.run(cancel.clone(), Arc::new(AtomicBool::new(false))));
        Running { script, store, metrics, start: Instant::now(), _cancel: cancel.drop_guard() }
    }

    async fn at(r: &Running, secs: f64) {
        tokio::time::sleep_until(r.start + Duration::from_secs_f64(secs)).await;
    }

    fn offsets(r: &Running) -> Vec<f64> {
        r.script.calls().iter().map(|(_, t)| t.duration_since(r.start).as_secs_f64()).collect()
    }

    fn credential(r: &Running) -> String {
        r.store.latest().map(|t| t.credential().to_string()).unwrap_or_default()
    }

    #[tokio::test(start_paused = true)]
    async fn fetches_at_once_then_ahead_of_expiry() {
        let r = start(&["primary"]);
        at(&r, 1.0).await;
        assert_eq!(r.script.calls().len(), 1);
        assert!(r.store.has_usable(Instant::now()));
        // 3600 s tokens are refreshed 300 s early, minus up to 30 s of jitter.
        at(&r, 3269.0).await;
        assert_eq!(r.script.calls().len(), 1);
        at(&r, 3301.0).await;
        assert_eq!(r.script.calls().len(), 2);
        at(&r, 3301.0 + 3301.0).await;
        assert_eq!(r.script.calls().len(), 3);
        assert_eq!(
            r.metrics.token_refresh_total.with_label_values(&["default", "primary", "success"]).get(),
            3
        );
    }

    #[tokio::test(start_paused = true)]
    async fn short_tokens_refresh_at_half_life() {
        let r = start(&["primary"]);
        r.script.otherwise("primary", Step::Issue(14));
        at(&r, 40.0).await;
        // usable for 9 s (14 s less the 5 s margin): every ~4.5 s (minus up to 0.45 s of jitter)
        let n = r.script.calls().len();
        assert!((9..=10).contains(&n), "{n} fetches: {:?}", offsets(&r));
        assert!(r.store.has_usable(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn failures_back_off_with_jitter_and_recover() {
        let r = start(&["primary"]);
        r.script
            .queue("primary", &[Step::Unavailable(None), Step::Unavailable(None), Step::Unavailable(None)]);
        at(&r, 20.0).await;
        let t = offsets(&r);
        assert_eq!(t.len(), 4, "{t:?}");
        let gaps: Vec<f64> = t.windows(2).map(|w| w[1] - w[0]).collect();
        for (gap, (lo, hi)) in gaps.iter().zip([(0.5, 1.0), (1.0, 2.0), (2.0, 4.0)]) {
            assert!(*gap >= lo - 0.01 && *gap <= hi + 0.01, "gaps {gaps:?}");
        }
        assert!(r.store.has_usable(Instant::now()));
        // back on the normal schedule: nothing more until ~3300 s after the success
        at(&r, t[3] + 3200.0).await;
        assert_eq!(r.script.calls().len(), 4);
        assert_eq!(
            r.metrics.token_refresh_total.with_label_values(&["default", "primary", "failure"]).get(),
            3
        );
    }

    #[tokio::test(start_paused = true)]
    async fn retry_after_is_honoured() {
        let r = start(&["primary"]);
        r.script.queue("primary", &[Step::Unavailable(Some(20))]);
        at(&r, 19.5).await;
        assert_eq!(r.script.calls().len(), 1);
        at(&r, 20.5).await;
        assert_eq!(r.script.calls().len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn rejected_primary_fails_over_at_once_and_fails_back() {
        let r = start(&["primary", "backup"]);
        r.script.queue("primary", &[Step::Reject]);
        at(&r, 1.0).await;
        assert_eq!(r.script.count("primary"), 1);
        assert_eq!(r.script.count("backup"), 1);
        assert_eq!(credential(&r), "backup");
        let failovers = &r.metrics.credential_failovers_total;
        assert_eq!(failovers.with_label_values(&["default", "primary", "backup"]).get(), 1);
        assert_eq!(r.metrics.active_credential.with_label_values(&["default", "backup"]).get(), 1);
        // the primary is probed after failback_after (300 s) and works again
        at(&r, 299.0).await;
        assert_eq!(r.script.count("primary"), 1);
        at(&r, 301.0).await;
        assert_eq!(r.script.count("primary"), 2);
        assert_eq!(credential(&r), "primary");
        assert_eq!(failovers.with_label_values(&["default", "backup", "primary"]).get(), 1);
        assert_eq!(r.metrics.active_credential.with_label_values(&["default", "primary"]).get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probes_keep_the_backup_serving() {
        let r = start(&["primary", "backup"]);
        r.script.otherwise("primary", Step::Reject);
        at(&r, 1000.0).await;
        // probes at 0 (the first fetch), 300, 600, 900
        assert_eq!(r.script.count("primary"), 4, "{:?}", r.script.calls());
        assert_eq!(r.script.count("backup"), 1);
        assert_eq!(credential(&r), "backup");
        assert!(r.store.has_usable(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_fail_over_at_the_threshold() {
        let r = start(&["primary", "backup"]);
        r.script.otherwise("primary", Step::Unavailable(None));
        at(&r, 10.0).await;
        assert_eq!(r.script.count("primary"), 3);
        assert_eq!(r.script.count("backup"), 1);
        assert_eq!(credential(&r), "backup");
    }

    #[tokio::test(start_paused = true)]
    async fn all_rejected_reports_each_reason() {
        let r = start(&["primary", "backup"]);
        r.script.otherwise("primary", Step::Reject);
        r.script.otherwise("backup", Step::Unavailable(None));
        at(&r, 30.0).await;
        let err = r.store.current(Instant::now()).unwrap_err();
        assert!(err.message.contains("credential 'primary' rejected by IAM (401)"), "{}", err.message);
        assert!(err.message.contains("credential 'backup' IAM answered 503"), "{}", err.message);
        assert!(err.next_attempt > Instant::now());
    }

    #[tokio::test(start_paused = true)]
    async fn tokens_shorter_than_the_margin_are_failures() {
        let r = start(&["primary"]);
        r.script.queue("primary", &[Step::Issue(5), Step::Issue(3)]);
        at(&r, 5.0).await;
        assert_eq!(r.script.calls().len(), 3, "two useless tokens, then a good one");
        assert_eq!(
            r.metrics.token_refresh_total.with_label_values(&["default", "primary", "failure"]).get(),
            2
        );
        assert!(r.store.has_usable(Instant::now()));
    }

    #[tokio::test(start_paused = true)]
    async fn token_is_never_used_past_the_margin() {
        let r = start(&["primary"]);
        r.script.queue("primary", &[Step::Issue(60)]);
        r.script.otherwise("primary", Step::Unavailable(None));
        at(&r, 54.9).await;
        assert!(r.store.has_usable(Instant::now()));
        at(&r, 55.0).await;
        assert!(r.store.current(Instant::now()).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn forced_refresh_is_shared_and_rate_limited() {
        let r = start(&["primary"]);
        at(&r, 1.0).await;
        let first = r.store.latest().unwrap().generation();
        let waiters: Vec<_> = (0..200)
            .map(|_| {
                let store = r.store.clone();
                tokio::spawn(async move { store.replace_rejected(first, Duration::from_secs(10)).await })
            })
            .collect();
        for w in waiters {
            assert_eq!(w.await.unwrap().expect("a fresh token").generation(), first + 1);
        }
        assert_eq!(r.script.calls().len(), 2, "200 rejections, one forced refresh");
        assert_eq!(r.metrics.forced_refreshes_total.with_label_values(&["default"]).get(), 1);
        // A second rejection within min_forced_interval is refused, not waited out.
        let before = Instant::now();
        assert!(r.store.replace_rejected(first + 1, Duration::from_secs(10)).await.is_none());
        assert!(before.elapsed() < Duration::from_secs(1));
        assert_eq!(r.script.calls().len(), 2);
        at(&r, 12.0).await;
        assert!(r.store.replace_rejected(first + 1, Duration::from_secs(10)).await.is_some());
        assert_eq!(r.script.calls().len(), 3);
    }

    /// Asks for a forced refresh of the current token, as a request answered 401 does; returns
    /// the replacement and how long the request waited for it.
    async fn reject_current(r: &Running) -> (Option<Arc<Token>>, Duration) {
        let rejected = r.store.latest().expect("a token").generation();
        let asked = Instant::now();
        let got = r.store.replace_rejected(rejected, settings().forced_refresh_timeout).await;
        (got, asked.elapsed())
    }

    #[tokio::test(start_paused = true)]
    async fn a_forced_refresh_follows_failover_within_its_wait() {
        let r = start(&["primary", "backup"]);
        at(&r, 1.0).await;
        assert_eq!(credential(&r), "primary");
        // The primary's key is revoked: IAM rejects it from now on. Fetches take a moment, so
        // the waiting request is not rescued by a token that happens to land before it looks.
        r.script.otherwise("primary", Step::Reject);
        r.script.latency("primary", Duration::from_millis(50));
        r.script.latency("backup", Duration::from_millis(50));
        let (got, waited) = reject_current(&r).await;
        let token = got.expect("the waiting request gets the backup's token");
        assert_eq!(token.credential(), "backup");
        // Two round trips, no backoff between a rejection and the switch.
        assert!(waited < Duration::from_millis(110), "{waited:?}");
        assert_eq!((r.script.count("primary"), r.script.count("backup")), (2, 1));
        assert_eq!(
            r.metrics.credential_failovers_total.with_label_values(&["default", "primary", "backup"]).get(),
            1
        );
        assert_eq!(r.metrics.forced_refreshes_total.with_label_values(&["default"]).get(), 1);
        // The rate limit still holds: another rejection within min_forced_interval is refused at
        // once, without a fetch.
        let (got, waited) = reject_current(&r).await;
        assert!(got.is_none());
        assert!(waited < Duration::from_millis(10), "{waited:?}");
        assert_eq!(r.script.calls().len(), 3);
        assert_eq!(r.metrics.forced_refreshes_total.with_label_values(&["default"]).get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_forced_refresh_moves_past_every_rejected_credential() {
        let r = start(&["primary", "backup", "spare"]);
        at(&r, 1.0).await;
        r.script.otherwise("primary", Step::Reject);
        r.script.otherwise("backup", Step::Reject);
        for key in ["primary", "backup", "spare"] {
            r.script.latency(key, Duration::from_millis(50));
        }
        let (got, waited) = reject_current(&r).await;
        assert_eq!(got.expect("a token from the spare").credential(), "spare");
        assert!(waited < Duration::from_millis(160), "{waited:?}");
        let failovers = &r.metrics.credential_failovers_total;
        assert_eq!(failovers.with_label_values(&["default", "primary", "backup"]).get(), 1);
        assert_eq!(failovers.with_label_values(&["default", "backup", "spare"]).get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_forced_refresh_retries_transient_failures_on_the_backoff_schedule() {
        let r = start(&["primary"]);
        at(&r, 1.0).await;
        r.script.queue("primary", &[Step::Unavailable(None), Step::Unavailable(None)]);
        let (got, waited) = reject_current(&r).await;
        assert!(got.is_some(), "the third attempt, within the wait, gave a token");
        let t = offsets(&r);
        assert_eq!(t.len(), 4, "{t:?}");
        // 1 s initial backoff with equal jitter: 0.5-1 s, then 1-2 s. No spinning.
        let gaps: Vec<f64> = t.windows(2).skip(1).map(|w| w[1] - w[0]).collect();
        assert!((0.49..=1.01).contains(&gaps[0]) && (0.99..=2.01).contains(&gaps[1]), "gaps {gaps:?}");
        assert!(waited >= Duration::from_millis(1500) && waited <= Duration::from_secs(3), "{waited:?}");
        assert_eq!(r.metrics.forced_refreshes_total.with_label_values(&["default"]).get(), 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_forced_refresh_fails_over_after_the_transient_threshold_within_its_wait() {
        let r = start(&["primary", "backup"]);
        at(&r, 1.0).await;
        r.script.otherwise("primary", Step::Unavailable(None));
        let (got, waited) = reject_current(&r).await;
        assert_eq!(got.expect("the backup, after three transient failures").credential(), "backup");
        assert_eq!((r.script.count("primary"), r.script.count("backup")), (4, 1));
        assert!(waited <= Duration::from_secs(3), "two backoff steps at most: {waited:?}");
    }

    #[tokio::test(start_paused = true)]
    async fn a_forced_refresh_stops_when_the_next_attempt_is_after_the_wait() {
        let r = start(&["primary"]);
        at(&r, 1.0).await;
        r.script.otherwise("primary", Step::Unavailable(None));
        let (got, waited) = reject_current(&r).await;
        assert!(got.is_none());
        // Attempts 0.5-1, 1-2, 2-4 s apart fit in the 10 s wait; the one after 4-8 s more may
        // not: the waiters are settled then, before their own timeout.
        let forced = r.script.calls().len() - 1;
        assert!((4..=5).contains(&forced), "{forced} attempts: {:?}", offsets(&r));
        assert!(waited < settings().forced_refresh_timeout, "settled, not timed out: {waited:?}");
        // The refresher goes on with its backoff afterwards.
        at(&r, 30.0).await;
        assert!(r.script.calls().len() > forced + 1);
    }

    #[tokio::test(start_paused = true)]
    async fn a_forced_refresh_does_not_wait_past_a_retry_after_beyond_the_wait() {
        let r = start(&["primary"]);
        at(&r, 1.0).await;
        r.script.queue("primary", &[Step::Unavailable(Some(60))]);
        let (got, waited) = reject_current(&r).await;
        assert!(got.is_none());
        assert!(waited < Duration::from_millis(10), "{waited:?}");
        assert_eq!(r.script.calls().len(), 2);
        at(&r, 60.5).await;
        assert_eq!(r.script.calls().len(), 2, "Retry-After honoured");
        at(&r, 61.5).await;
        assert_eq!(r.script.calls().len(), 3);
    }

    #[tokio::test(start_paused = true)]
    async fn a_forced_refresh_with_every_credential_rejected_settles_at_once() {
        let r = start(&["primary", "backup"]);
        at(&r, 1.0).await;
        r.script.otherwise("primary", Step::Reject);
        r.script.otherwise("backup", Step::Reject);
        let (got, waited) = reject_current(&r).await;
        assert!(got.is_none());
        assert!(waited < Duration::from_millis(10), "{waited:?}");
        assert_eq!((r.script.count("primary"), r.script.count("backup")), (2, 1));
    }

    #[tokio::test(start_paused = true)]
    async fn a_panicking_fetch_is_caught_and_retried() {
        let r = start(&["primary"]);
        r.script.queue("primary", &[Step::Panic]);
        at(&r, 5.0).await;
        assert_eq!(r.script.calls().len(), 2);
        assert_eq!(r.metrics.refresher_panics_total.get(), 1);
        assert!(r.store.has_usable(Instant::now()));
    }
}
