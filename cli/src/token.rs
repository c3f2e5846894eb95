//! `palisadectl token`: join tokens.

use std::time::{Duration, SystemTime};

use anyhow::Result;
use clap::Subcommand;
use palisade_cmd::outln;
use palisade_proto::v1::{CreateJoinTokenRequest, JoinTokenInfo, ListJoinTokensRequest, RevokeJoinTokenRequest};

use crate::client::{admin, status_err};
use crate::show::{print_value, relative, time_str, ts};
use crate::{Online, Output, table};

#[derive(Debug, Subcommand)]
pub(crate) enum TokenCmd {
    /// Create a join token; prints only the token on stdout (or JSON with -o json).
    Create {
        /// Identity the token attests: spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>.
        #[arg(long)]
        identity: String,
        /// Lifetime, e.g. 10m, 1h (default: the control plane's, 10m).
        #[arg(long, value_parser = palisade_cmd::duration_arg)]
        ttl: Option<Duration>,
        /// How many certificates the token may obtain.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
        uses: u32,
    },
    /// List join tokens (ids and state; never the secrets).
    List,
    /// Revoke a join token by id (see `token list`).
    Revoke {
        /// Token id.
        id: String,
    },
}

/// A token as `-o json` shows it (never its secret).
fn token_json(t: &JoinTokenInfo) -> serde_json::Value {
    serde_json::json!({
        "id": t.id,
        "identity": t.identity,
        "created_at": time_str(ts(&t.created_at)),
        "expires_at": time_str(ts(&t.expires_at)),
        "uses_total": t.uses_total,
        "uses_left": t.uses_left,
        "revoked": t.revoked,
        "state": token_state(t),
    })
}

/// What a token can still do: `revoked`, `expired`, `used` or `active`.
fn token_state(t: &JoinTokenInfo) -> &'static str {
    if t.revoked {
        "revoked"
    } else if ts(&t.expires_at).is_some_and(|e| e <= SystemTime::now()) {
        "expired"
    } else if t.uses_left == 0 {
        "used"
    } else {
        "active"
    }
}

/// Runs a `token` subcommand.
pub(crate) async fn run(cli: &Online, cmd: &TokenCmd) -> Result<()> {
    let mut client = admin(cli).await?;
    match cmd {
        TokenCmd::Create { identity, ttl, uses } => {
            palisade_certs::SpiffeId::parse_workload(identity).map_err(|e| crate::usage(format!("--identity: {e}")))?;
            let resp = client
                .create_join_token(CreateJoinTokenRequest {
                    identity: identity.clone(),
                    ttl_seconds: ttl.map(|d| d.as_secs().max(1)).unwrap_or(0),
                    uses: *uses,
                })
                .await
                .map_err(status_err)?
                .into_inner();
            if cli.output != Output::Table {
                let mut v = resp.info.as_ref().map(token_json).unwrap_or_default();
                v["token"] = resp.token.into();
                print_value(cli.output, &serde_json::to_value(&v)?)?;
            } else {
                outln!("{}", resp.token);
                if let Some(info) = &resp.info {
                    eprintln!(
                        "token {} for {} expires {} ({}), {}; it is shown only once",
                        info.id,
                        info.identity,
                        time_str(ts(&info.expires_at)),
                        relative(ts(&info.expires_at)),
                        palisade_cmd::plural(info.uses_total, "use", "uses")
                    );
                }
            }
        }
        TokenCmd::List => {
            let tokens =
                client.list_join_tokens(ListJoinTokensRequest {}).await.map_err(status_err)?.into_inner().tokens;
            if cli.output != Output::Table {
                print_value(cli.output, &serde_json::to_value(tokens.iter().map(token_json).collect::<Vec<_>>())?)?;
            } else {
                let rows = tokens
                    .iter()
                    .map(|t| {
                        vec![
                            t.id.clone(),
                            t.identity.clone(),
                            token_state(t).into(),
                            format!("{}/{}", t.uses_left, t.uses_total),
                            relative(ts(&t.expires_at)),
                        ]
                    })
                    .collect();
                table::print(&["ID", "IDENTITY", "STATE", "USES LEFT", "EXPIRES"], rows);
            }
        }
        TokenCmd::Revoke { id } => {
            let info = client
                .revoke_join_token(RevokeJoinTokenRequest { id: id.clone() })
                .await
                .map_err(status_err)?
                .into_inner()
                .info
                .unwrap_or_default();
            if cli.output != Output::Table {
                print_value(cli.output, &serde_json::to_value(token_json(&info))?)?;
            } else {
                outln!("revoked token {} ({})", info.id, info.identity);
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, SystemTime};

    use super::*;

    #[test]
    fn a_token_is_revoked_expired_used_or_active() {
        let at = |d: Duration, later: bool| {
            let now = SystemTime::now();
            Some((if later { now + d } else { now - d }).into())
        };
        let live = JoinTokenInfo { uses_left: 1, expires_at: at(Duration::from_secs(600), true), ..Default::default() };
        assert_eq!(token_state(&live), "active");
        assert_eq!(token_state(&JoinTokenInfo { uses_left: 0, ..live.clone() }), "used");
        assert_eq!(
            token_state(&JoinTokenInfo { expires_at: at(Duration::from_secs(1), false), ..live.clone() }),
            "expired"
        );
        assert_eq!(token_state(&JoinTokenInfo { revoked: true, uses_left: 0, ..live.clone() }), "revoked");
        assert_eq!(token_json(&live)["state"], "active");
    }
}
