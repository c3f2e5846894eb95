//! Validation of the resilience fields of a `TrafficPolicy` (a route's
//! `timeout`, `perTryTimeout` and `retry`; `balancing`), with the path of
//! the first field that is wrong.

use std::time::Duration;

use super::{BalancingSpec, Ejection, RetryOn, RetrySpec};

/// `(field path, value, why)`.
type Invalid = (String, String, String);

const MS: Duration = Duration::from_millis(1);
const HOUR: Duration = Duration::from_secs(3600);

/// `s` as a duration within `min..=max`.
pub(super) fn duration_in(s: &str, min: Duration, max: Duration) -> Option<Duration> {
    humantime::parse_duration(s).ok().filter(|d| (min..=max).contains(d))
}

fn err<T>(field: String, value: &str, why: &str) -> Result<T, Invalid> {
    Err((field, value.to_string(), why.to_string()))
}

/// An optional duration field within `min..=max`; `range` names it for the fix.
fn field(
    at: &str,
    name: &str,
    v: Option<&String>,
    min: Duration,
    max: Duration,
    range: &str,
) -> Result<Option<Duration>, Invalid> {
    let Some(v) = v else { return Ok(None) };
    match duration_in(v, min, max) {
        Some(d) => Ok(Some(d)),
        None => err(format!("{at}.{name}"), v, &format!("must be a duration such as 500ms or 2s, {range}")),
    }
}

fn number(at: &str, name: &str, v: Option<u64>, max: u64, why: &str) -> Result<(), Invalid> {
    match v {
        Some(n) if n > max => err(format!("{at}.{name}"), &n.to_string(), why),
        _ => Ok(()),
    }
}

/// A route's `timeout`, `perTryTimeout` and `retry`; `at` is the route's
/// path (`spec.routes[0]`).
pub(crate) fn route(
    at: &str,
    timeout: Option<&String>,
    per_try: Option<&String>,
    retry: Option<&RetrySpec>,
) -> Result<(), Invalid> {
    let whole = field(at, "timeout", timeout, MS, HOUR, "from 1ms to 1h")?;
    let one = field(at, "perTryTimeout", per_try, MS, HOUR, "from 1ms to 1h")?;
    if let (Some(whole), Some(one), Some(v)) = (whole, one, per_try)
        && one > whole
    {
        return err(
            format!("{at}.perTryTimeout"),
            v,
            &format!(
                "must not exceed timeout ({}): one try cannot outlast the whole call",
                humantime::format_duration(whole)
            ),
        );
    }
    let Some(r) = retry else { return Ok(()) };
    let at = format!("{at}.retry");
    if let Some(n) = r.attempts
        && !(1..=5).contains(&n)
    {
        return err(
            format!("{at}.attempts"),
            &n.to_string(),
            "must be 1 to 5 tries in all, the first included (1: no retries)",
        );
    }
    let on = r.on.as_deref().unwrap_or_default();
    if r.on.as_ref().is_some_and(Vec::is_empty) {
        return err(format!("{at}.on"), "[]", "must name at least one failure (for no retries, set attempts: 1)");
    }
    if let Err((j, why)) = RetryOn::parse(on) {
        return err(format!("{at}.on[{j}]"), &on[j], why);
    }
    let range = "from 1ms to 10s";
    let backoff = field(&at, "backoff", r.backoff.as_ref(), MS, Duration::from_secs(10), range)?;
    let max = field(&at, "maxBackoff", r.max_backoff.as_ref(), MS, Duration::from_secs(10), range)?;
    if let (Some(max), Some(v)) = (max, &r.max_backoff) {
        let (first, whose) = match backoff {
            Some(b) => (b, "backoff"),
            None => (super::Retry::default().backoff, "backoff's default"),
        };
        if max < first {
            return err(
                format!("{at}.maxBackoff"),
                v,
                &format!("must be at least {whose} ({})", humantime::format_duration(first)),
            );
        }
    }
    number(&at, "maxBodyBytes", r.max_body_bytes, 1 << 20, "must be at most 1048576 (1 MiB)")?;
    if let Some(b) = &r.budget {
        let at = format!("{at}.budget");
        number(&at, "percent", b.percent.map(u64::from), 100, "must be 0 to 100 (percent of the requests)")?;
        number(&at, "minPerSecond", b.min_per_second.map(u64::from), 1000, "must be 0 to 1000 retries a second")?;
    }
    Ok(())
}

/// `spec.balancing`.
pub(crate) fn balancing(b: &BalancingSpec) -> Result<(), Invalid> {
    let at = "spec.balancing";
    field(at, "warmup", b.warmup.as_ref(), Duration::ZERO, Duration::from_secs(600), "from 0s (none) to 10m")?;
    let Some(e) = &b.ejection else { return Ok(()) };
    let at = "spec.balancing.ejection";
    number(at, "consecutiveFailures", e.consecutive_failures.map(u64::from), 1000, "must be 0 (never) to 1000")?;
    number(
        at,
        "successRateMinRequests",
        e.success_rate_min_requests.map(u64::from),
        100_000,
        "must be 0 (never) to 100000",
    )?;
    let base = field(at, "baseTime", e.base_time.as_ref(), Duration::from_millis(100), HOUR, "from 100ms to 1h")?;
    let max = field(at, "maxTime", e.max_time.as_ref(), MS, Duration::from_secs(86_400), "at most 24h")?;
    if let (Some(max), Some(v)) = (max, &e.max_time) {
        let (first, whose) = match base {
            Some(b) => (b, "baseTime"),
            None => (Ejection::default().base_time, "baseTime's default"),
        };
        if max < first {
            return err(
                format!("{at}.maxTime"),
                v,
                &format!("must be at least {whose} ({})", humantime::format_duration(first)),
            );
        }
    }
    number(at, "maxPercent", e.max_percent.map(u64::from), 100, "must be 0 to 100 (percent of a service's endpoints)")?;
    Ok(())
}
