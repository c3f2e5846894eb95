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
pub(crate) fn inject(
    file: &Path,
    image: &str,
    bundle: Option<&Path>,
    control_plane: &str,
    classic: bool,
) -> Result<()> {
    let bundle = bundle.ok_or_else(|| {
        anyhow!(
            "inject needs the mesh's trust bundle: --ca-bundle FILE or --credentials DIR (its ca.pem; \
             `palisadectl install --credentials-out DIR` writes one)"
        )
    })?;
    let trust_bundle_pem =
        std::fs::read_to_string(bundle).with_context(|| format!("--ca-bundle: cannot read {}", bundle.display()))?;
    let roots = palisade_certs::ca::parse_pem_certs(&trust_bundle_pem)
        .map_err(|e| anyhow!("--ca-bundle {}: {e}", bundle.display()))?;
    if roots.is_empty() {
        return Err(anyhow!("--ca-bundle {}: no certificate in it", bundle.display()));
    }
    let text = read_input(file)?;
    let mut docs: Vec<Value> = serde_saphyr::from_multiple(&text).map_err(|e| anyhow!("{}: {e}", file.display()))?;
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
            Err(e) => return Err(anyhow!("{what}: {e}")),
        }
    }
    print_docs(&docs)
}

/// Prints the install manifests, optionally with a freshly generated CA
/// (and then, if asked, an admin credential kept on this machine).
pub(crate) fn install(
    generate_ca: bool,
    trust_domain: &str,
    image: &str,
    credentials_out: Option<&Path>,
) -> Result<()> {
    if let Some(dir) = credentials_out
        && dir.exists()
    {
        return Err(anyhow!("--credentials-out {}: already exists; choose a new directory", dir.display()));
    }
    let mut docs = Vec::new();
    for (name, text) in BASE {
        let parsed: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| anyhow!("{name}: {e}"))?;
        docs.extend(parsed.into_iter().filter(|d| !d.is_null()));
    }
    set_images(&mut docs, image);
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
        if let Some(dir) = credentials_out {
            write_admin_credential(dir, &ca, &td)?;
            eprintln!(
                "wrote an admin credential for {} to {} (valid 1 year; the cluster never holds it)",
                td.admin(),
                dir.display()
            );
        }
    }
    print_docs(&docs)
}

/// Every container of the manifests runs `image`, and the control plane
/// injects it into pods (`--proxy-image`).
fn set_images(docs: &mut [Value], image: &str) {
    for d in docs {
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
