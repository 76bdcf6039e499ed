//! Virtual memory areas.

use crate::arch::x86_64::paging::PageFlags;

/// Protection bits, as `PROT_*`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Prot(pub u32);

impl Prot {
    /// PROT_NONE.
    pub const NONE: Prot = Prot(0);
    /// PROT_READ.
    pub const READ: Prot = Prot(libc::PROT_READ as u32);
    /// PROT_READ | PROT_WRITE.
    pub const READ_WRITE: Prot = Prot((libc::PROT_READ | libc::PROT_WRITE) as u32);

    /// From the syscall argument; unknown bits are EINVAL in the caller.
    pub fn from_bits(bits: u64) -> Option<Prot> {
        let known = (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u64;
        (bits & !known == 0).then_some(Prot(bits as u32))
    }
    /// Any access allowed (x86 cannot express write- or exec-only: they imply read).
    pub fn accessible(self) -> bool {
        self.0 != 0
    }
    /// Writable.
    pub fn write(self) -> bool {
        self.0 & libc::PROT_WRITE as u32 != 0
    }
    /// Executable.
    pub fn exec(self) -> bool {
        self.0 & libc::PROT_EXEC as u32 != 0
    }
    /// Leaf page flags. A PROT_NONE page keeps its frame (its contents survive a later
    /// mprotect) but is mapped supervisor-only, so every user access faults.
    pub fn leaf_flags(self) -> PageFlags {
        PageFlags {
            write: self.write(),
            exec: self.exec(),
            user: self.accessible(),
        }
    }
    /// `rwx` as in /proc/self/maps.
    pub fn maps_string(self) -> String {
        format!(
            "{}{}{}",
            if self.accessible() { 'r' } else { '-' },
            if self.write() { 'w' } else { '-' },
            if self.exec() { 'x' } else { '-' }
        )
    }
}

/// What backs a VMA.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmaKind {
    /// Anonymous memory.
    Anonymous,
    /// A private copy of a file's contents.
    File {
        /// Guest path of the file.
        path: String,
        /// File offset of the VMA's start.
        offset: u64,
        /// The guest asked for MAP_SHARED.
        shared: bool,
    },
    /// The brk heap.
    Heap,
    /// The main thread's stack.
    Stack,
    /// The VMM's breakpoint step-over slots (`[assure-xol]`, like Linux's `[uprobes]`).
    Breakpoints,
}

/// One mapping `[start, end)`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vma {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
    /// Protection.
    pub prot: Prot,
    /// Backing.
    pub kind: VmaKind,
}

impl Vma {
    /// Split at `at` (start < at < end).
    pub fn split(&self, at: u64) -> (Vma, Vma) {
        let mut left = self.clone();
        let mut right = self.clone();
        left.end = at;
        right.start = at;
        if let VmaKind::File { offset, .. } = &mut right.kind {
            *offset += at - self.start;
        }
        (left, right)
    }
}
