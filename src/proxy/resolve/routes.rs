//! Routes by client path prefix: the longest prefix that matches at a segment boundary wins.
//! Pure: built once at start-up, looked up per request without allocating.

use crate::proxy::path::{PathError, Target};
use crate::token::sets::TokenSet;

/// Where requests under one prefix go, and whose token they carry unless their caller says
/// otherwise.
#[derive(Debug, Clone)]
pub struct Route {
    pub prefix: String,
    pub target: Target,
    pub set: TokenSet,
}

/// Every route, longest prefix first.
#[derive(Debug, Clone, Default)]
pub struct RouteTable {
    routes: Vec<Route>,
}

impl RouteTable {
    pub fn new(mut routes: Vec<Route>) -> Self {
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Self { routes }
    }

    /// The route for a client's path-and-query, and the rest after its prefix (checked for
    /// traversal), or why there is none.
    pub fn lookup<'a>(&self, path_and_query: &'a str) -> Result<(&Route, &'a str), PathError> {
        for route in &self.routes {
            match crate::proxy::path::strip_route(path_and_query, &route.prefix) {
                Ok(rest) => return Ok((route, rest)),
                Err(PathError::NotFound) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(PathError::NotFound)
    }

    /// The prefixes, for the 404 message.
    pub fn prefixes(&self) -> impl Iterator<Item = &str> {
        self.routes.iter().map(|r| r.prefix.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::token::TokenStore;

    fn route(prefix: &str, base: &str, set: &str) -> Route {
        Route {
            prefix: prefix.into(),
            target: Target::new(&base.parse().unwrap()).unwrap(),
            set: TokenSet::new(set, TokenStore::new()),
        }
    }

    #[test]
    fn longest_prefix_at_a_segment_boundary_wins() {
        let t = RouteTable::new(vec![
            route("/v1", "https://fm.example/v1", "default"),
            route("/ml/v1", "https://ml.example/v1", "default"),
            route("/ml/v1/special", "https://special.example/api", "team-b"),
        ]);
        let cases = [
            ("/v1/chat/completions", "/v1", "/chat/completions"),
            ("/ml/v1/chat/completions?x=1", "/ml/v1", "/chat/completions?x=1"),
            ("/ml/v1/special/models", "/ml/v1/special", "/models"),
            ("/ml/v1/specialist", "/ml/v1", "/specialist"),
            ("/ml/v1", "/ml/v1", ""),
        ];
        for (path, prefix, rest) in cases {
            let (r, got) = t.lookup(path).unwrap();
            assert_eq!((r.prefix.as_str(), got), (prefix, rest), "{path}");
        }
        assert_eq!(t.lookup("/ml/v2/x").unwrap_err(), PathError::NotFound);
        assert_eq!(t.lookup("/v1x").unwrap_err(), PathError::NotFound);
        assert_eq!(t.lookup("/ml/v1/../v1/x").unwrap_err(), PathError::Traversal);
        assert_eq!(t.lookup("/ml/v1/special/%2e%2e/x").unwrap_err(), PathError::Traversal);
    }
}
