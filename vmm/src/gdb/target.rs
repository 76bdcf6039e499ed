//! The sandbox as a gdbstub [`Target`]: all-stop, one gdb thread per guest thread.
//!
//! While gdb looks at a stopped target, the session holds the world stopped
//! ([`Stopped`]): every runner is parked with its complete state, which is what registers
//! are read from and written to. Resuming drops the stop; the next event (a thread's
//! report, Ctrl-C, the guest's end) stops the world again.

use std::collections::BTreeMap;
use std::num::NonZeroUsize;
use std::sync::Arc;

use gdbstub::common::{Pid, Signal, Tid};
use gdbstub::target::ext::base::multithread::{
    MultiThreadBase, MultiThreadResume, MultiThreadResumeOps, MultiThreadSingleStep,
    MultiThreadSingleStepOps,
};
use gdbstub::target::ext::base::BaseOps;
use gdbstub::target::ext::breakpoints::{
    Breakpoints, BreakpointsOps, HwBreakpoint, HwBreakpointOps, HwWatchpoint, HwWatchpointOps,
    SwBreakpoint, SwBreakpointOps, WatchKind as GdbWatchKind,
};
use gdbstub::target::{Target, TargetError, TargetResult};

use super::arch::{Regs, X86_64Linux};
use super::debugger::{Stop, WatchKind, Watchpoint};
use super::GdbError;
use crate::checkpoint::world::{Ack, Order, StopError, Stopped, ThreadState};
use crate::mm::Guard;
use crate::process;
use crate::sandbox::{RunOutcome, Shared};

/// Longest stretch gdb may read or write in one request (it asks for less).
const MAX_ACCESS: usize = 1 << 20;
/// How long a stop waits for another stop (a rescue window's checkpoint) to end.
const BUSY_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// What gdb is told when the target stops.
pub(crate) type StopReason = gdbstub::stub::MultiThreadStopReason<u64>;

/// The sandbox, as the gdb session sees it.
pub(crate) struct SandboxTarget<'a> {
    pub(crate) shared: &'a Arc<Shared>,
    /// The world, while gdb has it stopped.
    stopped: Option<Stopped<'a>>,
    /// Every thread's state at the stop (what gdb reads; writes go to the runners too).
    threads: BTreeMap<i32, ThreadState>,
    /// Threads gdb asked to step at the next resume.
    steps: Vec<i32>,
    /// Threads gdb asked to continue at the next resume.
    continues: Vec<i32>,
    /// The signal each named thread is resumed with.
    signals: BTreeMap<i32, Option<i32>>,
    /// Threads gdb did not name stay stopped at the next resume (scheduler locking; gdb
    /// asks for it to step one thread over a breakpoint it lifted).
    others_stay: bool,
    /// The thread of the last stop (Ctrl-C reports it).
    pub(crate) last_tid: i32,
    /// The guest's auxiliary vector, as its stack has it (for `qXfer:auxv:read`).
    auxv: Vec<u8>,
    /// The executable's guest path.
    exe: String,
    /// When the session stopped the world (the guest's time stands still since).
    stopped_since: Option<std::time::Instant>,
    /// Files gdb opened through host I/O.
    pub(crate) host_files: super::host_io::HostFiles,
    /// What the last resume asked of the threads.
    resume: Resume,
}

/// What a resume asks of the threads.
#[derive(Debug, Default)]
struct Resume {
    /// Threads to step, with the RIP their step begins at.
    steps: BTreeMap<i32, u64>,
    /// Threads that stay stopped (scheduler locking).
    stay: Vec<i32>,
    /// The signal each named thread is resumed with.
    signals: BTreeMap<i32, Option<i32>>,
}

impl std::fmt::Debug for SandboxTarget<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxTarget")
            .field("stopped", &self.stopped.is_some())
            .field("threads", &self.threads.keys().collect::<Vec<_>>())
            .finish()
    }
}

fn tid_of(t: Tid) -> i32 {
    i32::try_from(t.get()).unwrap_or(i32::MAX)
}

fn gdb_tid(tid: i32) -> Tid {
    NonZeroUsize::new(usize::try_from(tid).unwrap_or(1)).unwrap_or(NonZeroUsize::MIN)
}

impl<'a> SandboxTarget<'a> {
    pub(crate) fn new(shared: &'a Arc<Shared>) -> SandboxTarget<'a> {
        let p = process::lock(&shared.proc);
        let auxv = p
            .auxv
            .iter()
            .flat_map(|(k, v)| k.to_le_bytes().into_iter().chain(v.to_le_bytes()))
            .collect();
        SandboxTarget {
            shared,
            stopped: None,
            threads: BTreeMap::new(),
            steps: Vec::new(),
            continues: Vec::new(),
            signals: BTreeMap::new(),
            others_stay: false,
            last_tid: p.pid,
            auxv,
            exe: p.exe.clone(),
            stopped_since: None,
            host_files: Default::default(),
            resume: Resume::default(),
        }
    }

    /// Stop every thread (if not stopped yet) and take their states.
    pub(crate) fn halt(&mut self) -> Result<(), GdbError> {
        if self.stopped.is_none() {
            let t0 = std::time::Instant::now();
            let stopped = loop {
                match self.shared.world.stop(&self.shared.proc) {
                    Ok(s) => break s,
                    // A checkpoint or rollback of a rescue window holds the world for a
                    // fraction of a millisecond: wait for it.
                    Err(StopError::Busy) if t0.elapsed() < BUSY_WAIT => {
                        std::thread::sleep(std::time::Duration::from_micros(200));
                    }
                    Err(StopError::Ended) => return Err(GdbError::GuestEnded),
                    Err(other) => return Err(GdbError::Stop(other.to_string())),
                }
            };
            self.threads = stopped
                .threads()
                .map_err(|e| GdbError::Stop(e.to_string()))?;
            self.stopped = Some(stopped);
            if self.stopped_since.is_none() {
                self.stopped_since = Some(std::time::Instant::now());
                self.shared.debug.set_world_stopped(true);
            }
        }
        if !self.threads.contains_key(&self.last_tid) {
            if let Some(t) = self.threads.keys().next() {
                self.last_tid = *t;
            }
        }
        Ok(())
    }

    /// Let every thread go on (those in `steps` for one instruction).
    pub(crate) fn resume_world(&mut self) {
        let stay: Vec<i32> = if std::mem::take(&mut self.others_stay) {
            let named: Vec<i32> = self.steps.iter().chain(&self.continues).copied().collect();
            self.threads
                .keys()
                .copied()
                .filter(|t| !named.contains(t))
                .collect()
        } else {
            Vec::new()
        };
        self.continues.clear();
        let steps: BTreeMap<i32, u64> = self
            .steps
            .drain(..)
            .filter_map(|t| self.threads.get(&t).map(|s| (t, s.cpu.regs.rip)))
            .collect();
        self.resume = Resume {
            steps,
            stay,
            signals: std::mem::take(&mut self.signals),
        };
        self.apply_resume();
    }

    /// Let the world go on as the last resume asked (again, after a stop that found
    /// nothing to report: the threads gdb is stepping still step, the ones it keeps
    /// stopped stay held).
    pub(crate) fn apply_resume(&mut self) {
        let r = &self.resume;
        tracing::debug!(steps = ?r.steps, stay = ?r.stay, "gdb: resume");
        self.shared.debug.hold(&r.stay);
        self.shared.debug.set_resume_signals(r.signals.clone());
        self.shared.debug.set_steps(r.steps.clone());
        if let Some(since) = self.stopped_since.take() {
            process::lock(&self.shared.proc)
                .rescue
                .postpone_deadlines(since.elapsed());
        }
        self.shared.debug.set_world_stopped(false);
        self.stopped = None;
        self.threads.clear();
        crate::rescue::watchdog::wake(self.shared);
    }

    /// Has the stopped world any thread?
    pub(crate) fn has_threads(&self) -> bool {
        !self.threads.is_empty()
    }

    /// Is the world stopped by this session?
    pub(crate) fn is_stopped(&self) -> bool {
        self.stopped.is_some()
    }

    /// Run `op` with the world resumed but no thread running guest code (each is held for
    /// the debugger), then stop again: for checkpoint operations, which stop the world
    /// themselves.
    pub(crate) fn with_world_released<T>(
        &mut self,
        op: impl FnOnce(&Arc<Shared>) -> T,
    ) -> Result<T, GdbError> {
        let tids: Vec<i32> = self.threads.keys().copied().collect();
        self.shared.debug.hold(&tids);
        self.stopped = None;
        let r = op(self.shared);
        self.halt()?;
        self.shared.debug.take_events();
        Ok(r)
    }

    /// The gdb stop reason for a thread's report.
    pub(crate) fn stop_reason(&mut self, tid: i32, stop: Stop) -> StopReason {
        self.last_tid = tid;
        let t = gdb_tid(tid);
        match stop {
            Stop::Breakpoint => {
                let rip = self.threads.get(&tid).map_or(0, |s| s.cpu.regs.rip);
                if self.shared.debug.is_hw_breakpoint(rip) {
                    StopReason::HwBreak(t)
                } else {
                    StopReason::SwBreak(t)
                }
            }
            Stop::DoneStep => StopReason::SignalWithThread {
                tid: t,
                signal: Signal::SIGTRAP,
            },
            Stop::Signal(sig) => StopReason::SignalWithThread {
                tid: t,
                signal: Signal(u8::try_from(sig).unwrap_or(0)),
            },
            Stop::Watch { kind, addr } => StopReason::Watch {
                tid: t,
                kind: match kind {
                    WatchKind::Write => GdbWatchKind::Write,
                    WatchKind::Read => GdbWatchKind::Read,
                    WatchKind::Access => GdbWatchKind::ReadWrite,
                },
                addr,
            },
        }
    }

    /// The reason for a stop by Ctrl-C.
    pub(crate) fn interrupted(&mut self) -> StopReason {
        StopReason::SignalWithThread {
            tid: gdb_tid(self.last_tid),
            signal: Signal::SIGINT,
        }
    }

    /// How the guest's end is told to gdb.
    pub(crate) fn ended(outcome: RunOutcome) -> StopReason {
        match outcome {
            RunOutcome::Exited(code) => StopReason::Exited(code as u8),
            RunOutcome::Killed(sig) => StopReason::Terminated(Signal(sig as u8)),
        }
    }

    /// The signal gdb resumes thread `tid` with.
    fn note_signal(&mut self, tid: Tid, signal: Option<Signal>) {
        self.signals
            .insert(tid_of(tid), signal.map(|s| i32::from(s.0)));
    }

    fn thread(&self, tid: Tid) -> TargetResult<&ThreadState, Self> {
        self.threads.get(&tid_of(tid)).ok_or(TargetError::NonFatal)
    }

    /// Guard pages so that every watchpoint still catches its accesses.
    fn guard_for(&self, page: u64) -> Option<Guard> {
        let mut guard = None;
        for w in self.shared.debug.watches() {
            if pages_of(w.addr, w.len).any(|p| p == page) {
                match w.kind {
                    WatchKind::Write if guard.is_none() => guard = Some(Guard::Write),
                    WatchKind::Write => {}
                    WatchKind::Read | WatchKind::Access => guard = Some(Guard::Access),
                }
            }
        }
        guard
    }

    fn update_guards(&self, w: &Watchpoint) {
        let mut p = process::lock(&self.shared.proc);
        for page in pages_of(w.addr, w.len) {
            let g = self.guard_for(page);
            p.mm.set_guard(page, g);
        }
    }
}

/// Undo everything gdb placed (breakpoints, watched pages): on detach and at the end of
/// a session however it ends. The world must be stopped, or the guest ended.
pub(crate) fn remove_debug_state(shared: &Shared) {
    let mut p = process::lock(&shared.proc);
    let pm = &mut *p;
    pm.rescue.clear_debug_breakpoints(&mut pm.mm);
    pm.mm.clear_guards();
}

/// The pages `[addr, addr+len)` touches.
fn pages_of(addr: u64, len: u64) -> impl Iterator<Item = u64> {
    let first = addr & !0xfff;
    let last = addr.saturating_add(len.max(1) - 1) & !0xfff;
    (first..=last).step_by(0x1000)
}

impl Target for SandboxTarget<'_> {
    type Arch = X86_64Linux;
    type Error = GdbError;

    fn base_ops(&mut self) -> BaseOps<'_, Self::Arch, Self::Error> {
        BaseOps::MultiThread(self)
    }

    fn support_breakpoints(&mut self) -> Option<BreakpointsOps<'_, Self>> {
        Some(self)
    }

    fn support_monitor_cmd(
        &mut self,
    ) -> Option<gdbstub::target::ext::monitor_cmd::MonitorCmdOps<'_, Self>> {
        Some(self)
    }

    fn support_libraries_svr4(
        &mut self,
    ) -> Option<gdbstub::target::ext::libraries::LibrariesSvr4Ops<'_, Self>> {
        Some(self)
    }

    fn support_exec_file(
        &mut self,
    ) -> Option<gdbstub::target::ext::exec_file::ExecFileOps<'_, Self>> {
        Some(self)
    }

    fn support_auxv(&mut self) -> Option<gdbstub::target::ext::auxv::AuxvOps<'_, Self>> {
        Some(self)
    }

    fn support_host_io(&mut self) -> Option<gdbstub::target::ext::host_io::HostIoOps<'_, Self>> {
        Some(self)
    }

    fn guard_rail_implicit_sw_breakpoints(&self) -> bool {
        // Software breakpoints are the VMM's, not bytes gdb writes.
        false
    }
}

impl MultiThreadBase for SandboxTarget<'_> {
    fn read_registers(&mut self, regs: &mut Regs, tid: Tid) -> TargetResult<(), Self> {
        *regs = Regs::from_cpu(&self.thread(tid)?.cpu);
        Ok(())
    }

    fn write_registers(&mut self, regs: &Regs, tid: Tid) -> TargetResult<(), Self> {
        let t = tid_of(tid);
        let mut state = self.thread(tid)?.clone();
        regs.store(&mut state.cpu);
        let Some(stopped) = &self.stopped else {
            return Err(TargetError::NonFatal);
        };
        let acks = stopped.execute(BTreeMap::from([(
            t,
            Order::Restore {
                state: Box::new(state.clone()),
                load_cpu: true,
                verify: false,
            },
        )]));
        match acks.get(&t) {
            Some(Ack::Restored(_)) => {
                self.threads.insert(t, state);
                Ok(())
            }
            Some(Ack::Failed(e)) => {
                tracing::warn!(tid = t, error = %e, "gdb: registers not written");
                Err(TargetError::NonFatal)
            }
            _ => Err(TargetError::NonFatal),
        }
    }

    fn read_addrs(&mut self, start: u64, data: &mut [u8], _tid: Tid) -> TargetResult<usize, Self> {
        let len = data.len().min(MAX_ACCESS);
        let mut p = process::lock(&self.shared.proc);
        let mut done = 0usize;
        // Page by page: a read that runs into an unmapped page returns what came before.
        while done < len {
            let Some(cur) = start.checked_add(done as u64) else {
                break;
            };
            let chunk = ((0x1000 - cur % 0x1000) as usize).min(len - done);
            let readable =
                p.mm.vma_at(cur)
                    .is_some_and(|v| v.prot.accessible() || v.prot.exec());
            if !readable || p.mm.read(cur, &mut data[done..done + chunk]).is_err() {
                break;
            }
            done += chunk;
        }
        p.rescue.hide_breakpoints(start, &mut data[..done]);
        if done == 0 && len > 0 {
            return Err(TargetError::Errno(libc::EFAULT as u8));
        }
        Ok(done)
    }

    fn write_addrs(&mut self, start: u64, data: &[u8], _tid: Tid) -> TargetResult<(), Self> {
        if data.len() > MAX_ACCESS {
            return Err(TargetError::Errno(libc::EINVAL as u8));
        }
        let mut p = process::lock(&self.shared.proc);
        // The VMM's breakpoint bytes and step-over slots must stay as its table says.
        let mut shown = vec![0u8; data.len()];
        if p.mm.peek(start, &mut shown) {
            let mut original = shown.clone();
            p.rescue.hide_breakpoints(start, &mut original);
            if original != shown {
                tracing::warn!(
                    addr = format_args!("{start:#x}"),
                    "gdb: a write over a breakpoint of the VMM's is refused"
                );
                return Err(TargetError::Errno(libc::EPERM as u8));
            }
        }
        if p.rescue.in_step_over_page(start) {
            return Err(TargetError::Errno(libc::EPERM as u8));
        }
        p.mm.patch(start, data)
            .map_err(|_| TargetError::Errno(libc::EFAULT as u8))
    }

    fn list_active_threads(&mut self, active: &mut dyn FnMut(Tid)) -> Result<(), Self::Error> {
        for t in self.threads.keys() {
            active(gdb_tid(*t));
        }
        Ok(())
    }

    fn support_resume(&mut self) -> Option<MultiThreadResumeOps<'_, Self>> {
        Some(self)
    }

    fn support_thread_extra_info(
        &mut self,
    ) -> Option<gdbstub::target::ext::thread_extra_info::ThreadExtraInfoOps<'_, Self>> {
        Some(self)
    }
}

impl MultiThreadResume for SandboxTarget<'_> {
    fn resume(&mut self) -> Result<(), Self::Error> {
        // The world resumes in the event loop, once gdb has had its answer.
        Ok(())
    }

    fn clear_resume_actions(&mut self) -> Result<(), Self::Error> {
        self.steps.clear();
        self.continues.clear();
        self.signals.clear();
        self.others_stay = false;
        Ok(())
    }

    fn set_resume_action_continue(
        &mut self,
        tid: Tid,
        signal: Option<Signal>,
    ) -> Result<(), Self::Error> {
        self.continues.push(tid_of(tid));
        self.note_signal(tid, signal);
        Ok(())
    }

    fn support_single_step(&mut self) -> Option<MultiThreadSingleStepOps<'_, Self>> {
        Some(self)
    }

    fn support_scheduler_locking(
        &mut self,
    ) -> Option<gdbstub::target::ext::base::multithread::MultiThreadSchedulerLockingOps<'_, Self>>
    {
        Some(self)
    }
}

impl gdbstub::target::ext::base::multithread::MultiThreadSchedulerLocking for SandboxTarget<'_> {
    fn set_resume_action_scheduler_lock(&mut self) -> Result<(), Self::Error> {
        self.others_stay = true;
        Ok(())
    }
}

impl MultiThreadSingleStep for SandboxTarget<'_> {
    fn set_resume_action_step(
        &mut self,
        tid: Tid,
        signal: Option<Signal>,
    ) -> Result<(), Self::Error> {
        self.steps.push(tid_of(tid));
        self.note_signal(tid, signal);
        Ok(())
    }
}

impl gdbstub::target::ext::thread_extra_info::ThreadExtraInfo for SandboxTarget<'_> {
    fn thread_extra_info(&self, tid: Tid, buf: &mut [u8]) -> Result<usize, Self::Error> {
        let t = tid_of(tid);
        let p = process::lock(&self.shared.proc);
        let name = p
            .thread_names
            .get(&t)
            .map(|n| {
                let end = n.iter().position(|b| *b == 0).unwrap_or(n.len());
                String::from_utf8_lossy(&n[..end]).into_owned()
            })
            .unwrap_or_else(|| {
                let base = p.exe.rsplit('/').next().unwrap_or(&p.exe);
                base.chars().take(15).collect()
            });
        let windows = p.rescue.window_ids(t).len();
        let text = if windows > 0 {
            format!("{name}, {windows} rescue window(s) open")
        } else {
            name
        };
        let n = text.len().min(buf.len());
        buf[..n].copy_from_slice(&text.as_bytes()[..n]);
        Ok(n)
    }
}

impl Breakpoints for SandboxTarget<'_> {
    fn support_sw_breakpoint(&mut self) -> Option<SwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_breakpoint(&mut self) -> Option<HwBreakpointOps<'_, Self>> {
        Some(self)
    }

    fn support_hw_watchpoint(&mut self) -> Option<HwWatchpointOps<'_, Self>> {
        Some(self)
    }
}

impl SandboxTarget<'_> {
    fn place_breakpoint(&mut self, addr: u64, on: bool) -> TargetResult<bool, Self> {
        let mut p = process::lock(&self.shared.proc);
        let pm = &mut *p;
        match pm.rescue.set_debug_breakpoint(addr, on, &mut pm.mm) {
            Ok(()) => Ok(true),
            Err(e) => {
                tracing::info!(error = %e, "gdb: breakpoint refused");
                Ok(false)
            }
        }
    }
}

impl SwBreakpoint for SandboxTarget<'_> {
    fn add_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        self.place_breakpoint(addr, true)
    }

    fn remove_sw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        if self.shared.debug.is_hw_breakpoint(addr) {
            // Still wanted as a hardware breakpoint.
            return Ok(true);
        }
        self.place_breakpoint(addr, false)
    }
}

impl HwBreakpoint for SandboxTarget<'_> {
    fn add_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        // Debug registers cannot step past their own breakpoint on every KVM; the VMM's
        // breakpoint engine behaves the same for gdb, and needs no register.
        let placed = self.place_breakpoint(addr, true)?;
        if placed {
            self.shared.debug.set_hw_breakpoint(addr, true);
        }
        Ok(placed)
    }

    fn remove_hw_breakpoint(&mut self, addr: u64, _kind: usize) -> TargetResult<bool, Self> {
        self.shared.debug.set_hw_breakpoint(addr, false);
        self.place_breakpoint(addr, false)
    }
}

impl HwWatchpoint for SandboxTarget<'_> {
    fn add_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: GdbWatchKind,
    ) -> TargetResult<bool, Self> {
        if len == 0 || len > 4096 {
            return Ok(false);
        }
        {
            let p = process::lock(&self.shared.proc);
            if pages_of(addr, len).any(|page| p.mm.vma_at(page).is_none()) {
                return Ok(false);
            }
        }
        let w = Watchpoint {
            addr,
            len,
            kind: match kind {
                GdbWatchKind::Write => WatchKind::Write,
                GdbWatchKind::Read => WatchKind::Read,
                GdbWatchKind::ReadWrite => WatchKind::Access,
            },
        };
        self.shared.debug.add_watch(w);
        self.update_guards(&w);
        Ok(true)
    }

    fn remove_hw_watchpoint(
        &mut self,
        addr: u64,
        len: u64,
        kind: GdbWatchKind,
    ) -> TargetResult<bool, Self> {
        let w = Watchpoint {
            addr,
            len,
            kind: match kind {
                GdbWatchKind::Write => WatchKind::Write,
                GdbWatchKind::Read => WatchKind::Read,
                GdbWatchKind::ReadWrite => WatchKind::Access,
            },
        };
        let removed = self.shared.debug.remove_watch(w);
        self.update_guards(&w);
        Ok(removed)
    }
}

/// Copy `offset..offset+length` of `data` into `buf`.
fn copy_range(data: &[u8], offset: u64, length: usize, buf: &mut [u8]) -> usize {
    let Ok(offset) = usize::try_from(offset) else {
        return 0;
    };
    if offset >= data.len() {
        return 0;
    }
    let n = length.min(buf.len()).min(data.len() - offset);
    buf[..n].copy_from_slice(&data[offset..offset + n]);
    n
}

impl gdbstub::target::ext::exec_file::ExecFile for SandboxTarget<'_> {
    fn get_exec_file(
        &self,
        _pid: Option<Pid>,
        offset: u64,
        length: usize,
        buf: &mut [u8],
    ) -> TargetResult<usize, Self> {
        Ok(copy_range(self.exe.as_bytes(), offset, length, buf))
    }
}

impl gdbstub::target::ext::auxv::Auxv for SandboxTarget<'_> {
    fn get_auxv(&self, offset: u64, length: usize, buf: &mut [u8]) -> TargetResult<usize, Self> {
        Ok(copy_range(&self.auxv, offset, length, buf))
    }
}

impl gdbstub::target::ext::libraries::LibrariesSvr4 for SandboxTarget<'_> {
    fn get_libraries_svr4(
        &self,
        offset: u64,
        length: usize,
        buf: &mut [u8],
    ) -> TargetResult<usize, Self> {
        let xml = {
            let mut p = process::lock(&self.shared.proc);
            super::libraries::svr4_xml(&mut p)
        };
        Ok(copy_range(xml.as_bytes(), offset, length, buf))
    }
}

impl gdbstub::target::ext::monitor_cmd::MonitorCmd for SandboxTarget<'_> {
    fn handle_monitor_cmd(
        &mut self,
        cmd: &[u8],
        mut out: gdbstub::target::ext::monitor_cmd::ConsoleOutput<'_>,
    ) -> Result<(), Self::Error> {
        let text = String::from_utf8_lossy(cmd);
        let reply = super::monitor::run(self, &text);
        for line in reply.lines() {
            gdbstub::outputln!(out, "{}", line);
        }
        Ok(())
    }
}
