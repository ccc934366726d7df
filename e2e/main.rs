//! End-to-end suite against a real cluster (`KUBECONFIG`) with Strata installed, the
//! VolumeSnapshot and VolumeGroupSnapshot CRDs and the snapshot-controller. Every case works in
//! a fresh namespace deleted at the end, also when a step fails, and checks data by checksum in
//! pods. A case that cannot run on the cluster at hand (one node, one zone, no group snapshot
//! CRDs, no upgrade command) fails: nothing is skipped.
//!
//! Run: `cargo test --test e2e -- --ignored --nocapture --test-threads=1`
//! (`scripts/e2e-local.sh` does it on the local two-zone cluster, `e2e/kind/run.sh` on kind).
//! Settings: STRATA_E2E_STORAGE_CLASS (default `strata`), STRATA_E2E_SNAPSHOT_CLASS (`strata`),
//! STRATA_E2E_IMAGE (a busybox image, default `busybox:1.36`), STRATA_E2E_TIMEOUT_SECONDS (300),
//! STRATA_E2E_UPGRADE_COMMAND (a shell command that upgrades the driver to a new image, for
//! example `helm upgrade strata charts/strata --reuse-values --set image.tag=NEW --wait`).

use std::future::Future;
use std::time::{Duration, Instant};

use futures::FutureExt;
use k8s_openapi::api::core::v1::{Namespace, Node, PersistentVolumeClaim, Pod};
use k8s_openapi::api::storage::v1::StorageClass;
use kube::api::{
    Api, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams, PostParams,
};
use kube::discovery::ApiResource;
use kube::Client;
use serde_json::{json, Value};

const DRIVER: &str = "strata.csi.dev";
const ZONE: &str = "topology.kubernetes.io/zone";
const HOSTNAME: &str = "kubernetes.io/hostname";

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

fn gvk(group: &str, kind: &str) -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(group, "v1", kind))
}

fn snapshots_ar() -> ApiResource {
    gvk("snapshot.storage.k8s.io", "VolumeSnapshot")
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
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// The (VolumeSnapshot, source PVC) pairs among `items` that are members of `group`.
fn members_of(items: Vec<DynamicObject>, group: &str) -> Vec<(String, String)> {
    items
        .into_iter()
        .filter(|v| {
            v.data
                .pointer("/status/volumeGroupSnapshotName")
                .and_then(Value::as_str)
                == Some(group)
        })
        .map(|v| {
            let pvc = v
                .data
                .pointer("/spec/source/persistentVolumeClaimName")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_owned();
            (v.metadata.name.unwrap_or_default(), pvc)
        })
        .collect()
}

/// Where a pod must (or must not) run.
#[derive(Clone, Copy)]
enum Place<'a> {
    Anywhere,
    In(&'a str, &'a str),
    NotIn(&'a str, &'a str),
}

/// How a pod reaches its volume.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Fs,
    Block,
}

struct Suite {
    client: Client,
    ns: String,
    /// Cluster-scoped objects this case made, deleted at the end: (resource, name).
    cluster_objects: std::sync::Mutex<Vec<(ApiResource, String)>>,
}

impl Suite {
    async fn new(case: &str) -> anyhow::Result<Self> {
        // The binary under test installs a rustls provider in main; a test process must too.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = Client::try_default().await?;
        let ns = format!(
            "e2e-{case}-{}",
            uuid::Uuid::new_v4().simple().to_string().split_at(6).0
        );
        let nsobj: Namespace = serde_json::from_value(json!({"metadata": {"name": ns}}))?;
        Api::<Namespace>::all(client.clone())
            .create(&PostParams::default(), &nsobj)
            .await?;
        println!("[{case}] namespace {ns}");
        Ok(Self {
            client,
            ns,
            cluster_objects: Default::default(),
        })
    }

    async fn cleanup(&self) {
        let _ = Api::<Namespace>::all(self.client.clone())
            .delete(&self.ns, &DeleteParams::default())
            .await;
        let objects = std::mem::take(&mut *self.cluster_objects.lock().unwrap());
        for (ar, name) in objects {
            let _ = Api::<DynamicObject>::all_with(self.client.clone(), &ar)
                .delete(&name, &DeleteParams::default())
                .await;
        }
        // Wait until the namespace (and so every PVC, snapshot and volume in it) is gone, so the
        // next case and the uninstall start from a clean driver.
        let nss = Api::<Namespace>::all(self.client.clone());
        let deadline = Instant::now() + timeout();
        while Instant::now() < deadline && nss.get_opt(&self.ns).await.ok().flatten().is_some() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    fn pvcs(&self) -> Api<PersistentVolumeClaim> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.ns)
    }

    fn dynamic(&self, ar: &ApiResource) -> Api<DynamicObject> {
        Api::namespaced_with(self.client.clone(), &self.ns, ar)
    }

    /// Creates a cluster-scoped object and remembers it for cleanup.
    async fn create_cluster_object(&self, ar: ApiResource, name: &str, data: Value) -> anyhow::Result<()> {
        let mut obj = DynamicObject::new(name, &ar);
        obj.data = data;
        Api::<DynamicObject>::all_with(self.client.clone(), &ar)
            .create(&PostParams::default(), &obj)
            .await?;
        self.cluster_objects.lock().unwrap().push((ar, name.to_owned()));
        Ok(())
    }

    async fn pvc_with(
        &self,
        name: &str,
        class: &str,
        mode: Mode,
        access: &str,
        size: &str,
        source: Option<Value>,
    ) -> anyhow::Result<()> {
        let mut spec = json!({
            "storageClassName": class,
            "accessModes": [access],
            "resources": {"requests": {"storage": size}},
        });
        if mode == Mode::Block {
            spec["volumeMode"] = json!("Block");
        }
        if let Some(s) = source {
            spec["dataSource"] = s;
        }
        let pvc: PersistentVolumeClaim = serde_json::from_value(
            json!({"metadata": {"name": name, "labels": {"e2e": name}}, "spec": spec}),
        )?;
        self.pvcs().create(&PostParams::default(), &pvc).await?;
        Ok(())
    }

    async fn pvc(&self, name: &str, mode: Mode, source: Option<Value>) -> anyhow::Result<()> {
        let class = setting("STRATA_E2E_STORAGE_CLASS", "strata");
        self.pvc_with(name, &class, mode, "ReadWriteOnce", "1Gi", source)
            .await
    }

    /// Creates a pod running `script` with the PVCs `claims` (name, mode) at /data, /data2, ...
    /// (file systems) or /dev/xvda, /dev/xvdb, ... (block devices).
    async fn start(
        &self,
        name: &str,
        claims: &[(&str, Mode)],
        script: &str,
        place: Place<'_>,
    ) -> anyhow::Result<()> {
        let mut mounts = vec![];
        let mut devices = vec![];
        let mut volumes = vec![];
        for (i, (claim, mode)) in claims.iter().enumerate() {
            let vol = format!("v{i}");
            match mode {
                Mode::Fs => {
                    let path = if i == 0 {
                        "/data".to_owned()
                    } else {
                        format!("/data{}", i + 1)
                    };
                    mounts.push(json!({"name": vol, "mountPath": path}));
                }
                Mode::Block => {
                    let path = format!("/dev/xvd{}", (b'a' + i as u8) as char);
                    devices.push(json!({"name": vol, "devicePath": path}));
                }
            }
            volumes.push(json!({"name": vol, "persistentVolumeClaim": {"claimName": claim}}));
        }
        let mut spec = json!({
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": 1,
            "containers": [{
                "name": "c", "image": setting("STRATA_E2E_IMAGE", "busybox:1.36"),
                "command": ["sh", "-c", script],
                "volumeMounts": mounts,
                "volumeDevices": devices,
            }],
            "volumes": volumes,
        });
        let term = |key: &str, op: &str, value: &str| {
            json!({"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [{"matchExpressions": [{"key": key, "operator": op, "values": [value]}]}]}}})
        };
        match place {
            Place::Anywhere => {}
            Place::In(k, v) => spec["affinity"] = term(k, "In", v),
            Place::NotIn(k, v) => spec["affinity"] = term(k, "NotIn", v),
        }
        let pod: Pod = serde_json::from_value(json!({"metadata": {"name": name}, "spec": spec}))?;
        self.pods().create(&PostParams::default(), &pod).await?;
        Ok(())
    }

    async fn phase(&self, name: &str) -> anyhow::Result<(String, String)> {
        let p = self.pods().get(name).await?;
        Ok((
            p.status.and_then(|s| s.phase).unwrap_or_default(),
            p.spec.and_then(|s| s.node_name).unwrap_or_default(),
        ))
    }

    /// Waits until pod `name` succeeds and returns its node; its logs on failure.
    async fn finish(&self, name: &str) -> anyhow::Result<String> {
        let pods = self.pods();
        wait_for(&format!("pod {name} to succeed"), || async {
            match self.phase(name).await?.0.as_str() {
                "Succeeded" => Ok(true),
                "Failed" => {
                    let logs = pods.logs(name, &Default::default()).await.unwrap_or_default();
                    anyhow::bail!("pod {name} failed: {logs}")
                }
                _ => Ok(false),
            }
        })
        .await?;
        Ok(self.phase(name).await?.1)
    }

    /// Waits until pod `name` runs and returns its node.
    async fn running(&self, name: &str) -> anyhow::Result<String> {
        wait_for(&format!("pod {name} to run"), || async {
            match self.phase(name).await?.0.as_str() {
                "Running" => Ok(true),
                "Failed" | "Succeeded" => {
                    let logs = self
                        .pods()
                        .logs(name, &Default::default())
                        .await
                        .unwrap_or_default();
                    anyhow::bail!("pod {name} ended early: {logs}")
                }
                _ => Ok(false),
            }
        })
        .await?;
        Ok(self.phase(name).await?.1)
    }

    async fn run(
        &self,
        name: &str,
        claims: &[(&str, Mode)],
        script: &str,
        place: Place<'_>,
    ) -> anyhow::Result<String> {
        self.start(name, claims, script, place).await?;
        self.finish(name).await
    }

    async fn delete_pod(&self, name: &str) -> anyhow::Result<()> {
        self.pods().delete(name, &DeleteParams::default()).await?;
        let pods = self.pods();
        wait_for(&format!("pod {name} to go"), || async {
            Ok(pods.get_opt(name).await?.is_none())
        })
        .await
    }

    async fn logs(&self, name: &str) -> String {
        self.pods()
            .logs(name, &Default::default())
            .await
            .unwrap_or_default()
    }

    async fn snapshot(&self, name: &str, pvc: &str) -> anyhow::Result<()> {
        self.snapshot_with(name, pvc, &setting("STRATA_E2E_SNAPSHOT_CLASS", "strata"))
            .await
    }

    async fn snapshot_with(&self, name: &str, pvc: &str, class: &str) -> anyhow::Result<()> {
        let mut obj = DynamicObject::new(name, &snapshots_ar());
        obj.data = json!({"spec": {
            "volumeSnapshotClassName": class,
            "source": {"persistentVolumeClaimName": pvc}}});
        self.dynamic(&snapshots_ar())
            .create(&PostParams::default(), &obj)
            .await?;
        self.snapshot_ready(name).await
    }

    async fn snapshot_ready(&self, name: &str) -> anyhow::Result<()> {
        let api = self.dynamic(&snapshots_ar());
        let started = Instant::now();
        wait_for(&format!("snapshot {name} ready"), || async {
            let s = api.get(name).await?;
            if let Some(e) = s.data.pointer("/status/error/message").and_then(|m| m.as_str()) {
                println!("  snapshot {name}: {e}");
            }
            Ok(s.data.pointer("/status/readyToUse").and_then(Value::as_bool) == Some(true))
        })
        .await?;
        println!(
            "  snapshot {name} ready in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        Ok(())
    }

    async fn delete_snapshot(&self, name: &str) -> anyhow::Result<()> {
        self.dynamic(&snapshots_ar())
            .delete(name, &DeleteParams::default())
            .await?;
        let api = self.dynamic(&snapshots_ar());
        wait_for(&format!("snapshot {name} to go"), || async {
            Ok(api.get_opt(name).await?.is_none())
        })
        .await
    }

    /// The nodes and their zones.
    async fn nodes(&self) -> anyhow::Result<Vec<(String, String)>> {
        Ok(Api::<Node>::all(self.client.clone())
            .list(&Default::default())
            .await?
            .items
            .into_iter()
            .filter(|n| !n.spec.as_ref().and_then(|s| s.unschedulable).unwrap_or(false))
            .map(|n| {
                let zone = n
                    .metadata
                    .labels
                    .as_ref()
                    .and_then(|l| l.get(ZONE).cloned())
                    .unwrap_or_default();
                (n.metadata.name.unwrap_or_default(), zone)
            })
            .collect())
    }

    async fn zones(&self) -> anyhow::Result<Vec<String>> {
        let mut zones: Vec<String> = self.nodes().await?.into_iter().map(|(_, z)| z).collect();
        zones.retain(|z| !z.is_empty());
        zones.sort();
        zones.dedup();
        Ok(zones)
    }

    async fn zone_of(&self, node: &str) -> anyhow::Result<String> {
        Ok(self
            .nodes()
            .await?
            .into_iter()
            .find(|(n, _)| n == node)
            .map(|(_, z)| z)
            .unwrap_or_default())
    }
}

fn from_snapshot(name: &str) -> Value {
    json!({"apiGroup": "snapshot.storage.k8s.io", "kind": "VolumeSnapshot", "name": name})
}

/// Runs one case in its own namespace, cleaning up whatever happens.
async fn case<F, Fut>(name: &str, body: F)
where
    F: FnOnce(std::sync::Arc<Suite>) -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let suite = std::sync::Arc::new(Suite::new(name).await.expect("KUBECONFIG names a cluster"));
    let started = Instant::now();
    let result = std::panic::AssertUnwindSafe(body(suite.clone()))
        .catch_unwind()
        .await;
    let ns = suite.ns.clone();
    suite.cleanup().await;
    match result {
        Ok(Ok(())) => println!("[{name}] passed in {:.0} s", started.elapsed().as_secs_f64()),
        Ok(Err(e)) => panic!("[{name}] failed in namespace {ns}: {e:#}"),
        Err(p) => std::panic::resume_unwind(p),
    }
}

/// Writes 32 MiB of random data to /data/a and records every file's checksum in /data/sums-N.
fn write_step(n: u32) -> String {
    match n {
        1 => "head -c 33554432 /dev/urandom > /data/a && cd /data && sha256sum a > sums-1 && sync".to_owned(),
        n => format!(
            "head -c 1048576 /dev/urandom | dd of=/data/a bs=1M seek={} conv=notrunc,fsync && echo {n} > /data/f{n} \
             && cd /data && sha256sum a f* > sums-{n} && sync",
            n * 3
        ),
    }
}

fn check_step(n: u32) -> String {
    // The files of later steps must not exist in an earlier snapshot.
    format!("cd /data && sha256sum -c sums-{n} && ! test -e f{}", n + 1)
}

/// A chain of three snapshots of a file system volume; every one restored and checked; the
/// snapshots deleted in the order 2, 1 with the others still restorable, the last one restored on
/// another node in another zone; a clone of the live volume.
#[tokio::test]
#[ignore = "needs a cluster with Strata installed (KUBECONFIG)"]
async fn snapshot_chain_deletes_and_restores_anywhere() {
    case("chain", |s| async move {
        s.pvc("data", Mode::Fs, None).await?;
        let writer = s
            .run("write-1", &[("data", Mode::Fs)], &write_step(1), Place::Anywhere)
            .await?;
        s.snapshot("snap-1", "data").await?;
        for n in [2, 3] {
            s.run(
                &format!("write-{n}"),
                &[("data", Mode::Fs)],
                &write_step(n),
                Place::In(HOSTNAME, &writer),
            )
            .await?;
            s.snapshot(&format!("snap-{n}"), "data").await?;
        }
        for n in [1, 2, 3] {
            let pvc = format!("r{n}");
            s.pvc(&pvc, Mode::Fs, Some(from_snapshot(&format!("snap-{n}"))))
                .await?;
            let node = s
                .run(
                    &format!("check-{pvc}"),
                    &[(&pvc, Mode::Fs)],
                    &check_step(n),
                    Place::Anywhere,
                )
                .await?;
            println!("  snap-{n} restored on {node}: checksums match");
        }
        s.delete_snapshot("snap-2").await?;
        s.pvc("r3b", Mode::Fs, Some(from_snapshot("snap-3"))).await?;
        s.run("check-r3b", &[("r3b", Mode::Fs)], &check_step(3), Place::Anywhere)
            .await?;
        s.pvc("r1b", Mode::Fs, Some(from_snapshot("snap-1"))).await?;
        s.run("check-r1b", &[("r1b", Mode::Fs)], &check_step(1), Place::Anywhere)
            .await?;
        println!("  snap-2 deleted: snap-1 and snap-3 still restore");
        s.delete_snapshot("snap-1").await?;
        let writer_zone = s.zone_of(&writer).await?;
        s.pvc("r3c", Mode::Fs, Some(from_snapshot("snap-3"))).await?;
        anyhow::ensure!(
            s.zones().await?.len() >= 2,
            "restoring in another zone needs nodes in two zones"
        );
        let node = s
            .run(
                "check-r3c",
                &[("r3c", Mode::Fs)],
                &check_step(3),
                Place::NotIn(ZONE, &writer_zone),
            )
            .await?;
        let zone = s.zone_of(&node).await?;
        anyhow::ensure!(
            node != writer && zone != writer_zone,
            "the restore ran in the writer's zone"
        );
        println!(
            "  snap-1 deleted: snap-3 restored on {node} in {zone} (written on {writer} in {writer_zone})"
        );
        // A clone of the live volume lands on its node.
        s.pvc(
            "clone",
            Mode::Fs,
            Some(json!({"kind": "PersistentVolumeClaim", "name": "data"})),
        )
        .await?;
        let node = s
            .run(
                "check-clone",
                &[("clone", Mode::Fs)],
                &check_step(3),
                Place::Anywhere,
            )
            .await?;
        anyhow::ensure!(
            node == writer,
            "the clone ran on {node}, the source is on {writer}"
        );
        println!("  clone of the live volume on {node}: checksums match");
        Ok(())
    })
    .await
}

/// A raw block volume: data written to the device, snapshotted, restored as a block volume on the
/// other node.
#[tokio::test]
#[ignore = "needs a cluster with Strata installed (KUBECONFIG)"]
async fn block_volume_snapshot_restores() {
    case("block", |s| async move {
        s.pvc("dev", Mode::Block, None).await?;
        s.start(
            "write",
            &[("dev", Mode::Block)],
            "head -c 8388608 /dev/urandom > /tmp/d && dd if=/tmp/d of=/dev/xvda bs=1M seek=5 conv=fsync 2>/dev/null \
             && sha256sum < /tmp/d && sleep 3600",
            Place::Anywhere,
        )
        .await?;
        let writer = s.running("write").await?;
        let sum = wait_sum(&s, "write").await?;
        s.snapshot("snap", "dev").await?;
        s.pvc("restored", Mode::Block, Some(from_snapshot("snap"))).await?;
        let script = format!("test \"$(dd if=/dev/xvda bs=1M skip=5 count=8 2>/dev/null | sha256sum)\" = '{sum}'");
        let node = s
            .run("check", &[("restored", Mode::Block)], &script, Place::NotIn(HOSTNAME, &writer))
            .await?;
        println!("  block volume written on {writer} (attached), restored on {node}: checksum matches");
        Ok(())
    })
    .await
}

/// The first line a running pod logged: a checksum.
async fn wait_sum(s: &Suite, pod: &str) -> anyhow::Result<String> {
    wait_for(&format!("{pod} to log its checksum"), || async {
        Ok(s.logs(pod).await.lines().next().unwrap_or("").trim().len() >= 64)
    })
    .await?;
    Ok(s.logs(pod).await.lines().next().unwrap_or("").trim().to_owned())
}

/// Online expansion of a mounted XFS volume: the pod sees the new size without a restart.
#[tokio::test]
#[ignore = "needs a cluster with Strata installed (KUBECONFIG)"]
async fn online_expansion() {
    case("expand", |s| async move {
        let class = format!("{}-xfs", s.ns);
        let sc: StorageClass = serde_json::from_value(json!({
            "metadata": {"name": class},
            "provisioner": DRIVER,
            "volumeBindingMode": "WaitForFirstConsumer",
            "allowVolumeExpansion": true,
            "parameters": {"csi.storage.k8s.io/fstype": "xfs"},
        }))?;
        Api::<StorageClass>::all(s.client.clone())
            .create(&PostParams::default(), &sc)
            .await?;
        s.cluster_objects
            .lock()
            .unwrap()
            .push((ApiResource::erase::<StorageClass>(&()), class.clone()));
        s.pvc_with("grow", &class, Mode::Fs, "ReadWriteOnce", "1Gi", None)
            .await?;
        s.start(
            "user",
            &[("grow", Mode::Fs)],
            "head -c 16777216 /dev/urandom > /data/x && sha256sum /data/x > /data/x.sum && sync && \
             while true; do df -k /data | tail -n1 | awk '{print $2}' > /tmp/size; sleep 1; done",
            Place::Anywhere,
        )
        .await?;
        s.running("user").await?;
        s.pvcs()
            .patch(
                "grow",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"resources": {"requests": {"storage": "2Gi"}}}})),
            )
            .await?;
        let pvcs = s.pvcs();
        wait_for("the PVC to report 2Gi", || async {
            let p = pvcs.get("grow").await?;
            let cap = p
                .status
                .and_then(|st| st.capacity)
                .and_then(|c| c.get("storage").map(|q| q.0.clone()))
                .unwrap_or_default();
            Ok(cap == "2Gi")
        })
        .await?;
        s.delete_pod("user").await?;
        let script =
            "df -k /data | tail -n1 | awk '{ if ($2 < 1800000) { print \"size \" $2 \" KiB\"; exit 1 } }' \
                      && sha256sum -c /data/x.sum";
        s.run("check", &[("grow", Mode::Fs)], script, Place::Anywhere)
            .await?;
        println!("  expanded 1Gi -> 2Gi while mounted; data intact");
        Ok(())
    })
    .await
}

/// A snapshot of a fast-restore class, restored in its zone (pre-hydrated) and outside it.
#[tokio::test]
#[ignore = "needs a cluster with Strata installed (KUBECONFIG)"]
async fn fast_restore_in_and_out_of_zone() {
    case("fsr", |s| async move {
        let zones = s.zones().await?;
        anyhow::ensure!(
            zones.len() >= 2,
            "fast restore needs nodes in two zones; the cluster has {zones:?}"
        );
        let (fast, other) = (zones[0].clone(), zones[1].clone());
        let class = format!("{}-fast-restore", s.ns);
        s.create_cluster_object(
            gvk("snapshot.storage.k8s.io", "VolumeSnapshotClass"),
            &class,
            json!({"driver": DRIVER, "deletionPolicy": "Delete", "parameters": {"fastRestoreZones": fast}}),
        )
        .await?;
        s.pvc("data", Mode::Fs, None).await?;
        s.run("write-1", &[("data", Mode::Fs)], &write_step(1), Place::Anywhere)
            .await?;
        s.snapshot_with("snap-fast", "data", &class).await?;
        for (pvc, zone) in [("fast-in", &fast), ("fast-out", &other)] {
            s.pvc(pvc, Mode::Fs, Some(from_snapshot("snap-fast"))).await?;
            let node = s
                .run(
                    &format!("check-{pvc}"),
                    &[(pvc, Mode::Fs)],
                    &check_step(1),
                    Place::In(ZONE, zone),
                )
                .await?;
            println!("  fast-restore snapshot restored in {zone} ({node}): checksums match");
        }
        Ok(())
    })
    .await
}

/// A VolumeGroupSnapshot of two volumes a writer keeps in step: ready, and every member
/// restores, the two at most one step apart.
#[tokio::test]
#[ignore = "needs a cluster with Strata installed (KUBECONFIG)"]
async fn group_snapshot_restores_every_member() {
    case("group", |s| async move {
        let group = "groupsnapshot.storage.k8s.io";
        let class = format!("{}-group", s.ns);
        s.create_cluster_object(
            gvk(group, "VolumeGroupSnapshotClass"),
            &class,
            json!({"driver": DRIVER, "deletionPolicy": "Delete"}),
        )
        .await?;
        for pvc in ["db-data", "db-log"] {
            let p: PersistentVolumeClaim = serde_json::from_value(json!({
                "metadata": {"name": pvc, "labels": {"app": "db"}},
                "spec": {"storageClassName": setting("STRATA_E2E_STORAGE_CLASS", "strata"),
                         "accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}}))?;
            s.pvcs().create(&PostParams::default(), &p).await?;
        }
        s.start(
            "db",
            &[("db-log", Mode::Fs), ("db-data", Mode::Fs)],
            "i=0; while true; do i=$((i+1)); echo $i >> /data/seq; sync; echo $i > /data2/last; sync; \
             [ $i = 10 ] && echo wrote-10; sleep 0.05; done",
            Place::Anywhere,
        )
        .await?;
        s.running("db").await?;
        // Snapshot a writer under way (a sync can take seconds on a busy node).
        wait_for("the writer's first 10 entries", || async { Ok(s.logs("db").await.contains("wrote-10")) }).await?;
        let vgs = gvk(group, "VolumeGroupSnapshot");
        let mut obj = DynamicObject::new("db-group", &vgs);
        obj.data = json!({"spec": {"volumeGroupSnapshotClassName": class,
                                   "source": {"selector": {"matchLabels": {"app": "db"}}}}});
        s.dynamic(&vgs).create(&PostParams::default(), &obj).await?;
        let api = s.dynamic(&vgs);
        let started = Instant::now();
        wait_for("the VolumeGroupSnapshot ready", || async {
            let g = api.get("db-group").await?;
            if let Some(e) = g.data.pointer("/status/error/message").and_then(Value::as_str) {
                println!("  group: {e}");
            }
            Ok(g.data.pointer("/status/readyToUse").and_then(Value::as_bool) == Some(true))
        })
        .await?;
        println!("  VolumeGroupSnapshot ready in {:.1} s", started.elapsed().as_secs_f64());
        s.delete_pod("db").await?;
        // The snapshot-controller creates the member VolumeSnapshots after it marks the group
        // ready, one at a time: wait until both exist.
        let list_members = || async {
            let items = s.dynamic(&snapshots_ar()).list(&ListParams::default()).await?.items;
            anyhow::Ok(members_of(items, "db-group"))
        };
        wait_for("two member VolumeSnapshots", || async { Ok(list_members().await?.len() == 2) }).await?;
        let members = list_members().await?;
        anyhow::ensure!(members.len() == 2, "expected two member snapshots, found {members:?}");
        for (snap, pvc) in &members {
            s.snapshot_ready(snap).await?;
            let restored = format!("{pvc}-restored");
            s.pvc(&restored, Mode::Fs, Some(from_snapshot(snap))).await?;
        }
        // Both restored members in one pod: the log's last entry and the data's counter.
        let script = "seq=$(tail -n1 /data/seq); last=$(cat /data2/last); echo \"seq=$seq last=$last\"; \
                      test \"$seq\" -ge 10 && test -n \"$last\" && test $((seq - last)) -ge 0 && test $((seq - last)) -le 1";
        s.run("check", &[("db-log-restored", Mode::Fs), ("db-data-restored", Mode::Fs)], script, Place::Anywhere)
            .await?;
        println!("  both members restored, in step: {}", s.logs("check").await.trim());
        Ok(())
    })
    .await
}

/// A snapshot imported by handle (a pre-provisioned VolumeSnapshotContent, as another cluster
/// would import it) restores.
#[tokio::test]
#[ignore = "needs a cluster with Strata installed (KUBECONFIG)"]
async fn imported_snapshot_restores() {
    case("import", |s| async move {
        s.pvc("data", Mode::Fs, None).await?;
        s.run("write-1", &[("data", Mode::Fs)], &write_step(1), Place::Anywhere)
            .await?;
        s.snapshot("orig", "data").await?;
        let content_name = s
            .dynamic(&snapshots_ar())
            .get("orig")
            .await?
            .data
            .pointer("/status/boundVolumeSnapshotContentName")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        let contents = gvk("snapshot.storage.k8s.io", "VolumeSnapshotContent");
        let handle = Api::<DynamicObject>::all_with(s.client.clone(), &contents)
            .get(&content_name)
            .await?
            .data
            .pointer("/status/snapshotHandle")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        anyhow::ensure!(
            handle.starts_with("snap-") || handle.contains(":snap-"),
            "snapshot handle {handle:?}"
        );
        let imported = format!("{}-imported", s.ns);
        s.create_cluster_object(
            contents.clone(),
            &imported,
            json!({"spec": {
                "driver": DRIVER,
                "deletionPolicy": "Retain",
                "source": {"snapshotHandle": handle},
                "volumeSnapshotRef": {"name": "imported", "namespace": s.ns},
            }}),
        )
        .await?;
        let mut vs = DynamicObject::new("imported", &snapshots_ar());
        vs.data = json!({"spec": {"source": {"volumeSnapshotContentName": imported}}});
        s.dynamic(&snapshots_ar())
            .create(&PostParams::default(), &vs)
            .await?;
        s.snapshot_ready("imported").await?;
        s.pvc("restored", Mode::Fs, Some(from_snapshot("imported")))
            .await?;
        let node = s
            .run(
                "check",
                &[("restored", Mode::Fs)],
                &check_step(1),
                Place::Anywhere,
            )
            .await?;
        println!("  snapshot {handle} imported by handle and restored on {node}");
        Ok(())
    })
    .await
}

/// A ReadWriteOncePod volume: a second pod waits until the first is gone, then sees its data.
#[tokio::test]
#[ignore = "needs a cluster with Strata installed (KUBECONFIG)"]
async fn read_write_once_pod() {
    case("rwop", |s| async move {
        let class = setting("STRATA_E2E_STORAGE_CLASS", "strata");
        s.pvc_with("solo", &class, Mode::Fs, "ReadWriteOncePod", "1Gi", None)
            .await?;
        s.start(
            "first",
            &[("solo", Mode::Fs)],
            "echo mine > /data/owner && sync && sleep 3600",
            Place::Anywhere,
        )
        .await?;
        let node = s.running("first").await?;
        s.start(
            "second",
            &[("solo", Mode::Fs)],
            "cat /data/owner",
            Place::In(HOSTNAME, &node),
        )
        .await?;
        // The second pod must not start while the first holds the volume.
        tokio::time::sleep(Duration::from_secs(10)).await;
        let (phase, _) = s.phase("second").await?;
        anyhow::ensure!(
            phase == "Pending",
            "a second pod of a ReadWriteOncePod volume is {phase}"
        );
        s.delete_pod("first").await?;
        s.finish("second").await?;
        anyhow::ensure!(
            s.logs("second").await.trim() == "mine",
            "second pod read {:?}",
            s.logs("second").await
        );
        println!("  the second pod waited (Pending) until the first was gone, then read its data");
        Ok(())
    })
    .await
}

fn driver_namespace() -> String {
    setting("STRATA_E2E_DRIVER_NAMESPACE", "strata-system")
}

/// (name, uid) of the driver's pods whose labels match `selector`.
async fn driver_pods(client: &Client, selector: &str) -> anyhow::Result<Vec<(String, String, String)>> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), &driver_namespace());
    Ok(pods
        .list(&ListParams::default().labels(selector))
        .await?
        .items
        .into_iter()
        .map(|p| {
            (
                p.metadata.name.unwrap_or_default(),
                p.metadata.uid.unwrap_or_default(),
                p.status.and_then(|s| s.phase).unwrap_or_default(),
            )
        })
        .collect())
}

/// `helm upgrade` to a new image while volumes are attached: one is written all along, one is
/// restoring lazily and read all along (chunks not yet local are fetched on demand, before,
/// during and after the upgrade). No I/O error, no lost write, and the hydration carries on to
/// the end in the same hydrator pod.
#[tokio::test]
#[ignore = "needs a cluster with Strata installed (KUBECONFIG)"]
async fn upgrade_keeps_attached_volumes_working() {
    case("upgrade", |s| async move {
        let upgrade = std::env::var("STRATA_E2E_UPGRADE_COMMAND").map_err(|_| {
            anyhow::anyhow!("STRATA_E2E_UPGRADE_COMMAND is not set: it names the command that upgrades the driver")
        })?;
        const PIECES: u32 = 48; // 4 MiB each
        s.pvc("src", Mode::Fs, None).await?;
        let fill = format!(
            "head -c {} /dev/urandom > /data/big && for k in $(seq 0 {}); do \
             dd if=/data/big bs=4M skip=$k count=1 2>/dev/null | sha256sum | cut -c1-64; done > /data/pieces && sync",
            PIECES * 4 << 20,
            PIECES - 1
        );
        let writer_node = s.run("fill", &[("src", Mode::Fs)], &fill, Place::Anywhere).await?;
        s.snapshot("snap", "src").await?;
        s.pvc("live", Mode::Fs, None).await?;
        s.start(
            "writer",
            &[("live", Mode::Fs)],
            "set -e; i=0; while true; do i=$((i+1)); echo $i >> /data/log; sync; echo $i; sleep 0.05; done",
            Place::Anywhere,
        )
        .await?;
        s.pvc("lazy", Mode::Fs, Some(from_snapshot("snap"))).await?;
        // Two passes over the pieces, one per second, each read with O_DIRECT (past the page
        // cache) and compared: the first pass spans the upgrade.
        let read = format!(
            "set -e; for pass in 1 2; do k=0; while read want; do \
               got=$(dd if=/data/big bs=4M skip=$k count=1 iflag=direct 2>/dev/null | sha256sum | cut -c1-64); \
               if [ \"$got\" != \"$want\" ]; then echo \"pass $pass piece $k differs\"; exit 1; fi; \
               k=$((k+1)); sleep 1; done < /data/pieces; echo \"pass $pass ok\"; done"
        );
        s.start("reader", &[("lazy", Mode::Fs)], &read, Place::NotIn(HOSTNAME, &writer_node))
            .await?;
        let reader_node = s.running("reader").await?;
        s.running("writer").await?;
        let hydrator_selector = "app.kubernetes.io/component=hydrator";
        let hydrators_before = driver_pods(&s.client, hydrator_selector).await?;
        anyhow::ensure!(
            hydrators_before.iter().any(|(_, _, ph)| ph == "Running"),
            "the lazily restored volume on {reader_node} has no running hydrator pod: {hydrators_before:?}"
        );
        let node_selector = "app.kubernetes.io/component=node";
        let nodes_before = driver_pods(&s.client, node_selector).await?;
        tokio::time::sleep(Duration::from_secs(3)).await;

        println!("  upgrading: {upgrade}");
        let started = Instant::now();
        let out = tokio::process::Command::new("sh").arg("-c").arg(&upgrade).output().await?;
        anyhow::ensure!(
            out.status.success(),
            "the upgrade failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        println!("  upgrade done in {:.0} s", started.elapsed().as_secs_f64());
        let nodes_after = driver_pods(&s.client, node_selector).await?;
        anyhow::ensure!(
            nodes_after.iter().all(|(_, uid, _)| nodes_before.iter().all(|(_, u, _)| u != uid)),
            "the upgrade did not replace the node plugin pods: before {nodes_before:?}, after {nodes_after:?}"
        );
        for pod in ["writer", "reader"] {
            let (phase, _) = s.phase(pod).await?;
            anyhow::ensure!(
                phase == "Running" || (pod == "reader" && phase == "Succeeded"),
                "{pod} is {phase} after the upgrade: {}",
                s.logs(pod).await
            );
        }
        let hydrators_after = driver_pods(&s.client, hydrator_selector).await?;
        for (name, uid, _) in &hydrators_before {
            anyhow::ensure!(
                hydrators_after.iter().any(|(n, u, ph)| n == name && u == uid && ph == "Running")
                    || s.phase("reader").await?.0 == "Succeeded",
                "hydrator pod {name} did not survive the upgrade: {hydrators_after:?}"
            );
        }
        s.finish("reader").await?;
        println!("  reader: {}", s.logs("reader").await.replace('\n', "; "));
        // The writer's last acknowledged (synced) number must be in its log, with no gap.
        let written = s.logs("writer").await;
        let last: u64 = written.lines().filter_map(|l| l.trim().parse().ok()).max().unwrap_or(0);
        s.delete_pod("writer").await?;
        let check = format!(
            "n=$(wc -l < /data/log); awk 'NR != $1 {{ print \"gap at line \" NR; exit 1 }}' /data/log && \
             test \"$n\" -ge {last} && echo \"$n lines, last acknowledged {last}\""
        );
        s.run("check-live", &[("live", Mode::Fs)], &check, Place::Anywhere).await?;
        println!("  writer: {}", s.logs("check-live").await.trim());
        // Unattached and complete, the hydration retires: its pod goes.
        let client = s.client.clone();
        wait_for("the hydrator pod to finish and go", || async {
            let left = driver_pods(&client, hydrator_selector).await?;
            Ok(hydrators_before.iter().all(|(n, _, _)| left.iter().all(|(m, _, _)| m != n)))
        })
        .await?;
        let verify = "k=0; while read want; do got=$(dd if=/data/big bs=4M skip=$k count=1 2>/dev/null | sha256sum | cut -c1-64); \
                      [ \"$got\" = \"$want\" ] || exit 1; k=$((k+1)); done < /data/pieces";
        s.run("check-lazy", &[("lazy", Mode::Fs)], verify, Place::Anywhere).await?;
        println!("  hydration finished after the upgrade; the restored volume is exact on its plain file");
        Ok(())
    })
    .await
}
