//! Controller snapshot RPCs: CreateSnapshot (delegated to the volume's agent), DeleteSnapshot,
//! ListSnapshots, GetSnapshot (from the store's manifests plus the agents' pending uploads), and
//! the background garbage collector.

use std::sync::Arc;
use std::time::Duration;

use tonic::Status;

use super::controller::ControllerService;
use super::status::{invalid, key_code};
use super::validate;
use crate::controller::directory::from_agent;
use crate::controller::Error;
use crate::ids;
use crate::proto::agent as apb;
use crate::proto::csi as pb;
use crate::proto::store::Manifest;
use crate::snapshot::manifest::{self, ManifestError};
use crate::store::Store;

/// VolumeSnapshotClass parameter: zones where snapshots of the class are pre-hydrated.
pub const PARAM_FSR_ZONES: &str = "fastRestoreZones";

pub(super) fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

pub(super) fn from_status(s: &apb::SnapshotStatus) -> pb::Snapshot {
    pb::Snapshot {
        size_bytes: s.size_bytes as i64,
        snapshot_id: s.snapshot_id.clone(),
        source_volume_id: s.volume_id.clone(),
        creation_time: Some(timestamp(s.capture_unix_ms)),
        ready_to_use: s.ready,
        group_snapshot_id: String::new(),
    }
}

/// The CSI form of a committed snapshot.
pub fn from_manifest(m: &Manifest) -> pb::Snapshot {
    from_status(&crate::snapshot::node::NodeSnapshots::committed_status(m))
}

fn fsr_status(e: crate::snapshot::fsr::FsrError) -> Status {
    use crate::snapshot::fsr::FsrError;
    match e {
        FsrError::Store(s) => Status::new(super::status::store_code(&s), s.to_string()),
        FsrError::Manifest(m) => manifest_status(m),
        FsrError::Record(_) => Status::data_loss(e.to_string()),
        FsrError::InvalidZone(_) => invalid(format!("{PARAM_FSR_ZONES}: {e}")),
        // Neither arises here: the snapshot is committed when enabled, and zones are not checked.
        FsrError::NotReady(_) | FsrError::UnknownZone { .. } => Status::failed_precondition(e.to_string()),
    }
}

pub(super) fn manifest_status(e: ManifestError) -> Status {
    match e {
        ManifestError::Store(s) => Status::new(super::status::store_code(&s), s.to_string()),
        ManifestError::Corrupt { .. } => Status::data_loss(e.to_string()),
    }
}

impl ControllerService {
    pub(super) fn store(&self) -> Result<&Store, Status> {
        self.store
            .as_ref()
            .ok_or_else(|| Status::failed_precondition("no snapshot store is configured (--store)"))
    }

    /// A committed snapshot's manifest without its chunk list (see [`super::summaries`]).
    pub(super) async fn manifest(&self, snapshot_id: &str) -> Result<Option<Manifest>, Status> {
        if let Some(m) = self.manifests.get(snapshot_id) {
            return Ok(Some(m));
        }
        let m = manifest::read_manifest(self.store()?, snapshot_id)
            .await
            .map_err(manifest_status)?;
        Ok(m.map(|m| self.manifests.insert(m)))
    }

    /// Uploads in progress on all reachable agents.
    async fn pending(&self) -> Result<Vec<apb::SnapshotStatus>, Status> {
        let answers = self
            .directory
            .gather("pending snapshots", |_, mut c| async move {
                c.list_pending_snapshots(apb::ListPendingSnapshotsRequest {})
                    .await
                    .map(|r| r.into_inner().snapshots)
            })
            .await?;
        Ok(answers.into_iter().flat_map(|(_, s)| s).collect())
    }

    pub(super) async fn create_snapshot_impl(
        &self,
        r: pb::CreateSnapshotRequest,
    ) -> Result<pb::CreateSnapshotResponse, Status> {
        if r.name.is_empty() {
            return Err(invalid("name is required"));
        }
        ids::check_name("name", &r.name).map_err(invalid)?;
        if r.source_volume_id.is_empty() {
            return Err(invalid("source_volume_id is required"));
        }
        let source = validate::volume_id(&r.source_volume_id)?;
        let store = self.store()?.clone();
        // Class parameter fastRestoreZones.
        let fsr_zones: Vec<String> = r
            .parameters
            .get(PARAM_FSR_ZONES)
            .map(|z| {
                z.split(',')
                    .map(str::trim)
                    .filter(|z| !z.is_empty())
                    .map(str::to_owned)
                    .collect()
            })
            .unwrap_or_default();
        for z in &fsr_zones {
            ids::check_id("zone", z).map_err(|e| invalid(format!("{PARAM_FSR_ZONES}: {e}")))?;
        }
        // The snapshot class's secret (csi.storage.k8s.io/snapshotter-secret-name) holds the key
        // that encrypts the snapshot.
        let kek = crate::snapshot::crypto::Kek::from_secrets(&r.secrets, "snapshotter secret")
            .map_err(|e| Status::new(key_code(&e), e.to_string()))?;
        if kek.is_some() && !fsr_zones.is_empty() {
            return Err(invalid(format!(
                "{PARAM_FSR_ZONES}: fast restore of encrypted snapshots is not supported yet \
                 (the zone's nodes would need the snapshot's key); use a class without one of the two"
            )));
        }
        let id = ids::snapshot_id_for_name(&r.name);
        let _ticket = self.guard.acquire(&id, "CreateSnapshot").await?;
        if let Some(m) = self.manifest(&id).await? {
            if m.volume_id != source {
                return Err(Status::already_exists(format!(
                    "snapshot name {:?} is taken by a snapshot of volume {}",
                    r.name, m.volume_id
                )));
            }
            self.enable_fast_restore(&store, &id, &fsr_zones).await?;
            return Ok(pb::CreateSnapshotResponse {
                snapshot: Some(from_manifest(&m)),
            });
        }
        // The same name may be uploading on another node, for another volume.
        let pending = self.pending().await?.into_iter().find(|p| p.snapshot_id == id);
        if let Some(p) = &pending {
            if p.volume_id != source {
                return Err(Status::already_exists(format!(
                    "snapshot name {:?} is taken by a snapshot of volume {}",
                    r.name, p.volume_id
                )));
            }
        }
        // The zones must have nodes when the snapshot is asked for, and only then: once captured,
        // the snapshot is promised, and a zone whose nodes went away since must not keep it from
        // becoming ready (its image is made when a node of the zone is back).
        if pending.is_none() && !fsr_zones.is_empty() {
            for z in &fsr_zones {
                if !crate::snapshot::fsr::zone_has_live_node(&store, z)
                    .await
                    .map_err(fsr_status)?
                {
                    return Err(invalid(format!(
                        "{PARAM_FSR_ZONES}: no node is in zone {}",
                        ids::echo(z)
                    )));
                }
            }
        }
        let (node, _) = self
            .directory
            .find_volume(source, |_| false)
            .await?
            .ok_or_else(|| Error::NotFound {
                what: format!("volume {source}"),
            })?;
        let mut c = self.directory.client_for(&node).await?;
        let status = c
            .create_snapshot(apb::CreateSnapshotRequest {
                volume_id: source.to_owned(),
                snapshot_id: id.clone(),
                name: r.name.clone(),
                tags: r.parameters.clone(),
                kek: kek.as_ref().map(|k| k.bytes().to_vec()).unwrap_or_default(),
            })
            .await
            .map_err(|s| from_agent(&node, s))?
            .into_inner();
        if !status.error.is_empty() {
            // A transient failure: the agent retries by itself (permanent ones are errors).
            tracing::warn!(snapshot.id = %id, error = %status.error, "snapshot upload failed transiently; the agent retries");
        }
        tracing::info!(snapshot.id = %id, volume.id = %source, node = %node, ready = status.ready,
            done = status.chunks_done, total = status.chunks_total, "snapshot");
        if status.ready {
            self.enable_fast_restore(&store, &id, &fsr_zones).await?;
        }
        Ok(pb::CreateSnapshotResponse {
            snapshot: Some(from_status(&status)),
        })
    }

    /// Enables fast restore of a ready snapshot in the class's zones (idempotent). A zone with no
    /// live node now is enabled all the same: it had one when the snapshot was asked for, and
    /// the snapshot is ready whatever happens to that zone's nodes.
    async fn enable_fast_restore(&self, store: &Store, id: &str, zones: &[String]) -> Result<(), Status> {
        use crate::snapshot::fsr;
        for z in zones {
            let r = fsr::enable_unchecked(store, id, z).await.map_err(fsr_status)?;
            if !fsr::zone_has_live_node(store, z).await.map_err(fsr_status)? {
                tracing::warn!(snapshot.id = %id, zone = %z, state = %r.state,
                    "fast restore enabled in a zone with no live node: its image is made when a node of the zone is back");
            }
        }
        Ok(())
    }

    pub(super) async fn delete_snapshot_impl(
        &self,
        r: pb::DeleteSnapshotRequest,
    ) -> Result<pb::DeleteSnapshotResponse, Status> {
        if r.snapshot_id.is_empty() {
            return Err(invalid("snapshot_id is required"));
        }
        ids::check_id("snapshot_id", &r.snapshot_id).map_err(invalid)?;
        let store = self.store()?.clone();
        let id = r.snapshot_id;
        let _ticket = self.guard.acquire(&id, "DeleteSnapshot").await?;
        // An upload still running anywhere must stop first, or it would commit after the delete.
        let answers = self
            .directory
            .fan_out(|_, mut c| {
                let id = id.clone();
                async move {
                    c.abort_snapshot(apb::AbortSnapshotRequest { snapshot_id: id })
                        .await
                        .map(drop)
                }
            })
            .await?;
        for (_, a) in answers {
            a?;
        }
        manifest::delete_snapshot(&store, &id)
            .await
            .map_err(manifest_status)?;
        // Its fast-restore images go too: agents drop images whose zone record is gone.
        for r in crate::snapshot::fsr::list(&store, None)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?
        {
            if r.snapshot_id == id {
                crate::snapshot::fsr::remove(&store, &r.zone, &id)
                    .await
                    .map_err(|e| Status::unavailable(e.to_string()))?;
            }
        }
        self.manifests.remove(&id);
        self.gc_kick.notify_one();
        tracing::info!(snapshot.id = %id, "snapshot deleted");
        Ok(pb::DeleteSnapshotResponse {})
    }

    pub(super) async fn one(&self, id: &str) -> Result<Option<pb::Snapshot>, Status> {
        if ids::check_id("snapshot_id", id).is_err() {
            return Ok(None);
        }
        if let Some(m) = self.manifest(id).await? {
            return Ok(Some(from_manifest(&m)));
        }
        Ok(self
            .pending()
            .await?
            .iter()
            .find(|p| p.snapshot_id == id)
            .map(from_status))
    }

    pub(super) async fn list_snapshots_impl(
        &self,
        r: pb::ListSnapshotsRequest,
    ) -> Result<pb::ListSnapshotsResponse, Status> {
        super::paging::check(r.max_entries, &r.starting_token, "snap-")?;
        let store = self.store()?.clone();
        let mut all: Vec<pb::Snapshot> = if !r.snapshot_id.is_empty() {
            self.one(&r.snapshot_id).await?.into_iter().collect()
        } else {
            let mut v = Vec::new();
            for id in manifest::list_snapshot_ids(&store)
                .await
                .map_err(|e| manifest_status(e.into()))?
            {
                if let Some(m) = self.manifest(&id).await? {
                    v.push(from_manifest(&m));
                }
            }
            let committed: std::collections::HashSet<String> =
                v.iter().map(|s| s.snapshot_id.clone()).collect();
            v.extend(
                self.pending()
                    .await?
                    .iter()
                    .filter(|p| !committed.contains(&p.snapshot_id))
                    .map(from_status),
            );
            v
        };
        if !r.source_volume_id.is_empty() {
            all.retain(|s| s.source_volume_id == r.source_volume_id);
        }
        let (page, next_token) =
            super::paging::page(all, |s| s.snapshot_id.as_str(), &r.starting_token, r.max_entries);
        let entries = page
            .into_iter()
            .map(|s| pb::list_snapshots_response::Entry { snapshot: Some(s) })
            .collect();
        Ok(pb::ListSnapshotsResponse { entries, next_token })
    }

    pub(super) async fn get_snapshot_impl(
        &self,
        r: pb::GetSnapshotRequest,
    ) -> Result<pb::GetSnapshotResponse, Status> {
        if r.snapshot_id.is_empty() {
            return Err(invalid("snapshot_id is required"));
        }
        // Validated like every other id: a malformed one is INVALID_ARGUMENT, not NOT_FOUND.
        ids::check_id("snapshot_id", &r.snapshot_id).map_err(invalid)?;
        self.store()?;
        match self.one(&r.snapshot_id).await? {
            Some(s) => Ok(pb::GetSnapshotResponse { snapshot: Some(s) }),
            None => Err(Status::not_found(format!(
                "snapshot {} does not exist",
                r.snapshot_id
            ))),
        }
    }
}

/// Runs GC shortly after each delete and every `interval`, until `cancel`.
pub async fn gc_loop(
    store: Store,
    kick: Arc<tokio::sync::Notify>,
    grace: Duration,
    interval: Duration,
    cancel: tokio_util::sync::CancellationToken,
) {
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = kick.notified() => {}
            _ = tokio::time::sleep(interval) => {}
        }
        // Let a burst of deletes finish before sweeping.
        tokio::time::sleep(Duration::from_millis(500)).await;
        match crate::snapshot::gc::collect(&store, grace).await {
            Ok(r) => tracing::info!(
                deleted = r.deleted,
                bytes = r.bytes_deleted,
                kept_recent = r.kept_recent,
                manifests = r.manifests,
                leases = r.leases,
                "garbage collection"
            ),
            Err(e) => tracing::error!(error = %e, "garbage collection failed"),
        }
    }
}
