//! The `traceparent` reader: any bytes get `None` or a sampled flag, never a
//! panic; a header it accepts is well formed (lower-case hex, non-zero ids,
//! exactly 55 bytes in version 00, never version ff).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|input: &[u8]| {
    let Some(sampled) = palisade_net::traceparent::sampled(input) else { return };
    let hex = |b: &[u8]| b.iter().all(|c| matches!(c, b'0'..=b'9' | b'a'..=b'f'));
    assert!(input.len() >= 55 && hex(&input[..2]) && &input[..2] != b"ff");
    assert!(&input[..2] != b"00" || input.len() == 55);
    let (trace, span, flags) = (&input[3..35], &input[36..52], &input[53..55]);
    assert!(hex(trace) && hex(span) && hex(flags));
    assert!(trace.iter().any(|c| *c != b'0') && span.iter().any(|c| *c != b'0'));
    let f = u8::from_str_radix(std::str::from_utf8(flags).unwrap(), 16).unwrap();
    assert_eq!(sampled, f & 1 == 1);
});
