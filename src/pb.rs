//! The generated protobuf and gRPC code for `boxbroker.v1`, included once.
//!
//! Generated code is not held to the crate's lints. Messages that carry a
//! credential get a hand-written `Debug` here (build.rs tells prost to skip
//! deriving one), so a stray `{:?}` can never print a token.

#![allow(
    clippy::all,
    clippy::pedantic,
    clippy::allow_attributes_without_reason,
    missing_debug_implementations,
    unreachable_pub,
    unused_qualifications,
    reason = "generated code: its shape is prost's and tonic's, not ours"
)]

use std::fmt;

tonic::include_proto!("boxbroker.v1");

/// The encoded file descriptor set that gRPC reflection serves.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("boxbroker_descriptor");

impl fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessToken")
            .field("access_token", &"****")
            .field("expires_at", &self.expires_at)
            .field("token_type", &self.token_type)
            .field("scopes", &self.scopes)
            .field("restricted_to", &self.restricted_to)
            .finish()
    }
}

impl fmt::Debug for RevokeTokenRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RevokeTokenRequest")
            .field("app", &self.app)
            .field("access_token", &"****")
            .finish()
    }
}

impl fmt::Debug for ImportKeyRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ImportKeyRequest")
            .field("app", &self.app)
            .field("private_key_pem", &"****")
            .field("passphrase", &"****")
            .field("kid", &self.kid)
            .finish()
    }
}

impl fmt::Debug for RotateClientSecretRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RotateClientSecretRequest")
            .field("app", &self.app)
            .field("new_secret", &"****")
            .finish()
    }
}
