//! `bench-client`: the benchmark's load client for what `wrk` cannot do. Every mode is bounded in
//! time and prints one JSON line on stdout.
//!
//! ```text
//! bench-client sse     --url URL [--streams 100] [--stagger-ms 100] [--timeout-secs 60]
//! bench-client hold    --url URL [--streams 1000] [--seconds 30] [--open-concurrency 64]
//! bench-client upload  --url URL [--mib 100] [--chunk-kib 64] [--content-length]
//! bench-client rate    --url URL --rate R [--connections 16] [--seconds 5] [--body FILE]
//! bench-client serial  --url URL [--seconds 3] [--body FILE] [--warmup 200]
//! bench-client startup --ready-url URL [--runs 5] [--timeout-secs 10] -- CMD [ARGS...]
//! bench-client report  --results FILE.jsonl --meta FILE.json [--readme]
//! ```
//!
//! `--url` may be `https://`: the client then speaks HTTP/1.1 over TLS (rustls on ring), trusting
//! only the PEM CA bundle given with `--ca-file` (the benchmark's throw-away CA).
//!
//! - `sse`: opens K concurrent SSE streams (one connection each, HTTP/1.1) and records the time to
//!   the first event, every inter-event gap, and each event's delivery delay: arrival time minus
//!   the wall-clock send time `bench-upstream` stamps into it (`"t"`), which is what a proxy adds
//!   per chunk (the upstream's own timer jitter cancels out).
//! - `hold`: opens K streams, prints `{"open":K,...}` once each has received its first event,
//!   then keeps them open for `--seconds` (for RSS with many open streams; point it at a slow
//!   stream, e.g. `?stream=1&chunks=100000&interval_ms=1000`).
//! - `upload`: streams `--mib` MiB (chunked unless `--content-length`) and reports the rate.
//! - `rate`: fixed-rate (open-loop) load: each of C keep-alive connections sends on its own
//!   schedule, R requests per second in total, with the OpenAI Python SDK's header set and an
//!   optional body; reports latency percentiles measured from each request's write to the end
//!   of its response body, and how many sends started late (the client's own lag).
//! - `serial`: closed loop on one keep-alive connection: one request at a time, the next as soon
//!   as the previous response has ended, for `--seconds` after `--warmup` requests; reports the
//!   same latency percentiles and the request rate (the latency a single caller sees).
//! - `startup`: spawns the command, polls `--ready-url` every millisecond until it answers 200,
//!   reports the time from spawn, stops the process (SIGTERM) and repeats.
//! - `report`: turns the measurements `bench/run.sh` collected (one JSON object per line) into
//!   the markdown of `bench/RESULTS.md`: medians over rounds, ratios, targets; with `--readme`
//!   the summary table for the README's performance section instead.

mod report;

use std::net::SocketAddr;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderName, HeaderValue, CONTENT_TYPE, HOST};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Body, Frame, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use serde_json::{json, Value};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_rustls::TlsConnector;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The headers the OpenAI Python SDK (httpx) sends on a chat completion, besides `Host` and
/// `Content-Length`: what the proxy's header work sees in real use.
const SDK_HEADERS: [(&str, &str); 13] = [
    ("accept", "application/json"),
    ("accept-encoding", "gzip, deflate"),
    ("connection", "keep-alive"),
    ("user-agent", "OpenAI/Python 1.54.0"),
    ("authorization", "Bearer sk-placeholder-the-sidecar-replaces-this"),
    ("x-stainless-lang", "python"),
    ("x-stainless-package-version", "1.54.0"),
    ("x-stainless-os", "Linux"),
    ("x-stainless-arch", "x64"),
    ("x-stainless-runtime", "CPython"),
    ("x-stainless-runtime-version", "3.12.7"),
    ("x-stainless-async", "false"),
    ("x-stainless-retry-count", "0"),
];

const SSE_BODY: &str = r#"{"model":"bench/fixed-model-v1","stream":true,"messages":[{"role":"user","content":"stream please"}]}"#;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some((mode, rest)) = args.split_first() else {
        fail("usage: bench-client sse|hold|upload|rate|serial|startup|report ... (see bench/client.rs)");
    };
    let opts = Opts::parse(rest).unwrap_or_else(|e| fail(&e));
    match mode.as_str() {
        "startup" => {
            let out = startup(&opts).unwrap_or_else(|e| fail(&e.to_string()));
            println!("{out}");
            return;
        }
        "report" => {
            let out = report::render(&opts).unwrap_or_else(|e| fail(&e.to_string()));
            print!("{out}");
            return;
        }
        _ => {}
    }
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("tokio runtime");
    let result = rt.block_on(async {
        match mode.as_str() {
            "sse" => sse(&opts).await,
            "hold" => hold(&opts).await,
            "upload" => upload(&opts).await,
            "rate" => rate(&opts).await,
            "serial" => serial(&opts).await,
            other => Err(format!("unknown mode {other}").into()),
        }
    });
    match result {
        Ok(v) => println!("{v}"),
        Err(e) => fail(&e.to_string()),
    }
    // Held streams and their tasks go with the process.
    std::process::exit(0);
}

fn fail(msg: &str) -> ! {
    eprintln!("bench-client: {msg}");
    std::process::exit(1);
}

/// Flags, all `--name value` except `--content-length` and `--readme`; everything after `--` is a
/// command.
#[derive(Debug, Default)]
struct Opts {
    values: Vec<(String, String)>,
    switches: Vec<String>,
    command: Vec<String>,
}

impl Opts {
    fn parse(args: &[String]) -> Result<Self, String> {
        let mut opts = Opts::default();
        let mut it = args.iter();
        while let Some(arg) = it.next() {
            match arg.as_str() {
                "--" => {
                    opts.command = it.cloned().collect();
                    break;
                }
                "--content-length" | "--readme" => opts.switches.push(arg.clone()),
                flag if flag.starts_with("--") => {
                    let value = it.next().ok_or_else(|| format!("{flag} needs a value"))?;
                    opts.values.push((flag.trim_start_matches("--").to_string(), value.clone()));
                }
                other => return Err(format!("unexpected argument {other}")),
            }
        }
        Ok(opts)
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.values.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    fn num<T: std::str::FromStr>(&self, name: &str, default: T) -> Result<T, String> {
        match self.get(name) {
            None => Ok(default),
            Some(v) => v.parse().map_err(|_| format!("--{name} {v}: not a number")),
        }
    }

    fn url(&self) -> Result<Target, String> {
        Target::parse(self.get("url").ok_or("--url is required")?, self.get("ca-file"))
    }

    fn switch(&self, name: &str) -> bool {
        self.switches.iter().any(|s| s == name)
    }
}

/// Where requests go: a socket address, TLS for `https://`, and the request target.
#[derive(Clone)]
struct Target {
    addr: SocketAddr,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    authority: HeaderValue,
    path: Uri,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("addr", &self.addr)
            .field("tls", &self.tls.is_some())
            .field("authority", &self.authority)
            .field("path", &self.path)
            .finish()
    }
}

impl Target {
    fn parse(url: &str, ca_file: Option<&str>) -> Result<Self, String> {
        let uri: Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") | None => false,
            Some(other) => return Err(format!("{url}: unsupported scheme {other}")),
        };
        let authority = uri.authority().ok_or_else(|| format!("{url}: no host"))?;
        let host = if authority.host() == "localhost" { "127.0.0.1" } else { authority.host() };
        let addr = SocketAddr::new(
            host.parse().map_err(|_| format!("{url}: use an IP address"))?,
            authority.port_u16().unwrap_or(if https { 443 } else { 80 }),
        );
        let tls = if https {
            let ca = ca_file.ok_or_else(|| format!("{url}: https needs --ca-file"))?;
            let name =
                ServerName::try_from(authority.host().to_string()).map_err(|e| format!("{url}: {e}"))?;
            Some((tls_connector(ca)?, name))
        } else {
            None
        };
        let path = uri.path_and_query().map_or("/", |p| p.as_str()).parse().map_err(|e| format!("{e}"))?;
        Ok(Self {
            addr,
            tls,
            authority: HeaderValue::from_str(authority.as_str()).map_err(|e| e.to_string())?,
            path,
        })
    }

    fn request<B>(&self, method: Method, body: B, sdk_headers: bool) -> Request<B> {
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = self.path.clone();
        let h = req.headers_mut();
        h.insert(HOST, self.authority.clone());
        h.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if sdk_headers {
            for (k, v) in SDK_HEADERS {
                h.insert(HeaderName::from_static(k), HeaderValue::from_static(v));
            }
        }
        req
    }
}

/// A TLS client trusting only the PEM certificates in `ca_file`, ALPN `http/1.1`.
fn tls_connector(ca_file: &str) -> Result<TlsConnector, String> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca_file).map_err(|e| format!("--ca-file {ca_file}: {e}"))? {
        roots.add(cert.map_err(|e| format!("--ca-file {ca_file}: {e}"))?).map_err(|e| e.to_string())?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsConnector::from(Arc::new(config)))
}

/// One HTTP/1.1 connection with TCP_NODELAY (over TLS for `https://`), its driver spawned.
async fn connect<B>(target: &Target) -> Result<SendRequest<B>, BoxError>
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let stream = TcpStream::connect(target.addr).await?;
    stream.set_nodelay(true)?;
    match &target.tls {
        None => handshake(stream).await,
        Some((connector, name)) => handshake(connector.connect(name.clone(), stream).await?).await,
    }
}

async fn handshake<T, B>(io: T) -> Result<SendRequest<B>, BoxError>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<BoxError>,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

fn unix_nanos() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64)
}

/// Percentiles of a sample, in microseconds (nearest rank).
fn percentiles(samples: &mut [u64]) -> Value {
    samples.sort_unstable();
    let at = |p: f64| -> f64 {
        if samples.is_empty() {
            return f64::NAN;
        }
        let rank = ((p * samples.len() as f64).ceil() as usize).clamp(1, samples.len());
        (samples[rank - 1] as f64 / 1000.0 * 10.0).round() / 10.0
    };
    json!({
        "n": samples.len(),
        "p50_us": at(0.50), "p90_us": at(0.90), "p99_us": at(0.99), "p999_us": at(0.999),
        "max_us": at(1.0),
    })
}

/// What one SSE stream saw (nanoseconds).
#[derive(Debug, Default)]
struct StreamStats {
    ttfc: Option<u64>,
    gaps: Vec<u64>,
    delays: Vec<u64>,
    events: u64,
    done: bool,
}

/// Reads an SSE response, calling `on_first` after the first event.
async fn read_stream(
    mut body: Incoming,
    sent_at: Instant,
    mut on_first: impl FnMut(),
    record: bool,
) -> Result<StreamStats, BoxError> {
    let mut stats = StreamStats::default();
    let mut buf = BytesMut::new();
    let mut last: Option<Instant> = None;
    while let Some(frame) = body.frame().await {
        let frame = frame?;
        let Some(data) = frame.data_ref() else { continue };
        let now = Instant::now();
        let now_unix = unix_nanos();
        buf.extend_from_slice(data);
        while let Some(end) = buf.windows(2).position(|w| w == b"\n\n") {
            let event = buf.split_to(end + 2);
            if event.starts_with(b"data: [DONE]") {
                stats.done = true;
                continue;
            }
            stats.events += 1;
            if stats.ttfc.is_none() {
                stats.ttfc = Some(now.duration_since(sent_at).as_nanos() as u64);
                on_first();
            }
            if record {
                if let Some(prev) = last {
                    stats.gaps.push(now.duration_since(prev).as_nanos() as u64);
                }
                if let Some(t) = stamp(&event) {
                    stats.delays.push(now_unix.saturating_sub(t));
                }
            }
            last = Some(now);
        }
    }
    Ok(stats)
}

/// The `"t":<nanos>` stamp of an event.
fn stamp(event: &[u8]) -> Option<u64> {
    let at = event.windows(4).position(|w| w == b"\"t\":")? + 4;
    let digits: &[u8] = &event[at..];
    let len = digits.iter().take_while(|b| b.is_ascii_digit()).count();
    std::str::from_utf8(&digits[..len]).ok()?.parse().ok()
}

async fn open_stream(target: &Target) -> Result<(Incoming, Instant, SendRequest<Full<Bytes>>), BoxError> {
    let mut sender = connect::<Full<Bytes>>(target).await?;
    let req = target.request(Method::POST, Full::new(Bytes::from_static(SSE_BODY.as_bytes())), true);
    let sent_at = Instant::now();
    let resp = sender.send_request(req).await?;
    if resp.status() != StatusCode::OK {
        return Err(format!("status {}", resp.status()).into());
    }
    Ok((resp.into_body(), sent_at, sender))
}

async fn sse(opts: &Opts) -> Result<Value, BoxError> {
    let target = opts.url()?;
    let streams: usize = opts.num("streams", 100)?;
    let timeout = Duration::from_secs(opts.num("timeout-secs", 60)?);
    // Real streams do not start in the same instant, nor send in lockstep: spread the starts
    // (one a millisecond by default), so the figures are about streaming, not about a burst of
    // 100 connection openings; the streams still all run at once for most of their second.
    let stagger = Duration::from_millis(opts.num("stagger-ms", 100)?);
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..streams {
        let target = target.clone();
        let delay = stagger.mul_f64(k as f64 / streams as f64);
        tasks.spawn(async move {
            tokio::time::sleep(delay).await;
            let (body, sent_at, _sender) = open_stream(&target).await?;
            read_stream(body, sent_at, || {}, true).await
        });
    }
    let (mut ttfc, mut gaps, mut delays) = (Vec::new(), Vec::new(), Vec::new());
    let (mut ok, mut errors, mut events) = (0u64, Vec::new(), 0u64);
    let collect = async {
        while let Some(joined) = tasks.join_next().await {
            match joined.map_err(BoxError::from).and_then(|r| r) {
                Ok(s) if s.done => {
                    ok += 1;
                    events += s.events;
                    ttfc.extend(s.ttfc);
                    gaps.extend(s.gaps);
                    delays.extend(s.delays);
                }
                Ok(_) => errors.push("stream ended without [DONE]".to_string()),
                Err(e) => errors.push(e.to_string()),
            }
        }
    };
    if tokio::time::timeout(timeout, collect).await.is_err() {
        errors.push(format!("timed out after {timeout:?}"));
    }
    errors.truncate(5);
    Ok(json!({
        "mode": "sse", "streams": streams, "ok": ok, "events": events, "errors": errors,
        "ttfc": percentiles(&mut ttfc), "gap": percentiles(&mut gaps), "delay": percentiles(&mut delays),
    }))
}

async fn hold(opts: &Opts) -> Result<Value, BoxError> {
    let target = opts.url()?;
    let streams: usize = opts.num("streams", 1000)?;
    let seconds: u64 = opts.num("seconds", 30)?;
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let opening = Arc::new(Semaphore::new(opts.num("open-concurrency", 64)?));
    let opened = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    for _ in 0..streams {
        let (target, opening, opened, failed) =
            (target.clone(), Arc::clone(&opening), Arc::clone(&opened), Arc::clone(&failed));
        tokio::spawn(async move {
            let permit = opening.acquire_owned().await.ok();
            let outcome = async {
                let (body, sent_at, _sender) = open_stream(&target).await?;
                let mut permit = permit;
                let first = || {
                    opened.fetch_add(1, Ordering::Relaxed);
                    permit.take();
                };
                read_stream(body, sent_at, first, false).await
            };
            if outcome.await.is_err() {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    loop {
        let (o, f) = (opened.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
        if o + f >= streams as u64 || Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let line = json!({
        "mode": "hold", "open": opened.load(Ordering::Relaxed), "failed": failed.load(Ordering::Relaxed),
        "open_ms": start.elapsed().as_millis() as u64, "hold_secs": seconds,
    });
    // The caller waits for this line, measures, then kills us (or we leave at the deadline).
    println!("{line}");
    tokio::time::sleep_until(deadline).await;
    Ok(json!({"mode": "hold", "done": true, "failed": failed.load(Ordering::Relaxed)}))
}

async fn upload(opts: &Opts) -> Result<Value, BoxError> {
    let target = opts.url()?;
    let mib: u64 = opts.num("mib", 100)?;
    let chunk_kib: usize = opts.num("chunk-kib", 64)?;
    let total = mib * 1024 * 1024;
    let chunk = Bytes::from(vec![b'x'; chunk_kib * 1024]);
    let count = total.div_ceil(chunk.len() as u64);
    let chunks = futures_util::stream::iter((0..count).map(move |i| {
        let left = total - i * chunk.len() as u64;
        let piece = if left < chunk.len() as u64 { chunk.slice(..left as usize) } else { chunk.clone() };
        Ok::<_, std::convert::Infallible>(Frame::data(piece))
    }));
    let mut sender = connect::<StreamBody<_>>(&target).await?;
    let mut req = target.request(Method::POST, StreamBody::new(chunks), false);
    req.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
    if opts.switch("--content-length") {
        req.headers_mut().insert(http::header::CONTENT_LENGTH, HeaderValue::from(total));
    }
    let start = Instant::now();
    let timeout = Duration::from_secs(opts.num("timeout-secs", 120)?);
    let exchange = async {
        let resp = sender.send_request(req).await?;
        let status = resp.status();
        let body = resp.into_body().collect().await?.to_bytes();
        Ok::<_, BoxError>((status, body))
    };
    let (status, body) = tokio::time::timeout(timeout, exchange).await.map_err(|_| "upload timed out")??;
    let secs = start.elapsed().as_secs_f64();
    let echoed: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    Ok(json!({
        "mode": "upload", "status": status.as_u16(), "bytes": total, "echoed": echoed["bytes"],
        "secs": secs, "mib_per_s": mib as f64 / secs,
    }))
}

async fn rate(opts: &Opts) -> Result<Value, BoxError> {
    let target = opts.url()?;
    let rate: f64 = opts.num("rate", 1000.0)?;
    let connections: usize = opts.num("connections", 16)?;
    let seconds: f64 = opts.num("seconds", 5.0)?;
    let (body, method) = body_of(opts)?;
    let interval = Duration::from_secs_f64(connections as f64 / rate);
    // Connect and warm every connection (and the proxy's upstream pool) before the clock starts.
    let mut senders = Vec::with_capacity(connections);
    for _ in 0..connections {
        let mut s = connect::<Full<Bytes>>(&target).await?;
        let resp = s.send_request(target.request(method.clone(), Full::new(body.clone()), true)).await?;
        resp.into_body().collect().await?;
        senders.push(s);
    }
    let start = Instant::now() + Duration::from_millis(50);
    let end = start + Duration::from_secs_f64(seconds);
    let late = Arc::new(AtomicU64::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for (i, mut sender) in senders.into_iter().enumerate() {
        let (target, body, method, late) = (target.clone(), body.clone(), method.clone(), Arc::clone(&late));
        // Stagger the connections evenly over one interval.
        let offset = interval.mul_f64(i as f64 / connections as f64);
        tasks.spawn(async move {
            let mut latencies = Vec::new();
            let mut errors = 0u64;
            let mut n = 0u32;
            loop {
                let scheduled = start + offset + interval * n;
                if scheduled >= end {
                    break;
                }
                n += 1;
                tokio::time::sleep_until(scheduled).await;
                let sent = Instant::now();
                if sent.duration_since(scheduled) > Duration::from_millis(2) {
                    late.fetch_add(1, Ordering::Relaxed);
                }
                let req = target.request(method.clone(), Full::new(body.clone()), true);
                let result = async {
                    let resp = sender.send_request(req).await?;
                    let ok = resp.status() == StatusCode::OK;
                    resp.into_body().collect().await?;
                    Ok::<_, BoxError>(ok)
                };
                match result.await {
                    Ok(true) => latencies.push(sent.elapsed().as_nanos() as u64),
                    Ok(false) => errors += 1,
                    Err(_) => {
                        errors += 1;
                        break;
                    }
                }
            }
            (latencies, errors)
        });
    }
    let mut all = Vec::new();
    let mut errors = 0;
    let collect = async {
        while let Some(joined) = tasks.join_next().await {
            let (l, e) = joined?;
            all.extend(l);
            errors += e;
        }
        Ok::<_, BoxError>(())
    };
    tokio::time::timeout(Duration::from_secs_f64(seconds + 30.0), collect)
        .await
        .map_err(|_| "rate: timed out")??;
    let elapsed = start.elapsed().as_secs_f64().min(seconds + 30.0);
    let ok = all.len();
    Ok(json!({
        "mode": "rate", "target_rps": rate, "achieved_rps": ok as f64 / elapsed.max(seconds),
        "connections": connections, "ok": ok, "errors": errors, "late_sends": late.load(Ordering::Relaxed),
        "latency": percentiles(&mut all),
    }))
}

/// The request body of `--body FILE` (empty without), and the method that goes with it.
fn body_of(opts: &Opts) -> Result<(Bytes, Method), BoxError> {
    let body = match opts.get("body") {
        Some(path) => Bytes::from(std::fs::read(path).map_err(|e| format!("{path}: {e}"))?),
        None => Bytes::new(),
    };
    let method = if body.is_empty() { Method::GET } else { Method::POST };
    Ok((body, method))
}

async fn serial(opts: &Opts) -> Result<Value, BoxError> {
    let target = opts.url()?;
    let seconds: f64 = opts.num("seconds", 3.0)?;
    let warmup: u64 = opts.num("warmup", 200)?;
    let (body, method) = body_of(opts)?;
    let mut sender = connect::<Full<Bytes>>(&target).await?;
    let mut latencies = Vec::new();
    let (mut errors, mut n) = (0u64, 0u64);
    let mut start = Instant::now();
    let mut end = start + Duration::from_secs_f64(seconds);
    loop {
        if n == warmup {
            // The clock starts once the connection and the proxy's upstream pool are warm.
            start = Instant::now();
            end = start + Duration::from_secs_f64(seconds);
        } else if n > warmup && Instant::now() >= end {
            break;
        }
        let req = target.request(method.clone(), Full::new(body.clone()), true);
        let sent = Instant::now();
        let resp = sender.send_request(req).await?;
        let ok = resp.status() == StatusCode::OK;
        resp.into_body().collect().await?;
        if n >= warmup {
            if ok {
                latencies.push(sent.elapsed().as_nanos() as u64);
            } else {
                errors += 1;
            }
        }
        n += 1;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let ok = latencies.len();
    Ok(json!({
        "mode": "serial", "ok": ok, "errors": errors, "rps": ok as f64 / elapsed,
        "latency": percentiles(&mut latencies),
    }))
}

/// Sends `GET` and returns the status code, or `None` if nothing answers yet.
fn probe(addr: SocketAddr, authority: &str, path: &str) -> Option<u16> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).ok()?;
    s.set_read_timeout(Some(Duration::from_millis(500))).ok()?;
    write!(s, "GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n").ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}

fn startup(opts: &Opts) -> Result<Value, BoxError> {
    let target = Target::parse(opts.get("ready-url").ok_or("--ready-url is required")?, None)?;
    let runs: usize = opts.num("runs", 5)?;
    let timeout = Duration::from_secs(opts.num("timeout-secs", 10)?);
    let (program, args) = opts.command.split_first().ok_or("startup needs -- CMD [ARGS...]")?;
    let authority = target.authority.to_str()?.to_string();
    let path = target.path.to_string();
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        if probe(target.addr, &authority, &path).is_some() {
            return Err(format!("something already answers on {}", target.addr).into());
        }
        let start = std::time::Instant::now();
        let mut child =
            Command::new(program).args(args).stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
        let ready = loop {
            if probe(target.addr, &authority, &path) == Some(200) {
                break Some(start.elapsed());
            }
            if start.elapsed() > timeout || child.try_wait()?.is_some() {
                break None;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        // SIGTERM (a graceful stop lets nginx take its workers with it), SIGKILL if it lingers.
        let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
        let stop_deadline = std::time::Instant::now() + Duration::from_secs(5);
        while child.try_wait()?.is_none() {
            if std::time::Instant::now() > stop_deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let ready = ready.ok_or_else(|| format!("{program} was not ready within {timeout:?}"))?;
        times.push(ready.as_secs_f64() * 1000.0);
        // Let the port and the process table settle before the next spawn.
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(json!({
        "mode": "startup", "runs_ms": times, "median_ms": sorted[sorted.len() / 2],
        "min_ms": sorted[0], "max_ms": sorted[sorted.len() - 1],
    }))
}
