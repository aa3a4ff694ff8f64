//! What of a token endpoint's error body may be logged: its length and the values of the known
//! error fields, each decoded first and then stripped of the credential and anything
//! token-like. The body itself is never kept.
//!
//! Servers echo what they were sent in many spellings: JSON `\u0026` escapes (decoded by the
//! JSON parser), percent-encoding in either case, HTML entities, Base64 in a `Basic` header.
//! Matching the credential against each encoding misses the next one, so values are decoded
//! until stable and then compared; a word sharing a run of characters with a credential, or
//! Base64 that decodes to one, is dropped whole.

use std::fmt;

use super::credential::Credentials;
use crate::secret::REDACTED;

/// The fields read from a JSON error body, in the order they are reported. OAuth2 (RFC 6749
/// §5.2) uses `error`/`error_description`; others use `message`/`code`, or nest them in `error`.
const TOP_FIELDS: &[&str] = &["error", "error_description", "message", "code"];
const NESTED_FIELDS: &[(&str, &str)] = &[("error.message", "message"), ("error.code", "code")];
/// How much of one field value is kept.
const VALUE_CHARS: usize = 120;
/// A word sharing this many consecutive characters with a credential value is redacted (the
/// whole value when it is shorter).
const SHARED_RUN: usize = 6;
/// Unbroken runs of token characters this long are redacted (JWTs, hex keys, UUIDs).
const TOKEN_RUN: usize = 32;
/// Shortest run tried as Base64 (`Basic` of a short id and secret is about 12 characters).
const BASE64_RUN: usize = 8;
/// Rounds of decoding: enough for double encoding, bounded for hostile input.
const DECODE_ROUNDS: usize = 4;

/// A token endpoint's error body as it may be logged.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorBody {
    len: usize,
    json: bool,
    fields: Vec<(&'static str, String)>,
}

impl ErrorBody {
    /// Reads the known error fields of `bytes` and redacts each of them against `creds`.
    pub fn summarize(bytes: &[u8], creds: &Credentials) -> Self {
        let mut out = Self { len: bytes.len(), json: false, fields: Vec::new() };
        let Ok(serde_json::Value::Object(obj)) = serde_json::from_slice::<serde_json::Value>(bytes) else {
            return out;
        };
        out.json = true;
        let needles = Needles::new(&[creds.id.expose(), creds.secret.expose()]);
        for &name in TOP_FIELDS {
            if let Some(text) = obj.get(name).and_then(scalar) {
                out.fields.push((name, redact(&text, &needles)));
            }
        }
        if let Some(inner) = obj.get("error").and_then(serde_json::Value::as_object) {
            for &(label, name) in NESTED_FIELDS {
                if let Some(text) = inner.get(name).and_then(scalar) {
                    out.fields.push((label, redact(&text, &needles)));
                }
            }
        }
        out
    }
}

impl fmt::Display for ErrorBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.len, self.json) {
            (0, _) => f.write_str("empty body"),
            (n, false) => write!(f, "{n}-byte body, not a JSON object"),
            (n, true) if self.fields.is_empty() => write!(f, "{n}-byte body, no known error field"),
            (n, true) => {
                write!(f, "{n}-byte body")?;
                for (i, (name, value)) in self.fields.iter().enumerate() {
                    let sep = if i == 0 { ": " } else { ", " };
                    let quoted = value.replace('\\', "\\\\").replace('"', "\\\"");
                    write!(f, "{sep}{name}=\"{quoted}\"")?;
                }
                Ok(())
            }
        }
    }
}

/// A string, number or boolean as text; structures are not reported.
fn scalar(value: &serde_json::Value) -> Option<String> {
    match value {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        serde_json::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// The credential values to look for, lowercased: whole, and as every run of [`SHARED_RUN`]
/// characters (all of a shorter value).
struct Needles {
    whole: Vec<String>,
    runs: Vec<String>,
}

impl Needles {
    fn new(secrets: &[&str]) -> Self {
        let whole: Vec<String> = secrets.iter().filter(|s| !s.is_empty()).map(|s| s.to_lowercase()).collect();
        let mut runs: Vec<String> = whole
            .iter()
            .flat_map(|s| {
                let chars: Vec<char> = s.chars().collect();
                let width = chars.len().min(SHARED_RUN);
                chars.windows(width).map(|w| w.iter().collect::<String>()).collect::<Vec<_>>()
            })
            .collect();
        runs.sort_unstable();
        runs.dedup();
        Self { whole, runs }
    }

    /// True if `text` contains, ignoring case, one of the runs.
    fn shared_by(&self, text: &str) -> bool {
        let text = text.to_lowercase();
        self.runs.iter().any(|run| text.contains(run.as_str()))
    }
}

/// One field value, decoded, with every credential echo and token-like word replaced, on one
/// line and at most [`VALUE_CHARS`] long.
fn redact(value: &str, needles: &Needles) -> String {
    let mut text: String = decode(value).chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    // Whole echoes first, so a credential containing spaces is caught before words are split.
    for secret in &needles.whole {
        text = replace_ignoring_case(&text, secret, REDACTED);
    }
    let words: Vec<&str> =
        text.split_whitespace().map(|w| if sensitive(w, needles) { REDACTED } else { w }).collect();
    let joined = words.join(" ");
    match joined.char_indices().nth(VALUE_CHARS) {
        Some((i, _)) => format!("{}…", &joined[..i]),
        None => joined,
    }
}

/// True if `word` (already decoded) holds part of a credential, Base64 of one, or a token.
fn sensitive(word: &str, needles: &Needles) -> bool {
    let runs = || word.split(|c: char| !(c.is_ascii_alphanumeric() || "._-+/=~".contains(c)));
    needles.shared_by(word)
        // a form-encoded space
        || needles.shared_by(&word.replace('+', " "))
        || runs().any(|r| r.len() >= TOKEN_RUN)
        || runs()
            .flat_map(|r| r.split(['.', '~']))
            // `auth=azE6czNj`: an `=` that is not trailing padding separates, not pads.
            .flat_map(|r| {
                let body = r.trim_end_matches('=');
                let pad = &r[body.len()..];
                let mut parts: Vec<String> = body.split('=').map(str::to_string).collect();
                if let Some(last) = parts.last_mut() {
                    last.push_str(pad);
                }
                parts
            })
            .filter(|r| r.len() >= BASE64_RUN)
            .filter_map(|r| base64_decode(&r))
            .any(|bytes| needles.shared_by(&decode(&String::from_utf8_lossy(&bytes))))
}

fn replace_ignoring_case(text: &str, needle: &str, with: &str) -> String {
    let (lower, needle) = (text.to_lowercase(), needle.to_lowercase());
    // Lowercasing can change byte lengths outside ASCII; then the positions would not line up,
    // and the word pass that follows still catches the echo.
    if lower.len() != text.len() || needle.is_empty() {
        return text.to_string();
    }
    let mut out = String::with_capacity(text.len());
    let mut rest = 0;
    for (at, _) in lower.match_indices(&needle) {
        if at >= rest && text.is_char_boundary(at) && text.is_char_boundary(at + needle.len()) {
            out.push_str(&text[rest..at]);
            out.push_str(with);
            rest = at + needle.len();
        }
    }
    out.push_str(&text[rest..]);
    out
}

/// Percent-decoding (either case) and HTML entities, repeated until nothing changes.
fn decode(value: &str) -> String {
    let mut text = value.to_string();
    for _ in 0..DECODE_ROUNDS {
        let next = html_unescape(&percent_decode(&text));
        if next == text {
            break;
        }
        text = next;
    }
    text
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        match (bytes[i], bytes.get(i + 1).copied().and_then(hex), bytes.get(i + 2).copied().and_then(hex)) {
            (b'%', Some(hi), Some(lo)) => {
                out.push((hi * 16 + lo) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Numeric character references and the named entities HTML escapers emit.
fn html_unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find('&') {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let entity = rest[1..].find(';').filter(|&end| end <= 10).map(|end| &rest[1..=end]);
        let decoded = entity.and_then(|e| match e {
            "amp" => Some('&'),
            "lt" => Some('<'),
            "gt" => Some('>'),
            "quot" => Some('"'),
            "apos" => Some('\''),
            "nbsp" => Some(' '),
            _ => {
                let num = e.strip_prefix('#')?;
                let code = match num.strip_prefix(['x', 'X']) {
                    Some(hex) => u32::from_str_radix(hex, 16).ok()?,
                    None => num.parse().ok()?,
                };
                char::from_u32(code)
            }
        });
        match (entity, decoded) {
            (Some(e), Some(c)) => {
                out.push(c);
                rest = &rest[e.len() + 2..];
            }
            _ => {
                out.push('&');
                rest = &rest[1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Standard or URL-safe Base64, padding optional; `None` if `run` is not Base64.
fn base64_decode(run: &str) -> Option<Vec<u8>> {
    let value = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' | b'-' => Some(62),
        b'/' | b'_' => Some(63),
        _ => None,
    };
    let digits: Vec<u8> = run.trim_end_matches('=').bytes().map(value).collect::<Option<_>>()?;
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, &d)| acc | u32::from(d) << (18 - 6 * i));
        let bytes = n.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;
    use crate::token::iam::{base64, form_urlencode};

    // Short, so `Basic` of the pair (28 characters) is below the token-run rule, and full of
    // characters every encoding changes.
    const ID: &str = "kí&Zq/7";
    const SECRET: &str = "Sé&cr+t/9xK";

    fn creds() -> Credentials {
        Credentials { id: Secret::new(ID), secret: Secret::new(SECRET) }
    }

    /// Every run of five characters of the key id and the secret: no recognisable piece left.
    fn leaks(out: &str) -> Vec<String> {
        let out = out.to_lowercase();
        [ID, SECRET]
            .iter()
            .flat_map(|s| {
                let chars: Vec<char> = s.to_lowercase().chars().collect();
                chars.windows(5).map(|w| w.iter().collect::<String>()).collect::<Vec<_>>()
            })
            .filter(|w| out.contains(w.as_str()))
            .collect()
    }

    /// `\u`-escapes every non-alphanumeric character, as Go's encoder does for `&`, `<`, `>`.
    fn go_escaped(s: &str) -> String {
        s.chars()
            .map(|c| if c.is_ascii_alphanumeric() { c.to_string() } else { format!("\\u{:04x}", c as u32) })
            .collect()
    }

    fn percent_lower(s: &str) -> String {
        s.bytes()
            .map(|b| if b.is_ascii_alphanumeric() { char::from(b).to_string() } else { format!("%{b:02x}") })
            .collect()
    }

    fn html_entities(s: &str) -> String {
        s.chars()
            .map(|c| match c {
                '&' => "&amp;".to_string(),
                c if c.is_ascii_alphanumeric() => c.to_string(),
                c => format!("&#{};", c as u32),
            })
            .collect()
    }

    /// Every way an echo is spelled that the old redaction let through, and a few more.
    fn echoes() -> Vec<(&'static str, String)> {
        let basic = base64(format!("{ID}:{SECRET}").as_bytes());
        let basic_form = base64(format!("{}:{}", form_urlencode(ID), form_urlencode(SECRET)).as_bytes());
        vec![
            ("raw", format!("bad secret {SECRET} for key {ID}")),
            ("Go \\u escapes", format!("bad secret {} for key {}", go_escaped(SECRET), go_escaped(ID))),
            ("lowercase percent", format!("secret={}&keyId={}", percent_lower(SECRET), percent_lower(ID))),
            ("double percent", percent_lower(&percent_lower(SECRET))),
            ("HTML entities", format!("bad secret {} for {}", html_entities(SECRET), html_entities(ID))),
            ("HTML hex entities", SECRET.chars().map(|c| format!("&#x{:x};", c as u32)).collect()),
            ("short Basic", format!("Authorization: Basic {basic}")),
            ("Basic after =", format!("got auth={basic}")),
            ("Basic of the form-encoded pair", format!("header was Basic:{basic_form}.")),
            ("Basic, URL-safe unpadded", basic.replace('+', "-").replace('/', "_").replace('=', "")),
            ("partial", format!("{}...", &SECRET[..9])),
            ("upper case", SECRET.to_uppercase()),
        ]
    }

    #[test]
    fn echoes_are_redacted_in_every_encoding() {
        for (name, echo) in echoes() {
            // `\u` escapes are spelled out in the JSON; the other echoes are JSON strings.
            let field = if name.starts_with("Go") {
                format!("\"{echo}\"")
            } else {
                serde_json::to_string(&echo).unwrap()
            };
            for body in [
                format!(r#"{{"error":"invalid_client","error_description":{field}}}"#),
                format!(r#"{{"error":{{"message":{field},"code":401}}}}"#),
                format!(r#"{{"message":{field},"code":"bad"}}"#),
            ] {
                let summary = ErrorBody::summarize(body.as_bytes(), &creds());
                for out in [summary.to_string(), format!("{summary:?}")] {
                    assert_eq!(leaks(&out), Vec::<String>::new(), "{name}: {body} -> {out}");
                    assert!(out.contains(REDACTED), "{name}: {out}");
                }
            }
        }
    }

    #[test]
    fn known_fields_are_kept_and_the_rest_is_not() {
        let body = br#"{"error":"invalid_grant","error_description":"Key has been deleted","trace":"do-not-log","code":7}"#;
        let out = ErrorBody::summarize(body, &creds()).to_string();
        assert_eq!(
            out,
            format!(
                r#"{}-byte body: error="invalid_grant", error_description="Key has been deleted", code="7""#,
                body.len()
            )
        );
        let nested = br#"{"error":{"message":"Access denied","code":"PERMISSION_DENIED","details":[1]}}"#;
        let out = ErrorBody::summarize(nested, &creds()).to_string();
        assert!(out.ends_with(r#"error.message="Access denied", error.code="PERMISSION_DENIED""#), "{out}");
    }

    #[test]
    fn bodies_that_are_not_json_objects_are_only_measured() {
        let html = format!("<html>bad secret {SECRET}</html>");
        let array = format!("[\"{SECRET}\"]");
        let unknown = format!("{{\"detail\":\"{SECRET}\"}}");
        for (body, want) in [
            (html.as_str(), "not a JSON object"),
            (array.as_str(), "not a JSON object"),
            (unknown.as_str(), "no known error field"),
        ] {
            let out = ErrorBody::summarize(body.as_bytes(), &creds()).to_string();
            assert_eq!(out, format!("{}-byte body, {want}", body.len()));
        }
        assert_eq!(ErrorBody::summarize(b"", &creds()).to_string(), "empty body");
    }

    #[test]
    fn a_short_basic_echo_is_caught_by_decoding_it() {
        let creds = Credentials { id: Secret::new("k1"), secret: Secret::new("s3cr+t") };
        let basic = base64(b"k1:s3cr+t");
        assert_eq!(basic.len(), 12);
        let body = format!(r#"{{"error":"unauthorized","message":"got Basic {basic}"}}"#);
        let out = ErrorBody::summarize(body.as_bytes(), &creds).to_string();
        assert!(!out.contains(&basic), "{out}");
        assert!(out.ends_with(r#"message="got Basic [redacted]""#), "{out}");
    }

    #[test]
    fn quotes_in_values_cannot_forge_fields() {
        let body = br#"{"error":"x\", code=\"ok\\"}"#;
        let out = ErrorBody::summarize(body, &creds()).to_string();
        assert!(out.ends_with(r#"error="x\", code=\"ok\\""#), "{out}");
    }

    #[test]
    fn token_like_runs_are_redacted_and_values_are_short_and_single_line() {
        let jwt = "eyJhbGciOiJSUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.sig";
        let body = format!(r#"{{"message":"token {jwt} is bad\nline two","code":"{}"}}"#, "x ".repeat(500));
        let out = ErrorBody::summarize(body.as_bytes(), &creds()).to_string();
        assert!(!out.contains("eyJhbGci") && !out.contains('\n'), "{out}");
        assert!(out.contains("token [redacted] is bad line two"), "{out}");
        assert!(out.chars().count() < 2 * VALUE_CHARS + 80, "{out}");
    }

    #[test]
    fn decoding_handles_what_it_meets() {
        assert_eq!(percent_decode("a%2fb%2Fc%zz%4"), "a/b/c%zz%4");
        assert_eq!(html_unescape("&amp;&lt;&#233;&#xE9;&bogus;&"), "&<éé&bogus;&");
        assert_eq!(decode("%2526amp%3B"), "&");
        assert_eq!(base64_decode("Zm9vYmFy").as_deref(), Some(&b"foobar"[..]));
        assert_eq!(base64_decode("Zm9vYg").as_deref(), Some(&b"foob"[..]));
        assert_eq!(base64_decode("not base64!"), None);
        assert_eq!(replace_ignoring_case("a SeCrEt b", "secret", "[x]"), "a [x] b");
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;
    use crate::secret::Secret;

    proptest! {
        #[test]
        fn summaries_are_single_line_bounded_and_secret_free(body in ".{0,600}", secret in "[A-Za-z0-9]{8,20}") {
            let creds = Credentials { id: Secret::new("KEYID-fixed"), secret: Secret::new(secret.clone()) };
            let input = serde_json::json!({"error": format!("{body}{secret}{body}"), "message": body}).to_string();
            let out = ErrorBody::summarize(input.as_bytes(), &creds).to_string();
            prop_assert!(!out.contains(&secret));
            prop_assert!(!out.contains('\n') && !out.contains('\r'));
            // Two fields of at most VALUE_CHARS (+1) characters, each possibly escaped.
            prop_assert!(out.chars().count() <= 6 * VALUE_CHARS, "{}", out);
        }

        #[test]
        fn any_bytes_are_summarized_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let creds = Credentials { id: Secret::new("k"), secret: Secret::new("s") };
            let _ = ErrorBody::summarize(&bytes, &creds).to_string();
        }
    }
}
