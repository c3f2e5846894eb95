//! Protocol detection: never panics, and once a prefix is classified more
//! bytes never change the answer (what the client side and the server side
//! decide from different amounts of the same stream must agree).
#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade_net::detect::classify;

fuzz_target!(|input: &[u8]| {
    let mut first = None;
    for end in 0..=input.len().min(9000) {
        match (first, classify(&input[..end])) {
            (None, Some(p)) => first = Some(p),
            (Some(p), q) => assert_eq!(Some(p), q, "classification changed at {end}"),
            (None, None) => {}
        }
    }
});
