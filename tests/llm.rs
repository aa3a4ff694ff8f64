//! LLM-aware features end to end: usage accounting from JSON and SSE responses, the
//! `include_stream_usage` rewrite, the request policy, and the bounded model label.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use http_body_util::BodyExt;
use support::*;
use tokio::time::timeout;

/// The demo upstream (`sidekey dev`'s echo server) behind sidekey, with `tweak` applied.
async fn demo_sidecar(tweak: impl FnOnce(&mut sidekey::Config)) -> (Sidecar, sidekey::dev::DemoServers) {
    let demo = sidekey::dev::DemoServers::start(Duration::from_secs(3600)).await.unwrap();
    let mut cfg = sidekey::Config::default();
    cfg.server.listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.admin_listen = "127.0.0.1:0".parse().unwrap();
    demo.configure(&mut cfg);
    tweak(&mut cfg);
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    (sc, demo)
}

fn chat(model: &str, stream: bool) -> String {
    serde_json::json!({"model": model, "stream": stream, "messages": [{"role": "user", "content": "one two three"}]})
        .to_string()
}

async fn post(sc: &Sidecar, path: &str, body: String) -> reqwest::Response {
    client().post(sc.url(path)).header("content-type", "application/json").body(body).send().await.unwrap()
}

#[tokio::test]
async fn usage_is_counted_from_json_responses() {
    let (sc, _demo) = demo_sidecar(|_| {}).await;
    let resp = post(&sc, "/v1/chat/completions", chat("demo/echo", false)).await;
    let json: serde_json::Value = resp.json().await.unwrap();
    let usage = &json["usage"];
    let metrics = sc.metrics.clone();
    eventually("usage recorded", || {
        metrics.llm_requests_total.with_label_values(&["demo/echo", "false"]).get() == 1
    })
    .await;
    for (kind, field) in
        [("prompt", "prompt_tokens"), ("completion", "completion_tokens"), ("total", "total_tokens")]
    {
        let got = sc.metric(&format!(r#"sidekey_llm_tokens_total{{kind="{kind}",model="demo/echo"}}"#));
        assert_eq!(got, usage[field].as_f64().unwrap(), "{kind}");
    }
    let resp = post(&sc, "/v1/embeddings", r#"{"model":"demo/embed","input":["a b","c"]}"#.into()).await;
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    eventually("embedding usage", || {
        metrics.llm_tokens_total.with_label_values(&["demo/embed", "prompt"]).get() == 3
    })
    .await;
}

#[tokio::test]
async fn stream_usage_is_requested_and_counted_without_delaying_chunks() {
    let (sc, _demo) = demo_sidecar(|c| c.usage.include_stream_usage = true).await;
    let resp = post(&sc, "/v1/chat/completions", chat("demo/echo", true)).await;
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut events = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = timeout(WAIT, stream.next()).await.unwrap() {
        events.push(String::from_utf8(chunk.unwrap().to_vec()).unwrap());
    }
    // One event per chunk: nothing was held back and merged.
    assert!(events.len() >= 6, "{events:?}");
    let usage_event = events.iter().find(|e| e.contains("\"usage\"")).expect("the extra usage chunk");
    assert!(usage_event.contains("\"choices\":[]"), "{usage_event}");
    let metrics = sc.metrics.clone();
    eventually("stream usage", || {
        metrics.llm_requests_total.with_label_values(&["demo/echo", "true"]).get() == 1
    })
    .await;
    // "one two three" → 3 prompt tokens, "echo: one two three" → 4 completion tokens.
    assert_eq!(sc.metric(r#"sidekey_llm_tokens_total{kind="prompt",model="demo/echo"}"#), 3.0);
    assert_eq!(sc.metric(r#"sidekey_llm_tokens_total{kind="completion",model="demo/echo"}"#), 4.0);
    assert_eq!(sc.metric("sidekey_policy_rewrites_total"), 1.0);
}

#[tokio::test]
async fn without_include_stream_usage_the_body_is_untouched() {
    let iam = FakeIam::start().await;
    let bodies = Arc::new(Mutex::new(Vec::new()));
    let b = Arc::clone(&bodies);
    let up = FakeUpstream::start(move |req| {
        let b = Arc::clone(&b);
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            b.lock().unwrap().push(body);
            json_response(200, "{}")
        }
    })
    .await;
    let sc = start_sidecar(config(&iam, &up.base_url())).await;
    sc.ready().await;
    let original = r#"{"stream":true,  "model":"m","messages":[]}"#;
    post(&sc, "/v1/chat/completions", original.into()).await;
    assert_eq!(bodies.lock().unwrap()[0], original.as_bytes(), "byte for byte");
}

#[tokio::test]
async fn policy_refuses_models_and_caps_max_tokens() {
    let iam = FakeIam::start().await;
    let bodies = Arc::new(Mutex::new(Vec::<serde_json::Value>::new()));
    let b = Arc::clone(&bodies);
    let up = FakeUpstream::start(move |req| {
        let b = Arc::clone(&b);
        async move {
            let body = req.into_body().collect().await.unwrap().to_bytes();
            if !body.is_empty() {
                b.lock().unwrap().push(serde_json::from_slice(&body).unwrap());
            }
            json_response(200, "{}")
        }
    })
    .await;
    let mut cfg = config(&iam, &up.base_url());
    cfg.policy.allowed_models = vec!["GigaChat/*".into()];
    cfg.policy.max_tokens = Some(256);
    cfg.policy.max_tokens_mode = sidekey::config::MaxTokensMode::Clamp;
    cfg.policy.set_max_tokens_when_missing = true;
    let sc = start_sidecar(cfg).await;
    sc.ready().await;

    let resp = post(&sc, "/v1/chat/completions", r#"{"model":"Qwen/Qwen3-235B","messages":[]}"#.into()).await;
    assert_eq!(resp.status(), 403);
    let json: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(json["error"]["code"], "model_not_allowed");
    assert!(json["error"]["message"].as_str().unwrap().contains("Qwen/Qwen3-235B"));
    assert_eq!(up.count(), 0);

    let resp =
        post(&sc, "/v1/chat/completions", r#"{"model":"GigaChat/GigaChat-2-Max","max_tokens":9000}"#.into())
            .await;
    assert_eq!(resp.status(), 200);
    let resp = post(&sc, "/v1/completions", r#"{"model":"GigaChat/GigaChat-2","prompt":"x"}"#.into()).await;
    assert_eq!(resp.status(), 200);
    let seen = bodies.lock().unwrap().clone();
    assert_eq!(seen[0]["max_tokens"], 256, "clamped");
    assert_eq!(seen[1]["max_tokens"], 256, "set when missing");
    assert_eq!(seen[1]["prompt"], "x");
    // Endpoints the policy does not cover pass untouched.
    let resp = client().get(sc.url("/v1/models")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(sc.metric(r#"sidekey_policy_rejections_total{reason="model_not_allowed"}"#), 1.0);
    assert_eq!(sc.metric("sidekey_policy_rewrites_total"), 2.0);
}

#[tokio::test]
async fn policy_reject_mode_answers_400() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let mut cfg = config(&iam, &up.base_url());
    cfg.policy.max_tokens = Some(100);
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    let resp = post(&sc, "/v1/responses", r#"{"model":"m","max_output_tokens":101}"#.into()).await;
    assert_eq!(resp.status(), 400);
    let json: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(json["error"]["code"], "max_tokens_exceeded");
    assert_eq!(up.count(), 0);
    assert_eq!(sc.metric(r#"sidekey_policy_rejections_total{reason="max_tokens_exceeded"}"#), 1.0);
}

#[tokio::test]
async fn model_labels_are_bounded_and_malformed_usage_is_only_counted() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::start(|req| async move {
        let body = req.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        if v["model"] == "broken" {
            return json_response(200, "{\"model\": \"broken\", truncated");
        }
        let out = serde_json::json!({"model": v["model"], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}});
        json_response(200, &out.to_string())
    })
    .await;
    let mut cfg = config(&iam, &up.base_url());
    cfg.metrics.max_models = 2;
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    for model in ["a", "b", "c", "d", "a"] {
        let resp = post(&sc, "/v1/chat/completions", format!(r#"{{"model":"{model}"}}"#)).await;
        resp.bytes().await.unwrap();
    }
    let resp = post(&sc, "/v1/chat/completions", r#"{"model":"broken"}"#.into()).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.text().await.unwrap(), "{\"model\": \"broken\", truncated", "passed through untouched");
    let metrics = sc.metrics.clone();
    eventually("malformed counted", || metrics.usage_malformed_total.get() == 1).await;
    assert_eq!(sc.metric(r#"sidekey_llm_tokens_total{kind="total",model="a"}"#), 4.0);
    assert_eq!(sc.metric(r#"sidekey_llm_tokens_total{kind="total",model="other"}"#), 4.0);
    assert_eq!(sc.metric(r#"sidekey_llm_tokens_total{kind="total",model="c"}"#), 0.0);
}

#[tokio::test]
async fn the_policy_cannot_be_sidestepped_by_content_type_or_path_spelling() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let mut cfg = config(&iam, &up.base_url());
    cfg.policy.allowed_models = vec!["GigaChat/*".into()];
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    let c = client();
    let body = r#"{"model":"Qwen/Qwen3-235B","messages":[]}"#;
    for (path, content_type) in [
        ("/v1/chat/completions", None),
        ("/v1/chat/completions", Some("text/plain")),
        ("/v1/chat/%63ompletions", Some("application/json")),
        ("/v1//chat/completions", Some("application/json")),
        ("/v1/Chat/Completions", Some("application/json")),
    ] {
        let mut req = c.post(sc.url(path)).body(body);
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        let resp = req.send().await.unwrap();
        assert_eq!(resp.status(), 403, "{path} {content_type:?}");
    }
    let resp = c
        .post(sc.url("/v1/chat/completions"))
        .header("content-type", "text/plain")
        .body("hello")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400, "a body the policy cannot read is refused while it enforces");
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn the_policy_fails_closed_on_endpoints_it_cannot_judge() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let mut cfg = config(&iam, &up.base_url());
    cfg.policy.allowed_models = vec!["GigaChat/*".into()];
    cfg.policy.max_tokens = Some(100);
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    let c = client();
    let forbidden = r#"{"model":"Qwen/Qwen3-235B","input":"x","prompt":"x","messages":[]}"#;
    for path in [
        "/v1/batches",
        "/v1/threads/runs",
        "/v1/images/generations",
        "/v1/audio/speech",
        "/v1/moderations",
        "/v1/rerank",
    ] {
        let resp = c
            .post(sc.url(path))
            .header("content-type", "application/json")
            .body(forbidden)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 403, "{path}");
        let json: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(json["error"]["code"], "endpoint_not_allowed", "{path}");
    }
    for path in ["/v1/chat/completions;x", "/v1/chat/completions%3Bx"] {
        let resp = c
            .post(sc.url(path))
            .header("content-type", "application/json")
            .body(forbidden)
            .send()
            .await
            .unwrap();
        assert!(matches!(resp.status().as_u16(), 400 | 403), "{path}: {}", resp.status());
    }
    for method in [http::Method::PUT, http::Method::PATCH] {
        let resp = c
            .request(method.clone(), sc.url("/v1/chat/completions"))
            .header("content-type", "application/json")
            .body(r#"{"model":"GigaChat/GigaChat-2-Max"}"#)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 405, "{method}");
    }
    // n multiplies the cap: refused; no max_tokens: the cap is set.
    let resp =
        post(&sc, "/v1/chat/completions", r#"{"model":"GigaChat/GigaChat-2-Max","n":128}"#.into()).await;
    assert_eq!(resp.status(), 400);
    assert_eq!(resp.json::<serde_json::Value>().await.unwrap()["error"]["code"], "max_choices_exceeded");
    assert_eq!(up.count(), 0, "nothing the policy refused reached upstream");
    let resp =
        post(&sc, "/v1/chat/completions", r#"{"model":"GigaChat/GigaChat-2-Max","messages":[]}"#.into())
            .await;
    assert_eq!(resp.status(), 200);
    let resp = c.get(sc.url("/v1/models")).send().await.unwrap();
    assert_eq!(resp.status(), 200, "the model list stays allowed");
    // six endpoints, and `completions%3Bx` (not chat completions to us, so not allowed)
    assert_eq!(sc.metric(r#"sidekey_policy_rejections_total{reason="endpoint_not_allowed"}"#), 7.0);
}

#[tokio::test]
async fn policy_bodies_over_their_own_limit_get_413() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let mut cfg = config(&iam, &up.base_url());
    cfg.policy.allowed_models = vec!["*".into()];
    cfg.policy.max_body_bytes = 1000;
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    let big = format!(r#"{{"model":"m","messages":[{{"role":"user","content":"{}"}}]}}"#, "x".repeat(2000));
    let resp = post(&sc, "/v1/chat/completions", big).await;
    assert_eq!(resp.status(), 413);
    let json: serde_json::Value = resp.json().await.unwrap();
    assert!(json["error"]["message"].as_str().unwrap().contains("policy.max_body_bytes"), "{json}");
    assert_eq!(up.count(), 0);
}

#[tokio::test]
async fn the_request_model_labels_usage_when_the_response_names_none() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::start(|req| async move {
        req.into_body().collect().await.unwrap();
        json_response(200, r#"{"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}"#)
    })
    .await;
    let sc = start_sidecar(config(&iam, &up.base_url())).await;
    sc.ready().await;
    // As the Python SDK orders it: messages first, model after them.
    let long = "word ".repeat(20_000);
    let body = serde_json::json!({"messages": [{"role": "user", "content": long}], "model": "GigaChat/GigaChat-2-Max"});
    let resp = post(&sc, "/v1/chat/completions", body.to_string()).await;
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    let metrics = sc.metrics.clone();
    eventually("usage under the request's model", || {
        metrics.llm_tokens_total.with_label_values(&["GigaChat/GigaChat-2-Max", "total"]).get() == 7
    })
    .await;
    assert_eq!(sc.metric(r#"sidekey_llm_tokens_total{kind="total",model="unknown"}"#), 0.0);
}
