//! State of the guest process and its threads that the VMM keeps (the kernel side of a
//! process): address space, fds, file-system view, signal dispositions, symbols, threads,
//! futexes. Every vCPU thread reaches it through one lock; a syscall that blocks on the
//! host releases the lock for the duration (see [`ProcGuard::unlocked`]).

use std::collections::{BTreeMap, HashSet};
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use crate::fd::FdTable;
use crate::fs::FsContext;
use crate::futex::{FutexTable, Waiter};
use crate::mm::AddressSpace;
use crate::signal::{self, AltStack, Dispositions, SigInfo};

/// The guest process.
#[derive(Debug)]
pub struct Process {
    /// Process id shown to the guest.
    pub pid: i32,
    /// Memory.
    pub mm: AddressSpace,
    /// File descriptors.
    pub fds: FdTable,
    /// Root and working directory.
    pub fs: FsContext,
    /// Signal dispositions.
    pub signals: Dispositions,
    /// Symbols of the executable and loaded libraries.
    pub symbols: introspect::Symbolizer,
    /// Guest path of the executable.
    pub exe: String,
    /// Command line.
    pub argv: Vec<String>,
    /// Environment.
    pub envp: Vec<String>,
    /// Auxiliary vector given at start.
    pub auxv: Vec<(u64, u64)>,
    /// File mode creation mask.
    pub umask: u32,
    /// Syscall numbers already reported as unimplemented (logged once each).
    pub reported_unimplemented: HashSet<u64>,
    /// Live threads, by tid.
    pub threads: BTreeMap<i32, ThreadShared>,
    /// Signals sent to the process as a whole, not yet taken by a thread.
    pub process_pending: Vec<SigInfo>,
    /// Futex waiters.
    pub futexes: FutexTable,
    /// Next thread id to hand out.
    pub next_tid: i32,
    /// Per-syscall statistics, when asked for (`--stats`).
    pub stats: Option<crate::stats::SyscallStats>,
    /// ITIMER_REAL.
    pub timer: crate::timer::RealTimer,
    /// This process's own lock (for threads the VMM starts on its behalf, the timer).
    pub self_ref: std::sync::Weak<Mutex<Process>>,
    /// prctl(PR_SET_NAME) names, by tid.
    pub thread_names: BTreeMap<i32, [u8; 16]>,
    /// Rescue points, breakpoints and open windows (the VMM's own: not rolled back).
    pub rescue: crate::rescue::RescueState,
}

/// What other threads need to know about a thread.
#[derive(Debug, Default)]
pub struct ThreadShared {
    /// Signals sent to this thread by others, not yet taken.
    pub pending: Vec<SigInfo>,
    /// Its signal mask (a copy, for routing process-directed signals).
    pub sigmask: u64,
    /// The futex it is waiting on, to interrupt the wait.
    pub waiting: Option<Arc<Waiter>>,
    /// How to interrupt its vCPU or its blocking host call.
    pub kicker: Option<crate::kick::Kicker>,
}

/// The process's kernel-side state as a checkpoint keeps it. Thread register state and
/// memory contents are kept by the checkpoint engine; the parts that are monitoring only
/// (statistics, the symbolizer, the log of unimplemented calls) are not rolled back.
#[derive(Debug)]
pub struct ProcessCheckpoint {
    mm: crate::mm::MmState,
    fds: crate::fd::FdCheckpoint,
    cwd: String,
    signals: Dispositions,
    umask: u32,
    threads: BTreeMap<i32, (Vec<SigInfo>, u64)>,
    process_pending: Vec<SigInfo>,
    itimer: crate::timer::Itimer,
    thread_names: BTreeMap<i32, [u8; 16]>,
    removals: u64,
}

impl ProcessCheckpoint {
    /// What a rollback to it cannot put back.
    pub fn not_kept(&self) -> &[String] {
        self.fds.not_kept()
    }

    /// Where the log of deferred unlinks stood.
    pub fn removals_position(&self) -> u64 {
        self.removals
    }

    /// The address-space bookkeeping.
    pub fn mm(&self) -> &crate::mm::MmState {
        &self.mm
    }
}

impl Process {
    /// Capture the kernel-side state (every thread must be stopped: no futex waiter, no
    /// syscall in progress).
    pub fn checkpoint(&self) -> ProcessCheckpoint {
        ProcessCheckpoint {
            mm: self.mm.state(),
            fds: self.fds.checkpoint(),
            cwd: self.fs.cwd().to_string(),
            signals: self.signals.clone(),
            umask: self.umask,
            threads: self
                .threads
                .iter()
                .map(|(t, th)| (*t, (th.pending.clone(), th.sigmask)))
                .collect(),
            process_pending: self.process_pending.clone(),
            itimer: self.timer.itimer,
            thread_names: self.thread_names.clone(),
            removals: self.fs.removals.position(),
        }
    }

    /// Put the kernel-side state back (memory contents first, by the caller). Threads keep
    /// the kicker of the live runner with the same tid; a runner started for a thread that
    /// comes back registers its own.
    pub fn restore(&mut self, ck: &ProcessCheckpoint) {
        self.mm.restore_state(&ck.mm);
        // A host call that fails here (an lseek, an epoll_ctl) leaves that one file's offset
        // or registration as it is; everything else is still put back.
        if let Err(e) = self.fds.restore(&ck.fds) {
            tracing::warn!(error = %e, "fd table restored with errors");
        }
        self.fs.set_cwd(ck.cwd.clone());
        self.signals = ck.signals.clone();
        self.umask = ck.umask;
        let mut threads = BTreeMap::new();
        for (tid, (pending, sigmask)) in &ck.threads {
            let kicker = self.threads.get(tid).and_then(|t| t.kicker);
            threads.insert(
                *tid,
                ThreadShared {
                    pending: pending.clone(),
                    sigmask: *sigmask,
                    waiting: None,
                    kicker,
                },
            );
        }
        self.threads = threads;
        self.process_pending.clone_from(&ck.process_pending);
        self.futexes = Default::default();
        let weak = self.self_ref.clone();
        self.timer.set(ck.itimer, &weak);
        self.thread_names.clone_from(&ck.thread_names);
        self.fs.removals.undo_since(ck.removals);
    }

    /// Queue `info` for thread `tid` (or, with `None`, for the process) and interrupt the
    /// thread that should take it.
    pub fn post_signal(&mut self, tid: Option<i32>, info: SigInfo) {
        let target = match tid {
            Some(t) => {
                if let Some(th) = self.threads.get_mut(&t) {
                    th.pending.push(info);
                }
                Some(t)
            }
            None => {
                self.process_pending.push(info);
                // Prefer a thread that does not block it; else any (it stays pending).
                self.threads
                    .iter()
                    .find(|(_, th)| th.sigmask & signal::bit(info.signo) == 0)
                    .or_else(|| self.threads.iter().next())
                    .map(|(t, _)| *t)
            }
        };
        if let Some(tid) = target {
            if let Some(th) = self.threads.get(&tid) {
                if let Some(w) = &th.waiting {
                    w.interrupt();
                }
                if let Some(k) = &th.kicker {
                    k.kick();
                }
            }
            self.rekick_until_taken(tid);
        }
    }

    /// A kick that lands after the target released the lock but before its blocking host
    /// call began is lost (the call then waits for its own event). Kick again, briefly,
    /// until the target has taken what is pending for it.
    fn rekick_until_taken(&self, tid: i32) {
        let weak = self.self_ref.clone();
        let spawned = std::thread::Builder::new()
            .name("rekick".into())
            .spawn(move || {
                for _ in 0..200 {
                    std::thread::sleep(Duration::from_millis(5));
                    let Some(m) = weak.upgrade() else { return };
                    let p = lock(&m);
                    let Some(th) = p.threads.get(&tid) else {
                        return;
                    };
                    if !p.has_deliverable(tid, th.sigmask) {
                        return;
                    }
                    if let Some(k) = &th.kicker {
                        k.kick();
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a thread to repeat a kick");
        }
    }

    /// Take the signals pending for thread `tid` that it does not block (its own first,
    /// then the process's).
    pub fn take_deliverable(&mut self, tid: i32, mask: u64) -> Vec<SigInfo> {
        let mut out = Vec::new();
        if let Some(th) = self.threads.get_mut(&tid) {
            let (ready, keep): (Vec<_>, Vec<_>) = th
                .pending
                .drain(..)
                .partition(|s| mask & signal::bit(s.signo) == 0);
            th.pending = keep;
            out.extend(ready);
        }
        let (ready, keep): (Vec<_>, Vec<_>) = self
            .process_pending
            .drain(..)
            .partition(|s| mask & signal::bit(s.signo) == 0);
        self.process_pending = keep;
        out.extend(ready);
        out
    }

    /// Is anything deliverable pending for `tid` with `mask`?
    pub fn has_deliverable(&self, tid: i32, mask: u64) -> bool {
        let ready = |s: &SigInfo| mask & signal::bit(s.signo) == 0;
        self.threads
            .get(&tid)
            .is_some_and(|t| t.pending.iter().any(ready))
            || self.process_pending.iter().any(ready)
    }
}

/// One guest thread's kernel-side state, owned by its vCPU thread.
#[derive(Debug, Clone)]
pub struct Thread {
    /// Thread id.
    pub tid: i32,
    /// Blocked signals.
    pub sigmask: u64,
    /// set_tid_address / CLONE_CHILD_CLEARTID.
    pub clear_child_tid: u64,
    /// set_robust_list head.
    pub robust_list: u64,
    /// sigaltstack.
    pub altstack: AltStack,
    /// Signals raised by this thread for itself while blocked.
    pub pending: Vec<SigInfo>,
    /// The mask to restore after the handler that ends an `rt_sigsuspend`.
    pub suspend_restore: Option<u64>,
}

impl Thread {
    /// A new thread with nothing blocked.
    pub fn new(tid: i32) -> Thread {
        Thread {
            tid,
            sigmask: 0,
            clear_child_tid: 0,
            robust_list: 0,
            altstack: AltStack::disabled(),
            pending: Vec::new(),
            suspend_restore: None,
        }
    }
}

/// The process, locked. Dereferences to [`Process`]; a handler that blocks on the host
/// releases the lock around the blocking call with [`ProcGuard::unlocked`].
#[derive(Debug)]
pub struct ProcGuard<'a> {
    lock: &'a Mutex<Process>,
    guard: Option<MutexGuard<'a, Process>>,
}

/// Lock the process; a poisoned lock (a VMM thread panicked) still gives the state.
pub fn lock(m: &Mutex<Process>) -> MutexGuard<'_, Process> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<'a> ProcGuard<'a> {
    /// Lock `lock`.
    pub fn new(lock: &'a Mutex<Process>) -> ProcGuard<'a> {
        ProcGuard {
            lock,
            guard: Some(self::lock(lock)),
        }
    }

    /// Run `f` (a blocking host call) without the lock, then take it again. `f` must not
    /// touch guest state; anything it needs (host fds, iovecs) is taken before.
    pub fn unlocked<R>(&mut self, f: impl FnOnce() -> R) -> R {
        self.guard = None;
        let r = f();
        self.guard = Some(lock(self.lock));
        r
    }

    /// Wait on `cv` (tied to the process lock) for at most `timeout`; returns whether it
    /// timed out.
    pub fn wait(&mut self, cv: &Condvar, timeout: Option<Duration>) -> bool {
        let Some(g) = self.guard.take() else {
            return true;
        };
        let (g, timed_out) = match timeout {
            Some(t) => {
                let (g, r) = cv.wait_timeout(g, t).unwrap_or_else(|e| e.into_inner());
                (g, r.timed_out())
            }
            None => (cv.wait(g).unwrap_or_else(|e| e.into_inner()), false),
        };
        self.guard = Some(g);
        timed_out
    }
}

impl Deref for ProcGuard<'_> {
    type Target = Process;
    fn deref(&self) -> &Process {
        // The guard is only absent inside `unlocked`/`wait`, which hold `&mut self`.
        match &self.guard {
            Some(g) => g,
            None => unreachable!("process lock is held outside unlocked()"),
        }
    }
}

impl DerefMut for ProcGuard<'_> {
    fn deref_mut(&mut self) -> &mut Process {
        match &mut self.guard {
            Some(g) => g,
            None => unreachable!("process lock is held outside unlocked()"),
        }
    }
}
