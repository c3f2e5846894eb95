//! Fail closed on the protocol (issue 24, findings 1 and 9): the bytes a
//! client sends first never make the mesh carry HTTP as opaque TCP. Checked
//! against two real lenient HTTP parsers behind the sidecars, Python's
//! `http.server` (the demo app's) and Perl's `HTTP::Daemon`: what either
//! reads as a request, the sidecar serves as HTTP or refuses. Real
//! processes, real TLS, loopback only, bounded.

use std::process::Command;
use std::time::{Duration, Instant};

use palisade_tests::{Proc, eventually, free_port, repo_root};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::dataplane::{WEB, pair};

const FORGED: &str = "spiffe://cluster.local/palisade/admin";

/// Perl's HTTP::Daemon: splits the request line on `[ \t]+` and takes
/// trailing junk; answers with the identity header it read.
const PERL_APP: &str = r#"
use HTTP::Daemon; use HTTP::Response;
my $d = HTTP::Daemon->new(LocalAddr => '127.0.0.1', LocalPort => $ARGV[0], ReuseAddr => 1) or die "bind: $!";
$| = 1;
while (my $c = $d->accept) {
  while (my $r = $c->get_request) {
    my $who = $r->header('x-palisade-peer-identity') // '';
    print STDERR "request ", $r->method, " ", $r->uri, "\n";
    $c->send_response(HTTP::Response->new(200, 'OK', ['content-type' => 'text/plain'], "caller=$who\n"));
  }
  $c->close;
}
"#;

/// An app whose keep-alive timeout races the next request: it answers the
/// first request of a connection and closes the connection when a second
/// one arrives, without answering it.
const RACY_APP: &str = r#"
import socket, sys, threading
def handle(c):
    n, buf = 0, b""
    while True:
        while b"\r\n\r\n" not in buf:
            d = c.recv(65536)
            if not d:
                c.close(); return
            buf += d
        head, _, buf = buf.partition(b"\r\n\r\n")
        lines = head.split(b"\r\n")
        length = 0
        for h in lines[1:]:
            k, _, v = h.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
        while len(buf) < length:
            d = c.recv(65536)
            if not d:
                break
            buf += d
        buf = buf[length:]
        n += 1
        sys.stderr.write("request %s\n" % lines[0].decode()); sys.stderr.flush()
        if n >= 2:
            c.close(); return
        c.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nok\n")
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(64)
while True:
    c, _ = s.accept()
    threading.Thread(target=handle, args=(c,), daemon=True).start()
"#;

/// Starts `cmd` (an app listening on `port`) and waits until it accepts.
async fn app(name: &str, cmd: &mut Command, port: u16, dir: &std::path::Path) -> Proc {
    let proc = Proc::spawn(name, cmd, dir).unwrap();
    eventually(&format!("{name} listens"), Duration::from_secs(10), || async {
        TcpStream::connect(("127.0.0.1", port)).await.ok().map(|_| ())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", proc.logs()));
    proc
}

/// The demo's own app (Python `http.server`) on a free port.
async fn demo_app(dir: &std::path::Path) -> (u16, Proc) {
    let port = free_port();
    let echo = repo_root().join("scripts/demo/echo_app.py");
    let proc =
        app("python-app", Command::new("python3").arg(&echo).arg(port.to_string()).arg("orders"), port, dir).await;
    (port, proc)
}

/// Sends `bytes`, returns what comes back until EOF or 5 s.
async fn exchange(port: u16, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// Request lines with whitespace other than one SP between their parts.
fn spellings() -> Vec<(&'static str, Vec<u8>)> {
    let line = |sep: &[u8], lead: &[u8]| [lead, b"GET", sep, b"/x", sep, b"HTTP/1.1"].concat();
    vec![
        ("tab", line(b"\t", b"")),
        ("two spaces", line(b"  ", b"")),
        ("leading space", line(b" ", b" ")),
        ("leading tab", line(b" ", b"\t")),
        ("VT", line(b"\x0b", b"")),
        ("FF", line(b"\x0c", b"")),
        ("0x1C", line(b"\x1c", b"")),
        ("0x85", line(b"\x85", b"")),
        ("trailing junk", [&b"GET /x HTTP/1.1 junk"[..]].concat()),
    ]
}

fn request(line: &[u8]) -> Vec<u8> {
    [line, format!("\r\nHost: orders\r\nx-palisade-peer-identity: {FORGED}\r\nConnection: close\r\n\r\n").as_bytes()]
        .concat()
}

/// Finding 1: request lines that lenient parsers read (tabs, VT, FF, 0x1C,
/// 0x85, leading whitespace) are refused by the sidecars, on the path from
/// the calling app and on the server's plaintext (PERMISSIVE) port, for
/// both apps: the forged identity header never arrives.
#[tokio::test]
async fn no_spelling_of_a_request_line_reaches_a_lenient_app_unchecked() {
    let tmp = tempfile::tempdir().unwrap();
    let (py_port, _py) = demo_app(tmp.path()).await;
    let pl_port = free_port();
    let _pl =
        app("perl-app", Command::new("perl").args(["-e", PERL_APP, &pl_port.to_string()]), pl_port, tmp.path()).await;

    // The control: each parser reads some of these as requests, forged header included.
    let mut read_by = std::collections::HashMap::new();
    for (name, port) in [("python", py_port), ("perl", pl_port)] {
        for (spelling, line) in spellings() {
            if exchange(port, &request(&line)).await.contains(FORGED) {
                read_by.entry(name).or_insert_with(Vec::new).push(spelling);
            }
        }
    }
    assert!(read_by.get("python").is_some_and(|s| s.contains(&"tab") && s.contains(&"0x85")), "{read_by:?}");
    assert!(read_by.get("perl").is_some_and(|s| s.contains(&"tab") && s.contains(&"two spaces")), "{read_by:?}");
    // Perl's HTTP::Headers reads `_` as `-` in a field name, as CGI does.
    let underscore =
        format!("GET /x HTTP/1.1\r\nHost: orders\r\nx_palisade_peer_identity: {FORGED}\r\nConnection: close\r\n\r\n");
    assert!(exchange(pl_port, underscore.as_bytes()).await.contains(FORGED), "the control: perl reads it");

    for (name, app_port) in [("python", py_port), ("perl", pl_port)] {
        let app_addr: std::net::SocketAddr = format!("127.0.0.1:{app_port}").parse().unwrap();
        let p = pair(app_addr, &[], &["--mtls-mode", "permissive"], &["--protocol-detect-timeout", "100ms"]).await;
        let inbound: u16 = p.server.inbound.rsplit(':').next().unwrap().parse().unwrap();
        // A well-formed request arrives, with the verified caller only.
        let ok = exchange(p.port, &request(b"GET /x HTTP/1.1")).await;
        assert!(ok.starts_with("HTTP/1.1 200") && ok.contains(WEB) && !ok.contains(FORGED), "{name}: {ok}");
        let resp = exchange(p.port, underscore.as_bytes()).await;
        assert!(resp.starts_with("HTTP/1.1 200") && !resp.contains(FORGED), "{name}: x_palisade_peer_identity: {resp}");
        for (spelling, line) in spellings() {
            for (path, port) in [("from the calling app", p.port), ("plaintext at the server", inbound)] {
                let resp = exchange(port, &request(&line)).await;
                assert!(!resp.contains(FORGED), "{name}, {spelling}, {path}: the forged identity arrived: {resp}");
                assert!(
                    resp.is_empty() || resp.starts_with("HTTP/1.1 400"),
                    "{name}, {spelling}, {path}: refused with 400 and closed, got {resp:?}"
                );
            }
        }
        let metrics = p.server.get("/metrics").await.unwrap().1;
        assert!(metrics.contains("palisade_inbound_protocol_refused_total{reason=\"not_http\"}"), "{metrics}");
        let logs = p.server.proc.logs();
        assert!(logs.contains("not valid HTTP/1.1 or HTTP/2"), "the audit log says why: {logs}");
        // Identities in audit lines are plain values, never Debug of an Option.
        let refused: Vec<&str> = logs.lines().filter(|l| l.contains("not valid HTTP/1.1 or HTTP/2")).collect();
        assert!(
            refused.iter().any(|l| l.contains(&format!("src.identity=\"{WEB}\""))),
            "{name}: the caller's identity, plain: {refused:#?}"
        );
        assert!(!refused.iter().any(|l| l.contains("Some(") || l.contains("None")), "{name}: {refused:#?}");
    }
}

/// Finding 1, slowloris: a request line that has gone wrong is refused at
/// its first bad byte, and a client that speaks late is held to the same
/// rule (not carried opaque because it missed the detection window).
#[tokio::test]
async fn a_bad_start_is_refused_at_once_early_or_late() {
    let tmp = tempfile::tempdir().unwrap();
    let (py_port, _py) = demo_app(tmp.path()).await;
    let app_addr: std::net::SocketAddr = format!("127.0.0.1:{py_port}").parse().unwrap();
    let p = pair(
        app_addr,
        &[],
        &["--protocol-detect-timeout", "200ms", "--header-read-timeout", "2s"],
        &["--protocol-detect-timeout", "100ms"],
    )
    .await;
    // Neither side speaks (an HTTP app never does): let go at the header
    // timeout, not held as a possible server-first stream.
    let started = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut out)).await;
    assert!(r.is_ok() && started.elapsed() < Duration::from_secs(8), "a silent connection is held");
    for delay in [Duration::ZERO, Duration::from_millis(600)] {
        let started = Instant::now();
        let mut s = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
        tokio::time::sleep(delay).await;
        s.write_all(b"GET\t/x").await.unwrap();
        let mut out = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        assert!(r.is_ok(), "after {delay:?}: the connection must be closed, not held");
        assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 400"), "after {delay:?}: {out:?}");
        assert!(started.elapsed() < delay + Duration::from_secs(3), "refused at once");
        // The whole request, late: refused too, never delivered.
        let mut s = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
        tokio::time::sleep(delay).await;
        s.write_all(&request(b"GET\t/x\tHTTP/1.1")).await.unwrap();
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        let out = String::from_utf8_lossy(&out);
        assert!(!out.contains(FORGED) && (out.is_empty() || out.starts_with("HTTP/1.1 400")), "{out}");
    }
}

/// Finding 1: an opaque stream is authorised with the caller's certificate
/// and ends when that certificate expires, whatever renewals happen since.
#[tokio::test]
async fn an_opaque_stream_ends_with_the_certificate_it_was_opened_with() {
    let echo = palisade_tests::apps::tcp_echo().await;
    let p = pair(echo, &["--cert-ttl", "10s"], &["--opaque-port", &echo.port().to_string()], &[]).await;
    let started = Instant::now();
    let mut s = TcpStream::connect(("127.0.0.1", p.port)).await.unwrap();
    s.write_all(b"\x00\x01held open").await.unwrap();
    let mut out = Vec::new();
    let r = tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut out)).await;
    assert!(r.is_ok(), "still open after 30 s on 10 s certificates");
    assert!(started.elapsed() <= Duration::from_secs(15), "closed at the caller's certificate expiry");
    let logs = p.server.proc.logs();
    assert!(logs.contains("the certificate the connection was authorised with expired"), "{logs}");
}

/// Finding 9: an app that closes a kept-alive connection when the next
/// request arrives costs no GET a 502 (sent again once, on a new
/// connection); a POST is never sent twice.
#[tokio::test]
async fn an_idempotent_request_survives_a_keep_alive_race_a_post_is_not_repeated() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let racy =
        app("racy-app", Command::new("python3").args(["-c", RACY_APP, &port.to_string()]), port, tmp.path()).await;
    let app_addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let p = pair(app_addr, &[], &[], &[]).await;
    for i in 0..10 {
        let resp =
            exchange(p.port, format!("GET /get/{i} HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n").as_bytes())
                .await;
        assert!(resp.starts_with("HTTP/1.1 200"), "GET {i}: {resp}");
    }
    let mut failed = 0;
    for i in 0..6 {
        let resp = exchange(
            p.port,
            format!("POST /post/{i} HTTP/1.1\r\nHost: orders\r\ncontent-length: 2\r\nConnection: close\r\n\r\nhi")
                .as_bytes(),
        )
        .await;
        failed += usize::from(resp.starts_with("HTTP/1.1 502"));
    }
    let logs = racy.logs();
    for i in 0..6 {
        assert_eq!(logs.matches(&format!("request POST /post/{i} ")).count(), 1, "POST {i} sent once: {logs}");
    }
    assert!(failed > 0, "the race is real: some POSTs met a closing connection");
}
