//! Lifecycle of the real binary: SIGTERM drains in-flight streams and exits 0, the grace deadline
//! cuts what is left, a second signal exits at once, `/quitquitquit` works when enabled, and
//! `shutdown_delay_secs` keeps accepting for a while.

mod support;

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use support::process::*;
use support::*;
use tokio::time::{timeout, Instant};

/// An upstream streaming `n` SSE events, `gap` apart.
async fn sse_upstream(n: u32, gap: Duration) -> FakeUpstream {
    FakeUpstream::start(move |_req| async move {
        let stream = futures_util::stream::unfold(0u32, move |i| async move {
            if i == n {
                return None;
            }
            tokio::time::sleep(gap).await;
            Some((
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(Bytes::from(format!(
                    "data: {i}\n\n"
                )))),
                i + 1,
            ))
        });
        let mut resp = http::Response::new(BodyExt::boxed(StreamBody::new(stream)));
        resp.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
        resp
    })
    .await
}

async fn read_all(resp: reqwest::Response) -> (String, bool) {
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    while let Some(chunk) = timeout(WAIT, stream.next()).await.expect("stream progresses") {
        match chunk {
            Ok(b) => text.push_str(&String::from_utf8_lossy(&b)),
            Err(_) => return (text, false),
        }
    }
    (text, true)
}

#[tokio::test]
async fn sigterm_drains_an_sse_stream_then_exits_0() {
    let iam = FakeIam::start().await;
    let up = sse_upstream(10, Duration::from_millis(100)).await;
    let mut p = spawn(&iam, &up.base_url(), "shutdown_grace_secs = 10").await;
    let c = client();
    let resp = c.post(format!("http://{}/v1/chat/completions", p.proxy)).body("{}").send().await.unwrap();
    let reader = tokio::spawn(read_all(resp));
    tokio::time::sleep(Duration::from_millis(150)).await;
    p.signal("TERM");
    // Not ready at once, while the stream is still running.
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let ready = c.get(format!("http://{}/readyz", p.admin)).send().await.unwrap();
        if ready.status() == 503 {
            assert_eq!(ready.text().await.unwrap(), "draining: shutting down\n");
            break;
        }
        assert!(Instant::now() < deadline, "readyz never turned 503");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The listener is closed: a new connection is refused.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(tokio::net::TcpStream::connect(p.proxy).await.is_err(), "listener still open");
    let (text, complete) = timeout(WAIT, reader).await.unwrap().unwrap();
    assert!(complete, "stream cut: {text}");
    assert_eq!(text.matches("data: ").count(), 10);
    assert_eq!(p.exit_code().await, Some(0));
}

#[tokio::test]
async fn the_grace_deadline_cuts_long_streams() {
    let iam = FakeIam::start().await;
    let up = sse_upstream(100, Duration::from_millis(100)).await;
    let mut p = spawn(&iam, &up.base_url(), "shutdown_grace_secs = 1").await;
    let resp =
        client().post(format!("http://{}/v1/chat/completions", p.proxy)).body("{}").send().await.unwrap();
    let reader = tokio::spawn(read_all(resp));
    tokio::time::sleep(Duration::from_millis(250)).await;
    let signalled = Instant::now();
    p.signal("TERM");
    assert_eq!(p.exit_code().await, Some(0));
    let took = signalled.elapsed();
    assert!(took >= Duration::from_millis(900) && took < Duration::from_secs(4), "exited after {took:?}");
    let (text, complete) = timeout(WAIT, reader).await.unwrap().unwrap();
    assert!(!complete || text.matches("data: ").count() < 100, "the stream was cut");
}

#[tokio::test]
async fn a_second_signal_exits_at_once() {
    let iam = FakeIam::start().await;
    let up = sse_upstream(100, Duration::from_millis(100)).await;
    let mut p = spawn(&iam, &up.base_url(), "shutdown_grace_secs = 30").await;
    let resp =
        client().post(format!("http://{}/v1/chat/completions", p.proxy)).body("{}").send().await.unwrap();
    let _reader = tokio::spawn(read_all(resp));
    tokio::time::sleep(Duration::from_millis(200)).await;
    p.signal("TERM");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = Instant::now();
    p.signal("INT");
    let code = p.exit_code().await;
    assert!(second.elapsed() < Duration::from_secs(2));
    assert_ne!(code, Some(0), "a forced exit is not a clean one");
}

#[tokio::test]
async fn quitquitquit_shuts_down_when_enabled() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let mut p = spawn(&iam, &up.base_url(), "enable_quit_endpoint = true").await;
    let c = client();
    assert_eq!(
        c.get(format!("http://{}/quitquitquit", p.admin)).send().await.unwrap().status(),
        404,
        "POST only"
    );
    let resp = c.post(format!("http://{}/quitquitquit", p.admin)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(p.exit_code().await, Some(0));
}

#[tokio::test]
async fn a_signal_after_quitquitquit_exits_at_once() {
    let iam = FakeIam::start().await;
    let up = sse_upstream(100, Duration::from_millis(100)).await;
    let mut p = spawn(&iam, &up.base_url(), "enable_quit_endpoint = true\nshutdown_grace_secs = 30").await;
    let resp =
        client().post(format!("http://{}/v1/chat/completions", p.proxy)).body("{}").send().await.unwrap();
    let _reader = tokio::spawn(read_all(resp));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(client().post(format!("http://{}/quitquitquit", p.admin)).send().await.unwrap().status(), 200);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let signalled = Instant::now();
    p.signal("TERM");
    assert_ne!(p.exit_code().await, Some(0));
    assert!(signalled.elapsed() < Duration::from_secs(2));
}

#[tokio::test]
async fn quitquitquit_is_off_by_default() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let p = spawn(&iam, &up.base_url(), "").await;
    let resp = client().post(format!("http://{}/quitquitquit", p.admin)).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let ready = client().get(format!("http://{}/readyz", p.admin)).send().await.unwrap();
    assert_eq!(ready.status(), 200, "still serving");
}

#[tokio::test]
async fn shutdown_delay_keeps_accepting_for_a_while() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let mut p = spawn(&iam, &up.base_url(), "shutdown_delay_secs = 1").await;
    p.signal("TERM");
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Draining, but still accepting: a new connection gets served.
    let fresh =
        reqwest::Client::builder().no_proxy().pool_max_idle_per_host(0).timeout(WAIT).build().unwrap();
    let resp = fresh.get(format!("http://{}/v1/models", p.proxy)).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(fresh.get(format!("http://{}/readyz", p.admin)).send().await.unwrap().status(), 503);
    assert_eq!(p.exit_code().await, Some(0));
}

#[tokio::test]
async fn shutdown_does_not_wait_for_a_hanging_token_endpoint() {
    let iam = FakeIam::start().await;
    iam.set(PRIMARY_KEY, Iam::Hang);
    let up = FakeUpstream::ok().await;
    // auth.timeout_secs stays at its default of 30 s: the fetch hangs far longer than the test.
    let mut p = spawn_unready(&iam, &up.base_url(), "shutdown_grace_secs = 5").await;
    eventually("a fetch in flight", || iam.call_count() >= 1).await;
    let start = Instant::now();
    p.signal("TERM");
    assert_eq!(p.exit_code().await, Some(0));
    assert!(start.elapsed() < Duration::from_secs(3), "took {:?}", start.elapsed());
}
