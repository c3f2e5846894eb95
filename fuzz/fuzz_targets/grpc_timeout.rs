//! The `grpc-timeout` reader: any bytes give no deadline or one from a
//! well-formed value (1 to 8 digits and one of the six units), never a panic
//! or an overflow.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some(d) = palisade_net::deadline::grpc_timeout(input) else { return };
    let (unit, digits) = input.split_last().unwrap();
    assert!((1..=8).contains(&digits.len()) && digits.iter().all(u8::is_ascii_digit));
    assert!(b"HMSmun".contains(unit));
    assert!(d <= std::time::Duration::from_secs(99_999_999 * 3600));
});
