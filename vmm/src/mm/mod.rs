//! The guest's virtual address space: VMAs, demand paging, brk, and the one path through
//! which the VMM reads and writes guest memory.
//!
//! Every access the VMM makes on the guest's behalf goes through [`AddressSpace`]: it checks
//! the range against the VMAs (so a hostile pointer gets `EFAULT`, never a host access
//! outside guest memory), populates pages the way a kernel fault would, and records the
//! frames it wrote (KVM's dirty log does not see them).

mod vma;

use std::collections::BTreeMap;
use std::sync::Arc;

pub use vma::{Prot, Vma, VmaKind};

use crate::arch::x86_64::layout;
use crate::arch::x86_64::paging::PageTables;
use crate::arch::x86_64::supervisor;
use crate::errno::Errno;
use crate::memory::{GuestRam, MemoryError, PAGE_SIZE};

/// Anonymous mappings up to this size are populated when created: cheaper than faulting each
/// page in through an exit.
const EAGER_ANON_LIMIT: u64 = 256 << 10;
/// Pages mapped around a demand fault, within the faulting VMA.
const FAULT_AROUND_PAGES: u64 = 16;
/// Largest byte count of one read/write (Linux's MAX_RW_COUNT).
pub const MAX_RW_COUNT: usize = 0x7fff_f000;
/// Most host iovecs one call gets (Linux's IOV_MAX).
pub const IOV_MAX: usize = 1024;

/// Errors of address-space set-up (guest-visible failures are `Errno`s).
#[derive(Debug, thiserror::Error)]
pub enum MmError {
    /// Guest physical memory failed.
    #[error(transparent)]
    Memory(#[from] MemoryError),
}

/// How a user page fault was resolved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultOutcome {
    /// Pages were mapped; the instruction can be retried.
    Resolved,
    /// No VMA covers the address (SEGV_MAPERR).
    NotMapped,
    /// A VMA covers it but forbids the access (SEGV_ACCERR).
    AccessDenied,
    /// The mapping allows it, but a debugger watches the page ([`Guard`]).
    Guarded,
}

/// A debugger's watch on a page: user accesses of this kind fault even where the mapping
/// allows them (debug-register watchpoints do not fire on every KVM, page tables always do).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    /// Writes fault (the entry is read-only).
    Write,
    /// Every user access faults (the entry is supervisor-only).
    Access,
}

/// A page-fault error code as the CPU reports it.
#[derive(Debug, Clone, Copy)]
pub struct PageFaultCode(pub u64);

impl PageFaultCode {
    /// Protection violation (page was present).
    pub fn present(self) -> bool {
        self.0 & 1 != 0
    }
    /// Write access.
    pub fn write(self) -> bool {
        self.0 & 2 != 0
    }
    /// Instruction fetch.
    pub fn fetch(self) -> bool {
        self.0 & 0x10 != 0
    }
}

/// What fills a new mapping.
#[derive(Debug, Clone, Copy)]
pub enum Contents<'a> {
    /// These bytes (the loader's segments).
    Bytes(&'a [u8]),
    /// `len` bytes of a host file from `offset` (a file mmap).
    File {
        /// The open file.
        fd: std::os::fd::RawFd,
        /// File offset.
        offset: u64,
        /// Bytes to read.
        len: u64,
    },
}

/// Where a new mapping may go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// Anywhere; the address is a hint.
    Hint(u64),
    /// Exactly here, replacing what is there (MAP_FIXED).
    Fixed(u64),
    /// Exactly here, failing with EEXIST if anything is there.
    FixedNoReplace(u64),
}

/// The guest's address space and physical memory.
#[derive(Debug)]
pub struct AddressSpace {
    ram: GuestRam,
    pt: PageTables,
    vmas: Arc<BTreeMap<u64, Vma>>,
    brk_start: u64,
    brk: u64,
    /// Watched pages (the debugger's, not the guest's: not part of checkpoints).
    guards: BTreeMap<u64, Guard>,
}

fn page_down(v: u64) -> u64 {
    v & !(PAGE_SIZE - 1)
}

fn page_up(v: u64) -> Option<u64> {
    v.checked_add(PAGE_SIZE - 1).map(page_down)
}

/// The address space's bookkeeping as a checkpoint keeps it (the memory contents, page
/// tables included, are kept by the checkpoint engine).
#[derive(Debug, Clone)]
pub struct MmState {
    /// Shared with the live map until either changes (checkpoints are frequent, mapping
    /// changes are not).
    vmas: Arc<BTreeMap<u64, Vma>>,
    brk_start: u64,
    brk: u64,
    ram: crate::memory::RamState,
}

impl MmState {
    /// The frame allocator's state.
    pub fn ram(&self) -> &crate::memory::RamState {
        &self.ram
    }
}

impl AddressSpace {
    /// The mappings, break and frame allocator, for a checkpoint.
    pub fn state(&self) -> MmState {
        MmState {
            vmas: Arc::clone(&self.vmas),
            brk_start: self.brk_start,
            brk: self.brk,
            ram: self.ram.state(),
        }
    }

    /// Put the bookkeeping back to a checkpoint's (after its contents were restored).
    pub fn restore_state(&mut self, state: &MmState) {
        self.vmas = Arc::clone(&state.vmas);
        self.brk_start = state.brk_start;
        self.brk = state.brk;
        self.ram.restore_state(&state.ram);
    }

    /// A fresh address space with the supervisor installed.
    pub fn new(mem_size: u64) -> Result<Self, MmError> {
        let mut ram = GuestRam::new(mem_size)?;
        let pt = PageTables::new(&mut ram)?;
        supervisor::install(&mut ram, &pt)?;
        Ok(AddressSpace {
            ram,
            pt,
            vmas: Default::default(),
            brk_start: 0,
            brk: 0,
            guards: BTreeMap::new(),
        })
    }

    /// Guest physical memory.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Guest physical memory, mutable (dirty-page tracking).
    pub fn ram_mut(&mut self) -> &mut GuestRam {
        &mut self.ram
    }

    /// CR3 value.
    pub fn page_table_root(&self) -> u64 {
        self.pt.root()
    }

    /// The VMAs, in address order.
    pub fn vmas(&self) -> impl Iterator<Item = &Vma> {
        self.vmas.values()
    }

    /// The VMA containing `addr`.
    pub fn vma_at(&self, addr: u64) -> Option<&Vma> {
        self.vmas
            .range(..=addr)
            .next_back()
            .map(|(_, v)| v)
            .filter(|v| addr < v.end)
    }

    /// A free, page-aligned range of `len` bytes whose every byte is within `reach` of
    /// `near` (for code that must be in reach of a rel32 displacement).
    pub fn find_free_near(&self, near: u64, len: u64, reach: u64) -> Option<u64> {
        let lo = near.saturating_sub(reach).max(layout::MMAP_MIN);
        let hi = near.saturating_add(reach).min(layout::MMAP_TOP);
        let mut best: Option<u64> = None;
        let mut consider = |start: u64| {
            let start = page_down(start);
            let Some(end) = start.checked_add(len) else {
                return;
            };
            if start < lo || end > hi || !self.range_is_free(start, end) {
                return;
            }
            if best.is_none_or(|b| start.abs_diff(near) < b.abs_diff(near)) {
                best = Some(start);
            }
        };
        // Candidates: just after and just before every mapping in reach.
        for v in self.vmas.values() {
            if v.end + len < lo || v.start > hi + len {
                continue;
            }
            consider(v.end);
            consider(v.start.saturating_sub(len));
        }
        best
    }

    /// Write `data` at `va` whatever the mapping's protection (the VMM patching code: a
    /// breakpoint, a step-over slot). The range must be mapped.
    pub fn patch(&mut self, va: u64, data: &[u8]) -> Result<(), Errno> {
        let end = va.checked_add(data.len() as u64).ok_or(Errno::EFAULT)?;
        let mut cur = va;
        while cur < end {
            cur = self.vma_at(cur).ok_or(Errno::EFAULT)?.end;
        }
        self.poke(va, data)
    }

    fn range_is_free(&self, start: u64, end: u64) -> bool {
        if let Some((_, v)) = self.vmas.range(..end).next_back() {
            if v.end > start {
                return false;
            }
        }
        true
    }

    fn find_free(&self, len: u64, hint: u64) -> Option<u64> {
        if hint >= layout::MMAP_MIN {
            let hint = page_down(hint);
            if let Some(end) = hint.checked_add(len) {
                if end <= layout::MMAP_TOP && self.range_is_free(hint, end) {
                    return Some(hint);
                }
            }
        }
        // Top-down first fit below MMAP_TOP, like Linux's default layout.
        let mut top = layout::MMAP_TOP;
        for v in self.vmas.range(..layout::MMAP_TOP).rev().map(|(_, v)| v) {
            if v.end <= top && top - v.end >= len {
                return Some(top - len);
            }
            top = top.min(v.start);
        }
        (top >= layout::MMAP_MIN + len).then(|| top - len)
    }

    /// Create a mapping. `contents` (for file mappings) fills the new pages from their
    /// start; the rest is zero. Returns the start address.
    pub fn map(
        &mut self,
        placement: Placement,
        len: u64,
        prot: Prot,
        kind: VmaKind,
        contents: Option<Contents<'_>>,
    ) -> Result<u64, Errno> {
        if len == 0 {
            return Err(Errno::EINVAL);
        }
        let len = page_up(len).ok_or(Errno::ENOMEM)?;
        if len > layout::USER_END
            || (prot.write() && kind == VmaKind::Anonymous && self.exceeds_memory(len))
        {
            return Err(Errno::ENOMEM);
        }
        let start = match placement {
            Placement::Hint(h) => self.find_free(len, h).ok_or(Errno::ENOMEM)?,
            Placement::Fixed(a) | Placement::FixedNoReplace(a) => {
                if !a.is_multiple_of(PAGE_SIZE) {
                    return Err(Errno::EINVAL);
                }
                let end = a.checked_add(len).ok_or(Errno::ENOMEM)?;
                if end > layout::USER_END {
                    return Err(Errno::ENOMEM);
                }
                if a < layout::MMAP_MIN {
                    return Err(Errno::EPERM);
                }
                if !self.range_is_free(a, end) {
                    if matches!(placement, Placement::FixedNoReplace(_)) {
                        return Err(Errno::EEXIST);
                    }
                    self.unmap(a, len)?;
                }
                a
            }
        };
        let end = start + len;
        let populate = match (&kind, contents) {
            // File contents are copied in now, whatever the protection.
            (_, Some(_)) => Some(start),
            (_, None) if !prot.accessible() => None,
            // Only the top of the stack is touched at once.
            (VmaKind::Stack, None) => Some(end.saturating_sub(128 << 10).max(start)),
            (_, None) if len <= EAGER_ANON_LIMIT => Some(start),
            _ => None,
        };
        Arc::make_mut(&mut self.vmas).insert(
            start,
            Vma {
                start,
                end,
                prot,
                kind,
            },
        );
        if let Some(from) = populate {
            let filled = self.populate(from, end).and_then(|()| match contents {
                Some(Contents::Bytes(data)) => {
                    self.poke(start, &data[..data.len().min(len as usize)])
                }
                Some(Contents::File {
                    fd,
                    offset,
                    len: flen,
                }) => self.fill_from_file(start, flen.min(len), fd, offset),
                None => Ok(()),
            });
            if let Err(e) = filled {
                self.unmap(start, len).ok();
                return Err(e);
            }
        }
        Ok(start)
    }

    /// Read `len` bytes of host file `fd` at `offset` straight into the populated pages at
    /// `start` (no intermediate buffer). A file shorter than `len` leaves zeroes, as a
    /// private mapping past the end of a file reads on Linux (short of SIGBUS).
    fn fill_from_file(
        &mut self,
        start: u64,
        len: u64,
        fd: std::os::fd::RawFd,
        offset: u64,
    ) -> Result<(), Errno> {
        let mut done = 0u64;
        while done < len {
            let va = start + done;
            let frame = self.pt.lookup(&self.ram, va).ok_or(Errno::EFAULT)?.frame;
            let chunk = (len - done).min(PAGE_SIZE) as usize;
            let host = self.ram.host_ptr(frame, chunk);
            let pos = i64::try_from(offset + done).map_err(|_| Errno::EOVERFLOW)?;
            // SAFETY: `host` is `chunk` bytes of one guest frame (checked by host_ptr); the
            // file is a host fd the caller holds open.
            let n = unsafe { libc::pread(fd, host.cast(), chunk, pos) };
            if n < 0 {
                return Err(Errno::last());
            }
            self.ram.mark_written(frame, n as u64);
            if (n as usize) < chunk {
                break;
            }
            done += chunk as u64;
        }
        Ok(())
    }

    /// Map frames for `[start, end)` (page aligned, inside one VMA) where none are mapped.
    fn populate(&mut self, start: u64, end: u64) -> Result<(), Errno> {
        let mut va = start;
        while va < end {
            let vma = self.vma_at(va).ok_or(Errno::EFAULT)?;
            let prot = vma.prot;
            let stop = end.min(vma.end);
            while va < stop {
                if self.pt.lookup(&self.ram, va).is_none() {
                    let frame = self.ram.alloc_frame().map_err(|_| Errno::ENOMEM)?;
                    let flags = self.guarded_flags(va, prot);
                    self.pt
                        .map(&mut self.ram, va, frame, flags)
                        .map_err(|_| Errno::ENOMEM)?;
                }
                va += PAGE_SIZE;
            }
        }
        Ok(())
    }

    /// Unmap `[addr, addr+len)`: split VMAs, free frames. Unmapped holes are fine (as Linux).
    pub fn unmap(&mut self, addr: u64, len: u64) -> Result<(), Errno> {
        if !addr.is_multiple_of(PAGE_SIZE) || len == 0 {
            return Err(Errno::EINVAL);
        }
        let len = page_up(len).ok_or(Errno::EINVAL)?;
        let end = addr.checked_add(len).ok_or(Errno::EINVAL)?;
        if end > layout::USER_END {
            return Err(Errno::EINVAL);
        }
        self.split_at(addr);
        self.split_at(end);
        let doomed: Vec<u64> = self.vmas.range(addr..end).map(|(s, _)| *s).collect();
        for s in doomed {
            if let Some(v) = Arc::make_mut(&mut self.vmas).remove(&s) {
                self.release_pages(v.start, v.end);
            }
        }
        Ok(())
    }

    fn release_pages(&mut self, start: u64, end: u64) {
        let mut va = start;
        while va < end {
            if let Some(frame) = self.pt.unmap(&mut self.ram, va) {
                self.ram.free_frame(frame);
            }
            va += PAGE_SIZE;
        }
    }

    /// Split the VMA containing `at` (if any, and if `at` is inside it) into two.
    fn split_at(&mut self, at: u64) {
        let Some(v) = self.vma_at(at).cloned() else {
            return;
        };
        if v.start == at {
            return;
        }
        let (left, right) = v.split(at);
        Arc::make_mut(&mut self.vmas).insert(left.start, left);
        Arc::make_mut(&mut self.vmas).insert(right.start, right);
    }

    /// Change protections of `[addr, addr+len)`, which must be fully mapped (else ENOMEM).
    pub fn protect(&mut self, addr: u64, len: u64, prot: Prot) -> Result<(), Errno> {
        if !addr.is_multiple_of(PAGE_SIZE) {
            return Err(Errno::EINVAL);
        }
        if len == 0 {
            return Ok(());
        }
        let end = addr
            .checked_add(page_up(len).ok_or(Errno::ENOMEM)?)
            .ok_or(Errno::ENOMEM)?;
        // Linux checks the whole range is mapped before changing anything.
        let mut va = addr;
        while va < end {
            let v = self.vma_at(va).ok_or(Errno::ENOMEM)?;
            va = v.end;
        }
        self.split_at(addr);
        self.split_at(end);
        let starts: Vec<u64> = self.vmas.range(addr..end).map(|(s, _)| *s).collect();
        for s in starts {
            let Some(v) = Arc::make_mut(&mut self.vmas).get_mut(&s) else {
                continue;
            };
            v.prot = prot;
            let (vs, ve) = (v.start, v.end);
            let mut va = vs;
            while va < ve {
                let flags = self.guarded_flags(va, prot);
                if prot.accessible() {
                    if let Some(old) = self.pt.protect(&mut self.ram, va, flags) {
                        // Lost rights must not survive in KVM's shadow tables.
                        if (old.flags.write && !flags.write) || (old.flags.exec && !flags.exec) {
                            self.ram.invalidate_shadow(old.frame);
                        }
                    }
                } else if let Some(old) = self.pt.protect(&mut self.ram, va, flags) {
                    self.ram.invalidate_shadow(old.frame);
                }
                va += PAGE_SIZE;
            }
        }
        Ok(())
    }

    /// Set up the heap to start at `start` (just after the executable).
    pub fn init_brk(&mut self, start: u64) {
        self.brk_start = start;
        self.brk = start;
    }

    /// The brk syscall: returns the new (or unchanged) break.
    pub fn brk(&mut self, requested: u64) -> u64 {
        if requested < self.brk_start {
            return self.brk;
        }
        let old_end = page_up(self.brk).unwrap_or(self.brk);
        let Some(new_end) = page_up(requested) else {
            return self.brk;
        };
        if new_end > old_end {
            if new_end > layout::MMAP_TOP
                || self.exceeds_memory(new_end - old_end)
                || !self.range_is_free(old_end, new_end)
            {
                return self.brk;
            }
            let grown = Vma {
                start: old_end,
                end: new_end,
                prot: Prot::READ_WRITE,
                kind: VmaKind::Heap,
            };
            // Extend the heap VMA rather than stacking small ones.
            match self.vma_at(old_end.saturating_sub(1)).cloned() {
                Some(mut v) if v.kind == VmaKind::Heap && v.end == old_end => {
                    v.end = new_end;
                    Arc::make_mut(&mut self.vmas).insert(v.start, v);
                }
                _ => {
                    Arc::make_mut(&mut self.vmas).insert(old_end, grown);
                }
            }
            let eager_end = new_end.min(old_end + (1 << 20));
            if self.populate(old_end, eager_end).is_err() {
                return self.brk;
            }
        } else if new_end < old_end && self.unmap(new_end, old_end - new_end).is_err() {
            return self.brk;
        }
        self.brk = requested;
        requested
    }

    /// mremap: resize a mapping, moving it if allowed. Frames move with it, no copy.
    pub fn remap(
        &mut self,
        old: u64,
        old_len: u64,
        new_len: u64,
        may_move: bool,
        fixed: Option<u64>,
    ) -> Result<u64, Errno> {
        if !old.is_multiple_of(PAGE_SIZE) || new_len == 0 {
            return Err(Errno::EINVAL);
        }
        let old_len = page_up(old_len).ok_or(Errno::EINVAL)?;
        let new_len = page_up(new_len).ok_or(Errno::EINVAL)?;
        let vma = self.vma_at(old).cloned().ok_or(Errno::EFAULT)?;
        let old_end = old.checked_add(old_len).ok_or(Errno::EINVAL)?;
        if old_end > vma.end {
            return Err(Errno::EFAULT);
        }
        if fixed.is_none() && new_len <= old_len {
            if new_len < old_len {
                self.unmap(old + new_len, old_len - new_len)?;
            }
            return Ok(old);
        }
        if fixed.is_none() && old_end == vma.end {
            if let Some(new_end) = old.checked_add(new_len) {
                if new_end <= layout::MMAP_TOP && self.range_is_free(old_end, new_end) {
                    let mut v = vma.clone();
                    v.end = new_end;
                    self.split_at(old);
                    if let Some(cur) = Arc::make_mut(&mut self.vmas).get_mut(&old) {
                        cur.end = new_end;
                    } else {
                        Arc::make_mut(&mut self.vmas).insert(old, Vma { start: old, ..v });
                    }
                    return Ok(old);
                }
            }
        }
        if !may_move {
            return Err(Errno::ENOMEM);
        }
        let dest = match fixed {
            Some(f) => {
                if !f.is_multiple_of(PAGE_SIZE) {
                    return Err(Errno::EINVAL);
                }
                let f_end = f.checked_add(new_len).ok_or(Errno::EINVAL)?;
                if f < old_end && old < f_end {
                    return Err(Errno::EINVAL);
                }
                self.unmap(f, new_len)?;
                f
            }
            None => self.find_free(new_len, 0).ok_or(Errno::ENOMEM)?,
        };
        let flags = vma.prot.leaf_flags();
        let keep = old_len.min(new_len);
        Arc::make_mut(&mut self.vmas).insert(
            dest,
            Vma {
                start: dest,
                end: dest + new_len,
                prot: vma.prot,
                kind: vma.kind.clone(),
            },
        );
        let mut off = 0;
        while off < keep {
            if let Some(frame) = self.pt.unmap(&mut self.ram, old + off) {
                // The old virtual page disappears; KVM must forget it before the frame is
                // reachable elsewhere.
                self.ram.invalidate_shadow(frame);
                self.pt
                    .map(&mut self.ram, dest + off, frame, flags)
                    .map_err(|_| Errno::ENOMEM)?;
            }
            off += PAGE_SIZE;
        }
        self.unmap(old, old_len)?;
        Ok(dest)
    }

    /// Resolve a user page fault at `addr`.
    pub fn handle_fault(&mut self, addr: u64, code: PageFaultCode) -> FaultOutcome {
        let Some(vma) = self.vma_at(addr).cloned() else {
            return FaultOutcome::NotMapped;
        };
        let allowed = if code.write() {
            vma.prot.write()
        } else if code.fetch() {
            vma.prot.exec()
        } else {
            vma.prot.accessible()
        };
        if !allowed {
            return FaultOutcome::AccessDenied;
        }
        let page = page_down(addr);
        if let Some(g) = self.guards.get(&page) {
            if (code.write() || *g == Guard::Access) && code.present() {
                return FaultOutcome::Guarded;
            }
        }
        if code.present() {
            // The VMA allows it and the page is mapped: a fault raced with a rights change
            // (the entry now allows the access), or the entry is stricter than the VMA,
            // which we never do. Retry in the first case.
            return match self.pt.lookup(&self.ram, page) {
                Some(m) if m.flags.user && (!code.write() || m.flags.write) => {
                    FaultOutcome::Resolved
                }
                _ => FaultOutcome::AccessDenied,
            };
        }
        let start = page
            .saturating_sub((FAULT_AROUND_PAGES / 2) * PAGE_SIZE)
            .max(vma.start);
        let end = (page + (FAULT_AROUND_PAGES / 2) * PAGE_SIZE).min(vma.end);
        match self.populate(start, end) {
            Ok(()) => FaultOutcome::Resolved,
            // Out of guest memory: the kernel would OOM-kill; we report the fault.
            Err(_) => FaultOutcome::AccessDenied,
        }
    }

    /// The entry rights of page `va` in a mapping with `prot`, less what a guard takes.
    fn guarded_flags(&self, va: u64, prot: Prot) -> crate::arch::x86_64::paging::PageFlags {
        let mut flags = prot.leaf_flags();
        match self.guards.get(&page_down(va)) {
            Some(Guard::Write) => flags.write = false,
            Some(Guard::Access) => flags.user = false,
            None => {}
        }
        flags
    }

    /// Watch page `page` (or stop watching it): see [`Guard`].
    pub fn set_guard(&mut self, page: u64, guard: Option<Guard>) {
        let page = page_down(page);
        match guard {
            Some(g) => {
                self.guards.insert(page, g);
            }
            None => {
                self.guards.remove(&page);
            }
        }
        self.apply_guard(page);
    }

    /// Give page `page` its mapping's full rights for one instruction (the watched access
    /// that faulted runs, single-stepped); [`AddressSpace::apply_guard`] takes them back.
    pub fn lift_guard(&mut self, page: u64) {
        let page = page_down(page);
        let Some(prot) = self.vma_at(page).map(|v| v.prot) else {
            return;
        };
        if prot.accessible() {
            self.pt.protect(&mut self.ram, page, prot.leaf_flags());
        }
    }

    /// Make page `page`'s entry match its mapping and guard.
    pub fn apply_guard(&mut self, page: u64) {
        let page = page_down(page);
        let Some(prot) = self.vma_at(page).map(|v| v.prot) else {
            return;
        };
        if !prot.accessible() {
            return;
        }
        let flags = self.guarded_flags(page, prot);
        if let Some(old) = self.pt.protect(&mut self.ram, page, flags) {
            if old.flags != flags {
                // Rights taken away must not survive in KVM's shadow tables.
                self.ram.invalidate_shadow(old.frame);
            }
        }
    }

    /// Remove every guard (the debugger is gone).
    pub fn clear_guards(&mut self) {
        let pages: Vec<u64> = std::mem::take(&mut self.guards).into_keys().collect();
        for page in pages {
            self.apply_guard(page);
        }
    }

    /// Apply every guard again (a rollback put back page tables from before some).
    pub fn reapply_guards(&mut self) {
        let pages: Vec<u64> = self.guards.keys().copied().collect();
        for page in pages {
            self.apply_guard(page);
        }
    }

    /// Translate for an access by the VMM on the guest's behalf, populating like a kernel
    /// fault would. Returns the guest physical address.
    fn translate(&mut self, va: u64, write: bool) -> Result<u64, Errno> {
        if va >= layout::USER_END {
            return Err(Errno::EFAULT);
        }
        let vma = self.vma_at(va).ok_or(Errno::EFAULT)?;
        if !vma.prot.accessible() || (write && !vma.prot.write()) {
            return Err(Errno::EFAULT);
        }
        let page = page_down(va);
        let frame = match self.pt.lookup(&self.ram, page) {
            Some(m) => m.frame,
            None => {
                self.populate(page, page + PAGE_SIZE)?;
                self.pt.lookup(&self.ram, page).ok_or(Errno::EFAULT)?.frame
            }
        };
        Ok(frame + (va - page))
    }

    /// Read guest memory; EFAULT if any byte is not readable.
    pub fn read(&mut self, va: u64, buf: &mut [u8]) -> Result<(), Errno> {
        let mut done = 0usize;
        while done < buf.len() {
            let cur = va.checked_add(done as u64).ok_or(Errno::EFAULT)?;
            let gpa = self.translate(cur, false)?;
            let chunk = ((PAGE_SIZE - cur % PAGE_SIZE) as usize).min(buf.len() - done);
            self.ram.read_phys(gpa, &mut buf[done..done + chunk]);
            done += chunk;
        }
        Ok(())
    }

    /// Read `len` bytes into a new vector (callers bound `len`).
    pub fn read_vec(&mut self, va: u64, len: usize) -> Result<Vec<u8>, Errno> {
        let mut v = vec![0; len];
        self.read(va, &mut v)?;
        Ok(v)
    }

    /// Write guest memory; EFAULT if any byte is not writable (nothing is written then,
    /// as far as the check of the whole range allows: the range is checked first).
    pub fn write(&mut self, va: u64, data: &[u8]) -> Result<(), Errno> {
        self.check_range(va, data.len() as u64, true)?;
        self.poke(va, data)
    }

    /// Write into pages already populated, whatever their protection (loader, file
    /// contents, and `write` after its range check).
    fn poke(&mut self, va: u64, data: &[u8]) -> Result<(), Errno> {
        let mut done = 0usize;
        while done < data.len() {
            let cur = va.checked_add(done as u64).ok_or(Errno::EFAULT)?;
            let page = page_down(cur);
            if self.pt.lookup(&self.ram, page).is_none() {
                self.populate(page, page + PAGE_SIZE)?;
            }
            let gpa = self.pt.lookup(&self.ram, page).ok_or(Errno::EFAULT)?.frame + (cur - page);
            let chunk = ((PAGE_SIZE - cur % PAGE_SIZE) as usize).min(data.len() - done);
            self.ram.write_phys(gpa, &data[done..done + chunk]);
            done += chunk;
        }
        Ok(())
    }

    /// Check that `[va, va+len)` is accessible (writable if `write`).
    pub fn check_range(&self, va: u64, len: u64, write: bool) -> Result<(), Errno> {
        if len == 0 {
            return Ok(());
        }
        let end = va.checked_add(len).ok_or(Errno::EFAULT)?;
        if end > layout::USER_END {
            return Err(Errno::EFAULT);
        }
        let mut cur = va;
        while cur < end {
            let v = self.vma_at(cur).ok_or(Errno::EFAULT)?;
            if !v.prot.accessible() || (write && !v.prot.write()) {
                return Err(Errno::EFAULT);
            }
            cur = v.end;
        }
        Ok(())
    }

    /// Read a plain-data value.
    pub fn read_obj<T: vm_memory::ByteValued + Default>(&mut self, va: u64) -> Result<T, Errno> {
        let mut v = T::default();
        self.read(va, v.as_mut_slice())?;
        Ok(v)
    }

    /// Write a plain-data value.
    pub fn write_obj<T: vm_memory::ByteValued>(&mut self, va: u64, v: &T) -> Result<(), Errno> {
        self.write(va, v.as_slice())
    }

    /// Read a NUL-terminated string of at most `max` bytes (without the NUL).
    /// `ENAMETOOLONG` if no NUL within `max` bytes, `EFAULT` if unreadable first.
    pub fn read_cstring(&mut self, va: u64, max: usize) -> Result<Vec<u8>, Errno> {
        let mut out = Vec::new();
        let mut cur = va;
        loop {
            let gpa = self.translate(cur, false)?;
            let chunk = (PAGE_SIZE - cur % PAGE_SIZE) as usize;
            let mut page = vec![0u8; chunk];
            self.ram.read_phys(gpa, &mut page);
            if let Some(nul) = page.iter().position(|&b| b == 0) {
                out.extend_from_slice(&page[..nul]);
                if out.len() > max {
                    return Err(Errno::ENAMETOOLONG);
                }
                return Ok(out);
            }
            out.extend_from_slice(&page);
            if out.len() > max {
                return Err(Errno::ENAMETOOLONG);
            }
            cur = cur.checked_add(chunk as u64).ok_or(Errno::EFAULT)?;
        }
    }

    /// Host iovecs for the accessible prefix of `[va, va+len)`, for a host syscall that reads
    /// (`guest_writes == false`) or fills (`guest_writes == true`) guest memory directly.
    /// `EFAULT` if not even the first byte is accessible; otherwise the prefix up to the
    /// first inaccessible page, at most `MAX_RW_COUNT` bytes and `IOV_MAX` iovecs, adjacent
    /// frames merged. With `guest_writes`, the frames are recorded as written by the VMM
    /// (for checkpoints) before the pointers are handed out.
    pub fn host_iovecs(
        &mut self,
        va: u64,
        len: usize,
        guest_writes: bool,
    ) -> Result<Vec<libc::iovec>, Errno> {
        let len = len.min(MAX_RW_COUNT);
        let mut iovs: Vec<libc::iovec> = Vec::new();
        let mut done = 0usize;
        while done < len {
            let Some(cur) = va.checked_add(done as u64) else {
                break;
            };
            let gpa = match self.translate(cur, guest_writes) {
                Ok(g) => g,
                Err(e) if done == 0 => return Err(e),
                Err(_) => break,
            };
            let chunk = ((PAGE_SIZE - cur % PAGE_SIZE) as usize).min(len - done);
            let host = self.ram.host_ptr(gpa, chunk);
            if guest_writes {
                // Recorded now, before any host call can write through the pointer: the
                // record cannot be forgotten, and a checkpoint never happens while a host
                // call is filling guest memory (threads stop at syscall boundaries).
                self.ram.mark_written(gpa, chunk as u64);
            }
            match iovs.last_mut() {
                // SAFETY: pointer arithmetic inside guest memory, only compared.
                Some(last) if unsafe { (last.iov_base as *mut u8).add(last.iov_len) } == host => {
                    last.iov_len += chunk;
                }
                _ => {
                    if iovs.len() == IOV_MAX {
                        break;
                    }
                    iovs.push(libc::iovec {
                        iov_base: host.cast(),
                        iov_len: chunk,
                    });
                }
            }
            done += chunk;
        }
        Ok(iovs)
    }

    /// Host iovecs for a guest `struct iovec` array (readv, writev, sendmsg, recvmsg...):
    /// `EINVAL` for a negative or too large count or a total length that overflows;
    /// `EFAULT` if the array or the first non-empty buffer is unreadable; later buffers that
    /// are not accessible end the list (a short transfer, as Linux gives).
    pub fn guest_iovecs(
        &mut self,
        iov_ptr: u64,
        iovcnt: i64,
        guest_writes: bool,
    ) -> Result<Vec<libc::iovec>, Errno> {
        let count = usize::try_from(iovcnt).map_err(|_| Errno::EINVAL)?;
        if count > IOV_MAX {
            return Err(Errno::EINVAL);
        }
        let raw = self.read_vec(iov_ptr, count * 16)?;
        let mut entries = Vec::with_capacity(count);
        let mut total: u64 = 0;
        for e in raw.chunks_exact(16) {
            let base = u64::from_le_bytes(e[..8].try_into().map_err(|_| Errno::EFAULT)?);
            let len = u64::from_le_bytes(e[8..].try_into().map_err(|_| Errno::EFAULT)?);
            total = total
                .checked_add(len)
                .filter(|t| *t <= i64::MAX as u64)
                .ok_or(Errno::EINVAL)?;
            entries.push((base, len));
        }
        let mut out: Vec<libc::iovec> = Vec::new();
        let mut budget = MAX_RW_COUNT;
        for (base, len) in entries {
            if len == 0 {
                continue;
            }
            if budget == 0 || out.len() >= IOV_MAX {
                break;
            }
            let want = (len as usize).min(budget);
            match self.host_iovecs(base, want, guest_writes) {
                Ok(v) => {
                    let got: usize = v.iter().map(|i| i.iov_len).sum();
                    let room = IOV_MAX - out.len();
                    out.extend(v.into_iter().take(room));
                    budget -= got;
                    if got < want {
                        break;
                    }
                }
                Err(e) if out.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        Ok(out)
    }

    /// Translate without populating (for symbolizing and unwinding: never changes state).
    pub fn peek(&self, va: u64, buf: &mut [u8]) -> bool {
        let mut done = 0usize;
        while done < buf.len() {
            let Some(cur) = va.checked_add(done as u64) else {
                return false;
            };
            if cur >= layout::USER_END {
                return false;
            }
            let page = page_down(cur);
            let Some(m) = self.pt.lookup(&self.ram, page) else {
                return false;
            };
            let chunk = ((PAGE_SIZE - cur % PAGE_SIZE) as usize).min(buf.len() - done);
            self.ram
                .read_phys(m.frame + (cur - page), &mut buf[done..done + chunk]);
            done += chunk;
        }
        true
    }

    /// Map vCPU `id`'s TSS and stacks (before the vCPU first runs).
    pub fn install_vcpu(&mut self, id: u64) -> Result<(), MmError> {
        supervisor::install_vcpu(&mut self.ram, &self.pt, id).map_err(MmError::from)
    }

    /// Read supervisor memory (the ring-0 stack) by virtual address.
    pub fn read_supervisor(&self, va: u64, buf: &mut [u8]) -> bool {
        if !(layout::SUPERVISOR_BASE..layout::SUPERVISOR_END).contains(&va) {
            return false;
        }
        let page = page_down(va);
        let Some(m) = self.pt.lookup(&self.ram, page) else {
            return false;
        };
        if (va - page) as usize + buf.len() > PAGE_SIZE as usize {
            return false;
        }
        self.ram.read_phys(m.frame + (va - page), buf);
        true
    }

    /// Pages of `[start, end)` that have a frame.
    pub fn resident_pages(&self, start: u64, end: u64) -> u64 {
        let mut n = 0;
        let mut va = page_down(start);
        while va < end {
            n += u64::from(self.pt.lookup(&self.ram, va).is_some());
            va += PAGE_SIZE;
        }
        n
    }

    /// Would committing `len` more bytes of private writable memory exceed guest memory?
    /// (Linux's heuristic overcommit refuses a single request larger than all memory.)
    fn exceeds_memory(&self, len: u64) -> bool {
        len > self.ram.size()
    }

    /// MADV_DONTNEED: drop the pages of `[addr, addr+len)`; anonymous memory reads as zero
    /// afterwards. (File-backed pages would read the file again on Linux; our file mappings
    /// are private copies, so they read as zero too. Servers use this on anonymous memory.)
    pub fn discard(&mut self, addr: u64, len: u64) -> Result<(), Errno> {
        let end = addr
            .checked_add(page_up(len).ok_or(Errno::EINVAL)?)
            .ok_or(Errno::EINVAL)?;
        self.check_range(addr, end - addr, false)
            .map_err(|_| Errno::ENOMEM)?;
        self.release_pages(addr, end);
        Ok(())
    }

    /// Current break.
    pub fn current_brk(&self) -> u64 {
        self.brk
    }
}

#[cfg(test)]
mod tests;
