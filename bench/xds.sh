#!/usr/bin/env bash
# The xDS figures (issue 11): a throwaway `trustmesh serve` on loopback with a
# generated mesh of S services (default 1,000) and N client pods (default
# 20,000), driven by bench/cmd/xds-load, a process of its own, as N
# simulated Envoy sidecars over state of the world, then over delta:
#   - the cold connect of all N (each its own mTLS connection, as each
#     real Envoy has its own, unless XDS_PER_CONN says how many share one,
#     which spares the load tool and serve alike: serve holds grpc-go's
#     reader, writer and keepalive goroutines and the TLS and transport
#     state per connection, about 40 kB of RSS each as measured at 4,000
#     clients, so with XDS_PER_CONN above 1 serve's RSS per proxy is
#     understated: quote it as "N proxies on N/XDS_PER_CONN connections");
#   - the time from a mesh change (one more endpoint on svc-0, the
#     endpoints of every sidecar change) until every client holds exactly
#     the new endpoints, 3 rounds, the mesh feed's 250 ms settle and
#     serve's 10 ms xDS debounce included: when the last did, and the p50
#     and p99 over clients;
#   - serve's RSS with every client connected, and per client;
#   - a sample of XDS_GRPC_CLIENTS (default 8) real grpc-go proxyless xDS
#     clients, which must see svc-0's endpoints as the simulated ones do
#     (the run fails if not), and how long they take.
# The cold connect is reported in two phases: the mTLS handshakes of every
# connection (XDS_DIAL_CONCURRENCY in flight, default 256), with serve's CPU
# per handshake, then every client's first configuration.
# Beside serve, in the same run, each mode first drives the no-op floor
# (xds-load -serve-noop, bench/cmd/xds-load/noop.go): grpc-go with serve's
# transport options and TLS, the client chain verified per stream, one
# goroutine per stream, a minimal cluster, assignment and virtual host per
# service encoded once per version, serve's 260 ms wait after a change. Its
# RSS, push times and CPU are what holding and updating the same fleet costs
# before any configuration is built; a line per mode gives serve's ratios
# to it (XDS_FLOOR=0 leaves it out). The proxyless sample is serve's alone:
# its check needs serve's real resources. RSS is read after each round,
# while the heap is as full as the pushes left it; XDS_HOLD (a Go duration,
# default 0) keeps each fleet connected and idle that long after the
# rounds, reading RSS every 10 s, so that RSS is also read after Go's
# forced collection (every 2 minutes, when nothing else collects).
# GOMEMLIMIT, GOGC and GODEBUG are unset for serve, so that no memory
# limit or GC tuning comes in from the caller's environment; serve's
# --max-connections (default 1,024 per listener) is raised to N+1,024, or
# the clients past it would wait. If serve cannot bind its random ports,
# the mode is retried once on fresh ones. Each client's certificate is the
# one the load tool enrols with a join token: the pods of a service
# account share a SPIFFE ID, and serve's per-handshake work is the same
# for any key. Two JSON lines per mode, the floor's and serve's (field
# "server"), go to $BENCH_OUT/xds.jsonl; the
# script's wall time goes to stderr.
#
#   bench/xds.sh [N] [S]
#
# Sizing (2 cores): per client, serve and the load tool together spend
# about 3.3 ms of CPU on the handshake and 6-8 ms on the first configuration
# of a 1,000-service mesh; the load tool holds about 0.3 MB per client.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
n=${1:-20000}
services=${2:-1000}
perconn=${XDS_PER_CONN:-1}
modes=${XDS_MODES:-sotw delta}
grpcclients=${XDS_GRPC_CLIENTS:-8}
dialconc=${XDS_DIAL_CONCURRENCY:-256}
hold=${XDS_HOLD:-0}
started=$(date +%s)
for tool in jq curl; do
  command -v "$tool" >/dev/null || { echo "bench/xds.sh: $tool is required" >&2; exit 1; }
done
out=${BENCH_OUT:-$root/bench/results}
mkdir -p "$out"
# Each connection is a descriptor on both sides.
ulimit -n $((2 * n + 4096)) 2>/dev/null || ulimit -n "$(ulimit -Hn)"
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
(cd "$root" && go build -o "$dir/trustmesh" ./cmd/trustmesh && go build -o "$dir/xds-load" ./bench/cmd/xds-load)
echo "bench/xds.sh: built in $(($(date +%s) - started)) s" >&2
port() { echo "127.0.0.1:$((20000 + RANDOM % 20000))"; }

# start_serve MODE: starts serve on fresh random ports (sets ca, mon and
# serve) and waits up to 120 s for it to be ready. Returns 0 when ready, 2
# when serve exited because a port was taken (the random ports collide now
# and then), and exits the script on any other failure.
start_serve() {
  local mode=$1 log="$out/xds-serve-$1.log" t
  ca=$(port) mon=$(port)
  while [ "$mon" = "$ca" ]; do mon=$(port); done
  rm -rf "$dir/data"
  env -u GOMEMLIMIT -u GOGC -u GODEBUG "$dir/trustmesh" serve --data-dir "$dir/data" --kubernetes off --mesh "$dir/mesh" \
    --listen-ca "$ca" --listen-monitoring "$mon" --listen-bundle "" --listen-authz off --listen-ui off --log-level warn \
    --max-connections $((n + 1024)) >"$log" 2>&1 &
  serve=$!
  pids=("$serve")
  t=$(date +%s)
  for _ in $(seq 600); do
    curl -sf "http://$mon/readyz" >/dev/null && break
    if ! kill -0 "$serve" 2>/dev/null; then
      wait "$serve" 2>/dev/null || true
      pids=()
      if grep -q "address already in use" "$log"; then
        echo "bench/xds.sh: $mode: serve could not bind $ca or $mon (log: $log)" >&2
        return 2
      fi
      echo "bench/xds.sh: $mode: serve exited before it was ready (log: $log)" >&2
      exit 1
    fi
    sleep 0.2
  done
  curl -sf "http://$mon/readyz" >/dev/null || { echo "bench/xds.sh: $mode: serve not ready after 120 s (log: $log)" >&2; exit 1; }
  echo "bench/xds.sh: $mode: serve ready in $(($(date +%s) - t)) s" >&2
}

# floor MODE DELTA: the no-op floor's point of MODE, one JSON line with
# "server":"noop-floor" in $out/xds.jsonl and in $dir/floor.json.
floor() {
  local mode=$1 delta=$2 addr f t
  rm -rf "$dir/mesh" "$dir/floor-ca.pem"
  "$dir/xds-load" -gen -mesh "$dir/mesh" -services "$services" -clients "$n" -grpc-clients 0
  # A port collision is retried once, on a fresh port (the floor writes
  # its root only once it listens).
  for t in 1 2; do
    addr=$(port)
    env -u GOMEMLIMIT -u GOGC -u GODEBUG "$dir/xds-load" -serve-noop "$addr" -mesh "$dir/mesh" -ca-out "$dir/floor-ca.pem" \
      >"$out/xds-floor-$mode.log" 2>&1 &
    f=$!
    pids=("$f")
    for _ in $(seq 100); do [ -f "$dir/floor-ca.pem" ] || ! kill -0 "$f" 2>/dev/null && break; sleep 0.1; done
    [ -f "$dir/floor-ca.pem" ] && break
    wait "$f" 2>/dev/null || true
    pids=()
    if [ "$t" = 1 ] && grep -q "address already in use" "$out/xds-floor-$mode.log"; then
      echo "bench/xds.sh: $mode: the floor could not bind $addr; retrying on another port" >&2
      continue
    fi
    echo "bench/xds.sh: $mode: the floor did not start (log: $out/xds-floor-$mode.log)" >&2
    exit 1
  done
  "$dir/xds-load" -mesh "$dir/mesh" -services "$services" -clients "$n" -addr "$addr" -ca-file "$dir/floor-ca.pem" -token floor \
    -per-conn "$perconn" -grpc-clients 0 -dial-concurrency "$dialconc" -delta="$delta" -rounds 3 -hold "$hold" -server-pid "$f" |
    jq -c '{server: "noop-floor"} + .' | tee "$dir/floor.json" | tee -a "$out/xds.jsonl"
  kill "$f"
  wait "$f" 2>/dev/null || true
  pids=()
}

# ratios MODE: serve's point ($dir/serve.json) against the floor's: the
# server's own CPU where the result has it (the wall times include the
# load tool's, on the same cores), and RSS above what each held before its
# first client, per client.
ratios() {
  jq -rn --arg mode "$1" --slurpfile s "$dir/serve.json" --slurpfile f "$dir/floor.json" '
    def med: (. // [0]) | sort | .[length / 2 | floor];
    def r(a; b): if (b // 0) > 0 then ((a // 0) / b * 100 | round / 100) else "n/a" end;
    def kb(p): ((p.server_rss_mb // 0) - (p.server_rss_base_mb // 0)) * 1024 / p.clients | round;
    def s2(x): x * 100 | round / 100;
    $s[0] as $s | $f[0] as $f |
    "bench/xds.sh: \($mode), \($s.clients) clients on \($s.connections) connections, serve/floor: " +
    "RSS \(if ($s.hold_s // 0) > 0 then "after a \($s.hold_s) s idle hold" else "after the last push" end) \(r($s.server_rss_mb; $f.server_rss_mb)) (\($s.server_rss_mb // 0 | round) / \($f.server_rss_mb // 0 | round) MB; " +
    "above each one'"'"'s base, per client: \(kb($s)) / \(kb($f)) kB); " +
    "convergence, median of 3 rounds, both after serve'"'"'s 260 ms wait: \(r($s.convergence_s | med; $f.convergence_s | med)) (\(s2($s.convergence_s | med)) / \(s2($f.convergence_s | med)) s); " +
    "server CPU: per push, median \(r($s.server_cpu_push_s | med; $f.server_cpu_push_s | med)) (\(s2($s.server_cpu_push_s | med)) / \(s2($f.server_cpu_push_s | med)) s, 10 ms ticks), " +
    "per handshake \(r($s.server_cpu_ms_per_handshake; $f.server_cpu_ms_per_handshake)), " +
    "for every first configuration \(r($s.server_cpu_first_config_s; $f.server_cpu_first_config_s)) (\(s2($s.server_cpu_first_config_s // 0)) / \(s2($f.server_cpu_first_config_s // 0)) s)"' >&2
}

for mode in $modes; do
  delta=false
  [ "$mode" = delta ] && delta=true
  [ "${XDS_FLOOR:-1}" = 0 ] || floor "$mode" "$delta"
  rm -rf "$dir/mesh"
  "$dir/xds-load" -gen -mesh "$dir/mesh" -services "$services" -clients "$n" -grpc-clients "$grpcclients"
  # A port collision is retried once, on fresh ports.
  rc=0
  start_serve "$mode" || rc=$?
  if [ "$rc" = 2 ]; then
    rc=0
    start_serve "$mode" || rc=$?
  fi
  [ "$rc" = 0 ] || exit 1
  "$dir/trustmesh" ca bundle --data-dir "$dir/data" >"$dir/ca.pem"
  tok=$("$dir/trustmesh" ca token create --data-dir "$dir/data" --spiffe-id spiffe://cluster.local/ns/bench/sa/client --ttl 10m)
  "$dir/xds-load" -mesh "$dir/mesh" -services "$services" -clients "$n" -addr "$ca" -ca-file "$dir/ca.pem" -token "$tok" \
    -per-conn "$perconn" -grpc-clients "$grpcclients" -dial-concurrency "$dialconc" -delta="$delta" -rounds 3 -hold "$hold" -server-pid "$serve" |
    jq -c '{server: "trustmesh"} + .' | tee "$dir/serve.json" | tee -a "$out/xds.jsonl"
  kill "$serve"
  wait "$serve" 2>/dev/null || true
  pids=()
  [ "${XDS_FLOOR:-1}" = 0 ] || ratios "$mode"
done
echo "bench/xds.sh $n $services (modes: $modes, clients per connection: $perconn): $(($(date +%s) - started)) s" >&2
