//! Streaming bodies: the request body on its way up (size limit, replay copy), the replayed body,
//! and the response body on its way down (idle and total timeouts, metrics when it ends).
//!
//! Nothing here buffers a stream: frames pass through as they arrive. The replay copy holds
//! reference-counted clones of the chunks already sent, up to `server.replay_buffer_bytes`.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderValue, Method};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep};

use super::budget::{ByteBudget, Reservation};
use super::path::Endpoint;
use super::report::{Ending, Report};
use super::resolve::clients::Client;
use super::usage::{ModelSniffer, UsageScanner};
use crate::client::pool::PooledBody;
use crate::metrics::Metrics;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Errors sidekey itself raises inside a body.
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    #[error("request body exceeds {0} bytes")]
    TooLarge(u64),
    #[error("upstream sent nothing for {0:?}")]
    Idle(Duration),
    #[error("request exceeded upstream.request_timeout_secs")]
    Deadline,
    #[error("the client sent no request body data for {0:?}")]
    Stalled(Duration),
}

/// What the request body tells the handler after the fact.
#[derive(Debug, Default)]
pub struct BodyShared {
    /// The whole body, set once it has been read to the end within the replay capacity, and
    /// the share of `server.max_buffered_bytes` it holds.
    complete: OnceLock<(Vec<Bytes>, Option<Reservation>)>,
    too_large: AtomicBool,
    client_failed: AtomicBool,
    stalled: AtomicBool,
    /// The replay copy was given up because `server.max_buffered_bytes` was spent.
    over_budget: AtomicBool,
    /// The `model` the JSON body names, found while it streamed up. Shared on its own, so the
    /// request guard can read it without keeping the replay copy alive.
    model: Arc<OnceLock<String>>,
}

impl BodyShared {
    /// The full body for a replay, if it was captured.
    pub fn replayable(&self) -> Option<Vec<Bytes>> {
        self.complete.get().map(|(chunks, _)| chunks.clone())
    }

    /// True if the client stopped sending its body for `server.body_read_timeout_secs`.
    pub fn stalled(&self) -> bool {
        self.stalled.load(Ordering::Acquire)
    }

    /// True if the replay copy was given up for lack of buffer budget.
    pub fn over_budget(&self) -> bool {
        self.over_budget.load(Ordering::Relaxed)
    }

    /// Where the model the request body names lands, if it is looked for and found.
    pub fn model(&self) -> Arc<OnceLock<String>> {
        Arc::clone(&self.model)
    }

    /// True if reading the body from the client failed (it went away, or sent a bad body).
    pub fn client_failed(&self) -> bool {
        self.client_failed.load(Ordering::Acquire)
    }

    /// True if the body went over the size limit while streaming.
    pub fn too_large(&self) -> bool {
        self.too_large.load(Ordering::Acquire)
    }
}

pin_project! {
    /// The client's request body as sent upstream: counted against the limit, cut if it
    /// stalls, and copied for a possible replay while it fits (in the replay capacity and in
    /// the process-wide buffer budget).
    pub struct RequestBody {
        #[pin]
        inner: Incoming,
        limit: u64,
        seen: u64,
        replay: Option<Replay>,
        shared: Arc<BodyShared>,
        stall: Duration,
        // Armed only while the client keeps us waiting, so bodiless requests never arm it.
        timer: Option<Pin<Box<Sleep>>>,
        waiting: bool,
        sniffer: Option<ModelSniffer>,
    }
}

struct Replay {
    chunks: Vec<Bytes>,
    size: u64,
    capacity: u64,
    reservation: Reservation,
}

/// How a request body is sent upstream.
#[derive(Debug)]
pub struct RequestBodySettings {
    /// `server.max_request_body_bytes`.
    pub limit: u64,
    /// Keep a replay copy up to this many bytes (`None`: no copy).
    pub replay_capacity: Option<u64>,
    /// Where the replay copy's bytes are reserved.
    pub budget: ByteBudget,
    /// `server.body_read_timeout_secs`.
    pub stall: Duration,
    /// Look for the `model` the body names.
    pub sniff_model: bool,
}

impl RequestBody {
    pub fn new(inner: Incoming, settings: RequestBodySettings, shared: Arc<BodyShared>) -> Self {
        let RequestBodySettings { limit, replay_capacity, budget, stall, sniff_model } = settings;
        let mut replay = replay_capacity.map(|capacity| Replay {
            chunks: Vec::new(),
            size: 0,
            capacity,
            reservation: budget.reservation(),
        });
        let mut sniffer = sniff_model.then(ModelSniffer::new);
        if inner.is_end_stream() {
            // No body at all (GET): the client may never poll it, so it is complete already.
            if replay.take().is_some() {
                let _ = shared.complete.set((Vec::new(), None));
            }
            sniffer = None;
        }
        Self { inner, limit, seen: 0, replay, shared, stall, timer: None, waiting: false, sniffer }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let mut this = self.project();
        let polled = match this.inner.as_mut().poll_frame(cx) {
            Poll::Pending => {
                // The clock runs from when the client started keeping us waiting.
                let stall = *this.stall;
                let timer = match this.timer {
                    Some(timer) => {
                        if !*this.waiting {
                            timer.as_mut().reset(deadline_after(Instant::now(), stall));
                        }
                        timer
                    }
                    None => this.timer.insert(Box::pin(tokio::time::sleep(stall))),
                };
                *this.waiting = true;
                ready!(timer.as_mut().poll(cx));
                *this.replay = None;
                this.shared.stalled.store(true, Ordering::Release);
                return Poll::Ready(Some(Err(BodyError::Stalled(stall).into())));
            }
            Poll::Ready(polled) => polled,
        };
        *this.waiting = false;
        match polled {
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    *this.seen += data.len() as u64;
                    if *this.seen > *this.limit {
                        *this.replay = None;
                        this.shared.too_large.store(true, Ordering::Release);
                        return Poll::Ready(Some(Err(BodyError::TooLarge(*this.limit).into())));
                    }
                    if let Some(r) = this.replay.as_mut() {
                        r.size += data.len() as u64;
                        // Over the capacity or the shared budget: no replay for this one.
                        if r.size > r.capacity {
                            *this.replay = None;
                        } else if !r.reservation.grow(data.len() as u64) {
                            *this.replay = None;
                            this.shared.over_budget.store(true, Ordering::Relaxed);
                        } else {
                            // A copy of exactly these bytes: a slice would keep the whole read
                            // buffer it came from alive, beyond what the budget counts.
                            r.chunks.push(Bytes::copy_from_slice(data));
                        }
                    }
                    if let Some(sniffer) = this.sniffer.as_mut() {
                        sniffer.feed(data);
                        if sniffer.done() {
                            if let Some(model) = this.sniffer.take().and_then(ModelSniffer::finish) {
                                let _ = this.shared.model.set(model);
                            }
                        }
                    }
                } else {
                    // Trailers are not replayed; a body that has them is not replayable.
                    *this.replay = None;
                }
                if this.inner.is_end_stream() {
                    finish(this.replay, this.shared);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Some(Err(e)) => {
                *this.replay = None;
                this.shared.client_failed.store(true, Ordering::Release);
                Poll::Ready(Some(Err(e.into())))
            }
            None => {
                finish(this.replay, this.shared);
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

fn finish(replay: &mut Option<Replay>, shared: &BodyShared) {
    if let Some(r) = replay.take() {
        let _ = shared.complete.set((r.chunks, Some(r.reservation)));
    }
}

/// `now + d`, saturating far in the future instead of overflowing.
pub fn deadline_after(now: Instant, d: Duration) -> Instant {
    now.checked_add(d)
        .or_else(|| now.checked_add(Duration::from_secs(crate::config::MAX_DURATION_SECS)))
        .unwrap_or(now)
}

/// A captured body sent again.
#[derive(Debug)]
pub struct ReplayBody {
    chunks: std::vec::IntoIter<Bytes>,
    remaining: u64,
}

impl ReplayBody {
    pub fn new(chunks: Vec<Bytes>) -> Self {
        let remaining = chunks.iter().map(|c| c.len() as u64).sum();
        Self { chunks: chunks.into_iter(), remaining }
    }
}

impl Body for ReplayBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Poll::Ready(self.chunks.next().map(|c| {
            self.remaining -= c.len() as u64;
            Ok(Frame::data(c))
        }))
    }

    fn is_end_stream(&self) -> bool {
        self.remaining == 0 && self.chunks.len() == 0
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.remaining)
    }
}

pin_project! {
    /// The body sent upstream: the client's stream, or a replay of it.
    #[project = UpstreamBodyProj]
    pub enum UpstreamBody {
        Streaming { #[pin] body: RequestBody },
        Replay { body: ReplayBody },
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.project() {
            UpstreamBodyProj::Streaming { body } => body.poll_frame(cx),
            UpstreamBodyProj::Replay { body } => Pin::new(body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Streaming { body } => body.is_end_stream(),
            UpstreamBody::Replay { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Streaming { body } => body.size_hint(),
            UpstreamBody::Replay { body } => body.size_hint(),
        }
    }
}

/// Per-request bookkeeping that ends when the response body ends (or is dropped because the
/// client went away): the duration histogram, the in-flight gauge, the optional access line.
#[derive(Debug)]
pub struct RequestGuard {
    metrics: Metrics,
    endpoint: Endpoint,
    start: Instant,
    bytes_out: u64,
    access: Option<Box<AccessInfo>>,
    /// The `server.max_inflight` slot, held until the response body ends.
    slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The client's own `max_inflight` slot.
    client_slot: Option<tokio::sync::OwnedSemaphorePermit>,
    /// The caller, whose tokens are counted in `sidekey_client_tokens_total`.
    client: Option<Arc<Client>>,
    /// Reads token usage off the response body, when it can carry any.
    usage: Option<UsageScanner>,
    /// The model the request named, for responses that do not say.
    request_model: Option<String>,
    /// Where the request body's own `model` lands when it was sniffed while streaming.
    sniffed_model: Option<Arc<OnceLock<String>>>,
    /// The budget charge and the usage callback event, run when the request ends.
    report: Option<Box<Report>>,
    ending: Ending,
    signed: bool,
}

/// Fields of the access log line, collected only when `log.access = true`.
#[derive(Debug, Default)]
pub struct AccessInfo {
    pub method: Method,
    pub status: u16,
    pub ttfb: Option<Duration>,
    pub bytes_in: Option<u64>,
    pub credential: Option<Arc<str>>,
    /// The client name and the credential set (or `caller`) that paid; never a key.
    pub client: Option<Arc<str>>,
    pub set: Option<Arc<str>>,
    pub request_id: Option<HeaderValue>,
    pub replayed: bool,
}

impl RequestGuard {
    /// Starts tracking a request; the in-flight gauge goes up until this is dropped.
    pub fn new(
        metrics: Metrics,
        endpoint: Endpoint,
        start: Instant,
        access: Option<Box<AccessInfo>>,
    ) -> Self {
        metrics.inflight_requests.inc();
        Self {
            metrics,
            endpoint,
            start,
            bytes_out: 0,
            access,
            slot: None,
            client_slot: None,
            client: None,
            usage: None,
            request_model: None,
            sniffed_model: None,
            report: None,
            ending: Ending::default(),
            signed: false,
        }
    }

    /// Where the request body's sniffed `model` lands; it serves when the response names none.
    pub fn watch_model(&mut self, model: Arc<OnceLock<String>>) {
        self.sniffed_model = Some(model);
    }

    /// Scans the response body for token usage.
    pub fn scan_usage(&mut self, scanner: UsageScanner) {
        self.usage = Some(scanner);
    }

    pub fn set_request_model(&mut self, model: Option<String>) {
        self.request_model = model;
    }

    fn observe(&mut self, data: &Bytes) {
        self.bytes_out += data.len() as u64;
        if let Some(scanner) = self.usage.as_mut() {
            scanner.feed(data);
        }
    }

    /// Keeps a concurrency slot until the request ends.
    pub fn hold(&mut self, slot: tokio::sync::OwnedSemaphorePermit) {
        self.slot = Some(slot);
    }

    /// Keeps the client's own concurrency slot until the request ends.
    pub fn hold_client(&mut self, slot: tokio::sync::OwnedSemaphorePermit) {
        self.client_slot = Some(slot);
    }

    /// Work to do when the request ends: a budget charge, a usage callback event.
    pub fn report(&mut self, report: Report) {
        self.report = Some(Box::new(report));
    }

    /// Adds a budget charge to the report (creating it if needed).
    pub fn charge(&mut self, charge: super::report::Charge) {
        match self.report.as_mut() {
            Some(r) => r.charge = Some(charge),
            None => {
                self.report = Some(Box::new(Report {
                    started_at: std::time::SystemTime::now(),
                    event: None,
                    charge: Some(charge),
                }))
            }
        }
    }

    /// True if the request is a signed key's (its refusals are counted as such).
    pub fn signed(&self) -> bool {
        self.signed
    }

    pub fn set_signed(&mut self) {
        self.signed = true;
    }

    /// True if usage must be read off the response whatever `usage.scan` says (a budget).
    pub fn needs_usage(&self) -> bool {
        self.report.as_ref().is_some_and(|r| r.charge.is_some() || r.event.is_some())
    }

    /// What the client got: the status, time to first byte, and whether sidekey answered.
    pub fn responded(&mut self, status: u16, ttfb: Option<Duration>, local: bool) {
        self.ending.status = status;
        self.ending.ttfb = ttfb;
        self.ending.local = local;
    }

    /// The caller, for per-client token counts.
    pub fn set_client(&mut self, client: Arc<Client>) {
        self.client = Some(client);
    }

    pub fn access(&mut self) -> Option<&mut AccessInfo> {
        self.access.as_deref_mut()
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        let elapsed = self.start.elapsed();
        self.metrics.inflight_requests.dec();
        let sniffed = self.sniffed_model.as_deref().and_then(|m| m.get().map(String::as_str));
        let model = self.request_model.as_deref().or(sniffed);
        let scan = self.usage.take().map(UsageScanner::finish);
        if let Some(scan) = &scan {
            if let (Some(client), Some(u)) = (&self.client, scan.usage) {
                client.count_tokens(u.prompt, u.completion, u.total);
            }
            self.metrics.record_usage(scan, model);
        }
        if let Some(report) = self.report.take() {
            report.finish(self.ending, scan.as_ref(), model, elapsed);
        }
        self.metrics.request_duration(self.endpoint).observe(elapsed.as_secs_f64());
        if let Some(a) = &self.access {
            tracing::info!(
                target: "sidekey::access",
                method = %a.method,
                endpoint = self.endpoint.as_str(),
                status = a.status,
                duration_ms = elapsed.as_secs_f64() * 1000.0,
                ttfb_ms = a.ttfb.map(|d| d.as_secs_f64() * 1000.0),
                bytes_in = a.bytes_in,
                bytes_out = self.bytes_out,
                credential = a.credential.as_deref(),
                client = a.client.as_deref(),
                set = a.set.as_deref(),
                request_id = a.request_id.as_ref().and_then(|v| v.to_str().ok()),
                replayed = a.replayed,
                "Request"
            );
        }
    }
}

pin_project! {
    /// The body sent to the client.
    pub struct ResponseBody {
        #[pin]
        kind: Kind,
        guard: Option<RequestGuard>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind {
        Upstream {
            #[pin]
            body: PooledBody,
            #[pin]
            timer: Sleep,
            // Set only while the body waits on upstream: a body that arrives without waiting
            // never touches the timer wheel.
            armed: bool,
            idle: Duration,
            deadline: Option<Instant>,
        },
        Local { #[pin] body: Full<Bytes> },
    }
}

impl ResponseBody {
    /// An upstream body, cut if upstream is silent for `idle` or runs past `deadline`.
    pub fn upstream(
        body: PooledBody,
        idle: Duration,
        deadline: Option<Instant>,
        guard: RequestGuard,
    ) -> Self {
        let at = next_timer(Instant::now(), idle, deadline);
        Self {
            kind: Kind::Upstream { body, timer: tokio::time::sleep_until(at), armed: true, idle, deadline },
            guard: Some(guard),
        }
    }

    /// A body sidekey wrote itself.
    pub fn local(bytes: Bytes, guard: Option<RequestGuard>) -> Self {
        Self { kind: Kind::Local { body: Full::new(bytes) }, guard }
    }

    /// Attaches the request guard (for local responses built before it existed).
    pub fn set_guard(&mut self, guard: RequestGuard) {
        self.guard = Some(guard);
    }
}

impl From<Bytes> for ResponseBody {
    fn from(bytes: Bytes) -> Self {
        Self::local(bytes, None)
    }
}

fn next_timer(now: Instant, idle: Duration, deadline: Option<Instant>) -> Instant {
    let idle_at = deadline_after(now, idle);
    match deadline {
        Some(d) => d.min(idle_at),
        None => idle_at,
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.project();
        let polled: Poll<Option<Result<Frame<Bytes>, BoxError>>> = match this.kind.project() {
            KindProj::Local { body } => match ready!(body.poll_frame(cx)) {
                Some(Ok(frame)) => Poll::Ready(Some(Ok(frame))),
                Some(Err(never)) => match never {},
                None => Poll::Ready(None),
            },
            KindProj::Upstream { body, mut timer, armed, idle, deadline } => match body.poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    // The silence starts again; the timer is set when (if) the body next waits.
                    *armed = false;
                    Poll::Ready(Some(Ok(frame)))
                }
                Poll::Ready(Some(Err(e))) => {
                    if let Some(g) = this.guard.as_mut() {
                        g.ending.upstream_failed = true;
                    }
                    tracing::warn!(error = %e, "Upstream response body failed; the client sees a cut stream");
                    Poll::Ready(Some(Err(e.into())))
                }
                Poll::Ready(None) => {
                    if let Some(g) = this.guard.as_mut() {
                        g.ending.finished = true;
                    }
                    Poll::Ready(None)
                }
                Poll::Pending => {
                    if !*armed {
                        timer.as_mut().reset(next_timer(Instant::now(), *idle, *deadline));
                        *armed = true;
                    }
                    ready!(timer.poll(cx));
                    let err = match deadline {
                        Some(d) if Instant::now() >= *d => BodyError::Deadline,
                        _ => BodyError::Idle(*idle),
                    };
                    if let Some(g) = this.guard.as_mut() {
                        g.ending.upstream_failed = true;
                    }
                    tracing::warn!(error = %err, "Cutting the response stream");
                    Poll::Ready(Some(Err(err.into())))
                }
            },
        };
        if let (Poll::Ready(Some(Ok(frame))), Some(guard)) = (&polled, this.guard.as_mut()) {
            if let Some(data) = frame.data_ref() {
                guard.observe(data);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Upstream { body, .. } => body.is_end_stream(),
            Kind::Local { body } => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Upstream { body, .. } => body.size_hint(),
            Kind::Local { body } => body.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn replay_body_yields_chunks_in_order() {
        let body = ReplayBody::new(vec![Bytes::from_static(b"ab"), Bytes::from_static(b"cd")]);
        assert_eq!(body.size_hint().exact(), Some(4));
        let all = body.collect().await.unwrap().to_bytes();
        assert_eq!(&all[..], b"abcd");
    }

    #[test]
    fn timer_respects_the_deadline() {
        let now = Instant::now();
        let idle = Duration::from_secs(300);
        assert_eq!(next_timer(now, idle, None), now + idle);
        let d = now + Duration::from_secs(5);
        assert_eq!(next_timer(now, idle, Some(d)), d);
    }
}
