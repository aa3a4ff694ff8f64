//! `[server]`: the client-facing listeners and their limits.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::check::positive;
use super::ConfigError;

/// The client-facing listeners and their limits.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Where OpenAI SDKs connect. Loopback by default: anyone who can reach this port can spend
    /// our credentials.
    pub listen: SocketAddr,
    /// Metrics and probes; never serves anything that spends credentials.
    pub admin_listen: SocketAddr,
    /// Must be set on purpose to listen on a non-loopback address.
    pub allow_non_loopback: bool,
    /// A non-loopback proxy listener also needs client authentication (`[[clients]]`), unless
    /// this says that an authenticating layer in front of sidekey does that job.
    pub open_proxy: bool,
    /// Largest request body accepted (413 above it), checked on `Content-Length` and while
    /// streaming.
    pub max_request_body_bytes: u64,
    /// Request bodies up to this size are kept (as shared chunks, while streaming up) so a request
    /// answered 401 can be replayed once with a fresh token. 0 disables replay.
    pub replay_buffer_bytes: u64,
    /// In-flight requests get this long to finish after shutdown starts.
    pub shutdown_grace_secs: u64,
    /// New connections are still accepted this long after a shutdown signal (for classic
    /// sidecars whose app is still draining).
    pub shutdown_delay_secs: u64,
    /// Serve `POST /quitquitquit` on the admin port (loopback callers only).
    pub enable_quit_endpoint: bool,
    /// From accept to a complete first request head (HTTP/1 headers, or the HTTP/2 preface and
    /// first request) at most, and for each later HTTP/1 request head (slowloris guard).
    pub header_read_timeout_secs: u64,
    /// A connection with no request in flight for this long is closed (HTTP/1 keep-alive and
    /// HTTP/2 alike).
    pub connection_idle_timeout_secs: u64,
    /// A request body that sends nothing for this long is cut: 408 if sidekey is still reading
    /// it, and its slot and memory are freed.
    pub body_read_timeout_secs: u64,
    /// Bytes of request bodies held in memory at once, process-wide: bodies read for the policy
    /// and the copies kept for a 401 replay. When spent, policy reads get 503 with
    /// `Retry-After` and new uploads are not made replayable.
    pub max_buffered_bytes: u64,
    /// Open client connections at most. At the limit, the oldest connection with no request in
    /// flight is closed to make room; if every connection is busy, new ones wait in the kernel
    /// backlog.
    pub max_connections: usize,
    /// Open connections to the admin listener at most, its own budget: probes keep answering
    /// however busy the proxy port is.
    pub admin_max_connections: usize,
    /// Request headers per request at most (HTTP/1).
    pub max_headers: usize,
    /// Bytes of request line plus headers at most (HTTP/1 read buffer, at least 8192).
    pub max_header_bytes: usize,
    /// Requests proxied at once at most (unset: unlimited). More wait up to `queue_timeout_ms`,
    /// then get 429 with `Retry-After`, which SDK retry logic handles.
    pub max_inflight: Option<usize>,
    pub queue_timeout_ms: u64,
    /// Proxy worker threads, each with its own event loop, accept loop (on one shared socket) and
    /// upstream connection pool. Unset: one per CPU core.
    pub worker_threads: Option<usize>,
    /// Extra names accepted in the `Host` header while the proxy listens on loopback (which
    /// otherwise accepts only loopback addresses and `localhost`: a guard against DNS
    /// rebinding from a browser).
    pub allowed_hosts: Vec<String>,
    /// Browser origins allowed to call the proxy. Requests with any other `Origin` get 403.
    pub allowed_origins: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8181)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9191)),
            allow_non_loopback: false,
            open_proxy: false,
            max_request_body_bytes: 32 * 1024 * 1024,
            replay_buffer_bytes: 1024 * 1024,
            shutdown_grace_secs: 30,
            shutdown_delay_secs: 0,
            enable_quit_endpoint: false,
            header_read_timeout_secs: 30,
            connection_idle_timeout_secs: 75,
            body_read_timeout_secs: 30,
            max_buffered_bytes: 64 * 1024 * 1024,
            max_connections: 4096,
            admin_max_connections: 64,
            max_headers: 100,
            max_header_bytes: 64 * 1024,
            max_inflight: None,
            queue_timeout_ms: 10_000,
            worker_threads: None,
            allowed_hosts: Vec::new(),
            allowed_origins: Vec::new(),
        }
    }
}

impl ServerConfig {
    /// Checks this section, naming the key of the first problem.
    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let s = self;
        for (key, addr) in [("server.listen", s.listen), ("server.admin_listen", s.admin_listen)] {
            if !addr.ip().is_loopback() && !s.allow_non_loopback {
                return Err(ConfigError::invalid(
                    key,
                    format!(
                        "{addr} is not a loopback address; anyone who can reach it can spend \
                         the configured credentials (set server.allow_non_loopback = true to allow)"
                    ),
                ));
            }
        }
        if s.listen == s.admin_listen && s.listen.port() != 0 {
            return Err(ConfigError::invalid("server.admin_listen", "must differ from server.listen"));
        }
        positive("server.max_request_body_bytes", s.max_request_body_bytes)?;
        positive("server.header_read_timeout_secs", s.header_read_timeout_secs)?;
        positive("server.connection_idle_timeout_secs", s.connection_idle_timeout_secs)?;
        positive("server.body_read_timeout_secs", s.body_read_timeout_secs)?;
        positive("server.admin_max_connections", s.admin_max_connections as u64)?;
        if s.max_buffered_bytes < s.replay_buffer_bytes {
            return Err(ConfigError::invalid(
                "server.max_buffered_bytes",
                "must be at least server.replay_buffer_bytes, or no upload could ever be replayed",
            ));
        }
        positive("server.max_connections", s.max_connections as u64)?;
        positive("server.max_headers", s.max_headers as u64)?;
        if s.worker_threads == Some(0) {
            return Err(ConfigError::invalid(
                "server.worker_threads",
                "must be greater than 0 (or unset for one per core)",
            ));
        }
        if s.max_inflight == Some(0) {
            return Err(ConfigError::invalid(
                "server.max_inflight",
                "must be greater than 0 (or unset for no limit)",
            ));
        }
        if s.max_header_bytes < 8192 {
            return Err(ConfigError::invalid("server.max_header_bytes", "must be at least 8192"));
        }
        if s.replay_buffer_bytes > s.max_request_body_bytes {
            return Err(ConfigError::invalid(
                "server.replay_buffer_bytes",
                "must not exceed server.max_request_body_bytes",
            ));
        }
        Ok(())
    }
}
