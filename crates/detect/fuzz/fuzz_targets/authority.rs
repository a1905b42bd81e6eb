//! Authority parsing never panics, and what it accepts renders to a string
//! it accepts again, unchanged: the routing key is stable.
#![no_main]

use libfuzzer_sys::fuzz_target;
use weft_detect::Authority;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Ok(a) = Authority::parse(s, 80) {
        let again = Authority::parse(&a.to_string(), 1).expect("rendered authority parses");
        assert_eq!(a, again);
    }
});
