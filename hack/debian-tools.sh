#!/usr/bin/env bash
# Installs, from Debian's packages, the command-line tools that tests run
# and that a fresh machine may lack: hack/debian-tools.sh COMMAND[=PACKAGE]...
# (the package defaults to the command's name), e.g.
#   hack/debian-tools.sh iptables ip6tables=iptables tcpdump ip=iproute2
# Tools already on PATH, or in /usr/sbin or /sbin (not on a Debian user's
# PATH, where iptables lives), are left alone; installing needs root, as CI
# has.
set -euo pipefail

have() {
  command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ] || [ -x "/sbin/$1" ]
}

missing=()
for spec in "$@"; do
  cmd=${spec%%=*}
  pkg=${spec#*=}
  if ! have "$cmd"; then
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
