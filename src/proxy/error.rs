//! sidekey's own errors and the one place that maps them to HTTP: an OpenAI-shaped JSON body
//! (`{"error":{"message","type":"sidekey_error","code"}}`), so SDKs surface them well.

use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE, RETRY_AFTER};
use http::{Response, StatusCode};

/// Why a caller could not be identified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    /// A signed key that does not verify (the reason, never the key).
    SignedKey(crate::signed::SignedKeyError),
    /// A signed key whose `client` claim names no configured client.
    UnknownClient,
    /// Client authentication is on and the request carries no key.
    MissingKey,
    /// The key belongs to no client.
    UnknownKey,
}

impl std::fmt::Display for AuthFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AuthFailure::SignedKey(e) => return write!(f, "the signed key is not valid: {e}"),
            AuthFailure::UnknownClient => "the signed key names a client this gateway does not have",
            AuthFailure::MissingKey => {
                "no API key: send one with Authorization: Bearer <key> (or the api-key header)"
            }
            AuthFailure::UnknownKey => "the API key is not valid here",
        })
    }
}

/// Why sidekey answered a request itself.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error(
        "no route: sidekey serves the OpenAI API under /v1; set your SDK's base_url to http://{listen}/v1"
    )]
    NotFound { listen: String },
    #[error("invalid path: dot segments (literal, encoded or look-alike) are not allowed")]
    BadPath,
    #[error("method {0} is not allowed")]
    MethodNotAllowed(http::Method),
    #[error("sidekey is not a forward proxy: absolute-form URIs and CONNECT are refused")]
    NotAProxy,
    #[error("request body exceeds the limit of {limit} bytes ({key})")]
    PayloadTooLarge { limit: u64, key: &'static str },
    #[error("the request body stalled: nothing arrived for {0:?} (server.body_read_timeout_secs)")]
    BodyTimeout(Duration),
    #[error(
        "sidekey is holding too many request bodies in memory (server.max_buffered_bytes); retry shortly"
    )]
    BufferFull,
    #[error("{message}")]
    NoToken { message: String, retry_after_secs: u64 },
    #[error("too many requests in flight (server.max_inflight = {limit}); waited {waited_ms} ms for a slot")]
    Overloaded { limit: usize, waited_ms: u64 },
    #[error("client '{client}' has {limit} requests in flight already (its policy's max_inflight)")]
    ClientOverloaded { client: std::sync::Arc<str>, limit: usize },
    #[error("{0}")]
    Unauthenticated(AuthFailure),
    #[error("this key's token budget is used up")]
    BudgetExhausted,
    #[error("the token budget store cannot be reached; retry shortly")]
    BudgetUnavailable,
    /// A caller-supplied key pair the IAM rejected, with the IAM's reason (redacted of the
    /// pair like every token endpoint error).
    #[error("the key pair (key_id:secret) was rejected by the IAM: {reason}")]
    PairRejected { reason: String },
    #[error("upstream unreachable")]
    Unreachable(#[source] crate::client::pool::UpstreamError),
    #[error("upstream did not answer within {0:?}")]
    Timeout(Duration),
    #[error("reading the request body failed")]
    ClientBody(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("{0}")]
    Policy(#[from] super::inspect::PolicyError),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("the request body could not be read from the client")]
    ClientAborted,
    #[error("building the upstream request failed")]
    BadUpstreamRequest(#[source] http::Error),
}

impl ProxyError {
    pub fn status(&self) -> StatusCode {
        match self {
            ProxyError::NotFound { .. } => StatusCode::NOT_FOUND,
            ProxyError::BadPath | ProxyError::NotAProxy | ProxyError::ClientBody(_) => {
                StatusCode::BAD_REQUEST
            }
            ProxyError::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ProxyError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ProxyError::BodyTimeout(_) => StatusCode::REQUEST_TIMEOUT,
            ProxyError::BufferFull => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::NoToken { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Overloaded { .. } | ProxyError::ClientOverloaded { .. } => {
                StatusCode::TOO_MANY_REQUESTS
            }
            ProxyError::Unauthenticated(_) | ProxyError::PairRejected { .. } => StatusCode::UNAUTHORIZED,
            ProxyError::BudgetExhausted => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::BudgetUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ProxyError::Forbidden(_) => StatusCode::FORBIDDEN,
            ProxyError::ClientAborted => StatusCode::BAD_REQUEST,
            ProxyError::Policy(e) => e.status(),
            ProxyError::Unreachable(_) | ProxyError::BadUpstreamRequest(_) => StatusCode::BAD_GATEWAY,
            ProxyError::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
        }
    }

    /// A stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::NotFound { .. } => "not_found",
            ProxyError::BadPath => "invalid_path",
            ProxyError::NotAProxy => "not_a_forward_proxy",
            ProxyError::PayloadTooLarge { .. } => "request_too_large",
            ProxyError::MethodNotAllowed(_) => "method_not_allowed",
            ProxyError::BodyTimeout(_) => "request_timeout",
            ProxyError::BufferFull => "buffer_full",
            ProxyError::NoToken { .. } => "no_valid_token",
            ProxyError::Overloaded { .. } | ProxyError::ClientOverloaded { .. } => "too_many_requests",
            ProxyError::Unauthenticated(_) | ProxyError::PairRejected { .. } => "invalid_api_key",
            ProxyError::BudgetExhausted => "budget_exhausted",
            ProxyError::BudgetUnavailable => "budget_unavailable",
            ProxyError::Policy(e) => e.reason(),
            ProxyError::Forbidden(_) => "forbidden",
            ProxyError::ClientAborted => "bad_request_body",
            ProxyError::Unreachable(_) => "upstream_unreachable",
            ProxyError::Timeout(_) => "upstream_timeout",
            ProxyError::ClientBody(_) => "bad_request_body",
            ProxyError::BadUpstreamRequest(_) => "bad_upstream_request",
        }
    }

    /// The message for the client, with the cause chain where it helps (no secrets live there).
    fn client_message(&self) -> String {
        match self {
            ProxyError::Unreachable(e) => {
                format!("{self}: {}", crate::token::refresher::error_chain(e))
            }
            _ => self.to_string(),
        }
    }

    /// The HTTP response for this error.
    pub fn to_response<B: From<Bytes>>(&self) -> Response<B> {
        let body = serde_json::json!({
            "error": {
                "message": self.client_message(),
                "type": "sidekey_error",
                "code": self.code(),
            }
        });
        let mut resp = Response::new(B::from(Bytes::from(body.to_string())));
        *resp.status_mut() = self.status();
        resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        match self {
            ProxyError::NoToken { retry_after_secs, .. } => {
                resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from(*retry_after_secs));
            }
            ProxyError::Overloaded { .. }
            | ProxyError::ClientOverloaded { .. }
            | ProxyError::BufferFull
            | ProxyError::BudgetUnavailable => {
                resp.headers_mut().insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            _ => {}
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;

    #[test]
    fn no_token_is_503_with_retry_after_and_openai_shape() {
        let err = ProxyError::NoToken { message: "no valid token: x".into(), retry_after_secs: 7 };
        let resp: Response<Full<Bytes>> = err.to_response();
        assert_eq!(resp.status(), 503);
        assert_eq!(resp.headers()[RETRY_AFTER], "7");
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
    }

    #[test]
    fn statuses() {
        assert_eq!(ProxyError::NotFound { listen: "x".into() }.status(), 404);
        assert_eq!(ProxyError::PayloadTooLarge { limit: 1, key: "k" }.status(), 413);
        assert_eq!(ProxyError::BodyTimeout(Duration::from_secs(1)).status(), 408);
        assert_eq!(ProxyError::MethodNotAllowed(http::Method::TRACE).status(), 405);
        let full: Response<Full<Bytes>> = ProxyError::BufferFull.to_response();
        assert_eq!(
            (full.status().as_u16(), &full.headers()[RETRY_AFTER]),
            (503, &HeaderValue::from_static("1"))
        );
        assert_eq!(ProxyError::Timeout(Duration::from_secs(1)).status(), 504);
        assert_eq!(ProxyError::NotAProxy.status(), 400);
    }
}
