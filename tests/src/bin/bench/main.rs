//! `palisade-bench`: the cost of the mesh against a direct connection,
//! measured in one run on this machine.
//!
//! It starts a control plane, a small HTTP/1.1 upstream app (a child process),
//! a server sidecar in front of the app and a client sidecar with an explicit
//! upstream, all from the same build, then drives HTTP/1.1 keep-alive
//! requests with an embedded load generator:
//! - max throughput, closed loop, direct (load -> app) and mesh
//!   (load -> client sidecar -> mTLS/HTTP2 -> server sidecar -> app);
//! - latency p50/p99/p99.9 at a fixed open-loop rate, measured from each
//!   request's intended start (corrected for coordinated omission);
//! - each sidecar's RSS idle and under load, and CPU seconds per 1000 requests.
//!
//! Run it with `./scripts/bench.sh [--json FILE]` (release build).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use hdrhistogram::Histogram;
use http_body_util::{BodyExt, Either, Empty, Full};
use hyper_util::rt::TokioIo;
use palisade_tests::{ControlPlane, Sidecar, eventually, free_port};
use tokio::net::TcpStream;

#[derive(Debug)]
struct Args {
    json: Option<PathBuf>,
    duration: Duration,
    rate: u64,
    load_rate: u64,
    connections: usize,
}

fn parse_args() -> Result<Option<Args>> {
    let mut args = Args { json: None, duration: Duration::from_secs(10), rate: 1000, load_rate: 2000, connections: 32 };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        let mut val = || it.next().with_context(|| format!("{a} needs a value"));
        match a.as_str() {
            "app" => return Ok(None),
            "--json" => args.json = Some(PathBuf::from(val()?)),
            "--duration" => args.duration = humantime::parse_duration(&val()?)?,
            "--rate" => args.rate = val()?.parse()?,
            "--load-rate" => args.load_rate = val()?.parse()?,
            "--connections" => args.connections = val()?.parse()?,
            "-h" | "--help" => {
                println!(
                    "palisade-bench [--json FILE] [--duration 10s] [--rate 1000] [--load-rate 2000] [--connections 32]\n\
                     palisade-bench push [N] [--services S] [--churn PCT] [etcd] [rotate]   (a control plane with N simulated sidecars:\n\
                     \x20    join time and cost, bytes, change latency by kind, RSS and CPU; see `palisade-bench push --help`)\n\
                     palisade-bench instructions [N] [JSON]   (user-space instructions per request, under callgrind)\n\
                     palisade-bench mesh   (the set-up left running for wrk/strace/perf until stdin closes)\n\
                     palisade-bench authn [RATE] [SECONDS]   (server sidecar CPU per request: plain, JWT cached, JWT cold)\n\
                     palisade-bench authn instructions [N]   (the same three cases in instructions per request, under callgrind)\n\
                     palisade-bench traffic [RATE] [SECONDS]   (server sidecar CPU per 1 KB JSON POST: plain, with a TrafficPolicy: CORS, headers, schema)\n\
                     palisade-bench traffic instructions [N]   (the same two cases in instructions per request, under callgrind)\n\
                     palisade-bench trace [RATE] [SECONDS]   (both sidecars' CPU per request: plain, tracing at 1% and 100% to an OTLP receiver, access logs)\n\
                     palisade-bench trace instructions [N]   (the same four cases in instructions per request, under callgrind)\n\
                     palisade-bench resilience [SECONDS] [CONCURRENCY]   (caller p50/p99 and errors, 1 of 5 instances slow or failing, round-robin vs peak-ewma)\n\n\
                     Measures direct vs mesh: closed-loop max throughput, open-loop latency at --rate,\n\
                     sidecar RSS idle and at --load-rate, sidecar CPU per 1000 requests.\n\
                     Uses palisade-control-plane and palisade-sidecar next to this binary (or PALISADE_BIN_DIR)."
                );
                std::process::exit(0);
            }
            other => bail!("unknown argument {other:?}; see --help"),
        }
    }
    Ok(Some(args))
}

fn main() -> Result<()> {
    palisade_certs::install_default_provider();
    if std::env::args().nth(1).as_deref() == Some("push") {
        let opts = push::Opts::parse(std::env::args().skip(2))?;
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        return rt.block_on(push::run(opts));
    }
    if std::env::args().nth(1).as_deref() == Some("instructions") {
        let requests = std::env::args().nth(2).map(|s| s.parse()).transpose()?.unwrap_or(2000);
        let json = std::env::args().nth(3).map(PathBuf::from);
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        return rt.block_on(instructions(requests, json));
    }
    if std::env::args().nth(1).as_deref() == Some("authn") {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        if std::env::args().nth(2).as_deref() == Some("instructions") {
            let requests = std::env::args().nth(3).map(|s| s.parse()).transpose()?.unwrap_or(2000);
            return rt.block_on(authn::instructions(requests));
        }
        let rate = std::env::args().nth(2).map(|s| s.parse()).transpose()?.unwrap_or(1000);
        let secs = std::env::args().nth(3).map(|s| s.parse()).transpose()?.unwrap_or(10);
        return rt.block_on(authn::run(rate, Duration::from_secs(secs)));
    }
    if std::env::args().nth(1).as_deref() == Some("traffic") {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        if std::env::args().nth(2).as_deref() == Some("instructions") {
            let requests = std::env::args().nth(3).map(|s| s.parse()).transpose()?.unwrap_or(2000);
            return rt.block_on(traffic::instructions(requests));
        }
        let rate = std::env::args().nth(2).map(|s| s.parse()).transpose()?.unwrap_or(1000);
        let secs = std::env::args().nth(3).map(|s| s.parse()).transpose()?.unwrap_or(10);
        return rt.block_on(traffic::run(rate, Duration::from_secs(secs)));
    }
    if std::env::args().nth(1).as_deref() == Some("trace") {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        if std::env::args().nth(2).as_deref() == Some("instructions") {
            let requests = std::env::args().nth(3).map(|s| s.parse()).transpose()?.unwrap_or(2000);
            return rt.block_on(tracing_cost::instructions(requests));
        }
        let rate = std::env::args().nth(2).map(|s| s.parse()).transpose()?.unwrap_or(1000);
        let secs = std::env::args().nth(3).map(|s| s.parse()).transpose()?.unwrap_or(10);
        return rt.block_on(tracing_cost::run(rate, Duration::from_secs(secs)));
    }
    if std::env::args().nth(1).as_deref() == Some("resilience") {
        let secs = std::env::args().nth(2).map(|s| s.parse()).transpose()?.unwrap_or(10);
        let concurrency = std::env::args().nth(3).map(|s| s.parse()).transpose()?.unwrap_or(32);
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        return rt.block_on(balance::run(secs, concurrency));
    }
    if std::env::args().nth(1).as_deref() == Some("dashboard") {
        let n = std::env::args().nth(2).map(|s| s.parse()).transpose()?.unwrap_or(1000);
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        return rt.block_on(dashboard::run(n));
    }
    if std::env::args().nth(1).as_deref() == Some("mesh") {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        return rt.block_on(serve_mesh());
    }
    let Some(args) = parse_args()? else {
        return run_app();
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(bench(args))
}

/// The upstream app: a minimal HTTP/1.1 server on one thread, printing its port.
fn run_app() -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("{}", listener.local_addr()?.port());
        loop {
            let (tcp, _) = listener.accept().await?;
            let _ = tcp.set_nodelay(true);
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async {
                    // Read the body (empty for GET), so the connection stays reusable.
                    let _ = req.into_body().collect().await;
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                        Bytes::from_static(b"ok"),
                    )))
                });
                let _ = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(tcp), svc).await;
            });
        }
    })
}

#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
struct PathResult {
    rps: f64,
    p50_ms: f64,
    p99_ms: f64,
    p999_ms: f64,
}

/// What every request of the load generator looks like: a GET without a
/// body (the default), or what `palisade-bench traffic` sets.
static SHAPE: std::sync::OnceLock<Shape> = std::sync::OnceLock::new();

#[derive(Debug)]
struct Shape {
    body: Bytes,
    origin: &'static str,
}

/// GETs without a body (as before `traffic` existed), or `traffic`'s POSTs.
type Client = hyper::client::conn::http1::SendRequest<Either<Empty<Bytes>, Full<Bytes>>>;

async fn connect(addr: SocketAddr) -> Result<Client> {
    let tcp = TcpStream::connect(addr).await?;
    tcp.set_nodelay(true)?;
    let (s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    Ok(s)
}

async fn one(s: &mut Client) -> Result<()> {
    one_with(s, None).await
}

/// One request, with an `Authorization` value when given.
async fn one_with(s: &mut Client, auth: Option<&str>) -> Result<()> {
    s.ready().await?;
    let mut req = hyper::Request::get("/").header("host", "orders.shop");
    if let Some(a) = auth {
        req = req.header("authorization", a);
    }
    let req = match SHAPE.get() {
        None => req.body(Either::Left(Empty::new()))?,
        Some(shape) => req
            .method("POST")
            .uri("/orders")
            .header("content-type", "application/json")
            .header("origin", shape.origin)
            .body(Either::Right(Full::new(shape.body.clone())))?,
    };
    let resp = s.send_request(req).await?;
    if resp.status() != 200 {
        bail!("status {}", resp.status());
    }
    resp.into_body().collect().await?;
    Ok(())
}

/// Closed loop: `conns` connections, each sending back-to-back; returns requests/s.
async fn closed_loop(addr: SocketAddr, conns: usize, dur: Duration) -> Result<f64> {
    let done = Arc::new(AtomicU64::new(0));
    let errors = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..conns {
        let mut s = connect(addr).await?;
        let (done, errors, stop) = (done.clone(), errors.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match one(&mut s).await {
                    Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                    Err(_) => errors.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let start = Instant::now();
    tokio::time::sleep(dur).await;
    stop.store(true, Ordering::Relaxed);
    let n = done.load(Ordering::Relaxed);
    let elapsed = start.elapsed();
    for t in tasks {
        let _ = t.await;
    }
    let e = errors.load(Ordering::Relaxed);
    if e > 0 {
        eprintln!("warning: {e} errors in the closed-loop run against {addr}");
    }
    Ok(n as f64 / elapsed.as_secs_f64())
}

/// Open loop at `rate`: requests are due at fixed intervals whatever the
/// responses do; latency counts from the due time (coordinated omission).
async fn open_loop(addr: SocketAddr, rate: u64, conns: usize, dur: Duration) -> Result<(Histogram<u64>, u64)> {
    open_loop_with(addr, rate, conns, dur, Arc::new(Vec::new())).await
}

/// [`open_loop`] with request credentials: none (empty), one reused for every
/// request, or a different one for each (taken in turn).
async fn open_loop_with(
    addr: SocketAddr,
    rate: u64,
    conns: usize,
    dur: Duration,
    auth: Arc<Vec<String>>,
) -> Result<(Histogram<u64>, u64)> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Instant>(100_000);
    let next = Arc::new(AtomicU64::new(0));
    let rx = Arc::new(tokio::sync::Mutex::new(rx));
    let mut workers = Vec::new();
    for _ in 0..conns {
        let mut s = connect(addr).await?;
        let (rx, auth, next) = (rx.clone(), auth.clone(), next.clone());
        workers.push(tokio::spawn(async move {
            let mut h = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("invariant: valid bounds");
            let mut errors = 0u64;
            loop {
                let due = { rx.lock().await.recv().await };
                let Some(due) = due else { break };
                let credential = match auth.len() {
                    0 => None,
                    n => Some(auth[next.fetch_add(1, Ordering::Relaxed) as usize % n].as_str()),
                };
                if one_with(&mut s, credential).await.is_err() {
                    errors += 1;
                }
                let _ = h.record(due.elapsed().as_micros().max(1) as u64);
            }
            (h, errors)
        }));
    }
    // Pace on a dedicated OS thread: tokio's timer has 1 ms granularity,
    // which would add up to 1 ms of scheduling error to every sample.
    let interval = Duration::from_secs_f64(1.0 / rate as f64);
    let total = (dur.as_secs_f64() * rate as f64) as u64;
    let pacer = std::thread::spawn(move || {
        let start = Instant::now();
        for i in 0..total {
            let due = start + interval.mul_f64(i as f64);
            loop {
                let now = Instant::now();
                if now >= due {
                    break;
                }
                let left = due - now;
                if left > Duration::from_micros(200) {
                    std::thread::sleep(left - Duration::from_micros(100));
                } else {
                    std::hint::spin_loop();
                }
            }
            if tx.blocking_send(due).is_err() {
                break;
            }
        }
    });
    tokio::task::spawn_blocking(move || pacer.join()).await?.map_err(|_| anyhow::anyhow!("pacer thread panicked"))?;
    let mut all = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut errors = 0;
    for w in workers {
        let (h, e) = w.await?;
        all.add(h)?;
        errors += e;
    }
    Ok((all, errors))
}

fn ms(h: &Histogram<u64>, q: f64) -> f64 {
    h.value_at_quantile(q) as f64 / 1000.0
}

fn cpu_seconds(pid: u32) -> f64 {
    let ticks = 100.0; // CLK_TCK on Linux
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            Some((f[11].parse::<f64>().ok()? + f[12].parse::<f64>().ok()?) / ticks)
        })
        .unwrap_or(0.0)
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    format!("{cores} cores, {cpu}")
}

/// The measured set-up: a control plane with an ALLOW policy, the app (a
/// child process), a server sidecar in front of it and a client sidecar
/// with an upstream to it, every sidecar run under `wrapper` (empty: directly).
struct Mesh {
    // Kept running for the sidecars' renewals and config streams.
    _cp: ControlPlane,
    app_addr: SocketAddr,
    app_pid: u32,
    _app: AppGuard,
    server: Sidecar,
    client: Sidecar,
    mesh_addr: SocketAddr,
    // Last: the processes above are stopped before their directory goes.
    _tmp: tempfile::TempDir,
}

async fn mesh(tmp: tempfile::TempDir, wrapper: &[&str]) -> Result<Mesh> {
    mesh_with(tmp, wrapper, &[]).await
}

/// [`mesh`] with more flags for both sidecars.
async fn mesh_with(tmp: tempfile::TempDir, wrapper: &[&str], extra: &[&str]) -> Result<Mesh> {
    let dir = tmp.path();
    let bins = palisade_tests::bin_dir();
    eprintln!(
        "binaries: {} ({})",
        bins.display(),
        if bins.ends_with("release") { "release" } else { "NOT a release build" }
    );
    let cp = ControlPlane::start(&dir.join("data"), dir, &["--log", "warn"]).await?;

    let mut app_cmd = Command::new(std::env::current_exe()?);
    app_cmd.arg("app").stdout(Stdio::piped());
    let mut app = app_cmd.spawn()?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(app.stdout.take().context("app stdout")?), &mut line)?;
    let app_addr: SocketAddr = format!("127.0.0.1:{}", line.trim()).parse()?;
    let app_pid = app.id();
    let app = AppGuard(app);

    // A real ALLOW policy, so every mesh request is authorized as in production.
    let policy = dir.join("allow.yaml");
    std::fs::write(
        &policy,
        "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: web-to-orders, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}\n  action: ALLOW\n  rules:\n    - from: [{identities: [\"spiffe://cluster.local/ns/shop/sa/web\"]}]\n      to: [{methods: [\"GET\"]}]\n",
    )?;
    let out = cp.ctl(&["policy", "apply", "-f", policy.to_str().context("path")?]);
    if !out.status.success() {
        bail!("policy apply failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let quiet = [&["--log", "warn"][..], extra].concat();
    let server = Sidecar::meshed_under(
        wrapper,
        "bench-server",
        &cp,
        dir,
        "spiffe://cluster.local/ns/shop/sa/orders",
        &[&["--app", &app_addr.to_string()][..], &quiet].concat(),
    )
    .await?;
    let port = free_port();
    let client = Sidecar::meshed_under(
        wrapper,
        "bench-client",
        &cp,
        dir,
        "spiffe://cluster.local/ns/shop/sa/web",
        &[&["--upstream", &format!("127.0.0.1:{port}=orders.shop")][..], &quiet].concat(),
    )
    .await?;
    eventually("directory", Duration::from_secs(60), || async {
        (client.metric("palisade_directory_endpoints").await? >= 1.0).then_some(())
    })
    .await?;
    let mesh_addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    Ok(Mesh { _cp: cp, app_addr, app_pid, _app: app, server, client, mesh_addr, _tmp: tmp })
}

async fn bench(args: Args) -> Result<()> {
    let m = mesh(tempfile::tempdir()?, &[]).await?;
    let (app_addr, app_pid, mesh_addr, server, client) = (m.app_addr, m.app_pid, m.mesh_addr, &m.server, &m.client);
    let pids = [server.proc.child.id(), client.proc.child.id()];
    let idle = pids.map(palisade_tests::rss_kb);

    // Warm up both paths (connections, pools, TLS).
    closed_loop(app_addr, 4, Duration::from_secs(1)).await?;
    closed_loop(mesh_addr, 4, Duration::from_secs(1)).await?;

    eprintln!("closed loop, {} connections, {:?} each path...", args.connections, args.duration);
    let direct_rps = closed_loop(app_addr, args.connections, args.duration).await?;
    let mesh_rps = closed_loop(mesh_addr, args.connections, args.duration).await?;

    eprintln!("open loop at {} rps, {:?} each path...", args.rate, args.duration);
    let app_cpu0 = cpu_seconds(app_pid);
    let (direct_h, de) = open_loop(app_addr, args.rate, args.connections, args.duration).await?;
    let app_cpu = (cpu_seconds(app_pid) - app_cpu0) / ((args.duration.as_secs_f64() * args.rate as f64) / 1000.0);
    let cpu0 = pids.map(cpu_seconds);
    let (mesh_h, me) = open_loop(mesh_addr, args.rate, args.connections, args.duration).await?;
    let cpu1 = pids.map(cpu_seconds);
    let reqs = (args.duration.as_secs_f64() * args.rate as f64) / 1000.0;
    let cpu_rate = [(cpu1[0] - cpu0[0]) / reqs, (cpu1[1] - cpu0[1]) / reqs];

    eprintln!("open loop at {} rps on the mesh for RSS and CPU under load...", args.load_rate);
    let peak = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (peak, sampling) = (peak.clone(), sampling.clone());
        tokio::spawn(async move {
            while sampling.load(Ordering::Relaxed) {
                for (i, pid) in pids.iter().enumerate() {
                    peak[i].fetch_max(palisade_tests::rss_kb(*pid), Ordering::Relaxed);
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let c0 = pids.map(cpu_seconds);
    let (load_h, le) = open_loop(mesh_addr, args.load_rate, args.connections, args.duration).await?;
    let c1 = pids.map(cpu_seconds);
    sampling.store(false, Ordering::Relaxed);
    sampler.await?;
    let load_reqs = (args.duration.as_secs_f64() * args.load_rate as f64) / 1000.0;
    let load_cpu = [(c1[0] - c0[0]) / load_reqs, (c1[1] - c0[1]) / load_reqs];
    let peak = [peak[0].load(Ordering::Relaxed), peak[1].load(Ordering::Relaxed)];
    if de + me + le > 0 {
        eprintln!("warning: errors in open-loop runs: direct {de}, mesh {me}, load {le}");
    }

    let direct = PathResult {
        rps: direct_rps,
        p50_ms: ms(&direct_h, 0.5),
        p99_ms: ms(&direct_h, 0.99),
        p999_ms: ms(&direct_h, 0.999),
    };
    let mesh =
        PathResult { rps: mesh_rps, p50_ms: ms(&mesh_h, 0.5), p99_ms: ms(&mesh_h, 0.99), p999_ms: ms(&mesh_h, 0.999) };
    let cpu_per_1k = cpu_rate[0].max(cpu_rate[1]).max(load_cpu[0]).max(load_cpu[1]);
    let out = serde_json::json!({
        "machine": machine(),
        "duration_s": args.duration.as_secs_f64(),
        "connections": args.connections,
        "direct": direct,
        "mesh": mesh,
        "rate_rps": args.rate,
        "load_rate_rps": args.load_rate,
        "throughput_ratio": mesh_rps / direct_rps,
        "added_p50_ms": mesh.p50_ms - direct.p50_ms,
        "added_p99_ms": mesh.p99_ms - direct.p99_ms,
        "added_p999_ms": mesh.p999_ms - direct.p999_ms,
        "mesh_at_load_rate": {"p50_ms": ms(&load_h, 0.5), "p99_ms": ms(&load_h, 0.99), "p999_ms": ms(&load_h, 0.999)},
        "sidecar_rss_idle_kb": idle[0].max(idle[1]),
        "sidecar_rss_load_kb": peak[0].max(peak[1]),
        "sidecar_cpu_s_per_1k_req": cpu_per_1k,
        // Calibration: what the minimal upstream app itself costs per request on this machine.
        "app_cpu_s_per_1k_req_direct": app_cpu,
        "per_sidecar": {
            "server": {"rss_idle_kb": idle[0], "rss_load_kb": peak[0], "cpu_s_per_1k_req_at_rate": cpu_rate[0], "cpu_s_per_1k_req_at_load_rate": load_cpu[0]},
            "client": {"rss_idle_kb": idle[1], "rss_load_kb": peak[1], "cpu_s_per_1k_req_at_rate": cpu_rate[1], "cpu_s_per_1k_req_at_load_rate": load_cpu[1]},
        },
    });
    println!("machine: {}", machine());
    println!("{:<34} {:>12} {:>12} {:>12}", "", "direct", "mesh", "mesh/direct");
    println!(
        "{:<34} {:>12.0} {:>12.0} {:>11.1}%",
        "max throughput (rps, closed loop)",
        direct.rps,
        mesh.rps,
        100.0 * mesh.rps / direct.rps
    );
    for (name, d, m) in [
        ("p50", direct.p50_ms, mesh.p50_ms),
        ("p99", direct.p99_ms, mesh.p99_ms),
        ("p99.9", direct.p999_ms, mesh.p999_ms),
    ] {
        println!(
            "{:<34} {:>12.3} {:>12.3} {:>+11.3} ms",
            format!("latency {name} at {} rps (ms)", args.rate),
            d,
            m,
            m - d
        );
    }
    println!("{:<34} {:>12} {:>12}", "sidecar RSS idle (KB)", format!("srv {}", idle[0]), format!("cli {}", idle[1]));
    println!(
        "{:<34} {:>12} {:>12}",
        format!("sidecar RSS at {} rps (KB)", args.load_rate),
        format!("srv {}", peak[0]),
        format!("cli {}", peak[1])
    );
    println!(
        "{:<34} {:>12} {:>12}",
        "sidecar CPU s / 1000 req",
        format!("srv {:.4}", cpu_rate[0].max(load_cpu[0])),
        format!("cli {:.4}", cpu_rate[1].max(load_cpu[1]))
    );
    println!("{:<34} {:>12.4}", "app CPU s / 1000 req (direct)", app_cpu);
    if let Some(p) = args.json {
        std::fs::write(&p, serde_json::to_vec_pretty(&out)?)?;
        eprintln!("wrote {}", p.display());
    }
    Ok(())
}

struct AppGuard(std::process::Child);

/// `requests` requests over 4 keep-alive connections, each connection
/// sending back-to-back: a fixed workload, the same every run.
async fn fixed(addr: SocketAddr, requests: u64) -> Result<()> {
    fixed_with(addr, requests, Arc::new(Vec::new())).await
}

/// [`fixed`] with request credentials (see [`open_loop_with`]).
async fn fixed_with(addr: SocketAddr, requests: u64, auth: Arc<Vec<String>>) -> Result<()> {
    let per = requests.div_ceil(4);
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..4 {
        let mut s = connect(addr).await?;
        let (auth, next) = (auth.clone(), next.clone());
        tasks.push(tokio::spawn(async move {
            for _ in 0..per {
                let credential = match auth.len() {
                    0 => None,
                    n => Some(auth[next.fetch_add(1, Ordering::Relaxed) as usize % n].as_str()),
                };
                one_with(&mut s, credential).await?;
            }
            Ok::<_, anyhow::Error>(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(())
}

/// The Ir of a callgrind dump: the sum of its self-cost lines (`LINE COST`,
/// or `+N COST` / `-N COST` / `* COST` with compressed positions), leaving
/// out the inclusive costs of calls (the line after `calls=`).
fn callgrind_cost(text: &str) -> Option<u64> {
    let mut total = 0u64;
    let mut after_calls = false;
    let mut any = false;
    for line in text.lines() {
        if line.starts_with("calls=") {
            after_calls = true;
            continue;
        }
        let first = line.chars().next();
        let is_cost = matches!(first, Some('0'..='9' | '+' | '-' | '*'));
        if is_cost {
            if !after_calls {
                let mut parts = line.split_whitespace();
                let _position = parts.next();
                total += parts.next().and_then(|c| c.parse::<u64>().ok()).unwrap_or(0);
                any = true;
            }
            after_calls = false;
        }
    }
    any.then_some(total)
}

/// `palisade-bench instructions [REQUESTS] [JSON]`: user-space instructions
/// per request of each sidecar (valgrind callgrind), counted only while the
/// fixed workload runs. Instruction counts do not depend on what else the
/// machine is doing, so a change's effect shows without timing noise.
/// `palisade-bench mesh`: the measured set-up, left running for outside
/// tools (wrk, strace, perf) until stdin closes; prints where it is.
async fn serve_mesh() -> Result<()> {
    let tmp = tempfile::Builder::new().prefix("palisade-mesh-").tempdir()?;
    let m = mesh(tmp, &[]).await?;
    println!(
        "mesh={} app={} client_pid={} server_pid={}",
        m.mesh_addr,
        m.app_addr,
        m.client.proc.child.id(),
        m.server.proc.child.id()
    );
    tokio::task::spawn_blocking(|| std::io::copy(&mut std::io::stdin(), &mut std::io::sink())).await??;
    Ok(())
}

/// A mesh whose sidecars run under callgrind, instrumentation off until asked.
async fn mesh_under_callgrind() -> Result<(Mesh, PathBuf)> {
    mesh_under_callgrind_with(&[]).await
}

/// [`mesh_under_callgrind`] with more flags for both sidecars.
async fn mesh_under_callgrind_with(extra: &[&str]) -> Result<(Mesh, PathBuf)> {
    for tool in ["valgrind", "callgrind_control"] {
        if Command::new(tool).arg("--version").output().is_err() {
            bail!("{tool} is not installed (apt-get install valgrind)");
        }
    }
    let tmp = tempfile::Builder::new().prefix("palisade-instructions-").tempdir()?;
    let dir = tmp.path().to_path_buf();
    let out_file = format!("--callgrind-out-file={}/callgrind.%p", dir.display());
    let wrapper = ["valgrind", "--tool=callgrind", "--instr-atstart=no", out_file.as_str()];
    Ok((mesh_with(tmp, &wrapper, extra).await?, dir))
}

/// User-space instructions per request of each sidecar (client, server)
/// while `requests` requests run with the credentials `auth` (see
/// [`open_loop_with`]).
async fn count_ir(m: &Mesh, dir: &std::path::Path, requests: u64, auth: Arc<Vec<String>>) -> Result<[f64; 2]> {
    let sides = [("client", m.client.proc.child.id()), ("server", m.server.proc.child.id())];
    let control = |args: &[&str], pid: u32| -> Result<()> {
        let out = Command::new("callgrind_control").args(args).arg(pid.to_string()).output()?;
        if std::env::var_os("PALISADE_BENCH_DEBUG").is_some() {
            eprintln!(
                "callgrind_control {args:?} {pid}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if !out.status.success() {
            bail!("callgrind_control {args:?} {pid}: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    };
    let before: Vec<usize> = sides.iter().map(|(_, pid)| dumps(dir, *pid).len()).collect();
    for (_, pid) in sides {
        control(&["-i", "on"], pid)?;
    }
    fixed_with(m.mesh_addr, requests, auth).await?;
    for (_, pid) in sides {
        control(&["-i", "off"], pid)?;
        control(&["-d"], pid)?;
    }
    let mut out = [0.0; 2];
    for (i, (side, pid)) in sides.iter().enumerate() {
        let all = dumps(dir, *pid);
        let dump = all
            .get(before[i]..)
            .and_then(|new| new.last())
            .with_context(|| format!("no new callgrind dump for the {side} sidecar"))?;
        let text = std::fs::read_to_string(dump)?;
        if std::env::var_os("PALISADE_BENCH_DEBUG").is_some() {
            eprintln!("{}: {}", dump.display(), text.lines().take(30).collect::<Vec<_>>().join("\n"));
        }
        // `summary:` counts from the last zeroing, which instrumentation
        // toggles do not move; the cost lines are what ran instrumented.
        let total = callgrind_cost(&text).with_context(|| format!("{}: no cost lines", dump.display()))?;
        out[i] = total as f64 / requests as f64;
    }
    Ok(out)
}

/// The callgrind dumps of process `pid`, oldest first.
fn dumps(dir: &std::path::Path, pid: u32) -> Vec<PathBuf> {
    let prefix = format!("callgrind.{pid}.");
    let mut all: Vec<(u64, PathBuf)> = std::fs::read_dir(dir)
        .map(|it| {
            it.filter_map(|e| e.ok().map(|e| e.path()))
                .filter_map(|p| {
                    let n = p.file_name()?.to_str()?.strip_prefix(&prefix)?.parse().ok()?;
                    Some((n, p))
                })
                .collect()
        })
        .unwrap_or_default();
    all.sort();
    all.into_iter().map(|(_, p)| p).collect()
}

async fn instructions(requests: u64, json: Option<PathBuf>) -> Result<()> {
    // PALISADE_BENCH_KEEP=1 keeps the dumps for callgrind_annotate.
    let keep = std::env::var_os("PALISADE_BENCH_KEEP").is_some();
    let (m, dir) = mesh_under_callgrind().await?;
    // PALISADE_BENCH_TAP=deny: with a tap of refusals open, as a running
    // `palisadectl dashboard` holds one (none of these requests is refused).
    let _tap = match std::env::var("PALISADE_BENCH_TAP") {
        Ok(decision) => {
            let tap = tokio::process::Command::new(palisade_tests::bin("palisadectl"))
                .env("PALISADE_CONTROL_PLANE", &m._cp.addr)
                .env("PALISADE_CREDENTIALS", m._cp.admin_dir())
                .args(["tap", "--decision", &decision, "-o", "json"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .spawn()?;
            eventually("the tap to reach both sidecars", Duration::from_secs(60), || async {
                let client = m.client.metric("palisade_taps_active").await;
                let server = m.server.metric("palisade_taps_active").await;
                (client == Some(1.0) && server == Some(1.0)).then_some(())
            })
            .await?;
            println!("with a tap of `--decision {decision}` open on both sidecars");
            Some(tap)
        }
        Err(_) => None,
    };
    // Warm-up: connections, pools, TLS sessions, lazily built state.
    fixed(m.mesh_addr, 200).await?;
    let start = Instant::now();
    let [client, server] = count_ir(&m, &dir, requests, Arc::new(Vec::new())).await?;
    let took = start.elapsed();
    println!(
        "user-space instructions per request (callgrind Ir, {requests} requests over 4 connections, {took:.1?} under valgrind):"
    );
    println!("  client sidecar  {client:>10.0}");
    println!("  server sidecar  {server:>10.0}");
    let total = client + server;
    println!("  both        {total:>10.0}");
    if let Some(path) = json {
        let v = serde_json::json!({
            "requests": requests,
            "client_ir_per_request": client,
            "server_ir_per_request": server,
            "total_ir_per_request": total,
        });
        std::fs::write(path, serde_json::to_string_pretty(&v)?)?;
    }
    if keep {
        drop(m.client);
        drop(m.server);
        eprintln!("callgrind dumps kept in {}", m._tmp.keep().display());
    }
    Ok(())
}
impl Drop for AppGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

mod balance;
mod dashboard;
mod push;

#[cfg(test)]
mod tests {
    #[test]
    fn callgrind_cost_sums_self_costs_not_call_costs() {
        let dump = "events: Ir\nsummary: 0\n\nob=(1) x\nfl=(1) a.c\nfn=(1) f\n10 100\n+2 50\ncfn=(2) g\ncalls=3 20\n* 9999\n-1 7\nfn=(2) g\n20 30\ntotals: 0\n";
        assert_eq!(super::callgrind_cost(dump), Some(100 + 50 + 7 + 30));
        assert_eq!(super::callgrind_cost("events: Ir\n"), None);
    }
}

/// The cost of request authentication at the callee's sidecar: its CPU per
/// request on the plain mesh path, with one ES256 token reused (verified
/// once, then from the cache), and with a new token on every request (a
/// signature check each time), at the same open-loop rate.
mod authn {
    use super::*;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use ring::rand::SystemRandom;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};

    const ISS: &str = "https://idp.bench";

    fn policy(jwks: &serde_json::Value) -> String {
        format!(
            "apiVersion: palisade.dev/v1\nkind: AuthenticationPolicy\nmetadata: {{name: bench, namespace: shop}}\nspec:\n  target: {{identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}}\n  jwt: [{{issuer: \"{ISS}\", audiences: [orders], jwks: {jwks}}}]\n---\napiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: web-to-orders, namespace: shop}}\nspec:\n  target: {{identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}}\n  action: ALLOW\n  rules:\n    - from: [{{identities: [\"spiffe://cluster.local/ns/shop/sa/web\"], requestPrincipals: [\"{ISS}/*\"]}}]\n      to: [{{methods: [\"GET\"]}}]\n      when: [{{claim: scope, values: [orders.read]}}]\n"
        )
    }

    /// The issuer's key set, and a minter of tokens for client `n`.
    struct Issuer {
        jwks: serde_json::Value,
        key: EcdsaKeyPair,
        exp: u64,
    }

    impl Issuer {
        fn new() -> Result<Self> {
            let rng = SystemRandom::new();
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            let p = key.public_key().as_ref();
            let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "b1", "x": B64.encode(&p[1..33]), "y": B64.encode(&p[33..65])}]});
            let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() + 3600;
            Ok(Self { jwks, key, exp })
        }

        fn mint(&self, n: u64) -> Result<String> {
            let header = B64.encode(br#"{"alg":"ES256","kid":"b1","typ":"JWT"}"#);
            let claims = serde_json::json!({"iss": ISS, "sub": format!("client-{n}"), "aud": "orders", "exp": self.exp, "scope": "orders.read", "jti": n});
            let input = format!("{header}.{}", B64.encode(claims.to_string()));
            let sig = self.key.sign(&SystemRandom::new(), input.as_bytes()).map_err(|e| anyhow::anyhow!("{e}"))?;
            Ok(format!("Bearer {input}.{}", B64.encode(sig.as_ref())))
        }

        fn apply(&self, m: &Mesh) -> Result<()> {
            let f = m._tmp.path().join("bench-authn.yaml");
            std::fs::write(&f, policy(&self.jwks))?;
            let out = m._cp.ctl(&["policy", "apply", "-f", f.to_str().context("path")?, "--wait", "60s"]);
            if !out.status.success() {
                bail!("policy apply failed: {}", String::from_utf8_lossy(&out.stderr));
            }
            Ok(())
        }
    }

    /// Instructions per request (callgrind) for the same three cases.
    pub(super) async fn instructions(requests: u64) -> Result<()> {
        let issuer = Issuer::new()?;
        let (m, dir) = mesh_under_callgrind().await?;
        fixed(m.mesh_addr, 200).await?;
        eprintln!("plain mesh path, {requests} requests under callgrind ...");
        let plain = count_ir(&m, &dir, requests, Arc::new(Vec::new())).await?;
        issuer.apply(&m)?;
        let cached_token = Arc::new(vec![issuer.mint(0)?]);
        fixed_with(m.mesh_addr, 8, cached_token.clone()).await?;
        eprintln!("one token reused (cached) ...");
        let cached = count_ir(&m, &dir, requests, cached_token).await?;
        let tokens: Vec<String> = (1..=requests).map(|n| issuer.mint(n)).collect::<Result<_>>()?;
        eprintln!("a new token on every request (cold) ...");
        let cold = count_ir(&m, &dir, requests, Arc::new(tokens)).await?;
        println!("user-space instructions per request (callgrind Ir), {requests} requests over 4 connections:");
        println!("{:<28} {:>14} {:>14} {:>14}", "", "client sidecar", "server sidecar", "server added");
        for (name, r) in [("plain mesh path", plain), ("JWT, cached token", cached), ("JWT, new token each time", cold)]
        {
            println!("{:<28} {:>14.0} {:>14.0} {:>+14.0}", name, r[0], r[1], r[1] - plain[1]);
        }
        if std::env::var_os("PALISADE_BENCH_KEEP").is_some() {
            drop(m.client);
            drop(m.server);
            eprintln!("callgrind dumps (one per case, in order) kept in {}", m._tmp.keep().display());
        }
        Ok(())
    }

    pub(super) async fn run(rate: u64, dur: Duration) -> Result<()> {
        let issuer = Issuer::new()?;
        let m = mesh(tempfile::tempdir()?, &[]).await?;
        let server = m.server.proc.child.id();
        let measure = |auth: Arc<Vec<String>>| async move {
            // Warm up connections and pools with the case's first credential.
            let first = Arc::new(auth.iter().take(1).cloned().collect::<Vec<_>>());
            open_loop_with(m.mesh_addr, 200, 4, Duration::from_millis(500), first).await?;
            let c0 = cpu_seconds(server);
            let (h, errors) = open_loop_with(m.mesh_addr, rate, 16, dur, auth).await?;
            let per_request_us = (cpu_seconds(server) - c0) / (dur.as_secs_f64() * rate as f64) * 1e6;
            anyhow::Ok((per_request_us, ms(&h, 0.5), ms(&h, 0.99), errors))
        };
        eprintln!("plain mesh path at {rate} rps for {dur:?}...");
        let plain = measure(Arc::new(Vec::new())).await?;
        issuer.apply(&m)?;
        eprintln!("one token reused (cached) ...");
        let cached = measure(Arc::new(vec![issuer.mint(0)?])).await?;
        let n = (dur.as_secs_f64() * rate as f64) as u64 + 1;
        eprintln!("minting {n} distinct tokens ...");
        let tokens: Vec<String> = (1..=n).map(|i| issuer.mint(i)).collect::<Result<_>>()?;
        eprintln!("a new token on every request (cold) ...");
        let cold = measure(Arc::new(tokens)).await?;
        println!("machine: {}", machine());
        println!("server sidecar at {rate} rps, {:?} per case, HTTP/1.1 keep-alive through the client sidecar:", dur);
        println!(
            "{:<28} {:>16} {:>14} {:>10} {:>10} {:>8}",
            "", "CPU us/request", "added (us)", "p50 ms", "p99 ms", "errors"
        );
        for (name, r) in [("plain mesh path", plain), ("JWT, cached token", cached), ("JWT, new token each time", cold)]
        {
            println!("{:<28} {:>16.1} {:>+14.1} {:>10.3} {:>10.3} {:>8}", name, r.0, r.0 - plain.0, r.1, r.2, r.3);
        }
        Ok(())
    }
}

/// `palisade-bench traffic`: what a realistic TrafficPolicy costs the
/// callee's sidecar: CORS for the request's origin, the security headers
/// and a response header, request validation (method, media type, body
/// limit) and a JSON Schema checked on a 1 KB JSON body, beside the plain
/// mesh path carrying the same POST.
mod traffic {
    use super::*;

    const ALLOW_POST: &str = "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: web-to-orders, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}\n  action: ALLOW\n  rules:\n    - from: [{identities: [\"spiffe://cluster.local/ns/shop/sa/web\"]}]\n      to: [{methods: [\"GET\", \"POST\"]}]\n";

    const TRAFFIC: &str = r#"apiVersion: palisade.dev/v1
kind: TrafficPolicy
metadata: {name: orders-browser, namespace: shop}
spec:
  target: {identities: ["spiffe://cluster.local/ns/shop/sa/orders"]}
  cors:
    allowOrigins: ["https://shop.example.com", "https://*.shop.example.com"]
    allowMethods: [GET, POST]
    allowHeaders: [authorization, content-type]
    exposeHeaders: [ratelimit]
  securityHeaders: {hsts: true, contentTypeOptions: true, frameOptions: true, contentSecurityPolicy: true, referrerPolicy: true, removeServerHeaders: true}
  responseHeaders: {set: {cache-control: no-store}}
  validation:
    methods: [GET, POST]
    contentTypes: [application/json]
    maxBodyBytes: 8192
    jsonSchema:
      type: object
      required: [item, qty, lines]
      additionalProperties: false
      properties:
        item: {type: string, pattern: "^[a-z][a-z-]{0,31}$"}
        qty: {type: integer, minimum: 1, maximum: 100}
        email: {type: string, format: email}
        notes: {type: string, maxLength: 2000}
        lines:
          type: array
          maxItems: 20
          items:
            type: object
            required: [sku, qty]
            properties: {sku: {type: string, pattern: "^[A-Z]{3}-[0-9]{4}$"}, qty: {type: integer, minimum: 1}}
"#;

    /// A 1 KB order that matches the schema.
    fn order() -> Bytes {
        let lines: Vec<serde_json::Value> =
            (0..12).map(|i| serde_json::json!({"sku": format!("TEA-{:04}", 1000 + i), "qty": 1 + i % 3})).collect();
        let mut v =
            serde_json::json!({"item": "green-tea", "qty": 2, "email": "buyer@shop.example.com", "lines": lines});
        let len = v.to_string().len();
        v["notes"] = serde_json::Value::String("n".repeat(1024usize.saturating_sub(len + 11)));
        Bytes::from(v.to_string())
    }

    fn apply(m: &Mesh, name: &str, yaml: &str) -> Result<()> {
        let f = m._tmp.path().join(format!("{name}.yaml"));
        std::fs::write(&f, yaml)?;
        let out = m._cp.ctl(&["policy", "apply", "-f", f.to_str().context("path")?, "--wait", "60s"]);
        if !out.status.success() {
            bail!("policy apply failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(())
    }

    fn shape() -> Result<()> {
        let body = order();
        eprintln!("each request: POST /orders, a {} byte JSON body, Origin: https://shop.example.com", body.len());
        SHAPE.set(Shape { body, origin: "https://shop.example.com" }).map_err(|_| anyhow::anyhow!("shape set twice"))
    }

    pub(super) async fn run(rate: u64, dur: Duration) -> Result<()> {
        shape()?;
        let m = mesh(tempfile::tempdir()?, &[]).await?;
        apply(&m, "allow-post", ALLOW_POST)?;
        let server = m.server.proc.child.id();
        let measure = || async {
            open_loop(m.mesh_addr, 200, 4, Duration::from_millis(500)).await?;
            let c0 = cpu_seconds(server);
            let (h, errors) = open_loop(m.mesh_addr, rate, 16, dur).await?;
            let per_request_us = (cpu_seconds(server) - c0) / (dur.as_secs_f64() * rate as f64) * 1e6;
            anyhow::Ok((per_request_us, ms(&h, 0.5), ms(&h, 0.99), errors))
        };
        eprintln!("plain mesh path at {rate} rps for {dur:?}...");
        let plain = measure().await?;
        apply(&m, "traffic", TRAFFIC)?;
        eprintln!("with the TrafficPolicy ...");
        let traffic = measure().await?;
        println!("machine: {}", machine());
        println!(
            "server sidecar at {rate} rps, {dur:?} per case, 1 KB JSON POSTs over HTTP/1.1 keep-alive through the client sidecar:"
        );
        println!(
            "{:<32} {:>16} {:>14} {:>10} {:>10} {:>8}",
            "", "CPU us/request", "added (us)", "p50 ms", "p99 ms", "errors"
        );
        for (name, r) in [("plain mesh path", plain), ("CORS + headers + JSON Schema", traffic)] {
            println!("{:<32} {:>16.1} {:>+14.1} {:>10.3} {:>10.3} {:>8}", name, r.0, r.0 - plain.0, r.1, r.2, r.3);
        }
        Ok(())
    }

    pub(super) async fn instructions(requests: u64) -> Result<()> {
        shape()?;
        let (m, dir) = mesh_under_callgrind().await?;
        apply(&m, "allow-post", ALLOW_POST)?;
        fixed(m.mesh_addr, 200).await?;
        eprintln!("plain mesh path, {requests} requests under callgrind ...");
        let plain = count_ir(&m, &dir, requests, Arc::new(Vec::new())).await?;
        apply(&m, "traffic", TRAFFIC)?;
        fixed(m.mesh_addr, 8).await?;
        eprintln!("with the TrafficPolicy ...");
        let traffic = count_ir(&m, &dir, requests, Arc::new(Vec::new())).await?;
        println!("user-space instructions per request (callgrind Ir), {requests} 1 KB JSON POSTs over 4 connections:");
        println!("{:<32} {:>14} {:>14} {:>14}", "", "client sidecar", "server sidecar", "server added");
        for (name, r) in [("plain mesh path", plain), ("CORS + headers + JSON Schema", traffic)] {
            println!("{:<32} {:>14.0} {:>14.0} {:>+14.0}", name, r[0], r[1], r[1] - plain[1]);
        }
        Ok(())
    }
}

/// `palisade-bench trace`: what observability costs both sidecars: the
/// plain mesh path, spans at 1% and at 100% sampling exported to a real
/// OTLP/gRPC receiver (in this process, from the official protos), access
/// logs on, recording requests for policy previews (the default 100 a
/// second), and a `palisadectl tap` of every request.
mod tracing_cost {
    use super::*;
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{TraceService, TraceServiceServer};
    use opentelemetry_proto::tonic::collector::trace::v1::{ExportTraceServiceRequest, ExportTraceServiceResponse};

    #[derive(Default)]
    struct Receiver(Arc<AtomicU64>);

    #[tonic::async_trait]
    impl TraceService for Receiver {
        async fn export(
            &self,
            req: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let n: usize =
                req.get_ref().resource_spans.iter().flat_map(|r| &r.scope_spans).map(|s| s.spans.len()).sum();
            self.0.fetch_add(n as u64, Ordering::Relaxed);
            Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
        }
    }

    /// The cases: their sidecar flags, and whether a tap runs. Recording
    /// for policy previews is off but where it is the case.
    fn cases(otlp: &str) -> Vec<(&'static str, Vec<String>, bool)> {
        let v = |a: &[&str]| [a, &["--preview-record-rate", "0"][..]].concat().iter().map(|s| s.to_string()).collect();
        vec![
            ("plain mesh path", v(&[]), false),
            ("tracing, 1% sampled", v(&["--otlp-endpoint", otlp, "--trace-sampling", "0.01"]), false),
            ("tracing, 100% sampled", v(&["--otlp-endpoint", otlp, "--trace-sampling", "1"]), false),
            ("access log", v(&["--access-log"]), false),
            ("preview recording 100/s", vec![], false),
            ("a tap of every request", v(&[]), true),
        ]
    }

    /// `palisadectl tap` of every request, running until dropped; returns once the server sidecar has it.
    async fn tap(m: &Mesh) -> Result<tokio::process::Child> {
        let child = tokio::process::Command::new(palisade_tests::bin("palisadectl"))
            .env("PALISADE_CONTROL_PLANE", &m._cp.addr)
            .env("PALISADE_CREDENTIALS", m._cp.admin_dir())
            .args(["tap", "-o", "json"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        palisade_tests::eventually("the tap to reach the server sidecar", Duration::from_secs(60), || async {
            (m.server.metric("palisade_taps_active").await == Some(1.0)).then_some(())
        })
        .await?;
        Ok(child)
    }

    /// An OTLP receiver in this process: its URL and the spans it counted.
    async fn receiver() -> Result<(String, Arc<AtomicU64>)> {
        let received = Arc::new(AtomicU64::new(0));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let otlp = format!("http://{}", listener.local_addr()?);
        let svc = TraceServiceServer::new(Receiver(received.clone()));
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        Ok((otlp, received))
    }

    pub(super) async fn instructions(requests: u64) -> Result<()> {
        let (otlp, received) = receiver().await?;
        let cases = cases(&otlp);
        let mut rows = Vec::new();
        for (name, flags, tapped) in &cases {
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            let (m, dir) = mesh_under_callgrind_with(&flags).await?;
            let _tap = if *tapped { Some(tap(&m).await?) } else { None };
            fixed(m.mesh_addr, 200).await?;
            eprintln!("{name}: {requests} requests under callgrind ...");
            rows.push((name, count_ir(&m, &dir, requests, Arc::new(Vec::new())).await?));
        }
        println!("user-space instructions per request (callgrind Ir), {requests} requests over 4 connections:");
        println!(
            "{:<24} {:>14} {:>14} {:>14} {:>14}",
            "", "client sidecar", "client added", "server sidecar", "server added"
        );
        let plain = rows[0].1;
        for (name, r) in &rows {
            println!("{name:<24} {:>14.0} {:>+14.0} {:>14.0} {:>+14.0}", r[0], r[0] - plain[0], r[1], r[1] - plain[1]);
        }
        eprintln!("spans received: {}", received.load(Ordering::Relaxed));
        Ok(())
    }

    pub(super) async fn run(rate: u64, dur: Duration) -> Result<()> {
        let (otlp, received) = receiver().await?;
        let cases = cases(&otlp);
        let mut rows = Vec::new();
        for (name, flags, tapped) in &cases {
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            let m = mesh_with(tempfile::tempdir()?, &[], &flags).await?;
            let _tap = if *tapped { Some(tap(&m).await?) } else { None };
            let pids = [m.client.proc.child.id(), m.server.proc.child.id()];
            open_loop(m.mesh_addr, 200, 4, Duration::from_millis(500)).await?;
            let before = received.load(Ordering::Relaxed);
            let c0 = pids.map(cpu_seconds);
            eprintln!("{name}: {rate} rps for {dur:?} ...");
            let (h, errors) = open_loop(m.mesh_addr, rate, 16, dur).await?;
            let n = dur.as_secs_f64() * rate as f64;
            let c1 = pids.map(cpu_seconds);
            // Let the last batch arrive.
            tokio::time::sleep(Duration::from_secs(1)).await;
            let spans = received.load(Ordering::Relaxed) - before;
            rows.push((
                name,
                (c1[0] - c0[0]) / n * 1e6,
                (c1[1] - c0[1]) / n * 1e6,
                ms(&h, 0.5),
                ms(&h, 0.99),
                errors,
                spans,
            ));
        }
        println!("machine: {}", machine());
        println!("both sidecars at {rate} rps, {dur:?} per case, HTTP/1.1 keep-alive through the client sidecar:");
        println!(
            "{:<24} {:>14} {:>14} {:>10} {:>10} {:>8} {:>14}",
            "", "client us/req", "server us/req", "p50 ms", "p99 ms", "errors", "spans received"
        );
        for (name, client, server, p50, p99, errors, spans) in rows {
            println!("{name:<24} {client:>14.1} {server:>14.1} {p50:>10.3} {p99:>10.3} {errors:>8} {spans:>14}");
        }
        Ok(())
    }
}
