//! `strata wait-ready`: waits until every DaemonSet and Deployment of a release has rolled out
//! (every pod updated and ready), the chart's post-install and post-upgrade hook.
//!
//! Helm's own `--wait` counts a DaemonSet ready when at most `maxUnavailable` of its pods are not;
//! the node DaemonSets run one pod per node with `maxUnavailable: 1`, so on a one-node group helm
//! returns while the only pod crashes. A hook Job is waited for by helm, so `helm install` returns
//! only once the driver serves everywhere (a pod is ready only when the driver answers CSI Probe),
//! and fails with this verb's log otherwise.

use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};

/// Options.
#[derive(Debug, clap::Args)]
pub struct WaitReadyArgs {
    /// Namespace of the release.
    #[arg(long, env = "POD_NAMESPACE")]
    pub namespace: String,
    /// Label selector of the DaemonSets and Deployments to wait for.
    #[arg(long)]
    pub selector: String,
    /// Give up after this many seconds, printing what is not ready and why.
    #[arg(long, default_value_t = 300)]
    pub timeout_seconds: u64,
}

/// How far one workload has rolled out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rollout {
    /// `DaemonSet/name` or `Deployment/name`.
    pub name: String,
    /// Pods wanted.
    pub desired: i32,
    /// Pods of the current template.
    pub updated: i32,
    /// Pods ready (of any template).
    pub ready: i32,
    /// Pods available (ready for minReadySeconds).
    pub available: i32,
    /// Pods of an older template still running.
    pub old: i32,
    /// The controller has seen the latest spec.
    pub observed: bool,
}

impl Rollout {
    /// Done: the latest spec seen, every wanted pod updated and available, no old pod left.
    pub fn done(&self) -> bool {
        self.observed && self.updated >= self.desired && self.available >= self.desired && self.old == 0
    }

    /// Of a DaemonSet's status (what `kubectl rollout status` checks).
    pub fn of_daemonset(ds: &DaemonSet) -> Self {
        let s = ds.status.clone().unwrap_or_default();
        let generation = ds.metadata.generation.unwrap_or(0);
        Rollout {
            name: format!("DaemonSet/{}", ds.metadata.name.clone().unwrap_or_default()),
            desired: s.desired_number_scheduled,
            updated: s.updated_number_scheduled.unwrap_or(0),
            ready: s.number_ready,
            available: s.number_available.unwrap_or(0),
            old: (s.current_number_scheduled - s.updated_number_scheduled.unwrap_or(0)).max(0),
            observed: s.observed_generation.unwrap_or(0) >= generation,
        }
    }

    /// Of a Deployment's status.
    pub fn of_deployment(d: &Deployment) -> Self {
        let s = d.status.clone().unwrap_or_default();
        let desired = d.spec.as_ref().and_then(|s| s.replicas).unwrap_or(1);
        let updated = s.updated_replicas.unwrap_or(0);
        Rollout {
            name: format!("Deployment/{}", d.metadata.name.clone().unwrap_or_default()),
            desired,
            updated,
            ready: s.ready_replicas.unwrap_or(0),
            available: s.available_replicas.unwrap_or(0),
            old: (s.replicas.unwrap_or(0) - updated).max(0),
            observed: s.observed_generation.unwrap_or(0) >= d.metadata.generation.unwrap_or(0),
        }
    }

    fn line(&self) -> String {
        format!(
            "{}: {}/{} updated, {}/{} ready{}{}",
            self.name,
            self.updated,
            self.desired,
            self.ready,
            self.desired,
            if self.old > 0 {
                format!(", {} old", self.old)
            } else {
                String::new()
            },
            if self.observed {
                ""
            } else {
                ", new spec not yet seen"
            }
        )
    }
}

/// Why each not-ready pod matching `selector` is not ready: its waiting or terminated containers.
fn pod_problems(pods: &[Pod]) -> Vec<String> {
    let mut out = Vec::new();
    for p in pods {
        let name = p.metadata.name.clone().unwrap_or_default();
        let Some(st) = &p.status else { continue };
        let statuses = st
            .init_container_statuses
            .iter()
            .flatten()
            .chain(st.container_statuses.iter().flatten());
        for c in statuses {
            if c.ready {
                continue;
            }
            let state = c.state.clone().unwrap_or_default();
            let why = if let Some(w) = state.waiting {
                format!(
                    "waiting: {} {}",
                    w.reason.unwrap_or_default(),
                    w.message.unwrap_or_default()
                )
            } else if let Some(t) = state.terminated {
                if t.exit_code == 0 {
                    continue; // an init container that finished
                }
                format!(
                    "exited {}: {} {}",
                    t.exit_code,
                    t.reason.unwrap_or_default(),
                    t.message.unwrap_or_default()
                )
            } else {
                "running, not ready (readiness probe: the driver does not answer CSI Probe yet)".to_owned()
            };
            out.push(format!("pod {name} container {}: {}", c.name, why.trim()));
        }
    }
    out
}

/// Runs the verb: returns once every workload has rolled out, fails at the timeout.
pub async fn run(args: WaitReadyArgs) -> anyhow::Result<()> {
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API")?;
    let lp = ListParams::default().labels(&args.selector);
    let daemonsets = Api::<DaemonSet>::namespaced(client.clone(), &args.namespace);
    let deployments = Api::<Deployment>::namespaced(client.clone(), &args.namespace);
    let pods = Api::<Pod>::namespaced(client, &args.namespace);
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.timeout_seconds);
    let mut last = String::new();
    loop {
        let mut all: Vec<Rollout> = daemonsets
            .list(&lp)
            .await
            .context("listing DaemonSets")?
            .items
            .iter()
            .map(Rollout::of_daemonset)
            .collect();
        all.extend(
            deployments
                .list(&lp)
                .await
                .context("listing Deployments")?
                .items
                .iter()
                .map(Rollout::of_deployment),
        );
        if all.is_empty() {
            bail!(
                "no DaemonSet or Deployment in namespace {} matches {}",
                args.namespace,
                args.selector
            );
        }
        let report: Vec<String> = all.iter().map(Rollout::line).collect();
        let report = report.join("; ");
        if report != last {
            println!("[{:>4}s] {report}", started.elapsed().as_secs());
            last = report;
        }
        if all.iter().all(Rollout::done) {
            println!("ready: every pod of {} serves", args.selector);
            return Ok(());
        }
        if Instant::now() >= deadline {
            let items = pods.list(&lp).await.context("listing pods")?.items;
            for p in pod_problems(&items) {
                println!("  {p}");
            }
            let pending: Vec<&str> = all
                .iter()
                .filter(|r| !r.done())
                .map(|r| r.name.as_str())
                .collect();
            bail!(
                "not ready after {} s: {} (see the pods' logs: kubectl -n {} logs POD --all-containers)",
                args.timeout_seconds,
                pending.join(", "),
                args.namespace
            );
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::{DaemonSetStatus, DeploymentSpec, DeploymentStatus};
    use kube::api::ObjectMeta;

    fn ds(
        generation: i64,
        observed: i64,
        desired: i32,
        current: i32,
        updated: i32,
        available: i32,
    ) -> DaemonSet {
        DaemonSet {
            metadata: ObjectMeta {
                name: Some("strata-node".into()),
                generation: Some(generation),
                ..Default::default()
            },
            status: Some(DaemonSetStatus {
                observed_generation: Some(observed),
                desired_number_scheduled: desired,
                current_number_scheduled: current,
                updated_number_scheduled: Some(updated),
                number_ready: available,
                number_available: Some(available),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn a_one_pod_daemonset_is_done_only_when_its_pod_is_available() {
        // What helm's --wait accepts (maxUnavailable 1 of 1): the pod crashes, helm says deployed.
        assert!(!Rollout::of_daemonset(&ds(1, 1, 1, 1, 1, 0)).done());
        assert!(Rollout::of_daemonset(&ds(1, 1, 1, 1, 1, 1)).done());
        // An upgrade the DaemonSet controller has not seen yet.
        assert!(!Rollout::of_daemonset(&ds(2, 1, 1, 1, 1, 1)).done());
        // An update half done: one of two pods still runs the old template.
        assert!(!Rollout::of_daemonset(&ds(2, 2, 2, 2, 1, 2)).done());
        // No node in the group: nothing to wait for.
        assert!(Rollout::of_daemonset(&ds(1, 1, 0, 0, 0, 0)).done());
    }

    #[test]
    fn a_deployment_is_done_when_no_old_replica_is_left() {
        let d = |replicas: i32, updated: i32, available: i32| Deployment {
            metadata: ObjectMeta {
                name: Some("strata-controller".into()),
                generation: Some(3),
                ..Default::default()
            },
            spec: Some(DeploymentSpec {
                replicas: Some(1),
                ..Default::default()
            }),
            status: Some(DeploymentStatus {
                observed_generation: Some(3),
                replicas: Some(replicas),
                updated_replicas: Some(updated),
                ready_replicas: Some(available),
                available_replicas: Some(available),
                ..Default::default()
            }),
        };
        // maxSurge 1: the new pod is ready, the old one still runs.
        assert!(!Rollout::of_deployment(&d(2, 1, 2)).done());
        assert!(Rollout::of_deployment(&d(1, 1, 1)).done());
        assert!(!Rollout::of_deployment(&d(1, 1, 0)).done());
    }
}
