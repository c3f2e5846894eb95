//! `palisadectl ca rotate` and `palisadectl ca status`: live root CA rotation.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use palisade_proto::v1::*;

use crate::client::{admin, status_err};
use crate::show::{print_value, time_str, ts};
use crate::{Online, Output};
use palisade_cmd::outln;

#[derive(Debug, clap::Subcommand)]
pub(crate) enum CaCmd {
    /// Rotate the mesh's root CA live: publish a new root beside the old one in
    /// every trust bundle, wait for every connected proxy to ACK it, re-issue
    /// every workload certificate from the new root, wait for all to renew,
    /// then retire the old root. Waits until done (or --no-wait).
    Rotate {
        /// Generate the new root (ECDSA P-256, the trust domain and validity of the old one).
        #[arg(long, required_unless_present_any = ["abort", "new_root"], conflicts_with_all = ["abort", "new_root"])]
        generate: bool,
        /// Rotate to your own root instead: a self-signed CA certificate (PEM) of
        /// this trust domain, valid for at least 30 days more; with --new-root-key.
        #[arg(long, requires = "new_root_key", conflicts_with = "abort")]
        new_root: Option<std::path::PathBuf>,
        /// The new root's private key (PEM; readable by you alone). It is sent to
        /// the control plane over the admin connection and kept in its store.
        #[arg(long, requires = "new_root")]
        new_root_key: Option<std::path::PathBuf>,
        /// Abort the rotation in progress (only before the old root is retired):
        /// certificates already from the new root are renewed back first.
        #[arg(long)]
        abort: bool,
        /// Hold each step at least this long (e.g. 5m), for clients outside the
        /// mesh that read the trust bundle to pick the new root up.
        #[arg(long, default_value = "0s", value_parser = palisade_cmd::duration_arg)]
        min_phase: Duration,
        /// Return once the rotation has started; follow it with `palisadectl ca status`.
        #[arg(long)]
        no_wait: bool,
        /// Give up waiting after this long (the rotation itself goes on).
        #[arg(long, default_value = "10m", value_parser = palisade_cmd::duration_arg)]
        timeout: Duration,
    },
    /// Where a root rotation stands: the phase, the roots, the proxies it waits for.
    Status,
}

pub(crate) async fn run(cli: &Online, cmd: &CaCmd) -> Result<()> {
    match cmd {
        CaCmd::Status => {
            let s = admin(cli).await?.get_ca_status(GetCaStatusRequest {}).await.map_err(status_err)?.into_inner();
            print(cli.output, &s)
        }
        CaCmd::Rotate { generate, abort, min_phase, no_wait, timeout, new_root, new_root_key } => {
            let mut req = RotateCaRequest {
                generate: *generate,
                abort: *abort,
                min_phase_seconds: min_phase.as_secs(),
                ..Default::default()
            };
            if let (Some(cert), Some(key)) = (new_root, new_root_key) {
                use std::os::unix::fs::PermissionsExt;
                let mode = std::fs::metadata(key)
                    .with_context(|| format!("--new-root-key {}", key.display()))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    bail!(
                        "--new-root-key {}: mode {:o}; a private key must be readable by you alone (chmod 600)",
                        key.display(),
                        mode & 0o777
                    );
                }
                req.new_root_cert_pem =
                    std::fs::read_to_string(cert).with_context(|| format!("--new-root {}", cert.display()))?;
                req.new_root_key_pem =
                    std::fs::read_to_string(key).with_context(|| format!("--new-root-key {}", key.display()))?;
            }
            let s = admin(cli).await?.rotate_ca(req).await.map_err(status_err)?.into_inner();
            if *no_wait {
                if !*abort {
                    eprintln!(
                        "note: with --no-wait this credential stays on the old root and stops working at done; watch with `palisadectl ca rotate` (it moves its credential) or use the control plane's DIR/admin"
                    );
                }
                return print(cli.output, &s);
            }
            let target = if *abort { Phase::Aborted } else { Phase::Done };
            if cli.output == Output::Table {
                eprintln!("{}: {}", s.phase, s.detail);
            }
            // This credential follows the root that signs (while the bundles
            // hold both), so that it still works once the other is retired.
            let mut moved = None;
            if matches!(Phase::from(s.phase.as_str()), Phase::Reissuing | Phase::Aborting) {
                moved = recertify(cli, &s.phase, moved).await;
            }
            let (start, mut last) = (Instant::now(), s.phase.clone());
            // The proxies connected during the rotation: the last step ends
            // their streams (their certificates change root), and the final
            // status is shown once they are back, not mid-reconnect.
            let mut most = s.proxies;
            let mut ended_at: Option<Instant> = None;
            loop {
                tokio::time::sleep(Duration::from_millis(500)).await;
                // A new connection each time: every step rewrites the admin
                // credential, and the server's certificate changes root.
                let polled = match admin(cli).await {
                    Ok(mut a) => a.get_ca_status(GetCaStatusRequest {}).await.map_err(status_err),
                    Err(e) => Err(e),
                };
                match polled {
                    Ok(s) => {
                        let s = s.into_inner();
                        if s.phase != last && cli.output == Output::Table {
                            eprintln!("{}: {}", s.phase, s.detail);
                        }
                        last = s.phase.clone();
                        let phase = Phase::from(s.phase.as_str());
                        most = most.max(s.proxies);
                        if matches!(phase, Phase::Reissuing | Phase::Aborting) {
                            moved = recertify(cli, &s.phase, moved).await;
                        }
                        if phase == target {
                            keep_bundle(cli, &s.bundle_pem);
                            let ended = *ended_at.get_or_insert_with(Instant::now);
                            if s.proxies >= most || ended.elapsed() >= RECONNECT_GRACE {
                                return print(cli.output, &s);
                            }
                            continue;
                        }
                        if phase.ended() {
                            bail!("the rotation ended {} (another admin?)", s.phase);
                        }
                    }
                    Err(e) if start.elapsed() >= *timeout => return Err(e),
                    Err(_) => {}
                }
                if start.elapsed() >= *timeout {
                    bail!(
                        "the rotation is still {last} after {}; it goes on: follow it with `palisadectl ca status`",
                        humantime::format_duration(*timeout)
                    );
                }
            }
        }
    }
}

/// Re-certifies this palisadectl's admin credential under the root that
/// signs now (same key, same expiry; the control plane's own `DIR/admin` is
/// rewritten by it anyway), once per phase: `moved` is the phase it last
/// moved in. A failure is said, not fatal: the rotation goes on.
async fn recertify(cli: &Online, phase: &str, moved: Option<String>) -> Option<String> {
    if moved.as_deref() == Some(phase) {
        return moved;
    }
    match crate::client::recertify(cli).await {
        Ok(()) => {}
        Err(e) => eprintln!(
            "warning: could not move this credential to the root that signs ({e:#}); it stops working when the rotation ends"
        ),
    }
    Some(phase.to_string())
}

/// At the end, the credential trusts the roots of the bundle alone.
fn keep_bundle(cli: &Online, bundle_pem: &str) {
    if let Some(dir) = &cli.credentials
        && !bundle_pem.is_empty()
        && let Err(e) = palisade_certs::files::write_public(&dir.join("ca.pem"), bundle_pem)
    {
        eprintln!("warning: cannot write {}: {e}", dir.join("ca.pem").display());
    }
}

/// How long a finished rotation's status waits for the proxies connected
/// during it to be connected again.
const RECONNECT_GRACE: Duration = Duration::from_secs(10);

/// Where a root rotation stands. The wire carries a string
/// (`CaStatus.phase`); it is parsed once, here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Never rotated.
    None,
    /// The new root is in every bundle; waiting for every proxy to ACK it.
    Publishing,
    /// Certificates come from the new root; waiting for every proxy to renew.
    Reissuing,
    /// The old root is retired.
    Done,
    /// Going back to the old root.
    Aborting,
    /// Back on the old root.
    Aborted,
    /// A phase this CLI does not know (from a newer control plane).
    Other,
}

impl Phase {
    /// Whether the rotation is over, one way or the other.
    fn ended(self) -> bool {
        matches!(self, Self::Done | Self::Aborted)
    }
}

impl From<&str> for Phase {
    fn from(s: &str) -> Self {
        match s {
            "none" => Self::None,
            "publishing" => Self::Publishing,
            "reissuing" => Self::Reissuing,
            "done" => Self::Done,
            "aborting" => Self::Aborting,
            "aborted" => Self::Aborted,
            _ => Self::Other,
        }
    }
}

fn root_json(r: &Option<CaRoot>) -> serde_json::Value {
    match r {
        Some(r) => serde_json::json!({
            "subject": r.subject, "sha256": r.sha256, "not_after": time_str(ts(&r.not_after)),
        }),
        None => serde_json::Value::Null,
    }
}

fn print(output: Output, s: &CaStatus) -> Result<()> {
    if output != Output::Table {
        let v = serde_json::json!({
            "phase": s.phase,
            "detail": s.detail,
            "signing": root_json(&s.signing),
            "bundle": s.bundle.iter().map(|r| root_json(&Some(r.clone()))).collect::<Vec<_>>(),
            "old_root": root_json(&s.old_root),
            "new_root": root_json(&s.new_root),
            "started_at": s.started_at.as_ref().map(|_| time_str(ts(&s.started_at))),
            "phase_since": s.phase_since.as_ref().map(|_| time_str(ts(&s.phase_since))),
            "min_phase_seconds": s.min_phase_seconds,
            "proxies": s.proxies,
            "waiting": s.waiting,
            "waiting_for": s.waiting_for,
            "bundle_pem": s.bundle_pem,
        });
        return print_value(output, &v);
    }
    let short = |r: &CaRoot| {
        format!("{} (sha256 {}…, until {})", r.subject, &r.sha256[..16.min(r.sha256.len())], time_str(ts(&r.not_after)))
    };
    outln!("phase:      {}", s.phase);
    if !s.detail.is_empty() {
        outln!("detail:     {}", s.detail);
    }
    if let Some(r) = &s.signing {
        outln!("signing:    {}", short(r));
    }
    for (i, r) in s.bundle.iter().enumerate() {
        outln!("{}{}", if i == 0 { "bundle:     " } else { "            " }, short(r));
    }
    if s.old_root.is_some() {
        outln!("started:    {}", time_str(ts(&s.started_at)));
        outln!("since:      {}", time_str(ts(&s.phase_since)));
    }
    outln!("proxies:    {} connected, {} waited for", s.proxies, s.waiting);
    for p in &s.waiting_for {
        outln!("            {p}");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Phase;

    #[test]
    fn a_rotation_ends_done_or_aborted() {
        let phases = [
            ("none", Phase::None, false),
            ("publishing", Phase::Publishing, false),
            ("reissuing", Phase::Reissuing, false),
            ("done", Phase::Done, true),
            ("aborting", Phase::Aborting, false),
            ("aborted", Phase::Aborted, true),
            ("paused", Phase::Other, false),
        ];
        for (wire, phase, ended) in phases {
            assert_eq!(Phase::from(wire), phase, "{wire}");
            assert_eq!(phase.ended(), ended, "{wire}");
        }
    }
}
