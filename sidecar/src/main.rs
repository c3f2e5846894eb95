use clap::{CommandFactory, FromArgMatches};
use palisade_cmd::{EXIT_FAILURE, EXIT_USAGE};
use palisade_sidecar::init::InitConfig;
use palisade_sidecar::{Config, StartError, start};

/// jemalloc rather than glibc malloc: after a flood of connections ends,
/// its background thread hands the memory they held back to the system
/// within seconds (glibc kept it: RSS stayed at its peak, and in a pod with
/// a memory limit that is an OOM kill waiting for the next flood).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// `palisade-sidecar wait-ready`: a classic sidecar's postStart hook holds
/// the app's containers until the proxy is ready.
#[derive(Debug, clap::Parser)]
#[command(about = "Wait until the proxy's admin endpoint answers /ready with 200 (a classic sidecar's postStart hook)")]
struct WaitReady {
    /// The proxy's admin endpoint.
    #[arg(long, default_value = "127.0.0.1:4191")]
    admin: String,
    /// Give up (exit 1) after this long.
    #[arg(long, default_value = "2m", value_parser = palisade_cmd::duration_arg)]
    timeout: std::time::Duration,
}

/// The whole command line: the proxy's flags, or one of its subcommands.
fn command() -> clap::Command {
    Config::command()
        .subcommand(InitConfig::command().name("init"))
        .subcommand(WaitReady::command().name("wait-ready"))
        .args_conflicts_with_subcommands(true)
        .subcommand_negates_reqs(true)
}

fn main() {
    palisade_certs::install_default_provider();
    let matches = palisade_cmd::matches(command());
    let cfg = match matches.subcommand() {
        Some(("init", m)) => {
            std::process::exit(init(InitConfig::from_arg_matches(m).unwrap_or_else(|e| palisade_cmd::exit_on(e))))
        }
        Some(("wait-ready", m)) => {
            std::process::exit(wait_ready(&WaitReady::from_arg_matches(m).unwrap_or_else(|e| palisade_cmd::exit_on(e))))
        }
        _ => Config::from_arg_matches(&matches).unwrap_or_else(|e| palisade_cmd::exit_on(e)),
    };
    if let Err(e) = palisade_cmd::init_logging("--log", &cfg.log, cfg.log_format) {
        eprintln!("error: {e}");
        std::process::exit(EXIT_USAGE)
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
        std::process::exit(EXIT_FAILURE)
    });
    std::process::exit(runtime.block_on(run(cfg)));
}

/// `palisade-sidecar init`: the init container's job, then exit.
fn init(init: InitConfig) -> i32 {
    match init.run() {
        Ok(()) => {
            if init.verify {
                palisade_cmd::outln!("interception rules are in place");
            }
            0
        }
        Err(e) => {
            eprintln!("error: {e}");
            EXIT_FAILURE
        }
    }
}

async fn run(cfg: Config) -> i32 {
    // As JSON (what /config shows): Debug would print `Some(..)`/`None`.
    tracing::info!(config = %serde_json::to_string(&cfg).unwrap_or_default(), "starting palisade-sidecar");
    let drain = cfg.limits.drain_timeout;
    let running = match start(cfg).await {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return if matches!(e, StartError::Config(_) | StartError::Bundle(_)) { EXIT_USAGE } else { EXIT_FAILURE };
        }
    };
    let shutdown = running.shutdown.clone();
    tokio::select! {
        _ = palisade_cmd::shutdown_signal() => {}
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

/// Polls `http://<admin>/ready` until 200 (exit 0) or the timeout (exit 1).
fn wait_ready(args: &WaitReady) -> i32 {
    let admin = &args.admin;
    let deadline = std::time::Instant::now() + args.timeout;
    while std::time::Instant::now() < deadline {
        use std::io::{Read, Write};
        if let Ok(mut s) = std::net::TcpStream::connect(admin) {
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
    eprintln!("error: the proxy at {admin} was not ready within {}", humantime::format_duration(args.timeout));
    EXIT_FAILURE
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_flag_and_subcommand_has_help() {
        palisade_cmd::assert_documented(super::command());
    }
}
