//! Faults around sidekey, each reporting what it measured on a `figures:` line (collected into
//! the README by `tests/reliability-figures.sh`): long IAM outages, a hanging IAM, upstream
//! resets and errors, and token churn under load.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use support::*;
use tokio::time::{timeout, Instant};

type BoxError = Box<dyn std::error::Error + Send + Sync>;

#[tokio::test]
async fn iam_outage_longer_than_the_token_life() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let cfg = short_token_config(&iam, &up.base_url(), 2);
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    iam.set(PRIMARY_KEY, Iam::Status(503, "down", None));
    let c = client();
    let (mut sent, mut ok, mut unavailable) = (0, 0, 0);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(3) {
        let resp = c.get(sc.url("/v1/models")).send().await.unwrap();
        sent += 1;
        match resp.status().as_u16() {
            200 => ok += 1,
            503 => {
                unavailable += 1;
                let retry: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
                assert!((1..=5).contains(&retry), "Retry-After {retry}");
                let json: serde_json::Value = resp.json().await.unwrap();
                assert!(json["error"]["message"].as_str().unwrap().contains("IAM answered 503"));
            }
            other => panic!("unexpected {other}"),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok > 0 && unavailable > 0, "served while valid, then 503: ok={ok} 503={unavailable}");
    iam.set(PRIMARY_KEY, Iam::Issue(Duration::from_secs(3600)));
    let back = Instant::now();
    loop {
        if c.get(sc.url("/v1/models")).send().await.unwrap().status() == 200 {
            break;
        }
        assert!(back.elapsed() < WAIT);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let recovered = back.elapsed();
    println!(
        "figures: IAM outage longer than the token: sent={sent} ok={ok} clear_503={unavailable} \
         recovered_in={recovered:?} (backoff cap 400 ms)"
    );
    // One backoff step (at most backoff_max_ms = 400 ms) plus a little scheduling slack.
    assert!(recovered < Duration::from_millis(700), "{recovered:?}");
    assert_eq!(up.seen().iter().filter(|s| s.bearer().is_none()).count(), 0, "never unauthenticated");
}

#[tokio::test]
async fn a_hanging_iam_leaves_no_stuck_tasks() {
    let iam = FakeIam::start().await;
    iam.set(PRIMARY_KEY, Iam::Hang);
    let up = FakeUpstream::ok().await;
    let mut cfg = config(&iam, &up.base_url());
    cfg.auth.timeout_secs = 1;
    cfg.auth.backoff_max_ms = 100;
    let sc = start_sidecar(cfg).await;
    let metrics = sc.metrics.clone();
    let failures = || metrics.token_refresh_total.with_label_values(&["default", "primary", "failure"]).get();
    eventually("two timeouts", || failures() >= 2).await;
    let tasks_before = tokio::runtime::Handle::current().metrics().num_alive_tasks();
    eventually("four more timeouts", || failures() >= 6).await;
    let tasks_after = tokio::runtime::Handle::current().metrics().num_alive_tasks();
    println!(
        "figures: hanging IAM: {} timed-out fetches, alive tasks {tasks_before} -> {tasks_after}",
        failures()
    );
    assert!(tasks_after <= tasks_before + 2, "tasks pile up: {tasks_before} -> {tasks_after}");
    iam.set(PRIMARY_KEY, Iam::Issue(Duration::from_secs(3600)));
    sc.ready().await;
}

fn sse(events: Vec<Result<&'static str, &'static str>>, gap: Duration) -> http::Response<TestBody> {
    let stream = futures_util::stream::iter(events).then(move |e| async move {
        tokio::time::sleep(gap).await;
        match e {
            Ok(data) => Ok(Frame::data(Bytes::from(data))),
            Err(msg) => Err::<_, BoxError>(msg.into()),
        }
    });
    let mut resp = http::Response::new(BodyExt::boxed(StreamBody::new(stream)));
    resp.headers_mut().insert("content-type", "text/event-stream".parse().unwrap());
    resp
}

#[tokio::test]
async fn upstream_reset_mid_stream_truncates_and_sidekey_keeps_serving() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::start(|req| async move {
        if req.uri().path().ends_with("models") {
            return json_response(200, "{}");
        }
        sse(vec![Ok("data: 1\n\n"), Ok("data: 2\n\n"), Err("connection reset")], Duration::from_millis(50))
    })
    .await;
    let sc = start_sidecar(config(&iam, &up.base_url())).await;
    sc.ready().await;
    let c = client();
    let resp = c.post(sc.url("/v1/chat/completions")).body("{}").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let mut stream = resp.bytes_stream();
    let mut text = String::new();
    let mut cut = false;
    while let Some(chunk) = timeout(WAIT, stream.next()).await.unwrap() {
        match chunk {
            Ok(b) => text.push_str(&String::from_utf8_lossy(&b)),
            Err(_) => {
                cut = true;
                break;
            }
        }
    }
    println!(
        "figures: upstream reset mid-stream: client got {} events then {}",
        text.matches("data:").count(),
        if cut { "an error" } else { "a clean end" }
    );
    assert!(cut, "the client must see the stream was cut, not a clean end");
    assert_eq!(text, "data: 1\n\ndata: 2\n\n");
    assert_eq!(c.get(sc.url("/v1/models")).send().await.unwrap().status(), 200);
    let metrics = sc.metrics.clone();
    eventually("in-flight back to 0", || metrics.inflight_requests.get() == 0).await;
}

#[tokio::test]
async fn upstream_429_and_5xx_pass_through_unchanged() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::start(|req| async move {
        let status: u16 = req.uri().query().and_then(|q| q.strip_prefix("status=")).unwrap().parse().unwrap();
        let mut resp = json_response(status, r#"{"error":{"message":"from upstream","type":"rate_limit"}}"#);
        resp.headers_mut().insert("retry-after", "7".parse().unwrap());
        resp.headers_mut().insert("x-ratelimit-remaining-requests", "0".parse().unwrap());
        resp
    })
    .await;
    let sc = start_sidecar(config(&iam, &up.base_url())).await;
    sc.ready().await;
    for status in [429u16, 500, 502, 503] {
        let resp = client()
            .post(sc.url(&format!("/v1/chat/completions?status={status}")))
            .body("{}")
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status().as_u16(), status);
        assert_eq!(resp.headers()["retry-after"], "7");
        assert_eq!(resp.headers()["x-ratelimit-remaining-requests"], "0");
        assert_eq!(
            resp.text().await.unwrap(),
            r#"{"error":{"message":"from upstream","type":"rate_limit"}}"#
        );
    }
    assert_eq!(up.count(), 4, "no retries by sidekey");
    assert_eq!(sc.metric(r#"sidekey_requests_total{code="429",endpoint="chat_completions"}"#), 1.0);
}

/// Token churn: tokens living 3 s, 8 clients without pause. `SIDEKEY_CHURN_SECS` sets the length
/// (default 30 s, the figure in the README).
#[tokio::test]
async fn token_churn_under_load() {
    let secs: u64 = std::env::var("SIDEKEY_CHURN_SECS").ok().and_then(|v| v.parse().ok()).unwrap_or(30);
    let iam = FakeIam::start().await;
    let expired = Arc::new(AtomicU64::new(0));
    let (iam2, exp2) = (iam.clone(), Arc::clone(&expired));
    let up = FakeUpstream::start(move |req| {
        let token =
            req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let valid = token
            .strip_prefix("Bearer ")
            .and_then(|t| iam2.lookup(t))
            .is_some_and(|t| Instant::now() < t.expires_at);
        if !valid {
            exp2.fetch_add(1, Ordering::Relaxed);
        }
        async move {
            if valid {
                json_response(200, "{}")
            } else {
                json_response(401, r#"{"error":{"message":"Jwt is expired"}}"#)
            }
        }
    })
    .await;
    let cfg = short_token_config(&iam, &up.base_url(), 3);
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    let (sent, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let end = Instant::now() + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (url, sent, failed) =
                (sc.url("/v1/chat/completions"), Arc::clone(&sent), Arc::clone(&failed));
            tokio::spawn(async move {
                let c = client();
                while Instant::now() < end {
                    sent.fetch_add(1, Ordering::Relaxed);
                    if !c.post(&url).body("{}").send().await.is_ok_and(|r| r.status() == 200) {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        timeout(Duration::from_secs(secs) + WAIT, t).await.unwrap().unwrap();
    }
    let fetches = iam.call_count();
    let (sent, failed) = (sent.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(
        "figures: token churn: {secs} s, 3 s tokens, 8 clients: sent={sent} failed={failed} replayed={} \
         expired_seen_upstream={} iam_fetches={fetches} (expected ~{})",
        sc.metric("sidekey_request_replays_total"),
        expired.load(Ordering::Relaxed),
        1 + secs
    );
    assert!(sent > 100);
    assert_eq!(failed, 0);
    assert_eq!(expired.load(Ordering::Relaxed), 0);
    // Usable for 2 s (3 s less the 1 s margin): a refresh every 0.9–1 s, plus the first fetch.
    let expected = 1.0 + secs as f64;
    assert!(
        (fetches as f64) >= expected - 1.0 && (fetches as f64) <= expected * 1.12 + 1.0,
        "{fetches} fetches, expected ~{expected}"
    );
}
