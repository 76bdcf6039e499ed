//! Sockets and readiness.

use super::SyscallDef;

/// This family's syscalls.
pub const SYSCALLS: &[SyscallDef] = &[];
