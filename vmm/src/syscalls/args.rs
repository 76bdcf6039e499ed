//! Typed views of the raw syscall arguments.

/// The six argument registers (RDI, RSI, RDX, R10, R8, R9).
#[derive(Debug, Clone, Copy)]
pub struct Args(pub [u64; 6]);

impl Args {
    /// Argument `i` as a guest pointer.
    pub fn ptr(&self, i: usize) -> u64 {
        self.0[i]
    }
    /// As a file descriptor: the kernel takes `int`, so only the low 32 bits count.
    pub fn fd(&self, i: usize) -> i64 {
        i64::from(self.0[i] as i32)
    }
    /// As `int`.
    pub fn int(&self, i: usize) -> i32 {
        self.0[i] as i32
    }
    /// As `unsigned int`.
    pub fn uint(&self, i: usize) -> u32 {
        self.0[i] as u32
    }
    /// As `size_t`.
    pub fn size(&self, i: usize) -> usize {
        self.0[i] as usize
    }
    /// As `long`/`off_t`.
    pub fn long(&self, i: usize) -> i64 {
        self.0[i] as i64
    }
    /// Raw.
    pub fn raw(&self, i: usize) -> u64 {
        self.0[i]
    }
}
