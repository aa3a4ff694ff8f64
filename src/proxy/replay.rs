//! What a 401 replay needs of a request's head, kept cheaply.
//!
//! Every replayable request keeps a copy of its method, URI and headers in case upstream answers
//! 401 and the request must be sent again with a fresh token; almost none ever is. Cloning the
//! `HeaderMap` for that costs two allocations for the map plus one per custom header name (the
//! first clone of a name parsed by hyper promotes its buffer to a shared one), eleven on an
//! OpenAI SDK request. [`ReplayHead`] packs the same information into one buffer instead: one
//! allocation and a copy of a few hundred bytes to take, a parse of them to use.

use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, Uri};

/// A request head packed for a possible replay: the URI's bytes, then each header as
/// `name length (u16) | name | value length (u32) | sensitive (u8) | value`.
pub struct ReplayHead {
    method: Method,
    buf: Vec<u8>,
    uri_len: usize,
    headers: usize,
    complete: bool,
}

impl std::fmt::Debug for ReplayHead {
    // The buffer holds header values, credentials among them: never shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayHead").field("method", &self.method).field("headers", &self.headers).finish()
    }
}

impl ReplayHead {
    /// Packs `method`, `uri` and `headers`.
    pub fn capture(method: &Method, uri: &Uri, headers: &HeaderMap) -> Self {
        let uri_size = uri.scheme_str().map_or(0, |s| s.len() + 3)
            + uri.authority().map_or(0, |a| a.as_str().len())
            + uri.path_and_query().map_or(1, |p| p.as_str().len());
        let size =
            uri_size + headers.iter().map(|(n, v)| 7 + n.as_str().len() + v.as_bytes().len()).sum::<usize>();
        let mut buf = Vec::with_capacity(size);
        if let Some(scheme) = uri.scheme_str() {
            buf.extend_from_slice(scheme.as_bytes());
            buf.extend_from_slice(b"://");
        }
        if let Some(authority) = uri.authority() {
            buf.extend_from_slice(authority.as_str().as_bytes());
        }
        buf.extend_from_slice(uri.path_and_query().map_or("/", |p| p.as_str()).as_bytes());
        let uri_len = buf.len();
        let mut complete = true;
        for (name, value) in headers {
            // hyper's limits keep both far below these widths; a longer one makes the request
            // not replayable (rather than replayed without it).
            let (Ok(n), Ok(v)) = (u16::try_from(name.as_str().len()), u32::try_from(value.len())) else {
                complete = false;
                continue;
            };
            buf.extend_from_slice(&n.to_le_bytes());
            buf.extend_from_slice(name.as_str().as_bytes());
            buf.extend_from_slice(&v.to_le_bytes());
            buf.push(u8::from(value.is_sensitive()));
            buf.extend_from_slice(value.as_bytes());
        }
        Self { method: method.clone(), buf, uri_len, headers: headers.len(), complete }
    }

    /// The method, URI and headers as captured; `None` if a header was too long to pack, or if
    /// they no longer parse (a URI over `Uri`'s 64 KiB parse limit: the 401 is passed through).
    pub fn restore(self) -> Option<(Method, Uri, HeaderMap)> {
        if !self.complete {
            return None;
        }
        let uri = Uri::try_from(self.buf.get(..self.uri_len)?).ok()?;
        let mut headers = HeaderMap::with_capacity(self.headers);
        let mut rest = self.buf.get(self.uri_len..)?;
        while !rest.is_empty() {
            let (n, tail) = rest.split_first_chunk::<2>()?;
            let (name, tail) = tail.split_at_checked(usize::from(u16::from_le_bytes(*n)))?;
            let (v, tail) = tail.split_first_chunk::<4>()?;
            let (sensitive, tail) = tail.split_first()?;
            let (value, tail) = tail.split_at_checked(usize::try_from(u32::from_le_bytes(*v)).ok()?)?;
            let mut value = HeaderValue::from_bytes(value).ok()?;
            value.set_sensitive(*sensitive == 1);
            headers.append(HeaderName::from_bytes(name).ok()?, value);
            rest = tail;
        }
        Some((self.method, uri, headers))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sdk_headers() -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("host", "foundation-models.api.cloud.ru"),
            ("accept", "application/json"),
            ("content-type", "application/json"),
            ("x-stainless-lang", "python"),
            ("x-stainless-package-version", "1.54.0"),
            ("x-custom", "one"),
            ("x-custom", "two"),
            ("content-length", "1008"),
        ] {
            h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
        }
        let mut token = HeaderValue::from_static("Bearer secret-token");
        token.set_sensitive(true);
        h.insert(http::header::AUTHORIZATION, token);
        // Bytes outside ASCII are allowed in values (obs-text) and survive.
        h.insert("x-latin", HeaderValue::from_bytes(b"caf\xe9").unwrap());
        h.insert("x-empty", HeaderValue::from_static(""));
        h
    }

    #[test]
    fn a_head_comes_back_as_it_was_taken() {
        let headers = sdk_headers();
        for uri in [
            "https://foundation-models.api.cloud.ru/v1/models/GigaChat%2FGigaChat-2-Max?x=1&y=%2F",
            "http://127.0.0.1:8080/",
            "/v1/chat/completions",
        ] {
            let uri: Uri = uri.parse().unwrap();
            let method = Method::from_bytes(b"PURGE").unwrap();
            let (m, u, h) = ReplayHead::capture(&method, &uri, &headers).restore().unwrap();
            assert_eq!(m, method);
            assert_eq!(u, uri);
            assert_eq!(u.to_string(), uri.to_string());
            assert_eq!(h, headers);
            let order: Vec<_> = h.get_all("x-custom").iter().collect();
            assert_eq!(order, ["one", "two"]);
            assert!(h.get(http::header::AUTHORIZATION).unwrap().is_sensitive());
            assert!(!h.get("x-custom").unwrap().is_sensitive());
        }
    }

    #[test]
    fn an_empty_head_round_trips() {
        let uri = Uri::from_static("/");
        let (m, u, h) = ReplayHead::capture(&Method::GET, &uri, &HeaderMap::new()).restore().unwrap();
        assert_eq!((m, u, h.len()), (Method::GET, uri, 0));
    }

    #[test]
    fn debug_shows_no_header_value() {
        let head = ReplayHead::capture(&Method::POST, &Uri::from_static("/v1"), &sdk_headers());
        let shown = format!("{head:?}");
        assert!(!shown.contains("secret-token") && !shown.contains("python"), "{shown}");
    }

    #[test]
    fn one_allocation_of_the_right_size() {
        let headers = sdk_headers();
        let uri = Uri::from_static("https://example.com/v1/chat/completions?a=b");
        let head = ReplayHead::capture(&Method::POST, &uri, &headers);
        assert_eq!(head.buf.len(), head.buf.capacity(), "the size is computed up front");
    }
}
