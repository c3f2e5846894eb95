//! Request path normalisation: any text gets a normal form or a refusal,
//! never a panic; a normal form is stable and holds no dot segment, empty
//! segment or disguised separator.
#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade_policy::path::normalize;

fuzz_target!(|input: &[u8]| {
    let Ok(text) = std::str::from_utf8(input) else { return };
    let Ok(normal) = normalize(text) else { return };
    if normal == "*" {
        return;
    }
    assert!(normal.starts_with('/'), "{normal:?}");
    assert_eq!(normalize(&normal).as_deref(), Ok(&*normal), "normal forms are stable");
    let body = normal.trim_end_matches('/');
    assert!(!body.split('/').skip(1).any(|s| s.is_empty() || s == "." || s == ".."), "{normal:?}");
    let upper = normal.to_ascii_uppercase();
    assert!(!upper.contains("%2F") && !upper.contains("%5C") && !normal.contains('\\'), "{normal:?}");
});
