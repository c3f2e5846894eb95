#!/usr/bin/env bash
# The local demo: builds Palisade, starts a control plane, gives two services
# (web and orders) sidecars with join tokens, shows their identities, sends
# web's plaintext HTTP through both sidecars over mTLS to orders, and shows
# policy at work: default deny, an allowed call, a denied call with its
# explanation, and a rate-limited call.
# Everything runs on 127.0.0.1; state lives in ./demo-data (removed on start).
# Ctrl-C (or the end of the script with DEMO_KEEP unset) stops everything.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --workspace --bins
B=target/debug
DIR=${DEMO_DIR:-./demo-data}
rm -rf "$DIR" && mkdir -p "$DIR"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT INT TERM

wait_for() { # wait_for DESCRIPTION COMMAND...
  local what=$1; shift
  for _ in $(seq 1 100); do "$@" >/dev/null 2>&1 && return 0; sleep 0.1; done
  echo "timed out waiting for $what" >&2; exit 1
}

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; }

step "palisade-control-plane --data-dir $DIR/cp --listen 127.0.0.1:7700 --cert-ttl 1m &"
$B/palisade-control-plane --data-dir "$DIR/cp" --listen 127.0.0.1:7700 --cert-ttl 1m 2>"$DIR/control-plane.log" &
pids+=($!)
wait_for "control plane" test -f "$DIR/cp/admin/key.pem"
export PALISADE_CONTROL_PLANE=https://127.0.0.1:7700 PALISADE_CREDENTIALS=$DIR/cp/admin
wait_for "control plane" $B/palisadectl check

step "palisadectl check"
$B/palisadectl check

step "palisadectl token create --identity spiffe://cluster.local/ns/shop/sa/web --ttl 10m > $DIR/web.token"
$B/palisadectl token create --identity spiffe://cluster.local/ns/shop/sa/web --ttl 10m > "$DIR/web.token"

step "palisade-sidecar --ca-bundle $DIR/cp/admin/ca.pem --join-token-file $DIR/web.token --admin 127.0.0.1:4191 --upstream 127.0.0.1:9001=orders.shop &"
$B/palisade-sidecar --control-plane https://127.0.0.1:7700 --ca-bundle "$DIR/cp/admin/ca.pem" \
  --join-token-file "$DIR/web.token" --admin 127.0.0.1:4191 --inbound 127.0.0.1:4143 \
  --upstream 127.0.0.1:9001=orders.shop 2>"$DIR/sidecar-web.log" &
pids+=($!)
wait_for "sidecar ready" curl -sf http://127.0.0.1:4191/ready

step "curl -s http://127.0.0.1:4191/ready"
curl -s http://127.0.0.1:4191/ready

step "palisadectl proxies"
$B/palisadectl proxies

step "curl -s http://127.0.0.1:4191/config | jq -r .cert_chain_pem > $DIR/web.pem; palisadectl cert inspect $DIR/web.pem"
curl -s http://127.0.0.1:4191/config | python3 -c 'import json,sys; print(json.load(sys.stdin)["cert_chain_pem"], end="")' > "$DIR/web.pem"
$B/palisadectl cert inspect "$DIR/web.pem"

step "palisadectl token list"
$B/palisadectl token list

step "python3 scripts/demo/echo_app.py 8081 orders &    # the orders app, plain HTTP on 127.0.0.1:8081"
python3 scripts/demo/echo_app.py 8081 orders &
pids+=($!)
$B/palisadectl token create --identity spiffe://cluster.local/ns/shop/sa/orders --ttl 10m > "$DIR/orders.token" 2>/dev/null

step "palisade-sidecar ... --join-token-file orders.token --inbound 127.0.0.1:4144 --app 127.0.0.1:8081 --admin 127.0.0.1:4192 &"
$B/palisade-sidecar --control-plane https://127.0.0.1:7700 --ca-bundle "$DIR/cp/admin/ca.pem" \
  --join-token-file "$DIR/orders.token" --inbound 127.0.0.1:4144 --app 127.0.0.1:8081 --admin 127.0.0.1:4192 2>"$DIR/sidecar-orders.log" &
pids+=($!)
wait_for "orders sidecar ready" curl -sf http://127.0.0.1:4192/ready

wait_for "directory" sh -c 'curl -s http://127.0.0.1:4191/metrics | grep -q "^palisade_directory_endpoints [1-9]"'

step "palisadectl proxies"
$B/palisadectl proxies

step "curl -s -w ' -> %{http_code}\\n' http://127.0.0.1:9001/hello    # no policy allows web yet: the mesh default denies"
curl -s -w ' -> %{http_code}\n' http://127.0.0.1:9001/hello

step "palisadectl policy apply -f scripts/demo/policy.yaml"
$B/palisadectl policy apply -f scripts/demo/policy.yaml
wait_for "policy on orders' sidecar" sh -c 'curl -s http://127.0.0.1:4192/config | grep -q "\"policy_version\": \"r1\""'

step "curl -s http://127.0.0.1:9001/hello -H 'x-palisade-peer-identity: spoofed'    # allowed: web's app calls orders in plain HTTP"
curl -s http://127.0.0.1:9001/hello -H 'x-palisade-peer-identity: spoofed'

step "curl -s -X POST -w ' -> %{http_code}\\n' http://127.0.0.1:9001/hello    # denied: the policy allows GET only"
curl -s -X POST -w ' -> %{http_code}\n' http://127.0.0.1:9001/hello
step "palisadectl authz check --from spiffe://cluster.local/ns/shop/sa/web --to spiffe://cluster.local/ns/shop/sa/orders --method POST --path /hello"
$B/palisadectl authz check --from spiffe://cluster.local/ns/shop/sa/web --to spiffe://cluster.local/ns/shop/sa/orders --method POST --path /hello

step "for i in 1 2 3 4; do curl -s -o /dev/null -w '%{http_code} ' http://127.0.0.1:9001/hello; done; curl -si http://127.0.0.1:9001/hello    # 5 a minute per caller (one used above)"
for i in 1 2 3 4; do curl -s -o /dev/null -w '%{http_code} ' http://127.0.0.1:9001/hello; done; echo
curl -si http://127.0.0.1:9001/hello | tr -d '\r'

step "palisadectl proxies    # every proxy's policy version and sync state"
$B/palisadectl proxies

step "curl -s --max-time 2 http://127.0.0.1:4144/hello    # plaintext straight to orders' sidecar: refused (STRICT mTLS)"
curl -s --max-time 2 http://127.0.0.1:4144/hello || echo "(connection closed: exit $?)"

step "palisadectl cert inspect 127.0.0.1:4144    # the orders sidecar's live certificate"
$B/palisadectl cert inspect 127.0.0.1:4144

step "curl -s http://127.0.0.1:4191/metrics | grep -E '^palisade_(requests_total|identity_renewals_total|tls_handshake)'"
curl -s http://127.0.0.1:4191/metrics | grep -E '^palisade_(requests_total\{direction="outbound",status_class="2xx"|identity_renewals_total)'
curl -s http://127.0.0.1:4192/metrics | grep -E '^palisade_(requests_total\{direction="inbound",status_class="2xx"|tls_handshake_failures_total)'

if [ -n "${DEMO_KEEP:-}" ]; then
  echo; echo "Demo running (logs in $DIR/*.log). Ctrl-C to stop."
  wait
fi
