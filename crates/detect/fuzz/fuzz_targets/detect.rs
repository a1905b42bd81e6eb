//! Detection never panics and is consistent: once a prefix is classified,
//! more bytes never change the verdict for the well-known cases.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_detect::{Detection, MAX_PREFIX, Protocol, detect};

fuzz_target!(|data: &[u8]| {
    let data = &data[..data.len().min(MAX_PREFIX)];
    let full = detect(data);
    for end in 0..data.len() {
        if let Detection::Known(p @ (Protocol::Http2 | Protocol::Tls)) = detect(&data[..end]) {
            assert_eq!(full, Detection::Known(p), "verdict changed with more bytes");
        }
    }
});
