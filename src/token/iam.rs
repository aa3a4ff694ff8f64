//! The Cloud.ru IAM token exchange: `POST {token_url}` with `{"keyId", "secret"}`, read
//! `access_token` and `expires_in`, and classify every way it can fail.

use std::future::Future;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{HeaderValue, ACCEPT, AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, USER_AGENT};
use http::{Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client;

use super::credential::{CredentialError, Credentials};
use super::failover::Outcome;
use super::redact::ErrorBody;
use crate::client::Connector;
use crate::config::ClientAuth;
use crate::secret::Secret;

/// Lifetime assumed when the response has no `expires_in` (what the SDKs assume).
pub const DEFAULT_LIFETIME: Duration = Duration::from_secs(3600);
/// Longer lifetimes are clamped, so a bogus value cannot park the refresher for years.
pub const MAX_LIFETIME: Duration = Duration::from_secs(24 * 3600);
/// Largest token response read.
const MAX_RESPONSE_BYTES: usize = 64 * 1024;

/// A freshly issued token.
#[derive(Debug)]
pub struct Fetched {
    pub access_token: Secret,
    pub expires_in: Duration,
}

/// Something that exchanges credentials for a token. The refresher is generic over it, so the
/// schedule can be tested on paused time without sockets.
pub trait Fetcher: Send + Sync + 'static {
    fn fetch(&self, creds: Credentials) -> impl Future<Output = Result<Fetched, FetchError>> + Send;
}

/// Why a token response body is unusable.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResponseError {
    #[error("not a JSON object")]
    NotJson,
    #[error("no access_token")]
    MissingToken,
    #[error("empty access_token")]
    EmptyToken,
    #[error("access_token is not a string of visible ASCII characters")]
    InvalidToken,
    #[error("expires_in must be a positive number of seconds, got {0}")]
    BadExpiresIn(&'static str),
    #[error("token_type is not Bearer")]
    NotBearer,
}

/// A failed fetch. Messages never contain the key id, secret or token, nor an error body: only
/// its length and its redacted error fields ([`ErrorBody`]).
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    #[error("rejected by the token endpoint ({status}): {body}")]
    Rejected { status: StatusCode, body: ErrorBody },
    #[error("token endpoint answered {status}: {body}")]
    Status { status: StatusCode, body: ErrorBody, retry_after: Option<Duration> },
    #[error("token endpoint unreachable")]
    Unreachable(#[source] hyper_util::client::legacy::Error),
    #[error("token endpoint did not answer within {0:?}")]
    Timeout(Duration),
    #[error("reading the token response failed")]
    Body(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("bad token response: {0}")]
    BadResponse(#[from] ResponseError),
    #[error("credential unavailable")]
    Credential(#[from] CredentialError),
    #[error("the token fetch panicked")]
    Panicked,
    #[error("the API key is not a valid header value (visible ASCII only)")]
    InvalidKey,
    #[error("the token lives {expires_in:?}, not longer than auth.expiry_margin_secs ({margin:?})")]
    TooShortLived { expires_in: Duration, margin: Duration },
}

impl FetchError {
    /// Rejected credentials fail over at once; everything else is worth retrying.
    pub fn outcome(&self) -> Outcome {
        match self {
            FetchError::Rejected { .. } | FetchError::Credential(_) | FetchError::InvalidKey => {
                Outcome::Rejected
            }
            _ => Outcome::Transient,
        }
    }

    /// The server's `Retry-After`, if it sent one.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            FetchError::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// A few words for 503 bodies and `/readyz`, e.g. "rejected by IAM (401)".
    pub fn summary(&self) -> String {
        match self {
            FetchError::Rejected { status, .. } => format!("rejected by IAM ({})", status.as_u16()),
            FetchError::Status { status, .. } => format!("IAM answered {}", status.as_u16()),
            FetchError::Unreachable(_) => "IAM unreachable".into(),
            FetchError::Timeout(_) => "IAM timed out".into(),
            FetchError::Body(_) => "IAM response cut off".into(),
            FetchError::BadResponse(e) => format!("bad IAM response ({e})"),
            FetchError::Credential(_) => "credential file unreadable".into(),
            FetchError::Panicked => "token fetch panicked".into(),
            FetchError::InvalidKey => "API key unusable (not visible ASCII)".into(),
            FetchError::TooShortLived { .. } => "token lifetime shorter than the expiry margin".into(),
        }
    }
}

/// How tokens are requested (`auth.provider`).
#[derive(Debug, Clone)]
pub enum Protocol {
    /// `POST {"keyId", "secret"}` as JSON (Cloud.ru IAM).
    CloudruIam,
    /// RFC 6749 §4.4: a form `grant_type=client_credentials`, client authentication by HTTP Basic
    /// or in the body; the response's `token_type`, when present, must be `Bearer`.
    OAuth2 { scope: Option<String>, audience: Option<String>, client_auth: ClientAuth },
    /// No endpoint: the credential's secret is the API key.
    Static,
}

/// The token client for every provider.
#[derive(Debug, Clone)]
pub struct TokenClient {
    client: Client<Connector, Full<Bytes>>,
    url: Uri,
    timeout: Duration,
    user_agent: HeaderValue,
    protocol: Protocol,
}

/// How long a static key is used before it is read again (besides file changes and 401s).
const STATIC_KEY_LIFETIME: Duration = MAX_LIFETIME;

impl TokenClient {
    pub fn new(
        client: Client<Connector, Full<Bytes>>,
        url: Uri,
        timeout: Duration,
        protocol: Protocol,
    ) -> Self {
        let user_agent = HeaderValue::from_static(concat!("sidekey/", env!("CARGO_PKG_VERSION")));
        Self { client, url, timeout, user_agent, protocol }
    }

    fn request(&self, creds: &Credentials) -> Request<Full<Bytes>> {
        let builder = Request::builder()
            .method(Method::POST)
            .uri(self.url.clone())
            .header(ACCEPT, "application/json")
            .header(USER_AGENT, self.user_agent.clone());
        let (builder, body) = match &self.protocol {
            Protocol::OAuth2 { scope, audience, client_auth } => {
                let mut form = vec![("grant_type", "client_credentials")];
                if let Some(scope) = scope {
                    form.push(("scope", scope));
                }
                if let Some(audience) = audience {
                    form.push(("audience", audience));
                }
                let mut builder = builder.header(CONTENT_TYPE, "application/x-www-form-urlencoded");
                match client_auth {
                    ClientAuth::Basic => {
                        // RFC 6749 §2.3.1: id and secret are form-encoded, then Base64'd.
                        let pair = format!(
                            "{}:{}",
                            form_urlencode(creds.id.expose()),
                            form_urlencode(creds.secret.expose())
                        );
                        let mut value = HeaderValue::try_from(format!("Basic {}", base64(pair.as_bytes())))
                            .expect("base64 is a valid header value");
                        value.set_sensitive(true);
                        builder = builder.header(AUTHORIZATION, value);
                    }
                    ClientAuth::Body => {
                        form.push(("client_id", creds.id.expose()));
                        form.push(("client_secret", creds.secret.expose()));
                    }
                }
                let body: Vec<String> =
                    form.iter().map(|(k, v)| format!("{k}={}", form_urlencode(v))).collect();
                (builder, body.join("&"))
            }
            Protocol::CloudruIam | Protocol::Static => {
                let body = serde_json::json!({ "keyId": creds.id.expose(), "secret": creds.secret.expose() });
                (builder.header(CONTENT_TYPE, "application/json"), body.to_string())
            }
        };
        builder.body(Full::new(Bytes::from(body))).expect("request parts are valid")
    }

    async fn exchange(&self, creds: &Credentials) -> Result<Fetched, FetchError> {
        let resp = self.client.request(self.request(creds)).await.map_err(FetchError::Unreachable)?;
        let status = resp.status();
        let retry_after =
            resp.headers().get(RETRY_AFTER).and_then(|v| parse_retry_after(v, SystemTime::now()));
        let bytes = Limited::new(resp.into_body(), MAX_RESPONSE_BYTES)
            .collect()
            .await
            .map_err(FetchError::Body)?
            .to_bytes();
        if status.is_success() {
            let fetched = parse_token_response(&bytes)?;
            if matches!(self.protocol, Protocol::OAuth2 { .. }) {
                check_token_type(&bytes)?;
            }
            return Ok(fetched);
        }
        let body = ErrorBody::summarize(&bytes, creds);
        match status.as_u16() {
            400 | 401 | 403 => Err(FetchError::Rejected { status, body }),
            _ => Err(FetchError::Status { status, body, retry_after }),
        }
    }
}

impl Fetcher for TokenClient {
    async fn fetch(&self, creds: Credentials) -> Result<Fetched, FetchError> {
        if let Protocol::Static = self.protocol {
            let key = creds.secret;
            if !key.expose().bytes().all(|b| b.is_ascii_graphic()) {
                return Err(FetchError::InvalidKey);
            }
            return Ok(Fetched { access_token: key, expires_in: STATIC_KEY_LIFETIME });
        }
        match tokio::time::timeout(self.timeout, self.exchange(&creds)).await {
            Ok(result) => result,
            Err(_) => Err(FetchError::Timeout(self.timeout)),
        }
    }
}

/// An OAuth2 `token_type` other than Bearer cannot be sent as `Bearer`.
fn check_token_type(bytes: &[u8]) -> Result<(), ResponseError> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|_| ResponseError::NotJson)?;
    match value.get("token_type") {
        None | Some(serde_json::Value::Null) => Ok(()),
        Some(serde_json::Value::String(t)) if t.eq_ignore_ascii_case("bearer") => Ok(()),
        Some(_) => Err(ResponseError::NotBearer),
    }
}

/// `application/x-www-form-urlencoded` encoding of one value.
pub fn form_urlencode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'*' => out.push(b as char),
            b' ' => out.push('+'),
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Standard Base64 with padding.
pub fn base64(input: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, &b)| acc | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Reads `access_token` (required, non-empty, header-safe) and `expires_in` (seconds, default
/// 3600, clamped to a day); ignores every other field.
pub fn parse_token_response(bytes: &[u8]) -> Result<Fetched, ResponseError> {
    let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|_| ResponseError::NotJson)?;
    let obj = value.as_object().ok_or(ResponseError::NotJson)?;
    let token = match obj.get("access_token") {
        None | Some(serde_json::Value::Null) => return Err(ResponseError::MissingToken),
        Some(serde_json::Value::String(s)) if s.is_empty() => return Err(ResponseError::EmptyToken),
        Some(serde_json::Value::String(s)) => s,
        Some(_) => return Err(ResponseError::InvalidToken),
    };
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ResponseError::InvalidToken);
    }
    let expires_in = match obj.get("expires_in") {
        None | Some(serde_json::Value::Null) => DEFAULT_LIFETIME,
        Some(serde_json::Value::Number(n)) => {
            let secs = n.as_f64().ok_or(ResponseError::BadExpiresIn("not a number"))?;
            if !secs.is_finite() || secs < 0.0 {
                return Err(ResponseError::BadExpiresIn("a negative number"));
            }
            if secs < 1.0 {
                return Err(ResponseError::BadExpiresIn("less than one second"));
            }
            if secs >= MAX_LIFETIME.as_secs_f64() {
                MAX_LIFETIME
            } else {
                Duration::from_secs_f64(secs)
            }
        }
        Some(_) => return Err(ResponseError::BadExpiresIn("not a number")),
    };
    Ok(Fetched { access_token: Secret::new(token.as_str()), expires_in })
}

/// `Retry-After` as delta-seconds or an HTTP date.
pub fn parse_retry_after(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let s = value.to_str().ok()?.trim();
    if let Ok(secs) = s.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(s).ok()?;
    Some(at.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_response() {
        let f = parse_token_response(
            br#"{"access_token":"eyJ.a.b","id_token":"x","refresh_token":"","expires_in":3600,
                "refresh_expires_in":0,"scopes":["openid"],"token_type":"Bearer","not_before":0}"#,
        )
        .unwrap();
        assert_eq!(f.access_token.expose(), "eyJ.a.b");
        assert_eq!(f.expires_in, Duration::from_secs(3600));
    }

    #[test]
    fn expires_in_defaults_and_clamps() {
        let f = parse_token_response(br#"{"access_token":"t"}"#).unwrap();
        assert_eq!(f.expires_in, DEFAULT_LIFETIME);
        let f = parse_token_response(br#"{"access_token":"t","expires_in":1e300}"#).unwrap();
        assert_eq!(f.expires_in, MAX_LIFETIME);
        let f = parse_token_response(br#"{"access_token":"t","expires_in":1.5}"#).unwrap();
        assert_eq!(f.expires_in, Duration::from_millis(1500));
    }

    #[test]
    fn garbage_is_refused() {
        use ResponseError::*;
        let cases: &[(&[u8], ResponseError)] = &[
            (b"<html>oops</html>", NotJson),
            (b"[1,2]", NotJson),
            (b"{}", MissingToken),
            (br#"{"access_token":null}"#, MissingToken),
            (br#"{"access_token":""}"#, EmptyToken),
            (br#"{"access_token":42}"#, InvalidToken),
            (br#"{"access_token":"a b"}"#, InvalidToken),
            (b"{\"access_token\":\"a\\nb\"}", InvalidToken),
            (br#"{"access_token":"t","expires_in":0}"#, BadExpiresIn("less than one second")),
            (br#"{"access_token":"t","expires_in":-5}"#, BadExpiresIn("a negative number")),
            (br#"{"access_token":"t","expires_in":"3600"}"#, BadExpiresIn("not a number")),
        ];
        for (body, want) in cases {
            let got = parse_token_response(body).unwrap_err();
            assert_eq!(&got, want, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn retry_after_seconds_and_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        assert_eq!(parse_retry_after(&HeaderValue::from_static("7"), now), Some(Duration::from_secs(7)));
        let date = httpdate::fmt_http_date(now + Duration::from_secs(30));
        assert_eq!(
            parse_retry_after(&HeaderValue::from_str(&date).unwrap(), now),
            Some(Duration::from_secs(30))
        );
        assert_eq!(parse_retry_after(&HeaderValue::from_static("soon"), now), None);
    }

    #[test]
    fn form_encoding_and_base64() {
        assert_eq!(form_urlencode("a b&c=d/é"), "a+b%26c%3Dd%2F%C3%A9");
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"client:s3cr%2Bt"), "Y2xpZW50OnMzY3IlMkJ0");
    }

    #[test]
    fn token_type_must_be_bearer_when_present() {
        assert!(check_token_type(br#"{"access_token":"t"}"#).is_ok());
        assert!(check_token_type(br#"{"access_token":"t","token_type":"bearer"}"#).is_ok());
        assert_eq!(
            check_token_type(br#"{"access_token":"t","token_type":"mac"}"#),
            Err(ResponseError::NotBearer)
        );
    }

    #[test]
    fn classification() {
        let rejected = FetchError::Rejected { status: StatusCode::UNAUTHORIZED, body: ErrorBody::default() };
        assert_eq!(rejected.outcome(), Outcome::Rejected);
        assert_eq!(rejected.summary(), "rejected by IAM (401)");
        let busy = FetchError::Status {
            status: StatusCode::TOO_MANY_REQUESTS,
            body: ErrorBody::default(),
            retry_after: Some(Duration::from_secs(3)),
        };
        assert_eq!(busy.outcome(), Outcome::Transient);
        assert_eq!(busy.retry_after(), Some(Duration::from_secs(3)));
        assert_eq!(FetchError::BadResponse(ResponseError::EmptyToken).outcome(), Outcome::Transient);
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn never_panics_on_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse_token_response(&bytes);
        }

        #[test]
        fn valid_responses_round_trip(token in "[!-~]{1,300}", secs in 1u64..86_400, extra in "[a-z_]{1,12}") {
            let body = serde_json::json!({"access_token": token, "expires_in": secs, extra: [1, {"x": null}]});
            let f = parse_token_response(body.to_string().as_bytes()).unwrap();
            prop_assert_eq!(f.access_token.expose(), token.as_str());
            prop_assert_eq!(f.expires_in, Duration::from_secs(secs));
        }

        #[test]
        fn any_json_values_are_judged_without_panic(token in any_json(), expires in any_json()) {
            let body = serde_json::json!({"access_token": token, "expires_in": expires});
            if let Ok(f) = parse_token_response(body.to_string().as_bytes()) {
                prop_assert!(!f.access_token.is_empty());
                prop_assert!(f.access_token.expose().bytes().all(|b| b.is_ascii_graphic()));
                prop_assert!(f.expires_in >= Duration::from_secs(1) && f.expires_in <= MAX_LIFETIME);
            }
        }
    }

    fn any_json() -> impl Strategy<Value = serde_json::Value> {
        prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(|f| serde_json::Number::from_f64(f)
                .map_or(serde_json::Value::Null, serde_json::Value::Number)),
            ".{0,40}".prop_map(serde_json::Value::from),
            Just(serde_json::json!([1, 2])),
            Just(serde_json::json!({"a": 1})),
        ]
    }
}
