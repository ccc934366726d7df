//! Command line.

use clap::{Parser, Subcommand};

use crate::config::{ControllerArgs, NodeArgs};
use crate::telemetry::LogFormat;

/// Strata: node-local block volumes with incremental snapshots, as a CSI driver.
#[derive(Debug, Parser)]
#[command(name = "strata", version, about)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
    /// Log format.
    #[arg(long, global = true, env = "STRATA_LOG_FORMAT", default_value = "text")]
    pub log_format: LogFormat,
    /// Log level or filter (RUST_LOG syntax); RUST_LOG overrides it.
    #[arg(long, global = true, env = "STRATA_LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

/// Roles and verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the CSI controller (Identity + Controller).
    Controller(ControllerArgs),
    /// Run the node plugin (Identity + Node for the kubelet, agent API for the controller).
    Node(NodeArgs),
    /// Guided local run: a controller and a node on temporary directories, a volume created,
    /// staged, published, written, read back and cleaned up. Needs root (loop devices, mounts).
    Demo(crate::demo::DemoArgs),
    /// Inspect snapshots in a store.
    #[command(subcommand)]
    Snapshot(crate::admin::SnapshotCommand),
    /// Restore a snapshot to a file or block device (no Kubernetes needed).
    Restore(crate::admin::RestoreArgs),
    /// Check that every chunk of every snapshot is present and matches its hash.
    Verify(crate::admin::VerifyArgs),
    /// Delete chunks no snapshot needs any more (the controller also does this by itself).
    Gc(crate::admin::GcArgs),
    /// This node's volumes and the hydration of restored ones (reads the storage directory).
    #[command(subcommand)]
    Volume(crate::admin_volume::VolumeCommand),
    /// Fast snapshot restore per zone: enable, disable, status.
    #[command(subcommand)]
    Fsr(crate::admin::FsrCommand),
    /// Keys of encrypted snapshots: generate one, rotate a lineage's to a new one.
    #[command(subcommand)]
    Key(crate::admin::KeyCommand),
    /// Measure snapshot, incremental and restore throughput beside raw store, disk and restic baselines.
    Bench(crate::bench::BenchArgs),
    /// Measure the controller's memory and ListSnapshots time as the store grows (10,000 snapshots).
    BenchController(crate::bench_controller::BenchControllerArgs),
    /// Wait until every DaemonSet and Deployment matching a selector has rolled out (the chart's
    /// post-install and post-upgrade hook; `helm install` returns when the driver serves).
    WaitReady(crate::kube::rollout::WaitReadyArgs),
    /// Serve one lazily restored volume while it hydrates (started by the node agent).
    #[command(hide = true)]
    Hydrate(crate::hydrate::serve::HydrateArgs),
}
