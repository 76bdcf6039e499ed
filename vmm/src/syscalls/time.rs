//! Clocks and sleeping.

use super::SyscallDef;

/// This family's syscalls.
pub const SYSCALLS: &[SyscallDef] = &[];
