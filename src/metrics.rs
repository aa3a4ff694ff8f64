//! Prometheus metrics: an owned registry and typed handles, built once and shared as a cheap
//! clone. Label values come from closed sets only (endpoint, status code, credential name).
//!
//! Every family is rendered from the first scrape, so dashboards and `absent()` alerts see 0
//! rather than no data: the prometheus crate leaves out a labelled family with no series, so
//! each one gets its series created at zero here, for every label value known from the config
//! (credentials and their ordered pairs, endpoints, policy reasons) and, where the values are
//! open (status codes, models), for one representative value. The one family left without a
//! series is `sidekey_credential_failovers_total` with a single credential: there is no pair.

use std::sync::{Arc, OnceLock};

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::proxy::path::Endpoint;
use crate::proxy::usage::{ModelLabels, Scan, KINDS};

/// The `model` value the usage families start with: the catch-all past `metrics.max_models`,
/// a label they may carry anyway, so the zero series claims nothing untrue.
const PLACEHOLDER_MODEL: &str = "other";

/// Buckets that resolve sub-millisecond proxy work and multi-minute streams alike.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 120.0, 300.0, 600.0, 1800.0,
];

/// Shared metric handles. Cloning is an `Arc` bump.
#[derive(Clone, Debug)]
pub struct Metrics(Arc<Inner>);

#[derive(Debug)]
pub struct Inner {
    registry: Registry,
    pub token_refresh_total: IntCounterVec,
    pub token_refresh_duration_seconds: HistogramVec,
    pub token_expiry_timestamp_seconds: GaugeVec,
    pub token_last_success_timestamp_seconds: GaugeVec,
    pub active_credential: IntGaugeVec,
    pub credential_failovers_total: IntCounterVec,
    pub forced_refreshes_total: IntCounterVec,
    pub client_requests_total: IntCounterVec,
    pub client_tokens_total: IntCounterVec,
    pub caller_credentials: IntGaugeVec,
    pub caller_credential_fetches_total: IntCounterVec,
    pub requests_total: IntCounterVec,
    /// `requests_total` children per endpoint and status code, resolved on first use so the
    /// request path does no label hashing after that.
    request_counters: Vec<Vec<OnceLock<IntCounter>>>,
    /// Per endpoint, resolved once so the request path does no label lookup.
    request_duration: Vec<Histogram>,
    upstream_response: Vec<Histogram>,
    pub upstream_unauthorized_total: IntCounter,
    pub request_replays_total: IntCounter,
    pub inflight_requests: IntGauge,
    pub refresher_panics_total: IntCounter,
    pub queue_depth: IntGauge,
    pub queue_rejections_total: IntCounter,
    pub llm_tokens_total: IntCounterVec,
    pub llm_requests_total: IntCounterVec,
    pub usage_malformed_total: IntCounter,
    pub policy_rejections_total: IntCounterVec,
    pub policy_rewrites_total: IntCounter,
    /// Times `server.max_buffered_bytes` was spent, by what wanted the bytes.
    pub buffer_exhausted_total: IntCounterVec,
    /// Request-body bytes held in memory now (policy reads and replay copies).
    pub buffered_request_bytes: IntGauge,
    /// Bounds the `model` label (`metrics.max_models`).
    pub model_labels: ModelLabels,
}

impl std::ops::Deref for Metrics {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

impl Metrics {
    /// Builds and registers every metric. `credentials` are the configured names, so the
    /// per-credential series exist (at zero) from the start.
    pub fn new(credentials: &[String]) -> Self {
        Self::with_max_models(credentials, 50)
    }

    /// Like [`Metrics::new`], with at most `max_models` distinct `model` label values.
    pub fn with_max_models(credentials: &[String], max_models: usize) -> Self {
        Self::with_sets(&[(crate::config::DEFAULT_SET, credentials.to_vec())], max_models)
    }

    /// Every credential set with its credential names, so the per-set series exist (at zero)
    /// from the first scrape; at most `max_models` distinct `model` label values.
    pub fn with_sets(sets: &[(&str, Vec<String>)], max_models: usize) -> Self {
        let registry = Registry::new();
        let r = &registry;
        let token_refresh_total = register(
            r,
            IntCounterVec::new(
                Opts::new(
                    "sidekey_token_refresh_total",
                    "Token fetches by credential set, credential and result.",
                ),
                &["set", "credential", "result"],
            ),
        );
        let token_refresh_duration_seconds = register(
            r,
            HistogramVec::new(
                HistogramOpts::new("sidekey_token_refresh_duration_seconds", "Token endpoint round trip.")
                    .buckets(LATENCY_BUCKETS.to_vec()),
                &["set", "credential"],
            ),
        );
        let token_expiry_timestamp_seconds = register(
            r,
            GaugeVec::new(
                Opts::new(
                    "sidekey_token_expiry_timestamp_seconds",
                    "Unix time the current token of each credential set expires (0 if none).",
                ),
                &["set"],
            ),
        );
        let token_last_success_timestamp_seconds = register(
            r,
            GaugeVec::new(
                Opts::new(
                    "sidekey_token_last_success_timestamp_seconds",
                    "Unix time of the last successful token fetch of each credential set.",
                ),
                &["set"],
            ),
        );
        let active_credential = register(
            r,
            IntGaugeVec::new(
                Opts::new("sidekey_active_credential", "1 for the credential in use, 0 for the others."),
                &["set", "credential"],
            ),
        );
        let credential_failovers_total = register(
            r,
            IntCounterVec::new(
                Opts::new("sidekey_credential_failovers_total", "Switches between credentials."),
                &["set", "from", "to"],
            ),
        );
        let forced_refreshes_total = register(
            r,
            IntCounterVec::new(
                Opts::new(
                    "sidekey_forced_refreshes_total",
                    "Refreshes forced by an upstream 401 for the current token.",
                ),
                &["set"],
            ),
        );
        let client_requests_total = register(
            r,
            IntCounterVec::new(
                Opts::new("sidekey_client_requests_total", "Proxied requests by client and HTTP status."),
                &["client", "code"],
            ),
        );
        let client_tokens_total = register(
            r,
            IntCounterVec::new(
                Opts::new(
                    "sidekey_client_tokens_total",
                    "Tokens reported by upstream responses, by client and kind.",
                ),
                &["client", "kind"],
            ),
        );
        let caller_credentials = register(
            r,
            IntGaugeVec::new(
                Opts::new(
                    "sidekey_caller_credentials",
                    "Caller-supplied credential pairs cached, by state (ready, pending, failed).",
                ),
                &["state"],
            ),
        );
        let caller_credential_fetches_total = register(
            r,
            IntCounterVec::new(
                Opts::new(
                    "sidekey_caller_credential_fetches_total",
                    "Token fetches for caller-supplied pairs, by result (success, rejected, failure, rate_limited).",
                ),
                &["result"],
            ),
        );
        for state in ["ready", "pending", "failed"] {
            caller_credentials.with_label_values(&[state]);
        }
        for result in ["success", "rejected", "failure", "rate_limited"] {
            caller_credential_fetches_total.with_label_values(&[result]);
        }
        let requests_total = register(
            r,
            IntCounterVec::new(
                Opts::new("sidekey_requests_total", "Proxied requests by endpoint and HTTP status."),
                &["endpoint", "code"],
            ),
        );
        let request_duration_vec = register(
            r,
            HistogramVec::new(
                HistogramOpts::new(
                    "sidekey_request_duration_seconds",
                    "From request start to the end of the response body.",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["endpoint"],
            ),
        );
        let upstream_response_vec = register(
            r,
            HistogramVec::new(
                HistogramOpts::new(
                    "sidekey_upstream_response_seconds",
                    "Until upstream response headers (time to first byte).",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["endpoint"],
            ),
        );
        let upstream_unauthorized_total = register(
            r,
            IntCounter::new("sidekey_upstream_unauthorized_total", "401 responses from upstream."),
        );
        let request_replays_total = register(
            r,
            IntCounter::new("sidekey_request_replays_total", "Requests replayed after a forced refresh."),
        );
        let inflight_requests =
            register(r, IntGauge::new("sidekey_inflight_requests", "Requests in progress."));
        let refresher_panics_total = register(
            r,
            IntCounter::new(
                "sidekey_refresher_panics_total",
                "Token fetch tasks that panicked (caught; the refresher went on).",
            ),
        );
        let queue_depth = register(
            r,
            IntGauge::new("sidekey_queue_depth", "Requests waiting for a server.max_inflight slot."),
        );
        let queue_rejections_total = register(
            r,
            IntCounter::new(
                "sidekey_queue_rejections_total",
                "Requests answered 429 after waiting server.queue_timeout_ms for a slot.",
            ),
        );
        let llm_tokens_total = register(
            r,
            IntCounterVec::new(
                Opts::new(
                    "sidekey_llm_tokens_total",
                    "Tokens reported by upstream responses, by model and kind (prompt, completion, total, cached, reasoning).",
                ),
                &["model", "kind"],
            ),
        );
        let llm_requests_total = register(
            r,
            IntCounterVec::new(
                Opts::new(
                    "sidekey_llm_requests_total",
                    "Successful LLM responses scanned for usage, by model.",
                ),
                &["model", "stream"],
            ),
        );
        let usage_malformed_total = register(
            r,
            IntCounter::new(
                "sidekey_usage_malformed_total",
                "Response bodies or SSE events whose usage could not be read (the request was unaffected).",
            ),
        );
        let policy_rejections_total = register(
            r,
            IntCounterVec::new(
                Opts::new("sidekey_policy_rejections_total", "Requests refused by the request policy."),
                &["reason"],
            ),
        );
        let policy_rewrites_total = register(
            r,
            IntCounter::new(
                "sidekey_policy_rewrites_total",
                "Request bodies rewritten by the policy (max_tokens clamped or set, stream usage requested).",
            ),
        );
        let buffer_exhausted_total = register(
            r,
            IntCounterVec::new(
                Opts::new(
                    "sidekey_buffer_exhausted_total",
                    "Request bodies that found server.max_buffered_bytes spent: policy reads answered 503, uploads sent without a replay copy.",
                ),
                &["use"],
            ),
        );
        for use_ in ["policy", "replay"] {
            buffer_exhausted_total.with_label_values(&[use_]);
        }
        let buffered_request_bytes = register(
            r,
            IntGauge::new(
                "sidekey_buffered_request_bytes",
                "Request-body bytes held in memory (policy reads and 401-replay copies).",
            ),
        );
        for reason in crate::proxy::inspect::PolicyError::REASONS {
            policy_rejections_total.with_label_values(&[reason]);
        }
        let build_info =
            register(r, IntGaugeVec::new(Opts::new("sidekey_build_info", "Always 1."), &["version"]));
        build_info.with_label_values(&[env!("CARGO_PKG_VERSION")]).set(1);

        for (set, credentials) in sets {
            let set = *set;
            token_expiry_timestamp_seconds.with_label_values(&[set]);
            token_last_success_timestamp_seconds.with_label_values(&[set]);
            forced_refreshes_total.with_label_values(&[set]);
            for name in credentials {
                let name = name.as_str();
                active_credential.with_label_values(&[set, name]).set(0);
                token_refresh_duration_seconds.with_label_values(&[set, name]);
                for result in ["success", "failure"] {
                    token_refresh_total.with_label_values(&[set, name, result]);
                }
                for to in credentials.iter().filter(|to| to.as_str() != name) {
                    credential_failovers_total.with_label_values(&[set, name, to]);
                }
            }
        }
        for endpoint in Endpoint::ALL {
            requests_total.with_label_values(&[endpoint.as_str(), "200"]);
        }
        for stream in ["false", "true"] {
            llm_requests_total.with_label_values(&[PLACEHOLDER_MODEL, stream]);
        }
        // The kinds every usage block reports; `cached` and `reasoning` appear where reported.
        for kind in &KINDS[..3] {
            llm_tokens_total.with_label_values(&[PLACEHOLDER_MODEL, kind]);
        }
        let request_duration =
            Endpoint::ALL.iter().map(|e| request_duration_vec.with_label_values(&[e.as_str()])).collect();
        let upstream_response =
            Endpoint::ALL.iter().map(|e| upstream_response_vec.with_label_values(&[e.as_str()])).collect();

        Metrics(Arc::new(Inner {
            registry,
            token_refresh_total,
            token_refresh_duration_seconds,
            token_expiry_timestamp_seconds,
            token_last_success_timestamp_seconds,
            active_credential,
            credential_failovers_total,
            forced_refreshes_total,
            client_requests_total,
            client_tokens_total,
            caller_credentials,
            caller_credential_fetches_total,
            requests_total,
            request_counters: Endpoint::ALL
                .iter()
                .map(|_| (100..600).map(|_| OnceLock::new()).collect())
                .collect(),
            request_duration,
            upstream_response,
            upstream_unauthorized_total,
            request_replays_total,
            inflight_requests,
            refresher_panics_total,
            queue_depth,
            queue_rejections_total,
            llm_tokens_total,
            llm_requests_total,
            usage_malformed_total,
            policy_rejections_total,
            policy_rewrites_total,
            buffer_exhausted_total,
            buffered_request_bytes,
            model_labels: ModelLabels::new(max_models),
        }))
    }

    /// Counts a proxied request in `sidekey_requests_total{endpoint, code}`.
    pub fn count_request(&self, endpoint: Endpoint, status: http::StatusCode) {
        let code = status.as_u16();
        match self.request_counters[endpoint as usize].get(usize::from(code.saturating_sub(100))) {
            Some(slot) => slot
                .get_or_init(|| self.requests_total.with_label_values(&[endpoint.as_str(), status.as_str()]))
                .inc(),
            None => self.requests_total.with_label_values(&[endpoint.as_str(), status.as_str()]).inc(),
        }
    }

    pub fn request_duration(&self, endpoint: Endpoint) -> &Histogram {
        &self.request_duration[endpoint as usize]
    }

    pub fn upstream_response(&self, endpoint: Endpoint) -> &Histogram {
        &self.upstream_response[endpoint as usize]
    }

    /// Marks `active` as the credential in use.
    pub fn set_active_credential(&self, set: &str, names: &[String], active: usize) {
        for (i, name) in names.iter().enumerate() {
            self.active_credential.with_label_values(&[set, name]).set(i64::from(i == active));
        }
    }

    /// Records what a response scan found.
    pub fn record_usage(&self, scan: &Scan, request_model: Option<&str>) {
        if scan.malformed > 0 {
            self.usage_malformed_total.inc_by(u64::from(scan.malformed));
        }
        let model = scan.model.as_deref().or(request_model);
        self.model_labels.record(model, scan, &self.llm_requests_total, &self.llm_tokens_total);
    }

    /// The registry, for families registered elsewhere (e.g. [`crate::callback::CallbackMetrics`]).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The registry in Prometheus text format.
    pub fn render(&self) -> String {
        let mut buf = Vec::with_capacity(16 * 1024);
        // Encoding into a Vec only fails on invalid metric data, which typed handles rule out.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

fn register<M: prometheus::core::Collector + Clone + 'static>(
    registry: &Registry,
    metric: prometheus::Result<M>,
) -> M {
    // Names and labels are constants above; failure here is a programming error caught by tests.
    let metric = metric.expect("metric definition is valid");
    registry.register(Box::new(metric.clone())).expect("metric names are unique");
    metric
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every family, on a registry nothing has touched yet (the README's table is checked
    /// against a live `/metrics` in `tests/metrics.rs`).
    #[test]
    fn renders_every_family_before_anything_happens() {
        let m = Metrics::new(&["primary".into(), "backup".into()]);
        let text = m.render();
        for name in [
            "sidekey_token_refresh_total",
            "sidekey_token_refresh_duration_seconds",
            "sidekey_token_expiry_timestamp_seconds",
            "sidekey_token_last_success_timestamp_seconds",
            "sidekey_active_credential",
            "sidekey_credential_failovers_total",
            "sidekey_forced_refreshes_total",
            "sidekey_refresher_panics_total",
            "sidekey_requests_total",
            "sidekey_request_duration_seconds",
            "sidekey_upstream_response_seconds",
            "sidekey_upstream_unauthorized_total",
            "sidekey_request_replays_total",
            "sidekey_inflight_requests",
            "sidekey_build_info",
            "sidekey_llm_tokens_total",
            "sidekey_llm_requests_total",
            "sidekey_usage_malformed_total",
            "sidekey_policy_rejections_total",
            "sidekey_policy_rewrites_total",
            "sidekey_queue_depth",
            "sidekey_queue_rejections_total",
        ] {
            assert!(text.contains(&format!("# TYPE {name} ")), "missing {name}");
        }
        assert!(text.contains("le=\"0.0001\""));
        assert!(text.contains("le=\"600\""));
    }

    #[test]
    fn failovers_start_at_zero_for_every_ordered_pair() {
        let names: Vec<String> = ["primary", "backup", "spare"].map(String::from).into();
        let m = Metrics::new(&names);
        let text = m.render();
        let series = text.lines().filter(|l| l.starts_with("sidekey_credential_failovers_total{")).count();
        assert_eq!(series, 6, "{text}");
        assert!(text
            .contains(r#"sidekey_credential_failovers_total{from="backup",set="default",to="primary"} 0"#));
        let single = Metrics::new(&["primary".into()]).render();
        assert!(!single.contains("sidekey_credential_failovers_total{"), "no pair, no series");
    }

    /// Pre-created series are the ones later use increments, not look-alikes beside them.
    #[test]
    fn pre_created_series_are_the_ones_counted() {
        let m = Metrics::new(&["primary".into()]);
        m.count_request(Endpoint::Models, http::StatusCode::OK);
        let scan = Scan { model: Some("m".into()), ..Default::default() };
        for _ in 0..3 {
            m.record_usage(&scan, None);
        }
        let over = Metrics::with_max_models(&["primary".into()], 0);
        over.record_usage(&scan, None);
        let text = m.render();
        assert!(text.contains(r#"sidekey_requests_total{code="200",endpoint="models"} 1"#), "{text}");
        let over = over.render();
        assert!(over.contains(r#"sidekey_llm_requests_total{model="other",stream="false"} 1"#), "{over}");
        assert_eq!(over.matches("sidekey_llm_requests_total{").count(), 2, "{over}");
    }

    /// A new policy refusal needs its reason listed in `PolicyError::REASONS`: the match below
    /// stops compiling when a variant is added.
    #[test]
    fn every_policy_reason_is_pre_created() {
        use crate::proxy::inspect::PolicyError;
        let all = [
            PolicyError::ModelNotAllowed("m".into()),
            PolicyError::ModelMissing,
            PolicyError::ModelOutOfScope("m".into()),
            PolicyError::MaxTokensExceeded { field: "max_tokens", value: 2, limit: 1 },
            PolicyError::ChoicesExceeded { field: "n", value: 2, limit: 1 },
            PolicyError::BadMaxTokens("max_tokens"),
            PolicyError::NotJson,
            PolicyError::EndpointNotAllowed("other"),
            PolicyError::MethodNotAllowed { method: http::Method::PUT, endpoint: "chat_completions" },
            PolicyError::PathParameters,
            PolicyError::EncodedBody,
            PolicyError::AmbiguousKey("model".into()),
        ];
        for e in &all {
            match e {
                PolicyError::ModelNotAllowed(_)
                | PolicyError::ModelMissing
                | PolicyError::ModelOutOfScope(_)
                | PolicyError::MaxTokensExceeded { .. }
                | PolicyError::ChoicesExceeded { .. }
                | PolicyError::BadMaxTokens(_)
                | PolicyError::NotJson
                | PolicyError::EndpointNotAllowed(_)
                | PolicyError::MethodNotAllowed { .. }
                | PolicyError::PathParameters
                | PolicyError::EncodedBody
                | PolicyError::AmbiguousKey(_) => {}
            }
            assert!(PolicyError::REASONS.contains(&e.reason()), "{} is not pre-created", e.reason());
        }
        let text = Metrics::new(&[]).render();
        for reason in PolicyError::REASONS {
            assert!(text.contains(&format!("sidekey_policy_rejections_total{{reason=\"{reason}\"}} 0")));
        }
    }

    #[test]
    fn active_credential_is_one_hot() {
        let names = vec!["primary".to_string(), "backup".to_string()];
        let m = Metrics::new(&names);
        m.set_active_credential("default", &names, 1);
        assert_eq!(m.active_credential.with_label_values(&["default", "primary"]).get(), 0);
        assert_eq!(m.active_credential.with_label_values(&["default", "backup"]).get(), 1);
    }
}
