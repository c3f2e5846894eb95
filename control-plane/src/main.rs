use palisade_cmd::EXIT_USAGE;
use palisade_control_plane::{Config, start};

#[tokio::main]
async fn main() {
    palisade_certs::install_default_provider();
    let cfg: Config = palisade_cmd::parse();
    if let Err(e) = palisade_cmd::init_logging("--log", &cfg.log, cfg.log_format) {
        eprintln!("error: {e}");
        std::process::exit(EXIT_USAGE)
    }
    if let Err(e) = cfg.validate() {
        eprintln!("error: {e}");
        std::process::exit(EXIT_USAGE);
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
    palisade_cmd::shutdown_signal().await;
    tracing::info!("shutting down");
    running.shutdown().await;
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn every_flag_has_help() {
        palisade_cmd::assert_documented(super::Config::command());
    }
}
