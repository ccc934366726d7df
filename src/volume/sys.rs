//! Thin wrappers over the node's kernel interfaces: external tools (losetup, mkfs, mount, blkid,
//! resize2fs, xfs_growfs), `/proc/self/mountinfo` and `/sys/block/loop*`.
//!
//! Tools are used instead of raw ioctls where they handle kernel races for us (losetup retries a
//! loop device that another process grabbed between LOOP_CTL_GET_FREE and LOOP_SET_FD).

use std::path::{Path, PathBuf};
use std::process::Stdio;

use tokio::process::Command;

/// A failed system operation.
#[derive(Debug, thiserror::Error)]
#[error("{command}: {message}")]
pub struct SysError {
    /// The command line (or operation) that failed.
    pub command: String,
    /// Its stderr, or the OS error.
    pub message: String,
}

/// Runs a tool, returning its stdout; a non-zero exit becomes an error carrying stderr.
pub async fn run(program: &str, args: &[&str]) -> Result<String, SysError> {
    let command = format!("{program} {}", args.join(" "));
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| SysError {
            command: command.clone(),
            message: e.to_string(),
        })?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        return Err(SysError {
            command,
            message: format!("{} ({})", stderr, out.status),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One attached loop device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoopDevice {
    /// Kernel name, `loopN`.
    pub name: String,
    /// Attached read-only.
    pub read_only: bool,
}

impl LoopDevice {
    /// `/dev/loopN`.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/dev").join(&self.name)
    }

    /// Current size of the device in bytes.
    pub fn size_bytes(&self) -> Result<u64, SysError> {
        let p = format!("/sys/block/{}/size", self.name);
        let s = std::fs::read_to_string(&p).map_err(|e| SysError {
            command: p.clone(),
            message: e.to_string(),
        })?;
        Ok(s.trim().parse::<u64>().unwrap_or(0) * 512)
    }
}

/// Loop devices whose backing file is `backing` (found through sysfs, so it survives restarts).
pub fn loops_for(backing: &Path) -> Vec<LoopDevice> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let want = backing.to_string_lossy();
    let mut found = Vec::new();
    // Asked of the kernel (one `losetup`) only when a device's printed path is not one of ours.
    let mut by_inode: Option<Vec<String>> = None;
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.starts_with("loop") {
            continue;
        }
        let Ok(file) = std::fs::read_to_string(e.path().join("loop/backing_file")) else {
            continue;
        };
        // A FUSE file whose server died reads as unlinked ("... (deleted)"): still this file.
        let file = file.trim_end_matches('\n');
        let file = file.strip_suffix(" (deleted)").unwrap_or(file);
        // The kernel prints the path as seen from the mount namespace that attached the device;
        // after a restart of the node plugin's container (a new namespace) a file on a mount made
        // elsewhere (a hydrator pod's FUSE file) prints differently: same name, other path. Such a
        // device is this file's when its backing inode is.
        let same = file == want
            || (backing
                .file_name()
                .is_some_and(|n| file.ends_with(&*n.to_string_lossy()))
                && !Path::new(file).exists()
                && by_inode
                    .get_or_insert_with(|| loops_by_backing_inode(backing))
                    .contains(&name));
        if same {
            let read_only = std::fs::read_to_string(e.path().join("ro"))
                .map(|s| s.trim() == "1")
                .unwrap_or(false);
            found.push(LoopDevice { name, read_only });
        }
    }
    found.sort_by(|a, b| a.name.cmp(&b.name));
    found
}

/// The loop devices (`loopN`) backed by the inode of `backing` (device and inode number, as
/// `losetup` reads them from the kernel), whatever path the kernel prints for them.
fn loops_by_backing_inode(backing: &Path) -> Vec<String> {
    use std::os::unix::fs::MetadataExt;
    let Ok(md) = std::fs::metadata(backing) else {
        return Vec::new();
    };
    let want = format!(
        "{}:{}",
        nix::sys::stat::major(md.dev()),
        nix::sys::stat::minor(md.dev())
    );
    let ino = md.ino().to_string();
    let Ok(out) = std::process::Command::new("losetup")
        .args(["--list", "--noheadings", "-O", "NAME,BACK-MAJ:MIN,BACK-INO"])
        .output()
    else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| match l.split_whitespace().collect::<Vec<_>>()[..] {
            [dev, majmin, i] if majmin == want && i == ino => dev.strip_prefix("/dev/").map(str::to_owned),
            _ => None,
        })
        .collect()
}

/// The loop device behind a device node such as a bind-mounted block publish target.
pub fn loop_of_device_node(path: &Path) -> Option<LoopDevice> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt};
    let md = std::fs::metadata(path).ok()?;
    if !md.file_type().is_block_device() {
        return None;
    }
    let rdev = md.rdev();
    let (major, minor) = (libc::major(rdev), libc::minor(rdev));
    let sys = PathBuf::from(format!("/sys/dev/block/{major}:{minor}"));
    let name = std::fs::canonicalize(&sys)
        .ok()?
        .file_name()?
        .to_string_lossy()
        .into_owned();
    std::fs::metadata(sys.join("loop")).ok()?;
    let read_only = std::fs::read_to_string(sys.join("ro"))
        .map(|s| s.trim() == "1")
        .unwrap_or(false);
    Some(LoopDevice { name, read_only })
}

/// Attaches `backing` to a free loop device.
pub async fn loop_attach(backing: &Path, read_only: bool) -> Result<LoopDevice, SysError> {
    let file = backing.to_string_lossy();
    let mut args = vec!["--find", "--show"];
    if read_only {
        args.push("--read-only");
    }
    args.push(&file);
    let out = run("losetup", &args).await?;
    let dev = out.trim();
    let name = dev.strip_prefix("/dev/").unwrap_or(dev).to_string();
    Ok(LoopDevice { name, read_only })
}

/// Detaches a loop device.
pub async fn loop_detach(dev: &LoopDevice) -> Result<(), SysError> {
    run("losetup", &["--detach", &dev.path().to_string_lossy()])
        .await
        .map(drop)
}

/// Makes the loop device pick up a grown backing file.
pub async fn loop_refresh(dev: &LoopDevice) -> Result<(), SysError> {
    run("losetup", &["--set-capacity", &dev.path().to_string_lossy()])
        .await
        .map(drop)
}

/// One line of `/proc/self/mountinfo`.
#[derive(Debug, Clone)]
pub struct MountEntry {
    /// Device numbers of the mounted filesystem.
    pub dev: (u32, u32),
    /// Path inside that filesystem that is mounted (bind mounts of a device node show `/loopN`).
    pub root: String,
    /// Where it is mounted.
    pub mount_point: PathBuf,
    /// Per-mount options (`ro`, `rw`, ...).
    pub options: String,
    /// Filesystem type.
    pub fs_type: String,
    /// Mount source (the device for block filesystems).
    pub source: String,
}

fn unescape(s: &str) -> String {
    // mountinfo escapes space, tab, newline and backslash as \ooo.
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 4 <= b.len() {
            if let Ok(v) = u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 4]).unwrap_or("x"), 8) {
                out.push(v);
                i += 4;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Parses mountinfo text.
pub fn parse_mountinfo(text: &str) -> Vec<MountEntry> {
    text.lines()
        .filter_map(|line| {
            let (left, right) = line.split_once(" - ")?;
            let f: Vec<&str> = left.split(' ').collect();
            let r: Vec<&str> = right.split(' ').collect();
            if f.len() < 6 || r.len() < 2 {
                return None;
            }
            let (maj, min) = f[2].split_once(':')?;
            Some(MountEntry {
                dev: (maj.parse().ok()?, min.parse().ok()?),
                root: unescape(f[3]),
                mount_point: PathBuf::from(unescape(f[4])),
                options: f[5].to_string(),
                fs_type: r[0].to_string(),
                source: unescape(r[1]),
            })
        })
        .collect()
}

/// The current mount table of this process's mount namespace.
pub fn mounts() -> Vec<MountEntry> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|t| parse_mountinfo(&t))
        .unwrap_or_default()
}

/// The (last, i.e. topmost) mount at exactly `path`.
pub fn mount_at(path: &Path) -> Option<MountEntry> {
    mounts().into_iter().rev().find(|m| m.mount_point == path)
}

/// Device numbers of a loop device.
pub fn loop_dev_numbers(dev: &LoopDevice) -> Option<(u32, u32)> {
    let s = std::fs::read_to_string(format!("/sys/block/{}/dev", dev.name)).ok()?;
    let (a, b) = s.trim().split_once(':')?;
    Some((a.parse().ok()?, b.parse().ok()?))
}

/// Mounts a filesystem.
pub async fn mount_fs(
    device: &Path,
    target: &Path,
    fs_type: &str,
    options: &[String],
) -> Result<(), SysError> {
    let dev = device.to_string_lossy();
    let tgt = target.to_string_lossy();
    let opts = options.join(",");
    let mut args = vec!["-t", fs_type];
    if !opts.is_empty() {
        args.extend(["-o", &opts]);
    }
    args.extend([dev.as_ref(), tgt.as_ref()]);
    run("mount", &args).await.map(drop)
}

/// Bind-mounts `source` on `target`, read-only if asked (bind then remount, as the kernel needs).
pub async fn bind_mount(source: &Path, target: &Path, read_only: bool) -> Result<(), SysError> {
    let (src, tgt) = (source.to_string_lossy(), target.to_string_lossy());
    run("mount", &["--bind", &src, &tgt]).await?;
    if read_only {
        if let Err(e) = run("mount", &["-o", "remount,bind,ro", &tgt]).await {
            let _ = run("umount", &[&tgt]).await;
            return Err(e);
        }
    }
    Ok(())
}

/// Unmounts `target` if something is mounted there; repeated until nothing is (stacked mounts).
pub async fn unmount_all(target: &Path) -> Result<(), SysError> {
    while mount_at(target).is_some() {
        run("umount", &[&target.to_string_lossy()]).await?;
    }
    Ok(())
}

/// The filesystem type on a device, if any.
pub async fn probe_fs(device: &Path) -> Result<Option<String>, SysError> {
    let dev = device.to_string_lossy();
    let out = Command::new("blkid")
        .args(["-p", "-o", "value", "-s", "TYPE", &dev])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| SysError {
            command: format!("blkid {dev}"),
            message: e.to_string(),
        })?;
    match out.status.code() {
        Some(0) => {
            let t = String::from_utf8_lossy(&out.stdout).trim().to_string();
            Ok((!t.is_empty()).then_some(t))
        }
        // 2: nothing was found on the device.
        Some(2) => Ok(None),
        _ => Err(SysError {
            command: format!("blkid -p {dev}"),
            message: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        }),
    }
}

/// Makes a filesystem. Discards are skipped: the device is a fresh sparse file.
pub async fn mkfs(device: &Path, fs_type: &str) -> Result<(), SysError> {
    let dev = device.to_string_lossy();
    match fs_type {
        "ext4" => run(
            "mkfs.ext4",
            &[
                "-F",
                "-q",
                "-E",
                "nodiscard,lazy_itable_init=1,lazy_journal_init=1",
                &dev,
            ],
        )
        .await
        .map(drop),
        "xfs" => run("mkfs.xfs", &["-f", "-q", "-K", &dev]).await.map(drop),
        other => Err(SysError {
            command: "mkfs".into(),
            message: format!("unsupported filesystem {other}"),
        }),
    }
}

/// Grows a mounted filesystem to its device's size.
pub async fn grow_fs(device: &Path, mount_point: &Path, fs_type: &str) -> Result<(), SysError> {
    match fs_type {
        "ext4" => run("resize2fs", &[&device.to_string_lossy()]).await.map(drop),
        "xfs" => run("xfs_growfs", &[&mount_point.to_string_lossy()])
            .await
            .map(drop),
        other => Err(SysError {
            command: "grow".into(),
            message: format!("unsupported filesystem {other}"),
        }),
    }
}

/// Size in bytes of the ext4 filesystem on an (unmounted) device, from its superblock.
pub async fn ext4_size(device: &Path) -> Result<u64, SysError> {
    let out = run("dumpe2fs", &["-h", &device.to_string_lossy()]).await?;
    let field = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .ok_or_else(|| SysError {
                command: "dumpe2fs".into(),
                message: format!("no {name} in superblock"),
            })
    };
    Ok(field("Block count:")? * field("Block size:")?)
}

/// Capability number of CAP_SYS_RESOURCE (linux/capability.h), which online ext4 growth
/// (EXT4_IOC_RESIZE_FS) needs.
pub const CAP_SYS_RESOURCE: u32 = 24;

/// Whether this process has capability `cap` in its effective set.
pub fn has_capability(cap: u32) -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .is_some_and(|eff| eff & (1u64 << cap) != 0)
}

/// Grows an unmounted ext4 filesystem to its device (needs no CAP_SYS_RESOURCE, unlike online).
pub async fn ext4_grow_offline(device: &Path) -> Result<(), SysError> {
    let dev = device.to_string_lossy();
    // resize2fs insists on a freshly checked filesystem; exit 1 means "errors corrected".
    let out = Command::new("e2fsck")
        .args(["-f", "-p", &dev])
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| SysError {
            command: format!("e2fsck {dev}"),
            message: e.to_string(),
        })?;
    if !matches!(out.status.code(), Some(0 | 1)) {
        return Err(SysError {
            command: format!("e2fsck -f -p {dev}"),
            message: String::from_utf8_lossy(&out.stdout).trim().to_string(),
        });
    }
    run("resize2fs", &[&dev]).await.map(drop)
}

/// Space of the filesystem holding `path`: (total, available, total inodes, free inodes, used inodes).
pub fn statvfs(path: &Path) -> Result<FsStats, SysError> {
    let s = nix::sys::statvfs::statvfs(path).map_err(|e| SysError {
        command: format!("statvfs {}", path.display()),
        message: e.to_string(),
    })?;
    let frsize = s.fragment_size() as u64;
    Ok(FsStats {
        total_bytes: s.blocks() as u64 * frsize,
        available_bytes: s.blocks_available() as u64 * frsize,
        used_bytes: (s.blocks() as u64 - s.blocks_free() as u64) * frsize,
        total_inodes: s.files() as u64,
        free_inodes: s.files_available() as u64,
        used_inodes: (s.files() as u64).saturating_sub(s.files_free() as u64),
    })
}

/// Filesystem usage.
#[derive(Debug, Clone, Copy)]
pub struct FsStats {
    /// Size of the filesystem.
    pub total_bytes: u64,
    /// Free for unprivileged users.
    pub available_bytes: u64,
    /// In use.
    pub used_bytes: u64,
    /// Inodes in all.
    pub total_inodes: u64,
    /// Inodes free for unprivileged users.
    pub free_inodes: u64,
    /// Inodes in use.
    pub used_inodes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_parses_escapes_and_optional_fields() {
        let t = "36 35 98:0 /mnt1 /mnt/a\\040b rw,noatime master:1 - ext3 /dev/root rw,errors=continue\n\
                 40 35 0:5 /loop3 /var/t rw shared:2 - devtmpfs udev rw\n";
        let m = parse_mountinfo(t);
        assert_eq!(m.len(), 2);
        assert_eq!(m[0].mount_point, PathBuf::from("/mnt/a b"));
        assert_eq!(m[0].dev, (98, 0));
        assert_eq!(m[0].fs_type, "ext3");
        assert_eq!(m[1].root, "/loop3");
        assert_eq!(m[1].source, "udev");
    }
}
