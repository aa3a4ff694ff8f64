//! The reverse proxy: every `/v1/...` request goes to `{upstream.base_url}/...` with the
//! client's `Authorization` replaced by the current token, bodies streamed both ways.
//!
//! Flow of one request: classify the endpoint → refuse what is not ours (404, 400, 413) → load
//! the token (503 if none) → rewrite URI and headers → stream upstream → on 401 for the current
//! token, force one refresh and replay once if the body was captured → stream the response back.

pub mod body;
pub mod budget;
pub mod error;
pub mod headers;
pub mod inspect;
pub mod path;
pub mod usage;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, HOST, ORIGIN};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use self::body::{
    AccessInfo, BodyShared, ReplayBody, RequestBody, RequestBodySettings, RequestGuard, ResponseBody,
    UpstreamBody,
};
use self::budget::{ByteBudget, Reservation};
use self::error::ProxyError;
use self::inspect::{Policy, Verdict};
use self::path::{Endpoint, PathError, Target};
use self::usage::UsageScanner;
use crate::client::Connector;
use crate::metrics::Metrics;
use crate::token::refresher::error_chain;
use crate::token::TokenStore;

/// Proxy settings, in the units the code needs.
#[derive(Debug, Clone)]
pub struct ProxySettings {
    pub target: Target,
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
    /// The request policy (`policy.*`, `usage.include_stream_usage`).
    pub policy: Policy,
    /// Count token usage from responses (`usage.scan`).
    pub usage_scan: bool,
    /// Refuse a `Host` that is not a loopback name (the listener is loopback-only).
    pub loopback_only: bool,
    pub allowed_hosts: Vec<String>,
    pub allowed_origins: Vec<String>,
}

/// A cheap-to-clone handle on everything a request needs.
#[derive(Clone, Debug)]
pub struct Proxy {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    client: Client<Connector, UpstreamBody>,
    settings: ProxySettings,
    tokens: TokenStore,
    metrics: Metrics,
    slots: Option<Arc<Semaphore>>,
}

impl Proxy {
    pub fn new(
        client: Client<Connector, UpstreamBody>,
        settings: ProxySettings,
        tokens: TokenStore,
        metrics: Metrics,
    ) -> Self {
        let slots = settings.inflight_slots.clone();
        Self { inner: Arc::new(Inner { client, settings, tokens, metrics, slots }) }
    }

    /// Serves one client request. Never fails: errors become OpenAI-shaped responses.
    pub async fn handle(&self, req: Request<Incoming>) -> Result<Response<ResponseBody>, Infallible> {
        let inner = &*self.inner;
        let start = Instant::now();
        let endpoint = Endpoint::classify(req.uri().path());
        let access = inner.settings.access_log.then(|| {
            Box::new(AccessInfo {
                method: req.method().clone(),
                request_id: req.headers().get("x-request-id").cloned(),
                bytes_in: content_length(&req),
                ..Default::default()
            })
        });
        // Queued requests are not in flight yet (they show in sidekey_queue_depth).
        let slot = self.acquire_slot(start).await;
        let mut guard = RequestGuard::new(inner.metrics.clone(), endpoint, start, access);
        let result = match slot {
            Ok(slot) => {
                if let Some(slot) = slot {
                    guard.hold(slot);
                }
                self.forward(req, endpoint, start, &mut guard).await
            }
            Err(err) => Err(err),
        };
        let resp = match result {
            Ok(resp) => {
                let (mut parts, body) = resp.into_parts();
                headers::prepare_response(&mut parts.headers);
                if inner.settings.usage_scan && endpoint.carries_usage() && parts.status.is_success() {
                    let content_type = parts.headers.get(CONTENT_TYPE).and_then(|v| v.to_str().ok());
                    if let Some(scanner) = content_type.and_then(UsageScanner::for_content_type) {
                        guard.scan_usage(scanner);
                    }
                }
                if let Some(a) = guard.access() {
                    a.status = parts.status.as_u16();
                    a.ttfb = Some(start.elapsed());
                }
                let deadline = inner.settings.request_timeout.map(|t| body::deadline_after(start, t));
                let body = ResponseBody::upstream(body, inner.settings.idle_timeout, deadline, guard);
                Response::from_parts(parts, body)
            }
            Err(err) => {
                log_error(&err, endpoint);
                let mut resp: Response<ResponseBody> = err.to_response();
                if let Some(a) = guard.access() {
                    a.status = resp.status().as_u16();
                }
                resp.body_mut().set_guard(guard);
                resp
            }
        };
        inner.metrics.count_request(endpoint, resp.status());
        Ok(resp)
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

    async fn forward(
        &self,
        req: Request<Incoming>,
        endpoint: Endpoint,
        start: Instant,
        guard: &mut RequestGuard,
    ) -> Result<Response<Incoming>, ProxyError> {
        let inner = &*self.inner;
        let settings = &inner.settings;
        // Over HTTP/2 every request carries scheme and authority; over HTTP/1 they mean a client
        // is using us as a forward proxy.
        let absolute_form = req.version() < Version::HTTP_2 && req.uri().authority().is_some();
        if req.method() == Method::CONNECT || absolute_form {
            return Err(ProxyError::NotAProxy);
        }
        // An upstream or gateway that honours TRACE would echo the injected token back.
        if is_trace(req.method()) {
            return Err(ProxyError::MethodNotAllowed(req.method().clone()));
        }
        check_browser(&req, settings)?;
        let path_and_query = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let rest = path::strip_prefix(path_and_query).map_err(|e| match e {
            PathError::NotFound => ProxyError::NotFound { listen: settings.listen.clone() },
            PathError::Traversal => ProxyError::BadPath,
        })?;
        let has_body = !http_body::Body::is_end_stream(req.body());
        let encoding = req.headers().get(http::header::CONTENT_ENCODING).map(|v| v.as_bytes());
        if let Err(e) = settings.policy.admit(req.method(), endpoint, req.uri().path(), has_body, encoding) {
            inner.metrics.policy_rejections_total.with_label_values(&[e.reason()]).inc();
            return Err(ProxyError::Policy(e));
        }
        let upstream_uri = settings.target.join(rest).map_err(ProxyError::BadUpstreamRequest)?;
        let declared = content_length(&req);
        if declared.is_some_and(|len| len > settings.max_body) {
            return Err(ProxyError::PayloadTooLarge {
                limit: settings.max_body,
                key: "server.max_request_body_bytes",
            });
        }
        let (mut parts, incoming) = req.into_parts();
        // The request policy reads JSON bodies of the endpoints it applies to (within its body
        // limit, deadline and the buffer budget); everything else streams through untouched.
        let mut held = None;
        let outgoing = if settings.policy.applies(endpoint)
            && parts.method == Method::POST
            && (settings.policy.enforces() || is_json(&parts.headers))
        {
            let (bytes, reservation) = self.read_for_policy(incoming, declared).await?;
            held = Some(reservation);
            Outgoing::Buffered(self.inspect(endpoint, bytes, &mut parts.headers, guard)?)
        } else {
            Outgoing::Streaming(incoming)
        };
        // Freshness is judged now, not when the request arrived: queueing and reading the body
        // for the policy take time.
        let now = Instant::now();
        let token = inner.tokens.current(now).map_err(|u| ProxyError::NoToken {
            retry_after_secs: u.retry_after_secs(now),
            message: u.message,
        })?;
        if let Some(a) = guard.access() {
            a.credential = Some(Arc::from(token.credential()));
        }
        parts.uri = upstream_uri;
        parts.version = Version::HTTP_11;
        headers::prepare_request(&mut parts.headers);
        let size = match &outgoing {
            Outgoing::Buffered(bytes) => Some(bytes.len() as u64),
            Outgoing::Streaming(_) => declared,
        };
        let replayable =
            settings.replay_capacity > 0 && size.is_none_or(|len| len <= settings.replay_capacity);
        // Kept only to rebuild the request for a replay after a 401.
        let saved = replayable.then(|| (parts.method.clone(), parts.uri.clone(), parts.headers.clone()));
        let shared = Arc::new(BodyShared::default());
        let (body, buffered) = match outgoing {
            Outgoing::Buffered(bytes) => {
                (UpstreamBody::Replay { body: ReplayBody::new(vec![bytes.clone()]) }, Some(bytes))
            }
            Outgoing::Streaming(incoming) => {
                let sniff_model = settings.usage_scan && endpoint.carries_usage() && is_json(&parts.headers);
                if sniff_model {
                    guard.watch_model(shared.model());
                }
                let body_settings = RequestBodySettings {
                    limit: settings.max_body,
                    replay_capacity: replayable.then_some(settings.replay_capacity),
                    budget: settings.buffer.clone(),
                    stall: settings.body_read_timeout,
                    sniff_model,
                };
                let body = RequestBody::new(incoming, body_settings, Arc::clone(&shared));
                (UpstreamBody::Streaming { body }, None)
            }
        };
        parts.headers.insert(AUTHORIZATION, token.header().clone());
        let req = Request::from_parts(parts, body);

        let resp = self.send(req, endpoint, start, &shared).await;
        if shared.over_budget() {
            inner.metrics.buffer_exhausted_total.with_label_values(&["replay"]).inc();
        }
        let resp = resp?;
        if resp.status() != StatusCode::UNAUTHORIZED {
            return Ok(resp);
        }
        inner.metrics.upstream_unauthorized_total.inc();
        let chunks = match buffered {
            Some(bytes) => Some(vec![bytes]),
            None => shared.replayable(),
        };
        let (Some((method, uri, headers)), Some(chunks)) = (saved, chunks) else {
            // Not replayable (too large, or still streaming): pass the 401 through, but get the
            // next request a fresh token.
            inner.tokens.report_rejected(token.generation());
            return Ok(resp);
        };
        let Some(fresh) =
            inner.tokens.replace_rejected(token.generation(), settings.forced_refresh_wait).await
        else {
            return Ok(resp);
        };
        drop(resp);
        tracing::debug!(
            endpoint = endpoint.as_str(),
            "Replaying a request rejected with 401 using a fresh token"
        );
        inner.metrics.request_replays_total.inc();
        if let Some(a) = guard.access() {
            a.replayed = true;
            a.credential = Some(Arc::from(fresh.credential()));
        }
        let mut req = Request::new(UpstreamBody::Replay { body: ReplayBody::new(chunks) });
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        req.headers_mut().insert(AUTHORIZATION, fresh.header().clone());
        let resp = self.send(req, endpoint, start, &shared).await?;
        if resp.status() == StatusCode::UNAUTHORIZED {
            inner.metrics.upstream_unauthorized_total.inc();
        }
        drop(held);
        Ok(resp)
    }

    /// Reads a body for the policy: at most `policy.max_body_bytes`, the whole of it within
    /// `server.body_read_timeout_secs`, every byte reserved in `server.max_buffered_bytes`.
    async fn read_for_policy(
        &self,
        mut body: Incoming,
        declared: Option<u64>,
    ) -> Result<(Bytes, Reservation), ProxyError> {
        let settings = &self.inner.settings;
        let limit = settings.policy.max_body();
        let too_large = || ProxyError::PayloadTooLarge { limit, key: "policy.max_body_bytes" };
        if declared.is_some_and(|len| len > limit) {
            return Err(too_large());
        }
        // Bytes are reserved as they arrive, not as declared: silent clients declaring large
        // bodies hold nothing.
        let mut reservation = settings.buffer.reservation();
        let full = |m: &Metrics| {
            m.buffer_exhausted_total.with_label_values(&["policy"]).inc();
            ProxyError::BufferFull
        };
        let mut chunks: Vec<Bytes> = Vec::new();
        let mut size = 0u64;
        // The whole read, not each piece: a client trickling a byte at a time must not hold its
        // slot and its bytes for longer than this either.
        let deadline = body::deadline_after(Instant::now(), settings.body_read_timeout);
        loop {
            let frame = match tokio::time::timeout_at(deadline, body.frame()).await {
                Err(_) => return Err(ProxyError::BodyTimeout(settings.body_read_timeout)),
                Ok(None) => break,
                Ok(Some(Err(e))) => return Err(ProxyError::ClientBody(e.into())),
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else { continue };
            size += data.len() as u64;
            if size > limit {
                return Err(too_large());
            }
            if !reservation.ensure(size) {
                return Err(full(&self.inner.metrics));
            }
            chunks.push(data);
        }
        let bytes = match chunks.len() {
            0 => Bytes::new(),
            1 => chunks.pop().unwrap_or_default(),
            _ => Bytes::from(chunks.concat()),
        };
        Ok((bytes, reservation))
    }

    /// Applies the request policy to a body read whole.
    fn inspect(
        &self,
        endpoint: Endpoint,
        bytes: Bytes,
        headers: &mut http::HeaderMap,
        guard: &mut RequestGuard,
    ) -> Result<Bytes, ProxyError> {
        let inner = &*self.inner;
        match inner.settings.policy.inspect(endpoint, &bytes) {
            Ok(Verdict::Unchanged { model }) => {
                guard.set_request_model(model);
                Ok(bytes)
            }
            Ok(Verdict::Rewritten { body, model }) => {
                inner.metrics.policy_rewrites_total.inc();
                // The client's length no longer holds; hyper sets it from the new body.
                headers.remove(CONTENT_LENGTH);
                guard.set_request_model(model);
                Ok(body)
            }
            Err(e) => {
                inner.metrics.policy_rejections_total.with_label_values(&[e.reason()]).inc();
                Err(ProxyError::Policy(e))
            }
        }
    }

    /// Sends upstream and waits for the response headers, bounded by the idle timeout and the
    /// request deadline.
    async fn send(
        &self,
        req: Request<UpstreamBody>,
        endpoint: Endpoint,
        start: Instant,
        shared: &BodyShared,
    ) -> Result<Response<Incoming>, ProxyError> {
        let inner = &*self.inner;
        let settings = &inner.settings;
        let mut wait = settings.idle_timeout;
        if let Some(total) = settings.request_timeout {
            wait = wait.min(total.saturating_sub(start.elapsed()));
        }
        match tokio::time::timeout(wait, inner.client.request(req)).await {
            Err(_) => Err(ProxyError::Timeout(wait)),
            Ok(Err(_)) if shared.too_large() => Err(ProxyError::PayloadTooLarge {
                limit: settings.max_body,
                key: "server.max_request_body_bytes",
            }),
            Ok(Err(_)) if shared.stalled() => Err(ProxyError::BodyTimeout(settings.body_read_timeout)),
            Ok(Err(_)) if shared.client_failed() => Err(ProxyError::ClientAborted),
            Ok(Err(e)) => Err(ProxyError::Unreachable(e)),
            Ok(Ok(resp)) => {
                inner.metrics.upstream_response(endpoint).observe(start.elapsed().as_secs_f64());
                Ok(resp)
            }
        }
    }
}

/// Browsers must not spend our credentials: a page can reach a loopback port by DNS
/// rebinding, a simple cross-site POST, or a tag that sends a GET without `Origin`. SDKs send
/// no `Origin`, no `Sec-Fetch-Site` and a loopback `Host`.
fn check_browser<B>(req: &Request<B>, settings: &ProxySettings) -> Result<(), ProxyError> {
    let guard = BrowserGuard {
        allowed_origins: &settings.allowed_origins,
        allowed_hosts: &settings.allowed_hosts,
        hosts: if settings.loopback_only { HostRule::Loopback } else { HostRule::Any },
    };
    guard.check(req).map_err(ProxyError::Forbidden)
}

/// Which `Host` values a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostRule {
    /// Any: the listener is reachable from the network on purpose.
    Any,
    /// Loopback names and addresses only (and `allowed_hosts`).
    Loopback,
    /// Any IP literal (the kubelet probes with the pod IP), loopback names (and `allowed_hosts`):
    /// a rebinding attack needs a DNS name.
    IpLiteral,
}

/// The guard against browsers, shared by the proxy and the admin listener.
#[derive(Debug, Clone, Copy)]
pub struct BrowserGuard<'a> {
    pub allowed_origins: &'a [String],
    pub allowed_hosts: &'a [String],
    pub hosts: HostRule,
}

impl BrowserGuard<'_> {
    /// `Err` with the reason for the client if the request looks like it comes from a web page
    /// that may not use this listener.
    pub fn check<B>(&self, req: &Request<B>) -> Result<(), &'static str> {
        let origin = req.headers().get(ORIGIN);
        let allowed_origin =
            origin.is_some_and(|o| self.allowed_origins.iter().any(|a| a.as_bytes() == o.as_bytes()));
        if origin.is_some() && !allowed_origin {
            return Err("requests from browsers (with an Origin header) are refused; list the origin in server.allowed_origins");
        }
        if !allowed_origin {
            let site = req.headers().get("sec-fetch-site").map(|v| v.as_bytes());
            if matches!(site, Some(b"cross-site") | Some(b"same-site")) {
                return Err("cross-site requests from browsers (Sec-Fetch-Site) are refused");
            }
        }
        if self.hosts == HostRule::Any {
            return Ok(());
        }
        let host = req
            .uri()
            .authority()
            .map(|a| a.host())
            .or_else(|| req.headers().get(HOST).and_then(|h| h.to_str().ok()).map(host_without_port));
        let allowed = host.is_some_and(|h| {
            is_loopback_name(h)
                || (self.hosts == HostRule::IpLiteral && is_ip_literal(h))
                || self.allowed_hosts.iter().any(|a| unbracket(a).eq_ignore_ascii_case(unbracket(h)))
        });
        if !allowed {
            return Err(match self.hosts {
                HostRule::IpLiteral => {
                    "the Host header must be an IP address or a loopback name (or one in server.allowed_hosts)"
                }
                _ => "the Host header must name a loopback address (or one in server.allowed_hosts)",
            });
        }
        Ok(())
    }
}

/// `[fd00::1]` and `fd00::1` alike: HTTP/1's Host keeps the brackets, HTTP/2's authority too,
/// and a config may have either.
fn unbracket(host: &str) -> &str {
    host.trim_start_matches('[').trim_end_matches(']')
}

fn is_ip_literal(host: &str) -> bool {
    host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>().is_ok()
}

/// TRACE, and Microsoft's TRACK, echo the request (and the injected token) back.
fn is_trace(method: &Method) -> bool {
    method == Method::TRACE
        || method.as_str().eq_ignore_ascii_case("TRACK")
        || method.as_str().eq_ignore_ascii_case("TRACE")
}

/// `host[:port]` or `[v6]:port` without the port.
fn host_without_port(value: &str) -> &str {
    if let Some(rest) = value.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default();
    }
    value.rsplit_once(':').map_or(value, |(h, _)| h)
}

fn is_loopback_name(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// The request body on its way up: read whole for the policy, or streamed.
enum Outgoing {
    Buffered(Bytes),
    Streaming(Incoming),
}

fn is_json(headers: &http::HeaderMap) -> bool {
    headers
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.trim_start().to_ascii_lowercase().starts_with("application/json"))
}

fn content_length<B>(req: &Request<B>) -> Option<u64> {
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
