//! AdmissionReview decoding: any bytes get an answer or an error, never a
//! panic; an answer is a v1 AdmissionReview with the request's uid.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Ok(review) = serde_json::from_slice::<serde_json::Value>(input) else { return };
    let cfg = palisade_inject::Config::default();
    if let Ok(resp) = palisade_inject::admission_review(&review, &cfg) {
        assert_eq!(resp["response"]["uid"], review["request"]["uid"], "the answer names the request");
    }
});
