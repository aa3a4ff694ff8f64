//! Many callers, one sidekey (issue 12), end to end against the fakes: client keys (on, off,
//! rotated), a client's key choosing its credential set, per-client policy and concurrency,
//! routes by prefix to several upstreams, caller-supplied key pairs (isolation, single flight,
//! rejection, LRU and rate bounds), a set that cannot get a token failing only its own requests,
//! the non-loopback rule, per-client metrics, and the OpenAI Python SDK driving each capability.

mod support;

use std::collections::BTreeMap;
use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use http_body_util::BodyExt;
use sidekey::config::{digest_of, AuthConfig, ClientConfig, PolicyConfig, RouteConfig};
use sidekey::secret::Secret;
use sidekey::Config;
use support::*;
use tokio::time::{timeout, Instant};

const TEAM_B_KEY: &str = "KEYID-team-b-41c2";
const TEAM_B_SECRET: &str = "SECRET-team-b-9e07";
const ML_KEY: &str = "KEYID-ml-set-0d3a";
const SPECIAL_KEY: &str = "KEYID-special-c58e";

// ---------------------------------------------------------------------------------------------
// Helpers

fn hex(d: [u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// A client whose keys are given as digests.
fn client_with_keys(name: &str, keys: &[&str]) -> ClientConfig {
    ClientConfig {
        name: name.into(),
        key_sha256: keys.iter().map(|k| Secret::new(hex(digest_of(k)))).collect(),
        ..Default::default()
    }
}

/// A credential set beside the default one, at the same fake IAM, with one inline credential.
fn set(iam: &FakeIam, key_id: &str, secret: &str) -> AuthConfig {
    AuthConfig {
        token_url: iam.url(),
        backoff_initial_ms: 100,
        backoff_max_ms: 400,
        timeout_secs: 2,
        credentials: vec![credential("primary", key_id, secret)],
        ..Default::default()
    }
}

/// A fresh directory for one test's files.
fn temp_dir(test: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sidekey-gateway-{}-{test}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Replaces a file in one step (write beside it, rename), as a Secret volume update does.
fn replace_file(path: &std::path::Path, content: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, content).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Polls an async condition every 50 ms until it holds, or panics after `WAIT`.
async fn until<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `/readyz?all` says every credential set holds a token.
async fn all_sets_ready(sc: &Sidecar) {
    let c = client();
    let url = sc.admin_url("/readyz?all");
    until("every credential set ready", || {
        let req = c.get(&url).send();
        async move { req.await.map(|r| r.status() == 200).unwrap_or(false) }
    })
    .await;
}

/// GET with an optional `Authorization: Bearer` key; status and JSON body (Null if not JSON).
async fn get(url: &str, key: Option<&str>) -> (u16, serde_json::Value) {
    let mut req = client().get(url);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = timeout(WAIT, req.send()).await.expect("answered in time").unwrap();
    let status = resp.status().as_u16();
    let body = resp.json().await.unwrap_or(serde_json::Value::Null);
    (status, body)
}

/// A chat completion request for `model` with a key.
async fn chat(url: &str, key: &str, model: &str) -> (u16, serde_json::Value) {
    let body = serde_json::json!({"model": model, "messages": [{"role": "user", "content": "hi"}]});
    let resp = timeout(WAIT, client().post(url).bearer_auth(key).json(&body).send())
        .await
        .expect("answered in time")
        .unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(serde_json::Value::Null))
}

/// Asserts an OpenAI-shaped sidekey error with this code; returns its message.
fn error_code(body: &serde_json::Value, code: &str) -> String {
    assert_eq!(body["error"]["code"], code, "{body}");
    assert_eq!(body["error"]["type"], "sidekey_error", "{body}");
    body["error"]["message"].as_str().expect("a message").to_string()
}

/// The key id the token the upstream saw last was issued for.
fn last_key_id(iam: &FakeIam, up: &FakeUpstream) -> String {
    let seen = up.seen();
    let token = seen.last().expect("the upstream saw a request").bearer().expect("a bearer token");
    iam.lookup(token).unwrap_or_else(|| panic!("{token} was not issued by the IAM")).key_id
}

const COMPLETION: &str = r#"{"id":"c1","object":"chat.completion","created":0,"model":"GigaChat/GigaChat-2-Max",
"choices":[{"index":0,"message":{"role":"assistant","content":"hello"},"finish_reason":"stop"}],
"usage":{"prompt_tokens":7,"completion_tokens":5,"total_tokens":12}}"#;

/// An upstream answering every request with a chat completion that reports usage.
async fn completion_upstream() -> FakeUpstream {
    FakeUpstream::start(|req| async move {
        req.into_body().collect().await.unwrap();
        json_response(200, COMPLETION)
    })
    .await
}

// Every log line of this test binary, for the secret scan.
#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Installs (once) a DEBUG subscriber writing into a buffer; returns the buffer.
fn captured_logs() -> Capture {
    static CAPTURE: OnceLock<Capture> = OnceLock::new();
    CAPTURE
        .get_or_init(|| {
            let capture = Capture::default();
            let writer = capture.clone();
            let _ = tracing_subscriber::fmt()
                .with_max_level(tracing::Level::DEBUG)
                .with_writer(move || writer.clone())
                .with_ansi(false)
                .try_init();
            capture
        })
        .clone()
}

// ---------------------------------------------------------------------------------------------
// 1. Client authentication

#[tokio::test]
async fn without_clients_any_key_or_none_is_trusted() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let sc = start_sidecar(config(&iam, &up.base_url())).await;
    sc.ready().await;
    for key in [None, Some("sk-anything"), Some("KEYID:SECRET-looking")] {
        let (status, _) = get(&sc.url("/v1/models"), key).await;
        assert_eq!(status, 200, "{key:?}");
        assert_eq!(last_key_id(&iam, &up), PRIMARY_KEY);
    }
    let metrics = sc.metrics.render();
    assert_eq!(
        metric_value(&metrics, r#"sidekey_client_requests_total{client="anonymous",code="200"}"#),
        3.0
    );
}

#[tokio::test]
async fn with_clients_only_a_known_key_passes_and_is_never_forwarded() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let mut cfg = config(&iam, &up.base_url());
    cfg.clients =
        vec![client_with_keys("app-a", &["sk-app-a-1"]), client_with_keys("app-b", &["sk-app-b-1"])];
    let sc = start_sidecar(cfg).await;
    sc.ready().await;

    let (status, body) = get(&sc.url("/v1/models"), None).await;
    assert_eq!(status, 401);
    let message = error_code(&body, "invalid_api_key");
    assert!(message.contains("Authorization: Bearer"), "says how to send a key: {message}");
    let (status, body) = get(&sc.url("/v1/models"), Some("sk-app-a-2")).await;
    assert_eq!(status, 401);
    let message = error_code(&body, "invalid_api_key");
    assert!(!message.contains("sk-app-a-2"), "the presented key is not echoed: {message}");
    // A key-pair-shaped key is just an unknown key while caller credentials are off.
    let (status, _) = get(&sc.url("/v1/models"), Some("KEYID:SECRET")).await;
    assert_eq!(status, 401);
    assert_eq!(up.count(), 0, "refused requests never reach the upstream");

    let (status, _) = get(&sc.url("/v1/models"), Some("sk-app-a-1")).await;
    assert_eq!(status, 200, "Authorization: Bearer");
    let resp = client().get(sc.url("/v1/models")).header("api-key", "sk-app-b-1").send().await.unwrap();
    assert_eq!(resp.status(), 200, "api-key header");

    let seen = up.seen();
    assert_eq!(seen.len(), 2);
    for s in &seen {
        let token = s.bearer().expect("a bearer token");
        assert_eq!(iam.lookup(token).expect("the IAM's token").key_id, PRIMARY_KEY);
        for (name, value) in &s.headers {
            let v = String::from_utf8_lossy(value.as_bytes());
            assert!(!v.contains("sk-app-"), "the client key is not forwarded ({name}: {v})");
        }
    }
    let metrics = sc.metrics.render();
    for client in ["app-a", "app-b"] {
        let series = format!(r#"sidekey_client_requests_total{{client="{client}",code="200"}}"#);
        assert_eq!(metric_value(&metrics, &series), 1.0, "{series}");
    }
    assert!(!metrics.contains("sk-app-") && !metrics.contains(&hex(digest_of("sk-app-a-1"))));
}

#[tokio::test]
async fn a_replaced_keys_file_rotates_the_key_without_a_restart() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let dir = temp_dir("rotation");
    let keys = dir.join("app-keys");
    std::fs::write(&keys, "# app keys, one per line\n\n  sk-old-key-1  \n# sk-commented-out\n\n").unwrap();
    let mut cfg = config(&iam, &up.base_url());
    cfg.auth.credential_poll_secs = 1;
    cfg.clients =
        vec![ClientConfig { name: "app".into(), keys_file: Some(keys.clone()), ..Default::default() }];
    let sc = start_sidecar(cfg).await;
    sc.ready().await;

    let url = sc.url("/v1/models");
    assert_eq!(get(&url, Some("sk-old-key-1")).await.0, 200, "surrounding whitespace is trimmed");
    assert_eq!(get(&url, Some("sk-commented-out")).await.0, 401, "a # line is a comment");
    assert_eq!(get(&url, Some("# app keys, one per line")).await.0, 401);

    replace_file(&keys, "sk-new-key-2\n");
    let started = Instant::now();
    until("the new key works", || {
        let url = url.clone();
        async move { get(&url, Some("sk-new-key-2")).await.0 == 200 }
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(10), "picked up within a few polls");
    assert_eq!(get(&url, Some("sk-old-key-1")).await.0, 401, "the old key stopped working");

    // A broken file keeps the last good keys.
    replace_file(&keys, "");
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(get(&url, Some("sk-new-key-2")).await.0, 200, "an empty keys file is not applied");
    let _ = std::fs::remove_dir_all(&dir);
}

// ---------------------------------------------------------------------------------------------
// 2. A client's key selects its credential set

#[tokio::test]
async fn a_clients_key_selects_the_set_that_pays() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let mut cfg = config(&iam, &up.base_url());
    cfg.auth.sets.insert("team-b".into(), set(&iam, TEAM_B_KEY, TEAM_B_SECRET));
    let mut b = client_with_keys("billing-app", &["sk-billing"]);
    b.credentials = Some("team-b".into());
    cfg.clients = vec![client_with_keys("web-app", &["sk-web"]), b];
    let sc = start_sidecar(cfg).await;
    all_sets_ready(&sc).await;

    assert_eq!(get(&sc.url("/v1/models"), Some("sk-billing")).await.0, 200);
    assert_eq!(last_key_id(&iam, &up), TEAM_B_KEY, "team-b's service account pays");
    assert_eq!(get(&sc.url("/v1/models"), Some("sk-web")).await.0, 200);
    assert_eq!(last_key_id(&iam, &up), PRIMARY_KEY, "the default set pays");
    assert_eq!(get(&sc.url("/v1/models"), Some("sk-billing")).await.0, 200);
    assert_eq!(last_key_id(&iam, &up), TEAM_B_KEY);
    assert_eq!(iam.calls_for(TEAM_B_KEY), 1, "team-b's token is cached, not fetched per request");
    let call = iam.calls().into_iter().find(|c| c.key_id == TEAM_B_KEY).unwrap();
    assert_eq!(call.secret, TEAM_B_SECRET);
}

// ---------------------------------------------------------------------------------------------
// 3. Per-client policy and concurrency

#[tokio::test]
async fn a_clients_policy_replaces_the_global_one() {
    let iam = FakeIam::start().await;
    let up = completion_upstream().await;
    let mut cfg = config(&iam, &up.base_url());
    let mut a = client_with_keys("restricted", &["sk-restricted"]);
    a.policy = Some(PolicyConfig { allowed_models: vec!["GigaChat/*".into()], ..Default::default() });
    cfg.clients = vec![a, client_with_keys("free", &["sk-free"])];
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    let url = sc.url("/v1/chat/completions");

    let (status, body) = chat(&url, "sk-restricted", "Qwen/Qwen3-235B").await;
    assert_eq!(status, 403, "{body}");
    let message = error_code(&body, "model_not_allowed");
    assert!(message.contains("Qwen/Qwen3-235B"), "{message}");
    assert_eq!(up.count(), 0);
    assert_eq!(chat(&url, "sk-restricted", "GigaChat/GigaChat-2-Max").await.0, 200);
    assert_eq!(chat(&url, "sk-free", "Qwen/Qwen3-235B").await.0, 200, "the other client is unrestricted");
    assert_eq!(up.count(), 2);
    let metrics = sc.metrics.render();
    assert_eq!(
        metric_value(&metrics, r#"sidekey_client_requests_total{client="restricted",code="403"}"#),
        1.0
    );
}

#[tokio::test]
async fn a_clients_max_inflight_bounds_only_that_client() {
    let iam = FakeIam::start().await;
    let release = Arc::new(tokio::sync::Notify::new());
    let r = Arc::clone(&release);
    // Requests with `x-hang` are held until released.
    let up = FakeUpstream::start(move |req| {
        let r = Arc::clone(&r);
        async move {
            if req.headers().contains_key("x-hang") {
                let _ = timeout(WAIT, r.notified()).await;
            }
            json_response(200, r#"{"object":"list","data":[]}"#)
        }
    })
    .await;
    let mut cfg = config(&iam, &up.base_url());
    let mut a = client_with_keys("bursty", &["sk-bursty"]);
    a.policy = Some(PolicyConfig { max_inflight: Some(2), ..Default::default() });
    cfg.clients = vec![a, client_with_keys("calm", &["sk-calm"])];
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    let url = sc.url("/v1/models");

    let held: Vec<_> = (0..2)
        .map(|_| {
            let req = client().get(&url).bearer_auth("sk-bursty").header("x-hang", "1").send();
            tokio::spawn(req)
        })
        .collect();
    eventually("both requests reach the upstream", || up.count() == 2).await;

    let resp = client().get(&url).bearer_auth("sk-bursty").send().await.unwrap();
    assert_eq!(resp.status(), 429);
    assert_eq!(resp.headers()["retry-after"], "1");
    let body: serde_json::Value = resp.json().await.unwrap();
    let message = error_code(&body, "too_many_requests");
    assert!(message.contains("bursty") && message.contains('2'), "{message}");
    assert_eq!(up.count(), 2, "the third request did not reach the upstream");

    assert_eq!(get(&url, Some("sk-calm")).await.0, 200, "another client is unaffected");

    // Released slots are usable again.
    let notify = Arc::clone(&release);
    let mut statuses = Vec::new();
    for h in held {
        // notify_waiters wakes only those waiting; keep poking until each held request is done.
        let answered = timeout(WAIT, async {
            loop {
                notify.notify_waiters();
                if h.is_finished() {
                    return h.await.unwrap().unwrap().status().as_u16();
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .expect("held requests answered once released");
        statuses.push(answered);
    }
    assert_eq!(statuses, [200, 200]);
    assert_eq!(get(&url, Some("sk-bursty")).await.0, 200, "slots are given back");
    let metrics = sc.metrics.render();
    assert_eq!(metric_value(&metrics, r#"sidekey_client_requests_total{client="bursty",code="429"}"#), 1.0);
}

// ---------------------------------------------------------------------------------------------
// 4. Routes

#[tokio::test]
async fn routes_by_longest_prefix_each_with_its_sets_token_and_the_path_byte_for_byte() {
    let iam = FakeIam::start().await;
    let (fm, ml, special) = (FakeUpstream::ok().await, FakeUpstream::ok().await, FakeUpstream::ok().await);
    let mut cfg = config(&iam, &fm.base_url());
    cfg.auth.sets.insert("ml".into(), set(&iam, ML_KEY, "SECRET-ml-1"));
    cfg.auth.sets.insert("special".into(), set(&iam, SPECIAL_KEY, "SECRET-special-1"));
    cfg.routes = vec![
        RouteConfig { prefix: "/ml/v1".into(), base_url: ml.base_url(), credentials: "ml".into() },
        RouteConfig {
            prefix: "/ml/v1/special".into(),
            base_url: format!("http://{}/api", special.addr),
            credentials: "special".into(),
        },
    ];
    let sc = start_sidecar(cfg).await;
    all_sets_ready(&sc).await;

    let cases: [(&str, &FakeUpstream, &str, &str); 5] = [
        ("/v1/models", &fm, "/v1/models", PRIMARY_KEY),
        ("/ml/v1/models/GigaChat%2FGigaChat-2-Max", &ml, "/v1/models/GigaChat%2FGigaChat-2-Max", ML_KEY),
        ("/ml/v1/chat/completions?x=a%20b&y=%2F", &ml, "/v1/chat/completions?x=a%20b&y=%2F", ML_KEY),
        ("/ml/v1/special/models", &special, "/api/models", SPECIAL_KEY),
        // A prefix matches at a segment boundary only.
        ("/ml/v1/specialist", &ml, "/v1/specialist", ML_KEY),
    ];
    for (path, up, want, key_id) in cases {
        let before = up.count();
        let (status, body) = get(&sc.url(path), None).await;
        assert_eq!(status, 200, "{path}: {body}");
        assert_eq!(up.count(), before + 1, "{path} went to its upstream");
        let seen = up.seen().pop().unwrap();
        let uri: http::Uri = seen.uri.parse().unwrap();
        assert_eq!(uri.path_and_query().unwrap().as_str(), want, "{path}");
        assert_eq!(last_key_id(&iam, up), key_id, "{path}: the route's set pays");
    }
    let (status, body) = get(&sc.url("/ml/v2/models"), None).await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(fm.count() + ml.count() + special.count(), 5);
}

// ---------------------------------------------------------------------------------------------
// 5. Caller-supplied key pairs

/// A config with caller credentials on and client authentication off.
fn byok_config(iam: &FakeIam, upstream: &str) -> Config {
    let mut cfg = config(iam, upstream);
    cfg.caller_credentials.enabled = true;
    cfg
}

#[tokio::test]
async fn two_caller_pairs_never_see_each_others_token() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let mut cfg = byok_config(&iam, &up.base_url());
    // With clients configured, a pair is the only other way in.
    cfg.clients = vec![client_with_keys("app", &["sk-app"])];
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    let url = sc.url("/v1/models");

    let mut tokens: BTreeMap<&str, String> = BTreeMap::new();
    for round in 0..2 {
        for (id, secret) in [("KEYID-user-1", "SECRET-user-1"), ("KEYID-user-2", "SECRET-user-2")] {
            let (status, body) = get(&url, Some(&format!("{id}:{secret}"))).await;
            assert_eq!(status, 200, "{id}: {body}");
            let token = up.seen().pop().unwrap().bearer().unwrap().to_string();
            assert_eq!(iam.lookup(&token).unwrap().key_id, id, "{id}'s own token");
            if round == 0 {
                tokens.insert(id, token);
            } else {
                assert_eq!(tokens[id], token, "{id}'s token is cached");
            }
        }
    }
    assert_ne!(tokens["KEYID-user-1"], tokens["KEYID-user-2"]);
    assert_eq!((iam.calls_for("KEYID-user-1"), iam.calls_for("KEYID-user-2")), (1, 1));
    let call = iam.calls().into_iter().find(|c| c.key_id == "KEYID-user-2").unwrap();
    assert_eq!(call.secret, "SECRET-user-2");
    // The same key id with another secret is another pair.
    assert_eq!(get(&url, Some("KEYID-user-1:SECRET-other")).await.0, 200);
    assert_eq!(iam.calls_for("KEYID-user-1"), 2);
    assert_ne!(up.seen().pop().unwrap().bearer().unwrap(), tokens["KEYID-user-1"]);
    // A pair in the api-key header works the same, and never reaches the upstream.
    let resp = client().get(&url).header("api-key", "KEYID-user-3:SECRET-user-3").send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let seen = up.seen().pop().unwrap();
    assert_eq!(iam.lookup(seen.bearer().unwrap()).unwrap().key_id, "KEYID-user-3");
    for (name, value) in &seen.headers {
        let v = String::from_utf8_lossy(value.as_bytes());
        assert!(!v.contains("SECRET-user-3"), "the caller's secret is not forwarded ({name}: {v})");
    }
    // The configured client still pays with the default set.
    assert_eq!(get(&url, Some("sk-app")).await.0, 200);
    assert_eq!(last_key_id(&iam, &up), PRIMARY_KEY);
}

#[tokio::test]
async fn concurrent_first_requests_for_a_pair_share_one_fetch() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let sc = start_sidecar(byok_config(&iam, &up.base_url())).await;
    sc.ready().await;
    let url = sc.url("/v1/models");
    let requests: Vec<_> = (0..20)
        .map(|_| tokio::spawn(client().get(&url).bearer_auth("KEYID-burst:SECRET-burst").send()))
        .collect();
    for r in requests {
        assert_eq!(timeout(WAIT, r).await.unwrap().unwrap().unwrap().status(), 200);
    }
    assert_eq!(iam.calls_for("KEYID-burst"), 1, "single flight");
    let tokens: std::collections::HashSet<String> =
        up.seen().iter().map(|s| s.bearer().unwrap().to_string()).collect();
    assert_eq!(tokens.len(), 1, "all 20 used the one token");
}

#[tokio::test]
async fn a_pair_the_iam_rejects_gets_401_and_is_forgotten() {
    let iam = FakeIam::start().await;
    // The IAM's reason echoes the secret, as some servers do.
    iam.set(
        "KEYID-revoked",
        Iam::Status(401, r#"{"error":"invalid credentials: secret SECRET-revoked-xyz is unknown"}"#, None),
    );
    let up = FakeUpstream::ok().await;
    let sc = start_sidecar(byok_config(&iam, &up.base_url())).await;
    sc.ready().await;
    let url = sc.url("/v1/models");

    let (status, body) = get(&url, Some("KEYID-revoked:SECRET-revoked-xyz")).await;
    assert_eq!(status, 401, "{body}");
    let message = error_code(&body, "invalid_api_key");
    assert!(!message.contains("SECRET-revoked-xyz"), "{message}");
    assert!(message.contains("rejected by IAM (401)"), "the IAM's answer: {message}");
    assert_eq!(iam.calls_for("KEYID-revoked"), 1);
    assert_eq!(up.count(), 0);

    // Evicted: the next request asks the IAM again (the pair may have been fixed meanwhile).
    iam.set("KEYID-revoked", Iam::Issue(Duration::from_secs(3600)));
    let (status, body) = get(&url, Some("KEYID-revoked:SECRET-revoked-xyz")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(iam.calls_for("KEYID-revoked"), 2);
    let metrics = sc.metrics.render();
    assert_eq!(metric_value(&metrics, r#"sidekey_caller_credential_fetches_total{result="rejected"}"#), 1.0);
    assert_eq!(metric_value(&metrics, r#"sidekey_caller_credential_fetches_total{result="success"}"#), 1.0);
}

#[tokio::test]
async fn the_pair_cache_forgets_the_least_recently_used_pair() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let mut cfg = byok_config(&iam, &up.base_url());
    cfg.caller_credentials.max_entries = 2;
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    let url = sc.url("/v1/models");
    for id in ["KEYID-lru-1", "KEYID-lru-2", "KEYID-lru-3"] {
        assert_eq!(get(&url, Some(&format!("{id}:SECRET"))).await.0, 200);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // lru-3 and lru-2 are cached; lru-1 was forgotten when lru-3 came.
    assert_eq!(get(&url, Some("KEYID-lru-3:SECRET")).await.0, 200);
    assert_eq!(iam.calls_for("KEYID-lru-3"), 1, "cached");
    assert_eq!(get(&url, Some("KEYID-lru-1:SECRET")).await.0, 200);
    assert_eq!(iam.calls_for("KEYID-lru-1"), 2, "forgotten, fetched again");
    // Bringing lru-1 back evicted lru-2 (lru-3 was used more recently).
    assert_eq!(get(&url, Some("KEYID-lru-3:SECRET")).await.0, 200);
    assert_eq!(iam.calls_for("KEYID-lru-3"), 1);
    assert_eq!(get(&url, Some("KEYID-lru-2:SECRET")).await.0, 200);
    assert_eq!(iam.calls_for("KEYID-lru-2"), 2);
}

#[tokio::test]
async fn idle_pairs_are_forgotten() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let mut cfg = byok_config(&iam, &up.base_url());
    cfg.caller_credentials.idle_evict_secs = 1;
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    let url = sc.url("/v1/models");
    assert_eq!(get(&url, Some("KEYID-idle:SECRET")).await.0, 200);
    eventually("the pair is counted", || sc.metric(r#"sidekey_caller_credentials{state="ready"}"#) == 1.0)
        .await;
    eventually("the idle pair is swept", || sc.metric(r#"sidekey_caller_credentials{state="ready"}"#) == 0.0)
        .await;
    assert_eq!(get(&url, Some("KEYID-idle:SECRET")).await.0, 200);
    assert_eq!(iam.calls_for("KEYID-idle"), 2, "fetched again after being forgotten");
}

#[tokio::test]
async fn fetches_for_caller_pairs_are_rate_limited_and_the_rest_fail_fast() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let mut cfg = byok_config(&iam, &up.base_url());
    cfg.caller_credentials.max_fetches_per_sec = 2;
    // How long a request waits for its pair's first token.
    cfg.auth.forced_refresh_timeout_secs = 1;
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    let url = sc.url("/v1/models");
    let before = iam.call_count();
    let start = Instant::now();
    let requests: Vec<_> = (0..10)
        .map(|i| {
            let req = client().get(&url).bearer_auth(format!("KEYID-flood-{i}:SECRET-{i}")).send();
            tokio::spawn(req)
        })
        .collect();
    let mut statuses = Vec::new();
    for r in requests {
        let resp = timeout(Duration::from_secs(5), r).await.expect("no hang").unwrap().unwrap();
        let status = resp.status().as_u16();
        if status != 200 {
            let body: serde_json::Value = resp.json().await.unwrap();
            error_code(&body, "no_valid_token");
            assert!(body["error"]["message"].as_str().unwrap().contains("'caller'"), "{body}");
        }
        statuses.push(status);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let calls = iam.call_count() - before;
    // A burst of 2, then 2 per second.
    let bound = 2 + (2.0 * elapsed).ceil() as usize;
    assert!(calls <= bound, "{calls} IAM calls in {elapsed:.2} s (bound {bound})");
    let ok = statuses.iter().filter(|s| **s == 200).count();
    assert!(ok >= 2, "the burst is served: {statuses:?}");
    assert!(statuses.iter().all(|s| *s == 200 || *s == 503), "{statuses:?}");
    assert!(ok < 10, "not all ten could be fetched at once: {statuses:?}");
    assert!(sc.metric(r#"sidekey_caller_credential_fetches_total{result="rate_limited"}"#) >= 1.0);
}

#[tokio::test]
async fn caller_secrets_never_reach_logs_or_metrics_and_pairs_count_as_caller() {
    let logs = captured_logs();
    let iam = FakeIam::start().await;
    iam.set("KEYID-leak-bad", Iam::Status(403, r#"{"error":"denied"}"#, None));
    let up = completion_upstream().await;
    let mut cfg = byok_config(&iam, &up.base_url());
    cfg.log.access = true;
    cfg.clients = vec![client_with_keys("app", &["sk-app-leak-check"])];
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    let url = sc.url("/v1/chat/completions");
    assert_eq!(chat(&url, "KEYID-leak-ok:SECRET-leak-ok-3f1", "GigaChat/x").await.0, 200);
    let (status, body) = chat(&url, "KEYID-leak-bad:SECRET-leak-bad-8c2", "GigaChat/x").await;
    assert_eq!(status, 401, "{body}");
    assert_eq!(chat(&url, "sk-app-leak-check", "GigaChat/x").await.0, 200);
    assert_eq!(chat(&url, "sk-wrong-leak-check", "GigaChat/x").await.0, 401);

    let metrics = sc.metrics.render();
    assert_eq!(metric_value(&metrics, r#"sidekey_client_requests_total{client="caller",code="200"}"#), 1.0);
    assert_eq!(metric_value(&metrics, r#"sidekey_client_tokens_total{client="caller",kind="total"}"#), 12.0);
    assert_eq!(sc.metric(r#"sidekey_client_requests_total{client="caller",code="401"}"#), 1.0);
    // The sweep publishes the pair gauge.
    sc.shutdown().await;
    let text = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    let access: Vec<&str> = text.lines().filter(|l| l.contains("sidekey::access")).collect();
    assert!(
        access.iter().any(|l| l.contains(r#"client="caller""#) && l.contains(r#"set="caller""#)),
        "{access:?}"
    );
    assert!(
        access.iter().any(|l| l.contains(r#"client="app""#) && l.contains(r#"set="default""#)),
        "{access:?}"
    );
    for secret in [
        "SECRET-leak-ok-3f1",
        "SECRET-leak-bad-8c2",
        "sk-app-leak-check",
        "sk-wrong-leak-check",
        &hex(digest_of("sk-app-leak-check")),
        &hex(digest_of("KEYID-leak-ok:SECRET-leak-ok-3f1")),
    ] {
        assert!(!metrics.contains(secret), "{secret} in /metrics");
        assert!(!text.contains(secret), "{secret} in the logs");
    }
    assert!(!metrics.contains("KEYID-leak"), "pairs are never a label");
}

// ---------------------------------------------------------------------------------------------
// 6. A set without a token

#[tokio::test]
async fn a_set_whose_iam_is_down_fails_only_its_own_requests() {
    let iam = FakeIam::start().await;
    iam.set(TEAM_B_KEY, Iam::Status(500, r#"{"error":"internal"}"#, None));
    iam.set(ML_KEY, Iam::Status(500, r#"{"error":"internal"}"#, None));
    let (fm, ml) = (FakeUpstream::ok().await, FakeUpstream::ok().await);
    let mut cfg = config(&iam, &fm.base_url());
    cfg.auth.sets.insert("team-b".into(), set(&iam, TEAM_B_KEY, TEAM_B_SECRET));
    let mut b = client_with_keys("billing-app", &["sk-billing"]);
    b.credentials = Some("team-b".into());
    cfg.clients = vec![client_with_keys("web-app", &["sk-web"]), b];
    let sc = start_sidecar(cfg.clone()).await;
    sc.ready().await;
    eventually("team-b tried", || iam.calls_for(TEAM_B_KEY) >= 1).await;

    let (status, body) = get(&sc.url("/v1/models"), Some("sk-billing")).await;
    assert_eq!(status, 503, "{body}");
    let message = error_code(&body, "no_valid_token");
    assert!(message.contains("credential set 'team-b'"), "{message}");
    assert_eq!(get(&sc.url("/v1/models"), Some("sk-web")).await.0, 200, "the default set still serves");
    assert_eq!(fm.count(), 1);

    // A set only a client names does not make the gateway unready; `?all` waits for every set.
    let resp = client().get(sc.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(text.contains("set default: ready"), "{text}");
    assert!(text.contains("set team-b:") && text.contains("not required for readiness"), "{text}");
    assert_eq!(client().get(sc.admin_url("/readyz?all")).send().await.unwrap().status(), 503);
    sc.shutdown().await;

    // A set a route needs does.
    cfg.auth.sets.insert("ml".into(), set(&iam, ML_KEY, "SECRET-ml-1"));
    cfg.routes =
        vec![RouteConfig { prefix: "/ml/v1".into(), base_url: ml.base_url(), credentials: "ml".into() }];
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    eventually("ml tried", || iam.calls_for(ML_KEY) >= 1).await;
    let resp = client().get(sc.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    let text = resp.text().await.unwrap();
    assert!(text.contains("set ml:") && text.contains("set default: ready"), "{text}");
    let (status, body) = get(&sc.url("/ml/v1/models"), Some("sk-web")).await;
    assert_eq!(status, 503);
    assert!(error_code(&body, "no_valid_token").contains("credential set 'ml'"), "{body}");
    assert_eq!(get(&sc.url("/v1/models"), Some("sk-web")).await.0, 200);
    assert_eq!(ml.count(), 0);
}

// ---------------------------------------------------------------------------------------------
// 7. A network-facing proxy needs client authentication

/// `sidekey check --config <file>` on the real binary: exit code and stderr.
fn check(test: &str, toml: &str) -> (Option<i32>, String) {
    let dir = temp_dir(test);
    let file = dir.join("sidekey.toml");
    std::fs::write(&file, toml).unwrap();
    let out = std::process::Command::new(process::BIN)
        .args(["check", "--config"])
        .arg(&file)
        .env_clear()
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_non_loopback_proxy_without_client_auth_refuses_to_start() {
    let base = r#"
[server]
listen = "0.0.0.0:0"
allow_non_loopback = true
OPEN

[[auth.credentials]]
name = "primary"
key_id = "k"
secret = "s"
"#;
    let (code, stderr) = check("open", &base.replace("OPEN", ""));
    assert_eq!(code, Some(64), "{stderr}");
    assert!(stderr.contains("server.listen") && stderr.contains("[[clients]]"), "{stderr}");
    assert!(stderr.contains("open_proxy"), "says how to opt out: {stderr}");

    let (code, stderr) = check("open-proxy", &base.replace("OPEN", "open_proxy = true"));
    assert_eq!(code, Some(0), "{stderr}");

    let digest = hex(digest_of("sk-some-app"));
    let with_clients =
        format!("{}\n[[clients]]\nname = \"app\"\nkey_sha256 = [\"{digest}\"]\n", base.replace("OPEN", ""));
    let (code, stderr) = check("with-clients", &with_clients);
    assert_eq!(code, Some(0), "{stderr}");
}

// ---------------------------------------------------------------------------------------------
// 9. Per-client metrics

#[tokio::test]
async fn client_metrics_count_requests_and_tokens_per_client() {
    let iam = FakeIam::start().await;
    let up = completion_upstream().await;
    let mut cfg = config(&iam, &up.base_url());
    cfg.clients = vec![client_with_keys("app-a", &["sk-a"]), client_with_keys("app-b", &["sk-b"])];
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    // Present from the first scrape.
    let fresh = sc.metrics.render();
    assert!(fresh.contains(r#"sidekey_client_requests_total{client="app-b",code="200"} 0"#), "{fresh}");
    let url = sc.url("/v1/chat/completions");
    for _ in 0..3 {
        assert_eq!(chat(&url, "sk-a", "GigaChat/GigaChat-2-Max").await.0, 200);
    }
    assert_eq!(chat(&url, "sk-b", "GigaChat/GigaChat-2-Max").await.0, 200);
    let m = sc.metrics.render();
    let v = |s: &str| metric_value(&m, s);
    assert_eq!(v(r#"sidekey_client_requests_total{client="app-a",code="200"}"#), 3.0);
    assert_eq!(v(r#"sidekey_client_requests_total{client="app-b",code="200"}"#), 1.0);
    assert_eq!(v(r#"sidekey_client_tokens_total{client="app-a",kind="prompt"}"#), 21.0);
    assert_eq!(v(r#"sidekey_client_tokens_total{client="app-a",kind="completion"}"#), 15.0);
    assert_eq!(v(r#"sidekey_client_tokens_total{client="app-a",kind="total"}"#), 36.0);
    assert_eq!(v(r#"sidekey_client_tokens_total{client="app-b",kind="total"}"#), 12.0);
    // Token metrics carry the set.
    assert!(m.lines().any(|l| l.starts_with("sidekey_") && l.contains(r#"set="default""#)), "{m}");
}

// ---------------------------------------------------------------------------------------------
// 8. The OpenAI Python SDK drives each capability

/// Runs a Python snippet with `BASE_URL` and `API_KEY` set; returns its stdout.
async fn python(base_url: &str, api_key: &str, script: &str) -> String {
    support::python::run(script, &[("BASE_URL", base_url), ("API_KEY", api_key)]).await
}

const SDK_CHAT: &str = r#"
import os, openai
client = openai.OpenAI(base_url=os.environ["BASE_URL"], api_key=os.environ["API_KEY"], max_retries=0)
try:
    r = client.chat.completions.create(model="GigaChat/GigaChat-2-Max",
        messages=[{"role": "user", "content": "hi"}])
    print("ok", r.choices[0].message.content, r.usage.total_tokens)
except openai.AuthenticationError as e:
    print("auth-error", e.status_code, e.code)
"#;

#[tokio::test]
async fn the_python_sdk_uses_a_client_key() {
    let iam = FakeIam::start().await;
    let up = completion_upstream().await;
    let mut cfg = config(&iam, &up.base_url());
    cfg.clients = vec![client_with_keys("billing-app", &["sk-billing-sdk"])];
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    let out = python(&sc.url("/v1"), "sk-billing-sdk", SDK_CHAT).await;
    assert_eq!(out.trim(), "ok hello 12");
    assert_eq!(last_key_id(&iam, &up), PRIMARY_KEY);
    let out = python(&sc.url("/v1"), "sk-not-a-client", SDK_CHAT).await;
    assert_eq!(out.trim(), "auth-error 401 invalid_api_key");
    assert_eq!(up.count(), 1);
    assert_eq!(sc.metric(r#"sidekey_client_tokens_total{client="billing-app",kind="total"}"#), 12.0);
}

#[tokio::test]
async fn the_python_sdk_uses_a_route() {
    let iam = FakeIam::start().await;
    let fm = FakeUpstream::ok().await;
    let ml = FakeUpstream::start(|req| async move {
        let path = req.uri().path().to_string();
        if path == "/v1/models/GigaChat%2FGigaChat-2-Max" {
            json_response(
                200,
                r#"{"id":"GigaChat/GigaChat-2-Max","object":"model","created":0,"owned_by":"ml-inference"}"#,
            )
        } else {
            json_response(404, r#"{"error":{"message":"no such path","type":"invalid_request_error"}}"#)
        }
    })
    .await;
    let mut cfg = config(&iam, &fm.base_url());
    cfg.auth.sets.insert("ml".into(), set(&iam, ML_KEY, "SECRET-ml-1"));
    cfg.routes =
        vec![RouteConfig { prefix: "/ml/v1".into(), base_url: ml.base_url(), credentials: "ml".into() }];
    let sc = start_sidecar(cfg).await;
    all_sets_ready(&sc).await;
    let out = python(
        &sc.url("/ml/v1"),
        "unused",
        r#"
import os, openai
client = openai.OpenAI(base_url=os.environ["BASE_URL"], api_key=os.environ["API_KEY"], max_retries=0)
m = client.models.retrieve("GigaChat/GigaChat-2-Max")
print(m.id, m.owned_by)
"#,
    )
    .await;
    assert_eq!(out.trim(), "GigaChat/GigaChat-2-Max ml-inference");
    assert_eq!(fm.count(), 0);
    assert_eq!(last_key_id(&iam, &ml), ML_KEY);
}

#[tokio::test]
async fn the_python_sdk_brings_its_own_key_pair() {
    let iam = FakeIam::start().await;
    let up = completion_upstream().await;
    let sc = start_sidecar(byok_config(&iam, &up.base_url())).await;
    sc.ready().await;
    let out = python(&sc.url("/v1"), "KEYID-sdk-user:SECRET-sdk-user", SDK_CHAT).await;
    assert_eq!(out.trim(), "ok hello 12");
    assert_eq!(last_key_id(&iam, &up), "KEYID-sdk-user");
    iam.set("KEYID-sdk-revoked", Iam::Status(401, r#"{"error":"invalid credentials"}"#, None));
    let out = python(&sc.url("/v1"), "KEYID-sdk-revoked:SECRET-x", SDK_CHAT).await;
    assert_eq!(out.trim(), "auth-error 401 invalid_api_key");
}
