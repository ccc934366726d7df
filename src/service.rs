//! Starting the long-running processes: `strata controller` and `strata node`.

use std::path::Path;
use std::sync::Arc;

use tokio_stream::wrappers::UnixListenerStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Server;

use crate::agent::auth::CheckToken;
use crate::agent::server::AgentService;
use crate::agent::tls::Transport;
use crate::config::{self, ConfigError, ControllerArgs, NodeArgs};
use crate::controller::directory::{Directory, Discovery};
use crate::csi::controller::ControllerService;
use crate::csi::identity::IdentityService;
use crate::csi::node::NodeService;
use crate::csi::op_guard::OpGuard;
use crate::proto::agent::agent_server::AgentServer;
use crate::proto::csi::controller_server::ControllerServer;
use crate::proto::csi::identity_server::IdentityServer;
use crate::proto::csi::node_server::NodeServer;
use crate::telemetry::{self, Metrics};
use crate::volume::VolumeManager;

/// Why a process could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// Bad configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The storage directory could not be opened.
    #[error("storage directory: {0}")]
    Storage(#[from] crate::volume::Error),
    /// A socket could not be bound or served.
    #[error("{context}: {source}")]
    Io {
        /// What we were doing.
        context: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The Kubernetes API was needed and failed.
    #[error("kubernetes: {0}")]
    Kube(String),
}

fn bind_unix(path: &Path) -> Result<UnixListenerStream, ServiceError> {
    let io = |context: String| move |source| ServiceError::Io { context, source };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io(format!("create {}", dir.display())))?;
    }
    // A socket left by a previous run (crash, kill -9) would make bind fail.
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(format!("remove stale {}", path.display()))(e)),
    }
    let l = tokio::net::UnixListener::bind(path).map_err(io(format!("bind {}", path.display())))?;
    Ok(UnixListenerStream::new(l))
}

/// The snapshot store, when one is configured (both roles take the same `--store`).
async fn open_store(
    url: Option<&str>,
    metrics: &Metrics,
) -> Result<Option<crate::store::Store>, ServiceError> {
    match url {
        Some(url) => {
            let store = crate::store::open_counting(url, metrics.store_retry_count())
                .await
                .map_err(|e| ConfigError::Invalid(format!("store: {e}")))?;
            Ok(Some(store))
        }
        None => Ok(None),
    }
}

/// A client for the cluster this process runs in (or the one KUBECONFIG names).
async fn kube_client() -> Result<kube::Client, ServiceError> {
    kube::Client::try_default()
        .await
        .map_err(|e| ServiceError::Kube(e.to_string()))
}

/// Binds the metrics endpoint before serving anything else: a port still held (by the previous
/// pod of a rolling update on the host network, say) fails the start, so the process is restarted
/// until it can bind instead of running without `/metrics`.
async fn spawn_metrics(
    addr: Option<std::net::SocketAddr>,
    metrics: Arc<Metrics>,
    cancel: &CancellationToken,
) -> Result<(), ServiceError> {
    let Some(addr) = addr else { return Ok(()) };
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|source| ServiceError::Io {
            context: format!("bind the metrics endpoint {addr}"),
            source,
        })?;
    let c = cancel.clone();
    tokio::spawn(async move {
        if let Err(e) = telemetry::serve_http(listener, metrics, async move { c.cancelled().await }).await {
            tracing::error!(%addr, error = %e, "metrics endpoint failed");
        }
    });
    Ok(())
}

/// Runs the controller until `cancel` fires.
pub async fn run_controller(args: ControllerArgs, cancel: CancellationToken) -> Result<(), ServiceError> {
    let args = args.resolve()?;
    let socket = config::socket_path(
        args.csi_endpoint
            .as_deref()
            .unwrap_or("/run/strata/controller.sock"),
    )?;
    let token = config::agent_token(&args.agent_token_file)?;
    let transport = crate::agent::tls::client_transport(
        args.agent_tls_cert.as_deref(),
        args.agent_tls_key.as_deref(),
        args.agent_tls_ca.as_deref(),
        args.agent_tls_server_name.as_deref(),
        args.agent_insecure.unwrap_or(false),
    )
    .map_err(ConfigError::from)?;
    match &transport {
        Transport::Tls(tls) => tracing::info!(?tls, "calling agents over TLS"),
        Transport::Insecure => tracing::warn!("calling agents in plaintext (--agent-insecure)"),
    }
    let discovery = match args.agent_discovery.as_deref().unwrap_or("static") {
        "static" => Discovery::Static(config::parse_agents(args.agents.as_deref().unwrap_or(""))?),
        "kube" => Discovery::Kube {
            client: kube_client().await?,
            namespace: args
                .agent_namespace
                .clone()
                .unwrap_or_else(|| "kube-system".into()),
            selector: args
                .agent_selector
                .clone()
                .unwrap_or_else(|| "app.kubernetes.io/name=strata,app.kubernetes.io/component=node".into()),
            port: args.agent_port.unwrap_or(7001),
        },
        other => {
            return Err(
                ConfigError::Invalid(format!("unknown agent discovery {other:?} (static or kube)")).into(),
            )
        }
    };
    let metrics = Arc::new(Metrics::default());
    spawn_metrics(args.metrics_addr, metrics.clone(), &cancel).await?;
    let gc_grace = crate::config::gc_grace(args.gc_grace_seconds)?;
    let store = open_store(args.store.as_deref(), &metrics).await?;
    let gc_kick = Arc::new(tokio::sync::Notify::new());
    if let Some(store) = &store {
        tokio::spawn(crate::csi::controller_snapshots::gc_loop(
            store.clone(),
            gc_kick.clone(),
            gc_grace,
            std::time::Duration::from_secs(args.gc_interval_seconds.unwrap_or(600)),
            cancel.clone(),
        ));
        let (store, cancel) = (store.clone(), cancel.clone());
        let interval = std::time::Duration::from_millis(args.fsr_interval_ms.unwrap_or(5000));
        tokio::spawn(async move {
            loop {
                if let Err(e) = crate::snapshot::fsr::advance(&store).await {
                    tracing::warn!(error = %e, "fast restore states not advanced");
                }
                tokio::select! {
                    _ = cancel.cancelled() => return,
                    _ = tokio::time::sleep(interval) => {}
                }
            }
        });
    }
    let controller = ControllerService {
        directory: Arc::new(Directory::new(discovery, token, transport)),
        guard: OpGuard::default(),
        metrics,
        store,
        manifests: Default::default(),
        gc_kick,
    };
    let controller = Arc::new(controller);
    let identity = IdentityService {
        controller: true,
        ready: Arc::new(|| true),
    };
    let incoming = bind_unix(&socket)?;
    tracing::info!(socket = %socket.display(), "controller serving CSI");
    Server::builder()
        .add_service(IdentityServer::new(identity))
        .add_service(ControllerServer::from_arc(controller.clone()))
        .add_service(crate::proto::csi::group_controller_server::GroupControllerServer::from_arc(controller))
        .serve_with_incoming_shutdown(incoming, cancel.cancelled())
        .await?;
    Ok(())
}

/// Runs a node plugin (CSI Node for the kubelet, agent API for the controller) until `cancel` fires.
pub async fn run_node(args: NodeArgs, cancel: CancellationToken) -> Result<(), ServiceError> {
    let args = args.resolve()?;
    let socket = config::socket_path(args.csi_endpoint.as_deref().unwrap_or("/run/strata/node.sock"))?;
    let node_name = args
        .node_name
        .clone()
        .ok_or_else(|| ConfigError::Invalid("--node-name (or NODE_NAME) is required".into()))?;
    crate::ids::check_name("node name", &node_name).map_err(ConfigError::Invalid)?;
    let token = config::agent_token(&args.agent_token_file)?;
    // Checked before anything starts: a TLS file that is missing or wrong stops the node here.
    let agent_addr = config::agent_listen(args.agent_listen, args.pod_ip)?;
    let transport = crate::agent::tls::server_transport(
        args.agent_tls_cert.as_deref(),
        args.agent_tls_key.as_deref(),
        args.agent_tls_ca.as_deref(),
        args.agent_insecure.unwrap_or(false),
    )
    .map_err(ConfigError::from)?;
    let zone = match args.zone.clone() {
        Some(z) => z,
        // In a cluster (or with a kubeconfig), the Node object's zone label is the source.
        None if std::env::var_os("KUBERNETES_SERVICE_HOST").is_some()
            || std::env::var_os("KUBECONFIG").is_some() =>
        {
            crate::kube::zone_of_node(&kube_client().await?, &node_name)
                .await
                .map_err(|e| ServiceError::Kube(e.to_string()))?
        }
        None => String::new(),
    };
    let storage = args
        .storage_dir
        .clone()
        .unwrap_or_else(|| "/var/lib/strata".into());
    let metrics = Arc::new(Metrics::default());
    let manager = Arc::new(
        VolumeManager::open(&storage, &node_name, args.max_volumes.unwrap_or(256))?.with_freeze_limit(
            config::max_freeze(args.max_freeze_secs)?,
            metrics.snapshot.freeze_seconds.clone(),
        ),
    );
    // Before anything else: a capture interrupted by a crash may have left volumes frozen, and
    // every writer of them hangs until they are thawed.
    manager.freezer().thaw_leftovers().await;
    let guard = OpGuard::default();
    spawn_metrics(args.metrics_addr, metrics.clone(), &cancel).await?;

    let store = open_store(args.store.as_deref(), &metrics).await?;
    let concurrency = args.transfer_concurrency.unwrap_or(8).max(1);
    let mut hydrators = crate::hydrate::supervise::Hydrators::new(
        manager.clone(),
        args.store.clone(),
        concurrency,
        args.hydration_bandwidth_mib.unwrap_or(0),
        metrics.clone(),
    );
    if let Some(template) = &args.hydrator_pod_template {
        let client = kube_client().await?;
        let namespace = args.pod_namespace.clone().ok_or_else(|| {
            ConfigError::Invalid("--hydrator-pod-template needs --pod-namespace (or POD_NAMESPACE)".into())
        })?;
        let launcher = crate::hydrate::pods::PodLauncher::new(
            client,
            &namespace,
            &node_name,
            &storage.to_string_lossy(),
            &template.to_string_lossy(),
        )
        .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        tracing::info!(%namespace, "hydrators run as pods");
        hydrators = hydrators.with_pods(launcher);
    }
    let hydrators = Arc::new(hydrators);
    {
        // Resumes hydrations after a restart or reboot, retires finished ones, feeds metrics.
        let (h, g, c) = (hydrators.clone(), guard.clone(), cancel.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = c.cancelled() => break,
                    _ = tick.tick() => h.tick(&g).await,
                }
            }
        });
    }
    let chunk_size = config::check_chunk_size(args.chunk_size.unwrap_or(4 << 20))?;
    let snapshots = crate::snapshot::node::NodeSnapshots::new(
        manager.clone(),
        store,
        chunk_size,
        concurrency,
        metrics.clone(),
    );
    snapshots.resume();
    {
        let (s, c) = (snapshots.clone(), cancel.clone());
        tokio::spawn(async move {
            c.cancelled().await;
            s.stop_uploads();
        });
    }
    tokio::spawn(snapshots.clone().fast_restore_loop(
        zone.clone(),
        std::time::Duration::from_millis(args.fsr_interval_ms.unwrap_or(5000)),
        cancel.clone(),
    ));
    let agent = AgentService {
        manager: manager.clone(),
        guard: guard.clone(),
        zone: zone.clone(),
        snapshots,
        hydrators: hydrators.clone(),
    };
    let agent_listener = tokio::net::TcpListener::bind(agent_addr)
        .await
        .map_err(|source| ServiceError::Io {
            context: format!("bind agent {agent_addr}"),
            source,
        })?;
    let agent_cancel = cancel.clone();
    let mut agent_server = Server::builder();
    let agent_tls = match &transport {
        Transport::Tls(tls) => {
            agent_server = agent_server.tls_config(tls.config())?;
            if tls.mutual() {
                "mutual TLS"
            } else {
                "TLS"
            }
        }
        Transport::Insecure => {
            tracing::warn!(agent = %agent_addr, "agent API in plaintext (--agent-insecure)");
            "plaintext"
        }
    };
    let agent_task = tokio::spawn(
        agent_server
            .add_service(AgentServer::with_interceptor(agent, CheckToken(token)))
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(agent_listener),
                async move { agent_cancel.cancelled().await },
            ),
    );

    let root = manager.root().to_owned();
    let identity = IdentityService {
        controller: false,
        ready: Arc::new(move || root.is_dir()),
    };
    let node = NodeService {
        manager,
        hydrators,
        guard,
        zone: zone.clone(),
        metrics,
    };
    let incoming = bind_unix(&socket)?;
    tracing::info!(node = %node_name, zone = %zone, socket = %socket.display(), agent = %agent_addr, agent_tls, storage = %storage.display(), "node serving");
    let csi = Server::builder()
        .add_service(IdentityServer::new(identity))
        .add_service(NodeServer::new(node))
        .serve_with_incoming_shutdown(incoming, cancel.cancelled())
        .await;
    cancel.cancel();
    let agent_result = agent_task.await.expect("agent server task panicked");
    csi?;
    agent_result?;
    Ok(())
}

/// A token cancelled on SIGINT or SIGTERM.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}
