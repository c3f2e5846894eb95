//! X.509-SVID parsing of arbitrary DER: errors, never panics.
#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade_certs::SvidInfo;

fuzz_target!(|input: &[u8]| {
    let _ = SvidInfo::parse(input);
    if let Ok((id, info)) = SvidInfo::parse_svid(input) {
        assert_eq!(info.spiffe_id.as_ref(), Some(&id));
    }
    let der = rustls_pki_types::CertificateDer::from(input);
    let _ = palisade_certs::tls::peer_identity(Some(std::slice::from_ref(&der)));
});
