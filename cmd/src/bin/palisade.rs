//! `palisade`: the container image's entrypoint. It runs one of the three
//! programs installed beside it, chosen by its first argument, so one image
//! serves the control plane, the sidecar, its init container and the CLI
//! without a shell:
//!
//! ```text
//! palisade control-plane ARGS   ->  palisade-control-plane ARGS
//! palisade sidecar ARGS         ->  palisade-sidecar ARGS
//! palisade init ARGS            ->  palisade-sidecar init ARGS
//! palisade ctl ARGS             ->  palisadectl ARGS
//! ```
//!
//! The programs' own names (`palisade-sidecar`, ...) are accepted too.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

const USAGE: &str = "usage: palisade <control-plane|sidecar|init|ctl> [ARGS...]\n\
    runs palisade-control-plane, palisade-sidecar, palisade-sidecar init or palisadectl with ARGS";

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(first) = args.next() else {
        eprintln!("{USAGE}");
        return ExitCode::from(palisade_cmd::EXIT_USAGE as u8);
    };
    let (program, prefix): (&str, &[&str]) = match first.to_str().unwrap_or("") {
        "control-plane" | "palisade-control-plane" => ("palisade-control-plane", &[]),
        "sidecar" | "palisade-sidecar" | "proxy" => ("palisade-sidecar", &[]),
        "init" => ("palisade-sidecar", &["init"]),
        "ctl" | "palisadectl" => ("palisadectl", &[]),
        "-h" | "--help" | "help" => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        "-V" | "--version" => {
            println!("palisade {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        other => {
            eprintln!("error: unknown program {other:?}\n{USAGE}");
            return ExitCode::from(palisade_cmd::EXIT_USAGE as u8);
        }
    };
    // The programs are installed beside this one (never looked up in the
    // working directory or PATH).
    let Some(dir) = std::env::current_exe().ok().and_then(|p| p.parent().map(PathBuf::from)) else {
        eprintln!("error: cannot tell where palisade is installed (/proc/self/exe is unreadable)");
        return ExitCode::from(127);
    };
    let path = dir.join(program);
    let err = Command::new(&path).args(prefix).args(args).exec();
    eprintln!("error: cannot run {}: {err}", path.display());
    ExitCode::from(127)
}
