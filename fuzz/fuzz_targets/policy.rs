//! The request policy on arbitrary bodies: never panics; a rewrite is valid JSON within the cap.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sidekey::config::{MaxTokensMode, PolicyConfig};
use sidekey::proxy::inspect::{Policy, Verdict};
use sidekey::proxy::path::Endpoint;

fuzz_target!(|data: &[u8]| {
    let policy = Policy::new(
        &PolicyConfig {
            allowed_models: vec!["GigaChat/*".into(), "m?".into()],
            max_tokens: Some(100),
            max_tokens_mode: MaxTokensMode::Clamp,
            set_max_tokens_when_missing: true,
            ..Default::default()
        },
        true,
    );
    for endpoint in [Endpoint::ChatCompletions, Endpoint::Responses, Endpoint::Embeddings] {
        if let Ok(Verdict::Rewritten { body, .. }) = policy.inspect(endpoint, data) {
            let v: serde_json::Value = serde_json::from_slice(&body).expect("rewrites are JSON");
            for field in ["max_tokens", "max_completion_tokens", "max_output_tokens"] {
                if let Some(n) = v.get(field).and_then(|n| n.as_u64()) {
                    assert!(n <= 100);
                }
            }
        }
    }
});
