//! Request policy on JSON bodies: allowed models, a cap on output tokens, and the optional
//! `stream_options.include_usage` rewrite. Pure functions on bytes; the original bytes are
//! forwarded untouched unless a rule rewrites them.

use bytes::Bytes;
use serde_json::{Map, Value};

use super::path::Endpoint;
use crate::config::{MaxTokensMode, PolicyConfig};

/// A compiled `policy` section plus `usage.include_stream_usage`.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    allowed_models: Vec<Glob>,
    /// Indexed by `Endpoint as usize`: forwarded while the policy enforces.
    allowed_endpoints: [bool; Endpoint::ALL.len()],
    max_tokens: Option<u64>,
    mode: MaxTokensMode,
    set_when_missing: bool,
    max_choices: Option<u64>,
    max_body: u64,
    include_stream_usage: bool,
    /// A signed key's `model` claim: a model must also match one of these.
    key_models: Vec<Glob>,
    /// A signed key with a budget: the policy fails closed (allowed endpoints only, bodies
    /// read), and every stream reports usage, whatever the request says.
    budgeted: bool,
}

/// What the policy decided about a request body.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Forward the original bytes.
    Unchanged { model: Option<String> },
    /// Forward these bytes instead.
    Rewritten { body: Bytes, model: Option<String> },
}

/// Why a request is refused. Messages name the model or field, never anything else from the body.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PolicyError {
    #[error("model '{0}' is not allowed here (policy.allowed_models)")]
    ModelNotAllowed(String),
    #[error("the request names no model; policy.allowed_models requires one")]
    ModelMissing,
    #[error("model '{0}' is outside this key's scope")]
    ModelOutOfScope(String),
    #[error("{field} = {value} exceeds the limit of {limit} (policy.max_tokens)")]
    MaxTokensExceeded { field: &'static str, value: u64, limit: u64 },
    #[error("{field} = {value} exceeds the limit of {limit} (policy.max_choices)")]
    ChoicesExceeded { field: &'static str, value: u64, limit: u64 },
    #[error("{0} must be a non-negative integer")]
    BadMaxTokens(&'static str),
    #[error("the request body is not a JSON object; the request policy needs one")]
    NotJson,
    #[error("endpoint '{0}' is not allowed here (policy.allowed_endpoints)")]
    EndpointNotAllowed(&'static str),
    #[error("{method} is not allowed on '{endpoint}' while a request policy applies")]
    MethodNotAllowed { method: http::Method, endpoint: &'static str },
    #[error("path parameters (';') are refused while a request policy applies")]
    PathParameters,
    #[error("compressed request bodies (Content-Encoding) are refused while a request policy applies")]
    EncodedBody,
    #[error("the request body repeats the key '{0}' (or spells it another way); the request policy refuses ambiguous bodies")]
    AmbiguousKey(String),
}

impl PolicyError {
    /// The label for `sidekey_policy_rejections_total{reason}`.
    pub fn reason(&self) -> &'static str {
        match self {
            PolicyError::ModelNotAllowed(_) | PolicyError::ModelMissing | PolicyError::ModelOutOfScope(_) => {
                "model_not_allowed"
            }
            PolicyError::MaxTokensExceeded { .. } => "max_tokens_exceeded",
            PolicyError::ChoicesExceeded { .. } => "max_choices_exceeded",
            PolicyError::BadMaxTokens(_)
            | PolicyError::NotJson
            | PolicyError::EncodedBody
            | PolicyError::AmbiguousKey(_) => "invalid_body",
            PolicyError::EndpointNotAllowed(_) => "endpoint_not_allowed",
            PolicyError::MethodNotAllowed { .. } => "method_not_allowed",
            PolicyError::PathParameters => "path_parameters",
        }
    }

    /// Every reason label, so the counters exist from the first scrape.
    pub const REASONS: [&'static str; 7] = [
        "model_not_allowed",
        "max_tokens_exceeded",
        "max_choices_exceeded",
        "invalid_body",
        "endpoint_not_allowed",
        "method_not_allowed",
        "path_parameters",
    ];

    /// The HTTP status: 403 for what the caller may not use, 405 for a method, 400 otherwise.
    pub fn status(&self) -> http::StatusCode {
        match self {
            PolicyError::ModelNotAllowed(_)
            | PolicyError::ModelOutOfScope(_)
            | PolicyError::EndpointNotAllowed(_) => http::StatusCode::FORBIDDEN,
            PolicyError::MethodNotAllowed { .. } => http::StatusCode::METHOD_NOT_ALLOWED,
            PolicyError::EncodedBody => http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            _ => http::StatusCode::BAD_REQUEST,
        }
    }
}

/// The token-limit fields each endpoint knows, the first being the one set when missing.
fn limit_fields(endpoint: Endpoint) -> &'static [&'static str] {
    match endpoint {
        Endpoint::ChatCompletions => &["max_tokens", "max_completion_tokens"],
        Endpoint::Completions => &["max_tokens"],
        Endpoint::Responses => &["max_output_tokens"],
        _ => &[],
    }
}

impl Policy {
    pub fn new(policy: &PolicyConfig, include_stream_usage: bool) -> Self {
        let mut allowed_endpoints = [false; Endpoint::ALL.len()];
        for endpoint in policy.allowed_endpoints.iter().filter_map(|e| Endpoint::from_label(e)) {
            allowed_endpoints[endpoint as usize] = true;
        }
        Self {
            allowed_models: policy.allowed_models.iter().map(|p| Glob(p.clone())).collect(),
            allowed_endpoints,
            max_tokens: policy.max_tokens,
            mode: policy.max_tokens_mode,
            set_when_missing: policy.set_max_tokens_when_missing,
            // Choices multiply the tokens: with a token cap, one choice unless said otherwise.
            max_choices: policy.max_choices.or(policy.max_tokens.map(|_| 1)),
            max_body: policy.max_body_bytes,
            include_stream_usage,
            key_models: Vec::new(),
            budgeted: false,
        }
    }

    /// This policy narrowed by a signed key's scope: its models (a model must pass both), its
    /// `max_tokens` (the lower cap wins, refused above it, set when missing), and for a key with
    /// a budget, usage requested on every stream. A key can only narrow, never widen.
    pub fn narrowed(&self, models: Option<&[String]>, max_tokens: Option<u64>, budgeted: bool) -> Policy {
        let mut p = self.clone();
        if let Some(models) = models {
            p.key_models = models.iter().map(|m| Glob(m.clone())).collect();
        }
        if let Some(cap) = max_tokens {
            if p.max_tokens.is_none_or(|own| cap <= own) {
                p.max_tokens = Some(cap);
                p.mode = MaxTokensMode::Reject;
            }
            p.set_when_missing = true;
            p.max_choices = Some(p.max_choices.unwrap_or(1));
        }
        p.include_stream_usage |= budgeted;
        p.budgeted |= budgeted;
        p
    }

    /// The output-token cap requests end up with, if any (what a stream without a usage block
    /// is charged).
    pub fn max_tokens(&self) -> Option<u64> {
        self.max_tokens
    }

    /// True if a rule can refuse or rewrite: then the policy fails closed (only allowed
    /// endpoints are forwarded, every covered body is read whatever its `Content-Type` claims,
    /// and one that is not JSON is refused).
    pub fn enforces(&self) -> bool {
        !self.allowed_models.is_empty()
            || self.budgeted
            || !self.key_models.is_empty()
            || self.max_tokens.is_some()
            || self.max_choices.is_some()
    }

    /// The largest body the policy reads (`policy.max_body_bytes`).
    pub fn max_body(&self) -> u64 {
        self.max_body
    }

    /// Whether a request may be forwarded at all, judged from its method, endpoint and raw
    /// path, before its body is read.
    pub fn admit(
        &self,
        method: &http::Method,
        endpoint: Endpoint,
        path: &str,
        has_body: bool,
        content_encoding: Option<&[u8]>,
    ) -> Result<(), PolicyError> {
        if !self.enforces() {
            return Ok(());
        }
        if !self.allowed_endpoints[endpoint as usize] {
            return Err(PolicyError::EndpointNotAllowed(endpoint.as_str()));
        }
        // Upstreams that drop `;params` would see another endpoint than the one judged here.
        let lower_has_semicolon = || path.to_ascii_lowercase().contains("%3b");
        if path.contains(';') || (path.contains('%') && lower_has_semicolon()) {
            return Err(PolicyError::PathParameters);
        }
        if self.reads_body(endpoint) {
            // Only an exact POST has its body checked; any other method must carry none, or an
            // upstream that upper-cases methods (or honours an override header) would act on a
            // body nobody judged.
            let bodiless = matches!(*method, http::Method::GET | http::Method::HEAD | http::Method::DELETE);
            let admitted = *method == http::Method::POST || (bodiless && !has_body);
            if !admitted {
                return Err(PolicyError::MethodNotAllowed {
                    method: method.clone(),
                    endpoint: endpoint.as_str(),
                });
            }
            // Compressed bytes are not what upstream will read.
            if *method == http::Method::POST
                && content_encoding.is_some_and(|e| !e.eq_ignore_ascii_case(b"identity"))
            {
                return Err(PolicyError::EncodedBody);
            }
        }
        Ok(())
    }

    /// True if POST bodies to `endpoint` are read and checked while the policy enforces: every
    /// allowed endpoint but the model list and file uploads, which carry no model.
    fn reads_body(&self, endpoint: Endpoint) -> bool {
        !matches!(endpoint, Endpoint::Models | Endpoint::Files)
    }

    /// True if requests to `endpoint` need their body read.
    pub fn applies(&self, endpoint: Endpoint) -> bool {
        (self.enforces() && self.reads_body(endpoint))
            || (endpoint == Endpoint::ChatCompletions && self.include_stream_usage)
    }

    /// Applies the rules to a request body for `endpoint`.
    pub fn inspect(&self, endpoint: Endpoint, body: &[u8]) -> Result<Verdict, PolicyError> {
        if self.enforces() {
            unambiguous(body)?;
        }
        let mut json: Map<String, Value> = match serde_json::from_slice::<Value>(body) {
            Ok(Value::Object(map)) => map,
            _ if self.enforces() => return Err(PolicyError::NotJson),
            _ => return Ok(Verdict::Unchanged { model: None }),
        };
        let model = json.get("model").and_then(Value::as_str).map(str::to_string);
        if !self.allowed_models.is_empty() {
            match &model {
                None => return Err(PolicyError::ModelMissing),
                Some(m) if !self.allowed_models.iter().any(|g| g.matches(m)) => {
                    return Err(PolicyError::ModelNotAllowed(m.clone()))
                }
                Some(_) => {}
            }
        }
        if !self.key_models.is_empty() {
            match &model {
                None => return Err(PolicyError::ModelMissing),
                Some(m) if !self.key_models.iter().any(|g| g.matches(m)) => {
                    return Err(PolicyError::ModelOutOfScope(m.clone()))
                }
                Some(_) => {}
            }
        }
        let mut changed = false;
        if let Some(limit) = self.max_choices {
            // Several prompts multiply the output like `n` does.
            let prompts = match json.get("prompt") {
                Some(Value::Array(items)) if endpoint == Endpoint::Completions => {
                    let many = items.iter().all(|i| i.is_string() || i.is_array());
                    if many {
                        items.len() as u64
                    } else {
                        1
                    }
                }
                _ => 1,
            };
            for field in ["n", "best_of"] {
                let Some(value) = json.get(field).filter(|v| !v.is_null()) else { continue };
                let n = value.as_u64().ok_or(PolicyError::BadMaxTokens(field))?;
                if n.saturating_mul(prompts) > limit {
                    return Err(PolicyError::ChoicesExceeded {
                        field,
                        value: n.saturating_mul(prompts),
                        limit,
                    });
                }
            }
            if prompts > limit {
                return Err(PolicyError::ChoicesExceeded { field: "prompt", value: prompts, limit });
            }
        }
        if let Some(limit) = self.max_tokens {
            let fields = limit_fields(endpoint);
            let mut present = false;
            for &field in fields {
                let Some(value) = json.get(field) else { continue };
                if value.is_null() {
                    continue;
                }
                present = true;
                let n = value.as_u64().ok_or(PolicyError::BadMaxTokens(field))?;
                if n > limit {
                    match self.mode {
                        MaxTokensMode::Reject => {
                            return Err(PolicyError::MaxTokensExceeded { field, value: n, limit })
                        }
                        MaxTokensMode::Clamp => {
                            json.insert(field.to_string(), Value::from(limit));
                            changed = true;
                        }
                    }
                }
            }
            if !present && self.set_when_missing {
                if let Some(&field) = fields.first() {
                    json.insert(field.to_string(), Value::from(limit));
                    changed = true;
                }
            }
        }
        let streaming = json.get("stream") == Some(&Value::Bool(true));
        if self.budgeted && streaming && matches!(endpoint, Endpoint::ChatCompletions | Endpoint::Completions)
        {
            // A budget must see what a stream used: usage is requested whatever the caller asked.
            let asked =
                json.get("stream_options").and_then(|o| o.get("include_usage")) == Some(&Value::Bool(true));
            if !asked {
                match json.get_mut("stream_options") {
                    Some(Value::Object(options)) => {
                        options.insert("include_usage".into(), Value::Bool(true));
                    }
                    _ => {
                        json.insert("stream_options".into(), serde_json::json!({"include_usage": true}));
                    }
                }
                changed = true;
            }
        } else if self.include_stream_usage
            && endpoint == Endpoint::ChatCompletions
            && streaming
            && !json.contains_key("stream_options")
        {
            json.insert("stream_options".into(), serde_json::json!({"include_usage": true}));
            changed = true;
        }
        if !changed {
            return Ok(Verdict::Unchanged { model });
        }
        let body = serde_json::to_vec(&json).map_err(|_| PolicyError::NotJson)?;
        Ok(Verdict::Rewritten { body: Bytes::from(body), model })
    }
}

/// The fields the policy judges. Upstreams disagree on duplicate keys (first or last wins) and
/// Go's JSON decoder matches keys case-insensitively (folding `ſ` to `s` and `K` to `k`), so a
/// body that repeats one of these, or spells it another way, could mean something else there.
const POLICED: [&str; 8] = [
    "model",
    "max_tokens",
    "max_completion_tokens",
    "max_output_tokens",
    "n",
    "best_of",
    "stream",
    "stream_options",
];

/// Refuses a top-level object with a repeated key, or a key that folds to a policed field
/// without being it.
fn unambiguous(body: &[u8]) -> Result<(), PolicyError> {
    use serde::de::{Deserializer, IgnoredAny, MapAccess, Visitor};
    struct Keys;
    impl<'de> Visitor<'de> for Keys {
        type Value = Result<(), PolicyError>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut seen = std::collections::HashSet::new();
            while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                map.next_value::<IgnoredAny>()?;
                let folded: String = key
                    .chars()
                    .map(|c| match c {
                        '\u{17F}' => 's',
                        '\u{212A}' => 'k',
                        c => c.to_ascii_lowercase(),
                    })
                    .collect();
                let policed = POLICED.contains(&folded.as_str());
                if !seen.insert(key.to_string()) || (policed && folded != key) {
                    return Ok(Err(PolicyError::AmbiguousKey(if policed {
                        folded
                    } else {
                        "(a key)".into()
                    })));
                }
            }
            Ok(Ok(()))
        }
    }
    match serde_json::Deserializer::from_slice(body).deserialize_map(Keys) {
        Ok(verdict) => verdict,
        // Not an object: the full parse below says so.
        Err(_) => Ok(()),
    }
}

/// A model pattern: exact, or with `*` (any run) and `?` (one character).
#[derive(Debug, Clone)]
struct Glob(String);

impl Glob {
    fn matches(&self, text: &str) -> bool {
        glob_match(self.0.as_bytes(), text.as_bytes())
    }
}

/// Also the model scope of a signed key (`signed::SignedKey::allows_model`).
pub(crate) fn glob_match(pattern: &[u8], text: &[u8]) -> bool {
    // Iterative matching with one backtrack point: linear-ish, no recursion to blow up.
    let (mut p, mut t) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        match pattern.get(p) {
            Some(b'*') => {
                star = Some((p, t));
                p += 1;
            }
            Some(&c) if c == b'?' || c == text[t] => {
                p += 1;
                t += 1;
            }
            _ => match star {
                Some((sp, st)) => {
                    p = sp + 1;
                    t = st + 1;
                    star = Some((sp, st + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|&c| c == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(models: &[&str], max: Option<u64>, mode: MaxTokensMode, set: bool, usage: bool) -> Policy {
        Policy::new(
            &PolicyConfig {
                allowed_models: models.iter().map(|s| s.to_string()).collect(),
                max_tokens: max,
                max_tokens_mode: mode,
                set_max_tokens_when_missing: set,
                ..Default::default()
            },
            usage,
        )
    }

    #[test]
    fn an_enforcing_policy_fails_closed() {
        let p = policy(&["GigaChat/*"], Some(100), MaxTokensMode::Reject, true, false);
        let post = http::Method::POST;
        for e in [Endpoint::Images, Endpoint::Audio, Endpoint::Files, Endpoint::Other] {
            assert_eq!(
                p.admit(&post, e, "/v1/x", true, None).unwrap_err(),
                PolicyError::EndpointNotAllowed(e.as_str())
            );
        }
        assert_eq!(p.admit(&post, Endpoint::Other, "/v1/batches", true, None).unwrap_err().status(), 403);
        assert!(p.admit(&http::Method::GET, Endpoint::Models, "/v1/models", false, None).is_ok());
        assert!(p.admit(&post, Endpoint::ChatCompletions, "/v1/chat/completions", true, None).is_ok());
        for path in ["/v1/chat/completions;x", "/v1/chat/completions%3Bx", "/v1/chat;a/completions"] {
            assert_eq!(
                p.admit(&post, Endpoint::ChatCompletions, path, true, None).unwrap_err(),
                PolicyError::PathParameters
            );
        }
        for method in [http::Method::PUT, http::Method::PATCH] {
            let err =
                p.admit(&method, Endpoint::ChatCompletions, "/v1/chat/completions", true, None).unwrap_err();
            assert_eq!(err.status(), 405, "{err}");
        }
        // lower-case or other methods with a body, and GET with a body, are refused; bodiless
        // GET and DELETE pass
        for (method, has_body) in [("post", true), ("GET", true), ("OPTIONS", false), ("patch", true)] {
            let m = http::Method::from_bytes(method.as_bytes()).unwrap();
            let err =
                p.admit(&m, Endpoint::ChatCompletions, "/v1/chat/completions", has_body, None).unwrap_err();
            assert_eq!(err.status(), 405, "{method}");
        }
        for m in [http::Method::GET, http::Method::DELETE] {
            assert!(p.admit(&m, Endpoint::ChatCompletions, "/v1/chat/completions/abc", false, None).is_ok());
        }
        let gz = p.admit(&post, Endpoint::ChatCompletions, "/v1/chat/completions", true, Some(b"gzip"));
        assert_eq!(gz.unwrap_err().status(), 415);
        // a lone include_stream_usage rewrite is not a policy that refuses anything
        let usage_only = policy(&[], None, MaxTokensMode::Reject, true, true);
        assert!(usage_only.admit(&post, Endpoint::Other, "/v1/batches;x", true, None).is_ok());
    }

    #[test]
    fn ambiguous_bodies_are_refused() {
        let p = policy(&["GigaChat/*"], Some(100), MaxTokensMode::Reject, true, false);
        for body in [
            &br#"{"model":"GigaChat/x","Model":"Qwen/Qwen3"}"#[..],
            br#"{"model":"Qwen/Qwen3","model":"GigaChat/x"}"#,
            br#"{"model":"GigaChat/x","max_tokens":10,"MAX_TOKENS":100000}"#,
            "{\"model\":\"GigaChat/x\",\"max_token\u{17F}\":100000}".as_bytes(),
            br#"{"model":"GigaChat/x","messages":[],"messages":[]}"#,
        ] {
            let err = p.inspect(Endpoint::ChatCompletions, body).unwrap_err();
            assert!(matches!(err, PolicyError::AmbiguousKey(_)), "{}: {err}", String::from_utf8_lossy(body));
        }
        // nested keys may repeat the names
        assert!(p
            .inspect(
                Endpoint::ChatCompletions,
                br#"{"model":"GigaChat/x","metadata":{"Model":"a","model":"b"}}"#
            )
            .is_ok());
    }

    #[test]
    fn a_signed_key_only_narrows() {
        let base = policy(&["GigaChat/*"], Some(1000), MaxTokensMode::Clamp, true, false);
        let models = ["GigaChat/GigaChat-2-Max".to_string(), "Qwen/*".to_string()];
        let p = base.narrowed(Some(&models), Some(512), true);
        // the key's list cannot widen the base list
        let err = p.inspect(Endpoint::ChatCompletions, br#"{"model":"Qwen/Qwen3"}"#).unwrap_err();
        assert_eq!(err, PolicyError::ModelNotAllowed("Qwen/Qwen3".into()));
        let err =
            p.inspect(Endpoint::ChatCompletions, br#"{"model":"GigaChat/GigaChat-2-Lite"}"#).unwrap_err();
        assert_eq!((err.status().as_u16(), err.reason()), (403, "model_not_allowed"));
        // the lower cap wins, in reject mode, and is set when missing
        let err = p
            .inspect(Endpoint::ChatCompletions, br#"{"model":"GigaChat/GigaChat-2-Max","max_tokens":600}"#)
            .unwrap_err();
        assert!(matches!(err, PolicyError::MaxTokensExceeded { limit: 512, .. }), "{err}");
        let v = rewritten(
            p.inspect(Endpoint::ChatCompletions, br#"{"model":"GigaChat/GigaChat-2-Max","stream":true}"#),
        );
        assert_eq!(
            (v["max_tokens"].as_u64(), v["stream_options"]["include_usage"].as_bool()),
            (Some(512), Some(true))
        );
        // a higher key cap does not lift the base cap
        let q = base.narrowed(None, Some(5000), false);
        assert_eq!(q.max_tokens(), Some(1000));
    }

    #[test]
    fn several_prompts_count_as_choices() {
        let p = Policy::new(&PolicyConfig { max_tokens: Some(100), ..Default::default() }, false);
        let err = p.inspect(Endpoint::Completions, br#"{"model":"m","prompt":["a","b","c"]}"#).unwrap_err();
        assert!(matches!(err, PolicyError::ChoicesExceeded { field: "prompt", value: 3, limit: 1 }), "{err}");
        // one prompt given as token ids is one prompt
        assert!(p.inspect(Endpoint::Completions, br#"{"model":"m","prompt":[1,2,3]}"#).is_ok());
        // embeddings inputs are not generations
        assert!(p.inspect(Endpoint::Embeddings, br#"{"model":"m","input":["a","b"]}"#).is_ok());
    }

    #[test]
    fn missing_caps_are_set_and_choices_capped_by_default() {
        let p = Policy::new(&PolicyConfig { max_tokens: Some(100), ..Default::default() }, false);
        let v = rewritten(p.inspect(Endpoint::ChatCompletions, br#"{"model":"m","messages":[]}"#));
        assert_eq!(v["max_tokens"], 100);
        for body in [&br#"{"model":"m","n":128}"#[..], br#"{"model":"m","prompt":"x","best_of":2}"#] {
            let err = p.inspect(Endpoint::Completions, body).unwrap_err();
            assert!(matches!(err, PolicyError::ChoicesExceeded { limit: 1, .. }), "{err}");
        }
        assert!(p.inspect(Endpoint::ChatCompletions, br#"{"model":"m","n":1,"max_tokens":5}"#).is_ok());
        // the old behaviour stays available
        let off = Policy::new(
            &PolicyConfig {
                max_tokens: Some(100),
                set_max_tokens_when_missing: false,
                max_choices: Some(4),
                ..Default::default()
            },
            false,
        );
        assert!(matches!(
            off.inspect(Endpoint::ChatCompletions, br#"{"model":"m","n":4}"#),
            Ok(Verdict::Unchanged { .. })
        ));
    }

    fn rewritten(v: Result<Verdict, PolicyError>) -> Value {
        match v.unwrap() {
            Verdict::Rewritten { body, .. } => serde_json::from_slice(&body).unwrap(),
            other => panic!("expected a rewrite, got {other:?}"),
        }
    }

    #[test]
    fn globs() {
        for (p, t, want) in [
            ("GigaChat/*", "GigaChat/GigaChat-2-Max", true),
            ("GigaChat/*", "Qwen/Qwen3", false),
            ("*-Max", "GigaChat/GigaChat-2-Max", true),
            ("gpt-4?", "gpt-4o", true),
            ("gpt-4?", "gpt-4", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
            ("*", "", true),
            ("a*b*c", "axxbyyc", true),
            ("a*b*c", "axxbyy", false),
        ] {
            assert_eq!(glob_match(p.as_bytes(), t.as_bytes()), want, "{p} ~ {t}");
        }
    }

    #[test]
    fn models_outside_the_allow_list_are_refused_by_name() {
        let p = policy(&["GigaChat/*"], None, MaxTokensMode::Reject, false, false);
        let body = br#"{"model":"Qwen/Qwen3-235B","messages":[]}"#;
        let err = p.inspect(Endpoint::ChatCompletions, body).unwrap_err();
        assert_eq!(err, PolicyError::ModelNotAllowed("Qwen/Qwen3-235B".into()));
        assert_eq!(err.status(), 403);
        assert_eq!(
            p.inspect(Endpoint::Embeddings, br#"{"model":"GigaChat/Embeddings","input":"x"}"#).unwrap(),
            Verdict::Unchanged { model: Some("GigaChat/Embeddings".into()) }
        );
        assert_eq!(p.inspect(Endpoint::ChatCompletions, b"{}").unwrap_err(), PolicyError::ModelMissing);
        assert_eq!(p.inspect(Endpoint::ChatCompletions, b"not json").unwrap_err(), PolicyError::NotJson);
    }

    #[test]
    fn max_tokens_reject_clamp_and_set() {
        let reject = policy(&[], Some(100), MaxTokensMode::Reject, false, false);
        let body = br#"{"model":"m","max_tokens":500}"#;
        assert_eq!(
            reject.inspect(Endpoint::ChatCompletions, body).unwrap_err(),
            PolicyError::MaxTokensExceeded { field: "max_tokens", value: 500, limit: 100 }
        );
        let ok = br#"{"model":"m","max_completion_tokens":50}"#;
        assert!(matches!(reject.inspect(Endpoint::ChatCompletions, ok), Ok(Verdict::Unchanged { .. })));

        let clamp = policy(&[], Some(100), MaxTokensMode::Clamp, false, false);
        let v = rewritten(
            clamp.inspect(Endpoint::Responses, br#"{"model":"m","max_output_tokens":9000,"input":"hi"}"#),
        );
        assert_eq!(v["max_output_tokens"], 100);
        assert_eq!(v["input"], "hi");

        let set = policy(&[], Some(100), MaxTokensMode::Clamp, true, false);
        let v = rewritten(set.inspect(Endpoint::Completions, br#"{"model":"m","prompt":"x"}"#));
        assert_eq!(v["max_tokens"], 100);
        assert_eq!(
            reject.inspect(Endpoint::ChatCompletions, br#"{"model":"m","max_tokens":"lots"}"#).unwrap_err(),
            PolicyError::BadMaxTokens("max_tokens")
        );
    }

    #[test]
    fn stream_usage_is_requested_only_when_absent() {
        let p = policy(&[], None, MaxTokensMode::Reject, false, true);
        assert!(p.applies(Endpoint::ChatCompletions));
        assert!(!p.applies(Endpoint::Embeddings));
        let v =
            rewritten(p.inspect(Endpoint::ChatCompletions, br#"{"model":"m","stream":true,"messages":[]}"#));
        assert_eq!(v["stream_options"]["include_usage"], true);
        // key order and other fields are kept
        let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
        assert_eq!(keys, ["model", "stream", "messages", "stream_options"]);
        for untouched in [
            &br#"{"model":"m","stream":true,"stream_options":{"include_usage":false}}"#[..],
            br#"{"model":"m","stream":false}"#,
            br#"{"model":"m"}"#,
            b"not json at all",
        ] {
            assert!(matches!(p.inspect(Endpoint::ChatCompletions, untouched), Ok(Verdict::Unchanged { .. })));
        }
    }

    #[test]
    fn an_inactive_policy_reads_nothing() {
        let p = Policy::default();
        for e in Endpoint::ALL {
            assert!(!p.applies(e));
        }
    }
}
