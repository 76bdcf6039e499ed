//! The Linux x86-64 syscall ABI, executed by the VMM on the guest's behalf.
//!
//! The table is data: each family module lists its syscalls with their support level, and
//! one glance (or `assure-vmm syscalls`) tells what works. Handlers take the context and the
//! raw arguments and return a value or an errno. Anything not listed returns `ENOSYS` and is
//! logged once by name.

mod args;
pub mod fs;
mod futex;
pub mod mm;
pub mod names;
pub mod net;
pub mod poll;
pub mod process;
pub mod signal;
pub mod time;

use std::sync::OnceLock;

pub use args::Args;
use kvm_bindings::{kvm_regs, kvm_sregs};

use crate::errno::Errno;
use crate::process::{ProcGuard, Thread};
use crate::signal::SigInfo;

/// Result of a handler: the return value, or an errno.
pub type SysResult = Result<u64, Errno>;
/// A syscall handler.
pub type Handler = fn(&mut SyscallCtx<'_>, &Args) -> SysResult;

/// How well a syscall is supported.
#[derive(Clone, Copy, Debug)]
pub enum Support {
    /// Implemented as Linux documents it.
    Full(Handler),
    /// Implemented in part; the text says what is missing.
    Partial(Handler, &'static str),
    /// Always fails with this errno; the text says why.
    Error(Errno, &'static str),
}

/// One entry of the syscall table.
#[derive(Clone, Copy)]
pub struct SyscallDef {
    /// Syscall number (x86-64).
    pub nr: u64,
    /// Name.
    pub name: &'static str,
    /// Support.
    pub support: Support,
}

impl std::fmt::Debug for SyscallDef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}({})", self.name, self.nr)
    }
}

/// Build a family's list: `nr name => Full(handler)`.
#[macro_export]
macro_rules! syscall_table {
    ($($nr:literal $name:ident => $support:expr),* $(,)?) => {
        &[$($crate::syscalls::SyscallDef { nr: $nr, name: stringify!($name), support: $support }),*]
    };
}

/// What must happen after the handler returns, beyond setting RAX.
#[derive(Debug, Clone, PartialEq)]
pub enum Control {
    /// Return the value to the caller.
    Return,
    /// The whole process exits with this status.
    ExitGroup(i32),
    /// The calling thread exits.
    ExitThread(i32),
    /// Registers were replaced wholesale (rt_sigreturn); do not touch RAX/RIP. Restore this
    /// XSAVE image too, if any.
    Replaced(Option<Vec<u8>>),
    /// Duplicate the process (fork, vfork, clone without CLONE_VM).
    Fork(ForkRequest),
    /// Start a thread (clone with CLONE_VM | CLONE_THREAD).
    SpawnThread(ThreadRequest),
}

/// What a thread-creating clone asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ThreadRequest {
    /// The new thread's stack pointer.
    pub stack: u64,
    /// CLONE_SETTLS: its FS base.
    pub tls: Option<u64>,
    /// CLONE_PARENT_SETTID address.
    pub parent_settid: Option<u64>,
    /// CLONE_CHILD_SETTID address.
    pub child_settid: Option<u64>,
    /// CLONE_CHILD_CLEARTID address.
    pub child_cleartid: Option<u64>,
}

/// What a fork-like clone asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ForkRequest {
    /// CLONE_CHILD_SETTID: write the child's tid here in the child.
    pub child_settid: Option<u64>,
    /// CLONE_CHILD_CLEARTID: the child's clear_child_tid.
    pub child_cleartid: Option<u64>,
    /// CLONE_PARENT_SETTID: write the child's tid here in the parent.
    pub parent_settid: Option<u64>,
    /// New stack pointer for the child (0: same).
    pub child_stack: u64,
    /// CLONE_SETTLS: the child's FS base.
    pub tls: Option<u64>,
}

/// Everything a handler may touch.
#[derive(Debug)]
pub struct SyscallCtx<'a> {
    /// The process, locked (release it around blocking host calls with `unlocked`).
    pub proc: ProcGuard<'a>,
    /// The calling thread.
    pub thread: &'a mut Thread,
    /// User registers at the syscall (RIP is the return address).
    pub regs: &'a mut kvm_regs,
    /// Special registers (FS base lives here).
    pub sregs: &'a mut kvm_sregs,
    /// Set when a handler changed `sregs`.
    pub sregs_changed: bool,
    /// What happens after the return.
    pub control: Control,
    /// Signals the syscall raised for the calling thread (SIGPIPE, tgkill of self...),
    /// handled when it returns.
    pub raised: Vec<SigInfo>,
    /// Port remaps (guest port, host port) applied by bind().
    pub port_map: &'a [(u16, u16)],
    /// The stop/resume rendezvous: a wait that only a signal ends must also end for a stop
    /// (the call is then issued again after it).
    pub world: &'a crate::checkpoint::world::World,
    /// For a call issued again after a stop: the absolute end of its relative timeout, as
    /// first computed (Linux's restart_block), so a stop never lengthens a wait.
    pub restart_deadline: Option<std::time::Instant>,
    /// The absolute end of this call's relative timeout, set by handlers that wait (kept if
    /// the call is stopped and issued again).
    pub deadline: Option<std::time::Instant>,
    /// For a call that may wait: the thread as a stop should see it while it waits (set by
    /// the runner for the calls that only wait: futex, sleeps, epoll/poll/select, pause,
    /// sigsuspend).
    pub wait_entry: Option<crate::checkpoint::world::Waiting>,
    /// A stop happened while this call waited.
    pub stopped_during: bool,
    /// A rollback's order given while this call waited (and the stop that gave it): its
    /// result is dropped.
    pub abandoned: Option<(crate::checkpoint::world::Order, u64)>,
}

impl SyscallCtx<'_> {
    /// Run `f`, a host call that only waits, without the process lock; a stop meanwhile
    /// counts this thread as stopped without waking it. `f` must not write guest memory
    /// (results go through the VMM after it returns). `Err(EINTR)` when a rollback
    /// happened meanwhile: the caller must then return at once, touching nothing (the
    /// thread's state is the checkpoint's now).
    pub fn wait_unlocked<R>(&mut self, f: impl FnOnce() -> R) -> Result<R, Errno> {
        let Some(entry) = self.waiting_now() else {
            return Ok(self.proc.unlocked(f));
        };
        let world = self.world;
        let tid = self.thread.tid;
        let (r, left) = self.proc.unlocked(|| {
            world.enter_wait(tid, entry);
            let r = f();
            (r, world.leave_wait(tid))
        });
        self.stopped_during |= left.stopped;
        if let Some(order) = left.order {
            self.abandoned = Some((order, left.generation));
            return Err(Errno::EINTR);
        }
        Ok(r)
    }

    /// Before a wait on a condition variable under the process lock (futex, pause): counts
    /// this thread as stopped while it waits. Pair with [`SyscallCtx::leave_wait`].
    pub fn enter_wait(&mut self) {
        if let Some(entry) = self.waiting_now() {
            self.world.enter_wait(self.thread.tid, entry);
        }
    }

    /// After the wait begun by [`SyscallCtx::enter_wait`] (the process lock is released
    /// meanwhile, for a stop in progress to finish). `Err(EINTR)` as for
    /// [`SyscallCtx::wait_unlocked`].
    pub fn leave_wait(&mut self) -> Result<(), Errno> {
        if self.wait_entry.is_none() {
            return Ok(());
        }
        let world = self.world;
        let tid = self.thread.tid;
        let left = self.proc.unlocked(|| world.leave_wait(tid));
        self.stopped_during |= left.stopped;
        if let Some(order) = left.order {
            self.abandoned = Some((order, left.generation));
            return Err(Errno::EINTR);
        }
        Ok(())
    }

    /// The registration for a wait starting now: the entry state, with the deadline known so
    /// far, and how to wake the thread.
    fn waiting_now(&self) -> Option<crate::checkpoint::world::Waiting> {
        let mut entry = self.wait_entry.clone()?;
        if let Some(d) = self.deadline {
            entry.stopped_call = Some((entry.regs.rip, entry.regs.rax, d));
        }
        entry.waiter = self
            .proc
            .threads
            .get(&self.thread.tid)
            .and_then(|t| t.waiting.clone());
        Some(entry)
    }

    /// When a wait of `timeout` from now ends; for a call issued again after a stop, when the
    /// original wait ends. Recorded in case this call is stopped too.
    pub fn deadline_after(&mut self, timeout: std::time::Duration) -> Option<std::time::Instant> {
        let d = match self.restart_deadline.take() {
            Some(d) => Some(d),
            None => std::time::Instant::now().checked_add(timeout),
        };
        self.deadline = d;
        d
    }

    /// Raise SIGPIPE for an EPIPE, as Linux does for writes to a broken pipe or stream
    /// socket (unless MSG_NOSIGNAL, which the caller checks).
    pub fn sigpipe_on_epipe(&mut self, r: SysResult) -> SysResult {
        if r == Err(Errno::EPIPE) {
            self.raised.push(SigInfo {
                signo: libc::SIGPIPE,
                code: 0,
                addr: 0,
                pid: self.proc.pid,
                uid: 0,
                trapno: 0,
                err: 0,
            });
        }
        r
    }
}

fn families() -> [&'static [SyscallDef]; 8] {
    [
        fs::SYSCALLS,
        mm::SYSCALLS,
        net::SYSCALLS,
        poll::SYSCALLS,
        process::SYSCALLS,
        signal::SYSCALLS,
        time::SYSCALLS,
        names::UNSUPPORTED,
    ]
}

/// Highest syscall number we index.
const TABLE_SIZE: usize = 512;

fn table() -> &'static [Option<SyscallDef>] {
    static TABLE: OnceLock<Vec<Option<SyscallDef>>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let mut t = vec![None; TABLE_SIZE];
        for def in families().into_iter().flatten() {
            if let Some(slot) = t.get_mut(def.nr as usize) {
                if slot.is_none() {
                    *slot = Some(*def);
                }
            }
        }
        t
    })
}

/// The entry for `nr`.
pub fn lookup(nr: u64) -> Option<&'static SyscallDef> {
    table()
        .get(usize::try_from(nr).ok()?)
        .and_then(Option::as_ref)
}

/// Every entry, by number.
pub fn all() -> impl Iterator<Item = &'static SyscallDef> {
    table().iter().flatten()
}

/// Name of syscall `nr` (for logs), whether or not we implement it.
pub fn name_of(nr: u64) -> &'static str {
    lookup(nr)
        .map(|d| d.name)
        .or_else(|| names::name(nr))
        .unwrap_or("unknown")
}

/// Run syscall `nr`; returns the value for RAX.
pub fn dispatch(ctx: &mut SyscallCtx<'_>, nr: u64, args: &Args) -> u64 {
    let started = ctx.proc.stats.is_some().then(std::time::Instant::now);
    let result = match lookup(nr).map(|d| d.support) {
        Some(Support::Full(h)) | Some(Support::Partial(h, _)) => h(ctx, args),
        Some(Support::Error(e, _)) => Err(e),
        None => {
            if ctx.proc.reported_unimplemented.insert(nr) {
                tracing::warn!(
                    nr,
                    name = name_of(nr),
                    "unimplemented syscall, returning ENOSYS"
                );
            }
            Err(Errno::ENOSYS)
        }
    };
    tracing::trace!(target: "syscall", name = name_of(nr), a0 = args.0[0], a1 = args.0[1], a2 = args.0[2], result = ?result);
    if let (Some(t0), Some(stats)) = (started, ctx.proc.stats.as_mut()) {
        stats.record(nr, t0.elapsed(), result.is_err());
    }
    match result {
        Ok(v) => v,
        Err(e) => e.to_return(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_no_duplicate_numbers() {
        let mut seen = std::collections::HashMap::new();
        for def in families().into_iter().flatten() {
            if let Some(prev) = seen.insert(def.nr, def.name) {
                panic!("syscall {} listed twice: {prev} and {}", def.nr, def.name);
            }
        }
    }

    #[test]
    fn names_agree_with_the_abi() {
        assert_eq!(lookup(0).map(|d| d.name), Some("read"));
        assert_eq!(lookup(60).map(|d| d.name), Some("exit"));
        assert_eq!(lookup(231).map(|d| d.name), Some("exit_group"));
        assert!(lookup(1000).is_none());
        assert!(lookup(u64::MAX).is_none());
        for def in all() {
            if let Some(n) = names::name(def.nr) {
                assert_eq!(n, def.name, "syscall {}", def.nr);
            }
        }
    }
}
