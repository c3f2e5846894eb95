//! Protocol detection, differentially against lenient HTTP/1 parsers.
//!
//! - Never panics, and once a prefix is classified more bytes never change
//!   the answer (what the client side and the server side decide from
//!   different amounts of the same stream must agree).
//! - Whatever a lenient app parser reads as a request line (Python's
//!   `http.server`: split on any whitespace; Perl's `HTTP::Daemon`: split on
//!   `[ \t]+`) is decided once its line has ended: `Http1` (served by hyper)
//!   or `Opaque`, which a server sidecar refuses on every port not declared
//!   opaque. Never left waiting, so never carried by a timeout.
//! - What the classifier calls `Http1` httparse (hyper's parser) reads as the
//!   same request line: the same method and target as a lenient parser.
#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade_net::detect::{Protocol, classify};

/// Python `str.split()` whitespace, for bytes decoded as latin-1.
fn py_space(b: u8) -> bool {
    matches!(b, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | 0x1c..=0x20 | 0x85 | 0xa0)
}

/// The first line after empty lines, without its line end, if it has ended.
fn first_line(input: &[u8]) -> Option<&[u8]> {
    let start = input.iter().position(|b| *b != b'\r' && *b != b'\n')?;
    let rest = &input[start..];
    let end = rest.iter().position(|b| *b == b'\n')?;
    let line = &rest[..end];
    Some(line.strip_suffix(b"\r").unwrap_or(line))
}

/// Method and target as Python's `http.server` reads them, if it reads a request.
fn python(line: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let words: Vec<&[u8]> = line.split(|b| py_space(*b)).filter(|w| !w.is_empty()).collect();
    match words[..] {
        [m, t, v] if v.starts_with(b"HTTP/") => Some((m.to_vec(), t.to_vec())),
        [b"GET", t] => Some((b"GET".to_vec(), t.to_vec())),
        _ => None,
    }
}

/// Method and target as Perl's `HTTP::Daemon` reads them:
/// `^(\S+)[ \t]+(\S+)(?:[ \t]+(HTTP/\d+\.\d+))?[^\n]*\n`.
fn perl(line: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    let perl_space = |b: u8| matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c);
    let m = line.iter().take_while(|b| !perl_space(**b)).count();
    let sep = line[m..].iter().take_while(|b| matches!(b, b' ' | b'\t')).count();
    let t = line[m + sep..].iter().take_while(|b| !perl_space(**b)).count();
    (m > 0 && sep > 0 && t > 0).then(|| (line[..m].to_vec(), line[m + sep..m + sep + t].to_vec()))
}

fuzz_target!(|input: &[u8]| {
    let input = &input[..input.len().min(9000)];
    let mut first = None;
    for end in 0..=input.len() {
        match (first, classify(&input[..end])) {
            (None, Some(p)) => first = Some(p),
            (Some(p), q) => assert_eq!(Some(p), q, "classification changed at {end}"),
            (None, None) => {}
        }
    }
    let Some(line) = first_line(input) else { return };
    if line.len() > 8000 || input.starts_with(b"PRI * HTTP/2.0") {
        return;
    }
    for lenient in [python(line), perl(line)].into_iter().flatten() {
        let decided = classify(input);
        assert!(decided.is_some(), "a line a lenient parser reads as a request is left undecided");
        if decided == Some(Protocol::Http1) {
            let mut headers = [httparse::EMPTY_HEADER; 0];
            let mut req = httparse::Request::new(&mut headers);
            let head = [line, b"\r\n\r\n"].concat();
            assert!(req.parse(&head).is_ok(), "classified HTTP/1 but hyper's parser refuses the line");
            assert_eq!(req.method.map(str::as_bytes), Some(&lenient.0[..]), "method differs");
            assert_eq!(req.path.map(str::as_bytes), Some(&lenient.1[..]), "target differs");
        }
    }
});
