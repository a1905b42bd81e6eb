//! Any bytes a control plane sends as an `OutboundPolicy` decode to a
//! policy or an error, never a panic, and every duration in a decoded
//! policy is within `MAX_DURATION`, so the proxy's deadline arithmetic on
//! it cannot overflow (a backoff near `i64::MAX` seconds once aborted it).
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use weft_destinations::MAX_DURATION;
use weft_detect::Authority;
use weft_policy_api::{decode, wire};

fuzz_target!(|data: &[u8]| {
    let Ok(msg) = wire::OutboundPolicy::decode(data) else {
        return;
    };
    let Ok(authority) = "web.demo:8080".parse::<Authority>() else {
        return;
    };
    let Ok(policy) = decode(&authority, &msg) else {
        return;
    };
    for d in policy.durations() {
        assert!(d <= MAX_DURATION, "{d:?}");
        let _ = std::time::Instant::now() + d;
    }
});
