//! The integration tests: one binary with a module per area, so the whole
//! suite links once (nineteen binaries of ~300 MB each filled CI's disk) and
//! shares one global log and trace subscriber (`common::observed`).
//! Run one area with `cargo test --test integration policy::`.

#![allow(clippy::unwrap_used, clippy::expect_used, reason = "a test fails by panicking")]
#![allow(
    unreachable_pub,
    reason = "a test binary has no API: `pub` in common/ is for its sibling modules"
)]

mod common;

mod cache;
mod cli;
mod clients;
mod deploy;
mod downscope;
mod edge;
mod fakebox;
mod fleet;
mod hardening;
mod keys;
mod keystore;
mod kubernetes_auth;
mod layering;
mod lifecycle;
mod metrics;
mod mint;
mod mtls;
mod observability;
mod policy;
mod requests;
mod resilience;
mod rotation;
mod secrets;
mod unix_socket;
mod upstream_errors;
mod users;
