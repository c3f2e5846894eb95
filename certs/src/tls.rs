//! rustls configuration for every Palisade TLS endpoint: TLS 1.3 only, ring,
//! SPIFFE-aware verifiers on both sides, and certificate stores whose content
//! is swapped atomically on rotation (new handshakes see the new cert; live
//! connections keep the one they negotiated).

use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, Error, RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::spiffe::{SpiffeId, TrustDomain};
use crate::svid::{SvidError, SvidInfo};

/// ALPN for gRPC / HTTP/2.
pub const ALPN_H2: &[u8] = b"h2";

/// A set of trusted roots that can be replaced while in use.
#[derive(Debug, Clone)]
pub struct TrustBundle {
    inner: Arc<RwLock<Roots>>,
}

#[derive(Debug)]
struct Roots {
    store: Arc<RootCertStore>,
    der: Arc<Vec<CertificateDer<'static>>>,
}

impl TrustBundle {
    /// A bundle from DER roots; errors if none is usable.
    pub fn new(roots: &[CertificateDer<'static>]) -> Result<Self, SvidError> {
        let store = Arc::new(crate::svid::root_store(roots)?);
        Ok(Self { inner: Arc::new(RwLock::new(Roots { store, der: Arc::new(roots.to_vec()) })) })
    }
    /// Replaces the roots (e.g. a bundle received from the control plane).
    pub fn replace(&self, roots: &[CertificateDer<'static>]) -> Result<(), SvidError> {
        let store = Arc::new(crate::svid::root_store(roots)?);
        *self.inner.write().unwrap_or_else(|p| p.into_inner()) = Roots { store, der: Arc::new(roots.to_vec()) };
        Ok(())
    }
    /// The current roots.
    pub fn roots(&self) -> Arc<RootCertStore> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).store.clone()
    }
    /// The current roots as DER certificates.
    pub fn der(&self) -> Arc<Vec<CertificateDer<'static>>> {
        self.inner.read().unwrap_or_else(|p| p.into_inner()).der.clone()
    }
}

/// Which SPIFFE IDs a peer may present.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerIdentity {
    /// Exactly this ID.
    Exact(SpiffeId),
    /// Any ID in this trust domain.
    TrustDomain(TrustDomain),
}

impl PeerIdentity {
    fn check(&self, presented: &SpiffeId) -> Result<(), Error> {
        let ok = match self {
            Self::Exact(want) => want == presented,
            Self::TrustDomain(td) => presented.trust_domain() == td,
        };
        if ok {
            Ok(())
        } else {
            tracing::warn!(target: "audit", expected = %self, presented = %presented, "peer identity mismatch");
            Err(Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure))
        }
    }
}

impl std::fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Exact(id) => write!(f, "{id}"),
            Self::TrustDomain(td) => write!(f, "spiffe://{td}/*"),
        }
    }
}

/// Reads the SPIFFE ID of a presented leaf, requiring exactly one URI SAN.
fn leaf_identity(end_entity: &CertificateDer<'_>) -> Result<SpiffeId, Error> {
    SvidInfo::parse_svid(end_entity).map(|(id, _)| id).map_err(|e| {
        tracing::warn!(target: "audit", error = %e, "peer certificate is not a valid SVID");
        Error::InvalidCertificate(CertificateError::ApplicationVerificationFailure)
    })
}

/// Client side: verifies the server's chain against the bundle and its SPIFFE
/// ID against `expected`. Host names are not checked: identities are.
#[derive(Debug)]
pub struct SpiffeServerVerifier {
    bundle: TrustBundle,
    expected: PeerIdentity,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl SpiffeServerVerifier {
    /// A verifier for servers presenting `expected`.
    pub fn new(bundle: TrustBundle, expected: PeerIdentity) -> Arc<Self> {
        Arc::new(Self { bundle, expected, provider: crate::provider() })
    }
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let parsed = rustls::server::ParsedCertificate::try_from(end_entity)?;
        rustls::client::verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &self.bundle.roots(),
            intermediates,
            now,
            self.provider.signature_verification_algorithms.all,
        )?;
        self.expected.check(&leaf_identity(end_entity)?)?;
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Server side: verifies client chains with webpki against the bundle (rebuilt
/// when the bundle changes) and requires a single-URI-SAN SVID in `allowed`.
#[derive(Debug)]
pub struct SpiffeClientVerifier {
    bundle: TrustBundle,
    allowed: PeerIdentity,
    mandatory: bool,
    cached: RwLock<(Arc<RootCertStore>, Arc<dyn ClientCertVerifier>)>,
}

impl SpiffeClientVerifier {
    /// `mandatory = false` lets clients connect without a certificate (the
    /// control plane's Certify for first-time attestation); a certificate that
    /// is presented must still verify.
    pub fn new(bundle: TrustBundle, allowed: PeerIdentity, mandatory: bool) -> Result<Arc<Self>, Error> {
        let roots = bundle.roots();
        let inner = Self::build(roots.clone(), mandatory)?;
        Ok(Arc::new(Self { bundle, allowed, mandatory, cached: RwLock::new((roots, inner)) }))
    }

    fn build(roots: Arc<RootCertStore>, mandatory: bool) -> Result<Arc<dyn ClientCertVerifier>, Error> {
        let b = WebPkiClientVerifier::builder_with_provider(roots, crate::provider());
        let b = if mandatory { b } else { b.allow_unauthenticated() };
        b.build().map_err(|e| Error::General(e.to_string()))
    }

    fn inner(&self) -> Arc<dyn ClientCertVerifier> {
        let roots = self.bundle.roots();
        {
            let cached = self.cached.read().unwrap_or_else(|p| p.into_inner());
            if Arc::ptr_eq(&cached.0, &roots) {
                return cached.1.clone();
            }
        }
        match Self::build(roots.clone(), self.mandatory) {
            Ok(v) => {
                *self.cached.write().unwrap_or_else(|p| p.into_inner()) = (roots, v.clone());
                v
            }
            Err(_) => self.cached.read().unwrap_or_else(|p| p.into_inner()).1.clone(),
        }
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.inner().verify_client_cert(end_entity, intermediates, now)?;
        self.allowed.check(&leaf_identity(end_entity)?)?;
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner().verify_tls12_signature(message, cert, dss)
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        self.inner().verify_tls13_signature(message, cert, dss)
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner().supported_verify_schemes()
    }
}

/// The current certificate and key of this process, swapped atomically on
/// renewal. Used as both server and client certificate resolver.
#[derive(Clone, Default)]
pub struct SvidStore {
    current: Arc<RwLock<Option<Arc<Svid>>>>,
}

/// One certificate (chain + key) with its public facts.
pub struct Svid {
    /// Chain and signing key for rustls.
    pub certified: Arc<CertifiedKey>,
    /// The leaf's facts.
    pub info: SvidInfo,
    /// The leaf's SPIFFE ID.
    pub id: SpiffeId,
}

impl std::fmt::Debug for Svid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Svid")
            .field("id", &self.id)
            .field("serial", &self.info.serial)
            .field("key", &"<redacted>")
            .finish()
    }
}

impl Svid {
    /// The chain as PEM (public).
    pub fn chain_pem(&self) -> String {
        self.certified.cert.iter().map(|c| crate::ca::der_to_pem(c)).collect()
    }
    /// Whether `now` is inside the validity window.
    pub fn is_valid_at(&self, now: SystemTime) -> bool {
        self.info.not_before <= now && now < self.info.not_after
    }
}

impl std::fmt::Debug for SvidStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SvidStore").field("current", &self.get()).finish()
    }
}

impl SvidStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
    /// Installs a new certificate; new handshakes use it from now on.
    pub fn set(&self, svid: Svid) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(svid));
    }
    /// The current certificate, if any.
    pub fn get(&self) -> Option<Arc<Svid>> {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
    /// The current certificate if it is valid now.
    pub fn valid(&self) -> Option<Arc<Svid>> {
        self.get().filter(|s| s.is_valid_at(SystemTime::now()))
    }
}

impl ResolvesServerCert for SvidStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.get().map(|s| s.certified.clone())
    }
}

impl ResolvesClientCert for SvidStore {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        // Present only a currently valid certificate: an expired one would
        // just fail the handshake instead of letting attestation take over.
        self.valid().map(|s| s.certified.clone())
    }
    fn has_certs(&self) -> bool {
        self.valid().is_some()
    }
}

/// A TLS 1.3 client config with the given verifier and optional client certificate.
pub fn client_config(
    verifier: Arc<dyn ServerCertVerifier>,
    client_cert: Option<Arc<dyn ResolvesClientCert>>,
) -> Result<rustls::ClientConfig, Error> {
    let b = rustls::ClientConfig::builder_with_provider(crate::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    Ok(match client_cert {
        Some(r) => b.with_client_cert_resolver(r),
        None => b.with_no_client_auth(),
    })
}

/// A TLS 1.3 server config with the given client verifier and certificate resolver.
pub fn server_config(
    verifier: Arc<dyn ClientCertVerifier>,
    cert: Arc<dyn ResolvesServerCert>,
    alpn: &[&[u8]],
) -> Result<rustls::ServerConfig, Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(crate::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(cert);
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    no_resumption(&mut cfg);
    Ok(cfg)
}

/// Turns session resumption off on a server that authenticates clients.
///
/// A resumed TLS 1.3 session skips certificate verification: it carries the
/// client certificate of the original handshake, which may have expired or
/// been re-issued since. Every authorization must rest on a certificate that
/// is valid now, so each connection does a full handshake (a sidecar keeps
/// its few connections for long, so this costs little).
pub fn no_resumption(cfg: &mut rustls::ServerConfig) {
    cfg.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    cfg.ticketer = Arc::new(NoTickets);
    cfg.send_tls13_tickets = 0;
}

/// A ticketer that never issues tickets (stateless resumption off).
#[derive(Debug)]
struct NoTickets;

impl rustls::server::ProducesTickets for NoTickets {
    fn enabled(&self) -> bool {
        false
    }
    fn lifetime(&self) -> u32 {
        0
    }
    fn encrypt(&self, _plain: &[u8]) -> Option<Vec<u8>> {
        None
    }
    fn decrypt(&self, _cipher: &[u8]) -> Option<Vec<u8>> {
        None
    }
}

/// The verified peer identity of an accepted TLS connection, if it presented
/// a certificate that is valid now. A connection may outlive its client
/// certificate: callers that authorize per call must not trust an identity
/// whose certificate has expired since the handshake.
pub fn peer_identity(certs: Option<&[CertificateDer<'_>]>) -> Option<(SpiffeId, SvidInfo)> {
    let (id, info) = SvidInfo::parse_svid(certs?.first()?).ok()?;
    let now = SystemTime::now();
    (info.not_before <= now && now < info.not_after).then_some((id, info))
}
