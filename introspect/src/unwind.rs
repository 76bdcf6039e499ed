//! `.eh_frame`-driven stack unwinding over guest memory.

use gimli::{
    CfaRule, EhFrame, EhFrameOffset, Encoding, EndianSlice, EvaluationResult, Expression,
    LittleEndian, Location, Piece, Register, RegisterRule, UnwindContext, UnwindSection, Value,
};

use crate::module::Module;
use crate::symbolizer::Symbolizer;

/// x86-64 DWARF register numbers (System V psABI, figure 3.36).
const RBX: u16 = 3;
const RBP: u16 = 6;
const RSP: u16 = 7;
const R12: u16 = 12;
const R13: u16 = 13;
const R14: u16 = 14;
const R15: u16 = 15;
/// The return-address column, standing for RIP.
const RIP: u16 = 16;
/// Registers tracked while unwinding: the general-purpose ones plus RIP.
const NUM_REGS: usize = RIP as usize + 1;
/// Callee-saved registers, which keep their value across a call unless the
/// CFI says where they were saved.
const CALLEE_SAVED: [u16; 6] = [RBX, RBP, R12, R13, R14, R15];

/// Operations one CFI expression may execute; glibc's signal trampoline
/// needs a handful, so this only cuts off hostile bytecode.
const MAX_EXPR_OPS: u32 = 256;
/// Memory/register requests one CFI expression may make.
const MAX_EXPR_REQUESTS: usize = 32;

type Reader<'a> = EndianSlice<'a, LittleEndian>;

/// Register state of the innermost frame, as captured from the vCPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnwindRegs {
    /// Instruction pointer of the innermost frame.
    pub rip: u64,
    /// Stack pointer.
    pub rsp: u64,
    /// Frame pointer (callee-saved; often used as CFA base).
    pub rbp: u64,
    /// Callee-saved `rbx`.
    pub rbx: u64,
    /// Callee-saved `r12`.
    pub r12: u64,
    /// Callee-saved `r13`.
    pub r13: u64,
    /// Callee-saved `r14`.
    pub r14: u64,
    /// Callee-saved `r15`.
    pub r15: u64,
}

/// One frame of a backtrace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// The frame's PC: the faulting/current instruction for the first frame,
    /// the return address for callers.
    pub pc: u64,
    /// `name+0xoff` of the PC, if a symbol covers it.
    pub symbol: Option<String>,
    /// Name of the module containing the PC.
    pub module: Option<String>,
}

/// Why unwinding stopped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum UnwindStop {
    /// `max_frames` frames were produced.
    #[error("frame limit reached")]
    FrameLimit,
    /// The return address was 0, the usual end-of-stack marker.
    #[error("program counter is zero")]
    ZeroPc,
    /// The CFI marks the return address undefined (outermost frame, `_start`).
    #[error("return address undefined: outermost frame")]
    EndOfStack,
    /// No loaded module contains the PC.
    #[error("no module contains pc {0:#x}")]
    NoModule(u64),
    /// The module has no FDE covering the PC.
    #[error("no unwind info for pc {0:#x}")]
    NoUnwindInfo(u64),
    /// The FDE or CIE for the PC could not be parsed or evaluated.
    #[error("malformed unwind info for pc {pc:#x}: {source}")]
    BadCfi {
        /// The PC used for the lookup.
        pc: u64,
        /// What gimli reported.
        source: gimli::Error,
    },
    /// The CFI uses a rule or expression this unwinder does not evaluate, or
    /// needs a register whose value is unknown in this frame.
    #[error("unsupported or unresolvable unwind rule at pc {0:#x}")]
    Unsupported(u64),
    /// Guest memory at the address could not be read.
    #[error("guest memory at {0:#x} is unreadable")]
    UnreadableMemory(u64),
    /// The caller's stack pointer is not above the callee's, so following it
    /// could loop.
    #[error("no progress: stack pointer did not increase")]
    NoProgress,
}

/// Frames of an unwound stack and the reason unwinding ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backtrace {
    /// Innermost frame first.
    pub frames: Vec<Frame>,
    /// Why no further frame was produced.
    pub stop: UnwindStop,
}

/// Values of the tracked registers; `None` means unknown in this frame.
#[derive(Debug, Clone, Copy)]
struct Regs([Option<u64>; NUM_REGS]);

impl Regs {
    fn get(&self, reg: Register) -> Option<u64> {
        self.0.get(usize::from(reg.0)).copied().flatten()
    }

    fn set(&mut self, reg: u16, value: Option<u64>) {
        if let Some(slot) = self.0.get_mut(usize::from(reg)) {
            *slot = value;
        }
    }
}

impl From<&UnwindRegs> for Regs {
    fn from(r: &UnwindRegs) -> Regs {
        let mut regs = Regs([None; NUM_REGS]);
        for (reg, value) in [
            (RIP, r.rip),
            (RSP, r.rsp),
            (RBP, r.rbp),
            (RBX, r.rbx),
            (R12, r.r12),
            (R13, r.r13),
            (R14, r.r14),
            (R15, r.r15),
        ] {
            regs.set(reg, Some(value));
        }
        regs
    }
}

/// Result of unwinding one frame.
struct Step {
    caller: Regs,
    /// The callee's FDE is a signal trampoline, so the caller's PC is the
    /// interrupted instruction rather than a return address.
    from_signal_frame: bool,
}

type ReadFn<'r> = dyn FnMut(u64, &mut [u8]) -> bool + 'r;

pub(crate) fn backtrace(
    symbolizer: &Symbolizer,
    regs: &UnwindRegs,
    read: &mut ReadFn<'_>,
    max_frames: usize,
) -> Backtrace {
    let mut frames = Vec::new();
    let mut regs = Regs::from(regs);
    let mut ctx = UnwindContext::new();
    // The first PC is where execution stopped; later ones are return
    // addresses, which may point just past a call at the end of a function.
    let mut is_return_address = false;

    let stop = loop {
        if frames.len() >= max_frames {
            break UnwindStop::FrameLimit;
        }
        let Some(pc) = regs.get(Register(RIP)) else {
            break UnwindStop::EndOfStack;
        };
        if pc == 0 {
            break UnwindStop::ZeroPc;
        }
        // pc != 0 was checked above, so this cannot wrap.
        let lookup_pc = if is_return_address { pc - 1 } else { pc };
        let module = symbolizer.module_for(lookup_pc);
        frames.push(Frame {
            pc,
            // Look up the call instruction, but report the offset of the
            // return address itself (as gdb does).
            symbol: module.and_then(|m| m.symbol_at(lookup_pc)).map(|mut hit| {
                hit.offset = hit.offset.saturating_add(pc - lookup_pc);
                hit.to_string()
            }),
            module: module.map(|m| m.name().to_owned()),
        });
        let Some(module) = module else {
            break UnwindStop::NoModule(pc);
        };
        let step = match step(module, &mut ctx, lookup_pc, &regs, read) {
            Ok(step) => step,
            Err(stop) => break stop,
        };
        // The caller's CFA is above everything the callee pushed; a CFA that
        // does not move up could make the walk cycle. Signal frames are
        // exempt because a sigaltstack may lie below the interrupted stack.
        let (Some(old_sp), Some(new_sp)) =
            (regs.get(Register(RSP)), step.caller.get(Register(RSP)))
        else {
            break UnwindStop::Unsupported(lookup_pc);
        };
        let progressed = new_sp > old_sp || (step.from_signal_frame && new_sp != old_sp);
        if !progressed {
            break UnwindStop::NoProgress;
        }
        regs = step.caller;
        is_return_address = !step.from_signal_frame;
    };
    Backtrace { frames, stop }
}

/// Compute the caller's registers from the callee's using the CFI row for
/// `pc` in `module`.
fn step(
    module: &Module,
    ctx: &mut UnwindContext<usize>,
    pc: u64,
    regs: &Regs,
    read: &mut ReadFn<'_>,
) -> Result<Step, UnwindStop> {
    let eh = module.eh_frame().ok_or(UnwindStop::NoUnwindInfo(pc))?;
    let entry = module
        .fde_containing(pc)
        .ok_or(UnwindStop::NoUnwindInfo(pc))?;
    let bases = module.bases();
    let bad = |source| UnwindStop::BadCfi { pc, source };
    let fde = eh
        .fde_from_offset(
            &bases,
            EhFrameOffset(entry.offset),
            EhFrame::cie_from_offset,
        )
        .map_err(bad)?;
    let encoding = fde.cie().encoding();
    let ra_column = fde.cie().return_address_register();
    let row = fde
        .unwind_info_for_address(&eh, &bases, ctx, pc)
        .map_err(bad)?;

    let cfa = match row.cfa() {
        CfaRule::RegisterAndOffset { register, offset } => regs
            .get(*register)
            .and_then(|base| base.checked_add_signed(*offset))
            .ok_or(UnwindStop::Unsupported(pc))?,
        CfaRule::Expression(expr) => {
            let expr = expr.get(&eh).map_err(bad)?;
            evaluate(expr, encoding, None, regs, read, pc)?
        }
    };

    let mut caller = Regs([None; NUM_REGS]);
    for reg in CALLEE_SAVED {
        caller.set(reg, regs.get(Register(reg)));
    }
    caller.set(RSP, Some(cfa));
    for (reg, rule) in row.registers() {
        if usize::from(reg.0) >= NUM_REGS {
            continue; // vector/x87 registers are not tracked
        }
        let value = apply_rule(*reg, rule, cfa, regs, &eh, encoding, read, pc)?;
        caller.set(reg.0, value);
    }
    // The CIE may name any column as the return address; x86-64 uses 16.
    let ra = match row.register(ra_column) {
        Some(rule) => apply_rule(ra_column, &rule, cfa, regs, &eh, encoding, read, pc)?,
        None => None,
    };
    let Some(ra) = ra else {
        return Err(UnwindStop::EndOfStack);
    };
    caller.set(RIP, Some(ra));
    Ok(Step {
        caller,
        from_signal_frame: fde.is_signal_trampoline(),
    })
}

/// Evaluate one register rule; `Ok(None)` means the value is unknown.
#[allow(clippy::too_many_arguments)] // all are per-step context; a struct would only rename them
fn apply_rule(
    reg: Register,
    rule: &RegisterRule<usize>,
    cfa: u64,
    regs: &Regs,
    eh: &EhFrame<Reader<'_>>,
    encoding: Encoding,
    read: &mut ReadFn<'_>,
    pc: u64,
) -> Result<Option<u64>, UnwindStop> {
    let at = |offset: i64| {
        cfa.checked_add_signed(offset)
            .ok_or(UnwindStop::Unsupported(pc))
    };
    let bad = |source| UnwindStop::BadCfi { pc, source };
    Ok(match rule {
        RegisterRule::Undefined | RegisterRule::Architectural => None,
        RegisterRule::SameValue => regs.get(reg),
        RegisterRule::Offset(offset) => Some(read_u64(read, at(*offset)?)?),
        RegisterRule::ValOffset(offset) => Some(at(*offset)?),
        RegisterRule::Register(reg) => regs.get(*reg),
        RegisterRule::Expression(expr) => {
            let expr = expr.get(eh).map_err(bad)?;
            let addr = evaluate(expr, encoding, Some(cfa), regs, read, pc)?;
            Some(read_u64(read, addr)?)
        }
        RegisterRule::ValExpression(expr) => {
            let expr = expr.get(eh).map_err(bad)?;
            Some(evaluate(expr, encoding, Some(cfa), regs, read, pc)?)
        }
        RegisterRule::Constant(value) => Some(*value),
    })
}

/// Run a CFI DWARF expression with bounded work, supplying guest memory and
/// known registers. Returns the resulting address/value.
fn evaluate(
    expr: Expression<Reader<'_>>,
    encoding: Encoding,
    initial: Option<u64>,
    regs: &Regs,
    read: &mut ReadFn<'_>,
    pc: u64,
) -> Result<u64, UnwindStop> {
    let bad = |source| UnwindStop::BadCfi { pc, source };
    let mut eval = expr.evaluation(encoding);
    eval.set_max_iterations(MAX_EXPR_OPS);
    if let Some(value) = initial {
        eval.set_initial_value(value);
    }
    let mut state = eval.evaluate().map_err(bad)?;
    for _ in 0..MAX_EXPR_REQUESTS {
        state = match state {
            EvaluationResult::Complete => {
                return match eval.result().as_slice() {
                    [Piece {
                        location: Location::Address { address },
                        ..
                    }] => Ok(*address),
                    [Piece {
                        location: Location::Value { value },
                        ..
                    }] => value.to_u64(u64::MAX).map_err(bad),
                    _ => Err(UnwindStop::Unsupported(pc)),
                };
            }
            EvaluationResult::RequiresMemory { address, size, .. } => {
                let len = usize::from(size).min(8);
                let mut buf = [0u8; 8];
                let dst = buf.get_mut(..len).ok_or(UnwindStop::Unsupported(pc))?;
                if !read(address, dst) {
                    return Err(UnwindStop::UnreadableMemory(address));
                }
                eval.resume_with_memory(Value::Generic(u64::from_le_bytes(buf)))
                    .map_err(bad)?
            }
            EvaluationResult::RequiresRegister { register, .. } => {
                let value = regs.get(register).ok_or(UnwindStop::Unsupported(pc))?;
                eval.resume_with_register(Value::Generic(value))
                    .map_err(bad)?
            }
            _ => return Err(UnwindStop::Unsupported(pc)),
        };
    }
    Err(UnwindStop::Unsupported(pc))
}

fn read_u64(read: &mut ReadFn<'_>, addr: u64) -> Result<u64, UnwindStop> {
    let mut buf = [0u8; 8];
    if read(addr, &mut buf) {
        Ok(u64::from_le_bytes(buf))
    } else {
        Err(UnwindStop::UnreadableMemory(addr))
    }
}
