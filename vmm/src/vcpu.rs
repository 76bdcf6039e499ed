//! A virtual CPU: set-up of the supervisor's CPU state, running, and decoding exits.
//!
//! Exit decoding is a pure function of the raw exit and a few register values, so unit tests
//! can feed it synthetic exits.

use kvm_bindings::{
    kvm_msr_entry, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs,
    KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, SyncReg, VcpuExit, VcpuFd, VmFd};

use crate::arch::x86_64::layout::{self, selector};
use crate::arch::x86_64::supervisor;

/// Errors of vCPU set-up and running.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// A KVM ioctl failed.
    #[error("{op}: {source}")]
    Kvm {
        /// What was attempted.
        op: &'static str,
        /// The error.
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer MSRs than given.
    #[error("KVM accepted {accepted} of {wanted} supervisor MSRs")]
    Msrs {
        /// Accepted.
        accepted: usize,
        /// Given.
        wanted: usize,
    },
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Kvm { op, source }
}

/// An exit, copied out of the shared run structure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawExit {
    /// `out` to a port.
    IoOut {
        /// Port.
        port: u16,
    },
    /// `in` from a port.
    IoIn {
        /// Port.
        port: u16,
    },
    /// Memory-mapped I/O (no device exists: a guest bug or a hostile guest).
    Mmio {
        /// Guest physical address.
        addr: u64,
    },
    /// `hlt`.
    Hlt,
    /// Triple fault or similar.
    Shutdown,
    /// KVM could not emulate something.
    InternalError,
    /// VM entry failed.
    FailEntry {
        /// Hardware reason.
        reason: u64,
    },
    /// Debug exit (single step, hardware breakpoint).
    Debug,
    /// KVM_RUN was interrupted by a signal or immediate_exit.
    Interrupted,
    /// KVM could not reach the host page behind a guest access (EFAULT).
    MemoryFault,
    /// Anything else.
    Other(String),
}

/// Where `SYSCALL` left the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyscallMode {
    /// Page-table based KVM: `SYSCALL` stayed at CPL3.
    StayedInUserMode,
    /// Hardware KVM: `SYSCALL` entered CPL0, as the manual says.
    EnteredKernelMode,
}

/// What a guest exit means.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GuestEvent {
    /// The guest executed `SYSCALL`.
    Syscall(SyscallMode),
    /// A CPU exception arrived through the IDT; its frame is on the ring-0 stack.
    Exception {
        /// Vector.
        vector: u8,
    },
    /// A user-mode port access we did not set up (Linux raises SIGSEGV for it).
    ForeignPortIo,
    /// KVM_RUN returned for a signal or a kick; nothing happened in the guest.
    Interrupted,
    /// KVM could not reach a host page (see [`RawExit::MemoryFault`]); retry.
    MemoryFault,
    /// A single-step trap set by the VMM ([`Vcpu::set_single_step`]).
    DebugTrap,
    /// The guest cannot continue.
    Fatal(String),
}

/// Decode an exit. `rip` and `cs` are the registers at the exit.
pub fn decode_exit(exit: &RawExit, rip: u64, cs: u16) -> GuestEvent {
    let cpl = cs & 3;
    match *exit {
        // Page-table based KVM completes the `out` before exiting (RIP is past it); hardware
        // KVM exits with RIP on it and skips it on the next run unless RIP was changed.
        RawExit::IoOut { port }
            if port == layout::SYSCALL_PORT
                && (rip == supervisor::SYSCALL_EXIT_RIP
                    || rip == supervisor::SYSCALL_EXIT_RIP + supervisor::OUT_IMM8_LEN) =>
        {
            GuestEvent::Syscall(if cpl == 3 {
                SyscallMode::StayedInUserMode
            } else {
                SyscallMode::EnteredKernelMode
            })
        }
        RawExit::IoOut { port }
            if cpl == 0
                && (layout::EXCEPTION_PORT_BASE..layout::EXCEPTION_PORT_BASE + 32)
                    .contains(&port)
                && (layout::EXCEPTION_STUBS..layout::EXCEPTION_STUBS + 0x1000).contains(&rip) =>
        {
            GuestEvent::Exception {
                vector: (port - layout::EXCEPTION_PORT_BASE) as u8,
            }
        }
        RawExit::IoOut { .. } | RawExit::IoIn { .. } if cpl == 3 => GuestEvent::ForeignPortIo,
        RawExit::Interrupted => GuestEvent::Interrupted,
        RawExit::MemoryFault => GuestEvent::MemoryFault,
        RawExit::Debug => GuestEvent::DebugTrap,
        ref other => GuestEvent::Fatal(format!(
            "unexpected exit {other:?} at rip {rip:#x} cs {cs:#x}"
        )),
    }
}

/// Everything a checkpoint keeps of one vCPU: general and segment registers (FS and GS
/// base included), the FPU/SSE/AVX image and pending events. XCR0 and the MSRs are set once
/// when the vCPU is created and cannot be changed from CPL3, where the guest runs.
pub struct CpuState {
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// XSAVE image.
    pub xsave: Box<kvm_xsave>,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// XCR0 (for digests: it is set once per vCPU, like the supervisor MSRs, and the guest
    /// cannot change either at CPL3, so neither is saved or loaded per checkpoint).
    pub xcr0: u64,
}

impl Clone for CpuState {
    fn clone(&self) -> Self {
        // kvm_xsave ends in a flexible array (unused by KVM_GET_XSAVE's 4 KiB form), so it
        // has no Clone: copy the region.
        let mut xsave = Box::new(kvm_xsave::default());
        xsave.region = self.xsave.region;
        CpuState {
            regs: self.regs,
            sregs: self.sregs,
            xsave,
            events: self.events,
            xcr0: self.xcr0,
        }
    }
}

impl std::fmt::Debug for CpuState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CpuState")
            .field("rip", &format_args!("{:#x}", self.regs.rip))
            .field("rsp", &format_args!("{:#x}", self.regs.rsp))
            .finish_non_exhaustive()
    }
}

impl CpuState {
    /// The state of a thread waiting in a syscall: registers as given, its XSAVE image, and
    /// no pending event (its last exit was the syscall's port I/O, which injects nothing).
    pub fn waiting(regs: &kvm_regs, sregs: &kvm_sregs, xsave: &kvm_xsave) -> CpuState {
        let mut image = Box::new(kvm_xsave::default());
        image.region = xsave.region;
        CpuState {
            regs: *regs,
            sregs: *sregs,
            xsave: image,
            events: kvm_vcpu_events::default(),
            xcr0: host_xcr0(),
        }
    }

    /// Does `other` hold the same guest-visible state (a thread that stayed idle since a
    /// checkpoint needs no reload)?
    pub fn same_as(&self, other: &CpuState) -> bool {
        self.digest_bytes() == other.digest_bytes()
            && self.events.exception.injected == other.events.exception.injected
            && self.events.exception.pending == other.events.exception.pending
            && self.events.interrupt.injected == other.events.interrupt.injected
    }

    /// The bytes that define the state, for digests: registers, the segment state, XCR0,
    /// and the XSAVE image's legacy area, header and extended components.
    pub fn digest_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(4096 + 512);
        let r = &self.regs;
        for v in [
            r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11,
            r.r12, r.r13, r.r14, r.r15, r.rip, r.rflags,
        ] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        let s = &self.sregs;
        for seg in [&s.cs, &s.ds, &s.es, &s.fs, &s.gs, &s.ss] {
            out.extend_from_slice(&seg.base.to_le_bytes());
            out.extend_from_slice(&seg.selector.to_le_bytes());
        }
        for v in [s.cr0, s.cr3, s.cr4, s.efer] {
            out.extend_from_slice(&v.to_le_bytes());
        }
        out.extend_from_slice(&self.xcr0.to_le_bytes());
        for w in self.xsave.region.iter() {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }
}

/// One vCPU with the supervisor's state loaded.
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    id: u64,
    /// The registers were changed and must be written before the next run.
    regs_dirty: bool,
    sregs_dirty: bool,
    /// Single-stepping is on ([`Vcpu::set_single_step`]).
    single_step: bool,
}

impl Vcpu {
    /// Create vCPU `id` of `vm`, with CR3 = `cr3`.
    pub fn new(kvm: &Kvm, vm: &VmFd, id: u64, cr3: u64) -> Result<Self, VcpuError> {
        let fd = vm.create_vcpu(id).map_err(kvm_err("create vCPU"))?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm_err("get supported CPUID"))?;
        fd.set_cpuid2(&cpuid).map_err(kvm_err("set CPUID"))?;
        let template = fd.get_sregs().map_err(kvm_err("get sregs"))?;
        fd.set_sregs(&supervisor::initial_sregs(&template, cr3, id))
            .map_err(kvm_err("set sregs"))?;
        let entries: Vec<kvm_msr_entry> = supervisor::msrs()
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| VcpuError::Msrs {
            accepted: 0,
            wanted: entries.len(),
        })?;
        let accepted = fd.set_msrs(&msrs).map_err(kvm_err("set MSRs"))?;
        if accepted != entries.len() {
            return Err(VcpuError::Msrs {
                accepted,
                wanted: entries.len(),
            });
        }
        // User code sees the host's CPUID (not intercepted at CPL3), so it will use every
        // XSAVE feature the host has: enable the same set.
        let mut xcrs = kvm_xcrs {
            nr_xcrs: 1,
            ..Default::default()
        };
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = host_xcr0();
        fd.set_xcrs(&xcrs).map_err(kvm_err("set XCR0"))?;
        let mut vcpu = Vcpu {
            fd,
            id,
            regs_dirty: false,
            sregs_dirty: false,
            single_step: false,
        };
        vcpu.fd.set_sync_valid_reg(SyncReg::Register);
        vcpu.fd.set_sync_valid_reg(SyncReg::SystemRegister);
        Ok(vcpu)
    }

    /// The vCPU's id (its TSS and ring-0 stack are the id's block of the supervisor).
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The shared run structure (for `immediate_exit`).
    pub fn kvm_run_mut(&mut self) -> &mut kvm_bindings::kvm_run {
        self.fd.get_kvm_run()
    }

    /// The vCPU fd (for checkpointing and debugging).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Load the complete register state (used before the first run and after restores).
    pub fn set_state(&mut self, regs: &kvm_regs, sregs: &kvm_sregs) -> Result<(), VcpuError> {
        self.fd.set_regs(regs).map_err(kvm_err("set regs"))?;
        self.fd.set_sregs(sregs).map_err(kvm_err("set sregs"))?;
        let sync = self.fd.sync_regs_mut();
        sync.regs = *regs;
        sync.sregs = *sregs;
        self.regs_dirty = false;
        self.sregs_dirty = false;
        Ok(())
    }

    /// Everything a checkpoint keeps. The general and segment registers come from the sync
    /// area (the state at the last exit plus the VMM's changes not yet given to KVM).
    pub fn save_state(&mut self) -> Result<CpuState, VcpuError> {
        let xsave = Box::new(self.fd.get_xsave().map_err(kvm_err("get XSAVE"))?);
        let events = self
            .fd
            .get_vcpu_events()
            .map_err(kvm_err("get vCPU events"))?;
        let sync = self.fd.sync_regs_mut();
        Ok(CpuState {
            regs: sync.regs,
            sregs: sync.sregs,
            xsave,
            events,
            xcr0: host_xcr0(),
        })
    }

    /// Load a state saved by [`Vcpu::save_state`] (of this or another vCPU of the same VM;
    /// the task register stays this vCPU's own, since each vCPU has its own TSS).
    pub fn restore_state(&mut self, state: &CpuState) -> Result<(), VcpuError> {
        // SAFETY: an image KVM produced for a vCPU of this VM.
        unsafe { self.fd.set_xsave(&state.xsave) }.map_err(kvm_err("set XSAVE"))?;
        self.fd
            .set_vcpu_events(&state.events)
            .map_err(kvm_err("set vCPU events"))?;
        let mut sregs = state.sregs;
        sregs.tr = supervisor::task_register(self.id);
        self.set_state(&state.regs, &sregs)
    }

    /// The complete state as KVM holds it now (every part read with its own ioctl, XCR0
    /// included), to check what a restore loaded.
    pub fn read_back_state(&mut self) -> Result<CpuState, VcpuError> {
        // Changes made in the sync area reach KVM at the next run; give them now, so what is
        // read back is what the guest will run with.
        if self.regs_dirty || self.sregs_dirty {
            let sync = self.fd.sync_regs_mut();
            let (regs, sregs) = (sync.regs, sync.sregs);
            self.set_state(&regs, &sregs)?;
        }
        let (regs, sregs) = self.get_state()?;
        let xcrs = self.fd.get_xcrs().map_err(kvm_err("get XCRs"))?;
        let mut state = self.save_state()?;
        state.regs = regs;
        state.sregs = sregs;
        state.xcr0 = xcrs.xcrs[..(xcrs.nr_xcrs as usize).min(xcrs.xcrs.len())]
            .iter()
            .find(|x| x.xcr == 0)
            .map_or(0, |x| x.value);
        Ok(state)
    }

    /// Read the full state from KVM (not just the sync area).
    pub fn get_state(&self) -> Result<(kvm_regs, kvm_sregs), VcpuError> {
        Ok((
            self.fd.get_regs().map_err(kvm_err("get regs"))?,
            self.fd.get_sregs().map_err(kvm_err("get sregs"))?,
        ))
    }

    /// General registers as of the last exit (plus our changes).
    pub fn regs(&mut self) -> &kvm_regs {
        &self.fd.sync_regs_mut().regs
    }

    /// General registers, to change.
    pub fn regs_mut(&mut self) -> &mut kvm_regs {
        self.regs_dirty = true;
        &mut self.fd.sync_regs_mut().regs
    }

    /// Special registers as of the last exit.
    pub fn sregs(&mut self) -> &kvm_sregs {
        &self.fd.sync_regs_mut().sregs
    }

    /// Special registers, to change.
    pub fn sregs_mut(&mut self) -> &mut kvm_sregs {
        self.sregs_dirty = true;
        &mut self.fd.sync_regs_mut().sregs
    }

    /// Both, to change (for code that edits them together).
    pub fn state_mut(&mut self) -> (&mut kvm_regs, &mut kvm_sregs) {
        self.regs_dirty = true;
        self.sregs_dirty = true;
        let sync = self.fd.sync_regs_mut();
        (&mut sync.regs, &mut sync.sregs)
    }

    /// Return to user mode at the current `regs()` RIP/RSP/RFLAGS. Needed after an exit at
    /// CPL0 (exceptions, and syscalls on hardware KVM).
    pub fn enter_user_mode(&mut self) {
        let cs = self.sregs().cs.selector;
        if cs != selector::USER_CS {
            let s = self.sregs_mut();
            s.cs = supervisor::user_code_segment();
            s.ss = supervisor::user_data_segment();
        }
    }

    /// Trap after every instruction (`KVM_GUESTDBG_SINGLESTEP`), for a debugger's step.
    pub fn set_single_step(&mut self, on: bool) -> Result<(), VcpuError> {
        self.single_step = on;
        self.arm_single_step()
    }

    /// Give KVM the single-step setting for the registers as they are now. KVM sets the
    /// trap flag for the RIP current at KVM_SET_GUEST_DEBUG only, so registers changed by
    /// the VMM are written first (and the setting given again after every such change).
    fn arm_single_step(&mut self) -> Result<(), VcpuError> {
        if self.regs_dirty || self.sregs_dirty {
            let sync = self.fd.sync_regs_mut();
            let (regs, sregs) = (sync.regs, sync.sregs);
            self.set_state(&regs, &sregs)?;
        }
        let on = self.single_step;
        let mut dbg = kvm_bindings::kvm_guest_debug::default();
        if on {
            dbg.control = kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_SINGLESTEP;
        }
        self.fd
            .set_guest_debug(&dbg)
            .map_err(kvm_err("set guest debug"))
    }

    /// Run until the next exit.
    pub fn run(&mut self) -> Result<RawExit, VcpuError> {
        if self.single_step && (self.regs_dirty || self.sregs_dirty) {
            self.arm_single_step()?;
        }
        if self.regs_dirty {
            self.fd.set_sync_dirty_reg(SyncReg::Register);
        }
        if self.sregs_dirty {
            self.fd.set_sync_dirty_reg(SyncReg::SystemRegister);
        }
        self.regs_dirty = false;
        self.sregs_dirty = false;
        let exit = match self.fd.run() {
            Ok(VcpuExit::IoOut(port, _)) => RawExit::IoOut { port },
            Ok(VcpuExit::IoIn(port, _)) => RawExit::IoIn { port },
            Ok(VcpuExit::MmioRead(addr, _)) | Ok(VcpuExit::MmioWrite(addr, _)) => {
                RawExit::Mmio { addr }
            }
            Ok(VcpuExit::Hlt) => RawExit::Hlt,
            Ok(VcpuExit::Shutdown) => RawExit::Shutdown,
            Ok(VcpuExit::InternalError) => RawExit::InternalError,
            Ok(VcpuExit::FailEntry(reason, _)) => RawExit::FailEntry { reason },
            Ok(VcpuExit::Debug(_)) => RawExit::Debug,
            Ok(VcpuExit::Intr) => RawExit::Interrupted,
            Ok(other) => RawExit::Other(format!("{other:?}")),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => RawExit::Interrupted,
            // A guest access met a host page that is briefly read-only while the VMM makes
            // KVM drop a stale translation (mm's protection changes): the caller retries.
            Err(e) if e.errno() == libc::EFAULT => RawExit::MemoryFault,
            Err(source) => {
                return Err(VcpuError::Kvm {
                    op: "run vCPU",
                    source,
                })
            }
        };
        // The sync area is rewritten by KVM on exit; our dirty flags are consumed.
        self.fd.clear_sync_dirty_reg(SyncReg::Register);
        self.fd.clear_sync_dirty_reg(SyncReg::SystemRegister);
        Ok(exit)
    }
}

/// The host's XCR0.
fn host_xcr0() -> u64 {
    #[cfg(target_arch = "x86_64")]
    {
        // SAFETY: XGETBV(0) is valid whenever the OS enabled XSAVE, which every x86-64 Linux
        // host that runs KVM does; it only reads a register.
        unsafe { core::arch::x86_64::_xgetbv(0) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn syscall_exits_are_recognised_in_both_modes() {
        let exit = RawExit::IoOut {
            port: layout::SYSCALL_PORT,
        };
        let rip = supervisor::SYSCALL_EXIT_RIP;
        assert_eq!(
            decode_exit(&exit, rip, selector::USER_CS),
            GuestEvent::Syscall(SyscallMode::StayedInUserMode)
        );
        assert_eq!(
            decode_exit(&exit, rip, selector::KERNEL_CS),
            GuestEvent::Syscall(SyscallMode::EnteredKernelMode)
        );
        // RIP already past the `out`, as page-table based KVM reports it.
        let after = rip + supervisor::OUT_IMM8_LEN;
        assert_eq!(
            decode_exit(&exit, after, selector::USER_CS),
            GuestEvent::Syscall(SyscallMode::StayedInUserMode)
        );
        assert_eq!(
            decode_exit(&exit, after + 1, selector::USER_CS),
            GuestEvent::ForeignPortIo
        );
    }

    #[test]
    fn a_user_out_elsewhere_is_not_a_syscall() {
        let exit = RawExit::IoOut {
            port: layout::SYSCALL_PORT,
        };
        assert_eq!(
            decode_exit(&exit, 0x401000, selector::USER_CS),
            GuestEvent::ForeignPortIo
        );
        let exc = RawExit::IoOut {
            port: layout::EXCEPTION_PORT_BASE + 14,
        };
        assert_eq!(
            decode_exit(&exc, 0x401000, selector::USER_CS),
            GuestEvent::ForeignPortIo
        );
    }

    #[test]
    fn exception_ports_map_to_vectors_only_from_the_stubs() {
        let exc = RawExit::IoOut {
            port: layout::EXCEPTION_PORT_BASE + 14,
        };
        let rip = layout::EXCEPTION_STUBS + 14 * 16;
        assert_eq!(
            decode_exit(&exc, rip, selector::KERNEL_CS),
            GuestEvent::Exception { vector: 14 }
        );
        assert!(matches!(
            decode_exit(&exc, 0x1234, selector::KERNEL_CS),
            GuestEvent::Fatal(_)
        ));
    }

    #[test]
    fn other_exits_are_fatal_or_interruptions() {
        assert_eq!(
            decode_exit(&RawExit::Interrupted, 0, selector::USER_CS),
            GuestEvent::Interrupted
        );
        assert!(matches!(
            decode_exit(&RawExit::Shutdown, 0, selector::KERNEL_CS),
            GuestEvent::Fatal(_)
        ));
        assert!(matches!(
            decode_exit(&RawExit::Mmio { addr: 0 }, 0, selector::USER_CS),
            GuestEvent::Fatal(_)
        ));
        assert_eq!(
            decode_exit(&RawExit::Debug, 0x401000, selector::USER_CS),
            GuestEvent::DebugTrap
        );
    }
}
