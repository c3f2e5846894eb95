//! The leader's part of a root rotation: what the current step waits for,
//! moving it on when complete, and the status `palisadectl ca status` shows.

use std::sync::Arc;
use std::time::Duration;

use palisade_certs::SvidInfo;
use rustls_pki_types::CertificateDer;

use super::{Phase, RotateError, View, sha256_hex, signing_cert};
use crate::Shared;
use palisade_cmd::unix_now;

/// How often the leader checks whether the current step is complete.
const DRIVE_EVERY: Duration = Duration::from_millis(500);
/// Proxies listed by name in a status, at most.
const LIST_WAITING: usize = 20;

/// The proxies connected to any replica, by `<identity> <inbound address>`.
fn connected(shared: &Shared) -> Vec<(String, crate::push::SyncStatus)> {
    let mut connected: Vec<(String, crate::push::SyncStatus)> = {
        let all = shared.hub.status.lock().unwrap_or_else(|p| p.into_inner());
        all.iter().filter(|(_, s)| s.connected).map(|(k, s)| (k.clone(), s.clone())).collect()
    };
    connected.extend(crate::push::remote_statuses(shared));
    connected.sort_by(|a, b| a.0.cmp(&b.0));
    connected.dedup_by(|a, b| a.0 == b.0);
    connected
}

/// How many proxies are connected (with or without a rotation), the ones
/// the current step waits for, and what it waits for in words.
fn waiting(shared: &Shared, view: &View) -> (usize, Vec<String>, String) {
    let connected = connected(shared);
    let total = connected.len();
    let Some(r) = view.rotation.as_ref() else { return (total, vec![], String::new()) };
    let root_sha = |pem: &str| {
        palisade_certs::ca::parse_pem_certs(pem).ok().and_then(|c| c.first().map(|c| sha256_hex(c))).unwrap_or_default()
    };
    let (new_sha, old_sha) = (root_sha(&r.new_cert_pem), root_sha(&r.old_cert_pem));
    let (list, detail): (Vec<String>, String) = match r.phase {
        Phase::Publishing => (
            connected.into_iter().filter(|(_, s)| !s.acked_roots.contains(&new_sha)).map(|(k, _)| k).collect(),
            "waiting for every connected proxy to ACK a trust bundle with the new root".into(),
        ),
        Phase::Reissuing | Phase::Aborting => {
            let want = if r.phase == Phase::Reissuing { &new_sha } else { &old_sha };
            let proxies = shared.store.proxies();
            let list = connected
                .into_iter()
                .filter(|(k, s)| {
                    let addr = k.split_once(' ').map(|(_, a)| a).unwrap_or("");
                    !proxies.iter().any(|p| p.identity == s.identity && p.inbound_addr == addr && &p.issuer == want)
                })
                .map(|(k, _)| k)
                .collect();
            let root = if r.phase == Phase::Reissuing { "new" } else { "old" };
            (list, format!("waiting for every connected proxy to renew its certificate from the {root} root"))
        }
        Phase::Done => (vec![], "the old root is retired".into()),
        Phase::Aborted => (vec![], "the new root was withdrawn; the old root is in force".into()),
    };
    (total, list, detail)
}

/// The status `palisadectl ca status` shows.
pub(crate) fn status(shared: &Shared) -> palisade_proto::v1::CaStatus {
    let view = shared.ca.view();
    let root = |der: &[u8]| {
        let info = SvidInfo::parse(&CertificateDer::from(der.to_vec())).ok();
        palisade_proto::v1::CaRoot {
            subject: info.as_ref().map(|i| i.subject.clone()).unwrap_or_default(),
            sha256: sha256_hex(der),
            not_after: info.map(|i| i.not_after.into()),
        }
    };
    let first = |pem: &str| palisade_certs::ca::parse_pem_certs(pem).ok().and_then(|c| c.first().map(|c| root(c)));
    let (proxies, waiting_for, detail) = waiting(shared, &view);
    let r = view.rotation.as_ref();
    let mut detail = detail;
    if let Some(r) = r.filter(|r| !r.phase.finished() && r.min_phase_secs > 0) {
        let left = (r.since + r.min_phase_secs).saturating_sub(unix_now());
        if left > 0 {
            detail = format!("{detail}; and {left}s more of --min-phase");
        }
    }
    let at = |secs: u64| Some(prost_types::Timestamp { seconds: secs as i64, nanos: 0 });
    palisade_proto::v1::CaStatus {
        phase: r.map(|r| r.phase.name()).unwrap_or("none").into(),
        signing: Some(root(&signing_cert(&view.signing))),
        bundle: view.bundle.iter().map(|c| root(c)).collect(),
        old_root: r.and_then(|r| first(&r.old_cert_pem)),
        new_root: r.and_then(|r| first(&r.new_cert_pem)),
        started_at: r.and_then(|r| at(r.started)),
        phase_since: r.and_then(|r| at(r.since)),
        proxies: proxies as u32,
        waiting: waiting_for.len() as u32,
        waiting_for: waiting_for.into_iter().take(LIST_WAITING).collect(),
        detail,
        min_phase_seconds: r.map(|r| r.min_phase_secs).unwrap_or(0),
        bundle_pem: view.bundle_pem(),
    }
}

/// The shortest `reissuing` phase, in seconds.
const REISSUING_AT_LEAST_SECS: u64 = 3;

/// The leader's part: moves a rotation on when its step is complete.
pub(crate) async fn drive(shared: Arc<Shared>, leading: Option<tokio::sync::watch::Receiver<bool>>) {
    loop {
        tokio::time::sleep(DRIVE_EVERY).await;
        if leading.as_ref().is_some_and(|l| !*l.borrow()) {
            crate::metrics::METRICS.ca_roots.set(shared.ca.view().bundle.len() as i64);
            continue;
        }
        let view = shared.ca.view();
        crate::metrics::METRICS.ca_roots.set(view.bundle.len() as i64);
        let Some(r) = view.rotation.clone().filter(|r| !r.phase.finished()) else {
            crate::metrics::METRICS.ca_rotation_waiting.set(0);
            continue;
        };
        let (_, waiting_for, _) = waiting(&shared, &view);
        crate::metrics::METRICS.ca_rotation_waiting.set(waiting_for.len() as i64);
        if !waiting_for.is_empty() || (r.min_phase_secs > 0 && unix_now() <= r.since + r.min_phase_secs) {
            continue;
        }
        // `reissuing` lasts long enough for a watching `palisadectl ca rotate`
        // (it polls twice a second) to move its own credential to the new root.
        if r.phase == Phase::Reissuing && unix_now() < r.since + REISSUING_AT_LEAST_SECS {
            continue;
        }
        let next = match r.phase {
            Phase::Publishing => Phase::Reissuing,
            Phase::Reissuing => Phase::Done,
            Phase::Aborting => Phase::Aborted,
            Phase::Done | Phase::Aborted => continue,
        };
        let s = shared.clone();
        let result = tokio::task::spawn_blocking(move || s.ca.step(&view, r, next)).await;
        match result {
            Ok(Ok(())) => {
                tracing::info!(target: "audit", event = "ca_rotation_step", phase = next.name(), "root CA rotation moved on")
            }
            Ok(Err(RotateError::Conflict)) => {}
            Ok(Err(e)) => tracing::error!(error = %e, "cannot move the root CA rotation on; retrying"),
            Err(_) => {}
        }
    }
}
