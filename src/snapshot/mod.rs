//! Snapshots: chunks, manifests, capture, upload, restore and garbage collection.

pub mod capture;
pub mod chunk;
pub mod crypto;
pub mod diff;
pub mod fsr;
pub mod gc;
pub mod manifest;
pub mod node;
pub mod restore;
pub mod upload;
