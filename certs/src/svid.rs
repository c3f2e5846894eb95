//! Reading and checking X.509-SVIDs: the SPIFFE ID in the one URI SAN, the
//! validity window, and the chain up to a trust bundle.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::RootCertStore;
use rustls::server::ParsedCertificate;
use rustls_pki_types::{CertificateDer, UnixTime};
use x509_parser::prelude::*;

use crate::spiffe::{SpiffeId, SpiffeIdError};

/// Why a certificate is not an acceptable SVID.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SvidError {
    /// The bytes are not a DER X.509 certificate.
    #[error("not a valid X.509 certificate: {reason}")]
    Parse {
        /// What the parser said.
        reason: String,
    },
    /// An SVID carries exactly one URI SAN; this one has none or several.
    #[error("certificate must carry exactly one URI SAN (a SPIFFE ID), found {found:?}")]
    UriSanCount {
        /// The URI SANs present.
        found: Vec<String>,
    },
    /// The URI SAN is not a valid SPIFFE ID.
    #[error("certificate URI SAN is not a valid SPIFFE ID: {0}")]
    SpiffeId(#[from] SpiffeIdError),
    /// The chain does not verify against the trust bundle (or is expired).
    #[error("certificate chain does not verify against the trust bundle: {reason}")]
    Chain {
        /// What rustls/webpki said.
        reason: String,
    },
    /// The trust bundle holds no usable root.
    #[error("trust bundle is empty or holds no usable CA certificate")]
    EmptyBundle,
}

/// The public facts of a certificate Palisade shows and checks.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SvidInfo {
    /// The SPIFFE ID of the single URI SAN, if it has exactly one valid one.
    pub spiffe_id: Option<SpiffeId>,
    /// All URI SANs, as written.
    pub uri_sans: Vec<String>,
    /// Subject distinguished name.
    pub subject: String,
    /// Issuer distinguished name.
    pub issuer: String,
    /// Serial number, lowercase hex without separators.
    pub serial: String,
    /// Start of validity.
    #[serde(with = "crate::svid::rfc3339")]
    pub not_before: SystemTime,
    /// End of validity.
    #[serde(with = "crate::svid::rfc3339")]
    pub not_after: SystemTime,
    /// BasicConstraints CA flag.
    pub is_ca: bool,
}

impl SvidInfo {
    /// Parses the public facts of a DER certificate. Does not require an SVID shape.
    pub fn parse(der: &[u8]) -> Result<Self, SvidError> {
        let (_, cert) = X509Certificate::from_der(der).map_err(|e| SvidError::Parse { reason: e.to_string() })?;
        let mut uri_sans = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                if let GeneralName::URI(u) = name {
                    uri_sans.push((*u).to_string());
                }
            }
        }
        let spiffe_id = match uri_sans.as_slice() {
            [one] => one.parse().ok(),
            _ => None,
        };
        let is_ca = cert.basic_constraints().ok().flatten().map(|bc| bc.value.ca).unwrap_or(false);
        Ok(Self {
            spiffe_id,
            uri_sans,
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            serial: hex(cert.raw_serial()),
            not_before: to_system_time(cert.validity().not_before.timestamp()),
            not_after: to_system_time(cert.validity().not_after.timestamp()),
            is_ca,
        })
    }

    /// Parses a leaf and requires exactly one URI SAN holding a valid SPIFFE ID.
    pub fn parse_svid(der: &[u8]) -> Result<(SpiffeId, Self), SvidError> {
        let info = Self::parse(der)?;
        match info.uri_sans.as_slice() {
            [one] => {
                let id: SpiffeId = one.parse()?;
                Ok((id, info))
            }
            _ => Err(SvidError::UriSanCount { found: info.uri_sans }),
        }
    }

    /// Time left until `not_after` (zero if past).
    pub fn time_left(&self, now: SystemTime) -> Duration {
        self.not_after.duration_since(now).unwrap_or_default()
    }
}

/// Builds a root store from DER certificates; errors if none is usable.
pub fn root_store(bundle: &[CertificateDer<'static>]) -> Result<RootCertStore, SvidError> {
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(bundle.iter().cloned());
    if added == 0 {
        return Err(SvidError::EmptyBundle);
    }
    Ok(roots)
}

/// Verifies `chain` (leaf first) up to one of `roots` at time `now`, with
/// webpki (signatures, validity, CA constraints, EKU serverAuth — every
/// Palisade SVID carries both serverAuth and clientAuth).
pub fn verify_chain(chain: &[CertificateDer<'_>], roots: &RootCertStore, now: SystemTime) -> Result<(), SvidError> {
    let (leaf, intermediates) = chain.split_first().ok_or(SvidError::Chain { reason: "empty chain".into() })?;
    let parsed = ParsedCertificate::try_from(leaf).map_err(|e| SvidError::Chain { reason: e.to_string() })?;
    let algs = rustls::crypto::ring::default_provider().signature_verification_algorithms;
    rustls::client::verify_server_cert_signed_by_trust_anchor(
        &parsed,
        roots,
        intermediates,
        UnixTime::since_unix_epoch(now.duration_since(UNIX_EPOCH).unwrap_or_default()),
        algs.all,
    )
    .map_err(|e| SvidError::Chain { reason: e.to_string() })
}

/// Lower-case hex of bytes (the one copy in `certs`, which does not depend
/// on `palisade-cmd`; other crates use `palisade_cmd::hex`).
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn to_system_time(unix: i64) -> SystemTime {
    if unix >= 0 { UNIX_EPOCH + Duration::from_secs(unix as u64) } else { UNIX_EPOCH }
}

/// RFC 3339 formatting of `SystemTime` for APIs and `/config`.
pub mod rfc3339 {
    use std::time::SystemTime;

    /// Formats a time as RFC 3339 UTC with second precision (`2026-11-28T03:00:00Z`).
    pub fn format(t: SystemTime) -> String {
        let t = time::OffsetDateTime::from(t).replace_nanosecond(0).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
        t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
    }

    /// serde `serialize_with` helper.
    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*t))
    }
}
