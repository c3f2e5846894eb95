//! SPIFFE ID parsing: never panics; what parses prints back to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade_certs::SpiffeId;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else { return };
    if let Ok(id) = text.parse::<SpiffeId>() {
        let again: SpiffeId = id.to_string().parse().expect("a printed ID parses");
        assert_eq!(again, id);
    }
    let _ = SpiffeId::parse_workload(text);
});
