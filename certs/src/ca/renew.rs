//! Renewing a long-lived credential for the key it already has.

use std::net::IpAddr;
use std::time::Duration;

use super::{CaError, CertificateAuthority, IssuedCert, sign_err};
use crate::SecretPem;
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
}
