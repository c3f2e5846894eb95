//! What a calling sidecar does when a call is slow or fails: the request
//! and per-try timeouts and the retry policy of a route (`routes[].timeout`,
//! `routes[].perTryTimeout`, `routes[].retry`), and how it balances and
//! ejects the endpoints of the services it calls (`balancing`).
//!
//! The spec types are what a `TrafficPolicy` says; the compiled types
//! ([`Resilience`], [`Retry`], [`Balancing`]) are what the sidecar runs,
//! with every default filled in.

use std::time::Duration;

use serde::{Deserialize, Serialize};

#[cfg(test)]
mod tests;
mod validate;

pub(crate) use validate::{balancing as validate_balancing, route as validate_route};

/// `routes[].retry`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RetrySpec {
    /// Tries in all, the first included (default 2, 1 disables retries, at most 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u32>,
    /// Which failures are retried (absent: `connect-failure`, `reset`,
    /// `try-timeout`, `503`, `unavailable`; an empty list is refused, as
    /// `attempts: 1` says "no retries"): see [`RetryOn::parse`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on: Option<Vec<String>>,
    /// First backoff before a retry, jittered (default 25ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backoff: Option<String>,
    /// Largest backoff (default 250ms, or `backoff` when that is larger);
    /// each retry doubles the last.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_backoff: Option<String>,
    /// Retry methods that are not idempotent (POST, PATCH) too.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub non_idempotent: bool,
    /// Largest request body kept to send again (default 64 KiB, at most
    /// 1 MiB); a request with a larger body is not retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_body_bytes: Option<u64>,
    /// The retry budget of the calling sidecar for the called service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<BudgetSpec>,
}

/// `routes[].retry.budget`: retries in the last 10 s may be at most
/// `percent`% of the requests in that time, plus `minPerSecond` a second.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BudgetSpec {
    /// Default 20, at most 100.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<u32>,
    /// Default 10, at most 1000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_per_second: Option<u32>,
}

/// `balancing`: how the targeted (calling) workloads spread their calls
/// over the endpoints of a service, and when they stop sending to one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BalancingSpec {
    /// How long a new endpoint takes to get its full share (default 10s, `0s`: none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub warmup: Option<String>,
    /// When an endpoint is taken out of balancing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ejection: Option<EjectionSpec>,
}

/// `balancing.ejection`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct EjectionSpec {
    /// Failures in a row (connect errors, resets, 5xx) that eject (default 5; 0: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub consecutive_failures: Option<u32>,
    /// Requests an endpoint must have had in the last 10 s before its
    /// success rate is compared with its peers' (default 20; 0: never).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub success_rate_min_requests: Option<u32>,
    /// First ejection's length (default 10s); each ejection in a row doubles it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_time: Option<String>,
    /// Longest ejection (default 5m, or `baseTime` when that is larger).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_time: Option<String>,
    /// Most of a service's endpoints ejected at once, in percent (default 50).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_percent: Option<u32>,
}

/// gRPC status codes by their names in `retry.on`.
pub const GRPC_CODES: &[(&str, u8)] = &[
    ("cancelled", 1),
    ("unknown", 2),
    ("deadline-exceeded", 4),
    ("resource-exhausted", 8),
    ("aborted", 10),
    ("internal", 13),
    ("unavailable", 14),
];

/// Which failures are retried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryOn {
    /// The endpoint could not be reached (nothing was sent).
    pub connect_failure: bool,
    /// The connection or stream ended before any response.
    pub reset: bool,
    /// A per-try timeout ended the try.
    pub try_timeout: bool,
    /// Any 5xx response.
    pub any_5xx: bool,
    /// These statuses (`503`, `429` only when named).
    pub statuses: Vec<u16>,
    /// These gRPC status codes, a bit each (in trailers-only responses).
    pub grpc: u32,
}

impl Default for RetryOn {
    fn default() -> Self {
        Self {
            connect_failure: true,
            reset: true,
            try_timeout: true,
            any_5xx: false,
            statuses: vec![503],
            grpc: 1 << 14,
        }
    }
}

impl RetryOn {
    /// Parses `retry.on`: `connect-failure`, `reset`, `try-timeout`, `5xx`,
    /// `gateway-error` (502, 503, 504), a status (`503`, `409`, `429`:
    /// 400 to 599), or a gRPC code name ([`GRPC_CODES`]). Empty: the
    /// default. `Err((index, why))` names the entry that is not one.
    pub fn parse(on: &[String]) -> Result<Self, (usize, &'static str)> {
        if on.is_empty() {
            return Ok(Self::default());
        }
        let mut out = Self {
            connect_failure: false,
            reset: false,
            try_timeout: false,
            any_5xx: false,
            statuses: Vec::new(),
            grpc: 0,
        };
        for (i, c) in on.iter().enumerate() {
            match c.as_str() {
                "connect-failure" => out.connect_failure = true,
                "reset" => out.reset = true,
                "try-timeout" => out.try_timeout = true,
                "5xx" => out.any_5xx = true,
                "gateway-error" => out.statuses.extend([502, 503, 504]),
                s if s.len() == 3 && s.bytes().all(|b| b.is_ascii_digit()) => match s.parse::<u16>() {
                    Ok(n) if (400..600).contains(&n) => out.statuses.push(n),
                    _ => return Err((i, "a status must be 400 to 599")),
                },
                s => match GRPC_CODES.iter().find(|(n, _)| *n == s) {
                    Some((_, code)) => out.grpc |= 1 << code,
                    None => {
                        return Err((
                            i,
                            "must be connect-failure, reset, try-timeout, 5xx, gateway-error, a status (400-599) or a gRPC code (cancelled, unknown, deadline-exceeded, resource-exhausted, aborted, internal, unavailable)",
                        ));
                    }
                },
            }
        }
        out.statuses.sort_unstable();
        out.statuses.dedup();
        Ok(out)
    }

    /// Whether a response with this HTTP status is retried.
    pub fn status(&self, status: u16) -> bool {
        (self.any_5xx && (500..600).contains(&status)) || self.statuses.contains(&status)
    }

    /// Whether a trailers-only gRPC response with this code is retried.
    pub fn grpc_code(&self, code: u32) -> bool {
        code < 32 && self.grpc & (1 << code) != 0
    }

    /// The conditions, as `retry.on` names them.
    pub fn names(&self) -> Vec<String> {
        let mut out = Vec::new();
        let flags = [
            (self.connect_failure, "connect-failure"),
            (self.reset, "reset"),
            (self.try_timeout, "try-timeout"),
            (self.any_5xx, "5xx"),
        ];
        out.extend(flags.iter().filter(|f| f.0).map(|f| f.1.to_string()));
        out.extend(self.statuses.iter().map(u16::to_string));
        out.extend(GRPC_CODES.iter().filter(|(_, c)| self.grpc & (1 << c) != 0).map(|(n, _)| n.to_string()));
        out
    }
}

/// A route's compiled retry policy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// Tries in all, the first included (1: no retry; default 2).
    pub attempts: u32,
    /// Which failures are retried.
    pub on: RetryOn,
    /// Backoff before the first retry, jittered (default 25ms).
    pub backoff: Duration,
    /// Largest backoff; each retry doubles the last (default 250ms).
    pub max_backoff: Duration,
    /// Whether methods that are not idempotent (POST, PATCH) are retried too.
    pub non_idempotent: bool,
    /// Largest request body kept to send again (default 64 KiB); a
    /// request with a larger body is not retried.
    pub max_body_bytes: u64,
    /// Retries in the last 10 s may be at most this percent of the requests
    /// in that time (default 20), per calling sidecar and called service ...
    pub budget_percent: u32,
    /// ... plus this many a second (default 10).
    pub budget_min_per_second: u32,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            attempts: 2,
            on: RetryOn::default(),
            backoff: Duration::from_millis(25),
            max_backoff: Duration::from_millis(250),
            non_idempotent: false,
            max_body_bytes: 64 << 10,
            budget_percent: 20,
            budget_min_per_second: 10,
        }
    }
}

/// A route's compiled timeouts and retries (the default when no route applies).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resilience {
    /// The whole call, retries included (`None`: the sidecar's `--response-timeout`).
    pub timeout: Option<Duration>,
    /// One try (`None`: only the whole call's).
    pub per_try_timeout: Option<Duration>,
    /// The retry policy ([`Retry::default`] when the route sets none).
    pub retry: Retry,
}

/// Compiled `balancing.ejection`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ejection {
    /// Failures in a row that eject an endpoint (default 5; 0: never by
    /// failures in a row).
    pub consecutive_failures: u32,
    /// Requests an endpoint must have had in the last 10 s before its
    /// success rate is compared with its peers' (default 20; 0: never by
    /// success rate).
    pub success_rate_min_requests: u32,
    /// First ejection's length (default 10s); each ejection in a row doubles it.
    pub base_time: Duration,
    /// Longest ejection (default 5m).
    pub max_time: Duration,
    /// Most of a service's endpoints ejected at once, in percent (default 50).
    pub max_percent: u32,
}

impl Default for Ejection {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            success_rate_min_requests: 20,
            base_time: Duration::from_secs(10),
            max_time: Duration::from_secs(300),
            max_percent: 50,
        }
    }
}

/// Compiled `balancing` (the default when no TrafficPolicy of the caller has one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Balancing {
    /// How long a new endpoint takes to get its full share (default 10s;
    /// zero: at once).
    pub warmup: Duration,
    /// When an endpoint is taken out of balancing.
    pub ejection: Ejection,
}

impl Default for Balancing {
    fn default() -> Self {
        Self { warmup: Duration::from_secs(10), ejection: Ejection::default() }
    }
}

/// Whether `method` is idempotent (RFC 9110, 9.2.2): `GET`, `HEAD`,
/// `OPTIONS`, `TRACE`, `PUT`, `DELETE`. Only these are retried unless a
/// route's `retry.nonIdempotent` says so.
pub fn idempotent(method: &str) -> bool {
    matches!(method, "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE")
}

/// A duration field already validated (a value that does not parse is the default).
fn or_default(v: Option<&String>, default: Duration) -> Duration {
    v.and_then(|s| humantime::parse_duration(s).ok()).unwrap_or(default)
}

impl Retry {
    /// Compiles a route's `retry` (validated first), every default filled
    /// in. A `backoff` above the default `maxBackoff` raises it to `backoff`.
    pub fn compile(spec: &RetrySpec) -> Self {
        let d = Self::default();
        let backoff = or_default(spec.backoff.as_ref(), d.backoff);
        let budget = spec.budget.clone().unwrap_or_default();
        Self {
            attempts: spec.attempts.unwrap_or(d.attempts).clamp(1, 5),
            on: RetryOn::parse(spec.on.as_deref().unwrap_or_default()).unwrap_or_default(),
            backoff,
            max_backoff: or_default(spec.max_backoff.as_ref(), d.max_backoff.max(backoff)),
            non_idempotent: spec.non_idempotent,
            max_body_bytes: spec.max_body_bytes.unwrap_or(d.max_body_bytes),
            budget_percent: budget.percent.unwrap_or(d.budget_percent),
            budget_min_per_second: budget.min_per_second.unwrap_or(d.budget_min_per_second),
        }
    }

    /// Whether a request with this method (upper case) may be retried at
    /// all: more than one attempt, and an idempotent method or
    /// `nonIdempotent`. (Its body size and the budget are decided per request.)
    pub fn retries_method(&self, method: &str) -> bool {
        self.attempts > 1 && (self.non_idempotent || idempotent(method))
    }
}

impl Resilience {
    /// Compiles a route's `timeout`, `perTryTimeout` and `retry`
    /// (validated first); no `retry` is [`Retry::default`].
    pub fn compile(timeout: Option<&String>, per_try_timeout: Option<&String>, retry: Option<&RetrySpec>) -> Self {
        let parse = |v: Option<&String>| v.and_then(|s| humantime::parse_duration(s).ok());
        Self {
            timeout: parse(timeout),
            per_try_timeout: parse(per_try_timeout),
            retry: retry.map(Retry::compile).unwrap_or_default(),
        }
    }
}

impl Balancing {
    /// Compiles `balancing` (validated first), every default filled in. A
    /// `baseTime` above the default `maxTime` raises it to `baseTime`.
    pub fn compile(spec: &BalancingSpec) -> Self {
        let d = Self::default();
        let e = spec.ejection.clone().unwrap_or_default();
        let base_time = or_default(e.base_time.as_ref(), d.ejection.base_time);
        Self {
            warmup: or_default(spec.warmup.as_ref(), d.warmup),
            ejection: Ejection {
                consecutive_failures: e.consecutive_failures.unwrap_or(d.ejection.consecutive_failures),
                success_rate_min_requests: e.success_rate_min_requests.unwrap_or(d.ejection.success_rate_min_requests),
                base_time,
                max_time: or_default(e.max_time.as_ref(), d.ejection.max_time.max(base_time)),
                max_percent: e.max_percent.unwrap_or(d.ejection.max_percent),
            },
        }
    }
}
