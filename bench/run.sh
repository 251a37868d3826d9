#!/usr/bin/env bash
# make bench: trustmesh's benchmarks, each beside a peer measured in the
# same run on the same machine, so that the figure to quote is the ratio.
#
# CA issuance: trustmesh's in-process issuance (CSR checks, signing, the
# self-check and the durable journal record) against the bare signing floor
# that shared/bench/spiffe-mint-load measures in-process (CSR parse and
# signature check, then x509.CreateCertificate), at the same concurrency.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
shared=${TRUSTMESH_SHARED_BENCH:-$root/../shared/bench}
out=${BENCH_OUT:-$root/bench/results}
mkdir -p "$out"
dur=${BENCH_DURATION:-10s}

if [ ! -d "$shared" ]; then
  echo "bench: the shared load generators are not at $shared (set TRUSTMESH_SHARED_BENCH)" >&2
  exit 1
fi
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT  # replaced by a fuller cleanup below
(cd "$shared" && go build -o "$tools/" ./spiffe-mint-load)

echo "== CA issuance, in-process, $dur per point"
for c in 1 16; do
  peer=$("$tools/spiffe-mint-load" -inprocess -c "$c" -d "$dur")
  echo "$peer" > "$out/mint-inprocess-c$c.json"
  peer_rps=$(sed -E 's/.*"rps":([0-9.]+).*/\1/' <<<"$peer")
  ours=$(cd "$root" && go test ./ca/ -run '^$' -bench "^BenchmarkIssueConcurrent/c=$c\$" -benchtime "$dur" -count 1 |
    tee "$out/ca-issue-c$c.txt" | awk '/^BenchmarkIssueConcurrent/ {for (i = 1; i <= NF; i++) if ($i == "issues/s") print $(i-1)}')
  awk -v c="$c" -v ours="$ours" -v peer="$peer_rps" 'BEGIN {
    printf "c=%-3s trustmesh issue %10.0f/s   signing floor %10.0f/s   trustmesh/floor = %.3f\n", c, ours, peer, ours / peer }'
done

# The journal's cost: issuance with the durable Merkle journal on against
# the same issuance with it off (a no-op recorder that exists only in the
# benchmark), at 1, 16 and 256 concurrent callers, in the same run.
echo "== CA issuance, journal on vs off, $dur per point"
(cd "$root" && go test ./ca/ -run '^$' -bench '^BenchmarkJournal$' -benchtime "$dur" -count 1) | tee "$out/journal.txt" |
  awk '/^BenchmarkJournal\// {
         split($1, p, "/"); c = p[2]; mode = p[3]; sub(/-[0-9]+$/, "", mode)
         for (i = 1; i <= NF; i++) if ($i == "issues/s") rate[c, mode] = $(i-1)
         cs[c] = 1
       }
       END {
         n = split("c=1 c=16 c=256", order, " ")
         for (k = 1; k <= n; k++) { c = order[k]; if (!(c in cs)) continue
           on = rate[c, "journal=on"]; off = rate[c, "journal=off"]
           printf "%-6s journal on %8.0f/s   off %8.0f/s   on/off = %.3f (cost %.1f%%)\n", c, on, off, on / off, 100 * (1 - on / off)
         }
       }'

# The CA over the wire against its peer, SPIRE's server, in the same run:
# trustmesh serve driven by bench/cmd/ca-load (mTLS renewals on loopback
# TCP, each authenticated, self-checked and journalled before it returns)
# and spire-server v1.13.3 driven by spiffe-mint-load (MintX509SVID on its
# admin socket, which authenticates the local admin and records nothing).
# Both make a fresh key and CSR per call and check the result. SPIRE is
# built once into the cache by bench/spire-build.sh (about 14 minutes).
echo "== CA over the wire: trustmesh serve vs spire-server v1.13.3, $dur per point"
spire=$("$root/bench/spire-build.sh")
(cd "$root" && go build -o "$tools/" ./cmd/trustmesh ./bench/cmd/ca-load)
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work" "$tools"; }
trap cleanup EXIT
"$tools/trustmesh" serve --data-dir "$work/tm" --listen-ca 127.0.0.1:25312 --listen-monitoring 127.0.0.1:25314 \
  --listen-bundle "" --log-level warn 2>"$out/serve.log" &
pids+=($!)
mkdir -p "$work/spire/data"
cat >"$work/spire/server.conf" <<CONF
server {
  bind_address = "127.0.0.1"
  bind_port = "25381"
  socket_path = "$work/spire/api.sock"
  trust_domain = "example.org"
  data_dir = "$work/spire/data"
  log_level = "WARN"
  ca_key_type = "ec-p256"
  default_x509_svid_ttl = "1h"
}
plugins {
  DataStore "sql" {
    plugin_data {
      database_type = "sqlite3"
      connection_string = "$work/spire/data/datastore.sqlite3"
    }
  }
  KeyManager "memory" {
    plugin_data {}
  }
  NodeAttestor "join_token" {
    plugin_data {}
  }
}
CONF
"$spire" run -config "$work/spire/server.conf" >"$out/spire.log" 2>&1 &
pids+=($!)
for i in $(seq 1 300); do
  if curl -fs http://127.0.0.1:25314/readyz >/dev/null 2>&1 &&
     "$spire" healthcheck -socketPath "$work/spire/api.sock" >/dev/null 2>&1; then break; fi
  sleep 0.1
done
for c in 1 16; do
  peer=$("$tools/spiffe-mint-load" -socket "$work/spire/api.sock" -trust-domain example.org -c "$c" -d "$dur")
  echo "$peer" > "$out/spire-mint-c$c.json"
  ours=$("$tools/ca-load" -addr 127.0.0.1:25312 -data-dir "$work/tm" -c "$c" -d "$dur")
  echo "$ours" > "$out/trustmesh-ca-c$c.json"
  rps() { sed -E 's/.*"rps":([0-9.]+).*/\1/' <<<"$1"; }
  p50() { sed -E 's/.*"p50_us":([0-9.]+).*/\1/' <<<"$1"; }
  awk -v c="$c" -v o="$(rps "$ours")" -v p="$(rps "$peer")" -v ol="$(p50 "$ours")" -v pl="$(p50 "$peer")" 'BEGIN {
    printf "c=%-3s trustmesh %8.0f/s (p50 %6.0f us)   spire %8.0f/s (p50 %6.0f us)   trustmesh/spire = %.2f\n", c, o, ol, p, pl, o / p }'
done

# What tracing costs on the authorization path, off and on (issue 18).
"$root/bench/tracing.sh"

# The node agent of ambient mode holding 1,000 identities: memory per
# identity, the time to issue all at start and after a restart, and the CA
# calls of a renewal round against 1,000 per-pod agents (issue 15).
echo "== node agent, 1,000 identities"
"$root/bench/node-load.sh" 1000

# The node proxy of ambient mode against direct TCP between the same
# namespaces, on loopback and veth, in one run (issue 16).
"$root/bench/ambientnet.sh"
