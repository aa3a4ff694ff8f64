//! In-process fakes for integration tests, all on `127.0.0.1:0`: a scripted token endpoint that
//! speaks the Cloud.ru IAM protocol, a scripted OpenAI-format upstream, and `start_sidecar`.
#![allow(dead_code)] // each test binary uses a different part of this module

pub mod process;
pub mod python;
pub mod redis;

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use sidekey::config::{Config, CredentialConfig};
use sidekey::server::{serve, ServeSettings};
use sidekey::App;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub type TestBody = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

/// Every wait in these tests is bounded by this.
pub const WAIT: Duration = Duration::from_secs(20);

pub fn full(body: impl Into<Bytes>) -> TestBody {
    Full::new(body.into()).map_err(|never| match never {}).boxed()
}

pub fn json_response(status: u16, body: &str) -> Response<TestBody> {
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = StatusCode::from_u16(status).unwrap();
    resp.headers_mut().insert("content-type", "application/json".parse().unwrap());
    resp
}

fn settings(name: &'static str) -> ServeSettings {
    ServeSettings {
        name,
        max_connections: 10_000,
        header_read_timeout: Duration::from_secs(30),
        idle_timeout: Duration::from_secs(75),
        max_headers: 100,
        max_header_bytes: 64 * 1024,
        grace: Duration::from_millis(200),
    }
}

/// Polls `cond` every 10 ms until it holds, or panics after `WAIT`.
pub async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Fake IAM

/// What the fake IAM does for a key id.
#[derive(Clone, Debug)]
pub enum Iam {
    /// Issue a token living this long.
    Issue(Duration),
    /// Answer with this status, body and optional Retry-After seconds.
    Status(u16, &'static str, Option<u64>),
    /// Answer 200 with this raw body.
    Raw(&'static str),
    /// Never answer.
    Hang,
}

#[derive(Debug, Clone)]
pub struct IamCall {
    pub key_id: String,
    pub secret: String,
    pub content_type: Option<String>,
    pub at: Instant,
}

#[derive(Debug, Clone)]
pub struct Issued {
    pub key_id: String,
    pub expires_at: Instant,
    pub seq: u64,
}

#[derive(Default, Debug)]
struct IamState {
    script: HashMap<String, Iam>,
    calls: Vec<IamCall>,
    issued: HashMap<String, Issued>,
    seq: u64,
}

/// A scripted token endpoint at `POST /api/v1/auth/token`.
#[derive(Clone, Debug)]
pub struct FakeIam {
    pub addr: SocketAddr,
    state: Arc<Mutex<IamState>>,
    stop: CancellationToken,
}

impl FakeIam {
    /// Starts with every key id answered `Issue(3600 s)` unless scripted.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(Mutex::new(IamState::default()));
        let stop = CancellationToken::new();
        let s = Arc::clone(&state);
        tokio::spawn(serve(listener, settings("fake-iam"), stop.clone(), move |req, _| {
            let s = Arc::clone(&s);
            async move { Ok::<_, Infallible>(iam_handle(req, s).await) }
        }));
        Self { addr, state, stop }
    }

    pub fn url(&self) -> String {
        format!("http://{}/api/v1/auth/token", self.addr)
    }

    /// Scripts the answer for `key_id`.
    pub fn set(&self, key_id: &str, behaviour: Iam) {
        self.state.lock().unwrap().script.insert(key_id.to_string(), behaviour);
    }

    pub fn calls(&self) -> Vec<IamCall> {
        self.state.lock().unwrap().calls.clone()
    }

    pub fn call_count(&self) -> usize {
        self.state.lock().unwrap().calls.len()
    }

    pub fn calls_for(&self, key_id: &str) -> usize {
        self.state.lock().unwrap().calls.iter().filter(|c| c.key_id == key_id).count()
    }

    /// Every token issued so far.
    pub fn tokens(&self) -> Vec<String> {
        self.state.lock().unwrap().issued.keys().cloned().collect()
    }

    /// Who issued `token` and when it expires, if this fake issued it.
    pub fn lookup(&self, token: &str) -> Option<Issued> {
        self.state.lock().unwrap().issued.get(token).cloned()
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }
}

async fn iam_handle(req: Request<Incoming>, state: Arc<Mutex<IamState>>) -> Response<TestBody> {
    if req.method() != Method::POST || req.uri().path() != "/api/v1/auth/token" {
        return json_response(404, r#"{"error":"not found"}"#);
    }
    let content_type = req.headers().get("content-type").and_then(|v| v.to_str().ok()).map(String::from);
    let body = req.into_body().collect().await.unwrap().to_bytes();
    let Ok(json) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return json_response(400, r#"{"error":"bad json"}"#);
    };
    let key_id = json["keyId"].as_str().unwrap_or_default().to_string();
    let secret = json["secret"].as_str().unwrap_or_default().to_string();
    let behaviour = {
        let mut s = state.lock().unwrap();
        s.calls.push(IamCall {
            key_id: key_id.clone(),
            secret: secret.clone(),
            content_type,
            at: Instant::now(),
        });
        s.script.get(&key_id).cloned().unwrap_or(Iam::Issue(Duration::from_secs(3600)))
    };
    match behaviour {
        Iam::Issue(lifetime) => {
            let token = {
                let mut s = state.lock().unwrap();
                s.seq += 1;
                let token = format!("tok{}x{:012x}", s.seq, fastrand::u64(..1 << 48));
                let issued = Issued { key_id, expires_at: Instant::now() + lifetime, seq: s.seq };
                s.issued.insert(token.clone(), issued);
                token
            };
            let body = serde_json::json!({
                "access_token": token, "id_token": "x", "refresh_token": "", "expires_in": lifetime.as_secs_f64(),
                "refresh_expires_in": 0, "scopes": ["openid"], "token_type": "Bearer", "not_before": 0
            });
            json_response(200, &body.to_string())
        }
        Iam::Status(status, body, retry_after) => {
            let mut resp = json_response(status, body);
            if let Some(ra) = retry_after {
                resp.headers_mut().insert("retry-after", ra.into());
            }
            resp
        }
        Iam::Raw(body) => json_response(200, body),
        Iam::Hang => {
            std::future::pending::<()>().await;
            unreachable!()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Fake upstream

/// A request as the upstream saw it.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: Method,
    pub uri: String,
    pub headers: HeaderMap,
}

impl Seen {
    pub fn bearer(&self) -> Option<&str> {
        self.headers.get("authorization")?.to_str().ok()?.strip_prefix("Bearer ")
    }
}

type Handler = Arc<
    dyn Fn(Request<Incoming>) -> futures_util::future::BoxFuture<'static, Response<TestBody>> + Send + Sync,
>;

/// A scripted upstream that records every request before handing it to its handler.
#[derive(Clone)]
pub struct FakeUpstream {
    pub addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    stop: CancellationToken,
}

impl FakeUpstream {
    pub async fn start<F, Fut>(handler: F) -> Self
    where
        F: Fn(Request<Incoming>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Response<TestBody>> + Send + 'static,
    {
        let handler: Handler = Arc::new(move |req| Box::pin(handler(req)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = CancellationToken::new();
        let s = Arc::clone(&seen);
        tokio::spawn(serve(
            listener,
            settings("fake-upstream"),
            stop.clone(),
            move |req: Request<Incoming>, _| {
                s.lock().unwrap().push(Seen {
                    method: req.method().clone(),
                    uri: req.uri().to_string(),
                    headers: req.headers().clone(),
                });
                let fut = handler(req);
                async move { Ok::<_, Infallible>(fut.await) }
            },
        ));
        Self { addr, seen, stop }
    }

    /// An upstream that answers 200 `{"ok":true}` to everything.
    pub async fn ok() -> Self {
        Self::start(|_req| async { json_response(200, r#"{"ok":true}"#) }).await
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }
}

// ---------------------------------------------------------------------------------------------
// The sidecar under test

pub const PRIMARY_KEY: &str = "KEYID-primary-5b1e";
pub const PRIMARY_SECRET: &str = "SECRET-primary-77d0";
pub const BACKUP_KEY: &str = "KEYID-backup-a9c4";
pub const BACKUP_SECRET: &str = "SECRET-backup-03f2";

pub fn credential(name: &str, key_id: &str, secret: &str) -> CredentialConfig {
    CredentialConfig {
        name: name.into(),
        key_id: Some(key_id.into()),
        secret: Some(secret.into()),
        ..Default::default()
    }
}

/// A config on port 0 pointing at the fakes, with a primary credential and quick retries.
pub fn config(iam: &FakeIam, upstream_base: &str) -> Config {
    let mut c = Config::default();
    c.server.listen = "127.0.0.1:0".parse().unwrap();
    c.server.admin_listen = "127.0.0.1:0".parse().unwrap();
    c.server.shutdown_grace_secs = 2;
    c.upstream.base_url = upstream_base.to_string();
    c.auth.token_url = iam.url();
    c.auth.backoff_initial_ms = 100;
    c.auth.backoff_max_ms = 400;
    c.auth.timeout_secs = 2;
    c.auth.credentials = vec![credential("primary", PRIMARY_KEY, PRIMARY_SECRET)];
    c
}

/// Like [`config`], with the primary issued tokens living `lifetime_secs` and a 1 s expiry
/// margin, so short-lived tokens stay usable for most of their life.
pub fn short_token_config(iam: &FakeIam, upstream_base: &str, lifetime_secs: u64) -> Config {
    iam.set(PRIMARY_KEY, Iam::Issue(Duration::from_secs(lifetime_secs)));
    let mut c = config(iam, upstream_base);
    c.auth.expiry_margin_secs = 1;
    c
}

/// A running sidekey.
pub struct Sidecar {
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub metrics: sidekey::metrics::Metrics,
    pub tokens: sidekey::token::TokenStore,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Sidecar {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.proxy)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }

    /// Waits until a token is held.
    pub async fn ready(&self) {
        let tokens = self.tokens.clone();
        eventually("sidekey ready", || tokens.has_usable(Instant::now())).await;
    }

    pub fn metric(&self, name: &str) -> f64 {
        metric_value(&self.metrics.render(), name)
    }

    /// Stops gracefully and waits for the shutdown to finish.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(WAIT, task).await.expect("shutdown in time").unwrap();
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

pub async fn start_sidecar(config: Config) -> Sidecar {
    config.validate().expect("test config is valid");
    let app = App::bind(config).await.expect("sidekey binds");
    let (proxy, admin) = (app.proxy_addr(), app.admin_addr());
    let (metrics, tokens) = (app.metrics().clone(), app.tokens().clone());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(app.run(async move {
        let _ = rx.await;
    }));
    Sidecar { proxy, admin, metrics, tokens, stop: Some(tx), task: Some(task) }
}

/// A series' value from Prometheus text (`name{labels}` exactly as rendered, or a bare name).
pub fn metric_value(text: &str, series: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == series).then(|| value.parse().ok())?
        })
        .unwrap_or(0.0)
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(WAIT).build().unwrap()
}
