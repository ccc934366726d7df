//! The FUSE side of a hydrating volume: one directory holding one file, `data.img`, whose reads
//! and writes go through the [`Engine`](super::engine::Engine).

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig,
    LockOwner, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use super::engine::Engine;

/// The name of the one file.
pub const FILE_NAME: &str = "data.img";
const FILE_INO: INodeNo = INodeNo(2);
/// Attributes are never cached: the size follows the plain file (volume expansion).
const TTL: Duration = Duration::ZERO;
/// Largest request the kernel may send (it caps this at its own limit).
const MAX_WRITE: u32 = 1 << 20;

/// The filesystem served by a hydrator.
pub struct LazyFs {
    engine: Arc<Engine>,
    rt: tokio::runtime::Handle,
}

impl LazyFs {
    /// Serves `engine`, running fetches on `rt`.
    pub fn new(engine: Arc<Engine>, rt: tokio::runtime::Handle) -> Self {
        Self { engine, rt }
    }

    fn attr(&self, ino: INodeNo) -> Result<FileAttr, Errno> {
        let (kind, size, perm, nlink) = if ino == INodeNo::ROOT {
            (FileType::Directory, 0, 0o700, 2)
        } else if ino == FILE_INO {
            let size = self.engine.size().map_err(|_| Errno::EIO)?;
            (FileType::RegularFile, size, 0o600, 1)
        } else {
            return Err(Errno::ENOENT);
        };
        Ok(FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }
}

impl Filesystem for LazyFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let mut w = MAX_WRITE;
        while let Err(nearest) = config.set_max_write(w) {
            if nearest >= w {
                break;
            }
            w = nearest;
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != INodeNo::ROOT || name != FILE_NAME {
            return reply.error(Errno::ENOENT);
        }
        match self.attr(FILE_INO) {
            Ok(a) => reply.entry(&TTL, &a, Generation(0)),
            Err(e) => reply.error(e),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Ok(a) => reply.attr(&TTL, &a),
            Err(e) => reply.error(e),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        // The size belongs to the volume (CSI expansion grows the plain file); nothing else here
        // has meaning, so only a no-op resize is accepted.
        match self.attr(ino) {
            Ok(a) if size.is_none_or(|s| s == a.size) => reply.attr(&TTL, &a),
            Ok(_) => reply.error(Errno::EPERM),
            Err(e) => reply.error(e),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        // No page cache here: the loop device's own cache is above us, the plain file's below.
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        let mut buf = vec![0u8; size as usize];
        match self.rt.block_on(self.engine.read(offset, &mut buf)) {
            Ok(n) => reply.data(&buf[..n]),
            Err(e) => {
                tracing::error!(offset, size, error = %e, "read failed");
                self.engine.note_error(&e);
                reply.error(Errno::EIO)
            }
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        if ino != FILE_INO {
            return reply.error(Errno::EISDIR);
        }
        match self.engine.size() {
            Ok(size) if offset + data.len() as u64 > size => return reply.error(Errno::ENOSPC),
            Ok(_) => {}
            Err(_) => return reply.error(Errno::EIO),
        }
        match self.rt.block_on(self.engine.write(offset, data)) {
            Ok(()) => reply.written(data.len() as u32),
            Err(e) => {
                tracing::error!(offset, len = data.len(), error = %e, "write failed");
                self.engine.note_error(&e);
                reply.error(Errno::EIO)
            }
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lo: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        match self.engine.sync() {
            Ok(()) => reply.ok(),
            Err(e) => {
                tracing::error!(error = %e, "fsync failed");
                reply.error(Errno::EIO)
            }
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
            (FILE_INO, FileType::RegularFile, FILE_NAME),
        ];
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(ino, (i + 1) as u64, kind, name) {
                break;
            }
        }
        reply.ok();
    }
}
