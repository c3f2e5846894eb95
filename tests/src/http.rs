//! A minimal HTTP/1.1 client over hyper for talking to admin endpoints.

use anyhow::Result;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

/// GET `path` from `addr` (HOST:PORT); returns status and body.
pub async fn get(addr: &str, path: &str) -> Result<(u16, String)> {
    let tcp = tokio::time::timeout(std::time::Duration::from_secs(2), tokio::net::TcpStream::connect(addr)).await??;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path).header("host", addr).body(Empty::<Bytes>::new())?;
    let resp = tokio::time::timeout(std::time::Duration::from_secs(5), sender.send_request(req)).await??;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
