//! The W3C Trace Context `traceparent` header, read strictly: Palisade
//! decides from its sampled flag whether a request is traced before any
//! tracing library sees it (an unsampled request costs nothing more).

/// The sampled flag of a W3C `traceparent` (`None`: absent or malformed).
pub fn sampled(v: &[u8]) -> Option<bool> {
    let hex = |b: &[u8]| b.iter().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(c));
    if v.len() < 55 || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' || !hex(&v[..2]) || &v[..2] == b"ff" {
        return None;
    }
    let (trace, span, flags) = (&v[3..35], &v[36..52], &v[53..55]);
    if !hex(trace) || !hex(span) || !hex(flags) || trace.iter().all(|c| *c == b'0') || span.iter().all(|c| *c == b'0') {
        return None;
    }
    if &v[..2] == b"00" && v.len() != 55 {
        return None;
    }
    let f = (flags[0] as char).to_digit(16)? * 16 + (flags[1] as char).to_digit(16)?;
    Some(f & 1 == 1)
}

#[cfg(test)]
mod tests {
    use super::sampled as sampled_flag;

    #[test]
    fn traceparent_flags_are_read_strictly() {
        assert_eq!(sampled_flag(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"), Some(true));
        assert_eq!(sampled_flag(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"), Some(false));
        assert_eq!(sampled_flag(b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-03"), Some(true));
        for bad in [
            &b"00-00000000000000000000000000000000-b7ad6b7169203331-01"[..],
            b"00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            b"00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            b"ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333-01",
            b"garbage",
            b"",
        ] {
            assert_eq!(sampled_flag(bad), None, "{}", String::from_utf8_lossy(bad));
        }
        // A later version may carry more fields.
        assert_eq!(sampled_flag(b"01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-what"), Some(true));
    }
}
