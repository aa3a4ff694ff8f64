//! Verifier tests against keys signed in the test: HS256, EdDSA and ES256, every refusal, the
//! algorithm rules, rotation and the reload loop. Claim rules to the second are in `claims`.

use std::time::Duration;

use jsonwebtoken::{Algorithm, EncodingKey};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

use super::testutil::*;
use super::*;

const NOW: u64 = 1_700_000_000;

fn claims() -> Value {
    json!({"exp": NOW + 600, "iat": NOW, "sub": "user-42", "jti": "k-1", "model": "GigaChat/*",
           "max_tokens": 512, "budget_tokens": 20000, "event_id": "ev-1"})
}

fn malformed(r: Result<SignedKey, SignedKeyError>) -> bool {
    matches!(r, Err(SignedKeyError::Malformed(_)))
}

#[test]
fn hs256_key_verifies() {
    let dir = tempdir();
    let v = Verifier::new(&hs256_config(dir.path(), &[SECRET_A])).unwrap();
    assert_eq!((v.algorithm(), v.key_count()), ("HS256", 1));
    let key = v.verify(&hs256(SECRET_A, &claims()), NOW).unwrap();
    assert_eq!((key.sub(), key.jti(), key.event_id()), (Some("user-42"), Some("k-1"), Some("ev-1")));
    assert_eq!((key.max_tokens(), key.budget_tokens()), (Some(512), Some(20000)));
    assert!(key.allows_model("GigaChat/GigaChat-2-Max") && !key.allows_model("gpt-4o"));
}

#[test]
fn eddsa_and_es256_keys_verify() {
    for pair in [Asymmetric::ed25519(), Asymmetric::p256()] {
        let dir = tempdir();
        let v = Verifier::new(&public_key_config(dir.path(), &pair.public_pem)).unwrap();
        assert_eq!(v.algorithm(), if pair.alg == Algorithm::EdDSA { "EdDSA" } else { "ES256" });
        let key = v.verify(&pair.sign(&claims()), NOW).unwrap();
        assert_eq!(key.sub(), Some("user-42"));
        // The same claims signed by another key pair of the same kind.
        let other = if pair.alg == Algorithm::EdDSA { Asymmetric::ed25519() } else { Asymmetric::p256() };
        assert_eq!(v.verify(&other.sign(&claims()), NOW), Err(SignedKeyError::BadSignature));
    }
}

#[test]
fn a_wrong_secret_or_a_tampered_key_is_a_bad_signature() {
    let dir = tempdir();
    let v = Verifier::new(&hs256_config(dir.path(), &[SECRET_A])).unwrap();
    assert_eq!(v.verify(&hs256(SECRET_B, &claims()), NOW), Err(SignedKeyError::BadSignature));
    // Widen the budget in the payload, keep the signature.
    let token = hs256(SECRET_A, &claims());
    let parts: Vec<&str> = token.split('.').collect();
    let mut widened = claims();
    widened["budget_tokens"] = json!(1_000_000_000);
    let forged = raw_token(r#"{"alg":"HS256","typ":"JWT"}"#, &widened.to_string(), None);
    let forged = format!("{}.{}", forged.trim_end_matches('.'), parts[2]);
    assert_eq!(v.verify(&forged, NOW), Err(SignedKeyError::BadSignature));
    // A truncated signature.
    assert_eq!(v.verify(&token[..token.len() - 2], NOW), Err(SignedKeyError::BadSignature));
}

#[test]
fn only_the_configured_algorithm_is_accepted() {
    let dir = tempdir();
    let ed = Asymmetric::ed25519();
    let public = Verifier::new(&public_key_config(dir.path(), &ed.public_pem)).unwrap();
    let hmac = Verifier::new(&hs256_config(dir.path(), &[SECRET_A])).unwrap();

    // Alg confusion: an HS256 token "signed" with the public key as the HMAC secret.
    let confused = hs256(&ed.public_pem, &claims());
    assert!(malformed(public.verify(&confused, NOW)), "HS256 against a public key");
    let confused = raw_token(r#"{"alg":"HS256"}"#, &claims().to_string(), Some(ed.public_pem.as_bytes()));
    assert!(malformed(public.verify(&confused, NOW)));

    // `alg: none`, with and without a signature, against both kinds.
    for v in [&public, &hmac] {
        for none in ["none", "None", "NONE"] {
            let header = format!(r#"{{"alg":"{none}","typ":"JWT"}}"#);
            assert!(malformed(v.verify(&raw_token(&header, &claims().to_string(), None), NOW)));
            let signed = raw_token(&header, &claims().to_string(), Some(SECRET_A.as_bytes()));
            assert!(malformed(v.verify(&signed, NOW)));
        }
    }

    // An asymmetric token against the HMAC config, ES256 against EdDSA, other HMAC sizes.
    assert!(malformed(hmac.verify(&ed.sign(&claims()), NOW)));
    assert!(malformed(public.verify(&Asymmetric::p256().sign(&claims()), NOW)));
    for alg in [Algorithm::HS384, Algorithm::HS512] {
        let token = sign(alg, &EncodingKey::from_secret(SECRET_A.as_bytes()), &claims());
        assert!(malformed(hmac.verify(&token, NOW)), "{alg:?}");
    }
    let unknown = raw_token(r#"{"alg":"HS999"}"#, &claims().to_string(), Some(SECRET_A.as_bytes()));
    assert!(malformed(hmac.verify(&unknown, NOW)));
    let no_alg = raw_token(r#"{"typ":"JWT"}"#, &claims().to_string(), Some(SECRET_A.as_bytes()));
    assert!(malformed(hmac.verify(&no_alg, NOW)));
}

#[test]
fn anything_unparsable_is_malformed() {
    let dir = tempdir();
    let v = Verifier::new(&hs256_config(dir.path(), &[SECRET_A])).unwrap();
    let secret = Some(SECRET_A.as_bytes());
    let header = r#"{"alg":"HS256"}"#;
    let too_long = hs256(SECRET_A, &json!({"exp": NOW + 60, "pad": "x".repeat(MAX_TOKEN_BYTES)}));
    let cases = [
        String::new(),
        "sk-live-plain-client-key".into(),
        "a.b".into(),
        "a.b.c.d".into(),
        "!!!.???.***".into(),
        raw_token("[1,2]", "{}", secret),
        raw_token(header, "not json", secret),
        raw_token(header, "[1,2,3]", secret),
        raw_token(header, "\"a string\"", secret),
        raw_token(header, &json!({"iat": NOW}).to_string(), secret), // no exp
        raw_token(header, &json!({"exp": NOW + 60, "budget_tokens": 5}).to_string(), secret), // no jti
        too_long,
    ];
    for token in cases {
        let got = v.verify(&token, NOW);
        assert!(malformed(got.clone()), "{:.60} -> {got:?}", token);
    }
    assert_eq!(
        v.verify(&raw_token(header, &json!({"exp": NOW + 60, "budget_tokens": 5}).to_string(), secret), NOW),
        Err(SignedKeyError::Malformed("budget_tokens needs a jti"))
    );
}

#[test]
fn time_rules_use_the_given_now() {
    let dir = tempdir();
    let config = SignedKeysConfig {
        leeway_secs: 30,
        max_lifetime_secs: 3600,
        ..hs256_config(dir.path(), &[SECRET_A])
    };
    let v = Verifier::new(&config).unwrap();
    let token = hs256(SECRET_A, &json!({"exp": NOW + 60, "nbf": NOW, "iat": NOW}));
    // The gateway's clock behind the backend's by up to the leeway.
    assert!(v.verify(&token, NOW - 30).is_ok());
    assert_eq!(v.verify(&token, NOW - 31), Err(SignedKeyError::NotYetValid));
    // And ahead of it, past exp, by less than the leeway.
    assert!(v.verify(&token, NOW + 89).is_ok());
    assert_eq!(v.verify(&token, NOW + 90), Err(SignedKeyError::Expired));
    assert_eq!(v.verify(&token, NOW + 90).unwrap_err().reason(), "expired");
    let long = hs256(SECRET_A, &json!({"exp": NOW + 3601, "iat": NOW}));
    assert_eq!(v.verify(&long, NOW), Err(SignedKeyError::LifetimeTooLong { max_secs: 3600 }));
    let no_iat = hs256(SECRET_A, &json!({"exp": NOW + 3601}));
    assert_eq!(v.verify(&no_iat, NOW), Err(SignedKeyError::LifetimeTooLong { max_secs: 3600 }));
    assert!(v.verify(&no_iat, NOW + 1).is_ok(), "what is left of it fits");
}

#[test]
fn issuer_and_audience_from_the_config() {
    let dir = tempdir();
    let config = SignedKeysConfig {
        issuer: Some("my-backend".into()),
        audience: Some("sidekey".into()),
        ..hs256_config(dir.path(), &[SECRET_A])
    };
    let v = Verifier::new(&config).unwrap();
    let with = |iss: &str, aud: Value| hs256(SECRET_A, &json!({"exp": NOW + 60, "iss": iss, "aud": aud}));
    assert!(v.verify(&with("my-backend", json!("sidekey")), NOW).is_ok());
    assert!(v.verify(&with("my-backend", json!(["other", "sidekey"])), NOW).is_ok());
    assert_eq!(v.verify(&with("evil", json!("sidekey")), NOW), Err(SignedKeyError::WrongIssuer));
    assert_eq!(v.verify(&with("my-backend", json!("other")), NOW), Err(SignedKeyError::WrongAudience));
}

#[test]
fn rotation_of_the_hs256_secret() {
    let dir = tempdir();
    let config = hs256_config(dir.path(), &[SECRET_A]);
    let path = config.hs256_secret_file.clone().unwrap();
    let v = Verifier::new(&config).unwrap();
    let (old, new) = (hs256(SECRET_A, &claims()), hs256(SECRET_B, &claims()));
    assert_eq!(v.verify(&new, NOW), Err(SignedKeyError::BadSignature));
    assert!(!v.reload().unwrap(), "unchanged file: no swap");

    // The rotation window: both secrets listed, either verifies.
    std::fs::write(&path, format!("{SECRET_B}\r\n\n  {SECRET_A}  \n")).unwrap();
    assert!(v.reload().unwrap());
    assert_eq!(v.key_count(), 2);
    let clone = v.clone();
    assert!(clone.verify(&old, NOW).is_ok() && clone.verify(&new, NOW).is_ok(), "clones share the keys");

    // The old secret is retired.
    std::fs::write(&path, format!("{SECRET_B}\n")).unwrap();
    assert!(v.reload().unwrap());
    assert_eq!(v.verify(&old, NOW), Err(SignedKeyError::BadSignature));
    assert!(v.verify(&new, NOW).is_ok());
}

#[test]
fn a_broken_key_file_keeps_the_last_good_keys() {
    let dir = tempdir();
    let config = hs256_config(dir.path(), &[SECRET_A]);
    let path = config.hs256_secret_file.clone().unwrap();
    let v = Verifier::new(&config).unwrap();
    let token = hs256(SECRET_A, &claims());
    for broken in ["", "\n\n", "short\n"] {
        std::fs::write(&path, broken).unwrap();
        assert!(v.reload().is_err(), "{broken:?}");
        assert!(v.verify(&token, NOW).is_ok(), "still the last good secret");
    }
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(v.reload(), Err(KeyFileError::Read { .. })));
    assert!(v.verify(&token, NOW).is_ok());
    std::fs::write(&path, SECRET_B).unwrap();
    assert!(v.reload().unwrap());
    assert_eq!(v.verify(&token, NOW), Err(SignedKeyError::BadSignature));
}

#[test]
fn rotation_of_the_public_key() {
    let dir = tempdir();
    let (ed, ec) = (Asymmetric::ed25519(), Asymmetric::p256());
    let config = public_key_config(dir.path(), &ed.public_pem);
    let v = Verifier::new(&config).unwrap();
    std::fs::write(config.public_key_file.as_ref().unwrap(), "garbage").unwrap();
    assert!(v.reload().is_err());
    assert!(v.verify(&ed.sign(&claims()), NOW).is_ok());
    // The new key may even be of the other kind: the algorithm follows the key.
    std::fs::write(config.public_key_file.as_ref().unwrap(), &ec.public_pem).unwrap();
    assert!(v.reload().unwrap());
    assert_eq!(v.algorithm(), "ES256");
    assert!(v.verify(&ec.sign(&claims()), NOW).is_ok());
    assert!(malformed(v.verify(&ed.sign(&claims()), NOW)));
}

#[test]
fn unusable_key_files_are_refused_at_start() {
    let dir = tempdir();
    let d = dir.path();
    let err = |c: &SignedKeysConfig| Verifier::new(c).unwrap_err().to_string();
    assert!(err(&SignedKeysConfig::default()).contains("exactly one"));
    assert!(err(&hs256_config(d, &["short"])).contains("line 1 is shorter than 32 bytes"));
    assert!(err(&hs256_config(d, &[SECRET_A, "", "short"])).contains("line 3"));
    assert!(err(&hs256_config(d, &["", " "])).contains("holds no secret"));
    let missing = SignedKeysConfig { hs256_secret_file: Some(d.join("nope")), ..Default::default() };
    assert!(err(&missing).starts_with("cannot read"));

    let pem_of = |tag: &str, der: Vec<u8>| pem::encode(&pem::Pem::new(tag, der));
    let ed = Asymmetric::ed25519();
    let cases = [
        ("not a pem".to_string(), "is not a PEM file"),
        (pem_of("PRIVATE KEY", vec![1, 2, 3]), "private key"),
        (pem_of("EC PRIVATE KEY", vec![1, 2, 3]), "private key"),
        (pem_of("CERTIFICATE", vec![1, 2, 3]), "is not a PEM public key"),
        (format!("{}{}", ed.public_pem, ed.public_pem), "more than one PEM block"),
        // ecPublicKey on secp384r1.
        (
            pem_of(
                "PUBLIC KEY",
                vec![
                    0x30, 0x10, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x05, 0x2b, 0x81,
                    0x04, 0x00, 0x22,
                ],
            ),
            "curve other than P-256",
        ),
        (pem_of("PUBLIC KEY", vec![0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01]), "RSA"),
        (pem_of("PUBLIC KEY", vec![0x30, 0x00]), "is not an ES256 (P-256) or EdDSA"),
        (pem_of("PUBLIC KEY", vec![0x06, 0x03, 0x2b, 0x65, 0x70]), "cannot be parsed"),
    ];
    for (content, want) in cases {
        let got = err(&public_key_config(d, &content));
        assert!(got.contains(want), "{want}: {got}");
    }
}

#[tokio::test(start_paused = true)]
async fn run_picks_up_a_rotation_and_stops_on_cancel() {
    let dir = tempdir();
    let config = SignedKeysConfig { key_poll_secs: 5, ..hs256_config(dir.path(), &[SECRET_A]) };
    let v = Verifier::new(&config).unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(v.clone().run(cancel.clone()));
    let new = hs256(SECRET_B, &claims());
    std::fs::write(config.hs256_secret_file.as_ref().unwrap(), SECRET_B).unwrap();
    let mut polls = 0;
    while v.verify(&new, NOW).is_err() {
        polls += 1;
        assert!(polls < 100, "the loop never reloaded");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    assert!((4..=10).contains(&polls), "reloaded after one poll period, not {polls} s");
    cancel.cancel();
    tokio::time::timeout(Duration::from_secs(1), task).await.expect("run returns on cancel").unwrap();
}

#[test]
fn looks_like_jwt_tells_signed_keys_from_client_keys() {
    let ed = Asymmetric::ed25519();
    assert!(looks_like_jwt(&hs256(SECRET_A, &claims())));
    assert!(looks_like_jwt(&ed.sign(&claims())));
    assert!(looks_like_jwt(&raw_token(r#"{"alg":"none"}"#, "{}", None)), "refused later as malformed");
    for not in [
        "",
        "sk-live-0123456789",
        "sk.live.key",
        "a.b.c",
        "e30.e30.sig",               // header {} has no alg
        "W10.e30.sig",               // header [] is not an object
        "eyJhbGciOiJIUzI1NiJ9..sig", // empty payload
        "eyJhbGciOiJIUzI1NiJ9.e30.s+g=",
        "eyJhbGciOiJIUzI1NiJ9.e30.sig.extra",
    ] {
        assert!(!looks_like_jwt(not), "{not}");
    }
    assert!(looks_like_jwt("eyJhbGciOiJIUzI1NiJ9.e30.sig"));
    let huge = format!("eyJhbGciOiJIUzI1NiJ9.{}.sig", "A".repeat(MAX_TOKEN_BYTES));
    assert!(!looks_like_jwt(&huge));
}

#[test]
fn nothing_secret_in_debug_display_or_logs() {
    let dir = tempdir();
    let config = hs256_config(dir.path(), &[SECRET_A]);
    let path = config.hs256_secret_file.clone().unwrap();
    let (logs, v) = capture_logs(|| {
        let v = Verifier::new(&config).unwrap();
        std::fs::write(&path, format!("{SECRET_B}\n")).unwrap();
        v.reload().unwrap();
        std::fs::write(&path, "tooshort-secret\n").unwrap();
        let _ = v.reload();
        std::fs::write(&path, format!("{SECRET_A}\n")).unwrap();
        v.reload().unwrap();
        v
    });
    let token = hs256(SECRET_A, &claims());
    let signature = token.rsplit('.').next().unwrap().to_string();
    let key = v.verify(&token, NOW).unwrap();
    let mut shown = vec![logs, format!("{v:?}"), format!("{key:?}"), format!("{config:?}")];
    let bad = hs256(SECRET_B, &claims());
    for (t, now) in [(&token, NOW + 10_000), (&bad, NOW), (&token, 0)] {
        let e = v.verify(t, now).unwrap_err();
        shown.push(format!("{e} {e:?}"));
    }
    shown.push(v.verify(&format!("{token}x.y"), NOW).unwrap_err().to_string());
    shown.push(Verifier::new(&hs256_config(dir.path(), &["tooshort-secret"])).unwrap_err().to_string());
    for s in &shown {
        for secret in [SECRET_A, SECRET_B, "tooshort", &token, &signature, &bad] {
            assert!(!s.contains(secret), "{s:?} shows {secret:?}");
        }
    }
    assert!(shown[0].contains("keeping the last good keys"), "{}", shown[0]);
}

/// Runs `f` with a subscriber that writes into a buffer; returns what was logged.
fn capture_logs<T>(f: impl FnOnce() -> T) -> (String, T) {
    use std::sync::{Arc, Mutex};
    #[derive(Clone, Default)]
    struct Buf(Arc<Mutex<Vec<u8>>>);
    impl std::io::Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let buf = Buf::default();
    let writer = buf.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_max_level(tracing::Level::TRACE)
        .with_ansi(false)
        .finish();
    let out = tracing::subscriber::with_default(subscriber, f);
    let logs = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
    (logs, out)
}
