//! IAM error bodies that echo the credential back, in every spelling servers use, never reach
//! the logs: sidekey logs the status, the body's length and the redacted values of the known
//! error fields, never the body. Every byte logged at TRACE level is scanned.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use support::*;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

// Short (so `Basic` of the pair is short too) and full of characters every encoding changes.
const KEY_ID: &str = "kí&Zq/7";
const SECRET: &str = "Sé&cr+t/9xK";

fn escaped(s: &str, each: impl Fn(char) -> String) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() { c.to_string() } else { each(c) }).collect()
}

fn percent_lower(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() { char::from(b).to_string() } else { format!("%{b:02x}") })
        .collect()
}

fn go_escaped(s: &str) -> String {
    escaped(s, |c| format!("\\u{:04x}", c as u32))
}

fn html_escaped(s: &str) -> String {
    escaped(s, |c| if c == '&' { "&amp;".into() } else { format!("&#{};", c as u32) })
}

fn base64(input: &[u8]) -> String {
    sidekey::token::iam::base64(input)
}

/// `(name, JSON error body)`: the echo spelled as Go's encoder, a lowercase percent-encoder, an
/// HTML escaper and a `Basic` header would spell it.
fn echo_bodies() -> Vec<(&'static str, String)> {
    let (go, html) = (go_escaped, html_escaped);
    let basic = base64(format!("{KEY_ID}:{SECRET}").as_bytes());
    vec![
        ("Go \\u escapes", format!(r#"{{"error":"invalid key {} with secret {}"}}"#, go(KEY_ID), go(SECRET))),
        (
            "lowercase percent-encoding",
            format!(
                r#"{{"error":"invalid_client","error_description":"keyId={}&secret={}"}}"#,
                percent_lower(KEY_ID),
                percent_lower(SECRET)
            ),
        ),
        (
            "HTML entities",
            format!(r#"{{"message":"<b>{}</b> / {}","code":401}}"#, html(SECRET), html(KEY_ID)),
        ),
        ("short Basic", format!(r#"{{"error":{{"message":"bad header Basic {basic}","code":"denied"}}}}"#)),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echoed_credentials_never_reach_the_logs() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let bodies = echo_bodies();
    let up = FakeUpstream::ok().await;
    for (i, (name, body)) in bodies.iter().enumerate() {
        let iam = FakeIam::start().await;
        let body: &'static str = Box::leak(body.clone().into_boxed_str());
        // Rejections and transient failures carry the body alike.
        let status = if i % 2 == 0 { 401 } else { 503 };
        iam.set(KEY_ID, Iam::Status(status, body, None));
        let mut cfg = config(&iam, &up.base_url());
        cfg.auth.credentials = vec![credential("primary", KEY_ID, SECRET)];
        let sc = start_sidecar(cfg).await;
        let metrics = sc.metrics.clone();
        let failed =
            || metrics.token_refresh_total.with_label_values(&["default", "primary", "failure"]).get();
        eventually(name, || failed() >= 1).await;
        let readyz = client().get(sc.admin_url("/readyz")).send().await.unwrap().text().await.unwrap();
        assert!(!readyz.contains(SECRET) && !readyz.contains(KEY_ID), "{name}: {readyz}");
        sc.shutdown().await;
    }

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    // No run of five characters of the key id or the secret, in any case, nor any echo as sent.
    let lower = logs.to_lowercase();
    let mut needles: Vec<String> = [KEY_ID, SECRET]
        .iter()
        .flat_map(|s| {
            let chars: Vec<char> = s.to_lowercase().chars().collect();
            chars.windows(5).map(|w| w.iter().collect::<String>()).collect::<Vec<_>>()
        })
        .collect();
    for s in [KEY_ID, SECRET] {
        needles.extend([go_escaped(s), percent_lower(s), html_escaped(s)]);
    }
    needles.push(base64(format!("{KEY_ID}:{SECRET}").as_bytes()));
    for needle in &needles {
        assert!(!lower.contains(&needle.to_lowercase()), "the logs contain {needle:?}:\n{logs}");
    }
    let failures: Vec<&str> = logs.lines().filter(|l| l.contains("Token fetch failed")).collect();
    assert!(failures.len() >= bodies.len(), "every variant was logged: {logs}");
    assert!(failures.iter().all(|l| l.contains("-byte body")), "the summary is logged: {failures:#?}");
    assert!(logs.contains("[redacted]"), "the echoes were found and redacted");
}
