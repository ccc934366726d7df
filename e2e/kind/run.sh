#!/usr/bin/env bash
# Creates a kind cluster (three nodes, two zones), builds and loads the Strata image, installs the
# VolumeSnapshot CRDs and snapshot-controller (pinned), an S3 server in the cluster and the chart,
# then runs the e2e suite against it. Needs docker, kind, kubectl and internet access for the
# upstream images and manifests; the development VMs of this project have none of docker or kind,
# so this script is run on a workstation or a CI runner with Docker.
#   e2e/kind/run.sh            create, install, test, delete the cluster
#   KEEP=1 e2e/kind/run.sh     keep the cluster afterwards
set -euo pipefail
cd "$(dirname "$0")/../.."
for tool in docker kind kubectl; do
  command -v "$tool" >/dev/null || { echo "e2e/kind/run.sh needs $tool" >&2; exit 1; }
done
# The snapshot-controller release the chart's sidecars match (its manifest names the same tag).
SNAPSHOTTER_VERSION=v8.6.0
IMAGE=ghcr.io/strata-csi/strata:e2e
CLUSTER=strata-e2e
export KUBECONFIG="${KUBECONFIG_E2E:-$PWD/target/kind-kubeconfig}"
mkdir -p "$(dirname "$KUBECONFIG")"

if ! kind get clusters | grep -qx "$CLUSTER"; then
  kind create cluster --config e2e/kind/cluster.yaml --kubeconfig "$KUBECONFIG"
fi
[ -n "${KEEP:-}" ] || trap 'kind delete cluster --name "$CLUSTER"' EXIT

docker build -t "$IMAGE" .
kind load docker-image --name "$CLUSTER" "$IMAGE"
# A second tag of the same image: the e2e upgrade case moves the release to it.
docker tag "$IMAGE" "${IMAGE}-upgrade"
kind load docker-image --name "$CLUSTER" "${IMAGE}-upgrade"

base="https://raw.githubusercontent.com/kubernetes-csi/external-snapshotter/$SNAPSHOTTER_VERSION"
for crd in volumesnapshotclasses volumesnapshotcontents volumesnapshots; do
  kubectl apply -f "$base/client/config/crd/snapshot.storage.k8s.io_$crd.yaml"
done
for crd in volumegroupsnapshotclasses volumegroupsnapshotcontents volumegroupsnapshots; do
  kubectl apply -f "$base/client/config/crd/groupsnapshot.storage.k8s.io_$crd.yaml"
done
kubectl apply -f "$base/deploy/kubernetes/snapshot-controller/rbac-snapshot-controller.yaml"
# The upstream manifest at a tag has named the previous patch's image: pin the tag's own, and
# enable group snapshots as the local cluster does.
curl -fsSL "$base/deploy/kubernetes/snapshot-controller/setup-snapshot-controller.yaml" |
  sed -E "s#(snapshot-controller:)v[0-9.]+#\1$SNAPSHOTTER_VERSION#" |
  kubectl apply -f -
kubectl -n kube-system patch deploy snapshot-controller --type=json \
  -p '[{"op":"add","path":"/spec/template/spec/containers/0/args/-","value":"--feature-gates=CSIVolumeGroupSnapshot=true"}]' || true

kubectl apply -f e2e/kind/s3.yaml
kubectl -n strata-s3 rollout status deploy/seaweedfs --timeout=180s
kubectl -n strata-s3 run mkbucket --rm -i --restart=Never --image=docker.io/amazon/aws-cli:2.17.0 \
  --env AWS_ACCESS_KEY_ID=strata-e2e --env AWS_SECRET_ACCESS_KEY=strata-e2e-secret-key \
  -- --endpoint-url http://s3.strata-s3:8333 s3 mb s3://strata-e2e || true

helm=$(scripts/helm.sh)
"$helm" upgrade --install strata charts/strata --namespace strata-system --create-namespace --wait \
  --set image.repository="${IMAGE%:*}" --set image.tag="${IMAGE##*:}" --set image.pullPolicy=Never \
  --set store.bucket=strata-e2e --set store.endpoint=http://s3.strata-s3:8333 --set store.pathStyle=true \
  --set store.credentials.accessKeyId=strata-e2e --set store.credentials.secretAccessKey=strata-e2e-secret-key \
  --set sidecars.snapshotter.groupSnapshots=true --set node.hydrationBandwidthMib=4

export STRATA_E2E_UPGRADE_COMMAND="$helm upgrade strata charts/strata -n strata-system --reuse-values --set image.tag=${IMAGE##*:}-upgrade --wait --timeout 5m"
cargo test --locked --test e2e -- --ignored --nocapture --test-threads=1
scripts/e2e-examples.sh strata-examples
