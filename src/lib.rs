//! box-token-broker: one process holds a Box app's server-auth credentials and
//! hands every other service only the Box access token it needs, over gRPC.
//!
//! See ARCHITECTURE.md for the bird's-eye view and code map.

pub mod admin;
pub mod audit;
pub mod auth;
pub mod boxapi;
pub mod broker;
pub mod cache;
pub mod cli;
pub mod clock;
pub mod config;
pub mod duration;
pub mod edge;
pub mod error;
pub mod fakebox;
pub mod fingerprint;
pub mod histogram;
pub mod keys;
pub mod l2;
pub mod metrics;
pub mod pb;
pub mod policy;
pub mod process;
pub mod reload;
pub mod rpc;
pub mod runtime;
pub mod service;
pub mod telemetry;
