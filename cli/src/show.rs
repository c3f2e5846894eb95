//! How values are shown: JSON or YAML per `-o`, times and durations.

use std::time::{Duration, SystemTime};

use anyhow::Result;
use palisade_certs::svid::rfc3339;
use palisade_cmd::{out, outln};

use crate::Output;

/// Prints a JSON value as JSON or YAML per `-o`.
pub(crate) fn print_value(output: Output, v: &serde_json::Value) -> Result<()> {
    if output == Output::Yaml {
        out!("{}", serde_saphyr::to_string(v)?);
    } else {
        outln!("{}", serde_json::to_string_pretty(v)?);
    }
    Ok(())
}

pub(crate) fn ts(t: &Option<palisade_proto::prost_types::Timestamp>) -> Option<SystemTime> {
    t.as_ref().and_then(|t| SystemTime::try_from(*t).ok())
}

pub(crate) fn time_str(t: Option<SystemTime>) -> String {
    t.map(rfc3339::format).unwrap_or_else(|| "-".into())
}

/// "in 9m 58s" / "2m 3s ago".
pub(crate) fn relative(t: Option<SystemTime>) -> String {
    let Some(t) = t else { return "-".into() };
    let now = SystemTime::now();
    match t.duration_since(now) {
        Ok(d) => format!("in {}", short(d)),
        Err(e) => format!("{} ago", short(e.duration())),
    }
}

/// A duration with its two largest units: `89d 2h`, `9m 58s`, `4s`.
pub(crate) fn short(d: Duration) -> String {
    let s = d.as_secs();
    let (days, hours, mins, secs) = (s / 86400, s % 86400 / 3600, s % 3600 / 60, s % 60);
    let pair =
        |a: u64, ua: &str, b: u64, ub: &str| if b == 0 { format!("{a}{ua}") } else { format!("{a}{ua} {b}{ub}") };
    if days > 0 {
        pair(days, "d", hours, "h")
    } else if hours > 0 {
        pair(hours, "h", mins, "m")
    } else if mins > 0 {
        pair(mins, "m", secs, "s")
    } else {
        format!("{secs}s")
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    #[test]
    fn durations_show_their_two_largest_units() {
        let d = |s: u64| short(Duration::from_secs(s));
        assert_eq!(d(4), "4s");
        assert_eq!(d(9 * 60 + 58), "9m 58s");
        assert_eq!(d(3600), "1h");
        assert_eq!(d(89 * 86400 + 2 * 3600 + 59), "89d 2h");
    }

    #[test]
    fn times_show_relative_to_now_or_a_dash() {
        assert_eq!(time_str(None), "-");
        assert_eq!(relative(None), "-");
        let now = SystemTime::now();
        assert!(relative(Some(now + Duration::from_secs(600))).starts_with("in 9m"));
        assert_eq!(relative(Some(now - Duration::from_secs(125))), "2m 5s ago");
        assert_eq!(ts(&None), None);
    }
}
