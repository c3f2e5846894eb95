//! Kubernetes injection: the control plane's admission webhook answering real
//! AdmissionReview JSON over HTTPS, the returned JSONPatch applied, and the
//! results (and `palisadectl install` / `inject` output) validated against the
//! Kubernetes 1.29 and 1.33 schemas with strict field checking
//! (`kubernetes-validate`, installed by .ci/run; skipped with a message if absent).

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use palisade_tests::{ControlPlane, free_port};

use rustls_pki_types::ServerName;
use serde_json::{Value, json};

const WEBHOOK_NAME: &str = "palisade-control-plane.palisade-system.svc";

/// Validates YAML/JSON documents against a Kubernetes version, strictly.
fn validate(docs: &str, versions: &[&str]) -> Option<()> {
    let available = Command::new("kubernetes-validate").arg("--version").output().is_ok_and(|o| o.status.success());
    if !available {
        palisade_tests::skip(
            "Kubernetes schema validation",
            "kubernetes-validate is not installed (pip install kubernetes-validate)",
        );
        return None;
    }
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), docs).unwrap();
    for v in versions {
        let out = Command::new("kubernetes-validate").args(["--strict", "-k", v]).arg(f.path()).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !text.contains("ERROR"),
            "Kubernetes {v} schema: {text}{}\n{docs}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Some(())
}

/// What `kubectl apply -k DIR` applies: the kustomizations under deploy/
/// list resources only (no patches, no generators), files or directories.
pub(crate) fn render(dir: &std::path::Path) -> Vec<String> {
    let k = std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap();
    let doc: Value = serde_saphyr::from_str(&k).unwrap();
    let keys: Vec<&String> = doc.as_object().unwrap().keys().collect();
    assert!(
        keys.iter().all(|k| ["apiVersion", "kind", "resources"].contains(&k.as_str())),
        "{}: resources only, so that this render is what kustomize applies: {keys:?}",
        dir.display()
    );
    let mut out = Vec::new();
    for r in doc["resources"].as_array().unwrap() {
        let p = dir.join(r.as_str().unwrap());
        if p.is_dir() {
            out.extend(render(&p));
        } else {
            out.push(std::fs::read_to_string(&p).unwrap());
        }
    }
    out
}

/// `kind namespace/name` of every object in a multi-document YAML text, sorted.
fn kinds(yaml: &str) -> Vec<String> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).unwrap();
    let mut k: Vec<String> = docs
        .iter()
        .filter(|d| !d.is_null())
        .map(|d| {
            format!(
                "{} {}/{}",
                d["kind"].as_str().unwrap(),
                d["metadata"]["namespace"].as_str().unwrap_or(""),
                d["metadata"]["name"].as_str().unwrap()
            )
        })
        .collect();
    k.sort();
    k
}

pub(crate) async fn post(port: u16, ca_pem: &str, body: Vec<u8>) -> (u16, String) {
    let roots = palisade_certs::svid::root_store(&palisade_certs::ca::parse_pem_certs(ca_pem).unwrap()).unwrap();
    let cfg = rustls::ClientConfig::builder_with_provider(palisade_certs::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    // The API server checks the Service DNS name in the webhook's certificate.
    let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(ServerName::try_from(WEBHOOK_NAME).unwrap(), tcp)
        .await
        .unwrap();
    let (mut s, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls)).await.unwrap();
    tokio::spawn(conn);
    let req = hyper::Request::post("/mutate")
        .header("host", WEBHOOK_NAME)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let resp = s.send_request(req).await.unwrap();
    let status = resp.status().as_u16();
    (status, String::from_utf8_lossy(&resp.into_body().collect().await.unwrap().to_bytes()).into_owned())
}

pub(crate) fn review(uid: &str, pod: Value, dry_run: bool) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {"uid": uid, "kind": {"group": "", "version": "v1", "kind": "Pod"}, "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "shop", "operation": "CREATE", "dryRun": dry_run, "object": pod, "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"}}
    }))
    .unwrap()
}

/// Applies the response's JSONPatch to `pod` (None when there is no patch).
fn patched(pod: &Value, resp: &Value) -> Option<Value> {
    let patch = resp["response"]["patch"].as_str()?;
    assert_eq!(resp["response"]["patchType"], "JSONPatch");
    let patch: json_patch::Patch =
        serde_json::from_slice(&base64::engine::general_purpose::STANDARD.decode(patch).unwrap()).unwrap();
    let mut out = pod.clone();
    json_patch::patch(&mut out, &patch).unwrap();
    Some(out)
}

pub(crate) fn pod_of_deployment() -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
        "metadata": {"generateName": "web-5d8f7c-", "namespace": "shop", "labels": {"app": "web"}, "annotations": {"palisade.dev/skip-outbound-ports": "5432"}},
        "spec": {"serviceAccountName": "web", "containers": [{"name": "web", "image": "nginx:1.27", "ports": [{"containerPort": 80}]}]}})
}

#[tokio::test]
async fn the_admission_webhook_injects_pods_and_refuses_garbage() {
    let tmp = tempfile::tempdir().unwrap();
    let port = free_port();
    let cp =
        ControlPlane::start(&tmp.path().join("data"), tmp.path(), &["--webhook-listen", &format!("127.0.0.1:{port}")])
            .await
            .unwrap();
    let ca = std::fs::read_to_string(cp.bundle()).unwrap();
    let mut validated = Vec::new();

    // A Deployment's pod: injected; the patch applies and the result is a valid Pod.
    let pod = pod_of_deployment();
    let (status, body) = post(port, &ca, review("u-1", pod.clone(), false)).await;
    assert_eq!(status, 200, "{body}");
    let resp: Value = serde_json::from_str(&body).unwrap();
    assert_eq!((resp["response"]["uid"].as_str(), resp["response"]["allowed"].as_bool()), (Some("u-1"), Some(true)));
    let injected = patched(&pod, &resp).expect("a patch");
    let inits = injected["spec"]["initContainers"].as_array().unwrap();
    assert_eq!(inits[1]["name"], "palisade-proxy");
    assert_eq!(inits[1]["restartPolicy"], "Always", "native sidecar");
    assert_eq!(inits[1]["startupProbe"]["httpGet"]["path"], "/ready");
    // The control plane's own trust bundle, in the pod spec.
    let env = inits[1]["env"].as_array().unwrap();
    assert!(env.iter().any(|e| e["name"] == "PALISADE_CA_BUNDLE_PEM" && e["value"] == ca.as_str()));
    assert!(
        injected["spec"]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["projected"]["sources"][0]["serviceAccountToken"]["audience"] == "palisade")
    );
    validated.push(injected.clone());

    // A Job's pod (restartPolicy Never): the native sidecar lets the Job complete.
    let mut job_pod = pod_of_deployment();
    job_pod["spec"]["restartPolicy"] = json!("Never");
    let resp: Value = serde_json::from_str(&post(port, &ca, review("u-2", job_pod.clone(), false)).await.1).unwrap();
    validated.push(patched(&job_pod, &resp).expect("a patch"));

    // dryRun: same answer, no side effects to undo.
    let resp: Value = serde_json::from_str(&post(port, &ca, review("u-3", pod.clone(), true)).await.1).unwrap();
    assert!(patched(&pod, &resp).is_some());

    // Already injected, and opted out: allowed, no patch.
    let resp: Value = serde_json::from_str(&post(port, &ca, review("u-4", injected.clone(), false)).await.1).unwrap();
    assert_eq!((resp["response"]["allowed"].as_bool(), resp["response"]["patch"].is_null()), (Some(true), true));
    let mut opted_out = pod_of_deployment();
    opted_out["metadata"]["annotations"]["palisade.dev/inject"] = json!("disabled");
    let resp: Value = serde_json::from_str(&post(port, &ca, review("u-5", opted_out, false)).await.1).unwrap();
    assert_eq!((resp["response"]["allowed"].as_bool(), resp["response"]["patch"].is_null()), (Some(true), true));

    // A bad annotation: a clear refusal, not a crash.
    let mut bad = pod_of_deployment();
    bad["metadata"]["annotations"]["palisade.dev/skip-outbound-ports"] = json!("db");
    let resp: Value = serde_json::from_str(&post(port, &ca, review("u-6", bad, false)).await.1).unwrap();
    assert_eq!(resp["response"]["allowed"], false);
    assert!(
        resp["response"]["status"]["message"].as_str().unwrap().contains("palisade.dev/skip-outbound-ports"),
        "{resp}"
    );

    // Garbage: HTTP 400 with a reason; the webhook keeps serving.
    for garbage in [b"not json".to_vec(), b"{}".to_vec(), br#"{"request": {}}"#.to_vec()] {
        let (status, body) = post(port, &ca, garbage).await;
        assert_eq!(status, 400, "{body}");
    }
    let (status, _) = post(port, &ca, review("u-7", pod.clone(), false)).await;
    assert_eq!(status, 200);

    // The API server names a generateName pod before admission; the validator wants a name.
    for d in &mut validated {
        d["metadata"]["name"] = json!("web-5d8f7c-x7k2p");
    }
    let docs: Vec<String> = validated.iter().map(|d| serde_json::to_string(d).unwrap()).collect();
    validate(&docs.join("\n---\n"), &["1.29.0", "1.33.0"]);
    assert!(cp.proc.logs().contains("admission review answered"));
}

#[tokio::test]
async fn install_and_inject_output_is_valid_kubernetes() {
    let ctl = palisade_tests::bin("palisadectl");
    let tmp = tempfile::tempdir().unwrap();
    let creds = tmp.path().join("admin");
    let out = Command::new(&ctl).args(["install", "--generate-ca", "--credentials-out"]).arg(&creds).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let manifests = String::from_utf8(out.stdout).unwrap();
    // The admin credential stays on this machine: key 0600, nothing of it in the manifests.
    use std::os::unix::fs::PermissionsExt;
    let key_mode = std::fs::metadata(creds.join("key.pem")).unwrap().permissions().mode() & 0o777;
    assert_eq!(key_mode, 0o600);
    let admin_cert = std::fs::read_to_string(creds.join("cert.pem")).unwrap();
    let admin_key = std::fs::read_to_string(creds.join("key.pem")).unwrap();
    let first_line = |pem: &str| pem.lines().nth(1).unwrap().to_string();
    assert!(!manifests.contains(&first_line(&admin_cert)) && !manifests.contains(&first_line(&admin_key)));
    let bundle = std::fs::read_to_string(creds.join("ca.pem")).unwrap();
    assert!(manifests.contains(&first_line(&bundle)), "the Secret and trust ConfigMap hold the same CA");
    // One image, from the workspace version, everywhere; --image replaces it everywhere.
    let image = format!("localhost/palisade:{}", env!("CARGO_PKG_VERSION"));
    assert!(manifests.contains(&format!("image: {image}")), "{manifests}");
    let base_cp = std::fs::read_to_string(palisade_tests::repo_root().join("deploy/base/control-plane.yaml")).unwrap();
    assert!(base_cp.contains(&format!("image: {image}")), "deploy/base names the workspace version's image");
    // The generated root only seeds the control plane's own, rotatable CA;
    // a CA the operator puts in the Secret (deploy/base as is) stays theirs.
    assert!(manifests.contains("- --ca-seed\n") && !base_cp.contains("--ca-seed"), "{manifests}");
    let other = Command::new(&ctl).args(["install", "--image", "registry.example/mesh/palisade:9"]).output().unwrap();
    let other = String::from_utf8(other.stdout).unwrap();
    assert!(!other.contains(&image) && other.contains("--proxy-image=registry.example/mesh/palisade:9"), "{other}");
    // --credentials-out never overwrites.
    let again =
        Command::new(&ctl).args(["install", "--generate-ca", "--credentials-out"]).arg(&creds).output().unwrap();
    assert_eq!(again.status.code(), Some(64), "a usage error: choose another directory");
    assert!(String::from_utf8_lossy(&again.stderr).contains("already exists"));
    for kind in [
        "Namespace",
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "Secret",
        "ConfigMap",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "MutatingWebhookConfiguration",
    ] {
        assert!(manifests.contains(&format!("kind: {kind}")), "{kind} missing");
    }
    assert!(manifests.contains("BEGIN CERTIFICATE") && manifests.contains("tokenreviews"));
    assert!(!manifests.contains("caBundle: ''") && !manifests.contains("caBundle: \"\""), "caBundle filled in");
    validate(&manifests, &["1.29.0", "1.33.0"]);
    // The kustomize base itself, as files (what `kubectl apply -k deploy/base` renders).
    let rendered = render(&palisade_tests::repo_root().join("deploy/base"));
    assert_eq!(rendered.len(), 5);
    assert_eq!(kinds(&rendered.join("\n---\n")), kinds(&manifests), "install prints what deploy/base holds");
    validate(&rendered.join("\n---\n"), &["1.29.0", "1.33.0"]);

    let workloads = r#"apiVersion: apps/v1
kind: StatefulSet
metadata: {name: db, namespace: shop}
spec:
  serviceName: db
  selector: {matchLabels: {app: db}}
  template:
    metadata: {labels: {app: db}, annotations: {palisade.dev/opaque-ports: "5432"}}
    spec: {containers: [{name: pg, image: postgres:16}]}
---
apiVersion: apps/v1
kind: DaemonSet
metadata: {name: agent, namespace: shop}
spec:
  selector: {matchLabels: {app: agent}}
  template:
    metadata: {labels: {app: agent}}
    spec: {containers: [{name: a, image: busybox}]}
---
apiVersion: batch/v1
kind: Job
metadata: {name: migrate, namespace: shop}
spec:
  template:
    spec: {restartPolicy: Never, containers: [{name: m, image: busybox}]}
---
apiVersion: v1
kind: Pod
metadata: {name: opted-out, namespace: shop, annotations: {palisade.dev/inject: disabled}}
spec: {containers: [{name: c, image: busybox}]}
"#;
    let run = |input: &str, extra: &[&str]| {
        let mut child = Command::new(&ctl)
            .args(["inject", "-f", "-", "--credentials"])
            .arg(&creds)
            .args(extra)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), input.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        (String::from_utf8(out.stdout).unwrap(), String::from_utf8(out.stderr).unwrap())
    };
    let (injected, report) = run(workloads, &[]);
    assert!(report.contains("statefulset/db: injected") && report.contains("pod/opted-out: skipped"), "{report}");
    assert_eq!(injected.matches("name: palisade-proxy").count(), 3);
    // The trust bundle travels in each pod's spec: no ConfigMap needed in the namespace.
    assert_eq!(injected.matches("PALISADE_CA_BUNDLE_PEM").count(), 3);
    assert!(!injected.contains("configMap"), "{injected}");
    assert_eq!(injected.matches(&first_line(&bundle)).count(), 3, "the install's CA, in every pod");
    // Without a bundle, inject says where to get one.
    let none = Command::new(&ctl).args(["inject", "-f", "-"]).env_remove("PALISADE_CREDENTIALS").output().unwrap();
    assert_eq!(none.status.code(), Some(64), "a missing flag is a usage error");
    assert!(String::from_utf8_lossy(&none.stderr).contains("--ca-bundle FILE or --credentials DIR"));
    validate(&injected, &["1.29.0", "1.33.0"]);
    let (again, report) = run(&injected, &[]);
    assert_eq!(again, injected, "injecting twice changes nothing");
    assert!(report.contains("already injected"));
    let (classic, _) = run(workloads, &["--classic-sidecar"]);
    assert!(classic.contains("wait-ready"));
    validate(&classic, &["1.29.0", "1.33.0"]);
    let _ = Duration::ZERO;
}

/// `palisadectl check --kubernetes` on cluster states built from the real
/// `install` and `inject` output, with the statuses a kubelet reports added
/// (no API server runs here: kubectl's JSON is read from a file).
#[test]
fn check_reports_what_is_wrong_with_a_cluster_install() {
    if !Command::new("python3").args(["-c", "import yaml"]).status().is_ok_and(|s| s.success()) {
        palisade_tests::skip("check_reports_what_is_wrong_with_a_cluster_install", "python3 lacks PyYAML");
        return;
    }
    let ctl = palisade_tests::bin("palisadectl");
    let tmp = tempfile::tempdir().unwrap();
    let to_json = |yaml: &[u8]| -> Vec<Value> {
        let mut child = Command::new("python3")
            .args(["-c", "import sys,yaml,json; print(json.dumps([d for d in yaml.safe_load_all(sys.stdin) if d]))"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        std::io::Write::write_all(child.stdin.as_mut().unwrap(), yaml).unwrap();
        serde_json::from_slice(&child.wait_with_output().unwrap().stdout).unwrap()
    };
    let install = |creds: &std::path::Path| {
        let out =
            Command::new(&ctl).args(["install", "--generate-ca", "--credentials-out"]).arg(creds).output().unwrap();
        assert!(out.status.success());
        to_json(&out.stdout)
    };
    let (creds, other_creds) = (tmp.path().join("admin"), tmp.path().join("other"));
    let manifests = install(&creds);
    let other = install(&other_creds);
    let inject = |creds: &std::path::Path| {
        let pod = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, namespace: shop}\nspec: {containers: [{name: app, image: web:1}]}\n";
        let file = tmp.path().join("pod.yaml");
        std::fs::write(&file, pod).unwrap();
        let out =
            Command::new(&ctl).args(["inject", "-f"]).arg(&file).arg("--credentials").arg(creds).output().unwrap();
        assert!(out.status.success());
        to_json(&out.stdout).remove(0)
    };
    let deployment = manifests.iter().find(|d| d["kind"] == "Deployment").unwrap().clone();
    let cp_pod = |waiting: Option<&str>| {
        let template = &deployment["spec"]["template"];
        let state = match waiting {
            Some(reason) => json!({"waiting": {"reason": reason}}),
            None => json!({"running": {}}),
        };
        json!({"kind": "Pod", "metadata": {"name": "palisade-control-plane-7d9f-x2", "namespace": "palisade-system",
            "labels": template["metadata"]["labels"]}, "spec": template["spec"],
            "status": {"containerStatuses": [{"name": "control-plane", "state": state}]}})
    };
    let state = |items: Vec<Value>| {
        let f = tmp.path().join("state.json");
        std::fs::write(&f, serde_json::to_vec(&json!({"apiVersion": "v1", "kind": "List", "items": items})).unwrap())
            .unwrap();
        f
    };
    let check = |file: &std::path::Path| -> Value {
        let out = Command::new(&ctl)
            .args([
                "check",
                "-o",
                "json",
                "--control-plane",
                "https://127.0.0.1:9",
                "--kubernetes",
                "--kubernetes-state",
            ])
            .arg(file)
            .arg("--credentials")
            .arg(&creds)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "the control plane is not reachable here");
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let find = |report: &Value, name: &str| -> (bool, String) {
        let c = report["checks"].as_array().unwrap().iter().find(|c| c["check"] == name).unwrap_or_else(|| {
            panic!("no check {name:?} in {report}");
        });
        (c["ok"].as_bool().unwrap(), c["detail"].as_str().unwrap().to_string())
    };

    // A healthy install: everything but the unreachable control plane passes.
    let mut healthy: Vec<Value> = manifests.clone();
    healthy
        .iter_mut()
        .filter(|d| d["kind"] == "Deployment")
        .for_each(|d| d["status"] = json!({"availableReplicas": 1}));
    healthy.push(cp_pod(None));
    let mut web = inject(&creds);
    web["status"] = json!({"containerStatuses": [{"name": "app", "state": {"running": {}}}]});
    healthy.push(web.clone());
    let report = check(&state(healthy.clone()));
    let (ok, detail) = find(&report, "control plane reachable");
    assert!(
        !ok && detail.contains("kubectl -n palisade-system port-forward svc/palisade-control-plane 7700:7700"),
        "{detail}"
    );
    assert_eq!(find(&report, "control plane running"), (true, "1 replica available".into()));
    assert!(find(&report, "webhook inject.palisade.dev").0);
    assert_eq!(find(&report, "injected pods"), (true, "1 found".into()));
    let failed: Vec<&Value> = report["checks"].as_array().unwrap().iter().filter(|c| c["ok"] == false).collect();
    assert_eq!(failed.len(), 1, "only the control plane connection fails: {failed:?}");

    // Image pull, a webhook with another CA, a pod with another bundle, and
    // a pod injected the old way in a namespace without the ConfigMap.
    let mut broken: Vec<Value> =
        manifests.iter().filter(|d| d["kind"] != "MutatingWebhookConfiguration").cloned().collect();
    broken.push(other.iter().find(|d| d["kind"] == "MutatingWebhookConfiguration").unwrap().clone());
    broken.push(cp_pod(Some("ImagePullBackOff")));
    let mut stale = inject(&other_creds);
    stale["metadata"]["name"] = json!("stale");
    broken.push(stale);
    let mut old = web.clone();
    old["metadata"]["name"] = json!("old");
    let env = old.pointer_mut("/spec/initContainers/1/env").unwrap().as_array_mut().unwrap();
    env.retain(|e| e["name"] != "PALISADE_CA_BUNDLE_PEM");
    broken.push(old);
    let report = check(&state(broken));
    let (ok, detail) = find(&report, "control plane running");
    assert!(!ok && detail.contains("ImagePullBackOff") && detail.contains("--image"), "{detail}");
    let (ok, detail) = find(&report, "webhook inject.palisade.dev");
    assert!(!ok && detail.contains("not the mesh CA"), "{detail}");
    let (ok, detail) = find(&report, "pod shop/stale");
    assert!(!ok && detail.contains("another trust bundle") && detail.contains("rollout restart"), "{detail}");
    let (ok, detail) = find(&report, "pod shop/old");
    assert!(!ok && detail.contains("trust bundle missing in namespace shop"), "{detail}");

    // Nothing installed.
    let report = check(&state(vec![web]));
    let (ok, detail) = find(&report, "control plane installed");
    assert!(!ok && detail.contains("palisadectl install"), "{detail}");
}

/// deploy/ha, as `kubectl apply -k` and `palisadectl install --ha` give it:
/// strict schemas, three replicas apart with a PDB, a three-member etcd only
/// they reach; and two control planes run with the Deployment's own
/// arguments against a real etcd share the CA the Secret seeded, rotate it,
/// and keep the rotated root over a restart.
#[tokio::test]
async fn the_ha_overlay_validates_and_its_replicas_share_and_rotate_the_seeded_ca() {
    let tmp = tempfile::tempdir().unwrap();
    let rendered = render(&palisade_tests::repo_root().join("deploy/ha")).join("\n---\n");
    let out =
        Command::new(palisade_tests::bin("palisadectl")).args(["install", "--ha", "--generate-ca"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("never apply another over it"));
    let manifests = String::from_utf8(out.stdout).unwrap();
    assert_eq!(kinds(&rendered), kinds(&manifests), "install --ha prints what deploy/ha holds");
    validate(&rendered, &["1.29.0", "1.33.0"]);
    validate(&manifests, &["1.29.0", "1.33.0"]);
    let docs: Vec<Value> = serde_saphyr::from_multiple(&manifests).unwrap();
    let find = |kind: &str, name: &str| {
        docs.iter()
            .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("{kind} {name}"))
    };
    let cp = find("Deployment", "palisade-control-plane");
    assert_eq!(cp["spec"]["replicas"], 3);
    let anti = &cp["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        [0];
    assert_eq!(anti["topologyKey"], "kubernetes.io/hostname");
    assert_eq!(find("PodDisruptionBudget", "palisade-control-plane")["spec"]["minAvailable"], 2);
    assert_eq!(find("StatefulSet", "palisade-etcd")["spec"]["replicas"], 3);
    let np = find("NetworkPolicy", "palisade-etcd");
    assert_eq!(
        np["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "palisade-control-plane"
    );
    assert!(!docs.iter().any(|d| d["kind"] == "PersistentVolumeClaim"), "the replicas keep no state of their own");
    let etcd_image = find("StatefulSet", "palisade-etcd")["spec"]["template"]["spec"]["containers"][0]["image"].clone();
    assert!(etcd_image.as_str().unwrap().contains("etcd"), "install --image leaves etcd's image alone: {etcd_image}");

    // The Deployment's arguments, run for real against an etcd on loopback.
    let Some((_etcd, url, _)) = crate::replicas::etcd(&tmp.path().join("etcd"), tmp.path()).await else { return };
    let secret = |name: &str, key: &str| find("Secret", name)["stringData"][key].as_str().unwrap().to_string();
    let (ca_cert, ca_key, store_key) =
        (tmp.path().join("tls.crt"), tmp.path().join("tls.key"), tmp.path().join("store.key"));
    std::fs::write(&ca_cert, secret("palisade-ca", "tls.crt")).unwrap();
    palisade_certs::files::write_secret(&ca_key, &secret("palisade-ca", "tls.key")).unwrap();
    palisade_certs::files::write_secret(&store_key, &secret("palisade-store-key", "key")).unwrap();
    // Each replica with ports of its own.
    let args_for = || -> Vec<String> {
        cp["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .skip(1) // the image's entrypoint runs `control-plane` as palisade-control-plane
            .map(|a| a.as_str().unwrap().to_string())
            .filter_map(|a| {
                let (flag, _) = a.split_once('=').unwrap_or((a.as_str(), ""));
                Some(match flag {
                    // Set by ControlPlane::start; no API server here for TokenReview.
                    "--data-dir" | "--listen" | "--k8s-attestation" => return None,
                    "--etcd-endpoints" => format!("{flag}={url}"),
                    "--store-key-file" => format!("{flag}={}", store_key.display()),
                    "--ca-cert" => format!("{flag}={}", ca_cert.display()),
                    "--ca-key" => format!("{flag}={}", ca_key.display()),
                    "--webhook-listen" | "--oauth-listen" | "--metrics-listen" => {
                        format!("{flag}=127.0.0.1:{}", free_port())
                    }
                    _ => a,
                })
            })
            .collect()
    };
    let start = |dir: &str| {
        let args = args_for();
        let dir = tmp.path().join(dir);
        let log = tmp.path().to_path_buf();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            ControlPlane::start(&dir, &log, &args).await.unwrap()
        }
    };
    let a = start("a").await;
    let b = start("b").await;
    let seeded = std::fs::read_to_string(&ca_cert).unwrap();
    for cp in [&a, &b] {
        assert_eq!(std::fs::read_to_string(cp.bundle()).unwrap(), seeded, "the Secret's CA, from etcd");
    }
    // Both write to one log here: the CA was stored once, by one of them.
    assert_eq!(a.proc.logs().matches("stored the CA of --ca-cert/--ca-key").count(), 1, "one replica seeds etcd");
    // It rotates (no proxies to wait for), on both replicas.
    let out = b.ctl(&["ca", "rotate", "--generate", "-o", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let s: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["phase"], "done");
    let rotated = s["bundle_pem"].as_str().unwrap().to_string();
    assert_ne!(rotated, seeded);
    palisade_tests::eventually(
        "both replicas' admin bundles to hold the new root",
        Duration::from_secs(10),
        || async {
            (std::fs::read_to_string(a.bundle()).ok()? == rotated
                && std::fs::read_to_string(b.bundle()).ok()? == rotated)
                .then_some(())
        },
    )
    .await
    .unwrap();
    // Restarted with the same (now stale) Secret, a replica keeps etcd's rotated root.
    let mut a = a;
    a.proc.terminate(Duration::from_secs(10)).unwrap();
    std::fs::remove_dir_all(tmp.path().join("a")).unwrap();
    let a = start("a").await;
    assert_eq!(std::fs::read_to_string(a.bundle()).unwrap(), rotated);
}
