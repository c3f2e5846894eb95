#!/usr/bin/env bash
# A mesh in podman pods on this machine, made from the YAML a cluster would
# get: the control plane from `palisadectl install`'s Deployment, and two
# sample services (web and orders, the demo's echo app) from `palisadectl
# inject` output, each run with `podman kube play` (init container and
# iptables interception in each pod, the proxy beside the app). Shows a
# request flowing and a policy taking effect, and says how to reach the mesh.
#
#   ./scripts/pods.sh up          build the release image (scripts/image.sh) and start the mesh
#   ./scripts/pods.sh up --debug  from the debug build instead (localhost/palisade:<version>-debug)
#   ./scripts/pods.sh up --prebuilt [--debug]   from binaries already built, not built again
#   ./scripts/pods.sh status      the pods, their IPs and the exports
#   ./scripts/pods.sh down        remove the pods, the network and the state dir (idempotent)
#
# Needs root, podman, runc, python3 with PyYAML and curl (and what
# scripts/image.sh needs). State (the admin credential, the CA, the control
# plane's data, the YAML played): $PALISADE_PODS_DIR, default ./pods-data.
# What podman 4.3 cannot run as Kubernetes would is converted, and only
# that, by tests/podman/for_podman.py (native sidecars, ServiceAccount
# tokens, Secret volumes, the pod IP); see docs/operations/container.md.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
# runc and cgroupfs (crun fails on this kernel's hybrid cgroups), and ulimits
# within the hard limits (podman's default nofile exceeds them: "error setting
# rlimit type 7: operation not permitted").
export CONTAINERS_CONF="$repo/deploy/podman/containers.conf"
export NO_COLOR=1

net=palisade-pods
subnet=10.89.78.0/24
cp_ip=10.89.78.2
declare -A ip=([web]=10.89.78.11 [orders]=10.89.78.12)
cp_pod=palisade-control-plane
pods=("$cp_pod" shop-web shop-orders)
state=${PALISADE_PODS_DIR:-$repo/pods-data}
td=cluster.local

usage() { sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 1; }
usage_error() { echo "error: $* (see ./scripts/pods.sh --help)" >&2; exit 64; }
say() { printf '\n== %s\n' "$*"; }

# up needs them all; status and down only root and podman.
check_prerequisites() {
  [ "$(id -u)" = 0 ] || die "run as root (rootful podman: pods with their own network namespaces and iptables)"
  for t in podman runc "$@"; do
    command -v "$t" >/dev/null || die "$t is not installed (apt-get install podman runc python3-yaml curl)"
  done
  [ $# = 0 ] || python3 -c 'import yaml' 2>/dev/null || die "python3 lacks PyYAML (apt-get install python3-yaml)"
}

# What exists of a mesh: its pods and network (a previous run, or one still up).
existing() {
  local p
  for p in "${pods[@]}"; do podman pod exists "$p" && echo "pod $p"; done
  podman network exists "$net" && echo "network $net"
  return 0
}

# The sample apps' image: the demo's echo app and a small client, on the
# Palisade base. ONE place, so that it can move to its own base.
build_app_image() {
  local out
  out=$(scripts/image.sh --apps) || die "building the sample app image failed (scripts/image.sh --apps)"
  echo "${out##*$'\n'}"
}

# palisadectl on the host, from the build the image came from ($CARGO_TARGET_DIR or target/, as scripts/image.sh).
find_ctl() {
  local c=${PALISADECTL:-${CARGO_TARGET_DIR:-$repo/target}/$profile/palisadectl}
  [ -x "$c" ] || die "$c is missing: cargo build --bins$([ "$profile" = release ] && echo " --release") (or set PALISADECTL)"
  echo "$c"
}

# Seconds since $1 (a `date +%s.%N`), to a tenth.
since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1fs", b - a }'; }

# The last lines a container logged, indented.
last_logs() { podman logs --tail "${2:-12}" "$1" 2>&1 | sed 's/^/    /'; }

# Waits up to $2 seconds for the command $3... to succeed; on timeout shows
# the logs of container $1 and fails.
wait_ready() {
  local container=$1 secs=$2 i
  shift 2
  for ((i = 0; i < secs * 5; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  echo "error: $container is not ready after ${secs}s; its last log lines:" >&2
  last_logs "$container" >&2
  echo "(./scripts/pods.sh down removes what was started)" >&2
  exit 1
}

# podman kube play at IP $1 of the mesh's network; its warnings (MAC
# addresses, syslog) only when it fails.
play() {
  local log
  log=$(podman kube play --network "$net" --ip "$1" "$2" 2>&1) || { echo "$log" >&2; die "podman kube play $2 failed"; }
}

exports() {
  cat <<EOF
export PATH="$(dirname "$ctl"):\$PATH" CONTAINERS_CONF="$CONTAINERS_CONF"
export PALISADE_CONTROL_PLANE=https://$cp_ip:7700 PALISADE_CREDENTIALS="$state/admin"
EOF
}

# web's app calls orders' pod IP: through both proxies, over mTLS.
call() { podman exec shop-web-app python3 /app/client.py "http://${ip[orders]}:8080$1" "${2:-1}"; }

up() {
  check_prerequisites python3 curl
  local found
  found=$(existing | paste -sd, | sed 's/,/, /g')
  [ -z "$found" ] || die "a mesh is already up ($found): ./scripts/pods.sh status shows it, ./scripts/pods.sh down removes it"
  [ ! -e "$state" ] || die "$state exists (a previous run's state): ./scripts/pods.sh down removes it"
  local taken
  taken=$(podman network ls --format '{{.Name}} {{range .Subnets}}{{.Subnet}} {{end}}' | awk -v s="$subnet" '$2 == s { print $1 }')
  [ -z "$taken" ] || die "podman network $taken already uses $subnet, which this mesh needs (podman network rm $taken, if nothing uses it)"

  say "image"
  local image app_image
  image=$(./scripts/image.sh "${image_args[@]}" | tail -1) || die "the image build failed (./scripts/image.sh ${image_args[*]}; its output is above)"
  app_image=$(build_app_image)
  ctl=$(find_ctl)
  echo "$image; sample apps: $app_image"

  say "control plane: palisadectl install, its Deployment as a pod"
  mkdir -p "$state" && chmod 0700 "$state"
  mkdir -m 0750 "$state/ca" "$state/cp-data"
  "$ctl" install --generate-ca --image "$image" --credentials-out "$state/admin" 2>/dev/null \
    | python3 tests/podman/for_podman.py control-plane "$state/ca" "$state/cp-data" >"$state/control-plane.yaml"
  # The CA Secret as the kubelet mounts it with the pod's fsGroup (root:65532,
  # 0440); the data volume owned by the image's user, 65532.
  chown -R 0:65532 "$state/ca" && chmod 0440 "$state/ca"/*
  chown 65532:65532 "$state/cp-data" && chmod 0700 "$state/cp-data"
  podman network create --subnet "$subnet" "$net" >/dev/null \
    || die "cannot create podman network $net on $subnet (another network or route uses it? podman network ls)"
  local started
  started=$(date +%s.%N)
  play "$cp_ip" "$state/control-plane.yaml"
  export PALISADE_CONTROL_PLANE=https://$cp_ip:7700 PALISADE_CREDENTIALS=$state/admin
  wait_ready "$cp_pod-control-plane" 60 "$ctl" check
  echo "$cp_pod at $cp_ip: answers palisadectl $(since "$started") after podman kube play (join tokens: TokenReview needs a Kubernetes API server)"

  say "web and orders: palisadectl inject, then podman kube play"
  local name
  for name in orders web; do
    mkdir -m 0700 "$state/$name-token"
    # Lasts like the projected ServiceAccount token it stands in for, which
    # the kubelet keeps fresh: every (re)start of the proxy spends a use
    # (renewals go over mTLS); see tests/podman/for_podman.py.
    "$ctl" token create --identity "spiffe://$td/ns/shop/sa/$name" --uses 100 --ttl 24h >"$state/$name-token/token" 2>/dev/null
    chown -R 1337:1337 "$state/$name-token" && chmod 0400 "$state/$name-token/token"
    cat >"$state/$name.yaml" <<EOF
apiVersion: v1
kind: Pod
metadata: {name: $name, namespace: shop, labels: {app: $name}}
spec:
  serviceAccountName: $name
  containers:
    - name: app
      image: $app_image
      args: [python3, /app/echo_app.py, "8080", $name, 0.0.0.0]
      ports: [{containerPort: 8080}]
      securityContext: {runAsUser: 1000, runAsGroup: 1000}
EOF
    "$ctl" inject -f "$state/$name.yaml" --image "$image" --mesh-control-plane "https://$cp_ip:7700" \
      >"$state/$name.injected.yaml" 2>/dev/null
    python3 tests/podman/for_podman.py app "${ip[$name]}" "$state/$name-token" \
      <"$state/$name.injected.yaml" >"$state/$name.podman.yaml"
    [ "$name" = web ] || echo "for podman 4.3 (tests/podman/for_podman.py): the proxy, a native sidecar, runs as the pod's first container (podman runs init containers to completion); a join token stands in for the ServiceAccount token"
    started=$(date +%s.%N)
    play "${ip[$name]}" "$state/$name.podman.yaml"
    # The proxy's readiness probe (/ready: certificate, policy, directory), from the host.
    wait_ready "shop-$name-palisade-proxy" 60 curl -sf -m 2 "http://${ip[$name]}:4191/ready"
    echo "shop-$name at ${ip[$name]}: proxy ready $(since "$started") after podman kube play"
  done
  exports >"$state/env"

  say "a request: web's app calls orders (http://${ip[orders]}:8080/api/orders)"
  echo "before any policy (the mesh denies by default): $(call /api/orders)"
  cat >"$state/policy.yaml" <<EOF
# web may GET /api/* on orders, 3 requests at once, then 1 a minute.
apiVersion: palisade.dev/v1
kind: AuthorizationPolicy
metadata: {name: web-reads-orders, namespace: shop}
spec:
  target: {identities: ["spiffe://$td/ns/shop/sa/orders"]}
  action: ALLOW
  rules:
    - from: [{identities: ["spiffe://$td/ns/shop/sa/web"]}]
      to: [{methods: [GET], paths: ["/api/*"]}]
---
apiVersion: palisade.dev/v1
kind: RateLimitPolicy
metadata: {name: orders-per-caller, namespace: shop}
spec:
  target: {identities: ["spiffe://$td/ns/shop/sa/orders"]}
  limits:
    - name: per-caller
      key: identity
      algorithm: token_bucket
      rate: 1
      period: 1m
      burst: 3
EOF
  echo "\$ palisadectl policy apply -f $state/policy.yaml"
  "$ctl" policy apply -f "$state/policy.yaml" | grep -Ev '^([-+@ ]|$)'  # the revisions, not the diffs
  local answer i
  for ((i = 0; i < 100; i++)); do
    answer=$(call /api/orders)
    [[ $answer == 200* ]] && break
    sleep 0.2
  done
  [[ $answer == 200* ]] || die "the policy did not take effect in 20s: $answer"
  echo "GET /api/orders: $answer"
  echo "GET /admin (no rule allows it): $(call /admin)"

  status
}

status() {
  check_prerequisites
  local found
  found=$(existing)
  [ -n "$found" ] || { echo "no mesh is up (./scripts/pods.sh up starts one)"; return 0; }
  say "pods"
  podman pod ps --filter "name=^($cp_pod|shop-web|shop-orders)\$" --format '{{.Name}}\t{{.Status}}\t{{.NumberOfContainers}} containers'
  echo "IPs: $cp_pod $cp_ip, shop-web ${ip[web]}, shop-orders ${ip[orders]} (network $net; reachable from this host)"
  # podman 4.3's `pod restart` reruns no init container: a pod it restarted
  # has no interception rules (tests/podman/for_podman.py).
  local name pid
  for name in web orders; do
    pid=$(podman inspect -f '{{.State.Pid}}' "shop-$name-app" 2>/dev/null) || continue
    [ "$pid" != 0 ] && command -v nsenter iptables >/dev/null || continue
    nsenter -t "$pid" -n iptables -t nat -S 2>/dev/null | grep -q PALISADE \
      || echo "warning: shop-$name has no interception rules (after podman pod restart?), its app takes plaintext: podman pod stop shop-$name && podman pod start shop-$name"
  done
  [ -f "$state/env" ] || return 0
  say "to use the mesh from this shell"
  cat "$state/env"
  cat <<EOF
palisadectl proxies                                  # both sidecars, their identities and policy sync
podman exec shop-web-app python3 /app/client.py http://${ip[orders]}:8080/api/orders   # web's app calls orders
curl -s http://${ip[orders]}:4191/metrics | grep palisade_   # a proxy's metrics
podman logs shop-orders-palisade-proxy               # a proxy's log
nsenter -n -t "\$(podman inspect -f '{{.State.Pid}}' shop-orders-app)" iptables -t nat -S   # the init container's interception rules
./scripts/pods.sh down                               # remove it all
EOF
}

down() {
  check_prerequisites
  if [ -z "$(existing)" ] && [ ! -e "$state" ]; then
    echo "no mesh is up; nothing to remove"
    return 0
  fi
  local p
  for p in "${pods[@]}"; do
    podman pod exists "$p" && podman pod rm -f -t 0 "$p" >/dev/null
  done
  if podman network exists "$net"; then podman network rm -f "$net" >/dev/null; fi
  rm -rf "$state"
  local left
  left=$(existing | paste -sd, | sed 's/,/, /g')
  [ -z "$left" ] || die "still there after down: $left"
  echo "removed the mesh's pods, network $net and $state (the images stay, for the next up)"
}

cmd=${1:-}
[ $# -gt 0 ] && shift
profile=release
image_args=()
for a in "$@"; do
  case "$cmd:$a" in
    up:--debug) profile=debug; image_args+=(--debug) ;;
    up:--prebuilt) image_args+=(--prebuilt) ;;
    *:-h|*:--help) usage; exit 0 ;;
    *) usage_error "unknown argument $a for '${cmd:-}'" ;;
  esac
done
case "$cmd" in
  up) up ;;
  status) status ;;
  down) down ;;
  -h|--help|help) usage ;;
  "") usage_error "say up, status or down" ;;
  *) usage_error "unknown command $cmd (up, status, down)" ;;
esac
