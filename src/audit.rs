//! The audit trail: one JSON object per line for every issuance, denial and
//! failure, on its own sink (stdout, stderr or a file). It carries the
//! SHA-256 fingerprint of an issued token, never the token.

use std::{
    fmt,
    io::Write,
    path::Path,
    sync::{Arc, Mutex},
    time::SystemTime,
};

use serde::Serialize;
use sha2::{Digest as _, Sha256};

/// One audit record.
#[derive(Debug, Clone, Default, Serialize)]
pub struct AuditEvent {
    /// RFC 3339, UTC.
    pub time: String,
    /// `GetToken`, `GetDownscopedToken` or `RevokeToken`.
    pub rpc: &'static str,
    /// The caller's identity (`unauthenticated` when it proved none).
    pub caller: String,
    /// `allow`, `deny` or `error`.
    pub decision: &'static str,
    /// The gRPC status code.
    pub code: String,
    /// Why it was denied or failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The policy rule that allowed it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The app asked for (empty when the caller left it empty).
    pub app: String,
    /// `enterprise` or `user`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject_type: Option<&'static str>,
    /// The user id, for user subjects.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub subject_id: Option<String>,
    /// Downscope scopes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// `file:ID`, `folder:ID` or `shared_link:<sha256 prefix>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// Served from the cache without a call to Box.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_hit: Option<bool>,
    /// Lowercase hex SHA-256 of the issued (or revoked) token.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_sha256: Option<String>,
    /// Box's request id for the mint or exchange, when it sent one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub box_request_id: Option<String>,
    /// The request's id (the caller's `x-request-id`, or one the broker made),
    /// also in the logs and the response's `x-request-id`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// Lowercase hex SHA-256 of a token: enough to correlate, useless to replay.
pub fn fingerprint(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Where audit records go.
pub struct AuditSink {
    out: Mutex<Box<dyn Write + Send>>,
}

impl fmt::Debug for AuditSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuditSink")
    }
}

impl AuditSink {
    /// Records to standard output.
    pub fn stdout() -> Self {
        Self {
            out: Mutex::new(Box::new(std::io::stdout())),
        }
    }

    /// Records to standard error.
    pub fn stderr() -> Self {
        Self {
            out: Mutex::new(Box::new(std::io::stderr())),
        }
    }

    /// Appends records to `path` (created if missing).
    pub fn file(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self {
            out: Mutex::new(Box::new(file)),
        })
    }

    /// Records into memory, for tests: the returned buffer fills with JSON lines.
    pub fn memory() -> (Self, Arc<Mutex<Vec<u8>>>) {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        (
            Self {
                out: Mutex::new(Box::new(SharedBuffer(buffer.clone()))),
            },
            buffer,
        )
    }

    /// Writes one record. A failing sink is logged, never fatal to the request.
    pub fn record(&self, mut event: AuditEvent) {
        event.time = rfc3339(SystemTime::now());
        let Ok(mut line) = serde_json::to_vec(&event) else {
            return;
        };
        line.push(b'\n');
        let mut out = self.out.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = out.write_all(&line).and_then(|()| out.flush()) {
            tracing::error!(error = %e, "writing an audit record failed");
        }
    }
}

struct SharedBuffer(Arc<Mutex<Vec<u8>>>);

impl Write for SharedBuffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// RFC 3339 in UTC with milliseconds, e.g. `2026-11-22T23:49:17.123Z`.
/// RFC 3339 UTC with milliseconds, e.g. `2026-11-23T00:23:55.250Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since the epoch (Howard Hinnant's algorithm).
    let z = i64::try_from(days).unwrap_or(0) + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_393_435_250);
        assert_eq!(rfc3339(t), "2026-11-23T00:23:55.250Z");
        let leap = SystemTime::UNIX_EPOCH + Duration::from_secs(951_782_400);
        assert_eq!(rfc3339(leap), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn records_are_json_lines() {
        let (sink, buffer) = AuditSink::memory();
        sink.record(AuditEvent {
            rpc: "GetToken",
            caller: "c".to_owned(),
            decision: "allow",
            ..AuditEvent::default()
        });
        let text = String::from_utf8(buffer.lock().map(|b| b.clone()).unwrap_or_default()).unwrap_or_default();
        let value: serde_json::Value = serde_json::from_str(text.trim()).unwrap_or_default();
        assert_eq!(value["decision"], "allow");
        assert!(value["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    }
}
