//! The proxy's upstream connections: one pool per proxy worker, on hyper's connection-level
//! client (`hyper::client::conn`), so a request's way upstream takes no shared lock and wakes
//! no other thread.
//!
//! hyper-util's legacy client did the same job with more machinery per request (a checkout
//! future, a pool shared behind a lock, connection info copied into every response, a task
//! spawned to return a busy connection); priced in `bench/README.md`. What it did that a proxy
//! needs is kept: `Host` and origin-form URIs on HTTP/1.1, absolute URIs on h2, HTTP/2 by ALPN
//! with one multiplexed connection per upstream, idle connections reused newest first, closed
//! after `upstream.pool_idle_timeout_secs` and kept `pool_max_idle_per_host` at most, and a
//! request that a reused connection never started (the upstream closed it meanwhile) sent again
//! on a new one.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, HOST};
use http::uri::{Authority, Scheme};
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_util::client::legacy::connect::Connection as _;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::time::Instant;
use tower_service::Service;

use super::Connector;
use crate::proxy::body::UpstreamBody;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Why a request did not get a response from upstream.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("cannot connect to upstream")]
    Connect(#[source] BoxError),
    #[error("the upstream connection failed")]
    Connection(#[source] hyper::Error),
    #[error("the request URI names no upstream host")]
    NoHost,
}

/// Pool limits (`[upstream]`).
#[derive(Debug, Clone, Copy)]
pub struct PoolSettings {
    pub idle_timeout: Duration,
    pub max_idle_per_host: usize,
}

/// One worker's connections to every upstream it talks to.
#[derive(Debug)]
pub struct Pool {
    connector: Connector,
    settings: PoolSettings,
    /// Only the owning worker locks it, for a few instructions at a time: never contended.
    hosts: Mutex<Vec<HostPool>>,
    sweeping: std::sync::atomic::AtomicBool,
}

/// The connections to one upstream (scheme and authority).
struct HostPool {
    scheme: Scheme,
    authority: Authority,
    /// `Host` for HTTP/1.1 requests, without the scheme's default port (like hyper-util).
    host: HeaderValue,
    /// Idle HTTP/1.1 connections, oldest first.
    idle: Vec<(Instant, http1::SendRequest<UpstreamBody>)>,
    /// The HTTP/2 connection, when ALPN picked h2, and when it was last used.
    h2: Option<(Instant, http2::SendRequest<UpstreamBody>)>,
}

impl std::fmt::Debug for HostPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostPool")
            .field("authority", &self.authority)
            .field("idle", &self.idle.len())
            .field("h2", &self.h2.is_some())
            .finish()
    }
}

enum Sender {
    H1 { sender: http1::SendRequest<UpstreamBody>, reused: bool, host: HeaderValue },
    H2 { sender: http2::SendRequest<UpstreamBody>, reused: bool },
}

impl Pool {
    pub fn new(connector: Connector, settings: PoolSettings) -> Arc<Self> {
        Arc::new(Self {
            connector,
            settings,
            hosts: Mutex::new(Vec::new()),
            sweeping: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// Sends `req` (an absolute URI) upstream and returns the response head; the body hands its
    /// HTTP/1.1 connection back to the pool once it has been read to the end.
    pub async fn request(
        self: &Arc<Self>,
        mut req: Request<UpstreamBody>,
    ) -> Result<Response<PooledBody>, UpstreamError> {
        let uri = req.uri().clone();
        let (Some(scheme), Some(authority)) = (uri.scheme().cloned(), uri.authority().cloned()) else {
            return Err(UpstreamError::NoHost);
        };
        // A request a reused connection never started goes again, a bounded number of times.
        let mut retries = 3;
        loop {
            let sender = self.checkout(&scheme, &authority).await?;
            match sender {
                Sender::H1 { mut sender, reused, host } => {
                    req.headers_mut().entry(HOST).or_insert(host);
                    *req.uri_mut() = origin_form(&uri);
                    match sender.try_send_request(req).await {
                        Ok(resp) => {
                            let back = Checkin { pool: Arc::downgrade(self), scheme, authority, sender };
                            return Ok(resp.map(|body| PooledBody { body, back: Some(back) }));
                        }
                        Err(mut e) => match e.take_message() {
                            // Never started on a connection the upstream had closed: again,
                            // on another one (a fresh connection's failure is final).
                            Some(again) if reused && retries > 0 => {
                                retries -= 1;
                                req = again;
                                *req.uri_mut() = uri.clone();
                            }
                            _ => return Err(UpstreamError::Connection(e.into_error())),
                        },
                    }
                }
                Sender::H2 { mut sender, reused } => {
                    // `:authority` comes from the URI; a `Host` here can only be the one set for
                    // an HTTP/1.1 attempt before a retry (the client's was removed), and h2
                    // servers refuse the pair.
                    req.headers_mut().remove(HOST);
                    *req.uri_mut() = uri.clone();
                    match sender.try_send_request(req).await {
                        Ok(resp) => return Ok(resp.map(|body| PooledBody { body, back: None })),
                        Err(mut e) => match e.take_message() {
                            Some(again) if reused && retries > 0 => {
                                retries -= 1;
                                req = again;
                            }
                            _ => return Err(UpstreamError::Connection(e.into_error())),
                        },
                    }
                }
            }
        }
    }

    /// A ready connection to this upstream: the h2 one, else the newest idle HTTP/1.1 one, else
    /// a new connection.
    async fn checkout(
        self: &Arc<Self>,
        scheme: &Scheme,
        authority: &Authority,
    ) -> Result<Sender, UpstreamError> {
        {
            let now = Instant::now();
            let mut hosts = self.lock();
            if let Some(host) = hosts.iter_mut().find(|h| h.is(scheme, authority)) {
                if let Some((used, h2)) = host.h2.as_mut() {
                    if h2.is_closed() {
                        host.h2 = None;
                    } else {
                        *used = now;
                        return Ok(Sender::H2 { sender: h2.clone(), reused: true });
                    }
                }
                host.expire(now, self.settings.idle_timeout);
                // Only a connection that takes a request now: one still writing its last
                // request's body (upstream answered early) would make this request wait.
                while let Some((_, sender)) = host.idle.pop() {
                    if sender.is_ready() {
                        return Ok(Sender::H1 { sender, reused: true, host: host.host.clone() });
                    }
                    if !sender.is_closed() {
                        self.return_when_ready(scheme, authority, sender);
                    }
                }
            }
        }
        // Boxed: connecting (DNS, TCP, TLS) makes a large future, and this one is moved on every
        // request while the connect is needed only now and then.
        Box::pin(self.connect(scheme, authority)).await
    }

    async fn connect(
        self: &Arc<Self>,
        scheme: &Scheme,
        authority: &Authority,
    ) -> Result<Sender, UpstreamError> {
        let uri = Uri::builder()
            .scheme(scheme.clone())
            .authority(authority.clone())
            .path_and_query("/")
            .build()
            .map_err(|e| UpstreamError::Connect(e.into()))?;
        let mut connector = self.connector.clone();
        poll_fn(|cx| connector.poll_ready(cx)).await.map_err(UpstreamError::Connect)?;
        let io = connector.call(uri).await.map_err(UpstreamError::Connect)?;
        let h2 = io.connected().is_negotiated_h2();
        self.start_sweeper();
        if h2 {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(UpstreamError::Connection)?;
            tokio::spawn(async move {
                if let Err(e) = conn.await {
                    tracing::debug!(error = %e, "Upstream HTTP/2 connection ended with an error");
                }
            });
            let mut hosts = self.lock();
            let host = self.host_entry(&mut hosts, scheme, authority);
            // Later requests share the stored connection; requests that raced to connect before it
            // existed keep their own for this request (then it closes): a cold burst costs one
            // handshake per request, once.
            if host.h2.as_ref().is_none_or(|(_, s)| s.is_closed()) {
                host.h2 = Some((Instant::now(), sender.clone()));
            }
            return Ok(Sender::H2 { sender, reused: false });
        }
        let (sender, conn) = http1::Builder::new().handshake(io).await.map_err(UpstreamError::Connection)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "Upstream connection ended with an error");
            }
        });
        let host = self.host_entry(&mut self.lock(), scheme, authority).host.clone();
        Ok(Sender::H1 { sender, reused: false, host })
    }

    fn host_entry<'a>(
        &self,
        hosts: &'a mut Vec<HostPool>,
        scheme: &Scheme,
        authority: &Authority,
    ) -> &'a mut HostPool {
        let i = match hosts.iter().position(|h| h.is(scheme, authority)) {
            Some(i) => i,
            None => {
                hosts.push(HostPool::new(scheme.clone(), authority.clone()));
                hosts.len() - 1
            }
        };
        &mut hosts[i]
    }

    /// Takes back an HTTP/1.1 connection whose response was read to the end: idle at once if it
    /// takes a request now, else once it does (its request body may still be on its way, when
    /// upstream answered before reading all of it).
    fn checkin(
        self: &Arc<Self>,
        scheme: &Scheme,
        authority: &Authority,
        sender: http1::SendRequest<UpstreamBody>,
    ) {
        if sender.is_closed() || self.settings.max_idle_per_host == 0 {
            return;
        }
        if !sender.is_ready() {
            self.return_when_ready(scheme, authority, sender);
            return;
        }
        self.idle(scheme, authority, sender);
    }

    /// Waits, in a task of its own, until `sender` takes a request (or its connection closes).
    fn return_when_ready(
        self: &Arc<Self>,
        scheme: &Scheme,
        authority: &Authority,
        mut sender: http1::SendRequest<UpstreamBody>,
    ) {
        let (pool, scheme, authority) = (Arc::downgrade(self), scheme.clone(), authority.clone());
        tokio::spawn(async move {
            if sender.ready().await.is_ok() {
                if let Some(pool) = pool.upgrade() {
                    pool.idle(&scheme, &authority, sender);
                }
            }
        });
    }

    fn idle(&self, scheme: &Scheme, authority: &Authority, sender: http1::SendRequest<UpstreamBody>) {
        let mut hosts = self.lock();
        let host = self.host_entry(&mut hosts, scheme, authority);
        if host.idle.len() >= self.settings.max_idle_per_host {
            // The oldest goes (closed when dropped).
            host.idle.remove(0);
        }
        host.idle.push((Instant::now(), sender));
    }

    /// Closes idle connections past `pool_idle_timeout_secs` even when no request comes to
    /// notice them: a task on this worker, started with the first connection.
    fn start_sweeper(self: &Arc<Self>) {
        use std::sync::atomic::Ordering;
        if self.sweeping.swap(true, Ordering::AcqRel) {
            return;
        }
        let pool: Weak<Self> = Arc::downgrade(self);
        let every = (self.settings.idle_timeout / 2).max(Duration::from_secs(1));
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let Some(pool) = pool.upgrade() else { return };
                let now = Instant::now();
                let mut hosts = pool.lock();
                for host in hosts.iter_mut() {
                    host.expire(now, pool.settings.idle_timeout);
                    if host.h2.as_ref().is_some_and(|(used, s)| {
                        s.is_closed() || now.saturating_duration_since(*used) >= pool.settings.idle_timeout
                    }) {
                        host.h2 = None;
                    }
                }
            }
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<HostPool>> {
        // Nothing here can be left half-updated by a panic: recover the guard.
        self.hosts.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl HostPool {
    fn new(scheme: Scheme, authority: Authority) -> Self {
        let default_port = match scheme.as_str() {
            "https" => Some(443),
            "http" => Some(80),
            _ => None,
        };
        let host = match authority.port_u16() {
            Some(p) if Some(p) != default_port => format!("{}:{p}", authority.host()),
            _ => authority.host().to_string(),
        };
        // A parsed authority is always a valid header value.
        let host = HeaderValue::from_str(&host).unwrap_or_else(|_| HeaderValue::from_static("localhost"));
        Self { scheme, authority, host, idle: Vec::new(), h2: None }
    }

    fn is(&self, scheme: &Scheme, authority: &Authority) -> bool {
        self.authority == *authority && self.scheme == *scheme
    }

    /// Drops idle connections unused for `timeout` and those the upstream closed.
    fn expire(&mut self, now: Instant, timeout: Duration) {
        self.idle.retain(|(since, s)| !s.is_closed() && now.saturating_duration_since(*since) < timeout);
    }
}

/// `/path?query` of `uri` (`/` when it has none): what HTTP/1.1 puts on the request line.
fn origin_form(uri: &Uri) -> Uri {
    match uri.path_and_query() {
        Some(p) if p.as_str() != "/" => {
            let mut parts = http::uri::Parts::default();
            parts.path_and_query = Some(p.clone());
            Uri::from_parts(parts).unwrap_or_default()
        }
        _ => Uri::default(),
    }
}

/// An HTTP/1.1 connection to hand back when its response body has been read to the end.
struct Checkin {
    pool: Weak<Pool>,
    scheme: Scheme,
    authority: Authority,
    sender: http1::SendRequest<UpstreamBody>,
}

impl Checkin {
    fn release(self) {
        if let Some(pool) = self.pool.upgrade() {
            pool.checkin(&self.scheme, &self.authority, self.sender);
        }
    }
}

pin_project_lite::pin_project! {
    /// An upstream response body. Read to the end, it returns its HTTP/1.1 connection to the
    /// pool; dropped before that, the connection closes (its unread rest cannot be skipped).
    pub struct PooledBody {
        #[pin]
        body: Incoming,
        back: Option<Checkin>,
    }

    impl PinnedDrop for PooledBody {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some(back) = this.back.take() {
                if this.body.is_end_stream() {
                    back.release();
                }
            }
        }
    }
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody").field("pooled", &self.back.is_some()).finish()
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.project();
        let polled = this.body.poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) {
            // The end: the connection is free for the next request now.
            if let Some(back) = this.back.take() {
                back.release();
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_form_keeps_path_and_query_byte_for_byte() {
        let u: Uri = "https://h.example/v1/models/GigaChat%2FGigaChat-2-Max?x=%2F".parse().unwrap();
        assert_eq!(origin_form(&u), "/v1/models/GigaChat%2FGigaChat-2-Max?x=%2F");
        assert_eq!(origin_form(&"http://h.example".parse().unwrap()), "/");
    }

    #[test]
    fn host_header_omits_the_default_port_only() {
        let host = |s: &str, a: &str| HostPool::new(s.parse().unwrap(), a.parse().unwrap()).host;
        assert_eq!(host("https", "api.example:443"), "api.example");
        assert_eq!(host("https", "api.example"), "api.example");
        assert_eq!(host("http", "127.0.0.1:80"), "127.0.0.1");
        assert_eq!(host("http", "127.0.0.1:8080"), "127.0.0.1:8080");
        assert_eq!(host("https", "api.example:80"), "api.example:80");
    }
}
