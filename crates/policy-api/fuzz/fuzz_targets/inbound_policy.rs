//! Any bytes a control plane sends as an inbound `Server` decode to a
//! policy weft can enforce or an error, never a panic.
#![no_main]

use std::num::NonZeroUsize;

use libfuzzer_sys::fuzz_target;
use linkerd2_proxy_api::inbound::Server;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(server) = Server::decode(data) else {
        return;
    };
    let Some(clients) = NonZeroUsize::new(16) else {
        return;
    };
    let _ = weft_policy_api::inbound::decode(server, clients);
});
