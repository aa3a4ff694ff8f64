//! Pure schedule arithmetic: when to refresh a token, and how long to back off after a failure.
//! Randomness is passed in (`jitter` in `[0, 1)`), so every case is a plain unit test.

use std::time::Duration;

/// How long after a token was requested to start refreshing it.
///
/// Counted on the token's usable life (its lifetime less the expiry margin, after which it is
/// never sent): the refresh starts `refresh_before` before expiry, but never before half the
/// usable life has passed, so a short-lived token keeps half its usable life for retries. Up to a
/// tenth of the lead is taken off at random, so a fleet of sidecars does not refresh in lockstep.
pub fn refresh_after(
    lifetime: Duration,
    refresh_before: Duration,
    margin: Duration,
    jitter: f64,
) -> Duration {
    let usable = lifetime.saturating_sub(margin);
    let lead = refresh_before.saturating_sub(margin).min(usable / 2);
    let spread = lead.mul_f64(0.1 * jitter.clamp(0.0, 1.0));
    usable.saturating_sub(lead).saturating_sub(spread)
}

/// Delay before retry number `attempt` (1 for the first retry): `initial` doubling up to `max`,
/// with "equal jitter" (between half and all of the step), never below a server's `Retry-After`.
pub fn backoff(
    attempt: u32,
    initial: Duration,
    max: Duration,
    jitter: f64,
    retry_after: Option<Duration>,
) -> Duration {
    let exp = attempt.saturating_sub(1).min(32);
    let step = initial.saturating_mul(1u32 << exp.min(31)).min(max);
    let delay = step / 2 + (step / 2).mul_f64(jitter.clamp(0.0, 1.0));
    match retry_after {
        // A server's request is honoured, within reason: never more than ten minutes.
        Some(ra) => delay.max(ra.min(Duration::from_secs(600))),
        None => delay,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: fn(u64) -> Duration = Duration::from_secs;

    #[test]
    fn one_hour_token_refreshes_five_minutes_early() {
        assert_eq!(refresh_after(S(3600), S(300), S(5), 0.0), S(3300));
        // jitter takes off at most a tenth of the lead
        assert_eq!(refresh_after(S(3600), S(300), S(5), 1.0), Duration::from_millis(3_270_500));
    }

    #[test]
    fn short_token_refreshes_at_half_its_usable_life() {
        assert_eq!(refresh_after(S(60), S(300), S(0), 0.0), S(30));
        assert_eq!(refresh_after(S(60), S(300), S(5), 0.0), Duration::from_millis(27_500));
        // 10 s tokens with the default 5 s margin: replaced at 2.5 s, unusable from 5 s
        assert_eq!(refresh_after(S(10), S(300), S(5), 0.0), Duration::from_millis(2_500));
        assert_eq!(refresh_after(S(4), S(300), S(0), 0.0), S(2));
    }

    /// The worked examples in the README's token lifecycle section.
    #[test]
    fn the_readme_examples_hold() {
        let ms = Duration::from_millis;
        assert_eq!(refresh_after(S(3600), S(300), S(5), 0.0), S(3300));
        assert_eq!(refresh_after(S(3600), S(300), S(5), 1.0), ms(3_270_500));
        assert_eq!(refresh_after(S(60), S(300), S(5), 0.0), ms(27_500));
        assert_eq!(refresh_after(S(60), S(300), S(5), 1.0), ms(24_750));
    }

    #[test]
    fn zero_lifetime_refreshes_at_once() {
        assert_eq!(refresh_after(Duration::ZERO, S(300), S(5), 0.5), Duration::ZERO);
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let i = S(1);
        let m = S(30);
        assert_eq!(backoff(1, i, m, 1.0, None), S(1));
        assert_eq!(backoff(2, i, m, 1.0, None), S(2));
        assert_eq!(backoff(3, i, m, 1.0, None), S(4));
        assert_eq!(backoff(6, i, m, 1.0, None), S(30));
        assert_eq!(backoff(100, i, m, 1.0, None), S(30));
        assert_eq!(backoff(1, i, m, 0.0, None), Duration::from_millis(500));
    }

    #[test]
    fn backoff_honours_retry_after_within_reason() {
        assert_eq!(backoff(1, S(1), S(30), 0.0, Some(S(7))), S(7));
        assert_eq!(backoff(6, S(1), S(30), 1.0, Some(S(2))), S(30));
        assert_eq!(backoff(1, S(1), S(30), 0.0, Some(S(86_400))), S(600));
    }
}

#[cfg(test)]
mod proptests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn refresh_is_before_the_token_stops_being_usable(life in 0u64..100_000, before in 0u64..10_000,
                                                         margin in 0u64..60, jitter in 0.0f64..1.0) {
            let (life, before, margin) = (Duration::from_secs(life), Duration::from_secs(before), Duration::from_secs(margin));
            let usable = life.saturating_sub(margin);
            let at = refresh_after(life, before, margin, jitter);
            prop_assert!(at <= usable);
            prop_assert!(at >= (usable / 2).mul_f64(0.9));
            prop_assert!(at >= usable.saturating_sub(before).saturating_sub(before / 10));
        }

        #[test]
        fn backoff_is_bounded(attempt in 0u32..200, initial_ms in 1u64..10_000, max_ms in 1u64..100_000,
                              jitter in 0.0f64..1.0, retry in proptest::option::of(0u64..100_000)) {
            let (initial, max) = (Duration::from_millis(initial_ms), Duration::from_millis(max_ms.max(initial_ms)));
            let d = backoff(attempt, initial, max, jitter, retry.map(Duration::from_secs));
            let ceiling = max.max(retry.map_or(Duration::ZERO, |r| Duration::from_secs(r.min(600))));
            prop_assert!(d <= ceiling);
            prop_assert!(d >= initial.min(max) / 2 || retry.is_some());
        }
    }
}
