//! Palisade as containers, in pods, as Kubernetes runs it, through the
//! command users run (`scripts/pods.sh`): the image built by
//! `scripts/image.sh`, the control plane as a pod made from `palisadectl
//! install`'s Deployment, and two podman pods (one network namespace each)
//! made by `podman kube play` from the output of `palisadectl inject`: the
//! init container writes the iptables rules (root, NET_ADMIN), the proxy runs
//! as UID 1337, the app beside them. `palisadectl` on the host manages the
//! control plane at its pod IP. What podman cannot express is replaced by
//! tests/podman/for_podman.py (native sidecars, projected ServiceAccount
//! tokens, Secret volumes, status.podIP, probes) and said there; everything
//! else is the YAML a user applies. The test checks what the script shows,
//! then what only the pods show, that a restarted proxy and a restarted pod
//! come back meshed, then that `down` leaves nothing.
//!
//! Needs root, podman, runc, iptables, debootstrap, python3 with PyYAML,
//! and the Debian mirror for the test apps' base image (`.ci/run` installs
//! them); the Palisade image itself is made from this machine's files.

use std::path::Path;
use std::process::{Command, Output};

const NET: &str = "palisade-pods";
const ORDERS_IP: &str = "10.89.78.12";
const OUTSIDER_IP: &str = "10.89.78.20";
const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";
const CP_CONTAINER: &str = "palisade-control-plane-control-plane";

fn missing_prerequisite() -> Option<String> {
    let tools = ["podman", "runc", "debootstrap", "python3", "curl", "nsenter", "iptables"];
    if let Some(why) = palisade_tests::missing_root_and_tools(&tools) {
        return Some(format!("{why} (apt-get install podman runc debootstrap python3-yaml curl)"));
    }
    if !sh("python3 -c 'import yaml'").status.success() {
        return Some("python3 lacks PyYAML (apt-get install python3-yaml)".into());
    }
    None
}

fn sh(cmd: &str) -> Output {
    Command::new("sh")
        .args(["-c", cmd])
        .env("CONTAINERS_CONF", palisade_tests::repo_root().join("deploy/podman/containers.conf"))
        .output()
        .expect("invariant: sh runs")
}

fn text(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

fn must(cmd: &str) -> String {
    let out = sh(cmd);
    assert!(out.status.success(), "`{cmd}` failed ({}):\n{}", out.status, text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `scripts/pods.sh ARGS`, with its state in `state` and this build's palisadectl.
fn pods(state: &Path, args: &[&str]) -> Output {
    Command::new(palisade_tests::repo_root().join("scripts/pods.sh"))
        .args(args)
        .env("PALISADE_PODS_DIR", state)
        .env("PALISADECTL", palisade_tests::bin("palisadectl"))
        .output()
        .expect("invariant: bash runs")
}

/// Takes the mesh down when the test ends, however it ends.
struct Down<'a>(&'a Path);

impl Drop for Down<'_> {
    fn drop(&mut self) {
        if std::env::var_os("PALISADE_KEEP_PODS").is_none() {
            pods(self.0, &["down"]);
        }
    }
}

/// Runs the app-side client in `container`: one line per request.
fn get(container: &str, url: &str, count: u32) -> Vec<String> {
    let out = sh(&format!("podman exec {container} python3 /app/client.py {url} {count}"));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

/// The line of `output` that starts with `prefix`.
fn line<'a>(output: &'a str, prefix: &str) -> &'a str {
    output.lines().find(|l| l.starts_with(prefix)).unwrap_or_else(|| panic!("no line `{prefix}...` in:\n{output}"))
}

/// Every file and link of the image, as docs/operations/container.md lists
/// them: a name ending in `*` stands for the names it begins (without a `/`
/// after it), every other name must be there.
const IMAGE_FILES: &[&str] = &[
    "usr/local/bin/palisade",
    "usr/local/bin/palisade-control-plane",
    "usr/local/bin/palisade-sidecar",
    "usr/local/bin/palisadectl",
    "lib",
    "lib64",
    "usr/lib64/ld-linux-x86-64.so.2",
    "usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2",
    "usr/lib/x86_64-linux-gnu/libc.so.6",
    "usr/lib/x86_64-linux-gnu/lib*",
    "usr/sbin/xtables-nft-multi",
    "usr/sbin/xtables-legacy-multi",
    "usr/sbin/iptables",
    "usr/sbin/iptables-legacy",
    "usr/sbin/iptables*",
    "usr/sbin/ip6tables*",
    "usr/lib/x86_64-linux-gnu/xtables/libxt_*",
    "etc/passwd",
    "etc/group",
    "etc/nsswitch.conf",
];

/// The image holds what the docs say and nothing else: no shell, package
/// manager, perl or coreutils.
fn assert_image_holds_only_what_the_docs_say(image: &str) {
    let root = must(&format!("podman image mount {image}"));
    let files = must(&format!("find {} -mindepth 1 ! -type d -printf '%P\\n' | sort", root.trim()));
    must(&format!("podman image unmount {image}"));
    let listed = |f: &str| {
        IMAGE_FILES.iter().any(|p| match p.strip_suffix('*') {
            Some(prefix) => f.strip_prefix(prefix).is_some_and(|rest| !rest.contains('/')),
            None => f == *p,
        })
    };
    let extra: Vec<&str> = files.lines().filter(|f| !listed(f)).collect();
    assert!(extra.is_empty(), "{image} holds files docs/operations/container.md does not list: {extra:?}");
    let missing: Vec<&&str> =
        IMAGE_FILES.iter().filter(|p| !p.ends_with('*') && !files.lines().any(|f| f == **p)).collect();
    assert!(missing.is_empty(), "{image} lacks {missing:?}");
    assert!(files.lines().count() < 50, "{image}: more files than the docs list:\n{files}");
    // So nothing but the programs and iptables can run in it.
    let shell = sh(&format!("podman run --rm --entrypoint /bin/sh {image} -c true"));
    assert!(!shell.status.success(), "{image} has a shell");
}

#[test]
fn pods_run_the_image_with_the_injected_yaml() {
    if let Some(why) = missing_prerequisite() {
        palisade_tests::skip("pods_run_the_image_with_the_injected_yaml", &why);
        return;
    }
    let tmp = tempfile::Builder::new().prefix("palisade-pods-").tempdir().unwrap();
    let state = tmp.path().join("state");
    let ctl_bin = palisade_tests::bin("palisadectl");

    let usage = pods(&state, &["up", "--bogus"]);
    assert_eq!(usage.status.code(), Some(64), "{}", text(&usage));
    // A previous run that was killed.
    pods(&state, &["down"]);
    let _down = Down(&state);

    // PALISADE_PODMAN_RELEASE=1: the release image, as users build it (for
    // the start-to-ready figures of docs/operations/container.md); otherwise
    // this build's binaries. --prebuilt: the binaries other tests are running
    // are not re-linked under them.
    let release = std::env::var_os("PALISADE_PODMAN_RELEASE").is_some();
    let up = pods(&state, if release { &["up", "--prebuilt"] } else { &["up", "--prebuilt", "--debug"] });
    let shown = String::from_utf8_lossy(&up.stdout).into_owned();
    assert!(up.status.success(), "pods.sh up failed ({}):\n{}", up.status, text(&up));

    // What it shows: the image, a refusal before any policy, then the
    // request through both proxies with web's identity seen by orders, a
    // path the policy does not allow refused, and the exports.
    let images = line(&shown, "localhost/palisade:");
    let (image, app_image) = images.split_once("; sample apps: ").expect("image line");
    assert!(image.ends_with("-debug") != release, "{image}");
    println!("{}", line(&shown, "palisade-control-plane at "));
    println!("{}", line(&shown, "shop-orders at "));
    println!("{}", line(&shown, "shop-web at "));
    assert!(line(&shown, "before any policy").ends_with(": 403 forbidden"), "{shown}");
    let ok = line(&shown, "GET /api/orders: ");
    assert!(ok.contains(": 200 ") && ok.contains(&format!("\"caller\": \"{WEB_ID}\"")), "{ok}");
    assert!(line(&shown, "GET /admin").ends_with(": 403 forbidden"), "{shown}");
    let credentials = state.join("admin");
    let exports =
        format!("PALISADE_CONTROL_PLANE=https://10.89.78.2:7700 PALISADE_CREDENTIALS=\"{}\"", credentials.display());
    assert!(shown.contains(&exports), "{shown}");

    // Up again on a running mesh: it says so, and starts nothing.
    let again = pods(&state, &["up", "--prebuilt", "--debug"]);
    assert_eq!(again.status.code(), Some(1));
    assert!(text(&again).contains("a mesh is already up (pod palisade-control-plane"), "{}", text(&again));

    // No shell is needed: the entrypoint runs the program named first.
    let size = must(&format!("podman image inspect --format '{{{{.Size}}}}' {image}"));
    let size = size.trim().parse::<u64>().expect("podman prints the size in bytes");
    println!("image {image}: {:.1} MB", size as f64 / 1e6);
    if release {
        // docs/operations/container.md: 49.1 MB, nearly all of it the four programs.
        assert!(
            size < 55_000_000,
            "the release image grew to {size} bytes (docs/operations/container.md says 49.1 MB)"
        );
    }
    assert_image_holds_only_what_the_docs_say(image);
    let version = must(&format!("podman run --rm {image} ctl --version"));
    assert!(version.starts_with("palisadectl "), "{version}");
    assert_eq!(sh(&format!("podman run --rm {image} bogus")).status.code(), Some(64), "unknown program: usage error");

    let ctl = |args: &[&str]| -> String {
        let out = Command::new(&ctl_bin)
            .args(args)
            .env("PALISADE_CONTROL_PLANE", "https://10.89.78.2:7700")
            .env("PALISADE_CREDENTIALS", &credentials)
            .env("NO_COLOR", "1")
            .output()
            .unwrap();
        assert!(out.status.success(), "palisadectl {args:?}: {}", text(&out));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let cp_logs = must(&format!("podman logs {CP_CONTAINER} 2>&1"));
    assert!(cp_logs.contains("CA key is readable by this process's group"), "the fsGroup-mounted CA key: {cp_logs}");
    // The install's token service answers under its Service name, with a
    // certificate of the mesh CA for that name.
    let meta = must(&format!(
        "curl -s --cacert {ca} --resolve palisade-control-plane.palisade-system.svc:7443:10.89.78.2 \
         https://palisade-control-plane.palisade-system.svc:7443/.well-known/oauth-authorization-server",
        ca = credentials.join("ca.pem").display()
    ));
    assert!(
        meta.contains("\"issuer\":\"https://palisade-control-plane.palisade-system.svc:7443\""),
        "token service metadata: {meta}"
    );

    // The init container ran as root with NET_ADMIN and left its rules; the proxy runs as 1337.
    let user = must("podman inspect --format '{{.Config.User}}' shop-orders-palisade-proxy");
    assert_eq!(user.trim(), "1337:1337", "proxy user");
    let pid = must("podman inspect --format '{{.State.Pid}}' shop-orders-app");
    let rules = must(&format!("nsenter -t {} -n iptables -t nat -S", pid.trim()));
    assert!(rules.contains("PALISADE") && rules.contains("--uid-owner 1337"), "{rules}");
    let proxies = ctl(&["proxies"]);
    assert!(proxies.contains(WEB_ID) && proxies.contains(&format!("{ORDERS_IP}:4143")), "{proxies}");

    // The bucket (3, spent in part by the script's request) runs out: 429.
    let burst = get("shop-web-app", &format!("http://{ORDERS_IP}:8080/api/orders"), 4);
    assert!(burst.iter().any(|l| l.starts_with("429 ")), "{burst:?}");
    // A plaintext client outside the mesh gets nothing from orders' app.
    let outsider = must(&format!(
        "podman run --rm --name palisade-pods-outsider --network {NET} --ip {OUTSIDER_IP} {app_image} \
         python3 /app/client.py http://{ORDERS_IP}:8080/api/orders 1"
    ));
    assert!(outsider.starts_with("ERROR"), "plaintext from outside the mesh: {outsider}");
    // The proxies' metrics, from the host: the refusals are counted.
    let metrics = must(&format!("curl -s -m 2 http://{ORDERS_IP}:4191/metrics"));
    assert!(metrics.contains("palisade_"), "{metrics}");

    // A root rotation, as install's generated root allows (--ca-seed), then
    // restarts: the pods' spec still carries the old root, and their
    // proxies join again through the cross-signed new root.
    let bundle_before = must("podman inspect --format '{{.Config.Env}}' shop-orders-palisade-proxy");
    let rotated = ctl(&["ca", "rotate", "--generate"]);
    assert!(rotated.lines().any(|l| l.starts_with("phase:") && l.ends_with("done")), "{rotated}");
    let status = ctl(&["-o", "json", "ca", "status"]);
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    let new_root = status["bundle_pem"].as_str().expect("ca status names the bundle").to_string();
    let new_line = new_root.lines().nth(1).unwrap();
    assert!(!bundle_before.contains(new_line), "the pod spec holds only the old root");
    restart_and_check(&state);

    // Down leaves nothing: no container, pod or network, no state.
    let down = pods(&state, &["down"]);
    assert!(down.status.success(), "{}", text(&down));
    let containers = must("podman ps -a --format '{{.Names}}'");
    assert!(
        !containers.lines().any(|c| c.starts_with("shop-") || c.starts_with("palisade-control-plane")),
        "{containers}"
    );
    let left = must("podman pod ls --format '{{.Name}}'");
    assert!(!left.lines().any(|p| p.starts_with("shop-") || p == "palisade-control-plane"), "{left}");
    assert!(!must("podman network ls --format '{{.Name}}'").lines().any(|n| n == NET));
    assert!(!state.exists(), "{} is left", state.display());
    let twice = pods(&state, &["down"]);
    assert!(twice.status.success() && text(&twice).contains("no mesh is up; nothing to remove"), "{}", text(&twice));
    let status = pods(&state, &["status"]);
    assert!(String::from_utf8_lossy(&status.stdout).contains("no mesh is up"), "{}", text(&status));

    run_the_image_by_hand(release, tmp.path(), &ctl_bin);
}

/// Polls `check` every 200 ms until it holds, for up to `secs` seconds.
fn until(what: &str, secs: u64, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    while !check() {
        assert!(std::time::Instant::now() < deadline, "{what}: not within {secs}s");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}

/// Orders after a restart: its proxy ready, its interception rules in the
/// pod's network namespace, nothing for plaintext from the host, and web's
/// app answered through both proxies (a restarted proxy's rate-limit
/// bucket is full again).
fn assert_orders_back(after: &str) {
    until(&format!("orders' proxy ready {after}"), 30, || {
        sh(&format!("curl -sf -m 2 http://{ORDERS_IP}:4191/ready")).status.success()
    });
    let pid = must("podman inspect --format '{{.State.Pid}}' shop-orders-app");
    let rules = must(&format!("nsenter -t {} -n iptables -t nat -S", pid.trim()));
    assert!(rules.contains("PALISADE") && rules.contains("--uid-owner 1337"), "rules {after}: {rules}");
    let plain = sh(&format!("curl -s -m 2 http://{ORDERS_IP}:8080/api/orders"));
    assert!(!plain.status.success(), "plaintext from the host {after}: {}", text(&plain));
    let url = format!("http://{ORDERS_IP}:8080/api/orders");
    until(&format!("web -> orders 200 {after}"), 15, || {
        get("shop-web-app", &url, 1).iter().any(|l| l.starts_with("200 "))
    });
}

/// Restarts as an operator does: orders' proxy container alone (it attests
/// again with its join token, as a restarted proxy with its ServiceAccount
/// token), then the whole orders pod (a new network namespace, where the
/// init container writes its rules again). A root rotation can go before it.
fn restart_and_check(state: &Path) {
    must("podman restart shop-orders-palisade-proxy");
    assert_orders_back("after podman restart of the proxy");
    // podman 4.3's `pod restart` reruns no init container
    // (tests/podman/for_podman.py): `status` warns; stop, then start, reruns it.
    must("podman pod restart shop-orders");
    let status = text(&pods(state, &["status"]));
    assert!(
        status.contains("warning: shop-orders has no interception rules"),
        "no warning after podman pod restart (does this podman rerun init containers on restart? \
         then for_podman.py, container.md and status can say so): {status}"
    );
    must("podman pod stop -t 5 shop-orders && podman pod start shop-orders");
    assert_orders_back("after podman pod stop and start");
}

/// docs/operations/container.md's "Running the image by hand" block, as a
/// reader types it, with this build's image, palisadectl, a free port and
/// a temporary directory in place of the release build, 7700 and /tmp.
fn run_the_image_by_hand(release: bool, tmp: &Path, ctl_bin: &Path) {
    let page = std::fs::read_to_string(palisade_tests::repo_root().join("docs/operations/container.md")).unwrap();
    let block = page
        .split("```sh\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .find(|b| b.contains("podman run -d --name palisade-cp"))
        .expect("container.md runs the image by hand");
    let port = palisade_tests::free_port().to_string();
    let data = tmp.join("palisade-cp");
    let script = block
        .replace(
            "./scripts/image.sh |",
            if release { "./scripts/image.sh --prebuilt |" } else { "./scripts/image.sh --prebuilt --debug |" },
        )
        .replace("target/release/palisadectl", ctl_bin.to_str().unwrap())
        .replace("127.0.0.1:7700:7700", &format!("127.0.0.1:{port}:7700"))
        .replace("https://127.0.0.1:7700", &format!("https://127.0.0.1:{port}"))
        .replace("/tmp/palisade-cp", data.to_str().unwrap())
        .replace("--name palisade-cp", "--name palisade-pods-by-hand")
        .replace("0 palisade-cp", "0 palisade-pods-by-hand");
    sh("podman rm -f -t 0 palisade-pods-by-hand");
    let out = Command::new("bash")
        .args([
            "-euo",
            "pipefail",
            "-c",
            &format!(
                "cd {} && timeout 120 bash -euo pipefail -c '{}'",
                palisade_tests::repo_root().display(),
                script.replace('\'', "'\\''")
            ),
        ])
        .output()
        .unwrap();
    sh("podman rm -f -t 0 palisade-pods-by-hand");
    assert!(out.status.success(), "the by-hand block failed:\n{script}\n{}", text(&out));
    let shown = String::from_utf8_lossy(&out.stdout);
    assert!(shown.contains("control plane"), "palisadectl check through the published port:\n{shown}");
    assert!(!data.exists(), "the block cleans up after itself");
}
