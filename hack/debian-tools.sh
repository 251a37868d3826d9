#!/usr/bin/env bash
# Installs, from Debian's packages, the command-line tools that tests run
# and that a fresh machine may lack: hack/debian-tools.sh COMMAND[=PACKAGE]...
# (the package defaults to the command's name). Tools already on PATH are
# left alone; installing needs root, as CI has.
set -euo pipefail

missing=()
for spec in "$@"; do
  cmd=${spec%%=*}
  pkg=${spec#*=}
  if ! command -v "$cmd" >/dev/null; then
    missing+=("$pkg")
  fi
done
[ ${#missing[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
  echo "debian-tools.sh: ${missing[*]} missing; run as root or apt-get install ${missing[*]}" >&2
  exit 1
fi
echo "debian-tools.sh: installing ${missing[*]} from Debian's packages" >&2
apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
