//! `bench-upstream`: the benchmark's fake OpenAI upstream and fake IAM, in one process, as fast
//! as we can make them so that they are never what the benchmark measures.
//!
//! ```text
//! cargo run --release --example bench-upstream -- [--listen 127.0.0.1:0] [--iam 127.0.0.1:0]
//!     [--token-secs 3600] [--max-secs 3600]
//!     [--tls-listen 127.0.0.1:0 --cert LEAF.pem --key LEAF.key]
//! ```
//!
//! Prints the bound addresses as one JSON line on stdout (`{"upstream":"127.0.0.1:P","iam":...}`,
//! plus `"upstream_tls"` with `--cert`) and serves until killed, or `--max-secs` at most (so a
//! forgotten one does not linger).
//!
//! With `--cert` and `--key` (PEM; the key PKCS#8, SEC1 or PKCS#1) the same upstream is served a
//! second time over TLS (rustls on ring, TLS 1.2 and 1.3), offering `h2` and `http/1.1` by ALPN,
//! so the benchmark's HTTPS scenario streams SSE from this process itself rather than through an
//! extra TLS-terminating hop.
//!
//! Upstream (`--listen`):
//! - `POST /v1/chat/completions`: a fixed ~1 KB completion (`bench/completion.json`); with
//!   `"stream": true` in the JSON body or `stream=1` in the query, an SSE stream of `chunks`
//!   events (default 100) `interval_ms` apart (default 10), then `data: [DONE]`. The first event
//!   leaves at once. Every event carries `"i"` (its index) and `"t"` (the wall-clock time it was
//!   handed to the socket, in Unix nanoseconds), so a client on the same machine can tell the
//!   delay each event picked up on its way.
//! - `POST /v1/upload`: drains the body and answers `{"bytes": N}`.
//! - `GET /v1/sanity/proto`: the HTTP version the request arrived with (`HTTP/1.1`, `HTTP/2.0`),
//!   so the benchmark can check which protocol a proxy really speaks to its upstream.
//!
//! IAM (`--iam`): `POST /api/v1/auth/token` answers `{"access_token": ..., "expires_in": ...}`
//! at once, whatever the credential.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sidekey::server::{serve, ServeSettings};
use tokio::net::TcpListener;
use tokio::time::MissedTickBehavior;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

/// The fixed non-streaming answer; nginx serves the same bytes in the JSON scenario.
const COMPLETION: &str = include_str!("completion.json");

type Body = BoxBody<Bytes, Infallible>;

#[derive(Debug)]
struct Args {
    listen: SocketAddr,
    iam: SocketAddr,
    token_secs: u64,
    max_secs: u64,
    tls_listen: SocketAddr,
    cert: Option<String>,
    key: Option<String>,
}

fn parse_args() -> Result<Args, String> {
    let mut args = Args {
        listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        iam: SocketAddr::from(([127, 0, 0, 1], 0)),
        token_secs: 3600,
        max_secs: 3600,
        tls_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
        cert: None,
        key: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
        let bad = |e: &dyn std::fmt::Display| format!("{flag} {value}: {e}");
        match flag.as_str() {
            "--listen" => args.listen = value.parse().map_err(|e| bad(&e))?,
            "--iam" => args.iam = value.parse().map_err(|e| bad(&e))?,
            "--token-secs" => args.token_secs = value.parse().map_err(|e| bad(&e))?,
            "--max-secs" => args.max_secs = value.parse().map_err(|e| bad(&e))?,
            "--tls-listen" => args.tls_listen = value.parse().map_err(|e| bad(&e))?,
            "--cert" => args.cert = Some(value),
            "--key" => args.key = Some(value),
            _ => return Err(format!("unknown flag {flag}")),
        }
    }
    if args.cert.is_some() != args.key.is_some() {
        return Err("--cert and --key go together".into());
    }
    Ok(args)
}

fn main() {
    let args = match parse_args() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("bench-upstream: {e}");
            std::process::exit(64);
        }
    };
    // One thread: the upstream must stay cheap, and the machine it shares has few cores.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    rt.block_on(run(args));
}

async fn run(args: Args) {
    let upstream = TcpListener::bind(args.listen).await.expect("bind --listen");
    let iam = TcpListener::bind(args.iam).await.expect("bind --iam");
    let tls = match (&args.cert, &args.key) {
        (Some(cert), Some(key)) => {
            let acceptor = tls_acceptor(cert, key).unwrap_or_else(|e| {
                eprintln!("bench-upstream: {e}");
                std::process::exit(64);
            });
            Some((TcpListener::bind(args.tls_listen).await.expect("bind --tls-listen"), acceptor))
        }
        _ => None,
    };
    let mut bound = serde_json::json!({
        "upstream": upstream.local_addr().expect("bound").to_string(),
        "iam": iam.local_addr().expect("bound").to_string(),
    });
    if let Some((listener, _)) = &tls {
        bound["upstream_tls"] = listener.local_addr().expect("bound").to_string().into();
    }
    println!("{bound}");
    if let Some((listener, acceptor)) = tls {
        tokio::spawn(serve_tls(listener, acceptor));
    }
    let stop = CancellationToken::new();
    let settings = |name| ServeSettings {
        name,
        max_connections: 16_384,
        header_read_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(300),
        max_headers: 100,
        max_header_bytes: 64 * 1024,
        grace: Duration::from_millis(100),
    };
    let issued = Arc::new(AtomicU64::new(0));
    let token_secs = args.token_secs;
    let iam_task = tokio::spawn(serve(iam, settings("bench-iam"), stop.clone(), move |req, _| {
        let issued = Arc::clone(&issued);
        async move { Ok::<_, Infallible>(fake_iam(req, &issued, token_secs).await) }
    }));
    let upstream_task =
        tokio::spawn(serve(upstream, settings("bench-upstream"), stop.clone(), |req, _| async {
            Ok::<_, Infallible>(fake_upstream(req).await)
        }));
    tokio::time::sleep(Duration::from_secs(args.max_secs)).await;
    stop.cancel();
    let _ = tokio::join!(iam_task, upstream_task);
}

/// A TLS acceptor for `--cert`/`--key`, offering h2 and HTTP/1.1 by ALPN.
fn tls_acceptor(cert: &str, key: &str) -> Result<TlsAcceptor, String> {
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|e| format!("--cert {cert}: {e}"))?;
    let key = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("--key {key}: {e}"))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| format!("TLS setup: {e}"))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The upstream over TLS: HTTP/1.1 or h2, as the client's ALPN chose. The connections live as
/// long as their peers keep them (the process is killed at the end of the run).
async fn serve_tls(listener: TcpListener, acceptor: TlsAcceptor) {
    loop {
        let Ok((tcp, _)) = listener.accept().await else { continue };
        let _ = tcp.set_nodelay(true);
        let acceptor = acceptor.clone();
        tokio::spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else { return };
            let service = service_fn(|req| async { Ok::<_, Infallible>(fake_upstream(req).await) });
            let _ =
                auto::Builder::new(TokioExecutor::new()).serve_connection(TokioIo::new(tls), service).await;
        });
    }
}

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut resp = Response::new(Full::new(body.into()).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

fn not_found() -> Response<Body> {
    full(StatusCode::NOT_FOUND, "application/json", r#"{"error":{"message":"not found","type":"bench"}}"#)
}

/// Reads the whole body (small requests only); `None` if it fails or exceeds `limit`.
async fn read_body(req: Request<Incoming>, limit: usize) -> Option<Bytes> {
    http_body_util::Limited::new(req.into_body(), limit).collect().await.ok().map(|c| c.to_bytes())
}

async fn fake_iam(req: Request<Incoming>, issued: &AtomicU64, token_secs: u64) -> Response<Body> {
    if req.method() != Method::POST || req.uri().path() != "/api/v1/auth/token" {
        return not_found();
    }
    // Drain the request so the connection can be reused.
    let _ = read_body(req, 64 * 1024).await;
    let n = issued.fetch_add(1, Ordering::Relaxed) + 1;
    let body = serde_json::json!({
        "access_token": format!("bench-token-{n:08}-{:016x}", fastrand::u64(..)),
        "expires_in": token_secs,
        "token_type": "Bearer",
    });
    full(StatusCode::OK, "application/json", body.to_string())
}

async fn fake_upstream(req: Request<Incoming>) -> Response<Body> {
    match (req.method(), req.uri().path()) {
        (&Method::POST, "/v1/chat/completions") => chat(req).await,
        (&Method::POST, "/v1/upload") => upload(req).await,
        (&Method::GET, "/v1/sanity/proto") => {
            full(StatusCode::OK, "text/plain", format!("{:?}\n", req.version()))
        }
        _ => not_found(),
    }
}

/// SSE parameters from the query: `stream=1`, `chunks=N`, `interval_ms=M`.
#[derive(Debug, Clone, Copy)]
struct StreamParams {
    stream: bool,
    chunks: u64,
    interval: Duration,
}

fn stream_params(query: Option<&str>) -> StreamParams {
    let mut p = StreamParams { stream: false, chunks: 100, interval: Duration::from_millis(10) };
    for pair in query.unwrap_or_default().split('&') {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "stream" => p.stream = matches!(value, "1" | "true"),
            "chunks" => p.chunks = value.parse().unwrap_or(p.chunks),
            "interval_ms" => p.interval = value.parse().map(Duration::from_millis).unwrap_or(p.interval),
            _ => {}
        }
    }
    p
}

async fn chat(req: Request<Incoming>) -> Response<Body> {
    let mut params = stream_params(req.uri().query());
    let Some(body) = read_body(req, 1 << 20).await else {
        return full(StatusCode::BAD_REQUEST, "application/json", r#"{"error":{"message":"bad body"}}"#);
    };
    if !params.stream {
        params.stream = serde_json::from_slice::<serde_json::Value>(&body)
            .is_ok_and(|v| v.get("stream").and_then(serde_json::Value::as_bool) == Some(true));
    }
    if !params.stream {
        return full(StatusCode::OK, "application/json", Bytes::from_static(COMPLETION.as_bytes()));
    }
    sse(params)
}

fn unix_nanos() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos())
}

fn sse(params: StreamParams) -> Response<Body> {
    // Event 0 leaves at once (not through the timer, which rounds up to its next millisecond);
    // the others follow one interval apart.
    let period = params.interval.max(Duration::from_millis(1));
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    // A late tick shifts the schedule instead of bursting: each gap stays one interval.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let state = (ticks, 0u64);
    let total = params.chunks;
    let stream = futures_util::stream::unfold(state, move |(mut ticks, i)| async move {
        if i > total {
            return None;
        }
        if i > 0 {
            ticks.tick().await;
        }
        let event = if i == total {
            Bytes::from_static(b"data: [DONE]\n\n")
        } else {
            Bytes::from(format!(
                "data: {{\"id\":\"chatcmpl-bench\",\"object\":\"chat.completion.chunk\",\"created\":1700000000,\
                 \"model\":\"bench/fixed-model-v1\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\" token\"}},\
                 \"finish_reason\":null}}],\"i\":{i},\"t\":{}}}\n\n",
                unix_nanos()
            ))
        };
        Some((Ok::<_, Infallible>(Frame::data(event)), (ticks, i + 1)))
    });
    let mut resp = Response::new(StreamBody::new(stream).boxed());
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    resp.headers_mut().insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

async fn upload(req: Request<Incoming>) -> Response<Body> {
    let mut body = req.into_body();
    let mut bytes = 0u64;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => bytes += f.data_ref().map_or(0, |d| d.len() as u64),
            Err(_) => return full(StatusCode::BAD_REQUEST, "application/json", r#"{"error":"cut"}"#),
        }
    }
    full(StatusCode::OK, "application/json", format!("{{\"bytes\":{bytes}}}"))
}
