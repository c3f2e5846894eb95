//! Sidecar injection: adds Palisade to a Kubernetes pod spec — an init
//! container that writes the iptables rules, and the proxy as a native
//! sidecar (an init container with `restartPolicy: Always`, so the app starts
//! after the proxy is ready and Jobs complete) — plus the projected
//! ServiceAccount token it attests with and the trust bundle (inline, so an
//! injected pod needs nothing in its namespace but itself).
//!
//! One code path for the mutating admission webhook (AdmissionReview v1 in,
//! JSONPatch out) and for `palisadectl inject` (YAML in, YAML out). It works
//! on `serde_json::Value`, so it needs no Kubernetes client library.

#![warn(missing_docs)]

use serde_json::{Map, Value, json};

/// The container image of this version: what `scripts/image.sh` builds and
/// what the install manifests, `palisadectl install`/`inject` and the
/// control plane's injection webhook use unless told otherwise. Push it to
/// your registry under another name and pass `--image` (or kustomize's `images:`).
pub const IMAGE: &str = concat!("localhost/palisade:", env!("CARGO_PKG_VERSION"));

/// Annotation and label keys.
pub mod keys {
    /// `disabled`/`false` on a pod (template) or workload: never inject.
    pub const INJECT: &str = "palisade.dev/inject";
    /// Set on injected pods, so injection is idempotent.
    pub const INJECTED: &str = "palisade.dev/injected";
    /// Comma-separated inbound ports not intercepted.
    pub const SKIP_INBOUND_PORTS: &str = "palisade.dev/skip-inbound-ports";
    /// Comma-separated outbound destination ports not intercepted.
    pub const SKIP_OUTBOUND_PORTS: &str = "palisade.dev/skip-outbound-ports";
    /// Comma-separated ports carried as opaque TCP.
    pub const OPAQUE_PORTS: &str = "palisade.dev/opaque-ports";
    /// The proxy's log filter.
    pub const LOG_LEVEL: &str = "palisade.dev/log-level";
    /// Override of the inbound port.
    pub const INBOUND_PORT: &str = "palisade.dev/inbound-port";
    /// OTLP/gRPC collector the proxy exports spans to (`http://HOST:PORT`).
    pub const OTLP_ENDPOINT: &str = "palisade.dev/otlp-endpoint";
    /// Share of new traces recorded, 0 to 1.
    pub const TRACE_SAMPLING: &str = "palisade.dev/trace-sampling";
    /// `"true"`: one JSON access-log line per request.
    pub const ACCESS_LOG: &str = "palisade.dev/access-log";
}

/// How to inject.
#[derive(Debug, Clone)]
pub struct Config {
    /// The Palisade image (holds `palisade-sidecar`).
    pub image: String,
    /// Control-plane address as seen from pods.
    pub control_plane: String,
    /// The mesh's trust anchors (PEM), written into each injected pod's spec
    /// (`PALISADE_CA_BUNDLE_PEM`): a pod in any namespace has them without a
    /// ConfigMap there. Required. A root rotation reaches pods created after it.
    pub trust_bundle_pem: String,
    /// UID of the proxy (excluded from interception).
    pub proxy_uid: u32,
    /// Native sidecar (Kubernetes >= 1.29) or a classic container held until ready.
    pub native_sidecar: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            image: IMAGE.into(),
            control_plane: "https://palisade-control-plane.palisade-system.svc:7700".into(),
            trust_bundle_pem: String::new(),
            proxy_uid: 1337,
            native_sidecar: true,
        }
    }
}

/// What happened to one object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Palisade was added.
    Injected,
    /// Left alone, and why.
    Skipped(&'static str),
}

/// Why an object cannot be injected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[non_exhaustive]
pub enum InjectError {
    /// The object is not a JSON object with `kind`.
    #[error("not a Kubernetes object: {0}")]
    NotAnObject(String),
    /// The pod spec is missing or malformed at this path.
    #[error("{kind}: {path} is missing or not an object")]
    NoPodSpec {
        /// Object kind.
        kind: String,
        /// JSON path expected.
        path: &'static str,
    },
    /// No trust bundle was given to inject.
    #[error("no trust bundle to inject (the mesh's CA certificates, PEM)")]
    NoTrustBundle,
    /// An annotation holds an unusable value.
    #[error("annotation {key}={value:?}: {why}")]
    Annotation {
        /// The key.
        key: &'static str,
        /// The value.
        value: String,
        /// What is expected.
        why: &'static str,
    },
}

const ADMIN_PORT: u16 = 4191;
const OUTBOUND_PORT: u16 = 4140;
const DEFAULT_INBOUND_PORT: u16 = 4143;

fn ports_annotation(ann: &Map<String, Value>, key: &'static str) -> Result<Option<String>, InjectError> {
    let Some(v) = ann.get(key).and_then(Value::as_str) else { return Ok(None) };
    let ok = v.split(',').map(str::trim).all(|p| p.parse::<u16>().is_ok_and(|p| p > 0));
    if !ok {
        return Err(InjectError::Annotation { key, value: v.into(), why: "expected comma-separated ports 1-65535" });
    }
    Ok(Some(v.split(',').map(str::trim).collect::<Vec<_>>().join(",")))
}

/// The proxy's tracing and access-log settings from the pod's annotations.
/// Spans are named after the pod's ServiceAccount (`service.name`).
fn observability_env(ann: &Map<String, Value>, spec: &Value) -> Result<Vec<Value>, InjectError> {
    let mut env = Vec::new();
    if let Some(v) = ann.get(keys::OTLP_ENDPOINT).and_then(Value::as_str) {
        let ok = (v.starts_with("http://") || v.starts_with("https://"))
            && v.len() <= 256
            && v.bytes().all(|b| b.is_ascii_graphic() && b != b'@');
        if !ok {
            return Err(InjectError::Annotation {
                key: keys::OTLP_ENDPOINT,
                value: v.into(),
                why: "expected http://HOST:PORT of an OTLP/gRPC collector (no credentials in it)",
            });
        }
        env.push(json!({"name": "PALISADE_OTLP_ENDPOINT", "value": v}));
        let sa = spec.get("serviceAccountName").and_then(Value::as_str).unwrap_or("default");
        env.push(json!({"name": "PALISADE_TRACE_SERVICE_NAME", "value": sa}));
    }
    if let Some(v) = ann.get(keys::TRACE_SAMPLING).and_then(Value::as_str) {
        if !v.parse::<f64>().is_ok_and(|r| (0.0..=1.0).contains(&r)) {
            return Err(InjectError::Annotation {
                key: keys::TRACE_SAMPLING,
                value: v.into(),
                why: "expected a ratio between 0 and 1",
            });
        }
        env.push(json!({"name": "PALISADE_TRACE_SAMPLING", "value": v}));
    }
    match ann.get(keys::ACCESS_LOG).and_then(Value::as_str) {
        None | Some("false") => {}
        Some("true") => env.push(json!({"name": "PALISADE_ACCESS_LOG", "value": "true"})),
        Some(v) => {
            return Err(InjectError::Annotation {
                key: keys::ACCESS_LOG,
                value: v.into(),
                why: "expected true or false",
            });
        }
    }
    Ok(env)
}

/// Injects into one pod spec, given the pod's metadata (for annotations and the marker).
pub fn inject_pod(metadata: &mut Value, spec: &mut Value, cfg: &Config) -> Result<Outcome, InjectError> {
    if !metadata.is_object() {
        *metadata = json!({});
    }
    let ann = metadata.get("annotations").and_then(Value::as_object).cloned().unwrap_or_default();
    if ann.get(keys::INJECT).and_then(Value::as_str).is_some_and(|v| matches!(v, "disabled" | "false")) {
        return Ok(Outcome::Skipped("opted out with palisade.dev/inject"));
    }
    let already = ann.get(keys::INJECTED).is_some()
        || ["initContainers", "containers"].iter().any(|k| {
            spec.get(k).and_then(Value::as_array).is_some_and(|cs| cs.iter().any(|c| c["name"] == "palisade-proxy"))
        });
    if already {
        return Ok(Outcome::Skipped("already injected"));
    }
    if !cfg.trust_bundle_pem.contains("-----BEGIN CERTIFICATE-----") {
        return Err(InjectError::NoTrustBundle);
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        return Ok(Outcome::Skipped("hostNetwork pods share the node's network namespace"));
    }
    let inbound_port = match ann.get(keys::INBOUND_PORT).and_then(Value::as_str) {
        None => DEFAULT_INBOUND_PORT,
        Some(v) => v.parse().map_err(|_| InjectError::Annotation {
            key: keys::INBOUND_PORT,
            value: v.into(),
            why: "expected a port",
        })?,
    };
    let skip_in = ports_annotation(&ann, keys::SKIP_INBOUND_PORTS)?;
    let skip_out = ports_annotation(&ann, keys::SKIP_OUTBOUND_PORTS)?;
    let opaque = ports_annotation(&ann, keys::OPAQUE_PORTS)?;
    let log = ann.get(keys::LOG_LEVEL).and_then(Value::as_str).unwrap_or("info").to_string();

    let mut init_args = vec![
        "init".to_string(),
        "--inbound-port".into(),
        inbound_port.to_string(),
        "--outbound-port".into(),
        OUTBOUND_PORT.to_string(),
        "--admin-port".into(),
        ADMIN_PORT.to_string(),
        "--proxy-uid".into(),
        cfg.proxy_uid.to_string(),
    ];
    if let Some(p) = &skip_in {
        init_args.extend(["--skip-inbound-ports".into(), p.clone()]);
    }
    if let Some(p) = &skip_out {
        init_args.extend(["--skip-outbound-ports".into(), p.clone()]);
    }
    let init = json!({
        "name": "palisade-init",
        "image": cfg.image,
        "args": init_args,
        "resources": {"requests": {"cpu": "10m", "memory": "10Mi"}, "limits": {"memory": "32Mi"}},
        "securityContext": {
            "runAsUser": 0, "runAsNonRoot": false, "readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]}
        }
    });
    let mut env = vec![
        json!({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}),
        json!({"name": "PALISADE_ADVERTISE", "value": format!("$(POD_IP):{inbound_port}")}),
        json!({"name": "PALISADE_CONTROL_PLANE", "value": cfg.control_plane}),
        json!({"name": "PALISADE_CA_BUNDLE_PEM", "value": cfg.trust_bundle_pem}),
        json!({"name": "PALISADE_K8S_TOKEN_FILE", "value": "/var/run/palisade/token/token"}),
        json!({"name": "PALISADE_TRANSPARENT", "value": "true"}),
        json!({"name": "PALISADE_INBOUND", "value": format!("0.0.0.0:{inbound_port}")}),
        json!({"name": "PALISADE_OUTBOUND", "value": format!("127.0.0.1:{OUTBOUND_PORT}")}),
        json!({"name": "PALISADE_ADMIN", "value": format!("0.0.0.0:{ADMIN_PORT}")}),
        json!({"name": "PALISADE_LOG", "value": log}),
    ];
    if let Some(p) = &opaque {
        env.push(json!({"name": "PALISADE_OPAQUE_PORTS", "value": p}));
    }
    env.extend(observability_env(&ann, spec)?);
    let probe = |failure: u32, period: u32| json!({"httpGet": {"path": "/ready", "port": ADMIN_PORT}, "periodSeconds": period, "failureThreshold": failure});
    let mut proxy = json!({
        "name": "palisade-proxy",
        "image": cfg.image,
        "args": ["sidecar"],
        "env": env,
        "ports": [{"name": "palisade-in", "containerPort": inbound_port}, {"name": "palisade-admin", "containerPort": ADMIN_PORT}],
        "readinessProbe": probe(3, 5),
        "startupProbe": probe(120, 1),
        "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "64Mi"}},
        "securityContext": {
            "runAsUser": cfg.proxy_uid, "runAsGroup": cfg.proxy_uid, "runAsNonRoot": true, "readOnlyRootFilesystem": true,
            "allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}
        },
        "volumeMounts": [
            {"name": "palisade-token", "mountPath": "/var/run/palisade/token", "readOnly": true}
        ]
    });
    let spec_obj = spec.as_object_mut().ok_or(InjectError::NoPodSpec { kind: "Pod".into(), path: "spec" })?;
    let mut inits: Vec<Value> = spec_obj.get("initContainers").and_then(Value::as_array).cloned().unwrap_or_default();
    if cfg.native_sidecar {
        proxy["restartPolicy"] = json!("Always");
        inits.splice(0..0, [init, proxy]);
    } else {
        // Classic sidecar (Kubernetes < 1.29): first container, and the app's
        // containers start only after its postStart hook saw /ready.
        proxy["lifecycle"] = json!({"postStart": {"exec": {"command": ["palisade-sidecar", "wait-ready", "--admin", format!("127.0.0.1:{ADMIN_PORT}")]}}});
        inits.insert(0, init);
        let mut containers: Vec<Value> =
            spec_obj.get("containers").and_then(Value::as_array).cloned().unwrap_or_default();
        containers.insert(0, proxy);
        spec_obj.insert("containers".into(), Value::Array(containers));
    }
    spec_obj.insert("initContainers".into(), Value::Array(inits));
    let mut volumes: Vec<Value> = spec_obj.get("volumes").and_then(Value::as_array).cloned().unwrap_or_default();
    volumes.push(json!({"name": "palisade-token", "projected": {"sources": [{"serviceAccountToken": {"audience": "palisade", "expirationSeconds": 3600, "path": "token"}}]}}));
    spec_obj.insert("volumes".into(), Value::Array(volumes));
    let meta = metadata.as_object_mut().expect("invariant: made an object above");
    let annotations = meta.entry("annotations").or_insert_with(|| json!({}));
    if !annotations.is_object() {
        *annotations = json!({});
    }
    annotations[keys::INJECTED] = json!("true");
    Ok(Outcome::Injected)
}

/// Injects into any workload kind: Pod, Deployment, StatefulSet, DaemonSet,
/// ReplicaSet, Job, CronJob. Other kinds are returned untouched.
pub fn inject_object(obj: &mut Value, cfg: &Config) -> Result<Outcome, InjectError> {
    let kind =
        obj.get("kind").and_then(Value::as_str).ok_or_else(|| InjectError::NotAnObject("no kind".into()))?.to_string();
    // Opt-out on the workload itself counts too.
    let opted_out =
        obj["metadata"]["annotations"][keys::INJECT].as_str().is_some_and(|v| matches!(v, "disabled" | "false"));
    let template = match kind.as_str() {
        "Pod" => None,
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => Some("/spec/template"),
        "CronJob" => Some("/spec/jobTemplate/spec/template"),
        _ => return Ok(Outcome::Skipped("not a workload kind")),
    };
    if opted_out {
        return Ok(Outcome::Skipped("opted out with palisade.dev/inject"));
    }
    let pod = match template {
        None => obj,
        Some(path) => {
            obj.pointer_mut(path).ok_or(InjectError::NoPodSpec { kind: kind.clone(), path: "spec.template" })?
        }
    };
    let pod = pod.as_object_mut().ok_or(InjectError::NoPodSpec { kind: kind.clone(), path: "spec.template" })?;
    let mut metadata = pod.remove("metadata").unwrap_or_else(|| json!({}));
    let mut spec = pod.remove("spec").ok_or(InjectError::NoPodSpec { kind: kind.clone(), path: "spec" })?;
    let result = inject_pod(&mut metadata, &mut spec, cfg);
    pod.insert("metadata".into(), metadata);
    pod.insert("spec".into(), spec);
    result
}

/// Answers an AdmissionReview v1 request for a Pod: the JSONPatch that
/// injects it, or no patch. Never panics on bad input: it answers with
/// `allowed: false` and a message, or `Err` when there is no request uid to answer.
pub fn admission_review(review: &Value, cfg: &Config) -> Result<Value, String> {
    let req = review.get("request").ok_or("AdmissionReview has no request")?;
    let uid = req.get("uid").and_then(Value::as_str).ok_or("AdmissionReview request has no uid")?;
    let respond = |response: Value| {
        let mut r = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "response": response});
        r["response"]["uid"] = json!(uid);
        r
    };
    let Some(object) = req.get("object").filter(|o| o.is_object()) else {
        return Ok(respond(
            json!({"allowed": false, "status": {"code": 400, "message": "palisade: the request carries no object"}}),
        ));
    };
    if object.get("kind").and_then(Value::as_str) != Some("Pod") {
        return Ok(respond(json!({"allowed": true})));
    }
    let mut pod = object.clone();
    match inject_object(&mut pod, cfg) {
        Ok(Outcome::Skipped(_)) => Ok(respond(json!({"allowed": true}))),
        Ok(Outcome::Injected) => {
            let patch = json_patch::diff(object, &pod);
            let bytes = serde_json::to_vec(&patch).map_err(|e| e.to_string())?;
            use base64::Engine;
            Ok(respond(json!({
                "allowed": true,
                "patchType": "JSONPatch",
                "patch": base64::engine::general_purpose::STANDARD.encode(bytes),
            })))
        }
        Err(e) => Ok(respond(
            json!({"allowed": false, "status": {"code": 400, "message": format!("palisade: cannot inject: {e}")}}),
        )),
    }
}

#[cfg(test)]
mod tests;
