use clap::Parser;
use palisade_sidecar::{Config, StartError, start};
use tracing_subscriber::EnvFilter;

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
    let cfg = Config::parse();
    let filter = EnvFilter::try_new(&cfg.log).unwrap_or_else(|e| {
        eprintln!("error: --log {:?}: {e}", cfg.log);
        std::process::exit(EXIT_CONFIG)
    });
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if cfg.log_format == "json" {
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
