//! `palisade-sidecar init`: the iptables rules that make interception
//! transparent, written by an init container (NET_ADMIN, NET_RAW) into the
//! pod's network namespace, as Linkerd's and Istio's init containers do.
//!
//! - inbound: TCP arriving for the pod goes to the sidecar's inbound port
//!   (except the admin port, the inbound port itself and --skip-inbound-ports);
//! - outbound: TCP the app sends goes to the sidecar's outbound port, except
//!   the sidecar's own traffic (by UID), loopback and --skip-outbound-ports.
//!
//! Idempotent: the chains are created if missing and flushed, then filled;
//! the jumps into them are added only if absent. Works with iptables-nft and
//! iptables-legacy (the `iptables` on PATH, or `--iptables`).

use std::process::Command;

use clap::Parser;

/// Write (or check, or print) the pod's interception rules.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "palisade-sidecar init",
    about = "Write the pod's iptables interception rules (run by the init container)"
)]
pub struct InitConfig {
    /// The sidecar's inbound port.
    #[arg(long, env = "PALISADE_INBOUND_PORT", default_value_t = 4143)]
    pub inbound_port: u16,
    /// The sidecar's outbound (transparent) port.
    #[arg(long, env = "PALISADE_OUTBOUND_PORT", default_value_t = 4140)]
    pub outbound_port: u16,
    /// The sidecar's admin port (never redirected).
    #[arg(long, env = "PALISADE_ADMIN_PORT", default_value_t = 4191)]
    pub admin_port: u16,
    /// UID the sidecar runs as: its own traffic is not redirected.
    #[arg(long, env = "PALISADE_PROXY_UID", default_value_t = 1337)]
    pub proxy_uid: u32,
    /// Inbound ports left alone (comma-separated).
    #[arg(long, env = "PALISADE_SKIP_INBOUND_PORTS", value_delimiter = ',')]
    pub skip_inbound_ports: Vec<u16>,
    /// Outbound destination ports left alone (comma-separated).
    #[arg(long, env = "PALISADE_SKIP_OUTBOUND_PORTS", value_delimiter = ',')]
    pub skip_outbound_ports: Vec<u16>,
    /// The iptables binary (iptables, iptables-nft or iptables-legacy).
    #[arg(long, env = "PALISADE_IPTABLES", default_value = "iptables")]
    pub iptables: String,
    /// Also write the same rules for IPv6 with this binary (dual-stack pods), e.g. ip6tables.
    #[arg(long, env = "PALISADE_IP6TABLES")]
    pub ip6tables: Option<String>,
    /// Print the commands instead of running them.
    #[arg(long)]
    pub dry_run: bool,
    /// Check that the rules are in place (exit 1 if not), change nothing.
    #[arg(long, conflicts_with = "dry_run")]
    pub verify: bool,
}

/// Why init failed.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error("cannot run {binary}: {source}; is iptables installed (and NET_ADMIN granted)?")]
    Spawn { binary: String, source: std::io::Error },
    #[error("`{command}` failed: {stderr}")]
    Failed { command: String, stderr: String },
    #[error("rules missing or different in the nat table: {missing:?}")]
    Missing { missing: Vec<String> },
}

const IN_CHAIN: &str = "PALISADE_INBOUND";
const OUT_CHAIN: &str = "PALISADE_OUTBOUND";

impl InitConfig {
    /// The rules of our chains, as `iptables -t nat -S` prints them.
    pub fn chain_rules(&self) -> Vec<String> {
        let mut r = Vec::new();
        for port in [self.admin_port, self.inbound_port].iter().chain(&self.skip_inbound_ports) {
            r.push(format!("-A {IN_CHAIN} -p tcp -m tcp --dport {port} -j RETURN"));
        }
        r.push(format!("-A {IN_CHAIN} -p tcp -j REDIRECT --to-ports {}", self.inbound_port));
        r.push(format!("-A {OUT_CHAIN} -m owner --uid-owner {} -j RETURN", self.proxy_uid));
        r.push(format!("-A {OUT_CHAIN} -o lo -j RETURN"));
        for port in &self.skip_outbound_ports {
            r.push(format!("-A {OUT_CHAIN} -p tcp -m tcp --dport {port} -j RETURN"));
        }
        r.push(format!("-A {OUT_CHAIN} -p tcp -j REDIRECT --to-ports {}", self.outbound_port));
        r
    }

    /// The jumps from the built-in chains.
    pub fn jump_rules(&self) -> Vec<String> {
        vec![format!("-A PREROUTING -p tcp -j {IN_CHAIN}"), format!("-A OUTPUT -p tcp -j {OUT_CHAIN}")]
    }

    fn iptables(&self, args: &[String]) -> Result<std::process::Output, InitError> {
        Command::new(&self.iptables)
            .arg("-w")
            .args(["-t", "nat"])
            .args(args)
            .output()
            .map_err(|source| InitError::Spawn { binary: self.iptables.clone(), source })
    }

    fn must(&self, args: Vec<String>) -> Result<(), InitError> {
        if self.dry_run {
            palisade_cmd::outln!("{} -t nat {}", self.iptables, args.join(" "));
            return Ok(());
        }
        let out = self.iptables(&args)?;
        if !out.status.success() {
            return Err(InitError::Failed {
                command: format!("{} -t nat {}", self.iptables, args.join(" ")),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            });
        }
        Ok(())
    }

    /// Writes the rules (idempotently), or prints or verifies them, for IPv4
    /// and, with --ip6tables, IPv6.
    pub fn run(&self) -> Result<(), InitError> {
        self.run_one()?;
        if let Some(bin) = &self.ip6tables {
            Self { iptables: bin.clone(), ip6tables: None, ..self.clone() }.run_one()?;
        }
        Ok(())
    }

    fn run_one(&self) -> Result<(), InitError> {
        if self.verify {
            return self.check();
        }
        let split = |rule: &str| rule.split_whitespace().map(String::from).collect::<Vec<_>>();
        for chain in [IN_CHAIN, OUT_CHAIN] {
            // Create if missing (an existing chain is fine), then empty it.
            if self.dry_run || !self.iptables(&["-S".into(), chain.into()])?.status.success() {
                self.must(vec!["-N".into(), chain.into()])?;
            }
            self.must(vec!["-F".into(), chain.into()])?;
        }
        for rule in self.chain_rules() {
            self.must(split(&rule))?;
        }
        for jump in self.jump_rules() {
            let mut check = split(&jump);
            check[0] = "-C".into();
            if self.dry_run || !self.iptables(&check)?.status.success() {
                self.must(split(&jump))?;
            }
        }
        Ok(())
    }

    fn check(&self) -> Result<(), InitError> {
        let out = self.iptables(&["-S".into()])?;
        if !out.status.success() {
            return Err(InitError::Failed {
                command: format!("{} -t nat -S", self.iptables),
                stderr: String::from_utf8_lossy(&out.stderr).into(),
            });
        }
        let have: Vec<String> = String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect();
        let ours: Vec<&String> = have
            .iter()
            .filter(|l| l.starts_with(&format!("-A {IN_CHAIN} ")) || l.starts_with(&format!("-A {OUT_CHAIN} ")))
            .collect();
        let want = self.chain_rules();
        let mut missing: Vec<String> =
            want.iter().chain(self.jump_rules().iter()).filter(|r| !have.contains(r)).cloned().collect();
        if ours.len() != want.len() {
            let rules = palisade_cmd::plural(ours.len(), "rule", "rules");
            missing.push(format!("{rules} in the Palisade chains, expected {}", want.len()));
        }
        if missing.is_empty() { Ok(()) } else { Err(InitError::Missing { missing }) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_exclude_the_proxy_loopback_admin_and_skipped_ports() {
        let cfg = InitConfig::parse_from([
            "init",
            "--skip-inbound-ports",
            "22",
            "--skip-outbound-ports",
            "5432,6379",
            "--ip6tables",
            "ip6tables",
        ]);
        assert_eq!(cfg.ip6tables.as_deref(), Some("ip6tables"));
        let rules = cfg.chain_rules().join("\n");
        for needle in [
            "--dport 4191 -j RETURN",
            "--dport 4143 -j RETURN",
            "--dport 22 -j RETURN",
            "-j REDIRECT --to-ports 4143",
            "--uid-owner 1337 -j RETURN",
            "-o lo -j RETURN",
            "--dport 5432 -j RETURN",
            "--dport 6379 -j RETURN",
            "-j REDIRECT --to-ports 4140",
        ] {
            assert!(rules.contains(needle), "{needle} missing from\n{rules}");
        }
        // The exclusions come before the redirects.
        assert!(rules.find("--uid-owner").unwrap() < rules.find("--to-ports 4140").unwrap());
    }
}
