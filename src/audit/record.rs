//! One audit record and its JSON line: written by hand, in a fixed field
//! order, into the per-thread buffer the sink reuses (see BENCHMARKS.md for
//! what that saves over serde_json on every request).

use std::sync::Arc;

use crate::{
    boxapi::{BoxId, Downscope, Target},
    cache::CachedToken,
    rpc::{Decision, RequestId, Rpc},
};

/// The longest record, newline included: `PIPE_BUF` on Linux, so a record
/// written to a pipe arrives whole even while other threads write theirs.
pub const MAX_RECORD_BYTES: usize = 4096;

/// The most bytes (after JSON escaping) of each field's value; a longer
/// value is cut at a character boundary and ends in `…`. Identities get
/// room to stay distinct (a Kubernetes service-account identity reaches
/// ~340 bytes, a SPIFFE id more); fixed words and ids get what they need.
/// The worst case over all fields, every one at its cap, is about 3.6 KB,
/// under [`MAX_RECORD_BYTES`] (`record` asserts it in debug builds, and a
/// test fills every field).
pub(super) const MAX_REASON_BYTES: usize = 1024;
const MAX_CALLER_BYTES: usize = 768;
const MAX_RULE_BYTES: usize = 256;
const MAX_APP_BYTES: usize = 128;
/// An `external_app_user_id` (the broker accepts at most 256 bytes).
const MAX_EXTERNAL_BYTES: usize = 256;
/// `rpc`, `decision`, `code`, `subject_type` (words the broker chooses),
/// `subject_id` and a target's id (at most 20 digits).
const MAX_WORD_BYTES: usize = 32;
/// `box_request_id`, `request_id` (at most 64 already) and `peer` (an IP
/// address or `uid N`).
const MAX_ID_BYTES: usize = 64;
/// One scope, and the scopes array (whole scopes only). Scopes are checked
/// against Box's list before they reach a record, so there are few and they
/// are short; the bound makes the record's limit hold whatever reaches it.
const MAX_SCOPE_BYTES: usize = 64;
const MAX_SCOPES_BYTES: usize = 768;

/// One audit record. The sink stamps its time (RFC 3339, UTC) when it
/// writes it; fields that are `None` are left out of the JSON (so is an
/// empty scope list).
/// The text fields are shared (`Arc<str>`), so filling one on the request
/// path copies no strings.
#[derive(Debug, Clone, Default)]
pub struct AuditEvent {
    /// `GetToken`, `GetDownscopedToken`, `RevokeToken` or an admin RPC.
    pub rpc: Rpc,
    /// The caller's identity (`unauthenticated` when it proved none).
    pub caller: Arc<str>,
    /// Where a refused request came from: the peer's IP address, or `uid N`
    /// on a Unix socket (left out of issuances).
    pub peer: Option<Arc<str>>,
    /// `allow`, `deny` or `error`.
    pub decision: Decision,
    /// The gRPC status code.
    pub code: &'static str,
    /// Why it was denied or failed.
    pub reason: Option<String>,
    /// The policy rule that allowed it.
    pub rule: Option<Arc<str>>,
    /// The configured app the token was served from; on a failure before
    /// that, the name the caller asked for (empty for the default app).
    pub app: Arc<str>,
    /// `enterprise` or `user`.
    pub subject_type: Option<&'static str>,
    /// The user id, for user subjects (for one asked by external id, the
    /// user it was resolved to).
    pub subject_id: Option<BoxId>,
    /// The `external_app_user_id` a user was asked for by.
    pub external_user_id: Option<Arc<str>>,
    /// True when the request created the App User (`create_if_missing`).
    pub provisioned: Option<bool>,
    /// For a downscoped token: its scopes, and its target written as
    /// `file:ID`, `folder:ID` or `shared_link:<sha256 prefix>` (a shared link
    /// can itself be a capability, so only its fingerprint is recorded).
    pub downscope: Option<Arc<Downscope>>,
    /// Served from the cache without a call to Box.
    pub cache_hit: Option<bool>,
    /// The token served: its SHA-256 (as `token_sha256`) and Box's request
    /// id for its mint (as `box_request_id`) are recorded, never the token.
    pub issued: Option<Arc<CachedToken>>,
    /// SHA-256 of a token not served from the cache (a revoked one), written
    /// as lowercase hex; `issued` takes precedence.
    pub token_sha256: Option<[u8; 32]>,
    /// The request's id (the caller's `x-request-id`, or one the broker made),
    /// also in the logs and the response's `x-request-id`.
    pub request_id: Option<RequestId>,
    /// On a summary of repeats: how many more records identical to this one
    /// (but for time and request id) were counted instead of written.
    pub repeated: Option<u64>,
}

impl AuditEvent {
    /// This record as one JSON object (no newline), stamped with `second`
    /// (`YYYY-MM-DDTHH:MM:SS`) and `millis`. Written by hand, in a fixed
    /// field order, into a reused buffer: the audit record is on every
    /// request's path.
    pub(super) fn write_json(&self, second: &str, millis: u32, out: &mut Vec<u8>) {
        out.reserve(1024);
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
        field(out, b",\"rpc\":\"", self.rpc.name(), MAX_WORD_BYTES);
        field(out, b",\"caller\":\"", &self.caller, MAX_CALLER_BYTES);
        if let Some(peer) = &self.peer {
            field(out, b",\"peer\":\"", peer, MAX_ID_BYTES);
        }
        field(out, b",\"decision\":\"", self.decision.name(), MAX_WORD_BYTES);
        field(out, b",\"code\":\"", self.code, MAX_WORD_BYTES);
        if let Some(reason) = &self.reason {
            field(out, b",\"reason\":\"", reason, MAX_REASON_BYTES);
        }
        if let Some(rule) = &self.rule {
            field(out, b",\"rule\":\"", rule, MAX_RULE_BYTES);
        }
        field(out, b",\"app\":\"", &self.app, MAX_APP_BYTES);
        if let Some(subject_type) = self.subject_type {
            field(out, b",\"subject_type\":\"", subject_type, MAX_WORD_BYTES);
        }
        if let Some(subject_id) = &self.subject_id {
            field(out, b",\"subject_id\":\"", subject_id.as_str(), MAX_WORD_BYTES);
        }
        if let Some(external) = &self.external_user_id {
            field(out, b",\"external_user_id\":\"", external, MAX_EXTERNAL_BYTES);
        }
        if let Some(provisioned) = self.provisioned {
            key(out, "provisioned");
            out.extend_from_slice(if provisioned { b"true" } else { b"false" });
        }
        if let Some(downscope) = &self.downscope {
            if !downscope.scopes.is_empty() {
                key(out, "scopes");
                out.push(b'[');
                let start = out.len();
                for (i, scope) in downscope.scopes.iter().enumerate() {
                    if out.len() - start > MAX_SCOPES_BYTES {
                        break;
                    }
                    if i > 0 {
                        out.push(b',');
                    }
                    json_str(out, scope, MAX_SCOPE_BYTES);
                }
                out.push(b']');
            }
            if let Some(target) = &downscope.target {
                key(out, "target");
                out.push(b'"');
                match target {
                    Target::File(id) => {
                        out.extend_from_slice(b"file:");
                        escaped(out, id.as_str(), MAX_WORD_BYTES);
                    }
                    Target::Folder(id) => {
                        out.extend_from_slice(b"folder:");
                        escaped(out, id.as_str(), MAX_WORD_BYTES);
                    }
                    Target::SharedLink(url) => {
                        out.extend_from_slice(b"shared_link:");
                        hex_into(out, &crate::boxapi::downscope::link_fingerprint(url));
                    }
                }
                out.push(b'"');
            }
        }
        if let Some(hit) = self.cache_hit {
            key(out, "cache_hit");
            out.extend_from_slice(if hit { b"true" } else { b"false" });
        }
        let sha256 = self.issued.as_ref().map(|t| &t.sha256).or(self.token_sha256.as_ref());
        if let Some(digest) = sha256 {
            key(out, "token_sha256");
            out.push(b'"');
            hex_into(out, digest);
            out.push(b'"');
        }
        if let Some(id) = self.issued.as_ref().and_then(|t| t.request_id.as_deref()) {
            field(out, b",\"box_request_id\":\"", id, MAX_ID_BYTES);
        }
        if let Some(id) = &self.request_id {
            field(out, b",\"request_id\":\"", id.as_str(), MAX_ID_BYTES);
        }
        if let Some(n) = self.repeated {
            key(out, "repeated");
            out.extend_from_slice(n.to_string().as_bytes());
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

/// `,"key":"value"`, the value escaped and at most `max` bytes; `prefix` is
/// `,"key":"` (one copy instead of four small ones: this runs a dozen times
/// per request).
fn field(out: &mut Vec<u8>, prefix: &[u8], value: &str, max: usize) {
    out.extend_from_slice(prefix);
    escaped(out, value, max);
    out.push(b'"');
}

/// A JSON string of `value`, escaped and at most `max` bytes between the quotes.
fn json_str(out: &mut Vec<u8>, value: &str, max: usize) {
    out.push(b'"');
    escaped(out, value, max);
    out.push(b'"');
}

/// `value` escaped as inside a JSON string (quotes, backslashes, control
/// characters, as serde_json does), cut at a character boundary with `…`
/// when the escaped form would pass `max` bytes.
pub(super) fn escaped(out: &mut Vec<u8>, value: &str, max: usize) {
    const ELLIPSIS: &[u8] = "…".as_bytes();
    // Nearly every value is short and needs no escaping: copy it whole.
    if value.len() <= max && needs_no_escaping(value.as_bytes()) {
        out.extend_from_slice(value.as_bytes());
        return;
    }
    let start = out.len();
    // Where the value is cut if it turns out too long: after the last
    // character that still leaves room for the ellipsis.
    let mut cut = start;
    for c in value.chars() {
        match c {
            '"' => out.extend_from_slice(b"\\\""),
            '\\' => out.extend_from_slice(b"\\\\"),
            '\n' => out.extend_from_slice(b"\\n"),
            '\r' => out.extend_from_slice(b"\\r"),
            '\t' => out.extend_from_slice(b"\\t"),
            c if u32::from(c) < 0x20 => {
                out.extend_from_slice(b"\\u00");
                #[allow(clippy::cast_possible_truncation, reason = "below 0x20")]
                hex_into(out, &[u32::from(c) as u8]);
            }
            c => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
        }
        let written = out.len() - start;
        if written > max {
            out.truncate(cut);
            out.extend_from_slice(ELLIPSIS);
            return;
        }
        if written <= max.saturating_sub(ELLIPSIS.len()) {
            cut = out.len();
        }
    }
}

/// True when `bytes` holds nothing JSON escapes inside a string (a control
/// character, `"` or `\\`). Checked eight bytes at a time: a dozen values
/// per record, on every request.
pub(super) fn needs_no_escaping(bytes: &[u8]) -> bool {
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGH: u64 = u64::from_ne_bytes([0x80; 8]);
    // Some byte of `word` is below `n` (for n <= 0x80; exact, no false hits).
    let any_below = |word: u64, n: u8| word.wrapping_sub(ONES * u64::from(n)) & !word & HIGH != 0;
    let any_equal = |word: u64, b: u8| any_below(word ^ (ONES * u64::from(b)), 1);
    let mut chunks = bytes.chunks_exact(8);
    for chunk in &mut chunks {
        let mut eight = [0u8; 8];
        eight.copy_from_slice(chunk);
        let word = u64::from_ne_bytes(eight);
        if any_below(word, 0x20) || any_equal(word, b'"') || any_equal(word, b'\\') {
            return false;
        }
    }
    chunks.remainder().iter().all(plain)
}

/// A byte JSON copies as is inside a string.
pub(super) fn plain(b: &u8) -> bool {
    *b >= 0x20 && *b != b'"' && *b != b'\\'
}

/// Lowercase hex of `bytes`, appended (formatted on the stack, one copy).
fn hex_into(out: &mut Vec<u8>, bytes: &[u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for chunk in bytes.chunks(32) {
        let mut hex = [0u8; 64];
        for (pair, b) in hex.chunks_exact_mut(2).zip(chunk) {
            pair[0] = DIGITS[usize::from(b >> 4)];
            pair[1] = DIGITS[usize::from(b & 0xf)];
        }
        out.extend_from_slice(&hex[..2 * chunk.len()]);
    }
}
