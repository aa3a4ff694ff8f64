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
        }
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
        self.metrics.set_active_credential(&self.names, 0);
        self.baseline_fingerprints().await;
        loop {
            let result = AssertUnwindSafe(self.run_loop(&cancel))
                .catch_unwind()
                .await;
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
        loop {
            let wake = match self.failover.next_probe() {
                Some(probe) => probe.min(self.next_refresh),
                None => self.next_refresh,
            };
            tokio::select! {
                biased;
                _ = cancel.cancelled() => return,
                _ = self.store.force_wanted() => {
                    self.on_forced().await;
                    continue;
                }
                _ = poll.tick(), if watch_files => {
                    self.check_files().await;
                    continue;
                }
                _ = sleep_until(wake) => {}
            }
            let now = Instant::now();
            let cred = if self.failover.probe_due(now) {
                0
            } else {
                self.failover.active()
            };
            self.attempt(cred).await;
        }
    }

    /// An upstream 401 for the current token: refresh now unless one was forced recently.
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
        self.metrics.forced_refreshes_total.inc();
        tracing::info!(
            generation = wanted,
            "Upstream answered 401 for the current token; refreshing now"
        );
        let cred = self.failover.active();
        self.attempt(cred).await;
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
            if i == self.failover.active() {
                self.next_refresh = now;
            } else if i == 0 {
                self.failover.expedite_probe(now);
            }
        }
    }

    /// One fetch with credential `cred`, and everything that follows from its outcome.
    async fn attempt(&mut self, cred: usize) {
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
            .with_label_values(&[&name])
            .observe(now.duration_since(started).as_secs_f64());
        match result {
            Ok(fetched) => self.on_success(cred, fetched, started, wall_started, now),
            Err(err) => self.on_failure(cred, err, now),
        }
        self.metrics
            .set_active_credential(&self.names, self.failover.active());
    }

    fn on_success(
        &mut self,
        cred: usize,
        fetched: Fetched,
        started: Instant,
        wall_started: SystemTime,
        now: Instant,
    ) {
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
                return self.on_failure(cred, err, now);
            }
        };
        self.store.install(token);
        self.metrics
            .token_refresh_total
            .with_label_values(&[name, "success"])
            .inc();
        let expiry_unix = unix_secs(wall_started + fetched.expires_in);
        self.metrics.token_expiry_timestamp_seconds.set(expiry_unix);
        self.metrics
            .token_last_success_timestamp_seconds
            .set(unix_secs(SystemTime::now()));
        self.failures = 0;
        self.reasons[cred] = None;
        let delay = refresh_after(
            fetched.expires_in,
            self.settings.refresh_before,
            fastrand::f64(),
        );
        self.next_refresh = started + delay;
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
    }

    fn on_failure(&mut self, cred: usize, err: FetchError, now: Instant) {
        let name = self.names[cred].clone();
        self.metrics
            .token_refresh_total
            .with_label_values(&[&name, "failure"])
            .inc();
        self.reasons[cred] = Some(err.summary());
        let was_active = cred == self.failover.active();
        let outcome = err.outcome();
        let transition = self.failover.record(cred, outcome, now);
        let retry_in = match transition {
            Transition::Switch { from, to } => {
                let why = match outcome {
                    Outcome::Rejected => "credential rejected",
                    _ => "too many consecutive failures",
                };
                self.log_switch(from, to, why);
                self.failures = self
                    .failures
                    .saturating_add(u32::from(outcome == Outcome::Transient));
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
            next_attempt: self.next_refresh,
        });
    }

    fn log_switch(&self, from: usize, to: usize, why: &str) {
        self.metrics
            .credential_failovers_total
            .with_label_values(&[&self.names[from], &self.names[to]])
            .inc();
        tracing::warn!(from = %self.names[from], to = %self.names[to], reason = why, "Switched credential");
    }

    fn unavailable_message(&self) -> String {
        let parts: Vec<String> = self
            .names
            .iter()
            .zip(&self.reasons)
            .filter_map(|(name, reason)| {
                reason.as_ref().map(|r| format!("credential '{name}' {r}"))
            })
            .collect();
        if parts.is_empty() {
            super::FIRST_FETCH.into()
        } else {
            format!("no valid token: {}", parts.join(", "))
        }
    }
}

fn unix_secs(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
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
