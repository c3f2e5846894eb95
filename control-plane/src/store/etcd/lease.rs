//! The lead among the replicas: a leased `leader` key.

use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, Txn, TxnOp};

use super::{CALL, retried, timed};

/// How long a dead leader keeps the lead (its lease).
const LEADER_TTL: i64 = 5;

/// Runs for the lead: the replica whose leased `leader` key exists leads
/// while it keeps the lease alive; when it dies the key goes with its
/// lease and another takes it within about [`LEADER_TTL`] seconds.
pub(super) async fn lead(client: Client, key: String, replica: String, leader: tokio::sync::watch::Sender<bool>) {
    loop {
        let mut c = client.clone();
        let lease = match retried(|| {
            let mut c = client.clone();
            async move { c.lease_grant(LEADER_TTL, None).await }
        })
        .await
        {
            Ok(l) => l.id(),
            Err(_) => {
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        let put = TxnOp::put(key.as_str(), replica.as_bytes(), Some(etcd_client::PutOptions::new().with_lease(lease)));
        let txn = Txn::new().when([Compare::create_revision(key.as_str(), CompareOp::Equal, 0)]).and_then([put]);
        let won = retried(|| {
            let (mut kv, txn) = (client.kv_client(), txn.clone());
            async move { kv.txn(txn).await }
        })
        .await
        .is_ok_and(|r| r.succeeded());
        if !won {
            let _ = timed(c.lease_revoke(lease)).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        let Ok((mut keeper, mut acks)) = timed(c.lease_keep_alive(lease)).await else { continue };
        tracing::info!(replica = %replica, "this replica leads (singleton duties: pruning)");
        leader.send_replace(true);
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            if keeper.keep_alive().await.is_err() {
                break;
            }
            match tokio::time::timeout(CALL, acks.message()).await {
                Ok(Ok(Some(r))) if r.ttl() > 0 => {}
                _ => break,
            }
        }
        leader.send_replace(false);
        tracing::warn!(replica = %replica, "this replica lost the lead (its etcd lease lapsed)");
    }
}
