//! Any text as a destinations file parses or is refused with an error,
//! never a panic, and every duration it accepts is within `MAX_DURATION`.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use weft_destinations::{Destinations, MAX_DURATION};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(d) = Destinations::parse(Path::new("fuzz.yaml"), text) else {
        return;
    };
    for dest in d.by_authority.values() {
        for d in dest.policy.durations() {
            assert!(d <= MAX_DURATION, "{d:?}");
        }
    }
});
