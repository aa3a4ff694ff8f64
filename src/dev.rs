//! `sidekey dev`: a self-contained demo, like `vault server -dev`. It starts, in-process and on
//! loopback, a fake token server speaking the Cloud.ru IAM protocol (30-second tokens, so refreshes
//! show on `/metrics`) and a small OpenAI-compatible upstream that echoes, then runs sidekey
//! against them. No credentials, nothing leaves the machine.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::app::{App, AppError};
use crate::config::{Config, CredentialConfig};
use crate::server::{serve, ServeSettings};

/// The demo's credential (accepted by the fake IAM only).
pub const DEV_KEY_ID: &str = "dev-key-id";
pub const DEV_SECRET: &str = "dev-secret";
/// Token lifetime in the demo: short, so a user sees refreshes.
pub const DEV_TOKEN_LIFETIME: Duration = Duration::from_secs(30);

type DemoBody = BoxBody<Bytes, Infallible>;

/// Tokens the fake IAM issued, with their expiry; the demo upstream checks against them.
#[derive(Debug)]
pub struct DemoState {
    lifetime: Duration,
    issued: Mutex<HashMap<String, Instant>>,
    counter: AtomicU64,
}

impl DemoState {
    fn issue(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed) + 1;
        let token = format!("demo.{n}.{:016x}", fastrand::u64(..));
        let mut issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        issued.retain(|_, exp| *exp > now);
        issued.insert(token.clone(), now + self.lifetime);
        token
    }

    fn valid(&self, bearer: Option<&HeaderValue>) -> bool {
        let Some(token) = bearer.and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer ")) else {
            return false;
        };
        let issued = self.issued.lock().unwrap_or_else(|e| e.into_inner());
        issued.get(token).is_some_and(|exp| *exp > Instant::now())
    }
}

/// The fake IAM and demo upstream, running until `stop` fires.
#[derive(Debug)]
pub struct DemoServers {
    pub iam_addr: SocketAddr,
    pub upstream_addr: SocketAddr,
    pub state: Arc<DemoState>,
    stop: CancellationToken,
}

impl DemoServers {
    /// Binds both on `127.0.0.1:0` and starts serving.
    pub async fn start(lifetime: Duration) -> std::io::Result<Self> {
        let state = Arc::new(DemoState { lifetime, issued: Mutex::default(), counter: AtomicU64::new(0) });
        let stop = CancellationToken::new();
        let iam = TcpListener::bind("127.0.0.1:0").await?;
        let upstream = TcpListener::bind("127.0.0.1:0").await?;
        let (iam_addr, upstream_addr) = (iam.local_addr()?, upstream.local_addr()?);
        let settings = |name| ServeSettings {
            name,
            max_connections: 1024,
            header_read_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(75),
            max_headers: 100,
            max_header_bytes: 64 * 1024,
            grace: Duration::from_secs(1),
        };
        let s = Arc::clone(&state);
        tokio::spawn(serve(iam, settings("demo-iam"), stop.clone(), move |req, _| {
            let s = Arc::clone(&s);
            async move { Ok::<_, Infallible>(fake_iam(req, &s).await) }
        }));
        let s = Arc::clone(&state);
        tokio::spawn(serve(upstream, settings("demo-upstream"), stop.clone(), move |req, _| {
            let s = Arc::clone(&s);
            async move { Ok::<_, Infallible>(demo_upstream(req, &s).await) }
        }));
        Ok(Self { iam_addr, upstream_addr, state, stop })
    }

    /// Points `config` at the demo servers with the demo credential.
    pub fn configure(&self, config: &mut Config) {
        config.auth.token_url = format!("http://{}/api/v1/auth/token", self.iam_addr);
        config.upstream.base_url = format!("http://{}/v1", self.upstream_addr);
        config.auth.credentials = vec![CredentialConfig {
            name: "dev".into(),
            key_id: Some(DEV_KEY_ID.into()),
            secret: Some(DEV_SECRET.into()),
            ..Default::default()
        }];
    }
}

impl Drop for DemoServers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Runs the demo until `shutdown` resolves.
pub async fn run(mut config: Config, shutdown: impl Future<Output = ()>) -> Result<(), AppError> {
    let demo = DemoServers::start(DEV_TOKEN_LIFETIME).await.map_err(|source| AppError::Bind {
        key: "dev",
        addr: SocketAddr::from(([127, 0, 0, 1], 0)),
        source,
    })?;
    demo.configure(&mut config);
    let margin = config.auth.expiry_margin_secs;
    config.validate()?;
    let app = App::bind(config).await?;
    let (proxy, admin) = (app.proxy_addr(), app.admin_addr());
    println!(
        "\nsidekey dev: DEMO MODE. A fake Cloud.ru IAM ({iam}) and an upstream that ECHOES your \
         messages ({up}) run in this process; no real credentials, nothing leaves this machine.\n\
         \n  OpenAI base_url:  http://{proxy}/v1   (any api_key, e.g. \"unused\")\
         \n  metrics:          http://{admin}/metrics   (tokens live {secs} s here: watch \
         sidekey_token_refresh_total grow about every {half} s)\
         \n  readiness:        http://{admin}/readyz\
         \n\nTry:\
         \n  curl -s http://{proxy}/v1/chat/completions -H 'content-type: application/json' \\\
         \n    -d '{{\"model\":\"demo/echo\",\"messages\":[{{\"role\":\"user\",\"content\":\"hello sidekey\"}}]}}'\
         \n  curl -sN http://{proxy}/v1/chat/completions -H 'content-type: application/json' \\\
         \n    -d '{{\"model\":\"demo/echo\",\"stream\":true,\"messages\":[{{\"role\":\"user\",\"content\":\"stream me please\"}}]}}'\
         \n  python: OpenAI(base_url=\"http://{proxy}/v1\", api_key=\"unused\")\
         \n\nCtrl-C stops.\n",
        iam = demo.iam_addr,
        up = demo.upstream_addr,
        secs = DEV_TOKEN_LIFETIME.as_secs(),
        // Refreshed at half the usable life (lifetime less the expiry margin).
        half = DEV_TOKEN_LIFETIME.as_secs().saturating_sub(margin) / 2,
    );
    app.run(shutdown).await;
    drop(demo);
    Ok(())
}

fn json_response(status: StatusCode, body: &Value) -> Response<DemoBody> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())).boxed());
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn openai_error(status: StatusCode, message: &str) -> Response<DemoBody> {
    json_response(status, &json!({"error": {"message": message, "type": "demo_error", "code": null}}))
}

async fn read_json(req: Request<Incoming>) -> Option<Value> {
    let bytes = Limited::new(req.into_body(), 1 << 20).collect().await.ok()?.to_bytes();
    serde_json::from_slice(&bytes).ok()
}

async fn fake_iam(req: Request<Incoming>, state: &DemoState) -> Response<DemoBody> {
    if req.method() != Method::POST || req.uri().path() != "/api/v1/auth/token" {
        return json_response(StatusCode::NOT_FOUND, &json!({"error": "not found"}));
    }
    let Some(body) = read_json(req).await else {
        return json_response(StatusCode::BAD_REQUEST, &json!({"error": "expected JSON"}));
    };
    if body["keyId"] != DEV_KEY_ID || body["secret"] != DEV_SECRET {
        return json_response(StatusCode::UNAUTHORIZED, &json!({"error": "invalid credentials"}));
    }
    let token = state.issue();
    json_response(
        StatusCode::OK,
        &json!({
            "access_token": token, "id_token": "", "refresh_token": "",
            "expires_in": state.lifetime.as_secs(), "refresh_expires_in": 0,
            "scopes": ["openid profile email roles"], "token_type": "Bearer", "not_before": 0
        }),
    )
}

async fn demo_upstream(req: Request<Incoming>, state: &DemoState) -> Response<DemoBody> {
    if !state.valid(req.headers().get(AUTHORIZATION)) {
        return openai_error(StatusCode::UNAUTHORIZED, "Jwt is expired or invalid (demo upstream)");
    }
    match (req.method().clone(), req.uri().path()) {
        (Method::GET, "/v1/models") => json_response(
            StatusCode::OK,
            &json!({"object": "list", "data": [
                {"id": "demo/echo", "object": "model", "created": 0, "owned_by": "sidekey-demo"}
            ]}),
        ),
        (Method::POST, "/v1/chat/completions") => match read_json(req).await {
            Some(body) => chat(&body),
            None => openai_error(StatusCode::BAD_REQUEST, "expected a JSON body"),
        },
        (Method::POST, "/v1/embeddings") => match read_json(req).await {
            Some(body) => embeddings(&body),
            None => openai_error(StatusCode::BAD_REQUEST, "expected a JSON body"),
        },
        _ => openai_error(
            StatusCode::NOT_FOUND,
            "the demo upstream serves /v1/models, /v1/chat/completions and /v1/embeddings",
        ),
    }
}

fn chat(body: &Value) -> Response<DemoBody> {
    let model = body["model"].as_str().unwrap_or("demo/echo").to_string();
    let last = body["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or("");
    let reply = format!("echo: {last}");
    let prompt_tokens = last.split_whitespace().count() as u64;
    let completion_tokens = reply.split_whitespace().count() as u64;
    let usage = json!({"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                       "total_tokens": prompt_tokens + completion_tokens});
    let id = format!("chatcmpl-demo-{:08x}", fastrand::u32(..));
    if body["stream"] != true {
        return json_response(
            StatusCode::OK,
            &json!({"id": id, "object": "chat.completion", "created": 0, "model": model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": reply},
                                 "finish_reason": "stop"}],
                    "usage": usage}),
        );
    }
    let include_usage = body["stream_options"]["include_usage"] == true;
    let chunk = |delta: Value, finish: Value| {
        json!({"id": id, "object": "chat.completion.chunk", "created": 0, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let mut events = vec![chunk(json!({"role": "assistant", "content": ""}), Value::Null)];
    for (i, word) in reply.split(' ').enumerate() {
        let piece = if i == 0 { word.to_string() } else { format!(" {word}") };
        events.push(chunk(json!({"content": piece}), Value::Null));
    }
    events.push(chunk(json!({}), json!("stop")));
    if include_usage {
        events.push(json!({"id": id, "object": "chat.completion.chunk", "created": 0, "model": model,
                           "choices": [], "usage": usage}));
    }
    let mut lines: Vec<Bytes> = events.iter().map(|e| Bytes::from(format!("data: {e}\n\n"))).collect();
    lines.push(Bytes::from_static(b"data: [DONE]\n\n"));
    let stream = futures_util::stream::unfold(lines.into_iter(), |mut it| async move {
        let next = it.next()?;
        tokio::time::sleep(Duration::from_millis(80)).await;
        Some((Ok::<_, Infallible>(Frame::data(next)), it))
    });
    let mut resp = Response::new(StreamBody::new(stream).boxed());
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    resp.headers_mut().insert("cache-control", HeaderValue::from_static("no-cache"));
    resp
}

fn embeddings(body: &Value) -> Response<DemoBody> {
    let inputs: Vec<String> = match &body["input"] {
        Value::String(s) => vec![s.clone()],
        Value::Array(items) => {
            items.iter().map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string)).collect()
        }
        _ => return openai_error(StatusCode::BAD_REQUEST, "input must be a string or an array"),
    };
    let data: Vec<Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, text)| {
            // A deterministic toy vector: byte statistics, so equal inputs give equal vectors.
            let mut v = [0f64; 8];
            for (j, b) in text.bytes().enumerate() {
                v[j % 8] += f64::from(b) / 255.0;
            }
            let norm = v.iter().map(|x| x * x).sum::<f64>().sqrt().max(1e-9);
            json!({"object": "embedding", "index": i, "embedding": v.iter().map(|x| x / norm).collect::<Vec<_>>()})
        })
        .collect();
    let tokens: usize = inputs.iter().map(|s| s.split_whitespace().count()).sum();
    json_response(
        StatusCode::OK,
        &json!({"object": "list", "data": data, "model": body["model"].as_str().unwrap_or("demo/embed"),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}),
    )
}
