//! Hostile and malformed input: bad HTTP, oversized request lines and headers, slow headers, a
//! connection flood; sidekey answers with a clear 4xx or closes, and keeps serving.

mod support;

use std::time::Duration;

use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

/// Sends raw bytes and returns the status line (or "" if the server closed without answering).
async fn status_line(addr: std::net::SocketAddr, request: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(request).await;
    let mut buf = Vec::new();
    let _ = timeout(Duration::from_secs(5), s.read_to_end(&mut buf)).await;
    String::from_utf8_lossy(&buf).lines().next().unwrap_or_default().to_string()
}

async fn sidecar_with(tweak: impl FnOnce(&mut sidekey::Config)) -> (Sidecar, FakeUpstream, FakeIam) {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let mut cfg = config(&iam, &up.base_url());
    tweak(&mut cfg);
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    (sc, up, iam)
}

async fn still_serving(sc: &Sidecar) {
    assert_eq!(client().get(sc.url("/v1/models")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn malformed_and_oversized_requests_get_a_clear_4xx() {
    let (sc, up, _iam) = sidecar_with(|c| c.server.max_headers = 20).await;
    let mut cases = vec![
        ("garbage", b"GARBAGE\r\n\r\n".to_vec(), "400"),
        ("bad version", b"GET /v1/models HTTP/9.9\r\n\r\n".to_vec(), "400"),
        ("header without colon", b"GET /v1/models HTTP/1.1\r\nHost x\r\n\r\n".to_vec(), "400"),
        (
            "bad content-length",
            b"POST /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n".to_vec(),
            "400",
        ),
    ];
    let long_uri = format!("GET /v1/{} HTTP/1.1\r\nHost: x\r\n\r\n", "a".repeat(100 * 1024));
    cases.push(("request line over the limit", long_uri.into_bytes(), "431"));
    let big_header =
        format!("GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n", "b".repeat(100 * 1024));
    cases.push(("header over the limit", big_header.into_bytes(), "431"));
    let many: String = (0..30).map(|i| format!("X-H{i}: v\r\n")).collect();
    cases.push((
        "too many headers",
        format!("GET /v1/models HTTP/1.1\r\nHost: x\r\n{many}\r\n").into_bytes(),
        "431",
    ));
    let mut figures = Vec::new();
    for (name, request, want) in cases {
        let line = status_line(sc.proxy, &request).await;
        figures.push(format!("{name}: {line}"));
        assert!(line.starts_with(&format!("HTTP/1.1 {want}")), "{name}: got {line:?}");
    }
    println!("figures: hostile input: {}", figures.join("; "));
    assert_eq!(up.count(), 0);
    still_serving(&sc).await;
}

#[tokio::test]
async fn slow_headers_are_cut_off() {
    let (sc, _up, _iam) = sidecar_with(|c| c.server.header_read_timeout_secs = 1).await;
    let mut s = TcpStream::connect(sc.proxy).await.unwrap();
    s.write_all(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let start = Instant::now();
    let mut buf = Vec::new();
    // Trickle a byte now and then; the deadline is for the whole header.
    let read = async {
        loop {
            let mut chunk = [0u8; 1024];
            tokio::select! {
                n = s.read(&mut chunk) => match n {
                    Ok(0) | Err(_) => break,
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                },
                _ = tokio::time::sleep(Duration::from_millis(300)) => {
                    if s.write_all(b"X-Slow: 1\r\n").await.is_err() { break; }
                }
            }
        }
    };
    timeout(Duration::from_secs(10), read).await.expect("connection closed by sidekey");
    let took = start.elapsed();
    println!(
        "figures: slowloris: closed after {took:?} ({})",
        String::from_utf8_lossy(&buf).lines().next().unwrap_or("no response")
    );
    assert!(took < Duration::from_secs(3), "{took:?}");
    still_serving(&sc).await;
}

#[tokio::test]
async fn the_admin_port_spends_no_credentials() {
    let (sc, up, _iam) = sidecar_with(|_| {}).await;
    for path in ["/v1/models", "/v1/chat/completions", "/"] {
        let resp = client().get(sc.admin_url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 404, "{path}");
    }
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn many_idle_keep_alive_connections_do_not_block_others() {
    let (sc, _up, _iam) = sidecar_with(|_| {}).await;
    let mut idle = Vec::new();
    for _ in 0..500 {
        idle.push(TcpStream::connect(sc.proxy).await.unwrap());
    }
    let start = Instant::now();
    for _ in 0..20 {
        still_serving(&sc).await;
    }
    println!("figures: 500 idle connections held; 20 requests served in {:?}", start.elapsed());
    drop(idle);
}

#[tokio::test]
async fn busy_connections_make_new_ones_wait_and_idle_ones_make_room() {
    let iam = FakeIam::start().await;
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let r = std::sync::Arc::clone(&release);
    let up = FakeUpstream::start(move |req| {
        let r = std::sync::Arc::clone(&r);
        async move {
            if req.uri().path().ends_with("/hang") {
                r.notified().await;
            }
            json_response(200, r#"{"ok":true}"#)
        }
    })
    .await;
    let mut cfg = config(&iam, &up.base_url());
    cfg.server.max_connections = 4;
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    // Silent sockets fill every slot, yet a new request gets in: the oldest idle one makes room.
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(TcpStream::connect(sc.proxy).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let served = timeout(Duration::from_secs(2), client().get(sc.url("/v1/models")).send()).await;
    assert_eq!(served.expect("served while idle sockets filled the limit").unwrap().status(), 200);
    drop(idle);
    // Four requests in flight hold every slot: a fifth connection waits until one ends.
    let mut busy = Vec::new();
    for _ in 0..4 {
        let url = sc.url("/v1/hang");
        busy.push(tokio::spawn(
            async move { reqwest::Client::new().get(url).send().await.map(|r| r.status()) },
        ));
    }
    let up2 = up.clone();
    eventually("four requests in flight", || up2.count() >= 5).await;
    let url = sc.url("/v1/models");
    let queued = tokio::spawn(async move {
        let start = Instant::now();
        let c = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(0).build().unwrap();
        (c.get(url).send().await.unwrap().status(), start.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!queued.is_finished(), "the fifth connection waits while all four are busy");
    release.notify_waiters();
    let (status, waited) = timeout(WAIT, queued).await.unwrap().unwrap();
    assert_eq!(status, 200);
    for b in busy {
        assert_eq!(timeout(WAIT, b).await.unwrap().unwrap().unwrap(), 200);
    }
    println!(
        "figures: connection limit: max_connections=4 filled by silent sockets, a new request served at once; \
         filled by 4 requests in flight, a 5th waited {waited:?} for one to finish"
    );
}

#[tokio::test]
async fn browsers_and_trace_are_refused_on_both_listeners() {
    let (sc, up, _iam) = sidecar_with(|c| c.server.enable_quit_endpoint = true).await;
    let c = client();
    for site in ["cross-site", "same-site"] {
        let resp = c.get(sc.url("/v1/models")).header("sec-fetch-site", site).send().await.unwrap();
        assert_eq!(resp.status(), 403, "{site}");
    }
    let resp = c.get(sc.url("/v1/models")).header("sec-fetch-site", "none").send().await.unwrap();
    assert_eq!(resp.status(), 200, "typed in the address bar");
    for method in ["TRACE", "TRACK"] {
        let line = status_line(
            sc.proxy,
            format!("{method} /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").as_bytes(),
        )
        .await;
        assert!(line.contains("405"), "{method}: {line}");
    }
    // The admin port: no cross-site quit, no DNS-rebound metrics, probes by pod IP still work.
    let quit =
        c.post(sc.admin_url("/quitquitquit")).header("origin", "https://evil.example").send().await.unwrap();
    assert_eq!(quit.status(), 403);
    let quit =
        c.post(sc.admin_url("/quitquitquit")).header("sec-fetch-site", "cross-site").send().await.unwrap();
    assert_eq!(quit.status(), 403);
    let rebound = status_line(sc.admin, b"GET /metrics HTTP/1.1\r\nHost: evil.example:9191\r\n\r\n").await;
    assert!(rebound.contains("403"), "{rebound}");
    let by_ip =
        status_line(sc.admin, b"GET /healthz HTTP/1.1\r\nHost: 10.1.2.3:9191\r\nConnection: close\r\n\r\n")
            .await;
    assert!(by_ip.contains("200"), "{by_ip}");
    assert_eq!(up.count(), 1, "only the request with Sec-Fetch-Site: none went upstream");
    still_serving(&sc).await;
}
