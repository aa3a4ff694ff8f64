//! The sidekey configs shipped under `deploy/` parse with the real `Config` (unknown keys are
//! refused) and validate, and the variants differ from each other only where they should:
//! classic-sidecar from the base in two shutdown keys, gateway-redis from shared-gateway in
//! `[signed_keys]` and `[usage.callback]`. `.ci/validate-deploy.sh` checks the same files against
//! the Kubernetes manifests.

use std::path::{Path, PathBuf};

use toml::{Table, Value};

use sidekey::config::LogFormat;
use sidekey::Config;

/// Every sidekey config file under `deploy/`.
const BASE: &str = "deploy/base/sidekey.toml";
const CLASSIC: &str = "deploy/overlays/classic-sidecar/sidekey.toml";
const DEPLOY_CONFIGS: [&str; 2] = [BASE, CLASSIC];
/// The gateway variants: a Deployment behind a Service, client keys, credential sets (issue
/// 12), signed keys, a Redis budget store and a usage callback (issue 13).
const SHARED_GATEWAY: &str = "deploy/overlays/shared-gateway/sidekey.toml";
const GATEWAY_REDIS: &str = "deploy/overlays/gateway-redis/sidekey.toml";
const GATEWAY_CONFIGS: [&str; 2] = [SHARED_GATEWAY, GATEWAY_REDIS];

/// Where the manifests mount the credential Secrets.
const SECRETS_DIR: &str = "/var/run/secrets/sidekey/";

fn path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// Parses a file the way the TOML layer of `Config::load` does, without the environment, so a
/// stray `SIDEKEY_*` variable cannot change the outcome.
fn parse(rel: &str) -> Config {
    let text = std::fs::read_to_string(path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    toml::from_str(&text).unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// The config with inline stand-ins for the credential files, which exist only in the pod.
fn with_inline_credentials(config: &Config) -> Config {
    let mut c = config.clone();
    for cred in &mut c.auth.credentials {
        cred.key_id_file = None;
        cred.secret_file = None;
        cred.key_id = Some("k".into());
        cred.secret = Some("s".into());
    }
    c
}

#[test]
fn deploy_configs_are_accepted() {
    for rel in DEPLOY_CONFIGS {
        let config = parse(rel);
        with_inline_credentials(&config).validate().unwrap_or_else(|e| panic!("{rel}: {e}"));

        let names: Vec<&str> = config.auth.credentials.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["primary", "backup"], "{rel}");
        for cred in &config.auth.credentials {
            // Files only: rotation works by re-reading them; an inline secret in a ConfigMap
            // would be a leak.
            assert!(
                cred.key_id.is_none() && cred.secret.is_none(),
                "{rel}: {} has an inline value",
                cred.name
            );
            for file in [&cred.key_id_file, &cred.secret_file] {
                let file = file.as_ref().unwrap_or_else(|| panic!("{rel}: {} lacks a file", cred.name));
                assert!(file.starts_with(SECRETS_DIR), "{rel}: {} is outside {SECRETS_DIR}", file.display());
            }
        }

        // The proxy stays on loopback; only the admin port opens up, for probes and scraping.
        let s = &config.server;
        assert!(s.listen.ip().is_loopback(), "{rel}: server.listen");
        assert_eq!(s.listen.port(), 8181, "{rel}: server.listen");
        assert_eq!(s.admin_listen.port(), 9191, "{rel}: server.admin_listen");
        assert!(s.allow_non_loopback, "{rel}: server.allow_non_loopback");
        // terminationGracePeriodSeconds is 45 in every manifest.
        assert!(
            s.shutdown_grace_secs + s.shutdown_delay_secs < 45,
            "{rel}: shutdown does not fit in the pod's grace period"
        );
        assert_eq!(config.log.format, LogFormat::Json, "{rel}: log.format");
    }
}

#[test]
fn classic_sidecar_config_differs_from_base_only_in_shutdown_keys() {
    let base = parse(BASE);
    let classic = parse(CLASSIC);
    assert!(!base.server.enable_quit_endpoint);
    assert_eq!(base.server.shutdown_delay_secs, 0);
    assert!(classic.server.enable_quit_endpoint);
    assert_eq!(classic.server.shutdown_delay_secs, 5);

    let mut normalized = classic;
    normalized.server.enable_quit_endpoint = base.server.enable_quit_endpoint;
    normalized.server.shutdown_delay_secs = base.server.shutdown_delay_secs;
    let (normalized, base) = (normalized.to_redacted_toml(), base.to_redacted_toml());
    // A config that cannot be rendered comes back as a comment, which would compare equal.
    assert!(base.contains("[server]"), "{base}");
    assert_eq!(normalized, base, "{CLASSIC} drifted from {BASE} beyond the two classic-sidecar keys");
}

/// The file as plain TOML, for checks that do not depend on how `Config` models a section.
fn raw(rel: &str) -> Table {
    let text = std::fs::read_to_string(path(rel)).unwrap_or_else(|e| panic!("{rel}: {e}"));
    text.parse().unwrap_or_else(|e| panic!("{rel}: {e}"))
}

/// Every `*_file` key in the tree with its dotted key, however deep (sets, clients, signed keys,
/// the callback).
fn files(value: &Value, key: &str, out: &mut Vec<(String, String)>) {
    match value {
        Value::Table(t) => {
            for (k, v) in t {
                let sub = if key.is_empty() { k.clone() } else { format!("{key}.{k}") };
                match v {
                    Value::String(s) if k.ends_with("_file") => out.push((sub, s.clone())),
                    _ => files(v, &sub, out),
                }
            }
        }
        Value::Array(a) => {
            for (i, v) in a.iter().enumerate() {
                files(v, &format!("{key}[{i}]"), out);
            }
        }
        _ => {}
    }
}

/// Replaces every `*_file` under [`SECRETS_DIR`] with a stand-in file in `dir` (the real ones
/// exist only in the pod). Contents differ per path (a key listed for two clients is an error)
/// and are one line of 55 bytes (an HS256 secret needs at least 32).
fn with_stand_in_files(value: &mut Value, dir: &Path) {
    match value {
        Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                if let (true, Value::String(s)) = (k.ends_with("_file"), &*v) {
                    if let Some(rel) = s.strip_prefix(SECRETS_DIR) {
                        let file = dir.join(rel.replace('/', "__"));
                        // FNV-1a of the path: distinct, deterministic stand-in values.
                        let h = s.bytes().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
                            (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
                        });
                        let content =
                            format!("standin{h:016x}{:016x}{:016x}\n", h.rotate_left(21), h.rotate_left(42));
                        std::fs::write(&file, content).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
                        #[cfg(unix)]
                        {
                            use std::os::unix::fs::PermissionsExt;
                            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
                        }
                        *v = Value::String(file.display().to_string());
                    }
                } else {
                    with_stand_in_files(v, dir);
                }
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|v| with_stand_in_files(v, dir)),
        _ => {}
    }
}

/// Needs the sections issues 12 and 13 add to `Config` (`[auth.sets.*]`, `[[clients]]`,
/// `[signed_keys]`, `[usage.callback]`): until they exist, parsing fails on the first unknown
/// key, which is the point. This test guards the shipped gateway configs from then on.
#[test]
fn gateway_configs_are_accepted() {
    for rel in GATEWAY_CONFIGS {
        let dir = std::env::temp_dir().join(format!(
            "sidekey-deploy-test-{}-{}",
            std::process::id(),
            rel.replace('/', "_")
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let mut value = Value::Table(raw(rel));
        with_stand_in_files(&mut value, &dir);
        let text = toml::to_string(&value).unwrap();
        let config: Config = toml::from_str(&text).unwrap_or_else(|e| panic!("{rel}: {e}"));
        let validated = config.validate();
        let _ = std::fs::remove_dir_all(&dir);
        validated.unwrap_or_else(|e| panic!("{rel}: {e}"));

        // Reached through the Service: every address, with client keys (raw check below).
        let s = &config.server;
        assert!(s.listen.ip().is_unspecified(), "{rel}: server.listen");
        assert_eq!(s.listen.port(), 8181, "{rel}: server.listen");
        assert_eq!(s.admin_listen.port(), 9191, "{rel}: server.admin_listen");
        assert!(s.allow_non_loopback, "{rel}: server.allow_non_loopback");
        // Keeps accepting while the endpoint removal propagates, and fits in the pod's 45 s.
        assert!(s.shutdown_delay_secs > 0, "{rel}: server.shutdown_delay_secs");
        assert!(
            s.shutdown_grace_secs + s.shutdown_delay_secs < 45,
            "{rel}: shutdown does not fit in the pod's grace period"
        );
        assert_eq!(config.log.format, LogFormat::Json, "{rel}: log.format");
    }
}

#[test]
fn gateway_configs_keep_every_secret_in_a_mounted_file() {
    for rel in GATEWAY_CONFIGS {
        let table = raw(rel);
        let mut found = Vec::new();
        files(&Value::Table(table.clone()), "", &mut found);
        assert!(found.len() >= 8, "{rel}: {found:?}");
        for (key, file) in &found {
            assert!(file.starts_with(SECRETS_DIR), "{rel}: {key} = {file} is outside {SECRETS_DIR}");
        }

        // No inline credential or key anywhere: a ConfigMap is no place for one.
        let mut stack = vec![Value::Table(table.clone())];
        while let Some(v) = stack.pop() {
            match v {
                Value::Table(t) => {
                    for (k, v) in t {
                        let inline =
                            ["key_id", "secret", "api_key", "client_id", "client_secret", "key_sha256"];
                        assert!(!inline.contains(&k.as_str()), "{rel}: inline `{k}`");
                        stack.push(v);
                    }
                }
                Value::Array(a) => stack.extend(a),
                _ => {}
            }
        }

        // Every client authenticates with a key file and pays with a set that exists.
        let sets: Vec<&String> = table["auth"]
            .get("sets")
            .and_then(Value::as_table)
            .map(|t| t.keys().collect())
            .unwrap_or_default();
        let clients =
            table.get("clients").and_then(Value::as_array).unwrap_or_else(|| panic!("{rel}: no [[clients]]"));
        assert!(clients.len() >= 2, "{rel}: two example apps");
        for c in clients {
            assert!(c.get("keys_file").is_some(), "{rel}: {c}");
            if let Some(set) = c.get("credentials").and_then(Value::as_str) {
                assert!(set == "default" || sets.iter().any(|s| *s == set), "{rel}: no set {set}");
            }
        }
        assert!(
            clients.iter().any(|c| c.get("credentials").is_some()),
            "{rel}: one app pays with its own set"
        );
        assert_eq!(table["server"]["listen"].as_str(), Some("0.0.0.0:8181"), "{rel}");
        assert!(
            table["server"].get("open_proxy").is_none(),
            "{rel}: clients authenticate, not a layer in front"
        );
    }
}

#[test]
fn gateway_redis_config_is_shared_gateway_plus_signed_keys_and_callback() {
    let shared = raw(SHARED_GATEWAY);
    let mut redis = raw(GATEWAY_REDIS);
    let signed = redis.remove("signed_keys").expect("[signed_keys]");
    assert_eq!(signed["budget_store"].as_str(), Some("redis://sidekey-redis:6379/0"));
    assert_eq!(signed["budget_fail_open"].as_bool(), Some(false), "budgets fail closed");
    let usage = redis.get_mut("usage").and_then(Value::as_table_mut).expect("[usage]");
    assert!(usage.remove("callback").is_some(), "[usage.callback]");
    if usage.is_empty() {
        redis.remove("usage");
    }
    assert_eq!(
        redis, shared,
        "{GATEWAY_REDIS} drifted from {SHARED_GATEWAY} beyond [signed_keys] and [usage.callback]"
    );
}
