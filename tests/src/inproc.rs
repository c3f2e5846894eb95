//! The daemons started in the test's own process, through their libraries:
//! a control plane (`palisade_control_plane::start`) and sidecars
//! (`palisade_sidecar::start`) on 127.0.0.1:0 in the test's tokio runtime,
//! with a temporary data dir, real TLS and the mesh's own PKI, joined with a
//! join token the way the process-based tests join them. What takes a
//! process a second to start takes milliseconds here, so data-path and
//! control-stream behaviour is proven without `cargo build --bins`; the
//! process-based tests keep what only real processes show (signals, exit
//! codes, flags from the environment, logs).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use clap::Parser;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use palisade_certs::SecretPem;
use palisade_certs::tls::Svid;
use palisade_proto::v1::admin_client::AdminClient;
use palisade_proto::v1::{ApplyPolicyRequest, CreateJoinTokenRequest};
use tonic::transport::Channel;

use crate::apps::HttpApp;
use crate::{eventually, free_port, grpc};

/// A control plane running in this process.
#[derive(Debug)]
pub struct ControlPlane {
    running: Option<palisade_control_plane::Running>,
    /// The bound gRPC address (kept across [`ControlPlane::restart`]).
    pub addr: SocketAddr,
    pub data_dir: PathBuf,
    args: Vec<String>,
}

impl ControlPlane {
    /// Starts a control plane on 127.0.0.1:0 over `data_dir`, with `args`
    /// added to its flags (`--default-policy allow-authenticated`...).
    pub async fn start(data_dir: &Path, args: &[&str]) -> Result<Self> {
        palisade_certs::install_default_provider();
        let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
        let running = Self::run(data_dir, "127.0.0.1:0".parse()?, &args).await?;
        Ok(Self { addr: running.addr, running: Some(running), data_dir: data_dir.to_path_buf(), args })
    }

    async fn run(data_dir: &Path, listen: SocketAddr, args: &[String]) -> Result<palisade_control_plane::Running> {
        let dir = data_dir.to_str().context("the data dir is not UTF-8")?;
        let listen = listen.to_string();
        let flags = ["palisade-control-plane", "--data-dir", dir, "--listen", &listen];
        let cfg =
            palisade_control_plane::Config::try_parse_from(flags.into_iter().chain(args.iter().map(String::as_str)))?;
        cfg.validate()?;
        Ok(palisade_control_plane::start(cfg).await?)
    }

    /// `https://<addr>`, as sidecars are told.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The mesh's trust anchors (written by the control plane).
    pub fn bundle(&self) -> PathBuf {
        self.data_dir.join("admin").join("ca.pem")
    }

    /// Shuts it down (its streams end, its port closes); the data dir stays.
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    /// Starts it again on the same data dir and port (stopping it first if
    /// it runs): the same CA, the same tokens and policies.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await;
        // The old accept loop may hold the port for a moment after shutdown.
        let (dir, addr, args) = (self.data_dir.clone(), self.addr, self.args.clone());
        let mut last = None;
        for _ in 0..50 {
            match Self::run(&dir, addr, &args).await {
                Ok(r) => {
                    self.running = Some(r);
                    return Ok(());
                }
                Err(e) => last = Some(e),
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("no attempt made"))).context("restarting the control plane")
    }

    /// An Admin API client presenting the admin credential.
    pub async fn admin(&self) -> Result<AdminClient<Channel>> {
        let dir = self.data_dir.join("admin");
        let bundle = std::fs::read_to_string(dir.join("ca.pem"))?;
        let ch = grpc::channel(&self.url(), &bundle, Some(admin_svid(&dir)?)).await?;
        Ok(AdminClient::new(ch))
    }

    /// A join token for `identity` (one use).
    pub async fn create_token(&self, identity: &str) -> Result<String> {
        let req = CreateJoinTokenRequest { identity: identity.into(), ttl_seconds: 0, uses: 1 };
        Ok(self.admin().await?.create_join_token(req).await?.into_inner().token)
    }

    /// Applies a policy document (YAML), as `palisadectl apply -f` does.
    pub async fn apply(&self, document: &str) -> Result<()> {
        self.admin().await?.apply_policy(ApplyPolicyRequest { document: document.into() }).await?;
        Ok(())
    }
}

/// The admin credential the control plane wrote in `dir`, as an SVID.
pub fn admin_svid(dir: &Path) -> Result<Svid> {
    let chain = palisade_certs::ca::parse_pem_certs(&std::fs::read_to_string(dir.join("cert.pem"))?)
        .map_err(anyhow::Error::msg)?;
    let key = SecretPem::new(std::fs::read_to_string(dir.join("key.pem"))?);
    let certified = palisade_certs::csr::certified_key_from_pem(chain.clone(), &key)?;
    let (id, info) = palisade_certs::SvidInfo::parse_svid(&chain[0])?;
    Ok(Svid { certified, info, id })
}

/// A sidecar running in this process.
#[derive(Debug)]
pub struct Sidecar {
    running: palisade_sidecar::Running,
    pub admin: SocketAddr,
    pub inbound: SocketAddr,
}

impl Sidecar {
    /// Creates a join token for `identity`, starts a sidecar with it
    /// (admin and inbound on 127.0.0.1:0, `args` added), and waits until it
    /// is ready (certificate held, first config applied).
    pub async fn meshed(cp: &ControlPlane, identity: &str, args: &[&str]) -> Result<Self> {
        let token = cp.create_token(identity).await?;
        let (url, bundle) = (cp.url(), cp.bundle());
        let bundle = bundle.to_str().context("the bundle path is not UTF-8")?;
        let flags = [
            "palisade-sidecar",
            "--control-plane",
            &url,
            "--ca-bundle",
            bundle,
            "--join-token",
            &token,
            "--admin",
            "127.0.0.1:0",
            "--inbound",
            "127.0.0.1:0",
        ];
        let cfg = palisade_sidecar::Config::try_parse_from(flags.into_iter().chain(args.iter().copied()))?;
        let running = palisade_sidecar::start(cfg).await?;
        let sc = Self { admin: running.admin_addr, inbound: running.inbound_addr, running };
        eventually("in-process sidecar /ready", Duration::from_secs(20), || async {
            (sc.get("/ready").await?.0 == 200).then_some(())
        })
        .await?;
        Ok(sc)
    }

    /// GET `path` on the admin endpoint.
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        crate::http::get(&self.admin.to_string(), path).await.ok()
    }

    /// One metric's value from `/metrics`.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics").await?;
        body.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse().ok()))
    }

    /// Stops accepting and drains; whether everything finished in time.
    pub async fn drain(self, deadline: Duration) -> bool {
        self.running.drain(deadline).await
    }
}

pub const WEB: &str = "spiffe://cluster.local/ns/shop/sa/web";
pub const ORDERS: &str = "spiffe://cluster.local/ns/shop/sa/orders";

/// A control plane, a callee sidecar (identity orders) in front of an HTTP
/// app, and a caller sidecar (identity web) whose local `port` reaches it,
/// all in this process.
#[derive(Debug)]
pub struct Mesh {
    pub cp: ControlPlane,
    pub callee: Sidecar,
    pub caller: Sidecar,
    pub app: HttpApp,
    /// The caller's `--upstream` port for orders.shop.
    pub port: u16,
    pub tmp: tempfile::TempDir,
}

impl Mesh {
    /// Starts the three and waits until the caller knows the callee's address.
    pub async fn start(cp_args: &[&str]) -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let cp = ControlPlane::start(&tmp.path().join("data"), cp_args).await?;
        let app = HttpApp::start().await;
        let app_addr = app.addr.to_string();
        let callee = Sidecar::meshed(&cp, ORDERS, &["--app", &app_addr]).await?;
        // The upstream listener's port is the sidecar's to bind: one no other test is handed.
        let port = free_port();
        let upstream = format!("127.0.0.1:{port}=orders.shop");
        let caller = Sidecar::meshed(&cp, WEB, &["--upstream", &upstream]).await?;
        eventually("the caller's directory lists the callee", Duration::from_secs(10), || async {
            (caller.metric("palisade_directory_endpoints").await? >= 1.0).then_some(())
        })
        .await?;
        Ok(Self { cp, callee, caller, app, port, tmp })
    }

    /// GET `path` through the caller's upstream port; status and body.
    pub async fn get(&self, path: &str) -> Result<(u16, String)> {
        get_via(self.port, path).await
    }

    /// Polls `GET path` until it answers `status` and returns the body;
    /// fails with the last answer otherwise.
    pub async fn until_status(&self, path: &str, status: u16, timeout: Duration) -> Result<String> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            let got = self.get(path).await;
            if let Ok((s, body)) = &got
                && *s == status
            {
                return Ok(body.clone());
            }
            if std::time::Instant::now() > deadline {
                bail!("GET {path} did not answer {status} within {timeout:?}; last answer: {got:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// GET `path` as orders.shop through a caller's upstream `port`; status and body.
pub async fn get_via(port: u16, path: &str) -> Result<(u16, String)> {
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let req = hyper::Request::get(path).header("host", "orders.shop").body(Full::new(Bytes::new()))?;
    let resp = tokio::time::timeout(Duration::from_secs(10), sender.send_request(req)).await??;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}
