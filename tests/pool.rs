//! The proxy's upstream connection pool (src/client/pool.rs) against real sockets: reuse,
//! upstreams that close idle connections, idle expiry, bodies dropped half-read, and HTTPS with
//! HTTP/2 or HTTP/1.1 by ALPN (a private CA through `upstream.ca_file`).

mod support;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// What the raw upstream does after answering a request.
#[derive(Clone, Copy, PartialEq)]
enum After {
    /// Waits for the next request on the same connection.
    KeepAlive,
    /// Closes the connection without saying so (no `Connection: close`): a keep-alive
    /// timeout on the upstream's side, racing sidekey's next request.
    SilentClose,
    /// Answers as soon as the head is in, then stops reading (the request body, if any, stays
    /// unread on that connection).
    EarlyAnswer,
}

/// A raw HTTP/1.1 upstream that counts connections accepted and closed by the peer.
struct RawUpstream {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    /// Every request's first line and `Host` header, lower-cased.
    heads: Arc<std::sync::Mutex<Vec<(String, String)>>>,
    /// Connections on which the upstream read EOF (sidekey closed them).
    closed_by_peer: Arc<AtomicUsize>,
}

impl RawUpstream {
    async fn start(after: After, body: &'static [u8]) -> Self {
        Self::start_with(after, body, Duration::ZERO).await
    }

    /// Like [`RawUpstream::start`], answering each request `delay` after reading it.
    async fn start_with(after: After, body: &'static [u8], delay: Duration) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let closed_by_peer = Arc::new(AtomicUsize::new(0));
        let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (a, c, h) = (Arc::clone(&accepted), Arc::clone(&closed_by_peer), Arc::clone(&heads));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { return };
                a.fetch_add(1, Ordering::SeqCst);
                let raw = Raw { after, body, delay, closed: Arc::clone(&c), heads: Arc::clone(&h) };
                tokio::spawn(serve_raw(stream, raw));
            }
        });
        Self { addr, accepted, closed_by_peer, heads }
    }

    fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

struct Raw {
    after: After,
    body: &'static [u8],
    delay: Duration,
    closed: Arc<AtomicUsize>,
    heads: Arc<std::sync::Mutex<Vec<(String, String)>>>,
}

async fn serve_raw(mut stream: TcpStream, raw: Raw) {
    let Raw { after, body, delay, closed, heads } = raw;
    let mut buf = Vec::new();
    loop {
        // One request: the head, then a Content-Length body.
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => {
                    closed.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let line = head.lines().next().unwrap_or_default().to_string();
        let host = head.lines().find_map(|l| l.strip_prefix("host:")).unwrap_or_default().trim().to_string();
        heads.lock().unwrap().push((line, host));
        let mut answer = format!(
            "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        answer.extend_from_slice(body);
        if after == After::EarlyAnswer {
            let _ = stream.write_all(&answer).await;
            // Holds the connection, reading nothing more.
            tokio::time::sleep(WAIT * 2).await;
            return;
        }
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse().unwrap_or(0)))
            .unwrap_or(0);
        while buf.len() < head_end + length {
            let mut chunk = [0u8; 4096];
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + length);
        tokio::time::sleep(delay).await;
        if stream.write_all(&answer).await.is_err() {
            return;
        }
        if after == After::SilentClose {
            return;
        }
    }
}

const BODY: &[u8] = br#"{"id":"x","object":"chat.completion","choices":[]}"#;

fn one_worker(mut c: sidekey::Config) -> sidekey::Config {
    // One worker, one pool: connection counts are exact.
    c.server.worker_threads = Some(1);
    c
}

async fn post(url: &str) -> reqwest::Response {
    client()
        .post(url)
        .header("content-type", "application/json")
        .body(r#"{"model":"m","messages":[]}"#)
        .send()
        .await
        .unwrap()
}

#[tokio::test]
async fn sequential_requests_reuse_one_upstream_connection() {
    let iam = FakeIam::start().await;
    let up = RawUpstream::start(After::KeepAlive, BODY).await;
    let sk = start_sidecar(one_worker(config(&iam, &up.base_url()))).await;
    sk.ready().await;
    for _ in 0..20 {
        let resp = post(&sk.url("/v1/chat/completions")).await;
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.bytes().await.unwrap(), BODY);
    }
    assert_eq!(up.accepted.load(Ordering::SeqCst), 1, "one pooled connection serves them all");
    // HTTP/1.1 requests go out in origin form with the upstream's Host, as hyper-util did.
    for (line, host) in up.heads.lock().unwrap().iter() {
        assert_eq!(line, "post /v1/chat/completions http/1.1");
        assert_eq!(host, &up.addr.to_string());
    }
    sk.shutdown().await;
}

#[tokio::test]
async fn an_upstream_closing_idle_connections_costs_no_request() {
    let iam = FakeIam::start().await;
    let up = RawUpstream::start(After::SilentClose, BODY).await;
    let sk = start_sidecar(one_worker(config(&iam, &up.base_url()))).await;
    sk.ready().await;
    for i in 0..50 {
        let resp = post(&sk.url("/v1/chat/completions")).await;
        assert_eq!(resp.status(), 200, "request {i}");
        assert_eq!(resp.bytes().await.unwrap(), BODY);
    }
    assert_eq!(up.accepted.load(Ordering::SeqCst), 50, "a closed connection is never reused");
    sk.shutdown().await;
}

#[tokio::test]
async fn idle_connections_close_after_the_pool_idle_timeout() {
    let iam = FakeIam::start().await;
    let up = RawUpstream::start(After::KeepAlive, BODY).await;
    let mut c = one_worker(config(&iam, &up.base_url()));
    c.upstream.pool_idle_timeout_secs = 1;
    let sk = start_sidecar(c).await;
    sk.ready().await;
    assert_eq!(post(&sk.url("/v1/chat/completions")).await.status(), 200);
    let closed = Arc::clone(&up.closed_by_peer);
    // No request comes to notice it: the worker's sweeper closes it.
    eventually("the idle connection closed", || closed.load(Ordering::SeqCst) == 1).await;
    assert_eq!(post(&sk.url("/v1/chat/completions")).await.status(), 200);
    assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
    sk.shutdown().await;
}

#[tokio::test]
async fn a_body_dropped_half_read_does_not_poison_the_pool() {
    let iam = FakeIam::start().await;
    // A stream the client walks away from after its first event.
    let up = FakeUpstream::start(|_req| async {
        let stream = futures_util::stream::unfold(0u32, |i| async move {
            if i > 0 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            let chunk = bytes::Bytes::from(format!("data: {{\"i\":{i}}}\n\n"));
            Some((Ok::<_, Box<dyn std::error::Error + Send + Sync>>(http_body::Frame::data(chunk)), i + 1))
        });
        let body = http_body_util::StreamBody::new(stream);
        let mut resp = http::Response::new(http_body_util::BodyExt::boxed(body));
        resp.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
        resp
    })
    .await;
    let sk = start_sidecar(one_worker(config(&iam, &up.base_url()))).await;
    sk.ready().await;
    let mut resp = post(&sk.url("/v1/chat/completions")).await;
    assert_eq!(resp.status(), 200);
    let first = tokio::time::timeout(WAIT, resp.chunk()).await.unwrap().unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    drop(resp);
    // The next request gets a whole answer, on a connection that is not the abandoned one.
    let mut resp = post(&sk.url("/v1/chat/completions")).await;
    assert_eq!(resp.status(), 200);
    let next = tokio::time::timeout(WAIT, resp.chunk()).await.unwrap().unwrap().unwrap();
    assert!(next.starts_with(b"data: {\"i\":0}"), "{next:?}");
    sk.shutdown().await;
}

#[tokio::test]
async fn a_connection_still_sending_a_body_is_not_handed_to_the_next_request() {
    let iam = FakeIam::start().await;
    // Answers at once and never reads the upload: the first request's connection stays busy
    // writing its body after its response has ended.
    let up = RawUpstream::start(After::EarlyAnswer, BODY).await;
    let sk = start_sidecar(one_worker(config(&iam, &up.base_url()))).await;
    sk.ready().await;
    let chunks = futures_util::stream::unfold(0u32, |i| async move {
        tokio::time::sleep(Duration::from_millis(if i == 0 { 0 } else { 50 })).await;
        Some((Ok::<_, std::io::Error>(bytes::Bytes::from(vec![b'x'; 16 * 1024])), i + 1))
    });
    let upload = client()
        .post(sk.url("/v1/files"))
        .header("content-type", "application/octet-stream")
        .body(reqwest::Body::wrap_stream(chunks))
        .send()
        .await
        .unwrap();
    assert_eq!(upload.status(), 200);
    assert_eq!(upload.bytes().await.unwrap(), BODY);
    // The next request must not wait behind that upload (it would until a timeout).
    let next = tokio::time::timeout(Duration::from_secs(5), post(&sk.url("/v1/chat/completions")))
        .await
        .expect("answered without waiting for the busy connection");
    assert_eq!(next.status(), 200);
    assert_eq!(up.accepted.load(Ordering::SeqCst), 2);
    sk.shutdown().await;
}

#[tokio::test]
async fn idle_connections_beyond_pool_max_idle_per_host_are_closed() {
    let iam = FakeIam::start().await;
    // Slow answers, so a burst needs several connections at once.
    let up = RawUpstream::start_with(After::KeepAlive, BODY, Duration::from_millis(300)).await;
    let mut c = one_worker(config(&iam, &up.base_url()));
    c.upstream.pool_max_idle_per_host = 1;
    let sk = start_sidecar(c).await;
    sk.ready().await;
    let burst = (0..4).map(|_| {
        let url = sk.url("/v1/chat/completions");
        async move { post(&url).await.status() }
    });
    for status in futures_util::future::join_all(burst).await {
        assert_eq!(status, 200);
    }
    assert_eq!(up.accepted.load(Ordering::SeqCst), 4);
    let closed = Arc::clone(&up.closed_by_peer);
    eventually("all but one idle connection closed", || closed.load(Ordering::SeqCst) == 3).await;
    assert_eq!(post(&sk.url("/v1/chat/completions")).await.status(), 200);
    assert_eq!(up.accepted.load(Ordering::SeqCst), 4, "the one kept is reused");
    sk.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// HTTPS upstream, private CA, HTTP/2 or HTTP/1.1 by ALPN.

const CA: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/ca.pem");
const CERT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/upstream.pem");
const KEY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/upstream.key");

/// An HTTPS upstream offering h2 and HTTP/1.1; records the version of every request and counts
/// TLS connections.
struct TlsUpstream {
    addr: std::net::SocketAddr,
    accepted: Arc<AtomicUsize>,
    versions: Arc<std::sync::Mutex<Vec<http::Version>>>,
}

impl TlsUpstream {
    async fn start() -> Self {
        use rustls_pki_types::pem::PemObject;
        let certs = rustls_pki_types::CertificateDer::pem_file_iter(CERT)
            .unwrap()
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = rustls_pki_types::PrivateKeyDer::from_pem_file(KEY).unwrap();
        let mut tls =
            rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_no_client_auth()
                .with_single_cert(certs, key)
                .unwrap();
        tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicUsize::new(0));
        let versions = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (a, v) = (Arc::clone(&accepted), Arc::clone(&versions));
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else { return };
                a.fetch_add(1, Ordering::SeqCst);
                let (acceptor, v) = (acceptor.clone(), Arc::clone(&v));
                tokio::spawn(async move {
                    let Ok(tls) = acceptor.accept(tcp).await else { return };
                    let service =
                        hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                            v.lock().unwrap().push(req.version());
                            async move {
                                let mut resp = http::Response::new(http_body_util::Full::new(
                                    bytes::Bytes::from_static(BODY),
                                ));
                                resp.headers_mut()
                                    .insert("content-type", "application/json".parse().unwrap());
                                Ok::<_, std::convert::Infallible>(resp)
                            }
                        });
                    let _ =
                        hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                            .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                            .await;
                });
            }
        });
        Self { addr, accepted, versions }
    }
}

async fn tls_run(http2: bool) -> (usize, Vec<http::Version>) {
    let iam = FakeIam::start().await;
    let up = TlsUpstream::start().await;
    let mut c = one_worker(config(&iam, &format!("https://localhost:{}/v1", up.addr.port())));
    c.upstream.ca_file = Some(CA.into());
    c.upstream.http2 = http2;
    let sk = start_sidecar(c).await;
    sk.ready().await;
    // One first, so the connection exists; then a burst that h2 multiplexes.
    assert_eq!(post(&sk.url("/v1/chat/completions")).await.status(), 200);
    let burst = (0..16).map(|_| {
        let url = sk.url("/v1/chat/completions");
        async move {
            let resp = post(&url).await;
            (resp.status(), resp.bytes().await.unwrap())
        }
    });
    for (status, body) in futures_util::future::join_all(burst).await {
        assert_eq!((status.as_u16(), &body[..]), (200, BODY));
    }
    let connections = up.accepted.load(Ordering::SeqCst);
    // Warm now: one more request opens no connection.
    assert_eq!(post(&sk.url("/v1/chat/completions")).await.status(), 200);
    assert_eq!(up.accepted.load(Ordering::SeqCst), connections, "a pooled connection serves it");
    let versions = up.versions.lock().unwrap().clone();
    sk.shutdown().await;
    (connections, versions)
}

#[tokio::test]
async fn https_upstream_gets_one_multiplexed_h2_connection() {
    let (connections, versions) = tls_run(true).await;
    assert_eq!(versions.len(), 18);
    assert!(versions.iter().all(|v| *v == http::Version::HTTP_2), "{versions:?}");
    assert_eq!(connections, 1, "every request shares the h2 connection");
}

#[tokio::test]
async fn https_upstream_over_http1_when_h2_is_off() {
    let (connections, versions) = tls_run(false).await;
    assert_eq!(versions.len(), 18);
    assert!(versions.iter().all(|v| *v == http::Version::HTTP_11), "{versions:?}");
    assert!((1..=17).contains(&connections), "{connections} connections");
}
