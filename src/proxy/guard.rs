//! The guard against browsers (shared by the proxy and the admin listener) and the methods
//! that echo requests back.

use http::header::{HOST, ORIGIN};
use http::{Method, Request};

use super::error::ProxyError;
use super::ProxySettings;

/// Browsers must not spend our credentials: a page can reach a loopback port by DNS
/// rebinding, a simple cross-site POST, or a tag that sends a GET without `Origin`. SDKs send
/// no `Origin`, no `Sec-Fetch-Site` and a loopback `Host`.
pub(super) fn check_browser<B>(req: &Request<B>, settings: &ProxySettings) -> Result<(), ProxyError> {
    let guard = BrowserGuard {
        allowed_origins: &settings.allowed_origins,
        allowed_hosts: &settings.allowed_hosts,
        hosts: if settings.loopback_only { HostRule::Loopback } else { HostRule::Any },
    };
    guard.check(req).map_err(ProxyError::Forbidden)
}

/// Which `Host` values a listener accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HostRule {
    /// Any: the listener is reachable from the network on purpose.
    Any,
    /// Loopback names and addresses only (and `allowed_hosts`).
    Loopback,
    /// Any IP literal (the kubelet probes with the pod IP), loopback names (and `allowed_hosts`):
    /// a rebinding attack needs a DNS name.
    IpLiteral,
}

/// The guard against browsers, shared by the proxy and the admin listener.
#[derive(Debug, Clone, Copy)]
pub struct BrowserGuard<'a> {
    pub allowed_origins: &'a [String],
    pub allowed_hosts: &'a [String],
    pub hosts: HostRule,
}

impl BrowserGuard<'_> {
    /// `Err` with the reason for the client if the request looks like it comes from a web page
    /// that may not use this listener.
    pub fn check<B>(&self, req: &Request<B>) -> Result<(), &'static str> {
        let origin = req.headers().get(ORIGIN);
        let allowed_origin =
            origin.is_some_and(|o| self.allowed_origins.iter().any(|a| a.as_bytes() == o.as_bytes()));
        if origin.is_some() && !allowed_origin {
            return Err("requests from browsers (with an Origin header) are refused; list the origin in server.allowed_origins");
        }
        if !allowed_origin {
            let site = req.headers().get("sec-fetch-site").map(|v| v.as_bytes());
            if matches!(site, Some(b"cross-site") | Some(b"same-site")) {
                return Err("cross-site requests from browsers (Sec-Fetch-Site) are refused");
            }
        }
        if self.hosts == HostRule::Any {
            return Ok(());
        }
        let host = req
            .uri()
            .authority()
            .map(|a| a.host())
            .or_else(|| req.headers().get(HOST).and_then(|h| h.to_str().ok()).map(host_without_port));
        let allowed = host.is_some_and(|h| {
            is_loopback_name(h)
                || (self.hosts == HostRule::IpLiteral && is_ip_literal(h))
                || self.allowed_hosts.iter().any(|a| unbracket(a).eq_ignore_ascii_case(unbracket(h)))
        });
        if !allowed {
            return Err(match self.hosts {
                HostRule::IpLiteral => {
                    "the Host header must be an IP address or a loopback name (or one in server.allowed_hosts)"
                }
                _ => "the Host header must name a loopback address (or one in server.allowed_hosts)",
            });
        }
        Ok(())
    }
}

/// `[fd00::1]` and `fd00::1` alike: HTTP/1's Host keeps the brackets, HTTP/2's authority too,
/// and a config may have either.
fn unbracket(host: &str) -> &str {
    host.trim_start_matches('[').trim_end_matches(']')
}

fn is_ip_literal(host: &str) -> bool {
    host.trim_start_matches('[').trim_end_matches(']').parse::<std::net::IpAddr>().is_ok()
}

/// TRACE, and Microsoft's TRACK, echo the request (and the injected token) back.
pub(super) fn is_trace(method: &Method) -> bool {
    method.as_str().eq_ignore_ascii_case("TRACE") || method.as_str().eq_ignore_ascii_case("TRACK")
}

/// `host[:port]` or `[v6]:port` without the port.
fn host_without_port(value: &str) -> &str {
    if let Some(rest) = value.strip_prefix('[') {
        return rest.split(']').next().unwrap_or_default();
    }
    value.rsplit_once(':').map_or(value, |(h, _)| h)
}

fn is_loopback_name(host: &str) -> bool {
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.eq_ignore_ascii_case("localhost")
        || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}
