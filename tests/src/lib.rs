//! Shared harness for Palisade's end-to-end tests and benchmarks: starts the
//! real binaries (`palisade-control-plane`, `palisade-sidecar`,
//! `palisadectl`) as child processes on loopback, waits on conditions with a
//! deadline (never fixed sleeps), and kills everything on drop; [`inproc`]
//! starts the same daemons through their libraries, in the test's process.

#![allow(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

pub mod apps;
pub mod browser;
pub mod http;
pub mod inproc;

/// Directory of the workspace's built binaries (next to the test executable).
pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("PALISADE_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("invariant: executable path is known");
    let dir = exe.parent().expect("invariant: an executable lives in a directory");
    // Binaries sit beside palisade-bench; tests run from target/<profile>/deps.
    if dir.join("palisade-sidecar").exists() { dir.to_path_buf() } else { dir.parent().unwrap_or(dir).to_path_buf() }
}

/// Path of a built binary; fails with the build command if it is missing.
pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(p.exists(), "{} is missing: run `cargo build --bins` first (the README's test command does)", p.display());
    p
}

/// A test that cannot run here: under `CI=true` (CI installs everything) it
/// fails; elsewhere it says SKIPPED and appends a line to
/// `$PALISADE_SKIP_LOG`, which `./scripts/test.sh` prints after the run
/// (nextest hides the output of passing tests, so a skip would go unseen).
pub fn skip(test: &str, why: &str) {
    assert!(std::env::var("CI").is_err(), "CI=true and {test} cannot run: {why}");
    println!("SKIPPED {test}: {why}");
    if let Ok(log) = std::env::var("PALISADE_SKIP_LOG") {
        use std::io::Write;
        if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(log) {
            let _ = writeln!(f, "{test}: {why}");
        }
    }
}

/// Why a test that needs root and these programs on PATH cannot run here,
/// or None when it can.
pub fn missing_root_and_tools(tools: &[&str]) -> Option<String> {
    let uid = std::fs::read_to_string("/proc/self/status").ok().and_then(|s| {
        s.lines().find(|l| l.starts_with("Uid:")).and_then(|l| l.split_whitespace().nth(2).map(str::to_string))
    });
    if uid.as_deref() != Some("0") {
        return Some("not running as root".into());
    }
    let on_path =
        |t: &str| std::env::var_os("PATH").is_some_and(|p| std::env::split_paths(&p).any(|d| d.join(t).is_file()));
    tools.iter().find(|t| !on_path(t)).map(|t| format!("{t} is not installed"))
}

/// The repository root (README.md, scripts/).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("invariant: tests/ is in the repository").to_path_buf()
}

/// Polls `f` until it returns `Some` or `timeout` passes.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Ok(v);
        }
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Resident memory of a process, in KiB (0 if it is gone).
pub fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmRSS:")).and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// A TCP port on 127.0.0.1 that no other caller of `free_port` — in this
/// process or in another test process — is handed while this one lives.
///
/// Ports come from below the kernel's ephemeral range, so neither `bind(0)`
/// nor an outgoing connection can take one between the test choosing it and
/// the child process binding it. Each port is claimed with an exclusive lock
/// on a file under the temporary directory, held until the process exits
/// (a crashed test leaves no stale claim), and checked free by binding it.
pub fn free_port() -> u16 {
    use std::sync::Mutex;
    static HELD: Mutex<Vec<(u16, std::fs::File)>> = Mutex::new(Vec::new());

    let (low, high) = claimable_ports();
    let dir = std::env::temp_dir().join("palisade-test-ports");
    std::fs::create_dir_all(&dir).expect("invariant: the temporary directory is writable");
    let span = u32::from(high - low);
    let seed = std::process::id().wrapping_mul(2_654_435_761)
        ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
    for i in 0..span {
        let port = low + ((seed.wrapping_add(i)) % span) as u16;
        if held.iter().any(|(p, _)| *p == port) {
            continue;
        }
        let Ok(file) =
            std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(dir.join(port.to_string()))
        else {
            continue;
        };
        if file.try_lock().is_err() || std::net::TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        held.push((port, file));
        return port;
    }
    panic!("no free TCP port on 127.0.0.1 in {low}..{high}");
}

/// The ports `free_port` hands out: those outside the ephemeral range.
fn claimable_ports() -> (u16, u16) {
    let range: Vec<u16> = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .map(|s| s.split_whitespace().filter_map(|n| n.parse().ok()).collect())
        .unwrap_or_default();
    match range[..] {
        [low, _] if low > 11_000 => (10_000, low),
        [_, high] if high < 64_000 => (high + 1, 65_535),
        _ => (10_000, 32_768),
    }
}

/// A child process killed on drop, its stderr captured in a log file.
#[derive(Debug)]
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
    pub name: String,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, log_dir: &Path) -> Result<Self> {
        let log = log_dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new().create(true).append(true).open(&log)?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .env("NO_COLOR", "1")
            .spawn()
            .with_context(|| format!("spawning {name}"))?;
        Ok(Self { child, log, name: name.to_string() })
    }

    /// Everything the process logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends SIGTERM and waits up to `timeout` for the exit status.
    pub fn terminate(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("{} did not exit within {timeout:?} of SIGTERM", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for the process to exit on its own (e.g. a config error).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() > deadline {
                bail!("{} still running after {timeout:?}", self.name);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A control plane process with its data dir.
#[derive(Debug)]
pub struct ControlPlane {
    pub proc: Proc,
    pub addr: String,
    pub port: u16,
    pub data_dir: PathBuf,
}

impl ControlPlane {
    /// Starts a control plane on a free port and waits until it serves.
    pub async fn start(data_dir: &Path, log_dir: &Path, extra: &[&str]) -> Result<Self> {
        Self::start_on(free_port(), data_dir, log_dir, extra).await
    }

    pub async fn start_on(port: u16, data_dir: &Path, log_dir: &Path, extra: &[&str]) -> Result<Self> {
        let mut cmd = Command::new(bin("palisade-control-plane"));
        cmd.arg("--data-dir").arg(data_dir).args(["--listen", &format!("127.0.0.1:{port}")]).args(extra);
        let proc = Proc::spawn("control-plane", &mut cmd, log_dir)?;
        let cp = Self { proc, addr: format!("https://127.0.0.1:{port}"), port, data_dir: data_dir.to_path_buf() };
        let admin = cp.admin_dir();
        eventually("control plane to serve", Duration::from_secs(20), || {
            let ok = admin.join("key.pem").exists() && std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
            async move { ok.then_some(()) }
        })
        .await
        .with_context(|| cp.proc.logs())?;
        Ok(cp)
    }

    pub fn admin_dir(&self) -> PathBuf {
        self.data_dir.join("admin")
    }

    pub fn bundle(&self) -> PathBuf {
        self.admin_dir().join("ca.pem")
    }

    /// Runs palisadectl against this control plane.
    pub fn ctl(&self, args: &[&str]) -> Output {
        Command::new(bin("palisadectl"))
            .env("PALISADE_CONTROL_PLANE", &self.addr)
            .env("PALISADE_CREDENTIALS", self.admin_dir())
            .args(args)
            .output()
            .expect("invariant: palisadectl runs")
    }

    /// `palisadectl token create`, returning the token.
    pub fn create_token(&self, identity: &str, extra: &[&str]) -> Result<String> {
        let mut args = vec!["token", "create", "--identity", identity];
        args.extend_from_slice(extra);
        let out = self.ctl(&args);
        if !out.status.success() {
            bail!("token create failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        Ok(String::from_utf8(out.stdout)?.trim().to_string())
    }
}

/// A sidecar process.
#[derive(Debug)]
pub struct Sidecar {
    pub proc: Proc,
    pub admin: String,
    pub inbound: String,
}

impl Sidecar {
    /// Starts a sidecar with `args` added (attestation etc.), free admin and
    /// inbound ports unless `args` names them.
    pub fn spawn(name: &str, cp: &ControlPlane, log_dir: &Path, args: &[&str]) -> Result<Self> {
        Self::spawn_under(&[], name, cp, log_dir, args)
    }

    /// [`Sidecar::spawn`] with the binary run by a wrapper command
    /// (`valgrind --tool=callgrind ...`); empty: run directly.
    pub fn spawn_under(wrapper: &[&str], name: &str, cp: &ControlPlane, log_dir: &Path, args: &[&str]) -> Result<Self> {
        let flag = |f: &str| args.iter().position(|a| *a == f).and_then(|i| args.get(i + 1)).map(|s| s.to_string());
        let admin = flag("--admin").unwrap_or_else(|| format!("127.0.0.1:{}", free_port()));
        let inbound = flag("--inbound").unwrap_or_else(|| format!("127.0.0.1:{}", free_port()));
        let mut cmd = match wrapper.split_first() {
            Some((program, rest)) => {
                let mut c = Command::new(program);
                c.args(rest).arg(bin("palisade-sidecar"));
                c
            }
            None => Command::new(bin("palisade-sidecar")),
        };
        cmd.args(["--control-plane", &cp.addr]).arg("--ca-bundle").arg(cp.bundle());
        if flag("--admin").is_none() {
            cmd.args(["--admin", &admin]);
        }
        if flag("--inbound").is_none() {
            cmd.args(["--inbound", &inbound]);
        }
        cmd.args(args);
        Ok(Self { proc: Proc::spawn(name, &mut cmd, log_dir)?, admin, inbound })
    }

    /// Creates a join token for `identity` and starts a sidecar with it, ready.
    pub async fn meshed(name: &str, cp: &ControlPlane, log_dir: &Path, identity: &str, args: &[&str]) -> Result<Self> {
        Self::meshed_under(&[], name, cp, log_dir, identity, args).await
    }

    /// [`Sidecar::meshed`] under a wrapper command (see [`Sidecar::spawn_under`]).
    pub async fn meshed_under(
        wrapper: &[&str],
        name: &str,
        cp: &ControlPlane,
        log_dir: &Path,
        identity: &str,
        args: &[&str],
    ) -> Result<Self> {
        let token = cp.create_token(identity, &[])?;
        let mut all = vec!["--join-token", token.as_str()];
        all.extend_from_slice(args);
        let sc = Self::spawn_under(wrapper, name, cp, log_dir, &all)?;
        let slow = if wrapper.is_empty() { 20 } else { 120 };
        eventually("sidecar /ready", Duration::from_secs(slow), || async {
            (sc.get("/ready").await?.0 == 200).then_some(())
        })
        .await
        .with_context(|| sc.proc.logs())?;
        Ok(sc)
    }

    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        http::get(&self.admin, path).await.ok()
    }

    /// `/config` as JSON.
    pub async fn config(&self) -> Option<serde_json::Value> {
        let (status, body) = self.get("/config").await?;
        (status == 200).then(|| serde_json::from_str(&body).ok()).flatten()
    }

    /// One metric's value from `/metrics`.
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let (_, body) = self.get("/metrics").await?;
        body.lines().find_map(|l| l.strip_prefix(name).and_then(|rest| rest.trim().parse().ok()))
    }

    pub async fn wait_ready(&self) -> Result<serde_json::Value> {
        eventually("sidecar /ready", Duration::from_secs(20), || async {
            (self.get("/ready").await?.0 == 200).then_some(())
        })
        .await
        .with_context(|| self.proc.logs())?;
        self.config().await.context("reading /config")
    }
}

/// gRPC clients straight to the control plane, for tests that send requests
/// the sidecar never would.
pub mod grpc {
    use std::sync::Arc;
    use std::time::Duration;

    use anyhow::Result;
    use palisade_certs::TrustDomain;
    use palisade_certs::tls::{PeerIdentity, SpiffeServerVerifier, Svid, SvidStore, TrustBundle};
    use palisade_proto::channel::{ControlPlaneAddr, connect_from};
    use tonic::transport::Channel;

    /// A channel to `addr`, trusting `bundle_pem`, presenting `client` if given.
    pub async fn channel(addr: &str, bundle_pem: &str, client: Option<Svid>) -> Result<Channel> {
        channel_from(addr, bundle_pem, client, None).await
    }

    /// [`channel`] from the local address `local`.
    pub async fn channel_from(
        addr: &str,
        bundle_pem: &str,
        client: Option<Svid>,
        local: Option<std::net::IpAddr>,
    ) -> Result<Channel> {
        let roots = palisade_certs::ca::parse_pem_certs(bundle_pem).map_err(anyhow::Error::msg)?;
        let verifier = SpiffeServerVerifier::new(
            TrustBundle::new(&roots)?,
            PeerIdentity::Exact(TrustDomain::default().control_plane()),
        );
        let resolver = client.map(|svid| {
            let s = SvidStore::new();
            s.set(svid);
            Arc::new(s) as Arc<dyn rustls::client::ResolvesClientCert>
        });
        let tls = palisade_certs::tls::client_config(verifier, resolver)?;
        Ok(connect_from(&ControlPlaneAddr::parse(addr)?, Arc::new(tls), Duration::from_secs(5), local).await?)
    }
}

/// `MeshConfig.Subscribe` as a test or a simulated sidecar speaks it.
pub mod config {
    use palisade_proto::v1::config_request::Kind;
    use palisade_proto::v1::mesh_config_client::MeshConfigClient;
    use palisade_proto::v1::{ConfigAck, ConfigNack, ConfigRequest, ConfigUpdate, Hello, Report};
    use tokio::sync::mpsc::Sender;
    use tonic::Streaming;
    use tonic::transport::Channel;

    /// Opens a stream that says `inbound_addr` and nothing else in its hello.
    pub async fn subscribe(ch: Channel, inbound_addr: &str) -> (Sender<ConfigRequest>, Streaming<ConfigUpdate>) {
        let hello = Hello { inbound_addr: inbound_addr.into(), ..Default::default() };
        subscribe_with(ch, hello).await
    }

    /// Opens a stream with `hello`.
    pub async fn subscribe_with(ch: Channel, hello: Hello) -> (Sender<ConfigRequest>, Streaming<ConfigUpdate>) {
        let (tx, rx) = tokio::sync::mpsc::channel(8);
        tx.send(ConfigRequest { kind: Some(Kind::Hello(hello)) }).await.expect("invariant: the receiver is alive");
        let updates = MeshConfigClient::new(ch)
            .subscribe(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("the control plane accepts the stream")
            .into_inner();
        (tx, updates)
    }

    pub fn ack(nonce: String) -> ConfigRequest {
        ConfigRequest { kind: Some(Kind::Ack(ConfigAck { nonce })) }
    }

    pub fn nack(nonce: String, rejected: impl IntoIterator<Item = (String, String)>) -> ConfigRequest {
        ConfigRequest { kind: Some(Kind::Nack(ConfigNack { nonce, rejected: rejected.into_iter().collect() })) }
    }

    pub fn report(r: Report) -> ConfigRequest {
        ConfigRequest { kind: Some(Kind::Report(r)) }
    }
}
