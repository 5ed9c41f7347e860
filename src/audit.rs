//! The audit trail: one JSON object per line for every issuance, denial and
//! failure, on its own sink (stdout, stderr or a file). It carries the
//! SHA-256 fingerprint of an issued token, never the token.
//!
//! Every record is on a request's path, so writing one takes no lock and
//! allocates nothing: it is formatted into a buffer of the writing thread and
//! written with one `write(2)` before the response is sent. One write per
//! line keeps lines whole without a lock: appends to a file opened with
//! `O_APPEND` do not interleave, and a pipe writes at most `PIPE_BUF` (4096
//! bytes on Linux) atomically — which is why a record is never longer than
//! [`MAX_RECORD_BYTES`]: its free-text fields are cut short (ending in `…`).
//!
//! Refusals (`deny` and `error`) that repeat are counted, not written one by
//! one: the first of a kind (same RPC, caller, peer, code, reason and
//! subject) is written at once; identical ones in the next
//! [`DEFAULT_REPEAT_WINDOW`] are counted and written as one record with
//! `"repeated": N` when the window closes. A flood of bad credentials costs
//! one record per kind per window, and no kind goes unrecorded. Issuances
//! are always written one by one.

use std::{
    cell::RefCell,
    collections::HashMap,
    fmt,
    fs::File,
    hash::{BuildHasher as _, Hash as _, Hasher as _},
    io::Write,
    os::fd::AsFd as _,
    path::Path,
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use crate::{
    boxapi::{BoxId, Downscope, Target},
    cache::CachedToken,
    rpc::{Decision, Rpc},
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
const MAX_REASON_BYTES: usize = 1024;
const MAX_CALLER_BYTES: usize = 768;
const MAX_RULE_BYTES: usize = 256;
const MAX_APP_BYTES: usize = 128;
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
    /// The user id, for user subjects.
    pub subject_id: Option<BoxId>,
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

impl fmt::Debug for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl AuditEvent {
    /// This record as one JSON object (no newline), stamped with `second`
    /// (`YYYY-MM-DDTHH:MM:SS`) and `millis`. Written by hand, in a fixed
    /// field order, into a reused buffer: the audit record is on every
    /// request's path.
    fn write_json(&self, second: &str, millis: u32, out: &mut Vec<u8>) {
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
fn escaped(out: &mut Vec<u8>, value: &str, max: usize) {
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
fn needs_no_escaping(bytes: &[u8]) -> bool {
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
fn plain(b: &u8) -> bool {
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

/// Which counts of repeated refusals [`AuditSink::flush_repeats`] writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flush {
    /// Those whose window has closed (each second).
    Closed,
    /// Every one (at shutdown).
    All,
}

/// How long identical refusals are counted instead of written (see the
/// module documentation).
pub const DEFAULT_REPEAT_WINDOW: Duration = Duration::from_secs(10);
/// The most kinds of refusal counted at once; past it, a new kind is
/// written (never lost) but its repeats are not counted.
const MAX_REPEAT_KINDS: usize = 16 * 1024;
const REPEAT_SHARDS: usize = 16;

/// Where audit records go.
pub struct AuditSink {
    writer: Writer,
    repeats: Option<Repeats>,
}

/// Refusals being counted, by kind (a hash of every field but the time and
/// the request id: two revocations of different tokens are two kinds), in
/// shards.
struct Repeats {
    window: Duration,
    hasher: std::hash::RandomState,
    shards: Box<[Mutex<HashMap<u64, Repeat>>]>,
}

struct Repeat {
    /// When the record that opened the window was written.
    first: Instant,
    /// Identical records since, not written.
    suppressed: u64,
    /// The record that opened the window.
    sample: AuditEvent,
}

impl Repeats {
    fn new(window: Duration) -> Self {
        Self {
            window,
            hasher: std::hash::RandomState::new(),
            shards: (0..REPEAT_SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    fn kind(&self, event: &AuditEvent) -> u64 {
        let mut h = self.hasher.build_hasher();
        event.rpc.hash(&mut h);
        event.caller.hash(&mut h);
        event.peer.hash(&mut h);
        event.decision.hash(&mut h);
        event.code.hash(&mut h);
        event.reason.hash(&mut h);
        event.rule.hash(&mut h);
        event.app.hash(&mut h);
        event.subject_type.hash(&mut h);
        event.subject_id.as_ref().map(BoxId::as_str).hash(&mut h);
        event.downscope.hash(&mut h);
        event.token_sha256.hash(&mut h);
        h.finish()
    }
}

impl Repeat {
    /// The record standing for the suppressed repeats, if there were any.
    fn summary(&self) -> Option<AuditEvent> {
        (self.suppressed > 0).then(|| AuditEvent {
            repeated: Some(self.suppressed),
            request_id: None,
            ..self.sample.clone()
        })
    }
}

enum Writer {
    /// A file, or a duplicate of the stdout/stderr descriptor: written with
    /// one `write(2)` per record, no lock.
    Fd(File),
    /// Memory, for tests.
    Memory(Arc<Mutex<Vec<u8>>>),
}

/// The writing thread's line buffer, reused for every record, and the
/// current second already formatted (records in the same second reuse it).
struct Line {
    buffer: Vec<u8>,
    second: u64,
    stamp: String,
}

thread_local! {
    static LINE: RefCell<Line> = const {
        RefCell::new(Line {
            buffer: Vec::new(),
            second: u64::MAX,
            stamp: String::new(),
        })
    };
}

impl fmt::Debug for AuditSink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AuditSink")
    }
}

impl AuditSink {
    /// Records to standard output (a duplicate of its descriptor, so records
    /// bypass the process's `Stdout` lock and buffer).
    pub fn stdout() -> std::io::Result<Self> {
        let fd = std::io::stdout().as_fd().try_clone_to_owned()?;
        Ok(Self::over(Writer::Fd(File::from(fd))))
    }

    fn over(writer: Writer) -> Self {
        Self {
            writer,
            repeats: Some(Repeats::new(DEFAULT_REPEAT_WINDOW)),
        }
    }

    /// The same sink, counting repeated refusals for `window` (`None` or
    /// zero: every record is written).
    #[must_use]
    pub fn with_repeat_window(mut self, window: Option<Duration>) -> Self {
        self.repeats = window.filter(|w| !w.is_zero()).map(Repeats::new);
        self
    }

    /// Records to standard error (a duplicate of its descriptor).
    pub fn stderr() -> std::io::Result<Self> {
        let fd = std::io::stderr().as_fd().try_clone_to_owned()?;
        Ok(Self::over(Writer::Fd(File::from(fd))))
    }

    /// Appends records to `path` (created if missing).
    pub fn file(path: &Path) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self::over(Writer::Fd(file)))
    }

    /// Records into memory, for tests: the returned buffer fills with JSON lines.
    pub fn memory() -> (Self, Arc<Mutex<Vec<u8>>>) {
        let buffer = Arc::new(Mutex::new(Vec::new()));
        (Self::over(Writer::Memory(buffer.clone())), buffer)
    }

    /// Records `event`: an issuance is written at once; a refusal is written
    /// at once unless it repeats one written in the current window, in which
    /// case it is counted (see the module documentation). True when written.
    pub fn record(&self, event: &AuditEvent) -> bool {
        let Some(repeats) = self.repeats.as_ref().filter(|_| event.decision != Decision::Allow) else {
            self.write(event);
            return true;
        };
        let kind = repeats.kind(event);
        let shard = &repeats.shards[usize::try_from(kind % REPEAT_SHARDS as u64).unwrap_or(0)];
        let now = Instant::now();
        let mut counted = shard.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let summary = match counted.get_mut(&kind) {
            Some(repeat) if now.duration_since(repeat.first) < repeats.window => {
                repeat.suppressed += 1;
                return false;
            }
            Some(repeat) => {
                let summary = repeat.summary();
                *repeat = Repeat {
                    first: now,
                    suppressed: 0,
                    sample: event.clone(),
                };
                summary
            }
            None => {
                if counted.len() < MAX_REPEAT_KINDS / REPEAT_SHARDS {
                    counted.insert(
                        kind,
                        Repeat {
                            first: now,
                            suppressed: 0,
                            sample: event.clone(),
                        },
                    );
                }
                None
            }
        };
        drop(counted);
        if let Some(summary) = summary {
            self.write(&summary);
        }
        self.write(event);
        true
    }

    /// Writes the counts of repeats whose window has closed (or, with
    /// [`Flush::All`], of every kind being counted: at shutdown), and
    /// forgets them.
    pub fn flush_repeats(&self, which: Flush) {
        let all = which == Flush::All;
        let Some(repeats) = &self.repeats else {
            return;
        };
        let now = Instant::now();
        for shard in &repeats.shards {
            let mut summaries = Vec::new();
            shard
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .retain(|_, repeat| {
                    let closed = all || now.duration_since(repeat.first) >= repeats.window;
                    if closed {
                        summaries.extend(repeat.summary());
                    }
                    !closed
                });
            for summary in &summaries {
                self.write(summary);
            }
        }
    }

    /// Writes one record, with one `write` to the sink, before returning.
    /// A failing sink is logged, never fatal to the request.
    fn write(&self, event: &AuditEvent) {
        let now = crate::clock::system_now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        LINE.with_borrow_mut(|line| {
            if line.second != now.as_secs() {
                line.second = now.as_secs();
                line.stamp = utc_second(now.as_secs());
            }
            line.buffer.clear();
            event.write_json(&line.stamp, now.subsec_millis(), &mut line.buffer);
            line.buffer.push(b'\n');
            debug_assert!(
                line.buffer.len() <= MAX_RECORD_BYTES,
                "an audit record of {} bytes",
                line.buffer.len()
            );
            let written = match &self.writer {
                Writer::Fd(file) => (&*file).write_all(&line.buffer),
                Writer::Memory(memory) => {
                    memory
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .extend_from_slice(&line.buffer);
                    Ok(())
                }
            };
            if let Err(e) = written {
                tracing::error!(error = %e, "writing an audit record failed");
            }
        });
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
    use crate::fingerprint::{digest, fingerprint};

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
        sink.record(&AuditEvent {
            rpc: Rpc::GetToken,
            caller: "c".into(),
            decision: Decision::Allow,
            code: "OK",
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
        let sink = sink.with_repeat_window(None);
        let event = AuditEvent {
            rpc: Rpc::GetDownscopedToken,
            caller: "spiffe://x/\"quoted\"".into(),
            peer: Some("10.0.0.7".into()),
            decision: Decision::Deny,
            code: "PERMISSION_DENIED",
            reason: Some("line\nbreak and \\ backslash \u{1}".to_owned()),
            rule: Some(Arc::from("portal")),
            app: "default".into(),
            subject_type: Some("user"),
            subject_id: BoxId::parse("42").ok(),
            downscope: Some(Arc::new(Downscope {
                scopes: vec!["item_preview".to_owned(), "item_download".to_owned()],
                target: BoxId::parse("7").ok().map(Target::Folder),
            })),
            cache_hit: Some(false),
            issued: None,
            token_sha256: Some(digest("t")),
            request_id: RequestId::parse("req-1"),
            repeated: Some(3),
        };
        sink.record(&event);
        sink.record(&event);
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
        assert_eq!(r["target"], "folder:7");
        assert_eq!(r["subject_id"], "42");
        assert_eq!(r["request_id"], "req-1");
        assert_eq!(r["peer"], "10.0.0.7");
        assert_eq!(r["repeated"], 3);
        for key in ["subject_type", "app", "code", "rpc", "decision", "time"] {
            assert!(r[key].is_string(), "{key} is written");
        }
    }

    fn refusal(reason: &str) -> AuditEvent {
        AuditEvent {
            rpc: Rpc::GetToken,
            caller: "unauthenticated".into(),
            peer: Some("10.0.0.9".into()),
            decision: Decision::Deny,
            code: "UNAUTHENTICATED",
            reason: Some(reason.to_owned()),
            ..AuditEvent::default()
        }
    }

    #[test]
    fn repeated_refusals_are_counted_and_the_first_of_each_kind_is_written() {
        let (sink, buffer) = AuditSink::memory();
        for _ in 0..1000 {
            sink.record(&refusal("the x-api-key header does not hold a valid API key"));
        }
        sink.record(&refusal("no credentials"));
        let allowed = AuditEvent {
            decision: Decision::Allow,
            code: "OK",
            ..refusal("")
        };
        for _ in 0..3 {
            assert!(sink.record(&allowed), "issuances are always written");
        }
        let records = lines(&buffer);
        assert_eq!(records.len(), 5, "the first of each refusal kind, and every issuance");
        assert_eq!(
            records[0]["reason"],
            "the x-api-key header does not hold a valid API key"
        );
        assert!(records[0].get("repeated").is_none());
        assert_eq!(records[1]["reason"], "no credentials");
        sink.flush_repeats(Flush::Closed);
        assert_eq!(lines(&buffer).len(), 5, "the window is still open");
        sink.flush_repeats(Flush::All);
        let records = lines(&buffer);
        assert_eq!(records.len(), 6, "one summary, for the kind that repeated");
        assert_eq!(records[5]["repeated"], 999);
        assert_eq!(
            records[5]["reason"],
            "the x-api-key header does not hold a valid API key"
        );
        assert_eq!(records[5]["peer"], "10.0.0.9");
    }

    #[test]
    fn a_refusal_after_its_window_closed_is_written_with_the_count_before_it() {
        let (sink, buffer) = AuditSink::memory();
        let sink = sink.with_repeat_window(Some(Duration::from_millis(50)));
        for _ in 0..3 {
            sink.record(&refusal("denied"));
        }
        std::thread::sleep(Duration::from_millis(60));
        assert!(sink.record(&refusal("denied")), "a new window opens with a record");
        let records = lines(&buffer);
        assert_eq!(records.len(), 3, "first, the summary of 2 repeats, the new first");
        assert_eq!(records[1]["repeated"], 2);
        assert!(records[2].get("repeated").is_none());
    }

    #[test]
    fn refusals_about_different_tokens_are_different_kinds() {
        let (sink, buffer) = AuditSink::memory();
        for token in ["t1", "t2", "t1"] {
            sink.record(&AuditEvent {
                rpc: Rpc::RevokeToken,
                token_sha256: Some(digest(token)),
                ..refusal("not issued to you")
            });
        }
        let records = lines(&buffer);
        assert_eq!(records.len(), 2, "{records:?}");
        assert_ne!(records[0]["token_sha256"], records[1]["token_sha256"]);
    }

    #[test]
    fn without_a_window_every_refusal_is_written() {
        let (sink, buffer) = AuditSink::memory();
        let sink = sink.with_repeat_window(None);
        for _ in 0..5 {
            assert!(sink.record(&refusal("denied")));
        }
        assert_eq!(lines(&buffer).len(), 5);
    }

    #[test]
    fn a_shared_link_target_is_recorded_as_a_fingerprint() {
        let (sink, buffer) = AuditSink::memory();
        let link = "https://app.box.com/s/secretcapability";
        sink.record(&AuditEvent {
            downscope: Some(Arc::new(Downscope {
                scopes: vec!["item_preview".to_owned()],
                target: Target::shared_link(link).ok(),
            })),
            ..AuditEvent::default()
        });
        let records = lines(&buffer);
        let expected = format!("shared_link:{}", &fingerprint(link)[..16]);
        assert_eq!(records[0]["target"], expected.as_str());
        let text = String::from_utf8(buffer.lock().map(|b| b.clone()).unwrap_or_default()).unwrap_or_default();
        assert!(!text.contains("secretcapability"), "{text}");
    }

    #[test]
    fn a_record_with_huge_fields_is_cut_to_one_atomic_pipe_write() {
        let (sink, buffer) = AuditSink::memory();
        let huge = "\u{1}\"é".repeat(5_000);
        sink.record(&AuditEvent {
            rpc: Rpc::GetDownscopedToken,
            caller: Arc::from(huge.as_str()),
            peer: Some(Arc::from(huge.as_str())),
            repeated: Some(u64::MAX),
            reason: Some(huge.clone()),
            app: Arc::from(huge.as_str()),
            rule: Some(Arc::from(huge.as_str())),
            subject_type: Some("enterprise"),
            subject_id: BoxId::parse(&"9".repeat(20)).ok(),
            downscope: Some(Arc::new(Downscope {
                scopes: vec![huge.clone(); 100],
                target: Target::shared_link("https://app.box.com/s/x").ok(),
            })),
            cache_hit: Some(true),
            issued: Some(Arc::new(CachedToken::new(
                crate::cache::Minted {
                    issued: crate::boxapi::IssuedToken {
                        access_token: secrecy::SecretString::from("t".to_owned()),
                        expires_at: crate::clock::system_now() + Duration::from_secs(3600),
                        issued_at: crate::clock::system_now(),
                        token_type: "bearer".to_owned(),
                        request_id: Some(huge.clone()),
                        restricted_to: Vec::new(),
                    },
                    parent: None,
                },
                &crate::cache::CachePolicy::default(),
            ))),
            token_sha256: Some(digest("t")),
            request_id: RequestId::parse(&"r".repeat(64)),
            decision: Decision::Deny,
            code: "a code longer than its cap of 32 bytes, too",
        });
        let text = String::from_utf8(buffer.lock().map(|b| b.clone()).unwrap_or_default()).unwrap_or_default();
        assert!(text.len() <= MAX_RECORD_BYTES, "{} bytes", text.len());
        assert_eq!(text.matches('\n').count(), 1, "one line");
        let records = lines(&buffer);
        let reason = records[0]["reason"].as_str().unwrap_or_default();
        assert!(reason.starts_with("\u{1}\"é\u{1}"), "{reason}");
        assert!(reason.ends_with('…'), "{reason}");
        assert!(reason.len() <= MAX_REASON_BYTES, "{}", reason.len());
        assert!(records[0]["caller"].as_str().is_some_and(|c| c.ends_with('…')));
        assert!(records[0]["box_request_id"].as_str().is_some_and(|c| c.ends_with('…')));
        assert_eq!(records[0]["request_id"].as_str().map(str::len), Some(64));
    }

    #[test]
    fn long_identities_are_recorded_whole() {
        let (sink, buffer) = AuditSink::memory();
        // A long Kubernetes identity: a 63-byte namespace, a 253-byte name.
        let caller = format!("k8s:{}/{}", "n".repeat(63), "s".repeat(253));
        let rule = "r".repeat(200);
        sink.record(&AuditEvent {
            caller: Arc::from(caller.as_str()),
            rule: Some(Arc::from(rule.as_str())),
            ..AuditEvent::default()
        });
        let records = lines(&buffer);
        assert_eq!(records[0]["caller"], caller.as_str());
        assert_eq!(records[0]["rule"], rule.as_str());
    }

    #[test]
    fn a_value_is_cut_only_when_its_escaped_form_passes_the_limit() {
        let escape = |value: &str| {
            let mut out = Vec::new();
            escaped(&mut out, value, 16);
            String::from_utf8(out).unwrap_or_default()
        };
        // 15 bytes with one quote: 16 escaped, exactly the limit.
        assert_eq!(escape("abcdefghijklmn\""), "abcdefghijklmn\\\"");
        assert_eq!(escape("abcdefghijklmn\"x"), "abcdefghijklm…");
        // Cut between characters, never inside one, and never past the limit.
        let cut = escape(&"é".repeat(20));
        assert_eq!(cut, format!("{}…", "é".repeat(6)));
        assert!(cut.len() <= 16);
    }

    #[test]
    fn records_written_at_once_from_many_threads_stay_whole_lines() {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("audit.jsonl");
        let sink = AuditSink::file(&path).unwrap_or_else(|e| panic!("{e}"));
        std::thread::scope(|s| {
            for thread in 0..8 {
                let sink = &sink;
                s.spawn(move || {
                    for i in 0..500 {
                        sink.record(&AuditEvent {
                            rpc: Rpc::GetToken,
                            caller: Arc::from(format!("caller-{thread}").as_str()),
                            reason: Some(format!("{i} {}", "x".repeat(i % 300))),
                            ..AuditEvent::default()
                        });
                    }
                });
            }
        });
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let records: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("a torn line {l:?}: {e}")))
            .collect();
        assert_eq!(records.len(), 8 * 500);
        for thread in 0..8 {
            let caller = format!("caller-{thread}");
            assert_eq!(records.iter().filter(|r| r["caller"] == caller.as_str()).count(), 500);
        }
    }

    #[test]
    fn the_word_at_a_time_check_finds_every_byte_json_escapes() {
        let naive = |bytes: &[u8]| bytes.iter().all(plain);
        for len in [1, 7, 8, 9, 16, 17, 40] {
            for at in 0..len {
                for byte in 0..=u8::MAX {
                    let mut bytes = vec![b'a'; len];
                    bytes[at] = byte;
                    assert_eq!(needs_no_escaping(&bytes), naive(&bytes), "{byte:#x} at {at} of {len}");
                    // Neighbours that sit just above or below the limits.
                    bytes.fill(0x21);
                    bytes[at] = byte;
                    assert_eq!(needs_no_escaping(&bytes), naive(&bytes), "{byte:#x} at {at} of {len}");
                    bytes.fill(0xff);
                    bytes[at] = byte;
                    assert_eq!(needs_no_escaping(&bytes), naive(&bytes), "{byte:#x} at {at} of {len}");
                }
            }
        }
        assert!(needs_no_escaping(b""));
        assert!(needs_no_escaping("spiffe://cluster.local/ns/é/sa/x".as_bytes()));
    }

    #[test]
    fn request_ids_from_callers_are_checked() {
        assert_eq!(
            RequestId::parse("abc-123").map(|r| r.to_string()),
            Some("abc-123".to_owned())
        );
        assert!(RequestId::parse("").is_none());
        assert!(RequestId::parse("has space").is_none());
        assert!(RequestId::parse(&"x".repeat(65)).is_none());
        assert!(RequestId::parse(&"x".repeat(64)).is_some());
        let (a, b) = (RequestId::generate(), RequestId::generate());
        assert_ne!(a, b);
        assert!(a.as_str().bytes().all(|c| c.is_ascii_hexdigit()), "{a}");
    }
}
