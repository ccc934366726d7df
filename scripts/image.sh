#!/usr/bin/env bash
# Builds the Strata image without Docker: the same layout as the Dockerfile (a stripped release
# binary at /usr/local/bin/strata on a Debian bookworm runtime holding only the tools the node
# plugin drives), as an image tarball that containerd (`ctr import`), docker and podman load.
#
#   scripts/image.sh [--tag NAME:TAG] [--out FILE] [--binary PATH]
#
# --tag     image name (default ghcr.io/strata-csi/strata:<Cargo version>)
# --out     tarball to write (default $CARGO_TARGET_DIR/strata-image.tar)
# --binary  use this binary instead of building the release one
#
# The runtime root (mmdebstrap, minbase variant, docs, man pages and locales left out by dpkg
# path excludes) is cached in $STRATA_CACHE_DIR (default /var/tmp/strata-cache) by its package
# list, so a rebuild after a code change only repacks. The image tarball is written by the
# single-layer image writer of the local Kubernetes bundle (../shared/k8s/mkimage.py, or
# $K8S_BUNDLE/mkimage.py). Prints the image's name and size on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
tag="ghcr.io/strata-csi/strata:$version"
target_dir=${CARGO_TARGET_DIR:-$PWD/target}
out="$target_dir/strata-image.tar"
binary=""
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) tag=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --binary) binary=$2; shift 2 ;;
    *) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "$0" >&2; exit 2 ;;
  esac
done

bundle=${K8S_BUNDLE:-$(cd .. && pwd)/shared/k8s}
[ -f "$bundle/mkimage.py" ] || { echo "image.sh: $bundle/mkimage.py not found (set K8S_BUNDLE)" >&2; exit 1; }

# The runtime's packages: what the node plugin runs (losetup, mount, blkid, fsfreeze, nsenter,
# mkfs/fsck/resize for ext4 and xfs, cp for copies) and CA certificates for S3 over TLS. The same
# list as the Dockerfile's runtime stage.
packages=ca-certificates,e2fsprogs,xfsprogs,util-linux,mount,coreutils
cache=${STRATA_CACHE_DIR:-/var/tmp/strata-cache}
# What the runtime never runs, pulled in by the packages' dependencies: Python and ICU (xfsprogs'
# xfs_scrub helpers), Perl beyond perl-base, apt and the TLS stack only apt uses, iconv modules,
# and debconf's caches.
purge="python3 python3-minimal python3.11 python3.11-minimal libpython3-stdlib libpython3.11-minimal
  libpython3.11-stdlib perl perl-modules-5.36 libperl5.36 libfile-find-rule-perl libnumber-compare-perl
  libtext-glob-perl libicu72 libsqlite3-0 apt libapt-pkg6.0 libgnutls30 libp11-kit0 libtasn1-6"
key=$(printf '%s bookworm minbase %s v2' "$packages" "$purge" | sha256sum | cut -c1-12)
rootfs="$cache/image-rootfs-$key"

if [ ! -f "$rootfs.complete" ]; then
  command -v mmdebstrap >/dev/null || {
    echo "image.sh: installing mmdebstrap" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >/dev/null
    apt-get install -y -q --no-install-recommends mmdebstrap >/dev/null
  }
  rm -rf "$rootfs" "$rootfs.tmp" "$rootfs.complete"
  mkdir -p "$cache"
  echo "image.sh: building the runtime root (mmdebstrap, about a minute)" >&2
  excludes=()
  for p in '/usr/share/doc/*' '/usr/share/man/*' '/usr/share/info/*' '/usr/share/locale/*' \
           '/usr/share/lintian/*' '/usr/share/linda/*' '/usr/share/zoneinfo/*' '/usr/share/common-licenses/*'; do
    excludes+=(--dpkgopt="path-exclude=$p")
  done
  # Copyright files stay: the licences of what the image ships.
  excludes+=(--dpkgopt='path-include=/usr/share/doc/*/copyright')
  mmdebstrap --variant=minbase --include="$packages" "${excludes[@]}" \
    --customize-hook="chroot \"\$1\" dpkg --purge --force-depends --force-remove-essential $(echo $purge) >/dev/null 2>&1 || chroot \"\$1\" dpkg --purge --force-depends --force-remove-essential $(echo $purge) >/dev/null" \
    --customize-hook='rm -rf "$1"/var/lib/apt "$1"/var/cache/* "$1"/var/log/* "$1"/usr/lib/x86_64-linux-gnu/gconv' \
    bookworm "$rootfs.tmp" "deb http://deb.debian.org/debian bookworm main" </dev/null >&2
  mv "$rootfs.tmp" "$rootfs"
  touch "$rootfs.complete"
fi

if [ -z "$binary" ]; then
  cargo build --release --locked >&2
  binary="$target_dir/release/strata"
fi
# The release profile drops debug info; the image also drops the symbol table (47 MiB -> 32 MiB).
stripped=$(mktemp)
trap 'rm -f "$stripped"' EXIT
cp "$binary" "$stripped"
strip --strip-all "$stripped"
chmod 755 "$stripped"

mkdir -p "$(dirname "$out")"
python3 "$bundle/mkimage.py" "$rootfs" "$tag" "$out" \
  --add "$stripped:/usr/local/bin/strata" \
  --entrypoint /usr/local/bin/strata --user 65532:65532 \
  --label "org.opencontainers.image.title=strata" \
  --label "org.opencontainers.image.version=$version" >&2
size_mib=$(( $(stat -c %s "$out") / 1048576 ))
echo "image $tag: $out, $size_mib MiB (binary $(( $(stat -c %s "$stripped") / 1048576 )) MiB)"
