//! Palisade identity: SPIFFE IDs, the certificate authority that issues
//! X.509-SVIDs, workload key and CSR generation, SVID and chain verification,
//! and the rustls configurations and hot-swappable certificate resolvers that
//! every Palisade TLS endpoint uses.
//!
//! It is not a general X.509 toolkit: it builds and checks exactly the
//! certificates Palisade needs (P-256 workload keys, one URI SAN, short
//! lifetimes; an operator's CA key may also be P-384, RSA or Ed25519).
//! Key material lives in [`SecretPem`] and [`tls::SvidStore`], whose `Debug`
//! output never shows it.

#![warn(missing_docs)]

pub mod ca;
pub mod csr;
pub mod files;
pub mod spiffe;
pub mod svid;
pub mod tls;

pub use ca::{CaError, CertificateAuthority, IssuedCert};
pub use csr::{CsrError, ValidatedCsr, WorkloadKey};
pub use spiffe::{SpiffeId, SpiffeIdError, TrustDomain};
pub use svid::{SvidError, SvidInfo};

/// PEM text that holds a private key. `Debug` and `Display` are redacted.
#[derive(Clone)]
pub struct SecretPem(String);

impl SecretPem {
    /// Wraps PEM text holding a private key.
    pub fn new(pem: String) -> Self {
        Self(pem)
    }
    /// The PEM text, for writing to a 0600 file or loading into rustls.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for SecretPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretPem(<redacted>)")
    }
}

/// The process-wide crypto provider: ring only (see DEPS.md).
pub fn provider() -> std::sync::Arc<rustls::crypto::CryptoProvider> {
    std::sync::Arc::new(rustls::crypto::ring::default_provider())
}

/// Installs ring as rustls' process default, for code that does not take a
/// provider explicitly. Call first thing in every `main`; calling twice is harmless.
pub fn install_default_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
