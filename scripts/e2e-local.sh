#!/usr/bin/env bash
# The Kubernetes end-to-end run on the local two-node, two-zone cluster (../shared/k8s): start the
# cluster, start SeaweedFS where pods reach it, build the image without Docker and load it, install
# the chart with the values a user of this cluster passes, run the e2e suite (e2e/main.rs), apply
# every example of deploy/examples and check that each reaches its documented state, then
# uninstall and leave nothing behind. On failure it prints the driver's and sidecars' logs and
# the objects' events. Needs root. `.ci/run` calls it.
#
#   scripts/e2e-local.sh                 everything
#   KEEP=1 scripts/e2e-local.sh          keep the cluster, the release and the S3 server afterwards
#   E2E_FILTER=NAME scripts/e2e-local.sh run only the e2e cases whose name contains NAME
#
# Settings: K8S_BUNDLE (default ../shared/k8s), STRATA_CACHE_DIR (/var/tmp/strata-cache),
# CARGO_TARGET_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
bundle=${K8S_BUNDLE:-$(cd .. && pwd)/shared/k8s}
cache=${STRATA_CACHE_DIR:-/var/tmp/strata-cache}
target_dir=${CARGO_TARGET_DIR:-$root/target}
export CARGO_TARGET_DIR=$target_dir
release=strata
ns=strata-system
examples_ns=strata-examples
# The local cluster's node-a address (on lo): pods reach it, nothing leaves the machine.
s3_bind=10.89.0.1
t0=$(date +%s)

[ "$(id -u)" = 0 ] || { echo "e2e-local.sh: run as root (the cluster and the node plugin need it)" >&2; exit 1; }
[ -x "$bundle/up.sh" ] || { echo "e2e-local.sh: no cluster bundle at $bundle (set K8S_BUNDLE)" >&2; exit 1; }
unset AWS_CA_BUNDLE

step() { printf '\n== [%4ss] %s\n' "$(( $(date +%s) - t0 ))" "$*"; }

step "cluster"
kubeconfig_line=$("$bundle/up.sh" | tail -n1)
export "${kubeconfig_line?}"
export KUBECONFIG
export PATH="${K8S_LOCAL_DIR:-/var/tmp/k8s-local}/bin:$PATH"
kubectl get nodes -L topology.kubernetes.io/zone

s3_env="$cache/s3-e2e.env"
helm=$(scripts/helm.sh)

diagnose() {
  set +e
  echo "==== diagnostics"
  kubectl get pods,pvc,pv,volumesnapshot,volumesnapshotcontent -A -o wide 2>&1 | grep -v '^kube-system.*snapshot-controller' | head -100
  for pod in $(kubectl -n "$ns" get pods -o name 2>/dev/null); do
    for c in $(kubectl -n "$ns" get "$pod" -o jsonpath='{.spec.initContainers[*].name} {.spec.containers[*].name}'); do
      echo "---- logs $pod -c $c (last 60 lines)"
      kubectl -n "$ns" logs "$pod" -c "$c" --tail=60 2>&1
    done
  done
  echo "---- snapshot-controller (last 40 lines)"
  kubectl -n kube-system logs deploy/snapshot-controller --tail=40 2>&1
  echo "---- events"
  kubectl get events -A --sort-by=.lastTimestamp 2>&1 | grep -v ' Normal ' | tail -60
  echo "---- S3 server log (last 20 lines)"
  [ -f "$s3_env" ] && . "$s3_env" && tail -n 20 "$STRATA_S3_SERVER_DIR/weed.log" 2>&1
}

cleanup() {
  local rc=$?
  set +e
  [ "$rc" = 0 ] || diagnose
  if [ -n "${KEEP:-}" ]; then
    echo "KEEP=1: cluster, release and S3 server left running (KUBECONFIG=$KUBECONFIG)"
    exit "$rc"
  fi
  step "uninstall"
  kubectl delete namespace "$examples_ns" --ignore-not-found --wait=true --timeout=180s >/dev/null
  kubectl delete volumesnapshotclass strata-tagged strata-fast-restore --ignore-not-found >/dev/null
  kubectl delete volumegroupsnapshotclass strata-group --ignore-not-found >/dev/null 2>&1
  kubectl delete storageclass strata-xfs --ignore-not-found >/dev/null
  "$helm" uninstall "$release" -n "$ns" --wait --timeout 180s >/dev/null
  kubectl delete namespace "$ns" --ignore-not-found --wait=true --timeout=120s >/dev/null
  scripts/s3-server.sh stop "$s3_env" >/dev/null 2>&1
  "$bundle/down.sh" >/dev/null 2>&1
  # The storage directories the chart made shared, and what the driver left in them.
  for d in /var/lib/strata-node-a /var/lib/strata-node-b; do
    while mountpoint -q "$d" 2>/dev/null; do umount -l "$d"; done
    rm -rf "$d"
  done
  leftovers=$(losetup -l -n -O BACK-FILE 2>/dev/null | grep -c '/var/lib/strata-node-' || true)
  [ "$leftovers" = 0 ] || { echo "e2e-local.sh: $leftovers loop devices left behind" >&2; rc=1; }
  step "done (exit $rc)"
  exit "$rc"
}
trap cleanup EXIT

step "S3 server on $s3_bind"
STRATA_S3_BIND=$s3_bind scripts/s3-server.sh start "$s3_env" >/dev/null
# shellcheck disable=SC1090
. "$s3_env"

step "image"
tag1="e2e-$(date +%s)"
tag2="$tag1-upgrade"
image_out="$target_dir/strata-image.tar"
scripts/image.sh --tag "ghcr.io/strata-csi/strata:$tag1" --out "$image_out"
"$bundle/load-image.sh" "$image_out" >/dev/null
# The same binary under a second tag: what `helm upgrade` to a new release looks like to the
# kubelet (a new image reference, new pods).
scripts/image.sh --binary "$target_dir/release/strata" --tag "ghcr.io/strata-csi/strata:$tag2" --out "$image_out" >/dev/null
"$bundle/load-image.sh" "$image_out" >/dev/null
rm -f "$image_out"

step "helm install"
# The values a user of this cluster passes: the image, the store, and the second kubelet (node-b
# runs its kubelet from /var/lib/kubelet-node-b) as an additional node DaemonSet. Both nodes share
# one host here, so each gets its own storage directory; the host has no systemd, so they are
# made shared mounts first, as the README tells users of such hosts. Background hydration is capped (on-demand reads are
# not) so that the upgrade case finds a volume still restoring.
values=(
  --set image.repository=ghcr.io/strata-csi/strata --set image.tag="$tag1" --set image.pullPolicy=Never
  --set store.bucket="$STRATA_TEST_S3_BUCKET" --set store.endpoint="$STRATA_TEST_S3_ENDPOINT"
  --set store.pathStyle=true --set store.prefix=e2e
  --set store.credentials.accessKeyId="$AWS_ACCESS_KEY_ID"
  --set store.credentials.secretAccessKey="$AWS_SECRET_ACCESS_KEY"
  --set node.storageDir=/var/lib/strata-node-a
  --set node.nodeSelector."kubernetes\.io/hostname"=node-a
  --set node.additionalDaemonSets.b.kubeletDir=/var/lib/kubelet-node-b
  --set node.additionalDaemonSets.b.storageDir=/var/lib/strata-node-b
  --set node.additionalDaemonSets.b.nodeSelector."kubernetes\.io/hostname"=node-b
  --set sidecars.snapshotter.groupSnapshots=true
  --set node.hydrationBandwidthMib=4
  --set logFormat=text
)
for d in /var/lib/strata-node-a /var/lib/strata-node-b; do
  mkdir -p "$d"
  mountpoint -q "$d" || mount --bind "$d" "$d"
  mount --make-rshared "$d"
done
start=$(date +%s)
"$helm" upgrade --install "$release" charts/strata -n "$ns" --create-namespace --wait --timeout 5m "${values[@]}"
echo "helm install --wait returned after $(( $(date +%s) - start )) s (its post-install hook waits for every driver pod)"
kubectl -n "$ns" get pods -o wide
# helm returned: every driver pod must be ready right now, every container running.
not_ready=$(kubectl -n "$ns" get pods -l 'app.kubernetes.io/component in (controller,node)' -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.status.containerStatuses[*].ready}{"\n"}{end}' | grep -c false || true)
[ "$not_ready" = 0 ] || { echo "helm reported deployed with containers not ready" >&2; exit 1; }

step "e2e suite"
export STRATA_E2E_UPGRADE_COMMAND="'$helm' upgrade $release '$root/charts/strata' -n $ns --reuse-values --set image.tag=$tag2 --wait --timeout 5m"
filter=()
[ -z "${E2E_FILTER:-}" ] || filter=("$E2E_FILTER")
cargo test --locked --test e2e -- --ignored --nocapture --test-threads=1 "${filter[@]}"

step "examples"
scripts/e2e-examples.sh "$examples_ns"
