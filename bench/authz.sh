#!/usr/bin/env bash
# The authz section of make bench, over the wire, in one run on loopback:
# `trustmesh authz` (the real binary and the flags a user runs) beside the
# no-op ext_authz floor on the same transport, and beside an
# opa-envoy-plugin stand-in (bench/cmd/opa-standin) on the same Rego.
#
# For each transport (plaintext, and mTLS with client certificates required,
# the path users run):
#   - the floor: shared/bench extauthz-load -noop-server;
#   - trustmesh with 10, 100, 1,000 and 10,000 generated AuthorizationPolicies
#     (bench/cmd/authz-policies), decision log off;
#   - trustmesh with 1,000 policies and the decision log on (a file, the
#     default format): lines written against calls answered, and the drop
#     counter of the monitoring endpoint when trustmesh authz has one;
#   - trustmesh with the sample Rego (shared/bench extauthz-load/testdata/
#     policy.rego) as a CUSTOM provider, and the stand-in on the same Rego.
# The load is bench/cmd/authz-load (extauthz-load's closed loop and request
# file, plus p99.9), calibrated against extauthz-load on the plaintext floor
# in every round. Rounds are interleaved (every point once per round) and
# the median of the rounds decides. A round is 25 points of BENCH_WARMUP +
# BENCH_DURATION: about 5 minutes at the defaults.
#
# Env: BENCH_DURATION (10s), BENCH_WARMUP (2s), BENCH_AUTHZ_ROUNDS (3),
# BENCH_OUT (results directory), TRUSTMESH_SHARED_BENCH (../shared/bench),
# BENCH_AUTHZ_PORT (first port tried, 19100), BENCH_AUTHZ_POLICIES (the
# policy counts, "10 100 1000 10000").
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
shared=${TRUSTMESH_SHARED_BENCH:-$root/../shared/bench}
out=${BENCH_OUT:-$root/bench/results}
dur=${BENCH_DURATION:-10s}
warm=${BENCH_WARMUP:-2s}
rounds=${BENCH_AUTHZ_ROUNDS:-3}
counts=${BENCH_AUTHZ_POLICIES:-10 100 1000 10000}
mkdir -p "$out"
out=$(cd "$out" && pwd)

if [ ! -d "$shared" ]; then
  echo "bench/authz: the shared load generators are not at $shared (set TRUSTMESH_SHARED_BENCH)" >&2
  exit 1
fi
for tool in openssl python3 curl; do
  command -v "$tool" >/dev/null || { echo "bench/authz: $tool is needed" >&2; exit 1; }
done

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  rm -rf "$work"
}
trap cleanup EXIT

echo "== authz over the wire: building"
bin=$work/bin
(cd "$shared" && go build -o "$bin/" ./extauthz-load)
(cd "$root" && go build -o "$bin/" ./cmd/trustmesh ./bench/cmd/opa-standin ./bench/cmd/authz-policies ./bench/cmd/authz-load)
requests=$shared/extauthz-load/testdata/requests.json
rego=$shared/extauthz-load/testdata/policy.rego

# Certificates as a user makes them with openssl: a CA, a server
# certificate for 127.0.0.1, a client certificate with a SPIFFE ID.
pki=$work/pki
mkdir -p "$pki"
(
  cd "$pki"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 1 -subj /CN=bench-ca \
    -keyout ca.key -out ca.pem 2>/dev/null
  for who in server client; do
    openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=$who" \
      -keyout "$who.key" -out "$who.csr" 2>/dev/null
  done
  printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >server.ext
  printf 'subjectAltName=URI:spiffe://cluster.local/ns/bench/sa/envoy\nextendedKeyUsage=clientAuth\n' >client.ext
  for who in server client; do
    openssl x509 -req -in "$who.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 1 \
      -extfile "$who.ext" -out "$who.pem" 2>/dev/null
  done
)

next_port=${BENCH_AUTHZ_PORT:-19100}
free_port() {
  while (exec 3<>"/dev/tcp/127.0.0.1/$next_port") 2>/dev/null; do next_port=$((next_port + 1)); done
  port=$next_port
  next_port=$((next_port + 1))
}

# Monitoring: trustmesh authz exposes the decision log's drop counter on
# its monitoring endpoint when it has one.
monitoring_flag=""
if "$bin/trustmesh" authz --help 2>&1 | grep -q -- '--listen-monitoring'; then
  monitoring_flag=--listen-monitoring
fi

declare -A addr tls_server_args tls_client_args logfile monaddr
tls_server_args[plain]="--insecure-plaintext"
tls_server_args[mtls]="--tls-cert $pki/server.pem --tls-key $pki/server.key --client-ca $pki/ca.pem"
tls_client_args[plain]=""
tls_client_args[mtls]="-cert $pki/client.pem -key $pki/client.key -ca $pki/ca.pem"

# start NAME TRANSPORT CMD...: run a server in the background on $port.
start() {
  local name=$1 tr=$2
  shift 2
  "$@" >"$work/$name-$tr.out" 2>"$work/$name-$tr.err" &
  pids+=($!)
  addr[$name-$tr]=127.0.0.1:$port
}

echo "== authz over the wire: generating policies and starting servers"
for n in $counts; do
  mkdir -p "$work/pol-$n"
  "$bin/authz-policies" -n "$n" -out "$work/pol-$n/policies.yaml"
done
mkdir -p "$work/rego/bundle"
cp "$rego" "$work/rego/bundle/policy.rego"
echo "bundle" >"$work/rego/bundles.txt"
cat >"$work/rego/00-custom.yaml" <<'EOF'
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext-authz, namespace: istio-system}
spec:
  action: CUSTOM
  provider: {name: rego:envoy/authz/allow}
  rules:
  - {}
EOF

for tr in plain mtls; do
  free_port
  if [ "$tr" = plain ]; then
    start floor "$tr" "$bin/extauthz-load" -noop-server "127.0.0.1:$port" -serve-for 1h
  else
    start floor "$tr" "$bin/extauthz-load" -noop-server "127.0.0.1:$port" -serve-for 1h \
      -cert "$pki/server.pem" -key "$pki/server.key" -ca "$pki/ca.pem"
  fi
  for n in $counts; do
    free_port
    # shellcheck disable=SC2086
    start "tm$n" "$tr" "$bin/trustmesh" authz --listen "127.0.0.1:$port" --policies "$work/pol-$n" \
      --decision-log "" ${tls_server_args[$tr]}
  done
  free_port
  logfile[$tr]=$work/decisions-$tr.log
  : >"${logfile[$tr]}"
  mon=()
  if [ -n "$monitoring_flag" ]; then
    mport=$port
    free_port
    monaddr[$tr]=127.0.0.1:$port
    port=$mport
    mon=("$monitoring_flag" "${monaddr[$tr]}")
  fi
  # shellcheck disable=SC2086
  start tm1000log "$tr" "$bin/trustmesh" authz --listen "127.0.0.1:$port" --policies "$work/pol-1000" \
    --decision-log "${logfile[$tr]}" "${mon[@]}" ${tls_server_args[$tr]}
  free_port
  # shellcheck disable=SC2086
  start rego "$tr" "$bin/trustmesh" authz --listen "127.0.0.1:$port" --policies "$work/rego" \
    --decision-log "" ${tls_server_args[$tr]}
  free_port
  if [ "$tr" = plain ]; then
    start standin "$tr" "$bin/opa-standin" -listen "127.0.0.1:$port" -policy "$rego"
  else
    start standin "$tr" "$bin/opa-standin" -listen "127.0.0.1:$port" -policy "$rego" \
      -tls-cert "$pki/server.pem" -tls-key "$pki/server.key" -client-ca "$pki/ca.pem"
  fi
done

# Wait until every server answers a Check (10,000 policies take a while).
for key in "${!addr[@]}"; do
  tr=${key##*-}
  ok=""
  for _ in $(seq 1 600); do
    # shellcheck disable=SC2086
    if "$bin/authz-load" -addr "${addr[$key]}" -requests "$requests" -c 1 -d 10ms -timeout 2s \
      ${tls_client_args[$tr]} >/dev/null 2>&1; then
      ok=1
      break
    fi
    sleep 1
  done
  if [ -z "$ok" ]; then
    echo "bench/authz: $key did not answer on ${addr[$key]}:" >&2
    tail -5 "$work/$key.err" >&2 || true
    exit 1
  fi
done

raw=$out/authz.jsonl
: >"$raw"
# point ROUND TRANSPORT SERVER C: one measured point, appended to $raw.
point() {
  local round=$1 tr=$2 name=$3 c=$4 extra="" before=0 res
  if [ "$name" = tm1000log ]; then before=$(wc -l <"${logfile[$tr]}"); fi
  # shellcheck disable=SC2086
  res=$("$bin/authz-load" -addr "${addr[$name-$tr]}" -requests "$requests" -c "$c" -d "$dur" -warmup "$warm" \
    ${tls_client_args[$tr]})
  if [ "$name" = tm1000log ]; then
    sleep 1 # the log writer is asynchronous
    extra=",\"log_lines\":$(($(wc -l <"${logfile[$tr]}") - before))"
    if [ -n "${monaddr[$tr]:-}" ]; then
      dropped=$(curl -fsS "http://${monaddr[$tr]}/metrics" | awk '/^trustmesh_authz_decision_log_dropped_total/ {print $2}')
      extra="$extra,\"log_dropped\":${dropped:-null}"
    fi
  fi
  echo "{\"round\":$round,\"transport\":\"$tr\",\"server\":\"$name\",\"c\":$c$extra,\"load\":$res}" >>"$raw"
}

echo "== authz over the wire: $rounds interleaved rounds, $dur per point after $warm warm-up"
start_time=$(date +%s)
for round in $(seq 1 "$rounds"); do
  # The calibration of authz-load: extauthz-load on the plaintext floor.
  cal=$("$bin/extauthz-load" -addr "${addr[floor-plain]}" -requests "$requests" -c 16 -d "$dur" -warmup "$warm")
  echo "{\"round\":$round,\"transport\":\"plain\",\"server\":\"floor-extauthz-load\",\"c\":16,\"load\":$cal}" >>"$raw"
  for tr in plain mtls; do
    for name in floor $(for n in $counts; do echo "tm$n"; done) tm1000log rego standin; do
      point "$round" "$tr" "$name" 16
    done
    for name in floor tm1000 rego standin; do
      point "$round" "$tr" "$name" 1
    done
  done
  echo "round $round done after $(($(date +%s) - start_time)) s"
done

python3 - "$raw" "$monitoring_flag" <<'EOF'
import json, statistics, sys
raw, monitoring = sys.argv[1], sys.argv[2]
pts = [json.loads(l) for l in open(raw)]
def med(tr, server, c, field):
    xs = [p["load"].get(field) for p in pts if p["transport"] == tr and p["server"] == server and p["c"] == c]
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None
cal_ext = med("plain", "floor-extauthz-load", 16, "rps")
cal_ours = med("plain", "floor", 16, "rps")
print(f"calibration: authz-load/extauthz-load on the plaintext floor at c=16: {cal_ours / cal_ext:.3f} "
      f"({cal_ours:,.0f} vs {cal_ext:,.0f} rps, medians)")
names = {"floor": "no-op floor (extauthz-load -noop-server)", "rego": "trustmesh, sample Rego as CUSTOM",
         "standin": "opa-envoy-plugin stand-in, sample Rego", "tm1000log": "trustmesh, 1,000 APs, decision log on"}
servers = sorted({p["server"] for p in pts if p["server"].startswith("tm") and p["server"] != "tm1000log"},
                 key=lambda s: int(s[2:]))
order = ["floor"] + servers + ["tm1000log", "rego", "standin"]
for tr in ["plain", "mtls"]:
    floor16, floor1 = med(tr, "floor", 16, "rps"), med(tr, "floor", 1, "p50_us")
    print(f"\n{tr}: medians of the rounds; ratios to the floor on the same transport")
    print(f"{'server':44} {'rps c=16':>10} {'/floor':>7} {'p99 us':>8} {'p99.9 us':>9} {'p50 c=1':>8} {'/floor':>7} {'p99 c=1':>8} {'p99.9 c=1':>9}")
    for s in order:
        rps = med(tr, s, 16, "rps")
        if rps is None:
            continue
        name = names[s] if s in names else f"trustmesh, {int(s[2:]):,} APs"
        p50 = med(tr, s, 1, "p50_us")
        c1 = f"{p50:8.0f} {p50 / floor1:7.2f} {med(tr, s, 1, 'p99_us'):8.0f} {med(tr, s, 1, 'p999_us'):9.0f}" if p50 else ""
        print(f"{name:44} {rps:10,.0f} {rps / floor16:7.3f} {med(tr, s, 16, 'p99_us'):8.0f} {med(tr, s, 16, 'p999_us'):9.0f} {c1}")
    rego, standin = med(tr, "rego", 16, "rps"), med(tr, "standin", 16, "rps")
    print(f"stand-in/floor at c=16: {standin / floor16:.3f} (counts only within 0.35-0.39); trustmesh Rego/stand-in: {rego / standin:.2f}")
    on, off = med(tr, "tm1000log", 16, "rps"), med(tr, "tm1000", 16, "rps")
    if on and off:
        print(f"decision log on/off at 1,000 APs, c=16: {on / off:.3f}")
    for p in pts:
        if p["transport"] == tr and p["server"] == "tm1000log":
            dropped = p.get("log_dropped", "n/a" if not monitoring else None)
            print(f"  round {p['round']} c={p['c']}: {p['log_lines']} lines written for {p['load']['answered']} calls answered; dropped (monitoring): {dropped}")
EOF
echo "raw: $raw"
