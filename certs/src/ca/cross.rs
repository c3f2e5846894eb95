//! Cross-signing: a root's subject and public key certified by another CA,
//! so that a client that trusts only that CA still verifies what the root
//! signs (leaf -> cross certificate -> the CA it trusts).

use std::time::SystemTime;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, DnValue, IsCa, KeyIdMethod, KeyUsagePurpose,
    SanType, SubjectPublicKeyInfo,
};
use rustls_pki_types::CertificateDer;
use x509_parser::der_parser::asn1_rs::Tag;
use x509_parser::prelude::*;

use super::{BACKDATE, CaError, CertificateAuthority, random_serial, sign_err};

impl CertificateAuthority {
    /// Certifies `root` (a CA certificate, normally the root a rotation
    /// moves to) with this CA's key: the result has `root`'s subject, public
    /// key, subject key identifier, SANs, key usages and basicConstraints
    /// (CA:TRUE), this CA as issuer, a fresh serial, and is valid from now
    /// until the earlier of the two certificates' `notAfter`. A chain
    /// `leaf -> cross certificate` then verifies against this CA's roots as
    /// well as against `root` itself.
    ///
    /// Refused ([`CaError::CertPem`]) for a certificate that is not a CA, or
    /// that carries name constraints or extended key usages (the cross
    /// certificate would not restrict what the root does in the same way),
    /// when this CA's pathLenConstraint allows no CA below it, and when this
    /// CA has expired. An intermediate signing CA sends its chain after the
    /// cross certificate ([`CertificateAuthority::cert_pem`] without roots).
    pub fn cross_sign(&self, root: &CertificateDer<'_>) -> Result<CertificateDer<'static>, CaError> {
        let refuse = |why: String| CaError::CertPem { reason: format!("cannot cross-sign the new root: {why}") };
        let signing = self.chain.first().or(self.bundle.first()).ok_or(CaError::NoRoot)?;
        if let Ok((_, s)) = X509Certificate::from_der(signing)
            && let Ok(Some(bc)) = s.basic_constraints()
            && bc.value.path_len_constraint == Some(0)
        {
            return Err(refuse(format!("the signing CA {} allows no CA below it (pathLenConstraint 0)", s.subject())));
        }
        let (_, cert) = X509Certificate::from_der(root).map_err(|e| refuse(e.to_string()))?;
        let mut params = CertificateParams::default();
        params.distinguished_name = distinguished_name(cert.subject()).map_err(refuse)?;
        params.is_ca = match cert.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => IsCa::Ca(match bc.value.path_len_constraint {
                Some(n) => BasicConstraints::Constrained(u8::try_from(n).unwrap_or(u8::MAX)),
                None => BasicConstraints::Unconstrained,
            }),
            _ => return Err(CaError::NotCa { subject: cert.subject().to_string() }),
        };
        if !matches!(cert.name_constraints(), Ok(None)) {
            return Err(refuse("it has name constraints".into()));
        }
        if !matches!(cert.extended_key_usage(), Ok(None)) {
            return Err(refuse("it has extended key usages".into()));
        }
        params.key_usages = match cert.key_usage() {
            Ok(Some(ku)) => key_usages(ku.value),
            Ok(None) => Vec::new(),
            Err(e) => return Err(refuse(e.to_string())),
        };
        params.subject_alt_names = match cert.subject_alternative_name() {
            Ok(Some(san)) => san.value.general_names.iter().map(san_of).collect::<Result<_, _>>().map_err(refuse)?,
            Ok(None) => Vec::new(),
            Err(e) => return Err(refuse(e.to_string())),
        };
        // The root's own key identifier: clients that match AKI to SKI
        // (OpenSSL) then find the cross certificate for the root's leaves.
        params.key_identifier_method = cert
            .iter_extensions()
            .find_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectKeyIdentifier(id) => Some(KeyIdMethod::PreSpecified(id.0.to_vec())),
                _ => None,
            })
            .unwrap_or(KeyIdMethod::Sha256);
        params.use_authority_key_identifier_extension = true;
        let now = SystemTime::now();
        let not_after = cert.validity().not_after.to_datetime().min(self.info.not_after.into());
        let not_before = ::time::OffsetDateTime::from(now - BACKDATE);
        if not_after <= not_before {
            return Err(refuse("the signing CA or the new root has expired".into()));
        }
        params.not_before = not_before;
        params.not_after = not_after;
        params.serial_number = Some(random_serial()?);
        let key = SubjectPublicKeyInfo::from_der(cert.public_key().raw).map_err(|e| refuse(e.to_string()))?;
        Ok(params.signed_by(&key, &self.issuer).map_err(sign_err)?.der().clone())
    }
}

/// The same name as rcgen encodes it when it signs with a CA certificate
/// (the issuer of the root's leaves), so the cross certificate's subject
/// matches those issuers byte for byte.
fn distinguished_name(name: &X509Name<'_>) -> Result<DistinguishedName, String> {
    let mut dn = DistinguishedName::new();
    for rdn in name.iter() {
        let mut attrs = rdn.iter();
        let (Some(attr), None) = (attrs.next(), attrs.next()) else {
            return Err("a multi-valued name attribute in its subject".into());
        };
        let oid: Vec<u64> = attr.attr_type().iter().ok_or("an unreadable subject attribute")?.collect();
        let data = attr.attr_value().data;
        let text = || std::str::from_utf8(data).map_err(|e| format!("a subject attribute: {e}"));
        let bad = |e: rcgen::Error| format!("a subject attribute: {e}");
        let value = match attr.attr_value().header.tag() {
            Tag::Utf8String => DnValue::Utf8String(text()?.to_owned()),
            Tag::PrintableString => DnValue::PrintableString(text()?.try_into().map_err(bad)?),
            Tag::Ia5String => DnValue::Ia5String(text()?.try_into().map_err(bad)?),
            Tag::T61String => DnValue::TeletexString(text()?.try_into().map_err(bad)?),
            Tag::BmpString => DnValue::BmpString(rcgen::string::BmpString::from_utf16be(data.to_vec()).map_err(bad)?),
            Tag::UniversalString => {
                DnValue::UniversalString(rcgen::string::UniversalString::from_utf32be(data.to_vec()).map_err(bad)?)
            }
            t => return Err(format!("a subject attribute of type {t}")),
        };
        dn.push(DnType::from_oid(&oid), value);
    }
    Ok(dn)
}

fn key_usages(ku: &KeyUsage) -> Vec<KeyUsagePurpose> {
    [
        (ku.digital_signature(), KeyUsagePurpose::DigitalSignature),
        (ku.non_repudiation(), KeyUsagePurpose::ContentCommitment),
        (ku.key_encipherment(), KeyUsagePurpose::KeyEncipherment),
        (ku.data_encipherment(), KeyUsagePurpose::DataEncipherment),
        (ku.key_agreement(), KeyUsagePurpose::KeyAgreement),
        (ku.key_cert_sign(), KeyUsagePurpose::KeyCertSign),
        (ku.crl_sign(), KeyUsagePurpose::CrlSign),
        (ku.encipher_only(), KeyUsagePurpose::EncipherOnly),
        (ku.decipher_only(), KeyUsagePurpose::DecipherOnly),
    ]
    .into_iter()
    .filter_map(|(set, purpose)| set.then_some(purpose))
    .collect()
}

fn san_of(name: &GeneralName<'_>) -> Result<SanType, String> {
    let bad = |e: rcgen::Error| format!("a subject alternative name: {e}");
    Ok(match name {
        GeneralName::URI(u) => SanType::URI((*u).try_into().map_err(bad)?),
        GeneralName::DNSName(d) => SanType::DnsName((*d).try_into().map_err(bad)?),
        GeneralName::RFC822Name(m) => SanType::Rfc822Name((*m).try_into().map_err(bad)?),
        GeneralName::IPAddress(b) => match b.len() {
            4 => SanType::IpAddress(<[u8; 4]>::try_from(*b).map_err(|_| "an IP address SAN")?.into()),
            16 => SanType::IpAddress(<[u8; 16]>::try_from(*b).map_err(|_| "an IP address SAN")?.into()),
            _ => return Err("an IP address SAN of neither 4 nor 16 bytes".into()),
        },
        other => return Err(format!("a subject alternative name of an unsupported kind ({other})")),
    })
}

#[cfg(test)]
mod tests;
