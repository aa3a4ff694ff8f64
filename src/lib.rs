//! sidekey: a local sidecar proxy that keeps short-lived cloud LLM tokens fresh for any
//! OpenAI SDK.
//!
//! Module map:
//! - [`config`]: the serde tree, its sources (file, env) and validation.
//! - [`app`]: wiring and shutdown order; [`server`]: the accept loop; [`signal`]: SIGTERM/SIGINT.
//! - [`proxy`]: the request path (path mapping, header hygiene, streaming bodies, 401 replay,
//!   error mapping).
//! - [`token`]: the token store, IAM client, schedule, failover and refresher.
//! - [`signed`]: signed keys: the `[signed_keys]` config, the JWT verifier, `sidekey mint`.
//! - [`callback`]: the usage callback, one JSON event per finished request POSTed to a backend
//!   in the background (bounded queue, batches, signed, retried, drained on shutdown).
//! - [`ledger`]: token budgets of signed keys, charged to their `jti` (memory or Redis).
//! - [`admin`]: `/healthz`, `/readyz`, `/metrics`; [`metrics`]: the owned registry.
//! - [`dev`]: `sidekey dev`, a self-contained demo with a fake IAM and an echoing upstream.
//!
//! A request: client → [`proxy::Proxy::handle`] → [`token::TokenStore::current`] (lock-free) →
//! upstream with `Authorization: Bearer <token>` → response streamed back. In the background,
//! [`token::refresher::Refresher`] owns every token fetch.

pub mod admin;
pub mod app;
pub mod callback;
pub mod cli;
pub mod client;
pub mod config;
pub mod dev;
pub mod ledger;
pub mod logging;
pub mod metrics;
pub mod proxy;
pub mod secret;
pub mod server;
pub mod signal;
pub mod signed;
pub mod token;

pub use app::App;
pub use config::Config;
