#!/usr/bin/env bash
# Builds the real OpenTelemetry Collector that test/tracing exports spans to,
# from the Go module proxy, once, into a cache keyed by what decides the
# binary. Prints the collector's path (for TRUSTMESH_OTELCOL) on stdout;
# progress goes to stderr.
#
# The collector is built with the collector builder from the minimal manifest
# hack/otelcol/manifest.yaml (the OTLP receiver and the file exporter). The
# cache key covers the builder's version, the manifest's bytes and the Go
# version, so changing any of them builds a new collector beside the old one.
set -euo pipefail

BUILDER_VERSION=v0.161.0
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
manifest="$here/otelcol/manifest.yaml"
cache=${TRUSTMESH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/trustmesh}
mkdir -p "$cache"

# Building the collector must not inherit a cross-compile or a workspace.
export GOFLAGS=-mod=mod GOWORK=off CGO_ENABLED=0

goversion=$(go env GOVERSION)
key=$({
  echo "builder $BUILDER_VERSION"
  echo "go $goversion"
  cat "$manifest"
} | sha256sum | cut -c1-16)
dir="$cache/otelcol-$key"
bin="$dir/otelcol"

if [ ! -x "$bin" ]; then
  # One build at a time: a second caller waits, then finds the binary.
  exec 9>"$cache/otelcol.lock"
  flock 9
fi

if [ ! -x "$bin" ]; then
  builder_dir="$cache/otelcol-builder-$BUILDER_VERSION"
  if [ ! -x "$builder_dir/builder" ]; then
    echo "otelcol: installing the collector builder $BUILDER_VERSION" >&2
    mkdir -p "$builder_dir"
    GOBIN="$builder_dir" go install "go.opentelemetry.io/collector/cmd/builder@$BUILDER_VERSION"
  fi
  echo "otelcol: building the collector (key $key, about 4 min cold on 2 cores)" >&2
  work=$(mktemp -d "$cache/otelcol-build.XXXXXX")
  trap 'rm -rf "$work"' EXIT
  # The manifest's output_path is relative to the working directory.
  (cd "$work" && "$builder_dir/builder" --config "$manifest" --ldflags="-s -w" >build.log 2>&1) || {
    tail -n 40 "$work/build.log" >&2
    echo "otelcol: the collector builder failed" >&2
    exit 1
  }
  "$work/_build/otelcol" --version >/dev/null
  mkdir -p "$dir"
  mv "$work/_build/otelcol" "$dir/otelcol.tmp"
  mv "$dir/otelcol.tmp" "$bin"
fi

echo "$bin"
