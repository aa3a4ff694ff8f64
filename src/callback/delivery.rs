//! [`Delivery`]: the task that empties the callback queue, one batch at a time.
//!
//! It POSTs as soon as an event is queued (no lingering to fill a batch): batches form on their
//! own while a POST is in flight. A batch keeps its body and its `X-Sidekey-Batch-Id` across
//! retries, so a receiver that saw an attempt whose answer was lost can dedupe on the batch id
//! or on each event's `id`. Only the signature headers change between attempts (fresh
//! timestamp, current key).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{CONTENT_TYPE, USER_AGENT};
use http::{HeaderValue, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::event::EventId;
use super::metrics::CallbackMetrics;
use super::sign::{self, KeyError, SigningKey};
use super::{CallbackConfig, UsageEvent};
use crate::client::{self, ClientSettings, Connector};
use crate::config::{parse_base_url, ConfigError};
use crate::token::refresher::error_chain;

/// The header naming a batch; the same on every attempt.
pub const BATCH_ID_HEADER: &str = "x-sidekey-batch-id";

/// How much of a receiver's answer is read (to keep the connection reusable); the rest is
/// dropped with the connection.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// One POST failed.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    #[error("receiver answered {0}")]
    Status(StatusCode),
    #[error("no answer within usage.callback.timeout_ms")]
    Timeout,
    #[error("receiver unreachable")]
    Transport(#[source] hyper_util::client::legacy::Error),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cannot build the request")]
    Request(#[from] http::Error),
}

/// Delay before retry number `attempt` (1 for the first retry): `initial` doubling up to
/// `max`, with equal jitter (between half and all of the step). `jitter` is in `[0, 1]`.
pub fn retry_delay(attempt: u32, initial: Duration, max: Duration, jitter: f64) -> Duration {
    crate::token::schedule::backoff(attempt, initial, max, jitter, None)
}

/// The delivery task's half of the callback: owns the queue's receiving end and the HTTP
/// client. Build it with [`super::channel`]; run it with [`Delivery::run`].
#[derive(Debug)]
pub struct Delivery {
    rx: mpsc::Receiver<UsageEvent>,
    client: Client<Connector, Full<Bytes>>,
    url: Uri,
    key: Option<SigningKey>,
    timeout: Duration,
    max_attempts: u32,
    batch_max: usize,
    backoff_initial: Duration,
    backoff_max: Duration,
    metrics: CallbackMetrics,
}

impl Delivery {
    pub(super) fn new(
        config: &CallbackConfig,
        connector: Connector,
        rx: mpsc::Receiver<UsageEvent>,
        metrics: CallbackMetrics,
    ) -> Result<Self, ConfigError> {
        let settings = ClientSettings {
            ca_file: None, // already in `connector`
            connect_timeout: config.timeout(),
            pool_idle_timeout: Duration::from_secs(90),
            // One POST at a time: one connection is all the pool needs.
            pool_max_idle_per_host: 1,
            http2: true,
        };
        Ok(Self {
            rx,
            client: client::build(connector, &settings),
            url: parse_base_url("usage.callback.url", &config.url)?,
            key: config.secret_file.as_deref().map(SigningKey::new),
            timeout: config.timeout(),
            max_attempts: config.max_attempts.max(1),
            batch_max: config.batch_max.max(1),
            backoff_initial: config.backoff_initial(),
            backoff_max: config.backoff_max(),
            metrics,
        })
    }

    /// Delivers queued events until `shutdown` fires, then drains: stops waiting for new
    /// events and keeps delivering (retries included) what is queued until the queue is empty
    /// or `grace` has passed since `shutdown`; then the events still waiting or in flight are
    /// counted as `dropped`, logged as a number, and the queue is closed (later submits are
    /// dropped). Also returns when every [`super::Dispatcher`] is gone and the queue is empty.
    pub async fn run(mut self, shutdown: CancellationToken, grace: Duration) {
        // The batch lives out here so that, when the grace runs out mid-POST, it is still
        // known what was in flight.
        let mut batch = Vec::with_capacity(self.batch_max);
        let grace_over = async {
            shutdown.cancelled().await;
            tokio::time::sleep(grace).await;
        };
        let drained = tokio::select! {
            () = self.deliver_all(&shutdown, &mut batch) => true,
            () = grace_over => false,
        };
        // Closed first, so nothing can slip in after the count: later submits are refused (and
        // counted by the dispatcher). Even when drained, a request thread may have queued an
        // event since the queue was last seen empty.
        self.rx.close();
        // Empty when drained; else the batch that was in flight.
        let mut left = batch.len();
        while self.rx.try_recv().is_ok() {
            self.metrics.queue_depth.dec();
            left += 1;
        }
        CallbackMetrics::add(&self.metrics.dropped, left);
        if drained && left == 0 {
            tracing::debug!("Usage callback queue drained");
        } else {
            tracing::warn!(
                events = left,
                grace_ms = grace.as_millis() as u64,
                "Usage callback stopped; undelivered events dropped"
            );
        }
    }

    /// Takes batches until the queue is empty after `shutdown` (or closed and empty).
    async fn deliver_all(&mut self, shutdown: &CancellationToken, batch: &mut Vec<UsageEvent>) {
        loop {
            batch.clear();
            if shutdown.is_cancelled() {
                while batch.len() < self.batch_max {
                    let Ok(event) = self.rx.try_recv() else { break };
                    batch.push(event);
                }
            } else {
                tokio::select! {
                    // Cancel-safe: nothing is taken unless this branch completes.
                    _ = self.rx.recv_many(batch, self.batch_max) => {}
                    () = shutdown.cancelled() => continue,
                }
            }
            if batch.is_empty() {
                return;
            }
            self.metrics.queue_depth.sub(batch.len() as i64);
            self.deliver(batch).await;
        }
    }

    /// POSTs one batch until a 2xx or `max_attempts`, counting its events.
    async fn deliver(&mut self, batch: &[UsageEvent]) {
        let n = batch.len();
        let body = match serde_json::to_vec(batch) {
            Ok(body) => Bytes::from(body),
            Err(e) => {
                // Plain data with string keys always serializes; never loop on it if not.
                CallbackMetrics::add(&self.metrics.failed, n);
                tracing::error!(events = n, error = %e, "Cannot serialize usage callback events");
                return;
            }
        };
        let batch_id = EventId::random().to_string();
        for attempt in 1..=self.max_attempts {
            let error = match self.attempt(&batch_id, &body).await {
                Ok(()) => {
                    CallbackMetrics::add(&self.metrics.delivered, n);
                    tracing::debug!(events = n, attempt, batch_id = %batch_id, "Usage callback delivered");
                    return;
                }
                Err(e) => e,
            };
            if attempt == self.max_attempts {
                CallbackMetrics::add(&self.metrics.failed, n);
                tracing::warn!(
                    events = n,
                    attempts = attempt,
                    batch_id = %batch_id,
                    error = %error_chain(&error),
                    "Usage callback delivery failed; events counted as failed"
                );
                return;
            }
            let delay = retry_delay(attempt, self.backoff_initial, self.backoff_max, fastrand::f64());
            CallbackMetrics::add(&self.metrics.retried, n);
            tracing::warn!(
                events = n,
                attempt,
                batch_id = %batch_id,
                retry_in_ms = delay.as_millis() as u64,
                error = %error_chain(&error),
                "Usage callback delivery failed; retrying"
            );
            tokio::time::sleep(delay).await;
        }
    }

    /// One POST of `body`, answered 2xx within `timeout`.
    async fn attempt(&mut self, batch_id: &str, body: &Bytes) -> Result<(), AttemptError> {
        let mut req = Request::post(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(USER_AGENT, concat!("sidekey/", env!("CARGO_PKG_VERSION")))
            .header(BATCH_ID_HEADER, batch_id)
            .body(Full::new(body.clone()))?;
        if let Some(key) = &mut self.key {
            let timestamp = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
            let mut signature = HeaderValue::try_from(sign::signature(key.load().await?, timestamp, body))
                .map_err(http::Error::from)?;
            signature.set_sensitive(true);
            let headers = req.headers_mut();
            headers.insert(sign::TIMESTAMP_HEADER, HeaderValue::from(timestamp));
            headers.insert(sign::SIGNATURE_HEADER, signature);
        }
        let exchange = async {
            let resp = self.client.request(req).await.map_err(AttemptError::Transport)?;
            let status = resp.status();
            // Read (a bounded amount of) the answer so the connection can be reused.
            let _ = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES).collect().await;
            Ok(status)
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Err(_) => Err(AttemptError::Timeout),
            Ok(Err(e)) => Err(e),
            Ok(Ok(status)) if status.is_success() => Ok(()),
            Ok(Ok(status)) => Err(AttemptError::Status(status)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: fn(u64) -> Duration = Duration::from_millis;

    #[test]
    fn retry_delays_double_with_equal_jitter_and_stay_bounded() {
        let (initial, max) = (MS(500), MS(30_000));
        for attempt in 1..=40 {
            let step = MS(500).saturating_mul(1 << (attempt - 1).min(20)).min(max);
            let low = retry_delay(attempt, initial, max, 0.0);
            let high = retry_delay(attempt, initial, max, 1.0);
            assert_eq!((low, high), (step / 2, step), "attempt {attempt}");
            let any = retry_delay(attempt, initial, max, fastrand::f64());
            assert!(low <= any && any <= high && any <= max, "attempt {attempt}: {any:?}");
        }
        assert_eq!(retry_delay(1, initial, max, 0.5), MS(375));
        assert_eq!(retry_delay(u32::MAX, initial, max, 1.0), max, "no overflow");
        assert_eq!(retry_delay(3, MS(500), MS(500), 1.0), MS(500), "max caps the first step too");
    }

    fn delivery(secret_file: Option<std::path::PathBuf>) -> Delivery {
        let config =
            CallbackConfig { url: "http://127.0.0.1:9/usage".into(), secret_file, ..Default::default() };
        let settings = ClientSettings {
            ca_file: None,
            connect_timeout: MS(100),
            pool_idle_timeout: MS(100),
            pool_max_idle_per_host: 1,
            http2: true,
        };
        let connector = client::connector(&settings).unwrap();
        let metrics = CallbackMetrics::register(&prometheus::Registry::new());
        super::super::channel(&config, connector, metrics).unwrap().1
    }

    #[tokio::test]
    async fn debug_output_shows_no_key() {
        let dir = std::env::temp_dir().join(format!("sidekey-delivery-{:016x}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key");
        std::fs::write(&path, "do-not-print-me").unwrap();
        let mut d = delivery(Some(path));
        d.key.as_mut().unwrap().load().await.unwrap();
        let shown = format!("{d:?}");
        assert!(shown.contains("[redacted]") && !shown.contains("do-not-print-me"), "{shown}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A signing key that was never readable means nothing is sent: unsigned events would be
    /// refused by a verifying receiver anyway, and retrying gives the Secret time to appear.
    #[tokio::test]
    async fn no_key_no_post() {
        let mut d = delivery(Some("/nonexistent/sidekey-callback-key".into()));
        let e = d.attempt("b", &Bytes::from_static(b"[]")).await.unwrap_err();
        assert!(matches!(e, AttemptError::Key(KeyError::Read { .. })), "{e}");
    }
}
