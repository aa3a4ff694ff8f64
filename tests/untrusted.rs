//! Untrusted callers end to end: signed keys minted like a backend would, their scope and
//! budget enforced on the request path, budgets shared by two sidekeys through a real Redis,
//! and the usage callback received by a real HTTP receiver.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http_body_util::BodyExt;
use sidekey::signed::mint::{mint, MintArgs};
use sidekey::signed::SignedKeysConfig;
use support::redis::RedisServer;
use support::*;

const SECRET: &str = "a-signing-secret-that-is-long-enough-0123456789";

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

/// A temporary signing-secret file.
struct SecretFile(std::path::PathBuf);

impl SecretFile {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "sidekey-untrusted-{}-{}",
            std::process::id(),
            fastrand::u64(..)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("signing-key");
        std::fs::write(&path, format!("{SECRET}\n")).unwrap();
        Self(path)
    }

    fn key(&self, tweak: impl FnOnce(&mut MintArgs)) -> String {
        let mut args = MintArgs::new(&self.0);
        tweak(&mut args);
        mint(&args, now()).unwrap()
    }
}

impl Drop for SecretFile {
    fn drop(&mut self) {
        if let Some(dir) = self.0.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

/// A callback receiver that keeps every event it is sent.
async fn receiver() -> (FakeUpstream, Arc<Mutex<Vec<serde_json::Value>>>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let e = Arc::clone(&events);
    let up = FakeUpstream::start(move |req| {
        let e = Arc::clone(&e);
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            if let Ok(serde_json::Value::Array(batch)) = serde_json::from_slice(&body) {
                e.lock().unwrap().extend(batch);
            }
            json_response(200, "{}")
        }
    })
    .await;
    (up, events)
}

async fn demo_gateway(
    secret: &SecretFile,
    tweak: impl FnOnce(&mut sidekey::Config),
) -> (Sidecar, sidekey::dev::DemoServers) {
    let demo = sidekey::dev::DemoServers::start(Duration::from_secs(3600)).await.unwrap();
    let mut cfg = sidekey::Config::default();
    cfg.server.listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.admin_listen = "127.0.0.1:0".parse().unwrap();
    demo.configure(&mut cfg);
    cfg.signed_keys =
        Some(SignedKeysConfig { hs256_secret_file: Some(secret.0.clone()), ..SignedKeysConfig::default() });
    tweak(&mut cfg);
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    (sc, demo)
}

async fn chat(sc: &Sidecar, key: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    let resp =
        client().post(sc.url("/v1/chat/completions")).bearer_auth(key).json(&body).send().await.unwrap();
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap();
    (status, serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)))
}

fn hello(model: &str) -> serde_json::Value {
    serde_json::json!({"model": model, "messages": [{"role": "user", "content": "one two three four five"}]})
}

#[tokio::test]
async fn a_signed_key_is_scoped_and_refused_clearly() {
    let secret = SecretFile::new();
    let (sc, _demo) = demo_gateway(&secret, |_| {}).await;
    let scoped = secret.key(|a| {
        a.models = vec!["demo/*".into()];
        a.max_tokens = Some(64);
    });
    let (status, _) = chat(&sc, &scoped, hello("demo/echo")).await;
    assert_eq!(status, 200);
    let (status, body) = chat(&sc, &scoped, hello("GigaChat/GigaChat-2-Max")).await;
    assert_eq!(status, 403, "{body}");
    let mut over = hello("demo/echo");
    over["max_tokens"] = 65.into();
    let (status, body) = chat(&sc, &scoped, over).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("max_tokens_exceeded")), "{body}");
    // Expired (beyond the 30 s leeway), forged, garbage: 401 invalid_api_key, the key never echoed.
    let mut args = MintArgs::new(&secret.0);
    args.ttl_secs = 60;
    let expired = mint(&args, now() - 3600).unwrap();
    let other = SecretFile::new();
    std::fs::write(&other.0, "another-secret-that-is-long-enough-for-hs256-0000\n").unwrap();
    let forged = other.key(|_| {});
    for (key, reason) in [(&expired, "expired"), (&forged, "signature")] {
        let (status, body) = chat(&sc, key, hello("demo/echo")).await;
        assert_eq!((status, body["error"]["code"].as_str()), (401, Some("invalid_api_key")), "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        assert!(message.contains(reason), "{message}");
        assert!(!message.contains(&key[..20]) && !body.to_string().contains(key.as_str()), "{body}");
    }
    // With signed keys on, a request without one is not trusted (no [[clients]] needed).
    for auth in [None, Some("sk-not-a-signed-key")] {
        let mut req = client().post(sc.url("/v1/chat/completions")).json(&hello("demo/echo"));
        if let Some(k) = auth {
            req = req.bearer_auth(k);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 401, "{auth:?}");
    }
    let metrics = sc.metrics.render();
    for result in ["accepted", "expired", "bad_signature", "out_of_scope"] {
        let v = metric_value(&metrics, &format!("sidekey_signed_keys_total{{result=\"{result}\"}}"));
        assert!(v >= 1.0, "{result}: {metrics}");
    }
    assert!(!metrics.contains(&scoped[..30]) && !metrics.contains(SECRET));
}

#[tokio::test]
async fn a_budget_admits_until_used_up_and_the_crossing_request_completes() {
    let secret = SecretFile::new();
    let (sc, _demo) = demo_gateway(&secret, |_| {}).await;
    let key = secret.key(|a| a.budget_tokens = Some(20));
    let mut served = 0;
    let mut last = (0, serde_json::Value::Null);
    for _ in 0..10 {
        last = chat(&sc, &key, hello("demo/echo")).await;
        if last.0 != 200 {
            break;
        }
        served += 1;
        // The charge lands when the response ends, in the background.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!((1..10).contains(&served), "served {served}");
    assert_eq!((last.0, last.1["error"]["code"].as_str()), (429, Some("budget_exhausted")), "{}", last.1);
    // Another key is unaffected.
    let fresh = secret.key(|a| a.budget_tokens = Some(20));
    assert_eq!(chat(&sc, &fresh, hello("demo/echo")).await.0, 200);
    // A stream cannot escape the budget: usage is requested for budgeted keys.
    let streaming = secret.key(|a| a.budget_tokens = Some(5));
    let mut body = hello("demo/echo");
    body["stream"] = true.into();
    // Even a caller that asks for no usage gets it: the budget must see what the stream used.
    body["stream_options"] = serde_json::json!({"include_usage": false});
    let resp = client()
        .post(sc.url("/v1/chat/completions"))
        .bearer_auth(&streaming)
        .json(&body)
        .send()
        .await
        .unwrap();
    let text = resp.text().await.unwrap();
    assert!(text.contains("\"usage\""), "usage was requested: {text}");
    let metrics = sc.metrics.clone();
    eventually("the stream is charged", || {
        let t = metrics.render();
        metric_value(&t, r#"sidekey_llm_tokens_total{kind="total",model="demo/echo"}"#) > 0.0
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(chat(&sc, &streaming, hello("demo/echo")).await.0, 429);
}

#[tokio::test]
async fn two_gateways_share_one_budget_in_redis_and_fail_closed_without_it() {
    let mut redis = RedisServer::start().await;
    let secret = SecretFile::new();
    let url = redis.url();
    let store = |c: &mut sidekey::Config| {
        if let Some(sk) = c.signed_keys.as_mut() {
            sk.budget_store = url.clone();
        }
    };
    let (a, _demo_a) = demo_gateway(&secret, store).await;
    let (b, _demo_b) = demo_gateway(&secret, store).await;
    let key = secret.key(|a| a.budget_tokens = Some(30));
    let mut served = 0;
    let mut refused = None;
    for i in 0..20 {
        let gw = if i % 2 == 0 { &a } else { &b };
        let (status, body) = chat(gw, &key, hello("demo/echo")).await;
        if status != 200 {
            refused = Some((i, status, body));
            break;
        }
        served += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (at, status, body) = refused.expect("the shared budget runs out");
    assert_eq!((status, body["error"]["code"].as_str()), (429, Some("budget_exhausted")), "{body}");
    assert!(served >= 2, "both gateways charged one total: served {served}, refused at {at}");
    // Both refuse now, whichever charged last.
    assert_eq!(chat(&a, &key, hello("demo/echo")).await.0, 429);
    assert_eq!(chat(&b, &key, hello("demo/echo")).await.0, 429);
    // Redis goes away: budgeted keys are refused with 503 and Retry-After; others still work.
    redis.kill();
    let fresh = secret.key(|a| a.budget_tokens = Some(1000));
    let resp = client()
        .post(a.url("/v1/chat/completions"))
        .bearer_auth(&fresh)
        .json(&hello("demo/echo"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let json: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(json["error"]["code"], "budget_unavailable");
    let unbudgeted = secret.key(|_| {});
    assert_eq!(chat(&a, &unbudgeted, hello("demo/echo")).await.0, 200);
    assert!(metric_value(&a.metrics.render(), "sidekey_budget_store_errors_total") >= 1.0);
}

#[tokio::test]
async fn mint_then_stream_with_the_python_sdk_then_the_backend_is_called_back() {
    let secret = SecretFile::new();
    let (rx, events) = receiver().await;
    let (sc, _demo) = demo_gateway(&secret, |c| {
        c.usage.callback = Some(sidekey::callback::CallbackConfig {
            url: format!("http://{}/v1/callback/usage", rx.addr),
            ..Default::default()
        });
    })
    .await;
    // The backend mints with the CLI, as the README shows.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sidekey"))
        .args([
            "mint",
            "--secret-file",
            secret.0.to_str().unwrap(),
            "--model",
            "demo/*",
            "--max-tokens",
            "512",
        ])
        .args(["--budget-tokens", "20000", "--ttl", "10m", "--sub", "user-42", "--event-id", "ev-1"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let script = r#"
import os, openai
client = openai.OpenAI(base_url=os.environ["BASE_URL"], api_key=os.environ["SIGNED_KEY"], max_retries=0)
stream = client.chat.completions.create(model="demo/echo", stream=True,
    messages=[{"role": "user", "content": "stream me please"}])
print("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
"#;
    let out = support::python::run(script, &[("BASE_URL", &sc.url("/v1")), ("SIGNED_KEY", &key)]).await;
    assert!(out.contains("stream me please"));
    let ev = Arc::clone(&events);
    eventually("the usage event arrives", || !ev.lock().unwrap().is_empty()).await;
    let event = events.lock().unwrap()[0].clone();
    assert_eq!(event["event_id"], "ev-1");
    assert_eq!(event["sub"], "user-42");
    assert_eq!(event["client"], "signed");
    assert_eq!(event["set"], "default");
    assert_eq!(event["endpoint"], "chat_completions");
    assert_eq!(event["stream"], true);
    assert_eq!(event["outcome"], "completed");
    assert_eq!(event["status"], 200);
    assert!(event["jti"].as_str().is_some_and(|j| j.len() >= 16), "{event}");
    assert!(event["usage"]["total_tokens"].as_u64().is_some_and(|t| t > 0), "{event}");
    let text = event.to_string();
    assert!(!text.contains(&key) && !text.contains("stream me please"), "no key, no prompt text: {text}");
}
