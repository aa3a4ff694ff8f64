//! Pure path handling: which requests sidekey forwards, where to, and under which metric label.

use http::uri::{Authority, PathAndQuery, Scheme};
use http::Uri;

/// The API prefix clients use: `base_url = http://127.0.0.1:8181/v1`.
pub const API_PREFIX: &str = "/v1";

/// A closed set of endpoint labels for metrics and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    ChatCompletions,
    Completions,
    Embeddings,
    Models,
    Responses,
    Audio,
    Images,
    Files,
    Other,
}

impl Endpoint {
    pub const ALL: [Endpoint; 9] = [
        Endpoint::ChatCompletions,
        Endpoint::Completions,
        Endpoint::Embeddings,
        Endpoint::Models,
        Endpoint::Responses,
        Endpoint::Audio,
        Endpoint::Images,
        Endpoint::Files,
        Endpoint::Other,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Endpoint::ChatCompletions => "chat_completions",
            Endpoint::Completions => "completions",
            Endpoint::Embeddings => "embeddings",
            Endpoint::Models => "models",
            Endpoint::Responses => "responses",
            Endpoint::Audio => "audio",
            Endpoint::Images => "images",
            Endpoint::Files => "files",
            Endpoint::Other => "other",
        }
    }

    /// True for the endpoints whose responses report token usage.
    pub fn carries_usage(self) -> bool {
        matches!(
            self,
            Endpoint::ChatCompletions | Endpoint::Completions | Endpoint::Responses | Endpoint::Embeddings
        )
    }

    /// Classifies a client path (`/v1/chat/completions`, ...).
    pub fn classify(path: &str) -> Endpoint {
        // Upstream servers commonly decode %XX, merge slashes and ignore case, so the label (and
        // with it the policy and usage accounting) is taken from that canonical form: an
        // encoded `/v1/chat/%63ompletions` is still a chat completion.
        if path.bytes().any(|b| b == b'%' || b.is_ascii_uppercase()) || path.contains("//") {
            return Self::classify_canonical(&canonical(path));
        }
        Self::classify_canonical(path)
    }

    fn classify_canonical(path: &str) -> Endpoint {
        let Some(rest) = path.strip_prefix(API_PREFIX).and_then(|r| r.strip_prefix('/')) else {
            return Endpoint::Other;
        };
        let first =
            |name: &str| rest == name || rest.starts_with(name) && rest[name.len()..].starts_with('/');
        if first("chat/completions") {
            Endpoint::ChatCompletions
        } else if first("completions") {
            Endpoint::Completions
        } else if first("embeddings") {
            Endpoint::Embeddings
        } else if first("models") {
            Endpoint::Models
        } else if first("responses") {
            Endpoint::Responses
        } else if first("audio") {
            Endpoint::Audio
        } else if first("images") {
            Endpoint::Images
        } else if first("files") {
            Endpoint::Files
        } else {
            Endpoint::Other
        }
    }
}

/// Lower-cases, decodes percent-encoded unreserved characters and merges repeated slashes.
fn canonical(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let mut c = bytes[i];
        if c == b'%' && i + 2 < bytes.len() {
            let decoded =
                std::str::from_utf8(&bytes[i + 1..i + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
            if let Some(d) = decoded.filter(|d| d.is_ascii_alphanumeric() || b"-._~".contains(d)) {
                c = d;
                i += 2;
            }
        }
        i += 1;
        if c == b'/' && out.ends_with('/') {
            continue;
        }
        out.push(c.to_ascii_lowercase() as char);
    }
    out
}

/// Why a path is not forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PathError {
    /// Outside `/v1`.
    NotFound,
    /// A `.`/`..` segment, literal or percent-encoded, or an encoded slash or backslash that
    /// could turn into one upstream.
    Traversal,
}

/// The part of a client's path-and-query after `/v1`: `"/chat/completions?x=1"`, `"?x"` or `""`.
pub fn strip_prefix(path_and_query: &str) -> Result<&str, PathError> {
    let rest = path_and_query.strip_prefix(API_PREFIX).ok_or(PathError::NotFound)?;
    if !(rest.is_empty() || rest.starts_with('/') || rest.starts_with('?')) {
        return Err(PathError::NotFound);
    }
    let path = rest.split('?').next().unwrap_or_default();
    if escapes(path) {
        return Err(PathError::Traversal);
    }
    Ok(rest)
}

/// True if any segment is a dot segment, or could become one (or a new segment) after
/// percent-decoding upstream.
fn escapes(path: &str) -> bool {
    // A fragment never belongs in a request target, and URI parsing would drop it (and with it
    // what made a segment harmless).
    if path.contains('\\') || path.contains('#') {
        return true;
    }
    path.split('/').any(|segment| {
        // Servlet containers treat `..;x` as `..`: judge the segment without its parameters.
        let segment = segment.split(';').next().unwrap_or_default();
        if segment == "." || segment == ".." {
            return true;
        }
        if !segment.contains('%') {
            return false;
        }
        // Rare: only percent-encoded segments pay for the lowercase copy.
        let lower = segment.to_ascii_lowercase();
        // Encoded separators, NUL, and double encodings of either that a second decode would
        // turn into traversal.
        if ["%2f", "%5c", "%00", "%252e", "%252f", "%255c"].iter().any(|bad| lower.contains(bad)) {
            return true;
        }
        let decoded = lower.replace("%2e", ".");
        decoded == "." || decoded == ".."
    })
}

/// The upstream base, split once at startup so each request only appends its path.
#[derive(Debug, Clone)]
pub struct Target {
    scheme: Scheme,
    authority: Authority,
    /// Base path without a trailing slash, e.g. `/v1` or `` (empty).
    base_path: String,
}

impl Target {
    /// From a validated absolute URL (`https://host/v1`, trailing `/` tolerated).
    pub fn new(base: &Uri) -> Option<Self> {
        Some(Self {
            scheme: base.scheme()?.clone(),
            authority: base.authority()?.clone(),
            base_path: base.path().trim_end_matches('/').to_string(),
        })
    }

    /// `{base}{rest}` where `rest` comes from [`strip_prefix`].
    pub fn join(&self, rest: &str) -> Result<Uri, http::Error> {
        let slash = self.base_path.is_empty() && !rest.starts_with('/');
        // Exact capacity: `Bytes::from(String)` then takes the buffer without reallocating.
        let mut pq = String::with_capacity(self.base_path.len() + rest.len() + usize::from(slash));
        pq.push_str(&self.base_path);
        if slash {
            pq.push('/');
        }
        pq.push_str(rest);
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(PathAndQuery::from_maybe_shared(bytes::Bytes::from(pq))?);
        Ok(Uri::from_parts(parts)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(s: &str) -> Target {
        Target::new(&s.parse().unwrap()).unwrap()
    }

    #[test]
    fn maps_paths_and_queries() {
        let t = target("https://api.example/v1");
        let cases = [
            ("/v1/chat/completions", "https://api.example/v1/chat/completions"),
            ("/v1/models?limit=2&after=x", "https://api.example/v1/models?limit=2&after=x"),
            ("/v1/models/GigaChat/GigaChat-2-Max", "https://api.example/v1/models/GigaChat/GigaChat-2-Max"),
            ("/v1", "https://api.example/v1"),
            ("/v1?x=1", "https://api.example/v1?x=1"),
        ];
        for (path, want) in cases {
            let rest = strip_prefix(path).unwrap();
            assert_eq!(t.join(rest).unwrap().to_string(), want, "{path}");
        }
    }

    #[test]
    fn trailing_slash_and_empty_base_path() {
        let t = target("http://127.0.0.1:9/api/gigacube/openai/v1/");
        assert_eq!(
            t.join("/embeddings").unwrap().to_string(),
            "http://127.0.0.1:9/api/gigacube/openai/v1/embeddings"
        );
        let t = target("http://127.0.0.1:9");
        assert_eq!(t.join("/models").unwrap().to_string(), "http://127.0.0.1:9/models");
        assert_eq!(t.join("").unwrap().to_string(), "http://127.0.0.1:9/");
        assert_eq!(t.join("?a").unwrap().to_string(), "http://127.0.0.1:9/?a");
    }

    #[test]
    fn outside_v1_is_not_found() {
        for p in ["/", "/v2/models", "/v1x/models", "/chat/completions", "/metrics"] {
            assert_eq!(strip_prefix(p), Err(PathError::NotFound), "{p}");
        }
    }

    #[test]
    fn traversal_is_refused() {
        for p in [
            "/v1/../x",
            "/v1/./models",
            "/v1/%2e%2e/x",
            "/v1/%2E%2e/x",
            "/v1/.%2e/x",
            "/v1/models/..",
            "/v1/..%2fadmin",
            "/v1/a%2Fb",
            "/v1/a\\..\\b",
            "/v1/a%5c..",
            "/v1/.#...",
            "/v1/..;/admin",
            "/v1/.;x/admin",
            "/v1/%252e%252e/admin",
            "/v1/a%00b",
        ] {
            assert_eq!(strip_prefix(p), Err(PathError::Traversal), "{p}");
        }
        // dots inside names and in the query are fine
        assert!(strip_prefix("/v1/models/gpt-4.1").is_ok());
        assert!(strip_prefix("/v1/files/a..b").is_ok());
        assert!(strip_prefix("/v1/models?next=../x").is_ok());
    }

    #[test]
    fn endpoints_are_classified() {
        use Endpoint::*;
        let cases = [
            ("/v1/chat/completions", ChatCompletions),
            ("/v1/completions", Completions),
            ("/v1/embeddings", Embeddings),
            ("/v1/models", Models),
            ("/v1/models/GigaChat/GigaChat-2-Max", Models),
            ("/v1/responses/abc", Responses),
            ("/v1/audio/transcriptions", Audio),
            ("/v1/images/generations", Images),
            ("/v1/files", Files),
            ("/v1/modelsx", Other),
            ("/v1/batches", Other),
            ("/healthz", Other),
            ("/v1/chat/%63ompletions", ChatCompletions),
            ("/v1//chat//completions", ChatCompletions),
            ("/v1/Chat/Completions", ChatCompletions),
            ("/v1/%65mbeddings", Embeddings),
            ("/v1/chat%2fcompletions", Other),
        ];
        for (path, want) in cases {
            assert_eq!(Endpoint::classify(path), want, "{path}");
        }
        for (i, e) in Endpoint::ALL.iter().enumerate() {
            assert_eq!(*e as usize, i);
        }
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Whatever the client sends, a forwarded request lands under the base path, carries no
        /// dot segment (literal or encoded), and keeps its query byte for byte.
        #[test]
        fn forwarded_paths_stay_under_the_base(
            segments in proptest::collection::vec(r"(\.|\.\.|%2[eE]|%2[fF]|%5[cC]|[a-zA-Z0-9_.~-]){0,6}", 0..6),
            query in proptest::option::of("[a-zA-Z0-9=&%./_-]{0,20}"),
        ) {
            let mut pq = String::from("/v1");
            for s in &segments {
                pq.push('/');
                pq.push_str(s);
            }
            if let Some(q) = &query {
                pq.push('?');
                pq.push_str(q);
            }
            let target = Target::new(&"https://api.example/base/v1".parse().unwrap()).unwrap();
            if let Ok(rest) = strip_prefix(&pq) {
                let uri = target.join(rest).unwrap();
                prop_assert_eq!(uri.authority().unwrap().as_str(), "api.example");
                let path = uri.path();
                prop_assert!(path.starts_with("/base/v1"), "{}", path);
                for seg in path.split('/') {
                    let decoded = seg.to_ascii_lowercase().replace("%2e", ".");
                    prop_assert!(decoded != "." && decoded != "..", "{}", path);
                    prop_assert!(!decoded.contains("%2f") && !decoded.contains("%5c"), "{}", path);
                }
                prop_assert_eq!(uri.query(), query.as_deref());
            }
        }

        #[test]
        fn never_panics(path in ".{0,200}") {
            let _ = strip_prefix(&path);
            let _ = Endpoint::classify(&path);
        }
    }
}
