//! Hydrators in pods of their own ("mount pods"), for Kubernetes.
//!
//! A hydrator started as a child of the node plugin lives in the plugin container: a restart of
//! that container (every `helm upgrade`) kills it, and volumes still hydrating then fail I/O. In a
//! cluster the agent therefore starts each hydrator as a Pod on its own node, from a template the
//! chart renders (image, store environment and credentials, privileges, the storage directory
//! with Bidirectional propagation so the FUSE file reaches the host and the node plugin). The pod
//! outlives the plugin's container; a new plugin finds the file served and carries on. The agent
//! deletes the pod once the hydrator has ended (unmounted, retired or abandoned).

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams};
use serde_json::{json, Value};

/// Label on every hydrator pod: the volume it serves.
pub const VOLUME_LABEL: &str = "strata.csi.dev/hydrator-volume";
/// Label on every hydrator pod: the node it runs on.
pub const NODE_LABEL: &str = "strata.csi.dev/hydrator-node";

/// Why a hydrator pod could not be managed.
#[derive(Debug, thiserror::Error)]
pub enum PodError {
    /// The template is not a usable Pod.
    #[error("hydrator pod template {path}: {reason}")]
    Template {
        /// The template file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The API server refused or failed.
    #[error("hydrator pod {name}: {source}")]
    Api {
        /// The pod.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

/// Starts and stops hydrator pods on one node.
#[derive(Clone)]
pub struct PodLauncher {
    client: kube::Client,
    namespace: String,
    node: String,
    storage_dir: String,
    template: Value,
}

impl std::fmt::Debug for PodLauncher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodLauncher")
            .field("namespace", &self.namespace)
            .field("node", &self.node)
            .finish()
    }
}

/// What a hydrator pod is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PodState {
    /// No such pod.
    Absent,
    /// Created, starting or running.
    Active,
    /// Ended (`Succeeded` or `Failed`), with its phase.
    Ended(String),
}

impl PodLauncher {
    /// A launcher for pods in `namespace` on `node` from the YAML Pod template at `path`. The
    /// template's first container runs the strata image; its volume `storage-dir` is pointed at
    /// `storage_dir`.
    pub fn new(
        client: kube::Client,
        namespace: &str,
        node: &str,
        storage_dir: &str,
        path: &str,
    ) -> Result<Self, PodError> {
        let bad = |reason: String| PodError::Template {
            path: path.to_owned(),
            reason,
        };
        let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
        let template: Value = serde_yaml::from_str(&text).map_err(|e| bad(e.to_string()))?;
        let pod: Pod = serde_json::from_value(template.clone()).map_err(|e| bad(e.to_string()))?;
        let spec = pod.spec.ok_or_else(|| bad("no spec".into()))?;
        if spec.containers.is_empty() {
            return Err(bad("no container".into()));
        }
        let has_storage = spec
            .volumes
            .iter()
            .flatten()
            .any(|v| v.name == "storage-dir" && v.host_path.is_some());
        if !has_storage {
            return Err(bad("no hostPath volume named storage-dir".into()));
        }
        Ok(Self {
            client,
            namespace: namespace.to_owned(),
            node: node.to_owned(),
            storage_dir: storage_dir.to_owned(),
            template,
        })
    }

    fn api(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The pod name for a volume (volume ids are `vol-<uuid>`: a valid DNS label).
    pub fn name(volume_id: &str) -> String {
        format!("hydrate-{volume_id}")
    }

    /// The pod for `volume_id`, running `args` (after the binary) with `env` added.
    fn pod(&self, volume_id: &str, args: &[String], env: &[(&str, &str)]) -> Result<Pod, PodError> {
        let mut t = self.template.clone();
        let name = Self::name(volume_id);
        t["metadata"]["name"] = json!(name);
        t["metadata"]["namespace"] = json!(self.namespace);
        let labels = t["metadata"]["labels"].as_object().cloned().unwrap_or_default();
        let mut labels = Value::Object(labels);
        labels[VOLUME_LABEL] = json!(volume_id);
        labels[NODE_LABEL] = json!(self.node);
        t["metadata"]["labels"] = labels;
        t["spec"]["nodeName"] = json!(self.node);
        t["spec"]["restartPolicy"] = json!("Never");
        let c = &mut t["spec"]["containers"][0];
        c["args"] = json!(args);
        let mut envs = c["env"].as_array().cloned().unwrap_or_default();
        for (k, v) in env {
            envs.push(json!({"name": k, "value": v}));
        }
        c["env"] = Value::Array(envs);
        if let Some(mounts) = c["volumeMounts"].as_array_mut() {
            for m in mounts.iter_mut().filter(|m| m["name"] == "storage-dir") {
                m["mountPath"] = json!(self.storage_dir);
            }
        }
        if let Some(vols) = t["spec"]["volumes"].as_array_mut() {
            for v in vols.iter_mut().filter(|v| v["name"] == "storage-dir") {
                v["hostPath"]["path"] = json!(self.storage_dir);
            }
        }
        serde_json::from_value(t).map_err(|e| PodError::Template {
            path: name,
            reason: e.to_string(),
        })
    }

    /// What the volume's hydrator pod is doing.
    pub async fn state(&self, volume_id: &str) -> Result<PodState, PodError> {
        let name = Self::name(volume_id);
        let pod = self
            .api()
            .get_opt(&name)
            .await
            .map_err(|source| PodError::Api { name, source })?;
        Ok(match pod {
            None => PodState::Absent,
            Some(p) => match p.status.and_then(|s| s.phase).as_deref() {
                Some(ph @ ("Succeeded" | "Failed")) => PodState::Ended(ph.to_owned()),
                _ if p.metadata.deletion_timestamp.is_some() => PodState::Ended("Terminating".into()),
                _ => PodState::Active,
            },
        })
    }

    /// Starts the hydrator pod of `volume_id`, replacing an ended one of the same name.
    pub async fn start(
        &self,
        volume_id: &str,
        args: &[String],
        env: &[(&str, &str)],
    ) -> Result<(), PodError> {
        let name = Self::name(volume_id);
        if self.state(volume_id).await? != PodState::Absent {
            self.delete(volume_id, Duration::from_secs(30)).await?;
        }
        let pod = self.pod(volume_id, args, env)?;
        self.api()
            .create(&PostParams::default(), &pod)
            .await
            .map_err(|source| PodError::Api { name, source })?;
        Ok(())
    }

    /// Deletes the volume's hydrator pod and waits up to `wait` until it is gone.
    pub async fn delete(&self, volume_id: &str, wait: Duration) -> Result<(), PodError> {
        let name = Self::name(volume_id);
        match self
            .api()
            .delete(&name, &DeleteParams::default().grace_period(5))
            .await
        {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 404 => return Ok(()),
            Err(source) => return Err(PodError::Api { name, source }),
        }
        let deadline = tokio::time::Instant::now() + wait;
        while tokio::time::Instant::now() < deadline {
            if self.state(volume_id).await? == PodState::Absent {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// The last lines the pod logged, for an error message.
    pub async fn log_tail(&self, volume_id: &str) -> String {
        let params = LogParams {
            tail_lines: Some(3),
            ..Default::default()
        };
        self.api()
            .logs(&Self::name(volume_id), &params)
            .await
            .unwrap_or_default()
            .lines()
            .collect::<Vec<_>>()
            .join(" | ")
    }

    /// Volume ids of this node's hydrator pods that have ended.
    pub async fn ended(&self) -> Result<Vec<String>, PodError> {
        let lp = ListParams::default().labels(&format!("{NODE_LABEL}={}", self.node));
        let pods = self.api().list(&lp).await.map_err(|source| PodError::Api {
            name: "list".into(),
            source,
        })?;
        Ok(pods
            .items
            .into_iter()
            .filter(|p| {
                matches!(
                    p.status.as_ref().and_then(|s| s.phase.as_deref()),
                    Some("Succeeded" | "Failed")
                )
            })
            .filter_map(|p| p.metadata.labels.and_then(|l| l.get(VOLUME_LABEL).cloned()))
            .collect())
    }
}
