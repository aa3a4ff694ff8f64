//! What happens after a request ends: the signed key's budget is charged with what the
//! response used, and the usage callback gets its event. Both run from the request guard when
//! the response body ends (or the client goes away); neither delays a byte of the response.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use prometheus::IntCounterVec;

use super::usage::Scan;
use crate::callback::{Dispatcher, EventUsage, Outcome, UsageEvent};
use crate::ledger::Ledger;
use crate::signed::SignedKey;

/// The budget side of a signed key's request.
#[derive(Debug)]
pub struct Charge {
    pub ledger: Ledger,
    pub key: Arc<SignedKey>,
    /// Charged when the response reports no usage (a stream without a usage block, a cut
    /// stream): the request's output cap, else everything the key has left.
    pub fallback: u64,
    /// `sidekey_budget_store_errors_total` is counted by the ledger; failed charges are logged.
    pub results: IntCounterVec,
    /// Where the charge runs: the control runtime, which outlives the proxy workers at shutdown.
    pub runtime: tokio::runtime::Handle,
}

/// How the request ended, as the guard saw it.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ending {
    pub status: u16,
    pub ttfb: Option<Duration>,
    /// sidekey answered itself (a refusal or its own error).
    pub local: bool,
    /// The response body reached its end.
    pub finished: bool,
    /// The upstream body failed or was cut.
    pub upstream_failed: bool,
}

/// The after-the-request work of one request.
#[derive(Debug)]
pub struct Report {
    pub started_at: SystemTime,
    /// Filled in at the start: who called, who paid, the endpoint.
    pub event: Option<(Dispatcher, UsageEvent)>,
    pub charge: Option<Charge>,
}

impl Report {
    /// Charges the budget and sends the event.
    pub fn finish(self, ending: Ending, scan: Option<&Scan>, model: Option<&str>, elapsed: Duration) {
        let usage = scan.and_then(|s| s.usage);
        if let Some(charge) = self.charge {
            // Charged when upstream answered with success: reported usage, else the fallback.
            // A refusal or an upstream error generated nothing to pay for.
            if !ending.local && (200..300).contains(&ending.status) {
                let tokens = usage.map_or(charge.fallback, |u| u.total);
                spawn_charge(charge, tokens);
            }
        }
        if let Some((dispatcher, mut event)) = self.event {
            event.status = ending.status;
            event.stream = scan.is_some_and(|s| s.stream);
            event.model = scan.and_then(|s| s.model.clone()).or_else(|| model.map(str::to_string));
            event.usage = usage.map(EventUsage::from);
            event.outcome = if ending.local {
                if ending.status >= 500 {
                    Outcome::UpstreamError
                } else {
                    Outcome::Refused
                }
            } else if ending.upstream_failed || ending.status >= 500 {
                Outcome::UpstreamError
            } else if ending.finished {
                Outcome::Completed
            } else {
                Outcome::ClientAborted
            };
            event.started_at = self.started_at;
            event.duration_ms = u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX);
            event.ttfb_ms = ending.ttfb.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            dispatcher.submit(event);
        }
    }
}

/// Charges in the background on the control runtime; a failure is logged (by jti tag only).
fn spawn_charge(charge: Charge, tokens: u64) {
    let Some(jti) = charge.key.jti().map(str::to_string) else { return };
    let handle = charge.runtime.clone();
    handle.spawn(async move {
        if let Err(e) = charge.ledger.charge(&jti, tokens, charge.key.valid_until()).await {
            charge.results.with_label_values(&["budget_unavailable"]).inc();
            tracing::warn!(
                jti = %crate::ledger::jti_tag(&jti),
                tokens,
                error = %crate::token::refresher::error_chain(&e),
                "Charging a signed key's budget failed"
            );
        }
    });
}
