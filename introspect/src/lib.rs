//! Introspection of guest programs.
//!
//! The VMM runs unmodified Linux x86-64 binaries; when a guest crashes it
//! needs to turn raw addresses into `function+offset` and walk the guest
//! stack. This crate does both from the ELF files the guest loaded:
//!
//! - [`Module`] is one loaded ELF image (executable, interpreter or shared
//!   library) with its function symbols and `.eh_frame` call-frame
//!   information, all expressed in guest virtual addresses (load bias
//!   applied).
//! - [`Symbolizer`] is the set of modules of one guest process; it maps
//!   addresses to modules and symbols and unwinds stacks with
//!   [`Symbolizer::backtrace`].
//! - [`Module::resolve_function`] finds a function's entry from a
//!   [`FunctionSpec`] (symbol or offset), see [`parse_function_spec`].
//! - [`decode`] plans how to step over an instruction displaced by a
//!   breakpoint (out-of-line copy or emulation).
//!
//! Everything read from ELF files or guest memory is treated as hostile:
//! malformed input yields errors or truncated results, never panics, and
//! unwinding does bounded work.

pub mod decode;
mod module;
mod resolve;
mod symbolizer;
mod unwind;

pub use module::{FunctionRange, Module, ModuleError, SymbolHit};
pub use resolve::{parse_function_spec, FunctionSpec, ResolveError, ResolvedFunction};
pub use symbolizer::Symbolizer;
pub use unwind::{Backtrace, Frame, UnwindRegs, UnwindStop};
