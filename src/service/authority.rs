//! What grpc-core clients send on a Unix socket, made acceptable to the
//! HTTP/2 server.
//!
//! gRPC's C core (Python's grpcio, C++, Ruby, PHP) and grpc-java send the
//! socket's path as the `:authority` of a Unix-socket call: `tmp%2Fbroker.sock`
//! for `unix:/tmp/broker.sock`, `/run/x.sock` from some versions; grpcurl 1.8
//! does too. That is not a valid URI authority, and the HTTP/2 server (the
//! `h2` crate) answers such a request with `RST_STREAM(PROTOCOL_ERROR)`
//! before any of our code sees it (hyperium/h2#487, open since 2020). grpc-go
//! and grpc-js send `localhost` and work.
//!
//! On Unix-socket connections only (TCP is untouched), [`AuthorityFix`] sits
//! between the socket and the HTTP/2 server and reads the client's first
//! header block. If its `:authority` is valid, or absent, the connection is
//! passed through byte for byte from then on: clients that need nothing pay
//! one HPACK decode per connection. Otherwise every header block of the
//! connection is decoded (HPACK, with the client's dynamic table) and
//! re-encoded with an invalid `:authority` replaced by `localhost`, each
//! field a literal without indexing, so the server's table stays empty and
//! always agrees with what it is sent. The broker does not route or
//! authorize by authority, so nothing is lost.
//!
//! Bounds, all before authentication: a header block is buffered up to
//! [`MAX_BLOCK`] bytes (or the server's list limit, if larger) in at most
//! [`MAX_BLOCK_FRAMES`] frames (h2's own CONTINUATION-flood bound); one read
//! of the socket yields at most [`OUT_PER_FEED`] bytes for the server, the
//! rest of the read waiting its turn (a few bytes of HPACK can stand for
//! kilobytes). A decoded list over the server's limit is passed on as one
//! field over that limit, so the server refuses the stream as it would on
//! TCP; over four times the limit (an HPACK bomb, which h2 answers with
//! GOAWAY) ends the connection. What the server would refuse anyway (a
//! malformed frame, a broken HPACK block, a CONTINUATION flood) is passed on
//! untouched while the connection is still being passed through, so the
//! server answers it as always; on a rewritten connection it ends the
//! connection.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use tonic::codegen::http::uri::Authority;

/// What replaces an invalid `:authority` (what grpc-go and grpc-js send).
pub const REPLACEMENT: &[u8] = b"localhost";

/// The server's `SETTINGS_MAX_FRAME_SIZE`: hyper's default, which the
/// transport does not change. No client frame may be larger.
pub const MAX_FRAME: usize = 16_384;

/// Header block bytes (HEADERS and its CONTINUATIONs) buffered at most, if
/// the server's header list limit is smaller: far past any list it lets
/// through.
pub const MAX_BLOCK: usize = 64 * 1024;

/// Frames (HEADERS and CONTINUATIONs) in one header block at most: h2 sends
/// GOAWAY past `max(5, n + n/4)` for `n` full frames of list, and ends here
/// no later.
pub const MAX_BLOCK_FRAMES: usize = 8;

/// Bytes one [`AuthorityFix::feed`] call produces at most before it stops
/// taking input.
pub const OUT_PER_FEED: usize = 64 * 1024;

/// A decoded list this many times over the server's limit ends the
/// connection (h2's `MAX_HEADER_LIST_ABUSE_MULTIPLIER`).
const ABUSE_MULTIPLIER: usize = 4;

/// The HPACK dynamic table size the server allows (the protocol's default
/// 4,096: the transport does not advertise another).
const TABLE_SIZE: usize = 4_096;

const PREFACE_LEN: usize = 24;
const FRAME_HEADER: usize = 9;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;
/// HPACK's per-field overhead when sizing a header list (RFC 7541 §4.1).
const FIELD_OVERHEAD: usize = 32;

/// A rewritten connection received something it cannot pass on.
#[derive(Debug, thiserror::Error)]
#[error("HTTP/2 from a Unix-socket peer that could not be rewritten: {0}")]
pub struct Malformed(&'static str);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Before the first header block is complete.
    Deciding,
    /// The first block's `:authority` was invalid: every block is rewritten.
    Rewriting,
    /// Everything is passed on as it comes.
    Through,
}

/// A header block being collected.
struct Block {
    stream: [u8; 4],
    end_stream: bool,
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
    /// Frames so far.
    frames: usize,
    /// The frames as received (kept while deciding, to pass them on as they are).
    raw: Vec<u8>,
}

/// The client-to-server byte stream of one Unix-socket connection, with
/// invalid `:authority` values replaced (see the module's documentation).
/// Sans I/O: [`feed`](Self::feed) it what the socket gave, pass on what it
/// writes.
pub struct AuthorityFix {
    max_list: usize,
    max_block: usize,
    mode: Mode,
    preface_left: usize,
    /// A frame's header, or a whole HEADERS / CONTINUATION frame, as it arrives.
    frame: Vec<u8>,
    /// Payload bytes of a passed-on frame still to come.
    copy_left: usize,
    block: Option<Block>,
    decoder: loona_hpack::Decoder<'static>,
}

// Header blocks carry credentials (API keys, bearer tokens): never shown.
impl std::fmt::Debug for AuthorityFix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthorityFix")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

impl<S> std::fmt::Debug for Fixed<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fixed").field("fix", &self.fix).finish_non_exhaustive()
    }
}

impl AuthorityFix {
    /// `max_list`: the server's header list limit (`max_header_list_bytes`).
    pub fn new(max_list: usize) -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(TABLE_SIZE);
        Self {
            max_list,
            max_block: MAX_BLOCK.max(max_list),
            mode: Mode::Deciding,
            preface_left: PREFACE_LEN,
            frame: Vec::new(),
            copy_left: 0,
            block: None,
            decoder,
        }
    }

    /// Whether everything is now passed through unchanged.
    pub fn passing_through(&self) -> bool {
        self.mode == Mode::Through
    }

    /// Whether the connection's header blocks are being rewritten.
    pub fn rewriting(&self) -> bool {
        self.mode == Mode::Rewriting
    }

    /// Takes the next bytes from the client and appends what the server is
    /// to read to `out` (possibly nothing yet: a frame may be incomplete).
    /// Returns how many bytes of `input` it took: all of them, unless it
    /// produced [`OUT_PER_FEED`] bytes first (feed the rest again later).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, Malformed> {
        let (start, whole) = (out.len(), input.len());
        let mut input = input;
        while !input.is_empty() && out.len() - start < OUT_PER_FEED {
            if self.mode == Mode::Through {
                out.extend_from_slice(input);
                return Ok(whole);
            }
            if self.preface_left > 0 || self.copy_left > 0 {
                let left = if self.preface_left > 0 {
                    &mut self.preface_left
                } else {
                    &mut self.copy_left
                };
                let n = (*left).min(input.len());
                out.extend_from_slice(&input[..n]);
                *left -= n;
                input = &input[n..];
                continue;
            }
            // A frame header.
            if self.frame.len() < FRAME_HEADER {
                let n = (FRAME_HEADER - self.frame.len()).min(input.len());
                self.frame.extend_from_slice(&input[..n]);
                input = &input[n..];
                if self.frame.len() < FRAME_HEADER {
                    return Ok(whole);
                }
            }
            let len = usize::from(self.frame[0]) << 16 | usize::from(self.frame[1]) << 8 | usize::from(self.frame[2]);
            let kind = self.frame[3];
            let in_block = kind == HEADERS || (kind == CONTINUATION && self.block.is_some());
            if !in_block || len > MAX_FRAME {
                if self.block.is_some() || len > MAX_FRAME {
                    // A frame inside a header block, or too large: the server
                    // ends the connection for it.
                    self.give_up(out, "a frame inside a header block, or over the frame size")?;
                    continue;
                }
                out.append(&mut self.frame);
                self.copy_left = len;
                continue;
            }
            // A HEADERS or CONTINUATION frame, buffered whole.
            let n = (FRAME_HEADER + len - self.frame.len()).min(input.len());
            self.frame.extend_from_slice(&input[..n]);
            input = &input[n..];
            if self.frame.len() < FRAME_HEADER + len {
                return Ok(whole);
            }
            let frame = std::mem::take(&mut self.frame);
            self.header_frame(frame, out)?;
        }
        Ok(whole - input.len())
    }

    /// Passes on the block and frame held so far, unchanged, and everything
    /// after them — or, on a rewritten connection, gives up.
    fn give_up(&mut self, out: &mut Vec<u8>, why: &'static str) -> Result<(), Malformed> {
        if self.mode == Mode::Rewriting {
            return Err(Malformed(why));
        }
        if let Some(block) = self.block.take() {
            out.extend_from_slice(&block.raw);
        }
        out.append(&mut self.frame);
        self.mode = Mode::Through;
        Ok(())
    }

    fn header_frame(&mut self, frame: Vec<u8>, out: &mut Vec<u8>) -> Result<(), Malformed> {
        let flags = frame[4];
        let stream: [u8; 4] = [frame[5], frame[6], frame[7], frame[8]];
        let payload = &frame[FRAME_HEADER..];
        if frame[3] == HEADERS {
            if self.block.is_some() {
                self.frame = frame;
                return self.give_up(out, "HEADERS before the previous block ended");
            }
            let Some((priority, fragment)) = headers_payload(flags, payload) else {
                self.frame = frame;
                return self.give_up(out, "a malformed HEADERS frame");
            };
            self.block = Some(Block {
                stream,
                end_stream: flags & END_STREAM != 0,
                priority,
                fragment: fragment.to_vec(),
                frames: 1,
                raw: Vec::new(),
            });
        } else {
            let same_stream = self.block.as_ref().is_some_and(|b| b.stream == stream);
            let room = self
                .block
                .as_ref()
                .is_some_and(|b| b.fragment.len() + payload.len() <= self.max_block && b.frames < MAX_BLOCK_FRAMES);
            if !same_stream || !room {
                self.frame = frame;
                return self.give_up(
                    out,
                    "a CONTINUATION of another stream, or a header block of too many bytes or frames",
                );
            }
            if let Some(block) = self.block.as_mut() {
                block.fragment.extend_from_slice(payload);
                block.frames += 1;
            }
        }
        if self.mode == Mode::Deciding
            && let Some(block) = self.block.as_mut()
        {
            block.raw.extend_from_slice(&frame);
        }
        if flags & END_HEADERS != 0
            && let Some(block) = self.block.take()
        {
            self.end_block(block, out)?;
        }
        Ok(())
    }

    fn end_block(&mut self, block: Block, out: &mut Vec<u8>) -> Result<(), Malformed> {
        let mut fields: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
        let mut size = 0usize;
        let mut invalid_authority = false;
        let max_list = self.max_list;
        let decoded = self.decoder.decode_with_cb(&block.fragment, |name, value| {
            if &*name == b":authority" && Authority::try_from(&*value).is_err() {
                invalid_authority = true;
            }
            size = size.saturating_add(name.len() + value.len() + FIELD_OVERHEAD);
            if size <= max_list {
                fields.push((name.into_owned(), value.into_owned()));
            }
        });
        if self.mode == Mode::Deciding {
            if decoded.is_err() || !invalid_authority {
                // Nothing to fix (or nothing the server will accept anyway):
                // the block as it came, and everything after it.
                out.extend_from_slice(&block.raw);
                self.mode = Mode::Through;
                return Ok(());
            }
            self.mode = Mode::Rewriting;
        } else if decoded.is_err() {
            return Err(Malformed("a header block that does not decode"));
        }
        if size > max_list.saturating_mul(ABUSE_MULTIPLIER) {
            return Err(Malformed("a header list far over the server's limit"));
        }
        let mut encoded = Vec::with_capacity(block.fragment.len() + 64);
        if size > max_list {
            // Over the server's limit: one field over it, so the server
            // refuses the stream as it refuses an oversized list on TCP.
            literal(b"x-header-list-too-large", &vec![b'x'; max_list], &mut encoded);
        } else {
            for (name, value) in &fields {
                let value = if name == b":authority" && Authority::try_from(&value[..]).is_err() {
                    REPLACEMENT
                } else {
                    value
                };
                literal(name, value, &mut encoded);
            }
        }
        write_block(&block, &encoded, out);
        Ok(())
    }
}

/// A HEADERS payload's priority fields and header block fragment, without
/// its padding; `None` if the padding or priority do not fit.
fn headers_payload(flags: u8, payload: &[u8]) -> Option<(Option<[u8; 5]>, &[u8])> {
    let mut body = payload;
    if flags & PADDED != 0 {
        let (&pad, rest) = body.split_first()?;
        body = rest.get(..rest.len().checked_sub(usize::from(pad))?)?;
    }
    let mut priority = None;
    if flags & PRIORITY != 0 {
        let (fields, rest) = body.split_at_checked(5)?;
        priority = Some(<[u8; 5]>::try_from(fields).ok()?);
        body = rest;
    }
    Some((priority, body))
}

/// An HPACK literal field without indexing, with a literal name, no Huffman
/// coding (RFC 7541 §6.2.2).
fn literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0);
    for string in [name, value] {
        // Writing to a Vec cannot fail.
        let _ = loona_hpack::encoder::encode_integer_into(string.len(), 7, 0, out);
        out.extend_from_slice(string);
    }
}

/// `fragment` as a HEADERS frame with `block`'s stream, END_STREAM and
/// priority, and as many CONTINUATION frames as the frame size needs.
fn write_block(block: &Block, fragment: &[u8], out: &mut Vec<u8>) {
    let mut first = true;
    let mut rest = fragment;
    loop {
        let prefix = if first { block.priority.map_or(0, |_| 5) } else { 0 };
        let take = rest.len().min(MAX_FRAME - prefix);
        let last = take == rest.len();
        let (kind, mut flags) = if first {
            let mut flags = 0;
            if block.end_stream {
                flags |= END_STREAM;
            }
            if block.priority.is_some() {
                flags |= PRIORITY;
            }
            (HEADERS, flags)
        } else {
            (CONTINUATION, 0)
        };
        if last {
            flags |= END_HEADERS;
        }
        let len = prefix + take;
        out.extend_from_slice(&[(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags]);
        out.extend_from_slice(&block.stream);
        if first && let Some(priority) = block.priority {
            out.extend_from_slice(&priority);
        }
        out.extend_from_slice(&rest[..take]);
        rest = &rest[take..];
        first = false;
        if last {
            return;
        }
    }
}

/// A Unix-socket connection read through an [`AuthorityFix`].
pub struct Fixed<S> {
    inner: S,
    fix: AuthorityFix,
    /// Rewritten bytes not yet read by the server, from `out_pos`.
    out: Vec<u8>,
    out_pos: usize,
    /// Bytes read from the socket, not yet fed from `in_pos` to `in_len`.
    scratch: Box<[u8]>,
    in_pos: usize,
    in_len: usize,
}

impl<S> Fixed<S> {
    /// `inner` read through a new [`AuthorityFix`] for the server's `max_list`.
    pub fn new(inner: S, max_list: usize) -> Self {
        Self {
            inner,
            fix: AuthorityFix::new(max_list),
            out: Vec::new(),
            out_pos: 0,
            scratch: vec![0; MAX_FRAME].into_boxed_slice(),
            in_pos: 0,
            in_len: 0,
        }
    }

    /// The connection underneath.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Fixed<S> {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.out_pos < this.out.len() {
                let n = (this.out.len() - this.out_pos).min(buf.remaining());
                buf.put_slice(&this.out[this.out_pos..this.out_pos + n]);
                this.out_pos += n;
                if this.out_pos == this.out.len() {
                    this.out_pos = 0;
                    if this.out.capacity() > 2 * OUT_PER_FEED {
                        // A burst of rewritten blocks: do not keep its peak.
                        this.out = Vec::new();
                    } else {
                        this.out.clear();
                    }
                }
                return Poll::Ready(Ok(()));
            }
            if this.in_pos < this.in_len {
                let taken = this
                    .fix
                    .feed(&this.scratch[this.in_pos..this.in_len], &mut this.out)
                    .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                this.in_pos += taken;
                continue;
            }
            if this.fix.passing_through() {
                if !this.scratch.is_empty() {
                    this.scratch = Box::default();
                    this.out = Vec::new();
                }
                return Pin::new(&mut this.inner).poll_read(cx, buf);
            }
            let mut read = ReadBuf::new(&mut this.scratch);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut read))?;
            let n = read.filled().len();
            if n == 0 {
                return Poll::Ready(Ok(()));
            }
            (this.in_pos, this.in_len) = (0, n);
        }
    }
}

write_through!(impl[S: AsyncWrite + Unpin] Fixed<S>);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "a test fails by panicking")]

    use super::*;

    type Fields = Vec<(Vec<u8>, Vec<u8>)>;

    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut out = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
        out.extend_from_slice(&stream.to_be_bytes());
        out.extend_from_slice(payload);
        out
    }

    fn request(authority: &str, extra: &[(&str, &str)]) -> Fields {
        let mut fields: Fields = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", "/boxbroker.v1.TokenBrokerService/GetToken"),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        .iter()
        .chain(extra)
        .map(|(n, v)| (n.as_bytes().to_vec(), v.as_bytes().to_vec()))
        .collect();
        fields.shrink_to_fit();
        fields
    }

    /// A client's HPACK encoder: indexes what it sends, as grpc-core does.
    fn encode(client: &mut loona_hpack::Encoder<'static>, fields: &[(Vec<u8>, Vec<u8>)]) -> Vec<u8> {
        client.encode(fields.iter().map(|(n, v)| (&n[..], &v[..])))
    }

    /// Everything `input` becomes, fed in pieces of `step` bytes.
    fn run(fix: &mut AuthorityFix, input: &[u8], step: usize) -> Result<Vec<u8>, Malformed> {
        let mut out = Vec::new();
        for mut piece in input.chunks(step) {
            while !piece.is_empty() {
                let taken = fix.feed(piece, &mut out)?;
                piece = &piece[taken..];
            }
        }
        Ok(out)
    }

    /// The header lists of the HEADERS blocks in `bytes` (after the
    /// preface), decoded as the server decodes them, and the other frames.
    fn server_view(bytes: &[u8]) -> (Vec<Fields>, Vec<(u8, Vec<u8>)>) {
        assert_eq!(&bytes[..24], PREFACE);
        let mut decoder = loona_hpack::Decoder::new();
        let (mut lists, mut others, mut block) = (Vec::new(), Vec::new(), Vec::new());
        let mut rest = &bytes[24..];
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let (kind, flags) = (rest[3], rest[4]);
            assert!(len <= MAX_FRAME, "a frame of {len} bytes");
            let payload = &rest[9..9 + len];
            if kind == HEADERS || kind == CONTINUATION {
                let (_, fragment) = headers_payload(if kind == HEADERS { flags } else { 0 }, payload).unwrap();
                block.extend_from_slice(fragment);
                if flags & END_HEADERS != 0 {
                    lists.push(decoder.decode(&block).unwrap());
                    block.clear();
                }
            } else {
                others.push((kind, payload.to_vec()));
            }
            rest = &rest[9 + len..];
        }
        (lists, others)
    }

    fn replaced(fields: &[(Vec<u8>, Vec<u8>)]) -> Fields {
        fields
            .iter()
            .map(|(n, v)| {
                if n == b":authority" {
                    (n.clone(), REPLACEMENT.to_vec())
                } else {
                    (n.clone(), v.clone())
                }
            })
            .collect()
    }

    #[test]
    fn a_valid_authority_is_passed_through_byte_for_byte() {
        let mut client = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[]));
        let block = encode(&mut client, &request("localhost", &[]));
        input.extend(frame(HEADERS, END_HEADERS, 1, &block));
        input.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\x02\x12\0"));
        let block = encode(&mut client, &request("localhost", &[]));
        input.extend(frame(HEADERS, END_HEADERS, 3, &block));
        for step in [1, 7, input.len()] {
            let mut fix = AuthorityFix::new(8192);
            assert_eq!(run(&mut fix, &input, step).unwrap(), input, "in pieces of {step}");
            assert!(fix.passing_through());
        }
    }

    #[test]
    fn a_socket_path_authority_becomes_localhost_in_every_block_of_the_connection() {
        // What grpc-core sends for unix:/tmp/broker.sock, twice on one
        // connection: the second block refers to the client's dynamic table.
        let mut client = loona_hpack::Encoder::new();
        let first = request("tmp%2Fbroker.sock", &[("x-api-key", "k1")]);
        let second = request("tmp%2Fbroker.sock", &[("x-api-key", "k1"), ("x-request-id", "r2")]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]));
        input.extend(frame(HEADERS, END_HEADERS, 1, &encode(&mut client, &first)));
        input.extend(frame(0x0, END_STREAM, 1, b"\0\0\0\0\x02\x12\0"));
        let again = encode(&mut client, &second);
        let fresh = encode(&mut loona_hpack::Encoder::new(), &second);
        assert!(
            again.len() < fresh.len(),
            "the second block refers to the client's table"
        );
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &again));
        for step in [1, 5, input.len()] {
            let mut fix = AuthorityFix::new(8192);
            let out = run(&mut fix, &input, step).unwrap();
            assert!(fix.rewriting());
            let (lists, others) = server_view(&out);
            assert_eq!(lists, vec![replaced(&first), replaced(&second)], "in pieces of {step}");
            assert_eq!(
                others,
                vec![(0x4, vec![0, 3, 0, 0, 0, 100]), (0x0, b"\0\0\0\0\x02\x12\0".to_vec())]
            );
        }
    }

    #[test]
    fn padding_priority_continuations_and_end_stream_survive_a_rewrite() {
        let mut client = loona_hpack::Encoder::new();
        let fields = request("/run/broker.sock", &[("x-big", &"v".repeat(20_000))]);
        let block = encode(&mut client, &fields);
        // HEADERS (padded, with priority) + two CONTINUATIONs.
        let (a, rest) = block.split_at(100);
        let (b, c) = rest.split_at(rest.len() / 2);
        let mut payload = vec![3];
        payload.extend_from_slice(&[0, 0, 0, 0, 7]);
        payload.extend_from_slice(a);
        payload.extend_from_slice(&[0, 0, 0]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | PRIORITY | END_STREAM, 1, &payload));
        input.extend(frame(CONTINUATION, 0, 1, b));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, c));
        let mut fix = AuthorityFix::new(64 * 1024);
        let out = run(&mut fix, &input, 1000).unwrap();
        let (lists, _) = server_view(&out);
        assert_eq!(lists, vec![replaced(&fields)]);
        // The first frame keeps END_STREAM and the priority; the block is
        // split at the frame size.
        let first = &out[24..];
        assert_eq!(first[3], HEADERS);
        assert_eq!(first[4], END_STREAM | PRIORITY);
        assert_eq!(&first[9..14], &[0, 0, 0, 0, 7]);
        assert_eq!(
            usize::from(first[0]) << 16 | usize::from(first[1]) << 8 | usize::from(first[2]),
            MAX_FRAME
        );
    }

    #[test]
    fn a_rewritten_list_over_the_servers_limit_stays_over_it() {
        let mut client = loona_hpack::Encoder::new();
        let fields = request("tmp%2Fb.sock", &[("x-big", &"v".repeat(9_000))]);
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &encode(&mut client, &fields)));
        let mut fix = AuthorityFix::new(8192);
        let (lists, _) = server_view(&run(&mut fix, &input, 4096).unwrap());
        let size: usize = lists[0].iter().map(|(n, v)| n.len() + v.len() + 32).sum();
        assert!(size > 8192, "{size}");
        assert!(
            lists[0].iter().all(|(n, _)| n != b"x-big"),
            "the list itself is not passed on"
        );
    }

    #[test]
    fn what_the_server_refuses_anyway_is_passed_on_untouched_until_a_rewrite() {
        // A HEADERS frame whose padding is longer than it: passed on as it
        // came (the server answers it as always).
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, PADDED | END_HEADERS, 1, &[9, 1, 2]));
        input.extend(frame(0x0, 0, 1, b"later"));
        let mut fix = AuthorityFix::new(8192);
        assert_eq!(run(&mut fix, &input, 3).unwrap(), input);
        // A block that does not decode, ditto.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, END_HEADERS, 1, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]));
        let mut fix = AuthorityFix::new(8192);
        assert_eq!(run(&mut fix, &input, 2).unwrap(), input);
        // Once rewriting, a broken block ends the connection.
        let mut client = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &encode(&mut client, &request("a/b", &[])),
        ));
        input.extend(frame(HEADERS, END_HEADERS, 3, &[0xbf]));
        let mut fix = AuthorityFix::new(8192);
        assert!(run(&mut fix, &input, 64).is_err());
        // So does a header block that never ends within its bound.
        let mut client = loona_hpack::Encoder::new();
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &encode(&mut client, &request("a/b", &[])),
        ));
        input.extend(frame(HEADERS, 0, 3, &[0x82]));
        for _ in 0..5 {
            input.extend(frame(CONTINUATION, 0, 3, &[0x82; MAX_FRAME]));
        }
        let mut fix = AuthorityFix::new(8192);
        assert!(run(&mut fix, &input, MAX_FRAME).is_err());
    }

    /// A connection rewriting already (its first block had a socket path),
    /// whose client table holds one 4,000-byte field, and the client.
    fn rewriting_with_a_big_entry() -> (AuthorityFix, loona_hpack::Encoder<'static>, Vec<u8>) {
        let mut client = loona_hpack::Encoder::new();
        let big = "b".repeat(4_000);
        let mut input = PREFACE.to_vec();
        input.extend(frame(
            HEADERS,
            END_HEADERS,
            1,
            &encode(&mut client, &request("a/b", &[("x-big", &big)])),
        ));
        let mut fix = AuthorityFix::new(8192);
        let out = run(&mut fix, &input, input.len()).unwrap();
        assert!(fix.rewriting());
        (fix, client, out)
    }

    #[test]
    fn a_continuation_flood_is_not_buffered() {
        // Deciding: passed on as it came once past the bound (the server
        // answers the flood with GOAWAY), not held.
        let mut input = PREFACE.to_vec();
        input.extend(frame(HEADERS, 0, 1, &[0x82]));
        for _ in 0..MAX_BLOCK_FRAMES * 4 {
            input.extend(frame(CONTINUATION, 0, 1, &[]));
        }
        let mut fix = AuthorityFix::new(8192);
        assert_eq!(run(&mut fix, &input, 9).unwrap(), input);
        assert!(fix.passing_through());
        // Rewriting: the connection ends.
        let (mut fix, _, _) = rewriting_with_a_big_entry();
        let mut flood = frame(HEADERS, 0, 3, &[0x82]);
        for _ in 0..MAX_BLOCK_FRAMES {
            flood.extend(frame(CONTINUATION, 0, 3, &[]));
        }
        assert!(run(&mut fix, &flood, 9).is_err());
    }

    #[test]
    fn an_hpack_bomb_ends_a_rewritten_connection() {
        // Twenty one-byte references to a 4,000-byte field: 80 KB from 20
        // bytes, ten times the limit.
        let (mut fix, _, _) = rewriting_with_a_big_entry();
        let bomb = frame(HEADERS, END_HEADERS, 3, &[0x80 | 62; 20]);
        assert!(run(&mut fix, &bomb, bomb.len()).is_err());
    }

    #[test]
    fn one_read_yields_a_bounded_amount_however_much_it_stands_for() {
        // Blocks of three references (12 KB, over the limit but not a bomb):
        // each becomes an 8 KB marker for the server. 16 KB of them would be
        // ~10 MB at once; a feed stops after OUT_PER_FEED.
        let (mut fix, _, _) = rewriting_with_a_big_entry();
        let mut input = Vec::new();
        let mut stream = 3u32;
        while input.len() < MAX_FRAME {
            input.extend(frame(HEADERS, END_HEADERS | END_STREAM, stream, &[0x80 | 62; 3]));
            stream += 2;
        }
        let mut out = Vec::new();
        let taken = fix.feed(&input, &mut out).unwrap();
        assert!(taken < input.len(), "took {taken} of {}", input.len());
        assert!(out.len() < OUT_PER_FEED + 9_000, "{} bytes at once", out.len());
        // The rest comes with the next feeds.
        let mut rest = &input[taken..];
        let mut total = out.len();
        while !rest.is_empty() {
            out.clear();
            let taken = fix.feed(rest, &mut out).unwrap();
            assert!(taken > 0);
            total += out.len();
            rest = &rest[taken..];
        }
        assert!(total > 10 * OUT_PER_FEED);
    }
}
