//! assure-vmm: runs an unmodified Linux server binary as a process VM under KVM.
pub mod arch;
pub mod errno;
pub mod events;
pub mod fd;
pub mod fs;
pub mod futex;
pub mod kick;
pub mod loader;
pub mod memory;
pub mod mm;
pub mod process;
pub mod runner;
pub mod sandbox;
pub mod signal;
pub mod syscalls;
pub mod vcpu;
