//! `palisadectl dashboard`'s gate (cli/src/dashboard/guard.rs, compiled in
//! here as it is): any request head parsed as a browser would send it. It
//! must never panic; it lets a request through only with the token (in the
//! URL of `/`, or in the cookie) and the dashboard's own Host, and a POST
//! only to the preview with its header, JSON and an Origin.
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
    let host = r.headers().get("host").map(|h| h.as_bytes().to_ascii_lowercase());
    let host_ok = matches!(host.as_deref(), Some(b"127.0.0.1:9999" | b"localhost:9999" | b"[::1]:9999"));
    let cookies: Vec<&[u8]> = r.headers().get_all("cookie").iter().map(|v| v.as_bytes()).collect();
    match g.check(&r) {
        Verdict::Pass => {
            assert!(host_ok);
            assert!(cookies.iter().any(|c| c.windows(25).any(|w| w == b"palisade-dashboard-9999=T")));
            if r.method() != http::Method::GET && r.method() != http::Method::HEAD {
                assert_eq!(r.method(), http::Method::POST);
                assert_eq!(r.uri().path(), "/api/preview");
                assert!(r.headers().contains_key("origin") && r.headers().contains_key(guard::CSRF_HEADER));
            }
        }
        Verdict::Login => {
            assert!(host_ok);
            assert_eq!(r.uri().path(), "/");
            assert!(r.uri().query().is_some_and(|q| q.contains("token=T0KEN-fuzz")));
        }
        Verdict::Refuse(..) => {}
    }
});
