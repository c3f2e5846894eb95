use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::*;

/// Runs `input` through the guard into a real hyper server that records
/// the requests it parsed (path, and whether its body read cleanly).
/// Returns them and what the client got back. A small `pipe` forces
/// every read to return a fragment.
async fn through_pipe(input: &[u8], pipe: usize) -> (Vec<String>, String) {
    use http_body_util::BodyExt;
    let (client, server) = tokio::io::duplex(pipe);
    let (mut cr, mut cw) = tokio::io::split(client);
    let input = input.to_vec();
    tokio::spawn(async move {
        let _ = cw.write_all(&input).await;
        // Keep the write side open: EOF must not be what ends the exchange.
        tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        let _ = cw.shutdown().await;
    });
    let answers = tokio::spawn(async move {
        let mut answered = Vec::new();
        let _ = cr.read_to_end(&mut answered).await;
        String::from_utf8_lossy(&answered).into_owned()
    });
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        let record = record.clone();
        async move {
            let path = req.uri().path().to_string();
            let ok = req.into_body().collect().await.is_ok();
            record.lock().unwrap().push(if ok { path } else { format!("{path} (body error)") });
            // As the proxy does: a body that fails to read is a bad request.
            let mut resp = http::Response::new(http_body_util::Full::new(bytes::Bytes::from("ok")));
            if !ok {
                *resp.status_mut() = http::StatusCode::BAD_REQUEST;
            }
            Ok::<_, std::convert::Infallible>(resp)
        }
    });
    let guard = H1Guard::new(server, 65536, 100);
    let _ = hyper::server::conn::http1::Builder::new()
        .max_buf_size(65536)
        .serve_connection(hyper_util::rt::TokioIo::new(guard), svc)
        .await;
    let seen = seen.lock().unwrap().clone();
    (seen, answers.await.unwrap())
}

const KEEP_ALIVE: &[u8] = b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\r\nPOST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;x=y\r\nhello\r\n10 ; a=b\r\n0123456789abcdef\r\n0\r\nT: v\r\n\r\nGET /c HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";

fn answers(text: &str) -> Vec<&str> {
    text.match_indices("HTTP/1.1 ").map(|(i, _)| &text[i + 9..i + 12]).collect()
}

#[tokio::test]
async fn passes_keep_alive_requests_and_bodies_untouched() {
    for pipe in [1 << 16, 1, 2, 3, 7, 16] {
        let (seen, answered) = through_pipe(KEEP_ALIVE, pipe).await;
        assert_eq!(seen, vec!["/a", "/b", "/c"], "pipe {pipe}");
        assert_eq!(answers(&answered), vec!["200", "200", "200"], "pipe {pipe}");
    }
}

/// What follows a good request never reaches the parser when it is
/// refused, and the refusal comes after the good request's answer.
async fn refused_after_good(rest: &[u8], answer: &str) {
    let mut input = b"GET /a HTTP/1.1\r\nHost: x\r\n\r\n".to_vec();
    input.extend_from_slice(rest);
    for pipe in [1 << 16, 3] {
        let (seen, answered) = through_pipe(&input, pipe).await;
        let what = String::from_utf8_lossy(rest);
        assert_eq!(seen.first().map(String::as_str), Some("/a"), "{what:?}");
        assert!(!seen.iter().any(|p| p.contains("smuggled")), "{what:?}: {seen:?}");
        let statuses = answers(&answered);
        assert_eq!(statuses.first(), Some(&"200"), "{what:?}: {answered:?}");
        // hyper does not wait to flush an error answer into a full pipe.
        if pipe > 1024 {
            assert!(statuses.contains(&answer), "{what:?} -> {answered:?}");
        }
    }
}

#[tokio::test]
async fn a_smuggling_attempt_after_a_good_request_is_cut_off() {
    refused_after_good(b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n", "400").await;
    refused_after_good(b"POST /b HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nxGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n", "400").await;
    // Upgrade without Connection: upgrade no longer turns the guard off.
    refused_after_good(b"GET /b HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\r\nPOST /c HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n", "400").await;
    refused_after_good(
        b"CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        "400",
    )
    .await;
    // Bare LF requests are answered, not left hanging.
    refused_after_good(b"GET /smuggled HTTP/1.1\nHost: x\n\n", "400").await;
    refused_after_good(b"\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n", "400").await;
    let huge = format!("GET /smuggled HTTP/1.1\r\nHost: x\r\nX: {}\r\n\r\n", "a".repeat(70_000));
    refused_after_good(huge.as_bytes(), "431").await;
}

#[tokio::test]
async fn malformed_chunking_ends_the_request_with_400() {
    for bad in [
        // A chunk size that overflows u64 once its CRLF is counted.
        &b"ffffffffffffffff\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"10000000000000000\r\nx\r\n",
        b" 5\r\nhello\r\n0\r\n\r\n",
        b"5\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        b"zz\r\nGET /smuggled HTTP/1.1\r\n\r\n",
    ] {
        let mut input = b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
        input.extend_from_slice(bad);
        for pipe in [1 << 16, 3] {
            let (seen, answered) = through_pipe(&input, pipe).await;
            let what = String::from_utf8_lossy(bad);
            assert!(seen.iter().all(|p| p == "/b (body error)"), "{what:?}: {seen:?}");
            assert!(answered.starts_with("HTTP/1.1 400"), "{what:?}: {answered:?}");
        }
    }
}
