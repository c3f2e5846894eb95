//! What a newcomer meets first: the three programs behave like command-line
//! tools (help on every subcommand, exit 64 on usage errors, quiet on a
//! closed pipe, colour only on a terminal), and errors name their cause.

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use palisade_tests::{ControlPlane, Sidecar, bin, eventually, free_port};

const BINARIES: [&str; 3] = ["palisadectl", "palisade-sidecar", "palisade-control-plane"];

fn run(binary: &str, args: &[&str]) -> Output {
    Command::new(bin(binary)).args(args).env("NO_COLOR", "1").output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// The subcommands `--help` lists under "Commands:" (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    let Some(start) = help.find("Commands:\n") else { return Vec::new() };
    help[start + 10..]
        .lines()
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(String::from)
        .collect()
}

#[test]
fn help_on_every_subcommand_exits_0() {
    let mut seen = 0;
    for binary in BINARIES {
        let mut todo = vec![Vec::<String>::new()];
        while let Some(path) = todo.pop() {
            let mut args: Vec<&str> = path.iter().map(String::as_str).collect();
            args.push("--help");
            let out = run(binary, &args);
            let help = String::from_utf8_lossy(&out.stdout).to_string();
            assert!(out.status.success(), "{binary} {args:?} exited {:?}: {}", out.status, text(&out));
            assert!(help.contains("Usage:"), "{binary} {args:?}: {help}");
            // The usage line names the whole command, not just the subcommand.
            assert!(help.contains(&format!("Usage: {binary}")), "{binary} {args:?}: {help}");
            seen += 1;
            for sub in subcommands(&help) {
                let mut p = path.clone();
                p.push(sub);
                todo.push(p);
            }
        }
        // `help` as a subcommand works where there are subcommands.
        if binary != "palisade-control-plane" {
            let out = run(binary, &["help"]);
            assert!(out.status.success(), "{binary} help: {}", text(&out));
        }
        assert!(run(binary, &["--version"]).status.success());
    }
    // palisadectl's tree, the sidecar's two subcommands, the control plane.
    assert!(seen >= 25, "only {seen} help pages found");
    let sidecar = String::from_utf8_lossy(&run("palisade-sidecar", &["--help"]).stdout).to_string();
    assert_eq!(subcommands(&sidecar), ["init", "wait-ready"]);
}

#[test]
fn usage_errors_exit_64_on_all_three_binaries() {
    let cases: &[(&str, &[&str], &str)] = &[
        ("palisade-control-plane", &["--listen", "localhost", "--data-dir", "/nonexistent"], "expected IP:PORT"),
        ("palisade-control-plane", &["--no-such-flag"], "unexpected argument"),
        ("palisade-control-plane", &["--data-dir", "/tmp/x", "--cert-ttl", "soon"], "--cert-ttl"),
        (
            "palisade-sidecar",
            &["--ca-bundle", "x", "--upstream", "29005=orders.shop"],
            "LOCAL_HOST:PORT is not an IP:PORT",
        ),
        ("palisade-sidecar", &["--ca-bundle", "x", "--admin", "localhost:4191"], "expected IP:PORT"),
        ("palisade-sidecar", &[], "--ca-bundle"),
        ("palisade-sidecar", &["wait-ready", "--bogus"], "unexpected argument"),
        ("palisade-sidecar", &["init", "--inbound-port", "x"], "--inbound-port"),
        ("palisadectl", &["token", "create"], "--identity"),
        ("palisadectl", &["token", "create", "--identity", "x", "--uses", "0"], "--uses"),
        ("palisadectl", &["authz", "check", "--to", "x", "--method", "GE T"], "not an HTTP method"),
        ("palisadectl", &["install", "--control-plane", "https://x:1"], "unexpected argument"),
        ("palisadectl", &["-o", "table", "install"], "use -o yaml (the default) or -o json"),
        ("palisadectl", &["completion", "bash", "-o", "json"], "prints a shell script, in one form only"),
        ("palisadectl", &["-o", "xml", "proxies"], "invalid value 'xml'"),
        ("palisadectl", &[], "Usage"),
    ];
    for (binary, args, says) in cases {
        let out = run(binary, args);
        assert_eq!(out.status.code(), Some(64), "{binary} {args:?}: {}", text(&out));
        assert!(text(&out).contains(says), "{binary} {args:?} should say {says:?}: {}", text(&out));
    }
}

/// What palisadectl checks itself after parsing, in what the user typed or
/// gave (no control plane needed: each is refused before connecting), exits
/// 64 as clap's own errors do; a right command that cannot be done exits 1.
#[test]
fn palisadectl_usage_errors_past_the_parser_exit_64() {
    let tmp = tempfile::tempdir().unwrap();
    let write = |name: &str, body: &str| {
        let f = tmp.path().join(name);
        std::fs::write(&f, body).unwrap();
        f.to_str().unwrap().to_string()
    };
    let meta = "apiVersion: palisade.dev/v1\nmetadata: {name: p, namespace: shop}\n";
    let unknown_kind = write("kind.yaml", &format!("{meta}kind: Gateway\nspec: {{}}\n"));
    let misspelt = write(
        "field.yaml",
        &format!(
            "{meta}kind: AuthorizationPolicy\nspec:\n  target: {{identities: [\"*\"]}}\n  action: ALLOW\n  rules:\n    - form: []\n"
        ),
    );
    let no_yaml = tmp.path().join("empty");
    std::fs::create_dir(&no_yaml).unwrap();
    let no_yaml = no_yaml.to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["policy", "apply", "-f", &unknown_kind], "kind: \"Gateway\" is not a Palisade policy kind"),
        (
            &["policy", "validate", "-f", &misspelt],
            "spec.rules[0].form: unknown field, expected one of `from`, `to`, `when`",
        ),
        (&["policy", "preview", "-f", no_yaml], "holds no .yaml, .yml or .json file"),
        (&["authz", "check", "--to", "x", "--header", "no-value"], "--header \"no-value\": expected NAME=VALUE"),
        (&["cert", "inspect", "nothing-here"], "is neither a readable PEM file nor HOST:PORT"),
        (&["cert", "inspect", "http://127.0.0.1:1"], "only https:// endpoints carry certificates"),
        (&["inject", "-f", "-"], "inject needs the mesh's trust bundle"),
        (&["install", "--generate-ca", "--trust-domain", "Not A Domain"], "--trust-domain"),
        (&["proxies"], "no admin credential: pass --credentials DIR"),
    ];
    for (args, says) in cases {
        let out = Command::new(bin("palisadectl"))
            .args(*args)
            .env("NO_COLOR", "1")
            .env_remove("PALISADE_CREDENTIALS")
            .env_remove("PALISADE_CONTROL_PLANE")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}: {}", text(&out));
        assert!(text(&out).contains(says), "{args:?} should say {says:?}: {}", text(&out));
    }
    // Right, but not doable: nothing listens there (exit 1).
    let out = run("palisadectl", &["cert", "inspect", &format!("127.0.0.1:{}", free_port())]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
}

/// `-o` is global: before or after the subcommand, on every command that
/// prints, the same output; manifests come as YAML or a JSON `List`.
#[test]
fn output_format_works_before_and_after_every_subcommand() {
    let tmp = tempfile::tempdir().unwrap();
    let creds = tmp.path().join("creds");
    let out = run("palisadectl", &["install", "--generate-ca", "--credentials-out", creds.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let cert = creds.join("cert.pem");
    let (cert, bundle) = (cert.to_str().unwrap(), creds.join("ca.pem"));
    let bundle = bundle.to_str().unwrap();
    for args in [
        &["-o", "json", "cert", "inspect", cert, "--bundle", bundle][..],
        &["cert", "-o", "json", "inspect", cert, "--bundle", bundle],
        &["cert", "inspect", cert, "--bundle", bundle, "-o", "json"],
        &["--output=json", "cert", "inspect", cert, "--bundle", bundle],
    ] {
        let out = run("palisadectl", args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {}", text(&out)));
        assert_eq!(v["spiffe_id"], "spiffe://cluster.local/palisade/admin", "{v}");
        assert_eq!(v["chain_verified"], true, "{v}");
    }
    let out = run("palisadectl", &["-o", "yaml", "cert", "inspect", cert]);
    assert!(out.status.success() && text(&out).contains("spiffe_id: spiffe://"), "{}", text(&out));

    for args in [&["-o", "json", "install"][..], &["install", "-o", "json"]] {
        let out = run("palisadectl", args);
        assert!(out.status.success(), "{args:?}: {}", text(&out));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        assert_eq!(v["kind"], "List");
        assert!(v["items"].as_array().unwrap().iter().any(|i| i["kind"] == "Deployment"), "{v}");
    }
    let yaml = run("palisadectl", &["-o", "yaml", "install"]);
    assert_eq!(yaml.stdout, run("palisadectl", &["install"]).stdout);
}

#[test]
fn wait_ready_help_answers_at_once() {
    let start = std::time::Instant::now();
    let out = run("palisade-sidecar", &["wait-ready", "--help"]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("--timeout"));
    assert!(start.elapsed() < Duration::from_secs(10), "wait-ready --help waited");
    // Nothing listening: it gives up after --timeout with a message and exit 1.
    let port = free_port();
    let out = run("palisade-sidecar", &["wait-ready", "--admin", &format!("127.0.0.1:{port}"), "--timeout", "1s"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out).contains("was not ready within 1s"), "{}", text(&out));
}

#[test]
fn a_closed_pipe_ends_output_quietly() {
    let cases: &[(&str, &[&str])] = &[
        ("palisadectl", &["install", "--generate-ca"]),
        ("palisadectl", &["completion", "zsh"]),
        ("palisade-sidecar", &["init", "--dry-run", "--ip6tables", "ip6tables"]),
        ("palisade-sidecar", &["--help"]),
        ("palisade-control-plane", &["--help"]),
    ];
    for (binary, args) in cases {
        // The reader is gone before the first write (as after `| head -c 0`),
        // so every write meets a closed pipe, however small the output.
        let (reader, writer) = std::io::pipe().unwrap();
        drop(reader);
        let out = Command::new(bin(binary)).args(*args).stdout(writer).stderr(Stdio::piped()).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{binary} {args:?}: {stderr}");
        assert!(!stderr.contains("panicked") && !stderr.contains("Broken pipe"), "{binary} {args:?}: {stderr}");
    }
}

/// Runs a command under a pseudo-terminal (util-linux `script`), so that
/// colour decisions see a TTY.
fn under_tty(cmd: &str, no_color: bool) -> String {
    let mut c = Command::new("script");
    c.args(["-qec", cmd, "/dev/null"]).env_remove("NO_COLOR");
    if no_color {
        c.env("NO_COLOR", "1");
    }
    let out = c.output().expect("script (util-linux) runs");
    String::from_utf8_lossy(&out.stdout).to_string()
}

#[test]
fn colour_only_on_a_terminal_and_never_with_no_color() {
    let ctl = bin("palisadectl");
    let bad = format!("{} token create", ctl.display());
    assert!(under_tty(&bad, false).contains('\x1b'), "a terminal gets colour: {:?}", under_tty(&bad, false));
    assert!(!under_tty(&bad, true).contains('\x1b'), "NO_COLOR: {:?}", under_tty(&bad, true));
    // Not a terminal: no escape codes, NO_COLOR or not.
    let out = Command::new(&ctl).args(["token", "create"]).env_remove("NO_COLOR").output().unwrap();
    assert!(!text(&out).contains('\x1b'), "{:?}", text(&out));
}

#[tokio::test]
async fn daemon_logs_have_no_colour_when_not_a_terminal() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("cp"), tmp.path(), &[]).await.unwrap();
    let sc = Sidecar::meshed("web", &cp, tmp.path(), "spiffe://cluster.local/ns/shop/sa/web", &[]).await.unwrap();
    for logs in [cp.proc.logs(), sc.proc.logs()] {
        assert!(logs.contains("INFO"), "{logs}");
        assert!(!logs.contains('\x1b'), "escape codes in a log file: {logs:?}");
    }
    // Under a terminal, the same program colours its log unless NO_COLOR is set.
    let cmd = format!(
        "{} --data-dir {} --listen 127.0.0.1:1 --ca-cert /nonexistent --ca-key /nonexistent",
        bin("palisade-control-plane").display(),
        tmp.path().join("cp2").display()
    );
    assert!(under_tty(&cmd, false).contains('\x1b'), "{:?}", under_tty(&cmd, false));
    assert!(!under_tty(&cmd, true).contains('\x1b'), "{:?}", under_tty(&cmd, true));
}

#[test]
fn completions_and_man_pages() {
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let out = run("palisadectl", &["completion", shell]);
        assert!(out.status.success() && out.stdout.len() > 1000, "{shell}: {}", text(&out));
        assert!(String::from_utf8_lossy(&out.stdout).contains("policy"), "{shell}");
    }
    // The bash script parses and defines the completion function.
    let script = run("palisadectl", &["completion", "bash"]).stdout;
    let tmp = tempfile::tempdir().unwrap();
    let f = tmp.path().join("palisadectl.bash");
    std::fs::write(&f, script).unwrap();
    let check = Command::new("bash")
        .arg("-c")
        .arg(format!("source {} && complete -p palisadectl", f.display()))
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", text(&check));
    assert!(String::from_utf8_lossy(&check.stdout).contains("_palisadectl"));

    let dir = tmp.path().join("man");
    let out = run("palisadectl", &["man", "--dir", dir.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    for page in
        ["palisadectl.1", "palisadectl-policy-apply.1", "palisadectl-token-create.1", "palisadectl-completion.1"]
    {
        let body = std::fs::read_to_string(dir.join(page)).unwrap_or_else(|e| panic!("{page}: {e}"));
        assert!(body.starts_with(".ie") || body.contains(".TH"), "{page}: {body}");
    }
    let apply = std::fs::read_to_string(dir.join("palisadectl-policy-apply.1")).unwrap();
    assert!(apply.contains("wait"), "{apply}");
}

/// A plain-HTTP server on a free port (python3), for "not a TLS port".
fn plain_http() -> (std::process::Child, u16) {
    let port = free_port();
    let child = Command::new("python3")
        .args(["-m", "http.server", &port.to_string(), "--bind", "127.0.0.1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    (child, port)
}

#[tokio::test]
async fn connection_errors_name_the_cause_and_the_fix() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("cp"), tmp.path(), &[]).await.unwrap();
    let other = ControlPlane::start(&tmp.path().join("other"), tmp.path(), &[]).await.unwrap();
    let (mut http, http_port) = plain_http();
    let ctl = |addr: &str| {
        Command::new(bin("palisadectl"))
            .args(["proxies", "--control-plane", addr])
            .env("PALISADE_CREDENTIALS", cp.admin_dir())
            .output()
            .unwrap()
    };
    let cases = [
        (format!("https://127.0.0.1:{}", free_port()), "connection refused: nothing is listening there"),
        (other.addr.clone(), "not signed by the CA bundle you gave"),
        (format!("https://127.0.0.1:{http_port}"), "not a TLS port"),
    ];
    for (addr, says) in &cases {
        let out = ctl(addr);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{addr}: {err}");
        assert!(err.contains(says), "{addr} should say {says:?}: {err}");
        assert!(!err.contains("transport error"), "{err}");
    }
    // A CA mismatch points at the credential directory, not at a stopped server.
    let err = String::from_utf8_lossy(&ctl(&other.addr).stderr).to_string();
    assert!(err.contains("must be the admin directory of the control plane at"), "{err}");
    assert!(!err.contains("running"), "{err}");

    // The sidecar says the same, in its log, while it retries.
    let token = cp.create_token("spiffe://cluster.local/ns/shop/sa/web", &[]).unwrap();
    let mut cmd = Command::new(bin("palisade-sidecar"));
    cmd.args(["--control-plane", &other.addr])
        .arg("--ca-bundle")
        .arg(cp.bundle())
        .args(["--join-token", &token, "--admin", &format!("127.0.0.1:{}", free_port())])
        .args(["--inbound", &format!("127.0.0.1:{}", free_port())]);
    let sc = palisade_tests::Proc::spawn("sidecar-wrong-ca", &mut cmd, tmp.path()).unwrap();
    eventually("the sidecar to name the CA mismatch", Duration::from_secs(10), || {
        let logs = sc.logs();
        async move { logs.contains("not signed by the CA bundle you gave").then_some(()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", sc.logs()));

    // cert inspect: URLs work; a plain port is named as such.
    let out = cp.ctl(&["cert", "inspect", &format!("{}/", cp.addr)]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(text(&out).contains("spiffe://cluster.local/palisade/control-plane"));
    let out = cp.ctl(&["cert", "inspect", &format!("127.0.0.1:{http_port}")]);
    assert!(!out.status.success());
    assert!(text(&out).contains("not a TLS port"), "{}", text(&out));
    let _ = http.kill();
}

#[tokio::test]
async fn policy_commands_read_input_as_users_type_it() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("cp"), tmp.path(), &[]).await.unwrap();
    cp.create_token("spiffe://cluster.local/ns/shop/sa/orders", &[]).unwrap();
    cp.create_token("spiffe://cluster.local/ns/shop/sa/web", &[]).unwrap();
    let write = |name: &str, body: &str| {
        let f = tmp.path().join(name);
        std::fs::write(&f, body).unwrap();
        f
    };
    let policy = write(
        "p.yaml",
        "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/orders\"]}\n  action: ALLOW\n  rules:\n    - from: [{identities: [\"spiffe://cluster.local/ns/shop/sa/web\"]}]\n      to: [{methods: [GET]}]\n",
    );
    let out = cp.ctl(&["policy", "apply", "-f", policy.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    assert!(!text(&out).contains("warning"), "{}", text(&out));

    // Kinds as kubectl reads them.
    for kind in ["AuthorizationPolicy", "authorizationpolicy", "authorizationpolicies", "ap"] {
        let out = cp.ctl(&["policy", "get", kind, "shop/p"]);
        assert!(out.status.success(), "{kind}: {}", text(&out));
        assert!(text(&out).contains("kind: AuthorizationPolicy"), "{}", text(&out));
    }
    let out = cp.ctl(&["policy", "get", "Policy", "shop/p"]);
    assert!(text(&out).contains("unknown policy kind \"Policy\""), "{}", text(&out));
    // What the control plane answers INVALID_ARGUMENT to is a usage error too.
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    let out = cp.ctl(&["policy", "get", "ap", "p"]);
    assert!(text(&out).contains("INVALID_ARGUMENT") && text(&out).contains("is not NAMESPACE/NAME"), "{}", text(&out));

    // Methods in any case.
    let check = |method: &str| {
        let out = cp.ctl(&[
            "authz",
            "check",
            "-o",
            "json",
            "--from",
            "spiffe://cluster.local/ns/shop/sa/web",
            "--to",
            "spiffe://cluster.local/ns/shop/sa/orders",
            "--method",
            method,
        ]);
        assert!(out.status.success(), "{}", text(&out));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()["decision"].as_str().unwrap().to_string()
    };
    assert_eq!(check("get"), "allow");
    assert_eq!(check("GET"), "allow");
    assert_eq!(check("post"), "deny");

    // A missing metadata field is named with its path.
    let bad = write(
        "bad.yaml",
        "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {action: ALLOW}\n",
    );
    let out = cp.ctl(&["policy", "validate", "-f", bad.to_str().unwrap()]);
    assert!(!out.status.success());
    assert!(text(&out).contains("metadata: missing field `namespace`"), "{}", text(&out));

    // Valid but surely not meant: warnings, with the field path.
    let odd = write(
        "odd.yaml",
        "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {name: odd, namespace: shop}\nspec:\n  target: {identities: [\"spiffe://cluster.local/ns/shop/sa/orderz\"]}\n  action: ALLOW\n  rules:\n    - from: [{identities: [\"spiffe://other.example/ns/shop/sa/web\"]}]\n",
    );
    let out = cp.ctl(&["policy", "validate", "-f", odd.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("warning: AuthorizationPolicy shop/odd: spec.target.identities[0]: no workload known to the control plane has \"spiffe://cluster.local/ns/shop/sa/orderz\""),
        "{err}"
    );
    assert!(
        err.contains("spec.rules[0].from[0].identities[0]: \"spiffe://other.example/ns/shop/sa/web\" is in trust domain other.example, but this mesh's is cluster.local: it never matches"),
        "{err}"
    );

    // Thousands of unknown identities: a bounded list and a count.
    let ids: Vec<String> = (0..500).map(|i| format!("\"spiffe://cluster.local/ns/t{i}/sa/x\"")).collect();
    let many = write(
        "many.yaml",
        &format!(
            "apiVersion: palisade.dev/v1\nkind: AuthorizationPolicy\nmetadata: {{name: many, namespace: shop}}\nspec:\n  target: {{identities: [{}]}}\n  action: ALLOW\n",
            ids.join(",")
        ),
    );
    let out = cp.ctl(&["policy", "validate", "-f", many.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.lines().filter(|l| l.starts_with("warning:")).count(), 21, "{err}");
    assert!(err.contains("... and 480 more identities like these"), "{err}");

    // -o before the subcommand, on a command that changes something too.
    let out = cp.ctl(&["-o", "json", "policy", "delete", "ap", "shop/p"]);
    assert!(out.status.success(), "{}", text(&out));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["kind"].as_str(), v["key"].as_str(), v["change"].as_str()),
        (Some("AuthorizationPolicy"), Some("shop/p"), Some("deleted"))
    );

    // A token for another trust domain: said in words, not Debug output.
    let out = cp.ctl(&["token", "create", "--identity", "spiffe://other.example/ns/shop/sa/web"]);
    assert!(!out.status.success());
    assert!(
        text(&out)
            .contains("is in trust domain other.example, but this control plane issues identities in cluster.local"),
        "{}",
        text(&out)
    );
    assert!(!text(&out).contains("TrustDomain("), "{}", text(&out));
}

#[tokio::test]
async fn a_used_up_token_says_how_to_recover() {
    let tmp = tempfile::tempdir().unwrap();
    let cp = ControlPlane::start(&tmp.path().join("cp"), tmp.path(), &[]).await.unwrap();
    let token = cp.create_token("spiffe://cluster.local/ns/shop/sa/web", &[]).unwrap();
    let file = tmp.path().join("web.token");
    std::fs::write(&file, &token).unwrap();
    let first = Sidecar::spawn("first", &cp, tmp.path(), &["--join-token-file", file.to_str().unwrap()]).unwrap();
    first.wait_ready().await.unwrap();
    drop(first);
    // A second sidecar with the same, used, token: the log says what to do.
    let again = Sidecar::spawn("again", &cp, tmp.path(), &["--join-token-file", file.to_str().unwrap()]).unwrap();
    let expected = format!("write a new token (palisadectl token create) into {}", file.display());
    eventually("the fix in the log", Duration::from_secs(10), || {
        let logs = again.proc.logs();
        let expected = expected.clone();
        async move { (logs.contains("has been used up") && logs.contains(&expected)).then_some(()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {}", again.proc.logs()));
    // And writing a new token into the file is enough.
    let fresh = cp.create_token("spiffe://cluster.local/ns/shop/sa/web", &[]).unwrap();
    std::fs::write(&file, fresh).unwrap();
    again.wait_ready().await.unwrap();
}

/// The reference (docs/reference.md) stays true: every flag of the two
/// servers, every palisadectl command and every sidecar metric is in it.
#[test]
fn the_reference_names_every_flag_command_and_metric() {
    let reference = std::fs::read_to_string(palisade_tests::repo_root().join("docs/reference.md")).unwrap();
    let help = |bin: &str, args: &[&str]| {
        let out = std::process::Command::new(palisade_tests::bin(bin)).args(args).arg("--help").output().unwrap();
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let mut missing = Vec::new();
    for bin in ["palisade-control-plane", "palisade-sidecar"] {
        // The option lines: `  -x, --flag <VALUE>` or `      --flag <VALUE>`.
        let text = help(bin, &[]);
        let options = text.lines().filter(|l| l.trim_start().starts_with('-'));
        for flag in options.filter_map(|l| l.split_whitespace().find(|w| w.starts_with("--"))) {
            let flag = flag.trim_end_matches([',', '.']).split(['=', '[', '<']).next().unwrap_or_default();
            if flag.len() > 2 && !["--help", "--version"].contains(&flag) && !reference.contains(&format!("`{flag}")) {
                missing.push(format!("{bin} {flag}"));
            }
        }
    }
    let top = help("palisadectl", &[]);
    let commands: Vec<&str> = top
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() >= 10, "{top}");
    for c in commands {
        if !reference.contains(&format!("- `{c}")) && !reference.contains(&format!("`{c} ")) {
            missing.push(format!("palisadectl {c}"));
        }
    }
    let metrics = ["sidecar/src/metrics.rs", "sidecar/src/observe.rs"]
        .map(|f| std::fs::read_to_string(palisade_tests::repo_root().join(f)).unwrap())
        .concat();
    for name in
        metrics.split("reg.register(").skip(1).filter_map(|r| r.trim_start().strip_prefix('"')?.split('"').next())
    {
        if !reference.contains(&format!("palisade_{name}")) {
            missing.push(format!("metric palisade_{name}"));
        }
    }
    assert!(missing.is_empty(), "docs/reference.md lacks: {missing:?}");
}

/// `./scripts/test.sh --help` answers at once with its own short help (how
/// to run one test, how to list them), building nothing: cargo is not even
/// on its PATH here, so a build would fail.
#[test]
fn the_test_script_has_its_own_short_help() {
    for flag in ["--help", "-h"] {
        let start = std::time::Instant::now();
        let out = Command::new(palisade_tests::repo_root().join("scripts/test.sh"))
            .arg(flag)
            .env("PATH", "/usr/bin:/bin")
            .output()
            .unwrap();
        let help = text(&out);
        assert!(out.status.success(), "{flag}: {help}");
        assert!(help.lines().count() < 30, "{flag}: {} lines: {help}", help.lines().count());
        assert!(help.contains("./scripts/test.sh -E 'test(") && help.contains("--list"), "{flag}: {help}");
        assert!(start.elapsed() < Duration::from_secs(5), "{flag} took {:?}", start.elapsed());
    }
}

/// `check --kubernetes` where no cluster answers: one line that says so,
/// with kubectl's reason, the kubeconfig and the context it used (not
/// kubectl's eight lines of retries), and a failing exit status.
#[test]
fn check_kubernetes_without_a_cluster_says_so_in_one_line() {
    let check = |kubectl: &str, kubeconfig: &std::path::Path| {
        let out = Command::new(bin("palisadectl"))
            .args(["check", "--kubernetes", "--kubectl", kubectl])
            .env("NO_COLOR", "1")
            .env("KUBECONFIG", kubeconfig)
            .env_remove("PALISADE_CREDENTIALS")
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", text(&out));
        let all = text(&out);
        let lines: Vec<String> = all.lines().filter(|l| l.contains("kubernetes")).map(String::from).collect();
        assert_eq!(lines.len(), 1, "{all}");
        assert!(!all.contains(".go:"), "kubectl's own log lines: {all}");
        lines[0].clone()
    };
    let tmp = tempfile::tempdir().unwrap();
    let line = check("kubectl-is-not-here", tmp.path());
    assert!(line.contains("[FAIL] kubernetes: kubectl-is-not-here is not installed (not found on PATH)"), "{line}");

    if Command::new("kubectl").args(["version", "--client"]).output().is_err() {
        return palisade_tests::skip("check_kubernetes_without_a_cluster_says_so_in_one_line", "kubectl not installed");
    }
    let port = free_port();
    let kubeconfig = tmp.path().join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- cluster: {{server: \"https://127.0.0.1:{port}\"}}\n  name: nowhere\n\
             contexts:\n- context: {{cluster: nowhere, user: u}}\n  name: nowhere-ctx\ncurrent-context: nowhere-ctx\n\
             users:\n- name: u\n  user: {{token: x}}\n"
        ),
    )
    .unwrap();
    let line = check("kubectl", &kubeconfig);
    let want = format!(
        "[FAIL] kubernetes: no Kubernetes cluster is reachable: The connection to the server 127.0.0.1:{port} was refused (kubeconfig {}, context nowhere-ctx)",
        kubeconfig.display()
    );
    assert_eq!(line, want);
}
