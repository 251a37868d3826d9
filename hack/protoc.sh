#!/usr/bin/env bash
# Regenerates the Go code for trustmesh's own protos. The generated files are
# committed; this is needed only when a .proto changes. It needs protoc
# (Debian: protobuf-compiler) and installs the Go plugins at pinned versions.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
gobin=$(mktemp -d)
trap 'rm -rf "$gobin"' EXIT
GOBIN=$gobin go install google.golang.org/protobuf/cmd/protoc-gen-go@v1.36.12
GOBIN=$gobin go install google.golang.org/grpc/cmd/protoc-gen-go-grpc@v1.6.2
cd "$root"
PATH=$gobin:$PATH protoc -I . \
  --go_out=paths=source_relative:. \
  --go-grpc_out=paths=source_relative:. \
  api/ca/v1/*.proto
