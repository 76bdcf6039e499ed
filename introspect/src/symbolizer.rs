//! The set of modules mapped into one guest process.

use crate::module::{Module, SymbolHit};
use crate::unwind::{self, Backtrace, Frame, UnwindRegs};

/// All modules of one guest process, kept sorted by address and
/// non-overlapping.
#[derive(Debug, Default)]
pub struct Symbolizer {
    modules: Vec<Module>,
}

impl Symbolizer {
    /// An empty symbolizer.
    pub fn new() -> Symbolizer {
        Symbolizer::default()
    }

    /// Add a module.
    ///
    /// Modules whose spans overlap the new one are dropped first: two images
    /// cannot be mapped at the same address, so an overlap means the old one
    /// was replaced (e.g. `MAP_FIXED` over a previous mapping).
    pub fn add(&mut self, module: Module) {
        let (start, end) = (module.start(), module.end());
        self.modules.retain(|m| !m.overlaps(start, end));
        let idx = self.modules.partition_point(|m| m.start() < start);
        self.modules.insert(idx, module);
    }

    /// Remove the module containing `addr`, if any (for `munmap` of a library).
    pub fn remove_containing(&mut self, addr: u64) {
        if let Some(idx) = self.index_for(addr) {
            self.modules.remove(idx);
        }
    }

    /// The module whose PT_LOAD span contains `addr`.
    pub fn module_for(&self, addr: u64) -> Option<&Module> {
        self.index_for(addr).and_then(|idx| self.modules.get(idx))
    }

    /// All modules, sorted by start address.
    pub fn modules(&self) -> &[Module] {
        &self.modules
    }

    /// Symbolize `addr` as `name+offset` within its module.
    pub fn symbolize(&self, addr: u64) -> Option<SymbolHit<'_>> {
        self.module_for(addr)?.symbol_at(addr)
    }

    /// `addr` as text: `name+0xoff` where a symbol covers it, else `MODULE+0xSTART+0xoff`
    /// for a function only `.eh_frame` knows (as a rescue-point spec names it: START is
    /// the function's offset from the module's load bias), else `None`.
    pub fn describe(&self, addr: u64) -> Option<String> {
        if let Some(hit) = self.symbolize(addr) {
            return Some(hit.to_string());
        }
        let m = self.module_for(addr)?;
        let f = m.fde_containing(addr)?;
        Some(format!(
            "{}+{:#x}+{:#x}",
            m.name(),
            f.start.wrapping_sub(m.bias()),
            addr - f.start
        ))
    }

    /// Unwind a guest stack using `.eh_frame` CFI.
    ///
    /// `read(addr, buf)` fills `buf` from guest memory and returns false if
    /// any of it is unmapped. At most `max_frames` frames are returned; the
    /// first is `regs.rip` itself. See [`Symbolizer::backtrace_detailed`] for
    /// why unwinding stopped.
    pub fn backtrace(
        &self,
        regs: &UnwindRegs,
        read: &mut dyn FnMut(u64, &mut [u8]) -> bool,
        max_frames: usize,
    ) -> Vec<Frame> {
        self.backtrace_detailed(regs, read, max_frames).frames
    }

    /// Like [`Symbolizer::backtrace`], also reporting why unwinding stopped.
    pub fn backtrace_detailed(
        &self,
        regs: &UnwindRegs,
        read: &mut dyn FnMut(u64, &mut [u8]) -> bool,
        max_frames: usize,
    ) -> Backtrace {
        unwind::backtrace(self, regs, read, max_frames)
    }

    fn index_for(&self, addr: u64) -> Option<usize> {
        let idx = self.modules.partition_point(|m| m.start() <= addr);
        let idx = idx.checked_sub(1)?;
        self.modules.get(idx)?.contains(addr).then_some(idx)
    }
}
