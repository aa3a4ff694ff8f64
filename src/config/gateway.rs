//! `[[routes]]`, `[[clients]]` and `[caller_credentials]`: who the callers are, where their
//! requests go and who pays, and the checks that span sections (every set a route or client
//! names exists, no key belongs to two clients, a network-facing proxy authenticates callers).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::check::{at_most, parse_base_url, positive, MAX_COUNT, MAX_DURATION_SECS};
use super::{AuthConfig, Config, ConfigError, PolicyConfig, Provider};
use crate::secret::Secret;

/// The name of the credential set `[auth]` itself defines.
pub const DEFAULT_SET: &str = "default";

/// Client names sidekey uses itself in metrics and logs.
const RESERVED_CLIENTS: [&str; 3] = ["caller", "anonymous", "signed"];

/// A client path prefix routed to its own upstream.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteConfig {
    /// `/ml/v1`: requests under it go to `base_url` with the rest of the path.
    pub prefix: String,
    pub base_url: String,
    /// The credential set whose token this route injects (default: `default`).
    pub credentials: String,
}

/// A caller, identified by its key.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClientConfig {
    /// The label in metrics and logs.
    pub name: String,
    /// One key per line; re-read when it changes (rotation without a restart).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub keys_file: Option<PathBuf>,
    /// Hex SHA-256 digests of keys, so keys never sit in the config.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub key_sha256: Vec<Secret>,
    /// The set that pays for this client's requests (default: the route's).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credentials: Option<String>,
    /// Replaces `[policy]` for this client's requests.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub policy: Option<PolicyConfig>,
}

/// Callers that bring their own Cloud.ru key pair as the API key (`<key_id>:<secret>`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct CallerCredentialsConfig {
    pub enabled: bool,
    /// The set whose provider, token_url and refresh settings pairs use.
    pub provider_of: String,
    /// Cached pairs at most; the least recently used is evicted.
    pub max_entries: usize,
    /// A pair unused this long is forgotten (its token dropped).
    pub idle_evict_secs: u64,
    /// Token fetches for caller pairs per second at most, all pairs together.
    pub max_fetches_per_sec: u32,
}

impl Default for CallerCredentialsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            provider_of: DEFAULT_SET.into(),
            max_entries: 1000,
            idle_evict_secs: 3600,
            max_fetches_per_sec: 20,
        }
    }
}

/// Checks the names and contents of `[auth.sets.*]`.
pub(super) fn validate_sets(auth: &AuthConfig) -> Result<(), ConfigError> {
    for (name, set) in &auth.sets {
        let prefix = format!("auth.sets.{name}");
        if name == DEFAULT_SET {
            return Err(ConfigError::invalid(prefix, "\"default\" is the name of [auth] itself"));
        }
        if !is_label(name) {
            return Err(ConfigError::invalid(
                prefix,
                "set names take letters, digits, '-', '_' and '.' only",
            ));
        }
        if !set.sets.is_empty() {
            return Err(ConfigError::invalid(format!("{prefix}.sets"), "sets cannot be nested"));
        }
        set.validate(&prefix)?;
    }
    Ok(())
}

/// Checks routes, clients and caller credentials against the rest of the config.
pub(super) fn validate(config: &Config) -> Result<(), ConfigError> {
    let known_set = |name: &str| name == DEFAULT_SET || config.auth.sets.contains_key(name);
    let mut prefixes = HashSet::new();
    for (i, r) in config.routes.iter().enumerate() {
        let key = |field: &str| format!("routes[{i}].{field}");
        let p = r.prefix.as_str();
        let bad_char =
            p.bytes().any(|b| matches!(b, b'?' | b'#' | b'%' | b';' | b'\\') || !b.is_ascii_graphic());
        let dot = p.split('/').any(|s| s == "." || s == "..");
        if !p.starts_with('/') || p.len() < 2 || p.ends_with('/') || p.contains("//") || bad_char || dot {
            return Err(ConfigError::invalid(
                key("prefix"),
                format!("{p:?} must be a plain path like \"/ml/v1\" (leading '/', no trailing '/', no query, escapes or dot segments)"),
            ));
        }
        if !prefixes.insert(p) {
            return Err(ConfigError::invalid(key("prefix"), format!("duplicate prefix {p:?}")));
        }
        parse_base_url(&key("base_url"), &r.base_url)?;
        let set = if r.credentials.is_empty() { DEFAULT_SET } else { r.credentials.as_str() };
        if !known_set(set) {
            return Err(ConfigError::invalid(key("credentials"), format!("no credential set named {set:?}")));
        }
    }
    let mut names = HashSet::new();
    let mut owners: HashMap<[u8; 32], usize> = HashMap::new();
    for (i, c) in config.clients.iter().enumerate() {
        let key = |field: &str| format!("clients[{i}].{field}");
        if !is_label(&c.name) || RESERVED_CLIENTS.contains(&c.name.as_str()) {
            return Err(ConfigError::invalid(
                key("name"),
                format!(
                    "{:?}: client names take letters, digits, '-', '_' and '.' only and must not be one of {}",
                    c.name,
                    RESERVED_CLIENTS.join(", ")
                ),
            ));
        }
        if !names.insert(c.name.as_str()) {
            return Err(ConfigError::invalid(key("name"), format!("duplicate client name {:?}", c.name)));
        }
        let digests =
            client_digests(c).map_err(|(field, reason)| ConfigError::invalid(key(field), reason))?;
        if digests.is_empty() {
            return Err(ConfigError::invalid(
                key("keys_file"),
                "the client has no key (set keys_file with one key per line, or key_sha256)",
            ));
        }
        for digest in digests {
            if let Some(other) = owners.insert(digest, i) {
                if other != i {
                    return Err(ConfigError::invalid(
                        key("name"),
                        format!(
                            "a key of client {:?} is also a key of client {:?}",
                            c.name, config.clients[other].name
                        ),
                    ));
                }
            }
        }
        if let Some(set) = &c.credentials {
            if !known_set(set) {
                return Err(ConfigError::invalid(
                    key("credentials"),
                    format!("no credential set named {set:?}"),
                ));
            }
        }
        if let Some(p) = &c.policy {
            p.validate(&key("policy"), config.server.max_request_body_bytes)?;
        }
    }
    let cc = &config.caller_credentials;
    if cc.enabled {
        let set = sets(config).get(cc.provider_of.as_str()).copied().ok_or_else(|| {
            ConfigError::invalid(
                "caller_credentials.provider_of",
                format!("no credential set named {:?}", cc.provider_of),
            )
        })?;
        if set.provider != Provider::CloudruIam {
            return Err(ConfigError::invalid(
                "caller_credentials.provider_of",
                "caller-supplied credentials are Cloud.ru key pairs: the set's provider must be cloudru_iam",
            ));
        }
        positive("caller_credentials.max_entries", cc.max_entries as u64)?;
        positive("caller_credentials.idle_evict_secs", cc.idle_evict_secs)?;
        positive("caller_credentials.max_fetches_per_sec", u64::from(cc.max_fetches_per_sec))?;
    }
    at_most("caller_credentials.max_entries", cc.max_entries as u64, MAX_COUNT, "")?;
    at_most(
        "caller_credentials.idle_evict_secs",
        cc.idle_evict_secs,
        MAX_DURATION_SECS,
        "seconds (one year)",
    )?;
    at_most("caller_credentials.max_fetches_per_sec", u64::from(cc.max_fetches_per_sec), 100_000, "")?;
    let s = &config.server;
    if !s.listen.ip().is_loopback()
        && config.clients.is_empty()
        && config.signed_keys.is_none()
        && !s.open_proxy
    {
        return Err(ConfigError::invalid(
            "server.listen",
            format!(
                "{} is reachable from the network, so callers must authenticate: configure [[clients]] \
                 with their keys (or [signed_keys]), or set server.open_proxy = true if a layer in \
                 front of sidekey authenticates them",
                s.listen
            ),
        ));
    }
    Ok(())
}

/// Every credential set by name: `default` (`[auth]`) and `[auth.sets.*]`.
pub fn sets(config: &Config) -> BTreeMap<&str, &AuthConfig> {
    let mut out: BTreeMap<&str, &AuthConfig> =
        config.auth.sets.iter().map(|(k, v)| (k.as_str(), v)).collect();
    out.insert(DEFAULT_SET, &config.auth);
    out
}

/// The SHA-256 digests of a client's keys (from `key_sha256` and `keys_file`), or the field
/// and reason of the first problem. Never quotes a key.
pub fn client_digests(c: &ClientConfig) -> Result<Vec<[u8; 32]>, (&'static str, String)> {
    let mut out = Vec::new();
    for (j, hex) in c.key_sha256.iter().enumerate() {
        let digest = parse_digest(hex.expose().trim())
            .ok_or(("key_sha256", format!("entry {j} is not 64 hex digits (a SHA-256 digest)")))?;
        out.push(digest);
    }
    if let Some(path) = &c.keys_file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ("keys_file", format!("cannot read {}: {e}", path.display())))?;
        out.extend(keys_in(&text).map(digest_of));
    }
    Ok(out)
}

/// The keys in a keys file: one per line, surrounding whitespace trimmed, blank lines and
/// `#` comments skipped.
pub fn keys_in(text: &str) -> impl Iterator<Item = &str> {
    text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#'))
}

/// SHA-256 of a key.
pub fn digest_of(key: &str) -> [u8; 32] {
    sha256(key.as_bytes())
}

/// SHA-256 of any bytes (keys, key files' contents).
pub fn sha256(bytes: &[u8]) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, bytes);
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

fn parse_digest(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in hex.as_bytes().chunks(2).enumerate() {
        let s = std::str::from_utf8(pair).ok()?;
        out[i] = u8::from_str_radix(s, 16).ok()?;
    }
    Some(out)
}

/// Safe as a metric label value and a log field.
fn is_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}
