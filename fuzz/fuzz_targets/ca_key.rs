//! An operator's CA key: arbitrary text, and arbitrary DER under each PEM
//! label, errors or loads, never panics; every refusal lists what is
//! accepted, and what loads is one of the accepted algorithms.
#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade_certs::ca::key::{ACCEPTED, describe, load};

const LABELS: [&str; 5] =
    ["EC PRIVATE KEY", "RSA PRIVATE KEY", "PRIVATE KEY", "ENCRYPTED PRIVATE KEY", "EC PARAMETERS"];

fuzz_target!(|input: &[u8]| {
    // First byte: 0xff feeds the rest as PEM text; else it picks a label for the rest as DER.
    let Some((&selector, rest)) = input.split_first() else { return };
    let text = if selector == 0xff {
        String::from_utf8_lossy(rest).into_owned()
    } else {
        let label = LABELS[usize::from(selector) % LABELS.len()];
        let mut text = pem::encode(&pem::Pem::new(label, rest.to_vec()));
        if selector & 0x80 != 0 {
            // A second block: the key beside an EC PARAMETERS or a second key.
            text.push_str(&pem::encode(&pem::Pem::new(
                LABELS[usize::from(selector >> 3) % LABELS.len()],
                rest.to_vec(),
            )));
        }
        text
    };
    match load(&text) {
        Ok(key) => {
            assert!(["EC P-256", "EC P-384", "RSA", "Ed25519"].contains(&describe(&key)));
            assert!(!key.public_key_raw().is_empty());
        }
        Err(e) => assert!(e.to_string().contains(ACCEPTED), "{e}"),
    }
});
