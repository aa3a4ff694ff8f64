//! The token lifecycle end to end over sockets (refresh under continuous load is the token
//! churn test in `faults.rs`): a scripted fake IAM, an upstream that checks every
//! token it receives, and sidekey between them. Short token lifetimes keep these quick; the
//! schedule itself is tested on paused time beside the refresher.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use support::*;
use tokio::time::{timeout, Instant};

/// What the validating upstream counts.
#[derive(Default)]
struct Seen {
    ok: AtomicU64,
    expired: AtomicU64,
    unknown: AtomicU64,
    rejected_on_purpose: AtomicU64,
    /// Tokens issued to this key id are refused, as once a service-account key is deleted.
    revoked_key: Mutex<Option<String>>,
}

/// An upstream that accepts only live tokens issued by `iam` (and rejects token number
/// `reject_seq`, and every token of `Seen::revoked_key`, as if revoked), answering
/// `{"key_id": .., "body": ..}`.
async fn validating_upstream(iam: &FakeIam, reject_seq: Option<u64>) -> (FakeUpstream, Arc<Seen>) {
    let seen = Arc::new(Seen::default());
    let (iam, s) = (iam.clone(), Arc::clone(&seen));
    let up = FakeUpstream::start(move |req| {
        let (iam, seen) = (iam.clone(), Arc::clone(&s));
        async move {
            let token = req
                .headers()
                .get("authorization")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.strip_prefix("Bearer "))
                .unwrap_or_default()
                .to_string();
            let body = req.into_body().collect().await.map(|b| b.to_bytes()).unwrap_or_default();
            match iam.lookup(&token) {
                None => {
                    seen.unknown.fetch_add(1, Ordering::Relaxed);
                    json_response(401, r#"{"error":{"message":"unknown token"}}"#)
                }
                Some(t) if Instant::now() >= t.expires_at => {
                    seen.expired.fetch_add(1, Ordering::Relaxed);
                    json_response(401, r#"{"error":{"message":"Jwt is expired"}}"#)
                }
                Some(t) if Some(t.seq) == reject_seq || seen.is_revoked(&t.key_id) => {
                    seen.rejected_on_purpose.fetch_add(1, Ordering::Relaxed);
                    json_response(401, r#"{"error":{"message":"Jwt is expired"}}"#)
                }
                Some(t) => {
                    seen.ok.fetch_add(1, Ordering::Relaxed);
                    let body =
                        serde_json::json!({"key_id": t.key_id, "body": String::from_utf8_lossy(&body)});
                    json_response(200, &body.to_string())
                }
            }
        }
    })
    .await;
    (up, seen)
}

impl Seen {
    fn is_revoked(&self, key_id: &str) -> bool {
        self.revoked_key.lock().unwrap().as_deref() == Some(key_id)
    }

    fn revoke(&self, key_id: &str) {
        *self.revoked_key.lock().unwrap() = Some(key_id.to_string());
    }
}

async fn status_and_json(resp: reqwest::Response) -> (u16, serde_json::Value) {
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(serde_json::Value::Null))
}

#[tokio::test]
async fn speaks_the_iam_protocol_exactly() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let sc = start_sidecar(config(&iam, &up.base_url())).await;
    sc.ready().await;
    let call = &iam.calls()[0];
    assert_eq!(call.key_id, PRIMARY_KEY);
    assert_eq!(call.secret, PRIMARY_SECRET);
    assert_eq!(call.content_type.as_deref(), Some("application/json"));
    // Metrics moved with the refresh.
    assert_eq!(
        sc.metric(r#"sidekey_token_refresh_total{credential="primary",result="success",set="default"}"#),
        1.0
    );
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let expiry = sc.metric(r#"sidekey_token_expiry_timestamp_seconds{set="default"}"#);
    assert!((expiry - (now + 3600.0)).abs() < 10.0, "expiry {expiry} vs now {now}");
    assert!((sc.metric(r#"sidekey_token_last_success_timestamp_seconds{set="default"}"#) - now).abs() < 10.0);
    assert_eq!(
        sc.metric(r#"sidekey_token_refresh_duration_seconds_count{credential="primary",set="default"}"#),
        1.0
    );
    assert_eq!(sc.metric(r#"sidekey_active_credential{credential="primary",set="default"}"#), 1.0);
}

#[tokio::test]
async fn a_thousand_concurrent_requests_cause_no_extra_fetch() {
    let iam = FakeIam::start().await;
    let (up, seen) = validating_upstream(&iam, None).await;
    let sc = start_sidecar(config(&iam, &up.base_url())).await;
    sc.ready().await;
    let h2 = reqwest::Client::builder().http2_prior_knowledge().no_proxy().timeout(WAIT).build().unwrap();
    let tasks: Vec<_> = (0..1000)
        .map(|_| {
            let (c, url) = (h2.clone(), sc.url("/v1/models"));
            tokio::spawn(async move { c.get(url).send().await.map(|r| r.status().as_u16()).unwrap_or(0) })
        })
        .collect();
    for t in tasks {
        assert_eq!(timeout(WAIT, t).await.unwrap().unwrap(), 200);
    }
    assert_eq!(seen.ok.load(Ordering::Relaxed), 1000);
    assert_eq!(iam.call_count(), 1, "requests never fetch tokens themselves");
}

#[tokio::test]
async fn upstream_401_storm_causes_one_forced_refresh_and_replays() {
    let iam = FakeIam::start().await;
    // The first token is "revoked": upstream answers 401 for it.
    let (up, seen) = validating_upstream(&iam, Some(1)).await;
    let sc = start_sidecar(config(&iam, &up.base_url())).await;
    sc.ready().await;
    let c = client();
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let (c, url) = (c.clone(), sc.url("/v1/chat/completions"));
            tokio::spawn(async move {
                let resp = c.post(url).body(format!("{{\"n\":{i}}}")).send().await.unwrap();
                (resp.status().as_u16(), resp.json::<serde_json::Value>().await.unwrap(), i)
            })
        })
        .collect();
    for t in tasks {
        let (status, json, i) = timeout(WAIT, t).await.unwrap().unwrap();
        assert_eq!(status, 200);
        assert_eq!(json["body"], format!("{{\"n\":{i}}}"), "the replay carried the same body");
    }
    println!(
        "figures: 401 storm: requests=200 rejected_first_try={} replays={} iam_fetches={}",
        seen.rejected_on_purpose.load(Ordering::Relaxed),
        sc.metric("sidekey_request_replays_total"),
        iam.call_count()
    );
    assert_eq!(iam.call_count(), 2, "one initial fetch and one forced refresh");
    assert_eq!(sc.metric(r#"sidekey_forced_refreshes_total{set="default"}"#), 1.0);
    let rejected = seen.rejected_on_purpose.load(Ordering::Relaxed) as f64;
    assert_eq!(sc.metric("sidekey_request_replays_total"), rejected);
    assert_eq!(sc.metric("sidekey_upstream_unauthorized_total"), rejected);
}

#[tokio::test]
async fn a_401_with_a_body_over_the_replay_buffer_passes_through() {
    let iam = FakeIam::start().await;
    let (up, _seen) = validating_upstream(&iam, Some(1)).await;
    let mut cfg = config(&iam, &up.base_url());
    cfg.server.replay_buffer_bytes = 1024;
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    let resp = client().post(sc.url("/v1/chat/completions")).body(vec![b'x'; 4096]).send().await.unwrap();
    let (status, json) = status_and_json(resp).await;
    assert_eq!(status, 401);
    assert_eq!(json["error"]["message"], "Jwt is expired", "upstream's 401 untouched");
    assert_eq!(sc.metric("sidekey_request_replays_total"), 0.0);
    // The rejected token is still replaced, so the next request succeeds.
    eventually("refresh after a non-replayable 401", || iam.call_count() == 2).await;
    let resp = client().post(sc.url("/v1/chat/completions")).body(vec![b'x'; 4096]).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn iam_down_at_startup_then_back() {
    let iam = FakeIam::start().await;
    iam.set(PRIMARY_KEY, Iam::Status(503, r#"{"error":"maintenance"}"#, None));
    let (up, seen) = validating_upstream(&iam, None).await;
    let sc = start_sidecar(config(&iam, &up.base_url())).await;
    eventually("a few failed fetches", || iam.call_count() >= 2).await;
    let c = client();
    let ready = c.get(sc.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    let reason = ready.text().await.unwrap();
    assert!(reason.contains("credential 'primary' IAM answered 503"), "{reason}");
    assert_eq!(c.get(sc.admin_url("/healthz")).send().await.unwrap().status(), 200, "alive while not ready");

    let resp = c.post(sc.url("/v1/chat/completions")).body("{}").send().await.unwrap();
    assert_eq!(resp.status(), 503);
    let retry_after: u64 = resp.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=30).contains(&retry_after));
    let (_, json) = status_and_json(resp).await;
    assert_eq!(json["error"]["code"], "no_valid_token");
    assert!(json["error"]["message"].as_str().unwrap().contains("IAM answered 503"));
    assert_eq!(
        seen.ok.load(Ordering::Relaxed) + seen.unknown.load(Ordering::Relaxed),
        0,
        "nothing went upstream"
    );

    iam.set(PRIMARY_KEY, Iam::Issue(Duration::from_secs(3600)));
    let back = Instant::now();
    sc.ready().await;
    // backoff_max_ms is 400 in tests: recovery within one backoff step
    assert!(back.elapsed() < Duration::from_secs(2), "recovered after {:?}", back.elapsed());
    assert_eq!(c.get(sc.admin_url("/readyz")).send().await.unwrap().status(), 200);
    assert_eq!(c.post(sc.url("/v1/chat/completions")).body("{}").send().await.unwrap().status(), 200);
    assert!(
        sc.metric(r#"sidekey_token_refresh_total{credential="primary",result="failure",set="default"}"#)
            >= 2.0
    );
}

#[tokio::test]
async fn iam_outage_shorter_than_the_token_life_is_invisible() {
    let iam = FakeIam::start().await;
    let (up, seen) = validating_upstream(&iam, None).await;
    let cfg = short_token_config(&iam, &up.base_url(), 4);
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    // IAM goes down right after the first token; it comes back before that token expires.
    iam.set(PRIMARY_KEY, Iam::Status(500, "oops", None));
    let c = client();
    let start = Instant::now();
    let mut sent = 0;
    while start.elapsed() < Duration::from_millis(2500) {
        if start.elapsed() > Duration::from_millis(2000) {
            iam.set(PRIMARY_KEY, Iam::Issue(Duration::from_secs(4)));
        }
        let resp = c.get(sc.url("/v1/models")).send().await.unwrap();
        assert_eq!(resp.status(), 200, "after {:?}", start.elapsed());
        sent += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let failures =
        sc.metric(r#"sidekey_token_refresh_total{credential="primary",result="failure",set="default"}"#);
    println!(
        "figures: short IAM outage: sent={sent} failed=0 refresh_failures={failures} expired_seen={}",
        seen.expired.load(Ordering::Relaxed)
    );
    assert!(failures >= 1.0, "the outage was seen by the refresher");
    assert_eq!(seen.expired.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn iam_garbage_is_a_transient_failure() {
    let cases: &[(&str, Iam, &str)] = &[
        ("non-JSON", Iam::Raw("<html>gateway</html>"), "not a JSON object"),
        ("missing token", Iam::Raw(r#"{"expires_in":3600}"#), "no access_token"),
        ("empty token", Iam::Raw(r#"{"access_token":"","expires_in":3600}"#), "empty access_token"),
        ("zero expiry", Iam::Raw(r#"{"access_token":"t","expires_in":0}"#), "expires_in"),
        ("negative expiry", Iam::Raw(r#"{"access_token":"t","expires_in":-60}"#), "expires_in"),
        ("string expiry", Iam::Raw(r#"{"access_token":"t","expires_in":"3600"}"#), "expires_in"),
    ];
    let up = FakeUpstream::ok().await;
    for (name, behaviour, reason) in cases {
        let iam = FakeIam::start().await;
        iam.set(PRIMARY_KEY, behaviour.clone());
        let sc = start_sidecar(config(&iam, &up.base_url())).await;
        eventually(name, || iam.call_count() >= 2).await;
        let resp = client().get(sc.admin_url("/readyz")).send().await.unwrap();
        assert_eq!(resp.status(), 503, "{name}");
        let text = resp.text().await.unwrap();
        assert!(text.contains("bad IAM response") && text.contains(reason), "{name}: {text}");
        assert_eq!(client().get(sc.url("/v1/models")).send().await.unwrap().status(), 503, "{name}");
        sc.shutdown().await;
    }
    assert_eq!(up.count(), 0, "no request went upstream without a valid token");
}

#[tokio::test]
async fn huge_expires_in_is_clamped_to_a_day() {
    let iam = FakeIam::start().await;
    iam.set(PRIMARY_KEY, Iam::Raw(r#"{"access_token":"tok-huge","expires_in":99999999999}"#));
    let up = FakeUpstream::ok().await;
    let sc = start_sidecar(config(&iam, &up.base_url())).await;
    sc.ready().await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let expiry = sc.metric(r#"sidekey_token_expiry_timestamp_seconds{set="default"}"#);
    assert!((expiry - now - 86_400.0).abs() < 10.0, "{}", expiry - now);
}

#[tokio::test]
async fn a_hanging_iam_times_out_and_recovers() {
    let iam = FakeIam::start().await;
    iam.set(PRIMARY_KEY, Iam::Hang);
    let up = FakeUpstream::ok().await;
    let mut cfg = config(&iam, &up.base_url());
    cfg.auth.timeout_secs = 1;
    let sc = start_sidecar(cfg).await;
    let metrics = sc.metrics.clone();
    let failed = || metrics.token_refresh_total.with_label_values(&["default", "primary", "failure"]).get();
    eventually("a timed-out fetch", || failed() >= 1).await;
    let text = client().get(sc.admin_url("/readyz")).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("IAM timed out"), "{text}");
    iam.set(PRIMARY_KEY, Iam::Issue(Duration::from_secs(3600)));
    sc.ready().await;
}

#[tokio::test]
async fn iam_429_retry_after_is_honoured() {
    let iam = FakeIam::start().await;
    iam.set(PRIMARY_KEY, Iam::Status(429, "slow down", Some(2)));
    let up = FakeUpstream::ok().await;
    let _sc = start_sidecar(config(&iam, &up.base_url())).await;
    eventually("second attempt", || iam.call_count() >= 2).await;
    let calls = iam.calls();
    let gap = calls[1].at - calls[0].at;
    // Without Retry-After the test config would retry within 400 ms.
    assert!(gap >= Duration::from_millis(1900), "retried after {gap:?}");
}

#[tokio::test]
async fn primary_rejected_backup_takes_over_then_failback() {
    let iam = FakeIam::start().await;
    iam.set(PRIMARY_KEY, Iam::Status(401, r#"{"error":"invalid key"}"#, None));
    let (up, seen) = validating_upstream(&iam, None).await;
    let mut cfg = config(&iam, &up.base_url());
    cfg.auth.credentials.push(credential("backup", BACKUP_KEY, BACKUP_SECRET));
    cfg.auth.failback_after_secs = 1;
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    let c = client();
    let who = |json: serde_json::Value| json["key_id"].as_str().unwrap_or_default().to_string();
    let (status, json) =
        status_and_json(c.post(sc.url("/v1/embeddings")).body("{}").send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(who(json), BACKUP_KEY);
    assert_eq!(
        sc.metric(r#"sidekey_credential_failovers_total{from="primary",set="default",to="backup"}"#),
        1.0
    );
    assert_eq!(sc.metric(r#"sidekey_active_credential{credential="backup",set="default"}"#), 1.0);
    assert_eq!(sc.metric(r#"sidekey_active_credential{credential="primary",set="default"}"#), 0.0);

    // The primary is restored; the next probe (within failback_after_secs) switches back.
    iam.set(PRIMARY_KEY, Iam::Issue(Duration::from_secs(3600)));
    let metrics = sc.metrics.clone();
    eventually("failback", || {
        metrics.credential_failovers_total.with_label_values(&["default", "backup", "primary"]).get() == 1
    })
    .await;
    let (status, json) =
        status_and_json(c.post(sc.url("/v1/embeddings")).body("{}").send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(who(json), PRIMARY_KEY);
    assert_eq!(sc.metric(r#"sidekey_active_credential{credential="primary",set="default"}"#), 1.0);
    assert_eq!(seen.expired.load(Ordering::Relaxed) + seen.unknown.load(Ordering::Relaxed), 0);
}

#[tokio::test]
async fn primary_revoked_mid_run_without_failed_requests() {
    let iam = FakeIam::start().await;
    let (up, seen) = validating_upstream(&iam, None).await;
    let mut cfg = short_token_config(&iam, &up.base_url(), 3);
    cfg.auth.credentials.push(credential("backup", BACKUP_KEY, BACKUP_SECRET));
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    iam.set(PRIMARY_KEY, Iam::Status(403, "revoked", None));
    let c = client();
    let start = Instant::now();
    let mut sent = 0;
    while start.elapsed() < Duration::from_secs(4) {
        assert_eq!(
            c.get(sc.url("/v1/models")).send().await.unwrap().status(),
            200,
            "after {:?}",
            start.elapsed()
        );
        sent += 1;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "figures: primary revoked mid-run: sent={sent} failed=0 failovers={}",
        sc.metric(r#"sidekey_credential_failovers_total{from="primary",set="default",to="backup"}"#)
    );
    assert_eq!(
        sc.metric(r#"sidekey_credential_failovers_total{from="primary",set="default",to="backup"}"#),
        1.0
    );
    assert!(iam.calls_for(BACKUP_KEY) >= 1);
    assert_eq!(seen.expired.load(Ordering::Relaxed), 0);
}

/// Issue 11, item 2: the primary's key is deleted, so IAM rejects it and upstream rejects the
/// tokens it issued. The request that discovers it must not fail: its forced refresh follows the
/// failover to the backup within its wait, and the request is replayed with the backup's token.
#[tokio::test]
async fn revoked_primary_the_request_that_discovers_it_succeeds() {
    let iam = FakeIam::start().await;
    let (up, seen) = validating_upstream(&iam, None).await;
    let mut cfg = config(&iam, &up.base_url());
    cfg.auth.credentials.push(credential("backup", BACKUP_KEY, BACKUP_SECRET));
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    let c = client();
    let who = |json: &serde_json::Value| json["key_id"].as_str().unwrap_or_default().to_string();
    let (status, json) = status_and_json(c.get(sc.url("/v1/models")).send().await.unwrap()).await;
    assert_eq!((status, who(&json).as_str()), (200, PRIMARY_KEY), "the primary works");

    iam.set(PRIMARY_KEY, Iam::Status(401, r#"{"error":"invalid keyId or secret"}"#, None));
    seen.revoke(PRIMARY_KEY);
    let mut answers = Vec::new();
    for _ in 0..5 {
        let resp = timeout(WAIT, c.get(sc.url("/v1/models")).send()).await.unwrap().unwrap();
        answers.push(status_and_json(resp).await);
    }
    let failed: Vec<_> = answers.iter().filter(|(status, _)| *status != 200).collect();
    assert!(failed.is_empty(), "client-visible failures after the revocation: {failed:?}");
    for (_, json) in &answers {
        assert_eq!(who(json), BACKUP_KEY);
    }
    assert_eq!(seen.rejected_on_purpose.load(Ordering::Relaxed), 1, "only the discovering request saw a 401");
    assert!(
        sc.metric(r#"sidekey_credential_failovers_total{from="primary",set="default",to="backup"}"#) >= 1.0
    );
    assert_eq!(sc.metric(r#"sidekey_forced_refreshes_total{set="default"}"#), 1.0);
    assert_eq!(sc.metric("sidekey_request_replays_total"), 1.0);
}

#[tokio::test]
async fn transient_failures_fail_over_after_the_threshold() {
    let iam = FakeIam::start().await;
    iam.set(PRIMARY_KEY, Iam::Status(502, "bad gateway", None));
    let up = FakeUpstream::ok().await;
    let mut cfg = config(&iam, &up.base_url());
    cfg.auth.failover_after_failures = 2;
    cfg.auth.credentials.push(credential("backup", BACKUP_KEY, BACKUP_SECRET));
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    assert_eq!(iam.calls_for(PRIMARY_KEY), 2);
    assert_eq!(iam.calls_for(BACKUP_KEY), 1);
    assert_eq!(sc.tokens.latest().unwrap().credential(), "backup");
}

#[tokio::test]
async fn all_credentials_rejected_names_each_reason() {
    let iam = FakeIam::start().await;
    iam.set(PRIMARY_KEY, Iam::Status(401, "bad key", None));
    iam.set(BACKUP_KEY, Iam::Status(403, "denied", None));
    let up = FakeUpstream::ok().await;
    let mut cfg = config(&iam, &up.base_url());
    cfg.auth.credentials.push(credential("backup", BACKUP_KEY, BACKUP_SECRET));
    let sc = start_sidecar(cfg).await;
    eventually("both tried", || iam.calls_for(BACKUP_KEY) >= 1).await;
    let resp = client().get(sc.url("/v1/models")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.headers().contains_key("retry-after"));
    let (_, json) = status_and_json(resp).await;
    let message = json["error"]["message"].as_str().unwrap();
    assert!(message.contains("credential 'primary' rejected by IAM (401)"), "{message}");
    assert!(message.contains("credential 'backup' rejected by IAM (403)"), "{message}");
}

#[tokio::test]
async fn rotated_secret_files_are_picked_up_without_restart() {
    let dir =
        std::env::temp_dir().join(format!("sidekey-rotate-{}-{}", std::process::id(), fastrand::u32(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let (key_file, secret_file) = (dir.join("key_id"), dir.join("secret"));
    std::fs::write(&key_file, format!("{PRIMARY_KEY}\n")).unwrap();
    std::fs::write(&secret_file, "old-secret\n").unwrap();
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let mut cfg = config(&iam, &up.base_url());
    cfg.auth.credential_poll_secs = 1;
    cfg.auth.credentials[0] = sidekey::config::CredentialConfig {
        name: "primary".into(),
        key_id_file: Some(key_file),
        secret_file: Some(secret_file.clone()),
        ..Default::default()
    };
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    assert_eq!(iam.calls()[0].secret, "old-secret", "trailing newline trimmed");
    // Kubernetes swaps the file atomically; a plain write is the harder case.
    std::fs::write(&secret_file, "new-secret\n").unwrap();
    let rotated = Instant::now();
    eventually("fetch with the rotated secret", || iam.calls().iter().any(|c| c.secret == "new-secret"))
        .await;
    assert!(rotated.elapsed() < Duration::from_secs(3), "picked up after {:?}", rotated.elapsed());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[tokio::test]
async fn readiness_follows_the_token_and_healthz_is_alive() {
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let cfg = short_token_config(&iam, &up.base_url(), 2);
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    let c = client();
    assert_eq!(c.get(sc.admin_url("/readyz")).send().await.unwrap().status(), 200);
    // IAM goes away; the 2 s token becomes unusable after 1 s.
    iam.set(PRIMARY_KEY, Iam::Status(503, "down", None));
    let tokens = sc.tokens.clone();
    eventually("token unusable", || !tokens.has_usable(Instant::now())).await;
    let resp = c.get(sc.admin_url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    assert!(resp.text().await.unwrap().starts_with("no valid token"));
    assert_eq!(c.get(sc.admin_url("/healthz")).send().await.unwrap().status(), 200);
    assert_eq!(c.get(sc.admin_url("/nope")).send().await.unwrap().status(), 404);
}
