//! `palisadectl route`: which TrafficPolicy route a caller's sidecar sends
//! a request by, where it goes, and the timeouts, retries and balancing it
//! gets there (the control plane's `SimulateRoute`).

use anyhow::Result;
use palisade_cmd::outln;
use palisade_proto::v1::{RouteBalancing, RouteResilience, SimulateRouteRequest};

use crate::client::{admin, status_err};
use crate::policy::pairs;
use crate::show::print_value;
use crate::{Online, Output};

/// `route`: which TrafficPolicy route the caller's sidecar takes.
pub(crate) async fn route(
    cli: &Online,
    from: &str,
    to: &str,
    method: &str,
    path: &str,
    headers: &[String],
) -> Result<()> {
    let hmap = pairs(headers, "header")?.into_iter().map(|(k, v)| (k.to_ascii_lowercase(), v)).collect();
    let resp = admin(cli)
        .await?
        .simulate_route(SimulateRouteRequest {
            source: from.to_string(),
            service: to.to_string(),
            method: method.to_string(),
            path: path.to_string(),
            headers: hmap,
        })
        .await
        .map_err(status_err)?
        .into_inner();
    let backends: Vec<serde_json::Value> =
        resp.backends.iter().map(|b| serde_json::json!({"service": b.service, "weight": b.weight})).collect();
    let res = resp.resilience.clone().unwrap_or_default();
    let bal = resp.balancing.clone().unwrap_or_default();
    let v = serde_json::json!({
        "policy": (!resp.policy.is_empty()).then_some(&resp.policy),
        "route": (resp.route >= 0).then_some(resp.route),
        "backends": backends,
        "path": resp.path,
        "reason": resp.reason,
        "timeout": (!res.timeout.is_empty()).then_some(&res.timeout),
        "perTryTimeout": (!res.per_try_timeout.is_empty()).then_some(&res.per_try_timeout),
        "retry": {
            "attempts": res.attempts,
            "on": res.retry_on,
            "backoff": res.backoff,
            "maxBackoff": res.max_backoff,
            "nonIdempotent": res.non_idempotent,
            "methodRetried": res.method_retried,
            "maxBodyBytes": res.max_body_bytes,
            "budget": {"percent": res.budget_percent, "minPerSecond": res.budget_min_per_second},
        },
        "balancing": {
            "policy": (!bal.policy.is_empty()).then_some(&bal.policy),
            "warmup": bal.warmup,
            "ejection": {
                "consecutiveFailures": bal.consecutive_failures,
                "successRateMinRequests": bal.success_rate_min_requests,
                "baseTime": bal.base_time,
                "maxTime": bal.max_time,
                "maxPercent": bal.max_percent,
            },
        },
    });
    if cli.output != Output::Table {
        return print_value(cli.output, &v);
    }
    outln!("policy:      {}", if resp.policy.is_empty() { "-" } else { &resp.policy });
    outln!("route:       {}", if resp.route >= 0 { resp.route.to_string() } else { "-".into() });
    for b in &resp.backends {
        outln!("backend:     {} (weight {})", b.service, b.weight);
    }
    outln!("path:        {}", resp.path);
    outln!("reason:      {}", resp.reason);
    for line in resilience_lines(method, &res, &bal) {
        outln!("{line}");
    }
    Ok(())
}

/// The timeouts, retries and balancing of `route`, as text lines.
fn resilience_lines(method: &str, res: &RouteResilience, bal: &RouteBalancing) -> Vec<String> {
    let mut out = Vec::new();
    out.push(match res.timeout.as_str() {
        "" => "timeout:     the sidecar's --response-timeout (default 30s)".to_string(),
        t => format!("timeout:     {t} (the whole call, retries included)"),
    });
    out.push(match res.per_try_timeout.as_str() {
        "" => "per try:     none (only the whole call's)".to_string(),
        t => format!("per try:     {t}"),
    });
    if res.attempts <= 1 {
        out.push("retries:     none (attempts: 1)".into());
    } else {
        out.push(format!(
            "retries:     {} attempts in all on {}; backoff {} doubling to {}",
            res.attempts,
            res.retry_on.join(", "),
            res.backoff,
            res.max_backoff
        ));
        let why = if res.non_idempotent {
            "nonIdempotent: every method".to_string()
        } else if res.method_retried {
            "idempotent".to_string()
        } else {
            "not idempotent; retry.nonIdempotent: true retries it".to_string()
        };
        let verdict = if res.method_retried { "may be retried" } else { "is not retried" };
        out.push(format!("method:      {method} {verdict} ({why})"));
        out.push(format!(
            "bodies:      up to {} bytes kept to send again; a larger one is not retried",
            res.max_body_bytes
        ));
        out.push(format!(
            "budget:      retries in the last 10s at most {}% of the requests + {}/s (this caller's sidecar, this service)",
            res.budget_percent, res.budget_min_per_second
        ));
    }
    let from = if bal.policy.is_empty() { "defaults".to_string() } else { format!("TrafficPolicy {}", bal.policy) };
    out.push(format!("balancing:   warmup {} ({from})", bal.warmup));
    let mut eject = Vec::new();
    if bal.consecutive_failures > 0 {
        eject.push(format!("after {} failures in a row", bal.consecutive_failures));
    }
    if bal.success_rate_min_requests > 0 {
        eject.push(format!("by success rate (from {} requests in 10s)", bal.success_rate_min_requests));
    }
    out.push(if eject.is_empty() {
        "ejection:    never".to_string()
    } else {
        format!(
            "ejection:    {}; for {} doubling to {}, at most {}% of endpoints",
            eject.join(" or "),
            bal.base_time,
            bal.max_time,
            bal.max_percent
        )
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_says_which_timeout_and_whether_the_method_is_retried() {
        let res = RouteResilience {
            attempts: 2,
            retry_on: vec!["reset".into(), "503".into()],
            backoff: "25ms".into(),
            max_backoff: "250ms".into(),
            max_body_bytes: 65536,
            budget_percent: 20,
            budget_min_per_second: 10,
            ..Default::default()
        };
        let bal = RouteBalancing {
            warmup: "10s".into(),
            consecutive_failures: 5,
            base_time: "10s".into(),
            max_time: "5m".into(),
            max_percent: 50,
            ..Default::default()
        };
        let text = resilience_lines("POST", &res, &bal).join("\n");
        assert!(text.contains("the sidecar's --response-timeout (default 30s)"), "{text}");
        assert!(text.contains("2 attempts in all on reset, 503"), "{text}");
        assert!(text.contains("POST is not retried (not idempotent"), "{text}");
        assert!(text.contains("at most 20% of the requests + 10/s"), "{text}");
        assert!(text.contains("warmup 10s (defaults)") && text.contains("after 5 failures in a row;"), "{text}");
        let res = RouteResilience { timeout: "2s".into(), method_retried: true, ..res };
        let bal = RouteBalancing { policy: "shop/b".into(), consecutive_failures: 0, ..bal };
        let text = resilience_lines("GET", &res, &bal).join("\n");
        assert!(text.contains("timeout:     2s") && text.contains("GET may be retried (idempotent)"), "{text}");
        assert!(text.contains("(TrafficPolicy shop/b)") && text.contains("ejection:    never"), "{text}");
        let once = RouteResilience { attempts: 1, ..res };
        assert!(resilience_lines("GET", &once, &bal).join("\n").contains("retries:     none"));
    }
}
