use super::*;

const BUNDLE: &str = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n";

fn cfg() -> Config {
    Config { trust_bundle_pem: BUNDLE.into(), ..Default::default() }
}

#[test]
fn the_trust_bundle_travels_in_the_pod_spec_not_a_configmap() {
    let mut d = deployment();
    inject_object(&mut d, &cfg()).unwrap();
    let spec = &d["spec"]["template"]["spec"];
    let env = spec["initContainers"][1]["env"].as_array().unwrap();
    assert!(env.iter().any(|e| e["name"] == "PALISADE_CA_BUNDLE_PEM" && e["value"] == BUNDLE));
    let volumes = serde_json::to_string(&spec["volumes"]).unwrap();
    assert!(!volumes.contains("configMap"), "no namespace-local ConfigMap is needed: {volumes}");
    assert_eq!(spec["initContainers"][1]["args"], json!(["sidecar"]));
    assert_eq!(spec["initContainers"][1]["image"], IMAGE);
    let mut d = deployment();
    assert_eq!(inject_object(&mut d, &Config::default()), Err(InjectError::NoTrustBundle));
}

fn deployment() -> Value {
    json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"selector": {"matchLabels": {"app": "web"}}, "template": {
            "metadata": {"labels": {"app": "web"}, "annotations": {"palisade.dev/skip-outbound-ports": "5432"}},
            "spec": {"containers": [{"name": "web", "image": "nginx"}]}
        }}
    })
}

#[test]
fn injects_a_native_sidecar_and_is_idempotent() {
    let mut d = deployment();
    assert_eq!(inject_object(&mut d, &cfg()).unwrap(), Outcome::Injected);
    let spec = &d["spec"]["template"]["spec"];
    let inits = spec["initContainers"].as_array().unwrap();
    assert_eq!((inits[0]["name"].as_str(), inits[1]["name"].as_str()), (Some("palisade-init"), Some("palisade-proxy")));
    assert_eq!(inits[1]["restartPolicy"], "Always");
    assert!(inits[0]["args"].as_array().unwrap().iter().any(|a| a == "5432"));
    assert_eq!(inits[0]["securityContext"]["capabilities"]["add"], json!(["NET_ADMIN", "NET_RAW"]));
    assert_eq!(spec["containers"].as_array().unwrap().len(), 1, "the app's containers are untouched");
    assert_eq!(d["spec"]["template"]["metadata"]["annotations"][keys::INJECTED], "true");
    let before = d.clone();
    assert_eq!(inject_object(&mut d, &cfg()).unwrap(), Outcome::Skipped("already injected"));
    assert_eq!(d, before);
}

#[test]
fn honours_opt_out_and_rejects_bad_annotations() {
    let mut d = deployment();
    d["spec"]["template"]["metadata"]["annotations"][keys::INJECT] = json!("disabled");
    assert!(matches!(inject_object(&mut d, &cfg()).unwrap(), Outcome::Skipped(_)));
    let mut d = deployment();
    d["spec"]["template"]["metadata"]["annotations"][keys::SKIP_OUTBOUND_PORTS] = json!("5432,http");
    assert!(matches!(inject_object(&mut d, &cfg()), Err(InjectError::Annotation { .. })));
}

#[test]
fn cronjobs_and_classic_sidecars() {
    let mut cj = json!({"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "c"}, "spec": {"schedule": "* * * * *",
        "jobTemplate": {"spec": {"template": {"spec": {"restartPolicy": "Never", "containers": [{"name": "job", "image": "busybox"}]}}}}}});
    assert_eq!(inject_object(&mut cj, &cfg()).unwrap(), Outcome::Injected);
    assert!(cj.pointer("/spec/jobTemplate/spec/template/spec/initContainers/1/restartPolicy").is_some());
    let mut d = deployment();
    inject_object(&mut d, &Config { native_sidecar: false, ..cfg() }).unwrap();
    assert_eq!(d["spec"]["template"]["spec"]["containers"][0]["name"], "palisade-proxy");
}

#[test]
fn admission_reviews_get_a_patch_that_applies() {
    let pod = json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": [{"name": "a", "image": "x"}]}});
    let review = json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {"uid": "u1", "object": pod}});
    let resp = admission_review(&review, &cfg()).unwrap();
    assert_eq!(resp["response"]["uid"], "u1");
    assert_eq!(resp["response"]["allowed"], true);
    use base64::Engine;
    let patch: json_patch::Patch = serde_json::from_slice(
        &base64::engine::general_purpose::STANDARD.decode(resp["response"]["patch"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    let mut patched = pod.clone();
    json_patch::patch(&mut patched, &patch).unwrap();
    assert_eq!(patched["spec"]["initContainers"][1]["name"], "palisade-proxy");
    assert!(admission_review(&json!({"garbage": true}), &cfg()).is_err());
    let no_object = admission_review(&json!({"request": {"uid": "u2"}}), &cfg()).unwrap();
    assert_eq!(no_object["response"]["allowed"], false);
}

#[test]
fn observability_annotations_configure_the_proxy() {
    let cfg = cfg();
    let mut pod = serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web", "annotations": {
            "palisade.dev/otlp-endpoint": "http://otel-collector.observability:4317",
            "palisade.dev/trace-sampling": "0.05",
            "palisade.dev/access-log": "true"}},
        "spec": {"serviceAccountName": "web", "containers": [{"name": "app", "image": "web:1"}]}
    });
    let meta = &mut pod["metadata"].clone();
    let mut spec = pod["spec"].take();
    crate::inject_pod(meta, &mut spec, &cfg).unwrap();
    let proxy = spec["initContainers"]
        .as_array()
        .into_iter()
        .chain(spec["containers"].as_array())
        .flatten()
        .find(|c| c["name"] == "palisade-proxy")
        .unwrap()
        .clone();
    let env: std::collections::HashMap<String, String> = proxy["env"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| Some((e["name"].as_str()?.to_string(), e["value"].as_str()?.to_string())))
        .collect();
    assert_eq!(env["PALISADE_OTLP_ENDPOINT"], "http://otel-collector.observability:4317");
    assert_eq!(env["PALISADE_TRACE_SERVICE_NAME"], "web");
    assert_eq!(env["PALISADE_TRACE_SAMPLING"], "0.05");
    assert_eq!(env["PALISADE_ACCESS_LOG"], "true");
    for (key, bad) in [
        ("palisade.dev/otlp-endpoint", "otel:4317"),
        ("palisade.dev/otlp-endpoint", "http://a b"),
        ("palisade.dev/otlp-endpoint", "http://user:secret@otel:4317"),
        ("palisade.dev/trace-sampling", "5%"),
        ("palisade.dev/trace-sampling", "2"),
        ("palisade.dev/access-log", "yes"),
    ] {
        let mut meta = serde_json::json!({"annotations": {key: bad}});
        let mut spec = serde_json::json!({"containers": [{"name": "app", "image": "web:1"}]});
        let e = crate::inject_pod(&mut meta, &mut spec, &cfg).unwrap_err().to_string();
        assert!(e.contains(key), "{key}={bad}: {e}");
    }
}
