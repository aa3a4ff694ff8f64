//! The usage callback: one JSON event per finished request, POSTed in the background to a
//! backend (`[usage.callback]`), batched, signed, retried, and drained on shutdown.
//!
//! How the pieces fit: [`channel`] builds the two halves. The request path holds a
//! [`Dispatcher`] (a cheap clone) and calls [`Dispatcher::submit`], which never waits: the event
//! goes into a bounded queue or, when the queue is full, is dropped and counted. [`Delivery::run`]
//! is the one task that empties the queue: up to `batch_max` events per POST as a JSON array,
//! retried with jittered backoff on a non-2xx, a timeout or a connection error.
//!
//! - [`config`]: [`CallbackConfig`] and its validation.
//! - [`event`]: [`UsageEvent`], what a receiver gets (counts and names, never prompt or
//!   completion text).
//! - [`sign`]: the HMAC-SHA256 signature headers and the re-read signing key.
//! - [`delivery`]: [`Delivery`], batching, retries and the shutdown drain.
//! - [`metrics`]: [`CallbackMetrics`] (`sidekey_usage_callbacks_total{result}`, queue depth).

pub mod config;
pub mod delivery;
pub mod event;
pub mod metrics;
pub mod sign;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;

pub use config::CallbackConfig;
pub use delivery::Delivery;
pub use event::{EventId, EventUsage, Outcome, UsageEvent};
pub use metrics::CallbackMetrics;

use crate::client::Connector;
use crate::config::ConfigError;

/// The request path's handle on the callback queue. Cloning is an `Arc` bump.
#[derive(Debug, Clone)]
pub struct Dispatcher {
    tx: mpsc::Sender<UsageEvent>,
    metrics: CallbackMetrics,
    /// Events this handle's queue refused, for log throttling (the metric counts all drops).
    refused: Arc<AtomicU64>,
}

impl Dispatcher {
    /// Queues `event` for delivery. Never blocks and never waits: with the queue full (or the
    /// delivery task gone) the event is dropped and counted as `dropped`.
    /// Strings longer than [`event::MAX_FIELD_BYTES`] are cut.
    pub fn submit(&self, mut event: UsageEvent) {
        event.bound();
        // Counted before the send, so the gauge may briefly read high, never below zero.
        self.metrics.queue_depth.inc();
        let Err(e) = self.tx.try_send(event) else { return };
        self.metrics.queue_depth.dec();
        self.metrics.dropped.inc();
        let n = self.refused.fetch_add(1, Ordering::Relaxed) + 1;
        // A dead receiver under load refuses thousands of events a second: log the 1st, 2nd,
        // 4th, 8th, ... so the log says it is happening without drowning in it.
        if n.is_power_of_two() {
            let why = match e {
                TrySendError::Full(_) => "the queue is full (usage.callback.max_queue)",
                TrySendError::Closed(_) => "delivery has stopped",
            };
            tracing::warn!(dropped_total = n, reason = why, "Usage callback event dropped");
        }
    }

    /// Events waiting for delivery now.
    pub fn queue_depth(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }
}

/// Builds the request path's [`Dispatcher`] and the [`Delivery`] task that serves it, from a
/// validated `config`. `connector` is the project's rustls connector
/// ([`crate::client::connector`]), so `https://` receivers work with the same roots (and
/// optional private CA) as upstream.
pub fn channel(
    config: &CallbackConfig,
    connector: Connector,
    metrics: CallbackMetrics,
) -> Result<(Dispatcher, Delivery), ConfigError> {
    let (tx, rx) = mpsc::channel(config.max_queue.max(1));
    let delivery = Delivery::new(config, connector, rx, metrics.clone())?;
    Ok((Dispatcher { tx, metrics, refused: Arc::default() }, delivery))
}
