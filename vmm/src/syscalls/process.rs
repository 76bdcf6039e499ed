//! Process and thread identity, limits, and exit.

use std::time::{Duration, Instant};

use super::{
    Args, Control, ForkRequest, Support, SysResult, SyscallCtx, SyscallDef, ThreadRequest,
};
use crate::errno::Errno;
use crate::syscall_table;
use crate::timer::Itimer;

/// This family's syscalls.
pub const SYSCALLS: &[SyscallDef] = syscall_table![
    24 sched_yield => Support::Full(sys_sched_yield),
    39 getpid => Support::Full(sys_getpid),
    56 clone => Support::Partial(sys_clone, "Threads (CLONE_VM|CLONE_THREAD, one vCPU each) and processes (no CLONE_VM); not CLONE_VM without CLONE_THREAD, namespaces"),
    57 fork => Support::Full(sys_fork),
    58 vfork => Support::Partial(sys_fork, "Same as fork: the child gets a copy, the parent does not wait"),
    60 exit => Support::Full(sys_exit),
    63 uname => Support::Full(sys_uname),
    95 umask => Support::Full(sys_umask),
    97 getrlimit => Support::Full(sys_getrlimit),
    99 sysinfo => Support::Full(sys_sysinfo),
    102 getuid => Support::Full(sys_getuid),
    104 getgid => Support::Full(sys_getgid),
    107 geteuid => Support::Full(sys_getuid),
    108 getegid => Support::Full(sys_getgid),
    110 getppid => Support::Full(sys_getppid),
    111 getpgrp => Support::Full(sys_getpid),
    112 setsid => Support::Partial(sys_setsid, "The process already leads its session"),
    121 getpgid => Support::Full(sys_getpgid),
    124 getsid => Support::Full(sys_getpgid),
    158 arch_prctl => Support::Partial(sys_arch_prctl, "ARCH_SET_FS/GET_FS/SET_GS/GET_GS"),
    160 setrlimit => Support::Full(sys_setrlimit),
    186 gettid => Support::Full(sys_gettid),
    204 sched_getaffinity => Support::Full(sys_sched_getaffinity),
    218 set_tid_address => Support::Full(sys_set_tid_address),
    61 wait4 => Support::Partial(sys_wait4, "Children of this process; rusage is zeroed"),
    231 exit_group => Support::Full(sys_exit_group),
    36 getitimer => Support::Partial(sys_getitimer, "ITIMER_REAL; ITIMER_VIRTUAL and ITIMER_PROF are EINVAL"),
    37 alarm => Support::Full(sys_alarm),
    38 setitimer => Support::Partial(sys_setitimer, "ITIMER_REAL; ITIMER_VIRTUAL and ITIMER_PROF are EINVAL"),
    105 setuid => Support::Partial(sys_setuid, "The guest keeps the identity it started with: only no-op changes succeed"),
    106 setgid => Support::Partial(sys_setgid, "The guest keeps the identity it started with: only no-op changes succeed"),
    113 setreuid => Support::Partial(sys_setreuid, "Only no-op changes succeed"),
    114 setregid => Support::Partial(sys_setregid, "Only no-op changes succeed"),
    115 getgroups => Support::Full(sys_getgroups),
    116 setgroups => Support::Partial(sys_setgroups, "Only the empty list or the current group"),
    117 setresuid => Support::Partial(sys_setresuid, "Only no-op changes succeed"),
    118 getresuid => Support::Full(sys_getresuid),
    119 setresgid => Support::Partial(sys_setresgid, "Only no-op changes succeed"),
    120 getresgid => Support::Full(sys_getresgid),
    122 setfsuid => Support::Full(sys_setfsuid),
    123 setfsgid => Support::Full(sys_setfsgid),
    157 prctl => Support::Partial(sys_prctl, "PR_SET/GET_NAME, DUMPABLE, PDEATHSIG, NO_NEW_PRIVS, KEEPCAPS, TIMERSLACK, CAPBSET_READ; others EINVAL"),
    273 set_robust_list => Support::Full(sys_set_robust_list),
    274 get_robust_list => Support::Partial(sys_get_robust_list, "Only the calling thread"),
    302 prlimit64 => Support::Partial(sys_prlimit64, "Only the calling process"),
    309 getcpu => Support::Full(sys_getcpu),
    318 getrandom => Support::Full(sys_getrandom),
];

fn sys_getpid(ctx: &mut SyscallCtx<'_>, _: &Args) -> SysResult {
    Ok(ctx.proc.pid as u64)
}

fn sys_gettid(ctx: &mut SyscallCtx<'_>, _: &Args) -> SysResult {
    Ok(ctx.thread.tid as u64)
}

fn sys_getppid(_: &mut SyscallCtx<'_>, _: &Args) -> SysResult {
    Ok(0)
}

fn sys_getpgid(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    match a.int(0) {
        0 => Ok(ctx.proc.pid as u64),
        p if p == ctx.proc.pid => Ok(p as u64),
        _ => Err(Errno::ESRCH),
    }
}

fn sys_setsid(_: &mut SyscallCtx<'_>, _: &Args) -> SysResult {
    Err(Errno::EPERM)
}

fn sys_getuid(_: &mut SyscallCtx<'_>, _: &Args) -> SysResult {
    // SAFETY: cannot fail.
    Ok(u64::from(unsafe { libc::getuid() }))
}

fn sys_getgid(_: &mut SyscallCtx<'_>, _: &Args) -> SysResult {
    // SAFETY: cannot fail.
    Ok(u64::from(unsafe { libc::getgid() }))
}

fn sys_sched_yield(_: &mut SyscallCtx<'_>, _: &Args) -> SysResult {
    Ok(0)
}

fn sys_exit(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    ctx.control = Control::ExitThread(a.int(0) & 0xff);
    Ok(0)
}

fn sys_exit_group(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    ctx.control = Control::ExitGroup(a.int(0) & 0xff);
    Ok(0)
}

fn sys_uname(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    // SAFETY: utsname is plain data; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a local.
    unsafe { libc::uname(&mut u) };
    let field = |dst: &mut [libc::c_char; 65], s: &str| {
        dst.fill(0);
        for (d, b) in dst.iter_mut().zip(s.bytes().take(64)) {
            *d = b as libc::c_char;
        }
    };
    // The guest sees the host's kernel release (what its libc checks) but its own host name.
    field(&mut u.nodename, "assure");
    field(&mut u.domainname, "(none)");
    // SAFETY: utsname is 6 arrays of c_char: plain bytes.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&u as *const libc::utsname).cast::<u8>(),
            std::mem::size_of::<libc::utsname>(),
        )
    };
    ctx.proc.mm.write(a.ptr(0), bytes)?;
    Ok(0)
}

fn sys_umask(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let old = ctx.proc.umask;
    ctx.proc.umask = a.uint(0) & 0o777;
    Ok(u64::from(old))
}

fn sys_arch_prctl(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    const ARCH_SET_GS: i32 = 0x1001;
    const ARCH_SET_FS: i32 = 0x1002;
    const ARCH_GET_FS: i32 = 0x1003;
    const ARCH_GET_GS: i32 = 0x1004;
    let value = a.raw(1);
    match a.int(0) {
        ARCH_SET_FS | ARCH_SET_GS => {
            if value >= crate::arch::x86_64::layout::USER_END {
                return Err(Errno::EPERM);
            }
            if a.int(0) == ARCH_SET_FS {
                ctx.sregs.fs.base = value;
            } else {
                ctx.sregs.gs.base = value;
            }
            ctx.sregs_changed = true;
            Ok(0)
        }
        ARCH_GET_FS => {
            let base = ctx.sregs.fs.base;
            ctx.proc.mm.write(value, &base.to_le_bytes())?;
            Ok(0)
        }
        ARCH_GET_GS => {
            let base = ctx.sregs.gs.base;
            ctx.proc.mm.write(value, &base.to_le_bytes())?;
            Ok(0)
        }
        _ => Err(Errno::EINVAL),
    }
}

fn sys_set_tid_address(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    ctx.thread.clear_child_tid = a.ptr(0);
    Ok(ctx.thread.tid as u64)
}

fn sys_set_robust_list(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    // struct robust_list_head is 24 bytes on x86-64.
    if a.size(1) != 24 {
        return Err(Errno::EINVAL);
    }
    ctx.thread.robust_list = a.ptr(0);
    Ok(0)
}

fn sys_get_robust_list(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    if a.int(0) != 0 && a.int(0) != ctx.thread.tid {
        return Err(Errno::ESRCH);
    }
    let head = ctx.thread.robust_list;
    ctx.proc.mm.write(a.ptr(1), &head.to_le_bytes())?;
    ctx.proc.mm.write(a.ptr(2), &24u64.to_le_bytes())?;
    Ok(0)
}

/// (soft, hard) limits the guest sees.
fn limit(ctx: &SyscallCtx<'_>, resource: u32) -> Result<(u64, u64), Errno> {
    const INF: u64 = u64::MAX;
    Ok(match resource {
        libc::RLIMIT_NOFILE => (ctx.proc.fds.limit(), crate::fd::MAX_NOFILE),
        libc::RLIMIT_STACK => (crate::arch::x86_64::layout::STACK_MAX, INF),
        libc::RLIMIT_AS
        | libc::RLIMIT_DATA
        | libc::RLIMIT_RSS
        | libc::RLIMIT_FSIZE
        | libc::RLIMIT_CPU
        | libc::RLIMIT_MEMLOCK
        | libc::RLIMIT_LOCKS
        | libc::RLIMIT_MSGQUEUE => (INF, INF),
        libc::RLIMIT_CORE => (0, INF),
        libc::RLIMIT_NPROC | libc::RLIMIT_SIGPENDING => (4096, 4096),
        libc::RLIMIT_NICE | libc::RLIMIT_RTPRIO | libc::RLIMIT_RTTIME => (0, 0),
        _ => return Err(Errno::EINVAL),
    })
}

fn set_limit(ctx: &mut SyscallCtx<'_>, resource: u32, soft: u64, hard: u64) -> Result<(), Errno> {
    if soft > hard {
        return Err(Errno::EINVAL);
    }
    let (_, cur_hard) = limit(ctx, resource)?;
    if hard > cur_hard {
        return Err(Errno::EPERM);
    }
    if resource == libc::RLIMIT_NOFILE {
        ctx.proc.fds.set_limit(soft);
    }
    // Other limits are accepted and not enforced beyond what the VMM enforces anyway.
    Ok(())
}

fn sys_getrlimit(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let (soft, hard) = limit(ctx, a.uint(0))?;
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&soft.to_le_bytes());
    b[8..].copy_from_slice(&hard.to_le_bytes());
    ctx.proc.mm.write(a.ptr(1), &b)?;
    Ok(0)
}

fn sys_setrlimit(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let b = ctx.proc.mm.read_vec(a.ptr(1), 16)?;
    let soft = u64::from_le_bytes(b[..8].try_into().map_err(|_| Errno::EFAULT)?);
    let hard = u64::from_le_bytes(b[8..].try_into().map_err(|_| Errno::EFAULT)?);
    set_limit(ctx, a.uint(0), soft, hard)?;
    Ok(0)
}

fn sys_prlimit64(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let pid = a.int(0);
    if pid != 0 && pid != ctx.proc.pid {
        return Err(Errno::ESRCH);
    }
    let resource = a.uint(1);
    let old = limit(ctx, resource)?;
    if a.ptr(2) != 0 {
        let b = ctx.proc.mm.read_vec(a.ptr(2), 16)?;
        let soft = u64::from_le_bytes(b[..8].try_into().map_err(|_| Errno::EFAULT)?);
        let hard = u64::from_le_bytes(b[8..].try_into().map_err(|_| Errno::EFAULT)?);
        set_limit(ctx, resource, soft, hard)?;
    }
    if a.ptr(3) != 0 {
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&old.0.to_le_bytes());
        b[8..].copy_from_slice(&old.1.to_le_bytes());
        ctx.proc.mm.write(a.ptr(3), &b)?;
    }
    Ok(0)
}

fn sys_sched_getaffinity(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let pid = a.int(0);
    if pid != 0 && pid != ctx.proc.pid && pid != ctx.thread.tid {
        return Err(Errno::ESRCH);
    }
    let len = a.size(1);
    if len < 8 || !len.is_multiple_of(8) {
        return Err(Errno::EINVAL);
    }
    // SAFETY: plain data, filled by the call.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer and size of a local.
    if unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) } < 0 {
        return Err(Errno::last());
    }
    // SAFETY: cpu_set_t is a plain bit array.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&set as *const libc::cpu_set_t).cast::<u8>(),
            std::mem::size_of::<libc::cpu_set_t>(),
        )
    };
    let n = len.min(bytes.len());
    ctx.proc.mm.write(a.ptr(2), &bytes[..n])?;
    Ok(n as u64)
}

fn sys_getcpu(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    if a.ptr(0) != 0 {
        ctx.proc.mm.write(a.ptr(0), &0u32.to_le_bytes())?;
    }
    if a.ptr(1) != 0 {
        ctx.proc.mm.write(a.ptr(1), &0u32.to_le_bytes())?;
    }
    Ok(0)
}

fn sys_getrandom(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let flags = a.uint(2);
    if flags & !(libc::GRND_NONBLOCK | libc::GRND_RANDOM | libc::GRND_INSECURE) != 0 {
        return Err(Errno::EINVAL);
    }
    let len = a.size(1).min(1 << 25);
    let iovs = ctx.proc.mm.host_iovecs(a.ptr(0), len, true)?;
    let mut total = 0usize;
    for iov in &iovs {
        // SAFETY: the iovec points into guest memory that host_iovecs checked and populated.
        let n = unsafe { libc::getrandom(iov.iov_base, iov.iov_len, 0) };
        if n < 0 {
            break;
        }
        total += n as usize;
    }
    Ok(total as u64)
}

fn sys_sysinfo(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    // SAFETY: plain data filled by the call.
    let mut si: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a local.
    unsafe { libc::sysinfo(&mut si) };
    // Memory figures are the guest's, not the host's.
    let total = ctx.proc.mm.ram().size();
    let used = ctx.proc.mm.ram().frames_in_use() * crate::memory::PAGE_SIZE;
    si.totalram = total;
    si.freeram = total.saturating_sub(used);
    si.sharedram = 0;
    si.bufferram = 0;
    si.totalswap = 0;
    si.freeswap = 0;
    si.procs = 1;
    si.mem_unit = 1;
    // SAFETY: sysinfo is plain data.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&si as *const libc::sysinfo).cast::<u8>(),
            std::mem::size_of::<libc::sysinfo>(),
        )
    };
    ctx.proc.mm.write(a.ptr(0), bytes)?;
    Ok(0)
}

fn sys_fork(ctx: &mut SyscallCtx<'_>, _: &Args) -> SysResult {
    ctx.control = Control::Fork(ForkRequest::default());
    Ok(0)
}

fn sys_clone(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let flags = a.raw(0);
    let (stack, parent_tid, child_tid, tls) = (a.raw(1), a.ptr(2), a.ptr(3), a.raw(4));
    let has = |f: i32| flags & f as u64 != 0;
    let pick = |f: i32, v: u64| has(f).then_some(v);
    let exit_signal = flags & 0xff;
    let namespaces = libc::CLONE_NEWNS
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUSER
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWCGROUP;
    if has(namespaces) || has(libc::CLONE_PTRACE) || has(libc::CLONE_PIDFD) {
        return Err(Errno::EINVAL);
    }
    if has(libc::CLONE_VM) {
        // A thread: Linux requires SIGHAND with THREAD and VM with SIGHAND.
        if !has(libc::CLONE_THREAD) {
            // Sharing memory with another process (posix_spawn's CLONE_VM|CLONE_VFORK)
            // needs the VM shared across host processes, which a sandbox does not do.
            return Err(Errno::ENOSYS);
        }
        if !has(libc::CLONE_SIGHAND) || exit_signal != 0 {
            return Err(Errno::EINVAL);
        }
        ctx.control = Control::SpawnThread(ThreadRequest {
            stack,
            tls: pick(libc::CLONE_SETTLS, tls),
            parent_settid: pick(libc::CLONE_PARENT_SETTID, parent_tid),
            child_settid: pick(libc::CLONE_CHILD_SETTID, child_tid),
            child_cleartid: pick(libc::CLONE_CHILD_CLEARTID, child_tid),
        });
        return Ok(0);
    }
    if has(libc::CLONE_THREAD) || has(libc::CLONE_SIGHAND) {
        return Err(Errno::EINVAL);
    }
    if exit_signal != 0 && exit_signal != libc::SIGCHLD as u64 {
        return Err(Errno::EINVAL);
    }
    ctx.control = Control::Fork(ForkRequest {
        child_settid: pick(libc::CLONE_CHILD_SETTID, child_tid),
        child_cleartid: pick(libc::CLONE_CHILD_CLEARTID, child_tid),
        parent_settid: pick(libc::CLONE_PARENT_SETTID, parent_tid),
        child_stack: stack,
        tls: pick(libc::CLONE_SETTLS, tls),
    });
    Ok(0)
}

fn sys_wait4(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let (pid, status_ptr, options, rusage) = (a.int(0), a.ptr(1), a.int(2), a.ptr(3));
    if options
        & !(libc::WNOHANG | libc::WUNTRACED | libc::WCONTINUED | libc::__WALL | libc::__WCLONE)
        != 0
    {
        return Err(Errno::EINVAL);
    }
    if status_ptr != 0 {
        ctx.proc.mm.check_range(status_ptr, 4, true)?;
    }
    let mut status = 0i32;
    // Guest processes are host processes (children of this VMM process), so the host's
    // wait4 gives exactly the guest's answer.
    // SAFETY: valid pointer to a local; no rusage requested from the host.
    let r = ctx
        .proc
        .unlocked(|| unsafe { libc::wait4(pid, &mut status, options, std::ptr::null_mut()) });
    if r < 0 {
        return Err(Errno::last());
    }
    if r > 0 && status_ptr != 0 {
        ctx.proc.mm.write(status_ptr, &status.to_le_bytes())?;
    }
    if rusage != 0 {
        ctx.proc.mm.write(rusage, &[0u8; 144])?;
    }
    Ok(r as u64)
}

fn host_ids() -> (u32, u32) {
    // SAFETY: cannot fail.
    unsafe { (libc::getuid(), libc::getgid()) }
}

/// An id argument that names the current id, or -1 (unchanged).
fn same_id(arg: u32, current: u32) -> bool {
    arg == u32::MAX || arg == current
}

/// The guest keeps the identity it started with (the VMM's): a change to it is EPERM, a
/// no-op succeeds, which is what servers that drop privileges to the same user need.
fn keep_ids(ids: &[u32], current: u32) -> SysResult {
    if ids.iter().all(|&i| same_id(i, current)) {
        Ok(0)
    } else {
        Err(Errno::EPERM)
    }
}

fn sys_setuid(_: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    keep_ids(&[a.uint(0)], host_ids().0)
}

fn sys_setgid(_: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    keep_ids(&[a.uint(0)], host_ids().1)
}

fn sys_setreuid(_: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    keep_ids(&[a.uint(0), a.uint(1)], host_ids().0)
}

fn sys_setregid(_: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    keep_ids(&[a.uint(0), a.uint(1)], host_ids().1)
}

fn sys_setresuid(_: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    keep_ids(&[a.uint(0), a.uint(1), a.uint(2)], host_ids().0)
}

fn sys_setresgid(_: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    keep_ids(&[a.uint(0), a.uint(1), a.uint(2)], host_ids().1)
}

fn write_three(ctx: &mut SyscallCtx<'_>, a: &Args, id: u32) -> SysResult {
    for i in 0..3 {
        ctx.proc.mm.write(a.ptr(i), &id.to_le_bytes())?;
    }
    Ok(0)
}

fn sys_getresuid(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    write_three(ctx, a, host_ids().0)
}

fn sys_getresgid(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    write_three(ctx, a, host_ids().1)
}

fn sys_setfsuid(_: &mut SyscallCtx<'_>, _: &Args) -> SysResult {
    // Returns the previous fsuid; it never changes.
    Ok(u64::from(host_ids().0))
}

fn sys_setfsgid(_: &mut SyscallCtx<'_>, _: &Args) -> SysResult {
    Ok(u64::from(host_ids().1))
}

fn sys_getgroups(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    // One supplementary group: the primary one (what a freshly started service has).
    let size = a.int(0);
    if size < 0 {
        return Err(Errno::EINVAL);
    }
    if size == 0 {
        return Ok(1);
    }
    ctx.proc.mm.write(a.ptr(1), &host_ids().1.to_le_bytes())?;
    Ok(1)
}

fn sys_setgroups(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let n = a.size(0);
    if n > 65536 {
        return Err(Errno::EINVAL);
    }
    let raw = ctx.proc.mm.read_vec(a.ptr(1), n * 4)?;
    let gid = host_ids().1;
    let ids: Vec<u32> = raw
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    keep_ids(&ids, gid)
}

fn sys_prctl(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    const PR_SET_PDEATHSIG: i32 = 1;
    const PR_GET_PDEATHSIG: i32 = 2;
    const PR_GET_DUMPABLE: i32 = 3;
    const PR_SET_DUMPABLE: i32 = 4;
    const PR_GET_KEEPCAPS: i32 = 7;
    const PR_SET_KEEPCAPS: i32 = 8;
    const PR_SET_NAME: i32 = 15;
    const PR_GET_NAME: i32 = 16;
    const PR_CAPBSET_READ: i32 = 23;
    const PR_SET_TIMERSLACK: i32 = 29;
    const PR_GET_TIMERSLACK: i32 = 30;
    const PR_SET_NO_NEW_PRIVS: i32 = 38;
    const PR_GET_NO_NEW_PRIVS: i32 = 39;
    let tid = ctx.thread.tid;
    match a.int(0) {
        PR_SET_NAME => {
            let mut name = [0u8; 16];
            let bytes = match ctx.proc.mm.read_cstring(a.ptr(1), 4096) {
                Ok(b) => b,
                Err(Errno::ENAMETOOLONG) => ctx.proc.mm.read_vec(a.ptr(1), 15)?,
                Err(e) => return Err(e),
            };
            let n = bytes.len().min(15);
            name[..n].copy_from_slice(&bytes[..n]);
            ctx.proc.thread_names.insert(tid, name);
            Ok(0)
        }
        PR_GET_NAME => {
            let name = ctx.proc.thread_names.get(&tid).copied().unwrap_or_else(|| {
                let mut n = [0u8; 16];
                let exe = ctx
                    .proc
                    .exe
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
                    .as_bytes();
                let k = exe.len().min(15);
                n[..k].copy_from_slice(&exe[..k]);
                n
            });
            ctx.proc.mm.write(a.ptr(1), &name)?;
            Ok(0)
        }
        PR_GET_DUMPABLE => Ok(1),
        PR_SET_DUMPABLE => match a.raw(1) {
            0 | 1 => Ok(0),
            _ => Err(Errno::EINVAL),
        },
        PR_SET_PDEATHSIG => {
            if a.raw(1) > 64 {
                return Err(Errno::EINVAL);
            }
            Ok(0)
        }
        PR_GET_PDEATHSIG => {
            ctx.proc.mm.write(a.ptr(1), &0i32.to_le_bytes())?;
            Ok(0)
        }
        PR_SET_KEEPCAPS | PR_SET_NO_NEW_PRIVS | PR_SET_TIMERSLACK => Ok(0),
        PR_GET_KEEPCAPS | PR_GET_NO_NEW_PRIVS => Ok(0),
        PR_GET_TIMERSLACK => Ok(50_000),
        // The guest holds no capabilities over the host.
        PR_CAPBSET_READ => Ok(0),
        _ => Err(Errno::EINVAL),
    }
}

fn timeval_at(ctx: &mut SyscallCtx<'_>, ptr: u64) -> Result<Duration, Errno> {
    let b = ctx.proc.mm.read_vec(ptr, 16)?;
    let sec = i64::from_le_bytes(b[..8].try_into().map_err(|_| Errno::EFAULT)?);
    let usec = i64::from_le_bytes(b[8..].try_into().map_err(|_| Errno::EFAULT)?);
    if sec < 0 || !(0..1_000_000).contains(&usec) {
        return Err(Errno::EINVAL);
    }
    Ok(Duration::new(sec as u64, (usec * 1000) as u32))
}

fn timeval_bytes(d: Duration) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&(d.as_secs() as i64).to_le_bytes());
    b[8..].copy_from_slice(&i64::from(d.subsec_micros()).to_le_bytes());
    b
}

/// The current ITIMER_REAL as an itimerval (interval, remaining).
fn itimerval_bytes(t: &Itimer) -> [u8; 32] {
    let remaining = t.deadline.map_or(Duration::ZERO, |d| {
        d.saturating_duration_since(Instant::now())
    });
    // A running timer never reads as zero remaining (Linux rounds up to a tick).
    let remaining = if t.deadline.is_some() && remaining.is_zero() {
        Duration::from_micros(1)
    } else {
        remaining
    };
    let mut b = [0u8; 32];
    b[..16].copy_from_slice(&timeval_bytes(t.interval));
    b[16..].copy_from_slice(&timeval_bytes(remaining));
    b
}

fn sys_getitimer(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    if a.int(0) != libc::ITIMER_REAL {
        return Err(Errno::EINVAL);
    }
    let cur = itimerval_bytes(&ctx.proc.timer.itimer);
    ctx.proc.mm.write(a.ptr(1), &cur)?;
    Ok(0)
}

/// Longest interval timer value honoured (longer ones are clamped).
const ITIMER_MAX: Duration = Duration::from_secs(100 * 365 * 86_400);

fn set_real_timer(ctx: &mut SyscallCtx<'_>, value: Duration, interval: Duration) -> Itimer {
    let interval = interval.min(ITIMER_MAX);
    let new = Itimer {
        // Guest-chosen values: a timer beyond a century is as good as never, and cannot
        // overflow the clock.
        deadline: (!value.is_zero()).then(|| Instant::now() + value.min(ITIMER_MAX)),
        interval,
    };
    let me = ctx.proc.self_ref.clone();
    ctx.proc.timer.set(new, &me)
}

fn sys_setitimer(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    if a.int(0) != libc::ITIMER_REAL {
        return Err(Errno::EINVAL);
    }
    let (interval, value) = if a.ptr(1) == 0 {
        (Duration::ZERO, Duration::ZERO)
    } else {
        (timeval_at(ctx, a.ptr(1))?, timeval_at(ctx, a.ptr(1) + 16)?)
    };
    if a.ptr(2) != 0 {
        ctx.proc.mm.check_range(a.ptr(2), 32, true)?;
    }
    let old = set_real_timer(ctx, value, interval);
    if a.ptr(2) != 0 {
        ctx.proc.mm.write(a.ptr(2), &itimerval_bytes(&old))?;
    }
    Ok(0)
}

fn sys_alarm(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let old = set_real_timer(
        ctx,
        Duration::from_secs(u64::from(a.uint(0))),
        Duration::ZERO,
    );
    // Seconds left on the previous alarm, rounded up (0 if none).
    let left = old.deadline.map_or(0, |d| {
        let r = d.saturating_duration_since(Instant::now());
        r.as_secs() + u64::from(r.subsec_nanos() > 0)
    });
    Ok(left)
}
