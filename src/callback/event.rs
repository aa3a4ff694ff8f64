//! [`UsageEvent`]: what a receiver learns about one finished request. Counts, names and times
//! only: no prompt or completion text, no key, no header but `x-request-id`.

use std::fmt;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Serialize, Serializer};

/// A 128-bit random id, rendered as 32 lowercase hex digits. Each event carries one (`id`, the
/// key receivers dedupe on) and each batch one (`X-Sidekey-Batch-Id`); a retry resends both
/// unchanged.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct EventId(u128);

impl EventId {
    /// A fresh id from the operating system's CSPRNG: a collision would make a receiver drop a
    /// real event as a duplicate, so a per-thread PRNG with 64 bits of state is not enough.
    pub fn random() -> Self {
        let mut bytes = [0u8; 16];
        if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes).is_err() {
            // The OS source does not fail on any platform sidekey runs on; stay unique anyway.
            return Self(fastrand::u128(..));
        }
        Self(u128::from_be_bytes(bytes))
    }
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventId({self})")
    }
}

impl Serialize for EventId {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// How the request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// The response was delivered to the client in full.
    Completed,
    /// The client went away before the response ended.
    ClientAborted,
    /// Upstream failed: unreachable, timed out, cut the stream, or answered an error.
    UpstreamError,
    /// sidekey refused the request (policy, scope, budget) without calling upstream.
    Refused,
}

/// Token counts, as the response reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct EventUsage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    /// `null` when the response did not report it.
    pub cached_tokens: Option<u64>,
    /// `null` when the response did not report it.
    pub reasoning_tokens: Option<u64>,
}

impl From<crate::proxy::usage::Usage> for EventUsage {
    fn from(u: crate::proxy::usage::Usage) -> Self {
        Self {
            prompt_tokens: u.prompt,
            completion_tokens: u.completion,
            total_tokens: u.total,
            cached_tokens: u.cached,
            reasoning_tokens: u.reasoning,
        }
    }
}

/// One finished request. Every key is always present in the JSON (`null` when unknown), so a
/// receiver's schema does not depend on which features were in play.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsageEvent {
    /// Unique per event; a retried batch carries the same ids, so receivers dedupe on it.
    pub id: EventId,
    /// The signed key's `event_id` claim, echoed.
    pub event_id: Option<String>,
    /// The signed key's `jti`.
    pub jti: Option<String>,
    /// The end user (`sub` of a signed key).
    pub sub: Option<String>,
    /// The `[[clients]]` name the caller resolved to.
    pub client: Option<String>,
    /// The credential set that paid.
    pub set: Option<String>,
    /// From the response, else the request.
    pub model: Option<String>,
    /// The endpoint label, as in `sidekey_requests_total` (`chat_completions`, ...).
    pub endpoint: String,
    /// The status the client got.
    pub status: u16,
    pub stream: bool,
    /// `null` when the response carried no usage block.
    pub usage: Option<EventUsage>,
    pub outcome: Outcome,
    /// When sidekey received the request, RFC 3339 UTC with milliseconds.
    #[serde(serialize_with = "serialize_rfc3339")]
    pub started_at: SystemTime,
    /// From the request's arrival to the end of the response.
    pub duration_ms: u64,
    /// Until upstream's response headers; `null` when upstream was not reached.
    pub ttfb_ms: Option<u64>,
    /// The request's `x-request-id`.
    pub request_id: Option<String>,
}

impl UsageEvent {
    /// An event with a fresh [`EventId`], started now, outcome `completed`, every other field
    /// empty: the request path fills in what it knows.
    pub fn new() -> Self {
        Self {
            id: EventId::random(),
            event_id: None,
            jti: None,
            sub: None,
            client: None,
            set: None,
            model: None,
            endpoint: String::new(),
            status: 0,
            stream: false,
            usage: None,
            outcome: Outcome::Completed,
            started_at: SystemTime::now(),
            duration_ms: 0,
            ttfb_ms: None,
            request_id: None,
        }
    }

    /// Cuts every string to [`MAX_FIELD_BYTES`] (at a character boundary). Some come from the
    /// caller (`x-request-id`, a request's `model`), and the queue bounds events, not bytes:
    /// this keeps `max_queue` events a bounded amount of memory.
    pub(crate) fn bound(&mut self) {
        for field in [
            &mut self.event_id,
            &mut self.jti,
            &mut self.sub,
            &mut self.client,
            &mut self.set,
            &mut self.model,
            &mut self.request_id,
        ]
        .into_iter()
        .flatten()
        .chain([&mut self.endpoint])
        {
            if field.len() > MAX_FIELD_BYTES {
                let mut end = MAX_FIELD_BYTES;
                while !field.is_char_boundary(end) {
                    end -= 1;
                }
                field.truncate(end);
            }
        }
    }
}

/// The longest string an event carries, in bytes; longer ones are cut.
pub const MAX_FIELD_BYTES: usize = 256;

/// Same as [`UsageEvent::new`]: a fresh id every time.
impl Default for UsageEvent {
    fn default() -> Self {
        Self::new()
    }
}

fn serialize_rfc3339<S: Serializer>(t: &SystemTime, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&rfc3339(*t))
}

/// `t` as RFC 3339 UTC with milliseconds, e.g. `2024-05-01T12:00:00.250Z`. Times before 1970
/// print as the epoch, times past year 9999 as its last millisecond (RFC 3339 has four-digit
/// years).
pub fn rfc3339(t: SystemTime) -> String {
    const MAX: Duration = Duration::from_millis(253_402_300_799_999); // 9999-12-31T23:59:59.999Z
    let since = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).min(MAX);
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar (Howard
/// Hinnant's `civil_from_days`, for non-negative days).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365], from March 1
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs: u64, millis: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs) + Duration::from_millis(millis)
    }

    #[test]
    fn rfc3339_known_instants() {
        for (t, want) in [
            (at(0, 0), "1970-01-01T00:00:00.000Z"),
            (at(951_782_400, 0), "2000-02-29T00:00:00.000Z"),
            (at(951_868_799, 999), "2000-02-29T23:59:59.999Z"),
            (at(1_700_000_000, 5), "2023-11-14T22:13:20.005Z"),
            (at(1_709_251_199, 0), "2024-02-29T23:59:59.000Z"),
            (at(4_102_444_800, 0), "2100-01-01T00:00:00.000Z"),
            (at(253_402_300_799, 999), "9999-12-31T23:59:59.999Z"),
            (at(300_000_000_000, 0), "9999-12-31T23:59:59.999Z"),
            (UNIX_EPOCH - Duration::from_secs(1), "1970-01-01T00:00:00.000Z"),
        ] {
            assert_eq!(rfc3339(t), want);
        }
    }

    proptest::proptest! {
        /// The date and time agree with `httpdate` (an independent calendar) everywhere.
        #[test]
        fn rfc3339_agrees_with_httpdate(secs in 0u64..253_402_300_799, millis in 0u64..1000) {
            let t = at(secs, millis);
            let http = httpdate::fmt_http_date(t); // "Sun, 06 Nov 1994 08:49:37 GMT"
            let months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"];
            let expect = format!(
                "{}-{:02}-{}T{}.{millis:03}Z",
                &http[12..16],
                months.iter().position(|mo| *mo == &http[8..11]).unwrap() + 1,
                &http[5..7],
                &http[17..25],
            );
            proptest::prop_assert_eq!(rfc3339(t), expect);
        }
    }

    #[test]
    fn long_strings_are_cut_at_a_character_boundary() {
        let mut e = UsageEvent {
            model: Some("m".repeat(300)),
            request_id: Some(format!("{}é", "r".repeat(255))), // 'é' straddles byte 256
            sub: Some("user-42".into()),
            endpoint: "e".repeat(1000),
            ..UsageEvent::new()
        };
        e.bound();
        assert_eq!(e.model.as_deref(), Some("m".repeat(256).as_str()));
        assert_eq!(e.request_id.as_deref(), Some("r".repeat(255).as_str()));
        assert_eq!(e.sub.as_deref(), Some("user-42"));
        assert_eq!(e.endpoint.len(), 256);
    }

    #[test]
    fn ids_are_32_hex_digits_and_distinct() {
        let ids: std::collections::HashSet<String> =
            (0..1000).map(|_| EventId::random().to_string()).collect();
        assert_eq!(ids.len(), 1000);
        for id in &ids {
            assert_eq!(id.len(), 32);
            assert!(id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)), "{id}");
        }
        assert_eq!(EventId(0xab).to_string(), format!("{}ab", "0".repeat(30)));
    }

    #[test]
    fn serializes_every_key_with_snake_case_outcomes() {
        let mut e = UsageEvent { endpoint: "chat_completions".into(), status: 200, ..UsageEvent::new() };
        e.started_at = at(1_700_000_000, 250);
        e.outcome = Outcome::ClientAborted;
        e.usage = Some(
            crate::proxy::usage::Usage {
                prompt: 3,
                completion: 4,
                total: 7,
                cached: Some(1),
                reasoning: None,
            }
            .into(),
        );
        let json = serde_json::to_value(&e).unwrap();
        assert_eq!(json["id"], e.id.to_string());
        assert_eq!(json["started_at"], "2023-11-14T22:13:20.250Z");
        assert_eq!(json["outcome"], "client_aborted");
        assert_eq!(json["usage"]["total_tokens"], 7);
        assert_eq!(json["usage"]["cached_tokens"], 1);
        assert!(json["usage"]["reasoning_tokens"].is_null());
        let keys: Vec<&str> = json.as_object().unwrap().keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "id",
                "event_id",
                "jti",
                "sub",
                "client",
                "set",
                "model",
                "endpoint",
                "status",
                "stream",
                "usage",
                "outcome",
                "started_at",
                "duration_ms",
                "ttfb_ms",
                "request_id"
            ]
        );
        for (o, s) in [
            (Outcome::Completed, "completed"),
            (Outcome::ClientAborted, "client_aborted"),
            (Outcome::UpstreamError, "upstream_error"),
            (Outcome::Refused, "refused"),
        ] {
            assert_eq!(serde_json::to_value(o).unwrap(), s);
        }
    }
}
