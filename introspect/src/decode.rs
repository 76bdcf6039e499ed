//! Stepping over an instruction displaced by a breakpoint.
//!
//! The VMM writes `int3` (0xCC) over the first byte of an instruction in
//! guest text. When a thread hits it, the original instruction must run
//! without removing the `int3`, because other threads run concurrently. As
//! with Linux uprobes' execute-out-of-line (XOL) slots, [`plan`] decides how:
//!
//! - most instructions are copied to a per-breakpoint slot in a VMM-owned
//!   executable page within ±2 GiB of the code, with RIP-relative operands
//!   re-targeted, followed by `jmp rel32` back to the next instruction
//!   ([`StepOver::OutOfLine`]);
//! - branches whose effect depends on their own address (`call`, `jmp`,
//!   `jcc`, `ret`) are emulated by the VMM ([`StepOver::Emulate`]); they only
//!   touch RIP, RSP and memory at RSP;
//! - what cannot be stepped safely (system calls, interrupts, privileged,
//!   far and transactional instructions, invalid code) is refused with a
//!   [`DecodeError`] naming the instruction.
//!
//! A fault raised by a relocated instruction reports a RIP inside the slot;
//! the VMM maps it back to the breakpoint address before reporting it.

use std::fmt::Write as _;

use iced_x86::{
    BlockEncoder, BlockEncoderOptions, Code, ConditionCode, Decoder, DecoderError as IcedError,
    DecoderOptions, FlowControl, Instruction, InstructionBlock, Mnemonic, OpKind, Register,
};

/// Bytes reserved per breakpoint slot: the longest instruction (15 bytes),
/// relocation overhead and the 5-byte `jmp rel32` back, padded with `int3`.
pub const SLOT_SIZE: usize = 32;

/// Longest legal x86 instruction; [`plan`] never needs more code bytes.
pub const MAX_INSTRUCTION_LEN: usize = 15;

/// The breakpoint opcode.
const INT3: u8 = 0xCC;

/// Opcode and length of `jmp rel32`.
const JMP_REL32: u8 = 0xE9;
const JMP_REL32_LEN: usize = 5;

/// RFLAGS bits read by conditional branches.
const CF: u64 = 1 << 0;
const PF: u64 = 1 << 2;
const ZF: u64 = 1 << 6;
const SF: u64 = 1 << 7;
const OF: u64 = 1 << 11;

/// Why an instruction cannot be decoded or stepped over.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DecodeError {
    /// No code bytes were given.
    #[error("no code bytes at {addr:#x}")]
    Empty {
        /// Address of the missing instruction.
        addr: u64,
    },
    /// The bytes end in the middle of the instruction.
    #[error("instruction at {addr:#x} is truncated after {available} byte(s)")]
    Truncated {
        /// Address of the instruction.
        addr: u64,
        /// How many bytes were given.
        available: usize,
    },
    /// The bytes are not a valid x86-64 instruction.
    #[error("invalid instruction at {addr:#x}: {bytes}")]
    Invalid {
        /// Address of the instruction.
        addr: u64,
        /// The first bytes, in hex.
        bytes: String,
    },
    /// The original byte is already `int3`, e.g. a second breakpoint at the
    /// same address was planned from patched code.
    #[error("already an int3 at {addr:#x} (second breakpoint at the same place, or patched bytes passed as the original)")]
    AlreadyInt3 {
        /// Address of the `int3`.
        addr: u64,
    },
    /// The instruction cannot be stepped over out of line or emulated.
    #[error("cannot step over `{text}` at {addr:#x}: {reason}")]
    Unsupported {
        /// Address of the instruction.
        addr: u64,
        /// The instruction in Intel syntax.
        text: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// Some address the slot must reach with a 32-bit displacement is too far
    /// from it.
    #[error(
        "`{text}` at {addr:#x}: {what} {target:#x} is out of ±2 GiB reach of the slot at {slot:#x}"
    )]
    OutOfReach {
        /// Address of the instruction.
        addr: u64,
        /// The instruction in Intel syntax.
        text: String,
        /// What must be reached (an operand or the return jump target).
        what: &'static str,
        /// The address that must be reached.
        target: u64,
        /// The slot address given to [`plan`].
        slot: u64,
    },
    /// The encoder could not relocate the instruction.
    #[error("cannot relocate `{text}` from {addr:#x} to {slot:#x}: {reason}")]
    Relocate {
        /// Address of the instruction.
        addr: u64,
        /// The instruction in Intel syntax.
        text: String,
        /// The slot address given to [`plan`].
        slot: u64,
        /// The encoder's message.
        reason: String,
    },
    /// The relocated code plus the jump back does not fit in a slot.
    #[error(
        "relocated `{text}` at {addr:#x} needs {needed} bytes, more than a {SLOT_SIZE}-byte slot"
    )]
    SlotOverflow {
        /// Address of the instruction.
        addr: u64,
        /// The instruction in Intel syntax.
        text: String,
        /// Bytes the slot would need.
        needed: usize,
    },
}

/// How to execute the instruction displaced by a breakpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepOver {
    /// Copy `bytes` (exactly [`SLOT_SIZE`] long) to the slot at the address
    /// given to [`plan`] and set RIP to the slot. The slot ends with a jump
    /// back to the instruction after the breakpoint.
    OutOfLine {
        /// The slot's contents.
        bytes: Vec<u8>,
    },
    /// The VMM emulates the instruction; it touches only RIP, RSP and memory
    /// at RSP.
    Emulate(Branch),
}

/// A branch the VMM emulates instead of executing it out of line.
///
/// Registers are read as they were before the instruction (in particular
/// RSP before a `call` pushes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Branch {
    /// `call rel32`: push `return_to` (8 bytes), then jump to `target`.
    CallDirect {
        /// Callee.
        target: u64,
        /// Address of the instruction after the call.
        return_to: u64,
    },
    /// `jmp rel8`/`jmp rel32`: go to `target`.
    JmpDirect {
        /// Destination.
        target: u64,
    },
    /// `jcc`, `jrcxz`, `jecxz`: go to `taken` if
    /// [`Condition::holds`]`(rflags, rcx)`, else to `not_taken`.
    Conditional {
        /// The branch condition.
        cond: Condition,
        /// Destination when the condition holds.
        taken: u64,
        /// The instruction after the branch.
        not_taken: u64,
    },
    /// `call r/m64`: compute the target with [`IndirectTarget::resolve`],
    /// push `return_to`, jump.
    CallIndirect {
        /// Where the callee's address comes from.
        target: IndirectTarget,
        /// Address of the instruction after the call.
        return_to: u64,
    },
    /// `jmp r/m64`: compute the target with [`IndirectTarget::resolve`] and
    /// jump.
    JmpIndirect {
        /// Where the destination comes from.
        target: IndirectTarget,
    },
    /// `ret` / `ret imm16`: pop RIP (8 bytes), then add `pop_extra` to RSP.
    Ret {
        /// Extra bytes released by `ret imm16` (0 for plain `ret`).
        pop_extra: u16,
    },
}

/// A 64-bit general-purpose register.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reg64 {
    /// `rax`.
    Rax,
    /// `rcx`.
    Rcx,
    /// `rdx`.
    Rdx,
    /// `rbx`.
    Rbx,
    /// `rsp`.
    Rsp,
    /// `rbp`.
    Rbp,
    /// `rsi`.
    Rsi,
    /// `rdi`.
    Rdi,
    /// `r8`.
    R8,
    /// `r9`.
    R9,
    /// `r10`.
    R10,
    /// `r11`.
    R11,
    /// `r12`.
    R12,
    /// `r13`.
    R13,
    /// `r14`.
    R14,
    /// `r15`.
    R15,
}

impl Reg64 {
    fn from_iced(reg: Register) -> Option<Reg64> {
        Some(match reg {
            Register::RAX => Reg64::Rax,
            Register::RCX => Reg64::Rcx,
            Register::RDX => Reg64::Rdx,
            Register::RBX => Reg64::Rbx,
            Register::RSP => Reg64::Rsp,
            Register::RBP => Reg64::Rbp,
            Register::RSI => Reg64::Rsi,
            Register::RDI => Reg64::Rdi,
            Register::R8 => Reg64::R8,
            Register::R9 => Reg64::R9,
            Register::R10 => Reg64::R10,
            Register::R11 => Reg64::R11,
            Register::R12 => Reg64::R12,
            Register::R13 => Reg64::R13,
            Register::R14 => Reg64::R14,
            Register::R15 => Reg64::R15,
            _ => return None,
        })
    }
}

/// A segment whose base is added to a memory operand in 64-bit mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SegmentBase {
    /// `fs:` (thread pointer on x86-64 Linux).
    Fs,
    /// `gs:`.
    Gs,
}

/// Where an indirect `call`/`jmp` takes its destination from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IndirectTarget {
    /// The destination is the register's value.
    Register(Reg64),
    /// The destination is the 8-byte value at
    /// `segment base + base + index * scale + displacement` (wrapping).
    Memory {
        /// Base register (`None` for RIP-relative and absolute operands).
        base: Option<Reg64>,
        /// Index register.
        index: Option<Reg64>,
        /// Index scale: 1, 2, 4 or 8.
        scale: u8,
        /// Displacement; for a RIP-relative operand, the absolute address
        /// (already resolved against the original instruction address).
        displacement: u64,
        /// `fs:`/`gs:` override (other segments have base 0 in 64-bit mode).
        segment: Option<SegmentBase>,
    },
}

impl IndirectTarget {
    /// Linear address of the memory operand, or `None` for a register
    /// target. `reg` reads a register as it was before the instruction and
    /// `segment_base` returns the FS or GS base.
    pub fn effective_address(
        &self,
        reg: impl Fn(Reg64) -> u64,
        segment_base: impl Fn(SegmentBase) -> u64,
    ) -> Option<u64> {
        match *self {
            IndirectTarget::Register(_) => None,
            IndirectTarget::Memory {
                base,
                index,
                scale,
                displacement,
                segment,
            } => {
                let mut ea = displacement;
                if let Some(b) = base {
                    ea = ea.wrapping_add(reg(b));
                }
                if let Some(i) = index {
                    ea = ea.wrapping_add(reg(i).wrapping_mul(u64::from(scale)));
                }
                if let Some(s) = segment {
                    ea = ea.wrapping_add(segment_base(s));
                }
                Some(ea)
            }
        }
    }

    /// The branch destination: a register's value, or the 8 bytes that
    /// `read_u64` returns for the memory operand's address (`None` if that
    /// memory is unreadable; the guest would fault).
    pub fn resolve(
        &self,
        reg: impl Fn(Reg64) -> u64,
        segment_base: impl Fn(SegmentBase) -> u64,
        read_u64: impl FnOnce(u64) -> Option<u64>,
    ) -> Option<u64> {
        match *self {
            IndirectTarget::Register(r) => Some(reg(r)),
            IndirectTarget::Memory { .. } => read_u64(self.effective_address(reg, segment_base)?),
        }
    }
}

/// The condition of a conditional branch, named after its `j*` mnemonic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Condition {
    /// `jo`: OF=1.
    O,
    /// `jno`: OF=0.
    No,
    /// `jb`/`jc`: CF=1.
    B,
    /// `jae`/`jnc`: CF=0.
    Ae,
    /// `je`/`jz`: ZF=1.
    E,
    /// `jne`/`jnz`: ZF=0.
    Ne,
    /// `jbe`: CF=1 or ZF=1.
    Be,
    /// `ja`: CF=0 and ZF=0.
    A,
    /// `js`: SF=1.
    S,
    /// `jns`: SF=0.
    Ns,
    /// `jp`: PF=1.
    P,
    /// `jnp`: PF=0.
    Np,
    /// `jl`: SF≠OF.
    L,
    /// `jge`: SF=OF.
    Ge,
    /// `jle`: ZF=1 or SF≠OF.
    Le,
    /// `jg`: ZF=0 and SF=OF.
    G,
    /// `jrcxz`: RCX=0.
    RcxZero,
    /// `jecxz` (`67`-prefixed `jrcxz`): ECX=0.
    EcxZero,
}

impl Condition {
    /// Whether the branch is taken given RFLAGS and RCX.
    pub fn holds(self, rflags: u64, rcx: u64) -> bool {
        let flag = |bit: u64| rflags & bit != 0;
        let less = flag(SF) != flag(OF);
        match self {
            Condition::O => flag(OF),
            Condition::No => !flag(OF),
            Condition::B => flag(CF),
            Condition::Ae => !flag(CF),
            Condition::E => flag(ZF),
            Condition::Ne => !flag(ZF),
            Condition::Be => flag(CF) || flag(ZF),
            Condition::A => !flag(CF) && !flag(ZF),
            Condition::S => flag(SF),
            Condition::Ns => !flag(SF),
            Condition::P => flag(PF),
            Condition::Np => !flag(PF),
            Condition::L => less,
            Condition::Ge => !less,
            Condition::Le => flag(ZF) || less,
            Condition::G => !flag(ZF) && !less,
            Condition::RcxZero => rcx == 0,
            Condition::EcxZero => rcx & 0xffff_ffff == 0,
        }
    }

    fn from_iced(cc: ConditionCode) -> Option<Condition> {
        Some(match cc {
            ConditionCode::o => Condition::O,
            ConditionCode::no => Condition::No,
            ConditionCode::b => Condition::B,
            ConditionCode::ae => Condition::Ae,
            ConditionCode::e => Condition::E,
            ConditionCode::ne => Condition::Ne,
            ConditionCode::be => Condition::Be,
            ConditionCode::a => Condition::A,
            ConditionCode::s => Condition::S,
            ConditionCode::ns => Condition::Ns,
            ConditionCode::p => Condition::P,
            ConditionCode::np => Condition::Np,
            ConditionCode::l => Condition::L,
            ConditionCode::ge => Condition::Ge,
            ConditionCode::le => Condition::Le,
            ConditionCode::g => Condition::G,
            _ => return None,
        })
    }
}

/// Decide how to step over the instruction whose original bytes start
/// `code` (at least the whole instruction; 16 bytes always suffice) at guest
/// address `addr`, using the slot at guest address `slot`.
///
/// Returns the instruction's length and the plan. `code` must be the
/// original bytes, not the ones with the `int3` written over them.
pub fn plan(code: &[u8], addr: u64, slot: u64) -> Result<(usize, StepOver), DecodeError> {
    if code.first() == Some(&INT3) {
        return Err(DecodeError::AlreadyInt3 { addr });
    }
    let insn = decode_first(code, addr)?;
    let len = insn.len();
    let next = insn.next_ip();
    let refuse = |reason: &'static str| DecodeError::Unsupported {
        addr,
        text: format_instruction(&insn),
        reason,
    };

    if insn.is_privileged() {
        return Err(refuse("privileged instruction"));
    }
    if matches!(
        insn.mnemonic(),
        Mnemonic::Syscall
            | Mnemonic::Sysenter
            | Mnemonic::Sysexit
            | Mnemonic::Sysret
            | Mnemonic::Vmcall
            | Mnemonic::Vmmcall
    ) {
        return Err(refuse(
            "system calls and hypercalls are handled by the VMM at their original address",
        ));
    }
    if matches!(
        insn.mnemonic(),
        Mnemonic::Xbegin | Mnemonic::Xend | Mnemonic::Xabort
    ) {
        return Err(refuse("transactional memory instruction"));
    }
    let flow = insn.flow_control();
    let bytes = code.get(..len).unwrap_or(code);
    if flow != FlowControl::Next && has_operand_size_prefix(bytes) {
        // Intel ignores 66 on near branches in 64-bit mode, AMD truncates
        // RIP to 16 bits (and decodes a shorter immediate): ambiguous.
        return Err(refuse("operand-size prefix on a branch"));
    }

    let branch = match flow {
        FlowControl::Next => {
            let bytes = out_of_line(&insn, bytes, addr, slot)?;
            return Ok((len, StepOver::OutOfLine { bytes }));
        }
        FlowControl::UnconditionalBranch if insn.is_jmp_short_or_near() => Branch::JmpDirect {
            target: insn.near_branch_target(),
        },
        FlowControl::ConditionalBranch if insn.is_jcc_short_or_near() => {
            let cond = Condition::from_iced(insn.condition_code())
                .ok_or_else(|| refuse("unknown branch condition"))?;
            Branch::Conditional {
                cond,
                taken: insn.near_branch_target(),
                not_taken: next,
            }
        }
        FlowControl::ConditionalBranch if insn.is_jcx_short() => {
            let cond = match insn.code() {
                Code::Jrcxz_rel8_64 => Condition::RcxZero,
                Code::Jecxz_rel8_64 => Condition::EcxZero,
                _ => return Err(refuse("16-bit jcxz")),
            };
            Branch::Conditional {
                cond,
                taken: insn.near_branch_target(),
                not_taken: next,
            }
        }
        FlowControl::ConditionalBranch if insn.is_loop() || insn.is_loopcc() => {
            // loop/loope/loopne decrement RCX: run them in the slot, where
            // the block encoder turns the rel8 into a reachable branch.
            let bytes = out_of_line(&insn, bytes, addr, slot)?;
            return Ok((len, StepOver::OutOfLine { bytes }));
        }
        FlowControl::Call if insn.is_call_near() => Branch::CallDirect {
            target: insn.near_branch_target(),
            return_to: next,
        },
        FlowControl::IndirectCall if insn.code() == Code::Call_rm64 => Branch::CallIndirect {
            target: indirect_target(&insn).ok_or_else(|| refuse("unsupported operand"))?,
            return_to: next,
        },
        FlowControl::IndirectBranch if insn.code() == Code::Jmp_rm64 => Branch::JmpIndirect {
            target: indirect_target(&insn).ok_or_else(|| refuse("unsupported operand"))?,
        },
        FlowControl::Return => match insn.code() {
            Code::Retnq => Branch::Ret { pop_extra: 0 },
            Code::Retnq_imm16 => Branch::Ret {
                pop_extra: insn.immediate16(),
            },
            _ => return Err(refuse("far, 16-bit or interrupt return")),
        },
        FlowControl::UnconditionalBranch
        | FlowControl::Call
        | FlowControl::IndirectCall
        | FlowControl::IndirectBranch => return Err(refuse("far or 16-bit branch")),
        FlowControl::Interrupt => return Err(refuse("software interrupt")),
        FlowControl::XbeginXabortXend => return Err(refuse("transactional memory instruction")),
        FlowControl::Exception => return Err(refuse("instruction always faults")),
        _ => return Err(refuse("unsupported control flow")),
    };
    Ok((len, StepOver::Emulate(branch)))
}

/// Length of the instruction at `addr` whose bytes start `code`.
pub fn instruction_length(code: &[u8], addr: u64) -> Result<usize, DecodeError> {
    decode_first(code, addr).map(|insn| insn.len())
}

/// Bytes the instruction at `addr` (whose bytes start `code`) reads or writes through its
/// explicit memory operand: `None` if it has none, or its bytes do not decode (a
/// debugger's watchpoint then assumes the widest access).
pub fn memory_access_size(code: &[u8], addr: u64) -> Option<u64> {
    let insn = decode_first(code, addr).ok()?;
    let has_memory_operand = (0..insn.op_count()).any(|i| {
        matches!(
            insn.op_kind(i),
            OpKind::Memory
                | OpKind::MemorySegSI
                | OpKind::MemorySegESI
                | OpKind::MemorySegRSI
                | OpKind::MemorySegDI
                | OpKind::MemorySegEDI
                | OpKind::MemorySegRDI
                | OpKind::MemoryESDI
                | OpKind::MemoryESEDI
                | OpKind::MemoryESRDI
        )
    });
    let size = insn.memory_size().size();
    (has_memory_operand && size > 0).then_some(size as u64)
}

/// The first instruction of `code` (at `addr`) in Intel syntax, for logs.
///
/// RIP-relative operands and branch targets are shown as absolute
/// addresses. Undecodable bytes give `(bad: reason)`.
pub fn format(code: &[u8], addr: u64) -> String {
    match decode_first(code, addr) {
        Ok(insn) => format_instruction(&insn),
        Err(e) => format!("(bad: {e})"),
    }
}

/// Decode the first instruction of `code`.
fn decode_first(code: &[u8], addr: u64) -> Result<Instruction, DecodeError> {
    if code.is_empty() {
        return Err(DecodeError::Empty { addr });
    }
    let window = code.get(..MAX_INSTRUCTION_LEN).unwrap_or(code);
    let invalid = || DecodeError::Invalid {
        addr,
        bytes: hex(window),
    };
    let mut decoder =
        Decoder::try_with_ip(64, window, addr, DecoderOptions::NONE).map_err(|_| invalid())?;
    let insn = decoder.decode();
    if !insn.is_invalid() {
        return Ok(insn);
    }
    if decoder.last_error() == IcedError::NoMoreBytes {
        // iced also reports some invalid opcodes as "no more bytes": only
        // call it truncated if more bytes would make it valid.
        let mut padded = [0u8; MAX_INSTRUCTION_LEN];
        padded[..window.len()].copy_from_slice(window);
        let mut decoder =
            Decoder::try_with_ip(64, &padded, addr, DecoderOptions::NONE).map_err(|_| invalid())?;
        if !decoder.decode().is_invalid() {
            return Err(DecodeError::Truncated {
                addr,
                available: window.len(),
            });
        }
    }
    Err(invalid())
}

/// Slot contents: the instruction relocated to `slot`, `jmp` back to the
/// next instruction, `int3` padding.
fn out_of_line(
    insn: &Instruction,
    bytes: &[u8],
    addr: u64,
    slot: u64,
) -> Result<Vec<u8>, DecodeError> {
    let text = || format_instruction(insn);
    let mut out = if insn.is_ip_rel_memory_operand() || insn.flow_control() != FlowControl::Next {
        // The block encoder treats a target equal to the IP of an
        // instruction in the block as pointing into the block. Targets of
        // the original code must stay absolute even when they point at the
        // instruction itself (`loop $`, `lea rax, [rip-7]`), so give the copy
        // a non-canonical IP that no rel32 target can equal.
        let mut copy = *insn;
        copy.set_ip(insn.ip() ^ (1 << 63));
        let block = InstructionBlock::new(std::slice::from_ref(&copy), slot);
        match BlockEncoder::encode(64, block, BlockEncoderOptions::NONE) {
            Ok(result) => result.code_buffer,
            Err(e) => {
                let target = insn.ip_rel_memory_address();
                if insn.is_ip_rel_memory_operand() && rel32(slot, target).is_none() {
                    return Err(DecodeError::OutOfReach {
                        addr,
                        text: text(),
                        what: "RIP-relative operand",
                        target,
                        slot,
                    });
                }
                return Err(DecodeError::Relocate {
                    addr,
                    text: text(),
                    slot,
                    reason: e.to_string(),
                });
            }
        }
    } else {
        // Position-independent: the original bytes are exact.
        bytes.to_vec()
    };

    let back = insn.next_ip();
    let jmp_end = slot.wrapping_add((out.len() + JMP_REL32_LEN) as u64);
    let rel = rel32(jmp_end, back).ok_or_else(|| DecodeError::OutOfReach {
        addr,
        text: text(),
        what: "return address",
        target: back,
        slot,
    })?;
    out.push(JMP_REL32);
    out.extend_from_slice(&rel.to_le_bytes());
    if out.len() > SLOT_SIZE {
        return Err(DecodeError::SlotOverflow {
            addr,
            text: text(),
            needed: out.len(),
        });
    }
    out.resize(SLOT_SIZE, INT3);
    Ok(out)
}

/// Displacement from `from` to `to` if it fits a signed 32-bit field.
fn rel32(from: u64, to: u64) -> Option<i32> {
    i32::try_from(to.wrapping_sub(from) as i64).ok()
}

/// Whether the prefixes of `bytes` include 0x66.
fn has_operand_size_prefix(bytes: &[u8]) -> bool {
    for &b in bytes {
        match b {
            0x66 => return true,
            0x67 | 0xF0 | 0xF2 | 0xF3 | 0x26 | 0x2E | 0x36 | 0x3E | 0x64 | 0x65 | 0x40..=0x4F => {}
            _ => return false,
        }
    }
    false
}

/// The operand of `call r/m64` / `jmp r/m64`, or `None` for 32-bit
/// addressing (`67` prefix), which the VMM does not emulate.
fn indirect_target(insn: &Instruction) -> Option<IndirectTarget> {
    match insn.op0_kind() {
        OpKind::Register => Reg64::from_iced(insn.op0_register()).map(IndirectTarget::Register),
        OpKind::Memory => {
            let segment = match insn.segment_prefix() {
                Register::FS => Some(SegmentBase::Fs),
                Register::GS => Some(SegmentBase::Gs),
                _ => None,
            };
            let scale = u8::try_from(insn.memory_index_scale()).ok()?;
            if insn.is_ip_rel_memory_operand() {
                if insn.memory_base() != Register::RIP {
                    return None;
                }
                return Some(IndirectTarget::Memory {
                    base: None,
                    index: None,
                    scale: 1,
                    displacement: insn.ip_rel_memory_address(),
                    segment,
                });
            }
            let reg = |r: Register| match r {
                Register::None => Some(None),
                r => Reg64::from_iced(r).map(Some),
            };
            Some(IndirectTarget::Memory {
                base: reg(insn.memory_base())?,
                index: reg(insn.memory_index())?,
                scale,
                displacement: insn.memory_displacement64(),
                segment,
            })
        }
        _ => None,
    }
}

/// Lowercase hex bytes separated by spaces.
fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 3);
    for (i, b) in bytes.iter().enumerate() {
        if i > 0 {
            s.push(' ');
        }
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn reg_name(reg: Register) -> String {
    format!("{reg:?}").to_ascii_lowercase()
}

/// A minimal Intel-syntax formatter (the crate is built without iced's
/// formatters): prefixes, mnemonic and operands with absolute branch and
/// RIP-relative addresses.
fn format_instruction(insn: &Instruction) -> String {
    let mut out = String::new();
    if insn.has_lock_prefix() {
        out.push_str("lock ");
    }
    if insn.is_string_instruction() {
        let compares = matches!(
            insn.mnemonic(),
            Mnemonic::Cmpsb
                | Mnemonic::Cmpsw
                | Mnemonic::Cmpsd
                | Mnemonic::Cmpsq
                | Mnemonic::Scasb
                | Mnemonic::Scasw
                | Mnemonic::Scasd
                | Mnemonic::Scasq
        );
        if insn.has_repne_prefix() {
            out.push_str("repne ");
        } else if insn.has_rep_prefix() {
            out.push_str(if compares { "repe " } else { "rep " });
        }
    }
    out.push_str(&format!("{:?}", insn.mnemonic()).to_ascii_lowercase());
    for i in 0..insn.op_count() {
        out.push_str(if i == 0 { " " } else { ", " });
        format_operand(&mut out, insn, i);
        if i == 0 && insn.has_op_mask() {
            let _ = write!(out, " {{{}}}", reg_name(insn.op_mask()));
            if insn.zeroing_masking() {
                out.push_str("{z}");
            }
        }
    }
    out
}

fn format_operand(out: &mut String, insn: &Instruction, i: u32) {
    let kind = insn.op_kind(i);
    match kind {
        OpKind::Register => out.push_str(&reg_name(insn.op_register(i))),
        OpKind::NearBranch16 | OpKind::NearBranch32 | OpKind::NearBranch64 => {
            let _ = write!(out, "{:#x}", insn.near_branch_target());
        }
        OpKind::FarBranch16 => {
            let _ = write!(
                out,
                "{:#x}:{:#x}",
                insn.far_branch_selector(),
                insn.far_branch16()
            );
        }
        OpKind::FarBranch32 => {
            let _ = write!(
                out,
                "{:#x}:{:#x}",
                insn.far_branch_selector(),
                insn.far_branch32()
            );
        }
        OpKind::Immediate8
        | OpKind::Immediate8_2nd
        | OpKind::Immediate16
        | OpKind::Immediate32
        | OpKind::Immediate64
        | OpKind::Immediate8to64
        | OpKind::Immediate32to64 => {
            let _ = write!(out, "{:#x}", insn.immediate(i));
        }
        OpKind::Immediate8to16 => {
            let _ = write!(out, "{:#x}", insn.immediate(i) & 0xffff);
        }
        OpKind::Immediate8to32 => {
            let _ = write!(out, "{:#x}", insn.immediate(i) & 0xffff_ffff);
        }
        OpKind::MemorySegSI
        | OpKind::MemorySegESI
        | OpKind::MemorySegRSI
        | OpKind::MemorySegDI
        | OpKind::MemorySegEDI
        | OpKind::MemorySegRDI
        | OpKind::MemoryESDI
        | OpKind::MemoryESEDI
        | OpKind::MemoryESRDI => {
            push_size(out, insn);
            let reg = match kind {
                OpKind::MemorySegSI => "si",
                OpKind::MemorySegESI => "esi",
                OpKind::MemorySegRSI => "rsi",
                OpKind::MemorySegDI => "di",
                OpKind::MemorySegEDI => "edi",
                OpKind::MemorySegRDI => "rdi",
                OpKind::MemoryESDI => "di",
                OpKind::MemoryESEDI => "edi",
                _ => "rdi",
            };
            if matches!(
                kind,
                OpKind::MemoryESDI | OpKind::MemoryESEDI | OpKind::MemoryESRDI
            ) {
                out.push_str("es:");
            } else {
                push_segment(out, insn);
            }
            let _ = write!(out, "[{reg}]");
        }
        OpKind::Memory => format_memory(out, insn),
    }
}

fn push_size(out: &mut String, insn: &Instruction) {
    let keyword = match insn.memory_size().size() {
        1 => "byte",
        2 => "word",
        4 => "dword",
        6 => "fword",
        8 => "qword",
        10 => "tbyte",
        16 => "xmmword",
        32 => "ymmword",
        64 => "zmmword",
        _ => return,
    };
    out.push_str(keyword);
    out.push_str(" ptr ");
}

fn push_segment(out: &mut String, insn: &Instruction) {
    let seg = insn.segment_prefix();
    if seg != Register::None {
        out.push_str(&reg_name(seg));
        out.push(':');
    }
}

fn format_memory(out: &mut String, insn: &Instruction) {
    push_size(out, insn);
    push_segment(out, insn);
    out.push('[');
    if insn.is_ip_rel_memory_operand() {
        let _ = write!(out, "{:#x}", insn.ip_rel_memory_address());
        out.push(']');
        return;
    }
    let base = insn.memory_base();
    let index = insn.memory_index();
    let disp = insn.memory_displacement64();
    let mut any = false;
    if base != Register::None {
        out.push_str(&reg_name(base));
        any = true;
    }
    if index != Register::None {
        if any {
            out.push('+');
        }
        out.push_str(&reg_name(index));
        let scale = insn.memory_index_scale();
        if scale > 1 {
            let _ = write!(out, "*{scale}");
        }
        any = true;
    }
    if !any {
        let _ = write!(out, "{disp:#x}");
    } else if disp != 0 {
        // 32-bit addressing keeps the displacement as an unsigned u32.
        let signed = if base.is_gpr32() || index.is_gpr32() {
            i64::from(disp as u32 as i32)
        } else {
            disp as i64
        };
        if signed < 0 {
            let _ = write!(out, "-{:#x}", signed.unsigned_abs());
        } else {
            let _ = write!(out, "+{signed:#x}");
        }
    }
    out.push(']');
}

#[cfg(test)]
mod tests {
    use super::*;

    const ADDR: u64 = 0x5555_5555_4000;
    /// A slot 1 MiB above the code.
    const SLOT: u64 = ADDR + 0x10_0000;

    fn out_of_line_bytes(code: &[u8], addr: u64, slot: u64) -> (usize, Vec<u8>) {
        match plan(code, addr, slot) {
            Ok((len, StepOver::OutOfLine { bytes })) => (len, bytes),
            other => panic!("expected out-of-line plan for {code:02x?}, got {other:?}"),
        }
    }

    fn emulated(code: &[u8]) -> (usize, Branch) {
        match plan(code, ADDR, SLOT) {
            Ok((len, StepOver::Emulate(b))) => (len, b),
            other => panic!("expected emulation for {code:02x?}, got {other:?}"),
        }
    }

    /// Decode a slot: all instructions up to the `int3` padding.
    fn decode_slot(bytes: &[u8], slot: u64) -> Vec<Instruction> {
        assert_eq!(bytes.len(), SLOT_SIZE);
        let mut decoder = Decoder::with_ip(64, bytes, slot, DecoderOptions::NONE);
        let mut out = Vec::new();
        while decoder.can_decode() {
            let insn = decoder.decode();
            if insn.mnemonic() == Mnemonic::Int3 {
                break;
            }
            assert!(!insn.is_invalid(), "invalid code in slot: {bytes:02x?}");
            out.push(insn);
        }
        // Everything after the code is int3 padding.
        let used: usize = out.iter().map(Instruction::len).sum();
        assert!(bytes[used..].iter().all(|&b| b == INT3));
        out
    }

    /// The last instruction of a slot must be `jmp rel32` to `back`.
    fn assert_jumps_back(insns: &[Instruction], back: u64) {
        let jmp = insns.last().expect("slot has code");
        assert_eq!(jmp.code(), Code::Jmp_rel32_64);
        assert_eq!(jmp.near_branch_target(), back);
    }

    #[test]
    fn position_independent_instructions_are_copied() {
        for code in [
            &[0x55][..],                                    // push rbp
            &[0xf3, 0x0f, 0x1e, 0xfa],                      // endbr64
            &[0x48, 0x83, 0xec, 0x18],                      // sub rsp, 0x18
            &[0x48, 0x8b, 0x44, 0x24, 0x08],                // mov rax, [rsp+8]
            &[0x64, 0x48, 0x8b, 0x04, 0x25, 0x28, 0, 0, 0], // mov rax, fs:[0x28]
        ] {
            let mut buf = code.to_vec();
            buf.extend_from_slice(&[0x90; 8]); // following instructions
            let (len, bytes) = out_of_line_bytes(&buf, ADDR, SLOT);
            assert_eq!(len, code.len());
            assert_eq!(&bytes[..len], code);
            let insns = decode_slot(&bytes, SLOT);
            assert_eq!(insns.len(), 2);
            assert_jumps_back(&insns, ADDR + len as u64);
        }
    }

    #[test]
    fn formats_intel_syntax() {
        assert_eq!(format(&[0x55], ADDR), "push rbp");
        assert_eq!(format(&[0xf3, 0x0f, 0x1e, 0xfa], ADDR), "endbr64");
        assert_eq!(format(&[0x48, 0x83, 0xec, 0x18], ADDR), "sub rsp, 0x18");
        assert_eq!(
            format(&[0x48, 0x8b, 0x44, 0x24, 0xf8], ADDR),
            "mov rax, qword ptr [rsp-0x8]"
        );
        assert_eq!(
            format(&[0x64, 0x48, 0x8b, 0x04, 0x25, 0x28, 0, 0, 0], ADDR),
            "mov rax, qword ptr fs:[0x28]"
        );
        assert_eq!(
            format(&[0x48, 0x8d, 0x3d, 0x00, 0x01, 0x00, 0x00], 0x1000),
            "lea rdi, [0x1107]"
        );
        assert_eq!(format(&[0xe8, 0, 0, 0, 0], 0x1000), "call 0x1005");
        assert_eq!(
            format(&[0xf3, 0x48, 0xa5], 0),
            "rep movsq qword ptr es:[rdi], qword ptr [rsi]"
        );
        assert!(format(&[0x0f, 0x0b], 0).starts_with("ud2"));
        assert!(format(&[], 0).starts_with("(bad: "));
        assert!(format(&[0x06], 0).starts_with("(bad: invalid instruction"));
    }

    #[test]
    fn instruction_lengths() {
        assert_eq!(instruction_length(&[0x55, 0x90], ADDR), Ok(1));
        assert_eq!(instruction_length(&[0xe8, 0, 0, 0, 0, 0x90], ADDR), Ok(5));
        assert_eq!(
            instruction_length(&[0xe8, 0, 0], ADDR),
            Err(DecodeError::Truncated {
                addr: ADDR,
                available: 3
            })
        );
        assert_eq!(
            instruction_length(&[], ADDR),
            Err(DecodeError::Empty { addr: ADDR })
        );
        assert_eq!(instruction_length(&[0xcc], ADDR), Ok(1));
    }

    #[test]
    fn rip_relative_load_is_retargeted() {
        // mov rax, [rip+0x1234]
        let code = [0x48, 0x8b, 0x05, 0x34, 0x12, 0x00, 0x00, 0x90];
        let target = ADDR + 7 + 0x1234;
        let (len, bytes) = out_of_line_bytes(&code, ADDR, SLOT);
        assert_eq!(len, 7);
        let insns = decode_slot(&bytes, SLOT);
        assert_eq!(insns.len(), 2);
        assert_eq!(insns[0].code(), Code::Mov_r64_rm64);
        assert_eq!(insns[0].op0_register(), Register::RAX);
        assert!(insns[0].is_ip_rel_memory_operand());
        assert_eq!(insns[0].ip_rel_memory_address(), target);
        assert_jumps_back(&insns, ADDR + 7);

        // Also below the code.
        let low_slot = ADDR - 0x10_0000;
        let (_, bytes) = out_of_line_bytes(&code, ADDR, low_slot);
        let insns = decode_slot(&bytes, low_slot);
        assert_eq!(insns[0].ip_rel_memory_address(), target);
        assert_jumps_back(&insns, ADDR + 7);
    }

    #[test]
    fn rip_relative_lea_is_retargeted() {
        // lea rdi, [rip-0x100]
        let code = [0x48, 0x8d, 0x3d, 0x00, 0xff, 0xff, 0xff];
        let (len, bytes) = out_of_line_bytes(&code, ADDR, SLOT);
        assert_eq!(len, 7);
        let insns = decode_slot(&bytes, SLOT);
        assert_eq!(insns[0].mnemonic(), Mnemonic::Lea);
        assert_eq!(insns[0].op0_register(), Register::RDI);
        assert_eq!(insns[0].ip_rel_memory_address(), ADDR + 7 - 0x100);
        assert_jumps_back(&insns, ADDR + 7);
    }

    #[test]
    fn self_references_stay_absolute() {
        // lea rax, [rip-7]: the instruction's own address.
        let code = [0x48, 0x8d, 0x05, 0xf9, 0xff, 0xff, 0xff];
        let (_, bytes) = out_of_line_bytes(&code, ADDR, SLOT);
        let insns = decode_slot(&bytes, SLOT);
        assert_eq!(insns[0].ip_rel_memory_address(), ADDR);
        assert_jumps_back(&insns, ADDR + 7);
    }

    #[test]
    fn rip_relative_out_of_reach_is_refused() {
        // mov rax, [rip+0x1234] with the slot 64 GiB away.
        let code = [0x48, 0x8b, 0x05, 0x34, 0x12, 0x00, 0x00];
        let far = ADDR + (64 << 30);
        let err = plan(&code, ADDR, far).expect_err("out of reach");
        assert!(
            matches!(
                err,
                DecodeError::OutOfReach {
                    what: "RIP-relative operand",
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("out of ±2 GiB reach"), "{err}");

        // A position-independent instruction still needs the jump back.
        let err = plan(&[0x55], ADDR, far).expect_err("out of reach");
        assert!(
            matches!(err, DecodeError::OutOfReach { what: "return address", target, .. } if target == ADDR + 1),
            "{err:?}"
        );
    }

    #[test]
    fn direct_call() {
        // call rel32 (+0x100)
        let (len, b) = emulated(&[0xe8, 0x00, 0x01, 0x00, 0x00]);
        assert_eq!(len, 5);
        assert_eq!(
            b,
            Branch::CallDirect {
                target: ADDR + 5 + 0x100,
                return_to: ADDR + 5
            }
        );
        // Backwards.
        let (_, b) = emulated(&[0xe8, 0xfb, 0xff, 0xff, 0xff]);
        assert_eq!(
            b,
            Branch::CallDirect {
                target: ADDR,
                return_to: ADDR + 5
            }
        );
    }

    #[test]
    fn direct_jumps() {
        // jmp rel8 -2 (to itself)
        assert_eq!(
            emulated(&[0xeb, 0xfe]),
            (2, Branch::JmpDirect { target: ADDR })
        );
        // jmp rel32 +0x10
        assert_eq!(
            emulated(&[0xe9, 0x10, 0, 0, 0]),
            (
                5,
                Branch::JmpDirect {
                    target: ADDR + 0x15
                }
            )
        );
    }

    #[test]
    fn conditional_jumps() {
        // je rel8 +0x10
        let (len, b) = emulated(&[0x74, 0x10]);
        assert_eq!(len, 2);
        assert_eq!(
            b,
            Branch::Conditional {
                cond: Condition::E,
                taken: ADDR + 0x12,
                not_taken: ADDR + 2
            }
        );
        let Branch::Conditional { cond, .. } = b else {
            unreachable!()
        };
        assert!(cond.holds(ZF | 0x2, 0));
        assert!(!cond.holds(0x2, 0));

        // jg rel32
        let (len, b) = emulated(&[0x0f, 0x8f, 0x00, 0x01, 0x00, 0x00]);
        assert_eq!(len, 6);
        assert_eq!(
            b,
            Branch::Conditional {
                cond: Condition::G,
                taken: ADDR + 6 + 0x100,
                not_taken: ADDR + 6
            }
        );

        // jrcxz / jecxz
        let (_, b) = emulated(&[0xe3, 0x05]);
        assert!(
            matches!(b, Branch::Conditional { cond: Condition::RcxZero, taken, .. } if taken == ADDR + 7)
        );
        let (len, b) = emulated(&[0x67, 0xe3, 0x05]);
        assert_eq!(len, 3);
        assert!(matches!(
            b,
            Branch::Conditional {
                cond: Condition::EcxZero,
                ..
            }
        ));
    }

    #[test]
    fn condition_truth_table() {
        use Condition::*;
        let cases: &[(Condition, u64, bool)] = &[
            (O, OF, true),
            (No, OF, false),
            (B, CF, true),
            (Ae, CF, false),
            (Be, ZF, true),
            (Be, 0, false),
            (A, 0, true),
            (A, CF, false),
            (S, SF, true),
            (Ns, SF, false),
            (P, PF, true),
            (Np, 0, true),
            (L, SF, true),
            (L, SF | OF, false),
            (Ge, SF | OF, true),
            (Le, ZF | SF | OF, true),
            (Le, OF, true),
            (G, 0, true),
            (G, SF | OF, true),
            (G, ZF, false),
            (G, OF, false),
        ];
        for &(cond, flags, expect) in cases {
            assert_eq!(cond.holds(flags, 1), expect, "{cond:?} with {flags:#x}");
        }
        assert!(RcxZero.holds(0, 0));
        assert!(!RcxZero.holds(0, 1 << 32));
        assert!(EcxZero.holds(0, 1 << 32));
    }

    #[test]
    fn loop_runs_out_of_line() {
        // loop $ (rel8 to itself)
        let (len, bytes) = out_of_line_bytes(&[0xe2, 0xfe], ADDR, SLOT);
        assert_eq!(len, 2);
        let insns = decode_slot(&bytes, SLOT);
        assert!(insns[0].is_loop());
        // Follow the taken path: it must reach ADDR through a jmp.
        let taken = insns[0].near_branch_target();
        let jmp = insns
            .iter()
            .find(|i| i.ip() == taken)
            .expect("loop target inside the slot");
        assert_eq!(jmp.near_branch_target(), ADDR);
        // The fall-through path ends with the jump back.
        assert_jumps_back(&insns, ADDR + 2);
    }

    #[test]
    fn indirect_calls_and_jumps() {
        // call qword ptr [rip+0x2000]
        let (len, b) = emulated(&[0xff, 0x15, 0x00, 0x20, 0x00, 0x00]);
        assert_eq!(len, 6);
        let target = IndirectTarget::Memory {
            base: None,
            index: None,
            scale: 1,
            displacement: ADDR + 6 + 0x2000,
            segment: None,
        };
        assert_eq!(
            b,
            Branch::CallIndirect {
                target,
                return_to: ADDR + 6
            }
        );
        let mem = |a: u64| (a == ADDR + 0x2006).then_some(0xdead_beef);
        assert_eq!(target.resolve(|_| 0, |_| 0, mem), Some(0xdead_beef));

        // call rax
        let (len, b) = emulated(&[0xff, 0xd0]);
        assert_eq!(len, 2);
        assert_eq!(
            b,
            Branch::CallIndirect {
                target: IndirectTarget::Register(Reg64::Rax),
                return_to: ADDR + 2
            }
        );

        // jmp qword ptr [r12+rbx*8-0x10]
        let (_, b) = emulated(&[0x41, 0xff, 0x64, 0xdc, 0xf0]);
        let Branch::JmpIndirect { target } = b else {
            panic!("{b:?}")
        };
        assert_eq!(
            target,
            IndirectTarget::Memory {
                base: Some(Reg64::R12),
                index: Some(Reg64::Rbx),
                scale: 8,
                displacement: (-0x10i64) as u64,
                segment: None,
            }
        );
        let regs = |r| match r {
            Reg64::R12 => 0x1000,
            Reg64::Rbx => 2,
            _ => 0,
        };
        assert_eq!(
            target.effective_address(regs, |_| 0),
            Some(0x1000 + 16 - 0x10)
        );

        // jmp qword ptr fs:[rax]
        let (_, b) = emulated(&[0x64, 0xff, 0x20]);
        let Branch::JmpIndirect { target } = b else {
            panic!("{b:?}")
        };
        assert_eq!(
            target.effective_address(|_| 8, |s| if s == SegmentBase::Fs { 0x7000 } else { 0 }),
            Some(0x7008)
        );

        // notrack jmp rax (CET)
        let (_, b) = emulated(&[0x3e, 0xff, 0xe0]);
        assert_eq!(
            b,
            Branch::JmpIndirect {
                target: IndirectTarget::Register(Reg64::Rax)
            }
        );
    }

    #[test]
    fn returns() {
        assert_eq!(emulated(&[0xc3]), (1, Branch::Ret { pop_extra: 0 }));
        assert_eq!(
            emulated(&[0xc2, 0x08, 0x00]),
            (3, Branch::Ret { pop_extra: 8 })
        );
        // repz ret (old AMD-friendly gcc idiom)
        assert_eq!(emulated(&[0xf3, 0xc3]), (2, Branch::Ret { pop_extra: 0 }));
    }

    #[test]
    fn refused_instructions() {
        let unsupported = |code: &[u8], what: &str| {
            let err = plan(code, ADDR, SLOT).expect_err(what);
            assert!(
                matches!(err, DecodeError::Unsupported { .. }),
                "{what}: {err:?}"
            );
            assert!(err.to_string().contains(what), "{err} should name {what}");
        };
        unsupported(&[0x0f, 0x05], "syscall");
        unsupported(&[0xcd, 0x80], "int 0x80");
        unsupported(&[0xf1], "int1");
        unsupported(&[0xf4], "hlt");
        unsupported(&[0xfa], "cli");
        unsupported(&[0x0f, 0x0b], "ud2");
        unsupported(&[0xc7, 0xf8, 0, 0, 0, 0], "xbegin");
        unsupported(&[0x0f, 0x01, 0xd5], "xend");
        unsupported(&[0xcb], "retf");
        unsupported(&[0x48, 0xff, 0x18], "call tbyte ptr [rax]");
        unsupported(&[0x66, 0xe8, 0, 0, 0, 0], "call");
        unsupported(&[0x67, 0xff, 0x10], "call qword ptr [eax]");

        assert_eq!(
            plan(&[0xcc, 0x90], ADDR, SLOT),
            Err(DecodeError::AlreadyInt3 { addr: ADDR })
        );
        assert!(plan(&[0xcc], ADDR, SLOT)
            .expect_err("int3")
            .to_string()
            .contains("already an int3"));
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(matches!(
            plan(&[0x06, 0x90], ADDR, SLOT), // push es: invalid in 64-bit mode
            Err(DecodeError::Invalid { .. })
        ));
        assert!(matches!(
            plan(
                &[0x0f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff],
                ADDR,
                SLOT
            ),
            Err(DecodeError::Invalid { .. } | DecodeError::Unsupported { .. })
        ));
        // 16 prefixes: longer than 15 bytes.
        assert!(matches!(
            plan(&[0x66; 16], ADDR, SLOT),
            Err(DecodeError::Invalid { .. })
        ));
        assert_eq!(
            plan(&[], ADDR, SLOT),
            Err(DecodeError::Empty { addr: ADDR })
        );
        assert!(matches!(
            plan(&[0x48, 0x8b], ADDR, SLOT),
            Err(DecodeError::Truncated { available: 2, .. })
        ));
        // Every byte pattern is handled without panicking.
        for first in 0..=255u8 {
            for second in [0x00, 0x05, 0x25, 0xc0, 0xff] {
                let code = [
                    first, second, 0x10, 0x20, 0x30, 0x40, 0x50, 0x60, 0x70, 0x80, 0x90, 0xa0,
                    0xb0, 0xc0, 0xd0, 0xe0,
                ];
                let _ = plan(&code, ADDR, SLOT);
                let _ = format(&code, ADDR);
            }
        }
    }

    #[test]
    fn longest_instruction_fits_a_slot() {
        // lock add qword ptr fs:[rip+0x1234], 0x12345678: 13 bytes,
        // RIP-relative with prefixes.
        let code = [
            0x64, 0xf0, 0x48, 0x81, 0x05, 0x34, 0x12, 0x00, 0x00, 0x78, 0x56, 0x34, 0x12,
        ];
        let (len, bytes) = out_of_line_bytes(&code, ADDR, SLOT);
        assert_eq!(len, code.len());
        let insns = decode_slot(&bytes, SLOT);
        assert_eq!(insns[0].ip_rel_memory_address(), ADDR + len as u64 + 0x1234);
        assert!(insns[0].has_lock_prefix());
        assert_eq!(insns[0].segment_prefix(), Register::FS);
        assert_jumps_back(&insns, ADDR + len as u64);
    }

    #[test]
    fn memory_access_sizes_come_from_the_memory_operand() {
        // mov [rip+0x10], rax: 8 bytes written.
        assert_eq!(
            memory_access_size(&[0x48, 0x89, 0x05, 0x10, 0, 0, 0], ADDR),
            Some(8)
        );
        // mov eax, [rdi]: 4 bytes read.
        assert_eq!(memory_access_size(&[0x8b, 0x07], ADDR), Some(4));
        // movb [rdi], 1: 1 byte.
        assert_eq!(memory_access_size(&[0xc6, 0x07, 0x01], ADDR), Some(1));
        // movdqu xmm0, [rsi]: 16 bytes.
        assert_eq!(
            memory_access_size(&[0xf3, 0x0f, 0x6f, 0x06], ADDR),
            Some(16)
        );
        // No memory operand, and bytes that do not decode.
        assert_eq!(memory_access_size(&[0x48, 0x89, 0xc3], ADDR), None);
        assert_eq!(memory_access_size(&[0x0f, 0x0b][..1], ADDR), None);
    }
}
