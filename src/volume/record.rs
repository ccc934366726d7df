//! Small persisted records (volume and stage state) written atomically.
//!
//! Format, fixed forever for version 1: one header line
//! `STRATA <kind> v<version> crc32=<8 hex digits>\n` followed by a JSON body; the checksum covers
//! the body. A record is written to a temporary file in the same directory, fsynced, renamed over
//! the old one, and the directory is fsynced, so a reader sees the old record or the new one.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Why a record could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The file system refused.
    #[error("record {path}: {source}")]
    Io {
        /// Record path.
        path: PathBuf,
        /// Underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a record of the expected kind and version, or its checksum is wrong.
    #[error("record {path} is corrupt: {reason}")]
    Corrupt {
        /// Record path.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
}

const VERSION: u32 = 1;

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RecordError + '_ {
    move |source| RecordError::Io {
        path: path.to_owned(),
        source,
    }
}

/// Writes `value` as a record of `kind` at `path`, atomically and durably.
pub fn write<T: Serialize>(path: &Path, kind: &str, value: &T) -> Result<(), RecordError> {
    let bytes = encode(kind, value);
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("record"),
        uuid::Uuid::new_v4().simple()
    ));
    let result = (|| {
        // Owner only: records of encrypted lineages hold their data keys.
        let mut f = std::os::unix::fs::OpenOptionsExt::mode(
            fs::OpenOptions::new().write(true).create_new(true),
            0o600,
        )
        .open(&tmp)
        .map_err(io_err(&tmp))?;
        f.write_all(&bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        fs::rename(&tmp, path).map_err(io_err(path))?;
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err(dir))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Encodes `value` as a record of `kind` (the same bytes `write` puts in a file).
pub fn encode<T: Serialize>(kind: &str, value: &T) -> Vec<u8> {
    let body = serde_json::to_vec_pretty(value).expect("records are plain data");
    let mut out = format!("STRATA {kind} v{VERSION} crc32={:08x}\n", crc32fast::hash(&body)).into_bytes();
    out.extend_from_slice(&body);
    out
}

/// Decodes bytes written by `encode`; `what` names their source in errors.
pub fn decode<T: DeserializeOwned>(what: &Path, kind: &str, data: &[u8]) -> Result<T, RecordError> {
    parse(what, kind, data)
}

/// Reads a record of `kind`; `Ok(None)` when the file does not exist.
pub fn read<T: DeserializeOwned>(path: &Path, kind: &str) -> Result<Option<T>, RecordError> {
    let data = match fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(path)(e)),
    };
    parse(path, kind, &data).map(Some)
}

fn parse<T: DeserializeOwned>(path: &Path, kind: &str, data: &[u8]) -> Result<T, RecordError> {
    let corrupt = |reason: String| RecordError::Corrupt {
        path: path.to_owned(),
        reason,
    };
    let nl = data
        .iter()
        .position(|&b| b == b'\n')
        .ok_or_else(|| corrupt("no header line".into()))?;
    let header = std::str::from_utf8(&data[..nl]).map_err(|_| corrupt("header is not UTF-8".into()))?;
    let body = &data[nl + 1..];
    let mut parts = header.split(' ');
    let (magic, k, v, c) = (parts.next(), parts.next(), parts.next(), parts.next());
    if magic != Some("STRATA") || k != Some(kind) {
        return Err(corrupt(format!(
            "expected a {kind} record, found header {header:?}"
        )));
    }
    if v != Some(&format!("v{VERSION}")) {
        return Err(corrupt(format!("unsupported version in header {header:?}")));
    }
    let want = c
        .and_then(|c| c.strip_prefix("crc32="))
        .and_then(|c| u32::from_str_radix(c, 16).ok())
        .ok_or_else(|| corrupt("no checksum in header".into()))?;
    let got = crc32fast::hash(body);
    if got != want {
        return Err(corrupt(format!(
            "checksum mismatch: header {want:08x}, body {got:08x}"
        )));
    }
    serde_json::from_slice(body).map_err(|e| corrupt(format!("bad body: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Serialize, serde::Deserialize, PartialEq, Debug)]
    struct R {
        a: u32,
        b: String,
    }

    #[test]
    fn round_trip_and_corruption_detected() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("r.rec");
        assert!(read::<R>(&p, "test").unwrap().is_none());
        let r = R { a: 7, b: "x".into() };
        write(&p, "test", &r).unwrap();
        assert_eq!(read::<R>(&p, "test").unwrap(), Some(r));
        assert!(matches!(read::<R>(&p, "other"), Err(RecordError::Corrupt { .. })));
        let mut raw = fs::read(&p).unwrap();
        let last = raw.len() - 3;
        raw[last] ^= 1;
        fs::write(&p, raw).unwrap();
        assert!(matches!(read::<R>(&p, "test"), Err(RecordError::Corrupt { .. })));
        // No temporary files are left behind.
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
