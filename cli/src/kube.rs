//! `palisadectl inject` and `palisadectl install`: Kubernetes YAML offline.

use palisade_cmd::{out, outln};
use std::path::Path;

use anyhow::{Context, Result, anyhow};
use base64::Engine;
use serde_json::Value;

/// The kustomize base in deploy/base, in the order of its kustomization.
const BASE: &[(&str, &str)] = &[
    ("namespace.yaml", include_str!("../../deploy/base/namespace.yaml")),
    ("rbac.yaml", include_str!("../../deploy/base/rbac.yaml")),
    ("ca.yaml", include_str!("../../deploy/base/ca.yaml")),
    ("control-plane.yaml", include_str!("../../deploy/base/control-plane.yaml")),
    ("webhook.yaml", include_str!("../../deploy/base/webhook.yaml")),
];

fn read_input(file: &Path) -> Result<String> {
    if file == Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        Ok(s)
    } else {
        std::fs::read_to_string(file).with_context(|| format!("cannot read {}", file.display()))
    }
}

fn print_docs(docs: &[Value]) -> Result<()> {
    for (i, d) in docs.iter().enumerate() {
        if i > 0 {
            outln!("---");
        }
        out!("{}", serde_saphyr::to_string(d)?);
    }
    Ok(())
}

/// Injects every workload of a multi-document YAML file and prints the result.
pub(crate) fn inject(file: &Path, image: &str, control_plane: &str, classic: bool) -> Result<()> {
    let text = read_input(file)?;
    let mut docs: Vec<Value> = serde_saphyr::from_multiple(&text).map_err(|e| anyhow!("{}: {e}", file.display()))?;
    docs.retain(|d| !d.is_null());
    let cfg = palisade_inject::Config {
        image: image.to_string(),
        control_plane: control_plane.to_string(),
        native_sidecar: !classic,
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
            Err(e) => return Err(anyhow!("{what}: {e}")),
        }
    }
    print_docs(&docs)
}

/// Prints the install manifests, optionally with a freshly generated CA.
pub(crate) fn install(generate_ca: bool, trust_domain: &str) -> Result<()> {
    let mut docs = Vec::new();
    for (name, text) in BASE {
        let parsed: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| anyhow!("{name}: {e}"))?;
        docs.extend(parsed.into_iter().filter(|d| !d.is_null()));
    }
    if generate_ca {
        let td = palisade_certs::TrustDomain::new(trust_domain).map_err(|e| anyhow!("--trust-domain: {e}"))?;
        let ca = palisade_certs::CertificateAuthority::generate(&td, std::time::Duration::from_secs(365 * 86400))?;
        let bundle = ca.trust_bundle_pem();
        for d in &mut docs {
            match (d["kind"].as_str(), d["metadata"]["name"].as_str()) {
                (Some("Secret"), Some("palisade-ca")) => {
                    d["stringData"]["tls.crt"] = Value::String(ca.cert_pem());
                    d["stringData"]["tls.key"] = Value::String(ca.key_pem().expose().to_string());
                }
                (Some("ConfigMap"), Some("palisade-trust-bundle")) => {
                    d["data"]["ca.pem"] = Value::String(bundle.clone())
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
    }
    print_docs(&docs)
}
