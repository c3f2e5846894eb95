//! One complete request head, parsed with httparse and judged: refused, or
//! what body framing follows it.

/// What a complete head implies.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Verdict {
    Reject(&'static str),
    TooLarge,
    Body(u64),
    Chunked,
    Passthrough,
}

/// Whether `data` has a line feed not preceded by a carriage return.
fn has_bare_lf(data: &[u8]) -> bool {
    data.iter().enumerate().any(|(i, b)| *b == b'\n' && (i == 0 || data[i - 1] != b'\r'))
}

/// Checks one complete request head (ending in CRLF CRLF).
pub(super) fn check_head(head: &[u8], max_headers: usize) -> Verdict {
    if has_bare_lf(head) {
        return Verdict::Reject("bare LF line ending");
    }
    let mut headers = [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; 128];
    let mut req = httparse::Request::new(&mut []);
    match req.parse_with_uninit_headers(head, &mut headers[..max_headers.min(128)]) {
        Ok(httparse::Status::Complete(_)) => {}
        Err(httparse::Error::TooManyHeaders) => return Verdict::TooLarge,
        _ => return Verdict::Reject("unparseable request head"),
    }
    let (mut cls, mut te, mut upgrade, mut connection_upgrade, mut hosts) =
        (Vec::new(), None::<&[u8]>, false, false, 0);
    for h in req.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            cls.push(h.value);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if te.is_some() {
                return Verdict::Reject("several Transfer-Encoding headers");
            }
            te = Some(h.value);
        } else if h.name.eq_ignore_ascii_case("upgrade") {
            upgrade = true;
        } else if h.name.eq_ignore_ascii_case("connection") {
            connection_upgrade |=
                h.value.split(|b| *b == b',').any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"));
        } else if h.name.eq_ignore_ascii_case("host") {
            hosts += 1;
        }
    }
    let http11 = req.version == Some(1);
    if http11 && hosts != 1 {
        return Verdict::Reject("HTTP/1.1 request without exactly one Host");
    }
    if hosts > 1 {
        return Verdict::Reject("several Host headers");
    }
    if req.method == Some("CONNECT") {
        return Verdict::Reject("CONNECT is not tunnelled by the mesh");
    }
    if te.is_some() && !cls.is_empty() {
        return Verdict::Reject("both Content-Length and Transfer-Encoding");
    }
    if te.is_some() && !http11 {
        return Verdict::Reject("Transfer-Encoding in an HTTP/1.0 request");
    }
    if cls.len() > 1 {
        return Verdict::Reject("several Content-Length headers");
    }
    let body = match (te, cls.first()) {
        (Some(te), _) if te.eq_ignore_ascii_case(b"chunked") => Verdict::Chunked,
        (Some(_), _) => return Verdict::Reject("unsupported Transfer-Encoding"),
        (None, None) => Verdict::Body(0),
        (None, Some(v)) => {
            match std::str::from_utf8(v).ok().filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())) {
                Some(s) => match s.parse() {
                    Ok(n) => Verdict::Body(n),
                    Err(_) => return Verdict::Reject("invalid Content-Length"),
                },
                None => return Verdict::Reject("invalid Content-Length"),
            }
        }
    };
    // A real upgrade (both headers) hands the connection over once the app
    // switches; an Upgrade header alone is just a header.
    if upgrade && connection_upgrade {
        return match body {
            Verdict::Body(0) => Verdict::Passthrough,
            _ => Verdict::Reject("upgrade request with a body"),
        };
    }
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts() {
        let v = |h: &str| check_head(h.as_bytes(), 100);
        assert_eq!(v("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Verdict::Body(0));
        assert_eq!(v("GET / HTTP/1.0\r\n\r\n"), Verdict::Body(0));
        assert_eq!(v("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\n"), Verdict::Body(5));
        assert_eq!(v("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"), Verdict::Chunked);
        assert_eq!(
            v("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\n\r\n"),
            Verdict::Passthrough
        );
        // An Upgrade header alone is no upgrade: the guard keeps following.
        assert_eq!(v("GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\n"), Verdict::Body(0));
        for bad in [
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 99999999999999999999999\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1,1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n",
            "GET / HTTP/1.1\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n",
            "GET  / HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nX: a\x00b\r\n\r\n",
            "GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: upgrade\r\nContent-Length: 3\r\n\r\n",
        ] {
            assert!(matches!(v(bad), Verdict::Reject(_)), "{bad:?}: {:?}", v(bad));
        }
        let many: String = (0..101).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(v(&format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n")), Verdict::TooLarge);
    }
}
