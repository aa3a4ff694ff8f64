//! The per-replica store: a bounded map from `jti` to its total and expiry, behind a
//! `std::sync::Mutex` held only for a map lookup (never across an `.await`: nothing here awaits).
//!
//! Expired entries read as 0 and are dropped when met, and all at once when the map is full.
//! A full map of live entries refuses new keys rather than evicting one (evicting would reset
//! that key's usage: fail open), and refuses them at admission ([`MemoryLedger::used`]), so a
//! key that could not be charged never runs a request. (Keys admitted together into the last
//! free slots can still find it taken at charge time: the overshoot of requests in flight.) The sweep runs only when it can free something: the map
//! remembers a lower bound on its earliest expiry, so a map full of live keys costs one
//! comparison per refused key, not a scan.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use prometheus::IntCounter;

use super::{check_jti, counted, now_unix, LedgerError, LedgerSettings};

/// The per-replica budget store. Cloning shares the map.
#[derive(Clone, Debug)]
pub struct MemoryLedger {
    map: Arc<Mutex<Map>>,
    max_entries: usize,
    errors: Option<IntCounter>,
}

#[derive(Debug, Default)]
struct Map {
    entries: HashMap<Box<str>, Entry>,
    /// No entry expires before this (it may be stale-low after an expiry moved later, which
    /// only costs one sweep that finds less than hoped and then recomputes it).
    earliest_expiry: u64,
}

#[derive(Debug, Clone, Copy)]
struct Entry {
    used: u64,
    expires_at: u64,
}

impl Entry {
    fn live(&self, now: u64) -> bool {
        now < self.expires_at
    }
}

impl MemoryLedger {
    /// An empty store holding at most `settings.max_entries` keys.
    pub fn new(settings: LedgerSettings) -> Self {
        Self {
            map: Arc::new(Mutex::new(Map { entries: HashMap::new(), earliest_expiry: u64::MAX })),
            max_entries: settings.max_entries,
            errors: settings.errors,
        }
    }

    /// Tokens charged to `jti` and not yet expired; [`LedgerError::Full`] for a key not held
    /// while the map is full of live keys, since its charge could not be recorded.
    pub fn used(&self, jti: &str) -> Result<u64, LedgerError> {
        counted(&self.errors, self.used_at(jti, now_unix()))
    }

    /// Adds `tokens` to `jti`'s total, expiring at `expires_at_unix`; returns the new total.
    pub fn charge(&self, jti: &str, tokens: u64, expires_at_unix: u64) -> Result<u64, LedgerError> {
        counted(&self.errors, self.charge_at(jti, tokens, expires_at_unix, now_unix()))
    }

    /// Keys held now, expired ones not yet swept included.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// True if no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, Map> {
        // Nothing panics while holding the lock, and every update is a single assignment, so a
        // poisoned map is still consistent.
        self.map.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn used_at(&self, jti: &str, now: u64) -> Result<u64, LedgerError> {
        check_jti(jti)?;
        let mut map = self.lock();
        match map.entries.get(jti) {
            Some(e) if e.live(now) => Ok(e.used),
            Some(_) => {
                map.entries.remove(jti);
                Ok(0)
            }
            None => {
                // A new key could not be charged: refuse it now, not after its request ran.
                if map.entries.len() >= self.max_entries {
                    map.sweep(now);
                    if map.entries.len() >= self.max_entries {
                        return Err(LedgerError::Full { max_entries: self.max_entries });
                    }
                }
                Ok(0)
            }
        }
    }

    fn charge_at(&self, jti: &str, tokens: u64, expires_at: u64, now: u64) -> Result<u64, LedgerError> {
        check_jti(jti)?;
        let mut map = self.lock();
        if let Some(e) = map.entries.get_mut(jti) {
            let used = if e.live(now) { e.used.saturating_add(tokens) } else { tokens };
            if now < expires_at {
                *e = Entry { used, expires_at };
                map.earliest_expiry = map.earliest_expiry.min(expires_at);
            } else {
                map.entries.remove(jti);
            }
            return Ok(used);
        }
        if now >= expires_at {
            // Already expired (a request that finished after its key's last valid second): like
            // Redis's EXPIREAT in the past, nothing is kept.
            return Ok(tokens);
        }
        if map.entries.len() >= self.max_entries {
            map.sweep(now);
            if map.entries.len() >= self.max_entries {
                return Err(LedgerError::Full { max_entries: self.max_entries });
            }
        }
        map.entries.insert(jti.into(), Entry { used: tokens, expires_at });
        map.earliest_expiry = map.earliest_expiry.min(expires_at);
        Ok(tokens)
    }
}

impl Map {
    /// Drops every expired entry, if any can have expired.
    fn sweep(&mut self, now: u64) {
        if now < self.earliest_expiry {
            return;
        }
        let mut earliest = u64::MAX;
        self.entries.retain(|_, e| {
            let keep = e.live(now);
            if keep {
                earliest = earliest.min(e.expires_at);
            }
            keep
        });
        self.earliest_expiry = earliest;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000;
    const EXP: u64 = T0 + 600;

    fn ledger(max_entries: usize) -> MemoryLedger {
        MemoryLedger::new(LedgerSettings { max_entries, ..LedgerSettings::default() })
    }

    #[test]
    fn admits_below_the_budget_lets_the_crossing_request_complete_then_refuses() {
        let l = ledger(10);
        let budget = 100;
        assert_eq!(l.used_at("k", T0).unwrap(), 0);
        assert!(super::super::admits(l.used_at("k", T0).unwrap(), budget));
        assert_eq!(l.charge_at("k", 60, EXP, T0).unwrap(), 60);
        assert!(super::super::admits(l.used_at("k", T0).unwrap(), budget), "60 < 100: admitted");
        // This request was admitted at 60 and uses 70: it completes and is charged in full.
        assert_eq!(l.charge_at("k", 70, EXP, T0 + 1).unwrap(), 130);
        assert_eq!(l.used_at("k", T0 + 1).unwrap(), 130);
        assert!(!super::super::admits(l.used_at("k", T0 + 1).unwrap(), budget), "later requests refused");
        assert_eq!(l.used_at("other", T0).unwrap(), 0, "keys are separate");
    }

    #[test]
    fn entries_expire_at_exp() {
        let l = ledger(10);
        l.charge_at("k", 5, EXP, T0).unwrap();
        assert_eq!(l.used_at("k", EXP - 1).unwrap(), 5);
        assert_eq!(l.used_at("k", EXP).unwrap(), 0);
        assert_eq!(l.len(), 0, "an expired entry met by a read is dropped");
        // A charge after expiry starts over rather than adding to the old total.
        l.charge_at("k", 5, EXP, T0).unwrap();
        assert_eq!(l.charge_at("k", 7, EXP + 600, EXP).unwrap(), 7);
        assert_eq!(l.used_at("k", EXP + 599).unwrap(), 7);
    }

    #[test]
    fn each_charge_sets_the_expiry_again() {
        let l = ledger(10);
        l.charge_at("k", 5, EXP, T0).unwrap();
        l.charge_at("k", 5, EXP + 100, T0 + 1).unwrap();
        assert_eq!(l.used_at("k", EXP + 50).unwrap(), 10);
    }

    #[test]
    fn a_charge_past_exp_keeps_nothing() {
        let l = ledger(10);
        assert_eq!(l.charge_at("k", 5, T0, T0).unwrap(), 5);
        assert!(l.is_empty());
        l.charge_at("k", 5, EXP, T0).unwrap();
        assert_eq!(l.charge_at("k", 5, T0 + 10, T0 + 10).unwrap(), 10);
        assert!(l.is_empty());
    }

    #[test]
    fn a_full_map_of_live_keys_refuses_new_keys_but_still_charges_known_ones() {
        let l = ledger(2);
        l.charge_at("a", 1, EXP, T0).unwrap();
        l.charge_at("b", 1, EXP, T0).unwrap();
        assert!(matches!(l.charge_at("c", 1, EXP, T0), Err(LedgerError::Full { max_entries: 2 })));
        assert_eq!(l.charge_at("a", 1, EXP, T0).unwrap(), 2, "a known key is never refused");
        assert_eq!(l.used_at("b", T0).unwrap(), 1, "nothing was evicted");
        assert!(
            matches!(l.used_at("c", T0), Err(LedgerError::Full { .. })),
            "a new key is refused at admission, before its request runs"
        );
        assert_eq!(l.used_at("a", T0).unwrap(), 2, "known keys are still admitted");
        assert_eq!(l.used_at("c", EXP).unwrap(), 0, "admitted again once expired keys make room");
    }

    #[test]
    fn a_full_map_makes_room_by_dropping_expired_keys_only() {
        let l = ledger(3);
        l.charge_at("short", 1, T0 + 10, T0).unwrap();
        l.charge_at("long1", 1, EXP, T0).unwrap();
        l.charge_at("long2", 1, EXP, T0).unwrap();
        assert!(l.charge_at("new", 1, EXP, T0 + 5).is_err(), "nothing has expired yet");
        assert_eq!(l.charge_at("new", 1, EXP, T0 + 10).unwrap(), 1, "the expired key made room");
        assert_eq!(l.len(), 3);
        assert_eq!(l.used_at("long1", T0 + 10).unwrap(), 1);
    }

    #[test]
    fn the_sweep_is_skipped_until_something_can_have_expired() {
        let l = ledger(1);
        l.charge_at("a", 1, EXP, T0).unwrap();
        assert!(l.charge_at("b", 1, EXP, T0).is_err());
        assert_eq!(l.lock().earliest_expiry, EXP);
        // A stale-low bound (the only key's expiry moved later) costs one sweep, then is exact.
        l.charge_at("a", 1, EXP + 100, T0).unwrap();
        assert_eq!(l.lock().earliest_expiry, EXP);
        assert!(l.charge_at("b", 1, EXP + 100, EXP).is_err());
        assert_eq!(l.lock().earliest_expiry, EXP + 100);
    }

    #[test]
    fn zero_entries_refuses_every_new_key() {
        let l = ledger(0);
        assert!(matches!(l.charge_at("a", 1, EXP, T0), Err(LedgerError::Full { .. })));
    }

    #[test]
    fn totals_saturate_instead_of_wrapping() {
        let l = ledger(1);
        l.charge_at("k", u64::MAX - 1, EXP, T0).unwrap();
        assert_eq!(l.charge_at("k", 5, EXP, T0).unwrap(), u64::MAX);
    }

    #[test]
    fn bad_jtis_are_refused_and_counted() {
        let errors = super::super::errors_counter();
        let l =
            MemoryLedger::new(LedgerSettings { errors: Some(errors.clone()), ..LedgerSettings::default() });
        assert!(matches!(l.used(""), Err(LedgerError::BadJti)));
        assert!(matches!(l.charge(&"x".repeat(300), 1, u64::MAX), Err(LedgerError::BadJti)));
        assert_eq!(errors.get(), 2);
        assert!(l.is_empty());
    }

    #[test]
    fn full_is_counted() {
        let errors = super::super::errors_counter();
        let l = MemoryLedger::new(LedgerSettings {
            max_entries: 1,
            errors: Some(errors.clone()),
            ..LedgerSettings::default()
        });
        l.charge("a", 1, u64::MAX).unwrap();
        assert!(l.charge("b", 1, u64::MAX).is_err());
        assert_eq!(errors.get(), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_charges_of_one_jti_sum_exactly() {
        let l = super::super::Ledger::Memory(ledger(10));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let l = l.clone();
                tokio::spawn(async move {
                    for _ in 0..500 {
                        l.charge("shared", 3, u64::MAX).await.unwrap();
                        tokio::task::yield_now().await;
                    }
                })
            })
            .collect();
        for t in tasks {
            tokio::time::timeout(std::time::Duration::from_secs(20), t).await.unwrap().unwrap();
        }
        assert_eq!(l.used("shared").await.unwrap(), 16 * 500 * 3);
    }
}
