//! futex(2): waits sleep on the process's futex table (see `crate::futex`), so the value
//! check and the queueing happen under the process lock that wakers also take.

use std::time::{Duration, Instant};

use super::{Args, SysResult, SyscallCtx};
use crate::errno::Errno;
use crate::futex::Waiter;

const FUTEX_WAIT: i32 = 0;
const FUTEX_WAKE: i32 = 1;
const FUTEX_REQUEUE: i32 = 3;
const FUTEX_CMP_REQUEUE: i32 = 4;
const FUTEX_WAKE_OP: i32 = 5;
const FUTEX_WAIT_BITSET: i32 = 9;
const FUTEX_WAKE_BITSET: i32 = 10;
const FUTEX_PRIVATE_FLAG: i32 = 128;
const FUTEX_CLOCK_REALTIME: i32 = 256;

fn read_timespec(ctx: &mut SyscallCtx<'_>, ptr: u64) -> Result<Option<Duration>, Errno> {
    if ptr == 0 {
        return Ok(None);
    }
    let b = ctx.proc.mm.read_vec(ptr, 16)?;
    let sec = i64::from_le_bytes(b[..8].try_into().map_err(|_| Errno::EFAULT)?);
    let nsec = i64::from_le_bytes(b[8..].try_into().map_err(|_| Errno::EFAULT)?);
    if sec < 0 || !(0..1_000_000_000).contains(&nsec) {
        return Err(Errno::EINVAL);
    }
    Ok(Some(Duration::new(sec as u64, nsec as u32)))
}

fn clock_now(clock: libc::clockid_t) -> Duration {
    // SAFETY: plain data written by the call.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer to a local.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

fn wait(
    ctx: &mut SyscallCtx<'_>,
    addr: u64,
    val: u32,
    deadline: Option<Instant>,
    bitset: u32,
) -> SysResult {
    if bitset == 0 {
        return Err(Errno::EINVAL);
    }
    let cur: u32 = ctx.proc.mm.read_obj(addr)?;
    if cur != val {
        return Err(Errno::EAGAIN);
    }
    let tid = ctx.thread.tid;
    let w = Waiter::new(tid, bitset);
    ctx.proc.futexes.enqueue(addr, w.clone());
    if let Some(t) = ctx.proc.threads.get_mut(&tid) {
        t.waiting = Some(w.clone());
    }
    let mask = ctx.thread.sigmask;
    ctx.enter_wait();
    let result = loop {
        if w.woken.load(std::sync::atomic::Ordering::SeqCst) {
            break Ok(0);
        }
        if w.interrupted.load(std::sync::atomic::Ordering::SeqCst)
            || ctx.proc.has_deliverable(tid, mask)
        {
            break Err(Errno::EINTR);
        }
        let remaining = match deadline {
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(r) if !r.is_zero() => Some(r),
                _ => break Err(Errno::ETIMEDOUT),
            },
            None => None,
        };
        ctx.proc.wait(&w.cv, remaining);
    };
    if result.is_err() {
        ctx.proc.futexes.remove(addr, &w);
    }
    if let Some(t) = ctx.proc.threads.get_mut(&tid) {
        t.waiting = None;
    }
    ctx.leave_wait()?;
    result
}

/// FUTEX_WAKE_OP's operation on the second word; returns the old value.
fn wake_op(ctx: &mut SyscallCtx<'_>, addr2: u64, encoded: u32) -> Result<bool, Errno> {
    let op = (encoded >> 28) & 0x7;
    let shift_arg = (encoded >> 28) & 0x8 != 0;
    let cmp = (encoded >> 24) & 0xf;
    let mut oparg = (encoded >> 12) & 0xfff;
    let cmparg = encoded & 0xfff;
    if shift_arg {
        if oparg > 31 {
            return Err(Errno::EINVAL);
        }
        oparg = 1 << oparg;
    }
    let old: u32 = ctx.proc.mm.read_obj(addr2)?;
    let new = match op {
        0 => oparg,
        1 => old.wrapping_add(oparg),
        2 => old | oparg,
        3 => old & !oparg,
        4 => old ^ oparg,
        _ => return Err(Errno::ENOSYS),
    };
    ctx.proc.mm.write_obj(addr2, &new)?;
    let (o, c) = (old as i32, cmparg as i32);
    Ok(match cmp {
        0 => o == c,
        1 => o != c,
        2 => o < c,
        3 => o <= c,
        4 => o > c,
        5 => o >= c,
        _ => return Err(Errno::ENOSYS),
    })
}

pub(crate) fn sys_futex(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let (addr, op, val) = (a.ptr(0), a.int(1), a.uint(2));
    let (timeout_or_val2, addr2, val3) = (a.raw(3), a.ptr(4), a.uint(5));
    if addr % 4 != 0 {
        return Err(Errno::EINVAL);
    }
    let cmd = op & !(FUTEX_PRIVATE_FLAG | FUTEX_CLOCK_REALTIME);
    match cmd {
        FUTEX_WAIT => {
            // A timeout past what the clock can represent is a wait without a timeout.
            let deadline = match read_timespec(ctx, timeout_or_val2)? {
                Some(d) => ctx.deadline_after(d),
                None => None,
            };
            wait(ctx, addr, val, deadline, u32::MAX)
        }
        FUTEX_WAIT_BITSET => {
            // An absolute time on the chosen clock, turned into a deadline on ours.
            let deadline = read_timespec(ctx, timeout_or_val2)?.and_then(|abs| {
                let clock = if op & FUTEX_CLOCK_REALTIME != 0 {
                    libc::CLOCK_REALTIME
                } else {
                    libc::CLOCK_MONOTONIC
                };
                Instant::now().checked_add(abs.saturating_sub(clock_now(clock)))
            });
            wait(ctx, addr, val, deadline, val3)
        }
        FUTEX_WAKE => Ok(u64::from(ctx.proc.futexes.wake(addr, val, u32::MAX))),
        FUTEX_WAKE_BITSET => {
            if val3 == 0 {
                return Err(Errno::EINVAL);
            }
            Ok(u64::from(ctx.proc.futexes.wake(addr, val, val3)))
        }
        FUTEX_REQUEUE | FUTEX_CMP_REQUEUE => {
            if addr2 % 4 != 0 {
                return Err(Errno::EINVAL);
            }
            if cmd == FUTEX_CMP_REQUEUE {
                let cur: u32 = ctx.proc.mm.read_obj(addr)?;
                if cur != val3 {
                    return Err(Errno::EAGAIN);
                }
            }
            let n_move = u32::try_from(timeout_or_val2).unwrap_or(u32::MAX);
            Ok(u64::from(
                ctx.proc.futexes.requeue(addr, addr2, val, n_move),
            ))
        }
        FUTEX_WAKE_OP => {
            if addr2 % 4 != 0 {
                return Err(Errno::EINVAL);
            }
            let wake2 = wake_op(ctx, addr2, val3)?;
            let mut n = ctx.proc.futexes.wake(addr, val, u32::MAX);
            if wake2 {
                n += ctx.proc.futexes.wake(
                    addr2,
                    u32::try_from(timeout_or_val2).unwrap_or(u32::MAX),
                    u32::MAX,
                );
            }
            Ok(u64::from(n))
        }
        _ => Err(Errno::ENOSYS),
    }
}
