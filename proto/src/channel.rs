//! Dial the control plane: gRPC (HTTP/2) over TLS that we drive ourselves,
//! because tonic's built-in TLS only checks DNS names and SPIFFE SVIDs carry a
//! URI SAN that a custom rustls verifier must check.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Channel, Endpoint};

/// Why a control-plane address could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The address is not `https://host:port`.
    #[error("control-plane address {addr:?} is invalid: {why}; expected https://HOST:PORT")]
    InvalidAddress { addr: String, why: String },
    /// Connecting or the TLS handshake failed.
    #[error("cannot connect to the control plane at {addr}: {source}")]
    Connect {
        addr: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// A parsed `https://host:port` control-plane address.
#[derive(Debug, Clone)]
pub struct ControlPlaneAddr {
    pub host: String,
    pub port: u16,
}

impl ControlPlaneAddr {
    /// Parses `https://HOST:PORT` (the scheme may be omitted).
    pub fn parse(addr: &str) -> Result<Self, ChannelError> {
        let invalid = |why: &str| ChannelError::InvalidAddress { addr: addr.to_string(), why: why.to_string() };
        let rest = match addr.split_once("://") {
            Some(("https", rest)) => rest,
            Some((scheme, _)) => return Err(invalid(&format!("scheme {scheme:?} is not https"))),
            None => addr,
        };
        let rest = rest.trim_end_matches('/');
        let uri: http::uri::Authority = rest.parse().map_err(|_| invalid("not HOST:PORT"))?;
        let port = uri.port_u16().ok_or_else(|| invalid("missing port"))?;
        let host = uri.host().trim_start_matches('[').trim_end_matches(']').to_string();
        if host.is_empty() {
            return Err(invalid("missing host"));
        }
        Ok(Self { host, port })
    }
}

impl std::fmt::Display for ControlPlaneAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.host.contains(':') {
            write!(f, "https://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "https://{}:{}", self.host, self.port)
        }
    }
}

/// Opens a gRPC channel to `addr` over TLS configured by `tls` (whose
/// verifier decides which server identity is acceptable, and whose client
/// cert resolver decides what we present). ALPN is forced to h2.
///
/// The connection is made eagerly so errors surface here, with the address.
pub async fn connect(
    addr: &ControlPlaneAddr,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
) -> Result<Channel, ChannelError> {
    let mut tls = (*tls).clone();
    tls.alpn_protocols = vec![b"h2".to_vec()];
    let connector = TlsConnector::from(Arc::new(tls));
    let host = addr.host.clone();
    let port = addr.port;
    // The URI is only used for the :authority header; TLS is ours (see DEPS.md).
    let endpoint = Endpoint::from_shared(format!("http://{}:{}", bracket(&host), port))
        .map_err(|e| ChannelError::InvalidAddress { addr: addr.to_string(), why: e.to_string() })?
        .connect_timeout(timeout)
        .timeout(timeout)
        .tcp_nodelay(true);
    let svc = tower::service_fn(move |_: http::Uri| {
        let connector = connector.clone();
        let host = host.clone();
        async move {
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            // The SNI/server name is not used for verification (the verifier
            // checks the SPIFFE ID); an IP or DNS name both work here.
            let name = ServerName::try_from(host.clone())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    endpoint
        .connect_with_connector(svc)
        .await
        .map_err(|source| ChannelError::Connect { addr: addr.to_string(), source })
}

fn bracket(host: &str) -> String {
    if host.contains(':') { format!("[{host}]") } else { host.to_string() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        let a = ControlPlaneAddr::parse("https://127.0.0.1:7700").unwrap();
        assert_eq!((a.host.as_str(), a.port), ("127.0.0.1", 7700));
        let a = ControlPlaneAddr::parse("localhost:7700/").unwrap();
        assert_eq!((a.host.as_str(), a.port), ("localhost", 7700));
        let a = ControlPlaneAddr::parse("https://[::1]:7700").unwrap();
        assert_eq!((a.host.as_str(), a.port), ("::1", 7700));
        assert!(ControlPlaneAddr::parse("http://127.0.0.1:7700").is_err());
        assert!(ControlPlaneAddr::parse("https://127.0.0.1").is_err());
        assert!(ControlPlaneAddr::parse("").is_err());
    }
}
