//! Path mapping: a forwarded request never leaves `{base_url}/` and keeps no dot segment.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sidekey::proxy::path::{strip_prefix, Endpoint, Target};

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else { return };
    let target = Target::new(&"https://api.example/base/v1".parse().unwrap()).unwrap();
    // Most inputs would never reach past the prefix check; try each under /v1/ too.
    for path in [raw.to_string(), format!("/v1/{raw}")] {
        check(&target, &path);
    }
});

fn check(target: &Target, path: &str) {
    let _ = Endpoint::classify(path);
    if let Ok(rest) = strip_prefix(path) {
        if let Ok(uri) = target.join(rest) {
            assert_eq!(uri.authority().map(|a| a.as_str()), Some("api.example"));
            assert!(uri.path().starts_with("/base/v1"));
            for seg in uri.path().split('/') {
                let decoded = seg.to_ascii_lowercase().replace("%2e", ".");
                assert!(decoded != "." && decoded != "..", "{}", uri);
            }
        }
    }
}
