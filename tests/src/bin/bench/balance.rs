//! `palisade-bench resilience [secs] [concurrency]`: a caller's latency and
//! errors when one of five instances of a service is slow (+50 ms) or fails
//! every other request (503), as Palisade did before issue 28 (round robin,
//! no retries), balanced round robin with the default retries (`--balance
//! round-robin`) and by peak-EWMA latency with ejection (`--balance
//! peak-ewma`, the default), next to a healthy service.
//!
//! Five instances of orders (in-process apps whose behaviour is set per
//! scenario, each behind its own sidecar) and, per scenario, three fresh
//! caller sidecars (one per mode, so no state carries over). Each
//! caller gets a closed loop of `concurrency` keep-alive HTTP/1.1
//! connections sending GETs: 1 s of warm-up (not measured), then `secs`
//! seconds measured. The last two keep their default retries (2 tries on a
//! 503, within the budget), so their errors are what is left after retrying.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Empty};
use palisade_tests::apps::{Behaviour, HttpApp};
use palisade_tests::{ControlPlane, Sidecar, eventually, free_port};

const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";
const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
const INSTANCES: usize = 5;
/// The callers compared: `before` is Palisade before issue 28 (round robin
/// and no retries: a TrafficPolicy gives its identity `attempts: 1`).
const MODES: [&str; 3] = ["before", "round-robin", "peak-ewma"];
const BEFORE: &str = "spiffe://cluster.local/ns/shop/sa/web-before";
const NO_RETRIES: &str = r#"{"apiVersion": "palisade.dev/v1", "kind": "TrafficPolicy",
 "metadata": {"name": "before-issue-28", "namespace": "shop"},
 "spec": {"target": {"identities": ["spiffe://cluster.local/ns/shop/sa/web-before"]},
          "routes": [{"match": {"service": "orders.shop"}, "retry": {"attempts": 1}}]}}"#;

/// What one caller saw in one scenario.
#[derive(Debug)]
struct Measured {
    requests: u64,
    errors: u64,
    p50_ms: f64,
    p99_ms: f64,
    /// Requests the odd instance (the first) received, as a share of all the apps received.
    odd_share: f64,
}

/// One scenario: how the first instance behaves (the others are healthy).
#[derive(Debug, Clone, Copy)]
enum Scenario {
    Healthy,
    Slow,
    Failing,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Slow => "1 of 5 slow (+50 ms)",
            Self::Failing => "1 of 5 failing (50% 503)",
        }
    }

    fn set(self, odd: &Behaviour) {
        odd.delay_ms.store(if matches!(self, Self::Slow) { 50 } else { 0 }, Ordering::SeqCst);
        odd.fail(if matches!(self, Self::Failing) { 50 } else { 0 }, 503);
    }
}

pub(super) async fn run(secs: u64, concurrency: usize) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path();
    let bins = palisade_tests::bin_dir();
    eprintln!(
        "binaries: {} ({})",
        bins.display(),
        if bins.ends_with("release") { "release" } else { "NOT a release build" }
    );
    let cp = ControlPlane::start(&dir.join("data"), dir, &["--log", "warn", "--default-policy", "allow-authenticated"])
        .await?;
    let mut apps = Vec::new();
    let mut instances = Vec::new();
    for i in 0..INSTANCES {
        let app = HttpApp::start_with(Arc::default()).await;
        let args = ["--app", &app.addr.to_string(), "--log", "warn"];
        instances.push(Sidecar::meshed(&format!("orders-{i}"), &cp, dir, ORDERS, &args).await?);
        apps.push(app);
    }
    let policy = dir.join("no-retries.json");
    std::fs::write(&policy, NO_RETRIES)?;
    let out = cp.ctl(&["policy", "apply", "-f", &policy.to_string_lossy()]);
    anyhow::ensure!(out.status.success(), "policy apply: {}", String::from_utf8_lossy(&out.stderr));
    eprintln!("{INSTANCES} instances of orders; {secs} s per case, {concurrency} connections, 1 s warm-up");

    let mut rows = Vec::new();
    for scenario in [Scenario::Healthy, Scenario::Slow, Scenario::Failing] {
        scenario.set(&apps[0].behaviour);
        for mode in MODES {
            let port = free_port();
            let (identity, balance) = if mode == "before" { (BEFORE, "round-robin") } else { (WEB, mode) };
            let caller = Sidecar::meshed(
                &format!("web-{mode}"),
                &cp,
                dir,
                identity,
                &["--upstream", &format!("127.0.0.1:{port}=orders.shop"), "--balance", balance, "--log", "warn"],
            )
            .await?;
            eventually("the caller's directory lists every instance", Duration::from_secs(20), || async {
                (caller.metric("palisade_directory_endpoints").await? >= INSTANCES as f64).then_some(())
            })
            .await?;
            let _ = closed_loop(port, concurrency, Duration::from_secs(1)).await?;
            let before: Vec<usize> = apps.iter().map(|a| a.requests.load(Ordering::SeqCst)).collect();
            let (hist, errors) = closed_loop(port, concurrency, Duration::from_secs(secs)).await?;
            let got: Vec<usize> =
                apps.iter().zip(&before).map(|(a, b)| a.requests.load(Ordering::SeqCst) - b).collect();
            let all: usize = got.iter().sum();
            rows.push((
                scenario,
                mode,
                Measured {
                    requests: hist.len() + errors,
                    errors,
                    p50_ms: super::ms(&hist, 0.5),
                    p99_ms: super::ms(&hist, 0.99),
                    odd_share: got[0] as f64 / all.max(1) as f64,
                },
            ));
            eprintln!("done: {} / {mode}", scenario.name());
        }
    }
    print_table(&rows, secs);
    drop(instances);
    drop(cp);
    Ok(())
}

fn print_table(rows: &[(Scenario, &str, Measured)], secs: u64) {
    println!("machine: {}", super::machine());
    println!(
        "{:<26} {:<12} {:>8} {:>8} {:>8} {:>8} {:>10}",
        "scenario", "balance", "req/s", "p50 ms", "p99 ms", "errors", "odd share"
    );
    for (s, mode, m) in rows {
        let share = format!("{:.1}%", m.odd_share * 100.0);
        println!(
            "{:<26} {:<12} {:>8.0} {:>8.2} {:>8.2} {:>7.2}% {:>10}",
            s.name(),
            mode,
            m.requests as f64 / secs as f64,
            m.p50_ms,
            m.p99_ms,
            m.errors as f64 * 100.0 / m.requests.max(1) as f64,
            share
        );
    }
    // Ratios: each p99 against the healthy service's with the same balancing,
    // and peak-EWMA's against round robin's in the same scenario.
    let p99 = |s: &str, mode: &str| rows.iter().find(|r| r.0.name() == s && r.1 == mode).map(|r| r.2.p99_ms);
    println!("p99 ratios:");
    for s in [Scenario::Slow, Scenario::Failing] {
        let (s, h) = (s.name(), Scenario::Healthy.name());
        if let (Some(b), Some(rr), Some(ew), Some(b_h), Some(rr_h), Some(ew_h)) =
            (p99(s, MODES[0]), p99(s, MODES[1]), p99(s, MODES[2]), p99(h, MODES[0]), p99(h, MODES[1]), p99(h, MODES[2]))
        {
            println!(
                "  {s:<26} vs healthy: before {:.1}x, round-robin {:.1}x, peak-ewma {:.1}x; peak-ewma / before {:.2}",
                b / b_h,
                rr / rr_h,
                ew / ew_h,
                ew / b
            );
        }
    }
    println!("(\"odd share\": the requests the slow or failing instance received; a fifth is 20%)");
}

/// `conns` keep-alive connections sending GETs back to back for `dur`:
/// the latency of each answer 200, and the count of the others.
async fn closed_loop(port: u16, conns: usize, dur: Duration) -> Result<(Histogram<u64>, u64)> {
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new(3).expect("invariant: 3 significant figures is valid");
            let mut errors = 0u64;
            let mut c = connect(port).await?;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let req = hyper::Request::get("/hello").header("host", "orders.shop").body(Empty::<Bytes>::new())?;
                let ok = match c.send_request(req).await {
                    Ok(resp) => {
                        let status = resp.status();
                        resp.into_body().collect().await.is_ok() && status == 200
                    }
                    Err(_) => {
                        c = connect(port).await?;
                        false
                    }
                };
                if ok {
                    h.record(started.elapsed().as_micros() as u64)?;
                } else {
                    errors += 1;
                }
            }
            anyhow::Ok((h, errors))
        }));
    }
    tokio::time::sleep(dur).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Histogram::<u64>::new(3)?;
    let mut errors = 0;
    for t in tasks {
        let (h, e) = t.await.context("a load task panicked")??;
        all.add(h)?;
        errors += e;
    }
    Ok((all, errors))
}

async fn connect(port: u16) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    tcp.set_nodelay(true)?;
    let (s, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(s)
}
