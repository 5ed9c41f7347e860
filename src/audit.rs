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

use sha2::{Digest as _, Sha256};

/// One audit record. The sink stamps its time (RFC 3339, UTC) when it
/// writes it; fields that are `None` or empty are left out of the JSON.
#[derive(Debug, Clone, Default)]
pub struct AuditEvent {
    /// `GetToken`, `GetDownscopedToken` or `RevokeToken`.
    pub rpc: &'static str,
    /// The caller's identity (`unauthenticated` when it proved none).
    pub caller: String,
    /// `allow`, `deny` or `error`.
    pub decision: &'static str,
    /// The gRPC status code.
    pub code: &'static str,
    /// Why it was denied or failed.
    pub reason: Option<String>,
    /// The policy rule that allowed it.
    pub rule: Option<Arc<str>>,
    /// The app asked for (empty when the caller left it empty).
    pub app: String,
    /// `enterprise` or `user`.
    pub subject_type: Option<&'static str>,
    /// The user id, for user subjects.
    pub subject_id: Option<String>,
    /// Downscope scopes.
    pub scopes: Vec<String>,
    /// `file:ID`, `folder:ID` or `shared_link:<sha256 prefix>`.
    pub target: Option<String>,
    /// Served from the cache without a call to Box.
    pub cache_hit: Option<bool>,
    /// SHA-256 of the issued (or revoked) token, written as lowercase hex.
    pub token_sha256: Option<[u8; 32]>,
    /// Box's request id for the mint or exchange, when it sent one.
    pub box_request_id: Option<String>,
    /// The request's id (the caller's `x-request-id`, or one the broker made),
    /// also in the logs and the response's `x-request-id`.
    pub request_id: Option<String>,
}

impl AuditEvent {
    /// This record as one JSON object (no newline), stamped with `second`
    /// (`YYYY-MM-DDTHH:MM:SS`) and `millis`. Written by hand, in a fixed
    /// field order, into a reused buffer: the audit record is on every
    /// request's path.
    fn write_json(&self, second: &str, millis: u32, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"time\":\"");
        out.extend_from_slice(second.as_bytes());
        let millis = millis.min(999);
        #[allow(clippy::cast_possible_truncation, reason = "each digit is below 10")]
        out.extend_from_slice(&[
            b'.',
            b'0' + (millis / 100) as u8,
            b'0' + (millis / 10 % 10) as u8,
            b'0' + (millis % 10) as u8,
            b'Z',
            b'"',
        ]);
        field(out, "rpc", self.rpc);
        field(out, "caller", &self.caller);
        field(out, "decision", self.decision);
        field(out, "code", self.code);
        if let Some(reason) = &self.reason {
            field(out, "reason", reason);
        }
        if let Some(rule) = &self.rule {
            field(out, "rule", rule);
        }
        field(out, "app", &self.app);
        if let Some(subject_type) = self.subject_type {
            field(out, "subject_type", subject_type);
        }
        if let Some(subject_id) = &self.subject_id {
            field(out, "subject_id", subject_id);
        }
        if !self.scopes.is_empty() {
            key(out, "scopes");
            out.push(b'[');
            for (i, scope) in self.scopes.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                json_str(out, scope);
            }
            out.push(b']');
        }
        if let Some(target) = &self.target {
            field(out, "target", target);
        }
        if let Some(hit) = self.cache_hit {
            key(out, "cache_hit");
            out.extend_from_slice(if hit { b"true" } else { b"false" });
        }
        if let Some(digest) = &self.token_sha256 {
            let mut hex = [0u8; 64];
            if hex::encode_to_slice(digest, &mut hex).is_ok() {
                key(out, "token_sha256");
                out.push(b'"');
                out.extend_from_slice(&hex);
                out.push(b'"');
            }
        }
        if let Some(id) = &self.box_request_id {
            field(out, "box_request_id", id);
        }
        if let Some(id) = &self.request_id {
            field(out, "request_id", id);
        }
        out.push(b'}');
    }
}

/// `,"key":`
fn key(out: &mut Vec<u8>, name: &str) {
    out.extend_from_slice(b",\"");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\":");
}

/// `,"key":"value"`, the value escaped.
fn field(out: &mut Vec<u8>, name: &str, value: &str) {
    key(out, name);
    json_str(out, value);
}

/// A JSON string, escaped (quotes, backslashes, control characters).
fn json_str(out: &mut Vec<u8>, value: &str) {
    // Writing into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut *out, value);
}

/// SHA-256 of a token: enough to correlate, useless to replay.
pub fn digest(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Lowercase hex SHA-256 of a token.
pub fn fingerprint(token: &str) -> String {
    hex::encode(digest(token))
}

/// Where audit records go.
pub struct AuditSink {
    out: Mutex<Out>,
}

/// The writer, the line buffer reused for every record, and the current
/// second already formatted (records in the same second reuse it).
struct Out {
    writer: Box<dyn Write + Send>,
    line: Vec<u8>,
    second: u64,
    stamp: String,
}

impl fmt::Debug for AuditSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuditSink")
    }
}

impl AuditSink {
    fn new(writer: Box<dyn Write + Send>) -> Self {
        Self {
            out: Mutex::new(Out {
                writer,
                line: Vec::with_capacity(512),
                second: u64::MAX,
                stamp: String::new(),
            }),
        }
    }

    /// Records to standard output.
    pub fn stdout() -> Self {
        Self::new(Box::new(std::io::stdout()))
    }

    /// Records to standard error.
    pub fn stderr() -> Self {
        Self::new(Box::new(std::io::stderr()))
    }

    /// Appends records to `path` (created if missing).
    pub fn file(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self::new(Box::new(file)))
    }

    /// Records into memory, for tests: the returned buffer fills with JSON lines.
    pub fn memory() -> (Self, Arc<Mutex<Vec<u8>>>) {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        (Self::new(Box::new(SharedBuffer(buffer.clone()))), buffer)
    }

    /// Writes one record, with one `write` to the sink, before returning.
    /// A failing sink is logged, never fatal to the request.
    pub fn record(&self, event: AuditEvent) {
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let mut out = self.out.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let Out {
            writer,
            line,
            second,
            stamp,
        } = &mut *out;
        if *second != now.as_secs() {
            *second = now.as_secs();
            *stamp = utc_second(now.as_secs());
        }
        line.clear();
        event.write_json(stamp, now.subsec_millis(), line);
        line.push(b'\n');
        if let Err(e) = writer.write_all(line).and_then(|()| writer.flush()) {
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

/// RFC 3339 UTC with milliseconds, e.g. `2026-11-23T00:23:55.250Z`.
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    format!("{}.{:03}Z", utc_second(d.as_secs()), d.subsec_millis())
}

/// `YYYY-MM-DDTHH:MM:SS` in UTC for `secs` since the Unix epoch.
fn utc_second(secs: u64) -> String {
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
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
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

    fn lines(buffer: &Mutex<Vec<u8>>) -> Vec<serde_json::Value> {
        let text = String::from_utf8(buffer.lock().map(|b| b.clone()).unwrap_or_default()).unwrap_or_default();
        text.lines()
            .map(|l| serde_json::from_str(l).unwrap_or(serde_json::Value::Null))
            .collect()
    }

    #[test]
    fn records_are_json_lines_with_only_the_fields_set() {
        let (sink, buffer) = AuditSink::memory();
        sink.record(AuditEvent {
            rpc: "GetToken",
            caller: "c".to_owned(),
            decision: "allow",
            code: "Ok",
            ..AuditEvent::default()
        });
        let records = lines(&buffer);
        assert_eq!(records.len(), 1);
        let record = records[0].as_object().cloned().unwrap_or_default();
        let keys: Vec<&str> = record.keys().map(String::as_str).collect();
        assert_eq!(keys, ["app", "caller", "code", "decision", "rpc", "time"]);
        assert_eq!(record["decision"], "allow");
        let time = record["time"].as_str().unwrap_or_default();
        assert_eq!(time.len(), "2026-11-23T00:23:55.250Z".len(), "{time}");
        assert!(time.ends_with('Z') && time.as_bytes()[19] == b'.', "{time}");
    }

    #[test]
    fn every_field_is_written_and_strings_are_escaped() {
        let (sink, buffer) = AuditSink::memory();
        let event = AuditEvent {
            rpc: "GetDownscopedToken",
            caller: "spiffe://x/\"quoted\"".to_owned(),
            decision: "deny",
            code: "PermissionDenied",
            reason: Some("line\nbreak and \\ backslash \u{1}".to_owned()),
            rule: Some(Arc::from("portal")),
            app: "default".to_owned(),
            subject_type: Some("user"),
            subject_id: Some("42".to_owned()),
            scopes: vec!["item_preview".to_owned(), "item_download".to_owned()],
            target: Some("folder:7".to_owned()),
            cache_hit: Some(false),
            token_sha256: Some(digest("t")),
            box_request_id: Some("box-1".to_owned()),
            request_id: Some("req-1".to_owned()),
        };
        sink.record(event.clone());
        sink.record(event);
        let records = lines(&buffer);
        assert_eq!(records.len(), 2, "one line per record");
        let r = &records[1];
        assert_eq!(r["caller"], "spiffe://x/\"quoted\"");
        assert_eq!(r["reason"], "line\nbreak and \\ backslash \u{1}");
        assert_eq!(r["rule"], "portal");
        assert_eq!(r["scopes"], serde_json::json!(["item_preview", "item_download"]));
        assert_eq!(r["cache_hit"], false);
        assert_eq!(r["token_sha256"], fingerprint("t"));
        assert_eq!(
            fingerprint("t"),
            "e3b98a4da31a127d4bde6e43033f66ba274cab0eb7eb1c70ec41402bf6273dd8"
        );
        for key in [
            "subject_type",
            "subject_id",
            "target",
            "box_request_id",
            "request_id",
            "app",
            "code",
        ] {
            assert!(r[key].is_string(), "{key} is written");
        }
    }
}
