//! State of the guest process and its threads that the VMM keeps (the kernel side of a
//! process): address space, fds, file-system view, signal dispositions, symbols.

use std::collections::HashSet;

use crate::fd::FdTable;
use crate::fs::FsContext;
use crate::mm::AddressSpace;
use crate::signal::{AltStack, Dispositions, SigInfo};

/// The guest process.
#[derive(Debug)]
pub struct Process {
    /// Process id shown to the guest.
    pub pid: i32,
    /// Memory.
    pub mm: AddressSpace,
    /// File descriptors.
    pub fds: FdTable,
    /// Root and working directory.
    pub fs: FsContext,
    /// Signal dispositions.
    pub signals: Dispositions,
    /// Symbols of the executable and loaded libraries.
    pub symbols: introspect::Symbolizer,
    /// Guest path of the executable.
    pub exe: String,
    /// Command line.
    pub argv: Vec<String>,
    /// Environment.
    pub envp: Vec<String>,
    /// Auxiliary vector given at start.
    pub auxv: Vec<(u64, u64)>,
    /// File mode creation mask.
    pub umask: u32,
    /// Syscall numbers already reported as unimplemented (logged once each).
    pub reported_unimplemented: HashSet<u64>,
}

/// One guest thread's kernel-side state.
#[derive(Debug, Clone)]
pub struct Thread {
    /// Thread id.
    pub tid: i32,
    /// Blocked signals.
    pub sigmask: u64,
    /// set_tid_address / CLONE_CHILD_CLEARTID.
    pub clear_child_tid: u64,
    /// set_robust_list head.
    pub robust_list: u64,
    /// sigaltstack.
    pub altstack: AltStack,
    /// Signals sent to this thread while blocked.
    pub pending: Vec<SigInfo>,
}

impl Thread {
    /// A new thread with nothing blocked.
    pub fn new(tid: i32) -> Thread {
        Thread {
            tid,
            sigmask: 0,
            clear_child_tid: 0,
            robust_list: 0,
            altstack: AltStack::disabled(),
            pending: Vec::new(),
        }
    }
}
