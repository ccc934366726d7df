#!/usr/bin/env bash
# Installs the system tools the node plugin and its tests use, when they are missing.
# The build itself needs none of them (protoc comes from a crate).
set -euo pipefail

need=()
command -v losetup    >/dev/null || need+=(util-linux)
command -v mkfs.ext4  >/dev/null || need+=(e2fsprogs)
command -v mkfs.xfs   >/dev/null || need+=(xfsprogs)
command -v xfs_growfs >/dev/null || need+=(xfsprogs)
command -v blkid      >/dev/null || need+=(util-linux)
command -v mount      >/dev/null || need+=(mount)

if [ ${#need[@]} -gt 0 ]; then
  echo "installing: ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >/dev/null
  apt-get install -y -q --no-install-recommends $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
fi
