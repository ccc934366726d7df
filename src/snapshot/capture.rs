//! Point-in-time capture: freeze the mounted filesystem, clone the backing file, thaw.
//!
//! The clone is a reflink (FICLONE through `cp --reflink=auto`) on XFS and btrfs, taking
//! milliseconds; elsewhere it is a sparse copy, and the freeze lasts as long as the copy.

use std::path::Path;

use crate::volume::sys::{self, SysError};

/// Clones `src` to `dst`: a reflink where the filesystem can (returns true), else a sparse copy.
pub async fn clone_file(src: &Path, dst: &Path) -> Result<bool, SysError> {
    let (s, d) = (src.to_string_lossy(), dst.to_string_lossy());
    if sys::run("cp", &["--reflink=always", &s, &d]).await.is_ok() {
        return Ok(true);
    }
    sys::run("cp", &["--reflink=never", "--sparse=always", &s, &d])
        .await
        .map(|_| false)
}

/// Freezes the filesystem mounted at `mount` (writes block until [`thaw`]).
pub async fn freeze(mount: &Path) -> Result<(), SysError> {
    sys::run("fsfreeze", &["--freeze", &mount.to_string_lossy()])
        .await
        .map(drop)
}

/// Thaws a filesystem frozen by [`freeze`].
pub async fn thaw(mount: &Path) -> Result<(), SysError> {
    sys::run("fsfreeze", &["--unfreeze", &mount.to_string_lossy()])
        .await
        .map(drop)
}

/// Captures `data` into `clone`. With `mount`, the filesystem mounted there is frozen for the
/// duration of the clone (and always thawed, also when the clone fails). Returns whether the
/// clone is a reflink (shares the source's blocks).
pub async fn capture(data: &Path, clone: &Path, mount: Option<&Path>) -> Result<bool, SysError> {
    capture_with(data, clone, mount, &[]).await
}

/// [`capture`], also copying each `(from, to)` of `also` at the captured instant (after the
/// freeze, before the clone): state that describes the image, such as a hydration map.
pub async fn capture_with(
    data: &Path,
    clone: &Path,
    mount: Option<&Path>,
    also: &[(std::path::PathBuf, std::path::PathBuf)],
) -> Result<bool, SysError> {
    if let Some(m) = mount {
        freeze(m).await?;
    }
    let mut copied = Ok(());
    for (from, to) in also {
        if let Err(e) = std::fs::copy(from, to) {
            copied = Err(SysError {
                command: format!("copy {} at capture", from.display()),
                message: e.to_string(),
            });
            break;
        }
    }
    let cloned = match copied {
        Ok(()) => clone_file(data, clone).await,
        Err(e) => Err(e),
    };
    if let Some(m) = mount {
        let thawed = thaw(m).await;
        if let Err(e) = &thawed {
            tracing::error!(mount = %m.display(), error = %e, "thaw failed");
        }
        let r = cloned?;
        thawed?;
        return Ok(r);
    }
    cloned
}
