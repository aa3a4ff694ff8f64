//! Client identity: which configured client a presented key belongs to. Keys are held as
//! SHA-256 digests only and compared in constant time (every digest is compared, no early
//! exit); the key index is rebuilt when a `keys_file` changes and swapped whole, so the
//! request path takes one atomic load and never a lock.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::{IntCounter, IntCounterVec};
use subtle::{ConditionallySelectable, ConstantTimeEq};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::config::{client_digests, digest_of, sha256, ClientConfig};
use crate::proxy::inspect::Policy;
use crate::token::sets::TokenSet;

/// A caller sidekey knows: a configured client, or one of the built-in identities.
#[derive(Debug)]
pub struct Client {
    /// The label in metrics and logs (`anonymous` without client auth, `caller` for
    /// caller-supplied credentials).
    pub name: Arc<str>,
    /// The set that pays for this client's requests, if it names one.
    pub set: Option<TokenSet>,
    /// `[clients.policy]`, or the global `[policy]`.
    pub policy: Arc<Policy>,
    /// `[clients.policy] max_inflight`: this client's slots.
    pub slots: Option<(Arc<Semaphore>, usize)>,
    requests: IntCounterVec,
    /// `sidekey_client_requests_total{client=name}` children per status, resolved once.
    counters: Vec<OnceLock<IntCounter>>,
    /// `sidekey_client_tokens_total{client=name, kind}` for prompt, completion, total.
    token_counters: [IntCounter; 3],
}

impl Client {
    pub fn new(
        name: &str,
        set: Option<TokenSet>,
        policy: Arc<Policy>,
        max_inflight: Option<usize>,
        requests: IntCounterVec,
        tokens: IntCounterVec,
    ) -> Self {
        // Present from the first scrape.
        requests.with_label_values(&[name, "200"]);
        let token_counters =
            ["prompt", "completion", "total"].map(|kind| tokens.with_label_values(&[name, kind]));
        Self {
            name: Arc::from(name),
            set,
            policy,
            slots: max_inflight.map(|n| (Arc::new(Semaphore::new(n)), n)),
            requests,
            counters: (100..600).map(|_| OnceLock::new()).collect(),
            token_counters,
        }
    }

    /// Counts a response's token usage in `sidekey_client_tokens_total`.
    pub fn count_tokens(&self, prompt: u64, completion: u64, total: u64) {
        for (counter, n) in self.token_counters.iter().zip([prompt, completion, total]) {
            counter.inc_by(n);
        }
    }

    /// Counts a finished request in `sidekey_client_requests_total`.
    pub fn count(&self, status: http::StatusCode) {
        match self.counters.get(usize::from(status.as_u16().saturating_sub(100))) {
            Some(slot) => {
                slot.get_or_init(|| self.requests.with_label_values(&[&self.name, status.as_str()])).inc()
            }
            None => self.requests.with_label_values(&[&self.name, status.as_str()]).inc(),
        }
    }
}

/// Every configured client's key digests, pointing at its index.
#[derive(Default)]
pub struct KeyIndex {
    /// SHA-256 digests as four words each, with their client's index.
    digests: Vec<([u64; 4], u64)>,
}

impl std::fmt::Debug for KeyIndex {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Digests of keys are as sensitive as the keys: only their number.
        f.debug_struct("KeyIndex").field("keys", &self.digests.len()).finish()
    }
}

/// A digest as four native-endian words (only ever compared with another such).
fn words(d: &[u8; 32]) -> [u64; 4] {
    std::array::from_fn(|i| {
        let mut w = [0u8; 8];
        w.copy_from_slice(&d[i * 8..i * 8 + 8]);
        u64::from_ne_bytes(w)
    })
}

impl KeyIndex {
    /// Reads every client's keys (files included). Errors name the client and field, never a
    /// key; a key listed for two clients, or a client left without a key, is an error.
    pub fn build(clients: &[ClientConfig]) -> Result<Self, String> {
        let mut digests: Vec<([u64; 4], u64)> = Vec::new();
        for (i, c) in clients.iter().enumerate() {
            let keys =
                client_digests(c).map_err(|(field, reason)| format!("clients[{i}].{field}: {reason}"))?;
            // As at start-up: a client without a key is a mistake (an emptied or half-written
            // keys file), not a way to revoke it; the last good keys stay.
            if keys.is_empty() {
                return Err(format!("clients[{i}].keys_file: client {:?} has no key", c.name));
            }
            for d in keys {
                let d = words(&d);
                if let Some((_, other)) = digests.iter().find(|(e, _)| *e == d) {
                    if *other as usize != i {
                        return Err(format!(
                            "a key of client {:?} is also a key of client {:?}",
                            c.name, clients[*other as usize].name
                        ));
                    }
                    continue;
                }
                digests.push((d, i as u64));
            }
        }
        Ok(Self { digests })
    }

    pub fn len(&self) -> usize {
        self.digests.len()
    }

    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// The index of the client whose key this is. Compares the key's digest with every known
    /// digest in constant time, whatever matches.
    pub fn find(&self, key: &str) -> Option<usize> {
        let wanted = words(&digest_of(key));
        let mut found = u64::MAX;
        for (digest, index) in &self.digests {
            // Four 64-bit words rather than 32 bytes: the same constant-time comparison (every
            // word of every digest, no early exit) for an eighth of the work, which matters with
            // hundreds of clients on every request.
            let hit = digest[..].ct_eq(&wanted[..]);
            found = u64::conditional_select(&found, index, hit);
        }
        (found != u64::MAX).then_some(found as usize)
    }
}

/// The configured clients and their current key index.
#[derive(Debug)]
pub struct ClientTable {
    clients: Vec<Arc<Client>>,
    keys: ArcSwap<KeyIndex>,
}

impl ClientTable {
    pub fn new(clients: Vec<Arc<Client>>, keys: KeyIndex) -> Self {
        Self { clients, keys: ArcSwap::from_pointee(keys) }
    }

    /// True when client authentication is off (no `[[clients]]`).
    pub fn is_empty(&self) -> bool {
        self.clients.is_empty()
    }

    /// The configured client with this name (a signed key's `client` claim).
    pub fn by_name(&self, name: &str) -> Option<&Arc<Client>> {
        self.clients.iter().find(|c| &*c.name == name)
    }

    /// The client a presented key belongs to.
    pub fn lookup(&self, key: &str) -> Option<&Arc<Client>> {
        // Without configured clients there is nothing to compare with: no digest to compute.
        if self.clients.is_empty() {
            return None;
        }
        self.keys.load().find(key).and_then(|i| self.clients.get(i))
    }

    /// Publishes a rebuilt key index.
    pub fn replace_keys(&self, keys: KeyIndex) {
        self.keys.store(Arc::new(keys));
    }

    /// Re-reads the key files every `poll` and swaps the index when they changed; a file that
    /// breaks (unreadable, a key shared by two clients) keeps the last good index.
    pub async fn watch(
        self: Arc<Self>,
        config: Vec<ClientConfig>,
        poll: Duration,
        cancel: CancellationToken,
    ) {
        if !config.iter().any(|c| c.keys_file.is_some()) {
            return;
        }
        let mut last = fingerprint(&config);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(poll) => {}
            }
            let now = fingerprint(&config);
            if now == last {
                continue;
            }
            let cfg = config.clone();
            let built = tokio::task::spawn_blocking(move || KeyIndex::build(&cfg)).await;
            match built {
                Ok(Ok(index)) => {
                    tracing::info!(keys = index.len(), "Client key files changed; keys reloaded");
                    self.replace_keys(index);
                    last = now;
                    failing = false;
                }
                Ok(Err(reason)) => {
                    if !failing {
                        tracing::warn!(reason = %reason, "Client key files changed but cannot be used; keeping the previous keys");
                    }
                    failing = true;
                }
                Err(_) => {}
            }
        }
    }
}

/// What the key files hold right now, as digests of their contents (never the keys).
fn fingerprint(config: &[ClientConfig]) -> Vec<Option<[u8; 32]>> {
    config
        .iter()
        .map(|c| c.keys_file.as_ref().and_then(|p| std::fs::read(p).ok()).map(|b| sha256(&b)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secret::Secret;

    fn hex(d: [u8; 32]) -> String {
        d.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn keys_find_their_client_by_digest() {
        let clients = vec![
            ClientConfig {
                name: "a".into(),
                key_sha256: vec![Secret::new(hex(digest_of("sk-a")))],
                ..Default::default()
            },
            ClientConfig {
                name: "b".into(),
                key_sha256: vec![Secret::new(hex(digest_of("sk-b1"))), Secret::new(hex(digest_of("sk-b2")))],
                ..Default::default()
            },
        ];
        let index = KeyIndex::build(&clients).unwrap();
        assert_eq!(index.find("sk-a"), Some(0));
        assert_eq!(index.find("sk-b2"), Some(1));
        assert_eq!(index.find("sk-b"), None);
        assert_eq!(index.find(""), None);
        let mut dup = clients.clone();
        dup[1].key_sha256.push(Secret::new(hex(digest_of("sk-a"))));
        let err = KeyIndex::build(&dup).unwrap_err();
        assert!(err.contains("\"a\"") && err.contains("\"b\"") && !err.contains("sk-a"), "{err}");
    }

    #[test]
    fn debug_never_shows_keys_or_digests() {
        let clients = vec![ClientConfig {
            name: "a".into(),
            key_sha256: vec![Secret::new(hex(digest_of("sk-a")))],
            ..Default::default()
        }];
        let index = KeyIndex::build(&clients).unwrap();
        for out in [format!("{clients:?}"), format!("{index:?}")] {
            assert!(!out.contains(&hex(digest_of("sk-a"))), "{out}");
            let bytes = format!("{:?}", digest_of("sk-a"));
            assert!(!out.contains(&bytes[1..20]), "{out}");
        }
    }
}
