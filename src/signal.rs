//! Shutdown signals: the first SIGTERM or SIGINT starts a graceful shutdown; a second one exits
//! at once.

use std::io;

use tokio_util::sync::CancellationToken;

/// Resolves on the next SIGTERM or SIGINT.
pub async fn next() -> io::Result<&'static str> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        tokio::select! {
            _ = term.recv() => Ok("SIGTERM"),
            _ = int.recv() => Ok("SIGINT"),
        }
    }
    #[cfg(not(unix))]
    {
        tokio::signal::ctrl_c().await?;
        Ok("ctrl-c")
    }
}

/// Watches for signals for the life of the process: the first cancels `stop` (graceful
/// shutdown); any signal once `stop` is cancelled (a second signal, or one after
/// `/quitquitquit`) exits at once.
pub fn watch(stop: CancellationToken) {
    tokio::spawn(async move {
        loop {
            match next().await {
                Ok(name) if stop.is_cancelled() => {
                    tracing::warn!(signal = name, "Signal during shutdown; exiting at once");
                    std::process::exit(1);
                }
                Ok(name) => {
                    tracing::info!(
                        signal = name,
                        "Signal received; shutting down gracefully (send again to exit at once)"
                    );
                    stop.cancel();
                }
                Err(e) => {
                    // Without signal handling the process could never stop cleanly; say so.
                    tracing::error!(error = %e, "Cannot install signal handlers");
                    return;
                }
            }
        }
    });
}

/// A shutdown future driven by [`watch`].
pub fn shutdown() -> impl std::future::Future<Output = ()> {
    let stop = CancellationToken::new();
    watch(stop.clone());
    stop.cancelled_owned()
}
