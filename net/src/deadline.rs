//! gRPC's `grpc-timeout` request header (the call's deadline as the client
//! set it): up to 8 ASCII digits and a unit, `H`, `M`, `S`, `m` (ms), `u`
//! (µs) or `n` (ns). Anything else is no deadline.

use std::time::Duration;

/// The deadline a `grpc-timeout` value gives, if it is well formed.
pub fn grpc_timeout(value: &[u8]) -> Option<Duration> {
    let (unit, digits) = value.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_timeouts_parse_and_malformed_ones_are_ignored() {
        let t = |v: &str| grpc_timeout(v.as_bytes());
        assert_eq!(t("100m"), Some(Duration::from_millis(100)));
        assert_eq!(t("2S"), Some(Duration::from_secs(2)));
        assert_eq!(t("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(t("99999999H"), Some(Duration::from_secs(99_999_999 * 3600)), "the largest there is");
        assert_eq!(t("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "m", "123456789m", "10x", "-1S", "1.5S", "10", " 1S", "1S ", "１S"] {
            assert_eq!(t(bad), None, "{bad:?}");
        }
    }
}
