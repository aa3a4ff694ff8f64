//! Token usage from responses, read off the passing bytes: an incremental SSE scanner for
//! streams, and a bounded side copy for JSON bodies. Nothing is delayed or held back from the
//! client; malformed or unexpected payloads are counted, never fatal.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;
use prometheus::{IntCounter, IntCounterVec};

use std::borrow::Cow;

use bytes::Bytes;
use serde::Deserialize;

/// Longest SSE event (or JSON body) examined; larger ones are skipped and counted as malformed.
pub const MAX_EVENT_BYTES: usize = 256 * 1024;

/// Token counts as the API reports them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub prompt: u64,
    pub completion: u64,
    pub total: u64,
    pub cached: Option<u64>,
    pub reasoning: Option<u64>,
}

/// What a scan found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Scan {
    pub model: Option<String>,
    pub usage: Option<Usage>,
    pub stream: bool,
    /// Events or bodies that could not be read.
    pub malformed: u32,
}

#[derive(Debug)]
enum Mode {
    Sse {
        line: Vec<u8>,
        line_overflow: bool,
        event: Vec<u8>,
        event_overflow: bool,
    },
    /// Whole bodies up to `MAX_EVENT_BYTES`; past that only the last `TAIL_BYTES`, where
    /// `model` and `usage` sit in large responses (batched embeddings).
    Json {
        chunks: Vec<Bytes>,
        size: usize,
        tail: Option<Vec<u8>>,
    },
}

/// Scans one response body.
#[derive(Debug)]
pub struct UsageScanner {
    mode: Mode,
    scan: Scan,
}

impl UsageScanner {
    /// A scanner for a response of this content type, if it is one that can carry usage.
    pub fn for_content_type(content_type: &str) -> Option<Self> {
        let ct = content_type.trim_start().as_bytes();
        let is = |prefix: &str| {
            ct.len() >= prefix.len() && ct[..prefix.len()].eq_ignore_ascii_case(prefix.as_bytes())
        };
        let (mode, stream) = if is("text/event-stream") {
            let mode = Mode::Sse {
                line: Vec::new(),
                line_overflow: false,
                event: Vec::new(),
                event_overflow: false,
            };
            (mode, true)
        } else if is("application/json") {
            (Mode::Json { chunks: Vec::new(), size: 0, tail: None }, false)
        } else {
            return None;
        };
        Some(Self { mode, scan: Scan { stream, ..Scan::default() } })
    }

    /// Looks at the next piece of the body (any split, any size).
    pub fn feed(&mut self, data: &Bytes) {
        match &mut self.mode {
            Mode::Json { chunks, size, tail } => {
                *size += data.len();
                if let Some(tail) = tail {
                    keep_tail(tail, data);
                } else if *size > MAX_EVENT_BYTES {
                    let mut kept = Vec::with_capacity(2 * TAIL_BYTES);
                    for chunk in chunks.drain(..) {
                        keep_tail(&mut kept, &chunk);
                    }
                    keep_tail(&mut kept, data);
                    *tail = Some(kept);
                } else {
                    chunks.push(data.clone());
                }
            }
            Mode::Sse { .. } => {
                let mut rest = &data[..];
                while !rest.is_empty() {
                    let (piece, complete) = match rest.iter().position(|&b| b == b'\n') {
                        Some(i) => (&rest[..i], true),
                        None => (rest, false),
                    };
                    rest = if complete { &rest[piece.len() + 1..] } else { &[] };
                    self.push_line_piece(piece, complete);
                }
            }
        }
    }

    fn push_line_piece(&mut self, piece: &[u8], complete: bool) {
        let Mode::Sse { line, line_overflow, .. } = &mut self.mode else { return };
        if !*line_overflow {
            if line.len() + piece.len() > MAX_EVENT_BYTES {
                *line_overflow = true;
                line.clear();
            } else {
                line.extend_from_slice(piece);
            }
        }
        if complete {
            let overflowed = std::mem::take(line_overflow);
            let text = std::mem::take(line);
            self.on_line(&text, overflowed);
        }
    }

    fn on_line(&mut self, line: &[u8], overflowed: bool) {
        let Mode::Sse { event, event_overflow, .. } = &mut self.mode else { return };
        if overflowed {
            *event_overflow = true;
            return;
        }
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            let data = std::mem::take(event);
            let overflow = std::mem::take(event_overflow);
            self.on_event(&data, overflow);
            return;
        }
        if let Some(payload) = line.strip_prefix(b"data:") {
            let payload = payload.strip_prefix(b" ").unwrap_or(payload);
            if !event.is_empty() {
                event.push(b'\n');
            }
            if event.len() + payload.len() > MAX_EVENT_BYTES {
                *event_overflow = true;
            } else {
                event.extend_from_slice(payload);
            }
        }
    }

    fn on_event(&mut self, data: &[u8], overflow: bool) {
        if overflow {
            self.scan.malformed += 1;
            return;
        }
        if data.is_empty() || data == b"[DONE]" {
            return;
        }
        // Most chunks carry neither a new model nor usage (`"usage":null` until the last one):
        // parse only those that may.
        if self.scan.model.is_some() && !has_usage_object(data) {
            return;
        }
        self.absorb(data);
    }

    /// Reads `model` and `usage` from one JSON document (a body or an SSE event). Typed
    /// parsing skips everything else without allocating for it.
    fn absorb(&mut self, json: &[u8]) {
        let envelope: Envelope<'_> = match serde_json::from_slice(json) {
            Ok(e) => e,
            Err(_) => {
                self.scan.malformed += 1;
                return;
            }
        };
        let inner = envelope.response.unwrap_or_default();
        if self.scan.model.is_none() {
            self.scan.model = envelope.model.or(inner.model).map(|m| m.into_owned());
        }
        if let Some(u) = envelope.usage.or(inner.usage).and_then(UsageFields::into_usage) {
            self.scan.usage = Some(u);
        }
    }

    /// Reads `model` (its first occurrence) and `usage` (its last) from a JSON body by finding
    /// the keys and parsing only their values: the rest of the body (choices, embeddings) is
    /// never parsed. A body without a readable `usage` is counted as malformed.
    fn absorb_keys(&mut self, body: &[u8]) {
        if self.scan.model.is_none() {
            self.scan.model = value_of(body, b"\"model\"", false)
                .and_then(|v| String::deserialize(&mut serde_json::Deserializer::from_slice(v)).ok());
        }
        let usage = value_of(body, b"\"usage\"", true)
            .and_then(|v| UsageFields::deserialize(&mut serde_json::Deserializer::from_slice(v)).ok());
        match usage.and_then(UsageFields::into_usage) {
            Some(u) => self.scan.usage = Some(u),
            None => self.scan.malformed += 1,
        }
    }

    /// Ends the scan (at the end of the body, or when the client went away).
    pub fn finish(mut self) -> Scan {
        match std::mem::replace(&mut self.mode, Mode::Json { chunks: Vec::new(), size: 0, tail: None }) {
            Mode::Json { chunks, tail, .. } => {
                if let Some(tail) = tail {
                    self.absorb_keys(&tail);
                } else if chunks.len() == 1 {
                    self.absorb_keys(&chunks[0]);
                } else if !chunks.is_empty() {
                    self.absorb_keys(&chunks.concat());
                }
            }
            Mode::Sse { line, line_overflow, event, event_overflow } => {
                // A stream that ended without a final newline still counts its last event.
                self.mode = Mode::Sse { line: Vec::new(), line_overflow: false, event, event_overflow };
                if !line.is_empty() || line_overflow {
                    self.on_line(&line, line_overflow);
                }
                self.on_line(b"", false);
            }
        }
        self.scan
    }
}

/// Finds the `model` a JSON request body names while it streams up, without holding the body:
/// each chunk is searched where it lies, and only a short carry from the previous chunk is
/// kept, for a key that spans two chunks. Used for the usage `model` label when the response
/// names none.
#[derive(Debug, Default)]
pub struct ModelSniffer {
    carry: Vec<u8>,
    seen: usize,
    found: Option<String>,
}

/// Request bytes searched for `model` at most.
const SNIFF_BYTES: usize = 256 * 1024;
/// Longest `"model": "<name>"` found across a chunk boundary.
const SNIFF_CARRY: usize = 320;

impl ModelSniffer {
    pub fn new() -> Self {
        Self::default()
    }

    /// True once the model is found or the search is over.
    pub fn done(&self) -> bool {
        self.found.is_some() || self.seen >= SNIFF_BYTES
    }

    /// Looks at the next piece of the request body.
    pub fn feed(&mut self, data: &[u8]) {
        if self.done() {
            return;
        }
        let data = &data[..data.len().min(SNIFF_BYTES - self.seen)];
        self.seen += data.len();
        if !self.carry.is_empty() {
            // Only the boundary region: anything wholly inside `data` is found below.
            let head = &data[..data.len().min(SNIFF_CARRY)];
            self.carry.extend_from_slice(head);
            self.found = string_value(&self.carry, b"\"model\"");
            if self.found.is_some() {
                return;
            }
        }
        self.found = string_value(data, b"\"model\"");
        if self.found.is_some() {
            self.carry = Vec::new();
        } else if data.len() >= SNIFF_CARRY {
            self.carry.clear();
            self.carry.extend_from_slice(&data[data.len() - SNIFF_CARRY..]);
        } else {
            // Short pieces: the carry already ends with all of `data`.
            if self.carry.is_empty() {
                self.carry.extend_from_slice(data);
            }
            let excess = self.carry.len().saturating_sub(SNIFF_CARRY);
            self.carry.drain(..excess);
        }
    }

    /// The model, if one was found.
    pub fn finish(self) -> Option<String> {
        self.found
    }
}

/// The first string value of `key` used as an object key in `hay`.
fn string_value(hay: &[u8], key: &[u8]) -> Option<String> {
    let after = |pos: usize| {
        if pos > 0 && hay[pos - 1] == b'\\' {
            return None;
        }
        let rest = &hay[pos + key.len()..];
        let colon = rest.iter().position(|b| !b.is_ascii_whitespace())?;
        if rest[colon] != b':' {
            return None;
        }
        String::deserialize(&mut serde_json::Deserializer::from_slice(&rest[colon + 1..])).ok()
    };
    memchr::memmem::find_iter(hay, key).find_map(after)
}

/// How much of a large JSON body's end is kept.
const TAIL_BYTES: usize = 64 * 1024;

/// Appends `data`, keeping at most about the last `TAIL_BYTES` (amortised: trims at twice that).
fn keep_tail(tail: &mut Vec<u8>, data: &[u8]) {
    let data = &data[data.len().saturating_sub(TAIL_BYTES)..];
    tail.extend_from_slice(data);
    if tail.len() > 2 * TAIL_BYTES {
        tail.drain(..tail.len() - TAIL_BYTES);
    }
}

/// The bytes after `key:` for an occurrence of `key` used as an object key (first or last).
/// A key inside a string value is escaped (`\"usage\"`), so a match preceded by a backslash is
/// skipped, as is one not followed by a colon.
fn value_of<'a>(hay: &'a [u8], key: &[u8], last: bool) -> Option<&'a [u8]> {
    let after = |pos: usize| {
        if pos > 0 && hay[pos - 1] == b'\\' {
            return None;
        }
        let rest = &hay[pos + key.len()..];
        let colon = rest.iter().position(|b| !b.is_ascii_whitespace())?;
        (rest[colon] == b':').then(|| &rest[colon + 1..])
    };
    if last {
        memchr::memmem::rfind_iter(hay, key).find_map(after)
    } else {
        memchr::memmem::find_iter(hay, key).find_map(after)
    }
}

/// True if `data` has a `"usage"` key whose value is an object (`"usage": {`).
fn has_usage_object(data: &[u8]) -> bool {
    value_of(data, b"\"usage\"", true)
        .and_then(|v| v.iter().find(|b| !b.is_ascii_whitespace()))
        .is_some_and(|&b| b == b'{')
}

#[derive(Deserialize, Default)]
struct Envelope<'a> {
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    usage: Option<UsageFields>,
    /// The Responses API nests both in `response`.
    #[serde(borrow)]
    response: Option<Inner<'a>>,
}

#[derive(Deserialize, Default)]
struct Inner<'a> {
    #[serde(borrow)]
    model: Option<Cow<'a, str>>,
    usage: Option<UsageFields>,
}

/// Chat/completions names (`prompt_tokens`, ...) and Responses API names (`input_tokens`, ...).
#[derive(Deserialize)]
struct UsageFields {
    prompt_tokens: Option<u64>,
    input_tokens: Option<u64>,
    completion_tokens: Option<u64>,
    output_tokens: Option<u64>,
    total_tokens: Option<u64>,
    prompt_tokens_details: Option<Details>,
    input_tokens_details: Option<Details>,
    completion_tokens_details: Option<Details>,
    output_tokens_details: Option<Details>,
}

#[derive(Deserialize)]
struct Details {
    cached_tokens: Option<u64>,
    reasoning_tokens: Option<u64>,
}

impl UsageFields {
    fn into_usage(self) -> Option<Usage> {
        let prompt = self.prompt_tokens.or(self.input_tokens);
        let completion = self.completion_tokens.or(self.output_tokens);
        if prompt.is_none() && completion.is_none() && self.total_tokens.is_none() {
            return None;
        }
        let (prompt, completion) = (prompt.unwrap_or(0), completion.unwrap_or(0));
        let detail = |a: Option<Details>, b: Option<Details>, f: fn(&Details) -> Option<u64>| {
            a.as_ref().and_then(f).or_else(|| b.as_ref().and_then(f))
        };
        Some(Usage {
            prompt,
            completion,
            total: self.total_tokens.unwrap_or(prompt + completion),
            cached: detail(self.prompt_tokens_details, self.input_tokens_details, |d| d.cached_tokens),
            reasoning: detail(self.completion_tokens_details, self.output_tokens_details, |d| {
                d.reasoning_tokens
            }),
        })
    }
}

/// Per-model counter handles, resolved once per model so recording usage does no label
/// hashing: `[stream=false, stream=true]` requests, and one lazily created counter per kind.
#[derive(Debug)]
pub struct ModelCounters {
    label: String,
    requests: [IntCounter; 2],
    tokens: [OnceLock<IntCounter>; KINDS.len()],
}

/// The `kind` label values of `sidekey_llm_tokens_total`.
pub const KINDS: [&str; 5] = ["prompt", "completion", "total", "cached", "reasoning"];

impl ModelCounters {
    fn new(label: String, requests: &IntCounterVec) -> Self {
        let requests = ["false", "true"].map(|stream| requests.with_label_values(&[label.as_str(), stream]));
        Self { label, requests, tokens: Default::default() }
    }

    /// Records one scanned response.
    pub fn record(&self, scan: &Scan, tokens: &IntCounterVec) {
        self.requests[usize::from(scan.stream)].inc();
        let Some(u) = scan.usage else { return };
        let counts = [Some(u.prompt), Some(u.completion), Some(u.total), u.cached, u.reasoning];
        for (i, n) in counts.into_iter().enumerate() {
            if let Some(n) = n {
                self.tokens[i]
                    .get_or_init(|| tokens.with_label_values(&[self.label.as_str(), KINDS[i]]))
                    .inc_by(n);
            }
        }
    }
}

/// Bounds the `model` label: the first `max` distinct models keep their name, later ones are
/// counted as `other`; a response naming no model counts as `unknown`.
///
/// Read on every response by every worker: the map is swapped whole when a model is added
/// (rarely, `max` times at most), so a lookup takes no lock and writes no shared cache line.
#[derive(Debug)]
pub struct ModelLabels {
    max: usize,
    seen: ArcSwap<HashMap<String, Arc<ModelCounters>>>,
    /// Serialises additions (copy, insert, swap).
    adding: Mutex<()>,
    other: OnceLock<Arc<ModelCounters>>,
    unknown: OnceLock<Arc<ModelCounters>>,
}

impl ModelLabels {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            seen: ArcSwap::default(),
            adding: Mutex::default(),
            other: OnceLock::new(),
            unknown: OnceLock::new(),
        }
    }

    /// Records one scanned response under `model`'s counters.
    pub fn record(&self, model: Option<&str>, scan: &Scan, requests: &IntCounterVec, tokens: &IntCounterVec) {
        if let Some(m) = model.filter(|m| !m.is_empty()) {
            if let Some(c) = self.seen.load().get(m) {
                c.record(scan, tokens);
                return;
            }
        }
        self.counters(model, requests).record(scan, tokens);
    }

    /// The counters for `model` (created on first sight, within the bound).
    pub fn counters(&self, model: Option<&str>, requests: &IntCounterVec) -> Arc<ModelCounters> {
        let Some(model) = model.filter(|m| !m.is_empty()) else {
            return Arc::clone(
                self.unknown.get_or_init(|| Arc::new(ModelCounters::new("unknown".into(), requests))),
            );
        };
        {
            let seen = self.seen.load();
            if let Some(c) = seen.get(model) {
                return Arc::clone(c);
            }
            // Past the bound (model names can come from callers): no lock on every response.
            if seen.len() >= self.max {
                return Arc::clone(
                    self.other.get_or_init(|| Arc::new(ModelCounters::new("other".into(), requests))),
                );
            }
        }
        let _adding = self.adding.lock().unwrap_or_else(|e| e.into_inner());
        let seen = self.seen.load_full();
        if let Some(c) = seen.get(model) {
            return Arc::clone(c);
        }
        if seen.len() >= self.max {
            return Arc::clone(
                self.other.get_or_init(|| Arc::new(ModelCounters::new("other".into(), requests))),
            );
        }
        // Label values stay printable and short whatever upstream sends.
        let label: String =
            model.chars().filter(|c| !c.is_control()).take(128).collect::<String>().replace('"', "'");
        let counters = Arc::new(ModelCounters::new(label, requests));
        let mut next = HashMap::clone(&seen);
        next.insert(model.to_string(), Arc::clone(&counters));
        self.seen.store(Arc::new(next));
        counters
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_model_is_found_across_any_split() {
        let body = br#"{"messages":[{"role":"user","content":"say \"model\": \"fake\""}],"tools":[{"parameters":{"properties":{"model":{"type":"string"}}}}],"model":"GigaChat/GigaChat-2-Max","stream":true}"#;
        for split in 1..body.len() {
            let mut s = ModelSniffer::new();
            s.feed(&body[..split]);
            s.feed(&body[split..]);
            assert_eq!(s.finish().as_deref(), Some("GigaChat/GigaChat-2-Max"), "split at {split}");
        }
        let mut bytewise = ModelSniffer::new();
        for b in body.iter() {
            bytewise.feed(std::slice::from_ref(b));
        }
        assert_eq!(bytewise.finish().as_deref(), Some("GigaChat/GigaChat-2-Max"));
        let mut none = ModelSniffer::new();
        none.feed(b"{\"input\":\"x\"}");
        assert!(none.finish().is_none());
    }

    #[test]
    fn request_model_search_is_bounded() {
        let mut s = ModelSniffer::new();
        let filler = vec![b' '; 64 * 1024];
        for _ in 0..5 {
            s.feed(&filler);
        }
        assert!(s.done());
        s.feed(br#""model":"late""#);
        assert!(s.finish().is_none());
    }

    const STREAM: &str = concat!(
        "data: {\"id\":\"c1\",\"model\":\"GigaChat/GigaChat-2-Max\",\"choices\":[{\"delta\":{\"content\":\"Hi\"}}],\"usage\":null}\n\n",
        "data: {\"id\":\"c1\",\"model\":\"GigaChat/GigaChat-2-Max\",\"choices\":[{\"delta\":{},\"finish_reason\":\"stop\"}],\"usage\":null}\n\n",
        ": keep-alive comment\n\n",
        "data: {\"id\":\"c1\",\"model\":\"GigaChat/GigaChat-2-Max\",\"choices\":[],\"usage\":{\"prompt_tokens\":12,\"completion_tokens\":3,\"total_tokens\":15,",
        "\"prompt_tokens_details\":{\"cached_tokens\":4},\"completion_tokens_details\":{\"reasoning_tokens\":1}}}\r\n\r\n",
        "data: [DONE]\n\n",
    );

    fn scan(content_type: &str, pieces: &[&[u8]]) -> Scan {
        let mut s = UsageScanner::for_content_type(content_type).unwrap();
        for p in pieces {
            s.feed(&Bytes::copy_from_slice(p));
        }
        s.finish()
    }

    fn want() -> Usage {
        Usage { prompt: 12, completion: 3, total: 15, cached: Some(4), reasoning: Some(1) }
    }

    #[test]
    fn chat_stream_with_include_usage() {
        let s = scan("text/event-stream; charset=utf-8", &[STREAM.as_bytes()]);
        assert_eq!(s.model.as_deref(), Some("GigaChat/GigaChat-2-Max"));
        assert_eq!(s.usage, Some(want()));
        assert!(s.stream);
        assert_eq!(s.malformed, 0);
    }

    #[test]
    fn byte_by_byte_gives_the_same_result() {
        let pieces: Vec<&[u8]> = STREAM.as_bytes().chunks(1).collect();
        assert_eq!(scan("text/event-stream", &pieces), scan("text/event-stream", &[STREAM.as_bytes()]));
    }

    #[test]
    fn json_body_and_responses_api_shapes() {
        let body = br#"{"id":"x","object":"chat.completion","model":"m1","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":7,"total_tokens":12}}"#;
        let s = scan("application/json", &[&body[..10], &body[10..]]);
        assert_eq!(s.model.as_deref(), Some("m1"));
        assert_eq!(
            s.usage,
            Some(Usage { prompt: 5, completion: 7, total: 12, cached: None, reasoning: None })
        );
        let responses = concat!(
            "event: response.created\ndata: {\"type\":\"response.created\",\"response\":{\"model\":\"m2\",\"usage\":null}}\n\n",
            "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"model\":\"m2\",",
            "\"usage\":{\"input_tokens\":9,\"output_tokens\":2,\"total_tokens\":11,\"input_tokens_details\":{\"cached_tokens\":0},",
            "\"output_tokens_details\":{\"reasoning_tokens\":0}}}}\n\n"
        );
        let s = scan("text/event-stream", &[responses.as_bytes()]);
        assert_eq!(s.model.as_deref(), Some("m2"));
        assert_eq!(
            s.usage,
            Some(Usage { prompt: 9, completion: 2, total: 11, cached: Some(0), reasoning: Some(0) })
        );
        let embeddings =
            br#"{"object":"list","data":[],"model":"emb","usage":{"prompt_tokens":4,"total_tokens":4}}"#;
        let s = scan("application/json", &[embeddings]);
        assert_eq!(
            s.usage,
            Some(Usage { prompt: 4, completion: 0, total: 4, cached: None, reasoning: None })
        );
    }

    #[test]
    fn malformed_payloads_are_counted_not_fatal() {
        let s = scan("text/event-stream", &[b"data: {not json\n\ndata: {\"model\":\"m\"}\n\n"]);
        assert_eq!(s.malformed, 1);
        assert_eq!(s.model.as_deref(), Some("m"));
        assert_eq!(s.usage, None);
        let s = scan("application/json", &[b"<html>"]);
        assert_eq!(s.malformed, 1);
        // a key mentioned inside message text is not the key
        let s = scan("application/json", &[br#"{"model":"m","choices":[{"message":{"content":"the \"model\": \"x\", \"usage\": {}"}}],"usage":{"total_tokens":9}}"#]);
        assert_eq!(s.model.as_deref(), Some("m"));
        assert_eq!(s.usage.map(|u| u.total), Some(9));
        let s = scan("application/json", &[&vec![b'x'; MAX_EVENT_BYTES + 10]]);
        assert_eq!(s.malformed, 1, "a large body without usage");
        let huge = vec![b'x'; MAX_EVENT_BYTES + 10];
        let s = scan(
            "text/event-stream",
            &[b"data: ", &huge, b"\n\ndata: {\"model\":\"m\",\"usage\":{\"total_tokens\":3}}\n\n"],
        );
        assert_eq!(s.malformed, 1);
        assert_eq!(s.usage.map(|u| u.total), Some(3), "recovers after an oversized event");
        assert!(UsageScanner::for_content_type("audio/mpeg").is_none());
    }

    #[test]
    fn large_json_bodies_keep_their_usage() {
        // A batched embeddings response of ~600 KB: data first, model and usage at the end.
        let vector = format!("[{}0.1]", "0.123456,".repeat(3000));
        let data: Vec<String> = (0..20)
            .map(|i| format!(r#"{{"object":"embedding","index":{i},"embedding":{vector}}}"#))
            .collect();
        let body = format!(
            r#"{{"object":"list","data":[{}],"model":"emb-large","usage":{{"prompt_tokens":77,"total_tokens":77}}}}"#,
            data.join(",")
        );
        assert!(body.len() > MAX_EVENT_BYTES);
        let pieces: Vec<&[u8]> = body.as_bytes().chunks(16 * 1024).collect();
        let s = scan("application/json", &pieces);
        assert_eq!(s.model.as_deref(), Some("emb-large"));
        assert_eq!(s.usage.map(|u| (u.prompt, u.total)), Some((77, 77)));
        assert_eq!(s.malformed, 0);
    }

    #[test]
    fn a_last_event_without_a_blank_line_still_counts() {
        let s = scan("text/event-stream", &[b"data: {\"model\":\"m\",\"usage\":{\"total_tokens\":3}}"]);
        assert_eq!(s.usage.map(|u| u.total), Some(3));
    }

    #[test]
    fn the_usage_prefilter_skips_null_usage() {
        assert!(has_usage_object(br#"{"usage": {"total_tokens":1}}"#));
        assert!(has_usage_object(br#"{"usage":{}}"#));
        assert!(!has_usage_object(br#"{"usage":null}"#));
        assert!(!has_usage_object(br#"{"content":"usage"}"#));
        assert!(!has_usage_object(br#"{"content":"say \"usage\": {\"x\":1}"}"#));
    }

    #[test]
    fn model_labels_are_bounded() {
        let requests = IntCounterVec::new(prometheus::Opts::new("r", "r"), &["model", "stream"]).unwrap();
        let labels = ModelLabels::new(2);
        let label = |m: Option<&str>| labels.counters(m, &requests).label.clone();
        assert_eq!(label(Some("a")), "a");
        assert_eq!(label(Some("b")), "b");
        assert_eq!(label(Some("c")), "other");
        assert_eq!(label(Some("a")), "a");
        assert_eq!(label(None), "unknown");
        assert!(Arc::ptr_eq(&labels.counters(Some("a"), &requests), &labels.counters(Some("a"), &requests)));
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Splitting a stream anywhere, into any number of pieces, never changes what is found.
        #[test]
        fn any_chunking_gives_the_same_scan(cuts in proptest::collection::vec(0usize..2000, 0..40), crlf in any::<bool>()) {
            let mut stream = String::new();
            for i in 0..5 {
                stream.push_str(&format!("data: {{\"model\":\"m\",\"choices\":[{{\"delta\":{{\"content\":\"tok{i}\"}}}}]}}\n\n"));
            }
            stream.push_str("data: {\"model\":\"m\",\"choices\":[],\"usage\":{\"prompt_tokens\":3,\"completion_tokens\":5,\"total_tokens\":8}}\n\ndata: [DONE]\n\n");
            if crlf {
                stream = stream.replace('\n', "\r\n");
            }
            let bytes = stream.as_bytes();
            let mut points: Vec<usize> = cuts.into_iter().map(|c| c % (bytes.len() + 1)).collect();
            points.sort_unstable();
            let mut scanner = UsageScanner::for_content_type("text/event-stream").unwrap();
            let mut last = 0;
            for p in points.into_iter().chain([bytes.len()]) {
                scanner.feed(&Bytes::copy_from_slice(&bytes[last..p]));
                last = p;
            }
            let s = scanner.finish();
            prop_assert_eq!(s.usage, Some(Usage { prompt: 3, completion: 5, total: 8, cached: None, reasoning: None }));
            prop_assert_eq!(s.model.as_deref(), Some("m"));
            prop_assert_eq!(s.malformed, 0);
        }

        #[test]
        fn arbitrary_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..2048), split in 0usize..2048) {
            for ct in ["text/event-stream", "application/json"] {
                let mut s = UsageScanner::for_content_type(ct).unwrap();
                let at = split.min(data.len());
                s.feed(&Bytes::copy_from_slice(&data[..at]));
                s.feed(&Bytes::copy_from_slice(&data[at..]));
                let _ = s.finish();
            }
        }
    }
}
