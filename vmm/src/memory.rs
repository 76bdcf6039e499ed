//! Guest physical memory: one anonymous host mapping, a frame allocator, and the record
//! of frames the VMM itself wrote (KVM's dirty log does not see host-side writes).

use std::sync::Arc;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 4096;

/// Errors of guest physical memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The host could not reserve the guest's memory.
    #[error("cannot reserve {size} bytes of guest memory: {source}")]
    Reserve {
        /// Requested size.
        size: u64,
        /// Cause.
        source: vm_memory::mmap::FromRangesError,
    },
    /// The requested size is not usable.
    #[error("guest memory size {0} must be a multiple of 2 MiB between 16 MiB and 64 GiB")]
    BadSize(u64),
    /// Every frame is in use.
    #[error("guest memory exhausted")]
    OutOfFrames,
}

/// Guest physical memory, backed by one host mapping (`MAP_NORESERVE`: untouched frames cost
/// the host nothing).
#[derive(Debug)]
pub struct GuestRam {
    mem: GuestMemoryMmap,
    host_base: *mut u8,
    size: u64,
    next_frame: u64,
    /// Shared with checkpoints until either changes (like `table_frames`).
    free_frames: Arc<Vec<u64>>,
    frames_in_use: u64,
    /// One bit per frame written by the VMM since the last `take_host_dirty`.
    host_dirty: Vec<u64>,
    /// One bit per frame that holds a page table (a rollback must tell KVM's shadow MMU
    /// about the translations it changes).
    table_frames: Arc<Vec<u64>>,
}

/// Bytes of guest memory per KVM memory slot (see [`GuestRam::kvm_slots`]).
pub const KVM_SLOT_BYTES: u64 = 64 << 20;

/// The frame allocator's state, as a checkpoint keeps it (contents are kept elsewhere).
#[derive(Debug, Clone)]
pub struct RamState {
    next_frame: u64,
    free_frames: Arc<Vec<u64>>,
    frames_in_use: u64,
    table_frames: Arc<Vec<u64>>,
}

impl RamState {
    /// Was frame number `index` a page table?
    pub fn is_table(&self, index: u64) -> bool {
        bit(&self.table_frames, index)
    }
}

fn bit(map: &[u64], index: u64) -> bool {
    map.get((index / 64) as usize)
        .is_some_and(|w| w & (1 << (index % 64)) != 0)
}

// SAFETY: `host_base` points into `mem`, which is owned by this struct and lives as long as it;
// the raw pointer is only a cached address of that mapping.
unsafe impl Send for GuestRam {}

impl GuestRam {
    /// Reserve `size` bytes of guest physical memory at guest physical address 0.
    pub fn new(size: u64) -> Result<Self, MemoryError> {
        if !size.is_multiple_of(2 << 20) || !(16 << 20..=64 << 30).contains(&size) {
            return Err(MemoryError::BadSize(size));
        }
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), size as usize)])
            .map_err(|source| MemoryError::Reserve { size, source })?;
        let host_base = mem
            .get_host_address(GuestAddress(0))
            .map_err(|_| MemoryError::BadSize(size))?;
        let frames = size / PAGE_SIZE;
        Ok(GuestRam {
            mem,
            host_base,
            size,
            next_frame: 0,
            free_frames: Arc::default(),
            frames_in_use: 0,
            host_dirty: vec![0; frames.div_ceil(64) as usize],
            table_frames: Arc::new(vec![0; frames.div_ceil(64) as usize]),
        })
    }

    /// The vm-memory view, for registering the slot with KVM.
    pub fn guest_memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// Host address of guest physical address 0.
    pub fn host_base(&self) -> *mut u8 {
        self.host_base
    }

    /// Size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Frames currently allocated.
    pub fn frames_in_use(&self) -> u64 {
        self.frames_in_use
    }

    /// Allocate one zeroed frame; returns its guest physical address.
    pub fn alloc_frame(&mut self) -> Result<u64, MemoryError> {
        let reuse = if self.free_frames.is_empty() {
            None
        } else {
            Arc::make_mut(&mut self.free_frames).pop()
        };
        let gpa = if let Some(gpa) = reuse {
            gpa
        } else if self.next_frame < self.size {
            let gpa = self.next_frame;
            self.next_frame += PAGE_SIZE;
            gpa
        } else {
            return Err(MemoryError::OutOfFrames);
        };
        self.frames_in_use += 1;
        Ok(gpa)
    }

    /// Allocate a frame for a page table.
    pub fn alloc_table_frame(&mut self) -> Result<u64, MemoryError> {
        let gpa = self.alloc_frame()?;
        let index = gpa / PAGE_SIZE;
        if let Some(w) = Arc::make_mut(&mut self.table_frames).get_mut((index / 64) as usize) {
            *w |= 1 << (index % 64);
        }
        Ok(gpa)
    }

    /// Is frame number `index` a page table now?
    pub fn is_table(&self, index: u64) -> bool {
        bit(&self.table_frames, index)
    }

    /// Frames handed out so far are all below this address.
    pub fn high_water(&self) -> u64 {
        self.next_frame
    }

    /// The allocator's state, for a checkpoint.
    pub fn state(&self) -> RamState {
        RamState {
            next_frame: self.next_frame,
            free_frames: Arc::clone(&self.free_frames),
            frames_in_use: self.frames_in_use,
            table_frames: Arc::clone(&self.table_frames),
        }
    }

    /// Put the allocator back to a checkpoint's state (the contents are restored by the
    /// checkpoint engine, which also copies free frames back as the zeroes they were).
    pub fn restore_state(&mut self, state: &RamState) {
        self.next_frame = state.next_frame;
        self.free_frames = Arc::clone(&state.free_frames);
        self.frames_in_use = state.frames_in_use;
        self.table_frames = Arc::clone(&state.table_frames);
    }

    /// Move the record of frames the VMM wrote into `bitmap` (one bit per frame, OR'ed)
    /// and clear it.
    pub fn drain_host_dirty(&mut self, bitmap: &mut [u64]) {
        for (dst, src) in bitmap.iter_mut().zip(self.host_dirty.iter_mut()) {
            *dst |= std::mem::take(src);
        }
    }

    /// Host address of frame number `index` (whole page), for the checkpoint engine's raw
    /// copies, which must not be recorded as VMM writes.
    pub fn frame_ptr(&self, index: u64) -> *mut u8 {
        self.host_ptr(index * PAGE_SIZE, PAGE_SIZE as usize)
    }

    /// Return a frame. Its host page is dropped, which both gives the memory back to the host
    /// and makes KVM forget every shadow mapping of it (mmu notifier), so a stale guest TLB
    /// entry cannot reach a frame that is later reused. The next user sees zeroes.
    pub fn free_frame(&mut self, gpa: u64) {
        debug_assert!(gpa < self.size && gpa.is_multiple_of(PAGE_SIZE));
        // SAFETY: the range is one page inside our own mapping; MADV_DONTNEED on private
        // anonymous memory only zeroes it.
        unsafe {
            libc::madvise(
                self.host_base.add(gpa as usize).cast(),
                PAGE_SIZE as usize,
                libc::MADV_DONTNEED,
            );
        }
        // Its contents changed (to zeroes) without the guest writing: a checkpoint must see it.
        self.mark_written(gpa, PAGE_SIZE);
        Arc::make_mut(&mut self.free_frames).push(gpa);
        self.frames_in_use -= 1;
    }

    /// KVM memory slots covering guest memory: `(slot, guest physical address, bytes)`.
    /// Memory is split so that reading the dirty log costs what is in use, not what
    /// could be (frames are handed out from the bottom up).
    pub fn kvm_slots(&self) -> impl Iterator<Item = (u32, u64, u64)> {
        let size = self.size;
        (0..size.div_ceil(KVM_SLOT_BYTES)).map(move |i| {
            let gpa = i * KVM_SLOT_BYTES;
            (i as u32, gpa, KVM_SLOT_BYTES.min(size - gpa))
        })
    }

    /// Make KVM drop its shadow mappings of a frame whose guest page-table entry lost
    /// permissions (mprotect), keeping the contents: a protection change of the host page
    /// fires the mmu notifier, and KVM re-walks the guest page tables on the next access.
    pub fn invalidate_shadow(&self, gpa: u64) {
        let host = self.host_slice_ptr(gpa);
        // SAFETY: one page inside our own mapping; it is read-only only between the two
        // calls, during which no vCPU runs (the VMM thread is handling an exit).
        unsafe {
            libc::mprotect(host.cast(), PAGE_SIZE as usize, libc::PROT_READ);
            libc::mprotect(
                host.cast(),
                PAGE_SIZE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
            );
        }
    }

    fn host_slice_ptr(&self, gpa: u64) -> *mut u8 {
        assert!(gpa < self.size, "guest physical address out of range");
        // SAFETY: bounds checked above; the result stays inside the mapping.
        unsafe { self.host_base.add(gpa as usize) }
    }

    /// Host pointer to `len` bytes at `gpa`, which must not cross the end of memory.
    pub fn host_ptr(&self, gpa: u64, len: usize) -> *mut u8 {
        assert!(
            gpa.checked_add(len as u64)
                .is_some_and(|end| end <= self.size),
            "guest physical range out of bounds"
        );
        self.host_slice_ptr(gpa)
    }

    /// Copy out of guest physical memory.
    pub fn read_phys(&self, gpa: u64, buf: &mut [u8]) {
        let src = self.host_ptr(gpa, buf.len());
        // SAFETY: `host_ptr` checked the range; guest memory never overlaps a Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr(), buf.len()) }
    }

    /// Copy into guest physical memory, recording the frames as written by the VMM.
    pub fn write_phys(&mut self, gpa: u64, data: &[u8]) {
        let dst = self.host_ptr(gpa, data.len());
        // SAFETY: `host_ptr` checked the range; guest memory never overlaps a Rust buffer.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), dst, data.len()) }
        self.mark_written(gpa, data.len() as u64);
    }

    /// Read a u64 at an 8-byte aligned guest physical address, in one access (page-table
    /// entries are read while other vCPUs may be changing them).
    pub fn read_u64(&self, gpa: u64) -> u64 {
        assert!(gpa.is_multiple_of(8), "unaligned u64 access");
        let p = self.host_ptr(gpa, 8).cast::<u64>();
        // SAFETY: in bounds (host_ptr) and 8-byte aligned (the mapping is page aligned).
        u64::from_le(unsafe { std::ptr::read_volatile(p) })
    }

    /// Write a u64 at an 8-byte aligned guest physical address in one store, so a concurrent
    /// page walk by another vCPU never sees half an entry.
    pub fn write_u64(&mut self, gpa: u64, v: u64) {
        assert!(gpa.is_multiple_of(8), "unaligned u64 access");
        let p = self.host_ptr(gpa, 8).cast::<u64>();
        // SAFETY: in bounds (host_ptr) and 8-byte aligned (the mapping is page aligned).
        unsafe { std::ptr::write_volatile(p, v.to_le()) };
        self.mark_written(gpa, 8);
    }

    /// Record that the VMM wrote `[gpa, gpa+len)` (also used after a host syscall filled guest
    /// memory through a host pointer).
    pub fn mark_written(&mut self, gpa: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = gpa / PAGE_SIZE;
        let last = (gpa + len - 1) / PAGE_SIZE;
        for f in first..=last {
            if let Some(word) = self.host_dirty.get_mut((f / 64) as usize) {
                *word |= 1 << (f % 64);
            }
        }
    }

    /// Frames written by the VMM since the last call, as guest physical addresses; clears the
    /// record.
    pub fn take_host_dirty(&mut self) -> Vec<u64> {
        let mut out = Vec::new();
        for (i, word) in self.host_dirty.iter_mut().enumerate() {
            let mut w = std::mem::take(word);
            while w != 0 {
                let bit = w.trailing_zeros() as u64;
                out.push((i as u64 * 64 + bit) * PAGE_SIZE);
                w &= w - 1;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_are_zeroed_and_reused() {
        let mut ram = GuestRam::new(16 << 20).expect("ram");
        let a = ram.alloc_frame().expect("frame");
        ram.write_u64(a, 0xdead_beef);
        assert_eq!(ram.read_u64(a), 0xdead_beef);
        ram.free_frame(a);
        let b = ram.alloc_frame().expect("frame");
        assert_eq!(a, b);
        assert_eq!(ram.read_u64(b), 0, "a reused frame reads as zero");
    }

    #[test]
    fn exhaustion_is_an_error() {
        let mut ram = GuestRam::new(16 << 20).expect("ram");
        for _ in 0..(16 << 20) / PAGE_SIZE {
            ram.alloc_frame().expect("frame");
        }
        assert!(matches!(ram.alloc_frame(), Err(MemoryError::OutOfFrames)));
    }

    #[test]
    fn host_writes_are_recorded_once() {
        let mut ram = GuestRam::new(16 << 20).expect("ram");
        ram.write_phys(PAGE_SIZE - 4, &[1; 8]);
        assert_eq!(ram.take_host_dirty(), vec![0, PAGE_SIZE]);
        assert!(ram.take_host_dirty().is_empty());
    }

    #[test]
    fn bad_sizes_are_refused() {
        assert!(GuestRam::new(1 << 20).is_err());
        assert!(GuestRam::new((16 << 20) + 4096).is_err());
    }
}
