//! `palisadectl tap`, `palisadectl stat` and the policy preview's output.

use anyhow::{Result, bail};
use palisade_proto::v1::admin_client::AdminClient;
use palisade_proto::v1::*;
use tonic::transport::Channel;

use crate::client::{admin, status_err};
use crate::show::print_value;
use crate::{Online, Output, table};
use palisade_cmd::{out, outln};

/// What `tap` selects.
#[derive(Debug, clap::Args)]
pub(crate) struct TapArgs {
    /// Callee SPIFFE ID or glob: whose sidecars report (default: every workload's).
    #[arg(long)]
    to: Option<String>,
    /// Caller SPIFFE ID or glob.
    #[arg(long)]
    from: Option<String>,
    /// Path glob, e.g. '/api/*'.
    #[arg(long)]
    path: Option<String>,
    /// allow, deny (every refusal), or one of unauthenticated, rate_limited, invalid, error, unavailable.
    #[arg(long, value_parser = ["allow", "deny", "unauthenticated", "rate_limited", "invalid", "error", "unavailable"])]
    decision: Option<String>,
    /// Stop after N requests (default: until interrupted).
    #[arg(long)]
    max: Option<u64>,
}

/// Streams requests as the callees' sidecars see them, until interrupted or `--max`.
pub(crate) async fn tap(cli: &Online, args: &TapArgs) -> Result<()> {
    let req = TapRequest {
        to: args.to.clone().unwrap_or_default(),
        from: args.from.clone().unwrap_or_default(),
        path: args.path.clone().unwrap_or_default(),
        decision: args.decision.clone().unwrap_or_default(),
        max: args.max.unwrap_or(0),
    };
    let mut stream = admin(cli).await?.tap(req).await.map_err(status_err)?.into_inner();
    if cli.output == Output::Table {
        eprintln!("tapping; Ctrl-C to stop");
    }
    let mut dropped = 0;
    let mut seen = 0u64;
    while let Some(ev) = stream.message().await.map_err(status_err)? {
        if ev.dropped > dropped {
            eprintln!(
                "({} not shown: over 100 a second per sidecar, or arriving faster than read)",
                palisade_cmd::plural(ev.dropped - dropped, "request", "requests")
            );
            dropped = ev.dropped;
        }
        if ev.json.is_empty() {
            continue;
        }
        seen += 1;
        if cli.output == Output::Json {
            outln!("{}", ev.json);
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(&ev.json).unwrap_or_default();
        if cli.output == Output::Yaml {
            // One YAML document per request, as the JSON form has one line each.
            out!("---\n{}", serde_saphyr::to_string(&v)?);
            continue;
        }
        let s = |k: &str| v[k].as_str().unwrap_or("-").to_string();
        let status = v["status"].as_u64().map(|s| s.to_string()).unwrap_or_else(|| "-".into());
        let rule = match (v["policy"].as_str(), v["rule"].as_u64()) {
            (Some(p), Some(r)) => format!(" {p} rule {r}"),
            (Some(p), None) => format!(" {p}"),
            _ => String::new(),
        };
        // A retry of its caller's (the callee's sidecar logs only the second try on).
        let attempt = v["attempt"].as_u64().map(|n| format!(" (try {n})")).unwrap_or_default();
        outln!(
            "{} {} -> {} {} {} {} {}{} {}ms{}",
            s("time"),
            v["caller"].as_str().unwrap_or("(plaintext)"),
            s("callee"),
            s("method"),
            s("path"),
            status,
            s("decision"),
            rule,
            v["duration_ms"].as_f64().unwrap_or(0.0),
            attempt
        );
    }
    if args.max.is_some_and(|m| seen < m) {
        bail!(
            "the tap ended after {} (the control plane ends a tap after an hour)",
            palisade_cmd::plural(seen, "request", "requests")
        );
    }
    Ok(())
}

/// Per-workload traffic; with `wait`, once every sidecar counted has sent a
/// report newer than the command (so requests sent before it are counted).
pub(crate) async fn stat(
    cli: &Online,
    identity: Option<&str>,
    window: std::time::Duration,
    wait: Option<std::time::Duration>,
    endpoints: bool,
) -> Result<()> {
    let identity = identity.unwrap_or_default();
    let window_seconds = u32::try_from(window.as_secs()).unwrap_or(u32::MAX);
    let mut client = admin(cli).await?;
    if let Some(wait) = wait {
        wait_for_reports(&mut client, identity, window_seconds, wait).await?;
    }
    let req = StatRequest { identity: identity.to_string(), window_seconds, ..Default::default() };
    let workloads = client.stat(req).await.map_err(status_err)?.into_inner().workloads;
    if cli.output != Output::Table {
        let v: Vec<_> = workloads
            .iter()
            .map(|w| {
                serde_json::json!({
                    "identity": w.identity,
                    "proxies": w.proxies,
                    "requests": w.requests,
                    "rps": w.rps,
                    "success_rate": w.success_rate,
                    "refused_rate": w.refused_rate,
                    "p50_ms": w.p50_ms,
                    "p95_ms": w.p95_ms,
                    "p99_ms": w.p99_ms,
                    "window_seconds": w.window_seconds,
                    "callers": w.callers.iter().map(caller_json).collect::<Vec<_>>(),
                })
            })
            .collect();
        return print_value(cli.output, &serde_json::Value::Array(v));
    }
    let pct = |r: f64| format!("{:.2}%", r * 100.0);
    let rate = |r: f64| format!("{r:.1}/s");
    let ms = |m: f64| if m == 0.0 { "-".to_string() } else { format!("{m:.1}ms") };
    let rows = workloads
        .iter()
        .map(|w| {
            vec![
                w.identity.clone(),
                w.proxies.to_string(),
                w.requests.to_string(),
                rate(w.rps),
                pct(w.success_rate),
                pct(w.refused_rate),
                ms(w.p50_ms),
                ms(w.p95_ms),
                ms(w.p99_ms),
            ]
        })
        .collect();
    table::print(&["WORKLOAD", "PROXIES", "REQUESTS", "RATE", "SUCCESS", "REFUSED", "P50", "P95", "P99"], rows);
    if endpoints {
        out!("{}", endpoints_text(&workloads));
    }
    Ok(())
}

fn caller_json(c: &CallerView) -> serde_json::Value {
    let services: Vec<_> = c
        .services
        .iter()
        .map(|s| {
            let endpoints: Vec<_> = s
                .endpoints
                .iter()
                .map(|e| {
                    serde_json::json!({
                        "addr": e.addr, "identity": e.identity, "in_flight": e.in_flight,
                        "latency_ms": e.latency_ms, "ejected_for_ms": e.ejected_for_ms,
                        "ejections": e.ejections, "requests": e.requests, "failures": e.failures,
                    })
                })
                .collect();
            serde_json::json!({
                "service": s.service,
                "endpoints": endpoints,
                "endpoints_omitted": s.endpoints_omitted,
                "retries": s.retries,
                "retries_refused": s.retries_refused,
                "budget": { "left": s.budget_left, "requests": s.budget_requests, "retries": s.budget_retries },
            })
        })
        .collect();
    serde_json::json!({ "proxy": c.proxy, "age_seconds": c.age_seconds, "services": services })
}

/// `stat --endpoints`: per calling sidecar, an ENDPOINTS table and a
/// RETRIES line per service.
fn endpoints_text(workloads: &[WorkloadStat]) -> String {
    let mut out = String::new();
    for w in workloads {
        for c in &w.callers {
            out.push_str(&format!(
                "\nENDPOINTS of {} at {} (reported {:.0}s ago):\n",
                w.identity, c.proxy, c.age_seconds
            ));
            let rows = c
                .services
                .iter()
                .flat_map(|s| s.endpoints.iter().map(move |e| (s, e)))
                .map(|(s, e)| {
                    let state = match e.ejected_for_ms {
                        0 => "ok".to_string(),
                        ms => format!("ejected {}s", ms.div_ceil(1000)),
                    };
                    vec![
                        s.service.clone(),
                        e.addr.clone(),
                        e.latency_ms.map_or_else(|| "-".to_string(), |l| format!("{l:.1}ms")),
                        e.in_flight.to_string(),
                        e.requests.to_string(),
                        e.failures.to_string(),
                        state,
                        e.ejections.to_string(),
                    ]
                })
                .collect();
            out.push_str(&table::render(
                &["SERVICE", "ENDPOINT", "LATENCY", "IN-FLIGHT", "REQUESTS", "FAILURES", "STATE", "EJECTIONS"],
                rows,
            ));
            for s in &c.services {
                if s.endpoints_omitted > 0 {
                    out.push_str(&format!(
                        "({} of {} not reported: a report holds 256 endpoints)\n",
                        palisade_cmd::plural(u64::from(s.endpoints_omitted), "endpoint", "endpoints"),
                        s.service
                    ));
                }
                out.push_str(&format!(
                    "RETRIES {}: {} sent, {} refused by the budget, {} left in the budget\n",
                    s.service, s.retries, s.retries_refused, s.budget_left
                ));
            }
        }
    }
    if out.is_empty() {
        out.push_str("\nno sidecar of these workloads has called a mesh service since it started\n");
    }
    out
}

/// Waits until every sidecar `stat` counts (over `window_seconds`) has sent
/// a report since this was called. A stat over the whole seconds since then
/// counts only the sidecars whose last report is that recent: when it counts
/// as many per workload as the full window does, every report is fresh.
async fn wait_for_reports(
    client: &mut AdminClient<Channel>,
    identity: &str,
    window_seconds: u32,
    wait: std::time::Duration,
) -> Result<()> {
    let start = std::time::Instant::now();
    let mut stat = async |window_seconds: u32| {
        let req = StatRequest { identity: identity.to_string(), window_seconds, ..Default::default() };
        client.stat(req).await.map_err(status_err).map(|r| r.into_inner().workloads)
    };
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        let since = u32::try_from(start.elapsed().as_secs()).unwrap_or(u32::MAX).min(600);
        if since >= 1 {
            let (all, fresh) = (stat(window_seconds).await?, stat(since).await?);
            let reported = |w: &WorkloadStat| fresh.iter().any(|f| f.identity == w.identity && f.proxies >= w.proxies);
            if !all.is_empty() && all.iter().all(reported) {
                return Ok(());
            }
        }
        if start.elapsed() >= wait {
            bail!(
                "no report newer than this command from every sidecar of {} within {} (sidecars report every \
                 --report-interval, 10s by default)",
                if identity.is_empty() { "the mesh" } else { identity },
                humantime::format_duration(wait)
            );
        }
    }
}

/// Prints a preview; returns whether anything would change.
pub(crate) fn print_preview(output: Output, p: &PreviewPolicyResponse) -> Result<bool> {
    for w in &p.warnings {
        eprintln!("warning: {w}");
    }
    if output != Output::Table {
        let changes: Vec<_> = p
            .changes
            .iter()
            .map(|c| {
                serde_json::json!({
                    "from": c.from, "to": c.to, "method": c.method, "path": c.path,
                    "before": c.before, "after": c.after, "count": c.count,
                    "before_rule": c.before_rule, "after_rule": c.after_rule,
                })
            })
            .collect();
        let v = serde_json::json!({
            "changes": changes,
            "requests_evaluated": p.requests_evaluated,
            "window_seconds": p.window_seconds,
            "warnings": p.warnings,
        });
        print_value(output, &v)?;
        return Ok(!p.changes.is_empty());
    }
    out!("{}", preview_text(p));
    Ok(!p.changes.is_empty())
}

/// A preview as text.
pub(crate) fn preview_text(p: &PreviewPolicyResponse) -> String {
    let window = humantime::format_duration(std::time::Duration::from_secs(p.window_seconds));
    if p.changes.is_empty() {
        return format!(
            "no decision changes for the {} recorded in the last {window}\n",
            palisade_cmd::plural(p.requests_evaluated, "request", "requests")
        );
    }
    let flipped: u64 = p.changes.iter().map(|c| c.count).sum();
    let rows = p
        .changes
        .iter()
        .map(|c| {
            vec![
                if c.from.is_empty() { "(plaintext)".into() } else { c.from.clone() },
                c.to.clone(),
                c.method.clone(),
                c.path.clone(),
                format!("{} -> {}", c.before, c.after),
                c.count.to_string(),
                format!("{} -> {}", c.before_rule, c.after_rule),
            ]
        })
        .collect();
    format!(
        "{flipped} of {} recorded in the last {window} would be decided differently:\n{}",
        palisade_cmd::plural(p.requests_evaluated, "request", "requests"),
        table::render(&["FROM", "TO", "METHOD", "PATH", "CHANGE", "COUNT", "RULE"], rows)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_show_per_caller_with_their_state_and_retries() {
        let ep = |addr: &str, latency_ms, ejected_for_ms| CalledEndpoint {
            addr: addr.into(),
            identity: "spiffe://td/ns/shop/sa/orders".into(),
            in_flight: 2,
            latency_ms,
            ejected_for_ms,
            ejections: 1,
            requests: 40,
            failures: 5,
        };
        let w = WorkloadStat {
            identity: "spiffe://td/ns/shop/sa/web".into(),
            callers: vec![CallerView {
                proxy: "10.1.0.5:4143".into(),
                services: vec![CalledService {
                    service: "orders.shop".into(),
                    endpoints: vec![ep("10.0.0.1:4143", Some(12.34), 0), ep("10.0.0.2:4143", None, 7200)],
                    retries: 3,
                    retries_refused: 1,
                    budget_left: 9,
                    endpoints_omitted: 2,
                    ..Default::default()
                }],
                age_seconds: 4.2,
            }],
            ..Default::default()
        };
        let text = endpoints_text(std::slice::from_ref(&w));
        assert!(text.contains("ENDPOINTS of spiffe://td/ns/shop/sa/web at 10.1.0.5:4143 (reported 4s ago)"), "{text}");
        let row = |addr: &str| {
            text.lines().find(|l| l.contains(addr)).unwrap_or_default().split_whitespace().collect::<Vec<_>>()
        };
        assert_eq!(row("10.0.0.1:4143"), ["orders.shop", "10.0.0.1:4143", "12.3ms", "2", "40", "5", "ok", "1"]);
        assert_eq!(row("10.0.0.2:4143"), ["orders.shop", "10.0.0.2:4143", "-", "2", "40", "5", "ejected", "8s", "1"]);
        assert!(text.contains("RETRIES orders.shop: 3 sent, 1 refused by the budget, 9 left in the budget"), "{text}");
        assert!(text.contains("(2 endpoints of orders.shop not reported"), "{text}");
        let json = caller_json(&w.callers[0]);
        assert_eq!(json["services"][0]["endpoints"][1]["latency_ms"], serde_json::Value::Null);
        assert_eq!(json["services"][0]["budget"]["left"], 9);
        let none = WorkloadStat { callers: Vec::new(), ..w };
        assert!(endpoints_text(&[none]).contains("no sidecar of these workloads has called"));
    }
}
