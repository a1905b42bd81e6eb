//! ClientHello parsing never panics, and asks for more bytes only while the
//! first record is incomplete.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_detect::{ClientHello, client_hello};

fuzz_target!(|data: &[u8]| {
    if let ClientHello::NeedMore(n) = client_hello(data) {
        assert!(n > data.len(), "asked for {n} bytes with {} in hand", data.len());
    }
});
