//! A store in a local directory: the embedded default for one machine, and the reference the S3
//! store is tested against.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use bytes::Bytes;

use super::{check_key, ObjectMeta, ObjectStore, StoreError};

/// Objects as files under a root directory; writes are temp file + fsync + rename.
#[derive(Debug)]
pub struct LocalStore {
    /// The root directory.
    root: PathBuf,
}

fn io(key: &str, e: std::io::Error) -> StoreError {
    match e.kind() {
        std::io::ErrorKind::NotFound => StoreError::NotFound { key: key.to_owned() },
        // A full or read-only disk will not heal by retrying within an operation.
        _ => StoreError::Permanent {
            message: format!("{key}: {e}"),
        },
    }
}

impl LocalStore {
    /// Opens (creating) the directory.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(root.join(".tmp")).map_err(|e| io(&root.display().to_string(), e))?;
        Ok(Self {
            root: root.to_owned(),
        })
    }

    fn path(&self, key: &str) -> Result<PathBuf, StoreError> {
        check_key(key)?;
        Ok(self.root.join(key))
    }
}

fn walk(dir: &Path, rel: &str, out: &mut Vec<(String, std::fs::Metadata)>) -> std::io::Result<()> {
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    for e in rd {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let key = if rel.is_empty() {
            name
        } else {
            format!("{rel}/{name}")
        };
        let md = e.metadata()?;
        if md.is_dir() {
            walk(&e.path(), &key, out)?;
        } else {
            out.push((key, md));
        }
    }
    Ok(())
}

#[tonic::async_trait]
impl ObjectStore for LocalStore {
    async fn put(&self, key: &str, data: Bytes) -> Result<(), StoreError> {
        let path = self.path(key)?;
        let tmp = self
            .root
            .join(".tmp")
            .join(uuid::Uuid::new_v4().simple().to_string());
        let key = key.to_owned();
        tokio::task::spawn_blocking(move || {
            use std::io::Write;
            let r = (|| {
                let dir = path.parent().expect("keys have a parent");
                std::fs::create_dir_all(dir)?;
                let mut f = std::fs::File::create(&tmp)?;
                f.write_all(&data)?;
                f.sync_all()?;
                std::fs::rename(&tmp, &path)?;
                std::fs::File::open(dir)?.sync_all()
            })();
            if r.is_err() {
                let _ = std::fs::remove_file(&tmp);
            }
            r.map_err(|e| io(&key, e))
        })
        .await
        .expect("put task panicked")
    }

    async fn get(&self, key: &str) -> Result<Bytes, StoreError> {
        let path = self.path(key)?;
        tokio::fs::read(&path)
            .await
            .map(Bytes::from)
            .map_err(|e| io(key, e))
    }

    async fn exists(&self, key: &str) -> Result<bool, StoreError> {
        let path = self.path(key)?;
        match tokio::fs::metadata(&path).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(io(key, e)),
        }
    }

    async fn delete(&self, key: &str) -> Result<(), StoreError> {
        let path = self.path(key)?;
        match tokio::fs::remove_file(&path).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(key, e)),
        }
    }

    async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        // Walk only the directory the prefix names (prefixes here end at a '/' or inside a name).
        let dir_rel = match prefix.rfind('/') {
            Some(i) => &prefix[..i],
            None => "",
        };
        let start = if dir_rel.is_empty() {
            self.root.clone()
        } else {
            self.root.join(dir_rel)
        };
        let (prefix, dir_rel) = (prefix.to_owned(), dir_rel.to_owned());
        tokio::task::spawn_blocking(move || {
            let mut all = Vec::new();
            walk(&start, &dir_rel, &mut all).map_err(|e| io(&prefix, e))?;
            let mut out: Vec<ObjectMeta> = all
                .into_iter()
                .filter(|(k, _)| k.starts_with(&prefix))
                .map(|(key, md)| ObjectMeta {
                    key,
                    size: md.len(),
                    modified: md.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                })
                .collect();
            out.sort_by(|a, b| a.key.cmp(&b.key));
            Ok(out)
        })
        .await
        .expect("list task panicked")
    }
}
