//! Cross certificates, so pods made before a root rotation survive it.
//!
//! A pod carries the trust bundle of the day it was injected (in its spec).
//! When its container restarts after a rotation, that bundle holds only a
//! retired root, and the control plane's certificate comes from the new one.
//! So a rotation also makes a cross certificate: the new root's name and key
//! signed by the old root's key (public; the old key is still dropped at
//! `done`). The control plane sends it after each of its own certificates,
//! and a client that trusts only the old root builds leaf -> cross -> old
//! root, while one with the new bundle stops at the new root and never
//! trusts the old one. After later rotations they form a chain (R2 by R1,
//! R1 by R0, ...), each until it expires (never later than the root that
//! signed it), at most [`KEEP`].

use std::time::SystemTime;

use palisade_certs::CertificateAuthority;
use palisade_certs::ca::{der_to_pem, parse_pem_certs, sha256_hex};
use rustls_pki_types::CertificateDer;

use super::{Phase, RotationRecord, signing_cert};

/// Cross certificates served at most: this rotation's and the ones before.
pub(crate) const KEEP: usize = 3;

/// The cross certificate of a rotation from `old` to `new`, then the old
/// CA's intermediates (an operator's CA may sign with one), as PEM; empty
/// (with a warning) when it cannot be made.
pub(super) fn make(old: &CertificateAuthority, new: &CertificateAuthority) -> String {
    match old.cross_sign(&signing_cert(new)) {
        Ok(cross) => {
            let parents = parse_pem_certs(&old.cert_pem()).unwrap_or_default();
            let parents = parents.iter().filter(|c| !old.trust_bundle().contains(c));
            std::iter::once(&cross).chain(parents).map(|c| der_to_pem(c)).collect()
        }
        Err(e) => {
            tracing::warn!(error = %e, "no cross certificate for this rotation: pods made before it that restart after it must be re-created");
            String::new()
        }
    }
}

/// Logs a rotation's cross certificate once the rotation is stored.
pub(super) fn audit(record: &RotationRecord) {
    if let Some(cross) = parse_pem_certs(&record.cross_pem).ok().and_then(|c| c.into_iter().next()) {
        tracing::info!(target: "audit", event = "ca_cross_signed", cross = %sha256_hex(&cross), "the new root is cross-signed by the old one: pods that carry only the old bundle keep verifying the control plane");
    }
}

/// The cross certificates of earlier rotations a new rotation keeps: the
/// previous rotation's own if it reached `done`, then the ones it kept,
/// still valid at `now`, at most [`KEEP`] - 1.
pub(super) fn carried(prev: Option<&RotationRecord>, now: SystemTime) -> Vec<String> {
    let Some(prev) = prev else { return Vec::new() };
    let own = (prev.phase == Phase::Done).then_some(&prev.cross_pem);
    own.into_iter().chain(&prev.earlier_cross_pem).filter(|pem| valid(pem, now)).take(KEEP - 1).cloned().collect()
}

/// What the control plane sends after its own certificate: the rotation's
/// cross certificate once its root signs (`reissuing`, `done`; never after
/// an abort), then the earlier ones; the expired left out.
pub(super) fn served(record: Option<&RotationRecord>, now: SystemTime) -> Vec<CertificateDer<'static>> {
    let Some(r) = record else { return Vec::new() };
    let own = matches!(r.phase, Phase::Reissuing | Phase::Done).then_some(&r.cross_pem);
    own.into_iter()
        .chain(&r.earlier_cross_pem)
        .filter(|pem| valid(pem, now))
        .flat_map(|pem| parse_pem_certs(pem).unwrap_or_default())
        .collect()
}

/// A cross certificate (the first of its PEM) valid at `now`.
fn valid(pem: &str, now: SystemTime) -> bool {
    parse_pem_certs(pem)
        .ok()
        .and_then(|c| palisade_certs::SvidInfo::parse(&c[0]).ok())
        .is_some_and(|i| i.not_before <= now && now < i.not_after)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use palisade_certs::TrustDomain;

    use super::*;

    #[test]
    fn an_expired_cross_certificate_is_neither_served_nor_carried() {
        let td = TrustDomain::default();
        // The cross certificate ends with the old root, an hour from now.
        let old = CertificateAuthority::generate(&td, Duration::from_secs(3600)).unwrap();
        let new = CertificateAuthority::generate(&td, Duration::from_secs(365 * 86400)).unwrap();
        let record = RotationRecord {
            phase: Phase::Done,
            old_cert_pem: old.cert_pem(),
            new_cert_pem: new.cert_pem(),
            started: 0,
            since: 0,
            min_phase_secs: 0,
            cross_pem: make(&old, &new),
            earlier_cross_pem: vec![],
            seq: 1,
        };
        let now = SystemTime::now();
        assert_eq!(served(Some(&record), now).len(), 1);
        assert_eq!(carried(Some(&record), now).len(), 1);
        let later = now + Duration::from_secs(2 * 3600);
        assert!(served(Some(&record), later).is_empty());
        assert!(carried(Some(&record), later).is_empty());
        let aborted = RotationRecord { phase: Phase::Aborted, ..record };
        assert!(served(Some(&aborted), now).is_empty() && carried(Some(&aborted), now).is_empty());
    }
}
