//! The callback's metric families, registered on the shared registry.
//!
//! `sidekey_usage_callbacks_total{result}` counts events, not POSTs. Every submitted event ends
//! in exactly one of `delivered`, `failed` (`max_attempts` POSTs of its batch went unanswered
//! with a 2xx) or `dropped` (queue full, or still waiting when the shutdown grace ran out);
//! `retried` counts each event once per extra POST scheduled for its batch.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// The four `result` values, all created at zero.
pub const RESULTS: [&str; 4] = ["delivered", "retried", "failed", "dropped"];

/// Handles on the callback's families. Cloning is cheap (each handle is an `Arc`).
#[derive(Debug, Clone)]
pub struct CallbackMetrics {
    pub delivered: IntCounter,
    pub retried: IntCounter,
    pub failed: IntCounter,
    pub dropped: IntCounter,
    /// Events waiting in the queue (a batch being POSTed is no longer queued).
    pub queue_depth: IntGauge,
}

impl CallbackMetrics {
    /// Registers both families on `registry`, every series at zero.
    ///
    /// # Panics
    /// If they are already registered there: register once, at start-up, and clone.
    pub fn register(registry: &Registry) -> Self {
        let total = IntCounterVec::new(
            Opts::new(
                "sidekey_usage_callbacks_total",
                "Usage callback events by result (delivered, retried, failed, dropped).",
            ),
            &["result"],
        )
        .expect("metric definition is valid");
        let queue_depth = IntGauge::new(
            "sidekey_usage_callback_queue_depth",
            "Usage callback events waiting for delivery.",
        )
        .expect("metric definition is valid");
        registry.register(Box::new(total.clone())).expect("metric names are unique");
        registry.register(Box::new(queue_depth.clone())).expect("metric names are unique");
        let [delivered, retried, failed, dropped] = RESULTS.map(|r| total.with_label_values(&[r]));
        Self { delivered, retried, failed, dropped, queue_depth }
    }

    /// Adds `n` events to a counter.
    pub(crate) fn add(counter: &IntCounter, n: usize) {
        counter.inc_by(n as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_result_starts_at_zero() {
        let registry = Registry::new();
        let m = CallbackMetrics::register(&registry);
        let mut buf = Vec::new();
        prometheus::Encoder::encode(&prometheus::TextEncoder::new(), &registry.gather(), &mut buf).unwrap();
        let text = String::from_utf8(buf).unwrap();
        for r in RESULTS {
            assert!(text.contains(&format!("sidekey_usage_callbacks_total{{result=\"{r}\"}} 0")), "{text}");
        }
        assert!(text.contains("# TYPE sidekey_usage_callback_queue_depth gauge"), "{text}");
        assert!(text.contains("sidekey_usage_callback_queue_depth 0"), "{text}");
        CallbackMetrics::add(&m.dropped, 3);
        let again = CallbackMetrics::register(&Registry::new());
        assert_eq!((m.dropped.get(), again.dropped.get()), (3, 0), "registries are independent");
    }
}
