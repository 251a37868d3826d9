#!/usr/bin/env bash
# Regenerates the Go code for trustmesh's own protos. The generated files are
# committed; this is needed only when a .proto changes (api/ca/v1,
# api/ambient/v1). It needs protoc
# (Debian: protobuf-compiler, installed when missing and run as root) and
# installs the Go plugins at pinned versions.
#
#   hack/protoc.sh [TREE]
#
# generates in TREE (a copy of the repository's api/), by default the
# repository itself; hack/generate-check.sh uses a temporary copy.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
tree=$(cd "${1:-$root}" && pwd)
if ! command -v protoc >/dev/null; then
  if [ "$(id -u)" != 0 ]; then
    echo "protoc.sh: protoc is not installed; run as root or apt-get install protobuf-compiler" >&2
    exit 1
  fi
  echo "protoc.sh: installing protoc from Debian's packages" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler >&2
fi
gobin=$(mktemp -d)
trap 'rm -rf "$gobin"' EXIT
cd "$root"
GOBIN=$gobin go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
GOBIN=$gobin go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2
cd "$tree"
PATH=$gobin:$PATH protoc -I . \
  --go_out=paths=source_relative:. \
  --go-grpc_out=paths=source_relative:. \
  api/ca/v1/*.proto api/ambient/v1/*.proto
