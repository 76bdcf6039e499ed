//! assure-vmm: runs an unmodified Linux server binary as a process VM under KVM.

/// Print a line to stderr, ignoring failures: stderr may be a pipe the reader closed, and
/// the VMM must not die of it (`eprintln!` panics then).
#[macro_export]
macro_rules! report {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

/// [`report!`] without the newline.
#[macro_export]
macro_rules! report_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let _ = write!(std::io::stderr(), $($arg)*);
    }};
}
pub mod arch;
pub mod checkpoint;
pub mod control;
pub mod errno;
pub mod events;
pub mod fd;
pub mod fs;
pub mod futex;
pub mod gdb;
pub mod image;
pub mod journal;
pub mod kick;
pub mod loader;
pub mod memory;
pub mod mm;
pub mod process;
pub mod rescue;
pub mod runner;
pub mod sandbox;
pub mod signal;
pub mod stats;
pub mod syscalls;
pub mod timer;
pub mod vcpu;
