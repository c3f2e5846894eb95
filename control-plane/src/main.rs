use clap::Parser;
use palisade_control_plane::{Config, start};
use tracing_subscriber::EnvFilter;

/// Exit status for configuration errors (EX_USAGE).
const EXIT_CONFIG: i32 = 64;

#[tokio::main]
async fn main() {
    palisade_certs::install_default_provider();
    let cfg = Config::parse();
    let filter = EnvFilter::try_new(&cfg.log).unwrap_or_else(|e| {
        eprintln!("error: --log {:?}: {e}", cfg.log);
        std::process::exit(EXIT_CONFIG)
    });
    let fmt = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    if cfg.log_format == palisade_control_plane::config::LogFormat::Json {
        fmt.json().init()
    } else {
        fmt.init()
    }
    if let Err(e) = cfg.validate() {
        eprintln!("error: {e}");
        std::process::exit(EXIT_CONFIG);
    }
    tracing::info!(config = %serde_json::to_string(&cfg).unwrap_or_default(), "starting palisade-control-plane");
    let running = match start(cfg).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    };
    wait_for_signal().await;
    tracing::info!("shutting down");
    running.shutdown().await;
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
