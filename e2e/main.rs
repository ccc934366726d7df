//! End-to-end suite against a real cluster (`KUBECONFIG`) with Strata installed, the
//! VolumeSnapshot CRDs and the snapshot-controller: provision, write in a pod, snapshot, change,
//! snapshot again, restore each into a new PVC and check the data in pods (sha256), delete the
//! first snapshot and restore the second again, restore on another node, and (nodes in two zones)
//! restore a fast-restore snapshot in and out of its zone. Everything is made in a
//! fresh namespace that is deleted at the end, also when a step fails.
//!
//! Run: `cargo test --test e2e -- --ignored --nocapture` (e2e/kind/run.sh does it on kind).
//! Settings: STRATA_E2E_STORAGE_CLASS (default `strata`), STRATA_E2E_SNAPSHOT_CLASS (`strata`),
//! STRATA_E2E_IMAGE (a busybox image, default `busybox:1.36`), STRATA_E2E_TIMEOUT_SECONDS (300).

use std::future::Future;
use std::time::{Duration, Instant};

use futures::FutureExt;
use k8s_openapi::api::core::v1::{Namespace, Node, PersistentVolumeClaim, Pod};
use kube::api::{Api, DeleteParams, DynamicObject, GroupVersionKind, PostParams};
use kube::discovery::ApiResource;
use kube::Client;
use serde_json::json;

fn setting(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

fn timeout() -> Duration {
    Duration::from_secs(
        setting("STRATA_E2E_TIMEOUT_SECONDS", "300")
            .parse()
            .unwrap_or(300),
    )
}

fn snapshot_api(client: &Client, ns: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot");
    Api::namespaced_with(client.clone(), ns, &ApiResource::from_gvk(&gvk))
}

async fn wait_for<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<bool>>,
{
    let deadline = Instant::now() + timeout();
    loop {
        if check().await? {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

struct Suite {
    client: Client,
    ns: String,
}

impl Suite {
    fn pvcs(&self) -> Api<PersistentVolumeClaim> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    async fn pvc(&self, name: &str, source: Option<serde_json::Value>) -> anyhow::Result<()> {
        let mut spec = json!({
            "storageClassName": setting("STRATA_E2E_STORAGE_CLASS", "strata"),
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": "1Gi"}},
        });
        if let Some(s) = source {
            spec["dataSource"] = s;
        }
        let pvc: PersistentVolumeClaim =
            serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec}))?;
        self.pvcs().create(&PostParams::default(), &pvc).await?;
        Ok(())
    }

    /// Runs `script` in a pod with `pvc` at /data, optionally placed by `place` (label key,
    /// operator, value); waits for success and returns the node it ran on.
    async fn run(
        &self,
        name: &str,
        pvc: &str,
        script: &str,
        place: Option<(&str, &str, &str)>,
    ) -> anyhow::Result<String> {
        let mut spec = json!({
            "restartPolicy": "Never",
            "containers": [{
                "name": "c", "image": setting("STRATA_E2E_IMAGE", "busybox:1.36"),
                "command": ["sh", "-c", script],
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            }],
            "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": pvc}}],
        });
        if let Some((key, op, value)) = place {
            spec["affinity"] = json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": key, "operator": op, "values": [value]}]}]}}});
        }

        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec}))?;
        self.pods().create(&PostParams::default(), &pod).await?;
        let pods = self.pods();
        wait_for(&format!("pod {name}"), || {
            let pods = pods.clone();
            let name = name.to_string();
            async move {
                let p = pods.get(&name).await?;
                match p.status.and_then(|s| s.phase).as_deref() {
                    Some("Succeeded") => Ok(true),
                    Some("Failed") => {
                        let logs = pods.logs(&name, &Default::default()).await.unwrap_or_default();
                        anyhow::bail!("pod {name} failed: {logs}")
                    }
                    _ => Ok(false),
                }
            }
        })
        .await?;
        let p = self.pods().get(name).await?;
        Ok(p.spec.and_then(|s| s.node_name).unwrap_or_default())
    }

    async fn snapshot(&self, name: &str, pvc: &str) -> anyhow::Result<()> {
        self.snapshot_with(name, pvc, &setting("STRATA_E2E_SNAPSHOT_CLASS", "strata"))
            .await
    }

    async fn snapshot_with(&self, name: &str, pvc: &str, class: &str) -> anyhow::Result<()> {
        let api = snapshot_api(&self.client, &self.ns);
        let gvk = GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshot");
        let mut obj = DynamicObject::new(name, &ApiResource::from_gvk(&gvk));
        obj.data = json!({"spec": {
            "volumeSnapshotClassName": class,
            "source": {"persistentVolumeClaimName": pvc}}});
        api.create(&PostParams::default(), &obj).await?;
        wait_for(&format!("snapshot {name} ready"), || {
            let api = api.clone();
            let name = name.to_string();
            async move {
                let s = api.get(&name).await?;
                if let Some(e) = s.data.pointer("/status/error/message").and_then(|m| m.as_str()) {
                    println!("  snapshot {name}: {e}");
                }
                Ok(s.data.pointer("/status/readyToUse").and_then(|v| v.as_bool()) == Some(true))
            }
        })
        .await
    }

    async fn delete_snapshot(&self, name: &str) -> anyhow::Result<()> {
        snapshot_api(&self.client, &self.ns)
            .delete(name, &DeleteParams::default())
            .await?;
        Ok(())
    }
}

fn from_snapshot(name: &str) -> serde_json::Value {
    json!({"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": name})
}

const WRITE_1: &str =
    "head -c 33554432 /dev/urandom > /data/a && cd /data && sha256sum a > /data/sums-1 && sync";
const WRITE_2: &str =
    "head -c 1048576 /dev/urandom | dd of=/data/a bs=1M seek=3 conv=notrunc,fsync && echo two > /data/b && cd /data && sha256sum a b > /data/sums-2 && sync";

async fn flow(s: &Suite) -> anyhow::Result<()> {
    println!("namespace {}", s.ns);
    s.pvc("data", None).await?;
    let writer_node = s.run("write-1", "data", WRITE_1, None).await?;
    println!("wrote 32 MiB on {writer_node}");
    s.snapshot("snap-1", "data").await?;
    s.run("write-2", "data", WRITE_2, None).await?;
    s.snapshot("snap-2", "data").await?;
    println!("two snapshots ready");
    for (pvc, snap, check) in [
        ("r1", "snap-1", "cd /data && sha256sum -c sums-1 && test ! -e b"),
        ("r2", "snap-2", "cd /data && sha256sum -c sums-2"),
    ] {
        s.pvc(pvc, Some(from_snapshot(snap))).await?;
        let node = s.run(&format!("check-{pvc}"), pvc, check, None).await?;
        println!("restored {snap} on {node}: checksums match");
    }
    s.delete_snapshot("snap-1").await?;
    s.pvc("r3", Some(from_snapshot("snap-2"))).await?;
    s.run("check-r3", "r3", "cd /data && sha256sum -c sums-2", None)
        .await?;
    println!("deleted snap-1; snap-2 still restores");
    let nodes: Api<Node> = Api::all(s.client.clone());
    let schedulable = nodes
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter(|n| !n.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false))
        .count();
    if schedulable > 1 {
        s.pvc("r4", Some(from_snapshot("snap-2"))).await?;
        let node = s
            .run(
                "check-r4",
                "r4",
                "cd /data && sha256sum -c sums-2",
                Some(("kubernetes.io/hostname", "NotIn", writer_node.as_str())),
            )
            .await?;
        anyhow::ensure!(node != writer_node, "the restore ran on the writer's node");
        println!("restored snap-2 on another node ({node})");
    } else {
        println!("one schedulable node: the restore-on-another-node step is skipped");
    }
    fast_restore(s, &nodes).await
}

fn fsr_class(ns: &str) -> String {
    format!("{ns}-fast-restore")
}

fn class_api(client: &Client) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshotClass");
    Api::all_with(client.clone(), &ApiResource::from_gvk(&gvk))
}

/// With nodes in two zones: a snapshot of a fast-restore class restored in its zone and outside.
async fn fast_restore(s: &Suite, nodes: &Api<Node>) -> anyhow::Result<()> {
    const ZONE: &str = "topology.kubernetes.io/zone";
    let mut zones: Vec<String> = nodes
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter_map(|n| n.metadata.labels.and_then(|l| l.get(ZONE).cloned()))
        .collect();
    zones.sort();
    zones.dedup();
    if zones.len() < 2 {
        println!("nodes carry fewer than two zones: the fast-restore step is skipped");
        return Ok(());
    }
    let (fast, other) = (&zones[0], &zones[1]);
    let gvk = GroupVersionKind::gvk("snapshot.storage.k8s.io", "v1", "VolumeSnapshotClass");
    let mut class = DynamicObject::new(&fsr_class(&s.ns), &ApiResource::from_gvk(&gvk));
    class.data = json!({"driver": "strata.csi.dev", "deletionPolicy": "Delete", "parameters": {"fastRestoreZones": fast}});
    class_api(&s.client)
        .create(&PostParams::default(), &class)
        .await?;
    s.snapshot_with("snap-fast", "data", &fsr_class(&s.ns)).await?;
    for (pvc, zone) in [("fast-in", fast), ("fast-out", other)] {
        s.pvc(pvc, Some(from_snapshot("snap-fast"))).await?;
        let node = s
            .run(
                &format!("check-{pvc}"),
                pvc,
                "cd /data && sha256sum -c sums-2",
                Some((ZONE, "In", zone.as_str())),
            )
            .await?;
        println!("fast-restore snapshot restored in {zone} ({node}): checksums match");
    }
    Ok(())
}

#[tokio::test]
#[ignore = "needs a cluster with Strata installed (KUBECONFIG)"]
async fn snapshots_restore_across_nodes() {
    let client = Client::try_default().await.expect("KUBECONFIG names a cluster");
    let ns = format!(
        "strata-e2e-{}",
        uuid::Uuid::new_v4().simple().to_string().split_at(8).0
    );
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let nsobj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}})).unwrap();
    namespaces.create(&PostParams::default(), &nsobj).await.unwrap();
    let suite = Suite {
        client: client.clone(),
        ns: ns.clone(),
    };
    let result = std::panic::AssertUnwindSafe(flow(&suite)).catch_unwind().await;
    // Cleanup whatever happened: the namespace takes its PVCs, pods and snapshots with it.
    let _ = namespaces.delete(&ns, &DeleteParams::default()).await;
    let _ = class_api(&client)
        .delete(&fsr_class(&ns), &DeleteParams::default())
        .await;
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("e2e failed in namespace {ns}: {e:#}"),
        Err(p) => std::panic::resume_unwind(p),
    }
}
