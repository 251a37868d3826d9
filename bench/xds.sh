#!/usr/bin/env bash
# The xDS figures (issue 11): a throwaway `trustmesh serve` on loopback with a
# generated mesh of S services (default 1,000) and N client pods (default
# 20,000), driven by bench/cmd/xds-load, a process of its own, as N
# simulated Envoy sidecars over state of the world, then over delta:
#   - the cold connect of all N (each its own mTLS connection unless
#     XDS_PER_CONN says how many share one);
#   - the time from a mesh change (one more endpoint on svc-0, the
#     endpoints of every sidecar change) until every client has it,
#     3 rounds, the server's 100 ms debounce included;
#   - serve's RSS with every client connected, and per client.
# GOMEMLIMIT is left unset; serve's --max-connections (default 1,024 per
# listener) is raised to N+1,024, or the clients past it would wait. Each client's certificate is the one the load
# tool enrols with a join token: the pods of a service account share a
# SPIFFE ID, and serve's per-handshake work is the same for any key.
#
#   bench/xds.sh [N] [S]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
n=${1:-20000}
services=${2:-1000}
perconn=${XDS_PER_CONN:-1}
modes=${XDS_MODES:-sotw delta}
out=${BENCH_OUT:-$root/bench/results}
mkdir -p "$out"
# Each connection is a descriptor on both sides.
ulimit -n $((2 * n + 4096)) 2>/dev/null || ulimit -n "$(ulimit -Hn)"
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
(cd "$root" && go build -o "$dir/trustmesh" ./cmd/trustmesh && go build -o "$dir/xds-load" ./bench/cmd/xds-load)
port() { echo "127.0.0.1:$((20000 + RANDOM % 20000))"; }

for mode in $modes; do
  ca=$(port) mon=$(port)
  rm -rf "$dir/mesh" "$dir/data"
  "$dir/xds-load" -gen -mesh "$dir/mesh" -services "$services" -clients "$n"
  env -u GOMEMLIMIT "$dir/trustmesh" serve --data-dir "$dir/data" --kubernetes off --mesh "$dir/mesh" --listen-ca "$ca" \
    --listen-monitoring "$mon" --listen-bundle "" --listen-authz off --listen-ui off --log-level warn --max-connections $((n + 1024)) \
    >"$out/xds-serve-$mode.log" 2>&1 &
  serve=$!
  pids+=("$serve")
  for _ in $(seq 600); do curl -sf "http://$mon/readyz" >/dev/null && break; sleep 0.2; done
  "$dir/trustmesh" ca bundle --data-dir "$dir/data" >"$dir/ca.pem"
  tok=$("$dir/trustmesh" ca token create --data-dir "$dir/data" --spiffe-id spiffe://cluster.local/ns/bench/sa/client --ttl 10m)
  delta=false
  [ "$mode" = delta ] && delta=true
  "$dir/xds-load" -mesh "$dir/mesh" -services "$services" -clients "$n" -addr "$ca" -ca-file "$dir/ca.pem" -token "$tok" \
    -per-conn "$perconn" -delta="$delta" -rounds 3 -server-pid "$serve" | tee -a "$out/xds.jsonl"
  kill "$serve"
  wait "$serve" 2>/dev/null || true
done
