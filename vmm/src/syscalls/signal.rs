//! Signal syscalls. Delivery itself happens when the syscall returns (see `sandbox`).

use super::{Args, Control, Support, SysResult, SyscallCtx, SyscallDef};
use crate::errno::Errno;
use crate::signal::{self, AltStack, SigAction, SigInfo};
use crate::syscall_table;

/// This family's syscalls.
pub const SYSCALLS: &[SyscallDef] = syscall_table![
    13 rt_sigaction => Support::Full(sys_rt_sigaction),
    14 rt_sigprocmask => Support::Full(sys_rt_sigprocmask),
    15 rt_sigreturn => Support::Full(sys_rt_sigreturn),
    62 kill => Support::Partial(sys_kill, "Only the sandbox's own process"),
    202 futex => Support::Partial(crate::syscalls::futex::sys_futex, "WAIT, WAKE, WAIT_BITSET, WAKE_BITSET, REQUEUE, CMP_REQUEUE, WAKE_OP; no PI futexes"),
    34 pause => Support::Full(sys_pause),
    127 rt_sigpending => Support::Full(sys_rt_sigpending),
    130 rt_sigsuspend => Support::Full(sys_rt_sigsuspend),
    131 sigaltstack => Support::Full(sys_sigaltstack),
    200 tkill => Support::Full(sys_tkill),
    234 tgkill => Support::Partial(sys_tgkill, "Only threads of the sandbox's own process"),
];

const SI_USER: i32 = 0;
const SI_TKILL: i32 = -6;
const MINSIGSTKSZ: u64 = 2048;

fn check_sigsetsize(a: &Args, i: usize) -> Result<(), Errno> {
    if a.size(i) != 8 {
        return Err(Errno::EINVAL);
    }
    Ok(())
}

fn sys_rt_sigaction(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    check_sigsetsize(a, 3)?;
    let sig = a.int(0);
    if !(1..=signal::NSIG as i32).contains(&sig) {
        return Err(Errno::EINVAL);
    }
    let new = if a.ptr(1) != 0 {
        Some(ctx.proc.mm.read_obj::<SigAction>(a.ptr(1))?)
    } else {
        None
    };
    let old = ctx.proc.signals.get(sig);
    if let Some(mut act) = new {
        // SIGKILL and SIGSTOP can never be blocked during a handler either.
        act.mask &= !(signal::bit(libc::SIGKILL) | signal::bit(libc::SIGSTOP));
        ctx.proc.signals.set(sig, act)?;
        if sig == libc::SIGCHLD {
            follow_child_reaping(&act);
        }
    }
    if a.ptr(2) != 0 {
        ctx.proc.mm.write_obj(a.ptr(2), &old)?;
    }
    Ok(0)
}

fn sys_rt_sigprocmask(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    check_sigsetsize(a, 3)?;
    let old = ctx.thread.sigmask;
    if a.ptr(1) != 0 {
        let set: u64 = ctx.proc.mm.read_obj(a.ptr(1))?;
        let new = match a.int(0) {
            libc::SIG_BLOCK => old | set,
            libc::SIG_UNBLOCK => old & !set,
            libc::SIG_SETMASK => set,
            _ => return Err(Errno::EINVAL),
        };
        ctx.thread.sigmask = new & !(signal::bit(libc::SIGKILL) | signal::bit(libc::SIGSTOP));
    }
    if a.ptr(2) != 0 {
        ctx.proc.mm.write_obj(a.ptr(2), &old)?;
    }
    release_unblocked(ctx);
    Ok(0)
}

/// Pending signals that are no longer blocked are raised when the syscall returns.
pub(super) fn release_unblocked(ctx: &mut SyscallCtx<'_>) {
    let mask = ctx.thread.sigmask;
    let (ready, still): (Vec<SigInfo>, Vec<SigInfo>) = ctx
        .thread
        .pending
        .drain(..)
        .partition(|s| mask & signal::bit(s.signo) == 0);
    ctx.thread.pending = still;
    ctx.raised.extend(ready);
}

fn sys_rt_sigpending(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    if a.size(1) > 8 {
        return Err(Errno::EINVAL);
    }
    let set = ctx
        .thread
        .pending
        .iter()
        .fold(0u64, |m, s| m | signal::bit(s.signo));
    ctx.proc
        .mm
        .write(a.ptr(0), &set.to_le_bytes()[..a.size(1)])?;
    Ok(0)
}

fn sys_rt_sigreturn(ctx: &mut SyscallCtx<'_>, _: &Args) -> SysResult {
    let restored = signal::sigreturn(&mut ctx.proc.mm, ctx.regs)?;
    ctx.thread.sigmask = restored.mask & !(signal::bit(libc::SIGKILL) | signal::bit(libc::SIGSTOP));
    ctx.control = Control::Replaced(restored.xsave);
    release_unblocked(ctx);
    Ok(0)
}

fn sys_sigaltstack(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let sp = ctx.regs.rsp;
    let old = ctx.thread.altstack.reported(sp);
    if a.ptr(0) != 0 {
        let new: AltStack = ctx.proc.mm.read_obj(a.ptr(0))?;
        if ctx.thread.altstack.contains(sp) {
            return Err(Errno::EPERM);
        }
        const SS_AUTODISARM: i32 = 1 << 31;
        match new.flags & !SS_AUTODISARM {
            0 => {
                if new.size < MINSIGSTKSZ {
                    return Err(Errno::ENOMEM);
                }
                ctx.thread.altstack = AltStack { flags: 0, ..new };
            }
            2 => ctx.thread.altstack = AltStack::disabled(),
            _ => return Err(Errno::EINVAL),
        }
    }
    if a.ptr(1) != 0 {
        ctx.proc.mm.write_obj(a.ptr(1), &old)?;
    }
    Ok(0)
}

/// Send `sig` to thread `tid` of this process (`None`: to the process). A signal for the
/// calling thread that it does not block is delivered as the syscall returns; others are
/// queued and the target thread is interrupted.
fn send(ctx: &mut SyscallCtx<'_>, tid: Option<i32>, sig: i32, code: i32) -> SysResult {
    if !(0..=signal::NSIG as i32).contains(&sig) {
        return Err(Errno::EINVAL);
    }
    if let Some(t) = tid {
        if !ctx.proc.threads.contains_key(&t) {
            return Err(Errno::ESRCH);
        }
    }
    if sig == 0 {
        return Ok(0);
    }
    // SAFETY: cannot fail.
    let uid = unsafe { libc::getuid() };
    let info = SigInfo {
        signo: sig,
        code,
        addr: 0,
        pid: ctx.proc.pid,
        uid,
        trapno: 0,
        err: 0,
    };
    let me = ctx.thread.tid;
    let for_me = tid == Some(me) || (tid.is_none() && ctx.thread.sigmask & signal::bit(sig) == 0);
    if for_me {
        ctx.raised.push(info);
    } else {
        ctx.proc.post_signal(tid, info);
    }
    Ok(0)
}

fn sys_kill(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let pid = a.int(0);
    if pid == ctx.proc.pid || pid == 0 || pid == -1 || pid == -ctx.proc.pid {
        send(ctx, None, a.int(1), SI_USER)
    } else {
        if !(0..=signal::NSIG as i32).contains(&a.int(1)) {
            return Err(Errno::EINVAL);
        }
        Err(Errno::ESRCH)
    }
}

fn sys_tgkill(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let (tgid, tid) = (a.int(0), a.int(1));
    if tgid <= 0 || tid <= 0 {
        return Err(Errno::EINVAL);
    }
    if tgid != ctx.proc.pid {
        return Err(Errno::ESRCH);
    }
    send(ctx, Some(tid), a.int(2), SI_TKILL)
}

fn sys_tkill(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let tid = a.int(0);
    if tid <= 0 {
        return Err(Errno::EINVAL);
    }
    send(ctx, Some(tid), a.int(1), SI_TKILL)
}

/// Guest children are host children of this VMM process. When the guest says it will never
/// wait for them (SIGCHLD ignored, or SA_NOCLDWAIT), let the host reap them, or they would
/// stay zombies.
fn follow_child_reaping(act: &SigAction) {
    const SA_NOCLDWAIT: u64 = 2;
    let auto_reap = act.handler == signal::SIG_IGN || act.flags & SA_NOCLDWAIT != 0;
    let host = if auto_reap {
        libc::SIG_IGN
    } else {
        libc::SIG_DFL
    };
    // SAFETY: changes only this process's SIGCHLD disposition.
    unsafe { libc::signal(libc::SIGCHLD, host) };
}

/// Sleep until a signal that `mask` does not block is pending for the calling thread.
/// `Err(EINTR)` if a rollback happened meanwhile (return at once, touching nothing).
fn wait_for_signal(ctx: &mut SyscallCtx<'_>, mask: u64) -> Result<(), Errno> {
    let tid = ctx.thread.tid;
    let w = crate::futex::Waiter::new(tid, u32::MAX);
    if let Some(t) = ctx.proc.threads.get_mut(&tid) {
        t.waiting = Some(w.clone());
        t.sigmask = mask;
    }
    ctx.enter_wait();
    loop {
        let own_pending = ctx
            .thread
            .pending
            .iter()
            .any(|s| mask & signal::bit(s.signo) == 0);
        // A rollback wakes the thread to take its order.
        let rolled_back =
            w.interrupted.load(std::sync::atomic::Ordering::SeqCst) && ctx.world.stop_requested();
        if own_pending || rolled_back || ctx.proc.has_deliverable(tid, mask) {
            break;
        }
        ctx.proc.wait(&w.cv, None);
    }
    if let Some(t) = ctx.proc.threads.get_mut(&tid) {
        t.waiting = None;
    }
    ctx.leave_wait()
}

fn sys_pause(ctx: &mut SyscallCtx<'_>, _: &Args) -> SysResult {
    let mask = ctx.thread.sigmask;
    wait_for_signal(ctx, mask)?;
    Err(Errno::EINTR)
}

fn sys_rt_sigsuspend(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    check_sigsetsize(a, 1)?;
    let set: u64 = ctx.proc.mm.read_obj(a.ptr(0))?;
    let mask = set & !(signal::bit(libc::SIGKILL) | signal::bit(libc::SIGSTOP));
    // The temporary mask holds until a handler runs; the handler's frame then restores the
    // mask from before the call, as Linux does.
    ctx.thread.suspend_restore = Some(ctx.thread.sigmask);
    ctx.thread.sigmask = mask;
    wait_for_signal(ctx, mask)?;
    release_unblocked(ctx);
    Err(Errno::EINTR)
}
