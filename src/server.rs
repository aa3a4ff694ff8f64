//! The accept loop shared by the proxy and admin listeners: HTTP/1.1 and h2c, a connection
//! limit, header limits and timeouts, and a graceful drain with a deadline.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::proxy::body::BoxError;

/// Limits for one listener.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    /// Used in logs: "proxy" or "admin".
    pub name: &'static str,
    pub max_connections: usize,
    pub header_read_timeout: Duration,
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
    serve_on(listener, settings, stop, vec![(Handle::current(), handler)]).await
}

/// Like [`serve`], handing accepted connections round-robin to `workers`: each connection lives
/// entirely on one worker runtime (its socket registered with that runtime's reactor), served by
/// that worker's handler.
pub async fn serve_on<H, Fut, B>(
    listener: TcpListener,
    settings: ServeSettings,
    stop: CancellationToken,
    workers: Vec<(Handle, H)>,
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
    let graceful = GracefulShutdown::new();
    let limit = Arc::new(Semaphore::new(settings.max_connections));
    let mut conns = JoinSet::new();
    let mut next = 0usize;

    loop {
        let permit = tokio::select! {
            _ = stop.cancelled() => break,
            permit = Arc::clone(&limit).acquire_owned() => match permit {
                Ok(p) => p,
                Err(_) => break,
            },
        };
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
        let Some((handle, handler)) = workers.get(next % workers.len().max(1)) else { break };
        next = next.wrapping_add(1);
        // Moved to the worker's own reactor, so its I/O never wakes this thread.
        let stream = match stream.into_std() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(listener = settings.name, error = %e, "Cannot hand a connection to a worker");
                continue;
            }
        };
        let (handler, builder, watcher, name) =
            (handler.clone(), builder.clone(), graceful.watcher(), settings.name);
        conns.spawn_on(
            async move {
                let stream = match TcpStream::from_std(stream) {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(listener = name, error = %e, "Cannot register a connection");
                        return;
                    }
                };
                let _ = stream.set_nodelay(true);
                let service = service_fn(move |req| handler(req, peer));
                let conn = builder.serve_connection(TokioIo::new(stream), service).into_owned();
                if let Err(e) = watcher.watch(conn).await {
                    tracing::debug!(listener = name, error = %e, "Connection ended with an error");
                }
                drop(permit);
            },
            handle,
        );
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
    tokio::select! {
        _ = graceful.shutdown() => {}
        _ = tokio::time::sleep(settings.grace) => {
            tracing::warn!(listener = settings.name, connections = conns.len(), "Grace period over; cutting the remaining connections");
        }
    }
    conns.shutdown().await;
}
