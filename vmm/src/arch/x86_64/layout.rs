//! Where things live in the guest's virtual address space. Every address is in the lower
//! canonical half; user programs get the same layout a Linux process without ASLR gets.

/// Supervisor region: GDT, IDT, TSS, exception stubs, syscall entry and the ring-0 stack.
/// Placed just below the top of the user half, where Linux keeps nothing either.
pub const SUPERVISOR_BASE: u64 = 0x7fff_ff00_0000;
/// Global descriptor table (one page).
pub const GDT: u64 = SUPERVISOR_BASE;
/// Interrupt descriptor table (one page).
pub const IDT: u64 = SUPERVISOR_BASE + 0x1000;
/// Task-state segment; its I/O permission bitmap follows it (three pages in all).
pub const TSS: u64 = SUPERVISOR_BASE + 0x2000;
/// Exception entry stubs, one 16-byte slot per vector (supervisor, executable).
pub const EXCEPTION_STUBS: u64 = SUPERVISOR_BASE + 0x5000;
/// Syscall entry page (LSTAR). User-executable so that a `SYSCALL` that stays at CPL3
/// (page-table based KVM) and one that enters CPL0 (hardware KVM) both reach the same exit.
pub const SYSCALL_ENTRY: u64 = SUPERVISOR_BASE + 0x6000;
/// Ring-0 stack used for exception frames (TSS.RSP0), 16 KiB.
pub const KERNEL_STACK_BOTTOM: u64 = SUPERVISOR_BASE + 0x8000;
/// Top of the ring-0 stack.
pub const KERNEL_STACK_TOP: u64 = SUPERVISOR_BASE + 0xc000;
/// IST1 stack for double faults, 8 KiB.
pub const DOUBLE_FAULT_STACK_TOP: u64 = SUPERVISOR_BASE + 0xe000;
/// End of the supervisor region.
pub const SUPERVISOR_END: u64 = SUPERVISOR_BASE + 0x10000;

/// Top of the initial user stack (exclusive).
pub const STACK_TOP: u64 = 0x7fff_fe00_0000;
/// Maximum size of the main thread's stack (RLIMIT_STACK default).
pub const STACK_MAX: u64 = 8 << 20;
/// Highest address for top-down mmap placement (below the stack and its guard gap).
pub const MMAP_TOP: u64 = STACK_TOP - STACK_MAX - (1 << 30);
/// Lowest address an mmap may use (Linux's default `vm.mmap_min_addr`).
pub const MMAP_MIN: u64 = 0x10000;
/// Load address of position-independent executables (Linux's ELF_ET_DYN_BASE without ASLR).
pub const PIE_BASE: u64 = 0x5555_5555_4000;
/// End of the user address range (exclusive): nothing at or above the supervisor region.
pub const USER_END: u64 = SUPERVISOR_BASE;

/// I/O port of the syscall exit (allowed at CPL3 by the TSS bitmap; only valid from the
/// syscall entry page).
pub const SYSCALL_PORT: u16 = 0x80;
/// Exception vector `v` exits on port `EXCEPTION_PORT_BASE + v` (only reachable at CPL0).
pub const EXCEPTION_PORT_BASE: u16 = 0xa0;

/// Linux's selectors.
pub mod selector {
    /// Kernel code.
    pub const KERNEL_CS: u16 = 0x10;
    /// Kernel data.
    pub const KERNEL_DS: u16 = 0x18;
    /// User data / stack (RPL 3).
    pub const USER_DS: u16 = 0x2b;
    /// User 64-bit code (RPL 3).
    pub const USER_CS: u16 = 0x33;
    /// Task register.
    pub const TSS: u16 = 0x40;
}
