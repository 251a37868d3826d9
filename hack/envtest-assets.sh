#!/usr/bin/env bash
# Builds the real kube-apiserver and etcd that envtest runs, from the Go module
# proxy, once, into a cache keyed by version. Prints the assets directory
# (for KUBEBUILDER_ASSETS) on stdout; progress goes to stderr.
#
# No prebuilt binaries can be downloaded in our build environments, so both are
# built from source through the tools modules under hack/tools, which are kept
# apart from the project's go.mod so they do not pin its k8s.io versions.
set -euo pipefail

KUBE_VERSION=v1.37.2
ETCD_VERSION=v3.7.3
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cache=${TRUSTMESH_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/trustmesh}
bin="$cache/envtest/kube-$KUBE_VERSION-etcd-$ETCD_VERSION"
mkdir -p "$bin"

# Building kube-apiserver must not inherit a cross-compile or a workspace.
export GOFLAGS=-mod=mod GOWORK=off CGO_ENABLED=0

if [ ! -x "$bin/etcd" ]; then
  echo "envtest-assets: building etcd $ETCD_VERSION (about 70s cold)" >&2
  (cd "$here/tools/etcd" &&
    go build -trimpath -ldflags="-s -w" -o "$bin/etcd.tmp" go.etcd.io/etcd/server/v3 &&
    mv "$bin/etcd.tmp" "$bin/etcd")
fi

if [ ! -x "$bin/kube-apiserver" ]; then
  echo "envtest-assets: building kube-apiserver $KUBE_VERSION (about 13 min cold on 2 cores)" >&2
  V=k8s.io/component-base/version
  (cd "$here/tools/kube-apiserver" &&
    go build -trimpath \
      -ldflags="-s -w -X $V.gitVersion=$KUBE_VERSION -X $V.gitMajor=1 -X $V.gitMinor=37" \
      -o "$bin/kube-apiserver.tmp" k8s.io/kubernetes/cmd/kube-apiserver &&
    mv "$bin/kube-apiserver.tmp" "$bin/kube-apiserver")
fi

echo "$bin"
