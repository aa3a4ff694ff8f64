//! `bench-floor`: the benchmark's floor, a minimal but correct hyper reverse proxy doing
//! sidekey's job and nothing else (see bench/README.md). It strips hop-by-hop headers, sets a
//! static `Authorization: Bearer static`, points the request at the upstream and streams both
//! bodies; an upstream failure is a 502. No limits, timeouts, metrics, logs or tokens: the
//! fastest thing hyper can do for the same job, measured in the same run as sidekey and nginx.
//!
//! ```text
//! bench-floor --listen 127.0.0.1:PORT --upstream http://127.0.0.1:PORT|https://127.0.0.1:PORT
//!             [--ca-file PATH] [--http2] [--workers N] [--client legacy|conn]
//!             [--accept reuseport|shared]
//! ```
//!
//! - `--workers N` (default: available parallelism): one OS thread per worker, each running a
//!   tokio `current_thread` runtime (with a `LocalSet`).
//! - `--accept reuseport` (default): every worker binds its own listener to the address with
//!   `SO_REUSEPORT` and the kernel spreads connections; `--accept shared`: one listener on the
//!   main thread hands accepted sockets round-robin to the workers (what sidekey does).
//! - `--client conn` (default): a per-worker upstream pool without locks on hyper's
//!   connection-level client (`hyper::client::conn::http1`, or `http2` when `--http2` and ALPN
//!   picked h2), TLS through tokio-rustls; `--client legacy`: hyper-util's legacy pooled
//!   `Client` per worker over hyper-rustls (what sidekey uses).
//! - `--http2`: offer h2 by ALPN to an https upstream (else HTTP/1.1 only).
//! - `--ca-file PATH`: the PEM roots for an https upstream (else the web PKI roots).
//!
//! It prints nothing on success and runs until killed; startup failures go to stderr with exit
//! code 1.

use std::cell::RefCell;
use std::convert::Infallible;
use std::future::Future;
use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue, AUTHORIZATION, HOST};
use http::uri::{Authority, Scheme, Uri};
use http::{Request, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{Either, Empty};
use hyper::body::Incoming;
use hyper::client::conn::{http1 as client_h1, http2 as client_h2};
use hyper::server::conn::http1 as server_h1;
use hyper::service::service_fn;
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client as LegacyClient;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::LocalSet;
use tokio_rustls::TlsConnector;

const USAGE: &str = "usage: bench-floor --listen ADDR --upstream http[s]://HOST:PORT [--ca-file PATH] \
[--http2] [--workers N] [--client legacy|conn] [--accept reuseport|shared]";

/// Hop-by-hop headers (RFC 9110 §7.6.1) a proxy must not forward, either way.
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClientKind {
    Legacy,
    Conn,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Accept {
    Reuseport,
    Shared,
}

#[derive(Debug, Clone)]
struct Args {
    listen: SocketAddr,
    upstream: Uri,
    ca_file: Option<PathBuf>,
    http2: bool,
    workers: usize,
    client: ClientKind,
    accept: Accept,
}

fn parse_args() -> Result<Args, String> {
    let mut listen = None;
    let mut upstream = None;
    let mut ca_file = None;
    let mut http2 = false;
    let mut workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut client = ClientKind::Conn;
    let mut accept = Accept::Reuseport;
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let mut value = || it.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--listen" => {
                let v = value()?;
                listen = Some(v.parse::<SocketAddr>().map_err(|e| format!("--listen {v}: {e}"))?);
            }
            "--upstream" => {
                let v = value()?;
                upstream = Some(v.parse::<Uri>().map_err(|e| format!("--upstream {v}: {e}"))?);
            }
            "--ca-file" => ca_file = Some(PathBuf::from(value()?)),
            "--http2" => http2 = true,
            "--workers" => {
                let v = value()?;
                workers = v
                    .parse()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or(format!("--workers {v}: not a positive count"))?;
            }
            "--client" => {
                client = match value()?.as_str() {
                    "legacy" => ClientKind::Legacy,
                    "conn" => ClientKind::Conn,
                    other => return Err(format!("--client {other}: legacy or conn")),
                }
            }
            "--accept" => {
                accept = match value()?.as_str() {
                    "reuseport" => Accept::Reuseport,
                    "shared" => Accept::Shared,
                    other => return Err(format!("--accept {other}: reuseport or shared")),
                }
            }
            "-h" | "--help" => return Err(USAGE.into()),
            other => return Err(format!("unknown argument {other}\n{USAGE}")),
        }
    }
    Ok(Args {
        listen: listen.ok_or(format!("--listen is required\n{USAGE}"))?,
        upstream: upstream.ok_or(format!("--upstream is required\n{USAGE}"))?,
        ca_file,
        http2,
        workers,
        client,
        accept,
    })
}

/// Everything a worker needs, built once on the main thread.
#[derive(Debug, Clone)]
struct Upstream {
    scheme: Scheme,
    authority: Authority,
    /// The first address the authority resolves to.
    addr: SocketAddr,
    /// `Host` for HTTP/1.1 upstream requests.
    host: HeaderValue,
    tls: Option<Arc<rustls::ClientConfig>>,
    server_name: ServerName<'static>,
    http2: bool,
}

fn upstream(args: &Args) -> Result<Upstream, String> {
    let scheme = args.upstream.scheme().cloned().ok_or("--upstream needs a scheme")?;
    let authority = args.upstream.authority().cloned().ok_or("--upstream needs host:port")?;
    let https = match scheme.as_str() {
        "http" => false,
        "https" => true,
        other => return Err(format!("--upstream: unsupported scheme {other}")),
    };
    let port = authority.port_u16().unwrap_or(if https { 443 } else { 80 });
    let host_only = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
    let addr = (host_only.as_str(), port)
        .to_socket_addrs()
        .map_err(|e| format!("--upstream {authority}: {e}"))?
        .next()
        .ok_or(format!("--upstream {authority}: no address"))?;
    let host = HeaderValue::from_str(authority.as_str()).map_err(|e| e.to_string())?;
    let server_name = ServerName::try_from(host_only).map_err(|e| format!("--upstream {authority}: {e}"))?;
    let tls = if https {
        let mut roots = RootCertStore::empty();
        match &args.ca_file {
            Some(path) => {
                let certs = CertificateDer::pem_file_iter(path)
                    .map_err(|e| format!("--ca-file {}: {e}", path.display()))?;
                for cert in certs {
                    let cert = cert.map_err(|e| format!("--ca-file {}: {e}", path.display()))?;
                    roots.add(cert).map_err(|e| format!("--ca-file {}: {e}", path.display()))?;
                }
            }
            None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Some(Arc::new(config))
    } else {
        None
    };
    Ok(Upstream { scheme, authority, addr, host, tls, server_name, http2: args.http2 })
}

/// The response body: the upstream's, streamed, or empty (a 502).
type RespBody = Either<PooledBody, Empty<Bytes>>;

fn bad_gateway() -> Response<RespBody> {
    let mut resp = Response::new(Either::Right(Empty::new()));
    *resp.status_mut() = StatusCode::BAD_GATEWAY;
    resp
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// A future spawned on the worker's `LocalSet` (the `conn` pool's connection tasks).
#[derive(Debug, Clone, Copy)]
struct LocalExec;

impl<F> hyper::rt::Executor<F> for LocalExec
where
    F: Future<Output = ()> + 'static,
{
    fn execute(&self, fut: F) {
        tokio::task::spawn_local(fut);
    }
}

/// The `conn` client: this worker's idle HTTP/1.1 connections and its HTTP/2 connection, if
/// any. Worker-local (`Rc<RefCell<..>>`), so no lock and no atomic on the request path.
struct ConnPool {
    upstream: Upstream,
    tls: Option<TlsConnector>,
    idle: RefCell<Vec<client_h1::SendRequest<Incoming>>>,
    h2: RefCell<Option<client_h2::SendRequest<Incoming>>>,
}

impl std::fmt::Debug for ConnPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConnPool").field("idle", &self.idle.borrow().len()).finish_non_exhaustive()
    }
}

enum Sender {
    H1(client_h1::SendRequest<Incoming>),
    H2(client_h2::SendRequest<Incoming>),
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl ConnPool {
    fn new(upstream: Upstream) -> Self {
        let tls = upstream.tls.as_ref().map(|config| {
            let mut config = (**config).clone();
            config.alpn_protocols = if upstream.http2 {
                vec![b"h2".to_vec(), b"http/1.1".to_vec()]
            } else {
                vec![b"http/1.1".to_vec()]
            };
            TlsConnector::from(Arc::new(config))
        });
        Self { upstream, tls, idle: RefCell::new(Vec::new()), h2: RefCell::new(None) }
    }

    /// A ready connection: the shared HTTP/2 one, else the most recently idle HTTP/1.1 one,
    /// else a new one.
    async fn checkout(&self) -> Result<Sender, BoxError> {
        let h2 = self.h2.borrow().as_ref().filter(|s| !s.is_closed()).cloned();
        if let Some(mut s) = h2 {
            if s.ready().await.is_ok() {
                return Ok(Sender::H2(s));
            }
        }
        loop {
            let Some(mut s) = self.idle.borrow_mut().pop() else { break };
            if s.is_closed() {
                continue;
            }
            // Returned at the end of its last response body; its connection task may not have
            // seen that yet.
            if s.is_ready() || s.ready().await.is_ok() {
                return Ok(Sender::H1(s));
            }
        }
        self.connect().await
    }

    async fn connect(&self) -> Result<Sender, BoxError> {
        let tcp = TcpStream::connect(self.upstream.addr).await?;
        tcp.set_nodelay(true)?;
        let Some(tls) = &self.tls else { return h1_handshake(tcp).await };
        let stream = tls.connect(self.upstream.server_name.clone(), tcp).await?;
        if stream.get_ref().1.alpn_protocol() == Some(b"h2") {
            let (s, conn) = client_h2::handshake(LocalExec, TokioIo::new(stream)).await?;
            tokio::task::spawn_local(async move {
                let _ = conn.await;
            });
            let mut slot = self.h2.borrow_mut();
            if slot.as_ref().is_none_or(|old| old.is_closed()) {
                *slot = Some(s.clone());
            }
            return Ok(Sender::H2(s));
        }
        h1_handshake(stream).await
    }
}

async fn h1_handshake<T>(io: T) -> Result<Sender, BoxError>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + 'static,
{
    let (s, conn) = client_h1::handshake(TokioIo::new(io)).await?;
    tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    Ok(Sender::H1(s))
}

/// The upstream's response body; hands its HTTP/1.1 connection back to the worker's pool when
/// dropped after the body ended (a body dropped early leaves hyper to close the connection).
struct PooledBody {
    body: Incoming,
    back: Option<(Rc<ConnPool>, client_h1::SendRequest<Incoming>)>,
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
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        if let Some((pool, sender)) = self.back.take() {
            if self.body.is_end_stream() && !sender.is_closed() {
                pool.idle.borrow_mut().push(sender);
            }
        }
    }
}

/// How this worker reaches the upstream.
#[derive(Debug)]
enum Forwarder {
    Legacy(Box<LegacyClient<HttpsConnector<HttpConnector>, Incoming>>),
    Conn(Rc<ConnPool>),
}

#[derive(Debug)]
struct Worker {
    forwarder: Forwarder,
    upstream: Upstream,
    auth: HeaderValue,
}

impl Worker {
    fn new(upstream: Upstream, kind: ClientKind) -> Self {
        let forwarder = match kind {
            ClientKind::Conn => Forwarder::Conn(Rc::new(ConnPool::new(upstream.clone()))),
            ClientKind::Legacy => {
                let mut http = HttpConnector::new();
                http.enforce_http(false);
                http.set_nodelay(true);
                let tls = upstream.tls.as_ref().map_or_else(
                    // Never used for an http upstream; the builder wants one.
                    || {
                        rustls::ClientConfig::builder_with_provider(Arc::new(
                            rustls::crypto::ring::default_provider(),
                        ))
                        .with_safe_default_protocol_versions()
                        .expect("ring supports the default versions")
                        .with_root_certificates(RootCertStore::empty())
                        .with_no_client_auth()
                    },
                    |c| (**c).clone(),
                );
                let builder =
                    HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1();
                let connector = if upstream.http2 {
                    builder.enable_http2().wrap_connector(http)
                } else {
                    builder.wrap_connector(http)
                };
                let client = LegacyClient::builder(TokioExecutor::new())
                    .pool_max_idle_per_host(256)
                    .pool_timer(TokioTimer::new())
                    .timer(TokioTimer::new())
                    .build(connector);
                Forwarder::Legacy(Box::new(client))
            }
        };
        Self { forwarder, upstream, auth: HeaderValue::from_static("Bearer static") }
    }

    async fn handle(self: Rc<Self>, mut req: Request<Incoming>) -> Result<Response<RespBody>, Infallible> {
        let headers = req.headers_mut();
        strip_hop_by_hop(headers);
        headers.insert(AUTHORIZATION, self.auth.clone());
        let result = match &self.forwarder {
            Forwarder::Legacy(client) => {
                // The legacy client sets `Host` from the absolute URI on HTTP/1.1 (and HTTP/2
                // wants none besides `:authority`), as in sidekey.
                headers.remove(HOST);
                *req.uri_mut() = self.absolute(req.uri());
                client.request(req).await.map(|r| r.map(|body| PooledBody { body, back: None }))
            }
            Forwarder::Conn(pool) => match pool.checkout().await {
                Ok(Sender::H1(mut s)) => {
                    req.headers_mut().insert(HOST, self.upstream.host.clone());
                    // Origin-form, as hyper's server handed it over: `Host` names the upstream.
                    match s.send_request(req).await {
                        Ok(r) => Ok(r.map(|body| PooledBody { body, back: Some((Rc::clone(pool), s)) })),
                        Err(_) => return Ok(bad_gateway()),
                    }
                }
                Ok(Sender::H2(mut s)) => {
                    req.headers_mut().remove(HOST);
                    *req.uri_mut() = self.absolute(req.uri());
                    *req.version_mut() = Version::HTTP_2;
                    match s.send_request(req).await {
                        Ok(r) => Ok(r.map(|body| PooledBody { body, back: None })),
                        Err(_) => return Ok(bad_gateway()),
                    }
                }
                Err(_) => return Ok(bad_gateway()),
            },
        };
        Ok(match result {
            Ok(mut resp) => {
                strip_hop_by_hop(resp.headers_mut());
                *resp.version_mut() = Version::HTTP_11;
                resp.map(Either::Left)
            }
            Err(_) => bad_gateway(),
        })
    }

    /// The request's path-and-query on the upstream's scheme and authority.
    fn absolute(&self, uri: &Uri) -> Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.upstream.scheme.clone());
        parts.authority = Some(self.upstream.authority.clone());
        parts.path_and_query =
            uri.path_and_query().cloned().or_else(|| Some(http::uri::PathAndQuery::from_static("/")));
        Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
    }
}

fn serve(worker: &Rc<Worker>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let worker = Rc::clone(worker);
    tokio::task::spawn_local(async move {
        let service = service_fn(move |req| Rc::clone(&worker).handle(req));
        let _ =
            server_h1::Builder::new().keep_alive(true).serve_connection(TokioIo::new(stream), service).await;
    });
}

/// Where a worker's connections come from.
enum Source {
    Listener(std::net::TcpListener),
    Channel(mpsc::UnboundedReceiver<std::net::TcpStream>),
}

fn run_worker(upstream: Upstream, kind: ClientKind, source: Source) {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => fail(&format!("cannot start a runtime: {e}")),
    };
    let local = LocalSet::new();
    local.block_on(&rt, async move {
        let worker = Rc::new(Worker::new(upstream, kind));
        match source {
            Source::Listener(std) => {
                let listener =
                    TcpListener::from_std(std).unwrap_or_else(|e| fail(&format!("cannot register: {e}")));
                loop {
                    match listener.accept().await {
                        Ok((stream, _)) => serve(&worker, stream),
                        Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
                    }
                }
            }
            Source::Channel(mut rx) => {
                while let Some(std) = rx.recv().await {
                    if let Ok(stream) = TcpStream::from_std(std) {
                        serve(&worker, stream);
                    }
                }
            }
        }
    });
}

fn fail(msg: &str) -> ! {
    eprintln!("bench-floor: {msg}");
    std::process::exit(1)
}

/// A non-blocking listener on `addr`, with `SO_REUSEPORT` when several bind the same address.
fn bind(addr: SocketAddr, reuseport: bool) -> std::io::Result<std::net::TcpListener> {
    // TcpSocket::listen registers with a reactor: a throw-away runtime does it on this thread,
    // and `into_std` takes the socket back out.
    let rt = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    rt.block_on(async {
        let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        if reuseport {
            socket.set_reuseport(true)?;
        }
        socket.set_nodelay(true)?;
        socket.bind(addr)?;
        socket.listen(1024)?.into_std()
    })
}

fn main() {
    let args = parse_args().unwrap_or_else(|e| fail(&e));
    let upstream = upstream(&args).unwrap_or_else(|e| fail(&e));
    let mut threads = Vec::new();
    match args.accept {
        Accept::Reuseport => {
            // All bound before any worker starts, so a bad address fails at once.
            let listeners: Vec<_> = (0..args.workers)
                .map(|_| {
                    bind(args.listen, true)
                        .unwrap_or_else(|e| fail(&format!("--listen {}: {e}", args.listen)))
                })
                .collect();
            for (i, listener) in listeners.into_iter().enumerate() {
                let (upstream, kind) = (upstream.clone(), args.client);
                threads.push(spawn(i, move || run_worker(upstream, kind, Source::Listener(listener))));
            }
        }
        Accept::Shared => {
            let listener =
                bind(args.listen, false).unwrap_or_else(|e| fail(&format!("--listen {}: {e}", args.listen)));
            let mut senders = Vec::new();
            for i in 0..args.workers {
                let (tx, rx) = mpsc::unbounded_channel();
                senders.push(tx);
                let (upstream, kind) = (upstream.clone(), args.client);
                threads.push(spawn(i, move || run_worker(upstream, kind, Source::Channel(rx))));
            }
            // The control thread accepts and hands sockets round-robin, like sidekey's serve_on.
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap_or_else(|e| fail(&format!("cannot start a runtime: {e}")));
            rt.block_on(async move {
                let listener = TcpListener::from_std(listener)
                    .unwrap_or_else(|e| fail(&format!("cannot register: {e}")));
                let mut next = 0usize;
                loop {
                    let Ok((stream, _)) = listener.accept().await else {
                        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        continue;
                    };
                    if let Ok(std) = stream.into_std() {
                        let _ = senders[next % senders.len()].send(std);
                        next = next.wrapping_add(1);
                    }
                }
            });
        }
    }
    for t in threads {
        let _ = t.join();
    }
}

fn spawn(i: usize, f: impl FnOnce() + Send + 'static) -> std::thread::JoinHandle<()> {
    std::thread::Builder::new()
        .name(format!("floor-worker-{i}"))
        .spawn(f)
        .unwrap_or_else(|e| fail(&format!("cannot start a worker thread: {e}")))
}

// Only for the `Source` enum's lint: it holds OS handles.
impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Source::Listener(_) => "Listener",
            Source::Channel(_) => "Channel",
        })
    }
}
