#!/usr/bin/env bash
# What tracing costs on the authorization path (issue 18), measured in one
# run on one machine:
#
# 1. In process: extauthz's BenchmarkCheck, Check around a decision that
#    costs nothing, with tracing off, on with 1% of traces sampled, and on
#    with every call sampled (spans batched to an exporter that discards).
# 2. Over the wire: trustmesh authz (plaintext gRPC on loopback, one ALLOW
#    policy) driven by shared/bench's extauthz-load, started three times:
#    tracing off (no OTEL_ variable), on at 1%
#    (OTEL_TRACES_SAMPLER=parentbased_traceidratio, _ARG=0.01) and on at
#    100%, both exporting OTLP/HTTP to bench/cmd/otlp-sink, a receiver that
#    keeps nothing. The load sends no trace context, so every Check is a
#    root span and the ratio sampler decides.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
shared=${TRUSTMESH_SHARED_BENCH:-$root/../shared/bench}
out=${BENCH_OUT:-$root/bench/results}
mkdir -p "$out"
dur=${BENCH_DURATION:-10s}
conc=${BENCH_TRACING_CONCURRENCY:-16}

if [ ! -d "$shared" ]; then
  echo "bench: the shared load generators are not at $shared (set TRUSTMESH_SHARED_BENCH)" >&2
  exit 1
fi

echo "== ext_authz Check in process: tracing off, 1% sampled, all sampled"
(cd "$root" && go test ./authz/extauthz/ -run '^$' -bench '^BenchmarkCheck$' -benchmem -benchtime "${BENCH_TRACING_BENCHTIME:-2s}" -count "${BENCH_TRACING_COUNT:-5}") |
  tee "$out/extauthz-check-tracing.txt" | awk '/^BenchmarkCheck\// {
    split($1, p, "/"); mode = p[2]; sub(/-[0-9]+$/, "", mode)
    for (i = 1; i <= NF; i++) { if ($i == "ns/op") ns[mode] += $(i-1); if ($i == "allocs/op") al[mode] = $(i-1) }
    n[mode]++
  }
  END {
    split("tracing=off tracing=1pct tracing=all", order, " ")
    for (k = 1; k <= 3; k++) { m = order[k]; if (!(m in n)) continue
      printf "%-13s %8.0f ns/op (mean of %d)  %3d allocs/op   vs off %+6.1f%%\n", m, ns[m] / n[m], n[m], al[m], 100 * (ns[m] / n[m]) / (ns["tracing=off"] / n["tracing=off"]) - 100 }
  }'

tools=$(mktemp -d)
work=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work" "$tools"; }
trap cleanup EXIT
(cd "$shared" && go build -o "$tools/" ./extauthz-load)
(cd "$root" && go build -o "$tools/" ./cmd/trustmesh ./bench/cmd/otlp-sink)
mkdir -p "$work/policies"
cat >"$work/policies/allow.yaml" <<'YAML'
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-client, namespace: default}
spec:
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/client"]}}]
    to: [{operation: {methods: ["GET"], paths: ["/api/*"]}}]
YAML
"$tools/otlp-sink" -listen 127.0.0.1:25318 2>"$out/otlp-sink.log" &
pids+=($!)

echo "== ext_authz over the wire, c=$conc, $dur per point: trustmesh authz with tracing off, on at 1%, on at 100%"
addr=127.0.0.1:25391
declare -A rps p50 p99
for mode in off 1pct all; do
  env=(env -u OTEL_TRACES_EXPORTER -u OTEL_SDK_DISABLED -u OTEL_TRACES_SAMPLER -u OTEL_TRACES_SAMPLER_ARG)
  case $mode in
    1pct) env+=(OTEL_TRACES_EXPORTER=otlp OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:25318
                OTEL_TRACES_SAMPLER=parentbased_traceidratio OTEL_TRACES_SAMPLER_ARG=0.01) ;;
    all)  env+=(OTEL_TRACES_EXPORTER=otlp OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:25318) ;;
  esac
  "${env[@]}" "$tools/trustmesh" authz --insecure-plaintext --listen "$addr" --policies "$work/policies" \
    --decision-log "" 2>"$out/authz-tracing-$mode.log" &
  pid=$!
  pids+=($pid)
  ready=""
  for i in $(seq 1 100); do
    if "$tools/extauthz-load" -addr "$addr" -n 1 -timeout 1s >/dev/null 2>&1; then ready=1; break; fi
    sleep 0.1
  done
  [ -n "$ready" ] || { echo "bench: trustmesh authz ($mode) did not answer" >&2; cat "$out/authz-tracing-$mode.log" >&2; exit 1; }
  res=$("$tools/extauthz-load" -addr "$addr" -c "$conc" -d "$dur" -warmup 2s)
  echo "$res" > "$out/extauthz-tracing-$mode.json"
  rps[$mode]=$(sed -E 's/.*"rps":([0-9.]+).*/\1/' <<<"$res")
  p50[$mode]=$(sed -E 's/.*"p50_us":([0-9.]+).*/\1/' <<<"$res")
  p99[$mode]=$(sed -E 's/.*"p99_us":([0-9.]+).*/\1/' <<<"$res")
  kill "$pid"; wait "$pid" 2>/dev/null || true
done
for mode in off 1pct all; do
  awk -v m="$mode" -v r="${rps[$mode]}" -v a="${p50[$mode]}" -v b="${p99[$mode]}" -v off="${rps[off]}" 'BEGIN {
    printf "tracing %-5s %8.0f checks/s   p50 %6.0f us   p99 %6.0f us   throughput vs off %+6.1f%%\n", m, r, a, b, 100 * r / off - 100 }'
done
