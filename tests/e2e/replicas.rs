//! Control-plane replicas on a real etcd (Debian's etcd-server, started
//! here on loopback ports): any replica serves any call, a change made on
//! one reaches the sidecars of another, revisions are never duplicated,
//! and concurrent conflicting applies fail cleanly.

use std::time::{Duration, Instant};

use palisade_tests::apps::HttpApp;
use palisade_tests::{ControlPlane, Proc, Sidecar, eventually, free_port, skip};

use crate::dataplane::{ORDERS, WEB};

const INVOICES: &str = "spiffe://cluster.local/ns/billing/sa/invoices";

/// A one-member etcd on loopback, its data in `dir`: the process, its
/// client URL, and a command that starts it again as it was.
pub(crate) async fn etcd(
    dir: &std::path::Path,
    log_dir: &std::path::Path,
) -> Option<(Proc, String, std::process::Command)> {
    if std::process::Command::new("etcd").arg("--version").output().is_err() {
        skip("replicas", "etcd is not installed (apt-get install etcd-server)");
        return None;
    }
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let again = etcd_command(dir, &url, peer);
    let mut cmd = etcd_command(dir, &url, peer);
    let proc = Proc::spawn("etcd", &mut cmd, log_dir).unwrap();
    serving(client).await;
    Some((proc, url, again))
}

async fn serving(port: u16) {
    eventually("etcd to serve", Duration::from_secs(20), || async {
        std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(drop)
    })
    .await
    .unwrap();
}

fn etcd_command(dir: &std::path::Path, url: &str, peer: u16) -> std::process::Command {
    let mut cmd = std::process::Command::new("etcd");
    cmd.arg("--data-dir")
        .arg(dir)
        .args(["--name", "m1", "--listen-client-urls", url, "--advertise-client-urls", url])
        .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
        .args(["--initial-cluster", &format!("m1=http://127.0.0.1:{peer}"), "--log-level", "warn"]);
    cmd
}

/// A store key: 32 bytes of `b`, base64.
pub(crate) fn base64_key(b: u8) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode([b; 32])
}

/// An operator root both replicas sign with: (cert file, key file).
pub(crate) fn shared_ca(dir: &std::path::Path) -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let key_pem = key.serialize_pem();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.distinguished_name.push(rcgen::DnType::CommonName, "Mesh Root");
    p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    p.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    let root = rcgen::CertifiedIssuer::self_signed(p, key).unwrap();
    let (cert, keyf) = (dir.join("ca.pem"), dir.join("ca-key.pem"));
    std::fs::write(&cert, root.pem()).unwrap();
    palisade_certs::files::write_secret(&keyf, &key_pem).unwrap();
    (cert.to_str().unwrap().to_string(), keyf.to_str().unwrap().to_string())
}

const DENY_ADMIN: &str = "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: no-admin, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}\n  action: DENY\n  rules: [{to: [{paths: [\"/admin/*\"]}]}]\n";

fn policy(name: &str, path: &str) -> String {
    format!(
        "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  target: {{identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}}\n  action: DENY\n  rules: [{{to: [{{paths: [\"{path}\"]}}]}}]\n"
    )
}

#[tokio::test]
async fn replicas_on_etcd_share_state_and_push_each_others_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((mut etcd_proc, url, mut again)) = etcd(&tmp.path().join("etcd"), tmp.path()).await else { return };
    // The key that seals the CA's private key in etcd, the same for every replica.
    let store_key = tmp.path().join("store.key");
    palisade_certs::files::write_secret(&store_key, &base64_key(7)).unwrap();
    let key_arg = store_key.to_str().unwrap();
    let args = [
        "--store",
        "etcd",
        "--etcd-endpoints",
        url.as_str(),
        "--store-key-file",
        key_arg,
        "--default-policy",
        "allow-authenticated",
    ];
    let a = ControlPlane::start(&tmp.path().join("a"), tmp.path(), &args).await.unwrap();
    let b = ControlPlane::start(&tmp.path().join("b"), tmp.path(), &args).await.unwrap();
    // One CA, made by the first replica and loaded by the second; its key is sealed in etcd.
    let bundles = eventually("both replicas' admin credentials", Duration::from_secs(10), || async {
        Some((std::fs::read_to_string(a.bundle()).ok()?, std::fs::read_to_string(b.bundle()).ok()?))
    })
    .await
    .unwrap();
    assert_eq!(bundles.0, bundles.1);
    let dump = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &url, "get", "--prefix", "/palisade/"])
        .output()
        .unwrap();
    let dump = String::from_utf8_lossy(&dump.stdout);
    assert!(dump.contains("/palisade/ca") && !dump.contains("PRIVATE KEY"), "{dump}");
    // A replica with another key, or a key file others can read, does not start.
    let other = tmp.path().join("other.key");
    palisade_certs::files::write_secret(&other, &base64_key(8)).unwrap();
    let loose = tmp.path().join("loose.key");
    palisade_certs::files::write_atomic(&loose, base64_key(7).as_bytes(), 0o644).unwrap();
    for (file, why) in [(&other, "give every replica the same key"), (&loose, "chmod 600")] {
        let out = std::process::Command::new(palisade_tests::bin("palisade-control-plane"))
            .arg("--data-dir")
            .arg(tmp.path().join("c"))
            .args(["--listen", "127.0.0.1:0", "--store", "etcd", "--etcd-endpoints", &url, "--store-key-file"])
            .arg(file)
            .output()
            .unwrap();
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains(why), "{}", String::from_utf8_lossy(&out.stderr));
    }

    // A token made on a admits a sidecar that joins through b; b's admin credential works on a.
    let app = HttpApp::start().await;
    let token = a.create_token(ORDERS, &[]).unwrap();
    let orders =
        Sidecar::spawn("orders", &b, tmp.path(), &["--join-token", &token, "--app", &app.addr.to_string()]).unwrap();
    orders.wait_ready().await.unwrap();
    let port = free_port();
    let web = Sidecar::meshed("web", &a, tmp.path(), WEB, &["--upstream", &format!("127.0.0.1:{port}=orders.shop")])
        .await
        .unwrap();
    // web (on a) learns orders' address, which orders registered through b.
    eventually("web's directory to list orders", Duration::from_secs(10), || async {
        (web.metric("palisade_directory_endpoints").await? >= 1.0).then_some(())
    })
    .await
    .unwrap();
    let out = std::process::Command::new(palisade_tests::bin("palisadectl"))
        .env("PALISADE_CONTROL_PLANE", &a.addr)
        .env("PALISADE_CREDENTIALS", b.admin_dir())
        .args(["token", "list", "-o", "json"])
        .output()
        .unwrap();
    assert!(out.status.success(), "b's admin credential against a: {}", String::from_utf8_lossy(&out.stderr));

    // A policy applied on a is enforced by orders, connected to b, within a second.
    let f = tmp.path().join("deny.yaml");
    std::fs::write(&f, DENY_ADMIN).unwrap();
    let base = format!("127.0.0.1:{port}");
    assert_eq!(palisade_tests::http::get(&base, "/admin/x").await.unwrap().0, 404, "allowed: the app answers");
    // Each replica knows the other's sidecars: a lists orders (connected to b) as synced.
    eventually("a to know orders' sync state from b", Duration::from_secs(5), || async {
        let out = a.ctl(&["proxies", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v.as_array()?.iter().any(|p| p["identity"] == ORDERS && p["sync_state"] == "synced").then_some(())
    })
    .await
    .unwrap();
    let applied = Instant::now();
    let out = a.ctl(&["policy", "apply", "-f", f.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    eventually("orders (on b) to enforce a's apply", Duration::from_secs(5), || async {
        (palisade_tests::http::get(&base, "/admin/x").await.ok()?.0 == 403).then_some(())
    })
    .await
    .unwrap();
    let took = applied.elapsed();
    assert!(took < Duration::from_secs(2), "apply on a reached b's sidecar in {took:?}");
    // `--wait` on a waits for the sidecars of both replicas.
    let f3 = tmp.path().join("wait.yaml");
    std::fs::write(&f3, policy("waited", "/waited/*")).unwrap();
    let out = a.ctl(&["policy", "apply", "-f", f3.to_str().unwrap(), "--wait", "10s"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("in force on 2 connected proxies"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(palisade_tests::http::get(&base, "/waited/x").await.unwrap().0, 403, "in force when --wait returns");
    assert_eq!(b.ctl(&["policy", "list", "-o", "json"]).status.code(), Some(0));

    // A cluster-scope limit is shared by the sidecars of an identity wherever they
    // are connected: a second orders sidecar, on a, halves the share of the one on b.
    let rl = tmp.path().join("shared-limit.yaml");
    std::fs::write(&rl, "apiVersion: palisade.dev/v1\nkind: RateLimitPolicy\nmetadata: {name: shared, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}\n  limits:\n    - {name: all, key: none, algorithm: token_bucket, rate: 60, period: 1s, burst: 5, scope: cluster}\n").unwrap();
    assert!(b.ctl(&["policy", "apply", "-f", rl.to_str().unwrap(), "--wait", "10s"]).status.success());
    assert_eq!(rate(&orders).await, Some(60));
    let orders2 = Sidecar::meshed("orders2", &a, tmp.path(), ORDERS, &["--app", &app.addr.to_string()]).await.unwrap();
    eventually("both orders sidecars to get half the quota", Duration::from_secs(10), || async {
        (rate(&orders).await == Some(30) && rate(&orders2).await == Some(30)).then_some(())
    })
    .await
    .unwrap();
    drop(orders2);
    eventually("the share to come back when one goes", Duration::from_secs(20), || async {
        (rate(&orders).await == Some(60)).then_some(())
    })
    .await
    .unwrap();
    assert!(b.ctl(&["policy", "delete", "rlp", "shop/shared"]).status.success());

    // Concurrent applies on both replicas: every revision distinct, nothing lost.
    let mut handles = Vec::new();
    for (cp, who) in [(&a, "a"), (&b, "b")] {
        for i in 0..8 {
            let f = tmp.path().join(format!("p-{who}-{i}.yaml"));
            std::fs::write(&f, policy(&format!("p-{who}-{i}"), &format!("/{who}/{i}"))).unwrap();
            let ctl = palisade_tests::bin("palisadectl");
            let (addr, creds) = (cp.addr.clone(), cp.admin_dir());
            handles.push(
                tokio::process::Command::new(ctl)
                    .env("PALISADE_CONTROL_PLANE", addr)
                    .env("PALISADE_CREDENTIALS", creds)
                    .args(["policy", "apply", "-o", "json", "-f"])
                    .arg(&f)
                    .output(),
            );
        }
    }
    let mut revisions = Vec::new();
    for h in handles {
        let out = h.await.unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        revisions.push(v[0]["revision"].as_u64().unwrap());
    }
    revisions.sort();
    let n = revisions.len();
    revisions.dedup();
    assert_eq!(revisions.len(), n, "no revision handed out twice: {revisions:?}");
    let listed = a.ctl(&["policy", "list", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(v.as_array().unwrap().len(), 18, "all 16 applies and the two before are stored: {v}");

    // The same resource changed on both replicas at once, several times:
    // each apply either wins with its own revision or is refused as a
    // conflict; what is stored is the content of the last winner.
    let mut runs = Vec::new();
    for i in 0..6 {
        let cp = if i % 2 == 0 { &a } else { &b };
        let f = tmp.path().join(format!("same-{i}.yaml"));
        std::fs::write(&f, policy("same", &format!("/same/{i}"))).unwrap();
        runs.push((
            i,
            tokio::process::Command::new(palisade_tests::bin("palisadectl"))
                .env("PALISADE_CONTROL_PLANE", &cp.addr)
                .env("PALISADE_CREDENTIALS", cp.admin_dir())
                .args(["policy", "apply", "-o", "json", "-f"])
                .arg(&f)
                .output(),
        ));
    }
    let mut winners = Vec::new();
    for (i, run) in runs {
        let out = run.await.unwrap();
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
            winners.push((v[0]["revision"].as_u64().unwrap(), i));
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains("was changed by another apply"), "{err}");
        }
    }
    winners.sort();
    assert!(!winners.is_empty());
    let last = winners.last().unwrap().1;
    // Reads come from each replica's watched copy: a sees b's last write within moments.
    eventually("the last winner to be stored", Duration::from_secs(5), || async {
        let stored = a.ctl(&["policy", "get", "ap", "shop/same", "-o", "json"]);
        String::from_utf8_lossy(&stored.stdout).contains(&format!("/same/{last}")).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {winners:?}"));
    eprintln!("concurrent applies of one resource: {} won, {} refused as conflicts", winners.len(), 6 - winners.len());

    // etcd lost: changes are refused with a clear error, traffic goes on
    // with what the sidecars hold; etcd back: the replicas catch up.
    etcd_proc.child.kill().unwrap();
    let _ = etcd_proc.child.wait();
    let f2 = tmp.path().join("late.yaml");
    std::fs::write(&f2, policy("late", "/late/*")).unwrap();
    let out2 = a.ctl(&["policy", "apply", "-f", f2.to_str().unwrap()]);
    assert!(!out2.status.success());
    assert!(
        String::from_utf8_lossy(&out2.stderr).contains("cannot persist the change"),
        "{}",
        String::from_utf8_lossy(&out2.stderr)
    );
    let r = palisade_tests::http::get(&base, "/echo").await.unwrap();
    assert_eq!(
        r.0,
        200,
        "traffic goes on without etcd: {r:?}\n--- web\n{}\n--- orders\n{}",
        tail(&web.proc.logs()),
        tail(&orders.proc.logs())
    );
    let port = url.rsplit(':').next().unwrap().parse().unwrap();
    let _etcd_again = Proc::spawn("etcd-again", &mut again, tmp.path()).unwrap();
    serving(port).await;
    let out = eventually("a to write to etcd again", Duration::from_secs(20), || async {
        let out = a.ctl(&["policy", "apply", "-f", f2.to_str().unwrap()]);
        out.status.success().then_some(out)
    })
    .await
    .unwrap();
    assert!(String::from_utf8_lossy(&out.stdout).contains("created"));
    eventually("orders (on b) to enforce the change made after etcd came back", Duration::from_secs(20), || async {
        (palisade_tests::http::get(&base, "/late/x").await.ok()?.0 == 403).then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_single_node_install_migrates_to_etcd_and_keeps_its_state_and_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((_etcd, url, _)) = etcd(&tmp.path().join("etcd"), tmp.path()).await else { return };
    let old_dir = tmp.path().join("single");
    // A file-store install with a policy, a token and an API key.
    let mut single = ControlPlane::start(&old_dir, tmp.path(), &[]).await.unwrap();
    let f = tmp.path().join("deny.yaml");
    std::fs::write(&f, DENY_ADMIN).unwrap();
    assert!(single.ctl(&["policy", "apply", "-f", f.to_str().unwrap()]).status.success());
    single.create_token(ORDERS, &["--uses", "3"]).unwrap();
    assert!(single.ctl(&["apikey", "create", "--name", "ci", "--principal", "ci-bot"]).status.success());
    let bundle = std::fs::read_to_string(single.bundle()).unwrap();
    single.proc.terminate(Duration::from_secs(10)).unwrap();

    let store_key = tmp.path().join("store.key");
    palisade_certs::files::write_secret(&store_key, &base64_key(3)).unwrap();
    let key_arg = store_key.to_str().unwrap();
    let etcd_args = ["--store", "etcd", "--etcd-endpoints", url.as_str(), "--store-key-file", key_arg];
    let migrate = [&etcd_args[..], &["--migrate-from", old_dir.to_str().unwrap()]].concat();
    let a = ControlPlane::start(&tmp.path().join("a"), tmp.path(), &migrate).await.unwrap();
    assert!(a.proc.logs().contains("imported"), "{}", a.proc.logs());
    // The same CA (the old admin credential still works), policies at their revision, tokens, keys.
    assert_eq!(std::fs::read_to_string(a.bundle()).unwrap(), bundle);
    let old_admin = std::process::Command::new(palisade_tests::bin("palisadectl"))
        .env("PALISADE_CONTROL_PLANE", &a.addr)
        .env("PALISADE_CREDENTIALS", old_dir.join("admin"))
        .args(["policy", "list", "-o", "json"])
        .output()
        .unwrap();
    assert!(old_admin.status.success(), "{}", String::from_utf8_lossy(&old_admin.stderr));
    let v: serde_json::Value = serde_json::from_slice(&old_admin.stdout).unwrap();
    assert_eq!(v[0]["metadata"]["name"], "no-admin", "{v}");
    // The revision counter goes on from where the single node left it.
    let f2 = tmp.path().join("next.yaml");
    std::fs::write(&f2, policy("next", "/next/*")).unwrap();
    let out = a.ctl(&["policy", "apply", "-o", "json", "-f", f2.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v[0]["revision"], 2, "{v}");
    let tokens = String::from_utf8_lossy(&a.ctl(&["token", "list"]).stdout).to_string();
    assert!(tokens.contains(ORDERS), "{tokens}");
    let keys = String::from_utf8_lossy(&a.ctl(&["apikey", "list"]).stdout).to_string();
    assert!(keys.contains("ci-bot"), "{keys}");
    // A second replica joins without importing; importing again is refused.
    let b = ControlPlane::start(&tmp.path().join("b"), tmp.path(), &etcd_args).await.unwrap();
    assert_eq!(std::fs::read_to_string(b.bundle()).unwrap(), bundle);
    let out = std::process::Command::new(palisade_tests::bin("palisade-control-plane"))
        .arg("--data-dir")
        .arg(tmp.path().join("c"))
        .args(["--listen", "127.0.0.1:0"])
        .args(&migrate)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("start without --migrate-from"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The rate of the first limit a sidecar enforces.
async fn rate(sc: &Sidecar) -> Option<u64> {
    sc.config().await.and_then(|c| c["rate_limits"][0]["rate"].as_u64())
}

/// A 3-member etcd cluster on loopback: the members and the client URLs.
async fn etcd_cluster(dir: &std::path::Path, log_dir: &std::path::Path) -> Option<(Vec<Proc>, Vec<String>)> {
    if std::process::Command::new("etcd").arg("--version").output().is_err() {
        skip("replicas", "etcd is not installed (apt-get install etcd-server)");
        return None;
    }
    let ports: Vec<(u16, u16)> = (0..3).map(|_| (free_port(), free_port())).collect();
    let cluster = ports
        .iter()
        .enumerate()
        .map(|(i, (_, peer))| format!("m{i}=http://127.0.0.1:{peer}"))
        .collect::<Vec<_>>()
        .join(",");
    let mut members = Vec::new();
    let mut urls = Vec::new();
    for (i, (client, peer)) in ports.iter().enumerate() {
        let url = format!("http://127.0.0.1:{client}");
        let mut cmd = std::process::Command::new("etcd");
        cmd.arg("--data-dir")
            .arg(dir.join(format!("m{i}")))
            .args(["--name", &format!("m{i}"), "--listen-client-urls", &url, "--advertise-client-urls", &url])
            .args(["--listen-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-advertise-peer-urls", &format!("http://127.0.0.1:{peer}")])
            .args(["--initial-cluster", &cluster, "--initial-cluster-state", "new", "--log-level", "warn"]);
        members.push(Proc::spawn(&format!("etcd-m{i}"), &mut cmd, log_dir).unwrap());
        urls.push(url);
    }
    for (client, _) in &ports {
        serving(*client).await;
    }
    // The cluster answers once it has a leader.
    eventually("the etcd cluster to elect a leader", Duration::from_secs(20), || async {
        let out = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args(["--endpoints", &urls.join(","), "endpoint", "status", "--write-out", "json"])
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        v.as_array()?.iter().any(|m| m["Status"]["leader"].as_u64().unwrap_or(0) != 0).then_some(())
    })
    .await
    .unwrap();
    Some((members, urls))
}

pub(crate) async fn leads(metrics: &str) -> bool {
    palisade_tests::http::get(metrics, "/metrics")
        .await
        .is_ok_and(|(_, body)| body.lines().any(|l| l == "palisade_cp_leader 1"))
}

/// The control-plane replica that leads, and one etcd member, SIGKILLed
/// while traffic flows through two sidecars and policy changes every
/// half second: no request fails, renewals and a join go on through the
/// survivor, the lead moves, and no revision is lost or handed out twice.
#[tokio::test]
async fn losing_the_leading_replica_and_an_etcd_member_fails_no_request() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((mut members, urls)) = etcd_cluster(&tmp.path().join("etcd"), tmp.path()).await else { return };
    let endpoints = urls.join(",");
    let store_key = tmp.path().join("store.key");
    palisade_certs::files::write_secret(&store_key, &base64_key(9)).unwrap();
    let (ma, mb) = (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
    let common = [
        "--store",
        "etcd",
        "--etcd-endpoints",
        endpoints.as_str(),
        "--store-key-file",
        store_key.to_str().unwrap(),
        "--default-policy",
        "allow-authenticated",
        "--cert-ttl",
        "10s",
    ];
    let mut cps = vec![
        ControlPlane::start(&tmp.path().join("a"), tmp.path(), &[&common[..], &["--metrics-listen", &ma]].concat())
            .await
            .unwrap(),
        ControlPlane::start(&tmp.path().join("b"), tmp.path(), &[&common[..], &["--metrics-listen", &mb]].concat())
            .await
            .unwrap(),
    ];
    let metrics = [ma, mb];
    let leader = eventually("a replica to lead", Duration::from_secs(15), || async {
        for (i, m) in metrics.iter().enumerate() {
            if leads(m).await {
                return Some(i);
            }
        }
        None
    })
    .await
    .unwrap();
    let (cp_a, cp_b) = (cps[0].addr.clone(), cps[1].addr.clone());
    let both = format!("{cp_a},{cp_b}");
    let app = HttpApp::start().await;
    let t = cps[0].create_token(ORDERS, &[]).unwrap();
    let orders = Sidecar::spawn(
        "orders",
        &cps[0],
        tmp.path(),
        &["--join-token", &t, "--control-plane", &cp_b, "--app", &app.addr.to_string()],
    )
    .unwrap();
    orders.wait_ready().await.unwrap();
    let port = free_port();
    let t = cps[1].create_token(WEB, &[]).unwrap();
    let web = Sidecar::spawn(
        "web",
        &cps[1],
        tmp.path(),
        &["--join-token", &t, "--control-plane", &cp_a, "--upstream", &format!("127.0.0.1:{port}=orders.shop")],
    )
    .unwrap();
    web.wait_ready().await.unwrap();
    let base = format!("127.0.0.1:{port}");
    eventually("web to reach orders", Duration::from_secs(10), || async {
        (palisade_tests::http::get(&base, "/echo").await.ok()?.0 == 200).then_some(())
    })
    .await
    .unwrap();

    // Traffic: a request every 20 ms, each counted.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic = {
        let (stop, base) = (stop.clone(), base.clone());
        tokio::spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match palisade_tests::http::get(&base, "/echo").await {
                    Ok((200, _)) => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            (ok, failed)
        })
    };
    // Policy changes every half second, through whichever replica answers.
    let changes = {
        let (stop, dir) = (stop.clone(), tmp.path().to_path_buf());
        let targets = [(cp_a.clone(), cps[0].admin_dir()), (cp_b.clone(), cps[1].admin_dir())];
        tokio::spawn(async move {
            let (mut revisions, mut i) = (Vec::new(), 0usize);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let f = dir.join(format!("change-{i}.yaml"));
                std::fs::write(&f, policy(&format!("change-{i}"), &format!("/change/{i}"))).unwrap();
                for (addr, creds) in targets.iter().cycle().skip(i % 2).take(2) {
                    let out = tokio::process::Command::new(palisade_tests::bin("palisadectl"))
                        .env("PALISADE_CONTROL_PLANE", addr)
                        .env("PALISADE_CREDENTIALS", creds)
                        .args(["policy", "apply", "-o", "json", "-f"])
                        .arg(&f)
                        .output()
                        .await
                        .unwrap();
                    if out.status.success() {
                        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
                        revisions.push(v[0]["revision"].as_u64().unwrap());
                        break;
                    }
                }
                i += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            (i, revisions)
        })
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let renewals = [
        orders.metric("palisade_identity_renewals_total").await.unwrap(),
        web.metric("palisade_identity_renewals_total").await.unwrap(),
    ];
    // SIGKILL the leading replica and one etcd member.
    let dead = cps.remove(leader);
    let mut dead = dead;
    dead.proc.child.kill().unwrap();
    let _ = dead.proc.child.wait();
    members[0].child.kill().unwrap();
    let _ = members[0].child.wait();
    let survivor = &cps[0];
    let survivor_metrics = &metrics[1 - leader];
    // Within the lease (5 s), plus etcd's own election: etcd extends leases when its leader changes.
    eventually("the lead to move to the survivor", Duration::from_secs(30), || async {
        leads(survivor_metrics).await.then_some(())
    })
    .await
    .unwrap();
    // A sidecar joins while one replica and one etcd member are gone.
    let t = survivor.create_token(INVOICES, &[]).unwrap();
    let joiner =
        Sidecar::spawn("invoices", survivor, tmp.path(), &["--join-token", &t, "--control-plane", &both]).unwrap();
    joiner.wait_ready().await.unwrap();
    // Long enough for both sidecars to renew (10 s certificates) through the survivor.
    eventually("both sidecars to renew after the loss", Duration::from_secs(20), || async {
        let o = orders.metric("palisade_identity_renewals_total").await?;
        let w = web.metric("palisade_identity_renewals_total").await?;
        (o > renewals[0] && w > renewals[1]).then_some(())
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (ok, failed) = traffic.await.unwrap();
    let (attempts, mut revisions) = changes.await.unwrap();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed: {:?}",
        failed.len(),
        ok as usize + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 200, "{ok} requests");
    let n = revisions.len();
    assert!(n as f64 >= attempts as f64 * 0.7, "{n} of {attempts} changes applied");
    let sorted = {
        revisions.sort();
        revisions.clone()
    };
    revisions.dedup();
    assert_eq!(revisions.len(), n, "no revision handed out twice: {sorted:?}");
    // Every applied change is stored.
    let out = survivor.ctl(&["policy", "list", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v.as_array().unwrap().len() >= n, "{n} applied, {} stored", v.as_array().unwrap().len());
    eprintln!(
        "{ok} requests, 0 failed; {n} of {attempts} policy changes applied, revisions {:?}..{:?}",
        sorted.first(),
        sorted.last()
    );
}

/// `curl` to a replica's token service, as its issuer `https://localhost:7443`.
async fn oauth_get(cp: &ControlPlane, port: u16, path: &str, extra: &[&str]) -> String {
    let out = tokio::process::Command::new("curl")
        .args(["-s", "--cacert"])
        .arg(cp.bundle())
        .args(["--connect-to", &format!("localhost:7443:127.0.0.1:{port}")])
        .args(extra)
        .arg(format!("https://localhost:7443{path}"))
        .output()
        .await
        .unwrap();
    String::from_utf8_lossy(&out.stdout).to_string()
}

fn kids(jwks: &str) -> Vec<String> {
    let v: serde_json::Value = serde_json::from_str(jwks).unwrap_or_default();
    let mut k: Vec<String> =
        v["keys"].as_array().into_iter().flatten().filter_map(|k| k["kid"].as_str().map(str::to_string)).collect();
    k.sort();
    k
}

#[tokio::test]
async fn replicas_share_the_token_service_and_its_rotating_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let Some((_etcd, url, _)) = etcd(&tmp.path().join("etcd"), tmp.path()).await else { return };
    let store_key = tmp.path().join("store.key");
    palisade_certs::files::write_secret(&store_key, &base64_key(5)).unwrap();
    let (pa, pb) = (free_port(), free_port());
    let args = |port: u16| {
        [
            "--store",
            "etcd",
            "--etcd-endpoints",
            url.as_str(),
            "--store-key-file",
            store_key.to_str().unwrap(),
            "--oauth-issuer",
            "https://localhost:7443",
            "--oauth-key-rotation",
            "4s",
            "--oauth-token-ttl",
            "10s",
        ]
        .iter()
        .map(|s| s.to_string())
        .chain(["--oauth-listen".to_string(), format!("127.0.0.1:{port}")])
        .collect::<Vec<_>>()
    };
    let (aa, ba) = (args(pa), args(pb));
    let a = ControlPlane::start(&tmp.path().join("a"), tmp.path(), &aa.iter().map(String::as_str).collect::<Vec<_>>())
        .await
        .unwrap();
    let b = ControlPlane::start(&tmp.path().join("b"), tmp.path(), &ba.iter().map(String::as_str).collect::<Vec<_>>())
        .await
        .unwrap();
    // One key set, published by both.
    let ja = oauth_get(&a, pa, "/.well-known/jwks.json", &[]).await;
    assert!(!kids(&ja).is_empty(), "{ja}");
    assert_eq!(kids(&ja), kids(&oauth_get(&b, pb, "/.well-known/jwks.json", &[]).await));
    // A client registered on a gets a token from b, signed with a key a publishes.
    let out = a.ctl(&["oauth", "client", "create", "--name", "billing", "--scopes", "orders.read", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let creds = format!("{}:{}", c["client_id"].as_str().unwrap(), c["client_secret"].as_str().unwrap());
    let token = eventually("b to know the client", Duration::from_secs(5), || async {
        let r = oauth_get(&b, pb, "/oauth2/token", &["-u", &creds, "-d", "grant_type=client_credentials"]).await;
        let v: serde_json::Value = serde_json::from_str(&r).ok()?;
        v["access_token"].as_str().map(str::to_string)
    })
    .await
    .unwrap();
    use base64::Engine as _;
    let header = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(token.split('.').next().unwrap()).unwrap();
    let kid = serde_json::from_slice::<serde_json::Value>(&header).unwrap()["kid"].as_str().unwrap().to_string();
    assert!(kids(&oauth_get(&a, pb, "/.well-known/jwks.json", &[]).await).contains(&kid));
    // The leader rotates the shared keys; the other replica publishes the same new set.
    let first = kids(&ja);
    eventually("a rotated key set, the same on both replicas", Duration::from_secs(20), || async {
        let (ka, kb) = (
            kids(&oauth_get(&a, pa, "/.well-known/jwks.json", &[]).await),
            kids(&oauth_get(&b, pb, "/.well-known/jwks.json", &[]).await),
        );
        (ka != first && ka == kb).then_some(())
    })
    .await
    .unwrap();
}

fn tail(log: &str) -> String {
    log.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev().collect::<Vec<_>>().join("\n")
}
