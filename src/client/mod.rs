//! The outbound HTTP client shared by the proxy and the token fetcher: hyper-util's pooled client
//! over rustls (ring provider, web PKI roots plus an optional private CA), HTTP/2 by ALPN, and
//! the proxy's per-worker pool on the same connector ([`pool`]).

pub mod pool;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

/// The connector type every outbound client uses.
pub type Connector = HttpsConnector<HttpConnector>;

/// Building the TLS setup failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read CA file {}: {source}", path.display())]
    CaFile {
        path: std::path::PathBuf,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("CA file {} holds no usable certificate", .0.display())]
    NoCertificates(std::path::PathBuf),
    #[error("TLS setup failed")]
    Tls(#[from] rustls::Error),
}

/// Pool and timeout settings for one client.
#[derive(Debug, Clone)]
pub struct ClientSettings<'a> {
    pub ca_file: Option<&'a Path>,
    pub connect_timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// Offer h2 by ALPN (else HTTP/1.1 only). Used by [`connector`].
    pub http2: bool,
}

/// An HTTPS-or-HTTP connector with TCP_NODELAY and a connect timeout.
pub fn connector(settings: &ClientSettings<'_>) -> Result<Connector, ClientError> {
    let mut roots = RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(path) = settings.ca_file {
        let before = roots.len();
        for cert in CertificateDer::pem_file_iter(path)
            .map_err(|source| ClientError::CaFile { path: path.into(), source })?
        {
            let cert = cert.map_err(|source| ClientError::CaFile { path: path.into(), source })?;
            // A malformed certificate among good ones is skipped, as browsers do.
            let _ = roots.add(cert);
        }
        if roots.len() == before {
            return Err(ClientError::NoCertificates(path.into()));
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();

    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(settings.connect_timeout));
    let builder = HttpsConnectorBuilder::new().with_tls_config(tls).https_or_http().enable_http1();
    Ok(if settings.http2 {
        builder.enable_http2().wrap_connector(http)
    } else {
        builder.wrap_connector(http)
    })
}

/// A pooled client over `connector`.
pub fn build<B>(connector: Connector, settings: &ClientSettings<'_>) -> Client<Connector, B>
where
    B: http_body::Body + Send + 'static,
    B::Data: Send,
{
    Client::builder(TokioExecutor::new())
        .pool_idle_timeout(settings.pool_idle_timeout)
        .pool_max_idle_per_host(settings.pool_max_idle_per_host)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .build(connector)
}
