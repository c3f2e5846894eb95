//! The etcd store against a real etcd, started here on loopback ports with
//! its data in a temporary directory. Without the `etcd` binary the tests
//! say so and pass, except under `CI=true`, where they fail.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{EtcdOptions, EtcdSecrets, EtcdStore};
use crate::store::sealed::{Kek, SealError, SecretError, SecretHome};
use crate::store::{ApiKeyRecord, Change, Store, TokenRecord, TokenRefusal};

/// One etcd member, killed when dropped.
struct Etcd {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Polls `f` until it answers, for `within`.
fn eventually<T>(what: &str, within: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn etcd(test: &str) -> Option<Etcd> {
    if std::process::Command::new("etcd").arg("--version").output().is_err() {
        assert!(std::env::var("CI").is_err(), "CI=true and {test} cannot run: etcd is not installed");
        println!("SKIPPED {test}: etcd is not installed (apt-get install etcd-server)");
        return None;
    }
    let dir = tempfile::tempdir().unwrap();
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let log = std::fs::File::create(dir.path().join("etcd.log")).unwrap();
    let child = std::process::Command::new("etcd")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--name", "m1", "--listen-client-urls", &url, "--advertise-client-urls", &url])
        .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("m1={peer_url}"), "--log-level", "warn"])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let etcd = Etcd { child, url, _dir: dir };
    eventually("etcd to serve", Duration::from_secs(20), || std::net::TcpStream::connect(("127.0.0.1", client)).ok());
    Some(etcd)
}

fn open(etcd: &Etcd) -> EtcdStore {
    let opts = EtcdOptions { endpoints: vec![etcd.url.clone()], prefix: "/t/".into(), ..Default::default() };
    EtcdStore::open(&opts).unwrap()
}

fn key(name: &str) -> ApiKeyRecord {
    ApiKeyRecord::sample(name)
}

/// Waits for `change` on `rx`, skipping others.
fn wait_for(rx: &mut tokio::sync::broadcast::Receiver<Change>, change: Change) {
    eventually(&format!("{change:?} from the watch"), Duration::from_secs(10), || {
        loop {
            match rx.try_recv() {
                Ok(c) if c == change => return Some(()),
                Ok(_) => continue,
                Err(_) => return None,
            }
        }
    });
}

#[test]
fn records_are_shared_compare_and_swapped_and_watched() {
    let Some(etcd) = etcd("records_are_shared_compare_and_swapped_and_watched") else { return };
    let (a, b) = (open(&etcd), open(&etcd));
    let mut b_changes = b.watch().unwrap();
    assert!(a.put_api_key(key("ci")).unwrap());
    wait_for(&mut b_changes, Change::Credentials);
    assert_eq!(b.api_keys(), vec![key("ci")], "b's cache follows a's write");
    assert!(!b.put_api_key(key("ci")).unwrap(), "a name is created once, whichever replica asks");
    assert!(b.revoke_api_key("ci").unwrap().unwrap().revoked);
    eventually("a to see the revocation", Duration::from_secs(10), || a.api_keys()[0].revoked.then_some(()));

    // One use of a token, taken by one replica only.
    let token = TokenRecord {
        id: "t1".into(),
        sha256: "h".into(),
        identity: "spiffe://cluster.local/ns/a/sa/b".into(),
        created_at: 0,
        expires_at: u64::MAX,
        uses_total: 1,
        uses_left: 1,
        revoked: false,
    };
    a.put_token(token).unwrap();
    assert!(b.consume_token("h", 10).unwrap().is_ok());
    assert!(matches!(a.consume_token("h", 10).unwrap(), Err(TokenRefusal::Exhausted(_))));

    // Policy revisions are never handed out twice.
    let p = |json: &str| vec![("AuthorizationPolicy".to_string(), "shop/a".to_string(), json.to_string())];
    assert_eq!(a.apply_policies(p("{\"v\":1}")).unwrap().0, 1);
    wait_for(&mut b_changes, Change::Policies);
    assert_eq!(b.apply_policies(p("{\"v\":2}")).unwrap().0, 2);
    eventually("a to see revision 2", Duration::from_secs(10), || (a.policy_revision() == 2).then_some(()));
    assert_eq!(a.delete_policy("AuthorizationPolicy", "shop/a").unwrap(), Some(3));
}

#[test]
fn a_replica_takes_the_lead_when_the_leader_dies() {
    let Some(etcd) = etcd("a_replica_takes_the_lead_when_the_leader_dies") else { return };
    let (a, b) = (open(&etcd), open(&etcd));
    let (la, lb) = (a.leadership().unwrap(), b.leadership().unwrap());
    let leads = || (*la.borrow(), *lb.borrow());
    let first = eventually("a leader", Duration::from_secs(15), || match leads() {
        (true, false) => Some('a'),
        (false, true) => Some('b'),
        _ => None,
    });
    // One leader only, for a while.
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(100));
        assert!(leads() != (true, true), "two leaders");
    }
    // The leader dies (its lease is not revoked: it lapses).
    let (survivor, mut lead) = if first == 'a' {
        drop(a);
        (b, lb)
    } else {
        drop(b);
        (a, la)
    };
    eventually("the survivor to lead", Duration::from_secs(20), || (*lead.borrow_and_update()).then_some(()));
    // Its records are published under its lease, and seen by a later replica.
    survivor.publish_streams(BTreeMap::from([("s1".to_string(), b"sync".to_vec())]));
    let later = open(&etcd);
    eventually("the survivor's stream records", Duration::from_secs(10), || {
        (later.remote_streams() == vec![b"sync".to_vec()]).then_some(())
    });
}

#[test]
fn sealed_secrets_round_trip_between_replicas_and_stay_sealed() {
    let Some(etcd) = etcd("sealed_secrets_round_trip_between_replicas_and_stay_sealed") else { return };
    let kek = Arc::new(Kek::from_bytes(&[7u8; 32]).unwrap());
    let (a, b) = (Arc::new(open(&etcd)), Arc::new(open(&etcd)));
    let (sa, sb) = (EtcdSecrets::new(a.clone(), kek.clone()), EtcdSecrets::new(b.clone(), kek));
    let mut b_changes = b.watch().unwrap();
    assert!(sa.get("oauth-keys").unwrap().is_none());
    assert!(sa.put(Some(("oauth-keys", 0)), vec![("oauth-keys", Some(b"PRIVATE one".to_vec()))]).unwrap());
    assert!(
        !sb.put(Some(("oauth-keys", 0)), vec![("oauth-keys", Some(b"PRIVATE two".to_vec()))]).unwrap(),
        "the first replica made it"
    );
    wait_for(&mut b_changes, Change::Secret("oauth-keys".into()));
    let got = sb.get("oauth-keys").unwrap().unwrap();
    assert_eq!(got.value, b"PRIVATE one");
    // Sealed at rest.
    let (raw, _) = a.get_raw("oauth-keys").unwrap().unwrap();
    assert!(!String::from_utf8_lossy(&raw).contains("PRIVATE"));
    // A write at a stale version fails; at the current one, it goes through (several keys at once).
    assert!(
        sb.put(Some(("oauth-keys", got.version)), vec![("oauth-keys", None), ("ca", Some(b"c".to_vec()))]).unwrap()
    );
    assert!(!sa.put(Some(("oauth-keys", got.version)), vec![("oauth-keys", Some(b"x".to_vec()))]).unwrap());
    assert!(sa.get("oauth-keys").unwrap().is_none());
    assert_eq!(sa.get("ca").unwrap().unwrap().value, b"c");
    // A replica with another key says so.
    let other = EtcdSecrets::new(a, Arc::new(Kek::from_bytes(&[8u8; 32]).unwrap()));
    let err = other.get("ca").unwrap_err();
    assert!(matches!(err, SecretError::Seal { source: SealError::OtherKey { .. }, .. }), "{err}");
}
