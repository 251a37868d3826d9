#!/bin/sh
# Regenerates the fixtures of test/faults/upgrade: a data directory and an
# agent state directory written by trustmesh at commit 78c56eb (the commit
# issue 14 starts from). Run from the repository root:
#   sh test/faults/upgrade/testdata/generate.sh
# Lifetimes are long (intermediate 60000h, workload certificate 50000h, root
# the built-in 87600h) so that the fixtures stay valid until August 2032;
# regenerate them before then. The keys in them are test keys, used nowhere
# else.
set -eu
commit=78c56eb
out=$(pwd)/test/faults/upgrade/testdata
work=$(mktemp -d)
wt=$work/wt
git worktree add --detach "$wt" "$commit"
(cd "$wt" && go build -o "$work/trustmesh" ./cmd/trustmesh)
git worktree remove --force "$wt"
tm=$work/trustmesh
ca=127.0.0.1:55523 mon=127.0.0.1:55543
"$tm" serve --data-dir "$work/data" --kubernetes off --listen-ca $ca --listen-monitoring $mon \
	--listen-authz off --listen-bundle "" --listen-injector off --listen-ui off --manual-ca-rotation \
	--ca-intermediate-ttl 60000h --max-workload-ttl 50000h --default-workload-ttl 50000h &
serve=$!
sleep 6
"$tm" ca bundle --data-dir "$work/data" >"$work/bundle.pem"
"$tm" ca token create --data-dir "$work/data" --spiffe-id spiffe://cluster.local/vm/db-1 >"$work/token"
mkdir -m 700 "$work/state"
"$tm" agent --ca-address $ca --ca-server-name localhost --ca-bundle "$work/bundle.pem" \
	--state-dir "$work/state" --socket "$work/agent.sock" --join-token-file "$work/token" --cert-ttl 50000h &
agent=$!
sleep 5
kill $agent; wait $agent || true
kill $serve; wait $serve || true
rm -rf "$out/data" "$out/state"
mkdir -p "$out/data/ca/gen-1" "$out/state"
cp "$work/data/ca/rotation.json" "$out/data/ca/"
cp "$work/data/ca/gen-1/"*.pem "$out/data/ca/gen-1/"
cp "$work/data/journal.db" "$work/data/checkpoint-key.pem" "$work/data/checkpoint.pub" "$out/data/"
cp "$work/state/"*.pem "$out/state/"
rm -rf "$work"
