#!/usr/bin/env bash
# The node proxy of ambient mode (issue 16) against direct TCP, in one run:
#
#  - loopback: agent/hbone's benchmarks, HBONE (TLS 1.3 + HTTP/2 CONNECT,
#    one tunnel per connection, and pooled) against plain TCP on the same
#    loopback, in one process: throughput, a small round trip, setup;
#  - veth: test/ambientnet's TestFigures, the same pods measured with
#    direct TCP and then through two `trustmesh node --proxy` (one node over
#    its bridge, and across the veth link between two nodes): single-stream
#    throughput, p50/p99 of 64-byte round trips, sequential connection
#    setup, memory per open connection and CPU per GB of the node agents.
#    It needs root (network namespaces, iptables); as anyone else it says so.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
echo "== ambient node proxy: HBONE against TCP on loopback (agent/hbone)"
go test ./agent/hbone/ -run '^$' -bench . -benchtime 2s -count 1 | grep -E '^Benchmark'
echo "== ambient node proxy: through two node proxies against direct TCP on veth (test/ambientnet)"
if [ "$(id -u)" != 0 ]; then
  echo "skipped: the veth figures create network namespaces and need root"
  exit 0
fi
TRUSTMESH_AMBIENTNET_FIGURES=1 go test ./test/ambientnet/ -run '^TestFigures$' -count 1 -v |
  sed -n '/^ambient node proxy vs direct TCP/,/^CPU per GB/p'
