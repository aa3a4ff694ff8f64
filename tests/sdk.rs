//! The official OpenAI Python SDK as a test driver: what real clients send (percent-encoded ids
//! in paths, their own headers, streaming) through sidekey. `.ci/run` installs the `openai`
//! package; without it these tests fail with a message saying so.

mod support;

use std::time::Duration;

use http_body_util::BodyExt;
use support::*;

async fn python(base_url: &str, script: &str) -> String {
    support::python::run(script, &[("BASE_URL", base_url), ("OPENAI_API_KEY", "sk-not-used-by-sidekey")])
        .await
}

#[tokio::test]
async fn the_python_sdk_retrieves_a_model_whose_id_has_a_slash() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::start(|req| async move {
        let path = req.uri().path().to_string();
        req.into_body().collect().await.unwrap();
        if path == "/v1/models/GigaChat%2FGigaChat-2-Max" {
            json_response(
                200,
                r#"{"id":"GigaChat/GigaChat-2-Max","object":"model","created":0,"owned_by":"cloudru"}"#,
            )
        } else {
            json_response(404, r#"{"error":{"message":"no such path","type":"invalid_request_error"}}"#)
        }
    })
    .await;
    let sc = start_sidecar(config(&iam, &up.base_url())).await;
    sc.ready().await;
    let out = python(
        &sc.url("/v1"),
        r#"
import os, openai
client = openai.OpenAI(base_url=os.environ["BASE_URL"], max_retries=0)
print(client.models.retrieve("GigaChat/GigaChat-2-Max").id)
"#,
    )
    .await;
    assert_eq!(out.trim(), "GigaChat/GigaChat-2-Max");
    let seen = up.seen();
    assert_eq!(seen.len(), 1);
    assert!(seen[0].uri.ends_with("/v1/models/GigaChat%2FGigaChat-2-Max"), "byte for byte: {}", seen[0].uri);
    assert!(seen[0].bearer().is_some_and(|t| iam.lookup(t).is_some()), "the IAM token was injected");
}

#[tokio::test]
async fn the_python_sdk_streams_a_chat_completion_through_the_demo_upstream() {
    let demo = sidekey::dev::DemoServers::start(Duration::from_secs(3600)).await.unwrap();
    let mut cfg = sidekey::Config::default();
    cfg.server.listen = "127.0.0.1:0".parse().unwrap();
    cfg.server.admin_listen = "127.0.0.1:0".parse().unwrap();
    demo.configure(&mut cfg);
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    let out = python(
        &sc.url("/v1"),
        r#"
import os, openai
client = openai.OpenAI(base_url=os.environ["BASE_URL"], max_retries=0)
stream = client.chat.completions.create(model="demo/echo", stream=True,
    messages=[{"role": "user", "content": "stream me please"}])
print("".join(c.choices[0].delta.content or "" for c in stream if c.choices))
"#,
    )
    .await;
    assert!(out.contains("stream me please"), "{out}");
}
