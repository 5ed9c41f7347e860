//! The policy parser and validator, and a decision under every policy
//! that parses (glob matching, the rules' checks).
#![no_main]

use std::time::Duration;

use box_token_broker::{
    boxapi::{BoxId, Target},
    policy::{Ask, Policy, PolicySubject, Request},
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(policy) = Policy::parse(text, "policy.toml") else {
        return;
    };
    let scopes = vec!["item_preview".to_owned()];
    let folder = BoxId::parse("7500002").ok().map(Target::Folder);
    for caller in ["apikey:portal", "system:serviceaccount:ns:sa", "anonymous", ""] {
        for ask in [
            Ask::Full,
            Ask::Revoke,
            Ask::Downscoped {
                scopes: &scopes,
                target: folder.as_ref(),
            },
        ] {
            let _ = policy.decide(&Request {
                caller,
                app: "default",
                subject: PolicySubject::User("7200001"),
                ask,
                min_ttl: Duration::from_secs(600),
                force_refresh: true,
            });
        }
        let _ = policy.may_revoke(caller, "default");
        let _ = policy.apps_for(caller, ["default", "billing"]);
    }
});
