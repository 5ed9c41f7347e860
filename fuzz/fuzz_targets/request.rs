//! Request validation: whatever protobuf a caller sends, decoded as each
//! client RPC's message and validated into the domain's request (ids,
//! scopes, targets, shared links, min_ttl). The first byte picks the RPC.
#![no_main]

use box_token_broker::{pb, service::broker};
use libfuzzer_sys::fuzz_target;
use prost::Message as _;

fuzz_target!(|data: &[u8]| {
    let Some((which, message)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            if let Ok(request) = pb::GetTokenRequest::decode(message) {
                let _ = broker::token_request(&request);
            }
        }
        1 => {
            if let Ok(request) = pb::GetDownscopedTokenRequest::decode(message) {
                let _ = broker::downscope_request(&request);
            }
        }
        _ => {
            if let Ok(subject) = pb::Subject::decode(message) {
                let _ = broker::parse_subject(Some(&subject));
            }
        }
    }
});
