use clap::Parser;
use palisade_sidecar::{Config, StartError, start};
use tracing_subscriber::EnvFilter;

/// jemalloc rather than glibc malloc: after a flood of connections ends,
/// its background thread hands the memory they held back to the system
/// within seconds (glibc kept it: RSS stayed at its peak, and in a pod with
/// a memory limit that is an OOM kill waiting for the next flood).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit status for configuration errors (EX_USAGE).
const EXIT_CONFIG: i32 = 64;

fn main() {
    palisade_certs::install_default_provider();
    // `palisade-sidecar init`: the init container's job, then exit.
    if std::env::args().nth(1).as_deref() == Some("init") {
        let init = palisade_sidecar::init::InitConfig::parse_from(std::env::args().skip(1));
        match init.run() {
            Ok(()) => {
                if init.verify {
                    println!("interception rules are in place");
                }
                std::process::exit(0)
            }
            Err(e) => {
                eprintln!("error: {e}");
                std::process::exit(1)
            }
        }
    }
    // `palisade-sidecar wait-ready`: a classic sidecar's postStart hook holds
    // the app's containers until the proxy is ready.
    if std::env::args().nth(1).as_deref() == Some("wait-ready") {
        std::process::exit(wait_ready(std::env::args().skip(2).collect()));
    }
    let cfg = Config::parse();
    let filter = EnvFilter::try_new(&cfg.log).unwrap_or_else(|e| {
        eprintln!("error: --log {:?}: {e}", cfg.log);
        std::process::exit(EXIT_CONFIG)
    });
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if cfg.log_format == palisade_sidecar::config::LogFormat::Json {
        fmt.json().init()
    } else {
        fmt.init()
    }
    // One thread by default: a sidecar's work is small per request, and a
    // single thread avoids cross-thread wake-ups and per-thread memory.
    let runtime = if cfg.threads <= 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(cfg.threads).enable_all().build()
    };
    let runtime = runtime.unwrap_or_else(|e| {
        eprintln!("error: cannot start the runtime: {e}");
        std::process::exit(1)
    });
    std::process::exit(runtime.block_on(run(cfg)));
}

async fn run(cfg: Config) -> i32 {
    tracing::info!(config = ?cfg, "starting palisade-sidecar");
    let drain = cfg.limits.drain_timeout;
    let running = match start(cfg).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return if matches!(e, StartError::Config(_) | StartError::Bundle(_)) { EXIT_CONFIG } else { 1 };
        }
    };
    let shutdown = running.shutdown.clone();
    tokio::select! {
        _ = wait_for_signal() => {}
        _ = shutdown.cancelled() => {}
    }
    tracing::info!(deadline = ?drain, "draining: no new connections, finishing in-flight requests");
    if running.drain(drain).await {
        tracing::info!("drained; exiting");
    } else {
        tracing::warn!("drain deadline passed with requests still in flight; exiting");
    }
    0
}

async fn wait_for_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// Polls `http://<admin>/ready` until 200 (exit 0) or the timeout (exit 1).
fn wait_ready(args: Vec<String>) -> i32 {
    let flag = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let admin = flag("--admin").unwrap_or_else(|| "127.0.0.1:4191".into());
    let timeout = flag("--timeout")
        .and_then(|t| humantime::parse_duration(&t).ok())
        .unwrap_or(std::time::Duration::from_secs(120));
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        use std::io::{Read, Write};
        if let Ok(mut s) = std::net::TcpStream::connect(&admin) {
            let _ = s.set_read_timeout(Some(std::time::Duration::from_secs(2)));
            let _ =
                s.write_all(format!("GET /ready HTTP/1.1\r\nHost: {admin}\r\nConnection: close\r\n\r\n").as_bytes());
            let mut head = [0u8; 12];
            if s.read_exact(&mut head).is_ok() && &head[9..12] == b"200" {
                return 0;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    eprintln!("error: the proxy at {admin} was not ready within {}", humantime::format_duration(timeout));
    1
}
