//! The other token providers end to end: a static API key (with file rotation), and OAuth2 client
//! credentials against a fake token server speaking RFC 6749 §4.4 (Basic and body client auth,
//! scope and audience, failover on `invalid_client`).

mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::BodyExt;
use sidekey::config::{ClientAuth, CredentialConfig, Provider};
use support::*;
use tokio::net::TcpListener;

/// What the fake OAuth2 server saw in one token request.
#[derive(Debug, Clone, Default)]
struct TokenRequest {
    authorization: Option<String>,
    content_type: Option<String>,
    form: HashMap<String, String>,
}

/// A token endpoint that accepts `client-a:secret-a` (and `client-b:secret-b`), by Basic or body.
async fn fake_oauth2(
    token_type: &'static str,
) -> (String, Arc<Mutex<Vec<TokenRequest>>>, Arc<Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let revoked = Arc::new(Mutex::new(Vec::<String>::new()));
    let (s, r) = (Arc::clone(&seen), Arc::clone(&revoked));
    let settings = sidekey::server::ServeSettings {
        name: "fake-oauth2",
        max_connections: 100,
        header_read_timeout: Duration::from_secs(10),
        idle_timeout: Duration::from_secs(75),
        max_headers: 100,
        max_header_bytes: 65536,
        grace: Duration::from_millis(100),
    };
    tokio::spawn(sidekey::server::serve(
        listener,
        settings,
        tokio_util::sync::CancellationToken::new(),
        move |req: http::Request<hyper::body::Incoming>, _| {
            let (s, r) = (Arc::clone(&s), Arc::clone(&r));
            async move {
                let header =
                    |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok()).map(String::from);
                let (authorization, content_type) = (header("authorization"), header("content-type"));
                let body = req.into_body().collect().await.unwrap().to_bytes();
                let form: HashMap<String, String> = String::from_utf8_lossy(&body)
                    .split('&')
                    .filter_map(|kv| kv.split_once('='))
                    .map(|(k, v)| (k.to_string(), decode(v)))
                    .collect();
                s.lock().unwrap().push(TokenRequest {
                    authorization: authorization.clone(),
                    content_type,
                    form: form.clone(),
                });
                let client = match authorization.as_deref().and_then(|a| a.strip_prefix("Basic ")) {
                    Some(b64) => String::from_utf8(decode_base64(b64)).unwrap(),
                    None => format!(
                        "{}:{}",
                        form.get("client_id").cloned().unwrap_or_default(),
                        form.get("client_secret").cloned().unwrap_or_default()
                    ),
                };
                let (id, _) = client.split_once(':').unwrap_or(("", ""));
                let known = client == "client-a:secret-a" || client == "client-b:secret-b";
                if form.get("grant_type").map(String::as_str) != Some("client_credentials")
                    || !known
                    || r.lock().unwrap().iter().any(|x| x == id)
                {
                    return Ok::<_, Infallible>(json_response(401, r#"{"error":"invalid_client"}"#));
                }
                let token = format!("oauth-{id}-{:08x}", fastrand::u32(..));
                Ok(json_response(
                    200,
                    &format!(r#"{{"access_token":"{token}","expires_in":300,"token_type":"{token_type}"}}"#),
                ))
            }
        },
    ));
    (format!("http://{addr}/token"), seen, revoked)
}

fn decode(v: &str) -> String {
    let v = v.replace('+', " ");
    let mut out = Vec::new();
    let b = v.as_bytes();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            out.push(u8::from_str_radix(&v[i + 1..i + 3], 16).unwrap());
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).unwrap()
}

fn decode_base64(s: &str) -> Vec<u8> {
    const T: &str = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in s.chars().filter(|&c| c != '=') {
        bits = bits << 6 | T.find(c).unwrap() as u32;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    out
}

fn oauth_credential(name: &str, id: &str, secret: &str) -> CredentialConfig {
    CredentialConfig {
        name: name.into(),
        client_id: Some(id.into()),
        client_secret: Some(secret.into()),
        ..Default::default()
    }
}

#[tokio::test]
async fn oauth2_basic_auth_with_scope_and_audience() {
    let (token_url, seen, _) = fake_oauth2("Bearer").await;
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let mut cfg = config(&iam, &up.base_url());
    cfg.auth.provider = Provider::Oauth2ClientCredentials;
    cfg.auth.token_url = token_url;
    cfg.auth.scope = Some("llm.invoke read".into());
    cfg.auth.audience = Some("https://api.example".into());
    cfg.auth.credentials = vec![oauth_credential("primary", "client-a", "secret-a")];
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    assert_eq!(client().get(sc.url("/v1/models")).send().await.unwrap().status(), 200);
    assert!(up.seen()[0].bearer().unwrap().starts_with("oauth-client-a-"));
    let req = seen.lock().unwrap()[0].clone();
    assert_eq!(req.content_type.as_deref(), Some("application/x-www-form-urlencoded"));
    assert_eq!(req.authorization.as_deref(), Some("Basic Y2xpZW50LWE6c2VjcmV0LWE="));
    assert_eq!(req.form["grant_type"], "client_credentials");
    assert_eq!(req.form["scope"], "llm.invoke read");
    assert_eq!(req.form["audience"], "https://api.example");
    assert!(!req.form.contains_key("client_secret"), "Basic auth keeps the secret out of the body");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    assert!(
        (sc.metric(r#"sidekey_token_expiry_timestamp_seconds{set="default"}"#) - now - 300.0).abs() < 10.0
    );
}

#[tokio::test]
async fn oauth2_body_auth_and_failover_on_invalid_client() {
    let (token_url, seen, revoked) = fake_oauth2("bearer").await;
    revoked.lock().unwrap().push("client-a".into());
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let mut cfg = config(&iam, &up.base_url());
    cfg.auth.provider = Provider::Oauth2ClientCredentials;
    cfg.auth.token_url = token_url;
    cfg.auth.client_auth = ClientAuth::Body;
    cfg.auth.credentials = vec![
        oauth_credential("primary", "client-a", "secret-a"),
        oauth_credential("backup", "client-b", "secret-b"),
    ];
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    assert_eq!(client().get(sc.url("/v1/models")).send().await.unwrap().status(), 200);
    assert!(up.seen()[0].bearer().unwrap().starts_with("oauth-client-b-"));
    let requests = seen.lock().unwrap().clone();
    assert_eq!(requests[0].form["client_id"], "client-a");
    assert_eq!(requests[0].form["client_secret"], "secret-a");
    assert!(requests[0].authorization.is_none());
    assert_eq!(
        sc.metric(r#"sidekey_credential_failovers_total{from="primary",set="default",to="backup"}"#),
        1.0
    );
}

#[tokio::test]
async fn oauth2_non_bearer_tokens_are_refused() {
    let (token_url, _, _) = fake_oauth2("mac").await;
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let mut cfg = config(&iam, &up.base_url());
    cfg.auth.provider = Provider::Oauth2ClientCredentials;
    cfg.auth.token_url = token_url;
    cfg.auth.credentials = vec![oauth_credential("primary", "client-a", "secret-a")];
    let sc = start_sidecar(cfg).await;
    let metrics = sc.metrics.clone();
    eventually("a failed fetch", || {
        metrics.token_refresh_total.with_label_values(&["default", "primary", "failure"]).get() >= 1
    })
    .await;
    let text = client().get(sc.admin_url("/readyz")).send().await.unwrap().text().await.unwrap();
    assert!(text.contains("token_type is not Bearer"), "{text}");
}

#[tokio::test]
async fn static_key_from_a_file_with_rotation() {
    let dir =
        std::env::temp_dir().join(format!("sidekey-static-{}-{}", std::process::id(), fastrand::u32(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let key_file = dir.join("api_key");
    std::fs::write(&key_file, "sk-static-one\n").unwrap();
    let iam = FakeIam::start().await;
    let up = FakeUpstream::ok().await;
    let mut cfg = config(&iam, &up.base_url());
    cfg.auth.provider = Provider::Static;
    cfg.auth.credential_poll_secs = 1;
    cfg.auth.credentials = vec![CredentialConfig {
        name: "primary".into(),
        api_key_file: Some(key_file.clone()),
        ..Default::default()
    }];
    let sc = start_sidecar(cfg).await;
    sc.ready().await;
    let c = client();
    c.get(sc.url("/v1/models")).send().await.unwrap();
    assert_eq!(up.seen()[0].bearer(), Some("sk-static-one"));
    assert_eq!(iam.call_count(), 0, "no token endpoint for static keys");
    std::fs::write(&key_file, "sk-static-two\n").unwrap();
    let tokens = sc.tokens.clone();
    eventually("rotated key in use", || tokens.latest().is_some_and(|t| t.generation() >= 2)).await;
    c.get(sc.url("/v1/models")).send().await.unwrap();
    assert_eq!(up.seen()[1].bearer(), Some("sk-static-two"));
    std::fs::remove_dir_all(&dir).unwrap();
}
