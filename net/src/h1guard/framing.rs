//! The framing state machine: holds each request head back until it is
//! complete and judged, then follows the body (Content-Length or chunked)
//! to the next head; a refused request is answered here and ends the stream.

use super::H1Guard;
use super::head::{Verdict, check_head};

const REJECT: &[u8] = b"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: 18\r\nconnection: close\r\n\r\nmalformed request\n";
const REJECT_431: &[u8] = b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: text/plain\r\ncontent-length: 24\r\nconnection: close\r\n\r\nrequest head too large\n";
/// Longest chunk-size line (size and extensions) followed.
const MAX_CHUNK_LINE: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum State {
    /// Collecting a request head (held back from hyper).
    Head,
    /// Passing `n` body bytes.
    Body(u64),
    /// In a chunked body: reading a chunk-size line.
    ChunkSize,
    /// Passing `n` chunk bytes, then the CRLF after them.
    ChunkData(u64),
    /// Reading trailer lines until an empty one.
    Trailers,
    /// No more checking: an upgrade request was released (the handler closes
    /// the connection after the answer unless the protocol switched).
    Passthrough,
    /// Rejected: the answer (if not left to hyper) is written, then EOF.
    Rejected(&'static [u8]),
}

impl<T> H1Guard<T> {
    fn reject(&mut self, why: &'static str, answer: &'static [u8]) {
        tracing::warn!(target: "audit", decision = "deny", reason = why, "refused a malformed HTTP/1 request (400/431, connection closed)");
        self.pending.clear();
        if self.state == State::Head {
            // Between requests: hyper may still be answering an earlier one,
            // so it must answer this one too, in order. It is handed a head it
            // refuses the same way (400, or 431 for one too large), then EOF.
            if answer == REJECT_431 {
                let size = self.max_head.max(8192) + 64;
                self.ready.extend_from_slice(b"GET / HTTP/1.1\r\nx: ");
                self.ready.resize(self.ready.len() + size, b'a');
            } else {
                self.ready.extend_from_slice(b"\x01 / HTTP/1.1\r\n\r\n");
            }
            self.state = State::Rejected(b"");
        } else {
            // Inside a request's body: nothing of its answer is written yet.
            self.state = State::Rejected(answer);
        }
    }

    /// The state after a complete head, or a rejection.
    fn after_head(&mut self, head: &[u8]) -> bool {
        if head.len() > self.max_head {
            self.reject("request head too large", REJECT_431);
            return false;
        }
        match check_head(head, self.max_headers) {
            Verdict::Reject(why) => {
                self.reject(why, REJECT);
                return false;
            }
            Verdict::TooLarge => {
                self.reject("too many header fields", REJECT_431);
                return false;
            }
            Verdict::Body(0) => self.state = State::Head,
            Verdict::Body(n) => self.state = State::Body(n),
            Verdict::Chunked => self.state = State::ChunkSize,
            Verdict::Passthrough => self.state = State::Passthrough,
        }
        true
    }

    /// A head still incomplete in `partial` (searched before up to `from`):
    /// whether to keep waiting.
    fn partial_head_ok(&mut self, partial: &[u8], from: usize) -> bool {
        let bare_lf = (from..partial.len()).any(|i| partial[i] == b'\n' && (i == 0 || partial[i - 1] != b'\r'));
        if bare_lf {
            self.reject("bare LF line ending", REJECT);
            false
        } else if partial.len() > self.max_head {
            self.reject("request head too large", REJECT_431);
            false
        } else {
            true
        }
    }

    /// A chunk-size or trailer line (without its CRLF): the next state.
    fn after_line(&mut self, text: &[u8]) -> bool {
        if text.contains(&b'\n') || text.contains(&b'\r') {
            self.reject("bare CR or LF in chunked framing", REJECT);
            return false;
        }
        if self.state == State::Trailers {
            self.state = if text.is_empty() { State::Head } else { State::Trailers };
            return true;
        }
        // chunk-size = 1*HEXDIG, then optional BWS ";" extensions.
        let size = text.split(|b| *b == b';').next().unwrap_or_default();
        let size = size.trim_ascii_end();
        let n = (!size.is_empty() && size.len() <= 16 && size.iter().all(u8::is_ascii_hexdigit))
            .then(|| std::str::from_utf8(size).ok().and_then(|s| u64::from_str_radix(s, 16).ok()))
            .flatten();
        match n {
            Some(0) => self.state = State::Trailers,
            // The chunk's bytes, then its CRLF.
            Some(n) => match n.checked_add(2) {
                Some(with_crlf) => self.state = State::ChunkData(with_crlf),
                None => {
                    self.reject("chunk size out of range", REJECT);
                    return false;
                }
            },
            None => {
                self.reject("invalid chunk size", REJECT);
                return false;
            }
        }
        true
    }

    /// Slow path: moves what the framing allows from `pending` to `ready`.
    pub(super) fn advance(&mut self) {
        loop {
            match self.state {
                State::Passthrough => {
                    let all = self.pending.split();
                    self.ready.unsplit(all);
                    return;
                }
                State::Rejected(_) => return,
                State::Head => {
                    // Empty lines between messages are allowed (RFC 9112 section 2.2).
                    while self.pending.starts_with(b"\r\n") {
                        let crlf = self.pending.split_to(2);
                        self.ready.unsplit(crlf);
                        self.scanned = self.scanned.saturating_sub(2);
                    }
                    let from = self.scanned.saturating_sub(3).min(self.pending.len());
                    let Some(end) = find(&self.pending[from..], b"\r\n\r\n").map(|e| e + from) else {
                        let partial = std::mem::take(&mut self.pending);
                        let ok = self.partial_head_ok(&partial, from);
                        if ok {
                            self.scanned = partial.len();
                            self.pending = partial;
                        }
                        return;
                    };
                    self.scanned = 0;
                    let head = self.pending.split_to(end + 4);
                    if !self.after_head(&head) {
                        return;
                    }
                    self.ready.unsplit(head);
                }
                State::Body(n) | State::ChunkData(n) => {
                    if self.pending.is_empty() {
                        return;
                    }
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(self.pending.len());
                    let part = self.pending.split_to(take);
                    self.ready.unsplit(part);
                    self.state = self.state.consumed(take as u64);
                }
                State::ChunkSize | State::Trailers => {
                    let Some(end) = find(&self.pending, b"\r\n") else {
                        // Release the partial line; keep a copy to finish it on the fast path.
                        if self.pending.len() > MAX_CHUNK_LINE {
                            self.reject("chunk line too long", REJECT);
                            return;
                        }
                        let part = self.pending.split();
                        self.ready.extend_from_slice(&part);
                        self.pending = part;
                        return;
                    };
                    let line = self.pending.split_to(end + 2);
                    if !self.after_line(&line[..end]) {
                        return;
                    }
                    self.ready.unsplit(line);
                }
            }
        }
    }

    /// Fast path: scans bytes just read into hyper's own buffer, without
    /// copying. Returns how many of them may be released; the rest (a partial
    /// head, or a rejected request) is held back or dropped.
    pub(super) fn scan(&mut self, data: &[u8]) -> usize {
        let mut i = 0;
        while i < data.len() {
            match self.state {
                State::Passthrough => return data.len(),
                State::Rejected(_) => return i,
                State::Body(n) | State::ChunkData(n) => {
                    let take = usize::try_from(n).unwrap_or(usize::MAX).min(data.len() - i);
                    i += take;
                    self.state = self.state.consumed(take as u64);
                }
                State::Head => {
                    if data[i..].starts_with(b"\r\n") {
                        i += 2;
                        continue;
                    }
                    let Some(end) = find(&data[i..], b"\r\n\r\n") else {
                        // A partial head: hold it back until it is complete.
                        if self.partial_head_ok(&data[i..], 0) {
                            self.pending.extend_from_slice(&data[i..]);
                        }
                        return i;
                    };
                    if !self.after_head(&data[i..i + end + 4]) {
                        return i;
                    }
                    i += end + 4;
                }
                State::ChunkSize | State::Trailers => {
                    // A CRLF split between two reads ends the line kept in `pending`.
                    if self.pending.last() == Some(&b'\r') && data[i] == b'\n' {
                        let mut text = std::mem::take(&mut self.pending);
                        text.truncate(text.len() - 1);
                        if !self.after_line(&text) {
                            return i;
                        }
                        i += 1;
                        continue;
                    }
                    let Some(end) = find(&data[i..], b"\r\n") else {
                        // Chunk lines are released as they come, a copy kept to finish them.
                        self.pending.extend_from_slice(&data[i..]);
                        if self.pending.len() > MAX_CHUNK_LINE {
                            self.reject("chunk line too long", REJECT);
                            return i;
                        }
                        return data.len();
                    };
                    let ok = if self.pending.is_empty() {
                        self.after_line(&data[i..i + end])
                    } else {
                        let mut text = std::mem::take(&mut self.pending);
                        text.extend_from_slice(&data[i..i + end]);
                        self.after_line(&text)
                    };
                    if !ok {
                        return i;
                    }
                    i += end + 2;
                }
            }
        }
        data.len()
    }
}

impl State {
    /// After `n` bytes of a body or chunk.
    fn consumed(self, n: u64) -> State {
        match self {
            State::Body(left) if left > n => State::Body(left - n),
            State::Body(_) => State::Head,
            State::ChunkData(left) if left > n => State::ChunkData(left - n),
            State::ChunkData(_) => State::ChunkSize,
            other => other,
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}
