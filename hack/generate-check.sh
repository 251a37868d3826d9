#!/usr/bin/env bash
# Fails when committed generated files are stale: the Go code of trustmesh's
# protos (hack/protoc.sh, api/ca/v1 and api/ambient/v1) and the Helm chart's Istio CRDs
# (hack/crdgen, deploy/charts/trustmesh/files/crds.gen.yaml). Each is
# regenerated into a temporary directory and compared with the committed
# file; the tree is never modified.
#
#   hack/generate-check.sh [TREE]
#
# checks TREE, by default this repository. The generators come from this
# repository (its pinned plugins, its go.mod's istio.io/api). protoc's own
# version, which the generated files record in a comment, is not pinned: that
# line is ignored, so any protoc from Debian's protobuf-compiler will do.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tree=$(cd "${1:-$root}" && pwd)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
stale=0

# Protos: generate from the tree's .proto files, compare every generated file.
protodirs="api/ca/v1 api/ambient/v1"
for d in $protodirs; do
  mkdir -p "$tmp/$d"
  cp "$tree"/$d/*.proto "$tmp/$d/"
done
"$root/hack/protoc.sh" "$tmp" >&2
for d in $protodirs; do
  for gen in "$tmp"/$d/*.pb.go; do
    rel=$d/$(basename "$gen")
    if [ ! -f "$tree/$rel" ]; then
      echo "generate-check: $rel is not committed; run hack/protoc.sh" >&2
      stale=1
    elif ! diff -u -I '^//[[:space:]-]*protoc[[:space:]]\+v[0-9.]*$' "$tree/$rel" "$gen" >"$tmp/diff"; then
      echo "generate-check: $rel is stale; run hack/protoc.sh" >&2
      head -n 40 "$tmp/diff" >&2
      stale=1
    fi
  done
  for committed in "$tree"/$d/*.pb.go; do
    if [ ! -f "$tmp/$d/$(basename "$committed")" ]; then
      echo "generate-check: $d/$(basename "$committed") has no .proto; remove it" >&2
      stale=1
    fi
  done
done

# CRDs: extract from the istio.io/api version the tree's go.mod requires.
crds=deploy/charts/trustmesh/files/crds.gen.yaml
(cd "$tree" && go run ./hack/crdgen -o "$tmp/crds.gen.yaml")
if ! diff -u "$tree/$crds" "$tmp/crds.gen.yaml" >"$tmp/diff"; then
  echo "generate-check: $crds is stale; run go run ./hack/crdgen" >&2
  head -n 40 "$tmp/diff" >&2
  stale=1
fi

if [ "$stale" = 0 ]; then
  echo "generate-check: generated files are current"
fi
exit "$stale"
