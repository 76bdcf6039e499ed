//! x86-64: the guest's virtual layout, page tables and the supervisor the VMM generates.
pub mod layout;
pub mod paging;
pub mod supervisor;
