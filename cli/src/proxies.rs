//! `palisadectl proxies`: the proxies holding certificates and their policy sync.

use std::time::SystemTime;

use anyhow::Result;
use palisade_proto::v1::{ListProxiesRequest, ProxyInfo};

use crate::client::{admin, status_err};
use crate::show::{print_value, relative, time_str, ts};
use crate::{Online, Output, table};

/// A proxy's policy sync state as the control plane reports it. The wire
/// carries a string (`ProxyInfo.sync_state`); it is parsed once, here.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum SyncState {
    /// Never connected (an empty string on the wire).
    Never,
    /// Connected, and the last snapshot sent is ACKed.
    Synced,
    /// Connected, a snapshot sent and not yet ACKed.
    Pending,
    /// Connected, and the proxy rejected the last snapshot.
    Nacked,
    /// Was connected; its stream is gone.
    Disconnected,
    /// A state this CLI does not know (from a newer control plane), shown as sent.
    Other(String),
}

impl SyncState {
    /// The state a proxy reports.
    pub(crate) fn of(p: &ProxyInfo) -> Self {
        Self::from(p.sync_state.as_str())
    }

    /// The wire name (empty for [`SyncState::Never`]).
    pub(crate) fn as_str(&self) -> &str {
        match self {
            Self::Never => "",
            Self::Synced => "synced",
            Self::Pending => "pending",
            Self::Nacked => "nacked",
            Self::Disconnected => "disconnected",
            Self::Other(s) => s,
        }
    }

    /// Whether the proxy holds a config stream now (a state this CLI does
    /// not know counts as connected).
    pub(crate) fn is_connected(&self) -> bool {
        !matches!(self, Self::Never | Self::Disconnected)
    }
}

impl From<&str> for SyncState {
    fn from(s: &str) -> Self {
        match s {
            "" => Self::Never,
            "synced" => Self::Synced,
            "pending" => Self::Pending,
            "nacked" => Self::Nacked,
            "disconnected" => Self::Disconnected,
            other => Self::Other(other.to_string()),
        }
    }
}

/// The SYNC column: `-` if never connected, a NACK with its reason.
fn sync_cell(p: &ProxyInfo) -> String {
    match (SyncState::of(p), p.last_nack.is_empty()) {
        (SyncState::Never, _) => "-".into(),
        (SyncState::Nacked, false) => format!("nacked: {}", p.last_nack),
        (s, _) => s.as_str().to_string(),
    }
}

/// Lists the proxies.
pub(crate) async fn run(cli: &Online) -> Result<()> {
    let mut client = admin(cli).await?;
    let proxies = client.list_proxies(ListProxiesRequest {}).await.map_err(status_err)?.into_inner().proxies;
    let now = SystemTime::now();
    let state = |p: &ProxyInfo| {
        if ts(&p.cert_not_after).is_some_and(|t| t > now) { "valid" } else { "expired" }
    };
    if cli.output != Output::Table {
        let v: Vec<_> = proxies
            .iter()
            .map(|p| {
                serde_json::json!({
                    "identity": p.identity,
                    "inbound_addr": p.inbound_addr,
                    "peer_addr": p.peer_addr,
                    "cert_serial": p.cert_serial,
                    "cert_not_after": time_str(ts(&p.cert_not_after)),
                    "cert_state": state(p),
                    "last_seen": time_str(ts(&p.last_seen)),
                    "attestation": p.attestation,
                    "policy_version": p.policy_version,
                    "sync_state": SyncState::of(p).as_str(),
                    "last_nack": p.last_nack,
                })
            })
            .collect();
        return print_value(cli.output, &serde_json::Value::Array(v));
    }
    let rows = proxies
        .iter()
        .map(|p| {
            vec![
                p.identity.clone(),
                if p.inbound_addr.is_empty() { "-".into() } else { p.inbound_addr.clone() },
                p.peer_addr.clone(),
                format!("{} ({})", relative(ts(&p.cert_not_after)), state(p)),
                relative(ts(&p.last_seen)),
                p.attestation.clone(),
                if p.policy_version.is_empty() { "-".into() } else { p.policy_version.clone() },
                sync_cell(p),
            ]
        })
        .collect();
    table::print(&["IDENTITY", "INBOUND", "PEER", "CERT EXPIRES", "LAST SEEN", "ATTESTED BY", "POLICY", "SYNC"], rows);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_states_parse_and_print_as_sent() {
        let known = [
            ("", SyncState::Never),
            ("synced", SyncState::Synced),
            ("pending", SyncState::Pending),
            ("nacked", SyncState::Nacked),
            ("disconnected", SyncState::Disconnected),
            ("draining", SyncState::Other("draining".into())),
        ];
        for (wire, state) in known {
            assert_eq!(SyncState::from(wire), state, "{wire:?}");
            assert_eq!(state.as_str(), wire);
        }
        assert!(SyncState::Synced.is_connected() && SyncState::Other("x".into()).is_connected());
        assert!(!SyncState::Never.is_connected() && !SyncState::Disconnected.is_connected());
    }

    #[test]
    fn the_sync_column_shows_a_nack_with_its_reason() {
        let p = |state: &str, nack: &str| ProxyInfo {
            sync_state: state.into(),
            last_nack: nack.into(),
            ..Default::default()
        };
        assert_eq!(sync_cell(&p("", "")), "-");
        assert_eq!(sync_cell(&p("nacked", "bad rule")), "nacked: bad rule");
        assert_eq!(sync_cell(&p("nacked", "")), "nacked");
        assert_eq!(sync_cell(&p("pending", "old")), "pending");
        assert_eq!(sync_cell(&p("synced", "")), "synced");
    }
}
