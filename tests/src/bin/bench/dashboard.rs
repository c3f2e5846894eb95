//! `palisade-bench dashboard [N]`: the web dashboard over a mesh of N
//! workloads (default 1,000) in headless Chromium. A real control plane;
//! N simulated sidecars in this process, each with its own identity (a
//! join token each), certificate, config stream and stats reports naming
//! two callers (every tenth with refusals); a real `palisadectl dashboard`.
//! It prints what the first page transfers, when it is interactive, when
//! the graph holds every workload, and what the dashboard and the control
//! plane hold in memory.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use palisade_certs::tls::Svid;
use palisade_certs::{SvidInfo, WorkloadKey};
use palisade_proto::v1::certify_request::Attestation;
use palisade_proto::v1::config_request::Kind;
use palisade_proto::v1::identity_client::IdentityClient;
use palisade_proto::v1::mesh_config_client::MeshConfigClient;
use palisade_proto::v1::{
    CertifyRequest, ConfigAck, ConfigRequest, ConfigUpdate, CreateJoinTokenRequest, Hello, InboundFrom, Report,
    StatReport,
};
use palisade_tests::browser::Browser;
use palisade_tests::{ControlPlane, grpc};
use rustls_pki_types::CertificateDer;
use serde_json::json;
use tokio::io::AsyncBufReadExt;

/// Workloads per namespace.
const PER_NAMESPACE: usize = 50;
const BOUNDS: [f64; 3] = [0.001, 0.01, 0.1];

fn identity(i: usize) -> String {
    format!("spiffe://cluster.local/ns/team{}/sa/w{i}", i / PER_NAMESPACE)
}

/// A report as a sidecar sends it: `k` = 0 is the first (all zero).
fn report(i: usize, n: usize, k: u64) -> Report {
    let from = |c: usize, refused: u64| InboundFrom {
        caller: identity(c),
        status_classes: vec![0, 100 * k, 0, refused * k, k],
        refused: vec![refused * k, 0, 0, 0],
        latency_buckets: vec![50 * k, 40 * k, 10 * k + refused * k, k],
    };
    let refused = u64::from(i.is_multiple_of(10)) * 3;
    let inbound_from = vec![from((i + 1) % n, refused), from((i + 7) % n, 0)];
    let mut status = [0u64; 5];
    let mut buckets = [0u64; 4];
    for f in &inbound_from {
        for (a, b) in status.iter_mut().zip(&f.status_classes) {
            *a += b;
        }
        for (a, b) in buckets.iter_mut().zip(&f.latency_buckets) {
            *a += b;
        }
    }
    let stats = StatReport {
        status_classes: status.to_vec(),
        latency_buckets: buckets.to_vec(),
        bounds_seconds: BOUNDS.to_vec(),
        refused: refused * k,
        called: vec![],
        inbound_from,
    };
    Report { stats: Some(stats), ..Default::default() }
}

struct Ctx {
    addr: String,
    bundle: String,
    tokens: Vec<String>,
    n: usize,
    reported: AtomicUsize,
    done: AtomicBool,
    joins: tokio::sync::Semaphore,
}

async fn sidecar(ctx: Arc<Ctx>, i: usize) -> Result<()> {
    let (local, addr) = super::push::addresses(i);
    let permit = ctx.joins.acquire().await?;
    let key = WorkloadKey::generate()?;
    let anonymous = grpc::channel_from(&ctx.addr, &ctx.bundle, None, Some(local)).await?;
    let resp = IdentityClient::new(anonymous)
        .certify(CertifyRequest {
            csr_der: key.csr_der(None)?,
            attestation: Some(Attestation::JoinToken(ctx.tokens[i].clone())),
            inbound_addr: addr.clone(),
        })
        .await?
        .into_inner();
    let chain: Vec<CertificateDer<'static>> = resp.cert_chain_der.into_iter().map(CertificateDer::from).collect();
    let (id, info) = SvidInfo::parse_svid(&chain[0])?;
    let svid = Svid { certified: key.certified(chain)?, info, id };
    let ch = grpc::channel_from(&ctx.addr, &ctx.bundle, Some(svid), Some(local)).await?;
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    let hello = Hello { inbound_addr: addr, ..Default::default() };
    tx.send(ConfigRequest { kind: Some(Kind::Hello(hello)) }).await?;
    let mut updates =
        MeshConfigClient::new(ch).subscribe(tokio_stream::wrappers::ReceiverStream::new(rx)).await?.into_inner();
    let mut sent = 0;
    drop(permit);
    while !ctx.done.load(Ordering::Relaxed) {
        let u = tokio::select! {
            m = updates.message() => match m? { Some(u) => u, None => bail!("the stream ended") },
            _ = tokio::time::sleep(Duration::from_millis(500)) => ConfigUpdate::default(),
        };
        if !u.nonce.is_empty() {
            tx.send(ConfigRequest { kind: Some(Kind::Ack(ConfigAck { nonce: u.nonce })) }).await?;
        }
        if sent < 2 {
            // As a sidecar: a report at connect, then the next one a moment later.
            tx.send(ConfigRequest { kind: Some(Kind::Report(report(i, ctx.n, sent))) }).await?;
            sent += 1;
            if sent == 2 {
                ctx.reported.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    Ok(())
}

pub(super) async fn run(n: usize) -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let cp = ControlPlane::start(&tmp.path().join("data"), tmp.path(), &["--log", "warn"]).await?;
    let bundle = std::fs::read_to_string(cp.bundle())?;
    let mut admin = super::push::admin(&cp, &bundle).await?;
    println!("machine: {}", super::machine());
    let mut tokens = Vec::with_capacity(n);
    for i in 0..n {
        let req = CreateJoinTokenRequest { identity: identity(i), ttl_seconds: 3600, uses: 1 };
        tokens.push(admin.create_join_token(req).await?.into_inner().token);
    }
    let ctx = Arc::new(Ctx {
        addr: cp.addr.clone(),
        bundle,
        tokens,
        n,
        reported: AtomicUsize::new(0),
        done: AtomicBool::new(false),
        joins: tokio::sync::Semaphore::new(32),
    });
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..n)
        .map(|i| {
            let ctx = ctx.clone();
            tokio::spawn(async move {
                if let Err(e) = sidecar(ctx, i).await {
                    eprintln!("sidecar {i}: {e:#}");
                }
            })
        })
        .collect();
    palisade_tests::eventually("every sidecar to join and report twice", Duration::from_secs(300), || {
        let ctx = ctx.clone();
        async move { (ctx.reported.load(Ordering::Relaxed) >= n).then_some(()) }
    })
    .await?;
    println!(
        "{n} workloads in {} namespaces joined and reported in {:.1} s",
        n.div_ceil(PER_NAMESPACE),
        t0.elapsed().as_secs_f64()
    );

    let mut dash = tokio::process::Command::new(palisade_tests::bin("palisadectl"))
        .env("PALISADE_CONTROL_PLANE", &cp.addr)
        .env("PALISADE_CREDENTIALS", cp.admin_dir())
        .arg("dashboard")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    let mut line = String::new();
    tokio::io::BufReader::new(dash.stdout.take().context("stdout")?).read_line(&mut line).await?;
    let url = line.trim().strip_prefix("Palisade dashboard: ").context("the dashboard's URL")?.to_string();
    let base = url.trim_end_matches('/').to_string();

    let shots = tmp.path().join("shots");
    std::fs::create_dir_all(&shots)?;
    let Some(mut b) = Browser::start(&shots).await? else { bail!("Chromium cannot start here") };
    println!("browser: chromium {}", b.version);
    let signed_in = b.open(&url).await;
    if signed_in["ok"] != true {
        bail!("{signed_in}");
    }
    let mut rows = Vec::new();
    for run in 0..5 {
        // A fresh load, from an empty cache, each time.
        let _ = b.cmd(json!({"cmd": "eval", "js": "return 0"})).await;
        b.open("about:blank").await;
        b.open(&format!("{base}/#/graph?run={run}")).await;
        let w = b.cmd(json!({"cmd": "wait", "css": "#view-graph g.node", "count": n, "timeout": 30})).await;
        if w["ok"] != true {
            bail!("the graph did not show {n} workloads: {w}");
        }
        let drawn = b.eval("return performance.now()").await.as_f64().unwrap_or_default();
        let perf = b.cmd(json!({"cmd": "perf"})).await;
        rows.push((
            perf["transfer_bytes"].as_f64().unwrap_or_default(),
            perf["dom_interactive_ms"].as_f64().unwrap_or_default(),
            drawn,
        ));
    }
    let edges = b.eval("return document.querySelectorAll('#view-graph g.edge').length").await;
    rows.sort_by(|a, b| a.2.total_cmp(&b.2));
    let (bytes, interactive, drawn) = rows[rows.len() / 2];
    println!(
        "first page (median of {} loads): {:.0} KB transferred, interactive at {:.0} ms, all {n} workloads and {edges} edges drawn at {:.0} ms (fastest {:.0}, slowest {:.0})",
        rows.len(),
        bytes / 1024.0,
        interactive,
        drawn,
        rows[0].2,
        rows[rows.len() - 1].2
    );
    let overview = |gzip: bool| {
        let url = format!("{base}/api/overview");
        async move {
            let mut c = tokio::process::Command::new("curl");
            c.args(["-s", "-o", "/dev/null", "-w", "%{size_download}"]);
            if gzip {
                c.args(["-H", "accept-encoding: gzip"]);
            }
            let out = c.arg(&url).output().await.ok()?;
            String::from_utf8_lossy(&out.stdout).parse::<f64>().ok()
        }
    };
    println!(
        "/api/overview: {:.0} KB, {:.0} KB gzip-compressed",
        overview(false).await.unwrap_or_default() / 1024.0,
        overview(true).await.unwrap_or_default() / 1024.0
    );
    let pid = dash.id().unwrap_or_default();
    println!(
        "memory: dashboard {:.1} MB RSS, control plane {:.1} MB RSS",
        super::push::rss_mb(pid, "VmRSS:"),
        super::push::rss_mb(cp.proc.child.id(), "VmRSS:")
    );
    ctx.done.store(true, Ordering::Relaxed);
    for t in tasks {
        t.abort();
    }
    Ok(())
}
