//! A sandbox: one KVM VM running one guest process, and the loop that serves its exits.
//!
//! The loop is a state machine over decoded exits: a syscall is executed and the vCPU
//! resumes after it; a CPU exception is either a demand fault (map, retry) or a signal
//! (deliver to the guest's handler, or end the run with a crash event); anything else is a
//! fatal VMM-level error.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_regs, kvm_userspace_memory_region};
use kvm_ioctls::{Kvm, VmFd};

use crate::events::{self, EventSink};
use crate::fd::{FileKind, OpenFile};
use crate::fs::FsContext;
use crate::loader::{self, HostFacts};
use crate::mm::AddressSpace;
use crate::process::{self, Process, Thread, ThreadShared};
use crate::runner::Runner;
use crate::signal::{self, SigInfo};
use crate::vcpu::{SyscallMode, Vcpu, VcpuError};
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
    /// Control socket.
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    /// The guest reached a state the VMM cannot continue from.
    #[error("guest cannot continue: {0}")]
    GuestFatal(String),
    /// Host stdio cannot be given to the guest.
    #[error("cannot give stdio to the guest: {0}")]
    Stdio(std::io::Error),
    /// A host facility the sandbox needs failed (signalfd, eventfd, threads).
    #[error("{what}: {source}")]
    Host {
        /// What.
        what: &'static str,
        /// Cause.
        source: std::io::Error,
    },
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
    /// Port remaps (guest port, host port), applied when the guest binds a TCP/UDP port.
    pub port_map: Vec<(u16, u16)>,
    /// Initial working directory inside the root (default `/`).
    pub workdir: Option<String>,
    /// Control socket path (`run --control`).
    pub control: Option<PathBuf>,
    /// Rescue points (`--rescue FILE`).
    pub rescue: Vec<crate::rescue::spec::RescueSpec>,
    /// Fault injections (`--inject`).
    pub injects: Vec<crate::rescue::spec::InjectSpec>,
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

/// The VM's KVM handles (replaced in a forked child, which needs its own).
#[derive(Debug)]
pub(crate) struct VmHandles {
    pub(crate) kvm: Kvm,
    pub(crate) vm: VmFd,
}

/// State shared by every vCPU thread of a sandbox.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) vm: Mutex<VmHandles>,
    pub(crate) proc: Arc<Mutex<Process>>,
    pub(crate) events: Mutex<EventSink>,
    pub(crate) syscall_mode: Mutex<Option<SyscallMode>>,
    /// This VMM process was forked for a guest fork: it has no main thread waiting for the
    /// outcome, so the vCPU thread that ends the process exits it itself.
    pub(crate) forked_child: AtomicBool,
    pub(crate) next_vcpu_id: AtomicU64,
    /// vCPUs of exited threads, reused for new threads (KVM cannot destroy a vCPU, and a
    /// thread-per-connection server would otherwise exhaust them).
    pub(crate) vcpu_pool: Mutex<Vec<Vcpu>>,
    /// How the run ended (set once), signalled through `outcome_fd`.
    outcome: Mutex<Option<Result<RunOutcome, SandboxError>>>,
    outcome_fd: OwnedFd,
    /// Port remaps for bind().
    pub(crate) port_map: Vec<(u16, u16)>,
    /// The stop/resume rendezvous of the vCPU threads.
    pub(crate) world: crate::checkpoint::world::World,
    /// Live checkpoints.
    pub(crate) checkpoints: Mutex<crate::checkpoint::Checkpoints>,
    /// Wakes the rescue watchdog.
    pub(crate) watch: crate::rescue::watchdog::Watch,
    /// What a gdb session asked of the vCPU threads, and what they report to it.
    pub(crate) debug: crate::gdb::Debugger,
    /// When the sandbox was created.
    pub(crate) started: std::time::Instant,
}

impl Shared {
    /// Record how the run ended and wake the main thread. In a forked child, exit now.
    pub(crate) fn finish(&self, result: Result<RunOutcome, SandboxError>) {
        if self.forked_child.load(std::sync::atomic::Ordering::SeqCst) {
            match result {
                Ok(RunOutcome::Exited(code)) => std::process::exit(code),
                Ok(RunOutcome::Killed(sig)) => die_by_signal(sig),
                Err(e) => {
                    report!("assure-vmm: {e}");
                    std::process::exit(125);
                }
            }
        }
        // Recorded before any stop can fail with "ended", so a gdb session finds it.
        self.debug.guest_ended(match &result {
            Ok(outcome) => *outcome,
            Err(_) => RunOutcome::Killed(libc::SIGKILL),
        });
        self.world.guest_ended();
        self.watch.end();
        let mut slot = self.outcome.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(result);
        }
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local to our eventfd.
        unsafe { libc::write(self.outcome_fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Lock the event sink.
    pub(crate) fn events(&self) -> std::sync::MutexGuard<'_, EventSink> {
        self.events.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A forked guest process that died of a signal: the guest parent's wait4 must see exactly
/// that, so this VMM process dies of the same signal (without a core file).
pub fn die_by_signal(sig: i32) -> ! {
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain libc calls on this process; raise does not return for a fatal signal.
    unsafe {
        libc::setrlimit(libc::RLIMIT_CORE, &no_core);
        libc::signal(sig, libc::SIG_DFL);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, sig);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
        libc::raise(sig);
    }
    std::process::exit(128 + sig)
}

/// The `status` answer of the control socket.
fn status(shared: &Shared, started: std::time::Instant) -> crate::control::Status {
    let checkpoints = shared
        .checkpoints
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .status();
    let p = process::lock(&shared.proc);
    crate::control::Status {
        pid: p.pid,
        program: p.exe.clone(),
        threads: p.threads.keys().copied().collect(),
        memory_bytes: p.mm.ram().size(),
        memory_used_bytes: p.mm.ram().frames_in_use() * crate::memory::PAGE_SIZE,
        mappings: p.mm.vmas().count(),
        fds: p.fds.iter().count(),
        syscalls: p.stats.as_ref().map(|s| s.total_calls()),
        uptime_seconds: started.elapsed().as_secs_f64(),
        checkpoints,
    }
}

/// Answer one control request.
pub(crate) fn handle_request(
    shared: &Arc<Shared>,
    req: crate::control::Request,
) -> Result<serde_json::Value, String> {
    let started = shared.started;
    use crate::checkpoint;
    use crate::control::Request;
    let json = |v: Result<serde_json::Value, serde_json::Error>| v.map_err(|e| e.to_string());
    match req {
        Request::Status => json(serde_json::to_value(status(shared, started))),
        Request::Checkpoint { digest } => {
            let r = checkpoint::checkpoint(shared, digest).map_err(|e| e.to_string())?;
            tracing::info!(
                id = r.id,
                dirty_pages = r.dirty_pages,
                total_us = r.timing_us.total,
                "checkpoint taken"
            );
            json(serde_json::to_value(r))
        }
        Request::Rollback { id, digest } => {
            let r = checkpoint::rollback(shared, id, digest).map_err(|e| e.to_string())?;
            tracing::info!(
                id = r.id,
                restored_pages = r.restored_pages,
                total_us = r.timing_us.total,
                "rolled back"
            );
            json(serde_json::to_value(r))
        }
        Request::Release { id } => {
            checkpoint::release(shared, id).map_err(|e| e.to_string())?;
            Ok(serde_json::json!({ "id": id }))
        }
        Request::Digest => json(serde_json::to_value(
            checkpoint::digest_now(shared).map_err(|e| e.to_string())?,
        )),
        Request::Rescue => json(serde_json::to_value(
            process::lock(&shared.proc).rescue.report(),
        )),
        Request::RescueAdd { toml } => {
            let specs = crate::rescue::spec::parse_rescue_file(&toml).map_err(|e| e.to_string())?;
            let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
            place_rescue(shared, |r| r.add_points(specs).map_err(|e| e.to_string()))?;
            Ok(serde_json::json!({ "added": names }))
        }
        Request::RescueEnable { name, enabled } => {
            process::lock(&shared.proc)
                .rescue
                .set_enabled(&name, enabled)
                .map_err(|e| e.to_string())?;
            Ok(serde_json::json!({ "name": name, "enabled": enabled }))
        }
        Request::Inject { spec } => {
            let j = crate::rescue::spec::parse_inject(&spec).map_err(|e| e.to_string())?;
            let text = j.to_string();
            place_rescue(shared, |r| {
                r.add_inject(j);
                Ok(())
            })?;
            Ok(serde_json::json!({ "inject": text }))
        }
        Request::Events { last } => Ok(serde_json::json!({
            "events": shared.events().recent(last.unwrap_or(20)),
        })),
    }
}

/// Change the rescue table of a running guest and place new breakpoints: with every
/// thread stopped, since other threads may be executing the code being patched.
fn place_rescue(
    shared: &Shared,
    change: impl FnOnce(&mut crate::rescue::RescueState) -> Result<(), String>,
) -> Result<(), String> {
    let stopped = shared.world.stop(&shared.proc).map_err(|e| e.to_string())?;
    let mut p = process::lock(&shared.proc);
    let pm = &mut *p;
    change(&mut pm.rescue)?;
    for m in pm.symbols.modules() {
        pm.rescue.on_module(m, &mut pm.mm);
    }
    drop(p);
    stopped.resume();
    Ok(())
}

/// Host signals an operator sends to assure-vmm that are delivered to the guest.
const FORWARDED_SIGNALS: [i32; 6] = [
    libc::SIGTERM,
    libc::SIGINT,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
];

/// One sandbox: a VM running one guest process.
#[derive(Debug)]
pub struct Sandbox {
    shared: Arc<Shared>,
    first: Option<Runner>,
    control: Option<crate::control::ControlSocket>,
}

/// Register `mm`'s guest memory with `vm`, in the slots [`crate::memory::GuestRam::kvm_slots`] gives.
pub(crate) fn register_memory(vm: &VmFd, mm: &AddressSpace) -> Result<(), SandboxError> {
    for (slot, gpa, len) in mm.ram().kvm_slots() {
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: mm.ram().host_base() as u64 + gpa,
            flags: 0,
        };
        // SAFETY: the region is part of the address space's own mapping. The address space
        // is owned by the same sandbox as the VM and outlives its use: the VM is only run by
        // `Sandbox::run`, and the mapping is unmapped only when the sandbox drops.
        unsafe { vm.set_user_memory_region(region) }.map_err(|source| SandboxError::Kvm {
            op: "register guest memory",
            source,
        })?;
    }
    Ok(())
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
        let mut fs = FsContext::new(&cfg.root)?;
        let exe = resolve_program(&fs, &cfg.program)?;
        let mut argv = vec![cfg.program.clone()];
        argv.extend(cfg.args.iter().cloned());
        let mut envp = vec![format!("PATH={DEFAULT_PATH}"), "HOME=/".to_string()];
        for kv in &cfg.env {
            let key = kv.split('=').next().unwrap_or(kv);
            envp.retain(|e| e.split('=').next() != Some(key));
            envp.push(kv.clone());
        }
        if let Some(dir) = &cfg.workdir {
            let abs = fs
                .absolute(Some("/"), dir.as_bytes())
                .map_err(|e| SandboxError::GuestFatal(format!("workdir {dir}: {e}")))?;
            fs.open(&abs, libc::O_PATH | libc::O_DIRECTORY, 0)
                .map_err(|e| SandboxError::GuestFatal(format!("workdir {dir}: {e}")))?;
            fs.set_cwd(crate::fs::normalize(&abs));
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
            threads: Default::default(),
            process_pending: Vec::new(),
            futexes: Default::default(),
            next_tid: pid,
            stats: None,
            timer: Default::default(),
            self_ref: std::sync::Weak::new(),
            thread_names: Default::default(),
            rescue: crate::rescue::RescueState::new(&exe),
        };
        {
            let p = &mut proc;
            p.rescue
                .add_points(cfg.rescue.clone())
                .map_err(|e| SandboxError::GuestFatal(e.to_string()))?;
            for j in &cfg.injects {
                p.rescue.add_inject(j.clone());
            }
            if !p.rescue.is_empty() {
                for m in p.symbols.modules() {
                    p.rescue.on_module(m, &mut p.mm);
                }
            }
        }
        proc.threads.insert(pid, ThreadShared::default());
        for fd in 0..3 {
            proc.fds
                .insert(stdio_file(fd)?, false)
                .map_err(|e| SandboxError::GuestFatal(format!("stdio: {e}")))?;
        }
        tracing::info!(program = %exe, entry = format_args!("{:#x}", loaded.start_rip), interp = ?loaded.interp.as_ref().map(|i| &i.path), "loaded");
        // SAFETY: plain eventfd creation; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(SandboxError::Host {
                what: "eventfd",
                source: std::io::Error::last_os_error(),
            });
        }
        let shared = Arc::new(Shared {
            vm: Mutex::new(VmHandles { kvm, vm }),
            proc: Arc::new(Mutex::new(proc)),
            events: Mutex::new(EventSink::new(cfg.events.as_deref())?),
            syscall_mode: Mutex::new(None),
            forked_child: AtomicBool::new(false),
            next_vcpu_id: AtomicU64::new(1),
            vcpu_pool: Mutex::new(Vec::new()),
            outcome: Mutex::new(None),
            // SAFETY: `efd` is a new fd we own.
            outcome_fd: unsafe { OwnedFd::from_raw_fd(efd) },
            port_map: cfg.port_map.clone(),
            world: Default::default(),
            checkpoints: Default::default(),
            watch: Default::default(),
            debug: crate::gdb::Debugger::new().map_err(|source| SandboxError::Host {
                what: "eventfd",
                source,
            })?,
            started: std::time::Instant::now(),
        });
        process::lock(&shared.proc).self_ref = Arc::downgrade(&shared.proc);
        let first = Runner::new(shared.clone(), vcpu, Thread::new(pid));
        let control = cfg
            .control
            .as_deref()
            .map(crate::control::ControlSocket::bind)
            .transpose()?;
        Ok(Sandbox {
            shared,
            first: Some(first),
            control,
        })
    }

    /// Was this VMM process forked for a guest fork? (Never true where `run` returns: a
    /// forked child's vCPU thread ends the process itself.)
    pub fn is_forked_child(&self) -> bool {
        self.shared
            .forked_child
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Serve gdb sessions on `listener` (see [`crate::gdb`]); with `wait`, the guest's
    /// first instruction waits for the first session. Call before [`Sandbox::run`].
    pub fn serve_gdb(
        &self,
        listener: crate::gdb::Listener,
        wait: bool,
    ) -> Result<(), SandboxError> {
        crate::gdb::spawn(self.shared.clone(), listener, wait).map_err(|source| {
            SandboxError::Host {
                what: "start the gdb stub",
                source,
            }
        })
    }

    /// Keep per-syscall statistics from now on (see [`Sandbox::stats_report`]).
    pub fn enable_stats(&mut self) {
        process::lock(&self.shared.proc).stats = Some(Default::default());
    }

    /// The per-syscall statistics table, if they were kept.
    pub fn stats_report(&self) -> Option<String> {
        let p = process::lock(&self.shared.proc);
        p.stats.as_ref().map(|s| s.report(crate::syscalls::name_of))
    }

    /// Run the guest until it exits or dies. The calling thread forwards the operator's
    /// signals (SIGTERM, SIGINT, ...) to the guest while vCPU threads run it.
    pub fn run(&mut self) -> Result<RunOutcome, SandboxError> {
        let first = self
            .first
            .take()
            .ok_or_else(|| SandboxError::GuestFatal("sandbox already ran".into()))?;
        crate::kick::install();
        // Block the forwarded signals before starting vCPU threads (they inherit the mask),
        // so they arrive only through the signalfd below.
        // SAFETY: plain signal-set manipulation on locals.
        let sigfd = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            for s in FORWARDED_SIGNALS {
                libc::sigaddset(&mut set, s);
            }
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            libc::signalfd(-1, &set, libc::SFD_CLOEXEC)
        };
        if sigfd < 0 {
            return Err(SandboxError::Host {
                what: "signalfd",
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: a new fd we own.
        let sigfd = unsafe { OwnedFd::from_raw_fd(sigfd) };
        first.spawn().map_err(|source| SandboxError::Host {
            what: "start vCPU thread",
            source,
        })?;
        crate::rescue::watchdog::spawn(self.shared.clone()).map_err(|source| {
            SandboxError::Host {
                what: "start the rescue watchdog",
                source,
            }
        })?;
        loop {
            let control_fd = self.control.as_ref().map_or(-1, |c| c.fd());
            let mut fds = [
                libc::pollfd {
                    fd: self.shared.outcome_fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: sigfd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                // A negative fd is ignored by poll: no control socket.
                libc::pollfd {
                    fd: control_fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: three valid pollfds on the stack.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 3, -1) };
            if n < 0 {
                continue;
            }
            if fds[2].revents != 0 {
                if let Some(control) = &self.control {
                    let shared = &self.shared;
                    control.serve(&mut |req| handle_request(shared, req));
                }
            }
            if fds[0].revents != 0 {
                let outcome = self
                    .shared
                    .outcome
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .take();
                if let Some(result) = outcome {
                    // An attached gdb is told how the guest ended before the VMM exits.
                    self.shared
                        .debug
                        .wait_detached(std::time::Duration::from_secs(2));
                    if let Ok(RunOutcome::Exited(status)) = &result {
                        self.shared.events().exit(*status);
                    }
                    // Unlinks deferred for live checkpoints happen now, for good.
                    process::lock(&self.shared.proc).fs.removals.finish();
                    return result;
                }
            }
            if fds[1].revents != 0 {
                // SAFETY: plain data read from the signalfd into a local of the right size.
                let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
                // SAFETY: as above.
                let r = unsafe {
                    libc::read(
                        sigfd.as_raw_fd(),
                        (&mut info as *mut libc::signalfd_siginfo).cast(),
                        std::mem::size_of::<libc::signalfd_siginfo>(),
                    )
                };
                if r == std::mem::size_of::<libc::signalfd_siginfo>() as isize {
                    let signo = info.ssi_signo as i32;
                    tracing::info!(signal = %signal::name(signo), from = info.ssi_pid, "delivering operator signal to the guest");
                    let mut p = process::lock(&self.shared.proc);
                    let pid = p.pid;
                    let _ = pid;
                    p.post_signal(
                        None,
                        SigInfo {
                            signo,
                            code: 0,
                            addr: 0,
                            pid: 0,
                            uid: info.ssi_uid,
                            trapno: 0,
                            err: 0,
                        },
                    );
                }
            }
        }
    }
}
