use std::time::Duration;

use palisade_policy::resilience::{Balancing, Ejection};

use super::*;

const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";

fn peers(n: usize) -> Vec<Peer> {
    (0..n)
        .map(|i| Peer { addr: format!("10.0.0.{}:4143", i + 1).parse().unwrap(), identity: ORDERS.parse().unwrap() })
        .collect()
}

fn cfg() -> Balancing {
    Balancing {
        warmup: Duration::ZERO,
        ejection: Ejection { base_time: Duration::from_millis(200), ..Ejection::default() },
    }
}

/// Runs `n` sequential calls; `answer(endpoint index)` says how each went
/// and how long it took. Returns the calls each endpoint got.
fn run(
    b: &Balancer,
    s: &Arc<Service>,
    ps: &[Peer],
    cfg: &Balancing,
    n: usize,
    answer: impl Fn(usize) -> (Outcome, Duration),
) -> Vec<usize> {
    let mut got = vec![0; ps.len()];
    for _ in 0..n {
        let (ep, _) = b.pick(s, ps, 1, cfg, None);
        let ep = ep.unwrap();
        let i = ps.iter().position(|p| *p == ep.peer).unwrap();
        got[i] += 1;
        let (outcome, rtt) = answer(i);
        let mut f = b.start(s, ep);
        f.started -= rtt;
        b.finish(f, outcome, cfg);
    }
    got
}

#[test]
fn a_slow_endpoint_gets_a_small_share() {
    let b = Balancer::new(Mode::PeakEwma);
    let s = b.service("orders.shop");
    let ps = peers(3);
    let got =
        run(&b, &s, &ps, &cfg(), 3000, |i| (Outcome::Success, Duration::from_millis(if i == 0 { 50 } else { 1 })));
    assert!(got[0] < 60, "the slow one got {got:?}");
    let rr = Balancer::new(Mode::RoundRobin);
    let s = rr.service("orders.shop");
    let got =
        run(&rr, &s, &ps, &cfg(), 3000, |i| (Outcome::Success, Duration::from_millis(if i == 0 { 50 } else { 1 })));
    assert_eq!(got, [1000, 1000, 1000], "round robin takes turns");
}

#[test]
fn failures_in_a_row_eject_for_a_growing_time_and_one_failure_on_return_ejects_again() {
    let b = Balancer::new(Mode::PeakEwma);
    let s = b.service("orders.shop");
    let ps = peers(3);
    let cfg = cfg();
    run(&b, &s, &ps, &cfg, 300, |_| (Outcome::Success, Duration::from_millis(1)));
    let got = run(&b, &s, &ps, &cfg, 300, |i| {
        (if i == 0 { Outcome::Failure } else { Outcome::Success }, Duration::from_millis(1))
    });
    assert!(got[0] <= 5, "ejected after 5 failures in a row: {got:?}");
    let snap = b.snapshot();
    let e = &snap[0].endpoints[0];
    assert_eq!(e.ejections, 1);
    assert!(e.ejected_for_ms > 0 && e.ejected_for_ms <= 200, "{e:?}");
    std::thread::sleep(Duration::from_millis(250));
    // Back on probation: its first failure ejects it again, for twice as long.
    let got = run(&b, &s, &ps, &cfg, 300, |i| {
        (if i == 0 { Outcome::Failure } else { Outcome::Success }, Duration::from_millis(1))
    });
    assert_eq!(got[0], 1, "{got:?}");
    let e = &b.snapshot()[0].endpoints[0];
    assert_eq!(e.ejections, 2);
    assert!(e.ejected_for_ms > 200, "{e:?}");
}

#[test]
fn a_success_rate_far_below_the_peers_ejects() {
    let b = Balancer::new(Mode::PeakEwma);
    let s = b.service("orders.shop");
    let ps = peers(3);
    let cfg = Balancing { ejection: Ejection { consecutive_failures: 0, ..cfg().ejection }, ..cfg() };
    let flip = std::cell::Cell::new(false);
    run(&b, &s, &ps, &cfg, 300, |i| {
        if i == 0 {
            flip.set(!flip.get());
        }
        (if i == 0 && flip.get() { Outcome::Failure } else { Outcome::Success }, Duration::from_millis(1))
    });
    assert_eq!(b.snapshot()[0].endpoints[0].ejections, 1, "half failing, peers all fine");
    assert_eq!(b.snapshot()[0].endpoints[1].ejections, 0);
}

#[test]
fn never_more_than_the_allowed_share_is_ejected_but_unreachable_ones_always_are() {
    let b = Balancer::new(Mode::PeakEwma);
    let s = b.service("orders.shop");
    let ps = peers(4);
    let cfg = cfg();
    run(&b, &s, &ps, &cfg, 400, |i| {
        (if i < 3 { Outcome::Failure } else { Outcome::Success }, Duration::from_millis(1))
    });
    let ejected = b.snapshot()[0].endpoints.iter().filter(|e| e.ejected_for_ms > 0).count();
    assert_eq!(ejected, 2, "3 of 4 fail, 50% of 4 are ejected");
    run(&b, &s, &ps, &cfg, 40, |_| (Outcome::Unreachable, Duration::ZERO));
    let ejected = b.snapshot()[0].endpoints.iter().filter(|e| e.ejected_for_ms > 0).count();
    assert_eq!(ejected, 4, "unreachable endpoints are passed over regardless");
    let (ep, _) = b.pick(&s, &ps, 1, &cfg, None);
    assert!(ep.is_some(), "with all ejected, one is still tried");
}

#[test]
fn new_endpoints_warm_up_and_gone_ones_are_returned_to_drain() {
    let b = Balancer::new(Mode::PeakEwma);
    let s = b.service("orders.shop");
    let cfg = Balancing { warmup: Duration::from_secs(60), ..cfg() };
    let two = peers(2);
    run(&b, &s, &two, &cfg, 100, |_| (Outcome::Success, Duration::from_millis(1)));
    let three = peers(3);
    let mut got = vec![0; 3];
    for _ in 0..600 {
        let (ep, gone) = b.pick(&s, &three, 2, &cfg, None);
        assert!(gone.is_empty());
        let ep = ep.unwrap();
        got[three.iter().position(|p| *p == ep.peer).unwrap()] += 1;
        let f = b.start(&s, ep);
        b.finish(f, Outcome::Success, &cfg);
    }
    assert!(got[2] < got[0] / 3, "the new one warms up: {got:?}");
    let (_, gone) = b.pick(&s, &two, 3, &cfg, None);
    assert_eq!(gone, vec![three[2].clone()]);
    let (ep, _) = b.pick(&s, &two, 3, &cfg, Some(two[0].addr));
    assert_eq!(ep.unwrap().peer, two[1], "avoided when another can be had");
}

#[test]
fn in_flight_requests_weigh_on_the_cost() {
    let b = Balancer::new(Mode::PeakEwma);
    let s = b.service("orders.shop");
    let ps = peers(2);
    let cfg = cfg();
    let (ep, _) = b.pick(&s, &ps, 1, &cfg, None);
    let busy = ep.unwrap();
    let _held: Vec<_> = (0..10).map(|_| b.start(&s, busy.clone())).collect();
    for _ in 0..20 {
        let (ep, _) = b.pick(&s, &ps, 1, &cfg, None);
        assert_ne!(ep.unwrap().peer, busy.peer);
    }
    assert_eq!(b.snapshot()[0].endpoints.iter().map(|e| e.in_flight).sum::<u32>(), 10);
}

#[test]
fn an_answer_sent_before_the_ejection_does_not_end_its_probation() {
    let b = Balancer::new(Mode::PeakEwma);
    let s = b.service("orders.shop");
    let ps = peers(3);
    let cfg = cfg();
    run(&b, &s, &ps, &cfg, 30, |_| (Outcome::Success, Duration::from_millis(1)));
    let ep0 = loop {
        let ep = b.pick(&s, &ps, 1, &cfg, None).0.unwrap();
        if ep.peer == ps[0] {
            break ep;
        }
    };
    let early = b.start(&s, ep0.clone());
    for _ in 0..5 {
        let f = b.start(&s, ep0.clone());
        b.finish(f, Outcome::Failure, &cfg);
    }
    assert_eq!(b.snapshot()[0].endpoints[0].ejections, 1);
    b.finish(early, Outcome::Success, &cfg);
    std::thread::sleep(Duration::from_millis(250));
    let f = b.start(&s, ep0.clone());
    b.finish(f, Outcome::Failure, &cfg);
    assert_eq!(b.snapshot()[0].endpoints[0].ejections, 2, "the first answer after its return decides");
}

#[test]
fn failures_every_endpoint_shares_eject_none() {
    let b = Balancer::new(Mode::PeakEwma);
    let s = b.service("orders.shop");
    let ps = peers(5);
    let cfg = cfg();
    run(&b, &s, &ps, &cfg, 40, |_| (Outcome::Failure, Duration::from_millis(1)));
    let ejected = b.snapshot()[0].endpoints.iter().filter(|e| e.ejections > 0).count();
    assert_eq!(ejected, 0, "a failure all share is no endpoint's");
}
