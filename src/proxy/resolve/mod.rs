//! The one place that decides, per request, who the caller is and who pays.
//!
//! route (longest path prefix) → caller (a signed key, a configured client's key, a
//! caller-supplied key pair, or anyone when client authentication is off) → payer (the pair >
//! the client's set > the signed keys' set > the route's set) → policy (the client's, else the
//! global one, narrowed by a signed key's scope). Everything after this reads
//! the [`Resolved`] value; nothing decides again. The tables are built at start-up; only the
//! client key index is swapped when a key file changes.
//!
//! - [`routes`]: the prefix table; [`clients`]: client identity and per-client limits;
//!   [`pairs`]: the caller-supplied credential cache.

pub mod clients;
pub mod pairs;
pub mod routes;

use std::sync::Arc;

use http::header::AUTHORIZATION;
use http::HeaderMap;
use prometheus::IntCounterVec;

use self::clients::{Client, ClientTable};
use self::pairs::{PairCache, PairEntry};
use self::routes::{Route, RouteTable};
use super::path::PathError;
use crate::signed::{looks_like_jwt, SignedKey, SignedKeyError, Verifier};
use crate::token::iam::TokenClient;
use crate::token::sets::TokenSet;
use crate::token::TokenStore;

/// Who pays for a request.
#[derive(Debug, Clone)]
pub enum Payer {
    /// A configured credential set.
    Set(TokenSet),
    /// A caller-supplied key pair.
    Pair(Arc<PairEntry>),
}

impl Payer {
    pub fn store(&self) -> &TokenStore {
        match self {
            Payer::Set(set) => set.store(),
            Payer::Pair(pair) => &pair.store,
        }
    }

    /// The `set` label and log field: the set's name, or `caller` for a pair.
    pub fn name(&self) -> &str {
        match self {
            Payer::Set(set) => set.name(),
            Payer::Pair(_) => "caller",
        }
    }
}

/// The decision for one request.
#[derive(Debug)]
pub struct Resolved<'a> {
    pub route: &'a Route,
    /// The client's path-and-query after the route's prefix.
    pub rest: &'a str,
    pub client: Arc<Client>,
    pub payer: Payer,
    /// The verified claims, when the caller used a signed key.
    pub signed: Option<Arc<SignedKey>>,
}

/// Signed keys: the verifier, the set that pays, and who such callers count as.
#[derive(Debug)]
pub struct SignedGate {
    pub verifier: Verifier,
    pub set: TokenSet,
    /// The client signed-key callers count as when their key names no `client`.
    pub client: Arc<Client>,
    /// `sidekey_signed_keys_total{result}`.
    pub results: IntCounterVec,
}

/// Why a request has no caller or no route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallerError {
    /// No route matches the path.
    NotFound,
    /// A dot segment, literal or encoded.
    Traversal,
    /// Client authentication is on and the request carries no key.
    MissingKey,
    /// The key is no client's (nor a caller pair, when those are on).
    UnknownKey,
    /// A signed key that does not verify.
    Signed(SignedKeyError),
    /// A signed key whose `client` claim names no configured client.
    UnknownClient,
}

impl From<PathError> for CallerError {
    fn from(e: PathError) -> Self {
        match e {
            PathError::NotFound => CallerError::NotFound,
            PathError::Traversal => CallerError::Traversal,
        }
    }
}

/// The tables a request is resolved against.
#[derive(Debug)]
pub struct Resolver {
    routes: RouteTable,
    clients: Arc<ClientTable>,
    /// Who a caller is when client authentication is off.
    anonymous: Arc<Client>,
    /// Caller-supplied credentials, when enabled, and the client they count as.
    pairs: Option<(PairCache<TokenClient>, Arc<Client>)>,
    signed: Option<SignedGate>,
}

impl Resolver {
    pub fn new(
        routes: RouteTable,
        clients: Arc<ClientTable>,
        anonymous: Arc<Client>,
        pairs: Option<(PairCache<TokenClient>, Arc<Client>)>,
    ) -> Self {
        Self { routes, clients, anonymous, pairs, signed: None }
    }

    /// Accepts signed keys.
    pub fn with_signed_keys(mut self, gate: SignedGate) -> Self {
        self.signed = Some(gate);
        self
    }

    /// The signed-key gate, when configured.
    pub fn signed(&self) -> Option<&SignedGate> {
        self.signed.as_ref()
    }

    pub fn routes(&self) -> &RouteTable {
        &self.routes
    }

    pub fn pairs(&self) -> Option<&PairCache<TokenClient>> {
        self.pairs.as_ref().map(|(cache, _)| cache)
    }

    /// Decides route, caller and payer for a request.
    pub fn resolve<'a>(
        &'a self,
        path_and_query: &'a str,
        headers: &HeaderMap,
    ) -> Result<Resolved<'a>, CallerError> {
        let (route, rest) = self.routes.lookup(path_and_query)?;
        let key = presented_key(headers);
        if let (Some(key), Some(gate)) = (key, &self.signed) {
            if looks_like_jwt(key) {
                return self.resolve_signed(gate, key, route, rest);
            }
        }
        if let Some(client) = key.and_then(|k| self.clients.lookup(k)) {
            let payer = Payer::Set(client.set.clone().unwrap_or_else(|| route.set.clone()));
            return Ok(Resolved { route, rest, client: Arc::clone(client), payer, signed: None });
        }
        if let (Some(key), Some((cache, caller))) = (key, &self.pairs) {
            if let Some(pair) = cache.get(key) {
                let client = Arc::clone(caller);
                return Ok(Resolved { route, rest, client, payer: Payer::Pair(pair), signed: None });
            }
        }
        // Anyone is trusted only while no caller authentication is configured at all: with
        // signed keys on, a request without one is refused like one without a client key.
        if self.clients.is_empty() && self.signed.is_none() {
            let client = Arc::clone(&self.anonymous);
            return Ok(Resolved { route, rest, client, payer: Payer::Set(route.set.clone()), signed: None });
        }
        Err(if key.is_some() { CallerError::UnknownKey } else { CallerError::MissingKey })
    }
}

impl Resolver {
    /// A signed key: verified against the current keys (never forwarded, never logged); its
    /// `client` claim picks a configured client's policy and set, else it counts as `signed`
    /// and the signed keys' set pays.
    fn resolve_signed<'a>(
        &'a self,
        gate: &SignedGate,
        key: &str,
        route: &'a Route,
        rest: &'a str,
    ) -> Result<Resolved<'a>, CallerError> {
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
        let claims = match gate.verifier.verify(key, now) {
            Ok(claims) => claims,
            Err(e) => {
                gate.results.with_label_values(&[e.reason()]).inc();
                return Err(CallerError::Signed(e));
            }
        };
        let client = match claims.client() {
            Some(name) => match self.clients.by_name(name) {
                Some(client) => Arc::clone(client),
                None => {
                    gate.results.with_label_values(&["malformed"]).inc();
                    return Err(CallerError::UnknownClient);
                }
            },
            None => Arc::clone(&gate.client),
        };
        gate.results.with_label_values(&["accepted"]).inc();
        let payer = Payer::Set(client.set.clone().unwrap_or_else(|| gate.set.clone()));
        Ok(Resolved { route, rest, client, payer, signed: Some(Arc::new(claims)) })
    }
}

/// The API key a request carries: `Authorization: Bearer <key>`, else `api-key: <key>`.
pub fn presented_key(headers: &HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if v.len() > 7 && v[..7].eq_ignore_ascii_case("bearer ") {
            let key = v[7..].trim();
            if !key.is_empty() {
                return Some(key);
            }
        }
    }
    headers.get("api-key").and_then(|v| v.to_str().ok()).map(str::trim).filter(|k| !k.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_come_from_bearer_or_api_key() {
        let mut h = HeaderMap::new();
        assert_eq!(presented_key(&h), None);
        h.insert("api-key", "sk-b".parse().unwrap());
        assert_eq!(presented_key(&h), Some("sk-b"));
        h.insert(AUTHORIZATION, "Bearer  sk-a ".parse().unwrap());
        assert_eq!(presented_key(&h), Some("sk-a"));
        h.insert(AUTHORIZATION, "bearer sk-c".parse().unwrap());
        assert_eq!(presented_key(&h), Some("sk-c"));
        h.insert(AUTHORIZATION, "Basic abc".parse().unwrap());
        assert_eq!(presented_key(&h), Some("sk-b"), "not a bearer key: api-key is used");
    }
}
