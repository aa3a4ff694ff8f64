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

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, BatchSize, Criterion};
use http::header::{HeaderMap, HeaderName, HeaderValue, AUTHORIZATION};
use sidekey::proxy::headers::prepare_request;
use sidekey::proxy::path::{strip_prefix, Target};
use sidekey::secret::Secret;
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

/// Runs one operation `n` times for DHAT (see the module docs).
fn alloc_probe(spec: &str) {
    let (op, n) = spec.split_once(':').expect("REQUEST_PATH_ALLOC_PROBE=<op>:<n>");
    let n: usize = n.parse().expect("a count");
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
    targets = bench
}

fn main() {
    if let Ok(spec) = std::env::var("REQUEST_PATH_ALLOC_PROBE") {
        alloc_probe(&spec);
        return;
    }
    benches();
    Criterion::default().configure_from_args().final_summary();
}
