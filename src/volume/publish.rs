//! The access mode of each publish, kept beside the volume so that a later publish, also after an
//! agent restart, knows what the earlier ones allow. The kernel says which targets are published
//! (mountinfo); this record only adds how each was asked for, so entries for targets that are no
//! longer mounted are ignored and dropped at the next write.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::record::{self, RecordError};

const PUBLISH_RECORD: &str = "publish";

/// How a publish shares the volume with the volume's other publishes on this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PublishMode {
    /// SINGLE_NODE_SINGLE_WRITER (Kubernetes ReadWriteOncePod): the volume's only publish.
    SingleWriter,
    /// The other single-node modes: any number of publishes on this node.
    Shared,
}

impl PublishMode {
    /// As the CSI spec names it, for messages.
    pub fn csi_name(self) -> &'static str {
        match self {
            PublishMode::SingleWriter => "SINGLE_NODE_SINGLE_WRITER",
            PublishMode::Shared => "a shared single-node access mode",
        }
    }
}

/// One publish as the CO asked for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishEntry {
    /// The target path.
    pub target: PathBuf,
    /// Its access mode.
    pub mode: PublishMode,
    /// Published read-only.
    pub read_only: bool,
}

/// `publish.rec`: the publishes of one volume.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PublishRecord {
    /// One entry per target.
    pub entries: Vec<PublishEntry>,
}

impl PublishRecord {
    fn path(volume_dir: &Path) -> PathBuf {
        volume_dir.join("publish.rec")
    }

    /// The record of the volume in `volume_dir`, keeping only the entries of `live` targets.
    pub fn read(volume_dir: &Path, live: &[PathBuf]) -> Result<Self, RecordError> {
        let mut r: Self = record::read(&Self::path(volume_dir), PUBLISH_RECORD)?.unwrap_or_default();
        r.entries.retain(|e| live.contains(&e.target));
        Ok(r)
    }

    /// Writes the record atomically (before the mount it describes: a crash in between leaves an
    /// entry for a target that is not mounted, which is ignored).
    pub fn write(&self, volume_dir: &Path) -> Result<(), RecordError> {
        record::write(&Self::path(volume_dir), PUBLISH_RECORD, self)
    }

    /// The entry for `target`.
    pub fn get(&self, target: &Path) -> Option<&PublishEntry> {
        self.entries.iter().find(|e| e.target == target)
    }

    /// Adds or replaces the entry of its target.
    pub fn set(&mut self, entry: PublishEntry) {
        self.entries.retain(|e| e.target != entry.target);
        self.entries.push(entry);
    }

    /// Removes the entry of `target`.
    pub fn remove(&mut self, target: &Path) {
        self.entries.retain(|e| e.target != target);
    }
}

/// Why a new publish at `target` with `mode` conflicts with the volume's other live publishes
/// (`others`, recorded in `rec`), if it does: a single-writer publish must be the only one.
pub fn conflict(rec: &PublishRecord, others: &[PathBuf], mode: PublishMode) -> Option<String> {
    let first = others.first()?;
    if mode == PublishMode::SingleWriter {
        return Some(format!(
            "volume is already published at {}; {} allows a single publish",
            first.display(),
            PublishMode::SingleWriter.csi_name()
        ));
    }
    others
        .iter()
        .filter_map(|t| rec.get(t))
        .find(|e| e.mode == PublishMode::SingleWriter)
        .map(|e| {
            format!(
                "volume is published at {} with {}, which allows no other publish",
                e.target.display(),
                PublishMode::SingleWriter.csi_name()
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(t: &str, mode: PublishMode) -> PublishEntry {
        PublishEntry {
            target: t.into(),
            mode,
            read_only: false,
        }
    }

    #[test]
    fn single_writer_excludes_every_other_publish() {
        let mut rec = PublishRecord::default();
        assert_eq!(conflict(&rec, &[], PublishMode::SingleWriter), None);
        rec.set(entry("/t1", PublishMode::Shared));
        let others = vec![PathBuf::from("/t1")];
        assert!(conflict(&rec, &others, PublishMode::SingleWriter).is_some());
        assert_eq!(conflict(&rec, &others, PublishMode::Shared), None);
        rec.set(entry("/t1", PublishMode::SingleWriter));
        assert!(conflict(&rec, &others, PublishMode::Shared).is_some());
        // A publish the record does not know (made before records existed) is shared.
        assert_eq!(conflict(&rec, &[PathBuf::from("/t2")], PublishMode::Shared), None);
    }

    #[test]
    fn record_survives_a_reread_and_forgets_dead_targets() {
        let dir = tempfile::tempdir().unwrap();
        let mut rec = PublishRecord::default();
        rec.set(entry("/t1", PublishMode::SingleWriter));
        rec.set(entry("/t2", PublishMode::Shared));
        rec.write(dir.path()).unwrap();
        let live = vec![PathBuf::from("/t1")];
        let back = PublishRecord::read(dir.path(), &live).unwrap();
        assert_eq!(back.entries, vec![entry("/t1", PublishMode::SingleWriter)]);
    }
}
