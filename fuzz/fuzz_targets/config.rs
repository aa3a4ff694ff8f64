//! Config parsing and validation: any TOML text is accepted or refused cleanly.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(config) = toml::from_str::<sidekey::Config>(text) {
        let _ = config.validate();
        let _ = config.to_redacted_toml();
    }
});
