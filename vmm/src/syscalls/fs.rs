//! Files, directories, pipes and fd-table operations.

use super::{Args, Support, SysResult, SyscallCtx, SyscallDef};
use crate::errno::check;
use crate::syscall_table;

/// This family's syscalls.
pub const SYSCALLS: &[SyscallDef] = syscall_table![
    0 read => Support::Full(sys_read),
    1 write => Support::Full(sys_write),
    3 close => Support::Full(sys_close),
];

fn sys_read(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let host = ctx.proc.fds.host_fd(a.fd(0))?;
    if a.size(2) == 0 {
        return Ok(0);
    }
    let iovs = ctx.proc.mm.host_iovecs(a.ptr(1), a.size(2), true)?;
    // SAFETY: the iovecs point into guest memory checked and populated by host_iovecs.
    let n = check(unsafe { libc::readv(host, iovs.as_ptr(), iovs.len() as i32) } as i64)?;
    ctx.proc.mm.mark_filled(&iovs, n as usize);
    Ok(n)
}

fn sys_write(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    let host = ctx.proc.fds.host_fd(a.fd(0))?;
    if a.size(2) == 0 {
        return Ok(0);
    }
    let iovs = ctx.proc.mm.host_iovecs(a.ptr(1), a.size(2), false)?;
    // SAFETY: the iovecs point into guest memory checked by host_iovecs.
    let r = check(unsafe { libc::writev(host, iovs.as_ptr(), iovs.len() as i32) } as i64);
    ctx.sigpipe_on_epipe(r)
}

fn sys_close(ctx: &mut SyscallCtx<'_>, a: &Args) -> SysResult {
    ctx.proc.fds.remove(a.fd(0))?;
    Ok(0)
}
