//! `MeshConfig.Subscribe`: one sidecar's stream. The sender diffs what the
//! sidecar should hold against what it was sent and sends the difference
//! (after a reconnect, against what its Hello says it holds); the receiver
//! takes ACKs, NACKs, subscriptions and reports.

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use palisade_proto::limits;
use palisade_proto::v1::config_request::Kind;
use palisade_proto::v1::mesh_config_server::MeshConfig;
use palisade_proto::v1::resource::Body;
use palisade_proto::v1::{ConfigRequest, ConfigUpdate, Hello, ResourceName, TapSet, Want};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status, Streaming};

use super::{Handle, SyncStatus, status_key};
use crate::Shared;
use palisade_telemetry::Untrusted;

/// Most services and addresses one stream may subscribe to: a workload
/// calling random addresses cannot grow the control plane without bound.
pub(crate) const MAX_SUBSCRIPTIONS: usize = 4096;
/// Most resources a Hello may say it holds.
const MAX_HELD: usize = MAX_SUBSCRIPTIONS + 4096;
/// Longest resource name accepted from a sidecar.
const MAX_NAME: usize = 512;
/// A NACK is recorded with at most this many types, each name and reason cut.
const MAX_NACK_TYPES: usize = 8;
const MAX_NACK_TYPE: usize = 32;
const MAX_NACK_REASON: usize = 1024;

/// The MeshConfig service.
#[derive(Debug, Clone)]
pub struct MeshConfigService {
    pub(crate) shared: Arc<Shared>,
}

/// What one stream subscribed to.
#[derive(Debug, Default)]
struct Subs {
    services: HashSet<String>,
    ips: HashSet<IpAddr>,
    warned: bool,
}

impl Subs {
    /// Adds what `want` names (valid, new, within the stream's bound and
    /// its identity's, reserved from `hub`); returns the additions.
    fn add(&mut self, want: Want, key: &str, hub: &super::Hub, identity: &str) -> (Vec<String>, Vec<IpAddr>) {
        let mut services = Vec::new();
        let mut ips = Vec::new();
        let room = MAX_SUBSCRIPTIONS.saturating_sub(self.services.len() + self.ips.len() + 1);
        for s in want.services {
            if services.len() >= room {
                break;
            }
            if valid_service(&s) && !self.services.contains(&s) && !services.contains(&s) {
                services.push(s);
            }
        }
        for a in want.addresses {
            if services.len() + ips.len() >= room {
                break;
            }
            let Ok(ip) = a.parse::<IpAddr>() else { continue };
            let ip = crate::directory_guard::canonical(ip);
            if !self.ips.contains(&ip) && !ips.contains(&ip) {
                ips.push(ip);
            }
        }
        let asked = services.len() + ips.len();
        let granted = hub.reserve(identity, asked);
        if granted < asked || asked == room {
            self.full(key);
        }
        services.truncate(granted);
        ips.truncate(granted - services.len());
        self.services.extend(services.iter().cloned());
        self.ips.extend(ips.iter().copied());
        (services, ips)
    }

    fn full(&mut self, key: &str) {
        if !std::mem::replace(&mut self.warned, true) {
            tracing::warn!(target: "audit", event = "config_subscriptions_full", proxy = %Untrusted(key), per_stream = MAX_SUBSCRIPTIONS, per_identity = super::MAX_SUBSCRIPTIONS_PER_IDENTITY, "a sidecar asked for more services and addresses than its stream or identity may subscribe to; the rest are not answered");
        }
    }
}

/// `<service-account>.<namespace>`: dot-separated DNS labels (a service
/// account name may hold dots), at most 253 bytes.
fn valid_service(s: &str) -> bool {
    let label = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    s.len() <= 253 && s.contains('.') && s.split('.').all(label)
}

type Held = HashMap<(String, String), String>;

/// The resources a Hello says the sidecar holds, checked.
fn held(hello: &Hello) -> Result<Held, Status> {
    if hello.held.len() > MAX_HELD {
        return Err(Status::invalid_argument("the hello names too many held resources"));
    }
    let mut out = HashMap::with_capacity(hello.held.len());
    for h in &hello.held {
        if h.r#type.len() > 32 || h.name.len() > MAX_NAME || h.version.len() > 64 {
            return Err(Status::invalid_argument("a held resource's type, name or version is too long"));
        }
        out.insert((h.r#type.clone(), h.name.clone()), h.version.clone());
    }
    Ok(out)
}

type UpdateStream = tokio_stream::wrappers::ReceiverStream<Result<ConfigUpdate, Status>>;

#[tonic::async_trait]
impl MeshConfig for MeshConfigService {
    type SubscribeStream = UpdateStream;

    async fn subscribe(&self, req: Request<Streaming<ConfigRequest>>) -> Result<Response<UpdateStream>, Status> {
        let td = &self.shared.trust_domain;
        let identity = match req.peer_certs().and_then(|c| palisade_certs::tls::peer_identity(Some(&c))) {
            Some((id, _)) if id.trust_domain() == td && id.workload().is_some() => id.to_string(),
            _ => {
                return Err(Status::unauthenticated(
                    "configuration is served to workload certificates of this mesh only",
                ));
            }
        };
        let src = req.remote_addr().map(|a| a.to_string()).unwrap_or_default();
        let mut inbound = req.into_inner();
        let hello = match inbound.message().await?.and_then(|m| m.kind) {
            Some(Kind::Hello(h)) => h,
            _ => return Err(Status::invalid_argument("the stream must start with a hello")),
        };
        if !hello.inbound_addr.is_empty() && hello.inbound_addr.parse::<std::net::SocketAddr>().is_err() {
            return Err(Status::invalid_argument("the inbound address must be empty or IP:PORT"));
        }
        let held = held(&hello)?;
        let key = status_key(&identity, &hello.inbound_addr);
        // Taps go only to sidecars that understand them.
        let taps_ok = hello.capabilities.iter().any(|c| c == "taps");
        let shared = self.shared.clone();
        let hub = &shared.hub;
        let id = hub.nonce.fetch_add(1, Ordering::Relaxed);
        let handle = Arc::new(Handle {
            id,
            identity: identity.clone(),
            key: key.clone(),
            cancel: tokio_util::sync::CancellationToken::new(),
            wake: tokio::sync::Notify::new(),
            since: Mutex::new(Some(std::time::Instant::now())),
        });
        if !hub.join(handle.clone()) {
            tracing::warn!(target: "audit", event = "config_streams_full", src.addr = %src, src.identity = %identity, max = super::MAX_STREAMS_PER_IDENTITY, "refused a config stream: its identity holds the most streams already");
            return Err(Status::resource_exhausted("too many configuration streams for this identity"));
        }
        hub.update(&key, |s| {
            *s = SyncStatus { identity: identity.clone(), connected: true, stream: id, ..Default::default() };
        });
        let subs = Arc::new(Mutex::new(Subs::default()));
        if let Some(want) = hello.want {
            let (services, ips) = subs.lock().unwrap_or_else(|p| p.into_inner()).add(want, &key, hub, &identity);
            hub.subscribe(id, &services, &ips);
        }
        crate::metrics::METRICS.policy_streams.inc();
        tracing::info!(src.addr = %src, src.identity = %identity, proxy = %Untrusted(&key), resumed = held.len(), "sidecar subscribed to its configuration");

        let (tx, rx) = mpsc::channel(4);
        let sender =
            Sender { shared: shared.clone(), handle: handle.clone(), key: key.clone(), taps_ok, subs: subs.clone() };
        tokio::spawn(sender.run(tx, held));
        let recv_shared = shared.clone();
        tokio::spawn(async move {
            let hub = &recv_shared.hub;
            loop {
                let m = tokio::select! {
                    m = inbound.message() => m,
                    _ = handle.cancel.cancelled() => break,
                };
                match m {
                    Ok(Some(ConfigRequest { kind: Some(kind) })) => receive(&recv_shared, &handle, &key, &subs, kind),
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
            hub.update(&key, |s| {
                if s.stream == id {
                    s.connected = false;
                }
            });
            {
                let subs = subs.lock().unwrap_or_else(|p| p.into_inner());
                hub.leave(&handle, &subs.services, &subs.ips);
            }
            crate::metrics::METRICS.policy_streams.dec();
            tracing::info!(proxy = %Untrusted(&key), "sidecar config stream closed");
        });
        Ok(Response::new(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }
}

/// One message from the sidecar.
fn receive(shared: &Shared, handle: &Handle, key: &str, subs: &Mutex<Subs>, kind: Kind) {
    let hub = &shared.hub;
    let id = handle.id;
    match kind {
        Kind::Hello(_) => tracing::debug!(proxy = %Untrusted(key), "a second hello on one stream is ignored"),
        Kind::Want(want) => {
            let (services, ips) = subs.lock().unwrap_or_else(|p| p.into_inner()).add(want, key, hub, &handle.identity);
            if !services.is_empty() || !ips.is_empty() {
                hub.subscribe(id, &services, &ips);
                hub.poke(id);
            }
        }
        Kind::Ack(ack) => hub.update(key, |s| {
            if s.stream == id && ack.nonce == s.sent_nonce {
                if let Some(at) = s.change_at.take() {
                    crate::metrics::METRICS.push_latency.observe(at.elapsed().as_secs_f64());
                }
                s.acked_roots = s.sent_roots.clone();
                s.acked = s.sent.clone();
                s.nacked = false;
            }
        }),
        Kind::Nack(nack) => {
            // Only a NACK of the update this stream was last sent counts,
            // once: another stream's nonce, or the same NACK again, is
            // neither recorded nor logged (the audit log is not a workload's to fill).
            let fresh = {
                let mut all = hub.status.lock().unwrap_or_else(|p| p.into_inner());
                all.get_mut(key).is_some_and(|s| {
                    let fresh = s.stream == id && nack.nonce == s.sent_nonce && s.nacked_nonce != nack.nonce;
                    if fresh {
                        s.nacked_nonce = nack.nonce.clone();
                    }
                    fresh
                })
            };
            if !fresh {
                return;
            }
            let mut rejected: Vec<(String, String)> = nack
                .rejected
                .into_iter()
                .map(|(k, v)| (k.chars().take(MAX_NACK_TYPE).collect(), v.chars().take(MAX_NACK_REASON).collect()))
                .collect();
            rejected.sort();
            let more = rejected.len().saturating_sub(MAX_NACK_TYPES);
            rejected.truncate(MAX_NACK_TYPES);
            let types: Vec<&String> = rejected.iter().map(|(k, _)| k).collect();
            let mut error = rejected.iter().map(|(k, v)| format!("{k}: {v}")).collect::<Vec<_>>().join("; ");
            if more > 0 {
                error.push_str(&format!("; and {more} more types"));
            }
            crate::metrics::METRICS.nacks.inc();
            tracing::warn!(target: "audit", event = "config_nack", proxy = %Untrusted(key), src.identity = %handle.identity, rejected = ?types, error = %Untrusted(&error), "sidecar rejected part of a config update");
            hub.update(key, |s| {
                if s.stream == id {
                    s.nacked = true;
                    s.last_nack = error;
                }
            });
        }
        Kind::Report(m) => {
            // A sidecar saw a `kid` its key sets lack: fetch them again (rate limited).
            for uri in m.jwks_refresh.iter().take(16) {
                shared.jwks.request_refresh(uri);
            }
            let observe = &shared.observe;
            if !m.tap_events.is_empty() {
                observe.deliver(&handle.identity, key, &m.tap_events);
            }
            if !m.recorded.is_empty() {
                observe.record(&handle.identity, &m.recorded);
            }
            if let Some(stats) = m.stats {
                observe.stats_report(&handle.identity, key, stats);
            }
        }
    }
}

/// Sends one stream what it lacks, each time it is woken.
struct Sender {
    shared: Arc<Shared>,
    handle: Arc<Handle>,
    key: String,
    taps_ok: bool,
    subs: Arc<Mutex<Subs>>,
}

impl Sender {
    async fn run(self, tx: mpsc::Sender<Result<ConfigUpdate, Status>>, mut held: Held) {
        let hub = &self.shared.hub;
        let mut closing = hub.closing.subscribe();
        let mut taps = None;
        let mut first = true;
        loop {
            let (update, view) = self.build(&held, &mut taps, first);
            let (id, key) = (self.handle.id, &self.key);
            match update {
                Some(u) if prost::Message::encoded_len(&u) > limits::MAX_SNAPSHOT_BYTES => {
                    tracing::error!(proxy = %Untrusted(key), size = prost::Message::encoded_len(&u), limit = limits::MAX_SNAPSHOT_BYTES, "config update too large for the sidecar; not sent (it keeps what it has)");
                }
                Some(mut u) => {
                    // Taps alone are applied and not answered.
                    let answered = !u.resources.is_empty() || !u.removed.is_empty() || first;
                    if answered {
                        u.nonce = hub.nonce.fetch_add(1, Ordering::Relaxed).to_string();
                    }
                    for r in &u.resources {
                        held.insert((r.r#type.clone(), r.name.clone()), r.version.clone());
                    }
                    for r in &u.removed {
                        held.remove(&(r.r#type.clone(), r.name.clone()));
                    }
                    crate::metrics::METRICS.config_bytes.inc_by(prost::Message::encoded_len(&u) as u64);
                    let roots = super::roots_key(&bundle_roots(&self.shared));
                    let nonce = u.nonce.clone();
                    let since = self.handle.since.lock().unwrap_or_else(|p| p.into_inner()).take();
                    if tx.send(Ok(u)).await.is_err() {
                        break;
                    }
                    first = false;
                    hub.update(key, |s| {
                        if s.stream == id {
                            s.evaluated = view.revision;
                            s.credentials = view.generation;
                            if answered {
                                s.sent = view.version.clone();
                                s.sent_roots = roots;
                                s.sent_nonce = nonce;
                                s.change_at = since.or(s.change_at);
                            }
                        }
                    });
                }
                None => {
                    // Nothing this sidecar holds changed.
                    self.handle.since.lock().unwrap_or_else(|p| p.into_inner()).take();
                    hub.update(key, |s| {
                        if s.stream == id {
                            s.evaluated = view.revision;
                            s.credentials = view.generation;
                        }
                    });
                }
            }
            tokio::select! {
                _ = self.handle.wake.notified() => {}
                _ = tx.closed() => break,
                _ = closing.changed() => break,
                _ = self.handle.cancel.cancelled() => break,
            }
        }
    }

    /// The update that brings `held` to what this stream should hold now
    /// (`None`: nothing differs), with the policy view it reflects; the
    /// first update is sent even when empty, so the sidecar knows it is in sync.
    fn build(
        &self,
        held: &Held,
        taps: &mut Option<Vec<palisade_proto::v1::TapSpec>>,
        first: bool,
    ) -> (Option<ConfigUpdate>, Arc<super::view::PolicyView>) {
        let shared = &self.shared;
        let views = &shared.hub.views;
        let view = views.policy(shared, &shared.hub, &self.handle.identity);
        let dir = views.directory();
        let mut desired = view.resources.clone();
        desired.push(views.bundle(shared));
        {
            let subs = self.subs.lock().unwrap_or_else(|p| p.into_inner());
            desired.extend(subs.services.iter().map(|s| dir.service(s)));
            desired.extend(subs.ips.iter().map(|ip| dir.address(*ip)));
        }
        let mut keys: HashSet<(&str, &str)> = HashSet::with_capacity(desired.len());
        let mut resources = Vec::new();
        for r in &desired {
            keys.insert((&r.r#type, &r.name));
            if held.get(&(r.r#type.clone(), r.name.clone())) != Some(&r.version) {
                resources.push((**r).clone());
            }
        }
        let mut removed: Vec<ResourceName> = held
            .keys()
            .filter(|(t, n)| !keys.contains(&(t.as_str(), n.as_str())))
            .map(|(t, n)| ResourceName { r#type: t.clone(), name: n.clone() })
            .collect();
        removed.sort_by(|a, b| (&a.r#type, &a.name).cmp(&(&b.r#type, &b.name)));
        let tap_set = if self.taps_ok {
            let now = shared.observe.taps_for(&self.handle.identity);
            (taps.as_ref() != Some(&now)).then(|| {
                *taps = Some(now.clone());
                TapSet { taps: now }
            })
        } else {
            None
        };
        if resources.is_empty() && removed.is_empty() && tap_set.is_none() && !first {
            return (None, view);
        }
        let update = ConfigUpdate {
            nonce: String::new(),
            policy_version: view.version.clone(),
            resources,
            removed,
            taps: tap_set,
        };
        (Some(update), view)
    }
}

/// The roots of the bundle in force, for the rotation's bookkeeping.
fn bundle_roots(shared: &Shared) -> Vec<Vec<u8>> {
    match shared.hub.views.bundle(shared).body.as_ref() {
        Some(Body::TrustBundle(b)) => b.roots_der.clone(),
        _ => Vec::new(),
    }
}
