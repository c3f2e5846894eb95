//! The certificate authority: a P-256 root generated on first start, or an
//! operator's root or intermediate loaded from PEM. It signs workload
//! X.509-SVIDs from validated CSRs and the control plane's own certificates.
//! The signing key never leaves this type and is redacted from `Debug`.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use ring::rand::SecureRandom;
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;

pub use self::key::KeyError;
use crate::csr::ValidatedCsr;
use crate::spiffe::{SpiffeId, TrustDomain};
use crate::svid::SvidInfo;
use crate::{CsrError, SecretPem};

pub mod key;

/// How far `notBefore` is backdated, to tolerate clock skew between hosts.
pub const BACKDATE: Duration = Duration::from_secs(60);
/// Shortest leaf lifetime the CA issues (for tests).
pub const MIN_TTL: Duration = Duration::from_secs(10);
/// Longest leaf lifetime the CA issues.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);

/// Why the CA could not be created, loaded or could not sign.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CaError {
    /// The CA certificate PEM is unreadable or empty.
    #[error("CA certificate PEM is invalid: {reason}")]
    CertPem {
        /// What failed.
        reason: String,
    },
    /// The CA key PEM is unreadable, of a form not accepted, or does not
    /// match the certificate.
    #[error("CA private key is invalid: {source}")]
    KeyPem {
        /// What failed (never the key itself).
        #[source]
        source: KeyError,
    },
    /// The certificate given as CA is not a CA (no basicConstraints CA:TRUE).
    #[error("certificate {subject:?} is not a CA certificate (basicConstraints CA:TRUE missing)")]
    NotCa {
        /// Its subject.
        subject: String,
    },
    /// The CA certificate is expired or not yet valid.
    #[error("CA certificate {subject:?} is not valid now (valid until {not_after})")]
    Expired {
        /// Its subject.
        subject: String,
        /// Its notAfter, RFC 3339.
        not_after: String,
    },
    /// No root could be found for the trust bundle.
    #[error("no trust bundle: the CA certificate chain has no self-signed root; pass the root(s) as the trust bundle")]
    NoRoot,
    /// The requested lifetime is outside the allowed range.
    #[error("certificate TTL {ttl:?} is outside the allowed range {MIN_TTL:?}..={MAX_TTL:?}")]
    Ttl {
        /// The rejected TTL.
        ttl: Duration,
    },
    /// Signing failed.
    #[error("signing failed: {reason}")]
    Sign {
        /// What rcgen said.
        reason: String,
    },
    /// The CSR was refused.
    #[error(transparent)]
    Csr(#[from] CsrError),
}

/// A certificate the CA issued: the chain to send (leaf first, then any
/// intermediates, never the root) and the leaf's public facts.
#[derive(Debug, Clone)]
pub struct IssuedCert {
    /// Leaf first, then intermediates.
    pub chain: Vec<CertificateDer<'static>>,
    /// Facts of the leaf.
    pub info: SvidInfo,
}

impl IssuedCert {
    /// The chain as concatenated PEM.
    pub fn chain_pem(&self) -> String {
        self.chain.iter().map(|c| der_to_pem(c)).collect()
    }
}

/// The signing CA.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    /// The signing certificate followed by its parents up to (excluding) the root.
    chain: Vec<CertificateDer<'static>>,
    bundle: Vec<CertificateDer<'static>>,
    info: SvidInfo,
    key_pem: SecretPem,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("subject", &self.info.subject)
            .field("not_after", &crate::svid::rfc3339::format(self.info.not_after))
            .field("key", &"<redacted>")
            .finish()
    }
}

impl CertificateAuthority {
    /// Generates a self-signed ECDSA P-256 root for `td`, valid for `validity`.
    pub fn generate(td: &TrustDomain, validity: Duration) -> Result<Self, CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(sign_err)?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "Palisade");
        dn.push(DnType::CommonName, format!("Palisade root CA ({td})"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.subject_alt_names = vec![SanType::URI(format!("spiffe://{td}").try_into().map_err(sign_err)?)];
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        params.not_after = (now + validity).into();
        params.serial_number = Some(random_serial()?);
        let der = CertifiedIssuer::self_signed(params, &key).map_err(sign_err)?.der().clone();
        Self::from_parts(vec![der.clone()], vec![der], key)
    }

    /// Loads an operator CA: `cert_pem` holds the signing certificate first,
    /// optionally followed by its parents; `bundle_pem` the roots to trust
    /// (default: the self-signed certificates found in `cert_pem`).
    pub fn from_pem(cert_pem: &str, key_pem: SecretPem, bundle_pem: Option<&str>) -> Result<Self, CaError> {
        // The key first: a root whose key type is not accepted (P-521,
        // RSA-1024) cannot verify its own signature here, so the search for
        // a root below would call it "no root" instead of naming its key.
        let key = key::load(key_pem.expose()).map_err(|source| CaError::KeyPem { source })?;
        let certs = parse_pem_certs(cert_pem).map_err(|reason| CaError::CertPem { reason })?;
        let bundle = match bundle_pem {
            Some(b) => {
                parse_pem_certs(b).map_err(|reason| CaError::CertPem { reason: format!("trust bundle: {reason}") })?
            }
            None => certs.iter().filter(|c| is_self_signed(c)).cloned().collect(),
        };
        if bundle.is_empty() {
            return Err(CaError::NoRoot);
        }
        let chain = certs
            .into_iter()
            .filter(|c| !is_self_signed(c) || bundle.len() == 1 && bundle[0] == *c)
            .collect::<Vec<_>>();
        Self::from_parts(chain, bundle, key)
    }

    fn from_parts(
        chain: Vec<CertificateDer<'static>>,
        bundle: Vec<CertificateDer<'static>>,
        key: KeyPair,
    ) -> Result<Self, CaError> {
        let signing = chain.first().ok_or(CaError::CertPem { reason: "no certificate".into() })?;
        let info = SvidInfo::parse(signing).map_err(|e| CaError::CertPem { reason: e.to_string() })?;
        if !info.is_ca {
            return Err(CaError::NotCa { subject: info.subject });
        }
        let now = SystemTime::now();
        if info.not_after <= now || info.not_before > now + BACKDATE {
            return Err(CaError::Expired {
                subject: info.subject.clone(),
                not_after: crate::svid::rfc3339::format(info.not_after),
            });
        }
        if !spki_matches(signing, &key) {
            let (cert, key) = (spki_kind(signing), key::describe(&key).to_string());
            return Err(CaError::KeyPem { source: KeyError::Mismatch { cert, key } });
        }
        // Kept as PKCS#8 whatever form it came in: what is persisted (the
        // sealed store) reads back with any rcgen.
        let key_pem = SecretPem::new(key.serialize_pem());
        let issuer = Issuer::from_ca_cert_der(signing, key).map_err(|e| CaError::CertPem { reason: e.to_string() })?;
        // The wire chain holds intermediates only: the signing cert unless it is a root itself.
        let chain = chain.into_iter().filter(|c| !bundle.contains(c)).collect();
        Ok(Self { issuer, chain, bundle, info, key_pem })
    }

    /// The signing certificate's facts.
    pub fn info(&self) -> &SvidInfo {
        &self.info
    }

    /// The roots peers must trust.
    pub fn trust_bundle(&self) -> &[CertificateDer<'static>] {
        &self.bundle
    }

    /// The trust bundle as PEM.
    pub fn trust_bundle_pem(&self) -> String {
        self.bundle.iter().map(|c| der_to_pem(c)).collect()
    }

    /// Signing certificate (then its parents) as PEM, for persisting.
    pub fn cert_pem(&self) -> String {
        let mut certs: Vec<&CertificateDer<'static>> = self.chain.iter().collect();
        if certs.is_empty() {
            certs.extend(self.bundle.first());
        }
        certs.iter().map(|c| der_to_pem(c)).collect()
    }

    /// The signing key, for persisting to a 0600 file only.
    pub fn key_pem(&self) -> &SecretPem {
        &self.key_pem
    }

    /// Signs a workload SVID for `id` from a validated CSR.
    pub fn sign_csr(&self, csr: &ValidatedCsr, id: &SpiffeId, ttl: Duration) -> Result<IssuedCert, CaError> {
        if ttl > MAX_TTL || ttl < MIN_TTL {
            return Err(CaError::Ttl { ttl });
        }
        self.certify_key(csr, id, ttl)
    }

    /// Signs `id` for the public key of `csr` (checked to name `id`, if it
    /// names anything), valid for `ttl`.
    fn certify_key(&self, csr: &ValidatedCsr, id: &SpiffeId, ttl: Duration) -> Result<IssuedCert, CaError> {
        csr.check_identity(id)?;
        let mut req = rcgen::CertificateSigningRequestParams {
            params: self.leaf_params(id, &[], &[], ttl)?,
            public_key: csr.params.public_key.clone(),
        };
        // Nothing from the CSR but its public key reaches the certificate.
        req.params.subject_alt_names = vec![uri_san(id)?];
        let cert = req.signed_by(&self.issuer).map_err(sign_err)?;
        self.issued(cert.der().clone())
    }

    /// Issues a certificate with a fresh key for the control plane's own use
    /// (its server certificate, the admin credential). DNS names and IPs are
    /// added as SANs beside the one URI SAN. `ttl` is not bounded by
    /// [`MAX_TTL`] (the admin credential lives longer than workloads' SVIDs).
    pub fn issue_with_key(
        &self,
        id: &SpiffeId,
        dns: &[String],
        ips: &[IpAddr],
        ttl: Duration,
    ) -> Result<(IssuedCert, SecretPem), CaError> {
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).map_err(sign_err)?;
        let params = self.leaf_params(id, dns, ips, ttl)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(sign_err)?;
        Ok((self.issued(cert.der().clone())?, SecretPem::new(key.serialize_pem())))
    }

    fn leaf_params(
        &self,
        id: &SpiffeId,
        dns: &[String],
        ips: &[IpAddr],
        ttl: Duration,
    ) -> Result<CertificateParams, CaError> {
        let mut params = CertificateParams::default();
        // Empty subject: rcgen then marks the SAN critical, as RFC 5280 requires.
        params.distinguished_name = DistinguishedName::new();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.use_authority_key_identifier_extension = true;
        let mut sans = vec![uri_san(id)?];
        for d in dns {
            sans.push(SanType::DnsName(d.clone().try_into().map_err(sign_err)?));
        }
        sans.extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.subject_alt_names = sans;
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE).into();
        // Never outlive the CA: a leaf past its issuer's expiry would not verify anyway.
        params.not_after = (now + ttl).min(self.info.not_after).into();
        params.serial_number = Some(random_serial()?);
        Ok(params)
    }

    fn issued(&self, leaf: CertificateDer<'static>) -> Result<IssuedCert, CaError> {
        let info = SvidInfo::parse(&leaf).map_err(|e| CaError::Sign { reason: e.to_string() })?;
        let mut chain = vec![leaf];
        chain.extend(self.chain.iter().cloned());
        Ok(IssuedCert { chain, info })
    }
}

fn uri_san(id: &SpiffeId) -> Result<SanType, CaError> {
    Ok(SanType::URI(id.to_string().try_into().map_err(sign_err)?))
}

/// A positive, 16-byte serial with 126 random bits (RFC 5280 allows 20 octets).
fn random_serial() -> Result<SerialNumber, CaError> {
    let mut b = [0u8; 16];
    ring::rand::SystemRandom::new().fill(&mut b).map_err(|_| CaError::Sign { reason: "no randomness".into() })?;
    b[0] = (b[0] & 0x3f) | 0x40; // positive, and no leading zero octet
    Ok(SerialNumber::from_slice(&b))
}

fn sign_err(e: rcgen::Error) -> CaError {
    CaError::Sign { reason: e.to_string() }
}

/// Whether a DER certificate is self-signed (subject = issuer and its own key verifies it): a root.
pub fn is_self_signed(der: &CertificateDer<'_>) -> bool {
    use x509_parser::prelude::*;
    X509Certificate::from_der(der)
        .map(|(_, c)| c.subject() == c.issuer() && c.verify_signature(None).is_ok())
        .unwrap_or(false)
}

fn spki_matches(cert: &CertificateDer<'_>, key: &KeyPair) -> bool {
    use x509_parser::prelude::*;
    X509Certificate::from_der(cert)
        .map(|(_, c)| c.public_key().subject_public_key.data.as_ref() == key.public_key_raw())
        .unwrap_or(false)
}

/// The algorithm of a certificate's public key, for messages.
fn spki_kind(cert: &CertificateDer<'_>) -> String {
    use x509_parser::prelude::*;
    let Ok((_, c)) = X509Certificate::from_der(cert) else { return "unreadable".into() };
    let alg = &c.public_key().algorithm;
    let param = alg.parameters.as_ref().and_then(|p| p.as_oid().ok()).map(|o| o.to_id_string());
    match (alg.algorithm.to_id_string().as_str(), param.as_deref()) {
        ("1.2.840.10045.2.1", Some("1.2.840.10045.3.1.7")) => "EC P-256".into(),
        ("1.2.840.10045.2.1", Some("1.3.132.0.34")) => "EC P-384".into(),
        ("1.2.840.10045.2.1", _) => "EC (another curve)".into(),
        ("1.2.840.113549.1.1.1", _) => "RSA".into(),
        ("1.3.101.112", _) => "Ed25519".into(),
        (oid, _) => format!("OID {oid}"),
    }
}

/// Parses every CERTIFICATE block of a PEM text.
pub fn parse_pem_certs(pem: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs =
        CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
    if certs.is_empty() {
        return Err("no CERTIFICATE block found".into());
    }
    Ok(certs)
}

/// SHA-256 of a DER certificate, lowercase hex: how roots are named in
/// status output and compared across the mesh.
pub fn sha256_hex(der: &[u8]) -> String {
    crate::svid::hex(ring::digest::digest(&ring::digest::SHA256, der).as_ref())
}

/// Encodes one DER certificate as PEM (LF line endings).
pub fn der_to_pem(der: &[u8]) -> String {
    let cfg = pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF);
    pem::encode_config(&pem::Pem::new("CERTIFICATE", der.to_vec()), cfg)
}

// `CertificateAuthority::cross_sign`, for root rotation.
mod cross;
// `CertificateAuthority::issue_for_key`, for renewing with the same key.
mod renew;
