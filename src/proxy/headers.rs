//! Header hygiene: hop-by-hop removal (RFC 9110 §7.6.1), and what sidekey owns on each side.

use http::header::{self, HeaderMap, HeaderName};

/// Hop-by-hop headers that never cross a proxy, besides those named in `Connection`.
const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes hop-by-hop headers, including every header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        // SDKs send `Connection: keep-alive` on every request: tokens that name nothing to
        // remove (or a header removed below anyway) cost no allocation. Others are rare.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim)
            .filter(|t| {
                !t.is_empty()
                    && !t.eq_ignore_ascii_case("close")
                    && !HOP_BY_HOP.iter().any(|h| t.eq_ignore_ascii_case(h.as_str()))
            })
            .filter_map(|name| HeaderName::from_bytes(name.as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
    headers.remove(header::UPGRADE);
}

/// Prepares client request headers for upstream: hop-by-hop gone, `Host` left for the client to
/// set from the upstream URI, and the client's credentials dropped: `Authorization` (sidekey
/// injects its own) and `api-key`, which carries a client key or a caller's key pair just as
/// well and must not reach the upstream either.
pub fn prepare_request(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    headers.remove(header::HOST);
    headers.remove(header::AUTHORIZATION);
    headers.remove(API_KEY);
}

/// The other header a client key arrives in (see `resolve::presented_key`).
const API_KEY: HeaderName = HeaderName::from_static("api-key");

/// Prepares upstream response headers for the client; an echoed `Authorization` never leaves.
pub fn prepare_response(headers: &mut HeaderMap) {
    strip_hop_by_hop(headers);
    headers.remove(header::AUTHORIZATION);
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(HeaderName::from_bytes(k.as_bytes()).unwrap(), HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn request_hygiene() {
        let mut h = map(&[
            ("host", "127.0.0.1:8181"),
            ("authorization", "Bearer client-key"),
            ("api-key", "KEYID:SECRET"),
            ("connection", "keep-alive, X-Secret-Hop"),
            ("x-secret-hop", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("transfer-encoding", "chunked"),
            ("proxy-authorization", "Basic x"),
            ("upgrade", "h2c"),
            ("x-stainless-lang", "python"),
            ("openai-organization", "org"),
            ("x-request-id", "abc"),
            ("content-type", "application/json"),
        ]);
        prepare_request(&mut h);
        let mut names: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        names.sort_unstable();
        assert_eq!(names, ["content-type", "openai-organization", "x-request-id", "x-stainless-lang"]);
    }

    #[test]
    fn response_hygiene_strips_echoed_authorization() {
        let mut h = map(&[("authorization", "Bearer t"), ("connection", "close"), ("x-request-id", "1")]);
        prepare_response(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-request-id"));
    }
}
