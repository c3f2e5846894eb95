#!/usr/bin/env bash
# (A copy of the project's shared side-by-side benchmark, kept here so the figures of docs/benchmarks.md can be
# reproduced from a clone: apt-get install nginx wrk; cargo install oha --locked;
# cargo build --release --workspace --bins.)
# side-by-side.sh — ONE invocation, three paths to the same upstream nginx (return 200 "ok"),
# same load generators and settings, runs interleaved, so the figures are comparable:
#
#   (a) direct:        loadgen --HTTP/1.1 keep-alive--> upstream nginx 127.0.0.1:$PORT_U
#   (b) nginx pair:    loadgen --> client-side nginx :$PORT_C (plain listener; proxy_pass https:// with a
#                      client cert; upstream keep-alive pool = one TLS connection per concurrent request)
#                      --TLS 1.3 mTLS (ECDSA P-256, ssl_verify_client on)--> server-side nginx :$PORT_S
#                      --HTTP/1.1 keep-alive--> upstream            
#   (c) Palisade pair: loadgen --> palisade-sidecar "web" (--upstream 127.0.0.1:$PORT_PC=orders.shop)
#                      --mTLS 1.3 SPIFFE, HTTP/2 streams on one pooled connection--> palisade-sidecar
#                      "orders" (--inbound :$PORT_PS, --app upstream; AuthorizationPolicy ALLOW
#                      web -> orders GET applied, i.e. every request is authorized as in production)
#                      --HTTP/1.1 keep-alive pool--> upstream
#
# Every nginx has worker_processes 1; every Palisade sidecar runs with its default --threads 1.
# Per run (RUNS, default 3), for each measurement kind the three paths are measured back to back, in
# an order rotated from run to run (run 1: a b c, run 2: b c a, run 3: c a b):
#   closed   closed loop max throughput   wrk -t1 -c$CONNS -d$DUR --latency
#   rtt      unloaded round trip          wrk -t1 -c1 -d$RTT_DUR --latency   (p50/p99, 1 request in flight)
#   open     open loop $RATE req/s        oha -q $RATE -c $OPEN_CONNS -z $OPEN_DUR --latency-correction
#                                         --worker-threads 1  (CO-corrected p50/p99/p99.9)
#   newconn  new connection per request   wrk -t1 -c$NEWCONN_CONNS -d$NEWCONN_DUR -H 'Connection: close'
#            (app -> client sidecar connection is new each time; the sidecar-to-sidecar mTLS
#             connections stay pooled in both pairs, so this is the cost of accepting a connection)
#   hs       (HS_DUR > 0) full TLS 1.3 mTLS handshake + 1 GET per connection straight to each
#            server-side sidecar: oha --disable-keepalive -c $HS_CONNS with a client cert from that
#            pair's CA (nginx: the throwaway openssl CA; Palisade: a cert for
#            spiffe://cluster.local/ns/shop/sa/web signed with openssl by the Palisade control plane's CA)
# For every measurement: utime/stime deltas (/proc/PID/stat) of every sidecar process, the upstream
# worker, the Palisade control plane and the load generator (/usr/bin/time); VmRSS sampled every second
# (max and mid-run) and VmHWM; TLS connections between the sidecars and the server sidecar's
# connections to the upstream, mid-run; the 1-min load average when it started; CPU used by everything
# else on the box. Idle snapshots (VmRSS, Pss, RssAnon, threads) right after start-up and at the end.
# Before EVERY measurement it waits until the 1-min load average < $LOAD_MAX (max $LOAD_WAIT s each,
# $LOAD_WAIT_TOTAL s in all; if it does not drop it measures anyway and flags it), then a 1 s warm-up.
# Optional: PROFILE=1 perf-records (cpu-clock, -g) each sidecar for $PROF_DUR s under the $RATE req/s
# open loop; PB=1 runs $BIN/palisade-bench --json in the same window at the end.
#
# Usage:  bash scripts/peer-compare.sh                   (root; nginx, wrk, oha, openssl, curl, python3 must exist)
#   env:  RUNS=3 DUR=10 RTT_DUR=5 OPEN_DUR=15 RATE=2000 CONNS=32 OPEN_CONNS=20 NEWCONN_DUR=10
#         NEWCONN_CONNS=4 HS_DUR=10 HS_CONNS=4 LOAD_MAX=0.5 LOAD_WAIT=600 LOAD_WAIT_TOTAL=7200
#         PROFILE=0 PROF_DUR=10 PB=0 PB_JSON=$OUT/palisade-bench.json BIN=target/release
#         OUT=/tmp/peer-compare-<ts>
# Output: $OUT/summary.md (also printed), $OUT/results.jsonl (one parsed line per measurement + one
#         line per aggregated figure), $OUT/measurements.jsonl (raw counters), raw tool output in $OUT/raw,
#         configs, logs. Only 127.0.0.1 is used. Every process it starts is tracked by PID and stopped on
#         exit (TERM, then KILL only if that PID is still one of ours by name); nothing else is touched.
set -euo pipefail

RUNS=${RUNS:-3}
DUR=${DUR:-10}
RTT_DUR=${RTT_DUR:-5}
OPEN_DUR=${OPEN_DUR:-15}
RATE=${RATE:-2000}
CONNS=${CONNS:-32}
OPEN_CONNS=${OPEN_CONNS:-20}
NEWCONN_DUR=${NEWCONN_DUR:-10}
NEWCONN_CONNS=${NEWCONN_CONNS:-4}
HS_DUR=${HS_DUR:-10}
HS_CONNS=${HS_CONNS:-4}
WARMUP=${WARMUP:-1}
LOAD_MAX=${LOAD_MAX:-0.5}
LOAD_WAIT=${LOAD_WAIT:-600}
LOAD_WAIT_TOTAL=${LOAD_WAIT_TOTAL:-7200}
PROFILE=${PROFILE:-0}
PROF_DUR=${PROF_DUR:-10}
PB=${PB:-0}
PB_JSON=${PB_JSON:-}        # where palisade-bench writes its JSON (default $OUT/palisade-bench.json; copied there too)
BIN=${BIN:-target/release}
OUT=${OUT:-/tmp/peer-compare-$(date -u +%Y%m%d-%H%M%S)}
BIN=$(realpath "$BIN")   # run from the project root: release binaries (cargo build --release --bins)
PORT_U=${PORT_U:-18180}     # upstream nginx
PORT_S=${PORT_S:-18443}     # nginx server-side sidecar (mTLS)
PORT_C=${PORT_C:-18181}     # nginx client-side sidecar (plain)
PORT_CP=${PORT_CP:-18700}   # Palisade control plane
PORT_PS=${PORT_PS:-18643}   # Palisade server sidecar inbound (mTLS)
PORT_PSA=${PORT_PSA:-18691} # Palisade server sidecar admin
PORT_PC=${PORT_PC:-18281}   # Palisade client sidecar --upstream listener (plain)
PORT_PCI=${PORT_PCI:-18644} # Palisade client sidecar inbound (registered, unused here)
PORT_PCA=${PORT_PCA:-18692} # Palisade client sidecar admin
export PATH="$PATH:$HOME/.cargo/bin"

mkdir -p "$OUT/raw" "$OUT/pki" "$OUT/palisade"
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" | tee -a "$OUT/run.log" >&2; }

# ------------------------------------------------------------------ process tracking / cleanup
PIDS=()    # every process we started directly (nginx masters, Palisade processes)
KIDS=()    # nginx workers (killed only if their master had to be SIGKILLed)
LGPID=""   # the /usr/bin/time wrapper of the load generator currently running
BGPIDS=()  # background load generators / perf started by the profile step
ours() {   # $1 = pid: still a process of a kind we start?
  local c; c=$(cat "/proc/$1/comm" 2>/dev/null) || return 1
  case "$c" in nginx|palisade-*|oha|wrk|time|perf) return 0 ;; *) return 1 ;; esac
}
cleanup() {
  local p i alive
  trap - INT TERM
  if [ -n "$LGPID" ] && kill -0 "$LGPID" 2>/dev/null; then
    for p in $(pgrep -P "$LGPID" || true); do kill -TERM "$p" 2>/dev/null || true; done
  fi
  for p in "${BGPIDS[@]:-}"; do [ -n "$p" ] && ours "$p" && kill -TERM "$p" 2>/dev/null || true; done
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill -TERM "$p" 2>/dev/null || true; done
  for i in $(seq 100); do
    alive=0
    for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill -0 "$p" 2>/dev/null && alive=1; done
    [ "$alive" = 0 ] && break; sleep 0.1
  done
  for p in "${PIDS[@]:-}" "${KIDS[@]:-}"; do   # survivors only, and only if still ours by name
    [ -n "$p" ] && ours "$p" && kill -9 "$p" 2>/dev/null || true
  done
  wait 2>/dev/null || true
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# ------------------------------------------------------------------ prerequisites (no installs here)
miss=()
for t in nginx wrk openssl curl ss python3 pgrep; do command -v "$t" >/dev/null || miss+=("$t"); done
if [ "$OPEN_DUR" -gt 0 ] || [ "$HS_DUR" -gt 0 ] || [ "$PROFILE" = 1 ]; then command -v oha >/dev/null || miss+=(oha); fi
[ -x /usr/bin/time ] || miss+=(/usr/bin/time)
for b in palisade-control-plane palisade-sidecar palisadectl; do [ -x "$BIN/$b" ] || miss+=("$BIN/$b"); done
[ "$PROFILE" = 1 ] && { command -v perf >/dev/null || miss+=(perf); }
[ "$PB" = 1 ] && { [ -x "$BIN/palisade-bench" ] || miss+=("$BIN/palisade-bench"); }
[ ${#miss[@]} -eq 0 ] || { echo "missing: ${miss[*]}" >&2; exit 1; }
for p in "$PORT_U" "$PORT_S" "$PORT_C" "$PORT_CP" "$PORT_PS" "$PORT_PSA" "$PORT_PC" "$PORT_PCI" "$PORT_PCA"; do
  if ss -Hltn "sport = :$p" | grep -q .; then echo "port $p busy; set the PORT_* variables" >&2; exit 1; fi
done

# ------------------------------------------------------------------ throwaway PKI for the nginx pair
PKI=$OUT/pki
(
  cd "$PKI"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out ca.key 2>/dev/null
  openssl req -x509 -new -key ca.key -sha256 -days 2 -subj "/CN=mesh-bench-ca" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" -out ca.crt
  for who in server client; do
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out $who.key 2>/dev/null
    openssl req -new -key $who.key -subj "/CN=$who.mesh.local" -out $who.csr
    cat > $who.ext <<EOF
basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=DNS:$who.mesh.local,IP:127.0.0.1,URI:spiffe://mesh.local/ns/default/sa/$who
EOF
    openssl x509 -req -in $who.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 2 -sha256 \
      -extfile $who.ext -out $who.crt 2>/dev/null
  done
)

# ------------------------------------------------------------------ nginx (same configs as baseline.sh)
common_main() {
  cat <<EOF
worker_processes 1;
user root;
pid $OUT/$1.pid;
error_log $OUT/$1.err warn;
events { worker_connections 4096; }
EOF
}
common_http() {
  mkdir -p "$OUT/tmp-$1"
  cat <<EOF
  access_log off;
  client_body_temp_path $OUT/tmp-$1/body;
  proxy_temp_path $OUT/tmp-$1/proxy;
  fastcgi_temp_path $OUT/tmp-$1/fcgi;
  uwsgi_temp_path $OUT/tmp-$1/uwsgi;
  scgi_temp_path $OUT/tmp-$1/scgi;
  keepalive_requests 100000000;
  keepalive_timeout 600s;
EOF
}
{ common_main upstream; cat <<EOF
http {
$(common_http upstream)
  server {
    listen 127.0.0.1:$PORT_U;
    location / { default_type text/plain; return 200 "ok"; }
  }
}
EOF
} > "$OUT/upstream.conf"
{ common_main server; cat <<EOF
http {
$(common_http server)
  upstream app { server 127.0.0.1:$PORT_U; keepalive 64; keepalive_requests 100000000; keepalive_timeout 600s; }
  server {
    listen 127.0.0.1:$PORT_S ssl;
    ssl_certificate        $PKI/server.crt;
    ssl_certificate_key    $PKI/server.key;
    ssl_protocols          TLSv1.3;
    ssl_client_certificate $PKI/ca.crt;
    ssl_verify_client      on;
    ssl_verify_depth       2;
    location / {
      proxy_pass http://app;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-Client-Cert "\$ssl_client_s_dn";
    }
  }
}
EOF
} > "$OUT/server.conf"
{ common_main client; cat <<EOF
http {
$(common_http client)
  upstream peer { server 127.0.0.1:$PORT_S; keepalive 64; keepalive_requests 100000000; keepalive_timeout 600s; }
  server {
    listen 127.0.0.1:$PORT_C;
    location / {
      proxy_pass https://peer;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_ssl_certificate         $PKI/client.crt;
      proxy_ssl_certificate_key     $PKI/client.key;
      proxy_ssl_trusted_certificate $PKI/ca.crt;
      proxy_ssl_verify              on;
      proxy_ssl_verify_depth        2;
      proxy_ssl_name                server.mesh.local;
      proxy_ssl_server_name         on;
      proxy_ssl_protocols           TLSv1.3;
      proxy_ssl_session_reuse       on;
    }
  }
}
EOF
} > "$OUT/client.conf"

declare -A MASTER WORKER PID_OF
for n in upstream server client; do
  nginx -t -q -p "$OUT" -e "$OUT/$n.err" -c "$OUT/$n.conf"
  nginx -p "$OUT" -e "$OUT/$n.err" -c "$OUT/$n.conf" -g 'daemon off;' &
  MASTER[$n]=$!; PIDS+=("${MASTER[$n]}")
done
for n in upstream server client; do
  w=""
  for _ in $(seq 50); do w=$(pgrep -P "${MASTER[$n]}" || true); [ -n "$w" ] && break; sleep 0.1; done
  [ -n "$w" ] || { log "nginx $n did not start"; cat "$OUT/$n.err" >&2; exit 1; }
  WORKER[$n]=$w; KIDS+=("$w")
done
PID_OF[upstream]=${WORKER[upstream]}
PID_OF[ngx_server]=${WORKER[server]}
PID_OF[ngx_client]=${WORKER[client]}
PID_OF[ngx_server_master]=${MASTER[server]}
PID_OF[ngx_client_master]=${MASTER[client]}
log "nginx: upstream master ${MASTER[upstream]} worker ${WORKER[upstream]}; server ${MASTER[server]}/${WORKER[server]}; client ${MASTER[client]}/${WORKER[client]}"

# ------------------------------------------------------------------ Palisade
PD=$OUT/palisade
CP_URL=https://127.0.0.1:$PORT_CP
WEB_ID=spiffe://cluster.local/ns/shop/sa/web
ORDERS_ID=spiffe://cluster.local/ns/shop/sa/orders
"$BIN/palisade-control-plane" --data-dir "$PD/cp" --listen "127.0.0.1:$PORT_CP" --cert-ttl 24h --log warn \
  > "$PD/cp.log" 2>&1 &
PID_OF[pal_cp]=$!; PIDS+=("$!")
for _ in $(seq 200); do
  [ -f "$PD/cp/admin/key.pem" ] && ss -Hltn "sport = :$PORT_CP" | grep -q . && break; sleep 0.1
done
ss -Hltn "sport = :$PORT_CP" | grep -q . || { log "control plane did not start"; cat "$PD/cp.log" >&2; exit 1; }
export PALISADE_CONTROL_PLANE=$CP_URL PALISADE_CREDENTIALS=$PD/cp/admin
ctl() { "$BIN/palisadectl" "$@"; }
ctl check > "$PD/check.out" 2>&1 || { log "palisadectl check failed"; cat "$PD/check.out" >&2; exit 1; }
cat > "$PD/allow.yaml" <<EOF
apiVersion: palisade.dev/v1
kind: AuthorizationPolicy
metadata: {name: web-to-orders, namespace: shop}
spec:
  target: {identities: ["$ORDERS_ID"]}
  action: ALLOW
  rules:
    - from: [{identities: ["$WEB_ID"]}]
      to: [{methods: ["GET"]}]
EOF
ctl policy apply -f "$PD/allow.yaml" > "$PD/policy-apply.out" 2>&1 || { log "policy apply failed"; cat "$PD/policy-apply.out" >&2; exit 1; }
(umask 077
 ctl token create --identity "$ORDERS_ID" --ttl 10m 2>"$PD/token-orders.err" > "$PD/orders.token"
 ctl token create --identity "$WEB_ID" --ttl 10m 2>"$PD/token-web.err" > "$PD/web.token")
SC_COMMON=(--control-plane "$CP_URL" --ca-bundle "$PD/cp/admin/ca.pem" --log warn --drain-timeout 5s)
"$BIN/palisade-sidecar" "${SC_COMMON[@]}" --join-token-file "$PD/orders.token" \
  --admin "127.0.0.1:$PORT_PSA" --inbound "127.0.0.1:$PORT_PS" --app "127.0.0.1:$PORT_U" > "$PD/server.log" 2>&1 &
PID_OF[pal_server]=$!; PIDS+=("$!")
"$BIN/palisade-sidecar" "${SC_COMMON[@]}" --join-token-file "$PD/web.token" \
  --admin "127.0.0.1:$PORT_PCA" --inbound "127.0.0.1:$PORT_PCI" --upstream "127.0.0.1:$PORT_PC=orders.shop" \
  > "$PD/client.log" 2>&1 &
PID_OF[pal_client]=$!; PIDS+=("$!")
for a in "$PORT_PSA" "$PORT_PCA"; do
  ok=0
  for _ in $(seq 200); do [ "$(curl -s --max-time 1 "http://127.0.0.1:$a/ready")" = ready ] && { ok=1; break; }; sleep 0.1; done
  [ "$ok" = 1 ] || { log "sidecar with admin :$a not ready"; cat "$PD"/*.log >&2; exit 1; }
done
metric() {  # $1 admin port, $2 metric line prefix (regex)
  curl -s --max-time 2 "http://127.0.0.1:$1/metrics" | awk -v m="$2" '$0 ~ "^"m {s += $NF} END {print s + 0}'
}
for _ in $(seq 100); do
  [ "$(metric "$PORT_PCA" 'palisade_directory_endpoints')" != 0 ] && break; sleep 0.1
done
log "Palisade: control plane ${PID_OF[pal_cp]}, server sidecar ${PID_OF[pal_server]} (orders, inbound :$PORT_PS), client sidecar ${PID_OF[pal_client]} (web, :$PORT_PC=orders.shop); threads: server $(awk '/^Threads/{print $2}' /proc/${PID_OF[pal_server]}/status), client $(awk '/^Threads/{print $2}' /proc/${PID_OF[pal_client]}/status)"

# ------------------------------------------------------------------ sanity checks
URL_a=http://127.0.0.1:$PORT_U/
URL_b=http://127.0.0.1:$PORT_C/
URL_c=http://127.0.0.1:$PORT_PC/
for s in a b c; do
  u=URL_$s; got=$(curl -s --max-time 5 "${!u}" || true)
  [ "$got" = ok ] || { log "path ($s) ${!u} check failed: '$got'"; cat "$OUT"/*.err "$PD"/*.log >&2; exit 1; }
done
nocert=$(curl -sk --max-time 5 -o /dev/null -w '%{http_code}' "https://127.0.0.1:$PORT_S/" || true)
withcert=$(curl -s --max-time 5 --cacert "$PKI/ca.crt" --cert "$PKI/client.crt" --key "$PKI/client.key" \
  --resolve server.mesh.local:$PORT_S:127.0.0.1 "https://server.mesh.local:$PORT_S/" || true)
[ "$nocert" = 400 ] && [ "$withcert" = ok ] || { log "nginx mTLS enforcement check failed (nocert=$nocert withcert=$withcert)"; exit 1; }
pal_plain=$(curl -s --max-time 3 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$PORT_PS/" || true)
pal_allow=$(metric "$PORT_PSA" 'palisade_policy_decisions_total\\{action="allow",policy="shop/web-to-orders"\\}')
[ "$pal_plain" = 000 ] && [ "$pal_allow" != 0 ] || { log "Palisade checks failed: plaintext to inbound -> '$pal_plain' (want no answer), allow decisions by shop/web-to-orders = $pal_allow"; curl -s "http://127.0.0.1:$PORT_PSA/metrics" | grep policy >&2; exit 1; }
TLSINFO=$(timeout 5 openssl s_client -connect 127.0.0.1:$PORT_S -servername server.mesh.local \
  -CAfile "$PKI/ca.crt" -cert "$PKI/client.crt" -key "$PKI/client.key" </dev/null 2>&1 \
  | grep -E '^New, |Peer signature type|Server Temp Key|^Verification' | sort -u | tr '\n' ';' || true)
# a client cert for the direct handshake test against Palisade's inbound: web's SPIFFE ID, signed by
# the control plane's CA (the same profile the control plane issues: one URI SAN, CA:FALSE). The test
# client must negotiate ALPN http/1.1: with ALPN h2 Palisade's inbound speaks h2c to the app, which the
# HTTP/1.1-only upstream nginx refuses (the client sidecar marks the app protocol; a raw client cannot).
(
  cd "$PKI"
  openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out pal-web.key 2>/dev/null
  openssl req -new -key pal-web.key -subj "/" -out pal-web.csr 2>/dev/null || openssl req -new -key pal-web.key -subj "/O=bench" -out pal-web.csr
  cat > pal-web.ext <<EOF
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=critical,URI:$WEB_ID
EOF
  openssl x509 -req -in pal-web.csr -CA "$PD/cp/ca/ca.pem" -CAkey "$PD/cp/ca/ca-key.pem" -CAcreateserial \
    -CAserial pal.srl -days 1 -sha256 -extfile pal-web.ext -out pal-web.crt 2>/dev/null
)
pal_direct=$(curl -sk --http1.1 --max-time 5 --cert "$PKI/pal-web.crt" --key "$PKI/pal-web.key" "https://127.0.0.1:$PORT_PS/" || true)
PAL_TLSINFO=$(timeout 5 openssl s_client -connect 127.0.0.1:$PORT_PS -alpn h2 -cert "$PKI/pal-web.crt" \
  -key "$PKI/pal-web.key" </dev/null 2>&1 | grep -E '^New, |Peer signature type|Server Temp Key|^ALPN' | sort -u | tr '\n' ';' || true)
log "sanity OK: (a) (b) (c) return ok; nginx server sidecar without client cert -> HTTP $nocert, with -> ok; Palisade inbound plaintext -> no answer (STRICT), ALLOW decisions by shop/web-to-orders: $pal_allow; direct mTLS GET to Palisade inbound with a web cert -> '$pal_direct'"
log "nginx TLS: $TLSINFO"
log "Palisade TLS: $PAL_TLSINFO"
HS_PAL=1; [ "$pal_direct" = ok ] || { HS_PAL=0; log "WARN direct mTLS to Palisade inbound did not return ok; Palisade handshake test skipped"; }

# ------------------------------------------------------------------ helpers
HZ=$(getconf CLK_TCK)
proc_ut()  { awk '{print $14, $15}' "/proc/$1/stat"; }                 # utime stime (ticks)
rss_kb()   { awk '/^VmRSS/{print $2}' "/proc/$1/status"; }
hwm_kb()   { awk '/^VmHWM/{print $2}' "/proc/$1/status"; }
sys_busy() { awk '/^cpu /{print $2+$3+$4+$7+$8+$9}' /proc/stat; }
alive()    { local s; s=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1; [ -n "$s" ] && [ "$s" != Z ]; }
procs_for() {  # processes whose CPU/RSS a measurement of scenario $1 records
  case $1 in
    a) echo upstream ;;
    b) echo upstream ngx_server ngx_client ;;
    c) echo upstream pal_server pal_client pal_cp ;;
    hs-b) echo ngx_server ;;
    hs-c) echo pal_server pal_cp ;;
  esac
}

WAITED=0
wait_load() {
  local t0=$SECONDS l
  while :; do
    l=$(cut -d' ' -f1 /proc/loadavg)
    if awk -v l="$l" -v m="$LOAD_MAX" 'BEGIN{exit !(l<m)}'; then LOADFLAG=ok; break; fi
    if (( SECONDS - t0 >= LOAD_WAIT || WAITED + SECONDS - t0 >= LOAD_WAIT_TOTAL )); then LOADFLAG=timeout; break; fi
    sleep 5 & wait $!
  done
  WAITED=$((WAITED + SECONDS - t0)); LOADNOW=$l; LOADALL=$(cut -d' ' -f1-3 /proc/loadavg)
}

snapshot() {  # idle snapshot of every process: $1 = label
  local n p js=""
  for n in upstream ngx_server ngx_client ngx_server_master ngx_client_master pal_server pal_client pal_cp; do
    p=${PID_OF[$n]}
    js+=$(awk -v n="$n" '
      FILENAME ~ /status$/ && /^VmRSS/ {rss=$2} FILENAME ~ /status$/ && /^RssAnon/ {anon=$2}
      FILENAME ~ /status$/ && /^VmHWM/ {hwm=$2} FILENAME ~ /status$/ && /^Threads/ {thr=$2}
      FILENAME ~ /smaps_rollup$/ && /^Pss:/ {pss=$2}
      END {printf "\"%s\":{\"rss_kb\":%d,\"pss_kb\":%d,\"rss_anon_kb\":%d,\"hwm_kb\":%d,\"threads\":%d},", n, rss, pss, anon, hwm, thr}' \
      "/proc/$p/status" "/proc/$p/smaps_rollup")
  done
  printf '{"name":"idle-%s","kind":"idle","load":"%s","procs":{%s}}\n' "$1" "$(cut -d' ' -f1-3 /proc/loadavg)" "${js%,}" \
    >> "$OUT/measurements.jsonl"
}

# measure NAME SCEN KIND SECS CMD...   (SCEN a|b|c|hs-b|hs-c)
measure() {
  local name=$1 scen=$2 kind=$3 secs=$4; shift 4
  local ps; ps=$(procs_for "$scen")
  printf '%q ' "$@" > "$OUT/raw/$name.cmd"
  wait_load; local load=$LOADNOW loadall=$LOADALL loadflag=$LOADFLAG
  [ "$loadflag" = timeout ] && log "WARN load $load still >= $LOAD_MAX (waited ${WAITED}s so far in total); measuring anyway"
  if [ "$WARMUP" -gt 0 ]; then
    case $scen in a|b|c) local u=URL_$scen; wrk -t1 -c"$CONNS" -d"${WARMUP}s" "${!u}" >/dev/null 2>&1 || true ;; esac
  fi
  declare -A u0 s0 u1 s1 rmax rmid
  local n
  for n in $ps; do read -r u0[$n] s0[$n] < <(proc_ut "${PID_OF[$n]}"); rmax[$n]=0; rmid[$n]=0; done
  local b0; b0=$(sys_busy); local t0; t0=$(date +%s.%N)
  /usr/bin/time -f '%U %S' -o "$OUT/raw/$name.time" "$@" > "$OUT/raw/$name.out" 2>&1 &
  local lp=$!; LGPID=$lp
  local half; half=$(awk -v d="$secs" 'BEGIN{print int(d/2)}')
  local i=0 tls=-1 appc=-1 v srv
  case $scen in b) srv=ngx_server; sp=$PORT_S ;; c) srv=pal_server; sp=$PORT_PS ;; *) srv=""; sp="" ;; esac
  while alive "$lp"; do
    sleep 1 & wait $!
    alive "$lp" || break
    i=$((i + 1))
    for n in $ps; do
      v=$(rss_kb "${PID_OF[$n]}"); (( v > rmax[$n] )) && rmax[$n]=$v
      (( i == half || (half == 0 && i == 1) )) && rmid[$n]=$v
    done
    if (( i == half || (half == 0 && i == 1) )) && [ -n "$srv" ]; then
      tls=$(ss -Htn state established "( sport = :$sp )" | wc -l)
      appc=$(ss -Htnp state established "( dport = :$PORT_U )" | grep -c "pid=${PID_OF[$srv]}," || true)
    fi
  done
  wait "$lp" || log "WARN $name: load generator exited non-zero (see $OUT/raw/$name.out)"
  LGPID=""
  local t1; t1=$(date +%s.%N); local b1; b1=$(sys_busy)
  local pj=""
  for n in $ps; do
    read -r u1[$n] s1[$n] < <(proc_ut "${PID_OF[$n]}")
    pj+="\"$n\":{\"user_s\":$(awk -v a="${u0[$n]}" -v b="${u1[$n]}" -v h="$HZ" 'BEGIN{print (b-a)/h}'),\"sys_s\":$(awk -v a="${s0[$n]}" -v b="${s1[$n]}" -v h="$HZ" 'BEGIN{print (b-a)/h}'),\"rss_max_kb\":${rmax[$n]},\"rss_mid_kb\":${rmid[$n]},\"hwm_kb\":$(hwm_kb "${PID_OF[$n]}")},"
  done
  local lg; lg=$(awk '{print $1+$2}' "$OUT/raw/$name.time" 2>/dev/null | tail -1)
  printf '{"name":"%s","scen":"%s","kind":"%s","load":%s,"loadavg":"%s","load_timeout":%s,"wall_s":%s,"sys_busy_s":%s,"loadgen_cpu_s":%s,"tls_conns_mid":%s,"app_conns_mid":%s,"procs":{%s}}\n' \
    "$name" "$scen" "$kind" "$load" "$loadall" "$([ "$loadflag" = timeout ] && echo true || echo false)" \
    "$(awk -v a="$t0" -v b="$t1" 'BEGIN{print b-a}')" "$(awk -v a="$b0" -v b="$b1" -v h="$HZ" 'BEGIN{print (b-a)/h}')" \
    "${lg:-0}" "$tls" "$appc" "${pj%,}" >> "$OUT/measurements.jsonl"
}

# ------------------------------------------------------------------ handshake client
# New TCP + full TLS 1.3 handshake (client cert, chain verified against the pair's CA, ALPN http/1.1)
# + one GET per connection, from P processes for D seconds; Python's ssl = OpenSSL 3.0 on the client
# side for both pairs. (oha cannot be used against Palisade: it offers no ALPN for HTTP/1.1 and
# Palisade's inbound closes TLS connections without a known ALPN.)
cat > "$OUT/hsclient.py" <<'PY'
import json, socket, ssl, sys, time, multiprocessing as mp
host, port, cert, key, ca, procs, secs = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]), float(sys.argv[7])
REQ = f"GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
def worker(q):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.check_hostname = False            # Palisade's certificate has only a SPIFFE URI SAN
    ctx.verify_mode = ssl.CERT_REQUIRED   # chain still verified against the pair's CA
    ctx.load_verify_locations(ca); ctx.load_cert_chain(cert, key)
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.options |= ssl.OP_NO_TICKET       # no session resumption: every connection is a full handshake
    lat, err, ok200 = [], 0, 0
    end = time.monotonic() + secs
    while True:
        t0 = time.monotonic()
        if t0 >= end: break
        try:
            with socket.create_connection((host, port), timeout=5) as raw:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                with ctx.wrap_socket(raw) as tls:
                    tls.sendall(REQ); buf = b""
                    while True:
                        d = tls.recv(4096)
                        if not d: break
                        buf += d
                        h, sep, body = buf.partition(b"\r\n\r\n")
                        if sep and b"content-length: 2" in h.lower() and len(body) >= 2: break
            if buf.startswith(b"HTTP/1.1 200"): ok200 += 1; lat.append(time.monotonic() - t0)
            else: err += 1
        except Exception:
            err += 1
    q.put((lat, err))
if __name__ == "__main__":
    q = mp.Queue(); t0 = time.monotonic()
    ps = [mp.Process(target=worker, args=(q,)) for _ in range(procs)]
    for p in ps: p.start()
    res = [q.get() for _ in ps]
    for p in ps: p.join()
    wall = time.monotonic() - t0
    lat = sorted(x for l, _ in res for x in l); err = sum(e for _, e in res)
    pc = lambda p: lat[min(len(lat) - 1, int(len(lat) * p))] * 1e6 if lat else None
    print(json.dumps(dict(n=len(lat), errors=err, wall_s=wall, rps=len(lat) / wall, p50_us=pc(0.5), p99_us=pc(0.99))))
PY

# ------------------------------------------------------------------ the runs
log "config: RUNS=$RUNS closed ${DUR}s c$CONNS; rtt ${RTT_DUR}s; open ${RATE}rps c$OPEN_CONNS ${OPEN_DUR}s; newconn ${NEWCONN_DUR}s c$NEWCONN_CONNS; hs ${HS_DUR}s c$HS_CONNS; LOAD_MAX=$LOAD_MAX LOAD_WAIT=${LOAD_WAIT}s; OUT=$OUT"
: > "$OUT/measurements.jsonl"
snapshot start
ORDERS=(abc bca cab)
for r in $(seq "$RUNS"); do
  order=${ORDERS[$(( (r - 1) % 3 ))]}
  for kind in closed rtt open newconn; do
    for scen in $(echo "$order" | grep -o .); do
      u=URL_$scen; url=${!u}; nm="r$r-$scen-$kind"
      case $kind in
        closed)
          log "run $r ($scen) closed loop wrk -t1 -c$CONNS -d${DUR}s"
          measure "$nm" "$scen" closed "$DUR" wrk -t1 -c"$CONNS" -d"${DUR}s" --latency "$url" ;;
        rtt)
          [ "$RTT_DUR" -gt 0 ] || continue
          log "run $r ($scen) unloaded round trip wrk -t1 -c1 -d${RTT_DUR}s"
          measure "$nm" "$scen" rtt "$RTT_DUR" wrk -t1 -c1 -d"${RTT_DUR}s" --latency "$url" ;;
        open)
          [ "$OPEN_DUR" -gt 0 ] || continue
          log "run $r ($scen) open loop oha -q $RATE -c $OPEN_CONNS -z ${OPEN_DUR}s --latency-correction"
          measure "$nm" "$scen" open "$OPEN_DUR" oha --no-tui --output-format json --worker-threads 1 \
            -z "${OPEN_DUR}s" -c "$OPEN_CONNS" -q "$RATE" --latency-correction "$url" ;;
        newconn)
          [ "$NEWCONN_DUR" -gt 0 ] || continue
          log "run $r ($scen) new connection per request: wrk -t1 -c$NEWCONN_CONNS -d${NEWCONN_DUR}s -H 'Connection: close'"
          measure "$nm" "$scen" newconn "$NEWCONN_DUR" wrk -t1 -c"$NEWCONN_CONNS" -d"${NEWCONN_DUR}s" --latency \
            -H "Connection: close" "$url" ;;
      esac
    done
  done
  if [ "$HS_DUR" -gt 0 ]; then
    for hs in b c; do
      [ "$hs" = c ] && [ "$HS_PAL" = 0 ] && continue
      if [ "$hs" = b ]; then hp=$PORT_S; hc=$PKI/client.crt; hk=$PKI/client.key; ha=$PKI/ca.crt
      else hp=$PORT_PS; hc=$PKI/pal-web.crt; hk=$PKI/pal-web.key; ha=$PD/cp/admin/ca.pem; fi
      log "run $r ($hs) full mTLS handshake + 1 GET per connection to the server sidecar: hsclient.py $HS_CONNS processes, ${HS_DUR}s"
      measure "r$r-$hs-hs" "hs-$hs" hs "$HS_DUR" python3 "$OUT/hsclient.py" 127.0.0.1 "$hp" "$hc" "$hk" "$ha" "$HS_CONNS" "$HS_DUR"
    done
  fi
done
snapshot end

# ------------------------------------------------------------------ optional: perf profiles under the open loop
if [ "$PROFILE" = 1 ]; then
  mkdir -p "$OUT/profile"
  for who in pal_client pal_server ngx_client ngx_server; do
    case $who in pal_*) url=$URL_c ;; *) url=$URL_b ;; esac
    wait_load
    log "profile $who (pid ${PID_OF[$who]}) under oha -q $RATE for ${PROF_DUR}s (load $LOADALL)"
    oha --no-tui --output-format json --worker-threads 1 -z "$((PROF_DUR + 4))s" -c "$OPEN_CONNS" -q "$RATE" \
      --latency-correction "$url" > "$OUT/profile/$who.oha.json" 2>&1 &
    op=$!; BGPIDS+=("$op")
    sleep 2
    read -r pu0 ps0 < <(proc_ut "${PID_OF[$who]}")
    perf record -e cpu-clock -g -p "${PID_OF[$who]}" -o "$OUT/profile/$who.perf.data" -- sleep "$PROF_DUR" \
      > "$OUT/profile/$who.record.log" 2>&1 || log "WARN perf record $who failed"
    read -r pu1 ps1 < <(proc_ut "${PID_OF[$who]}")
    wait "$op" || true
    echo "utime_s $(awk -v a="$pu0" -v b="$pu1" -v h="$HZ" 'BEGIN{print (b-a)/h}') stime_s $(awk -v a="$ps0" -v b="$ps1" -v h="$HZ" 'BEGIN{print (b-a)/h}') load_at_start $LOADALL" \
      > "$OUT/profile/$who.cpu"
    perf report -i "$OUT/profile/$who.perf.data" --no-children --sort symbol --stdio -g none --percent-limit 0 \
      > "$OUT/profile/$who.report.txt" 2>/dev/null || true
    perf report -i "$OUT/profile/$who.perf.data" --no-children --sort dso --stdio -g none \
      > "$OUT/profile/$who.dso.txt" 2>/dev/null || true
  done
fi

# ------------------------------------------------------------------ optional: palisade-bench in the same window
if [ "$PB" = 1 ]; then
  wait_load
  PB_JSON=${PB_JSON:-$OUT/palisade-bench.json}
  log "palisade-bench --json $PB_JSON (load $LOADALL)"
  echo "load at start: $LOADALL" > "$OUT/palisade-bench.out"
  PALISADE_BIN_DIR=$BIN "$BIN/palisade-bench" --json "$PB_JSON" >> "$OUT/palisade-bench.out" 2>&1 \
    || log "WARN palisade-bench failed"
  if [ -f "$PB_JSON" ] && [ "$PB_JSON" != "$OUT/palisade-bench.json" ]; then cp "$PB_JSON" "$OUT/palisade-bench.json"; fi
fi

# ------------------------------------------------------------------ summary
{
  echo "# side-by-side.sh results — $(date -u +%FT%TZ)"
  echo
  echo "host: $(uname -r), $(nproc) cores ($(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)), $(awk '/MemTotal/{printf "%.0f GiB", $2/1048576}' /proc/meminfo); $(nginx -v 2>&1); wrk $(wrk -v 2>&1 | head -1 | cut -d' ' -f2); $(oha --version 2>/dev/null | head -1 || true); $(openssl version); Palisade binaries: $BIN"
  echo
  echo "nginx pair TLS: $TLSINFO  "
  echo "Palisade inbound TLS (openssl s_client -alpn h2 with a web cert): $PAL_TLSINFO"
  echo
  echo "config: RUNS=$RUNS closed=${DUR}s/c$CONNS rtt=${RTT_DUR}s/c1 open=${RATE}rps/c$OPEN_CONNS/${OPEN_DUR}s newconn=${NEWCONN_DUR}s/c$NEWCONN_CONNS hs=${HS_DUR}s/c$HS_CONNS LOAD_MAX=$LOAD_MAX; path order rotated per run (abc, bca, cab)"
  echo
  python3 - "$OUT" "$HZ" <<'PY'
import json, sys, re, os, statistics as st
out, hz = sys.argv[1], int(sys.argv[2])
E = os.environ
RATE = E.get("RATE", "2000")
M = {}; IDLE = {}
for line in open(f"{out}/measurements.jsonl"):
    j = json.loads(line)
    (IDLE if j["kind"] == "idle" else M)[j["name"]] = j

def raw(name): return open(f"{out}/raw/{name}.out", errors="replace").read()
def rawjson(name):
    t = raw(name); return json.loads(t[t.index("{"):])
def wrk_parse(t):
    def lat(p):
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", t, re.M)
        return float(m.group(1)) * {"us": 1, "ms": 1e3, "s": 1e6}[m.group(2)] if m else float("nan")
    se = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", t)
    n2 = re.search(r"Non-2xx or 3xx responses: (\d+)", t)
    return dict(rps=float(re.search(r"Requests/sec:\s+([\d.]+)", t).group(1)),
                n=int(re.search(r"(\d+) requests in", t).group(1)), p50=lat(50), p99=lat(99),
                sock_errors=sum(map(int, se.groups())) if se else 0, non2xx=int(n2.group(1)) if n2 else 0)
def oha_parse(j):
    lp = j["latencyPercentiles"]; s = j["summary"]; sc = j.get("statusCodeDistribution", {})
    n = sc.get("200", 0); errs = dict(j.get("errorDistribution", {}))
    aborted = errs.pop("aborted due to deadline", 0)   # in flight when -z ended: not an error
    us = lambda x: x * 1e6 if x is not None else float("nan")
    return dict(n=n, rps=n / s["total"], p50=us(lp["p50"]), p99=us(lp["p99"]), p999=us(lp["p99.9"]),
                max=us(s["slowest"]), non200=sum(sc.values()) - n, errors=sum(errs.values()), error_kinds=errs,
                aborted_at_deadline=aborted)
def hs_parse(j):
    nan = float("nan")
    return dict(n=j["n"], rps=j["rps"], p50=j["p50_us"] or nan, p99=j["p99_us"] or nan, errors=j["errors"])
def other(j):  # cores used by processes outside the benchmark during one measurement
    ours = j["loadgen_cpu_s"] + sum(p["user_s"] + p["sys_s"] for p in j["procs"].values())
    # nginx masters / idle sidecars of the other paths are not sampled; they are idle
    return (j["sys_busy_s"] - ours) / j["wall_s"]

SIDE = {"b": ("ngx_client", "ngx_server"), "c": ("pal_client", "pal_server")}
rows = []   # results.jsonl lines
P = {}      # (run, scen, kind) -> parsed dict
for name, j in M.items():
    r = int(name.split("-")[0][1:]); scen = j["scen"]; kind = j["kind"]
    try:
        d = oha_parse(rawjson(name)) if kind == "open" else hs_parse(rawjson(name)) if kind == "hs" else wrk_parse(raw(name))
    except Exception as e:
        print(f"\nWARN could not parse {name}: {e}"); continue
    n = max(d["n"], 1)
    d["cpu_us_per_req"] = {k: (p["user_s"] + p["sys_s"]) * 1e6 / n for k, p in j["procs"].items()}
    d["sys_share"] = {k: p["sys_s"] / max(p["user_s"] + p["sys_s"], 1e-9) for k, p in j["procs"].items()}
    d["rss_max_kb"] = {k: p["rss_max_kb"] for k, p in j["procs"].items()}
    d["loadgen_cpu_us_per_req"] = j["loadgen_cpu_s"] * 1e6 / n
    d["other_cores"] = other(j); d["busy_cores"] = j["sys_busy_s"] / j["wall_s"]
    d["load"] = j["load"]; d["loadavg"] = j["loadavg"]; d["load_timeout"] = j["load_timeout"]
    d["tls_conns_mid"] = j["tls_conns_mid"]; d["app_conns_mid"] = j["app_conns_mid"]
    sc = scen[-1]
    if sc in SIDE and kind != "hs":
        d["pair_cpu_us_per_req"] = sum(d["cpu_us_per_req"][k] for k in SIDE[sc])
    P[(r, sc if kind != "hs" else "hs-" + sc, kind)] = d
    rows.append(dict(type="measurement", name=name, run=r, path=scen, kind=kind, cmd=open(f"{out}/raw/{name}.cmd").read().strip(), **d))
runs = sorted({k[0] for k in P})

def med(xs): return st.median(xs)
def fmt(x, f):
    if x != x: return "n/a"
    return f.format(x)
def cell(xs, f="{:,.0f}"):
    xs = [x for x in xs if x is not None and x == x]
    if not xs: return "—"
    if len(xs) == 1: return fmt(xs[0], f)
    return f"{fmt(med(xs), f)} [{fmt(min(xs), f)}–{fmt(max(xs), f)}]"
def col(scen, kind, fn):
    v = []
    for r in runs:
        d = P.get((r, scen, kind))
        v.append(fn(d) if d is not None else None)
    return v
def ratio(xs, ys):
    return [y / x if (x and y is not None and x is not None) else None for x, y in zip(xs, ys)]
def diff(xs, ys):
    return [y - x if (x is not None and y is not None) else None for x, y in zip(xs, ys)]
agg = []
def emit(label, kind_key, a, b, c, f="{:,.0f}", mode="ratio", unit=""):
    """one table row: values per path, then (b)/(a), (c)/(a), (c)/(b) per run (median [min–max])."""
    if mode == "ratio":
        ba, ca, cb = ratio(a, b), ratio(a, c), ratio(b, c)
    else:
        ba = ca = None; cb = ratio(b, c)
    print(f"| {label} | {cell(a, f)} | {cell(b, f)} | {cell(c, f)} | {cell(ba, '{:.3f}') if ba else '—'} | {cell(ca, '{:.3f}') if ca else '—'} | {cell(cb, '{:.2f}')} |")
    def m3(xs):
        xs = [x for x in xs if x is not None and x == x] if xs else []
        return dict(median=med(xs), min=min(xs), max=max(xs), runs=xs) if xs else None
    agg.append(dict(type="figure", figure=label, key=kind_key, unit=unit, direct=m3(a), nginx=m3(b), palisade=m3(c),
                    nginx_over_direct=m3(ba), palisade_over_direct=m3(ca), palisade_over_nginx=m3(cb)))

print(f"Median of {len(runs)} run(s), [min–max] over the runs; ratios are computed per run, then median [min–max]. Latencies in µs.\n")
print("| figure | (a) direct | (b) nginx pair | (c) Palisade pair | (b)/(a) | (c)/(a) | (c)/(b) Palisade vs nginx |")
print("|---|---|---|---|---|---|---|")
g = lambda k: (lambda d: d[k])
emit(f"closed-loop max req/s (wrk -t1 -c{E.get('CONNS','32')})", "closed.rps", col("a", "closed", g("rps")), col("b", "closed", g("rps")), col("c", "closed", g("rps")), unit="req/s")
emit("closed loop (saturated) wrk p50", "closed.p50", col("a", "closed", g("p50")), col("b", "closed", g("p50")), col("c", "closed", g("p50")), unit="us")
emit("closed loop (saturated) wrk p99", "closed.p99", col("a", "closed", g("p99")), col("b", "closed", g("p99")), col("c", "closed", g("p99")), unit="us")
if any(k[2] == "rtt" for k in P):
    emit("unloaded round trip p50 (wrk -c1)", "rtt.p50", col("a", "rtt", g("p50")), col("b", "rtt", g("p50")), col("c", "rtt", g("p50")), unit="us")
    emit("unloaded round trip p99 (wrk -c1)", "rtt.p99", col("a", "rtt", g("p99")), col("b", "rtt", g("p99")), col("c", "rtt", g("p99")), unit="us")
if any(k[2] == "open" for k in P):
    for p, lab in (("p50", "p50"), ("p99", "p99"), ("p999", "p99.9"), ("max", "max")):
        emit(f"open loop {RATE} rps (oha, CO-corrected) {lab}", f"open.{p}", col("a", "open", g(p)), col("b", "open", g(p)), col("c", "open", g(p)), unit="us")
    emit(f"open loop achieved req/s (200 only)", "open.rps", col("a", "open", g("rps")), col("b", "open", g("rps")), col("c", "open", g("rps")), unit="req/s")
if any(k[2] == "newconn" for k in P):
    emit(f"new connection per request: req/s (wrk -c{E.get('NEWCONN_CONNS','4')}, Connection: close)", "newconn.rps", col("a", "newconn", g("rps")), col("b", "newconn", g("rps")), col("c", "newconn", g("rps")), unit="req/s")
    emit("new connection per request: p50", "newconn.p50", col("a", "newconn", g("p50")), col("b", "newconn", g("p50")), col("c", "newconn", g("p50")), unit="us")
    emit("new connection per request: p99", "newconn.p99", col("a", "newconn", g("p99")), col("b", "newconn", g("p99")), col("c", "newconn", g("p99")), unit="us")
pc = lambda d: d.get("pair_cpu_us_per_req")
emit("both sidecars' CPU µs/req, closed loop", "closed.pair_cpu", [None] * len(runs), col("b", "closed", pc), col("c", "closed", pc), "{:,.1f}", mode="pair", unit="us/req")
if any(k[2] == "open" for k in P):
    emit(f"both sidecars' CPU µs/req, open loop {RATE} rps", "open.pair_cpu", [None] * len(runs), col("b", "open", pc), col("c", "open", pc), "{:,.1f}", mode="pair", unit="us/req")
if any(k[2] == "newconn" for k in P):
    emit("both sidecars' CPU µs/req, new connection per request", "newconn.pair_cpu", [None] * len(runs), col("b", "newconn", pc), col("c", "newconn", pc), "{:,.1f}", mode="pair", unit="us/req")
up = lambda d: d["cpu_us_per_req"]["upstream"]
emit("upstream nginx worker CPU µs/req, closed loop", "closed.upstream_cpu", col("a", "closed", up), col("b", "closed", up), col("c", "closed", up), "{:,.1f}", unit="us/req")
lg = lambda d: d["loadgen_cpu_us_per_req"]
emit("wrk CPU µs/req, closed loop", "closed.loadgen_cpu", col("a", "closed", lg), col("b", "closed", lg), col("c", "closed", lg), "{:,.1f}", unit="us/req")

print("\nAdded latency over direct (per run: path − direct), µs:\n")
print("| figure | (b) nginx − direct | (c) Palisade − direct | (c−a)/(b−a) |")
print("|---|---|---|---|")
for kind, p, lab in (("rtt", "p50", "unloaded RTT p50"), ("rtt", "p99", "unloaded RTT p99"),
                     ("open", "p50", f"open loop {RATE} rps p50"), ("open", "p99", f"open loop {RATE} rps p99"),
                     ("open", "p999", f"open loop {RATE} rps p99.9"), ("newconn", "p50", "new connection per request p50")):
    if not any(k[2] == kind for k in P): continue
    a, b, c = col("a", kind, g(p)), col("b", kind, g(p)), col("c", kind, g(p))
    db, dc = diff(a, b), diff(a, c)
    rr = [y / x if (x and y is not None) else None for x, y in zip(db, dc)]
    print(f"| {lab} | {cell(db)} | {cell(dc)} | {cell(rr, '{:.2f}')} |")
    agg.append(dict(type="figure", figure=f"added {lab}", key=f"{kind}.{p}.added", unit="us",
                    nginx_minus_direct=[x for x in db], palisade_minus_direct=[x for x in dc]))

print("\nPer sidecar process (CPU µs per request = (utime+stime) delta / requests completed; VmRSS max of 1 s samples):\n")
print("| process | CPU µs/req closed loop | kernel share | CPU µs/req open loop | CPU µs/req new conn | VmRSS idle at start (KiB) | VmRSS closed loop | VmRSS open loop | VmRSS idle at end | Pss idle at end |")
print("|---|---|---|---|---|---|---|---|---|---|")
labels = [("ngx_client", "b", "nginx client-side worker"), ("ngx_server", "b", "nginx server-side worker"),
          ("pal_client", "c", "Palisade client sidecar (web)"), ("pal_server", "c", "Palisade server sidecar (orders)"),
          ("pal_cp", "c", "Palisade control plane (idle, for reference)"),
          ("upstream", "a", "upstream nginx worker (in (a))"), ("upstream", "b", "upstream nginx worker (in (b))"), ("upstream", "c", "upstream nginx worker (in (c))")]
S, Eend = IDLE.get("idle-start", {}).get("procs", {}), IDLE.get("idle-end", {}).get("procs", {})
for n, s, lab in labels:
    cc = col(s, "closed", lambda d: d["cpu_us_per_req"].get(n))
    ks = col(s, "closed", lambda d: d["sys_share"].get(n))
    co = col(s, "open", lambda d: d["cpu_us_per_req"].get(n))
    cn = col(s, "newconn", lambda d: d["cpu_us_per_req"].get(n))
    rc = col(s, "closed", lambda d: d["rss_max_kb"].get(n))
    ro = col(s, "open", lambda d: d["rss_max_kb"].get(n))
    ist = S.get(n, {}).get("rss_kb"); ien = Eend.get(n, {}).get("rss_kb"); pen = Eend.get(n, {}).get("pss_kb")
    print(f"| {lab} | {cell(cc, '{:,.1f}')} | {cell([x * 100 if x is not None else None for x in ks], '{:.0f}%')} | {cell(co, '{:,.1f}')} | {cell(cn, '{:,.1f}')} | {ist if ist is not None else '—'} | {cell(rc)} | {cell(ro)} | {ien if ien is not None else '—'} | {pen if pen is not None else '—'} |")
    agg.append(dict(type="process", process=n, path=s, cpu_us_per_req_closed=cc, kernel_share_closed=ks, cpu_us_per_req_open=co,
                    cpu_us_per_req_newconn=cn, rss_idle_start_kb=ist, rss_closed_max_kb=rc, rss_open_max_kb=ro, rss_idle_end_kb=ien, pss_idle_end_kb=pen))
for n in ("ngx_client_master", "ngx_server_master"):
    if n in Eend:
        print(f"| ({n.replace('_', ' ')}: idle) | | | | | {S.get(n, {}).get('rss_kb', '—')} | | | {Eend[n]['rss_kb']} | {Eend[n]['pss_kb']} |")
pair_pss = {p: sum(Eend.get(n, {}).get("pss_kb", 0) for n in ns) for p, ns in
            (("nginx (2 masters + 2 workers)", ("ngx_client", "ngx_server", "ngx_client_master", "ngx_server_master")),
             ("Palisade (2 processes)", ("pal_client", "pal_server")))}
print("\nPair footprint at idle (end), Pss (shared pages divided among sharers): " + "; ".join(f"{k} {v:,} KiB" for k, v in pair_pss.items()))
thr = {n: S.get(n, {}).get("threads") for n in ("pal_client", "pal_server", "ngx_client", "ngx_server")}
print(f"Threads at start: {thr}")

tc = {s: col(s, "closed", lambda d: d["tls_conns_mid"]) for s in "bc"}
ac = {s: col(s, "closed", lambda d: d["app_conns_mid"]) for s in "bc"}
print(f"\nConnections mid closed loop: sidecar-to-sidecar TLS conns nginx {cell(tc['b'])}, Palisade {cell(tc['c'])}; "
      f"server sidecar -> upstream conns nginx {cell(ac['b'])}, Palisade {cell(ac['c'])}")
if any(k[2] == "open" for k in P):
    tco = {s: col(s, "open", lambda d: d["tls_conns_mid"]) for s in "bc"}
    print(f"Mid open loop: TLS conns nginx {cell(tco['b'])}, Palisade {cell(tco['c'])}")

errs = []
for (r, s, k), d in sorted(P.items()):
    e = d.get("sock_errors", 0) + d.get("non2xx", 0) + d.get("non200", 0) + d.get("errors", 0)
    if e: errs.append(f"r{r}-{s}-{k}: " + ", ".join(f"{x}={d[x]}" for x in ("sock_errors", "non2xx", "non200", "errors", "error_kinds") if d.get(x)))
print("\nErrors / non-200: " + ("; ".join(errs) if errs else "none"))

hs = [k for k in P if k[2] == "hs"]
if hs:
    print(f"\nFull TLS 1.3 mTLS handshake + 1 GET per connection, straight to each server-side sidecar (hsclient.py: {E.get('HS_CONNS', '4')} Python/OpenSSL client processes, client cert, ALPN http/1.1, no tickets):\n")
    print("| server sidecar | conn/s | p50 µs | p99 µs | server CPU µs/conn | kernel share | client CPU µs/conn |")
    print("|---|---|---|---|---|---|---|")
    for s, n, lab in (("hs-b", "ngx_server", "nginx (OpenSSL 3.0)"), ("hs-c", "pal_server", "Palisade (rustls)")):
        v = col(s, "hs", lambda d: d)
        if not any(v): continue
        print(f"| {lab} | {cell([d['rps'] if d else None for d in v])} | {cell([d['p50'] if d else None for d in v])} | {cell([d['p99'] if d else None for d in v])} | "
              f"{cell([d['cpu_us_per_req'][n] if d else None for d in v], '{:,.0f}')} | {cell([d['sys_share'][n] * 100 if d else None for d in v], '{:.0f}%')} | "
              f"{cell([d['loadgen_cpu_us_per_req'] if d else None for d in v], '{:,.0f}')} |")
        agg.append(dict(type="figure", figure=f"handshake {lab}", key=f"hs.{s}", conn_per_s=[d['rps'] if d else None for d in v],
                        server_cpu_us_per_conn=[d['cpu_us_per_req'][n] if d else None for d in v]))

print("\nLoad average (1/5/15 min) when each measurement started, and CPU used by everything else on the box:\n")
for name, j in M.items():
    d = next((x for x in rows if x["name"] == name), None)
    o = f", other CPU {d['other_cores']:.2f} cores, all CPUs busy {d['busy_cores']:.2f}" if d else ""
    print(f"- {name}: load {j['loadavg']}" + (" (did NOT drop below LOAD_MAX in time; measured anyway)" if j["load_timeout"] else "") + o)
with open(f"{out}/results.jsonl", "w") as f:
    for x in rows + agg:
        f.write(json.dumps(x) + "\n")
PY
  if [ "$PROFILE" = 1 ]; then
    echo
    echo "## perf profiles (cpu-clock, ${PROF_DUR}s, under the ${RATE} req/s open loop)"
    for who in pal_client pal_server ngx_client ngx_server; do
      f=$OUT/profile/$who.report.txt; [ -f "$f" ] || continue
      echo
      echo "### $who ($(cat "$OUT/profile/$who.cpu"))"
      awk '/^ +[0-9.]+%/ { p = $1; sub("%", "", p); if ($0 ~ /\[k\]/) k += p; else u += p }
           END { printf "samples: kernel %.1f%%, user %.1f%%\n", k, u }' "$f"
      echo '```'
      awk '/^ +[0-9.]+%/ && n++ < 20 { sub(/ +- +- *$/, ""); sub(/ +$/, ""); print }' "$f"
      echo '```'
      echo "by DSO: $(awk '/^ +[0-9.]+%/ && n++ < 6 { sub(/ +- +- *$/, ""); printf "%s %s; ", $2, $1 }' "$OUT/profile/$who.dso.txt")"
    done
  fi
  if [ "$PB" = 1 ] && [ -f "$OUT/palisade-bench.out" ]; then
    echo
    echo "## palisade-bench (same window)"
    echo '```'
    cat "$OUT/palisade-bench.out"
    echo '```'
  fi
} > "$OUT/summary.md"
cat "$OUT/summary.md"
log "done; results in $OUT"
