//! How `palisadectl check --kubernetes` reads the cluster: one `kubectl get`,
//! and when that fails, one line that says why (not kubectl's own retries,
//! eight lines of them when nothing answers).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow};
use serde_json::Value;

/// What `check --kubernetes` reads: one `kubectl get` of every object it
/// looks at, as JSON (a `List`).
pub(crate) const KUBECTL_GET: &[&str] =
    &["get", "deployments,pods,configmaps,mutatingwebhookconfigurations", "--all-namespaces", "-o", "json"];

/// Reads the cluster state with kubectl, or from a file holding the output of
/// `kubectl get deployments,pods,configmaps,mutatingwebhookconfigurations -A -o json`.
pub(crate) fn cluster_state(kubectl: &str, file: Option<&Path>) -> Result<Value> {
    let text = match file {
        Some(f) => crate::kube::read_input(f)?,
        None => {
            let out = std::process::Command::new(kubectl).args(KUBECTL_GET).output().map_err(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    anyhow!(
                        "{kubectl} is not installed (not found{}): install kubectl, give --kubectl PATH, or \
                         --kubernetes-state FILE with the output of `kubectl {}` saved where a cluster is reachable",
                        if kubectl.contains('/') { "" } else { " on PATH" },
                        KUBECTL_GET.join(" ")
                    )
                } else {
                    anyhow!("cannot run {kubectl}: {e}")
                }
            })?;
            if !out.status.success() {
                let reason = one_line_reason(&String::from_utf8_lossy(&out.stderr));
                let (kubeconfig, context) = (kubeconfig(), current_context(kubectl));
                return Err(anyhow!("{} (kubeconfig {kubeconfig}, context {context})", unreachable(&reason)));
            }
            String::from_utf8(out.stdout).context("kubectl printed something that is not UTF-8")?
        }
    };
    serde_json::from_str(&text).context("the cluster state is not kubectl's JSON (-o json)")
}

/// The sentence for kubectl's failure: "no cluster is reachable" when it
/// could not connect, what kubectl said otherwise.
fn unreachable(reason: &str) -> String {
    let unreachable = ["refused", "unable to connect", "no such host", "timeout", "timed out", "no route to host"];
    let lower = reason.to_ascii_lowercase();
    if unreachable.iter().any(|u| lower.contains(u)) {
        format!("no Kubernetes cluster is reachable: {reason}")
    } else {
        format!("kubectl cannot read the cluster: {reason}")
    }
}

/// kubectl's own summary line of its error output: the last line that is
/// not one of its klog lines (`E1207 05:23:59.9 7278 file.go:265] ...`),
/// without its advice; else the error of the last klog line.
fn one_line_reason(stderr: &str) -> String {
    let lines: Vec<&str> = stderr.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    let klog = |l: &str| {
        let b = l.as_bytes();
        b.len() > 5 && b"EWIF".contains(&b[0]) && b[1..5].iter().all(u8::is_ascii_digit) && l.contains("] ")
    };
    if let Some(summary) = lines.iter().rev().find(|l| !klog(l)) {
        let summary = summary.split(" - did you specify").next().unwrap_or(summary);
        return summary.trim_start_matches("error: ").to_string();
    }
    let Some(last) = lines.last() else { return "kubectl failed and printed nothing".into() };
    let msg = last.split_once("] ").map(|(_, m)| m).unwrap_or(last);
    // `"Unhandled Error" err="couldn't get ...: connect: connection refused"`
    match msg.split_once("err=\"") {
        Some((_, err)) => err.trim_end_matches('"').replace("\\\"", "\""),
        None => msg.to_string(),
    }
}

/// The kubeconfig kubectl reads: `$KUBECONFIG`, else `~/.kube/config`.
fn kubeconfig() -> String {
    match std::env::var("KUBECONFIG") {
        Ok(k) if !k.is_empty() => k,
        _ => {
            let home = std::env::var_os("HOME").map(PathBuf::from).unwrap_or_default();
            let file = home.join(".kube/config");
            if file.exists() {
                file.display().to_string()
            } else {
                format!("none: no $KUBECONFIG and no {}", file.display())
            }
        }
    }
}

/// `kubectl config current-context` (read from the kubeconfig, no cluster needed).
fn current_context(kubectl: &str) -> String {
    std::process::Command::new(kubectl)
        .args(["config", "current-context"])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|c| !c.is_empty())
        .unwrap_or_else(|| "none".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    const REFUSED: &str = r#"E1207 05:23:59.900780    7278 memcache.go:265] "Unhandled Error" err="couldn't get current server API group list: Get \"https://127.0.0.1:1/api?timeout=32s\": dial tcp 127.0.0.1:1: connect: connection refused"
E1207 05:23:59.902304    7278 memcache.go:265] "Unhandled Error" err="couldn't get current server API group list: Get \"https://127.0.0.1:1/api?timeout=32s\": dial tcp 127.0.0.1:1: connect: connection refused"
The connection to the server 127.0.0.1:1 was refused - did you specify the right host or port?
"#;

    #[test]
    fn kubectls_retries_become_one_line() {
        let reason = one_line_reason(REFUSED);
        assert_eq!(reason, "The connection to the server 127.0.0.1:1 was refused");
        assert_eq!(
            unreachable(&reason),
            "no Kubernetes cluster is reachable: The connection to the server 127.0.0.1:1 was refused"
        );
        let klog_only = REFUSED.lines().next().unwrap();
        assert_eq!(
            one_line_reason(klog_only),
            "couldn't get current server API group list: Get \"https://127.0.0.1:1/api?timeout=32s\": dial tcp 127.0.0.1:1: connect: connection refused"
        );
        let forbidden = "Error from server (Forbidden): pods is forbidden: User \"x\" cannot list resource \"pods\"\n";
        assert!(
            unreachable(&one_line_reason(forbidden))
                .starts_with("kubectl cannot read the cluster: Error from server (Forbidden)")
        );
        assert_eq!(
            one_line_reason("error: You must be logged in to the server (Unauthorized)\n"),
            "You must be logged in to the server (Unauthorized)"
        );
        assert_eq!(one_line_reason(""), "kubectl failed and printed nothing");
    }
}
