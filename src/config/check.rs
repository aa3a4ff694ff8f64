//! Value checks shared by every section: ranges, URLs (with their secrets redacted), and one
//! source of a secret.

use std::path::PathBuf;

use http::Uri;

use super::ConfigError;
use crate::secret::Secret;

/// The longest configurable duration: far beyond any sensible setting, far below an overflow.
pub const MAX_DURATION_SECS: u64 = 365 * 24 * 3600;
/// The largest configurable connection or request count.
pub(super) const MAX_COUNT: u64 = 1_000_000;

pub(super) fn at_most(key: &str, value: u64, max: u64, unit: &str) -> Result<(), ConfigError> {
    if value > max {
        let unit = if unit.is_empty() { String::new() } else { format!(" {unit}") };
        return Err(ConfigError::invalid(key, format!("{value} is too large (at most {max}{unit})")));
    }
    Ok(())
}

pub(super) fn positive(key: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        return Err(ConfigError::invalid(key, "must be greater than 0"));
    }
    Ok(())
}

pub(super) fn one_source(
    key: &str,
    file_key: &str,
    inline: Option<&Secret>,
    file: Option<&PathBuf>,
) -> Result<(), ConfigError> {
    match (inline, file) {
        (Some(_), Some(_)) => {
            Err(ConfigError::invalid(key, format!("set either {key} or {file_key}, not both")))
        }
        (None, None) => Err(ConfigError::invalid(key, format!("missing (set {key} or {file_key})"))),
        (Some(v), None) if v.is_empty() => Err(ConfigError::invalid(key, "must not be empty")),
        (None, Some(path)) if !path.is_file() => {
            Err(ConfigError::invalid(file_key, format!("{} does not exist", path.display())))
        }
        _ => Ok(()),
    }
}

/// Parses an absolute `http`/`https` URL without userinfo, query or fragment. Errors quote the
/// URL with its userinfo, query and fragment redacted: they may hold a credential.
pub fn parse_base_url(key: &str, value: &str) -> Result<Uri, ConfigError> {
    let shown = redact_url(value);
    let uri: Uri = value.parse().map_err(|_| ConfigError::invalid(key, format!("{shown:?} is not a URL")))?;
    match uri.scheme_str() {
        Some("http") | Some("https") => {}
        _ => return Err(ConfigError::invalid(key, format!("{shown:?} must start with http:// or https://"))),
    }
    let Some(authority) = uri.authority() else {
        return Err(ConfigError::invalid(key, format!("{shown:?} has no host")));
    };
    // Anywhere: an unencoded password with a `/` moves the `@` into what parses as the path.
    if authority.as_str().contains('@') || value.contains('@') {
        return Err(ConfigError::invalid(
            key,
            format!("{shown:?} must not carry user info (put credentials in [auth], never in a URL)"),
        ));
    }
    let port =
        authority.as_str().rsplit_once(':').map(|(_, p)| p).filter(|_| !authority.as_str().ends_with(']'));
    if port.is_some() && authority.port_u16().is_none() {
        return Err(ConfigError::invalid(key, format!("{shown:?} has a port that is not a number")));
    }
    if uri.query().is_some() || value.contains('#') {
        return Err(ConfigError::invalid(key, format!("{shown:?} must not have a query or fragment")));
    }
    Ok(uri)
}

/// A URL for error messages: userinfo, query and fragment replaced by `[redacted]`. The
/// userinfo ends at the last `@` (an unencoded password may hold `/`, `?` or `#`).
pub fn redact_url(value: &str) -> String {
    let redacted = crate::secret::REDACTED;
    let (scheme, rest) = match value.split_once("://") {
        Some((scheme, rest)) => (Some(scheme), rest),
        None => (None, value),
    };
    let mut out = String::new();
    if let Some(scheme) = scheme {
        out.push_str(scheme);
        out.push_str("://");
    }
    let rest = match rest.rfind('@') {
        Some(at) => {
            out.push_str(redacted);
            out.push('@');
            &rest[at + 1..]
        }
        None => rest,
    };
    match rest.find(['?', '#']) {
        Some(i) => {
            out.push_str(&rest[..i]);
            out.push_str(&rest[i..i + 1]);
            out.push_str(redacted);
        }
        None => out.push_str(rest),
    }
    out
}
