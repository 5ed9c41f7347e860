//! The words audit records, metrics and logs share about one RPC: which
//! method it was ([`Rpc`]), its id ([`RequestId`], which the service's gate
//! reads or makes and the audit record carries), how it was decided
//! ([`Decision`]) and its gRPC code's name ([`code_name`]).
//!
//! A leaf: typed once where a request enters, compared as enums on the hot
//! path, spelled out only where a record or a label is written.

/// A method of the broker's two services, or one they do not have.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Rpc {
    /// `TokenBrokerService/GetToken`.
    GetToken,
    /// `TokenBrokerService/GetDownscopedToken`.
    GetDownscopedToken,
    /// `TokenBrokerService/RevokeToken`.
    RevokeToken,
    /// `BrokerAdminService/GenerateKey`.
    GenerateKey,
    /// `BrokerAdminService/ImportKey`.
    ImportKey,
    /// `BrokerAdminService/ActivateKey`.
    ActivateKey,
    /// `BrokerAdminService/RetireKey`.
    RetireKey,
    /// `BrokerAdminService/ListKeys`.
    ListKeys,
    /// `BrokerAdminService/RotateClientSecret`.
    RotateClientSecret,
    /// `BrokerAdminService/RetireClientSecrets`.
    RetireClientSecrets,
    /// `BrokerAdminService/InvalidateTokens`.
    InvalidateTokens,
    /// `BrokerAdminService/GetStatus`.
    GetStatus,
    /// A method neither service has (`unknown` in records).
    #[default]
    Unknown,
}

impl Rpc {
    /// The client API's methods (`TokenBrokerService`), in metrics order.
    pub const CLIENT: [Self; 3] = [Self::GetToken, Self::GetDownscopedToken, Self::RevokeToken];
    /// The admin API's methods (`BrokerAdminService`).
    pub const ADMIN: [Self; 9] = [
        Self::GenerateKey,
        Self::ImportKey,
        Self::ActivateKey,
        Self::RetireKey,
        Self::ListKeys,
        Self::RotateClientSecret,
        Self::RetireClientSecrets,
        Self::InvalidateTokens,
        Self::GetStatus,
    ];

    /// The method's name as the proto spells it (`GetToken`), or `unknown`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::GetToken => "GetToken",
            Self::GetDownscopedToken => "GetDownscopedToken",
            Self::RevokeToken => "RevokeToken",
            Self::GenerateKey => "GenerateKey",
            Self::ImportKey => "ImportKey",
            Self::ActivateKey => "ActivateKey",
            Self::RetireKey => "RetireKey",
            Self::ListKeys => "ListKeys",
            Self::RotateClientSecret => "RotateClientSecret",
            Self::RetireClientSecrets => "RetireClientSecrets",
            Self::InvalidateTokens => "InvalidateTokens",
            Self::GetStatus => "GetStatus",
            Self::Unknown => "unknown",
        }
    }

    /// The client API's method named `method`, if it is one.
    pub fn client(method: &str) -> Option<Self> {
        Self::CLIENT.into_iter().find(|rpc| rpc.name() == method)
    }

    /// The admin API's method named `method`, if it is one.
    pub fn admin(method: &str) -> Option<Self> {
        Self::ADMIN.into_iter().find(|rpc| rpc.name() == method)
    }

    /// For a client API method, its place in [`Self::CLIENT`].
    pub const fn client_index(self) -> Option<usize> {
        match self {
            Self::GetToken => Some(0),
            Self::GetDownscopedToken => Some(1),
            Self::RevokeToken => Some(2),
            _ => None,
        }
    }
}

impl std::fmt::Display for Rpc {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// How a request was decided, as an audit record says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Decision {
    /// Served.
    #[default]
    Allow,
    /// Refused the caller: authentication, policy or a limit.
    Deny,
    /// Failed for another reason (Box, a bad request, the broker's state).
    Error,
}

impl Decision {
    /// `allow`, `deny` or `error`.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Allow => "allow",
            Self::Deny => "deny",
            Self::Error => "error",
        }
    }

    /// The decision a finished RPC's code means: refusals of the caller
    /// (`PERMISSION_DENIED`, `UNAUTHENTICATED`, `RESOURCE_EXHAUSTED`) are
    /// denials, any other failure an error.
    pub const fn of(code: tonic::Code) -> Self {
        match code {
            tonic::Code::Ok => Self::Allow,
            tonic::Code::PermissionDenied | tonic::Code::Unauthenticated | tonic::Code::ResourceExhausted => Self::Deny,
            _ => Self::Error,
        }
    }
}

/// A gRPC code's canonical name (`PERMISSION_DENIED`, as the gRPC spec and
/// other languages' libraries spell it), in metrics labels, audit records and
/// CLI errors.
pub const fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::{
        Aborted, AlreadyExists, Cancelled, DataLoss, DeadlineExceeded, FailedPrecondition, Internal, InvalidArgument,
        NotFound, Ok, OutOfRange, PermissionDenied, ResourceExhausted, Unauthenticated, Unavailable, Unimplemented,
        Unknown,
    };
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// A request id: at most 64 printable ASCII characters, held inline (no
/// allocation per request).
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct RequestId {
    bytes: [u8; Self::MAX_LEN],
    len: u8,
}

impl RequestId {
    /// The longest request id kept; a longer one from a caller is replaced.
    pub const MAX_LEN: usize = 64;

    /// `id`, if it is 1 to 64 printable ASCII characters.
    pub fn parse(id: &str) -> Option<Self> {
        let valid = !id.is_empty() && id.len() <= Self::MAX_LEN && id.bytes().all(|b| b.is_ascii_graphic());
        valid.then(|| {
            let mut bytes = [0u8; Self::MAX_LEN];
            bytes[..id.len()].copy_from_slice(id.as_bytes());
            Self {
                bytes,
                // At most 64, checked above.
                len: u8::try_from(id.len()).unwrap_or(0),
            }
        })
    }

    /// A new id: 16 hex digits, a per-process random prefix and a counter —
    /// unique without a system call per request.
    pub fn generate() -> Self {
        use std::sync::{
            OnceLock,
            atomic::{AtomicU32, Ordering},
        };
        static PREFIX: OnceLock<u32> = OnceLock::new();
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let prefix = *PREFIX.get_or_init(rand::random);
        let next = NEXT.fetch_add(1, Ordering::Relaxed);
        let mut bytes = [0u8; Self::MAX_LEN];
        let _ = hex::encode_to_slice(prefix.to_be_bytes(), &mut bytes[..8]);
        let _ = hex::encode_to_slice(next.to_be_bytes(), &mut bytes[8..16]);
        Self { bytes, len: 16 }
    }

    /// The id.
    pub fn as_str(&self) -> &str {
        // Only printable ASCII is ever stored, so this never falls back.
        std::str::from_utf8(&self.bytes[..usize::from(self.len)]).unwrap_or_default()
    }
}

impl std::fmt::Debug for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Debug::fmt(self.as_str(), f)
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The header a request id travels in, both ways (and from an edge to its
/// central broker).
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// The `domain` of every `google.rpc.ErrorInfo` a broker sends: what tells
/// an edge that a refusal is a broker's own answer, not a proxy's.
pub const ERROR_DOMAIN: &str = "box-token-broker";

/// Whether spans are exported (OpenTelemetry is on): only then is a
/// caller's `traceparent` worth reading.
static TRACES_EXPORTED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Records that spans are exported from now on (`telemetry` calls it).
pub fn set_traces_exported() {
    TRACES_EXPORTED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// See [`set_traces_exported`].
pub fn traces_exported() -> bool {
    TRACES_EXPORTED.load(std::sync::atomic::Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_method_is_found_by_its_name_in_its_own_service_only() {
        for rpc in Rpc::CLIENT {
            assert_eq!(Rpc::client(rpc.name()), Some(rpc));
            assert_eq!(Rpc::admin(rpc.name()), None);
        }
        for rpc in Rpc::ADMIN {
            assert_eq!(Rpc::admin(rpc.name()), Some(rpc));
            assert_eq!(Rpc::client(rpc.name()), None);
            assert_eq!(rpc.client_index(), None);
        }
        for (i, rpc) in Rpc::CLIENT.into_iter().enumerate() {
            assert_eq!(rpc.client_index(), Some(i));
        }
        assert_eq!(Rpc::client("unknown"), None);
    }

    #[test]
    fn decisions_follow_the_code() {
        assert_eq!(Decision::of(tonic::Code::Ok), Decision::Allow);
        assert_eq!(Decision::of(tonic::Code::PermissionDenied), Decision::Deny);
        assert_eq!(Decision::of(tonic::Code::ResourceExhausted), Decision::Deny);
        assert_eq!(Decision::of(tonic::Code::Unavailable), Decision::Error);
    }
}
