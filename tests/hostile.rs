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
async fn a_connection_flood_is_bounded_and_queued() {
    let (sc, _up, _iam) = sidecar_with(|c| c.server.max_connections = 8).await;
    // Hold every slot with idle connections.
    let mut idle = Vec::new();
    for _ in 0..8 {
        idle.push(TcpStream::connect(sc.proxy).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let url = sc.url("/v1/models");
    let queued = tokio::spawn(async move {
        let start = Instant::now();
        let status = client().get(url).send().await.unwrap().status();
        (status, start.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!queued.is_finished(), "the ninth connection waits for a slot");
    drop(idle.pop());
    let (status, waited) = timeout(WAIT, queued).await.unwrap().unwrap();
    assert_eq!(status, 200);
    println!("figures: connection flood: max_connections=8, 9th request queued {waited:?} then served");
    drop(idle);
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
