//! Emulated `/proc` entries of the guest process.
