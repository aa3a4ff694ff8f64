//! Secrets never leak: a full scenario at TRACE level (rejection with an IAM error body that echoes
//! the credential, failover, 401 replay, access logs, an outage), then every byte sidekey logged,
//! answered or rendered is scanned for key ids, secrets and tokens.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_key_id_or_token_in_logs_responses_metrics_or_debug() {
    let capture = Capture::default();
    let writer = capture.clone();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();

    let iam = FakeIam::start().await;
    // The IAM error body echoes the credential back, as some servers do.
    let echo: &'static str = Box::leak(
        format!(r#"{{"error":"invalid keyId {PRIMARY_KEY} with secret {PRIMARY_SECRET}"}}"#).into_boxed_str(),
    );
    iam.set(PRIMARY_KEY, Iam::Status(401, echo, None));
    // The upstream rejects the first token it sees and echoes the Authorization header back.
    let iam2 = iam.clone();
    let up = FakeUpstream::start(move |req| {
        let iam = iam2.clone();
        async move {
            let auth =
                req.headers().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
            let token = auth.strip_prefix("Bearer ").unwrap_or("");
            let seq = iam.lookup(token).map(|t| t.seq).unwrap_or(0);
            let mut resp = if seq == 1 {
                json_response(401, &format!(r#"{{"error":{{"message":"Jwt is expired: {token}"}}}}"#))
            } else {
                json_response(200, r#"{"ok":true}"#)
            };
            resp.headers_mut().insert("authorization", auth.parse().unwrap());
            resp
        }
    })
    .await;
    let mut cfg = config(&iam, &up.base_url());
    cfg.auth.credentials.push(credential("backup", BACKUP_KEY, BACKUP_SECRET));
    cfg.log.access = true;
    let debug_config = format!("{cfg:?}");
    let sc = start_sidecar(cfg).await;
    sc.ready().await;

    let c = client();
    let mut client_saw = String::new();
    for path in ["/v1/chat/completions", "/v1/models", "/v1/embeddings"] {
        let resp =
            c.post(sc.url(path)).header("authorization", "Bearer sk-client").body("{}").send().await.unwrap();
        client_saw.push_str(&format!("{:?}\n", resp.headers()));
        client_saw.push_str(&resp.text().await.unwrap());
    }
    // An outage, so the 503 path and its messages are exercised too.
    iam.set(BACKUP_KEY, Iam::Status(401, echo, None));
    sc.tokens.report_rejected(sc.tokens.latest().unwrap().generation());
    tokio::time::sleep(Duration::from_millis(300)).await;
    client_saw.push_str(&c.get(sc.admin_url("/readyz")).send().await.unwrap().text().await.unwrap());
    let metrics = c.get(sc.admin_url("/metrics")).send().await.unwrap().text().await.unwrap();
    let debug_store = format!("{:?} {:?}", sc.tokens, sc.tokens.latest());
    sc.shutdown().await;

    let logs = String::from_utf8(capture.0.lock().unwrap().clone()).unwrap();
    let tokens = iam.tokens();
    assert!(tokens.len() >= 2, "the scenario issued tokens: {tokens:?}");
    assert!(logs.contains("Switched credential"), "the scenario failed over");
    assert!(logs.contains("sidekey::access"), "access lines were written");
    assert!(logs.lines().count() > 50, "trace level was on");
    let mut needles = vec![PRIMARY_KEY, PRIMARY_SECRET, BACKUP_KEY, BACKUP_SECRET];
    needles.extend(tokens.iter().map(String::as_str));
    for (what, text) in [
        ("logs", &logs),
        ("client responses", &client_saw),
        ("metrics", &metrics),
        ("Debug of config", &debug_config),
        ("Debug of token store", &debug_store),
    ] {
        for needle in &needles {
            assert!(!text.contains(needle), "{what} contain a secret or token ({needle})");
        }
    }
    println!("figures: leak scan: {} log lines, {} needles, 0 found", logs.lines().count(), needles.len());
}
