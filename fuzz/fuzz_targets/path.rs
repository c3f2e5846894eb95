//! Request path normalisation: any text gets a normal form or a refusal,
//! never a panic, under any policy options; a normal form is stable and
//! holds no dot segment, empty segment or disguised separator (kept
//! encoded separators stay encoded, never become `/`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use palisade_policy::path::{Encoded, Merge, Options, Resolve, normalize_with};

fuzz_target!(|input: &[u8]| {
    let Some((&flags, rest)) = input.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let opts = Options {
        dot_segments: if flags & 1 == 0 { Resolve::Resolve } else { Resolve::Refuse },
        empty_segments: if flags & 2 == 0 { Merge::Merge } else { Merge::Refuse },
        encoded_slashes: if flags & 4 == 0 { Encoded::Refuse } else { Encoded::Keep },
    };
    let Ok(normal) = normalize_with(text, &opts) else { return };
    if normal == "*" {
        return;
    }
    assert!(normal.starts_with('/'), "{normal:?}");
    assert_eq!(normalize_with(&normal, &opts).as_deref(), Ok(&*normal), "normal forms are stable");
    let body = normal.trim_end_matches('/');
    assert!(!body.split('/').skip(1).any(|s| s.is_empty() || s == "." || s == ".."), "{normal:?}");
    assert!(!normal.contains('\\'), "{normal:?}");
    let upper = normal.to_ascii_uppercase();
    if opts.encoded_slashes == Encoded::Refuse {
        assert!(!upper.contains("%2F") && !upper.contains("%5C"), "{normal:?}");
    }
    // The slashes the input spelled out are never fewer than the normal form's.
    assert!(normal.matches('/').count() <= text.matches('/').count() + 1, "{text:?} -> {normal:?}");
});
