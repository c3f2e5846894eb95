//! Palisade as containers, in pods, as Kubernetes runs it: the image built by
//! `scripts/image.sh`, the control plane in its own container started with
//! the arguments of `palisadectl install`'s Deployment, and two podman pods
//! (one network namespace each) made by `podman kube play` from the output
//! of `palisadectl inject`: the init container writes the iptables rules
//! (root, NET_ADMIN), the proxy runs as UID 1337, the app beside them.
//! `palisadectl` on the host manages the control plane through a published
//! port. What podman cannot express is replaced by tests/podman/for_podman.py
//! (native sidecars, projected ServiceAccount tokens, status.podIP) and said
//! there; everything else is the YAML a user applies.
//!
//! Needs root, podman, runc, iptables, debootstrap, python3 with PyYAML,
//! and the Debian mirror for the test apps' base image (`.ci/run` installs
//! them); the Palisade image itself is made from this machine's files.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

const NET: &str = "palisade-e2e";
const SUBNET: &str = "10.89.77.0/24";
const CP_IP: &str = "10.89.77.2";
const WEB_IP: &str = "10.89.77.11";
const ORDERS_IP: &str = "10.89.77.12";
const OUTSIDER_IP: &str = "10.89.77.20";
const CP_CONTAINER: &str = "palisade-e2e-cp";
const WEB_ID: &str = "spiffe://cluster.local/ns/shop/sa/web";

fn missing_prerequisite() -> Option<String> {
    let tools = ["podman", "runc", "debootstrap", "python3", "curl", "nsenter", "iptables"];
    if let Some(why) = palisade_tests::missing_root_and_tools(&tools) {
        return Some(format!("{why} (apt-get install podman runc debootstrap)"));
    }
    if !sh("python3 -c 'import yaml'").status.success() {
        return Some("python3 lacks PyYAML (pip install pyyaml)".into());
    }
    None
}

fn conf() -> PathBuf {
    palisade_tests::repo_root().join("deploy/podman/containers.conf")
}

fn sh(cmd: &str) -> Output {
    Command::new("sh").args(["-c", cmd]).env("CONTAINERS_CONF", conf()).output().expect("invariant: sh runs")
}

fn must(cmd: &str) -> String {
    let out = sh(cmd);
    assert!(
        out.status.success(),
        "`{cmd}` failed ({}):\n{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn podman(args: &str) -> Output {
    sh(&format!("podman {args}"))
}

/// Polls `f` until it returns Some, or fails the test after `timeout`.
fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Everything this test creates in podman; removed at start (a previous
/// run that was killed) and on drop.
struct Podman;

impl Podman {
    fn clean() {
        for pod in ["web", "orders"] {
            podman(&format!("pod rm -f -t 0 {pod}"));
        }
        podman(&format!("rm -f -t 0 {CP_CONTAINER} palisade-e2e-outsider"));
        podman(&format!("network rm -f {NET}"));
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        if std::env::var_os("PALISADE_KEEP_PODS").is_none() {
            Self::clean();
        }
    }
}

/// Runs the app-side client in `container`: one line per request.
fn get(container: &str, url: &str, count: u32) -> Vec<String> {
    let out = podman(&format!("exec {container} python3 /app/client.py {url} {count}"));
    String::from_utf8_lossy(&out.stdout).lines().map(str::to_string).collect()
}

fn logs(name: &str) -> String {
    let out = podman(&format!("logs --tail 40 {name}"));
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

/// The app pods: what a user writes, before injection.
fn app_pod(name: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: shop, labels: {{app: {name}}}}}\nspec:\n  \
         serviceAccountName: {name}\n  containers:\n    - name: app\n      image: localhost/palisade-testapp:e2e\n      \
         args: [python3, /app/echo_app.py, \"8080\", {name}, 0.0.0.0]\n      ports: [{{containerPort: 8080}}]\n      \
         securityContext: {{runAsUser: 1000, runAsGroup: 1000}}\n"
    )
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
    let shell = podman(&format!("run --rm --entrypoint /bin/sh {image} -c true"));
    assert!(!shell.status.success(), "{image} has a shell");
}

#[test]
fn pods_run_the_image_with_the_injected_yaml() {
    if let Some(why) = missing_prerequisite() {
        palisade_tests::skip("pods_run_the_image_with_the_injected_yaml", &why);
        return;
    }
    let repo = palisade_tests::repo_root();
    let tmp = tempfile::Builder::new().prefix("palisade-podman-").tempdir().unwrap();
    let dir = tmp.path();
    let ctl_bin = palisade_tests::bin("palisadectl");

    // The image, as scripts/image.sh builds it (from this build's binaries),
    // and the test apps on the same base.
    // PALISADE_PODMAN_RELEASE=1: the release image, as users build it (for
    // the start-to-ready figure of docs/operations/container.md); otherwise this build's binaries.
    let release = std::env::var_os("PALISADE_PODMAN_RELEASE").is_some();
    // --prebuilt: the binaries other tests are running are not re-linked under them.
    let built =
        must(&format!("{}/scripts/image.sh --prebuilt{}", repo.display(), if release { "" } else { " --debug" }));
    let image = built.lines().last().expect("image.sh prints the tag last").trim().to_string();
    assert!(image.starts_with("localhost/palisade:") && image.ends_with("-debug") != release, "{image}");
    let apps = must(&format!("{}/scripts/image.sh --apps", repo.display()));
    assert_eq!(apps.lines().last(), Some("localhost/palisade-testapp:e2e"), "image.sh --apps prints the tag last");
    let size = must(&format!("podman image inspect --format '{{{{.Size}}}}' {image}"));
    let size = size.trim().parse::<u64>().expect("podman prints the size in bytes");
    println!("image {image}: {:.1} MB", size as f64 / 1e6);
    if release {
        // docs/operations/container.md: 48.6 MB, nearly all of it the four programs.
        assert!(
            size < 55_000_000,
            "the release image grew to {size} bytes (docs/operations/container.md says 48.6 MB)"
        );
    }
    assert_image_holds_only_what_the_docs_say(&image);
    // No shell is needed: the entrypoint runs the program named first.
    let version = must(&format!("podman run --rm {image} ctl --version"));
    assert!(version.starts_with("palisadectl "), "{version}");
    let usage = podman(&format!("run --rm {image} bogus"));
    assert_eq!(usage.status.code(), Some(64), "unknown program: usage error");

    Podman::clean();
    let _guard = Podman;
    must(&format!("podman network create --subnet {SUBNET} {NET}"));

    // The install: manifests with a fresh CA, the admin credential kept here.
    let admin = dir.join("admin");
    let install = Command::new(&ctl_bin)
        .args(["install", "--generate-ca", "--image", &image, "--credentials-out"])
        .arg(&admin)
        .output()
        .unwrap();
    assert!(install.status.success(), "{}", String::from_utf8_lossy(&install.stderr));
    let manifests = dir.join("install.yaml");
    std::fs::write(&manifests, &install.stdout).unwrap();
    // The CA Secret as the kubelet mounts it with the Deployment's fsGroup:
    // root:65532, mode 0440 (defaultMode 0400 plus group read).
    let ca_dir = dir.join("ca");
    std::fs::create_dir(&ca_dir).unwrap();
    let extract = format!(
        "import sys,yaml\nfor d in yaml.safe_load_all(open('{m}')):\n  if d and d['kind']=='Secret' and d['metadata']['name']=='palisade-ca':\n    \
         open('{c}/tls.crt','w').write(d['stringData']['tls.crt']); open('{c}/tls.key','w').write(d['stringData']['tls.key'])\n  \
         if d and d['kind']=='Deployment':\n    print('\\n'.join(a for a in d['spec']['template']['spec']['containers'][0]['args']))\n",
        m = manifests.display(),
        c = ca_dir.display()
    );
    std::fs::write(dir.join("extract.py"), extract).unwrap();
    let cp_args = must(&format!("python3 {}", dir.join("extract.py").display()));
    let cp_args: Vec<&str> = cp_args
        .lines()
        // TokenReview needs a Kubernetes API server; the pods here join with tokens.
        .filter(|a| *a != "--k8s-attestation")
        .collect();
    assert_eq!(cp_args.first(), Some(&"control-plane"), "{cp_args:?}");
    must(&format!(
        "chown -R 0:65532 {c} && chmod 0440 {c}/tls.key {c}/tls.crt && chmod 0750 {c}",
        c = ca_dir.display()
    ));
    let data = dir.join("cp-data");
    std::fs::create_dir(&data).unwrap();
    must(&format!("chown 65532:65532 {}", data.display()));

    // The control plane in its own container: the Deployment's user and
    // arguments, its state on a volume, its gRPC port published to the host.
    let port = palisade_tests::free_port();
    let oauth_port = palisade_tests::free_port();
    let started = Instant::now();
    must(&format!(
        "podman run -d --name {CP_CONTAINER} --network {NET} --ip {CP_IP} -p 127.0.0.1:{port}:7700 -p 127.0.0.1:{oauth_port}:7443 \
         --user 65532:65532 --read-only --cap-drop ALL -v {data}:/var/lib/palisade -v {ca}:/etc/palisade/ca:ro \
         {image} {args} --server-name=localhost",
        data = data.display(),
        ca = ca_dir.display(),
        args = cp_args.join(" ")
    ));
    let cp_url = format!("https://127.0.0.1:{port}");
    let ctl = |args: &[&str]| -> Output {
        Command::new(&ctl_bin)
            .args(args)
            .env("PALISADE_CONTROL_PLANE", &cp_url)
            .env("PALISADE_CREDENTIALS", &admin)
            .env("NO_COLOR", "1")
            .output()
            .unwrap()
    };
    // palisadectl on the host reaches it with the credential install wrote.
    wait_for("the control plane to answer palisadectl", Duration::from_secs(60), || {
        if podman(&format!("container exists {CP_CONTAINER}")).status.success()
            && !must(&format!("podman inspect --format '{{{{.State.Running}}}}' {CP_CONTAINER}")).contains("true")
        {
            panic!("control plane container exited:\n{}", logs(CP_CONTAINER));
        }
        ctl(&["check"]).status.success().then_some(())
    });
    println!("control plane ready {:?} after podman run", started.elapsed());
    assert!(!logs(CP_CONTAINER).contains("has mode"), "the fsGroup-mounted CA key is accepted");
    // The install's token service answers under its Service name, with a
    // certificate of the mesh CA for that name.
    let meta = must(&format!(
        "curl -s --cacert {ca} --resolve palisade-control-plane.palisade-system.svc:{oauth_port}:127.0.0.1 \
         https://palisade-control-plane.palisade-system.svc:{oauth_port}/.well-known/oauth-authorization-server",
        ca = admin.join("ca.pem").display()
    ));
    assert!(
        meta.contains("\"issuer\":\"https://palisade-control-plane.palisade-system.svc:7443\""),
        "token service metadata: {meta}"
    );

    // Policy: web may GET /api/* on orders, at most 3 at once then 1 per minute.
    let policy = dir.join("policy.yaml");
    std::fs::write(
        &policy,
        "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: web-to-orders, namespace: shop}\n\
         spec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}\n  action: ALLOW\n  rules:\n    \
         - from: [{identities: [\"spiffe://cluster.local/ns/shop/sa/web\"]}]\n      to: [{methods: [GET], paths: [\"/api/*\"]}]\n\
         ---\napiVersion: palisade.dev/v1\nkind: RateLimitPolicy\nmetadata: {name: orders-limit, namespace: shop}\n\
         spec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}\n  limits:\n    \
         - name: per-caller\n      key: identity\n      algorithm: token_bucket\n      rate: 1\n      period: 1m\n      burst: 3\n",
    )
    .unwrap();
    let applied = ctl(&["policy", "apply", "-f", policy.to_str().unwrap()]);
    assert!(applied.status.success(), "{}", String::from_utf8_lossy(&applied.stderr));

    // The two pods, from `palisadectl inject` output.
    for (name, ip) in [("orders", ORDERS_IP), ("web", WEB_IP)] {
        let token_dir = dir.join(format!("{name}-token"));
        std::fs::create_dir(&token_dir).unwrap();
        let id = format!("spiffe://cluster.local/ns/shop/sa/{name}");
        let token = ctl(&["token", "create", "--identity", &id, "--ttl", "10m"]);
        assert!(token.status.success(), "{}", String::from_utf8_lossy(&token.stderr));
        std::fs::write(token_dir.join("token"), &token.stdout).unwrap();
        must(&format!("chown -R 1337:1337 {t} && chmod 0400 {t}/token", t = token_dir.display()));

        let app = dir.join(format!("{name}.yaml"));
        std::fs::write(&app, app_pod(name)).unwrap();
        let injected = Command::new(&ctl_bin)
            .args(["inject", "-f", app.to_str().unwrap(), "--image", &image])
            .args(["--mesh-control-plane", &format!("https://{CP_IP}:7700")])
            .env("PALISADE_CREDENTIALS", &admin)
            .output()
            .unwrap();
        assert!(injected.status.success(), "{}", String::from_utf8_lossy(&injected.stderr));
        let injected_file = dir.join(format!("{name}.injected.yaml"));
        std::fs::write(&injected_file, &injected.stdout).unwrap();
        let for_podman = dir.join(format!("{name}.podman.yaml"));
        must(&format!(
            "python3 {} {ip} {} < {} > {}",
            repo.join("tests/podman/for_podman.py").display(),
            token_dir.display(),
            injected_file.display(),
            for_podman.display()
        ));
        let started = Instant::now();
        must(&format!("podman kube play --network {NET} --ip {ip} {}", for_podman.display()));
        wait_for(&format!("{name}'s proxy /ready"), Duration::from_secs(60), || {
            sh(&format!("curl -sf -m 2 http://{ip}:4191/ready")).status.success().then_some(())
        });
        // Start-to-ready of the proxy itself: from its container's start
        // (podman holds the pod's containers back while it waits on the init
        // container) to the first /ready answer seen (polled every 200 ms).
        let ready_at = must("date +%s.%N").trim().parse::<f64>().unwrap();
        let started_at = must(&format!(
            "date -d \"$(podman inspect --format '{{{{.State.StartedAt}}}}' {name}-palisade-proxy | cut -d' ' -f1-2)\" +%s.%N"
        ));
        let started_at: f64 = started_at.trim().parse().unwrap();
        println!(
            "{name}: proxy ready {:.2}s after its container started ({:?} after podman kube play)",
            ready_at - started_at,
            started.elapsed()
        );
    }
    // The init container ran as root with NET_ADMIN and left its rules; the proxy runs as 1337.
    let user = must("podman inspect --format '{{.Config.User}}' orders-palisade-proxy");
    assert_eq!(user.trim(), "1337:1337", "proxy user");
    let infra = must("podman pod inspect --format '{{.InfraContainerID}}' orders");
    let pid = must(&format!("podman inspect --format '{{{{.State.Pid}}}}' {}", infra.trim()));
    let rules = must(&format!("nsenter -t {} -n iptables -t nat -S", pid.trim()));
    assert!(rules.contains("PALISADE") && rules.contains("--uid-owner 1337"), "{rules}");
    let proxies = ctl(&["proxies"]);
    let proxies = String::from_utf8_lossy(&proxies.stdout);
    assert!(proxies.contains(WEB_ID) && proxies.contains(&format!("{ORDERS_IP}:4143")), "{proxies}");

    // web's app calls orders by pod IP: through both proxies over mTLS,
    // orders' app sees web's identity.
    let ok = get("web-app", &format!("http://{ORDERS_IP}:8080/api/orders"), 1);
    assert!(ok[0].starts_with("200 ") && ok[0].contains(WEB_ID), "{ok:?}\n{}", logs("orders-palisade-proxy"));
    // A path the policy does not allow: 403 from orders' proxy.
    let denied = get("web-app", &format!("http://{ORDERS_IP}:8080/admin"), 1);
    assert!(denied[0].starts_with("403 "), "{denied:?}");
    // The bucket (3, one of them spent above) runs out: 429.
    let burst = get("web-app", &format!("http://{ORDERS_IP}:8080/api/orders"), 4);
    assert!(burst.iter().any(|l| l.starts_with("429 ")), "{burst:?}");
    // A plaintext client outside the mesh gets nothing from orders' app.
    let outsider = must(&format!(
        "podman run --rm --name palisade-e2e-outsider --network {NET} --ip {OUTSIDER_IP} localhost/palisade-testapp:e2e \
         python3 /app/client.py http://{ORDERS_IP}:8080/api/orders 1"
    ));
    assert!(outsider.starts_with("ERROR"), "plaintext from outside the mesh: {outsider}");
    // The proxies' metrics, from the host: the refusals are counted.
    let metrics = must(&format!("curl -s -m 2 http://{ORDERS_IP}:4191/metrics"));
    assert!(metrics.contains("palisade_"), "{metrics}");
}
