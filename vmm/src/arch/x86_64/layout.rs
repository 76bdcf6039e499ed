//! Where things live in the guest's virtual address space. Every address is in the lower
//! canonical half; user programs get the same layout a Linux process without ASLR gets.

/// Supervisor region: GDT, IDT, TSS, exception stubs, syscall entry and the ring-0 stack.
/// Placed just below the top of the user half, where Linux keeps nothing either.
pub const SUPERVISOR_BASE: u64 = 0x7fff_ff00_0000;
/// Global descriptor table (one page).
pub const GDT: u64 = SUPERVISOR_BASE;
/// Interrupt descriptor table (one page).
pub const IDT: u64 = SUPERVISOR_BASE + 0x1000;
/// Exception entry stubs, one 16-byte slot per vector (supervisor, executable).
pub const EXCEPTION_STUBS: u64 = SUPERVISOR_BASE + 0x5000;
/// Syscall entry page (LSTAR). User-executable so that a `SYSCALL` that stays at CPL3
/// (page-table based KVM) and one that enters CPL0 (hardware KVM) both reach the same exit.
pub const SYSCALL_ENTRY: u64 = SUPERVISOR_BASE + 0x6000;
/// End of the pages shared by all vCPUs.
pub const SHARED_SUPERVISOR_END: u64 = SUPERVISOR_BASE + 0x10000;

/// Each vCPU has its own block: a TSS (with the I/O bitmap, three pages), the ring-0 stack
/// exception frames are pushed on (TSS.RSP0) and the double-fault stack (IST1). Two vCPUs
/// taking exceptions at once must not share a stack.
pub const PER_VCPU_BASE: u64 = SHARED_SUPERVISOR_END;
/// Size of a vCPU's block.
pub const PER_VCPU_SIZE: u64 = 0x10000;
/// vCPUs the supervisor region has room for.
pub const MAX_VCPUS: u64 = 254;
/// End of the supervisor region.
pub const SUPERVISOR_END: u64 = PER_VCPU_BASE + MAX_VCPUS * PER_VCPU_SIZE;

/// The TSS of vCPU `id`.
pub const fn tss(id: u64) -> u64 {
    PER_VCPU_BASE + id * PER_VCPU_SIZE
}
/// Top of vCPU `id`'s ring-0 stack (16 KiB).
pub const fn kernel_stack_top(id: u64) -> u64 {
    PER_VCPU_BASE + id * PER_VCPU_SIZE + 0x8000
}
/// Top of vCPU `id`'s double-fault stack (8 KiB).
pub const fn double_fault_stack_top(id: u64) -> u64 {
    PER_VCPU_BASE + id * PER_VCPU_SIZE + 0xa000
}

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
