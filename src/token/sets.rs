//! Credential sets by name: `default` (`[auth]`) and each `[auth.sets.<name>]`, every one with
//! its own token store (and, in the app, its own refresher). Routes and clients hold the set
//! that pays for their requests; a request's token is one atomic load on that set's store.

use std::fmt;
use std::sync::Arc;

use super::TokenStore;

/// One credential set: its name and its token store. Cloning is an `Arc` bump.
#[derive(Clone)]
pub struct TokenSet {
    inner: Arc<Inner>,
}

struct Inner {
    name: Arc<str>,
    store: TokenStore,
}

impl TokenSet {
    pub fn new(name: &str, store: TokenStore) -> Self {
        Self { inner: Arc::new(Inner { name: Arc::from(name), store }) }
    }

    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The name as a shared string (for access-log fields that outlive the request).
    pub fn name_arc(&self) -> Arc<str> {
        Arc::clone(&self.inner.name)
    }

    pub fn store(&self) -> &TokenStore {
        &self.inner.store
    }
}

impl fmt::Debug for TokenSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenSet").field("name", &self.inner.name).finish()
    }
}

/// Every configured set, `default` first.
#[derive(Clone, Debug, Default)]
pub struct TokenSets {
    sets: Arc<Vec<TokenSet>>,
}

impl TokenSets {
    /// `sets` must hold `default` first.
    pub fn new(sets: Vec<TokenSet>) -> Self {
        Self { sets: Arc::new(sets) }
    }

    /// A single `default` set around `store`.
    pub fn single(store: TokenStore) -> Self {
        Self::new(vec![TokenSet::new(crate::config::DEFAULT_SET, store)])
    }

    pub fn get(&self, name: &str) -> Option<&TokenSet> {
        self.sets.iter().find(|s| s.name() == name)
    }

    /// The `default` set.
    pub fn default_set(&self) -> Option<&TokenSet> {
        self.sets.first()
    }

    pub fn iter(&self) -> impl Iterator<Item = &TokenSet> {
        self.sets.iter()
    }
}
