use std::sync::atomic::AtomicU64;

use clap::Parser;
use http::header::{CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
use http::{Request, Version};
use palisade_certs::tls::{SvidStore, TrustBundle};

use super::forward::{check_framing, content_length, to_h2};
use super::*;
use crate::directory::Changes;
use crate::policy::{InForce, Sources};
use crate::proxy::detect::Protocol;
use crate::proxy::{ORIG_PROTO, PEER_IDENTITY, ProxyError};

const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";

/// An outbound side with no connections: a directory, a policy and metrics.
fn outbound() -> Outbound {
    let td = palisade_certs::TrustDomain::new("cluster.local").unwrap();
    let ca = palisade_certs::CertificateAuthority::generate(&td, Duration::from_secs(3600)).unwrap();
    let bundle = TrustBundle::new(ca.trust_bundle()).unwrap();
    let metrics = Arc::new(Metrics::default());
    let cfg = crate::Config::try_parse_from(["palisade-sidecar", "--ca-bundle", "/dev/null"]).unwrap();
    Outbound {
        directory: Arc::new(Directory::default()),
        peers: Arc::new(PeerClient::new(SvidStore::new(), bundle, metrics.clone(), Duration::from_secs(10))),
        metrics,
        limits: cfg.limits,
        opaque_ports: vec![],
        access_log: false,
        access_log_sampling: 1.0,
        egress: Egress::Passthrough,
        policy: crate::policy::PolicyState::default(),
        draws: AtomicU64::new(0),
        tracing: crate::trace::Tracing::default(),
        me: SvidStore::new(),
        balancer: Arc::new(crate::balance::Balancer::new(crate::balance::Mode::PeakEwma)),
    }
}

/// web's routes: api-version 2 and /v2/ (rewritten to /) go to orders-v2.
const ROUTES: &str = r#"{"apiVersion":"palisade.dev/v1","kind":"TrafficPolicy","metadata":{"name":"r","namespace":"shop"},"spec":{"target":{"identities":["spiffe://cluster.local/ns/shop/sa/web"]},"routes":[
    {"match":{"service":"orders.shop","headers":{"api-version":"2"}},"backends":[{"service":"orders-v2.shop"}]},
    {"match":{"service":"orders.shop","pathPrefix":"/v2/"},"backends":[{"service":"orders-v2.shop"}],"rewritePrefix":"/"}]}}"#;

fn with_routes(out: &Outbound) {
    let sources = Sources { version: "r1".into(), policies_json: vec![ROUTES.into()], ..Default::default() };
    out.policy.set(InForce::compile(&sources, WEB, None, &out.metrics).unwrap());
}

fn get(uri: &str) -> Request<()> {
    Request::get(uri).body(()).unwrap()
}

fn peer(addr: &str, identity: &str) -> Peer {
    Peer { addr: addr.parse().unwrap(), identity: identity.parse().unwrap() }
}

#[test]
fn ambiguous_framing_is_refused() {
    let both = Request::post("/").header(CONTENT_LENGTH, "3").header(TRANSFER_ENCODING, "chunked").body(()).unwrap();
    assert!(matches!(check_framing(&both), Err(ProxyError::BadRequest(m)) if m.contains("both")));
    let twice = Request::post("/").header(CONTENT_LENGTH, "3").header(CONTENT_LENGTH, "3").body(()).unwrap();
    assert!(matches!(check_framing(&twice), Err(ProxyError::BadRequest(m)) if m.contains("several")));
    let one = Request::post("/").header(CONTENT_LENGTH, "3").body(()).unwrap();
    assert!(check_framing(&one).is_ok());
    assert!(check_framing(&get("/")).is_ok());
}

#[test]
fn content_length_is_a_number_or_refused() {
    let with = |v: &str| Request::post("/").header(CONTENT_LENGTH, v).body(()).unwrap();
    assert_eq!(content_length(&get("/")).unwrap(), None);
    assert_eq!(content_length(&with("42")).unwrap(), Some(42));
    assert_eq!(content_length(&with(" 7 ")).unwrap(), Some(7));
    for bad in ["-1", "4 2", "0x10", "18446744073709551616"] {
        assert!(
            matches!(content_length(&with(bad)), Err(ProxyError::BadRequest("invalid Content-Length"))),
            "{bad:?} accepted"
        );
    }
}

#[test]
fn the_authority_is_the_uris_else_the_host_header() {
    let absolute = Request::get("http://orders.shop:8080/x").header(HOST, "other").body(()).unwrap();
    assert_eq!(authority_of(&absolute).unwrap().unwrap().as_str(), "orders.shop:8080");
    let host = Request::get("/x").header(HOST, "orders.shop").body(()).unwrap();
    assert_eq!(authority_of(&host).unwrap().unwrap().as_str(), "orders.shop");
    assert!(authority_of(&get("/x")).is_none(), "no Host: none");
    let bad = Request::get("/x").header(HOST, "a b").body(()).unwrap();
    assert_eq!(authority_of(&bad), Some(None), "an unusable Host is told apart from none");
}

#[test]
fn a_destination_shows_as_its_service_or_address() {
    assert_eq!(Dest::Service("orders.shop".into()).to_string(), "orders.shop");
    assert_eq!(Dest::Peer(peer("10.0.0.2:4143", ORDERS)).to_string(), "10.0.0.2:4143");
}

#[test]
fn routes_pick_the_backend_and_rewrite_the_path() {
    let out = outbound();
    let orders = Dest::Service("orders.shop".into());
    // No policy yet, then a policy: unrouted requests keep their destination.
    assert!(out.route(&mut get("/v2/items"), &orders).unwrap().is_none());
    with_routes(&out);
    let mut plain = get("/v1/items");
    assert!(out.route(&mut plain, &orders).unwrap().is_none());
    assert_eq!(plain.uri(), "/v1/items");

    let mut by_header = Request::get("/v1/items").header("api-version", "2").body(()).unwrap();
    assert_eq!(out.route(&mut by_header, &orders).unwrap().and_then(|r| r.0).as_deref(), Some("orders-v2.shop"));
    assert_eq!(by_header.uri(), "/v1/items", "no rewrite on that route");

    let mut by_path = get("/v2/items?page=2");
    assert_eq!(out.route(&mut by_path, &orders).unwrap().and_then(|r| r.0).as_deref(), Some("orders-v2.shop"));
    assert_eq!(by_path.uri(), "/items?page=2", "the prefix is rewritten, the query kept");
    let counted = out
        .metrics
        .routes
        .get_or_create(&crate::metrics::RouteLabels { route: "shop/r#1".into(), backend: "orders-v2.shop".into() });
    assert_eq!(counted.get(), 1, "each routed request is counted by route and backend");

    // Another service is not routed; nor is a path that cannot be normalised.
    let mut other = get("/v2/items");
    assert!(out.route(&mut other, &Dest::Service("db.shop".into())).unwrap().is_none());
    assert!(out.route(&mut get("/v2/%2e%2e/%2e%2e/x"), &orders).unwrap().is_none());
}

#[test]
fn transparent_destinations_are_routed_by_the_service_at_their_address() {
    let out = outbound();
    with_routes(&out);
    let dest = Dest::Peer(peer("10.0.0.2:4143", ORDERS));
    assert!(out.route(&mut get("/v2/x"), &dest).unwrap().is_none(), "an address of no known service");
    out.directory.update(Changes {
        addresses: vec![("10.0.0.2".parse().unwrap(), Some("orders.shop".into()))],
        ..Default::default()
    });
    assert_eq!(out.route(&mut get("/v2/x"), &dest).unwrap().and_then(|r| r.0).as_deref(), Some("orders-v2.shop"));
}

#[test]
fn weighted_draws_are_spread_evenly() {
    let out = outbound();
    let mut quarters = [0u32; 4];
    for _ in 0..4000 {
        quarters[(out.draw() >> 30) as usize] += 1;
    }
    assert!(quarters.iter().all(|q| (800..1200).contains(q)), "{quarters:?}");
}

#[tokio::test]
async fn a_service_is_picked_from_the_directory() {
    let out = outbound();
    let orders = Dest::Service("orders.shop".into());
    assert!(matches!(out.choose_peer(&orders).await, Err(ProxyError::NoDirectory)), "nothing loaded yet");
    let direct = peer("10.0.0.9:4143", ORDERS);
    assert_eq!(
        out.choose_peer(&Dest::Peer(direct.clone())).await.unwrap(),
        direct,
        "a transparent destination is itself"
    );

    let a = peer("10.0.0.2:4143", ORDERS);
    out.directory.want_services(["orders.shop"]);
    out.directory.update(Changes { services: vec![("orders.shop".into(), vec![a.clone()])], ..Default::default() });
    assert_eq!(out.choose_peer(&orders).await.unwrap(), a);
    out.directory.update(Changes { services: vec![("db.shop".into(), vec![])], ..Default::default() });
    match out.choose_peer(&Dest::Service("db.shop".into())).await {
        Err(ProxyError::UnknownService(s)) => assert_eq!(s, "db.shop"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn an_http1_request_is_rewritten_for_http2_between_sidecars() {
    let orders = Dest::Service("orders.shop".into());
    let mut req = Request::post("/items?page=2")
        .header(HOST, "orders.shop:9001")
        .header("connection", "keep-alive, x-hop")
        .header("x-hop", "1")
        .header("keep-alive", "timeout=5")
        .header(TRANSFER_ENCODING, "chunked")
        .header(PEER_IDENTITY, "spiffe://cluster.local/ns/evil/sa/spoof")
        .header("x-kept", "1")
        .body(())
        .unwrap();
    to_h2(&mut req, &orders, Protocol::Http1).unwrap();
    assert_eq!(req.uri(), "http://orders.shop:9001/items?page=2", "absolute, the authority from Host");
    assert_eq!(req.version(), Version::HTTP_2);
    let h = req.headers();
    for gone in ["host", "connection", "x-hop", "keep-alive", "transfer-encoding", "x-palisade-peer-identity"] {
        assert!(!h.contains_key(gone), "{gone} is still there: {h:?}");
    }
    assert_eq!(h[ORIG_PROTO], "HTTP/1.1", "the callee's sidecar gives the app the protocol the caller spoke");
    assert_eq!(h["x-kept"], "1");
}

#[test]
fn an_http2_request_keeps_its_authority_and_loses_a_forged_orig_proto() {
    let orders = Dest::Service("orders.shop".into());
    let mut req = Request::get("http://orders.shop/a").header(ORIG_PROTO, "HTTP/1.1").body(()).unwrap();
    to_h2(&mut req, &orders, Protocol::Http2).unwrap();
    assert_eq!(req.uri(), "http://orders.shop/a");
    assert!(!req.headers().contains_key(ORIG_PROTO), "an app speaking HTTP/2 cannot claim HTTP/1.1");

    // No Host and no authority: the destination names the callee.
    let mut bare = get("/");
    to_h2(&mut bare, &orders, Protocol::Http2).unwrap();
    assert_eq!(bare.uri(), "http://orders.shop/");
}

impl Outbound {
    /// The endpoint a try would go to.
    async fn choose_peer(&self, dest: &Dest) -> Result<Peer, ProxyError> {
        self.choose(dest, None).await.map(|(p, _)| p)
    }
}
