//! Renewing a long-lived credential for the key it already has.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use super::{CaError, CertificateAuthority, IssuedCert, sign_err};
use crate::SecretPem;
use crate::csr::ValidatedCsr;
use crate::spiffe::SpiffeId;

impl CertificateAuthority {
    /// [`CertificateAuthority::issue_with_key`] for an existing key (PEM):
    /// a credential renewed this way keeps its key file, so a reader of the
    /// key and certificate files never pairs a new certificate with an old
    /// key.
    pub fn issue_for_key(
        &self,
        id: &SpiffeId,
        dns: &[String],
        ips: &[IpAddr],
        ttl: Duration,
        key: &SecretPem,
    ) -> Result<IssuedCert, CaError> {
        let key = super::key::load(key.expose()).map_err(|source| CaError::KeyPem { source })?;
        let cert = self.leaf_params(id, dns, ips, ttl)?.signed_by(&key, &self.issuer).map_err(sign_err)?;
        self.issued(cert.der().clone())
    }
}

impl CertificateAuthority {
    /// Re-signs a long-lived credential (the operator's) under this CA for
    /// the key of `csr`, valid until `not_after` at most: the credential's own
    /// expiry, never extended. What a root rotation does to an admin
    /// credential the control plane does not keep.
    pub fn recertify_csr(
        &self,
        csr: &ValidatedCsr,
        id: &SpiffeId,
        not_after: SystemTime,
    ) -> Result<IssuedCert, CaError> {
        let ttl = not_after.duration_since(SystemTime::now()).map_err(|_| CaError::Ttl { ttl: Duration::ZERO })?;
        self.certify_key(csr, id, ttl)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spiffe::TrustDomain;

    #[test]
    fn a_renewed_credential_keeps_its_key() {
        let td = TrustDomain::default();
        let ca = CertificateAuthority::generate(&td, Duration::from_secs(86400)).unwrap();
        let (first, key) = ca.issue_with_key(&td.admin(), &[], &[], Duration::from_secs(600)).unwrap();
        let again = ca.issue_for_key(&td.admin(), &[], &[], Duration::from_secs(600), &key).unwrap();
        assert_ne!(first.chain[0], again.chain[0]);
        // The key signs for the renewed certificate: rustls pairs them.
        assert!(crate::csr::certified_key_from_pem(again.chain.clone(), &key).unwrap().keys_match().is_ok());
        let other = ca.issue_with_key(&td.admin(), &[], &[], Duration::from_secs(600)).unwrap().1;
        assert!(crate::csr::certified_key_from_pem(again.chain, &other).unwrap().keys_match().is_err());
        assert!(
            ca.issue_for_key(&td.admin(), &[], &[], Duration::from_secs(600), &SecretPem::new("x".into())).is_err()
        );
    }

    #[test]
    fn a_recertified_credential_keeps_its_key_and_its_expiry() {
        let td = TrustDomain::default();
        let old = CertificateAuthority::generate(&td, Duration::from_secs(86400)).unwrap();
        let new = CertificateAuthority::generate(&td, Duration::from_secs(86400)).unwrap();
        let (first, key) = old.issue_with_key(&td.admin(), &[], &[], Duration::from_secs(3600)).unwrap();
        let csr = crate::csr::csr_for_key(&key, &td.admin()).unwrap();
        let csr = ValidatedCsr::from_der(&csr).unwrap();
        let again = new.recertify_csr(&csr, &td.admin(), first.info.not_after).unwrap();
        assert!(again.info.not_after <= first.info.not_after, "never extended");
        assert!(crate::csr::certified_key_from_pem(again.chain.clone(), &key).unwrap().keys_match().is_ok());
        let roots = crate::svid::root_store(new.trust_bundle()).unwrap();
        assert!(crate::svid::verify_chain(&again.chain, &roots, SystemTime::now()).is_ok(), "from the new root");
        // Only for the identity it names; and not past its end.
        assert!(new.recertify_csr(&csr, &td.control_plane(), first.info.not_after).is_err());
        assert!(new.recertify_csr(&csr, &td.admin(), SystemTime::now() - Duration::from_secs(1)).is_err());
    }
}
