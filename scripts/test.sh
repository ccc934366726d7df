#!/usr/bin/env bash
# The test suite: unit tests, then the multi-process test bed (controller + two agents over unix
# sockets and loopback, real loop devices, mkfs and mounts). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" != 0 ]; then
  echo "the tests attach loop devices and mount filesystems: run as root" >&2
  exit 1
fi
scripts/install-deps.sh
# A CA bundle set for other tools must not leak into plain-http loopback clients.
unset AWS_CA_BUNDLE
# A real S3 server on loopback (SeaweedFS), for the tests that run against S3.
env_file="${STRATA_CACHE_DIR:-/var/tmp/strata-cache}/s3-test.env"
scripts/s3-server.sh start "$env_file" >/dev/null
# shellcheck disable=SC1090
. "$env_file"
if [ -z "${STRATA_KEEP_S3:-}" ]; then
  trap 'scripts/s3-server.sh stop "$env_file" >/dev/null 2>&1 || true; rm -f "$log"' EXIT
fi
log=$(mktemp)
[ -n "${STRATA_KEEP_S3:-}" ] && trap 'rm -f "$log"' EXIT
set +e
# --no-fail-fast: one failing test binary must not hide the results of the others.
cargo test --locked --no-fail-fast "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}
set -e
# One closing line for the whole run, summed over every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed/) p += $(i-1); if ($i ~ /^failed/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$rc"
