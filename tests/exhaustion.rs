//! Resource exhaustion against the real binary: silent sockets on both listeners, connections
//! held idle, stalled and trickled uploads. Each case checks that the slots and the memory come
//! back, that probes keep answering throughout, and prints a `figures:` line.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use support::process::*;
use support::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{timeout, Instant};

/// A fresh connection per probe: a pooled one would hide a full listener.
async fn probe(url: &str) -> Duration {
    let c = reqwest::Client::builder().no_proxy().pool_max_idle_per_host(0).timeout(WAIT).build().unwrap();
    let start = Instant::now();
    let resp = c.get(url).send().await.expect("probe answered");
    assert_eq!(resp.status(), 200, "{url}");
    start.elapsed()
}

/// True once the server has closed `s` (read gives EOF or an error), waiting at most `within`.
async fn closed_by_server(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(timeout(within, s.read(&mut buf)).await, Ok(Ok(0)) | Ok(Err(_)))
}

async fn silent(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    let mut out = Vec::with_capacity(n);
    for i in 0..n {
        let mut s = TcpStream::connect(addr).await.unwrap();
        if i % 2 == 1 {
            // Only the first line of the HTTP/2 preface, then silence.
            s.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
        }
        out.push(s);
    }
    out
}

#[tokio::test]
async fn silent_sockets_free_their_slots_and_probes_answer_throughout() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let extra = "header_read_timeout_secs = 2\nmax_connections = 64\nadmin_max_connections = 8";
    let proc = spawn(&iam, &up.base_url(), extra).await;
    let healthz = format!("http://{}/healthz", proc.admin);
    let models = format!("http://{}/v1/models", proc.proxy);

    let start = Instant::now();
    let mut proxy_socks = silent(proc.proxy, 256).await;
    let mut admin_socks = silent(proc.admin, 32).await;
    let mut worst = Duration::ZERO;
    let mut probes = 0;
    while start.elapsed() < Duration::from_secs(3) {
        let took = probe(&healthz).await;
        assert!(took < Duration::from_secs(1), "/healthz took {took:?} with the admin port flooded");
        worst = worst.max(took);
        let took = probe(&models).await;
        assert!(took < Duration::from_secs(1), "a request took {took:?} with the proxy port flooded");
        probes += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // By now (header_read_timeout_secs = 2) every silent socket has been closed by sidekey.
    for s in proxy_socks.iter_mut().chain(admin_socks.iter_mut()) {
        assert!(closed_by_server(s, Duration::from_secs(3)).await, "a silent socket is still open");
    }
    let freed = start.elapsed();
    println!(
        "figures: silent sockets: 256 on the proxy port (max_connections 64) and 32 on the admin port \
         (admin_max_connections 8), half sending only the HTTP/2 preface line: {probes} rounds of \
         /healthz + /v1/models on new connections, slowest /healthz {:.1} ms; every silent socket closed \
         by {:.1} s (header_read_timeout_secs = 2)",
        worst.as_secs_f64() * 1000.0,
        freed.as_secs_f64()
    );
}

#[tokio::test]
async fn idle_connections_are_closed_over_http1_and_http2() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let proc = spawn(&iam, &up.base_url(), "connection_idle_timeout_secs = 1").await;

    // HTTP/2 (h2c prior knowledge): one request, then nothing.
    let tcp = TcpStream::connect(proc.proxy).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(tcp),
    )
    .await
    .unwrap();
    let h2 = tokio::spawn(conn);
    let req =
        http::Request::get(format!("http://{}/v1/models", proc.proxy)).body(Full::new(Bytes::new())).unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.into_body().collect().await.unwrap();
    let idle_start = Instant::now();
    timeout(Duration::from_secs(5), h2)
        .await
        .expect("sidekey closes an idle HTTP/2 connection")
        .unwrap()
        .ok();
    let h2_closed = idle_start.elapsed();

    // HTTP/1.1 keep-alive: one request, then nothing.
    let mut s = TcpStream::connect(proc.proxy).await.unwrap();
    s.write_all(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 4096];
    let n = timeout(WAIT, s.read(&mut buf)).await.unwrap().unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let idle_start = Instant::now();
    assert!(closed_by_server(&mut s, Duration::from_secs(5)).await, "idle HTTP/1.1 connection stays open");
    let h1_closed = idle_start.elapsed();
    assert!(h2_closed >= Duration::from_millis(900) && h1_closed >= Duration::from_millis(900));
    println!(
        "figures: idle connections (connection_idle_timeout_secs = 1): HTTP/2 closed after {:.2} s, \
         HTTP/1.1 keep-alive after {:.2} s",
        h2_closed.as_secs_f64(),
        h1_closed.as_secs_f64()
    );
}

/// An upstream that reads the whole request body before answering (as real APIs do).
async fn reading_upstream() -> FakeUpstream {
    FakeUpstream::start(|req| async move {
        match req.into_body().collect().await {
            Ok(_) => json_response(200, r#"{"ok":true}"#),
            Err(_) => json_response(400, r#"{"error":"body"}"#),
        }
    })
    .await
}

/// Opens `n` uploads declaring `declared` bytes, each sending `sent` bytes, then stalling.
async fn stalled_uploads(addr: SocketAddr, n: usize, declared: usize, sent: usize) -> Vec<TcpStream> {
    let mut out = Vec::with_capacity(n);
    let payload = vec![b' '; sent];
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
             Content-Length: {declared}\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        // A refused upload may be answered and closed before all of it is written.
        let _ = s.write_all(&payload).await;
        out.push(s);
    }
    out
}

async fn status_of(s: &mut TcpStream) -> String {
    let mut buf = vec![0u8; 4096];
    match timeout(WAIT, s.read(&mut buf)).await {
        Ok(Ok(n)) => String::from_utf8_lossy(&buf[..n]).lines().next().unwrap_or_default().to_string(),
        _ => String::new(),
    }
}

const MIB: u64 = 1024 * 1024;

#[tokio::test]
async fn stalled_policy_uploads_are_bounded_by_the_budget_and_cut() {
    let iam = FakeIam::start().await;
    let up = reading_upstream().await;
    let extra = "body_read_timeout_secs = 2\nmax_buffered_bytes = 8388608\nmax_inflight = 64\n\
                 [policy]\nallowed_models = [\"GigaChat/*\"]\nmax_body_bytes = 1048576";
    let proc = spawn(&iam, &up.base_url(), extra).await;
    let healthz = format!("http://{}/healthz", proc.admin);
    let before = proc.rss_bytes();
    // 20 clients declare 1 MiB and send 0.9 MiB: 8 MiB of budget holds at most 9 of them.
    let mut socks = stalled_uploads(proc.proxy, 20, MIB as usize, 900 * 1024).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let during = proc.rss_bytes();
    assert!(probe(&healthz).await < Duration::from_secs(1));
    let start = Instant::now();
    let mut statuses = Vec::new();
    for s in socks.iter_mut() {
        statuses.push(status_of(s).await);
    }
    let cut = start.elapsed();
    // Refused at once: 503, or (when sidekey closed while the client was still writing) a reset
    // that swallowed the 503.
    let refused = statuses.iter().filter(|l| l.contains(" 503 ") || l.is_empty()).count();
    let timed_out = statuses.iter().filter(|l| l.contains(" 408 ")).count();
    assert_eq!(refused + timed_out, 20, "{statuses:?}");
    // Bytes are reserved as they arrive: 8 MiB holds at most nine 0.9 MiB bodies.
    assert!((1..=9).contains(&timed_out), "the budget holds at most 8 MiB: {statuses:?}");
    let growth = during.saturating_sub(before);
    assert!(growth < 8 * MIB + 8 * MIB, "RSS grew {} MiB", growth / MIB);
    // A trickle (one byte every 300 ms) is cut by the same whole-body deadline.
    let mut trickle = stalled_uploads(proc.proxy, 1, 1000, 1).await.pop().unwrap();
    let t0 = Instant::now();
    let trickler = async {
        while t0.elapsed() < Duration::from_secs(10) {
            tokio::time::sleep(Duration::from_millis(300)).await;
            if trickle.write_all(b" ").await.is_err() {
                break;
            }
        }
    };
    let _ = timeout(Duration::from_secs(4), trickler).await;
    let trickle_status = status_of(&mut trickle).await;
    assert!(trickle_status.contains(" 408 "), "{trickle_status}");
    assert_eq!(up.count(), 0, "nothing unread reached upstream");
    println!(
        "figures: stalled policy uploads: 20 clients declaring 1 MiB, sending 0.9 MiB, then stalling \
         (max_buffered_bytes 8 MiB, body_read_timeout_secs 2): {refused} refused at once with 503, \
         {timed_out} got 408 within {:.1} s; RSS {:.1} → {:.1} MiB while held; a trickling client got 408 too",
        cut.as_secs_f64(),
        before as f64 / MIB as f64,
        during as f64 / MIB as f64
    );
    // And everything is given back: a normal request with a policy body still goes through.
    let resp = client()
        .post(format!("http://{}/v1/chat/completions", proc.proxy))
        .json(&serde_json::json!({"model": "GigaChat/GigaChat-2-Max", "messages": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn stalled_streamed_uploads_keep_replay_copies_within_the_budget() {
    let iam = FakeIam::start().await;
    let up = reading_upstream().await;
    let extra = "body_read_timeout_secs = 2\nmax_buffered_bytes = 16777216";
    let proc = spawn(&iam, &up.base_url(), extra).await;
    let metrics = format!("http://{}/metrics", proc.admin);
    let before = proc.rss_bytes();
    // 100 streamed uploads of 0.9 MiB, stalled: unbounded replay copies would hold 90 MiB.
    let mut socks = stalled_uploads(proc.proxy, 100, MIB as usize, 900 * 1024).await;
    tokio::time::sleep(Duration::from_millis(700)).await;
    let during = proc.rss_bytes();
    let text = client().get(&metrics).send().await.unwrap().text().await.unwrap();
    let held = metric_value(&text, "sidekey_buffered_request_bytes");
    assert!(held <= 16.0 * MIB as f64, "{held}");
    let start = Instant::now();
    let mut statuses = Vec::new();
    for s in socks.iter_mut() {
        statuses.push(status_of(s).await);
    }
    let cut = start.elapsed();
    assert!(statuses.iter().all(|l| l.contains(" 408 ")), "{statuses:?}");
    // The budget, plus each connection's own I/O buffers (about 180 KiB per stalled upload
    // here, measured with the budget at 1 byte), which max_connections bounds.
    let growth = during.saturating_sub(before);
    assert!(growth < 16 * MIB + 100 * 256 * 1024, "RSS grew {} MiB", growth / MIB);
    let text = client().get(&metrics).send().await.unwrap().text().await.unwrap();
    assert_eq!(metric_value(&text, "sidekey_buffered_request_bytes"), 0.0, "{text}");
    let dropped = metric_value(&text, "sidekey_buffer_exhausted_total{use=\"replay\"}");
    assert!(dropped >= 80.0, "uploads past the budget go without a replay copy: {dropped}");
    println!(
        "figures: stalled streamed uploads: 100 clients sending 0.9 MiB then stalling \
         (max_buffered_bytes 16 MiB, body_read_timeout_secs 2): replay copies held {:.1} MiB, \
         RSS {:.1} → {:.1} MiB (the rest is per-connection I/O buffers, ~180 KiB each); all 100 got 408 within {:.1} s and the budget went back to 0",
        held / MIB as f64,
        before as f64 / MIB as f64,
        during as f64 / MIB as f64,
        cut.as_secs_f64()
    );
}

#[tokio::test]
async fn a_client_that_stops_reading_loses_its_connection() {
    let iam = FakeIam::start().await;
    // An endless response: 64 KiB chunks as fast as sidekey takes them.
    let up = FakeUpstream::start(|_req| async move {
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        let stream = futures_util::stream::repeat_with(move || {
            Ok::<_, std::io::Error>(hyper::body::Frame::data(chunk.clone()))
        });
        let body = http_body_util::StreamBody::new(stream);
        let mut resp = http::Response::new(BodyExt::boxed(BodyExt::map_err(body, |e| Box::new(e) as _)));
        resp.headers_mut().insert("content-type", "application/octet-stream".parse().unwrap());
        resp
    })
    .await;
    let proc = spawn(&iam, &up.base_url(), "connection_idle_timeout_secs = 1").await;
    let metrics = format!("http://{}/metrics", proc.admin);
    let inflight = || async {
        let text = client().get(&metrics).send().await.unwrap().text().await.unwrap();
        metric_value(&text, "sidekey_inflight_requests")
    };
    let mut s = TcpStream::connect(proc.proxy).await.unwrap();
    s.write_all(b"GET /v1/files/f/content HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await.unwrap();
    let start = Instant::now();
    while inflight().await < 1.0 {
        assert!(start.elapsed() < WAIT, "the request never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Now read nothing: the buffers fill, the write blocks, and after a second sidekey gives up.
    let blocked = Instant::now();
    while inflight().await > 0.0 {
        assert!(blocked.elapsed() < Duration::from_secs(15), "a client that never reads holds its request");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    println!(
        "figures: a client that stops reading an endless response: its request and connection freed \
         after {:.1} s (connection_idle_timeout_secs = 1, plus the time to fill the socket buffers)",
        blocked.elapsed().as_secs_f64()
    );
    drop(s);
}
