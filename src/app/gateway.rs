//! Building the gateway's tables from the config: one token store and refresher per credential
//! set, the route table, the client table, and the caller-pair cache, tied together in the
//! [`Resolver`] the proxy consults once per request.

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use super::AppError;
use crate::client::{self, ClientSettings};
use crate::config::{self, parse_base_url, AuthConfig, Config, ConfigError, Provider, DEFAULT_SET};
use crate::ledger::{Ledger, LedgerSettings};
use crate::metrics::Metrics;
use crate::proxy::inspect::Policy;
use crate::proxy::path::{Target, API_PREFIX};
use crate::proxy::resolve::clients::{Client, ClientTable, KeyIndex};
use crate::proxy::resolve::pairs::{PairCache, PairSettings};
use crate::proxy::resolve::routes::{Route, RouteTable};
use crate::proxy::resolve::{Resolver, SignedGate};
use crate::proxy::Budgets;
use crate::signed::Verifier;
use crate::token::credential::CredentialSource;
use crate::token::iam::{Protocol, TokenClient};
use crate::token::refresher::{RefreshSettings, Refresher};
use crate::token::sets::{TokenSet, TokenSets};
use crate::token::TokenStore;
use prometheus::{IntCounter, IntCounterVec};

/// Everything the gateway runs on.
pub(super) struct Gateway {
    pub sets: TokenSets,
    /// One per set, with the flag that says it is running (liveness).
    pub refreshers: Vec<(Refresher<TokenClient>, Arc<AtomicBool>)>,
    pub resolver: Arc<Resolver>,
    pub clients: Arc<ClientTable>,
    pub pairs: Option<PairCache<TokenClient>>,
    /// The sets `/readyz` waits for: `default` and every route's.
    pub ready_sets: Vec<String>,
    /// Signed keys' verifier (its key files are polled), when `[signed_keys]` is set.
    pub verifier: Option<Verifier>,
    pub budgets: Option<Budgets>,
}

/// The token client of one set.
fn token_client(
    prefix: &str,
    a: &AuthConfig,
    ca_file: Option<&std::path::Path>,
) -> Result<TokenClient, AppError> {
    let iam_settings = ClientSettings {
        ca_file,
        connect_timeout: Duration::from_secs(a.connect_timeout_secs),
        pool_idle_timeout: Duration::from_secs(90),
        pool_max_idle_per_host: 4,
        http2: true,
    };
    let protocol = match a.provider {
        Provider::CloudruIam => Protocol::CloudruIam,
        Provider::Static => Protocol::Static,
        Provider::Oauth2ClientCredentials => Protocol::OAuth2 {
            scope: a.scope.clone(),
            audience: a.audience.clone(),
            client_auth: a.client_auth,
        },
    };
    Ok(TokenClient::new(
        client::build(client::connector(&iam_settings)?, &iam_settings),
        parse_base_url(&format!("{prefix}.token_url"), &a.token_url)?,
        Duration::from_secs(a.timeout_secs),
        protocol,
    ))
}

pub(super) fn build(
    config: &Config,
    metrics: &Metrics,
    signed_results: &IntCounterVec,
) -> Result<Gateway, AppError> {
    let ca_file = config.upstream.ca_file.as_deref();
    let include_stream_usage = config.usage.include_stream_usage;
    let mut sets = Vec::new();
    let mut refreshers = Vec::new();
    for (name, a) in config::sets(config) {
        let prefix = if name == DEFAULT_SET { "auth".to_string() } else { format!("auth.sets.{name}") };
        let store = TokenStore::new();
        let creds = a
            .credentials
            .iter()
            .map(|c| CredentialSource::from_config(c, a.provider, a.world_readable_secret_files))
            .collect();
        let iam = token_client(&prefix, a, ca_file)?;
        let refresher =
            Refresher::new(iam, store.clone(), creds, RefreshSettings::from_config(a), metrics.clone())
                .with_set(name);
        let set = TokenSet::new(name, store);
        // `default` first.
        if name == DEFAULT_SET {
            sets.insert(0, set);
            refreshers.insert(0, (refresher, Arc::new(AtomicBool::new(false))));
        } else {
            sets.push(set);
            refreshers.push((refresher, Arc::new(AtomicBool::new(false))));
        }
    }
    let sets = TokenSets::new(sets);
    let set = |name: &str, key: String| {
        sets.get(name)
            .cloned()
            .ok_or_else(|| ConfigError::Invalid { key, reason: format!("no credential set named {name:?}") })
    };
    let target = |key: &str, url: &str| -> Result<Target, ConfigError> {
        let base = parse_base_url(key, url)?;
        Target::new(&base)
            .ok_or_else(|| ConfigError::Invalid { key: key.into(), reason: "must be an absolute URL".into() })
    };

    let mut routes = Vec::new();
    let mut ready_sets = vec![DEFAULT_SET.to_string()];
    if !config.routes.iter().any(|r| r.prefix == API_PREFIX) {
        routes.push(Route {
            prefix: API_PREFIX.into(),
            target: target("upstream.base_url", &config.upstream.base_url)?,
            set: set(DEFAULT_SET, "auth".into())?,
        });
    }
    for (i, r) in config.routes.iter().enumerate() {
        let name = if r.credentials.is_empty() { DEFAULT_SET } else { r.credentials.as_str() };
        if !ready_sets.iter().any(|s| s == name) {
            ready_sets.push(name.to_string());
        }
        routes.push(Route {
            prefix: r.prefix.clone(),
            target: target(&format!("routes[{i}].base_url"), &r.base_url)?,
            set: set(name, format!("routes[{i}].credentials"))?,
        });
    }

    let global = Arc::new(Policy::new(&config.policy, include_stream_usage));
    let (requests, tokens) = (metrics.client_requests_total.clone(), metrics.client_tokens_total.clone());
    let mut clients = Vec::new();
    for (i, c) in config.clients.iter().enumerate() {
        let policy = match &c.policy {
            Some(p) => Arc::new(Policy::new(p, include_stream_usage)),
            None => Arc::clone(&global),
        };
        let paying =
            c.credentials.as_deref().map(|s| set(s, format!("clients[{i}].credentials"))).transpose()?;
        let max_inflight = c.policy.as_ref().and_then(|p| p.max_inflight);
        clients.push(Arc::new(Client::new(
            &c.name,
            paying,
            policy,
            max_inflight,
            requests.clone(),
            tokens.clone(),
        )));
    }
    let keys = KeyIndex::build(&config.clients)
        .map_err(|reason| ConfigError::Invalid { key: "clients".into(), reason })?;
    let clients = Arc::new(ClientTable::new(clients, keys));
    // Who a caller is while client authentication is off.
    let anonymous =
        Arc::new(Client::new("anonymous", None, Arc::clone(&global), None, requests.clone(), tokens.clone()));

    let cc = &config.caller_credentials;
    let pairs = if cc.enabled {
        let a = config::sets(config).get(cc.provider_of.as_str()).copied().ok_or_else(|| {
            ConfigError::Invalid {
                key: "caller_credentials.provider_of".into(),
                reason: format!("no credential set named {:?}", cc.provider_of),
            }
        })?;
        let settings = PairSettings {
            max_entries: cc.max_entries,
            idle_evict: Duration::from_secs(cc.idle_evict_secs),
            max_fetches_per_sec: cc.max_fetches_per_sec,
            refresh: RefreshSettings::from_config(a),
        };
        let fetcher = token_client("caller_credentials", a, ca_file)?;
        Some(PairCache::new(fetcher, settings, metrics.clone(), tokio::runtime::Handle::current()))
    } else {
        None
    };
    let caller = pairs.clone().map(|cache| {
        let client = Client::new("caller", None, Arc::clone(&global), None, requests.clone(), tokens.clone());
        (cache, Arc::new(client))
    });
    let mut resolver = Resolver::new(RouteTable::new(routes), Arc::clone(&clients), anonymous, caller);
    let (mut verifier, mut budgets) = (None, None);
    if let Some(sk) = &config.signed_keys {
        let v = Verifier::new(sk)
            .map_err(|e| ConfigError::Invalid { key: "signed_keys".into(), reason: e.to_string() })?;
        let gate = SignedGate {
            verifier: v.clone(),
            set: set(&sk.credentials, "signed_keys.credentials".into())?,
            client: Arc::new(Client::new(
                "signed",
                None,
                Arc::clone(&global),
                None,
                requests.clone(),
                tokens.clone(),
            )),
            results: signed_results.clone(),
        };
        resolver = resolver.with_signed_keys(gate);
        let errors = IntCounter::new(crate::ledger::ERRORS_METRIC, crate::ledger::ERRORS_HELP).ok();
        let errors = errors.and_then(|c| metrics.registry().register(Box::new(c.clone())).ok().map(|_| c));
        let settings = LedgerSettings { errors, ..LedgerSettings::default() };
        budgets = Some(Budgets {
            ledger: Ledger::from_url(&sk.budget_store, settings)?,
            fail_open: sk.budget_fail_open,
            results: signed_results.clone(),
            runtime: tokio::runtime::Handle::current(),
        });
        // Every signed request is paid by this set, as every request on a route by the route's.
        if !ready_sets.contains(&sk.credentials) {
            ready_sets.push(sk.credentials.clone());
        }
        verifier = Some(v);
    } else {
        // In the first scrape whether or not signed keys are configured.
        let _ = metrics.registry().register(Box::new(crate::ledger::errors_counter()));
    }
    let resolver = Arc::new(resolver);
    Ok(Gateway { sets, refreshers, resolver, clients, pairs, ready_sets, verifier, budgets })
}
