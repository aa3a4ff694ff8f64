//! The usage callback against a real in-process receiver on `127.0.0.1:0` that records every
//! POST: delivery with every field and a valid signature, a receiver down, failing, slow or
//! hanging, queue overflow, and the shutdown drain. Each receiver dedupes on the event `id`, as
//! the README tells receivers to, so "delivered once" is checked the way a backend sees it.

mod support;

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::Value;
use sidekey::callback::{
    self, CallbackConfig, CallbackMetrics, Delivery, Dispatcher, EventUsage, Outcome, UsageEvent,
};
use sidekey::client::{self, ClientSettings};
use sidekey::server::{serve, ServeSettings};
use support::{eventually, full, TestBody, WAIT};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------------------------------------
// The receiver

/// What the receiver does with one POST.
#[derive(Debug, Clone, Copy)]
enum Answer {
    Status(u16),
    /// 200, after this long.
    Delay(Duration),
    /// Never answer.
    Hang,
}

/// A POST as the receiver saw it, with what it answered.
#[derive(Debug, Clone)]
struct Post {
    headers: HeaderMap,
    body: Bytes,
    answer: Answer,
    at: Instant,
}

impl Post {
    fn header(&self, name: &str) -> &str {
        self.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default()
    }

    fn batch_id(&self) -> &str {
        self.header("x-sidekey-batch-id")
    }

    fn events(&self) -> Vec<Value> {
        serde_json::from_slice::<Vec<Value>>(&self.body).expect("a JSON array")
    }

    fn ids(&self) -> Vec<String> {
        self.events().iter().map(|e| e["id"].as_str().unwrap().to_string()).collect()
    }

    /// A receiver stores a batch once it answers 2xx. A `Delay` counts as a 200: only tests
    /// whose client outwaits the delay look at what was stored.
    fn stored(&self) -> bool {
        matches!(self.answer, Answer::Status(200..=299) | Answer::Delay(_))
    }
}

type Script = Arc<dyn Fn(usize) -> Answer + Send + Sync>;

struct Receiver {
    addr: SocketAddr,
    posts: Arc<Mutex<Vec<Post>>>,
    stop: CancellationToken,
}

impl Receiver {
    /// Answers POST number `n` (from 0) with `script(n)`.
    async fn start(script: impl Fn(usize) -> Answer + Send + Sync + 'static) -> Self {
        Self::start_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), script)
    }

    fn start_on(listener: TcpListener, script: impl Fn(usize) -> Answer + Send + Sync + 'static) -> Self {
        let addr = listener.local_addr().unwrap();
        let posts = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let script: Script = Arc::new(script);
        let settings = ServeSettings {
            name: "callback-receiver",
            max_connections: 100,
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(30),
            max_headers: 100,
            max_header_bytes: 64 * 1024,
            grace: Duration::from_millis(100),
        };
        let p = Arc::clone(&posts);
        tokio::spawn(serve(listener, settings, stop.clone(), move |req, _| {
            let (p, script) = (Arc::clone(&p), Arc::clone(&script));
            async move { Ok::<_, Infallible>(receive(req, p, script).await) }
        }));
        Self { addr, posts, stop }
    }

    fn url(&self) -> String {
        format!("http://{}/v1/callback/usage", self.addr)
    }

    fn posts(&self) -> Vec<Post> {
        self.posts.lock().unwrap().clone()
    }

    fn count(&self) -> usize {
        self.posts.lock().unwrap().len()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn receive(req: Request<Incoming>, posts: Arc<Mutex<Vec<Post>>>, script: Script) -> Response<TestBody> {
    let headers = req.headers().clone();
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let answer = {
        let mut posts = posts.lock().unwrap();
        let answer = script(posts.len());
        posts.push(Post { headers, body, answer, at: Instant::now() });
        answer
    };
    let status = match answer {
        Answer::Status(s) => s,
        Answer::Delay(d) => {
            tokio::time::sleep(d).await;
            200
        }
        Answer::Hang => std::future::pending().await,
    };
    let mut resp = Response::new(full(r#"{"ok":true}"#));
    *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
    resp
}

/// The ids a deduping receiver holds, with how many stored POSTs carried each (1 is right).
fn stored_ids(posts: &[Post]) -> HashMap<String, usize> {
    let mut ids = HashMap::new();
    for post in posts.iter().filter(|p| p.stored()) {
        for id in post.ids() {
            *ids.entry(id).or_insert(0) += 1;
        }
    }
    ids
}

/// Every id the receiver saw more than once came in a retry of one batch: same batch id, same
/// body, byte for byte. Different batches never share an id.
fn assert_duplicates_are_retries(posts: &[Post]) {
    let mut batches: HashMap<&str, &Bytes> = HashMap::new();
    let mut owner: HashMap<String, &str> = HashMap::new();
    for post in posts {
        let batch = post.batch_id();
        assert_eq!(batch.len(), 32, "a batch id on every POST");
        match batches.get(batch) {
            Some(body) => assert_eq!(*body, &post.body, "a retry resends the same body"),
            None => {
                batches.insert(batch, &post.body);
            }
        }
        for id in post.ids() {
            assert_eq!(*owner.entry(id).or_insert(batch), batch, "an id in two batches");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The callback under test

/// Quick settings: short timeouts and backoff, so every test runs in well under a second or two.
fn config(url: &str) -> CallbackConfig {
    CallbackConfig {
        url: url.into(),
        timeout_ms: 500,
        backoff_initial_ms: 20,
        backoff_max_ms: 80,
        ..Default::default()
    }
}

fn channel(config: &CallbackConfig) -> (Dispatcher, Delivery, CallbackMetrics) {
    config.validate("usage.callback").unwrap();
    let settings = ClientSettings {
        ca_file: None,
        connect_timeout: Duration::from_millis(config.timeout_ms),
        pool_idle_timeout: Duration::from_secs(10),
        pool_max_idle_per_host: 1,
        http2: true,
    };
    let metrics = CallbackMetrics::register(&prometheus::Registry::new());
    let (dispatcher, delivery) =
        callback::channel(config, client::connector(&settings).unwrap(), metrics.clone()).unwrap();
    (dispatcher, delivery, metrics)
}

/// Runs `delivery` until the returned token is cancelled, then drains for `grace`.
fn spawn(delivery: Delivery, grace: Duration) -> (CancellationToken, JoinHandle<()>) {
    let shutdown = CancellationToken::new();
    (shutdown.clone(), tokio::spawn(delivery.run(shutdown, grace)))
}

async fn stop(shutdown: CancellationToken, task: JoinHandle<()>) {
    shutdown.cancel();
    timeout(WAIT, task).await.expect("delivery stops").unwrap();
}

/// An event with every field set.
fn event(n: u64) -> UsageEvent {
    UsageEvent {
        event_id: Some(format!("ev-{n}")),
        jti: Some("k-7f3a91".into()),
        sub: Some("user-42".into()),
        client: Some("mobile-app".into()),
        set: Some("default".into()),
        model: Some("GigaChat/GigaChat-2-Max".into()),
        endpoint: "chat_completions".into(),
        status: 200,
        stream: true,
        usage: Some(EventUsage {
            prompt_tokens: 12,
            completion_tokens: 85 + n,
            total_tokens: 97 + n,
            cached_tokens: Some(4),
            reasoning_tokens: None,
        }),
        outcome: Outcome::Completed,
        started_at: UNIX_EPOCH + Duration::from_millis(1_740_830_400_250),
        duration_ms: 1840,
        ttfb_ms: Some(320),
        request_id: Some(format!("req-{n}")),
        ..UsageEvent::new()
    }
}

fn counts(m: &CallbackMetrics) -> [u64; 4] {
    [m.delivered.get(), m.retried.get(), m.failed.get(), m.dropped.get()]
}

struct KeyFile(PathBuf);

impl KeyFile {
    fn new(content: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("sidekey-callback-{:016x}", fastrand::u64(..)));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("callback-key");
        std::fs::write(&path, content).unwrap();
        Self(path)
    }
}

impl Drop for KeyFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.0.parent().unwrap());
    }
}

/// Checks `X-Sidekey-Signature` against `key` with ring, independently of sidekey's code.
fn signature_valid(post: &Post, key: &[u8]) -> bool {
    let timestamp = post.header("x-sidekey-timestamp");
    let hex = post.header("x-sidekey-signature").strip_prefix("sha256=").expect("sha256= prefix");
    assert_eq!(hex.len(), 64, "{hex}");
    let tag: Vec<u8> = (0..64).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
    let mut signed = format!("{timestamp}.").into_bytes();
    signed.extend_from_slice(&post.body);
    ring::hmac::verify(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key), &signed, &tag).is_ok()
}

/// The first fenced block of `lang` in the README's "Usage callback" section.
fn readme_block(lang: &str) -> String {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let section = readme.split("\n### Usage callback\n").nth(1).expect("the README has the section");
    let fence = format!("```{lang}\n");
    let start = section.find(&fence).unwrap_or_else(|| panic!("a {lang} block")) + fence.len();
    section[start..][..section[start..].find("```").unwrap()].to_string()
}

// ---------------------------------------------------------------------------------------------
// Tests

#[tokio::test]
async fn events_arrive_with_every_field_and_a_valid_signature() {
    let key = KeyFile::new("callback-secret-3c9e\n");
    let receiver = Receiver::start(|_| Answer::Status(200)).await;
    let (dispatcher, delivery, metrics) =
        channel(&CallbackConfig { secret_file: Some(key.0.clone()), ..config(&receiver.url()) });
    let full_event = event(1);
    let bare = UsageEvent {
        endpoint: "embeddings".into(),
        status: 403,
        outcome: Outcome::Refused,
        ..UsageEvent::new()
    };
    dispatcher.submit(full_event.clone());
    dispatcher.submit(bare.clone());
    assert_eq!(dispatcher.queue_depth(), 2);
    assert_eq!(metrics.queue_depth.get(), 2);
    let (shutdown, task) = spawn(delivery, Duration::from_secs(5));
    eventually("both delivered", || metrics.delivered.get() == 2).await;

    let posts = receiver.posts();
    assert_eq!(posts.len(), 1, "queued together, sent together");
    let post = &posts[0];
    assert_eq!(post.header("content-type"), "application/json");
    assert!(post.header("user-agent").starts_with("sidekey/"), "{:?}", post.headers);
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs();
    let ts: u64 = post.header("x-sidekey-timestamp").parse().unwrap();
    assert!(ts.abs_diff(now) <= 60, "timestamp {ts}, now {now}");
    assert!(signature_valid(post, b"callback-secret-3c9e"), "the trimmed file content is the key");
    assert!(!signature_valid(post, b"callback-secret-3c9e\n"));
    assert!(!signature_valid(post, b"another-key"));

    let events = post.events();
    assert_eq!(events, [serde_json::to_value(&full_event).unwrap(), serde_json::to_value(&bare).unwrap()]);
    let e = &events[0];
    assert_eq!(e["id"], full_event.id.to_string());
    assert_eq!(e["started_at"], "2025-03-01T12:00:00.250Z");
    assert_eq!(e["outcome"], "completed");
    assert_eq!(e["usage"]["total_tokens"], 98);
    assert_eq!(events[1]["outcome"], "refused");
    assert!(events[1]["usage"].is_null() && events[1]["ttfb_ms"].is_null());
    // The README's example has exactly the keys sidekey sends.
    let example: Vec<Value> = serde_json::from_str(&readme_block("json")).unwrap();
    let keys = |v: &Value| v.as_object().unwrap().keys().cloned().collect::<Vec<_>>();
    assert_eq!(keys(&example[0]), keys(e));
    assert_eq!(keys(&example[0]["usage"]), keys(&e["usage"]));

    stop(shutdown, task).await;
    assert_eq!(counts(&metrics), [2, 0, 0, 0]);
    assert_eq!((dispatcher.queue_depth(), metrics.queue_depth.get()), (0, 0));
}

/// The README's Python snippet, run as written, accepts what sidekey signed and refuses a
/// changed body, timestamp or key.
#[tokio::test]
async fn readme_python_snippet_verifies_a_sidekey_signature() {
    let key = KeyFile::new("py-verify-key-81d2\n");
    let receiver = Receiver::start(|_| Answer::Status(200)).await;
    let (dispatcher, delivery, metrics) =
        channel(&CallbackConfig { secret_file: Some(key.0.clone()), ..config(&receiver.url()) });
    dispatcher.submit(event(7));
    let (shutdown, task) = spawn(delivery, Duration::from_secs(5));
    eventually("delivered", || metrics.delivered.get() == 1).await;
    stop(shutdown, task).await;
    let post = receiver.posts().remove(0);

    let script = format!(
        "{}\n{}",
        readme_block("python"),
        r#"
import sys
body = sys.stdin.buffer.read()
ts, sig = sys.argv[1], sys.argv[2]
key = open(sys.argv[3], "rb").read().strip()
good = verify(body, ts, sig, key)
bad = [verify(body + b" ", ts, sig, key), verify(body, str(int(ts) + 1), sig, key),
       verify(body, ts, sig, key + b"x"), verify(body, "", sig, key)]
print(good, bad)
sys.exit(0 if good and not any(bad) else 1)
"#
    );
    let mut child = tokio::process::Command::new("python3")
        .arg("-c")
        .arg(script)
        .arg(post.header("x-sidekey-timestamp"))
        .arg(post.header("x-sidekey-signature"))
        .arg(&key.0)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("python3 is installed");
    let mut stdin = child.stdin.take().unwrap();
    tokio::io::AsyncWriteExt::write_all(&mut stdin, &post.body).await.unwrap();
    drop(stdin);
    let out = timeout(WAIT, child.wait_with_output()).await.unwrap().unwrap();
    let shown = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{shown}");
    assert_eq!(shown.trim(), "True [False, False, False, False]");
}

#[tokio::test]
async fn receiver_down_then_up_gets_each_event_once() {
    // A port nobody listens on: connections are refused until the receiver starts there.
    let addr = TcpListener::bind("127.0.0.1:0").await.unwrap().local_addr().unwrap();
    let url = format!("http://{addr}/v1/callback/usage");
    let (dispatcher, delivery, metrics) = channel(&CallbackConfig { max_attempts: 1000, ..config(&url) });
    let submitted: Vec<UsageEvent> = (0..3).map(event).collect();
    for e in &submitted {
        dispatcher.submit(e.clone());
    }
    let (shutdown, task) = spawn(delivery, Duration::from_secs(5));
    eventually("two failed attempts", || metrics.retried.get() >= 6).await;
    assert_eq!(metrics.delivered.get(), 0);

    let receiver = Receiver::start_on(TcpListener::bind(addr).await.unwrap(), |_| Answer::Status(200));
    eventually("delivered once the receiver is up", || metrics.delivered.get() == 3).await;
    let posts = receiver.posts();
    assert_duplicates_are_retries(&posts);
    let want: HashMap<String, usize> = submitted.iter().map(|e| (e.id.to_string(), 1)).collect();
    assert_eq!(stored_ids(&posts), want);
    stop(shutdown, task).await;
    let [delivered, retried, failed, dropped] = counts(&metrics);
    assert_eq!((delivered, failed, dropped), (3, 0, 0));
    assert_eq!(retried % 3, 0, "retries count events: {retried}");
}

#[tokio::test]
async fn answered_500_twice_then_200_is_delivered_with_retries_counted() {
    let receiver = Receiver::start(|n| Answer::Status(if n < 2 { 500 } else { 200 })).await;
    let (dispatcher, delivery, metrics) = channel(&config(&receiver.url()));
    let submitted = [event(1), event(2)];
    for e in &submitted {
        dispatcher.submit(e.clone());
    }
    let (shutdown, task) = spawn(delivery, Duration::from_secs(5));
    eventually("delivered", || metrics.delivered.get() == 2).await;
    stop(shutdown, task).await;

    let posts = receiver.posts();
    assert_eq!(posts.len(), 3, "two refusals, one success");
    assert_duplicates_are_retries(&posts);
    assert!(posts.iter().all(|p| p.batch_id() == posts[0].batch_id()));
    let want: HashMap<String, usize> = submitted.iter().map(|e| (e.id.to_string(), 1)).collect();
    assert_eq!(stored_ids(&posts), want);
    // Jittered backoff: at least half of 20 ms, then of 40 ms, between the attempts.
    assert!(posts[1].at - posts[0].at >= Duration::from_millis(10));
    assert!(posts[2].at - posts[1].at >= Duration::from_millis(20));
    assert_eq!(counts(&metrics), [2, 4, 0, 0], "retried counts events: 2 events × 2 retries");
}

#[tokio::test]
async fn slow_receiver_times_out_and_the_batch_fails_after_max_attempts() {
    let slow = Arc::new(AtomicBool::new(true));
    let s = Arc::clone(&slow);
    let receiver = Receiver::start(move |_| {
        if s.load(Ordering::SeqCst) {
            Answer::Delay(Duration::from_secs(10))
        } else {
            Answer::Status(200)
        }
    })
    .await;
    let cfg = CallbackConfig { timeout_ms: 150, max_attempts: 3, ..config(&receiver.url()) };
    let (dispatcher, delivery, metrics) = channel(&cfg);
    dispatcher.submit(event(1));
    dispatcher.submit(event(2));
    let started = Instant::now();
    let (shutdown, task) = spawn(delivery, Duration::from_secs(5));
    eventually("failed", || metrics.failed.get() == 2).await;
    assert!(started.elapsed() >= Duration::from_millis(3 * 150), "each attempt waited timeout_ms");
    let posts = receiver.posts();
    assert_eq!(posts.len(), 3, "max_attempts POSTs, then no more");
    assert_duplicates_are_retries(&posts);
    assert!(posts[1].at - posts[0].at >= Duration::from_millis(150));
    assert_eq!(counts(&metrics), [0, 4, 2, 0]);

    // A failed batch does not stop delivery: the next event goes out.
    slow.store(false, Ordering::SeqCst);
    dispatcher.submit(event(3));
    eventually("the next batch is delivered", || metrics.delivered.get() == 1).await;
    stop(shutdown, task).await;
    assert_eq!(receiver.count(), 4);
    assert_eq!(counts(&metrics), [1, 4, 2, 0]);
}

#[tokio::test]
async fn queue_overflow_drops_and_counts_and_submit_never_blocks() {
    let receiver = Receiver::start(|_| Answer::Hang).await;
    let cfg = CallbackConfig { max_queue: 4, batch_max: 1, timeout_ms: 60_000, ..config(&receiver.url()) };
    let (dispatcher, delivery, metrics) = channel(&cfg);
    for n in 0..10 {
        dispatcher.submit(event(n));
    }
    assert_eq!(dispatcher.queue_depth(), 4);
    assert_eq!((metrics.dropped.get(), metrics.queue_depth.get()), (6, 4));

    // The delivery task takes one event and hangs on it; one slot frees up.
    let (shutdown, task) = spawn(delivery, Duration::from_millis(200));
    eventually("the first POST is in flight", || receiver.count() == 1).await;
    assert_eq!(dispatcher.queue_depth(), 3);
    dispatcher.submit(event(10));
    dispatcher.submit(event(11));
    assert_eq!((metrics.dropped.get(), metrics.queue_depth.get()), (7, 4));

    // A full queue costs the request path nothing: 100 000 refused submits are quick.
    let started = std::time::Instant::now();
    for _ in 0..100_000 {
        dispatcher.submit(UsageEvent::new());
    }
    assert!(started.elapsed() < Duration::from_secs(5), "{:?}", started.elapsed());
    assert_eq!(metrics.dropped.get(), 100_007);

    // Shutdown: the one in flight and the four queued are dropped too.
    stop(shutdown, task).await;
    assert_eq!(counts(&metrics), [0, 0, 0, 100_012]);
    assert_eq!(metrics.queue_depth.get(), 0);
    assert_eq!(receiver.count(), 1);
}

#[tokio::test]
async fn shutdown_delivers_what_is_queued_within_the_grace() {
    let receiver = Receiver::start(|_| Answer::Delay(Duration::from_millis(50))).await;
    let (dispatcher, delivery, metrics) =
        channel(&CallbackConfig { batch_max: 2, ..config(&receiver.url()) });
    let submitted: Vec<UsageEvent> = (0..5).map(event).collect();
    for e in &submitted {
        dispatcher.submit(e.clone());
    }
    // Shutdown has already begun when the task starts: it only drains.
    let shutdown = CancellationToken::new();
    shutdown.cancel();
    let started = Instant::now();
    timeout(WAIT, delivery.run(shutdown, Duration::from_secs(30))).await.expect("returns once drained");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "did not wait for the grace: {:?}",
        started.elapsed()
    );

    let posts = receiver.posts();
    assert_eq!(posts.iter().map(|p| p.events().len()).collect::<Vec<_>>(), [2, 2, 1]);
    let want: HashMap<String, usize> = submitted.iter().map(|e| (e.id.to_string(), 1)).collect();
    assert_eq!(stored_ids(&posts), want);
    assert_eq!(counts(&metrics), [5, 0, 0, 0]);

    // Delivery is over: later events are dropped and counted, not queued forever.
    dispatcher.submit(event(9));
    assert_eq!((metrics.dropped.get(), metrics.queue_depth.get()), (1, 0));
}

#[tokio::test]
async fn shutdown_with_a_hanging_receiver_returns_after_the_grace_and_counts_the_rest() {
    let receiver = Receiver::start(|_| Answer::Hang).await;
    let cfg = CallbackConfig { batch_max: 2, timeout_ms: 60_000, ..config(&receiver.url()) };
    let (dispatcher, delivery, metrics) = channel(&cfg);
    for n in 0..5 {
        dispatcher.submit(event(n));
    }
    let grace = Duration::from_millis(300);
    let (shutdown, task) = spawn(delivery, grace);
    eventually("the first POST is in flight", || receiver.count() == 1).await;

    let started = Instant::now();
    shutdown.cancel();
    timeout(grace + Duration::from_secs(2), task).await.expect("returns within the grace and slack").unwrap();
    let took = started.elapsed();
    assert!(took >= grace - Duration::from_millis(20), "waited for the grace: {took:?}");
    assert_eq!(counts(&metrics), [0, 0, 0, 5], "two in flight, three queued");
    assert_eq!(metrics.queue_depth.get(), 0);
    assert_eq!(receiver.count(), 1);
}

#[tokio::test]
async fn a_rotated_signing_key_signs_the_next_post() {
    let key = KeyFile::new("first-key");
    let receiver = Receiver::start(|_| Answer::Status(200)).await;
    let (dispatcher, delivery, metrics) =
        channel(&CallbackConfig { secret_file: Some(key.0.clone()), ..config(&receiver.url()) });
    let (shutdown, task) = spawn(delivery, Duration::from_secs(5));
    dispatcher.submit(event(1));
    eventually("first delivered", || metrics.delivered.get() == 1).await;
    std::fs::write(&key.0, "second-key\n").unwrap();
    dispatcher.submit(event(2));
    eventually("second delivered", || metrics.delivered.get() == 2).await;
    stop(shutdown, task).await;

    let posts = receiver.posts();
    assert!(signature_valid(&posts[0], b"first-key") && !signature_valid(&posts[0], b"second-key"));
    assert!(signature_valid(&posts[1], b"second-key") && !signature_valid(&posts[1], b"first-key"));
    let ids: HashSet<String> = posts.iter().flat_map(Post::ids).collect();
    assert_eq!(ids.len(), 2);
}

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Logs say what happened in numbers: never the signing key, the signature or the body.
#[tokio::test]
async fn logs_count_events_and_show_no_key_signature_or_body() {
    let capture = Capture::default();
    let writer = capture.clone();
    // This test's runtime is single-threaded: every task it spawns logs through this subscriber.
    let _logs = tracing::subscriber::set_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .finish(),
    );

    let key = KeyFile::new("log-scan-key-5e7a");
    let receiver = Receiver::start(|n| Answer::Status(if n == 1 { 200 } else { 500 })).await;
    let cfg = CallbackConfig { secret_file: Some(key.0.clone()), max_attempts: 2, ..config(&receiver.url()) };
    let (dispatcher, delivery, metrics) = channel(&cfg);
    let (shutdown, task) = spawn(delivery, Duration::from_secs(5));
    dispatcher.submit(event(1));
    eventually("delivered on the retry", || metrics.delivered.get() == 1).await;
    dispatcher.submit(event(2));
    eventually("failed after two attempts", || metrics.failed.get() == 1).await;
    stop(shutdown, task).await;

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    assert!(logs.contains("Usage callback delivery failed; retrying"), "{logs}");
    assert!(logs.contains("Usage callback delivery failed; events counted as failed"), "{logs}");
    assert!(logs.contains("events=1") && logs.contains("receiver answered 500"), "{logs}");
    let signatures: Vec<String> =
        receiver.posts().iter().map(|p| p.header("x-sidekey-signature").to_string()).collect();
    let bodies: Vec<String> =
        receiver.posts().iter().map(|p| String::from_utf8_lossy(&p.body).into_owned()).collect();
    for secret in ["log-scan-key-5e7a", "user-42", "req-1", "GigaChat", "k-7f3a91"]
        .into_iter()
        .chain(signatures.iter().map(|s| &s[7..]))
        .chain(bodies.iter().map(String::as_str))
    {
        assert!(!logs.contains(secret), "{secret:?} is in the logs:\n{logs}");
    }
}
