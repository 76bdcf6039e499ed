//! The loop of one vCPU thread: run the guest, serve its exits, deliver its signals.
//!
//! It is an explicit state machine over decoded exits: a syscall is executed and the
//! vCPU resumes after it; a CPU exception is either a demand fault (map, retry) or a signal
//! (delivered to the guest's handler, or the end of the process with a crash event); an
//! interruption (a kick) only makes pending signals deliverable; anything else is a fatal
//! VMM-level error. Each guest thread has one runner on its own host thread.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use kvm_bindings::{kvm_regs, kvm_sregs, kvm_xsave};

use crate::checkpoint::world::{Ack, Order, StopError, ThreadState};
use crate::checkpoint::{self, CheckpointError};
use crate::errno::Errno;
use crate::events::{self, CrashEvent, ExceptionInfo};
use crate::mm::{FaultOutcome, PageFaultCode};
use crate::process::{self, ProcGuard, Process, Thread, ThreadShared};
use crate::sandbox::{register_memory, RunOutcome, SandboxError, Shared, VmHandles};
use crate::signal::{self, DefaultAction, FrameExtras, SigInfo};
use crate::syscalls::{self, Args, Control, ForkRequest, SyscallCtx, ThreadRequest};
use crate::vcpu::{decode_exit, GuestEvent, SyscallMode, Vcpu};

/// How a thread's loop ended.
#[derive(Debug)]
enum End {
    /// Only this thread exited.
    Thread,
    /// The process ended.
    Process(RunOutcome),
}

/// `-EINTR` as a syscall return.
const EINTR_RET: u64 = (-(libc::EINTR as i64)) as u64;

/// Syscalls Linux restarts after a handler with SA_RESTART (they return -ERESTARTSYS when
/// interrupted). Waits for events or signals (pause, sigsuspend, poll, select, epoll_wait)
/// and sleeps return EINTR after any handler, as on Linux.
fn restarts_with_sa_restart(nr: u64) -> bool {
    matches!(
        nr,
        0 | 1
            | 2
            | 16
            | 17
            | 18
            | 19
            | 20
            | 40
            | 42
            | 43
            | 44
            | 45
            | 46
            | 47
            | 61
            | 72
            | 73
            | 202
            | 247
            | 257
            | 288
            | 295
            | 296
    )
}

/// The first context of a new thread or forked process on vCPU `vcpu_id`: the parent's at
/// its clone, returning 0, on `stack` if one was given, with `tls` as FS base if given, in
/// user mode, with the vCPU's own task register (each vCPU has its own TSS).
fn child_context(
    vcpu_id: u64,
    regs: &kvm_regs,
    sregs: &kvm_sregs,
    stack: u64,
    tls: Option<u64>,
) -> (kvm_regs, kvm_sregs) {
    use crate::arch::x86_64::supervisor;
    let mut child_regs = *regs;
    child_regs.rax = 0;
    if stack != 0 {
        child_regs.rsp = stack;
    }
    let mut child_sregs = *sregs;
    child_sregs.cs = supervisor::user_code_segment();
    child_sregs.ss = supervisor::user_data_segment();
    child_sregs.tr = supervisor::task_register(vcpu_id);
    if let Some(tls) = tls {
        child_sregs.fs.base = tls;
    }
    (child_regs, child_sregs)
}

/// Robust futexes a dying thread still holds (its `set_robust_list` list, as glibc keeps it
/// for robust mutexes) are marked FUTEX_OWNER_DIED and one waiter is woken, as Linux does, so
/// the next locker gets EOWNERDEAD instead of waiting forever.
fn release_robust_futexes(p: &mut Process, tid: i32, head: u64) {
    const FUTEX_WAITERS: u32 = 0x8000_0000;
    const FUTEX_OWNER_DIED: u32 = 0x4000_0000;
    const FUTEX_TID_MASK: u32 = 0x3fff_ffff;
    /// Linux's ROBUST_LIST_LIMIT: a hostile or corrupt list cannot make the walk endless.
    const LIMIT: usize = 2048;
    if head == 0 {
        return;
    }
    let read = |p: &mut Process, addr: u64| p.mm.read_obj::<u64>(addr).ok();
    let Some(mut entry) = read(p, head) else {
        return;
    };
    let Some(offset) = read(p, head + 8).map(|o| o as i64) else {
        return;
    };
    let pending = read(p, head + 16).unwrap_or(0);
    let release = |p: &mut Process, entry: u64| {
        // Bit 0 of an entry marks a PI futex; the futex word is at entry + offset.
        let Some(word_addr) = (entry & !1).checked_add_signed(offset) else {
            return;
        };
        let Ok(word) = p.mm.read_obj::<u32>(word_addr) else {
            return;
        };
        if word & FUTEX_TID_MASK != tid as u32 {
            return;
        }
        let new = (word & FUTEX_WAITERS) | FUTEX_OWNER_DIED;
        if p.mm.write_obj(word_addr, &new).is_ok() && word & FUTEX_WAITERS != 0 {
            p.futexes.wake(word_addr, 1, u32::MAX);
        }
    };
    for _ in 0..LIMIT {
        if entry == head || entry == 0 {
            break;
        }
        let next = read(p, entry & !1);
        if entry != pending {
            release(p, entry);
        }
        match next {
            Some(n) => entry = n,
            None => break,
        }
    }
    if pending != 0 {
        release(p, pending);
    }
}

/// Calls that only wait (no effect until they return, so a stop may leave them blocked and
/// they can be issued again): futex, nanosleep, clock_nanosleep, epoll_wait, epoll_pwait,
/// epoll_pwait2, poll, ppoll, select, pselect6, pause, rt_sigsuspend.
fn only_waits(nr: u64, args: &Args) -> bool {
    const FUTEX_CMD_MASK: u64 = 0x7f; // without FUTEX_PRIVATE_FLAG and FUTEX_CLOCK_REALTIME
    match nr {
        // FUTEX_WAIT, FUTEX_WAIT_BITSET (a wake or a requeue does not wait).
        202 => matches!(args.0[1] & FUTEX_CMD_MASK, 0 | 9),
        35 | 230 | 232 | 281 | 441 | 7 | 271 | 23 | 270 | 34 | 130 => true,
        _ => false,
    }
}

/// Calls that move data through their first fd: read, write, pread64, pwrite64, readv,
/// writev, sendfile, sendto, recvfrom, sendmsg, recvmsg, splice, tee, recvmmsg, preadv,
/// pwritev, sendmmsg, copy_file_range, preadv2, pwritev2.
fn moves_data(nr: u64) -> bool {
    matches!(
        nr,
        0 | 1
            | 17
            | 18
            | 19
            | 20
            | 40
            | 44
            | 45
            | 46
            | 47
            | 275
            | 276
            | 299
            | 295
            | 296
            | 307
            | 326
            | 327
            | 328
    )
}

/// Load an order's registers into `vcpu` (on the thread that owns it).
fn apply_order(vcpu: &mut Vcpu, order: &Order) -> Ack {
    match order {
        Order::Restore {
            state,
            load_cpu,
            verify,
        } => {
            let loaded = if *load_cpu {
                vcpu.restore_state(&state.cpu)
            } else {
                Ok(())
            };
            match loaded.and_then(|()| {
                verify
                    .then(|| vcpu.read_back_state().map(Box::new))
                    .transpose()
            }) {
                Ok(cpu) => Ack::Restored(cpu),
                Err(e) => Ack::Failed(e.to_string()),
            }
        }
        Order::Exit => Ack::Exiting,
    }
}

/// One guest thread on its vCPU.
#[derive(Debug)]
pub struct Runner {
    shared: Arc<Shared>,
    vcpu: Vcpu,
    thread: Thread,
    /// The last fault delivered to a guest handler: if the guest then dies of the same
    /// signal (a handler that logs and re-raises), the crash event names the fault.
    delivered_fault: Option<CrashEvent>,
    /// The syscall that last returned EINTR (number and its entry RIP), for SA_RESTART.
    interrupted_syscall: Option<(u64, u64)>,
    /// A call stopped for a checkpoint and to be issued again: (syscall instruction
    /// address, number, absolute end of its timeout).
    stopped_call: Option<(u64, u64, std::time::Instant)>,
    /// A crash of this thread inside a rescue window, handled at the top of the loop
    /// (where no lock is held and the thread's state is complete).
    pending_fault: Option<Fault>,
    /// States loaded by rollbacks (to tell that one overtook an operation).
    restores: u64,
    /// An order to end, taken while waiting for the checkpoint engine.
    ended: Option<End>,
    /// Single-stepping is on in the vCPU.
    single_step: bool,
    /// Watched pages opened for the instruction being stepped (see [`crate::mm::Guard`]).
    lifted_guards: Vec<u64>,
    /// The watchpoint that instruction triggered, reported once it completes.
    guard_hit: Option<crate::gdb::Watchpoint>,
}

/// How a checkpoint-engine operation by a runner went.
enum EngineOp<T> {
    /// It ran (successfully or not).
    Done(Result<T, CheckpointError>),
    /// A rollback by someone else loaded another state into this thread meanwhile.
    Overtaken,
    /// This thread was ordered to end meanwhile.
    Ended,
}

/// A crash waiting to be rescued or delivered.
#[derive(Debug, Clone)]
struct Fault {
    info: SigInfo,
    regs: kvm_regs,
    cause: String,
    exc: Option<ExceptionInfo>,
    /// Raised by the CPU (force_sig semantics), not sent by the thread to itself.
    synchronous: bool,
    /// Reported to an attached debugger already (it is delivered when gdb resumes the
    /// thread with the signal, dropped when gdb resumes it without).
    shown_to_debugger: bool,
}

/// Signals that mean the thread crashed when it raises them itself (abort, assert,
/// stack-protector and glibc heap checks all end in raise(SIGABRT)).
fn is_crash_signal(sig: i32) -> bool {
    matches!(
        sig,
        libc::SIGSEGV | libc::SIGBUS | libc::SIGFPE | libc::SIGILL | libc::SIGABRT | libc::SIGSYS
    )
}

impl Runner {
    pub(crate) fn new(shared: Arc<Shared>, vcpu: Vcpu, thread: Thread) -> Runner {
        Runner {
            shared,
            vcpu,
            thread,
            delivered_fault: None,
            interrupted_syscall: None,
            stopped_call: None,
            pending_fault: None,
            restores: 0,
            ended: None,
            single_step: false,
            lifted_guards: Vec::new(),
            guard_hit: None,
        }
    }

    /// This thread's complete state, as a stop records it.
    fn thread_state(&mut self) -> Result<ThreadState, SandboxError> {
        Ok(ThreadState {
            cpu: self.vcpu.save_state()?,
            thread: self.thread.clone(),
            interrupted_syscall: self.interrupted_syscall,
            stopped_call: self.stopped_call,
        })
    }

    /// A runner for a thread that a rollback brings back, on `vcpu` (already loaded with
    /// the thread's registers).
    pub(crate) fn revive(shared: Arc<Shared>, vcpu: Vcpu, state: &ThreadState) -> Runner {
        let mut r = Runner::new(shared, vcpu, state.thread.clone());
        r.interrupted_syscall = state.interrupted_syscall;
        r.stopped_call = state.stopped_call;
        r
    }

    /// Start this runner on a new host thread.
    pub(crate) fn spawn(self) -> std::io::Result<()> {
        let name = format!("vcpu-{}", self.thread.tid);
        let shared = self.shared.clone();
        // Counted before it can park, so a stop in progress waits for it too.
        shared.world.runner_started();
        let r = std::thread::Builder::new()
            .name(name)
            .spawn(move || self.run_thread())
            .map(|_| ());
        if r.is_err() {
            shared.world.runner_ended();
        }
        r
    }

    /// Stop here for a checkpoint or rollback: deposit this thread's state, wait, and carry
    /// out the coordinator's order.
    fn park(&mut self) -> Result<Option<End>, SandboxError> {
        let state = self.thread_state()?;
        let shared = self.shared.clone();
        let vcpu = &mut self.vcpu;
        let order = shared.world.park(self.thread.tid, state, &mut |order| {
            apply_order(vcpu, order)
        });
        Ok(order.and_then(|o| self.take_order(o)))
    }

    /// Take the kernel-side part of an order (its registers were loaded by `apply_order`).
    fn take_order(&mut self, order: Order) -> Option<End> {
        match order {
            Order::Restore { state, .. } => {
                self.adopt(&state);
                None
            }
            Order::Exit => Some(End::Thread),
        }
    }

    /// Take the kernel-side part of a state a rollback loaded (a fault pending from before
    /// it is gone with it).
    fn adopt(&mut self, state: &ThreadState) {
        self.thread = state.thread.clone();
        self.interrupted_syscall = state.interrupted_syscall;
        self.stopped_call = state.stopped_call;
        self.delivered_fault = None;
        self.pending_fault = None;
        self.restores += 1;
    }

    fn run_thread(mut self) {
        let tid = self.thread.tid;
        crate::kick::register_immediate_exit(&mut self.vcpu.kvm_run_mut().immediate_exit);
        process::lock(&self.shared.proc)
            .threads
            .entry(tid)
            .or_default()
            .kicker = Some(crate::kick::Kicker::current());
        // A bug in the VMM must end the run with an error, not leave the other threads
        // waiting for an outcome that never comes.
        let result =
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| self.run_loop())) {
                Ok(r) => r,
                Err(panic) => {
                    let what = panic
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "unknown panic".into());
                    self.shared
                        .events()
                        .note(&format!("vCPU thread {tid} failed: {what}"));
                    Err(SandboxError::GuestFatal(format!(
                        "internal error in the vCPU thread of guest thread {tid}: {what}"
                    )))
                }
            };
        crate::kick::register_immediate_exit(std::ptr::null_mut());
        let shared = self.shared.clone();
        let thread_ended = matches!(result, Ok(End::Thread));
        match result {
            Ok(End::Thread) => {
                if self.single_step {
                    // The vCPU goes to the next thread: without this one's step.
                    if let Err(e) = self.vcpu.set_single_step(false) {
                        tracing::warn!(error = %e, "single-step left on a pooled vCPU");
                    }
                }
                let vcpu = self.vcpu;
                shared
                    .vcpu_pool
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(vcpu);
            }
            Ok(End::Process(outcome)) => shared.finish(Ok(outcome)),
            Err(e) => shared.finish(Err(e)),
        }
        shared.world.runner_ended();
        if thread_ended {
            // After runner_ended: a stop no longer waits for this thread, so it may wait
            // for the checkpoint engine.
            crate::rescue::watchdog::thread_gone(&shared, tid);
        }
    }

    fn run_loop(&mut self) -> Result<End, SandboxError> {
        let mut memory_faults = 0u32;
        loop {
            if self.shared.debug.attached() {
                // After a debugger event, nothing runs until the debugger's stop.
                let (debug, tid) = (&self.shared.debug, self.thread.tid);
                self.shared.world.hold_until_stop(&|| debug.held(tid));
            }
            if self.shared.world.stop_requested() {
                if let Some(end) = self.park()? {
                    return Ok(end);
                }
                // Whoever stopped the world may have held this thread meanwhile (a
                // debugger): look again before running.
                continue;
            }
            if let Some(end) = self.ended.take() {
                return Ok(end);
            }
            if let Some(fault) = self.pending_fault.take() {
                if let Some(end) = self.handle_fault(fault)? {
                    return Ok(end);
                }
                continue;
            }
            if let Some(end) = self.deliver_pending()? {
                return Ok(end);
            }
            self.sync_single_step()?;
            let exit = self.vcpu.run()?;
            self.vcpu.kvm_run_mut().immediate_exit = 0;
            let rip = self.vcpu.regs().rip;
            let cs = self.vcpu.sregs().cs.selector;
            let event = decode_exit(&exit, rip, cs);
            let completes_instruction = !matches!(
                event,
                GuestEvent::DebugTrap | GuestEvent::Interrupted | GuestEvent::MemoryFault
            );
            let end = match event {
                GuestEvent::DebugTrap => self.on_debug_trap(),
                GuestEvent::Syscall(mode) => self.on_syscall(mode)?,
                GuestEvent::Exception { vector } => self.on_exception(vector)?,
                GuestEvent::ForeignPortIo if self.on_port_breakpoint()? => None,
                GuestEvent::ForeignPortIo => {
                    // Linux answers an unprivileged port access with #GP → SIGSEGV.
                    let mut regs = *self.vcpu.regs();
                    let info = SigInfo {
                        signo: libc::SIGSEGV,
                        code: 0x80,
                        addr: 0,
                        pid: 0,
                        uid: 0,
                        trapno: 13,
                        err: 0,
                    };
                    let exc = ExceptionInfo {
                        vector: 13,
                        name: "#GP",
                        error_code: 0,
                    };
                    let shared = self.shared.clone();
                    let mut p = ProcGuard::new(&shared.proc);
                    let r = self.force_signal(&mut p, info, &mut regs, "cpu exception", Some(exc));
                    *self.vcpu.regs_mut() = regs;
                    r
                }
                GuestEvent::Interrupted => None,
                GuestEvent::MemoryFault => {
                    // Transient (a protection change in progress on another thread); one
                    // that persists is a VMM bug, reported rather than spun on.
                    memory_faults += 1;
                    if memory_faults > 10_000 {
                        return Err(SandboxError::GuestFatal(format!(
                            "KVM cannot reach guest memory at rip {rip:#x}"
                        )));
                    }
                    std::thread::yield_now();
                    continue;
                }
                GuestEvent::Fatal(msg) => return Err(SandboxError::GuestFatal(msg)),
            };
            memory_faults = 0;
            if let Some(end) = end {
                return Ok(end);
            }
            if self.single_step && completes_instruction {
                self.check_step_done();
            }
        }
    }

    /// Turn single-stepping on or off in the vCPU as the debugger (or a watched access
    /// being stepped) wants it.
    fn sync_single_step(&mut self) -> Result<(), SandboxError> {
        let want = !self.lifted_guards.is_empty()
            || (self.shared.debug.attached()
                && self.shared.debug.step_origin(self.thread.tid).is_some());
        if want != self.single_step {
            tracing::trace!(
                tid = self.thread.tid,
                on = want,
                rip = format_args!("{:#x}", self.vcpu.regs().rip),
                "single-step"
            );
            self.vcpu.set_single_step(want)?;
            self.single_step = want;
        }
        Ok(())
    }

    /// Is `rip` (with code segment `cs`) an instruction of the program, where a step may
    /// end? Not the supervisor's syscall or exception path, not a step-over slot.
    fn at_program_instruction(&self, rip: u64, cs: u16) -> bool {
        cs & 3 == 3
            && rip < crate::arch::x86_64::layout::USER_END
            && !process::lock(&self.shared.proc)
                .rescue
                .in_step_over_page(rip)
    }

    /// A single-step trap: an instruction completed (or a step of the supervisor's path,
    /// or of a displaced instruction, which goes on to the program's next instruction).
    fn on_debug_trap(&mut self) -> Option<End> {
        let rip = self.vcpu.regs().rip;
        let cs = self.vcpu.sregs().cs.selector;
        self.step_trap(rip, cs)
    }

    /// The stepped instruction completed with the thread at `rip` (code segment `cs`).
    fn step_trap(&mut self, rip: u64, cs: u16) -> Option<End> {
        if !self.at_program_instruction(rip, cs) {
            return None;
        }
        if !self.lifted_guards.is_empty() {
            let mut p = process::lock(&self.shared.proc);
            for page in self.lifted_guards.drain(..) {
                p.mm.apply_guard(page);
            }
            drop(p);
            if let Some(w) = self.guard_hit.take() {
                self.shared.debug.report(
                    self.thread.tid,
                    crate::gdb::Stop::Watch {
                        kind: w.kind,
                        addr: w.addr,
                    },
                );
                return None;
            }
        }
        if self.shared.debug.step_origin(self.thread.tid).is_some() {
            self.shared
                .debug
                .report(self.thread.tid, crate::gdb::Stop::DoneStep);
        }
        None
    }

    /// After an exit that finished the stepped instruction without a trap (a syscall, an
    /// emulated branch, a signal delivered): the step is done once the thread is at
    /// another program instruction.
    fn check_step_done(&mut self) {
        let tid = self.thread.tid;
        let Some(origin) = self.shared.debug.step_origin(tid) else {
            return;
        };
        let rip = self.vcpu.regs().rip;
        let cs = self.vcpu.sregs().cs.selector;
        if self.lifted_guards.is_empty() && rip != origin && self.at_program_instruction(rip, cs) {
            self.shared.debug.report(tid, crate::gdb::Stop::DoneStep);
        }
    }

    /// Deliver signals that became deliverable (sent by other threads, the operator, or
    /// unblocked) before the thread re-enters the guest.
    fn deliver_pending(&mut self) -> Result<Option<End>, SandboxError> {
        let shared = self.shared.clone();
        let mut p = ProcGuard::new(&shared.proc);
        let tid = self.thread.tid;
        let mask = self.thread.sigmask;
        if let Some(th) = p.threads.get_mut(&tid) {
            th.sigmask = mask;
        }
        if !p.has_deliverable(tid, mask) {
            return Ok(None);
        }
        let sigs = p.take_deliverable(tid, mask);
        let mut regs = *self.vcpu.regs();
        let mut end = None;
        for info in sigs {
            if let Some(e) = self.raise_signal(&mut p, info, &mut regs) {
                end = Some(e);
                break;
            }
        }
        *self.vcpu.regs_mut() = regs;
        Ok(end)
    }

    fn note_syscall_mode(&self, mode: SyscallMode) {
        let mut seen = self
            .shared
            .syscall_mode
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if *seen != Some(mode) {
            match mode {
                SyscallMode::StayedInUserMode => {
                    tracing::info!("syscall entry: SYSCALL stays at CPL3 (page-table based KVM)")
                }
                SyscallMode::EnteredKernelMode => {
                    tracing::info!("syscall entry: SYSCALL enters CPL0 (hardware KVM)")
                }
            }
            *seen = Some(mode);
        }
    }

    fn on_syscall(&mut self, mode: SyscallMode) -> Result<Option<End>, SandboxError> {
        self.note_syscall_mode(mode);
        let mut regs = *self.vcpu.regs();
        let mut sregs = *self.vcpu.sregs();
        let nr = regs.rax;
        let args = Args([regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9]);
        // The user context to return to, as SYSRET would restore it.
        regs.rip = regs.rcx;
        regs.rflags = (regs.r11 & 0x3c_7fd7) | 0x2;
        let shared = self.shared.clone();
        // The syscall instruction is the two bytes before the return address.
        let call_site = regs.rip.wrapping_sub(2);
        let restart_deadline = match self.stopped_call.take() {
            Some((site, n, d)) if site == call_site && n == nr => Some(d),
            _ => None,
        };
        // A call that only waits: how a stop sees this thread while it waits (the call
        // issued again, from the thread's state at entry).
        // Without an XSAVE image (before the first checkpoint, or if KVM refuses), the thread
        // is simply woken by a stop, like any other.
        let wait_entry = (only_waits(nr, &args) && shared.world.armed())
            .then(|| self.vcpu.fd().get_xsave().ok())
            .flatten()
            .map(|xsave| {
                let mut at_entry = regs;
                at_entry.rip = call_site;
                at_entry.rax = nr;
                let mut sregs_at_entry = sregs;
                // On hardware KVM the exit of a syscall is at CPL0; the call is issued again
                // from user mode.
                sregs_at_entry.cs = crate::arch::x86_64::supervisor::user_code_segment();
                sregs_at_entry.ss = crate::arch::x86_64::supervisor::user_data_segment();
                crate::checkpoint::world::Waiting {
                    regs: at_entry,
                    sregs: sregs_at_entry,
                    thread: self.thread.clone(),
                    interrupted_syscall: self.interrupted_syscall,
                    stopped_call: restart_deadline.map(|d| (call_site, nr, d)),
                    xsave: std::sync::Arc::new(xsave),
                    waiter: None,
                    kicker: crate::kick::Kicker::current(),
                }
            });
        // The handler runs with the process locked; the lock is taken again afterwards for
        // what follows the return (a second uncontended lock is cheaper than tying every
        // register borrow to the guard's lifetime).
        let (ret, sregs_changed, control, raised, deadline, stopped_during, abandoned) = {
            let mut proc = ProcGuard::new(&shared.proc);
            let in_window = proc.rescue.has_window(self.thread.tid);
            proc.fds.set_may_commit_early(in_window);
            let mut ctx = SyscallCtx {
                proc,
                thread: &mut self.thread,
                regs: &mut regs,
                sregs: &mut sregs,
                sregs_changed: false,
                control: Control::Return,
                raised: Vec::new(),
                port_map: &shared.port_map,
                world: &shared.world,
                restart_deadline,
                deadline: None,
                wait_entry,
                stopped_during: false,
                abandoned: None,
            };
            let ret = syscalls::dispatch(&mut ctx, nr, &args);
            (
                ret,
                ctx.sregs_changed,
                std::mem::replace(&mut ctx.control, Control::Return),
                std::mem::take(&mut ctx.raised),
                ctx.deadline,
                ctx.stopped_during,
                ctx.abandoned.take(),
            )
        };
        if let Some((mut order, generation)) = abandoned {
            // A rollback happened while this call waited: its result belongs to a history
            // that no longer exists. The vCPU still holds the state of the syscall's exit,
            // not the rewound one the stop saw: the registers are always loaded.
            if let Order::Restore { load_cpu, .. } = &mut order {
                *load_cpu = true;
            }
            let ack = apply_order(&mut self.vcpu, &order);
            let end = self.take_order(order);
            self.shared
                .world
                .ack_and_wait(self.thread.tid, ack, generation);
            return Ok(end);
        }
        let mut p = ProcGuard::new(&shared.proc);
        if (ret as i64) > 0 && moves_data(nr) {
            p.fds.note_io(args.0[0] as i64);
            if nr == 40 || nr == 275 || nr == 276 || nr == 326 {
                // The other end too: sendfile(out, in), tee(in, out), splice and
                // copy_file_range(in, off, out, ...).
                p.fds
                    .note_io(args.0[if nr == 40 || nr == 276 { 1 } else { 2 }] as i64);
            }
        }
        if p.fds.take_early_commit() {
            // docs/rescue-points.md: a window waiting for a peer that needs its held output.
            tracing::info!(
                tid = self.thread.tid,
                "held output released early: a rescue window waits for a peer that needs it (a rollback of that window closes the connection)"
            );
        }
        if ret == EINTR_RET
            && matches!(control, Control::Return)
            && raised.is_empty()
            && (self.shared.world.stop_requested() || stopped_during)
            && !p.has_deliverable(self.thread.tid, self.thread.sigmask)
        {
            // Interrupted only to stop for a checkpoint: the guest never sees the EINTR. The
            // thread parks before the syscall instruction with the call's arguments intact
            // and issues it again when it runs on (after a rollback too), as Linux restarts
            // a call interrupted by a signal that runs no handler.
            if let Some(mask) = self.thread.suspend_restore.take() {
                self.thread.sigmask = mask;
            }
            regs.rax = nr;
            regs.rip = call_site;
            self.interrupted_syscall = None;
            self.stopped_call = deadline.map(|d| (call_site, nr, d));
            if sregs_changed || mode == SyscallMode::EnteredKernelMode {
                *self.vcpu.sregs_mut() = sregs;
            }
            if mode == SyscallMode::EnteredKernelMode {
                self.vcpu.enter_user_mode();
            }
            *self.vcpu.regs_mut() = regs;
            return Ok(None);
        }
        self.interrupted_syscall = (ret == EINTR_RET).then_some((nr, regs.rip));
        match control {
            Control::Return => regs.rax = ret,
            Control::ExitGroup(status) => {
                return Ok(Some(End::Process(RunOutcome::Exited(status))))
            }
            Control::ExitThread(status) => return Ok(Some(self.exit_thread(&mut p, status))),
            Control::Fork(req) => match self.fork(&mut p, &req, &regs, &sregs) {
                // In the child: the new vCPU already holds the child's full state.
                Ok(0) => return Ok(None),
                Ok(pid) => regs.rax = pid,
                Err(e) => regs.rax = e.to_return(),
            },
            Control::SpawnThread(req) => {
                regs.rax = match self.spawn_thread(&mut p, &req, &regs, &sregs) {
                    Ok(tid) => tid as u64,
                    Err(e) => e.to_return(),
                }
            }
            Control::Replaced(xsave) => {
                if let Some(image) = xsave {
                    if self.restore_xsave(&image).is_err() {
                        let info = SigInfo::kernel(libc::SIGSEGV);
                        let end =
                            self.force_signal(&mut p, info, &mut regs, "bad signal frame", None);
                        *self.vcpu.regs_mut() = regs;
                        return Ok(end);
                    }
                }
            }
        }
        if sregs_changed || mode == SyscallMode::EnteredKernelMode {
            *self.vcpu.sregs_mut() = sregs;
        }
        if mode == SyscallMode::EnteredKernelMode {
            self.vcpu.enter_user_mode();
        }
        for info in raised {
            if is_crash_signal(info.signo)
                && p.rescue
                    .window_for_crash(self.thread.tid, regs.rsp)
                    .is_some()
            {
                // abort() and friends inside a rescue window: rescued at the loop's top.
                let cause = if info.signo == libc::SIGABRT {
                    "abort"
                } else {
                    "raise"
                };
                self.pending_fault = Some(Fault {
                    info,
                    regs,
                    cause: cause.into(),
                    exc: None,
                    synchronous: false,
                    shown_to_debugger: false,
                });
                *self.vcpu.regs_mut() = regs;
                return Ok(None);
            }
            if let Some(end) = self.raise_signal(&mut p, info, &mut regs) {
                return Ok(Some(end));
            }
        }
        // Signals pending for this thread from others (an rt_sigsuspend ends with one).
        let sigs = p.take_deliverable(self.thread.tid, self.thread.sigmask);
        for info in sigs {
            if let Some(end) = self.raise_signal(&mut p, info, &mut regs) {
                return Ok(Some(end));
            }
        }
        if let Some(mask) = self.thread.suspend_restore.take() {
            // No handler ran (the signal was ignored): the old mask comes back now.
            self.thread.sigmask = mask;
        }
        *self.vcpu.regs_mut() = regs;
        Ok(None)
    }

    /// The calling thread exits: CLONE_CHILD_CLEARTID is honoured (pthread_join waits on
    /// it); the process ends with the last thread.
    fn exit_thread(&mut self, p: &mut Process, status: i32) -> End {
        let tid = self.thread.tid;
        release_robust_futexes(p, tid, self.thread.robust_list);
        let ctid = self.thread.clear_child_tid;
        if ctid != 0 && p.mm.write(ctid, &0u32.to_le_bytes()).is_ok() {
            p.futexes.wake(ctid, 1, u32::MAX);
        }
        p.threads.remove(&tid);
        if p.threads.is_empty() {
            End::Process(RunOutcome::Exited(status))
        } else {
            tracing::debug!(tid, status, "guest thread exited");
            End::Thread
        }
    }

    /// A new guest thread: a new vCPU in the same VM, on a new host thread, sharing the
    /// process.
    fn spawn_thread(
        &mut self,
        p: &mut Process,
        req: &ThreadRequest,
        regs: &kvm_regs,
        sregs: &kvm_sregs,
    ) -> Result<i32, Errno> {
        let xsave = self.vcpu.fd().get_xsave().map_err(|_| Errno::EAGAIN)?;
        let pooled = self
            .shared
            .vcpu_pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .pop();
        let mut vcpu = match pooled {
            Some(v) => v,
            None => {
                let id = self.shared.next_vcpu_id.fetch_add(1, Ordering::SeqCst);
                let h = self.shared.vm.lock().unwrap_or_else(|e| e.into_inner());
                if id >= crate::arch::x86_64::layout::MAX_VCPUS
                    || id >= h.kvm.get_max_vcpus() as u64
                {
                    return Err(Errno::EAGAIN);
                }
                p.mm.install_vcpu(id).map_err(|_| Errno::ENOMEM)?;
                Vcpu::new(&h.kvm, &h.vm, id, p.mm.page_table_root()).map_err(|e| {
                    tracing::warn!(error = %e, "cannot create a vCPU for a new thread");
                    Errno::EAGAIN
                })?
            }
        };
        let (child_regs, child_sregs) = child_context(vcpu.id(), regs, sregs, req.stack, req.tls);
        vcpu.set_state(&child_regs, &child_sregs)
            .map_err(|_| Errno::EAGAIN)?;
        // SAFETY: an image KVM produced for the parent vCPU of the same VM.
        unsafe { vcpu.fd().set_xsave(&xsave) }.map_err(|_| Errno::EAGAIN)?;
        p.next_tid += 1;
        let tid = p.next_tid;
        let mut thread = Thread::new(tid);
        thread.sigmask = self.thread.sigmask;
        if let Some(ctid) = req.child_cleartid {
            thread.clear_child_tid = ctid;
        }
        for addr in [req.parent_settid, req.child_settid].into_iter().flatten() {
            p.mm.write(addr, &tid.to_le_bytes())?;
        }
        p.threads.insert(
            tid,
            ThreadShared {
                sigmask: thread.sigmask,
                ..Default::default()
            },
        );
        let runner = Runner::new(self.shared.clone(), vcpu, thread);
        if let Err(e) = runner.spawn() {
            tracing::warn!(error = %e, "cannot start a host thread for a guest thread");
            p.threads.remove(&tid);
            return Err(Errno::EAGAIN);
        }
        tracing::debug!(tid, "guest thread started");
        Ok(tid)
    }

    /// Guest fork: the VMM process forks. The child has a copy-on-write copy of guest memory
    /// and of every host fd, and builds its own VM and vCPU over them (KVM objects belong to
    /// the process that created them). Only the calling thread exists in the child, as on
    /// Linux. Returns the child's pid in the parent, 0 in the child.
    fn fork(
        &mut self,
        p: &mut Process,
        req: &ForkRequest,
        regs: &kvm_regs,
        sregs: &kvm_sregs,
    ) -> Result<u64, Errno> {
        let xsave = self.vcpu.fd().get_xsave().map_err(|_| Errno::EAGAIN)?;
        // The process lock is held (by this thread) across the fork, so the child's copy of
        // the process is consistent.
        // SAFETY: the child only continues this thread's work; other host threads do not
        // exist in it and their state is discarded below.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(Errno::last());
        }
        if pid > 0 {
            if let Some(addr) = req.parent_settid {
                p.mm.write(addr, &pid.to_le_bytes()).ok();
            }
            tracing::debug!(child = pid, "guest forked");
            return Ok(pid as u64);
        }
        if let Err(e) = self.become_child(p, req, regs, sregs, &xsave) {
            report!("assure-vmm: forked child cannot start: {e}");
            // SAFETY: leaving the child process without running the parent's destructors.
            unsafe { libc::_exit(125) };
        }
        Ok(0)
    }

    fn become_child(
        &mut self,
        p: &mut Process,
        req: &ForkRequest,
        regs: &kvm_regs,
        sregs: &kvm_sregs,
        xsave: &kvm_xsave,
    ) -> Result<(), SandboxError> {
        let kvm = kvm_ioctls::Kvm::new().map_err(SandboxError::KvmUnavailable)?;
        let vm = kvm.create_vm().map_err(|source| SandboxError::Kvm {
            op: "create VM",
            source,
        })?;
        register_memory(&vm, &p.mm)?;
        let mut vcpu = Vcpu::new(&kvm, &vm, 0, p.mm.page_table_root())?;
        let (child_regs, child_sregs) =
            child_context(vcpu.id(), regs, sregs, req.child_stack, req.tls);
        vcpu.set_state(&child_regs, &child_sregs)?;
        // SAFETY: an image KVM itself produced for the parent's vCPU.
        unsafe { vcpu.fd().set_xsave(xsave) }.map_err(|source| SandboxError::Kvm {
            op: "restore XSAVE in child",
            source,
        })?;
        crate::kick::register_immediate_exit(&mut vcpu.kvm_run_mut().immediate_exit);
        // Dropping the parent's KVM objects only closes this process's copies of their fds.
        self.vcpu = vcpu;
        self.shared
            .vcpu_pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
        *self.shared.vm.lock().unwrap_or_else(|e| e.into_inner()) = VmHandles { kvm, vm };
        self.shared.forked_child.store(true, Ordering::SeqCst);
        // The gdb session stays with the parent; the child's breakpoints are stepped over.
        self.shared.debug.detach();
        p.mm.clear_guards();
        let pid = std::process::id() as i32;
        p.pid = pid;
        p.next_tid = pid;
        p.threads.clear();
        p.threads.insert(
            pid,
            ThreadShared {
                sigmask: self.thread.sigmask,
                kicker: Some(crate::kick::Kicker::current()),
                ..Default::default()
            },
        );
        p.process_pending.clear();
        p.futexes = Default::default();
        // The parent's deferred unlinks are the parent's to undo or complete.
        p.fs.removals.detach();
        self.thread.tid = pid;
        self.thread.pending.clear();
        if let Some(addr) = req.child_settid {
            p.mm.write(addr, &pid.to_le_bytes()).ok();
        }
        if let Some(addr) = req.child_cleartid {
            self.thread.clear_child_tid = addr;
        }
        Ok(())
    }

    fn on_exception(&mut self, vector: u8) -> Result<Option<End>, SandboxError> {
        let regs = *self.vcpu.regs();
        let cr2 = self.vcpu.sregs().cr2;
        let shared = self.shared.clone();
        let mut p = ProcGuard::new(&shared.proc);
        if let Some(s) = p.stats.as_mut() {
            s.exceptions += 1;
        }
        let mut frame = [0u8; 48];
        if !p.mm.read_supervisor(regs.rsp, &mut frame) {
            return Err(SandboxError::GuestFatal(format!(
                "exception {vector} with a bad ring-0 stack {:#x}",
                regs.rsp
            )));
        }
        let word =
            |i: usize| u64::from_le_bytes(frame[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
        let (error_code, rip, cs, rflags, rsp) = (word(0), word(1), word(2), word(3), word(4));
        if cs & 3 != 3 {
            return Err(SandboxError::GuestFatal(format!(
                "{} in the supervisor at {rip:#x} (error {error_code:#x}, cr2 {cr2:#x})",
                events::vector_name(vector)
            )));
        }
        let mut user = regs;
        user.rip = rip;
        user.rsp = rsp;
        user.rflags = rflags;
        self.vcpu.enter_user_mode();
        if vector == 1 && self.single_step {
            // Page-table based KVM delivers the single-step trap it was asked for through
            // the guest's IDT: ours, not the program's. Its trap flag is ours too.
            user.rflags &= !0x100;
            *self.vcpu.regs_mut() = user;
            drop(p);
            return Ok(self.step_trap(rip, crate::arch::x86_64::layout::selector::USER_CS));
        }
        let (signo, code, addr) = match vector {
            14 => match p.mm.handle_fault(cr2, PageFaultCode(error_code)) {
                FaultOutcome::Resolved => {
                    *self.vcpu.regs_mut() = user;
                    return Ok(None);
                }
                FaultOutcome::Guarded => {
                    // A debugger watches the page: let this one access through, step it,
                    // and report it (on_debug_trap) if it touched a watched range, by
                    // its width as the instruction says (the widest if it cannot tell).
                    let mut code = [0u8; 15];
                    let n = (0..code.len())
                        .take_while(|&i| p.mm.peek(rip.wrapping_add(i as u64), &mut code[i..i + 1]))
                        .count();
                    let size =
                        introspect::decode::memory_access_size(&code[..n], rip).unwrap_or(64);
                    let hit =
                        self.shared
                            .debug
                            .watch_hit(cr2, size, PageFaultCode(error_code).write());
                    p.mm.lift_guard(cr2);
                    self.lifted_guards.push(cr2 & !0xfff);
                    if self.guard_hit.is_none() {
                        self.guard_hit = hit;
                    }
                    *self.vcpu.regs_mut() = user;
                    return Ok(None);
                }
                FaultOutcome::NotMapped => (libc::SIGSEGV, 1, cr2),
                FaultOutcome::AccessDenied => (libc::SIGSEGV, 2, cr2),
            },
            0 => (libc::SIGFPE, 1, rip),   // FPE_INTDIV
            1 => (libc::SIGTRAP, 2, rip),  // TRAP_TRACE
            3 => (libc::SIGTRAP, 0x80, 0), // SI_KERNEL
            6 => (libc::SIGILL, 2, rip),   // ILL_ILLOPN
            16 | 19 => (libc::SIGFPE, 0, rip),
            11 | 12 => (libc::SIGBUS, 0x80, 0),
            17 => (libc::SIGBUS, 1, cr2), // BUS_ADRALN
            _ => (libc::SIGSEGV, 0x80, 0),
        };
        // A signal for the displaced instruction of a breakpoint, run in its step-over
        // slot, is the instruction's at its own address (a resolved demand fault above just
        // retries in the slot).
        let (rip, addr) = match p.rescue.original_of_slot(rip) {
            Some(orig) => (orig, if addr == rip { orig } else { addr }),
            None => (rip, addr),
        };
        user.rip = rip;
        let info = SigInfo {
            signo,
            code,
            addr,
            pid: 0,
            uid: 0,
            trapno: u64::from(vector),
            err: error_code,
        };
        let exc = ExceptionInfo {
            vector,
            name: events::vector_name(vector),
            error_code,
        };
        // Inside a rescue window the fault is rescued; with gdb attached, gdb sees it
        // first. Both at the loop's top (handle_fault), where the thread's state is whole.
        if p.rescue
            .window_for_crash(self.thread.tid, user.rsp)
            .is_some()
            || self.shared.debug.attached()
        {
            *self.vcpu.regs_mut() = user;
            self.pending_fault = Some(Fault {
                info,
                regs: user,
                cause: "cpu exception".into(),
                exc: Some(exc),
                synchronous: true,
                shown_to_debugger: false,
            });
            return Ok(None);
        }
        let end = self.force_signal(&mut p, info, &mut user, "cpu exception", Some(exc));
        *self.vcpu.regs_mut() = user;
        Ok(end)
    }

    /// Run a checkpoint-engine operation from this runner. While another stop holds the
    /// engine or the world, this thread takes part in it (parks), then tries again.
    fn engine_op<T>(
        &mut self,
        mut op: impl FnMut(&mut Self) -> Result<T, CheckpointError>,
    ) -> Result<EngineOp<T>, SandboxError> {
        let restores = self.restores;
        loop {
            match op(self) {
                Err(CheckpointError::Stop(StopError::Busy)) => {
                    if self.shared.world.stop_requested() {
                        if let Some(end) = self.park()? {
                            self.ended = Some(end);
                            return Ok(EngineOp::Ended);
                        }
                        if self.restores != restores {
                            return Ok(EngineOp::Overtaken);
                        }
                    } else {
                        std::thread::yield_now();
                    }
                }
                r => return Ok(EngineOp::Done(r)),
            }
        }
    }

    /// Close this thread's windows with checkpoints `ids` (`returned`: their functions
    /// returned). False if a rollback by another thread overtook this one meanwhile (its
    /// state and windows are the checkpoint's now: what it was doing is void).
    fn close_windows(&mut self, ids: &[u64], returned: bool) -> Result<bool, SandboxError> {
        if ids.is_empty() {
            return Ok(true);
        }
        let (shared, tid) = (self.shared.clone(), self.thread.tid);
        match self.engine_op(|_| checkpoint::close_windows(&shared, tid, ids, returned, true))? {
            EngineOp::Done(Ok(())) => Ok(true),
            EngineOp::Done(Err(e)) => {
                tracing::warn!(error = %e, "rescue windows not closed");
                Ok(true)
            }
            EngineOp::Overtaken | EngineOp::Ended => Ok(false),
        }
    }

    /// Open a window of rescue point `point` for this thread at its entry (`at`: RIP on
    /// the breakpoint, RSP at the return address), `stepped` being its registers past the
    /// displaced instruction: a checkpoint in which this thread is already inside the
    /// function. Until the checkpoint is taken the thread stays *before* the breakpoint, so
    /// that a stop by another thread meanwhile sees it there (and a rollback to that stop
    /// makes it enter again). False if a rollback overtook this thread meanwhile. If no
    /// checkpoint can be taken at all (too many live), the call runs without a window.
    fn open_window(
        &mut self,
        point: usize,
        at: &kvm_regs,
        stepped: &kvm_regs,
        return_to: u64,
    ) -> Result<bool, SandboxError> {
        let tid = self.thread.tid;
        let shared = self.shared.clone();
        *self.vcpu.regs_mut() = *at;
        let window = crate::rescue::Window {
            point,
            name: String::new(),
            checkpoint: 0,
            entry_rsp: at.rsp,
            return_to,
            opened: std::time::Instant::now(),
            deadline: None,
        };
        let outcome = self.engine_op(|me| {
            let mut state = me
                .thread_state()
                .map_err(|e| CheckpointError::Cpu(e.to_string()))?;
            state.cpu.regs = *stepped;
            checkpoint::checkpoint_as(&shared, false, Some((tid, state)), Some(window.clone()))
        })?;
        match outcome {
            EngineOp::Done(Ok(rep)) => {
                *self.vcpu.regs_mut() = *stepped;
                process::lock(&shared.proc).rescue.note_window_opened(
                    point,
                    std::time::Instant::now(),
                    &rep.timing_us,
                    rep.dirty_pages,
                );
                crate::rescue::watchdog::wake(&shared);
                Ok(true)
            }
            EngineOp::Done(Err(e)) => {
                tracing::debug!(error = %e, "rescue window not opened");
                *self.vcpu.regs_mut() = *stepped;
                let mut p = process::lock(&shared.proc);
                let pm = &mut *p;
                pm.rescue.window_skipped(point);
                pm.rescue.drop_return_site(return_to, &mut pm.mm);
                Ok(true)
            }
            EngineOp::Overtaken | EngineOp::Ended => Ok(false),
        }
    }

    /// Rescue a crash of this thread inside a window: roll the sandbox back to the window's
    /// checkpoint, with this thread returning the point's error value to the function's
    /// caller. False if there is no window or the point is quarantined (the crash goes on).
    fn rescue(&mut self, fault: &Fault) -> Result<bool, SandboxError> {
        let tid = self.thread.tid;
        let t_fault = std::time::Instant::now();
        let shared = self.shared.clone();
        if shared.forked_child.load(Ordering::SeqCst) {
            return Ok(false);
        }
        let (window, crash, value) = {
            let mut p = process::lock(&shared.proc);
            let Some(w) = p.rescue.window_for_crash(tid, fault.regs.rsp) else {
                return Ok(false);
            };
            let crash = describe_crash(
                &p,
                tid,
                &fault.info,
                &fault.regs,
                &fault.cause,
                fault.exc.clone(),
            );
            let Some((value, name, max)) = p.rescue.point_info(w.point) else {
                return Ok(false);
            };
            if !p.rescue.admit_recovery(w.point, t_fault, false) {
                drop(p);
                shared
                    .events()
                    .quarantine(&events::QuarantineEvent::new(crash, name, max));
                return Ok(false);
            }
            (w, crash, value)
        };
        let mut adjust = crate::rescue::watchdog::error_return(tid, &window, value);
        let outcome = self.engine_op(|me| {
            let state = me
                .thread_state()
                .map_err(|e| CheckpointError::Cpu(e.to_string()))?;
            checkpoint::rollback_as(
                &shared,
                Some(window.checkpoint),
                false,
                Some((tid, state)),
                &mut adjust,
                &mut |_, _| {},
            )
        })?;
        let (report, mine) = match outcome {
            EngineOp::Done(Ok(r)) => r,
            EngineOp::Done(Err(e)) => {
                tracing::warn!(error = %e, "cannot roll back to the rescue window; the crash goes on");
                return Ok(false);
            }
            // Another rollback moved this thread elsewhere: the crash is gone with it.
            EngineOp::Overtaken | EngineOp::Ended => return Ok(true),
        };
        let Some(mine) = mine else {
            return Err(SandboxError::GuestFatal(
                "a rescued thread is missing from its window's checkpoint".into(),
            ));
        };
        self.vcpu.restore_state(&mine.cpu)?;
        self.adopt(&mine);
        // The function returned its error value: its window closes.
        self.close_windows(&[window.checkpoint], false)?;
        let event = events::RecoveryEvent {
            crash,
            rescue_point: window.name.clone(),
            checkpoint: window.checkpoint,
            error_value: value.to_json(),
            restored_pages: report.restored_pages,
            rollback_us: report.timing_us.total,
            recovery_us: t_fault.elapsed().as_secs_f64() * 1e6,
        };
        shared.events().recovery(&event);
        Ok(true)
    }

    /// A user-mode `out dx, al` exit: one of the VMM's breakpoints? Then handle it (true).
    fn on_port_breakpoint(&mut self) -> Result<bool, SandboxError> {
        let shared = self.shared.clone();
        let mut p = ProcGuard::new(&shared.proc);
        if !p.rescue.has_breakpoints() {
            return Ok(false);
        }
        // Page-table based KVM completes the `out` before exiting (RIP is past its one
        // byte); hardware KVM exits with RIP on it.
        let rip = self.vcpu.regs().rip;
        let hardware = *self
            .shared
            .syscall_mode
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            == Some(SyscallMode::EnteredKernelMode);
        let addr = if hardware { rip } else { rip.wrapping_sub(1) };
        let mut at = *self.vcpu.regs();
        at.rip = addr;
        let sregs = self.vcpu.sregs();
        let seg = (sregs.fs.base, sregs.gs.base);
        let pm = &mut *p;
        if self.shared.debug.attached() && pm.rescue.debug_breakpoint_at(addr) {
            // gdb's breakpoint: stop on it, before the instruction (and before any rescue
            // point here, which runs when gdb resumes the thread with its breakpoint
            // lifted).
            drop(p);
            *self.vcpu.regs_mut() = at;
            self.shared
                .debug
                .report(self.thread.tid, crate::gdb::Stop::Breakpoint);
            return Ok(true);
        }
        match pm.rescue.hit(addr, &at, seg, &mut pm.mm) {
            Some(hit) => {
                self.on_rescue_trap(p, at, hit)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// A crash: rescued if the thread is inside a rescue window (and the point is not
    /// quarantined), else delivered or fatal as on Linux.
    fn handle_fault(&mut self, mut fault: Fault) -> Result<Option<End>, SandboxError> {
        if !fault.shown_to_debugger && self.rescue(&fault)? {
            return Ok(None);
        }
        let tid = self.thread.tid;
        if fault.synchronous && self.shared.debug.attached() {
            if !fault.shown_to_debugger {
                // Stop in gdb at the faulting instruction, before the signal is delivered.
                fault.shown_to_debugger = true;
                *self.vcpu.regs_mut() = fault.regs;
                let signo = fault.info.signo;
                self.pending_fault = Some(fault);
                self.shared
                    .debug
                    .report(tid, crate::gdb::Stop::Signal(signo));
                return Ok(None);
            }
            if self.shared.debug.resume_signal(tid) != Some(Some(fault.info.signo)) {
                // gdb resumed the thread without passing the signal on (`signal 0`, or
                // `handle SIGSEGV nopass`): it runs the instruction again.
                return Ok(None);
            }
        }
        let shared = self.shared.clone();
        let mut p = ProcGuard::new(&shared.proc);
        let mut regs = fault.regs;
        let end = if fault.synchronous {
            self.force_signal(&mut p, fault.info, &mut regs, &fault.cause, fault.exc)
        } else {
            self.raise_signal(&mut p, fault.info, &mut regs)
        };
        *self.vcpu.regs_mut() = regs;
        Ok(end)
    }

    /// An int3 of the VMM's: close windows whose function returned, open one if a rescue
    /// point is entered, inject a fault if one is due, and step over the displaced
    /// instruction.
    fn on_rescue_trap(
        &mut self,
        mut p: ProcGuard<'_>,
        at: kvm_regs,
        hit: crate::rescue::Hit,
    ) -> Result<Option<End>, SandboxError> {
        let tid = self.thread.tid;
        let now = std::time::Instant::now();
        let pm = &mut *p;
        // Windows whose functions returned here, or were left by a longjmp.
        let mut finished = Vec::new();
        if hit.is_return {
            finished.extend(pm.rescue.finished_windows(tid, at.rsp, false));
        }
        if !hit.entries.is_empty() {
            finished.extend(pm.rescue.finished_windows(tid, at.rsp, true));
        }
        finished.dedup();
        let stepped = match hit.stepped {
            Ok(r) => r,
            Err(addr) => {
                // The emulated branch touched memory the guest cannot: its own fault.
                drop(p);
                *self.vcpu.regs_mut() = at;
                if !self.close_windows(&finished, true)? {
                    return Ok(None);
                }
                self.pending_fault = Some(Fault {
                    info: SigInfo {
                        signo: libc::SIGSEGV,
                        code: 1,
                        addr,
                        pid: 0,
                        uid: 0,
                        trapno: 14,
                        err: 0,
                    },
                    regs: at,
                    cause: "cpu exception".into(),
                    exc: None,
                    synchronous: true,
                    shown_to_debugger: false,
                });
                return Ok(None);
            }
        };
        let mut open = None;
        if !self.shared.forked_child.load(Ordering::SeqCst) {
            open = hit
                .entries
                .iter()
                .copied()
                .find(|&i| pm.rescue.wants_window(i, now));
        }
        let mut return_to = 0;
        if let Some(i) = open {
            let mut b = [0u8; 8];
            let readable = pm.mm.read(at.rsp, &mut b).is_ok();
            return_to = u64::from_le_bytes(b);
            if !readable || pm.rescue.hold_return_site(return_to, &mut pm.mm).is_err() {
                pm.rescue.window_skipped(i);
                open = None;
            }
        }
        let hang_stub = pm.rescue.hang_stub();
        drop(p);
        // Until the windows are closed and the new one open, the thread stays on the
        // breakpoint: a rollback by another thread meanwhile voids all of this.
        *self.vcpu.regs_mut() = at;
        if !self.close_windows(&finished, true)? {
            return Ok(None);
        }
        match open {
            Some(point) => {
                if !self.open_window(point, &at, &stepped, return_to)? {
                    return Ok(None);
                }
            }
            None => *self.vcpu.regs_mut() = stepped,
        }
        let Some((_, kind)) = hit.faults.first().copied() else {
            return Ok(None);
        };
        use crate::rescue::spec::FaultKind;
        let (info, cause) = match kind {
            FaultKind::Hang => {
                if let Some(stub) = hang_stub {
                    self.vcpu.regs_mut().rip = stub;
                }
                return Ok(None);
            }
            FaultKind::Segv => (
                SigInfo {
                    signo: libc::SIGSEGV,
                    code: 1, // SEGV_MAPERR
                    addr: 0,
                    pid: 0,
                    uid: 0,
                    trapno: 14,
                    err: 4,
                },
                "injected segv",
            ),
            FaultKind::Abort => {
                let pid = process::lock(&self.shared.proc).pid;
                (
                    SigInfo {
                        signo: libc::SIGABRT,
                        code: -6, // SI_TKILL, as raise() sends it
                        addr: 0,
                        pid,
                        uid: 0,
                        trapno: 0,
                        err: 0,
                    },
                    "injected abort",
                )
            }
        };
        // The fault shows at the function's first instruction, before it ran.
        *self.vcpu.regs_mut() = at;
        self.pending_fault = Some(Fault {
            info,
            regs: at,
            cause: cause.into(),
            exc: None,
            synchronous: kind == FaultKind::Segv,
            shown_to_debugger: false,
        });
        Ok(None)
    }

    /// A synchronous fault: delivered if caught and not blocked, else it kills (Linux's
    /// force_sig: a blocked or ignored fault signal still kills).
    fn force_signal(
        &mut self,
        p: &mut Process,
        info: SigInfo,
        regs: &mut kvm_regs,
        cause: &str,
        exc: Option<ExceptionInfo>,
    ) -> Option<End> {
        let sig = info.signo;
        let blocked = self.thread.sigmask & signal::bit(sig) != 0;
        if p.signals.is_caught(sig) && !blocked {
            let event = self.crash_event(p, &info, regs, cause, exc.clone());
            if self.deliver(p, &info, regs).is_ok() {
                self.delivered_fault = Some(event);
                return None;
            }
            let segv = SigInfo {
                signo: libc::SIGSEGV,
                code: 0x80,
                ..info
            };
            return Some(self.die(p, &segv, regs, "unusable signal stack", exc));
        }
        Some(self.die(p, &info, regs, cause, exc))
    }

    /// A signal for this thread (raised by its syscall, sent by another thread or process,
    /// or by the operator).
    fn raise_signal(&mut self, p: &mut Process, info: SigInfo, regs: &mut kvm_regs) -> Option<End> {
        let sig = info.signo;
        if self.thread.sigmask & signal::bit(sig) != 0 {
            if let Some(th) = p.threads.get_mut(&self.thread.tid) {
                if !th.pending.iter().any(|s| s.signo == sig) {
                    th.pending.push(info);
                }
            }
            return None;
        }
        if p.signals.is_ignored(sig) {
            return None;
        }
        if p.signals.is_caught(sig) {
            // A syscall interrupted by this signal restarts after the handler if it asks so.
            if let Some((nr, ret_rip)) = self.interrupted_syscall.take() {
                if p.signals.get(sig).flags & signal::SA_RESTART != 0
                    && restarts_with_sa_restart(nr)
                    && regs.rip == ret_rip
                    && regs.rax == EINTR_RET
                {
                    regs.rax = nr;
                    regs.rip -= 2;
                }
            }
            if self.deliver(p, &info, regs).is_ok() {
                return None;
            }
            let segv = SigInfo {
                signo: libc::SIGSEGV,
                code: 0x80,
                ..info
            };
            return Some(self.die(p, &segv, regs, "unusable signal stack", None));
        }
        match signal::default_action(sig) {
            DefaultAction::Ignore | DefaultAction::StopOrContinue => None,
            DefaultAction::Terminate | DefaultAction::Core => {
                let cause = match info.code {
                    _ if sig == libc::SIGPIPE => "a write to a broken pipe",
                    -6 => "tgkill",
                    0 if info.pid == 0 => "signal from the operator",
                    _ => "kill",
                };
                Some(self.die(p, &info, regs, cause, None))
            }
        }
    }

    fn deliver(
        &mut self,
        p: &mut Process,
        info: &SigInfo,
        regs: &mut kvm_regs,
    ) -> Result<(), Errno> {
        let sig = info.signo;
        let action = p.signals.get(sig);
        let xsave = self.vcpu.fd().get_xsave().map_err(|_| Errno::EFAULT)?;
        let image: Vec<u8> = xsave.region.iter().flat_map(|w| w.to_le_bytes()).collect();
        // After rt_sigsuspend the handler's frame restores the mask from before the call.
        let old_mask = self
            .thread
            .suspend_restore
            .take()
            .unwrap_or(self.thread.sigmask);
        let extras = FrameExtras {
            cr2: if info.trapno == 14 { info.addr } else { 0 },
            old_mask,
            altstack: self.thread.altstack,
        };
        signal::deliver(&mut p.mm, regs, &action, info, &extras, &image)?;
        let mut mask = self.thread.sigmask | action.mask;
        if action.flags & signal::SA_NODEFER == 0 {
            mask |= signal::bit(sig);
        }
        self.thread.sigmask = mask & !(signal::bit(libc::SIGKILL) | signal::bit(libc::SIGSTOP));
        if action.flags & signal::SA_RESETHAND != 0 {
            p.signals.set(sig, signal::SigAction::default()).ok();
        }
        tracing::debug!(signal = %signal::name(sig), handler = format_args!("{:#x}", action.handler), "signal delivered to guest handler");
        Ok(())
    }

    fn restore_xsave(&mut self, image: &[u8]) -> Result<(), Errno> {
        let mut xsave = kvm_xsave::default();
        for (w, chunk) in xsave.region.iter_mut().zip(image.chunks_exact(4)) {
            *w = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        }
        // SAFETY: a plain 4 KiB kvm_xsave; KVM validates its contents and rejects invalid
        // feature bits, which we report as a bad frame.
        unsafe { self.vcpu.fd().set_xsave(&xsave) }.map_err(|_| Errno::EINVAL)
    }

    fn die(
        &mut self,
        p: &mut Process,
        info: &SigInfo,
        regs: &kvm_regs,
        cause: &str,
        exc: Option<ExceptionInfo>,
    ) -> End {
        let event = match self.delivered_fault.take() {
            // The guest's handler ran and re-raised the same signal: report the fault.
            Some(e) if e.signal == info.signo => e,
            _ => self.crash_event(p, info, regs, cause, exc),
        };
        self.shared.events().crash(&event);
        End::Process(RunOutcome::Killed(info.signo))
    }

    fn crash_event(
        &self,
        p: &Process,
        info: &SigInfo,
        regs: &kvm_regs,
        cause: &str,
        exc: Option<ExceptionInfo>,
    ) -> CrashEvent {
        describe_crash(p, self.thread.tid, info, regs, cause, exc)
    }
}

/// A crash of thread `tid` as an event: signal, place, symbolized backtrace.
pub(crate) fn describe_crash(
    p: &Process,
    tid: i32,
    info: &SigInfo,
    regs: &kvm_regs,
    cause: &str,
    exc: Option<ExceptionInfo>,
) -> CrashEvent {
    {
        let unwind = introspect::UnwindRegs {
            rip: regs.rip,
            rsp: regs.rsp,
            rbp: regs.rbp,
            rbx: regs.rbx,
            r12: regs.r12,
            r13: regs.r13,
            r14: regs.r14,
            r15: regs.r15,
        };
        let mm = &p.mm;
        let mut read = |addr: u64, buf: &mut [u8]| mm.peek(addr, buf);
        let frames = p.symbols.backtrace(&unwind, &mut read, 64);
        let backtrace = frames
            .iter()
            .map(|f| {
                let sym = f
                    .symbol
                    .clone()
                    .or_else(|| p.symbols.describe(f.pc))
                    .unwrap_or_else(|| "??".into());
                match &f.module {
                    Some(m) => format!("{:#x} {sym} ({m})", f.pc),
                    None => format!("{:#x} {sym}", f.pc),
                }
            })
            .collect();
        let has_addr =
            matches!(info.signo, 4 | 5 | 7 | 8 | 11) && info.code > 0 && info.code != 0x80;
        CrashEvent {
            time: events::now(),
            tid,
            signal: info.signo,
            signal_name: signal::name(info.signo),
            si_code: info.code,
            cause: cause.to_string(),
            rip: regs.rip,
            fault_address: has_addr
                .then_some(info.addr)
                .or(exc.as_ref().filter(|e| e.vector == 14).map(|_| info.addr)),
            exception: exc,
            function: p.symbols.describe(regs.rip),
            backtrace,
        }
    }
}
