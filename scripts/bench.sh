#!/usr/bin/env bash
# Benchmark: Strata's snapshot engine against a real S3 server on loopback (SeaweedFS), on an XFS
# work directory (reflink + extent maps), beside raw PUT/GET, raw disk read and restic, all in
# one run. Prints a table. Needs root (loop device, mount, dropping the page cache).
#
#   scripts/bench.sh [extra strata bench flags, e.g. --size-mib 8192]
set -euo pipefail
cd "$(dirname "$0")/.."
[ "$(id -u)" = 0 ] || { echo "run as root" >&2; exit 1; }

scripts/install-deps.sh
command -v restic >/dev/null || { apt-get update -q >/dev/null; apt-get install -y -q restic >/dev/null; }
unset AWS_CA_BUNDLE
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/strata-target}"
cargo build --release --locked -q

cache="${STRATA_CACHE_DIR:-/var/tmp/strata-cache}"
env_file="$cache/s3-bench.env"
scripts/s3-server.sh start "$env_file" >/dev/null
# shellcheck disable=SC1090
. "$env_file"

work=$(mktemp -d /var/tmp/strata-bench.XXXXXX)
img="$work/xfs.img"
mnt="$work/xfs"
dev=""
cleanup() {
  mountpoint -q "$mnt" && umount "$mnt"
  [ -n "$dev" ] && losetup -d "$dev" 2>/dev/null
  rm -rf "$work"
  scripts/s3-server.sh stop "$env_file" >/dev/null 2>&1 || true
}
trap cleanup EXIT
truncate -s 48G "$img"
dev=$(losetup --find --show "$img")
mkfs.xfs -q -f -m reflink=1 "$dev"
mkdir -p "$mnt"
mount "$dev" "$mnt"

run="bench-$(date +%s)"
"$CARGO_TARGET_DIR/release/strata" bench \
  --store "s3://$STRATA_TEST_S3_BUCKET/$run?endpoint=$STRATA_TEST_S3_ENDPOINT&path_style=true" \
  --dir "$mnt" \
  --restic-repo "s3:$STRATA_TEST_S3_ENDPOINT/$STRATA_TEST_S3_BUCKET/$run-restic" \
  "$@"
