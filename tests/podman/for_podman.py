#!/usr/bin/env python3
"""Turns the YAML a cluster would get into what `podman kube play` (4.3)
runs, and changes nothing else (scripts/pods.sh uses it). Reads YAML on stdin,
writes a Pod on stdout.

  for_podman.py control-plane CA_DIR DATA_DIR < `palisadectl install` output
  for_podman.py app POD_IP TOKEN_DIR          < `palisadectl inject` output

The control plane (the install's Deployment):
- its pod template becomes a Pod named like the Deployment (podman has no
  Deployments); its other objects (RBAC, Service, webhook configuration,
  PodDisruptionBudget) have nothing to act on without a Kubernetes API server;
- `--k8s-attestation` is dropped: TokenReview needs an API server, so the
  pods join with join tokens instead;
- the CA Secret: podman 4.3 `kube play` takes `kind: Secret`, but a Secret
  volume crashes it unless `optional` is set, and then mounts the files
  root:root mode 0644 (no defaultMode, no fsGroup; `data` values not even
  base64-decoded), which the control plane rightly refuses for a key. The
  Secret's files are written to CA_DIR instead, a hostPath the caller makes
  root:65532 mode 0440, as the kubelet mounts a Secret with the pod's fsGroup;
- the PersistentVolumeClaim becomes the hostPath DATA_DIR (owned by 65532,
  the image's user).

An injected app pod:
- native sidecars (an init container with restartPolicy: Always; podman runs
  init containers to completion): palisade-proxy moves to the pod's
  containers, first, as in the injector's classic mode;
- projected ServiceAccount tokens and TokenReview (no Kubernetes API server):
  the token volume becomes a host directory holding a join token, and the
  proxy reads it with PALISADE_JOIN_TOKEN_FILE at the same path. The kubelet
  keeps a projected token fresh for the pod's life, so a restarted proxy can
  attest again; the join token (scripts/pods.sh makes it) lasts like one:
  24 hours and 100 uses, one per start of the proxy (renewals go over mTLS
  and spend none). A single-use token would leave a restarted proxy
  unready for good ("has been used up");
- init containers: podman 4.3 runs them once and removes them, unless the
  pod has the annotation io.podman.annotations.init.container.type: always;
  a pod's network namespace is new on every pod start, and Kubernetes reruns
  init containers when it re-creates the pod sandbox, so the pod gets that
  annotation and palisade-init writes its rules again on `podman pod start`.
  `podman pod restart` in 4.3 reruns no init container (libpod's
  Pod.Restart skips them, unlike Pod.Start): the pod comes back without
  interception, its app reachable in plaintext. Restart a pod with `podman
  pod stop NAME && podman pod start NAME`;
- status.podIP in the downward API: the pod's IP is assigned up front
  (podman kube play --ip), so PALISADE_ADVERTISE names it directly;
- podman 4.3 applies the pod's restartPolicy (default Always) to init
  containers too: it restarts the init container once it has finished, and
  the pod never settles (in Kubernetes an init container runs once). The pod
  gets restartPolicy OnFailure, which is what init containers have there;
- podman has no namespaces: the pod is named <namespace>-<name>.

Both:
- probes: podman 4.3 runs neither readiness nor startup probes, and turns a
  livenessProbe into a healthcheck run inside the container (`nc -z` for
  tcpSocket, which the image does not have) on a systemd timer (none runs
  here), so the control plane's would stay "starting" forever: it is
  dropped. scripts/pods.sh polls from the host what the probes poll (the
  control plane's port through `palisadectl check`, the proxies' /ready);
- podman 4.3 publishes every containerPort on the host (Kubernetes only
documents them without hostPort), so two pods would collide on 4143 and the
control plane on the host's 7700: the `ports` lists are dropped (the host
reaches the pods at their IPs on the podman network).
"""
import sys

import yaml


def drop_ports_and_liveness(spec):
    for c in spec.get("initContainers", []) + spec["containers"]:
        c.pop("ports", None)
        c.pop("livenessProbe", None)


def control_plane(docs, ca_dir, data_dir):
    secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "palisade-ca")
    for name in ("tls.crt", "tls.key"):
        with open(f"{ca_dir}/{name}", "w") as f:
            f.write(secret["stringData"][name])
    deploy = next(d for d in docs if d["kind"] == "Deployment")
    template = deploy["spec"]["template"]
    spec = template["spec"]
    drop_ports_and_liveness(spec)
    cp = spec["containers"][0]
    cp["args"] = [a for a in cp["args"] if a != "--k8s-attestation"]
    for v in spec["volumes"]:
        if v.get("persistentVolumeClaim"):
            v.pop("persistentVolumeClaim")
            v["hostPath"] = {"path": data_dir, "type": "Directory"}
        if v.get("secret", {}).get("secretName") == "palisade-ca":
            v.pop("secret")
            v["hostPath"] = {"path": ca_dir, "type": "Directory"}
    meta = dict(template["metadata"], name=deploy["metadata"]["name"], namespace=deploy["metadata"]["namespace"])
    return [{"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec}]


def app(docs, pod_ip, token_dir):
    for doc in docs:
        meta = doc["metadata"]
        meta["name"] = f"{meta.get('namespace', 'default')}-{meta['name']}"
        meta.setdefault("annotations", {})["io.podman.annotations.init.container.type"] = "always"
        spec = doc["spec"]
        if spec.get("restartPolicy", "Always") == "Always":
            spec["restartPolicy"] = "OnFailure"
        drop_ports_and_liveness(spec)
        inits = spec.get("initContainers", [])
        proxy = next(c for c in inits if c["name"] == "palisade-proxy")
        assert proxy.pop("restartPolicy") == "Always", "expected a native sidecar"
        spec["initContainers"] = [c for c in inits if c is not proxy]
        spec["containers"].insert(0, proxy)
        env = []
        for e in proxy["env"]:
            if e["name"] == "POD_IP":
                continue
            if e["name"] == "PALISADE_ADVERTISE":
                e = {"name": e["name"], "value": e["value"].replace("$(POD_IP)", pod_ip)}
            if e["name"] == "PALISADE_K8S_TOKEN_FILE":
                e = {"name": "PALISADE_JOIN_TOKEN_FILE", "value": e["value"]}
            env.append(e)
        proxy["env"] = env
        for v in spec["volumes"]:
            if v["name"] == "palisade-token":
                v.pop("projected")
                v["hostPath"] = {"path": token_dir, "type": "Directory"}
    return docs


if len(sys.argv) != 4 or sys.argv[1] not in ("control-plane", "app"):
    sys.exit(__doc__.split("\n\n")[1])
docs = [d for d in yaml.safe_load_all(sys.stdin) if d]
convert = control_plane if sys.argv[1] == "control-plane" else app
yaml.safe_dump_all(convert(docs, sys.argv[2], sys.argv[3]), sys.stdout, sort_keys=False)
