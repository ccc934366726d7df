#!/usr/bin/env bash
# Applies every example of deploy/examples in the order of the README's walkthrough, in namespace
# NS, and checks that each reaches the state the README documents, printing how long each took.
# Needs kubectl with a KUBECONFIG for a cluster with Strata installed (release `strata` in
# strata-system, group snapshots enabled). scripts/e2e-local.sh calls it.
#
#   scripts/e2e-examples.sh [NS]      (default strata-examples; the namespace is created)
set -euo pipefail
cd "$(dirname "$0")/.."
ns=${1:-strata-examples}
ex=deploy/examples
k() { kubectl -n "$ns" "$@"; }
t0=$(date +%s)
ok() { printf '  ok [%3ss] %s\n' "$(( $(date +%s) - t0 ))" "$*"; t0=$(date +%s); }
fail() { echo "  FAILED: $*" >&2; k get pods,pvc,volumesnapshot -o wide >&2 || true; exit 1; }

# wait_jsonpath WHAT OBJECT JSONPATH VALUE [SECONDS]
wait_jsonpath() {
  local what=$1 obj=$2 path=$3 want=$4 secs=${5:-300} got=""
  for _ in $(seq "$secs"); do
    got=$(k get "$obj" -o jsonpath="$path" 2>/dev/null || true)
    [ "$got" = "$want" ] && return 0
    sleep 1
  done
  fail "$what: $obj $path is '$got', expected '$want'"
}

kubectl create namespace "$ns" --dry-run=client -o yaml | kubectl apply -f - >/dev/null

echo "01 storage class"
kubectl apply -f $ex/01-storageclass.yaml >/dev/null
kubectl get storageclass strata-xfs >/dev/null || fail "no StorageClass strata-xfs"
ok "StorageClass strata-xfs (xfs, WaitForFirstConsumer)"

echo "02 claims"
k apply -f $ex/02-pvc.yaml >/dev/null
sleep 2
for pvc in data data-block; do
  [ "$(k get pvc $pvc -o jsonpath='{.status.phase}')" = Pending ] || fail "$pvc is not Pending before a consumer"
done
k get events --field-selector involvedObject.name=data -o jsonpath='{.items[*].reason}' | grep -q WaitForFirstConsumer \
  || fail "no WaitForFirstConsumer event on data"
ok "data and data-block Pending, waiting for first consumer"

echo "03 pods"
k apply -f $ex/03-pod.yaml >/dev/null
wait_jsonpath "writer" pvc/data '{.status.phase}' Bound
wait_jsonpath "writer" pod/writer '{.status.phase}' Running
wait_jsonpath "writer-block" pod/writer-block '{.status.phase}' Running
for _ in $(seq 120); do k exec writer -- test -s /data/file.sha256 2>/dev/null && break; sleep 1; done
k exec writer -- test -s /data/file.sha256 || fail "writer did not write its checksum"
node=$(k get pod writer -o jsonpath='{.spec.nodeName}')
affinity=$(k get pv "$(k get pvc data -o jsonpath='{.spec.volumeName}')" -o jsonpath='{.spec.nodeAffinity.required}')
echo "$affinity" | grep -q "\"$node\"" || fail "the PV's node affinity does not name $node: $affinity"
ok "PVCs Bound, PV pinned to node $node, writer wrote 64 MiB and its checksum"

echo "04-05 snapshot"
kubectl apply -f $ex/04-volumesnapshotclass.yaml >/dev/null
k apply -f $ex/05-volumesnapshot.yaml >/dev/null
wait_jsonpath "snapshot" volumesnapshot/data-snap-1 '{.status.readyToUse}' true
size=$(k get volumesnapshot data-snap-1 -o jsonpath='{.status.restoreSize}')
[ "$size" = 1Gi ] || fail "restoreSize is $size, expected the volume's 1Gi"
ok "data-snap-1 readyToUse=true, restoreSize $size"

echo "06 restore"
k apply -f $ex/06-restore.yaml >/dev/null
wait_jsonpath "restore" pod/reader '{.status.phase}' Succeeded
ok "data-restored Bound, reader Completed (checksum matches) on $(k get pod reader -o jsonpath='{.spec.nodeName}')"

echo "07 clone"
k apply -f $ex/07-clone.yaml >/dev/null
wait_jsonpath "clone" pod/clone-reader '{.status.phase}' Succeeded
clone_node=$(k get pod clone-reader -o jsonpath='{.spec.nodeName}')
[ "$clone_node" = "$node" ] || fail "the clone's reader ran on $clone_node, the source is on $node"
ok "data-clone Bound on the source's node $clone_node, checksum matches"

echo "08 fast restore"
kubectl apply -f $ex/08-fast-restore-class.yaml >/dev/null
cat <<EOF | k apply -f - >/dev/null
apiVersion: snapshot.storage.k8s.io/v1
kind: VolumeSnapshot
metadata: {name: data-snap-fast}
spec:
  volumeSnapshotClassName: strata-fast-restore
  source: {persistentVolumeClaimName: data}
EOF
wait_jsonpath "fast-restore snapshot" volumesnapshot/data-snap-fast '{.status.readyToUse}' true
content=$(k get volumesnapshot data-snap-fast -o jsonpath='{.status.boundVolumeSnapshotContentName}')
handle=$(kubectl get volumesnapshotcontent "$content" -o jsonpath='{.status.snapshotHandle}')
state=""
for _ in $(seq 120); do
  state=$(kubectl -n strata-system exec deploy/strata-controller -c strata -- strata fsr status "$handle" 2>&1 || true)
  echo "$state" | grep -q 'zone-a.*enabled' && break
  sleep 1
done
echo "$state" | grep -q 'zone-a.*enabled' || fail "fast restore never enabled in zone-a: $state"
ok "data-snap-fast ready; strata fsr status: enabled in zone-a"

echo "09 group snapshot"
k apply -f $ex/09-volumegroupsnapshot.yaml >/dev/null
wait_jsonpath "group writer" pod/db '{.status.phase}' Running
wait_jsonpath "group snapshot" volumegroupsnapshot/db-group-1 '{.status.readyToUse}' true
# The snapshot-controller creates the member VolumeSnapshots after it marks the group ready, one
# at a time: wait for both rather than read them once.
members=0
for _ in $(seq 60); do
  members=$(k get volumesnapshot -o jsonpath='{range .items[*]}{.status.volumeGroupSnapshotName}{" "}{.status.readyToUse}{"\n"}{end}' | grep -c '^db-group-1 true$' || true)
  [ "$members" = 2 ] && break
  sleep 1
done
[ "$members" = 2 ] || fail "expected 2 ready member snapshots, found $members"
ok "db-group-1 readyToUse=true with 2 ready member VolumeSnapshots"

echo "10 encrypted snapshot"
# The key Secret, as the example's header says to make it (kept out of the example file).
kubectl -n strata-system create secret generic strata-encryption-key \
  --from-literal=encryptionKey="$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" --dry-run=client -o yaml | kubectl apply -f - >/dev/null
k apply -f $ex/10-encrypted.yaml >/dev/null
wait_jsonpath "encrypted snapshot" volumesnapshot/data-snap-encrypted '{.status.readyToUse}' true
content=$(k get volumesnapshot data-snap-encrypted -o jsonpath='{.status.boundVolumeSnapshotContentName}')
handle=$(kubectl get volumesnapshotcontent "$content" -o jsonpath='{.status.snapshotHandle}')
shown=$(kubectl -n strata-system exec deploy/strata-controller -c strata -- strata snapshot show "$handle" 2>&1) \
  || fail "strata snapshot show $handle: $shown"
echo "$shown" | grep -q 'encryption *aes-256-gcm' || fail "the snapshot is not encrypted: $shown"
wait_jsonpath "encrypted restore" pod/reader-encrypted '{.status.phase}' Succeeded
# Through a class without the key: refused, and the claim says why (a pod makes the
# WaitForFirstConsumer provisioner try).
k apply -f - >/dev/null <<'YAML'
apiVersion: v1
kind: PersistentVolumeClaim
metadata: {name: data-restored-nokey}
spec:
  storageClassName: strata
  dataSource: {apiGroup: snapshot.storage.k8s.io, kind: VolumeSnapshot, name: data-snap-encrypted}
  accessModes: [ReadWriteOnce]
  resources: {requests: {storage: 1Gi}}
---
apiVersion: v1
kind: Pod
metadata: {name: reader-nokey}
spec:
  restartPolicy: Never
  containers: [{name: r, image: busybox:1.36, command: [sh, -c, "true"], volumeMounts: [{name: d, mountPath: /data}]}]
  volumes: [{name: d, persistentVolumeClaim: {claimName: data-restored-nokey}}]
YAML
said=""
for _ in $(seq 120); do
  said=$(k get events --field-selector involvedObject.name=data-restored-nokey,reason=ProvisioningFailed \
    -o jsonpath='{.items[*].message}' 2>/dev/null || true)
  echo "$said" | grep -q 'is encrypted' && break
  sleep 1
done
echo "$said" | grep -q 'is encrypted' || fail "no ProvisioningFailed event saying the snapshot is encrypted: $said"
[ "$(k get pvc data-restored-nokey -o jsonpath='{.status.phase}')" = Pending ] || fail "the claim without the key is not Pending"
ok "data-snap-encrypted ready (aes-256-gcm), restored through strata-encrypted, checksum matches; through strata: Pending, ProvisioningFailed 'is encrypted'"

echo "delete"
k delete volumesnapshot data-snap-1 --wait=true --timeout=60s >/dev/null
k get volumesnapshot data-snap-1 >/dev/null 2>&1 && fail "data-snap-1 still exists"
ok "data-snap-1 deleted"

echo "cleanup"
kubectl delete namespace "$ns" --wait=true --timeout=300s >/dev/null
kubectl delete -f $ex/01-storageclass.yaml -f $ex/04-volumesnapshotclass.yaml -f $ex/08-fast-restore-class.yaml >/dev/null
kubectl delete volumesnapshotclass strata-encrypted --ignore-not-found >/dev/null
kubectl delete storageclass strata-encrypted --ignore-not-found >/dev/null
kubectl -n strata-system delete secret strata-encryption-key --ignore-not-found >/dev/null
kubectl delete volumegroupsnapshotclass strata-group --ignore-not-found >/dev/null
ok "examples removed"
