//! `palisadectl apikey` and `palisadectl oauth client`: request credentials.
//! A key or client secret is printed once, at creation; the control plane
//! keeps only its hash.

use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;
use palisade_cmd::outln;
use palisade_proto::v1::{
    ApiKeyInfo, CreateApiKeyRequest, CreateOAuthClientRequest, DeleteOAuthClientRequest, ListApiKeysRequest,
    ListOAuthClientsRequest, OAuthClientInfo, RevokeApiKeyRequest,
};

use crate::client::{admin, status_err};
use crate::show::{print_value, relative, time_str, ts};
use crate::{Online, Output, table};

#[derive(Debug, Subcommand)]
pub(crate) enum ApiKeyCmd {
    /// Create an API key; prints the key once (stdout), or {"name", "key", ...} with -o json.
    Create {
        /// Unique name (what `apiKeys` in authorization rules match).
        #[arg(long)]
        name: String,
        /// Who requests made with the key act as (what `requestPrincipals` match), e.g. team/ci.
        #[arg(long)]
        principal: String,
        /// Lifetime, e.g. 30d (default: no expiry).
        #[arg(long, value_parser = palisade_cmd::duration_arg)]
        expires: Option<Duration>,
        /// Only workloads in this namespace accept the key (default: every workload an
        /// AuthenticationPolicy with apiKeys targets).
        #[arg(long)]
        namespace: Option<String>,
    },
    /// List API keys (names and state; never the keys).
    List,
    /// Revoke an API key by name: every sidecar refuses it within a second.
    Revoke {
        /// The key's name.
        name: String,
    },
}

#[derive(Debug, Subcommand)]
pub(crate) enum OAuthCmd {
    /// Clients of the mesh's token service (client credentials grant).
    #[command(subcommand)]
    Client(ClientCmd),
}

#[derive(Debug, Subcommand)]
pub(crate) enum ClientCmd {
    /// Register a client; prints client_id and client_secret once.
    Create {
        /// Unique name.
        #[arg(long)]
        name: String,
        /// Scopes the client may ask for, comma-separated (its tokens carry them in `scope`).
        #[arg(long, value_delimiter = ',')]
        scopes: Vec<String>,
        /// Audiences its tokens carry in `aud`, comma-separated (default: the issuer).
        #[arg(long, value_delimiter = ',')]
        audiences: Vec<String>,
    },
    /// List clients (never their secrets).
    List,
    /// Delete a client by client_id or name: its secret stops working at once.
    Delete {
        /// client_id or name.
        client: String,
    },
}

fn key_json(k: &ApiKeyInfo) -> serde_json::Value {
    serde_json::json!({
        "name": k.name,
        "principal": k.principal,
        "namespace": (!k.namespace.is_empty()).then_some(&k.namespace),
        "created_at": time_str(ts(&k.created_at)),
        "expires_at": k.expires_at.as_ref().map(|_| time_str(ts(&k.expires_at))),
        "revoked": k.revoked,
    })
}

fn client_json(c: &OAuthClientInfo) -> serde_json::Value {
    serde_json::json!({
        "client_id": c.client_id,
        "name": c.name,
        "scopes": c.scopes,
        "audiences": c.audiences,
        "created_at": time_str(ts(&c.created_at)),
    })
}

pub(crate) async fn apikey(cli: &Online, cmd: &ApiKeyCmd) -> Result<()> {
    let mut client = admin(cli).await?;
    match cmd {
        ApiKeyCmd::Create { name, principal, expires, namespace } => {
            let resp = client
                .create_api_key(CreateApiKeyRequest {
                    name: name.clone(),
                    principal: principal.clone(),
                    ttl_seconds: expires.map(|d| d.as_secs().max(1)).unwrap_or(0),
                    namespace: namespace.clone().unwrap_or_default(),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            if cli.output != Output::Table {
                let mut v = resp.info.as_ref().map(key_json).unwrap_or_default();
                v["key"] = resp.key.into();
                return print_value(cli.output, &v);
            }
            outln!("{}", resp.key);
            eprintln!(
                "API key {name} for {principal}{}; it is shown only once: send it in the x-api-key header",
                expires.map(|d| format!(", expires in {}", humantime::format_duration(d))).unwrap_or_default()
            );
        }
        ApiKeyCmd::List => {
            let keys = client.list_api_keys(ListApiKeysRequest {}).await.map_err(status_err)?.into_inner().keys;
            if cli.output != Output::Table {
                return print_value(
                    cli.output,
                    &serde_json::Value::from(keys.iter().map(key_json).collect::<Vec<_>>()),
                );
            }
            let rows = keys
                .iter()
                .map(|k| {
                    vec![
                        k.name.clone(),
                        k.principal.clone(),
                        if k.namespace.is_empty() { "*".into() } else { k.namespace.clone() },
                        if k.revoked { "revoked".into() } else { "active".into() },
                        if k.expires_at.is_some() { relative(ts(&k.expires_at)) } else { "never".into() },
                    ]
                })
                .collect();
            table::print(&["NAME", "PRINCIPAL", "NAMESPACE", "STATE", "EXPIRES"], rows);
        }
        ApiKeyCmd::Revoke { name } => {
            let k = client
                .revoke_api_key(RevokeApiKeyRequest { name: name.clone() })
                .await
                .map_err(status_err)?
                .into_inner();
            if cli.output != Output::Table {
                return print_value(cli.output, &key_json(&k));
            }
            outln!("revoked API key {} ({})", k.name, k.principal);
        }
    }
    Ok(())
}

pub(crate) async fn oauth(cli: &Online, cmd: &OAuthCmd) -> Result<()> {
    let mut client = admin(cli).await?;
    let OAuthCmd::Client(cmd) = cmd;
    match cmd {
        ClientCmd::Create { name, scopes, audiences } => {
            let resp = client
                .create_o_auth_client(CreateOAuthClientRequest {
                    name: name.clone(),
                    scopes: scopes.clone(),
                    audiences: audiences.clone(),
                })
                .await
                .map_err(status_err)?
                .into_inner();
            if cli.output != Output::Table {
                let mut v = resp.info.as_ref().map(client_json).unwrap_or_default();
                v["client_id"] = resp.client_id.into();
                v["client_secret"] = resp.client_secret.into();
                return print_value(cli.output, &v);
            }
            outln!("client_id:     {}", resp.client_id);
            outln!("client_secret: {}", resp.client_secret);
            eprintln!("the secret is shown only once; the token endpoint is <issuer>/oauth2/token");
        }
        ClientCmd::List => {
            let clients =
                client.list_o_auth_clients(ListOAuthClientsRequest {}).await.map_err(status_err)?.into_inner().clients;
            if cli.output != Output::Table {
                return print_value(
                    cli.output,
                    &serde_json::Value::from(clients.iter().map(client_json).collect::<Vec<_>>()),
                );
            }
            let rows = clients
                .iter()
                .map(|c| vec![c.client_id.clone(), c.name.clone(), c.scopes.join(","), c.audiences.join(",")])
                .collect();
            table::print(&["CLIENT ID", "NAME", "SCOPES", "AUDIENCES"], rows);
        }
        ClientCmd::Delete { client: which } => {
            let c = client
                .delete_o_auth_client(DeleteOAuthClientRequest { client_id: which.clone() })
                .await
                .map_err(status_err)?
                .into_inner();
            if cli.output != Output::Table {
                return print_value(cli.output, &client_json(&c));
            }
            outln!("deleted OAuth client {} ({})", c.client_id, c.name);
        }
    }
    Ok(())
}
