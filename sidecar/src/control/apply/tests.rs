use std::time::Duration;

use palisade_proto::v1::{MeshSettings, ResourceName, ServiceEndpoints};

use super::*;

const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

fn resource(r#type: &str, name: &str, version: &str, body: Body) -> Resource {
    Resource { r#type: r#type.into(), name: name.into(), version: version.into(), body: Some(body) }
}

fn policy(name: &str, version: &str, json: &str) -> Resource {
    resource(POLICY, name, version, Body::PolicyJson(json.into()))
}

fn settings(version: &str) -> Resource {
    resource(SETTINGS, "mesh", version, Body::Settings(MeshSettings::default()))
}

fn update(nonce: &str, version: &str, resources: Vec<Resource>, removed: &[(&str, &str)]) -> ConfigUpdate {
    ConfigUpdate {
        nonce: nonce.into(),
        policy_version: version.into(),
        resources,
        removed: removed.iter().map(|(t, n)| ResourceName { r#type: t.to_string(), name: n.to_string() }).collect(),
        taps: None,
    }
}

fn versions(held: &Held) -> Vec<(String, String, String)> {
    held.versions().into_iter().map(|v| (v.r#type, v.name, v.version)).collect()
}

fn triple(t: &str, n: &str, v: &str) -> (String, String, String) {
    (t.into(), n.into(), v.into())
}

const DENY_NO_RULES: &str = r#"{"apiVersion":"palisade.dev/v1","kind":"AuthorizationPolicy","metadata":{"name":"p","namespace":"shop"},"spec":{"target":{"identities":["spiffe://cluster.local/ns/shop/sa/web"]},"action":"DENY"}}"#;
const ROUTES: &str = r#"{"apiVersion":"palisade.dev/v1","kind":"TrafficPolicy","metadata":{"name":"r","namespace":"shop"},"spec":{"target":{"identities":["spiffe://cluster.local/ns/shop/sa/web"]},"routes":[{"match":{"service":"orders.shop"},"backends":[{"service":"orders-v2.shop"}]}]}}"#;

/// The parts an update configures, owned by the test.
struct Parts {
    held: Mutex<Held>,
    bundle: TrustBundle,
    policy: PolicyState,
    directory: Directory,
    metrics: Metrics,
    renew_unless: tokio::sync::watch::Sender<Vec<CertificateDer<'static>>>,
}

impl Parts {
    fn new() -> Self {
        let td = palisade_certs::TrustDomain::new("cluster.local").unwrap();
        let ca = palisade_certs::CertificateAuthority::generate(&td, Duration::from_secs(3600)).unwrap();
        Self {
            held: Mutex::default(),
            bundle: TrustBundle::new(ca.trust_bundle()).unwrap(),
            policy: PolicyState::default(),
            directory: Directory::default(),
            metrics: Metrics::default(),
            renew_unless: tokio::sync::watch::channel(Vec::new()).0,
        }
    }

    fn applier(&self) -> Applier<'_> {
        Applier {
            held: &self.held,
            bundle: &self.bundle,
            policy: &self.policy,
            directory: &self.directory,
            metrics: &self.metrics,
            renew_unless: &self.renew_unless,
        }
    }

    fn apply(&self, u: &ConfigUpdate) -> Rejected {
        self.applier().apply(u, &WEB.parse().unwrap())
    }

    fn policy_version(&self) -> Option<String> {
        self.policy.current().map(|p| p.enforcer.version.clone())
    }
}

#[test]
fn held_merges_additions_changes_and_removals() {
    let mut held = Held::default();
    held.merge(&update(
        "1",
        "r1",
        vec![policy("AuthorizationPolicy/shop/a", "a1", "{}"), policy("AuthorizationPolicy/shop/b", "b1", "{}")],
        &[],
    ));
    let merged = held.merge(&update(
        "2",
        "r2",
        vec![
            policy("AuthorizationPolicy/shop/a", "a2", "{}"),
            settings("s1"),
            resource("future", "x", "f1", Body::PolicyJson("{}".into())),
        ],
        &[(POLICY, "AuthorizationPolicy/shop/b"), (POLICY, "AuthorizationPolicy/shop/never-held")],
    ));
    assert_eq!(
        versions(&held),
        [triple(POLICY, "AuthorizationPolicy/shop/a", "a2"), triple(SETTINGS, "mesh", "s1")],
        "a type this sidecar does not know is not held"
    );
    assert!(merged.rejected.is_empty(), "{:?}", merged.rejected);
    held.undo(&merged, &[POLICY]);
    assert_eq!(
        versions(&held),
        [
            triple(POLICY, "AuthorizationPolicy/shop/a", "a1"),
            triple(POLICY, "AuthorizationPolicy/shop/b", "b1"),
            triple(SETTINGS, "mesh", "s1")
        ]
    );
}

#[test]
fn a_resource_without_its_body_is_rejected_and_not_held() {
    let mut held = Held::default();
    let bare = Resource { r#type: SETTINGS.into(), name: "mesh".into(), version: "s1".into(), body: None };
    let bad_addr = resource(ADDRESS, "not-an-ip", "v", Body::AddressService(String::new()));
    let merged = held.merge(&update("1", "r1", vec![bare, bad_addr], &[]));
    assert!(held.versions().is_empty());
    assert!(merged.rejected.contains_key(SETTINGS) && merged.rejected.contains_key(ADDRESS), "{:?}", merged.rejected);
}

#[test]
fn a_first_update_without_policies_still_compiles() {
    let parts = Parts::new();
    let rejected = parts.apply(&update("1", "r1", vec![settings("s1")], &[]));
    assert!(rejected.is_empty(), "{rejected:?}");
    assert_eq!(parts.policy_version().as_deref(), Some("r1"));
    assert!(parts.directory.loaded());
    // Nothing at all (no settings either) compiles too.
    let parts = Parts::new();
    assert!(parts.apply(&update("1", "r1", vec![], &[])).is_empty());
    assert!(parts.policy.current().is_some());
}

#[test]
fn a_failed_policy_compile_rolls_back_the_policy_types() {
    let parts = Parts::new();
    let first = update("1", "r1", vec![policy("AuthorizationPolicy/shop/p", "p1", DENY_NO_RULES), settings("s1")], &[]);
    assert!(parts.apply(&first).is_empty());
    assert_eq!(parts.policy_version().as_deref(), Some("r1"));
    let nacks = parts.metrics.policy_nacks.get();

    let api_keys = resource(API_KEYS, "api_keys", "k1", Body::ApiKeys(Default::default()));
    let service = resource(SERVICE, "orders.shop", "e1", Body::Service(ServiceEndpoints::default()));
    let bad = update(
        "2",
        "r2",
        vec![policy("AuthorizationPolicy/shop/p", "p2", "{not json"), api_keys, service],
        &[(SETTINGS, "mesh")],
    );
    let rejected = parts.apply(&bad);
    assert_eq!(rejected.keys().collect::<Vec<_>>(), [POLICY], "{rejected:?}");
    assert_eq!(parts.policy_version().as_deref(), Some("r1"), "the previous policy stays in force");
    assert_eq!(parts.metrics.policy_nacks.get(), nacks + 1);
    assert_eq!(
        versions(&parts.held.lock().unwrap()),
        [
            triple(POLICY, "AuthorizationPolicy/shop/p", "p1"),
            triple(SERVICE, "orders.shop", "e1"),
            triple(SETTINGS, "mesh", "s1")
        ],
        "the policy types are what is in force; the service, applied, is held"
    );
}

#[test]
fn after_a_rejected_first_policy_the_sidecar_stays_unready() {
    let parts = Parts::new();
    let bad = update("1", "r1", vec![policy("AuthorizationPolicy/shop/p", "p1", "{not json"), settings("s1")], &[]);
    assert!(parts.apply(&bad).contains_key(POLICY));
    assert!(versions(&parts.held.lock().unwrap()).is_empty());
    let service = resource(SERVICE, "orders.shop", "e1", Body::Service(ServiceEndpoints::default()));
    assert!(parts.apply(&update("2", "r1", vec![service], &[])).is_empty());
    assert!(parts.policy.current().is_none(), "no policy in force until one compiles");
    let good = update("3", "r2", vec![policy("AuthorizationPolicy/shop/p", "p2", DENY_NO_RULES)], &[]);
    assert!(parts.apply(&good).is_empty());
    assert_eq!(parts.policy_version().as_deref(), Some("r2"));
}

#[test]
fn route_backends_are_subscribed_after_a_compile() {
    let parts = Parts::new();
    assert!(parts.apply(&update("1", "r1", vec![policy("TrafficPolicy/shop/r", "r1", ROUTES)], &[])).is_empty());
    assert_eq!(parts.directory.take_wants().map(|w| w.services), Some(vec!["orders-v2.shop".to_string()]));
}

#[tokio::test]
async fn the_hello_names_what_is_held_and_every_want() {
    let parts = Parts::new();
    parts.directory.want_services(["orders.shop"]);
    // Sent on an earlier stream, which then failed.
    assert!(parts.directory.take_wants().is_some());
    let service = resource(SERVICE, "orders.shop", "e1", Body::Service(ServiceEndpoints::default()));
    assert!(parts.apply(&update("1", "r1", vec![service, settings("s1")], &[])).is_empty());
    // Asked while no stream is open.
    let _ = parts.directory.endpoint_or_wait("db.shop", Duration::ZERO).await;
    let _ = parts.directory.identity_for_ip_or_wait("10.0.0.9".parse().unwrap(), Duration::ZERO).await;

    let hello = parts.applier().hello("10.0.0.1:4143");
    assert_eq!(hello.inbound_addr, "10.0.0.1:4143");
    assert_eq!(hello.capabilities, ["taps"]);
    let held: Vec<_> = hello.held.into_iter().map(|v| (v.r#type, v.name, v.version)).collect();
    assert_eq!(held, [triple(SERVICE, "orders.shop", "e1"), triple(SETTINGS, "mesh", "s1")]);
    let want = hello.want.unwrap_or_default();
    assert_eq!(want.services, ["db.shop", "orders.shop"]);
    assert_eq!(want.addresses, ["10.0.0.9"]);
    assert_eq!(parts.directory.take_wants(), None, "the Hello carried the queued wants");
}

#[test]
fn a_nack_names_each_type_rejected_and_why() {
    let parts = Parts::new();
    let bare = Resource { r#type: SETTINGS.into(), name: "mesh".into(), version: "s1".into(), body: None };
    let bad_addr = resource(ADDRESS, "not-an-ip", "v", Body::AddressService(String::new()));
    let bad_policy = policy("AuthorizationPolicy/shop/p", "p1", "{not json");
    let rejected = parts.apply(&update("1", "r1", vec![bare, bad_addr, bad_policy], &[]));
    assert!(matches!(rejected.get(ADDRESS), Some(ApplyError::AddressName { name }) if name == "not-an-ip"));
    assert!(matches!(rejected.get(POLICY), Some(ApplyError::Policy(CompileError::Parse(_)))), "{rejected:?}");
    let reasons = nack_reasons(rejected);
    assert_eq!(reasons[ADDRESS], r#"address "not-an-ip": the name is not an IP address"#);
    assert_eq!(reasons[SETTINGS], r#"settings "mesh": the resource does not carry a settings body"#);
    assert!(!reasons[POLICY].is_empty(), "the policy engine's reason is passed on: {reasons:?}");
    assert_eq!(reasons.len(), 3, "{reasons:?}");
}

#[test]
fn an_unusable_trust_bundle_is_rejected_and_the_roots_stay() {
    let parts = Parts::new();
    let before = parts.bundle.der();
    let garbage =
        palisade_proto::v1::TrustBundle { roots_der: vec![b"not a certificate".to_vec()], ..Default::default() };
    let rejected = parts.apply(&update(
        "1",
        "r1",
        vec![resource(TRUST_BUNDLE, "roots", "b1", Body::TrustBundle(garbage)), settings("s1")],
        &[],
    ));
    assert!(matches!(rejected.get(TRUST_BUNDLE), Some(ApplyError::TrustBundle(_))), "{rejected:?}");
    assert_eq!(rejected.len(), 1, "the other types apply: {rejected:?}");
    assert_eq!(*parts.bundle.der(), *before, "the roots in force stay");
    assert_eq!(versions(&parts.held.lock().unwrap()), [triple(SETTINGS, "mesh", "s1")], "the bundle is not held");
    assert_eq!(parts.policy_version().as_deref(), Some("r1"));

    // A usable one replaces them, and its renew hint reaches the identity task.
    let td = palisade_certs::TrustDomain::new("cluster.local").unwrap();
    let next = palisade_certs::CertificateAuthority::generate(&td, Duration::from_secs(3600)).unwrap();
    let roots: Vec<Vec<u8>> = next.trust_bundle().iter().map(|c| c.to_vec()).collect();
    let good = palisade_proto::v1::TrustBundle { roots_der: roots.clone(), renew_unless_chains_to: roots.clone() };
    let rejected =
        parts.apply(&update("2", "r1", vec![resource(TRUST_BUNDLE, "roots", "b2", Body::TrustBundle(good))], &[]));
    assert!(rejected.is_empty(), "{rejected:?}");
    assert_eq!(parts.bundle.der().iter().map(|c| c.to_vec()).collect::<Vec<_>>(), roots);
    assert_eq!(parts.renew_unless.borrow().iter().map(|c| c.to_vec()).collect::<Vec<_>>(), roots);
}

#[test]
fn removed_services_leave_the_directory_and_unknown_types_are_ignored() {
    let parts = Parts::new();
    let a =
        palisade_proto::v1::Endpoint { address: "10.0.0.2:4143".into(), identity: WEB.into(), ..Default::default() };
    let svc = resource(SERVICE, "orders.shop", "e1", Body::Service(ServiceEndpoints { endpoints: vec![a] }));
    let future = resource("future", "x", "f1", Body::PolicyJson("{}".into()));
    assert!(parts.apply(&update("1", "r1", vec![svc, future, settings("s1")], &[])).is_empty());
    assert_eq!(parts.metrics.directory_endpoints.get(), 1);
    assert_eq!(
        parts.directory.endpoint("orders.shop").map(|p| p.addr.to_string()).ok().as_deref(),
        Some("10.0.0.2:4143")
    );
    assert!(parts.apply(&update("2", "r1", vec![], &[(SERVICE, "orders.shop")])).is_empty());
    assert_eq!(parts.metrics.directory_endpoints.get(), 0);
    assert!(parts.directory.endpoint("orders.shop").is_err());
    assert_eq!(versions(&parts.held.lock().unwrap()), [triple(SETTINGS, "mesh", "s1")]);
}
