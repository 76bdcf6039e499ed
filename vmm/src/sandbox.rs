//! A sandbox: one KVM VM running one guest process, and the loop that serves its exits.
//!
//! The loop is a state machine over decoded exits: a syscall is executed and the vCPU
//! resumes after it; a CPU exception is either a demand fault (map, retry) or a signal
//! (deliver to the guest's handler, or end the run with a crash event); anything else is a
//! fatal VMM-level error.

use std::path::PathBuf;

use kvm_bindings::{kvm_regs, kvm_sregs, kvm_userspace_memory_region, kvm_xsave};
use kvm_ioctls::{Kvm, VmFd};

use crate::arch::x86_64::layout;
use crate::errno::Errno;
use crate::events::{self, CrashEvent, EventSink, ExceptionInfo};
use crate::fd::{FileKind, OpenFile};
use crate::fs::FsContext;
use crate::loader::{self, HostFacts};
use crate::mm::{AddressSpace, FaultOutcome, PageFaultCode};
use crate::process::{Process, Thread};
use crate::signal::{self, DefaultAction, FrameExtras, SigInfo};
use crate::syscalls::{self, Args, Control, ForkRequest, SyscallCtx};
use crate::vcpu::{decode_exit, GuestEvent, SyscallMode, Vcpu, VcpuError};

/// Errors that stop a sandbox (the guest's own failures are not errors: they are outcomes).
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    /// /dev/kvm is missing or unusable.
    #[error("KVM is not available ({0}); assure-vmm needs read/write access to /dev/kvm")]
    KvmUnavailable(kvm_ioctls::Error),
    /// A VM-level KVM call failed.
    #[error("{op}: {source}")]
    Kvm {
        /// What was attempted.
        op: &'static str,
        /// Cause.
        source: kvm_ioctls::Error,
    },
    /// Address-space set-up failed.
    #[error(transparent)]
    Memory(#[from] crate::mm::MmError),
    /// The root directory is unusable.
    #[error(transparent)]
    Fs(#[from] crate::fs::FsError),
    /// The program cannot be loaded.
    #[error(transparent)]
    Load(#[from] loader::LoadError),
    /// The program is not in the root file system.
    #[error("program {0} not found in the guest root (searched PATH: {1})")]
    ProgramNotFound(String, String),
    /// vCPU failure.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// Events file.
    #[error(transparent)]
    Events(#[from] events::EventError),
    /// The guest reached a state the VMM cannot continue from.
    #[error("guest cannot continue: {0}")]
    GuestFatal(String),
    /// Host stdio cannot be given to the guest.
    #[error("cannot give stdio to the guest: {0}")]
    Stdio(std::io::Error),
}

/// What to run and how.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    /// Host directory that is the guest's `/`.
    pub root: PathBuf,
    /// Guest memory in bytes.
    pub mem_size: u64,
    /// Program: a guest path, or a name looked up in the guest's PATH.
    pub program: String,
    /// argv[1..].
    pub args: Vec<String>,
    /// Environment (`K=V`), in addition to the defaults.
    pub env: Vec<String>,
    /// JSON-lines events file.
    pub events: Option<PathBuf>,
}

/// Guest PATH used for lookups and given to the guest.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// How the guest ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunOutcome {
    /// exit_group(status).
    Exited(i32),
    /// Killed by a signal.
    Killed(i32),
}

impl RunOutcome {
    /// The status a shell would show: the exit status, or 128 + signal.
    pub fn exit_code(self) -> i32 {
        match self {
            RunOutcome::Exited(s) => s,
            RunOutcome::Killed(sig) => 128 + sig,
        }
    }
}

/// One sandbox.
#[derive(Debug)]
pub struct Sandbox {
    _kvm: Kvm,
    _vm: VmFd,
    vcpu: Vcpu,
    proc: Process,
    thread: Thread,
    events: EventSink,
    syscall_mode: Option<SyscallMode>,
    /// The last fault delivered to a guest handler: if the guest then dies of the same
    /// signal (a handler that logs and re-raises), the crash event names the fault.
    delivered_fault: Option<CrashEvent>,
    /// This VMM process was forked from another one for a guest fork.
    forked_child: bool,
}

/// Register `mm`'s guest memory as slot 0 of `vm`.
fn register_memory(vm: &VmFd, mm: &AddressSpace) -> Result<(), SandboxError> {
    let region = kvm_userspace_memory_region {
        slot: 0,
        guest_phys_addr: 0,
        memory_size: mm.ram().size(),
        userspace_addr: mm.ram().host_base() as u64,
        flags: 0,
    };
    // SAFETY: the region is the address space's own mapping of exactly that size. The
    // address space is owned by the same sandbox as the VM and outlives its use: the VM is
    // only run by `Sandbox::run`, and the mapping is unmapped only when the sandbox drops.
    unsafe { vm.set_user_memory_region(region) }.map_err(|source| SandboxError::Kvm {
        op: "register guest memory",
        source,
    })
}

fn resolve_program(fs: &FsContext, program: &str) -> Result<String, SandboxError> {
    if program.contains('/') {
        return fs
            .absolute(Some("/"), program.as_bytes())
            .map_err(|_| SandboxError::ProgramNotFound(program.into(), DEFAULT_PATH.into()));
    }
    for dir in DEFAULT_PATH.split(':') {
        let candidate = format!("{dir}/{program}");
        if let Ok(fd) = fs.open(&candidate, libc::O_PATH, 0) {
            // SAFETY: fstat into a local buffer on a valid fd.
            let mut st: libc::stat = unsafe { std::mem::zeroed() };
            // SAFETY: as above.
            let ok = unsafe { libc::fstat(std::os::fd::AsRawFd::as_raw_fd(&fd), &mut st) } == 0;
            if ok && st.st_mode & libc::S_IFMT == libc::S_IFREG {
                return Ok(candidate);
            }
        }
    }
    Err(SandboxError::ProgramNotFound(
        program.into(),
        DEFAULT_PATH.into(),
    ))
}

fn stdio_file(fd: i32) -> Result<OpenFile, SandboxError> {
    // SAFETY: F_DUPFD_CLOEXEC on one of our stdio fds; the result is checked.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 3) };
    if dup < 0 {
        return Err(SandboxError::Stdio(std::io::Error::last_os_error()));
    }
    // SAFETY: `dup` is a new fd we own.
    let owned = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(dup) };
    Ok(OpenFile::new(owned, FileKind::Host, None))
}

impl Sandbox {
    /// Create the VM, load the program and prepare its first thread.
    pub fn new(cfg: &SandboxConfig) -> Result<Sandbox, SandboxError> {
        // Writes to a closed peer must return EPIPE to the VMM (the guest's SIGPIPE is
        // emulated), never kill it.
        // SAFETY: setting a signal disposition to SIG_IGN has no memory effects.
        unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
        // The guest's umask is applied by the VMM; the host's must not apply a second time.
        // SAFETY: umask has no memory effects.
        unsafe { libc::umask(0) };
        let kvm = Kvm::new().map_err(SandboxError::KvmUnavailable)?;
        let vm = kvm.create_vm().map_err(|source| SandboxError::Kvm {
            op: "create VM",
            source,
        })?;
        let mut mm = AddressSpace::new(cfg.mem_size)?;
        register_memory(&vm, &mm)?;
        let fs = FsContext::new(&cfg.root)?;
        let exe = resolve_program(&fs, &cfg.program)?;
        let mut argv = vec![cfg.program.clone()];
        argv.extend(cfg.args.iter().cloned());
        let mut envp = vec![format!("PATH={DEFAULT_PATH}"), "HOME=/".to_string()];
        for kv in &cfg.env {
            let key = kv.split('=').next().unwrap_or(kv);
            envp.retain(|e| e.split('=').next() != Some(key));
            envp.push(kv.clone());
        }
        let loaded = loader::load(&mut mm, &fs, &exe, &argv, &envp, &HostFacts::detect())?;
        let mut symbols = introspect::Symbolizer::default();
        for img in std::iter::once(&loaded.exe).chain(loaded.interp.as_ref()) {
            let name = img.path.rsplit('/').next().unwrap_or(&img.path);
            match introspect::Module::from_elf(name, &img.bytes, img.bias) {
                Ok(m) => symbols.add(m.with_path(&img.path)),
                Err(e) => tracing::warn!(path = %img.path, error = %e, "no symbols"),
            }
        }
        let mut vcpu = Vcpu::new(&kvm, &vm, 0, mm.page_table_root())?;
        let (_, sregs) = vcpu.get_state()?;
        let regs = kvm_regs {
            rip: loaded.start_rip,
            rsp: loaded.start_rsp,
            rflags: 0x202,
            ..Default::default()
        };
        vcpu.set_state(&regs, &sregs)?;
        let pid = std::process::id() as i32;
        let mut proc = Process {
            pid,
            mm,
            fds: crate::fd::FdTable::new(),
            fs,
            signals: signal::Dispositions::default(),
            symbols,
            exe: exe.clone(),
            argv,
            envp,
            auxv: loaded.auxv,
            umask: 0o022,
            reported_unimplemented: Default::default(),
        };
        for fd in 0..3 {
            proc.fds
                .insert(stdio_file(fd)?, false)
                .map_err(|e| SandboxError::GuestFatal(format!("stdio: {e}")))?;
        }
        tracing::info!(program = %exe, entry = format_args!("{:#x}", loaded.start_rip), interp = ?loaded.interp.as_ref().map(|i| &i.path), "loaded");
        Ok(Sandbox {
            _kvm: kvm,
            _vm: vm,
            vcpu,
            proc,
            thread: Thread::new(pid),
            events: EventSink::new(cfg.events.as_deref())?,
            syscall_mode: None,
            delivered_fault: None,
            forked_child: false,
        })
    }

    /// Was this VMM process forked for a guest fork? (Its guest's death by a signal must
    /// then look like one to the parent's wait4.)
    pub fn is_forked_child(&self) -> bool {
        self.forked_child
    }

    /// Guest fork: the VMM process forks. The child has a copy-on-write copy of guest memory
    /// and of every host fd, and builds its own VM and vCPU over them (KVM objects belong to
    /// the process that created them). Returns the child's pid in the parent, 0 in the child.
    fn fork(
        &mut self,
        req: &ForkRequest,
        regs: &kvm_regs,
        sregs: &kvm_sregs,
    ) -> Result<u64, Errno> {
        let xsave = self.vcpu.fd().get_xsave().map_err(|_| Errno::EAGAIN)?;
        // SAFETY: the VMM is single-threaded while serving an exit; the child only continues
        // this thread's work.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(Errno::last());
        }
        if pid > 0 {
            if let Some(addr) = req.parent_settid {
                self.proc.mm.write(addr, &pid.to_le_bytes()).ok();
            }
            tracing::debug!(child = pid, "guest forked");
            return Ok(pid as u64);
        }
        if let Err(e) = self.become_child(req, regs, sregs, &xsave) {
            eprintln!("assure-vmm: forked child cannot start: {e}");
            // SAFETY: leaving the child process without running the parent's destructors.
            unsafe { libc::_exit(125) };
        }
        Ok(0)
    }

    fn become_child(
        &mut self,
        req: &ForkRequest,
        regs: &kvm_regs,
        sregs: &kvm_sregs,
        xsave: &kvm_xsave,
    ) -> Result<(), SandboxError> {
        let kvm = Kvm::new().map_err(SandboxError::KvmUnavailable)?;
        let vm = kvm.create_vm().map_err(|source| SandboxError::Kvm {
            op: "create VM",
            source,
        })?;
        register_memory(&vm, &self.proc.mm)?;
        let mut vcpu = Vcpu::new(&kvm, &vm, 0, self.proc.mm.page_table_root())?;
        let mut child_regs = *regs;
        child_regs.rax = 0;
        if req.child_stack != 0 {
            child_regs.rsp = req.child_stack;
        }
        let mut child_sregs = *sregs;
        child_sregs.cs = crate::arch::x86_64::supervisor::user_code_segment();
        child_sregs.ss = crate::arch::x86_64::supervisor::user_data_segment();
        if let Some(tls) = req.tls {
            child_sregs.fs.base = tls;
        }
        vcpu.set_state(&child_regs, &child_sregs)?;
        // SAFETY: an image KVM itself produced for the parent's vCPU.
        unsafe { vcpu.fd().set_xsave(xsave) }.map_err(|source| SandboxError::Kvm {
            op: "restore XSAVE in child",
            source,
        })?;
        // Dropping the parent's KVM objects only closes this process's copies of their fds.
        self.vcpu = vcpu;
        self._vm = vm;
        self._kvm = kvm;
        let pid = std::process::id() as i32;
        self.proc.pid = pid;
        self.thread.tid = pid;
        self.thread.pending.clear();
        if let Some(addr) = req.child_settid {
            self.proc.mm.write(addr, &pid.to_le_bytes()).ok();
        }
        if let Some(addr) = req.child_cleartid {
            self.thread.clear_child_tid = addr;
        }
        self.forked_child = true;
        Ok(())
    }

    /// The guest process (for tests and tools).
    pub fn process(&self) -> &Process {
        &self.proc
    }

    /// Run the guest until it exits or dies.
    pub fn run(&mut self) -> Result<RunOutcome, SandboxError> {
        loop {
            let exit = self.vcpu.run()?;
            let rip = self.vcpu.regs().rip;
            let cs = self.vcpu.sregs().cs.selector;
            let outcome = match decode_exit(&exit, rip, cs) {
                GuestEvent::Syscall(mode) => self.on_syscall(mode)?,
                GuestEvent::Exception { vector } => self.on_exception(vector)?,
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
                    let r = self.force_signal(info, &mut regs, "cpu exception", Some(exc));
                    *self.vcpu.regs_mut() = regs;
                    r
                }
                GuestEvent::Interrupted => None,
                GuestEvent::Fatal(msg) => return Err(SandboxError::GuestFatal(msg)),
            };
            if let Some(o) = outcome {
                if let RunOutcome::Exited(status) = o {
                    self.events.exit(status);
                }
                return Ok(o);
            }
        }
    }

    fn on_syscall(&mut self, mode: SyscallMode) -> Result<Option<RunOutcome>, SandboxError> {
        if self.syscall_mode != Some(mode) {
            match mode {
                SyscallMode::StayedInUserMode => {
                    tracing::info!("syscall entry: SYSCALL stays at CPL3 (page-table based KVM)")
                }
                SyscallMode::EnteredKernelMode => {
                    tracing::info!("syscall entry: SYSCALL enters CPL0 (hardware KVM)")
                }
            }
            self.syscall_mode = Some(mode);
        }
        let mut regs = *self.vcpu.regs();
        let mut sregs = *self.vcpu.sregs();
        let nr = regs.rax;
        let args = Args([regs.rdi, regs.rsi, regs.rdx, regs.r10, regs.r8, regs.r9]);
        // The user context to return to, as SYSRET would restore it.
        regs.rip = regs.rcx;
        regs.rflags = (regs.r11 & 0x3c_7fd7) | 0x2;
        let mut ctx = SyscallCtx {
            proc: &mut self.proc,
            thread: &mut self.thread,
            regs: &mut regs,
            sregs: &mut sregs,
            sregs_changed: false,
            control: Control::Return,
            raised: Vec::new(),
        };
        let ret = syscalls::dispatch(&mut ctx, nr, &args);
        let SyscallCtx {
            sregs_changed,
            control,
            raised,
            ..
        } = ctx;
        match control {
            Control::Return => regs.rax = ret,
            Control::ExitGroup(status) | Control::ExitThread(status) => {
                return Ok(Some(RunOutcome::Exited(status)))
            }
            Control::Fork(req) => match self.fork(&req, &regs, &sregs) {
                Ok(0) => {
                    // In the child: the new vCPU already holds the child's full state.
                    return Ok(None);
                }
                Ok(pid) => regs.rax = pid,
                Err(e) => regs.rax = e.to_return(),
            },
            Control::Replaced(xsave) => {
                if let Some(image) = xsave {
                    if self.restore_xsave(&image).is_err() {
                        let info = SigInfo {
                            signo: libc::SIGSEGV,
                            code: 0x80,
                            addr: 0,
                            pid: 0,
                            uid: 0,
                            trapno: 0,
                            err: 0,
                        };
                        return Ok(self.force_signal(info, &mut regs, "bad signal frame", None));
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
            if let Some(o) = self.raise_signal(info, &mut regs) {
                return Ok(Some(o));
            }
        }
        *self.vcpu.regs_mut() = regs;
        Ok(None)
    }

    fn on_exception(&mut self, vector: u8) -> Result<Option<RunOutcome>, SandboxError> {
        let regs = *self.vcpu.regs();
        let cr2 = self.vcpu.sregs().cr2;
        let mut frame = [0u8; 48];
        if !self.proc.mm.read_supervisor(regs.rsp, &mut frame) {
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
        let (signo, code, addr) = match vector {
            14 => match self.proc.mm.handle_fault(cr2, PageFaultCode(error_code)) {
                FaultOutcome::Resolved => {
                    *self.vcpu.regs_mut() = user;
                    return Ok(None);
                }
                FaultOutcome::NotMapped => (libc::SIGSEGV, 1, cr2),
                FaultOutcome::AccessDenied => (libc::SIGSEGV, 2, cr2),
            },
            0 => (libc::SIGFPE, 1, rip),   // FPE_INTDIV
            1 => (libc::SIGTRAP, 2, rip),  // TRAP_TRACE
            3 => (libc::SIGTRAP, 0x80, 0), // SI_KERNEL
            4 | 5 => (libc::SIGSEGV, 0x80, 0),
            6 => (libc::SIGILL, 2, rip), // ILL_ILLOPN
            16 | 19 => (libc::SIGFPE, 0, rip),
            11 | 12 => (libc::SIGBUS, 0x80, 0),
            17 => (libc::SIGBUS, 1, cr2), // BUS_ADRALN
            13 => (libc::SIGSEGV, 0x80, 0),
            _ => (libc::SIGSEGV, 0x80, 0),
        };
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
        let outcome = self.force_signal(info, &mut user, "cpu exception", Some(exc));
        *self.vcpu.regs_mut() = user;
        Ok(outcome)
    }

    /// A synchronous fault: delivered if caught and not blocked, else it kills (Linux's
    /// force_sig: a blocked or ignored fault signal still kills).
    fn force_signal(
        &mut self,
        info: SigInfo,
        regs: &mut kvm_regs,
        cause: &str,
        exc: Option<ExceptionInfo>,
    ) -> Option<RunOutcome> {
        let sig = info.signo;
        let blocked = self.thread.sigmask & signal::bit(sig) != 0;
        if self.proc.signals.is_caught(sig) && !blocked {
            let event = self.crash_event(&info, regs, cause, exc.clone());
            if self.deliver(&info, regs).is_ok() {
                self.delivered_fault = Some(event);
                return None;
            }
            let segv = SigInfo {
                signo: libc::SIGSEGV,
                code: 0x80,
                ..info
            };
            return Some(self.die(&segv, regs, "unusable signal stack", exc));
        }
        Some(self.die(&info, regs, cause, exc))
    }

    /// A signal raised by a syscall of the thread (kill/tgkill of itself, SIGPIPE).
    fn raise_signal(&mut self, info: SigInfo, regs: &mut kvm_regs) -> Option<RunOutcome> {
        let sig = info.signo;
        if self.thread.sigmask & signal::bit(sig) != 0 {
            if !self.thread.pending.iter().any(|p| p.signo == sig) {
                self.thread.pending.push(info);
            }
            return None;
        }
        if self.proc.signals.is_ignored(sig) {
            return None;
        }
        if self.proc.signals.is_caught(sig) {
            if self.deliver(&info, regs).is_ok() {
                return None;
            }
            let segv = SigInfo {
                signo: libc::SIGSEGV,
                code: 0x80,
                ..info
            };
            return Some(self.die(&segv, regs, "unusable signal stack", None));
        }
        match signal::default_action(sig) {
            DefaultAction::Ignore | DefaultAction::StopOrContinue => None,
            DefaultAction::Terminate | DefaultAction::Core => {
                let cause = if info.code == -6 { "tgkill" } else { "kill" };
                Some(self.die(&info, regs, cause, None))
            }
        }
    }

    fn deliver(&mut self, info: &SigInfo, regs: &mut kvm_regs) -> Result<(), Errno> {
        let sig = info.signo;
        let action = self.proc.signals.get(sig);
        let xsave = self.vcpu.fd().get_xsave().map_err(|_| Errno::EFAULT)?;
        let image: Vec<u8> = xsave.region.iter().flat_map(|w| w.to_le_bytes()).collect();
        let extras = FrameExtras {
            cr2: if info.trapno == 14 { info.addr } else { 0 },
            old_mask: self.thread.sigmask,
            altstack: self.thread.altstack,
        };
        signal::deliver(&mut self.proc.mm, regs, &action, info, &extras, &image)?;
        let mut mask = self.thread.sigmask | action.mask;
        if action.flags & signal::SA_NODEFER == 0 {
            mask |= signal::bit(sig);
        }
        self.thread.sigmask = mask & !(signal::bit(libc::SIGKILL) | signal::bit(libc::SIGSTOP));
        if action.flags & signal::SA_RESETHAND != 0 {
            self.proc
                .signals
                .set(sig, signal::SigAction::default())
                .ok();
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
        info: &SigInfo,
        regs: &kvm_regs,
        cause: &str,
        exc: Option<ExceptionInfo>,
    ) -> RunOutcome {
        let event = match self.delivered_fault.take() {
            // The guest's handler ran and re-raised the same signal: report the fault.
            Some(e) if e.signal == info.signo => e,
            _ => self.crash_event(info, regs, cause, exc),
        };
        self.events.crash(&event);
        RunOutcome::Killed(info.signo)
    }

    fn crash_event(
        &self,
        info: &SigInfo,
        regs: &kvm_regs,
        cause: &str,
        exc: Option<ExceptionInfo>,
    ) -> CrashEvent {
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
        let mm = &self.proc.mm;
        let mut read = |addr: u64, buf: &mut [u8]| mm.peek(addr, buf);
        let frames = self.proc.symbols.backtrace(&unwind, &mut read, 64);
        let backtrace = frames
            .iter()
            .map(|f| {
                let sym = f.symbol.as_deref().unwrap_or("??");
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
            tid: self.thread.tid,
            signal: info.signo,
            signal_name: signal::name(info.signo),
            si_code: info.code,
            cause: cause.to_string(),
            rip: regs.rip,
            fault_address: has_addr
                .then_some(info.addr)
                .or(exc.as_ref().filter(|e| e.vector == 14).map(|_| info.addr)),
            exception: exc,
            function: self.proc.symbols.symbolize(regs.rip).map(|h| h.to_string()),
            backtrace,
        }
    }
}

/// Guest user addresses end here (re-exported for tools).
pub const GUEST_USER_END: u64 = layout::USER_END;
