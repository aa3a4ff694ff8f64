//! The reverse proxy: each request is resolved to a route, a caller and a payer, then sent to
//! the route's upstream with the client's `Authorization` replaced by the payer's token, bodies
//! streamed both ways.
//!
//! Flow of one request: refuse what is not ours (forward-proxy use, TRACE, browsers) →
//! [`resolve`] route, caller and payer (404, 400, 401) → the caller's concurrency slot and policy
//! (429, 403/400/405/413) → the payer's token (503 if none) → rewrite URI and headers → stream
//! upstream → on 401 for that token, force one refresh and replay once if the body was captured
//! → stream the response back. [`forward`] holds the steps after resolution; [`guard`] the
//! browser guard.

pub mod body;
pub mod budget;
pub mod error;
mod forward;
pub mod guard;
pub mod headers;
pub mod inspect;
pub mod path;
mod replay;
pub mod report;
pub mod resolve;
pub mod usage;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{Method, Request, Response, Version};
use hyper::body::Incoming;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use self::body::{AccessInfo, RequestGuard, ResponseBody};
use self::budget::ByteBudget;
use self::error::{AuthFailure, ProxyError};
use self::forward::Decision;
use self::guard::{check_browser, is_trace};
pub use self::guard::{BrowserGuard, HostRule};
use self::path::Endpoint;
use self::resolve::{CallerError, Resolver};
use self::usage::UsageScanner;
use crate::client::pool::Pool;
use crate::metrics::Metrics;
use crate::token::refresher::error_chain;

/// Proxy settings, in the units the code needs.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    /// Routes, clients and caller-supplied credentials: who a request is from and who pays.
    pub resolver: Arc<Resolver>,
    /// Shown in the 404 message, so a misconfigured SDK learns the right base_url.
    pub listen: String,
    pub max_body: u64,
    pub replay_capacity: u64,
    /// `server.body_read_timeout_secs`.
    pub body_read_timeout: Duration,
    /// `server.max_buffered_bytes`, shared by every worker.
    pub buffer: ByteBudget,
    pub idle_timeout: Duration,
    pub request_timeout: Option<Duration>,
    pub forced_refresh_wait: Duration,
    pub access_log: bool,
    /// `server.max_inflight` (its slots shared by every worker) and how long to wait for one.
    pub max_inflight: Option<usize>,
    pub inflight_slots: Option<Arc<Semaphore>>,
    pub queue_timeout: Duration,
    /// Count token usage from responses (`usage.scan`).
    pub usage_scan: bool,
    /// Token budgets of signed keys (`signed_keys.budget_store`).
    pub budgets: Option<Budgets>,
    /// The usage callback's queue (`[usage.callback]`).
    pub callback: Option<crate::callback::Dispatcher>,
    /// Refuse a `Host` that is not a loopback name (the listener is loopback-only).
    pub loopback_only: bool,
    pub allowed_hosts: Vec<String>,
    pub allowed_origins: Vec<String>,
}

/// Where signed keys' budgets are kept, and what to do when it cannot be read.
#[derive(Debug, Clone)]
pub struct Budgets {
    pub ledger: crate::ledger::Ledger,
    pub fail_open: bool,
    /// `sidekey_signed_keys_total{result}`.
    pub results: prometheus::IntCounterVec,
    /// The control runtime: charges run there, so stopping the proxy workers cannot drop them.
    pub runtime: tokio::runtime::Handle,
}

/// A cheap-to-clone handle on everything a request needs.
#[derive(Clone, Debug)]
pub struct Proxy {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// This worker's upstream connections.
    upstream: Arc<Pool>,
    settings: ProxySettings,
    metrics: Metrics,
    slots: Option<Arc<Semaphore>>,
}

impl Proxy {
    pub fn new(upstream: Arc<Pool>, settings: ProxySettings, metrics: Metrics) -> Self {
        let slots = settings.inflight_slots.clone();
        Self { inner: Arc::new(Inner { upstream, settings, metrics, slots }) }
    }

    /// Serves one client request. Never fails: errors become OpenAI-shaped responses.
    pub async fn handle(&self, req: Request<Incoming>) -> Result<Response<ResponseBody>, Infallible> {
        let inner = &*self.inner;
        let start = Instant::now();
        let access = inner.settings.access_log.then(|| {
            Box::new(AccessInfo {
                method: req.method().clone(),
                request_id: req.headers().get("x-request-id").cloned(),
                bytes_in: content_length(&req),
                ..Default::default()
            })
        });
        let (endpoint, decision) = self.decide(&req);
        let client = decision.as_ref().ok().map(|d| Arc::clone(&d.client));
        // Queued requests are not in flight yet (they show in sidekey_queue_depth).
        let slot = match &decision {
            Ok(_) => self.acquire_slot(start).await,
            Err(_) => Ok(None),
        };
        let mut guard = RequestGuard::new(inner.metrics.clone(), endpoint, start, access);
        if let Some(client) = &client {
            guard.set_client(Arc::clone(client));
        }
        if let (Some(a), Ok(d)) = (guard.access(), &decision) {
            a.client = Some(Arc::clone(&d.client.name));
            a.set = Some(Arc::from(d.payer.name()));
        }
        if let Ok(d) = &decision {
            if d.signed.is_some() {
                guard.set_signed();
            }
            if let Some(dispatcher) = &inner.settings.callback {
                if endpoint.carries_usage() || d.signed.is_some() {
                    guard.report(report::Report {
                        started_at: std::time::SystemTime::now(),
                        event: Some((dispatcher.clone(), usage_event(&req, d, endpoint))),
                        charge: None,
                    });
                }
            }
        }
        let result = match (slot, decision) {
            (Ok(slot), Ok(decision)) => {
                if let Some(slot) = slot {
                    guard.hold(slot);
                }
                self.forward(req, decision, endpoint, start, &mut guard).await
            }
            (Err(err), _) | (_, Err(err)) => Err(err),
        };
        let resp = match result {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                headers::prepare_response(&mut parts.headers);
                if (inner.settings.usage_scan || guard.needs_usage())
                    && endpoint.carries_usage()
                    && parts.status.is_success()
                {
                    let content_type = parts.headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
                    if let Some(scanner) = content_type.and_then(UsageScanner::for_content_type) {
                        guard.scan_usage(scanner);
                    }
                }
                let ttfb = start.elapsed();
                guard.responded(parts.status.as_u16(), Some(ttfb), false);
                if let Some(a) = guard.access() {
                    a.status = parts.status.as_u16();
                    a.ttfb = Some(ttfb);
                }
                let deadline = inner.settings.request_timeout.map(|t| body::deadline_after(start, t));
                let body = ResponseBody::upstream(body, inner.settings.idle_timeout, deadline, guard);
                Response::from_parts(parts, body)
            }
            Err(err) => {
                log_error(&err, endpoint);
                let mut resp: Response<ResponseBody> = err.to_response();
                guard.responded(resp.status().as_u16(), None, true);
                if let Some(a) = guard.access() {
                    a.status = resp.status().as_u16();
                }
                resp.body_mut().set_guard(guard);
                resp
            }
        };
        inner.metrics.count_request(endpoint, resp.status());
        if let Some(client) = client {
            client.count(resp.status());
        }
        Ok(resp)
    }

    /// Refuses what sidekey never forwards, then resolves route, caller and payer: the
    /// endpoint label, and what to forward (or why not).
    fn decide(&self, req: &Request<Incoming>) -> (Endpoint, Result<Decision, ProxyError>) {
        let settings = &self.inner.settings;
        let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let refused = || -> Result<(), ProxyError> {
            // Over HTTP/2 every request carries scheme and authority; over HTTP/1 they mean a
            // client is using us as a forward proxy.
            let absolute_form = req.version() < Version::HTTP_2 && req.uri().authority().is_some();
            if req.method() == Method::CONNECT || absolute_form {
                return Err(ProxyError::NotAProxy);
            }
            // An upstream or gateway that honours TRACE would echo the injected token back.
            if is_trace(req.method()) {
                return Err(ProxyError::MethodNotAllowed(req.method().clone()));
            }
            check_browser(req, settings)
        };
        if let Err(e) = refused() {
            return (Endpoint::classify(req.uri().path()), Err(e));
        }
        match settings.resolver.resolve(path_and_query, req.headers()) {
            Ok(r) => {
                let endpoint = Endpoint::classify_rest(r.rest.split('?').next().unwrap_or_default());
                let decision = r
                    .route
                    .target
                    .join(r.rest)
                    .map(|upstream_uri| Decision {
                        upstream_uri,
                        client: r.client,
                        payer: r.payer,
                        signed: r.signed,
                    })
                    .map_err(ProxyError::BadUpstreamRequest);
                (endpoint, decision)
            }
            Err(e) => {
                let err = match e {
                    CallerError::NotFound => ProxyError::NotFound { listen: settings.listen.clone() },
                    CallerError::Traversal => ProxyError::BadPath,
                    CallerError::MissingKey => ProxyError::Unauthenticated(AuthFailure::MissingKey),
                    CallerError::UnknownKey => ProxyError::Unauthenticated(AuthFailure::UnknownKey),
                    CallerError::Signed(e) => ProxyError::Unauthenticated(AuthFailure::SignedKey(e)),
                    CallerError::UnknownClient => ProxyError::Unauthenticated(AuthFailure::UnknownClient),
                };
                (Endpoint::classify(req.uri().path()), Err(err))
            }
        }
    }

    /// Waits for a `server.max_inflight` slot, at most `server.queue_timeout_ms`.
    async fn acquire_slot(&self, start: Instant) -> Result<Option<OwnedSemaphorePermit>, ProxyError> {
        let Some(slots) = &self.inner.slots else { return Ok(None) };
        if let Ok(slot) = Arc::clone(slots).try_acquire_owned() {
            return Ok(Some(slot));
        }
        let metrics = &self.inner.metrics;
        /// Keeps the queue gauge right even if the client goes away while waiting.
        struct Queued<'a>(&'a prometheus::IntGauge);
        impl Drop for Queued<'_> {
            fn drop(&mut self) {
                self.0.dec();
            }
        }
        metrics.queue_depth.inc();
        let queued = Queued(&metrics.queue_depth);
        let waited =
            tokio::time::timeout(self.inner.settings.queue_timeout, Arc::clone(slots).acquire_owned()).await;
        drop(queued);
        match waited {
            Ok(Ok(slot)) => Ok(Some(slot)),
            _ => {
                metrics.queue_rejections_total.inc();
                Err(ProxyError::Overloaded {
                    limit: self.inner.settings.max_inflight.unwrap_or_default(),
                    waited_ms: start.elapsed().as_millis() as u64,
                })
            }
        }
    }
}

/// The usage callback event of a request, with what is known before it is forwarded.
fn usage_event(req: &Request<Incoming>, d: &Decision, endpoint: Endpoint) -> crate::callback::UsageEvent {
    let mut e = crate::callback::UsageEvent::new();
    e.client = Some(d.client.name.to_string());
    e.set = Some(d.payer.name().to_string());
    e.endpoint = endpoint.as_str().to_string();
    e.request_id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).map(str::to_string);
    if let Some(k) = &d.signed {
        e.jti = k.jti().map(str::to_string);
        e.sub = k.sub().map(str::to_string);
        e.event_id = k.event_id().map(str::to_string);
    }
    e
}

pub(crate) fn is_json(headers: &http::HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|ct| {
        ct.trim_start().as_bytes().get(..16).is_some_and(|t| t.eq_ignore_ascii_case(b"application/json"))
    })
}

pub(crate) fn content_length<B>(req: &Request<B>) -> Option<u64> {
    req.headers().get(CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

fn log_error(err: &ProxyError, endpoint: Endpoint) {
    let status = err.status().as_u16();
    match err {
        ProxyError::Unreachable(_)
        | ProxyError::Timeout(_)
        | ProxyError::NoToken { .. }
        | ProxyError::BadUpstreamRequest(_) => {
            tracing::warn!(endpoint = endpoint.as_str(), status, error = %error_chain(err), "Request failed");
        }
        _ => {
            tracing::debug!(endpoint = endpoint.as_str(), status, error = %error_chain(err), "Request refused")
        }
    }
}
