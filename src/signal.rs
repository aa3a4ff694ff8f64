//! Shutdown signals: the first SIGTERM or SIGINT starts a graceful shutdown; a second one exits
//! at once.

use std::io;

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

/// Resolves on the first signal, after arranging for a second one to exit the process at once.
pub async fn shutdown() {
    match next().await {
        Ok(name) => tracing::info!(
            signal = name,
            "Signal received; shutting down gracefully (send again to exit at once)"
        ),
        Err(e) => {
            // Without signal handling the process could never stop cleanly; say so and wait forever.
            tracing::error!(error = %e, "Cannot install signal handlers");
            std::future::pending::<()>().await;
        }
    }
    tokio::spawn(async {
        if let Ok(name) = next().await {
            tracing::warn!(signal = name, "Second signal; exiting at once");
            std::process::exit(1);
        }
    });
}
