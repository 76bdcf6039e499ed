//! Files, directories, pipes and fd-table operations.
//!
//! Paths: a guest path is made absolute (against the working directory or a directory fd's
//! guest path), then either answered by the emulated `/proc` or resolved inside the root by
//! the host kernel (`openat2` with `RESOLVE_IN_ROOT`, in [`crate::fs::FsContext`]). Host calls
//! never name a host path: they act on an `O_PATH` fd of the object (`AT_EMPTY_PATH`, or the
//! VMM's own `/proc/self/fd/N`), or on one name in a parent directory fd, which the kernel
//! does not follow.
//!
//! Data moves between host fds and guest memory directly (iovecs into guest RAM). Reads
//! and writes at the file position of sockets and pipes go through the rescue-window
//! journal first (`crate::journal`: held output, replayed input).

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;

use super::{Args, Support, SysResult, SyscallCtx, SyscallDef};
use crate::errno::{check, Errno};
use crate::fd::{FileKind, OpenFile};
use crate::fs::procfs::{self, Entry, Node, Resolved, View};
use crate::fs::{normalize, on_host_procfs, PATH_MAX};
use crate::journal;
use crate::syscall_table;

/// This family's syscalls.
pub const SYSCALLS: &[SyscallDef] = syscall_table![
    0 read => Support::Full(sys_read),
    1 write => Support::Full(sys_write),
    2 open => Support::Partial(sys_open, "Paths resolve inside the sandbox root; /proc is emulated (the process's own entries and a few system files)"),
    3 close => Support::Full(sys_close),
    4 stat => Support::Full(sys_stat),
    5 fstat => Support::Full(sys_fstat),
    6 lstat => Support::Full(sys_lstat),
    8 lseek => Support::Full(sys_lseek),
    16 ioctl => Support::Partial(sys_ioctl, "FIONBIO, FIONREAD, FIOCLEX, FIONCLEX, TCGETS, TIOCGWINSZ, TIOCGPGRP; read-only socket queries (SIOCGIF*, SIOCATMARK, SIOCOUTQ); other requests are ENOTTY"),
    17 pread64 => Support::Full(sys_pread64),
    18 pwrite64 => Support::Full(sys_pwrite64),
    19 readv => Support::Full(sys_readv),
    20 writev => Support::Full(sys_writev),
    21 access => Support::Full(sys_access),
    22 pipe => Support::Full(sys_pipe),
    32 dup => Support::Full(sys_dup),
    33 dup2 => Support::Full(sys_dup2),
    40 sendfile => Support::Full(sys_sendfile),
    72 fcntl => Support::Partial(sys_fcntl, "F_DUPFD(_CLOEXEC), F_GETFD/F_SETFD, F_GETFL/F_SETFL (O_ASYNC ignored), POSIX and OFD locks, pipe size, seals; F_SETOWN, F_SETSIG, leases and F_NOTIFY are EINVAL"),
    73 flock => Support::Full(sys_flock),
    74 fsync => Support::Full(sys_fsync),
    75 fdatasync => Support::Full(sys_fdatasync),
    76 truncate => Support::Full(sys_truncate),
    77 ftruncate => Support::Full(sys_ftruncate),
    79 getcwd => Support::Full(sys_getcwd),
    80 chdir => Support::Full(sys_chdir),
    81 fchdir => Support::Full(sys_fchdir),
    82 rename => Support::Full(sys_rename),
    83 mkdir => Support::Full(sys_mkdir),
    84 rmdir => Support::Full(sys_rmdir),
    85 creat => Support::Full(sys_creat),
    86 link => Support::Full(sys_link),
    87 unlink => Support::Full(sys_unlink),
    88 symlink => Support::Full(sys_symlink),
    89 readlink => Support::Full(sys_readlink),
    90 chmod => Support::Full(sys_chmod),
    91 fchmod => Support::Full(sys_fchmod),
    92 chown => Support::Full(sys_chown),
    93 fchown => Support::Full(sys_fchown),
    94 lchown => Support::Full(sys_lchown),
    137 statfs => Support::Full(sys_statfs),
    138 fstatfs => Support::Full(sys_fstatfs),
    217 getdents64 => Support::Full(sys_getdents64),
    257 openat => Support::Partial(sys_openat, "Paths resolve inside the sandbox root; /proc is emulated (the process's own entries and a few system files)"),
    258 mkdirat => Support::Full(sys_mkdirat),
    260 fchownat => Support::Full(sys_fchownat),
    262 newfstatat => Support::Full(sys_newfstatat),
    263 unlinkat => Support::Full(sys_unlinkat),
    264 renameat => Support::Full(sys_renameat),
    265 linkat => Support::Full(sys_linkat),
    266 symlinkat => Support::Full(sys_symlinkat),
    267 readlinkat => Support::Full(sys_readlinkat),
    268 fchmodat => Support::Full(sys_fchmodat),
    269 faccessat => Support::Full(sys_faccessat),
    280 utimensat => Support::Full(sys_utimensat),
    284 eventfd => Support::Full(sys_eventfd),
    285 fallocate => Support::Full(sys_fallocate),
    290 eventfd2 => Support::Full(sys_eventfd2),
    292 dup3 => Support::Full(sys_dup3),
    293 pipe2 => Support::Full(sys_pipe2),
    295 preadv => Support::Full(sys_preadv),
    296 pwritev => Support::Full(sys_pwritev),
    316 renameat2 => Support::Full(sys_renameat2),
    319 memfd_create => Support::Full(sys_memfd_create),
    327 preadv2 => Support::Partial(sys_preadv2, "flags must be 0 (EOPNOTSUPP otherwise)"),
    328 pwritev2 => Support::Partial(sys_pwritev2, "flags must be 0 (EOPNOTSUPP otherwise)"),
    332 statx => Support::Full(sys_statx),
    436 close_range => Support::Full(sys_close_range),
    439 faccessat2 => Support::Full(sys_faccessat2),
];

/// `AT_FDCWD` as the guest passes it (an `int`).
const AT_FDCWD: i64 = -100;
/// The kernel's O_LARGEFILE (libc's constant is 0 on x86-64).
const O_LARGEFILE: i32 = 0o100000;
/// Open flags the kernel knows; others are ignored by `open` (and refused by `openat2`, which
/// the VMM uses, so they are dropped first). `O_ASYNC` is dropped too: signal-driven I/O
/// would signal the VMM, not the guest.
const VALID_OPEN_FLAGS: i32 = libc::O_ACCMODE
    | libc::O_CREAT
    | libc::O_EXCL
    | libc::O_NOCTTY
    | libc::O_TRUNC
    | libc::O_APPEND
    | libc::O_NONBLOCK
    | libc::O_DSYNC
    | libc::O_SYNC
    | libc::O_DIRECT
    | O_LARGEFILE
    | libc::O_DIRECTORY
    | libc::O_NOFOLLOW
    | libc::O_NOATIME
    | libc::O_CLOEXEC
    | libc::O_PATH
    | libc::O_TMPFILE;
/// What `O_PATH` keeps.
const O_PATH_FLAGS: i32 = libc::O_PATH | libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC;
/// Redirections (a walk leaving `/proc`, a link into `/proc`) one lookup follows.
const MAX_REDIRECTS: usize = 16;
const AT_STATX_SYNC_TYPE: i32 = 0x6000;
const STATX_RESERVED: u32 = 0x8000_0000;
const CLOSE_RANGE_UNSHARE: u32 = 1 << 1;
const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;
/// Size of `struct termios` as TCGETS copies it (the kernel's, not glibc's).
const TERMIOS_SIZE: usize = 60;

/// Guest open flags as the kernel's `open` would take them (`build_open_how`).
fn open_flags(flags: i32) -> i32 {
    let f = (flags & VALID_OPEN_FLAGS) | O_LARGEFILE;
    if f & libc::O_PATH != 0 {
        f & O_PATH_FLAGS
    } else {
        f
    }
}

/// Creating with this open?
fn creates(flags: i32) -> bool {
    flags & libc::O_CREAT != 0 || flags & libc::O_TMPFILE == libc::O_TMPFILE
}

/// View a plain C struct as bytes, to copy it to the guest.
///
/// # Safety
/// `T` must be plain data (a libc struct) fully initialised, padding included (zeroed).
unsafe fn bytes_of<T>(v: &T) -> &[u8] {
    // SAFETY: the caller guarantees `T` is plain, initialised data.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
}

fn view<'a>(ctx: &'a SyscallCtx<'_>) -> View<'a> {
    View {
        proc: &ctx.proc,
        tid: ctx.thread.tid,
        sigmask: ctx.thread.sigmask,
    }
}

fn own(fd: i64) -> Result<OwnedFd, Errno> {
    let fd = check(fd)? as RawFd;
    // SAFETY: the kernel just returned this fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// The VMM's own procfs name of a host fd (to reach the object behind an `O_PATH` fd).
fn host_fd_path(fd: RawFd) -> CString {
    CString::new(format!("/proc/self/fd/{fd}")).unwrap_or_default()
}

fn empty() -> CString {
    CString::default()
}

// ---------------------------------------------------------------------------------------
// Path resolution.

/// Read a guest path argument.
fn read_path(ctx: &mut SyscallCtx<'_>, ptr: u64) -> Result<Vec<u8>, Errno> {
    ctx.proc.mm.read_cstring(ptr, PATH_MAX)
}

/// Guest path of the directory `dirfd` for `*at` calls with a relative path.
fn dir_base(ctx: &SyscallCtx<'_>, dirfd: i64) -> Result<Option<String>, Errno> {
    if dirfd == AT_FDCWD {
        return Ok(None);
    }
    let file = ctx.proc.fds.get(dirfd)?;
    let st = file_stat(ctx, &file)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Err(Errno::ENOTDIR);
    }
    procfs::file_guest_path(&ctx.proc, &file)
        .map(Some)
        .ok_or(Errno::ENOENT)
}

/// Make a (non-empty) path absolute relative to `dirfd`.
fn make_abs(ctx: &SyscallCtx<'_>, dirfd: i64, path: &[u8]) -> Result<String, Errno> {
    if path.is_empty() {
        return Err(Errno::ENOENT);
    }
    // Linux ignores dirfd for an absolute path (it is not even checked).
    let base = if path[0] == b'/' {
        None
    } else {
        dir_base(ctx, dirfd)?
    };
    ctx.proc.fs.absolute(base.as_deref(), path)
}

/// What a path names.
#[derive(Debug)]
enum Obj {
    /// An object inside the root, as an `O_PATH` fd (the link itself if not following).
    Host(OwnedFd),
    /// An entry of the emulated `/proc`.
    Proc(Entry),
    /// An open guest file (an fd by `AT_EMPTY_PATH`, or `/proc/self/fd/N` followed).
    File(Arc<OpenFile>),
}

/// The result of an open inside the root.
enum Opened {
    Fd(OwnedFd),
    /// The walk went through a link into `/proc`: continue with this path.
    Proc(String),
}

/// Open `abs` inside the root; a walk that needs the emulated `/proc` (a link into it, such
/// as `/dev/stdout`, or one ending in the host's procfs) is handed back as a `/proc` path.
fn open_in_root(
    ctx: &SyscallCtx<'_>,
    abs: &str,
    flags: i32,
    mode: u32,
    follow: bool,
) -> Result<Opened, Errno> {
    let fs = &ctx.proc.fs;
    match fs.open(abs, flags, mode) {
        Ok(fd) if !on_host_procfs(fd.as_raw_fd()) => Ok(Opened::Fd(fd)),
        Ok(_) => fs
            .path_through_proc(abs, follow)
            .map(Opened::Proc)
            .ok_or(Errno::ENOENT),
        Err(e) if matches!(e, Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR) => {
            fs.path_through_proc(abs, follow).map(Opened::Proc).ok_or(e)
        }
        Err(e) => Err(e),
    }
}

/// Resolve an absolute guest path to the object it names.
fn resolve_abs(ctx: &SyscallCtx<'_>, abs: String, follow: bool) -> Result<Obj, Errno> {
    let mut abs = abs;
    for _ in 0..MAX_REDIRECTS {
        if let Some(rest) = procfs::proc_suffix(&abs) {
            match procfs::resolve(&view(ctx), &rest, follow)? {
                Resolved::Entry(e) => return Ok(Obj::Proc(e)),
                Resolved::Fd(n) => {
                    return ctx
                        .proc
                        .fds
                        .get(i64::from(n))
                        .map(Obj::File)
                        .map_err(|_| Errno::ENOENT)
                }
                Resolved::Outside(p) => {
                    abs = ctx.proc.fs.absolute(None, p.as_bytes())?;
                    continue;
                }
            }
        }
        let flags = libc::O_PATH | if follow { 0 } else { libc::O_NOFOLLOW };
        match open_in_root(ctx, &abs, flags, 0, follow)? {
            Opened::Fd(fd) => return Ok(Obj::Host(fd)),
            Opened::Proc(p) => abs = p,
        }
    }
    Err(Errno::ELOOP)
}

/// Resolve the path argument of a `*at` call. With `empty_ok` (AT_EMPTY_PATH), an empty
/// or NULL path names `dirfd` itself.
fn lookup(
    ctx: &mut SyscallCtx<'_>,
    dirfd: i64,
    ptr: u64,
    follow: bool,
    empty_ok: bool,
) -> Result<Obj, Errno> {
    let path = if ptr == 0 && empty_ok {
        Vec::new()
    } else {
        read_path(ctx, ptr)?
    };
    if path.is_empty() {
        if !empty_ok {
            return Err(Errno::ENOENT);
        }
        if dirfd == AT_FDCWD {
            let cwd = ctx.proc.fs.cwd().to_string();
            return resolve_abs(ctx, cwd, true);
        }
        return ctx.proc.fds.get(dirfd).map(Obj::File);
    }
    let abs = make_abs(ctx, dirfd, &path)?;
    resolve_abs(ctx, abs, follow)
}

/// A name to create, remove or rename.
#[derive(Debug)]
enum Name {
    /// `name` (one component, perhaps with a trailing `/` the kernel will judge) in the
    /// directory `dir` inside the root.
    Root { dir: OwnedFd, name: CString },
    /// Under `/proc`: the entry, if it exists.
    Proc(Option<Entry>),
}

/// Resolve the parent of a path argument for a call acting on its last component.
fn name_arg(ctx: &mut SyscallCtx<'_>, dirfd: i64, ptr: u64) -> Result<Name, Errno> {
    let path = read_path(ctx, ptr)?;
    let mut abs = make_abs(ctx, dirfd, &path)?;
    for _ in 0..MAX_REDIRECTS {
        if let Some(rest) = procfs::proc_suffix(&abs) {
            match procfs::resolve(&view(ctx), &rest, false) {
                Ok(Resolved::Entry(e)) => return Ok(Name::Proc(Some(e))),
                Ok(Resolved::Outside(p)) => {
                    abs = ctx.proc.fs.absolute(None, p.as_bytes())?;
                    continue;
                }
                Ok(Resolved::Fd(_)) | Err(Errno::ENOENT) => return Ok(Name::Proc(None)),
                Err(e) => return Err(e),
            }
        }
        let fs = &ctx.proc.fs;
        let parent = match fs.open_parent(&abs) {
            Ok((dir, _)) if on_host_procfs(dir.as_raw_fd()) => None,
            Ok(pair) => Some(pair),
            Err(e) if matches!(e, Errno::ENOENT | Errno::ELOOP | Errno::ENOTDIR) => {
                match fs.path_through_proc(&abs, false) {
                    Some(p) => {
                        abs = p;
                        continue;
                    }
                    None => return Err(e),
                }
            }
            Err(e) => return Err(e),
        };
        let Some((dir, name)) = parent else {
            abs = fs.path_through_proc(&abs, false).ok_or(Errno::ENOENT)?;
            continue;
        };
        // Keep a trailing slash: the kernel applies its rules ("must be a directory")
        // without following the name.
        let name = if abs.ends_with('/') && !abs.trim_end_matches('/').is_empty() {
            let mut n = name.into_bytes();
            n.push(b'/');
            CString::new(n).map_err(|_| Errno::ENOENT)?
        } else {
            name
        };
        return Ok(Name::Root { dir, name });
    }
    Err(Errno::ELOOP)
}

/// Install a new open file in the guest's table.
fn install(
    ctx: &mut SyscallCtx<'_>,
    fd: OwnedFd,
    kind: FileKind,
    path: Option<String>,
    cloexec: bool,
) -> SysResult {
    let n = ctx
        .proc
        .fds
        .insert(OpenFile::new(fd, kind, path), cloexec)?;
    Ok(n as u64)
}

// ---------------------------------------------------------------------------------------
// Stat helpers.

fn host_fstat(fd: RawFd) -> Result<libc::stat, Errno> {
    // SAFETY: stat is plain data; the kernel fills it.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let e = empty();
    // SAFETY: valid fd, empty NUL-terminated path with AT_EMPTY_PATH, pointer to a local.
    check(i64::from(unsafe {
        libc::fstatat(fd, e.as_ptr(), &mut st, libc::AT_EMPTY_PATH)
    }))?;
    Ok(st)
}

/// `struct stat` of an open guest file (generated files are described as /proc's).
fn file_stat(ctx: &SyscallCtx<'_>, file: &OpenFile) -> Result<libc::stat, Errno> {
    if file.kind == FileKind::Generated {
        let path = file.guest_path.clone().unwrap_or_default();
        let node =
            procfs::node_of_path(&view(ctx), &path).unwrap_or(Node::File(procfs::Gen::Const("")));
        return Ok(procfs::stat_of(&ctx.proc, &Entry { path, node }));
    }
    host_fstat(file.host_fd())
}

fn obj_stat(ctx: &SyscallCtx<'_>, obj: &Obj) -> Result<libc::stat, Errno> {
    match obj {
        Obj::Host(fd) => host_fstat(fd.as_raw_fd()),
        Obj::Proc(e) => Ok(procfs::stat_of(&ctx.proc, e)),
        Obj::File(f) => file_stat(ctx, f),
    }
}

/// Is this open file a generated directory (a /proc listing)?
fn is_generated_dir(ctx: &SyscallCtx<'_>, file: &OpenFile) -> bool {
    file.kind == FileKind::Generated
        && file
            .guest_path
            .as_deref()
            .and_then(|p| procfs::node_of_path(&view(ctx), p))
            == Some(Node::Dir)
}

fn dev_major(dev: u64) -> u32 {
    (((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0xfff)) as u32
}

fn dev_minor(dev: u64) -> u32 {
    (((dev >> 12) & 0xffff_ff00) | (dev & 0xff)) as u32
}

/// A `struct statx` with the basic fields of a `struct stat`.
fn statx_from_stat(st: &libc::stat) -> libc::statx {
    // SAFETY: statx is plain data; all-zero is valid.
    let mut sx: libc::statx = unsafe { std::mem::zeroed() };
    sx.stx_mask = libc::STATX_BASIC_STATS;
    sx.stx_blksize = st.st_blksize as u32;
    sx.stx_nlink = st.st_nlink as u32;
    sx.stx_uid = st.st_uid;
    sx.stx_gid = st.st_gid;
    sx.stx_mode = st.st_mode as u16;
    sx.stx_ino = st.st_ino;
    sx.stx_size = st.st_size as u64;
    sx.stx_blocks = st.st_blocks as u64;
    sx.stx_atime.tv_sec = st.st_atime;
    sx.stx_atime.tv_nsec = st.st_atime_nsec as u32;
    sx.stx_mtime.tv_sec = st.st_mtime;
    sx.stx_mtime.tv_nsec = st.st_mtime_nsec as u32;
    sx.stx_ctime.tv_sec = st.st_ctime;
    sx.stx_ctime.tv_nsec = st.st_ctime_nsec as u32;
    sx.stx_rdev_major = dev_major(st.st_rdev);
    sx.stx_rdev_minor = dev_minor(st.st_rdev);
    sx.stx_dev_major = dev_major(st.st_dev);
    sx.stx_dev_minor = dev_minor(st.st_dev);
    sx
}

fn write_stat(ctx: &mut SyscallCtx<'_>, ptr: u64, st: &libc::stat) -> SysResult {
    // SAFETY: libc::stat is plain data, zero-initialised before it was filled.
    ctx.proc.mm.write(ptr, unsafe { bytes_of(st) })?;
    Ok(0)
}

/// A procfs `struct statfs` (for /proc entries and generated files).
fn proc_statfs() -> libc::statfs {
    // SAFETY: statfs is plain data; all-zero is valid.
    let mut sf: libc::statfs = unsafe { std::mem::zeroed() };
    sf.f_type = procfs::PROC_SUPER_MAGIC;
    sf.f_bsize = 4096;
    sf.f_namelen = 255;
    sf.f_frsize = 4096;
    sf
}

fn host_fstatfs(fd: RawFd) -> Result<libc::statfs, Errno> {
    // SAFETY: statfs is plain data; the kernel fills it.
    let mut sf: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and pointer to a local.
    check(i64::from(unsafe { libc::fstatfs(fd, &mut sf) }))?;
    Ok(sf)
}

// ---------------------------------------------------------------------------------------
// read / write.

/// A zero-length transfer still checks the fd (mode, kind) as Linux does: ask the host.
fn zero_length(host: RawFd, read: bool) -> SysResult {
    let mut byte = 0u8;
    let p: *mut u8 = &mut byte;
    // SAFETY: a zero-length transfer through a valid pointer to a local.
    let r = unsafe {
        if read {
            libc::read(host, p.cast(), 0)
        } else {
            libc::write(host, p.cast(), 0)
        }
    };
    check(r as i64)
}

/// readv/preadv of the host fd into guest memory (`off` None: at the file position).
/// The host call may block (a pipe, a socket), so it runs without the process lock; the
/// caller holds the open file (`file`), so its host fd cannot be closed and reused meanwhile.
fn host_readv(
    ctx: &mut SyscallCtx<'_>,
    file: &OpenFile,
    iovs: &[libc::iovec],
    off: Option<i64>,
) -> SysResult {
    let host = file.host_fd();
    // SAFETY: the iovecs point into guest memory that host_iovecs/guest_iovecs checked and
    // populated for writing; the count is theirs.
    let n = check(ctx.proc.unlocked(|| unsafe {
        match off {
            None => libc::readv(host, iovs.as_ptr(), iovs.len() as i32),
            Some(o) => libc::preadv(host, iovs.as_ptr(), iovs.len() as i32, o),
        }
    }) as i64)?;
    Ok(n)
}

/// writev/pwritev of guest memory to the host fd; EPIPE raises SIGPIPE.
fn host_writev(
    ctx: &mut SyscallCtx<'_>,
    file: &OpenFile,
    iovs: &[libc::iovec],
    off: Option<i64>,
) -> SysResult {
    let host = file.host_fd();
    // SAFETY: the iovecs point into guest memory that host_iovecs/guest_iovecs checked.
    let r = check(ctx.proc.unlocked(|| unsafe {
        match off {
            None => libc::writev(host, iovs.as_ptr(), iovs.len() as i32),
            Some(o) => libc::pwritev(host, iovs.as_ptr(), iovs.len() as i32, o),
        }
    }) as i64);
    ctx.sigpipe_on_epipe(r)
}

/// The host fd of a guest fd for reading (a generated directory reads as EISDIR).
fn readable(ctx: &SyscallCtx<'_>, fd: i64) -> Result<Arc<OpenFile>, Errno> {
    let file = ctx.proc.fds.get(fd)?;
    if is_generated_dir(ctx, &file) {
        return Err(Errno::EISDIR);
    }
    Ok(file)
}

/// A read at the file position. On a socket or pipe to the outside, the journal serves
/// replayed input first and records what is read while rescue windows are live.
fn stream_read(ctx: &mut SyscallCtx<'_>, file: &Arc<OpenFile>, iovs: &[libc::iovec]) -> SysResult {
    journal::begin_call();
    if let Some(served) = journal::read(ctx, file, iovs, journal::Recv::plain())? {
        return Ok(served.bytes.len() as u64);
    }
    let n = host_readv(ctx, file, iovs, None)?;
    journal::after_read(ctx, file, iovs, n as usize, None, journal::Recv::plain());
    Ok(n)
}

/// A write at the file position. On a socket or pipe to the outside, the journal holds it
/// while rescue windows are live (and keeps later writes behind held output).
fn stream_write(ctx: &mut SyscallCtx<'_>, file: &Arc<OpenFile>, iovs: &[libc::iovec]) -> SysResult {
    journal::begin_call();
    let out = journal::Outgoing {
        iovs,
        to: None,
        holdable: true,
        dontwait: false,
    };
    if let Some(r) = journal::write(ctx, file, out) {
        return ctx.sigpipe_on_epipe(r);
    }
    host_writev(ctx, file, iovs, None)
}

fn sys_read(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let file = readable(ctx, a.fd(0))?;
    if a.size(2) == 0 {
        return zero_length(file.host_fd(), true);
    }
    let iovs = ctx.proc.mm.host_iovecs(a.ptr(1), a.size(2), true)?;
    stream_read(ctx, &file, &iovs)
}

fn sys_write(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let file = ctx.proc.fds.get(a.fd(0))?;
    if a.size(2) == 0 {
        return zero_length(file.host_fd(), false);
    }
    let iovs = ctx.proc.mm.host_iovecs(a.ptr(1), a.size(2), false)?;
    stream_write(ctx, &file, &iovs)
}

fn sys_pread64(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let file = readable(ctx, a.fd(0))?;
    let off = a.long(3);
    if off < 0 {
        return Err(Errno::EINVAL);
    }
    // Zero length: no iovec, but the host still checks the fd (ESPIPE for a pipe, EBADF for
    // a write-only fd) as for any pread.
    let iovs = if a.size(2) == 0 {
        Vec::new()
    } else {
        ctx.proc.mm.host_iovecs(a.ptr(1), a.size(2), true)?
    };
    host_readv(ctx, &file, &iovs, Some(off))
}

fn sys_pwrite64(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let file = ctx.proc.fds.get(a.fd(0))?;
    let off = a.long(3);
    if off < 0 {
        return Err(Errno::EINVAL);
    }
    let iovs = if a.size(2) == 0 {
        Vec::new()
    } else {
        ctx.proc.mm.host_iovecs(a.ptr(1), a.size(2), false)?
    };
    host_writev(ctx, &file, &iovs, Some(off))
}

/// readv/preadv/preadv2: `off` None reads at the file position.
fn vector_read(ctx: &mut SyscallCtx<'_>, a: &Args, off: Option<i64>) -> SysResult {
    let file = readable(ctx, a.fd(0))?;
    if off.is_some_and(|o| o < 0) {
        return Err(Errno::EINVAL);
    }
    let iovs = ctx.proc.mm.guest_iovecs(a.ptr(1), a.raw(2) as i64, true)?;
    match off {
        None => stream_read(ctx, &file, &iovs),
        Some(_) => host_readv(ctx, &file, &iovs, off),
    }
}

fn vector_write(ctx: &mut SyscallCtx<'_>, a: &Args, off: Option<i64>) -> SysResult {
    let file = ctx.proc.fds.get(a.fd(0))?;
    if off.is_some_and(|o| o < 0) {
        return Err(Errno::EINVAL);
    }
    let iovs = ctx.proc.mm.guest_iovecs(a.ptr(1), a.raw(2) as i64, false)?;
    match off {
        None => stream_write(ctx, &file, &iovs),
        Some(_) => host_writev(ctx, &file, &iovs, off),
    }
}

fn sys_readv(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    vector_read(ctx, a, None)
}

fn sys_writev(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    vector_write(ctx, a, None)
}

// On x86-64 the offset is one register (pos_l); pos_h is ignored by the kernel.
fn sys_preadv(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    vector_read(ctx, a, Some(a.long(3)))
}

fn sys_pwritev(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    vector_write(ctx, a, Some(a.long(3)))
}

fn sys_preadv2(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    if a.int(5) != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    let off = a.long(3);
    vector_read(ctx, a, (off != -1).then_some(off))
}

fn sys_pwritev2(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    if a.int(5) != 0 {
        return Err(Errno::EOPNOTSUPP);
    }
    let off = a.long(3);
    vector_write(ctx, a, (off != -1).then_some(off))
}

fn sys_lseek(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let host = ctx.proc.fds.host_fd(a.fd(0))?;
    // SAFETY: lseek on a host fd we own.
    check(unsafe { libc::lseek(host, a.long(1), a.int(2)) })
}

fn sys_sendfile(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let (out_fd, in_fd, off_ptr, count) = (a.fd(0), a.fd(1), a.ptr(2), a.size(3));
    let mut off: Option<i64> = None;
    if off_ptr != 0 {
        let mut b = [0u8; 8];
        ctx.proc.mm.read(off_ptr, &mut b)?;
        off = Some(i64::from_le_bytes(b));
    }
    let in_file = readable(ctx, in_fd)?;
    let out_file = ctx.proc.fds.get(out_fd)?;
    // Output the journal cannot hold: what it holds on the file goes first, and a rollback
    // to a live window shuts the connection down.
    journal::begin_call();
    if let Some(r) = journal::direct(ctx, &out_file) {
        return ctx.sigpipe_on_epipe(r);
    }
    let (in_host, out_host) = (in_file.host_fd(), out_file.host_fd());
    let count = count.min(crate::mm::MAX_RW_COUNT);
    // May block on a socket: without the process lock, holding both open files.
    let r = ctx.proc.unlocked(|| match off.as_mut() {
        // SAFETY: host fds we hold open; the offset is a local.
        Some(o) => check(unsafe { libc::sendfile(out_host, in_host, o, count) } as i64),
        None => {
            // SAFETY: host fds we hold open; no offset (the file position is used).
            check(unsafe { libc::sendfile(out_host, in_host, std::ptr::null_mut(), count) } as i64)
        }
    });
    if let Some(o) = off {
        ctx.proc.mm.write(off_ptr, &o.to_le_bytes())?;
    }
    ctx.sigpipe_on_epipe(r)
}

// ---------------------------------------------------------------------------------------
// open / close.

/// Open what `/proc/self/fd/N` names: a new description of the same object. A file outside
/// the root (a redirected stdio) may only be reopened with access the guest already has.
fn reopen(ctx: &SyscallCtx<'_>, file: &OpenFile, flags: i32, mode: u32) -> Result<OwnedFd, Errno> {
    let host = file.host_fd();
    let acc = flags & libc::O_ACCMODE;
    let path_only = flags & libc::O_PATH != 0;
    if file.kind == FileKind::Generated && acc != libc::O_RDONLY && !path_only {
        return Err(Errno::EACCES);
    }
    if file.kind == FileKind::Host && !path_only && ctx.proc.fs.guest_path_of(host).is_none() {
        // SAFETY: F_GETFL on a host fd we own.
        let orig = unsafe { libc::fcntl(host, libc::F_GETFL) };
        let orig_acc = if orig < 0 || orig & libc::O_PATH != 0 {
            -1
        } else {
            orig & libc::O_ACCMODE
        };
        let allowed = match acc {
            libc::O_RDONLY => orig_acc == libc::O_RDONLY || orig_acc == libc::O_RDWR,
            libc::O_WRONLY => orig_acc == libc::O_WRONLY || orig_acc == libc::O_RDWR,
            _ => orig_acc == libc::O_RDWR,
        };
        if !allowed {
            return Err(Errno::EACCES);
        }
    }
    let p = host_fd_path(host);
    // SAFETY: opens the VMM's own procfs link of a host fd we own; the result is checked.
    own(i64::from(unsafe {
        libc::open(p.as_ptr(), flags | libc::O_CLOEXEC | libc::O_NOCTTY, mode)
    }))
}

/// Open an emulated /proc entry as a snapshot.
fn open_proc(ctx: &SyscallCtx<'_>, e: &Entry, flags: i32) -> Result<OwnedFd, Errno> {
    let acc = flags & libc::O_ACCMODE;
    let path_only = flags & libc::O_PATH != 0;
    match &e.node {
        Node::Dir => {
            if !path_only && (flags & libc::O_CREAT != 0 || acc != libc::O_RDONLY) {
                return Err(Errno::EISDIR);
            }
            let comps: Vec<&str> = e
                .path
                .trim_start_matches("/proc")
                .split('/')
                .filter(|c| !c.is_empty())
                .collect();
            let mut listing = procfs::list(&view(ctx), &comps);
            if e.path.ends_with("/fd") {
                // Linux lists the directory's own fd too: it gets the lowest free number.
                let used: std::collections::BTreeSet<i32> =
                    ctx.proc.fds.iter().map(|(fd, _)| fd).collect();
                let own_fd = (0..).find(|n| !used.contains(n)).unwrap_or(0);
                let at = listing
                    .iter()
                    .position(|(n, _)| n.parse::<i32>().is_ok_and(|fd| fd > own_fd))
                    .unwrap_or(listing.len());
                listing.insert(at, (own_fd.to_string(), libc::DT_LNK));
            }
            procfs::materialize(&procfs::dirents(&e.path, &listing), flags)
        }
        Node::File(g) => {
            if flags & libc::O_DIRECTORY != 0 {
                return Err(Errno::ENOTDIR);
            }
            if flags & (libc::O_CREAT | libc::O_EXCL) == libc::O_CREAT | libc::O_EXCL {
                return Err(Errno::EEXIST);
            }
            if !path_only && (acc != libc::O_RDONLY || flags & libc::O_TRUNC != 0) {
                return Err(Errno::EACCES);
            }
            procfs::materialize(&procfs::contents(&view(ctx), *g), flags)
        }
        // O_NOFOLLOW reached the link itself.
        Node::Link(_) => Err(Errno::ELOOP),
    }
}

fn do_open(ctx: &mut SyscallCtx<'_>, dirfd: i64, ptr: u64, flags: i32, mode: u32) -> SysResult {
    let flags = open_flags(flags);
    let path = read_path(ctx, ptr)?;
    let mut abs = make_abs(ctx, dirfd, &path)?;
    let cloexec = flags & libc::O_CLOEXEC != 0;
    // The VMM's own umask is 0 (see the report): the guest's is applied here.
    let mode = if creates(flags) {
        mode & 0o7777 & !ctx.proc.umask
    } else {
        0
    };
    let follow = flags & libc::O_NOFOLLOW == 0
        && flags & (libc::O_CREAT | libc::O_EXCL) != libc::O_CREAT | libc::O_EXCL;
    // O_CLOEXEC is the guest's fd flag; the host fd always has it (FsContext adds it).
    // O_NOCTTY: the VMM must never acquire a controlling terminal.
    let host_flags = if flags & libc::O_PATH != 0 {
        flags & !libc::O_CLOEXEC
    } else {
        (flags & !libc::O_CLOEXEC) | libc::O_NOCTTY
    };
    for _ in 0..MAX_REDIRECTS {
        if let Some(rest) = procfs::proc_suffix(&abs) {
            match procfs::resolve(&view(ctx), &rest, follow) {
                Ok(Resolved::Entry(e)) => {
                    let fd = open_proc(ctx, &e, flags)?;
                    return install(ctx, fd, FileKind::Generated, Some(e.path), cloexec);
                }
                Ok(Resolved::Fd(n)) => {
                    let file = ctx.proc.fds.get(i64::from(n)).map_err(|_| Errno::ENOENT)?;
                    let fd = reopen(ctx, &file, host_flags, mode)?;
                    let kind = if file.kind == FileKind::Generated {
                        FileKind::Generated
                    } else {
                        FileKind::Host
                    };
                    let path = procfs::file_guest_path(&ctx.proc, &file);
                    return install(ctx, fd, kind, path, cloexec);
                }
                Ok(Resolved::Outside(p)) => {
                    abs = ctx.proc.fs.absolute(None, p.as_bytes())?;
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        match open_in_root(ctx, &abs, host_flags, mode, follow)? {
            Opened::Fd(fd) => {
                let path = ctx
                    .proc
                    .fs
                    .guest_path_of(fd.as_raw_fd())
                    .unwrap_or_else(|| normalize(&abs));
                return install(ctx, fd, FileKind::Host, Some(path), cloexec);
            }
            Opened::Proc(p) => abs = p,
        }
    }
    Err(Errno::ELOOP)
}

fn sys_open(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    do_open(ctx, AT_FDCWD, a.ptr(0), a.int(1), a.uint(2))
}

fn sys_openat(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    do_open(ctx, a.fd(0), a.ptr(1), a.int(2), a.uint(3))
}

fn sys_creat(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let flags = libc::O_CREAT | libc::O_WRONLY | libc::O_TRUNC;
    do_open(ctx, AT_FDCWD, a.ptr(0), flags, a.uint(1))
}

fn sys_close(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let slot = ctx.proc.fds.remove(a.fd(0))?;
    // Its last fd: off the epoll interest lists (a checkpoint may keep the host fd open).
    ctx.proc.fds.forget_file(&slot.file);
    Ok(0)
}

fn sys_close_range(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let (first, last, flags) = (a.uint(0), a.uint(1), a.uint(2));
    if flags & !(CLOSE_RANGE_UNSHARE | CLOSE_RANGE_CLOEXEC) != 0 || first > last {
        return Err(Errno::EINVAL);
    }
    let fds: Vec<i32> = ctx
        .proc
        .fds
        .iter()
        .map(|(fd, _)| fd)
        .filter(|&fd| (first..=last).contains(&(fd as u32)))
        .collect();
    let mut closed = Vec::new();
    for fd in fds {
        if flags & CLOSE_RANGE_CLOEXEC != 0 {
            ctx.proc.fds.set_cloexec(i64::from(fd), true)?;
        } else {
            closed.push(ctx.proc.fds.remove(i64::from(fd))?.file);
        }
    }
    ctx.proc.fds.forget_files(&closed);
    Ok(0)
}

// ---------------------------------------------------------------------------------------
// stat family.

fn stat_at(ctx: &mut SyscallCtx<'_>, dirfd: i64, ptr: u64, buf: u64, flags: i32) -> SysResult {
    if flags & !(libc::AT_SYMLINK_NOFOLLOW | libc::AT_NO_AUTOMOUNT | libc::AT_EMPTY_PATH) != 0 {
        return Err(Errno::EINVAL);
    }
    let follow = flags & libc::AT_SYMLINK_NOFOLLOW == 0;
    let obj = lookup(ctx, dirfd, ptr, follow, flags & libc::AT_EMPTY_PATH != 0)?;
    let st = obj_stat(ctx, &obj)?;
    write_stat(ctx, buf, &st)
}

fn sys_stat(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    stat_at(ctx, AT_FDCWD, a.ptr(0), a.ptr(1), 0)
}

fn sys_lstat(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    stat_at(ctx, AT_FDCWD, a.ptr(0), a.ptr(1), libc::AT_SYMLINK_NOFOLLOW)
}

fn sys_newfstatat(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    stat_at(ctx, a.fd(0), a.ptr(1), a.ptr(2), a.int(3))
}

fn sys_fstat(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let file = ctx.proc.fds.get(a.fd(0))?;
    let st = file_stat(ctx, &file)?;
    write_stat(ctx, a.ptr(1), &st)
}

fn sys_statx(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let (dirfd, ptr, flags, mask, buf) = (a.fd(0), a.ptr(1), a.int(2), a.uint(3), a.ptr(4));
    let known = libc::AT_SYMLINK_NOFOLLOW
        | libc::AT_NO_AUTOMOUNT
        | libc::AT_EMPTY_PATH
        | AT_STATX_SYNC_TYPE;
    if flags & !known != 0
        || flags & AT_STATX_SYNC_TYPE == AT_STATX_SYNC_TYPE
        || mask & STATX_RESERVED != 0
    {
        return Err(Errno::EINVAL);
    }
    let follow = flags & libc::AT_SYMLINK_NOFOLLOW == 0;
    let obj = lookup(ctx, dirfd, ptr, follow, flags & libc::AT_EMPTY_PATH != 0)?;
    let host = match &obj {
        Obj::Host(fd) => Some(fd.as_raw_fd()),
        Obj::File(f) if f.kind != FileKind::Generated => Some(f.host_fd()),
        _ => None,
    };
    let sx = match host {
        Some(fd) => {
            // SAFETY: statx is plain data; the kernel fills it.
            let mut sx: libc::statx = unsafe { std::mem::zeroed() };
            let e = empty();
            let hflags =
                libc::AT_EMPTY_PATH | (flags & (AT_STATX_SYNC_TYPE | libc::AT_NO_AUTOMOUNT));
            // SAFETY: valid fd, empty path with AT_EMPTY_PATH, pointer to a local.
            check(i64::from(unsafe {
                libc::statx(fd, e.as_ptr(), hflags, mask, &mut sx)
            }))?;
            sx
        }
        None => statx_from_stat(&obj_stat(ctx, &obj)?),
    };
    // SAFETY: libc::statx is plain data, zero-initialised before it was filled.
    ctx.proc.mm.write(buf, unsafe { bytes_of(&sx) })?;
    Ok(0)
}

fn sys_statfs(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let obj = lookup(ctx, AT_FDCWD, a.ptr(0), true, false)?;
    let sf = match &obj {
        Obj::Host(fd) => host_fstatfs(fd.as_raw_fd())?,
        Obj::File(f) if f.kind != FileKind::Generated => host_fstatfs(f.host_fd())?,
        _ => proc_statfs(),
    };
    // SAFETY: libc::statfs is plain data, zero-initialised before it was filled.
    ctx.proc.mm.write(a.ptr(1), unsafe { bytes_of(&sf) })?;
    Ok(0)
}

fn sys_fstatfs(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let file = ctx.proc.fds.get(a.fd(0))?;
    let sf = if file.kind == FileKind::Generated {
        proc_statfs()
    } else {
        host_fstatfs(file.host_fd())?
    };
    // SAFETY: libc::statfs is plain data, zero-initialised before it was filled.
    ctx.proc.mm.write(a.ptr(1), unsafe { bytes_of(&sf) })?;
    Ok(0)
}

// ---------------------------------------------------------------------------------------
// access, readlink.

fn access_at(ctx: &mut SyscallCtx<'_>, dirfd: i64, ptr: u64, mode: i32, flags: i32) -> SysResult {
    if mode & !(libc::R_OK | libc::W_OK | libc::X_OK) != 0
        || flags & !(libc::AT_EACCESS | libc::AT_SYMLINK_NOFOLLOW | libc::AT_EMPTY_PATH) != 0
    {
        return Err(Errno::EINVAL);
    }
    let follow = flags & libc::AT_SYMLINK_NOFOLLOW == 0;
    let obj = lookup(ctx, dirfd, ptr, follow, flags & libc::AT_EMPTY_PATH != 0)?;
    let host = match &obj {
        Obj::Host(fd) => fd.as_raw_fd(),
        Obj::File(f) if f.kind != FileKind::Generated => f.host_fd(),
        _ => {
            // /proc: files are read-only, links and directories are searchable.
            let st = obj_stat(ctx, &obj)?;
            let is_file = st.st_mode & libc::S_IFMT == libc::S_IFREG;
            let is_link = st.st_mode & libc::S_IFMT == libc::S_IFLNK;
            if !is_link && (mode & libc::W_OK != 0 || (is_file && mode & libc::X_OK != 0)) {
                return Err(Errno::EACCES);
            }
            return Ok(0);
        }
    };
    let e = empty();
    // SAFETY: valid fd and empty path with AT_EMPTY_PATH.
    check(unsafe {
        libc::syscall(
            libc::SYS_faccessat2,
            host,
            e.as_ptr(),
            mode,
            libc::AT_EMPTY_PATH | (flags & libc::AT_EACCESS),
        )
    })
}

fn sys_access(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    access_at(ctx, AT_FDCWD, a.ptr(0), a.int(1), 0)
}

fn sys_faccessat(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    access_at(ctx, a.fd(0), a.ptr(1), a.int(2), 0)
}

fn sys_faccessat2(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    access_at(ctx, a.fd(0), a.ptr(1), a.int(2), a.int(3))
}

/// The text of the symbolic link at `fd` (an `O_PATH|O_NOFOLLOW` fd); EINVAL if it is not one.
fn host_readlink(fd: RawFd) -> Result<Vec<u8>, Errno> {
    let mut buf = vec![0u8; PATH_MAX];
    let e = empty();
    // SAFETY: valid fd, empty path (the link itself), a buffer of ours with its length.
    let n = unsafe { libc::readlinkat(fd, e.as_ptr(), buf.as_mut_ptr().cast(), buf.len()) };
    if n < 0 {
        let err = Errno::last();
        // An empty path names something other than a link: Linux's readlink says EINVAL.
        if err == Errno::ENOENT {
            return Err(Errno::EINVAL);
        }
        return Err(err);
    }
    buf.truncate(n as usize);
    Ok(buf)
}

fn readlink_at(ctx: &mut SyscallCtx<'_>, dirfd: i64, ptr: u64, buf: u64, size: i32) -> SysResult {
    if size <= 0 {
        return Err(Errno::EINVAL);
    }
    let path = read_path(ctx, ptr)?;
    let text =
        if path.is_empty() {
            // Linux: an empty path reads the link that dirfd (an O_PATH fd) is.
            if dirfd == AT_FDCWD {
                return Err(Errno::ENOENT);
            }
            let file = ctx.proc.fds.get(dirfd)?;
            if file.kind == FileKind::Generated {
                return Err(Errno::ENOENT);
            }
            host_readlink(file.host_fd()).map_err(|e| {
                if e == Errno::EINVAL {
                    Errno::ENOENT
                } else {
                    e
                }
            })?
        } else {
            let abs = make_abs(ctx, dirfd, &path)?;
            match resolve_abs(ctx, abs, false)? {
                Obj::Host(fd) => host_readlink(fd.as_raw_fd())?,
                Obj::Proc(Entry {
                    node: Node::Link(l),
                    ..
                }) => procfs::link_text(&ctx.proc, &l)
                    .ok_or(Errno::ENOENT)?
                    .into_bytes(),
                _ => return Err(Errno::EINVAL),
            }
        };
    let n = text.len().min(size as usize);
    ctx.proc.mm.write(buf, &text[..n])?;
    Ok(n as u64)
}

fn sys_readlink(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    readlink_at(ctx, AT_FDCWD, a.ptr(0), a.ptr(1), a.int(2))
}

fn sys_readlinkat(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    readlink_at(ctx, a.fd(0), a.ptr(1), a.ptr(2), a.int(3))
}

// ---------------------------------------------------------------------------------------
// Directories.

fn sys_getdents64(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let file = ctx.proc.fds.get(a.fd(0))?;
    let (ptr, count) = (a.ptr(1), a.uint(2) as usize);
    if file.kind == FileKind::Generated {
        if !is_generated_dir(ctx, &file) {
            return Err(Errno::ENOTDIR);
        }
        return generated_getdents(ctx, file.host_fd(), ptr, count);
    }
    let host = file.host_fd();
    let iovs = ctx.proc.mm.host_iovecs(ptr, count, true)?;
    if let [one] = iovs.as_slice() {
        if one.iov_len == count {
            // Contiguous in guest RAM: the kernel writes the records in place.
            // SAFETY: the iovec points into guest memory checked and populated for writing.
            let n = check(unsafe {
                libc::syscall(libc::SYS_getdents64, host, one.iov_base, one.iov_len)
            })?;
            return Ok(n);
        }
    }
    // Split across frames: go through a buffer of the accessible length, at most 1 MiB (a
    // short read of a directory is normal; the guest calls again).
    let len: usize = iovs.iter().map(|i| i.iov_len).sum::<usize>().min(1 << 20);
    let mut buf = vec![0u8; len];
    // SAFETY: our own buffer and its length.
    let n =
        check(unsafe { libc::syscall(libc::SYS_getdents64, host, buf.as_mut_ptr(), buf.len()) })?
            as usize;
    ctx.proc.mm.write(ptr, &buf[..n])?;
    Ok(n as u64)
}

/// Whole `linux_dirent64` records at the start of `data` (their total length).
fn whole_records(data: &[u8]) -> usize {
    let mut off = 0usize;
    while off + 19 <= data.len() {
        let reclen = usize::from(u16::from_le_bytes([data[off + 16], data[off + 17]]));
        if reclen < 19 || off + reclen > data.len() {
            break;
        }
        off += reclen;
    }
    off
}

/// getdents64 of a generated directory: records stored in the memfd from its position on.
fn generated_getdents(ctx: &mut SyscallCtx<'_>, host: RawFd, ptr: u64, count: usize) -> SysResult {
    // SAFETY: lseek on a host fd we own.
    let pos = check(unsafe { libc::lseek(host, 0, libc::SEEK_CUR) })? as i64;
    // At least one byte, to tell the end (0) from a buffer too small (EINVAL).
    let mut data = vec![0u8; count.clamp(1, 1 << 20)];
    // SAFETY: reads into our own buffer within its bounds.
    let n = check(unsafe { libc::pread(host, data.as_mut_ptr().cast(), data.len(), pos) } as i64)?;
    data.truncate(n as usize);
    let take = whole_records(&data[..data.len().min(count)]);
    if take == 0 {
        return if data.is_empty() {
            Ok(0)
        } else {
            Err(Errno::EINVAL)
        };
    }
    ctx.proc.mm.write(ptr, &data[..take])?;
    // SAFETY: lseek on a host fd we own.
    check(unsafe { libc::lseek(host, pos + take as i64, libc::SEEK_SET) })?;
    Ok(take as u64)
}

fn sys_getcwd(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let mut cwd = ctx.proc.fs.cwd().as_bytes().to_vec();
    cwd.push(0);
    if a.size(1) < cwd.len() {
        return Err(Errno::ERANGE);
    }
    ctx.proc.mm.write(a.ptr(0), &cwd)?;
    Ok(cwd.len() as u64)
}

/// The guest path of a directory object, for chdir/fchdir.
fn directory_path(ctx: &SyscallCtx<'_>, obj: &Obj, fallback: &str) -> Result<String, Errno> {
    let st = obj_stat(ctx, obj)?;
    if st.st_mode & libc::S_IFMT != libc::S_IFDIR {
        return Err(Errno::ENOTDIR);
    }
    match obj {
        Obj::Host(fd) => Ok(ctx
            .proc
            .fs
            .guest_path_of(fd.as_raw_fd())
            .unwrap_or_else(|| normalize(fallback))),
        Obj::Proc(e) => Ok(e.path.clone()),
        Obj::File(f) => procfs::file_guest_path(&ctx.proc, f).ok_or(Errno::ENOENT),
    }
}

fn sys_chdir(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let path = read_path(ctx, a.ptr(0))?;
    let abs = make_abs(ctx, AT_FDCWD, &path)?;
    let obj = resolve_abs(ctx, abs.clone(), true)?;
    let cwd = directory_path(ctx, &obj, &abs)?;
    ctx.proc.fs.set_cwd(cwd);
    Ok(0)
}

fn sys_fchdir(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let file = ctx.proc.fds.get(a.fd(0))?;
    let cwd = directory_path(ctx, &Obj::File(file), "/")?;
    ctx.proc.fs.set_cwd(cwd);
    Ok(0)
}

// ---------------------------------------------------------------------------------------
// Names: mkdir, unlink, rename, link, symlink.

/// The error of changing a name under /proc, as Linux gives it: its lookups fail with
/// ENOENT rather than offering a name to create, and existing entries refuse changes.
fn proc_name_error(exists: bool, create: bool) -> Errno {
    match (exists, create) {
        (true, true) => Errno::EEXIST,
        (true, false) => Errno::EPERM,
        (false, _) => Errno::ENOENT,
    }
}

fn mkdir_at(ctx: &mut SyscallCtx<'_>, dirfd: i64, ptr: u64, mode: u32) -> SysResult {
    let mode = mode & 0o1777 & !ctx.proc.umask;
    match name_arg(ctx, dirfd, ptr)? {
        Name::Root { dir, name } => {
            // SAFETY: valid dirfd and one-component name.
            check(i64::from(unsafe {
                libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode)
            }))
        }
        Name::Proc(e) => Err(proc_name_error(e.is_some(), true)),
    }
}

fn sys_mkdir(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    mkdir_at(ctx, AT_FDCWD, a.ptr(0), a.uint(1))
}

fn sys_mkdirat(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    mkdir_at(ctx, a.fd(0), a.ptr(1), a.uint(2))
}

fn unlink_at(ctx: &mut SyscallCtx<'_>, dirfd: i64, ptr: u64, flags: i32) -> SysResult {
    if flags & !libc::AT_REMOVEDIR != 0 {
        return Err(Errno::EINVAL);
    }
    match name_arg(ctx, dirfd, ptr)? {
        // A file's unlink is deferred while a checkpoint is live (fs/removals.rs).
        Name::Root { dir, name } if flags == 0 => {
            ctx.proc.fs.removals.unlink(&dir, &name).map(|()| 0)
        }
        Name::Root { dir, name } => {
            // SAFETY: valid dirfd and one-component name.
            check(i64::from(unsafe {
                libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), flags)
            }))
        }
        Name::Proc(e) => Err(proc_name_error(e.is_some(), false)),
    }
}

fn sys_unlink(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    unlink_at(ctx, AT_FDCWD, a.ptr(0), 0)
}

fn sys_rmdir(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    unlink_at(ctx, AT_FDCWD, a.ptr(0), libc::AT_REMOVEDIR)
}

fn sys_unlinkat(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    unlink_at(ctx, a.fd(0), a.ptr(1), a.int(2))
}

fn rename_at(
    ctx: &mut SyscallCtx<'_>,
    (olddir, old): (i64, u64),
    (newdir, new): (i64, u64),
    flags: u32,
) -> SysResult {
    let from = name_arg(ctx, olddir, old)?;
    let to = name_arg(ctx, newdir, new)?;
    match (from, to) {
        (Name::Root { dir: od, name: on }, Name::Root { dir: nd, name: nn }) => {
            // SAFETY: valid dirfds and one-component names.
            check(unsafe {
                libc::syscall(
                    libc::SYS_renameat2,
                    od.as_raw_fd(),
                    on.as_ptr(),
                    nd.as_raw_fd(),
                    nn.as_ptr(),
                    flags,
                )
            })
        }
        (Name::Proc(None), _) | (Name::Proc(_), Name::Proc(None)) => Err(Errno::ENOENT),
        (Name::Proc(_), Name::Proc(_)) => Err(Errno::EPERM),
        // Different file systems.
        _ => Err(Errno::EXDEV),
    }
}

fn sys_rename(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    rename_at(ctx, (AT_FDCWD, a.ptr(0)), (AT_FDCWD, a.ptr(1)), 0)
}

fn sys_renameat(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    rename_at(ctx, (a.fd(0), a.ptr(1)), (a.fd(2), a.ptr(3)), 0)
}

fn sys_renameat2(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    rename_at(ctx, (a.fd(0), a.ptr(1)), (a.fd(2), a.ptr(3)), a.uint(4))
}

fn link_at(
    ctx: &mut SyscallCtx<'_>,
    (olddir, old): (i64, u64),
    (newdir, new): (i64, u64),
    flags: i32,
) -> SysResult {
    if flags & !(libc::AT_SYMLINK_FOLLOW | libc::AT_EMPTY_PATH) != 0 {
        return Err(Errno::EINVAL);
    }
    let old_path = read_path(ctx, old)?;
    let empty_old = old_path.is_empty() && flags & libc::AT_EMPTY_PATH != 0;
    // A trailing slash or dot makes Linux follow (and then refuse a directory).
    let follow = flags & libc::AT_SYMLINK_FOLLOW != 0
        || old_path.ends_with(b"/")
        || old_path.ends_with(b"/.")
        || old_path.ends_with(b"/..")
        || old_path == b"."
        || old_path == b"..";
    // The source: by name (not following: the kernel links the name's own inode), or by
    // object (an O_PATH fd, linked through the VMM's /proc/self/fd/N).
    enum Source {
        Name(OwnedFd, CString),
        Object(RawFd, Option<OwnedFd>),
    }
    let source = if empty_old {
        let file = if olddir == AT_FDCWD {
            return Err(Errno::EPERM);
        } else {
            ctx.proc.fds.get(olddir)?
        };
        linkable(ctx, &file)?;
        Source::Object(file.host_fd(), None)
    } else if follow {
        let abs = make_abs(ctx, olddir, &old_path)?;
        match resolve_abs(ctx, abs, true)? {
            Obj::Host(fd) => Source::Object(fd.as_raw_fd(), Some(fd)),
            Obj::File(f) => {
                linkable(ctx, &f)?;
                Source::Object(f.host_fd(), None)
            }
            Obj::Proc(_) => return Err(Errno::EXDEV),
        }
    } else {
        match name_arg(ctx, olddir, old)? {
            Name::Root { dir, name } => Source::Name(dir, name),
            Name::Proc(None) => return Err(Errno::ENOENT),
            Name::Proc(Some(_)) => return Err(Errno::EXDEV),
        }
    };
    let (nd, nn) = match name_arg(ctx, newdir, new)? {
        Name::Root { dir, name } => (dir, name),
        Name::Proc(_) => return Err(Errno::EXDEV),
    };
    match source {
        // SAFETY: valid dirfds and one-component names.
        Source::Name(od, on) => check(i64::from(unsafe {
            libc::linkat(od.as_raw_fd(), on.as_ptr(), nd.as_raw_fd(), nn.as_ptr(), 0)
        })),
        Source::Object(fd, _keep) => {
            let p = host_fd_path(fd);
            // SAFETY: the VMM's own procfs link of a host fd we own; valid dirfd and name.
            check(i64::from(unsafe {
                libc::linkat(
                    libc::AT_FDCWD,
                    p.as_ptr(),
                    nd.as_raw_fd(),
                    nn.as_ptr(),
                    libc::AT_SYMLINK_FOLLOW,
                )
            }))
        }
    }
}

/// An open file may get a name in the root only if it is inside the root already (an
/// O_TMPFILE or an unlinked file counts): never a host file given as stdio.
fn linkable(ctx: &SyscallCtx<'_>, file: &OpenFile) -> Result<(), Errno> {
    if file.kind != FileKind::Host || ctx.proc.fs.guest_path_of(file.host_fd()).is_none() {
        return Err(Errno::EXDEV);
    }
    Ok(())
}

fn sys_link(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    link_at(ctx, (AT_FDCWD, a.ptr(0)), (AT_FDCWD, a.ptr(1)), 0)
}

fn sys_linkat(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    link_at(ctx, (a.fd(0), a.ptr(1)), (a.fd(2), a.ptr(3)), a.int(4))
}

fn symlink_at(ctx: &mut SyscallCtx<'_>, target: u64, dirfd: i64, ptr: u64) -> SysResult {
    let target = read_path(ctx, target)?;
    if target.is_empty() {
        return Err(Errno::ENOENT);
    }
    // The text is stored as given; it is resolved inside the root whenever it is followed.
    let target = CString::new(target).map_err(|_| Errno::EINVAL)?;
    match name_arg(ctx, dirfd, ptr)? {
        Name::Root { dir, name } => {
            // SAFETY: valid strings and dirfd; one-component name.
            check(i64::from(unsafe {
                libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr())
            }))
        }
        Name::Proc(e) => Err(proc_name_error(e.is_some(), true)),
    }
}

fn sys_symlink(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    symlink_at(ctx, a.ptr(0), AT_FDCWD, a.ptr(1))
}

fn sys_symlinkat(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    symlink_at(ctx, a.ptr(0), a.fd(1), a.ptr(2))
}

// ---------------------------------------------------------------------------------------
// Attributes: chmod, chown, utimensat, truncate.

/// A host fd for the object, or the errno for /proc (which refuses attribute changes).
fn attr_target(obj: &Obj, proc_errno: Errno) -> Result<RawFd, Errno> {
    match obj {
        Obj::Host(fd) => Ok(fd.as_raw_fd()),
        Obj::File(f) if f.kind != FileKind::Generated => Ok(f.host_fd()),
        _ => Err(proc_errno),
    }
}

fn chmod_at(ctx: &mut SyscallCtx<'_>, dirfd: i64, ptr: u64, mode: u32) -> SysResult {
    let obj = lookup(ctx, dirfd, ptr, true, false)?;
    let fd = attr_target(&obj, Errno::EPERM)?;
    let p = host_fd_path(fd);
    // SAFETY: the VMM's own procfs link of a host fd we own (it leads to the object).
    check(i64::from(unsafe {
        libc::fchmodat(libc::AT_FDCWD, p.as_ptr(), mode & 0o7777, 0)
    }))
}

fn sys_chmod(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    chmod_at(ctx, AT_FDCWD, a.ptr(0), a.uint(1))
}

fn sys_fchmodat(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    chmod_at(ctx, a.fd(0), a.ptr(1), a.uint(2))
}

fn sys_fchmod(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let file = ctx.proc.fds.get(a.fd(0))?;
    if file.kind == FileKind::Generated {
        return Err(Errno::EPERM);
    }
    // SAFETY: fchmod on a host fd we own.
    check(i64::from(unsafe {
        libc::fchmod(file.host_fd(), a.uint(1) & 0o7777)
    }))
}

fn chown_at(
    ctx: &mut SyscallCtx<'_>,
    dirfd: i64,
    ptr: u64,
    (uid, gid): (u32, u32),
    flags: i32,
) -> SysResult {
    if flags & !(libc::AT_SYMLINK_NOFOLLOW | libc::AT_EMPTY_PATH) != 0 {
        return Err(Errno::EINVAL);
    }
    let follow = flags & libc::AT_SYMLINK_NOFOLLOW == 0;
    let obj = lookup(ctx, dirfd, ptr, follow, flags & libc::AT_EMPTY_PATH != 0)?;
    let fd = attr_target(&obj, Errno::EPERM)?;
    let e = empty();
    // SAFETY: valid fd, empty path with AT_EMPTY_PATH (the object itself, a link included).
    check(i64::from(unsafe {
        libc::fchownat(fd, e.as_ptr(), uid, gid, libc::AT_EMPTY_PATH)
    }))
}

fn sys_chown(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    chown_at(ctx, AT_FDCWD, a.ptr(0), (a.uint(1), a.uint(2)), 0)
}

fn sys_lchown(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let nofollow = libc::AT_SYMLINK_NOFOLLOW;
    chown_at(ctx, AT_FDCWD, a.ptr(0), (a.uint(1), a.uint(2)), nofollow)
}

fn sys_fchownat(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    chown_at(ctx, a.fd(0), a.ptr(1), (a.uint(2), a.uint(3)), a.int(4))
}

fn sys_fchown(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let file = ctx.proc.fds.get(a.fd(0))?;
    if file.kind == FileKind::Generated {
        return Err(Errno::EPERM);
    }
    // SAFETY: fchown on a host fd we own.
    check(i64::from(unsafe {
        libc::fchown(file.host_fd(), a.uint(1), a.uint(2))
    }))
}

fn sys_utimensat(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let (dirfd, ptr, times_ptr, flags) = (a.fd(0), a.ptr(1), a.ptr(2), a.int(3));
    if flags & !(libc::AT_SYMLINK_NOFOLLOW | libc::AT_EMPTY_PATH) != 0 {
        return Err(Errno::EINVAL);
    }
    let mut times = [libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    }; 2];
    if times_ptr != 0 {
        let mut b = [0u8; 32];
        ctx.proc.mm.read(times_ptr, &mut b)?;
        for (i, t) in times.iter_mut().enumerate() {
            let w = |k: usize| {
                let s = i * 16 + k * 8;
                i64::from_le_bytes([
                    b[s],
                    b[s + 1],
                    b[s + 2],
                    b[s + 3],
                    b[s + 4],
                    b[s + 5],
                    b[s + 6],
                    b[s + 7],
                ])
            };
            t.tv_sec = w(0);
            t.tv_nsec = w(1);
        }
    }
    let tp = if times_ptr == 0 {
        std::ptr::null()
    } else {
        times.as_ptr()
    };
    if ptr == 0 && dirfd != AT_FDCWD {
        // futimens: the fd itself, and no flags allowed.
        if flags != 0 {
            return Err(Errno::EINVAL);
        }
        let file = ctx.proc.fds.get(dirfd)?;
        if file.kind == FileKind::Generated {
            return Ok(0);
        }
        // The raw syscall: glibc's wrapper refuses a NULL path.
        // SAFETY: valid fd, NULL path (the fd itself), times a local or NULL.
        return check(unsafe {
            libc::syscall(
                libc::SYS_utimensat,
                file.host_fd(),
                std::ptr::null::<libc::c_char>(),
                tp,
                0,
            )
        });
    }
    let follow = flags & libc::AT_SYMLINK_NOFOLLOW == 0;
    let obj = lookup(ctx, dirfd, ptr, follow, flags & libc::AT_EMPTY_PATH != 0)?;
    let Ok(host) = attr_target(&obj, Errno::EPERM) else {
        // /proc accepts new times and keeps none.
        return Ok(0);
    };
    let e = empty();
    // SAFETY: valid fd, empty path with AT_EMPTY_PATH, times a local or NULL.
    check(i64::from(unsafe {
        libc::utimensat(host, e.as_ptr(), tp, libc::AT_EMPTY_PATH)
    }))
}

fn sys_truncate(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let len = a.long(1);
    if len < 0 {
        return Err(Errno::EINVAL);
    }
    let obj = lookup(ctx, AT_FDCWD, a.ptr(0), true, false)?;
    let st = obj_stat(ctx, &obj)?;
    match st.st_mode & libc::S_IFMT {
        libc::S_IFDIR => return Err(Errno::EISDIR),
        libc::S_IFREG => {}
        _ => return Err(Errno::EINVAL),
    }
    let writable = match &obj {
        Obj::Host(fd) => {
            let p = host_fd_path(fd.as_raw_fd());
            let flags = libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOCTTY | libc::O_NONBLOCK;
            // SAFETY: reopens the object of an O_PATH fd we own; the result is checked.
            own(i64::from(unsafe { libc::open(p.as_ptr(), flags) }))?
        }
        Obj::File(f) if f.kind == FileKind::Host => reopen(ctx, f, libc::O_WRONLY, 0)?,
        _ => return Err(Errno::EACCES),
    };
    // SAFETY: ftruncate on a host fd we own.
    check(i64::from(unsafe {
        libc::ftruncate(writable.as_raw_fd(), len)
    }))
}

fn sys_ftruncate(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let host = ctx.proc.fds.host_fd(a.fd(0))?;
    if a.long(1) < 0 {
        return Err(Errno::EINVAL);
    }
    // SAFETY: ftruncate on a host fd we own.
    check(i64::from(unsafe { libc::ftruncate(host, a.long(1)) }))
}

fn sys_fsync(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let host = ctx.proc.fds.host_fd(a.fd(0))?;
    // SAFETY: fsync on a host fd we own.
    check(i64::from(unsafe { libc::fsync(host) }))
}

fn sys_fdatasync(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let host = ctx.proc.fds.host_fd(a.fd(0))?;
    // SAFETY: fdatasync on a host fd we own.
    check(i64::from(unsafe { libc::fdatasync(host) }))
}

fn sys_fallocate(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let host = ctx.proc.fds.host_fd(a.fd(0))?;
    // SAFETY: fallocate on a host fd we own, integer arguments.
    check(i64::from(unsafe {
        libc::fallocate(host, a.int(1), a.long(2), a.long(3))
    }))
}

fn sys_flock(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let file = ctx.proc.fds.get(a.fd(0))?;
    let host = file.host_fd();
    let op = a.int(1);
    // May wait for another holder: without the process lock, holding the file open.
    // SAFETY: flock on a host fd we hold open.
    check(i64::from(
        ctx.proc.unlocked(|| unsafe { libc::flock(host, op) }),
    ))
}

// ---------------------------------------------------------------------------------------
// The fd table: dup, fcntl, ioctl, pipes, eventfd, memfd.

fn sys_dup(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let file = ctx.proc.fds.get(a.fd(0))?;
    Ok(ctx.proc.fds.insert_from(0, file, false)? as u64)
}

/// dup2/dup3 once the arguments are validated.
fn dup_to(ctx: &mut SyscallCtx<'_>, old: i64, new: i64, cloexec: bool) -> SysResult {
    // The kernel takes newfd as unsigned: a negative one is beyond any limit.
    if new < 0 || new as u64 >= ctx.proc.fds.limit() {
        return Err(Errno::EBADF);
    }
    let file = ctx.proc.fds.get(old)?;
    // The replaced description (if any) is closed when `replaced` drops, after the swap.
    let replaced = ctx.proc.fds.insert_at(new, file, cloexec)?;
    if let Some(old) = &replaced {
        ctx.proc.fds.forget_file(&old.file);
    }
    Ok(new as u64)
}

fn sys_dup2(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let (old, new) = (a.fd(0), a.fd(1));
    if old == new {
        ctx.proc.fds.slot(old)?;
        return Ok(new as u64);
    }
    dup_to(ctx, old, new, false)
}

fn sys_dup3(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let (old, new, flags) = (a.fd(0), a.fd(1), a.int(2));
    if flags & !libc::O_CLOEXEC != 0 || old == new {
        return Err(Errno::EINVAL);
    }
    dup_to(ctx, old, new, flags & libc::O_CLOEXEC != 0)
}

/// Pass a `struct flock` command to the host.
fn fcntl_lock(ctx: &mut SyscallCtx<'_>, host: RawFd, cmd: i32, ptr: u64) -> SysResult {
    const FLOCK_SIZE: usize = std::mem::size_of::<libc::flock>();
    let mut raw = [0u8; FLOCK_SIZE];
    ctx.proc.mm.read(ptr, &mut raw)?;
    // SAFETY: struct flock is plain data; the guest's bytes are its x86-64 layout, the
    // same as the host's.
    let mut fl: libc::flock = unsafe { std::ptr::read_unaligned(raw.as_ptr().cast()) };
    // F_SETLKW may wait for another holder: without the process lock (the caller holds the
    // open file).
    // SAFETY: fcntl lock command on a host fd held open, pointer to a local struct flock.
    let r = check(i64::from(
        ctx.proc
            .unlocked(|| unsafe { libc::fcntl(host, cmd, &mut fl) }),
    ))?;
    if matches!(cmd, libc::F_GETLK | libc::F_OFD_GETLK) {
        // SAFETY: libc::flock is plain data.
        ctx.proc.mm.write(ptr, unsafe { bytes_of(&fl) })?;
    }
    Ok(r)
}

fn sys_fcntl(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let fd = a.fd(0);
    let file = ctx.proc.fds.get(fd)?;
    let host = file.host_fd();
    let cmd = a.int(1);
    match cmd {
        libc::F_DUPFD | libc::F_DUPFD_CLOEXEC => {
            // The kernel reads the minimum as unsigned: a negative one is over the limit.
            let min = u64::from(a.uint(2));
            let n = ctx
                .proc
                .fds
                .insert_from(min, file, cmd == libc::F_DUPFD_CLOEXEC)?;
            Ok(n as u64)
        }
        libc::F_GETFD => Ok(u64::from(ctx.proc.fds.slot(fd)?.cloexec)),
        libc::F_SETFD => {
            ctx.proc
                .fds
                .set_cloexec(fd, a.int(2) & libc::FD_CLOEXEC != 0)?;
            Ok(0)
        }
        libc::F_GETFL => {
            // SAFETY: F_GETFL on a host fd we own.
            check(i64::from(unsafe { libc::fcntl(host, libc::F_GETFL) }))
        }
        libc::F_SETFL => {
            // Signal-driven I/O would signal the VMM: O_ASYNC is not passed on.
            let flags = a.int(2) & !libc::O_ASYNC;
            // SAFETY: F_SETFL on a host fd we own with an integer argument.
            check(i64::from(unsafe {
                libc::fcntl(host, libc::F_SETFL, flags)
            }))
        }
        libc::F_GETLK
        | libc::F_SETLK
        | libc::F_SETLKW
        | libc::F_OFD_GETLK
        | libc::F_OFD_SETLK
        | libc::F_OFD_SETLKW => fcntl_lock(ctx, host, cmd, a.ptr(2)),
        libc::F_GETPIPE_SZ | libc::F_SETPIPE_SZ | libc::F_ADD_SEALS | libc::F_GET_SEALS => {
            // SAFETY: integer-argument fcntl on a host fd we own.
            check(i64::from(unsafe { libc::fcntl(host, cmd, a.int(2)) }))
        }
        _ => Err(Errno::EINVAL),
    }
}

/// An ioctl whose argument is `size` bytes the host fills.
fn ioctl_out(ctx: &mut SyscallCtx<'_>, host: RawFd, req: u64, ptr: u64, size: usize) -> SysResult {
    let mut buf = vec![0u8; size];
    // SAFETY: the request writes at most `size` bytes (checked per request by the caller)
    // into our own buffer.
    let r = check(i64::from(unsafe {
        libc::ioctl(host, req, buf.as_mut_ptr())
    }))?;
    ctx.proc.mm.write(ptr, &buf)?;
    Ok(r)
}

fn sys_ioctl(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let fd = a.fd(0);
    let host = ctx.proc.fds.host_fd(fd)?;
    // The kernel takes the request as unsigned int.
    let req = u64::from(a.uint(1));
    let arg = a.ptr(2);
    match req {
        libc::FIOCLEX => {
            ctx.proc.fds.set_cloexec(fd, true)?;
            Ok(0)
        }
        libc::FIONCLEX => {
            ctx.proc.fds.set_cloexec(fd, false)?;
            Ok(0)
        }
        libc::FIONBIO => {
            let mut b = [0u8; 4];
            ctx.proc.mm.read(arg, &mut b)?;
            let mut on = i32::from_le_bytes(b);
            // SAFETY: FIONBIO reads an int from a local.
            check(i64::from(unsafe {
                libc::ioctl(host, libc::FIONBIO, &mut on)
            }))
        }
        libc::FIONREAD => {
            // Replayed input waits in the journal, ahead of the host's.
            let queued = journal::replay_len(&*ctx.proc.fds.get(fd)?);
            if queued == 0 {
                return ioctl_out(ctx, host, libc::FIONREAD, arg, 4);
            }
            let mut n: libc::c_int = 0;
            // SAFETY: FIONREAD writes one int to a local.
            check(i64::from(unsafe {
                libc::ioctl(host, libc::FIONREAD, &mut n)
            }))?;
            let total = i64::from(n)
                .saturating_add(queued as i64)
                .min(i64::from(i32::MAX)) as i32;
            ctx.proc.mm.write(arg, &total.to_le_bytes())?;
            Ok(0)
        }
        libc::TCGETS => ioctl_out(ctx, host, libc::TCGETS, arg, TERMIOS_SIZE),
        libc::TIOCGWINSZ => ioctl_out(ctx, host, libc::TIOCGWINSZ, arg, 8),
        libc::TIOCGPGRP => ioctl_out(ctx, host, libc::TIOCGPGRP, arg, 4),
        // Read-only socket queries (if_nametoindex, SIOCGIFCONF, queue sizes).
        _ => crate::syscalls::net::socket_ioctl(ctx, host, req, arg).unwrap_or(Err(Errno::ENOTTY)),
    }
}

fn do_pipe(ctx: &mut SyscallCtx<'_>, ptr: u64, flags: i32) -> SysResult {
    let allowed = libc::O_CLOEXEC | libc::O_NONBLOCK | libc::O_DIRECT | libc::O_EXCL;
    if flags & !allowed != 0 {
        return Err(Errno::EINVAL);
    }
    ctx.proc.mm.check_range(ptr, 8, true)?;
    let mut raw = [0 as RawFd; 2];
    // SAFETY: pipe2 fills a local array of two ints.
    check(i64::from(unsafe {
        libc::pipe2(
            raw.as_mut_ptr(),
            (flags & !libc::O_CLOEXEC) | libc::O_CLOEXEC,
        )
    }))?;
    // SAFETY: the kernel just returned these fds; nothing else owns them.
    let (r, w) = unsafe { (OwnedFd::from_raw_fd(raw[0]), OwnedFd::from_raw_fd(raw[1])) };
    let cloexec = flags & libc::O_CLOEXEC != 0;
    let gr = ctx
        .proc
        .fds
        .insert(OpenFile::new(r, FileKind::Host, None), cloexec)?;
    let gw = match ctx
        .proc
        .fds
        .insert(OpenFile::new(w, FileKind::Host, None), cloexec)
    {
        Ok(n) => n,
        Err(e) => {
            ctx.proc.fds.remove(i64::from(gr)).ok();
            return Err(e);
        }
    };
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&gr.to_le_bytes());
    out[4..].copy_from_slice(&gw.to_le_bytes());
    if let Err(e) = ctx.proc.mm.write(ptr, &out) {
        ctx.proc.fds.remove(i64::from(gr)).ok();
        ctx.proc.fds.remove(i64::from(gw)).ok();
        return Err(e);
    }
    Ok(0)
}

fn sys_pipe(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    do_pipe(ctx, a.ptr(0), 0)
}

fn sys_pipe2(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    do_pipe(ctx, a.ptr(0), a.int(1))
}

fn do_eventfd(ctx: &mut SyscallCtx<'_>, initval: u32, flags: i32) -> SysResult {
    if flags & !(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK | libc::EFD_SEMAPHORE) != 0 {
        return Err(Errno::EINVAL);
    }
    // SAFETY: eventfd with integer arguments; the result is checked.
    let fd = own(i64::from(unsafe {
        libc::eventfd(initval, flags | libc::EFD_CLOEXEC)
    }))?;
    install(
        ctx,
        fd,
        FileKind::Host,
        None,
        flags & libc::EFD_CLOEXEC != 0,
    )
}

fn sys_eventfd(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    do_eventfd(ctx, a.uint(0), 0)
}

fn sys_eventfd2(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    do_eventfd(ctx, a.uint(0), a.int(1))
}

fn sys_memfd_create(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    // Linux: at most 249 bytes (NAME_MAX less "memfd:"), else EINVAL.
    let name = ctx.proc.mm.read_cstring(a.ptr(0), 249).map_err(|e| {
        if e == Errno::ENAMETOOLONG {
            Errno::EINVAL
        } else {
            e
        }
    })?;
    let flags = a.uint(1);
    let cname = CString::new(name.clone()).map_err(|_| Errno::EINVAL)?;
    // SAFETY: valid NUL-terminated name; the host validates the flags.
    let fd = own(i64::from(unsafe {
        libc::memfd_create(cname.as_ptr(), flags | libc::MFD_CLOEXEC)
    }))?;
    let path = format!("/memfd:{} (deleted)", String::from_utf8_lossy(&name));
    install(
        ctx,
        fd,
        FileKind::Host,
        Some(path),
        flags & libc::MFD_CLOEXEC != 0,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn open_flags_follow_the_kernel() {
        // Unknown bits and O_ASYNC are dropped; O_LARGEFILE is forced as on x86-64.
        let f = open_flags(libc::O_RDWR | libc::O_CREAT | 0x4000_0000 | libc::O_ASYNC);
        assert_eq!(f, libc::O_RDWR | libc::O_CREAT | O_LARGEFILE);
        // O_PATH keeps only what O_PATH allows.
        let p = open_flags(libc::O_PATH | libc::O_RDWR | libc::O_TRUNC | libc::O_NOFOLLOW);
        assert_eq!(p, libc::O_PATH | libc::O_NOFOLLOW);
        assert!(creates(libc::O_TMPFILE | libc::O_RDWR));
        assert!(!creates(libc::O_DIRECTORY));
        assert!(creates(libc::O_CREAT));
    }

    #[test]
    fn statx_carries_the_stat_fields() {
        // SAFETY: stat is plain data.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        st.st_mode = libc::S_IFREG | 0o644;
        st.st_size = 12345;
        st.st_ino = 77;
        st.st_dev = 0x0801; // 8:1
        st.st_rdev = (0x123 << 8) | 0x45 | (0x6_7800 << 12);
        st.st_mtime = 1_700_000_000;
        st.st_mtime_nsec = 5;
        let sx = statx_from_stat(&st);
        assert_eq!(sx.stx_mode, (libc::S_IFREG | 0o644) as u16);
        assert_eq!(sx.stx_size, 12345);
        assert_eq!(sx.stx_ino, 77);
        assert_eq!((sx.stx_dev_major, sx.stx_dev_minor), (8, 1));
        assert_eq!(
            (sx.stx_rdev_major, sx.stx_rdev_minor),
            (libc::major(st.st_rdev), libc::minor(st.st_rdev))
        );
        assert_eq!(sx.stx_mtime.tv_sec, 1_700_000_000);
        assert_eq!(sx.stx_mtime.tv_nsec, 5);
    }

    #[test]
    fn only_whole_dirent_records_are_returned() {
        let d = procfs::dirents("/proc/1/fd", &[("0".into(), libc::DT_LNK)]);
        assert_eq!(whole_records(&d), d.len());
        assert_eq!(whole_records(&d[..d.len() - 1]), d.len() - 24);
        assert_eq!(whole_records(&d[..10]), 0);
        // A corrupt zero length must not loop forever.
        let mut bad = d.clone();
        bad[16] = 0;
        bad[17] = 0;
        assert_eq!(whole_records(&bad), 0);
    }

    #[test]
    fn table_names_match_the_abi() {
        for def in SYSCALLS {
            assert_eq!(
                super::super::names::name(def.nr),
                Some(def.name),
                "syscall {}",
                def.nr
            );
        }
    }
}
