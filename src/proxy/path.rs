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

    /// The endpoint with this label (`chat_completions`, ...).
    pub fn from_label(label: &str) -> Option<Endpoint> {
        Self::ALL.into_iter().find(|e| e.as_str() == label)
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
        // `;params` are dropped too, as servlet-style upstreams do: `chat/completions;x` is chat.
        if path.bytes().any(|b| b == b'%' || b == b';' || b.is_ascii_uppercase()) || path.contains("//") {
            return Self::classify_canonical(&canonical(path));
        }
        Self::classify_canonical(path)
    }

    /// Classifies the part of a client path after its route's prefix (`/chat/completions`).
    pub fn classify_rest(rest: &str) -> Endpoint {
        if rest.bytes().any(|b| b == b'%' || b == b';' || b.is_ascii_uppercase()) || rest.contains("//") {
            return Self::classify_rest_canonical(&canonical(rest));
        }
        Self::classify_rest_canonical(rest)
    }

    fn classify_canonical(path: &str) -> Endpoint {
        match path.strip_prefix(API_PREFIX) {
            Some(rest) => Self::classify_rest_canonical(rest),
            None => Endpoint::Other,
        }
    }

    fn classify_rest_canonical(rest: &str) -> Endpoint {
        let Some(rest) = rest.strip_prefix('/') else {
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

/// Lower-cases, decodes percent-encoded unreserved characters, drops `;params` from segments
/// and merges repeated slashes.
fn canonical(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let mut c = bytes[i];
        if c == b';' {
            // Skip to the end of the segment.
            i += bytes[i..].iter().position(|&b| b == b'/').unwrap_or(bytes.len() - i);
            continue;
        }
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
    strip_route(path_and_query, API_PREFIX)
}

/// The part of a client's path-and-query after a route's `prefix`, which must end at a segment
/// boundary, checked for traversal.
pub fn strip_route<'a>(path_and_query: &'a str, prefix: &str) -> Result<&'a str, PathError> {
    let rest = path_and_query.strip_prefix(prefix).ok_or(PathError::NotFound)?;
    if !(rest.is_empty() || rest.starts_with('/') || rest.starts_with('?')) {
        return Err(PathError::NotFound);
    }
    let path = rest.split('?').next().unwrap_or_default();
    if escapes(path) {
        return Err(PathError::Traversal);
    }
    Ok(rest)
}

/// True if any piece of the path is a dot segment, or could become one after an upstream
/// decodes it.
///
/// The path itself is forwarded byte for byte (`GigaChat%2FGigaChat-2-Max` stays encoded); this
/// check only judges it. For the check, `/`, `\`, `%2F` and `%5C` separate pieces and `;` ends
/// one (servlet containers drop `;params`); the path is percent-decoded again and again until it
/// stops changing (so `%252e` and `%%32%65` count), and characters that Unicode normalisation
/// turns into dots or slashes count as those.
fn escapes(path: &str) -> bool {
    // A fragment never belongs in a request target, and URI parsing would drop it (and with it
    // what made a segment harmless).
    if path.contains('#') {
        return true;
    }
    let mut current: std::borrow::Cow<'_, [u8]> = std::borrow::Cow::Borrowed(path.as_bytes());
    for _ in 0..MAX_DECODE_ROUNDS {
        if has_dot_piece(&current) {
            return true;
        }
        match percent_decode_once(&current) {
            // A NUL truncates paths in C-based servers; URL parsers strip tab and newlines (so
            // `.%09.` can become `..`); bytes that are not UTF-8 include overlong dots
            // (`%c0%ae`) that old servers decode as `.`.
            Some(decoded) if decoded.iter().any(|&b| b < 0x20 || b == 0x7f) => return true,
            Some(decoded) if std::str::from_utf8(&decoded).is_err() => return true,
            Some(decoded) => current = std::borrow::Cow::Owned(decoded),
            None => return false,
        }
    }
    // Still changing after this many decodings: nobody encodes a real id like that.
    true
}

/// Percent-encoding layers judged at most; deeper nesting is refused.
const MAX_DECODE_ROUNDS: usize = 8;

/// One percent-decoding pass, or `None` if there was nothing to decode.
fn percent_decode_once(bytes: &[u8]) -> Option<Vec<u8>> {
    // The common case (no escape at all) allocates nothing.
    memchr::memchr(b'%', bytes)?;
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let mut out = Vec::with_capacity(bytes.len());
    let mut changed = false;
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                out.push(h << 4 | l);
                i += 3;
                changed = true;
                continue;
            }
        }
        // IIS's `%u002e`.
        if bytes[i] == b'%' && i + 5 < bytes.len() && bytes[i + 1].eq_ignore_ascii_case(&b'u') {
            let code =
                bytes[i + 2..i + 6].iter().try_fold(0u32, |acc, &b| hex(b).map(|d| acc << 4 | u32::from(d)));
            if let Some(c) = code.and_then(char::from_u32) {
                let mut buf = [0u8; 4];
                out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes());
                i += 6;
                changed = true;
                continue;
            }
        }
        out.push(bytes[i]);
        i += 1;
    }
    changed.then_some(out)
}

/// True if a piece between separators (cut at `;`) is `.` or `..`, counting characters that
/// normalise to a dot (fullwidth `．`, one-dot leader `․`, small full stop `﹒`, two-dot leader
/// `‥`) and pieces split by characters that normalise to a slash or backslash.
fn has_dot_piece(bytes: &[u8]) -> bool {
    let normalised;
    let bytes = if bytes.is_ascii() {
        bytes
    } else {
        normalised = normalise_lookalikes(bytes);
        &normalised[..]
    };
    bytes.split(|&b| b == b'/' || b == b'\\').any(|piece| {
        // `;` ends a segment for servlet containers; a decoded `?` or `#` ends the path for a
        // server that decodes, then parses again.
        let piece = piece.split(|&b| matches!(b, b';' | b'?' | b'#')).next().unwrap_or_default();
        piece == b"." || piece == b".."
    })
}

/// Replaces the characters NFKC maps to `.`, `/` or `\` by those ASCII bytes.
fn normalise_lookalikes(bytes: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(bytes);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\u{FF0E}' | '\u{2024}' | '\u{FE52}' => out.push('.'),
            '\u{2025}' => out.push_str(".."),
            '\u{FF0F}' => out.push('/'),
            '\u{FF3C}' | '\u{FE68}' => out.push('\\'),
            '\u{037E}' | '\u{FE54}' | '\u{FF1B}' => out.push(';'),
            c => out.push(c),
        }
    }
    out.into_bytes()
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
            "/v1/a\\..\\b",
            "/v1/a%5c..",
            "/v1/.#...",
            "/v1/..;/admin",
            "/v1/.;x/admin",
            "/v1/%252e%252e/admin",
            "/v1/a%00b",
            "/v1/..%3b/admin",
            "/v1/..%3B/admin",
            "/v1/%25%32%65%25%32%65/admin",
            "/v1/%%32%65%%32%65/admin",
            "/v1/%252e/admin",
            "/v1/a%252f..%252fadmin",
            "/v1/a%255c..",
            "/v1/%25252e%25252e/x",
            "/v1/\u{FF0E}\u{FF0E}/admin",
            "/v1/%EF%BC%8E%EF%BC%8E/admin",
            "/v1/\u{2024}/admin",
            "/v1/\u{2025}/admin",
            "/v1/a\u{FF0F}..",
            "/v1/models/GigaChat%2F..%2F..%2Fadmin",
            "/v1/%2525252525252525252e",
            "/v1/.%09./admin",
            "/v1/..%0a/x",
            "/v1/models/..%3F",
            "/v1/models/..%23",
            "/v1/%c0%ae%c0%ae/admin",
            "/v1/%u002e%u002e/admin",
            "/v1/..%CD%BE/admin",
            "/v1/..%7f",
        ] {
            assert_eq!(strip_prefix(p), Err(PathError::Traversal), "{p}");
        }
        // Encoded separators inside ids pass byte for byte (the SDKs encode `/` in model ids).
        for p in [
            "/v1/models/GigaChat%2FGigaChat-2-Max",
            "/v1/models/openai%2fgpt-oss-120b",
            "/v1/files/a%5Cb",
            "/v1/models/a%252Fb",
            "/v1/models/v1.2%3Bx",
            "/v1/files/%E2%80%A6name",
        ] {
            assert_eq!(strip_prefix(p), Ok(&p[3..]), "{p}");
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
            ("/v1/chat/completions;x", ChatCompletions),
            ("/v1/chat;a/completions;b=c", ChatCompletions),
            ("/v1/models/GigaChat%2FGigaChat-2-Max", Models),
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
            segments in proptest::collection::vec(r"(\.|\.\.|%2[eE]|%2[fF]|%5[cC]|%25|%3[bB]|;|[a-zA-Z0-9_.~-]){0,6}", 0..6),
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
                // However often upstream decodes it, no piece becomes a dot segment.
                let mut text = path.to_string();
                for _ in 0..4 {
                    for piece in text.split(['/', '\\']) {
                        let piece = piece.split(';').next().unwrap_or_default();
                        prop_assert!(piece != "." && piece != "..", "{}", path);
                    }
                    text = String::from_utf8_lossy(&percent_decode_once(text.as_bytes()).unwrap_or_else(|| text.clone().into_bytes())).into_owned();
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
