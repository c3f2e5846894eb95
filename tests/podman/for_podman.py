#!/usr/bin/env python3
"""Turns `palisadectl inject` output into what `podman kube play` runs, and
changes nothing else. Reads YAML on stdin; argv: POD_IP TOKEN_DIR.

What podman cannot express, and what stands in for it:
- native sidecars (an init container with restartPolicy: Always; podman runs
  init containers to completion): palisade-proxy moves to the pod's
  containers, first, as in the injector's classic mode;
- projected ServiceAccount tokens and TokenReview (no Kubernetes API server):
  the token volume becomes a host directory holding a join token, and the
  proxy reads it with PALISADE_JOIN_TOKEN_FILE at the same path;
- status.podIP in the downward API: the pod's IP is assigned up front
  (podman kube play --ip), so PALISADE_ADVERTISE names it directly;
- podman 4.3 applies the pod's restartPolicy (default Always) to init
  containers too: it restarts the init container once it has finished, and
  the pod never settles (in Kubernetes an init container runs once). The pod
  gets restartPolicy OnFailure, which is what init containers have there;
- podman 4.3 publishes every containerPort on the host (Kubernetes only
  documents them without hostPort), so two pods would collide on 4143: the
  `ports` lists are dropped.
"""
import sys

import yaml

pod_ip, token_dir = sys.argv[1], sys.argv[2]
docs = [d for d in yaml.safe_load_all(sys.stdin) if d]
for doc in docs:
    spec = doc["spec"]
    if spec.get("restartPolicy", "Always") == "Always":
        spec["restartPolicy"] = "OnFailure"
    for c in spec.get("initContainers", []) + spec["containers"]:
        c.pop("ports", None)
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
yaml.safe_dump_all(docs, sys.stdout, sort_keys=False)
