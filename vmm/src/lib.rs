//! assure-vmm: runs an unmodified Linux server binary as a process VM under KVM.
pub mod arch;
pub mod errno;
pub mod memory;
pub mod mm;
pub mod vcpu;
