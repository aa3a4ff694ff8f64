//! The sidekey configs shipped under `deploy/` parse with the real `Config` (unknown keys are
//! refused) and validate, and the classic-sidecar variant differs from the base only where it
//! should. `.ci/validate-deploy.sh` checks the same files against the Kubernetes manifests.

use std::path::{Path, PathBuf};

use sidekey::config::LogFormat;
use sidekey::Config;

/// Every sidekey config file under `deploy/`.
const BASE: &str = "deploy/base/sidekey.toml";
const CLASSIC: &str = "deploy/overlays/classic-sidecar/sidekey.toml";
const DEPLOY_CONFIGS: [&str; 2] = [BASE, CLASSIC];

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
