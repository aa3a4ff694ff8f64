//! Signed keys: short-lived JWTs a backend mints for an untrusted caller, naming what it may do.
//!
//! How the pieces fit:
//! - [`SignedKeysConfig`] (`[signed_keys]`): the key file, the claim rules, who pays, the budget
//!   store.
//! - [`Verifier`]: the decoded keys behind an `ArcSwap`; [`Verifier::verify`] checks the
//!   signature (`jsonwebtoken` on `ring`, only the configured key's algorithm) and then the
//!   claims at an explicit `now`; [`Verifier::run`] re-reads the key file for rotations.
//! - [`SignedKey`]: the verified claims the request path reads (model scope, caps, budget, who);
//!   [`SignedKeyError`]: the refusals, each with a metric label and a message safe for clients.
//! - [`looks_like_jwt`]: the cheap shape check that tells a signed key from a plain client key.
//! - [`mint`]: `sidekey mint`, the HS256 signer for backends and tests.

mod claims;
mod config;
pub mod mint;
#[cfg(test)]
pub(crate) mod testutil;
mod verifier;

pub use claims::{SignedKey, SignedKeyError};
pub use config::SignedKeysConfig;
pub use verifier::{looks_like_jwt, KeyFileError, Verifier, MAX_TOKEN_BYTES, MIN_SECRET_BYTES};

/// Every `result` label of `sidekey_signed_keys_total`, so the series exist from the start:
/// `accepted`, each [`SignedKeyError::reason`], and the request path's own refusals
/// (`out_of_scope`: model or `max_tokens` outside the key's scope; `budget_exhausted`;
/// `budget_unavailable`: the budget store cannot be reached).
pub const RESULTS: &[&str] = &[
    "accepted",
    "expired",
    "not_yet_valid",
    "bad_signature",
    "wrong_issuer",
    "wrong_audience",
    "lifetime_too_long",
    "malformed",
    "out_of_scope",
    "budget_exhausted",
    "budget_unavailable",
];

#[cfg(test)]
mod tests;
