//! Readiness: epoll, poll and select, on the host's implementations.
//!
//! Guest fds are translated to the host fds behind them; epoll's 64-bit user data is opaque
//! and passes through, so epoll results need no translation. Waits block the VMM thread
//! (the guest's only thread). Signal masks given to the `p*` variants are validated but
//! have no effect: nothing delivers signals asynchronously to a guest yet.
//!
//! The rescue-window journal (`crate::journal`) adds to the host's answers: a file with
//! replayed input or connections to accept again is readable at once (an edge-triggered
//! or one-shot epoll entry reports it once per rollback), and a wait for input that would
//! block on a file holding output first commits that output (its peer may be waiting
//! for it).

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::time::{read_timespec, timespec_bytes};
use super::{Args, Support, SysResult, SyscallCtx, SyscallDef};
use crate::arch::x86_64::layout;
use crate::errno::{check, Errno};
use crate::fd::OpenFile;
use crate::journal;
use crate::signal;
use crate::syscall_table;

/// This family's syscalls.
pub const SYSCALLS: &[SyscallDef] = syscall_table![
    7 poll => Support::Full(sys_poll),
    23 select => Support::Full(sys_select),
    213 epoll_create => Support::Full(sys_epoll_create),
    232 epoll_wait => Support::Full(sys_epoll_wait),
    233 epoll_ctl => Support::Partial(sys_epoll_ctl, "Registrations are per open file: two dup'ed guest fds of one file cannot both be added (EEXIST)"),
    270 pselect6 => Support::Full(sys_pselect6),
    271 ppoll => Support::Full(sys_ppoll),
    281 epoll_pwait => Support::Full(sys_epoll_pwait),
    291 epoll_create1 => Support::Full(sys_epoll_create1),
    441 epoll_pwait2 => Support::Full(sys_epoll_pwait2),
];

/// Size of `struct epoll_event` on x86-64 (packed: u32 events, u64 data).
const EPOLL_EVENT_SIZE: usize = 12;
/// Most events one wait collects; a wait may return fewer than are ready, so this only
/// bounds the guest memory populated and the bounce buffer.
const MAX_EVENTS_PER_WAIT: usize = 1024;
/// Size of `struct pollfd`.
const POLLFD_SIZE: usize = 8;
/// The kernel's sigset_t (what `sigsetsize` must be).
const SIGSET_SIZE: u64 = 8;
/// epoll_pwait2 (not in the libc crate).
const SYS_EPOLL_PWAIT2: libc::c_long = 441;

// Linux's poll bits (asm-generic/poll.h), as i16 like `pollfd.events`.
const POLLIN: i16 = 0x1;
const POLLPRI: i16 = 0x2;
const POLLOUT: i16 = 0x4;
const POLLERR: i16 = 0x8;
const POLLHUP: i16 = 0x10;
const POLLNVAL: i16 = 0x20;
const POLLRDNORM: i16 = 0x40;
const POLLRDBAND: i16 = 0x80;
const POLLWRNORM: i16 = 0x100;
const POLLWRBAND: i16 = 0x200;
/// What select counts as readable, writable, exceptional (fs/select.c).
const POLLIN_SET: i16 = POLLRDNORM | POLLRDBAND | POLLIN | POLLHUP | POLLERR;
const POLLOUT_SET: i16 = POLLWRBAND | POLLWRNORM | POLLOUT | POLLERR;
const POLLEX_SET: i16 = POLLPRI;

/// Install a `p*` call's signal mask for the duration of the wait, as Linux does: the size
/// must be the kernel's and the mask readable. The thread's mask comes back when the call
/// returns, or through the frame of a handler the wait ended for (as for rt_sigsuspend). A
/// signal the new mask unblocks that is already pending ends the call at once with EINTR.
fn apply_sigmask(ctx: &mut SyscallCtx<'_>, ptr: u64, size: u64) -> Result<(), Errno> {
    if ptr == 0 {
        return Ok(());
    }
    if size != SIGSET_SIZE {
        return Err(Errno::EINVAL);
    }
    let set: u64 = ctx.proc.mm.read_obj(ptr)?;
    let mask = set & !(signal::bit(libc::SIGKILL) | signal::bit(libc::SIGSTOP));
    let tid = ctx.thread.tid;
    ctx.thread.suspend_restore = Some(ctx.thread.sigmask);
    ctx.thread.sigmask = mask;
    // Signals from other threads and the operator are routed by this copy of the mask.
    if let Some(t) = ctx.proc.threads.get_mut(&tid) {
        t.sigmask = mask;
    }
    let own_ready = ctx
        .thread
        .pending
        .iter()
        .any(|s| mask & signal::bit(s.signo) == 0);
    if own_ready || ctx.proc.has_deliverable(tid, mask) {
        super::signal::release_unblocked(ctx);
        return Err(Errno::EINTR);
    }
    Ok(())
}

fn zero_timespec() -> libc::timespec {
    libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    }
}

fn duration_of(ts: &libc::timespec) -> Duration {
    // Callers validated `ts` (non-negative seconds, nanoseconds below one second).
    Duration::new(
        ts.tv_sec.max(0) as u64,
        ts.tv_nsec.clamp(0, 999_999_999) as u32,
    )
}

fn timespec_of(d: Duration) -> libc::timespec {
    libc::timespec {
        tv_sec: d.as_secs().min(i64::MAX as u64) as i64,
        tv_nsec: i64::from(d.subsec_nanos()),
    }
}

/// A wait's time limit, and when it started (for the remaining time Linux reports).
struct Wait {
    limit: Option<libc::timespec>,
    start: Instant,
}

impl Wait {
    fn new(limit: Option<libc::timespec>) -> Wait {
        Wait {
            limit,
            start: Instant::now(),
        }
    }
    fn remaining(&self) -> Duration {
        self.limit
            .map(|l| duration_of(&l).saturating_sub(self.start.elapsed()))
            .unwrap_or_default()
    }
    /// Linux reports the remaining time only for a non-zero limit.
    fn reports_remaining(&self) -> bool {
        self.limit.is_some_and(|l| l.tv_sec != 0 || l.tv_nsec != 0)
    }
}

/// A relative limit, shortened to what is left of it when this call was stopped for a
/// checkpoint and is issued again (a stop must not lengthen a wait).
fn limit_after_stop(
    ctx: &mut SyscallCtx<'_>,
    limit: Option<libc::timespec>,
) -> Option<libc::timespec> {
    let l = limit?;
    let d = duration_of(&l);
    if d.is_zero() {
        return Some(l);
    }
    match ctx.deadline_after(d) {
        Some(end) => Some(timespec_of(end.saturating_duration_since(Instant::now()))),
        None => Some(l),
    }
}

impl EpollTimeout {
    fn after_stop(self, ctx: &mut SyscallCtx<'_>) -> EpollTimeout {
        match self {
            EpollTimeout::Millis(ms) if ms > 0 => {
                match ctx.deadline_after(Duration::from_millis(ms as u64)) {
                    Some(end) => {
                        let left = end.saturating_duration_since(Instant::now());
                        let ms = left.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128);
                        EpollTimeout::Millis(ms as i32)
                    }
                    None => self,
                }
            }
            EpollTimeout::Spec(limit) => EpollTimeout::Spec(limit_after_stop(ctx, limit)),
            other => other,
        }
    }
}

/// Host ppoll with no signal mask.
fn host_ppoll(fds: &mut [libc::pollfd], limit: Option<&libc::timespec>) -> SysResult {
    let ts = limit.map_or(std::ptr::null(), |t| t as *const libc::timespec);
    // SAFETY: `fds` is a valid array of its length; `ts` is null or a valid timespec.
    check(unsafe {
        libc::ppoll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            ts,
            std::ptr::null(),
        )
    } as i64)
}

// ---------------------------------------------------------------------------------------
// epoll

fn new_epoll(ctx: &mut SyscallCtx<'_>, cloexec: bool) -> SysResult {
    // SAFETY: plain syscall; the result is checked.
    let fd = check(i64::from(unsafe {
        libc::epoll_create1(libc::EPOLL_CLOEXEC)
    }))?;
    // SAFETY: the kernel just returned this fd and nothing else owns it.
    let host = unsafe { OwnedFd::from_raw_fd(fd as RawFd) };
    let fd = ctx.proc.fds.insert(OpenFile::new_epoll(host), cloexec)?;
    Ok(fd as u64)
}

fn sys_epoll_create(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    if a.int(0) <= 0 {
        return Err(Errno::EINVAL);
    }
    new_epoll(ctx, false)
}

fn sys_epoll_create1(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let flags = a.int(0);
    if flags & !libc::EPOLL_CLOEXEC != 0 {
        return Err(Errno::EINVAL);
    }
    new_epoll(ctx, flags & libc::EPOLL_CLOEXEC != 0)
}

/// Decode a guest `struct epoll_event` (packed, 12 bytes).
fn epoll_event_from(b: &[u8; EPOLL_EVENT_SIZE]) -> libc::epoll_event {
    let (ev, data) = b.split_at(4);
    libc::epoll_event {
        events: u32::from_le_bytes(ev.try_into().unwrap_or([0; 4])),
        u64: u64::from_le_bytes(data.try_into().unwrap_or([0; 8])),
    }
}

/// Encode events as the guest's packed array.
fn epoll_events_bytes(evs: &[libc::epoll_event]) -> Vec<u8> {
    let mut out = Vec::with_capacity(evs.len() * EPOLL_EVENT_SIZE);
    for e in evs {
        // Copies out of the packed struct (no references to unaligned fields).
        let (events, data) = (e.events, e.u64);
        out.extend_from_slice(&events.to_le_bytes());
        out.extend_from_slice(&data.to_le_bytes());
    }
    out
}

fn sys_epoll_ctl(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let (epfd, op, fd, ptr) = (a.fd(0), a.int(1), a.fd(2), a.ptr(3));
    let mut event = libc::epoll_event { events: 0, u64: 0 };
    // Linux copies the event before looking at the fds; DEL ignores it (may be NULL).
    if op != libc::EPOLL_CTL_DEL {
        let mut b = [0u8; EPOLL_EVENT_SIZE];
        ctx.proc.mm.read(ptr, &mut b)?;
        event = epoll_event_from(&b);
    }
    let ep = ctx.proc.fds.get(epfd)?;
    let target = ctx.proc.fds.get(fd)?;
    // The host checks the rest as Linux does: epfd must be an epoll instance, the target
    // may not be the instance itself (same open file → EINVAL), nor unpollable (EPERM).
    // What it accepts is recorded in the instance's interest list (for checkpoints, and
    // to take a file off the list when its last guest fd closes).
    let (events, data) = (event.events, event.u64);
    ep.epoll_ctl(op, &target, events, data)?;
    Ok(0)
}

/// How an epoll wait is bounded.
enum EpollTimeout {
    /// epoll_wait/epoll_pwait: milliseconds, negative for none.
    Millis(i32),
    /// epoll_pwait2: a timespec, or none.
    Spec(Option<libc::timespec>),
}

impl EpollTimeout {
    /// Does not wait at all.
    fn is_zero(&self) -> bool {
        match self {
            EpollTimeout::Millis(ms) => *ms == 0,
            EpollTimeout::Spec(Some(t)) => is_zero(t),
            EpollTimeout::Spec(None) => false,
        }
    }
}

fn is_zero(t: &libc::timespec) -> bool {
    t.tv_sec == 0 && t.tv_nsec == 0
}

/// The journal's readable entries first, then the host's events (an entry both report
/// once, with both's events), at most `max`.
fn merge_events(
    ready: &[(u32, u64)],
    host: &[libc::epoll_event],
    max: usize,
) -> Vec<libc::epoll_event> {
    let mut out: Vec<libc::epoll_event> = ready
        .iter()
        .take(max)
        .map(|&(events, data)| libc::epoll_event { events, u64: data })
        .collect();
    for h in host {
        // Copies out of the packed struct (no references to unaligned fields).
        let (events, data) = (h.events, h.u64);
        if let Some(o) = out.iter_mut().find(|o| { o.u64 } == data) {
            o.events = { o.events } | events;
        } else if out.len() < max {
            out.push(*h);
        }
    }
    out
}

fn host_epoll_wait(
    ep: RawFd,
    buf: *mut libc::epoll_event,
    max: usize,
    timeout: &EpollTimeout,
) -> Result<usize, Errno> {
    let max = max as i32;
    let n = match timeout {
        // SAFETY: the caller gives a writable buffer of `max` events.
        EpollTimeout::Millis(ms) => i64::from(unsafe { libc::epoll_wait(ep, buf, max, *ms) }),
        EpollTimeout::Spec(ts) => {
            let tsp = ts
                .as_ref()
                .map_or(std::ptr::null(), |t| t as *const libc::timespec);
            // SAFETY: as above; `tsp` is null or a valid timespec; no signal mask.
            let r = unsafe {
                libc::syscall(
                    SYS_EPOLL_PWAIT2,
                    ep,
                    buf,
                    max,
                    tsp,
                    std::ptr::null::<u8>(),
                    8,
                )
            };
            if r < 0 && Errno::last() == Errno::ENOSYS {
                // A host older than 5.11: round the limit up to whole milliseconds.
                let ms = ts.as_ref().map_or(-1, |t| {
                    let ms = duration_of(t).as_nanos().div_ceil(1_000_000);
                    ms.min(i32::MAX as u128) as i32
                });
                // SAFETY: as above.
                unsafe { libc::epoll_wait(ep, buf, max, ms) as i64 }
            } else {
                r
            }
        }
    };
    check(n).map(|n| n as usize)
}

fn do_epoll_wait(
    ctx: &mut SyscallCtx<'_>,
    epfd: i64,
    events: u64,
    maxevents: i32,
    timeout: EpollTimeout,
) -> SysResult {
    if maxevents <= 0 || maxevents as usize > i32::MAX as usize / EPOLL_EVENT_SIZE {
        return Err(Errno::EINVAL);
    }
    // Linux's access_ok: the whole array must lie in the user range; it is written only
    // as far as events are returned.
    let end = events.checked_add(maxevents as u64 * EPOLL_EVENT_SIZE as u64);
    if end.is_none_or(|e| e > layout::USER_END) {
        return Err(Errno::EFAULT);
    }
    // Held open for the wait, which runs without the process lock.
    let ep_file = ctx.proc.fds.get(epfd)?;
    let ep = ep_file.host_fd();
    // Collect no more events than the writable part of the buffer holds (a wait may
    // return fewer than are ready; the rest stay ready).
    let want = (maxevents as usize).min(MAX_EVENTS_PER_WAIT) * EPOLL_EVENT_SIZE;
    let iovs = ctx.proc.mm.host_iovecs(events, want, true)?;
    let avail: usize = iovs.iter().map(|v| v.iov_len).sum();
    let max = avail / EPOLL_EVENT_SIZE;
    if max == 0 {
        return Err(Errno::EFAULT);
    }
    let timeout = timeout.after_stop(ctx);
    let scan = journal::epoll_scan(&ctx.proc.fds, &ep_file);
    // The host fills a VMM buffer, copied into the guest after the wait: a wait may end
    // while the world is stopped for a checkpoint, when guest memory must not change.
    let mut buf = vec![libc::epoll_event { events: 0, u64: 0 }; max];
    // Room for the host's events beside the journal's (an event taken from the host and
    // not returned would be lost for an edge-triggered entry).
    let room = max.saturating_sub(scan.ready.len());
    let now = EpollTimeout::Millis(0);
    let mut got = None;
    if !scan.ready.is_empty() {
        got = Some(if room == 0 {
            0
        } else {
            host_epoll_wait(ep, buf.as_mut_ptr(), room, &now)?
        });
    } else if !scan.waiting.is_empty() && !timeout.is_zero() {
        // Would block, while peers may be waiting for held output: commit it first.
        let k = host_epoll_wait(ep, buf.as_mut_ptr(), max, &now)?;
        if k > 0 {
            got = Some(k);
        } else {
            journal::early_commit(ctx, &scan.waiting)?;
        }
    }
    let n = match got {
        Some(k) => k,
        None => ctx.wait_unlocked(|| host_epoll_wait(ep, buf.as_mut_ptr(), max, &timeout))??,
    }
    .min(max);
    let out = merge_events(&scan.ready, &buf[..n], max);
    // A one-shot entry that fired is disabled until the guest re-arms it.
    for f in &scan.oneshot {
        ep_file.epoll_disarm(f);
    }
    ctx.proc.mm.write(events, &epoll_events_bytes(&out))?;
    Ok(out.len() as u64)
}

fn sys_epoll_wait(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    do_epoll_wait(
        ctx,
        a.fd(0),
        a.ptr(1),
        a.int(2),
        EpollTimeout::Millis(a.int(3)),
    )
}

fn sys_epoll_pwait(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    apply_sigmask(ctx, a.ptr(4), a.raw(5))?;
    do_epoll_wait(
        ctx,
        a.fd(0),
        a.ptr(1),
        a.int(2),
        EpollTimeout::Millis(a.int(3)),
    )
}

fn sys_epoll_pwait2(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let timeout = if a.ptr(3) != 0 {
        Some(read_timespec(ctx, a.ptr(3))?)
    } else {
        None
    };
    apply_sigmask(ctx, a.ptr(4), a.raw(5))?;
    do_epoll_wait(
        ctx,
        a.fd(0),
        a.ptr(1),
        a.int(2),
        EpollTimeout::Spec(timeout),
    )
}

// ---------------------------------------------------------------------------------------
// poll

/// A guest `struct pollfd`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct PollFd {
    fd: i32,
    events: i16,
    revents: i16,
}

fn parse_pollfds(raw: &[u8]) -> Vec<PollFd> {
    raw.chunks_exact(POLLFD_SIZE)
        .map(|c| PollFd {
            fd: i32::from_le_bytes([c[0], c[1], c[2], c[3]]),
            events: i16::from_le_bytes([c[4], c[5]]),
            revents: i16::from_le_bytes([c[6], c[7]]),
        })
        .collect()
}

fn pollfds_bytes(fds: &[PollFd]) -> Vec<u8> {
    let mut out = Vec::with_capacity(fds.len() * POLLFD_SIZE);
    for p in fds {
        out.extend_from_slice(&p.fd.to_le_bytes());
        out.extend_from_slice(&p.events.to_le_bytes());
        out.extend_from_slice(&p.revents.to_le_bytes());
    }
    out
}

/// Host pollfds for the guest's. Negative guest fds are ignored (host fd -1), as are
/// unknown ones, which are reported as POLLNVAL by [`apply_revents`].
fn host_pollfds(guest: &[PollFd], host_fd: impl Fn(i32) -> Option<RawFd>) -> Vec<libc::pollfd> {
    guest
        .iter()
        .map(|p| libc::pollfd {
            fd: if p.fd < 0 {
                -1
            } else {
                host_fd(p.fd).unwrap_or(-1)
            },
            events: p.events,
            revents: 0,
        })
        .collect()
}

/// Copy the host's results into the guest's entries; returns how many have events.
fn apply_revents(guest: &mut [PollFd], host: &[libc::pollfd]) -> u64 {
    let mut count = 0;
    for (g, h) in guest.iter_mut().zip(host) {
        g.revents = if g.fd < 0 {
            0
        } else if h.fd < 0 {
            POLLNVAL
        } else {
            h.revents
        };
        count += u64::from(g.revents != 0);
    }
    count
}

fn do_poll(ctx: &mut SyscallCtx<'_>, ufds: u64, nfds: u32, wait: &Wait) -> SysResult {
    if u64::from(nfds) > ctx.proc.fds.limit() {
        return Err(Errno::EINVAL);
    }
    let raw = ctx.proc.mm.read_vec(ufds, nfds as usize * POLLFD_SIZE)?;
    let mut guest = parse_pollfds(&raw);
    let fds = &ctx.proc.fds;
    let mut host = host_pollfds(&guest, |fd| fds.host_fd(i64::from(fd)).ok());
    // The files stay open while the wait runs without the process lock.
    let held: Vec<(Option<Arc<OpenFile>>, i16)> = guest
        .iter()
        .map(|g| {
            (
                (g.fd >= 0).then(|| fds.get(i64::from(g.fd)).ok()).flatten(),
                g.events,
            )
        })
        .collect();
    let (extra, waiting) = journal::poll_scan(fds, &held);
    // An invalid fd is an event: Linux returns at once; so is journal readiness.
    let nval = guest.iter().zip(&host).any(|(g, h)| g.fd >= 0 && h.fd < 0);
    let ready = nval || extra.iter().any(|&e| e != 0);
    let zero = zero_timespec();
    let after_stop = limit_after_stop(ctx, wait.limit);
    let mut limit = if ready {
        Some(&zero)
    } else {
        after_stop.as_ref()
    };
    if !waiting.is_empty() && !limit.is_some_and(is_zero) {
        // Would block, while peers may be waiting for held output: commit it first.
        if host_ppoll(&mut host, Some(&zero))? > 0 {
            limit = Some(&zero);
        } else {
            journal::early_commit(ctx, &waiting)?;
        }
    }
    ctx.wait_unlocked(|| host_ppoll(&mut host, limit))??;
    drop(held);
    for (h, e) in host.iter_mut().zip(&extra) {
        if h.fd >= 0 {
            h.revents |= e;
        }
    }
    let n = apply_revents(&mut guest, &host);
    ctx.proc.mm.write(ufds, &pollfds_bytes(&guest))?;
    Ok(n)
}

fn sys_poll(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let ms = a.int(2);
    let limit = (ms >= 0).then(|| timespec_of(Duration::from_millis(ms as u64)));
    do_poll(ctx, a.ptr(0), a.uint(1), &Wait::new(limit))
}

fn sys_ppoll(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let limit = if a.ptr(2) != 0 {
        Some(read_timespec(ctx, a.ptr(2))?)
    } else {
        None
    };
    apply_sigmask(ctx, a.ptr(3), a.raw(4))?;
    let wait = Wait::new(limit);
    let r = do_poll(ctx, a.ptr(0), a.uint(1), &wait);
    if wait.reports_remaining() {
        // Linux updates the caller's timespec; a failure to do so is not an error.
        let rem = timespec_bytes(&timespec_of(wait.remaining()));
        ctx.proc.mm.write(a.ptr(2), &rem).ok();
    }
    r
}

// ---------------------------------------------------------------------------------------
// select

/// The fds select asks about, with poll events: the three guest bitmaps (`None` for a
/// NULL set) over fds `0..n`.
fn select_interest(n: usize, sets: &[Option<Vec<u64>>; 3]) -> Vec<(i32, i16)> {
    let mut out = Vec::new();
    for w in 0..n.div_ceil(64) {
        let word = |i: usize| {
            sets[i]
                .as_ref()
                .and_then(|s| s.get(w))
                .copied()
                .unwrap_or(0)
        };
        let (r, wr, ex) = (word(0), word(1), word(2));
        if r | wr | ex == 0 {
            continue;
        }
        for b in 0..64 {
            let fd = w * 64 + b;
            if fd >= n {
                break;
            }
            let mut events = 0;
            if r >> b & 1 != 0 {
                events |= POLLIN | POLLRDNORM | POLLRDBAND;
            }
            if wr >> b & 1 != 0 {
                events |= POLLOUT | POLLWRNORM | POLLWRBAND;
            }
            if ex >> b & 1 != 0 {
                events |= POLLPRI;
            }
            if events != 0 {
                out.push((fd as i32, events));
            }
        }
    }
    out
}

/// The result bitmaps (`words` longs each) and the count select returns, from the
/// interest list and the host's revents.
fn select_results(words: usize, interest: &[(i32, i16)], revents: &[i16]) -> ([Vec<u64>; 3], u64) {
    let mut out = [vec![0u64; words], vec![0u64; words], vec![0u64; words]];
    let mut count = 0;
    for (&(fd, events), &rev) in interest.iter().zip(revents) {
        let (w, b) = (fd as usize / 64, 1u64 << (fd as usize % 64));
        let checks = [
            (POLLIN, POLLIN_SET),
            (POLLOUT, POLLOUT_SET),
            (POLLPRI, POLLEX_SET),
        ];
        for (set, (asked, ready)) in out.iter_mut().zip(checks) {
            if events & asked != 0 && rev & ready != 0 {
                if let Some(word) = set.get_mut(w) {
                    *word |= b;
                    count += 1;
                }
            }
        }
    }
    (out, count)
}

fn do_select(ctx: &mut SyscallCtx<'_>, nfds: i32, ptrs: [u64; 3], wait: &Wait) -> SysResult {
    if nfds < 0 {
        return Err(Errno::EINVAL);
    }
    // Linux bounds n by the size of the fd table (bits beyond are ignored); every open fd
    // is below RLIMIT_NOFILE, so that bound keeps all of them.
    let n = (nfds as u64).min(ctx.proc.fds.limit()) as usize;
    let words = n.div_ceil(64);
    let mut sets: [Option<Vec<u64>>; 3] = [None, None, None];
    for (set, &ptr) in sets.iter_mut().zip(&ptrs) {
        if ptr == 0 {
            continue;
        }
        let raw = ctx.proc.mm.read_vec(ptr, words * 8)?;
        let mut v: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect();
        // Bits at or above n are not looked at.
        let tail_bits = n % 64;
        if let Some(last) = v.last_mut().filter(|_| tail_bits != 0) {
            *last &= (1u64 << tail_bits) - 1;
        }
        *set = Some(v);
    }
    let interest = select_interest(n, &sets);
    let mut host = Vec::with_capacity(interest.len());
    let mut held = Vec::with_capacity(interest.len());
    for &(fd, events) in &interest {
        let file = ctx.proc.fds.get(i64::from(fd))?;
        host.push(libc::pollfd {
            fd: file.host_fd(),
            events,
            revents: 0,
        });
        held.push((Some(file), events));
    }
    let (extra, waiting) = journal::poll_scan(&ctx.proc.fds, &held);
    // The files stay open (`held`) while the wait runs without the process lock.
    let zero = zero_timespec();
    let mut limit = limit_after_stop(ctx, wait.limit);
    if extra.iter().any(|&e| e != 0) {
        limit = Some(zero);
    } else if !waiting.is_empty() && !limit.as_ref().is_some_and(is_zero) {
        // Would block, while peers may be waiting for held output: commit it first.
        if host_ppoll(&mut host, Some(&zero))? > 0 {
            limit = Some(zero);
        } else {
            journal::early_commit(ctx, &waiting)?;
        }
    }
    ctx.wait_unlocked(|| host_ppoll(&mut host, limit.as_ref()))??;
    drop(held);
    let revents: Vec<i16> = host
        .iter()
        .zip(&extra)
        .map(|(h, e)| h.revents | e)
        .collect();
    let (out, count) = select_results(words, &interest, &revents);
    for (result, &ptr) in out.iter().zip(&ptrs) {
        if ptr != 0 {
            let bytes: Vec<u8> = result.iter().flat_map(|w| w.to_le_bytes()).collect();
            ctx.proc.mm.write(ptr, &bytes)?;
        }
    }
    Ok(count)
}

fn sys_select(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let tvp = a.ptr(4);
    let limit = if tvp != 0 {
        let mut b = [0u8; 16];
        ctx.proc.mm.read(tvp, &mut b)?;
        let sec = i64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8]));
        let usec = i64::from_le_bytes(b[8..].try_into().unwrap_or([0; 8]));
        if sec < 0 || usec < 0 {
            return Err(Errno::EINVAL);
        }
        // Linux carries whole seconds out of tv_usec.
        Some(libc::timespec {
            tv_sec: sec.saturating_add(usec / 1_000_000),
            tv_nsec: (usec % 1_000_000) * 1000,
        })
    } else {
        None
    };
    let wait = Wait::new(limit);
    let r = do_select(ctx, a.int(0), [a.ptr(1), a.ptr(2), a.ptr(3)], &wait);
    if wait.reports_remaining() {
        // Linux writes back the time left (as a timeval); a failure is not an error.
        let rem = wait.remaining();
        let mut b = [0u8; 16];
        b[..8].copy_from_slice(&(rem.as_secs().min(i64::MAX as u64) as i64).to_le_bytes());
        b[8..].copy_from_slice(&i64::from(rem.subsec_micros()).to_le_bytes());
        ctx.proc.mm.write(tvp, &b).ok();
    }
    r
}

fn sys_pselect6(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let tsp = a.ptr(4);
    let limit = if tsp != 0 {
        Some(read_timespec(ctx, tsp)?)
    } else {
        None
    };
    // The sixth argument is { const sigset_t *ss; size_t ss_len; }.
    if a.ptr(5) != 0 {
        let mut b = [0u8; 16];
        ctx.proc.mm.read(a.ptr(5), &mut b)?;
        let ss = u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8]));
        let len = u64::from_le_bytes(b[8..].try_into().unwrap_or([0; 8]));
        apply_sigmask(ctx, ss, len)?;
    }
    let wait = Wait::new(limit);
    let r = do_select(ctx, a.int(0), [a.ptr(1), a.ptr(2), a.ptr(3)], &wait);
    if wait.reports_remaining() {
        let rem = timespec_bytes(&timespec_of(wait.remaining()));
        ctx.proc.mm.write(tsp, &rem).ok();
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoll_event_is_packed_12_bytes() {
        assert_eq!(std::mem::size_of::<libc::epoll_event>(), EPOLL_EVENT_SIZE);
        let mut b = [0u8; 12];
        b[..4].copy_from_slice(&(libc::EPOLLIN as u32 | libc::EPOLLET as u32).to_le_bytes());
        b[4..].copy_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
        let e = epoll_event_from(&b);
        let (events, data) = (e.events, e.u64);
        assert_eq!(events, libc::EPOLLIN as u32 | libc::EPOLLET as u32);
        assert_eq!(data, 0x1122_3344_5566_7788);
        assert_eq!(epoll_events_bytes(&[e, e]), [b, b].concat());
    }

    #[test]
    fn journal_readiness_merges_with_the_hosts() {
        let ev = |events: u32, data: u64| libc::epoll_event { events, u64: data };
        let (inp, out) = (libc::EPOLLIN as u32, libc::EPOLLOUT as u32);
        let host = [ev(out, 7), ev(inp, 9)];
        let merged: Vec<(u32, u64)> = merge_events(&[(inp, 7)], &host, 8)
            .iter()
            .map(|e| (e.events, e.u64))
            .collect();
        // One entry per data, with both's events; the journal's first.
        assert_eq!(merged, [(inp | out, 7), (inp, 9)]);
        assert_eq!(merge_events(&[(inp, 1), (inp, 2)], &host, 1).len(), 1);
    }

    #[test]
    fn pollfds_translate_and_report_nval() {
        let guest = vec![
            PollFd {
                fd: 3,
                events: POLLIN,
                revents: 7,
            },
            PollFd {
                fd: -1,
                events: POLLIN,
                revents: 7,
            },
            PollFd {
                fd: 9,
                events: POLLOUT,
                revents: 0,
            },
        ];
        let raw = pollfds_bytes(&guest);
        assert_eq!(raw.len(), 24);
        let mut back = parse_pollfds(&raw);
        assert_eq!(back, guest);
        let mut host = host_pollfds(&back, |fd| (fd == 3).then_some(100));
        assert_eq!(host.iter().map(|h| h.fd).collect::<Vec<_>>(), [100, -1, -1]);
        host[0].revents = POLLIN | POLLHUP;
        let n = apply_revents(&mut back, &host);
        assert_eq!(n, 2);
        assert_eq!(
            back.iter().map(|p| p.revents).collect::<Vec<_>>(),
            [POLLIN | POLLHUP, 0, POLLNVAL]
        );
    }

    #[test]
    fn fd_sets_become_pollfds_and_back() {
        // read {0, 65}, write {1, 65}, except {2}; n = 70.
        let sets = [
            Some(vec![1u64, 1 << 1]),
            Some(vec![1u64 << 1, 1 << 1]),
            Some(vec![1u64 << 2, 0]),
        ];
        let interest = select_interest(70, &sets);
        assert_eq!(
            interest,
            [
                (0, POLLIN | POLLRDNORM | POLLRDBAND),
                (1, POLLOUT | POLLWRNORM | POLLWRBAND),
                (2, POLLPRI),
                (
                    65,
                    POLLIN | POLLRDNORM | POLLRDBAND | POLLOUT | POLLWRNORM | POLLWRBAND
                ),
            ]
        );
        // 0 hung up (readable), 1 not ready, 2 has urgent data, 65 writable only.
        let revents = [POLLHUP, 0, POLLPRI, POLLOUT];
        let (out, count) = select_results(2, &interest, &revents);
        assert_eq!(count, 3);
        assert_eq!(out[0], [1, 0]);
        assert_eq!(out[1], [0, 1 << 1]);
        assert_eq!(out[2], [1 << 2, 0]);
        // An error makes an fd both readable and writable, if asked.
        let (out, count) = select_results(2, &interest[3..], &[POLLERR]);
        assert_eq!(count, 2);
        assert_eq!((out[0][1], out[1][1]), (1 << 1, 1 << 1));
        // No sets: nothing to poll.
        assert!(select_interest(70, &[None, None, None]).is_empty());
    }
}
