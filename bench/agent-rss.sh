#!/usr/bin/env bash
# The agent's memory once it holds its certificate: starts a throwaway
# `trustmesh serve` on loopback, enrols one agent with a join token, waits
# until it is healthy and reads /proc/PID/smaps_rollup.
#
#   bench/agent-rss.sh SERVE_BINARY AGENT_COMMAND...
#   bench/agent-rss.sh bin/trustmesh bin/trustmesh-agent
#   bench/agent-rss.sh /elsewhere/trustmesh bin/trustmesh agent
#
# Run serve from a different copy of the binary than the agent's: if both
# map one file, the agent's code pages count as shared with serve, and its
# private memory looks smaller than a pod's would be.
set -euo pipefail
serve=$1
shift
dir=$(mktemp -d)
trap 'kill "$agent" "$server" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$dir"' EXIT
port() { echo "127.0.0.1:$((20000 + RANDOM % 20000))"; }
ca=$(port) mon=$(port) amon=$(port)
"$serve" serve --data-dir "$dir/data" --kubernetes off --listen-ca "$ca" --listen-monitoring "$mon" --listen-bundle "" >"$dir/serve.log" 2>&1 &
server=$!
for _ in $(seq 200); do curl -sf "http://$mon/readyz" >/dev/null && break; sleep 0.3; done
"$serve" ca token create --data-dir "$dir/data" --spiffe-id spiffe://cluster.local/vm/rss --ttl 10m >"$dir/token"
"$serve" ca bundle --data-dir "$dir/data" >"$dir/ca.pem"
"$@" --ca-address "$ca" --ca-bundle "$dir/ca.pem" --join-token-file "$dir/token" --socket "$dir/agent.sock" \
  --listen-monitoring "$amon" --cert-dir "$dir/certs" >"$dir/agent.log" 2>&1 &
agent=$!
for _ in $(seq 200); do curl -sf "http://$amon/healthz" >/dev/null && break; sleep 0.3; done
sleep 5
echo "agent: $* (pid $agent)"
grep -E '^(Rss|Pss|Private_Clean|Private_Dirty|Shared_Clean|Anonymous):' "/proc/$agent/smaps_rollup"
awk '/^Private_(Clean|Dirty):/{s+=$2} END{print "private kB:", s}' "/proc/$agent/smaps_rollup"
