//! The process-wide budget for request-body bytes held in memory (`server.max_buffered_bytes`):
//! bodies read whole for the policy and the copies kept for a 401 replay share it, so no number
//! of slow or stalled uploads can hold more than the budget.
//!
//! Reserving is one compare-and-swap on a shared counter, and only requests that buffer pay it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use prometheus::IntGauge;

/// A cheap-to-clone handle on the shared budget.
#[derive(Clone, Debug)]
pub struct ByteBudget {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    limit: u64,
    used: AtomicU64,
    /// `sidekey_buffered_request_bytes`, kept equal to `used`.
    gauge: Option<IntGauge>,
}

impl ByteBudget {
    pub fn new(limit: u64, gauge: Option<IntGauge>) -> Self {
        Self { inner: Arc::new(Inner { limit, used: AtomicU64::new(0), gauge }) }
    }

    /// Bytes reserved right now.
    pub fn used(&self) -> u64 {
        self.inner.used.load(Ordering::Acquire)
    }

    /// An empty reservation that can grow.
    pub fn reservation(&self) -> Reservation {
        Reservation { budget: self.clone(), bytes: 0 }
    }

    /// Takes `n` bytes if they fit.
    fn take(&self, n: u64) -> bool {
        let inner = &*self.inner;
        let taken = inner
            .used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&total| total <= inner.limit)
            })
            .is_ok();
        if taken {
            if let Some(g) = &inner.gauge {
                g.add(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        taken
    }

    fn give_back(&self, n: u64) {
        if n == 0 {
            return;
        }
        self.inner.used.fetch_sub(n, Ordering::AcqRel);
        if let Some(g) = &self.inner.gauge {
            g.sub(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }
}

/// Bytes held against the budget; given back when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: ByteBudget,
    bytes: u64,
}

impl Reservation {
    /// Grows the reservation by `n` bytes; false (and unchanged) if the budget cannot cover them.
    pub fn grow(&mut self, n: u64) -> bool {
        if n == 0 || self.budget.take(n) {
            self.bytes += n;
            true
        } else {
            false
        }
    }

    /// Grows the reservation to at least `total` bytes.
    pub fn ensure(&mut self, total: u64) -> bool {
        self.grow(total.saturating_sub(self.bytes))
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give_back(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_share_the_limit_and_give_back_on_drop() {
        let budget = ByteBudget::new(100, None);
        let mut a = budget.reservation();
        let mut b = budget.reservation();
        assert!(a.grow(60));
        assert!(!b.grow(41), "over the limit");
        assert_eq!(b.bytes(), 0);
        assert!(b.grow(40));
        assert_eq!(budget.used(), 100);
        assert!(!a.grow(1));
        drop(a);
        assert_eq!(budget.used(), 40);
        assert!(b.ensure(100));
        assert!(b.ensure(50), "already covered");
        assert_eq!(b.bytes(), 100);
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[test]
    fn no_overflow_near_u64_max() {
        let budget = ByteBudget::new(u64::MAX, None);
        let mut a = budget.reservation();
        assert!(a.grow(u64::MAX - 1));
        assert!(!budget.reservation().grow(2));
    }

    #[test]
    fn concurrent_reservations_never_exceed_the_limit() {
        let budget = ByteBudget::new(1000, None);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let budget = budget.clone();
                std::thread::spawn(move || {
                    let mut held = Vec::new();
                    for _ in 0..1000 {
                        let mut r = budget.reservation();
                        if r.grow(7) {
                            assert!(budget.used() <= 1000);
                            held.push(r);
                        }
                        if held.len() > 10 {
                            held.clear();
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(budget.used(), 0);
    }
}
