//! Clocks and sleeping, on the host's clocks (the guest has no vDSO: every read is a
//! syscall). Sleeps block the VMM thread, which is the guest's only thread.

use super::{Args, Support, SysResult, SyscallCtx, SyscallDef};
use crate::errno::Errno;
use crate::syscall_table;

/// This family's syscalls.
pub const SYSCALLS: &[SyscallDef] = syscall_table![
    35 nanosleep => Support::Full(sys_nanosleep),
    96 gettimeofday => Support::Full(sys_gettimeofday),
    201 time => Support::Full(sys_time),
    228 clock_gettime => Support::Partial(sys_clock_gettime, "CPU-time clocks measure the VMM's process/vCPU thread; other processes' clocks and fd clocks are EINVAL"),
    229 clock_getres => Support::Full(sys_clock_getres),
    230 clock_nanosleep => Support::Full(sys_clock_nanosleep),
    283 timerfd_create => Support::Full(sys_timerfd_create),
    286 timerfd_settime => Support::Full(sys_timerfd_settime),
    287 timerfd_gettime => Support::Full(sys_timerfd_gettime),
];

const NSEC_PER_SEC: i64 = 1_000_000_000;
/// Linux's CPUCLOCK_PERTHREAD_MASK and CPUCLOCK_CLOCK_MASK (posix-timers.h).
const CPUCLOCK_PERTHREAD: i32 = 4;
const CPUCLOCK_CLOCK_MASK: i32 = 3;
/// A negative clock id whose low bits are this names a clock by fd (PTP devices).
const CLOCKFD: i32 = 3;

/// The host clock that answers for guest clock `id`, or EINVAL. `pid`/`tid` are the
/// guest's own: CPU-time clocks of the caller (as `clock_getcpuclockid(0)` and
/// `pthread_getcpuclockid(self)` encode them) map to the VMM's process and vCPU thread
/// clocks, which is where the guest's time is spent; other processes' CPU clocks and fd
/// (PTP) clocks are refused, as they would name host objects.
pub(crate) fn host_clock(id: i32, pid: i32, tid: i32) -> Result<libc::clockid_t, Errno> {
    match id {
        libc::CLOCK_REALTIME
        | libc::CLOCK_MONOTONIC
        | libc::CLOCK_PROCESS_CPUTIME_ID
        | libc::CLOCK_THREAD_CPUTIME_ID
        | libc::CLOCK_MONOTONIC_RAW
        | libc::CLOCK_REALTIME_COARSE
        | libc::CLOCK_MONOTONIC_COARSE
        | libc::CLOCK_BOOTTIME
        | libc::CLOCK_REALTIME_ALARM
        | libc::CLOCK_BOOTTIME_ALARM
        | libc::CLOCK_TAI => Ok(id),
        id if id < 0 => {
            if id & CPUCLOCK_CLOCK_MASK == CLOCKFD {
                return Err(Errno::EINVAL);
            }
            // The id is `~pid << 3 | flags`; pid 0 means the caller.
            let who = !(id >> 3);
            if id & CPUCLOCK_PERTHREAD != 0 {
                if who == 0 || who == tid {
                    return Ok(libc::CLOCK_THREAD_CPUTIME_ID);
                }
            } else if who == 0 || who == pid {
                return Ok(libc::CLOCK_PROCESS_CPUTIME_ID);
            }
            Err(Errno::EINVAL)
        }
        _ => Err(Errno::EINVAL),
    }
}

/// Encode a `struct timespec` as the guest ABI lays it out.
pub(crate) fn timespec_bytes(ts: &libc::timespec) -> [u8; 16] {
    let mut b = [0u8; 16];
    b[..8].copy_from_slice(&ts.tv_sec.to_le_bytes());
    b[8..].copy_from_slice(&ts.tv_nsec.to_le_bytes());
    b
}

/// Decode a guest `struct timespec` without validating it.
pub(crate) fn timespec_from(b: &[u8; 16]) -> libc::timespec {
    let (s, ns) = b.split_at(8);
    let word = |w: &[u8]| i64::from_le_bytes(w.try_into().unwrap_or([0; 8]));
    libc::timespec {
        tv_sec: word(s),
        tv_nsec: word(ns),
    }
}

/// Is `ts` a valid duration/time (Linux's timespec64_valid)?
pub(crate) fn timespec_valid(ts: &libc::timespec) -> bool {
    ts.tv_sec >= 0 && (0..NSEC_PER_SEC).contains(&ts.tv_nsec)
}

/// Read and validate a guest `struct timespec`: EFAULT if unreadable, EINVAL if invalid.
pub(crate) fn read_timespec(ctx: &mut SyscallCtx<'_>, ptr: u64) -> Result<libc::timespec, Errno> {
    let mut b = [0u8; 16];
    ctx.proc.mm.read(ptr, &mut b)?;
    let ts = timespec_from(&b);
    if !timespec_valid(&ts) {
        return Err(Errno::EINVAL);
    }
    Ok(ts)
}

/// The host's reading of `clock`.
pub(crate) fn host_now(clock: libc::clockid_t) -> Result<libc::timespec, Errno> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable local timespec.
    if unsafe { libc::clock_gettime(clock, &mut ts) } < 0 {
        return Err(Errno::last());
    }
    Ok(ts)
}

fn sys_clock_gettime(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let clock = host_clock(a.int(0), ctx.proc.pid, ctx.thread.tid)?;
    let ts = host_now(clock)?;
    ctx.proc.mm.write(a.ptr(1), &timespec_bytes(&ts))?;
    Ok(0)
}

fn sys_clock_getres(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let clock = host_clock(a.int(0), ctx.proc.pid, ctx.thread.tid)?;
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable local timespec.
    if unsafe { libc::clock_getres(clock, &mut ts) } < 0 {
        return Err(Errno::last());
    }
    // A NULL result pointer only validates the clock, as on Linux.
    if a.ptr(1) != 0 {
        ctx.proc.mm.write(a.ptr(1), &timespec_bytes(&ts))?;
    }
    Ok(0)
}

fn sys_gettimeofday(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    if a.ptr(0) != 0 {
        let ts = host_now(libc::CLOCK_REALTIME)?;
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&ts.tv_sec.to_le_bytes());
        b[8..].copy_from_slice(&(ts.tv_nsec / 1000).to_le_bytes());
        ctx.proc.mm.write(a.ptr(0), &b)?;
    }
    if a.ptr(1) != 0 {
        // struct timezone: the kernel's sys_tz, which nothing sets on a modern system (UTC).
        ctx.proc.mm.write(a.ptr(1), &[0u8; 8])?;
    }
    Ok(0)
}

fn sys_time(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let secs = host_now(libc::CLOCK_REALTIME)?.tv_sec;
    if a.ptr(0) != 0 {
        ctx.proc.mm.write(a.ptr(0), &secs.to_le_bytes())?;
    }
    Ok(secs as u64)
}

/// Sleep on the host. Returns the remaining time when interrupted (a signal to the VMM).
fn host_sleep(
    clock: libc::clockid_t,
    flags: i32,
    req: &libc::timespec,
) -> Result<(), (Errno, libc::timespec)> {
    let mut rem = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // The raw syscall: glibc's wrapper answers some clocks itself, differently from the
    // kernel (CLOCK_THREAD_CPUTIME_ID).
    // SAFETY: `req` and `rem` are valid local timespecs.
    let r = unsafe { libc::syscall(libc::SYS_clock_nanosleep, clock, flags, req, &mut rem) };
    if r == 0 {
        Ok(())
    } else {
        Err((Errno::last(), rem))
    }
}

/// A relative sleep of `req`, shortened to what is left of it if this call was stopped for a
/// checkpoint and issued again.
fn remaining_after_stop(ctx: &mut SyscallCtx<'_>, req: libc::timespec) -> libc::timespec {
    if req.tv_sec < 0 || !(0..1_000_000_000).contains(&req.tv_nsec) {
        return req; // the host answers EINVAL
    }
    let total = std::time::Duration::new(req.tv_sec as u64, req.tv_nsec as u32);
    let Some(end) = ctx.deadline_after(total) else {
        return req;
    };
    let left = end.saturating_duration_since(std::time::Instant::now());
    libc::timespec {
        tv_sec: left.as_secs() as libc::time_t,
        tv_nsec: libc::c_long::from(left.subsec_nanos() as i32),
    }
}

fn sys_nanosleep(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let req = read_timespec(ctx, a.ptr(0))?;
    let req = remaining_after_stop(ctx, req);
    // Linux's nanosleep measures CLOCK_MONOTONIC.
    match ctx.wait_unlocked(|| host_sleep(libc::CLOCK_MONOTONIC, 0, &req))? {
        Ok(()) => Ok(0),
        Err((e, rem)) => {
            // Only an interrupted sleep reports what is left (Linux leaves *rem alone
            // otherwise).
            if e == Errno::EINTR && a.ptr(1) != 0 {
                ctx.proc.mm.write(a.ptr(1), &timespec_bytes(&rem))?;
            }
            Err(e)
        }
    }
}

fn sys_clock_nanosleep(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let id = a.int(0);
    // Linux refuses to sleep on a thread's CPU clock named by tid (EINVAL); the host
    // answers CLOCK_THREAD_CPUTIME_ID itself (EOPNOTSUPP).
    if id < 0 && id & CPUCLOCK_PERTHREAD != 0 {
        return Err(Errno::EINVAL);
    }
    let clock = host_clock(id, ctx.proc.pid, ctx.thread.tid)?;
    let flags = a.int(1) & libc::TIMER_ABSTIME;
    let mut req = read_timespec(ctx, a.ptr(2))?;
    if flags == 0 {
        req = remaining_after_stop(ctx, req);
    }
    match ctx.wait_unlocked(|| host_sleep(clock, flags, &req))? {
        Ok(()) => Ok(0),
        Err((e, rem)) => {
            if e == Errno::EINTR && flags == 0 && a.ptr(3) != 0 {
                ctx.proc.mm.write(a.ptr(3), &timespec_bytes(&rem))?;
            }
            Err(e)
        }
    }
}

// ---------------------------------------------------------------------------------------
// timerfd: host timer fds (reads, polls and epoll work on them as on any host fd).

const ITIMERSPEC_SIZE: usize = 32;

fn sys_timerfd_create(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let (clock, flags) = (a.int(0), a.int(1));
    if flags & !(libc::TFD_CLOEXEC | libc::TFD_NONBLOCK) != 0 {
        return Err(Errno::EINVAL);
    }
    // SAFETY: integer arguments; the result is checked.
    let fd = unsafe { libc::timerfd_create(clock, flags | libc::TFD_CLOEXEC) };
    if fd < 0 {
        return Err(Errno::last());
    }
    // SAFETY: a new fd we own.
    let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let file = crate::fd::OpenFile::new(owned, crate::fd::FileKind::Host, None);
    ctx.proc
        .fds
        .insert(file, flags & libc::TFD_CLOEXEC != 0)
        .map(|g| g as u64)
}

fn itimerspec_from(bytes: &[u8]) -> libc::itimerspec {
    let w = |i: usize| i64::from_le_bytes(bytes[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
    libc::itimerspec {
        it_interval: libc::timespec {
            tv_sec: w(0),
            tv_nsec: w(1),
        },
        it_value: libc::timespec {
            tv_sec: w(2),
            tv_nsec: w(3),
        },
    }
}

fn itimerspec_bytes(t: &libc::itimerspec) -> [u8; ITIMERSPEC_SIZE] {
    let mut b = [0u8; ITIMERSPEC_SIZE];
    for (i, v) in [
        t.it_interval.tv_sec,
        t.it_interval.tv_nsec,
        t.it_value.tv_sec,
        t.it_value.tv_nsec,
    ]
    .into_iter()
    .enumerate()
    {
        b[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    b
}

fn sys_timerfd_settime(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let file = ctx.proc.fds.get(a.fd(0))?;
    let new = itimerspec_from(&ctx.proc.mm.read_vec(a.ptr(2), ITIMERSPEC_SIZE)?);
    if a.ptr(3) != 0 {
        ctx.proc
            .mm
            .check_range(a.ptr(3), ITIMERSPEC_SIZE as u64, true)?;
    }
    // SAFETY: plain data, filled by the call.
    let mut old: libc::itimerspec = unsafe { std::mem::zeroed() };
    // SAFETY: a host fd we hold, pointers to locals; the host validates fd kind and values.
    if unsafe { libc::timerfd_settime(file.host_fd(), a.int(1), &new, &mut old) } < 0 {
        return Err(Errno::last());
    }
    if a.ptr(3) != 0 {
        ctx.proc.mm.write(a.ptr(3), &itimerspec_bytes(&old))?;
    }
    Ok(0)
}

fn sys_timerfd_gettime(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let file = ctx.proc.fds.get(a.fd(0))?;
    // SAFETY: plain data, filled by the call.
    let mut cur: libc::itimerspec = unsafe { std::mem::zeroed() };
    // SAFETY: a host fd we hold, pointer to a local.
    if unsafe { libc::timerfd_gettime(file.host_fd(), &mut cur) } < 0 {
        return Err(Errno::last());
    }
    ctx.proc.mm.write(a.ptr(1), &itimerspec_bytes(&cur))?;
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clock_ids_follow_linux() {
        assert_eq!(host_clock(libc::CLOCK_MONOTONIC, 10, 10), Ok(1));
        assert_eq!(host_clock(libc::CLOCK_TAI, 10, 10), Ok(11));
        assert_eq!(host_clock(10, 10, 10), Err(Errno::EINVAL));
        assert_eq!(host_clock(12, 10, 10), Err(Errno::EINVAL));
        // clock_getcpuclockid(0) and (own pid): CPUCLOCK_SCHED of the process.
        let proc_clock = |pid: i32| (!pid << 3) | 2;
        assert_eq!(
            host_clock(proc_clock(0), 10, 10),
            Ok(libc::CLOCK_PROCESS_CPUTIME_ID)
        );
        assert_eq!(
            host_clock(proc_clock(10), 10, 10),
            Ok(libc::CLOCK_PROCESS_CPUTIME_ID)
        );
        assert_eq!(host_clock(proc_clock(11), 10, 10), Err(Errno::EINVAL));
        // pthread_getcpuclockid: per-thread flag.
        let thread_clock = |tid: i32| (!tid << 3) | 4 | 2;
        assert_eq!(
            host_clock(thread_clock(10), 10, 10),
            Ok(libc::CLOCK_THREAD_CPUTIME_ID)
        );
        assert_eq!(host_clock(thread_clock(99), 10, 10), Err(Errno::EINVAL));
        // FD_TO_CLOCKID(3): a clock named by fd.
        assert_eq!(host_clock((!3 << 3) | 3, 10, 10), Err(Errno::EINVAL));
    }

    #[test]
    fn timespec_validity_and_layout() {
        let ok = libc::timespec {
            tv_sec: 1,
            tv_nsec: 999_999_999,
        };
        assert!(timespec_valid(&ok));
        assert!(!timespec_valid(&libc::timespec {
            tv_sec: 0,
            tv_nsec: NSEC_PER_SEC
        }));
        assert!(!timespec_valid(&libc::timespec {
            tv_sec: -1,
            tv_nsec: 0
        }));
        assert!(!timespec_valid(&libc::timespec {
            tv_sec: 0,
            tv_nsec: -1
        }));
        let b = timespec_bytes(&ok);
        let back = timespec_from(&b);
        assert_eq!((back.tv_sec, back.tv_nsec), (1, 999_999_999));
    }
}
