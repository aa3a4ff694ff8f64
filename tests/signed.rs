//! `sidekey mint` as a backend would run it: the printed key verifies with the library's
//! verifier; errors are one line and exit 64; the secret never shows. Also loads the example
//! `[signed_keys]` block.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{SystemTime, UNIX_EPOCH};

use sidekey::signed::{looks_like_jwt, SignedKeyError, SignedKeysConfig, Verifier};

const BIN: &str = env!("CARGO_BIN_EXE_sidekey");
const SECRET: &str = "mint-test-secret-0123456789abcdefghij";
const NEXT_SECRET: &str = "mint-test-next-secret-0123456789abcdefghij";

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sidekey-mint-{}-{}", std::process::id(), fastrand::u32(..)));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn sidekey(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .output()
        .expect("sidekey runs")
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs()
}

#[test]
fn a_minted_key_verifies() {
    let dir = temp_dir();
    let secret_file = dir.join("signing-key");
    // The rotation window: mint signs with the first line, the verifier accepts either.
    std::fs::write(&secret_file, format!("{NEXT_SECRET}\n{SECRET}\n")).unwrap();
    let file = secret_file.to_str().unwrap();
    let before = now();
    let args = format!(
        "mint --secret-file {file} --model GigaChat/* --model gpt-4o --max-tokens 512 --budget-tokens 20000 \
         --ttl 10m --sub user-42 --event-id ev-1 --issuer my-backend --audience sidekey --client mobile"
    );
    let out = sidekey(&args.split_whitespace().collect::<Vec<_>>());
    let after = now();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.ends_with('\n') && stdout.lines().count() == 1, "{stdout:?}");
    let token = stdout.trim();
    assert!(looks_like_jwt(token));
    assert!(!stdout.contains(SECRET) && !stdout.contains(NEXT_SECRET));
    assert!(out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));

    let config = SignedKeysConfig {
        hs256_secret_file: Some(secret_file.clone()),
        issuer: Some("my-backend".into()),
        audience: Some("sidekey".into()),
        ..Default::default()
    };
    let key = Verifier::new(&config).unwrap().verify(token, after).unwrap();
    assert!((before..=after).contains(&key.iat().unwrap()));
    assert_eq!(key.exp(), key.iat().unwrap() + 600);
    assert_eq!((key.sub(), key.event_id(), key.client()), (Some("user-42"), Some("ev-1"), Some("mobile")));
    assert_eq!((key.max_tokens(), key.budget_tokens()), (Some(512), Some(20_000)));
    let jti = key.jti().unwrap();
    assert!(jti.len() == 32 && jti.bytes().all(|b| b.is_ascii_hexdigit()), "{jti}");
    assert!(key.allows_model("GigaChat/GigaChat-2-Max") && key.allows_model("gpt-4o"));
    assert!(!key.allows_model("gpt-4o-mini"));

    // Signed with the first line: a verifier without it refuses the key.
    let only_old = dir.join("old-key");
    std::fs::write(&only_old, SECRET).unwrap();
    let old =
        Verifier::new(&SignedKeysConfig { hs256_secret_file: Some(only_old), ..config.clone() }).unwrap();
    assert_eq!(old.verify(token, after), Err(SignedKeyError::BadSignature));
    // And it expires after its ttl (plus the leeway).
    assert_eq!(Verifier::new(&config).unwrap().verify(token, after + 600 + 30), Err(SignedKeyError::Expired));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn an_explicit_jti_and_the_defaults() {
    let dir = temp_dir();
    let secret_file = dir.join("signing-key");
    std::fs::write(&secret_file, SECRET).unwrap();
    let out = sidekey(&["mint", "--secret-file", secret_file.to_str().unwrap(), "--jti=k-7"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let token = String::from_utf8(out.stdout).unwrap();
    let config = SignedKeysConfig { hs256_secret_file: Some(secret_file), ..Default::default() };
    let key = Verifier::new(&config).unwrap().verify(token.trim(), now()).unwrap();
    assert_eq!(key.jti(), Some("k-7"));
    assert_eq!(key.exp() - key.iat().unwrap(), 600, "--ttl defaults to 10m");
    assert_eq!((key.models(), key.max_tokens(), key.budget_tokens(), key.sub()), (None, None, None, None));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_missing_secret_file_is_one_line_and_exit_64() {
    let dir = temp_dir();
    let missing = dir.join("no-such-key");
    let out = sidekey(&["mint", "--secret-file", missing.to_str().unwrap(), "--ttl", "10m"]);
    assert_eq!(out.status.code(), Some(64));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("sidekey: mint: cannot read ") && stderr.contains("no-such-key"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn a_short_secret_is_refused_without_showing_it() {
    let dir = temp_dir();
    let file = dir.join("short");
    std::fs::write(&file, "hunter2-short\n").unwrap();
    let out = sidekey(&["mint", "--secret-file", file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("shorter than 32 bytes") && !stderr.contains("hunter2"), "{stderr}");
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn bad_mint_arguments_exit_64() {
    for args in [&["mint"][..], &["mint", "--secret-file", "k", "--ttl", "10"], &["mint", "--frobnicate"]] {
        let out = sidekey(args);
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let stderr = String::from_utf8(out.stderr).unwrap();
        assert!(stderr.starts_with("sidekey: ") && stderr.contains("usage:"), "{stderr}");
    }
}

#[test]
fn the_example_block_documents_every_key() {
    #[derive(serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Example {
        signed_keys: SignedKeysConfig,
    }
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/config/signed-keys.example.toml");
    let text = std::fs::read_to_string(path).unwrap();
    let example: Example = toml::from_str(&text).unwrap();
    let c = example.signed_keys;
    assert!(c.hs256_secret_file.is_some() && c.issuer.is_some() && c.audience.is_some());
    // Every key of the section appears in the file, set or commented out.
    let defaults = toml::to_string(&SignedKeysConfig {
        public_key_file: Some("x".into()),
        hs256_secret_file: Some("x".into()),
        issuer: Some("x".into()),
        audience: Some("x".into()),
        ..Default::default()
    })
    .unwrap();
    for line in defaults.lines() {
        let key = line.split(" = ").next().unwrap();
        assert!(text.lines().any(|l| l.trim_start_matches("# ").starts_with(&format!("{key} = "))), "{key}");
    }
}
