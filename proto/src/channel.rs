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
    /// Connecting or the TLS handshake failed; `failure` says why, for hints.
    #[error("cannot connect to the control plane at {addr}: {}", failure.explain(detail))]
    Connect {
        addr: String,
        failure: Failure,
        detail: String,
        #[source]
        source: tonic::transport::Error,
    },
}

/// Why a connection to a TLS server failed, as far as the user can act on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// Nothing listens at the address.
    Refused,
    /// The host name does not resolve.
    Resolve,
    /// No answer in time.
    TimedOut,
    /// The server did not answer in TLS (a plain-HTTP port, another service).
    NotTls,
    /// The server's certificate is not signed by the bundle we trust.
    UnknownCa,
    /// The server's certificate has expired (or is not valid yet).
    Expired,
    /// The server's certificate is signed by our CA but names another identity.
    WrongIdentity,
    /// The server refused our client certificate.
    ClientRejected,
    /// Anything else; the detail says what.
    Other,
}

impl Failure {
    /// Works out why from an error chain (tonic -> io -> rustls).
    pub fn of(e: &(dyn std::error::Error + 'static)) -> (Self, String) {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        let mut last = e.to_string();
        while let Some(err) = cur {
            last = err.to_string();
            if let Some(io) = err.downcast_ref::<std::io::Error>() {
                match io.kind() {
                    std::io::ErrorKind::ConnectionRefused => return (Self::Refused, last),
                    std::io::ErrorKind::TimedOut => return (Self::TimedOut, last),
                    _ => {}
                }
                if let Some(tls) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) {
                    return (Self::of_tls(tls), tls.to_string());
                }
                if last.contains("failed to lookup address") || last.contains("Name or service not known") {
                    return (Self::Resolve, last);
                }
            }
            if let Some(tls) = err.downcast_ref::<rustls::Error>() {
                return (Self::of_tls(tls), tls.to_string());
            }
            if last == "timed out" || last.contains("deadline has elapsed") {
                return (Self::TimedOut, last);
            }
            cur = err.source();
        }
        (Self::Other, last)
    }

    fn of_tls(e: &rustls::Error) -> Self {
        use rustls::{AlertDescription as A, CertificateError as C, Error as E};
        match e {
            E::InvalidMessage(_) | E::InappropriateMessage { .. } | E::InappropriateHandshakeMessage { .. } => {
                Self::NotTls
            }
            E::InvalidCertificate(C::UnknownIssuer | C::BadSignature) => Self::UnknownCa,
            E::InvalidCertificate(
                C::Expired | C::ExpiredContext { .. } | C::NotValidYet | C::NotValidYetContext { .. },
            ) => Self::Expired,
            E::InvalidCertificate(_) => Self::WrongIdentity,
            E::AlertReceived(
                A::BadCertificate
                | A::UnknownCA
                | A::CertificateExpired
                | A::CertificateRequired
                | A::CertificateUnknown
                | A::AccessDenied
                | A::DecryptError,
            ) => Self::ClientRejected,
            _ => Self::Other,
        }
    }

    /// The cause and the fix, in words.
    pub fn explain(self, detail: &str) -> String {
        match self {
            Self::Refused => "connection refused: nothing is listening there; is it running, and is the address right?".into(),
            Self::Resolve => format!("the host name does not resolve ({detail})"),
            Self::TimedOut => "no answer in time: is the address right, or is a firewall dropping the connection?".into(),
            Self::NotTls => format!("not a TLS port: the server there does not speak TLS (a plain-HTTP port, or another service?) ({detail})"),
            Self::UnknownCa => "TLS: the server's certificate is not signed by the CA bundle you gave (a bundle from another control plane? use the ca.pem of the control plane at this address)".into(),
            Self::Expired => format!("TLS: the server's certificate is not valid now (expired, or a clock is wrong) ({detail})"),
            Self::WrongIdentity => format!("TLS: the server presented another identity than expected ({detail})"),
            Self::ClientRejected => format!("TLS: the server refused our certificate ({detail}): is the credential from this mesh, and still valid?"),
            Self::Other => detail.to_string(),
        }
    }
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
    connect_from(addr, tls, timeout, None).await
}

/// [`connect`] from a chosen local address (`None`: the system's choice),
/// as simulated sidecars spread over loopback addresses do.
pub async fn connect_from(
    addr: &ControlPlaneAddr,
    tls: Arc<rustls::ClientConfig>,
    timeout: Duration,
    local: Option<std::net::IpAddr>,
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
            let tcp = match local {
                None => TcpStream::connect((host.as_str(), port)).await?,
                Some(ip) => {
                    let remote = tokio::net::lookup_host((host.as_str(), port))
                        .await?
                        .next()
                        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))?;
                    let socket =
                        if ip.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
                    socket.bind(std::net::SocketAddr::new(ip, 0))?;
                    socket.connect(remote).await?
                }
            };
            tcp.set_nodelay(true)?;
            // The SNI/server name is not used for verification (the verifier
            // checks the SPIFFE ID); an IP or DNS name both work here.
            let name = ServerName::try_from(host.clone())
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, std::io::Error>(TokioIo::new(tls))
        }
    });
    endpoint.connect_with_connector(svc).await.map_err(|source| {
        let (failure, detail) = Failure::of(&source);
        ChannelError::Connect { addr: addr.to_string(), failure, detail, source }
    })
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
