//! The token endpoint's response parser: never panics, and anything it accepts is usable.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sidekey::token::iam::{parse_token_response, MAX_LIFETIME};

fuzz_target!(|data: &[u8]| {
    if let Ok(f) = parse_token_response(data) {
        assert!(!f.access_token.is_empty());
        assert!(f.access_token.expose().bytes().all(|b| b.is_ascii_graphic()));
        assert!(f.expires_in.as_secs_f64() >= 1.0 && f.expires_in <= MAX_LIFETIME);
    }
});
