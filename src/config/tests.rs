//! Config loading and validation tests.

use std::collections::HashSet;

use super::*;

#[test]
fn syntax_errors_do_not_quote_the_source_line() {
    let dir = std::env::temp_dir().join(format!("sidekey-syntax-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("bad.toml");
    std::fs::write(&path, "[[auth.credentials]]\nname = \"p\"\nsecret = \"SEKRIT\\qXYZ\"\n").unwrap();
    let err = Config::load(Some(&path)).unwrap_err().to_string();
    assert!(!err.contains("SEKRIT"), "{err}");
    assert!(err.contains("line 3"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

fn with_credential() -> Config {
    let mut c = Config::default();
    c.auth.credentials.push(CredentialConfig {
        name: "primary".into(),
        key_id: Some("KEYID-7f3a".into()),
        secret: Some("SECRET-9c2e".into()),
        ..Default::default()
    });
    c
}

#[test]
fn defaults_match_the_documented_contract() {
    let c = Config::default();
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:8181");
    assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:9191");
    assert_eq!(c.server.max_request_body_bytes, 33_554_432);
    assert_eq!(c.server.shutdown_grace_secs, 30);
    assert_eq!(c.upstream.base_url, "https://foundation-models.api.cloud.ru/v1");
    assert_eq!(c.upstream.connect_timeout_secs, 5);
    assert_eq!(c.auth.token_url, "https://iam.api.cloud.ru/api/v1/auth/token");
    assert_eq!(c.auth.refresh_before_secs, 300);
}

#[test]
fn a_valid_config_validates() {
    with_credential().validate().unwrap();
}

#[test]
fn non_loopback_listen_needs_opt_in() {
    let mut c = with_credential();
    c.server.listen = "0.0.0.0:8181".parse().unwrap();
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("server.listen"), "{err}");
    c.server.allow_non_loopback = true;
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("server.listen") && err.contains("[[clients]]"), "{err}");
    c.server.open_proxy = true;
    c.validate().unwrap();
    // the admin listener keeps its rule: allow_non_loopback alone
    let mut c = with_credential();
    c.server.admin_listen = "0.0.0.0:9191".parse().unwrap();
    c.server.allow_non_loopback = true;
    c.validate().unwrap();
}

#[test]
fn missing_credentials_name_the_key() {
    let err = Config::default().validate().unwrap_err().to_string();
    assert!(err.contains("auth.credentials"), "{err}");
    let mut c = with_credential();
    c.auth.credentials[0].secret = None;
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("auth.credentials[0].secret"), "{err}");
}

#[test]
fn duplicate_credential_names_are_refused() {
    let mut c = with_credential();
    c.auth.credentials.push(c.auth.credentials[0].clone());
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("auth.credentials[1].name"), "{err}");
}

#[test]
fn url_errors_redact_userinfo_and_query() {
    for (url, leaked) in [
        ("http://user:p4ssw0rd@host/v1", "p4ssw0rd"),
        ("https://host/v1?api_key=SEKRIT123", "SEKRIT123"),
        ("ftp://user:p4ssw0rd@host/v1?k=SEKRIT123", "SEKRIT123"),
        ("not a url?key=SEKRIT123", "SEKRIT123"),
        ("https://host/v1#frag=SEKRIT123", "SEKRIT123"),
        ("user:p4ssw0rd@host", "p4ssw0rd"),
        ("http://user:pa/ss@host/v1", "ss@"),
        ("http://user:p?ss@host", "p?ss"),
        ("http://user:p#ss@host/v1", "p#ss"),
    ] {
        let err = parse_base_url("upstream.base_url", url).unwrap_err().to_string();
        assert!(!err.contains(leaked), "{err}");
        assert!(err.contains("upstream.base_url"), "{err}");
    }
    assert_eq!(redact_url("http://u:p@h:1/x?y"), "http://[redacted]@h:1/x?[redacted]");
    assert_eq!(redact_url("http://h/x"), "http://h/x");
}

#[test]
fn huge_values_are_refused_by_name() {
    type Tweak = fn(&mut Config);
    let cases: [(&str, Tweak); 6] = [
        ("upstream.idle_timeout_secs", |c| c.upstream.idle_timeout_secs = u64::MAX),
        ("auth.forced_refresh_timeout_secs", |c| c.auth.forced_refresh_timeout_secs = u64::MAX - 1),
        ("server.max_inflight", |c| c.server.max_inflight = Some(usize::MAX)),
        ("server.max_connections", |c| c.server.max_connections = usize::MAX),
        ("server.queue_timeout_ms", |c| c.server.queue_timeout_ms = u64::MAX),
        ("auth.backoff_max_ms", |c| c.auth.backoff_max_ms = u64::MAX),
    ];
    for (key, set) in cases {
        let mut c = with_credential();
        set(&mut c);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains(key), "{key}: {err}");
    }
}

#[test]
fn policy_endpoints_must_be_known() {
    let mut c = with_credential();
    c.policy.allowed_endpoints.push("batches".into());
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("policy.allowed_endpoints[5]") && err.contains("batches"), "{err}");
}

#[test]
fn base_url_must_be_http() {
    assert!(parse_base_url("k", "ftp://x/v1").is_err());
    assert!(parse_base_url("k", "/v1").is_err());
    assert!(parse_base_url("k", "http://x/v1?a=b").is_err());
    assert!(parse_base_url("k", "https://x/v1/").is_ok());
}

#[test]
fn evolution_env_fills_primary_and_backup() {
    let mut c = Config::default();
    let env = |k: &str| match k {
        "EVOLUTION_KEY_ID" => Some("k1".to_string()),
        "EVOLUTION_SECRET" => Some("s1".to_string()),
        "EVOLUTION_BACKUP_KEY_ID" => Some("k2".to_string()),
        "EVOLUTION_BACKUP_SECRET" => Some("s2".to_string()),
        "EVOLUTION_BASE_URL" => Some("http://127.0.0.1:1/v1".to_string()),
        _ => None,
    };
    c.apply_evolution_env(env);
    assert_eq!(c.auth.credentials.len(), 2);
    assert_eq!(c.auth.credentials[0].name, "primary");
    assert_eq!(c.auth.credentials[1].name, "backup");
    assert_eq!(c.auth.credentials[1].secret.as_ref().unwrap().expose(), "s2");
    assert_eq!(c.upstream.base_url, "http://127.0.0.1:1/v1");
    c.validate().unwrap();
}

#[test]
fn debug_and_redacted_toml_hide_secrets() {
    let c = with_credential();
    let debug = format!("{c:?}");
    let toml = c.to_redacted_toml();
    for out in [debug, toml] {
        assert!(!out.contains("KEYID-7f3a") && !out.contains("SECRET-9c2e"), "{out}");
        assert!(out.contains("[redacted]"));
    }
}

mod proptests {
    use proptest::prelude::*;

    use super::*;

    fn toml_value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<i64>().prop_map(|v| v.to_string()),
            any::<u32>().prop_map(|v| v.to_string()),
            any::<bool>().prop_map(|v| v.to_string()),
            "[a-z0-9:./]{0,24}".prop_map(|v| format!("{v:?}")),
            Just("\"127.0.0.1:0\"".to_string()),
            Just("\"http://127.0.0.1:1/v1\"".to_string()),
            Just("1.5".to_string()),
            Just("[]".to_string()),
        ]
    }

    const KEYS: &[(&str, &str)] = &[
        ("server", "listen"),
        ("server", "admin_listen"),
        ("server", "max_request_body_bytes"),
        ("server", "replay_buffer_bytes"),
        ("server", "max_connections"),
        ("server", "max_header_bytes"),
        ("upstream", "base_url"),
        ("upstream", "idle_timeout_secs"),
        ("upstream", "request_timeout_secs"),
        ("auth", "token_url"),
        ("auth", "backoff_initial_ms"),
        ("auth", "backoff_max_ms"),
        ("auth", "failover_after_failures"),
        ("log", "level"),
        ("log", "format"),
    ];

    proptest! {
        /// Any value for any key parses or fails cleanly, and a parsed config validates or names
        /// a key: never a panic.
        #[test]
        fn any_value_is_accepted_or_refused_cleanly(picks in proptest::collection::vec((0..KEYS.len(), toml_value()), 1..5)) {
            let mut sections: std::collections::BTreeMap<&str, Vec<String>> = Default::default();
            for (i, value) in &picks {
                let (section, key) = KEYS[*i];
                sections.entry(section).or_default().push(format!("{key} = {value}"));
            }
            let mut text = String::new();
            for (section, lines) in &sections {
                let mut seen = HashSet::new();
                text.push_str(&format!("[{section}]\n"));
                for line in lines {
                    if seen.insert(line.split(' ').next().unwrap_or_default().to_string()) {
                        text.push_str(line);
                        text.push('\n');
                    }
                }
            }
            text.push_str("[[auth.credentials]]\nname = \"p\"\nkey_id = \"k\"\nsecret = \"s\"\n");
            if let Ok(config) = toml::from_str::<Config>(&text) {
                if let Err(ConfigError::Invalid { key, .. }) = config.validate() {
                    prop_assert!(key.contains('.'), "{}", key);
                }
            }
        }
    }
}

#[test]
fn gateway_sections_are_checked_by_name() {
    let dir = std::env::temp_dir().join(format!("sidekey-gw-{}-{}", std::process::id(), fastrand::u32(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let keys = dir.join("keys");
    std::fs::write(&keys, "# billing\nsk-billing-1\n\nsk-shared\n").unwrap();
    let base = || {
        let mut c = with_credential();
        let set = AuthConfig { credentials: c.auth.credentials.clone(), ..Default::default() };
        c.auth.sets.insert("team-b".into(), set);
        c.clients.push(ClientConfig {
            name: "billing".into(),
            keys_file: Some(keys.clone()),
            credentials: Some("team-b".into()),
            ..Default::default()
        });
        c.routes.push(RouteConfig {
            prefix: "/ml/v1".into(),
            base_url: "https://ml.example/v1".into(),
            credentials: "team-b".into(),
        });
        c
    };
    base().validate().unwrap();
    type Tweak = Box<dyn Fn(&mut Config)>;
    let cases: Vec<(&str, Tweak)> = vec![
        (
            "auth.sets.team-b.credentials",
            Box::new(|c| c.auth.sets.get_mut("team-b").unwrap().credentials.clear()),
        ),
        (
            "auth.sets.default",
            Box::new(|c| {
                let s = c.auth.sets["team-b"].clone();
                c.auth.sets.insert("default".into(), s);
            }),
        ),
        ("routes[0].credentials", Box::new(|c| c.routes[0].credentials = "nope".into())),
        ("routes[0].prefix", Box::new(|c| c.routes[0].prefix = "/ml/../v1".into())),
        ("routes[0].prefix", Box::new(|c| c.routes[0].prefix = "ml".into())),
        ("routes[0].base_url", Box::new(|c| c.routes[0].base_url = "https://u:SEKRIT@ml.example/v1".into())),
        ("clients[0].credentials", Box::new(|c| c.clients[0].credentials = Some("nope".into()))),
        ("clients[0].name", Box::new(|c| c.clients[0].name = "caller".into())),
        (
            "clients[1].name",
            Box::new(|c| {
                let mut d = c.clients[0].clone();
                d.name = "other".into();
                d.credentials = None;
                c.clients.push(d);
            }),
        ),
        ("clients[0].key_sha256", Box::new(|c| c.clients[0].key_sha256 = vec!["abc".into()])),
        (
            "clients[0].keys_file",
            Box::new(|c| {
                c.clients[0].keys_file = None;
            }),
        ),
        (
            "clients[0].policy.allowed_endpoints[5]",
            Box::new(|c| {
                let mut p = PolicyConfig::default();
                p.allowed_endpoints.push("x".into());
                c.clients[0].policy = Some(p);
            }),
        ),
        ("policy.max_inflight", Box::new(|c| c.policy.max_inflight = Some(4))),
        (
            "caller_credentials.provider_of",
            Box::new(|c| {
                c.caller_credentials.enabled = true;
                c.caller_credentials.provider_of = "nope".into();
            }),
        ),
    ];
    for (key, tweak) in cases {
        let mut c = base();
        tweak(&mut c);
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains(key), "{key}: {err}");
        assert!(
            !err.contains("SEKRIT") && !err.contains("sk-billing-1") && !err.contains("sk-shared"),
            "{err}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_key_shared_by_two_clients_is_refused_even_as_a_digest() {
    let mut c = with_credential();
    let hex: String = digest_of_hex("sk-one");
    c.clients.push(ClientConfig {
        name: "a".into(),
        key_sha256: vec![hex.as_str().into()],
        ..Default::default()
    });
    c.clients.push(ClientConfig {
        name: "b".into(),
        key_sha256: vec![hex.to_uppercase().as_str().into()],
        ..Default::default()
    });
    let err = c.validate().unwrap_err().to_string();
    assert!(err.contains("clients[1].name") && err.contains("\"a\""), "{err}");
}

fn digest_of_hex(key: &str) -> String {
    gateway::digest_of(key).iter().map(|b| format!("{b:02x}")).collect()
}
