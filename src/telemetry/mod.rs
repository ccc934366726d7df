//! Logs (tracing, text or JSON) and Prometheus metrics with a `/metrics` + `/healthz` endpoint.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

/// Metric names, in one place.
pub mod names {
    /// CSI RPCs served, by method and gRPC code.
    pub const CSI_REQUESTS: &str = "strata_csi_requests";
    /// CSI RPC latency, by method.
    pub const CSI_REQUEST_SECONDS: &str = "strata_csi_request_seconds";
    /// Bytes of volume images read to build snapshots.
    pub const SNAPSHOT_BYTES_READ: &str = "strata_snapshot_read_bytes";
    /// Bytes sent to the store by snapshot uploads (compressed).
    pub const SNAPSHOT_BYTES_UPLOADED: &str = "strata_snapshot_uploaded_bytes";
    /// Raw bytes of chunks reused from the parent snapshot.
    pub const SNAPSHOT_BYTES_REUSED: &str = "strata_snapshot_reused_bytes";
    /// Chunks processed by snapshot uploads, by outcome (new, reused, zero).
    pub const SNAPSHOT_CHUNKS: &str = "strata_snapshot_chunks";
    /// Snapshots committed, and uploads that failed.
    pub const SNAPSHOTS: &str = "strata_snapshots";
    /// Snapshot uploads restarted by the agent after a transient failure.
    pub const SNAPSHOT_UPLOAD_RETRIES: &str = "strata_snapshot_upload_retries";
    /// Time from capture to commit.
    pub const SNAPSHOT_SECONDS: &str = "strata_snapshot_seconds";
    /// Time mounted filesystems stayed frozen for a capture (snapshot or clone), failed or not.
    pub const FREEZE_SECONDS: &str = "strata_snapshot_freeze_seconds";
    /// Uploads running now.
    pub const UPLOADS_IN_PROGRESS: &str = "strata_snapshot_uploads_in_progress";
    /// Restores finished, by outcome.
    pub const RESTORES: &str = "strata_restores";
    /// Bytes fetched from the store by restores.
    pub const RESTORE_BYTES: &str = "strata_restore_fetched_bytes";
    /// Restore duration.
    pub const RESTORE_SECONDS: &str = "strata_restore_seconds";
    /// Store operations retried after a transient error.
    pub const STORE_RETRIES: &str = "strata_store_retries";
    /// Volumes hydrating now.
    pub const HYDRATING_VOLUMES: &str = "strata_hydrating_volumes";
    /// Chunks still to fetch, over all hydrating volumes.
    pub const HYDRATION_CHUNKS_PENDING: &str = "strata_hydration_pending_chunks";
    /// Chunks local / in all, per hydrating volume.
    pub const HYDRATION_CHUNKS_LOCAL: &str = "strata_hydration_local_chunks";
    /// Chunks of the snapshot, per hydrating volume.
    pub const HYDRATION_CHUNKS_TOTAL: &str = "strata_hydration_total_chunks";
    /// Chunks fetched ahead of the background queue because a read or write needed them.
    pub const HYDRATION_ON_DEMAND: &str = "strata_hydration_on_demand_chunks";
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VolumeLabels {
    volume: String,
}

/// Gauges of lazy hydration (fed by the agent from the hydrators' status files).
#[derive(Clone, Debug, Default)]
pub struct HydrationMetrics {
    /// Volumes hydrating.
    pub volumes: prometheus_client::metrics::gauge::Gauge,
    /// Chunks still to fetch.
    pub chunks_pending: prometheus_client::metrics::gauge::Gauge,
    local: Family<VolumeLabels, prometheus_client::metrics::gauge::Gauge>,
    total: Family<VolumeLabels, prometheus_client::metrics::gauge::Gauge>,
    /// Chunks fetched on demand, counted when a hydration completes.
    pub on_demand: Counter,
}

impl HydrationMetrics {
    /// Sets a volume's progress.
    pub fn progress(&self, volume: &str, local: u64, total: u64) {
        let l = VolumeLabels {
            volume: volume.to_owned(),
        };
        self.local.get_or_create(&l).set(local as i64);
        self.total.get_or_create(&l).set(total as i64);
    }

    /// Drops a volume that no longer hydrates.
    pub fn forget(&self, volume: &str) {
        let l = VolumeLabels {
            volume: volume.to_owned(),
        };
        self.local.remove(&l);
        self.total.remove(&l);
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    method: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: String,
}

/// The process's metrics.
pub struct Metrics {
    /// Guarded only for encoding and registration.
    registry: Mutex<Registry>,
    requests: Family<RpcLabels, Counter>,
    latency: Family<MethodLabels, Histogram>,
    /// Snapshot engine counters, public so the node's snapshot service can feed them.
    pub snapshot: SnapshotMetrics,
    /// Lazy hydration gauges, fed by the node's hydrator supervision.
    pub hydration: HydrationMetrics,
    store_retries: Counter,
    /// Retries of the process's store (shared with its [`crate::store::retry::Retrying`]),
    /// copied into `store_retries` when encoding.
    store_retry_count: Arc<std::sync::atomic::AtomicU64>,
}

/// Counters of snapshot uploads and restores.
#[derive(Clone, Debug)]
pub struct SnapshotMetrics {
    /// Bytes read from captured images.
    pub bytes_read: Counter,
    /// Bytes uploaded.
    pub bytes_uploaded: Counter,
    /// Bytes reused from parents.
    pub bytes_reused: Counter,
    chunks: Family<OutcomeLabels, Counter>,
    snapshots: Family<OutcomeLabels, Counter>,
    /// Capture-to-commit time.
    pub seconds: Histogram,
    /// Time filesystems stayed frozen per capture.
    pub freeze_seconds: Histogram,
    /// Uploads in progress.
    pub in_progress: prometheus_client::metrics::gauge::Gauge,
    /// Uploads restarted after a transient failure (the store's own retries are counted apart).
    pub upload_retries: Counter,
    restores: Family<OutcomeLabels, Counter>,
    /// Bytes fetched by restores.
    pub restore_bytes: Counter,
    /// Restore time.
    pub restore_seconds: Histogram,
}

impl SnapshotMetrics {
    fn new() -> Self {
        Self {
            bytes_read: Counter::default(),
            bytes_uploaded: Counter::default(),
            bytes_reused: Counter::default(),
            chunks: Family::default(),
            snapshots: Family::default(),
            seconds: Histogram::new(exponential_buckets(0.05, 2.0, 16)),
            freeze_seconds: Histogram::new(exponential_buckets(0.001, 2.0, 16)),
            in_progress: Default::default(),
            upload_retries: Counter::default(),
            restores: Family::default(),
            restore_bytes: Counter::default(),
            restore_seconds: Histogram::new(exponential_buckets(0.05, 2.0, 16)),
        }
    }

    /// Counts a committed snapshot from its manifest statistics.
    pub fn committed(&self, st: &crate::proto::store::Stats, seconds: f64) {
        self.bytes_read.inc_by(st.bytes_read);
        self.bytes_uploaded.inc_by(st.bytes_uploaded);
        self.bytes_reused.inc_by(st.bytes_reused);
        for (outcome, n) in [
            ("new", st.chunks_new),
            ("reused", st.chunks_reused),
            ("zero", st.chunks_zero),
        ] {
            self.chunks
                .get_or_create(&OutcomeLabels {
                    outcome: outcome.into(),
                })
                .inc_by(n);
        }
        self.snapshots
            .get_or_create(&OutcomeLabels {
                outcome: "committed".into(),
            })
            .inc();
        self.seconds.observe(seconds);
    }

    /// Counts an upload restarted after a transient failure.
    pub fn retried(&self) {
        self.upload_retries.inc();
    }

    /// Counts an upload that failed for good.
    pub fn failed(&self) {
        self.snapshots
            .get_or_create(&OutcomeLabels {
                outcome: "failed".into(),
            })
            .inc();
    }

    /// Counts a finished restore.
    pub fn restored(&self, ok: bool, bytes: u64, seconds: f64) {
        let outcome = if ok { "ok" } else { "failed" };
        self.restores
            .get_or_create(&OutcomeLabels {
                outcome: outcome.into(),
            })
            .inc();
        self.restore_bytes.inc_by(bytes);
        self.restore_seconds.observe(seconds);
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::default();
        let requests = Family::<RpcLabels, Counter>::default();
        let latency = Family::<MethodLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(0.001, 2.0, 16))
        });
        registry.register(
            names::CSI_REQUESTS,
            "CSI RPCs served, by method and gRPC code",
            requests.clone(),
        );
        registry.register(
            names::CSI_REQUEST_SECONDS,
            "CSI RPC latency in seconds",
            latency.clone(),
        );
        let snapshot = SnapshotMetrics::new();
        let m = &snapshot;
        registry.register(
            names::SNAPSHOT_BYTES_READ,
            "Bytes of captured images read",
            m.bytes_read.clone(),
        );
        registry.register(
            names::SNAPSHOT_BYTES_UPLOADED,
            "Bytes uploaded by snapshots",
            m.bytes_uploaded.clone(),
        );
        registry.register(
            names::SNAPSHOT_BYTES_REUSED,
            "Bytes reused from parent snapshots",
            m.bytes_reused.clone(),
        );
        registry.register(
            names::SNAPSHOT_CHUNKS,
            "Snapshot chunks by outcome",
            m.chunks.clone(),
        );
        registry.register(
            names::SNAPSHOTS,
            "Snapshot uploads by outcome",
            m.snapshots.clone(),
        );
        registry.register(
            names::SNAPSHOT_UPLOAD_RETRIES,
            "Snapshot uploads restarted after a transient failure",
            m.upload_retries.clone(),
        );
        registry.register(
            names::SNAPSHOT_SECONDS,
            "Capture to commit, seconds",
            m.seconds.clone(),
        );
        registry.register(
            names::FREEZE_SECONDS,
            "Seconds mounted filesystems stayed frozen per capture",
            m.freeze_seconds.clone(),
        );
        registry.register(
            names::UPLOADS_IN_PROGRESS,
            "Snapshot uploads running",
            m.in_progress.clone(),
        );
        registry.register(names::RESTORES, "Restores by outcome", m.restores.clone());
        registry.register(
            names::RESTORE_BYTES,
            "Bytes fetched by restores",
            m.restore_bytes.clone(),
        );
        registry.register(
            names::RESTORE_SECONDS,
            "Restore duration, seconds",
            m.restore_seconds.clone(),
        );
        let hydration = HydrationMetrics::default();
        let h = &hydration;
        registry.register(
            names::HYDRATING_VOLUMES,
            "Volumes hydrating now",
            h.volumes.clone(),
        );
        registry.register(
            names::HYDRATION_CHUNKS_PENDING,
            "Chunks still to fetch over all hydrating volumes",
            h.chunks_pending.clone(),
        );
        registry.register(
            names::HYDRATION_CHUNKS_LOCAL,
            "Chunks already local, per hydrating volume",
            h.local.clone(),
        );
        registry.register(
            names::HYDRATION_CHUNKS_TOTAL,
            "Chunks of the snapshot, per hydrating volume",
            h.total.clone(),
        );
        registry.register(
            names::HYDRATION_ON_DEMAND,
            "Chunks fetched ahead of the background queue for a read or write (counted at completion)",
            h.on_demand.clone(),
        );
        let store_retries = Counter::default();
        registry.register(
            names::STORE_RETRIES,
            "Store operations retried",
            store_retries.clone(),
        );
        Self {
            registry: Mutex::new(registry),
            requests,
            latency,
            snapshot,
            hydration,
            store_retries,
            store_retry_count: Arc::default(),
        }
    }
}

impl Metrics {
    /// Runs one RPC, counting it by outcome and timing it. Failures are logged here, once.
    pub async fn observe<T>(
        &self,
        method: &'static str,
        fut: impl Future<Output = Result<T, tonic::Status>>,
    ) -> Result<T, tonic::Status> {
        let start = Instant::now();
        let r = fut.await.map_err(crate::csi::status::bounded);
        let code = match &r {
            Ok(_) => tonic::Code::Ok,
            Err(s) => s.code(),
        };
        if let Err(s) = &r {
            tracing::warn!(method, code = ?s.code(), message = %s.message(), "CSI call failed");
        }
        self.requests
            .get_or_create(&RpcLabels {
                method: method.into(),
                code: format!("{code:?}"),
            })
            .inc();
        self.latency
            .get_or_create(&MethodLabels {
                method: method.into(),
            })
            .observe(start.elapsed().as_secs_f64());
        r
    }

    /// The counter the process's store counts its retries in (see [`crate::store::open_counting`]).
    pub fn store_retry_count(&self) -> Arc<std::sync::atomic::AtomicU64> {
        self.store_retry_count.clone()
    }

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        // The retry count lives in the store layer (the store opened with `store_retry_count`).
        let retries = self.store_retry_count.load(std::sync::atomic::Ordering::Relaxed);
        self.store_retries
            .inner()
            .store(retries, std::sync::atomic::Ordering::Relaxed);
        let mut out = String::new();
        let reg = self.registry.lock().expect("registry poisoned");
        prometheus_client::encoding::text::encode(&mut out, &reg).expect("writing to a String cannot fail");
        out
    }
}

/// Serves `/metrics` and `/healthz` on `listener` until `shutdown` resolves.
pub async fn serve_http(
    listener: tokio::net::TcpListener,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use axum::routing::get;
    let app = axum::Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route(
            "/metrics",
            get(move || {
                let m = metrics.clone();
                async move { ([("content-type", "text/plain; version=0.0.4")], m.encode()) }
            }),
        );
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "metrics endpoint listening");
    }
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global tracing subscriber. `RUST_LOG` overrides `level`.
pub fn init_logging(format: LogFormat, level: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}
