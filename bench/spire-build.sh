#!/usr/bin/env bash
# Builds SPIRE's server v1.13.3, the peer of trustmesh's CA in make bench,
# from the Go module proxy through the tools module in bench/tools/spire,
# once, into a cache. It takes about 14 minutes and 4 GB on 2 cores: it is
# for benchmarks only and never runs in CI. Prints the binary's path.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${TRUSTMESH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/trustmesh}
bin="$cache/spire/v1.13.3"
mkdir -p "$bin"
if [ ! -x "$bin/spire-server" ]; then
  echo "spire-build: building spire-server v1.13.3 (about 14 min)" >&2
  (cd "$here/tools/spire" &&
    GOWORK=off GONOSUMDB=github.com/GoogleCloudPlatform/cloudsql-proxy \
      go build -trimpath -o "$bin/spire-server.tmp" github.com/spiffe/spire/cmd/spire-server &&
    mv "$bin/spire-server.tmp" "$bin/spire-server")
fi
echo "$bin/spire-server"
