//! Four-level x86-64 page tables, built and owned by the VMM in guest memory.
//!
//! Intermediate entries are fully permissive; permissions live in the leaf entry only, so
//! that a protection change touches one entry. Page-table pages are never freed: a
//! process's working set of them is small and stable.

use crate::memory::{GuestRam, MemoryError, PAGE_SIZE};

/// Present.
pub const PTE_PRESENT: u64 = 1 << 0;
/// Writable.
pub const PTE_WRITABLE: u64 = 1 << 1;
/// User accessible.
pub const PTE_USER: u64 = 1 << 2;
/// Accessed (pre-set so the MMU never has to write it).
pub const PTE_ACCESSED: u64 = 1 << 5;
/// Dirty (pre-set likewise; dirtiness is tracked by KVM's log, not this bit).
pub const PTE_DIRTY: u64 = 1 << 6;
/// Large page (never used by us; a guest walk that meets it is a corruption).
pub const PTE_HUGE: u64 = 1 << 7;
/// Global.
pub const PTE_GLOBAL: u64 = 1 << 8;
/// No-execute.
pub const PTE_NX: u64 = 1 << 63;
/// Physical-address bits of an entry.
pub const PTE_ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// Access rights of one user or supervisor page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageFlags {
    /// Writes allowed.
    pub write: bool,
    /// Instruction fetches allowed.
    pub exec: bool,
    /// Accessible from CPL3.
    pub user: bool,
}

impl PageFlags {
    fn to_pte_bits(self) -> u64 {
        let mut bits = PTE_PRESENT | PTE_ACCESSED | PTE_DIRTY;
        if self.write {
            bits |= PTE_WRITABLE;
        }
        if self.user {
            bits |= PTE_USER;
        } else {
            bits |= PTE_GLOBAL;
        }
        if !self.exec {
            bits |= PTE_NX;
        }
        bits
    }

    fn from_pte(pte: u64) -> PageFlags {
        PageFlags {
            write: pte & PTE_WRITABLE != 0,
            exec: pte & PTE_NX == 0,
            user: pte & PTE_USER != 0,
        }
    }
}

/// A present leaf mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// Guest physical address of the frame.
    pub frame: u64,
    /// Its rights.
    pub flags: PageFlags,
}

/// The page-table tree of one address space.
#[derive(Debug)]
pub struct PageTables {
    root: u64,
}

fn index(va: u64, level: u32) -> u64 {
    (va >> (12 + 9 * level)) & 0x1ff
}

impl PageTables {
    /// Allocate an empty PML4.
    pub fn new(ram: &mut GuestRam) -> Result<Self, MemoryError> {
        Ok(PageTables {
            root: ram.alloc_table_frame()?,
        })
    }

    /// Guest physical address of the PML4 (the value for CR3).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// Physical address of the leaf entry for `va`, creating intermediate tables if asked.
    fn leaf_entry(
        &self,
        ram: &mut GuestRam,
        va: u64,
        create: bool,
    ) -> Result<Option<u64>, MemoryError> {
        let mut table = self.root;
        for level in (1..4).rev() {
            let entry_pa = table + index(va, level) * 8;
            let entry = ram.read_u64(entry_pa);
            if entry & PTE_PRESENT == 0 {
                if !create {
                    return Ok(None);
                }
                let next = ram.alloc_table_frame()?;
                ram.write_u64(
                    entry_pa,
                    next | PTE_PRESENT | PTE_WRITABLE | PTE_USER | PTE_ACCESSED,
                );
                table = next;
            } else {
                table = entry & PTE_ADDR_MASK;
            }
        }
        Ok(Some(table + index(va, 0) * 8))
    }

    /// Read-only walk to the leaf entry.
    fn find_leaf(&self, ram: &GuestRam, va: u64) -> Option<u64> {
        let mut table = self.root;
        for level in (1..4).rev() {
            let entry = ram.read_u64(table + index(va, level) * 8);
            if entry & PTE_PRESENT == 0 || entry & PTE_HUGE != 0 {
                return None;
            }
            table = entry & PTE_ADDR_MASK;
        }
        Some(table + index(va, 0) * 8)
    }

    /// Map the page at `va` to `frame`. An existing mapping is replaced (its frame is returned
    /// so the caller can free it).
    pub fn map(
        &self,
        ram: &mut GuestRam,
        va: u64,
        frame: u64,
        flags: PageFlags,
    ) -> Result<Option<u64>, MemoryError> {
        debug_assert!(va.is_multiple_of(PAGE_SIZE) && frame.is_multiple_of(PAGE_SIZE));
        let Some(entry_pa) = self.leaf_entry(ram, va, true)? else {
            return Ok(None);
        };
        let old = ram.read_u64(entry_pa);
        ram.write_u64(entry_pa, frame | flags.to_pte_bits());
        Ok((old & PTE_PRESENT != 0).then_some(old & PTE_ADDR_MASK))
    }

    /// Remove the mapping of `va`; returns the frame it had.
    pub fn unmap(&self, ram: &mut GuestRam, va: u64) -> Option<u64> {
        let entry_pa = self.find_leaf(ram, va)?;
        let old = ram.read_u64(entry_pa);
        if old & PTE_PRESENT == 0 {
            return None;
        }
        ram.write_u64(entry_pa, 0);
        Some(old & PTE_ADDR_MASK)
    }

    /// Change the rights of a present mapping; returns the old mapping.
    pub fn protect(&self, ram: &mut GuestRam, va: u64, flags: PageFlags) -> Option<Mapping> {
        let entry_pa = self.find_leaf(ram, va)?;
        let old = ram.read_u64(entry_pa);
        if old & PTE_PRESENT == 0 {
            return None;
        }
        ram.write_u64(entry_pa, (old & PTE_ADDR_MASK) | flags.to_pte_bits());
        Some(Mapping {
            frame: old & PTE_ADDR_MASK,
            flags: PageFlags::from_pte(old),
        })
    }

    /// The mapping of `va`, if present.
    pub fn lookup(&self, ram: &GuestRam, va: u64) -> Option<Mapping> {
        let entry = ram.read_u64(self.find_leaf(ram, va)?);
        (entry & PTE_PRESENT != 0).then(|| Mapping {
            frame: entry & PTE_ADDR_MASK,
            flags: PageFlags::from_pte(entry),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RW_USER: PageFlags = PageFlags {
        write: true,
        exec: false,
        user: true,
    };

    #[test]
    fn map_lookup_protect_unmap() {
        let mut ram = GuestRam::new(16 << 20).expect("ram");
        let pt = PageTables::new(&mut ram).expect("pt");
        let frame = ram.alloc_frame().expect("frame");
        let va = 0x7fff_f000_1000;
        assert_eq!(pt.map(&mut ram, va, frame, RW_USER).expect("map"), None);
        assert_eq!(
            pt.lookup(&ram, va),
            Some(Mapping {
                frame,
                flags: RW_USER
            })
        );
        assert_eq!(pt.lookup(&ram, va + PAGE_SIZE), None);
        let ro = PageFlags {
            write: false,
            ..RW_USER
        };
        assert_eq!(pt.protect(&mut ram, va, ro).map(|m| m.flags), Some(RW_USER));
        assert_eq!(pt.lookup(&ram, va).map(|m| m.flags), Some(ro));
        assert_eq!(pt.unmap(&mut ram, va), Some(frame));
        assert_eq!(pt.lookup(&ram, va), None);
        assert_eq!(pt.unmap(&mut ram, va), None);
    }

    #[test]
    fn leaf_bits_follow_flags() {
        let rx = PageFlags {
            write: false,
            exec: true,
            user: true,
        };
        let bits = rx.to_pte_bits();
        assert_eq!(bits & PTE_NX, 0);
        assert_eq!(bits & PTE_WRITABLE, 0);
        assert_ne!(bits & PTE_USER, 0);
        let sup = PageFlags {
            write: true,
            exec: false,
            user: false,
        };
        assert_eq!(sup.to_pte_bits() & PTE_USER, 0);
        assert_ne!(sup.to_pte_bits() & PTE_NX, 0);
    }
}
