//! Sync publication: each replica publishes the sync state of the sidecars
//! it serves under `streams/<replica>/`, leased, so that every replica
//! knows every connected sidecar (a root rotation waits on all of them).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Client, Txn, TxnOp};

use super::{CALL, TXN_OPS, timed};

/// How long a replica's stream records outlive it (its etcd lease).
const PRESENCE_TTL: i64 = 10;

/// Keeps this replica's stream records in etcd under a lease: what
/// `presence` holds is published (and what it no longer holds deleted)
/// within half a second; if the replica dies the lease ends and etcd
/// deletes them within [`PRESENCE_TTL`] seconds.
pub(super) async fn publish(client: Client, prefix: String, presence: Arc<Mutex<BTreeMap<String, Vec<u8>>>>) {
    loop {
        let mut c = client.clone();
        let lease = match timed(c.lease_grant(PRESENCE_TTL, None)).await {
            Ok(l) => l.id(),
            Err(e) => {
                tracing::warn!(error = %e, "cannot publish this replica's sidecars to etcd; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let Ok((mut keeper, mut acks)) = timed(c.lease_keep_alive(lease)).await else { continue };
        let mut published: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let mut tick = tokio::time::interval(Duration::from_millis(300));
        let mut renewed = tokio::time::Instant::now();
        loop {
            tick.tick().await;
            if renewed.elapsed() >= Duration::from_secs(3) {
                if keeper.keep_alive().await.is_err() {
                    break;
                }
                match tokio::time::timeout(CALL, acks.message()).await {
                    Ok(Ok(Some(r))) if r.ttl() > 0 => renewed = tokio::time::Instant::now(),
                    _ => break,
                }
            }
            let want = presence.lock().unwrap_or_else(|p| p.into_inner()).clone();
            let mut ops: Vec<TxnOp> = Vec::new();
            for (k, v) in &want {
                if published.get(k) != Some(v) {
                    let key = format!("{prefix}{}", palisade_cmd::hex(k.as_bytes()));
                    ops.push(TxnOp::put(key, v.clone(), Some(etcd_client::PutOptions::new().with_lease(lease))));
                }
            }
            for k in published.keys().filter(|k| !want.contains_key(*k)) {
                ops.push(TxnOp::delete(format!("{prefix}{}", palisade_cmd::hex(k.as_bytes())), None));
            }
            if ops.is_empty() {
                continue;
            }
            let mut kv = client.kv_client();
            let mut ok = true;
            for chunk in ops.chunks(TXN_OPS) {
                ok &= timed(kv.txn(Txn::new().and_then(chunk.to_vec()))).await.is_ok();
            }
            if ok {
                published = want;
            }
        }
        // The lease is lost (etcd away too long): a new one, everything published again.
        tracing::warn!("this replica's etcd lease lapsed; publishing its sidecars again");
    }
}
