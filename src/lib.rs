//! Strata: a Kubernetes CSI driver for node-local block volumes with EBS-style incremental
//! snapshots in S3.
//!
//! # Architecture
//!
//! One binary, several roles:
//!
//! * `strata controller` serves CSI Identity + Controller on a unix socket beside the upstream
//!   sidecars. It keeps no state: volume ids are derived from CreateVolume names, and agents are
//!   asked where a volume is ([`controller::directory`]); placement follows CSI topology
//!   ([`controller::placement`]).
//! * `strata node` serves CSI Identity + Node for the kubelet on a unix socket, and the agent API
//!   ([`agent`]) on TCP for the controller. Both drive the [`volume::VolumeManager`], which owns the
//!   storage directory: sparse backing files, loop devices, filesystems, bind mounts.
//! * Snapshots ([`snapshot`]) are captured and uploaded by the node that holds the volume, into a
//!   store ([`store`]) the controller reads for listing, deleting and garbage collection. The
//!   manifest is the commit point; [`snapshot::gc`] documents how chunks in use are protected.
//!
//! # Locking
//!
//! | operation | excludes |
//! |---|---|
//! | any CSI/agent call on volume V | any other call on V ([`csi::op_guard`], answers ABORTED) |
//! | create, expand (space accounting) | each other, node-wide (`VolumeManager::space_lock`) |
//! | CreateSnapshot of volume V (agent) | any other call on V, for the capture only; uploads run beside anything |
//! | CreateVolume cloning V (agent) | any other call on V |
//! | CreateSnapshot / DeleteSnapshot of S (controller) | each other on S |
//! | garbage collection | nothing; an upload waits for a running sweep to end before it commits (see `snapshot::gc`) |
//!
//! # Persistence
//!
//! Records are written atomically (temp file, fsync, rename, fsync directory) with a magic header,
//! version and CRC ([`volume::record`]). Kernel state (loop devices, mounts) is never cached: it is
//! re-read from sysfs and mountinfo, so a restarted agent sees what is really there. The one
//! exception is a freeze: the mounts a capture is about to freeze are recorded first, so that an
//! agent restarted after a crash mid-capture thaws them ([`snapshot::capture`]).

#![warn(missing_docs)]

pub mod admin;
pub mod admin_volume;
pub mod agent;
pub mod bench;
pub mod bench_controller;
pub mod cli;
pub mod client;
pub mod config;
pub mod controller;
pub mod csi;
pub mod demo;
pub mod hydrate;
pub mod ids;
pub mod kube;
pub mod proto;
pub mod service;
pub mod snapshot;
pub mod store;
pub mod telemetry;
pub mod topology;
pub mod volume;
