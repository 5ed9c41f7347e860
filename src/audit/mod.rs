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

mod record;

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

use crate::{boxapi::BoxId, rpc::Decision};

pub use self::record::{AuditEvent, MAX_RECORD_BYTES};

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
        event.external_user_id.hash(&mut h);
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

    use super::{
        record::{MAX_REASON_BYTES, escaped, needs_no_escaping, plain},
        *,
    };
    use crate::{
        boxapi::{BoxId, Downscope, Target},
        cache::CachedToken,
        fingerprint::{digest, fingerprint},
        rpc::{Decision, RequestId, Rpc},
    };

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
            external_user_id: Some(Arc::from("auth0|\"ada\"")),
            provisioned: Some(true),
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
        assert_eq!(r["external_user_id"], "auth0|\"ada\"");
        assert_eq!(r["provisioned"], true);
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
            external_user_id: Some(Arc::from(huge.as_str())),
            provisioned: Some(true),
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
