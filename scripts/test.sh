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
cargo test --locked "$@"
