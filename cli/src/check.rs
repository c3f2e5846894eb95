//! `palisadectl check`: is the control plane reachable and healthy, the CA
//! and the admin credential valid (and, with `--kubernetes`, the install).

use std::time::{Duration, SystemTime};

use anyhow::{Result, bail};
use palisade_certs::svid::rfc3339;
use palisade_cmd::outln;
use palisade_proto::v1::GetStatusRequest;
use palisade_proto::v1::admin_client::AdminClient;

use crate::client::{connect, load_credentials, status_err};
use crate::show::{print_value, relative, short, time_str, ts};
use crate::{Online, Output, kube};

/// `check`, retried while `--wait` allows, until every check passes.
pub(crate) async fn run(
    cli: &Online,
    wait: Option<Duration>,
    cluster: Option<(&str, Option<&std::path::Path>)>,
) -> Result<()> {
    let deadline = wait.map(|w| std::time::Instant::now() + w);
    loop {
        let mut results = checks(cli).await;
        if let Some((kubectl, file)) = cluster {
            for r in results.iter_mut().filter(|r| r.0 == "control plane reachable" && !r.1) {
                r.2.push_str(
                    "; in a cluster, reach it with `kubectl -n palisade-system port-forward svc/palisade-control-plane \
                     7700:7700` and --control-plane https://127.0.0.1:7700",
                );
            }
            match crate::kubectl::cluster_state(kubectl, file) {
                Ok(state) => {
                    let bundle = cli.credentials.as_ref().and_then(|d| std::fs::read_to_string(d.join("ca.pem")).ok());
                    results.extend(kube::cluster_findings(&state, bundle.as_deref()));
                }
                Err(e) => results.push(("kubernetes".into(), false, format!("{e:#}"))),
            }
        }
        let all_ok = results.iter().all(|r| r.1);
        if all_ok || deadline.is_none_or(|d| std::time::Instant::now() >= d) {
            return report_checks(cli, &results);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn report_checks(cli: &Online, results: &[(String, bool, String)]) -> Result<()> {
    let all_ok = results.iter().all(|r| r.1);
    if cli.output != Output::Table {
        let v: Vec<_> =
            results.iter().map(|(n, ok, d)| serde_json::json!({"check": n, "ok": ok, "detail": d})).collect();
        print_value(cli.output, &serde_json::to_value(serde_json::json!({"ok": all_ok, "checks": v}))?)?;
    } else {
        for (name, ok, detail) in results {
            outln!("{} {name}: {detail}", if *ok { "[ok]  " } else { "[FAIL]" });
        }
    }
    if !all_ok {
        bail!("some checks failed");
    }
    Ok(())
}

async fn checks(cli: &Online) -> Vec<(String, bool, String)> {
    let mut results: Vec<(String, bool, String)> = Vec::new();
    let creds = load_credentials(cli);
    match &creds {
        Ok(c) => {
            let left = c.svid.info.time_left(SystemTime::now());
            results.push((
                "admin credential".into(),
                !left.is_zero(),
                format!(
                    "{} expires {} ({})",
                    c.svid.id,
                    rfc3339::format(c.svid.info.not_after),
                    relative(Some(c.svid.info.not_after))
                ),
            ));
        }
        Err(e) => results.push(("admin credential".into(), false, format!("{e:#}"))),
    }
    if let Ok(creds) = &creds {
        match connect(cli, creds).await {
            Err(e) => results.push(("control plane reachable".into(), false, format!("{e:#}"))),
            Ok(ch) => {
                results.push((
                    "control plane reachable".into(),
                    true,
                    format!(
                        "{} (identity verified: {})",
                        cli.control_plane,
                        creds.svid.id.trust_domain().control_plane()
                    ),
                ));
                let health = tonic_health::pb::health_client::HealthClient::new(ch.clone())
                    .check(tonic_health::pb::HealthCheckRequest { service: String::new() })
                    .await;
                match health {
                    Ok(r) => {
                        let serving = r.into_inner().status
                            == tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
                        results.push((
                            "control plane healthy".into(),
                            serving,
                            if serving { "SERVING".into() } else { "NOT SERVING".into() },
                        ));
                    }
                    Err(s) => results.push(("control plane healthy".into(), false, status_err(s).to_string())),
                }
                match AdminClient::new(ch).get_status(GetStatusRequest {}).await {
                    Ok(r) => {
                        let s = r.into_inner();
                        let ca_after = ts(&s.ca_not_after);
                        let ok = ca_after.is_some_and(|t| t > SystemTime::now() + Duration::from_secs(86400));
                        results.push((
                            "CA valid".into(),
                            ok,
                            format!(
                                "{} in trust domain {} expires {} ({}); workload cert TTL {}",
                                s.ca_subject,
                                s.trust_domain,
                                time_str(ca_after),
                                relative(ca_after),
                                short(Duration::from_secs(s.cert_ttl_seconds))
                            ),
                        ));
                        results.push(("admin API authorized".into(), true, format!("as {}", s.caller_identity)));
                    }
                    Err(s) => results.push(("admin API authorized".into(), false, status_err(s).to_string())),
                }
            }
        }
    }
    results
}
