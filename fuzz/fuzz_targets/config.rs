//! The config parsers and validators, a central broker's and an edge's
//! (`box-broker check-config` before it touches any file the config
//! names), with an environment override.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        let path = std::path::Path::new("/fuzz/broker.toml");
        let _ = box_token_broker::config::Config::parse(text, path, std::iter::empty());
        let env = [("BOX_BROKER_SERVER__MAX_CONNECTIONS".to_owned(), "7".to_owned())];
        let _ = box_token_broker::config::Config::parse(text, path, env.clone());
        let edge = std::path::Path::new("/fuzz/edge.toml");
        let _ = box_token_broker::config::EdgeConfig::parse(text, edge, std::iter::empty());
        let _ = box_token_broker::config::EdgeConfig::parse(text, edge, env);
    }
});
