//! The accept loop shared by the proxy and admin listeners: HTTP/1.1 and h2c, a connection
//! limit, header limits and timeouts, and a graceful drain with a deadline.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::proxy::body::BoxError;

/// Limits for one listener.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    /// Used in logs: "proxy" or "admin".
    pub name: &'static str,
    /// Open connections at most. At the limit the oldest connection with no request in flight
    /// is closed to make room for a new one.
    pub max_connections: usize,
    /// From accept to the first complete request (whatever the protocol), and for each later
    /// HTTP/1 request head.
    pub header_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed.
    pub idle_timeout: Duration,
    pub max_headers: usize,
    pub max_header_bytes: usize,
    /// How long in-flight requests may run once `stop` fires; the rest are cut.
    pub grace: Duration,
}

/// Accepts connections until `stop` fires, then drains them for at most `settings.grace`.
///
/// `handler` is called for every request with the peer address.
pub async fn serve<H, Fut, B>(
    listener: TcpListener,
    settings: ServeSettings,
    stop: CancellationToken,
    handler: H,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let shared = Arc::new(Shared::new(settings.max_connections));
    accept_loop(listener, shared, settings, stop, handler).await
}

/// Like [`serve`] with one accept loop per worker: every worker accepts on its own handle of
/// the listening socket (registered with that worker's reactor) and serves what it accepted on
/// its own event loop, so a connection never crosses threads and no thread hands connections
/// out. The connection limit and the idle-eviction table are shared by all workers.
///
/// The workers share one socket (duplicated descriptors) rather than binding one socket each
/// with `SO_REUSEPORT`: a second process bound to the same port by mistake then fails with
/// "address in use" instead of silently taking part of the traffic, and a busy worker does not
/// keep receiving its hash share of new connections while another one idles.
pub async fn serve_on<H, Fut, B>(
    listener: std::net::TcpListener,
    settings: ServeSettings,
    stop: CancellationToken,
    workers: Vec<(Handle, H)>,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let shared = Arc::new(Shared::new(settings.max_connections));
    let mut loops = Vec::new();
    for (handle, handler) in workers {
        let copy = match listener.try_clone() {
            Ok(copy) => copy,
            Err(e) => {
                tracing::error!(listener = settings.name, error = %e, "Cannot share the listener with a worker");
                continue;
            }
        };
        let (shared, settings, stop) = (Arc::clone(&shared), settings.clone(), stop.clone());
        loops.push(handle.spawn(async move {
            match TcpListener::from_std(copy) {
                Ok(listener) => accept_loop(listener, shared, settings, stop, handler).await,
                Err(e) => {
                    tracing::error!(listener = settings.name, error = %e, "Cannot register the listener")
                }
            }
        }));
    }
    drop(listener);
    for task in loops {
        let _ = task.await;
    }
}

/// What every accept loop of one listener shares: the connection budget and the table of open
/// connections (for eviction at the limit).
#[derive(Debug)]
struct Shared {
    table: ConnTable,
    limit: Arc<Semaphore>,
}

impl Shared {
    fn new(max_connections: usize) -> Self {
        Self { table: ConnTable::default(), limit: Arc::new(Semaphore::new(max_connections)) }
    }
}

/// Accepts on `listener` until `stop` fires, serving every connection on the current runtime,
/// then drains them for at most `settings.grace`.
async fn accept_loop<H, Fut, B>(
    listener: TcpListener,
    shared: Arc<Shared>,
    settings: ServeSettings,
    stop: CancellationToken,
    handler: H,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, Infallible>> + Send + 'static,
    B: http_body::Body<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(settings.header_read_timeout)
        .max_headers(settings.max_headers)
        .max_buf_size(settings.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(settings.max_header_bytes).unwrap_or(u32::MAX))
        // Dead HTTP/2 peers are noticed and their connection slots freed.
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let mut conns = JoinSet::new();

    loop {
        let (stream, peer) = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(listener = settings.name, error = %e, "Accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        while conns.try_join_next().is_some() {}
        // At the limit: make room by closing a connection that is doing nothing (a silent
        // socket first, then the oldest idle keep-alive), else wait for one to end or go idle.
        let permit = loop {
            if let Ok(permit) = Arc::clone(&shared.limit).try_acquire_owned() {
                break Some(permit);
            }
            if shared.table.evict_one_idle() {
                tracing::debug!(
                    listener = settings.name,
                    "At the connection limit; closing an idle connection"
                );
            }
            tokio::select! {
                _ = stop.cancelled() => break None,
                permit = Arc::clone(&shared.limit).acquire_owned() => break permit.ok(),
                // A busy connection may have gone idle meanwhile: look again.
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        };
        let Some(permit) = permit else { break };
        let _ = stream.set_nodelay(true);
        let state = shared.table.register();
        let (handler, builder, stop, shared, name) =
            (handler.clone(), builder.clone(), stop.clone(), Arc::clone(&shared), settings.name);
        let (first_request, idle) = (settings.header_read_timeout, settings.idle_timeout);
        conns.spawn(async move {
            let tracked = Arc::clone(&state);
            let service = service_fn(move |req| {
                let request = Tracked::begin(&tracked);
                let fut = handler(req, peer);
                async move {
                    let resp = fut.await?;
                    Ok::<_, Infallible>(resp.map(|body| TrackedBody { body, _request: request }))
                }
            });
            let io = WriteDeadline::new(TokioIo::new(stream), idle);
            let conn = builder.serve_connection(io, service).into_owned();
            if let Err(e) = watch(conn, &state, &stop, first_request, idle).await {
                tracing::debug!(listener = name, error = %e, "Connection ended with an error");
            }
            shared.table.remove(&state);
            drop(permit);
        });
    }
    drop(listener);
    let open = conns.len();
    if open > 0 {
        tracing::info!(
            listener = settings.name,
            connections = open,
            grace_secs = settings.grace.as_secs_f64(),
            "Draining connections"
        );
    }
    let drained = async { while conns.join_next().await.is_some() {} };
    if tokio::time::timeout(settings.grace, drained).await.is_err() {
        tracing::warn!(
            listener = settings.name,
            connections = conns.len(),
            "Grace period over; cutting the remaining connections"
        );
    }
    conns.shutdown().await;
}

/// Drives one connection: closes it if no request arrives within `first_request`, when it has
/// had no request in flight for `idle`, when the table evicts it, or gracefully on `stop`.
async fn watch<C>(
    conn: C,
    state: &ConnState,
    stop: &CancellationToken,
    first_request: Duration,
    idle: Duration,
) -> Result<(), BoxError>
where
    C: Future<Output = Result<(), BoxError>> + GracefulConnection,
{
    let mut conn = std::pin::pin!(conn);
    let born = state.born;
    // Validation keeps both positive; a floor keeps a zero from spinning this loop anyway.
    let (first_request, idle) = (first_request.max(MIN_TIMEOUT), idle.max(MIN_TIMEOUT));
    let timer = tokio::time::sleep(first_request.min(idle));
    let mut timer = std::pin::pin!(timer);
    let mut closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => return result,
            _ = stop.cancelled(), if !closing => {
                conn.as_mut().shutdown_gracefully();
                closing = true;
            }
            _ = state.evict.notified(), if !closing => {
                if state.requests.load(Ordering::Acquire) == 0 {
                    // Never sent a request: nothing to be polite about.
                    return Ok(());
                }
                if state.active.load(Ordering::Acquire) == 0 {
                    // An idle keep-alive or HTTP/2 connection: close it cleanly (GOAWAY).
                    conn.as_mut().shutdown_gracefully();
                    closing = true;
                } else {
                    // Became busy since it was picked: it may be picked again later.
                    state.evicted.store(false, Ordering::Release);
                }
            }
            _ = timer.as_mut(), if !closing => {
                let now = Instant::now();
                if state.requests.load(Ordering::Acquire) == 0 {
                    if now >= born + first_request {
                        // Silent since accept (or only an HTTP/2 preface): free the slot.
                        return Ok(());
                    }
                    timer.as_mut().reset(born + first_request);
                    continue;
                }
                if state.active.load(Ordering::Acquire) > 0 {
                    timer.as_mut().reset(now + idle);
                    continue;
                }
                let idle_since = born + Duration::from_millis(state.idle_since_ms.load(Ordering::Acquire));
                let close_at = idle_since + idle;
                if now >= close_at {
                    conn.as_mut().shutdown_gracefully();
                    closing = true;
                } else {
                    timer.as_mut().reset(close_at);
                }
            }
        }
    }
}

/// How long a connection must have sent nothing before eviction counts it as silent.
const SETTLE: Duration = Duration::from_secs(1);

/// The shortest connection timeout [`watch`] works with.
const MIN_TIMEOUT: Duration = Duration::from_millis(100);

/// The one method [`watch`] needs from hyper-util's connection types.
trait GracefulConnection {
    fn shutdown_gracefully(self: std::pin::Pin<&mut Self>);
}

impl<I, S, E, B> GracefulConnection for auto::Connection<'static, I, S, E>
where
    S: hyper::service::HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    B: http_body::Body + 'static,
    B::Error: Into<BoxError>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn shutdown_gracefully(self: std::pin::Pin<&mut Self>) {
        self.graceful_shutdown()
    }
}

/// Every open connection of a listener, in accept order, so the oldest idle one can be closed
/// when the listener is full. Locked at accept and close only, never per request.
#[derive(Debug, Default)]
struct ConnTable {
    conns: Mutex<BTreeMap<u64, Arc<ConnState>>>,
    next_id: AtomicU64,
}

impl ConnTable {
    fn register(&self) -> Arc<ConnState> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let state = Arc::new(ConnState {
            id,
            born: Instant::now(),
            active: AtomicUsize::new(0),
            requests: AtomicU64::new(0),
            idle_since_ms: AtomicU64::new(0),
            evicted: AtomicBool::new(false),
            evict: Notify::new(),
        });
        self.lock().insert(id, Arc::clone(&state));
        state
    }

    fn remove(&self, state: &ConnState) {
        self.lock().remove(&state.id);
    }

    /// Asks one connection without a request in flight to close: the oldest silent one (no
    /// request for `SETTLE` since accept), else the oldest idle keep-alive, else a young silent
    /// one. False if there is none.
    fn evict_one_idle(&self) -> bool {
        let conns = self.lock();
        let now = Instant::now();
        let idle =
            |c: &&Arc<ConnState>| c.active.load(Ordering::Acquire) == 0 && !c.evicted.load(Ordering::Acquire);
        let silent = |c: &&Arc<ConnState>| c.requests.load(Ordering::Acquire) == 0;
        // A socket accepted a moment ago (maybe by another worker) has likely not had its first
        // request read yet: it is silent only once it has stayed so for `SETTLE`. Before that an
        // idle keep-alive goes first, and a young silent one only when there is nothing else.
        let victim = conns
            .values()
            .filter(idle)
            .find(|c| silent(c) && now.saturating_duration_since(c.born) >= SETTLE)
            .or_else(|| conns.values().filter(idle).find(|c| !silent(c)))
            .or_else(|| conns.values().find(idle));
        match victim {
            Some(c) => {
                c.evicted.store(true, Ordering::Release);
                c.evict.notify_one();
                true
            }
            None => false,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Arc<ConnState>>> {
        // A panic while holding this lock leaves a consistent map: recover it.
        self.conns.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// What the listener knows about one connection.
#[derive(Debug)]
struct ConnState {
    id: u64,
    born: Instant,
    /// Requests whose response has not finished.
    active: AtomicUsize,
    /// Requests seen so far.
    requests: AtomicU64,
    /// When `active` last fell to 0, in ms since the connection was accepted.
    idle_since_ms: AtomicU64,
    evicted: AtomicBool,
    evict: Notify,
}

/// One request in flight on a connection, until its response body is dropped.
struct Tracked {
    state: Arc<ConnState>,
}

impl Tracked {
    fn begin(state: &Arc<ConnState>) -> Self {
        state.requests.fetch_add(1, Ordering::AcqRel);
        state.active.fetch_add(1, Ordering::AcqRel);
        Self { state: Arc::clone(state) }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        let state = &*self.state;
        // Written before the count falls, so a watcher that sees 0 also sees when it fell.
        let ms = u64::try_from(state.born.elapsed().as_millis()).unwrap_or(u64::MAX);
        state.idle_since_ms.store(ms, Ordering::Release);
        state.active.fetch_sub(1, Ordering::AcqRel);
    }
}

pin_project_lite::pin_project! {
    /// A response body that keeps its request counted as in flight until it ends.
    struct TrackedBody<B> {
        #[pin]
        body: B,
        _request: Tracked,
    }
}

impl<B: http_body::Body> http_body::Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        self.project().body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// A connection's IO with a deadline on writes: a client that stops reading (its socket
    /// buffer, or its HTTP/2 window, full) for `limit` gets its connection closed, so it cannot
    /// hold a request, its upstream connection and its slot forever. The timer runs only while
    /// a write is blocked.
    struct WriteDeadline<T> {
        #[pin]
        io: T,
        limit: Duration,
        timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
        waiting: bool,
    }
}

impl<T> WriteDeadline<T> {
    fn new(io: T, limit: Duration) -> Self {
        Self { io, limit: limit.max(MIN_TIMEOUT), timer: None, waiting: false }
    }
}

/// Passes a write's result through, or fails it once it has been blocked for `limit`.
fn write_deadline<R>(
    polled: std::task::Poll<std::io::Result<R>>,
    timer: &mut Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    waiting: &mut bool,
    limit: Duration,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<std::io::Result<R>> {
    use std::task::Poll;
    if polled.is_ready() {
        *waiting = false;
        return polled;
    }
    let timer = match timer {
        Some(t) => {
            if !*waiting {
                t.as_mut().reset(Instant::now() + limit);
            }
            t
        }
        None => timer.insert(Box::pin(tokio::time::sleep(limit))),
    };
    *waiting = true;
    match timer.as_mut().poll(cx) {
        Poll::Ready(()) => Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "the client stopped reading (server.connection_idle_timeout_secs)",
        ))),
        Poll::Pending => Poll::Pending,
    }
}

impl<T: hyper::rt::Read> hyper::rt::Read for WriteDeadline<T> {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().io.poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write> hyper::rt::Write for WriteDeadline<T> {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.io.poll_write(cx, buf);
        write_deadline(polled, this.timer, this.waiting, *this.limit, cx)
    }

    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let this = self.project();
        let polled = this.io.poll_write_vectored(cx, bufs);
        write_deadline(polled, this.timer, this.waiting, *this.limit, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let this = self.project();
        let polled = this.io.poll_flush(cx);
        write_deadline(polled, this.timer, this.waiting, *this.limit, cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        self.project().io.poll_shutdown(cx)
    }
}
