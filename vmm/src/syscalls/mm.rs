//! Memory: brk, mmap, munmap, mprotect, mremap, madvise.

use super::{Args, Support, SysResult, SyscallCtx, SyscallDef};
use crate::errno::Errno;
use crate::mm::{Contents, Placement, Prot, VmaKind};
use crate::syscall_table;

/// This family's syscalls.
pub const SYSCALLS: &[SyscallDef] = syscall_table![
    9 mmap => Support::Partial(sys_mmap, "File mappings are private copies; MAP_SHARED of a file does not write back"),
    10 mprotect => Support::Full(sys_mprotect),
    11 munmap => Support::Full(sys_munmap),
    12 brk => Support::Full(sys_brk),
    25 mremap => Support::Full(sys_mremap),
    26 msync => Support::Partial(sys_msync, "No shared file mappings to write back"),
    27 mincore => Support::Full(sys_mincore),
    28 madvise => Support::Partial(sys_madvise, "MADV_DONTNEED and MADV_FREE drop pages; other advice is accepted and ignored"),
];

fn sys_brk(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    Ok(ctx.proc.mm.brk(a.raw(0)))
}

fn sys_mmap(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let (addr, len, prot, flags, fd, off) =
        (a.raw(0), a.raw(1), a.raw(2), a.int(3), a.fd(4), a.raw(5));
    let prot = Prot::from_bits(prot & !(libc::PROT_GROWSDOWN | libc::PROT_GROWSUP) as u64)
        .ok_or(Errno::EINVAL)?;
    if len == 0 || !off.is_multiple_of(crate::memory::PAGE_SIZE) {
        return Err(Errno::EINVAL);
    }
    let map_type = flags & 0xf;
    if map_type != libc::MAP_PRIVATE
        && map_type != libc::MAP_SHARED
        && map_type != libc::MAP_SHARED_VALIDATE
    {
        return Err(Errno::EINVAL);
    }
    let placement = if flags & libc::MAP_FIXED_NOREPLACE != 0 {
        Placement::FixedNoReplace(addr)
    } else if flags & libc::MAP_FIXED != 0 {
        Placement::Fixed(addr)
    } else {
        Placement::Hint(addr)
    };
    if flags & libc::MAP_ANONYMOUS != 0 {
        return ctx
            .proc
            .mm
            .map(placement, len, prot, VmaKind::Anonymous, None);
    }
    let file = ctx.proc.fds.get(fd)?;
    let host = file.host_fd();
    // SAFETY: fstat on a host fd we own, into a local buffer.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: as above.
    if unsafe { libc::fstat(host, &mut st) } < 0 {
        return Err(Errno::last());
    }
    if st.st_mode & libc::S_IFMT != libc::S_IFREG {
        return Err(Errno::ENODEV);
    }
    let file_len = (st.st_size as u64).saturating_sub(off).min(len);
    let path = file.guest_path.clone().unwrap_or_default();
    let shared = map_type != libc::MAP_PRIVATE;
    if shared && prot.write() {
        tracing::debug!(%path, "writable MAP_SHARED file mapping is a private copy");
    }
    let start = ctx.proc.mm.map(
        placement,
        len,
        prot,
        VmaKind::File {
            path: path.clone(),
            offset: off,
            shared,
        },
        Some(Contents::File {
            fd: host,
            offset: off,
            len: file_len,
        }),
    )?;
    if off == 0 {
        let mut magic = [0u8; 4];
        if ctx.proc.mm.peek(start, &mut magic) && &magic == b"\x7fELF" {
            register_library(ctx, &path, start);
        }
    }
    if prot.exec() && !ctx.proc.rescue.is_empty() {
        // New text (a library's, mapped over its header): the VMM's breakpoints in it.
        let p = &mut *ctx.proc;
        p.rescue.resync(&mut p.mm);
    }
    Ok(start)
}

/// ld.so maps a library's first segment at offset 0 and the rest over it: note the
/// library for symbolization when its ELF header is mapped.
fn register_library(ctx: &mut SyscallCtx<'_>, path: &str, start: u64) {
    if ctx
        .proc
        .symbols
        .module_for(start)
        .is_some_and(|m| m.start() == start)
    {
        return;
    }
    let Ok(bytes) = ctx.proc.fs.read_file(path, 1 << 30) else {
        return;
    };
    // The first PT_LOAD of a shared object has vaddr 0 in practice; the module itself
    // validates the file.
    match introspect::Module::from_elf(path.rsplit('/').next().unwrap_or(path), &bytes, start) {
        Ok(m) => {
            ctx.proc.symbols.add(m.with_path(path));
            let p = &mut *ctx.proc;
            if !p.rescue.is_empty() {
                if let Some(m) = p.symbols.module_for(start) {
                    p.rescue.on_module(m, &mut p.mm);
                }
            }
        }
        Err(e) => tracing::debug!(%path, error = %e, "no symbols for mapped library"),
    }
}

fn sys_munmap(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let (addr, len) = (a.raw(0), a.raw(1));
    ctx.proc.mm.unmap(addr, len)?;
    Ok(0)
}

fn sys_mprotect(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let prot = a.raw(2) & !((libc::PROT_GROWSDOWN | libc::PROT_GROWSUP) as u64);
    let prot = Prot::from_bits(prot).ok_or(Errno::EINVAL)?;
    ctx.proc.mm.protect(a.raw(0), a.raw(1), prot)?;
    if prot.exec() && !ctx.proc.rescue.is_empty() {
        let p = &mut *ctx.proc;
        p.rescue.resync(&mut p.mm);
    }
    Ok(0)
}

fn sys_mremap(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let (old, old_len, new_len, flags, new_addr) =
        (a.raw(0), a.raw(1), a.raw(2), a.int(3), a.raw(4));
    if flags & !(libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) != 0 {
        return Err(Errno::EINVAL);
    }
    let may_move = flags & libc::MREMAP_MAYMOVE != 0;
    let fixed = (flags & libc::MREMAP_FIXED != 0).then_some(new_addr);
    if fixed.is_some() && !may_move {
        return Err(Errno::EINVAL);
    }
    ctx.proc.mm.remap(old, old_len, new_len, may_move, fixed)
}

fn sys_madvise(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let (addr, len, advice) = (a.raw(0), a.raw(1), a.int(2));
    if !addr.is_multiple_of(crate::memory::PAGE_SIZE) {
        return Err(Errno::EINVAL);
    }
    match advice {
        libc::MADV_DONTNEED | libc::MADV_FREE => {
            ctx.proc.mm.discard(addr, len)?;
            Ok(0)
        }
        libc::MADV_NORMAL
        | libc::MADV_RANDOM
        | libc::MADV_SEQUENTIAL
        | libc::MADV_WILLNEED
        | libc::MADV_DONTFORK
        | libc::MADV_DOFORK
        | libc::MADV_MERGEABLE
        | libc::MADV_UNMERGEABLE
        | libc::MADV_HUGEPAGE
        | libc::MADV_NOHUGEPAGE
        | libc::MADV_DONTDUMP
        | libc::MADV_DODUMP
        | libc::MADV_COLD
        | libc::MADV_PAGEOUT => Ok(0),
        _ => Err(Errno::EINVAL),
    }
}

fn sys_msync(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    ctx.proc
        .mm
        .check_range(a.raw(0), a.raw(1), false)
        .map_err(|_| Errno::ENOMEM)?;
    Ok(0)
}

fn sys_mincore(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let (addr, len, vec) = (a.raw(0), a.raw(1), a.ptr(2));
    if !addr.is_multiple_of(crate::memory::PAGE_SIZE) {
        return Err(Errno::EINVAL);
    }
    let pages = len.div_ceil(crate::memory::PAGE_SIZE);
    if pages > 1 << 20 {
        return Err(Errno::ENOMEM);
    }
    ctx.proc
        .mm
        .check_range(addr, len, false)
        .map_err(|_| Errno::ENOMEM)?;
    let mut out = vec![0u8; pages as usize];
    for (i, b) in out.iter_mut().enumerate() {
        let va = addr + i as u64 * crate::memory::PAGE_SIZE;
        *b = u8::from(ctx.proc.mm.resident_pages(va, va + 1) == 1);
    }
    ctx.proc.mm.write(vec, &out)?;
    Ok(0)
}
