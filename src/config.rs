//! Configuration: flags, with environment fallbacks, over an optional YAML file (`--config`).
//! Precedence: flag > environment > file > built-in default.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::Args;
use serde::Deserialize;

/// Configuration errors (reported before anything starts).
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The YAML file could not be read or parsed.
    #[error("config file {path}: {message}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A value is missing or malformed.
    #[error("{0}")]
    Invalid(String),
    /// The agent API's TLS files or flags.
    #[error(transparent)]
    Tls(#[from] crate::agent::tls::TlsError),
}

/// `strata controller` settings.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct ControllerArgs {
    /// YAML file with any of these settings (camelCase keys).
    #[arg(long, env = "STRATA_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// CSI endpoint: a unix socket path (`unix://` prefix accepted).
    #[arg(long, env = "CSI_ENDPOINT")]
    pub csi_endpoint: Option<String>,
    /// Agent discovery: `static` (use --agents) or `kube` (pods of the node DaemonSet).
    #[arg(long, env = "STRATA_AGENT_DISCOVERY")]
    pub agent_discovery: Option<String>,
    /// Static agent map: `node-a=127.0.0.1:7001,node-b=127.0.0.1:7002`.
    #[arg(long, env = "STRATA_AGENTS")]
    pub agents: Option<String>,
    /// Namespace of the node DaemonSet (kube discovery).
    #[arg(long, env = "POD_NAMESPACE")]
    pub agent_namespace: Option<String>,
    /// Label selector of the node DaemonSet's pods (kube discovery).
    #[arg(long, env = "STRATA_AGENT_SELECTOR")]
    pub agent_selector: Option<String>,
    /// Agent port on the node pods (kube discovery).
    #[arg(long, env = "STRATA_AGENT_PORT")]
    pub agent_port: Option<u16>,
    /// File holding the shared agent token.
    #[arg(long, env = "STRATA_AGENT_TOKEN_FILE")]
    pub agent_token_file: Option<PathBuf>,
    /// CA certificate (PEM) that verifies the agents' certificates.
    #[arg(long, env = "STRATA_AGENT_TLS_CA")]
    pub agent_tls_ca: Option<PathBuf>,
    /// Certificate (PEM) presented to agents that require client certificates.
    #[arg(long, env = "STRATA_AGENT_TLS_CERT")]
    pub agent_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `--agent-tls-cert`.
    #[arg(long, env = "STRATA_AGENT_TLS_KEY")]
    pub agent_tls_key: Option<PathBuf>,
    /// DNS name verified in the agents' certificates instead of their (changing) pod addresses
    /// (default `strata-agent`).
    #[arg(long, env = "STRATA_AGENT_TLS_SERVER_NAME")]
    pub agent_tls_server_name: Option<String>,
    /// Call agents in plaintext, without TLS (loopback test beds only).
    #[arg(long, env = "STRATA_AGENT_INSECURE", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub agent_insecure: Option<bool>,
    /// Address for `/metrics` and `/healthz`; none by default.
    #[arg(long, env = "STRATA_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Snapshot store: a directory path, or `s3://bucket/prefix?endpoint=..&region=..&path_style=true`.
    #[arg(long, env = "STRATA_STORE")]
    pub store: Option<String>,
    /// Unreferenced chunks younger than this many seconds (by the store's clock) are kept by GC
    /// (default 3600, at least 10: see `snapshot::gc`).
    #[arg(long, env = "STRATA_GC_GRACE_SECONDS")]
    pub gc_grace_seconds: Option<u64>,
    /// Seconds between periodic GC runs (default 600); GC also runs shortly after every delete.
    #[arg(long, env = "STRATA_GC_INTERVAL_SECONDS")]
    pub gc_interval_seconds: Option<u64>,
    /// Milliseconds between fast-restore state updates (default 5000).
    #[arg(long, env = "STRATA_FSR_INTERVAL_MS")]
    pub fsr_interval_ms: Option<u64>,
}

/// `strata node` settings.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(default, deny_unknown_fields, rename_all = "camelCase")]
pub struct NodeArgs {
    /// YAML file with any of these settings (camelCase keys).
    #[arg(long, env = "STRATA_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// CSI endpoint for the kubelet: a unix socket path (`unix://` prefix accepted).
    #[arg(long, env = "CSI_ENDPOINT")]
    pub csi_endpoint: Option<String>,
    /// This node's name (the Kubernetes Node name in a cluster).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// This node's zone; in a cluster, read from the Node's topology.kubernetes.io/zone label when unset.
    #[arg(long, env = "STRATA_ZONE")]
    pub zone: Option<String>,
    /// Storage directory for backing files and records.
    #[arg(long, env = "STRATA_STORAGE_DIR")]
    pub storage_dir: Option<PathBuf>,
    /// Address the agent API listens on (default: this pod's address, `--pod-ip`, port 7001).
    #[arg(long, env = "STRATA_AGENT_LISTEN")]
    pub agent_listen: Option<SocketAddr>,
    /// This pod's IP address (the downward API's `status.podIP`): the agent listens there when
    /// `--agent-listen` is unset.
    #[arg(long, env = "POD_IP")]
    pub pod_ip: Option<IpAddr>,
    /// File holding the shared agent token.
    #[arg(long, env = "STRATA_AGENT_TOKEN_FILE")]
    pub agent_token_file: Option<PathBuf>,
    /// Certificate (PEM) the agent API serves.
    #[arg(long, env = "STRATA_AGENT_TLS_CERT")]
    pub agent_tls_cert: Option<PathBuf>,
    /// Private key (PEM) of `--agent-tls-cert`.
    #[arg(long, env = "STRATA_AGENT_TLS_KEY")]
    pub agent_tls_key: Option<PathBuf>,
    /// CA certificate (PEM) of the controller's client certificate: when given, callers must
    /// present a certificate it signed (mutual TLS).
    #[arg(long, env = "STRATA_AGENT_TLS_CA")]
    pub agent_tls_ca: Option<PathBuf>,
    /// Serve the agent API in plaintext, without TLS (loopback test beds only).
    #[arg(long, env = "STRATA_AGENT_INSECURE", num_args = 0..=1, require_equals = true, default_missing_value = "true")]
    pub agent_insecure: Option<bool>,
    /// Most volumes this node holds.
    #[arg(long, env = "STRATA_MAX_VOLUMES")]
    pub max_volumes: Option<u32>,
    /// Address for `/metrics` and `/healthz`; none by default.
    #[arg(long, env = "STRATA_METRICS_ADDR")]
    pub metrics_addr: Option<SocketAddr>,
    /// Snapshot store (same forms as the controller's).
    #[arg(long, env = "STRATA_STORE")]
    pub store: Option<String>,
    /// Chunk size of new snapshot lineages in bytes: a power of two from 64 KiB to 64 MiB (default 4 MiB).
    #[arg(long, env = "STRATA_CHUNK_SIZE")]
    pub chunk_size: Option<u32>,
    /// Parallel chunk transfers per upload or restore (default 8).
    #[arg(long, env = "STRATA_TRANSFER_CONCURRENCY")]
    pub transfer_concurrency: Option<usize>,
    /// Milliseconds between fast-restore rounds: hydrate, drop, publish (default 5000).
    #[arg(long, env = "STRATA_FSR_INTERVAL_MS")]
    pub fsr_interval_ms: Option<u64>,
    /// Cap on background hydration per restored volume, MiB/s (default 0: unlimited). Reads and
    /// writes that need a chunk first are never held back by it.
    #[arg(long, env = "STRATA_HYDRATION_BANDWIDTH_MIB")]
    pub hydration_bandwidth_mib: Option<u64>,
    /// In a cluster: a YAML Pod template (rendered by the chart) from which hydrators are started
    /// as pods of their own, so that they outlive this process's container. Without it hydrators
    /// are child processes.
    #[arg(long, env = "STRATA_HYDRATOR_POD_TEMPLATE")]
    pub hydrator_pod_template: Option<PathBuf>,
    /// Longest time, in seconds, a mounted filesystem stays frozen for a snapshot or clone
    /// (default 10). A capture that cannot finish in time (a full copy on storage without
    /// reflinks) is stopped, thawed and refused with FAILED_PRECONDITION.
    #[arg(long, env = "STRATA_MAX_FREEZE_SECS")]
    pub max_freeze_secs: Option<u64>,
    /// Namespace of the hydrator pods (the node plugin's own).
    #[arg(long = "pod-namespace", env = "POD_NAMESPACE")]
    pub pod_namespace: Option<String>,
}

fn load<T: for<'de> Deserialize<'de> + Default>(path: &Option<PathBuf>) -> Result<T, ConfigError> {
    let Some(path) = path else { return Ok(T::default()) };
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
        path: path.clone(),
        message: e.to_string(),
    })?;
    serde_yaml::from_str(&text).map_err(|e| ConfigError::File {
        path: path.clone(),
        message: e.to_string(),
    })
}

/// The CSI socket path from an endpoint string.
pub fn socket_path(endpoint: &str) -> Result<PathBuf, ConfigError> {
    let p = endpoint.strip_prefix("unix://").unwrap_or(endpoint);
    if !p.starts_with('/') {
        return Err(ConfigError::Invalid(format!(
            "CSI endpoint {endpoint:?} must be an absolute unix socket path"
        )));
    }
    Ok(PathBuf::from(p))
}

/// Checks a chunk size: a power of two from 64 KiB to 64 MiB.
pub fn check_chunk_size(n: u32) -> Result<u32, ConfigError> {
    if !n.is_power_of_two() || !(64 << 10..=64 << 20).contains(&n) {
        return Err(ConfigError::Invalid(format!(
            "chunk size {n} must be a power of two from 64 KiB to 64 MiB"
        )));
    }
    Ok(n)
}

/// The GC grace from its setting in seconds (default 3600): refused below
/// [`crate::snapshot::gc::MIN_GRACE`].
pub fn gc_grace(seconds: Option<u64>) -> Result<std::time::Duration, ConfigError> {
    let grace = std::time::Duration::from_secs(seconds.unwrap_or(3600));
    crate::snapshot::gc::check_grace(grace).map_err(|_| {
        ConfigError::Invalid(format!(
            "gcGraceSeconds {} is below the minimum of {} s: GC could delete chunks of uploads in progress",
            grace.as_secs(),
            crate::snapshot::gc::MIN_GRACE.as_secs()
        ))
    })
}

/// The freeze limit from its setting in seconds (default
/// [`crate::snapshot::capture::DEFAULT_MAX_FREEZE`]): at least 1 s, and below the controller's 50 s
/// agent timeout, so that a refused capture is answered before the caller gives up.
pub fn max_freeze(seconds: Option<u64>) -> Result<std::time::Duration, ConfigError> {
    let Some(s) = seconds else {
        return Ok(crate::snapshot::capture::DEFAULT_MAX_FREEZE);
    };
    if !(1..=40).contains(&s) {
        return Err(ConfigError::Invalid(format!(
            "maxFreezeSecs {s} must be from 1 to 40: writers of a frozen volume hang, and the controller \
             waits 50 s for the agent"
        )));
    }
    Ok(std::time::Duration::from_secs(s))
}

/// Parses `node=host:port,...`.
pub fn parse_agents(s: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut m = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (node, addr) = part
            .split_once('=')
            .ok_or_else(|| ConfigError::Invalid(format!("agent entry {part:?} is not node=host:port")))?;
        crate::ids::check_name("node name", node).map_err(ConfigError::Invalid)?;
        if !addr.contains(':') {
            return Err(ConfigError::Invalid(format!(
                "agent address {addr:?} needs a port"
            )));
        }
        m.insert(node.to_owned(), addr.to_owned());
    }
    Ok(m)
}

/// Reads the agent token: `STRATA_AGENT_TOKEN`, else the token file.
pub fn agent_token(file: &Option<PathBuf>) -> Result<crate::agent::auth::Token, ConfigError> {
    let raw = match (std::env::var("STRATA_AGENT_TOKEN"), file) {
        (Ok(t), _) if !t.is_empty() => t,
        (_, Some(f)) => std::fs::read_to_string(f)
            .map_err(|e| ConfigError::Invalid(format!("agent token file {}: {e}", f.display())))?,
        _ => {
            return Err(ConfigError::Invalid(
                "an agent token is required (--agent-token-file or STRATA_AGENT_TOKEN): the agent API is never open".into(),
            ))
        }
    };
    crate::agent::auth::Token::new(&raw).map_err(ConfigError::Invalid)
}

/// Port of the agent API when `--agent-listen` is unset.
pub const DEFAULT_AGENT_PORT: u16 = 7001;

/// The agent's listen address: `--agent-listen`, else this pod's IP with port 7001. Never every
/// address by default: the agent API belongs on the pod network only, and outside a pod there is
/// no address that is right for every machine (loopback would leave a multi-machine setup
/// silently unreachable), so one must be given.
pub fn agent_listen(listen: Option<SocketAddr>, pod_ip: Option<IpAddr>) -> Result<SocketAddr, ConfigError> {
    match (listen, pod_ip) {
        (Some(addr), _) => Ok(addr),
        (None, Some(ip)) => Ok(SocketAddr::new(ip, DEFAULT_AGENT_PORT)),
        (None, None) => Err(ConfigError::Invalid(
            "--agent-listen (or STRATA_AGENT_LISTEN) is required when POD_IP is unset: the agent \
             listens on its pod's address by default, never on all addresses"
                .into(),
        )),
    }
}

macro_rules! merge_fields {
    ($cli:expr, $file:expr, $($f:ident),*) => {{
        let (mut c, f) = ($cli, $file);
        $( if c.$f.is_none() { c.$f = f.$f; } )*
        c
    }};
}

impl ControllerArgs {
    /// Flags over the config file.
    pub fn resolve(self) -> Result<Self, ConfigError> {
        let file: Self = load(&self.config)?;
        Ok(merge_fields!(
            self,
            file,
            csi_endpoint,
            agent_discovery,
            agents,
            agent_namespace,
            agent_selector,
            agent_port,
            agent_token_file,
            agent_tls_ca,
            agent_tls_cert,
            agent_tls_key,
            agent_tls_server_name,
            agent_insecure,
            metrics_addr,
            store,
            gc_grace_seconds,
            gc_interval_seconds,
            fsr_interval_ms
        ))
    }
}

impl NodeArgs {
    /// Flags over the config file.
    pub fn resolve(self) -> Result<Self, ConfigError> {
        let file: Self = load(&self.config)?;
        Ok(merge_fields!(
            self,
            file,
            csi_endpoint,
            node_name,
            zone,
            storage_dir,
            agent_listen,
            pod_ip,
            agent_token_file,
            agent_tls_cert,
            agent_tls_key,
            agent_tls_ca,
            agent_insecure,
            max_volumes,
            metrics_addr,
            store,
            chunk_size,
            transfer_concurrency,
            fsr_interval_ms,
            hydration_bandwidth_mib,
            hydrator_pod_template,
            max_freeze_secs,
            pod_namespace
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_win_over_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(&f, "nodeName: from-file\nzone: z-file\nmaxVolumes: 9\n").unwrap();
        let a = NodeArgs {
            config: Some(f),
            zone: Some("z-flag".into()),
            ..Default::default()
        }
        .resolve()
        .unwrap();
        assert_eq!(a.node_name.as_deref(), Some("from-file"));
        assert_eq!(a.zone.as_deref(), Some("z-flag"));
        assert_eq!(a.max_volumes, Some(9));
    }

    #[test]
    fn unknown_keys_and_bad_agents_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("c.yaml");
        std::fs::write(&f, "nodeNmae: typo\n").unwrap();
        assert!(NodeArgs {
            config: Some(f),
            ..Default::default()
        }
        .resolve()
        .is_err());
        assert!(parse_agents("a=1.2.3.4").is_err());
        assert_eq!(parse_agents("a=127.0.0.1:1, b=127.0.0.1:2").unwrap().len(), 2);
        assert!(socket_path("relative.sock").is_err());
        assert!(gc_grace(Some(0)).is_err());
        assert!(gc_grace(Some(9))
            .unwrap_err()
            .to_string()
            .contains("minimum of 10 s"));
        assert_eq!(gc_grace(Some(10)).unwrap().as_secs(), 10);
        assert_eq!(gc_grace(None).unwrap().as_secs(), 3600);
        assert!(agent_listen(None, None)
            .unwrap_err()
            .to_string()
            .contains("--agent-listen"));
        assert_eq!(
            agent_listen(None, Some("10.1.2.3".parse().unwrap())).unwrap(),
            "10.1.2.3:7001".parse().unwrap()
        );
        assert_eq!(
            agent_listen(
                Some("127.0.0.1:9".parse().unwrap()),
                Some("10.1.2.3".parse().unwrap())
            )
            .unwrap(),
            "127.0.0.1:9".parse().unwrap()
        );
        assert!(max_freeze(Some(0)).is_err());
        assert!(max_freeze(Some(41)).is_err());
        assert_eq!(max_freeze(Some(1)).unwrap().as_secs(), 1);
        assert_eq!(max_freeze(None).unwrap().as_secs(), 10);
        assert_eq!(
            socket_path("unix:///csi/csi.sock").unwrap(),
            PathBuf::from("/csi/csi.sock")
        );
    }
}
