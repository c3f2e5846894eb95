//! CSR handling: arbitrary DER as a certificate request errors, never
//! panics; a request that validates names at most one identity to check.
#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade_certs::{TrustDomain, ValidatedCsr};

fuzz_target!(|input: &[u8]| {
    if let Ok(csr) = ValidatedCsr::from_der(input) {
        let attested = TrustDomain::default().workload("shop", "web").expect("a valid identity");
        let _ = csr.check_identity(&attested);
        let _ = csr.requested_uris();
    }
});
