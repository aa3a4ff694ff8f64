//! Which credential to use: a pure state machine over (credential, outcome, now).
//!
//! Credential 0 is the primary. A rejected credential fails over to the next usable one at once;
//! `threshold` consecutive transient failures do too. While on a backup, the primary is probed at
//! most every `failback_after`, and a success on it switches back.

use std::time::Duration;

use tokio::time::Instant;

/// The classified result of one token fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Success,
    /// The token endpoint refused this credential (400/401/403, or its file is unreadable).
    Rejected,
    /// Anything that may pass: connect errors, timeouts, 429, 5xx, a bad response body.
    Transient,
}

/// What a recorded outcome changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Stay,
    Switch { from: usize, to: usize },
}

/// Failover state for an ordered list of credentials.
#[derive(Debug, Clone)]
pub struct Failover {
    active: usize,
    failures: Vec<u32>,
    rejected: Vec<bool>,
    threshold: u32,
    failback_after: Duration,
    next_probe: Option<Instant>,
}

impl Failover {
    /// `count` credentials (at least one), starting on the primary.
    pub fn new(count: usize, threshold: u32, failback_after: Duration) -> Self {
        let count = count.max(1);
        Self {
            active: 0,
            failures: vec![0; count],
            rejected: vec![false; count],
            threshold: threshold.max(1),
            failback_after,
            next_probe: None,
        }
    }

    /// The credential in use.
    pub fn active(&self) -> usize {
        self.active
    }

    /// When the primary should next be probed (only while on a backup).
    pub fn next_probe(&self) -> Option<Instant> {
        self.next_probe
    }

    /// True if it is time to try the primary again while on a backup.
    pub fn probe_due(&self, now: Instant) -> bool {
        self.next_probe.is_some_and(|at| now >= at)
    }

    /// True if every credential has been rejected.
    pub fn all_rejected(&self) -> bool {
        self.rejected.iter().all(|r| *r)
    }

    /// Forget what is known about `cred` (its file changed: a rotated secret deserves a chance).
    pub fn reset(&mut self, cred: usize) {
        if let Some(r) = self.rejected.get_mut(cred) {
            *r = false;
            self.failures[cred] = 0;
        }
    }

    /// Probe the primary at the next chance (its credential files changed).
    pub fn expedite_probe(&mut self, now: Instant) {
        if self.active != 0 {
            self.next_probe = Some(now);
        }
    }

    /// Records the outcome of a fetch with `cred` at `now`.
    pub fn record(&mut self, cred: usize, outcome: Outcome, now: Instant) -> Transition {
        if cred >= self.failures.len() {
            return Transition::Stay;
        }
        match outcome {
            Outcome::Success => {
                self.failures[cred] = 0;
                self.rejected[cred] = false;
                if cred == self.active {
                    return Transition::Stay;
                }
                self.switch_to(cred, now)
            }
            Outcome::Rejected => {
                self.rejected[cred] = true;
                self.failures[cred] = 0;
                if cred == self.active {
                    self.fail_over(now)
                } else {
                    self.probe_failed(cred, now);
                    Transition::Stay
                }
            }
            Outcome::Transient => {
                self.failures[cred] = self.failures[cred].saturating_add(1);
                if cred != self.active {
                    self.probe_failed(cred, now);
                    Transition::Stay
                } else if self.failures[cred] >= self.threshold {
                    self.fail_over(now)
                } else {
                    Transition::Stay
                }
            }
        }
    }

    fn probe_failed(&mut self, cred: usize, now: Instant) {
        if cred == 0 {
            self.next_probe = Some(now + self.failback_after);
        }
    }

    /// Moves to the next credential after the active one (wrapping) that is not rejected.
    fn fail_over(&mut self, now: Instant) -> Transition {
        let n = self.failures.len();
        let next = (1..n).map(|i| (self.active + i) % n).find(|&c| !self.rejected[c]);
        match next {
            Some(to) => self.switch_to(to, now),
            None => Transition::Stay,
        }
    }

    fn switch_to(&mut self, to: usize, now: Instant) -> Transition {
        let from = self.active;
        self.active = to;
        self.failures[from] = 0;
        self.failures[to] = 0;
        self.next_probe = if to == 0 {
            None
        } else {
            // Keep an earlier probe time when hopping between backups.
            Some(self.next_probe.unwrap_or(now + self.failback_after))
        };
        Transition::Switch { from, to }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Outcome::*;

    const FB: Duration = Duration::from_secs(300);

    fn fo(n: usize) -> (Failover, Instant) {
        (Failover::new(n, 3, FB), Instant::now())
    }

    #[test]
    fn success_on_primary_stays() {
        let (mut f, now) = fo(2);
        assert_eq!(f.record(0, Success, now), Transition::Stay);
        assert_eq!(f.active(), 0);
        assert_eq!(f.next_probe(), None);
    }

    #[test]
    fn rejection_fails_over_at_once_and_schedules_a_probe() {
        let (mut f, now) = fo(2);
        assert_eq!(f.record(0, Rejected, now), Transition::Switch { from: 0, to: 1 });
        assert_eq!(f.active(), 1);
        assert_eq!(f.next_probe(), Some(now + FB));
        assert!(!f.probe_due(now));
        assert!(f.probe_due(now + FB));
    }

    #[test]
    fn transient_failures_fail_over_at_the_threshold() {
        let (mut f, now) = fo(2);
        assert_eq!(f.record(0, Transient, now), Transition::Stay);
        assert_eq!(f.record(0, Transient, now), Transition::Stay);
        assert_eq!(f.record(0, Transient, now), Transition::Switch { from: 0, to: 1 });
    }

    #[test]
    fn a_success_resets_the_transient_count() {
        let (mut f, now) = fo(2);
        f.record(0, Transient, now);
        f.record(0, Transient, now);
        f.record(0, Success, now);
        assert_eq!(f.record(0, Transient, now), Transition::Stay);
        assert_eq!(f.record(0, Transient, now), Transition::Stay);
        assert_eq!(f.active(), 0);
    }

    #[test]
    fn failed_probe_reschedules_and_keeps_the_backup() {
        let (mut f, now) = fo(2);
        f.record(0, Rejected, now);
        let later = now + FB;
        assert_eq!(f.record(0, Transient, later), Transition::Stay);
        assert_eq!(f.active(), 1);
        assert_eq!(f.next_probe(), Some(later + FB));
        assert_eq!(f.record(0, Rejected, later + FB), Transition::Stay);
        assert_eq!(f.next_probe(), Some(later + FB + FB));
    }

    #[test]
    fn successful_probe_fails_back() {
        let (mut f, now) = fo(2);
        f.record(0, Rejected, now);
        assert_eq!(f.record(0, Success, now + FB), Transition::Switch { from: 1, to: 0 });
        assert_eq!(f.active(), 0);
        assert_eq!(f.next_probe(), None);
    }

    #[test]
    fn all_rejected_stays_put() {
        let (mut f, now) = fo(2);
        f.record(0, Rejected, now);
        assert_eq!(f.record(1, Rejected, now), Transition::Stay);
        assert!(f.all_rejected());
        assert_eq!(f.active(), 1);
    }

    #[test]
    fn backup_failures_wrap_to_the_primary_unless_rejected() {
        let (mut f, now) = fo(3);
        assert_eq!(f.record(0, Rejected, now), Transition::Switch { from: 0, to: 1 });
        assert_eq!(f.record(1, Rejected, now), Transition::Switch { from: 1, to: 2 });
        // the probe time set when leaving the primary is kept
        assert_eq!(f.next_probe(), Some(now + FB));
        for _ in 0..2 {
            assert_eq!(f.record(2, Transient, now), Transition::Stay);
        }
        // 0 and 1 are rejected: nowhere to go
        assert_eq!(f.record(2, Transient, now), Transition::Stay);
        f.reset(0);
        for _ in 0..3 {
            f.record(2, Transient, now);
        }
        assert_eq!(f.active(), 0);
        assert_eq!(f.next_probe(), None);
    }

    #[test]
    fn single_credential_never_switches() {
        let (mut f, now) = fo(1);
        for o in [Rejected, Transient, Transient, Transient, Success] {
            assert_eq!(f.record(0, o, now), Transition::Stay);
        }
    }

    #[test]
    fn out_of_range_credential_is_ignored() {
        let (mut f, now) = fo(2);
        assert_eq!(f.record(7, Rejected, now), Transition::Stay);
        assert_eq!(f.active(), 0);
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    fn outcome() -> impl Strategy<Value = Outcome> {
        prop_oneof![Just(Outcome::Success), Just(Outcome::Rejected), Just(Outcome::Transient)]
    }

    proptest! {
        /// Any sequence of outcomes keeps the machine consistent: the active credential exists,
        /// a probe is scheduled exactly while on a backup, and a switch never lands on a
        /// credential known to be rejected.
        #[test]
        fn invariants_hold(n in 1usize..5, steps in proptest::collection::vec((0usize..6, outcome(), 0u64..1000), 0..60)) {
            let start = Instant::now();
            let mut f = Failover::new(n, 3, Duration::from_secs(300));
            for (cred, o, secs) in steps {
                let t = f.record(cred, o, start + Duration::from_secs(secs));
                prop_assert!(f.active() < n);
                prop_assert_eq!(f.next_probe().is_some(), f.active() != 0);
                if let Transition::Switch { from, to } = t {
                    prop_assert!(from != to);
                    prop_assert!(!f.rejected[to]);
                }
            }
        }
    }
}
