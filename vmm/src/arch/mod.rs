//! Architecture support. Only x86-64 for now.
pub mod x86_64;
