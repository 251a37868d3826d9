#!/usr/bin/env bash
# The node agent's figures (issue 15): one `trustmesh node` holding N
# (default 1,000) workload identities from a Node mesh file, against a
# throwaway `trustmesh serve` on loopback:
#   - memory per identity: the node agent's private memory and Go heap with
#     N identities, minus a node agent holding one, divided by N-1;
#   - the time to issue all N at start, and again after a SIGKILL and a
#     restart (the node's own SVID survives in its state directory; the
#     workload keys, in memory only, do not);
#   - the CA calls of one renewal round (BatchNewX509SVID calls, from the
#     node agent's trustmesh_node_batch_calls_total), against N for N
#     per-pod agents, which make one call each.
#
#   bench/node-load.sh [N]
#
# Serve runs from another copy of the binary than the node agent, so that
# the node agent's code pages are not counted as shared with serve.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
n=${1:-1000}
ttl=${NODE_LOAD_TTL:-2m}
out=${BENCH_OUT:-$root/bench/results}
mkdir -p "$out"
dir=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$dir"; }
trap cleanup EXIT
(cd "$root" && go build -o "$dir/serve-bin/trustmesh" ./cmd/trustmesh && go build -o "$dir/node-bin/trustmesh" ./cmd/trustmesh)
serve=$dir/serve-bin/trustmesh node=$dir/node-bin/trustmesh
port() { echo "127.0.0.1:$((20000 + RANDOM % 20000))"; }
ca=$(port) mon=$(port)

# node-big may hold N identities, node-one one; each is told apart by uid.
mkdir -p "$dir/mesh"
{
  for name in node-big node-one; do
    count=$n
    [ "$name" = node-one ] && count=1
    printf 'apiVersion: mesh.trustmesh.io/v1alpha1\nkind: Node\nmetadata: {name: %s}\nspec:\n  workloads:\n' "$name"
    for i in $(seq 1 "$count"); do
      printf '  - spiffeID: spiffe://cluster.local/ns/load/sa/%s-w%d\n    selectors: {uid: %d}\n' "$name" "$i" $((100000 + i))
    done
    echo ---
  done
} >"$dir/mesh/nodes.yaml"

"$serve" serve --data-dir "$dir/data" --kubernetes off --mesh "$dir/mesh" --listen-ca "$ca" --listen-monitoring "$mon" \
  --listen-bundle "" --listen-authz off --listen-ui off --min-workload-ttl 1m --log-level warn >"$out/node-load-serve.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do curl -sf "http://$mon/readyz" >/dev/null && break; sleep 0.2; done
"$serve" ca bundle --data-dir "$dir/data" >"$dir/ca.pem"

# metric NAME PORT: the node agent's metric (summed over labels), 0 when
# not there yet.
metric() { curl -sf "http://$2/metrics" 2>/dev/null | awk -v m="$1" '$1 == m || index($1, m "{") == 1 {s += $2} END {print s + 0}'; }
issued() { curl -sf "http://$1/metrics" 2>/dev/null | awk '/^trustmesh_node_issuance_results_total\{result="issued"\}/ {print $2 + 0; f=1} END {if (!f) print 0}'; }
now() { date +%s.%N; }

# start NAME: runs the node agent NAME; sets nodepid and nodemon.
start() {
  local name=$1
  nodemon=$(port)
  "$node" node --node-name "$name" --ca-address "$ca" --ca-bundle-file "$dir/ca.pem" \
    --join-token-file "$dir/$name.token" --state-dir "$dir/$name-state" --socket "$dir/$name.sock" \
    --cert-ttl "$ttl" --monitoring-address "$nodemon" >>"$out/node-load-$name.log" 2>&1 &
  nodepid=$!
  pids+=("$nodepid")
}

# waitheld COUNT: waits until the node agent holds COUNT identities.
waitheld() {
  for _ in $(seq 6000); do
    [ "$(metric trustmesh_node_identities_held "$nodemon")" -ge "$1" ] 2>/dev/null && return 0
    kill -0 "$nodepid" 2>/dev/null || { echo "node-load: the node agent exited" >&2; exit 1; }
    sleep 0.05
  done
  echo "node-load: the node agent did not hold $1 identities within 300s" >&2
  exit 1
}

# private PID: private memory in kB; anon PID: anonymous memory (heap,
# stacks) in kB, which no other process's mapping of the binary changes.
private() { awk '/^Private_(Clean|Dirty):/ {s += $2} END {print s}' "/proc/$1/smaps_rollup"; }
anon() { awk '/^Anonymous:/ {print $2}' "/proc/$1/smaps_rollup"; }

: >"$out/node-load-node-one.log" && : >"$out/node-load-node-big.log"
for name in node-one node-big; do
  "$serve" ca token create --data-dir "$dir/data" --node "$name" --ttl 10m >"$dir/$name.token"
done

# One identity: the baseline.
start node-one
waitheld 1
sleep 3
one_priv=$(private "$nodepid") one_anon=$(anon "$nodepid") one_heap=$(metric go_memstats_heap_inuse_bytes "$nodemon")
# Gone before the next starts: the two would share the binary's pages.
kill -9 "$nodepid"
wait "$nodepid" 2>/dev/null || true

# N identities: the time to issue them all at start.
t0=$(now)
start node-big
waitheld "$n"
t1=$(now)
start_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}')
start_gauge=$(metric trustmesh_node_first_full_issuance_seconds "$nodemon")
start_calls=$(metric trustmesh_node_batch_calls_total "$nodemon")
sleep 3
big_priv=$(private "$nodepid") big_anon=$(anon "$nodepid") big_heap=$(metric go_memstats_heap_inuse_bytes "$nodemon")

# One renewal round: every identity renewed once (at half-life).
before_calls=$(metric trustmesh_node_batch_calls_total "$nodemon")
before_issued=$(issued "$nodemon")
for _ in $(seq 6000); do
  [ "$(issued "$nodemon")" -ge $((before_issued + n)) ] 2>/dev/null && break
  sleep 0.1
done
round_calls=$(( $(metric trustmesh_node_batch_calls_total "$nodemon") - before_calls ))
round_issued=$(( $(issued "$nodemon") - before_issued ))

# A crash and a restart: the time until all N are held again.
kill -9 "$nodepid"
wait "$nodepid" 2>/dev/null || true
t0=$(now)
start node-big
waitheld "$n"
t1=$(now)
restart_s=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.2f", b - a}')
restart_calls=$(metric trustmesh_node_batch_calls_total "$nodemon")

awk -v n="$n" -v bp="$big_priv" -v op="$one_priv" -v ba="$big_anon" -v oa="$one_anon" -v bh="$big_heap" -v oh="$one_heap" -v s="$start_s" -v g="$start_gauge" \
  -v sc="$start_calls" -v rc="$round_calls" -v ri="$round_issued" -v r="$restart_s" -v rsc="$restart_calls" -v ttl="$ttl" 'BEGIN {
  printf "node agent holding %d identities (cert TTL %s):\n", n, ttl
  printf "  memory per identity   %6.1f KiB private (%d kB with %d, %d kB with 1), %.1f KiB anonymous, %.1f KiB Go heap in use\n", (bp - op) / (n - 1), bp, n, op, (ba - oa) / (n - 1), (bh - oh) / 1024 / (n - 1)
  printf "  issue all at start    %6.2f s (node agent: %.2f s), %d BatchNewX509SVID calls\n", s, g, sc
  printf "  one renewal round     %6d BatchNewX509SVID calls for %d renewals; %d per-pod agents make %d\n", rc, ri, n, n
  printf "  restart after SIGKILL %6.2f s to hold all %d again, %d calls\n", r, n, rsc
}' | tee "$out/node-load.txt"
