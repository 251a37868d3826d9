#!/usr/bin/env bash
# A throwaway SoftHSM token for the PKCS#11 tests (go test -tags pkcs11).
#
#   eval "$(hack/softhsm.sh start)"   installs SoftHSM from Debian's packages
#                                     if it is missing, creates a fresh token
#                                     in a temporary directory, and prints the
#                                     environment the tests read, as exports
#   hack/softhsm.sh stop DIR          removes the token directory
#
# The token's user PIN is random and is written only to an owner-only file,
# whose path the tests get (TRUSTMESH_TEST_PKCS11_PIN_FILE): the PIN is
# never printed. The token is for tests alone.
set -euo pipefail

label=trustmesh-test

module() {
  local m
  for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/*/softhsm/libsofthsm2.so /usr/local/lib/softhsm/libsofthsm2.so; do
    if [ -f "$m" ]; then
      echo "$m"
      return
    fi
  done
}

install() {
  if command -v softhsm2-util >/dev/null && [ -n "$(module)" ]; then
    return
  fi
  if [ "$(id -u)" != 0 ]; then
    echo "softhsm.sh: SoftHSM is not installed; run as root or apt-get install softhsm2" >&2
    exit 1
  fi
  echo "softhsm.sh: installing SoftHSM from Debian's packages" >&2
  apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq softhsm2 >&2
  if [ -z "$(module)" ]; then
    echo "softhsm.sh: softhsm2 is installed but libsofthsm2.so was not found" >&2
    exit 1
  fi
}

case "${1:-}" in
start)
  install
  dir=$(mktemp -d "${TMPDIR:-/tmp}/trustmesh-softhsm.XXXXXX")
  mkdir -p "$dir/tokens"
  cat >"$dir/softhsm2.conf" <<EOF
directories.tokendir = $dir/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
EOF
  # A random PIN, distinctive enough that a test can search for it.
  pin=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
  so_pin=$(od -An -N8 -tx1 /dev/urandom | tr -d ' \n')
  (umask 077 && printf '%s\n' "$pin" >"$dir/pin")
  SOFTHSM2_CONF="$dir/softhsm2.conf" softhsm2-util --init-token --free --label "$label" \
    --pin "$pin" --so-pin "$so_pin" >"$dir/init.log" 2>&1 ||
    { cat "$dir/init.log" >&2; rm -rf "$dir"; exit 1; }
  echo "export SOFTHSM2_CONF='$dir/softhsm2.conf'"
  echo "export TRUSTMESH_SOFTHSM_DIR='$dir'"
  echo "export TRUSTMESH_TEST_PKCS11_MODULE='$(module)'"
  echo "export TRUSTMESH_TEST_PKCS11_TOKEN='$label'"
  echo "export TRUSTMESH_TEST_PKCS11_PIN_FILE='$dir/pin'"
  ;;
stop)
  case "${2:-}" in
  */trustmesh-softhsm.*) rm -rf "$2" ;;
  *) echo "usage: $0 stop DIR (a directory that start created)" >&2; exit 2 ;;
  esac
  ;;
*)
  echo "usage: $0 start | stop DIR" >&2
  exit 2
  ;;
esac
