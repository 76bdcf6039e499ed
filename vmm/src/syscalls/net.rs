//! Sockets, as host sockets the VMM owns.
//!
//! - AF_INET/AF_INET6 are real host sockets: a guest server on 127.0.0.1:8080 is reachable
//!   from the host. SOCK_RAW is refused (EPERM, what an unprivileged process gets).
//! - AF_UNIX file-system names are confined to the sandbox root: `bind` creates the node in
//!   a directory resolved inside the root (host path `/proc/self/fd/<dir>/<name>`), and
//!   `connect`/`sendto` reach a node opened inside the root (`/proc/self/fd/<node>`), so
//!   symlinks cannot lead out. Abstract names would reach host services: EACCES.
//! - AF_NETLINK is NETLINK_ROUTE only, opened with no capabilities so it can only read.
//!
//! Data moves zero-copy between guest memory and the host socket; fds in SCM_RIGHTS are
//! translated both ways. The host is always called with MSG_NOSIGNAL; SIGPIPE is raised for
//! the guest as Linux would. Sends, receives, accepts and shutdowns go through the
//! rescue-window journal first (`crate::journal`): output held while a window is live,
//! input replayed and connections accepted again after a rollback.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};

use super::time::read_timespec;
use super::{Args, Support, SysResult, SyscallCtx, SyscallDef};
use crate::errno::{check, Errno};
use crate::fd::{FileKind, OpenFile};
use crate::journal;
use crate::syscall_table;

/// This family's syscalls.
pub const SYSCALLS: &[SyscallDef] = syscall_table![
    41 socket => Support::Partial(sys_socket, "AF_INET and AF_INET6 (no SOCK_RAW), AF_UNIX, AF_NETLINK with NETLINK_ROUTE (read-only); other domains EAFNOSUPPORT"),
    42 connect => Support::Partial(sys_connect, "AF_UNIX paths resolve inside the root; abstract names are EACCES"),
    43 accept => Support::Full(sys_accept),
    44 sendto => Support::Partial(sys_sendto, "AF_UNIX destinations as connect"),
    45 recvfrom => Support::Full(sys_recvfrom),
    46 sendmsg => Support::Partial(sys_sendmsg, "Control data at most 64 KiB (else ENOBUFS); AF_UNIX destinations as connect"),
    47 recvmsg => Support::Partial(sys_recvmsg, "Control data at most 64 KiB (longer buffers are used in part)"),
    48 shutdown => Support::Full(sys_shutdown),
    49 bind => Support::Partial(sys_bind, "AF_UNIX paths are created inside the root; abstract names are EACCES (autobind works)"),
    50 listen => Support::Full(sys_listen),
    51 getsockname => Support::Partial(sys_getsockname, "AF_UNIX names outside the root read as unnamed"),
    52 getpeername => Support::Partial(sys_getpeername, "AF_UNIX names outside the root read as unnamed"),
    53 socketpair => Support::Full(sys_socketpair),
    54 setsockopt => Support::Partial(sys_setsockopt, "Values longer than 4 KiB are cut; BPF filters, device binding, SO_MARK, *BUFFORCE, IP(V6)_TRANSPARENT and netfilter control are EPERM; pidfd options ENOPROTOOPT"),
    55 getsockopt => Support::Partial(sys_getsockopt, "Values up to 4 KiB; TCP_ZEROCOPY_RECEIVE is EOPNOTSUPP; SO_PEERPIDFD ENOPROTOOPT"),
    288 accept4 => Support::Full(sys_accept4),
    299 recvmmsg => Support::Full(sys_recvmmsg),
    307 sendmmsg => Support::Full(sys_sendmmsg),
];

/// sizeof(struct sockaddr_storage): the longest address the kernel takes.
const SOCKADDR_MAX: usize = 128;
/// offsetof(struct sockaddr_un, sun_path).
const SUN_PATH_OFFSET: usize = 2;
/// sizeof(sun_path).
const SUN_PATH_MAX: usize = 108;
/// sizeof(struct sockaddr_un).
const SOCKADDR_UN_SIZE: usize = SUN_PATH_OFFSET + SUN_PATH_MAX;
/// sizeof(struct msghdr) on x86-64.
const MSGHDR_SIZE: u64 = 56;
/// sizeof(struct mmsghdr): a msghdr, `unsigned msg_len`, padding.
const MMSGHDR_SIZE: u64 = 64;
/// sizeof(struct cmsghdr): size_t len, int level, int type.
const CMSG_HDR: usize = 16;
/// Most control data a message carries (Linux bounds it by optmem_max, ENOBUFS).
const MAX_CONTROL: usize = 64 << 10;
/// Most bytes of a socket option value copied in or out.
const MAX_OPTLEN: usize = 4096;
/// Linux's UIO_MAXIOV, also the most messages one sendmmsg/recvmmsg handles.
const UIO_MAXIOV: u64 = 1024;
const SOCK_TYPE_MASK: i32 = 0xf;

// Socket options (x86-64 values) that the libc crate does not all define.
const SO_SNDBUFFORCE: i32 = 32;
const SO_RCVBUFFORCE: i32 = 33;
const SO_BINDTODEVICE: i32 = 25;
const SO_ATTACH_FILTER: i32 = 26;
const SO_MARK: i32 = 36;
const SO_ATTACH_BPF: i32 = 50;
const SO_ATTACH_REUSEPORT_CBPF: i32 = 51;
const SO_ATTACH_REUSEPORT_EBPF: i32 = 52;
const SO_BINDTOIFINDEX: i32 = 62;
const SO_PASSPIDFD: i32 = 76;
const SO_PEERPIDFD: i32 = 77;
const IP_TRANSPARENT: i32 = 19;
const IPV6_TRANSPARENT: i32 = 75;
const TCP_ZEROCOPY_RECEIVE: i32 = 35;

// ---------------------------------------------------------------------------------------
// Addresses

/// Length of an address the guest passes in (bind, connect, sendto): Linux's
/// move_addr_to_kernel refuses negative and oversized lengths.
fn addr_in_len(len: i32) -> Result<usize, Errno> {
    usize::try_from(len)
        .ok()
        .filter(|&l| l <= SOCKADDR_MAX)
        .ok_or(Errno::EINVAL)
}

/// For an address of `full` bytes given back to a guest buffer of `guest_len` bytes: how
/// many bytes to copy, and the length to store in `*addrlen` (the full one: a caller sees
/// truncation by comparing), as move_addr_to_user.
fn addr_out_len(guest_len: u32, full: usize) -> Result<(usize, u32), Errno> {
    let g = usize::try_from(guest_len as i32).map_err(|_| Errno::EINVAL)?;
    Ok((g.min(full), full as u32))
}

/// What an AF_UNIX address names.
#[derive(Debug, PartialEq, Eq)]
enum UnixName<'a> {
    /// No name: autobind for bind, EINVAL for connect.
    Unnamed,
    /// The abstract namespace (`sun_path[0] == 0`).
    Abstract,
    /// A file-system path (up to the first NUL).
    Path(&'a [u8]),
}

/// Classify an AF_UNIX sockaddr (family included).
fn unix_name(addr: &[u8]) -> UnixName<'_> {
    let path = addr.get(SUN_PATH_OFFSET..).unwrap_or_default();
    match path.first() {
        None => UnixName::Unnamed,
        Some(0) => UnixName::Abstract,
        Some(_) => {
            let end = path.iter().position(|&b| b == 0).unwrap_or(path.len());
            UnixName::Path(&path[..end])
        }
    }
}

fn family_of(addr: &[u8]) -> Option<i32> {
    let f = addr.get(..2)?;
    Some(i32::from(u16::from_le_bytes([f[0], f[1]])))
}

/// An AF_UNIX sockaddr for `path`: NUL-terminated when it fits, as Linux reports names.
fn unix_sockaddr(path: &[u8]) -> Result<Vec<u8>, Errno> {
    if path.len() > SUN_PATH_MAX {
        return Err(Errno::ENAMETOOLONG);
    }
    let mut v = (libc::AF_UNIX as u16).to_le_bytes().to_vec();
    v.extend_from_slice(path);
    if path.len() < SUN_PATH_MAX {
        v.push(0);
    }
    Ok(v)
}

/// The guest's view of an address the host returned. AF_UNIX paths are the guest's own
/// names (`lookup`: sockets bound through this module), paths under the root (`root`, a
/// host path), or else unnamed: a host path never reaches the guest.
fn guest_unix_addr(host: &[u8], root: &[u8], lookup: impl Fn(&[u8]) -> Option<Vec<u8>>) -> Vec<u8> {
    if family_of(host) != Some(libc::AF_UNIX) {
        return host.to_vec();
    }
    let UnixName::Path(path) = unix_name(host) else {
        return host.to_vec();
    };
    if let Some(g) = lookup(path) {
        return g;
    }
    let root = root.strip_suffix(b"/").unwrap_or(root);
    if let Some(rest) = path.strip_prefix(root).filter(|r| r.starts_with(b"/")) {
        if let Ok(v) = unix_sockaddr(rest) {
            return v;
        }
    }
    host[..SUN_PATH_OFFSET].to_vec()
}

/// AF_UNIX sockets bound to a path through `bind`: the host name (which names a directory
/// fd kept open here, so the name is unique while the socket lives) and the guest's name.
struct Bound {
    /// The socket's open file. A `Weak` keeps the allocation, so no other file can have
    /// the same address while this entry exists.
    file: Weak<OpenFile>,
    host: Vec<u8>,
    guest: Vec<u8>,
    _dir: OwnedFd,
}

static BOUND: Mutex<Vec<Bound>> = Mutex::new(Vec::new());

/// The bound-name table, without entries of closed sockets.
fn bound_names() -> MutexGuard<'static, Vec<Bound>> {
    let mut t = BOUND.lock().unwrap_or_else(PoisonError::into_inner);
    t.retain(|b| b.file.strong_count() > 0);
    t
}

/// The guest's view of a host address.
fn to_guest_addr(ctx: &SyscallCtx<'_>, host: &[u8]) -> Vec<u8> {
    if family_of(host) != Some(libc::AF_UNIX) {
        return host.to_vec();
    }
    let root = ctx.proc.fs.root_host_path().as_os_str().as_encoded_bytes();
    guest_unix_addr(host, root, |p| {
        bound_names()
            .iter()
            .find(|b| b.host == p)
            .map(|b| b.guest.clone())
    })
}

/// What a guest address is used for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum AddrUse {
    /// A name to create (bind).
    Bind,
    /// A name to reach (connect, sendto, sendmsg).
    Reach,
}

/// An address ready for the host.
struct HostAddr {
    bytes: Vec<u8>,
    /// An fd the host path names; it must stay open until the call is made.
    keep: Option<OwnedFd>,
    /// For bind of a path: (host path, guest sockaddr) to remember.
    names: Option<(Vec<u8>, Vec<u8>)>,
}

impl HostAddr {
    fn plain(bytes: Vec<u8>) -> HostAddr {
        HostAddr {
            bytes,
            keep: None,
            names: None,
        }
    }
    fn ptr(&self) -> *const libc::sockaddr {
        if self.bytes.is_empty() {
            std::ptr::null()
        } else {
            self.bytes.as_ptr().cast()
        }
    }
    fn len(&self) -> libc::socklen_t {
        self.bytes.len() as libc::socklen_t
    }
}

/// Read a guest sockaddr of `len` bytes (already bounded).
/// Which way a `--port GUEST=HOST` remap is applied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortDirection {
    /// bind(): the guest's port becomes the host's.
    GuestToHost,
    /// getsockname(): the host's port reads as the guest's.
    HostToGuest,
}

/// Apply the sandbox's port remaps to an AF_INET/AF_INET6 address in place.
fn remap_port(addr: &mut [u8], map: &[(u16, u16)], dir: PortDirection) {
    if addr.len() < 4 || map.is_empty() {
        return;
    }
    let family = i32::from(u16::from_ne_bytes([addr[0], addr[1]]));
    if family != libc::AF_INET && family != libc::AF_INET6 {
        return;
    }
    let port = u16::from_be_bytes([addr[2], addr[3]]);
    let mapped = map.iter().find_map(|&(guest, host)| match dir {
        PortDirection::GuestToHost if guest == port => Some(host),
        PortDirection::HostToGuest if host == port => Some(guest),
        _ => None,
    });
    if let Some(p) = mapped {
        addr[2..4].copy_from_slice(&p.to_be_bytes());
    }
}

fn read_addr(ctx: &mut SyscallCtx<'_>, ptr: u64, len: usize) -> Result<Vec<u8>, Errno> {
    if len == 0 {
        return Ok(Vec::new());
    }
    ctx.proc.mm.read_vec(ptr, len)
}

/// Translate a guest address for the host; only AF_UNIX paths change.
fn to_host_addr(ctx: &mut SyscallCtx<'_>, raw: Vec<u8>, how: AddrUse) -> Result<HostAddr, Errno> {
    if family_of(&raw) != Some(libc::AF_UNIX) {
        return Ok(HostAddr::plain(raw));
    }
    if raw.len() > SOCKADDR_UN_SIZE {
        return Err(Errno::EINVAL);
    }
    let path = match unix_name(&raw) {
        // Autobind picks an abstract name for the guest's own socket: harmless.
        UnixName::Unnamed => return Ok(HostAddr::plain(raw)),
        // The abstract namespace is the host's: it would reach host services.
        UnixName::Abstract => return Err(Errno::EACCES),
        UnixName::Path(p) => p.to_vec(),
    };
    let abs = ctx.proc.fs.absolute(None, &path)?;
    match how {
        AddrUse::Bind => {
            // The directory is resolved inside the root; the host creates the last
            // component in it without following anything.
            let (dir, name) = ctx.proc.fs.open_parent(&abs)?;
            let name = name.as_bytes();
            if name == b"." || name == b".." {
                return Err(Errno::EADDRINUSE);
            }
            let mut host = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
            host.extend_from_slice(name);
            let bytes = unix_sockaddr(&host)?;
            Ok(HostAddr {
                bytes,
                keep: Some(dir),
                names: Some((host, unix_sockaddr(&path)?)),
            })
        }
        AddrUse::Reach => {
            // The node itself is opened inside the root (symlinks included); the host
            // connects through the fd's /proc link.
            let node = ctx.proc.fs.open(&abs, libc::O_PATH, 0)?;
            let host = format!("/proc/self/fd/{}", node.as_raw_fd()).into_bytes();
            Ok(HostAddr {
                bytes: unix_sockaddr(&host)?,
                keep: Some(node),
                names: None,
            })
        }
    }
}

/// Read `*addrlen` (socklen_t) for an address to be returned; EINVAL if negative as int.
fn read_socklen(ctx: &mut SyscallCtx<'_>, ptr: u64) -> Result<u32, Errno> {
    let mut b = [0u8; 4];
    ctx.proc.mm.read(ptr, &mut b)?;
    let len = u32::from_le_bytes(b);
    if (len as i32) < 0 {
        return Err(Errno::EINVAL);
    }
    Ok(len)
}

/// Give an address the host returned to the guest: at most `guest_len` bytes at `addr`,
/// the full length at `len_ptr`.
fn write_addr(
    ctx: &mut SyscallCtx<'_>,
    addr: u64,
    len_ptr: u64,
    guest_len: u32,
    host: &[u8],
) -> Result<(), Errno> {
    let guest = to_guest_addr(ctx, host);
    let (copy, full) = addr_out_len(guest_len, guest.len())?;
    if copy > 0 {
        ctx.proc.mm.write(addr, &guest[..copy])?;
    }
    ctx.proc.mm.write(len_ptr, &full.to_le_bytes())
}

/// An empty host sockaddr buffer.
fn storage() -> ([u8; SOCKADDR_MAX], libc::socklen_t) {
    ([0u8; SOCKADDR_MAX], SOCKADDR_MAX as libc::socklen_t)
}

/// Run a syscall on the socket `a.fd(0)`. Linux looks the socket up before it checks
/// any other argument, so a guest fd that is not a socket is ENOTSOCK whatever else is
/// wrong; `op` validates arguments first (cheaper), and this fixes the error up.
fn on_socket(
    ctx: &mut SyscallCtx<'_>,
    a: &Args,
    op: impl FnOnce(&mut SyscallCtx<'_>, RawFd) -> SysResult,
) -> SysResult {
    on_socket_file(ctx, a, |ctx, file| op(ctx, file.host_fd()))
}

/// [`on_socket`], giving the open file (the journal keys on it).
fn on_socket_file(
    ctx: &mut SyscallCtx<'_>,
    a: &Args,
    op: impl FnOnce(&mut SyscallCtx<'_>, &Arc<OpenFile>) -> SysResult,
) -> SysResult {
    // Holding the open file keeps the host fd from being closed and reused while a
    // blocking call runs without the process lock.
    let file = ctx.proc.fds.get(a.fd(0))?;
    let host = file.host_fd();
    match op(ctx, &file) {
        Err(e) if is_argument_error(e) && !is_socket(host) => Err(Errno::ENOTSOCK),
        r => r,
    }
}

/// Errors our own argument checks give before the host sees the call (the host itself
/// answers ENOTSOCK); hot errors such as EAGAIN never cost the extra check.
fn is_argument_error(e: Errno) -> bool {
    [
        Errno::EFAULT,
        Errno::EINVAL,
        Errno::EACCES,
        Errno::ENOENT,
        Errno::ENOTDIR,
        Errno::ELOOP,
        Errno::ENAMETOOLONG,
        Errno::EMSGSIZE,
        Errno::ENOBUFS,
        Errno::EPERM,
        Errno::EADDRINUSE,
        Errno::ENOPROTOOPT,
        Errno::EOPNOTSUPP,
        Errno::EBADF,
    ]
    .contains(&e)
}

fn is_socket(host: RawFd) -> bool {
    // SAFETY: fstat of a host fd we own into a local buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    let ok = unsafe { libc::fstat(host, &mut st) } == 0;
    ok && st.st_mode & libc::S_IFMT == libc::S_IFSOCK
}

// ---------------------------------------------------------------------------------------
// Creating sockets

/// Install a new host fd as a guest fd.
fn install(ctx: &mut SyscallCtx<'_>, host: OwnedFd, cloexec: bool) -> Result<i32, Errno> {
    ctx.proc
        .fds
        .insert(OpenFile::new(host, FileKind::Host, None), cloexec)
}

fn own_fd(ret: i64) -> Result<OwnedFd, Errno> {
    let fd = check(ret)?;
    // SAFETY: the kernel just returned this new fd; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn host_socket(domain: i32, ty: i32, proto: i32) -> Result<OwnedFd, Errno> {
    // SAFETY: plain syscall; the result is checked.
    own_fd(i64::from(unsafe { libc::socket(domain, ty, proto) }))
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
const CAP_NET_ADMIN: u32 = 12;

/// This thread's capabilities.
fn capabilities() -> Option<[CapData; 2]> {
    let mut hdr = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: a version-3 header and the two data words it describes, both locals.
    let r = unsafe { libc::syscall(libc::SYS_capget, &mut hdr, data.as_mut_ptr()) };
    (r == 0).then_some(data)
}

/// A NETLINK_ROUTE socket that cannot change host networking. The kernel checks
/// CAP_NET_ADMIN against the credentials the socket was opened with (as well as the
/// sender's), so when the VMM has it, the socket is opened by a short-lived thread that has
/// dropped its effective capabilities (capset changes only the calling thread).
fn netlink_socket(ty: i32, proto: i32) -> Result<OwnedFd, Errno> {
    let privileged = capabilities().is_none_or(|c| c[0].effective & (1 << CAP_NET_ADMIN) != 0);
    if !privileged {
        return host_socket(libc::AF_NETLINK, ty, proto);
    }
    let opener = std::thread::spawn(move || {
        let mut data = capabilities().ok_or(Errno::EPERM)?;
        for d in &mut data {
            d.effective = 0;
        }
        let mut hdr = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        // SAFETY: a version-3 header and two data words, locals; lowering the effective
        // set is always allowed and affects only this thread, which exits next.
        if unsafe { libc::syscall(libc::SYS_capset, &mut hdr, data.as_ptr()) } != 0 {
            return Err(Errno::last());
        }
        host_socket(libc::AF_NETLINK, ty, proto)
    });
    opener.join().map_err(|_| Errno::ENOMEM)?
}

fn sys_socket(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let (domain, ty, proto) = (a.int(0), a.int(1), a.int(2));
    let flags = ty & (libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC);
    let kind = ty & !flags;
    if kind & !SOCK_TYPE_MASK != 0 {
        return Err(Errno::EINVAL);
    }
    // The host fd is always close-on-exec; the guest's bit lives in its fd table.
    let host_ty = kind | (flags & libc::SOCK_NONBLOCK) | libc::SOCK_CLOEXEC;
    let host = match domain {
        libc::AF_INET | libc::AF_INET6 => {
            if kind == libc::SOCK_RAW {
                return Err(Errno::EPERM);
            }
            host_socket(domain, host_ty, proto)?
        }
        libc::AF_UNIX => host_socket(domain, host_ty, proto)?,
        libc::AF_NETLINK => {
            if proto != libc::NETLINK_ROUTE {
                return Err(Errno::EPROTONOSUPPORT);
            }
            netlink_socket(host_ty, proto)?
        }
        _ => return Err(Errno::EAFNOSUPPORT),
    };
    Ok(install(ctx, host, flags & libc::SOCK_CLOEXEC != 0)? as u64)
}

fn sys_socketpair(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let (domain, ty, proto, sv) = (a.int(0), a.int(1), a.int(2), a.ptr(3));
    let flags = ty & (libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC);
    let kind = ty & !flags;
    if kind & !SOCK_TYPE_MASK != 0 {
        return Err(Errno::EINVAL);
    }
    match domain {
        libc::AF_UNIX => {}
        libc::AF_INET | libc::AF_INET6 | libc::AF_NETLINK => return Err(Errno::EOPNOTSUPP),
        _ => return Err(Errno::EAFNOSUPPORT),
    }
    let host_ty = kind | (flags & libc::SOCK_NONBLOCK) | libc::SOCK_CLOEXEC;
    let mut pair = [0 as RawFd; 2];
    // SAFETY: `pair` is a local array of two ints.
    check(i64::from(unsafe {
        libc::socketpair(domain, host_ty, proto, pair.as_mut_ptr())
    }))?;
    // SAFETY: the kernel just created both fds; nothing else owns them.
    let (h0, h1) = unsafe { (OwnedFd::from_raw_fd(pair[0]), OwnedFd::from_raw_fd(pair[1])) };
    let cloexec = flags & libc::SOCK_CLOEXEC != 0;
    let g0 = install(ctx, h0, cloexec)?;
    let g1 = match install(ctx, h1, cloexec) {
        Ok(g) => g,
        Err(e) => {
            ctx.proc.fds.remove(i64::from(g0)).ok();
            return Err(e);
        }
    };
    let mut out = [0u8; 8];
    out[..4].copy_from_slice(&g0.to_le_bytes());
    out[4..].copy_from_slice(&g1.to_le_bytes());
    if let Err(e) = ctx.proc.mm.write(sv, &out) {
        ctx.proc.fds.remove(i64::from(g0)).ok();
        ctx.proc.fds.remove(i64::from(g1)).ok();
        return Err(e);
    }
    Ok(0)
}

// ---------------------------------------------------------------------------------------
// Names and connections

fn sys_bind(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    on_socket(ctx, a, |ctx, _| {
        let file = ctx.proc.fds.get(a.fd(0))?;
        let len = addr_in_len(a.int(2))?;
        let mut raw = read_addr(ctx, a.ptr(1), len)?;
        remap_port(&mut raw, ctx.port_map, PortDirection::GuestToHost);
        let target = to_host_addr(ctx, raw, AddrUse::Bind)?;
        // SAFETY: `target` holds a sockaddr of the given length (or null and 0).
        check(i64::from(unsafe {
            libc::bind(file.host_fd(), target.ptr(), target.len())
        }))?;
        if let (Some((host, guest)), Some(dir)) = (target.names, target.keep) {
            bound_names().push(Bound {
                file: Arc::downgrade(&file),
                host,
                guest,
                _dir: dir,
            });
        }
        Ok(0)
    })
}

fn sys_connect(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    on_socket(ctx, a, |ctx, host| {
        let len = addr_in_len(a.int(2))?;
        let raw = read_addr(ctx, a.ptr(1), len)?;
        let target = to_host_addr(ctx, raw, AddrUse::Reach)?;
        // May block until the peer answers: without the process lock.
        // SAFETY: `target` holds a sockaddr of the given length (or null and 0).
        check(i64::from(ctx.proc.unlocked(|| unsafe {
            libc::connect(host, target.ptr(), target.len())
        })))
    })
}

fn sys_listen(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let host = ctx.proc.fds.host_fd(a.fd(0))?;
    // SAFETY: plain syscall on our fd.
    check(i64::from(unsafe { libc::listen(host, a.int(1)) }))
}

fn sys_shutdown(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let file = ctx.proc.fds.get(a.fd(0))?;
    let how = a.int(1);
    // Behind held output, and held itself while a window is live: a FIN must not overtake
    // the data, nor be sent for a history a rollback undoes.
    if (libc::SHUT_RD..=libc::SHUT_RDWR).contains(&how) {
        if let Some(r) = journal::shutdown(ctx, &file, how) {
            return r;
        }
    }
    // SAFETY: plain syscall on our fd.
    check(i64::from(unsafe { libc::shutdown(file.host_fd(), how) }))
}

fn do_accept(ctx: &mut SyscallCtx<'_>, a: &Args, flags: i32) -> SysResult {
    if flags & !(libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK) != 0 {
        return Err(Errno::EINVAL);
    }
    on_socket_file(ctx, a, |ctx, listener| {
        let host = listener.host_fd();
        let (addr, len_ptr) = (a.ptr(1), a.ptr(2));
        // Check where the peer's address goes before taking a connection off the queue
        // (Linux checks after, and loses the connection on EFAULT).
        let guest_len = if addr != 0 {
            let checked = read_socklen(ctx, len_ptr).and_then(|l| {
                ctx.proc.mm.check_range(len_ptr, 4, true)?;
                let room = u64::from(l).min(SOCKADDR_MAX as u64);
                ctx.proc.mm.check_range(addr, room, true)?;
                Ok(l)
            });
            match checked {
                Ok(l) => Some(l),
                // A socket that cannot accept says so first, as on Linux.
                Err(e) => return Err(cannot_accept(host).unwrap_or(e)),
            }
        } else {
            None
        };
        // A connection a rollback took from the guest is accepted again first.
        if let Some((conn, peer)) = ctx.proc.fds.journal_take_accept(listener) {
            return accept_again(ctx, listener, conn, peer, flags, (addr, len_ptr, guest_len));
        }
        let (mut buf, mut len) = storage();
        let host_flags = (flags & libc::SOCK_NONBLOCK) | libc::SOCK_CLOEXEC;
        // Blocks until a client connects: without the process lock.
        // SAFETY: `buf` and `len` are locals describing SOCKADDR_MAX writable bytes.
        let conn = own_fd(i64::from(ctx.proc.unlocked(|| unsafe {
            libc::accept4(host, buf.as_mut_ptr().cast(), &mut len, host_flags)
        })))?;
        let fd = install(ctx, conn, flags & libc::SOCK_CLOEXEC != 0)?;
        let n = (len as usize).min(SOCKADDR_MAX);
        if let Some(l) = guest_len {
            if let Err(e) = write_addr(ctx, addr, len_ptr, l, &buf[..n]) {
                ctx.proc.fds.remove(i64::from(fd)).ok();
                return Err(e);
            }
        }
        // Recorded while a window is live, to be accepted again after a rollback.
        let conn = ctx.proc.fds.get(i64::from(fd))?;
        ctx.proc.fds.journal_note_accept(listener, &conn, &buf[..n]);
        Ok(fd as u64)
    })
}

/// Accept again a connection a rollback took from the guest (same socket and peer, a new
/// fd with this call's flags). `out`: the guest's address buffer, its length's address
/// and the room it has.
fn accept_again(
    ctx: &mut SyscallCtx<'_>,
    listener: &Arc<OpenFile>,
    conn: Arc<OpenFile>,
    peer: Vec<u8>,
    flags: i32,
    out: (u64, u64, Option<u32>),
) -> SysResult {
    let (addr, len_ptr, guest_len) = out;
    let host = conn.host_fd();
    // SAFETY: F_GETFL/F_SETFL on a host socket we hold; no memory effects.
    let fl = unsafe { libc::fcntl(host, libc::F_GETFL) };
    if fl >= 0 {
        let fl = if flags & libc::SOCK_NONBLOCK != 0 {
            fl | libc::O_NONBLOCK
        } else {
            fl & !libc::O_NONBLOCK
        };
        // SAFETY: as above.
        unsafe { libc::fcntl(host, libc::F_SETFL, fl) };
    }
    let fd = match ctx
        .proc
        .fds
        .insert_from(0, Arc::clone(&conn), flags & libc::SOCK_CLOEXEC != 0)
    {
        Ok(fd) => fd,
        Err(e) => {
            ctx.proc.fds.journal_unaccept(listener, conn, peer);
            return Err(e);
        }
    };
    if let Some(l) = guest_len {
        if let Err(e) = write_addr(ctx, addr, len_ptr, l, &peer) {
            ctx.proc.fds.remove(i64::from(fd)).ok();
            ctx.proc.fds.journal_unaccept(listener, conn, peer);
            return Err(e);
        }
    }
    ctx.proc.fds.journal_note_accept(listener, &conn, &peer);
    Ok(fd as u64)
}

/// Why `host` cannot accept, if it is not a listening socket (the host's own error).
fn cannot_accept(host: RawFd) -> Option<Errno> {
    let mut listening: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: SO_ACCEPTCONN writes an int to a local.
    let r = unsafe {
        libc::getsockopt(
            host,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut listening as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if r == 0 && listening != 0 {
        return None;
    }
    // Not listening: accept fails at once, with the error Linux gives for this socket.
    // SAFETY: no address buffer; a returned fd (impossible without listening) is closed.
    let fd = unsafe {
        libc::accept4(
            host,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
        )
    };
    own_fd(i64::from(fd)).err()
}

fn sys_accept(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    do_accept(ctx, a, 0)
}

fn sys_accept4(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    do_accept(ctx, a, a.int(3))
}

fn do_name(ctx: &mut SyscallCtx<'_>, a: &Args, peer: bool) -> SysResult {
    on_socket(ctx, a, |ctx, host| {
        let guest_len = read_socklen(ctx, a.ptr(2))?;
        let (mut buf, mut len) = storage();
        // SAFETY: `buf` and `len` are locals describing SOCKADDR_MAX writable bytes.
        let r = unsafe {
            if peer {
                libc::getpeername(host, buf.as_mut_ptr().cast(), &mut len)
            } else {
                libc::getsockname(host, buf.as_mut_ptr().cast(), &mut len)
            }
        };
        check(i64::from(r))?;
        let n = (len as usize).min(SOCKADDR_MAX);
        if !peer {
            // The guest sees the port it bound, not the host port it was remapped to.
            remap_port(&mut buf[..n], ctx.port_map, PortDirection::HostToGuest);
        }
        write_addr(ctx, a.ptr(1), a.ptr(2), guest_len, &buf[..n])?;
        Ok(0)
    })
}

fn sys_getsockname(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    do_name(ctx, a, false)
}

fn sys_getpeername(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    do_name(ctx, a, true)
}

// ---------------------------------------------------------------------------------------
// Options

/// Options the guest may not use on host sockets, and the error it gets.
fn refused_option(level: i32, name: i32, set: bool) -> Option<Errno> {
    match (level, name) {
        // BPF programs on host sockets (the filter is also a pointer into "user" memory,
        // which for the host call is the VMM's).
        (
            libc::SOL_SOCKET,
            SO_ATTACH_FILTER | SO_ATTACH_BPF | SO_ATTACH_REUSEPORT_CBPF | SO_ATTACH_REUSEPORT_EBPF,
        ) if set => Some(Errno::EPERM),
        // Host routing and policy: what an unprivileged process is refused.
        (libc::SOL_SOCKET, SO_BINDTODEVICE | SO_BINDTOIFINDEX | SO_MARK) if set => {
            Some(Errno::EPERM)
        }
        (libc::SOL_SOCKET, SO_SNDBUFFORCE | SO_RCVBUFFORCE) if set => Some(Errno::EPERM),
        (libc::SOL_IP, IP_TRANSPARENT) | (libc::SOL_IPV6, IPV6_TRANSPARENT) if set => {
            Some(Errno::EPERM)
        }
        // These install pidfds in the caller's (the VMM's) fd table: as a kernel without them.
        (libc::SOL_SOCKET, SO_PASSPIDFD | SO_PEERPIDFD) => Some(Errno::ENOPROTOOPT),
        // Maps pages at an address in the caller's (the VMM's) address space.
        (libc::SOL_TCP, TCP_ZEROCOPY_RECEIVE) => Some(Errno::EOPNOTSUPP),
        // Netfilter, arptables, ebtables and IPVS control: host firewall state, with
        // pointers inside the values.
        (libc::SOL_IP, 64..=67 | 96..=99 | 128..=131 | 1088..=1103) => Some(Errno::EPERM),
        (libc::SOL_IPV6, 64 | 65 | 68 | 69) => Some(Errno::EPERM),
        _ => None,
    }
}

fn sys_setsockopt(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let (level, name, val, len) = (a.int(1), a.int(2), a.ptr(3), a.int(4));
    on_socket(ctx, a, |ctx, host| {
        let len = usize::try_from(len).map_err(|_| Errno::EINVAL)?;
        if let Some(e) = refused_option(level, name, true) {
            return Err(e);
        }
        // The kernel reads only what the option needs: give the host at most MAX_OPTLEN
        // bytes, and no more than are readable (a long optlen over a short buffer works).
        let len = len.min(MAX_OPTLEN);
        let len = if val == 0 || len == 0 {
            len
        } else {
            let iovs = ctx.proc.mm.host_iovecs(val, len, false)?;
            iovs.iter().map(|v| v.iov_len).sum()
        };
        let value = read_addr(ctx, val, len)?;
        let ptr = if val == 0 {
            std::ptr::null()
        } else {
            value.as_ptr().cast::<libc::c_void>()
        };
        // SAFETY: `ptr` is null or our copy of `len` bytes.
        check(i64::from(unsafe {
            libc::setsockopt(host, level, name, ptr, len as libc::socklen_t)
        }))
    })
}

fn sys_getsockopt(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let (level, name, val, len_ptr) = (a.int(1), a.int(2), a.ptr(3), a.ptr(4));
    on_socket(ctx, a, |ctx, host| {
        if let Some(e) = refused_option(level, name, false) {
            return Err(e);
        }
        let guest_len = read_socklen(ctx, len_ptr)? as usize;
        let n = guest_len.min(MAX_OPTLEN);
        let mut value = vec![0u8; n];
        // A few options read their buffer as input too (a multicast group...): start from
        // the guest's bytes where readable.
        if val != 0 && n > 0 {
            ctx.proc.mm.read(val, &mut value).ok();
        }
        let mut out_len = n as libc::socklen_t;
        // SAFETY: `value` has `out_len` writable bytes; `out_len` is a local.
        let r =
            unsafe { libc::getsockopt(host, level, name, value.as_mut_ptr().cast(), &mut out_len) };
        let r = check(i64::from(r));
        match r {
            Ok(_) => {
                let copy = (out_len as usize).min(n);
                if copy > 0 {
                    ctx.proc.mm.write(val, &value[..copy])?;
                }
                ctx.proc.mm.write(len_ptr, &out_len.to_le_bytes())?;
            }
            // The needed length comes back with ERANGE (SO_PEERGROUPS).
            Err(Errno(libc::ERANGE)) => {
                ctx.proc.mm.write(len_ptr, &out_len.to_le_bytes())?;
            }
            Err(_) => {}
        }
        r
    })
}

// ---------------------------------------------------------------------------------------
// ioctl

const SIOCGIFNAME: u64 = 0x8910;
const SIOCGIFCONF: u64 = 0x8912;
const SIOCGIFFLAGS: u64 = 0x8913;
const SIOCGIFADDR: u64 = 0x8915;
const SIOCGIFDSTADDR: u64 = 0x8917;
const SIOCGIFBRDADDR: u64 = 0x8919;
const SIOCGIFNETMASK: u64 = 0x891b;
const SIOCGIFMETRIC: u64 = 0x891d;
const SIOCGIFMTU: u64 = 0x8921;
const SIOCGIFHWADDR: u64 = 0x8927;
const SIOCGIFINDEX: u64 = 0x8933;
const SIOCGIFTXQLEN: u64 = 0x8942;
const SIOCATMARK: u64 = 0x8905;
const SIOCOUTQ: u64 = 0x5411;
const SIOCOUTQNSD: u64 = 0x894b;
/// sizeof(struct ifreq).
const IFREQ_SIZE: usize = 40;
/// Most bytes of interface list SIOCGIFCONF returns.
const MAX_IFCONF: usize = 64 << 10;

/// Socket ioctls a guest may make: read-only queries of the host's interfaces (what
/// `if_nametoindex` and friends use) and of a socket's queues. For the ioctl handler:
/// `None` if `req` is not one of them; configuration requests (SIOCS*) never are.
pub fn socket_ioctl(
    ctx: &mut SyscallCtx<'_>,
    host: RawFd,
    req: u64,
    arg: u64,
) -> Option<SysResult> {
    Some(match req {
        SIOCGIFNAME | SIOCGIFFLAGS | SIOCGIFADDR | SIOCGIFDSTADDR | SIOCGIFBRDADDR
        | SIOCGIFNETMASK | SIOCGIFMETRIC | SIOCGIFMTU | SIOCGIFHWADDR | SIOCGIFINDEX
        | SIOCGIFTXQLEN => ioctl_ifreq(ctx, host, req, arg),
        SIOCATMARK | SIOCOUTQ | SIOCOUTQNSD => {
            let mut v: libc::c_int = 0;
            // SAFETY: these requests write one int, to a local.
            check(i64::from(unsafe { libc::ioctl(host, req, &mut v) }))
                .and_then(|_| ctx.proc.mm.write(arg, &v.to_le_bytes()).map(|()| 0))
        }
        SIOCGIFCONF => ioctl_ifconf(ctx, host, arg),
        _ => return None,
    })
}

/// An ioctl on a `struct ifreq` (no pointers inside): copy in, ask the host, copy out.
fn ioctl_ifreq(ctx: &mut SyscallCtx<'_>, host: RawFd, req: u64, arg: u64) -> SysResult {
    let mut ifr = [0u8; IFREQ_SIZE];
    ctx.proc.mm.read(arg, &mut ifr)?;
    // SAFETY: the request reads and writes one struct ifreq, our local copy.
    check(i64::from(unsafe {
        libc::ioctl(host, req, ifr.as_mut_ptr())
    }))?;
    ctx.proc.mm.write(arg, &ifr)?;
    Ok(0)
}

/// SIOCGIFCONF: `struct ifconf { int ifc_len; char *ifc_buf; }`; the buffer pointer is
/// the guest's, so the host fills one of ours. A NULL buffer asks for the length needed.
fn ioctl_ifconf(ctx: &mut SyscallCtx<'_>, host: RawFd, arg: u64) -> SysResult {
    let mut raw = [0u8; 16];
    ctx.proc.mm.read(arg, &mut raw)?;
    let len = i32::from_le_bytes([raw[0], raw[1], raw[2], raw[3]]);
    let buf_ptr = u64::from_le_bytes(raw[8..].try_into().unwrap_or([0; 8]));
    let n = if buf_ptr == 0 {
        0
    } else {
        usize::try_from(len).unwrap_or(0).min(MAX_IFCONF)
    };
    let mut buf = vec![0u8; n];
    #[repr(C)]
    struct IfConf {
        len: libc::c_int,
        buf: *mut u8,
    }
    let mut conf = IfConf {
        len: n as libc::c_int,
        buf: if buf_ptr == 0 {
            std::ptr::null_mut()
        } else {
            buf.as_mut_ptr()
        },
    };
    // SAFETY: `conf` describes `buf` (n bytes) or asks for the length (NULL).
    check(i64::from(unsafe {
        libc::ioctl(host, SIOCGIFCONF, &mut conf)
    }))?;
    let got = usize::try_from(conf.len).unwrap_or(0);
    if buf_ptr != 0 && got > 0 {
        ctx.proc.mm.write(buf_ptr, &buf[..got.min(n)])?;
    }
    ctx.proc.mm.write(arg, &conf.len.to_le_bytes())?;
    Ok(0)
}

// ---------------------------------------------------------------------------------------
// Data

/// SIGPIPE for EPIPE unless the guest asked for MSG_NOSIGNAL.
fn sigpipe(ctx: &mut SyscallCtx<'_>, r: SysResult, flags: i32) -> SysResult {
    if flags & libc::MSG_NOSIGNAL == 0 {
        ctx.sigpipe_on_epipe(r)
    } else {
        r
    }
}

fn empty_msghdr() -> libc::msghdr {
    // SAFETY: msghdr is plain data (pointers and integers); all-zero is valid.
    unsafe { std::mem::zeroed() }
}

fn sys_sendto(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let (buf, len, flags, dest) = (a.ptr(1), a.size(2), a.int(3), a.ptr(4));
    on_socket_file(ctx, a, |ctx, file| {
        let host = file.host_fd();
        let target = if dest != 0 {
            let alen = addr_in_len(a.int(5))?;
            let raw = read_addr(ctx, dest, alen)?;
            to_host_addr(ctx, raw, AddrUse::Reach)?
        } else {
            HostAddr::plain(Vec::new())
        };
        let iovs = if len == 0 {
            Vec::new()
        } else {
            ctx.proc.mm.host_iovecs(buf, len, false)?
        };
        journal::begin_call();
        let out = journal::Outgoing {
            iovs: &iovs,
            to: Some(&target.bytes),
            holdable: flags & !journal::HOLDABLE_SEND_FLAGS == 0,
            dontwait: flags & libc::MSG_DONTWAIT != 0,
        };
        if let Some(r) = journal::write(ctx, file, out) {
            return sigpipe(ctx, r, flags);
        }
        let mut msg = empty_msghdr();
        msg.msg_name = target.ptr() as *mut libc::c_void;
        msg.msg_namelen = target.len();
        msg.msg_iov = iovs.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iovs.len();
        // May block on a full socket buffer: without the process lock.
        // SAFETY: the iovecs point into guest memory checked by host_iovecs; the name is ours.
        let r = check(
            ctx.proc
                .unlocked(|| unsafe { libc::sendmsg(host, &msg, flags | libc::MSG_NOSIGNAL) })
                as i64,
        );
        sigpipe(ctx, r, flags)
    })
}

fn sys_recvfrom(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let (buf, len, flags, src, len_ptr) = (a.ptr(1), a.size(2), a.int(3), a.ptr(4), a.ptr(5));
    on_socket_file(ctx, a, |ctx, file| {
        let host = file.host_fd();
        let guest_len = if src != 0 {
            Some(read_socklen(ctx, len_ptr)?)
        } else {
            None
        };
        let iovs = if len == 0 {
            Vec::new()
        } else {
            ctx.proc.mm.host_iovecs(buf, len, true)?
        };
        journal::begin_call();
        let r = journal::Recv::flags(flags);
        if let Some(served) = journal::read(ctx, file, &iovs, r)? {
            let n = served.bytes.len();
            let n = n + wait_all_rest(ctx, file, &iovs, n, flags, &served);
            if let Some(l) = guest_len {
                write_addr(
                    ctx,
                    src,
                    len_ptr,
                    l,
                    served.from.as_deref().unwrap_or_default(),
                )?;
            }
            return Ok(n as u64);
        }
        let (mut name, namelen) = storage();
        let mut msg = empty_msghdr();
        msg.msg_name = name.as_mut_ptr().cast();
        msg.msg_namelen = namelen;
        msg.msg_iov = iovs.as_ptr() as *mut libc::iovec;
        msg.msg_iovlen = iovs.len();
        // SAFETY: the iovecs point into guest memory checked and populated by host_iovecs;
        // the name buffer is ours. No control buffer, so no fds can arrive.
        let n = check(
            ctx.proc
                .unlocked(|| unsafe { libc::recvmsg(host, &mut msg, flags) }) as i64,
        )?;
        let nl = (msg.msg_namelen as usize).min(SOCKADDR_MAX);
        let from = (nl > 0).then(|| &name[..nl]);
        journal::after_read(ctx, file, &iovs, n as usize, from, r);
        if let Some(l) = guest_len {
            write_addr(ctx, src, len_ptr, l, &name[..nl])?;
        }
        Ok(n)
    })
}

/// After `n` replayed bytes of a stream were served to a MSG_WAITALL receive that wants
/// more: the rest from the host (recorded as usual). Returns the bytes added; an error
/// there leaves the short count, as Linux gives after some data.
fn wait_all_rest(
    ctx: &mut SyscallCtx<'_>,
    file: &Arc<OpenFile>,
    iovs: &[libc::iovec],
    n: usize,
    flags: i32,
    served: &journal::Served,
) -> usize {
    let want: usize = iovs.iter().map(|v| v.iov_len).sum();
    if flags & libc::MSG_WAITALL == 0 || flags & libc::MSG_PEEK != 0 || served.datagram || n >= want
    {
        return 0;
    }
    let rest = journal::advance(iovs, n);
    let host = file.host_fd();
    let mut msg = empty_msghdr();
    msg.msg_iov = rest.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = rest.len();
    // SAFETY: the iovecs are the tail of ones host_iovecs/guest_iovecs checked and
    // populated for writing; no name or control buffer.
    let r = check(
        ctx.proc
            .unlocked(|| unsafe { libc::recvmsg(host, &mut msg, flags) }) as i64,
    );
    match r {
        Ok(m) => {
            journal::after_read(
                ctx,
                file,
                &rest,
                m as usize,
                None,
                journal::Recv::flags(flags),
            );
            m as usize
        }
        Err(_) => 0,
    }
}

/// The guest's `struct msghdr`.
#[derive(Debug, Clone, Copy)]
struct GuestMsghdr {
    name: u64,
    namelen: u32,
    iov: u64,
    iovlen: u64,
    control: u64,
    controllen: u64,
}

fn read_msghdr(ctx: &mut SyscallCtx<'_>, ptr: u64) -> Result<GuestMsghdr, Errno> {
    let mut b = [0u8; MSGHDR_SIZE as usize];
    ctx.proc.mm.read(ptr, &mut b)?;
    let q = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
    let m = GuestMsghdr {
        name: q(0),
        namelen: u32::from_le_bytes(b[8..12].try_into().unwrap_or([0; 4])),
        iov: q(16),
        iovlen: q(24),
        control: q(32),
        controllen: q(40),
    };
    if m.iovlen > UIO_MAXIOV {
        return Err(Errno::EMSGSIZE);
    }
    Ok(m)
}

fn align_cmsg(len: usize) -> usize {
    len.saturating_add(7) & !7
}

/// Rewrite every fd of the SCM_RIGHTS messages in `control` with `map`, walking the
/// headers as Linux's CMSG_FIRSTHDR/CMSG_NXTHDR do; a malformed header is EINVAL, as
/// __scm_send gives.
fn map_rights(
    control: &mut [u8],
    mut map: impl FnMut(i32) -> Result<i32, Errno>,
) -> Result<(), Errno> {
    let mut off = 0usize;
    while control.len().saturating_sub(off) >= CMSG_HDR {
        let h = &control[off..off + CMSG_HDR];
        let len = u64::from_le_bytes(h[..8].try_into().unwrap_or([0; 8]));
        let level = i32::from_le_bytes(h[8..12].try_into().unwrap_or([0; 4]));
        let ty = i32::from_le_bytes(h[12..16].try_into().unwrap_or([0; 4]));
        let len = usize::try_from(len).map_err(|_| Errno::EINVAL)?;
        if len < CMSG_HDR || len > control.len() - off {
            return Err(Errno::EINVAL);
        }
        if level == libc::SOL_SOCKET && ty == libc::SCM_RIGHTS {
            for fd in control[off + CMSG_HDR..off + len].chunks_exact_mut(4) {
                let g = i32::from_le_bytes([fd[0], fd[1], fd[2], fd[3]]);
                fd.copy_from_slice(&map(g)?.to_le_bytes());
            }
        }
        off = off.saturating_add(align_cmsg(len));
    }
    Ok(())
}

/// Install the host fds the kernel put in a received control buffer into the guest's
/// table and write the guest numbers in their place. If the table is full, Linux's rule:
/// the message keeps the fds installed so far, the rest are closed, and MSG_CTRUNC is
/// set. Returns the control length to give back and whether it was cut.
fn install_rights(ctx: &mut SyscallCtx<'_>, control: &mut [u8], cloexec: bool) -> (usize, bool) {
    let mut cut: Option<usize> = None;
    let mut off = 0usize;
    while control.len().saturating_sub(off) >= CMSG_HDR {
        let h = &control[off..off + CMSG_HDR];
        let len = u64::from_le_bytes(h[..8].try_into().unwrap_or([0; 8])) as usize;
        let level = i32::from_le_bytes(h[8..12].try_into().unwrap_or([0; 4]));
        let ty = i32::from_le_bytes(h[12..16].try_into().unwrap_or([0; 4]));
        if len < CMSG_HDR || len > control.len() - off {
            break;
        }
        if level == libc::SOL_SOCKET && ty == libc::SCM_RIGHTS {
            let mut at = off + CMSG_HDR;
            while at + 4 <= off + len {
                let raw = i32::from_le_bytes(control[at..at + 4].try_into().unwrap_or([0; 4]));
                if raw >= 0 {
                    // SAFETY: the kernel installed this fd in the VMM for this message;
                    // nothing else owns it.
                    let owned = unsafe { OwnedFd::from_raw_fd(raw) };
                    if cut.is_none() {
                        let path = ctx.proc.fs.guest_path_of(raw);
                        match ctx
                            .proc
                            .fds
                            .insert(OpenFile::new(owned, FileKind::Host, path), cloexec)
                        {
                            Ok(g) => control[at..at + 4].copy_from_slice(&g.to_le_bytes()),
                            Err(_) => {
                                cut = Some(cut_rights(control, off, at));
                            }
                        }
                    }
                    // Past the cut, `owned` is dropped: the fd is closed.
                }
                at += 4;
            }
        }
        off = off.saturating_add(align_cmsg(len));
    }
    match cut {
        Some(at) => (at, true),
        None => (control.len(), false),
    }
}

/// End an SCM_RIGHTS message at `at` (its header is at `off`) when the fd there cannot be
/// installed; returns the control length given back. As Linux's scm_detach_fds: with no
/// fd installed the message is dropped; otherwise its length covers the installed fds and
/// the control data consumed is that, aligned (as far as the buffer goes).
fn cut_rights(control: &mut [u8], off: usize, at: usize) -> usize {
    let kept = at - off;
    if kept == CMSG_HDR {
        return off;
    }
    control[off..off + 8].copy_from_slice(&(kept as u64).to_le_bytes());
    let end = (off + align_cmsg(kept)).min(control.len());
    // The padding held host fd numbers: don't show them.
    control[at..end].fill(0);
    end
}

/// sendmsg of one guest msghdr; returns the bytes sent.
fn send_one(ctx: &mut SyscallCtx<'_>, file: &Arc<OpenFile>, hdr: u64, flags: i32) -> SysResult {
    let host = file.host_fd();
    let m = read_msghdr(ctx, hdr)?;
    // Linux clamps a long name to sockaddr_storage here (bind/connect refuse it).
    let target = if m.name != 0 && m.namelen != 0 {
        let len = usize::try_from(m.namelen as i32).map_err(|_| Errno::EINVAL)?;
        let raw = read_addr(ctx, m.name, len.min(SOCKADDR_MAX))?;
        to_host_addr(ctx, raw, AddrUse::Reach)?
    } else {
        HostAddr::plain(Vec::new())
    };
    let iovs = ctx.proc.mm.guest_iovecs(m.iov, m.iovlen as i64, false)?;
    let mut control = Vec::new();
    if m.controllen > 0 {
        if m.controllen > MAX_CONTROL as u64 {
            return Err(Errno::ENOBUFS);
        }
        control = ctx.proc.mm.read_vec(m.control, m.controllen as usize)?;
        let fds = &ctx.proc.fds;
        map_rights(&mut control, |g| fds.host_fd(i64::from(g)))?;
    }
    // Held while a window is live, unless it carries control data (fds, credentials).
    let out = journal::Outgoing {
        iovs: &iovs,
        to: Some(&target.bytes),
        holdable: m.controllen == 0 && flags & !journal::HOLDABLE_SEND_FLAGS == 0,
        dontwait: flags & libc::MSG_DONTWAIT != 0,
    };
    if let Some(r) = journal::write(ctx, file, out) {
        return r;
    }
    let mut msg = empty_msghdr();
    msg.msg_name = target.ptr() as *mut libc::c_void;
    msg.msg_namelen = target.len();
    msg.msg_iov = iovs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iovs.len();
    if !control.is_empty() {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = control.len();
    }
    // SAFETY: the iovecs point into guest memory checked by guest_iovecs; name and control
    // are our copies, with host fds in SCM_RIGHTS.
    check(
        ctx.proc
            .unlocked(|| unsafe { libc::sendmsg(host, &msg, flags | libc::MSG_NOSIGNAL) })
            as i64,
    )
}

/// recvmsg into one guest msghdr; returns the bytes received and the message flags.
fn recv_one(
    ctx: &mut SyscallCtx<'_>,
    file: &Arc<OpenFile>,
    hdr: u64,
    flags: i32,
) -> Result<(u64, i32), Errno> {
    let host = file.host_fd();
    let m = read_msghdr(ctx, hdr)?;
    let name_len = if m.name != 0 {
        if (m.namelen as i32) < 0 {
            return Err(Errno::EINVAL);
        }
        Some(m.namelen)
    } else {
        None
    };
    let iovs = ctx.proc.mm.guest_iovecs(m.iov, m.iovlen as i64, true)?;
    // Where the results go must be writable before a message is consumed.
    ctx.proc.mm.check_range(hdr, MSGHDR_SIZE, true)?;
    let clen = usize::try_from(m.controllen)
        .unwrap_or(usize::MAX)
        .min(MAX_CONTROL);
    if clen > 0 {
        ctx.proc.mm.check_range(m.control, clen as u64, true)?;
    }
    let r = journal::Recv::flags(flags);
    if let Some(served) = journal::read(ctx, file, &iovs, r)? {
        // Replayed: no control data; a datagram cut to the buffer says so.
        let n = served.bytes.len();
        let n = n + wait_all_rest(ctx, file, &iovs, n, flags, &served);
        let mut out_flags = flags & libc::MSG_CMSG_CLOEXEC;
        if served.full > served.bytes.len() {
            out_flags |= libc::MSG_TRUNC;
        }
        if let Some(l) = name_len {
            write_addr(
                ctx,
                m.name,
                hdr + 8,
                l,
                served.from.as_deref().unwrap_or_default(),
            )?;
        }
        ctx.proc.mm.write(hdr + 40, &0u64.to_le_bytes())?;
        ctx.proc.mm.write(hdr + 48, &out_flags.to_le_bytes())?;
        return Ok((n as u64, out_flags));
    }
    let mut control = vec![0u8; clen];
    let (mut name, namelen) = storage();
    let mut msg = empty_msghdr();
    msg.msg_name = name.as_mut_ptr().cast();
    msg.msg_namelen = namelen;
    msg.msg_iov = iovs.as_ptr() as *mut libc::iovec;
    msg.msg_iovlen = iovs.len();
    if clen > 0 {
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = clen;
    }
    // Received fds land close-on-exec in the VMM whatever the guest asked; the guest's
    // MSG_CMSG_CLOEXEC becomes its fd-table bit.
    // SAFETY: the iovecs point into guest memory checked and populated by guest_iovecs;
    // name and control are our buffers of the given sizes.
    let n = check(
        ctx.proc
            .unlocked(|| unsafe { libc::recvmsg(host, &mut msg, flags | libc::MSG_CMSG_CLOEXEC) })
            as i64,
    )?;
    // The kernel echoes MSG_CMSG_CLOEXEC in msg_flags: echo the guest's, not ours.
    let mut out_flags =
        (msg.msg_flags & !libc::MSG_CMSG_CLOEXEC) | (flags & libc::MSG_CMSG_CLOEXEC);
    let used = msg.msg_controllen.min(clen);
    // Recorded only without control data (fds, credentials: not replayable).
    let nl = (msg.msg_namelen as usize).min(SOCKADDR_MAX);
    let from = (nl > 0).then(|| &name[..nl]);
    let plain = journal::Recv {
        plain: r.plain && used == 0,
        ..r
    };
    journal::after_read(ctx, file, &iovs, n as usize, from, plain);
    let (used, cut) = install_rights(
        ctx,
        &mut control[..used],
        flags & libc::MSG_CMSG_CLOEXEC != 0,
    );
    if cut {
        out_flags |= libc::MSG_CTRUNC;
    }
    if used > 0 {
        ctx.proc.mm.write(m.control, &control[..used])?;
    }
    if let Some(l) = name_len {
        let nl = (msg.msg_namelen as usize).min(SOCKADDR_MAX);
        write_addr(ctx, m.name, hdr + 8, l, &name[..nl])?;
    }
    ctx.proc.mm.write(hdr + 40, &(used as u64).to_le_bytes())?;
    ctx.proc.mm.write(hdr + 48, &out_flags.to_le_bytes())?;
    Ok((n, out_flags))
}

fn sys_sendmsg(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    on_socket_file(ctx, a, |ctx, file| {
        let flags = a.int(2);
        journal::begin_call();
        let r = send_one(ctx, file, a.ptr(1), flags);
        sigpipe(ctx, r, flags)
    })
}

fn sys_recvmsg(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    on_socket_file(ctx, a, |ctx, file| {
        journal::begin_call();
        recv_one(ctx, file, a.ptr(1), a.int(2)).map(|(n, _)| n)
    })
}

fn sys_sendmmsg(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    on_socket_file(ctx, a, |ctx, file| {
        journal::begin_call();
        let (vec, vlen, flags) = (a.ptr(1), u64::from(a.uint(2)).min(UIO_MAXIOV), a.int(3));
        let mut sent = 0u64;
        while sent < vlen {
            let hdr = vec.checked_add(sent * MMSGHDR_SIZE).ok_or(Errno::EFAULT)?;
            match send_one(ctx, file, hdr, flags) {
                Ok(n) => {
                    if let Err(e) = ctx.proc.mm.write(hdr + 56, &(n as u32).to_le_bytes()) {
                        return if sent == 0 { Err(e) } else { Ok(sent) };
                    }
                    sent += 1;
                }
                // Linux reports the error only if nothing was sent.
                Err(e) if sent == 0 => return sigpipe(ctx, Err(e), flags),
                Err(_) => break,
            }
        }
        Ok(sent)
    })
}

fn sys_recvmmsg(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    on_socket_file(ctx, a, |ctx, file| {
        journal::begin_call();
        let (vec, vlen, mut flags, tsp) = (
            a.ptr(1),
            u64::from(a.uint(2)).min(UIO_MAXIOV),
            a.int(3),
            a.ptr(4),
        );
        let limit = if tsp != 0 {
            let ts = read_timespec(ctx, tsp)?;
            Some(std::time::Duration::new(
                ts.tv_sec as u64,
                ts.tv_nsec as u32,
            ))
        } else {
            None
        };
        let start = std::time::Instant::now();
        let mut got = 0u64;
        let mut first_err = None;
        while got < vlen {
            let Some(hdr) = vec.checked_add(got * MMSGHDR_SIZE) else {
                first_err = Some(Errno::EFAULT);
                break;
            };
            match recv_one(ctx, file, hdr, flags & !libc::MSG_WAITFORONE) {
                Ok((n, msg_flags)) => {
                    if let Err(e) = ctx.proc.mm.write(hdr + 56, &(n as u32).to_le_bytes()) {
                        first_err = Some(e);
                        break;
                    }
                    got += 1;
                    if msg_flags & libc::MSG_OOB != 0 {
                        break;
                    }
                }
                Err(e) => {
                    first_err = Some(e);
                    break;
                }
            }
            if flags & libc::MSG_WAITFORONE != 0 {
                flags |= libc::MSG_DONTWAIT;
            }
            // As Linux, the limit is checked only between messages.
            if limit.is_some_and(|l| start.elapsed() >= l) {
                break;
            }
        }
        if got == 0 {
            return Err(first_err.unwrap_or(Errno::EAGAIN));
        }
        if let Some(l) = limit {
            let rem = l.saturating_sub(start.elapsed());
            let ts = libc::timespec {
                tv_sec: rem.as_secs() as i64,
                tv_nsec: i64::from(rem.subsec_nanos()),
            };
            ctx.proc.mm.write(tsp, &super::time::timespec_bytes(&ts))?;
        }
        Ok(got)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_remaps_apply_to_inet_addresses_both_ways() {
        let map = [(8080u16, 18080u16)];
        let mut v4 = vec![0u8; 16];
        v4[..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
        v4[2..4].copy_from_slice(&8080u16.to_be_bytes());
        remap_port(&mut v4, &map, PortDirection::GuestToHost);
        assert_eq!(u16::from_be_bytes([v4[2], v4[3]]), 18080);
        remap_port(&mut v4, &map, PortDirection::HostToGuest);
        assert_eq!(u16::from_be_bytes([v4[2], v4[3]]), 8080);
        let mut other = v4.clone();
        other[2..4].copy_from_slice(&9090u16.to_be_bytes());
        remap_port(&mut other, &map, PortDirection::GuestToHost);
        assert_eq!(
            u16::from_be_bytes([other[2], other[3]]),
            9090,
            "unmapped ports stay"
        );
        let mut unix = vec![0u8; 16];
        unix[..2].copy_from_slice(&(libc::AF_UNIX as u16).to_ne_bytes());
        unix[2..4].copy_from_slice(&8080u16.to_be_bytes());
        remap_port(&mut unix, &map, PortDirection::GuestToHost);
        assert_eq!(
            u16::from_be_bytes([unix[2], unix[3]]),
            8080,
            "only inet families"
        );
    }

    #[test]
    fn address_lengths_follow_linux() {
        assert_eq!(addr_in_len(0), Ok(0));
        assert_eq!(addr_in_len(16), Ok(16));
        assert_eq!(addr_in_len(128), Ok(128));
        assert_eq!(addr_in_len(129), Err(Errno::EINVAL));
        assert_eq!(addr_in_len(-1), Err(Errno::EINVAL));
        // A short guest buffer gets a prefix and the full length.
        assert_eq!(addr_out_len(8, 16), Ok((8, 16)));
        assert_eq!(addr_out_len(128, 16), Ok((16, 16)));
        assert_eq!(addr_out_len(0, 110), Ok((0, 110)));
        assert_eq!(addr_out_len(u32::MAX, 16), Err(Errno::EINVAL));
    }

    #[test]
    fn unix_names_are_classified() {
        let af = (libc::AF_UNIX as u16).to_le_bytes();
        assert_eq!(unix_name(&af), UnixName::Unnamed);
        assert_eq!(unix_name(&[&af[..], b"\0abc"].concat()), UnixName::Abstract);
        assert_eq!(
            unix_name(&[&af[..], b"/run/x.sock\0junk"].concat()),
            UnixName::Path(b"/run/x.sock")
        );
        assert_eq!(
            unix_name(&[&af[..], b"rel"].concat()),
            UnixName::Path(b"rel")
        );
        let long = [b'a'; 108];
        assert_eq!(unix_sockaddr(&long).map(|v| v.len()), Ok(110));
        assert_eq!(unix_sockaddr(&[b'a'; 109]), Err(Errno::ENAMETOOLONG));
        assert_eq!(unix_sockaddr(b"/x"), Ok([&af[..], b"/x\0"].concat()));
    }

    #[test]
    fn host_unix_paths_never_reach_the_guest() {
        let af = (libc::AF_UNIX as u16).to_le_bytes();
        let root = b"/srv/root";
        let none = |_: &[u8]| None;
        // Inside the root: the guest path.
        let h = [&af[..], b"/srv/root/run/a.sock\0"].concat();
        assert_eq!(
            guest_unix_addr(&h, root, none),
            [&af[..], b"/run/a.sock\0"].concat()
        );
        // A sibling directory sharing the prefix is outside.
        let h = [&af[..], b"/srv/rootx/a.sock\0"].concat();
        assert_eq!(guest_unix_addr(&h, root, none), af.to_vec());
        // Outside: unnamed.
        let h = [&af[..], b"/var/run/docker.sock\0"].concat();
        assert_eq!(guest_unix_addr(&h, root, none), af.to_vec());
        // Our own bind: the guest's name as given.
        let h = [&af[..], b"/proc/self/fd/7/s\0"].concat();
        let mine = [&af[..], b"s\0"].concat();
        let m = mine.clone();
        let lookup = move |p: &[u8]| (p == b"/proc/self/fd/7/s").then(|| m.clone());
        assert_eq!(guest_unix_addr(&h, root, lookup), mine);
        // Abstract, unnamed and other families pass through.
        let abs = [&af[..], b"\0xyz"].concat();
        assert_eq!(guest_unix_addr(&abs, root, none), abs);
        let inet = [2u8, 0, 0x1f, 0x90, 127, 0, 0, 1];
        assert_eq!(guest_unix_addr(&inet, root, none), inet.to_vec());
        // A root of "/" keeps every path.
        let h = [&af[..], b"/tmp/s\0"].concat();
        assert_eq!(guest_unix_addr(&h, b"/", none), h);
    }

    fn cmsg(level: i32, ty: i32, data: &[u8]) -> Vec<u8> {
        let mut v = ((CMSG_HDR + data.len()) as u64).to_le_bytes().to_vec();
        v.extend_from_slice(&level.to_le_bytes());
        v.extend_from_slice(&ty.to_le_bytes());
        v.extend_from_slice(data);
        v.resize(align_cmsg(v.len()), 0);
        v
    }

    #[test]
    fn scm_rights_fds_are_rewritten() {
        let fds: Vec<u8> = [3i32, 4, 5].iter().flat_map(|f| f.to_le_bytes()).collect();
        let creds = [0u8; 12];
        let mut control = [
            cmsg(libc::SOL_SOCKET, libc::SCM_CREDENTIALS, &creds),
            cmsg(libc::SOL_SOCKET, libc::SCM_RIGHTS, &fds),
        ]
        .concat();
        let before = control.clone();
        map_rights(&mut control, |g| Ok(g + 100)).expect("map");
        let want: Vec<u8> = [103i32, 104, 105]
            .iter()
            .flat_map(|f| f.to_le_bytes())
            .collect();
        let off = align_cmsg(CMSG_HDR + 12) + CMSG_HDR;
        assert_eq!(&control[off..off + 12], &want[..]);
        assert_eq!(&control[..off], &before[..off]);
        // An unknown fd fails the whole send.
        let mut c = before.clone();
        assert_eq!(
            map_rights(&mut c, |g| if g == 4 { Err(Errno::EBADF) } else { Ok(g) }),
            Err(Errno::EBADF)
        );
        // Malformed headers are EINVAL; a trailing partial header is ignored.
        let mut bad = cmsg(libc::SOL_SOCKET, libc::SCM_RIGHTS, &fds);
        bad[..8].copy_from_slice(&1000u64.to_le_bytes());
        assert_eq!(map_rights(&mut bad, Ok), Err(Errno::EINVAL));
        let mut short = cmsg(libc::SOL_SOCKET, libc::SCM_RIGHTS, &fds);
        short[..8].copy_from_slice(&8u64.to_le_bytes());
        assert_eq!(map_rights(&mut short, Ok), Err(Errno::EINVAL));
        let mut tail = vec![0u8; 10];
        assert_eq!(map_rights(&mut tail, Ok), Ok(()));
    }

    #[test]
    fn cut_rights_keeps_installed_fds_only() {
        let fds: Vec<u8> = [7i32, 8, 9].iter().flat_map(|f| f.to_le_bytes()).collect();
        let head = cmsg(libc::SOL_SOCKET, libc::SCM_CREDENTIALS, &[0u8; 12]);
        let rights = cmsg(libc::SOL_SOCKET, libc::SCM_RIGHTS, &fds);
        let off = head.len();
        // One fd installed: length 20, consumed 24, padding cleared.
        let mut c = [head.clone(), rights.clone()].concat();
        assert_eq!(cut_rights(&mut c, off, off + CMSG_HDR + 4), off + 24);
        assert_eq!(&c[off..off + 8], &20u64.to_le_bytes());
        assert_eq!(&c[off + 20..off + 24], &[0; 4]);
        // None installed: the message is dropped.
        let mut c = [head.clone(), rights.clone()].concat();
        assert_eq!(cut_rights(&mut c, off, off + CMSG_HDR), off);
        // Consumed length never passes the buffer.
        let mut c = rights[..CMSG_HDR + 4].to_vec();
        c[..8].copy_from_slice(&((CMSG_HDR + 4) as u64).to_le_bytes());
        assert_eq!(cut_rights(&mut c, 0, CMSG_HDR + 4), CMSG_HDR + 4);
    }

    #[test]
    fn dangerous_options_are_refused() {
        assert_eq!(
            refused_option(libc::SOL_SOCKET, SO_ATTACH_FILTER, true),
            Some(Errno::EPERM)
        );
        // Reading the (absent) filter back is harmless.
        assert_eq!(
            refused_option(libc::SOL_SOCKET, SO_ATTACH_FILTER, false),
            None
        );
        assert_eq!(
            refused_option(libc::SOL_SOCKET, SO_BINDTODEVICE, true),
            Some(Errno::EPERM)
        );
        assert_eq!(
            refused_option(libc::SOL_TCP, TCP_ZEROCOPY_RECEIVE, false),
            Some(Errno::EOPNOTSUPP)
        );
        assert_eq!(refused_option(libc::SOL_IP, 64, true), Some(Errno::EPERM));
        assert_eq!(refused_option(libc::SOL_IPV6, 67, true), None); // IPV6_TCLASS
        assert_eq!(
            refused_option(libc::SOL_SOCKET, libc::SO_REUSEADDR, true),
            None
        );
        assert_eq!(refused_option(libc::SOL_TCP, libc::TCP_NODELAY, true), None);
        assert_eq!(refused_option(libc::SOL_IP, 80, false), None); // SO_ORIGINAL_DST
    }
}
