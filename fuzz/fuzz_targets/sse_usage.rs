//! The usage scanner: any bytes, split anywhere, never panic; splitting never changes the result.
#![no_main]

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;
use sidekey::proxy::usage::UsageScanner;

fuzz_target!(|input: (u16, &[u8])| {
    let (split, data) = input;
    for ct in ["text/event-stream", "application/json"] {
        let mut whole = UsageScanner::for_content_type(ct).unwrap();
        whole.feed(&Bytes::copy_from_slice(data));
        let mut parts = UsageScanner::for_content_type(ct).unwrap();
        let at = usize::from(split).min(data.len());
        parts.feed(&Bytes::copy_from_slice(&data[..at]));
        parts.feed(&Bytes::copy_from_slice(&data[at..]));
        assert_eq!(whole.finish(), parts.finish());
    }
});
