//! `palisadectl inject` and `palisadectl install`: Kubernetes YAML offline.

use palisade_cmd::{out, outln};
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use base64::Engine;
use serde_json::Value;

/// What deploy/common holds, in the order of its kustomization.
const COMMON: &[(&str, &str)] = &[
    ("namespace.yaml", include_str!("../../deploy/common/namespace.yaml")),
    ("rbac.yaml", include_str!("../../deploy/common/rbac.yaml")),
    ("ca.yaml", include_str!("../../deploy/common/ca.yaml")),
    ("webhook.yaml", include_str!("../../deploy/common/webhook.yaml")),
];
/// deploy/base after common: one replica, its state on a volume.
const BASE: &[(&str, &str)] = &[("control-plane.yaml", include_str!("../../deploy/base/control-plane.yaml"))];
/// deploy/ha after common: three replicas on etcd.
const HA: &[(&str, &str)] = &[
    ("store-key.yaml", include_str!("../../deploy/ha/store-key.yaml")),
    ("control-plane.yaml", include_str!("../../deploy/ha/control-plane.yaml")),
    ("etcd.yaml", include_str!("../../deploy/ha/etcd.yaml")),
];

pub(crate) fn read_input(file: &Path) -> Result<String> {
    if file == Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        Ok(s)
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))
    }
}

/// Prints manifests as YAML documents, or with `-o json` as one `List`
/// (what `kubectl get -o json` prints for several objects; `kubectl apply` takes it).
fn print_docs(docs: &[Value], format: crate::Output) -> Result<()> {
    if format == crate::Output::Json {
        let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": docs});
        outln!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(());
    }
    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            outln!("---");
        }
        out!("{}", serde_saphyr::to_string(d)?);
    }
    Ok(())
}

/// Injects every workload of a multi-document YAML file and prints the result.
pub(crate) fn inject(
    file: &Path,
    image: &str,
    bundle: Option<&Path>,
    control_plane: &str,
    classic: bool,
    format: crate::Output,
) -> Result<()> {
    let bundle = bundle.ok_or_else(|| {
        crate::usage(
            "inject needs the mesh's trust bundle: --ca-bundle FILE or --credentials DIR (its ca.pem; \
             `palisadectl install --credentials-out DIR` writes one)",
        )
    })?;
    let trust_bundle_pem =
        std::fs::read_to_string(bundle).with_context(|| format!("--ca-bundle: cannot read {}", bundle.display()))?;
    let roots = palisade_certs::ca::parse_pem_certs(&trust_bundle_pem)
        .map_err(|e| crate::usage(format!("--ca-bundle {}: {e}", bundle.display())))?;
    if roots.is_empty() {
        return Err(crate::usage(format!("--ca-bundle {}: no certificate in it", bundle.display())));
    }
    let text = read_input(file)?;
    let mut docs: Vec<Value> =
        serde_saphyr::from_multiple(&text).map_err(|e| crate::usage(format!("{}: {e}", file.display())))?;
    docs.retain(|d| !d.is_null());
    let cfg = palisade_inject::Config {
        image: image.to_string(),
        control_plane: control_plane.to_string(),
        native_sidecar: !classic,
        trust_bundle_pem,
        ..Default::default()
    };
    for d in &mut docs {
        let what = format!(
            "{}/{}",
            d["kind"].as_str().unwrap_or("?").to_lowercase(),
            d["metadata"]["name"].as_str().unwrap_or("?")
        );
        match palisade_inject::inject_object(d, &cfg) {
            Ok(palisade_inject::Outcome::Injected) => eprintln!("{what}: injected"),
            Ok(palisade_inject::Outcome::Skipped(why)) => eprintln!("{what}: skipped ({why})"),
            Err(e) => return Err(crate::usage(format!("{what}: {e}"))),
        }
    }
    print_docs(&docs, format)
}

/// Prints the install manifests, optionally with a freshly generated CA
/// (and then, if asked, an admin credential kept on this machine).
pub(crate) fn install(
    generate_ca: bool,
    trust_domain: &str,
    image: &str,
    credentials_out: Option<&Path>,
    ha: bool,
    format: crate::Output,
) -> Result<()> {
    if let Some(dir) = credentials_out
        && dir.exists()
    {
        return Err(crate::usage(format!(
            "--credentials-out {}: already exists; choose a new directory",
            dir.display()
        )));
    }
    let mut docs = Vec::new();
    for (name, text) in COMMON.iter().chain(if ha { HA } else { BASE }) {
        let parsed: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| anyhow!("{name}: {e}"))?;
        docs.extend(parsed.into_iter().filter(|d| !d.is_null()));
    }
    set_images(&mut docs, image);
    if generate_ca {
        let td =
            palisade_certs::TrustDomain::new(trust_domain).map_err(|e| crate::usage(format!("--trust-domain: {e}")))?;
        let ca = palisade_certs::CertificateAuthority::generate(&td, std::time::Duration::from_secs(365 * 86400))?;
        let bundle = ca.trust_bundle_pem();
        for d in &mut docs {
            match (d["kind"].as_str(), d["metadata"]["name"].as_str()) {
                (Some("Secret"), Some("palisade-ca")) => {
                    d["stringData"]["tls.crt"] = Value::String(ca.cert_pem());
                    d["stringData"]["tls.key"] = Value::String(ca.key_pem().expose().to_string());
                }
                // The generated root only seeds the control plane's own CA,
                // which it keeps (data volume or etcd) and may rotate.
                (Some("Deployment"), Some(CP_NAME)) => {
                    for c in d["spec"]["template"]["spec"]["containers"].as_array_mut().into_iter().flatten() {
                        if let Some(args) = c["args"].as_array_mut()
                            && let Some(at) =
                                args.iter().position(|a| a.as_str() == Some("--ca-key=/etc/palisade/ca/tls.key"))
                        {
                            args.insert(at + 1, Value::String("--ca-seed".into()));
                        }
                    }
                }
                (Some("ConfigMap"), Some("palisade-trust-bundle")) => {
                    d["data"]["ca.pem"] = Value::String(bundle.clone())
                }
                (Some("Secret"), Some("palisade-store-key")) => {
                    let mut key = [0u8; 32];
                    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
                        .map_err(|_| anyhow!("no randomness for the store key"))?;
                    d["stringData"]["key"] = Value::String(base64::engine::general_purpose::STANDARD.encode(key));
                }
                (Some("MutatingWebhookConfiguration"), _) => {
                    let b64 = base64::engine::general_purpose::STANDARD.encode(bundle.as_bytes());
                    if let Some(hooks) = d["webhooks"].as_array_mut() {
                        for h in hooks {
                            h["clientConfig"]["caBundle"] = Value::String(b64.clone());
                        }
                    }
                }
                _ => {}
            }
        }
        eprintln!(
            "generated a root CA for {td}; its private key is in the palisade-ca Secret of this output: apply it, don't store it"
        );
        if ha {
            eprintln!(
                "generated the store key (palisade-store-key Secret): it seals the CA in etcd; apply it once, don't store it, and never apply another over it"
            );
        }
        if let Some(dir) = credentials_out {
            write_admin_credential(dir, &ca, &td)?;
            eprintln!(
                "wrote an admin credential for {} to {} (valid 1 year; the cluster never holds it)",
                td.admin(),
                dir.display()
            );
        }
    }
    print_docs(&docs, format)
}

/// Every container of the manifests runs `image`, and the control plane
/// injects it into pods (`--proxy-image`).
fn set_images(docs: &mut [Value], image: &str) {
    // Palisade's own workloads (not the etcd of deploy/ha).
    for d in docs.iter_mut().filter(|d| {
        d["metadata"]["labels"]["app.kubernetes.io/name"].as_str().is_none_or(|n| n.starts_with("palisade-control"))
    }) {
        let Some(containers) = d.pointer_mut("/spec/template/spec/containers").and_then(Value::as_array_mut) else {
            continue;
        };
        for c in containers {
            c["image"] = Value::String(image.to_string());
            if let Some(args) = c["args"].as_array_mut()
                && args.first().and_then(Value::as_str) == Some("control-plane")
            {
                args.retain(|a| !a.as_str().is_some_and(|a| a.starts_with("--proxy-image=")));
                args.push(Value::String(format!("--proxy-image={image}")));
            }
        }
    }
}

/// An admin client certificate signed by the new CA, for palisadectl
/// (`--credentials DIR`), written into a new directory with the key 0600.
fn write_admin_credential(
    dir: &Path,
    ca: &palisade_certs::CertificateAuthority,
    td: &palisade_certs::TrustDomain,
) -> Result<()> {
    let (issued, key) = ca.issue_with_key(&td.admin(), &[], &[], std::time::Duration::from_secs(365 * 86400))?;
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    palisade_certs::files::write_secret(&dir.join("key.pem"), key.expose())
        .with_context(|| format!("cannot write {}", dir.join("key.pem").display()))?;
    palisade_certs::files::write_public(&dir.join("cert.pem"), &issued.chain_pem())?;
    palisade_certs::files::write_public(&dir.join("ca.pem"), &ca.trust_bundle_pem())?;
    Ok(())
}

/// One finding: what was checked, whether it is fine, and what to do.
pub(crate) type Finding = (String, bool, String);

const SYSTEM_NS: &str = "palisade-system";
const CP_NAME: &str = "palisade-control-plane";

fn items<'a>(state: &'a Value, kind: &'a str) -> impl Iterator<Item = &'a Value> + 'a {
    state["items"].as_array().into_iter().flatten().filter(move |i| i["kind"] == kind)
}

fn name_of(obj: &Value) -> String {
    format!(
        "{}/{}",
        obj["metadata"]["namespace"].as_str().unwrap_or("-"),
        obj["metadata"]["name"].as_str().unwrap_or("?")
    )
}

/// Containers of a pod that are waiting to pull their image, with the reason.
fn pull_failures(pod: &Value) -> Vec<(String, String, String)> {
    let spec_images: Vec<(String, String)> = ["initContainers", "containers"]
        .iter()
        .flat_map(|k| pod["spec"][k].as_array().into_iter().flatten())
        .map(|c| (c["name"].as_str().unwrap_or("").to_string(), c["image"].as_str().unwrap_or("").to_string()))
        .collect();
    ["initContainerStatuses", "containerStatuses"]
        .iter()
        .flat_map(|k| pod["status"][k].as_array().into_iter().flatten())
        .filter_map(|s| {
            let reason = s["state"]["waiting"]["reason"].as_str()?;
            matches!(reason, "ErrImagePull" | "ImagePullBackOff" | "InvalidImageName" | "ErrImageNeverPull").then(
                || {
                    let name = s["name"].as_str().unwrap_or("").to_string();
                    let image =
                        spec_images.iter().find(|(n, _)| *n == name).map(|(_, i)| i.clone()).unwrap_or_default();
                    (name, image, reason.to_string())
                },
            )
        })
        .collect()
}

fn pull_fix(image: &str) -> String {
    format!(
        "the nodes cannot pull {image}: push it to a registry they reach and re-run `palisadectl install --image \
         REGISTRY/palisade:TAG` (or load it into the nodes, e.g. `kind load docker-image {image}`)"
    )
}

fn pem_certs(pem: &str) -> Vec<Vec<u8>> {
    palisade_certs::ca::parse_pem_certs(pem).map(|c| c.into_iter().map(|d| d.to_vec()).collect()).unwrap_or_default()
}

/// What is wrong with a Palisade install, in the terms of its fix. `bundle`:
/// the mesh's trust anchors as the operator knows them (the credential's
/// ca.pem); without it the `palisade-trust-bundle` ConfigMap stands in.
pub(crate) fn cluster_findings(state: &Value, bundle: Option<&str>) -> Vec<Finding> {
    let mut out: Vec<Finding> = Vec::new();
    let deployment = items(state, "Deployment")
        .find(|d| d["metadata"]["name"] == CP_NAME && d["metadata"]["namespace"] == SYSTEM_NS);
    let Some(deployment) = deployment else {
        out.push((
            "control plane installed".into(),
            false,
            format!("no Deployment {SYSTEM_NS}/{CP_NAME}: `palisadectl install --generate-ca --credentials-out DIR | kubectl apply -f -`"),
        ));
        return out;
    };
    let available = deployment["status"]["availableReplicas"].as_u64().unwrap_or(0);
    let cp_pods: Vec<&Value> = items(state, "Pod")
        .filter(|p| {
            p["metadata"]["namespace"] == SYSTEM_NS && p["metadata"]["labels"]["app.kubernetes.io/name"] == CP_NAME
        })
        .collect();
    let mut cp_detail = format!("{} available", palisade_cmd::plural(available, "replica", "replicas"));
    let mut cp_ok = available > 0;
    for pod in &cp_pods {
        for (_, image, reason) in pull_failures(pod) {
            cp_ok = false;
            cp_detail = format!("pod {} {reason}: {}", name_of(pod), pull_fix(&image));
        }
        for s in pod["status"]["containerStatuses"].as_array().into_iter().flatten() {
            if s["state"]["waiting"]["reason"] == "CrashLoopBackOff" {
                cp_ok = false;
                let last = s["lastState"]["terminated"]["message"].as_str().unwrap_or("").trim();
                cp_detail = format!(
                    "pod {} keeps exiting{}: `kubectl -n {SYSTEM_NS} logs deploy/{CP_NAME}` says why",
                    name_of(pod),
                    if last.is_empty() { String::new() } else { format!(" ({last})") }
                );
            }
        }
    }
    out.push(("control plane running".into(), cp_ok, cp_detail));

    // The trust anchors: the operator's, or the install's ConfigMap.
    let configmap = items(state, "ConfigMap")
        .find(|c| c["metadata"]["name"] == "palisade-trust-bundle" && c["metadata"]["namespace"] == SYSTEM_NS)
        .and_then(|c| c["data"]["ca.pem"].as_str())
        .unwrap_or("");
    let anchors = pem_certs(bundle.unwrap_or(configmap));
    if anchors.is_empty() {
        out.push((
            "trust bundle".into(),
            false,
            format!("no trust bundle to compare with: pass --credentials DIR, or fill the ConfigMap {SYSTEM_NS}/palisade-trust-bundle"),
        ));
        return out;
    }

    // The webhook: the API server calls it only if caBundle is the CA that
    // signed the control plane's webhook certificate.
    use base64::Engine;
    for hook in items(state, "MutatingWebhookConfiguration")
        .filter(|w| w["metadata"]["name"].as_str().is_some_and(|n| n.starts_with("palisade")))
    {
        for h in hook["webhooks"].as_array().into_iter().flatten() {
            let b64 = h["clientConfig"]["caBundle"].as_str().unwrap_or("");
            let decoded = base64::engine::general_purpose::STANDARD.decode(b64).unwrap_or_default();
            let certs = pem_certs(&String::from_utf8_lossy(&decoded));
            let ok = !certs.is_empty() && certs.iter().all(|c| anchors.contains(c));
            out.push((
                format!("webhook {}", h["name"].as_str().unwrap_or("?")),
                ok,
                if ok {
                    "caBundle is the mesh CA".into()
                } else {
                    "caBundle is not the mesh CA: the API server refuses to call the webhook and pods are not created \
                     (failurePolicy Fail); re-apply the manifests `palisadectl install` printed with this CA"
                        .into()
                },
            ));
        }
    }

    // Injected pods: the image pulls, and they carry the current anchors.
    let mut injected = 0;
    for pod in items(state, "Pod").filter(|p| p["metadata"]["annotations"]["palisade.dev/injected"] == "true") {
        injected += 1;
        let who = name_of(pod);
        for (container, image, reason) in pull_failures(pod) {
            if container.starts_with("palisade-") {
                out.push((format!("pod {who}"), false, format!("{container} {reason}: {}", pull_fix(&image))));
            }
        }
        let proxy = ["initContainers", "containers"]
            .iter()
            .flat_map(|k| pod["spec"][k].as_array().into_iter().flatten())
            .find(|c| c["name"] == "palisade-proxy");
        let env = proxy.and_then(|p| p["env"].as_array()).cloned().unwrap_or_default();
        let inline = env.iter().find(|e| e["name"] == "PALISADE_CA_BUNDLE_PEM").and_then(|e| e["value"].as_str());
        let ns = pod["metadata"]["namespace"].as_str().unwrap_or("default");
        match inline {
            Some(pem) if pem_certs(pem).iter().any(|c| anchors.contains(c)) => {}
            Some(_) => out.push((
                format!("pod {who}"),
                false,
                format!(
                    "carries another trust bundle (injected before the CA changed): after a root rotation its \
                     restarted sidecar still joins through the cross-signed root, after any other change it cannot \
                     verify the control plane; restart its workload (`kubectl -n {ns} rollout restart deployment/NAME`)"
                ),
            )),
            None => {
                let has_configmap = items(state, "ConfigMap")
                    .any(|c| c["metadata"]["name"] == "palisade-trust-bundle" && c["metadata"]["namespace"] == ns);
                out.push((
                    format!("pod {who}"),
                    false,
                    if has_configmap {
                        "injected by an older Palisade (trust bundle from a ConfigMap): restart its workload so the \
                         webhook injects the bundle into the pod spec"
                            .into()
                    } else {
                        format!(
                            "trust bundle missing in namespace {ns}: the pod waits for ConfigMap palisade-trust-bundle \
                             there; restart its workload so the webhook injects the bundle into the pod spec"
                        )
                    },
                ));
            }
        }
    }
    out.push(("injected pods".into(), true, format!("{injected} found")));
    out
}
