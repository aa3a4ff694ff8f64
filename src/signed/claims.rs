//! The claims of a signed key: how they are read, the rules they must pass, and the refusals.
//!
//! Everything here is pure: the signature is already checked (see [`super::Verifier`]) and `now`
//! is passed in, so every rule is tested to the second.

use serde_json::{Map, Value};

/// Why a signed key was refused. `Display` is the message for the client: it names the rule,
/// never the key, a claim's value or the configured issuer or audience.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignedKeyError {
    /// `exp + leeway <= now`.
    #[error("signed key expired")]
    Expired,
    /// `nbf` (or `iat`) is later than `now + leeway`.
    #[error("signed key is not yet valid")]
    NotYetValid,
    /// No configured key verifies the signature.
    #[error("signed key signature does not verify")]
    BadSignature,
    /// `iss` is missing or differs from `signed_keys.issuer`.
    #[error("signed key issuer does not match")]
    WrongIssuer,
    /// `aud` is missing or does not contain `signed_keys.audience`.
    #[error("signed key audience does not match")]
    WrongAudience,
    /// `exp - iat` (or `exp - now` without `iat`) exceeds `signed_keys.max_lifetime_secs`.
    #[error("signed key lifetime exceeds the maximum of {max_secs} seconds")]
    LifetimeTooLong { max_secs: u64 },
    /// Not a JWT, an algorithm other than the configured key's, a claim of the wrong type, no
    /// `exp`, or `budget_tokens` without `jti`. The detail is a fixed phrase, never input.
    #[error("malformed signed key: {0}")]
    Malformed(&'static str),
}

impl SignedKeyError {
    /// The `result` label of `sidekey_signed_keys_total` (one of [`super::RESULTS`]).
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::NotYetValid => "not_yet_valid",
            Self::BadSignature => "bad_signature",
            Self::WrongIssuer => "wrong_issuer",
            Self::WrongAudience => "wrong_audience",
            Self::LifetimeTooLong { .. } => "lifetime_too_long",
            Self::Malformed(_) => "malformed",
        }
    }
}

/// The claim rules from `[signed_keys]`.
#[derive(Debug, Clone)]
pub(crate) struct Rules {
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway_secs: u64,
    pub max_lifetime_secs: u64,
}

/// A verified signed key: its claims, checked. It never holds the token or its signature, so
/// `Debug` shows nothing that could be replayed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedKey {
    exp: u64,
    valid_until: u64,
    iat: Option<u64>,
    nbf: Option<u64>,
    iss: Option<String>,
    jti: Option<String>,
    sub: Option<String>,
    event_id: Option<String>,
    models: Option<Vec<String>>,
    max_tokens: Option<u64>,
    budget_tokens: Option<u64>,
    client: Option<String>,
}

impl SignedKey {
    /// `exp`, seconds since the Unix epoch.
    pub fn exp(&self) -> u64 {
        self.exp
    }

    /// `exp + leeway_secs`: the last second this key is accepted. A budget entry must live until
    /// then, or the key would get a fresh budget during the leeway.
    pub fn valid_until(&self) -> u64 {
        self.valid_until
    }

    /// `iat`, when the key has one.
    pub fn iat(&self) -> Option<u64> {
        self.iat
    }

    /// `nbf`, when the key has one.
    pub fn nbf(&self) -> Option<u64> {
        self.nbf
    }

    /// `iss`, when the key has one.
    pub fn issuer(&self) -> Option<&str> {
        self.iss.as_deref()
    }

    /// `jti`: the key's id, and the budget's key. Always present when [`Self::budget_tokens`] is.
    pub fn jti(&self) -> Option<&str> {
        self.jti.as_deref()
    }

    /// `sub`: the end user, for logs and the usage callback.
    pub fn sub(&self) -> Option<&str> {
        self.sub.as_deref()
    }

    /// `event_id`: echoed in the usage callback.
    pub fn event_id(&self) -> Option<&str> {
        self.event_id.as_deref()
    }

    /// `model` as patterns (exact names or `*`/`?` globs); `None` when the key does not narrow
    /// the models. Never an empty list.
    pub fn models(&self) -> Option<&[String]> {
        self.models.as_deref()
    }

    /// True if the key may use `model`: no `model` claim, or any of its patterns matches.
    pub fn allows_model(&self, model: &str) -> bool {
        match &self.models {
            None => true,
            Some(patterns) => {
                patterns.iter().any(|p| crate::proxy::inspect::glob_match(p.as_bytes(), model.as_bytes()))
            }
        }
    }

    /// `max_tokens`: the cap per request (never 0).
    pub fn max_tokens(&self) -> Option<u64> {
        self.max_tokens
    }

    /// `budget_tokens`: the total this key may consume across all its requests (never 0).
    pub fn budget_tokens(&self) -> Option<u64> {
        self.budget_tokens
    }

    /// `client`: the name of a configured client whose policy applies under the key's limits.
    /// Not checked here: the verifier does not know the client table.
    pub fn client(&self) -> Option<&str> {
        self.client.as_deref()
    }
}

/// Reads the claims and applies the rules. The first failing rule wins, in this order: claim
/// shapes (malformed), issuer, audience, expiry, not-before (`nbf`, then `iat`), lifetime.
pub(crate) fn check(
    claims: &Map<String, Value>,
    rules: &Rules,
    now: u64,
) -> Result<SignedKey, SignedKeyError> {
    use SignedKeyError::*;

    let exp = date(claims, "exp", "exp is not a number of seconds")?.ok_or(Malformed("exp is missing"))?;
    let iat = date(claims, "iat", "iat is not a number of seconds")?;
    let nbf = date(claims, "nbf", "nbf is not a number of seconds")?;
    let iss = string(claims, "iss", "iss is not a string")?;
    let aud = string_or_list(claims, "aud", "aud is not a string or a list of strings")?;
    let jti = string(claims, "jti", "jti is not a string")?;
    let sub = string(claims, "sub", "sub is not a string")?;
    let event_id = string(claims, "event_id", "event_id is not a string")?;
    let models = string_or_list(claims, "model", "model is not a string or a list of strings")?;
    let max_tokens = count(claims, "max_tokens", "max_tokens is not a positive integer")?;
    let budget_tokens = count(claims, "budget_tokens", "budget_tokens is not a positive integer")?;
    let client = string(claims, "client", "client is not a string")?;
    if jti.as_deref() == Some("") {
        return Err(Malformed("jti is empty"));
    }
    if client.as_deref() == Some("") {
        return Err(Malformed("client is empty"));
    }
    if models.as_ref().is_some_and(|m| m.is_empty() || m.iter().any(String::is_empty)) {
        return Err(Malformed("model is empty"));
    }
    // The budget is charged to the jti: without one there is nothing to charge.
    if budget_tokens.is_some() && jti.is_none() {
        return Err(Malformed("budget_tokens needs a jti"));
    }

    if let Some(want) = &rules.issuer {
        if iss.as_deref() != Some(want.as_str()) {
            return Err(WrongIssuer);
        }
    }
    if let Some(want) = &rules.audience {
        if !aud.as_ref().is_some_and(|a| a.iter().any(|a| a == want)) {
            return Err(WrongAudience);
        }
    }

    let leeway = rules.leeway_secs;
    let valid_until = exp.saturating_add(leeway);
    if valid_until <= now {
        return Err(Expired);
    }
    let latest_start = now.saturating_add(leeway);
    if nbf.is_some_and(|nbf| nbf > latest_start) {
        return Err(NotYetValid);
    }
    // An `iat` in the future would stretch the lifetime check below past the maximum.
    if iat.is_some_and(|iat| iat > latest_start) {
        return Err(NotYetValid);
    }
    // Without `iat` the key cannot prove when it was made: its remaining life must fit instead.
    let lifetime = exp.saturating_sub(iat.unwrap_or(now));
    if lifetime > rules.max_lifetime_secs {
        return Err(LifetimeTooLong { max_secs: rules.max_lifetime_secs });
    }

    Ok(SignedKey {
        exp,
        valid_until,
        iat,
        nbf,
        iss,
        jti,
        sub,
        event_id,
        models,
        max_tokens,
        budget_tokens,
        client,
    })
}

/// A claim that is absent or `null` reads as absent.
fn get<'a>(claims: &'a Map<String, Value>, name: &str) -> Option<&'a Value> {
    claims.get(name).filter(|v| !v.is_null())
}

/// A NumericDate: seconds since the epoch; fractions (some libraries write them) are dropped.
fn date(claims: &Map<String, Value>, name: &str, err: &'static str) -> Result<Option<u64>, SignedKeyError> {
    let Some(v) = get(claims, name) else { return Ok(None) };
    if let Some(n) = v.as_u64() {
        return Ok(Some(n));
    }
    match v.as_f64() {
        // `as` saturates: a date beyond u64 is far in the future, which the rules refuse.
        Some(f) if f.is_finite() && f >= 0.0 => Ok(Some(f as u64)),
        _ => Err(SignedKeyError::Malformed(err)),
    }
}

fn string(
    claims: &Map<String, Value>,
    name: &str,
    err: &'static str,
) -> Result<Option<String>, SignedKeyError> {
    match get(claims, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(SignedKeyError::Malformed(err)),
    }
}

fn string_or_list(
    claims: &Map<String, Value>,
    name: &str,
    err: &'static str,
) -> Result<Option<Vec<String>>, SignedKeyError> {
    match get(claims, name) {
        None => Ok(None),
        Some(Value::String(s)) => Ok(Some(vec![s.clone()])),
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_owned).ok_or(SignedKeyError::Malformed(err)))
            .collect::<Result<Vec<_>, _>>()
            .map(Some),
        Some(_) => Err(SignedKeyError::Malformed(err)),
    }
}

/// A positive integer: a cap or budget of 0 would refuse every request, so it is a minting
/// mistake, reported as such.
fn count(claims: &Map<String, Value>, name: &str, err: &'static str) -> Result<Option<u64>, SignedKeyError> {
    match get(claims, name) {
        None => Ok(None),
        Some(v) => v.as_u64().filter(|&n| n > 0).map(Some).ok_or(SignedKeyError::Malformed(err)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use SignedKeyError::*;

    const NOW: u64 = 1_700_000_000;

    fn rules() -> Rules {
        Rules { issuer: None, audience: None, leeway_secs: 30, max_lifetime_secs: 3600 }
    }

    fn run(claims: Value, rules: &Rules, now: u64) -> Result<SignedKey, SignedKeyError> {
        check(claims.as_object().expect("claims are an object"), rules, now)
    }

    #[test]
    fn every_claim_is_read() {
        let key = run(
            json!({
                "exp": NOW + 600, "iat": NOW, "nbf": NOW - 5, "iss": "backend", "aud": ["x", "sidekey"],
                "jti": "k-1", "sub": "user-42", "event_id": "ev-1", "model": ["GigaChat/*", "gpt-4o"],
                "max_tokens": 512, "budget_tokens": 20000, "client": "mobile", "extra": {"ignored": true}
            }),
            &Rules { issuer: Some("backend".into()), audience: Some("sidekey".into()), ..rules() },
            NOW,
        )
        .unwrap();
        assert_eq!(
            (key.exp(), key.valid_until(), key.iat(), key.nbf()),
            (NOW + 600, NOW + 630, Some(NOW), Some(NOW - 5))
        );
        assert_eq!(
            (key.issuer(), key.jti(), key.sub(), key.event_id()),
            (Some("backend"), Some("k-1"), Some("user-42"), Some("ev-1"))
        );
        assert_eq!(key.models(), Some(&["GigaChat/*".to_string(), "gpt-4o".to_string()][..]));
        assert_eq!(
            (key.max_tokens(), key.budget_tokens(), key.client()),
            (Some(512), Some(20000), Some("mobile"))
        );
    }

    #[test]
    fn only_exp_is_required() {
        let key = run(json!({"exp": NOW + 60}), &rules(), NOW).unwrap();
        assert_eq!(
            (key.iat(), key.jti(), key.models(), key.max_tokens(), key.budget_tokens()),
            (None, None, None, None, None)
        );
        assert!(key.allows_model("anything/at-all"));
        assert_eq!(run(json!({"iat": NOW}), &rules(), NOW), Err(Malformed("exp is missing")));
        assert_eq!(run(json!({"exp": null}), &rules(), NOW), Err(Malformed("exp is missing")));
    }

    #[test]
    fn model_scope_uses_globs() {
        let key = run(json!({"exp": NOW + 60, "model": "GigaChat/*"}), &rules(), NOW).unwrap();
        assert!(key.allows_model("GigaChat/GigaChat-2-Max"));
        assert!(!key.allows_model("gpt-4o"));
        let key = run(json!({"exp": NOW + 60, "model": ["gpt-4o", "o?-mini"]}), &rules(), NOW).unwrap();
        assert!(key.allows_model("gpt-4o") && key.allows_model("o3-mini"));
        assert!(!key.allows_model("gpt-4o-mini") && !key.allows_model("o33-mini"));
    }

    #[test]
    fn expiry_with_leeway_to_the_second() {
        let r = rules();
        // Valid while exp + leeway > now.
        assert!(run(json!({"exp": NOW}), &r, NOW + 29).is_ok());
        assert_eq!(run(json!({"exp": NOW}), &r, NOW + 30), Err(Expired));
        let strict = Rules { leeway_secs: 0, ..rules() };
        assert_eq!(run(json!({"exp": NOW}), &strict, NOW), Err(Expired));
        assert!(run(json!({"exp": NOW + 1}), &strict, NOW).is_ok());
    }

    #[test]
    fn not_before_with_leeway_to_the_second() {
        let r = rules();
        assert!(run(json!({"exp": NOW + 600, "nbf": NOW + 30}), &r, NOW).is_ok());
        assert_eq!(run(json!({"exp": NOW + 600, "nbf": NOW + 31}), &r, NOW), Err(NotYetValid));
        // A backend clock ahead by less than the leeway still mints usable keys.
        assert!(run(json!({"exp": NOW + 600, "iat": NOW + 30}), &r, NOW).is_ok());
        assert_eq!(run(json!({"exp": NOW + 600, "iat": NOW + 31}), &r, NOW), Err(NotYetValid));
    }

    #[test]
    fn lifetime_is_bounded_with_or_without_iat() {
        let r = rules(); // max 3600
        assert!(run(json!({"exp": NOW + 3600, "iat": NOW}), &r, NOW).is_ok());
        assert_eq!(
            run(json!({"exp": NOW + 3601, "iat": NOW}), &r, NOW),
            Err(LifetimeTooLong { max_secs: 3600 })
        );
        // Checked on exp - iat, even when most of that life is already over.
        assert_eq!(
            run(json!({"exp": NOW + 100, "iat": NOW - 3501}), &r, NOW),
            Err(LifetimeTooLong { max_secs: 3600 })
        );
        // Without iat: what is left of the key must fit.
        assert!(run(json!({"exp": NOW + 3600}), &r, NOW).is_ok());
        assert_eq!(run(json!({"exp": NOW + 3601}), &r, NOW), Err(LifetimeTooLong { max_secs: 3600 }));
        // A ten-year key with an iat faked into the near future does not slip through.
        let faked = json!({"exp": NOW + 10 * 365 * 86400, "iat": NOW + 10 * 365 * 86400 - 60});
        assert_eq!(run(faked, &r, NOW), Err(NotYetValid));
    }

    #[test]
    fn issuer_and_audience_must_match_when_configured() {
        let r = Rules { issuer: Some("backend".into()), audience: Some("sidekey".into()), ..rules() };
        let ok = json!({"exp": NOW + 60, "iss": "backend", "aud": "sidekey"});
        assert!(run(ok, &r, NOW).is_ok());
        assert_eq!(
            run(json!({"exp": NOW + 60, "iss": "other", "aud": "sidekey"}), &r, NOW),
            Err(WrongIssuer)
        );
        assert_eq!(run(json!({"exp": NOW + 60, "aud": "sidekey"}), &r, NOW), Err(WrongIssuer));
        assert_eq!(
            run(json!({"exp": NOW + 60, "iss": "backend", "aud": "other"}), &r, NOW),
            Err(WrongAudience)
        );
        assert_eq!(
            run(json!({"exp": NOW + 60, "iss": "backend", "aud": ["a", "b"]}), &r, NOW),
            Err(WrongAudience)
        );
        assert_eq!(run(json!({"exp": NOW + 60, "iss": "backend"}), &r, NOW), Err(WrongAudience));
        assert!(run(json!({"exp": NOW + 60, "iss": "backend", "aud": ["a", "sidekey"]}), &r, NOW).is_ok());
        // Unconfigured: any or none.
        assert!(run(json!({"exp": NOW + 60, "iss": "x", "aud": "y"}), &rules(), NOW).is_ok());
    }

    #[test]
    fn a_budget_needs_a_jti() {
        assert_eq!(
            run(json!({"exp": NOW + 60, "budget_tokens": 100}), &rules(), NOW),
            Err(Malformed("budget_tokens needs a jti"))
        );
        assert!(run(json!({"exp": NOW + 60, "budget_tokens": 100, "jti": "a"}), &rules(), NOW).is_ok());
        assert!(
            run(json!({"exp": NOW + 60, "max_tokens": 100}), &rules(), NOW).is_ok(),
            "a cap alone needs none"
        );
    }

    #[test]
    fn claims_of_the_wrong_shape_are_malformed() {
        let cases = [
            json!({"exp": "soon"}),
            json!({"exp": -1}),
            json!({"exp": NOW + 60, "iat": "now"}),
            json!({"exp": NOW + 60, "nbf": true}),
            json!({"exp": NOW + 60, "iss": 1}),
            json!({"exp": NOW + 60, "aud": {"a": 1}}),
            json!({"exp": NOW + 60, "aud": [1]}),
            json!({"exp": NOW + 60, "jti": 7}),
            json!({"exp": NOW + 60, "jti": ""}),
            json!({"exp": NOW + 60, "sub": []}),
            json!({"exp": NOW + 60, "event_id": 1}),
            json!({"exp": NOW + 60, "model": 5}),
            json!({"exp": NOW + 60, "model": []}),
            json!({"exp": NOW + 60, "model": ["a", ""]}),
            json!({"exp": NOW + 60, "max_tokens": 0}),
            json!({"exp": NOW + 60, "max_tokens": -5}),
            json!({"exp": NOW + 60, "max_tokens": 1.5}),
            json!({"exp": NOW + 60, "max_tokens": "512"}),
            json!({"exp": NOW + 60, "budget_tokens": 0, "jti": "a"}),
            json!({"exp": NOW + 60, "client": ""}),
            json!({"exp": NOW + 60, "client": ["a"]}),
        ];
        for c in cases {
            let got = run(c.clone(), &rules(), NOW);
            assert!(matches!(got, Err(Malformed(_))), "{c} -> {got:?}");
        }
    }

    #[test]
    fn fractional_dates_are_floored() {
        let key = run(json!({"exp": NOW as f64 + 60.9, "iat": NOW as f64 + 0.5}), &rules(), NOW).unwrap();
        assert_eq!((key.exp(), key.iat()), (NOW + 60, Some(NOW)));
    }

    #[test]
    fn huge_dates_do_not_overflow() {
        assert_eq!(run(json!({"exp": u64::MAX}), &rules(), NOW), Err(LifetimeTooLong { max_secs: 3600 }));
        assert_eq!(run(json!({"exp": NOW + 60, "nbf": u64::MAX}), &rules(), NOW), Err(NotYetValid));
        assert!(run(json!({"exp": NOW + 60}), &rules(), u64::MAX).is_err());
    }

    #[test]
    fn reasons_are_the_metric_labels() {
        let all = [
            Expired,
            NotYetValid,
            BadSignature,
            WrongIssuer,
            WrongAudience,
            LifetimeTooLong { max_secs: 1 },
            Malformed("x"),
        ];
        let reasons: Vec<_> = all.iter().map(SignedKeyError::reason).collect();
        assert_eq!(
            reasons,
            [
                "expired",
                "not_yet_valid",
                "bad_signature",
                "wrong_issuer",
                "wrong_audience",
                "lifetime_too_long",
                "malformed"
            ]
        );
        for r in reasons {
            assert!(crate::signed::RESULTS.contains(&r), "{r} is pre-created");
        }
    }
}
