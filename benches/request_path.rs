//! Criterion micro-benchmark of sidekey's per-request header work: the URI rewrite
//! (`strip_prefix` + `Target::join`), header hygiene (`prepare_request`) on the header set the
//! OpenAI Python SDK sends, and the token on the request path (`TokenStore::current` + inserting
//! `token.header().clone()` as `Authorization`).
//!
//! `cargo bench --bench request_path` runs the timings (results under `target/criterion/`).
//!
//! Allocation counts: the package forbids `unsafe`, which rules out a counting
//! `#[global_allocator]`, so the count comes from valgrind's DHAT instead. With
//! `REQUEST_PATH_ALLOC_PROBE=<op>:<n>` the binary runs one operation `n` times and exits without
//! criterion; `bench/run.sh` runs it under `valgrind --tool=dhat` for two values of `n` and
//! divides the difference in allocated blocks by the difference in `n`, which cancels the fixed
//! cost of the process. Ops: `parse` (building the header map hyper would hand over),
//! `prepare` (`parse` + `prepare_request`), `token` (`prepare` + `current` + insert), `uri`
//! (`strip_prefix` + `join`), `all` (`parse` + everything); the script subtracts the op each
//! one builds on, so every figure is the work's own.
//!
//! The caller path (group `caller_path`, issue 15: the per-request work of client keys, routes
//! and signed keys). These ops build nothing per call (their tables and request headers are
//! built once, before the loop), so the script subtracts nothing from them:
//! - `client_key_1`, `client_key_100`: `ClientTable::lookup` of a presented key among 1 and 100
//!   configured clients (one key each): a SHA-256 of the key, then a constant-time comparison
//!   with every digest;
//! - `route_5`: `RouteTable::lookup` of `/v1/chat/completions` among 5 routes (the match is the
//!   shortest prefix, so every longer one is tried first);
//! - `signed_verify`: `Verifier::verify` of an HS256 signed key minted by `signed::mint::mint`
//!   (signature, then claims);
//! - `resolve_open`: the whole `Resolver::resolve` decision without client authentication (one
//!   route, the SDK's placeholder key);
//! - `resolve_client`: `Resolver::resolve` with 100 clients, 5 routes and signed keys on, for a
//!   client's key;
//! - `resolve_signed`: the same resolver for a signed key (verification, the `client` lookup,
//!   the `sidekey_signed_keys_total` counter, the claims' `Arc`).

use std::hint::black_box;
use std::time::Duration;

use std::sync::Arc;

use criterion::{criterion_group, BatchSize, Criterion};
use http::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION};
use prometheus::{IntCounterVec, Opts};
use sidekey::config::{digest_of, ClientConfig};
use sidekey::proxy::headers::prepare_request;
use sidekey::proxy::inspect::Policy;
use sidekey::proxy::path::{strip_prefix, Target};
use sidekey::proxy::resolve::clients::{Client, ClientTable, KeyIndex};
use sidekey::proxy::resolve::routes::{Route, RouteTable};
use sidekey::proxy::resolve::{Resolver, SignedGate};
use sidekey::secret::Secret;
use sidekey::signed::mint::{mint, MintArgs};
use sidekey::signed::{SignedKeysConfig, Verifier};
use sidekey::token::sets::TokenSet;
use sidekey::token::{Token, TokenStore};
use tokio::time::Instant;

/// What hyper hands sidekey for an OpenAI Python SDK chat completion (httpx): 15 headers.
const SDK_REQUEST: [(&str, &str); 15] = [
    ("host", "127.0.0.1:8181"),
    ("accept-encoding", "gzip, deflate"),
    ("connection", "keep-alive"),
    ("accept", "application/json"),
    ("content-type", "application/json"),
    ("user-agent", "OpenAI/Python 1.54.0"),
    ("x-stainless-lang", "python"),
    ("x-stainless-package-version", "1.54.0"),
    ("x-stainless-os", "Linux"),
    ("x-stainless-arch", "x64"),
    ("x-stainless-runtime", "CPython"),
    ("x-stainless-runtime-version", "3.12.7"),
    ("authorization", "Bearer sk-placeholder-the-sidecar-replaces-this"),
    ("x-stainless-async", "false"),
    ("content-length", "1008"),
];

const PATH: &str = "/v1/chat/completions";

/// A JWT-sized token, like the IAM's.
fn token_store() -> TokenStore {
    let jwt = format!("eyJhbGciOiJSUzI1NiJ9.{}.{}", "x".repeat(600), "s".repeat(342));
    let token = Token::new(
        &Secret::new(jwt),
        Instant::now() + Duration::from_secs(3600),
        Duration::from_secs(5),
        1,
        "primary".into(),
    )
    .expect("valid header value");
    let store = TokenStore::new();
    store.install(token);
    store
}

/// The request headers as hyper hands them over: a map reserved for the parsed count (hyper's
/// `headers.reserve(n)`), values sharing one buffer (static here, so building the map allocates
/// only the map itself).
fn sdk_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.reserve(SDK_REQUEST.len());
    for (k, v) in SDK_REQUEST {
        h.append(HeaderName::from_static(k), HeaderValue::from_static(v));
    }
    h
}

/// The map `prepare_request` leaves, with hyper's capacity (a clone would shrink it to fit and
/// make the token insert reallocate, which the proxy never does).
fn prepared_headers() -> HeaderMap {
    let mut h = sdk_headers();
    prepare_request(&mut h);
    h
}

fn target() -> Target {
    Target::new(&"http://127.0.0.1:8080/v1".parse().expect("valid uri")).expect("absolute")
}

fn rewrite(target: &Target, path: &str) -> http::Uri {
    let rest = strip_prefix(path).expect("under /v1");
    target.join(rest).expect("valid uri")
}

fn inject(store: &TokenStore, now: Instant, headers: &mut HeaderMap) {
    let token = store.current(now).expect("token installed");
    headers.insert(AUTHORIZATION, token.header().clone());
}

fn bench(c: &mut Criterion) {
    let target = target();
    let store = token_store();
    let now = Instant::now();
    // Warm the token's header bytes: the first clone of a freshly built `Bytes` may allocate
    // its shared header once per token (once per refresh), never per request.
    inject(&store, now, &mut prepared_headers());

    let mut g = c.benchmark_group("request_path");
    g.bench_function("uri_rewrite", |b| b.iter(|| rewrite(&target, black_box(PATH))));
    g.bench_function("prepare_request", |b| {
        b.iter_batched_ref(sdk_headers, |h| prepare_request(black_box(h)), BatchSize::SmallInput)
    });
    g.bench_function("token_inject", |b| {
        b.iter_batched_ref(prepared_headers, |h| inject(&store, now, black_box(h)), BatchSize::SmallInput)
    });
    g.bench_function("all", |b| {
        b.iter_batched_ref(
            sdk_headers,
            |h| {
                let uri = rewrite(&target, black_box(PATH));
                prepare_request(h);
                inject(&store, now, h);
                uri
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

// ---------------------------------------------------------------------------------------------
// The caller path: client keys, routes, signed keys, the resolver.

/// Client `i`'s key: 51 characters, like an OpenAI-style key.
fn client_key(i: usize) -> String {
    format!("sk-bench-client-{i:04}-{}", "k".repeat(30))
}

fn hex(d: [u8; 32]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn counters(name: &str, labels: &[&str]) -> IntCounterVec {
    IntCounterVec::new(Opts::new(name, "bench"), labels).expect("valid metric")
}

fn client(name: &str) -> Arc<Client> {
    Arc::new(Client::new(
        name,
        None,
        Arc::new(Policy::default()),
        None,
        counters("sidekey_client_requests_total", &["client", "status"]),
        counters("sidekey_client_tokens_total", &["client", "kind"]),
    ))
}

/// `n` configured clients with one key each (`key_sha256`, as a config would hold them).
fn client_table(n: usize) -> Arc<ClientTable> {
    let configs: Vec<ClientConfig> = (0..n)
        .map(|i| ClientConfig {
            name: format!("client-{i}"),
            key_sha256: vec![Secret::new(hex(digest_of(&client_key(i))))],
            ..Default::default()
        })
        .collect();
    let keys = KeyIndex::build(&configs).expect("distinct keys");
    Arc::new(ClientTable::new(configs.iter().map(|c| client(&c.name)).collect(), keys))
}

fn route(prefix: &str, base: &str) -> Route {
    Route {
        prefix: prefix.into(),
        target: Target::new(&base.parse().expect("valid uri")).expect("absolute"),
        set: TokenSet::new("default", token_store()),
    }
}

/// Five routes; `/v1` (the one the SDK's path matches) is the shortest, so it is tried last.
fn routes(n: usize) -> RouteTable {
    let all = [
        ("/v1", "http://127.0.0.1:8080/v1"),
        ("/ml/v1", "https://ml.example/v1"),
        ("/ml/v1/special", "https://special.example/api"),
        ("/azure/openai/v1", "https://azure.example/openai/v1"),
        ("/team-b/v1", "https://team-b.example/v1"),
    ];
    RouteTable::new(all[..n].iter().map(|(p, b)| route(p, b)).collect())
}

fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// An HS256 verifier (default rules) and a key minted for it with `sidekey mint`'s function:
/// a model scope, `max_tokens`, a subject, the default 10-minute TTL.
fn signed_fixture() -> (Verifier, String) {
    let dir = std::env::temp_dir().join(format!("sidekey-bench-signed-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let path = dir.join("signing-key");
    std::fs::write(&path, "bench-signing-secret-0123456789abcdef0123456789\n").expect("key file");
    let verifier =
        Verifier::new(&SignedKeysConfig { hs256_secret_file: Some(path.clone()), ..Default::default() })
            .expect("valid key file");
    let mut args = MintArgs::new(&path);
    args.models = vec!["gpt-4o-mini".into()];
    args.max_tokens = Some(1024);
    args.sub = Some("user-1234".into());
    let key = mint(&args, unix_now()).expect("minted");
    let _ = std::fs::remove_dir_all(&dir);
    (verifier, key)
}

/// 100 clients, 5 routes and signed keys on.
fn full_resolver() -> (Resolver, String) {
    let (verifier, key) = signed_fixture();
    let gate = SignedGate {
        verifier,
        set: TokenSet::new("signed", token_store()),
        client: client("signed"),
        results: counters("sidekey_signed_keys_total", &["result"]),
    };
    (Resolver::new(routes(5), client_table(100), client("anonymous"), None).with_signed_keys(gate), key)
}

/// No client authentication: one route, anyone.
fn open_resolver() -> Resolver {
    Resolver::new(routes(1), client_table(0), client("anonymous"), None)
}

fn bearer(key: &str) -> HeaderMap {
    let mut h = sdk_headers();
    h.insert(AUTHORIZATION, HeaderValue::from_str(&format!("Bearer {key}")).expect("valid header"));
    h
}

/// Everything the caller-path ops need, built once.
struct CallerFixture {
    clients_1: Arc<ClientTable>,
    clients_100: Arc<ClientTable>,
    key_1: String,
    key_100: String,
    routes_5: RouteTable,
    verifier: Verifier,
    signed_key: String,
    now: u64,
    open: Resolver,
    open_headers: HeaderMap,
    full: Resolver,
    client_headers: HeaderMap,
    signed_headers: HeaderMap,
}

impl CallerFixture {
    fn new() -> Self {
        let (verifier, signed_key) = signed_fixture();
        let (full, full_key) = full_resolver();
        let f = Self {
            clients_1: client_table(1),
            clients_100: client_table(100),
            key_1: client_key(0),
            key_100: client_key(99),
            routes_5: routes(5),
            verifier,
            signed_key,
            now: unix_now(),
            open: open_resolver(),
            open_headers: sdk_headers(),
            full,
            client_headers: bearer(&client_key(99)),
            signed_headers: bearer(&full_key),
        };
        // Every op succeeds as intended (and the counters' children exist before timing).
        assert!(f.client_key_1() && f.client_key_100());
        assert_eq!(f.route_5(), "/chat/completions");
        assert!(f.signed_verify());
        assert_eq!(&*f.resolve_open(), "anonymous");
        assert_eq!(&*f.resolve_client(), "client-99");
        assert_eq!(&*f.resolve_signed(), "signed");
        f
    }

    fn client_key_1(&self) -> bool {
        self.clients_1.lookup(black_box(&self.key_1)).is_some()
    }

    fn client_key_100(&self) -> bool {
        self.clients_100.lookup(black_box(&self.key_100)).is_some()
    }

    fn route_5(&self) -> &str {
        self.routes_5.lookup(black_box(PATH)).expect("routed").1
    }

    fn signed_verify(&self) -> bool {
        self.verifier.verify(black_box(&self.signed_key), self.now).is_ok()
    }

    fn resolve_open(&self) -> Arc<str> {
        let r = self.open.resolve(black_box(PATH), black_box(&self.open_headers)).expect("resolved");
        Arc::clone(&r.client.name)
    }

    fn resolve_client(&self) -> Arc<str> {
        let r = self.full.resolve(black_box(PATH), black_box(&self.client_headers)).expect("resolved");
        Arc::clone(&r.client.name)
    }

    fn resolve_signed(&self) -> Arc<str> {
        let r = self.full.resolve(black_box(PATH), black_box(&self.signed_headers)).expect("resolved");
        Arc::clone(&r.client.name)
    }

    /// Runs one op by its probe name; false if there is no such op.
    fn run(&self, op: &str) -> bool {
        match op {
            "client_key_1" => drop(black_box(self.client_key_1())),
            "client_key_100" => drop(black_box(self.client_key_100())),
            "route_5" => drop(black_box(self.route_5())),
            "signed_verify" => drop(black_box(self.signed_verify())),
            "resolve_open" => drop(black_box(self.resolve_open())),
            "resolve_client" => drop(black_box(self.resolve_client())),
            "resolve_signed" => drop(black_box(self.resolve_signed())),
            _ => return false,
        }
        true
    }
}

fn bench_caller(c: &mut Criterion) {
    let f = CallerFixture::new();
    let mut g = c.benchmark_group("caller_path");
    g.bench_function("client_key_1", |b| b.iter(|| f.client_key_1()));
    g.bench_function("client_key_100", |b| b.iter(|| f.client_key_100()));
    g.bench_function("route_5", |b| b.iter(|| f.route_5().len()));
    g.bench_function("signed_verify", |b| b.iter(|| f.signed_verify()));
    g.bench_function("resolve_open", |b| b.iter(|| f.resolve_open()));
    g.bench_function("resolve_client", |b| b.iter(|| f.resolve_client()));
    g.bench_function("resolve_signed", |b| b.iter(|| f.resolve_signed()));
    g.finish();
}

/// Runs one operation `n` times for DHAT (see the module docs).
fn alloc_probe(spec: &str) {
    let (op, n) = spec.split_once(':').expect("REQUEST_PATH_ALLOC_PROBE=<op>:<n>");
    let n: usize = n.parse().expect("a count");
    if op.starts_with("client_")
        || op.starts_with("route_")
        || op.starts_with("signed_")
        || op.starts_with("resolve_")
    {
        let f = CallerFixture::new();
        for _ in 0..n {
            assert!(f.run(op), "unknown op {op}");
        }
        return;
    }
    let target = target();
    let store = token_store();
    let now = Instant::now();
    inject(&store, now, &mut prepared_headers());
    for _ in 0..n {
        match op {
            "parse" => drop(black_box(sdk_headers())),
            "prepare" => drop(black_box(prepared_headers())),
            "token" => {
                let mut h = prepared_headers();
                inject(&store, now, black_box(&mut h));
                drop(black_box(h));
            }
            "uri" => drop(black_box(rewrite(&target, black_box(PATH)))),
            "all" => {
                let mut h = sdk_headers();
                let uri = rewrite(&target, black_box(PATH));
                prepare_request(&mut h);
                inject(&store, now, &mut h);
                drop(black_box((uri, h)));
            }
            other => panic!("unknown op {other}"),
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(50);
    targets = bench, bench_caller
}

fn main() {
    if let Ok(spec) = std::env::var("REQUEST_PATH_ALLOC_PROBE") {
        alloc_probe(&spec);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
