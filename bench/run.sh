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
trap 'rm -rf "$tools"' EXIT
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
