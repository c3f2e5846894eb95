//! Turns a coalesced batch of change notices into the streams that must
//! look again. Work here is per identity and per service, never per
//! stream times mesh size: a join wakes the subscribers of its service and
//! the streams of its identity, a policy change the identities whose view
//! it changes, and only the trust bundle wakes everyone.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::view::PolicyView;
use super::{Dirty, Hub};
use crate::Shared;

/// How often the directory is rebuilt without a notice: certificates
/// expire by the clock, and their endpoints leave with them.
const EXPIRY_SWEEP: Duration = Duration::from_secs(5);

pub(super) async fn run(shared: Arc<Shared>) {
    let hub = &shared.hub;
    let mut taps = shared.observe.taps_changed.subscribe();
    let mut closing = hub.closing.subscribe();
    let mut sweep = tokio::time::interval(EXPIRY_SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    hub.views.rebuild_directory(&shared);
    // The policy view each identity's streams were last woken for.
    let mut pushed: HashMap<String, Arc<PolicyView>> = HashMap::new();
    loop {
        tokio::select! {
            _ = hub.kick.notified() => {}
            r = taps.changed() => {
                if r.is_err() { break }
                hub.taps_changed();
                continue;
            }
            _ = sweep.tick() => hub.endpoints_changed(),
            _ = closing.changed() => break,
        }
        // Gather what else changes in the window into the same push.
        tokio::time::sleep(hub.coalesce).await;
        let dirty = std::mem::take(&mut *hub.dirty.lock().unwrap_or_else(|p| p.into_inner()));
        let started = std::time::Instant::now();
        let woken = process(&shared, dirty, &mut pushed);
        if woken > 0 {
            tracing::debug!(streams = woken, took = ?started.elapsed(), "config change pushed");
        }
    }
}

/// Wakes the streams `d` concerns; returns how many.
fn process(shared: &Shared, d: Dirty, pushed: &mut HashMap<String, Arc<PolicyView>>) -> usize {
    let hub = &shared.hub;
    let mut all = d.taps;
    if d.credentials {
        let before = hub.views.bundle(shared);
        hub.views.forget_bundle();
        all |= hub.views.bundle(shared).version != before.version;
    }
    let mut wake: HashSet<u64> = HashSet::new();
    let identities: Vec<String> = {
        let r = hub.registry.lock().unwrap_or_else(|p| p.into_inner());
        if d.policies || d.credentials {
            r.by_identity.keys().cloned().collect()
        } else {
            d.identities.iter().filter(|i| r.by_identity.contains_key(*i)).cloned().collect()
        }
    };
    // Identities whose view changed version but not content: their
    // statuses move on without a push.
    let mut unchanged: HashMap<String, (u64, u64)> = HashMap::new();
    let mut changed_ids = Vec::new();
    for id in identities {
        // Compared with what this engine last woke the identity's streams
        // for, not with the shared cache, which a stream may have refreshed.
        let new = hub.views.policy(shared, hub, &id);
        if pushed.get(&id).is_some_and(|o| o.same_content(&new)) {
            unchanged.insert(id.clone(), (new.revision, new.generation));
        } else {
            changed_ids.push(id.clone());
        }
        pushed.insert(id, new);
    }
    let (services, ips) = if d.endpoints { hub.views.rebuild_directory(shared) } else { Default::default() };
    let handles: Vec<Arc<super::Handle>> = {
        let r = hub.registry.lock().unwrap_or_else(|p| p.into_inner());
        if all {
            r.streams.values().cloned().collect()
        } else {
            for id in &changed_ids {
                wake.extend(r.by_identity.get(id).into_iter().flatten());
            }
            for s in &services {
                wake.extend(r.by_service.get(s).into_iter().flatten());
            }
            for ip in &ips {
                wake.extend(r.by_ip.get(ip).into_iter().flatten());
            }
            wake.iter().filter_map(|id| r.streams.get(id).cloned()).collect()
        }
    };
    if !unchanged.is_empty() {
        let mut status = hub.status.lock().unwrap_or_else(|p| p.into_inner());
        for s in status.values_mut().filter(|s| s.connected) {
            if let Some((revision, generation)) = unchanged.get(&s.identity) {
                s.evaluated = s.evaluated.max(*revision);
                s.credentials = s.credentials.max(*generation);
            }
        }
        drop(status);
        hub.status_changes.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
    if !d.identities.is_empty() {
        let r = hub.registry.lock().unwrap_or_else(|p| p.into_inner());
        hub.views.retain_identities(|id| r.by_identity.contains_key(id));
        pushed.retain(|id, _| r.by_identity.contains_key(id));
    }
    for h in &handles {
        h.poke(d.since);
    }
    handles.len()
}

impl Hub {
    /// Wakes one stream now (it subscribed to something new).
    pub(crate) fn poke(&self, id: u64) {
        if let Some(h) = self.registry.lock().unwrap_or_else(|p| p.into_inner()).streams.get(&id) {
            h.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser as _;

    use super::*;
    use crate::push::Handle;

    const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
    const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

    /// A control plane's shared state on a file store in `dir`, without listeners.
    fn shared(dir: &std::path::Path) -> Arc<Shared> {
        let cfg =
            crate::Config::try_parse_from(["palisade-control-plane", "--data-dir", dir.to_str().unwrap()]).unwrap();
        let td = cfg.trust_domain.clone();
        let store: Arc<dyn crate::store::Store> = Arc::new(crate::store::FileStore::open(dir).unwrap());
        let home = Box::new(crate::ca::FileHome::new(dir, &td, None, None));
        let ca = Arc::new(crate::ca::Authority::open(home, td).unwrap());
        crate::state::shared(&cfg, store, ca, None).unwrap()
    }

    fn stream(id: u64, identity: &str) -> Arc<Handle> {
        Arc::new(Handle {
            id,
            identity: identity.into(),
            key: format!("{identity} 10.0.0.{id}:4143"),
            cancel: Default::default(),
            wake: Default::default(),
            since: Default::default(),
        })
    }

    /// Whether `h` was woken (and takes the wake-up).
    async fn woken(h: &Handle) -> bool {
        tokio::time::timeout(Duration::from_millis(20), h.wake.notified()).await.is_ok()
    }

    fn deny(target: &str) -> String {
        format!(
            "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: no-admin, namespace: shop}}\nspec:\n  target: {{identities: [\"{target}\"]}}\n  action: DENY\n  rules: [{{to: [{{paths: [\"/admin/*\"]}}]}}]\n"
        )
    }

    #[tokio::test]
    async fn a_policy_change_wakes_only_the_streams_it_concerns() {
        let dir = tempfile::tempdir().unwrap();
        let shared = shared(dir.path());
        let (orders, web) = (stream(1, ORDERS), stream(2, WEB));
        assert!(shared.hub.join(orders.clone()) && shared.hub.join(web.clone()));
        let policies = || Dirty { policies: true, ..Default::default() };
        let mut pushed = HashMap::new();
        // The first look computes every identity's view: both are woken.
        assert_eq!(process(&shared, policies(), &mut pushed), 2);
        assert!(woken(&orders).await && woken(&web).await);

        let apply = |yaml: &str| {
            let resources = crate::policy::parse(yaml).unwrap();
            let items = resources.iter().map(|r| (r.kind().to_string(), r.key(), r.to_json())).collect();
            shared.store.apply_policies(items).unwrap();
        };
        apply(&deny(ORDERS));
        assert_eq!(process(&shared, policies(), &mut pushed), 1, "only the identity the policy targets");
        assert!(woken(&orders).await, "orders' view changed");
        assert!(!woken(&web).await, "web's view did not");

        // Retargeted: both views change, both are woken; unchanged again, neither.
        apply(&deny(WEB));
        assert_eq!(process(&shared, policies(), &mut pushed), 2);
        assert!(woken(&orders).await && woken(&web).await);
        assert_eq!(process(&shared, policies(), &mut pushed), 0, "nothing changed");
        assert!(!woken(&orders).await && !woken(&web).await);
    }

    #[tokio::test]
    async fn an_endpoint_change_wakes_the_subscribers_of_its_service_only() {
        let dir = tempfile::tempdir().unwrap();
        let shared = shared(dir.path());
        // web watches orders.shop; orders watches web.shop.
        let (orders, web) = (stream(1, ORDERS), stream(2, WEB));
        assert!(shared.hub.join(orders.clone()) && shared.hub.join(web.clone()));
        shared.hub.subscribe(web.id, &["orders.shop".into()], &[]);
        shared.hub.subscribe(orders.id, &["web.shop".into()], &[]);
        let mut pushed = HashMap::new();
        process(&shared, Dirty { policies: true, ..Default::default() }, &mut pushed);
        assert!(woken(&orders).await && woken(&web).await);

        let proxy = crate::store::ProxyRecord {
            identity: ORDERS.into(),
            inbound_addr: "10.0.0.1:4143".into(),
            cert_serial: "o1".into(),
            cert_not_after: u64::MAX,
            ..Default::default()
        };
        shared.store.upsert_proxy(proxy, None, false).unwrap();
        let endpoints = || Dirty { endpoints: true, ..Default::default() };
        assert_eq!(process(&shared, endpoints(), &mut pushed), 1);
        assert!(woken(&web).await, "web subscribed to orders.shop");
        assert!(!woken(&orders).await, "orders did not");
        // A rebuild that finds nothing new wakes no one.
        assert_eq!(process(&shared, endpoints(), &mut pushed), 0);
    }
}
