//! Logs (tracing, text or JSON) and Prometheus metrics with a `/metrics` + `/healthz` endpoint.

use std::future::Future;
use std::net::SocketAddr;
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
        Self {
            registry: Mutex::new(registry),
            requests,
            latency,
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
        let r = fut.await;
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

    /// Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let reg = self.registry.lock().expect("registry poisoned");
        prometheus_client::encoding::text::encode(&mut out, &reg).expect("writing to a String cannot fail");
        out
    }
}

/// Serves `/metrics` and `/healthz` until `shutdown` resolves.
pub async fn serve_http(
    addr: SocketAddr,
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
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics endpoint listening");
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
