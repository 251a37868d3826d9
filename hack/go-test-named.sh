#!/bin/sh
# go-test-named.sh NAMES PACKAGES... runs `go test -count=1 -v` on the
# packages for just the top-level tests NAMES (space-separated) and fails
# unless each of them ran and passed: a renamed or deleted test would
# otherwise match nothing, and go test passes when -run matches nothing.
# When they pass it prints each test's and package's result line (go test
# -v's logs would bury them); when not, go test's whole output without its
# === RUN/PAUSE/CONT lines.
set -eu
names=$1
shift
go=${GO:-go}
out=$(mktemp)
trap 'rm -f "$out"' EXIT
pattern="^($(echo $names | tr ' ' '|'))\$"
status=0
"$go" test -count=1 -v -run "$pattern" "$@" >"$out" 2>&1 || status=$?
if [ "$status" -ne 0 ]; then
	grep -v -E '^ *=== (RUN|PAUSE|CONT|NAME)' "$out" || true
	exit "$status"
fi
grep -E '^(--- |ok |no test files)' "$out" || true
for name in $names; do
	if ! grep -q -E "^--- PASS: $name \(" "$out"; then
		echo "go-test-named.sh: $name did not run in $*: was it renamed?" >&2
		status=1
	fi
done
exit "$status"
