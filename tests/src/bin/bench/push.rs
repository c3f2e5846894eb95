//! `palisade-bench push N`: a real control plane and N simulated sidecars in
//! this process, each with its own key, certificate (a join token per
//! service), mTLS connection from its own loopback address, registered
//! inbound address and config stream subscribed to two other services, as
//! sidecars with declared upstreams do. It prints the join time and the cost
//! of a join early and late, the bytes the control plane sent, how fast
//! changes reach the sidecars that need them (an endpoint appearing, a policy
//! for one workload, a mesh-wide policy, and during churn), and the control
//! plane's memory and idle CPU.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use palisade_certs::tls::Svid;
use palisade_certs::{SvidInfo, WorkloadKey};
use palisade_proto::v1::admin_client::AdminClient;
use palisade_proto::v1::certify_request::Attestation;
use palisade_proto::v1::config_request::Kind;
use palisade_proto::v1::identity_client::IdentityClient;
use palisade_proto::v1::mesh_config_client::MeshConfigClient;
use palisade_proto::v1::{
    ApplyPolicyRequest, CertifyRequest, ConfigAck, ConfigRequest, CreateJoinTokenRequest, Hello, ResourceVersion, Want,
};
use palisade_tests::{ControlPlane, grpc};
use rustls_pki_types::CertificateDer;
use tonic::transport::Channel;

const NS: &str = "spiffe://cluster.local/ns/bench/sa/";

/// What to run.
#[derive(Debug)]
pub(super) struct Opts {
    n: usize,
    services: usize,
    /// Percent of the sidecars restarting per minute during the churn phase (0: none).
    churn: u32,
    churn_for: Duration,
    concurrency: usize,
    etcd: bool,
    /// Control-plane replicas (more than one needs etcd); the last is killed at the end.
    replicas: usize,
    rotate: bool,
}

impl Opts {
    pub(super) fn parse(mut args: impl Iterator<Item = String>) -> Result<Self> {
        let mut o = Opts {
            n: 1000,
            services: 0,
            churn: 0,
            churn_for: Duration::from_secs(60),
            concurrency: 8,
            etcd: false,
            replicas: 1,
            rotate: false,
        };
        while let Some(a) = args.next() {
            let mut val = || args.next().with_context(|| format!("{a} needs a value"));
            match a.as_str() {
                "--services" => o.services = val()?.parse()?,
                "--churn" => o.churn = val()?.trim_end_matches('%').parse()?,
                "--churn-for" => o.churn_for = humantime::parse_duration(&val()?)?,
                "--concurrency" => o.concurrency = val()?.parse()?,
                "etcd" | "--etcd" => o.etcd = true,
                "--replicas" => o.replicas = val()?.parse()?,
                "rotate" | "--rotate" => o.rotate = true,
                "-h" | "--help" => {
                    println!(
                        "palisade-bench push [N] [--services S] [--churn PCT] [--churn-for 60s] [--concurrency 8] [etcd [--replicas R]] [rotate]\n\
                         N simulated sidecars (default 1000) of S services (default N/5) join a control plane,\n\
                         each subscribed to two other services; then endpoint and policy changes are timed,\n\
                         optionally while PCT% of the sidecars restart per minute, and a root CA rotation.\n\
                         With R replicas on etcd the sidecars spread over them; at the end one is killed\n\
                         (SIGKILL) and the time until its sidecars are back on the others is measured.\n\
                         Needs ulimit -n above 2N+100 (both sides of every connection are in this machine)."
                    );
                    std::process::exit(0);
                }
                n if n.parse::<usize>().is_ok() => o.n = n.parse()?,
                other => bail!("unknown argument {other:?}; see palisade-bench push --help"),
            }
        }
        if o.services == 0 {
            o.services = (o.n / 5).max(1);
        }
        if o.replicas > 1 && !o.etcd {
            bail!("--replicas needs etcd (replicas share their state in etcd)");
        }
        o.replicas = o.replicas.max(1);
        Ok(o)
    }
}

/// A received resource.
#[derive(Debug, Clone)]
struct Arrival {
    sidecar: usize,
    kind: String,
    name: String,
    at: Instant,
    /// Size of the update that carried it.
    bytes: usize,
}

/// What every simulated sidecar shares.
struct Ctx {
    addrs: Vec<String>,
    bundle: String,
    tokens: Vec<String>,
    services: usize,
    arrivals: Mutex<Vec<Arrival>>,
    bytes: AtomicU64,
    joined: AtomicUsize,
    /// Streams that ended without being asked to (a healthy sidecar disconnected).
    dropped: AtomicUsize,
    /// Reconnects not admitted after a replica was killed (then retried).
    refused: AtomicUsize,
    /// Set when the figures are printed: streams ending now are the bench's doing.
    done: AtomicBool,
    restart: Vec<tokio::sync::Notify>,
    restarting: Vec<AtomicBool>,
    renewals: AtomicUsize,
    /// Join permits: at most `concurrency` joins in flight.
    joins: tokio::sync::Semaphore,
    /// The replica each sidecar's stream is on (`usize::MAX`: none).
    on: Vec<AtomicUsize>,
    /// Replicas killed on purpose: their sidecars fail over, not counted as dropped.
    killed: Vec<AtomicBool>,
}

fn service_of(i: usize, services: usize) -> usize {
    i % services
}

fn service_name(k: usize) -> String {
    format!("s{k}.bench")
}

/// The loopback address sidecar `i` connects from, and the inbound address it registers.
pub(super) fn addresses(i: usize) -> (IpAddr, String) {
    let local = IpAddr::from([127, 1 + (i / 62_500) as u8, ((i / 250) % 250) as u8, (i % 250 + 1) as u8]);
    (local, format!("10.{}.{}.{}:4143", i / 62_500, (i / 250) % 250, i % 250 + 1))
}

/// One simulated sidecar: joins, subscribes, ACKs every update, restarts
/// when asked to, renews when a root rotation asks, and when its replica
/// goes away reconnects to another with jittered backoff, saying what it holds.
async fn sidecar(ctx: Arc<Ctx>, i: usize) {
    let mut first_join = true;
    loop {
        let permit = if first_join { ctx.joins.acquire().await.ok() } else { None };
        first_join = false;
        let mut home = i % ctx.addrs.len();
        let cert = match certify(&ctx, i, home).await {
            Ok(c) => c,
            Err(e) => {
                ctx.dropped.fetch_add(1, Ordering::Relaxed);
                eprintln!("sidecar {i}: {e:#}");
                return;
            }
        };
        let mut held: HashMap<(String, String), String> = HashMap::new();
        let mut backoff = Duration::from_millis(200);
        let mut permit = permit;
        loop {
            let was_on = ctx.on[i].load(Ordering::Relaxed);
            match session(&ctx, i, &cert, home, &mut held, &mut permit).await {
                Ok(()) => break, // a restart: a new process, a new certificate
                Err(e) => {
                    let lost = ctx.on[i].swap(usize::MAX, Ordering::Relaxed) != usize::MAX;
                    if ctx.restarting[i].swap(false, Ordering::Relaxed) {
                        break;
                    }
                    let nanos = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.subsec_nanos());
                    let draw = f64::from(nanos % 10_000) / 10_000.0;
                    let wait = if lost {
                        // As sidecars do: a lost stream's first retry is
                        // spread over a second, later ones back off.
                        if !ctx.killed[home].load(Ordering::Relaxed) && !ctx.done.load(Ordering::Relaxed) {
                            ctx.dropped.fetch_add(1, Ordering::Relaxed);
                            eprintln!("sidecar {i}: {e:#}");
                        }
                        backoff = Duration::from_millis(200);
                        Duration::from_secs(1).mul_f64(draw)
                    } else {
                        // Not admitted (or the replica is gone): back off.
                        if was_on == usize::MAX && ctx.killed.iter().any(|k| k.load(Ordering::Relaxed)) {
                            ctx.refused.fetch_add(1, Ordering::Relaxed);
                        }
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                        backoff.mul_f64(0.5 + draw)
                    };
                    home = (home + 1) % ctx.addrs.len();
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// A certificate, and what rebuilds its TLS identity for a new connection.
struct Cert {
    certified: Arc<rustls::sign::CertifiedKey>,
    info: SvidInfo,
    id: palisade_certs::SpiffeId,
    chain: Vec<CertificateDer<'static>>,
}

impl Cert {
    fn svid(&self) -> Svid {
        Svid { certified: self.certified.clone(), info: self.info.clone(), id: self.id.clone() }
    }
}

async fn certify(ctx: &Ctx, i: usize, replica: usize) -> Result<Cert> {
    let k = service_of(i, ctx.services);
    let (local, addr) = addresses(i);
    let key = WorkloadKey::generate()?;
    let anonymous = grpc::channel_from(&ctx.addrs[replica], &ctx.bundle, None, Some(local)).await?;
    let resp = IdentityClient::new(anonymous)
        .certify(CertifyRequest {
            csr_der: key.csr_der(None)?,
            attestation: Some(Attestation::JoinToken(ctx.tokens[k].clone())),
            inbound_addr: addr,
        })
        .await?
        .into_inner();
    let chain: Vec<CertificateDer<'static>> = resp.cert_chain_der.into_iter().map(CertificateDer::from).collect();
    let (id, info) = SvidInfo::parse_svid(&chain[0])?;
    Ok(Cert { certified: key.certified(chain.clone())?, info, id, chain })
}

async fn session(
    ctx: &Ctx,
    i: usize,
    cert: &Cert,
    replica: usize,
    held: &mut HashMap<(String, String), String>,
    permit: &mut Option<tokio::sync::SemaphorePermit<'_>>,
) -> Result<()> {
    let k = service_of(i, ctx.services);
    let (local, addr) = addresses(i);
    let mut held_chain = cert.chain.clone();
    let ch = grpc::channel_from(&ctx.addrs[replica], &ctx.bundle, Some(cert.svid()), Some(local)).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let want = Want {
        services: vec![service_name((k + 1) % ctx.services), service_name((k + 2) % ctx.services)],
        addresses: vec![],
    };
    let held_list = held
        .iter()
        .map(|((t, n), v)| ResourceVersion { r#type: t.clone(), name: n.clone(), version: v.clone() })
        .collect();
    let hello = Hello { inbound_addr: addr.clone(), capabilities: vec![], held: held_list, want: Some(want) };
    tx.send(ConfigRequest { kind: Some(Kind::Hello(hello)) }).await?;
    let mut updates = MeshConfigClient::new(ch.clone())
        .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut first = true;
    loop {
        let u = tokio::select! {
            m = updates.message() => match m? {
                Some(u) => u,
                None => bail!("the control plane ended the stream"),
            },
            _ = ctx.restart[i].notified() => return Ok(()),
        };
        let bytes = prost::Message::encoded_len(&u);
        ctx.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
        if std::mem::take(&mut first) {
            ctx.on[i].store(replica, Ordering::Relaxed);
            if permit.take().is_some() {
                ctx.joined.fetch_add(1, Ordering::Relaxed);
            }
        }
        let mut stale = false;
        {
            let mut a = ctx.arrivals.lock().expect("invariant: not poisoned");
            // Taken under the lock, so arrivals are in time order.
            let at = Instant::now();
            for r in &u.resources {
                held.insert((r.r#type.clone(), r.name.clone()), r.version.clone());
                a.push(Arrival { sidecar: i, kind: r.r#type.clone(), name: r.name.clone(), at, bytes });
                if let Some(palisade_proto::v1::resource::Body::TrustBundle(b)) = &r.body {
                    let roots: Vec<CertificateDer<'static>> =
                        b.renew_unless_chains_to.iter().cloned().map(CertificateDer::from).collect();
                    stale = !roots.is_empty()
                        && palisade_certs::svid::root_store(&roots).is_ok_and(|r| {
                            palisade_certs::svid::verify_chain(&held_chain, &r, std::time::SystemTime::now()).is_err()
                        });
                }
            }
            for r in &u.removed {
                held.remove(&(r.r#type.clone(), r.name.clone()));
            }
        }
        if stale {
            // A root rotation asks for a certificate from the new root: renew
            // over this connection, spread over 2 s, as sidecars do.
            tokio::time::sleep(Duration::from_millis((i as u64 * 7919) % 2000)).await;
            let key = WorkloadKey::generate()?;
            let req = CertifyRequest { csr_der: key.csr_der(None)?, attestation: None, inbound_addr: addr.clone() };
            if let Ok(r) = IdentityClient::new(ch.clone()).certify(req).await {
                held_chain = r.into_inner().cert_chain_der.into_iter().map(CertificateDer::from).collect();
                ctx.renewals.fetch_add(1, Ordering::Relaxed);
            }
        }
        if !u.nonce.is_empty() {
            tx.send(ConfigRequest { kind: Some(Kind::Ack(ConfigAck { nonce: u.nonce })) }).await?;
        }
    }
}

/// Process figures from /proc.
pub(super) fn rss_mb(pid: u32, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        .map_or(0.0, |kb| kb / 1024.0)
}

fn quantiles(mut v: Vec<Duration>) -> String {
    if v.is_empty() {
        return "no deliveries".into();
    }
    v.sort();
    let q = |p: f64| v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1];
    format!("p50 {:.0?}, p99 {:.0?}, max {:.0?} over {} deliveries", q(0.5), q(0.99), q(1.0), v.len())
}

/// Waits until `expect` distinct sidecars received resource (`kind`, `name`)
/// after `t0`; returns the delivery delays and the largest update's size.
async fn deliveries(ctx: &Ctx, kind: &str, name: &str, t0: Instant, expect: usize) -> Result<(Vec<Duration>, usize)> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let found: HashMap<usize, (Duration, usize)> = {
            let a = ctx.arrivals.lock().expect("invariant");
            a.iter()
                .rev()
                .take_while(|r| r.at >= t0)
                .filter(|r| r.kind == kind && r.name == name)
                .map(|r| (r.sidecar, (r.at - t0, r.bytes)))
                .collect()
        };
        if found.len() >= expect {
            let max = found.values().map(|(_, b)| *b).max().unwrap_or(0);
            return Ok((found.into_values().map(|(d, _)| d).collect(), max));
        }
        if Instant::now() > deadline {
            bail!("{kind} {name}: {} of {expect} sidecars received it within 60 s", found.len());
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub(super) async fn admin(cp: &ControlPlane, bundle: &str) -> Result<AdminClient<Channel>> {
    let dir = cp.admin_dir();
    let chain = palisade_certs::ca::parse_pem_certs(&std::fs::read_to_string(dir.join("cert.pem"))?)
        .map_err(anyhow::Error::msg)?;
    let key = palisade_certs::SecretPem::new(std::fs::read_to_string(dir.join("key.pem"))?);
    let (id, info) = SvidInfo::parse_svid(&chain[0])?;
    let svid = Svid { certified: palisade_certs::csr::certified_key_from_pem(chain, &key)?, info, id };
    Ok(AdminClient::new(grpc::channel(&cp.addr, bundle, Some(svid)).await?))
}

fn policy(name: &str, target: &str) -> String {
    format!(
        "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: bench}}\nspec:\n  target: {{identities: [\"{target}\"]}}\n  action: ALLOW\n  rules:\n    - from: [{{namespaces: [\"bench\"]}}]\n"
    )
}

/// A one-member etcd on loopback, in `dir`: the process and its client URL.
async fn etcd(dir: &std::path::Path) -> Result<(palisade_tests::Proc, String)> {
    let (client, peer) = (palisade_tests::free_port(), palisade_tests::free_port());
    let url = format!("http://127.0.0.1:{client}");
    let mut cmd = std::process::Command::new("etcd");
    cmd.arg("--data-dir")
        .arg(dir.join("etcd"))
        .args(["--listen-client-urls", &url, "--advertise-client-urls", &url])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args(["--initial-cluster", &format!("default=http://127.0.0.1:{peer}"), "--log-level", "warn"]);
    let proc = palisade_tests::Proc::spawn("etcd", &mut cmd, dir).context("etcd (apt-get install etcd-server)")?;
    palisade_tests::eventually("etcd to serve", Duration::from_secs(20), || async {
        std::net::TcpStream::connect(("127.0.0.1", client)).ok().map(drop)
    })
    .await?;
    Ok((proc, url))
}

pub(super) async fn run(o: Opts) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let mut args = vec!["--log".to_string(), "warn".to_string()];
    let _etcd = if o.etcd {
        let (proc, url) = etcd(tmp.path()).await?;
        let key = tmp.path().join("store.key");
        palisade_certs::files::write_secret(&key, "MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE=")?;
        args.extend(["--store", "etcd", "--etcd-endpoints", &url, "--store-key-file"].map(String::from));
        args.push(key.display().to_string());
        Some(proc)
    } else {
        None
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut cps = Vec::new();
    for r in 0..o.replicas {
        cps.push(ControlPlane::start(&tmp.path().join(format!("data{r}")), tmp.path(), &args).await?);
    }
    let cp = &cps[0];
    let pids: Vec<u32> = cps.iter().map(|c| c.proc.child.id()).collect();
    let pid = pids[0];
    // CPU of every replica together.
    let cpu = || pids.iter().map(|p| super::cpu_seconds(*p)).sum::<f64>();
    println!("machine: {}", super::machine());
    println!(
        "control plane: {} replica(s), store {}, {} simulated sidecars of {} services, {} joining at a time",
        o.replicas,
        if o.etcd { "etcd (one member, loopback)" } else { "file" },
        o.n,
        o.services,
        o.concurrency
    );
    let bundle = std::fs::read_to_string(cp.bundle())?;
    let mut admin = admin(cp, &bundle).await?;
    let mut tokens = Vec::with_capacity(o.services);
    for k in 0..o.services {
        let req = CreateJoinTokenRequest { identity: format!("{NS}s{k}"), ttl_seconds: 3600, uses: 10_000 };
        tokens.push(admin.create_join_token(req).await?.into_inner().token);
    }
    let extra = 64; // sidecars joining after the others, to time endpoint changes
    let ctx = Arc::new(Ctx {
        addrs: cps.iter().map(|c| c.addr.clone()).collect(),
        bundle: bundle.clone(),
        tokens,
        services: o.services,
        arrivals: Mutex::new(Vec::new()),
        bytes: AtomicU64::new(0),
        joined: AtomicUsize::new(0),
        dropped: AtomicUsize::new(0),
        refused: AtomicUsize::new(0),
        done: AtomicBool::new(false),
        restart: (0..o.n + extra).map(|_| tokio::sync::Notify::new()).collect(),
        restarting: (0..o.n + extra).map(|_| AtomicBool::new(false)).collect(),
        renewals: AtomicUsize::new(0),
        joins: tokio::sync::Semaphore::new(o.concurrency),
        on: (0..o.n + extra).map(|_| AtomicUsize::new(usize::MAX)).collect(),
        killed: (0..o.replicas).map(|_| AtomicBool::new(false)).collect(),
    });

    // Joins, with the control plane's CPU per join early and late.
    eprintln!("joining {} sidecars...", o.n);
    let t0 = Instant::now();
    let cpu0 = cpu();
    let mut tasks = Vec::new();
    for i in 0..o.n {
        tasks.push(tokio::spawn(sidecar(ctx.clone(), i)));
    }
    // CPU and wall time per join over windows around the 100th join, the
    // 1,000th (when there are that many) and the last.
    let window = (o.n / 10).clamp(10, 100);
    let mut windows = vec![(window, 2 * window)];
    if o.n >= 1000 + 3 * window {
        windows.push((1000, 1000 + window));
    }
    windows.push((o.n.saturating_sub(window).max(2 * window), o.n));
    let mut marks: Vec<usize> = windows.iter().flat_map(|(a, b)| [*a, *b]).collect();
    marks.sort();
    marks.dedup();
    let mut at = Vec::new();
    for m in marks.iter().copied() {
        loop {
            let done = ctx.joined.load(Ordering::Relaxed);
            if done >= m {
                at.push((cpu(), t0.elapsed()));
                break;
            }
            if t0.elapsed() > Duration::from_secs(1800) {
                bail!("only {done} of {} sidecars joined in 30 minutes", o.n);
            }
            if tasks.iter().all(|t| t.is_finished()) {
                bail!("every sidecar task ended; {done} joined");
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    let join_time = t0.elapsed();
    let join_bytes = ctx.bytes.load(Ordering::Relaxed);
    let sample = |m: usize| at[marks.iter().position(|x| *x == m).expect("invariant: a mark")];
    let per_join = |(a, b): (usize, usize)| {
        let n = (b - a).max(1) as f64;
        let ((ca, wa), (cb, wb)) = (sample(a), sample(b));
        ((cb - ca) * 1e3 / n, (wb - wa).as_secs_f64() * 1e3 / n)
    };
    let end = at[at.len() - 1].0;
    println!(
        "joins: {} in {:.1} s ({:.0}/s); control plane CPU {:.1} s ({:.2} ms per join)",
        o.n,
        join_time.as_secs_f64(),
        o.n as f64 / join_time.as_secs_f64(),
        end - cpu0,
        (end - cpu0) * 1e3 / o.n as f64
    );
    let costs: Vec<(f64, f64)> = windows.iter().map(|w| per_join(*w)).collect();
    let shown: Vec<String> = windows
        .iter()
        .zip(&costs)
        .map(|((a, b), (c, w))| format!("joins {a}..{b}: {c:.2} ms CPU, {w:.2} ms wall"))
        .collect();
    println!(
        "  cost per join (control plane): {}; last/first {:.2}x CPU",
        shown.join("; "),
        costs[costs.len() - 1].0 / costs[0].0.max(1e-9)
    );
    println!(
        "  bytes sent by the control plane on the config streams during the joins: {:.1} MB ({:.0} B per sidecar)",
        join_bytes as f64 / 1e6,
        join_bytes as f64 / o.n as f64
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cpu_idle0 = cpu();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let idle = (cpu() - cpu_idle0) / 10.0 * 100.0;
    let rss = |field: &str| pids.iter().map(|p| format!("{:.0}", rss_mb(*p, field))).collect::<Vec<_>>().join(" + ");
    println!(
        "control plane with {} connected: RSS {} MB (peak {} MB), idle CPU {idle:.1}% of a core; this simulator RSS {:.0} MB",
        o.n,
        rss("VmRSS:"),
        rss("VmHWM:"),
        rss_mb(std::process::id(), "VmRSS:")
    );

    // One endpoint appearing: every sidecar subscribed to its service gets it.
    let subscribers = |k: usize| {
        (0..o.n)
            .filter(|i| {
                let s = service_of(*i, o.services);
                (s + 1) % o.services == k || (s + 2) % o.services == k
            })
            .count()
    };
    let (mut lat, mut max_bytes) = (Vec::new(), 0);
    for j in 0..extra.min(20) {
        let i = o.n + j;
        let k = service_of(i, o.services);
        let t = Instant::now();
        tasks.push(tokio::spawn(sidecar(ctx.clone(), i)));
        let (d, b) = deliveries(&ctx, "service", &service_name(k), t, subscribers(k)).await?;
        lat.extend(d);
        max_bytes = max_bytes.max(b);
    }
    println!("endpoint appears (20 times): {}; largest update {max_bytes} B", quantiles(lat));

    // A policy for one workload: its sidecars get it.
    let mut lat = Vec::new();
    for j in 0..10 {
        let k = (j * 7) % o.services;
        let members = (0..o.n).filter(|i| service_of(*i, o.services) == k).count();
        let name = format!("one-{j}");
        let t = Instant::now();
        admin.apply_policy(ApplyPolicyRequest { document: policy(&name, &format!("{NS}s{k}")) }).await?;
        lat.extend(deliveries(&ctx, "policy", &format!("AuthorizationPolicy/bench/{name}"), t, members).await?.0);
    }
    println!("policy for one workload (10 times): {}", quantiles(lat));

    // A mesh-wide policy: every sidecar gets it.
    let t = Instant::now();
    admin.apply_policy(ApplyPolicyRequest { document: policy("everyone", &format!("{NS}*")) }).await?;
    let everyone = o.n + extra.min(20);
    let (lat, _) = deliveries(&ctx, "policy", "AuthorizationPolicy/bench/everyone", t, everyone).await?;
    println!("mesh-wide policy to {everyone} sidecars: {}", quantiles(lat));

    if o.churn > 0 {
        churn(&ctx, &o, &mut tasks, subscribers).await?;
    }
    if o.rotate {
        rotate(&ctx, &mut admin, everyone).await?;
    }
    if o.replicas > 1 {
        let last = o.replicas - 1;
        failover(&ctx, &mut cps[last], last, everyone).await?;
    }
    println!(
        "healthy sidecars disconnected: {}; control plane peak RSS {:.0} MB",
        ctx.dropped.load(Ordering::Relaxed),
        rss_mb(pid, "VmHWM:")
    );
    ctx.done.store(true, Ordering::Relaxed);
    drop(cps);
    for t in tasks {
        t.abort();
    }
    Ok(())
}

/// `pct`% of the sidecars restart per minute while endpoints keep appearing.
async fn churn(
    ctx: &Arc<Ctx>,
    o: &Opts,
    tasks: &mut Vec<tokio::task::JoinHandle<()>>,
    subscribers: impl Fn(usize) -> usize,
) -> Result<()> {
    let per_min = (o.n as u64 * u64::from(o.churn) / 100).max(1);
    let every = Duration::from_secs(60) / per_min as u32;
    eprintln!("churn: {per_min} restarts a minute for {:?}...", o.churn_for);
    let restarter = {
        let (ctx, n, until) = (ctx.clone(), o.n, Instant::now() + o.churn_for);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            let mut i = 0usize;
            let mut count = 0usize;
            while Instant::now() < until {
                tick.tick().await;
                let s = (i * 7919) % n;
                ctx.restarting[s].store(true, Ordering::Relaxed);
                ctx.restart[s].notify_one();
                i += 1;
                count += 1;
            }
            count
        })
    };
    let (mut lat, mut j) = (Vec::new(), 20);
    let until = Instant::now() + o.churn_for;
    while Instant::now() < until && j < 64 {
        let i = o.n + j;
        let k = service_of(i, o.services);
        let t = Instant::now();
        tasks.push(tokio::spawn(sidecar(ctx.clone(), i)));
        // Restarting subscribers may miss it and get it on resubscribing:
        // count who has it, waiting for all but the ones restarting.
        match deliveries(ctx, "service", &service_name(k), t, subscribers(k).saturating_sub(2)).await {
            Ok((d, _)) => lat.extend(d),
            Err(e) => eprintln!("{e:#}"),
        }
        j += 1;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    let restarts = restarter.await?;
    println!("during churn ({restarts} restarts in {:?}): endpoint appears: {}", o.churn_for, quantiles(lat));
    Ok(())
}

/// SIGKILL of replica `r`: how long until its sidecars are all back on the
/// others, and what their reconnects cost (they say what they hold, so
/// they are sent only the difference).
async fn failover(ctx: &Ctx, cp: &mut ControlPlane, r: usize, total: usize) -> Result<()> {
    let on = |replica: usize| ctx.on.iter().filter(|x| x.load(Ordering::Relaxed) == replica).count();
    let theirs = on(r);
    let up = |ctx: &Ctx| ctx.on.iter().filter(|x| x.load(Ordering::Relaxed) != usize::MAX).count();
    eprintln!("killing replica {r} (SIGKILL) with {theirs} sidecars on it...");
    let (bytes0, t0) = (ctx.bytes.load(Ordering::Relaxed), Instant::now());
    ctx.killed[r].store(true, Ordering::Relaxed);
    cp.proc.child.kill()?;
    let mut marks = Vec::new();
    while on(r) > 0 || up(ctx) < total {
        if t0.elapsed() > Duration::from_secs(120) {
            bail!("{} of {total} sidecars connected 120 s after the kill", up(ctx));
        }
        // Those of the killed replica's sidecars connected again.
        let back = theirs.saturating_sub(on(r) + (total - up(ctx)));
        for q in [0.5, 0.99] {
            if back as f64 >= theirs as f64 * q && !marks.iter().any(|(x, _)| *x == q) {
                marks.push((q, t0.elapsed()));
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let all = t0.elapsed();
    let at = |q: f64| marks.iter().find(|(x, _)| *x == q).map_or(all, |(_, t)| *t);
    println!(
        "replica killed with {theirs} sidecars on it: half back on the others after {:.1?}, 99% after {:.1?}, all after {:.1?}; {:.1} MB sent to them; {} reconnects not admitted (retried)",
        at(0.5),
        at(0.99),
        all,
        (ctx.bytes.load(Ordering::Relaxed) - bytes0) as f64 / 1e6,
        ctx.refused.load(Ordering::Relaxed)
    );
    Ok(())
}

/// A root CA rotation with every sidecar connected, its steps timed.
async fn rotate(ctx: &Ctx, client: &mut AdminClient<Channel>, streams: usize) -> Result<()> {
    use palisade_proto::v1::{GetCaStatusRequest, RotateCaRequest};
    eprintln!("rotating the root CA with {streams} streams connected...");
    let t0 = Instant::now();
    client.rotate_ca(RotateCaRequest { generate: true, ..Default::default() }).await?;
    let (mut phase, mut marks) = (String::from("publishing"), vec![("publishing".to_string(), Duration::ZERO)]);
    while phase != "done" {
        if t0.elapsed() > Duration::from_secs(600) {
            bail!("the rotation did not finish within 10 minutes (phase {phase})");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        let s = client.get_ca_status(GetCaStatusRequest {}).await?.into_inner();
        if s.phase != phase {
            phase = s.phase.clone();
            marks.push((phase.clone(), t0.elapsed()));
        }
    }
    let total = t0.elapsed();
    let at = |p: &str| marks.iter().find(|(x, _)| x == p).map(|(_, t)| *t).unwrap_or(total);
    println!(
        "root CA rotation with {streams} streams: publishing (every ACK) {:?}, reissuing ({} renewals) {:?}, done after {:?}",
        at("reissuing"),
        ctx.renewals.load(Ordering::Relaxed),
        at("done").saturating_sub(at("reissuing")),
        total
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Opts;

    /// Every `palisade-bench push` command the docs show is one this bench takes.
    #[test]
    fn the_documented_commands_parse() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let mut seen = 0;
        for doc in ["docs/benchmarks.md", "docs/scale.md"] {
            let text = std::fs::read_to_string(root.join(doc)).unwrap();
            for line in text.lines().filter(|l| l.starts_with("target/release/palisade-bench push")) {
                let args = line.split('#').next().unwrap().split_whitespace().skip(2).map(String::from);
                let o = Opts::parse(args).unwrap_or_else(|e| panic!("{doc}: {line}: {e}"));
                assert!(o.n >= 1000, "{line}");
                seen += 1;
            }
        }
        assert!(seen >= 5, "{seen} documented commands");
        assert!(Opts::parse(["100", "--replicas", "2"].map(String::from).into_iter()).is_err(), "replicas need etcd");
    }
}
