//! Snapshots: chunks, manifests, capture, upload, restore and garbage collection.

pub mod chunk;
pub mod manifest;
