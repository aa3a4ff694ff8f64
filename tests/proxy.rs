//! The request path over real sockets: path mapping, header hygiene, streaming both ways, the
//! error statuses sidekey answers itself, cancellation, and a real OpenAI client library.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

/// Raw HTTP/1.1 over a socket, for requests reqwest would not send. Returns the response head and
/// whatever body arrived before the server closed or `WAIT` passed.
async fn raw(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut buf = Vec::new();
    let _ = timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).into_owned()
}

async fn echo_upstream() -> FakeUpstream {
    FakeUpstream::start(|req| async move {
        let len = req.into_body().collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
        json_response(200, &format!("{{\"received\":{len}}}"))
    })
    .await
}

#[tokio::test]
async fn maps_paths_and_queries_for_every_method() {
    let iam = FakeIam::start().await;
    let up = echo_upstream().await;
    // A base URL with a path prefix and a trailing slash.
    let base = format!("http://{}/api/gigacube/openai/v1/", up.addr);
    let sc = start_sidecar(config(&iam, &base)).await;
    sc.ready().await;
    let c = client();
    for (method, path) in [
        ("GET", "/v1/models?limit=2&after=a%2Fb"),
        ("POST", "/v1/chat/completions"),
        ("DELETE", "/v1/files/file-123"),
        ("PUT", "/v1/anything/else?x=1"),
        ("GET", "/v1/models/GigaChat/GigaChat-2-Max"),
    ] {
        let resp = c.request(method.parse().unwrap(), sc.url(path)).body("{}").send().await.unwrap();
        assert_eq!(resp.status(), 200, "{method} {path}");
    }
    let seen: Vec<(String, String)> =
        up.seen().iter().map(|s| (s.method.to_string(), s.uri.clone())).collect();
    assert_eq!(
        seen,
        [
            ("GET", "/api/gigacube/openai/v1/models?limit=2&after=a%2Fb"),
            ("POST", "/api/gigacube/openai/v1/chat/completions"),
            ("DELETE", "/api/gigacube/openai/v1/files/file-123"),
            ("PUT", "/api/gigacube/openai/v1/anything/else?x=1"),
            ("GET", "/api/gigacube/openai/v1/models/GigaChat/GigaChat-2-Max"),
        ]
        .map(|(m, u)| (m.to_string(), u.to_string()))
    );
}

#[tokio::test]
async fn header_hygiene() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let sc = start_sidecar(config(&iam, &up.base_url())).await;
    sc.ready().await;
    let request = format!(
        "POST /v1/chat/completions HTTP/1.1\r\nHost: {}\r\nAuthorization: Bearer sk-client-key\r\n\
         Connection: keep-alive, X-Hop-Secret\r\nX-Hop-Secret: 1\r\nKeep-Alive: timeout=5\r\n\
         Proxy-Authorization: Basic Zm9vOmJhcg==\r\nTE: trailers\r\nx-stainless-lang: python\r\n\
         OpenAI-Organization: org-1\r\nx-request-id: req-42\r\nContent-Type: application/json\r\n\
         Content-Length: 2\r\n\r\n{{}}",
        sc.proxy
    );
    let resp = raw(sc.proxy, request.as_bytes()).await;
    assert!(resp.starts_with("HTTP/1.1 200"), "{resp}");
    let seen = &up.seen()[0];
    let token = seen.bearer().expect("bearer token");
    assert!(iam.lookup(token).is_some(), "upstream got the IAM token, not the client's key");
    assert_eq!(seen.headers.get_all("authorization").iter().count(), 1);
    for gone in ["x-hop-secret", "keep-alive", "proxy-authorization", "te"] {
        assert!(!seen.headers.contains_key(gone), "{gone} must not reach upstream");
    }
    for (kept, value) in
        [("x-stainless-lang", "python"), ("openai-organization", "org-1"), ("x-request-id", "req-42")]
    {
        assert_eq!(seen.headers[kept], value);
    }
    assert_eq!(seen.headers["host"], up.addr.to_string());
}

#[tokio::test]
async fn sse_chunks_arrive_one_by_one() {
    let iam = FakeIam::start().await;
    let gap = Duration::from_millis(150);
    let up = FakeUpstream::start(move |_req| async move {
        let stream = futures_util::stream::unfold(0u32, move |i| async move {
            if i == 5 {
                return None;
            }
            if i > 0 {
                tokio::time::sleep(gap).await;
            }
            let chunk = Bytes::from(format!("data: {{\"i\":{i}}}\n\n"));
            Some((Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(chunk)), i + 1))
        });
        let mut resp = http::Response::new(BodyExt::boxed(StreamBody::new(stream)));
        resp.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
        resp
    })
    .await;
    let sc = start_sidecar(config(&iam, &up.base_url())).await;
    sc.ready().await;
    let start = Instant::now();
    let resp = client().post(sc.url("/v1/chat/completions")).body("{}").send().await.unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut arrivals = Vec::new();
    let mut body = String::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = timeout(WAIT, stream.next()).await.expect("chunk in time") {
        arrivals.push(start.elapsed());
        body.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
    }
    assert_eq!(body.matches("data: ").count(), 5);
    assert_eq!(arrivals.len(), 5, "each event arrives on its own: {arrivals:?}");
    for pair in arrivals.windows(2) {
        assert!(pair[1] - pair[0] >= Duration::from_millis(100), "events were held back: {arrivals:?}");
    }
    assert!(arrivals[0] < Duration::from_millis(500), "first event late: {arrivals:?}");
}

#[tokio::test]
async fn large_chunked_upload_is_streamed_through() {
    let iam = FakeIam::start().await;
    let up = echo_upstream().await;
    let sc = start_sidecar(config(&iam, &up.base_url())).await;
    sc.ready().await;
    const CHUNK: usize = 64 * 1024;
    const CHUNKS: usize = 256; // 16 MiB, sent without Content-Length
    let body = futures_util::stream::iter(
        (0..CHUNKS).map(|i| Ok::<_, std::io::Error>(Bytes::from(vec![i as u8; CHUNK]))),
    );
    let resp =
        client().post(sc.url("/v1/files")).body(reqwest::Body::wrap_stream(body)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), format!("{{\"received\":{}}}", CHUNK * CHUNKS));
}

#[tokio::test]
async fn body_over_the_limit_is_413_with_and_without_content_length() {
    let iam = FakeIam::start().await;
    let up = echo_upstream().await;
    let mut cfg = config(&iam, &up.base_url());
    cfg.server.max_request_body_bytes = 1024 * 1024;
    cfg.server.replay_buffer_bytes = 1024;
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    let c = client();
    // sidekey answers 413 on Content-Length before reading the body; under load the client may
    // still be writing when the connection closes, which is a clean refusal too.
    match c.post(sc.url("/v1/files")).body(vec![0u8; 1024 * 1024 + 1]).send().await {
        Ok(resp) => {
            assert_eq!(resp.status(), 413);
            let json: serde_json::Value = resp.json().await.unwrap();
            assert_eq!(json["error"]["code"], "request_too_large");
        }
        Err(e) => assert!(e.is_request() || e.is_body(), "{e}"),
    }
    assert_eq!(up.count(), 0, "rejected on Content-Length before going upstream");

    let chunks = futures_util::stream::iter(
        (0..40).map(|_| Ok::<_, std::io::Error>(Bytes::from(vec![1u8; 64 * 1024]))),
    );
    let resp = c.post(sc.url("/v1/files")).body(reqwest::Body::wrap_stream(chunks)).send().await;
    match resp {
        Ok(resp) => assert_eq!(resp.status(), 413),
        // The server may close while the client is still sending; that is a clean refusal too.
        Err(e) => assert!(e.is_request() || e.is_body(), "{e}"),
    }
    // sidekey keeps serving.
    assert_eq!(c.get(sc.url("/v1/models")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn outside_v1_is_404_with_a_hint() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let sc = start_sidecar(config(&iam, &up.base_url())).await;
    sc.ready().await;
    let resp = client().get(sc.url("/chat/completions")).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let json: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(json["error"]["type"], "sidekey_error");
    let message = json["error"]["message"].as_str().unwrap();
    assert!(message.contains(&format!("http://{}/v1", sc.proxy)), "{message}");
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn not_an_open_proxy_and_no_path_escape() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let sc = start_sidecar(config(&iam, &up.base_url())).await;
    sc.ready().await;
    let absolute = raw(
        sc.proxy,
        b"GET http://example.com/v1/models HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(absolute.starts_with("HTTP/1.1 400"), "{absolute}");
    let connect = raw(sc.proxy, b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n").await;
    assert!(connect.starts_with("HTTP/1.1 400"), "{connect}");
    for path in
        ["/v1/../admin", "/v1/%2e%2e/admin", "/v1/models/..%2f..%2fadmin", "/v1/.#/admin", "/v1/..\\admin"]
    {
        let req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n");
        let resp = raw(sc.proxy, req.as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 400") || resp.starts_with("HTTP/1.1 404"), "{path}: {resp}");
    }
    assert_eq!(up.count(), 0, "nothing reached upstream");
}

#[tokio::test]
async fn unreachable_upstream_is_a_fast_502() {
    let iam = FakeIam::start().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let sc = start_sidecar(config(&iam, &format!("http://{addr}/v1"))).await;
    sc.ready().await;
    let start = Instant::now();
    let resp = client().get(sc.url("/v1/models")).send().await.unwrap();
    assert_eq!(resp.status(), 502);
    assert!(start.elapsed() < Duration::from_secs(2), "took {:?}", start.elapsed());
    let json: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(json["error"]["code"], "upstream_unreachable");
}

#[tokio::test]
async fn silent_upstream_is_504() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::start(|_req| async {
        tokio::time::sleep(Duration::from_secs(30)).await;
        json_response(200, "{}")
    })
    .await;
    let mut cfg = config(&iam, &up.base_url());
    cfg.upstream.idle_timeout_secs = 1;
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    let start = Instant::now();
    let resp = client().get(sc.url("/v1/models")).send().await.unwrap();
    assert_eq!(resp.status(), 504);
    let elapsed = start.elapsed();
    assert!(elapsed >= Duration::from_millis(900) && elapsed < Duration::from_secs(5), "{elapsed:?}");
}

/// Signals when dropped: the upstream handler or stream it lives in was cancelled.
struct DropSignal(Option<tokio::sync::oneshot::Sender<()>>);
impl Drop for DropSignal {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

#[tokio::test]
async fn client_disconnect_cancels_the_upstream_call() {
    let iam = FakeIam::start().await;
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel::<tokio::sync::oneshot::Receiver<()>>();
    let up = FakeUpstream::start(move |req| {
        let (done_tx, done_rx) = tokio::sync::oneshot::channel();
        tx.send(done_rx).unwrap();
        let streaming = req.uri().path().ends_with("stream");
        async move {
            let guard = DropSignal(Some(done_tx));
            if !streaming {
                // Waiting for headers: hold the request until cancelled.
                tokio::time::sleep(Duration::from_secs(60)).await;
                drop(guard);
                return json_response(200, "{}");
            }
            let stream = futures_util::stream::unfold(guard, |g| async move {
                tokio::time::sleep(Duration::from_millis(50)).await;
                Some((
                    Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(Bytes::from_static(
                        b"data: {}\n\n",
                    ))),
                    g,
                ))
            });
            let mut resp = http::Response::new(BodyExt::boxed(StreamBody::new(stream)));
            resp.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
            resp
        }
    })
    .await;
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let sc = start_sidecar(config(&iam, &up.base_url())).await;
    sc.ready().await;

    // 1. The client gives up while sidekey waits for upstream headers.
    let c = client();
    let pending = c.get(sc.url("/v1/wait")).send();
    let _ = timeout(Duration::from_millis(300), pending).await;
    let cancelled = rx.lock().await.recv().await.unwrap();
    timeout(WAIT, cancelled).await.expect("upstream call cancelled").ok();

    // 2. The client drops a stream after two events.
    let resp = c.get(sc.url("/v1/stream")).send().await.unwrap();
    let mut stream = resp.bytes_stream();
    for _ in 0..2 {
        timeout(WAIT, stream.next()).await.unwrap().unwrap().unwrap();
    }
    drop(stream);
    let cancelled = rx.lock().await.recv().await.unwrap();
    timeout(WAIT, cancelled).await.expect("upstream stream cancelled").ok();
    let metrics = sc.metrics.clone();
    eventually("in-flight back to 0", || metrics.inflight_requests.get() == 0).await;
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let sc = start_sidecar(config(&iam, &up.base_url())).await;
    sc.ready().await;
    let h2 = reqwest::Client::builder().http2_prior_knowledge().no_proxy().timeout(WAIT).build().unwrap();
    let resp = h2.get(sc.url("/v1/models")).send().await.unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    assert!(up.seen()[0].bearer().is_some());
}

#[tokio::test]
async fn requests_and_durations_are_counted() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let sc = start_sidecar(config(&iam, &up.base_url())).await;
    sc.ready().await;
    let c = client();
    for _ in 0..3 {
        assert_eq!(c.post(sc.url("/v1/embeddings")).body("{}").send().await.unwrap().status(), 200);
    }
    assert_eq!(c.get(sc.url("/nope")).send().await.unwrap().status(), 404);
    let text = c.get(sc.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert_eq!(metric_value(&text, r#"sidekey_requests_total{code="200",endpoint="embeddings"}"#), 3.0);
    assert_eq!(metric_value(&text, r#"sidekey_requests_total{code="404",endpoint="other"}"#), 1.0);
    assert_eq!(metric_value(&text, r#"sidekey_request_duration_seconds_count{endpoint="embeddings"}"#), 3.0);
    assert_eq!(metric_value(&text, r#"sidekey_upstream_response_seconds_count{endpoint="embeddings"}"#), 3.0);
    assert_eq!(metric_value(&text, "sidekey_inflight_requests"), 0.0);
    assert_eq!(metric_value(&text, r#"sidekey_build_info{version="0.1.0"}"#), 1.0);
}

#[tokio::test]
async fn a_real_openai_client_streams_and_not() {
    use async_openai::config::OpenAIConfig;
    use async_openai::types::chat::{ChatCompletionRequestUserMessageArgs, CreateChatCompletionRequestArgs};

    let demo = sidekey::dev::DemoServers::start(Duration::from_secs(3600)).await.unwrap();
    let mut cfg = sidekey::Config::default();
    cfg.server.listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.admin_listen = "127.0.0.1:0".parse().unwrap();
    demo.configure(&mut cfg);
    let sc = start_sidecar(cfg).await;
    sc.ready().await;

    let openai = async_openai::Client::with_config(
        OpenAIConfig::new().with_api_base(sc.url("/v1")).with_api_key("unused"),
    );
    let request = CreateChatCompletionRequestArgs::default()
        .model("demo/echo")
        .messages([ChatCompletionRequestUserMessageArgs::default()
            .content("hello sidekey")
            .build()
            .unwrap()
            .into()])
        .build()
        .unwrap();
    let resp = timeout(WAIT, openai.chat().create(request.clone())).await.unwrap().unwrap();
    assert_eq!(resp.choices[0].message.content.as_deref(), Some("echo: hello sidekey"));

    let mut stream = timeout(WAIT, openai.chat().create_stream(request)).await.unwrap().unwrap();
    let mut text = String::new();
    let mut chunks = 0;
    while let Some(chunk) = timeout(WAIT, stream.next()).await.unwrap() {
        let chunk = chunk.unwrap();
        chunks += 1;
        for choice in chunk.choices {
            text.push_str(choice.delta.content.as_deref().unwrap_or(""));
        }
    }
    assert_eq!(text, "echo: hello sidekey");
    assert!(chunks >= 4, "{chunks} chunks");
}

#[tokio::test]
async fn many_keep_alive_connections_are_fine() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let sc = start_sidecar(config(&iam, &up.base_url())).await;
    sc.ready().await;
    let ok = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (url, ok) = (sc.url("/v1/models"), Arc::clone(&ok));
        tasks.push(tokio::spawn(async move {
            let c = client();
            for _ in 0..5 {
                if c.get(&url).send().await.map(|r| r.status() == 200).unwrap_or(false) {
                    ok.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        timeout(WAIT, t).await.unwrap().unwrap();
    }
    assert_eq!(ok.load(Ordering::Relaxed), 250);
}

#[tokio::test]
async fn max_inflight_queues_then_answers_429() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::start(|req| async move {
        let delay: u64 = req.headers()["x-delay-ms"].to_str().unwrap().parse().unwrap();
        tokio::time::sleep(Duration::from_millis(delay)).await;
        json_response(200, "{}")
    })
    .await;
    let mut cfg = config(&iam, &up.base_url());
    cfg.server.max_inflight = Some(2);
    cfg.server.queue_timeout_ms = 300;
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    let send = |delay_ms: u64| {
        let url = sc.url("/v1/chat/completions");
        tokio::spawn(async move {
            let start = Instant::now();
            let resp = client().post(url).header("x-delay-ms", delay_ms).body("{}").send().await.unwrap();
            (resp, start.elapsed())
        })
    };

    // Two slow requests hold both slots; a third waits 300 ms, then gets 429.
    let (a, b) = (send(800), send(800));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let c = send(0);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(sc.metric("sidekey_queue_depth"), 1.0, "the third request waits");
    let (rejected, waited) = timeout(WAIT, c).await.unwrap().unwrap();
    assert_eq!(rejected.status(), 429);
    assert!(waited >= Duration::from_millis(280), "{waited:?}");
    assert_eq!(rejected.headers()["retry-after"], "1");
    let json: serde_json::Value = rejected.json().await.unwrap();
    assert_eq!(json["error"]["code"], "too_many_requests");
    for r in [a, b] {
        assert_eq!(timeout(WAIT, r).await.unwrap().unwrap().0.status(), 200);
    }
    assert_eq!(sc.metric("sidekey_queue_rejections_total"), 1.0);
    assert_eq!(sc.metric("sidekey_queue_depth"), 0.0);

    // Short requests free a slot within the queue's budget: the third is served after waiting.
    let (a, b) = (send(150), send(150));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let (served, waited) = timeout(WAIT, send(0)).await.unwrap().unwrap();
    assert_eq!(served.status(), 200);
    assert!(waited >= Duration::from_millis(50), "it queued: {waited:?}");
    for r in [a, b] {
        assert_eq!(timeout(WAIT, r).await.unwrap().unwrap().0.status(), 200);
    }
    assert_eq!(up.count(), 5);
}

#[tokio::test]
async fn browsers_and_foreign_host_names_are_refused() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let mut cfg = config(&iam, &up.base_url());
    cfg.server.allowed_hosts = vec!["sidekey.internal".into()];
    cfg.server.allowed_origins = vec!["http://localhost:3000".into()];
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    let port = sc.proxy.port();
    let get = |host: String, origin: Option<&str>| {
        let origin = origin.map(|o| format!("Origin: {o}\r\n")).unwrap_or_default();
        format!("GET /v1/models HTTP/1.1\r\nHost: {host}\r\n{origin}Connection: close\r\n\r\n")
    };
    for (host, origin, want) in [
        (format!("127.0.0.1:{port}"), None, "200"),
        (format!("localhost:{port}"), None, "200"),
        (format!("[::1]:{port}"), None, "200"),
        ("sidekey.internal".to_string(), None, "200"),
        (format!("evil.example:{port}"), None, "403"),
        (format!("127.0.0.1:{port}"), Some("https://evil.example"), "403"),
        (format!("127.0.0.1:{port}"), Some("http://localhost:3000"), "200"),
    ] {
        let resp = raw(sc.proxy, get(host.clone(), origin).as_bytes()).await;
        assert!(resp.starts_with(&format!("HTTP/1.1 {want}")), "{host} {origin:?}: {resp}");
    }
    assert_eq!(up.count(), 5);
}
