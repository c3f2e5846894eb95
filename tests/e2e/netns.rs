//! Two "pods" as network namespaces joined by a bridge, each with
//! `palisade-sidecar init` rules and a sidecar running as UID 1337, a control
//! plane in a third namespace, and an unmeshed client in a fourth. Apps speak
//! plain HTTP and TCP to pod IPs; the sidecars carry it over mTLS.
//!
//! Needs root, iproute2, iptables, tcpdump, setpriv, curl and python3
//! (`.ci/run` installs them); otherwise the test says it is skipped.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use palisade_tests::{Proc, bin, eventually};

const CP_IP: &str = "10.99.0.1";
const A_IP: &str = "10.99.0.2";
const B_IP: &str = "10.99.0.3";
const C_IP: &str = "10.99.0.4";
const A_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
const B_ID: &str = "spiffe://cluster.local/ns/shop/sa/orders";

fn missing_prerequisite() -> Option<String> {
    palisade_tests::missing_root_and_tools(&["ip", "iptables", "tcpdump", "setpriv", "curl", "python3"])
}

fn sh(cmd: &str) -> Output {
    Command::new("sh").args(["-c", cmd]).output().expect("invariant: sh runs")
}

fn must(cmd: &str) {
    let out = sh(cmd);
    assert!(out.status.success(), "`{cmd}` failed: {}", String::from_utf8_lossy(&out.stderr));
}

/// The namespaces; deleted on drop (also when the test fails).
struct Net {
    id: String,
}

impl Net {
    fn ns(&self, name: &str) -> String {
        format!("pal{}-{name}", self.id)
    }

    fn create() -> Self {
        let net = Net { id: std::process::id().to_string() };
        let hub = net.ns("net");
        must(&format!(
            "ip netns add {hub} && ip -n {hub} link set lo up && ip -n {hub} link add br0 type bridge && ip -n {hub} addr add {CP_IP}/24 dev br0 && ip -n {hub} link set br0 up"
        ));
        for (name, ip) in [("a", A_IP), ("b", B_IP), ("c", C_IP)] {
            let ns = net.ns(name);
            let (host_end, pod_end) = (format!("v{}{name}h", net.id), format!("v{}{name}p", net.id));
            must(&format!(
                "ip netns add {ns} && ip -n {ns} link set lo up && ip link add {host_end} type veth peer name {pod_end} && \
                 ip link set {host_end} netns {hub} && ip link set {pod_end} netns {ns} && \
                 ip -n {hub} link set {host_end} master br0 && ip -n {hub} link set {host_end} up && \
                 ip -n {ns} link set {pod_end} name eth0 && ip -n {ns} addr add {ip}/24 dev eth0 && ip -n {ns} link set eth0 up"
            ));
        }
        net
    }

    fn exec(&self, ns: &str, cmd: &str) -> Output {
        sh(&format!("ip netns exec {} {cmd}", self.ns(ns)))
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for name in ["a", "b", "c", "net"] {
            let ns = self.ns(name);
            // Kill anything still running inside, then delete the namespace.
            let _ = sh(&format!("ip netns pids {ns} 2>/dev/null | xargs -r kill -9; ip netns del {ns} 2>/dev/null"));
        }
    }
}

/// Files a UID-1337 sidecar can read (the test's temp dir is private).
fn shared_dir(tmp: &Path) -> PathBuf {
    let d = tmp.join("shared");
    std::fs::create_dir_all(&d).unwrap();
    must(&format!("chmod 755 {} {} && chown 1337:1337 {}", tmp.display(), d.display(), d.display()));
    d
}

fn spawn_in(net: &Net, ns: &str, name: &str, cmd: &str, logs: &Path) -> Proc {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", &net.ns(ns), "sh", "-c", &format!("exec {cmd}")]);
    Proc::spawn(name, &mut c, logs).unwrap()
}

/// curl from inside a namespace; returns (status, body).
fn curl(net: &Net, ns: &str, args: &str) -> (u16, String) {
    let out = net.exec(ns, &format!("curl -s --max-time 5 -w '\\n%{{http_code}}' {args}"));
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

const TCP_ECHO: &str = r#"import socket
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(("127.0.0.1", 9000)); s.listen(16)
while True:
    c, _ = s.accept(); data = b""
    while True:
        d = c.recv(4096)
        if not d: break
        data += d
    c.sendall(b"echo:" + data); c.close()
"#;

const TCP_CLIENT: &str = r#"import socket, sys
s = socket.create_connection((sys.argv[1], 9000), timeout=5); s.sendall(b"raw tcp bytes"); s.shutdown(socket.SHUT_WR)
out = b""
while True:
    d = s.recv(4096)
    if not d: break
    out += d
print(out.decode())
"#;

#[tokio::test]
async fn two_pods_talk_plain_http_and_tcp_carried_over_mtls() {
    if let Some(why) = missing_prerequisite() {
        palisade_tests::skip("two_pods_talk_plain_http_and_tcp_carried_over_mtls", &why);
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let logs = tmp.path();
    let net = Net::create();
    let shared = shared_dir(tmp.path());
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();

    // The control plane, in the bridge namespace.
    let data = tmp.path().join("data");
    let mut cp_proc = spawn_in(
        &net,
        "net",
        "control-plane",
        &format!("{} --data-dir {} --listen {CP_IP}:7700", bin("palisade-control-plane").display(), data.display()),
        logs,
    );
    eventually("control plane", Duration::from_secs(20), || async {
        data.join("admin/key.pem").exists().then_some(())
    })
    .await
    .unwrap();
    let ctl = |args: &str| {
        net.exec(
            "net",
            &format!(
                "{} --control-plane https://{CP_IP}:7700 --credentials {} {args}",
                bin("palisadectl").display(),
                data.join("admin").display()
            ),
        )
    };
    eventually("control plane serves", Duration::from_secs(20), || async {
        ctl("check").status.success().then_some(())
    })
    .await
    .unwrap();
    std::fs::copy(data.join("admin/ca.pem"), shared.join("ca.pem")).unwrap();

    // A sidecar in `pod` running as UID 1337, attested with a fresh join token.
    let start_sidecar = |pod: &str, ip: &str, id: &str, name: &str, extra: &str| {
        let token = String::from_utf8(ctl(&format!("token create --identity {id}")).stdout).unwrap().trim().to_string();
        let token_file = shared.join(format!("{name}.token"));
        std::fs::write(&token_file, &token).unwrap();
        must(&format!("chown 1337:1337 {0} && chmod 600 {0}", token_file.display()));
        let cmd = format!(
            "setpriv --reuid=1337 --regid=1337 --clear-groups {} --transparent --opaque-port 9000 {extra} --control-plane https://{CP_IP}:7700 --ca-bundle {} \
             --join-token-file {} --inbound 0.0.0.0:4143 --advertise {ip}:4143 --outbound 127.0.0.1:4140 --app 127.0.0.1:8080 \
             --admin 127.0.0.1:4191",
            bin("palisade-sidecar").display(),
            shared.join("ca.pem").display(),
            token_file.display()
        );
        spawn_in(&net, pod, name, &cmd, logs)
    };

    // Pods: app(s), interception rules, the sidecar as UID 1337.
    let mut procs = Vec::new();
    for (pod, ip, id) in [("a", A_IP, A_ID), ("b", B_IP, B_ID)] {
        let init = net.exec(pod, &format!("{} init", bin("palisade-sidecar").display()));
        assert!(init.status.success(), "init: {}", String::from_utf8_lossy(&init.stderr));
        // Idempotent: twice leaves one set of rules, and --verify agrees.
        assert!(net.exec(pod, &format!("{} init", bin("palisade-sidecar").display())).status.success());
        let verify = net.exec(pod, &format!("{} init --verify", bin("palisade-sidecar").display()));
        assert!(verify.status.success(), "verify: {}", String::from_utf8_lossy(&verify.stderr));
        let rules = String::from_utf8(net.exec(pod, "iptables -t nat -S").stdout).unwrap();
        assert_eq!(rules.matches("-j PALISADE_INBOUND").count(), 1, "{rules}");
        procs.push(start_sidecar(pod, ip, id, &format!("sidecar-{pod}"), ""));
    }
    procs.push(spawn_in(
        &net,
        "b",
        "app-b",
        &format!("python3 {} 8080 orders", repo.join("scripts/demo/echo_app.py").display()),
        logs,
    ));
    let echo = shared.join("tcp_echo.py");
    std::fs::write(&echo, TCP_ECHO).unwrap();
    procs.push(spawn_in(&net, "b", "tcp-echo-b", &format!("python3 {}", echo.display()), logs));
    for pod in ["a", "b"] {
        eventually("sidecar ready", Duration::from_secs(20), || async {
            (curl(&net, pod, "http://127.0.0.1:4191/ready").0 == 200).then_some(())
        })
        .await
        .unwrap_or_else(|e| panic!("{e}: {}", procs.iter().map(|p| p.logs()).collect::<String>()));
    }

    // Policy: A may call B; B limits A to 5 requests a minute.
    let policy = shared.join("policy.yaml");
    std::fs::write(&policy, format!(
        "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: a-to-b, namespace: shop}}\nspec:\n  target: {{identities: [\"{B_ID}\"]}}\n  action: ALLOW\n  rules:\n    - from: [{{identities: [\"{A_ID}\"]}}]\n"
    )).unwrap();
    assert!(ctl(&format!("policy apply -f {}", policy.display())).status.success());
    eventually("A reaches B", Duration::from_secs(10), || async {
        (curl(&net, "a", &format!("http://{B_IP}:8080/hello")).0 == 200).then_some(())
    })
    .await
    .unwrap();

    // Plain HTTP to B's IP, captured on B's veth: a TLS handshake, no plaintext request.
    let pcap = shared.join("b.pcap");
    let mut dump = spawn_in(
        &net,
        "b",
        "tcpdump",
        &format!("tcpdump -i eth0 -U -w {} 'tcp and not port 7700'", pcap.display()),
        logs,
    );
    eventually("tcpdump started", Duration::from_secs(10), || async {
        dump.logs().contains("listening on").then_some(())
    })
    .await
    .unwrap();
    let (code, body) =
        curl(&net, "a", &format!("http://{B_IP}:8080/secret-path-xyz -H 'x-palisade-peer-identity: spoofed'"));
    assert_eq!(code, 200, "{body}");
    assert!(body.contains(A_ID), "B's app sees A's identity: {body}");
    let tcp_client = shared.join("tcp_client.py");
    std::fs::write(&tcp_client, TCP_CLIENT).unwrap();
    let out = net.exec("a", &format!("python3 {} {B_IP}", tcp_client.display()));
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "echo:raw tcp bytes",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let captured = eventually("packets captured", Duration::from_secs(5), || async {
        let bytes = std::fs::read(&pcap).ok()?;
        (bytes.len() > 400).then_some(bytes)
    })
    .await
    .unwrap();
    drop(dump.terminate(Duration::from_secs(5)));
    let has = |needle: &[u8]| captured.windows(needle.len()).any(|w| w == needle);
    // The TCP connection is new: its TLS handshake is in the capture; HTTP rode
    // the pooled connection opened earlier, as TLS application data.
    assert!(has(b"\x16\x03\x01") || has(b"\x16\x03\x03"), "a TLS handshake record crossed the wire");
    assert!(has(b"\x17\x03\x03"), "TLS application data crossed the wire");
    assert!(!has(b"secret-path-xyz") && !has(b"GET /") && !has(b"raw tcp bytes"), "no plaintext on the wire");

    // A DENY is enforced (403); a rate limit answers 429.
    std::fs::write(&policy, format!(
        "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: no-admin, namespace: shop}}\nspec:\n  target: {{identities: [\"{B_ID}\"]}}\n  action: DENY\n  rules:\n    - to: [{{paths: [\"/admin*\"]}}]\n---\napiVersion: palisade.dev/v1\nkind: RateLimitPolicy\nmetadata: {{name: slow, namespace: shop}}\nspec:\n  target: {{identities: [\"{B_ID}\"]}}\n  limits:\n    - {{name: five, key: identity, algorithm: fixed_window, rate: 5, period: 1m, match: {{paths: [\"/limited\"]}}}}\n"
    )).unwrap();
    assert!(ctl(&format!("policy apply -f {}", policy.display())).status.success());
    eventually("deny applied", Duration::from_secs(10), || async {
        (curl(&net, "a", &format!("http://{B_IP}:8080/admin")).0 == 403).then_some(())
    })
    .await
    .unwrap();
    let codes: Vec<u16> = (0..7).map(|_| curl(&net, "a", &format!("http://{B_IP}:8080/limited")).0).collect();
    assert_eq!(codes.iter().filter(|c| **c == 200).count(), 5, "{codes:?}");
    assert_eq!(codes.last(), Some(&429), "{codes:?}");

    // Egress to an unmeshed destination passes through (the default).
    procs.push(spawn_in(
        &net,
        "c",
        "app-c",
        &format!("python3 {} 8081 unmeshed {C_IP}", repo.join("scripts/demo/echo_app.py").display()),
        logs,
    ));
    let (code, body) = eventually("egress passthrough", Duration::from_secs(10), || async {
        let (code, body) = curl(&net, "a", &format!("http://{C_IP}:8081/out"));
        (code == 200).then_some((code, body))
    })
    .await
    .unwrap();
    assert!(code == 200 && body.contains("\"caller\": null"), "plain egress, no identity: {body}");

    // iptables-legacy works too, and IPv6 rules; --verify fails where the rules are missing.
    let verify_missing = net.exec("c", &format!("{} init --verify", bin("palisade-sidecar").display()));
    assert!(!verify_missing.status.success(), "verify must fail without rules");
    if sh("command -v ip6tables >/dev/null").status.success() {
        for args in ["init --ip6tables ip6tables", "init --ip6tables ip6tables --verify"] {
            let out = net.exec("c", &format!("{} {args}", bin("palisade-sidecar").display()));
            assert!(out.status.success(), "{args}: {}", String::from_utf8_lossy(&out.stderr));
        }
        for cmd in ["iptables -t nat -F", "iptables -t nat -X", "ip6tables -t nat -F", "ip6tables -t nat -X"] {
            assert!(net.exec("c", cmd).status.success(), "{cmd}");
        }
    }
    if sh("command -v iptables-legacy >/dev/null").status.success() {
        for args in ["init --iptables iptables-legacy", "init --iptables iptables-legacy --verify"] {
            let legacy = net.exec("c", &format!("{} {args}", bin("palisade-sidecar").display()));
            assert!(legacy.status.success(), "iptables-legacy {args}: {}", String::from_utf8_lossy(&legacy.stderr));
        }
        // Take them away again: C is the unmeshed client below.
        for cmd in ["iptables-legacy -t nat -F", "iptables-legacy -t nat -X"] {
            assert!(net.exec("c", cmd).status.success());
        }
    }

    // An unmeshed client in a third namespace is refused under STRICT.
    let (code, _) = curl(&net, "c", &format!("http://{B_IP}:8080/hello"));
    assert_eq!(code, 0, "STRICT: the plaintext connection is closed without an answer");

    // PERMISSIVE: B accepts plaintext, as unauthenticated, if a policy allows it.
    let mut old_b = procs.remove(1);
    assert!(old_b.terminate(Duration::from_secs(10)).unwrap().success(), "B's sidecar drains and exits 0");
    procs.push(start_sidecar("b", B_IP, B_ID, "sidecar-b-permissive", "--mtls-mode permissive"));
    std::fs::write(&policy, format!(
        "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: public, namespace: shop}}\nspec:\n  target: {{identities: [\"{B_ID}\"]}}\n  action: ALLOW\n  rules:\n    - from: [{{unauthenticated: true}}]\n      to: [{{paths: [\"/public\"]}}]\n"
    )).unwrap();
    assert!(ctl(&format!("policy apply -f {}", policy.display())).status.success());
    let (code, body) = eventually("unmeshed client allowed under PERMISSIVE", Duration::from_secs(20), || async {
        let (code, body) = curl(&net, "c", &format!("http://{B_IP}:8080/public"));
        (code == 200).then_some((code, body))
    })
    .await
    .unwrap();
    assert_eq!(code, 200);
    assert!(body.contains("\"caller\": null"), "no identity for a plaintext caller: {body}");
    assert_eq!(
        curl(&net, "c", &format!("http://{B_IP}:8080/hello")).0,
        403,
        "policy still decides for plaintext callers"
    );

    // --egress deny: A may still call meshed B, but not unmeshed C.
    let mut old_a = procs.remove(0);
    assert!(old_a.terminate(Duration::from_secs(10)).unwrap().success());
    procs.push(start_sidecar("a", A_IP, A_ID, "sidecar-a-egress-deny", "--egress deny"));
    eventually("A reaches B again", Duration::from_secs(20), || async {
        (curl(&net, "a", &format!("http://{B_IP}:8080/hello")).0 == 200).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(curl(&net, "a", &format!("http://{C_IP}:8081/out")).0, 0, "egress to an unmeshed pod is refused");
    assert!(procs.last().unwrap().logs().contains("egress to an unmeshed destination refused"));

    for mut p in procs {
        let _ = p.terminate(Duration::from_secs(5));
    }
    let _ = cp_proc.terminate(Duration::from_secs(5));
}
