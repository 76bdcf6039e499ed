//! gdb's host I/O (`vFile:*`): gdb reads the executable and the libraries from the guest's
//! own root file system through the stub, so `target remote` alone is enough (no local
//! copy of the image, no `set sysroot`). Read-only, confined to the guest's root like the
//! guest's own opens, and bounded in open files.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};

use gdbstub::target::ext::host_io::{
    FsKind, HostIo, HostIoCloseOps, HostIoErrno, HostIoError, HostIoFstatOps, HostIoOpenFlags,
    HostIoOpenMode, HostIoOpenOps, HostIoPreadOps, HostIoResult, HostIoSetfsOps, HostIoStat,
};

use super::target::SandboxTarget;
use crate::process;

/// Files one session may hold open at once.
const MAX_OPEN: usize = 64;
/// Largest read of one request.
const MAX_READ: usize = 1 << 20;

/// The files gdb opened.
#[derive(Debug, Default)]
pub(crate) struct HostFiles {
    open: BTreeMap<u32, File>,
    next: u32,
}

fn errno(e: i32) -> HostIoErrno {
    match e {
        libc::EPERM => HostIoErrno::EPERM,
        libc::ENOENT => HostIoErrno::ENOENT,
        libc::EACCES => HostIoErrno::EACCES,
        libc::EBADF => HostIoErrno::EBADF,
        libc::ENOTDIR => HostIoErrno::ENOTDIR,
        libc::EISDIR => HostIoErrno::EISDIR,
        libc::EINVAL => HostIoErrno::EINVAL,
        libc::EMFILE => HostIoErrno::EMFILE,
        libc::ENAMETOOLONG => HostIoErrno::ENAMETOOLONG,
        libc::ELOOP | libc::EXDEV => HostIoErrno::EACCES,
        _ => HostIoErrno::EUNKNOWN,
    }
}

fn fail<T>(e: HostIoErrno) -> Result<T, HostIoError<super::GdbError>> {
    Err(HostIoError::Errno(e))
}

impl HostIo for SandboxTarget<'_> {
    fn support_open(&mut self) -> Option<HostIoOpenOps<'_, Self>> {
        Some(self)
    }

    fn support_close(&mut self) -> Option<HostIoCloseOps<'_, Self>> {
        Some(self)
    }

    fn support_pread(&mut self) -> Option<HostIoPreadOps<'_, Self>> {
        Some(self)
    }

    fn support_fstat(&mut self) -> Option<HostIoFstatOps<'_, Self>> {
        Some(self)
    }

    fn support_setfs(&mut self) -> Option<HostIoSetfsOps<'_, Self>> {
        Some(self)
    }
}

impl gdbstub::target::ext::host_io::HostIoOpen for SandboxTarget<'_> {
    fn open(
        &mut self,
        filename: &[u8],
        flags: HostIoOpenFlags,
        _mode: HostIoOpenMode,
    ) -> HostIoResult<u32, Self> {
        let writes = HostIoOpenFlags::O_WRONLY
            | HostIoOpenFlags::O_RDWR
            | HostIoOpenFlags::O_APPEND
            | HostIoOpenFlags::O_CREAT
            | HostIoOpenFlags::O_TRUNC;
        if flags.intersects(writes) {
            return fail(HostIoErrno::EROFS);
        }
        if self.host_files.open.len() >= MAX_OPEN {
            return fail(HostIoErrno::EMFILE);
        }
        let fd = {
            let p = process::lock(&self.shared.proc);
            let abs =
                p.fs.absolute(Some("/"), filename)
                    .map_err(|e| HostIoError::Errno(errno(e.0)))?;
            p.fs.open(&abs, libc::O_RDONLY, 0)
                .map_err(|e| HostIoError::Errno(errno(e.0)))?
        };
        let file = File::from(fd);
        if file.metadata().is_ok_and(|m| m.is_dir()) {
            return fail(HostIoErrno::EISDIR);
        }
        let files = &mut self.host_files;
        let n = files.next;
        files.next = files.next.wrapping_add(1);
        files.open.insert(n, file);
        Ok(n)
    }
}

impl gdbstub::target::ext::host_io::HostIoClose for SandboxTarget<'_> {
    fn close(&mut self, fd: u32) -> HostIoResult<(), Self> {
        match self.host_files.open.remove(&fd) {
            Some(_) => Ok(()),
            None => fail(HostIoErrno::EBADF),
        }
    }
}

impl gdbstub::target::ext::host_io::HostIoPread for SandboxTarget<'_> {
    fn pread(
        &mut self,
        fd: u32,
        count: usize,
        offset: u64,
        buf: &mut [u8],
    ) -> HostIoResult<usize, Self> {
        let Some(file) = self.host_files.open.get(&fd) else {
            return fail(HostIoErrno::EBADF);
        };
        let n = count.min(buf.len()).min(MAX_READ);
        file.read_at(&mut buf[..n], offset)
            .map_err(|e| HostIoError::Errno(errno(e.raw_os_error().unwrap_or(libc::EIO))))
    }
}

impl gdbstub::target::ext::host_io::HostIoFstat for SandboxTarget<'_> {
    fn fstat(&mut self, fd: u32) -> HostIoResult<HostIoStat, Self> {
        let Some(file) = self.host_files.open.get(&fd) else {
            return fail(HostIoErrno::EBADF);
        };
        let m = file
            .metadata()
            .map_err(|e| HostIoError::Errno(errno(e.raw_os_error().unwrap_or(libc::EIO))))?;
        let t = |v: i64| u32::try_from(v).unwrap_or(0);
        Ok(HostIoStat {
            st_dev: m.dev() as u32,
            st_ino: m.ino() as u32,
            st_mode: HostIoOpenMode::from_bits_truncate(m.mode()),
            st_nlink: m.nlink() as u32,
            st_uid: m.uid(),
            st_gid: m.gid(),
            st_rdev: m.rdev() as u32,
            st_size: m.size(),
            st_blksize: m.blksize(),
            st_blocks: m.blocks(),
            st_atime: t(m.atime()),
            st_mtime: t(m.mtime()),
            st_ctime: t(m.ctime()),
        })
    }
}

impl gdbstub::target::ext::host_io::HostIoSetfs for SandboxTarget<'_> {
    fn setfs(&mut self, _fs: FsKind) -> HostIoResult<(), Self> {
        // One process, one file system: the guest's.
        Ok(())
    }
}
