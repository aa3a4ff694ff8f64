//! Wiring: listeners, shared handles, background tasks, and the shutdown order
//! (signal → not ready → optional delay → stop accepting → drain with a deadline → stop
//! background tasks → exit). [`gateway`] builds the credential sets, routes and clients.

mod gateway;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::runtime::Handle;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::admin::{Admin, Lifecycle};
use crate::client::{self, ClientError, ClientSettings, Connector};
use crate::config::{self, Config, ConfigError};
use crate::metrics::Metrics;
use crate::proxy::budget::ByteBudget;
use crate::proxy::resolve::clients::ClientTable;
use crate::proxy::resolve::pairs::PairCache;
use crate::proxy::{Proxy, ProxySettings};
use crate::server::{serve, serve_on, ServeSettings};
use crate::token::iam::TokenClient;
use crate::token::refresher::Refresher;
use crate::token::sets::TokenSets;
use crate::token::TokenStore;

/// Starting sidekey failed.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot listen on {addr} ({key})")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot set up the outbound HTTPS client")]
    Client(#[from] ClientError),
}

/// A bound, ready-to-run sidekey.
#[derive(Debug)]
pub struct App {
    config: Config,
    /// Detached from any reactor: each proxy worker registers its own handle of it.
    proxy_listener: std::net::TcpListener,
    /// Proxy worker threads (`server.worker_threads`).
    workers: usize,
    admin_listener: TcpListener,
    proxy_settings: ProxySettings,
    /// Cloned per worker: each worker keeps its own pool of upstream connections.
    upstream_connector: Connector,
    admin: Admin,
    metrics: Metrics,
    sets: TokenSets,
    lifecycle: Arc<Lifecycle>,
    quit: CancellationToken,
    refreshers: Vec<(Refresher<TokenClient>, Arc<std::sync::atomic::AtomicBool>)>,
    verifier: Option<crate::signed::Verifier>,
    delivery: Option<crate::callback::Delivery>,
    clients: Arc<ClientTable>,
    pairs: Option<PairCache<TokenClient>>,
}

impl App {
    /// Binds both listeners and builds every shared handle. `config` must be validated.
    pub async fn bind(config: Config) -> Result<App, AppError> {
        let workers = config
            .server
            .worker_threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
        let proxy_listener = bind("server.listen", config.server.listen)
            .await?
            .into_std()
            .map_err(|source| AppError::Bind { key: "server.listen", addr: config.server.listen, source })?;
        let admin_listener = bind("server.admin_listen", config.server.admin_listen).await?;

        let set_names: Vec<(&str, Vec<String>)> = config::sets(&config)
            .into_iter()
            .map(|(name, a)| (name, a.credentials.iter().map(|c| c.name.clone()).collect()))
            .collect();
        let metrics = Metrics::with_sets(&set_names, config.metrics.max_models);
        // In the first scrape whether or not `[usage.callback]` is set (the README table is checked
        // against a fresh sidekey); wiring the queue into the request path is still to come.
        let callback_metrics = crate::callback::CallbackMetrics::register(metrics.registry());
        let signed_results = prometheus::IntCounterVec::new(
            prometheus::Opts::new("sidekey_signed_keys_total", "Requests with a signed key, by result."),
            &["result"],
        )
        .expect("valid metric");
        let _ = metrics.registry().register(Box::new(signed_results.clone()));
        for result in crate::signed::RESULTS {
            signed_results.with_label_values(&[result]);
        }
        let gw = gateway::build(&config, &metrics, &signed_results)?;
        let lifecycle =
            Arc::new(Lifecycle::new(gw.refreshers.iter().map(|(_, alive)| Arc::clone(alive)).collect()));
        let quit = CancellationToken::new();

        let u = &config.upstream;
        let upstream_settings = ClientSettings {
            ca_file: u.ca_file.as_deref(),
            connect_timeout: Duration::from_secs(u.connect_timeout_secs),
            pool_idle_timeout: Duration::from_secs(u.pool_idle_timeout_secs),
            pool_max_idle_per_host: u.pool_max_idle_per_host,
            http2: u.http2,
        };
        let upstream_connector = client::connector(&upstream_settings)?;
        let callback = match &config.usage.callback {
            Some(cb) => Some(crate::callback::channel(cb, upstream_connector.clone(), callback_metrics)?),
            None => None,
        };
        let (dispatcher, delivery) = match callback {
            Some((d, delivery)) => (Some(d), Some(delivery)),
            None => (None, None),
        };
        let proxy_settings = ProxySettings {
            resolver: Arc::clone(&gw.resolver),
            listen: proxy_listener
                .local_addr()
                .map_err(|source| AppError::Bind {
                    key: "server.listen",
                    addr: config.server.listen,
                    source,
                })?
                .to_string(),
            max_body: config.server.max_request_body_bytes,
            replay_capacity: config.server.replay_buffer_bytes,
            body_read_timeout: Duration::from_secs(config.server.body_read_timeout_secs),
            buffer: ByteBudget::new(
                config.server.max_buffered_bytes,
                Some(metrics.buffered_request_bytes.clone()),
            ),
            idle_timeout: Duration::from_secs(u.idle_timeout_secs),
            request_timeout: u.request_timeout_secs.map(Duration::from_secs),
            forced_refresh_wait: Duration::from_secs(config.auth.forced_refresh_timeout_secs),
            access_log: config.log.access,
            max_inflight: config.server.max_inflight,
            inflight_slots: config.server.max_inflight.map(|n| Arc::new(Semaphore::new(n))),
            queue_timeout: Duration::from_millis(config.server.queue_timeout_ms),
            usage_scan: config.usage.scan,
            budgets: gw.budgets.clone(),
            callback: dispatcher,
            loopback_only: config.server.listen.ip().is_loopback(),
            allowed_hosts: config.server.allowed_hosts.clone(),
            allowed_origins: config.server.allowed_origins.clone(),
        };

        let admin = Admin::new(
            metrics.clone(),
            gw.sets.clone(),
            gw.ready_sets.clone(),
            Arc::clone(&lifecycle),
            config.server.enable_quit_endpoint.then(|| quit.clone()),
        )
        .with_browser_rules(config.server.allowed_origins.clone(), config.server.allowed_hosts.clone());
        Ok(App {
            config,
            proxy_listener,
            workers: workers.max(1),
            admin_listener,
            proxy_settings,
            upstream_connector,
            admin,
            metrics,
            sets: gw.sets,
            lifecycle,
            quit,
            refreshers: gw.refreshers,
            clients: gw.clients,
            pairs: gw.pairs,
            verifier: gw.verifier,
            delivery,
        })
    }

    /// The proxy's bound address (useful with port 0).
    pub fn proxy_addr(&self) -> SocketAddr {
        self.proxy_listener.local_addr().expect("bound listener has an address")
    }

    /// The admin listener's bound address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin_listener.local_addr().expect("bound listener has an address")
    }

    /// Cancelling this token shuts sidekey down gracefully (it is also what `/quitquitquit`
    /// cancels). Hand it to [`crate::signal::watch`].
    pub fn shutdown_token(&self) -> CancellationToken {
        self.quit.clone()
    }

    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The default set's token store.
    pub fn tokens(&self) -> &TokenStore {
        self.sets.default_set().map(|s| s.store()).expect("the default set exists")
    }

    /// Every credential set.
    pub fn sets(&self) -> &TokenSets {
        &self.sets
    }

    /// Serves until `shutdown` resolves (or `/quitquitquit`), then shuts down in order.
    pub async fn run(self, shutdown: impl Future<Output = ()>) {
        let App {
            config,
            proxy_listener,
            workers,
            admin_listener,
            proxy_settings,
            upstream_connector,
            admin,
            metrics,
            sets,
            lifecycle,
            quit,
            refreshers,
            clients,
            pairs,
            verifier,
            delivery,
        } = self;
        let s = &config.server;
        let proxy_addr = proxy_listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string());
        let admin_addr = admin_listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string());
        let names: Vec<&str> = config.auth.credentials.iter().map(|c| c.name.as_str()).collect();
        tracing::info!(
            version = env!("CARGO_PKG_VERSION"),
            listen = %proxy_addr,
            admin_listen = %admin_addr,
            workers,
            upstream = %config.upstream.base_url,
            provider = config.auth.provider.as_str(),
            token_url = %config.auth.token_url,
            credentials = ?names,
            sets = ?sets.iter().map(|s| s.name()).collect::<Vec<_>>(),
            routes = ?proxy_settings.resolver.routes().prefixes().collect::<Vec<_>>(),
            clients = ?config.clients.iter().map(|c| c.name.as_str()).collect::<Vec<_>>(),
            caller_credentials = config.caller_credentials.enabled,
            "sidekey started"
        );

        let background = CancellationToken::new();
        let mut background_tasks = Vec::new();
        for (refresher, alive) in refreshers {
            background_tasks.push(tokio::spawn(refresher.run(background.clone(), alive)));
        }
        let poll = Duration::from_secs(config.auth.credential_poll_secs.max(1));
        background_tasks.push(tokio::spawn(Arc::clone(&clients).watch(
            config.clients.clone(),
            poll,
            background.clone(),
        )));
        if let Some(pairs) = pairs {
            background_tasks.push(tokio::spawn(pairs.run(background.clone())));
        }
        if let Some(verifier) = verifier {
            background_tasks.push(tokio::spawn(verifier.run(background.clone())));
        }
        // The usage callback drains after the proxy: the last requests' events are queued by then.
        let callback_stop = CancellationToken::new();
        let callback_task = delivery
            .map(|d| tokio::spawn(d.run(callback_stop.clone(), Duration::from_secs(s.shutdown_grace_secs))));

        let listener_settings = |name, max_connections, grace| ServeSettings {
            name,
            max_connections,
            header_read_timeout: Duration::from_secs(s.header_read_timeout_secs),
            idle_timeout: Duration::from_secs(s.connection_idle_timeout_secs),
            max_headers: s.max_headers,
            max_header_bytes: s.max_header_bytes,
            grace,
        };
        let admin_stop = CancellationToken::new();
        let admin_task = tokio::spawn(serve(
            admin_listener,
            // Its own connection budget: however busy the proxy port, probes get through.
            listener_settings("admin", s.admin_max_connections, Duration::from_secs(1)),
            admin_stop.clone(),
            move |req, peer| {
                let admin = admin.clone();
                async move { admin.handle(req, peer).await }
            },
        ));

        // The proxy runs on its own worker threads, one single-threaded event loop each (like
        // nginx's workers): a connection and its requests never hop between threads, and each
        // worker keeps its own pool of upstream connections.
        let u = &config.upstream;
        let pool = client::pool::PoolSettings {
            idle_timeout: Duration::from_secs(u.pool_idle_timeout_secs),
            max_idle_per_host: u.pool_max_idle_per_host,
        };
        let worker_stop = CancellationToken::new();
        // Also stops the workers if this future is dropped instead of finishing.
        let _workers_guard = worker_stop.clone().drop_guard();
        let mut handlers = Vec::new();
        let mut threads = Vec::new();
        for i in 0..workers {
            let Some((handle, thread)) = start_worker(i, worker_stop.clone()) else { continue };
            let proxy = Proxy::new(
                client::pool::Pool::new(upstream_connector.clone(), pool),
                proxy_settings.clone(),
                metrics.clone(),
            );
            let handler = move |req, _peer| {
                let proxy = proxy.clone();
                async move { proxy.handle(req).await }
            };
            handlers.push((handle, handler));
            threads.push(thread);
        }
        let proxy_stop = CancellationToken::new();
        let proxy_task = tokio::spawn(serve_on(
            proxy_listener,
            listener_settings("proxy", s.max_connections, Duration::from_secs(s.shutdown_grace_secs)),
            proxy_stop.clone(),
            handlers,
        ));

        tokio::select! {
            _ = shutdown => {}
            _ = quit.cancelled() => {}
        }
        lifecycle.draining.store(true, Ordering::Release);
        tracing::info!(
            delay_secs = s.shutdown_delay_secs,
            grace_secs = s.shutdown_grace_secs,
            "Shutting down: not ready; draining in-flight requests"
        );
        if s.shutdown_delay_secs > 0 {
            tokio::time::sleep(Duration::from_secs(s.shutdown_delay_secs)).await;
        }
        proxy_stop.cancel();
        let _ = proxy_task.await;
        worker_stop.cancel();
        let _ = tokio::task::spawn_blocking(move || threads.into_iter().for_each(|t| drop(t.join()))).await;
        callback_stop.cancel();
        if let Some(task) = callback_task {
            let _ = task.await;
        }
        background.cancel();
        for task in background_tasks {
            let _ = task.await;
        }
        admin_stop.cancel();
        let _ = admin_task.await;
        tracing::info!("Shutdown complete");
    }
}

/// Starts proxy worker `i`: a thread running a single-threaded runtime until `stop`. Returns
/// the runtime's handle (connections are spawned onto it) and the thread.
fn start_worker(i: usize, stop: CancellationToken) -> Option<(Handle, std::thread::JoinHandle<()>)> {
    let (tx, rx) = std::sync::mpsc::channel();
    let thread = std::thread::Builder::new().name(format!("sidekey-worker-{i}")).spawn(move || {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, worker = i, "Cannot start a proxy worker runtime");
                return;
            }
        };
        let _ = tx.send(runtime.handle().clone());
        runtime.block_on(stop.cancelled());
    });
    match thread {
        Ok(thread) => rx.recv().ok().map(|handle| (handle, thread)),
        Err(e) => {
            tracing::error!(error = %e, worker = i, "Cannot start a proxy worker thread");
            None
        }
    }
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, AppError> {
    TcpListener::bind(addr).await.map_err(|source| AppError::Bind { key, addr, source })
}
