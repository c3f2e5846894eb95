//! `palisadectl dashboard`'s gate (cli/src/dashboard/guard.rs, compiled in
//! here as it is): any request head parsed as a browser would send it. It
//! must never panic; it lets a request through only under the token (the
//! path's first segment) with one Host, the dashboard's own, and a POST only
//! to the preview with its header, JSON and an Origin.
#![no_main]

#[allow(dead_code, unreachable_pub, clippy::all)]
#[path = "../../cli/src/dashboard/guard.rs"]
mod guard;

use guard::{Guard, Verdict};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut req = httparse::Request::new(&mut headers);
    let Ok(httparse::Status::Complete(_)) = req.parse(input) else { return };
    let (Some(method), Some(path)) = (req.method, req.path) else { return };
    let mut b = http::Request::builder().method(method).uri(path);
    for h in req.headers.iter() {
        b = b.header(h.name, h.value);
    }
    let Ok(r) = b.body(()) else { return };
    let g = Guard::new("T0KEN-fuzz".into(), "127.0.0.1:9999".parse().unwrap(), false);
    let hosts: Vec<Vec<u8>> = r.headers().get_all("host").iter().map(|h| h.as_bytes().to_ascii_lowercase()).collect();
    let host_ok = hosts.len() == 1
        && matches!(hosts[0].as_slice(), b"127.0.0.1:9999" | b"localhost:9999" | b"[::1]:9999")
        && r.uri().authority().is_none();
    let p = r.uri().path();
    match g.check(&r) {
        Verdict::Pass(rest) => {
            assert!(host_ok);
            assert!(p.starts_with("/T0KEN-fuzz/") && p.ends_with(rest) && rest.starts_with('/'));
            if r.method() != http::Method::GET && r.method() != http::Method::HEAD {
                assert_eq!(r.method(), http::Method::POST);
                assert_eq!(rest, "/api/preview");
                assert!(r.headers().contains_key("origin") && r.headers().contains_key(guard::CSRF_HEADER));
            }
        }
        Verdict::Slash => {
            assert!(host_ok);
            assert_eq!(p, "/T0KEN-fuzz");
        }
        Verdict::Refuse(..) => {}
    }
});
