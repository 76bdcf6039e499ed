//! The supervisor the VMM generates for each guest: GDT, TSS with its I/O bitmap, IDT,
//! exception stubs and the syscall entry page. It holds no logic: every syscall and every
//! exception becomes a port write that exits to the VMM, which then sets the user context
//! directly. That keeps the guest's CPL0 footprint to a handful of instructions, which
//! matters on page-table based KVM where CPL0 code is emulated.
//!
//! Syscall path. `SYSCALL` jumps to LSTAR = [`SYSCALL_ENTRY`](super::layout::SYSCALL_ENTRY), a user-executable page that
//! holds `out SYSCALL_PORT, al`. On page-table based KVM the CPU stays at CPL3 and the TSS
//! I/O bitmap admits the port; on hardware KVM it enters CPL0 where every port is
//! allowed. Either way the VMM sees `KVM_EXIT_IO` on [`SYSCALL_PORT`](super::layout::SYSCALL_PORT) with RIP on the entry
//! page and RCX/R11 holding the user RIP/RFLAGS, and tells the two apart by CS (0x33 vs
//! 0x10). Exceptions go through the IDT to a CPL0 stub that pushes a dummy error code where
//! the CPU pushes none and writes to port `EXCEPTION_PORT_BASE + vector`.

use kvm_bindings::{kvm_dtable, kvm_segment, kvm_sregs};

use super::layout::{self, selector};
use super::paging::{PageFlags, PageTables};
use crate::memory::{GuestRam, MemoryError, PAGE_SIZE};

/// CR0: PE | MP | ET | NE | WP | AM | PG.
pub const CR0: u64 = 0x8005_0033;
/// CR4: PAE | PGE | OSFXSR | OSXMMEXCPT | OSXSAVE (user code sees the host's CPUID, so XSAVE
/// state must be enabled as the host's is).
pub const CR4: u64 = 0x20 | 0x80 | 0x200 | 0x400 | 0x4_0000;
/// EFER: SCE | LME | LMA | NXE.
pub const EFER: u64 = 0xd01;

/// MSR numbers the supervisor sets.
pub mod msr {
    /// SYSCALL/SYSRET selectors.
    pub const STAR: u32 = 0xc000_0081;
    /// SYSCALL target.
    pub const LSTAR: u32 = 0xc000_0082;
    /// SYSCALL target in compatibility mode.
    pub const CSTAR: u32 = 0xc000_0083;
    /// RFLAGS bits cleared by SYSCALL.
    pub const SFMASK: u32 = 0xc000_0084;
    /// Swapped GS base.
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
}

/// Bits of RFLAGS cleared on SYSCALL (TF, IF, DF, IOPL, NT, AC), as Linux does.
pub const SFMASK: u64 = 0x4_7700;

/// Vectors for which the CPU pushes an error code.
const VECTORS_WITH_ERROR_CODE: [u8; 10] = [8, 10, 11, 12, 13, 14, 17, 21, 29, 30];
/// Size of a stub slot.
const STUB_SLOT: u64 = 16;
/// TSS size without the I/O bitmap.
const TSS_SIZE: u64 = 104;
/// I/O bitmap: 65536 ports plus the terminating byte.
const IO_BITMAP_SIZE: u64 = 8192 + 1;

/// Does the CPU push an error code for this vector?
pub fn has_error_code(vector: u8) -> bool {
    VECTORS_WITH_ERROR_CODE.contains(&vector)
}

/// Map the supervisor region into `pt` and fill it.
pub fn install(ram: &mut GuestRam, pt: &PageTables) -> Result<(), MemoryError> {
    let sup_rw = PageFlags {
        write: true,
        exec: false,
        user: false,
    };
    let sup_rx = PageFlags {
        write: false,
        exec: true,
        user: false,
    };
    let user_rx = PageFlags {
        write: false,
        exec: true,
        user: true,
    };
    let mut va = layout::SUPERVISOR_BASE;
    while va < layout::SHARED_SUPERVISOR_END {
        let flags = match va {
            layout::EXCEPTION_STUBS => sup_rx,
            layout::SYSCALL_ENTRY => user_rx,
            _ => sup_rw,
        };
        let frame = ram.alloc_frame()?;
        pt.map(ram, va, frame, flags)?;
        va += PAGE_SIZE;
    }
    write_supervisor(ram, pt, layout::GDT, &gdt_bytes())?;
    write_supervisor(ram, pt, layout::IDT, &idt_bytes())?;
    write_supervisor(ram, pt, layout::EXCEPTION_STUBS, &exception_stubs())?;
    write_supervisor(ram, pt, layout::SYSCALL_ENTRY, &syscall_entry())?;
    install_vcpu(ram, pt, 0)
}

/// Copy `bytes` to supervisor virtual address `va` (page-aligned chunks).
fn write_supervisor(
    ram: &mut GuestRam,
    pt: &PageTables,
    va: u64,
    bytes: &[u8],
) -> Result<(), MemoryError> {
    for (i, chunk) in bytes.chunks(PAGE_SIZE as usize).enumerate() {
        let page_va = va + (i as u64) * PAGE_SIZE;
        let m = pt
            .lookup(ram, page_va & !(PAGE_SIZE - 1))
            .ok_or(MemoryError::OutOfFrames)?;
        let off = page_va & (PAGE_SIZE - 1);
        ram.write_phys(m.frame + off, chunk);
    }
    Ok(())
}

/// Map and fill vCPU `id`'s TSS and stacks (idempotent: an existing block is kept).
pub fn install_vcpu(ram: &mut GuestRam, pt: &PageTables, id: u64) -> Result<(), MemoryError> {
    if id >= layout::MAX_VCPUS {
        return Err(MemoryError::OutOfFrames);
    }
    let base = layout::tss(id);
    if pt.lookup(ram, base).is_some() {
        return Ok(());
    }
    let sup_rw = PageFlags {
        write: true,
        exec: false,
        user: false,
    };
    let mut va = base;
    while va < layout::double_fault_stack_top(id) {
        let frame = ram.alloc_frame()?;
        pt.map(ram, va, frame, sup_rw)?;
        va += PAGE_SIZE;
    }
    write_supervisor(ram, pt, base, &tss_bytes(id))
}

fn gdt_bytes() -> Vec<u8> {
    let mut gdt = [0u64; 10];
    gdt[1] = 0x00cf_9b00_0000_ffff; // 0x08 kernel 32-bit code (unused)
    gdt[2] = 0x00af_9b00_0000_ffff; // 0x10 kernel code, L=1
    gdt[3] = 0x00cf_9300_0000_ffff; // 0x18 kernel data
    gdt[4] = 0x00cf_fb00_0000_ffff; // 0x23 user 32-bit code (SYSRET base)
    gdt[5] = 0x00cf_f300_0000_ffff; // 0x2b user data
    gdt[6] = 0x00af_fb00_0000_ffff; // 0x33 user code, L=1
                                    // Only vCPU 0's TSS is described: TR is loaded through KVM_SET_SREGS with each vCPU's
                                    // own base, never with `ltr`.
    let (lo, hi) = tss_descriptor(layout::tss(0), TSS_SIZE + IO_BITMAP_SIZE - 1);
    gdt[8] = lo; // 0x40 TSS (16 bytes)
    gdt[9] = hi;
    gdt.iter().flat_map(|d| d.to_le_bytes()).collect()
}

fn tss_descriptor(base: u64, limit: u64) -> (u64, u64) {
    let lo = (limit & 0xffff)
        | ((base & 0xff_ffff) << 16)
        | (0x8b << 40) // present, 64-bit TSS (busy)
        | (((limit >> 16) & 0xf) << 48)
        | (((base >> 24) & 0xff) << 56);
    (lo, base >> 32)
}

fn idt_bytes() -> Vec<u8> {
    let mut idt = vec![0u8; 256 * 16];
    for vector in 0u8..32 {
        let handler = layout::EXCEPTION_STUBS + u64::from(vector) * STUB_SLOT;
        // #BP and #OF are raised by user instructions (int3, into): their gates need DPL3.
        let dpl: u8 = if vector == 3 || vector == 4 { 3 } else { 0 };
        let ist: u8 = if vector == 8 { 1 } else { 0 };
        let gate = &mut idt[usize::from(vector) * 16..usize::from(vector) * 16 + 16];
        gate[0..2].copy_from_slice(&(handler as u16).to_le_bytes());
        gate[2..4].copy_from_slice(&selector::KERNEL_CS.to_le_bytes());
        gate[4] = ist;
        gate[5] = 0x80 | (dpl << 5) | 0xe; // present, interrupt gate
        gate[6..8].copy_from_slice(&((handler >> 16) as u16).to_le_bytes());
        gate[8..12].copy_from_slice(&((handler >> 32) as u32).to_le_bytes());
    }
    idt
}

fn tss_bytes(id: u64) -> Vec<u8> {
    let mut tss = vec![0u8; (TSS_SIZE + IO_BITMAP_SIZE) as usize];
    tss[4..12].copy_from_slice(&layout::kernel_stack_top(id).to_le_bytes()); // RSP0
    tss[36..44].copy_from_slice(&layout::double_fault_stack_top(id).to_le_bytes()); // IST1
    tss[102..104].copy_from_slice(&(TSS_SIZE as u16).to_le_bytes()); // I/O map base
                                                                     // Every port is open at CPL3, so that any user-mode `in`/`out` exits to the VMM
                                                                     // without a CPU exception: the syscall entry's `out`, and the one-byte `out dx, al` the
                                                                     // VMM uses as its breakpoint (an exception round trip costs several times an exit on
                                                                     // page-table based KVM). The VMM answers any other user port access with the SIGSEGV
                                                                     // Linux gives it. The last byte terminates the bitmap.
    let bitmap = &mut tss[TSS_SIZE as usize..];
    bitmap.fill(0);
    if let Some(last) = bitmap.last_mut() {
        *last = 0xff;
    }
    tss
}

fn exception_stubs() -> Vec<u8> {
    let mut page = vec![0xf4u8; PAGE_SIZE as usize]; // hlt everywhere else
    for vector in 0u8..32 {
        let slot = &mut page[usize::from(vector) * STUB_SLOT as usize..];
        let mut i = 0;
        if !has_error_code(vector) {
            slot[0] = 0x6a; // push 0: uniform frame layout
            slot[1] = 0x00;
            i = 2;
        }
        slot[i] = 0xe6; // out imm8, al
        slot[i + 1] = (layout::EXCEPTION_PORT_BASE + u16::from(vector)) as u8;
        slot[i + 2] = 0xf4; // hlt: never resumed, the VMM sets the next context
    }
    page
}

fn syscall_entry() -> Vec<u8> {
    let mut page = vec![0xccu8; PAGE_SIZE as usize];
    page[0] = 0xe6; // out SYSCALL_PORT, al (AL is the syscall number's low byte: harmless)
    page[1] = layout::SYSCALL_PORT as u8;
    page[2] = 0x0f; // ud2: never resumed
    page[3] = 0x0b;
    page
}

/// Address of the `out` instruction in the syscall entry page.
pub const SYSCALL_EXIT_RIP: u64 = layout::SYSCALL_ENTRY;
/// Length of `out imm8, al`.
pub const OUT_IMM8_LEN: u64 = 2;

fn segment(selector: u16, code: bool, dpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// User code segment (CS = 0x33).
pub fn user_code_segment() -> kvm_segment {
    segment(selector::USER_CS, true, 3)
}

/// User data segment (SS = 0x2b).
pub fn user_data_segment() -> kvm_segment {
    segment(selector::USER_DS, false, 3)
}

/// The task register of vCPU `id`: its own TSS, hence its own ring-0 stack.
pub fn task_register(id: u64) -> kvm_segment {
    kvm_segment {
        base: layout::tss(id),
        limit: (TSS_SIZE + IO_BITMAP_SIZE - 1) as u32,
        selector: selector::TSS,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 0,
        l: 0,
        g: 0,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Special registers of vCPU `id` entering user mode for the first time.
pub fn initial_sregs(template: &kvm_sregs, cr3: u64, id: u64) -> kvm_sregs {
    let mut s = *template;
    s.cs = user_code_segment();
    s.ss = user_data_segment();
    s.ds = user_data_segment();
    s.es = user_data_segment();
    s.fs = user_data_segment();
    s.gs = user_data_segment();
    s.tr = task_register(id);
    s.ldt = kvm_segment {
        selector: 0,
        type_: 0x2,
        present: 1,
        unusable: 1,
        ..Default::default()
    };
    s.gdt = kvm_dtable {
        base: layout::GDT,
        limit: (10 * 8 - 1) as u16,
        ..Default::default()
    };
    s.idt = kvm_dtable {
        base: layout::IDT,
        limit: (256 * 16 - 1) as u16,
        ..Default::default()
    };
    s.cr0 = CR0;
    s.cr3 = cr3;
    s.cr4 = CR4;
    s.efer = EFER;
    s
}

/// MSR values of the supervisor.
pub fn msrs() -> [(u32, u64); 5] {
    let star = (u64::from(selector::USER_CS - 16) << 48) | (u64::from(selector::KERNEL_CS) << 32);
    [
        (msr::STAR, star),
        (msr::LSTAR, layout::SYSCALL_ENTRY),
        (msr::CSTAR, layout::SYSCALL_ENTRY),
        (msr::SFMASK, SFMASK),
        (msr::KERNEL_GS_BASE, 0),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_port_exits_at_cpl3() {
        let tss = tss_bytes(0);
        let bitmap = &tss[TSS_SIZE as usize..];
        for port in 0..65536usize {
            let denied = bitmap[port / 8] & (1 << (port % 8)) != 0;
            assert!(!denied, "port {port:#x}");
        }
        assert_eq!(*bitmap.last().expect("terminator"), 0xff);
    }

    #[test]
    fn stubs_push_a_dummy_error_code_only_where_the_cpu_does_not() {
        let stubs = exception_stubs();
        let slot = |v: usize| &stubs[v * 16..v * 16 + 16];
        assert_eq!(&slot(0)[..4], &[0x6a, 0x00, 0xe6, 0xa0]); // #DE
        assert_eq!(&slot(14)[..2], &[0xe6, 0xae]); // #PF
        assert_eq!(&slot(3)[..4], &[0x6a, 0x00, 0xe6, 0xa3]); // #BP
    }

    #[test]
    fn breakpoint_gate_is_reachable_from_user_mode() {
        let idt = idt_bytes();
        assert_eq!(idt[3 * 16 + 5], 0xee);
        assert_eq!(idt[14 * 16 + 5], 0x8e);
        let handler = u64::from(u16::from_le_bytes([idt[14 * 16], idt[14 * 16 + 1]]))
            | (u64::from(u16::from_le_bytes([idt[14 * 16 + 6], idt[14 * 16 + 7]])) << 16)
            | (u64::from(u32::from_le_bytes([
                idt[14 * 16 + 8],
                idt[14 * 16 + 9],
                idt[14 * 16 + 10],
                idt[14 * 16 + 11],
            ])) << 32);
        assert_eq!(handler, layout::EXCEPTION_STUBS + 14 * 16);
    }

    #[test]
    fn star_selects_linux_user_segments_on_sysret() {
        let star = msrs()[0].1;
        assert_eq!((star >> 48) as u16 + 16, selector::USER_CS);
        assert_eq!((star >> 48) as u16 + 8, selector::USER_DS);
        assert_eq!((star >> 32) as u16, selector::KERNEL_CS);
    }
}
