//! What an HTTP/2 client is doing, read off the frames it sends (the server
//! side of a connection, after TLS): whether bytes carry requests (HEADERS,
//! DATA) or only keep the connection open (PING, SETTINGS, WINDOW_UPDATE,
//! PRIORITY), and how many streams it has opened. An idle timeout that
//! counted PINGs as activity could be held open forever by a client that
//! never asks for anything; this lets [`crate::IdleTimeout`] tell them apart.
//!
//! It only looks at frame headers (9 bytes) and skips payloads, so it costs
//! a few comparisons per frame and holds no buffer. A peer that does not
//! open with the HTTP/2 preface speaks HTTP/1: every byte is activity then.

/// The client connection preface (RFC 9113 §3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
const DATA: u8 = 0x0;
const HEADERS: u8 = 0x1;

/// The client opened more streams than allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct TooManyStreams;

#[derive(Debug, Clone, Copy)]
enum State {
    /// `n` bytes of the preface seen so far.
    Preface(usize),
    /// Not HTTP/2: nothing to watch.
    Http1,
    /// `have` bytes of a frame header in `head`.
    Header { head: [u8; 9], have: usize },
    /// `left` bytes of a frame payload still to skip.
    Payload { left: usize },
}

/// Follows the frames of one client's byte stream.
#[derive(Debug, Clone)]
pub(crate) struct H2Watch {
    state: State,
    highest_stream: u32,
    streams: u32,
    max_streams: Option<u32>,
}

impl H2Watch {
    /// A watch on a new connection; `max_streams` caps the streams it may open.
    pub(crate) fn new(max_streams: Option<u32>) -> Self {
        Self { state: State::Preface(0), highest_stream: 0, streams: 0, max_streams }
    }

    /// The cap on streams, if any.
    pub(crate) fn max_streams(&self) -> Option<u32> {
        self.max_streams
    }

    /// Takes in the next bytes the client sent; says whether any of them
    /// belonged to a request (or to HTTP/1, or to the preface).
    pub(crate) fn feed(&mut self, mut bytes: &[u8]) -> Result<bool, TooManyStreams> {
        let mut active = false;
        while !bytes.is_empty() {
            match &mut self.state {
                State::Http1 => return Ok(true),
                State::Preface(n) => {
                    let want = &PREFACE[*n..];
                    let take = want.len().min(bytes.len());
                    if bytes[..take] != want[..take] {
                        self.state = State::Http1;
                        return Ok(true);
                    }
                    active = true;
                    *n += take;
                    bytes = &bytes[take..];
                    if *n == PREFACE.len() {
                        self.state = State::Header { head: [0; 9], have: 0 };
                    }
                }
                State::Header { head, have } => {
                    let take = (9 - *have).min(bytes.len());
                    head[*have..*have + take].copy_from_slice(&bytes[..take]);
                    *have += take;
                    bytes = &bytes[take..];
                    if *have == 9 {
                        let head = *head;
                        active |= self.frame(head)?;
                    }
                }
                State::Payload { left } => {
                    let take = (*left).min(bytes.len());
                    *left -= take;
                    bytes = &bytes[take..];
                    if *left == 0 {
                        self.state = State::Header { head: [0; 9], have: 0 };
                    }
                }
            }
        }
        Ok(active)
    }

    /// A complete frame header: counts a new stream, says whether it is a request's frame.
    fn frame(&mut self, head: [u8; 9]) -> Result<bool, TooManyStreams> {
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let kind = head[3];
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        self.state = if len == 0 { State::Header { head: [0; 9], have: 0 } } else { State::Payload { left: len } };
        // A HEADERS frame on a stream above every earlier one opens a stream
        // (client streams only go up, RFC 9113 §5.1.1); trailers do not.
        if kind == HEADERS && stream > self.highest_stream {
            self.highest_stream = stream;
            self.streams += 1;
            if self.max_streams.is_some_and(|max| self.streams > max) {
                return Err(TooManyStreams);
            }
        }
        Ok(kind == HEADERS || kind == DATA)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, 0];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }

    const SETTINGS: u8 = 0x4;
    const PING: u8 = 0x6;
    const WINDOW_UPDATE: u8 = 0x8;

    #[test]
    fn pings_and_settings_are_not_activity_requests_are() {
        let mut w = H2Watch::new(None);
        assert!(w.feed(PREFACE).unwrap(), "the preface is a first byte");
        assert!(!w.feed(&frame(SETTINGS, 0, &[0; 6])).unwrap());
        for _ in 0..100 {
            assert!(!w.feed(&frame(PING, 0, &[7; 8])).unwrap(), "a PING is not activity");
        }
        assert!(!w.feed(&frame(WINDOW_UPDATE, 0, &[0, 0, 1, 0])).unwrap());
        assert!(w.feed(&frame(HEADERS, 1, &[0x82; 20])).unwrap(), "a request is");
        assert!(w.feed(&frame(DATA, 1, b"body")).unwrap());
    }

    #[test]
    fn frames_split_anywhere_are_followed() {
        let mut bytes = PREFACE.to_vec();
        bytes.extend(frame(PING, 0, &[1; 8]));
        bytes.extend(frame(HEADERS, 1, &[0x82; 300]));
        bytes.extend(frame(PING, 0, &[2; 8]));
        for chunk in [1, 2, 5, 9, 17, 64] {
            let mut w = H2Watch::new(None);
            let active: Vec<bool> = bytes.chunks(chunk).map(|c| w.feed(c).unwrap()).collect();
            assert!(active.iter().any(|a| *a), "chunk {chunk}");
            assert_eq!(w.streams, 1, "chunk {chunk}");
            // The last PING frame alone is not activity.
            let mut tail = H2Watch::new(None);
            tail.feed(&bytes[..bytes.len() - 17]).unwrap();
            assert!(!tail.feed(&bytes[bytes.len() - 17..]).unwrap(), "chunk {chunk}");
        }
    }

    #[test]
    fn streams_beyond_the_cap_are_refused_trailers_are_not_streams() {
        let mut w = H2Watch::new(Some(1));
        w.feed(PREFACE).unwrap();
        w.feed(&frame(HEADERS, 1, &[0x82])).unwrap();
        w.feed(&frame(HEADERS, 1, &[0x82])).expect("trailers on stream 1 are no new stream");
        assert_eq!(w.feed(&frame(HEADERS, 3, &[0x82])), Err(TooManyStreams));
    }

    #[test]
    fn http1_is_all_activity() {
        let mut w = H2Watch::new(Some(1));
        assert!(w.feed(b"GET / HTTP/1.1\r\n").unwrap());
        assert!(w.feed(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap());
    }
}
