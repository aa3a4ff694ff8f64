//! The admin listener: `/healthz`, `/readyz`, `/metrics`, and the opt-in `POST /quitquitquit`.
//! Nothing here spends credentials.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::metrics::Metrics;
use crate::proxy::{BrowserGuard, HostRule};
use crate::token::sets::TokenSets;

/// Process-wide state the probes report on.
#[derive(Debug, Default)]
pub struct Lifecycle {
    /// Set when shutdown starts: `/readyz` turns 503 at once.
    pub draining: AtomicBool,
    /// One per credential set: true while that set's refresher loop runs.
    pub refreshers_alive: Vec<Arc<AtomicBool>>,
}

impl Lifecycle {
    pub fn new(refreshers_alive: Vec<Arc<AtomicBool>>) -> Self {
        Self { draining: AtomicBool::new(false), refreshers_alive }
    }
}

/// The admin endpoints.
#[derive(Debug, Clone)]
pub struct Admin {
    metrics: Metrics,
    sets: TokenSets,
    /// The sets `/readyz` waits for (`default` and every route's); the others are listed in
    /// its body, and `/readyz?all` waits for them too.
    ready_sets: Vec<String>,
    lifecycle: Arc<Lifecycle>,
    /// Fired by `POST /quitquitquit` when enabled.
    quit: Option<CancellationToken>,
    /// `server.allowed_origins` and `server.allowed_hosts`: a web page must neither trigger
    /// `/quitquitquit` cross-site nor read `/metrics` by DNS rebinding.
    allowed_origins: Vec<String>,
    allowed_hosts: Vec<String>,
}

impl Admin {
    pub fn new(
        metrics: Metrics,
        sets: TokenSets,
        ready_sets: Vec<String>,
        lifecycle: Arc<Lifecycle>,
        quit: Option<CancellationToken>,
    ) -> Self {
        Self {
            metrics,
            sets,
            ready_sets,
            lifecycle,
            quit,
            allowed_origins: Vec::new(),
            allowed_hosts: Vec::new(),
        }
    }

    /// Accepts browser origins and extra `Host` names besides IP literals and `localhost`.
    pub fn with_browser_rules(mut self, allowed_origins: Vec<String>, allowed_hosts: Vec<String>) -> Self {
        self.allowed_origins = allowed_origins;
        self.allowed_hosts = allowed_hosts;
        self
    }

    pub async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<Full<Bytes>>, Infallible> {
        let guard = BrowserGuard {
            allowed_origins: &self.allowed_origins,
            allowed_hosts: &self.allowed_hosts,
            hosts: HostRule::IpLiteral,
        };
        if let Err(reason) = guard.check(&req) {
            return Ok(text(StatusCode::FORBIDDEN, format!("{reason}\n")));
        }
        let get = matches!(*req.method(), Method::GET | Method::HEAD);
        let resp = match (req.uri().path(), get) {
            ("/healthz", true) => {
                if self.lifecycle.refreshers_alive.iter().all(|a| a.load(Ordering::Acquire)) {
                    text(StatusCode::OK, "ok\n")
                } else {
                    text(StatusCode::SERVICE_UNAVAILABLE, "a token refresher is not running\n")
                }
            }
            ("/readyz", true) => self.ready(req.uri().query() == Some("all")),
            ("/metrics", true) => {
                let mut resp = Response::new(Full::new(Bytes::from(self.metrics.render())));
                resp.headers_mut().insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                resp
            }
            ("/quitquitquit", _) if req.method() == Method::POST => self.quit(peer),
            _ => text(StatusCode::NOT_FOUND, "not found: try /healthz, /readyz or /metrics\n"),
        };
        Ok(resp)
    }

    /// 200 when every set the routes need holds a usable token (with `all`: every set). The
    /// body says so for each set. A set only clients name does not make the whole gateway
    /// unready: it fails only its own requests (503 naming the set).
    fn ready(&self, all: bool) -> Response<Full<Bytes>> {
        if self.lifecycle.draining.load(Ordering::Acquire) {
            return text(StatusCode::SERVICE_UNAVAILABLE, "draining: shutting down\n");
        }
        let now = Instant::now();
        let single = self.sets.iter().count() == 1;
        let mut ready = true;
        let mut body = String::new();
        for set in self.sets.iter() {
            let needed = all || self.ready_sets.iter().any(|s| s == set.name());
            let line = match set.store().current(now) {
                Ok(_) => "ready".to_string(),
                Err(u) => {
                    ready &= !needed;
                    u.message
                }
            };
            if single {
                body = format!("{line}\n");
            } else {
                let tag = if needed { "" } else { " (not required for readiness)" };
                body.push_str(&format!("set {}: {line}{tag}\n", set.name()));
            }
        }
        let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
        text(status, body)
    }

    fn quit(&self, peer: SocketAddr) -> Response<Full<Bytes>> {
        match &self.quit {
            None => text(StatusCode::NOT_FOUND, "quit endpoint disabled (server.enable_quit_endpoint)\n"),
            Some(_) if !peer.ip().is_loopback() => {
                text(StatusCode::FORBIDDEN, "quit is allowed from loopback only\n")
            }
            Some(quit) => {
                tracing::info!("Shutdown requested via /quitquitquit");
                quit.cancel();
                text(StatusCode::OK, "shutting down\n")
            }
        }
    }
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(body.into()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    resp
}
