//! Signals: names, default actions, dispositions, and delivery of a signal to a guest
//! handler with the same frame layout Linux builds (`rt_sigframe`), so `rt_sigreturn`,
//! `ucontext_t` readers and unwinders in the guest see what they expect.

use kvm_bindings::kvm_regs;

use crate::errno::Errno;
use crate::mm::AddressSpace;

/// Number of signals.
pub const NSIG: usize = 64;
/// `SIG_DFL`.
pub const SIG_DFL: u64 = 0;
/// `SIG_IGN`.
pub const SIG_IGN: u64 = 1;
/// `SA_SIGINFO`.
pub const SA_SIGINFO: u64 = 0x4;
/// `SA_ONSTACK`.
pub const SA_ONSTACK: u64 = 0x0800_0000;
/// `SA_RESTORER`.
pub const SA_RESTORER: u64 = 0x0400_0000;
/// `SA_RESTART`.
pub const SA_RESTART: u64 = 0x1000_0000;
/// `SA_NODEFER`.
pub const SA_NODEFER: u64 = 0x4000_0000;
/// `SA_RESETHAND`.
pub const SA_RESETHAND: u64 = 0x8000_0000;

/// Size of the XSAVE image saved in a frame (KVM's `kvm_xsave`).
pub const XSAVE_SIZE: u64 = 4096;
const SIGINFO_SIZE: u64 = 128;
const UCONTEXT_SIZE: u64 = 304;
const MCONTEXT_OFFSET: u64 = 40;
const SIGMASK_OFFSET: u64 = 296;
/// `rt_sigframe`: return address, ucontext, siginfo.
const FRAME_SIZE: u64 = 8 + UCONTEXT_SIZE + SIGINFO_SIZE;
/// Stack a signal frame needs at most (red zone, XSAVE image, alignment, frame): what the
/// guest is told as AT_MINSIGSTKSZ.
pub const FRAME_RESERVE: u64 = 128 + XSAVE_SIZE + 64 + FRAME_SIZE + 16;
/// RFLAGS bits a handler may change through its ucontext (Linux's FIX_EFLAGS).
const FIX_EFLAGS: u64 = 0x50dd5;
const UC_FP_XSTATE: u64 = 1;
const SS_ONSTACK: i32 = 1;
const SS_DISABLE: i32 = 2;

/// Name of a signal, `SIGSEGV` style.
pub fn name(sig: i32) -> String {
    let n = match sig {
        1 => "SIGHUP",
        2 => "SIGINT",
        3 => "SIGQUIT",
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        10 => "SIGUSR1",
        11 => "SIGSEGV",
        12 => "SIGUSR2",
        13 => "SIGPIPE",
        14 => "SIGALRM",
        15 => "SIGTERM",
        16 => "SIGSTKFLT",
        17 => "SIGCHLD",
        18 => "SIGCONT",
        19 => "SIGSTOP",
        20 => "SIGTSTP",
        21 => "SIGTTIN",
        22 => "SIGTTOU",
        23 => "SIGURG",
        24 => "SIGXCPU",
        25 => "SIGXFSZ",
        26 => "SIGVTALRM",
        27 => "SIGPROF",
        28 => "SIGWINCH",
        29 => "SIGIO",
        30 => "SIGPWR",
        31 => "SIGSYS",
        _ => return format!("SIG{sig}"),
    };
    n.to_string()
}

/// What a signal does when nobody handles it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DefaultAction {
    /// Ends the process.
    Terminate,
    /// Ends the process with a core dump.
    Core,
    /// Nothing.
    Ignore,
    /// Stop / continue (treated as ignore: a process VM has no job control).
    StopOrContinue,
}

/// Linux's default action for `sig`.
pub fn default_action(sig: i32) -> DefaultAction {
    match sig {
        3 | 4 | 5 | 6 | 7 | 8 | 11 | 24 | 25 | 31 => DefaultAction::Core,
        17 | 23 | 28 => DefaultAction::Ignore,
        18..=22 => DefaultAction::StopOrContinue,
        _ => DefaultAction::Terminate,
    }
}

/// The mask bit of `sig`.
pub fn bit(sig: i32) -> u64 {
    1u64 << ((sig - 1) as u32 & 63)
}

/// A `struct sigaction` as the kernel ABI has it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct SigAction {
    /// Handler address, SIG_DFL or SIG_IGN.
    pub handler: u64,
    /// SA_* flags.
    pub flags: u64,
    /// Return trampoline.
    pub restorer: u64,
    /// Signals blocked during the handler.
    pub mask: u64,
}

// SAFETY: plain data, every bit pattern is valid.
unsafe impl vm_memory::ByteValued for SigAction {}

/// An alternate signal stack (`stack_t`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[repr(C)]
pub struct AltStack {
    /// Base.
    pub sp: u64,
    /// SS_* flags.
    pub flags: i32,
    /// Padding.
    pub pad: i32,
    /// Size.
    pub size: u64,
}

// SAFETY: plain data, every bit pattern is valid.
unsafe impl vm_memory::ByteValued for AltStack {}

impl AltStack {
    /// The disabled stack.
    pub fn disabled() -> AltStack {
        AltStack {
            sp: 0,
            flags: SS_DISABLE,
            pad: 0,
            size: 0,
        }
    }
    fn enabled(&self) -> bool {
        self.flags & SS_DISABLE == 0 && self.size > 0
    }
    /// Is `sp` on this stack?
    pub fn contains(&self, sp: u64) -> bool {
        self.enabled() && sp > self.sp && sp - self.sp <= self.size
    }
    /// As reported by sigaltstack(2) for a thread at `sp`.
    pub fn reported(&self, sp: u64) -> AltStack {
        let mut s = *self;
        if self.contains(sp) {
            s.flags |= SS_ONSTACK;
        }
        s
    }
}

/// Dispositions of all signals of a process.
#[derive(Debug, Clone)]
pub struct Dispositions {
    actions: [SigAction; NSIG],
}

impl Default for Dispositions {
    fn default() -> Self {
        Dispositions {
            actions: [SigAction::default(); NSIG],
        }
    }
}

impl Dispositions {
    /// The action of `sig` (1..=64).
    pub fn get(&self, sig: i32) -> SigAction {
        self.actions[(sig - 1) as usize & (NSIG - 1)]
    }
    /// Replace the action of `sig`; SIGKILL and SIGSTOP cannot be changed.
    pub fn set(&mut self, sig: i32, action: SigAction) -> Result<SigAction, Errno> {
        if !(1..=NSIG as i32).contains(&sig) || sig == libc::SIGKILL || sig == libc::SIGSTOP {
            return Err(Errno::EINVAL);
        }
        let old = self.get(sig);
        self.actions[(sig - 1) as usize] = action;
        Ok(old)
    }
    /// Is `sig` caught by a handler?
    pub fn is_caught(&self, sig: i32) -> bool {
        !matches!(self.get(sig).handler, SIG_DFL | SIG_IGN)
    }
    /// Is `sig` ignored (explicitly, or by default)?
    pub fn is_ignored(&self, sig: i32) -> bool {
        match self.get(sig).handler {
            SIG_IGN => true,
            SIG_DFL => matches!(
                default_action(sig),
                DefaultAction::Ignore | DefaultAction::StopOrContinue
            ),
            _ => false,
        }
    }
}

/// What the guest's handler learns about a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SigInfo {
    /// Signal number.
    pub signo: i32,
    /// si_code (SEGV_MAPERR, SI_TKILL, ...).
    pub code: i32,
    /// Faulting address for SIGSEGV/SIGBUS/SIGFPE/SIGILL/SIGTRAP.
    pub addr: u64,
    /// Sender pid for kill/tgkill.
    pub pid: i32,
    /// Sender uid.
    pub uid: u32,
    /// Exception vector (sigcontext.trapno).
    pub trapno: u64,
    /// Error code (sigcontext.err).
    pub err: u64,
}

impl SigInfo {
    /// A signal the kernel generates (si_code SI_KERNEL), with no address or sender.
    pub fn kernel(signo: i32) -> SigInfo {
        SigInfo {
            signo,
            code: 0x80,
            addr: 0,
            pid: 0,
            uid: 0,
            trapno: 0,
            err: 0,
        }
    }

    fn bytes(&self) -> [u8; SIGINFO_SIZE as usize] {
        let mut b = [0u8; SIGINFO_SIZE as usize];
        b[0..4].copy_from_slice(&self.signo.to_le_bytes());
        b[8..12].copy_from_slice(&self.code.to_le_bytes());
        if matches!(self.signo, 4 | 5 | 7 | 8 | 11) && self.code > 0 {
            b[16..24].copy_from_slice(&self.addr.to_le_bytes());
        } else {
            b[16..20].copy_from_slice(&self.pid.to_le_bytes());
            b[20..24].copy_from_slice(&self.uid.to_le_bytes());
        }
        b
    }
}

/// Registers the frame saves besides the general ones.
#[derive(Debug, Clone, Copy)]
pub struct FrameExtras {
    /// CR2 at the fault.
    pub cr2: u64,
    /// Signal mask to restore on return.
    pub old_mask: u64,
    /// Alternate stack of the thread.
    pub altstack: AltStack,
}

fn sigcontext_words(
    regs: &kvm_regs,
    info: &SigInfo,
    extras: &FrameExtras,
    fpstate: u64,
) -> [u64; 32] {
    let mut w = [0u64; 32];
    let gp = [
        regs.r8,
        regs.r9,
        regs.r10,
        regs.r11,
        regs.r12,
        regs.r13,
        regs.r14,
        regs.r15,
        regs.rdi,
        regs.rsi,
        regs.rbp,
        regs.rbx,
        regs.rdx,
        regs.rax,
        regs.rcx,
        regs.rsp,
        regs.rip,
        regs.rflags,
    ];
    w[..18].copy_from_slice(&gp);
    // cs, gs, fs, ss as four u16s.
    w[18] = 0x33 | (0x2b << 48);
    w[19] = info.err;
    w[20] = info.trapno;
    w[21] = extras.old_mask;
    w[22] = extras.cr2;
    w[23] = fpstate;
    w
}

/// Build a signal frame on the guest stack (or the alternate stack) and point `regs` at the
/// handler. `xsave` is the thread's extended state to save in the frame.
pub fn deliver(
    mm: &mut AddressSpace,
    regs: &mut kvm_regs,
    action: &SigAction,
    info: &SigInfo,
    extras: &FrameExtras,
    xsave: &[u8],
) -> Result<(), Errno> {
    let use_alt = action.flags & SA_ONSTACK != 0
        && extras.altstack.enabled()
        && !extras.altstack.contains(regs.rsp);
    // The stack pointer and the alternate stack are the guest's: any arithmetic on them that
    // leaves the address range is an unusable stack (EFAULT, hence SIGSEGV), never a wrap.
    let mut sp = if use_alt {
        extras.altstack.sp.checked_add(extras.altstack.size)
    } else {
        regs.rsp.checked_sub(128)
    }
    .ok_or(Errno::EFAULT)?;
    sp = sp.checked_sub(XSAVE_SIZE).ok_or(Errno::EFAULT)? & !63;
    let fpstate = sp;
    sp = sp.checked_sub(FRAME_SIZE + 8).ok_or(Errno::EFAULT)?;
    // The handler starts as after a `call`: (frame + 8) is 16-byte aligned.
    let frame = ((sp + 8) & !15) - 8;
    if action.flags & SA_RESTORER == 0 {
        // Linux requires a restorer on x86-64; without one the return would jump to 0.
        return Err(Errno::EFAULT);
    }
    let mut image = vec![0u8; (fpstate + XSAVE_SIZE - frame) as usize];
    let put = |img: &mut [u8], off: u64, bytes: &[u8]| {
        img[off as usize..off as usize + bytes.len()].copy_from_slice(bytes)
    };
    put(&mut image, 0, &action.restorer.to_le_bytes());
    let uc = 8;
    put(&mut image, uc, &UC_FP_XSTATE.to_le_bytes());
    let alt = extras.altstack.reported(regs.rsp);
    put(&mut image, uc + 16, &alt.sp.to_le_bytes());
    put(&mut image, uc + 24, &alt.flags.to_le_bytes());
    put(&mut image, uc + 32, &alt.size.to_le_bytes());
    let words = sigcontext_words(regs, info, extras, fpstate);
    let mc: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    put(&mut image, uc + MCONTEXT_OFFSET, &mc);
    put(
        &mut image,
        uc + SIGMASK_OFFSET,
        &extras.old_mask.to_le_bytes(),
    );
    let info_off = 8 + UCONTEXT_SIZE;
    put(&mut image, info_off, &info.bytes());
    let xs = xsave.len().min(XSAVE_SIZE as usize);
    put(&mut image, fpstate - frame, &xsave[..xs]);
    mm.write(frame, &image)?;
    regs.rsp = frame;
    regs.rip = action.handler;
    regs.rdi = info.signo as u64;
    regs.rsi = frame + info_off;
    regs.rdx = frame + uc;
    regs.rax = 0;
    // Handlers start with TF and DF clear, like Linux.
    regs.rflags &= !(0x100 | 0x400);
    Ok(())
}

/// What `rt_sigreturn` restores.
#[derive(Debug)]
pub struct Restored {
    /// Signal mask.
    pub mask: u64,
    /// Saved XSAVE image, if the frame has one.
    pub xsave: Option<Vec<u8>>,
}

/// Undo [`deliver`]: `regs.rsp` is the stack pointer at the `rt_sigreturn` syscall (the
/// restorer runs after the handler's `ret` popped the return address).
pub fn sigreturn(mm: &mut AddressSpace, regs: &mut kvm_regs) -> Result<Restored, Errno> {
    let uc = regs.rsp;
    // RSP is the guest's: offsets from it must not wrap.
    let at = |off: u64| uc.checked_add(off).ok_or(Errno::EFAULT);
    let mut mc = [0u8; 256];
    mm.read(at(MCONTEXT_OFFSET)?, &mut mc)?;
    let w = |i: usize| u64::from_le_bytes(mc[i * 8..i * 8 + 8].try_into().unwrap_or([0; 8]));
    let mut mask = [0u8; 8];
    mm.read(at(SIGMASK_OFFSET)?, &mut mask)?;
    let fpstate = w(23);
    let xsave = if fpstate != 0 {
        Some(mm.read_vec(fpstate, XSAVE_SIZE as usize)?)
    } else {
        None
    };
    regs.r8 = w(0);
    regs.r9 = w(1);
    regs.r10 = w(2);
    regs.r11 = w(3);
    regs.r12 = w(4);
    regs.r13 = w(5);
    regs.r14 = w(6);
    regs.r15 = w(7);
    regs.rdi = w(8);
    regs.rsi = w(9);
    regs.rbp = w(10);
    regs.rbx = w(11);
    regs.rdx = w(12);
    regs.rax = w(13);
    regs.rcx = w(14);
    regs.rsp = w(15);
    regs.rip = w(16);
    regs.rflags = (regs.rflags & !FIX_EFLAGS) | (w(17) & FIX_EFLAGS) | 0x2;
    Ok(Restored {
        mask: u64::from_le_bytes(mask),
        xsave,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::{Placement, Prot, VmaKind};

    #[test]
    fn default_actions_match_linux() {
        assert_eq!(default_action(libc::SIGSEGV), DefaultAction::Core);
        assert_eq!(default_action(libc::SIGTERM), DefaultAction::Terminate);
        assert_eq!(default_action(libc::SIGCHLD), DefaultAction::Ignore);
        assert_eq!(name(11), "SIGSEGV");
    }

    #[test]
    fn sigkill_cannot_be_caught() {
        let mut d = Dispositions::default();
        let act = SigAction {
            handler: 0x1000,
            ..Default::default()
        };
        assert_eq!(d.set(libc::SIGKILL, act), Err(Errno::EINVAL));
        assert_eq!(d.set(0, act), Err(Errno::EINVAL));
        assert_eq!(d.set(65, act), Err(Errno::EINVAL));
        d.set(
            libc::SIGPIPE,
            SigAction {
                handler: SIG_IGN,
                ..Default::default()
            },
        )
        .expect("set");
        assert!(d.is_ignored(libc::SIGPIPE));
        assert!(!d.is_caught(libc::SIGPIPE));
    }

    #[test]
    fn deliver_then_sigreturn_restores_the_context() {
        let mut mm = AddressSpace::new(32 << 20).expect("mm");
        let stack = mm
            .map(
                Placement::Hint(0),
                64 << 10,
                Prot::READ_WRITE,
                VmaKind::Anonymous,
                None,
            )
            .expect("stack");
        let mut regs = kvm_regs {
            rsp: stack + (60 << 10),
            rip: 0x401000,
            rax: 7,
            rbx: 8,
            r15: 9,
            rflags: 0x246,
            ..Default::default()
        };
        let saved = regs;
        let action = SigAction {
            handler: 0x402000,
            flags: SA_SIGINFO | SA_RESTORER,
            restorer: 0x403000,
            mask: 0,
        };
        let info = SigInfo {
            signo: 11,
            code: 1,
            addr: 0xdead,
            pid: 0,
            uid: 0,
            trapno: 14,
            err: 4,
        };
        let extras = FrameExtras {
            cr2: 0xdead,
            old_mask: 0x5,
            altstack: AltStack::disabled(),
        };
        deliver(&mut mm, &mut regs, &action, &info, &extras, &[0xab; 4096]).expect("deliver");
        assert_eq!(regs.rip, 0x402000);
        assert_eq!(regs.rdi, 11);
        assert_eq!(
            (regs.rsp + 8) % 16,
            0,
            "handler entry alignment as after a call"
        );
        assert_eq!(mm.read_obj::<u64>(regs.rsp).expect("ret"), 0x403000);
        assert_eq!(mm.read_obj::<u64>(regs.rsi + 16).expect("si_addr"), 0xdead);
        // The handler returns into the restorer: `ret` pops the return address.
        regs.rsp += 8;
        regs.rflags = 0x202;
        let r = sigreturn(&mut mm, &mut regs).expect("sigreturn");
        assert_eq!(r.mask, 0x5);
        assert_eq!(r.xsave.as_deref().map(|x| x[0]), Some(0xab));
        assert_eq!(
            (regs.rip, regs.rsp, regs.rax, regs.rbx, regs.r15),
            (saved.rip, saved.rsp, saved.rax, saved.rbx, saved.r15)
        );
        assert_eq!(regs.rflags & FIX_EFLAGS, saved.rflags & FIX_EFLAGS);
    }

    #[test]
    fn stack_pointers_at_the_ends_of_the_address_space_are_efault() {
        let mut mm = AddressSpace::new(32 << 20).expect("mm");
        let action = SigAction {
            handler: 1 << 20,
            flags: SA_RESTORER | SA_ONSTACK,
            restorer: 1,
            mask: 0,
        };
        let info = SigInfo::kernel(11);
        for rsp in [0u64, 8, 200, u64::MAX] {
            let mut regs = kvm_regs {
                rsp,
                ..Default::default()
            };
            let extras = FrameExtras {
                cr2: 0,
                old_mask: 0,
                altstack: AltStack::disabled(),
            };
            assert_eq!(
                deliver(&mut mm, &mut regs, &action, &info, &extras, &[]),
                Err(Errno::EFAULT),
                "rsp {rsp:#x}"
            );
        }
        let hostile = AltStack {
            sp: u64::MAX - 16,
            flags: 0,
            pad: 0,
            size: 1 << 40,
        };
        let mut regs = kvm_regs {
            rsp: 0x10_0000,
            ..Default::default()
        };
        let extras = FrameExtras {
            cr2: 0,
            old_mask: 0,
            altstack: hostile,
        };
        assert_eq!(
            deliver(&mut mm, &mut regs, &action, &info, &extras, &[]),
            Err(Errno::EFAULT)
        );
    }

    #[test]
    fn sigreturn_at_the_top_of_the_address_space_is_efault() {
        let mut mm = AddressSpace::new(32 << 20).expect("mm");
        let mut regs = kvm_regs {
            rsp: u64::MAX - 8,
            ..Default::default()
        };
        assert_eq!(
            sigreturn(&mut mm, &mut regs).map(|r| r.mask),
            Err(Errno::EFAULT)
        );
    }

    #[test]
    fn a_frame_on_an_unmapped_stack_is_efault() {
        let mut mm = AddressSpace::new(32 << 20).expect("mm");
        let mut regs = kvm_regs {
            rsp: 0x10_0000,
            ..Default::default()
        };
        let action = SigAction {
            handler: 1 << 20,
            flags: SA_RESTORER,
            restorer: 1,
            mask: 0,
        };
        let info = SigInfo {
            signo: 5,
            code: 0x80,
            addr: 0,
            pid: 0,
            uid: 0,
            trapno: 3,
            err: 0,
        };
        let extras = FrameExtras {
            cr2: 0,
            old_mask: 0,
            altstack: AltStack::disabled(),
        };
        assert_eq!(
            deliver(&mut mm, &mut regs, &action, &info, &extras, &[]),
            Err(Errno::EFAULT)
        );
    }
}
