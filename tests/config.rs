//! Configuration through the real binary: `sidekey check`, exit code 64 with the key named,
//! source precedence (file < SIDEKEY_* < EVOLUTION_*), and the documented example file.

use std::path::PathBuf;
use std::process::{Command, Output};

use sidekey::Config;

const BIN: &str = env!("CARGO_BIN_EXE_sidekey");

fn temp_config(name: &str, text: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("sidekey-config-{}-{}", std::process::id(), fastrand::u32(..)));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn sidekey(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args).env_clear().env("PATH", std::env::var("PATH").unwrap_or_default());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("sidekey runs")
}

fn text(out: &Output) -> (String, String) {
    (String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

const VALID: &str = r#"
[server]
listen = "127.0.0.1:1111"
[[auth.credentials]]
name = "primary"
key_id = "KEYID-in-file-31"
secret = "SECRET-in-file-47"
"#;

#[test]
fn check_prints_the_effective_config_redacted() {
    let path = temp_config("ok.toml", VALID);
    let out = sidekey(&["check", "--config", path.to_str().unwrap()], &[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("listen = \"127.0.0.1:1111\""), "{stdout}");
    assert!(stdout.contains("[redacted]"));
    assert!(!stdout.contains("KEYID-in-file-31") && !stdout.contains("SECRET-in-file-47"));
    assert!(!stderr.contains("SECRET-in-file-47"));
}

#[test]
fn a_bad_value_names_the_key_and_exits_64() {
    let path = temp_config("bad.toml", "[server]\nmax_request_body_bytes = \"lots\"\n");
    let out = sidekey(&["check", "--config", path.to_str().unwrap()], &[]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr.contains("server.max_request_body_bytes"), "{stderr}");
    assert!(stderr.contains("bad.toml"), "names the source: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one clear line: {stderr}");
}

#[test]
fn unknown_keys_are_errors() {
    let path = temp_config("typo.toml", "[server]\nlisten_addr = \"127.0.0.1:1\"\n");
    let out = sidekey(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out).1.contains("listen_addr"));
}

#[test]
fn a_named_file_must_exist() {
    let out = sidekey(&["--config", "/nonexistent/sidekey.toml"], &[]);
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out).1.contains("/nonexistent/sidekey.toml"));
    let out = sidekey(&[], &[("SIDEKEY_CONFIG", "/nonexistent/env.toml")]);
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out).1.contains("/nonexistent/env.toml"));
}

#[test]
fn non_loopback_needs_an_explicit_opt_in() {
    let path = temp_config("open.toml", &VALID.replace("127.0.0.1:1111", "0.0.0.0:8181"));
    let out = sidekey(&["--config", path.to_str().unwrap()], &[]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr.contains("server.listen") && stderr.contains("allow_non_loopback"), "{stderr}");
}

#[test]
fn missing_credentials_exit_64_naming_the_key() {
    let out = sidekey(&["check"], &[]);
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out).1.contains("auth.credentials"));
}

#[test]
fn a_wrongly_typed_secret_is_not_echoed() {
    let path = temp_config(
        "secret.toml",
        "[[auth.credentials]]\nname = \"p\"\nkey_id = \"k\"\nsecret = [\"SEKRIT-IN-ARRAY\"]\n",
    );
    let out = sidekey(&["check", "--config", path.to_str().unwrap()], &[]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr.contains("secret"), "{stderr}");
    assert!(!stderr.contains("SEKRIT-IN-ARRAY"), "{stderr}");
}

#[test]
fn env_overrides_file_and_evolution_names_work() {
    let path = temp_config("env.toml", VALID);
    let out = sidekey(
        &["check", "--config", path.to_str().unwrap()],
        &[
            ("SIDEKEY_SERVER__LISTEN", "127.0.0.1:2222"),
            ("SIDEKEY_AUTH__REFRESH_BEFORE_SECS", "120"),
            ("EVOLUTION_BASE_URL", "http://127.0.0.1:9/v1"),
            ("EVOLUTION_BACKUP_KEY_ID", "KEYID-backup-env"),
            ("EVOLUTION_BACKUP_SECRET", "SECRET-backup-env"),
        ],
    );
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("listen = \"127.0.0.1:2222\""), "{stdout}");
    assert!(stdout.contains("refresh_before_secs = 120"));
    assert!(stdout.contains("base_url = \"http://127.0.0.1:9/v1\""));
    assert!(stdout.contains("name = \"backup\""));
    assert!(!stdout.contains("SECRET-backup-env"));
}

#[test]
fn evolution_names_alone_are_enough() {
    let out = sidekey(&["check"], &[("EVOLUTION_KEY_ID", "KEYID-env"), ("EVOLUTION_SECRET", "SECRET-env")]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("name = \"primary\""));
}

#[test]
fn usage_errors_exit_64() {
    let out = sidekey(&["--frobnicate"], &[]);
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out).1.contains("usage:"));
    let out = sidekey(&["--version"], &[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(text(&out).0.starts_with("sidekey "));
}

#[test]
fn the_example_config_documents_every_key_and_loads() {
    let example = std::fs::read_to_string("config/sidekey.example.toml").unwrap();
    let config: Config = toml::from_str(&example).expect("example parses into the config tree");
    // Every key of the tree (as the defaults render it) appears in the example, with its default.
    let defaults: toml::Table = toml::from_str(&Config::default().to_redacted_toml()).unwrap();
    let example_table: toml::Table = toml::from_str(&example).unwrap();
    for (section, values) in &defaults {
        let Some(values) = values.as_table() else {
            continue;
        };
        for (key, default) in values {
            if key == "credentials" {
                continue;
            }
            let documented = example_table.get(section).and_then(|s| s.get(key));
            assert_eq!(documented, Some(default), "[{section}] {key} documented with its default");
        }
    }
    // Optional keys appear commented out.
    for optional in ["request_timeout_secs", "ca_file"] {
        assert!(example.contains(&format!("# {optional} = ")), "{optional}");
    }
    let mut inline = config.clone();
    for c in &mut inline.auth.credentials {
        (c.key_id_file, c.secret_file) = (None, None);
        (c.key_id, c.secret) = (Some("k".into()), Some("s".into()));
    }
    inline.validate().expect("the example validates once its files exist");
}

#[test]
fn the_provider_examples_load_and_validate() {
    for path in ["config/static.example.toml", "config/oauth2.example.toml"] {
        let text = std::fs::read_to_string(path).unwrap();
        let mut config: Config = toml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
        for c in &mut config.auth.credentials {
            if c.api_key_file.take().is_some() {
                c.api_key = Some("k".into());
            }
            if c.client_id_file.take().is_some() {
                c.client_id = Some("id".into());
            }
            if c.client_secret_file.take().is_some() {
                c.client_secret = Some("s".into());
            }
        }
        config.validate().unwrap_or_else(|e| panic!("{path}: {e}"));
    }
}

#[test]
fn provider_fields_are_checked() {
    let path = temp_config(
        "mixed.toml",
        "[auth]\nprovider = \"static\"\n[[auth.credentials]]\nname = \"p\"\nkey_id = \"k\"\napi_key = \"a\"\n",
    );
    let out = sidekey(&["check", "--config", path.to_str().unwrap()], &[]);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr.contains("auth.credentials[0].key_id") && stderr.contains("static"), "{stderr}");
    let path = temp_config(
        "oauth.toml",
        "[auth]\nprovider = \"oauth2_client_credentials\"\n[[auth.credentials]]\nname = \"p\"\nclient_id = \"i\"\nclient_secret = \"s\"\n",
    );
    let out = sidekey(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(64));
    assert!(text(&out).1.contains("auth.token_url"));
}

/// Replaces every `*_file` in a TOML tree with a file of its own in `dir` (the real ones exist
/// only where sidekey runs): distinct contents, so no key is listed for two clients.
fn with_temp_files(value: &mut toml::Value, dir: &std::path::Path, n: &mut u32) {
    match value {
        toml::Value::Table(t) => {
            for (k, v) in t.iter_mut() {
                if k.ends_with("_file") && v.is_str() {
                    *n += 1;
                    let file = dir.join(format!("file-{n}"));
                    std::fs::write(&file, format!("# stand-in\nstandin-{n}-{}\n", fastrand::u64(..)))
                        .unwrap();
                    #[cfg(unix)]
                    {
                        use std::os::unix::fs::PermissionsExt;
                        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
                    }
                    *v = toml::Value::String(file.display().to_string());
                } else {
                    with_temp_files(v, dir, n);
                }
            }
        }
        toml::Value::Array(a) => a.iter_mut().for_each(|v| with_temp_files(v, dir, n)),
        _ => {}
    }
}

#[test]
fn the_gateway_examples_load_and_validate() {
    for (path, check) in [
        (
            "config/gateway.example.toml",
            (|c: &Config| c.clients.len() == 2 && c.clients[0].policy.is_some()) as fn(&Config) -> bool,
        ),
        ("config/teams.example.toml", |c| {
            c.auth.sets.len() == 2 && c.clients.iter().any(|k| k.credentials.is_some())
        }),
        ("config/routes.example.toml", |c| c.routes.len() == 2 && c.clients.is_empty()),
        ("config/byok.example.toml", |c| c.caller_credentials.enabled),
    ] {
        let text = std::fs::read_to_string(path).unwrap();
        let mut value: toml::Value = toml::from_str(&text).unwrap_or_else(|e| panic!("{path}: {e}"));
        let dir = temp_config("unused", "").parent().unwrap().to_path_buf();
        with_temp_files(&mut value, &dir, &mut 0);
        let config: Config =
            toml::from_str(&toml::to_string(&value).unwrap()).unwrap_or_else(|e| panic!("{path}: {e}"));
        config.validate().unwrap_or_else(|e| panic!("{path}: {e}"));
        assert!(check(&config), "{path}: shows its scenario");
        let _ = std::fs::remove_dir_all(&dir);
        // Every key is commented: no key line follows a blank line or a section header directly.
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let is_key = line.contains(" = ") && !line.starts_with('#');
            let prev = if i == 0 { "" } else { lines[i - 1] };
            if is_key && (prev.trim().is_empty() || prev.starts_with('[')) {
                panic!("{path}:{}: `{line}` has no comment", i + 1);
            }
        }
    }
}
